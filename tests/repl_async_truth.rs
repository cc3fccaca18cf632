//! Async mode truth (2 real nodes, the replication link through a proxy that stalls or
//! throttles the Primary-to-Secondary direction):
//! - protocol A: writes acknowledged while the link is stalled show on the Primary as
//!   unconfirmed writes/bytes, exactly what was written; they drain to 0 once the link flows;
//! - protocol A, the link throttled, SIGKILL of the Primary: the Secondary knows how many
//!   acknowledged writes it never received; `blockctl promote --dry-run` prints it and changes
//!   nothing, `blockctl promote` prints it and promotes; the figure never exceeds the writes
//!   really missing from its disk;
//! - protocols B and C: writes held by a stall are not acknowledged, so nothing is unconfirmed;
//!   under C the figure stays 0 under load, under B it never exceeds the writes in flight.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use integration_tests::link_proxy::{LinkConfig, ProxiedPair};
use integration_tests::nbd_wire::{CMD_WRITE, Reply, Wire};
use integration_tests::repl::{ClusterOptions, EventLog, RESOURCE, tail};

const BS4K: usize = 4096;
const BIG: usize = 64 << 10;

/// The content of write `k` of a test run: every 8 bytes say which write it is.
fn block(tag: u64, k: u64, len: usize) -> Vec<u8> {
    let word = (tag << 32 | k).to_le_bytes();
    word.iter().copied().cycle().take(len).collect()
}

fn nbd_addr(p: &ProxiedPair, i: usize) -> SocketAddr {
    format!("127.0.0.1:{}", p.cluster.nodes[i].nbd_port)
        .parse()
        .expect("nbd addr")
}

/// The most a socket's send buffer grows to (the third figure of tcp_wmem; 4 MiB if unknown).
fn tcp_wmem_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

/// A 2-node cluster of `size`-byte devices through the proxy, n0 promoted and in sync.
fn pair_of(protocol: &str, size: u64) -> ProxiedPair {
    let mut opts = ClusterOptions::new(2, protocol);
    opts.size = size;
    let p = ProxiedPair::start(&opts, LinkConfig::TIGHT);
    p.cluster.promote(0, true);
    p.cluster.wait_synced(0, Duration::from_secs(120));
    p
}

fn pair(protocol: &str) -> ProxiedPair {
    pair_of(protocol, 64 << 20)
}

