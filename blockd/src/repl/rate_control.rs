//! The resync rate controller, free of I/O and clocks (the caller passes `now`): how many resync
//! bytes a worker may issue, in the spirit of DRBD's dynamic resync controller.
//!
//! - `max_rate` (`resync-rate`, DRBD's c-max-rate) is never exceeded.
//! - With `plan_ahead` and `fill_target` set (DRBD's c-plan-ahead, c-fill-target), the controller
//!   aims to keep `fill_target` bytes in flight: every tick it spreads the correction
//!   (target - in flight - already planned) over the ticks of the planning horizon and issues
//!   what completed since the last tick plus this tick's share. It follows the link and the
//!   peer's disk without a configured rate: a slow peer completes less, so less is issued.
//!   With either at zero, the resync runs at `max_rate`.
//! - Application I/O comes first (DRBD's c-min-rate): while the application moved more than
//!   `app_idle_bytes` in the last tick, the resync is held at `min_rate`. It never stops
//!   entirely unless `min_rate` is zero, and it takes the whole budget back as soon as the
//!   application is idle, so spare bandwidth is never left unused.
//!
//! Usage: call [`RateController::tick`] every [`TICK`] with what was observed, and
//! [`RateController::try_issue`] before each request; when it refuses, wait for the next tick.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often the worker should call [`RateController::tick`].
pub const TICK: Duration = Duration::from_millis(100);

/// The controller's settings (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateSettings {
    /// Bytes per second, never exceeded (`resync-rate`).
    pub max_rate: u64,
    /// Bytes per second the resync keeps while the application is busy (`c-min-rate`).
    pub min_rate: u64,
    /// Bytes in flight the dynamic controller aims for (`c-fill-target`; 0: fixed rate).
    pub fill_target: u64,
    /// Planning horizon of the dynamic controller (`c-plan-ahead`; zero: fixed rate).
    pub plan_ahead: Duration,
    /// Application bytes per tick below which the application counts as idle.
    pub app_idle_bytes: u64,
}

impl RateSettings {
    /// A fixed rate (no dynamic control, no application back-off).
    pub fn fixed(max_rate: u64) -> RateSettings {
        RateSettings {
            max_rate,
            min_rate: max_rate,
            fill_target: 0,
            plan_ahead: Duration::ZERO,
            app_idle_bytes: u64::MAX,
        }
    }

    fn dynamic(&self) -> bool {
        self.fill_target > 0 && self.plan_ahead >= TICK
    }
}

/// What the worker observed since the previous tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Resync bytes the peer acknowledged since the previous tick.
    pub acked: u64,
    /// Resync bytes issued and not acknowledged yet.
    pub in_flight: u64,
    /// Application bytes (reads and writes) since the previous tick.
    pub app_bytes: u64,
}

/// What one tick decided (for status and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickDecision {
    /// Bytes added to the issue budget by this tick.
    pub budget: u64,
    /// The application was busy: the resync was held at `min_rate`.
    pub throttled: bool,
}

/// The controller state of one resync.
#[derive(Debug)]
pub struct RateController {
    s: RateSettings,
    last: Instant,
    /// Bytes that may still be issued (may go below zero by less than one request).
    credit: i64,
    /// The plan: extra bytes to issue in each coming tick.
    plan: VecDeque<i64>,
    plan_total: i64,
    /// The fraction of a byte of the cap not granted yet: a rate below 10 B/s is less than a
    /// byte per tick, and would otherwise never grant anything.
    cap_frac: f64,
    last_decision: TickDecision,
}

fn per_dt(rate: u64, dt: Duration) -> i64 {
    (rate as f64 * dt.as_secs_f64()).min(i64::MAX as f64 / 4.0) as i64
}

impl RateController {
    pub fn new(s: RateSettings, now: Instant) -> RateController {
        let steps = if s.dynamic() {
            (s.plan_ahead.as_millis() / TICK.as_millis()).max(1) as usize
        } else {
            1
        };
        let mut c = RateController {
            s,
            last: now,
            credit: 0,
            plan: VecDeque::from(vec![0; steps]),
            plan_total: 0,
            cap_frac: 0.0,
            last_decision: TickDecision {
                budget: 0,
                throttled: false,
            },
        };
        // The start: the dynamic controller fills its target at once (DRBD starts from an
        // empty pipe the same way), a fixed rate gets one tick's worth. No more, so a busy
        // application is not hit by a burst before the first tick sees it.
        c.credit = if s.dynamic() {
            s.fill_target
                .min(per_dt(s.max_rate, TICK).max(1) as u64 * 10) as i64
        } else {
            per_dt(s.max_rate, TICK)
        }
        .max(1);
        c
    }

