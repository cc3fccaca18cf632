//! One session on an established link: a writer task that batches queued messages into the
//! TLS stream (and pings when idle), the handshake (state reports both ways, then the
//! commands of `repl::handshake`), and the receive loop: acknowledgements for our writes, and
//! applying the peer's replicated writes in epoch order (writes of one epoch run concurrently;
//! an epoch starts only after the previous one is on disk). When the session ends, every write
//! the peer had not acknowledged goes into its bitmap.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::frame::{self, FrameReader};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::meta::superblock::flags;
use crate::repl::handshake::{Command, DisconnectReason, handshake};
use crate::repl::link::Link;
use crate::repl::resource::{Resource, error_chain};
use crate::repl::resync;
use crate::repl::state::{ConnState, DiskState, PeerAck, ReplState, Role};
use crate::repl::wire::{FLAG_FUA, Message};

/// Idle time after which the writer sends a `Ping`.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Silence after which the link is considered dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Resync bytes sent but not yet acknowledged, at most.
pub const RESYNC_WINDOW: usize = 8 << 20;

/// A write queued to a peer and not yet acknowledged by it.
pub struct PendingWrite {
    pub offset: u64,
    pub len: u64,
    /// The ack the writer waits for (`None`: protocol A, nobody waits).
    pub ack: PeerAck,
    pub waiter: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Pending {
    closed: bool,
    writes: HashMap<u64, PendingWrite>,
    flushes: HashMap<u64, oneshot::Sender<()>>,
}

/// The sending side of a live session, shared with the write path.
pub struct Conn {
    tx: mpsc::UnboundedSender<Message>,
    pending: Mutex<Pending>,
    /// Resync window in bytes (see [`RESYNC_WINDOW`]).
    pub(crate) resync_window: Arc<Semaphore>,
    pub(crate) closed: watch::Sender<bool>,
    /// Wire bytes sent (frames), for status.
    pub(crate) sent: AtomicU64,
}

impl Conn {
    fn new(tx: mpsc::UnboundedSender<Message>) -> Conn {
        Conn {
            tx,
            pending: Mutex::new(Pending::default()),
            resync_window: Arc::new(Semaphore::new(RESYNC_WINDOW)),
            closed: watch::channel(false).0,
            sent: AtomicU64::new(0),
        }
    }

    /// Queues a message (dropped silently when the session is gone: its loss handler runs).
    pub(crate) fn send(&self, msg: Message) {
        let _ = self.tx.send(msg);
    }

    /// Queues a write (after `barrier`) and remembers it until acknowledged. `false` when the
    /// session is closing (the caller marks the range out of sync instead).
    pub(crate) fn track(
        &self,
        seq: u64,
        write: PendingWrite,
        barrier: Option<Message>,
        msg: Message,
    ) -> bool {
        let mut p = self.pending.lock().expect("pending");
        if p.closed {
            return false;
        }
        if let Some(b) = barrier {
            let _ = self.tx.send(b);
        }
        p.writes.insert(seq, write);
        self.tx.send(msg).is_ok()
    }

    /// Queues a flush; returns the ack to wait for when `wait`.
    pub(crate) fn track_flush(&self, seq: u64, wait: bool) -> Option<oneshot::Receiver<()>> {
        let mut p = self.pending.lock().expect("pending");
        if p.closed {
            return None;
        }
        let _ = self.tx.send(Message::Flush { seq });
        wait.then(|| {
            let (tx, rx) = oneshot::channel();
            p.flushes.insert(seq, tx);
            rx
        })
    }

    /// Requests and bytes sent to the peer and not yet acknowledged (replication lag).
    pub(crate) fn in_flight_with_bytes(&self) -> (usize, u64) {
        let p = self.pending.lock().expect("pending");
        (p.writes.len(), p.writes.values().map(|w| w.len).sum())
    }

    fn ack(&self, seq: u64, kind: PeerAck) {
        let mut p = self.pending.lock().expect("pending");
        match kind {
            PeerAck::Received => {
                if let Some(w) = p.writes.get_mut(&seq)
                    && w.ack == PeerAck::Received
                    && let Some(tx) = w.waiter.take()
                {
                    let _ = tx.send(());
                }
            }
            _ => {
                if let Some(mut w) = p.writes.remove(&seq)
                    && let Some(tx) = w.waiter.take()
                {
                    let _ = tx.send(());
                }
            }
        }
    }

    fn flush_ack(&self, seq: u64) {
        if let Some(tx) = self.pending.lock().expect("pending").flushes.remove(&seq) {
            let _ = tx.send(());
        }
    }

