//! The connection handshake as one pure step: both sides' reports in, the ordered commands the
//! runtime must execute out (openraft engine style). Combines the sync decision, split-brain
//! recovery and the generation bookkeeping of a resync start.

use crate::meta::generation::Uuid;

use super::split_brain::{self, Resolution, SplitBrainPolicy, SplitBrainSide, Verdict};
use super::state::{ConnState, ReplState};
use super::sync_decision::{
    self, BitmapPlan, Refusal, SideView, SplitBrainKind, SyncDecision, SyncOutcome, SyncRule,
};

/// Everything one side knows at handshake time about itself (the peer sends the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeSide {
    pub view: SideView,
    /// Bits set in this side's bitmap for the other side.
    pub dirty_bits: u64,
    /// `blockctl connect --discard-my-data` was given on this side.
    pub discard_my_data: bool,
    /// Quorum state now; `None` when quorum is off.
    pub quorum: Option<bool>,
    /// This side is connected to a Primary (a third node) that replicates to it now (in sync
    /// or resyncing it).
    pub follows_primary: bool,
    /// This side is the sync target of a third node now (that resync started and is not
    /// done): it takes no second resync at once ([`Refusal::TargetOfAnother`]).
    pub resyncing_from_other: bool,
    /// This side is a Secondary with up-to-date data, Established with a Primary (a third
    /// node) that replicates to it: its data is that Primary's.
    pub in_sync_with_primary: bool,
}

/// One step for the runtime, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Save the blocks set in my bitmap for the peer (my divergent writes) to the side file
    /// before anything overwrites them.
    SaveDivergentBlocks,
    /// Set every bit of my bitmap for the peer (full sync).
    SetAllBits,
    /// Copy my bitmap slot of node `0` into my slot for the peer.
    CopyBitmapSlot(u8),
    /// Clear my bitmap for the peer (the source provides the bitmap, or the marks are
    /// obsolete: [`marks_obsolete`]).
    ClearBitmap,
    /// Send my bitmap for the peer, receive the peer's bitmap for me, OR it into mine.
    ExchangeBitmaps,
    /// Source: `GenerationIds::pin_bitmap(peer)`; persist the superblock and the bitmap.
    PinBitmapUuid,
    /// Source: send the generation the target adopts (my current UUID).
    SendSyncUuid(Uuid),
    /// Target: on receiving the sync UUID, clear the consistent flag and
    /// `GenerationIds::adopt_sync_source`, persisted before the first resync write.
    AdoptSyncUuid,
    /// Enter the replication state (resync workers start for SyncSource/SyncTarget).
    Enter(ReplState),
    /// Drop the link and stay StandAlone until `blockctl connect`.
    Disconnect(DisconnectReason),
}

/// Why a handshake ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Split brain detected and not resolved; report it in status and events.
    SplitBrain(SplitBrainKind),
    /// No common generation: not the same data set.
    UnrelatedData,
    /// No resync is possible now (no usable data where it would have to come from, or a
    /// Diskless Primary and a peer at another generation, a target of another node).
    /// [`Refusal::retried`] ones stay Connecting; `NotExposedData` goes StandAlone.
    Refused(Refusal),
    /// The roles forbid the resync the generations ask for (DRBD's `rr-conflict`): StandAlone.
    RoleConflict(RoleConflict),
}

/// A live Primary would have its disk overwritten by a resync, or two live Primaries meet
/// (DRBD: "I shall become SyncTarget, but I am primary!"). "Live": Primary and not without
/// quorum; a Primary that lost quorum steps down and becomes the target instead (it
/// acknowledged nothing since). Not applied when a split-brain policy or `--discard-my-data`
/// decided the direction: those already took the roles into account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleConflict {
    /// I would become the sync target while I am Primary.
    PrimaryWouldBeTarget,
    /// The peer would become my sync target while it is Primary.
    PeerPrimaryWouldBeTarget,
    /// Both sides are Primary.
    TwoPrimaries,
}

impl std::fmt::Display for RoleConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RoleConflict::PrimaryWouldBeTarget => {
                "this node is Primary but the peer's data is newer (it would become sync \
                 target under its users): demote it, or resolve by hand"
            }
            RoleConflict::PeerPrimaryWouldBeTarget => {
                "the peer is Primary but this node's data is newer (the peer would become sync \
                 target under its users): demote the peer, or resolve by hand"
            }
            RoleConflict::TwoPrimaries => {
                "two primaries: both nodes are Primary; demote one of them"
            }
        })
    }
}

