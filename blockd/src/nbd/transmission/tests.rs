//! Transmission-phase tests over an in-memory duplex against a real store on a temporary file.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::*;
use crate::nbd::handshake::BASE_ALLOCATION_ID;
use crate::nbd::proto::*;
use crate::store::{BlockStore, EngineKind, OpenOptions};

const SIZE: u64 = 8 << 20;

/// The client end of a test connection (in-memory duplex or TCP).
trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

struct Harness {
    client: Box<dyn ClientStream>,
    server: JoinHandle<Result<End, TransmissionError>>,
    store: BlockStore,
    metrics: Arc<NbdMetrics>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn open_store(read_only: bool) -> (BlockStore, tempfile::TempDir) {
    open_store_in(read_only, tempfile::tempdir().unwrap())
}

fn open_store_in(read_only: bool, dir: tempfile::TempDir) -> (BlockStore, tempfile::TempDir) {
    let path = dir.path().join("disk.img");
    let store = BlockStore::open(
        &path,
        &OpenOptions {
            size: Some(SIZE),
            read_only: false,
            engine: EngineKind::Sync,
        },
    )
    .unwrap();
    if read_only {
        drop(store);
        let store = BlockStore::open(
            &path,
            &OpenOptions {
                size: None,
                read_only: true,
                engine: EngineKind::Sync,
            },
        )
        .unwrap();
        return (store, dir);
    }
    (store, dir)
}

fn start(structured: bool, read_only: bool, limits: Limits) -> Harness {
    let (client, server_end) = tokio::io::duplex(1 << 20);
    let (r, w) = tokio::io::split(server_end);
    start_on(
        Box::new(client),
        r,
        w,
        open_store(read_only),
        structured,
        limits,
    )
}

/// Like [`start`] over a loopback TCP connection, where large WRITE payloads are received in
/// pieces (with the socket's wake-up threshold raised) and written by the receiving task into
/// the file under `root`.
async fn start_tcp_in(root: &str, structured: bool, limits: Limits) -> Harness {
    let dir = tempfile::Builder::new()
        .prefix("blockd-transmission-test")
        .tempdir_in(root)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server_end, _) = listener.accept().await.unwrap();
    let (r, w) = server_end.into_split();
    let store = open_store_in(false, dir);
    start_on(Box::new(client), r, w, store, structured, limits)
}

fn start_on<R, W>(
    client: Box<dyn ClientStream>,
    r: R,
    w: W,
    (store, dir): (BlockStore, tempfile::TempDir),
    structured: bool,
    limits: Limits,
) -> Harness
where
    R: RequestSource,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = Session {
        structured,
        base_allocation: structured.then_some(BASE_ALLOCATION_ID),
        flags: 0,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = Arc::new(NbdMetrics::new());
    let server = tokio::spawn(serve(
        r,
        w,
        store.clone().into(),
        session,
        limits,
        metrics.clone(),
        async move {
            if stopped.await.is_err() {
                std::future::pending::<()>().await;
            }
        },
    ));
    Harness {
        client,
        server,
        store,
        metrics,
        _dir: dir,
        stop: Some(stop),
    }
}

fn req(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Request {
    Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    }
}

impl Harness {
    async fn send(&mut self, r: Request, payload: &[u8]) {
        let mut b = BytesMut::new();
        b.put_slice(&r.encode());
        b.put_slice(payload);
        self.client.write_all(&b).await.unwrap();
    }

    /// Reads one simple reply; `data_len` bytes follow a successful read reply.
    async fn simple(&mut self, data_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut head = [0u8; SIMPLE_REPLY_LEN];
        self.client.read_exact(&mut head).await.unwrap();
        let (Reply::Simple { error, cookie }, _) = Reply::decode(&head).unwrap() else {
            panic!("not a simple reply")
        };
        let mut data = vec![0u8; if error == 0 { data_len(cookie) } else { 0 }];
        self.client.read_exact(&mut data).await.unwrap();
        (cookie, error, data)
    }

