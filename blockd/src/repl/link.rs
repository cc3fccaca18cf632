//! Establishing a replication link to a peer: TCP, mutual TLS (both certificates from the
//! cluster CA, each naming the node the other expects), the shared-secret challenge-response
//! (`common::auth`, bound to the resource name), then `Hello` both ways (protocol version,
//! resource, node id). Anything unexpected refuses the link with an error that says why.
//!
//! Which side dials: the node with the lower node id connects, the other accepts, so a pair
//! never holds two links.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::auth::SharedKey;
use common::frame::{FrameError, FrameReader, FrameWriter};
use tokio::io::{AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsStream;

use super::wire::{MAX_FRAME, Message, PROTOCOL_VERSION, WireError};

/// How long the whole link setup (TLS, auth, hello) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A node as the link layer knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkNode {
    pub name: String,
    pub id: u8,
    pub address: SocketAddr,
}

/// Everything needed to set up links of one resource on one node.
#[derive(Clone)]
pub struct LinkSettings {
    pub resource: String,
    pub me: LinkNode,
    pub peers: Vec<LinkNode>,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
    pub key: SharedKey,
}

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot load TLS files")]
    Tls(#[source] common::tls::TlsError),
    #[error("cannot load the shared secret")]
    Secret(#[source] common::auth::AuthError),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    TlsHandshake {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the certificate of {addr} does not name node {name:?}")]
    CertificateName { addr: SocketAddr, name: String },
    #[error("shared-secret authentication with {addr} failed")]
    Auth {
        addr: SocketAddr,
        #[source]
        source: common::auth::AuthError,
    },
    #[error("{addr} authenticated as {name:?}, which is not a peer of resource {resource}")]
    UnknownPeer {
        addr: SocketAddr,
        name: String,
        resource: String,
    },
    #[error("{addr} authenticated as {found:?}, expected {expected:?}")]
    WrongPeer {
        addr: SocketAddr,
        expected: String,
        found: String,
    },
    #[error("hello from {addr} refused: {problem}")]
    Hello { addr: SocketAddr, problem: String },
    #[error("link setup with {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("frame error on the link to {addr}")]
    Frame {
        addr: SocketAddr,
        #[source]
        source: FrameError,
    },
    #[error("malformed message from {addr}")]
    Wire {
        addr: SocketAddr,
        #[source]
        source: WireError,
    },
}

impl LinkSettings {
    /// Loads the TLS files and the secret (paths already resolved for this node).
    pub fn load(
        resource: &str,
        me: LinkNode,
        peers: Vec<LinkNode>,
        ca: &Path,
        cert: &Path,
        key: &Path,
        secret: &Path,
    ) -> Result<LinkSettings, LinkError> {
        let server = common::tls::server_config(cert, key, Some(ca)).map_err(LinkError::Tls)?;
        let client = common::tls::client_config(ca, Some((cert, key))).map_err(LinkError::Tls)?;
        let key = SharedKey::load(secret).map_err(LinkError::Secret)?;
        Ok(LinkSettings {
            resource: resource.to_string(),
            me,
            peers,
            server,
            client,
            key,
        })
    }

    fn auth_context(&self) -> String {
        format!("blockd-repl resource {}", self.resource)
    }
}

/// The name a node's certificate must carry: its node name when that is a valid DNS name,
/// else the IP address of its replication address.
pub fn certificate_name(node: &LinkNode) -> String {
    if common::tls::server_name(&node.name).is_ok()
        && node.name.parse::<std::net::IpAddr>().is_err()
    {
        node.name.clone()
    } else {
        node.address.ip().to_string()
    }
}

/// The TLS stream of a link. Reads from the socket go through a buffer: rustls asks for at most
/// 4 KiB per read, which would otherwise cost a system call per 4 KiB received.
pub type Stream = TlsStream<BufReader<TcpStream>>;

/// Socket bytes read ahead under TLS.
const READ_AHEAD: usize = 256 << 10;

/// An established, authenticated link.
pub struct Link {
    pub peer: LinkNode,
    pub reader: FrameReader<ReadHalf<Stream>>,
    pub writer: FrameWriter<WriteHalf<Stream>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("peer", &self.peer).finish()
    }
}

/// Dials `peer` (from our replication IP, so the peer sees our configured address).
pub async fn connect(s: &LinkSettings, peer: &LinkNode) -> Result<Link, LinkError> {
    let addr = peer.address;
    tokio::time::timeout(SETUP_TIMEOUT, connect_inner(s, peer))
        .await
        .map_err(|_| LinkError::Timeout { addr })?
}

