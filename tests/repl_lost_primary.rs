//! A Primary lost while a write had reached one Secondary and not the other (three real
//! `blockd --config` nodes, protocol C). n2 is the Primary; its link to n1 runs through a
//! userspace proxy, which is stalled so a write reaches n0 only (n2 waits for n1's ack);
//! then n2 is killed and the proxy cut. Whichever Secondary is promoted, the two survivors must
//! end identical: the write n0 holds was never acknowledged, so either version may win, but
//! not both. (Without the unstable-write bookkeeping of `repl::unstable`, promoting n1 left n0
//! holding a block n1 never had, for good.)

use std::time::{Duration, Instant};

use integration_tests::faults::peer;
use integration_tests::link_proxy::{LinkMode, LinkProxy};
use integration_tests::repl::{Cluster, ClusterOptions, tail};

const MIB: u64 = 1 << 20;
const AT: u64 = 8 * MIB;
/// What `Cluster::spawn_write` writes.
const LEN: u64 = 64 << 10;

/// The cluster, the links of the nodes in `via_proxy` to n2 through a proxy each, all three
/// running, n2 Primary and in sync, 16 MiB written.
fn cluster(via_proxy: &[usize]) -> (Cluster, Vec<LinkProxy>) {
    let mut c = Cluster::create(&ClusterOptions::new(3, "C"));
    let (_, proxies) = c.start_with_proxied_links(2, via_proxy);
    c.promote(2, true);
    c.wait_synced(2, Duration::from_secs(60));
    c.write_random(2, 0, 16 * MIB, 7);
    c.wait_synced(2, Duration::from_secs(30));
    (c, proxies)
}

