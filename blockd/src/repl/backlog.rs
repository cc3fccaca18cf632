//! The receive backlog of a session (DRBD's `max-buffers`): the bytes of the peer's replicated
//! requests received and not yet applied (running on the disk or waiting for earlier ones) are
//! bounded. Under protocols A and B the Primary acknowledges its client before this node wrote
//! the data, so without a bound a client faster than this node's disk grows its memory without
//! limit. Above the bound the receive loop stops reading the link and only waits for its
//! requests to complete: TCP back-pressure fills the Primary's send buffer and its writes wait.
//!
//! A running request may itself wait for something behind the unread bytes: a peer write whose
//! activity-log extent waits for room that only the peer's acknowledgements of this node's
//! earlier writes free (a former Primary under protocol A/B, demoted with writes unacknowledged,
//! receives writes from the new Primary on the same session). Not reading then waits forever.
//! The session therefore counts only requests that can complete without reading the link as
//! running: one parked waiting for activity-log room is not (`Resource::al_room_waiters`). As a
//! safety net for dependencies not known here, a pause is a stall once no running request
//! completed for [`STALL_LIMIT`]: the loop reads on past the bound, up to twice the bound
//! (never further: a disk merely slow, e.g. an activity-log preflush of a large page cache,
//! must not lift the bound), until a running request completes again.
//! Pure bookkeeping with the clock passed in; the session (`repl::peer`) does the reading and
//! waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Receive backlog per session, at most (before the request that crosses it). Four times DRBD's
/// default `max-buffers` (2048 pages, 8 MiB), as one request here may carry 64 MiB where DRBD
/// splits into pages; twice the default `sndbuf-size`, so under protocol A with the defaults
/// the Primary's own bound (`repl::congestion`, a superset of this backlog) governs. Applying
/// it takes under a second on a disk of 100 MB/s, far within `FINISH_APPLIES_LIMIT`.
pub const RECEIVE_BACKLOG_MAX: u64 = 32 << 20;

/// What a request counts for besides the payload it holds: a zeroing or a flush holds no
/// payload but still a request's bookkeeping, and a flood of them must be bounded too (as if
/// every request held at least one page, at 4 KiB).
pub const REQUEST_OVERHEAD: u64 = 4096;

/// A pause in which no running request completed for this long is a stall: the loop reads past
/// the bound (a running request may wait for what is behind the unread bytes). Far above one
/// request's disk time (a 64 MiB write at 100 MB/s is 0.64 s), far below the keepalive timeout.
pub const STALL_LIMIT: Duration = Duration::from_secs(1);

/// A pause at twice the bound after a stall in which no running request completed for this
/// long ends the session (`Step::Stuck`): the loop reads nothing then, so it would not even
/// notice a lost peer; the session's end applies or gives up on what it received
/// (`Session::end_applies`), as for a hung disk. Long, because a disk that works can take
/// tens of seconds for one request: an `fdatasync` (a replicated `Flush`, the one before an
/// evicting activity-log transaction) writes back every dirty page of the backing, several GB
/// at 50-150 MB/s; ending the session then would make the link flap at every large writeback.
pub const STUCK_LIMIT: Duration = Duration::from_secs(120);

/// What the receive loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read from the link.
    Read,
    /// Read again after a pause: the silence of the pause was ours, not the peer's (its
    /// frames waited in the socket), so the keepalive clock starts anew.
    Resume,
    /// Do not read: wait for a running request to complete, or until
    /// [`Backlog::stall_deadline`].
    Pause,
    /// Read again, past the bound: the pause stalled (no running request completed for
    /// [`STALL_LIMIT`]). Returned once per stall (to log it); [`Step::Read`] follows, up to
    /// twice the bound, until a running request completes.
    Stalled,
    /// End the session: paused at twice the bound after a stall, with no running request
    /// completed for [`STUCK_LIMIT`].
    Stuck,
}

/// Requests received and not yet applied, with what each counts for.
#[derive(Debug)]
pub struct Backlog {
    limit: u64,
    bytes: u64,
    costs: HashMap<u64, u64>,
    /// While paused: since when no running request completed (the pause's start, or the last
    /// completion during it).
    paused: Option<Instant>,
    /// The pause stalled: until a running request completes the bound is twice the limit, and
    /// a pause at it waits for a completion only (no second stall; [`STUCK_LIMIT`] at most).
    stalled: bool,
}

