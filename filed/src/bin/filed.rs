//! The `filed` command line: parses arguments, loads the configuration and hands the work to the
//! library (commands run in-process, or inside the running `filed serve` via its control socket).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use filed::commands::{self, Command, EXIT_ERROR, Keep};
use filed::config::{Config, DEFAULT_CONFIG};
use filed::node::Node;
use filed::server::{self, control_path};
use filed::session::ServeOptions;
use filed::store::RedbStore;

#[derive(Parser)]
#[command(
    name = "filed",
    version,
    about = "csync2-style group file synchronisation",
    help_expected = true
)]
struct Cli {
    /// Configuration file (the same on every host).
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// This host's name in the configuration (default: the hostname; csync2 -N).
    #[arg(long, global = true)]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum KeepArg {
    /// This host's version.
    Local,
    /// The peer's version.
    Remote,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check for local changes and exchange them with every reachable peer (csync2 -x).
    Sync {
        /// Only this group (default: every group this host belongs to).
        group: Option<String>,
        /// Only these peers (csync2 -P).
        #[arg(long = "peer")]
        peers: Vec<String>,
    },
    /// Scan the included trees and record changes (csync2 -cr).
    Check {
        /// Only this group (default: every group this host belongs to).
        group: Option<String>,
        /// Hash every file even when size and mtime are unchanged.
        #[arg(long)]
        rehash: bool,
        /// Scan include roots that are empty although files are recorded under them (they are
        /// skipped otherwise: an unmounted filesystem must not delete the files on every peer).
        #[arg(long = "allow-empty-root")]
        allow_empty_roots: bool,
    },
    /// List paths waiting to be sent, per peer (csync2 -M).
    Dirty {
        /// Only this group (default: every group this host belongs to).
        group: Option<String>,
    },
    /// Compare this host's tree with the peers' (csync2 -T).
    Compare {
        /// Only this peer (default: every peer sharing a group with this host).
        peer: Option<String>,
        /// Only this group (default: every group this host belongs to).
        #[arg(long)]
        group: Option<String>,
    },
    /// Resolve a conflict by keeping one side's version, then sync it.
    Resolve {
        /// The conflicting file: this host's path or the logical one (`%prefix%/...`).
        path: String,
        /// Which version wins: this host's (local) or the peer's (remote).
        #[arg(long, value_enum)]
        keep: KeepArg,
    },
    /// Make this host's version win the next sync (csync2 -f).
    Force {
        /// The file: this host's path or the logical one (`%prefix%/...`).
        path: String,
    },
    /// Create keys: a group key FILE (csync2 -k FILE), or without FILE every missing CA,
    /// certificate and group key named in the configuration.
    Keygen {
        /// Write a new group key to this file (mode 0600; never overwrites).
        file: Option<PathBuf>,
        /// With no FILE: only certificates for these hosts.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Show per group and peer the queue, last sync, conflicts and errors.
    Status {
        /// Machine-readable output (stable interface, see docs/filed.md).
        #[arg(long)]
        json: bool,
    },
    /// List unresolved conflicts.
    LsConflicts {
        /// Machine-readable output (one JSON document).
        #[arg(long)]
        json: bool,
    },
    /// Listen for peers and sync automatically: watch the local trees, send changes as they
    /// happen (the csync2 + incron setup, without loops).
    Daemon {
        /// Listen address (default: this host's `address`).
        #[arg(long)]
        listen: Option<String>,
        /// Prometheus metrics endpoint, e.g. 127.0.0.1:9465 (default: `[daemon] metrics-listen`).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Event aggregation window in ms (default: `[daemon] batch-delay-ms`, 200).
        #[arg(long)]
        batch_delay_ms: Option<u64>,
        /// Full check interval in seconds (default: `[daemon] full-check-interval-secs`, 3600).
        #[arg(long)]
        full_check_secs: Option<u64>,
    },
    /// Listen for peers (csync2 -ii).
    Serve {
        /// Listen address (default: this host's `address`).
        #[arg(long)]
        listen: Option<String>,
    },
}

fn main() -> ExitCode {
    // The daemon reports what it does; one-shot commands only warnings.
    let daemon = std::env::args()
        .nth(1)
        .is_some_and(|_| std::env::args().any(|a| a == "daemon"));
    common::telemetry::init(if daemon { "info" } else { "warn" });
    if let Err(e) = filed::apply::raise_open_file_limit() {
        tracing::debug!(error = %e, "cannot raise the open file limit");
    }
    match run() {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("filed: {e:#}");
            ExitCode::from(EXIT_ERROR as u8)
        }
    }
}

