//! The opt-in Prometheus endpoint: what a scrape reports ([`Snapshot`]: the control socket's
//! resource status plus the NBD request statistics), its text exposition ([`render`], a pure
//! function over a snapshot, encoded with `prometheus-client`), and the HTTP listener
//! ([`http`]).
//!
//! Metric names (all prefixed `blockd_`; state metrics are state sets: one series per possible
//! state, value 1 for the current one):
//!
//! | metric | labels | type |
//! |---|---|---|
//! | `blockd_status_up` | | gauge: 1 when the resource status could be read |
//! | `blockd_resource_role` | resource, role | state set |
//! | `blockd_resource_disk_state` | resource, state | state set |
//! | `blockd_resource_size_bytes` | resource | gauge |
//! | `blockd_peer_connection_state` | resource, peer, state | state set |
//! | `blockd_peer_replication_state` | resource, peer, state | state set |
//! | `blockd_peer_role`, `blockd_peer_disk_state` | resource, peer, role/state | state sets |
//! | `blockd_peer_out_of_sync_bytes` | resource, peer | gauge |
//! | `blockd_peer_in_flight_requests`, `blockd_peer_in_flight_bytes` | resource, peer | gauge (replication lag) |
//! | `blockd_peer_unconfirmed_writes`, `blockd_peer_unconfirmed_bytes` | resource, peer | gauge: writes acknowledged to clients the peer has not written yet (protocols A, B) |
//! | `blockd_peer_queued_bytes`, `blockd_peer_congested`, `blockd_peer_congested_writes` | resource, peer | gauge: protocol A send buffer use (`sndbuf-size`), 1 while writes wait for room, writes that waited since the link came up |
//! | `blockd_peer_lost_acked_writes`, `blockd_peer_lost_acked_bytes` | resource, peer | gauge: on a Secondary, acknowledged writes of the lost Primary that never arrived (at least) |
//! | `blockd_peer_resync_rate_bytes_per_second` | resource, peer | gauge (0 without a resync) |
//! | `blockd_peer_resync_total_bytes`, `blockd_peer_resync_done_bytes` | resource, peer | gauge |
//! | `blockd_nbd_requests_total`, `blockd_nbd_request_errors_total`, `blockd_nbd_bytes_total` | export, command | counter |
//! | `blockd_nbd_request_duration_seconds` | export, command | histogram |

pub mod http;
pub mod source;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::repl::resource::Status;
use crate::repl::state::{ConnState, DiskState, ReplState, Role};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A latency histogram: `buckets` are (upper bound in seconds, requests in this bucket only,
/// not cumulative), ascending; requests above the last bound count only in `count`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

/// Statistics of one NBD command (`read`, `write`, `flush`, ...) of one export.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NbdCommandStats {
    pub command: String,
    pub requests: u64,
    pub errors: u64,
    pub bytes: u64,
    pub latency: Histogram,
}

/// Statistics of one NBD export.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NbdExportStats {
    pub export: String,
    pub commands: Vec<NbdCommandStats>,
}

/// Everything one scrape reports.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `None`: the status could not be read (blockd starting or stopping).
    pub status: Option<Vec<Status>>,
    pub nbd: Vec<NbdExportStats>,
}

/// Renders `snapshot` in the Prometheus text format (version 0.0.4).
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

