//! A Primary lost while a write had reached one Secondary and not the other (three real
//! `blockd --config` nodes, protocol C). n2 is the Primary; its link to n1 runs through a
//! userspace proxy, which is stalled so a write reaches n0 only (n2 waits for n1's ack);
//! then n2 is killed and the proxy cut. Whichever Secondary is promoted, the two survivors must
//! end identical: the write n0 holds was never acknowledged, so either version may win, but
//! not both. (Without the unstable-write bookkeeping of `repl::unstable`, promoting n1 left n0
//! holding a block n1 never had, for good.)

use std::time::{Duration, Instant};

use integration_tests::link_proxy::{LinkConfig, LinkMode, LinkProxy};
use integration_tests::repl::{Cluster, ClusterOptions, free_port, tail};

const MIB: u64 = 1 << 20;
const AT: u64 = 8 * MIB;
/// What `Cluster::spawn_write` writes.
const LEN: u64 = 64 << 10;

/// The cluster, n2's link to n1 through the proxy (n1, the lower id, dials n2: its config
/// names the proxy; n2 listens on 127.0.0.2), all three running, n2 Primary and in sync.
fn cluster() -> (Cluster, LinkProxy) {
    let mut c = Cluster::create(&ClusterOptions::new(3, "C"));
    let n2_addr = format!("127.0.0.2:{}", c.nodes[2].repl_port);
    let proxy_port = free_port();
    let direct = c.config_with_address("direct.toml", 2, &n2_addr);
    let proxied = c.config_with_address("n1.toml", 2, &format!("127.0.0.1:{proxy_port}"));
    let proxy = LinkProxy::start_with(
        proxy_port,
        n2_addr.parse().expect("proxy target"),
        LinkConfig::QUEUED,
    );
    c.start_node_with(0, &direct);
    c.start_node_with(1, &proxied);
    c.start_node_with(2, &direct);
    c.promote(2, true);
    c.wait_synced(2, Duration::from_secs(60));
    c.write_random(2, 0, 16 * MIB, 7);
    c.wait_synced(2, Duration::from_secs(30));
    (c, proxy)
}

/// Loses the Primary with one write on n0 only, promotes `new_primary`, and checks the two
/// survivors end identical.
fn lost_primary_with_a_write_on_one_secondary(new_primary: usize) {
    let (mut c, proxy) = cluster();
    let before = c.read_backing(0, AT, LEN);
    proxy.set(LinkMode::Stall);
    let _writer = c.spawn_write(2, AT, 171);
    // The write reaches n0 (n2 waits for n1's ack, which cannot come).
    let deadline = Instant::now() + Duration::from_secs(4);
    while c.read_backing(0, AT, LEN) != vec![171u8; LEN as usize] {
        assert!(
            Instant::now() < deadline,
            "the write did not reach n0:\n{}",
            tail(&c.log(0), 20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        c.read_backing(1, AT, LEN),
        before,
        "the stalled n1 got the write"
    );
    c.kill(2);
    proxy.set(LinkMode::Cut);
    // Both survivors see the Primary gone (at once: its sockets closed) before a promotion.
    for i in 0..2 {
        c.wait_peer(i, 2, Duration::from_secs(20), "n2 gone", |p| {
            p["connection"] != "connected"
        });
    }
    c.promote(new_primary, false);
    c.wait_synced(new_primary, Duration::from_secs(60));
    assert_eq!(
        c.data_checksum(0),
        c.data_checksum(1),
        "the survivors differ after n{new_primary} was promoted:\n--- n0\n{}\n--- n1\n{}",
        tail(&c.log(0), 30),
        tail(&c.log(1), 30)
    );
    let want = if new_primary == 0 {
        vec![171u8; LEN as usize]
    } else {
        before
    };
    assert_eq!(
        c.read_backing(1, AT, LEN),
        want,
        "the new Primary's version wins"
    );
    assert!(
        c.log(0)
            .contains("the Primary's last writes may not have reached the other peers"),
        "n0 did not mark the unstable write:\n{}",
        tail(&c.log(0), 30)
    );
}

#[test]
fn promoting_the_secondary_without_the_write_resyncs_the_other() {
    lost_primary_with_a_write_on_one_secondary(1);
}

#[test]
fn promoting_the_secondary_with_the_write_resyncs_the_other() {
    lost_primary_with_a_write_on_one_secondary(0);
}
