//! Resync efficiency measured on the wire: the link between the Primary and its peer runs
//! through a counting TCP proxy (the Primary dials the proxy; the peer listens on 127.0.0.2).
//! The peer is disconnected, 1% of a 1 GiB device is written at scattered offsets, the peer is
//! reconnected: the bytes crossing the proxy during the resync (both directions: TLS, handshake,
//! bitmap, data, acks) are within 1.2x of the dirty bytes, and both copies are identical after.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::repl::{Cluster, ClusterOptions, CountingProxy, RESOURCE, free_port};
use integration_tests::{TestRng, require_tool, run_ok};

const CHUNK: u64 = 64 << 10;

#[test]
fn resync_of_one_percent_moves_at_most_1_2x_the_dirty_bytes() {
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = 1 << 30;
    let mut c = Cluster::create(&opts);
    let good = std::fs::read_to_string(&c.config).unwrap();
    let n1_line = format!("address = \"127.0.0.1:{}\"", c.nodes[1].repl_port);
    assert!(good.contains(&n1_line));
    let proxy_port = free_port();
    // n1 listens on 127.0.0.2; n0 reaches it only through the proxy.
    let n1_conf = c.dir.path().join("n1.toml");
    std::fs::write(
        &n1_conf,
        good.replace(
            &n1_line,
            &format!("address = \"127.0.0.2:{}\"", c.nodes[1].repl_port),
        ),
    )
    .unwrap();
    let n0_conf = c.dir.path().join("n0.toml");
    std::fs::write(
        &n0_conf,
        good.replace(&n1_line, &format!("address = \"127.0.0.1:{proxy_port}\"")),
    )
    .unwrap();
    let proxy = CountingProxy::start(
        proxy_port,
        format!("127.0.0.2:{}", c.nodes[1].repl_port)
            .parse()
            .unwrap(),
    );
    c.start_node_with(0, &n0_conf);
    c.start_node_with(1, &n1_conf);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));
    assert!(proxy.bytes() > 0, "the link runs through the proxy");

    // Stop replicating to n1 (n0 stops dialing), then dirty 1% of the device.
    c.blockctl_ok(Some(0), &["disconnect", RESOURCE, "--peer", "n1"]);
    integration_tests::wait_for(
        Duration::from_secs(10),
        || c.status(0)["peers"][0]["connection"] != "connected",
        "n0 to drop the link",
    );
    let size = c.data_size();
    let target = size / 100;
    let mut rng = TestRng::new(0x5eed);
    let mut chunks = BTreeSet::new();
    while (chunks.len() as u64) * CHUNK < target {
        chunks.insert(rng.below(size / CHUNK));
    }
    let dirty = chunks.len() as u64 * CHUNK;
    let mut cmd = Command::new(require_tool("qemu-io", "qemu-utils"));
    cmd.args(["-f", "raw", &c.nbd_uri(0)]);
    for (k, ch) in chunks.iter().enumerate() {
        cmd.args([
            "-c",
            &format!("write -P {} {} {CHUNK}", 1 + k % 250, ch * CHUNK),
        ]);
    }
    run_ok(&mut cmd, Duration::from_secs(120));
    let tracked = c.status(0)["peers"][0]["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        tracked, dirty,
        "the bitmap tracks exactly the written bytes"
    );

    proxy.reset();
    let started = Instant::now();
    c.blockctl_ok(Some(0), &["connect", RESOURCE, "--peer", "n1"]);
    c.wait_synced(0, Duration::from_secs(120));
    let wire = proxy.bytes();
    let ratio = wire as f64 / dirty as f64;
    println!(
        "dirty {dirty} bytes ({} chunks of {CHUNK}), resync on the wire {wire} bytes = {ratio:.3}x, {:.2} s",
        chunks.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(wire >= dirty, "the dirty data crossed the wire");
    assert!(ratio <= 1.2, "resync moved {ratio:.3}x the dirty bytes");
    c.assert_identical(0);
}
