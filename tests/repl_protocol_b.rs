//! Protocol B (and A) keep every acknowledged write when the Primary dies: the Primary
//! acknowledges a write once the Secondary has received it, so when the link goes down the
//! Secondary must apply every write it received before it can be promoted.
//!
//! The Secondary's backing store is slow for real: an nbdkit memory disk behind the `delay`
//! filter, mounted as a file with nbdfuse (`SlowDisk`), so each write takes [`DELAY_MS`]. The
//! client writes 4 KiB self-describing blocks with FUA, 16 in flight, through the Primary's
//! NBD export and records every write the server acknowledged. FUA writes are applied through
//! the store engine on their own task, and later writes wait behind them (`repl::apply_order`):
//! received-but-unapplied writes pile up on the Secondary. The Primary is SIGKILLed at a random
//! moment, the Secondary is promoted, and every acknowledged write must read back through its
//! export. Each round checks from the Secondary's log that writes were still being applied when
//! the link went down (the window this test is about).
//!
//! Needs root, /dev/fuse, nbdkit, nbdfuse and fusermount3 (skipped with a message otherwise).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::faults::{AckedWriter, check_acked_nbd};
use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE, SlowDisk, can_break_disks, tail};
use integration_tests::{TestRng, wait_for};

const SIZE: u64 = 64 << 20;
/// Blocks the writer picks from (16 MiB).
const BLOCKS: u64 = 4096;
/// Milliseconds every write to the Secondary's backing store takes.
const DELAY_MS: u32 = 5;
const DEPTH: usize = 16;
const CMD_FLAG_FUA: u16 = 1;
const ROUNDS: u64 = 3;

/// A 2-node cluster, `protocol`, metadata in external files; node 1's backing is `backing`.
/// Started, node 0 Primary, in sync.
fn pair(protocol: &str, backing: &std::path::Path) -> Cluster {
    let mut opts = ClusterOptions::new(2, protocol);
    opts.size = SIZE;
    let mut c = Cluster::create(&opts);
    c.use_external_metadata(Some((1, backing.to_path_buf())));
    c.start_node(0);
    c.start_node(1);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));
    c
}

/// `blockctl promote` on node `i`, retried while refused (exit 3: the lost Primary still shows,
/// or its writes are still being applied), for at most `timeout`.
fn promote_when_allowed(c: &Cluster, i: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = c.blockctl(Some(i), &["promote", RESOURCE]);
        if out.status.success() {
            break;
        }
        assert!(
            out.status.code() == Some(3) && Instant::now() < deadline,
            "promote of n{i} failed: {out:?}\n{}",
            tail(&c.log(i), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", c.nodes[i].nbd_port)
        .parse()
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
        "the new Primary's NBD export",
    );
}

/// One round: returns (acknowledged writes, requests the Secondary was still applying when the
/// link went down).
fn round(protocol: &str, trial: u64) -> (usize, u64) {
    let disk_dir = tempfile::tempdir().expect("tempdir");
    let disk = SlowDisk::start(disk_dir.path(), SIZE, DELAY_MS);
    let mut c = pair(protocol, &disk.path);
    let addr: SocketAddr = format!("127.0.0.1:{}", c.nodes[0].nbd_port)
        .parse()
        .unwrap();
    // Random blocks with FUA, DEPTH in flight (a block never twice at once).
    let writer =
        AckedWriter::start_with_flags(addr, trial, trial, BLOCKS, DEPTH, None, CMD_FLAG_FUA);
    // Kill the Primary 0.5-1.0 s into the writes.
    let mut rng = TestRng::new(trial ^ 0x5eed);
    std::thread::sleep(Duration::from_millis(500 + rng.below(500)));
    c.kill(0);
    let report = writer.finish(Duration::from_secs(10));
    assert_eq!(
        report.failed, 0,
        "writes failed before the kill: {report:?}"
    );
    assert!(
        report.acked.len() > 50,
        "only {} writes acknowledged before the kill",
        report.acked.len()
    );
    promote_when_allowed(&c, 1, Duration::from_secs(90));
    if let Err(e) = check_acked_nbd(&c, 1, &report) {
        panic!(
            "protocol {protocol}, round {trial}: acknowledged writes lost after failover: {e}\n\
             --- n1 log\n{}",
            tail(&c.log(1), 40)
        );
    }
    // How many requests were still to apply when the link went down (0: none were).
    let log = c.log(1);
    let pending = log
        .lines()
        .filter(|l| l.contains("applying the requests received from the peer first"))
        .map(|l| field(l, "running") + field(l, "waiting"))
        .sum();
    assert!(
        !log.contains("gave up applying"),
        "the Secondary gave up applying received writes:\n{}",
        tail(&log, 40)
    );
    let applied_in = log
        .lines()
        .filter(|l| l.contains("received requests applied"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("secs=")))
        .last()
        .unwrap_or("-")
        .to_string();
    println!(
        "protocol {protocol} round {trial}: {} writes acknowledged, all on the new Primary; \
         {pending} requests still to apply at the link loss, applied in {applied_in} s",
        report.acked.len()
    );
    drop(c);
    drop(disk);
    (report.acked.len(), pending)
}

/// The number after `name=` in a log line (0 when absent).
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn failover_keeps_acked_writes(protocol: &str, seed: u64) {
    if !can_break_disks() {
        return;
    }
    let started = Instant::now();
    let mut exercised = 0;
    for r in 0..ROUNDS {
        let (_, pending) = round(protocol, seed + r);
        if pending > 0 {
            exercised += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "rounds take too long"
        );
    }
    assert!(
        exercised > 0,
        "no round had received-but-unapplied writes when the Primary died: the test did not \
         exercise the window (is the slow disk slow?)"
    );
}

#[test]
fn protocol_b_failover_keeps_every_acknowledged_write() {
    failover_keeps_acked_writes("B", 0xb000);
}
