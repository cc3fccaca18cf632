//! The CLI commands that use the state database (`sync`, `check`, `dirty`, `compare`, `resolve`,
//! `force`, `status`, `ls-conflicts`), as one function from a [`Command`] to an [`Outcome`] (text
//! and exit code), so the same code runs in the CLI process or, while `filed serve` holds the
//! database, inside the server via its control socket.
//!
//! Exit codes: 0 success (in sync, nothing pending); 1 error (configuration, database, usage);
//! 2 conflicts remain; 3 partial failure (a peer unreachable or some paths failed);
//! 4 differences pending (`dirty`: entries queued; `compare`: trees differ).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::Group;
use crate::entry::{FileState, Kind};
use crate::node::Node;
use crate::scan::{ScanOptions, ScanReport, scan_group};
use crate::session::{self, SessionError, SessionReport, error_chain, record_failure};
use crate::store::{Batch, Force, Op};
use crate::transport;

pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_CONFLICTS: i32 = 2;
pub const EXIT_PARTIAL: i32 = 3;
pub const EXIT_PENDING: i32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Keep {
    Local,
    Remote,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    Sync {
        group: Option<String>,
        peers: Vec<String>,
    },
    Check {
        group: Option<String>,
        rehash: bool,
        /// Scan include roots found empty though files are recorded under them.
        #[serde(default)]
        allow_empty_roots: bool,
    },
    Dirty {
        group: Option<String>,
    },
    Compare {
        group: Option<String>,
        peer: Option<String>,
    },
    Resolve {
        path: String,
        keep: Keep,
    },
    Force {
        path: String,
    },
    Status {
        json: bool,
    },
    LsConflicts {
        json: bool,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub code: i32,
    pub output: String,
}

impl Outcome {
    fn error(out: String, msg: impl std::fmt::Display) -> Outcome {
        let mut output = out;
        let _ = writeln!(output, "error: {msg}");
        Outcome {
            code: EXIT_ERROR,
            output,
        }
    }
}

pub async fn run(node: &Node, cmd: &Command) -> Outcome {
    match cmd {
        Command::Sync { group, peers } => sync(node, group.as_deref(), peers).await,
        Command::Check {
            group,
            rehash,
            allow_empty_roots,
        } => {
            let opts = ScanOptions {
                rehash: *rehash,
                allow_empty_roots: *allow_empty_roots,
            };
            check(node, group.as_deref(), opts).await
        }
        Command::Dirty { group } => dirty(node, group.as_deref()),
        Command::Compare { group, peer } => compare(node, group.as_deref(), peer.as_deref()).await,
        Command::Resolve { path, keep } => resolve(node, path, *keep).await,
        Command::Force { path } => force(node, path),
        Command::Status { json } => status(node, *json),
        Command::LsConflicts { json } => ls_conflicts(node, *json),
    }
}

fn groups<'a>(node: &'a Node, group: Option<&str>) -> Result<Vec<&'a Group>, String> {
    match group {
        Some(g) => node.group(g).map(|g| vec![g]).map_err(|e| e.to_string()),
        None => Ok(node.my_groups()),
    }
}

/// Peers that get this host's changes marked dirty (a slave marks none: it never sends).
fn dirty_peers(node: &Node, g: &Group) -> Vec<String> {
    if g.is_slave(&node.me.name) {
        Vec::new()
    } else {
        g.peers_of(&node.me.name)
    }
}

/// Scans group `g` on a blocking thread: a scan of a large tree (or of a slow mount) must not
/// hold a runtime worker, which would stall the daemon's sessions and watcher meanwhile.
async fn scan_one(node: &Node, g: &Group, opts: ScanOptions) -> Result<ScanReport, String> {
    let t0 = std::time::Instant::now();
    let (store, me, group) = (node.store.clone(), node.me.clone(), g.clone());
    let peers = dirty_peers(node, g);
    let r = tokio::task::spawn_blocking(move || {
        scan_group(store.as_ref(), &me, &group, &peers, None, opts).map_err(|e| error_chain(&e))
    })
    .await
    .unwrap_or_else(|e| Err(format!("scan task failed: {e}")));
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::debug!(group = %g.name, ms = format!("{ms:.1}"), "scan");
    r
}

