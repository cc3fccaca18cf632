//! Resync efficiency measured on the wire: the link between the Primary and its peer runs
//! through a counting TCP proxy (the Primary dials the proxy; the peer listens on 127.0.0.2).
//! The peer is disconnected, 1% of a 1 GiB device is written at scattered offsets, the peer is
//! reconnected: the bytes crossing the proxy during the resync (both directions: TLS, handshake,
//! bitmap, data, acks) are within 1.2x of the dirty bytes, and both copies are identical after.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::link_proxy::{LinkConfig, ProxiedPair};
use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE};
use integration_tests::{TestRng, require_tool, run_ok};

const CHUNK: u64 = 64 << 10;

/// A 2-node cluster whose link runs through a counting proxy; both nodes started, n0 Primary
/// and in sync.
fn proxied_cluster(size: u64, resync_rate: &str, extra_global: &str) -> ProxiedPair {
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = size;
    opts.resync_rate = resync_rate.to_string();
    opts.extra_global = extra_global.to_string();
    let p = ProxiedPair::start(&opts, LinkConfig::QUEUED);
    p.cluster.promote(0, true);
    p.cluster.wait_synced(0, Duration::from_secs(120));
    assert!(p.proxy.bytes() > 0, "the link runs through the proxy");
    p
}

/// Disconnects n1 (n0 stops dialing) and writes 64 KiB chunks at distinct random offsets
/// until `target` bytes are dirty; returns the dirty bytes.
fn dirty_while_disconnected(c: &Cluster, target: u64, seed: u64) -> u64 {
    c.blockctl_ok(Some(0), &["disconnect", RESOURCE, "--peer", "n1"]);
    integration_tests::wait_for(
        Duration::from_secs(10),
        || c.status(0)["peers"][0]["connection"] != "connected",
        "n0 to drop the link",
    );
    let size = c.data_size();
    let mut rng = TestRng::new(seed);
    let mut chunks = BTreeSet::new();
    while (chunks.len() as u64) * CHUNK < target {
        chunks.insert(rng.below(size / CHUNK));
    }
    let dirty = chunks.len() as u64 * CHUNK;
    for batch in chunks.iter().collect::<Vec<_>>().chunks(256) {
        let mut cmd = Command::new(require_tool("qemu-io", "qemu-utils"));
        cmd.args(["-f", "raw", &c.nbd_uri(0)]);
        for (k, ch) in batch.iter().enumerate() {
            cmd.args([
                "-c",
                &format!("write -P {} {} {CHUNK}", 1 + k % 250, *ch * CHUNK),
            ]);
        }
        run_ok(&mut cmd, Duration::from_secs(120));
    }
    let tracked = c.status(0)["peers"][0]["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        tracked, dirty,
        "the bitmap tracks exactly the written bytes"
    );
    dirty
}

#[test]
fn resync_of_one_percent_moves_at_most_1_2x_the_dirty_bytes() {
    let ProxiedPair {
        cluster: c, proxy, ..
    } = proxied_cluster(1 << 30, "1G", "");
    let dirty = dirty_while_disconnected(&c, (1 << 30) / 100, 0x5eed);
    proxy.reset_bytes();
    let started = Instant::now();
    c.blockctl_ok(Some(0), &["connect", RESOURCE, "--peer", "n1"]);
    c.wait_synced(0, Duration::from_secs(120));
    let wire = proxy.bytes();
    let ratio = wire as f64 / dirty as f64;
    println!(
        "dirty {dirty} bytes, resync on the wire {wire} bytes = {ratio:.3}x, {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(wire >= dirty, "the dirty data crossed the wire");
    assert!(ratio <= 1.2, "resync moved {ratio:.3}x the dirty bytes");
    c.assert_identical(0);
}

/// The Primary (resync source) is killed with SIGKILL half-way through a resync; restarted, it
/// resumes from its persisted bitmap (plus the extents of its activity log, which a crashed
/// primary must resync): the bytes on the wire after the restart are what was left, not the
/// whole dirty set again. A small activity log (7 extents of 4 MiB) keeps the replayed set small.
#[test]
fn resync_resumes_after_the_primary_is_killed() {
    // 128 MiB device, resync at 32 MB/s: 92 MiB dirty takes about 3 s to resync.
    let ProxiedPair {
        cluster: mut c,
        proxy,
        configs: [n0_conf, _],
    } = proxied_cluster(128 << 20, "32M", "al-extents = 7\n");
    c.blockctl_ok(Some(0), &["disconnect", RESOURCE, "--peer", "n1"]);
    integration_tests::wait_for(
        Duration::from_secs(10),
        || c.status(0)["peers"][0]["connection"] != "connected",
        "n0 to drop the link",
    );
    // 0..64 MiB first (evicted from the activity log by what follows), then 64..92 MiB (hot).
    c.write_random(0, 0, 64 << 20, 1);
    c.write_random(0, 64 << 20, 28 << 20, 2);
    let dirty = c.status(0)["peers"][0]["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(dirty, 92 << 20);
    c.blockctl_ok(Some(0), &["connect", RESOURCE, "--peer", "n1"]);
    // The bitmap is persisted every 16 MiB of walk: kill after more than 32 MiB. (Until the
    // new resync starts, the status still shows the finished initial one: 128 MiB done of
    // 128; the one to watch is the resync of the dirty bytes.)
    let mut done = 0;
    integration_tests::wait_for(
        Duration::from_secs(60),
        || {
            let resync = &c.status(0)["peers"][0]["resync"];
            done = resync["done_bytes"].as_u64().unwrap_or(0);
            resync["total_bytes"].as_u64() == Some(dirty) && done >= 34 << 20
        },
        "resync progress past 34 MiB",
    );
    c.kill(0);
    proxy.reset_bytes();
    c.start_node_with(0, &n0_conf);
    let mut total = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.status(0);
        let p = &st["peers"][0];
        if total.is_none() {
            total = p["resync"]["total_bytes"].as_u64();
        }
        if p["replication"] == "established" && p["out_of_sync_bytes"] == 0 && p["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "resync did not finish: {st:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let wire = proxy.bytes();
    println!(
        "dirty {dirty}, resynced before the kill {done}, after restart: resync total {total:?}, {wire} bytes on the wire"
    );
    let lines = |i: usize| {
        c.log(i)
            .lines()
            .filter(|l| {
                l.contains("handshake")
                    || l.contains("resync")
                    || l.contains("unclean")
                    || l.contains("torn")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        wire < dirty - (16 << 20),
        "resync restarted instead of resuming: {wire} bytes on the wire for {dirty} dirty\n{}\n{}",
        lines(0),
        lines(1)
    );
    c.promote(0, false);
    c.wait_synced(0, Duration::from_secs(60));
    c.assert_identical(0);
}
