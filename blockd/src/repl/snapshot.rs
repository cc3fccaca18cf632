//! Snapshots of this node's replica served over NBD: `blockctl snapshot` freezes one (refused
//! on a Primary and on Inconsistent data) and serves it read-only on its own address,
//! `--drop` ends it; status and events report them; a clean shutdown keeps them, and the next
//! start serves them again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::nbd::export::Export;
use crate::nbd::server::{self, Listener, ServerOptions};
use crate::repl::device::Device;
use crate::repl::resource::{Resource, ResourceError, error_chain, now_ms};
use crate::repl::state::{DiskState, Role};
use crate::snapshot::set::{Snapshot, SnapshotError, Snapshots};
use crate::store::{BlockStore, StoreError};

/// What `status` shows of one snapshot (part of the stable `status --json` schema).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// `nbd://ADDR:PORT/NAME` of its read-only export.
    pub nbd: String,
    pub created_unix_ms: u64,
    pub age_secs: u64,
    /// Data generation of the replica at the freeze (hex).
    pub generation: String,
    pub cow_used_bytes: u64,
    pub cow_capacity_bytes: u64,
    /// Why it is no longer readable; absent while valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

/// `blockctl snapshot RES [--name NAME] [--consistent] [--listen ADDR] [--cow-size SIZE]`.
#[derive(Clone, Debug, Default)]
pub struct OpenRequest {
    pub name: Option<String>,
    /// Ask the Primary for a flush boundary first.
    pub consistent: bool,
    pub listen: Option<SocketAddr>,
    pub cow_size: Option<u64>,
}

/// The snapshots of one resource and the NBD services serving them.
pub struct SnapshotService {
    pub(crate) set: Snapshots,
    /// Per served snapshot: set to true to stop its NBD service.
    stops: Mutex<HashMap<String, watch::Sender<bool>>>,
    pub(crate) boundaries: FlushBoundaries,
}

/// `--consistent`: flushes this Secondary asked its Primary for, and how far the replica has
/// applied the Primary's flushes.
#[derive(Default)]
pub(crate) struct FlushBoundaries {
    next_id: std::sync::atomic::AtomicU64,
    /// Asked-for flushes: id → where to send the seq of the last `Flush` received before the
    /// answer.
    waiting: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<u64>>>,
    /// Seq of the last `Flush` received from the Primary.
    received: std::sync::atomic::AtomicU64,
    /// Seq of the last `Flush` applied (every earlier request done, disk flushed) + 1.
    applied: watch::Sender<u64>,
}

impl FlushBoundaries {
    /// A `Flush { seq }` arrived from the Primary.
    pub(crate) fn flush_received(&self, seq: u64) {
        self.received
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
    }

    /// The replica applied `Flush { seq }`.
    pub(crate) fn flush_applied(&self, seq: u64) {
        self.applied.send_modify(|a| *a = (*a).max(seq + 1));
    }

    /// The Primary answered `SnapshotFlush { id }`: the `Flush` it caused arrived before.
    pub(crate) fn answered(&self, id: u64) {
        let waiter = self.waiting.lock().expect("waiting").remove(&id);
        if let Some(tx) = waiter {
            let _ = tx.send(self.received.load(std::sync::atomic::Ordering::Acquire));
        }
    }

    fn ask(&self) -> (u64, tokio::sync::oneshot::Receiver<u64>) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().expect("waiting").insert(id, tx);
        (id, rx)
    }
}

