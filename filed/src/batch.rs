//! Aggregation of watch events into one batch per group (lsyncd's `delay`, with a leading edge):
//! an event after a quiet period (no batch closed within the window) goes out at once, so a
//! single edit is not held back; an event while changes keep coming starts a window of the
//! configured length, and every path reported until it closes joins the same batch
//! (deduplicated; "deep" — a directory created or moved in — wins over "shallow"). A burst of
//! 100,000 creates is thus one batch for its first event and then one per window. A lost event
//! (queue overflow, watch error) turns the batch into a rescan. Pure: the clock is passed in, so
//! a burst is tested without waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A closed batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Logical path → deep (walk below it too).
    pub paths: HashMap<String, bool>,
    /// Events were lost: check the whole group.
    pub rescan: bool,
    /// Events that went into the batch (before deduplication).
    pub events: u64,
}

#[derive(Debug)]
pub struct Batcher {
    delay: Duration,
    first: Option<Instant>,
    /// The open batch goes out at once (it started after a quiet period).
    immediate: bool,
    /// When the last batch closed.
    last_closed: Option<Instant>,
    open: Pending,
}

impl Batcher {
    pub fn new(delay: Duration) -> Batcher {
        Batcher {
            delay,
            first: None,
            immediate: false,
            last_closed: None,
            open: Pending::default(),
        }
    }

    fn start(&mut self, now: Instant) {
        if self.first.is_none() {
            self.first = Some(now);
            self.immediate = self
                .last_closed
                .is_none_or(|c| now.saturating_duration_since(c) >= self.delay);
        }
    }

    /// A path changed.
    pub fn add(&mut self, now: Instant, logical: String, deep: bool) {
        self.start(now);
        self.open.events += 1;
        if self.open.rescan {
            return; // the whole group is checked anyway
        }
        let e = self.open.paths.entry(logical).or_insert(false);
        *e |= deep;
    }

    /// Events were lost: the batch becomes a full check of the group.
    pub fn rescan(&mut self, now: Instant) {
        self.start(now);
        self.open.events += 1;
        self.open.rescan = true;
        self.open.paths.clear();
    }

    /// When the open batch closes (`None`: no batch open).
    pub fn deadline(&self) -> Option<Instant> {
        self.first
            .map(|f| if self.immediate { f } else { f + self.delay })
    }

    /// The batch, once its window has passed.
    pub fn take(&mut self, now: Instant) -> Option<Pending> {
        match self.deadline() {
            Some(d) if d <= now => {
                self.first = None;
                self.last_closed = Some(now);
                Some(std::mem::take(&mut self.open))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_after_a_quiet_period_goes_out_at_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(ms(200));
        b.add(t0, "/a".into(), false);
        assert_eq!(b.deadline(), Some(t0));
        assert_eq!(b.take(t0).unwrap().paths.len(), 1);
        // Changes keep coming: the next one waits for the window.
        b.add(t0 + ms(50), "/b".into(), false);
        assert_eq!(b.deadline(), Some(t0 + ms(250)));
        assert_eq!(b.take(t0 + ms(249)), None);
        assert!(b.take(t0 + ms(250)).is_some());
        // Quiet for a whole window again: at once.
        b.add(t0 + ms(450), "/c".into(), false);
        assert_eq!(b.deadline(), Some(t0 + ms(450)));
    }

    #[test]
    fn window_starts_at_the_first_event() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(ms(200));
        assert_eq!(b.deadline(), None);
        assert_eq!(b.take(t0), None);
        // A batch just closed: the next events are aggregated over the window.
        b.add(t0 - ms(10), "/x".into(), false);
        b.take(t0 - ms(10)).unwrap();
        b.add(t0, "/a".into(), false);
        b.add(t0 + ms(150), "/b".into(), false);
        b.add(t0 + ms(190), "/a".into(), true);
        assert_eq!(b.deadline(), Some(t0 + ms(200)));
        assert_eq!(b.take(t0 + ms(199)), None);
        let p = b.take(t0 + ms(200)).unwrap();
        assert_eq!(p.events, 3);
        assert_eq!(p.paths.len(), 2);
        assert!(p.paths["/a"], "deep wins");
        assert!(!p.rescan);
        assert_eq!(b.deadline(), None);
        // the next event within the window after that batch opens a new window
        b.add(t0 + ms(300), "/c".into(), false);
        assert_eq!(b.deadline(), Some(t0 + ms(500)));
    }

    #[test]
    fn a_burst_is_one_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(Duration::from_millis(200));
        for i in 0..100_000u32 {
            b.add(
                t0 + Duration::from_micros(u64::from(i)),
                format!("/d/f{i}"),
                false,
            );
        }
        let p = b.take(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(p.paths.len(), 100_000);
        assert_eq!(b.take(t0 + Duration::from_secs(2)), None);
    }

    #[test]
    fn overflow_turns_the_batch_into_a_rescan() {
        let t0 = Instant::now();
        let mut b = Batcher::new(Duration::from_millis(10));
        b.add(t0, "/a".into(), false);
        b.rescan(t0);
        b.add(t0, "/b".into(), false);
        let p = b.take(t0 + Duration::from_millis(10)).unwrap();
        assert!(p.rescan && p.paths.is_empty());
        assert_eq!(p.events, 3);
    }
}
