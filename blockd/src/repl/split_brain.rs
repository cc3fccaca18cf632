//! Split-brain recovery: given a detected split brain, the configured `after-sb-0pri/1pri/2pri`
//! policies, both roles, who was Primary at the split and how much each side changed, decide
//! which side keeps its data — or to disconnect. Mirrors DRBD's `drbd_asb_recover_0p/1p/2p`.
//!
//! Like the sync decision it is evaluated on both ends and is antisymmetric (tested), so both
//! agree. Where DRBD uses its `RESOLVE_CONFLICTS` connection flag to break a tie, we use node
//! ids: on a tie the node with the lower id keeps its data, the higher one discards.
//!
//! Order of precedence:
//! 1. Manual: a side that connects with `--discard-my-data` is the victim (both: disconnect).
//! 2. Quorum (when enabled): the side with quorum keeps its data, the other discards. This
//!    applies to both kinds: a side without quorum acknowledged nothing since it lost it (its
//!    I/O was held or failed), and the partition with quorum is the only one whose writes
//!    count. Its discarded blocks go to its side file (all of them after a full sync).
//! 3. The policy for the number of current Primaries (0, 1 or 2).
//!
//! Policies (step 3) only resolve [`SplitBrainKind::BitmapsValid`] split brains; a
//! [`SplitBrainKind::NeedsFullSync`] one is resolved by steps 1-2 only (then with a full sync).

use super::names::named_enum;
use super::state::Role;
use super::sync_decision::SplitBrainKind;

named_enum! {
    /// `after-sb-0pri`: neither node is Primary now.
    pub enum After0Pri: "after-sb-0pri policy" {
        /// Do not resolve; both stay StandAlone until an admin decides (the default).
        Disconnect = "disconnect",
        /// Discard the node that became Primary after the split (bitmap UUID Primary bit clear);
        /// falls back to discard-zero-changes, then discard-least-changes.
        DiscardYoungerPrimary = "discard-younger-primary",
        /// Discard the node that was already Primary at the split; same fallbacks.
        DiscardOlderPrimary = "discard-older-primary",
        /// If only one side wrote, discard the side that did not; otherwise disconnect.
        DiscardZeroChanges = "discard-zero-changes",
        /// Discard the side with fewer changed blocks (tie: higher node id discards).
        DiscardLeastChanges = "discard-least-changes",
    }
}

named_enum! {
    /// `after-sb-1pri`: exactly one node is Primary now.
    pub enum After1Pri: "after-sb-1pri policy" {
        /// Do not resolve (the default).
        Disconnect = "disconnect",
        /// Use the after-sb-0pri result only if it discards the Secondary; else disconnect.
        Consensus = "consensus",
        /// Discard the Secondary, whatever it wrote.
        DiscardSecondary = "discard-secondary",
        /// Use the after-sb-0pri result even if it discards the Primary's data under its users.
        ViolentlyAs0Pri = "violently-as0p",
    }
}

named_enum! {
    /// `after-sb-2pri`: both nodes are Primary now.
    pub enum After2Pri: "after-sb-2pri policy" {
        /// Do not resolve (the default).
        Disconnect = "disconnect",
        /// Use the after-sb-0pri result, discarding a live Primary's data.
        ViolentlyAs0Pri = "violently-as0p",
    }
}

/// The three policies of a resource (DRBD defaults: all `disconnect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitBrainPolicy {
    pub zero_primaries: After0Pri,
    pub one_primary: After1Pri,
    pub two_primaries: After2Pri,
}

impl Default for SplitBrainPolicy {
    fn default() -> Self {
        SplitBrainPolicy {
            zero_primaries: After0Pri::Disconnect,
            one_primary: After1Pri::Disconnect,
            two_primaries: After2Pri::Disconnect,
        }
    }
}

/// One side of a split brain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitBrainSide {
    pub node_id: u8,
    pub role: Role,
    /// Was Primary when it started tracking changes for the other side (the Primary bit of its
    /// bitmap UUID for the other side).
    pub primary_at_split: bool,
    /// Blocks it changed since the split (bits set in its bitmap for the other side).
    pub changes: u64,
    /// Connected with `--discard-my-data`.
    pub discard_my_data: bool,
    /// Has quorum now; `None` when quorum is off.
    pub quorum: Option<bool>,
}

/// What `me` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// My data wins: I become sync source.
    KeepMine,
    /// My data is discarded: I become sync target (after saving my divergent blocks).
    DiscardMine,
    /// Unresolved: drop the link, stay StandAlone, report the split brain.
    Disconnect,
}