async fn connect_inner(s: &LinkSettings, peer: &LinkNode) -> Result<Link, LinkError> {
    let addr = peer.address;
    let io = |source| LinkError::Connect { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io)?;
    // Best effort: a wildcard or foreign local address just uses the default route.
    let _ = socket.bind(SocketAddr::new(s.me.address.ip(), 0));
    let tcp = socket.connect(addr).await.map_err(io)?;
    let _ = tcp.set_nodelay(true);
    let name = certificate_name(peer);
    let server_name = common::tls::server_name(&name).map_err(LinkError::Tls)?;
    let connector = tokio_rustls::TlsConnector::from(s.client.clone());
    // rustls checks that the server certificate names `name`.
    let tls = connector
        .connect(server_name, BufReader::with_capacity(READ_AHEAD, tcp))
        .await
        .map_err(|source| LinkError::TlsHandshake { addr, source })?;
    finish(s, TlsStream::Client(tls), addr, Some(peer)).await
}

/// Completes a link accepted on our replication listener.
pub async fn accept(s: &LinkSettings, tcp: TcpStream) -> Result<Link, LinkError> {
    let addr = tcp
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tokio::time::timeout(SETUP_TIMEOUT, async {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(s.server.clone());
        let tls = acceptor
            .accept(BufReader::with_capacity(READ_AHEAD, tcp))
            .await
            .map_err(|source| LinkError::TlsHandshake { addr, source })?;
        finish(s, TlsStream::Server(tls), addr, None).await
    })
    .await
    .map_err(|_| LinkError::Timeout { addr })?
}

async fn finish(
    s: &LinkSettings,
    mut stream: Stream,
    addr: SocketAddr,
    expected: Option<&LinkNode>,
) -> Result<Link, LinkError> {
    let proven = common::auth::mutual_auth(&mut stream, &s.key, &s.auth_context(), &s.me.name)
        .await
        .map_err(|source| LinkError::Auth { addr, source })?;
    let peer = match expected {
        Some(p) if p.name != proven => {
            return Err(LinkError::WrongPeer {
                addr,
                expected: p.name.clone(),
                found: proven,
            });
        }
        Some(p) => p.clone(),
        None => s
            .peers
            .iter()
            .find(|p| p.name == proven)
            .cloned()
            .ok_or_else(|| LinkError::UnknownPeer {
                addr,
                name: proven.clone(),
                resource: s.resource.clone(),
            })?,
    };
    // The client certificate was verified against the CA by the handshake; it must also name
    // the node that just proved the secret (so one node's key cannot impersonate another).
    if expected.is_none() {
        let certs = stream.get_ref().1.peer_certificates().unwrap_or(&[]);
        if !common::tls::peer_certificate_names(certs, &certificate_name(&peer)) {
            return Err(LinkError::CertificateName {
                addr,
                name: peer.name.clone(),
            });
        }
    }
    let (r, w) = tokio::io::split(stream);
    let mut reader = FrameReader::new(r, MAX_FRAME);
    let mut writer = FrameWriter::new(w);
    let frame_err = |source| LinkError::Frame { addr, source };
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        resource: s.resource.clone(),
        node_id: s.me.id,
    };
    writer
        .write_frame(&hello.to_bytes())
        .await
        .map_err(frame_err)?;
    let frame = reader
        .read_frame()
        .await
        .map_err(frame_err)?
        .ok_or(LinkError::Hello {
            addr,
            problem: "closed before hello".into(),
        })?;
    let problem = |p: String| LinkError::Hello { addr, problem: p };
    match Message::decode(frame).map_err(|source| LinkError::Wire { addr, source })? {
        Message::Hello {
            version,
            resource,
            node_id,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(problem(format!(
                    "protocol version {version}, this build speaks {PROTOCOL_VERSION}"
                )));
            }
            if resource != s.resource {
                return Err(problem(format!(
                    "resource {resource:?}, expected {:?}",
                    s.resource
                )));
            }
            if node_id != peer.id {
                return Err(problem(format!(
                    "node id {node_id}, node {} has id {} in the config",
                    peer.name, peer.id
                )));
            }
        }
        other => return Err(problem(format!("{} instead of hello", other.name()))),
    }
    Ok(Link {
        peer,
        reader,
        writer,
    })
}

impl Link {
    /// Sends one message and flushes (setup and tests; the runtime batches).
    pub async fn send(&mut self, msg: &Message) -> Result<(), FrameError> {
        let mut b = BytesMut::new();
        msg.encode(&mut b);
        self.writer.write_frame(&b).await
    }

    /// Closes the write side.
    pub async fn shutdown(mut self) {
        let _ = self.writer.flush().await;
        let mut w = self.writer.into_inner();
        let _ = w.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::tls::{PemPair, generate_ca, issue_cert};
    use std::path::PathBuf;
    use tokio::net::TcpListener;

    struct Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    }

