//! The blockd command line: `blockd standalone` serves one local export over NBD;
//! `blockd --config FILE [--node NAME] [--resource NAME] [--metrics-listen ADDR]` runs every
//! replicated resource of this node (or just one), optionally with a Prometheus endpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};

use blockd::config::ClusterConfig;
use blockd::nbd::congestion;
use blockd::nbd::export::Export;
use blockd::nbd::server::{self, Listener, ServerOptions};
use blockd::nbd::tls::TlsSettings;
use blockd::store::{BlockStore, EngineKind, OpenOptions};

#[derive(Parser)]
#[command(
    name = "blockd",
    version,
    about = "A userspace replicated block device served over NBD",
    args_conflicts_with_subcommands = true,
    help_expected = true
)]
struct Cli {
    /// Cluster configuration file: run every replicated resource of this node (serving NBD on
    /// the node's `nbd` address while Primary).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's name in the config (default: matched by host name).
    #[arg(long, value_name = "NAME", requires = "config")]
    node: Option<String>,
    /// Run only this resource (one process per resource, e.g. `blockd@r0.service`); its
    /// control socket is the node's with `-NAME` before `.sock` (blockctl finds it).
    #[arg(long, value_name = "NAME", requires = "config")]
    resource: Option<String>,
    /// Serve Prometheus metrics for every resource run here on ADDR (`GET /metrics`),
    /// overriding the config's `metrics-listen` keys.
    #[arg(long, value_name = "ADDR:PORT", requires = "config")]
    metrics_listen: Option<SocketAddr>,
    /// TEST ONLY, hidden: a deliberately broken export that acknowledges FLUSH/FUA without
    /// syncing or waiting for peers and replicates writes seconds late (vm-tests shows that
    /// its failover scenario fails against it). See `repl::device::debug_drop_flush`.
    #[arg(long, hide = true, requires = "config")]
    debug_drop_flush: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one local file or block device over NBD, without replication.
    Standalone(StandaloneArgs),
}

#[derive(Args)]
struct StandaloneArgs {
    /// Backing regular file (created sparse with --size when missing) or block device.
    #[arg(long)]
    backing: PathBuf,
    /// Export size, e.g. 1G (creates or grows a regular file; default: the whole backing).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// TCP address to listen on (repeatable). Default 127.0.0.1:10809 when no --socket is given.
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    listen: Vec<String>,
    /// Unix socket path to listen on (repeatable).
    #[arg(long = "socket", value_name = "PATH")]
    socket: Vec<PathBuf>,
    /// Export name clients ask for (the empty name also selects it).
    #[arg(long, default_value = "blockd")]
    export: String,
    /// Export description sent with NBD_INFO_DESCRIPTION.
    #[arg(long)]
    description: Option<String>,
    /// Serve read-only.
    #[arg(long)]
    read_only: bool,
    /// I/O engine: auto (io_uring when available), uring, or sync.
    #[arg(long, default_value = "auto")]
    io_engine: EngineKind,
    /// Certificate directory (server-cert.pem, server-key.pem, optional ca-cert.pem; with
    /// ca-cert.pem, clients must present a certificate it issued). Enables STARTTLS.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Require TLS: refuse every option but STARTTLS and ABORT until TLS is up.
    #[arg(long, requires = "tls_dir")]
    tls: bool,
    /// Seconds a client may take for the whole handshake.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    handshake_timeout: u64,
    /// TCP congestion control of client connections from this host (loopback, or this host's
    /// own address): an algorithm, or `system` to keep the system's default. A paced default
    /// such as BBR only costs CPU and throughput where no network is crossed.
    #[arg(long, default_value = congestion::DEFAULT_SAME_HOST, value_name = "NAME|system")]
    same_host_congestion: congestion::SameHost,
}

fn parse_size(text: &str) -> Result<u64, common::size::SizeError> {
    common::size::parse_size(text)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    common::telemetry::init("info");
    tune_allocator();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match (cli.command, cli.config) {
        (Some(Command::Standalone(args)), _) => runtime.block_on(standalone(args)),
        (None, Some(config)) => {
            if cli.debug_drop_flush {
                blockd::repl::device::debug_drop_flush::enable();
                eprintln!(
                    "blockd: TEST ONLY --debug-drop-flush: FLUSH/FUA dropped, replication delayed"
                );
            }
            runtime.block_on(replicated(
                &config,
                cli.node.as_deref(),
                cli.resource.as_deref(),
                cli.metrics_listen,
            ))
        }
        (None, None) => bail!("nothing to run: give `--config FILE` or `standalone` (see --help)"),
    }
}

