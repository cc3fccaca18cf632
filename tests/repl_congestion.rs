//! Congestion under protocol A (`sndbuf-size`, DRBD's `on-congestion = block`): 2 real nodes,
//! `sndbuf-size = "4M"`, the replication link through the userspace proxy, throttled to
//! 2 MiB/s. A client writes 48 MiB through NBD with 32 requests in flight:
//! - the bytes queued to the peer (status `queued_bytes`) never exceed the limit plus one
//!   request, and the Primary's resident memory stays bounded;
//! - the client is slowed to about the link's rate (writes wait, `congested`), never failed;
//! - a `congestion` event says when the peer became congested and uncongested;
//! - once the link drained, the Secondary's data equals the Primary's.
//!
//! An unthrottled burst first gives the write rate without the throttle, for comparison.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integration_tests::link_proxy::{LinkConfig, ProxiedPair};
use integration_tests::nbd_wire::{CMD_WRITE, Reply, Wire};
use integration_tests::repl::{ClusterOptions, EventLog, RESOURCE, tail};

const MIB: u64 = 1 << 20;
const LIMIT: u64 = 4 * MIB;
const REQUEST: usize = 64 << 10;
const QUEUE_DEPTH: u64 = 32;
const LINK_RATE: u64 = 2 * MIB;

/// Process id of the blockd started with config file `config`.
fn pid_of(config: &std::path::Path) -> u32 {
    let want = config.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("blockd")) && args.contains(&want) {
            return pid;
        }
    }
    panic!("no blockd process with config {want}");
}

/// Resident memory of process `pid` in bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The content of write `k` of a run: every 8 bytes say which run and write it is.
fn block(tag: u64, k: u64) -> Vec<u8> {
    let word = (tag << 32 | k).to_le_bytes();
    word.iter().copied().cycle().take(REQUEST).collect()
}

/// Writes `bytes` at `base` through NBD, `QUEUE_DEPTH` requests in flight; every reply must be
/// a success. Returns how long it took.
fn write_pipelined(addr: SocketAddr, tag: u64, base: u64, bytes: u64) -> Duration {
    let (mut w, _) = Wire::open(addr, RESOURCE, false).expect("nbd");
    let n = bytes / REQUEST as u64;
    let started = Instant::now();
    let (mut sent, mut done) = (0u64, 0u64);
    while done < n {
        if sent < n && sent - done < QUEUE_DEPTH {
            let off = base + sent * REQUEST as u64;
            w.send_request(0, CMD_WRITE, sent, off, REQUEST as u32, &block(tag, sent))
                .expect("send write");
            sent += 1;
            continue;
        }
        match w.read_reply().expect("write reply") {
            Reply::Simple { error: 0, .. } => done += 1,
            r => panic!("write failed: {r:?}"),
        }
    }
    let took = started.elapsed();
    w.disconnect().expect("disconnect");
    took
}

/// What the sampler saw on the Primary while a run was going.
#[derive(Debug, Default)]
struct Seen {
    max_queued: u64,
    max_rss: u64,
    congested: bool,
    samples: u64,
}

/// Samples n0's peer status and resident memory every 20 ms until `stop`.
fn sample(p: &ProxiedPair, pid: u32, stop: &AtomicBool) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::SeqCst) {
        let st = p.peer_status(0);
        let queued = st["queued_bytes"].as_u64().expect("queued_bytes");
        seen.max_queued = seen.max_queued.max(queued);
        seen.congested |= st["congested"] == true;
        seen.max_rss = seen.max_rss.max(rss(pid));
        seen.samples += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

/// Runs `write` while sampling n0; returns its duration and what was seen.
fn sampled(p: &ProxiedPair, pid: u32, write: impl FnOnce() -> Duration) -> (Duration, Seen) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(p, pid, &stop));
        let took = write();
        stop.store(true, Ordering::SeqCst);
        (took, sampler.join().expect("sampler"))
    })
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB as f64 / took.as_secs_f64()
}

