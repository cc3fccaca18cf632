//! The local disk of a resource at runtime: the backing store (replaceable: `blockctl attach`
//! reopens it), detaching after an I/O error or `blockctl detach` (Failed, then Diskless),
//! reads forwarded to an UpToDate peer (`ReadRequest`/`ReadReply`) while the Primary has no
//! usable disk, serving such reads for a peer, and the resync after `blockctl attach`. What
//! to do in each case is decided in `repl::disk_failure`; this module executes it.
//!
//! Resync after attach on a Primary: the disk comes back Inconsistent; a worker walks the
//! device in [`MAX_FORWARDED_READ`] chunks, each while holding its byte range (every earlier
//! application write to it is complete, and under an Inconsistent or Diskless disk a write
//! only completes once every connected peer wrote it): it hashes the local blocks, asks an
//! UpToDate peer for its block digests, and fetches and writes only the blocks that differ.
//! Every write made while Diskless is on the peer, so it is fetched. A Diskless Secondary
//! stays connected and reports its disk state: its Primary stops sending it writes and tracks
//! each one in its bitmap; when it attaches, it redoes the handshake, which resyncs it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::meta::file::MetaFile;
use crate::meta::superblock::flags;
use crate::repl::checksum;
use crate::repl::device::{AlError, AlHold};
use crate::repl::disk_failure::{
    self, MAX_FORWARDED_READ, MarkedOnReturn, NoDataPath, OnError, PeerView, may_attach, may_detach,
};
use crate::repl::peer::Conn;
use crate::repl::resource::{Resource, ResourceError, error_chain};
use crate::repl::state::{DiskState, Role};
use crate::repl::wire::{Message, ReadAnswer};
use crate::store::{BlockStore, CopyAt, Extent, OpenOptions, StoreError};

/// How long a forwarded read waits for the peer's answer before it fails with EIO.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Block size of the digests compared by the resync after attach.
const ATTACH_BLOCK: u32 = 4096;
/// How long the resync after attach waits between tries while no peer can serve.
const NO_PEER_RETRY: Duration = Duration::from_millis(200);
/// How long `blockctl detach` waits for its flush before detaching anyway.
const DETACH_FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// The backing store of a resource; `blockctl attach` replaces it with a freshly opened one.
/// Every call runs on the store current when it starts.
pub(crate) struct LocalStore {
    current: RwLock<BlockStore>,
}

impl LocalStore {
    pub fn new(store: BlockStore) -> LocalStore {
        LocalStore {
            current: RwLock::new(store),
        }
    }

    /// The store now (a cheap clone sharing the open file).
    pub fn current(&self) -> BlockStore {
        self.current.read().expect("local store").clone()
    }

    pub(crate) fn replace(&self, store: BlockStore) {
        *self.current.write().expect("local store") = store;
    }

    pub fn size(&self) -> u64 {
        self.current().size()
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<BytesMut, StoreError> {
        self.current().read(offset, len).await
    }

    /// An NBD client's read, copied at `copy_at` (see
    /// [`crate::store::BlockStore::read_for_client_at`]).
    pub async fn read_for_client_at(
        &self,
        offset: u64,
        len: usize,
        copy_at: CopyAt,
    ) -> Result<Bytes, StoreError> {
        self.current()
            .read_for_client_at(offset, len, copy_at)
            .await
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), StoreError> {
        self.current().write(offset, data, fua).await
    }

    pub fn write_blocking(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), StoreError> {
        self.current().write_blocking(offset, data, fua)
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        self.current().flush().await
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.current().trim(offset, len).await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.current()
            .write_zeroes(offset, len, may_punch, fua)
            .await
    }

    pub async fn fast_zero(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
    ) -> Result<(), StoreError> {
        self.current().fast_zero(offset, len, may_punch).await
    }

    pub fn can_fast_zero(&self, offset: u64, len: u64, may_punch: bool) -> bool {
        self.current().can_fast_zero(offset, len, may_punch)
    }

    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.current().cache(offset, len).await
    }

    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StoreError> {
        self.current().block_status(offset, len).await
    }
}

/// Progress of the resync after `blockctl attach` (status).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AttachStatus {
    /// `resyncing`, `done` or `aborted`.
    pub state: String,
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Bytes of blocks that differed and were fetched from the peer.
    pub fetched_bytes: u64,
    /// Bytes of block digests received from the peer.
    pub digest_bytes: u64,
}

