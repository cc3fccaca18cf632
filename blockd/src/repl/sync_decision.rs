//! The resync decision of a handshake: from both nodes' generation identifiers, crash flags and
//! disk states, decide whether to resync, in which direction, with which bitmap — or that the
//! nodes split-brained or hold unrelated data. Mirrors DRBD 9's `drbd_uuid_compare`.
//!
//! The function is evaluated independently on both ends of a link, each with itself as `me`.
//! It is antisymmetric: `decide(a, b) == decide(b, a).mirrored()` for every input (tested), so
//! both ends always agree on the direction without another round trip. Ties are broken by node
//! id: the lower node id is the sync source.
//!
//! Differences from DRBD, all on the side of caution or simplicity:
//! - No compatibility fix-ups for old protocol versions (`uuid_fixup_resync_*`): our resync
//!   bookkeeping ([`GenerationIds::pin_bitmap`], [`GenerationIds::adopt_sync_source`]) makes a
//!   resync resumable without them.
//! - DRBD evaluates "peer is behind" and "I am behind" rules in a fixed order, so contradictory
//!   generation histories (both sides look behind) pick whichever rule comes first. Here all
//!   evidence is gathered first; contradictory evidence is a split brain needing a full sync.
//! - "History both" looks for a common ancestor among history *and* bitmap UUIDs (DRBD: history
//!   only), so a generation parked in a bitmap slot is not mistaken for unrelated data.
//!
//! Disk states come before generations: a node without usable data (Diskless, Failed,
//! Attaching, Inconsistent — anything but Outdated/Consistent/UpToDate) is never a resync
//! source, whatever its generation identifiers say (a Diskless Primary may have started a
//! generation, or count as a crashed Primary, without holding a single block of it). A side
//! without a disk takes part in no resync at all; when neither side has usable data, or the
//! side the generations pick as source has none, the resync is refused
//! ([`SyncOutcome::Refused`]) and the link is retried later. A Diskless Primary only connects
//! to a peer holding the generation it exposes (DRBD: "peer's data does not match the data I am
//! exposing").

use crate::meta::generation::{GenerationIds, Uuid};

use super::state::{DiskState, Role};

/// One side of a handshake, as it reports itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideView {
    /// The node id of this side.
    pub node_id: u8,
    /// Its generation identifiers.
    pub ids: GenerationIds,
    /// It was Primary when it last stopped without demoting (crash, kill, or Primary that lost
    /// quorum), so its activity-log extents may hold writes its peers never received.
    pub crashed_primary: bool,
    /// Its disk state from its metadata flags (Negotiating already resolved by the caller:
    /// `Inconsistent` when the consistent flag is clear, else `Outdated`/`UpToDate`/`Consistent`).
    pub disk: DiskState,
    /// Its current role.
    pub role: Role,
}

/// How the source decides which blocks to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapPlan {
    /// The bits already tracked in the source's bitmap for the target (plus, after a bitmap
    /// exchange, the target's bits for the source).
    UseBitmap,
    /// Every block (set every bit first).
    FullSync,
    /// On the source: copy its bitmap slot of node `0` into the target's slot, then use it
    /// (the target is at a generation the source tracked for another node).
    CopySlot(u8),
    /// On the target: the source copies its slot of node `0`; the target clears its own bits
    /// for the source before the exchange, unless they hold repair marks (kept and handed to
    /// the source: `MetaState::clear_for_handshake`).
    PeerCopiesSlot(u8),
}

impl BitmapPlan {
    fn mirrored(self) -> BitmapPlan {
        match self {
            BitmapPlan::UseBitmap => BitmapPlan::UseBitmap,
            BitmapPlan::FullSync => BitmapPlan::FullSync,
            BitmapPlan::CopySlot(n) => BitmapPlan::PeerCopiesSlot(n),
            BitmapPlan::PeerCopiesSlot(n) => BitmapPlan::CopySlot(n),
        }
    }
}

/// What kind of split brain was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitBrainKind {
    /// Both diverged from the same generation and each tracked its own changes since: the OR of
    /// both bitmaps covers every differing block, so a policy may resolve it automatically.
    BitmapsValid,
    /// A common ancestor exists but the bitmaps do not cover the divergence: only a manual
    /// resolution, followed by a full sync, can heal it.
    NeedsFullSync,
}

/// The outcome for `me`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Same data: replicate new writes, nothing to resync.
    NoSync,
    /// I send blocks to the peer.
    Source(BitmapPlan),
    /// The peer sends blocks to me; my disk is Inconsistent until the resync ends.
    Target(BitmapPlan),
    /// Both sides wrote independently.
    SplitBrain(SplitBrainKind),
    /// No common generation at all: refuse to connect.
    Unrelated,
    /// No resync is possible now: see [`Refusal`].
    Refused(Refusal),
}