    pub fn settings(&self) -> &RateSettings {
        &self.s
    }

    fn cap_rate(&self, throttled: bool) -> u64 {
        if throttled {
            self.s.min_rate.min(self.s.max_rate)
        } else {
            self.s.max_rate
        }
    }

    /// Feeds what happened since the previous tick; adds this tick's budget.
    pub fn tick(&mut self, now: Instant, seen: Observed) -> TickDecision {
        let dt = now
            .saturating_duration_since(self.last)
            .clamp(Duration::from_millis(1), Duration::from_secs(1));
        self.last = now;
        let throttled = seen.app_bytes > self.s.app_idle_bytes;
        let cap = self.cap(throttled, dt);
        let mut want = if self.s.dynamic() {
            self.plan_step(dt, seen)
        } else {
            cap
        };
        if want <= 0 && seen.in_flight == 0 {
            // Nothing in flight: the link is idle, so the whole cap is spare bandwidth.
            want = cap;
        }
        let budget = want.clamp(0, cap);
        // Unused credit does not pile up into a burst: at most one tick's cap is carried. Debt
        // (a request larger than the credit) is paid back by later ticks.
        self.credit = (self.credit + budget).min(cap.max(1));
        self.last_decision = TickDecision {
            budget: budget as u64,
            throttled,
        };
        self.last_decision
    }

    /// This tick's cap in whole bytes; the fraction left over is carried to the next tick, so
    /// any rate above zero grants bytes at that rate on average (also below 10 B/s).
    fn cap(&mut self, throttled: bool, dt: Duration) -> i64 {
        const LIMIT: f64 = i64::MAX as f64 / 4.0;
        let exact = self.cap_rate(throttled) as f64 * dt.as_secs_f64() + self.cap_frac;
        if exact >= LIMIT {
            self.cap_frac = 0.0;
            return LIMIT as i64;
        }
        let whole = exact.floor();
        self.cap_frac = exact - whole;
        whole as i64
    }

    /// DRBD's fill-target controller (drbd_rs_controller): the bytes to issue this tick.
    fn plan_step(&mut self, dt: Duration, seen: Observed) -> i64 {
        let steps = self.plan.len() as i64;
        let in_flight = seen.in_flight as i64;
        let want = if seen.in_flight == 0 && seen.acked == 0 {
            // Nothing moving (start, or the link stalled): plan the maximum over the horizon.
            per_dt(self.s.max_rate, dt) * steps
        } else {
            self.s.fill_target as i64
        };
        let correction = want - in_flight - self.plan_total;
        let per_step = correction / steps;
        for p in self.plan.iter_mut() {
            *p += per_step;
        }
        self.plan_total += per_step * steps;
        let now_step = self.plan.pop_front().unwrap_or(0);
        self.plan.push_back(0);
        self.plan_total -= now_step;
        (seen.acked as i64 + now_step).max(0)
    }

    /// Spends budget for a request of `len` bytes; `false`: wait for the next tick. A request
    /// is allowed while any budget is left (the budget then goes below zero by less than the
    /// request), so requests larger than one tick's budget still go out.
    pub fn try_issue(&mut self, len: u64) -> bool {
        if self.credit <= 0 {
            return false;
        }
        self.credit -= len.min(i64::MAX as u64) as i64;
        true
    }