/// Reads the first and the last block of the data area of `backing` past the page cache
/// (dropped first), so that a disk that fails on every read is found at start rather than by
/// the first application request.
pub(crate) fn probe_backing(backing: &std::path::Path, size: u64) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let len = size.min(u64::from(ATTACH_BLOCK));
    let read_err = |offset, source| StoreError::Read {
        offset,
        len,
        source,
    };
    let f = std::fs::File::open(backing).map_err(|e| read_err(0, e))?;
    // SAFETY: posix_fadvise(2) on a file descriptor we own, for its whole length; it only
    // drops clean cached pages.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut buf = vec![0u8; len as usize];
    for offset in [0, size - len] {
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| read_err(offset, e))?;
    }
    Ok(())
}

/// At start: the backing store opened but fails reads. Under `on-io-error = detach` the
/// resource comes up Diskless (the returned text is its `disk_error`; `blockctl attach` later
/// retries); under `pass-on` it stays attached and the errors reach the clients.
pub(crate) fn failed_at_start(
    name: &str,
    policy: crate::config::OnIoError,
    backing: &std::path::Path,
    size: u64,
) -> Option<String> {
    let e = probe_backing(backing, size).err()?;
    let why = format!("backing store failed at start: {}", error_chain(&e));
    match disk_failure::on_local_error(policy, disk_failure::classify(&e), false) {
        OnError::Detach => {
            tracing::error!(resource = %name, "{why}: coming up diskless (blockctl attach \
                once it is repaired)");
            Some(why)
        }
        _ => {
            tracing::error!(resource = %name, "{why} (on-io-error = pass-on: staying attached)");
            None
        }
    }
}

/// Forwarded reads waiting for their `ReadReply`.
#[derive(Default)]
struct PendingReads {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<ReadAnswer>>>,
}

/// Disk-failure runtime state of a resource.
#[derive(Default)]
pub(crate) struct DiskRuntime {
    reads: PendingReads,
    /// The error that detached the disk (status; cleared by attach).
    pub last_error: Mutex<Option<String>>,
    pub attach: Mutex<Option<AttachStatus>>,
    /// Held while a detach waits for the peers to write everything in flight: forwarded I/O
    /// starts only after it.
    detaching: tokio::sync::Mutex<()>,
    /// Bumped by every detach: a resync after attach stops when it changes.
    epoch: AtomicU64,
}

impl DiskRuntime {
    /// The runtime state of a disk that failed at start (`why`) or not (`None`).
    pub(crate) fn at_start(why: Option<String>) -> DiskRuntime {
        DiskRuntime {
            last_error: Mutex::new(why),
            ..DiskRuntime::default()
        }
    }
}

fn no_path_read(offset: u64, len: u64, e: impl std::fmt::Display) -> StoreError {
    StoreError::Read {
        offset,
        len,
        source: std::io::Error::other(e.to_string()),
    }
}

impl Resource {
    /// The local disk state.
    pub fn disk(&self) -> DiskState {
        self.state.lock().expect("state").disk
    }

    /// What the disk-failure decisions need to know about each peer.
    pub(crate) fn peer_views(&self) -> Vec<PeerView> {
        let st = self.state.lock().expect("state");
        self.peers
            .iter()
            .zip(&st.peers)
            .map(|(p, s)| PeerView {
                conn: s.conn,
                repl: s.repl,
                disk: s.disk,
                in_flight: p
                    .conn
                    .lock()
                    .expect("conn")
                    .as_ref()
                    .map_or(0, |c| c.in_flight_with_bytes().0),
            })
            .collect()
    }

