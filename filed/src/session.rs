//! One sync session between two hosts over an authenticated [`Connection`]: the initiator sends
//! its dirty entries, the listener decides every path with [`plan::decide`] and answers with
//! decisions, then file data streams in both directions (full, delta, rename, metadata, delete)
//! without a round trip per file (see [`crate::proto`] for the message order). Both sides apply
//! what they receive with [`Applier`], then record agreed states, clear dirty marks and keep
//! conflicts in the store.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::apply::{Applier, ApplyError, PendingFile, unchanged_since_decision};
use crate::config::Group;
use crate::delta::{BaseSignature, DeltaApplier, DeltaEncoder, DeltaError, DeltaOptions};
use crate::entry::{FileState, Kind, now_ns};
use crate::node::{Node, NodeError};
use crate::plan::{self, Decision, Outgoing, Sides, Transfer};
use crate::proto::{DATA_CHUNK, Message, PROTOCOL_VERSION, WireDecision, WireTransfer};
use crate::scan::{ScanError, ScanOptions, scan_group};
use crate::store::{Batch, Conflict, Force, Op, PeerStatus, StoreError};
use crate::transport::{Connection, TransportError};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection to {peer} failed")]
    Transport {
        peer: String,
        #[source]
        source: TransportError,
    },
    #[error("{peer} closed the connection during the session")]
    Closed { peer: String },
    #[error("{peer} sent nothing for {after:?}; session abandoned")]
    Idle { peer: String, after: Duration },
    #[error("malformed message from {peer}")]
    Decode {
        peer: String,
        #[source]
        source: crate::codec::DecodeError,
    },
    #[error("unexpected {got} from {peer} (expected {expected})")]
    Unexpected {
        peer: String,
        got: &'static str,
        expected: &'static str,
    },
    #[error("{peer} refused: {message}")]
    Refused { peer: String, message: String },
    #[error("state database error")]
    Store(#[source] StoreError),
    #[error("scan failed")]
    Scan(#[source] ScanError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot prepare writes for group {group}")]
    Apply {
        group: String,
        #[source]
        source: ApplyError,
    },
    #[error("{peer} sent a path refused here: {path:?}")]
    BadPath { peer: String, path: String },
    #[error(
        "{peer} sent a signature for {path:?}, which expects none (no delta of it is sent here, or its signature came already)"
    )]
    UnexpectedSignature { peer: String, path: String },
    #[error("{peer} decided to transfer the content of {path:?} without the file's state")]
    NoState { peer: String, path: String },
    #[error(
        "{peer} is a slave of group {group} and may not send changes (it decided to send {path:?})"
    )]
    SlaveSends {
        peer: String,
        group: String,
        path: String,
    },
}

/// What one session did.
#[derive(Debug, Default, Clone)]
pub struct SessionReport {
    pub group: String,
    pub peer: String,
    pub pushed: Vec<String>,
    pub pulled: Vec<String>,
    pub renamed: Vec<(String, String)>,
    pub in_sync: usize,
    pub conflicts: Vec<String>,
    pub held: Vec<String>,
    /// Per-path failures (the path stays dirty and is retried next time).
    pub errors: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// This side started the session.
    pub initiator: bool,
}

/// One path of a session, seen from the initiator (`local` = initiator's state).
#[derive(Debug, Clone)]
struct Item {
    path: String,
    decision: WireDecision,
    transfer: WireTransfer,
    /// The initiator's state.
    client: Option<FileState>,
    /// The listener's state.
    server: Option<FileState>,
    winner: Option<FileState>,
}

fn wire_transfer(t: &Transfer) -> WireTransfer {
    match t {
        Transfer::Full => WireTransfer::Full,
        Transfer::Delta => WireTransfer::Delta,
        Transfer::Meta => WireTransfer::Meta,
        Transfer::MetaOnly => WireTransfer::MetaOnly,
        Transfer::Delete => WireTransfer::Delete,
        Transfer::Rename { from } => WireTransfer::Rename { from: from.clone() },
    }
}

/// The rsync signature of our current version of `path`, for the peer to send a delta against;
/// empty (the peer then sends the file whole) when there is no readable current version.
fn base_signature(applier: &Applier, path: &str) -> Vec<u8> {
    match applier.open_current(path) {
        Ok(Some(f)) => {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            BaseSignature::compute(std::io::BufReader::with_capacity(1 << 16, f), len)
                .map(|s| s.as_bytes().to_vec())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

fn has_data(t: &WireTransfer) -> bool {
    matches!(t, WireTransfer::Full | WireTransfer::Delta)
}

/// Order in which the receiver applies items: renames, deletions (deepest first), then creations
/// and updates (parents first), then everything without a transfer.
fn apply_order(a: &Item, b: &Item) -> std::cmp::Ordering {
    fn rank(it: &Item) -> u8 {
        match (&it.decision, &it.transfer) {
            (WireDecision::Push | WireDecision::Pull, WireTransfer::Rename { .. }) => 0,
            (WireDecision::Push | WireDecision::Pull, WireTransfer::Delete) => 1,
            (WireDecision::Push | WireDecision::Pull, _) => 2,
            _ => 3,
        }
    }
    let (ra, rb) = (rank(a), rank(b));
    match ra.cmp(&rb) {
        std::cmp::Ordering::Equal if ra == 1 => b.path.cmp(&a.path),
        std::cmp::Ordering::Equal => a.path.cmp(&b.path),
        o => o,
    }
}

/// Logs (at debug level) how long each phase of a session took.
struct PhaseTimer {
    side: &'static str,
    peer: String,
    last: std::time::Instant,
}

impl PhaseTimer {
    fn new(side: &'static str, peer: &str) -> PhaseTimer {
        PhaseTimer {
            side,
            peer: peer.to_string(),
            last: std::time::Instant::now(),
        }
    }
    fn mark(&mut self, phase: &str) {
        let now = std::time::Instant::now();
        let ms = now
            .duration_since(std::mem::replace(&mut self.last, now))
            .as_secs_f64()
            * 1e3;
        tracing::debug!(side = self.side, peer = %self.peer, phase, ms = format!("{ms:.1}"), "session phase");
    }
}

/// How long a session waits for the peer's next message before giving up. A peer that stalls
/// mid-session (its kernel still answering keepalives, so [`crate::transport::PEER_DEAD_AFTER`]
/// never fires) would otherwise hold the group here for ever: syncs of it would wait and other
/// peers would get "busy". Longer than the longest legitimate silence: the listener's scan before
/// it answers the hello (`filed serve` scans the whole group) or a signature of a large base, and
/// enough to receive a largest frame (16 MiB) at about 60 KB/s.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A fed message goes out at the latest this long after the last flush: a long stream of small
/// messages (delta chunks of a large file that mostly matches its base encode to a few bytes
/// per 4 MiB read) must keep reaching the peer, which would otherwise sit silent past its
/// [`SESSION_IDLE_TIMEOUT`] while the buffer fills.
const FEED_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A framed message link with the peer's name for errors.
struct Link<'a> {
    conn: &'a mut Connection,
    peer: String,
    /// Longest wait for one message ([`SESSION_IDLE_TIMEOUT`]).
    idle: Duration,
    /// When the buffered messages last went out.
    flushed: std::time::Instant,
}

impl Link<'_> {
    fn new(conn: &mut Connection, peer: String, idle: Duration) -> Link<'_> {
        Link {
            conn,
            peer,
            idle,
            flushed: std::time::Instant::now(),
        }
    }
    async fn feed(&mut self, m: &Message) -> Result<(), SessionError> {
        self.conn
            .feed(&m.encode())
            .await
            .map_err(|source| SessionError::Transport {
                peer: self.peer.clone(),
                source,
            })?;
        if self.flushed.elapsed() >= FEED_FLUSH_EVERY {
            self.flush().await?;
        }
        Ok(())
    }
    async fn flush(&mut self) -> Result<(), SessionError> {
        self.conn
            .flush()
            .await
            .map_err(|source| SessionError::Transport {
                peer: self.peer.clone(),
                source,
            })?;
        self.flushed = std::time::Instant::now();
        Ok(())
    }
    async fn send(&mut self, m: &Message) -> Result<(), SessionError> {
        self.feed(m).await?;
        self.flush().await
    }
    async fn recv(&mut self) -> Result<Message, SessionError> {
        let frame: Option<Bytes> = tokio::time::timeout(self.idle, self.conn.recv())
            .await
            .map_err(|_| SessionError::Idle {
                peer: self.peer.clone(),
                after: self.idle,
            })?
            .map_err(|source| SessionError::Transport {
                peer: self.peer.clone(),
                source,
            })?;
        let frame = frame.ok_or_else(|| SessionError::Closed {
            peer: self.peer.clone(),
        })?;
        let m = Message::decode(&frame).map_err(|source| SessionError::Decode {
            peer: self.peer.clone(),
            source,
        })?;
        if let Message::Error { message } = m {
            return Err(SessionError::Refused {
                peer: self.peer.clone(),
                message,
            });
        }
        Ok(m)
    }
    fn unexpected(&self, got: &Message, expected: &'static str) -> SessionError {
        SessionError::Unexpected {
            peer: self.peer.clone(),
            got: got.name(),
            expected,
        }
    }
}