type Labels = Vec<(&'static str, String)>;

/// One metric family: name, help, type and its series.
struct Family<V> {
    name: &'static str,
    help: &'static str,
    series: Vec<(Labels, V)>,
}

impl<V> Family<V> {
    fn new(name: &'static str, help: &'static str) -> Family<V> {
        Family {
            name,
            help,
            series: Vec::new(),
        }
    }

    fn push(&mut self, labels: Labels, value: V) {
        self.series.push((labels, value));
    }
}

fn encode_gauges(e: &mut DescriptorEncoder, f: &Family<i64>) -> Result<(), std::fmt::Error> {
    if f.series.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(f.name, f.help, None, MetricType::Gauge)?;
    for (labels, v) in &f.series {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

fn encode_counters(e: &mut DescriptorEncoder, f: &Family<u64>) -> Result<(), std::fmt::Error> {
    if f.series.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(f.name, f.help, None, MetricType::Counter)?;
    for (labels, v) in &f.series {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The series of a state set: one per name, 1 for `current`.
fn state_set(
    f: &mut Family<i64>,
    labels: &Labels,
    key: &'static str,
    names: &[&str],
    current: &str,
) {
    for name in names {
        let mut l = labels.clone();
        l.push((key, (*name).to_string()));
        f.push(l, i64::from(*name == current));
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = &self.0;
        let mut up = Family::new(
            "blockd_status_up",
            "1 when blockd's resource status could be read for this scrape",
        );
        up.push(Vec::new(), i64::from(snap.status.is_some()));
        encode_gauges(&mut e, &up)?;

        let mut role = Family::new(
            "blockd_resource_role",
            "Role of the resource on this node (state set)",
        );
        let mut disk = Family::new(
            "blockd_resource_disk_state",
            "Disk state of the resource on this node (state set)",
        );
        let mut size = Family::new(
            "blockd_resource_size_bytes",
            "Usable size of the replicated device",
        );
        let mut conn = Family::new(
            "blockd_peer_connection_state",
            "Connection state of the link to a peer (state set)",
        );
        let mut repl = Family::new(
            "blockd_peer_replication_state",
            "Replication state towards a peer (state set)",
        );
        let mut peer_role = Family::new(
            "blockd_peer_role",
            "Role of a peer as last reported by it (state set)",
        );
        let mut peer_disk = Family::new(
            "blockd_peer_disk_state",
            "Disk state of a peer as last reported by it (state set)",
        );
        let mut oos = Family::new(
            "blockd_peer_out_of_sync_bytes",
            "Bytes marked out of sync for a peer in this node's bitmap",
        );
        let mut flight = Family::new(
            "blockd_peer_in_flight_requests",
            "Writes sent to a peer and not yet acknowledged",
        );
        let mut flight_bytes = Family::new(
            "blockd_peer_in_flight_bytes",
            "Bytes of writes sent to a peer and not yet acknowledged",
        );
        let mut unconfirmed = Family::new(
            "blockd_peer_unconfirmed_writes",
            "Writes acknowledged to NBD clients that a peer has not confirmed as written (protocols A and B)",
        );
        let mut unconfirmed_bytes = Family::new(
            "blockd_peer_unconfirmed_bytes",
            "Bytes of the writes acknowledged to NBD clients that a peer has not confirmed as written",
        );
        let mut queued = Family::new(
            "blockd_peer_queued_bytes",
            "Protocol A: bytes queued or sent to a peer and not yet acknowledged, counted against sndbuf-size",
        );
        let mut congested = Family::new(
            "blockd_peer_congested",
            "Protocol A: 1 while writes wait for room in the peer's send buffer (sndbuf-size)",
        );
        let mut congested_writes = Family::new(
            "blockd_peer_congested_writes",
            "Protocol A: writes that had to wait for room in the peer's send buffer since the link came up",
        );
        let mut lost = Family::new(
            "blockd_peer_lost_acked_writes",
            "On a Secondary: writes the lost Primary had acknowledged that never arrived here (at least)",
        );
        let mut lost_bytes = Family::new(
            "blockd_peer_lost_acked_bytes",
            "On a Secondary: bytes of the acknowledged writes of the lost Primary that never arrived (at least)",
        );
        let mut rate = Family::new(
            "blockd_peer_resync_rate_bytes_per_second",
            "Resync rate since the running resync started (0 without a resync)",
        );
        let mut rs_total = Family::new(
            "blockd_peer_resync_total_bytes",
            "Bytes the running resync covers (0 without a resync)",
        );
        let mut rs_done = Family::new(
            "blockd_peer_resync_done_bytes",
            "Bytes the running resync has done (0 without a resync)",
        );
        for s in snap.status.iter().flatten() {
            let r: Labels = vec![("resource", s.resource.clone())];
            let roles: Vec<&str> = Role::ALL
                .iter()
                .filter(|r| **r != Role::Unknown)
                .map(|r| r.as_str())
                .collect();
            state_set(&mut role, &r, "role", &roles, &s.role);
            let disks: Vec<&str> = DiskState::ALL
                .iter()
                .filter(|d| **d != DiskState::Unknown)
                .map(|d| d.as_str())
                .collect();
            state_set(&mut disk, &r, "state", &disks, &s.disk);
            size.push(r.clone(), gauge(s.size));
            for p in &s.peers {
                let l: Labels = vec![("resource", s.resource.clone()), ("peer", p.node.clone())];
                state_set(&mut conn, &l, "state", ConnState::NAMES, &p.connection);
                state_set(&mut repl, &l, "state", ReplState::NAMES, &p.replication);
                state_set(&mut peer_role, &l, "role", Role::NAMES, &p.role);
                state_set(&mut peer_disk, &l, "state", DiskState::NAMES, &p.disk);
                oos.push(l.clone(), gauge(p.out_of_sync_bytes));
                flight.push(l.clone(), gauge(p.in_flight as u64));
                flight_bytes.push(l.clone(), gauge(p.in_flight_bytes));
                unconfirmed.push(l.clone(), gauge(p.unconfirmed_writes));
                unconfirmed_bytes.push(l.clone(), gauge(p.unconfirmed_bytes));
                queued.push(l.clone(), gauge(p.queued_bytes));
                congested.push(l.clone(), gauge(u64::from(p.congested)));
                congested_writes.push(l.clone(), gauge(p.congested_writes));
                lost.push(l.clone(), gauge(p.lost_acked_writes));
                lost_bytes.push(l.clone(), gauge(p.lost_acked_bytes));
                let (t, d, r) = p
                    .resync
                    .as_ref()
                    .map_or((0, 0, 0), |r| (r.total_bytes, r.done_bytes, r.rate));
                rate.push(l.clone(), gauge(r));
                rs_total.push(l.clone(), gauge(t));
                rs_done.push(l, gauge(d));
            }
        }
        for f in [
            &role,
            &disk,
            &size,
            &conn,
            &repl,
            &peer_role,
            &peer_disk,
            &oos,
            &flight,
            &flight_bytes,
            &unconfirmed,
            &unconfirmed_bytes,
            &queued,
            &congested,
            &congested_writes,
            &lost,
            &lost_bytes,
            &rate,
            &rs_total,
            &rs_done,
        ] {
            encode_gauges(&mut e, f)?;
        }

        // Counter names get `_total` from the encoder.
        let mut requests = Family::new(
            "blockd_nbd_requests",
            "NBD requests served, by export and command",
        );
        let mut errors = Family::new(
            "blockd_nbd_request_errors",
            "NBD requests answered with an error, by export and command",
        );
        let mut bytes = Family::new(
            "blockd_nbd_bytes",
            "Payload bytes of NBD requests (read, written, trimmed, zeroed), by export and command",
        );
        for x in &snap.nbd {
            for c in &x.commands {
                let l: Labels = vec![("export", x.export.clone()), ("command", c.command.clone())];
                requests.push(l.clone(), c.requests);
                errors.push(l.clone(), c.errors);
                bytes.push(l, c.bytes);
            }
        }
        for f in [&requests, &errors, &bytes] {
            encode_counters(&mut e, f)?;
        }
        let histograms: Vec<(Labels, &Histogram)> = snap
            .nbd
            .iter()
            .flat_map(|x| {
                x.commands.iter().map(|c| {
                    (
                        vec![("export", x.export.clone()), ("command", c.command.clone())],
                        &c.latency,
                    )
                })
            })
            .collect();
        if !histograms.is_empty() {
            let mut m = e.encode_descriptor(
                "blockd_nbd_request_duration_seconds",
                "NBD request latency from decoded request to reply sent, by export and command",
                None,
                MetricType::Histogram,
            )?;
            for (labels, h) in &histograms {
                m.encode_family(labels)?.encode_histogram::<NoLabelSet>(
                    h.sum_seconds,
                    h.count,
                    &h.buckets,
                    None,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
