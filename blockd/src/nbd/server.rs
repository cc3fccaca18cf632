//! The accept loop: takes bound TCP and Unix listeners, runs handshake and transmission for each
//! connection in its own task and tracing span, and shuts down gracefully (stop accepting, let
//! in-flight requests finish and their replies go out, flush the store).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::nbd::congestion;

use crate::nbd::export::Export;
use crate::nbd::handshake::{self, DEFAULT_HANDSHAKE_TIMEOUT, HandshakeConfig, Negotiated};
use crate::nbd::tls::{MaybeTls, TlsSettings};
use crate::nbd::transmission::{self, Limits};
use crate::store::{CopyAt, StoreError};

/// A bound listener the server accepts NBD clients on.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Where the listener is bound, for logs and the ready line (`127.0.0.1:10809`,
    /// `unix:/run/blockd.sock`).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("tcp:<{e}>")),
            Listener::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:<unnamed>".to_string(),
                },
                Err(e) => format!("unix:<{e}>"),
            },
        }
    }
}

/// Tunables of a server; `Default` is what production uses.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Deadline for a client's whole handshake.
    pub handshake_timeout: Duration,
    /// Per-connection transmission limits.
    pub limits: Limits,
    /// TCP congestion control of connections from this host ([`congestion`]).
    pub same_host_congestion: congestion::SameHost,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            limits: Limits::default(),
            same_host_congestion: congestion::SameHost::default(),
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no listeners to accept on")]
    NoListeners,
    #[error("flushing the store at shutdown failed")]
    FinalFlush(#[source] StoreError),
}

/// An accepted connection.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

struct Peer(String);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type BoxRead = Box<dyn transmission::RequestSource>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A byte stream that can be split into independently owned read and write halves.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_halves(self) -> (BoxRead, BoxWrite);
}

impl Transport for TcpStream {
    fn into_halves(self) -> (BoxRead, BoxWrite) {
        let (r, w) = self.into_split();
        (Box::new(r), Box::new(w))
    }
}

impl Transport for UnixStream {
    fn into_halves(self) -> (BoxRead, BoxWrite) {
        let (r, w) = self.into_split();
        (Box::new(r), Box::new(w))
    }
}

impl Transport for tokio::io::DuplexStream {
    fn into_halves(self) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self);
        (Box::new(r), Box::new(w))
    }
}

fn split<S: Transport>(stream: MaybeTls<S>) -> (BoxRead, BoxWrite) {
    match stream {
        MaybeTls::Plain(s) => s.into_halves(),
        MaybeTls::Tls(s) => {
            let (r, w) = tokio::io::split(*s);
            (Box::new(r), Box::new(w))
        }
    }
}

/// Serves `export` on `listeners` until `shutdown` completes, then drains and flushes.
pub async fn run(
    listeners: Vec<Listener>,
    export: Arc<Export>,
    tls: Option<TlsSettings>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with(listeners, export, tls, ServerOptions::default(), shutdown).await
}

