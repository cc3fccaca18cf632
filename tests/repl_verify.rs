//! Online verify and invalidate with real processes (2 nodes, protocol C):
//! - `blockctl verify` while fio writes through the Primary's NBD export reports zero
//!   differences (no false positives from writes in flight), with progress in `status`;
//! - blocks corrupted on the Secondary's backing file behind blockd's back are found exactly
//!   (count and ranges, in status and in a `verify-done` event), marked out of sync, and a
//!   reconnect resyncs just them;
//! - `blockctl invalidate` (on the Secondary) and `blockctl invalidate-remote` (on the Primary)
//!   resync the whole device; `invalidate` on the Primary is refused.

use std::io::{Seek, SeekFrom, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::repl::{Cluster, ClusterOptions, EventLog, RESOURCE};
use integration_tests::{ChildGuard, require_tool};

const BS: u64 = 4096;

fn started_pair(size: u64) -> Cluster {
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = size;
    // Verify is paced like a resync: held at c-min-rate while the application writes.
    opts.extra_global = "c-min-rate = \"16M\"\n".to_string();
    let c = Cluster::start(&opts);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));
    c
}

/// fio 4k random writes through node `i`'s NBD export for `secs` seconds, in the background.
fn fio_writer(c: &Cluster, i: usize, secs: u64) -> ChildGuard {
    let fio = require_tool("fio", "fio");
    ChildGuard(
        Command::new(fio)
            .args([
                "--name=app",
                "--ioengine=nbd",
                &format!("--uri={}", c.nbd_uri(i)),
                &format!("--size={}", c.data_size()),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--time_based",
                &format!("--runtime={secs}"),
                "--output-format=terse",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fio"),
    )
}

/// Stops fio the way an operator would (SIGINT: it completes the requests in flight, then
/// exits) and waits for it.
fn stop_fio(mut app: ChildGuard) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped yet.
    unsafe {
        libc::kill(app.0.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "fio did not stop after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `verify` object of node `i`'s status for its first peer.
fn verify_status(c: &Cluster, i: usize) -> serde_json::Value {
    c.status(i)["peers"][0]["verify"].clone()
}

/// Runs `blockctl verify r0 --wait` on node `i` and returns the final verify status.
fn verify(c: &Cluster, i: usize) -> serde_json::Value {
    let out = c.blockctl_ok(Some(i), &["verify", RESOURCE, "--wait", "--timeout", "180"]);
    println!("{}", out.trim());
    let v = verify_status(c, i);
    assert_eq!(v["state"], "done", "{v:#}");
    assert_eq!(v["done_bytes"], v["total_bytes"], "{v:#}");
    assert_eq!(v["total_bytes"].as_u64(), Some(c.data_size()), "{v:#}");
    v
}

/// Overwrites `[offset, offset + len)` of node `i`'s backing file with a byte pattern.
fn corrupt(c: &Cluster, i: usize, offset: u64, len: u64, byte: u8) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&c.nodes[i].backing)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&vec![byte; len as usize]).unwrap();
    f.sync_all().unwrap();
}

fn wait_established(c: &Cluster, i: usize) {
    c.wait_peer(i, 1 - i, Duration::from_secs(60), "established", |p| {
        p["connection"] == "connected" && p["replication"] == "established"
    });
}

#[test]
fn verify_under_writes_has_no_false_positives_and_finds_corrupted_blocks() {
    let mut c = started_pair(256 << 20);
    c.write_random(0, 0, 96 << 20, 7);
    c.wait_synced(0, Duration::from_secs(60));

    // 1. Verify while the application writes: progress is visible, nothing differs.
    let events = EventLog::start(&c, 0, "n0");
    let mut app = fio_writer(&c, 0, 300);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    c.blockctl_ok(Some(0), &["verify", RESOURCE]);
    let mut seen_running = false;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = verify_status(&c, 0);
        if v["state"] == "running" && v["done_bytes"].as_u64().unwrap_or(0) > 0 {
            seen_running = true;
            assert!(v["percent"].as_f64().is_some(), "{v:#}");
        }
        if v["state"] == "done" {
            assert_eq!(v["done_bytes"], v["total_bytes"], "{v:#}");
            assert_eq!(
                v["differing_blocks"], 0,
                "verify under load reported differences: {v:#}"
            );
            println!(
                "verify of {} MiB under fio writes: {:.1} s, 0 differences",
                c.data_size() >> 20,
                started.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(Instant::now() < deadline, "verify did not end: {v:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen_running, "progress was never visible in status");
    assert!(
        app.0.try_wait().unwrap().is_none(),
        "fio ran during the whole verify"
    );
    let ev = events.wait_for("verify-done", "0 blocks", Duration::from_secs(10));
    println!("event: {ev}");
    stop_fio(app);
    c.wait_synced(0, Duration::from_secs(60));
    assert_eq!(c.status(0)["peers"][0]["out_of_sync_bytes"], 0);
    c.assert_identical(0);

    // 2. Corrupt blocks of n1 behind blockd's back, then verify: exactly those are found.
    c.stop(1);
    let last = c.data_size() - BS;
    let bad = [(100 * BS, BS), (5000 * BS, 3 * BS), (last, BS)];
    for (k, &(o, l)) in bad.iter().enumerate() {
        corrupt(&c, 1, o, l, 0xA0 + k as u8);
    }
    c.start_node(1);
    wait_established(&c, 0);
    let v = verify(&c, 0);
    assert_eq!(v["differing_blocks"], 5, "{v:#}");
    assert_eq!(v["differing_bytes"], 5 * BS, "{v:#}");
    let ranges: Vec<(u64, u64)> = v["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(ranges, bad.to_vec());
    let ev = events.wait_for("verify-done", "5 blocks", Duration::from_secs(10));
    assert!(
        ev["value"]
            .as_str()
            .unwrap()
            .contains(&format!("{}+{}", 5000 * BS, 3 * BS)),
        "{ev}"
    );
    // Marked out of sync for the peer; a reconnect resyncs them.
    assert_eq!(c.status(0)["peers"][0]["out_of_sync_bytes"], 5 * BS);
    c.blockctl_ok(Some(0), &["disconnect", RESOURCE]);
    c.blockctl_ok(Some(0), &["connect", RESOURCE]);
    c.wait_synced(0, Duration::from_secs(60));
    c.assert_identical(0);
    let v = verify(&c, 0);
    assert_eq!(v["differing_blocks"], 0, "{v:#}");
}

#[test]
fn invalidate_and_invalidate_remote_resync_the_whole_device() {
    let mut c = started_pair(64 << 20);
    c.write_random(0, 0, 32 << 20, 11);
    c.wait_synced(0, Duration::from_secs(60));

    // The Primary's data is in use: invalidating it is refused (exit code 3).
    let o = c.blockctl(Some(0), &["invalidate", RESOURCE]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");

    // Damage n1 everywhere, then `invalidate` on n1: a full resync from n0.
    c.stop(1);
    for k in 0..16 {
        corrupt(&c, 1, k * (4 << 20), 64 << 10, 0x5A);
    }
    c.start_node(1);
    wait_established(&c, 0);
    c.blockctl_ok(Some(1), &["invalidate", RESOURCE]);
    c.wait_peer(0, 1, Duration::from_secs(60), "a full resync", |p| {
        p["resync"]["total_bytes"].as_u64().unwrap_or(0) >= c.data_size()
            || (p["replication"] == "established" && p["out_of_sync_bytes"] == 0)
    });
    c.wait_synced(0, Duration::from_secs(120));
    c.assert_identical(0);
    assert!(
        c.log(0).contains("resync started (source)"),
        "n0 ran a resync"
    );

    // Damage n1 again; `invalidate-remote r0 n1` on the Primary resyncs it.
    c.stop(1);
    corrupt(&c, 1, 8 << 20, 1 << 20, 0x3C);
    c.start_node(1);
    wait_established(&c, 0);
    let resyncs = |c: &Cluster| c.log(0).matches("resync started (source)").count();
    let before = resyncs(&c);
    c.blockctl_ok(Some(0), &["invalidate-remote", RESOURCE, "n1"]);
    integration_tests::wait_for(
        Duration::from_secs(60),
        || resyncs(&c) > before,
        "n0 to start a resync to n1",
    );
    c.wait_synced(0, Duration::from_secs(120));
    c.assert_identical(0);
    let o = c.blockctl(Some(0), &["invalidate-remote", RESOURCE, "nobody"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
}

/// `blockctl verify` asked while the peer is resyncing (here: the sync target of a full resync
/// started with `invalidate-remote`) is queued, says why in status, starts once the resync is
/// done and finishes with zero differences: it is neither refused nor left hanging.
#[test]
fn verify_of_a_resyncing_peer_waits_for_the_resync_then_runs() {
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = 64 << 20;
    // A plain resync at 16 MiB/s: the full resync of 32 MiB of data lasts about 2 s.
    opts.resync_rate = "16M".to_string();
    opts.extra_global = "csums = \"no\"\n".to_string();
    let c = Cluster::start(&opts);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));
    c.write_random(0, 0, 32 << 20, 7);
    c.wait_synced(0, Duration::from_secs(120));

    c.blockctl_ok(Some(0), &["invalidate-remote", RESOURCE]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status(0)["peers"][0]["replication"] != "sync-source" {
        assert!(Instant::now() < deadline, "no resync: {:#}", c.status(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Asked during the resync: accepted, queued with the reason.
    c.blockctl_ok(Some(0), &["verify", RESOURCE]);
    let v = verify_status(&c, 0);
    assert_eq!(v["state"], "running", "{v:#}");
    let waiting = v["waiting"].as_str().unwrap_or_default().to_string();
    assert!(waiting.contains("n1 is resyncing"), "{v:#}");
    // It starts after the resync and ends (blockctl's own wait is for a verify it starts).
    let deadline = Instant::now() + Duration::from_secs(120);
    let v = loop {
        let v = verify_status(&c, 0);
        if v["state"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "verify not done: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["state"], "done", "{v:#}");
    assert_eq!(v["differing_blocks"], 0, "{v:#}");
    assert_eq!(v["done_bytes"], v["total_bytes"], "{v:#}");
    let log = c.log(0);
    assert!(log.contains("online verify queued"), "{log}");
    assert!(
        log.contains("online verify started (it was queued)"),
        "{log}"
    );
    assert!(
        log.contains("resync finished (source)"),
        "the resync ended first: {log}"
    );
}