impl Backlog {
    /// An empty backlog bounded by `limit` bytes.
    pub fn new(limit: u64) -> Backlog {
        Backlog {
            limit,
            bytes: 0,
            costs: HashMap::new(),
            paused: None,
            stalled: false,
        }
    }

    /// Request `seq` arrived, counting for `cost` bytes until [`Backlog::applied`].
    pub fn arrived(&mut self, seq: u64, cost: u64) {
        if let Some(old) = self.costs.insert(seq, cost) {
            self.bytes -= old;
        }
        self.bytes += cost;
    }

    /// Request `seq` was applied (an unknown `seq` is ignored).
    pub fn applied(&mut self, seq: u64) {
        if let Some(cost) = self.costs.remove(&seq) {
            self.bytes -= cost;
        }
    }

    /// A running request (one the loop waits for) completed at `now`: the loop is not stalled.
    pub fn completed(&mut self, now: Instant) {
        self.stalled = false;
        if let Some(since) = &mut self.paused {
            *since = now;
        }
    }

    /// While paused, when the pause becomes a stall if no running request completes (in a
    /// pause at twice the bound after a stall: when it is stuck).
    pub fn stall_deadline(&self) -> Option<Instant> {
        let limit = match self.stalled {
            true => STUCK_LIMIT,
            false => STALL_LIMIT,
        };
        self.paused.map(|since| since + limit)
    }

