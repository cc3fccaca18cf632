//! Writes of a Primary that may not have reached every peer yet (DRBD's peer acks), as pure
//! bookkeeping:
//!
//! - the Primary numbers every replicated request and knows, per peer session, which of them
//!   the peer has not confirmed as written; [`stable_below`] is the first number that may still
//!   be missing somewhere, announced to the peers in-stream (`Message::Stable`);
//! - a Secondary keeps the writes it received above the latest announcement in an
//!   [`UnstableWrites`] window. If its session with the Primary ends, those blocks may differ on
//!   the other peers (the Primary sent them to everyone, the links died at different moments),
//!   so the Secondary marks them out of sync for every other peer; the next Primary resyncs
//!   them (see `Resource::promote`), whichever copy it holds.
//!
//! The window is bounded by what the Primary has in flight to its slowest peer (its send
//! buffer under protocol A, the NBD clients' queues under B and C) plus one announcement delay.

use std::collections::VecDeque;

/// The first request number that is not known to be written on every peer: the lowest number
/// still pending on a live session, or `next_seq` (nothing pending), and never above `floor`.
/// Every request numbered below it was written by every peer it was queued to. Read `next_seq`
/// under the numbering lock before looking at the pending writes, so every request numbered
/// below it is already queued where it goes.
///
/// `floor` is the lowest request a peer whose session ended never confirmed (its blocks are in
/// the Primary's bitmap for it, which dies with the Primary): until the Primary's next
/// generation has been announced (`NewUuid`, after which the survivors see that peer as behind
/// and sync it whole), the survivors must keep those writes in their windows, or a Primary lost
/// in between would leave them holding writes that peer lacks with no bit set anywhere.
pub fn stable_below(
    next_seq: u64,
    floor: Option<u64>,
    lowest_pending: impl IntoIterator<Item = Option<u64>>,
) -> u64 {
    lowest_pending
        .into_iter()
        .chain(std::iter::once(floor))
        .flatten()
        .fold(next_seq, u64::min)
}

/// A Secondary's writes received from its Primary and not yet announced as stable.
#[derive(Debug, Default)]
pub struct UnstableWrites {
    /// `(seq, offset, len)` in arrival order (a link delivers them in increasing `seq`).
    writes: VecDeque<(u64, u64, u64)>,
}

impl UnstableWrites {
    /// A write (or zeroing) numbered `seq` of `len` bytes at `offset` arrived.
    pub fn received(&mut self, seq: u64, offset: u64, len: u64) {
        if len > 0 {
            self.writes.push_back((seq, offset, len));
        }
    }

    /// The Primary announced every write numbered below `below` as written everywhere.
    pub fn stable(&mut self, below: u64) {
        while self.writes.front().is_some_and(|w| w.0 < below) {
            self.writes.pop_front();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// The byte ranges of the unstable writes, sorted and merged: `(offset, len)`.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        // Saturating: a range is checked before it is recorded, but an end past `u64::MAX`
        // must not panic (or wrap to a range covering the whole device) here anyway.
        let mut r: Vec<(u64, u64)> = self
            .writes
            .iter()
            .map(|w| (w.1, w.1.saturating_add(w.2)))
            .collect();
        r.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
        for (start, end) in r {
            match out.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => out.push((start, end)),
            }
        }
        out.into_iter().map(|(s, e)| (s, e - s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stable_is_the_lowest_pending_number_or_the_next_one() {
        assert_eq!(stable_below(10, None, []), 10);
        assert_eq!(stable_below(10, None, [None, None]), 10);
        assert_eq!(stable_below(10, None, [Some(7), None, Some(4)]), 4);
        assert_eq!(stable_below(10, None, [Some(9)]), 9);
        // A lost peer's unconfirmed writes hold the figure, whatever the live sessions say.
        assert_eq!(stable_below(10, Some(6), []), 6);
        assert_eq!(stable_below(10, Some(6), [Some(7), None]), 6);
        assert_eq!(stable_below(10, Some(6), [Some(3)]), 3);
    }

    #[test]
    fn announcements_drop_the_writes_below_them() {
        let mut u = UnstableWrites::default();
        for seq in 0..5 {
            u.received(seq, seq * 4096, 4096);
        }
        u.stable(3);
        assert_eq!(u.len(), 2);
        assert_eq!(u.ranges(), [(3 * 4096, 8192)]);
        // An older announcement changes nothing.
        u.stable(1);
        assert_eq!(u.len(), 2);
        u.stable(5);
        assert!(u.is_empty());
        assert_eq!(u.ranges(), []);
    }

    #[test]
    fn ranges_are_merged_and_sorted() {
        let mut u = UnstableWrites::default();
        u.received(1, 8192, 4096);
        u.received(2, 0, 4096);
        u.received(3, 2048, 4096);
        u.received(4, 100_000, 512);
        u.received(5, 0, 0);
        assert_eq!(u.ranges(), [(0, 6144), (8192, 4096), (100_000, 512)]);
    }

    #[test]
    fn an_end_past_the_largest_offset_does_not_overflow() {
        let mut u = UnstableWrites::default();
        u.received(1, 1 << 63, 1 << 63);
        u.received(2, u64::MAX - 1, 10);
        assert_eq!(u.ranges(), [(1 << 63, u64::MAX - (1 << 63))]);
    }

    proptest! {
        /// Every received byte above the last announcement is covered by the ranges, and the
        /// ranges are disjoint and sorted.
        #[test]
        fn ranges_cover_every_unstable_write(
            writes in proptest::collection::vec((0u64..64, 1u64..5), 0..40),
            below in 0u64..50,
        ) {
            let mut u = UnstableWrites::default();
            for (seq, (block, blocks)) in writes.iter().enumerate() {
                u.received(seq as u64, block * 512, blocks * 512);
            }
            u.stable(below);
            let ranges = u.ranges();
            for w in ranges.windows(2) {
                prop_assert!(w[0].0 + w[0].1 < w[1].0);
            }
            for (seq, (block, blocks)) in writes.iter().enumerate() {
                if (seq as u64) < below {
                    continue;
                }
                let (start, end) = (block * 512, (block + blocks) * 512);
                prop_assert!(
                    ranges.iter().any(|&(o, l)| o <= start && end <= o + l),
                    "write {seq} not covered"
                );
            }
        }
    }
}