/// Waits until node `i`'s backing holds `pattern` at `at` (what `Cluster::spawn_write` wrote).
fn wait_for_write(c: &Cluster, i: usize, at: u64, pattern: u8, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while c.read_backing(i, at, LEN) != vec![pattern; LEN as usize] {
        assert!(
            Instant::now() < deadline,
            "{what} did not reach n{i}:\n{}",
            tail(&c.log(i), 20)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until both survivors see the Primary n2 gone.
fn wait_primary_gone(c: &Cluster) {
    for i in 0..2 {
        c.wait_peer(i, 2, Duration::from_secs(20), "n2 gone", |p| {
            p["connection"] != "connected"
        });
    }
}

fn assert_survivors_identical(c: &Cluster, after: &str) {
    assert_eq!(
        c.data_checksum(0),
        c.data_checksum(1),
        "the survivors differ after {after}:\n--- n0\n{}\n--- n1\n{}",
        tail(&c.log(0), 30),
        tail(&c.log(1), 30)
    );
}

/// Loses the Primary with one write on n0 only, promotes `new_primary`, and checks the two
/// survivors end identical.
fn lost_primary_with_a_write_on_one_secondary(new_primary: usize) {
    let (mut c, proxies) = cluster(&[1]);
    let proxy = &proxies[0];
    let before = c.read_backing(0, AT, LEN);
    proxy.set(LinkMode::Stall);
    let _writer = c.spawn_write(2, AT, 171);
    // The write reaches n0 (n2 waits for n1's ack, which cannot come).
    wait_for_write(&c, 0, AT, 171, Duration::from_secs(4), "the write");
    assert_eq!(
        c.read_backing(1, AT, LEN),
        before,
        "the stalled n1 got the write"
    );
    c.kill(2);
    proxy.set(LinkMode::Cut);
    // Both survivors see the Primary gone (at once: its sockets closed) before a promotion.
    wait_primary_gone(&c);
    c.promote(new_primary, false);
    c.wait_synced(new_primary, Duration::from_secs(60));
    assert_survivors_identical(&c, &format!("n{new_primary} was promoted"));
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

/// The Primary loses one Secondary (n1) while writes are still unconfirmed by it, the other
/// (n0) confirms them afterwards, and the Primary dies before any later write starts a new
/// generation. n0 must still count those writes as possibly missing on n1: the Primary's bitmap
/// for n1 died with it, and both survivors are at the same generation. (Before the `Stable`
/// floor, n0's confirmation made the Primary announce them stable, n0 forgot them, and the
/// survivors stayed different with no bit set anywhere.)
#[test]
fn writes_a_lost_secondary_missed_stay_unstable_until_a_new_generation() {
    let (mut c, proxies) = cluster(&[0, 1]);
    let (proxy0, proxy1) = (&proxies[0], &proxies[1]);
    let second = AT + MIB;
    let before = (c.read_backing(1, AT, LEN), c.read_backing(1, second, LEN));

    // W reaches n0 only (n1's link is silent).
    proxy1.set(LinkMode::Stall);
    let _w = c.spawn_write(2, AT, 171);
    wait_for_write(&c, 0, AT, 171, Duration::from_secs(4), "W");
    // W1 is queued to both while both links are silent, then n1's link dies: W and W1 go
    // into the Primary's bitmap for n1; W1 is still unconfirmed by n0.
    proxy0.set(LinkMode::Stall);
    let _w1 = c.spawn_write(2, second, 172);
    std::thread::sleep(Duration::from_millis(500));
    proxy1.set(LinkMode::Cut);
    c.wait_peer(2, 1, Duration::from_secs(20), "n1 gone", |p| {
        p["connection"] != "connected"
    });
    // n0 now gets W1 and confirms it; the Primary's next announcements (with the next frames
    // or its 1 s tick) reach n0.
    proxy0.set(LinkMode::Pass);
    wait_for_write(&c, 0, second, 172, Duration::from_secs(10), "W1");
    std::thread::sleep(Duration::from_millis(2500));
    c.kill(2);
    proxy0.set(LinkMode::Cut);
    wait_primary_gone(&c);
    assert_eq!(
        (c.read_backing(1, AT, LEN), c.read_backing(1, second, LEN)),
        before,
        "n1 got a write through a silent link"
    );
    c.promote(1, false);
    c.wait_synced(1, Duration::from_secs(60));
    assert_survivors_identical(&c, "n1 was promoted");
    assert_eq!(
        (c.read_backing(0, AT, LEN), c.read_backing(0, second, LEN)),
        before,
        "the new Primary's version wins on n0"
    );
}

/// Marks a Secondary keeps for another while the Primary lives are not resynced between the two
/// Secondaries (that resync would race the Primary's writes reaching the target over its own
/// link): they wait for the next Primary, which resyncs them. n0's link to the Primary n2 runs
/// through the proxy, delayed, and is cut once a write reached n0 and before the Primary could
/// announce it stable: n0 marks it for n1. n2 lives on and n0 reconnects. A new n0-n1 session
/// resyncs nothing between the Secondaries (before: n0 resynced its marks to n1) and, both
/// being in sync with n2, clears the marks as obsolete; after n2 is lost, promoting n0 leaves
/// both identical.
#[test]
fn marks_between_secondaries_wait_for_the_next_primary() {
    let (mut c, proxies) = cluster(&[0]);
    let proxy0 = &proxies[0];

    proxy0.set(LinkMode::Delay(1500));
    let _w = c.spawn_write(2, AT, 171);
    wait_for_write(&c, 0, AT, 171, Duration::from_secs(6), "the write");
    proxy0.set(LinkMode::Cut);
    c.wait_peer(0, 2, Duration::from_secs(20), "n2 gone", |p| {
        p["connection"] != "connected"
    });
    let marked = |c: &Cluster| {
        c.log(0)
            .contains("the Primary's last writes may not have reached the other peers")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marked(&c) {
        assert!(
            Instant::now() < deadline,
            "n0 marked nothing:\n{}",
            tail(&c.log(0), 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy0.set(LinkMode::Pass);
    c.wait_peer(0, 2, Duration::from_secs(30), "n2 back and in sync", |p| {
        p["replication"] == "established" && p["disk"] == "up-to-date"
    });
    let st = c.wait_peer(0, 1, Duration::from_secs(10), "marks for n1", |p| {
        p["out_of_sync_bytes"].as_u64().unwrap_or(0) > 0
    });
    // A new n0-n1 session while n2 is Primary and both are in sync with it: both hold n2's
    // data, so the marks are obsolete and cleared; nothing is resynced between them.
    c.blockctl_ok(Some(0), &["disconnect", "r0", "--peer", "n1"]);
    c.blockctl_ok(Some(0), &["connect", "r0", "--peer", "n1"]);
    let st2 = c.wait_peer(0, 1, Duration::from_secs(30), "n1 back", |p| {
        p["replication"] == "established"
    });
    std::thread::sleep(Duration::from_secs(1));
    let kept = peer(&c, &c.status(0), 1).clone();
    assert_eq!(
        kept["out_of_sync_bytes"].as_u64(),
        Some(0),
        "n0 kept marks for n1 although both are in sync with the Primary:\nbefore {st:#}\nafter {st2:#}\n{}",
        tail(&c.log(0), 30)
    );
    assert_eq!(kept["marks_wait_for_primary"], false, "{kept:#}");
    // They are not waited for: n0 counts as in sync.
    c.blockctl_ok(Some(0), &["wait-sync", "r0", "--timeout", "10"]);
    assert!(
        !c.log(0).contains("resync started (source)"),
        "n0 became a resync source:\n{}",
        tail(&c.log(0), 30)
    );
    // The Primary is lost; promoting n0 resyncs the marked blocks to n1.
    c.kill(2);
    wait_primary_gone(&c);
    c.promote(0, false);
    c.wait_synced(0, Duration::from_secs(60));
    assert_eq!(peer(&c, &c.status(0), 1)["out_of_sync_bytes"], 0);
    assert_survivors_identical(&c, "n0 was promoted");
}

/// A Secondary that crashes together with its Primary, right after a write reached it and not
/// the other Secondary, loses the unstable-write window it kept in memory. It now registers the
/// writes it applies in its activity log, so when it restarts it marks those extents out of
/// sync for every peer, and the two survivors resync them (the marked side sends: the write was
/// never acknowledged, either version may win, but not both). (Before, the restarted n0 had
/// nothing marked, the handshake found nothing to do, and the survivors stayed different with
/// no bit set anywhere.)
#[test]
fn a_secondary_that_crashed_with_its_primary_resyncs_its_last_writes() {
    let mut c = Cluster::create(&ClusterOptions::new(3, "C"));
    let (configs, proxies) = c.start_with_proxied_links(2, &[1]);
    c.promote(2, true);
    c.wait_synced(2, Duration::from_secs(60));
    c.write_random(2, 0, 16 * MIB, 7);
    c.wait_synced(2, Duration::from_secs(30));
    proxies[0].set(LinkMode::Stall);
    let _writer = c.spawn_write(2, AT, 171);
    wait_for_write(&c, 0, AT, 171, Duration::from_secs(4), "the write");
    // n0 crashes before it can notice anything, then the Primary.
    c.kill(0);
    c.kill(2);
    proxies[0].set(LinkMode::Cut);
    c.start_node_with(0, &configs[0]);
    for (i, other) in [(0, 1), (1, 0)] {
        c.wait_peer(i, other, Duration::from_secs(60), "in sync", |p| {
            p["connection"] == "connected"
                && p["replication"] == "established"
                && p["out_of_sync_bytes"] == 0
        });
    }
    assert_survivors_identical(&c, "n0 restarted");
    assert_eq!(
        c.read_backing(1, AT, LEN),
        vec![171u8; LEN as usize],
        "the marked side's version wins"
    );
    assert!(
        c.last_resync_source_bytes(0).is_some_and(|b| b > 0),
        "n0 did not resync its marked extents:\n{}",
        tail(&c.log(0), 30)
    );
    assert!(
        c.log(0)
            .contains("unclean shutdown: activity-log extents marked out of sync"),
        "n0 did not replay its activity log:\n{}",
        tail(&c.log(0), 30)
    );
}
