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

use crate::meta::generation::{GenerationIds, Uuid};
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
/// applied the Primary's flushes, per replication session. Flush sequence numbers compare only
/// within one session: a Primary that restarted, or another node promoted after a failover,
/// numbers its requests from 0 again.
#[derive(Default)]
pub(crate) struct FlushBoundaries {
    next_id: std::sync::atomic::AtomicU64,
    next_session: std::sync::atomic::AtomicU64,
    /// Asked-for flushes: id → where to send the boundary to wait for (the seq of the last
    /// `Flush` received on the session that answered, before the answer).
    waiting: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Boundary>>>,
    /// The flushes of each live session (removed when it ends).
    sessions: watch::Sender<HashMap<u64, SessionFlushes>>,
}

/// Flushes of one replication session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SessionFlushes {
    /// Seq of the last `Flush` received from the peer.
    received: u64,
    /// Seq of the last `Flush` applied (every earlier request done, disk flushed) + 1.
    applied: u64,
}

/// Where a `--consistent` freeze may happen: once `Flush { seq }` of `session` is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Boundary {
    session: u64,
    seq: u64,
}

impl FlushBoundaries {
    /// A replication session starts: the key of its flushes.
    pub(crate) fn session_started(&self) -> u64 {
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sessions.send_modify(|m| {
            m.insert(session, SessionFlushes::default());
        });
        session
    }

    /// The session ended (and applied everything it will): a boundary of it is never reached.
    pub(crate) fn session_ended(&self, session: u64) {
        self.sessions.send_modify(|m| {
            m.remove(&session);
        });
    }

    /// A `Flush { seq }` arrived from the peer of `session`.
    pub(crate) fn flush_received(&self, session: u64, seq: u64) {
        // Nobody waits on this: no wake-up.
        self.sessions.send_if_modified(|m| {
            if let Some(s) = m.get_mut(&session) {
                s.received = s.received.max(seq);
            }
            false
        });
    }

    /// The replica applied `Flush { seq }` of `session`.
    pub(crate) fn flush_applied(&self, session: u64, seq: u64) {
        self.sessions
            .send_if_modified(|m| match m.get_mut(&session) {
                Some(s) if s.applied <= seq => {
                    s.applied = seq + 1;
                    true
                }
                _ => false,
            });
    }

    /// The peer of `session` answered `SnapshotFlush { id }`: the `Flush` it caused arrived
    /// before, on the same session.
    pub(crate) fn answered(&self, session: u64, id: u64) {
        let waiter = self.waiting.lock().expect("waiting").remove(&id);
        let received = self.sessions.borrow().get(&session).map(|s| s.received);
        if let (Some(tx), Some(seq)) = (waiter, received) {
            let _ = tx.send(Boundary { session, seq });
        }
    }

    fn ask(&self) -> (u64, tokio::sync::oneshot::Receiver<Boundary>) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().expect("waiting").insert(id, tx);
        (id, rx)
    }

    /// Forgets an asked-for flush that is no longer waited for.
    fn forget(&self, id: u64) {
        self.waiting.lock().expect("waiting").remove(&id);
    }

    /// Waits until the replica applied the flush at `target`; an error once its session ended
    /// (a later session's flushes, numbered anew, say nothing about it).
    async fn reached(&self, target: Boundary) -> Result<(), &'static str> {
        let mut rx = self.sessions.subscribe();
        let m = rx
            .wait_for(|m| {
                m.get(&target.session)
                    .is_none_or(|s| s.applied > target.seq)
            })
            .await
            .map_err(|_| "the resource stopped")?;
        if m.contains_key(&target.session) {
            Ok(())
        } else {
            Err("the replication session with the Primary ended")
        }
    }
}