/// [`run`] with explicit options (tests shorten the handshake timeout).
pub async fn run_with(
    listeners: Vec<Listener>,
    export: Arc<Export>,
    tls: Option<TlsSettings>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    if listeners.is_empty() {
        return Err(ServerError::NoListeners);
    }
    let handshake = Arc::new(HandshakeConfig {
        export: export.info(),
        tls,
        timeout: options.handshake_timeout,
    });
    let (accepted_tx, mut accepted) = mpsc::channel::<(Conn, Peer)>(64);
    let mut acceptors = JoinSet::new();
    for listener in listeners {
        acceptors.spawn(accept_loop(
            listener,
            options.same_host_congestion,
            accepted_tx.clone(),
        ));
    }
    drop(accepted_tx);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let next_id = AtomicU64::new(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            conn = accepted.recv() => {
                let Some((conn, peer)) = conn else { break };
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!("conn", id, peer = %peer);
                connections.spawn(
                    handle(conn, export.clone(), handshake.clone(), options.limits, stop_rx.clone())
                        .instrument(span),
                );
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    tracing::info!(
        connections = connections.len(),
        "shutting down: no longer accepting"
    );
    acceptors.shutdown().await;
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    export
        .store
        .flush()
        .await
        .map_err(ServerError::FinalFlush)?;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Keepalive probes of client connections: a client host that vanished (no FIN, no RST) is
/// noticed after about two minutes of silence instead of holding its connection forever.
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6)
}

async fn accept_loop(
    listener: Listener,
    same_host: congestion::SameHost,
    accepted: mpsc::Sender<(Conn, Peer)>,
) {
    let mut congestion_warned = false;
    loop {
        let result = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, addr)| {
                if let Err(e) = s.set_nodelay(true) {
                    tracing::warn!(error = %e, "cannot set TCP_NODELAY");
                }
                if let Err(e) = socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive()) {
                    tracing::warn!(error = %e, "cannot set TCP keepalive");
                }
                let choice = s
                    .local_addr()
                    .ok()
                    .and_then(|local| congestion::choice_for(same_host, local, addr));
                if let Some(algorithm) = choice
                    && let Err(e) = congestion::apply(&s, algorithm)
                    // Once: the kernel's answer will not change from one client to the next.
                    && !congestion_warned
                {
                    congestion_warned = true;
                    tracing::warn!(error = %e, %algorithm,
                        "cannot set the TCP congestion control of same-host connections");
                }
                (Conn::Tcp(s), Peer(addr.to_string()))
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, addr)| {
                let peer = addr
                    .as_pathname()
                    .map(|p| format!("unix:{}", p.display()))
                    .unwrap_or_else(|| "unix".to_string());
                (Conn::Unix(s), Peer(peer))
            }),
        };
        match result {
            Ok(conn) => {
                if accepted.send(conn).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, listener = %listener.describe(), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    conn: Conn,
    export: Arc<Export>,
    handshake: Arc<HandshakeConfig>,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    match conn {
        Conn::Tcp(s) => serve_stream(s, &export, &handshake, limits, stop).await,
        Conn::Unix(s) => serve_stream(s, &export, &handshake, limits, stop).await,
    }
}

/// Runs one connection: handshake (abandoned at shutdown), then transmission until the client
/// disconnects or the server shuts down. Errors end only this connection.
pub async fn serve_stream<S: Transport>(
    stream: S,
    export: &Export,
    handshake: &HandshakeConfig,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    tracing::debug!("connected");
    let negotiated = tokio::select! {
        r = handshake::negotiate(stream, handshake) => r,
        _ = stop.wait_for(|s| *s) => {
            tracing::debug!("dropped during handshake: shutting down");
            return;
        }
    };
    let (stream, session) = match negotiated {
        Ok(Negotiated::Transmission { stream, session }) => (stream, session),
        Ok(Negotiated::Aborted) => {
            tracing::debug!("client aborted the handshake");
            return;
        }
        Err(e) => {
            tracing::info!(error = %e, "handshake failed");
            return;
        }
    };
    tracing::debug!(tls = stream.is_tls(), ?session, "transmission");
    let limits = if stream.is_tls() {
        // The TLS writer reads reply data itself: a fault on a mapped page there would be
        // SIGBUS for the whole process, where a plain socket's write returns EFAULT.
        transmission::Limits {
            copy_at: CopyAt::Read,
            ..limits
        }
    } else {
        limits
    };
    let (reader, writer) = split(stream);
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    match transmission::serve(
        reader,
        writer,
        export.store.clone(),
        session,
        limits,
        crate::nbd::metrics::register(&export.name),
        shutdown,
    )
    .await
    {
        Ok(end) => tracing::debug!(?end, "connection closed"),
        Err(e) => tracing::info!(error = %e, "connection ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;
    use crate::store::{BlockStore, EngineKind, OpenOptions};
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, flags: u32) {
        let mut greeting = [0u8; SERVER_GREETING_LEN];
        s.read_exact(&mut greeting).await.unwrap();
        assert!(decode_greeting(&greeting).is_ok());
        s.write_all(&flags.to_be_bytes()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_tcp_and_unix_and_shuts_down_gracefully() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(
            &dir.path().join("disk.img"),
            &OpenOptions {
                size: Some(1 << 20),
                read_only: false,
                engine: EngineKind::Auto,
            },
        )
        .unwrap();
        let export = Arc::new(Export {
            name: "disk".into(),
            description: None,
            store: store.clone().into(),
        });
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let sock = dir.path().join("nbd.sock");
        let unix = UnixListener::bind(&sock).unwrap();
        let listeners = vec![Listener::Tcp(tcp), Listener::Unix(unix)];
        assert_eq!(listeners[0].describe(), tcp_addr.to_string());
        assert_eq!(listeners[1].describe(), format!("unix:{}", sock.display()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let options = ServerOptions {
            handshake_timeout: Duration::from_millis(300),
            ..ServerOptions::default()
        };
        let server = tokio::spawn(run_with(listeners, export, None, options, async move {
            let _ = stopped.await;
        }));

        // A truncated handshake only ends that connection.
        let mut bad = TcpStream::connect(tcp_addr).await.unwrap();
        greet(&mut bad, FLAG_C_FIXED_NEWSTYLE).await;
        bad.write_all(&IHAVEOPT.to_be_bytes()[..3]).await.unwrap();
        drop(bad);

        // A stalled client is disconnected by the handshake timeout.
        let mut stalled = TcpStream::connect(tcp_addr).await.unwrap();
        greet(&mut stalled, FLAG_C_FIXED_NEWSTYLE).await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut rest))
            .await
            .expect("stalled client is disconnected")
            .unwrap_or(0);
        assert_eq!(n, 0);

        // A good client over the Unix socket: old-style EXPORT_NAME with NO_ZEROES.
        let mut c = UnixStream::connect(&sock).await.unwrap();
        greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let mut b = BytesMut::new();
        OptionRequest::ExportName("disk".into()).encode(&mut b);
        c.write_all(&b).await.unwrap();
        let mut reply = [0u8; 10];
        c.read_exact(&mut reply).await.unwrap();
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 1 << 20);
        // Pipeline a write and a read, then shut the server down before reading replies.
        let write = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 1,
            offset: 4096,
            length: 4096,
        };
        let read = Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 2,
            offset: 0,
            length: 512,
        };
        c.write_all(&write.encode()).await.unwrap();
        c.write_all(&[0x5a; 4096]).await.unwrap();
        c.write_all(&read.encode()).await.unwrap();
        // Let the server pick both up before asking it to stop.
        let mut head = [0u8; SIMPLE_REPLY_LEN];
        c.read_exact(&mut head).await.unwrap();
        stop.send(()).unwrap();
        let mut cookies = vec![];
        let first = Reply::decode(&head).unwrap().0;
        let mut replies = vec![first.clone()];
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        // A read reply's 512 data bytes follow its header.
        let mut at = if matches!(
            first,
            Reply::Simple {
                cookie: 2,
                error: 0
            }
        ) {
            512
        } else {
            0
        };
        while at < rest.len() {
            let (r, used) = Reply::decode(&rest[at..]).unwrap();
            at += used;
            if let Reply::Simple {
                cookie: 2,
                error: 0,
            } = r
            {
                at += 512;
            }
            replies.push(r);
        }
        assert_eq!(at, rest.len());
        for r in replies {
            let Reply::Simple { cookie, error } = r else {
                panic!("{r:?}")
            };
            assert_eq!(error, 0);
            cookies.push(cookie);
        }
        cookies.sort();
        assert_eq!(cookies, vec![1, 2]);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
        assert_eq!(
            &store.read(4096, 4096).await.unwrap()[..],
            &[0x5a; 4096][..]
        );
    }
}