/// The peer's signatures for the deltas this side sends: accepted only for a path a delta is
/// sent for, once each, so the peer cannot make this side keep signatures (up to a frame, 16 MiB,
/// each) for paths it never needs them for.
#[derive(Debug, Default)]
struct Signatures {
    /// Paths a delta is sent for whose signature has not come yet.
    awaited: HashSet<String>,
    received: HashMap<String, Vec<u8>>,
}

impl Signatures {
    /// A delta of `path` is sent: its signature is awaited.
    fn expect(&mut self, path: &str) {
        if !self.received.contains_key(path) {
            self.awaited.insert(path.to_string());
        }
    }

    /// Takes the peer's signature of `path`; one not awaited is a protocol error
    /// ([`SessionError::UnexpectedSignature`] with the path given back).
    fn accept(&mut self, path: String, bytes: Vec<u8>) -> Result<(), String> {
        if !self.awaited.remove(&path) {
            return Err(path);
        }
        self.received.insert(path, bytes);
        Ok(())
    }

    /// The signature received for `path`, if any.
    fn take(&mut self, path: &str) -> Option<Vec<u8>> {
        self.received.remove(path)
    }
}

/// Sends the winner's content of `it` (this side is the sender). Failures to read the local file
/// are sent as an `Outcome` with the error in place of the data.
async fn send_data(
    link: &mut Link<'_>,
    applier: &Applier,
    it: &Item,
    signature: Option<Vec<u8>>,
) -> Result<(), SessionError> {
    let res = match it.transfer {
        WireTransfer::Full => send_full(link, applier, &it.path).await,
        WireTransfer::Delta => match signature {
            Some(sig) => send_delta(link, applier, &it.path, sig).await,
            None => Ok(Err("no signature received for delta".to_string())),
        },
        _ => return Ok(()),
    }?;
    if let Err(error) = res {
        link.feed(&Message::Outcome {
            path: it.path.clone(),
            error: Some(error),
        })
        .await?;
    }
    Ok(())
}

async fn send_full(
    link: &mut Link<'_>,
    applier: &Applier,
    path: &str,
) -> Result<Result<(), String>, SessionError> {
    let mut f = match applier.open_current(path) {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(Err(format!("{path}: vanished on the sender"))),
        Err(e) => return Ok(Err(format!("{path}: {}", error_chain(&e)))),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    link.feed(&Message::FileStart {
        path: path.to_string(),
        len,
    })
    .await?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; DATA_CHUNK.min(len.max(1) as usize).max(1)];
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                // The receiver sees the hash mismatch and drops the temp file.
                tracing::warn!(path, error = %e, "read failed while sending");
                break;
            }
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        link.feed(&Message::Data {
            bytes: buf[..n].to_vec(),
        })
        .await?;
    }
    link.feed(&Message::FileEnd {
        hash: *hasher.finalize().as_bytes(),
    })
    .await?;
    Ok(Ok(()))
}

async fn send_delta(
    link: &mut Link<'_>,
    applier: &Applier,
    path: &str,
    sig: Vec<u8>,
) -> Result<Result<(), String>, SessionError> {
    let f = match applier.open_current(path) {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(Err(format!("{path}: vanished on the sender"))),
        Err(e) => return Ok(Err(format!("{path}: {}", error_chain(&e)))),
    };
    let sig = match BaseSignature::parse(sig) {
        Ok(s) => s,
        Err(e) => return Ok(Err(format!("{path}: {}", error_chain(&e)))),
    };
    let index = sig.index();
    let mut enc = DeltaEncoder::new(
        &sig,
        &index,
        std::io::BufReader::with_capacity(1 << 16, f),
        DeltaOptions::default(),
    );
    let mut first = true;
    loop {
        match enc.next_chunk() {
            Ok(Some(chunk)) => {
                first = false;
                link.feed(&Message::DeltaChunk { bytes: chunk }).await?;
            }
            Ok(None) => break,
            Err(e) => {
                if first {
                    return Ok(Err(format!("{path}: {}", error_chain(&e))));
                }
                // Mid-stream: end the file; the receiver's hash check fails and it drops it.
                break;
            }
        }
    }
    let sum = enc.finish();
    link.feed(&Message::FileEnd {
        hash: *sum.hash.as_bytes(),
    })
    .await?;
    Ok(Ok(()))
}

/// Why `path` must not be replaced: it is no longer what the decision assumed (`expected`), or
/// it cannot be examined.
fn changed_here(applier: &Applier, path: &str, expected: Option<&FileState>) -> Option<String> {
    match applier.current(path) {
        Ok(now) if unchanged_since_decision(expected, now.as_ref()) => None,
        Ok(_) => Some(error_chain(&ApplyError::ChangedSinceDecision {
            path: path.into(),
        })),
        Err(e) => Some(error_chain(&e)),
    }
}