    fn node(name: &str, id: u8, port: u16) -> LinkNode {
        LinkNode {
            name: name.into(),
            id,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn issue(dir: &Path, ca: &PemPair, ca_path: &Path, name: &str) -> Files {
        let pair = issue_cert(ca, &[name.to_string()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        pair.write(&cert, &key).unwrap();
        Files {
            ca: ca_path.to_path_buf(),
            cert,
            key,
        }
    }

    fn settings(
        res: &str,
        me: LinkNode,
        peers: Vec<LinkNode>,
        f: &Files,
        secret: &Path,
    ) -> LinkSettings {
        LinkSettings::load(res, me, peers, &f.ca, &f.cert, &f.key, secret).unwrap()
    }

    struct Env {
        dir: tempfile::TempDir,
        ca: PemPair,
        ca_path: PathBuf,
        secret: PathBuf,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test cluster").unwrap();
        let ca_path = dir.path().join("ca.pem");
        ca.write(&ca_path, &dir.path().join("ca.key")).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret").unwrap();
        Env {
            dir,
            ca,
            ca_path,
            secret,
        }
    }

    async fn pair(
        a: LinkSettings,
        b: LinkSettings,
    ) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut peer_b = b.me.clone();
        peer_b.address.set_port(port);
        let accept_side = async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(&b, tcp).await
        };
        let connect_side = async move { connect(&a, &peer_b).await };
        let (c, s) = tokio::join!(connect_side, accept_side);
        (c, s)
    }

    #[tokio::test]
    async fn link_up_and_exchange() {
        let e = env();
        let fa = issue(e.dir.path(), &e.ca, &e.ca_path, "alpha");
        let fb = issue(e.dir.path(), &e.ca, &e.ca_path, "beta");
        let (a, b) = (node("alpha", 0, 1), node("beta", 1, 2));
        let sa = settings("r0", a.clone(), vec![b.clone()], &fa, &e.secret);
        let sb = settings("r0", b.clone(), vec![a.clone()], &fb, &e.secret);
        let (c, s) = pair(sa, sb).await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert_eq!(c.peer.name, "beta");
        assert_eq!(s.peer.name, "alpha");
        c.send(&Message::Ping).await.unwrap();
        let f = s.reader.read_frame().await.unwrap().unwrap();
        assert_eq!(Message::decode(f).unwrap(), Message::Ping);
    }

    #[tokio::test]
    async fn wrong_secret_certificate_or_resource_is_refused() {
        let e = env();
        let fa = issue(e.dir.path(), &e.ca, &e.ca_path, "alpha");
        let fb = issue(e.dir.path(), &e.ca, &e.ca_path, "beta");
        let (a, b) = (node("alpha", 0, 1), node("beta", 1, 2));
        // Wrong secret.
        let other_secret = e.dir.path().join("other");
        std::fs::write(&other_secret, "different").unwrap();
        let sa = settings("r0", a.clone(), vec![b.clone()], &fa, &e.secret);
        let sb = settings("r0", b.clone(), vec![a.clone()], &fb, &other_secret);
        let (c, s) = pair(sa.clone(), sb).await;
        assert!(matches!(c, Err(LinkError::Auth { .. })), "{c:?}");
        assert!(matches!(s, Err(LinkError::Auth { .. })), "{s:?}");

        // Another resource (same secret): the auth context differs.
        let sb = settings("r1", b.clone(), vec![a.clone()], &fb, &e.secret);
        let (c, s) = pair(sa.clone(), sb).await;
        assert!(c.is_err() && s.is_err());

        // A certificate from another CA.
        let e2 = env();
        let fb2 = issue(e2.dir.path(), &e2.ca, &e2.ca_path, "beta");
        let sb = settings("r0", b.clone(), vec![a.clone()], &fb2, &e.secret);
        let (c, s) = pair(sa.clone(), sb).await;
        assert!(matches!(c, Err(LinkError::TlsHandshake { .. })), "{c:?}");
        assert!(s.is_err());

        // beta presents gamma's certificate (right CA, wrong name): the dialer refuses it.
        let fg = issue(e.dir.path(), &e.ca, &e.ca_path, "gamma");
        let sb = settings("r0", b.clone(), vec![a.clone()], &fg, &e.secret);
        let (c, _s) = pair(sa.clone(), sb).await;
        assert!(matches!(c, Err(LinkError::TlsHandshake { .. })), "{c:?}");

        // alpha dials with beta's certificate: the acceptor sees a certificate not naming it.
        let sa_bad = settings("r0", a.clone(), vec![b.clone()], &fb, &e.secret);
        let sb = settings("r0", b.clone(), vec![a.clone()], &fb, &e.secret);
        let (_c, s) = pair(sa_bad, sb).await;
        assert!(matches!(s, Err(LinkError::CertificateName { .. })), "{s:?}");

        // A node that is not a peer of the resource (right CA, right secret).
        let fx = issue(e.dir.path(), &e.ca, &e.ca_path, "mallory");
        let x = node("mallory", 2, 3);
        let sx = settings("r0", x.clone(), vec![b.clone()], &fx, &e.secret);
        let sb = settings("r0", b.clone(), vec![a.clone()], &fb, &e.secret);
        let (_c, s) = pair(sx, sb).await;
        assert!(matches!(s, Err(LinkError::UnknownPeer { .. })), "{s:?}");
    }
}
