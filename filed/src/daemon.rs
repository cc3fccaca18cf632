//! `filed daemon`: the listener plus automatic sync. The watcher's events are gathered per group
//! ([`crate::batch`], default 200 ms), each batch is scanned under the group lock — events on
//! paths that are exactly what filed itself wrote ([`crate::written`]) are dropped first — and the
//! changes go out through one runner per (group, peer), which never runs two sessions at once.
//! Nothing is missed: the daemon checks every group fully at start (what changed while it was
//! down), after lost events (queue overflow, watch limit: with a warning) and periodically
//! (default hourly). Include roots that are missing, removed, replaced or mounted over are watched
//! again as soon as they are back (and scanned deep at once); a peer that cannot be reached is retried with backoff, and a session it
//! starts itself (it is back) wakes the runner for it at once. On shutdown the batch and the
//! sessions in flight finish first.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::batch::{Batcher, Pending};
use crate::commands::session_with;
use crate::config::Group;
use crate::node::Node;
use crate::scan::{ScanOptions, ScanPath, ScanReport, scan_group, scan_paths};
use crate::server::{self, ServeError};
use crate::session::{ServeOptions, error_chain, record_failure};
use crate::watch::{RootMap, Watch, WatchEvent};
use crate::written::{FileId, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot start the file watcher")]
    Watch(#[source] notify::Error),
}

/// Settings of a running daemon (from `[daemon]` and the command line).
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub batch_delay: Duration,
    pub full_check_interval: Duration,
    pub retry_max: Duration,
}

impl From<&crate::config::DaemonConfig> for DaemonOptions {
    fn from(c: &crate::config::DaemonConfig) -> Self {
        DaemonOptions {
            batch_delay: c.batch_delay,
            full_check_interval: c.full_check_interval,
            retry_max: c.retry_max,
        }
    }
}

/// The handle of one runner: wake it; is its peer unreachable?
#[derive(Default)]
struct RunnerHandle {
    wake: Notify,
    failing: std::sync::atomic::AtomicBool,
}

/// The runner of each (group, peer).
type Runners = Arc<HashMap<(String, String), Arc<RunnerHandle>>>;

fn wake_group(runners: &Runners, group: &str, except: Option<&str>) {
    for ((g, p), h) in runners.iter() {
        if g == group && Some(p.as_str()) != except {
            h.wake.notify_one();
        }
    }
}

/// Runs until `shutdown` resolves, then lets the batch and sessions in flight finish.
pub async fn run(
    node: Arc<Node>,
    listener: TcpListener,
    control: Option<UnixListener>,
    metrics: Option<TcpListener>,
    opts: DaemonOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    // One runner per (group, peer) this host sends to (a slave sends nothing).
    let mut map = HashMap::new();
    for g in node.my_groups() {
        if g.is_slave(&node.me.name) {
            continue;
        }
        for p in g.peers_of(&node.me.name) {
            map.insert((g.name.clone(), p), Arc::new(RunnerHandle::default()));
        }
    }
    let runners: Runners = Arc::new(map);
    {
        let runners = runners.clone();
        node.enable_daemon(Box::new(move |r| {
            // Received changes are queued for the other peers: send them on.
            if !r.pulled.is_empty() || !r.renamed.is_empty() {
                wake_group(&runners, &r.group, Some(&r.peer));
            }
            // An unreachable peer started a session: it is back; send it what waits for it now
            // (only then: a conflict stays queued and must not make two runners ping-pong).
            if !r.initiator
                && let Some(h) = runners.get(&(r.group.clone(), r.peer.clone()))
                && h.failing.load(std::sync::atomic::Ordering::Relaxed)
            {
                h.wake.notify_one();
            }
        }));
    }
    let (stop_tx, stop_rx) = watch::channel(false);

    // The watcher starts before the first full check, so nothing between them is missed.
    let (tx, rx) = mpsc::unbounded_channel();
    let roots = RootMap::new(&node.me, node.my_groups());
    let (watch, watch_errors) = Watch::start(roots, tx).map_err(DaemonError::Watch)?;
    for e in &watch_errors {
        tracing::warn!(error = %e, "watch incomplete; relying on rescans and the periodic check");
    }
    let watch = Arc::new(std::sync::Mutex::new(watch));

    let mut tasks = tokio::task::JoinSet::new();
    for (g, p) in runners.keys() {
        let handle = runners[&(g.clone(), p.clone())].clone();
        tasks.spawn(runner(
            node.clone(),
            g.clone(),
            p.clone(),
            handle,
            opts.retry_max,
            stop_rx.clone(),
        ));
    }
    tasks.spawn(watch_loop(
        node.clone(),
        watch.clone(),
        rx,
        runners.clone(),
        opts.clone(),
        stop_rx.clone(),
    ));
    let metrics_task = metrics.map(|l| {
        tracing::info!(addr = ?l.local_addr().ok(), "metrics endpoint");
        tokio::spawn(crate::metrics::serve(node.clone(), l))
    });

    let serve_opts = ServeOptions {
        scan_first: false,
        scan_entries: true,
        busy_wait: Duration::from_secs(1),
        ..ServeOptions::default()
    };
    let mut stop_rx2 = stop_rx.clone();
    let serve = server::serve(node.clone(), listener, control, serve_opts, async move {
        let _ = stop_rx2.wait_for(|s| *s).await;
    });
    tokio::pin!(serve);
    tokio::pin!(shutdown);
    let served = tokio::select! {
        r = &mut serve => Some(r),
        _ = &mut shutdown => None,
    };
    tracing::info!("stopping: finishing the batch and sessions in flight");
    let _ = stop_tx.send(true);
    let served = match served {
        Some(r) => r,
        None => serve.await,
    };
    while tasks.join_next().await.is_some() {}
    if let Some(t) = metrics_task {
        t.abort();
    }
    drop(watch);
    tracing::info!("stopped");
    served.map_err(DaemonError::from)
}

