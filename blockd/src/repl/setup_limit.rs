//! How many link setups (TLS and authentication, before the peer is known: `repl::link::accept`)
//! one replication listener runs at once. Each holds a task, a socket and a TLS state for up to
//! `SETUP_TIMEOUT`, so without a limit anyone who can reach the port could open thousands. The
//! limit is split by source address: connections from a configured peer's IP address have a
//! few slots of their own per address, all others share one pool, so connections from
//! elsewhere that fill the pool cannot keep a peer from connecting. A peer address whose own
//! slots are full uses the shared pool too. A connection over its limit
//! is closed at once. Plain bookkeeping, no I/O; refusals are logged at most once per interval
//! ([`RefusalLog`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Setups at once from addresses that are no configured peer's, per listener. A resource has a
/// handful of peers and each dials one link at a time: legitimate setups come from peer
/// addresses (their own slots below), so this pool only serves peers behind an address
/// translation or dialing from another address; 16 keeps what a flood can hold small.
pub const MAX_OTHER_SETUPS: usize = 16;
/// Setups at once from one configured peer's IP address: the peer dials one link at a time,
/// with room for a retry overlapping a slow setup it gave up on.
pub const MAX_SETUPS_PER_PEER_ADDRESS: usize = 4;
/// At most one log line per interval about connections refused for these limits.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts of setups running, by where they come from.
#[derive(Debug, Default)]
struct Running {
    /// By configured peer IP address (every such address has an entry).
    peers: HashMap<IpAddr, usize>,
    others: usize,
}

/// The setups of one listener.
#[derive(Debug, Clone)]
pub struct SetupLimit {
    running: Arc<Mutex<Running>>,
}

/// A running setup's slot, given back when dropped.
#[derive(Debug)]
pub struct SetupSlot {
    running: Arc<Mutex<Running>>,
    /// The peer address it counts for, `None`: the shared pool.
    peer: Option<IpAddr>,
}

impl Drop for SetupSlot {
    fn drop(&mut self) {
        let mut r = self.running.lock().expect("setups");
        match self.peer {
            Some(ip) => *r.peers.get_mut(&ip).expect("peer address counted") -= 1,
            None => r.others -= 1,
        }
    }
}

impl SetupLimit {
    /// The limits of a listener whose resource has peers at `peer_addresses`.
    pub fn new(peer_addresses: impl IntoIterator<Item = IpAddr>) -> SetupLimit {
        let peers = peer_addresses
            .into_iter()
            // IPv4 addresses as such also when a dual-stack listener reports them mapped
            // into IPv6 (`to_canonical`, here and in `admit`).
            .map(|ip| (ip.to_canonical(), 0))
            .collect();
        SetupLimit {
            running: Arc::new(Mutex::new(Running { peers, others: 0 })),
        }
    }

    /// A slot for a setup of a connection from `from`, `None` when its limit is reached (the
    /// connection is to be closed): a configured peer address takes its own slots first, then
    /// the shared pool.
    pub fn admit(&self, from: IpAddr) -> Option<SetupSlot> {
        let from = from.to_canonical();
        let mut guard = self.running.lock().expect("setups");
        let r = &mut *guard;
        let peer = match r.peers.get_mut(&from) {
            Some(n) if *n < MAX_SETUPS_PER_PEER_ADDRESS => {
                *n += 1;
                Some(from)
            }
            // A peer address whose own slots are full (several nodes behind one address, or
            // retries overlapping slow setups) falls back to the shared pool: its own slots
            // are a reserve the others cannot take, not a cap that locks the peer out.
            _ if r.others < MAX_OTHER_SETUPS => {
                r.others += 1;
                None
            }
            _ => return None,
        };
        Some(SetupSlot {
            running: self.running.clone(),
            peer,
        })
    }
}

/// Rate limit of the log lines about refused connections: a flood must not flood the log.
#[derive(Debug, Default)]
pub struct RefusalLog {
    last: Option<Instant>,
    /// Refusals not reported yet.
    unreported: u64,
}

impl RefusalLog {
    /// A connection was refused at `now`: returns the refusals to report in a line now (this
    /// one included), `None` while the last line is more recent than [`REFUSAL_LOG_INTERVAL`].
    pub fn refused(&mut self, now: Instant) -> Option<u64> {
        self.unreported += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn others_share_one_pool_and_slots_come_back_when_dropped() {
        let limit = SetupLimit::new([PEER]);
        let mut slots: Vec<SetupSlot> = (0..MAX_OTHER_SETUPS)
            .map(|k| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, k as u8));
                limit.admit(ip).expect("within the pool")
            })
            .collect();
        assert!(limit.admit(OTHER).is_none(), "pool full");
        slots.pop();
        assert!(limit.admit(OTHER).is_some(), "a slot came back");
    }

    #[test]
    fn a_full_pool_does_not_keep_a_peer_out() {
        let limit = SetupLimit::new([PEER]);
        let flood: Vec<SetupSlot> = std::iter::from_fn(|| limit.admit(OTHER)).collect();
        assert_eq!(flood.len(), MAX_OTHER_SETUPS);
        let peer: Vec<SetupSlot> = std::iter::from_fn(|| limit.admit(PEER)).collect();
        assert_eq!(peer.len(), MAX_SETUPS_PER_PEER_ADDRESS);
        drop(peer);
        assert!(limit.admit(PEER).is_some());
    }

    #[test]
    fn a_mapped_ipv4_address_is_the_peer_address() {
        let limit = SetupLimit::new([PEER]);
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped());
        let slots: Vec<SetupSlot> = (0..MAX_SETUPS_PER_PEER_ADDRESS)
            .map(|_| limit.admit(mapped).expect("the peer's own slots"))
            .collect();
        let flood: Vec<SetupSlot> = std::iter::from_fn(|| limit.admit(OTHER)).collect();
        assert_eq!(
            flood.len(),
            MAX_OTHER_SETUPS,
            "the mapped address took the peer's own slots, not the pool's"
        );
        drop((slots, flood));
    }

    #[test]
    fn a_peer_address_with_its_own_slots_full_falls_back_to_the_pool() {
        let limit = SetupLimit::new([PEER]);
        let own: Vec<SetupSlot> = (0..MAX_SETUPS_PER_PEER_ADDRESS)
            .map(|_| limit.admit(PEER).expect("the peer's own slots"))
            .collect();
        let more = limit
            .admit(PEER)
            .expect("own slots full: the shared pool, not a refusal");
        let others: Vec<SetupSlot> = std::iter::from_fn(|| limit.admit(OTHER)).collect();
        assert_eq!(others.len(), MAX_OTHER_SETUPS - 1, "it took a pool slot");
        assert!(limit.admit(PEER).is_none(), "own slots and pool full");
        drop(more);
        let last = limit.admit(OTHER).expect("its pool slot came back");
        drop(own);
        drop((others, last));
        assert!(limit.admit(PEER).is_some(), "its own slots came back");
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.refused(t0), Some(1));
        assert_eq!(log.refused(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.refused(t0 + Duration::from_secs(5)), None);
        assert_eq!(
            log.refused(t0 + REFUSAL_LOG_INTERVAL),
            Some(3),
            "the two held back, and this one"
        );
    }
}
