//! Split brain with real processes (two `blockd --config` nodes on 127.0.0.1, protocol C).
//!
//! Every scenario makes the same divergence: n0 is Primary and in sync with n1; both are
//! disconnected; n1 is promoted; n0 writes region A, n1 writes region B, both write region C
//! (different data). Then they reconnect:
//! - default policy (`disconnect`): both sides go StandAlone, `last_error` and a `split-brain`
//!   event report it, no data moves; manual recovery `connect --discard-my-data` on n1 resyncs
//!   exactly A ∪ B ∪ C (both bitmaps combined), and n1's side file holds those blocks as they
//!   were on n1 (listed and extracted with `blockctl divergent`);
//! - each automatic policy picks the victim DRBD would, which resyncs only A ∪ B ∪ C and saves
//!   them to its side file.

use std::time::Duration;

use integration_tests::repl::{Cluster, ClusterOptions, EventLog, RESOURCE, tail};

const MIB: u64 = 1 << 20;
/// Written only on n0.
const A: (u64, u64) = (8 * MIB, MIB);
/// Written only on n1 (when it writes).
const B: (u64, u64) = (24 * MIB, 2 * MIB);
/// Written on both, different data.
const C: (u64, u64) = (40 * MIB, MIB);

fn cluster(extra_global: &str) -> Cluster {
    let mut opts = ClusterOptions::new(2, "C");
    opts.extra_global = extra_global.to_string();
    let c = Cluster::start(&opts);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(60));
    c
}

/// Splits the cluster and writes on both sides (n1 writes B and C only when `n1_writes`).
/// Leaves n0 and n1 Primary and disconnected.
fn diverge(c: &Cluster, n1_writes: bool) {
    c.blockctl_ok(Some(1), &["disconnect", RESOURCE]);
    c.blockctl_ok(Some(0), &["disconnect", RESOURCE]);
    for (i, p) in [(0, 1), (1, 0)] {
        c.wait_peer(i, p, Duration::from_secs(20), "standalone", |p| {
            p["connection"] == "standalone"
        });
    }
    c.promote(1, false);
    c.write_random(0, A.0, A.1, 1);
    c.write_random(0, C.0, C.1, 3);
    if n1_writes {
        c.write_random(1, B.0, B.1, 2);
        c.write_random(1, C.0, C.1, 4);
    }
}

fn connect(c: &Cluster, i: usize, discard_my_data: bool) {
    let mut args = vec!["connect", RESOURCE];
    if discard_my_data {
        args.push("--discard-my-data");
    }
    c.blockctl_ok(Some(i), &args);
}

/// The ranges both sides changed (what the victim must receive).
fn changed(n1_writes: bool) -> Vec<(u64, u64)> {
    if n1_writes { vec![A, B, C] } else { vec![A, C] }
}

