//! Pure sync decisions. For one path, given this side's state, the peer's state and the last
//! state both agreed on, decide: in sync, push (this side's version goes to the peer), pull (the
//! peer's version comes here), conflict, or hold (leave alone: a slave's own change). Then turn the
//! decisions of a batch into transfer operations (full file, delta, metadata, delete, rename).
//!
//! Rules:
//! - Absent and deleted are the same; identical states are in sync.
//! - `force` on exactly one side (`filed force`, csync2 `-f`): that side wins, whichever side
//!   changed (the way to undo a bad edit made on the peer).
//! - A side "changed" when its state differs from the agreed one (no agreed state: anything
//!   present changed). Only one side changed: that side wins. Both changed to the same content
//!   (metadata aside) is not a conflict: the newer metadata wins. Directories never conflict.
//! - Both changed otherwise is a conflict, unless a slave is involved (the non-slave wins) or
//!   the group's `auto` policy picks a winner.
//! - A slave never sends: its own changes are held.
//!
//! `auto` policies (csync2's): `first` — the side that initiated the sync wins; `younger`/`older`
//! — newer/older mtime wins; `bigger`/`smaller` — larger/smaller size wins (for these four an
//! existing file always beats a deletion, like csync2, and a tie stays a conflict); `left`/`right` —
//! the host listed earlier/later in the group's member list (`hosts` then `slaves`) wins.

use crate::config::AutoPolicy;
use crate::entry::{FileState, Kind};

/// Facts about the two sides that the decision needs besides the states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sides {
    pub auto: AutoPolicy,
    /// This side is listed before the peer in the group.
    pub local_is_left: bool,
    /// This side initiated the sync.
    pub local_initiated: bool,
    pub local_slave: bool,
    pub remote_slave: bool,
    /// `filed force` marks.
    pub local_force: bool,
    pub remote_force: bool,
}

