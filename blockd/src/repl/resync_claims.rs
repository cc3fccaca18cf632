//! The resync ranges of one session whose bits the source may clear, as pure bookkeeping: a
//! range is claimed when its chunk is about to be read, moves to the acknowledged list when
//! the target acknowledges it, and is handed out for clearing once a flush sent after that
//! acknowledgement is acknowledged (`repl::resync::settle_acked`).
//!
//! A range marked out of sync for the peer again while claimed or acknowledged (an
//! application write that did not reach it, a pass-on local failure, the unstable writes of a
//! lost Primary...) is withdrawn from both lists at once ([`Claims::marked`]): the chunk read
//! before the mark carries older data, so its acknowledgement must not clear the new mark. The
//! next pass of the walk sends it again. Marks and settles both run under the metadata lock
//! (which guards the bitmap), so a mark is either before a chunk's claim (and its read) or
//! withdraws it.

/// Claimed and acknowledged ranges, each `[start, end)` in bytes.
#[derive(Debug, Default)]
pub struct Claims {
    /// Chunks being read, sent or waiting for their acknowledgement: sorted, disjoint.
    reading: Vec<(u64, u64)>,
    /// Acknowledged ranges not cleared yet: `(ack number, start, end)`, numbers increasing.
    acked: Vec<(u64, u64, u64)>,
    /// The number of the next acknowledgement.
    next_ack: u64,
    /// Bytes handed out for clearing so far (the session's durable progress).
    settled: u64,
}

impl Claims {
    /// The chunk `[offset, offset + len)` is about to be read (its range held): once
    /// acknowledged and settled, its bits may be cleared unless it is marked again first.
    pub fn reading(&mut self, offset: u64, len: u64) {
        let (start, end) = (offset, offset.saturating_add(len));
        if start >= end {
            return;
        }
        // Union with the overlapping or adjacent claims.
        let (mut s, mut e) = (start, end);
        self.reading.retain(|&(a, b)| {
            if a <= e && s <= b {
                s = s.min(a);
                e = e.max(b);
                false
            } else {
                true
            }
        });
        let at = self.reading.partition_point(|&(a, _)| a < s);
        self.reading.insert(at, (s, e));
    }

    /// The target acknowledged `[offset, offset + len)` (written, or found equal): the part of
    /// it still claimed waits for the next settle; the rest (marked since its read, or never
    /// claimed) stays dirty.
    pub fn acked(&mut self, offset: u64, len: u64) {
        let (start, end) = (offset, offset.saturating_add(len));
        let n = self.next_ack;
        let mut moved = false;
        for &(a, b) in &self.reading {
            let (s, e) = (a.max(start), b.min(end));
            if s < e {
                self.acked.push((n, s, e));
                moved = true;
            }
        }
        if moved {
            self.next_ack += 1;
            self.reading = subtract(&self.reading, start, end);
        }
    }

    /// `[offset, offset + len)` was marked out of sync for the peer: no chunk read before
    /// clears it.
    pub fn marked(&mut self, offset: u64, len: u64) {
        let (start, end) = (offset, offset.saturating_add(len));
        if start >= end {
            return;
        }
        self.reading = subtract(&self.reading, start, end);
        self.acked = (self.acked.iter())
            .flat_map(|&(n, a, b)| outside(a, b, start, end).map(move |(s, e)| (n, s, e)))
            .collect();
    }

    /// Where the acknowledgements covered by a flush sent now end (see [`Claims::settle`]).
    pub fn flush_point(&self) -> u64 {
        self.next_ack
    }

    /// The flush sent at `point` was acknowledged: the ranges acknowledged before it and not
    /// marked since, `(offset, len)`, to be cleared (they leave the list).
    pub fn settle(&mut self, point: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        self.acked.retain(|&(n, a, b)| {
            if n < point {
                out.push((a, b - a));
                false
            } else {
                true
            }
        });
        self.settled += out.iter().map(|r| r.1).sum::<u64>();
        out
    }

    /// Whether anything was acknowledged and not settled yet.
    pub fn has_acked(&self) -> bool {
        !self.acked.is_empty()
    }

    /// Bytes acknowledged and not settled yet (status counts them as in sync).
    pub fn unsettled_bytes(&self) -> u64 {
        self.acked.iter().map(|&(_, a, b)| b - a).sum()
    }

    /// Bytes settled since the session started.
    pub fn settled_bytes(&self) -> u64 {
        self.settled
    }
}

/// `ranges` (sorted, disjoint) without `[start, end)`.
fn subtract(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    (ranges.iter())
        .flat_map(|&(a, b)| outside(a, b, start, end))
        .collect()
}

