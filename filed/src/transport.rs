//! The authenticated peer link: TCP, mutual TLS from the cluster CA, the group-key
//! challenge-response, then CRC-checked frames with wire byte counters.
//!
//! Opening a link (the initiator on the left, the listener on the right):
//!
//! ```text
//! TCP connect ─────────────────────────────▶ accept
//! TLS handshake (both present certificates issued by the cluster CA;
//!                the initiator checks the server certificate names `expected_peer`)
//! OPEN(group) ─────────────────────────────▶ group known?  ◀── GROUP verdict (ok | no: reason)
//! common::auth::mutual_auth with the group key, context "filed group <group>"
//!                                            proven name: certificate valid for it? host of the group?
//!              ◀──────────────────────────── final verdict (ok | no: reason)
//! frames ◀────────────────────────────────▶ frames
//! ```
//!
//! The whole opening runs under a timeout, so a stalled or silent peer cannot hold a task. The
//! handshake messages have a pure codec ([`encode_open`], [`decode_open`], [`encode_verdict`],
//! [`decode_verdict`]). After the opening, [`Connection`] carries frames of [`common::frame`]
//! (length + CRC-32); [`Connection::feed`] buffers frames so many small messages leave in one TLS
//! record, and [`Connection::into_split`] gives independent halves for pipelining.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::auth::{self, AuthError, SharedKey};
use common::frame::{self, FrameError, FrameReader, FrameWriter};
use common::tls::{self, TlsError};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf, ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

/// The default filed port, like csync2's.
pub const DEFAULT_PORT: u16 = 30865;
/// Default limit of one frame's payload.
pub const DEFAULT_MAX_FRAME: u32 = 16 << 20;
/// Default time allowed for TCP connect.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time allowed for TLS, group selection and authentication together.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const OPEN_MAGIC: &[u8] = b"filed-open/1\0";
const VERDICT_OK: &[u8] = b"filed-ok/1";
const VERDICT_NO: &[u8] = b"filed-no/1\0";
/// Limit of handshake messages (group names and refusal reasons).
const MAX_HANDSHAKE_MESSAGE: u32 = 1024;
const MAX_GROUP_NAME: usize = 255;
const WRITE_BUFFER: usize = 256 * 1024;