    /// A failed local request of the application path: decides (`on-io-error`) and executes
    /// the decision. `Detach` means the caller retries through a peer.
    pub(crate) async fn local_failure(
        &self,
        e: &StoreError,
        modifying: bool,
        offset: u64,
        len: u64,
    ) -> OnError {
        let class = disk_failure::classify(e);
        let decision = disk_failure::on_local_error(self.spec.on_io_error, class, modifying);
        match decision {
            OnError::Return => {}
            OnError::Detach => self.detach_after_error(error_chain(e)).await,
            OnError::PassOn { errno, diverged } => {
                tracing::error!(resource = %self.spec.name, errno, "local I/O error passed on to \
                    the client (on-io-error = pass-on): {}", error_chain(e));
                self.emit(
                    None,
                    "error",
                    format!("local I/O error: {}", error_chain(e)),
                );
                if diverged && len > 0 {
                    // Peers may hold the new data and this disk not: never diverge silently.
                    let mut m = self.meta.lock().expect("meta");
                    for slot in 0..m.bitmaps.len() {
                        self.mark_for_repair(&mut m, slot, offset, len);
                    }
                }
            }
        }
        decision
    }

    /// A replicated request from a peer failed on our disk (Secondary): under `detach` the
    /// disk detaches. Returns the text that ends the session (the peer marks the unacknowledged
    /// writes out of sync).
    pub(crate) fn apply_failed(self: &Arc<Self>, what: &str, e: &StoreError) -> String {
        let text = format!("{what}: {}", error_chain(e));
        if disk_failure::on_local_error(self.spec.on_io_error, disk_failure::classify(e), true)
            == OnError::Detach
        {
            let me = self.clone();
            let why = text.clone();
            tokio::spawn(async move { me.detach_after_error(why).await });
        }
        text
    }

    /// A peer's replicated request of `len` bytes at `offset` completed on the local disk: not
    /// durable until a flush succeeds (see `repl::unflushed`).
    pub(crate) fn note_written(&self, offset: u64, len: u64) {
        self.unflushed
            .lock()
            .expect("unflushed")
            .note_written(offset, len);
    }

    /// Flushes the local disk for a peer (its `Flush`, the end of its resync). A failed flush
    /// may have lost any write since the last one that succeeded, writes already acknowledged
    /// to the peer as written too (in no bitmap: the peer forgot them): their extents are marked
    /// out of sync for every peer, as a crash would mark the hot activity-log extents, before
    /// the error ends the session (the next handshake's bitmap exchange resyncs them); then
    /// `on-io-error` decides as for a failed write.
    pub(crate) async fn flush_for_peer(self: &Arc<Self>) -> Result<(), String> {
        let mark = self.unflushed.lock().expect("unflushed").flush_started();
        match self.store.flush().await {
            Ok(()) => {
                self.unflushed.lock().expect("unflushed").flushed(mark);
                Ok(())
            }
            Err(e) => Err(self.peer_flush_failed(&e).await),
        }
    }

    /// A flush of the local disk failed while applying a peer's requests (its `Flush`, or the
    /// preflush of an activity-log transaction): see [`Self::flush_for_peer`]. Returns the
    /// text that ends the session.
    pub(crate) async fn peer_flush_failed(self: &Arc<Self>, e: &StoreError) -> String {
        let lost = self
            .unflushed
            .lock()
            .expect("unflushed")
            .ranges(self.size());
        self.mark_unflushed_lost(&lost, e).await;
        self.apply_failed("flush failed", e)
    }

    /// Registers peer `i`'s replicated request in the activity log (see
    /// [`Resource::al_begin`]); a failure returns the text that ends the session. A failed
    /// preflush of the backing is a failed flush ([`Self::peer_flush_failed`]).
    pub(crate) async fn al_begin_for_peer(
        self: &Arc<Self>,
        i: usize,
        offset: u64,
        len: u64,
    ) -> Result<AlHold, String> {
        let slow = Some(&self.peers[i].al_slow_path);
        match self.al_begin_counted(offset, len, slow).await {
            Ok(hold) => Ok(hold),
            Err(AlError::Preflush(e)) => Err(self.peer_flush_failed(&e).await),
            Err(AlError::Register(e)) => Err(self.apply_failed("activity log update failed", &e)),
        }
    }

    /// Reports and marks `ranges` (written, a flush then failed) out of sync for every peer.
    async fn mark_unflushed_lost(&self, ranges: &[(u64, u64)], e: &StoreError) {
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        tracing::error!(resource = %self.spec.name, ranges = ranges.len(), bytes,
            "flush failed: the blocks written since the last successful flush may be lost; \
             marked out of sync for every peer: {}", error_chain(e));
        self.emit(
            None,
            "error",
            format!(
                "flush failed, {bytes} bytes written since the last flush marked out of sync: {}",
                error_chain(e)
            ),
        );
        self.mark_for_every_peer(ranges).await;
    }

