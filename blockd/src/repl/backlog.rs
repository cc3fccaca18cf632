//! The receive backlog of a session (DRBD's `max-buffers`): the bytes of the peer's replicated
//! requests received and not yet applied (running on the disk or waiting for earlier ones) are
//! bounded. Under protocols A and B the Primary acknowledges its client before this node wrote
//! the data, so without a bound a client faster than this node's disk grows its memory without
//! limit. Above the bound the receive loop stops reading the link and only waits for its
//! requests to complete: TCP back-pressure fills the Primary's send buffer and its writes wait.
//! Pure bookkeeping; the session (`repl::peer`) does the reading and waiting.

use std::collections::HashMap;

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

/// What the receive loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read from the link.
    Read,
    /// Read again after a pause: the silence of the pause was ours, not the peer's (its
    /// frames waited in the socket), so the keepalive clock starts anew.
    Resume,
    /// Do not read: wait for a running request to complete.
    Pause,
}

/// Requests received and not yet applied, with what each counts for.
#[derive(Debug)]
pub struct Backlog {
    limit: u64,
    bytes: u64,
    costs: HashMap<u64, u64>,
    paused: bool,
}

impl Backlog {
    /// An empty backlog bounded by `limit` bytes.
    pub fn new(limit: u64) -> Backlog {
        Backlog {
            limit,
            bytes: 0,
            costs: HashMap::new(),
            paused: false,
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

    /// Bytes received and not applied.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the loop may read, with `completion_pending` telling whether a running request
    /// will complete (and so bring the backlog down) while it waits. It pauses only at or
    /// above the limit and only then: below it, a request of any size is read (one larger than
    /// the limit goes alone), and with nothing to wait for it reads whatever the backlog, so it
    /// can never wait forever.
    pub fn step(&mut self, completion_pending: bool) -> Step {
        let pause = self.bytes >= self.limit && completion_pending;
        let was_paused = std::mem::replace(&mut self.paused, pause);
        match (pause, was_paused) {
            (true, _) => Step::Pause,
            (false, true) => Step::Resume,
            (false, false) => Step::Read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_below_the_limit_and_pauses_at_it_while_a_request_runs() {
        let mut b = Backlog::new(100);
        b.arrived(1, 60);
        assert_eq!(b.step(true), Step::Read);
        b.arrived(2, 40);
        assert_eq!(b.bytes(), 100);
        assert_eq!(b.step(true), Step::Pause);
        assert_eq!(b.step(true), Step::Pause);
        b.applied(1);
        assert_eq!(b.bytes(), 40);
        assert_eq!(b.step(true), Step::Resume, "the pause's silence was ours");
        assert_eq!(b.step(true), Step::Read);
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
        let mut b = Backlog::new(100);
        // A request larger than the limit is admitted (below the limit before it).
        assert_eq!(b.step(true), Step::Read);
        b.arrived(1, 64 << 20);
        assert_eq!(b.step(true), Step::Pause);
        // Nothing running would bring it down: reading is the only way on.
        assert_eq!(b.step(false), Step::Resume);
        assert_eq!(b.step(false), Step::Read);
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
        let mut b = Backlog::new(RECEIVE_BACKLOG_MAX);
        b.arrived(1, RECEIVE_BACKLOG_MAX - 1);
        assert_eq!(b.step(true), Step::Read);
        b.arrived(2, (64 << 20) + REQUEST_OVERHEAD);
        assert_eq!(b.step(true), Step::Pause);
        b.applied(1);
        assert_eq!(b.step(true), Step::Pause, "the large request still runs");
        b.applied(2);
        assert_eq!(b.step(true), Step::Resume);
    }
}
