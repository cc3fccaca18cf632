//! Generation identifiers (DRBD's "UUIDs"): which generation of the data a node holds, which
//! generation each peer bitmap tracks changes against, and the generations this node passed.
//!
//! A generation identifier is a random 64-bit value. Bit 0 is not part of the identity: it
//! records whether the node was Primary while that generation was current (DRBD's
//! `UUID_PRIMARY`), which is how `discard-younger-primary` / `discard-older-primary` tell who
//! was Primary when a split happened. All comparisons use [`Uuid::value`], which masks it.
//!
//! Life cycle (the runtime calls these transformations; they are pure):
//! - `create-md`: current = [`Uuid::JUST_CREATED`], no bitmap UUIDs, empty history.
//! - promotion, and the first write of a Primary after losing a peer: [`GenerationIds::new_current`]
//!   rotates the old current into the bitmap UUID of every peer that is not in sync (so that
//!   peer's bitmap means "blocks changed since you had generation X") and draws a new current.
//! - resync start: the target adopts the source's current ([`GenerationIds::adopt_sync_source`]);
//!   the source pins the bitmap UUID of the target to its current ([`GenerationIds::pin_bitmap`]).
//! - resync end on the source: [`GenerationIds::clear_bitmap`] moves the bitmap UUID to history.

use std::fmt;

/// Most nodes a resource can have (node ids 0..=31), as in DRBD 9.
pub const MAX_NODES: usize = 32;
/// History generation identifiers kept per node, newest first.
pub const HISTORY_LEN: usize = 8;

/// One generation identifier. `Uuid(0)` means "none".
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub u64);

impl Uuid {
    /// No generation (an unused bitmap UUID or history slot).
    pub const ZERO: Uuid = Uuid(0);
    /// The current UUID of freshly created metadata: "this node never held valid data".
    pub const JUST_CREATED: Uuid = Uuid(4);
    /// The bit that marks "Primary while this generation was current".
    pub const PRIMARY_BIT: u64 = 1;

    /// The identity of the generation (bit 0 masked).
    pub fn value(self) -> u64 {
        self.0 & !Self::PRIMARY_BIT
    }

    /// True for "no generation".
    pub fn is_zero(self) -> bool {
        self.value() == 0
    }

    /// True when the node was Primary while this generation was current.
    pub fn primary_bit(self) -> bool {
        self.0 & Self::PRIMARY_BIT != 0
    }

    /// The same generation with the Primary bit set or cleared.
    pub fn with_primary(self, primary: bool) -> Uuid {
        Uuid(if primary {
            self.0 | Self::PRIMARY_BIT
        } else {
            self.0 & !Self::PRIMARY_BIT
        })
    }

    /// Same generation (Primary bit ignored).
    pub fn same(self, other: Uuid) -> bool {
        self.value() == other.value()
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// The generation identifiers of one node.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct GenerationIds {
    /// The generation of the local data.
    pub current: Uuid,
    /// Per peer node id: the generation the peer had when this node started tracking changes
    /// for it in that peer's bitmap; zero when the peer is (or was last known) in sync. The
    /// entry of the node's own id stays zero.
    pub bitmap: [Uuid; MAX_NODES],
    /// Earlier generations, newest first; zero entries at the end are unused.
    pub history: [Uuid; HISTORY_LEN],
}

impl GenerationIds {
    /// The identifiers of freshly created metadata.
    pub fn just_created() -> GenerationIds {
        GenerationIds {
            current: Uuid::JUST_CREATED,
            bitmap: [Uuid::ZERO; MAX_NODES],
            history: [Uuid::ZERO; HISTORY_LEN],
        }
    }

    /// True when `uuid` (not zero) is among the history entries.
    pub fn in_history(&self, uuid: Uuid) -> bool {
        !uuid.is_zero() && self.history.iter().any(|h| h.same(uuid))
    }

    /// The peer node ids (other than `exclude`) whose bitmap UUID is the generation `uuid`.
    pub fn bitmap_slot_of(&self, uuid: Uuid, exclude: u8) -> Option<u8> {
        if uuid.is_zero() {
            return None;
        }
        (0..MAX_NODES as u8).find(|&n| n != exclude && self.bitmap[n as usize].same(uuid))
    }

    /// Puts `uuid` at the front of the history unless it is zero, the current generation, or
    /// already recorded; the oldest entry falls off.
    pub fn push_history(&mut self, uuid: Uuid) {
        if uuid.is_zero() || uuid.same(self.current) || self.in_history(uuid) {
            return;
        }
        self.history.rotate_right(1);
        self.history[0] = uuid;
    }

    /// Starts a new generation `fresh` (random, not zero; its bit 0 is replaced by `primary`).
    ///
    /// Every node id in `out_of_sync_peers` whose bitmap UUID is zero starts tracking changes
    /// against the old current; peers that already track an older generation keep it (their
    /// bitmap already covers everything since then). If no peer took the old current, it goes
    /// to the history.
    pub fn new_current(&mut self, fresh: u64, primary: bool, out_of_sync_peers: &[u8]) {
        let old = self.current;
        let mut taken = false;
        for &peer in out_of_sync_peers {
            if let Some(slot) = self.bitmap.get_mut(peer as usize)
                && slot.is_zero()
                && !old.same(Uuid::JUST_CREATED)
            {
                *slot = old;
                taken = true;
            }
        }
        self.current = Uuid(fresh).with_primary(primary);
        if !taken && !old.same(Uuid::JUST_CREATED) {
            self.push_history(old);
        }
    }

