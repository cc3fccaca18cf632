//! A Secondary rejoining a three-node cluster while the Primary writes (three real `blockd
//! --config` nodes, protocol C, resyncs slowed to 8 MiB/s so they overlap the writes): n1 is
//! stopped, the Primary n2 writes (a new generation), n1 comes back under a random-write load.
//! n1 must end identical to the Primary: n1 takes one resync at a time (n0's first, then the
//! Primary's for the writes it missed meanwhile), and none may put a block over a newer write.

use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::faults::peer;
use integration_tests::link_proxy::LinkMode;
use integration_tests::repl::{Cluster, ClusterOptions, tail};

/// Starts fio random writes at 2,000 IOPS for `secs` through node `i`'s export.
fn writer(c: &Cluster, i: usize, secs: u32) -> integration_tests::ChildGuard {
    let fio = integration_tests::require_tool("fio", "fio");
    integration_tests::ChildGuard(
        Command::new(fio)
            .args([
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={}", c.nbd_uri(i)),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--rate_iops=2000",
                "--time_based",
                &format!("--runtime={secs}"),
                &format!("--size={}", c.data_size()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fio"),
    )
}

/// n1 meets n0 (which followed the Primary's new generation) before the Primary: n0 is its
/// first sync source; the Primary's link waits until that resync is done.
#[test]
fn a_secondary_rejoining_under_writes_ends_identical() {
    let mut opts = ClusterOptions::new(3, "C");
    opts.resync_rate = "8M".to_string();
    let mut c = Cluster::create(&opts);
    let (configs, proxies) = c.start_with_proxied_links(2, &[1]);
    let proxy1 = &proxies[0];
    c.promote(2, true);
    c.wait_synced(2, Duration::from_secs(60));
    c.stop(1);
    c.write_random(2, 0, 32 << 20, 11);
    proxy1.set(LinkMode::Cut);
    let mut w = writer(&c, 2, 14);
    c.start_node_with(1, &configs[1]);
    c.wait_peer(1, 0, Duration::from_secs(20), "n0 resyncing n1", |p| {
        p["connection"] == "connected"
    });
    std::thread::sleep(Duration::from_millis(500));
    proxy1.set(LinkMode::Pass);
    // One resync toward n1 at a time: while n0's runs, the Primary's link is refused (and
    // retried), never a second sync source whose end could declare n1 up to date early; the
    // Primary resyncs what n1 missed meanwhile afterwards.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut refused = false;
    loop {
        let st = c.status(1);
        let (from_n0, from_n2) = (peer(&c, &st, 0), peer(&c, &st, 2));
        assert!(
            !(from_n0["replication"] == "sync-target" && from_n2["replication"] == "sync-target"),
            "n1 the sync target of both at once: {st:#}"
        );
        refused |= from_n2["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("already resyncing from another node"));
        if from_n0["replication"] != "sync-target" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "n0's resync of n1 did not end"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        refused,
        "the Primary's link was never refused while n0 resynced n1"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = w.0.try_wait().expect("fio") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "fio did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "fio failed");
    c.wait_synced(2, Duration::from_secs(60));
    let want = c.data_checksum(2);
    for i in 0..2 {
        assert_eq!(
            c.data_checksum(i),
            want,
            "n{i} differs from the Primary:\n--- n{i}\n{}\n--- n2\n{}",
            tail(&c.log(i), 40),
            tail(&c.log(2), 20)
        );
    }
}
