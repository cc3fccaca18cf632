//! Running every resource of one node: attach them all, run their links, serve the control
//! socket, and run a caller-supplied service (the NBD export) for each resource while it is
//! Primary. `blockd --config FILE [--node NAME]` is a thin wrapper around [`run`].

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::config::ClusterConfig;
use crate::repl::resource::{Resource, ResourceError, ResourceSpec};
use crate::repl::state::Role;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {0} has no resources in the config")]
    NoResources(String),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error("cannot listen on the control socket {path}")]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `service(resource, demoted)` every time `res` becomes Primary; `demoted` completes
/// when it stops being Primary (the service must then stop serving).
pub async fn while_primary<F, Fut>(res: Arc<Resource>, service: F)
where
    F: Fn(Arc<Resource>, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = ()>,
{
    let role = res.watch_role();
    each_primary_term(role, move |demoted| service(res.clone(), demoted)).await
}

/// Runs `service(demoted)` for every term in which `role` is Primary. A service that ends
/// after its demotion (draining its clients may take a while) is started again at once if the
/// node was promoted again meanwhile; one that ends by itself (it could not start) is not
/// restarted before the next promotion.
async fn each_primary_term<F, Fut>(mut role: watch::Receiver<Role>, service: F)
where
    F: Fn(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        if role.wait_for(|r| *r == Role::Primary).await.is_err() {
            return;
        }
        let mut watch = role.clone();
        let demoted_seen = Arc::new(AtomicBool::new(false));
        let seen = demoted_seen.clone();
        let demoted = Box::pin(async move {
            let _ = watch.wait_for(|r| *r != Role::Primary).await;
            seen.store(true, Ordering::SeqCst);
        });
        service(demoted).await;
        if !demoted_seen.load(Ordering::SeqCst)
            && role.wait_for(|r| *r != Role::Primary).await.is_err()
        {
            return;
        }
    }
}

/// Attaches every resource of `node` and runs them, the control socket, and `service` while
/// Primary, until `shutdown`. Resources are then detached cleanly.
pub async fn run<F, Fut>(
    config: &ClusterConfig,
    node: &str,
    service: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError>
where
    F: Fn(Arc<Resource>, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let locals = config.resources_of(node);
    if locals.is_empty() {
        return Err(NodeError::NoResources(node.to_string()));
    }
    let mut resources = Vec::new();
    for l in &locals {
        resources.push(Resource::attach(ResourceSpec::from_config(l)?)?);
    }
    // Bind every replication listener before anything runs, so errors surface now.
    let mut listeners = Vec::new();
    for r in &resources {
        let addr = r.spec.me.address;
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ResourceError::Listen {
                resource: r.name().to_string(),
                addr,
                source,
            })?;
        listeners.push(l);
    }
    let path = config.control_socket_of(node);
    let control = bind_control(&path)?;
    let mut tasks = tokio::task::JoinSet::new();
    for (r, l) in resources.iter().zip(listeners) {
        tasks.spawn(r.run_with_listener(l));
        let s = service.clone();
        tasks.spawn(while_primary(r.clone(), s));
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tasks.spawn(crate::control::server::serve(
        control,
        resources.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    tracing::info!(node, control = %path.display(), resources = resources.len(), "node running");
    shutdown.await;
    let _ = stop_tx.send(());
    // Concurrently: each may wait for its sessions to end, and one after another they could
    // outlast a service manager's stop timeout.
    let mut stopping = tokio::task::JoinSet::new();
    for r in &resources {
        let r = r.clone();
        stopping.spawn(async move { r.shutdown().await });
    }
    while stopping.join_next().await.is_some() {}
    tasks.shutdown().await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn bind_control(path: &Path) -> Result<UnixListener, NodeError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| NodeError::Control {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            // A live blockd answers; a stale socket is removed.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another blockd is running on this control socket",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        } else {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
    }
    UnixListener::bind(path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A promotion while the last term's service still drains its clients starts a new term
    /// once it is done; before, the node stayed Primary without an export until it was demoted.
    #[tokio::test]
    async fn a_quick_promotion_after_a_demotion_serves_again() {
        let (tx, rx) = watch::channel(Role::Secondary);
        let starts = Arc::new(AtomicUsize::new(0));
        let s = starts.clone();
        let runner = tokio::spawn(each_primary_term(rx, move |demoted| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                demoted.await;
                // Draining the clients (up to the shutdown grace).
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
        tx.send_replace(Role::Primary);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        tx.send_replace(Role::Secondary);
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send_replace(Role::Primary);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "no service in the second term"
        );
        drop(tx);
        runner.abort();
    }

    /// A service that ends by itself (its export could not listen) is not restarted in a loop:
    /// the next promotion starts it again.
    #[tokio::test]
    async fn a_service_that_fails_waits_for_the_next_term() {
        let (tx, rx) = watch::channel(Role::Primary);
        let starts = Arc::new(AtomicUsize::new(0));
        let s = starts.clone();
        let runner = tokio::spawn(each_primary_term(rx, move |_demoted| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
            }
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        tx.send_replace(Role::Secondary);
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send_replace(Role::Primary);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        drop(tx);
        runner.abort();
    }
}