/// Waits for the resync from `survivor` to `victim` to finish and checks it moved exactly the
/// changed blocks, the copies are identical, and the victim's side file holds what it had.
fn check_recovered(
    c: &Cluster,
    survivor: usize,
    victim: usize,
    victim_before: &[(u64, Vec<u8>)],
    reason: &str,
) {
    c.wait_synced(survivor, Duration::from_secs(60));
    c.assert_identical(survivor);
    let want: u64 = victim_before.iter().map(|(_, d)| d.len() as u64).sum();
    let sent = c
        .last_resync_source_bytes(survivor)
        .unwrap_or_else(|| panic!("no resync on the survivor:\n{}", tail(&c.log(survivor), 40)));
    assert_eq!(
        sent, want,
        "the victim resynced {sent} bytes, not just the {want} changed bytes"
    );
    println!(
        "{}: {} discarded its data ({reason}); resync moved {sent} bytes of a {} byte device",
        RESOURCE,
        c.nodes[victim].name,
        c.data_size()
    );

    // The side file: one complete session, exactly the changed ranges, the victim's old data.
    let text = c.blockctl_ok(Some(victim), &["divergent", RESOURCE, "--json"]);
    let list: serde_json::Value = serde_json::from_str(&text).expect("divergent json");
    let sessions = list["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 1, "{list:#}");
    let s = &sessions[0];
    assert_eq!(s["complete"], true, "{s:#}");
    assert_eq!(s["bytes"].as_u64(), Some(want), "{s:#}");
    assert_eq!(s["peer"], c.nodes[survivor].name.as_str());
    assert!(s["reason"].as_str().unwrap().contains(reason), "{s:#}");
    let ranges: Vec<(u64, u64)> = s["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    let mut want_ranges: Vec<(u64, u64)> = victim_before
        .iter()
        .map(|(o, d)| (*o, d.len() as u64))
        .collect();
    want_ranges.sort_unstable();
    assert_eq!(ranges, want_ranges);
    let human = c.blockctl_ok(Some(victim), &["divergent", RESOURCE]);
    assert!(human.contains(&c.nodes[survivor].name), "{human}");
    for (k, (off, data)) in victim_before.iter().enumerate() {
        let out = c.dir.path().join(format!("extract-{k}.bin"));
        c.blockctl_ok(
            Some(victim),
            &[
                "divergent",
                RESOURCE,
                "--session",
                "0",
                "--offset",
                &off.to_string(),
                "--length",
                &data.len().to_string(),
                "--extract",
                &out.to_string_lossy(),
            ],
        );
        let got = std::fs::read(&out).unwrap();
        assert!(
            got == *data,
            "extracted range at {off} differs from the victim's old data"
        );
        // ... and it is not what the survivor has there now (it really was divergent or old).
        assert!(got != c.read_backing(survivor, *off, data.len() as u64));
    }
    // A range that was not saved is refused with a clear error.
    let o = c.blockctl(
        Some(victim),
        &[
            "divergent",
            RESOURCE,
            "--session",
            "0",
            "--offset",
            "0",
            "--length",
            "4096",
            "--extract",
            &c.dir.path().join("nothing.bin").to_string_lossy(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not saved"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn snapshot(c: &Cluster, i: usize, ranges: &[(u64, u64)]) -> Vec<(u64, Vec<u8>)> {
    ranges
        .iter()
        .map(|&(o, l)| (o, c.read_backing(i, o, l)))
        .collect()
}

#[test]
fn detected_left_standalone_then_manual_discard_my_data() {
    let c = cluster("");
    diverge(&c, true);
    let ev0 = EventLog::start(&c, 0, "n0");
    let ev1 = EventLog::start(&c, 1, "n1");
    let sums = (c.data_checksum(0), c.data_checksum(1));
    connect(&c, 0, false);
    connect(&c, 1, false);
    for (i, p) in [(0, 1), (1, 0)] {
        let st = c.wait_peer(i, p, Duration::from_secs(20), "split brain reported", |p| {
            p["connection"] == "standalone"
                && p["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("split brain"))
        });
        println!("{}: {}", c.nodes[i].name, st["peers"][0]);
    }
    ev0.wait_for("split-brain", "", Duration::from_secs(10));
    ev1.wait_for("split-brain", "", Duration::from_secs(10));
    // It stays that way: nothing reconnects by itself, no data moved.
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        let st = c.status(i);
        assert_eq!(st["peers"][0]["connection"], "standalone", "{st:#}");
        assert_eq!(st["role"], "primary");
        let line = c.blockctl_ok(Some(i), &["status", RESOURCE]);
        assert!(
            line.contains("connection:standalone") && line.contains("split brain"),
            "{line}"
        );
    }
    assert_eq!(
        (c.data_checksum(0), c.data_checksum(1)),
        sums,
        "data was touched"
    );
    assert!(
        c.blockctl_ok(Some(1), &["divergent", RESOURCE, "--json"])
            .contains("\"sessions\": []"),
        "no side file before any discard"
    );

    // Manual recovery: n1 is the victim.
    let before = snapshot(&c, 1, &changed(true));
    // Not while it is Primary: the resync would write under its users.
    let out = c.blockctl(Some(1), &["connect", RESOURCE, "--discard-my-data"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("demote this node first"),
        "{err}"
    );
    c.blockctl_ok(Some(1), &["demote", RESOURCE]);
    connect(&c, 1, true);
    connect(&c, 0, false);
    check_recovered(&c, 0, 1, &before, "manual");
}

/// Runs one automatic policy: `demote` lists the nodes demoted before reconnecting.
fn policy(extra: &str, n1_writes: bool, demote: &[usize], survivor: usize, reason: &str) {
    let c = cluster(extra);
    diverge(&c, n1_writes);
    for &i in demote {
        c.blockctl_ok(Some(i), &["demote", RESOURCE]);
    }
    let victim = 1 - survivor;
    let before = snapshot(&c, victim, &changed(n1_writes));
    let ev = EventLog::start(&c, victim, "victim");
    connect(&c, 0, false);
    connect(&c, 1, false);
    ev.wait_for("split-brain", reason, Duration::from_secs(20));
    check_recovered(&c, survivor, victim, &before, reason);
}

#[test]
fn after_sb_0pri_discard_zero_changes() {
    // n1 became Primary but wrote nothing: n1 discards.
    policy(
        "after-sb-0pri = \"discard-zero-changes\"",
        false,
        &[0, 1],
        0,
        "zero-changes",
    );
}

#[test]
fn after_sb_0pri_discard_least_changes() {
    // n0 changed A + C (2 MiB), n1 changed B + C (3 MiB): n0 discards.
    policy(
        "after-sb-0pri = \"discard-least-changes\"",
        true,
        &[0, 1],
        1,
        "least-changes",
    );
}

#[test]
fn after_sb_0pri_discard_younger_primary() {
    // n1 became Primary after the split: n1 discards, although it changed more.
    policy(
        "after-sb-0pri = \"discard-younger-primary\"",
        true,
        &[0, 1],
        0,
        "younger-primary",
    );
}

#[test]
fn after_sb_0pri_discard_older_primary() {
    // n0 was Primary at the split: n0 discards.
    policy(
        "after-sb-0pri = \"discard-older-primary\"",
        true,
        &[0, 1],
        1,
        "older-primary",
    );
}

#[test]
fn after_sb_1pri_discard_secondary() {
    // n0 stays Primary, n1 is demoted: the Secondary discards.
    policy(
        "after-sb-1pri = \"discard-secondary\"",
        true,
        &[1],
        0,
        "secondary",
    );
}
