//! The Prometheus endpoint of a real 2-node cluster during a resync: the Secondary is
//! disconnected, the Primary writes (out-of-sync bytes appear for that peer), the Secondary
//! reconnects, and repeated scrapes show the resync (sync-source state, a rate) and the
//! out-of-sync bytes falling to zero. Every scrape must parse as Prometheus text format 0.0.4
//! with conventional names; the NBD request counters count the writes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE, free_port};

type Sample = (String, Vec<(String, String)>, f64);

/// `GET /metrics` over a plain TCP connection (10 s timeouts); the body.
fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len());
    body.to_string()
}

/// Parses a whole exposition strictly: HELP/TYPE before each family, one TYPE per family,
/// `blockd_` names in snake case, counters ending in `_total`, histogram buckets cumulative
/// and ending with `+Inf` = `_count`, every value a number.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "exposition ends with a newline");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "empty line in exposition");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect(line);
            assert!(!help.is_empty(), "{line}");
            assert!(helped.insert(name.to_string()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').expect(line);
            assert!(helped.contains(name), "TYPE without HELP: {line}");
            assert!(matches!(t, "gauge" | "counter" | "histogram"), "{line}");
            assert!(
                types.insert(name.to_string(), t.to_string()).is_none(),
                "second TYPE: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = if value == "+Inf" {
            f64::INFINITY
        } else {
            value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"))
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((n, rest)) => {
                let inner = rest.strip_suffix('}').expect(line);
                let mut labels = Vec::new();
                let mut rest = inner;
                while !rest.is_empty() {
                    let (k, v) = rest.split_once("=\"").expect(line);
                    let end = v.find('"').expect(line);
                    assert!(
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                        "label name: {line}"
                    );
                    labels.push((k.to_string(), v[..end].to_string()));
                    rest = v[end + 1..].strip_prefix(',').unwrap_or(&v[end + 1..]);
                }
                (n.to_string(), labels)
            }
        };
        assert!(
            name.starts_with("blockd_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "metric name: {line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&name)
            .to_string();
        let t = types
            .get(&family)
            .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
        if t == "counter" {
            assert!(name.ends_with("_total"), "counter without _total: {line}");
        }
        if t == "gauge" && family.contains("_state") || family.ends_with("_role") {
            assert!(value == 0.0 || value == 1.0, "state set value: {line}");
        }
        out.push((name, labels, value));
    }
    check_histograms(&out);
    out
}

fn check_histograms(samples: &[Sample]) {
    let mut series: HashMap<(String, Vec<(String, String)>), Vec<(String, f64)>> = HashMap::new();
    for (n, l, v) in samples {
        if let Some(f) = n.strip_suffix("_bucket") {
            let le = l.iter().find(|(k, _)| k == "le").expect("le").1.clone();
            let rest: Vec<_> = l.iter().filter(|(k, _)| k != "le").cloned().collect();
            series
                .entry((f.to_string(), rest))
                .or_default()
                .push((le, *v));
        }
    }
    for ((f, l), buckets) in series {
        let counts: Vec<f64> = buckets.iter().map(|b| b.1).collect();
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "{f} {l:?} not cumulative"
        );
        assert_eq!(buckets.last().unwrap().0, "+Inf", "{f} {l:?}");
        let count = samples
            .iter()
            .find(|(n, ll, _)| *n == format!("{f}_count") && *ll == l)
            .expect("_count")
            .2;
        assert_eq!(
            *counts.last().unwrap(),
            count,
            "{f} {l:?}: +Inf bucket = count"
        );
    }
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
        })
        .map(|s| s.2)
}

