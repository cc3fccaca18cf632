//! One session on an established link: an outbox the write path encodes frames into and a
//! writer task that sends whatever accumulated in one TLS write (and pings when idle), the
//! handshake (state reports both ways, then the commands of `repl::handshake`), and the receive
//! loop: acknowledgements for our writes, and applying the peer's replicated requests in the
//! order `repl::apply_order` allows (concurrently where it may; on the receive task itself
//! when the store completes at once), with the acknowledgements of a batch sent together. When
//! the session ends, every write the peer had not acknowledged goes into its bitmap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, oneshot, watch};

use crate::meta::superblock::flags;
use crate::repl::apply_order::{ApplyOrder, Ordered};
use crate::repl::backlog::{Backlog, RECEIVE_BACKLOG_MAX, REQUEST_OVERHEAD, STALL_LIMIT, Step};
use crate::repl::checksum::{self, ChecksumPurpose, PeerAnswer};
use crate::repl::congestion::{Admission, Change, SendBuffer};
use crate::repl::csum_resync::{self, Answer, AnswerRoutes};
use crate::repl::device::AlHold;
use crate::repl::handshake::{Command, DisconnectReason, RoleConflict, handshake};
use crate::repl::link::Link;
use crate::repl::lost_writes::{Hearing, KnownLoss, Ledger, Tally};
use crate::repl::outbox::{Frames, Outbox, encode_frame};
use crate::repl::resource::{Resource, error_chain};
use crate::repl::resync;
use crate::repl::resync_claims::Claims;
use crate::repl::split_brain::Verdict;
use crate::repl::state::{ConnState, DiskState, PeerAck, ReplState, Role};
use crate::repl::sync_decision::{SyncOutcome, SyncRule};
use crate::repl::unstable::UnstableWrites;
use crate::repl::victim;
use crate::repl::wire::{FLAG_FUA, MAX_FRAME, Message};

/// Idle time after which the writer sends a `Ping`.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Silence after which the link is considered dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a session that goes StandAlone at its handshake keeps reading, so the peer
/// receives our state report and decides the same.
const LINGER_BEFORE_STANDALONE: Duration = Duration::from_millis(500);
/// How long a link whose resync was refused for lack of usable data waits before it retries.
const REFUSED_RETRY: Duration = Duration::from_secs(1);
/// Resync bytes sent but not yet acknowledged, at most.
pub const RESYNC_WINDOW: usize = 8 << 20;
/// Acknowledgements are sent at the latest after this many received requests, even when more
/// frames are already waiting to be read.
const ACK_BATCH: usize = 64;
/// Plain (non-FUA) writes up to this size are applied with a blocking `pwrite` on the receive
/// task: a page-cache copy costs less than two thread hops through the engine.
const APPLY_INLINE_MAX: usize = 1 << 20;
/// How long a session that refuses its peer waits for what it queued to be sent.
const REFUSAL_SEND_LIMIT: Duration = Duration::from_secs(2);
/// How long a session that ended may go on applying the requests it had received (protocols A
/// and B: see `Session::finish_applies`).
pub const FINISH_APPLIES_LIMIT: Duration = Duration::from_secs(60);
/// How long a session that ended waits for the requests still running on the local disk (see
/// `Session::stop_applies`) before it counts the disk as failed.
pub const STOP_APPLIES_LIMIT: Duration = Duration::from_secs(20);

/// A write queued to a peer and not yet acknowledged by it.
pub struct PendingWrite {
    pub offset: u64,
    pub len: u64,
    /// Bytes it takes in the send buffer (`sndbuf-size`, see `repl::congestion`): the
    /// payload of a write, 0 for a zeroing.
    pub cost: u64,
    /// The ack the writer waits for (`None`: protocol A, nobody waits).
    pub ack: PeerAck,
    pub waiter: Option<oneshot::Sender<()>>,
    /// Acknowledged to the NBD client already (counts in the ledger's `unconfirmed`).
    pub client_acked: bool,
    /// The write's activity-log registration on the Primary: its extents stay in the log
    /// until the peer's `WriteAck` (whatever the protocol: under A the client was answered
    /// while the data may still wait in the outbox) or until the session's loss handler has
    /// marked the range in the peer's bitmap ([`Conn::close`]). Dropped outside the pending
    /// lock (releasing it takes the metadata lock).
    pub(crate) al: Option<Arc<AlHold>>,
}

#[derive(Default)]
struct Pending {
    closed: bool,
    /// By sequence number: the lowest is at hand (`Conn::lowest_pending`).
    writes: BTreeMap<u64, PendingWrite>,
    flushes: HashMap<u64, oneshot::Sender<()>>,
    /// Client-acknowledged writes of this session (see `repl::lost_writes`).
    ledger: Ledger,
    /// The `acked` figure last sent to the peer (`ClientAcked`).
    reported: Tally,
    /// Bytes of `writes` (their ranges).
    bytes: u64,
    /// What `writes` take in the send buffer, and the writes waiting for room.
    buffer: SendBuffer,
}

/// Reports a change of a session's congestion (an event).
type OnCongestion = Box<dyn Fn(Change) + Send + Sync>;

/// Room reserved for one write in a session's send buffer ([`Conn::reserve`]); what its
/// parts did not use on that session is given back when dropped.
pub(crate) struct Reservation {
    conn: Arc<Conn>,
    /// Bytes reserved and not queued yet.
    left: u64,
}

impl Reservation {
    /// Whether this reserves room on session `c` for a write (part) not queued yet.
    pub(crate) fn is_for(&self, c: &Arc<Conn>) -> bool {
        self.left > 0 && Arc::ptr_eq(&self.conn, c)
    }

    /// A part of the write taking `cost` bytes was queued with this room.
    pub(crate) fn used(&mut self, cost: u64) {
        self.left = self.left.saturating_sub(cost);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.left > 0 {
            let change = self
                .conn
                .pending
                .lock()
                .expect("pending")
                .buffer
                .unreserve(self.left);
            self.conn.room_changed(change);
        }
    }
}

/// A write's place among those waiting for room ([`Conn::reserve`]); given up when dropped
/// before it was admitted.
struct Ticket<'a> {
    conn: &'a Conn,
    id: u64,
    admitted: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.admitted {
            let change = self
                .conn
                .pending
                .lock()
                .expect("pending")
                .buffer
                .cancel(self.id);
            self.conn.room_changed(change);
        }
    }
}

/// The sending side of a live session, shared with the write path.
pub struct Conn {
    out: Outbox,
    pending: Mutex<Pending>,
    /// Wakes writes waiting for room in the send buffer.
    room: Notify,
    on_congestion: OnCongestion,
    /// Resync window in bytes (see [`RESYNC_WINDOW`]).
    pub(crate) resync_window: Arc<Semaphore>,
    /// Resync ranges read for the peer, then acknowledged (written, or found equal) and not yet
    /// known durable there: cleared from the bitmap only after a later flush is acknowledged
    /// (`repl::resync::settle_acked`), and never when marked out of sync again since their read
    /// (`Resource::mark_out_of_sync`). Locked after the metadata. Dropped with the session: the
    /// bits stay set.
    pub(crate) resync_claims: Mutex<Claims>,
    pub(crate) closed: watch::Sender<bool>,
    /// Wire bytes sent (frames), for status.
    pub(crate) sent: AtomicU64,
    /// Checksum answers of the peer, to the verify or checksum-resync worker that asked.
    pub(crate) answers: AnswerRoutes,
    /// The latest `Stable` figure for the peer (see `repl::unstable`), sent by the writer with
    /// its next batch (or at the next ping tick), and the figure last sent.
    stable: AtomicU64,
    stable_sent: AtomicU64,
    /// Bumped by the writer each time it finds nothing left to send: everything queued before
    /// is written and flushed.
    writer_idle: watch::Sender<u64>,
}

impl Conn {
    /// A session whose send buffer holds `sndbuf_size` bytes (see `repl::congestion`).
    pub(crate) fn new(sndbuf_size: u64, on_congestion: OnCongestion) -> Conn {
        Conn {
            out: Outbox::default(),
            pending: Mutex::new(Pending {
                buffer: SendBuffer::new(sndbuf_size),
                ..Pending::default()
            }),
            room: Notify::new(),
            on_congestion,
            resync_window: Arc::new(Semaphore::new(RESYNC_WINDOW)),
            resync_claims: Mutex::new(Claims::default()),
            closed: watch::channel(false).0,
            sent: AtomicU64::new(0),
            answers: AnswerRoutes::default(),
            stable: AtomicU64::new(0),
            stable_sent: AtomicU64::new(0),
            writer_idle: watch::channel(0).0,
        }
    }

    /// Returns once everything queued so far is written and flushed by the writer.
    async fn queued_sent(&self) {
        let mut idle = self.writer_idle.subscribe();
        // Wakes the writer even when it is idle already: the next time it finds the queue
        // empty comes after whatever was queued before this call.
        self.send(Message::Ping);
        let _ = idle.changed().await;
    }

    /// The lowest sequence number of a write queued here and not yet written by the peer
    /// (`None`: none, or the session is closed and its writes are in the bitmap).
    pub(crate) fn lowest_pending(&self) -> Option<u64> {
        let p = self.pending.lock().expect("pending");
        if p.closed {
            return None;
        }
        p.writes.keys().next().copied()
    }

    /// Every write numbered below `below` is written on every peer: tell this peer with the
    /// next batch (no wake-up of its own: it rides along with the traffic, or the ping tick).
    pub(crate) fn announce_stable(&self, below: u64) {
        self.stable.fetch_max(below, Ordering::SeqCst);
    }

    /// The latest `Stable` figure (read before taking the frames it is to follow: a figure
    /// computed after a `NewUuid` was queued then goes out after it).
    fn stable_seen(&self) -> u64 {
        self.stable.load(Ordering::SeqCst)
    }

    /// `seen` (from [`Self::stable_seen`]) if it is above the figure last sent (marked sent).
    fn stable_due(&self, seen: u64) -> Option<u64> {
        (seen > self.stable_sent.fetch_max(seen, Ordering::Relaxed)).then_some(seen)
    }

    /// Queues a message (dropped silently when the session is gone: its loss handler runs).
    pub(crate) fn send(&self, msg: Message) {
        self.out.push(|f| f.push(&msg));
    }

