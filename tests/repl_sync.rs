//! Replication with real `blockd --config` processes on 127.0.0.1: 2 and 3 nodes under
//! protocols A, B and C. Data written through NBD on the Primary (qemu-io, random data) is
//! bit-identical on every secondary's backing data area after sync; a disconnected secondary
//! is tracked in the bitmap, resynced on reconnect, and identical again.

use std::time::Duration;

use integration_tests::repl::tail;
use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE};

const SYNC: Duration = Duration::from_secs(60);

fn replicate(nodes: usize, protocol: &str, seed: u64) {
    let mut c = Cluster::start(&ClusterOptions::new(nodes, protocol));
    c.promote(0, true);
    c.wait_synced(0, SYNC);
    c.assert_identical(0);

    // Writes through NBD: a few random ranges, one unaligned.
    c.write_random(0, 0, 4 << 20, seed);
    c.write_random(0, (20 << 20) + 3 * 512, (3 << 20) + 1000, seed + 1);
    c.write_random(0, c.data_size() - (1 << 20), 1 << 20, seed + 2);
    c.wait_synced(0, SYNC);
    c.assert_identical(0);

    // The last secondary goes away (admin disconnect on its side), the Primary keeps writing
    // and tracks the blocks in that peer's bitmap; reconnect resyncs only those.
    let last = nodes - 1;
    c.blockctl_ok(Some(last), &["disconnect", RESOURCE]);
    integration_tests::wait_for(
        Duration::from_secs(10),
        || {
            c.status(0)["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["node"] == c.nodes[last].name && p["connection"] != "connected")
        },
        "the Primary to see the peer disconnected",
    );
    c.write_random(0, 8 << 20, 2 << 20, seed + 3);
    let behind = c.status(0)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == c.nodes[last].name)
        .unwrap()["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        behind,
        2 << 20,
        "out-of-sync bytes tracked for the disconnected peer"
    );
    c.blockctl_ok(Some(last), &["connect", RESOURCE]);
    c.wait_synced(0, SYNC);
    c.assert_identical(0);

    if nodes == 2 && protocol == "C" {
        second_instance_is_refused(&c, last);
    }

    // Clean shutdown of every node: exit status 0.
    for i in (0..nodes).rev() {
        c.stop(i);
    }
}

#[test]
fn two_nodes_protocol_a() {
    replicate(2, "A", 100);
}

#[test]
fn two_nodes_protocol_b() {
    replicate(2, "B", 200);
}

#[test]
fn two_nodes_protocol_c() {
    replicate(2, "C", 300);
}

#[test]
fn three_nodes_protocol_a() {
    replicate(3, "A", 400);
}

#[test]
fn three_nodes_protocol_b() {
    replicate(3, "B", 500);
}

#[test]
fn three_nodes_protocol_c() {
    replicate(3, "C", 600);
}

/// A second blockd for a node that is running (a systemd unit started beside a cluster
/// manager's), and `create-md --force` against it, are refused before they touch its metadata:
/// the running node stays connected, in sync and consistent.
fn second_instance_is_refused(c: &Cluster, i: usize) {
    let out = std::process::Command::new(integration_tests::blockd_bin())
        .arg("--config")
        .arg(&c.config)
        .args(["--node", &c.nodes[i].name])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run a second blockd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second blockd started: {err}");
    assert!(err.contains("in use by another process"), "{err}");
    let out = c.blockctl(Some(i), &["create-md", RESOURCE, "--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "create-md overwrote live metadata: {err}"
    );
    assert!(err.contains("in use by another process"), "{err}");
    let st = c.status(i);
    assert_eq!(st["disk"], "up-to-date", "{st}");
    c.wait_synced(0, SYNC);
    c.assert_identical(0);
    assert!(!c.log(i).contains("unclean"), "{}", tail(&c.log(i), 20));
}