    /// Marks `ranges` out of sync for every peer (this disk may not hold them) and persists
    /// the bitmaps as far as the metadata can be written.
    async fn mark_for_every_peer(&self, ranges: &[(u64, u64)]) {
        let slots = {
            let mut m = self.meta.lock().expect("meta");
            for slot in 0..m.bitmaps.len() {
                for &(o, l) in ranges {
                    self.mark_for_repair(&mut m, slot, o, l);
                }
            }
            m.bitmaps.len()
        };
        for slot in 0..slots {
            if let Err(e) = self.meta_io(move |m| m.save_bitmap(slot)).await {
                tracing::error!(resource = %self.spec.name, "cannot persist the bitmap: {e}");
            }
        }
    }

    /// Replicated requests of an ended session did not complete on the local disk in time
    /// (`why`): their writes may still land at any moment. A disk failure for `on-io-error`:
    /// `detach` stops using the disk; `pass-on` keeps it and marks `ranges` (what they change)
    /// out of sync for every peer.
    pub(crate) async fn applies_stuck(self: &Arc<Self>, why: &str, ranges: &[(u64, u64)]) {
        let class = disk_failure::ErrorClass::Disk { errno: None };
        match disk_failure::on_local_error(self.spec.on_io_error, class, true) {
            OnError::Detach => {
                // Failed at once, before the session's end lets a waiting promotion look at the
                // disk; the rest of the detach runs on its own task.
                if self.mark_disk_failed() {
                    tracing::error!(resource = %self.spec.name, "local disk failed, detaching \
                        (on-io-error = detach): {why}");
                    self.emit(None, "error", format!("local disk failed: {why}"));
                    let me = self.clone();
                    let why = why.to_string();
                    tokio::spawn(async move {
                        let _detaching = me.disk_rt.detaching.lock().await;
                        me.finish_detach(why).await
                    });
                }
            }
            OnError::PassOn { .. } | OnError::Return => {
                tracing::error!(resource = %self.spec.name, "{why}: marked out of sync for \
                    every peer (on-io-error = pass-on)");
                self.emit(None, "error", format!("local disk stuck: {why}"));
                self.mark_for_every_peer(ranges).await;
            }
        }
    }

    async fn detach_after_error(&self, why: String) {
        if !self.disk().has_disk() {
            return;
        }
        tracing::error!(resource = %self.spec.name, "local disk failed, detaching (on-io-error = detach): {why}");
        self.emit(None, "error", format!("local disk failed: {why}"));
        self.detach_local(why).await;
    }

    /// Failed, then Diskless: stops using the local store. A Primary first waits until every
    /// connected peer has written what was sent to it (so forwarded reads see every write
    /// completed before); a Secondary stays connected and reports `diskless` (its Primary
    /// tracks every write for it in the bitmap meanwhile).
    async fn detach_local(&self, why: String) {
        let _detaching = self.disk_rt.detaching.lock().await;
        if self.mark_disk_failed() {
            self.finish_detach(why).await;
        }
    }

    /// The first step of a detach: the disk is Failed (nothing uses it from here, and no
    /// promotion is granted on it). `false` when it had no disk to detach.
    fn mark_disk_failed(&self) -> bool {
        let mut st = self.state.lock().expect("state");
        if !st.disk.has_disk() {
            return false;
        }
        st.disk = DiskState::Failed;
        true
    }