    /// Bytes received and not applied.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the loop may read at `now`, with `completion_pending` telling whether a request
    /// is running (and may complete, bringing the backlog down) while it waits. It pauses only
    /// at or above the limit and only then: below it, a request of any size is read (one larger
    /// than the limit goes alone); with nothing to wait for it reads whatever the backlog; and
    /// a pause in which nothing completed for [`STALL_LIMIT`] reads on, up to twice the limit,
    /// until a running request completes ([`Backlog::completed`]).
    pub fn step(&mut self, completion_pending: bool, now: Instant) -> Step {
        if !completion_pending {
            self.stalled = false;
        }
        let bound = match self.stalled {
            true => self.limit.saturating_mul(2),
            false => self.limit,
        };
        if self.bytes >= bound && completion_pending {
            let since = *self.paused.get_or_insert(now);
            if self.stalled {
                return match now.duration_since(since) < STUCK_LIMIT {
                    true => Step::Pause,
                    false => Step::Stuck,
                };
            }
            if now.duration_since(since) < STALL_LIMIT {
                return Step::Pause;
            }
            self.paused = None;
            self.stalled = true;
            return Step::Stalled;
        }
        match self.paused.take() {
            Some(_) => Step::Resume,
            None => Step::Read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_below_the_limit_and_pauses_at_it_while_a_request_runs() {
        let t0 = Instant::now();
        let mut b = Backlog::new(100);
        b.arrived(1, 60);
        assert_eq!(b.step(true, t0), Step::Read);
        b.arrived(2, 40);
        assert_eq!(b.bytes(), 100);
        assert_eq!(b.step(true, t0), Step::Pause);
        assert_eq!(b.step(true, t0), Step::Pause);
        b.applied(1);
        b.completed(t0);
        assert_eq!(b.bytes(), 40);
        assert_eq!(
            b.step(true, t0),
            Step::Resume,
            "the pause's silence was ours"
        );
        assert_eq!(b.step(true, t0), Step::Read);
        b.applied(2);
        b.applied(2);
        b.applied(7);
        assert_eq!(
            b.bytes(),
            0,
            "unknown or repeated completions change nothing"
        );
    }

    #[test]
    fn never_pauses_without_a_completion_to_wait_for() {
        let t0 = Instant::now();
        let mut b = Backlog::new(100);
        // A request larger than the limit is admitted (below the limit before it).
        assert_eq!(b.step(true, t0), Step::Read);
        b.arrived(1, 64 << 20);
        assert_eq!(b.step(true, t0), Step::Pause);
        // Nothing running would bring it down: reading is the only way on.
        assert_eq!(b.step(false, t0), Step::Resume);
        assert_eq!(b.step(false, t0), Step::Read);
    }

    #[test]
    fn a_pause_without_completions_stalls_and_reads_past_the_bound_until_one() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Backlog::new(100);
        b.arrived(1, 100);
        assert_eq!(b.step(true, t0), Step::Pause);
        assert_eq!(b.stall_deadline(), Some(t0 + STALL_LIMIT));
        assert_eq!(b.step(true, t0 + STALL_LIMIT - ms(1)), Step::Pause);
        // Request 1 waits for something behind the unread bytes: read on, past the bound.
        assert_eq!(b.step(true, t0 + STALL_LIMIT), Step::Stalled);
        assert_eq!(b.stall_deadline(), None);
        b.arrived(2, 50);
        assert_eq!(
            b.step(true, t0 + 10 * STALL_LIMIT),
            Step::Read,
            "past the bound, up to twice it"
        );
        b.arrived(3, 50);
        assert_eq!(
            b.step(true, t0 + 10 * STALL_LIMIT),
            Step::Pause,
            "at twice the bound a stalled loop waits for a completion only"
        );
        let t_pause = t0 + 10 * STALL_LIMIT;
        assert_eq!(b.stall_deadline(), Some(t_pause + STUCK_LIMIT));
        assert_eq!(
            b.step(true, t_pause + STUCK_LIMIT - ms(1)),
            Step::Pause,
            "no second stall"
        );
        assert_eq!(b.step(true, t_pause + STUCK_LIMIT), Step::Stuck);
        // One completes: the bound applies again, a new pause with its own clock.
        let t1 = t0 + 100 * STALL_LIMIT;
        b.applied(1);
        b.completed(t1);
        assert_eq!(b.bytes(), 100);
        assert_eq!(b.step(true, t1), Step::Pause);
        assert_eq!(b.stall_deadline(), Some(t1 + STALL_LIMIT));
        assert_eq!(
            b.step(true, t1 + STALL_LIMIT),
            Step::Stalled,
            "once per stall"
        );
        assert_eq!(b.step(true, t1 + STALL_LIMIT), Step::Read);
    }

    #[test]
    fn completions_during_a_pause_keep_it_from_stalling() {
        let t0 = Instant::now();
        let mut b = Backlog::new(100);
        for seq in 1..=4 {
            b.arrived(seq, 100);
        }
        assert_eq!(b.step(true, t0), Step::Pause);
        // A slow disk: a completion every 0.9 limits, the backlog still above the bound.
        let mut now = t0;
        for seq in 1..=2 {
            now += STALL_LIMIT * 9 / 10;
            b.applied(seq);
            b.completed(now);
            assert_eq!(b.step(true, now), Step::Pause);
            assert_eq!(b.stall_deadline(), Some(now + STALL_LIMIT));
        }
        assert_eq!(b.step(true, now + STALL_LIMIT / 2), Step::Pause);
        // Nothing running any more: no stall, reading is the only way on.
        assert_eq!(b.step(false, now + STALL_LIMIT / 2), Step::Resume);
    }

    #[test]
    fn the_same_request_counted_twice_counts_once() {
        let mut b = Backlog::new(100);
        b.arrived(1, 30);
        b.arrived(1, 50);
        assert_eq!(b.bytes(), 50);
    }

    #[test]
    fn the_default_bound_admits_the_largest_request() {
        // A 64 MiB write (the largest frame) is read whenever the backlog is below the bound.
        let t0 = Instant::now();
        let mut b = Backlog::new(RECEIVE_BACKLOG_MAX);
        b.arrived(1, RECEIVE_BACKLOG_MAX - 1);
        assert_eq!(b.step(true, t0), Step::Read);
        b.arrived(2, (64 << 20) + REQUEST_OVERHEAD);
        assert_eq!(b.step(true, t0), Step::Pause);
        b.applied(1);
        assert_eq!(
            b.step(true, t0),
            Step::Pause,
            "the large request still runs"
        );
        b.applied(2);
        assert_eq!(b.step(true, t0), Step::Resume);
    }
}