    /// Reads one reply message in structured mode (a simple reply or one chunk).
    async fn message(&mut self) -> Reply {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        self.client.read_exact(&mut head[..4]).await.unwrap();
        if u32::from_be_bytes(head[..4].try_into().unwrap()) == SIMPLE_REPLY_MAGIC {
            self.client.read_exact(&mut head[4..16]).await.unwrap();
            return Reply::decode(&head[..16]).unwrap().0;
        }
        self.client.read_exact(&mut head[4..]).await.unwrap();
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut all = head.to_vec();
        all.resize(CHUNK_HEADER_LEN + len, 0);
        self.client
            .read_exact(&mut all[CHUNK_HEADER_LEN..])
            .await
            .unwrap();
        Reply::decode(&all).unwrap().0
    }

    /// Collects a structured READ reply into (error, bytes) with holes as zeroes.
    async fn structured_read(&mut self, offset: u64, len: usize) -> (u64, u32, Vec<u8>, Vec<u16>) {
        let mut out = vec![0xeeu8; len];
        let mut kinds = Vec::new();
        let mut error = 0;
        loop {
            match self.message().await {
                Reply::Chunk { header, payload } => {
                    kinds.push(header.kind);
                    match payload {
                        Chunk::Data { offset: at, data } => {
                            let s = (at - offset) as usize;
                            out[s..s + data.len()].copy_from_slice(&data);
                        }
                        Chunk::Hole { offset: at, length } => {
                            let s = (at - offset) as usize;
                            out[s..s + length as usize].fill(0);
                        }
                        Chunk::Error { error: e, .. } => error = e,
                        Chunk::None => {}
                        other => panic!("unexpected chunk {other:?}"),
                    }
                    if header.flags & REPLY_FLAG_DONE != 0 {
                        return (header.cookie, error, out, kinds);
                    }
                }
                Reply::Simple { .. } => panic!("simple reply to a structured read"),
            }
        }
    }