/// How long `--consistent` waits for the Primary's flush.
const FLUSH_BOUNDARY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl SnapshotService {
    /// Reloads the snapshots a clean shutdown left in `dir`; untrusted ones are removed and
    /// reported.
    pub fn load(dir: &std::path::Path, resource: &str, size: u64) -> SnapshotService {
        let (set, dropped) = Snapshots::load(dir, resource, size);
        for d in dropped {
            tracing::warn!(resource, "{d}");
            eprintln!("blockd: resource {resource}: {d}");
        }
        SnapshotService {
            set,
            stops: Mutex::new(HashMap::new()),
            boundaries: FlushBoundaries::default(),
        }
    }

    pub fn status(&self) -> Vec<SnapshotInfo> {
        let now = now_ms();
        self.set
            .status()
            .into_iter()
            .map(|s| SnapshotInfo {
                nbd: format!("nbd://{}/{}", s.listen, s.name),
                age_secs: now.saturating_sub(s.created_unix_ms) / 1000,
                created_unix_ms: s.created_unix_ms,
                generation: format!("{:016x}", s.generation),
                cow_used_bytes: s.cow_used_bytes,
                cow_capacity_bytes: s.cow_capacity_bytes,
                invalid: s.invalid,
                name: s.name,
            })
            .collect()
    }
}

/// A snapshot as an NBD device: reads of the frozen image; everything else is refused.
#[derive(Clone)]
pub struct SnapshotExport {
    pub(crate) store: BlockStore,
    pub(crate) snap: Arc<Snapshot>,
}

impl SnapshotExport {
    pub fn size(&self) -> u64 {
        self.snap.size()
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<BytesMut, StoreError> {
        self.snap
            .read(&self.store, offset, len)
            .await
            .map_err(|e| StoreError::Read {
                offset,
                len: len as u64,
                source: std::io::Error::other(error_chain(&e)),
            })
    }
}

fn snap_err(res: &Resource, source: SnapshotError) -> ResourceError {
    ResourceError::Snapshot {
        resource: res.name().to_string(),
        source,
    }
}

impl Resource {
    /// The snapshots, for status.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots.status()
    }