/// Why a link could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("loading TLS settings failed")]
    TlsSettings(#[source] TlsError),
    #[error("connecting to {addr} failed")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("{0:?} is not a usable peer name")]
    BadPeerName(String, #[source] TlsError),
    #[error("TLS handshake with {peer} failed")]
    TlsHandshake {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("handshake with {peer} did not finish within {after:?}")]
    HandshakeTimeout { peer: String, after: Duration },
    #[error("handshake message exchange with {peer} failed")]
    HandshakeIo {
        peer: String,
        #[source]
        source: FrameError,
    },
    #[error("malformed handshake message from {peer}: {reason}")]
    Malformed { peer: String, reason: String },
    #[error("{peer} closed the connection during the handshake")]
    ClosedInHandshake { peer: String },
    #[error("group {group:?} is not configured here")]
    UnknownGroup { group: String },
    #[error("{peer} refused the link: {reason}")]
    Refused { peer: String, reason: String },
    #[error("group-key authentication with {peer} failed")]
    Auth {
        peer: String,
        #[source]
        source: AuthError,
    },
    #[error("peer proved the name {actual:?}, expected {expected:?}")]
    PeerNameMismatch { expected: String, actual: String },
    #[error("peer {name:?} presented a certificate not valid for that name")]
    CertificateName { name: String },
    #[error("peer {name:?} is not a host of group {group:?}")]
    NotAMember { name: String, group: String },
    #[error("frame exchange failed")]
    Frame(#[source] FrameError),
    #[error("closing the connection failed")]
    Close(#[source] io::Error),
}

/// What the listener knows about one group: the key and the hosts allowed to open links for it.
#[derive(Clone, Debug)]
pub struct GroupAccess {
    pub key: SharedKey,
    pub hosts: Vec<String>,
}

/// Settings of the initiating side.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub tls: Arc<ClientConfig>,
    /// The name this host proves (its certificate must be valid for it).
    pub my_name: String,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_frame: u32,
}

impl ClientSettings {
    /// Trusts `ca` and presents `cert`/`key` (PEM files).
    pub fn from_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
        my_name: &str,
    ) -> Result<Self, TransportError> {
        let tls = tls::client_config(ca, Some((cert, key))).map_err(TransportError::TlsSettings)?;
        Ok(Self {
            tls,
            my_name: my_name.to_string(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_frame: DEFAULT_MAX_FRAME,
        })
    }
}

/// Settings of the listening side.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub tls: Arc<ServerConfig>,
    pub my_name: String,
    pub handshake_timeout: Duration,
    pub max_frame: u32,
}

impl ServerSettings {
    /// Presents `cert`/`key` and requires client certificates issued by `ca` (PEM files).
    pub fn from_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
        my_name: &str,
    ) -> Result<Self, TransportError> {
        let tls = tls::server_config(cert, key, Some(ca)).map_err(TransportError::TlsSettings)?;
        Ok(Self {
            tls,
            my_name: my_name.to_string(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_frame: DEFAULT_MAX_FRAME,
        })
    }
}

/// The authentication context of a group, so a key reused for two groups gives different proofs.
pub fn auth_context(group: &str) -> String {
    format!("filed group {group}")
}

/// Encodes the OPEN message naming the group.
pub fn encode_open(group: &str) -> Vec<u8> {
    [OPEN_MAGIC, group.as_bytes()].concat()
}

/// Decodes an OPEN message into the group name.
pub fn decode_open(payload: &[u8]) -> Result<String, String> {
    let group = payload
        .strip_prefix(OPEN_MAGIC)
        .ok_or_else(|| "not a filed OPEN message (another protocol or version?)".to_string())?;
    let group = std::str::from_utf8(group).map_err(|_| "group name is not UTF-8".to_string())?;
    if group.is_empty() || group.len() > MAX_GROUP_NAME {
        return Err(format!("group name of {} bytes", group.len()));
    }
    Ok(group.to_string())
}

/// A listener's answer to a handshake step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Refuse(String),
}

pub fn encode_verdict(verdict: &Verdict) -> Vec<u8> {
    match verdict {
        Verdict::Accept => VERDICT_OK.to_vec(),
        Verdict::Refuse(reason) => {
            let mut reason = reason.as_bytes();
            reason = &reason[..reason
                .len()
                .min(MAX_HANDSHAKE_MESSAGE as usize - VERDICT_NO.len())];
            [VERDICT_NO, reason].concat()
        }
    }
}

pub fn decode_verdict(payload: &[u8]) -> Result<Verdict, String> {
    if payload == VERDICT_OK {
        return Ok(Verdict::Accept);
    }
    match payload.strip_prefix(VERDICT_NO) {
        Some(reason) => Ok(Verdict::Refuse(
            String::from_utf8_lossy(reason).into_owned(),
        )),
        None => Err("not a filed verdict message".into()),
    }
}

/// Bytes sent and received on the TCP socket (TLS records and handshake included).
#[derive(Clone, Debug, Default)]
pub struct ByteCounters(Arc<[AtomicU64; 2]>);

impl ByteCounters {
    pub fn sent(&self) -> u64 {
        self.0[0].load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.0[1].load(Ordering::Relaxed)
    }
}

/// A byte stream that counts what passes through it.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    counters: ByteCounters,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counters.0[1].fetch_add(n, Ordering::Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.counters.0[0].fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.counters.0[0].fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The stream under the frames.
pub type Stream = TlsStream<Counted<TcpStream>>;

/// Receiving half of a link.
pub struct FrameRecv {
    reader: FrameReader<ReadHalf<Stream>>,
}

