//! The replicated write path of the Primary (same async method set as `BlockStore`), and
//! [`Device`]: what an NBD export serves — a plain local store or a replicated resource.
//!
//! One write: under protocol A, wait for room in every such peer's send buffer
//! (`sndbuf-size`, `repl::congestion`; holding nothing) → hold its byte range (overlapping
//! requests wait) → per part of at most half the activity log's slots (one part unless the
//! request is very wide): activity log (persist a transaction first when the extent is cold)
//! → in one ordered step, number it (`seq`, and `after`: past every request completed so far,
//! see `repl::wire`) and queue `Data` to every connected peer (disconnected peers get the range
//! set in their bitmap instead) → local write
//! → wait for the protocol's ack point of every connected peer (A: queued; B: received; C:
//! written). A peer lost before acking gets the range in its bitmap (by the session's loss
//! handler) and the request still completes: degraded mode. A part's extents stay in the
//! activity log until every peer has written it (or its loss handler marked it), whatever
//! the protocol.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

use crate::config::MetaPlacement;
use crate::meta::MetaError;
use crate::meta::activity_log::{AlBusy, PendingTransaction};
use crate::repl::disk_failure::{self, LocalData, ReadSource};
use crate::repl::peer::{Conn, PendingWrite, Reservation};
use crate::repl::resource::{MetaState, Resource};
use crate::repl::state::{PeerAck, Protocol, Role};
use crate::repl::wire::{FLAG_FUA, Message};
use crate::store::{BlockStore, CopyAt, Extent, StoreError};

fn meta_failure(offset: u64, len: u64, e: impl std::fmt::Display) -> StoreError {
    StoreError::Write {
        offset,
        len,
        source: std::io::Error::other(format!("replication metadata: {e}")),
    }
}

/// A request queued to the peers: its sequence number, per peer (by index) the ack to wait
/// for, and the sessions it was queued on.
type Replicated = (u64, Vec<(usize, oneshot::Receiver<()>)>, Vec<Arc<Conn>>);

/// Why a part of a replicated request failed.
enum PartFailure {
    /// Its activity-log registration (a metadata error): returned as it is.
    ActivityLog(StoreError),
    /// Its local write: handled by `on-io-error`.
    Local(StoreError),
}

/// Why a write could not be registered in the activity log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AlError {
    /// Making the backing's data durable before a transaction that evicts extents (see
    /// [`needs_data_preflush`]) failed: a failed flush, a disk failure for `on-io-error`.
    #[error("flush before an activity-log transaction")]
    Preflush(#[source] StoreError),
    /// Persisting the transaction (or registering the write at all) failed: a metadata error.
    #[error(transparent)]
    Register(StoreError),
}

/// Bytes a message takes in a peer's send buffer (`sndbuf-size`): a write's payload; a
/// zeroing is a few bytes on the wire whatever its range.
fn send_cost(msg: &Message) -> u64 {
    match msg {
        Message::Data { payload, .. } => payload.len() as u64,
        _ => 0,
    }
}

/// A write's registration in the activity log: its extents count the write in flight until
/// this is dropped (the write done or failed, or its task cancelled). A Primary shares it
/// with the write's entry on every peer session ([`PendingWrite::al`]): an extent stays in the
/// log until each peer has written the data or its loss handler has marked the range in the
/// peer's bitmap, as DRBD keeps it until the peer's ack. Never dropped with the metadata
/// lock held (releasing takes it).
#[must_use]
pub(crate) struct AlHold {
    meta: Arc<Mutex<MetaState>>,
    freed: Arc<Notify>,
    /// `None` once completed some other way ([`AlHold::completed`]).
    extents: Option<(u32, u32)>,
}

impl AlHold {
    /// The write's registration was already ended under the metadata lock (a failed persist):
    /// dropping the hold must not end it again, which would take the count of a write that
    /// registered the same extents since.
    fn completed(mut self) {
        self.extents = None;
        self.freed.notify_waiters();
    }
}

impl Drop for AlHold {
    fn drop(&mut self) {
        if let Some((first, last)) = self.extents {
            self.meta.lock().expect("meta").al.complete(first, last);
            self.freed.notify_waiters();
        }
    }
}

/// Whether the backing's data must be made durable (`fdatasync` of the backing) before
/// transactions `pending` are persisted. A transaction that evicts extents ends their
/// protection: writes to them completed into the page cache only (buffered, no FUA) that a
/// power loss then takes are on the peers and in no log or bitmap here, so the copies would
/// stay different for good (DRBD writes such transactions with a preflush). With internal
/// metadata (`data_in_meta_file`) the metadata file is the backing file: the `fdatasync`
/// [`persist_al_transactions`] runs before an evicting transaction already writes back that
/// file's data pages (the whole inode), so no second one is needed.
fn needs_data_preflush(pending: &[PendingTransaction], data_in_meta_file: bool) -> bool {
    !data_in_meta_file && evicts(pending)
}

