//! Per-export NBD request statistics: for each command a request counter, an error counter, a
//! byte counter and a fixed-bucket latency histogram, kept in relaxed atomics so recording costs
//! a few uncontended atomic adds and no lock; plus the process-wide registry of exports that a
//! metrics endpoint renders (Prometheus-style: cumulative buckets, `+Inf`, sum and count).
//!
//! Latency is measured from the receive that brought a request's header to the moment its reply
//! is written to the socket (a WRITE's latency includes receiving its payload); the connection
//! shares clock reads between requests received together and replies written together.
//! Bytes are the request length: data moved for READ/WRITE, range covered for TRIM,
//! WRITE_ZEROES, CACHE and BLOCK_STATUS, 0 for FLUSH.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The NBD commands that are counted (DISC ends the connection and has no reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

impl Command {
    /// Every counted command, in a stable order (the order of [`NbdMetrics::snapshot`]).
    pub const ALL: [Command; 7] = [
        Command::Read,
        Command::Write,
        Command::Flush,
        Command::Trim,
        Command::WriteZeroes,
        Command::Cache,
        Command::BlockStatus,
    ];

    /// Lower-case label for the command (`read`, `write`, `write_zeroes`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write_zeroes",
            Command::Cache => "cache",
            Command::BlockStatus => "block_status",
        }
    }

    /// The command for an NBD request type, `None` for DISC and unknown types.
    pub fn from_wire(kind: u16) -> Option<Command> {
        use crate::nbd::proto::{
            CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
        };
        Some(match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_CACHE => Command::Cache,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the latency buckets, in seconds (a final `+Inf` bucket is implied).
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 5.0,
];

/// [`LATENCY_BOUNDS`] in nanoseconds, for the hot path.
const BOUNDS_NANOS: [u64; 16] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
];

const BUCKETS: usize = LATENCY_BOUNDS.len() + 1;

/// Counters of one command.
#[derive(Default)]
struct CommandCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

/// Request statistics of one export (shared by all its connections).
#[derive(Default)]
pub struct NbdMetrics {
    commands: [CommandCounters; Command::ALL.len()],
}

impl std::fmt::Debug for NbdMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdMetrics").finish_non_exhaustive()
    }
}

/// Plain copy of one latency histogram, Prometheus-style.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, cumulative count)`; the last entry has bound `f64::INFINITY`
    /// and a count equal to [`HistogramSnapshot::count`].
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

/// Plain copy of one command's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSnapshot {
    pub command: Command,
    pub requests: u64,
    pub errors: u64,
    pub bytes: u64,
    pub latency: HistogramSnapshot,
}

/// Plain copy of an export's statistics, one entry per command in [`Command::ALL`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    pub commands: Vec<CommandSnapshot>,
}

impl MetricsSnapshot {
    /// The entry for `command`.
    pub fn command(&self, command: Command) -> &CommandSnapshot {
        &self.commands[command.index()]
    }
}

impl NbdMetrics {
    pub fn new() -> NbdMetrics {
        NbdMetrics::default()
    }

    /// Records one answered request. Lock-free: five relaxed atomic adds.
    pub fn record(&self, command: Command, bytes: u64, latency: Duration, ok: bool) {
        let c = &self.commands[command.index()];
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(BUCKETS - 1);
        c.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
        c.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        c.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// A plain copy of the counters. Each counter is read atomically; counters of a request
    /// recorded concurrently may be partly included. The histogram count is the sum of its
    /// buckets, so buckets, `+Inf` and count always agree.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let commands = Command::ALL
            .iter()
            .map(|&command| {
                let c = &self.commands[command.index()];
                let mut cumulative = 0u64;
                let buckets = c
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        cumulative += n.load(Ordering::Relaxed);
                        let bound = LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
                        (bound, cumulative)
                    })
                    .collect();
                CommandSnapshot {
                    command,
                    requests: c.requests.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                    bytes: c.bytes.load(Ordering::Relaxed),
                    latency: HistogramSnapshot {
                        buckets,
                        count: cumulative,
                        sum_seconds: c.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
                    },
                }
            })
            .collect();
        MetricsSnapshot { commands }
    }
}

static REGISTRY: Mutex<Vec<(String, Arc<NbdMetrics>)>> = Mutex::new(Vec::new());

