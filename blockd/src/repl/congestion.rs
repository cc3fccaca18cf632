//! Congestion of an asynchronous peer (`sndbuf-size`, DRBD's `on-congestion = block`): the
//! bytes of replicated writes queued or sent to a peer and not yet acknowledged by it are
//! bounded. Under protocol A a write is acknowledged once queued, so without a bound a client
//! writing faster than the link grows the Primary's memory without limit; with it, a write that
//! does not fit waits (in arrival order) until the peer's acknowledgements make room: the
//! client is slowed to the link's speed, nothing is dropped. Pure bookkeeping, kept by the
//! session (`repl::peer::Conn`) under its lock; the waiting is done by the write path.

use std::collections::VecDeque;

/// Default `sndbuf-size`: 16 MiB per peer.
pub const DEFAULT_SNDBUF_SIZE: u64 = 16 << 20;
/// The smallest `sndbuf-size` accepted.
pub const MIN_SNDBUF_SIZE: u64 = 1 << 20;

/// Whether a write of `len` bytes may be queued to a peer that has `queued` bytes queued or
/// unacknowledged, with `limit` the most it may have: when it fits, or when nothing is queued
/// (a request larger than the limit goes alone, so nothing can wait forever).
pub fn may_queue(queued: u64, limit: u64, len: u64) -> bool {
    queued == 0 || queued.saturating_add(len) <= limit
}

/// A change of a peer's congestion, to be reported (one event per change, not per write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A write had to wait for room.
    Congested,
    /// No write waits and at most half of the limit is used again.
    Uncongested,
}

/// The answer to a write asking for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Reserved: queue it.
    Go,
    /// Wait for room with this ticket (writes go in the order they asked).
    Wait(u64),
}

/// The send buffer of one session: bytes in the pending map (`queued`), bytes admitted and
/// about to be queued (`reserved`), and the writes waiting for room, oldest first.
#[derive(Debug)]
pub struct SendBuffer {
    limit: u64,
    queued: u64,
    reserved: u64,
    waiting: VecDeque<u64>,
    next_ticket: u64,
    congested: bool,
    waited: u64,
}

impl Default for SendBuffer {
    fn default() -> SendBuffer {
        SendBuffer::new(DEFAULT_SNDBUF_SIZE)
    }
}

