//! Quorum with three real `blockd --config` nodes on 127.0.0.1 (protocol C, `quorum =
//! "majority"`). The Primary is n2, the highest node id, so both of its links end on its
//! replication port: an nftables table that drops TCP to and from that port cuts it off from
//! n0 and n1 (a network partition, detected by the 5 s keepalive), and deleting the rules heals.
//!
//! - `suspend-io`: the cut-off Primary loses quorum and holds a write issued after the cut (it
//!   never completes while partitioned); the majority keeps quorum and promotes n0, which
//!   writes. After healing, the old Primary steps down by itself, resyncs from the majority as
//!   a plain sync target (no split brain anywhere) and the pending write fails; all three copies
//!   are identical.
//! - `suspend-io`, healed before anyone took over: the held write completes once quorum is
//!   back, the peers resync what they missed from the old Primary, no split brain.
//! - `io-error`: the cut-off Primary fails writes with EIO at once; a node without quorum
//!   cannot be promoted (exit code 3, "no quorum").
//! - `io-error`, writes streaming through the cut (fault-injection bug 2): the Primary's two
//!   links time out a few ms apart; new writes arrive in between (each failed write frees a
//!   slot of the client's queue at once). No new generation may start then (the remaining peer cannot
//!   confirm quorum over its dead link), so after the majority promoted n0 the old Primary is
//!   simply behind: it steps down and resyncs, no split brain, and n0 holds every write the
//!   old Primary acknowledged.

use std::time::{Duration, Instant};

use integration_tests::ChildGuard;
use integration_tests::faults::{AckedWriter, BS, check_acked};
use integration_tests::repl::{Cluster, ClusterOptions, EventLog, Partition, RESOURCE, tail};

const MIB: u64 = 1 << 20;