/// Receives and applies one item (this side is the receiver). Always consumes the item's
/// messages, so a failed item does not desynchronise the stream.
#[allow(clippy::too_many_arguments)]
async fn receive_item(
    link: &mut Link<'_>,
    applier: &Applier,
    it: &Item,
    mine: Option<&FileState>,
    expected: Option<&FileState>,
    dirs: &mut Vec<(String, FileState)>,
    queue: &mut Vec<(PendingFile, FileState)>,
) -> Result<Result<(), String>, SessionError> {
    let winner = it.winner.clone();
    let path = it.path.as_str();
    let local = |r: Result<(), ApplyError>| r.map_err(|e| error_chain(&e));
    let refuse = match &it.transfer {
        WireTransfer::None => None,
        // Deleting what is already gone is fine; otherwise it must be what was decided on.
        WireTransfer::Delete => match applier.current(path) {
            Ok(None) => None,
            _ => changed_here(applier, path, expected),
        },
        _ => changed_here(applier, path, expected),
    };
    if let Some(why) = &refuse
        && !has_data(&it.transfer)
    {
        return Ok(Err(why.clone()));
    }
    match &it.transfer {
        WireTransfer::None => Ok(Ok(())),
        WireTransfer::Delete => Ok(local(applier.delete(path))),
        WireTransfer::Rename { from } => {
            let Some(w) = winner else {
                return Ok(Err("rename without a state".into()));
            };
            let Some(src) = mine else {
                return Ok(Err(format!("{from}: rename source unknown here")));
            };
            Ok(local(applier.rename(from, path, src, &w)))
        }
        WireTransfer::Meta | WireTransfer::MetaOnly => {
            let Some(w) = winner else {
                return Ok(Err("no state".into()));
            };
            Ok(local(match (w.kind, &it.transfer) {
                (Kind::Dir, _) => applier
                    .make_dir(path, &w)
                    .map(|_| dirs.push((path.to_string(), w.clone()))),
                (Kind::Symlink, _) => applier.make_symlink(path, &w),
                (_, WireTransfer::MetaOnly) => applier.set_meta(path, &w),
                _ => Err(ApplyError::Rejected(crate::filter::PathRejected::Empty)),
            }))
        }
        WireTransfer::Full | WireTransfer::Delta => {
            // The sender streams the data whatever happens here; skipping it would read the
            // next item's messages as this one's. Without the state (size, hash) the data
            // cannot be checked: the decision is malformed and the session ends.
            let Some(w) = winner else {
                return Err(SessionError::NoState {
                    peer: link.peer.clone(),
                    path: path.to_string(),
                });
            };
            receive_content(
                link,
                applier,
                path,
                &w,
                expected,
                it.transfer == WireTransfer::Delta,
                queue,
                refuse,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive_content(
    link: &mut Link<'_>,
    applier: &Applier,
    path: &str,
    w: &FileState,
    expected: Option<&FileState>,
    delta: bool,
    queue: &mut Vec<(PendingFile, FileState)>,
    refuse: Option<String>,
) -> Result<Result<(), String>, SessionError> {
    // Prepare the target; on failure keep consuming the stream.
    let mut failure: Option<String> = refuse;
    let mut pending = match failure {
        Some(_) => None,
        None => match applier.begin_file(path, expected) {
            Ok(p) => Some(p),
            Err(e) => {
                failure = Some(error_chain(&e));
                None
            }
        },
    };
    let mut hasher = blake3::Hasher::new();
    let mut written: u64 = 0;
    let mut applier_state: Option<DeltaApplier<BufWriter<std::fs::File>>> = None;
    if delta && failure.is_none() {
        match applier.open_current(path) {
            Ok(Some(base)) => {
                let out = pending.as_ref().and_then(|p| p.file.try_clone().ok());
                match out
                    .map(|o| DeltaApplier::new(base, BufWriter::with_capacity(1 << 16, o), w.size))
                {
                    Some(Ok(a)) => applier_state = Some(a),
                    Some(Err(e)) => failure = Some(error_chain(&e)),
                    None => failure = Some("cannot clone the temp file handle".into()),
                }
            }
            Ok(None) => failure = Some("delta base vanished".into()),
            Err(e) => failure = Some(error_chain(&e)),
        }
    }
    let mut started = delta;
    loop {
        let m = link.recv().await?;
        match m {
            Message::Outcome { error, .. } if !started || delta => {
                // The sender could not send this item.
                return Ok(Err(error.unwrap_or_else(|| "sender aborted".into())));
            }
            Message::FileStart { path: p, len } if !delta && !started => {
                started = true;
                if p != path {
                    return Err(SessionError::BadPath {
                        peer: link.peer.clone(),
                        path: p,
                    });
                }
                if len != w.size && failure.is_none() {
                    failure = Some(format!(
                        "sender's file has {len} bytes, expected {}",
                        w.size
                    ));
                }
            }
            Message::Data { bytes } if started && !delta => {
                if failure.is_none() && written + bytes.len() as u64 > w.size {
                    // More than the agreed size: stop writing (a sender that does not stop
                    // cannot fill this disk); the file is refused at its end.
                    failure = Some(format!(
                        "the sender sent more than the {} bytes agreed",
                        w.size
                    ));
                }
                if failure.is_none()
                    && let Some(p) = pending.as_mut()
                {
                    written += bytes.len() as u64;
                    hasher.update(&bytes);
                    if let Err(e) = p.file.write_all(&bytes) {
                        failure = Some(format!("write failed: {e}"));
                    }
                }
            }
            Message::DeltaChunk { bytes } if delta => {
                if failure.is_none()
                    && let Some(a) = applier_state.as_mut()
                    && let Err(e) = a.apply_chunk(&bytes)
                {
                    failure = Some(error_chain(&e));
                }
            }
            Message::FileEnd { hash } if started => {
                if let Some(f) = failure {
                    return Ok(Err(f));
                }
                if hash != w.hash {
                    return Ok(Err("the sender's file changed since its scan (hash differs); retried next sync".into()));
                }
                if delta {
                    let a = applier_state
                        .take()
                        .expect("delta applier present without failure");
                    if let Err(e) = a
                        .finish(&blake3::Hash::from(hash))
                        .and_then(|mut out| out.flush().map_err(DeltaError::Write))
                    {
                        return Ok(Err(error_chain(&e)));
                    }
                } else if written != w.size || *hasher.finalize().as_bytes() != hash {
                    return Ok(Err("received data does not match the sender's hash".into()));
                }
                let p = pending
                    .take()
                    .expect("pending file present without failure");
                queue.push((p, w.clone()));
                return Ok(Ok(()));
            }
            other => return Err(link.unexpected(&other, "file data")),
        }
    }
}

/// Received files are committed in batches of this many (or [`COMMIT_BYTES`]).
const COMMIT_FILES: usize = 512;
const COMMIT_BYTES: u64 = 64 << 20;

/// Commits received files in batches ([`Applier::commit_files`]: one filesystem flush per batch)
/// on a blocking thread, while the next batch is received. At most one batch is in flight;
/// batches are committed in order.
struct Committer {
    applier: Arc<Applier>,
    /// Files received and verified, waiting for the next batch.
    queue: Vec<(PendingFile, FileState)>,
    inflight: Option<(Vec<String>, tokio::task::JoinHandle<CommitResults>)>,
}

type CommitResults = Vec<(String, Result<(), ApplyError>)>;

impl Committer {
    fn new(applier: Arc<Applier>) -> Committer {
        Committer {
            applier,
            queue: Vec::new(),
            inflight: None,
        }
    }

    /// Starts committing the queue when the batch is full (or always with `force`).
    async fn flush(&mut self, errors: &mut HashMap<String, String>, force: bool) {
        let bytes: u64 = self.queue.iter().map(|(_, s)| s.size).sum();
        if self.queue.is_empty()
            || (!force && self.queue.len() < COMMIT_FILES && bytes < COMMIT_BYTES)
        {
            return;
        }
        self.wait(errors).await;
        let batch = std::mem::take(&mut self.queue);
        let paths = batch.iter().map(|(p, _)| p.logical().to_string()).collect();
        let applier = self.applier.clone();
        let handle = tokio::task::spawn_blocking(move || applier.commit_files(batch));
        self.inflight = Some((paths, handle));
    }

    /// Waits for the batch in flight and records its failures.
    async fn wait(&mut self, errors: &mut HashMap<String, String>) {
        let Some((paths, handle)) = self.inflight.take() else {
            return;
        };
        match handle.await {
            Ok(results) => {
                for (path, res) in results {
                    if let Err(e) = res {
                        errors.insert(path, error_chain(&e));
                    }
                }
            }
            Err(e) => {
                for path in paths {
                    errors.insert(path, format!("commit failed: {e}"));
                }
            }
        }
    }

    /// Commits everything queued and waits for it.
    async fn finish(&mut self, errors: &mut HashMap<String, String>) {
        self.flush(errors, true).await;
        self.wait(errors).await;
    }
}

/// Ends a receive phase: commits what is queued, fixes directory metadata, makes it all durable.
async fn finish_receive(
    node: &Node,
    group: &Group,
    applier: &Applier,
    received: &[&Item],
    dirs: &mut Vec<(String, FileState)>,
    committer: &mut Committer,
    errors: &mut HashMap<String, String>,
) {
    committer.finish(errors).await;
    finish_dirs(node, group, applier, received, dirs, errors);
    if let Err(e) = applier.sync() {
        // Nothing received is recorded as agreed when it may not be durable.
        for it in received {
            errors
                .entry(it.path.clone())
                .or_insert_with(|| error_chain(&e));
        }
    }
}

/// Sets the mtimes of directories whose contents were just written, deepest first: directories
/// received in this batch get the sender's metadata; other parents of received paths get back the
/// mtime recorded for them, so this side's own writes do not show up as local changes.
fn finish_dirs(
    node: &Node,
    group: &Group,
    applier: &Applier,
    received: &[&Item],
    dirs: &mut Vec<(String, FileState)>,
    errors: &mut HashMap<String, String>,
) {
    let explicit: std::collections::HashSet<String> = dirs.iter().map(|(p, _)| p.clone()).collect();
    for it in received {
        let mut parents = vec![it.path.as_str()];
        if let WireTransfer::Rename { from } = &it.transfer {
            parents.push(from.as_str());
        }
        for p in parents {
            let Some(i) = p.rfind('/').filter(|&i| i > 0) else {
                continue;
            };
            let parent = &p[..i];
            if explicit.contains(parent) || dirs.iter().any(|(d, _)| d == parent) {
                continue;
            }
            if let Ok(Some(st)) = node.store.file(&group.name, parent)
                && st.kind == Kind::Dir
            {
                dirs.push((parent.to_string(), st));
            }
        }
    }
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (p, st) in dirs.drain(..) {
        if let Err(e) = applier.set_meta(&p, &st)
            && explicit.contains(&p)
        {
            errors.insert(p, error_chain(&e));
        }
    }
}

/// Records the outcome of a session in the store (same on both sides, from this side's view).
#[allow(clippy::too_many_arguments)]
fn record(
    node: &Node,
    group: &Group,
    peer: &str,
    items: &[Item],
    i_am_client: bool,
    my_errors: &HashMap<String, String>,
    peer_errors: &HashMap<String, String>,
    applier: &Applier,
    report: &mut SessionReport,
) -> Result<(), StoreError> {
    let mut b = Batch::new();
    let g = group.name.clone();
    let now = now_ns();
    let others: Vec<String> = group
        .peers_of(&node.me.name)
        .into_iter()
        .filter(|p| p != peer)
        .collect();
    for it in items {
        let (mine, theirs) = if i_am_client {
            (&it.client, &it.server)
        } else {
            (&it.server, &it.client)
        };
        // From this side's view: do I send (push) or receive (pull)?
        let my_decision = if i_am_client {
            it.decision
        } else {
            mirror(it.decision)
        };
        let path = it.path.clone();
        let clear = |b: &mut Batch| {
            b.push(Op::ClearDirty {
                group: g.clone(),
                peer: peer.into(),
                path: path.clone(),
            });
            b.push(Op::ClearConflict {
                group: g.clone(),
                peer: peer.into(),
                path: path.clone(),
            });
        };
        let agree = |b: &mut Batch, st: &Option<FileState>| match st.as_ref().filter(|s| s.exists())
        {
            Some(s) => b.push(Op::SetAgreed {
                group: g.clone(),
                peer: peer.into(),
                path: path.clone(),
                state: s.clone(),
            }),
            None => b.push(Op::RemoveAgreed {
                group: g.clone(),
                peer: peer.into(),
                path: path.clone(),
            }),
        };
        match my_decision {
            WireDecision::InSync => {
                agree(&mut b, mine);
                clear(&mut b);
                report.in_sync += 1;
            }
            WireDecision::Hold => report.held.push(path.clone()),
            WireDecision::Conflict => {
                b.push(Op::SetConflict(Conflict {
                    group: g.clone(),
                    peer: peer.into(),
                    path: path.clone(),
                    local: mine.clone().unwrap_or_else(|| FileState::deleted(0)),
                    remote: theirs.clone().unwrap_or_else(|| FileState::deleted(0)),
                    seen_ns: now,
                }));
                report.conflicts.push(path.clone());
            }
            WireDecision::Push => {
                if let Some(e) = peer_errors.get(&path) {
                    report.errors.push(format!("{path}: on {peer}: {e}"));
                    continue;
                }
                agree(&mut b, &it.winner);
                clear(&mut b);
                match &it.transfer {
                    WireTransfer::Rename { from } => {
                        report.renamed.push((from.clone(), path.clone()))
                    }
                    _ => report.pushed.push(path.clone()),
                }
            }
            WireDecision::Pull => {
                if let Some(e) = my_errors.get(&path) {
                    report.errors.push(format!("{path}: {e}"));
                    continue;
                }
                agree(&mut b, &it.winner);
                clear(&mut b);
                // What was written (captured from the written inode itself, so a user edit
                // right after the rename is not mistaken for it), with the winner's hash.
                let local = match it.winner.as_ref().filter(|w| w.exists()) {
                    None => FileState::deleted(now),
                    Some(w) => match applier
                        .written_state(&path)
                        .filter(|st| st.kind == w.kind)
                        .map(Ok)
                        .unwrap_or_else(|| {
                            applier
                                .current(&path)
                                .map(|c| c.unwrap_or_else(|| w.clone()))
                        }) {
                        Ok(mut st) => {
                            st.hash = w.hash;
                            st.target = w.target.clone();
                            // Not root: the owner could not be applied; the group's owner
                            // is recorded, so it is not a local change (`crate::owner`).
                            crate::owner::keep_owner(
                                &mut st,
                                Some(w),
                                None,
                                crate::owner::can_set_owner(),
                            );
                            st
                        }
                        _ => w.clone(),
                    },
                };
                b.push(Op::SetFile {
                    group: g.clone(),
                    path: path.clone(),
                    state: local,
                });
                for o in &others {
                    b.push(Op::MarkDirty {
                        group: g.clone(),
                        peer: o.clone(),
                        path: path.clone(),
                        force: Force::None,
                    });
                }
                report.pulled.push(path.clone());
            }
        }
    }
    b.push(Op::SetPeerStatus {
        group: g.clone(),
        peer: peer.into(),
        status: PeerStatus {
            last_ok_ns: now,
            last_attempt_ns: now,
            last_error: report.errors.first().cloned().unwrap_or_default(),
        },
    });
    node.store.commit(b)?;
    node.note_written(&g, &applier.take_written());
    Ok(())
}

/// Refuses a listener's decision this side must not carry out: a path outside the group, a
/// rename from one, or a change sent by a slave (a slave's changes are never applied
/// elsewhere, whatever the slave decided).
fn check_decision(
    group: &Group,
    peer: &str,
    path: &str,
    decision: WireDecision,
    transfer: &WireTransfer,
) -> Result<(), SessionError> {
    let bad_path = |path: &str| SessionError::BadPath {
        peer: peer.to_string(),
        path: path.to_string(),
    };
    if group.filter.check(path).is_err() {
        return Err(bad_path(path));
    }
    if let WireTransfer::Rename { from } = transfer
        && group.filter.check(from).is_err()
    {
        return Err(bad_path(from));
    }
    if decision == WireDecision::Pull && group.is_slave(peer) {
        return Err(SessionError::SlaveSends {
            peer: peer.to_string(),
            group: group.name.clone(),
            path: path.to_string(),
        });
    }
    Ok(())
}

fn mirror(d: WireDecision) -> WireDecision {
    match d {
        WireDecision::Push => WireDecision::Pull,
        WireDecision::Pull => WireDecision::Push,
        d => d,
    }
}

/// Records a failed session attempt with a peer (for `filed status`).
pub fn record_failure(node: &Node, group: &str, peer: &str, error: &str) {
    let old = node.store.peer_status(group, peer).unwrap_or_default();
    let mut b = Batch::new();
    b.push(Op::SetPeerStatus {
        group: group.into(),
        peer: peer.into(),
        status: PeerStatus {
            last_ok_ns: old.last_ok_ns,
            last_attempt_ns: now_ns(),
            last_error: error.into(),
        },
    });
    let _ = node.store.commit(b);
}

/// The initiator's side of a session with `peer` for `group` (the local scan is done by the caller,
/// and so are the actions, after releasing the group lock: [`crate::actions::run_after_session`]).
pub async fn run_client(
    node: &Node,
    group: &Group,
    conn: &mut Connection,
) -> Result<SessionReport, SessionError> {
    let peer = conn.peer_name().to_string();
    let applier = Applier::new(&node.me, group, node.store.clone())
        .map(Arc::new)
        .map_err(|source| SessionError::Apply {
            group: group.name.clone(),
            source,
        })?;
    let mut link = Link::new(conn, peer.clone(), SESSION_IDLE_TIMEOUT);
    let mut report = SessionReport {
        group: group.name.clone(),
        peer: peer.clone(),
        initiator: true,
        ..Default::default()
    };
    link.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        group: group.name.clone(),
        from: node.me.name.clone(),
    })
    .await?;
    match link.recv().await? {
        Message::HelloOk { .. } => {}
        other => return Err(link.unexpected(&other, "HelloOk")),
    }
    let mut timer = PhaseTimer::new("client", &peer);
    timer.mark("hello");
    // Step 2: our dirty entries for this peer.
    let store = &node.store;
    let dirty = store
        .dirty(&group.name, &peer)
        .map_err(SessionError::Store)?;
    let looked_up = {
        let refs: Vec<&str> = dirty.iter().map(|d| d.path.as_str()).collect();
        store
            .lookup(&group.name, Some(&peer), &refs)
            .map_err(SessionError::Store)?
    };
    for (d, (state, base)) in dirty.into_iter().zip(looked_up) {
        link.feed(&Message::Entry {
            path: d.path,
            state,
            base,
            force: d.force.code(),
        })
        .await?;
    }
    link.send(&Message::End).await?;

    timer.mark("send entries");
    // Step 3: decisions and signatures for our delta pushes.
    let mut items = Vec::new();
    let mut sigs = Signatures::default();
    loop {
        match link.recv().await? {
            Message::Decision {
                path,
                decision,
                transfer,
                remote,
                winner,
            } => {
                check_decision(group, &peer, &path, decision, &transfer)?;
                if decision == WireDecision::Push && transfer == WireTransfer::Delta {
                    sigs.expect(&path);
                }
                items.push(Item {
                    path,
                    decision,
                    transfer,
                    client: None,
                    server: remote,
                    winner,
                });
            }
            Message::Signature { path, bytes } => {
                sigs.accept(path, bytes)
                    .map_err(|path| SessionError::UnexpectedSignature {
                        peer: peer.clone(),
                        path,
                    })?
            }
            Message::End => break,
            other => return Err(link.unexpected(&other, "Decision")),
        }
    }
    let looked_up = {
        let refs: Vec<&str> = items.iter().map(|i| i.path.as_str()).collect();
        store
            .lookup(&group.name, None, &refs)
            .map_err(SessionError::Store)?
    };
    for (it, (client, _)) in items.iter_mut().zip(looked_up) {
        it.client = client;
    }
    timer.mark("receive decisions");
    // Step 4: our push data, then signatures for delta pulls.
    for it in items
        .iter()
        .filter(|i| i.decision == WireDecision::Push && has_data(&i.transfer))
    {
        send_data(&mut link, &applier, it, sigs.take(&it.path)).await?;
    }
    for it in items
        .iter()
        .filter(|i| i.decision == WireDecision::Pull && i.transfer == WireTransfer::Delta)
    {
        link.feed(&Message::Signature {
            path: it.path.clone(),
            bytes: base_signature(&applier, &it.path),
        })
        .await?;
    }
    link.send(&Message::End).await?;

    timer.mark("send data");
    // Step 5: outcomes of our pushes, then pulled data.
    let mut peer_errors = HashMap::new();
    for _ in items.iter().filter(|i| i.decision == WireDecision::Push) {
        match link.recv().await? {
            Message::Outcome {
                path,
                error: Some(e),
            } => {
                peer_errors.insert(path, e);
            }
            Message::Outcome { .. } => {}
            other => return Err(link.unexpected(&other, "Outcome")),
        }
    }
    let mut my_errors = HashMap::new();
    let mut dirs = Vec::new();
    let mut committer = Committer::new(applier.clone());
    for it in items.iter().filter(|i| i.decision == WireDecision::Pull) {
        let src = match &it.transfer {
            WireTransfer::Rename { from } => {
                store.file(&group.name, from).map_err(SessionError::Store)?
            }
            _ => None,
        };
        if let Err(e) = receive_item(
            &mut link,
            &applier,
            it,
            src.as_ref(),
            it.client.as_ref(),
            &mut dirs,
            &mut committer.queue,
        )
        .await?
        {
            my_errors.insert(it.path.clone(), e);
        }
        committer.flush(&mut my_errors, false).await;
    }
    let received: Vec<&Item> = items
        .iter()
        .filter(|i| i.decision == WireDecision::Pull)
        .collect();
    finish_receive(
        node,
        group,
        &applier,
        &received,
        &mut dirs,
        &mut committer,
        &mut my_errors,
    )
    .await;
    match link.recv().await? {
        Message::End => {}
        other => return Err(link.unexpected(&other, "End")),
    }
    // Step 6: our outcomes.
    for it in items.iter().filter(|i| i.decision == WireDecision::Pull) {
        link.feed(&Message::Outcome {
            path: it.path.clone(),
            error: my_errors.get(&it.path).cloned(),
        })
        .await?;
    }
    link.send(&Message::End).await?;
    timer.mark("outcomes+pulls");
    record(
        node,
        group,
        &peer,
        &items,
        true,
        &my_errors,
        &peer_errors,
        &applier,
        &mut report,
    )
    .map_err(SessionError::Store)?;
    timer.mark("record");
    let c = link.conn.counters();
    report.bytes_sent = c.sent();
    report.bytes_received = c.received();
    node.session_done(&report);
    Ok(report)
}

/// The peer's view of a group for `filed compare`: every existing path with its state and the
/// state it last agreed on with us.
pub async fn fetch_listing(
    node: &Node,
    group: &Group,
    conn: &mut Connection,
) -> Result<Vec<(String, FileState, Option<FileState>)>, SessionError> {
    let peer = conn.peer_name().to_string();
    let mut link = Link::new(conn, peer.clone(), SESSION_IDLE_TIMEOUT);
    link.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        group: group.name.clone(),
        from: node.me.name.clone(),
    })
    .await?;
    match link.recv().await? {
        Message::HelloOk { .. } => {}
        other => return Err(link.unexpected(&other, "HelloOk")),
    }
    link.send(&Message::List).await?;
    let mut out = Vec::new();
    loop {
        match link.recv().await? {
            Message::Entry {
                path,
                state: Some(st),
                base,
                ..
            } => out.push((path, st, base)),
            Message::End => return Ok(out),
            other => return Err(link.unexpected(&other, "Entry")),
        }
    }
}

