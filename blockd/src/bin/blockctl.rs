//! blockctl: administer blockd resources — status, events, roles, connections, metadata,
//! certificates — over blockd's control socket (metadata and certificates work offline).
//!
//! Exit codes: 0 ok; 1 failed (I/O, metadata, unexpected); 2 usage; 3 refused by the state
//! (e.g. promotion rules); 4 unknown resource or peer; 5 blockd not reachable; 6 wait-sync
//! timed out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};

use blockd::config::ClusterConfig;
use blockd::control::client::{Client, ClientError};
use blockd::control::proto::{ErrorCode, Request, Response};
use blockd::repl::resource::Status;

#[derive(Parser)]
#[command(
    name = "blockctl",
    version,
    about = "Administer blockd replicated resources",
    long_about = "Administer blockd replicated resources over blockd's control socket \
(metadata and certificates work offline).\n\nExit codes: 0 ok; 1 failed; 2 usage or bad \
request; 3 refused by the state (e.g. promotion rules); 4 unknown resource or peer; 5 blockd \
not reachable; 6 wait-sync timed out.",
    help_expected = true
)]
struct Cli {
    /// Cluster configuration file.
    #[arg(long, global = true, default_value = "/etc/blockd/cluster.toml")]
    config: PathBuf,
    /// This node's name (default: matched by host name).
    #[arg(long, global = true)]
    node: Option<String>,
    /// Control socket (default: from the config: the per-resource socket of `blockd
    /// --resource` when it exists, else the node's).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Role, disk state and per-peer replication state.
    Status {
        /// Resource name (default: every resource of this node).
        resource: Option<String>,
        /// Print JSON (a stable interface: docs/interfaces.md).
        #[arg(long)]
        json: bool,
    },
    /// Live stream of state changes, one line each.
    Events {
        /// Resource name (default: every resource of this node).
        resource: Option<String>,
        /// One JSON object per line (a stable interface: docs/interfaces.md).
        #[arg(long)]
        json: bool,
    },
    /// Become Primary (needs UpToDate data and no other Primary, or --force). First prints
    /// (stderr) the writes a lost Primary had acknowledged that this node never received:
    /// those a promotion loses (protocols A and B). Never asks for confirmation.
    Promote {
        /// Resource name.
        resource: String,
        /// Promote Inconsistent or Outdated data (a new cluster's first Primary).
        #[arg(long)]
        force: bool,
        /// Only check: print what a promotion would lose, or why it is refused (exit 3);
        /// change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Flush, stop the NBD export and become Secondary.
    Demote {
        /// Resource name.
        resource: String,
    },
    /// (Re)connect to peers (all, or --peer).
    Connect {
        /// Resource name.
        resource: String,
        /// Only this peer node.
        #[arg(long)]
        peer: Option<String>,
        /// This node is the split-brain victim: discard its changes.
        #[arg(long)]
        discard_my_data: bool,
        /// The resync that follows compares block checksums first and sends only the blocks
        /// that differ (takes effect on the node that becomes the sync source).
        #[arg(long)]
        checksum: bool,
    },
    /// Online verify: compare the checksums of every block with the peer(s) while the device
    /// is in use; differing blocks are marked out of sync (a reconnect resyncs them) and
    /// reported in status and as a `verify-done` event.
    Verify {
        /// Resource name.
        resource: String,
        /// Only this peer node (default: every connected peer).
        peer: Option<String>,
        /// Wait until the verify ends and print its result.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit code 6).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Discard this node's data (not on a Primary): a full resync from an UpToDate peer follows.
    Invalidate {
        /// Resource name.
        resource: String,
    },
    /// Make the peer(s) discard their data and resync it from this node.
    InvalidateRemote {
        /// Resource name.
        resource: String,
        /// Only this peer node (default: every connected peer).
        peer: Option<String>,
    },
    /// Reattach the local disk after it was detached (I/O error or `detach`): reopens the
    /// backing store and metadata; the disk is Inconsistent until resynced from an UpToDate
    /// peer, then UpToDate (follow it in `status`).
    Attach {
        /// Resource name.
        resource: String,
    },
    /// Detach the local disk (Diskless): a Primary keeps serving reads and writes through a
    /// connected UpToDate peer. Refused on a Primary without one.
    Detach {
        /// Resource name.
        resource: String,
        /// Detach even the only up-to-date copy in reach (it comes back Inconsistent).
        #[arg(long)]
        force: bool,
    },
    /// Drop the link(s) and stay StandAlone.
    Disconnect {
        /// Resource name.
        resource: String,
        /// Only this peer node.
        #[arg(long)]
        peer: Option<String>,
    },
    /// On a Secondary: freeze a point-in-time image of the replica and serve it as a read-only
    /// NBD export while replication goes on (or end one with --drop). Prints its NBD URI.
    Snapshot {
        /// Resource name.
        resource: String,
        /// Snapshot name (default: snap-UNIXTIME).
        #[arg(long)]
        name: Option<String>,
        /// Ask the Primary for a flush boundary first: everything its clients flushed is in it.
        #[arg(long)]
        consistent: bool,
        /// NBD listen address ADDR:PORT (default: the node's NBD address, a free port).
        #[arg(long)]
        listen: Option<String>,
        /// Copy-on-write area size, e.g. 512M (default: snapshot-cow-size, else a quarter of
        /// the device). When it fills, the snapshot is invalidated, never replication slowed.
        #[arg(long, value_parser = parse_size)]
        cow_size: Option<u64>,
        /// End the snapshot NAME: stop its export and remove its copy-on-write area.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["name", "consistent", "listen", "cow_size"])]
        drop: Option<String>,
    },
    /// Initialise this node's metadata for a resource (refuses existing metadata without --force).
    CreateMd {
        /// Resource name.
        resource: String,
        /// Overwrite existing (valid or damaged) metadata: all tracking of changes is lost.
        #[arg(long)]
        force: bool,
    },
    /// Wait (with a progress bar) until every peer is connected and in sync: no resync
    /// running, nothing out of sync, this node and every peer UpToDate.
    WaitSync {
        /// Resource name.
        resource: String,
        /// Give up after this many seconds (exit code 6).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Make a cluster CA (if missing in DIR) and a certificate for every node of the config:
    /// DIR/ca.pem, DIR/ca.key, DIR/NODE.pem, DIR/NODE.key.
    Certs {
        /// Directory for the CA and the node certificates (created when missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Check the config file offline: it parses, this node is found, and (when given) it
    /// runs RESOURCE. Prints the node and its resources.
    CheckConfig {
        /// A resource this node must run.
        resource: Option<String>,
    },
    /// List the blocks this node saved as a split-brain victim before the resync overwrote
    /// them (its side file, beside the metadata), or extract saved data to a file. Works
    /// offline (reads the file named by the config).
    Divergent {
        /// Resource name.
        resource: String,
        /// Print JSON (sessions with time, peer, reason, ranges, bytes).
        #[arg(long)]
        json: bool,
        /// Write saved data of --session to FILE: the bytes of --offset/--length, or without
        /// them every saved block at its device offset (a sparse image).
        #[arg(long, value_name = "FILE")]
        extract: Option<PathBuf>,
        /// The session to extract (the index the listing shows).
        #[arg(long, default_value_t = 0)]
        session: usize,
        /// Device offset of the range to extract (bytes).
        #[arg(long, requires = "length")]
        offset: Option<u64>,
        /// Length of the range to extract (bytes).
        #[arg(long, requires = "offset")]
        length: Option<u64>,
    },
    /// Write a new random shared secret to FILE (mode 0600).
    GenSecret {
        /// Where to write the secret (must not exist).
        file: PathBuf,
    },
}

/// A failure with its exit code.
struct Failure(u8, anyhow::Error);

/// `--cow-size`: a byte count with an optional K/M/G/T suffix.
fn parse_size(text: &str) -> Result<u64, String> {
    common::size::parse_size(text).map_err(|e| e.to_string())
}

fn fail(code: u8, e: impl Into<anyhow::Error>) -> Failure {
    Failure(code, e.into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockctl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("blockctl: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn load(cli: &Cli) -> Result<(ClusterConfig, String), Failure> {
    let config = ClusterConfig::load(&cli.config).map_err(|e| fail(1, e))?;
    let host = blockd::config::hostname().map_err(|e| fail(1, e))?;
    let node = config
        .local_node_name(cli.node.as_deref(), &host)
        .map_err(|e| fail(1, e))?;
    Ok((config, node))
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The control socket serving `resource`: `--socket`, else the per-resource socket of a
/// `blockd --resource` process when one exists, else the node's socket.
fn socket(cli: &Cli, resource: &str) -> Result<PathBuf, Failure> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    let (config, node) = load(cli)?;
    let own = config.control_socket_of_resource(&node, resource);
    Ok(if is_socket(&own) {
        own
    } else {
        config.control_socket_of(&node)
    })
}

/// Every control socket of this node: the node's (whole-node blockd) and the per-resource
/// ones (`blockd --resource`) that exist; the node's when none exists.
fn sockets(cli: &Cli, resource: Option<&str>) -> Result<Vec<PathBuf>, Failure> {
    if let Some(r) = resource {
        return Ok(vec![socket(cli, r)?]);
    }
    if let Some(s) = &cli.socket {
        return Ok(vec![s.clone()]);
    }
    let (config, node) = load(cli)?;
    let mut all: Vec<PathBuf> = std::iter::once(config.control_socket_of(&node))
        .chain(
            config
                .resources_of(&node)
                .iter()
                .map(|l| config.control_socket_of_resource(&node, &l.resource.name)),
        )
        .filter(|p| is_socket(p))
        .collect();
    if all.is_empty() {
        all.push(config.control_socket_of(&node));
    }
    Ok(all)
}

async fn call(path: &Path, req: &Request) -> Result<Response, Failure> {
    let mut c = Client::connect(path).await.map_err(client_failure)?;
    let resp = c.call(req).await.map_err(client_failure)?;
    check(resp)
}

fn client_failure(e: ClientError) -> Failure {
    match e {
        ClientError::Connect { .. } => fail(5, e),
        other => fail(1, other),
    }
}

fn check(resp: Response) -> Result<Response, Failure> {
    if resp.ok == Some(false) {
        let code = match resp.code {
            Some(ErrorCode::Refused) => 3,
            Some(ErrorCode::Unknown) => 4,
            Some(ErrorCode::BadRequest) => 2,
            _ => 1,
        };
        return Err(fail(code, anyhow!(resp.error.unwrap_or_default())));
    }
    Ok(resp)
}

fn print_status(s: &Status) {
    let q = &s.quorum;
    let quorum = match (q.setting.as_str(), q.has_quorum) {
        ("off" | "", _) => String::new(),
        (_, has) => format!(
            " quorum:{}({}/{}){}",
            if has { "yes" } else { "no" },
            q.present,
            q.voters,
            if q.io_suspended { " io:suspended" } else { "" }
        ),
    };
    println!(
        "{} role:{} disk:{} size:{}{quorum}",
        s.resource, s.role, s.disk, s.size
    );
    if let Some(e) = &s.disk_error {
        println!("  disk-error: {e}");
    }
    if let Some(a) = &s.attach {
        println!(
            "  attach-resync:{} ({}/{} bytes checked, {} bytes fetched)",
            a.state, a.done_bytes, a.total_bytes, a.fetched_bytes
        );
    }
    for p in &s.peers {
        print!(
            "  {} (id {}, protocol {}) connection:{} replication:{} role:{} disk:{} out-of-sync:{} in-flight:{}",
            p.node,
            p.id,
            p.protocol,
            p.connection,
            p.replication,
            p.role,
            p.disk,
            p.out_of_sync_bytes,
            p.in_flight
        );
        if p.marks_wait_for_primary {
            print!(" (marked for the next Primary)");
        }
        if p.protocol != "C" {
            print!(
                " unconfirmed:{} ({} bytes)",
                p.unconfirmed_writes, p.unconfirmed_bytes
            );
        }
        if p.protocol == "A" && p.connection == "connected" {
            print!(
                " queued:{}/{} bytes{} congested-writes:{}",
                p.queued_bytes,
                p.sndbuf_size,
                if p.congested { " congested" } else { "" },
                p.congested_writes
            );
        }
        if p.lost_acked_writes > 0 {
            print!(
                " lost-acked-writes:{} lost-acked-bytes:{}",
                p.lost_acked_writes, p.lost_acked_bytes
            );
        }
        if let Some(r) = &p.resync {
            print!(
                " resync:{}% ({}/{} bytes, {} B/s)",
                r.percent, r.done_bytes, r.total_bytes, r.rate
            );
            if let Some(s) = r.retry_in_secs {
                print!(" resync-retry-in:{s}s");
            }
        }
        if let Some(v) = &p.verify {
            print!(
                " verify:{} {}% ({} blocks differ)",
                v.state, v.percent, v.report.differing_blocks
            );
        }
        if let Some(e) = &p.last_error
            && p.connection != "connected"
        {
            print!(" last-error:{e:?}");
        }
        println!();
    }
    for snap in &s.snapshots {
        print!(
            "  snapshot {} {} age:{}s cow:{}/{} bytes",
            snap.name, snap.nbd, snap.age_secs, snap.cow_used_bytes, snap.cow_capacity_bytes
        );
        match &snap.invalid {
            Some(why) => println!(" INVALID: {why}"),
            None => println!(),
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Cmd::Status { resource, json } => {
            let mut all = Vec::new();
            for path in sockets(&cli, resource.as_deref())? {
                let resp = call(&path, &Request::new("status", resource.as_deref())).await?;
                all.extend(resp.status.unwrap_or_default());
            }
            if *json {
                let text = if resource.is_some() && all.len() == 1 {
                    serde_json::to_string_pretty(&all[0])
                } else {
                    serde_json::to_string_pretty(&all)
                };
                println!("{}", text.map_err(|e| fail(1, e))?);
            } else {
                all.iter().for_each(print_status);
            }
            Ok(())
        }
        Cmd::Events { resource, json } => {
            let (tx, mut rx) = tokio::sync::mpsc::channel(256);
            for path in sockets(&cli, resource.as_deref())? {
                let mut c = Client::connect(&path).await.map_err(client_failure)?;
                check(
                    c.call(&Request::new("events", resource.as_deref()))
                        .await
                        .map_err(client_failure)?,
                )?;
                let tx = tx.clone();
                tokio::spawn(async move {
                    loop {
                        let r = c.next().await;
                        let end = r.is_err();
                        if tx.send(r).await.is_err() || end {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            loop {
                let r = match rx.recv().await {
                    Some(Ok(r)) => r,
                    None | Some(Err(ClientError::Closed)) => return Ok(()),
                    Some(Err(e)) => return Err(client_failure(e)),
                };
                if let Some(ev) = r.event {
                    if *json {
                        println!("{}", serde_json::to_string(&ev).map_err(|e| fail(1, e))?);
                    } else {
                        println!("{}", ev.line());
                    }
                }
            }
        }
        Cmd::Promote {
            resource,
            force,
            dry_run,
        } => {
            let path = socket(&cli, resource)?;
            let mut check = Request::new("promote-check", Some(resource));
            check.force = *force;
            let resp = call(&path, &check).await?;
            for loss in resp.losses.iter().flatten() {
                if let Some(warning) = blockd::repl::lost_writes::loss_warning(resource, loss) {
                    eprintln!("{warning}");
                }
            }
            if *dry_run {
                println!("promote {resource}: would be granted (dry run: nothing changed)");
                return Ok(());
            }
            let mut req = Request::new("promote", Some(resource));
            req.force = *force;
            call(&path, &req).await.map(drop)
        }
        Cmd::Demote { resource } => call(
            &socket(&cli, resource)?,
            &Request::new("demote", Some(resource)),
        )
        .await
        .map(drop),
        Cmd::Connect {
            resource,
            peer,
            discard_my_data,
            checksum,
        } => {
            let mut req = Request::new("connect", Some(resource));
            req.peer = peer.clone();
            req.discard_my_data = *discard_my_data;
            req.checksum = *checksum;
            call(&socket(&cli, resource)?, &req).await.map(drop)
        }
        Cmd::Verify {
            resource,
            peer,
            wait,
            timeout,
        } => {
            let path = socket(&cli, resource)?;
            let mut req = Request::new("verify", Some(resource));
            req.peer = peer.clone();
            call(&path, &req).await?;
            if !*wait {
                return Ok(());
            }
            let start = Instant::now();
            loop {
                let resp = call(&path, &Request::new("status", Some(resource))).await?;
                let s = resp
                    .status
                    .and_then(|mut v| v.pop())
                    .ok_or_else(|| fail(1, anyhow!("no status")))?;
                let mine: Vec<_> = s
                    .peers
                    .iter()
                    .filter(|p| peer.as_ref().is_none_or(|n| *n == p.node))
                    .filter_map(|p| p.verify.as_ref().map(|v| (p, v)))
                    .collect();
                if !mine.is_empty() && mine.iter().all(|(_, v)| v.state != "running") {
                    let mut aborted = false;
                    for (p, v) in &mine {
                        println!(
                            "{} peer {}: verify {}: {}",
                            s.resource,
                            p.node,
                            v.state,
                            v.report.summary()
                        );
                        aborted |= v.state != "done";
                    }
                    if aborted {
                        return Err(fail(1, anyhow!("verify did not complete")));
                    }
                    return Ok(());
                }
                if let Some(t) = timeout
                    && start.elapsed() > Duration::from_secs(*t)
                {
                    return Err(fail(6, anyhow!("verify not done after {t} s")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Cmd::Invalidate { resource } => call(
            &socket(&cli, resource)?,
            &Request::new("invalidate", Some(resource)),
        )
        .await
        .map(drop),
        Cmd::InvalidateRemote { resource, peer } => {
            let mut req = Request::new("invalidate-remote", Some(resource));
            req.peer = peer.clone();
            call(&socket(&cli, resource)?, &req).await.map(drop)
        }
        Cmd::Snapshot {
            resource,
            name,
            consistent,
            listen,
            cow_size,
            drop: to_drop,
        } => {
            let path = socket(&cli, resource)?;
            if let Some(n) = to_drop {
                let mut req = Request::new("snapshot-drop", Some(resource));
                req.name = Some(n.clone());
                call(&path, &req).await?;
                println!("{resource}: snapshot {n} dropped");
                return Ok(());
            }
            let mut req = Request::new("snapshot", Some(resource));
            req.name = name.clone();
            req.consistent = *consistent;
            req.listen = listen.clone();
            req.cow_size = *cow_size;
            let resp = call(&path, &req).await?;
            let s = resp
                .snapshot
                .ok_or_else(|| fail(1, anyhow!("blockd answered without the snapshot")))?;
            println!(
                "{resource}: snapshot {} (generation {}, copy-on-write area {} bytes) served read-only at {}",
                s.name, s.generation, s.cow_capacity_bytes, s.nbd
            );
            Ok(())
        }
        Cmd::Attach { resource } => call(
            &socket(&cli, resource)?,
            &Request::new("attach", Some(resource)),
        )
        .await
        .map(drop),
        Cmd::Detach { resource, force } => {
            let mut req = Request::new("detach", Some(resource));
            req.force = *force;
            call(&socket(&cli, resource)?, &req).await.map(drop)
        }
        Cmd::Disconnect { resource, peer } => {
            let mut req = Request::new("disconnect", Some(resource));
            req.peer = peer.clone();
            call(&socket(&cli, resource)?, &req).await.map(drop)
        }
        Cmd::Divergent {
            resource,
            json,
            extract,
            session,
            offset,
            length,
        } => divergent(
            &cli,
            resource,
            *json,
            extract.as_deref(),
            *session,
            offset.zip(*length),
        ),
        Cmd::CreateMd { resource, force } => {
            let (config, node) = load(&cli)?;
            let local = config
                .resources_of(&node)
                .into_iter()
                .find(|l| l.resource.name == *resource)
                .ok_or_else(|| fail(4, anyhow!("node {node} has no resource {resource:?}")))?;
            blockd::repl::resource::create_md(&local, *force).map_err(|e| fail(1, e))?;
            println!("{resource}: metadata created on node {node}");
            Ok(())
        }
        Cmd::WaitSync { resource, timeout } => {
            let path = socket(&cli, resource)?;
            let start = Instant::now();
            loop {
                let resp = call(&path, &Request::new("status", Some(resource))).await?;
                let s = resp
                    .status
                    .and_then(|mut v| v.pop())
                    .ok_or_else(|| fail(1, anyhow!("no status")))?;
                let syncing: Vec<_> = s
                    .peers
                    .iter()
                    .filter_map(|p| p.resync.as_ref().map(|r| (p, r)))
                    .collect();
                // In sync: no resync running, every peer connected and established, nothing
                // out of sync, and both sides UpToDate (right after a promotion the resync may
                // not have started yet: the peer is still Inconsistent then).
                let settled = syncing.is_empty()
                    && s.disk == "up-to-date"
                    && s.peers.iter().all(|p| {
                        p.connection == "connected"
                            && p.replication == "established"
                            && (p.out_of_sync_bytes == 0 || p.marks_wait_for_primary)
                            && p.disk == "up-to-date"
                    });
                if let Some((p, r)) = syncing.first() {
                    let width = 30usize;
                    let filled = ((r.percent / 100.0) * width as f64) as usize;
                    eprint!(
                        "\r{} {} [{}{}] {:5.1}% {} MiB/s   ",
                        s.resource,
                        p.node,
                        "#".repeat(filled.min(width)),
                        " ".repeat(width - filled.min(width)),
                        r.percent,
                        r.rate >> 20
                    );
                }
                if settled {
                    eprintln!("\r{}: in sync{}", s.resource, " ".repeat(50));
                    return Ok(());
                }
                if let Some(t) = timeout
                    && start.elapsed() > Duration::from_secs(*t)
                {
                    eprintln!();
                    return Err(fail(6, anyhow!("not in sync after {t} s")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Cmd::CheckConfig { resource } => {
            let (config, node) = load(&cli)?;
            let mine: Vec<String> = config
                .resources_of(&node)
                .iter()
                .map(|l| l.resource.name.clone())
                .collect();
            if let Some(r) = resource
                && !mine.contains(r)
            {
                return Err(fail(
                    4,
                    anyhow!(
                        "{}: node {node} has no resource {r:?} (its resources: {})",
                        config.file.display(),
                        mine.join(", ")
                    ),
                ));
            }
            println!(
                "{}: ok; node {node} runs [{}]",
                config.file.display(),
                mine.join(", ")
            );
            Ok(())
        }
        Cmd::Certs { dir } => {
            let config = ClusterConfig::load(&cli.config).map_err(|e| fail(1, e))?;
            certs(&config, dir).map_err(|e| fail(1, e))
        }
        Cmd::GenSecret { file } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .with_context(|| format!("cannot create {}", file.display()))
                .map_err(|e| fail(1, e))?;
            writeln!(f, "{}", common::auth::SharedKey::generate_secret())
                .with_context(|| format!("cannot write {}", file.display()))
                .map_err(|e| fail(1, e))
        }
    }
}

/// `blockctl divergent`: lists or extracts this node's split-brain side file.
fn divergent(
    cli: &Cli,
    resource: &str,
    json: bool,
    extract: Option<&Path>,
    session: usize,
    range: Option<(u64, u64)>,
) -> Result<(), Failure> {
    use blockd::repl::divergent;
    let (config, node) = load(cli)?;
    let local = config
        .resources_of(&node)
        .into_iter()
        .find(|l| l.resource.name == resource)
        .ok_or_else(|| fail(4, anyhow!("node {node} has no resource {resource:?}")))?;
    let path = divergent::side_file_path(resource, local.me);
    let (bytes, parsed) = divergent::read(&path).map_err(|e| {
        fail(
            1,
            anyhow::Error::new(e).context(format!("cannot read {}", path.display())),
        )
    })?;
    if let Some(out) = extract {
        let n = divergent::extract_to(&bytes, &parsed, session, range, out).map_err(|e| {
            fail(
                1,
                anyhow::Error::new(e).context(format!("{}", path.display())),
            )
        })?;
        println!(
            "{n} bytes of session {session} written to {}",
            out.display()
        );
        return Ok(());
    }
    let listing = divergent::Listing::new(&path, &parsed);
    if json {
        let text = serde_json::to_string_pretty(&listing).map_err(|e| fail(1, e))?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "{resource}: side file {} ({} session(s))",
        listing.file,
        listing.sessions.len()
    );
    for s in &listing.sessions {
        println!(
            "  session {}: {} from peer {} (id {}), reason {}, generation {}, {} bytes in {} record(s){}",
            s.index,
            s.time,
            s.peer,
            s.peer_id,
            s.reason,
            s.generation,
            s.bytes,
            s.records,
            if s.complete {
                ""
            } else {
                ", INCOMPLETE (interrupted save)"
            }
        );
        for (o, l) in &s.ranges {
            println!("    offset {o} length {l}");
        }
    }
    if let Some(p) = &listing.problem {
        println!("  unreadable from file offset {}: {}", p.offset, p.error);
    }
    Ok(())
}

fn certs(config: &ClusterConfig, dir: &Path) -> Result<()> {
    use common::tls::{PemPair, generate_ca, issue_cert};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca = if ca_cert.exists() {
        PemPair::read(&ca_cert, &ca_key)?
    } else {
        let ca = generate_ca("blockd cluster CA")?;
        ca.write(&ca_cert, &ca_key)?;
        println!("created {}", ca_cert.display());
        ca
    };
    let mut done = std::collections::HashSet::new();
    for r in &config.resources {
        for n in &r.nodes {
            if !done.insert(n.name.clone()) {
                continue;
            }
            let link = blockd::repl::link::LinkNode {
                name: n.name.clone(),
                id: n.id,
                address: n.address,
            };
            let mut names = vec![blockd::repl::link::certificate_name(&link)];
            let ip = n.address.ip().to_string();
            if !names.contains(&ip) {
                names.push(ip);
            }
            let pair = issue_cert(&ca, &names)?;
            let (c, k) = (
                dir.join(format!("{}.pem", n.name)),
                dir.join(format!("{}.key", n.name)),
            );
            pair.write(&c, &k)?;
            println!("issued {} for {}", c.display(), names.join(", "));
        }
    }
    Ok(())
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