/// Why no resync (and no connection) can happen now. Symmetric: both ends see the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Neither side has usable data, or the side whose data is newer has none (Inconsistent:
    /// its own resync is not done). Retried later: it changes once a side has usable data.
    NoUsableData,
    /// A Diskless Primary and a peer at another generation: the peer's data is not the data
    /// the Primary exposes, and it has none of its own to give. Needs the administrator.
    NotExposedData,
    /// The side that would be the target is already the sync target of a third node: a node
    /// takes one resync at a time (DRBD pauses the second: PausedSyncT). Retried later: once
    /// that resync is done the sides are in sync or decide afresh.
    TargetOfAnother,
}

impl Refusal {
    /// The link is retried (Connecting) rather than left StandAlone.
    pub fn retried(self) -> bool {
        match self {
            Refusal::NoUsableData | Refusal::TargetOfAnother => true,
            Refusal::NotExposedData => false,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::NoUsableData => {
                "no resync possible: the side with the newest data has no usable local data \
                 (diskless, failed or inconsistent) and the other cannot replace it"
            }
            Refusal::NotExposedData => {
                "a diskless Primary cannot take the peer's data: the peer's generation differs \
                 from the data the Primary exposes"
            }
            Refusal::TargetOfAnother => {
                "no resync now: the sync target is already resyncing from another node \
                 (retried until that resync is done)"
            }
        })
    }
}

impl SyncOutcome {
    /// The same outcome seen from the peer.
    pub fn mirrored(self) -> SyncOutcome {
        match self {
            SyncOutcome::Source(p) => SyncOutcome::Target(p.mirrored()),
            SyncOutcome::Target(p) => SyncOutcome::Source(p.mirrored()),
            other => other,
        }
    }
}

/// Which rule produced the outcome (logged like DRBD's "by rule=...").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncRule {
    /// I have no disk (Diskless, Failed, Attaching): no resync, the link only carries I/O.
    NoDiskSelf,
    NoDiskPeer,
    /// Neither side has usable data.
    NoUsableDataBoth,
    /// The generations pick a source without usable data.
    SourceWithoutData,
    /// A Diskless Primary and a peer at another generation.
    DisklessPrimaryMismatch,
    JustCreatedBoth,
    JustCreatedSelf,
    JustCreatedPeer,
    /// Equal generations, one side Inconsistent (an interrupted resync resumes).
    InconsistentSelf,
    InconsistentPeer,
    /// Equal generations, one side crashed as Primary.
    CrashedPrimarySelf,
    CrashedPrimaryPeer,
    /// Equal generations, both crashed as Primary: lower node id is source.
    CrashedPrimaryBoth,
    /// Equal generations, nothing to do.
    Reconnected,
    BitmapPeer,
    BitmapPeerOther,
    BitmapSelf,
    BitmapSelfOther,
    HistoryPeer,
    HistorySelf,
    /// Both sides look behind the other: histories contradict each other.
    Contradictory,
    BitmapBoth,
    HistoryBoth,
    NoCommonAncestor,
}

impl SyncRule {
    fn mirrored(self) -> SyncRule {
        use SyncRule::*;
        match self {
            NoDiskSelf => NoDiskPeer,
            NoDiskPeer => NoDiskSelf,
            JustCreatedSelf => JustCreatedPeer,
            JustCreatedPeer => JustCreatedSelf,
            InconsistentSelf => InconsistentPeer,
            InconsistentPeer => InconsistentSelf,
            CrashedPrimarySelf => CrashedPrimaryPeer,
            CrashedPrimaryPeer => CrashedPrimarySelf,
            BitmapPeer => BitmapSelf,
            BitmapSelf => BitmapPeer,
            BitmapPeerOther => BitmapSelfOther,
            BitmapSelfOther => BitmapPeerOther,
            HistoryPeer => HistorySelf,
            HistorySelf => HistoryPeer,
            other => other,
        }
    }
}

/// An outcome and the rule that produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncDecision {
    pub outcome: SyncOutcome,
    pub rule: SyncRule,
}

impl SyncDecision {
    /// The same decision seen from the peer.
    pub fn mirrored(self) -> SyncDecision {
        SyncDecision {
            outcome: self.outcome.mirrored(),
            rule: self.rule.mirrored(),
        }
    }
}

fn decision(outcome: SyncOutcome, rule: SyncRule) -> SyncDecision {
    SyncDecision { outcome, rule }
}

/// How one side is behind the other, strongest evidence first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Behind {
    /// The other side tracks changes since my generation in its bitmap for me.
    Bitmap,
    /// The other side tracks changes since my generation in its bitmap for node `.0`.
    OtherBitmap(u8),
    /// My generation is in the other side's history (its bitmap does not cover the gap).
    History,
}