/// Whether any of transactions `pending` evicts extents.
fn evicts(pending: &[PendingTransaction]) -> bool {
    pending.iter().any(|t| !t.evicted.is_empty())
}

/// Persists the transactions a write's activity-log registration needs (`pending`, `held`
/// its registration, `gate` the activity-log gate), after making the backing's data durable
/// when `preflush` is given ([`needs_data_preflush`]). Run as a task of its own, so a waiting
/// write cancelled meanwhile cannot stop it between the flush and the transaction: the log
/// is changed in memory already and counted as being persisted. A failed preflush is a disk
/// failure ([`AlError::Preflush`], for the caller's `on-io-error` handling); the transactions
/// are then not written, so the extents they would evict stay in the log on disk.
async fn persist_registration(
    meta: Arc<Mutex<MetaState>>,
    preflush: Option<BlockStore>,
    pending: Vec<PendingTransaction>,
    held: AlHold,
    gate: tokio::sync::OwnedMutexGuard<()>,
    (offset, len): (u64, u64),
    (first, last): (u32, u32),
) -> Result<AlHold, AlError> {
    let flushed = match &preflush {
        Some(store) => store.flush().await.map_err(AlError::Preflush),
        None => Ok(()),
    };
    tokio::task::spawn_blocking(move || {
        let mut m = meta.lock().expect("meta");
        let r = flushed.and_then(|()| {
            persist_al_transactions(&mut m, &pending)
                .map_err(|e| AlError::Register(meta_failure(offset, len, e)))
        });
        m.al_persisting -= 1;
        match r {
            Ok(()) => {
                drop(gate);
                Ok(held)
            }
            Err(e) => {
                // The write fails: its extents must not stay hot in memory with no transaction
                // naming them on disk (see `ActivityLog::persist_failed`), and it ends here,
                // before the gate lets another write register them.
                m.al.persist_failed(&pending);
                m.al.complete(first, last);
                held.completed();
                drop(gate);
                Err(e)
            }
        }
    })
    .await
    .expect("activity-log task panicked")
}

