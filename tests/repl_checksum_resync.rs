//! Checksum-based resync, bytes counted on the wire (a counting proxy between the two nodes):
//! - a full sync (`promote --force` of a new cluster) between two identical 1 GiB copies moves
//!   under 1% of the data: both sides compare block checksums first (`csums = "auto"`, the
//!   default, uses them whenever the bitmap is untrusted: full sync, crashed primary);
//! - with 1% of the blocks different, only about those blocks cross the wire;
//! - `blockctl connect --checksum` does the same for a bitmap resync (`csums = "no"` otherwise
//!   sends every dirty block).
//! Copies are identical afterwards in every case.

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use integration_tests::TestRng;
use integration_tests::link_proxy::{LinkConfig, ProxiedPair};
use integration_tests::repl::{ClusterOptions, RESOURCE};

const GIB: u64 = 1 << 30;
/// Data written before the cluster starts stays clear of the internal metadata at the end.
const META_MARGIN: u64 = 64 << 20;

/// Fills `[0, len)` of `path` with pseudo-random data, the same for the same seed: 1 MiB of
/// random bytes, every 4 KiB block stamped with its index.
fn fill_identical(path: &std::path::Path, len: u64, seed: u64) {
    let mut base = vec![0u8; 1 << 20];
    TestRng::new(seed).fill(&mut base);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = base.clone();
    for mib in 0..len >> 20 {
        for (b, block) in buf.chunks_mut(4096).enumerate() {
            let stamp = (mib << 8 | b as u64).to_le_bytes();
            block[..8].copy_from_slice(&stamp);
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// Overwrites 64 KiB chunks at distinct random offsets of `path` (below `limit`) until `target`
/// bytes differ; returns the bytes changed.
fn scatter_changes(path: &std::path::Path, limit: u64, target: u64, seed: u64) -> u64 {
    const CHUNK: u64 = 64 << 10;
    let mut rng = TestRng::new(seed);
    let mut chunks = std::collections::BTreeSet::new();
    while (chunks.len() as u64) * CHUNK < target {
        chunks.insert(rng.below(limit / CHUNK));
    }
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = vec![0u8; CHUNK as usize];
    for ch in &chunks {
        rng.fill(&mut buf);
        f.seek(SeekFrom::Start(ch * CHUNK)).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    chunks.len() as u64 * CHUNK
}

/// Two nodes whose 1 GiB backing files hold the same data (n1's then changed by `change`),
/// started; n0 is force-promoted (a full sync) and the bytes on the wire until both are in sync
/// are returned with the elapsed time.
fn full_sync_wire_bytes(change: impl FnOnce(&std::path::Path) -> u64) -> (u64, u64, f64) {
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = GIB;
    let mut p = ProxiedPair::create(&opts, LinkConfig::QUEUED);
    for i in 0..2 {
        fill_identical(&p.cluster.nodes[i].backing, GIB - META_MARGIN, 0xC5);
    }
    let differ = change(&p.cluster.nodes[1].backing);
    p.start_node(0);
    p.start_node(1);
    p.cluster
        .wait_peer(0, 1, Duration::from_secs(60), "connected", |s| {
            s["connection"] == "connected"
        });
    p.proxy.reset_bytes();
    let started = Instant::now();
    p.cluster.promote(0, true);
    p.cluster.wait_synced(0, Duration::from_secs(300));
    let secs = started.elapsed().as_secs_f64();
    let wire = p.proxy.bytes();
    assert!(
        p.cluster.log(0).contains("checksum resync"),
        "the full sync compared checksums:\n{}",
        integration_tests::repl::tail(&p.cluster.log(0), 30)
    );
    p.cluster.assert_identical(0);
    (wire, differ, secs)
}

#[test]
fn full_sync_of_identical_copies_moves_under_one_percent() {
    let (wire, _, secs) = full_sync_wire_bytes(|_| 0);
    let pct = wire as f64 * 100.0 / GIB as f64;
    println!(
        "identical 1 GiB copies: full sync moved {wire} bytes on the wire ({pct:.3}%) in {secs:.1} s"
    );
    assert!(pct < 1.0, "{wire} bytes on the wire = {pct:.3}% of 1 GiB");
}

#[test]
fn full_sync_of_one_percent_different_copies_moves_about_the_difference() {
    let (wire, differ, secs) =
        full_sync_wire_bytes(|path| scatter_changes(path, GIB - META_MARGIN, GIB / 100, 0xD1FF));
    let ratio = wire as f64 / differ as f64;
    println!(
        "1%-different 1 GiB copies: {differ} bytes differ, full sync moved {wire} bytes on the wire ({ratio:.3}x) in {secs:.1} s"
    );
    assert!(wire >= differ, "every differing block crossed the wire");
    assert!(
        wire <= differ + differ / 5 + GIB / 100,
        "{wire} bytes on the wire for {differ} differing bytes"
    );
}

#[test]
fn connect_with_checksum_skips_dirty_blocks_that_are_equal() {
    let mut opts = ClusterOptions::new(2, "C");
    opts.extra_global = "csums = \"no\"\n".to_string();
    let mut p = ProxiedPair::create(&opts, LinkConfig::QUEUED);
    p.start_node(0);
    p.start_node(1);
    p.cluster.promote(0, true);
    p.cluster.wait_synced(0, Duration::from_secs(60));
    let c = &p.cluster;
    const DIRTY: u64 = 16 << 20;
    c.write_random(0, 0, DIRTY, 3);
    c.wait_synced(0, Duration::from_secs(60));
    // Rewrite the same bytes while disconnected: dirty in the bitmap, equal on both copies.
    let rewrite_same = |connect: &[&str]| {
        c.blockctl_ok(Some(0), &["disconnect", RESOURCE]);
        c.wait_peer(0, 1, Duration::from_secs(10), "disconnected", |s| {
            s["connection"] != "connected"
        });
        c.write_random(0, 0, DIRTY, 3);
        assert_eq!(c.status(0)["peers"][0]["out_of_sync_bytes"], DIRTY);
        p.proxy.reset_bytes();
        c.blockctl_ok(Some(0), connect);
        c.wait_synced(0, Duration::from_secs(60));
        c.assert_identical(0);
        p.proxy.bytes()
    };
    let plain = rewrite_same(&["connect", RESOURCE]);
    let summed = rewrite_same(&["connect", RESOURCE, "--checksum"]);
    println!("16 MiB dirty but equal: plain resync {plain} bytes, checksum resync {summed} bytes");
    assert!(plain >= DIRTY, "csums = no sends the dirty blocks: {plain}");
    assert!(summed < DIRTY / 50, "--checksum sent {summed} bytes");
}