impl Sides {
    /// The same facts seen from the peer.
    pub fn mirror(self) -> Sides {
        Sides {
            auto: self.auto,
            local_is_left: !self.local_is_left,
            local_initiated: !self.local_initiated,
            local_slave: self.remote_slave,
            remote_slave: self.local_slave,
            local_force: self.remote_force,
            remote_force: self.local_force,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Same on both sides: record it as agreed.
    InSync,
    /// This side's version goes to the peer.
    Push,
    /// The peer's version comes here.
    Pull,
    /// Changed on both sides; kept and reported until resolved.
    Conflict,
    /// Differs, but neither side may act (a slave's own change); nothing is recorded.
    Hold,
}

impl Decision {
    pub fn mirror(self) -> Decision {
        match self {
            Decision::Push => Decision::Pull,
            Decision::Pull => Decision::Push,
            d => d,
        }
    }
}

fn present(s: Option<&FileState>) -> Option<&FileState> {
    s.filter(|s| s.exists())
}

/// Equal for sync purposes (absent == deleted == never seen).
pub fn equivalent(a: Option<&FileState>, b: Option<&FileState>) -> bool {
    match (present(a), present(b)) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same(b),
        _ => false,
    }
}

/// Decides one path. `local`/`remote`: current states (None or a tombstone = absent);
/// `base`: the last agreed state (None = never agreed).
pub fn decide(
    local: Option<&FileState>,
    remote: Option<&FileState>,
    base: Option<&FileState>,
    sides: Sides,
) -> Decision {
    if equivalent(local, remote) {
        return Decision::InSync;
    }
    let local_changed = !equivalent(local, base);
    let remote_changed = !equivalent(remote, base);
    let wanted = if sides.local_force != sides.remote_force {
        if sides.local_force {
            Decision::Push
        } else {
            Decision::Pull
        }
    } else {
        match (local_changed, remote_changed) {
            (true, false) => Decision::Push,
            (false, true) => Decision::Pull,
            _ => resolve_both_changed(present(local), present(remote), sides),
        }
    };
    // A slave never sends.
    match wanted {
        Decision::Push if sides.local_slave => Decision::Hold,
        Decision::Pull if sides.remote_slave => Decision::Hold,
        d => d,
    }
}

fn resolve_both_changed(
    local: Option<&FileState>,
    remote: Option<&FileState>,
    sides: Sides,
) -> Decision {
    if let (Some(l), Some(r)) = (local, remote)
        && l.same_content(r)
    {
        // Identical change (or a directory on both sides): only metadata differs.
        return if meta_key(l) >= meta_key(r) {
            Decision::Push
        } else {
            Decision::Pull
        };
    }
    if sides.local_slave != sides.remote_slave {
        return if sides.remote_slave {
            Decision::Push
        } else {
            Decision::Pull
        };
    }
    auto_resolve(local, remote, sides).unwrap_or(Decision::Conflict)
}

/// A total order on metadata so both sides pick the same winner for metadata-only differences.
fn meta_key(s: &FileState) -> (i64, u32, u32, u32) {
    (s.mtime_ns, s.mode, s.uid, s.gid)
}

/// The `auto` policy's winner, if it picks one.
pub fn auto_resolve(
    local: Option<&FileState>,
    remote: Option<&FileState>,
    sides: Sides,
) -> Option<Decision> {
    let by = |l: i128, r: i128, prefer_greater: bool| -> Option<Decision> {
        if l == r {
            None
        } else if (l > r) == prefer_greater {
            Some(Decision::Push)
        } else {
            Some(Decision::Pull)
        }
    };
    let size = |s: &FileState| i128::from(if s.kind == Kind::File { s.size } else { 0 });
    match sides.auto {
        AutoPolicy::None => None,
        AutoPolicy::First => Some(if sides.local_initiated {
            Decision::Push
        } else {
            Decision::Pull
        }),
        AutoPolicy::Left => Some(if sides.local_is_left {
            Decision::Push
        } else {
            Decision::Pull
        }),
        AutoPolicy::Right => Some(if sides.local_is_left {
            Decision::Pull
        } else {
            Decision::Push
        }),
        AutoPolicy::Younger | AutoPolicy::Older | AutoPolicy::Bigger | AutoPolicy::Smaller => {
            match (local, remote) {
                (Some(_), None) => Some(Decision::Push),
                (None, Some(_)) => Some(Decision::Pull),
                (None, None) => None,
                (Some(l), Some(r)) => match sides.auto {
                    AutoPolicy::Younger => by(l.mtime_ns.into(), r.mtime_ns.into(), true),
                    AutoPolicy::Older => by(l.mtime_ns.into(), r.mtime_ns.into(), false),
                    AutoPolicy::Bigger => by(size(l), size(r), true),
                    _ => by(size(l), size(r), false),
                },
            }
        }
    }
}

/// How a winning version reaches the other side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transfer {
    /// Regular file content in full.
    Full,
    /// Regular file content as a delta against the receiver's current file.
    Delta,
    /// Directory or symlink: everything is in the state (no content stream).
    Meta,
    /// Content unchanged, only mode/owner/mtime differ.
    MetaOnly,
    /// Remove the path on the receiver.
    Delete,
    /// The receiver renames `from` (holding the same content) to this path.
    Rename { from: String },
}

/// How to send `winner` to a receiver that currently has `receiver`. `from`: a rename source
/// found by [`pair_renames`].
pub fn transfer_for(winner: Option<&FileState>, receiver: Option<&FileState>) -> Transfer {
    match (present(winner), present(receiver)) {
        (None, _) => Transfer::Delete,
        (Some(w), r) => match w.kind {
            Kind::Dir | Kind::Symlink => Transfer::Meta,
            Kind::Deleted => Transfer::Delete,
            Kind::File => match r {
                Some(r) if r.kind == Kind::File && r.same_content(w) => Transfer::MetaOnly,
                Some(r) if r.kind == Kind::File && r.size > 0 && w.size > 0 => Transfer::Delta,
                _ => Transfer::Full,
            },
        },
    }
}