fn print_scan(out: &mut String, g: &Group, r: &ScanReport) {
    let renamed_to: std::collections::HashSet<&String> = r.renamed.iter().map(|(_, t)| t).collect();
    let renamed_from: std::collections::HashSet<&String> =
        r.renamed.iter().map(|(f, _)| f).collect();
    for p in r.new.iter().filter(|p| !renamed_to.contains(p)) {
        let _ = writeln!(out, "{}: new      {p}", g.name);
    }
    for p in &r.changed {
        let _ = writeln!(out, "{}: changed  {p}", g.name);
    }
    for p in r.deleted.iter().filter(|p| !renamed_from.contains(p)) {
        let _ = writeln!(out, "{}: deleted  {p}", g.name);
    }
    for (f, t) in &r.renamed {
        let _ = writeln!(out, "{}: renamed  {f} -> {t}", g.name);
    }
    for e in &r.errors {
        let _ = writeln!(out, "{}: warning  {e}", g.name);
    }
}

async fn check(node: &Node, group: Option<&str>, opts: ScanOptions) -> Outcome {
    let mut out = String::new();
    let gs = match groups(node, group) {
        Ok(g) => g,
        Err(e) => return Outcome::error(out, e),
    };
    let mut code = EXIT_OK;
    for g in gs {
        let lock = node.group_lock(&g.name);
        let _guard = lock.lock().await;
        match scan_one(node, g, opts).await {
            Ok(r) => {
                print_scan(&mut out, g, &r);
                let _ = writeln!(
                    out,
                    "{}: {} changes, {} unchanged, {} hashed",
                    g.name,
                    r.changes(),
                    r.unchanged,
                    r.hashed
                );
                if !r.errors.is_empty() {
                    code = EXIT_PARTIAL;
                }
            }
            Err(e) => return Outcome::error(out, format!("{}: {e}", g.name)),
        }
    }
    Outcome { code, output: out }
}