    /// Waits until a write taking `cost` bytes fits in the send buffer (in the order writes
    /// asked; see `repl::congestion`) and reserves its room. `None` once the session is closed:
    /// a closed session holds no write (its ranges go to the bitmap).
    pub(crate) async fn reserve(self: &Arc<Conn>, cost: u64) -> Option<Reservation> {
        let mut ticket: Option<Ticket<'_>> = None;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let (go, change) = {
                let mut p = self.pending.lock().expect("pending");
                if p.closed {
                    // The ticket is given up (dropped) after the lock.
                    (None, None)
                } else {
                    match ticket.as_ref().map(|t| t.id) {
                        None => match p.buffer.request(cost) {
                            (Admission::Go, c) => (Some(true), c),
                            (Admission::Wait(id), c) => {
                                ticket = Some(Ticket {
                                    conn: self,
                                    id,
                                    admitted: false,
                                });
                                (Some(false), c)
                            }
                        },
                        Some(id) => (Some(p.buffer.retry(id, cost)), None),
                    }
                }
            };
            if let Some(c) = change {
                (self.on_congestion)(c);
            }
            match go {
                None => return None,
                Some(true) => {
                    if let Some(mut t) = ticket.take() {
                        t.admitted = true;
                        // The next in line may fit as well.
                        self.room.notify_waiters();
                    }
                    return Some(Reservation {
                        conn: self.clone(),
                        left: cost,
                    });
                }
                Some(false) => room.await,
            }
        }
    }

    /// Room in the send buffer was given back: waiting writes look again.
    fn room_changed(&self, change: Option<Change>) {
        self.room.notify_waiters();
        if let Some(c) = change {
            (self.on_congestion)(c);
        }
    }

    /// Bytes counted against the send buffer (queued, unacknowledged or reserved), whether
    /// writes wait for room, and how many had to wait since the session started.
    pub(crate) fn send_buffer(&self) -> (u64, bool, u64) {
        let p = self.pending.lock().expect("pending");
        (
            p.buffer.used(),
            p.buffer.congested(),
            p.buffer.waited_writes(),
        )
    }

    /// Queues a write and remembers it until acknowledged (`reserved`: its room was reserved
    /// by [`Conn::reserve`]). `false` when the session is closing (the caller marks the range
    /// out of sync instead).
    pub(crate) fn track(
        &self,
        seq: u64,
        write: PendingWrite,
        msg: &Message,
        reserved: bool,
    ) -> bool {
        let mut p = self.pending.lock().expect("pending");
        if p.closed {
            return false;
        }
        p.bytes += write.len;
        p.buffer.queue(write.cost, reserved);
        p.writes.insert(seq, write);
        self.out.push(|f| f.push(msg));
        true
    }

    /// Queues a flush; returns the ack to wait for when `wait`.
    pub(crate) fn track_flush(&self, seq: u64, wait: bool) -> Option<oneshot::Receiver<()>> {
        let mut p = self.pending.lock().expect("pending");
        if p.closed {
            return None;
        }
        self.out.push(|f| f.push(&Message::Flush { seq }));
        wait.then(|| {
            let (tx, rx) = oneshot::channel();
            p.flushes.insert(seq, tx);
            rx
        })
    }

    /// Resync bytes the peer acknowledged whose bits wait for its flush
    /// (`resync::settle_acked`).
    pub(crate) fn resync_unsettled_bytes(&self) -> u64 {
        self.resync_claims
            .lock()
            .expect("resync claims")
            .unsettled_bytes()
    }

    /// The flushes waiting for their acknowledgement (tests).
    #[cfg(test)]
    pub(crate) fn awaited_flushes(&self) -> Vec<u64> {
        let p = self.pending.lock().expect("pending");
        p.flushes.keys().copied().collect()
    }

    /// Requests and bytes sent to the peer and not yet acknowledged (replication lag).
    pub(crate) fn in_flight_with_bytes(&self) -> (usize, u64) {
        let p = self.pending.lock().expect("pending");
        (p.writes.len(), p.bytes)
    }

    /// Write `seq` (queued on this session) of `len` bytes was acknowledged to its client.
    pub(crate) fn client_acked(&self, seq: u64, len: u64) {
        let mut p = self.pending.lock().expect("pending");
        let pending = match p.writes.get_mut(&seq) {
            Some(w) => {
                w.client_acked = true;
                true
            }
            None => false,
        };
        p.ledger.client_acked(len, pending);
    }

    /// Client-acknowledged writes the peer has not confirmed as written yet.
    pub(crate) fn unconfirmed(&self) -> Tally {
        self.pending.lock().expect("pending").ledger.unconfirmed
    }

    /// The figure of client-acknowledged writes to report, when it changed since the last
    /// report (marked reported).
    fn report_due(&self) -> Option<Tally> {
        let mut p = self.pending.lock().expect("pending");
        let acked = p.ledger.acked;
        (acked != p.reported).then(|| {
            p.reported = acked;
            acked
        })
    }

    /// The peer acknowledged writes `seq .. seq + count` (sequence numbers we never sent it,
    /// or already acknowledged, are ignored). Only the writes pending in that range are
    /// visited, never the whole range: a peer's `count` may be up to `u32::MAX`, and this runs
    /// under the lock the write path takes for every write.
    fn ack(&self, seq: u64, count: u32, kind: PeerAck) {
        let mut p = self.pending.lock().expect("pending");
        let range = seq..seq.saturating_add(u64::from(count));
        let mut freed = 0;
        // Their activity-log registrations are released after the pending lock.
        let mut written = Vec::new();
        match kind {
            PeerAck::Received => {
                for w in p.writes.range_mut(range).map(|(_, w)| w) {
                    if w.ack == PeerAck::Received
                        && let Some(tx) = w.waiter.take()
                    {
                        let _ = tx.send(());
                    }
                }
            }
            _ => {
                let acked: Vec<u64> = p.writes.range(range).map(|(&s, _)| s).collect();
                for s in acked {
                    let mut w = p.writes.remove(&s).expect("pending write");
                    p.ledger.peer_wrote(w.len, w.client_acked);
                    p.bytes -= w.len;
                    freed += w.cost;
                    if let Some(tx) = w.waiter.take() {
                        let _ = tx.send(());
                    }
                    written.push(w);
                }
            }
        }
        let change = (freed > 0).then(|| p.buffer.acked(freed));
        drop(p);
        drop(written);
        if let Some(change) = change {
            self.room_changed(change);
        }
    }

    pub(crate) fn flush_ack(&self, seq: u64) {
        if let Some(tx) = self.pending.lock().expect("pending").flushes.remove(&seq) {
            let _ = tx.send(());
        }
    }

    /// Closes the session for the write path; returns the unacknowledged ranges and their
    /// activity-log registrations, to be dropped only once the ranges are marked in the
    /// peer's bitmap (until then a crash must still find their extents in the log).
    pub(crate) fn close(&self) -> (Vec<(u64, u64)>, Vec<Arc<AlHold>>) {
        let mut p = self.pending.lock().expect("pending");
        p.closed = true;
        p.flushes.clear();
        let _ = self.closed.send(true);
        p.bytes = 0;
        let congested = p.buffer.congested();
        let (ranges, holds): (Vec<_>, Vec<_>) = std::mem::take(&mut p.writes)
            .into_values()
            .map(|w| ((w.offset, w.len), w.al))
            .unzip();
        drop(p);
        // Writes waiting for room go on (to the bitmap).
        self.room_changed(congested.then_some(Change::Uncongested));
        (ranges, holds.into_iter().flatten().collect())
    }
}

/// Counts an ended session that is still applying what it received, while alive.
pub(crate) struct FinishingApplies<'a>(&'a Resource);

impl Drop for FinishingApplies<'_> {
    fn drop(&mut self) {
        self.0.finishing.send_modify(|n| *n -= 1);
    }
}

impl Resource {
    /// Marks an ended session as applying what it received until the guard is dropped.
    pub(crate) fn finishing_applies(&self) -> FinishingApplies<'_> {
        self.finishing.send_modify(|n| *n += 1);
        FinishingApplies(self)
    }

    /// Waits until no ended session is applying what it received (at most a little longer
    /// than [`FINISH_APPLIES_LIMIT`] and [`STOP_APPLIES_LIMIT`], after which they have given
    /// up anyway).
    pub(crate) async fn applies_finished(&self) {
        let mut rx = self.finishing.subscribe();
        let wait = rx.wait_for(|n| *n == 0);
        let limit = FINISH_APPLIES_LIMIT + STOP_APPLIES_LIMIT + Duration::from_secs(5);
        if tokio::time::timeout(limit, wait).await.is_err() {
            tracing::warn!(resource = %self.name(), "received writes still being applied");
        }
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Link problem: reconnect.
    Lost(String),
    /// Split brain or unrelated data: stay StandAlone until `blockctl connect`.
    StandAlone(String),
    /// `blockctl disconnect`, promotion or shutdown.
    Killed,
}

type ReadHalf = tokio::io::ReadHalf<crate::repl::link::Stream>;

/// The receive side of a session: the link's read half and the bytes read but not yet decoded.
/// (Generic over the reader for tests of the receive loop without TLS.)
struct Rx<R = ReadHalf> {
    io: R,
    buf: BytesMut,
    /// When bytes last arrived (keepalive).
    last: Instant,
}

impl<R: tokio::io::AsyncRead + Unpin> Rx<R> {
    /// The next complete frame already received, if any.
    fn frame(&mut self) -> Result<Option<Bytes>, String> {
        frame::decode(&mut self.buf, MAX_FRAME).map_err(|e| format!("receive: {}", error_chain(&e)))
    }

    /// Reads more bytes (whatever the stream has, into spare room of the buffer).
    async fn fill(&mut self) -> Result<(), String> {
        if self.buf.capacity() - self.buf.len() < (64 << 10) {
            self.buf.reserve(256 << 10);
        }
        let n = self
            .io
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| format!("receive: {}", error_chain(&frame::FrameError::Read(e))))?;
        if n == 0 {
            return Err(if self.buf.is_empty() {
                "peer closed the link".into()
            } else {
                format!("receive: {}", frame::FrameError::Truncated)
            });
        }
        self.last = Instant::now();
        Ok(())
    }

    /// The next message, waiting at most [`KEEPALIVE_TIMEOUT`] for bytes (handshake).
    async fn next_msg(&mut self) -> Result<Message, String> {
        loop {
            if let Some(f) = self.frame()? {
                return decode(f);
            }
            tokio::time::timeout(KEEPALIVE_TIMEOUT, self.fill())
                .await
                .map_err(|_| keepalive_expired())??;
        }
    }
}

fn decode(frame: Bytes) -> Result<Message, String> {
    Message::decode(frame).map_err(|e| format!("malformed message: {e}"))
}

fn keepalive_expired() -> String {
    format!(
        "no traffic for {}s (keepalive timeout)",
        KEEPALIVE_TIMEOUT.as_secs()
    )
}

/// Runs one session with peer `i` until it ends, then does the loss bookkeeping.
pub async fn run_session(res: &Arc<Resource>, i: usize, link: Link) -> SessionEnd {
    let Link {
        peer,
        reader,
        writer,
    } = link;
    let congestion = Arc::downgrade(res);
    let conn = Arc::new(Conn::new(
        res.spec.sndbuf_size,
        Box::new(move |c| {
            if let Some(res) = congestion.upgrade() {
                let what = match c {
                    Change::Congested => "congested",
                    Change::Uncongested => "uncongested",
                };
                res.emit(Some(i), "congestion", what);
            }
        }),
    ));
    // The state report must be the first message: queue it before the write path sees `conn`.
    // A promotion between the report and publishing `conn` makes the report stale: the
    // session then ends at once and the link is set up again (see `Resource::promote`).
    let role_epoch = res.role_epoch.load(std::sync::atomic::Ordering::SeqCst);
    // Before the report: a mark made while it is built counts as made after it.
    let marks_made = res.marks_made.load(std::sync::atomic::Ordering::SeqCst);
    let report = res.state_report(i);
    conn.send(Message::State(report.clone()));
    *res.peers[i].conn.lock().expect("conn") = Some(conn.clone());
    let stale = res.role_epoch.load(std::sync::atomic::Ordering::SeqCst) != role_epoch;
    let mut writer_task = AbortOnDrop(tokio::spawn(writer_loop(writer.into_inner(), conn.clone())));
    tracing::info!(resource = %res.name(), peer = %peer.name, "link up");

    let (io, buf) = reader.into_parts();
    let (resync_failed, mut resync_failure) = tokio::sync::mpsc::unbounded_channel();
    let mut rx = Rx {
        io,
        buf,
        last: Instant::now(),
    };
    let mut session = Session::new(res.clone(), i, conn.clone(), resync_failed);
    session.marks_made = marks_made;
    let end = tokio::select! {
        biased;
        _ = std::future::ready(()), if stale => {
            SessionEnd::Lost("promoted during link setup: redoing the handshake".into())
        }
        end = session.run(&mut rx, report) => end,
        _ = res.peers[i].kill.notified() => SessionEnd::Killed,
        // A resync that cannot go on ends the session: the next handshake redoes it (never
        // SyncSource/SyncTarget forever without a worker).
        Some(why) = resync_failure.recv() => SessionEnd::Lost(why),
        w = &mut writer_task.0 => SessionEnd::Lost(match w {
            Ok(Ok(())) => "writer stopped".into(),
            Ok(Err(e)) => e,
            Err(e) => e.to_string(),
        }),
    };
    if matches!(end, SessionEnd::StandAlone(_)) && !writer_task.0.is_finished() {
        // A refusal (a size or protocol mismatch, a split brain...) right after the handshake
        // may come before the writer sent our state report: let it go out, so the peer
        // refuses for the same reason instead of seeing a lost connection and retrying.
        let _ = tokio::time::timeout(REFUSAL_SEND_LIMIT, conn.queued_sent()).await;
    }
    drop(writer_task);
    // From here on the peer is no Primary this node follows or is in sync with (a handshake
    // with a third node during the teardown must not clear marks the teardown makes).
    res.update_peer(i, |s| s.leaving = true);
    // The checksum resync clears bits of runs it found equal: it must be over before the
    // unacknowledged writes are marked below (`conn.close()`), or a clear could come after
    // the mark of a write to that run and lose it.
    if let Some(task) = session.resync.take() {
        task.stop().await;
    }
    session.end_applies(&peer.name).await;
    res.snapshots
        .boundaries
        .session_ended(session.flush_session);
    // Acknowledged writes of the Primary this node never received (see `repl::lost_writes`).
    let lost = session.hearing.never_received();
    if !lost.is_zero() && res.role() != Role::Primary {
        tracing::warn!(resource = %res.name(), peer = %peer.name, writes = lost.writes,
            bytes = lost.bytes, "the Primary had acknowledged writes this node never received");
        res.update_peer(i, |s| {
            s.known_loss = Some(KnownLoss {
                primary: peer.name.clone(),
                lost,
            })
        });
        res.emit(
            Some(i),
            "lost-acked-writes",
            format!("{} writes, {} bytes", lost.writes, lost.bytes),
        );
    }
    // Writes of the Primary that may not have reached the other peers (`repl::unstable`).
    if !session.unstable.is_empty() && res.role() != Role::Primary {
        res.mark_unstable(i, &session.unstable.ranges()).await;
    }
    // Loss bookkeeping: unacknowledged writes go into the peer's bitmap, and the other peers
    // keep them as unstable until the next generation is announced (`repl::unstable`). Under
    // the numbering lock: every write numbered from here on finds the session gone (and goes
    // to the bitmap), so the floor covers it too.
    let primary_now = res.role() == Role::Primary;
    {
        let order = res.order.lock().expect("order");
        if primary_now {
            res.hold_stable_for_lost_peer(conn.lowest_pending().unwrap_or(order.seq));
        }
        *res.peers[i].conn.lock().expect("conn") = None;
    }
    // A promotion of the peer no longer holds our lock once its session is gone (a hung
    // promoter's lease ends with `blockctl disconnect`; see `repl::promotion_lock`).
    res.promotion_lease_ends(i);
    res.peer_leaving(i);
    let (lost, lost_al) = conn.close();
    let slot = res.peers[i].slot;
    let primary = res.role() == Role::Primary;
    {
        let mut m = res.meta.lock().expect("meta");
        for (o, l) in &lost {
            res.mark_out_of_sync(&mut m, slot, *o, *l);
        }
    }
    // Marked: an eviction of their extents now writes the bits to disk first.
    drop(lost_al);
    if primary {
        // The new generation starts with the next write (see `repl::io_gate`).
        res.peer_lost_while_primary();
    }
    if let Err(e) = res.meta_io(move |m| m.save_bitmap(slot)).await {
        tracing::error!(resource = %res.name(), "cannot persist the bitmap: {e}");
    }
    res.update_peer(i, |s| {
        s.conn = match end {
            SessionEnd::StandAlone(_) => ConnState::StandAlone,
            _ => ConnState::Connecting,
        };
        s.repl = ReplState::Off;
        s.role = Role::Unknown;
        s.disk = DiskState::Unknown;
    });
    tracing::info!(resource = %res.name(), peer = %peer.name, unacked = lost.len(), "link down");
    end
}