/// A copy of the cluster config where `node` has `metrics-listen` on `port`.
fn config_with_metrics(c: &Cluster, node: &str, port: u16) -> PathBuf {
    let text = std::fs::read_to_string(&c.config).unwrap();
    let header = format!("[resource.{RESOURCE}.node.{node}]\n");
    assert!(text.contains(&header));
    let text = text.replace(
        &header,
        &format!("{header}metrics-listen = \"127.0.0.1:{port}\"\n"),
    );
    let path = c.dir.path().join(format!("cluster-{node}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn out_of_sync_bytes_fall_to_zero_during_resync() {
    let mut opts = ClusterOptions::new(2, "C");
    // Slow enough that scrapes see the resync in progress: 24 MiB at 8 MiB/s.
    opts.resync_rate = "8M".into();
    let mut c = Cluster::create(&opts);
    let port = free_port();
    let primary_config = config_with_metrics(&c, "n0", port);
    c.start_node_with(0, &primary_config);
    c.start_node(1);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));

    let peer = [("resource", RESOURCE), ("peer", "n1")];
    let s = parse(&scrape(port));
    assert_eq!(value(&s, "blockd_status_up", &[]), Some(1.0));
    assert_eq!(
        value(
            &s,
            "blockd_resource_role",
            &[("resource", RESOURCE), ("role", "primary")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "blockd_resource_disk_state", &[("state", "up-to-date")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "blockd_peer_out_of_sync_bytes", &peer), Some(0.0));
    assert_eq!(
        value(
            &s,
            "blockd_peer_connection_state",
            &[("peer", "n1"), ("state", "connected")]
        ),
        Some(1.0)
    );

    // Disconnect the Secondary and write 24 MiB on the Primary.
    c.blockctl_ok(Some(1), &["disconnect", RESOURCE]);
    integration_tests::wait_for(
        Duration::from_secs(10),
        || {
            let s = parse(&scrape(port));
            value(
                &s,
                "blockd_peer_connection_state",
                &[("peer", "n1"), ("state", "connected")],
            ) == Some(0.0)
        },
        "the metrics to show the peer disconnected",
    );
    c.write_random(0, 4 << 20, 24 << 20, 7);
    let s = parse(&scrape(port));
    let behind = value(&s, "blockd_peer_out_of_sync_bytes", &peer).unwrap();
    assert_eq!(
        behind,
        (24u64 << 20) as f64,
        "dirty bytes of the disconnected peer"
    );
    // NBD request statistics of the export: qemu-io wrote 24 MiB and flushed.
    let w = [("export", RESOURCE), ("command", "write")];
    assert!(value(&s, "blockd_nbd_requests_total", &w).unwrap() > 0.0);
    assert!(value(&s, "blockd_nbd_bytes_total", &w).unwrap() >= (24u64 << 20) as f64);
    assert_eq!(value(&s, "blockd_nbd_request_errors_total", &w), Some(0.0));
    assert!(
        value(
            &s,
            "blockd_nbd_request_duration_seconds_count",
            &[("export", RESOURCE), ("command", "flush")]
        )
        .unwrap()
            >= 1.0
    );

    // Reconnect and scrape through the resync.
    c.blockctl_ok(Some(1), &["connect", RESOURCE]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let mut saw_sync_source = false;
    let mut saw_rate = false;
    loop {
        let s = parse(&scrape(port));
        let oos = value(&s, "blockd_peer_out_of_sync_bytes", &peer).unwrap();
        saw_sync_source |= value(
            &s,
            "blockd_peer_replication_state",
            &[("peer", "n1"), ("state", "sync-source")],
        ) == Some(1.0);
        saw_rate |= value(&s, "blockd_peer_resync_rate_bytes_per_second", &peer).unwrap() > 0.0;
        seen.push(oos);
        let established = value(
            &s,
            "blockd_peer_replication_state",
            &[("peer", "n1"), ("state", "established")],
        ) == Some(1.0);
        if oos == 0.0 && established {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "out-of-sync bytes did not reach 0: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("out-of-sync bytes seen during the resync: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1] <= w[0]),
        "out-of-sync bytes only fall during the resync: {seen:?}"
    );
    assert!(
        seen.iter().any(|v| *v > 0.0 && *v < behind),
        "a scrape saw the resync half done: {seen:?}"
    );
    assert!(
        saw_sync_source,
        "a scrape saw replication state sync-source"
    );
    assert!(saw_rate, "a scrape saw a resync rate");
    let s = parse(&scrape(port));
    assert_eq!(
        value(&s, "blockd_peer_in_flight_requests", &peer),
        Some(0.0)
    );
    c.wait_synced(0, Duration::from_secs(60));
    c.assert_identical(0);
}

#[test]
fn metrics_listen_flag_and_taken_port() {
    let c = Cluster::create(&ClusterOptions::new(2, "C"));
    // Held from the start (port 0: no window for another test's process to take it first).
    let held = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = held.local_addr().unwrap().port();
    // A taken port fails the start with a message naming it.
    let out = integration_tests::run_timeout(
        std::process::Command::new(integration_tests::blockd_bin())
            .arg("--config")
            .arg(&c.config)
            .args([
                "--node",
                "n0",
                "--metrics-listen",
                &format!("127.0.0.1:{port}"),
            ]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for metrics on 127.0.0.1:{port}")),
        "{err}"
    );
    drop(held);
}