/// Counts itself in a counter while it lives.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize) -> Counted<'a> {
        n.fetch_add(1, Ordering::AcqRel);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Writes activity-log transactions, after the bitmap pages of the extents they evict (every
/// slot's, holding marks not saved otherwise yet: a verify saves at its end, a pass-on write
/// error never), and before those pages the repair-marks flags they need
/// ([`MetaState::persist_repair_flags`]).
pub(crate) fn persist_al_transactions(
    m: &mut MetaState,
    pending: &[PendingTransaction],
) -> Result<(), MetaError> {
    if evicts(pending) {
        m.persist_repair_flags()?;
    }
    let es = u64::from(m.sb.geometry.al_extent_size);
    for t in pending {
        for &e in &t.evicted {
            for slot in 0..m.bitmaps.len() {
                let b = &m.bitmaps[slot];
                m.file.write_bitmap_pages(
                    slot as u32,
                    b,
                    b.pages_for_range(u64::from(e) * es, es),
                )?;
            }
        }
        if !t.evicted.is_empty() {
            m.file.sync()?;
        }
        m.file.write_al_transaction(t)?;
    }
    Ok(())
}

impl Resource {
    fn check_primary_write(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if self.role() != Role::Primary {
            return Err(StoreError::ReadOnly);
        }
        self.check_range(offset, len)
    }

    /// A request's range lies within the device (a peer's requests are checked too, before
    /// anything is registered for them).
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.store.size() => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.store.size(),
            }),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> (u32, u32) {
        let es = u64::from(self.al_extent_size);
        let last = offset + len.max(1) - 1;
        // Geometry::validate keeps every extent number of the data below u32::MAX.
        let number = |at: u64| u32::try_from(at / es).expect("extent count validated");
        (number(offset), number(last))
    }

    /// Registers a write in the activity log when every extent it touches is hot (no
    /// transaction needed, none being persisted) and the metadata is not busy; `None`
    /// otherwise: use [`Self::al_begin`].
    pub(crate) fn al_begin_hot(&self, offset: u64, len: u64) -> Option<AlHold> {
        let (first, last) = self.extents(offset, len);
        let hot = self.meta.try_lock().ok()?.al_begin_hot(first, last);
        hot.then(|| self.al_hold(first, last))
    }

    /// The metadata is internal: the metadata file is the backing file, so its `fdatasync`
    /// also writes back the data (see [`needs_data_preflush`]).
    fn data_in_meta_file(&self) -> bool {
        self.spec.me.meta == MetaPlacement::Internal
    }

    /// The registration of a write counted in flight in extents `first..=last`.
    fn al_hold(&self, first: u32, last: u32) -> AlHold {
        AlHold {
            meta: self.meta.clone(),
            freed: self.al_freed.clone(),
            extents: Some((first, last)),
        }
    }

    /// Registers a write in the activity log, persisting a transaction (and the bitmap pages of
    /// evicted extents, and with external metadata the backing's data first when it evicts:
    /// [`needs_data_preflush`]) before it may start. A failed preflush is returned as
    /// [`AlError::Preflush`]: a disk failure, for `on-io-error`. Primaries register their
    /// clients' writes, Secondaries the writes their Primary replicates, so a node that crashed
    /// in either role marks those extents when it attaches again.
    pub(crate) async fn al_begin(&self, offset: u64, len: u64) -> Result<AlHold, AlError> {
        self.al_begin_counted(offset, len, None).await
    }

    /// [`Self::al_begin`], counting the write in `slow` while it is in the log's slow path
    /// (a peer's `PeerRt::al_slow_path`, see [`Resource::al_room_waiters`]).
    pub(crate) async fn al_begin_counted(
        &self,
        offset: u64,
        len: u64,
        slow: Option<&AtomicUsize>,
    ) -> Result<AlHold, AlError> {
        let (first, last) = self.extents(offset, len);
        let hold = || self.al_hold(first, last);
        {
            // Fast path: every extent is hot and no transaction is being persisted (a write to
            // an extent whose transaction is not on disk yet must wait for it, below).
            if self.meta.lock().expect("meta").al_begin_hot(first, last) {
                return Ok(hold());
            }
        }
        // Counted while it waits behind the gate or for room (see `al_room_waiters`).
        let _slow = slow.map(Counted::new);
        // Held until this write's transaction is on disk (given to the task below): a
        // cancelled write must not let the next transaction reach the disk before its own, or
        // the log would not replay.
        let gate = self.al_gate.clone().lock_owned().await;
        loop {
            let freed = self.al_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let r = {
                let mut m = self.meta.lock().expect("meta");
                let r = m.al.begin(first, last);
                if matches!(&r, Ok(p) if !p.is_empty()) {
                    m.al_persisting += 1;
                }
                r
            };
            match r {
                Ok(p) if p.is_empty() => return Ok(hold()),
                Ok(pending) => {
                    // Counted in flight from here: a cancelled or failed write gives it back.
                    let held = hold();
                    // The count of transactions being persisted drops when this one is on
                    // disk (or failed), even if the waiting write was cancelled meanwhile.
                    let preflush = needs_data_preflush(&pending, self.data_in_meta_file())
                        .then(|| self.store.current());
                    // What a peer's requests wrote here is durable once the preflush succeeds.
                    let mark = preflush
                        .is_some()
                        .then(|| self.unflushed.lock().expect("unflushed").flush_started());
                    // The hold goes with the task: a write cancelled meanwhile must not end
                    // its registration a second time after the task ended it.
                    let r = tokio::spawn(persist_registration(
                        self.meta.clone(),
                        preflush,
                        pending,
                        held,
                        gate,
                        (offset, len),
                        (first, last),
                    ))
                    .await
                    .expect("activity-log task panicked");
                    if let (Some(mark), Ok(_)) = (mark, &r) {
                        self.unflushed.lock().expect("unflushed").flushed(mark);
                    }
                    return r;
                }
                Err(AlBusy::Full) => {
                    let _waiting = Counted::new(&self.al_room_waiters);
                    freed.await
                }
                Err(e @ AlBusy::TooLarge(_)) => {
                    return Err(AlError::Register(meta_failure(offset, len, e)));
                }
            }
        }
    }

    /// The longest range starting at `offset` that one activity-log registration may cover
    /// (half the log's slots, whole extents), for requests wider than that to be applied in
    /// parts.
    pub(crate) fn al_part_len(&self, offset: u64) -> u64 {
        let es = u64::from(self.al_extent_size);
        let capacity = u64::from(self.meta.lock().expect("meta").al.capacity());
        (capacity / 2).max(1) * es - offset % es
    }

    /// `offset..offset + len` as consecutive parts of at most [`Self::al_part_len`] bytes, each
    /// registered in the activity log on its own (one part unless the log is tiny or the range
    /// very wide, e.g. a discard of the whole device).
    pub(crate) fn al_parts(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let n = (end - at).min(self.al_part_len(at));
                at += n;
                (at - n, n)
            })
        })
    }

    /// Numbers one replicated request and queues it to every connected peer; returns its
    /// sequence number, the acks to wait for and the sessions it was queued on. Disconnected
    /// peers, and peers whose disk is detached, get the range in their bitmap.
    pub(crate) fn replicate(
        &self,
        offset: u64,
        len: u64,
        make: impl Fn(u64, u64) -> Message,
    ) -> (u64, Vec<oneshot::Receiver<()>>, Vec<Arc<Conn>>) {
        let (seq, waits, queued) = self.replicate_to(offset, len, make, false, &mut [], None);
        (seq, waits.into_iter().map(|(_, w)| w).collect(), queued)
    }

    /// [`Resource::replicate`]; with `peer_written` every peer's ack is awaited until it has
    /// written the data, whatever the protocol (a Primary without a usable disk). The acks
    /// come with the index of their peer. A session with room reserved in `room` queues the
    /// request in it. Each session the request is queued on keeps a share of `al`, the
    /// request's activity-log registration, until the peer has written it (see [`AlHold`]).
    fn replicate_to(
        &self,
        offset: u64,
        len: u64,
        make: impl Fn(u64, u64) -> Message,
        peer_written: bool,
        room: &mut [Reservation],
        al: Option<&Arc<AlHold>>,
    ) -> Replicated {
        let mut waits = Vec::new();
        let mut untracked = Vec::new();
        let mut queued = Vec::new();
        let persists: Vec<bool> = {
            let st = self.state.lock().expect("state");
            st.peers
                .iter()
                .map(|p| disk_failure::peer_persists_writes(p.disk))
                .collect()
        };
        let seq = {
            let mut order = self.order.lock().expect("order");
            let (seq, after) = order.issue();
            let msg = make(seq, after);
            let cost = send_cost(&msg);
            for (i, p) in self.peers.iter().enumerate() {
                let conn = p.conn.lock().expect("conn").clone();
                let Some(c) = conn.filter(|_| persists[i]) else {
                    untracked.push(p.slot);
                    continue;
                };
                let ack = if peer_written {
                    PeerAck::Written
                } else {
                    p.protocol.peer_ack()
                };
                let waiter = if ack == PeerAck::None {
                    None
                } else {
                    let (tx, rx) = oneshot::channel();
                    waits.push((i, rx));
                    Some(tx)
                };
                let write = PendingWrite {
                    offset,
                    len,
                    cost,
                    ack,
                    waiter,
                    client_acked: false,
                    al: al.cloned(),
                };
                let reserved = room.iter_mut().find(|r| r.is_for(&c));
                if c.track(seq, write, &msg, reserved.is_some()) {
                    if let Some(r) = reserved {
                        r.used(cost);
                    }
                    queued.push(c);
                } else {
                    untracked.push(p.slot);
                }
            }
            seq
        };
        if !untracked.is_empty() {
            let mut m = self.meta.lock().expect("meta");
            for s in untracked {
                self.mark_out_of_sync(&mut m, s, offset, len);
            }
        }
        (seq, waits, queued)
    }

    /// Waits until every connected protocol-A peer that stores writes has room for `cost`
    /// bytes in its send buffer (`sndbuf-size`, see `repl::congestion`) and reserves it, peer
    /// by peer. Called holding no range, activity-log slot, order or lock: a congested peer
    /// slows the writers down to its link's speed and blocks nothing else. Under B and C the
    /// writer waits for the peer's ack anyway (bounded by the NBD connection's budget).
    async fn send_buffer_room(&self, cost: u64) -> Vec<Reservation> {
        let mut room = Vec::new();
        if cost == 0 || self.role() != Role::Primary {
            return room;
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.protocol.peer_ack() != PeerAck::None {
                continue;
            }
            let persists = {
                let st = self.state.lock().expect("state");
                disk_failure::peer_persists_writes(st.peers[i].disk)
            };
            let conn = p.conn.lock().expect("conn").clone();
            if let Some(c) = conn.filter(|_| persists)
                && let Some(r) = c.reserve(cost).await
            {
                room.push(r);
            }
        }
        room
    }

    /// Request `seq` completed: later requests are applied after it on every peer.
    pub(crate) fn completed(&self, seq: u64) {
        self.order.lock().expect("order").completed(seq);
    }

    /// Runs one modifying request through the replicated path. `make(seq, after, offset,
    /// len)` builds the message of a part and `local(offset, len)` starts its local write:
    /// a request is replicated and written in parts of at most half the activity log's slots
    /// ([`Self::al_parts`]; one part unless the log is tiny or the request very wide, e.g. a
    /// discard of the whole device), each registered in the activity log before it is queued
    /// to the peers and written here, and kept there until every peer has written it (a
    /// request wider than the log could never be registered whole, and a part sent ahead of
    /// its registration could be on a peer and not in the log of a Primary that crashed).
    /// Where it goes is decided by [`disk_failure::write_plan`]: a Primary without a usable
    /// disk only counts peers that wrote it, and a local I/O error is handled by `on-io-error`
    /// (`detach`: the request is retried through the peers).
    /// `cost`: the bytes the request takes in a peer's send buffer ([`send_cost`]).
    async fn replicated<F>(
        &self,
        offset: u64,
        len: u64,
        cost: u64,
        make: impl Fn(u64, u64, u64, u64) -> Message,
        local: impl Fn(u64, u64) -> F,
    ) -> Result<(), StoreError>
    where
        F: std::future::Future<Output = Result<(), StoreError>>,
    {
        // First, before anything is held (a demotion is not kept waiting by a slow link).
        let mut room = self.send_buffer_room(cost).await;
        let _role = self.role_gate.read().await;
        self.check_primary_write(offset, len)?;
        self.quorum_gate(offset, len).await?;
        if len == 0 {
            return match disk_failure::local_data(self.disk()) {
                disk_failure::LocalData::Absent => Ok(()),
                _ => local(offset, 0).await,
            };
        }
        // Without a disk and without a peer to write to, fail before anything changes (no new
        // generation for a write nobody stores).
        disk_failure::write_plan(self.disk(), &self.peer_views())
            .map_err(|e| crate::repl::local_disk::no_data_path_write(offset, len, e))?;
        self.ensure_generation(offset, len).await?;
        self.app_io_bytes
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        loop {
            let plan = disk_failure::write_plan(self.disk(), &self.peer_views())
                .map_err(|e| crate::repl::local_disk::no_data_path_write(offset, len, e))?;
            if plan.peer_written {
                self.detach_settled().await;
            }
            let range = self.ranges.lock(offset, len).await;
            // Per part: its sequence number, length, acks to wait for, sessions it was queued
            // on. A part that fails ends the request (the parts after it are not sent).
            let mut parts = Vec::new();
            let mut failed = None;
            for (at, n) in self.al_parts(offset, len) {
                let al = if plan.local {
                    match self.al_begin(at, n).await {
                        Ok(hold) => Some(Arc::new(hold)),
                        // The backing's preflush failed: a disk failure like a failed write.
                        Err(AlError::Preflush(e)) => {
                            failed = Some(PartFailure::Local(e));
                            break;
                        }
                        Err(AlError::Register(e)) => {
                            failed = Some(PartFailure::ActivityLog(e));
                            break;
                        }
                    }
                } else {
                    None
                };
                let (seq, waits, queued) = self.replicate_to(
                    at,
                    n,
                    |seq, after| make(seq, after, at, n),
                    plan.peer_written,
                    &mut room,
                    al.as_ref(),
                );
                parts.push((seq, n, waits, queued));
                if plan.local {
                    // Snapshots taken on this node before it was promoted keep their frozen
                    // image.
                    let change = self
                        .snapshots
                        .set
                        .change(&self.store.current(), at, n)
                        .await;
                    self.snapshots_invalidated(&change.invalidated);
                    if let Err(e) = local(at, n).await {
                        failed = Some(PartFailure::Local(e));
                        break;
                    }
                }
                // This task's share of the registration ends with the local write; the
                // sessions keep theirs until their peer wrote the part.
                drop(al);
            }
            // Room not used (a session that closed meanwhile, a retry) is given back.
            room.clear();
            let mut acks = Vec::with_capacity(parts.len());
            for (_, _, waits, _) in &mut parts {
                let mut part = Vec::with_capacity(waits.len());
                for (i, w) in waits.drain(..) {
                    // An error means the link dropped: the range is in that peer's bitmap now.
                    part.push((i, w.await.is_ok()));
                }
                acks.push(part);
            }
            // Peers lost meanwhile may have taken quorum with them: the write is not
            // acknowledged on a minority (suspended until quorum returns, or failed). Nothing
            // to hold back when not even its first part was sent.
            let quorum = if parts.is_empty() {
                Ok(())
            } else {
                self.quorum_gate(offset, len).await
            };
            for &(seq, ..) in &parts {
                self.completed(seq);
            }
            drop(range);
            quorum?;
            let result = match failed {
                None if plan.peer_written => {
                    let views = self.peer_views();
                    acks.iter()
                        .try_for_each(|part| {
                            let written: Vec<(bool, bool)> = part
                                .iter()
                                .map(|&(i, ok)| (views[i].serves_data(), ok))
                                .collect();
                            disk_failure::peer_write_outcome(&written)
                        })
                        .map_err(|e| crate::repl::local_disk::no_data_path_write(offset, len, e))
                }
                None => Ok(()),
                Some(PartFailure::ActivityLog(e)) => Err(e),
                Some(PartFailure::Local(e)) => {
                    match self.local_failure(&e, true, offset, len).await {
                        disk_failure::OnError::Detach => continue,
                        _ => Err(e),
                    }
                }
            };
            if result.is_ok() {
                // Acknowledged to the client now: counts until each peer confirms it as written.
                for (seq, n, _, queued) in &parts {
                    for c in queued {
                        c.client_acked(*seq, *n);
                    }
                }
            }
            return result;
        }
    }

    /// Replicated write; `fua` makes it durable locally and on every peer that acks it.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), StoreError> {
        let len = data.len() as u64;
        let flags = if fua { FLAG_FUA } else { 0 };
        let payload = data.clone();
        self.replicated(
            offset,
            len,
            len,
            |seq, after, at, n| Message::Data {
                seq,
                after,
                offset: at,
                flags,
                payload: payload.slice((at - offset) as usize..(at - offset + n) as usize),
            },
            |at, n| {
                let part = data.slice((at - offset) as usize..(at - offset + n) as usize);
                self.store.write(at, part, fua)
            },
        )
        .await
    }

    /// Local flush and, under protocol C, every connected peer's flush (`Flush`/`FlushAck`).
    /// A flush also closes the write epoch on every peer.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _role = self.role_gate.read().await;
        if self.role() != Role::Primary {
            return self.store.flush().await;
        }
        self.quorum_gate(0, 0).await?;
        self.flush_inner().await?;
        self.quorum_gate(0, 0).await
    }

    /// Without a usable local disk, every peer's flush is awaited and one that serves data
    /// must confirm it; a local flush error is handled by `on-io-error`.
    async fn flush_inner(&self) -> Result<(), StoreError> {
        let data = disk_failure::local_data(self.disk());
        let peer_written = data != LocalData::Usable;
        if peer_written {
            self.detach_settled().await;
        }
        let mut waits = Vec::new();
        let seq = {
            let mut order = self.order.lock().expect("order");
            let (seq, _) = order.issue();
            for (i, p) in self.peers.iter().enumerate() {
                if let Some(c) = p.conn.lock().expect("conn").as_ref()
                    && let Some(rx) = c.track_flush(seq, peer_written || p.protocol == Protocol::C)
                {
                    waits.push((i, rx));
                }
            }
            seq
        };
        // What a peer's requests wrote here while Secondary is durable once this succeeds.
        let mark = self.unflushed.lock().expect("unflushed").flush_started();
        let mut local = match data {
            LocalData::Absent => Ok(()),
            _ => self.store.flush().await,
        };
        if local.is_ok() && data != LocalData::Absent {
            self.unflushed.lock().expect("unflushed").flushed(mark);
        }
        let mut acks = Vec::with_capacity(waits.len());
        for (i, w) in waits {
            acks.push((i, w.await.is_ok()));
        }
        self.completed(seq);
        let mut peer_written = peer_written;
        if let Err(e) = &local
            && self.local_failure(e, false, 0, 0).await == disk_failure::OnError::Detach
        {
            // The peers flushed everything this disk had: they must have confirmed it.
            local = Ok(());
            peer_written = true;
        }
        if local.is_ok() && peer_written {
            let views = self.peer_views();
            let confirmed: Vec<(bool, bool)> = acks
                .iter()
                .map(|&(i, ok)| (views[i].serves_data(), ok))
                .collect();
            disk_failure::peer_write_outcome(&confirmed)
                .map_err(|e| crate::repl::local_disk::no_data_path_write(0, 0, e))?;
        }
        local
    }

    /// Flush used by demotion (no role check: the role is already changing).
    pub(crate) async fn flush_everywhere(&self) -> Result<(), StoreError> {
        self.flush_inner().await
    }

    /// An NBD client's read. A Primary without quorum holds or fails reads too (its data may be
    /// stale).
    ///
    /// A Primary's large read of cached data is a slice of the mapped backing, copied when the
    /// reply is sent (see [`crate::store::BlockStore::read_for_client_at`]): its writes come
    /// from the clients themselves, which may not depend on a read racing their own write.
    pub async fn read(
        &self,
        offset: u64,
        len: usize,
        copy_at: CopyAt,
    ) -> Result<Bytes, StoreError> {
        self.app_io_bytes
            .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
        if !self.quorum.has_quorum() && self.role() == Role::Primary {
            self.quorum_gate(offset, len as u64).await?;
        }
        if self.role() != Role::Primary {
            return self
                .store
                .read_for_client_at(offset, len, CopyAt::Read)
                .await;
        }
        let source = disk_failure::read_source(self.disk(), &self.peer_views());
        match source {
            Ok(ReadSource::Local) => {
                match self.store.read_for_client_at(offset, len, copy_at).await {
                    Ok(data) => Ok(data),
                    Err(e) => match self.local_failure(&e, false, offset, len as u64).await {
                        // Retried through a peer: the request that hit the error still completes.
                        disk_failure::OnError::Detach => {
                            Ok(self.forward_read(offset, len).await?.freeze())
                        }
                        _ => Err(e),
                    },
                }
            }
            Ok(ReadSource::Peer(_)) => Ok(self.forward_read(offset, len).await?.freeze()),
            Err(e) => Err(StoreError::Read {
                offset,
                len: len as u64,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.replicated(
            offset,
            len,
            0,
            |seq, after, at, n| Message::Zero {
                seq,
                after,
                offset: at,
                len: n,
                trim: true,
                fua: false,
            },
            |at, n| self.store.trim(at, n),
        )
        .await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.replicated(
            offset,
            len,
            0,
            |seq, after, at, n| Message::Zero {
                seq,
                after,
                offset: at,
                len: n,
                trim: may_punch,
                fua,
            },
            |at, n| self.store.write_zeroes(at, n, may_punch, fua),
        )
        .await
    }

    /// Zeroes fast locally (or fails with `NotFast` before anything is replicated); peers zero
    /// the range however they can (punching holes only if `may_punch`).
    pub async fn fast_zero(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
    ) -> Result<(), StoreError> {
        if !self.store.can_fast_zero(offset, len, may_punch) {
            return Err(StoreError::NotFast);
        }
        // The peers are asked to zero the range at once, so the local side must zero it too: a
        // fast way found unsupported only now (its first EOPNOTSUPP) is replaced by writing
        // zeroes. The client then waited longer than it asked, but every replica holds zeroes
        // (a `NotFast` here would leave the peers zeroed and this disk not).
        let local = |at, n| async move {
            match self.store.fast_zero(at, n, may_punch).await {
                Err(StoreError::NotFast) => self.store.write_zeroes(at, n, may_punch, false).await,
                done => done,
            }
        };
        self.replicated(
            offset,
            len,
            0,
            |seq, after, at, n| Message::Zero {
                seq,
                after,
                offset: at,
                len: n,
                trim: may_punch,
                fua: false,
            },
            local,
        )
        .await
    }

    /// Prefetch: nothing to do without a usable local disk.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if disk_failure::local_data(self.disk()) != LocalData::Usable {
            return Ok(());
        }
        self.store.cache(offset, len).await
    }

    /// Without a usable local disk, all of the range is reported as data.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StoreError> {
        if disk_failure::local_data(self.disk()) != LocalData::Usable {
            return Ok(vec![Extent {
                length: len.min(self.size().saturating_sub(offset)),
                hole: false,
                zero: false,
            }]);
        }
        self.store.block_status(offset, len).await
    }
}