/// The result of a handshake for `me`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeOutcome {
    pub decision: SyncDecision,
    /// Present when a split brain was detected.
    pub split_brain: Option<Resolution>,
    /// The connection state afterwards.
    pub conn: ConnState,
    pub commands: Vec<Command>,
    /// Blocks are marked on a side but wait for the next Primary
    /// ([`marks_wait_for_the_primary`]): in sync for now, not to be waited for.
    pub marks_wait: bool,
}

/// Runs the handshake decision for `me` against `peer`.
pub fn handshake(
    me: &HandshakeSide,
    peer: &HandshakeSide,
    policy: &SplitBrainPolicy,
) -> HandshakeOutcome {
    let decision = sync_decision::decide(&me.view, &peer.view);
    let mut split_brain = None;
    // After a resolved split brain the OR of both bitmaps covers the divergence (UseBitmap), or
    // nothing does (FullSync).
    let mut marks_wait = false;
    let mut marks_cleared = false;
    let outcome = match decision.outcome {
        SyncOutcome::SplitBrain(kind) => {
            let side = |s: &HandshakeSide, other: &HandshakeSide| SplitBrainSide {
                node_id: s.view.node_id,
                role: s.view.role,
                primary_at_split: s.view.ids.bitmap[other.view.node_id as usize % 32].primary_bit(),
                changes: s.dirty_bits,
                // Never from a Primary: its users would see the data change under them (the
                // flag may have been given while it was still a Secondary).
                discard_my_data: s.discard_my_data && s.view.role != super::state::Role::Primary,
                quorum: s.quorum,
            };
            let r = split_brain::resolve(kind, policy, &side(me, peer), &side(peer, me));
            split_brain = Some(r);
            let plan = match kind {
                SplitBrainKind::BitmapsValid => BitmapPlan::UseBitmap,
                SplitBrainKind::NeedsFullSync => BitmapPlan::FullSync,
            };
            match r.verdict {
                Verdict::KeepMine => SyncOutcome::Source(plan),
                Verdict::DiscardMine => SyncOutcome::Target(plan),
                Verdict::Disconnect => SyncOutcome::SplitBrain(kind),
            }
        }
        // Same generation, yet blocks are marked out of sync on a side (writes a lost peer
        // never acknowledged, or made while the peer resynced from a third node): resync them
        // rather than leave them marked and possibly different forever.
        SyncOutcome::NoSync
            if decision.rule == SyncRule::Reconnected
                && (me.dirty_bits > 0 || peer.dirty_bits > 0) =>
        {
            if marks_obsolete(me, peer) {
                marks_cleared = true;
                SyncOutcome::NoSync
            } else if marks_wait_for_the_primary(me, peer) {
                marks_wait = true;
                SyncOutcome::NoSync
            } else if marked_blocks_source(me, peer) {
                SyncOutcome::Source(BitmapPlan::UseBitmap)
            } else {
                SyncOutcome::Target(BitmapPlan::UseBitmap)
            }
        }
        other => other,
    };
    let decision = if decision.outcome == SyncOutcome::NoSync {
        SyncDecision {
            outcome,
            ..decision
        }
    } else {
        decision
    };
    let discarding = split_brain.is_some_and(|r| r.verdict == Verdict::DiscardMine);
    let resolved = split_brain.is_some_and(|r| r.verdict != Verdict::Disconnect);
    let mut commands = Vec::new();
    // A resolved split brain weighed the roles (violently-as0p, quorum), except that two live
    // Primaries never connect: each would refuse the other's writes.
    if let Some(c) =
        role_conflict(me, peer, outcome).filter(|c| !resolved || *c == RoleConflict::TwoPrimaries)
    {
        commands.push(Command::Disconnect(DisconnectReason::RoleConflict(c)));
        return HandshakeOutcome {
            decision,
            split_brain,
            conn: ConnState::StandAlone,
            commands,
            marks_wait,
        };
    }
    // One resync toward a node at a time: a second source's bitmap says nothing of what the
    // first one still has to send (it may even be empty: a peer that never tracked this node
    // would declare it up to date at once).
    let second_target = match outcome {
        SyncOutcome::Target(_) => me.resyncing_from_other,
        SyncOutcome::Source(_) => peer.resyncing_from_other,
        _ => false,
    };
    let outcome = if second_target {
        SyncOutcome::Refused(Refusal::TargetOfAnother)
    } else {
        outcome
    };
    let conn = match outcome {
        SyncOutcome::NoSync => {
            if marks_cleared {
                commands.push(Command::ClearBitmap);
            }
            commands.push(Command::Enter(ReplState::Established));
            ConnState::Connected
        }
        SyncOutcome::Source(plan) => {
            match plan {
                BitmapPlan::FullSync => commands.push(Command::SetAllBits),
                BitmapPlan::CopySlot(n) => commands.push(Command::CopyBitmapSlot(n)),
                BitmapPlan::UseBitmap | BitmapPlan::PeerCopiesSlot(_) => {}
            }
            commands.push(Command::ExchangeBitmaps);
            commands.push(Command::PinBitmapUuid);
            commands.push(Command::SendSyncUuid(me.view.ids.current));
            // Never Inconsistent here: a source without usable data is refused by the decision.
            commands.push(Command::Enter(ReplState::SyncSource));
            ConnState::Connected
        }
        SyncOutcome::Target(plan) => {
            if discarding || unacknowledged_writes_overwritten(me, plan) {
                commands.push(Command::SaveDivergentBlocks);
            }
            if matches!(plan, BitmapPlan::PeerCopiesSlot(_)) {
                commands.push(Command::ClearBitmap);
            }
            commands.push(Command::ExchangeBitmaps);
            commands.push(Command::AdoptSyncUuid);
            commands.push(Command::Enter(ReplState::SyncTarget));
            ConnState::Connected
        }
        SyncOutcome::SplitBrain(kind) => {
            commands.push(Command::Disconnect(DisconnectReason::SplitBrain(kind)));
            ConnState::StandAlone
        }
        SyncOutcome::Unrelated => {
            commands.push(Command::Disconnect(DisconnectReason::UnrelatedData));
            ConnState::StandAlone
        }
        SyncOutcome::Refused(r) => {
            commands.push(Command::Disconnect(DisconnectReason::Refused(r)));
            if r.retried() {
                ConnState::Connecting
            } else {
                ConnState::StandAlone
            }
        }
    };
    HandshakeOutcome {
        decision,
        split_brain,
        conn,
        commands,
        marks_wait,
    }
}