/// Sends whatever frames accumulated in the outbox, one TLS write per batch; pings after
/// [`PING_INTERVAL`] without sending anything.
async fn writer_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut w: W,
    conn: Arc<Conn>,
) -> Result<(), String> {
    let mut spare = Frames::new();
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let mut sent_since_tick = false;
    loop {
        let stable = conn.stable_seen();
        if conn.out.take(&mut spare) {
            if let Some(below) = conn.stable_due(stable) {
                spare.push(&Message::Stable { below });
            }
            conn.sent.fetch_add(spare.len() as u64, Ordering::Relaxed);
            // The peer hears of acknowledged writes before the rest of the backlog.
            spare
                .write_to(&mut w, || {
                    let t = conn.report_due()?;
                    let report = encode_frame(&Message::ClientAcked(t));
                    conn.sent.fetch_add(report.len() as u64, Ordering::Relaxed);
                    Some(report)
                })
                .await
                .map_err(|e| format!("send: {e}"))?;
            w.flush().await.map_err(|e| format!("send: {e}"))?;
            spare.clear();
            sent_since_tick = true;
            continue;
        }
        conn.writer_idle.send_modify(|n| *n = n.wrapping_add(1));
        tokio::select! {
            _ = conn.out.wake.notified() => {
                // Let the tasks that are ready now (more requests being queued) run first, so
                // one write takes them all: batching without a timer.
                tokio::task::yield_now().await;
            }
            _ = tick.tick() => {
                if let Some(t) = conn.report_due() {
                    conn.send(Message::ClientAcked(t));
                }
                if let Some(below) = conn.stable_due(conn.stable_seen()) {
                    conn.send(Message::Stable { below });
                }
                if !std::mem::take(&mut sent_since_tick) {
                    conn.send(Message::Ping);
                }
            }
        }
    }
}

/// A replicated request of the peer, to be applied here.
pub(crate) enum Op {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        trim: bool,
        fua: bool,
    },
    Flush,
    Resync {
        offset: u64,
        len: u32,
        zero: bool,
        payload: Bytes,
    },
    ResyncDone,
    /// Hash a run and compare it with the peer's digest (verify, checksum resync).
    Checksum {
        offset: u64,
        len: u32,
        block_size: u32,
        purpose: ChecksumPurpose,
        digest: checksum::RunDigest,
    },
}

/// What an applied request leaves to do on the session (acknowledgements, state).
pub(crate) enum Done {
    Written,
    Flushed,
    Resynced {
        offset: u64,
        len: u32,
    },
    /// `up_to_date`: no other source still resyncs this node.
    ResyncFinished {
        up_to_date: bool,
    },
    Checksummed {
        offset: u64,
        len: u32,
        purpose: ChecksumPurpose,
        answer: PeerAnswer,
    },
}

pub(crate) type OpFuture = Pin<Box<dyn Future<Output = Result<Done, String>> + Send>>;

/// The bytes an op changes on the replica (open snapshots preserve them first).
fn changed_range(op: &Op) -> Option<(u64, u64)> {
    match op {
        Op::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
        Op::Zero { offset, len, .. } => Some((*offset, *len)),
        Op::Resync { offset, len, .. } => Some((*offset, u64::from(*len))),
        Op::Flush | Op::ResyncDone | Op::Checksum { .. } => None,
    }
}

/// What a received request counts for in the session's backlog (`repl::backlog`): the payload
/// it holds, or for a checksum request the run it reads into memory, plus its bookkeeping.
fn backlog_cost(op: &Op) -> u64 {
    let held = match op {
        Op::Write { data, .. } => data.len() as u64,
        Op::Resync { payload, .. } => payload.len() as u64,
        Op::Checksum { len, .. } => u64::from(*len),
        Op::Zero { .. } | Op::Flush | Op::ResyncDone => 0,
    };
    held + REQUEST_OVERHEAD
}

/// The I/O of one request on this node's disk.
pub(crate) fn execute(res: Arc<Resource>, i: usize, op: Op) -> OpFuture {
    Box::pin(async move {
        let mut change = None;
        if let Some((offset, len)) = changed_range(&op) {
            // A malformed request of the peer fails here, before anything is registered for it.
            res.check_range(offset, len)
                .map_err(|e| res.apply_failed("replicated request refused", &e))?;
            let g = res
                .snapshots
                .set
                .change(&res.store.current(), offset, len)
                .await;
            res.snapshots_invalidated(&g.invalidated);
            change = Some(g);
        }
        let _change = change;
        match op {
            Op::Write { offset, data, fua } => {
                for (at, n) in res.al_parts(offset, data.len() as u64) {
                    let _al = res.al_begin_for_peer(i, at, n).await?;
                    let part = data.slice((at - offset) as usize..(at - offset + n) as usize);
                    res.store
                        .write(at, part, fua)
                        .await
                        .map_err(|e| res.apply_failed("local write failed", &e))?;
                    res.note_written(at, n);
                }
                Ok(Done::Written)
            }
            Op::Zero {
                offset,
                len,
                trim,
                fua,
            } => {
                for (at, n) in res.al_parts(offset, len) {
                    let _al = res.al_begin_for_peer(i, at, n).await?;
                    res.store
                        .write_zeroes(at, n, trim, fua)
                        .await
                        .map_err(|e| res.apply_failed("local zeroing failed", &e))?;
                    res.note_written(at, n);
                }
                Ok(Done::Written)
            }
            Op::Flush => {
                res.flush_for_peer().await?;
                Ok(Done::Flushed)
            }
            Op::Resync {
                offset,
                len,
                zero,
                payload,
            } => {
                let r = if zero {
                    res.store
                        .write_zeroes(offset, u64::from(len), true, false)
                        .await
                } else {
                    res.store.write(offset, payload, false).await
                };
                r.map_err(|e| res.apply_failed("resync write failed", &e))?;
                res.note_written(offset, u64::from(len));
                Ok(Done::Resynced { offset, len })
            }
            Op::ResyncDone => {
                res.flush_for_peer().await?;
                let slot = res.peers[i].slot;
                // Another source still resyncing this node (two handshakes made it a target at
                // once): this one's end says nothing of the blocks the other still sends. The
                // disk becomes consistent when the last of them ends.
                let up_to_date = !res
                    .state
                    .lock()
                    .expect("state")
                    .peers
                    .iter()
                    .enumerate()
                    .any(|(j, p)| j != i && p.repl.is_sync_target());
                res.meta_io(move |m| {
                    m.bitmaps[slot].clear_all();
                    m.save_bitmap(slot)?;
                    if up_to_date {
                        m.sb.flags |= flags::CONSISTENT | flags::WAS_UP_TO_DATE;
                    }
                    m.save_sb()
                })
                .await
                .map_err(|e| format!("cannot persist resync end: {e}"))?;
                // Our data is now the source's: a crash as Primary no longer counts.
                res.crashed_primary_settled().await;
                Ok(Done::ResyncFinished { up_to_date })
            }
            Op::Checksum {
                offset,
                len,
                block_size,
                purpose,
                digest,
            } => {
                let data = res
                    .store
                    .read(offset, len as usize)
                    .await
                    .map_err(|e| format!("checksum read failed: {}", error_chain(&e)))?
                    .freeze();
                let answer = tokio::task::spawn_blocking(move || {
                    if checksum::run_digest(&data) == digest {
                        PeerAnswer::Equal
                    } else {
                        PeerAnswer::Blocks(checksum::block_digests(&data, block_size as usize))
                    }
                })
                .await
                .map_err(|e| format!("checksum task failed: {e}"))?;
                Ok(Done::Checksummed {
                    offset,
                    len,
                    purpose,
                    answer,
                })
            }
        }
    })
}

struct Session {
    res: Arc<Resource>,
    i: usize,
    conn: Arc<Conn>,
    /// Replication messages that arrived during the handshake (applied after it).
    stash: VecDeque<Message>,
    /// The peer's requests: which may start, which wait.
    order: ApplyOrder<Op>,
    /// The bytes of the requests in `order` (running and waiting): the receive loop stops
    /// reading above its bound.
    backlog: Backlog,
    /// Requests the store did not complete at once: `(seq, outcome)`.
    ops: tokio::task::JoinSet<(u64, Result<Done, String>)>,
    /// The bytes each request in `ops` changes (`changed_range`), by sequence number.
    op_ranges: HashMap<u64, (u64, u64)>,
    /// Acknowledgements not sent yet (sent per batch of received frames).
    recv_acks: Vec<u64>,
    write_acks: Vec<u64>,
    other_acks: Vec<Message>,
    resync: Option<AbortOnDrop<()>>,
    /// Where the resync source reports a local failure that ends the session.
    resync_failed: tokio::sync::mpsc::UnboundedSender<String>,
    /// What the peer (as Primary) reported as acknowledged, and the writes that arrived.
    hearing: Hearing,
    /// The peer's (a Primary's) writes received and not yet announced as written on every
    /// peer (`repl::unstable`).
    unstable: UnstableWrites,
    /// Write acknowledgements arrived in this batch (we are Primary): announce what is stable.
    written_acks: bool,
    /// This session's key for `--consistent` flush boundaries (its flush numbers are its own).
    flush_session: u64,
    /// Set when the session must end StandAlone rather than reconnect (two primaries).
    stand_alone: Option<String>,
    /// `Resource::marks_made` when our state report was built.
    marks_made: u64,
}