/// Why the verdict was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolvedBy {
    /// `--discard-my-data` on one side.
    Manual,
    /// Both sides asked to discard their data.
    ManualConflict,
    /// Only one side has quorum.
    Quorum,
    /// The configured policy is `disconnect`, or it found no decision.
    Policy,
    /// The split brain cannot be resolved without a manual decision (no valid bitmaps).
    NeedsManual,
    YoungerPrimary,
    OlderPrimary,
    ZeroChanges,
    LeastChanges,
    /// Equal changes (or none on either side): the lower node id keeps its data.
    TieBreak,
    Secondary,
}

/// The verdict and its reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub verdict: Verdict,
    pub by: ResolvedBy,
}

impl Resolution {
    fn new(verdict: Verdict, by: ResolvedBy) -> Resolution {
        Resolution { verdict, by }
    }

    fn disconnect(by: ResolvedBy) -> Resolution {
        Resolution::new(Verdict::Disconnect, by)
    }

    /// The same resolution seen from the other side.
    pub fn mirrored(self) -> Resolution {
        let verdict = match self.verdict {
            Verdict::KeepMine => Verdict::DiscardMine,
            Verdict::DiscardMine => Verdict::KeepMine,
            Verdict::Disconnect => Verdict::Disconnect,
        };
        Resolution::new(verdict, self.by)
    }
}

/// Decides how `me` resolves a split brain of `kind` with `peer`.
pub fn resolve(
    kind: SplitBrainKind,
    policy: &SplitBrainPolicy,
    me: &SplitBrainSide,
    peer: &SplitBrainSide,
) -> Resolution {
    // 1. Manual resolution wins over everything and works for every kind.
    match (me.discard_my_data, peer.discard_my_data) {
        (true, false) => return Resolution::new(Verdict::DiscardMine, ResolvedBy::Manual),
        (false, true) => return Resolution::new(Verdict::KeepMine, ResolvedBy::Manual),
        (true, true) => return Resolution::disconnect(ResolvedBy::ManualConflict),
        (false, false) => {}
    }
    // 2. Quorum: the partition that had quorum is the one whose writes were legitimate; the
    // other acknowledged nothing since it lost quorum. Decides with or without valid bitmaps.
    match (me.quorum, peer.quorum) {
        (Some(true), Some(false)) => return Resolution::new(Verdict::KeepMine, ResolvedBy::Quorum),
        (Some(false), Some(true)) => {
            return Resolution::new(Verdict::DiscardMine, ResolvedBy::Quorum);
        }
        _ => {}
    }
    // Without valid bitmaps no policy is safe.
    if kind == SplitBrainKind::NeedsFullSync {
        return Resolution::disconnect(ResolvedBy::NeedsManual);
    }
    // 3. Policy by the number of Primaries now.
    let primaries = [me, peer]
        .iter()
        .filter(|s| s.role == Role::Primary)
        .count();
    match primaries {
        0 => recover_0pri(policy.zero_primaries, me, peer),
        1 => match policy.one_primary {
            After1Pri::Disconnect => Resolution::disconnect(ResolvedBy::Policy),
            // The 0pri verdict, accepted only when the Secondary is the one discarded.
            After1Pri::Consensus => {
                let r = recover_0pri(policy.zero_primaries, me, peer);
                let discards_secondary = match r.verdict {
                    Verdict::DiscardMine => me.role != Role::Primary,
                    Verdict::KeepMine => me.role == Role::Primary,
                    Verdict::Disconnect => false,
                };
                if discards_secondary {
                    r
                } else {
                    Resolution::disconnect(ResolvedBy::Policy)
                }
            }
            After1Pri::DiscardSecondary => {
                let verdict = if me.role == Role::Primary {
                    Verdict::KeepMine
                } else {
                    Verdict::DiscardMine
                };
                Resolution::new(verdict, ResolvedBy::Secondary)
            }
            After1Pri::ViolentlyAs0Pri => recover_0pri(policy.zero_primaries, me, peer),
        },
        _ => match policy.two_primaries {
            After2Pri::Disconnect => Resolution::disconnect(ResolvedBy::Policy),
            After2Pri::ViolentlyAs0Pri => recover_0pri(policy.zero_primaries, me, peer),
        },
    }
}