    /// Sets or clears the Primary bit of the current generation (on promote and demote).
    pub fn set_primary(&mut self, primary: bool) {
        self.current = self.current.with_primary(primary);
    }

    /// Resync start on the source: the bitmap for `peer` now means "blocks that differ from my
    /// current generation", which the target adopts. A replaced older bitmap UUID goes to history.
    pub fn pin_bitmap(&mut self, peer: u8) {
        let idx = peer as usize;
        if idx >= MAX_NODES {
            return;
        }
        let old = self.bitmap[idx];
        self.bitmap[idx] = self.current;
        self.push_history(old);
    }

    /// Resync end on the source (or a peer confirmed in sync): the bitmap UUID goes to history.
    pub fn clear_bitmap(&mut self, peer: u8) {
        let idx = peer as usize;
        if idx >= MAX_NODES {
            return;
        }
        let old = self.bitmap[idx];
        self.bitmap[idx] = Uuid::ZERO;
        self.push_history(old);
    }

    /// Resync start on the target: adopt the source's current generation (the local data stays
    /// Inconsistent until the resync ends). Our own old current goes to history; our bitmap for
    /// the source is cleared (the source provides the bitmap).
    pub fn adopt_sync_source(&mut self, source: u8, source_current: Uuid) {
        let old = self.current;
        self.current = source_current.with_primary(false);
        if !old.same(Uuid::JUST_CREATED) {
            self.push_history(old);
        }
        if let Some(slot) = self.bitmap.get_mut(source as usize) {
            *slot = Uuid::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_bit_is_not_identity() {
        let a = Uuid(0xABCD_0000);
        assert!(a.same(a.with_primary(true)));
        assert!(a.with_primary(true).primary_bit());
        assert!(!a.primary_bit());
        assert!(Uuid(1).is_zero());
        assert_eq!(format!("{:?}", Uuid(0x10)), "0000000000000010");
    }

    #[test]
    fn new_current_rotates_into_out_of_sync_bitmaps_only() {
        let mut g = GenerationIds::just_created();
        g.new_current(0x100, true, &[1]);
        // JUST_CREATED is never tracked or remembered.
        assert_eq!(g.current, Uuid(0x101));
        assert!(g.bitmap[1].is_zero());
        assert!(g.history[0].is_zero());

        g.new_current(0x200, true, &[1, 2]);
        assert_eq!(g.current, Uuid(0x201));
        assert_eq!(g.bitmap[1], Uuid(0x101));
        assert_eq!(g.bitmap[2], Uuid(0x101));
        assert!(g.history[0].is_zero(), "taken by a bitmap, not history");

        // Peer 1 keeps its older generation; nobody takes 0x200, so it goes to history.
        g.new_current(0x300, false, &[1]);
        assert_eq!(g.current, Uuid(0x300));
        assert_eq!(g.bitmap[1], Uuid(0x101));
        assert_eq!(g.history[0], Uuid(0x201));
    }

    #[test]
    fn resync_bookkeeping() {
        let mut src = GenerationIds::just_created();
        src.new_current(0x100, true, &[]);
        src.new_current(0x200, true, &[3]);
        assert_eq!(src.bitmap[3], Uuid(0x101));
        src.pin_bitmap(3);
        assert_eq!(src.bitmap[3], Uuid(0x201));
        assert_eq!(src.history[0], Uuid(0x101));
        src.clear_bitmap(3);
        assert!(src.bitmap[3].is_zero());
        // The current generation is never put into history.
        assert_eq!(src.history[0], Uuid(0x101));

        let mut tgt = GenerationIds::just_created();
        tgt.bitmap[0] = Uuid(0x55);
        tgt.adopt_sync_source(0, Uuid(0x201));
        assert_eq!(tgt.current, Uuid(0x200));
        assert!(tgt.bitmap[0].is_zero());
        assert!(tgt.history[0].is_zero());
        tgt.adopt_sync_source(0, Uuid(0x300));
        assert_eq!(tgt.history[0], Uuid(0x200));
        // Out-of-range node ids are ignored rather than panicking.
        tgt.pin_bitmap(200);
        tgt.clear_bitmap(200);
        tgt.new_current(0x400, false, &[200]);
    }

    #[test]
    fn history_is_bounded_and_deduplicated() {
        let mut g = GenerationIds::just_created();
        for i in 1..=20u64 {
            g.new_current(i << 8, false, &[]);
        }
        assert_eq!(g.current, Uuid(20 << 8));
        assert_eq!(g.history[0], Uuid(19 << 8));
        assert_eq!(
            g.history[HISTORY_LEN - 1],
            Uuid((19 - HISTORY_LEN as u64 + 1) << 8)
        );
        let before = g.history;
        g.push_history(Uuid(19 << 8));
        g.push_history(Uuid::ZERO);
        g.push_history(g.current);
        assert_eq!(g.history, before);
        assert!(g.in_history(Uuid((18 << 8) | 1)));
        assert!(!g.in_history(Uuid::ZERO));
        assert_eq!(g.bitmap_slot_of(Uuid::ZERO, 0), None);
    }
}
