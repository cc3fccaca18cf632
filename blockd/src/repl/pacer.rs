//! Runs a [`RateController`] for one resync or verify worker on the tokio clock: ticks it every
//! [`TICK`] with the worker's acknowledged and in-flight bytes and the resource's application
//! I/O, and makes the worker wait until the controller admits its next request.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use crate::repl::rate_control::{Observed, RateController, RateSettings, TICK};
use crate::repl::resource::Resource;

/// The pacing of one worker.
pub(crate) struct Pacer {
    ctl: RateController,
    res: Arc<Resource>,
    next_tick: Instant,
    acked_at_tick: u64,
    app_at_tick: u64,
}

impl Pacer {
    pub fn new(res: Arc<Resource>, settings: RateSettings) -> Pacer {
        let now = Instant::now();
        let app = res.app_io_bytes.load(Ordering::Relaxed);
        Pacer {
            ctl: RateController::new(settings, now.into_std()),
            res,
            next_tick: now + TICK,
            acked_at_tick: 0,
            app_at_tick: app,
        }
    }

    fn tick_if_due(&mut self, acked_total: u64, in_flight: u64) {
        let now = Instant::now();
        if now < self.next_tick {
            return;
        }
        let app = self.res.app_io_bytes.load(Ordering::Relaxed);
        let seen = Observed {
            acked: acked_total.saturating_sub(self.acked_at_tick),
            in_flight,
            app_bytes: app.saturating_sub(self.app_at_tick),
        };
        self.acked_at_tick = acked_total;
        self.app_at_tick = app;
        self.ctl.tick(now.into_std(), seen);
        self.next_tick = now + TICK;
    }

    /// Waits until a request of `len` bytes may be issued. `progress` returns the worker's
    /// acknowledged bytes so far and its bytes in flight. Cancel-safe: dropped while waiting,
    /// nothing was spent (a worker selects it against the answers it must keep handling).
    pub async fn admit(&mut self, len: u64, progress: impl Fn() -> (u64, u64)) {
        loop {
            let (acked, in_flight) = progress();
            self.tick_if_due(acked, in_flight);
            if self.ctl.try_issue(len) {
                return;
            }
            tokio::time::sleep_until(self.next_tick).await;
        }
    }
}
