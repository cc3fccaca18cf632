//! The control socket server: one task per client connection.

use std::future::Future;
use std::sync::Arc;

use common::control_line::{ControlLineError, MAX_CONTROL_LINE, read_control_line};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::proto::{ErrorCode, Request, Response, VERSION};
use crate::repl::resource::{Resource, ResourceError, error_chain};

/// Serves `listener` for `resources` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    resources: Vec<Arc<Resource>>,
    shutdown: impl Future<Output = ()>,
) {
    let resources = Arc::new(resources);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => match a {
                Ok((s, _)) => {
                    let r = resources.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client(s, r).await {
                            tracing::debug!("control client: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("control socket accept failed: {e}"),
            }
        }
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

fn pick<'a>(
    resources: &'a [Arc<Resource>],
    name: Option<&str>,
) -> Result<Vec<&'a Arc<Resource>>, Response> {
    match name {
        None => Ok(resources.iter().collect()),
        Some(n) => match resources.iter().find(|r| r.name() == n) {
            Some(r) => Ok(vec![r]),
            None => Err(Response::error(
                ErrorCode::Unknown,
                format!("no resource {n:?} on this node"),
            )),
        },
    }
}

fn failure(e: ResourceError) -> Response {
    let code = match e {
        ResourceError::PromoteRefused(_)
        | ResourceError::Diskless
        | ResourceError::Refused(_)
        | ResourceError::SnapshotRefused(_) => ErrorCode::Refused,
        ResourceError::Snapshot {
            source: crate::snapshot::set::SnapshotError::Unknown { .. },
            ..
        } => ErrorCode::Unknown,
        ResourceError::UnknownPeer(_) => ErrorCode::Unknown,
        _ => ErrorCode::Failed,
    };
    Response::error(code, error_chain(&e))
}

/// The commands serialised per resource (see `client`).
const ADMIN_COMMANDS: &[&str] = &[
    "promote",
    "demote",
    "connect",
    "disconnect",
    "attach",
    "detach",
    "invalidate",
    "invalidate-remote",
];

async fn client(s: UnixStream, resources: Arc<Vec<Arc<Resource>>>) -> std::io::Result<()> {
    let (r, mut w) = s.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let line = match read_control_line(&mut reader, MAX_CONTROL_LINE).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(ControlLineError::Read(e)) => return Err(e),
            Err(e) => {
                // The rest of the stream cannot be framed: answer and close.
                send(
                    &mut w,
                    &Response::error(ErrorCode::BadRequest, e.to_string()),
                )
                .await?;
                return Ok(());
            }
        };
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                send(
                    &mut w,
                    &Response::error(ErrorCode::BadRequest, format!("malformed request: {e}")),
                )
                .await?;
                continue;
            }
        };
        if req.v != VERSION {
            send(
                &mut w,
                &Response::error(
                    ErrorCode::BadRequest,
                    format!(
                        "protocol version {} not supported (this blockd speaks {VERSION})",
                        req.v
                    ),
                ),
            )
            .await?;
            continue;
        }
        let picked = match pick(&resources, req.resource.as_deref()) {
            Ok(p) => p,
            Err(resp) => {
                send(&mut w, &resp).await?;
                continue;
            }
        };
        let one = || -> Result<&Arc<Resource>, Response> {
            match (req.resource.as_deref(), picked.as_slice()) {
                (Some(_), [r]) => Ok(r),
                _ => Err(Response::error(
                    ErrorCode::BadRequest,
                    "this command needs a resource name",
                )),
            }
        };
        // Commands that change a resource's role or disk run one at a time per resource: each
        // checks the state, then acts (a flush, a wait), and another one in between would act
        // on a state the first one is changing (a promote during a detach's flush: a Diskless
        // Primary).
        let admin = match (ADMIN_COMMANDS.contains(&req.cmd.as_str()), one()) {
            (true, Ok(r)) => Some(r.admin.lock().await),
            _ => None,
        };
        let resp = match req.cmd.as_str() {
            "status" => Response {
                status: Some(picked.iter().map(|r| r.status()).collect()),
                ..Response::ok()
            },
            "promote" => match one() {
                Ok(r) => r
                    .promote(req.force)
                    .await
                    .map_or_else(failure, |()| Response::ok()),
                Err(e) => e,
            },
            // Changes nothing: would `promote` be granted, and what would it lose?
            "promote-check" => match one() {
                Ok(r) => r
                    .promote_check(req.force)
                    .await
                    .map_or_else(failure, |losses| Response {
                        losses: Some(losses),
                        ..Response::ok()
                    }),
                Err(e) => e,
            },
            "demote" => match one() {
                Ok(r) => r.demote().await.map_or_else(failure, |()| Response::ok()),
                Err(e) => e,
            },
            "connect" => match one() {
                Ok(r) => r
                    .request_checksum_resync(req.peer.as_deref(), req.checksum)
                    .and_then(|()| r.connect(req.peer.as_deref(), req.discard_my_data))
                    .map_or_else(failure, |()| Response::ok()),
                Err(e) => e,
            },
            "snapshot" => match one() {
                Ok(r) => {
                    let listen = match req.listen.as_deref().map(str::parse) {
                        None => Ok(None),
                        Some(Ok(a)) => Ok(Some(a)),
                        Some(Err(e)) => Err(Response::error(
                            ErrorCode::BadRequest,
                            format!(
                                "bad listen address {:?}: {e}",
                                req.listen.as_deref().unwrap_or("")
                            ),
                        )),
                    };
                    match listen {
                        Ok(listen) => r
                            .snapshot_open(crate::repl::snapshot::OpenRequest {
                                name: req.name.clone(),
                                consistent: req.consistent,
                                listen,
                                cow_size: req.cow_size,
                            })
                            .await
                            .map_or_else(failure, |info| Response {
                                snapshot: Some(info),
                                ..Response::ok()
                            }),
                        Err(resp) => resp,
                    }
                }
                Err(e) => e,
            },
            "snapshot-drop" => match (one(), req.name.as_deref()) {
                (Ok(r), Some(name)) => r
                    .snapshot_drop(name)
                    .await
                    .map_or_else(failure, |()| Response::ok()),
                (Ok(_), None) => {
                    Response::error(ErrorCode::BadRequest, "snapshot-drop needs a snapshot name")
                }
                (Err(e), _) => e,
            },
            "verify" => match one() {
                Ok(r) => r
                    .verify(req.peer.as_deref())
                    .map_or_else(failure, |_| Response::ok()),
                Err(e) => e,
            },
            "invalidate" => match one() {
                Ok(r) => r
                    .invalidate()
                    .await
                    .map_or_else(failure, |()| Response::ok()),
                Err(e) => e,
            },
            "invalidate-remote" => match one() {
                Ok(r) => r
                    .invalidate_remote(req.peer.as_deref())
                    .map_or_else(failure, |()| Response::ok()),
                Err(e) => e,
            },
            "attach" => match one() {
                Ok(r) => r.reattach().await.map_or_else(failure, |()| Response::ok()),
                Err(e) => e,
            },
            "detach" => match one() {
                Ok(r) => r
                    .detach(req.force)
                    .await
                    .map_or_else(failure, |()| Response::ok()),
                Err(e) => e,
            },
            "disconnect" => match one() {
                Ok(r) => r
                    .disconnect(req.peer.as_deref())
                    .map_or_else(failure, |()| Response::ok()),
                Err(e) => e,
            },
            "events" => {
                let mut subs: Vec<_> = picked.iter().map(|r| r.subscribe()).collect();
                send(&mut w, &Response::ok()).await?;
                let (tx, mut rx) = tokio::sync::mpsc::channel(256);
                for mut s in subs.drain(..) {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        loop {
                            match s.recv().await {
                                Ok(ev) => {
                                    if tx.send(ev).await.is_err() {
                                        return;
                                    }
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                    continue;
                                }
                                Err(_) => return,
                            }
                        }
                    });
                }
                drop(tx);
                while let Some(ev) = rx.recv().await {
                    send(
                        &mut w,
                        &Response {
                            event: Some(ev),
                            ..Response {
                                ok: None,
                                ..Response::ok()
                            }
                        },
                    )
                    .await?;
                }
                return Ok(());
            }
            other => Response::error(ErrorCode::BadRequest, format!("unknown command {other:?}")),
        };
        // Not held while a client that reads slowly (or never) takes the answer.
        drop(admin);
        send(&mut w, &resp).await?;
    }
    Ok(())
}
