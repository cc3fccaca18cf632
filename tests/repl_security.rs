//! Refused peers with real processes: a node with the wrong shared secret, or with a
//! certificate from another CA, never connects (the refusal and its reason are logged, no data
//! moves); junk on the replication port is refused without hurting either node.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE, tail};

/// Writes a variant of the cluster config for one misconfigured node.
fn variant(c: &Cluster, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(&c.config).unwrap();
    let path = c.dir.path().join(name);
    std::fs::write(&path, edit(text)).unwrap();
    path
}

/// Starts n0 with the good config and n1 with `bad`, writes on n0, and checks they never
/// connect; returns (n0's status, n1's log).
fn refused(mut c: Cluster, bad: PathBuf) -> (serde_json::Value, String, Cluster) {
    c.start_node(0);
    c.start_node_with(1, &bad);
    c.promote(0, true);
    c.write_random(0, 0, 1 << 20, 7);
    // Several dial attempts (backoff 100 ms doubling).
    std::thread::sleep(Duration::from_secs(3));
    let st = c.status(0);
    let peer = &st["peers"][0];
    assert_ne!(peer["connection"], "connected", "{st:#}");
    assert_eq!(
        peer["out_of_sync_bytes"].as_u64().unwrap(),
        1 << 20,
        "the write is tracked for the refused peer"
    );
    let n1 = c.status(1);
    assert_ne!(n1["peers"][0]["connection"], "connected", "{n1:#}");
    assert_eq!(n1["disk"], "inconsistent", "no data reached n1: {n1:#}");
    let log = c.log(1);
    assert!(
        log.contains("replication link refused"),
        "n1 logs the refusal:\n{}",
        tail(&log, 30)
    );
    (st, log, c)
}

#[test]
fn wrong_secret_is_refused_and_logged() {
    let c = Cluster::create(&ClusterOptions::new(2, "C"));
    c.blockctl_ok(
        None,
        &[
            "gen-secret",
            &c.dir.path().join("secret-other").to_string_lossy(),
        ],
    );
    let bad = variant(&c, "other-secret.toml", |t| {
        t.replace("secret-file = \"secret\"", "secret-file = \"secret-other\"")
    });
    let (st, log, _c) = refused(c, bad);
    assert!(
        log.contains("shared-secret authentication"),
        "the reason is the secret:\n{}",
        tail(&log, 30)
    );
    let err = st["peers"][0]["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("shared-secret authentication"),
        "n0 reports the reason too: {st:#}"
    );
}

#[test]
fn certificate_from_another_ca_is_refused_and_logged() {
    let c = Cluster::create(&ClusterOptions::new(2, "C"));
    let bad = variant(&c, "other-ca.toml", |t| t.replace("certs/", "certs-other/"));
    let out = std::process::Command::new(integration_tests::repl::blockctl_bin())
        .arg("--config")
        .arg(&bad)
        .args(["certs", "--dir"])
        .arg(c.dir.path().join("certs-other"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (st, log, _c) = refused(c, bad);
    assert!(
        log.contains("TLS handshake"),
        "the reason is TLS:\n{}",
        tail(&log, 30)
    );
    let err = st["peers"][0]["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("TLS"), "n0 reports the reason too: {st:#}");
}

#[test]
fn junk_on_the_replication_port_is_refused_without_harm() {
    let mut c = Cluster::start(&ClusterOptions::new(2, "C"));
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(60));
    for junk in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
        &[0u8; 4096][..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", c.nodes[1].repl_port)).unwrap();
        let _ = s.write_all(junk);
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        c.log(1).contains("replication link refused"),
        "{}",
        tail(&c.log(1), 20)
    );
    c.write_random(0, 4 << 20, 2 << 20, 9);
    c.wait_synced(0, Duration::from_secs(30));
    c.assert_identical(0);
    let _ = c.blockctl_ok(Some(1), &["status", RESOURCE]);
    c.stop(1);
    c.stop(0);
}
