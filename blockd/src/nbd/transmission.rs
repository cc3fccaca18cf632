//! The transmission phase of one connection: a reader that decodes requests and runs each as its
//! own task against the store, and one writer task that sends replies whole, out of order,
//! batching several replies per vectored write.
//!
//! Memory is bounded by a per-connection byte budget: a READ holds budget for its data until the
//! reply is on the socket; a WRITE payload is read from the socket in chunks, each holding budget
//! until the store has written it; every reply, refusals included, holds a small share until it
//! is written, so a client that reads no replies stops the reader instead of queueing replies
//! without bound. Requests larger than the maximum payload get an error reply (a WRITE's payload
//! is read and discarded first), never a dropped connection.
//!
//! When the server shuts down, a connection stops taking requests and finishes those in flight
//! within [`Limits::shutdown_grace`]; a client that stalls longer (a WRITE payload half sent,
//! replies not read) is dropped, so it cannot hold a shutdown or a demotion. A failed reply
//! write ends the connection.
//!
//! Large WRITE payloads for a local file are read straight from the socket in pieces, each
//! arriving with one wake-up ([`RequestSource::set_wake_threshold`]), and written by the
//! receiving task (a copy into the page cache). Every request is recorded in the export's
//! [`NbdMetrics`] when its reply is written.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::Span;

use crate::nbd::export::MAX_PAYLOAD;
use crate::nbd::handshake::Session;
use crate::nbd::metrics::{Command, NbdMetrics};
use crate::nbd::proto::{
    self, BlockDescriptor, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, HeaderError, REQUEST_LEN, Request, STATE_HOLE, STATE_ZERO,
};
use crate::repl::device::Device;
use crate::store::{BlockStore, CopyAt, Extent, InPlace, StoreError};

/// Tunables of the transmission phase.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest READ/WRITE payload served; larger requests get `EOVERFLOW`.
    pub max_payload: u32,
    /// Size of the pieces a large payload is moved in (socket to store, store to reply).
    pub chunk: usize,
    /// Bytes of request data one connection may hold in memory at once (>= `max_payload`).
    pub budget: usize,
    /// Structured READs at least this long check for holes and send them as hole chunks.
    pub hole_detect_min: u32,
    /// How long a connection may take to finish once the server shuts down
    /// ([`SHUTDOWN_GRACE`] by default).
    pub shutdown_grace: std::time::Duration,
    /// When READ data is copied: [`CopyAt::Send`] (the default) lets a cached range be sent
    /// from the mapped backing; TLS connections copy at the read.
    pub copy_at: CopyAt,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: MAX_PAYLOAD,
            chunk: 4 << 20,
            budget: 128 << 20,
            hole_detect_min: 64 << 10,
            shutdown_grace: SHUTDOWN_GRACE,
            copy_at: CopyAt::Send,
        }
    }
}

/// Budget charged for requests without data, so a flood of them is bounded too.
const MIN_CHARGE: usize = 4096;
/// Read buffer for request headers and small payloads.
const READ_BUFFER: usize = 256 << 10;
/// Most replies gathered into one vectored write.
const MAX_BATCH: usize = 64;
/// Most bytes gathered into one vectored write before it is sent.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Why a request is refused or failed; [`errno`] maps each to the NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("flags {flags:#x} are not valid for command {command}")]
    BadFlags { command: u16, flags: u16 },
    #[error("zero-length request")]
    ZeroLength,
    #[error("FLUSH with non-zero offset or length")]
    FlushRange,
    #[error("{length} bytes at {offset} reach past the end of the {size}-byte export")]
    OutOfRange {
        offset: u64,
        length: u32,
        size: u64,
        write: bool,
    },
    #[error("payload of {length} bytes exceeds the maximum of {max}")]
    TooLarge { length: u32, max: u32 },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("BLOCK_STATUS without a negotiated base:allocation context")]
    NoMetaContext,
    #[error("store operation failed")]
    Store(#[source] StoreError),
}

/// The NBD error value for a failed request. The one place errors become errnos.
pub fn errno(error: &RequestError) -> u32 {
    match error {
        RequestError::UnknownCommand(_)
        | RequestError::BadFlags { .. }
        | RequestError::ZeroLength
        | RequestError::FlushRange
        | RequestError::NoMetaContext => proto::EINVAL,
        RequestError::OutOfRange { write: true, .. } => proto::ENOSPC,
        RequestError::OutOfRange { write: false, .. } => proto::EINVAL,
        RequestError::TooLarge { .. } => proto::EOVERFLOW,
        RequestError::ReadOnly => proto::EPERM,
        RequestError::Store(e) => match e {
            StoreError::OutOfRange { .. } => proto::EINVAL,
            StoreError::ReadOnly => proto::EPERM,
            StoreError::NotFast => proto::ENOTSUP,
            other => match other.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => proto::ENOSPC,
                Some(libc::EPERM | libc::EROFS | libc::EACCES) => proto::EPERM,
                _ => proto::EIO,
            },
        },
    }
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_punch: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        context: u32,
    },
    Disconnect,
}