/// What an NBD export serves: the local store (standalone, unchanged fast path) or a
/// replicated resource (writes refused unless Primary).
#[derive(Clone)]
pub enum Device {
    Local(BlockStore),
    Replicated(Arc<Resource>),
    /// A read-only snapshot of a replica (`blockctl snapshot`).
    Snapshot(crate::repl::snapshot::SnapshotExport),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Local(s) => s.fmt(f),
            Device::Replicated(r) => write!(f, "Replicated({})", r.name()),
            Device::Snapshot(s) => write!(f, "Snapshot({})", s.snap.name()),
        }
    }
}

impl From<BlockStore> for Device {
    fn from(s: BlockStore) -> Device {
        Device::Local(s)
    }
}

impl Device {
    /// The store behind the export now (a cheap clone; a replicated resource's store is
    /// replaced by `blockctl attach`).
    fn store(&self) -> BlockStore {
        match self {
            Device::Local(s) => s.clone(),
            Device::Replicated(r) => r.store(),
            Device::Snapshot(s) => s.store.clone(),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Device::Snapshot(s) => s.size(),
            _ => self.store().size(),
        }
    }

    pub fn read_only(&self) -> bool {
        match self {
            Device::Local(s) => s.read_only(),
            Device::Replicated(r) => r.role() != Role::Primary,
            Device::Snapshot(_) => true,
        }
    }