/// Waits until `cond` holds for n`i`'s only peer; returns that peer status.
fn wait_peer(
    p: &ProxiedPair,
    i: usize,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = p.peer_status(i);
        if cond(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached after {timeout:?}: {st:#}\nn0:\n{}\nn1:\n{}",
            tail(&p.cluster.log(0), 30),
            tail(&p.cluster.log(1), 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drained(s: &serde_json::Value) -> bool {
    s["connection"] == "connected"
        && s["unconfirmed_writes"] == 0
        && s["unconfirmed_bytes"] == 0
        && s["in_flight"] == 0
}

/// Sends `n` writes of `len` bytes (write `k` at `base + k * len`) without waiting for replies.
fn send_writes(w: &mut Wire, tag: u64, base: u64, n: u64, len: usize) {
    for k in 0..n {
        let data = block(tag, k, len);
        w.send_request(0, CMD_WRITE, k, base + k * len as u64, len as u32, &data)
            .expect("send write");
    }
}

/// Reads `n` replies; every one must be a success.
fn read_replies(w: &mut Wire, n: u64) {
    for _ in 0..n {
        match w.read_reply().expect("write reply") {
            Reply::Simple { error: 0, .. } => {}
            r => panic!("write failed: {r:?}"),
        }
    }
}

#[test]
fn protocol_a_counts_unconfirmed_writes_and_promote_reports_the_loss() {
    let p = pair_of("A", 160 << 20);
    let events = EventLog::start(&p.cluster, 1, "n1");
    let (mut w, _) = Wire::open(nbd_addr(&p, 0), RESOURCE, false).expect("nbd");

    // 1. Stalled link: every acknowledged write is unconfirmed, exactly.
    const N1: u64 = 48;
    p.proxy.hold_forward(true);
    let started = Instant::now();
    send_writes(&mut w, 1, 0, N1, BS4K);
    read_replies(&mut w, N1);
    let st = p.peer_status(0);
    let held = started.elapsed();
    assert_eq!(st["connection"], "connected", "{st:#}");
    assert_eq!(st["unconfirmed_writes"], N1, "{st:#}");
    assert_eq!(st["unconfirmed_bytes"], N1 * BS4K as u64, "{st:#}");
    assert_eq!(st["out_of_sync_bytes"], 0, "{st:#}");
    eprintln!(
        "stalled: {} unconfirmed writes, {} bytes (status read {:?} after the stall began)",
        st["unconfirmed_writes"], st["unconfirmed_bytes"], held
    );

    // 2. The link flows again: they drain to 0.
    p.proxy.hold_forward(false);
    let t = Instant::now();
    wait_peer(&p, 0, "drained", Duration::from_secs(30), drained);
    eprintln!("drained to 0 in {:?}", t.elapsed());

    // 3. A slow link, a burst of writes (acknowledged at once under A), then the Primary dies.
    // The report of acknowledged writes goes ahead of the queued data, behind at most the
    // kernel's socket buffers (n0's send buffer, tcp_wmem max) and the proxy's: once that much
    // more has been forwarded, it has arrived while most of the burst has not.
    let margin = tcp_wmem_max() + (2 << 20);
    let n3: u64 = ((4 * margin).max(32 << 20) / BIG as u64).min(2000);
    const RATE: u64 = 2 << 20;
    let base3 = 1 << 20;
    p.proxy.throttle_forward(RATE);
    let before = p.proxy.forwarded();
    send_writes(&mut w, 3, base3, n3, BIG);
    read_replies(&mut w, n3);
    let after_writes = p.proxy.forwarded();
    let st = p.peer_status(0);
    let unconfirmed = st["unconfirmed_writes"].as_u64().expect("unconfirmed");
    assert!(
        unconfirmed > 0 && unconfirmed <= n3,
        "unconfirmed {unconfirmed} of {n3}: {st:#}"
    );
    let text = p.cluster.blockctl_ok(Some(0), &["status", RESOURCE]);
    assert!(text.contains(" unconfirmed:"), "{text}");
    let report_arrived = after_writes + margin;
    integration_tests::wait_for(
        Duration::from_secs(60),
        || p.proxy.forwarded() >= report_arrived,
        "the throttled link to forward the report",
    );
    let mut p = p;
    p.cluster.kill(0);
    let lost = wait_peer(
        &p,
        1,
        "link loss known on n1",
        Duration::from_secs(30),
        |s| s["connection"] != "connected" && s["lost_acked_writes"].as_u64() > Some(0),
    );
    let lost_writes = lost["lost_acked_writes"].as_u64().unwrap();
    let lost_bytes = lost["lost_acked_bytes"].as_u64().unwrap();
    let ev = events.wait_for(
        "lost-acked-writes",
        &format!("{lost_writes} writes, {lost_bytes} bytes"),
        Duration::from_secs(10),
    );
    assert_eq!(ev["peer"], "n0", "{ev}");
    let text = p.cluster.blockctl_ok(Some(1), &["status", RESOURCE]);
    assert!(
        text.contains(&format!(
            "lost-acked-writes:{lost_writes} lost-acked-bytes:{lost_bytes}"
        )),
        "{text}"
    );

    // Dry run: prints the loss, changes nothing.
    let out = p
        .cluster
        .blockctl(Some(1), &["promote", RESOURCE, "--dry-run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dry run failed: {stderr}");
    let want = format!(
        "promote {RESOURCE}: the last Primary (n0) had acknowledged at least {lost_writes} writes"
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(stderr.contains("that this node never received; they will be lost"));
    let st = p.status(1);
    assert_eq!(st["role"], "secondary", "dry run changed the role: {st:#}");
    assert_eq!(st["peers"][0]["lost_acked_writes"], lost_writes);

    // The figure is a lower bound: at least that many of the burst's writes are not on n1.
    let f = std::fs::File::open(&p.cluster.nodes[1].backing).expect("n1 backing");
    let mut missing = 0u64;
    let mut buf = vec![0u8; BIG];
    for k in 0..n3 {
        f.read_exact_at(&mut buf, base3 + k * BIG as u64)
            .expect("read n1");
        if buf != block(3, k, BIG) {
            missing += 1;
        }
    }
    for k in 0..N1 {
        let mut b = vec![0u8; BS4K];
        f.read_exact_at(&mut b, k * BS4K as u64).expect("read n1");
        assert_eq!(
            b,
            block(1, k, BS4K),
            "write {k} of the drained batch missing"
        );
    }
    eprintln!(
        "throttled burst: {n3} writes of {BIG} bytes acknowledged; {} bytes forwarded meanwhile; \
         n1 reports {lost_writes} lost writes ({lost_bytes} bytes); {missing} really missing",
        after_writes - before
    );
    assert!(
        lost_writes <= missing,
        "overclaimed: {lost_writes} > {missing} missing"
    );
    assert!(lost_bytes <= missing * BIG as u64);

    // The real promotion prints the same, then promotes.
    let out = p.cluster.blockctl(Some(1), &["promote", RESOURCE]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promote failed: {stderr}");
    assert!(stderr.contains(&want), "{stderr}");
    let st = p.status(1);
    assert_eq!(st["role"], "primary", "{st:#}");
    assert_eq!(st["peers"][0]["lost_acked_writes"], 0, "{st:#}");
    // Nothing more to lose: a second check prints nothing.
    let out = p
        .cluster
        .blockctl(Some(1), &["promote", RESOURCE, "--dry-run"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Under B and C a write held by a stall is not acknowledged: nothing is unconfirmed while the
/// writes are in flight, and nothing after.
fn held_writes_are_not_unconfirmed(protocol: &str) -> ProxiedPair {
    let p = pair(protocol);
    let (mut w, _) = Wire::open(nbd_addr(&p, 0), RESOURCE, false).expect("nbd");
    const N: u64 = 16;
    p.proxy.hold_forward(true);
    send_writes(&mut w, 2, 0, N, BS4K);
    let st = wait_peer(&p, 0, "writes in flight", Duration::from_secs(3), |s| {
        s["in_flight"] == N
    });
    assert_eq!(st["unconfirmed_writes"], 0, "{protocol}: {st:#}");
    assert_eq!(st["unconfirmed_bytes"], 0, "{protocol}: {st:#}");
    p.proxy.hold_forward(false);
    read_replies(&mut w, N);
    wait_peer(&p, 0, "drained", Duration::from_secs(30), drained);
    // Dry run on the Secondary: nothing known lost, nothing printed.
    let out = p
        .cluster
        .blockctl(Some(1), &["promote", RESOURCE, "--dry-run"]);
    assert_eq!(out.status.code(), Some(3), "a Primary is connected");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("will be lost"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

/// Pipelined bursts on a flowing link; returns the largest unconfirmed figure seen, checking
/// it against the writes in flight at every sample.
fn burst_max_unconfirmed(p: &ProxiedPair) -> u64 {
    let (mut w, _) = Wire::open(nbd_addr(p, 0), RESOURCE, false).expect("nbd");
    let mut max = 0;
    for round in 0..20u64 {
        send_writes(&mut w, 10 + round, 0, 32, BIG);
        let st = p.peer_status(0);
        let u = st["unconfirmed_writes"].as_u64().unwrap();
        // A write is only unconfirmed while the peer has not acknowledged it as written.
        assert!(u <= 32, "{st:#}");
        max = max.max(u);
        read_replies(&mut w, 32);
    }
    wait_peer(p, 0, "drained", Duration::from_secs(30), drained);
    max
}

#[test]
fn protocol_b_counts_only_acknowledged_writes() {
    let p = held_writes_are_not_unconfirmed("B");
    let max = burst_max_unconfirmed(&p);
    eprintln!("protocol B: largest unconfirmed figure under load {max}");
}

#[test]
fn protocol_c_never_has_unconfirmed_writes() {
    let p = held_writes_are_not_unconfirmed("C");
    let max = burst_max_unconfirmed(&p);
    assert_eq!(max, 0, "protocol C acknowledges only written writes");
}
