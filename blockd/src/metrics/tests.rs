//! Tests of the exposition: every line parses as Prometheus text format 0.0.4, names follow
//! the conventions, and the values are the snapshot's.

use super::*;
use crate::repl::resource::{PeerStatus, ResyncStatus};

fn status() -> Status {
    Status {
        snapshots: Vec::new(),
        disk_error: None,
        attach: None,
        resource: "r0".into(),
        node: "alpha".into(),
        id: 0,
        role: "primary".into(),
        disk: "up-to-date".into(),
        size: 1 << 30,
        quorum: Default::default(),
        peers: vec![PeerStatus {
            node: "beta".into(),
            id: 1,
            protocol: "C".into(),
            connection: "connected".into(),
            replication: "sync-source".into(),
            role: "secondary".into(),
            disk: "inconsistent".into(),
            out_of_sync_bytes: 12288,
            in_flight: 3,
            in_flight_bytes: 12288,
            resync: Some(ResyncStatus {
                total_bytes: 65536,
                done_bytes: 53248,
                percent: 81.3,
                rate: 1_000_000,
                retry_in_secs: None,
            }),
            last_error: None,
            verify: None,
            unconfirmed_writes: 2,
            unconfirmed_bytes: 8192,
            lost_acked_writes: 0,
            lost_acked_bytes: 0,
            queued_bytes: 40960,
            sndbuf_size: 16 << 20,
            congested: true,
            congested_writes: 7,
            marks_wait_for_primary: false,
        }],
    }
}

fn nbd() -> NbdExportStats {
    NbdExportStats {
        export: "r0".into(),
        commands: vec![NbdCommandStats {
            command: "write".into(),
            requests: 10,
            errors: 1,
            bytes: 40960,
            latency: Histogram {
                buckets: vec![(0.0001, 2), (0.001, 5), (0.01, 2)],
                sum_seconds: 0.05,
                count: 10,
            },
        }],
    }
}

/// (name, labels, value) of every sample; panics on anything that is not valid exposition.
pub(crate) fn parse(text: &str) -> Vec<(String, Vec<(String, String)>, f64)> {
    let mut out = Vec::new();
    let mut typed = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut p = rest.splitn(3, ' ');
            let (kind, name) = (p.next().unwrap(), p.next().unwrap());
            assert!(matches!(kind, "HELP" | "TYPE"), "{line}");
            if kind == "TYPE" {
                let t = p.next().unwrap();
                assert!(matches!(t, "gauge" | "counter" | "histogram"), "{line}");
                assert!(
                    typed.insert(name.to_string(), t.to_string()).is_none(),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().expect(line),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect(line);
                let labels = l
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect(line);
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
        };
        assert!(
            name.starts_with("blockd_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&name);
        let t = typed
            .get(family)
            .unwrap_or_else(|| panic!("no TYPE before {line}"));
        if t == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
        out.push((name, labels, value));
    }
    out
}

fn value(
    samples: &[(String, Vec<(String, String)>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
        })
        .unwrap_or_else(|| panic!("no {name} {labels:?}"))
        .2
}

#[test]
fn renders_every_family() {
    let text = render(&Snapshot {
        status: Some(vec![status()]),
        nbd: vec![nbd()],
    });
    let s = parse(&text);
    assert_eq!(value(&s, "blockd_status_up", &[]), 1.0);
    assert_eq!(
        value(&s, "blockd_resource_role", &[("role", "primary")]),
        1.0
    );
    assert_eq!(
        value(&s, "blockd_resource_role", &[("role", "secondary")]),
        0.0
    );
    assert_eq!(
        value(&s, "blockd_resource_disk_state", &[("state", "up-to-date")]),
        1.0
    );
    assert_eq!(
        value(&s, "blockd_resource_size_bytes", &[("resource", "r0")]),
        1073741824.0
    );
    let peer = [("resource", "r0"), ("peer", "beta")];
    assert_eq!(value(&s, "blockd_peer_out_of_sync_bytes", &peer), 12288.0);
    assert_eq!(value(&s, "blockd_peer_in_flight_requests", &peer), 3.0);
    assert_eq!(value(&s, "blockd_peer_in_flight_bytes", &peer), 12288.0);
    assert_eq!(value(&s, "blockd_peer_unconfirmed_writes", &peer), 2.0);
    assert_eq!(value(&s, "blockd_peer_unconfirmed_bytes", &peer), 8192.0);
    assert_eq!(value(&s, "blockd_peer_queued_bytes", &peer), 40960.0);
    assert_eq!(value(&s, "blockd_peer_congested", &peer), 1.0);
    assert_eq!(value(&s, "blockd_peer_congested_writes", &peer), 7.0);
    assert_eq!(value(&s, "blockd_peer_lost_acked_writes", &peer), 0.0);
    assert_eq!(value(&s, "blockd_peer_lost_acked_bytes", &peer), 0.0);
    assert_eq!(
        value(&s, "blockd_peer_resync_rate_bytes_per_second", &peer),
        1e6
    );
    assert_eq!(value(&s, "blockd_peer_resync_done_bytes", &peer), 53248.0);
    assert_eq!(
        value(
            &s,
            "blockd_peer_connection_state",
            &[("state", "connected")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "blockd_peer_connection_state",
            &[("state", "connecting")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "blockd_peer_replication_state",
            &[("state", "sync-source")]
        ),
        1.0
    );
    assert_eq!(
        value(&s, "blockd_peer_disk_state", &[("state", "inconsistent")]),
        1.0
    );
    let w = [("export", "r0"), ("command", "write")];
    assert_eq!(value(&s, "blockd_nbd_requests_total", &w), 10.0);
    assert_eq!(value(&s, "blockd_nbd_request_errors_total", &w), 1.0);
    assert_eq!(value(&s, "blockd_nbd_bytes_total", &w), 40960.0);
    // Buckets are cumulative in the exposition; the last is +Inf = count.
    assert_eq!(
        value(
            &s,
            "blockd_nbd_request_duration_seconds_bucket",
            &[("le", "0.001")]
        ),
        7.0
    );
    assert_eq!(
        value(
            &s,
            "blockd_nbd_request_duration_seconds_bucket",
            &[("le", "0.01")]
        ),
        9.0
    );
    assert_eq!(
        value(
            &s,
            "blockd_nbd_request_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        10.0
    );
    assert_eq!(
        value(&s, "blockd_nbd_request_duration_seconds_count", &w),
        10.0
    );
    assert_eq!(
        value(&s, "blockd_nbd_request_duration_seconds_sum", &w),
        0.05
    );
}

#[test]
fn status_unavailable_still_renders() {
    let text = render(&Snapshot::default());
    let s = parse(&text);
    assert_eq!(value(&s, "blockd_status_up", &[]), 0.0);
    assert_eq!(s.len(), 1, "{text}");
}

#[test]
fn select_keeps_named_resources() {
    let mut other = status();
    other.resource = "r1".into();
    let snap = source::select(
        Some(vec![status(), other]),
        vec![nbd()],
        &["r1".to_string()],
    );
    let st = snap.status.unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].resource, "r1");
    assert!(snap.nbd.is_empty());
}