/// Evidence that `behind` holds an older generation of `ahead`'s data.
fn behind(behind: &SideView, ahead: &SideView) -> Option<Behind> {
    let mine = behind.ids.current;
    if ahead.ids.bitmap[behind.node_id as usize % 32].same(mine) {
        return Some(Behind::Bitmap);
    }
    if let Some(other) = ahead.ids.bitmap_slot_of(mine, behind.node_id) {
        return Some(Behind::OtherBitmap(other));
    }
    if ahead.ids.in_history(mine) {
        return Some(Behind::History);
    }
    None
}

fn ancestors(side: &SideView) -> impl Iterator<Item = Uuid> + '_ {
    side.ids
        .history
        .iter()
        .chain(side.ids.bitmap.iter())
        .copied()
        .filter(|u| !u.is_zero())
}

/// Decides the resync between `me` and `peer` (see the module docs for the rules).
pub fn decide(me: &SideView, peer: &SideView) -> SyncDecision {
    if let Some(d) = decide_by_disks(me, peer) {
        return d;
    }
    let d = decide_by_generations(me, peer);
    // Rule source-without-data: whatever the generations say, only usable data is sent.
    let source_has_data = match d.outcome {
        SyncOutcome::Source(_) => me.disk.is_consistent(),
        SyncOutcome::Target(_) => peer.disk.is_consistent(),
        _ => true,
    };
    if !source_has_data {
        return decision(
            SyncOutcome::Refused(Refusal::NoUsableData),
            SyncRule::SourceWithoutData,
        );
    }
    d
}

fn just_created(s: &SideView) -> bool {
    s.ids.current.is_zero() || s.ids.current.same(Uuid::JUST_CREATED)
}

/// The rules of disk states that hold whatever the generations say; `None` when both sides
/// have a disk and one of them usable data (the generations decide).
fn decide_by_disks(me: &SideView, peer: &SideView) -> Option<SyncDecision> {
    // Rule just-created-both first: a new cluster's nodes are all Inconsistent and connect
    // (no data anywhere, nothing to sync) so that the first Primary's full sync can start.
    if just_created(me) && just_created(peer) {
        return None;
    }
    // Rule no-usable-data-both: nobody has data to give. Neither direction is safe.
    if !me.disk.is_consistent() && !peer.disk.is_consistent() {
        return Some(decision(
            SyncOutcome::Refused(Refusal::NoUsableData),
            SyncRule::NoUsableDataBoth,
        ));
    }
    // Rules no-disk-self/peer: the side without a disk neither sends nor receives blocks. A
    // Diskless Primary serves the peer's data to its clients, so that data must be the
    // generation it exposes; a Diskless Secondary exposes nothing (its Primary tracks every
    // write for it in its bitmap until it attaches).
    let no_disk = |s: &SideView| !s.disk.has_disk();
    let same = me.ids.current.same(peer.ids.current);
    let diskless_primary = |s: &SideView| no_disk(s) && s.role == Role::Primary;
    if (diskless_primary(me) || diskless_primary(peer)) && !same {
        return Some(decision(
            SyncOutcome::Refused(Refusal::NotExposedData),
            SyncRule::DisklessPrimaryMismatch,
        ));
    }
    if no_disk(me) {
        return Some(decision(SyncOutcome::NoSync, SyncRule::NoDiskSelf));
    }
    if no_disk(peer) {
        return Some(decision(SyncOutcome::NoSync, SyncRule::NoDiskPeer));
    }
    None
}