    /// `blockctl snapshot`: freezes the replica (after a flush boundary of the Primary with
    /// `consistent`) and serves it read-only over NBD.
    pub async fn snapshot_open(
        self: &Arc<Self>,
        req: OpenRequest,
    ) -> Result<SnapshotInfo, ResourceError> {
        let (role, disk) = {
            let st = self.state.lock().expect("state");
            (st.role, st.disk)
        };
        if role == Role::Primary {
            return Err(ResourceError::SnapshotRefused(
                "this node is Primary; snapshots are taken on a Secondary".into(),
            ));
        }
        if disk == DiskState::Inconsistent || disk == DiskState::Diskless {
            return Err(ResourceError::SnapshotRefused(format!(
                "the local data is {disk}: a snapshot would not be a state the Primary passed through"
            )));
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("snap-{}", now_ms() / 1000));
        if self.snapshots.set.get(&name).is_some() {
            return Err(snap_err(self, SnapshotError::Exists { name }));
        }
        if req.consistent {
            self.flush_boundary().await?;
        }
        let addr = req
            .listen
            .unwrap_or_else(|| SocketAddr::new(self.nbd_address().ip(), 0));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ResourceError::Listen {
                resource: self.name().to_string(),
                addr,
                source,
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ResourceError::Listen {
                resource: self.name().to_string(),
                addr,
                source,
            })?;
        let capacity = req
            .cow_size
            .unwrap_or_else(|| self.spec.snapshot_cow_size.unwrap_or(self.size() / 4))
            .max(1 << 20);
        let generation = self.meta.lock().expect("meta").sb.generations.current.0;
        let snap = self
            .snapshots
            .set
            .freeze(&name, capacity, generation, &bound.to_string())
            .await
            .map_err(|e| snap_err(self, e))?;
        self.serve_snapshot(snap, listener);
        self.emit(
            None,
            "snapshot",
            format!("opened {name} nbd://{bound}/{name}"),
        );
        let info = self
            .snapshots()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| snap_err(self, SnapshotError::Unknown { name: name.clone() }))?;
        Ok(info)
    }

    /// `blockctl snapshot RES --drop NAME`: stops its NBD service and removes its area.
    pub async fn snapshot_drop(&self, name: &str) -> Result<(), ResourceError> {
        self.snapshots
            .set
            .drop_snapshot(name)
            .await
            .map_err(|e| snap_err(self, e))?;
        if let Some(stop) = self.snapshots.stops.lock().expect("stops").remove(name) {
            let _ = stop.send(true);
        }
        self.emit(None, "snapshot", format!("dropped {name}"));
        Ok(())
    }

    /// `--consistent`: asks the connected Primary to flush and waits until this replica has
    /// applied that flush, so the freeze that follows contains everything the Primary's
    /// clients had flushed.
    async fn flush_boundary(&self) -> Result<(), ResourceError> {
        let conn = {
            let st = self.state.lock().expect("state");
            self.peers
                .iter()
                .zip(&st.peers)
                .find(|(_, ps)| ps.role == Role::Primary)
                .and_then(|(p, _)| p.conn.lock().expect("conn").clone())
        };
        let Some(conn) = conn else {
            return Err(ResourceError::SnapshotRefused(
                "--consistent needs a connected Primary".into(),
            ));
        };
        let b = &self.snapshots.boundaries;
        let (id, answer) = b.ask();
        conn.send(crate::repl::wire::Message::SnapshotFlush { id });
        let wait = async {
            let target = answer
                .await
                .map_err(|_| "the link to the Primary was lost")?;
            let mut applied = b.applied.subscribe();
            applied
                .wait_for(|a| *a > target)
                .await
                .map_err(|_| "the resource stopped")?;
            Ok::<(), &str>(())
        };
        match tokio::time::timeout(FLUSH_BOUNDARY_TIMEOUT, wait).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(ResourceError::SnapshotRefused(format!(
                "no flush boundary from the Primary: {why}"
            ))),
            Err(_) => Err(ResourceError::SnapshotRefused(format!(
                "no flush boundary from the Primary within {} s",
                FLUSH_BOUNDARY_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Reports snapshots a change had to invalidate.
    pub(crate) fn snapshots_invalidated(&self, gone: &[crate::snapshot::set::Invalidated]) {
        for g in gone {
            tracing::error!(resource = %self.name(), snapshot = %g.name,
                "snapshot invalidated: {}", g.reason);
            self.emit(
                None,
                "snapshot",
                format!("invalidated {}: {}", g.name, g.reason),
            );
        }
    }

    /// Serves the snapshots reloaded at start again, on their recorded addresses.
    pub(crate) async fn serve_reloaded_snapshots(self: &Arc<Self>) {
        for s in self.snapshots.set.status() {
            let Some(snap) = self.snapshots.set.get(&s.name) else {
                continue;
            };
            let bound = match s.listen.parse::<SocketAddr>() {
                Ok(addr) => TcpListener::bind(addr).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match bound {
                Ok(l) => self.serve_snapshot(snap, l),
                Err(e) => {
                    tracing::error!(resource = %self.name(), snapshot = %s.name,
                        "cannot serve the snapshot on {}: {e}", s.listen);
                    self.emit(
                        None,
                        "snapshot",
                        format!("unserved {}: cannot listen on {}: {e}", s.name, s.listen),
                    );
                }
            }
        }
    }

    fn serve_snapshot(self: &Arc<Self>, snap: Arc<Snapshot>, listener: TcpListener) {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let name = snap.name().to_string();
        self.snapshots
            .stops
            .lock()
            .expect("stops")
            .insert(name.clone(), stop_tx);
        let export = Arc::new(Export {
            name: name.clone(),
            description: Some(format!(
                "read-only snapshot {name} of blockd resource {}",
                self.name()
            )),
            store: Device::Snapshot(SnapshotExport {
                store: self.store().clone(),
                snap,
            }),
        });
        let mut stopped = self.stop_signal();
        let res = self.clone();
        tokio::spawn(async move {
            let until = async move {
                tokio::select! {
                    _ = stop_rx.wait_for(|s| *s) => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            };
            let r = server::run_with(
                vec![Listener::Tcp(listener)],
                export,
                None,
                ServerOptions::default(),
                until,
            )
            .await;
            if let Err(e) = r {
                tracing::error!(resource = %res.name(), snapshot = %name,
                    "snapshot export failed: {}", error_chain(&e));
            }
        });
    }
}
