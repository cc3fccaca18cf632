//! The changes an engine is still making to a store's file, counted per engine request: a
//! caller that goes away (its future dropped) leaves its write running in the engine, so
//! whoever needs the file quiet (a snapshot's freeze) waits for the count, not for callers.
//!
//! A [`WriteGuard`] is moved into the engine request it counts (the io_uring request, the
//! worker job or blocking task) and dropped when the engine is done with it. Changes made on
//! the caller's thread inside one poll (the inline path, [`BlockStore::write_blocking`]) cannot
//! be left half done by a dropped future and are not counted.
//!
//! [`BlockStore::write_blocking`]: super::BlockStore::write_blocking

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many changes the engine of one store is executing.
#[derive(Debug, Default)]
pub struct WritesInFlight {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One change counted in [`WritesInFlight`] until dropped.
#[derive(Debug)]
pub(crate) struct WriteGuard(Arc<WritesInFlight>);

impl WritesInFlight {
    /// Counts one more change until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> WriteGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        WriteGuard(self.clone())
    }

    /// Changes in flight now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until no change is in flight. Changes that start meanwhile are waited for too:
    /// the caller holds off new ones first (a freeze holds its gate).
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check: a guard dropped right after it still wakes us.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_every_guard() {
        let w = Arc::new(WritesInFlight::default());
        tokio::time::timeout(Duration::from_millis(10), w.idle())
            .await
            .expect("nothing in flight: idle at once");
        let (a, b) = (w.begin(), w.begin());
        assert_eq!(w.count(), 2);
        let w2 = w.clone();
        let waiting = tokio::spawn(async move { w2.idle().await });
        drop(a);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiting.is_finished(), "one change is still in flight");
        assert_eq!(w.count(), 1);
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the last guard is dropped")
            .unwrap();
        assert_eq!(w.count(), 0);
    }
}