impl FrameRecv {
    /// The next frame, `Ok(None)` when the peer closed the link cleanly between frames.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        self.reader
            .read_frame()
            .await
            .map_err(TransportError::Frame)
    }
}

/// Sending half of a link.
pub struct FrameSend {
    writer: FrameWriter<BufWriter<WriteHalf<Stream>>>,
}

impl FrameSend {
    /// Sends one frame now.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), TransportError> {
        self.writer
            .write_frame(payload)
            .await
            .map_err(TransportError::Frame)
    }

    /// Queues one frame; it leaves with the next [`flush`](Self::flush) or when the buffer fills.
    pub async fn feed(&mut self, payload: &[u8]) -> Result<(), TransportError> {
        self.writer
            .write_frame_unflushed(payload)
            .await
            .map_err(TransportError::Frame)
    }

    pub async fn flush(&mut self) -> Result<(), TransportError> {
        self.writer.flush().await.map_err(TransportError::Frame)
    }

    /// Flushes and ends the sending direction (TLS close_notify, then TCP FIN).
    pub async fn close(self) -> Result<(), TransportError> {
        let mut inner = self.writer.into_inner();
        inner.flush().await.map_err(TransportError::Close)?;
        inner.shutdown().await.map_err(TransportError::Close)
    }
}

/// An authenticated link to one peer for one group.
pub struct Connection {
    recv: FrameRecv,
    send: FrameSend,
    peer: String,
    group: String,
    counters: ByteCounters,
}

impl Connection {
    fn new(
        stream: Stream,
        peer: String,
        group: String,
        counters: ByteCounters,
        max_frame: u32,
    ) -> Self {
        let (read, write) = tokio::io::split(stream);
        Self {
            recv: FrameRecv {
                reader: FrameReader::new(read, max_frame),
            },
            send: FrameSend {
                writer: FrameWriter::new(BufWriter::with_capacity(WRITE_BUFFER, write)),
            },
            peer,
            group,
            counters,
        }
    }

    /// The name the peer proved (and its certificate is valid for).
    pub fn peer_name(&self) -> &str {
        &self.peer
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Wire byte counters; clones stay live after [`into_split`](Self::into_split).
    pub fn counters(&self) -> ByteCounters {
        self.counters.clone()
    }

    pub async fn send(&mut self, payload: &[u8]) -> Result<(), TransportError> {
        self.send.send(payload).await
    }

    pub async fn feed(&mut self, payload: &[u8]) -> Result<(), TransportError> {
        self.send.feed(payload).await
    }

    pub async fn flush(&mut self) -> Result<(), TransportError> {
        self.send.flush().await
    }

    pub async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        self.recv.recv().await
    }

    /// Independent halves, for a reader task and a writer task.
    pub fn into_split(self) -> (FrameRecv, FrameSend) {
        (self.recv, self.send)
    }

    /// Flushes and closes the sending direction.
    pub async fn close(self) -> Result<(), TransportError> {
        self.send.close().await
    }
}

/// Reads exactly one frame (never past it) during the handshake.
async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: &str,
) -> Result<Vec<u8>, TransportError> {
    let io_err = |source| TransportError::HandshakeIo {
        peer: peer.to_string(),
        source,
    };
    let mut header = [0u8; frame::HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(TransportError::ClosedInHandshake {
                peer: peer.to_string(),
            });
        }
        Err(e) => return Err(io_err(FrameError::Read(e))),
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if len > MAX_HANDSHAKE_MESSAGE {
        return Err(io_err(FrameError::TooLong {
            len,
            max: MAX_HANDSHAKE_MESSAGE,
        }));
    }
    let mut whole = BytesMut::with_capacity(frame::HEADER_LEN + len as usize);
    whole.extend_from_slice(&header);
    whole.resize(frame::HEADER_LEN + len as usize, 0);
    stream
        .read_exact(&mut whole[frame::HEADER_LEN..])
        .await
        .map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                TransportError::ClosedInHandshake {
                    peer: peer.to_string(),
                }
            } else {
                io_err(FrameError::Read(e))
            }
        })?;
    match frame::decode(&mut whole, MAX_HANDSHAKE_MESSAGE) {
        Ok(Some(payload)) => Ok(payload.to_vec()),
        Ok(None) => Err(TransportError::Malformed {
            peer: peer.to_string(),
            reason: "incomplete message".into(),
        }),
        Err(source) => Err(io_err(source)),
    }
}

