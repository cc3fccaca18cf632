//! A partial partition in a three-node cluster (protocol C, `quorum = "majority"`): only the
//! n0 <-> n2 link is cut, n0 - n1 and n1 - n2 stay up. Each node replicates from its own
//! loopback address (127.0.0.1 + id), so an nftables rule on the address pair cuts exactly
//! that link.
//!
//! n2 is Primary and keeps writing (to n1 only) after the cut. Promotion is a cluster-wide
//! decision: n0, which cannot see n2, is refused (even with `--force`) because n1 reports that
//! it is connected to Primary n2; once n2 crashes, n0 is refused again because n1 holds newer data (n0's
//! generation is in n1's history); n1 is promoted, restarts its session with n0 (whose
//! generation differs) and resyncs it, so every write n2 acknowledged ends up on n0 and n1.

use std::process::Output;
use std::time::{Duration, Instant};

use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE, nft, tail};

const MIB: u64 = 1 << 20;

/// An nftables table dropping TCP between two loopback addresses (both directions).
struct PairCut {
    table: String,
}

impl PairCut {
    fn new(a: &str, b: &str) -> PairCut {
        let table = format!("blockd_test_pair_{}", std::process::id());
        let _ = nft(&["delete", "table", "inet", &table]);
        nft(&["add", "table", "inet", &table]).expect("nft add table");
        nft(&[
            "add",
            "chain",
            "inet",
            &table,
            "out",
            "{ type filter hook output priority 0; policy accept; }",
        ])
        .expect("nft add chain");
        for (src, dst) in [(a, b), (b, a)] {
            nft(&[
                "add", "rule", "inet", &table, "out", "ip", "saddr", src, "ip", "daddr", dst,
                "meta", "l4proto", "tcp", "drop",
            ])
            .expect("nft add rule");
        }
        PairCut { table }
    }
}

impl Drop for PairCut {
    fn drop(&mut self) {
        let _ = nft(&["delete", "table", "inet", &self.table]);
    }
}

fn addr(i: usize) -> String {
    format!("127.0.0.{}", i + 1)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn logs(c: &Cluster) -> String {
    (0..c.nodes.len())
        .map(|j| format!("--- {}\n{}", c.nodes[j].name, tail(&c.log(j), 40)))
        .collect()
}

/// The bytes `write_random(.., len, seed)` wrote.
fn random_bytes(c: &Cluster, len: u64, seed: u64) -> Vec<u8> {
    let f = c.dir.path().join(format!("expect-{seed}.bin"));
    integration_tests::write_random_file(&f, len, seed);
    let b = std::fs::read(&f).expect("read random file");
    let _ = std::fs::remove_file(f);
    b
}

fn peer_conn(c: &Cluster, i: usize, peer: usize) -> String {
    c.status(i)["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == c.nodes[peer].name.as_str())
        .map(|p| p["connection"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn partial_partition_promotion_is_cluster_wide() {
    let mut opts = ClusterOptions::new(3, "C");
    opts.size = 32 * MIB;
    opts.extra_global = "quorum = \"majority\"".into();
    let mut c = Cluster::create(&opts);
    // Each node on its own loopback address.
    let mut cfg = std::fs::read_to_string(&c.config).expect("read config");
    for i in 0..3 {
        let port = c.nodes[i].repl_port;
        cfg = cfg.replace(
            &format!("address = \"127.0.0.1:{port}\""),
            &format!("address = \"{}:{port}\"", addr(i)),
        );
    }
    std::fs::write(&c.config, cfg).expect("write config");
    for i in 0..3 {
        c.start_node(i);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status(2)["quorum"]["present"] != 3 {
        assert!(Instant::now() < deadline, "no full cluster:\n{}", logs(&c));
        std::thread::sleep(Duration::from_millis(100));
    }
    c.promote(2, true);
    c.wait_synced(2, Duration::from_secs(60));
    c.write_random(2, 0, MIB, 1);
    c.wait_synced(2, Duration::from_secs(30));

    // Cut n0 <-> n2 only; both notice (keepalive), n1 stays connected to both.
    let _cut = PairCut::new(&addr(0), &addr(2));
    let deadline = Instant::now() + Duration::from_secs(40);
    while peer_conn(&c, 2, 0) == "connected" || peer_conn(&c, 0, 2) == "connected" {
        assert!(
            Instant::now() < deadline,
            "the cut went unnoticed:\n{}",
            logs(&c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(peer_conn(&c, 1, 0), "connected");
    assert_eq!(peer_conn(&c, 1, 2), "connected");
    // n2 (quorum with n1) goes on writing: acknowledged writes n0 does not have.
    c.write_random(2, 4 * MIB, 2 * MIB, 2);

    // (a) n0 has quorum (n0 + n1) but n1 sees Primary n2.
    let o = c.blockctl(Some(0), &["promote", RESOURCE]);
    assert!(
        !o.status.success(),
        "n0 promoted next to Primary n2:\n{}",
        logs(&c)
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("connected to Primary node 2"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("--force"), "{}", text(&o));
    // Nor with --force: force is about the data; n2 holds quorum through n1, so forcing n0
    // would make two Primaries, each with quorum.
    let o = c.blockctl(Some(0), &["promote", RESOURCE, "--force"]);
    assert_eq!(o.status.code(), Some(3), "{}\n{}", text(&o), logs(&c));
    assert!(
        text(&o).contains("connected to Primary node 2"),
        "{}",
        text(&o)
    );
    assert_eq!(c.status(0)["role"], "secondary");

    // (b) n2 crashes; n0 is behind n1 and must not be promoted.
    c.kill(2);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let o = c.blockctl(Some(0), &["promote", RESOURCE]);
        assert!(
            !o.status.success(),
            "n0 promoted while behind n1:\n{}",
            logs(&c)
        );
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        let t = text(&o);
        if t.contains("node 1 holds newer data") {
            assert!(t.contains("promote node 1 or resync"), "{t}");
            break;
        }
        // Until n1 notices n2 is gone, it still reports it as Primary.
        assert!(t.contains("Primary node 2"), "{t}");
        assert!(Instant::now() < deadline, "{t}\n{}", logs(&c));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(c.status(0)["role"], "secondary");

    // n1 holds every acknowledged write: promote it; it resyncs n0.
    c.promote(1, false);
    c.wait_synced(1, Duration::from_secs(60));
    let first = random_bytes(&c, MIB, 1);
    let second = random_bytes(&c, 2 * MIB, 2);
    for i in [1, 0] {
        assert!(
            c.read_backing(i, 0, MIB) == first,
            "{}: first writes differ",
            c.nodes[i].name
        );
        assert!(
            c.read_backing(i, 4 * MIB, 2 * MIB) == second,
            "{}: writes acknowledged by n2 after the cut are missing\n{}",
            c.nodes[i].name,
            logs(&c)
        );
    }
    c.assert_identical(1);
}