    pub fn engine_name(&self) -> &'static str {
        self.store().engine_name()
    }

    pub fn supports_trim(&self) -> bool {
        self.store().supports_trim()
    }

    pub fn supports_fast_zero(&self) -> bool {
        self.store().supports_fast_zero()
    }

    /// An NBD client's read; with [`CopyAt::Send`] a standalone or Primary export may send
    /// cached data from the mapped backing (a snapshot's and a Secondary's data are copied now:
    /// they must be what they were when read).
    pub async fn read(
        &self,
        offset: u64,
        len: usize,
        copy_at: CopyAt,
    ) -> Result<Bytes, StoreError> {
        match self {
            Device::Snapshot(s) => Ok(s.read(offset, len).await?.freeze()),
            Device::Replicated(r) => r.read(offset, len, copy_at).await,
            Device::Local(s) => s.read_for_client_at(offset, len, copy_at).await,
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), StoreError> {
        match self {
            Device::Snapshot(_) => Err(StoreError::ReadOnly),
            Device::Local(s) => s.write(offset, data, fua).await,
            Device::Replicated(r) if debug_drop_flush::enabled() => {
                debug_drop_flush::write(r, offset, data).await
            }
            Device::Replicated(r) => r.write(offset, data, fua).await,
        }
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Device::Local(s) => s.flush().await,
            Device::Snapshot(_) => Ok(()),
            Device::Replicated(_) if debug_drop_flush::enabled() => Ok(()),
            Device::Replicated(r) => r.flush().await,
        }
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match self {
            Device::Local(s) => s.trim(offset, len).await,
            Device::Snapshot(_) => Err(StoreError::ReadOnly),
            Device::Replicated(r) if debug_drop_flush::enabled() => {
                debug_drop_flush::zero(r, offset, len, true, false).await
            }
            Device::Replicated(r) => r.trim(offset, len).await,
        }
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), StoreError> {
        match self {
            Device::Local(s) => s.write_zeroes(offset, len, may_punch, fua).await,
            Device::Snapshot(_) => Err(StoreError::ReadOnly),
            Device::Replicated(r) if debug_drop_flush::enabled() => {
                debug_drop_flush::zero(r, offset, len, false, may_punch).await
            }
            Device::Replicated(r) => r.write_zeroes(offset, len, may_punch, fua).await,
        }
    }

    pub async fn fast_zero(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
    ) -> Result<(), StoreError> {
        match self {
            Device::Local(s) => s.fast_zero(offset, len, may_punch).await,
            Device::Snapshot(_) => Err(StoreError::ReadOnly),
            Device::Replicated(r) => r.fast_zero(offset, len, may_punch).await,
        }
    }

    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match self {
            Device::Replicated(r) => r.cache(offset, len).await,
            Device::Local(s) => s.cache(offset, len).await,
            Device::Snapshot(s) => s.store.cache(offset, len).await,
        }
    }

    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StoreError> {
        match self {
            // The live allocation says nothing about preserved blocks: all of it is data.
            Device::Snapshot(s) => Ok(vec![Extent {
                length: len.min(s.size().saturating_sub(offset)),
                hole: false,
                zero: false,
            }]),
            Device::Replicated(r) => r.block_status(offset, len).await,
            Device::Local(s) => s.block_status(offset, len).await,
        }
    }
}