/// Aborts a task when dropped (a session's helpers never outlive it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Aborts the task and waits until it no longer runs: abort only takes effect at the
    /// task's next await, and it may be in the middle of a poll on another worker. Whatever
    /// it does is done when this returns.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Appends `RecvAck`/`WriteAck` frames covering `seqs` (sorted here), one per run.
fn push_ack_runs(dst: &mut Frames, seqs: &mut [u64], written: bool) {
    seqs.sort_unstable();
    let mut k = 0;
    while k < seqs.len() {
        let first = seqs[k];
        let mut count = 1u32;
        while k + (count as usize) < seqs.len()
            && seqs[k + count as usize] == first + u64::from(count)
            && count < u32::MAX
        {
            count += 1;
        }
        k += count as usize;
        let msg = if written {
            Message::WriteAck { seq: first, count }
        } else {
            Message::RecvAck { seq: first, count }
        };
        dst.push(&msg);
    }
}

impl Session {
    /// A session with peer `i` on `conn`, before its handshake.
    fn new(
        res: Arc<Resource>,
        i: usize,
        conn: Arc<Conn>,
        resync_failed: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Session {
        let flush_session = res.snapshots.boundaries.session_started();
        Session {
            res,
            i,
            conn,
            stash: VecDeque::new(),
            order: ApplyOrder::default(),
            backlog: Backlog::new(RECEIVE_BACKLOG_MAX),
            ops: tokio::task::JoinSet::new(),
            op_ranges: HashMap::new(),
            recv_acks: Vec::new(),
            write_acks: Vec::new(),
            other_acks: Vec::new(),
            resync: None,
            resync_failed,
            hearing: Hearing::default(),
            unstable: UnstableWrites::default(),
            written_acks: false,
            flush_session,
            stand_alone: None,
            marks_made: 0,
        }
    }

    /// Reads the next handshake message, stashing replication traffic for later.
    async fn next_handshake(&mut self, reader: &mut Rx) -> Result<Message, String> {
        loop {
            let m = reader.next_msg().await?;
            match m {
                Message::Data { .. }
                | Message::Zero { .. }
                | Message::Flush { .. }
                | Message::NewUuid(_)
                | Message::ViewRequest { .. }
                | Message::ViewReply { .. }
                | Message::PromoteEnd { .. }
                | Message::Stable { .. }
                | Message::PeerState { .. } => self.stash.push_back(m),
                Message::Ping => self.conn.send(Message::PingAck),
                Message::PingAck => {}
                Message::ClientAcked(t) => self.hearing.report(t),
                other => return Ok(other),
            }
        }
    }

    async fn run(&mut self, reader: &mut Rx, mine: crate::repl::wire::StateReport) -> SessionEnd {
        match self.handshake(reader, mine).await {
            Ok(None) => {}
            Ok(Some(end)) => return end,
            Err(e) => return SessionEnd::Lost(e),
        }
        while let Some(m) = self.stash.pop_front() {
            if let Err(e) = self.handle(m).await {
                return self.ended(e);
            }
        }
        match self.receive(reader).await {
            Ok(never) => match never {},
            Err(e) => self.ended(e),
        }
    }

    /// How the session ends after the error `e` of its receive side.
    fn ended(&mut self, e: String) -> SessionEnd {
        match self.stand_alone.take() {
            Some(why) => SessionEnd::StandAlone(why),
            None => SessionEnd::Lost(e),
        }
    }

    /// The peer acts as Primary while this node is Primary (both were promoted at once): the
    /// session ends StandAlone instead of applying the peer's generation or role over ours
    /// (reconnecting would only meet the handshake's two-primaries refusal again).
    fn two_primaries(&mut self, what: &str) -> String {
        let why = format!("{}: {what}", RoleConflict::TwoPrimaries);
        tracing::warn!(resource = %self.res.name(), peer = %self.res.peers[self.i].node.name,
            "role conflict: {why}");
        self.res.emit(Some(self.i), "role-conflict", why.clone());
        self.stand_alone = Some(why.clone());
        why
    }

    /// The receive loop: handles every frame already received, takes more bytes while they
    /// are there without waiting, and sends the batch's acknowledgements before it waits for
    /// more bytes, for a request the store did not complete at once, or for the keepalive.
    /// While the requests received and not applied exceed their bound (`repl::backlog`), it
    /// reads nothing and waits for them only: the peer's writes wait in its send buffer. A
    /// pause in which no request completed for `STALL_LIMIT` reads on (a request may wait for
    /// a frame still unread).
    async fn receive<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        rx: &mut Rx<R>,
    ) -> Result<std::convert::Infallible, String> {
        let mut tick = tokio::time::interval(PING_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut handled = 0usize;
        loop {
            while let Some(f) = rx.frame()? {
                self.handle(decode(f)?).await?;
                handled += 1;
                if handled >= ACK_BATCH {
                    self.send_acks();
                    handled = 0;
                }
            }
            // Let other tasks of this worker run between batches of a long stream.
            tokio::task::consume_budget().await;
            // A request waiting for activity-log room may wait for the peer's
            // acknowledgements behind the unread bytes, and every request in the log's slow
            // path waits behind it: while one waits, those do not count as running.
            let blocked = match self.res.al_room_waiters.load(Ordering::Acquire) {
                0 => 0,
                _ => self.res.peers[self.i].al_slow_path.load(Ordering::Acquire),
            };
            let can_complete = self.ops.len() > blocked;
            match self.backlog.step(can_complete, Instant::now()) {
                Step::Read => {}
                // The peer's frames (its pings too) waited in the socket while we did not read:
                // that silence is no sign of a dead link. (The peer sees ours: our writer goes
                // on sending acknowledgements, and pings when idle.)
                Step::Resume => rx.last = Instant::now(),
                // A running request may wait for what is behind the unread bytes (a write
                // waiting for activity-log room that the peer's acknowledgements free): read
                // on past the bound until one completes (`repl::backlog`).
                Step::Stalled => {
                    tracing::info!(resource = %self.res.name(),
                        peer = %self.res.peers[self.i].node.name,
                        running = self.ops.len(), backlog = self.backlog.bytes(),
                        "receive backlog: no request completed for {STALL_LIMIT:?} while not \
                         reading; reading past the bound until one does");
                    rx.last = Instant::now();
                }
                Step::Stuck => {
                    return Err(format!(
                        "receive backlog: no request completed for {} s while not reading \
                         (the disk may be hung); ending the session",
                        crate::repl::backlog::STUCK_LIMIT.as_secs()
                    ));
                }
                Step::Pause => {
                    self.send_acks();
                    handled = 0;
                    let stall = self
                        .backlog
                        .stall_deadline()
                        .map(tokio::time::Instant::from_std);
                    tokio::select! {
                        Some(done) = self.ops.join_next() => {
                            self.op_done(done).await?;
                            while let Some(done) = self.ops.try_join_next() {
                                self.op_done(done).await?;
                            }
                        }
                        () = async {
                            match stall {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => std::future::pending().await,
                            }
                        } => {}
                        // Requests parking for activity-log room change what counts as running.
                        _ = tick.tick() => {}
                    }
                    continue;
                }
            }
            let more = {
                let fill = rx.fill();
                tokio::pin!(fill);
                std::future::poll_fn(|cx| Poll::Ready(fill.as_mut().poll(cx))).await
            };
            if let Poll::Ready(r) = more {
                r?;
                continue;
            }
            self.send_acks();
            handled = 0;
            tokio::select! {
                r = rx.fill() => r?,
                Some(done) = self.ops.join_next(), if !self.ops.is_empty() => {
                    self.op_done(done).await?;
                    while let Some(done) = self.ops.try_join_next() {
                        self.op_done(done).await?;
                    }
                }
                _ = tick.tick() => {
                    if rx.last.elapsed() >= KEEPALIVE_TIMEOUT {
                        return Err(keepalive_expired());
                    }
                }
            }
        }
    }

    /// The session ended: finishes every request it received, in the order
    /// `repl::apply_order` allows, for at most [`FINISH_APPLIES_LIMIT`]. Under protocols A and
    /// B the Primary acknowledges a write to its client once queued / received here, so a write
    /// dropped now would be an acknowledged write lost if that Primary is gone. Requests not
    /// applied (time limit, or a failed apply) are logged and the waiting ones marked out of
    /// sync for the peer.
    async fn finish_applies(&mut self, peer: &str) {
        if self.order.is_idle() {
            return;
        }
        let res = self.res.clone();
        let (running, waiting) = (self.order.running(), self.order.waiting());
        tracing::info!(resource = %res.name(), %peer, running, waiting,
            "link down: applying the requests received from the peer first");
        let started = Instant::now();
        let finished = tokio::time::timeout(FINISH_APPLIES_LIMIT, async {
            while let Some(done) = self.ops.join_next().await {
                self.op_done(done).await?;
            }
            Ok::<(), String>(())
        })
        .await;
        let why = match finished {
            Ok(Ok(())) if self.order.is_idle() => {
                tracing::info!(resource = %res.name(), %peer, requests = running + waiting,
                    secs = started.elapsed().as_secs_f64(), "received requests applied");
                return;
            }
            Ok(Ok(())) => "requests left waiting with none running".to_string(),
            Ok(Err(e)) => e,
            Err(_) => format!("not done after {} s", FINISH_APPLIES_LIMIT.as_secs()),
        };
        let slot = res.peers[self.i].slot;
        let left = self.order.take_waiting();
        let (running, waiting) = (self.order.running(), left.len());
        {
            let mut m = res.meta.lock().expect("meta");
            for r in &left {
                if let Some((o, l)) = changed_range(&r.op) {
                    res.mark_out_of_sync(&mut m, slot, o, l);
                }
            }
        }
        tracing::error!(resource = %res.name(), %peer, running, waiting,
            "gave up applying the requests received before the link went down ({why}): \
             writes the peer may have acknowledged to its clients are missing on this node");
        res.emit(
            Some(self.i),
            "error",
            format!("received writes not applied: {running} running, {waiting} waiting ({why})"),
        );
    }

    /// The session ended: under A and B the Primary may have acknowledged what this node
    /// received, so it is applied before the link is reported down (`finish_applies`); under
    /// every protocol the requests running on the disk are waited for (`stop_applies`).
    /// Promotion waits for both (`Resource::applies_finished`): a write of the lost Primary
    /// landing after it would overwrite the new Primary's.
    async fn end_applies(&mut self, peer: &str) {
        let res = self.res.clone();
        let acked_early = res.peers[self.i].protocol.peer_ack() != PeerAck::Written;
        let _finishing = (acked_early || !self.ops.is_empty()).then(|| res.finishing_applies());
        if acked_early {
            self.finish_applies(peer).await;
        }
        self.stop_applies(STOP_APPLIES_LIMIT).await;
    }

    /// The session is over: waits, at most `limit`, for the requests running on the local disk
    /// (the waiting ones are not started). Aborting one instead would drop its future in the
    /// middle of its I/O: the engine write goes on (`store::in_flight`) while its activity-log
    /// hold is given back and the peer marks the range for a resync, so it could land after
    /// the next session resynced the range, or after a promotion let new writes at it, over
    /// newer data. A request still running after `limit` counts as a disk failure
    /// (`on-io-error`: detach; pass-on marks its range out of sync for every peer). What
    /// completes is booked as usual (its acknowledgement is never sent: the peer marks it).
    async fn stop_applies(&mut self, limit: Duration) {
        let drained = tokio::time::timeout(limit, async {
            while let Some(joined) = self.ops.join_next().await {
                if let Ok((seq, done)) = joined {
                    self.op_ranges.remove(&seq);
                    // A failure already went through `on-io-error` where it happened.
                    if let Ok(done) = done {
                        self.complete(seq, done);
                    }
                }
            }
        })
        .await;
        if drained.is_ok() {
            return;
        }
        let stuck = self.ops.len();
        self.ops.abort_all();
        let ranges: Vec<(u64, u64)> = self.op_ranges.drain().map(|(_, r)| r).collect();
        let why = format!(
            "{stuck} replicated requests still running on the local disk {} s after the \
             session ended",
            limit.as_secs()
        );
        self.res.applies_stuck(&why, &ranges).await;
    }

    /// Sends the acknowledgements gathered so far (one outbox append for all).
    fn send_acks(&mut self) {
        if std::mem::take(&mut self.written_acks) {
            self.res.announce_stable();
        }
        if self.recv_acks.is_empty() && self.write_acks.is_empty() && self.other_acks.is_empty() {
            return;
        }
        let (recv, write, other) = (
            &mut self.recv_acks,
            &mut self.write_acks,
            &mut self.other_acks,
        );
        self.conn.out.push(|b| {
            push_ack_runs(b, recv, false);
            push_ack_runs(b, write, true);
            for m in other.iter() {
                b.push(m);
            }
        });
        recv.clear();
        write.clear();
        other.clear();
    }

    /// A request of the peer arrived: start it if its order allows.
    async fn arrive(&mut self, seq: u64, after: u64, op: Op) -> Result<(), String> {
        self.backlog.arrived(seq, backlog_cost(&op));
        match self
            .order
            .arrive(Ordered { seq, after, op })
            .map_err(|e| e.to_string())?
        {
            Some(r) => self.start(r).await,
            None => Ok(()),
        }
    }

    /// Writes `data` at once on this task, after open snapshots preserved what it overwrites;
    /// `Ok(false)` when that cannot be done without waiting (its activity-log extent cold or the
    /// metadata busy, a snapshot being taken, old contents not cached) or the range is bad:
    /// run it through `execute`.
    fn apply_inline(&self, offset: u64, data: &Bytes) -> Result<bool, String> {
        let len = data.len() as u64;
        if self.res.check_range(offset, len).is_err() {
            return Ok(false); // refused through `execute`
        }
        let Some(_al) = self.res.al_begin_hot(offset, len) else {
            return Ok(false);
        };
        let store = self.res.store.current();
        let change = match self.res.snapshots.set.try_change_now(&store, offset, len) {
            Ok(change) => change,
            Err(not_now) => {
                self.res.snapshots_invalidated(&not_now.invalidated);
                return Ok(false);
            }
        };
        self.res.snapshots_invalidated(&change.invalidated);
        self.res
            .store
            .write_blocking(offset, data, false)
            .map_err(|e| self.res.apply_failed("local write failed", &e))?;
        self.res.note_written(offset, len);
        Ok(true)
    }

    /// Starts requests: each runs on this task when the store completes it at once (the usual
    /// case for cached writes), else on its own task; completing one may release others.
    async fn start(&mut self, first: Ordered<Op>) -> Result<(), String> {
        let mut todo = vec![first];
        while let Some(r) = todo.pop() {
            let seq = r.seq;
            if let Op::Write {
                offset,
                data,
                fua: false,
            } = &r.op
                && data.len() <= APPLY_INLINE_MAX
                && self.apply_inline(*offset, data)?
            {
                self.complete(seq, Done::Written);
                self.order.done(seq, &mut todo);
                continue;
            }
            let range = changed_range(&r.op);
            let mut fut = execute(self.res.clone(), self.i, r.op);
            match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
                Poll::Ready(done) => {
                    self.complete(seq, done?);
                    self.order.done(seq, &mut todo);
                }
                Poll::Pending => {
                    if let Some(range) = range {
                        self.op_ranges.insert(seq, range);
                    }
                    self.ops.spawn(async move { (seq, fut.await) });
                }
            }
        }
        Ok(())
    }