impl SendBuffer {
    pub fn new(limit: u64) -> SendBuffer {
        SendBuffer {
            limit,
            queued: 0,
            reserved: 0,
            waiting: VecDeque::new(),
            next_ticket: 0,
            congested: false,
            waited: 0,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes of the writes queued or sent and not yet acknowledged.
    pub fn queued(&self) -> u64 {
        self.queued
    }

    /// What counts against the limit: queued plus admitted bytes.
    pub fn used(&self) -> u64 {
        self.queued + self.reserved
    }

    pub fn congested(&self) -> bool {
        self.congested
    }

    /// Writes that had to wait for room, since the session started.
    pub fn waited_writes(&self) -> u64 {
        self.waited
    }

    /// A write of `len` bytes asks for room: it goes when nobody waits before it and it fits;
    /// else it gets a ticket (and the peer is congested).
    pub fn request(&mut self, len: u64) -> (Admission, Option<Change>) {
        if self.waiting.is_empty() && may_queue(self.used(), self.limit, len) {
            self.reserved += len;
            return (Admission::Go, None);
        }
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.push_back(t);
        self.waited += 1;
        let change = (!self.congested).then_some(Change::Congested);
        self.congested = true;
        (Admission::Wait(t), change)
    }

    /// A waiting write asks again: it goes when it is the oldest and fits.
    pub fn retry(&mut self, ticket: u64, len: u64) -> bool {
        if self.waiting.front() == Some(&ticket) && may_queue(self.used(), self.limit, len) {
            self.waiting.pop_front();
            self.reserved += len;
            return true;
        }
        false
    }

    /// A waiting write gave up (its session closed, or its request was dropped).
    pub fn cancel(&mut self, ticket: u64) -> Option<Change> {
        self.waiting.retain(|&t| t != ticket);
        self.settle()
    }

    /// An admitted write is queued now (`reserved`: it had room reserved by [`Self::request`]
    /// or [`Self::retry`]; else it is counted without asking: protocols B and C, whose writes
    /// wait for the peer anyway, or a request queued again).
    pub fn queue(&mut self, len: u64, reserved: bool) {
        if reserved {
            self.reserved = self.reserved.saturating_sub(len);
        }
        self.queued += len;
    }

    /// An admitted write will not be queued on this session after all.
    pub fn unreserve(&mut self, len: u64) -> Option<Change> {
        self.reserved = self.reserved.saturating_sub(len);
        self.settle()
    }

    /// The peer acknowledged `len` bytes of queued writes.
    pub fn acked(&mut self, len: u64) -> Option<Change> {
        self.queued = self.queued.saturating_sub(len);
        self.settle()
    }

    /// Congested until no write waits and at most half of the limit is used (so a link
    /// running at its limit does not flap).
    fn settle(&mut self) -> Option<Change> {
        if self.congested && self.waiting.is_empty() && self.used() <= self.limit / 2 {
            self.congested = false;
            return Some(Change::Uncongested);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn a_write_goes_when_it_fits_or_nothing_is_queued() {
        assert!(may_queue(0, 4 * M, 4096));
        assert!(may_queue(4 * M - 4096, 4 * M, 4096));
        assert!(!may_queue(4 * M - 4095, 4 * M, 4096));
        assert!(!may_queue(4 * M, 4 * M, 1));
        // Larger than the limit: only alone.
        assert!(may_queue(0, 4 * M, 32 * M));
        assert!(!may_queue(1, 4 * M, 32 * M));
        // No overflow.
        assert!(!may_queue(u64::MAX, 4 * M, u64::MAX));
        assert!(may_queue(0, 4 * M, u64::MAX));
    }

    #[test]
    fn writes_wait_in_order_and_acks_make_room() {
        let mut b = SendBuffer::new(4 * M);
        assert_eq!(b.request(3 * M), (Admission::Go, None));
        b.queue(3 * M, true);
        // 2 MiB does not fit: it waits, the peer is congested (reported once).
        assert_eq!(
            b.request(2 * M),
            (Admission::Wait(0), Some(Change::Congested))
        );
        // A small write that would fit does not overtake it.
        assert_eq!(b.request(4096), (Admission::Wait(1), None));
        assert!(!b.retry(1, 4096));
        assert!(!b.retry(0, 2 * M));
        assert_eq!(b.acked(M), None);
        assert!(!b.retry(1, 4096), "not the oldest");
        assert!(b.retry(0, 2 * M));
        // Room is reserved until queued; the limit holds for queued plus reserved.
        assert_eq!((b.queued(), b.used()), (2 * M, 4 * M));
        assert!(!b.retry(1, 4096), "full");
        b.queue(2 * M, true);
        assert_eq!((b.queued(), b.used()), (4 * M, 4 * M));
        assert_eq!(b.acked(M), None, "a write still waits");
        assert!(b.retry(1, 4096));
        b.queue(4096, true);
        assert_eq!(b.waited_writes(), 2);
        assert!(b.congested());
        // Uncongested once nobody waits and half the limit is free.
        assert_eq!(b.acked(M), None);
        assert_eq!(b.acked(4096), Some(Change::Uncongested));
        assert!(!b.congested());
        assert_eq!(b.acked(2 * M), None);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_request_larger_than_the_limit_goes_alone() {
        let mut b = SendBuffer::new(M);
        assert_eq!(b.request(4096), (Admission::Go, None));
        b.queue(4096, true);
        let (a, _) = b.request(8 * M);
        let Admission::Wait(t) = a else {
            panic!("{a:?}")
        };
        assert!(!b.retry(t, 8 * M));
        b.acked(4096);
        assert!(b.retry(t, 8 * M));
        b.queue(8 * M, true);
        assert_eq!(b.used(), 8 * M);
        // Nothing else goes until it is acknowledged.
        assert!(matches!(b.request(512).0, Admission::Wait(_)));
    }

    #[test]
    fn cancelled_and_unqueued_writes_give_their_place_back() {
        let mut b = SendBuffer::new(M);
        assert_eq!(b.request(M).0, Admission::Go);
        let Admission::Wait(t0) = b.request(4096).0 else {
            panic!()
        };
        let Admission::Wait(t1) = b.request(4096).0 else {
            panic!()
        };
        // The oldest is dropped: the next one is at the front.
        assert_eq!(b.cancel(t0), None);
        assert_eq!(b.unreserve(M), None, "a write still waits");
        assert!(b.retry(t1, 4096));
        b.queue(4096, true);
        assert_eq!(b.acked(4096), Some(Change::Uncongested));
        // Counted without asking (protocols B and C).
        b.queue(2 * M, false);
        assert_eq!(b.used(), 2 * M);
        assert!(matches!(b.request(1).0, Admission::Wait(_)));
    }
}