/// TEST ONLY (`blockd --config FILE --debug-drop-flush`, hidden from `--help`): a deliberately
/// broken replicated export, for vm-tests to show that their failover scenario catches a server
/// that loses flushed data. FLUSH and FUA are acknowledged without syncing anything or waiting
/// for any peer; writes, trims and zeroes are acknowledged once they are local, and reach the
/// peers only [`REPLICATION_DELAY`] later (in order, acks not awaited). Under protocol C a
/// Secondary promoted after a crash of this Primary therefore lacks the data of the last
/// seconds, though the client was told it was flushed. Never use it for anything else.
pub mod debug_drop_flush {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::mpsc;
    use tokio::time::Instant;

    use crate::repl::resource::Resource;
    use crate::repl::wire::Message;
    use crate::store::StoreError;

    /// How long replication of each request is held back.
    pub const REPLICATION_DELAY: Duration = Duration::from_secs(1);

    static ENABLED: AtomicBool = AtomicBool::new(false);

    type MakeMessage = Box<dyn Fn(u64, u64) -> Message + Send>;
    /// A request done locally: when it was queued, its resource, offset, length, message.
    type Delayed = (Instant, Arc<Resource>, u64, u64, MakeMessage);
    static DELAYED: OnceLock<mpsc::UnboundedSender<Delayed>> = OnceLock::new();