/// DRBD's `drbd_asb_recover_0p`, including its fallthrough chain:
/// younger/older-primary → zero-changes → least-changes.
fn recover_0pri(policy: After0Pri, me: &SplitBrainSide, peer: &SplitBrainSide) -> Resolution {
    match policy {
        After0Pri::Disconnect => Resolution::disconnect(ResolvedBy::Policy),
        After0Pri::DiscardYoungerPrimary => {
            // The younger Primary was not Primary when the split happened.
            match (me.primary_at_split, peer.primary_at_split) {
                (false, true) => Resolution::new(Verdict::DiscardMine, ResolvedBy::YoungerPrimary),
                (true, false) => Resolution::new(Verdict::KeepMine, ResolvedBy::YoungerPrimary),
                _ => zero_changes(me, peer).unwrap_or_else(|| least_changes(me, peer)),
            }
        }
        After0Pri::DiscardOlderPrimary => match (me.primary_at_split, peer.primary_at_split) {
            (true, false) => Resolution::new(Verdict::DiscardMine, ResolvedBy::OlderPrimary),
            (false, true) => Resolution::new(Verdict::KeepMine, ResolvedBy::OlderPrimary),
            _ => zero_changes(me, peer).unwrap_or_else(|| least_changes(me, peer)),
        },
        After0Pri::DiscardZeroChanges => {
            zero_changes(me, peer).unwrap_or(Resolution::disconnect(ResolvedBy::Policy))
        }
        After0Pri::DiscardLeastChanges => least_changes(me, peer),
    }
}

fn tie_break(me: &SplitBrainSide, peer: &SplitBrainSide) -> Resolution {
    let verdict = if me.node_id < peer.node_id {
        Verdict::KeepMine
    } else {
        Verdict::DiscardMine
    };
    Resolution::new(verdict, ResolvedBy::TieBreak)
}

/// Discards the side that wrote nothing since the split; `None` if both wrote.
fn zero_changes(me: &SplitBrainSide, peer: &SplitBrainSide) -> Option<Resolution> {
    match (me.changes, peer.changes) {
        (0, 0) => Some(tie_break(me, peer)),
        (_, 0) => Some(Resolution::new(Verdict::KeepMine, ResolvedBy::ZeroChanges)),
        (0, _) => Some(Resolution::new(
            Verdict::DiscardMine,
            ResolvedBy::ZeroChanges,
        )),
        _ => None,
    }
}