async fn write_message<S: AsyncWrite + Unpin>(
    stream: &mut S,
    payload: &[u8],
    peer: &str,
) -> Result<(), TransportError> {
    let mut buf = BytesMut::new();
    frame::encode(payload, &mut buf);
    let io_err = |e| TransportError::HandshakeIo {
        peer: peer.to_string(),
        source: FrameError::Write(e),
    };
    stream.write_all(&buf).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)
}

async fn read_verdict<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: &str,
) -> Result<Verdict, TransportError> {
    let payload = read_message(stream, peer).await?;
    decode_verdict(&payload).map_err(|reason| TransportError::Malformed {
        peer: peer.to_string(),
        reason,
    })
}

/// How long a peer may leave sent data unacknowledged, or stay silent to keepalive probes,
/// before its link fails: a peer that lost power or its network mid-session ends the session
/// (and frees the group) instead of leaving it waiting for ever.
pub const PEER_DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

/// Keepalive probes on an idle link and a bound on unacknowledged data ([`PEER_DEAD_AFTER`]).
/// Best effort: a socket that refuses them works as before.
fn watch_liveness(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(9);
    if let Err(e) = sock
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| sock.set_tcp_user_timeout(Some(PEER_DEAD_AFTER)))
    {
        tracing::warn!(error = %e, "cannot set keepalive on a peer link");
    }
}

/// Opens an authenticated link to `addr` ("host:port") for `group`; the peer must prove the name
/// `expected_peer` both by its certificate and by the group key.
pub async fn connect(
    addr: &str,
    settings: &ClientSettings,
    group: &str,
    group_key: &SharedKey,
    expected_peer: &str,
) -> Result<Connection, TransportError> {
    let server_name = tls::server_name(expected_peer)
        .map_err(|e| TransportError::BadPeerName(expected_peer.to_string(), e))?;
    let tcp = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::ConnectTimeout {
            addr: addr.to_string(),
            after: settings.connect_timeout,
        })?
        .map_err(|source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    watch_liveness(&tcp);
    let counters = ByteCounters::default();
    let counted = Counted {
        inner: tcp,
        counters: counters.clone(),
    };
    let peer = expected_peer.to_string();
    let handshake = async {
        let mut tls = TlsConnector::from(settings.tls.clone())
            .connect(server_name, counted)
            .await
            .map_err(|source| TransportError::TlsHandshake {
                peer: peer.clone(),
                source,
            })?;
        write_message(&mut tls, &encode_open(group), &peer).await?;
        if let Verdict::Refuse(reason) = read_verdict(&mut tls, &peer).await? {
            return Err(TransportError::Refused {
                peer: peer.clone(),
                reason,
            });
        }
        let proven =
            auth::mutual_auth(&mut tls, group_key, &auth_context(group), &settings.my_name)
                .await
                .map_err(|source| TransportError::Auth {
                    peer: peer.clone(),
                    source,
                })?;
        if proven != expected_peer {
            return Err(TransportError::PeerNameMismatch {
                expected: peer.clone(),
                actual: proven,
            });
        }
        if let Verdict::Refuse(reason) = read_verdict(&mut tls, &peer).await? {
            return Err(TransportError::Refused {
                peer: peer.clone(),
                reason,
            });
        }
        Ok(tls)
    };
    let tls = tokio::time::timeout(settings.handshake_timeout, handshake)
        .await
        .map_err(|_| TransportError::HandshakeTimeout {
            peer: peer.clone(),
            after: settings.handshake_timeout,
        })??;
    Ok(Connection::new(
        TlsStream::Client(tls),
        peer,
        group.to_string(),
        counters,
        settings.max_frame,
    ))
}

