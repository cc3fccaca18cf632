//! Byte ranges in flight on the Primary (application writes and resync reads): a new request
//! that overlaps one in flight waits for it. This keeps overlapping writes in the same order on
//! every copy, and keeps a resync read from sending a block older than a write in flight.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// The in-flight set (a short vector: at most queue depth + resync window entries).
#[derive(Default)]
pub struct Ranges {
    state: Mutex<State>,
    next_id: AtomicU64,
    released: Notify,
}

/// Ranges held, and ranges asked for and not granted yet, each `(start, end, id)`; ids grow
/// in the order requests arrive.
#[derive(Default)]
struct State {
    held: Vec<(u64, u64, u64)>,
    waiting: Vec<(u64, u64, u64)>,
}

impl State {
    /// Whether request `id` for `want` may take its range now: nothing held overlaps it, and
    /// no request that arrived earlier and still waits overlaps it (first come, first served: a
    /// range cannot be starved by a stream of later overlapping requests, such as writes to a hot
    /// region keeping a 1 MiB resync chunk waiting for ever).
    fn grantable(&self, want: (u64, u64), id: u64) -> bool {
        !self.held.iter().any(|&(s, e, _)| overlaps((s, e), want))
            && !self
                .waiting
                .iter()
                .any(|&(s, e, w)| w < id && overlaps((s, e), want))
    }

    fn forget_waiter(&mut self, id: u64) {
        if let Some(i) = self.waiting.iter().position(|r| r.2 == id) {
            self.waiting.swap_remove(i);
        }
    }
}

/// Holds a range until dropped.
pub struct RangeGuard<'a> {
    ranges: &'a Ranges,
    id: u64,
}

/// A request's place in the queue while it waits; given up if the waiting future is dropped.
struct Waiter<'a> {
    ranges: &'a Ranges,
    id: u64,
    queued: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.queued {
            self.ranges
                .state
                .lock()
                .expect("ranges lock")
                .forget_waiter(self.id);
            // Later requests may have waited behind this one.
            self.ranges.released.notify_waiters();
        }
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Ranges {
    /// Waits until `[offset, offset + len)` overlaps nothing in flight and no earlier request
    /// still waiting, then holds it.
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let want = (offset, offset.saturating_add(len.max(1)));
        let mut waiter = Waiter {
            ranges: self,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queued: false,
        };
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.state.lock().expect("ranges lock");
                if state.grantable(want, waiter.id) {
                    if waiter.queued {
                        state.forget_waiter(waiter.id);
                        waiter.queued = false;
                    }
                    state.held.push((want.0, want.1, waiter.id));
                    return RangeGuard {
                        ranges: self,
                        id: waiter.id,
                    };
                }
                if !waiter.queued {
                    state.waiting.push((want.0, want.1, waiter.id));
                    waiter.queued = true;
                }
            }
            notified.await;
        }
    }

    /// Ranges in flight now.
    pub fn in_flight(&self) -> usize {
        self.state.lock().expect("ranges lock").held.len()
    }

    /// Waits until nothing is in flight (demote).
    pub async fn drain(&self) {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.ranges.state.lock().expect("ranges lock");
        if let Some(i) = state.held.iter().position(|r| r.2 == self.id) {
            state.held.swap_remove(i);
        }
        drop(state);
        self.ranges.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let r = Ranges::default();
        let a = r.lock(0, 4096).await;
        let _b = r.lock(4096, 4096).await;
        assert_eq!(r.in_flight(), 2);
        let waiting = tokio::time::timeout(Duration::from_millis(50), r.lock(4000, 10)).await;
        assert!(waiting.is_err(), "overlap must wait");
        let (_, c) = tokio::join!(
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(a);
            },
            r.lock(4000, 10)
        );
        assert_eq!(r.in_flight(), 2);
        drop(c);
    }

    #[tokio::test]
    async fn a_waiting_range_is_not_overtaken_by_later_overlapping_requests() {
        let r = std::sync::Arc::new(Ranges::default());
        let write = r.lock(0, 4096).await;
        // A resync chunk over the first MiB waits for the write.
        let chunk_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let chunk = tokio::spawn({
            let (r, chunk_done) = (r.clone(), chunk_done.clone());
            async move {
                let g = r.lock(0, 1 << 20).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
                chunk_done.store(true, Ordering::SeqCst);
                drop(g);
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A later write inside the chunk's range, overlapping no held range, queues behind it.
        let later = tokio::time::timeout(Duration::from_millis(50), r.lock(8192, 4096)).await;
        assert!(later.is_err(), "a later request overtook the waiting chunk");
        // A disjoint request is not held up.
        let disjoint = tokio::time::timeout(Duration::from_millis(50), r.lock(2 << 20, 4096));
        drop(disjoint.await.unwrap());
        drop(write);
        // The chunk goes first, then the later write.
        let later = tokio::time::timeout(Duration::from_secs(5), r.lock(8192, 4096)).await;
        assert!(
            chunk_done.load(Ordering::SeqCst),
            "the later write went before the chunk"
        );
        drop(later.unwrap());
        chunk.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_that_stops_waiting_holds_nobody_up() {
        let r = Ranges::default();
        let write = r.lock(0, 4096).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), r.lock(0, 1 << 20)).await;
        assert!(gave_up.is_err());
        // Its queue place went with it.
        drop(
            tokio::time::timeout(Duration::from_millis(50), r.lock(8192, 4096))
                .await
                .unwrap(),
        );
        drop(write);
        assert_eq!(r.in_flight(), 0);
    }
}
