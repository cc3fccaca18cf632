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

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use integration_tests::faults::{WriterReport, block_data, check_acked_nbd};
use integration_tests::nbd_wire::{
    CMD_WRITE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Wire, request_bytes,
};
use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE, SlowDisk, can_break_disks, tail};
use integration_tests::{TestRng, wait_for};

const SIZE: u64 = 64 << 20;
const BS: u64 = 4096;
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
    let dir = c.dir.path().to_path_buf();
    let mut text = std::fs::read_to_string(&c.config).expect("config");
    for i in 0..2 {
        let old = format!(
            "backing = \"{}\"\nmeta = \"internal\"\n",
            c.nodes[i].backing.display()
        );
        let path = if i == 1 {
            backing.to_path_buf()
        } else {
            c.nodes[i].backing.clone()
        };
        let new = format!(
            "backing = \"{}\"\nmeta = \"{}\"\n",
            path.display(),
            dir.join(format!("n{i}.meta")).display()
        );
        assert!(text.contains(&old), "config layout changed: {text}");
        text = text.replace(&old, &new);
    }
    std::fs::write(&c.config, text).expect("write config");
    c.nodes[1].backing = backing.to_path_buf();
    for i in 0..2 {
        c.blockctl_ok(Some(i), &["create-md", RESOURCE, "--force"]);
    }
    c.start_node(0);
    c.start_node(1);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));
    c
}

#[derive(Default)]
struct State {
    /// cookie (= seq) -> block, sent and not answered.
    inflight: std::collections::HashMap<u64, u64>,
    acked: Vec<(u64, u64)>,
    failed: Vec<(u64, u64)>,
    ended: Option<String>,
}

/// Writes random blocks with FUA, `DEPTH` in flight (a block never twice at once), until the
/// connection ends or `stop`; returns what the server acknowledged.
fn fua_writer(addr: SocketAddr, trial: u64, stop: Arc<AtomicBool>) -> WriterReport {
    let (wire, _) = Wire::open(addr, RESOURCE, false).expect("NBD connection");
    let stream = wire.stream;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
    let reader = {
        let (mut inp, state, stop) = (stream.try_clone().unwrap(), state.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reply = [0u8; 16];
            let mut have = 0;
            let mut idle_since: Option<Instant> = None;
            loop {
                {
                    let st = state.0.lock().unwrap();
                    if st.ended.is_some() {
                        break;
                    }
                    if stop.load(Ordering::SeqCst) && st.inflight.is_empty() {
                        break;
                    }
                }
                match inp.read(&mut reply[have..]) {
                    Ok(0) => {
                        state.0.lock().unwrap().ended.get_or_insert("EOF".into());
                        break;
                    }
                    Ok(n) => {
                        have += n;
                        idle_since = None;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        // A stopped writer waits at most 10 s for its last answers.
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        if stop.load(Ordering::SeqCst) && since.elapsed() > Duration::from_secs(10)
                        {
                            break;
                        }
                        continue;
                    }
                    Err(e) => {
                        state
                            .0
                            .lock()
                            .unwrap()
                            .ended
                            .get_or_insert(format!("recv: {e}"));
                        break;
                    }
                }
                if have < 16 {
                    continue;
                }
                have = 0;
                let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap());
                let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
                let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap());
                let (m, cv) = &*state;
                let mut st = m.lock().unwrap();
                if magic != SIMPLE_REPLY_MAGIC {
                    st.ended
                        .get_or_insert(format!("bad reply magic {magic:#x}"));
                    break;
                }
                match st.inflight.remove(&cookie) {
                    Some(idx) if error == 0 => st.acked.push((idx, cookie)),
                    Some(idx) => st.failed.push((idx, cookie)),
                    None => {
                        st.ended
                            .get_or_insert(format!("reply to unknown cookie {cookie}"));
                        break;
                    }
                }
                cv.notify_all();
            }
            state.1.notify_all();
        })
    };
    let mut out = stream.try_clone().unwrap();
    let mut rng = TestRng::new(trial);
    for seq in 0u64.. {
        let idx;
        {
            let (m, cv) = &*state;
            let mut st = m.lock().unwrap();
            while st.inflight.len() >= DEPTH && !stop.load(Ordering::SeqCst) && st.ended.is_none() {
                st = cv.wait_timeout(st, Duration::from_millis(50)).unwrap().0;
            }
            if stop.load(Ordering::SeqCst) || st.ended.is_some() {
                break;
            }
            idx = loop {
                let b = rng.below(BLOCKS);
                if !st.inflight.values().any(|&i| i == b) {
                    break b;
                }
            };
            st.inflight.insert(seq, idx);
        }
        let mut req = request_bytes(
            REQUEST_MAGIC,
            CMD_FLAG_FUA,
            CMD_WRITE,
            seq,
            idx * BS,
            BS as u32,
        );
        req.extend_from_slice(&block_data(trial, idx, seq));
        if let Err(e) = out.write_all(&req) {
            state
                .0
                .lock()
                .unwrap()
                .ended
                .get_or_insert(format!("send: {e}"));
            break;
        }
    }
    let _ = reader.join();
    let _ = stream.shutdown(Shutdown::Both);
    let st = state.0.lock().unwrap();
    WriterReport {
        trial,
        acked: st.acked.clone(),
        failed: st.failed.len() as u64,
        unanswered: st.inflight.len() as u64,
        not_acked: st
            .failed
            .iter()
            .copied()
            .chain(st.inflight.iter().map(|(&seq, &idx)| (idx, seq)))
            .collect(),
        ended: st.ended.clone(),
    }
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
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || fua_writer(addr, trial, stop))
    };
    // Kill the Primary 0.5-1.0 s into the writes.
    let mut rng = TestRng::new(trial ^ 0x5eed);
    std::thread::sleep(Duration::from_millis(500 + rng.below(500)));
    c.kill(0);
    stop.store(true, Ordering::SeqCst);
    let report = writer.join().expect("writer thread");
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