/// Runs the listener side of the opening on an accepted socket. `groups` gives the key and hosts
/// of a group by name (`None`: not configured here). The peer must prove a name that its
/// certificate is valid for and that is a host of the group.
pub async fn accept(
    tcp: TcpStream,
    settings: &ServerSettings,
    groups: impl Fn(&str) -> Option<GroupAccess>,
) -> Result<Connection, TransportError> {
    let _ = tcp.set_nodelay(true);
    watch_liveness(&tcp);
    let peer_addr = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    let counters = ByteCounters::default();
    let counted = Counted {
        inner: tcp,
        counters: counters.clone(),
    };
    let handshake = async {
        let mut tls = TlsAcceptor::from(settings.tls.clone())
            .accept(counted)
            .await
            .map_err(|source| TransportError::TlsHandshake {
                peer: peer_addr.clone(),
                source,
            })?;
        let open = read_message(&mut tls, &peer_addr).await?;
        let group = decode_open(&open).map_err(|reason| TransportError::Malformed {
            peer: peer_addr.clone(),
            reason,
        })?;
        let Some(access) = groups(&group) else {
            let reason = format!("group {group:?} is not configured on {}", settings.my_name);
            write_message(
                &mut tls,
                &encode_verdict(&Verdict::Refuse(reason)),
                &peer_addr,
            )
            .await?;
            let _ = tls.shutdown().await;
            return Err(TransportError::UnknownGroup { group });
        };
        write_message(&mut tls, &encode_verdict(&Verdict::Accept), &peer_addr).await?;
        let proven = auth::mutual_auth(
            &mut tls,
            &access.key,
            &auth_context(&group),
            &settings.my_name,
        )
        .await
        .map_err(|source| TransportError::Auth {
            peer: peer_addr.clone(),
            source,
        })?;
        let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
        let refusal = if !tls::peer_certificate_names(certs, &proven) {
            Some(TransportError::CertificateName {
                name: proven.clone(),
            })
        } else if !access.hosts.iter().any(|h| *h == proven) {
            Some(TransportError::NotAMember {
                name: proven.clone(),
                group: group.clone(),
            })
        } else {
            None
        };
        if let Some(error) = refusal {
            write_message(
                &mut tls,
                &encode_verdict(&Verdict::Refuse(error.to_string())),
                &peer_addr,
            )
            .await?;
            let _ = tls.shutdown().await;
            return Err(error);
        }
        write_message(&mut tls, &encode_verdict(&Verdict::Accept), &peer_addr).await?;
        Ok((tls, proven, group))
    };
    let (tls, peer, group) = tokio::time::timeout(settings.handshake_timeout, handshake)
        .await
        .map_err(|_| TransportError::HandshakeTimeout {
            peer: peer_addr.clone(),
            after: settings.handshake_timeout,
        })??;
    Ok(Connection::new(
        TlsStream::Server(tls),
        peer,
        group,
        counters,
        settings.max_frame,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use common::tls::{PemPair, generate_ca, issue_cert};
    use std::path::PathBuf;
    use tokio::net::TcpListener;

    struct Pki {
        dir: tempfile::TempDir,
        ca: PemPair,
    }

    impl Pki {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = generate_ca("test cluster").unwrap();
            ca.write(&dir.path().join("ca.pem"), &dir.path().join("ca.key"))
                .unwrap();
            Self { dir, ca }
        }

        fn ca_path(&self) -> PathBuf {
            self.dir.path().join("ca.pem")
        }

        /// Issues a certificate for `names` and returns (cert, key) paths under `stem`.
        fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
            let pair = issue_cert(
                &self.ca,
                &names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            let (cert, key) = (
                self.dir.path().join(format!("{stem}.pem")),
                self.dir.path().join(format!("{stem}.key")),
            );
            pair.write(&cert, &key).unwrap();
            (cert, key)
        }

        fn client(&self, stem: &str, names: &[&str], my_name: &str) -> ClientSettings {
            let (cert, key) = self.issue(stem, names);
            ClientSettings::from_files(&self.ca_path(), &cert, &key, my_name).unwrap()
        }

        fn server(&self, stem: &str, names: &[&str], my_name: &str) -> ServerSettings {
            let (cert, key) = self.issue(stem, names);
            ServerSettings::from_files(&self.ca_path(), &cert, &key, my_name).unwrap()
        }
    }

    fn key(secret: &str) -> SharedKey {
        SharedKey::from_secret(secret.as_bytes())
    }

    fn web_group(secret: &'static str) -> impl Fn(&str) -> Option<GroupAccess> {
        move |group: &str| {
            (group == "web").then(|| GroupAccess {
                key: key(secret),
                hosts: vec!["alpha".into(), "beta".into()],
            })
        }
    }

    /// Runs one connect against one accept over loopback; returns both results.
    async fn link(
        client: &ClientSettings,
        server: &ServerSettings,
        group: &str,
        client_key: &str,
        expected_peer: &str,
        groups: impl Fn(&str) -> Option<GroupAccess>,
    ) -> (
        Result<Connection, TransportError>,
        Result<Connection, TransportError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_side = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(tcp, server, groups).await
        };
        let client_key = key(client_key);
        let client_side = connect(&addr, client, group, &client_key, expected_peer);
        tokio::join!(client_side, server_side)
    }

    /// An authenticated loopback link of group "web" for tests of the layers above: (initiator
    /// "alpha", listener "beta").
    pub(crate) async fn loopback_pair() -> (Connection, Connection) {
        let pki = Pki::new();
        let client = pki.client("alpha", &["alpha"], "alpha");
        let server = pki.server("beta", &["beta", "127.0.0.1"], "beta");
        let (c, s) = link(&client, &server, "web", "k", "beta", web_group("k")).await;
        (c.unwrap(), s.unwrap())
    }

    #[tokio::test]
    async fn mutual_authentication_and_frames() {
        let pki = Pki::new();
        let client = pki.client("alpha", &["alpha"], "alpha");
        let server = pki.server("beta", &["beta", "127.0.0.1"], "beta");
        let (c, s) = link(&client, &server, "web", "k", "beta", web_group("k")).await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert_eq!(c.peer_name(), "beta");
        assert_eq!(s.peer_name(), "alpha");
        assert_eq!(s.group(), "web");
        c.send(b"hello").await.unwrap();
        assert_eq!(&s.recv().await.unwrap().unwrap()[..], b"hello");
        s.send(b"").await.unwrap();
        assert_eq!(c.recv().await.unwrap().unwrap().len(), 0);
        assert!(
            c.counters().sent() > 500,
            "TLS handshake counted: {}",
            c.counters().sent()
        );
        assert_eq!(c.counters().sent(), s.counters().received());
        c.close().await.unwrap();
        assert!(s.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn wrong_key_is_refused_on_both_sides() {
        let pki = Pki::new();
        let client = pki.client("alpha", &["alpha"], "alpha");
        let server = pki.server("beta", &["beta"], "beta");
        let (c, s) = link(&client, &server, "web", "wrong", "beta", web_group("right")).await;
        assert!(
            matches!(
                c,
                Err(TransportError::Auth {
                    source: AuthError::Refused { .. },
                    ..
                })
            ),
            "{:?}",
            c.err()
        );
        assert!(
            matches!(
                s,
                Err(TransportError::Auth {
                    source: AuthError::Refused { .. },
                    ..
                })
            ),
            "{:?}",
            s.err()
        );
    }

    #[tokio::test]
    async fn unknown_group_is_refused_with_a_reason() {
        let pki = Pki::new();
        let client = pki.client("alpha", &["alpha"], "alpha");
        let server = pki.server("beta", &["beta"], "beta");
        let (c, s) = link(&client, &server, "db", "k", "beta", web_group("k")).await;
        match c {
            Err(TransportError::Refused { reason, .. }) => {
                assert!(reason.contains("db"), "{reason}")
            }
            other => panic!("{:?}", other.err()),
        }
        assert!(matches!(s, Err(TransportError::UnknownGroup { .. })));
    }

    #[tokio::test]
    async fn foreign_ca_is_refused() {
        let pki = Pki::new();
        let foreign = Pki::new();
        let server = pki.server("beta", &["beta"], "beta");
        // A client certificate from another CA: the server refuses the TLS handshake.
        let (cert, key_path) = foreign.issue("mallory", &["alpha"]);
        let mallory =
            ClientSettings::from_files(&pki.ca_path(), &cert, &key_path, "alpha").unwrap();
        let (c, s) = link(&mallory, &server, "web", "k", "beta", web_group("k")).await;
        assert!(c.is_err());
        assert!(
            matches!(s, Err(TransportError::TlsHandshake { .. })),
            "{:?}",
            s.err()
        );
        // A server with a foreign certificate: the client refuses it.
        let client = pki.client("alpha", &["alpha"], "alpha");
        let fake = foreign.server("fake", &["beta"], "beta");
        let fake = ServerSettings {
            tls: tls::server_config(
                &foreign.dir.path().join("fake.pem"),
                &foreign.dir.path().join("fake.key"),
                Some(&pki.ca_path()),
            )
            .unwrap(),
            ..fake
        };
        let (c, _s) = link(&client, &fake, "web", "k", "beta", web_group("k")).await;
        assert!(
            matches!(c, Err(TransportError::TlsHandshake { .. })),
            "{:?}",
            c.err()
        );
    }

    #[tokio::test]
    async fn certificate_for_another_name_is_refused() {
        let pki = Pki::new();
        let server = pki.server("beta", &["beta"], "beta");
        // Holds the key and a valid certificate, but for "gamma" while claiming "alpha".
        let impostor = pki.client("gamma", &["gamma"], "alpha");
        let (c, s) = link(&impostor, &server, "web", "k", "beta", web_group("k")).await;
        assert!(
            matches!(s, Err(TransportError::CertificateName { .. })),
            "{:?}",
            s.err()
        );
        assert!(
            matches!(c, Err(TransportError::Refused { .. })),
            "{:?}",
            c.err()
        );
        // A valid name that is not a host of the group.
        let outsider = pki.client("gamma2", &["gamma"], "gamma");
        let (c, s) = link(&outsider, &server, "web", "k", "beta", web_group("k")).await;
        assert!(
            matches!(s, Err(TransportError::NotAMember { .. })),
            "{:?}",
            s.err()
        );
        assert!(matches!(c, Err(TransportError::Refused { .. })));
        // The client expects "beta" but reaches a server whose certificate names only "delta".
        let client = pki.client("alpha", &["alpha"], "alpha");
        let delta = pki.server("delta", &["delta"], "delta");
        let (c, _) = link(&client, &delta, "web", "k", "beta", web_group("k")).await;
        assert!(
            matches!(c, Err(TransportError::TlsHandshake { .. })),
            "{:?}",
            c.err()
        );
    }

    #[tokio::test]
    async fn peer_links_detect_a_dead_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        watch_liveness(&tcp);
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(PEER_DEAD_AFTER));
    }

    #[tokio::test]
    async fn garbage_instead_of_tls_closes_cleanly() {
        let pki = Pki::new();
        let server = pki.server("beta", &["beta"], "beta");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let attacker = async {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.0\r\n\r\n this is not TLS at all")
                .await
                .unwrap();
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest).await;
        };
        let server_side = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(tcp, &server, web_group("k")).await
        };
        let (_, s) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(attacker, server_side)
        })
        .await
        .unwrap();
        assert!(
            matches!(s, Err(TransportError::TlsHandshake { .. })),
            "{:?}",
            s.err()
        );
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let pki = Pki::new();
        let mut server = pki.server("beta", &["beta"], "beta");
        server.handshake_timeout = Duration::from_millis(200);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _idle = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let s = accept(tcp, &server, web_group("k")).await;
        assert!(
            matches!(s, Err(TransportError::HandshakeTimeout { .. })),
            "{:?}",
            s.err()
        );
    }

    #[tokio::test]
    async fn large_frames_and_limits() {
        let pki = Pki::new();
        let client = pki.client("alpha", &["alpha"], "alpha");
        let mut server = pki.server("beta", &["beta"], "beta");
        server.max_frame = 12 << 20;
        let (c, s) = link(&client, &server, "web", "k", "beta", web_group("k")).await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        let big: Vec<u8> = (0..(12u32 << 20))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let (sent, got) = tokio::join!(c.send(&big), s.recv());
        sent.unwrap();
        assert!(got.unwrap().unwrap() == big[..]);
        // One byte over the receiver's limit is an error, not an allocation.
        let too_big = vec![0u8; (12 << 20) + 1];
        // The receiver fails on the header and drops the link, which ends the sender's write.
        let receiver = async move {
            let got = s.recv().await;
            drop(s);
            got
        };
        let (sent, got) = tokio::join!(c.send(&too_big), receiver);
        assert!(matches!(
            got,
            Err(TransportError::Frame(FrameError::TooLong { .. }))
        ));
        assert!(sent.is_err());
    }

    #[tokio::test]
    async fn split_halves_pipeline() {
        let pki = Pki::new();
        let client = pki.client("alpha", &["alpha"], "alpha");
        let server = pki.server("beta", &["beta"], "beta");
        let (c, s) = link(&client, &server, "web", "k", "beta", web_group("k")).await;
        let (c, s) = (c.unwrap(), s.unwrap());
        let counters = c.counters();
        let (mut c_recv, mut c_send) = c.into_split();
        let (mut s_recv, mut s_send) = s.into_split();
        const N: u32 = 20_000;
        // The server echoes every request; the client writes all requests before reading any reply.
        let echo = tokio::spawn(async move {
            while let Some(frame) = s_recv.recv().await.unwrap() {
                s_send.feed(&frame).await.unwrap();
                s_send.flush().await.unwrap();
            }
            s_send.close().await.unwrap();
        });
        let writer = tokio::spawn(async move {
            for i in 0..N {
                c_send.feed(&i.to_be_bytes().repeat(8)).await.unwrap();
            }
            c_send.close().await.unwrap();
        });
        for i in 0..N {
            let frame = c_recv.recv().await.unwrap().unwrap();
            assert_eq!(&frame[..4], &i.to_be_bytes());
        }
        assert!(c_recv.recv().await.unwrap().is_none());
        writer.await.unwrap();
        echo.await.unwrap();
        assert!(counters.sent() > (N as u64) * 40);
        assert!(counters.received() > (N as u64) * 40);
    }

    proptest::proptest! {
        #[test]
        fn handshake_codec_round_trips(group in "[a-zA-Z0-9_.-]{1,255}", reason in ".{0,100}") {
            proptest::prop_assert_eq!(decode_open(&encode_open(&group)).unwrap(), group);
            proptest::prop_assert_eq!(decode_verdict(&encode_verdict(&Verdict::Accept)).unwrap(), Verdict::Accept);
            let refusal = Verdict::Refuse(reason.clone());
            proptest::prop_assert_eq!(decode_verdict(&encode_verdict(&refusal)).unwrap(), refusal);
        }

        #[test]
        fn handshake_decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = decode_open(&bytes);
            let _ = decode_verdict(&bytes);
        }
    }

    #[test]
    fn bad_group_names_are_refused() {
        assert!(decode_open(OPEN_MAGIC).is_err());
        assert!(decode_open(b"HTTP/1.1 200").is_err());
        assert!(decode_open(&[OPEN_MAGIC, &[0xff, 0xfe]].concat()).is_err());
    }
}