fn least_changes(me: &SplitBrainSide, peer: &SplitBrainSide) -> Resolution {
    match me.changes.cmp(&peer.changes) {
        std::cmp::Ordering::Less => Resolution::new(Verdict::DiscardMine, ResolvedBy::LeastChanges),
        std::cmp::Ordering::Greater => Resolution::new(Verdict::KeepMine, ResolvedBy::LeastChanges),
        std::cmp::Ordering::Equal => tie_break(me, peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: SplitBrainKind = SplitBrainKind::BitmapsValid;

    fn s(node_id: u8, role: Role, primary_at_split: bool, changes: u64) -> SplitBrainSide {
        SplitBrainSide {
            node_id,
            role,
            primary_at_split,
            changes,
            discard_my_data: false,
            quorum: None,
        }
    }

    fn p0(zero: After0Pri) -> SplitBrainPolicy {
        SplitBrainPolicy {
            zero_primaries: zero,
            ..SplitBrainPolicy::default()
        }
    }

    /// Asserts `me`'s resolution and that the peer reaches the mirror image.
    fn check(
        kind: SplitBrainKind,
        policy: &SplitBrainPolicy,
        me: &SplitBrainSide,
        peer: &SplitBrainSide,
        verdict: Verdict,
        by: ResolvedBy,
    ) {
        let r = resolve(kind, policy, me, peer);
        assert_eq!(r, Resolution { verdict, by }, "me={me:?} peer={peer:?}");
        assert_eq!(resolve(kind, policy, peer, me), r.mirrored());
    }

    use ResolvedBy as By;
    use Role::{Primary as P, Secondary as S};
    use Verdict::{DiscardMine as Lose, Disconnect as Dc, KeepMine as Keep};

    #[test]
    fn manual_and_needs_manual() {
        let pol = SplitBrainPolicy::default();
        let mut a = s(0, S, false, 5);
        let mut b = s(1, S, false, 7);
        check(VALID, &pol, &a, &b, Dc, By::Policy);
        a.discard_my_data = true;
        check(VALID, &pol, &a, &b, Lose, By::Manual);
        check(
            SplitBrainKind::NeedsFullSync,
            &pol,
            &a,
            &b,
            Lose,
            By::Manual,
        );
        b.discard_my_data = true;
        check(VALID, &pol, &a, &b, Dc, By::ManualConflict);
        a.discard_my_data = false;
        b.discard_my_data = false;
        let lc = p0(After0Pri::DiscardLeastChanges);
        check(
            SplitBrainKind::NeedsFullSync,
            &lc,
            &a,
            &b,
            Dc,
            By::NeedsManual,
        );
    }

    #[test]
    fn quorum_decides_first() {
        let pol = p0(After0Pri::DiscardLeastChanges);
        let mut a = s(0, S, false, 1);
        let mut b = s(1, S, false, 100);
        a.quorum = Some(true);
        b.quorum = Some(false);
        check(VALID, &pol, &a, &b, Keep, By::Quorum);
        // Both or neither with quorum: policy decides.
        b.quorum = Some(true);
        check(VALID, &pol, &a, &b, Lose, By::LeastChanges);
        a.quorum = None;
        b.quorum = None;
        check(VALID, &pol, &a, &b, Lose, By::LeastChanges);
    }

    /// A history-both split brain (no bitmap covers the divergence, e.g. a cut-off Primary's
    /// generation that only it knows): quorum still decides, with a full sync; manual wins
    /// over quorum; without a quorum difference it needs a manual decision.
    #[test]
    fn quorum_resolves_needs_full_sync() {
        const FULL: SplitBrainKind = SplitBrainKind::NeedsFullSync;
        let pol = SplitBrainPolicy::default();
        // n2: the old Primary without quorum; n1: a Secondary of the majority.
        let mut old = s(2, P, true, 16);
        let mut maj = s(1, S, false, 0);
        old.quorum = Some(false);
        maj.quorum = Some(true);
        check(FULL, &pol, &old, &maj, Lose, By::Quorum);
        check(FULL, &pol, &maj, &old, Keep, By::Quorum);
        // The manual decision still comes first.
        maj.discard_my_data = true;
        check(FULL, &pol, &old, &maj, Keep, By::Manual);
        maj.discard_my_data = false;
        // Both with quorum (or quorum off): no automatic decision without valid bitmaps.
        old.quorum = Some(true);
        check(FULL, &pol, &old, &maj, Dc, By::NeedsManual);
        old.quorum = None;
        maj.quorum = None;
        check(
            FULL,
            &p0(After0Pri::DiscardLeastChanges),
            &old,
            &maj,
            Dc,
            By::NeedsManual,
        );
    }

    #[test]
    fn zero_primaries() {
        let dc = p0(After0Pri::Disconnect);
        check(
            VALID,
            &dc,
            &s(0, S, true, 0),
            &s(1, S, false, 0),
            Dc,
            By::Policy,
        );

        let young = p0(After0Pri::DiscardYoungerPrimary);
        check(
            VALID,
            &young,
            &s(0, S, false, 9),
            &s(1, S, true, 1),
            Lose,
            By::YoungerPrimary,
        );
        // Fallbacks: zero-changes, then least-changes.
        check(
            VALID,
            &young,
            &s(0, S, true, 0),
            &s(1, S, true, 3),
            Lose,
            By::ZeroChanges,
        );
        check(
            VALID,
            &young,
            &s(0, S, false, 4),
            &s(1, S, false, 3),
            Keep,
            By::LeastChanges,
        );

        let old = p0(After0Pri::DiscardOlderPrimary);
        check(
            VALID,
            &old,
            &s(0, S, true, 9),
            &s(1, S, false, 1),
            Lose,
            By::OlderPrimary,
        );
        check(
            VALID,
            &old,
            &s(0, S, false, 0),
            &s(1, S, false, 0),
            Keep,
            By::TieBreak,
        );
        check(
            VALID,
            &old,
            &s(4, S, true, 2),
            &s(1, S, true, 2),
            Lose,
            By::TieBreak,
        );

        let zero = p0(After0Pri::DiscardZeroChanges);
        check(
            VALID,
            &zero,
            &s(0, S, false, 0),
            &s(1, S, false, 5),
            Lose,
            By::ZeroChanges,
        );
        check(
            VALID,
            &zero,
            &s(0, S, false, 5),
            &s(1, S, false, 5),
            Dc,
            By::Policy,
        );
        check(
            VALID,
            &zero,
            &s(2, S, false, 0),
            &s(1, S, false, 0),
            Lose,
            By::TieBreak,
        );

        let least = p0(After0Pri::DiscardLeastChanges);
        check(
            VALID,
            &least,
            &s(0, S, false, 5),
            &s(1, S, false, 6),
            Lose,
            By::LeastChanges,
        );
        check(
            VALID,
            &least,
            &s(0, S, false, 6),
            &s(1, S, false, 6),
            Keep,
            By::TieBreak,
        );
    }

    #[test]
    fn one_primary() {
        let mut pol = p0(After0Pri::DiscardLeastChanges);
        let pri = s(0, P, true, 10);
        let sec = s(1, S, false, 20);
        check(VALID, &pol, &pri, &sec, Dc, By::Policy);

        pol.one_primary = After1Pri::DiscardSecondary;
        check(VALID, &pol, &pri, &sec, Keep, By::Secondary);
        check(VALID, &pol, &sec, &pri, Lose, By::Secondary);

        // Consensus: least-changes would discard the Primary (10 < 20): refused.
        pol.one_primary = After1Pri::Consensus;
        check(VALID, &pol, &pri, &sec, Dc, By::Policy);
        let sec_small = s(1, S, false, 3);
        check(VALID, &pol, &pri, &sec_small, Keep, By::LeastChanges);
        check(VALID, &pol, &sec_small, &pri, Lose, By::LeastChanges);
        // Consensus with a 0pri policy that finds nothing: disconnect.
        pol.zero_primaries = After0Pri::Disconnect;
        check(VALID, &pol, &pri, &sec_small, Dc, By::Policy);

        pol.zero_primaries = After0Pri::DiscardLeastChanges;
        pol.one_primary = After1Pri::ViolentlyAs0Pri;
        check(VALID, &pol, &pri, &sec, Lose, By::LeastChanges);
    }

    #[test]
    fn two_primaries() {
        let mut pol = p0(After0Pri::DiscardZeroChanges);
        let a = s(0, P, true, 0);
        let b = s(1, P, false, 8);
        check(VALID, &pol, &a, &b, Dc, By::Policy);
        pol.two_primaries = After2Pri::ViolentlyAs0Pri;
        check(VALID, &pol, &a, &b, Lose, By::ZeroChanges);
    }

    #[test]
    fn policy_names() {
        assert_eq!(
            "discard-younger-primary".parse(),
            Ok(After0Pri::DiscardYoungerPrimary)
        );
        assert_eq!("discard-secondary".parse(), Ok(After1Pri::DiscardSecondary));
        assert_eq!("violently-as0p".parse(), Ok(After2Pri::ViolentlyAs0Pri));
        assert!("discard-secondary".parse::<After2Pri>().is_err());
    }

    fn arb_side(node_id: u8) -> impl Strategy<Value = SplitBrainSide> {
        (
            any::<bool>(),
            any::<bool>(),
            0u64..3,
            prop::bool::weighted(0.1),
            prop_oneof![Just(None), Just(Some(true)), Just(Some(false))],
        )
            .prop_map(move |(pri, pas, changes, discard, quorum)| SplitBrainSide {
                node_id,
                role: if pri { P } else { S },
                primary_at_split: pas,
                changes,
                discard_my_data: discard,
                quorum,
            })
    }

    fn arb_policy() -> impl Strategy<Value = SplitBrainPolicy> {
        (
            prop::sample::select(After0Pri::ALL),
            prop::sample::select(After1Pri::ALL),
            prop::sample::select(After2Pri::ALL),
        )
            .prop_map(|(z, o, t)| SplitBrainPolicy {
                zero_primaries: z,
                one_primary: o,
                two_primaries: t,
            })
    }

    proptest! {
        #[test]
        fn both_ends_agree(
            pol in arb_policy(),
            a in arb_side(0),
            b in arb_side(1),
            valid in any::<bool>(),
        ) {
            let kind = if valid { VALID } else { SplitBrainKind::NeedsFullSync };
            let r = resolve(kind, &pol, &a, &b);
            prop_assert_eq!(resolve(kind, &pol, &b, &a), r.mirrored());
            // Every policy of "disconnect" with no manual or quorum input disconnects.
            let quorum_decides = a.quorum.is_some() && b.quorum.is_some() && a.quorum != b.quorum;
            let manual = a.discard_my_data || b.discard_my_data;
            if pol == SplitBrainPolicy::default() && !manual && !quorum_decides {
                prop_assert_eq!(r.verdict, Verdict::Disconnect);
            }
        }
    }
}
