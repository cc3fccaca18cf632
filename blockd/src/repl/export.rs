//! Serving a replicated resource over NBD while it is Primary: bind the node's NBD address,
//! serve `Device::Replicated`, and stop (drain in-flight requests, flush) on demotion.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::nbd::export::Export;
use crate::nbd::server::{self, Listener, ServerOptions};
use crate::repl::device::Device;
use crate::repl::resource::{Resource, error_chain};

/// The NBD service `repl::node::run` starts each time `res` becomes Primary: the export is
/// named after the resource and served on the node's `nbd` address until `demoted` completes.
/// A bind failure is logged and the export stays down until the next promotion.
pub async fn serve_while_primary(
    res: Arc<Resource>,
    demoted: Pin<Box<dyn Future<Output = ()> + Send>>,
) {
    let addr = res.nbd_address();
    let listener = match bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(resource = %res.name(), %addr, "cannot serve NBD: {}", error_chain(&e));
            demoted.await;
            return;
        }
    };
    let export = Arc::new(Export {
        name: res.name().to_string(),
        description: Some(format!("blockd replicated resource {}", res.name())),
        store: Device::Replicated(res.clone()),
    });
    let tls = match &res.spec.nbd_tls {
        None => "",
        Some(t) if t.required => " (TLS required)",
        Some(_) => " (TLS offered)",
    };
    tracing::info!(resource = %res.name(), %addr, "serving NBD (Primary){tls}");
    eprintln!(
        "blockd: resource {} is Primary: serving NBD export {:?} on {addr}{tls}",
        res.name(),
        res.name()
    );
    let result = server::run_with(
        vec![Listener::Tcp(listener)],
        export,
        res.spec.nbd_tls.clone(),
        ServerOptions {
            same_host_congestion: res.spec.nbd_same_host_congestion,
            ..ServerOptions::default()
        },
        demoted,
    )
    .await;
    match result {
        Ok(()) => tracing::info!(resource = %res.name(), "NBD export stopped"),
        Err(e) => tracing::error!(resource = %res.name(), "NBD export failed: {}", error_chain(&e)),
    }
}

/// Binds the NBD address, retrying briefly: after a quick demote/promote the previous
/// listener may still be closing.
async fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let mut last = None;
    for _ in 0..20 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    Err(last.expect("at least one attempt"))
}