    /// The last tick's decision.
    pub fn last_decision(&self) -> TickDecision {
        self.last_decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn dynamic(max_rate: u64, min_rate: u64) -> RateSettings {
        RateSettings {
            max_rate,
            min_rate,
            fill_target: 8 * MIB,
            plan_ahead: Duration::from_secs(2),
            app_idle_bytes: 64 << 10,
        }
    }

    /// Simulates `secs` seconds: a link and peer disk completing up to `service_rate` bytes per
    /// second of what was issued (FIFO), requests of `chunk` bytes, and `app(t)` application
    /// bytes per tick. Returns the bytes issued per second over the run and the most in flight.
    fn simulate(
        s: RateSettings,
        secs: u64,
        chunk: u64,
        service_rate: u64,
        app: impl Fn(u64) -> u64,
    ) -> (f64, u64, Vec<TickDecision>) {
        let t0 = Instant::now();
        let mut c = RateController::new(s, t0);
        let mut in_flight = 0u64;
        let mut issued = 0u64;
        let mut max_in_flight = 0;
        let mut decisions = Vec::new();
        let ticks = secs * 10;
        for k in 1..=ticks {
            while c.try_issue(chunk) {
                in_flight += chunk;
                issued += chunk;
            }
            max_in_flight = max_in_flight.max(in_flight);
            // The peer completes what it can during this tick.
            let served = (service_rate / 10).min(in_flight);
            in_flight -= served;
            decisions.push(c.tick(
                t0 + TICK * k as u32,
                Observed {
                    acked: served,
                    in_flight,
                    app_bytes: app(k),
                },
            ));
        }
        (issued as f64 / secs as f64, max_in_flight, decisions)
    }

    #[test]
    fn fixed_rate_issues_the_configured_rate() {
        let (rate, _, d) = simulate(RateSettings::fixed(50 * MIB), 10, MIB, u64::MAX, |_| 0);
        let want = 50.0 * MIB as f64;
        assert!((rate - want).abs() < 0.1 * want, "{rate} vs {want}");
        assert!(d.iter().all(|d| !d.throttled));
    }

    #[test]
    fn max_rate_is_never_exceeded() {
        // A fast peer: the fill-target controller would go faster, the cap holds it.
        let (rate, _, _) = simulate(dynamic(20 * MIB, MIB), 10, MIB, 10_000 * MIB, |_| 0);
        assert!(rate <= 20.0 * MIB as f64 * 1.06, "{rate}");
        assert!(rate >= 20.0 * MIB as f64 * 0.9, "{rate}");
    }

    #[test]
    fn idle_resync_uses_the_spare_bandwidth_of_a_slow_peer_without_flooding_it() {
        // The peer completes 30 MiB/s; the cap is far above: the resync runs at the peer's
        // speed and the bytes in flight settle near the fill target instead of growing.
        let (rate, max_in_flight, _) = simulate(dynamic(1000 * MIB, MIB), 20, MIB, 30 * MIB, |_| 0);
        assert!(rate >= 0.9 * 30.0 * MIB as f64, "{rate}");
        assert!(rate <= 1.2 * 30.0 * MIB as f64, "{rate}");
        // Start-up plans the maximum over the horizon; afterwards it converges to the target.
        assert!(max_in_flight < 300 * MIB, "{max_in_flight}");
    }

    #[test]
    fn in_flight_converges_to_the_fill_target() {
        let t0 = Instant::now();
        let s = dynamic(1000 * MIB, MIB);
        let mut c = RateController::new(s, t0);
        let mut in_flight = 0u64;
        let service = 40 * MIB / 10;
        let mut last = Vec::new();
        for k in 1..=400u32 {
            while c.try_issue(MIB) {
                in_flight += MIB;
            }
            let served = service.min(in_flight);
            in_flight -= served;
            c.tick(
                t0 + TICK * k,
                Observed {
                    acked: served,
                    in_flight,
                    app_bytes: 0,
                },
            );
            if k > 300 {
                last.push(in_flight);
            }
        }
        let avg = last.iter().sum::<u64>() / last.len() as u64;
        assert!(
            avg <= 2 * s.fill_target && avg + 2 * MIB >= s.fill_target / 2,
            "average in flight {avg}"
        );
    }

    #[test]
    fn busy_application_holds_the_resync_at_the_minimum_rate() {
        // Application busy for the first 5 s, idle for the next 5 s.
        let busy = |k: u64| if k <= 50 { 4 * MIB } else { 0 };
        let (_, _, d) = simulate(dynamic(100 * MIB, 2 * MIB), 10, 256 << 10, u64::MAX, busy);
        let busy_budget: u64 = d[..50].iter().map(|d| d.budget).sum();
        let idle_budget: u64 = d[51..].iter().map(|d| d.budget).sum();
        assert!(d[..50].iter().all(|d| d.throttled));
        assert!(d[51..].iter().all(|d| !d.throttled));
        // 5 s at 2 MiB/s, 5 s close to 100 MiB/s.
        assert!(busy_budget <= 10 * MIB + MIB, "{busy_budget}");
        assert!(busy_budget >= 8 * MIB, "never starved: {busy_budget}");
        assert!(
            idle_budget >= 300 * MIB,
            "spare bandwidth used: {idle_budget}"
        );
    }

    #[test]
    fn busy_application_limits_what_is_issued_not_only_the_budget() {
        // A fast link and a high cap: while the application is busy, requests actually issued
        // stay near c-min-rate (the start-up credit is one throttled tick at most).
        let (rate, _, d) = simulate(dynamic(1 << 30, 4 * MIB), 10, MIB, u64::MAX, |_| MIB);
        assert!(d.iter().all(|d| d.throttled));
        assert!(rate <= 6.0 * MIB as f64, "{rate}");
        assert!(rate >= 3.0 * MIB as f64, "{rate}");
    }

    #[test]
    fn small_application_activity_does_not_throttle() {
        let (rate, _, d) = simulate(dynamic(50 * MIB, MIB), 5, MIB, u64::MAX, |_| 4096);
        assert!(d.iter().all(|d| !d.throttled));
        assert!(rate >= 0.9 * 50.0 * MIB as f64, "{rate}");
    }

    #[test]
    fn a_request_larger_than_a_tick_still_goes_out() {
        // 1 MiB/s, 4 MiB requests: one request every 4 s, never stuck.
        let (rate, _, _) = simulate(RateSettings::fixed(MIB), 40, 4 * MIB, u64::MAX, |_| 0);
        assert!(rate > 0.7 * MIB as f64 && rate < 1.4 * MIB as f64, "{rate}");
    }

    #[test]
    fn zero_minimum_pauses_while_busy_and_resumes_when_idle() {
        let busy = |k: u64| if k <= 20 { MIB } else { 0 };
        let (_, _, d) = simulate(dynamic(100 * MIB, 0), 4, MIB, u64::MAX, busy);
        assert!(d[..20].iter().all(|d| d.budget == 0 && d.throttled));
        assert!(d[21..].iter().any(|d| d.budget > 0));
    }

    #[test]
    fn rates_below_a_byte_per_tick_still_progress() {
        // Before: 1-9 B/s is 0 bytes per 100 ms tick, and the resync never issued anything.
        for rate in [1, 5, 9, 15, 25] {
            let (got, _, _) = simulate(RateSettings::fixed(rate), 100, 1, u64::MAX, |_| 0);
            let want = rate as f64;
            assert!(
                (got - want).abs() <= 0.05 * want + 0.02,
                "{rate} B/s: {got}"
            );
        }
        // The same for c-min-rate while the application is busy.
        // (Counted from the ticks' budgets: the dynamic start-up credit is not paced.)
        let (_, _, d) = simulate(dynamic(100 * MIB, 5), 100, 1, u64::MAX, |_| MIB);
        assert!(d.iter().all(|d| d.throttled));
        let granted: u64 = d.iter().map(|d| d.budget).sum();
        assert!(granted.abs_diff(500) <= 5, "{granted}");
        // A real request (4 KiB) at 5 B/s goes out too, then its debt is paid at that rate.
        let (got, _, _) = simulate(RateSettings::fixed(5), 3000, 4096, u64::MAX, |_| 0);
        assert!(got > 0.0 && got <= 2.0 * 5.0, "{got}");
    }

    #[test]
    fn ticks_far_apart_do_not_burst() {
        let t0 = Instant::now();
        let mut c = RateController::new(RateSettings::fixed(10 * MIB), t0);
        let d = c.tick(t0 + Duration::from_secs(60), Observed::default());
        // At most one second's worth after a long pause.
        assert!(d.budget <= 10 * MIB, "{d:?}");
        let mut n = 0;
        while c.try_issue(MIB) {
            n += 1;
        }
        assert!(n <= 10, "{n}");
    }
}