/// One path of a batch in one direction, for rename pairing.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub path: &'a str,
    pub winner: Option<&'a FileState>,
    pub receiver: Option<&'a FileState>,
    pub transfer: Transfer,
}

/// Pairs deletions with full sends of the same content in the same direction: the receiver still
/// holds that content at the deleted path (unchanged), so it can rename instead of receiving the
/// data again. Returns (index of the deletion, index of the send) pairs; each used at most once.
pub fn pair_renames(items: &[Outgoing<'_>]) -> Vec<(usize, usize)> {
    use std::collections::HashMap;
    let mut sources: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
    for (i, it) in items.iter().enumerate() {
        if it.transfer == Transfer::Delete
            && let Some(r) = present(it.receiver).filter(|r| r.kind == Kind::File)
        {
            sources.entry(r.hash).or_default().push(i);
        }
    }
    let mut pairs = Vec::new();
    for (j, it) in items.iter().enumerate() {
        if matches!(it.transfer, Transfer::Full)
            && present(it.receiver).is_none()
            && let Some(w) = present(it.winner).filter(|w| w.kind == Kind::File && w.size > 0)
            && let Some(list) = sources.get_mut(&w.hash)
            && let Some(i) = list.pop()
        {
            pairs.push((i, j));
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::tests::arb_state;
    use proptest::prelude::*;

    fn file(hash: u8, mtime: i64, size: u64) -> FileState {
        FileState {
            kind: Kind::File,
            size,
            mtime_ns: mtime,
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: None,
            hash: [hash; 32],
        }
    }
    fn dir(mtime: i64) -> FileState {
        FileState {
            kind: Kind::Dir,
            size: 0,
            mtime_ns: mtime,
            mode: 0o755,
            uid: 0,
            gid: 0,
            target: None,
            hash: [0; 32],
        }
    }
    fn del() -> FileState {
        FileState::deleted(99)
    }
    fn sides(auto: AutoPolicy) -> Sides {
        Sides {
            auto,
            local_is_left: true,
            local_initiated: true,
            local_slave: false,
            remote_slave: false,
            local_force: false,
            remote_force: false,
        }
    }
    use Decision::*;

    #[test]
    fn one_sided_changes() {
        let s = sides(AutoPolicy::None);
        let (a, b) = (file(1, 1, 1), file(2, 2, 2));
        // nothing known anywhere
        assert_eq!(decide(None, None, None, s), InSync);
        // new here / new there
        assert_eq!(decide(Some(&a), None, None, s), Push);
        assert_eq!(decide(None, Some(&a), None, s), Pull);
        // changed here / there
        assert_eq!(decide(Some(&b), Some(&a), Some(&a), s), Push);
        assert_eq!(decide(Some(&a), Some(&b), Some(&a), s), Pull);
        // deleted here / there (tombstone or missing record)
        assert_eq!(decide(Some(&del()), Some(&a), Some(&a), s), Push);
        assert_eq!(decide(None, Some(&a), Some(&a), s), Push);
        assert_eq!(decide(Some(&a), Some(&del()), Some(&a), s), Pull);
        // deleted on both: in sync
        assert_eq!(decide(Some(&del()), None, Some(&a), s), InSync);
        // same change on both: in sync
        assert_eq!(decide(Some(&b), Some(&b), Some(&a), s), InSync);
        assert_eq!(decide(Some(&b), Some(&b), None, s), InSync);
    }

    #[test]
    fn identical_content_is_not_a_conflict() {
        let s = sides(AutoPolicy::None);
        let base = file(1, 1, 1);
        let (l, r) = (file(2, 10, 2), file(2, 20, 2));
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), s),
            Pull,
            "newer metadata wins"
        );
        assert_eq!(decide(Some(&r), Some(&l), Some(&base), s), Push);
        // directories never conflict
        assert_eq!(decide(Some(&dir(5)), Some(&dir(6)), Some(&dir(1)), s), Pull);
        assert_eq!(decide(Some(&dir(5)), Some(&dir(6)), None, s), Pull);
    }

    #[test]
    fn conflicts_and_auto_policies() {
        let base = file(1, 1, 1);
        let (l, r) = (file(2, 10, 5), file(3, 20, 3));
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), sides(AutoPolicy::None)),
            Conflict
        );
        assert_eq!(
            decide(Some(&l), Some(&r), None, sides(AutoPolicy::None)),
            Conflict,
            "both new, different"
        );
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), sides(AutoPolicy::Younger)),
            Pull
        );
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), sides(AutoPolicy::Older)),
            Push
        );
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), sides(AutoPolicy::Bigger)),
            Push
        );
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), sides(AutoPolicy::Smaller)),
            Pull
        );
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), sides(AutoPolicy::Left)),
            Push
        );
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), sides(AutoPolicy::Right)),
            Pull
        );
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), sides(AutoPolicy::First)),
            Push
        );
        let mut s = sides(AutoPolicy::First);
        s.local_initiated = false;
        assert_eq!(decide(Some(&l), Some(&r), Some(&base), s), Pull);
        let mut s = sides(AutoPolicy::Left);
        s.local_is_left = false;
        assert_eq!(decide(Some(&l), Some(&r), Some(&base), s), Pull);
        // ties stay conflicts
        let r2 = file(3, 10, 5);
        assert_eq!(
            decide(Some(&l), Some(&r2), Some(&base), sides(AutoPolicy::Younger)),
            Conflict
        );
        assert_eq!(
            decide(Some(&l), Some(&r2), Some(&base), sides(AutoPolicy::Bigger)),
            Conflict
        );
        // a deletion against a change: the existing file wins for younger/older/bigger/smaller
        for p in [
            AutoPolicy::Younger,
            AutoPolicy::Older,
            AutoPolicy::Bigger,
            AutoPolicy::Smaller,
        ] {
            assert_eq!(
                decide(Some(&del()), Some(&r), Some(&base), sides(p)),
                Pull,
                "{p:?}"
            );
            assert_eq!(
                decide(Some(&l), Some(&del()), Some(&base), sides(p)),
                Push,
                "{p:?}"
            );
        }
        assert_eq!(
            decide(Some(&del()), Some(&r), Some(&base), sides(AutoPolicy::None)),
            Conflict
        );
        assert_eq!(
            decide(Some(&del()), Some(&r), Some(&base), sides(AutoPolicy::Left)),
            Push
        );
        // type change against content change
        assert_eq!(
            decide(
                Some(&dir(3)),
                Some(&r),
                Some(&base),
                sides(AutoPolicy::None)
            ),
            Conflict
        );
    }

    #[test]
    fn force_and_slaves() {
        let base = file(1, 1, 1);
        let (l, r) = (file(2, 10, 5), file(3, 20, 3));
        let mut s = sides(AutoPolicy::None);
        s.local_force = true;
        assert_eq!(decide(Some(&l), Some(&r), Some(&base), s), Push);
        // Force wins over a change made on the peer only (undoing a bad edit there).
        assert_eq!(decide(Some(&base), Some(&r), Some(&base), s), Push);
        assert_eq!(
            decide(Some(&base), None, Some(&base), s),
            Push,
            "a deletion too"
        );
        let mut theirs = sides(AutoPolicy::None);
        theirs.remote_force = true;
        assert_eq!(decide(Some(&l), Some(&base), Some(&base), theirs), Pull);
        s.remote_force = true;
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), s),
            Conflict,
            "force on both sides cancels"
        );
        let mut s = sides(AutoPolicy::Right);
        s.remote_slave = true;
        assert_eq!(
            decide(Some(&l), Some(&r), Some(&base), s),
            Push,
            "master beats slave"
        );
        assert_eq!(
            decide(Some(&base), Some(&r), Some(&base), s),
            Hold,
            "a slave's own change is held"
        );
        let mut s = sides(AutoPolicy::None);
        s.local_slave = true;
        assert_eq!(decide(Some(&l), Some(&base), Some(&base), s), Hold);
        assert_eq!(decide(Some(&l), Some(&r), Some(&base), s), Pull);
        assert_eq!(decide(Some(&base), Some(&r), Some(&base), s), Pull);
    }

    #[test]
    fn transfers_and_renames() {
        let a = file(1, 1, 10);
        let b = file(2, 1, 10);
        assert_eq!(transfer_for(Some(&a), None), Transfer::Full);
        assert_eq!(transfer_for(Some(&a), Some(&del())), Transfer::Full);
        assert_eq!(transfer_for(Some(&a), Some(&b)), Transfer::Delta);
        assert_eq!(transfer_for(Some(&a), Some(&dir(1))), Transfer::Full);
        let mut a2 = a.clone();
        a2.mode = 0o600;
        assert_eq!(transfer_for(Some(&a2), Some(&a)), Transfer::MetaOnly);
        assert_eq!(transfer_for(Some(&dir(1)), Some(&a)), Transfer::Meta);
        assert_eq!(transfer_for(None, Some(&a)), Transfer::Delete);
        assert_eq!(transfer_for(Some(&del()), Some(&a)), Transfer::Delete);
        let items = vec![
            Outgoing {
                path: "/old",
                winner: None,
                receiver: Some(&a),
                transfer: Transfer::Delete,
            },
            Outgoing {
                path: "/other",
                winner: Some(&b),
                receiver: None,
                transfer: Transfer::Full,
            },
            Outgoing {
                path: "/new",
                winner: Some(&a),
                receiver: None,
                transfer: Transfer::Full,
            },
        ];
        assert_eq!(pair_renames(&items), vec![(0, 2)]);
    }

    fn arb_opt() -> impl Strategy<Value = Option<FileState>> {
        proptest::option::of(arb_state())
    }
    fn arb_sides() -> impl Strategy<Value = Sides> {
        (0usize..8, any::<[bool; 6]>()).prop_map(|(a, b)| Sides {
            auto: [
                AutoPolicy::None,
                AutoPolicy::First,
                AutoPolicy::Younger,
                AutoPolicy::Older,
                AutoPolicy::Bigger,
                AutoPolicy::Smaller,
                AutoPolicy::Left,
                AutoPolicy::Right,
            ][a],
            local_is_left: b[0],
            local_initiated: b[1],
            local_slave: b[2],
            remote_slave: b[3] && !b[2],
            local_force: b[4],
            remote_force: b[5],
        })
    }

    proptest! {
        /// Both sides reach the same decision from their own point of view.
        #[test]
        fn decisions_are_mirror_symmetric(l in arb_opt(), r in arb_opt(), b in arb_opt(), s in arb_sides()) {
            let d = decide(l.as_ref(), r.as_ref(), b.as_ref(), s);
            let m = decide(r.as_ref(), l.as_ref(), b.as_ref(), s.mirror());
            prop_assert_eq!(d.mirror(), m);
        }

        #[test]
        fn invariants(l in arb_opt(), r in arb_opt(), b in arb_opt(), s in arb_sides()) {
            let d = decide(l.as_ref(), r.as_ref(), b.as_ref(), s);
            prop_assert_eq!(d == InSync, equivalent(l.as_ref(), r.as_ref()));
            if s.local_slave { prop_assert_ne!(d, Push); }
            if s.remote_slave { prop_assert_ne!(d, Pull); }
            // an unchanged side never overwrites a changed one, unless it alone holds a force mark
            let forced = s.local_force && !s.remote_force;
            if !forced && equivalent(l.as_ref(), b.as_ref()) && !equivalent(r.as_ref(), b.as_ref()) { prop_assert!(d == Pull || d == Hold); }
            // a force mark on one side only wins, unless that side is a slave (never sends)
            if forced && d != InSync { prop_assert!(d == Push || (s.local_slave && d == Hold)); }
        }
    }
}
