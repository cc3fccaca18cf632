//! Where a scrape's numbers come from: the resource status as the control socket reports it
//! (the same `status` request `blockctl status --json` makes) and the NBD servers' request
//! statistics.

use std::path::Path;
use std::time::Duration;

use super::{NbdExportStats, Snapshot};
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

/// The NBD request statistics of every export served by this process.
pub fn nbd_stats() -> Vec<NbdExportStats> {
    // Wired to `crate::nbd::metrics::registry()` once the NBD server keeps statistics.
    Vec::new()
}
