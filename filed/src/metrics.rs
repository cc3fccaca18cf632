//! The daemon's Prometheus endpoint (opt-in, `metrics-listen`): `GET /metrics` answers the text
//! exposition format (OpenMetrics text, encoded by `prometheus-client`) built at scrape time from
//! the state database (queue lengths, conflicts, last sync) and the in-memory counters.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::node::Node;

type Labels = Vec<(String, String)>;

fn peer_labels(group: &str, peer: &str) -> Labels {
    vec![
        ("group".to_string(), group.to_string()),
        ("peer".to_string(), peer.to_string()),
    ]
}

fn group_labels(group: &str) -> Labels {
    vec![("group".to_string(), group.to_string())]
}

/// The metrics of `node` now, in the text format.
pub fn render(node: &Node) -> String {
    let mut reg = Registry::default();
    let queue = Family::<Labels, Gauge>::default();
    let conflicts = Family::<Labels, Gauge>::default();
    let last_sync = Family::<Labels, Gauge>::default();
    let runs = Family::<Labels, Counter>::default();
    let failures = Family::<Labels, Counter>::default();
    let transfers = Family::<Labels, Counter>::default();
    let bytes_sent = Family::<Labels, Counter>::default();
    let bytes_received = Family::<Labels, Counter>::default();
    let errors = Family::<Labels, Counter>::default();
    let batches = Family::<Labels, Counter>::default();
    let events = Family::<Labels, Counter>::default();
    let suppressed = Family::<Labels, Counter>::default();
    let rescans = Family::<Labels, Counter>::default();
    let store_errors = Counter::<u64>::default();
    for g in node.my_groups() {
        let gc = node.stats.group_counters(&g.name);
        let gl = group_labels(&g.name);
        batches.get_or_create(&gl).inc_by(gc.batches);
        events.get_or_create(&gl).inc_by(gc.events);
        suppressed.get_or_create(&gl).inc_by(gc.suppressed);
        rescans.get_or_create(&gl).inc_by(gc.rescans);
        let all_conflicts = match node.store.conflicts(Some(&g.name)) {
            Ok(c) => c,
            Err(_) => {
                store_errors.inc();
                Vec::new()
            }
        };
        for peer in g.peers_of(&node.me.name) {
            let l = peer_labels(&g.name, &peer);
            match node.store.dirty_len(&g.name, &peer) {
                Ok(n) => {
                    queue.get_or_create(&l).set(n as i64);
                }
                Err(_) => {
                    store_errors.inc();
                }
            }
            conflicts
                .get_or_create(&l)
                .set(all_conflicts.iter().filter(|c| c.peer == peer).count() as i64);
            let st = node.store.peer_status(&g.name, &peer).unwrap_or_default();
            last_sync
                .get_or_create(&l)
                .set(st.last_ok_ns / 1_000_000_000);
            let pc = node.stats.peer_counters(&g.name, &peer);
            runs.get_or_create(&l).inc_by(pc.sync_runs);
            failures.get_or_create(&l).inc_by(pc.sync_failures);
            let mut sent = l.clone();
            sent.push(("direction".into(), "sent".into()));
            transfers.get_or_create(&sent).inc_by(pc.transfers_sent);
            let mut recv = l.clone();
            recv.push(("direction".into(), "received".into()));
            transfers.get_or_create(&recv).inc_by(pc.transfers_received);
            bytes_sent.get_or_create(&l).inc_by(pc.bytes_sent);
            bytes_received.get_or_create(&l).inc_by(pc.bytes_received);
            errors
                .get_or_create(&l)
                .inc_by(pc.path_errors + pc.sync_failures);
        }
    }
    reg.register("filed_queue_length", "Paths queued for the peer", queue);
    reg.register(
        "filed_conflicts",
        "Unresolved conflicts with the peer",
        conflicts,
    );
    reg.register(
        "filed_last_sync_timestamp_seconds",
        "Unix time of the last completed session with the peer (0: never)",
        last_sync,
    );
    reg.register(
        "filed_sync_runs",
        "Completed sync sessions with the peer (either side started)",
        runs,
    );
    reg.register(
        "filed_sync_failures",
        "Sessions that failed (peer unreachable, refused, broken off)",
        failures,
    );
    reg.register(
        "filed_transfers",
        "Paths transferred (files, directories, symlinks, deletions, renames)",
        transfers,
    );
    reg.register("filed_bytes_sent", "Bytes sent to the peer", bytes_sent);
    reg.register(
        "filed_bytes_received",
        "Bytes received from the peer",
        bytes_received,
    );
    reg.register(
        "filed_errors",
        "Errors: failed sessions and per-path failures",
        errors,
    );
    reg.register(
        "filed_watch_batches",
        "Batches of watch events processed",
        batches,
    );
    reg.register("filed_watch_events", "Watch events received", events);
    reg.register(
        "filed_watch_suppressed",
        "Watch events on paths exactly as filed itself wrote them (no loop)",
        suppressed,
    );
    reg.register(
        "filed_rescans",
        "Rescans after lost watch events (queue overflow, watch limit)",
        rescans,
    );
    reg.register(
        "filed_store_errors",
        "State database reads that failed while rendering metrics",
        store_errors,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(node: Arc<Node>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(&node, stream).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(node: &Node, mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(head, Ok(Ok(()))) {
        return Ok(());
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(node),
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served\n".to_string(),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}