/// The generation rules (DRBD's `drbd_uuid_compare`), for two sides with disks.
fn decide_by_generations(me: &SideView, peer: &SideView) -> SyncDecision {
    let just = just_created;
    let (mine, theirs) = (me.ids.current, peer.ids.current);

    // Rule just-created-both: neither node ever held data; nothing to sync (one of them is
    // force-promoted later, which creates the first real generation).
    if just(me) && just(peer) {
        return decision(SyncOutcome::NoSync, SyncRule::JustCreatedBoth);
    }
    // Rule just-created-self: I never held data; take everything from the peer.
    if just(me) {
        return decision(
            SyncOutcome::Target(BitmapPlan::FullSync),
            SyncRule::JustCreatedSelf,
        );
    }
    // Rule just-created-peer: the peer never held data; give it everything.
    if just(peer) {
        return decision(
            SyncOutcome::Source(BitmapPlan::FullSync),
            SyncRule::JustCreatedPeer,
        );
    }

    if mine.same(theirs) {
        return decide_same_generation(me, peer);
    }

    // Different generations: gather the evidence of who is behind whom (DRBD rules
    // bitmap-peer, bitmap-peer-other, history-peer for me; bitmap-self, bitmap-self-other,
    // history-self for the peer).
    match (behind(me, peer), behind(peer, me)) {
        (Some(how), None) => {
            let (plan, rule) = match how {
                // Rule bitmap-peer: the peer's bitmap for me tracks changes since my generation.
                Behind::Bitmap => (BitmapPlan::UseBitmap, SyncRule::BitmapPeer),
                // Rule bitmap-peer-other: the peer tracks changes since my generation for
                // another node; it copies that slot and uses it.
                Behind::OtherBitmap(n) => {
                    (BitmapPlan::PeerCopiesSlot(n), SyncRule::BitmapPeerOther)
                }
                // Rule history-peer: my generation is only in the peer's history.
                Behind::History => (BitmapPlan::FullSync, SyncRule::HistoryPeer),
            };
            decision(SyncOutcome::Target(plan), rule)
        }
        (None, Some(how)) => {
            let (plan, rule) = match how {
                // Rule bitmap-self: my bitmap for the peer tracks changes since its generation.
                Behind::Bitmap => (BitmapPlan::UseBitmap, SyncRule::BitmapSelf),
                // Rule bitmap-self-other: I track the peer's generation for another node.
                Behind::OtherBitmap(n) => (BitmapPlan::CopySlot(n), SyncRule::BitmapSelfOther),
                // Rule history-self: the peer's generation is only in my history.
                Behind::History => (BitmapPlan::FullSync, SyncRule::HistorySelf),
            };
            decision(SyncOutcome::Source(plan), rule)
        }
        // Both look behind: the histories contradict each other. Never guess a direction.
        (Some(_), Some(_)) => decision(
            SyncOutcome::SplitBrain(SplitBrainKind::NeedsFullSync),
            SyncRule::Contradictory,
        ),
        (None, None) => {
            // Rule bitmap-both: both started tracking changes against the same generation:
            // both wrote after the split, and both bitmaps together cover the divergence.
            let my_base = me.ids.bitmap[peer.node_id as usize % 32];
            let peer_base = peer.ids.bitmap[me.node_id as usize % 32];
            if !my_base.is_zero() && my_base.same(peer_base) {
                return decision(
                    SyncOutcome::SplitBrain(SplitBrainKind::BitmapsValid),
                    SyncRule::BitmapBoth,
                );
            }
            // Rule history-both: some common ancestor, but no bitmap covers the divergence.
            if ancestors(me).any(|a| ancestors(peer).any(|b| a.same(b))) {
                return decision(
                    SyncOutcome::SplitBrain(SplitBrainKind::NeedsFullSync),
                    SyncRule::HistoryBoth,
                );
            }
            // No common generation: different clusters or a wiped node. Refuse.
            decision(SyncOutcome::Unrelated, SyncRule::NoCommonAncestor)
        }
    }
}

