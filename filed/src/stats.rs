//! Counters of a running filed — per group and peer: sync runs, transfers, bytes, errors; per
//! group: event batches, events, own writes suppressed, rescans — kept in memory for
//! `filed status` and the metrics endpoint. Queue lengths and conflicts come from the store.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::session::SessionReport;

/// Per group and peer (sessions either side started).
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct PeerCounters {
    /// Sessions that completed.
    pub sync_runs: u64,
    /// Sessions that could not be run or broke off (peer unreachable, refused, I/O).
    pub sync_failures: u64,
    /// Paths sent to the peer (files, directories, symlinks, deletions, renames).
    pub transfers_sent: u64,
    /// Paths received from the peer.
    pub transfers_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Per-path errors in completed sessions.
    pub path_errors: u64,
    /// Conflicts found by sessions (the same path counts again each time it is found).
    pub conflicts_found: u64,
}

/// Per group (the watcher's side).
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct GroupCounters {
    /// Batches of watch events processed.
    pub batches: u64,
    /// Paths reported by the watcher.
    pub events: u64,
    /// Events on paths that were exactly what filed itself wrote.
    pub suppressed: u64,
    /// Local changes found (new, changed, deleted).
    pub changes: u64,
    /// Rescans after a lost event (queue overflow, watch error).
    pub rescans: u64,
    /// Full checks (start, periodic, rescans).
    pub full_checks: u64,
    /// Watch errors (limit reached, unreadable directory).
    pub watch_errors: u64,
}

#[derive(Debug, Default)]
struct Inner {
    groups: BTreeMap<String, GroupCounters>,
    peers: BTreeMap<(String, String), PeerCounters>,
}

#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

impl Stats {
    pub fn session(&self, r: &SessionReport) {
        let mut i = self.inner.lock().expect("lock poisoned");
        let c = i
            .peers
            .entry((r.group.clone(), r.peer.clone()))
            .or_default();
        c.sync_runs += 1;
        c.transfers_sent += (r.pushed.len() + r.renamed.len()) as u64;
        c.transfers_received += r.pulled.len() as u64;
        c.bytes_sent += r.bytes_sent;
        c.bytes_received += r.bytes_received;
        c.path_errors += r.errors.len() as u64;
        c.conflicts_found += r.conflicts.len() as u64;
    }

    pub fn failure(&self, group: &str, peer: &str) {
        let mut i = self.inner.lock().expect("lock poisoned");
        i.peers
            .entry((group.to_string(), peer.to_string()))
            .or_default()
            .sync_failures += 1;
    }

    pub fn group(&self, group: &str, f: impl FnOnce(&mut GroupCounters)) {
        let mut i = self.inner.lock().expect("lock poisoned");
        f(i.groups.entry(group.to_string()).or_default());
    }

    pub fn group_counters(&self, group: &str) -> GroupCounters {
        let i = self.inner.lock().expect("lock poisoned");
        i.groups.get(group).cloned().unwrap_or_default()
    }

    pub fn peer_counters(&self, group: &str, peer: &str) -> PeerCounters {
        let i = self.inner.lock().expect("lock poisoned");
        i.peers
            .get(&(group.to_string(), peer.to_string()))
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sessions_and_failures() {
        let s = Stats::default();
        let r = SessionReport {
            group: "g".into(),
            peer: "p".into(),
            pushed: vec!["/a".into()],
            renamed: vec![("/b".into(), "/c".into())],
            pulled: vec!["/d".into()],
            bytes_sent: 10,
            ..Default::default()
        };
        s.session(&r);
        s.failure("g", "p");
        s.group("g", |g| g.batches += 1);
        let c = s.peer_counters("g", "p");
        assert_eq!(
            (
                c.sync_runs,
                c.sync_failures,
                c.transfers_sent,
                c.transfers_received,
                c.bytes_sent
            ),
            (1, 1, 2, 1, 10)
        );
        assert_eq!(s.group_counters("g").batches, 1);
        assert_eq!(s.peer_counters("g", "q"), PeerCounters::default());
    }
}