    /// The rest of a detach, after [`Self::mark_disk_failed`] (holding `detaching`).
    async fn finish_detach(&self, why: String) {
        self.disk_rt.epoch.fetch_add(1, Ordering::SeqCst);
        // The snapshots froze this disk: once it is detached (failed, or to be repaired or
        // replaced), nothing says the disk attached later holds the same blocks, so
        // preserving from it would make them silently wrong.
        let gone = self.snapshots.set.invalidate_all(&format!(
            "the local disk was detached ({why}); the frozen image was on it"
        ));
        self.snapshots_invalidated(&gone);
        *self.disk_rt.last_error.lock().expect("last error") = Some(why);
        if let Some(a) = self.disk_rt.attach.lock().expect("attach").as_mut()
            && a.state == "resyncing"
        {
            a.state = "aborted".into();
        }
        self.emit(None, "disk", DiskState::Failed.as_str());
        self.broadcast_state();
        // The data on the disk is no longer the newest: after a restart it attaches
        // Inconsistent and is resynced (best effort: the metadata may be on the failed disk).
        let r = self
            .meta_io(|m| {
                m.sb.flags &= !(flags::CONSISTENT | flags::WAS_UP_TO_DATE);
                m.save_sb()
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(resource = %self.spec.name, "cannot mark the metadata inconsistent \
                after the disk failed: {}", error_chain(&e));
        }
        if self.role() == Role::Primary {
            let drained = tokio::time::timeout(READ_TIMEOUT, self.flush_peers()).await;
            if drained.is_err() {
                tracing::warn!(resource = %self.spec.name,
                    "peers did not confirm earlier writes in time while detaching");
            }
        }
        self.set_disk(DiskState::Diskless);
        tracing::warn!(resource = %self.spec.name, "local disk detached (diskless)");
    }

    /// Waits for every connected peer to confirm every earlier write (a `Flush` each).
    async fn flush_peers(&self) {
        let mut waits = Vec::new();
        let seq = {
            let mut order = self.order.lock().expect("order");
            let (seq, _) = order.issue();
            for p in &self.peers {
                if let Some(c) = p.conn.lock().expect("conn").as_ref()
                    && let Some(rx) = c.track_flush(seq, true)
                {
                    waits.push(rx);
                }
            }
            seq
        };
        for w in waits {
            let _ = w.await;
        }
        self.completed(seq);
    }

    /// A Diskless Primary reconnected to peer `i` at its generation (no resync either way, see
    /// `repl::sync_decision`): decides what its blocks marked for the peer mean
    /// ([`disk_failure::marked_on_return`]).
    pub(crate) async fn diskless_primary_reconnected(&self, i: usize) {
        let slot = self.peers[i].slot;
        let bits = self.meta.lock().expect("meta").bitmaps[slot].count_bits();
        let peer = self.peers[i].node.name.clone();
        match disk_failure::marked_on_return(bits, self.peers.len() - 1) {
            MarkedOnReturn::Keep => {}
            MarkedOnReturn::Clear => {
                tracing::info!(resource = %self.spec.name, peer = %peer, bits,
                    "diskless: the peer's data is the exposed data; clearing the blocks marked \
                    for it (writes nobody confirmed)");
                self.meta.lock().expect("meta").bitmaps[slot].clear_all();
                if let Err(e) = self.meta_io(move |m| m.save_bitmap(slot)).await {
                    tracing::warn!(resource = %self.spec.name, "cannot persist the bitmap: {}",
                        error_chain(&e));
                }
            }
            MarkedOnReturn::Distrust => {
                let why = format!(
                    "{bits} blocks marked for {peer} may be newer on another peer: not serving \
                     from it until it is resynced"
                );
                tracing::warn!(resource = %self.spec.name, "diskless: {why}");
                self.update_peer(i, |s| s.disk = DiskState::Outdated);
                self.emit(Some(i), "error", why);
            }
        }
    }

    /// Waits until no detach is in progress (forwarded I/O must not overtake it).
    pub(crate) async fn detach_settled(&self) {
        drop(self.disk_rt.detaching.lock().await);
    }

    /// `blockctl detach`: detaches the local disk (a Primary keeps serving through a peer).
    pub async fn detach(&self, force: bool) -> Result<(), ResourceError> {
        let (disk, primary) = {
            let st = self.state.lock().expect("state");
            (st.disk, st.role == Role::Primary)
        };
        may_detach(disk, primary, &self.peer_views(), force)
            .map_err(|r| ResourceError::Refused(r.to_string()))?;
        // Bounded: a hung disk is the usual reason to detach, and this runs under the
        // resource's admin lock (other admin commands wait for it).
        let _ = tokio::time::timeout(DETACH_FLUSH_LIMIT, self.store.flush()).await;
        tracing::info!(resource = %self.spec.name, "detaching the local disk (blockctl detach)");
        self.detach_local("detached by the administrator".into())
            .await;
        Ok(())
    }

    /// `blockctl attach`: reopens the metadata and the backing store; the disk comes back
    /// Inconsistent and is resynced from an UpToDate peer (see the module docs).
    pub async fn reattach(self: &Arc<Self>) -> Result<(), ResourceError> {
        let _detaching = self.disk_rt.detaching.lock().await;
        may_attach(self.disk()).map_err(|r| ResourceError::Refused(r.to_string()))?;
        // Snapshots still valid here were reloaded over a disk that failed at start: the disk
        // attached now may not be the one they froze, and its resync would overwrite their
        // blocks (see `detach_local`).
        let gone = self.snapshots.set.invalidate_all(
            "the local disk was attached again; the frozen image was on the disk as it was before",
        );
        self.snapshots_invalidated(&gone);
        self.set_disk(DiskState::Attaching);
        match self.reopen().await {
            Ok(()) => {}
            Err(e) => {
                self.set_disk(DiskState::Diskless);
                return Err(e);
            }
        }
        *self.disk_rt.last_error.lock().expect("last error") = None;
        // A new disk: the resync failures of the old one say nothing about it.
        for i in 0..self.peers.len() {
            self.update_peer(i, |p| p.resync_retry_reset());
        }
        let epoch = self.disk_rt.epoch.load(Ordering::SeqCst);
        let total = self.size();
        *self.disk_rt.attach.lock().expect("attach") = Some(AttachStatus {
            state: "resyncing".into(),
            total_bytes: total,
            ..AttachStatus::default()
        });
        self.set_disk(DiskState::Inconsistent);
        tracing::info!(resource = %self.spec.name, "local disk attached (inconsistent)");
        if self.role() == Role::Primary {
            let me = self.clone();
            tokio::spawn(async move { me.resync_after_attach(epoch).await });
        } else {
            // Redo every handshake: it resyncs us from the Primary's bitmap.
            for p in &self.peers {
                p.kill.notify_one();
                p.wake.notify_one();
            }
        }
        Ok(())
    }

    async fn reopen(&self) -> Result<(), ResourceError> {
        let loc = self.spec.me.meta_location();
        let id = self.spec.me.id;
        let name = self.spec.name.clone();
        let opened = tokio::task::spawn_blocking(move || MetaFile::open(&loc, Some(id)))
            .await
            .expect("metadata open task panicked")
            .map_err(|source| ResourceError::Meta {
                resource: name.clone(),
                source,
            })?;
        let size = self.size();
        let backing = self.spec.me.backing.clone();
        let engine = self.spec.engine;
        let store = tokio::task::spawn_blocking(move || {
            let store = BlockStore::open(
                &backing,
                &OpenOptions {
                    size: Some(size),
                    read_only: false,
                    engine,
                },
            )?;
            // A disk that still fails is not attached.
            probe_backing(&backing, size)?;
            Ok(store)
        })
        .await
        .expect("store open task panicked")
        .map_err(|source| ResourceError::Store {
            resource: name.clone(),
            source,
        })?;
        // Our in-memory superblock and bitmaps are the newest: write them to the reopened file.
        self.meta_io(move |m| {
            m.file = opened.meta;
            m.sb.flags |= flags::ATTACHED;
            m.sb.flags &= !(flags::CONSISTENT | flags::WAS_UP_TO_DATE);
            m.save_sb()?;
            for slot in 0..m.bitmaps.len() {
                m.save_bitmap(slot)?;
            }
            Ok(())
        })
        .await
        .map_err(ResourceError::MetaUpdate)?;
        self.store.replace(store);
        Ok(())
    }

    fn attach_progress(&self, f: impl FnOnce(&mut AttachStatus)) {
        if let Some(a) = self.disk_rt.attach.lock().expect("attach").as_mut() {
            f(a);
        }
    }

    /// The resync of a Primary's reattached disk (see the module docs).
    async fn resync_after_attach(self: Arc<Self>, epoch: u64) {
        let size = self.size();
        let mut stop = self.stop_signal();
        let mut pos = 0u64;
        let current = || self.disk_rt.epoch.load(Ordering::SeqCst) == epoch;
        while pos < size {
            if !current() || *stop.borrow() {
                return;
            }
            let len = u64::from(MAX_FORWARDED_READ).min(size - pos);
            match self.resync_chunk(pos, len).await {
                Ok((fetched, digests)) => {
                    pos += len;
                    self.attach_progress(|a| {
                        a.done_bytes = pos;
                        a.fetched_bytes += fetched;
                        a.digest_bytes += digests;
                    });
                }
                Err(ChunkError::NoPeer(why)) => {
                    tracing::debug!(resource = %self.spec.name, "resync after attach waits: {why}");
                    tokio::select! {
                        _ = tokio::time::sleep(NO_PEER_RETRY) => {}
                        _ = stop.changed() => return,
                    }
                }
                Err(ChunkError::Local(e)) => {
                    if current() {
                        self.detach_after_error(error_chain(&e)).await;
                    }
                    return;
                }
            }
        }
        let done = async {
            self.store.flush().await.map_err(|e| error_chain(&e))?;
            self.meta_io(|m| {
                m.sb.flags |= flags::CONSISTENT | flags::WAS_UP_TO_DATE;
                m.save_sb()
            })
            .await
            .map_err(|e| error_chain(&e))
        };
        if let Err(why) = done.await {
            if current() {
                self.detach_after_error(why).await;
            }
            return;
        }
        if !current() {
            return;
        }
        self.attach_progress(|a| a.state = "done".into());
        let (fetched, digests) = self
            .disk_rt
            .attach
            .lock()
            .expect("attach")
            .as_ref()
            .map_or((0, 0), |a| (a.fetched_bytes, a.digest_bytes));
        tracing::info!(resource = %self.spec.name, bytes = size, fetched, digests,
            "resync after attach done: up to date");
        self.emit(
            None,
            "resync-done",
            format!("attach: {fetched} bytes fetched, {digests} digest bytes"),
        );
        self.set_disk(DiskState::UpToDate);
    }

    /// One chunk of the resync after attach, holding its range: `(fetched, digest)` bytes.
    async fn resync_chunk(&self, offset: u64, len: u64) -> Result<(u64, u64), ChunkError> {
        let _range = self.ranges.lock(offset, len).await;
        let local = self
            .store
            .read(offset, len as usize)
            .await
            .map_err(ChunkError::Local)?
            .freeze();
        let bs = ATTACH_BLOCK as usize;
        let mine = tokio::task::spawn_blocking(move || checksum::block_digests(&local, bs))
            .await
            .expect("digest task panicked");
        let theirs = match self.ask_peer(offset, len as u32, ATTACH_BLOCK).await {
            Ok(ReadAnswer::Digests(d)) => d,
            Ok(other) => return Err(ChunkError::NoPeer(format!("unexpected answer {other:?}"))),
            Err(e) => return Err(ChunkError::NoPeer(e)),
        };
        let digest_bytes = (theirs.len() * checksum::BLOCK_DIGEST_LEN) as u64;
        let mut fetched = 0;
        for (o, l) in
            disk_failure::differing_ranges(offset, len, u64::from(ATTACH_BLOCK), &mine, &theirs)
        {
            let data = match self.ask_peer(o, l as u32, 0).await {
                Ok(ReadAnswer::Data(d)) if d.len() as u64 == l => d,
                Ok(ReadAnswer::Error(errno)) => {
                    return Err(ChunkError::NoPeer(format!(
                        "peer read failed: errno {errno}"
                    )));
                }
                Ok(_) => return Err(ChunkError::NoPeer("short or unexpected answer".into())),
                Err(e) => return Err(ChunkError::NoPeer(e)),
            };
            // Like every change of the replica: under the freeze gate, after open snapshots
            // preserved what it overwrites (none normally: attaching invalidated them, and a
            // Primary or an Inconsistent disk takes no new one), and never after `close_all`.
            let store = self.store.current();
            let change = self.snapshots.set.change(&store, o, l).await;
            self.snapshots_invalidated(&change.invalidated);
            store
                .write(o, data, false)
                .await
                .map_err(ChunkError::Local)?;
            drop(change);
            fetched += l;
        }
        Ok((fetched, digest_bytes))
    }

    /// Sends one `ReadRequest` to the peer chosen by [`disk_failure::read_peer`] and waits for
    /// the answer (bounded: the link closing or [`READ_TIMEOUT`] fail it).
    async fn ask_peer(&self, offset: u64, len: u32, block_size: u32) -> Result<ReadAnswer, String> {
        self.detach_settled().await;
        let i =
            disk_failure::read_peer(self.disk(), &self.peer_views()).map_err(|e| e.to_string())?;
        let Some(conn) = self.peers[i].conn.lock().expect("conn").clone() else {
            return Err(format!("peer {} is not connected", self.peers[i].node.name));
        };
        let id = self.disk_rt.reads.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.disk_rt
            .reads
            .waiting
            .lock()
            .expect("reads")
            .insert(id, tx);
        conn.send(Message::ReadRequest {
            id,
            offset,
            len,
            block_size,
        });
        let mut closed = conn.closed.subscribe();
        let r = tokio::select! {
            a = rx => a.map_err(|_| "read answer dropped".to_string()),
            _ = closed.wait_for(|c| *c) => Err(format!("link to {} closed", self.peers[i].node.name)),
            _ = tokio::time::sleep(READ_TIMEOUT) => Err(format!("peer {} did not answer a read in {}s",
                self.peers[i].node.name, READ_TIMEOUT.as_secs())),
        };
        self.disk_rt
            .reads
            .waiting
            .lock()
            .expect("reads")
            .remove(&id);
        r
    }

    /// A `ReadReply` arrived.
    pub(crate) fn read_answered(&self, id: u64, answer: ReadAnswer) {
        match self
            .disk_rt
            .reads
            .waiting
            .lock()
            .expect("reads")
            .remove(&id)
        {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => tracing::debug!(resource = %self.spec.name, id, "read reply nobody waits for"),
        }
    }

    /// Reads `[offset, offset + len)` through peers (in bounded requests; a request whose peer
    /// fails is retried on another one while any can serve).
    pub(crate) async fn forward_read(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<BytesMut, StoreError> {
        let mut out = BytesMut::with_capacity(len);
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let n = (end - pos).min(u64::from(MAX_FORWARDED_READ)) as u32;
            let mut tries = 0;
            loop {
                tries += 1;
                match self.ask_peer(pos, n, 0).await {
                    Ok(ReadAnswer::Data(d)) if d.len() == n as usize => {
                        out.extend_from_slice(&d);
                        break;
                    }
                    Ok(ReadAnswer::Error(errno)) if tries > self.peers.len() => {
                        return Err(StoreError::Read {
                            offset: pos,
                            len: u64::from(n),
                            source: std::io::Error::from_raw_os_error(errno as i32),
                        });
                    }
                    Ok(_) if tries <= self.peers.len() => continue,
                    Err(e) if tries <= self.peers.len() => {
                        tracing::debug!(resource = %self.spec.name, "forwarded read retried: {e}");
                        continue;
                    }
                    Ok(other) => {
                        return Err(no_path_read(pos, u64::from(n), format!("{other:?}")));
                    }
                    Err(e) => return Err(no_path_read(pos, u64::from(n), e)),
                }
            }
            pos += u64::from(n);
        }
        Ok(out)
    }
}

/// Why a chunk of the resync after attach did not complete.
enum ChunkError {
    /// No peer could answer (retry later).
    NoPeer(String),
    /// The local disk failed again.
    Local(StoreError),
}

/// The write error of a request no peer could take.
pub(crate) fn no_data_path_write(offset: u64, len: u64, e: NoDataPath) -> StoreError {
    StoreError::Write {
        offset,
        len,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Answers a peer's `ReadRequest` from our disk (EIO when it is not usable; a failing read
/// also counts as a disk failure here).
pub(crate) fn serve_read(
    res: Arc<Resource>,
    conn: Arc<Conn>,
    id: u64,
    offset: u64,
    len: u32,
    block_size: u32,
) {
    tokio::spawn(async move {
        let answer = if !res.disk().is_consistent() {
            ReadAnswer::Error(libc::EIO as u32)
        } else {
            match res.store.read(offset, len as usize).await {
                Ok(data) if block_size == 0 => ReadAnswer::Data(data.freeze()),
                Ok(data) => {
                    let data = data.freeze();
                    let bs = block_size as usize;
                    match tokio::task::spawn_blocking(move || checksum::block_digests(&data, bs))
                        .await
                    {
                        Ok(d) => ReadAnswer::Digests(d),
                        Err(_) => ReadAnswer::Error(libc::EIO as u32),
                    }
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    let _ = res.apply_failed("read for a peer failed", &e);
                    ReadAnswer::Error(errno as u32)
                }
            }
        };
        conn.send(Message::ReadReply { id, answer });
    });
}