/// The conflict of roles with the resync `outcome` of a handshake that would connect (see
/// [`RoleConflict`]); symmetric, so both ends drop the link. A Primary that lost quorum is not
/// live: it steps down (`peer.rs`).
fn role_conflict(
    me: &HandshakeSide,
    peer: &HandshakeSide,
    outcome: SyncOutcome,
) -> Option<RoleConflict> {
    use super::state::Role;
    let live_primary = |s: &HandshakeSide| s.view.role == Role::Primary && s.quorum != Some(false);
    // A split brain, unrelated data or a refusal drops the link anyway, with its own reason.
    let connects = matches!(
        outcome,
        SyncOutcome::NoSync | SyncOutcome::Source(_) | SyncOutcome::Target(_)
    );
    if !connects {
        return None;
    }
    if live_primary(me) && live_primary(peer) {
        return Some(RoleConflict::TwoPrimaries);
    }
    match outcome {
        SyncOutcome::Target(_) if live_primary(me) => Some(RoleConflict::PrimaryWouldBeTarget),
        SyncOutcome::Source(_) if live_primary(peer) => {
            Some(RoleConflict::PeerPrimaryWouldBeTarget)
        }
        _ => None,
    }
}

/// A Primary that lost quorum (still Primary with its I/O held, or stopped as one) and becomes
/// a sync target of the quorate side holds writes it never acknowledged in its bitmap for the
/// peer (sent, then the links died); the resync overwrites them. Like a split-brain victim's,
/// they are saved to the side file first, when the bitmaps say which blocks they are (not for
/// a full sync: that would copy the whole device).
fn unacknowledged_writes_overwritten(me: &HandshakeSide, plan: BitmapPlan) -> bool {
    me.view.crashed_primary
        && me.quorum == Some(false)
        && me.dirty_bits > 0
        && matches!(plan, BitmapPlan::UseBitmap)
}

/// Two Secondaries with marked blocks while a third node is Primary and replicating to one of
/// them: they resync nothing between them and keep the marks. A Secondary sending its blocks
/// would race the Primary's writes reaching the target on another link (a block read before a
/// write arrived here, applied there after it: a stale block over a newer write). While the
/// Primary lives its own bitmaps cover what each peer missed; if it is lost, the next Primary
/// resyncs the marked blocks (`repl::promote`).
fn marks_wait_for_the_primary(me: &HandshakeSide, peer: &HandshakeSide) -> bool {
    use super::state::Role;
    me.view.role != Role::Primary
        && peer.view.role != Role::Primary
        && (me.follows_primary || peer.follows_primary)
}

