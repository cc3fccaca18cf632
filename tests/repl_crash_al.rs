//! Crash consistency of the Primary through its activity log, with real processes and the
//! replication bytes counted on the wire (a counting proxy between the two nodes).
//!
//! A writer issues 4 KiB writes (16 in flight, protocol C) to three 4 MiB extents of a 512 MiB
//! device; the Primary is killed with SIGKILL in the middle. At that moment the two copies may
//! differ in blocks that were in flight. Restarted, the Primary finds its metadata unclean,
//! marks the extents of its activity log out of sync and resyncs them to the peer as a crashed
//! primary: the bytes on the wire are at least what differs and far below the device size
//! (never a full sync), and the copies end identical. Three rounds, each killed at a random
//! moment.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::link_proxy::{LinkConfig, ProxiedPair};
use integration_tests::repl::{ClusterOptions, WRITER_PY};
use integration_tests::{ChildGuard, TestRng, debian_python};

const SIZE: u64 = 512 << 20;
const EXTENT: u64 = 4 << 20;
const HOT_EXTENTS: u64 = 3;
const ROUNDS: u64 = 3;

/// Bytes of 4 KiB blocks that differ between the data areas of the two backing files.
fn differing_bytes(a: &std::path::Path, b: &std::path::Path, len: u64) -> u64 {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut left = len;
    let mut differ = 0;
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        differ += ba[..n]
            .chunks(4096)
            .zip(bb[..n].chunks(4096))
            .filter(|(x, y)| x != y)
            .count() as u64
            * 4096;
        left -= n as u64;
    }
    differ
}

/// The default (`csums = "auto"`): the replayed extents are compared by checksum first.
#[test]
fn sigkill_of_the_primary_resyncs_only_its_activity_log_extents() {
    crash_rounds("");
}

/// `csums = "no"`: every block of the replayed extents is sent, and nothing more.
#[test]
fn sigkill_of_the_primary_without_checksums_sends_the_activity_log_extents() {
    crash_rounds("csums = \"no\"\n");
}

fn crash_rounds(extra: &str) {
    let python = debian_python();
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = SIZE;
    opts.extra_global = extra.to_string();
    let mut p = ProxiedPair::create(&opts, LinkConfig::QUEUED);
    p.start_node(0);
    p.start_node(1);
    p.cluster.promote(0, true);
    p.cluster.wait_synced(0, Duration::from_secs(60));
    let script = p.cluster.dir.path().join("writer.py");
    std::fs::write(&script, WRITER_PY).unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = TestRng::new(seed);
    let data = p.cluster.data_size();
    let blocks = HOT_EXTENTS * EXTENT / 4096;
    for round in 1..=ROUNDS {
        let log = p.cluster.dir.path().join(format!("acked-{round}.log"));
        let writer = ChildGuard(
            Command::new(&python)
                .arg(&script)
                .args([
                    "write",
                    &p.cluster.nbd_uri(0),
                    &round.to_string(),
                    &rng.next_u64().to_string(),
                    &blocks.to_string(),
                ])
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn writer"),
        );
        integration_tests::wait_for(
            Duration::from_secs(20),
            || std::fs::metadata(&log).is_ok_and(|m| m.len() > 0),
            "the writer's first acknowledged write",
        );
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        p.cluster.kill(0);
        drop(writer);
        // What differs now: blocks in flight at the kill (n1 keeps running as Secondary).
        std::thread::sleep(Duration::from_millis(300));
        let differ = differing_bytes(
            &p.cluster.nodes[0].backing,
            &p.cluster.nodes[1].backing,
            data,
        );
        p.proxy.reset_bytes();
        let started = Instant::now();
        p.start_node(0);
        let mut total = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = p.cluster.status(0);
            let s = &st["peers"][0];
            total = total.max(s["resync"]["total_bytes"].as_u64().unwrap_or(0));
            total = total.max(s["out_of_sync_bytes"].as_u64().unwrap_or(0));
            if s["connection"] == "connected"
                && s["replication"] == "established"
                && s["out_of_sync_bytes"] == 0
                && s["disk"] == "up-to-date"
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no resync after the restart: {st:#}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let wire = p.proxy.bytes();
        println!(
            "round {round}: {differ} bytes differed after the kill; after the restart {total} bytes \
             out of sync (activity log), {wire} bytes on the wire, {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert!(
            p.cluster
                .log(0)
                .contains("unclean shutdown: activity-log extents marked out of sync"),
            "the restarted primary replayed its activity log"
        );
        assert!(total > 0, "the activity-log extents were resynced");
        assert!(
            total <= 16 * EXTENT,
            "{total} bytes resynced: more than the hot extents"
        );
        assert!(
            wire >= differ,
            "{wire} bytes on the wire < {differ} bytes that differ"
        );
        assert!(
            wire < data / 10,
            "{wire} bytes on the wire: not a full sync"
        );
        if !extra.is_empty() {
            // Without checksums the replayed extents cross the wire, plus protocol overhead.
            assert!(
                wire >= total,
                "{wire} bytes on the wire < {total} bytes out of sync"
            );
            assert!(
                wire <= total + total / 5,
                "{wire} bytes on the wire for {total} out of sync"
            );
        }
        p.cluster.assert_identical(0);
        p.cluster.promote(0, false);
        p.cluster.wait_synced(0, Duration::from_secs(60));
    }
}