    /// Closes the session for the write path; returns the unacknowledged ranges.
    fn close(&self) -> Vec<(u64, u64)> {
        let mut p = self.pending.lock().expect("pending");
        p.closed = true;
        p.flushes.clear();
        let _ = self.closed.send(true);
        p.writes.drain().map(|(_, w)| (w.offset, w.len)).collect()
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

type Reader = FrameReader<tokio::io::ReadHalf<tokio_rustls::TlsStream<tokio::net::TcpStream>>>;

/// Runs one session with peer `i` until it ends, then does the loss bookkeeping.
pub async fn run_session(res: &Arc<Resource>, i: usize, link: Link) -> SessionEnd {
    let Link {
        peer,
        mut reader,
        writer,
    } = link;
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn::new(tx));
    // The state report must be the first message: queue it before the write path sees `conn`.
    // A promotion between the report and publishing `conn` makes the report stale: the
    // session then ends at once and the link is set up again (see `Resource::promote`).
    let role_epoch = res.role_epoch.load(std::sync::atomic::Ordering::SeqCst);
    let report = res.state_report(i);
    conn.send(Message::State(report.clone()));
    *res.peers[i].conn.lock().expect("conn") = Some(conn.clone());
    let stale = res.role_epoch.load(std::sync::atomic::Ordering::SeqCst) != role_epoch;
    let writer_conn = conn.clone();
    let mut writer_task = AbortOnDrop(tokio::spawn(writer_loop(
        writer.into_inner(),
        rx,
        writer_conn,
    )));
    tracing::info!(resource = %res.name(), peer = %peer.name, "link up");

    let mut session = Session {
        res: res.clone(),
        i,
        conn: conn.clone(),
        stash: VecDeque::new(),
        applier: Applier::new(res.clone(), conn.clone(), res.peers[i].slot),
        resync: None,
    };
    let end = tokio::select! {
        biased;
        _ = std::future::ready(()), if stale => {
            SessionEnd::Lost("promoted during link setup: redoing the handshake".into())
        }
        end = session.run(&mut reader, report) => end,
        _ = res.peers[i].kill.notified() => SessionEnd::Killed,
        w = &mut writer_task.0 => SessionEnd::Lost(match w {
            Ok(Ok(())) => "writer stopped".into(),
            Ok(Err(e)) => e,
            Err(e) => e.to_string(),
        }),
    };
    drop(writer_task);
    drop(session.resync.take());
    session.applier.abort();
    // Loss bookkeeping: unacknowledged writes go into the peer's bitmap.
    *res.peers[i].conn.lock().expect("conn") = None;
    let lost = conn.close();
    let slot = res.peers[i].slot;
    let peer_id = res.peers[i].node.id;
    let primary = res.role() == Role::Primary;
    {
        let mut m = res.meta.lock().expect("meta");
        for (o, l) in &lost {
            m.bitmaps[slot].set_range(*o, *l);
        }
    }
    let fresh = crate::repl::resource::fresh_uuid();
    let r = res
        .meta_io(move |m| {
            if primary {
                m.sb.generations.new_current(fresh, true, &[peer_id]);
                m.save_sb()?;
            }
            m.save_bitmap(slot)?;
            Ok(m.sb.generations.current)
        })
        .await;
    match r {
        Ok(current) if primary => {
            // Peers still in sync follow the new generation.
            for (j, p) in res.peers.iter().enumerate() {
                if j != i
                    && let Some(c) = p.conn.lock().expect("conn").as_ref()
                {
                    c.send(Message::NewUuid(current));
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::error!(resource = %res.name(), "cannot persist the bitmap: {e}"),
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

/// Writes queued messages as frames, batching whatever is queued into one TLS write.
async fn writer_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Message>,
    conn: Arc<Conn>,
) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(256 << 10);
    let mut msg_buf = BytesMut::new();
    loop {
        let first = match tokio::time::timeout(PING_INTERVAL, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(_) => Message::Ping,
        };
        let mut next = Some(first);
        while let Some(m) = next {
            msg_buf.clear();
            m.encode(&mut msg_buf);
            frame::encode(&msg_buf, &mut buf);
            next = if buf.len() < (1 << 20) {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        conn.sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
        w.write_all(&buf).await.map_err(|e| format!("send: {e}"))?;
        w.flush().await.map_err(|e| format!("send: {e}"))?;
        buf.clear();
    }
}

struct Session {
    res: Arc<Resource>,
    i: usize,
    conn: Arc<Conn>,
    /// Replication messages that arrived during the handshake (applied after it).
    stash: VecDeque<Message>,
    applier: Applier,
    resync: Option<AbortOnDrop<()>>,
}

/// Aborts a task when dropped (a session's helpers never outlive it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.abort();
    }
}

async fn read_msg<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>) -> Result<Message, String> {
    match tokio::time::timeout(KEEPALIVE_TIMEOUT, reader.read_frame()).await {
        Err(_) => Err(format!(
            "no traffic for {}s (keepalive timeout)",
            KEEPALIVE_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("receive: {}", error_chain(&e))),
        Ok(Ok(None)) => Err("peer closed the link".into()),
        Ok(Ok(Some(f))) => Message::decode(f).map_err(|e| format!("malformed message: {e}")),
    }
}

impl Session {
    /// Reads the next handshake message, stashing replication traffic for later.
    async fn next_handshake(&mut self, reader: &mut Reader) -> Result<Message, String> {
        loop {
            let m = read_msg(reader).await?;
            match m {
                Message::Data { .. }
                | Message::Zero { .. }
                | Message::Barrier { .. }
                | Message::Flush { .. }
                | Message::NewUuid(_)
                | Message::PeerState { .. } => self.stash.push_back(m),
                Message::Ping => self.conn.send(Message::PingAck),
                Message::PingAck => {}
                other => return Ok(other),
            }
        }
    }

    async fn run(
        &mut self,
        reader: &mut Reader,
        mine: crate::repl::wire::StateReport,
    ) -> SessionEnd {
        match self.handshake(reader, mine).await {
            Ok(None) => {}
            Ok(Some(end)) => return end,
            Err(e) => return SessionEnd::Lost(e),
        }
        while let Some(m) = self.stash.pop_front() {
            if let Err(e) = self.handle(m).await {
                return SessionEnd::Lost(e);
            }
        }
        loop {
            let m = tokio::select! {
                m = read_msg(reader) => m,
                f = self.applier.failed.recv() => Err(f.unwrap_or_else(|| "apply failed".into())),
            };
            match m {
                Ok(m) => {
                    if let Err(e) = self.handle(m).await {
                        return SessionEnd::Lost(e);
                    }
                }
                Err(e) => return SessionEnd::Lost(e),
            }
        }
    }

    async fn handshake(
        &mut self,
        reader: &mut Reader,
        mine: crate::repl::wire::StateReport,
    ) -> Result<Option<SessionEnd>, String> {
        let res = self.res.clone();
        let i = self.i;
        let theirs = match self.next_handshake(reader).await? {
            Message::State(r) => r,
            other => return Err(format!("expected state, got {}", other.name())),
        };
        if theirs.size != mine.size {
            return Ok(Some(SessionEnd::StandAlone(format!(
                "size mismatch: ours {} bytes, peer's {} bytes",
                mine.size, theirs.size
            ))));
        }
        let out = handshake(&mine.side, &theirs.side, &res.spec.split_brain);
        tracing::info!(resource = %res.name(), peer = %res.peers[i].node.name,
            outcome = ?out.decision.outcome, rule = ?out.decision.rule,
            ours = %mine.side.view.ids.current, theirs = %theirs.side.view.ids.current,
            "handshake");
        res.update_peer(i, |s| {
            s.role = theirs.side.view.role;
            s.disk = theirs.side.view.disk;
        });
        let slot = res.peers[i].slot;
        let peer_id = res.peers[i].node.id;
        let mut enter = ReplState::Established;
        for cmd in out.commands {
            match cmd {
                Command::SaveDivergentBlocks => tracing::warn!(resource = %res.name(),
                    "split-brain victim: saving divergent blocks is not implemented yet"),
                Command::SetAllBits => res.meta.lock().expect("meta").bitmaps[slot].set_all(),
                Command::CopyBitmapSlot(n) => {
                    let mut m = res.meta.lock().expect("meta");
                    if let Some(from) = res.peers.iter().find(|p| p.node.id == n).map(|p| p.slot) {
                        let src = m.bitmaps[from].clone();
                        m.bitmaps[slot].copy_from(&src).map_err(|e| e.to_string())?;
                    } else {
                        m.bitmaps[slot].set_all();
                    }
                }
                Command::ClearBitmap => res.meta.lock().expect("meta").bitmaps[slot].clear_all(),
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
                            res.emit(Some(i), "split-brain", format!("{k:?}"));
                            format!("split brain detected ({k:?}); resolve, then blockctl connect")
                        }
                        DisconnectReason::UnrelatedData => {
                            res.emit(Some(i), "error", "unrelated-data");
                            "unrelated data: no common generation (another cluster or a wiped node)"
                                .to_string()
                        }
                    };
                    return Ok(Some(SessionEnd::StandAlone(why)));
                }
            }
        }
        if enter == ReplState::Established {
            // Same data on both sides: consistent data is now known to be the newest.
            if res.state.lock().expect("state").disk.is_consistent() {
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
            res.state.lock().expect("state").crashed_primary = false;
        }
        let dirty_after = res.meta.lock().expect("meta").bitmaps[slot].count_dirty_bytes();
        res.update_peer(i, |s| {
            s.conn = ConnState::Connected;
            s.repl = enter;
            s.last_error = None;
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
        res.broadcast_state();
        if enter == ReplState::SyncSource {
            let (res2, conn) = (res.clone(), self.conn.clone());
            self.resync = Some(AbortOnDrop(tokio::spawn(async move {
                resync::run_source(res2, i, conn).await;
            })));
        }
        Ok(None)
    }

    async fn exchange_bitmaps(&mut self, reader: &mut Reader) -> Result<(), String> {
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
                offset,
                flags,
                payload,
            } => {
                self.check_receiving()?;
                if res.peers[i].protocol.peer_ack() == PeerAck::Received {
                    self.conn.send(Message::RecvAck { seq });
                }
                self.applier
                    .write(offset, payload, flags & FLAG_FUA != 0, seq);
            }
            Message::Zero {
                seq,
                offset,
                len,
                trim,
                fua,
            } => {
                self.check_receiving()?;
                if res.peers[i].protocol.peer_ack() == PeerAck::Received {
                    self.conn.send(Message::RecvAck { seq });
                }
                self.applier.zero(offset, len, trim, fua, seq);
            }
            Message::Barrier { .. } => self.applier.close_epoch(None),
            Message::Flush { seq } => self.applier.close_epoch(Some(Finish::Flush(seq))),
            Message::ResyncData {
                offset,
                len,
                zero,
                payload,
            } => self.applier.resync(offset, len, zero, payload),
            Message::ResyncDone => self.applier.close_epoch(Some(Finish::ResyncDone(i))),
            Message::RecvAck { seq } => self.conn.ack(seq, PeerAck::Received),
            Message::WriteAck { seq } => self.conn.ack(seq, PeerAck::Written),
            Message::FlushAck { seq } => self.conn.flush_ack(seq),
            Message::ResyncAck { offset, len } => {
                resync::acked(res, i, &self.conn, offset, len);
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
            Message::PeerState { role, disk } => res.update_peer(i, |s| {
                s.role = role;
                s.disk = disk;
            }),
            Message::Ping => self.conn.send(Message::PingAck),
            Message::PingAck => {}
            other => return Err(format!("unexpected {} after the handshake", other.name())),
        }
        Ok(())
    }

    fn check_receiving(&self) -> Result<(), String> {
        if self.res.role() == Role::Primary {
            return Err("peer sent writes while we are Primary (two primaries)".into());
        }
        Ok(())
    }
}

/// What to do when an epoch is complete.
enum Finish {
    /// Flush the disk, then `FlushAck`.
    Flush(u64),
    /// Resync from peer `.0` complete: flush, become UpToDate.
    ResyncDone(usize),
}

/// Applies the peer's writes: concurrently within an epoch, epochs in order.
struct Applier {
    res: Arc<Resource>,
    conn: Arc<Conn>,
    /// This node's bitmap slot for the peer (resync writes clear it: the copies agree there).
    slot: usize,
    /// Becomes true when every earlier epoch is on disk.
    prev: watch::Receiver<bool>,
    current: Vec<tokio::task::JoinHandle<bool>>,
    tasks: tokio::task::JoinSet<()>,
    fail_tx: mpsc::UnboundedSender<String>,
    failed: mpsc::UnboundedReceiver<String>,
}

impl Applier {
    fn new(res: Arc<Resource>, conn: Arc<Conn>, slot: usize) -> Applier {
        let (fail_tx, failed) = mpsc::unbounded_channel();
        Applier {
            res,
            conn,
            slot,
            prev: watch::channel(true).1,
            current: Vec::new(),
            tasks: tokio::task::JoinSet::new(),
            fail_tx,
            failed,
        }
    }

    fn abort(&mut self) {
        for h in self.current.drain(..) {
            h.abort();
        }
        self.tasks.abort_all();
    }

    fn spawn_write<F>(&mut self, f: F)
    where
        F: FnOnce(
                Arc<Resource>,
                Arc<Conn>,
            )
                -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
            + Send
            + 'static,
    {
        let mut prev = self.prev.clone();
        let (res, conn, fail) = (self.res.clone(), self.conn.clone(), self.fail_tx.clone());
        self.current.push(tokio::spawn(async move {
            if !*prev.borrow() && prev.wait_for(|d| *d).await.is_err() {
                return false;
            }
            match f(res, conn).await {
                Ok(()) => true,
                Err(e) => {
                    let _ = fail.send(e);
                    false
                }
            }
        }));
    }

    fn write(&mut self, offset: u64, data: Bytes, fua: bool, seq: u64) {
        self.spawn_write(move |res, conn| {
            Box::pin(async move {
                res.store
                    .write(offset, data, fua)
                    .await
                    .map_err(|e| format!("local write failed: {}", error_chain(&e)))?;
                conn.send(Message::WriteAck { seq });
                Ok(())
            })
        });
    }

    fn zero(&mut self, offset: u64, len: u64, trim: bool, fua: bool, seq: u64) {
        self.spawn_write(move |res, conn| {
            Box::pin(async move {
                res.store
                    .write_zeroes(offset, len, trim, fua)
                    .await
                    .map_err(|e| format!("local zeroing failed: {}", error_chain(&e)))?;
                conn.send(Message::WriteAck { seq });
                Ok(())
            })
        });
    }

    fn resync(&mut self, offset: u64, len: u32, zero: bool, payload: Bytes) {
        let slot = self.slot;
        self.spawn_write(move |res, conn| {
            Box::pin(async move {
                let r = if zero {
                    res.store
                        .write_zeroes(offset, u64::from(len), true, false)
                        .await
                } else {
                    res.store.write(offset, payload, false).await
                };
                r.map_err(|e| format!("resync write failed: {}", error_chain(&e)))?;
                // Both copies now agree on this range: a later handshake must not bring it
                // back through the bitmap exchange (that would restart, not resume, a resync).
                res.meta.lock().expect("meta").bitmaps[slot].clear_range(offset, u64::from(len));
                conn.send(Message::ResyncAck { offset, len });
                res.note_resync_received(u64::from(len));
                Ok(())
            })
        });
    }

    /// Ends the current epoch: the next one waits for it; `finish` runs once it is on disk.
    fn close_epoch(&mut self, finish: Option<Finish>) {
        if self.current.is_empty() && finish.is_none() {
            return;
        }
        let handles = std::mem::take(&mut self.current);
        let mut prev = self.prev.clone();
        let (done_tx, done_rx) = watch::channel(false);
        self.prev = done_rx;
        let (res, conn, fail) = (self.res.clone(), self.conn.clone(), self.fail_tx.clone());
        self.tasks.spawn(async move {
            if prev.wait_for(|d| *d).await.is_err() {
                return;
            }
            for h in handles {
                if !matches!(h.await, Ok(true)) {
                    return;
                }
            }
            match finish {
                None => {}
                Some(Finish::Flush(seq)) => match res.store.flush().await {
                    Ok(()) => conn.send(Message::FlushAck { seq }),
                    Err(e) => {
                        let _ = fail.send(format!("flush failed: {}", error_chain(&e)));
                        return;
                    }
                },
                Some(Finish::ResyncDone(i)) => {
                    if let Err(e) = res.store.flush().await {
                        let _ = fail.send(format!("flush failed: {}", error_chain(&e)));
                        return;
                    }
                    let slot = res.peers[i].slot;
                    let r = res
                        .meta_io(move |m| {
                            m.bitmaps[slot].clear_all();
                            m.save_bitmap(slot)?;
                            m.sb.flags |= flags::CONSISTENT | flags::WAS_UP_TO_DATE;
                            m.save_sb()
                        })
                        .await;
                    if let Err(e) = r {
                        let _ = fail.send(format!("cannot persist resync end: {e}"));
                        return;
                    }
                    res.set_disk(DiskState::UpToDate);
                    res.update_peer(i, |s| {
                        s.repl = ReplState::Established;
                        s.resync_done = s.resync_total;
                    });
                    res.emit(Some(i), "resync-done", "target");
                }
            }
            let _ = done_tx.send(true);
        });
        // Reap finished closers now and then.
        while self.tasks.try_join_next().is_some() {}
    }
}