/// Two Secondaries both in sync with the live Primary (Established with it, up to date) hold
/// its data, both: blocks one marked for the other (writes of an earlier time, or a resync
/// toward one of them that was set up and then refused because it was already resyncing from
/// the Primary) no longer differ, and they are cleared on both sides.
fn marks_obsolete(me: &HandshakeSide, peer: &HandshakeSide) -> bool {
    use super::state::Role;
    me.view.role != Role::Primary
        && peer.view.role != Role::Primary
        && me.in_sync_with_primary
        && peer.in_sync_with_primary
}

/// Who sends the marked blocks of a same-generation reconnect: the Primary; else the only side
/// with marked blocks; else the lower node id (both ends agree).
fn marked_blocks_source(me: &HandshakeSide, peer: &HandshakeSide) -> bool {
    use super::state::Role;
    match (
        me.view.role == Role::Primary,
        peer.view.role == Role::Primary,
    ) {
        (true, false) => return true,
        (false, true) => return false,
        _ => {}
    }
    match (me.dirty_bits > 0, peer.dirty_bits > 0) {
        (true, false) => true,
        (false, true) => false,
        _ => me.view.node_id < peer.view.node_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::generation::GenerationIds;
    use crate::repl::split_brain::{After0Pri, ResolvedBy};
    use crate::repl::state::DiskState;
    use crate::repl::state::Role;
    use crate::repl::sync_decision::SyncRule;

    fn side(node_id: u8, current: u64) -> HandshakeSide {
        let mut ids = GenerationIds::just_created();
        ids.current = Uuid(current);
        HandshakeSide {
            view: SideView {
                node_id,
                ids,
                crashed_primary: false,
                disk: DiskState::UpToDate,
                role: Role::Secondary,
            },
            dirty_bits: 0,
            discard_my_data: false,
            quorum: None,
            follows_primary: false,
            resyncing_from_other: false,
            in_sync_with_primary: false,
        }
    }

    #[test]
    fn in_sync() {
        let a = side(0, 0x100);
        let out = handshake(&a, &a.clone_as(1), &SplitBrainPolicy::default());
        assert_eq!(out.conn, ConnState::Connected);
        assert_eq!(out.commands, [Command::Enter(ReplState::Established)]);
        assert_eq!(out.split_brain, None);
    }

    impl HandshakeSide {
        fn clone_as(&self, node_id: u8) -> HandshakeSide {
            let mut s = self.clone();
            s.view.node_id = node_id;
            s
        }
    }

    #[test]
    fn full_sync_of_a_new_node() {
        let a = side(0, 0x100);
        let b = side(1, Uuid::JUST_CREATED.0);
        let pol = SplitBrainPolicy::default();
        assert_eq!(
            handshake(&a, &b, &pol).commands,
            [
                Command::SetAllBits,
                Command::ExchangeBitmaps,
                Command::PinBitmapUuid,
                Command::SendSyncUuid(Uuid(0x100)),
                Command::Enter(ReplState::SyncSource)
            ]
        );
        assert_eq!(
            handshake(&b, &a, &pol).commands,
            [
                Command::ExchangeBitmaps,
                Command::AdoptSyncUuid,
                Command::Enter(ReplState::SyncTarget)
            ]
        );
    }

    #[test]
    fn copy_slot_and_refused_inconsistent_source() {
        let mut a = side(0, 0x200);
        a.view.ids.bitmap[2] = Uuid(0x100);
        let b = side(1, 0x100);
        let pol = SplitBrainPolicy::default();
        assert_eq!(
            handshake(&a, &b, &pol).commands,
            [
                Command::CopyBitmapSlot(2),
                Command::ExchangeBitmaps,
                Command::PinBitmapUuid,
                Command::SendSyncUuid(Uuid(0x200)),
                Command::Enter(ReplState::SyncSource)
            ]
        );
        assert_eq!(
            handshake(&b, &a, &pol).commands,
            [
                Command::ClearBitmap,
                Command::ExchangeBitmaps,
                Command::AdoptSyncUuid,
                Command::Enter(ReplState::SyncTarget)
            ]
        );
        // An Inconsistent a (its own resync from node 2 is not done) is no source: refused on
        // both ends, retried later.
        a.view.disk = DiskState::Inconsistent;
        for (x, y) in [(&a, &b), (&b, &a)] {
            let out = handshake(x, y, &pol);
            assert_eq!(
                out.commands,
                [Command::Disconnect(DisconnectReason::Refused(
                    Refusal::NoUsableData
                ))]
            );
            assert_eq!(out.conn, ConnState::Connecting);
        }
    }

    #[test]
    fn diskless_primary_with_marked_blocks_resyncs_nothing() {
        // Same generation, the Diskless Primary has blocks marked for the peer (writes in
        // flight when it lost the link): the marked-blocks rule must not make it a source.
        let mut a = side(0, 0x100);
        a.view.role = crate::repl::state::Role::Primary;
        a.view.disk = DiskState::Diskless;
        a.view.crashed_primary = true;
        a.dirty_bits = 10;
        let b = side(1, 0x100);
        let pol = SplitBrainPolicy::default();
        for (x, y) in [(&a, &b), (&b, &a)] {
            let out = handshake(x, y, &pol);
            assert_eq!(out.commands, [Command::Enter(ReplState::Established)]);
            assert_eq!(out.conn, ConnState::Connected);
        }
        // At another generation: StandAlone with the reason.
        a.view.ids.current = Uuid(0x300);
        let out = handshake(&a, &b, &pol);
        assert_eq!(
            out.commands,
            [Command::Disconnect(DisconnectReason::Refused(
                Refusal::NotExposedData
            ))]
        );
        assert_eq!(out.conn, ConnState::StandAlone);
    }

    fn split(a_changes: u64, b_changes: u64) -> (HandshakeSide, HandshakeSide) {
        let mut a = side(0, 0x200);
        a.view.ids.bitmap[1] = Uuid(0x101); // a was Primary at the split
        a.dirty_bits = a_changes;
        let mut b = side(1, 0x300);
        b.view.ids.bitmap[0] = Uuid(0x100);
        b.dirty_bits = b_changes;
        (a, b)
    }

    #[test]
    fn split_brain_unresolved_and_resolved() {
        let (a, mut b) = split(10, 3);
        let out = handshake(&a, &b, &SplitBrainPolicy::default());
        assert_eq!(out.conn, ConnState::StandAlone);
        assert_eq!(
            out.commands,
            [Command::Disconnect(DisconnectReason::SplitBrain(
                SplitBrainKind::BitmapsValid
            ))]
        );
        assert_eq!(out.decision.rule, SyncRule::BitmapBoth);

        let pol = SplitBrainPolicy {
            zero_primaries: After0Pri::DiscardYoungerPrimary,
            ..SplitBrainPolicy::default()
        };
        let out = handshake(&b, &a, &pol);
        assert_eq!(
            out.split_brain.map(|r| r.by),
            Some(ResolvedBy::YoungerPrimary)
        );
        assert_eq!(
            out.commands,
            [
                Command::SaveDivergentBlocks,
                Command::ExchangeBitmaps,
                Command::AdoptSyncUuid,
                Command::Enter(ReplState::SyncTarget)
            ]
        );
        assert_eq!(
            handshake(&a, &b, &pol).commands[0],
            Command::ExchangeBitmaps
        );

        // Manual resolution of a split brain without valid bitmaps: full sync.
        b.view.ids.bitmap[0] = Uuid::ZERO;
        b.view.ids.history[0] = Uuid(0x100);
        let mut a2 = a.clone();
        a2.view.ids.bitmap[1] = Uuid::ZERO;
        a2.view.ids.history[0] = Uuid(0x100);
        a2.discard_my_data = true;
        let out = handshake(&b, &a2, &pol);
        assert_eq!(out.decision.rule, SyncRule::HistoryBoth);
        assert_eq!(out.commands[0], Command::SetAllBits);
        assert_eq!(
            handshake(&a2, &b, &pol).commands[0],
            Command::SaveDivergentBlocks
        );
    }

    #[test]
    fn same_generation_with_marked_blocks_resyncs_them() {
        let pol = SplitBrainPolicy::default();
        let mut a = side(0, 0x100);
        let mut b = a.clone_as(1);
        b.dirty_bits = 5;
        let source = [
            Command::ExchangeBitmaps,
            Command::PinBitmapUuid,
            Command::SendSyncUuid(Uuid(0x100)),
            Command::Enter(ReplState::SyncSource),
        ];
        let target = [
            Command::ExchangeBitmaps,
            Command::AdoptSyncUuid,
            Command::Enter(ReplState::SyncTarget),
        ];
        // Only b has marked blocks: b sends.
        assert_eq!(handshake(&b, &a, &pol).commands, source);
        assert_eq!(handshake(&a, &b, &pol).commands, target);
        assert_eq!(
            handshake(&b, &a, &pol).decision.outcome,
            SyncOutcome::Source(BitmapPlan::UseBitmap)
        );
        // The Primary sends, whoever has the marks.
        a.view.role = Role::Primary;
        assert_eq!(handshake(&a, &b, &pol).commands, source);
        assert_eq!(handshake(&b, &a, &pol).commands, target);
        // Both marked, no Primary: the lower id sends.
        a.view.role = Role::Secondary;
        a.dirty_bits = 1;
        assert_eq!(handshake(&a, &b, &pol).commands, source);
        assert_eq!(handshake(&b, &a, &pol).commands, target);
        // Both Secondaries, a third node Primary replicating to either: the marks wait for
        // the next Primary (no resync racing the live one's writes), whoever has them.
        for (a_follows, b_follows) in [(true, false), (false, true), (true, true)] {
            a.follows_primary = a_follows;
            b.follows_primary = b_follows;
            let d = handshake(&a, &b, &pol);
            assert_eq!(d.commands, [Command::Enter(ReplState::Established)]);
            assert_eq!(d.decision.outcome, SyncOutcome::NoSync);
            assert!(d.marks_wait && handshake(&b, &a, &pol).marks_wait);
            assert_eq!(
                handshake(&b, &a, &pol).commands,
                [Command::Enter(ReplState::Established)]
            );
        }
        // Both in sync with that Primary (up to date, Established with it): both hold its
        // data, the marks are obsolete and cleared on both sides.
        a.in_sync_with_primary = true;
        b.in_sync_with_primary = true;
        for (x, y) in [(&a, &b), (&b, &a)] {
            let d = handshake(x, y, &pol);
            assert_eq!(
                d.commands,
                [Command::ClearBitmap, Command::Enter(ReplState::Established)]
            );
            assert!(!d.marks_wait);
        }
        // Only one of them: they wait as before.
        b.in_sync_with_primary = false;
        assert!(handshake(&a, &b, &pol).marks_wait);
        a.in_sync_with_primary = false;
        // ...but a Primary among the two sends them even so.
        a.view.role = Role::Primary;
        assert!(!handshake(&a, &b, &pol).marks_wait);
        assert_eq!(handshake(&a, &b, &pol).commands, source);
        assert_eq!(handshake(&b, &a, &pol).commands, target);
        a.view.role = Role::Secondary;
        a.follows_primary = false;
        b.follows_primary = false;
        // Nothing marked: nothing to do.
        a.dirty_bits = 0;
        b.dirty_bits = 0;
        assert_eq!(
            handshake(&a, &b, &pol).commands,
            [Command::Enter(ReplState::Established)]
        );
    }

    /// The cut-off Primary of a three-node partition (n2, generation 0x100, suspended without
    /// quorum, crashed-Primary flag set) meets the majority, which promoted n0 (0x300, tracking
    /// n2 from 0x100) while n1 followed it (0x100 in its history only).
    fn cut_off_primary() -> (HandshakeSide, HandshakeSide, HandshakeSide) {
        use crate::repl::state::Role;
        let mut n2 = side(2, 0x101);
        n2.view.role = Role::Primary;
        n2.view.crashed_primary = true;
        n2.dirty_bits = 16;
        n2.quorum = Some(false);
        let mut n0 = side(0, 0x301);
        n0.view.role = Role::Primary;
        n0.view.ids.bitmap[2] = Uuid(0x101);
        n0.dirty_bits = 40;
        n0.quorum = Some(true);
        let mut n1 = side(1, 0x300);
        n1.view.ids.history[0] = Uuid(0x100);
        n1.quorum = Some(true);
        (n2, n0, n1)
    }

    /// Without a generation of its own (the quorum probe refused it), the cut-off Primary is
    /// simply behind both majority nodes: a sync target, no split brain.
    #[test]
    fn cut_off_primary_without_new_generation_is_behind() {
        let (n2, n0, n1) = cut_off_primary();
        let pol = SplitBrainPolicy::default();
        // From the new Primary with its bitmap: n2's unacknowledged blocks go to its side file
        // first. From n1 (a full sync): nothing says which blocks they are, nothing is saved.
        for (maj, rule, saved) in [
            (&n0, SyncRule::BitmapPeer, true),
            (&n1, SyncRule::HistoryPeer, false),
        ] {
            let out = handshake(&n2, maj, &pol);
            assert_eq!(out.split_brain, None);
            assert_eq!(out.decision.rule, rule);
            assert!(out.commands.contains(&Command::AdoptSyncUuid));
            assert_eq!(out.commands.contains(&Command::SaveDivergentBlocks), saved);
            let back = handshake(maj, &n2, &pol);
            assert!(
                back.commands
                    .contains(&Command::Enter(ReplState::SyncSource))
            );
            assert!(!back.commands.contains(&Command::SaveDivergentBlocks));
        }
        // Nothing unacknowledged (no marked blocks), quorum held or quorum off: nothing saved.
        let mut clean = n2.clone();
        clean.dirty_bits = 0;
        assert!(
            !handshake(&clean, &n0, &pol)
                .commands
                .contains(&Command::SaveDivergentBlocks)
        );
        let mut quorate = n2.clone();
        quorate.quorum = Some(true);
        assert!(
            !handshake(&quorate, &n0, &pol)
                .commands
                .contains(&Command::SaveDivergentBlocks)
        );
        let mut off = n2.clone();
        off.quorum = None;
        assert!(
            !handshake(&off, &n0, &pol)
                .commands
                .contains(&Command::SaveDivergentBlocks)
        );
    }

    /// With a generation only it knows (the failure before the probe): history-both with n1,
    /// resolved by quorum: n2 saves its blocks and takes a full sync; no StandAlone.
    #[test]
    fn cut_off_primary_with_stray_generation_yields_by_quorum() {
        let (mut n2, _n0, n1) = cut_off_primary();
        n2.view.ids.current = Uuid(0x201);
        n2.view.ids.bitmap[0] = Uuid(0x100);
        let pol = SplitBrainPolicy::default();
        let out = handshake(&n2, &n1, &pol);
        assert_eq!(out.decision.rule, SyncRule::HistoryBoth);
        assert_eq!(out.conn, ConnState::Connected);
        assert_eq!(
            out.commands,
            [
                Command::SaveDivergentBlocks,
                Command::ExchangeBitmaps,
                Command::AdoptSyncUuid,
                Command::Enter(ReplState::SyncTarget)
            ]
        );
        let back = handshake(&n1, &n2, &pol);
        assert_eq!(back.commands[0], Command::SetAllBits);
        assert!(
            back.commands
                .contains(&Command::Enter(ReplState::SyncSource))
        );
    }

    /// Two nodes, quorum off. A (node 0) is Primary and idle when the link drops (its new
    /// generation starts lazily: it stays at 0x100); B (node 1) is promoted (0x200, tracking A
    /// from 0x100) and writes. At reconnect the generations make A the target: A must not have
    /// its disk overwritten under its users (DRBD's rr-conflict): both ends drop the link.
    #[test]
    fn a_live_primary_never_becomes_sync_target() {
        let pol = SplitBrainPolicy::default();
        let mut a = side(0, 0x101);
        a.view.role = Role::Primary;
        a.view.crashed_primary = true;
        let mut b = side(1, 0x200);
        b.view.ids.bitmap[0] = Uuid(0x100);
        b.dirty_bits = 8;
        for quorum in [None, Some(true)] {
            a.quorum = quorum;
            b.quorum = quorum;
            let out = handshake(&a, &b, &pol);
            assert_eq!(out.decision.rule, SyncRule::BitmapPeer);
            assert_eq!(
                out.commands,
                [Command::Disconnect(DisconnectReason::RoleConflict(
                    RoleConflict::PrimaryWouldBeTarget
                ))]
            );
            assert_eq!(out.conn, ConnState::StandAlone);
            let back = handshake(&b, &a, &pol);
            assert_eq!(
                back.commands,
                [Command::Disconnect(DisconnectReason::RoleConflict(
                    RoleConflict::PeerPrimaryWouldBeTarget
                ))]
            );
            assert_eq!(back.conn, ConnState::StandAlone);
        }
        // B Primary too: two live Primaries, whatever the generations say.
        b.view.role = Role::Primary;
        for (x, y) in [(&a, &b), (&b, &a)] {
            let out = handshake(x, y, &pol);
            assert_eq!(
                out.commands,
                [Command::Disconnect(DisconnectReason::RoleConflict(
                    RoleConflict::TwoPrimaries
                ))]
            );
            assert_eq!(out.conn, ConnState::StandAlone);
        }
        let mut b_same = b.clone();
        b_same.view.ids = a.view.ids.clone();
        assert_eq!(
            handshake(&a, &b_same, &pol).commands,
            [Command::Disconnect(DisconnectReason::RoleConflict(
                RoleConflict::TwoPrimaries
            ))]
        );
        // A Secondary behind is a target as before.
        a.view.role = Role::Secondary;
        b.view.role = Role::Secondary;
        assert!(
            handshake(&a, &b, &pol)
                .commands
                .contains(&Command::Enter(ReplState::SyncTarget))
        );
    }

    /// A resolved split brain already weighed the roles (violently-as0p, quorum): no role
    /// conflict then, except between two live Primaries; and `--discard-my-data` never counts
    /// from a Primary.
    #[test]
    fn a_resolved_split_brain_may_make_a_primary_the_target() {
        use crate::repl::split_brain::{After1Pri, After2Pri};
        let (a, mut b) = split(10, 3);
        b.view.role = Role::Primary;
        let pol = SplitBrainPolicy {
            zero_primaries: After0Pri::DiscardLeastChanges,
            one_primary: After1Pri::ViolentlyAs0Pri,
            two_primaries: After2Pri::ViolentlyAs0Pri,
            ..SplitBrainPolicy::default()
        };
        assert!(
            handshake(&b, &a, &pol)
                .commands
                .contains(&Command::Enter(ReplState::SyncTarget))
        );
        assert!(
            handshake(&a, &b, &pol)
                .commands
                .contains(&Command::Enter(ReplState::SyncSource))
        );
        // Two live Primaries, even resolved: never connected.
        let mut a2 = a.clone();
        a2.view.role = Role::Primary;
        for (x, y) in [(&a2, &b), (&b, &a2)] {
            assert_eq!(
                handshake(x, y, &pol).commands,
                [Command::Disconnect(DisconnectReason::RoleConflict(
                    RoleConflict::TwoPrimaries
                ))]
            );
        }
        // --discard-my-data given on a node that is Primary now (given while it was Secondary,
        // then promoted) is ignored: the default policies leave the split brain unresolved.
        let mut discarding = b.clone();
        discarding.discard_my_data = true;
        assert_eq!(
            handshake(&discarding, &a, &SplitBrainPolicy::default()).commands,
            [Command::Disconnect(DisconnectReason::SplitBrain(
                SplitBrainKind::BitmapsValid
            ))]
        );
        let mut secondary = discarding.clone();
        secondary.view.role = Role::Secondary;
        assert!(
            handshake(&secondary, &a, &SplitBrainPolicy::default())
                .commands
                .contains(&Command::Enter(ReplState::SyncTarget))
        );
        // Unresolved: the split brain is reported (not a role conflict).
        assert_eq!(
            handshake(&a, &b, &SplitBrainPolicy::default()).commands,
            [Command::Disconnect(DisconnectReason::SplitBrain(
                SplitBrainKind::BitmapsValid
            ))]
        );
    }

    /// Three nodes: P (node 0) Primary at 0x300, A (node 1) in sync with it, T (node 2) behind.
    /// T's link to P finished its handshake first: T adopted 0x300 and is Inconsistent, P's
    /// resync running. Then T's link to A: same generation, T Inconsistent. A never tracked T
    /// (its bitmap for T is empty): made T's source, it would end at once and declare T up to
    /// date while P's resync still runs.
    #[test]
    fn a_sync_target_takes_no_second_resync() {
        let pol = SplitBrainPolicy::default();
        let a = side(1, 0x300);
        let mut t = side(2, 0x300);
        t.view.disk = DiskState::Inconsistent;
        t.view.ids.history[0] = Uuid(0x100);
        t.resyncing_from_other = true;
        for (x, y) in [(&t, &a), (&a, &t)] {
            let out = handshake(x, y, &pol);
            assert_eq!(
                out.commands,
                [Command::Disconnect(DisconnectReason::Refused(
                    Refusal::TargetOfAnother
                ))]
            );
            assert_eq!(out.conn, ConnState::Connecting, "retried");
        }
        // P's resync is over (P gone before it finished): A resyncs T, all of it, since A's
        // bitmap says nothing of what T lacks.
        t.resyncing_from_other = false;
        assert_eq!(
            handshake(&t, &a, &pol).decision.outcome,
            SyncOutcome::Target(BitmapPlan::FullSync)
        );
        assert_eq!(handshake(&a, &t, &pol).commands[0], Command::SetAllBits);
        // A resync from another node does not stop this node from being a source or in sync.
        let mut p = side(0, 0x300);
        p.resyncing_from_other = true;
        assert_eq!(
            handshake(&p, &a, &pol).commands,
            [Command::Enter(ReplState::Established)]
        );
        let behind = side(3, Uuid::JUST_CREATED.0);
        assert!(
            handshake(&p, &behind, &pol)
                .commands
                .contains(&Command::Enter(ReplState::SyncSource))
        );
    }

    #[test]
    fn unrelated() {
        let a = side(0, 0x200);
        let b = side(1, 0x300);
        let out = handshake(&a, &b, &SplitBrainPolicy::default());
        assert_eq!(out.conn, ConnState::StandAlone);
        assert_eq!(
            out.commands,
            [Command::Disconnect(DisconnectReason::UnrelatedData)]
        );
    }
}