fn cluster(on_no_quorum: &str) -> Cluster {
    let mut opts = ClusterOptions::new(3, "C");
    opts.extra_global = format!("quorum = \"majority\"\non-no-quorum = \"{on_no_quorum}\"");
    let c = Cluster::start(&opts);
    // A node alone has no quorum: promotion waits until the links are up.
    wait_quorum(&c, 2, true, Duration::from_secs(30));
    c.promote(2, true);
    c.wait_synced(2, Duration::from_secs(60));
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let q = c.status(i)["quorum"].clone();
            if q["present"] == 3 {
                assert_eq!(q["has_quorum"], true, "{q}");
                assert_eq!(q["voters"], 3, "{q}");
                assert_eq!(q["setting"], "majority", "{q}");
                break;
            }
            assert!(Instant::now() < deadline, "{}: {q}", c.nodes[i].name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    c
}

/// Waits for the child to end; returns (succeeded, stdout + stderr).
fn finish(w: &mut ChildGuard, timeout: Duration) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = w.0.try_wait().expect("try_wait") {
            let mut out = String::new();
            for r in [
                w.0.stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read>),
                w.0.stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read>),
            ]
            .into_iter()
            .flatten()
            {
                let mut r = r;
                let _ = r.read_to_string(&mut out);
            }
            let failed = !st.success() || out.contains("failed") || out.contains("error");
            return (!failed, out);
        }
        assert!(
            Instant::now() < deadline,
            "qemu-io still running after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_quorum(c: &Cluster, i: usize, want: bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let st = c.status(i);
        if st["quorum"]["has_quorum"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: quorum not {want} after {timeout:?}: {st:#}\n{}",
            c.nodes[i].name,
            tail(&c.log(i), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Heals and waits until all three are connected and identical with n0 as Primary; asserts no
/// split brain was detected anywhere.
fn heal_and_check(c: &Cluster, part: &Partition, events: &[EventLog]) {
    part.heal();
    let healed = Instant::now();
    c.wait_synced(0, Duration::from_secs(90));
    println!(
        "healed: all three connected and in sync {:.1} s after the partition ended",
        healed.elapsed().as_secs_f64()
    );
    c.assert_identical(0);
    let st2 = c.status(2);
    assert_eq!(st2["role"], "secondary", "{st2:#}");
    assert_eq!(st2["disk"], "up-to-date", "{st2:#}");
    for (i, ev) in events.iter().enumerate() {
        let sb: Vec<_> = ev
            .events()
            .into_iter()
            .filter(|e| e["what"] == "split-brain")
            .collect();
        assert!(
            sb.is_empty(),
            "{}: split brain detected: {sb:?}",
            c.nodes[i].name
        );
        assert!(
            !c.log(i).contains("split brain detected"),
            "{}: {}",
            c.nodes[i].name,
            tail(&c.log(i), 40)
        );
    }
}

#[test]
fn partitioned_primary_suspends_majority_promotes_no_split_brain() {
    let c = cluster("suspend-io");
    c.write_random(2, 4 * MIB, MIB, 11);
    c.wait_synced(2, Duration::from_secs(30));
    let events: Vec<EventLog> = (0..3)
        .map(|i| EventLog::start(&c, i, &format!("n{i}")))
        .collect();

    let part = Partition::new("quorum_suspend");
    part.cut_port(c.nodes[2].repl_port);
    let cut = Instant::now();
    // A write issued after the cut: it cannot reach a majority and must not complete.
    let mut w = c.spawn_write(2, 12 * MIB, 0x5a);
    events[2].wait_for("quorum", "lost", Duration::from_secs(30));
    println!(
        "n2 lost quorum {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    let st2 = c.status(2);
    assert_eq!(st2["quorum"]["has_quorum"], false, "{st2:#}");
    assert_eq!(st2["quorum"]["present"], 1, "{st2:#}");
    assert_eq!(st2["quorum"]["io_suspended"], true, "{st2:#}");
    assert_eq!(st2["role"], "primary");
    let line = c.blockctl_ok(Some(2), &["status", RESOURCE]);
    assert!(line.contains("quorum:no"), "{line}");

    // The majority keeps quorum and promotes n0; it writes while n2 is cut off.
    wait_quorum(&c, 0, true, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = c.blockctl(Some(0), &["promote", RESOURCE]);
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n0 promote refused: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.promote(0, false);
    c.write_random(0, 16 * MIB, MIB, 12);
    c.write_random(0, 12 * MIB, 64 << 10, 13);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        w.0.try_wait().unwrap().is_none(),
        "the write to the partitioned Primary completed"
    );
    println!(
        "write to the partitioned Primary still suspended after {:.1} s",
        cut.elapsed().as_secs_f64()
    );

    heal_and_check(&c, &part, &events);
    let (ok, out) = finish(&mut w, Duration::from_secs(30));
    assert!(
        !ok,
        "the suspended write succeeded after the Primary stepped down: {out}"
    );
    // The old Primary's never-acknowledged write is gone; n0's data is there.
    assert_ne!(c.read_backing(2, 12 * MIB, 64 << 10), vec![0x5a; 64 << 10]);
    assert_eq!(
        c.read_backing(2, 12 * MIB, 64 << 10),
        c.read_backing(0, 12 * MIB, 64 << 10)
    );
    events[2].wait_for("role", "secondary", Duration::from_secs(1));
}

#[test]
fn io_error_without_quorum_and_promotion_needs_quorum() {
    let c = cluster("io-error");
    let events: Vec<EventLog> = (0..3)
        .map(|i| EventLog::start(&c, i, &format!("n{i}")))
        .collect();
    let part = Partition::new("quorum_eio");
    part.cut_port(c.nodes[2].repl_port);
    wait_quorum(&c, 2, false, Duration::from_secs(30));
    let st2 = c.status(2);
    assert_eq!(st2["quorum"]["io_suspended"], false, "{st2:#}");

    let started = Instant::now();
    let mut w = c.spawn_write(2, 8 * MIB, 0x6b);
    let (ok, out) = finish(&mut w, Duration::from_secs(20));
    assert!(!ok, "a write without quorum succeeded: {out}");
    println!(
        "write without quorum failed after {:.2} s: {}",
        started.elapsed().as_secs_f64(),
        out.lines().next().unwrap_or_default()
    );

    // Without quorum a node cannot (re)become Primary, even with --force.
    c.blockctl_ok(Some(2), &["demote", RESOURCE]);
    for args in [
        &["promote", RESOURCE][..],
        &["promote", RESOURCE, "--force"][..],
    ] {
        let o = c.blockctl(Some(2), args);
        assert_eq!(o.status.code(), Some(3), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("no quorum"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The majority may.
    wait_quorum(&c, 0, true, Duration::from_secs(5));
    c.promote(0, false);
    c.write_random(0, 8 * MIB, MIB, 21);
    heal_and_check(&c, &part, &events);
}

#[test]
fn partition_heals_before_failover_suspended_write_completes() {
    let c = cluster("suspend-io");
    let events: Vec<EventLog> = (0..3)
        .map(|i| EventLog::start(&c, i, &format!("n{i}")))
        .collect();
    let part = Partition::new("quorum_resume");
    part.cut_port(c.nodes[2].repl_port);
    let mut w = c.spawn_write(2, 20 * MIB, 0x3c);
    wait_quorum(&c, 2, false, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        w.0.try_wait().unwrap().is_none(),
        "a write completed without quorum"
    );
    // A write issued while without quorum waits too.
    let mut w2 = c.spawn_write(2, 28 * MIB, 0x3d);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        w2.0.try_wait().unwrap().is_none(),
        "a write completed without quorum"
    );
    part.heal();
    let healed = Instant::now();
    for w in [&mut w, &mut w2] {
        let (ok, out) = finish(w, Duration::from_secs(30));
        assert!(ok, "the held write failed after quorum returned: {out}");
    }
    println!(
        "held writes completed {:.1} s after the partition ended",
        healed.elapsed().as_secs_f64()
    );
    c.wait_synced(2, Duration::from_secs(60));
    c.assert_identical(2);
    assert_eq!(c.read_backing(0, 20 * MIB, 64 << 10), vec![0x3c; 64 << 10]);
    assert_eq!(c.read_backing(1, 28 * MIB, 64 << 10), vec![0x3d; 64 << 10]);
    assert_eq!(c.status(2)["role"], "primary");
    for (i, ev) in events.iter().enumerate() {
        assert!(
            ev.events().iter().all(|e| e["what"] != "split-brain"),
            "{}: split brain detected",
            c.nodes[i].name
        );
    }
    events[2].wait_for("quorum", "regained", Duration::from_secs(1));
}

#[test]
fn writes_in_flight_at_the_cut_start_no_generation_without_quorum() {
    let c = cluster("io-error");
    let events: Vec<EventLog> = (0..3)
        .map(|i| EventLog::start(&c, i, &format!("n{i}")))
        .collect();
    let addr = format!("127.0.0.1:{}", c.nodes[2].nbd_port)
        .parse()
        .unwrap();
    // 16 writes in flight, at most 2000 a second: some arrive between the two link timeouts.
    let w = AckedWriter::start(addr, 1, 0x5eed, c.data_size() / BS, 16, Some(2000));
    assert!(
        w.wait_acked(100, Duration::from_secs(20)),
        "no acknowledged writes"
    );
    // (Setting the cluster up may have started generations after peer losses legitimately.)
    let log_at_cut = c.log(2).len();
    let part = Partition::new("quorum_inflight");
    part.cut_port(c.nodes[2].repl_port);
    let cut = Instant::now();
    wait_quorum(&c, 2, false, Duration::from_secs(30));
    println!(
        "n2 lost quorum {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    // Writes keep failing on the cut-off Primary for a while.
    std::thread::sleep(Duration::from_secs(1));
    let acked = w.acked();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        w.acked(),
        acked,
        "the Primary without quorum acknowledged writes"
    );
    let since_cut = c.log(2)[log_at_cut..].to_string();
    println!(
        "n2 refused {} new generation(s) without a confirmed quorum",
        since_cut.matches("no new generation").count()
    );
    assert!(
        !since_cut.contains("new generation after a peer loss"),
        "n2 started a generation the majority never saw: {}",
        tail(&c.log(2), 40)
    );
    // The majority promotes n0, which holds every acknowledged write, and writes.
    wait_quorum(&c, 0, true, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = c.blockctl(Some(0), &["promote", RESOURCE]);
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n0 promote refused: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.promote(0, false);
    let rep = w.finish(Duration::from_millis(500));
    let checked = check_acked(&c.nodes[0].backing, &rep).expect("acked writes on n0");
    println!(
        "acked={} checked_on_n0={checked} failed_without_quorum={}",
        rep.acked.len(),
        rep.failed
    );
    c.write_random(0, 4 * MIB, MIB, 31);
    heal_and_check(&c, &part, &events);
}