/// The metrics of export `name`, created and registered on first use. All connections to
/// exports of that name in this process share them.
pub fn register(name: &str) -> Arc<NbdMetrics> {
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, m)) = reg.iter().find(|(n, _)| n == name) {
        return m.clone();
    }
    let m = Arc::new(NbdMetrics::new());
    reg.push((name.to_string(), m.clone()));
    m
}

/// Every registered export with its metrics, in registration order.
pub fn registry() -> Vec<(String, Arc<NbdMetrics>)> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_agree() {
        for (s, n) in LATENCY_BOUNDS.iter().zip(BOUNDS_NANOS) {
            assert_eq!((s * 1e9).round() as u64, n);
        }
        assert!(LATENCY_BOUNDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn records_counts_bytes_errors_and_cumulative_buckets() {
        let m = NbdMetrics::new();
        m.record(Command::Write, 4096, Duration::from_micros(10), true);
        m.record(Command::Write, 4096, Duration::from_micros(25), true); // on the bound
        m.record(Command::Write, 1 << 20, Duration::from_millis(3), false);
        m.record(Command::Write, 1, Duration::from_secs(60), true); // +Inf
        m.record(Command::Flush, 0, Duration::from_millis(1), true);
        let s = m.snapshot();
        let w = s.command(Command::Write);
        assert_eq!(w.requests, 4);
        assert_eq!(w.errors, 1);
        assert_eq!(w.bytes, 4096 * 2 + (1 << 20) + 1);
        assert_eq!(w.latency.count, 4);
        let at = |bound: f64| {
            w.latency
                .buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, n)| *n)
                .unwrap()
        };
        assert_eq!(at(0.000_025), 2);
        assert_eq!(at(0.002_5), 2);
        assert_eq!(at(0.005), 3);
        assert_eq!(at(5.0), 3);
        assert_eq!(at(f64::INFINITY), 4);
        assert_eq!(w.latency.buckets.len(), LATENCY_BOUNDS.len() + 1);
        assert!(w.latency.buckets.windows(2).all(|p| p[0].1 <= p[1].1));
        let sum = 10e-6 + 25e-6 + 3e-3 + 60.0;
        assert!((w.latency.sum_seconds - sum).abs() < 1e-9);
        let f = s.command(Command::Flush);
        assert_eq!(
            (f.requests, f.errors, f.bytes, f.latency.count),
            (1, 0, 0, 1)
        );
        for c in [Command::Read, Command::Trim, Command::Cache] {
            assert_eq!(s.command(c).requests, 0);
        }
        assert_eq!(
            s.commands.iter().map(|c| c.command).collect::<Vec<_>>(),
            Command::ALL
        );
    }

    #[test]
    fn concurrent_recording_loses_nothing() {
        let m = Arc::new(NbdMetrics::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        m.record(
                            Command::Read,
                            512,
                            Duration::from_nanos(i * 100),
                            i % 10 != 0,
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let r = m.snapshot().command(Command::Read).clone();
        assert_eq!(r.requests, 40_000);
        assert_eq!(r.errors, 4_000);
        assert_eq!(r.bytes, 40_000 * 512);
        assert_eq!(r.latency.count, 40_000);
    }

    #[test]
    fn registry_returns_one_instance_per_name() {
        let a = register("metrics-test-a");
        let b = register("metrics-test-b");
        assert!(Arc::ptr_eq(&a, &register("metrics-test-a")));
        assert!(!Arc::ptr_eq(&a, &b));
        a.record(Command::Trim, 7, Duration::ZERO, true);
        let reg = registry();
        let found = reg.iter().find(|(n, _)| n == "metrics-test-a").unwrap();
        assert_eq!(found.1.snapshot().command(Command::Trim).bytes, 7);
        assert_eq!(reg.iter().filter(|(n, _)| n == "metrics-test-a").count(), 1);
    }

    #[test]
    fn wire_commands_map() {
        use crate::nbd::proto::{CMD_DISC, CMD_WRITE_ZEROES};
        assert_eq!(
            Command::from_wire(CMD_WRITE_ZEROES),
            Some(Command::WriteZeroes)
        );
        assert_eq!(Command::from_wire(CMD_DISC), None);
        assert_eq!(Command::from_wire(999), None);
        assert_eq!(Command::WriteZeroes.name(), "write_zeroes");
    }
}