    async fn op_done(
        &mut self,
        joined: Result<(u64, Result<Done, String>), tokio::task::JoinError>,
    ) -> Result<(), String> {
        let (seq, done) = joined.map_err(|e| format!("apply task failed: {e}"))?;
        // A running request completed: a paused receive loop is not stalled.
        self.backlog.completed(Instant::now());
        self.op_ranges.remove(&seq);
        self.complete(seq, done?);
        let mut released = Vec::new();
        self.order.done(seq, &mut released);
        for r in released {
            self.start(r).await?;
        }
        Ok(())
    }

    /// Bookkeeping of an applied request (acknowledgements are gathered for the batch).
    fn complete(&mut self, seq: u64, done: Done) {
        self.backlog.applied(seq);
        let res = &self.res;
        let i = self.i;
        match done {
            Done::Written => self.write_acks.push(seq),
            Done::Flushed => {
                self.res
                    .snapshots
                    .boundaries
                    .flush_applied(self.flush_session, seq);
                self.other_acks.push(Message::FlushAck { seq });
            }
            Done::Resynced { offset, len } => {
                // Both copies now agree on this range: a later handshake must not bring it
                // back through the bitmap exchange (that would restart, not resume, a resync).
                let slot = res.peers[i].slot;
                res.meta.lock().expect("meta").bitmaps[slot].clear_range(offset, u64::from(len));
                self.other_acks.push(Message::ResyncAck { offset, len });
                res.note_resync_received(u64::from(len));
            }
            Done::Checksummed {
                offset,
                len,
                purpose,
                answer,
            } => {
                if purpose == ChecksumPurpose::Resync && answer == PeerAnswer::Equal {
                    // Equal on both sides: in sync (as if the source had sent it).
                    let slot = res.peers[i].slot;
                    res.meta.lock().expect("meta").bitmaps[slot]
                        .clear_range(offset, u64::from(len));
                    res.note_resync_received(u64::from(len));
                }
                self.other_acks.push(Message::ChecksumReply {
                    offset,
                    len,
                    purpose,
                    answer,
                });
            }
            Done::ResyncFinished { up_to_date } => {
                if up_to_date {
                    res.set_disk(DiskState::UpToDate);
                }
                res.update_peer(i, |s| {
                    s.repl = ReplState::Established;
                    s.resync_done = s.resync_total;
                });
                res.emit(
                    Some(i),
                    "resync-done",
                    if up_to_date {
                        "target"
                    } else {
                        "target, another resync toward this node still running"
                    },
                );
                // A resync with another node that waited for this one (Paused*) has nothing
                // to wait for now: redo its handshake, which decides afresh.
                for (j, p) in res.peers.iter().enumerate() {
                    let paused = matches!(
                        res.state.lock().expect("state").peers[j].repl,
                        ReplState::PausedSyncS | ReplState::PausedSyncT
                    );
                    if j != i && paused {
                        p.kill.notify_one();
                    }
                }
            }
        }
    }