#[test]
fn a_slow_peer_slows_protocol_a_writers_to_its_link_rate() {
    let test_started = Instant::now();
    let mut opts = ClusterOptions::new(2, "A");
    opts.size = 49 * MIB;
    opts.extra_global = "sndbuf-size = \"4M\"".into();
    let p = ProxiedPair::start(&opts, LinkConfig::TIGHT);
    p.cluster.promote(0, true);
    p.cluster.wait_synced(0, Duration::from_secs(60));
    eprintln!("in sync after {:?}", test_started.elapsed());
    let events = EventLog::start(&p.cluster, 0, "n0");
    let addr: SocketAddr = format!("127.0.0.1:{}", p.cluster.nodes[0].nbd_port)
        .parse()
        .expect("nbd addr");
    let pid = pid_of(&p.configs[0]);
    let st = p.peer_status(0);
    assert_eq!(st["sndbuf_size"], LIMIT, "{st:#}");
    assert_eq!(st["congested"], false, "{st:#}");

    // Without the throttle: 16 MiB.
    const FREE: u64 = 16 * MIB;
    let (free_took, free_seen) = sampled(&p, pid, || write_pipelined(addr, 1, 0, FREE));
    let free_rate = mib_per_s(FREE, free_took);
    p.cluster.wait_synced(0, Duration::from_secs(30));

    // Throttled to 2 MiB/s: 48 MiB.
    const SLOW: u64 = 48 * MIB;
    let rss_before = rss(pid);
    p.proxy.throttle_forward(LINK_RATE);
    let (slow_took, seen) = sampled(&p, pid, || write_pipelined(addr, 2, 0, SLOW));
    let slow_rate = mib_per_s(SLOW, slow_took);
    let st = p.peer_status(0);
    let text = p.cluster.blockctl_ok(Some(0), &["status", RESOURCE]);
    eprintln!(
        "unthrottled: {FREE} bytes in {free_took:?} ({free_rate:.1} MiB/s), max queued {} bytes, \
         max RSS {} MiB\n\
         throttled to {} MiB/s: {SLOW} bytes in {slow_took:?} ({slow_rate:.2} MiB/s); max queued \
         {} bytes (limit {LIMIT}, {} samples); RSS {} MiB before, {} MiB at most; {} writes \
         waited\n{text}",
        free_seen.max_queued,
        free_seen.max_rss / MIB,
        LINK_RATE / MIB,
        seen.max_queued,
        seen.samples,
        rss_before / MIB,
        seen.max_rss / MIB,
        st["congested_writes"],
    );
    // (a) Never more than the limit plus one request queued.
    assert!(seen.samples > 20, "{seen:?}");
    assert!(
        seen.max_queued <= LIMIT + REQUEST as u64,
        "queued {} > limit {LIMIT} + one request",
        seen.max_queued
    );
    assert!(
        seen.max_queued >= LIMIT / 2,
        "the buffer never filled: {seen:?}"
    );
    // (b) Memory stays bounded (unbounded, the Primary would hold most of the 48 MiB).
    assert!(
        seen.max_rss <= LIMIT + 64 * MIB,
        "RSS {} MiB",
        seen.max_rss / MIB
    );
    // (c) The writer was slowed to about the link's rate: writes waited.
    assert!(seen.congested, "{seen:?}");
    assert!(st["congested_writes"].as_u64() > Some(0), "{st:#}");
    let link = LINK_RATE as f64 / MIB as f64;
    assert!(
        slow_rate <= 1.5 * link && slow_rate >= 0.4 * link,
        "{slow_rate:.2} MiB/s through a {link} MiB/s link"
    );
    assert!(text.contains(" queued:"), "{text}");
    assert!(text.contains(" congested-writes:"), "{text}");
    events.wait_for("congestion", "congested", Duration::from_secs(5));

    // (d) The link drains; the Secondary holds the same data.
    let drained = |s: &serde_json::Value| {
        s["connection"] == "connected" && s["in_flight"] == 0 && s["queued_bytes"] == 0
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = p.peer_status(0);
        if drained(&s) && s["congested"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not drained: {s:#}\nn0:\n{}\nn1:\n{}",
            tail(&p.cluster.log(0), 30),
            tail(&p.cluster.log(1), 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    events.wait_for("congestion", "uncongested", Duration::from_secs(5));
    eprintln!("drained after {:?}", test_started.elapsed());
    p.proxy.throttle_forward(0);
    p.cluster.wait_synced(0, Duration::from_secs(30));
    p.cluster.assert_identical(0);
    eprintln!("test took {:?}", test_started.elapsed());
}