    /// Turns the broken mode on for every replicated export of this process.
    pub fn enable() {
        ENABLED.store(true, Ordering::SeqCst);
    }

    pub fn enabled() -> bool {
        ENABLED.load(Ordering::Relaxed)
    }

    /// Queues replication of a request that is already done locally; one task sends them in
    /// order, each `REPLICATION_DELAY` after it was queued.
    fn replicate_later(r: &Arc<Resource>, offset: u64, len: u64, make: MakeMessage) {
        let tx = DELAYED.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Delayed>();
            tokio::spawn(async move {
                while let Some((at, r, offset, len, make)) = rx.recv().await {
                    tokio::time::sleep_until(at + REPLICATION_DELAY).await;
                    let (seq, _, _) = r.replicate(offset, len, make);
                    r.completed(seq);
                }
            });
            tx
        });
        let _ = tx.send((Instant::now(), r.clone(), offset, len, make));
    }

    pub async fn write(r: &Arc<Resource>, offset: u64, data: Bytes) -> Result<(), StoreError> {
        let len = data.len() as u64;
        r.check_primary_write(offset, len)?;
        r.store.write(offset, data.clone(), false).await?;
        replicate_later(
            r,
            offset,
            len,
            Box::new(move |seq, after| Message::Data {
                seq,
                after,
                offset,
                flags: 0,
                payload: data.clone(),
            }),
        );
        Ok(())
    }

    /// NBD TRIM (`discard`) or WRITE_ZEROES.
    pub async fn zero(
        r: &Arc<Resource>,
        offset: u64,
        len: u64,
        discard: bool,
        may_punch: bool,
    ) -> Result<(), StoreError> {
        r.check_primary_write(offset, len)?;
        if discard {
            r.store.trim(offset, len).await?;
        } else {
            r.store.write_zeroes(offset, len, may_punch, false).await?;
        }
        let trim = discard || may_punch;
        replicate_later(
            r,
            offset,
            len,
            Box::new(move |seq, after| Message::Zero {
                seq,
                after,
                offset,
                len,
                trim,
                fua: false,
            }),
        );
        Ok(())
    }
}
