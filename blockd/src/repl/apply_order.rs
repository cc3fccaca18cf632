//! The order in which a node applies the replicated requests it receives: a pure state machine
//! (no I/O) over sequence numbers. A request `{seq, after}` may start once every earlier request
//! with a sequence number below `after` is done; requests that may start run concurrently, the
//! others wait in arrival order. The sender sets `after` past every request that had completed
//! before this one was issued, so the receiver's disk only goes through states the sender's
//! disk went through (see `repl::wire`), without serialising requests that were in flight
//! together.

use std::collections::{BTreeSet, VecDeque};

/// One request as the ordering sees it; `op` is whatever the runtime executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordered<T> {
    pub seq: u64,
    pub after: u64,
    pub op: T,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("request {seq} arrived after request {last}: sequence numbers must increase")]
    NotIncreasing { seq: u64, last: u64 },
}

/// Requests running (started, not done) and waiting (not started), of one link.
#[derive(Debug)]
pub struct ApplyOrder<T> {
    running: BTreeSet<u64>,
    waiting: VecDeque<Ordered<T>>,
    last: Option<u64>,
}

impl<T> Default for ApplyOrder<T> {
    fn default() -> Self {
        ApplyOrder {
            running: BTreeSet::new(),
            waiting: VecDeque::new(),
            last: None,
        }
    }
}

impl<T> ApplyOrder<T> {
    /// A request arrived. Returns it when it may start now (it is then running), `None` when it
    /// waits (a later [`ApplyOrder::done`] returns it).
    pub fn arrive(&mut self, r: Ordered<T>) -> Result<Option<Ordered<T>>, OrderError> {
        if let Some(last) = self.last
            && r.seq <= last
        {
            return Err(OrderError::NotIncreasing { seq: r.seq, last });
        }
        self.last = Some(r.seq);
        if self.waiting.is_empty() && self.may_start(r.after) {
            self.running.insert(r.seq);
            Ok(Some(r))
        } else {
            self.waiting.push_back(r);
            Ok(None)
        }
    }

    /// Request `seq` is done: appends to `start` the waiting requests that may start now, in
    /// arrival order (they are running from here on).
    pub fn done(&mut self, seq: u64, start: &mut Vec<Ordered<T>>) {
        self.running.remove(&seq);
        while let Some(head) = self.waiting.front() {
            if !self.may_start(head.after) {
                break;
            }
            let head = self.waiting.pop_front().expect("front exists");
            self.running.insert(head.seq);
            start.push(head);
        }
    }

    /// Requests running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting for earlier ones.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Nothing running and nothing waiting: every request that arrived is done.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Takes the requests that never started, in arrival order (a session that ends without
    /// finishing them: the caller accounts for them, e.g. marks their ranges out of sync).
    pub fn take_waiting(&mut self) -> Vec<Ordered<T>> {
        self.waiting.drain(..).collect()
    }

    /// The waiting requests can only wait for running ones, and the arrival order keeps later
    /// requests behind earlier ones, so a request never waits for one that arrived after it.
    fn may_start(&self, after: u64) -> bool {
        self.running.first().is_none_or(|&s| s >= after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(seq: u64, after: u64) -> Ordered<()> {
        Ordered { seq, after, op: () }
    }

    #[test]
    fn concurrent_requests_start_together_and_later_ones_wait() {
        let mut o = ApplyOrder::default();
        assert!(o.arrive(req(1, 0)).unwrap().is_some());
        assert!(o.arrive(req(2, 0)).unwrap().is_some());
        // 3 was issued after 1 completed (after = 2): it waits for 1, not for 2.
        assert!(o.arrive(req(3, 2)).unwrap().is_none());
        // 4 waits behind 3 even though its own condition holds (arrival order).
        assert!(o.arrive(req(4, 0)).unwrap().is_none());
        let mut start = Vec::new();
        o.done(2, &mut start);
        assert!(start.is_empty(), "1 still runs");
        o.done(1, &mut start);
        assert_eq!(start, vec![req(3, 2), req(4, 0)]);
        assert_eq!((o.running(), o.waiting()), (2, 0));
    }

    #[test]
    fn a_flush_waits_for_everything_before_it() {
        let mut o = ApplyOrder::default();
        assert!(o.arrive(req(1, 0)).unwrap().is_some());
        assert!(o.arrive(req(2, 0)).unwrap().is_some());
        assert!(o.arrive(req(3, 3)).unwrap().is_none());
        let mut start = Vec::new();
        o.done(1, &mut start);
        assert!(start.is_empty());
        o.done(2, &mut start);
        assert_eq!(start, vec![req(3, 3)]);
    }

    #[test]
    fn sequence_numbers_must_increase() {
        let mut o = ApplyOrder::default();
        o.arrive(req(5, 0)).unwrap();
        assert_eq!(
            o.arrive(req(5, 0)),
            Err(OrderError::NotIncreasing { seq: 5, last: 5 })
        );
        assert!(o.arrive(req(3, 0)).is_err());
    }

    #[test]
    fn idle_once_everything_is_done_and_waiting_can_be_taken() {
        let mut o = ApplyOrder::default();
        assert!(o.is_idle());
        assert!(o.arrive(req(1, 0)).unwrap().is_some());
        assert!(o.arrive(req(2, 2)).unwrap().is_none());
        assert!(o.arrive(req(3, 0)).unwrap().is_none());
        assert!(!o.is_idle());
        assert_eq!(o.take_waiting(), vec![req(2, 2), req(3, 0)]);
        assert!(!o.is_idle(), "1 still runs");
        let mut start = Vec::new();
        o.done(1, &mut start);
        assert!(start.is_empty());
        assert!(o.is_idle());
    }

    proptest! {
        /// Whatever the `after` values and completion order: a request never starts before every
        /// earlier request below its `after` is done, and every request eventually starts.
        #[test]
        fn order_is_respected_and_nothing_is_stuck(
            afters in proptest::collection::vec(0u64..40, 1..40),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 0..200),
        ) {
            let mut o = ApplyOrder::default();
            let mut done = std::collections::BTreeSet::new();
            let mut running: Vec<u64> = Vec::new();
            let mut started = 0;
            let check = |r: &Ordered<()>, done: &std::collections::BTreeSet<u64>| {
                (0..r.seq.min(r.after)).all(|s| done.contains(&s))
            };
            let mut next = 0u64;
            let mut picks = picks.into_iter();
            loop {
                // Arrive the next request, or finish a running one.
                let arrive = next < afters.len() as u64
                    && (running.is_empty() || picks.next().is_some_and(|p| p.index(2) == 0));
                if arrive {
                    let r = req(next, afters[next as usize]);
                    next += 1;
                    if let Some(r) = o.arrive(r).unwrap() {
                        prop_assert!(check(&r, &done));
                        running.push(r.seq);
                        started += 1;
                    }
                } else if running.is_empty() {
                    break;
                } else {
                    let i = picks.next().map_or(0, |p| p.index(running.len()));
                    let seq = running.swap_remove(i);
                    done.insert(seq);
                    let mut start = Vec::new();
                    o.done(seq, &mut start);
                    for r in start {
                        prop_assert!(check(&r, &done));
                        running.push(r.seq);
                        started += 1;
                    }
                }
            }
            prop_assert_eq!(started, afters.len());
            prop_assert_eq!(o.waiting(), 0);
        }
    }
}