/// Checks a request against the session and export. Pure; the order of checks decides which
/// error a request with several problems gets.
pub fn validate(
    req: &Request,
    session: &Session,
    size: u64,
    read_only: bool,
    max_payload: u32,
) -> Result<Op, RequestError> {
    let allowed = match req.kind {
        CMD_READ if session.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_DISC => return Ok(Op::Disconnect),
        other => return Err(RequestError::UnknownCommand(other)),
    };
    if req.flags & !allowed != 0 {
        return Err(RequestError::BadFlags {
            command: req.kind,
            flags: req.flags,
        });
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Err(RequestError::ReadOnly);
    }
    let (offset, len) = (req.offset, req.length);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    if req.kind == CMD_FLUSH {
        if offset != 0 || len != 0 {
            return Err(RequestError::FlushRange);
        }
        return Ok(Op::Flush);
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && len > max_payload {
        return Err(RequestError::TooLarge {
            length: len,
            max: max_payload,
        });
    }
    if len == 0 {
        return Err(RequestError::ZeroLength);
    }
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > size)
    {
        return Err(RequestError::OutOfRange {
            offset,
            length: len,
            size,
            write: matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES),
        });
    }
    Ok(match req.kind {
        CMD_READ => Op::Read {
            offset,
            len,
            df: req.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Op::Write { offset, len, fua },
        CMD_TRIM => Op::Trim { offset, len, fua },
        CMD_CACHE => Op::Cache { offset, len },
        CMD_WRITE_ZEROES => Op::WriteZeroes {
            offset,
            len,
            fua,
            may_punch: req.flags & CMD_FLAG_NO_HOLE == 0,
            fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => Op::BlockStatus {
            offset,
            len,
            req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            context: session.base_allocation.ok_or(RequestError::NoMetaContext)?,
        },
        _ => unreachable!("command filtered above"),
    })
}

/// `base:allocation` descriptors for extents starting at the request offset: statuses mapped,
/// equal neighbours merged, total clipped to `len`, at most one with `req_one`.
pub fn descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<BlockDescriptor> {
    let mut out: Vec<BlockDescriptor> = Vec::with_capacity(extents.len().min(64));
    let mut left = u64::from(len);
    for e in extents {
        if left == 0 {
            break;
        }
        let length = e.length.min(left);
        if length == 0 {
            continue;
        }
        left -= length;
        let status = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(last) if last.status == status => last.length += length as u32,
            _ => out.push(BlockDescriptor {
                length: length as u32,
                status,
            }),
        }
    }
    if out.is_empty() {
        out.push(BlockDescriptor {
            length: len,
            status: 0,
        });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Outgoing replies
// ---------------------------------------------------------------------------------------------

/// Small inline header of a reply (simple reply header or one chunk prefix).
#[derive(Default)]
struct Head {
    bytes: [u8; proto::DATA_CHUNK_PREFIX_LEN],
    len: u8,
}

impl Head {
    fn new(src: &[u8]) -> Head {
        let mut head = Head::default();
        head.bytes[..src.len()].copy_from_slice(src);
        head.len = src.len() as u8;
        head
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// One reply, written to the socket as a unit.
struct Outgoing {
    head: Head,
    body: Vec<Bytes>,
    /// Budget held until the reply is on the socket.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn len(&self) -> usize {
        usize::from(self.head.len) + self.body.iter().map(Bytes::len).sum::<usize>()
    }
}

/// The read half of a connection. Plain sockets can also be asked to wake the reader only once
/// a whole piece of a large WRITE payload has arrived, and receive a payload straight into the
/// store.
pub trait RequestSource: AsyncRead + Unpin + Send + 'static {
    /// Asks to be woken only once `bytes` are waiting (best effort; 1 = any data).
    fn set_wake_threshold(&self, bytes: usize) {
        let _ = bytes;
    }

    /// Whether [`RequestSource::poll_receive_in_place`] works: plain sockets only.
    fn receives_in_place(&self) -> bool {
        false
    }

    /// Receives what has arrived into `target` (see [`InPlace::receive`]), once some has;
    /// `Unsupported` where [`RequestSource::receives_in_place`] is false. Only valid while
    /// nothing is buffered above the source (the caller's read buffer is empty).
    fn poll_receive_in_place(
        &self,
        cx: &mut Context<'_>,
        target: &mut InPlace,
    ) -> Poll<io::Result<usize>> {
        let _ = (cx, target);
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

/// Streams that are not plain sockets (TLS, in-memory) wake the reader for any data.
impl<T: AsyncRead + AsyncWrite + Send + 'static> RequestSource for tokio::io::ReadHalf<T> {}

impl RequestSource for Box<dyn RequestSource> {
    fn set_wake_threshold(&self, bytes: usize) {
        (**self).set_wake_threshold(bytes)
    }

    fn receives_in_place(&self) -> bool {
        (**self).receives_in_place()
    }

    fn poll_receive_in_place(
        &self,
        cx: &mut Context<'_>,
        target: &mut InPlace,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_receive_in_place(cx, target)
    }
}

/// Plain sockets: the wake-up threshold is the socket's `SO_RCVLOWAT`, and a receive in place
/// is a `recv` into the store's mapping once the socket is readable.
macro_rules! socket_source {
    ($half:ty) => {
        impl RequestSource for $half {
            fn set_wake_threshold(&self, bytes: usize) {
                // Best effort: without it the payload arrives in more, smaller pieces.
                let _ = crate::store::set_receive_low_water(self.as_ref(), bytes);
            }

            fn receives_in_place(&self) -> bool {
                true
            }

            fn poll_receive_in_place(
                &self,
                cx: &mut Context<'_>,
                target: &mut InPlace,
            ) -> Poll<io::Result<usize>> {
                let socket = self.as_ref();
                loop {
                    std::task::ready!(socket.poll_read_ready(cx))?;
                    match socket.try_io(tokio::io::Interest::READABLE, || {
                        target.receive(socket.as_fd())
                    }) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        result => return Poll::Ready(result),
                    }
                }
            }
        }
    };
}

socket_source!(tokio::net::tcp::OwnedReadHalf);
socket_source!(tokio::net::unix::OwnedReadHalf);

/// Per-request context handed to request tasks.
#[derive(Clone)]
struct Ctx {
    store: Device,
    session: Session,
    limits: Limits,
    replies: mpsc::UnboundedSender<Queued>,
    /// The connection's write half, shared with the writer task.
    sink: Arc<ReplySink>,
    span: Span,
}

/// A reply on its way to the writer, with what the metrics record about its request.
struct Queued {
    reply: Outgoing,
    track: Track,
    ok: bool,
}

/// What [`NbdMetrics`] records about a request when its reply goes to the socket.
///
/// Clock reads are shared to keep the hot path cheap (a `clock_gettime` costs 50-70 ns on the
/// reference VM, more than the rest of the bookkeeping): `start` is when the receive that
/// brought the request's header completed, and the writer reads the clock once per batch of
/// replies.
#[derive(Clone, Copy)]
struct Track {
    command: Option<Command>,
    bytes: u64,
    start: Instant,
}

impl Track {
    fn new(request: &Request, arrived: Instant) -> Track {
        Track {
            command: Command::from_wire(request.kind),
            bytes: u64::from(request.length),
            start: arrived,
        }
    }
}

/// The connection's write half, shared by the writer task and the request tasks that write a
/// large reply themselves (see [`Ctx::deliver`]). A write that fails or is cut short marks the
/// stream broken: nothing is written after a reply that went out in part.
struct ReplySink {
    stream: tokio::sync::Mutex<SinkState>,
    metrics: Arc<NbdMetrics>,
    /// Wakes the writer when a request task's own write failed: the connection ends at once
    /// rather than at the writer's next batch.
    direct_failed: tokio::sync::Notify,
    /// Set when [`serve`] gives up on a client that takes no replies (past the shutdown grace):
    /// a request task blocked writing its own reply stops, and the socket closes.
    abandoned: tokio::sync::watch::Sender<bool>,
}

struct SinkState {
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    broken: Option<io::Error>,
}

impl ReplySink {
    /// Records a request in the export's metrics as its reply goes out (`now`: read once per
    /// batch of replies).
    fn record(&self, track: &Track, ok: bool, now: Instant) {
        if let Some(command) = track.command {
            let latency = now.saturating_duration_since(track.start);
            self.metrics.record(command, track.bytes, latency, ok);
        }
    }
}

impl SinkState {
    /// Writes `batch`, unless an earlier write broke the stream; the first error is kept. The
    /// stream counts as broken while the write is under way, so a write whose future is
    /// dropped part way leaves it broken.
    async fn write(&mut self, batch: &[Outgoing]) -> io::Result<()> {
        if let Some(e) = &self.broken {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        // (A bare kind: no allocation on this path.)
        self.broken = Some(io::ErrorKind::Interrupted.into());
        let result = write_batch(&mut self.writer, batch).await;
        self.broken = match &result {
            Ok(()) => None,
            Err(e) => Some(io::Error::new(e.kind(), e.to_string())),
        };
        result
    }
}

/// Replies at least this long are written by the task that produced them when the socket is
/// free (no hop to the writer task and back for the bulk of a large READ), as nbdkit's worker
/// threads do; smaller ones are batched by the writer.
const DIRECT_REPLY_MIN: usize = 128 << 10;

impl Ctx {
    /// Hands a reply to the writer, which also records the request in the export's metrics.
    fn send(&self, track: Track, ok: bool, reply: Outgoing) {
        // The writer only goes away when the connection is broken; the reply is moot then.
        let _ = self.replies.send(Queued { reply, track, ok });
    }

    /// Sends a reply: a large one right here if no other write holds the socket (a write
    /// error then ends the connection through the writer task), otherwise through the writer.
    async fn deliver(&self, track: Track, ok: bool, reply: Outgoing) {
        if reply.len() >= DIRECT_REPLY_MIN {
            if let Ok(mut sink) = self.sink.stream.try_lock() {
                if sink.broken.is_none() {
                    self.sink.record(&track, ok, Instant::now());
                    let mut abandoned = self.sink.abandoned.subscribe();
                    let written = tokio::select! {
                        r = sink.write(std::slice::from_ref(&reply)) => r.is_ok(),
                        _ = abandoned.wait_for(|gone| *gone) => false,
                    };
                    if !written {
                        self.sink.direct_failed.notify_one();
                    }
                    return;
                }
            }
        }
        self.send(track, ok, reply);
    }

    /// Success without data (simple reply, valid in both modes). Every reply holds budget
    /// (`permit`) until it is written, so a client that does not read its replies holds the
    /// reader back instead of queueing replies without bound.
    fn ok(&self, track: Track, cookie: u64, permit: OwnedSemaphorePermit) {
        self.send(
            track,
            true,
            Outgoing {
                head: Head::new(&proto::encode_simple_reply(0, cookie)),
                body: Vec::new(),
                _permit: Some(permit),
            },
        );
    }

    /// An error reply: an error chunk with a message when structured replies are on.
    fn fail(
        &self,
        track: Track,
        cookie: u64,
        command: u16,
        error: &RequestError,
        permit: OwnedSemaphorePermit,
    ) {
        let code = errno(error);
        if matches!(error, RequestError::Store(_)) {
            self.span.in_scope(|| {
                tracing::warn!(cookie, command, errno = code, error = %ErrorChain(error), "request failed");
            });
        } else {
            self.span.in_scope(|| {
                tracing::debug!(cookie, command, errno = code, error = %error, "request refused");
            });
        }
        if self.session.structured {
            let mut buf = BytesMut::with_capacity(64);
            proto::encode_error_chunk(cookie, code, &error.to_string(), &mut buf);
            self.send(
                track,
                false,
                Outgoing {
                    head: Head::default(),
                    body: vec![buf.freeze()],
                    _permit: Some(permit),
                },
            );
        } else {
            self.send(
                track,
                false,
                Outgoing {
                    head: Head::new(&proto::encode_simple_reply(code, cookie)),
                    body: Vec::new(),
                    _permit: Some(permit),
                },
            );
        }
    }

    fn done(
        &self,
        track: Track,
        cookie: u64,
        command: u16,
        result: Result<(), RequestError>,
        permit: OwnedSemaphorePermit,
    ) {
        match result {
            Ok(()) => self.ok(track, cookie, permit),
            Err(e) => self.fail(track, cookie, command, &e, permit),
        }
    }
}

/// Displays an error with its `source` chain.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Request execution
// ---------------------------------------------------------------------------------------------

/// Reads `len` bytes at `offset` as pieces of at most `chunk` bytes, reading pieces concurrently.
async fn read_range(
    store: &Device,
    offset: u64,
    len: u64,
    chunk: usize,
    copy_at: CopyAt,
) -> Result<Vec<Bytes>, StoreError> {
    if len <= chunk as u64 {
        return Ok(vec![store.read(offset, len as usize, copy_at).await?]);
    }
    let mut tasks = Vec::with_capacity(len.div_ceil(chunk as u64) as usize);
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(chunk as u64) as usize;
        let store = store.clone();
        let at = offset + pos;
        tasks.push(tokio::spawn(
            async move { store.read(at, n, copy_at).await },
        ));
        pos += n as u64;
    }
    let mut pieces = Vec::with_capacity(tasks.len());
    let mut failed = None;
    for task in tasks {
        // After a failure the other pieces are still awaited: their buffers count against the
        // budget the request holds until it replies.
        match task.await.map_err(|_| StoreError::EngineGone) {
            Ok(Ok(piece)) if failed.is_none() => pieces.push(piece),
            Ok(Err(e)) | Err(e) if failed.is_none() => failed = Some(e),
            _ => {}
        }
    }
    match failed {
        None => Ok(pieces),
        Some(e) => Err(e),
    }
}

async fn serve_read(
    ctx: Ctx,
    track: Track,
    cookie: u64,
    offset: u64,
    len: u32,
    df: bool,
    permit: OwnedSemaphorePermit,
) {
    let result = if ctx.session.structured {
        structured_read(&ctx, cookie, offset, len, df).await
    } else {
        read_range(
            &ctx.store,
            offset,
            u64::from(len),
            ctx.limits.chunk,
            ctx.limits.copy_at,
        )
        .await
        .map(|body| (Head::new(&proto::encode_simple_reply(0, cookie)), body))
    };
    match result {
        Ok((head, body)) => {
            let reply = Outgoing {
                head,
                body,
                _permit: Some(permit),
            };
            ctx.deliver(track, true, reply).await;
        }
        Err(e) => ctx.fail(track, cookie, CMD_READ, &RequestError::Store(e), permit),
    }
}

/// A structured READ reply: hole chunks for sparse regions (unless DF or the read is small),
/// data chunks for the rest; the last chunk carries DONE.
async fn structured_read(
    ctx: &Ctx,
    cookie: u64,
    offset: u64,
    len: u32,
    df: bool,
) -> Result<(Head, Vec<Bytes>), StoreError> {
    let (chunk, copy_at) = (ctx.limits.chunk, ctx.limits.copy_at);
    let extents = if !df && len >= ctx.limits.hole_detect_min {
        // Hole detection is an optimisation: if it fails, the read itself reports errors.
        ctx.store
            .block_status(offset, u64::from(len))
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let has_hole = extents.iter().any(|e| e.hole && e.zero);
    if !has_hole {
        let pieces = read_range(&ctx.store, offset, u64::from(len), chunk, copy_at).await?;
        if pieces.len() == 1 || df {
            let head = proto::encode_data_chunk_prefix(cookie, true, offset, len);
            return Ok((Head::new(&head), pieces));
        }
        return Ok((Head::default(), data_chunks(cookie, offset, pieces, true)));
    }
    // Mixed data and holes: one entry per run, data read concurrently.
    enum Run {
        Hole(u64, u32),
        Data(u64, tokio::task::JoinHandle<Result<Vec<Bytes>, StoreError>>),
    }
    let mut runs = Vec::with_capacity(extents.len() + 1);
    let mut pos = offset;
    let end = offset + u64::from(len);
    for e in extents.iter().chain(std::iter::once(&Extent {
        length: u64::MAX,
        hole: false,
        zero: false,
    })) {
        if pos >= end {
            break;
        }
        let n = e.length.min(end - pos);
        if n == 0 {
            continue;
        }
        if e.hole && e.zero {
            runs.push(Run::Hole(pos, n as u32));
        } else {
            let store = ctx.store.clone();
            let at = pos;
            runs.push(Run::Data(
                at,
                tokio::spawn(async move { read_range(&store, at, n, chunk, copy_at).await }),
            ));
        }
        pos += n;
    }
    let mut body = Vec::with_capacity(runs.len() * 2);
    let last = runs.len() - 1;
    // Every run is awaited even after one failed: their buffers belong to this request's
    // budget, which is given back when its reply goes out.
    let mut failed = None;
    for (i, run) in runs.into_iter().enumerate() {
        match run {
            Run::Hole(at, n) => {
                let mut buf = BytesMut::with_capacity(32);
                proto::encode_hole_chunk(cookie, i == last, at, n, &mut buf);
                body.push(buf.freeze());
            }
            Run::Data(at, task) => match task.await.map_err(|_| StoreError::EngineGone) {
                Ok(Ok(pieces)) => body.extend(data_chunks(cookie, at, pieces, i == last)),
                Ok(Err(e)) | Err(e) => {
                    failed.get_or_insert(e);
                }
            },
        }
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok((Head::default(), body)),
    }
}

/// OFFSET_DATA chunks for consecutive `pieces` starting at `offset`; DONE on the last if `done`.
fn data_chunks(cookie: u64, mut offset: u64, pieces: Vec<Bytes>, done: bool) -> Vec<Bytes> {
    let count = pieces.len();
    let mut out = Vec::with_capacity(count * 2);
    for (i, piece) in pieces.into_iter().enumerate() {
        let n = piece.len() as u32;
        let prefix = proto::encode_data_chunk_prefix(cookie, done && i + 1 == count, offset, n);
        out.push(Bytes::copy_from_slice(&prefix));
        out.push(piece);
        offset += u64::from(n);
    }
    out
}

async fn run_op(ctx: &Ctx, op: Op) -> Result<(), RequestError> {
    let store = &ctx.store;
    let s = RequestError::Store;
    match op {
        Op::Flush => store.flush().await.map_err(s),
        Op::Trim { offset, len, fua } => {
            store.trim(offset, u64::from(len)).await.map_err(s)?;
            if fua {
                store.flush().await.map_err(s)?;
            }
            Ok(())
        }
        Op::Cache { offset, len } => store.cache(offset, u64::from(len)).await.map_err(s),
        Op::WriteZeroes {
            offset,
            len,
            fua,
            may_punch,
            fast,
        } => {
            if fast {
                store
                    .fast_zero(offset, u64::from(len), may_punch)
                    .await
                    .map_err(s)?;
                if fua {
                    store.flush().await.map_err(s)?;
                }
                Ok(())
            } else {
                store
                    .write_zeroes(offset, u64::from(len), may_punch, fua)
                    .await
                    .map_err(s)
            }
        }
        Op::Read { .. } | Op::Write { .. } | Op::BlockStatus { .. } | Op::Disconnect => {
            unreachable!("handled by the reader")
        }
    }
}

async fn serve_block_status(
    ctx: Ctx,
    track: Track,
    cookie: u64,
    offset: u64,
    len: u32,
    req_one: bool,
    context: u32,
    permit: OwnedSemaphorePermit,
) {
    match ctx.store.block_status(offset, u64::from(len)).await {
        Ok(extents) => {
            let descs = descriptors(&extents, len, req_one);
            let mut buf = BytesMut::with_capacity(proto::CHUNK_HEADER_LEN + 4 + 8 * descs.len());
            proto::encode_block_status_chunk(cookie, context, &descs, &mut buf);
            ctx.send(
                track,
                true,
                Outgoing {
                    head: Head::default(),
                    body: vec![buf.freeze()],
                    _permit: Some(permit),
                },
            );
        }
        Err(e) => ctx.fail(
            track,
            cookie,
            CMD_BLOCK_STATUS,
            &RequestError::Store(e),
            permit,
        ),
    }
}

/// Completion state of a WRITE moved in several chunks: the last chunk to finish replies.
struct WriteJoin {
    ctx: Ctx,
    track: Track,
    cookie: u64,
    remaining: AtomicUsize,
    error: Mutex<Option<StoreError>>,
    /// The reply's budget, taken by the last piece.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl WriteJoin {
    /// A join that replies after `pieces` calls of [`WriteJoin::chunk_done`].
    /// `permit`: the reply's budget.
    fn new(
        ctx: Ctx,
        track: Track,
        cookie: u64,
        pieces: usize,
        permit: OwnedSemaphorePermit,
    ) -> WriteJoin {
        WriteJoin {
            ctx,
            track,
            cookie,
            remaining: AtomicUsize::new(pieces),
            error: Mutex::new(None),
            permit: Mutex::new(Some(permit)),
        }
    }

    /// Keeps the first error of the request.
    fn record(&self, result: Result<(), StoreError>) {
        if let Err(e) = result {
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
    }

    fn chunk_done(&self, result: Result<(), StoreError>) {
        self.record(result);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let error = self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
            let permit = self.permit.lock().unwrap_or_else(|p| p.into_inner()).take();
            let permit = permit.expect("the last piece replies once");
            match error {
                None => self.ctx.ok(self.track, self.cookie, permit),
                Some(e) => self.ctx.fail(
                    self.track,
                    self.cookie,
                    CMD_WRITE,
                    &RequestError::Store(e),
                    permit,
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection loop
// ---------------------------------------------------------------------------------------------

/// Why a connection's transmission phase ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("reading a request failed")]
    ReadRequest(#[source] io::Error),
    #[error("request has a bad magic {0:#x}")]
    BadMagic(u64),
    #[error("reading the payload of a WRITE failed")]
    ReadPayload(#[source] io::Error),
    #[error("writing replies failed")]
    WriteReply(#[source] io::Error),
    #[error("the reply writer task failed")]
    WriterTask(#[source] tokio::task::JoinError),
    #[error("the server is shutting down and the client took no reply for {0:?}")]
    ShutdownStalled(std::time::Duration),
}

/// How long a connection may take to finish after the server begins to shut down: the request
/// being received, the replies of those in flight. A client that stalls longer is dropped (its
/// unanswered requests are not acknowledged), so a stuck client cannot hold a shutdown or a
/// demotion forever.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// After the replies of a connection closed by a shutdown are written, requests the client
/// sent meanwhile are read and dropped for at most this long before the socket is closed:
/// closing with unread data would reset the connection and discard replies still in flight.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// The linger ends early once the client has sent nothing for this long.
const LINGER_QUIET: std::time::Duration = std::time::Duration::from_millis(50);

/// How the reader loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection.
    Eof,
    /// The server is shutting down.
    Shutdown,
}

/// Serves requests from `reader`, replying on `writer`, until the client disconnects, the
/// connection breaks, or `shutdown` completes. In-flight requests finish and their replies are
/// written before this returns.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    store: Device,
    session: Session,
    limits: Limits,
    metrics: Arc<NbdMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<End, TransmissionError>
where
    R: RequestSource,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = Arc::new(ReplySink {
        stream: tokio::sync::Mutex::new(SinkState {
            writer: Box::new(writer),
            broken: None,
        }),
        metrics,
        direct_failed: tokio::sync::Notify::new(),
        abandoned: tokio::sync::watch::Sender::new(false),
    });
    let writer_task = tokio::spawn(write_replies(sink.clone(), rx));
    let ctx = Ctx {
        store,
        session,
        limits,
        replies: tx,
        sink: sink.clone(),
        span: Span::current(),
    };
    // Room for the largest payload beside the reply share of the request it belongs to.
    let budget = Arc::new(Semaphore::new(
        limits.budget.max(limits.max_payload as usize + MIN_CHARGE),
    ));
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    // When the shutdown began, once it has.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None::<tokio::time::Instant>);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(Some(tokio::time::Instant::now()));
        std::future::pending::<()>().await
    };
    tokio::pin!(shutdown);
    let stopping = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(Option::is_some).await;
        }
    };
    let mut writer_task = writer_task;
    let mut writer_result = None;
    let read_result = tokio::select! {
        r = read_loop(&mut reader, &ctx, &budget, stopping) => r,
        // A request still being received when the grace ends is dropped.
        () = grace_over(stop_rx.clone(), limits.shutdown_grace) => Ok(End::Shutdown),
        // The writer only ends early when a write failed: stop taking requests.
        w = &mut writer_task => {
            writer_result = Some(w);
            Ok(End::Eof)
        }
        () = &mut shutdown => unreachable!("the shutdown future never completes"),
    };
    drop(ctx);
    // All request tasks hold a sender; the writer ends once the last reply is written.
    let write_result = match writer_result {
        Some(w) => w,
        None => tokio::select! {
            w = &mut writer_task => w,
            () = writer_grace_over(stop_rx, limits.shutdown_grace) => {
                writer_task.abort();
                sink.abandoned.send_replace(true);
                Ok(Err(TransmissionError::ShutdownStalled(limits.shutdown_grace)))
            }
            () = &mut shutdown => unreachable!("the shutdown future never completes"),
        },
    };
    let write_result = write_result.map_err(TransmissionError::WriterTask)?;
    let end = read_result?;
    write_result?;
    if end == End::Shutdown {
        linger(&mut reader).await;
    }
    Ok(end)
}

/// Like [`grace_over`], but at least [`LAST_WRITE`] from now: when the grace ended while a
/// request was being received, the replies of those in flight get a moment to go out.
async fn writer_grace_over(
    stop: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
    grace: std::time::Duration,
) {
    let at_least = tokio::time::sleep(LAST_WRITE);
    tokio::join!(grace_over(stop, grace), at_least);
}

/// See [`writer_grace_over`].
const LAST_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves `grace` after the shutdown began (never without one).
async fn grace_over(
    mut stop: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
    grace: std::time::Duration,
) {
    let Ok(began) = stop.wait_for(Option::is_some).await.map(|t| *t) else {
        return std::future::pending().await;
    };
    let began = began.expect("waited for Some");
    tokio::time::sleep_until(began + grace).await;
}

/// Reads and drops what the client sends until it closes, sends nothing for [`LINGER_QUIET`],
/// or [`LINGER`] passes.
async fn linger<R: RequestSource>(reader: &mut BufReader<R>) {
    let drain = async {
        let mut sink = [0u8; 16 << 10];
        loop {
            match tokio::time::timeout(LINGER_QUIET, reader.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

async fn read_loop<R: RequestSource>(
    reader: &mut BufReader<R>,
    ctx: &Ctx,
    budget: &Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
) -> Result<End, TransmissionError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut arrived = Instant::now();
    // After a large WRITE, the next header is read on its own (see `read_request`).
    let mut header_only = false;
    loop {
        // A header not yet buffered arrives with the next receive: timestamp that receive.
        let receives = reader.buffer().len() < REQUEST_LEN;
        let request = tokio::select! {
            biased;
            () = &mut shutdown => return Ok(End::Shutdown),
            r = read_request(reader, header_only) => match r? {
                Some(request) => request,
                None => return Ok(End::Eof),
            },
        };
        let size = ctx.store.size();
        let op = validate(
            &request,
            &ctx.session,
            size,
            ctx.store.read_only(),
            ctx.limits.max_payload,
        );
        if receives {
            arrived = Instant::now();
        }
        let cookie = request.cookie;
        let track = Track::new(&request, arrived);
        header_only = false;
        match op {
            Err(e) => {
                // Keep the stream in sync: a refused WRITE's payload is still on the wire.
                discard(reader, u64::from(request.payload_len())).await?;
                let permit = charge(budget, 0).await;
                ctx.fail(track, cookie, request.kind, &e, permit);
            }
            Ok(Op::Disconnect) => return Ok(End::Disconnect),
            Ok(Op::Write { offset, len, fua }) => {
                header_only =
                    receive_write(reader, ctx, budget, track, cookie, offset, len, fua).await?;
            }
            Ok(Op::Read { offset, len, df }) => {
                let permit = charge(budget, len as usize).await;
                let read = serve_read(ctx.clone(), track, cookie, offset, len, df, permit);
                if len <= INLINE_MAX {
                    run_or_spawn(read);
                } else {
                    tokio::spawn(read);
                }
            }
            Ok(Op::BlockStatus {
                offset,
                len,
                req_one,
                context,
            }) => {
                let permit = charge(budget, 0).await;
                tokio::spawn(serve_block_status(
                    ctx.clone(),
                    track,
                    cookie,
                    offset,
                    len,
                    req_one,
                    context,
                    permit,
                ));
            }
            Ok(op) => {
                let permit = charge(budget, 0).await;
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let result = run_op(&ctx, op).await;
                    ctx.done(track, cookie, request.kind, result, permit);
                });
            }
        }
    }
}

/// Largest READ/WRITE tried inline in the reader task: small requests gain from skipping a task
/// hop, large ones gain more from copying on another core while the reader takes the next.
const INLINE_MAX: u32 = 128 << 10;

/// Runs a request future right here if it completes without waiting (the store's inline path:
/// tmpfs, page-cache hits), and only otherwise hands it to a task of its own. On the common path
/// this saves a task spawn and a cross-thread wake-up per request.
fn run_or_spawn<F: Future<Output = ()> + Send + 'static>(future: F) {
    let mut future = Box::pin(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    // A future that is pending registered this no-op waker at most; the task polls it again with
    // its own waker, which every tokio resource honours (wakers are replaced on each poll).
    if future.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(future);
    }
}

/// Takes `bytes` (at least [`MIN_CHARGE`]) from the connection budget, waiting if needed.
async fn charge(budget: &Arc<Semaphore>, bytes: usize) -> OwnedSemaphorePermit {
    let n = bytes.max(MIN_CHARGE) as u32;
    budget
        .clone()
        .acquire_many_owned(n)
        .await
        .expect("the budget semaphore is never closed")
}

/// Reads the next request header; `None` on a clean end of stream between requests.
///
/// With `header_only` and nothing buffered, the header is read from the socket without
/// filling the read buffer: after a large WRITE, the next request is likely another one,
/// whose payload is then read straight from the socket rather than copied through the buffer.
async fn read_request<R: RequestSource>(
    reader: &mut BufReader<R>,
    header_only: bool,
) -> Result<Option<Request>, TransmissionError> {
    let mut header = [0u8; REQUEST_LEN];
    if header_only && reader.buffer().is_empty() {
        let inner = reader.get_mut();
        let n = inner
            .read(&mut header)
            .await
            .map_err(TransmissionError::ReadRequest)?;
        if n == 0 {
            return Ok(None);
        }
        inner
            .read_exact(&mut header[n..])
            .await
            .map_err(TransmissionError::ReadRequest)?;
        return decode_header(&header).map(Some);
    }
    let available = reader
        .fill_buf()
        .await
        .map_err(TransmissionError::ReadRequest)?;
    if available.is_empty() {
        return Ok(None);
    }
    reader
        .read_exact(&mut header)
        .await
        .map_err(TransmissionError::ReadRequest)?;
    decode_header(&header).map(Some)
}

fn decode_header(header: &[u8; REQUEST_LEN]) -> Result<Request, TransmissionError> {
    match Request::decode(header) {
        Ok(request) => Ok(request),
        Err(HeaderError::BadMagic(m)) => Err(TransmissionError::BadMagic(m)),
        Err(HeaderError::Incomplete) => unreachable!("the header buffer is full"),
    }
}

/// Reads a WRITE payload chunk by chunk, handing each chunk to the store as it arrives;
/// `true` if it was a large one received in pieces (see [`receive_large_write`]).
async fn receive_write<R: RequestSource>(
    reader: &mut BufReader<R>,
    ctx: &Ctx,
    budget: &Arc<Semaphore>,
    track: Track,
    cookie: u64,
    offset: u64,
    len: u32,
    fua: bool,
) -> Result<bool, TransmissionError> {
    let chunk = ctx.limits.chunk;
    let len = len as usize;
    if len > LARGE_WRITE_MIN && !fua {
        if let Device::Local(store) = &ctx.store {
            let result = receive_large_write(reader, store, budget, offset, len).await?;
            let permit = charge(budget, 0).await;
            match result {
                Ok(()) => ctx.ok(track, cookie, permit),
                Err(e) => ctx.fail(track, cookie, CMD_WRITE, &RequestError::Store(e), permit),
            }
            return Ok(true);
        }
    }
    if len <= chunk {
        let mut permit = charge(budget, len).await;
        let data = read_payload(reader, len).await?;
        let ctx = ctx.clone();
        let write = async move {
            let result = ctx.store.write(offset, data, fua).await;
            // The payload's budget is free once written; the reply keeps its share.
            let reply = permit
                .split(MIN_CHARGE)
                .expect("a charge is at least MIN_CHARGE");
            drop(permit);
            match result {
                Ok(()) => ctx.ok(track, cookie, reply),
                Err(e) => ctx.fail(track, cookie, CMD_WRITE, &RequestError::Store(e), reply),
            }
        };
        if len <= INLINE_MAX as usize {
            run_or_spawn(write);
        } else {
            tokio::spawn(write);
        }
        return Ok(false);
    }
    let reply = charge(budget, 0).await;
    let join = Arc::new(WriteJoin::new(
        ctx.clone(),
        track,
        cookie,
        len.div_ceil(chunk),
        reply,
    ));
    let mut pos = 0usize;
    while pos < len {
        let n = (len - pos).min(chunk);
        let permit = charge(budget, n).await;
        let data = read_payload(reader, n).await?;
        let join = join.clone();
        let at = offset + pos as u64;
        tokio::spawn(async move {
            let result = join.ctx.store.write(at, data, fua).await;
            drop(permit);
            join.chunk_done(result);
        });
        pos += n;
    }
    Ok(false)
}

/// Receives a large WRITE payload for a local file: what the header read already buffered is
/// written from that buffer, the rest is read straight from the socket in pieces of at most
/// [`PIECE_MAX`] into one buffer reused for the whole payload, the socket's wake-up threshold
/// raised so a piece arrives with one wake-up, and each piece is written right here with a
/// plain `pwrite`: a copy into the page cache, cheaper than handing the piece to an engine
/// worker (a thread hop, and the worker copies from cold cache lines: on ext4 the server's
/// CPU per 1 MiB write fell from 352-363 to 262-297 µs, nbdkit 282-309). Like nbdkit's
/// threads, this task then waits when the kernel throttles a writer with too much dirty page
/// cache; the connection cannot take more data meanwhile anyway.
///
/// The payload is copied out of the socket, not spliced into the file through a pipe (one copy
/// less): a plain receive hands the socket's pages back to the sending CPU, and the client's
/// next copy into its socket lands in warm pages; spliced pages were released here, and a
/// local client (fio over loopback) then spent 30-70% more CPU per byte on its own sends
/// (docs/benchmarks-nbd.md).
///
/// On a memory-backed store, over a plain socket, a piece whose pages exist is received
/// straight into them instead ([`BlockStore::write_in_place`]): one copy instead of two, and no
/// `pwrite` through tmpfs's write path (1 MiB writes at QD8 over loopback: 3,512 against 2,200
/// MiB/s, the server's CPU per write 232 against 409 µs; docs/benchmarks-nbd.md, session 14).
///
/// The whole payload is always consumed; the inner result is the first store failure (the
/// request's answer), an error outside is a failed connection.
async fn receive_large_write<R: RequestSource>(
    reader: &mut BufReader<R>,
    store: &BlockStore,
    budget: &Arc<Semaphore>,
    offset: u64,
    len: usize,
) -> Result<Result<(), StoreError>, TransmissionError> {
    let mut written = Ok(());
    let mut pos = reader.buffer().len().min(len);
    if pos > 0 {
        written = store.write_blocking(offset, &reader.buffer()[..pos], false);
        reader.consume(pos);
    }
    let mut threshold = 1;
    let mut piece = BytesMut::new();
    let in_place = reader.get_ref().receives_in_place();
    while pos < len {
        let mut n = (len - pos).min(PIECE_MAX);
        let target = in_place
            .then(|| store.write_in_place(offset + pos as u64, n))
            .flatten();
        if let Some(mut target) = target {
            let got = receive_in_place(reader, &mut target, len - pos, &mut threshold).await?;
            pos += got;
            if got == n {
                continue;
            }
            // A page could not be written: the rest of this piece is received into a buffer,
            // and its write reports why.
            n -= got;
        }
        let at = offset + pos as u64;
        let permit = charge(budget, n).await;
        // Whatever has arrived (at least the wake-up threshold, as a rule), written at once.
        piece.clear();
        piece.reserve(n);
        let got = receive_some(reader, &mut piece, n, len - pos, &mut threshold).await?;
        // Every piece is written; the first failure is the answer.
        written = written.and(store.write_blocking(at, &piece[..got], false));
        drop(permit);
        pos += got;
    }
    if threshold != 1 {
        // Request headers must wake the reader again as soon as they arrive (an error above
        // ends the connection, so only this path needs it).
        reader.get_ref().set_wake_threshold(1);
    }
    Ok(written)
}

/// Receives `target` whole from the socket, straight into the store ([`InPlace`]), the wake-up
/// threshold following the `remaining` payload bytes still to come: the bytes received, fewer
/// than the target's length when a page of it could not be written (`EFAULT`; the rest is
/// still waiting in the socket). End of stream is an error (the payload is incomplete).
async fn receive_in_place<R: RequestSource>(
    reader: &mut BufReader<R>,
    target: &mut InPlace,
    remaining: usize,
    threshold: &mut usize,
) -> Result<usize, TransmissionError> {
    let mut got = 0;
    while target.remaining() > 0 {
        follow_wake_threshold(reader, remaining - got, threshold);
        // (`&mut`: the future must be `Send`, and sources need not be `Sync`.)
        let (source, into) = (reader.get_mut(), &mut *target);
        match std::future::poll_fn(move |cx| source.poll_receive_in_place(cx, into)).await {
            Ok(0) => {
                return Err(TransmissionError::ReadPayload(
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => break,
            Err(e) => return Err(TransmissionError::ReadPayload(e)),
        }
    }
    Ok(got)
}

/// One receive of a large WRITE payload straight from the socket: appends what has arrived,
/// up to `limit` bytes, to `buf` and returns how much. The socket's wake-up threshold (last set
/// to `*threshold`) first follows the `remaining` payload bytes still to come: one above them
/// would never be reached. End of stream is an error (the payload is incomplete).
async fn receive_some<R: RequestSource>(
    reader: &mut BufReader<R>,
    buf: &mut BytesMut,
    limit: usize,
    remaining: usize,
    threshold: &mut usize,
) -> Result<usize, TransmissionError> {
    follow_wake_threshold(reader, remaining, threshold);
    let got = reader
        .get_mut()
        .take(limit as u64)
        .read_buf(buf)
        .await
        .map_err(TransmissionError::ReadPayload)?;
    if got == 0 {
        return Err(TransmissionError::ReadPayload(
            io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    Ok(got)
}

/// Sets the socket's wake-up threshold (last set to `*threshold`) to follow the `remaining`
/// payload bytes still to come ([`wake_threshold`]).
fn follow_wake_threshold<R: RequestSource>(
    reader: &BufReader<R>,
    remaining: usize,
    threshold: &mut usize,
) {
    let wake = wake_threshold(remaining);
    if wake != *threshold {
        reader.get_ref().set_wake_threshold(wake);
        *threshold = wake;
    }
}

/// The wake-up threshold while `remaining` payload bytes are still to come: as much of them as
/// one piece takes (never more than remain, or the last piece would never wake the
/// reader), in steps so the socket option is not set again for every piece; 1 (any data) for
/// short remainders. Without it the reader is woken, and reads, once per arriving segment.
fn wake_threshold(remaining: usize) -> usize {
    if remaining < 2 * WAKE_STEP {
        return 1;
    }
    (remaining.min(PIECE_MAX) / WAKE_STEP) * WAKE_STEP
}

/// Granularity of [`wake_threshold`].
const WAKE_STEP: usize = 64 << 10;
/// Largest piece of a large WRITE received at once (see [`receive_large_write`]), and so the
/// largest wake-up threshold. 256 KiB: the piece is still in the CPU's cache when `pwrite`
/// copies it into the page cache, and the file is written while the next piece arrives. 1 MiB
/// writes at QD8 to ext4 over loopback, 7 runs each: 2,608-2,746 MiB/s against 2,370 with 1
/// MiB pieces and 2,096 with 128 KiB ones (nbdkit 2,317-2,508), at 324-343 against 372 µs of
/// CPU per write (docs/benchmarks-nbd.md, session 14).
const PIECE_MAX: usize = 256 << 10;

/// WRITEs larger than this to a local file are received in pieces ([`receive_large_write`]).
const LARGE_WRITE_MIN: usize = 128 << 10;

/// Reads exactly `len` payload bytes into a fresh buffer (no zero-fill): first what the
/// header read already buffered, then straight from the socket into the payload buffer (no
/// second copy through the read buffer), except for short tails, which go through the buffer
/// so one receive also picks up the requests behind them.
async fn read_payload<R: RequestSource>(
    reader: &mut BufReader<R>,
    len: usize,
) -> Result<Bytes, TransmissionError> {
    let mut buf = BytesMut::with_capacity(len);
    let buffered = reader.buffer();
    let n = buffered.len().min(len);
    buf.extend_from_slice(&buffered[..n]);
    reader.consume(n);
    while buf.len() < len {
        let want = len - buf.len();
        let n = if want >= DIRECT_READ_MIN {
            reader.get_mut().take(want as u64).read_buf(&mut buf).await
        } else {
            (&mut *reader).take(want as u64).read_buf(&mut buf).await
        }
        .map_err(TransmissionError::ReadPayload)?;
        if n == 0 {
            return Err(TransmissionError::ReadPayload(
                io::ErrorKind::UnexpectedEof.into(),
            ));
        }
    }
    Ok(buf.freeze())
}

/// Payload remainders at least this long are read from the socket directly into the payload.
const DIRECT_READ_MIN: usize = 64 << 10;

/// Reads and drops `len` bytes.
async fn discard<R: RequestSource>(
    reader: &mut BufReader<R>,
    len: u64,
) -> Result<(), TransmissionError> {
    if len == 0 {
        return Ok(());
    }
    let copied = tokio::io::copy_buf(&mut (&mut *reader).take(len), &mut tokio::io::sink())
        .await
        .map_err(TransmissionError::ReadPayload)?;
    if copied < len {
        return Err(TransmissionError::ReadPayload(
            io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    Ok(())
}

/// The connection's only writer: sends each reply whole, several per vectored write when
/// replies queue up, and shuts the stream down when every sender is gone.
async fn write_replies(
    sink: Arc<ReplySink>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) -> Result<(), TransmissionError> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    let mut tracks: Vec<(Track, bool)> = Vec::with_capacity(MAX_BATCH);
    let mut result = Ok(());
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r {
                Some(first) => first,
                None => break,
            },
            // A request task's own write failed: its error is taken below.
            () = sink.direct_failed.notified() => break,
        };
        let mut bytes = first.reply.len();
        tracks.push((first.track, first.ok));
        batch.push(first.reply);
        if rx.is_empty() {
            // Let request tasks that are ready right now finish first, so their replies share
            // this write; costs no syscall and little latency.
            tokio::task::yield_now().await;
        }
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.reply.len();
                    tracks.push((next.track, next.ok));
                    batch.push(next.reply);
                }
                Err(_) => break,
            }
        }
        let now = Instant::now();
        for (track, ok) in tracks.drain(..) {
            sink.record(&track, ok, now);
        }
        if let Err(e) = sink.stream.lock().await.write(&batch).await {
            result = Err(TransmissionError::WriteReply(e));
            break;
        }
        batch.clear();
    }
    let mut stream = sink.stream.lock().await;
    if result.is_ok() {
        // A reply a request task wrote itself may have failed after the last batch.
        if let Some(e) = stream.broken.take() {
            return Err(TransmissionError::WriteReply(e));
        }
        let _ = stream.writer.shutdown().await;
    }
    result
}

async fn write_batch<W: AsyncWrite + Unpin>(writer: &mut W, batch: &[Outgoing]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 3);
    for reply in batch {
        if reply.head.len > 0 {
            slices.push(IoSlice::new(reply.head.as_slice()));
        }
        for piece in &reply.body {
            slices.push(IoSlice::new(piece));
        }
    }
    // Stay below IOV_MAX (1024) per syscall.
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let take = rest.len().min(512);
        let n = writer.write_vectored(&rest[..take]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    writer.flush().await
}

#[cfg(test)]
mod tests;