    async fn finish(self) -> Result<End, TransmissionError> {
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("connection ends")
            .expect("server task")
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_by_cookie_and_disc_drains() {
    let mut h = start(false, false, Limits::default());
    // Pipeline 32 writes without reading replies, then DISC.
    for i in 0..32u64 {
        h.send(
            req(CMD_WRITE, 0, 100 + i, i * 4096, 4096),
            &pattern(4096, i as u8),
        )
        .await;
    }
    h.send(req(CMD_FLUSH, 0, 999, 0, 0), &[]).await;
    let mut seen = HashMap::new();
    for _ in 0..33 {
        let (cookie, error, _) = h.simple(|_| 0).await;
        assert_eq!(error, 0);
        assert!(
            seen.insert(cookie, ()).is_none(),
            "duplicate reply for {cookie}"
        );
    }
    assert_eq!(seen.len(), 33);
    // Reads, pipelined; each answered with its own data.
    for i in 0..32u64 {
        h.send(req(CMD_READ, 0, 200 + i, i * 4096, 4096), &[]).await;
    }
    for _ in 0..32 {
        let (cookie, error, data) = h.simple(|_| 4096).await;
        assert_eq!(error, 0);
        assert_eq!(data, pattern(4096, (cookie - 200) as u8));
    }
    // Writes followed immediately by DISC: all are replied to, then the stream ends.
    for i in 0..8u64 {
        h.send(
            req(CMD_WRITE, CMD_FLAG_FUA, 300 + i, (64 + i) * 4096, 4096),
            &pattern(4096, 7),
        )
        .await;
    }
    h.send(req(CMD_DISC, 0, 400, 0, 0), &[]).await;
    for _ in 0..8 {
        assert_eq!(h.simple(|_| 0).await.1, 0);
    }
    let mut rest = Vec::new();
    h.client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let m = h.metrics.snapshot();
    let w = m.command(Command::Write);
    assert_eq!((w.requests, w.errors, w.bytes), (40, 0, 40 * 4096));
    assert_eq!(w.latency.count, 40);
    let r = m.command(Command::Read);
    assert_eq!((r.requests, r.errors, r.bytes), (32, 0, 32 * 4096));
    assert_eq!(m.command(Command::Flush).requests, 1);
    let store = h.store.clone();
    assert_eq!(h.finish().await.unwrap(), End::Disconnect);
    let data = store.read(70 * 4096, 4096).await.unwrap();
    assert_eq!(&data[..], &pattern(4096, 7)[..]);
}

#[tokio::test]
async fn errors_keep_the_connection_usable() {
    let limits = Limits {
        max_payload: 64 << 10,
        ..Limits::default()
    };
    let mut h = start(false, false, limits);
    // Too large: the payload is read and discarded.
    h.send(
        req(CMD_WRITE, 0, 1, 0, (64 << 10) + 1),
        &vec![0xaa; (64 << 10) + 1],
    )
    .await;
    assert_eq!(h.simple(|_| 0).await, (1, EOVERFLOW, vec![]));
    h.send(req(CMD_READ, 0, 2, 0, (64 << 10) + 1), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (2, EOVERFLOW, vec![]));
    // Past the end.
    h.send(req(CMD_READ, 0, 3, SIZE - 512, 1024), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (3, EINVAL, vec![]));
    h.send(req(CMD_WRITE, 0, 4, SIZE, 16), &[1; 16]).await;
    assert_eq!(h.simple(|_| 0).await, (4, ENOSPC, vec![]));
    h.send(req(CMD_TRIM, 0, 5, u64::MAX - 1, 16), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (5, EINVAL, vec![]));
    // Unknown command, bad flags, zero length, DF without structured replies, FLUSH with a range.
    h.send(req(42, 0, 6, 0, 0), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (6, EINVAL, vec![]));
    h.send(req(CMD_WRITE, CMD_FLAG_NO_HOLE, 7, 0, 4), &[1, 2, 3, 4])
        .await;
    assert_eq!(h.simple(|_| 0).await, (7, EINVAL, vec![]));
    h.send(req(CMD_READ, 0, 8, 0, 0), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (8, EINVAL, vec![]));
    h.send(req(CMD_READ, CMD_FLAG_DF, 9, 0, 16), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (9, EINVAL, vec![]));
    h.send(req(CMD_FLUSH, 0, 10, 1, 0), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (10, EINVAL, vec![]));
    h.send(req(CMD_BLOCK_STATUS, 0, 11, 0, 512), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (11, EINVAL, vec![]));
    // Still in sync: a 1-byte unaligned write and read round-trip.
    h.send(req(CMD_WRITE, 0, 12, 12345, 3), b"xyz").await;
    assert_eq!(h.simple(|_| 0).await, (12, 0, vec![]));
    h.send(req(CMD_READ, 0, 13, 12344, 5), &[]).await;
    assert_eq!(h.simple(|_| 5).await, (13, 0, b"\0xyz\0".to_vec()));
    // Every answered request of a known command is counted; refusals count as errors.
    let m = h.metrics.snapshot();
    let w = m.command(Command::Write);
    assert_eq!((w.requests, w.errors), (4, 3));
    assert_eq!(w.bytes, (64 << 10) + 1 + 16 + 4 + 3);
    let r = m.command(Command::Read);
    assert_eq!((r.requests, r.errors), (5, 4));
    assert_eq!(m.command(Command::Trim).errors, 1);
    assert_eq!(m.command(Command::Flush).errors, 1);
    assert_eq!(m.command(Command::BlockStatus).errors, 1);
    let total: u64 = m.commands.iter().map(|c| c.requests).sum();
    assert_eq!(total, 12, "the unknown command is not counted");
    // A bad magic ends the connection.
    h.client.write_all(&[0u8; REQUEST_LEN]).await.unwrap();
    assert!(matches!(
        h.finish().await,
        Err(TransmissionError::BadMagic(0))
    ));
}

#[tokio::test]
async fn read_only_export_refuses_writes() {
    let mut h = start(false, true, Limits::default());
    h.send(req(CMD_WRITE, 0, 1, 0, 4), &[1, 2, 3, 4]).await;
    assert_eq!(h.simple(|_| 0).await, (1, EPERM, vec![]));
    h.send(req(CMD_TRIM, 0, 2, 0, 4096), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (2, EPERM, vec![]));
    h.send(req(CMD_WRITE_ZEROES, 0, 3, 0, 4096), &[]).await;
    assert_eq!(h.simple(|_| 0).await, (3, EPERM, vec![]));
    h.send(req(CMD_READ, 0, 4, 0, 4), &[]).await;
    assert_eq!(h.simple(|_| 4).await, (4, 0, vec![0; 4]));
    h.send(req(CMD_FLUSH, 0, 5, 0, 0), &[]).await;
    assert_eq!(h.simple(|_| 0).await.1, 0);
    drop(h.client);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), h.server)
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        End::Eof
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_are_streamed_in_chunks() {
    let limits = Limits {
        chunk: 64 << 10,
        budget: 256 << 10,
        ..Limits::default()
    };
    let mut h = start(false, false, limits);
    let data = pattern(3 << 20, 3);
    h.send(req(CMD_WRITE, 0, 1, 4096, data.len() as u32), &data)
        .await;
    assert_eq!(h.simple(|_| 0).await, (1, 0, vec![]));
    h.send(req(CMD_READ, 0, 2, 4096, data.len() as u32), &[])
        .await;
    let (cookie, error, back) = h.simple(|_| 3 << 20).await;
    assert_eq!((cookie, error), (2, 0));
    assert!(back == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_reads_send_holes_and_block_status() {
    let mut h = start(true, false, Limits::default());
    // Data in the middle of a 1 MiB region; the rest is a hole of the sparse file.
    let data = pattern(64 << 10, 9);
    h.send(req(CMD_WRITE, 0, 1, 512 << 10, data.len() as u32), &data)
        .await;
    assert!(matches!(
        h.message().await,
        Reply::Simple {
            error: 0,
            cookie: 1
        }
    ));
    h.send(req(CMD_READ, 0, 2, 0, 1 << 20), &[]).await;
    let (cookie, error, back, kinds) = h.structured_read(0, 1 << 20).await;
    assert_eq!((cookie, error), (2, 0));
    let mut expect = vec![0u8; 1 << 20];
    expect[512 << 10..(512 << 10) + data.len()].copy_from_slice(&data);
    assert!(back == expect);
    if h.store.block_status(0, 1 << 20).await.unwrap().len() > 1 {
        assert!(kinds.contains(&REPLY_TYPE_OFFSET_HOLE), "{kinds:?}");
    }
    // DF: exactly one data chunk.
    h.send(req(CMD_READ, CMD_FLAG_DF, 3, 0, 1 << 20), &[]).await;
    let (_, error, back, kinds) = h.structured_read(0, 1 << 20).await;
    assert_eq!(error, 0);
    assert!(back == expect);
    assert_eq!(kinds, vec![REPLY_TYPE_OFFSET_DATA]);
    // Small read: a single data chunk.
    h.send(req(CMD_READ, 0, 4, (512 << 10) + 1, 10), &[]).await;
    let (_, _, back, kinds) = h.structured_read((512 << 10) + 1, 10).await;
    assert_eq!(back, data[1..11].to_vec());
    assert_eq!(kinds, vec![REPLY_TYPE_OFFSET_DATA]);
    // Errors on a structured read come as an error chunk.
    h.send(req(CMD_READ, 0, 5, SIZE, 10), &[]).await;
    let (_, error, _, kinds) = h.structured_read(SIZE, 10).await;
    assert_eq!((error, kinds), (EINVAL, vec![REPLY_TYPE_ERROR]));
    // Block status with and without REQ_ONE.
    for (cookie, flags) in [(6u64, 0u16), (7, CMD_FLAG_REQ_ONE)] {
        h.send(req(CMD_BLOCK_STATUS, flags, cookie, 0, 1 << 20), &[])
            .await;
        let Reply::Chunk {
            header,
            payload:
                Chunk::BlockStatus {
                    context_id,
                    descriptors,
                },
        } = h.message().await
        else {
            panic!("not a block status chunk")
        };
        assert_eq!(header.cookie, cookie);
        assert_eq!(header.flags, REPLY_FLAG_DONE);
        assert_eq!(context_id, BASE_ALLOCATION_ID);
        let total: u64 = descriptors.iter().map(|d| u64::from(d.length)).sum();
        assert!(total > 0 && total <= 1 << 20);
        if flags != 0 {
            assert_eq!(descriptors.len(), 1);
        }
    }
    // Write zeroes (punching) then the range reads as zeroes.
    h.send(req(CMD_WRITE_ZEROES, 0, 8, 512 << 10, 4096), &[])
        .await;
    assert!(matches!(
        h.message().await,
        Reply::Simple {
            error: 0,
            cookie: 8
        }
    ));
    h.send(
        req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 9, 520 << 10, 4096),
        &[],
    )
    .await;
    match h.message().await {
        Reply::Simple {
            error: 0,
            cookie: 9,
        } => assert!(h.store.supports_fast_zero()),
        Reply::Chunk {
            payload: Chunk::Error { error, .. },
            header,
        } => {
            assert_eq!((header.cookie, error), (9, ENOTSUP));
        }
        other => panic!("{other:?}"),
    }
    h.send(req(CMD_READ, 0, 10, 512 << 10, 4096), &[]).await;
    let (_, _, back, _) = h.structured_read(512 << 10, 4096).await;
    assert_eq!(back, vec![0u8; 4096]);
    h.send(req(CMD_CACHE, 0, 11, 0, 4096), &[]).await;
    assert!(matches!(
        h.message().await,
        Reply::Simple {
            error: 0,
            cookie: 11
        }
    ));
    h.send(req(CMD_TRIM, CMD_FLAG_FUA, 12, 0, 4096), &[]).await;
    assert!(matches!(
        h.message().await,
        Reply::Simple {
            error: 0,
            cookie: 12
        }
    ));
    h.send(req(CMD_DISC, 0, 13, 0, 0), &[]).await;
    assert_eq!(h.finish().await.unwrap(), End::Disconnect);
}

#[tokio::test]
async fn shutdown_stops_reading_and_drains() {
    let mut h = start(false, false, Limits::default());
    h.send(req(CMD_WRITE, 0, 1, 0, 4), &[1, 2, 3, 4]).await;
    assert_eq!(h.simple(|_| 0).await, (1, 0, vec![]));
    let stop = h.stop.take().unwrap();
    stop.send(()).unwrap();
    assert_eq!(h.finish().await.unwrap(), End::Shutdown);
}

/// Encodes `count` requests: small WRITEs alternating with refused READs (past the end).
fn write_and_refused_requests(count: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    for cookie in 0..count {
        if cookie % 2 == 0 {
            b.put_slice(&req(CMD_WRITE, 0, cookie, 4096 * (cookie % 64), 512).encode());
            b.put_slice(&[cookie as u8; 512]);
        } else {
            b.put_slice(&req(CMD_READ, 0, cookie, SIZE, 4096).encode());
        }
    }
    b.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_no_replies_holds_the_reader_back() {
    // Small pipes both ways and a budget of 16 reply shares: once the replies fill the pipe to
    // the client, the server may take only a bounded number of further requests.
    let (client, server_end) = tokio::io::duplex(4096);
    let (r, w) = tokio::io::split(server_end);
    let limits = Limits {
        max_payload: 32 << 10,
        chunk: 32 << 10,
        budget: 64 << 10,
        ..Limits::default()
    };
    let h = start_on(Box::new(client), r, w, open_store(false), false, limits);
    let count = 4000u64;
    let requests = write_and_refused_requests(count);
    let (mut from_server, mut to_server) = tokio::io::split(h.client);
    let sender = tokio::spawn(async move {
        to_server.write_all(&requests).await.unwrap();
        to_server
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sender.is_finished(),
        "the server took all {count} requests while no reply was read (replies queued without \
         bound)"
    );
    // Reading the replies lets everything through, each request answered once.
    let mut seen = vec![false; count as usize];
    for _ in 0..count {
        let mut head = [0u8; SIMPLE_REPLY_LEN];
        from_server.read_exact(&mut head).await.unwrap();
        let (Reply::Simple { error, cookie }, _) = Reply::decode(&head).unwrap() else {
            panic!("not a simple reply")
        };
        assert_eq!(
            error,
            if cookie % 2 == 0 { 0 } else { EINVAL },
            "cookie {cookie}"
        );
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
    }
    let mut to_server = sender.await.unwrap();
    to_server
        .write_all(&req(CMD_DISC, 0, 0, 0, 0).encode())
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), h.server).await;
    assert_eq!(end.unwrap().unwrap().unwrap(), End::Disconnect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_cannot_hold_a_shutdown() {
    let limits = Limits {
        shutdown_grace: Duration::from_millis(300),
        ..Limits::default()
    };
    // A client that sent half a WRITE payload and stopped.
    let mut h = start(false, false, limits);
    h.send(req(CMD_WRITE, 0, 1, 0, 65536), &[7u8; 30000]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.stop.take().unwrap().send(()).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), h.server).await;
    assert_eq!(
        end.expect("the connection ended within the grace")
            .unwrap()
            .unwrap(),
        End::Shutdown
    );

    // A client that does not read its replies (a full pipe to it) while requests are in flight.
    let (client, server_end) = tokio::io::duplex(4096);
    let (r, w) = tokio::io::split(server_end);
    let h = start_on(Box::new(client), r, w, open_store(false), false, limits);
    let mut client = h.client;
    for cookie in 0..8 {
        client
            .write_all(&req(CMD_READ, 0, cookie, 0, 65536).encode())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.stop.unwrap().send(()).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), h.server).await;
    let end = end.expect("the connection ended within the grace").unwrap();
    assert!(
        matches!(end, Err(TransmissionError::ShutdownStalled(_))),
        "{end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_dropped_when_its_large_replies_block() {
    // Replies of 128 KiB and more are written by their request's task: one blocked in that
    // write must not keep the socket open after the grace.
    let limits = Limits {
        shutdown_grace: Duration::from_millis(300),
        ..Limits::default()
    };
    let (client, server_end) = tokio::io::duplex(4096);
    let (r, w) = tokio::io::split(server_end);
    let h = start_on(Box::new(client), r, w, open_store(false), false, limits);
    let mut client = h.client;
    for cookie in 0..4 {
        client
            .write_all(&req(CMD_READ, 0, cookie, 0, 256 << 10).encode())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.stop.unwrap().send(()).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), h.server).await;
    let end = end.expect("the connection ended within the grace").unwrap();
    assert!(
        matches!(end, Err(TransmissionError::ShutdownStalled(_))),
        "{end:?}"
    );
    // The server's end is gone (the client still reads nothing): a write to it fails.
    let closed = async {
        loop {
            if client.write_all(&[0u8; 16]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), closed)
        .await
        .expect("the server closed its end of the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_large_reply_write_ends_the_connection() {
    // A large READ reply is written by the request's own task; its failure ends the
    // connection at once, though the client stays connected and idle.
    let (client, server_end) = tokio::io::duplex(1 << 20);
    let (r, _w) = tokio::io::split(server_end);
    let mut h = start_on(
        Box::new(client),
        r,
        BrokenWriter,
        open_store(false),
        false,
        Limits::default(),
    );
    h.send(req(CMD_READ, 0, 1, 0, 256 << 10), &[]).await;
    let end = tokio::time::timeout(Duration::from_secs(5), h.server).await;
    let end = end.expect("the connection ended").unwrap();
    assert!(
        matches!(end, Err(TransmissionError::WriteReply(_))),
        "{end:?}"
    );
}

/// A write half that fails every write.
struct BrokenWriter;

impl AsyncWrite for BrokenWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reply_write_ends_the_connection() {
    // The client stays connected and idle after one request whose reply cannot be written:
    // the server stops taking requests instead of waiting for the next one.
    let (client, server_end) = tokio::io::duplex(1 << 20);
    let (r, _w) = tokio::io::split(server_end);
    let mut h = start_on(
        Box::new(client),
        r,
        BrokenWriter,
        open_store(false),
        false,
        Limits::default(),
    );
    h.send(req(CMD_FLUSH, 0, 1, 0, 0), &[]).await;
    let end = tokio::time::timeout(Duration::from_secs(5), h.server).await;
    let end = end.expect("the connection ended").unwrap();
    assert!(
        matches!(end, Err(TransmissionError::WriteReply(_))),
        "{end:?}"
    );
}

#[test]
fn descriptors_merge_clip_and_limit() {
    let e = |length, hole| Extent {
        length,
        hole,
        zero: hole,
    };
    let d = descriptors(&[e(100, false), e(50, false), e(1000, true)], 400, false);
    assert_eq!(
        d,
        vec![
            BlockDescriptor {
                length: 150,
                status: 0
            },
            BlockDescriptor {
                length: 250,
                status: STATE_HOLE | STATE_ZERO
            }
        ]
    );
    assert_eq!(
        descriptors(&[e(100, false), e(50, true)], 400, true).len(),
        1
    );
    assert_eq!(
        descriptors(&[], 7, false),
        vec![BlockDescriptor {
            length: 7,
            status: 0
        }]
    );
}

#[test]
fn validation_picks_the_right_error() {
    let s = Session {
        structured: true,
        base_allocation: None,
        flags: 0,
    };
    let v = |r: Request, ro: bool| validate(&r, &s, 1000, ro, 64).map_err(|e| errno(&e));
    assert_eq!(v(req(CMD_WRITE, 0, 1, 0, 10), true), Err(EPERM));
    assert_eq!(v(req(CMD_WRITE, 0, 1, 995, 10), false), Err(ENOSPC));
    assert_eq!(v(req(CMD_WRITE_ZEROES, 0, 1, 995, 10), false), Err(ENOSPC));
    assert_eq!(v(req(CMD_READ, 0, 1, 995, 10), false), Err(EINVAL));
    assert_eq!(v(req(CMD_READ, 0, 1, 0, 65), false), Err(EOVERFLOW));
    assert_eq!(
        v(req(CMD_TRIM, 0, 1, 0, 1000), false),
        Ok(Op::Trim {
            offset: 0,
            len: 1000,
            fua: false
        })
    );
    assert_eq!(v(req(CMD_BLOCK_STATUS, 0, 1, 0, 10), false), Err(EINVAL));
    assert_eq!(
        v(req(CMD_READ, CMD_FLAG_DF, 1, 0, 10), false),
        Ok(Op::Read {
            offset: 0,
            len: 10,
            df: true
        })
    );
    assert_eq!(v(req(CMD_READ, 1 << 9, 1, 0, 10), false), Err(EINVAL));
    assert_eq!(v(req(CMD_DISC, 0xffff, 1, 5, 5), false), Ok(Op::Disconnect));
    assert_eq!(
        errno(&RequestError::Store(StoreError::Write {
            offset: 0,
            len: 1,
            source: std::io::Error::from_raw_os_error(libc::EDQUOT)
        })),
        ENOSPC
    );
    assert_eq!(errno(&RequestError::Store(StoreError::NotFast)), ENOTSUP);
    assert_eq!(errno(&RequestError::Store(StoreError::EngineGone)), EIO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_over_a_socket_are_exact() {
    large_requests_over_a_socket("/dev/shm").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_over_a_socket_to_disk_are_exact() {
    large_requests_over_a_socket("/var/tmp").await
}

async fn large_requests_over_a_socket(root: &str) {
    for structured in [false, true] {
        let mut h = start_tcp_in(root, structured, Limits::default()).await;
        // The first writes fill a sparse file: no page to receive into yet, so each is
        // received into a buffer and written; the later ones overwrite and, on tmpfs, are
        // received in place (FUA aside).
        let mut data = pattern(4 << 20, 3);
        for (i, piece) in data.chunks(1 << 20).enumerate() {
            let at = (i << 20) as u64;
            h.send(req(CMD_WRITE, 0, i as u64, at, piece.len() as u32), piece)
                .await;
            assert_eq!(h.simple(|_| 0).await.1, 0);
        }
        // Large writes pipelined, unaligned, one with FUA, one past the end (its payload is
        // still consumed), then everything compared through the store. They do not overlap:
        // NBD does not order writes in flight together.
        let writes: [(u64, usize, u16); 4] = [
            (100_001, 300_000, 0),
            ((2 << 20) + 7, (1 << 20) + 3, CMD_FLAG_FUA),
            ((3 << 20) + 4096, (1 << 20) - 8192, 0),
            (SIZE - 4096, 200_000, 0),
        ];
        for (i, &(offset, len, flags)) in writes.iter().enumerate() {
            let payload = pattern(len, 40 + i as u8);
            h.send(
                req(CMD_WRITE, flags, 10 + i as u64, offset, len as u32),
                &payload,
            )
            .await;
            if offset as usize + len <= data.len() {
                data[offset as usize..offset as usize + len].copy_from_slice(&payload);
            }
        }
        for _ in writes {
            let (cookie, error) = match h.message().await {
                Reply::Simple { cookie, error } => (cookie, error),
                Reply::Chunk {
                    header,
                    payload: Chunk::Error { error, .. },
                } => (header.cookie, error),
                other => panic!("unexpected reply {other:?}"),
            };
            let expect = if cookie == 13 { ENOSPC } else { 0 };
            assert_eq!(error, expect, "write {cookie}");
        }
        let stored = h.store.read(0, data.len()).await.unwrap();
        assert!(stored[..] == data[..], "store differs after large writes");
        let in_place = h.store.in_place_receives();
        if h.store.memory_backed() {
            assert!(in_place >= 2, "overwrites received in place: {in_place}");
        } else {
            assert_eq!(in_place, 0, "a disk-backed store receives into buffers");
        }
        // Aligned and unaligned, below, at and above the piece limits; several in flight.
        let reads: [(u64, usize); 7] = [
            (0, 1 << 20),
            (4096 * 3 + 100, (1 << 20) - 300),
            (12345, 200 << 10),
            ((1 << 20) - 1, (1 << 20) + 2),
            (5, 2 << 20),
            (777, 64 << 10),
            ((4 << 20) - (256 << 10), 256 << 10),
        ];
        for (cookie, &(offset, len)) in reads.iter().enumerate() {
            h.send(req(CMD_READ, 0, cookie as u64, offset, len as u32), &[])
                .await;
        }
        let mut seen = 0;
        for _ in reads {
            let (cookie, error, got) = if structured {
                // Replies come in any order: the reply names its cookie; read by its size.
                let reply = h.message().await;
                let Reply::Chunk { header, payload } = reply else {
                    panic!("simple reply to a structured read")
                };
                assert_ne!(header.flags & REPLY_FLAG_DONE, 0, "one chunk per read");
                let Chunk::Data { offset, data } = payload else {
                    panic!("unexpected chunk {payload:?}")
                };
                assert_eq!(offset, reads[header.cookie as usize].0);
                (header.cookie, 0, data.to_vec())
            } else {
                h.simple(|cookie| reads[cookie as usize].1).await
            };
            let (offset, len) = reads[cookie as usize];
            assert_eq!(error, 0);
            assert_eq!(got.len(), len);
            assert!(
                got == data[offset as usize..offset as usize + len],
                "read {cookie} (structured: {structured}) returned wrong data"
            );
            seen |= 1 << cookie;
        }
        assert_eq!(seen, (1 << reads.len()) - 1);
        // A small write after large ones is seen by the next read.
        h.send(req(CMD_WRITE, 0, 50, 0, 4096), &[9; 4096]).await;
        assert_eq!(h.simple(|_| 0).await.1, 0);
        h.send(req(CMD_READ, 0, 51, 0, 1 << 20), &[]).await;
        let got = if structured {
            h.structured_read(0, 1 << 20).await.2
        } else {
            h.simple(|_| 1 << 20).await.2
        };
        assert_eq!(&got[..4096], &[9; 4096][..]);
        assert!(got[4096..] == data[4096..1 << 20]);
        // A WRITE larger than one piece and than the chunk size, unaligned, right after a
        // small request (its header read also buffers part of the payload).
        h.send(req(CMD_WRITE, 0, 53, 3, 512), &[8; 512]).await;
        let big = pattern((6 << 20) + 5, 77);
        h.send(req(CMD_WRITE, 0, 54, (1 << 20) - 3, big.len() as u32), &big)
            .await;
        for _ in 0..2 {
            assert_eq!(h.simple(|_| 0).await.1, 0);
        }
        let stored = h.store.read((1 << 20) - 3, big.len()).await.unwrap();
        assert!(stored[..] == big[..], "store differs after a 6 MiB write");
        assert_eq!(&h.store.read(3, 512).await.unwrap()[..], &[8; 512][..]);
        h.send(req(CMD_DISC, 0, 52, 0, 0), &[]).await;
        assert_eq!(h.finish().await.unwrap(), End::Disconnect);
    }
}