/// One session with `peer` for `g` (retrying a few times while the peer answers "busy").
pub async fn session_with(node: &Node, g: &Group, peer: &str) -> Result<SessionReport, String> {
    let settings = node.client_settings().map_err(|e| error_chain(&e))?;
    let key = node.group_key(g).map_err(|e| error_chain(&e))?;
    let host = node
        .config
        .hosts
        .get(peer)
        .ok_or_else(|| format!("no host {peer}"))?;
    let mut attempt = 0;
    loop {
        let res = async {
            let mut conn = transport::connect(&host.address, &settings, &g.name, &key, peer)
                .await
                .map_err(|source| SessionError::Transport {
                    peer: peer.to_string(),
                    source,
                })?;
            let lock = node.group_lock(&g.name);
            let _guard = lock.lock().await;
            let r = session::run_client(node, g, &mut conn).await;
            let _ = conn.close().await;
            r
        }
        .await;
        match res {
            Err(SessionError::Refused { message, .. })
                if message.starts_with("busy") && attempt < 5 =>
            {
                attempt += 1;
                let ms = 100 + (rand_u64() % 900);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            Err(e) => return Err(error_chain(&e)),
            Ok(r) => {
                // After the group lock is released: a slow action must not make the group busy.
                crate::actions::run_after_session(&node.me, g, &r.pulled, &r.pushed).await;
                return Ok(r);
            }
        }
    }
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(7)
        ^ u64::from(std::process::id())
}

fn print_session(out: &mut String, r: &SessionReport) {
    let tag = format!("{} <-> {}", r.group, r.peer);
    for p in &r.pushed {
        let _ = writeln!(out, "{tag}: sent     {p}");
    }
    for p in &r.pulled {
        let _ = writeln!(out, "{tag}: received {p}");
    }
    for (f, t) in &r.renamed {
        let _ = writeln!(out, "{tag}: renamed  {f} -> {t}");
    }
    for p in &r.conflicts {
        let _ = writeln!(out, "{tag}: CONFLICT {p}");
    }
    for p in &r.held {
        let _ = writeln!(out, "{tag}: held     {p} (a slave's change)");
    }
    for e in &r.errors {
        let _ = writeln!(out, "{tag}: error    {e}");
    }
    let _ = writeln!(
        out,
        "{tag}: {} sent, {} received, {} renamed, {} in sync, {} conflicts, {} errors; {} bytes out, {} bytes in",
        r.pushed.len(),
        r.pulled.len(),
        r.renamed.len(),
        r.in_sync,
        r.conflicts.len(),
        r.errors.len(),
        r.bytes_sent,
        r.bytes_received
    );
}

/// `filed sync` (csync2 -x): check, then exchange changes with every (or the given) peer.
pub async fn sync(node: &Node, group: Option<&str>, only_peers: &[String]) -> Outcome {
    let mut out = String::new();
    let gs = match groups(node, group) {
        Ok(g) => g,
        Err(e) => return Outcome::error(out, e),
    };
    let (mut partial, mut conflicts) = (false, false);
    for g in gs {
        {
            let lock = node.group_lock(&g.name);
            let _guard = lock.lock().await;
            match scan_one(node, g, ScanOptions::default()).await {
                Ok(r) => print_scan(&mut out, g, &r),
                Err(e) => return Outcome::error(out, format!("{}: {e}", g.name)),
            }
        }
        for peer in g.peers_of(&node.me.name) {
            if !only_peers.is_empty() && !only_peers.contains(&peer) {
                continue;
            }
            match session_with(node, g, &peer).await {
                Ok(r) => {
                    print_session(&mut out, &r);
                    partial |= !r.errors.is_empty();
                    conflicts |= !r.conflicts.is_empty();
                }
                Err(e) => {
                    let _ = writeln!(out, "{} <-> {peer}: unreachable or failed: {e}", g.name);
                    record_failure(node, &g.name, &peer, &e);
                    partial = true;
                }
            }
        }
    }
    let code = if partial {
        EXIT_PARTIAL
    } else if conflicts {
        EXIT_CONFLICTS
    } else {
        EXIT_OK
    };
    Outcome { code, output: out }
}

/// `filed dirty` (csync2 -M): what waits to be sent, per peer.
fn dirty(node: &Node, group: Option<&str>) -> Outcome {
    let mut out = String::new();
    let gs = match groups(node, group) {
        Ok(g) => g,
        Err(e) => return Outcome::error(out, e),
    };
    let mut any = false;
    for g in gs {
        for peer in g.peers_of(&node.me.name) {
            match node.store.dirty(&g.name, &peer) {
                Ok(list) => {
                    for d in list {
                        any = true;
                        let mark = match d.force {
                            Force::None => "",
                            Force::Win => "\t(forced: wins)",
                            Force::Lose => "\t(forced: loses)",
                        };
                        let _ = writeln!(out, "{}\t{peer}\t{}{mark}", g.name, d.path);
                    }
                }
                Err(e) => return Outcome::error(out, error_chain(&e)),
            }
        }
    }
    Outcome {
        code: if any { EXIT_PENDING } else { EXIT_OK },
        output: out,
    }
}

fn describe(s: &FileState) -> String {
    match s.kind {
        Kind::File => format!(
            "file {} bytes mode {:o} mtime {} hash {}",
            s.size,
            s.mode,
            s.mtime_ns,
            s.hash_hex()
        ),
        Kind::Dir => format!("dir mode {:o} mtime {}", s.mode, s.mtime_ns),
        Kind::Symlink => format!("symlink -> {}", s.target.as_deref().unwrap_or("")),
        Kind::Deleted => "deleted".into(),
    }
}

/// `filed compare` (csync2 -T): both trees freshly scanned, then compared path by path.
/// X = content or type differs, M = only metadata differs, L = only here, R = only on the peer.
async fn compare(node: &Node, group: Option<&str>, only_peer: Option<&str>) -> Outcome {
    let mut out = String::new();
    let gs = match groups(node, group) {
        Ok(g) => g,
        Err(e) => return Outcome::error(out, e),
    };
    let settings = match node.client_settings() {
        Ok(s) => s,
        Err(e) => return Outcome::error(out, error_chain(&e)),
    };
    let (mut diffs, mut partial) = (false, false);
    for g in gs {
        {
            let lock = node.group_lock(&g.name);
            let _guard = lock.lock().await;
            if let Err(e) = scan_one(node, g, ScanOptions::default()).await {
                return Outcome::error(out, e);
            }
        }
        let local: BTreeMap<String, FileState> = match node.store.files(&g.name) {
            Ok(f) => f.into_iter().filter(|(_, s)| s.exists()).collect(),
            Err(e) => return Outcome::error(out, error_chain(&e)),
        };
        for peer in g.peers_of(&node.me.name) {
            if only_peer.is_some_and(|p| p != peer) {
                continue;
            }
            let listing = async {
                let key = node.group_key(g).map_err(|e| error_chain(&e))?;
                let host = node.config.hosts.get(&peer).ok_or("unknown host")?;
                let mut conn = transport::connect(&host.address, &settings, &g.name, &key, &peer)
                    .await
                    .map_err(|e| error_chain(&e))?;
                let l = session::fetch_listing(node, g, &mut conn)
                    .await
                    .map_err(|e| error_chain(&e));
                let _ = conn.close().await;
                l
            }
            .await;
            let remote: BTreeMap<String, FileState> = match listing {
                Ok(l) => l.into_iter().map(|(p, s, _)| (p, s)).collect(),
                Err(e) => {
                    let _ = writeln!(out, "{} <-> {peer}: unreachable or failed: {e}", g.name);
                    partial = true;
                    continue;
                }
            };
            let me = &node.me.name;
            let mut paths: Vec<&String> = local.keys().chain(remote.keys()).collect();
            paths.sort();
            paths.dedup();
            for p in paths {
                let line = match (local.get(p), remote.get(p)) {
                    (Some(l), Some(r)) if l.same(r) => continue,
                    (Some(l), Some(r)) if l.same_content(r) => {
                        if l.kind == Kind::Dir
                            && l.mode == r.mode
                            && l.uid == r.uid
                            && l.gid == r.gid
                        {
                            continue; // directory mtimes differ by nature while files change
                        }
                        format!(
                            "M\t{me}\t{peer}\t{p}\n\t{me}: {}\n\t{peer}: {}",
                            describe(l),
                            describe(r)
                        )
                    }
                    (Some(l), Some(r)) => format!(
                        "X\t{me}\t{peer}\t{p}\n\t{me}: {}\n\t{peer}: {}",
                        describe(l),
                        describe(r)
                    ),
                    (Some(_), None) => format!("L\t{me}\t{peer}\t{p}"),
                    (None, Some(_)) => format!("R\t{me}\t{peer}\t{p}"),
                    (None, None) => continue,
                };
                diffs = true;
                let _ = writeln!(out, "{line}");
            }
        }
    }
    let code = if partial {
        EXIT_PARTIAL
    } else if diffs {
        EXIT_PENDING
    } else {
        EXIT_OK
    };
    Outcome { code, output: out }
}

/// Maps a user-given path (logical `%prefix%/..`, or a path on this host) to (group, logical path).
pub fn logical_path<'a>(node: &'a Node, arg: &str) -> Option<(&'a Group, String)> {
    let arg = if arg.len() > 1 {
        arg.trim_end_matches('/')
    } else {
        arg
    };
    for g in node.my_groups() {
        if arg.starts_with('%') {
            if g.filter.check(arg).is_ok() {
                return Some((g, arg.to_string()));
            }
            continue;
        }
        for root in g.filter.roots() {
            let Some(phys) = node.me.physical(&root) else {
                continue;
            };
            let phys = phys.to_string_lossy().into_owned();
            let rest = if arg == phys {
                Some("")
            } else {
                arg.strip_prefix(&phys).filter(|r| r.starts_with('/'))
            };
            if let Some(rest) = rest {
                let logical = format!("{root}{rest}");
                if g.filter.check(&logical).is_ok() {
                    return Some((g, logical));
                }
            }
        }
    }
    None
}

