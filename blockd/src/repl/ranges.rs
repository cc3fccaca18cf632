//! Byte ranges in flight on the Primary (application writes and resync reads): a new request
//! that overlaps one in flight waits for it. This keeps overlapping writes in the same order on
//! every copy, and keeps a resync read from sending a block older than a write in flight.

use std::sync::Mutex;

use tokio::sync::Notify;

/// The in-flight set (a short vector: at most queue depth + resync window entries).
#[derive(Default)]
pub struct Ranges {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
    released: Notify,
}

/// Holds a range until dropped.
pub struct RangeGuard<'a> {
    ranges: &'a Ranges,
    id: u64,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Ranges {
    /// Waits until `[offset, offset + len)` overlaps nothing in flight, then holds it.
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let want = (offset, offset.saturating_add(len.max(1)));
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().expect("ranges lock");
                if !held.iter().any(|&(s, e, _)| overlaps((s, e), want)) {
                    let id = self
                        .next_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    held.push((want.0, want.1, id));
                    return RangeGuard { ranges: self, id };
                }
            }
            notified.await;
        }
    }

    /// Ranges in flight now.
    pub fn in_flight(&self) -> usize {
        self.held.lock().expect("ranges lock").len()
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
        let mut held = self.ranges.held.lock().expect("ranges lock");
        if let Some(i) = held.iter().position(|r| r.2 == self.id) {
            held.swap_remove(i);
        }
        drop(held);
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
}
