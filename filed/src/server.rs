//! `filed serve` (csync2 -ii): accepts peers on a TCP listener (TLS + group key via
//! [`crate::transport::accept`]) and runs the listener side of each session; also answers local
//! CLI commands on a Unix control socket next to the state database, because the state database
//! can only be open in one process. Takes its listeners and a shutdown future so tests bind port 0.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::control_line::{MAX_CONTROL_LINE, read_control_line};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::commands::{self, Command, Outcome};
use crate::node::{Node, NodeError};
use crate::session::{ServeOptions, error_chain, run_server};
use crate::transport::{self, GroupAccess};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot listen on the control socket {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control request failed")]
    ControlIo(#[source] std::io::Error),
    #[error("bad control request")]
    ControlLine(#[source] common::control_line::ControlLineError),
    #[error("malformed control message")]
    ControlJson(#[source] serde_json::Error),
}

/// The control socket of a host: next to its state database.
pub fn control_path(state: &Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".sock");
    PathBuf::from(p)
}

/// Runs until `shutdown` resolves: peer sessions on `listener`, CLI commands on `control`.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    control: Option<UnixListener>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let settings = Arc::new(node.server_settings()?);
    let mut access: HashMap<String, GroupAccess> = HashMap::new();
    for g in node.my_groups() {
        match node.group_key(g) {
            Ok(key) => {
                access.insert(
                    g.name.clone(),
                    GroupAccess {
                        key,
                        hosts: g.members().map(str::to_owned).collect(),
                    },
                );
            }
            Err(e) => {
                tracing::error!(group = %g.name, error = %error_chain(&e), "group unavailable: no key")
            }
        }
    }
    let access = Arc::new(access);
    tracing::info!(me = %node.me.name, addr = ?listener.local_addr().ok(), groups = access.len(), "listening");
    tokio::pin!(shutdown);
    // Sessions in flight finish before `serve` returns.
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            r = listener.accept() => match r {
                Ok((tcp, addr)) => {
                    let node = node.clone();
                    let settings = settings.clone();
                    let access = access.clone();
                    sessions.spawn(async move {
                        let conn = transport::accept(tcp, &settings, |g| access.get(g).cloned()).await;
                        let mut conn = match conn {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!(%addr, error = %error_chain(&e), "peer refused");
                                return;
                            }
                        };
                        let peer = conn.peer_name().to_string();
                        match run_server(&node, &mut conn, opts).await {
                            Ok(r) => tracing::info!(%peer, group = %r.group, pushed_here = r.pulled.len(), sent = r.pushed.len(),
                                conflicts = r.conflicts.len(), errors = r.errors.len(), "session done"),
                            Err(e) => tracing::warn!(%peer, error = %error_chain(&e), "session failed"),
                        }
                        let _ = conn.close().await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            r = accept_control(&control) => {
                if let Ok(stream) = r {
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle_control(&node, stream).await {
                            tracing::warn!(error = %error_chain(&e), "control request failed");
                        }
                    });
                }
            }
        }
    }
    drop(listener);
    if !sessions.is_empty() {
        tracing::info!(
            sessions = sessions.len(),
            "shutting down after the sessions in flight"
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(120), async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
    }
    tracing::info!("shutting down");
    Ok(())
}

async fn accept_control(control: &Option<UnixListener>) -> std::io::Result<UnixStream> {
    match control {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn handle_control(node: &Node, stream: UnixStream) -> Result<(), ServeError> {
    let (r, mut w) = stream.into_split();
    let line = read_control_line(&mut BufReader::new(r), MAX_CONTROL_LINE)
        .await
        .map_err(ServeError::ControlLine)?
        .unwrap_or_default();
    let cmd: Command = serde_json::from_str(&line).map_err(ServeError::ControlJson)?;
    let out = commands::run(node, &cmd).await;
    let mut reply = serde_json::to_vec(&out).map_err(ServeError::ControlJson)?;
    reply.push(b'\n');
    w.write_all(&reply).await.map_err(ServeError::ControlIo)?;
    w.shutdown().await.map_err(ServeError::ControlIo)
}

/// Binds the control socket (replacing a stale one).
pub fn bind_control(path: &Path) -> Result<UnixListener, ServeError> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ServeError::Control {
        path: path.into(),
        source,
    })
}

/// Sends a command to the running `filed serve` of this host.
pub async fn forward(path: &Path, cmd: &Command) -> Result<Outcome, ServeError> {
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|source| ServeError::Control {
            path: path.into(),
            source,
        })?;
    let mut req = serde_json::to_vec(cmd).map_err(ServeError::ControlJson)?;
    req.push(b'\n');
    s.write_all(&req).await.map_err(ServeError::ControlIo)?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .await
        .map_err(ServeError::ControlIo)?;
    serde_json::from_str(&line).map_err(ServeError::ControlJson)
}