/// Equal current generations: the data is the same generation, but a resync may still be
/// needed to finish an interrupted one or to cover a crashed Primary's in-flight writes.
fn decide_same_generation(me: &SideView, peer: &SideView) -> SyncDecision {
    let me_inc = me.disk == DiskState::Inconsistent;
    let peer_inc = peer.disk == DiskState::Inconsistent;
    // Rule inconsistent-self/peer: one side adopted this generation as a sync target and did
    // not finish. The consistent side resumes with its bitmap (DRBD: decide by disk states)
    // if it tracked the target (a bitmap UUID for it: it was that resync's source, or the
    // target missed its writes); else its bitmap says nothing about what the target lacks
    // (e.g. it resynced from a third node that is gone): a full sync.
    // An Inconsistent disk is never a source; both Inconsistent means nobody has good data.
    let tracked = |source: &SideView, target: &SideView| {
        if source.ids.bitmap[target.node_id as usize % 32].is_zero() {
            BitmapPlan::FullSync
        } else {
            BitmapPlan::UseBitmap
        }
    };
    match (me_inc, peer_inc) {
        (true, false) if peer.disk.is_consistent() => {
            return decision(
                SyncOutcome::Target(tracked(peer, me)),
                SyncRule::InconsistentSelf,
            );
        }
        (false, true) if me.disk.is_consistent() => {
            return decision(
                SyncOutcome::Source(tracked(me, peer)),
                SyncRule::InconsistentPeer,
            );
        }
        _ => {}
    }
    // Rule crashed-primary: a Primary that crashed may have written blocks (in its activity
    // log extents, which it marks out of sync when it attaches) that the peer never got. Its
    // data wins, so every write it acknowledged survives.
    match (me.crashed_primary, peer.crashed_primary) {
        (true, false) => decision(
            SyncOutcome::Source(BitmapPlan::UseBitmap),
            SyncRule::CrashedPrimarySelf,
        ),
        (false, true) => decision(
            SyncOutcome::Target(BitmapPlan::UseBitmap),
            SyncRule::CrashedPrimaryPeer,
        ),
        // Both crashed as Primary of the same generation (common power failure): either copy
        // is acceptable; the lower node id is the source so both ends agree. Unless one of
        // them is Primary now (it lost its peer and kept running, the other restarted): its
        // disk is what its users read, so it is the source, never the target.
        (true, true) => {
            let me_source = match (me.role == Role::Primary, peer.role == Role::Primary) {
                (true, false) => true,
                (false, true) => false,
                _ => me.node_id < peer.node_id,
            };
            let outcome = if me_source {
                SyncOutcome::Source(BitmapPlan::UseBitmap)
            } else {
                SyncOutcome::Target(BitmapPlan::UseBitmap)
            };
            decision(outcome, SyncRule::CrashedPrimaryBoth)
        }
        // Rule reconnected: a link hiccup or a clean restart; nothing differs.
        (false, false) => decision(SyncOutcome::NoSync, SyncRule::Reconnected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::generation::HISTORY_LEN;
    use proptest::prelude::*;

    fn side(node_id: u8, current: u64) -> SideView {
        let mut ids = GenerationIds::just_created();
        ids.current = Uuid(current);
        SideView {
            node_id,
            ids,
            crashed_primary: false,
            disk: DiskState::UpToDate,
            role: Role::Secondary,
        }
    }

    /// Asserts the decision for `a` and that `b` sees the mirror image.
    fn check(a: &SideView, b: &SideView, outcome: SyncOutcome, rule: SyncRule) {
        let d = decide(a, b);
        assert_eq!(d, SyncDecision { outcome, rule }, "a={a:?}\nb={b:?}");
        assert_eq!(decide(b, a), d.mirrored());
    }

    #[test]
    fn just_created() {
        let a = side(0, Uuid::JUST_CREATED.0);
        let b = side(1, Uuid::JUST_CREATED.0);
        check(&a, &b, SyncOutcome::NoSync, SyncRule::JustCreatedBoth);
        let c = side(1, 0x100);
        check(
            &a,
            &c,
            SyncOutcome::Target(BitmapPlan::FullSync),
            SyncRule::JustCreatedSelf,
        );
        check(
            &c,
            &a,
            SyncOutcome::Source(BitmapPlan::FullSync),
            SyncRule::JustCreatedPeer,
        );
        // A zero current counts as just created (never valid data).
        let z = side(2, 0);
        check(
            &z,
            &c,
            SyncOutcome::Target(BitmapPlan::FullSync),
            SyncRule::JustCreatedSelf,
        );
    }

    #[test]
    fn same_generation() {
        let mut a = side(0, 0x100);
        let mut b = side(1, 0x101); // primary bit differs: same generation
        check(&a, &b, SyncOutcome::NoSync, SyncRule::Reconnected);

        // b resynced from a third node (adopted its generation) that is gone; a never tracked
        // b (no bitmap UUID for it): its bitmap says nothing of what b lacks, a full sync.
        b.disk = DiskState::Inconsistent;
        check(
            &a,
            &b,
            SyncOutcome::Source(BitmapPlan::FullSync),
            SyncRule::InconsistentPeer,
        );
        check(
            &b,
            &a,
            SyncOutcome::Target(BitmapPlan::FullSync),
            SyncRule::InconsistentSelf,
        );
        // a was the source of b's interrupted resync (it pinned its bitmap for b): resume.
        a.ids.bitmap[1] = Uuid(0x100);
        check(
            &a,
            &b,
            SyncOutcome::Source(BitmapPlan::UseBitmap),
            SyncRule::InconsistentPeer,
        );
        check(
            &b,
            &a,
            SyncOutcome::Target(BitmapPlan::UseBitmap),
            SyncRule::InconsistentSelf,
        );

        // Both Inconsistent: nobody has good data; no resync either way.
        let mut a2 = a.clone();
        a2.disk = DiskState::Inconsistent;
        check(
            &a2,
            &b,
            SyncOutcome::Refused(Refusal::NoUsableData),
            SyncRule::NoUsableDataBoth,
        );

        // Inconsistent beats a crash flag: an Inconsistent disk is never a source.
        b.crashed_primary = true;
        check(
            &a,
            &b,
            SyncOutcome::Source(BitmapPlan::UseBitmap),
            SyncRule::InconsistentPeer,
        );

        // Inconsistent against a side without a disk: nobody has usable data.
        let mut u = a.clone();
        u.disk = DiskState::Diskless;
        check(
            &u,
            &b,
            SyncOutcome::Refused(Refusal::NoUsableData),
            SyncRule::NoUsableDataBoth,
        );
    }

    #[test]
    fn no_usable_data_on_both_sides_is_refused() {
        for (x, y) in [
            (DiskState::Inconsistent, DiskState::Inconsistent),
            (DiskState::Diskless, DiskState::Inconsistent),
            (DiskState::Failed, DiskState::Diskless),
            (DiskState::Attaching, DiskState::Inconsistent),
        ] {
            // Whatever the generations: same, one ahead by bitmap, or one a crashed Primary.
            let mut a = side(0, 0x200);
            a.disk = x;
            a.crashed_primary = true;
            a.ids.bitmap[1] = Uuid(0x100);
            let mut b = side(1, 0x100);
            b.disk = y;
            check(
                &a,
                &b,
                SyncOutcome::Refused(Refusal::NoUsableData),
                SyncRule::NoUsableDataBoth,
            );
            b.ids.current = Uuid(0x200);
            check(
                &a,
                &b,
                SyncOutcome::Refused(Refusal::NoUsableData),
                SyncRule::NoUsableDataBoth,
            );
        }
        // Except a new cluster: all Inconsistent, never held data, connect without a resync.
        let mut a = side(0, Uuid::JUST_CREATED.0);
        a.disk = DiskState::Inconsistent;
        let mut b = side(1, Uuid::JUST_CREATED.0);
        b.disk = DiskState::Inconsistent;
        check(&a, &b, SyncOutcome::NoSync, SyncRule::JustCreatedBoth);
    }

    /// The disk failure scenario: a Primary detached its disk (Diskless), lost its only peer
    /// and counts as a crashed Primary, or even started a new generation; the peer comes back.
    #[test]
    fn diskless_primary_is_never_a_source() {
        let mut a = side(0, 0x100);
        a.role = Role::Primary;
        a.disk = DiskState::Diskless;
        a.crashed_primary = true;
        let b = side(1, 0x101);
        // Same generation: no resync; the peer's data (the exposed generation) serves.
        check(&a, &b, SyncOutcome::NoSync, SyncRule::NoDiskSelf);
        check(&b, &a, SyncOutcome::NoSync, SyncRule::NoDiskPeer);
        // Its bitmap for b tracks a generation it started while Diskless: still no source.
        let mut a2 = a.clone();
        a2.ids.new_current(0x300, true, &[1]);
        assert!(matches!(
            decide_by_generations(&a2, &b).outcome,
            SyncOutcome::Source(_)
        ));
        check(
            &a2,
            &b,
            SyncOutcome::Refused(Refusal::NotExposedData),
            SyncRule::DisklessPrimaryMismatch,
        );
        // The peer ahead of the Diskless Primary (promoted meanwhile): its data is not what
        // the Primary exposes either.
        let mut b2 = b.clone();
        b2.ids.history[0] = Uuid(0x100);
        b2.ids.current = Uuid(0x500);
        check(
            &a,
            &b2,
            SyncOutcome::Refused(Refusal::NotExposedData),
            SyncRule::DisklessPrimaryMismatch,
        );
        // Failed and Attaching count as no disk, too.
        for d in [DiskState::Failed, DiskState::Attaching] {
            let mut f = a.clone();
            f.disk = d;
            check(&f, &b, SyncOutcome::NoSync, SyncRule::NoDiskSelf);
        }
    }

    #[test]
    fn diskless_secondary_takes_part_in_no_resync() {
        // The Primary is ahead (it wrote while the Secondary was away): no resync to a node
        // without a disk; the Primary keeps the bits until it attaches.
        let mut p = side(0, 0x200);
        p.role = Role::Primary;
        p.ids.bitmap[1] = Uuid(0x100);
        let mut s = side(1, 0x100);
        s.disk = DiskState::Diskless;
        assert!(matches!(
            decide_by_generations(&p, &s).outcome,
            SyncOutcome::Source(_)
        ));
        check(&p, &s, SyncOutcome::NoSync, SyncRule::NoDiskPeer);
        s.ids.current = Uuid(0x200);
        check(&p, &s, SyncOutcome::NoSync, SyncRule::NoDiskPeer);
    }

    #[test]
    fn an_inconsistent_side_with_newer_generation_is_not_a_source() {
        // a resyncs from a third node (Inconsistent, already at its generation); b is behind.
        let mut a = side(0, 0x200);
        a.disk = DiskState::Inconsistent;
        a.ids.bitmap[1] = Uuid(0x100);
        let b = side(1, 0x100);
        check(
            &a,
            &b,
            SyncOutcome::Refused(Refusal::NoUsableData),
            SyncRule::SourceWithoutData,
        );
        // A new node and an Inconsistent node: the latter would be the full-sync source.
        let mut n = side(1, Uuid::JUST_CREATED.0);
        n.disk = DiskState::Inconsistent;
        check(
            &a,
            &n,
            SyncOutcome::Refused(Refusal::NoUsableData),
            SyncRule::NoUsableDataBoth,
        );
        // Outdated and Consistent data is usable: it may be a source.
        for d in [DiskState::Outdated, DiskState::Consistent] {
            let mut c = a.clone();
            c.disk = d;
            check(
                &c,
                &b,
                SyncOutcome::Source(BitmapPlan::UseBitmap),
                SyncRule::BitmapSelf,
            );
        }
    }

    #[test]
    fn crashed_primary() {
        let mut a = side(3, 0x100);
        let b = side(1, 0x100);
        a.crashed_primary = true;
        check(
            &a,
            &b,
            SyncOutcome::Source(BitmapPlan::UseBitmap),
            SyncRule::CrashedPrimarySelf,
        );
        check(
            &b,
            &a,
            SyncOutcome::Target(BitmapPlan::UseBitmap),
            SyncRule::CrashedPrimaryPeer,
        );
        let mut b2 = b.clone();
        b2.crashed_primary = true;
        // Lower node id (1) is the source.
        check(
            &b2,
            &a,
            SyncOutcome::Source(BitmapPlan::UseBitmap),
            SyncRule::CrashedPrimaryBoth,
        );
        check(
            &a,
            &b2,
            SyncOutcome::Target(BitmapPlan::UseBitmap),
            SyncRule::CrashedPrimaryBoth,
        );
        // The higher id is Primary now (it lost its peer and kept running; the other restarted
        // with its crash flag): the running Primary is the source, whatever the ids.
        a.role = Role::Primary;
        check(
            &a,
            &b2,
            SyncOutcome::Source(BitmapPlan::UseBitmap),
            SyncRule::CrashedPrimaryBoth,
        );
    }

    #[test]
    fn bitmap_rules() {
        // a (node 0) wrote while b (node 1) was away: a's bitmap for b tracks since 0x100.
        let mut a = side(0, 0x200);
        a.ids.bitmap[1] = Uuid(0x101);
        let b = side(1, 0x100);
        check(
            &a,
            &b,
            SyncOutcome::Source(BitmapPlan::UseBitmap),
            SyncRule::BitmapSelf,
        );
        check(
            &b,
            &a,
            SyncOutcome::Target(BitmapPlan::UseBitmap),
            SyncRule::BitmapPeer,
        );

        // a tracks 0x100 for node 2 (which shares b's generation): copy slot 2.
        let mut a = side(0, 0x200);
        a.ids.bitmap[2] = Uuid(0x100);
        check(
            &a,
            &b,
            SyncOutcome::Source(BitmapPlan::CopySlot(2)),
            SyncRule::BitmapSelfOther,
        );
        check(
            &b,
            &a,
            SyncOutcome::Target(BitmapPlan::PeerCopiesSlot(2)),
            SyncRule::BitmapPeerOther,
        );
    }

    #[test]
    fn history_rules() {
        let mut a = side(0, 0x300);
        a.ids.history[0] = Uuid(0x200);
        a.ids.history[1] = Uuid(0x100);
        let b = side(1, 0x100);
        check(
            &a,
            &b,
            SyncOutcome::Source(BitmapPlan::FullSync),
            SyncRule::HistorySelf,
        );
        check(
            &b,
            &a,
            SyncOutcome::Target(BitmapPlan::FullSync),
            SyncRule::HistoryPeer,
        );
    }

    #[test]
    fn split_brain_and_unrelated() {
        // Both wrote after splitting from 0x100.
        let mut a = side(0, 0x200);
        a.ids.bitmap[1] = Uuid(0x101);
        let mut b = side(1, 0x300);
        b.ids.bitmap[0] = Uuid(0x100);
        check(
            &a,
            &b,
            SyncOutcome::SplitBrain(SplitBrainKind::BitmapsValid),
            SyncRule::BitmapBoth,
        );

        // Diverged from an older common ancestor (in a's history, b's bitmap for node 5).
        let mut a = side(0, 0x200);
        a.ids.history[0] = Uuid(0x50);
        let mut b = side(1, 0x300);
        b.ids.bitmap[5] = Uuid(0x50);
        check(
            &a,
            &b,
            SyncOutcome::SplitBrain(SplitBrainKind::NeedsFullSync),
            SyncRule::HistoryBoth,
        );

        // Contradictory: each one's current is in the other's history.
        let mut a = side(0, 0x200);
        a.ids.history[0] = Uuid(0x300);
        let mut b = side(1, 0x300);
        b.ids.history[0] = Uuid(0x200);
        check(
            &a,
            &b,
            SyncOutcome::SplitBrain(SplitBrainKind::NeedsFullSync),
            SyncRule::Contradictory,
        );

        let a = side(0, 0x200);
        let b = side(1, 0x300);
        check(&a, &b, SyncOutcome::Unrelated, SyncRule::NoCommonAncestor);
    }

    /// The full life cycle through the generation bookkeeping: write while a peer is away,
    /// resync interrupted (resumes with the bitmap), finished, then both write (split brain).
    #[test]
    fn life_cycle_through_bookkeeping() {
        let mut a = side(0, Uuid::JUST_CREATED.0);
        let mut b = side(1, Uuid::JUST_CREATED.0);
        b.disk = DiskState::Inconsistent;
        // Force-promote a: first generation.
        a.ids.new_current(0x1000, true, &[]);
        assert_eq!(
            decide(&b, &a).outcome,
            SyncOutcome::Target(BitmapPlan::FullSync)
        );
        // Resync start: a pins, b adopts.
        a.ids.pin_bitmap(1);
        b.ids.adopt_sync_source(0, a.ids.current);
        // Interrupted; a (still Primary) writes while b is away: new generation.
        a.ids.new_current(0x2000, true, &[1]);
        assert_eq!(a.ids.bitmap[1], Uuid(0x1001));
        let d = decide(&a, &b);
        assert_eq!(
            d.outcome,
            SyncOutcome::Source(BitmapPlan::UseBitmap),
            "resumes, {d:?}"
        );
        // Reconnect and finish.
        a.ids.pin_bitmap(1);
        b.ids.adopt_sync_source(0, a.ids.current);
        b.disk = DiskState::UpToDate;
        a.ids.clear_bitmap(1);
        assert_eq!(decide(&a, &b).outcome, SyncOutcome::NoSync);
        // Split: a keeps writing, b is force-promoted.
        a.ids.new_current(0x3000, true, &[1]);
        b.ids.new_current(0x4000, true, &[0]);
        assert_eq!(
            decide(&a, &b).outcome,
            SyncOutcome::SplitBrain(SplitBrainKind::BitmapsValid)
        );
        // The primary bits record who was Primary at the split: a was, b was not.
        assert!(a.ids.bitmap[1].primary_bit());
        assert!(!b.ids.bitmap[0].primary_bit());
    }

    fn arb_uuid() -> impl Strategy<Value = Uuid> {
        // A tiny universe so that coincidences (the interesting cases) are frequent.
        prop_oneof![Just(0u64), Just(4), 8u64..14].prop_map(Uuid)
    }

    fn arb_side(node_id: u8) -> impl Strategy<Value = SideView> {
        (
            arb_uuid(),
            proptest::collection::vec(arb_uuid(), 4),
            proptest::collection::vec(arb_uuid(), HISTORY_LEN),
            any::<bool>(),
            prop_oneof![
                Just(DiskState::Inconsistent),
                Just(DiskState::Outdated),
                Just(DiskState::UpToDate),
                Just(DiskState::Diskless),
                Just(DiskState::Failed),
                Just(DiskState::Consistent)
            ],
            any::<bool>(),
        )
            .prop_map(move |(current, bm, hist, crashed, disk, primary)| {
                let mut ids = GenerationIds::just_created();
                ids.current = current;
                for (i, u) in bm.into_iter().enumerate() {
                    if i != node_id as usize {
                        ids.bitmap[i] = u;
                    }
                }
                ids.history.copy_from_slice(&hist);
                SideView {
                    node_id,
                    ids,
                    crashed_primary: crashed,
                    disk,
                    role: if primary {
                        Role::Primary
                    } else {
                        Role::Secondary
                    },
                }
            })
    }

    proptest! {
        #[test]
        fn both_ends_agree(a in arb_side(0), b in arb_side(1)) {
            let d = decide(&a, &b);
            prop_assert_eq!(decide(&b, &a), d.mirrored());
            // An Inconsistent disk never becomes a source by the same-generation rules.
            let real = |u: Uuid| !u.is_zero() && !u.same(Uuid::JUST_CREATED);
            if real(a.ids.current) && a.ids.current.same(b.ids.current)
                && a.disk == DiskState::Inconsistent && b.disk.is_consistent() {
                prop_assert!(matches!(d.outcome, SyncOutcome::Target(_)));
            }
            // Only usable data is ever sent, and only to a side with a disk.
            match d.outcome {
                SyncOutcome::Source(_) => {
                    prop_assert!(a.disk.is_consistent() && b.disk.has_disk(), "{d:?}");
                }
                SyncOutcome::Target(_) => {
                    prop_assert!(b.disk.is_consistent() && a.disk.has_disk(), "{d:?}");
                }
                _ => {}
            }
            // Neither side with usable data: refused, except a new cluster.
            let usable = a.disk.is_consistent() || b.disk.is_consistent();
            let new_cluster = super::just_created(&a) && super::just_created(&b);
            if !usable && !new_cluster {
                prop_assert_eq!(d.outcome, SyncOutcome::Refused(Refusal::NoUsableData));
            }
        }
    }
}
