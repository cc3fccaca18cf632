//! Where a scrape's numbers come from: the resource status as the control socket reports it
//! (the same `status` request `blockctl status --json` makes) and the NBD servers' request
//! statistics.

use std::path::Path;
use std::time::Duration;

use super::{Histogram, NbdCommandStats, NbdExportStats, Snapshot};
use crate::control::client::Client;
use crate::control::proto::Request;
use crate::repl::resource::Status;

/// How long a scrape waits for the control socket.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// The status of every resource on the control socket at `control`, or `None` when it
/// cannot be read in time.
pub async fn status(control: &Path) -> Option<Vec<Status>> {
    let ask = async {
        let mut c = Client::connect(control).await.ok()?;
        let resp = c.call(&Request::new("status", None)).await.ok()?;
        if resp.ok != Some(true) {
            return None;
        }
        resp.status
    };
    tokio::time::timeout(STATUS_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

/// A snapshot limited to the resources named in `only` (and the NBD exports of the same
/// names: a replicated resource's export is named after it).
pub fn select(status: Option<Vec<Status>>, nbd: Vec<NbdExportStats>, only: &[String]) -> Snapshot {
    let keep = |name: &str| only.iter().any(|n| n == name);
    Snapshot {
        status: status.map(|all| all.into_iter().filter(|s| keep(&s.resource)).collect()),
        nbd: nbd.into_iter().filter(|x| keep(&x.export)).collect(),
    }
}

/// The NBD request statistics of every export served by this process
/// (`crate::nbd::metrics::registry()`).
pub fn nbd_stats() -> Vec<NbdExportStats> {
    crate::nbd::metrics::registry()
        .into_iter()
        .map(|(export, m)| NbdExportStats {
            export,
            commands: m
                .snapshot()
                .commands
                .into_iter()
                .map(|c| NbdCommandStats {
                    command: c.command.name().to_string(),
                    requests: c.requests,
                    errors: c.errors,
                    bytes: c.bytes,
                    latency: per_bucket(&c.latency),
                })
                .collect(),
        })
        .collect()
}

/// The NBD server's cumulative buckets as per-bucket counts (what the encoder sums up).
fn per_bucket(h: &crate::nbd::metrics::HistogramSnapshot) -> Histogram {
    let mut before = 0;
    Histogram {
        buckets: h
            .buckets
            .iter()
            .map(|&(bound, cumulative)| {
                let n = cumulative.saturating_sub(before);
                before = cumulative.max(before);
                (bound, n)
            })
            .collect(),
        sum_seconds: h.sum_seconds,
        count: h.count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_statistics_are_rendered_cumulative_again() {
        let name = "metrics-source-test-export";
        let m = crate::nbd::metrics::register(name);
        m.record(
            crate::nbd::metrics::Command::Write,
            4096,
            Duration::from_micros(50),
            true,
        );
        m.record(
            crate::nbd::metrics::Command::Write,
            4096,
            Duration::from_secs(100),
            false,
        );
        let stats = nbd_stats();
        let x = stats.iter().find(|x| x.export == name).expect("registered");
        let w = x.commands.iter().find(|c| c.command == "write").unwrap();
        assert_eq!((w.requests, w.errors, w.bytes), (2, 1, 8192));
        assert_eq!(w.latency.buckets.iter().map(|b| b.1).sum::<u64>(), 2);
        let text = super::super::render(&Snapshot {
            status: None,
            nbd: vec![x.clone()],
        });
        let inf = format!(
            "blockd_nbd_request_duration_seconds_bucket{{export=\"{name}\",command=\"write\",le=\"+Inf\"}} 2"
        );
        assert!(text.contains(&inf), "{text}");
        assert_eq!(
            text.matches("le=\"+Inf\"").count(),
            7,
            "one +Inf per command: {text}"
        );
    }
}