fn absolute(p: &str) -> String {
    if p.starts_with('/') || p.starts_with('%') {
        p.to_string()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p).display().to_string())
            .unwrap_or_else(|_| p.to_string())
    }
}

fn run() -> Result<i32> {
    let cli = Cli::parse();
    if let Cmd::Keygen {
        file: Some(file), ..
    } = &cli.cmd
    {
        filed::keygen::write_group_key(file)?;
        println!("wrote group key {}", file.display());
        return Ok(0);
    }
    let config = Arc::new(Config::load(&cli.config)?);
    if let Cmd::Keygen { file: None, hosts } = &cli.cmd {
        let only = if hosts.is_empty() {
            None
        } else {
            Some(hosts.as_slice())
        };
        for p in filed::keygen::generate_missing(&config, only)? {
            println!("created {}", p.display());
        }
        return Ok(0);
    }
    let me = config.local_host(cli.node.as_deref())?.clone();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let command = match cli.cmd {
        Cmd::Serve { listen } => {
            let store = RedbStore::open(&me.state, Duration::from_secs(10))?;
            let node = Arc::new(Node::new(config.clone(), me.clone(), Arc::new(store)));
            let addr = listen.unwrap_or_else(|| me.address.clone());
            return rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let control = server::bind_control(&control_path(&me.state))?;
                let shutdown = async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("signal handler");
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = tokio::signal::ctrl_c() => {},
                    }
                };
                server::serve(
                    node,
                    listener,
                    Some(control),
                    ServeOptions::default(),
                    shutdown,
                )
                .await?;
                let _ = std::fs::remove_file(control_path(&me.state));
                Ok(0)
            });
        }
        Cmd::Daemon {
            listen,
            metrics_listen,
            batch_delay_ms,
            full_check_secs,
        } => {
            let store = RedbStore::open(&me.state, Duration::from_secs(10))?;
            let node = Arc::new(Node::new(config.clone(), me.clone(), Arc::new(store)));
            let addr = listen.unwrap_or_else(|| me.address.clone());
            let mut opts = filed::daemon::DaemonOptions::from(&config.daemon);
            if let Some(ms) = batch_delay_ms {
                opts.batch_delay = Duration::from_millis(ms);
            }
            if let Some(s) = full_check_secs {
                anyhow::ensure!(s > 0, "--full-check-secs must be at least 1");
                opts.full_check_interval = Duration::from_secs(s);
            }
            let metrics_addr = metrics_listen.or_else(|| config.daemon.metrics_listen.clone());
            return rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let metrics = match &metrics_addr {
                    Some(a) => Some(
                        tokio::net::TcpListener::bind(a)
                            .await
                            .with_context(|| format!("binding the metrics endpoint {a}"))?,
                    ),
                    None => None,
                };
                let control = server::bind_control(&control_path(&me.state))?;
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .context("installing the SIGTERM handler")?;
                let shutdown = async move {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = tokio::signal::ctrl_c() => {},
                    }
                };
                filed::daemon::run(node, listener, Some(control), metrics, opts, shutdown).await?;
                let _ = std::fs::remove_file(control_path(&me.state));
                Ok(0)
            });
        }
        Cmd::Keygen { .. } => unreachable!("handled above"),
        Cmd::Sync { group, peers } => Command::Sync { group, peers },
        Cmd::Check {
            group,
            rehash,
            allow_empty_roots,
        } => Command::Check {
            group,
            rehash,
            allow_empty_roots,
        },
        Cmd::Dirty { group } => Command::Dirty { group },
        Cmd::Compare { peer, group } => Command::Compare { group, peer },
        Cmd::Resolve { path, keep } => Command::Resolve {
            path: absolute(&path),
            keep: match keep {
                KeepArg::Local => Keep::Local,
                KeepArg::Remote => Keep::Remote,
            },
        },
        Cmd::Force { path } => Command::Force {
            path: absolute(&path),
        },
        Cmd::Status { json } => Command::Status { json },
        Cmd::LsConflicts { json } => Command::LsConflicts { json },
    };
    let outcome = rt.block_on(async {
        match RedbStore::try_open(&me.state)? {
            Some(store) => {
                let node = Node::new(config.clone(), me.clone(), Arc::new(store));
                Ok::<_, anyhow::Error>(commands::run(&node, &command).await)
            }
            None => {
                // `filed serve` holds the database: let it run the command.
                let sock = control_path(&me.state);
                server::forward(&sock, &command).await.with_context(|| {
                    format!(
                        "state database {} is busy and no filed serve answers on {}",
                        me.state.display(),
                        sock.display()
                    )
                })
            }
        }
    })?;
    print!("{}", outcome.output);
    Ok(outcome.code)
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