/// Sends what is queued for one peer, one session at a time.
async fn runner(
    node: Arc<Node>,
    group: String,
    peer: String,
    handle: Arc<RunnerHandle>,
    retry_max: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(g) = node.group(&group).cloned() else {
        return;
    };
    let mut retry: Option<Duration> = None;
    let mut failing = false;
    loop {
        let wait = retry.unwrap_or(Duration::from_secs(3600 * 24 * 365));
        tokio::select! {
            _ = handle.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if *stop.borrow() {
            return;
        }
        match node.store.dirty_len(&group, &peer) {
            Ok(0) => {
                retry = None;
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(%group, %peer, error = %error_chain(&e), "reading the queue failed");
                retry = Some(retry_max);
                continue;
            }
        }
        match session_with(&node, &g, &peer).await {
            Ok(r) => {
                if failing {
                    tracing::info!(%group, %peer, "peer reachable again");
                }
                failing = false;
                handle
                    .failing
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(%group, %peer, sent = r.pushed.len() + r.renamed.len(), received = r.pulled.len(),
                    conflicts = r.conflicts.len(), errors = r.errors.len(), bytes_out = r.bytes_sent, "synced");
                for e in &r.errors {
                    tracing::warn!(%group, %peer, error = %e, "path not synced; retrying");
                }
                // Paths that failed stay queued: try again soon (a local change that raced the
                // session is decided again once the watcher recorded it).
                // Persistent failures back off like an unreachable peer.
                retry = (!r.errors.is_empty()).then(|| {
                    retry
                        .map(|d| (d * 2).min(retry_max))
                        .unwrap_or(Duration::from_secs(1))
                });
            }
            Err(e) => {
                node.stats.failure(&group, &peer);
                record_failure(&node, &group, &peer, &e);
                let next = retry
                    .map(|d| (d * 2).min(retry_max))
                    .unwrap_or(Duration::from_secs(1));
                if failing {
                    tracing::debug!(%group, %peer, error = %e, retry_in = ?next, "peer still unreachable");
                } else {
                    tracing::warn!(%group, %peer, error = %e, retry_in = ?next, "peer unreachable; changes stay queued");
                }
                failing = true;
                handle
                    .failing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                retry = Some(next);
            }
        }
    }
}

/// How often the include roots are stat'ed, to watch again one that came back without an event
/// the watches could see (a mount on top of it, a parent directory replaced).
const ROOT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Whether the include roots must be checked before the next batch.
#[derive(Default)]
struct RootCheck {
    due: bool,
    dropped: Vec<std::path::PathBuf>,
}

/// Gathers watch events into batches per group and scans them; full checks at start, after lost
/// events and periodically; re-arms the watch of include roots that came back.
async fn watch_loop(
    node: Arc<Node>,
    watch: Arc<std::sync::Mutex<Watch>>,
    mut rx: mpsc::UnboundedReceiver<WatchEvent>,
    runners: Runners,
    opts: DaemonOptions,
    mut stop: watch::Receiver<bool>,
) {
    let groups: Vec<Group> = node.my_groups().into_iter().cloned().collect();
    let mut batchers: HashMap<String, Batcher> = groups
        .iter()
        .map(|g| (g.name.clone(), Batcher::new(opts.batch_delay)))
        .collect();
    // What changed while the daemon was down; the queues kept from before go out too.
    for g in &groups {
        full_check(&node, g, &runners, None).await;
        wake_group(&runners, &g.name, None);
    }
    let mut next_full = Instant::now() + opts.full_check_interval;
    let mut next_roots = Instant::now() + ROOT_CHECK_INTERVAL;
    let mut roots = RootCheck::default();
    let mut open = true;
    loop {
        let deadline = batchers
            .values()
            .filter_map(|b| b.deadline())
            .min()
            .map(Instant::from_std)
            .unwrap_or(next_full)
            .min(next_full)
            .min(next_roots);
        tokio::select! {
            ev = rx.recv(), if open => match ev {
                Some(ev) => {
                    let now = std::time::Instant::now();
                    add_event(&node, &mut batchers, &mut roots, now, ev);
                    while let Ok(ev) = rx.try_recv() {
                        add_event(&node, &mut batchers, &mut roots, now, ev);
                    }
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(deadline) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if roots.due || Instant::now() >= next_roots {
            let dropped = std::mem::take(&mut roots).dropped;
            let w = watch.clone();
            // Bounded: a root whose stat hangs is skipped after ROOT_STAT_LIMIT; stop is still
            // obeyed while the check runs.
            let check = tokio::task::spawn_blocking(move || {
                w.lock().expect("lock poisoned").check_roots(&dropped)
            });
            let checked = tokio::select! {
                r = check => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match checked {
                Ok(report) => {
                    let now = std::time::Instant::now();
                    for r in &report.slow {
                        tracing::warn!(
                            root = %r.display(),
                            limit = ?crate::watch::ROOT_STAT_LIMIT,
                            "include root does not answer a stat (a hung mount?); skipped this round"
                        );
                    }
                    for e in &report.errors {
                        tracing::warn!(error = %e, "watch incomplete; relying on the periodic check");
                    }
                    for r in &report.gone {
                        tracing::warn!(root = %r.display(), "include root is gone; waiting for it to come back");
                    }
                    for ev in report.lost {
                        add_event(&node, &mut batchers, &mut roots, now, ev);
                    }
                    for (group, logical) in report.appeared {
                        tracing::info!(%group, root = %logical, "include root is back; watching and scanning it");
                        add_event(
                            &node,
                            &mut batchers,
                            &mut roots,
                            now,
                            WatchEvent::Changed {
                                group,
                                logical,
                                deep: true,
                            },
                        );
                    }
                }
                Err(e) => tracing::error!(error = %e, "checking the include roots panicked"),
            }
            next_roots = Instant::now() + ROOT_CHECK_INTERVAL;
        }
        let now = std::time::Instant::now();
        for g in &groups {
            let Some(b) = batchers.get_mut(&g.name) else {
                continue;
            };
            if let Some(p) = b.take(now) {
                process(&node, g, p, &runners).await;
            }
        }
        if Instant::now() >= next_full {
            for g in &groups {
                full_check(&node, g, &runners, None).await;
            }
            next_full = Instant::now() + opts.full_check_interval;
        }
        if *stop.borrow() {
            return;
        }
    }
}

fn add_event(
    node: &Node,
    batchers: &mut HashMap<String, Batcher>,
    roots: &mut RootCheck,
    now: std::time::Instant,
    ev: WatchEvent,
) {
    match ev {
        WatchEvent::RootsMoved { dropped } => {
            roots.due = true;
            roots.dropped.extend(dropped);
        }
        WatchEvent::Changed {
            group,
            logical,
            deep,
        } => {
            if let Some(b) = batchers.get_mut(&group) {
                b.add(now, logical, deep);
            }
        }
        WatchEvent::Lost { group, reason } => {
            tracing::warn!(group = group.as_deref().unwrap_or("(all)"), %reason, "events lost; rescanning");
            let overflow = reason.contains("overflow");
            for (g, b) in batchers.iter_mut() {
                if group.as_ref().is_none_or(|x| x == g) {
                    b.rescan(now);
                    if !overflow {
                        node.stats.group(g, |c| c.watch_errors += 1);
                    }
                }
            }
        }
    }
}

fn dirty_peers(node: &Node, g: &Group) -> Vec<String> {
    if g.is_slave(&node.me.name) {
        Vec::new()
    } else {
        g.peers_of(&node.me.name)
    }
}

fn log_scan(g: &Group, what: &str, r: &ScanReport) {
    for e in &r.errors {
        tracing::warn!(group = %g.name, error = %e, "scan");
    }
    if r.changes() > 0 {
        tracing::info!(group = %g.name, new = r.new.len(), changed = r.changed.len(), deleted = r.deleted.len(),
            renamed = r.renamed.len(), "{what}");
    }
}

/// A full check of a group under its lock; wakes its runners when something changed.
async fn full_check(node: &Arc<Node>, g: &Group, runners: &Runners, reason: Option<&str>) {
    let lock = node.group_lock(&g.name);
    let _guard = lock.lock().await;
    node.stats.group(&g.name, |c| {
        c.full_checks += 1;
        if reason.is_some() {
            c.rescans += 1;
        }
    });
    if let Some(log) = node.written.lock().expect("lock poisoned").as_mut() {
        log.clear_group(&g.name);
    }
    let (n, g2, peers) = (node.clone(), g.clone(), dirty_peers(node, g));
    let r = tokio::task::spawn_blocking(move || {
        scan_group(
            n.store.as_ref(),
            &n.me,
            &g2,
            &peers,
            None,
            ScanOptions::default(),
        )
    })
    .await;
    match r {
        Ok(Ok(r)) => {
            log_scan(g, reason.unwrap_or("full check"), &r);
            node.stats
                .group(&g.name, |c| c.changes += r.changes() as u64);
            if r.changes() > 0 {
                wake_group(runners, &g.name, None);
            }
        }
        Ok(Err(e)) => {
            tracing::error!(group = %g.name, error = %error_chain(&e), "full check failed")
        }
        Err(e) => tracing::error!(group = %g.name, error = %e, "full check panicked"),
    }
}

/// One batch of a group: drop filed's own writes, scan the rest, wake the runners.
async fn process(node: &Arc<Node>, g: &Group, p: Pending, runners: &Runners) {
    node.stats.group(&g.name, |c| {
        c.batches += 1;
        c.events += p.events;
    });
    if p.rescan {
        full_check(node, g, runners, Some("rescan after lost events")).await;
        return;
    }
    let lock = node.group_lock(&g.name);
    let _guard = lock.lock().await;
    let roots = g.filter.roots();
    let in_group = |l: &str| roots.iter().any(|r| crate::filter::is_under(l, r));
    let mut paths = Vec::with_capacity(p.paths.len());
    let mut suppressed = 0u64;
    {
        let mut log = node.written.lock().expect("lock poisoned");
        for (logical, deep) in p.paths {
            let verdict = match (log.as_mut(), node.me.physical(&logical)) {
                (Some(log), Some(phys)) if !log.is_empty() => {
                    let now = FileId::of_path(&phys).ok().flatten();
                    log.check(&g.name, &logical, now)
                }
                _ => Verdict::NotOurs,
            };
            if verdict == Verdict::Own {
                suppressed += 1;
                continue;
            }
            // A child created, removed or renamed changes its directory's mtime.
            if let Some(i) = logical.rfind('/').filter(|&i| i > 0) {
                let parent = &logical[..i];
                if in_group(parent) {
                    paths.push(ScanPath {
                        logical: parent.to_string(),
                        deep: false,
                        rehash: false,
                    });
                }
            }
            paths.push(ScanPath {
                logical,
                deep,
                rehash: verdict == Verdict::ChangedSince,
            });
        }
    }
    node.stats.group(&g.name, |c| c.suppressed += suppressed);
    if paths.is_empty() {
        tracing::debug!(group = %g.name, suppressed, "batch: only filed's own writes");
        return;
    }
    let (n, g2, peers) = (node.clone(), g.clone(), dirty_peers(node, g));
    let count = paths.len();
    let t0 = std::time::Instant::now();
    let r = tokio::task::spawn_blocking(move || {
        scan_paths(n.store.as_ref(), &n.me, &g2, &peers, paths)
    })
    .await;
    match r {
        Ok(Ok(r)) => {
            tracing::debug!(group = %g.name, paths = count, suppressed, changes = r.changes(),
                ms = t0.elapsed().as_millis() as u64, "batch scanned");
            log_scan(g, "local changes", &r);
            node.stats
                .group(&g.name, |c| c.changes += r.changes() as u64);
            if r.changes() > 0 {
                wake_group(runners, &g.name, None);
            }
        }
        Ok(Err(e)) => tracing::error!(group = %g.name, error = %error_chain(&e), "scan failed"),
        Err(e) => tracing::error!(group = %g.name, error = %e, "scan panicked"),
    }
}