/// `filed resolve PATH --keep local|remote`: marks the chosen side to win and syncs it now.
async fn resolve(node: &Node, path: &str, keep: Keep) -> Outcome {
    let mut out = String::new();
    let Some((g, logical)) = logical_path(node, path) else {
        return Outcome::error(
            out,
            format!("{path} is not inside any group of {}", node.me.name),
        );
    };
    let conflicts = match node.store.conflicts(Some(&g.name)) {
        Ok(c) => c
            .into_iter()
            .filter(|c| c.path == logical)
            .collect::<Vec<_>>(),
        Err(e) => return Outcome::error(out, error_chain(&e)),
    };
    if conflicts.is_empty() {
        return Outcome::error(out, format!("no recorded conflict on {logical}"));
    }
    let force = if keep == Keep::Local {
        Force::Win
    } else {
        Force::Lose
    };
    let mut b = Batch::new();
    let mut peers = Vec::new();
    for c in &conflicts {
        b.push(Op::MarkDirty {
            group: g.name.clone(),
            peer: c.peer.clone(),
            path: logical.clone(),
            force,
        });
        peers.push(c.peer.clone());
    }
    if let Err(e) = node.store.commit(b) {
        return Outcome::error(out, error_chain(&e));
    }
    let _ = writeln!(
        out,
        "{logical}: keeping the {} version; syncing with {}",
        if keep == Keep::Local {
            "local"
        } else {
            "remote"
        },
        peers.join(", ")
    );
    let r = sync(node, Some(&g.name), &peers).await;
    out.push_str(&r.output);
    Outcome {
        code: r.code,
        output: out,
    }
}