    async fn handshake(
        &mut self,
        reader: &mut Rx,
        mine: crate::repl::wire::StateReport,
    ) -> Result<Option<SessionEnd>, String> {
        let res = self.res.clone();
        let i = self.i;
        let theirs = match self.next_handshake(reader).await? {
            Message::State(r) => r,
            other => return Err(format!("expected state, got {}", other.name())),
        };
        if let Some(why) = incompatible_reports(&mine, &theirs) {
            return Ok(Some(SessionEnd::StandAlone(why)));
        }
        let out = handshake(&mine.side, &theirs.side, &res.spec.split_brain);
        if mine.side.discard_my_data {
            // `connect --discard-my-data` is for the next handshake only, like DRBD's: a later
            // split brain must be detected again, not silently resolved against this node.
            res.update_peer(i, |s| s.discard_my_data = false);
        }
        tracing::info!(resource = %res.name(), peer = %res.peers[i].node.name,
            outcome = ?out.decision.outcome, rule = ?out.decision.rule,
            ours = %mine.side.view.ids.current, theirs = %theirs.side.view.ids.current,
            "handshake");
        res.update_peer(i, |s| {
            s.role = theirs.side.view.role;
            s.disk = theirs.side.view.disk;
        });
        if theirs.side.view.role == Role::Primary {
            res.promotion_lease_ends(i);
        }
        let slot = res.peers[i].slot;
        let peer_id = res.peers[i].node.id;
        let mut enter = ReplState::Established;
        // The bitmap is untrusted (full sync, crashed primary): checksum resync with `csums = auto`.
        let mut untrusted = mine.side.view.crashed_primary || theirs.side.view.crashed_primary;
        let becomes_target = out.commands.contains(&Command::AdoptSyncUuid);
        if becomes_target {
            // One resync toward this node at a time. Our report said no other session was a
            // target, but one may have become one since (two handshakes at once): check and
            // claim under one lock, else end this session; the next report says so and both
            // sides refuse cleanly (`sync_decision::Refusal::TargetOfAnother`).
            let mut st = res.state.lock().expect("state");
            let other = st
                .peers
                .iter()
                .enumerate()
                .any(|(j, p)| j != i && p.repl.is_sync_target());
            if other {
                return Ok(Some(SessionEnd::Lost(
                    "became the sync target of another node during this handshake: retrying".into(),
                )));
            }
            st.peers[i].repl = ReplState::WfBitmapT;
        }
        if becomes_target && res.role() == Role::Primary && res.quorum.report() == Some(false) {
            // The majority went on without us: step down and take its data.
            res.step_down("without quorum, and the peer's data is newer")
                .await;
        }
        if let Some(r) = out.split_brain.filter(|r| r.verdict != Verdict::Disconnect) {
            let what = format!("{:?} {}", out.decision.rule, victim::describe(&r));
            tracing::warn!(resource = %res.name(), peer = %res.peers[i].node.name,
                "split brain detected: {what}");
            res.emit(Some(i), "split-brain", what);
        }
        let mut save_divergent = false;
        let mut kept_repair_marks = false;
        for cmd in out.commands {
            match cmd {
                // After the bitmap exchange: the combined bitmap is what the resync rewrites.
                Command::SaveDivergentBlocks => save_divergent = true,
                Command::SetAllBits => {
                    untrusted = true;
                    res.meta.lock().expect("meta").bitmaps[slot].set_all()
                }
                Command::CopyBitmapSlot(n) => {
                    let mut m = res.meta.lock().expect("meta");
                    if let Some(from) = res.peers.iter().find(|p| p.node.id == n).map(|p| p.slot) {
                        let src = m.bitmaps[from].clone();
                        m.bitmaps[slot].copy_from(&src).map_err(|e| e.to_string())?;
                    } else {
                        m.bitmaps[slot].set_all();
                    }
                }
                Command::ClearBitmap => {
                    let mut m = res.meta.lock().expect("meta");
                    // Marks are made under this lock: none made since our report is exact.
                    let obsolete_only = out.decision.outcome == SyncOutcome::NoSync;
                    let none_made_since_report =
                        res.marks_made.load(Ordering::SeqCst) == self.marks_made;
                    kept_repair_marks |=
                        m.clear_for_handshake(slot, obsolete_only, none_made_since_report);
                }
                Command::ExchangeBitmaps => self.exchange_bitmaps(reader).await?,
                Command::PinBitmapUuid => {
                    res.meta_io(move |m| {
                        m.sb.generations.pin_bitmap(peer_id);
                        m.save_bitmap(slot)?;
                        m.save_sb()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                }
                Command::SendSyncUuid(u) => self.conn.send(Message::SyncUuid(u)),
                Command::AdoptSyncUuid => {
                    if save_divergent {
                        // No split brain: a Primary that lost quorum and is behind the majority
                        // saves the writes it never acknowledged (`repl::handshake`).
                        let by = out
                            .split_brain
                            .map_or("lost-quorum", |r| victim::resolved_by_name(r.by));
                        victim::save_divergent_blocks(&res, i, by).await?;
                    }
                    let u = match self.next_handshake(reader).await? {
                        Message::SyncUuid(u) => u,
                        other => return Err(format!("expected sync-uuid, got {}", other.name())),
                    };
                    res.meta_io(move |m| {
                        m.sb.flags &= !flags::CONSISTENT;
                        m.sb.generations.adopt_sync_source(peer_id, u);
                        m.save_sb()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    res.set_disk(DiskState::Inconsistent);
                }
                Command::Enter(s) => enter = s,
                Command::Disconnect(reason) => {
                    let why = match reason {
                        DisconnectReason::SplitBrain(k) => {
                            let how = out.split_brain.map_or_else(String::new, |r| {
                                format!(", {}", victim::describe(&r))
                            });
                            res.emit(Some(i), "split-brain", format!("{k:?}{how}"));
                            format!(
                                "split brain detected ({k:?}{how}): connect the victim with --discard-my-data"
                            )
                        }
                        DisconnectReason::UnrelatedData => {
                            res.emit(Some(i), "error", "unrelated-data");
                            "unrelated data: no common generation (another cluster or a wiped node)"
                                .to_string()
                        }
                        DisconnectReason::Refused(r) => {
                            let why = format!(
                                "{r} (ours {}, peer's {})",
                                mine.side.view.disk, theirs.side.view.disk
                            );
                            tracing::warn!(resource = %res.name(), peer = %res.peers[i].node.name,
                                rule = ?out.decision.rule, "resync refused: {why}");
                            res.emit(Some(i), "resync-refused", why.clone());
                            why
                        }
                        DisconnectReason::RoleConflict(c) => {
                            let why = format!(
                                "{c} (rule {:?}, ours {}, peer's {})",
                                out.decision.rule,
                                mine.side.view.ids.current,
                                theirs.side.view.ids.current
                            );
                            tracing::warn!(resource = %res.name(), peer = %res.peers[i].node.name,
                                "role conflict: {why}");
                            res.emit(Some(i), "role-conflict", why.clone());
                            why
                        }
                    };
                    // The peer reaches the same verdict from our state report: let it read
                    // it before the link closes (closing with unread bytes resets the
                    // connection, which can discard what we sent). Both sides drain until
                    // the other closes, at most a moment.
                    let _ = tokio::time::timeout(LINGER_BEFORE_STANDALONE, async {
                        while reader.fill().await.is_ok() {
                            reader.buf.clear();
                        }
                    })
                    .await;
                    if let DisconnectReason::Refused(r) = reason
                        && r.retried()
                    {
                        // Retried: it changes once a side has usable data (a resync from a
                        // third node ends, a disk is attached and resynced).
                        tokio::time::sleep(REFUSED_RETRY).await;
                        return Ok(Some(SessionEnd::Lost(why)));
                    }
                    return Ok(Some(SessionEnd::StandAlone(why)));
                }
            }
        }
        if enter == ReplState::Established {
            // Same data on both sides: consistent data is now known to be the newest (not
            // from a Diskless Secondary, which has no data to compare with).
            let peer_knows =
                theirs.side.view.disk.has_disk() || theirs.side.view.role == Role::Primary;
            if peer_knows && res.state.lock().expect("state").disk.is_consistent() {
                let r = res
                    .meta_io(|m| {
                        m.sb.flags |= flags::WAS_UP_TO_DATE;
                        m.save_sb()
                    })
                    .await;
                if let Err(e) = r {
                    return Err(e.to_string());
                }
                res.set_disk(DiskState::UpToDate);
            }
            res.crashed_primary_settled().await;
        }
        let dirty_after = res.meta.lock().expect("meta").bitmaps[slot].count_dirty_bytes();
        res.update_peer(i, |s| {
            s.conn = ConnState::Connected;
            s.leaving = false;
            s.repl = enter;
            s.last_error = None;
            s.resync_retry_at = None;
            // Whatever a Primary lost before reaches this node by the resync now.
            s.known_loss = None;
            s.marks_wait = out.marks_wait || kept_repair_marks;
            if enter == ReplState::Established {
                s.disk = if s.disk.is_consistent() {
                    DiskState::UpToDate
                } else {
                    s.disk
                };
            }
            if matches!(enter, ReplState::SyncSource | ReplState::PausedSyncS) {
                s.disk = DiskState::Inconsistent;
            }
            if matches!(enter, ReplState::SyncTarget | ReplState::PausedSyncT) {
                s.resync_total = dirty_after;
                s.resync_done = 0;
                s.resync_started = Some(Instant::now());
            }
        });
        if out.decision.rule == SyncRule::NoDiskSelf && res.role() == Role::Primary {
            res.diskless_primary_reconnected(i).await;
        }
        res.broadcast_state();
        if enter == ReplState::SyncSource {
            let (res2, conn) = (res.clone(), self.conn.clone());
            let failed = self.resync_failed.clone();
            let (failed_sessions, not_before) = {
                let st = res.state.lock().expect("state");
                let p = &st.peers[i];
                (p.resync_failed_sessions, p.resync_not_before)
            };
            self.resync = Some(AbortOnDrop(tokio::spawn(async move {
                // After sessions whose resync failed (and cleared nothing), wait before trying
                // again: a failure that persists must not loop at the speed of the link. The
                // wait runs from that failure, not from each new session, so a link that
                // drops while it waits does not start it over.
                let delay = resync::resync_wait(not_before, Instant::now());
                if !delay.is_zero() {
                    tracing::warn!(resource = %res2.name(), peer = %res2.peers[i].node.name,
                        failed_sessions, delay_secs = delay.as_secs(),
                        "the last {failed_sessions} resync sessions failed: resync starts in {} s",
                        delay.as_secs());
                    let slot = res2.peers[i].slot;
                    let total = res2.meta.lock().expect("meta").bitmaps[slot].count_dirty_bytes();
                    // Status: this session's resync, not started yet.
                    res2.update_peer(i, |s| {
                        s.resync_retry_at = Some(Instant::now() + delay);
                        s.resync_total = total;
                        s.resync_done = 0;
                        s.resync_started = Some(Instant::now());
                    });
                    tokio::time::sleep(delay).await;
                    res2.update_peer(i, |s| s.resync_retry_at = None);
                }
                // After the wait: a `connect --checksum` request stays pending for the next
                // session if this one ends while waiting.
                let summed = res2.checksum_resync(i, untrusted);
                let r = if summed {
                    csum_resync::run_source(res2.clone(), i, conn.clone()).await
                } else {
                    resync::run_source(res2.clone(), i, conn.clone()).await
                };
                if let Err(why) = r {
                    let why = format!("resync failed: {why}");
                    let progressed = conn
                        .resync_claims
                        .lock()
                        .expect("resync claims")
                        .settled_bytes()
                        > 0;
                    let next = {
                        let mut st = res2.state.lock().expect("state");
                        let p = &mut st.peers[i];
                        p.resync_failed_sessions =
                            resync::failed_sessions_after(p.resync_failed_sessions, progressed);
                        let next = resync::retry_delay(p.resync_failed_sessions);
                        p.resync_not_before = Some(Instant::now() + next);
                        next
                    };
                    tracing::error!(resource = %res2.name(), peer = %res2.peers[i].node.name,
                        "{why}; ending the session (the next one resyncs again, in {} s)",
                        next.as_secs());
                    res2.emit(Some(i), "error", why.clone());
                    let _ = failed.send(why);
                }
            })));
        }
        Ok(None)
    }

    async fn exchange_bitmaps(&mut self, reader: &mut Rx) -> Result<(), String> {
        let slot = self.res.peers[self.i].slot;
        let words = self.res.meta.lock().expect("meta").bitmaps[slot]
            .words()
            .to_vec();
        let bits: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        for (n, chunk) in words.chunks(8192).enumerate() {
            self.conn.send(Message::BitmapChunk {
                start_word: (n * 8192) as u64,
                words: chunk.to_vec(),
            });
        }
        self.conn.send(Message::BitmapDone { bits });
        let mut theirs = vec![0u64; words.len()];
        loop {
            match self.next_handshake(reader).await? {
                Message::BitmapChunk { start_word, words } => {
                    let start = start_word as usize;
                    let end = start
                        .checked_add(words.len())
                        .filter(|&e| e <= theirs.len())
                        .ok_or_else(|| "bitmap chunk outside the bitmap".to_string())?;
                    theirs[start..end].copy_from_slice(&words);
                }
                Message::BitmapDone { bits } => {
                    let got: u64 = theirs.iter().map(|w| u64::from(w.count_ones())).sum();
                    if got != bits {
                        return Err(format!("bitmap has {got} bits, peer announced {bits}"));
                    }
                    break;
                }
                other => return Err(format!("expected bitmap, got {}", other.name())),
            }
        }
        self.res.meta.lock().expect("meta").bitmaps[slot]
            .or_words(&theirs)
            .map_err(|e| e.to_string())
    }

    async fn handle(&mut self, m: Message) -> Result<(), String> {
        let res = &self.res;
        let i = self.i;
        match m {
            Message::Data {
                seq,
                after,
                offset,
                flags,
                payload,
            } => {
                self.check_receiving()?;
                // Refused before anything is recorded for it: a range past the end (or
                // overflowing) must not reach the acknowledgements, the loss accounting or the
                // unstable window (marked out of sync when the session ends).
                self.check_peer_range(offset, payload.len() as u64)?;
                if res.peers[i].protocol.peer_ack() == PeerAck::Received {
                    self.recv_acks.push(seq);
                }
                self.hearing.received(payload.len() as u64);
                self.unstable.received(seq, offset, payload.len() as u64);
                let op = Op::Write {
                    offset,
                    data: payload,
                    fua: flags & FLAG_FUA != 0,
                };
                self.arrive(seq, after, op).await?;
            }
            Message::Zero {
                seq,
                after,
                offset,
                len,
                trim,
                fua,
            } => {
                self.check_receiving()?;
                self.check_peer_range(offset, len)?;
                if res.peers[i].protocol.peer_ack() == PeerAck::Received {
                    self.recv_acks.push(seq);
                }
                self.hearing.received(len);
                self.unstable.received(seq, offset, len);
                let op = Op::Zero {
                    offset,
                    len,
                    trim,
                    fua,
                };
                self.arrive(seq, after, op).await?;
            }
            Message::Flush { seq } => {
                res.snapshots
                    .boundaries
                    .flush_received(self.flush_session, seq);
                self.arrive(seq, seq, Op::Flush).await?;
            }
            Message::SnapshotFlush { id } => {
                // `blockctl snapshot --consistent` on the peer: flush everywhere, then answer
                // (after the `Flush` this causes, on the same link).
                if res.role() == Role::Primary {
                    let (res, conn) = (res.clone(), self.conn.clone());
                    tokio::spawn(async move {
                        match res.flush().await {
                            Ok(()) => conn.send(Message::SnapshotFlushDone { id }),
                            Err(e) => tracing::warn!(resource = %res.name(),
                                "flush for a peer's snapshot failed: {}", error_chain(&e)),
                        }
                    });
                }
            }
            Message::SnapshotFlushDone { id } => {
                res.snapshots.boundaries.answered(self.flush_session, id)
            }
            Message::ResyncData {
                seq,
                after,
                offset,
                len,
                zero,
                payload,
            } => {
                let op = Op::Resync {
                    offset,
                    len,
                    zero,
                    payload,
                };
                self.arrive(seq, after, op).await?;
            }
            Message::ResyncDone { seq } => self.arrive(seq, seq, Op::ResyncDone).await?,
            Message::ChecksumRequest {
                seq,
                after,
                offset,
                len,
                block_size,
                purpose,
                digest,
            } => {
                let op = Op::Checksum {
                    offset,
                    len,
                    block_size,
                    purpose,
                    digest,
                };
                self.arrive(seq, after, op).await?;
            }
            Message::ChecksumReply {
                offset,
                len,
                purpose,
                answer,
            } => {
                let a = Answer {
                    offset,
                    len: u64::from(len),
                    answer,
                };
                if !self.conn.answers.deliver(purpose, a) {
                    tracing::debug!(resource = %res.name(), "checksum reply nobody asked for");
                }
            }
            Message::Invalidate => {
                let res = res.clone();
                tokio::spawn(async move {
                    match res.invalidate().await {
                        Ok(()) => {}
                        Err(e) => tracing::warn!(resource = %res.name(),
                            "peer asked to invalidate our data: refused: {}", error_chain(&e)),
                    }
                });
            }
            Message::RecvAck { seq, count } => self.conn.ack(seq, count, PeerAck::Received),
            Message::WriteAck { seq, count } => {
                self.conn.ack(seq, count, PeerAck::Written);
                self.written_acks = true;
            }
            Message::Stable { below } => self.unstable.stable(below),
            Message::FlushAck { seq } => self.conn.flush_ack(seq),
            Message::ResyncAck { offset, len } => {
                resync::acked(res, i, &self.conn, offset, len);
            }
            Message::NewUuid(_) if res.role() == Role::Primary => {
                return Err(self.two_primaries("the peer started a new generation"));
            }
            Message::PeerState {
                role: Role::Primary,
                ..
            } if res.role() == Role::Primary => {
                return Err(self.two_primaries("the peer reports itself Primary"));
            }
            Message::NewUuid(u) => {
                let peer_id = res.peers[i].node.id;
                res.meta_io(move |m| {
                    let old = m.sb.generations.current;
                    m.sb.generations.current = u.with_primary(false);
                    m.sb.generations.bitmap[peer_id as usize] = Default::default();
                    m.sb.generations.push_history(old);
                    m.save_sb()
                })
                .await
                .map_err(|e| e.to_string())?;
            }
            Message::PeerState { role, disk } => {
                res.update_peer(i, |s| {
                    s.role = role;
                    s.disk = disk;
                });
                // Its promotion is visible now: the role rules refuse others from here on.
                if role == Role::Primary {
                    res.promotion_lease_ends(i);
                }
            }
            Message::Ping => self.conn.send(Message::PingAck),
            Message::PingAck => {}
            Message::ViewRequest { id, promote } => self.conn.send(res.view_reply(i, id, promote)),
            Message::ViewReply {
                id,
                current,
                primary,
                history,
                marked,
                promoting,
            } => res.view_answered(
                i,
                id,
                crate::repl::promote::ClusterAnswer::View {
                    current,
                    history,
                    primary,
                    marked,
                    promoting,
                },
            ),
            Message::PromoteEnd { id } => res.promotion_ended(i, id),
            Message::ClientAcked(t) => self.hearing.report(t),
            Message::ReadRequest {
                id,
                offset,
                len,
                block_size,
            } => crate::repl::local_disk::serve_read(
                res.clone(),
                self.conn.clone(),
                id,
                offset,
                len,
                block_size,
            ),
            Message::ReadReply { id, answer } => res.read_answered(id, answer),
            other => return Err(format!("unexpected {} after the handshake", other.name())),
        }
        Ok(())
    }

    /// A replicated request's range lies within the device; else the session ends (a
    /// malformed request, not a disk failure: the disk stays attached).
    fn check_peer_range(&self, offset: u64, len: u64) -> Result<(), String> {
        self.res
            .check_range(offset, len)
            .map_err(|e| self.res.apply_failed("replicated request refused", &e))
    }

    fn check_receiving(&self) -> Result<(), String> {
        if self.res.role() == Role::Primary {
            return Err("peer sent writes while we are Primary (two primaries)".into());
        }
        Ok(())
    }
}

/// Why two handshake reports cannot make a session: a different data size, or a different
/// protocol (a Secondary configured for C skips applying what it received when the session
/// ends, which an A or B Primary may already have acknowledged).
pub(crate) fn incompatible_reports(
    mine: &crate::repl::wire::StateReport,
    theirs: &crate::repl::wire::StateReport,
) -> Option<String> {
    if theirs.size != mine.size {
        return Some(format!(
            "size mismatch: ours {} bytes, peer's {} bytes",
            mine.size, theirs.size
        ));
    }
    if theirs.protocol != mine.protocol {
        return Some(format!(
            "protocol mismatch: ours {}, peer's {} (set the same protocol on both nodes)",
            mine.protocol.as_str(),
            theirs.protocol.as_str()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_of_another_size_or_protocol_refuse_the_session() {
        use crate::meta::generation::GenerationIds;
        use crate::repl::handshake::HandshakeSide;
        use crate::repl::state::Protocol;
        use crate::repl::sync_decision::SideView;
        use crate::repl::wire::StateReport;
        let report = |node_id, size, protocol| StateReport {
            side: HandshakeSide {
                view: SideView {
                    node_id,
                    ids: GenerationIds::just_created(),
                    crashed_primary: false,
                    disk: DiskState::UpToDate,
                    role: Role::Secondary,
                },
                dirty_bits: 0,
                discard_my_data: false,
                quorum: None,
                follows_primary: false,
                resyncing_from_other: false,
                in_sync_with_primary: false,
            },
            size,
            protocol,
        };
        let mine = report(0, 1 << 30, Protocol::C);
        assert_eq!(
            incompatible_reports(&mine, &report(1, 1 << 30, Protocol::C)),
            None
        );
        let size = incompatible_reports(&mine, &report(1, 1 << 29, Protocol::C)).unwrap();
        assert!(size.starts_with("size mismatch"), "{size}");
        for theirs in [Protocol::A, Protocol::B] {
            let why = incompatible_reports(&mine, &report(1, 1 << 30, theirs)).unwrap();
            assert!(
                why.contains(&format!(
                    "protocol mismatch: ours C, peer's {}",
                    theirs.as_str()
                )),
                "{why}"
            );
        }
    }

    fn pending(ack: PeerAck) -> PendingWrite {
        PendingWrite {
            offset: 0,
            len: 4096,
            cost: 4096,
            ack,
            waiter: None,
            client_acked: false,
            al: None,
        }
    }

    /// A stopped task does nothing afterwards, even when it was in the middle of a poll on
    /// another worker (the checksum resync must not clear bits after the session's loss
    /// bookkeeping marked them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_task_is_over_when_stop_returns() {
        use std::sync::atomic::AtomicBool;
        let in_poll = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(AtomicU64::new(0));
        let task = {
            let (in_poll, steps) = (in_poll.clone(), steps.clone());
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    in_poll.store(true, Ordering::SeqCst);
                    // Busy inside one poll (like bitmap work between awaits).
                    std::thread::sleep(Duration::from_millis(50));
                    steps.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            }))
        };
        while !in_poll.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        task.stop().await;
        let at_stop = steps.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            steps.load(Ordering::SeqCst),
            at_stop,
            "the task ran after stop"
        );
    }

    /// A replicated write or zeroing whose range is past the end of the device (an overflowing
    /// one too) is refused before anything is recorded for it: no acknowledgement, nothing
    /// counted as received, nothing in the unstable window (whose ranges overflowed on
    /// `offset + len` at the session's end: a panic in debug builds, the whole device marked
    /// out of sync in release builds).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_past_the_end_is_refused_before_it_is_recorded() {
        let mut c = crate::repl::tests::cluster(2, "B").await;
        let res = c.start(0);
        let conn = Arc::new(Conn::new(16 << 20, Box::new(|_| {})));
        let (failed, _) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Session::new(res.clone(), 0, conn, failed);
        let zero = |seq, offset, len| Message::Zero {
            seq,
            after: 0,
            offset,
            len,
            trim: false,
            fua: false,
        };
        let msgs = [
            zero(1, 1 << 63, 1 << 63),
            zero(2, 0, u64::MAX),
            Message::Data {
                seq: 3,
                after: 0,
                offset: crate::repl::tests::SIZE - 512,
                flags: 0,
                payload: Bytes::from_static(&[7; 4096]),
            },
        ];
        for m in msgs {
            let err = s.handle(m).await.expect_err("refused");
            assert!(err.contains("replicated request refused"), "{err}");
        }
        assert!(s.recv_acks.is_empty(), "{:?}", s.recv_acks);
        assert!(s.unstable.is_empty(), "{:?}", s.unstable.ranges());
        // Three acknowledged writes reported, none of them arrived.
        s.hearing.report(Tally {
            writes: 3,
            bytes: 3,
        });
        assert_eq!(
            s.hearing.never_received(),
            Tally {
                writes: 3,
                bytes: 3
            }
        );
        res.shutdown().await;
    }

    /// A session (with nobody on the other end) of a resource started alone under `extra`.
    async fn lone_session(extra: &str) -> (crate::repl::tests::Cluster, Arc<Resource>, Session) {
        let mut c = crate::repl::tests::cluster_with(2, "C", extra).await;
        let res = c.start(0);
        let conn = Arc::new(Conn::new(16 << 20, Box::new(|_| {})));
        let (failed, _) = tokio::sync::mpsc::unbounded_channel();
        let s = Session::new(res.clone(), 0, conn, failed);
        (c, res, s)
    }

    /// An apply that never completes, changing `range`.
    fn stuck_apply(s: &mut Session, seq: u64, range: (u64, u64)) {
        s.op_ranges.insert(seq, range);
        s.ops
            .spawn(std::future::pending::<(u64, Result<Done, String>)>());
    }

    /// The requests of an ended session still running on the disk are waited for: aborting
    /// one dropped its future while its engine write went on, to land later over newer data
    /// (after the next session resynced the range, or after a promotion). One still running
    /// after the limit is a disk failure: `on-io-error = detach` detaches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ended_session_waits_for_its_running_applies() {
        use std::sync::atomic::AtomicBool;
        let (_c, res, mut s) = lone_session("").await;
        let landed = Arc::new(AtomicBool::new(false));
        s.op_ranges.insert(1, (0, 4096));
        {
            let landed = landed.clone();
            // A slow write, done 300 ms from now.
            s.ops.spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                landed.store(true, Ordering::SeqCst);
                (1, Ok(Done::Written))
            });
        }
        s.stop_applies(Duration::from_secs(10)).await;
        assert!(
            landed.load(Ordering::SeqCst),
            "the write completed before the session's end went on"
        );
        assert!(s.ops.is_empty() && s.op_ranges.is_empty());
        assert_eq!(res.status().disk, "inconsistent", "not a disk failure");
        stuck_apply(&mut s, 2, (8192, 4096));
        s.stop_applies(Duration::from_millis(100)).await;
        crate::repl::tests::wait_for("detached", || res.status().disk == "diskless").await;
        res.shutdown().await;
    }

    /// Promotion waits while an ended protocol C session waits for its running applies (it
    /// waited only for the applies of protocols A and B).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn promotion_waits_for_the_applies_of_an_ended_session() {
        use std::sync::atomic::AtomicBool;
        let (_c, res, mut s) = lone_session("").await;
        let landed = Arc::new(AtomicBool::new(false));
        {
            let landed = landed.clone();
            s.ops.spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                landed.store(true, Ordering::SeqCst);
                (1, Ok(Done::Written))
            });
        }
        let ending = tokio::spawn(async move { s.end_applies("beta").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // promote-check (asked by `blockctl promote` first) waits as promote does.
        let _ = res.promote_check(false).await;
        assert!(
            landed.load(Ordering::SeqCst),
            "promote-check answered before the write landed"
        );
        res.applies_finished().await;
        assert!(
            landed.load(Ordering::SeqCst),
            "promotion went on before the write landed"
        );
        ending.await.unwrap();
        res.shutdown().await;
    }

    /// Under `on-io-error = pass-on` a request still running after the limit keeps the disk
    /// attached and marks its range out of sync for every peer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_apply_under_pass_on_marks_its_range() {
        let (_c, res, mut s) = lone_session("on-io-error = \"pass-on\"\n").await;
        stuck_apply(&mut s, 1, (8192, 4096));
        s.stop_applies(Duration::from_millis(100)).await;
        assert!(s.op_ranges.is_empty());
        {
            let m = res.meta.lock().unwrap();
            for b in &m.bitmaps {
                assert_eq!(b.count_dirty_bytes(), b.block_size().max(4096));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(res.status().disk, "inconsistent", "attached");
        res.shutdown().await;
    }

    /// A session of node 0 of a fresh protocol B cluster, its receive backlog bounded by
    /// `limit` (the cluster holds the node's files).
    async fn session_with_backlog(
        limit: u64,
    ) -> (crate::repl::tests::Cluster, Arc<Resource>, Session) {
        let mut c = crate::repl::tests::cluster(2, "B").await;
        let res = c.start(0);
        let conn = Arc::new(Conn::new(16 << 20, Box::new(|_| {})));
        let (failed, _) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Session::new(res.clone(), 0, conn, failed);
        s.backlog = Backlog::new(limit);
        (c, res, s)
    }

    type ReceiveEnd = (Session, Result<std::convert::Infallible, String>);

    /// Runs `s`'s receive loop on one end of a pipe; returns the peer's end.
    fn receive_on_pipe(
        mut s: Session,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<ReceiveEnd>) {
        let (peer, ours) = tokio::io::duplex(64 << 10);
        let mut rx = Rx {
            io: ours,
            buf: BytesMut::new(),
            last: Instant::now(),
        };
        let session = tokio::spawn(async move {
            let end = s.receive(&mut rx).await;
            (s, end)
        });
        (peer, session)
    }

    /// The peer sends `frames` writes of `payload` bytes, numbered from `first`, all issued
    /// after request `first` (`after = first`), counting each one written into the pipe.
    fn send_writes(
        mut peer: tokio::io::DuplexStream,
        first: u64,
        frames: u64,
        payload: usize,
        sent: Arc<AtomicU64>,
    ) -> tokio::task::JoinHandle<std::io::Result<tokio::io::DuplexStream>> {
        use crate::repl::outbox::encode_frame;
        tokio::spawn(async move {
            for seq in first..first + frames {
                let m = Message::Data {
                    seq,
                    after: first,
                    offset: (seq - first) * payload as u64,
                    flags: 0,
                    payload: Bytes::from(vec![seq as u8; payload]),
                };
                peer.write_all(&encode_frame(&m)).await?;
                sent.fetch_add(1, Ordering::SeqCst);
            }
            Ok(peer)
        })
    }

    /// The peer closes the link: the session ends, applies what it received (as when a
    /// protocol B session ends), and every applied request left the backlog.
    async fn close_and_drain(
        peer: tokio::io::DuplexStream,
        session: tokio::task::JoinHandle<ReceiveEnd>,
        res: &Resource,
    ) {
        drop(peer);
        let (mut s, end) = tokio::time::timeout(Duration::from_secs(20), session)
            .await
            .expect("the session ended")
            .unwrap();
        let Err(end) = end;
        assert_eq!(end, "peer closed the link");
        s.finish_applies("beta").await;
        assert!(s.order.is_idle());
        assert_eq!(
            s.backlog.bytes(),
            0,
            "every applied request left the backlog"
        );
        res.shutdown().await;
    }

    /// Above its backlog bound the receive loop stops reading the link (the peer's writes then
    /// wait in its send buffer: here the sender's writes block) and reads again once its
    /// requests complete; a pause longer than the keepalive timeout does not end the session
    /// (the silence was ours), nor does it stall while requests keep completing (one every half
    /// `STALL_LIMIT`). It read everything the peer sent, whatever ran on the disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_receive_loop_stops_reading_above_its_backlog_bound() {
        const FRAMES: u64 = 64;
        const PAYLOAD: usize = 64 << 10;
        let limit = 1 << 20;
        let (_c, res, mut s) = session_with_backlog(limit).await;
        // Requests 1..=HELD run on a slow disk, one completing every half `STALL_LIMIT`, for
        // longer than the keepalive timeout; the peer's writes were issued after they completed
        // (`after = HELD + 1`), so they wait for them.
        let pause = KEEPALIVE_TIMEOUT + 3 * PING_INTERVAL;
        let every = STALL_LIMIT / 2;
        let held = (pause.as_millis() / every.as_millis()) as u64 + 1;
        for seq in 1..=held {
            let op = Ordered {
                seq,
                after: 0,
                op: Op::Flush,
            };
            assert!(s.order.arrive(op).unwrap().is_some(), "{seq} runs");
            s.backlog.arrived(seq, REQUEST_OVERHEAD);
            s.ops.spawn(async move {
                tokio::time::sleep(every * seq as u32).await;
                (seq, Ok(Done::Written))
            });
        }
        let (peer, session) = receive_on_pipe(s);
        let sent = Arc::new(AtomicU64::new(0));
        let sender = send_writes(peer, held + 1, FRAMES, PAYLOAD, sent.clone());
        tokio::time::sleep(KEEPALIVE_TIMEOUT + 2 * PING_INTERVAL).await;
        // About 16 frames make the bound; a few more sit in the read buffer and the pipe.
        let at_pause = sent.load(Ordering::SeqCst);
        assert!(
            at_pause < FRAMES / 2,
            "{at_pause} of {FRAMES} frames of {PAYLOAD} bytes read with a bound of {limit}"
        );
        assert!(!session.is_finished(), "the session ended while paused");
        assert!(!sender.is_finished());
        let peer = tokio::time::timeout(Duration::from_secs(20), sender)
            .await
            .expect("reading resumed")
            .unwrap()
            .expect("the session kept reading");
        close_and_drain(peer, session, &res).await;
    }

    /// A running request may wait for something behind the bytes a paused loop does not read:
    /// a write waiting for activity-log room that only the peer's acknowledgements of this
    /// node's earlier writes free (after a role switch on a live session). Such a request
    /// (counted in `al_room_waiters` / `al_slow_path`) is not one the loop waits for: it reads
    /// on at once, and the request completes. Without that it waited forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_receive_loop_reads_on_when_a_running_request_waits_for_the_link() {
        paused_loop_with_a_request_waiting_for_the_link(true).await;
    }

    /// A running request waiting for the link for a reason the loop cannot see: the pause
    /// stalls after `STALL_LIMIT` and the loop reads on, but only up to twice its bound (a
    /// disk merely slow must not lift the bound); once the request completes it reads the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_receive_loop_reads_at_most_twice_its_bound() {
        paused_loop_with_a_request_waiting_for_the_link(false).await;
    }

    async fn paused_loop_with_a_request_waiting_for_the_link(room_waiter: bool) {
        const FRAMES: u64 = 64;
        const PAYLOAD: usize = 64 << 10;
        let limit = 1 << 20;
        let (_c, res, mut s) = session_with_backlog(limit).await;
        // Request 1 runs until the peer sent its last frame (four times the loop's bound); the
        // peer's writes wait for request 1.
        let (last_sent, heard) = oneshot::channel::<()>();
        let first = Ordered {
            seq: 1,
            after: 0,
            op: Op::Flush,
        };
        assert!(s.order.arrive(first).unwrap().is_some(), "1 runs");
        s.backlog.arrived(1, REQUEST_OVERHEAD);
        if room_waiter {
            res.peers[0].al_slow_path.fetch_add(1, Ordering::AcqRel);
            res.al_room_waiters.fetch_add(1, Ordering::AcqRel);
        }
        let waiting = res.clone();
        s.ops.spawn(async move {
            let _ = heard.await;
            if room_waiter {
                waiting.al_room_waiters.fetch_sub(1, Ordering::AcqRel);
                waiting.peers[0].al_slow_path.fetch_sub(1, Ordering::AcqRel);
            }
            (1, Ok(Done::Written))
        });
        let (peer, session) = receive_on_pipe(s);
        let started = Instant::now();
        let written = Arc::new(AtomicU64::new(0));
        let sender = send_writes(peer, 2, FRAMES, PAYLOAD, written.clone());
        let peer = if room_waiter {
            let peer = tokio::time::timeout(STALL_LIMIT / 2, sender)
                .await
                .expect("the loop read on at once (deadlock without it)")
                .unwrap()
                .expect("the session kept reading");
            let _ = last_sent.send(());
            peer
        } else {
            tokio::time::sleep(STALL_LIMIT * 3).await;
            // Read: at most twice the bound (32 frames), plus what the pipe and the read
            // buffer hold.
            let n = written.load(Ordering::SeqCst);
            assert!(
                n >= (limit / PAYLOAD as u64) + 4,
                "the stalled loop read past its bound: {n} frames"
            );
            assert!(
                n < FRAMES,
                "the stalled loop read at most twice its bound: {n} of {FRAMES} frames"
            );
            let _ = last_sent.send(());
            tokio::time::timeout(Duration::from_secs(10), sender)
                .await
                .expect("the loop read the rest once the request completed")
                .unwrap()
                .expect("the session kept reading")
        };
        assert!(room_waiter || started.elapsed() >= STALL_LIMIT);
        close_and_drain(peer, session, &res).await;
    }

    #[test]
    fn unconfirmed_writes_count_from_client_ack_to_write_ack() {
        let c = Conn::new(16 << 20, Box::new(|_| {}));
        let msg = Message::Ping;
        assert!(c.track(1, pending(PeerAck::None), &msg, false));
        assert!(c.track(2, pending(PeerAck::None), &msg, false));
        assert!(c.track(3, pending(PeerAck::None), &msg, false));
        // Write 3 is confirmed before its client hears back: acked, never unconfirmed.
        c.ack(3, 1, PeerAck::Written);
        c.client_acked(1, 4096);
        c.client_acked(2, 4096);
        c.client_acked(3, 4096);
        assert_eq!(
            c.unconfirmed(),
            Tally {
                writes: 2,
                bytes: 8192
            }
        );
        // The report covers every acknowledged write, once.
        assert_eq!(
            c.report_due(),
            Some(Tally {
                writes: 3,
                bytes: 12288
            })
        );
        assert_eq!(c.report_due(), None);
        // A received ack (protocol B) does not confirm the write; the write ack does.
        c.ack(1, 2, PeerAck::Received);
        assert_eq!(c.unconfirmed().writes, 2);
        c.ack(1, 2, PeerAck::Written);
        assert_eq!(c.unconfirmed(), Tally::ZERO);
        assert_eq!(c.in_flight_with_bytes(), (0, 0));
    }

    /// An acknowledgement covering up to `u32::MAX` sequence numbers (a buggy or hostile peer)
    /// takes time in proportion to the writes pending, not to its count: it used to look up
    /// every number of the range (about 4.3e9 map lookups) while holding the lock every
    /// write of the write path takes.
    #[test]
    fn a_huge_ack_count_visits_only_the_pending_writes() {
        let c = Arc::new(Conn::new(16 << 20, Box::new(|_| {})));
        let msg = Message::Ping;
        for seq in [5, 6, 9] {
            assert!(c.track(seq, pending(PeerAck::Received), &msg, false));
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let acker = c.clone();
        std::thread::spawn(move || {
            acker.ack(0, u32::MAX, PeerAck::Received);
            assert_eq!(
                acker.in_flight_with_bytes().0,
                3,
                "a received ack frees nothing"
            );
            acker.ack(6, u32::MAX, PeerAck::Written);
            acker.ack(u64::MAX - 1, u32::MAX, PeerAck::Written);
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the acks returned at once");
        assert_eq!(c.in_flight_with_bytes(), (1, 4096), "write 5 is left");
        assert_eq!(c.lowest_pending(), Some(5));
    }

    /// The send buffer (`sndbuf-size`): a write that does not fit waits until acks make room;
    /// a dropped waiter gives its place back; a closed session releases every waiter.
    #[tokio::test]
    async fn writes_wait_for_room_in_the_send_buffer() {
        use std::sync::Mutex as StdMutex;
        let changes = Arc::new(StdMutex::new(Vec::new()));
        let seen = changes.clone();
        let c = Arc::new(Conn::new(
            1 << 20,
            Box::new(move |ch| seen.lock().unwrap().push(ch)),
        ));
        let msg = Message::Ping;
        let write = |cost| PendingWrite {
            cost,
            ..pending(PeerAck::None)
        };
        let mut r = c.reserve(768 << 10).await.expect("room");
        assert!(r.is_for(&c));
        assert!(c.track(1, write(768 << 10), &msg, true));
        r.used(768 << 10);
        drop(r);
        assert_eq!(c.send_buffer(), (768 << 10, false, 0));
        // 512 KiB does not fit: it waits; a waiter dropped meanwhile gives its place back.
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.reserve(512 << 10).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let dropped = tokio::time::timeout(Duration::from_millis(50), c.reserve(4096)).await;
        assert!(dropped.is_err(), "a later write must not overtake");
        tokio::task::yield_now().await;
        assert_eq!(c.send_buffer(), (768 << 10, true, 2));
        assert!(!waiter.is_finished());
        c.ack(1, 1, PeerAck::Written);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("woken by the ack")
                .expect("task")
        );
        // Its reservation was dropped unused: everything is free again.
        assert_eq!(c.send_buffer().0, 0);
        assert_eq!(
            *changes.lock().unwrap(),
            vec![Change::Congested, Change::Uncongested]
        );
        // Full again; closing the session releases the waiter without room.
        assert!(c.track(2, write(1 << 20), &msg, false));
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.reserve(4096).await.is_none() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert_eq!(c.close().0, vec![(0, 4096)]);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("woken by the close")
                .expect("task")
        );
    }
}