/// The parts of `[a, b)` outside `[start, end)`: none, one or two, in order.
fn outside(a: u64, b: u64, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    [(a, start.min(b)), (end.max(a), b)]
        .into_iter()
        .filter(|&(s, e)| s < e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K: u64 = 4096;

    #[test]
    fn an_acknowledged_chunk_is_settled_by_the_next_flush() {
        let mut c = Claims::default();
        c.reading(0, 16 * K);
        assert_eq!(c.settle(c.flush_point()), [], "not acknowledged yet");
        c.acked(0, 16 * K);
        assert_eq!(c.unsettled_bytes(), 16 * K);
        let point = c.flush_point();
        // Acknowledged after the flush was sent: for the next one.
        c.reading(16 * K, 16 * K);
        c.acked(16 * K, 16 * K);
        assert_eq!(c.settle(point), [(0, 16 * K)]);
        assert_eq!(c.unsettled_bytes(), 16 * K);
        assert_eq!(c.settle(c.flush_point()), [(16 * K, 16 * K)]);
        assert!(!c.has_acked());
        assert_eq!(c.settled_bytes(), 32 * K);
    }

    #[test]
    fn a_mark_after_the_acknowledgement_is_not_settled() {
        let mut c = Claims::default();
        c.reading(0, 16 * K);
        c.acked(0, 16 * K);
        c.marked(4 * K, K);
        assert_eq!(c.unsettled_bytes(), 15 * K);
        assert_eq!(c.settle(c.flush_point()), [(0, 4 * K), (5 * K, 11 * K)]);
    }

    #[test]
    fn a_mark_between_read_and_acknowledgement_is_not_settled() {
        let mut c = Claims::default();
        c.reading(0, 16 * K);
        c.marked(15 * K, 10 * K);
        c.acked(0, 16 * K);
        assert_eq!(c.settle(c.flush_point()), [(0, 15 * K)]);
        // A mark over the whole chunk leaves nothing to clear.
        c.reading(0, 16 * K);
        c.marked(0, 1 << 20);
        c.acked(0, 16 * K);
        assert!(!c.has_acked());
        assert_eq!(c.settle(c.flush_point()), []);
    }

    #[test]
    fn a_chunk_read_after_the_mark_is_settled() {
        let mut c = Claims::default();
        c.marked(0, 16 * K);
        c.reading(0, 16 * K);
        c.acked(0, 16 * K);
        assert_eq!(c.settle(c.flush_point()), [(0, 16 * K)]);
    }

    #[test]
    fn acknowledgements_of_unclaimed_ranges_clear_nothing() {
        let mut c = Claims::default();
        c.acked(0, 16 * K);
        assert!(!c.has_acked());
        // Part of an acknowledgement claimed: only that part.
        c.reading(8 * K, 4 * K);
        c.acked(0, 16 * K);
        assert_eq!(c.settle(c.flush_point()), [(8 * K, 4 * K)]);
    }

    #[test]
    fn a_checksum_run_and_its_differing_blocks() {
        // The run is claimed when hashed; its differing block is read again and claimed again.
        let mut c = Claims::default();
        c.reading(0, 16 * K);
        c.reading(4 * K, K);
        c.acked(0, 4 * K);
        c.acked(5 * K, 11 * K);
        c.acked(4 * K, K);
        let mut settled = c.settle(c.flush_point());
        settled.sort_unstable();
        assert_eq!(settled, [(0, 4 * K), (4 * K, K), (5 * K, 11 * K)]);
    }

    proptest! {
        /// Whatever the interleaving, a block is only handed out for clearing when an
        /// acknowledgement found it claimed and no mark came since, and a flush sent after the
        /// last acknowledgement settles everything.
        #[test]
        fn marks_after_the_claim_are_never_settled(
            ops in proptest::collection::vec((0u8..4, 0u64..64, 1u64..16), 0..60),
        ) {
            let mut c = Claims::default();
            let mut claimed = [false; 80];
            let mut clean = [false; 80];
            let mut point = 0;
            let mut pending_point = None;
            for &(op, block, blocks) in &ops {
                let (o, l) = (block * K, blocks * K);
                let r = block as usize..(block + blocks) as usize;
                match op {
                    0 => {
                        c.reading(o, l);
                        for b in r { claimed[b] = true; }
                    }
                    1 => {
                        c.marked(o, l);
                        for b in r { claimed[b] = false; clean[b] = false; }
                    }
                    2 => {
                        c.acked(o, l);
                        for b in r {
                            clean[b] |= claimed[b];
                            claimed[b] = false;
                        }
                    }
                    _ => match pending_point.take() {
                        None => pending_point = Some(c.flush_point()),
                        Some(p) => point = p,
                    },
                }
                for (s, len) in c.settle(point) {
                    prop_assert!(len > 0 && s % K == 0 && len % K == 0);
                    for b in (s / K)..((s + len) / K) {
                        prop_assert!(clean[b as usize], "block {} settled after a mark", b);
                    }
                }
            }
            for (s, len) in c.settle(c.flush_point()) {
                for b in (s / K)..((s + len) / K) {
                    prop_assert!(clean[b as usize], "block {} settled after a mark", b);
                }
            }
            prop_assert!(!c.has_acked());
            prop_assert_eq!(c.unsettled_bytes(), 0);
        }
    }
}