/// Keeps large I/O buffers (up to 32 MiB) on the malloc heap instead of fresh `mmap`s, and
/// stops glibc from handing freed heap memory back right away: otherwise every 1 MiB request
/// buffer costs 256 page faults.
fn tune_allocator() {
    // SAFETY: mallopt only changes glibc allocator parameters; it is called before the runtime
    // starts any thread, and a failure (return 0) just leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

async fn standalone(args: StandaloneArgs) -> Result<()> {
    let store = BlockStore::open(
        &args.backing,
        &OpenOptions {
            size: args.size,
            read_only: args.read_only,
            engine: args.io_engine,
        },
    )
    .with_context(|| format!("cannot open the backing {}", args.backing.display()))?;
    let tls = args
        .tls_dir
        .as_deref()
        .map(|dir| TlsSettings::from_dir(dir, args.tls))
        .transpose()?;

    let mut listen = args.listen.clone();
    if listen.is_empty() && args.socket.is_empty() {
        listen.push("127.0.0.1:10809".to_string());
    }
    let mut listeners = Vec::new();
    for addr in &listen {
        let l = TcpListener::bind(addr.as_str())
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(Listener::Tcp(l));
    }
    for path in &args.socket {
        remove_stale_socket(path)?;
        let l = UnixListener::bind(path)
            .with_context(|| format!("cannot listen on the Unix socket {}", path.display()))?;
        listeners.push(Listener::Unix(l));
    }
    let addresses: Vec<String> = listeners.iter().map(Listener::describe).collect();

    let export = Arc::new(Export {
        name: args.export.clone(),
        description: args.description.clone(),
        store: store.into(),
    });
    let shutdown = termination()?;
    eprintln!(
        "blockd: serving export {:?} ({} bytes, engine {}{}{}) on {}",
        export.name,
        export.store.size(),
        export.store.engine_name(),
        if args.read_only { ", read-only" } else { "" },
        match (&args.tls_dir, args.tls) {
            (Some(_), true) => ", TLS required",
            (Some(_), false) => ", TLS optional",
            (None, _) => "",
        },
        addresses.join(", ")
    );
    let options = ServerOptions {
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        same_host_congestion: args.same_host_congestion,
        ..ServerOptions::default()
    };
    let result = server::run_with(listeners, export, tls, options, shutdown).await;
    for path in &args.socket {
        let _ = std::fs::remove_file(path);
    }
    result.context("NBD server failed")
}

/// Runs every resource of this node (or only `resource`) until SIGTERM or SIGINT; each is
/// served over NBD while Primary. Resources are detached cleanly at exit.
async fn replicated(
    config: &Path,
    node: Option<&str>,
    resource: Option<&str>,
    metrics_listen: Option<SocketAddr>,
) -> Result<()> {
    let mut config = ClusterConfig::load(config)?;
    let host = blockd::config::hostname()?;
    let node = config.local_node_name(node, &host)?;
    if let Some(r) = resource {
        config = config.only_resource(r)?;
        if config.resources_of(&node).is_empty() {
            bail!(
                "{}: node {node} has no resource {r:?}",
                config.file.display()
            );
        }
    }
    let names: Vec<String> = config
        .resources_of(&node)
        .iter()
        .map(|l| l.resource.name.clone())
        .collect();
    let control = config.control_socket_of(&node);
    // Metrics endpoints: bound before anything runs, so a taken port fails the start.
    let mut endpoints: Vec<(SocketAddr, Vec<String>)> = Vec::new();
    match metrics_listen {
        Some(addr) => endpoints.push((addr, names.clone())),
        None => {
            for l in config.resources_of(&node) {
                if let Some(addr) = config.metrics_listen_of(&l) {
                    match endpoints.iter_mut().find(|(a, _)| *a == addr) {
                        Some((_, rs)) => rs.push(l.resource.name.clone()),
                        None => endpoints.push((addr, vec![l.resource.name.clone()])),
                    }
                }
            }
        }
    }
    let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
    let mut metric_tasks = Vec::new();
    for (addr, only) in endpoints {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        eprintln!("blockd: metrics on http://{addr}/metrics");
        let control = control.clone();
        let render = move || {
            let (control, only) = (control.clone(), only.clone());
            async move {
                let status = blockd::metrics::source::status(&control).await;
                let nbd = blockd::metrics::source::nbd_stats();
                blockd::metrics::render(&blockd::metrics::source::select(status, nbd, &only))
            }
        };
        let mut stopped = metrics_stopped.clone();
        metric_tasks.push(tokio::spawn(blockd::metrics::http::serve(
            listener,
            render,
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));
    }
    let shutdown = termination()?;
    eprintln!(
        "blockd: node {node} running resources [{}], control socket {}",
        names.join(", "),
        control.display()
    );
    let result = blockd::repl::node::run(
        &config,
        &node,
        blockd::repl::export::serve_while_primary,
        shutdown,
    )
    .await
    .with_context(|| format!("node {node} failed"));
    let _ = stop_metrics.send(true);
    for t in metric_tasks {
        let _ = t.await;
    }
    result
}

/// Completes on the first SIGTERM or SIGINT.
fn termination() -> Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Removes a leftover socket file from an earlier run; refuses to remove anything else.
fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display())),
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every argument of every subcommand has help text (`help_expected`), and the
    /// definitions are consistent.
    #[test]
    fn cli_is_complete() {
        super::Cli::command().debug_assert();
    }
}