/// How long `--consistent` waits for the Primary's flush.
const FLUSH_BOUNDARY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl SnapshotService {
    /// Reloads the snapshots a clean shutdown left in `dir` over this replica (`size` bytes,
    /// metadata generations `generations`); untrusted ones are removed and reported.
    pub fn load(
        dir: &std::path::Path,
        resource: &str,
        size: u64,
        generations: &GenerationIds,
    ) -> SnapshotService {
        let (set, dropped) =
            Snapshots::load(dir, resource, size, |g| knows_generation(generations, g));
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

/// Whether metadata with `generations` knows data generation `g` — its current one, one in its
/// history, or one a peer's bitmap tracks from (where the current one goes when it is
/// replaced): an area closed over `g` was closed over this replica. Recreated metadata, or
/// another disk's, knows none of this replica's generations.
pub(crate) fn knows_generation(generations: &GenerationIds, g: u64) -> bool {
    let g = Uuid(g);
    !g.is_zero()
        && (g.same(generations.current)
            || generations.in_history(g)
            || generations.bitmap.iter().any(|b| !b.is_zero() && b.same(g)))
}

/// Why this node may not freeze its replica now, or `None`: snapshots are taken on a
/// Secondary whose local data is consistent (a state some Primary had: up to date, consistent
/// or outdated); not on a Primary, nor while the data is Inconsistent (a sync target in the
/// middle of a resync), being attached or negotiated, failed, or absent.
pub(crate) fn snapshot_refusal(role: Role, disk: DiskState) -> Option<String> {
    if role == Role::Primary {
        return Some("this node is Primary; snapshots are taken on a Secondary".into());
    }
    if !disk.is_consistent() {
        return Some(format!(
            "the local data is {disk}: a snapshot would not be a state the Primary passed through"
        ));
    }
    None
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
        // Asked now (a quick refusal) and again by the freeze with no change in flight: up to
        // 30 s of `--consistent` may pass in between, and a resync may start meanwhile.
        let may_freeze = || {
            let (role, disk) = {
                let st = self.state.lock().expect("state");
                (st.role, st.disk)
            };
            match snapshot_refusal(role, disk) {
                Some(why) => Err(why),
                None => Ok(self.meta.lock().expect("meta").sb.generations.current.0),
            }
        };
        may_freeze().map_err(ResourceError::SnapshotRefused)?;
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
        let snap = self
            .snapshots
            .set
            .freeze(
                &self.store.current(),
                &name,
                capacity,
                &bound.to_string(),
                may_freeze,
            )
            .await
            .map_err(|e| match e {
                SnapshotError::Refused { reason, .. } => ResourceError::SnapshotRefused(reason),
                e => snap_err(self, e),
            })?;
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
            b.reached(target).await
        };
        let waited = tokio::time::timeout(FLUSH_BOUNDARY_TIMEOUT, wait).await;
        b.forget(id);
        match waited {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether `reached(target)` completes within a short while, and how.
    async fn reached_soon(b: &FlushBoundaries, target: Boundary) -> Option<Result<(), &str>> {
        tokio::time::timeout(Duration::from_millis(50), b.reached(target))
            .await
            .ok()
    }

    /// An area closed over a generation is reopened over the metadata that still knows it:
    /// current (Primary bit aside), rotated into a peer's bitmap or into the history; not over
    /// recreated metadata or another replica's generations.
    #[test]
    fn an_area_is_reopened_only_over_metadata_that_knows_its_generation() {
        let mut g = GenerationIds::just_created();
        assert!(!knows_generation(&g, 0));
        g.new_current(0x1000, false, &[]);
        assert!(knows_generation(&g, 0x1000));
        assert!(
            knows_generation(&g, 0x1001),
            "the Primary bit is not identity"
        );
        g.new_current(0x2000, true, &[1]);
        assert!(knows_generation(&g, 0x1000), "in peer 1's bitmap");
        assert!(knows_generation(&g, 0x2000));
        g.new_current(0x3000, true, &[]);
        assert!(knows_generation(&g, 0x2000), "in the history");
        assert!(!knows_generation(&g, 0x4000));
        assert!(!knows_generation(&g, 0));
        let recreated = GenerationIds::just_created();
        assert!(!knows_generation(&recreated, 0x3000));
    }

    #[test]
    fn only_a_secondary_with_consistent_data_takes_snapshots() {
        for disk in DiskState::ALL.iter().copied() {
            assert!(snapshot_refusal(Role::Primary, disk).is_some());
            let why = snapshot_refusal(Role::Secondary, disk);
            assert_eq!(why.is_none(), disk.is_consistent(), "{disk}: {why:?}");
            if let Some(why) = why {
                assert!(why.contains(disk.as_str()), "{why}");
            }
        }
        assert!(snapshot_refusal(Role::Secondary, DiskState::UpToDate).is_none());
        assert!(snapshot_refusal(Role::Secondary, DiskState::Inconsistent).is_some());
    }

    /// A Primary that restarted (or another node promoted) numbers its flushes from 0 again:
    /// the flushes a replica applied in an earlier session must not satisfy a boundary of the
    /// new one, and a boundary of a session that ended is an error, not a freeze.
    #[tokio::test]
    async fn a_flush_boundary_is_reached_only_in_its_own_session() {
        let b = FlushBoundaries::default();
        let old = b.session_started();
        b.flush_received(old, 1000);
        b.flush_applied(old, 1000);
        b.session_ended(old);
        let new = b.session_started();
        b.flush_received(new, 3);
        let (id, answer) = b.ask();
        b.answered(new, id);
        let target = answer.await.unwrap();
        assert_eq!(
            target,
            Boundary {
                session: new,
                seq: 3
            }
        );
        assert_eq!(
            reached_soon(&b, target).await,
            None,
            "flush 3 of the new session is not applied yet"
        );
        b.flush_applied(new, 2);
        assert_eq!(reached_soon(&b, target).await, None);
        b.flush_applied(new, 3);
        assert_eq!(reached_soon(&b, target).await, Some(Ok(())));
        // The session ends before its flush is applied: the wait fails at once.
        b.flush_received(new, 9);
        let (id, answer) = b.ask();
        b.answered(new, id);
        let target = answer.await.unwrap();
        let waiting = b.reached(target);
        b.session_ended(new);
        assert_eq!(
            waiting.await,
            Err("the replication session with the Primary ended")
        );
        // An answer on a session that is gone gives no boundary.
        let (id, answer) = b.ask();
        b.answered(new, id);
        assert!(answer.await.is_err());
    }
}
