//! The activity-log extents of the local disk written since the last flush that succeeded, as
//! pure bookkeeping. A failed flush (`fdatasync` EIO: Linux may drop the dirty pages) may have
//! lost any of those writes, including ones already acknowledged to the peer as written, which
//! are then in no bitmap: the runtime marks these extents out of sync for every peer before it
//! ends the session (as a crash would mark the hot activity-log extents), so the next
//! handshake resyncs them.
//!
//! A write is recorded once it completed (`note_written`), a flush takes a [`FlushMark`]
//! before it starts and hands it back when it succeeded: every write recorded before the mark
//! was complete when the flush started, so the flush made it durable; writes recorded after it
//! may have completed after the flush started and stay. Extents rather than byte ranges keep the
//! bookkeeping bounded; past [`MAX_TRACKED_EXTENTS`] the whole device counts as written.

use std::collections::BTreeMap;

/// Extents tracked one by one; beyond this many the whole device counts as written.
pub const MAX_TRACKED_EXTENTS: usize = 1 << 16;

/// Taken by a flush before it starts ([`UnflushedWrites::flush_started`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushMark(u64);

/// Extents written and not yet known durable.
#[derive(Debug)]
pub struct UnflushedWrites {
    extent_size: u64,
    /// Bumped by every flush that starts: a write's epoch says which flushes cover it.
    epoch: u64,
    /// Extent number -> the epoch of its latest write.
    extents: BTreeMap<u64, u64>,
    /// Too many extents to track: the whole device, with the epoch of the latest write.
    everything: Option<u64>,
}

impl UnflushedWrites {
    /// Bookkeeping for extents of `extent_size` bytes (the activity log's).
    pub fn new(extent_size: u64) -> UnflushedWrites {
        UnflushedWrites {
            extent_size: extent_size.max(1),
            epoch: 0,
            extents: BTreeMap::new(),
            everything: None,
        }
    }

    /// A write (or zeroing) of `len` bytes at `offset` completed on the local disk.
    pub fn note_written(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if self.everything.is_some() {
            self.everything = Some(self.epoch);
            return;
        }
        let first = offset / self.extent_size;
        let last = offset.saturating_add(len - 1) / self.extent_size;
        if last - first >= MAX_TRACKED_EXTENTS as u64 {
            self.extents.clear();
            self.everything = Some(self.epoch);
            return;
        }
        for e in first..=last {
            self.extents.insert(e, self.epoch);
        }
        if self.extents.len() > MAX_TRACKED_EXTENTS {
            self.extents.clear();
            self.everything = Some(self.epoch);
        }
    }

    /// A flush starts: the writes recorded so far are complete and it covers them.
    pub fn flush_started(&mut self) -> FlushMark {
        let mark = FlushMark(self.epoch);
        self.epoch += 1;
        mark
    }

    /// The flush that took `mark` succeeded: the writes it covers are durable.
    pub fn flushed(&mut self, mark: FlushMark) {
        self.extents.retain(|_, epoch| *epoch > mark.0);
        if self.everything.is_some_and(|epoch| epoch <= mark.0) {
            self.everything = None;
        }
    }

    /// Nothing written since the last successful flush.
    pub fn is_empty(&self) -> bool {
        self.everything.is_none() && self.extents.is_empty()
    }

    /// The byte ranges that may have been lost, merged and sorted, within a device of `size`
    /// bytes.
    pub fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        if self.everything.is_some() {
            return if size > 0 {
                vec![(0, size)]
            } else {
                Vec::new()
            };
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &e in self.extents.keys() {
            let start = e.saturating_mul(self.extent_size);
            if start >= size {
                break;
            }
            let end = start.saturating_add(self.extent_size).min(size);
            crate::repl::disk_failure::push_range(&mut out, start, end);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ES: u64 = 4 << 20;

    #[test]
    fn a_successful_flush_covers_the_writes_recorded_before_it() {
        let mut u = UnflushedWrites::new(ES);
        u.note_written(0, 4096);
        u.note_written(3 * ES + 100, ES);
        assert_eq!(u.ranges(1 << 40), [(0, ES), (3 * ES, 2 * ES)]);
        let mark = u.flush_started();
        // Completed while the flush runs: not covered by it.
        u.note_written(10 * ES, 512);
        u.note_written(0, 512);
        u.flushed(mark);
        assert_eq!(u.ranges(1 << 40), [(0, ES), (10 * ES, ES)]);
        let mark = u.flush_started();
        u.flushed(mark);
        assert!(u.is_empty());
        assert_eq!(u.ranges(1 << 40), []);
    }

    #[test]
    fn a_failed_flush_leaves_everything_since_the_last_good_one() {
        let mut u = UnflushedWrites::new(ES);
        u.note_written(ES, 4096);
        let failed = u.flush_started();
        u.note_written(2 * ES, 4096);
        let _ = failed; // never handed back
        let later = u.flush_started();
        u.note_written(5 * ES, 4096);
        assert_eq!(u.ranges(1 << 40), [(ES, 2 * ES), (5 * ES, ES)]);
        // A later flush that succeeded covers what the failed one did.
        u.flushed(later);
        assert_eq!(u.ranges(1 << 40), [(5 * ES, ES)]);
    }

    #[test]
    fn ranges_stay_within_the_device() {
        let mut u = UnflushedWrites::new(ES);
        u.note_written(u64::MAX - 10, 100);
        u.note_written(ES + 10, 10);
        // The last extent is cut at the device's end; extents past it are left out.
        assert_eq!(u.ranges(ES + 4096), [(ES, 4096)]);
    }

    #[test]
    fn too_many_extents_count_as_the_whole_device() {
        let mut u = UnflushedWrites::new(ES);
        u.note_written(0, ES * (MAX_TRACKED_EXTENTS as u64 + 1));
        assert_eq!(u.ranges(1 << 50), [(0, 1 << 50)]);
        let mark = u.flush_started();
        u.flushed(mark);
        assert!(u.is_empty());
        let mut u = UnflushedWrites::new(ES);
        for e in 0..=MAX_TRACKED_EXTENTS as u64 {
            u.note_written(e * 2 * ES, 1);
        }
        assert_eq!(u.ranges(1 << 50), [(0, 1 << 50)]);
        // Still the whole device after a write that follows a flush's start.
        let mark = u.flush_started();
        u.note_written(0, 1);
        u.flushed(mark);
        assert_eq!(u.ranges(1 << 50), [(0, 1 << 50)]);
    }
}