/// How long a listener waits for a group busy with another sync before refusing with "busy".
pub const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Options of the listener side.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Scan the whole group before deciding (off when a watcher keeps the store current).
    pub scan_first: bool,
    /// Without `scan_first`: scan the paths a session is about before deciding (a watcher's
    /// batch may still be gathering a change to one of them).
    pub scan_entries: bool,
    /// How long to wait for the group while another sync of it runs here, before "busy".
    pub busy_wait: std::time::Duration,
    /// How long to wait for the peer's next message before ending the session
    /// ([`SESSION_IDLE_TIMEOUT`]).
    pub idle: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            scan_first: true,
            scan_entries: false,
            busy_wait: BUSY_WAIT,
            idle: SESSION_IDLE_TIMEOUT,
        }
    }
}

/// The listener's side of a session on an authenticated connection.
pub async fn run_server(
    node: &Node,
    conn: &mut Connection,
    opts: ServeOptions,
) -> Result<SessionReport, SessionError> {
    let peer = conn.peer_name().to_string();
    let group_name = conn.group().to_string();
    let mut link = Link::new(conn, peer.clone(), opts.idle);
    let group = match link.recv().await? {
        Message::Hello {
            version,
            group,
            from,
        } => {
            let refuse = if version != PROTOCOL_VERSION {
                Some(format!(
                    "protocol version {version} not supported (this is {PROTOCOL_VERSION})"
                ))
            } else if group != group_name || from != peer {
                Some("hello does not match the authenticated group/host".to_string())
            } else {
                None
            };
            match (refuse, node.group(&group)) {
                (None, Ok(g)) if g.has_member(&peer) => g.clone(),
                (reason, res) => {
                    let message = reason.unwrap_or_else(|| match res {
                        Err(e) => e.to_string(),
                        Ok(_) => format!("{peer} is not a member of group {group}"),
                    });
                    let _ = link
                        .send(&Message::Error {
                            message: message.clone(),
                        })
                        .await;
                    return Err(SessionError::Refused { peer, message });
                }
            }
        }
        other => return Err(link.unexpected(&other, "Hello")),
    };
    let lock = node.group_lock(&group.name);
    let guard = match tokio::time::timeout(opts.busy_wait, lock.lock()).await {
        Ok(g) => g,
        Err(_) => {
            let message = format!(
                "busy: group {} is being synced on {}; retry",
                group.name, node.me.name
            );
            let _ = link
                .send(&Message::Error {
                    message: message.clone(),
                })
                .await;
            return Err(SessionError::Refused { peer, message });
        }
    };
    let applier = Applier::new(&node.me, &group, node.store.clone())
        .map(Arc::new)
        .map_err(|source| SessionError::Apply {
            group: group.name.clone(),
            source,
        })?;
    if opts.scan_first {
        let peers = if group.is_slave(&node.me.name) {
            Vec::new()
        } else {
            group.peers_of(&node.me.name)
        };
        scan_group(
            node.store.as_ref(),
            &node.me,
            &group,
            &peers,
            None,
            ScanOptions::default(),
        )
        .map_err(SessionError::Scan)?;
    }
    link.send(&Message::HelloOk {
        name: node.me.name.clone(),
    })
    .await?;
    let mut report = SessionReport {
        group: group.name.clone(),
        peer: peer.clone(),
        ..Default::default()
    };

    let mut timer = PhaseTimer::new("server", &peer);
    timer.mark("hello+scan");
    // Step 2: the initiator's entries.
    let store = &node.store;
    let mut entries: HashMap<String, (Option<FileState>, Force)> = HashMap::new();
    loop {
        match link.recv().await? {
            Message::List if entries.is_empty() => {
                for (path, st) in store.files(&group.name).map_err(SessionError::Store)? {
                    if st.exists() {
                        let base = store
                            .agreed(&group.name, &peer, &path)
                            .map_err(SessionError::Store)?;
                        link.feed(&Message::Entry {
                            path,
                            state: Some(st),
                            base,
                            force: 0,
                        })
                        .await?;
                    }
                }
                link.send(&Message::End).await?;
                return Ok(report);
            }
            Message::Entry {
                path,
                state,
                base: _,
                force,
            } => {
                if let Err(e) = group.filter.check(&path) {
                    tracing::warn!(%peer, %path, error = %e, "refused path from peer");
                    let message = format!("path refused: {e}");
                    let _ = link
                        .send(&Message::Error {
                            message: message.clone(),
                        })
                        .await;
                    return Err(SessionError::BadPath { peer, path });
                }
                entries.insert(path, (state, Force::from_code(force)));
            }
            Message::End => break,
            other => return Err(link.unexpected(&other, "Entry")),
        }
    }
    if opts.scan_entries && !opts.scan_first {
        let peers = if group.is_slave(&node.me.name) {
            Vec::new()
        } else {
            group.peers_of(&node.me.name)
        };
        let paths = entries
            .keys()
            .map(|p| crate::scan::ScanPath {
                logical: p.clone(),
                deep: false,
                rehash: false,
            })
            .collect();
        crate::scan::scan_paths(node.store.as_ref(), &node.me, &group, &peers, paths)
            .map_err(SessionError::Scan)?;
    }
    let my_dirty: HashMap<String, Force> = store
        .dirty(&group.name, &peer)
        .map_err(SessionError::Store)?
        .into_iter()
        .map(|d| (d.path, d.force))
        .collect();
    let mut paths: Vec<String> = entries.keys().chain(my_dirty.keys()).cloned().collect();
    paths.sort();
    paths.dedup();

    // Decide every path (from this side's view, then mirrored for the initiator).
    let my_pos = group.position(&node.me.name).unwrap_or(0);
    let peer_pos = group.position(&peer).unwrap_or(0);
    let mut items = Vec::with_capacity(paths.len());
    let looked_up = {
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        store
            .lookup(&group.name, Some(&peer), &refs)
            .map_err(SessionError::Store)?
    };
    for (path, (mine, base)) in paths.into_iter().zip(looked_up) {
        let (theirs, their_force) = match entries.remove(&path) {
            Some((st, f)) => (st, f),
            None => (base.clone(), Force::None),
        };
        let my_force = my_dirty.get(&path).copied().unwrap_or_default();
        let sides = Sides {
            auto: group.auto,
            local_is_left: my_pos < peer_pos,
            local_initiated: false,
            local_slave: group.is_slave(&node.me.name),
            remote_slave: group.is_slave(&peer),
            local_force: my_force == Force::Win || their_force == Force::Lose,
            remote_force: their_force == Force::Win || my_force == Force::Lose,
        };
        let d = plan::decide(mine.as_ref(), theirs.as_ref(), base.as_ref(), sides);
        let (decision, winner, receiver) = match d {
            Decision::InSync => (WireDecision::InSync, None, None),
            Decision::Hold => (WireDecision::Hold, None, None),
            Decision::Conflict => (WireDecision::Conflict, None, None),
            // Mine wins: the initiator pulls.
            Decision::Push => (WireDecision::Pull, mine.clone(), theirs.clone()),
            Decision::Pull => (WireDecision::Push, theirs.clone(), mine.clone()),
        };
        let transfer = match decision {
            WireDecision::Push | WireDecision::Pull => {
                wire_transfer(&plan::transfer_for(winner.as_ref(), receiver.as_ref()))
            }
            _ => WireTransfer::None,
        };
        items.push(Item {
            path,
            decision,
            transfer,
            client: theirs,
            server: mine,
            winner,
        });
    }
    // Renames, per direction.
    for dir in [WireDecision::Push, WireDecision::Pull] {
        let idx: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].decision == dir)
            .collect();
        let outgoing: Vec<Outgoing<'_>> = idx
            .iter()
            .map(|&i| {
                let it = &items[i];
                let receiver = if dir == WireDecision::Push {
                    it.server.as_ref()
                } else {
                    it.client.as_ref()
                };
                let transfer = match &it.transfer {
                    WireTransfer::Full => Transfer::Full,
                    WireTransfer::Delete => Transfer::Delete,
                    _ => Transfer::Meta,
                };
                Outgoing {
                    path: &it.path,
                    winner: it.winner.as_ref(),
                    receiver,
                    transfer,
                }
            })
            .collect();
        let pairs = plan::pair_renames(&outgoing);
        drop(outgoing);
        for (del, send) in pairs {
            let from = items[idx[del]].path.clone();
            items[idx[send]].transfer = WireTransfer::Rename { from };
        }
    }
    items.sort_by(apply_order);
    timer.mark("entries+decide");

    // Step 3: decisions (+ our signatures for the initiator's delta pushes).
    for it in &items {
        link.feed(&Message::Decision {
            path: it.path.clone(),
            decision: it.decision,
            transfer: it.transfer.clone(),
            remote: it.server.clone(),
            winner: it.winner.clone(),
        })
        .await?;
        if it.decision == WireDecision::Push && it.transfer == WireTransfer::Delta {
            link.feed(&Message::Signature {
                path: it.path.clone(),
                bytes: base_signature(&applier, &it.path),
            })
            .await?;
        }
    }
    link.send(&Message::End).await?;
    timer.mark("send decisions");

    // Step 4: apply the initiator's pushes as they stream in, then collect its signatures.
    let mut my_errors = HashMap::new();
    let mut dirs = Vec::new();
    let mut committer = Committer::new(applier.clone());
    for it in items.iter().filter(|i| i.decision == WireDecision::Push) {
        let src = match &it.transfer {
            WireTransfer::Rename { from } => {
                store.file(&group.name, from).map_err(SessionError::Store)?
            }
            _ => None,
        };
        if let Err(e) = receive_item(
            &mut link,
            &applier,
            it,
            src.as_ref(),
            it.server.as_ref(),
            &mut dirs,
            &mut committer.queue,
        )
        .await?
        {
            tracing::warn!(%peer, path = %it.path, error = %e, "applying a pushed change failed");
            my_errors.insert(it.path.clone(), e);
        }
        committer.flush(&mut my_errors, false).await;
    }
    timer.mark("receive pushes");
    let received: Vec<&Item> = items
        .iter()
        .filter(|i| i.decision == WireDecision::Push)
        .collect();
    finish_receive(
        node,
        &group,
        &applier,
        &received,
        &mut dirs,
        &mut committer,
        &mut my_errors,
    )
    .await;
    timer.mark("finish receive");
    let mut sigs = Signatures::default();
    for it in items
        .iter()
        .filter(|i| i.decision == WireDecision::Pull && i.transfer == WireTransfer::Delta)
    {
        sigs.expect(&it.path);
    }
    loop {
        match link.recv().await? {
            Message::Signature { path, bytes } => {
                sigs.accept(path, bytes)
                    .map_err(|path| SessionError::UnexpectedSignature {
                        peer: peer.clone(),
                        path,
                    })?
            }
            Message::End => break,
            other => return Err(link.unexpected(&other, "Signature or End")),
        }
    }
    // Step 5: outcomes of the pushes, then our data for the initiator's pulls.
    for it in items.iter().filter(|i| i.decision == WireDecision::Push) {
        link.feed(&Message::Outcome {
            path: it.path.clone(),
            error: my_errors.get(&it.path).cloned(),
        })
        .await?;
    }
    for it in items
        .iter()
        .filter(|i| i.decision == WireDecision::Pull && has_data(&i.transfer))
    {
        send_data(&mut link, &applier, it, sigs.take(&it.path)).await?;
    }
    link.send(&Message::End).await?;
    // Step 6: the initiator's outcomes.
    let mut peer_errors = HashMap::new();
    loop {
        match link.recv().await? {
            Message::Outcome {
                path,
                error: Some(e),
            } => {
                peer_errors.insert(path, e);
            }
            Message::Outcome { .. } => {}
            Message::End => break,
            other => return Err(link.unexpected(&other, "Outcome")),
        }
    }
    timer.mark("send pulls+outcomes");
    record(
        node,
        &group,
        &peer,
        &items,
        false,
        &my_errors,
        &peer_errors,
        &applier,
        &mut report,
    )
    .map_err(SessionError::Store)?;
    timer.mark("record");
    let c = link.conn.counters();
    report.bytes_sent = c.sent();
    report.bytes_received = c.received();
    node.session_done(&report);
    // Actions may take long: without the lock, peers' sessions for the group are not "busy".
    drop(guard);
    crate::actions::run_after_session(&node.me, &group, &report.pulled, &report.pushed).await;
    Ok(report)
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(path: &str, decision: WireDecision, transfer: WireTransfer) -> Item {
        Item {
            path: path.into(),
            decision,
            transfer,
            client: None,
            server: None,
            winner: None,
        }
    }

    /// A node `me` ("alpha" or "beta") of group "web" (the group of
    /// [`crate::transport::tests::loopback_pair`]), its tree and state under `dir`.
    fn test_node(dir: &std::path::Path, me: &str) -> Node {
        let text = format!(
            "[hosts.alpha]\nprefix={{d=\"{d}/alpha\"}}\n[hosts.beta]\nprefix={{d=\"{d}/beta\"}}\n\
             [groups.web]\nhosts=[\"alpha\",\"beta\"]\nkey=\"k\"\ninclude=[\"%d%\"]\n",
            d = dir.display()
        );
        let config = crate::config::Config::parse(&text, &dir.join("filed.toml")).unwrap();
        for host in ["alpha", "beta"] {
            std::fs::create_dir_all(dir.join(host)).unwrap();
        }
        let store =
            crate::store::RedbStore::open(&dir.join(format!("{me}.redb")), Duration::from_secs(1))
                .unwrap();
        let host = config.hosts[me].clone();
        Node::new(Arc::new(config), host, Arc::new(store))
    }

    fn hello() -> Vec<u8> {
        Message::Hello {
            version: PROTOCOL_VERSION,
            group: "web".into(),
            from: "alpha".into(),
        }
        .encode()
    }

    #[tokio::test]
    async fn a_peer_silent_mid_session_ends_it_and_frees_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path(), "beta");
        let (mut alpha, mut beta) = crate::transport::tests::loopback_pair().await;
        // The peer says hello, then stalls with its connection open.
        alpha.send(&hello()).await.unwrap();
        let opts = ServeOptions {
            scan_first: false,
            idle: Duration::from_millis(300),
            ..ServeOptions::default()
        };
        let res = tokio::time::timeout(Duration::from_secs(10), run_server(&node, &mut beta, opts))
            .await
            .expect("the session must end by itself");
        assert!(
            matches!(res, Err(SessionError::Idle { ref peer, .. }) if peer == "alpha"),
            "{res:?}"
        );
        assert!(node.group_lock("web").try_lock().is_ok(), "group released");
        drop(alpha);
    }

    #[tokio::test]
    async fn a_content_transfer_without_a_state_fails_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path(), "beta");
        let (_alpha, mut beta) = crate::transport::tests::loopback_pair().await;
        let applier =
            Applier::new(&node.me, node.group("web").unwrap(), node.store.clone()).unwrap();
        let mut link = Link::new(&mut beta, "alpha".into(), Duration::from_secs(5));
        for transfer in [WireTransfer::Full, WireTransfer::Delta] {
            // No winner: the data the peer streams for it could not be checked, nor skipped.
            let it = item("%d%/f", WireDecision::Push, transfer);
            let (mut dirs, mut queue) = (Vec::new(), Vec::new());
            let res =
                receive_item(&mut link, &applier, &it, None, None, &mut dirs, &mut queue).await;
            assert!(
                matches!(res, Err(SessionError::NoState { ref path, .. }) if path == "%d%/f"),
                "{res:?}"
            );
        }
    }

    #[test]
    fn signatures_are_taken_once_for_awaited_deltas_only() {
        let mut sigs = Signatures::default();
        assert_eq!(sigs.accept("/none".into(), vec![1]), Err("/none".into()));
        sigs.expect("/d");
        sigs.accept("/d".into(), vec![2]).unwrap();
        assert!(sigs.accept("/d".into(), vec![3]).is_err(), "twice");
        sigs.expect("/d");
        assert!(
            sigs.accept("/d".into(), vec![4]).is_err(),
            "a repeated decision does not take another"
        );
        assert_eq!(sigs.take("/d"), Some(vec![2]));
        assert_eq!(sigs.take("/none"), None);
    }

    #[tokio::test]
    async fn an_initiator_refuses_a_signature_for_no_delta() {
        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path(), "alpha");
        let group = node.group("web").unwrap().clone();
        let (mut alpha, mut beta) = crate::transport::tests::loopback_pair().await;
        // Owns its end: it closes after the signature, so nothing waits for more.
        let listener = async move {
            let _hello = beta.recv().await.unwrap().unwrap();
            let ok = Message::HelloOk {
                name: "beta".into(),
            };
            beta.send(&ok.encode()).await.unwrap();
            loop {
                let m = Message::decode(&beta.recv().await.unwrap().unwrap()).unwrap();
                if matches!(m, Message::End) {
                    break;
                }
            }
            let sig = Message::Signature {
                path: "%d%/never-decided".into(),
                bytes: vec![0; 1 << 20],
            };
            beta.send(&sig.encode()).await.unwrap();
            beta.close().await.unwrap();
        };
        let (res, ()) = tokio::join!(run_client(&node, &group, &mut alpha), listener);
        assert!(
            matches!(res, Err(SessionError::UnexpectedSignature { ref path, .. }) if path == "%d%/never-decided"),
            "{res:?}"
        );
    }

    #[test]
    fn apply_order_renames_deletions_deepest_first_then_parents_first() {
        let mut items = [
            item("/d", WireDecision::Push, WireTransfer::Meta),
            item("/d/f", WireDecision::Push, WireTransfer::Full),
            item("/x", WireDecision::Conflict, WireTransfer::None),
            item("/old", WireDecision::Pull, WireTransfer::Delete),
            item("/old/child", WireDecision::Push, WireTransfer::Delete),
            item(
                "/new",
                WireDecision::Push,
                WireTransfer::Rename { from: "/a".into() },
            ),
        ];
        items.sort_by(apply_order);
        let order: Vec<&str> = items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            order,
            vec!["/new", "/old/child", "/old", "/d", "/d/f", "/x"]
        );
    }

    #[test]
    fn a_slave_listener_cannot_send_changes() {
        let text = "[hosts.a]\nprefix={d=\"/tmp/a\"}\n[hosts.s]\nprefix={d=\"/tmp/s\"}\n\
                    [groups.g]\nhosts=[\"a\"]\nslaves=[\"s\"]\nkey=\"k\"\ninclude=[\"%d%\"]\n";
        let c = crate::config::Config::parse(text, std::path::Path::new("/tmp/f.toml")).unwrap();
        let g = &c.groups["g"];
        let pull =
            |peer: &str| check_decision(g, peer, "%d%/f", WireDecision::Pull, &WireTransfer::Full);
        assert!(matches!(pull("s"), Err(SessionError::SlaveSends { .. })));
        assert!(pull("a").is_ok(), "a master may");
        let push = check_decision(g, "s", "%d%/f", WireDecision::Push, &WireTransfer::Full);
        assert!(push.is_ok(), "a slave receives");
        let outside = check_decision(
            g,
            "a",
            "/etc/passwd",
            WireDecision::Pull,
            &WireTransfer::Full,
        );
        assert!(matches!(outside, Err(SessionError::BadPath { .. })));
        let rename = WireTransfer::Rename {
            from: "/etc/shadow".into(),
        };
        let from_outside = check_decision(g, "a", "%d%/f", WireDecision::Pull, &rename);
        assert!(matches!(from_outside, Err(SessionError::BadPath { .. })));
    }

    /// Messages only fed (never flushed by the sender's logic: delta chunks of a large file
    /// that mostly matches its base) still reach the peer within about a second, so its idle
    /// limit never cuts off a busy sender.
    #[tokio::test]
    async fn fed_messages_reach_the_peer_within_a_second() {
        let (mut alpha, mut beta) = crate::transport::tests::loopback_pair().await;
        let mut link = Link::new(&mut alpha, "beta".into(), Duration::from_secs(5));
        let msg = Message::Error {
            message: "x".into(),
        };
        link.feed(&msg).await.unwrap();
        tokio::time::sleep(FEED_FLUSH_EVERY + Duration::from_millis(100)).await;
        link.feed(&msg).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), beta.recv())
            .await
            .expect("nothing arrived although fed for over a second");
        assert!(got.unwrap().is_some());
    }
}