/// `filed force PATH` (csync2 -f): this host's version wins the next sync with every peer.
fn force(node: &Node, path: &str) -> Outcome {
    let mut out = String::new();
    let Some((g, logical)) = logical_path(node, path) else {
        return Outcome::error(
            out,
            format!("{path} is not inside any group of {}", node.me.name),
        );
    };
    let mut b = Batch::new();
    for peer in g.peers_of(&node.me.name) {
        b.push(Op::MarkDirty {
            group: g.name.clone(),
            peer,
            path: logical.clone(),
            force: Force::Win,
        });
    }
    if let Err(e) = node.store.commit(b) {
        return Outcome::error(out, error_chain(&e));
    }
    let _ = writeln!(
        out,
        "{logical}: this host's version wins the next `filed sync`"
    );
    Outcome {
        code: EXIT_OK,
        output: out,
    }
}

fn fmt_time(ns: i64) -> String {
    if ns == 0 {
        return "never".into();
    }
    let secs = ns / 1_000_000_000;
    let ago = crate::entry::now_ns() / 1_000_000_000 - secs;
    format!("{secs} ({ago}s ago)")
}

/// `filed status [--json]`: per group and peer the queue length, last sync, conflicts and errors.
fn status(node: &Node, json: bool) -> Outcome {
    let mut out = String::new();
    let mut groups_json = Vec::new();
    for g in node.my_groups() {
        let conflicts = match node.store.conflicts(Some(&g.name)) {
            Ok(c) => c,
            Err(e) => return Outcome::error(out, error_chain(&e)),
        };
        let files = node
            .store
            .files(&g.name)
            .map(|f| f.iter().filter(|(_, s)| s.exists()).count())
            .unwrap_or(0);
        let mut peers_json = Vec::new();
        let _ = writeln!(
            out,
            "group {} ({} paths, {} conflicts, auto {:?}){}",
            g.name,
            files,
            conflicts.len(),
            g.auto,
            if g.is_slave(&node.me.name) {
                " [slave]"
            } else {
                ""
            }
        );
        for peer in g.peers_of(&node.me.name) {
            let dirty = node
                .store
                .dirty(&g.name, &peer)
                .map(|d| d.len())
                .unwrap_or(0);
            let st = node.store.peer_status(&g.name, &peer).unwrap_or_default();
            let pc = conflicts.iter().filter(|c| c.peer == peer).count();
            let _ = writeln!(
                out,
                "  peer {peer}: {dirty} queued, {pc} conflicts, last sync {}, last attempt {}{}",
                fmt_time(st.last_ok_ns),
                fmt_time(st.last_attempt_ns),
                if st.last_error.is_empty() {
                    String::new()
                } else {
                    format!(", last error: {}", st.last_error)
                }
            );
            let c = node.stats.peer_counters(&g.name, &peer);
            if node.is_daemon() {
                let _ = writeln!(
                    out,
                    "    {} syncs, {} failed; {} sent, {} received; {} bytes out, {} in; {} path errors",
                    c.sync_runs,
                    c.sync_failures,
                    c.transfers_sent,
                    c.transfers_received,
                    c.bytes_sent,
                    c.bytes_received,
                    c.path_errors
                );
            }
            peers_json.push(serde_json::json!({
                "peer": peer, "queued": dirty, "conflicts": pc,
                "last_sync_ns": st.last_ok_ns, "last_attempt_ns": st.last_attempt_ns, "last_error": st.last_error,
                "counters": c,
            }));
        }
        let wc = node.stats.group_counters(&g.name);
        if node.is_daemon() {
            let _ = writeln!(
                out,
                "  watch: {} batches, {} events, {} own writes suppressed, {} changes, {} rescans, {} full checks",
                wc.batches, wc.events, wc.suppressed, wc.changes, wc.rescans, wc.full_checks
            );
        }
        groups_json.push(serde_json::json!({
            "group": g.name, "paths": files, "conflicts": conflicts.len(), "slave": g.is_slave(&node.me.name), "peers": peers_json,
            "watch": wc,
        }));
    }
    let any_conflicts = node
        .store
        .conflicts(None)
        .map(|c| !c.is_empty())
        .unwrap_or(false);
    if json {
        out = serde_json::to_string_pretty(
            &serde_json::json!({ "host": node.me.name, "daemon": node.is_daemon(), "groups": groups_json }),
        )
        .unwrap_or_default();
        out.push('\n');
    }
    Outcome {
        code: if any_conflicts {
            EXIT_CONFLICTS
        } else {
            EXIT_OK
        },
        output: out,
    }
}

/// `filed ls-conflicts`.
fn ls_conflicts(node: &Node, json: bool) -> Outcome {
    let mut out = String::new();
    let list = match node.store.conflicts(None) {
        Ok(c) => c,
        Err(e) => return Outcome::error(out, error_chain(&e)),
    };
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|c| serde_json::json!({"group": c.group, "peer": c.peer, "path": c.path, "local": describe(&c.local), "remote": describe(&c.remote), "seen_ns": c.seen_ns}))
            .collect();
        out = serde_json::to_string_pretty(&v).unwrap_or_default();
        out.push('\n');
    } else {
        for c in &list {
            let _ = writeln!(
                out,
                "{}\t{}\t{}\n\tlocal:  {}\n\tremote: {}",
                c.group,
                c.peer,
                c.path,
                describe(&c.local),
                describe(&c.remote)
            );
        }
    }
    Outcome {
        code: if list.is_empty() {
            EXIT_OK
        } else {
            EXIT_CONFLICTS
        },
        output: out,
    }
}
