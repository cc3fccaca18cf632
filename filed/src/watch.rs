//! The recursive watch of every group's include roots (inotify through `notify`): maps each event
//! to (group, logical path, deep?) and reports lost events — a queue overflow or a watch that
//! could not be added (watch limit) — so the daemon rescans what is affected. `notify` adds a
//! watch for every directory created below a root; a directory that appears is reported "deep",
//! so the files created in it before its watch was in place are found by walking it.
//!
//! Include roots are re-armed: a root that is missing at start, removed, renamed away, replaced
//! (another inode) or covered by a mount is noticed — from the root's own events, from a
//! non-recursive watch of the nearest existing ancestor of a missing root (its creation or
//! move-in), and from a cheap periodic stat of every root ([`Watch::check_roots`]) — and watched
//! again; the daemon then scans it deep, so files created before the watch was back are found.
//!
//! Why not notify-debouncer-full: it debounces per path and walks the whole tree at start to
//! build its file-id cache; filed needs one batch per group with a latency bounded from the first
//! event (see [`crate::batch`]) and finds renames itself (same content hash).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc::UnboundedSender;

use crate::apply::TEMP_PREFIX;
use crate::config::{Group, Host};

/// What the watcher tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A path of a group changed; `deep`: walk everything below it too.
    Changed {
        group: String,
        logical: String,
        deep: bool,
    },
    /// Events may have been lost for `group` (every group: `None`): rescan.
    Lost {
        group: Option<String>,
        reason: String,
    },
    /// An include root (or an ancestor of one) was created, removed or renamed: check the roots
    /// ([`Watch::check_roots`]) and watch again what came back. `dropped`: roots that were
    /// removed or renamed away themselves (their watch is gone or follows the old directory).
    RootsMoved { dropped: Vec<PathBuf> },
}

/// Include roots on this host: physical directory → (group, logical root).
#[derive(Debug, Clone, Default)]
pub struct RootMap {
    roots: Vec<(PathBuf, String, String)>,
}

impl RootMap {
    pub fn new<'a>(host: &Host, groups: impl IntoIterator<Item = &'a Group>) -> RootMap {
        let mut roots = Vec::new();
        for g in groups {
            for r in g.filter.roots() {
                if let Some(p) = host.physical(&r) {
                    roots.push((p, g.name.clone(), r));
                }
            }
        }
        roots.sort_by(|a, b| b.0.cmp(&a.0));
        RootMap { roots }
    }

    /// The physical directories to watch (each once).
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut d: Vec<PathBuf> = self.roots.iter().map(|(p, _, _)| p.clone()).collect();
        d.sort();
        d.dedup();
        d
    }

    /// The groups and logical paths a physical path belongs to.
    pub fn map(&self, phys: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (root, group, logical) in &self.roots {
            let Ok(rest) = phys.strip_prefix(root) else {
                continue;
            };
            let mut l = logical.clone();
            let mut ok = true;
            for c in rest.components() {
                match c {
                    Component::Normal(n) => match n.to_str() {
                        Some(n) => {
                            if !l.ends_with('/') {
                                l.push('/');
                            }
                            l.push_str(n);
                        }
                        None => ok = false,
                    },
                    _ => ok = false,
                }
            }
            if ok && !out.iter().any(|(g, _)| g == group) {
                out.push((group.clone(), l));
            }
        }
        out
    }

    /// Whether `phys` is one of the physical include roots.
    pub fn is_root(&self, phys: &Path) -> bool {
        self.roots.iter().any(|(p, _, _)| p == phys)
    }

    /// Whether `phys` is an include root or one of its ancestors.
    pub fn leads_to_root(&self, phys: &Path) -> bool {
        self.roots.iter().any(|(p, _, _)| p.starts_with(phys))
    }

    /// The (group, logical root) pairs of one physical root directory.
    pub fn roots_at(&self, phys: &Path) -> Vec<(String, String)> {
        self.roots
            .iter()
            .filter(|(p, _, _)| p == phys)
            .map(|(_, g, l)| (g.clone(), l.clone()))
            .collect()
    }

    /// The groups a physical path belongs to (for errors).
    pub fn groups_of(&self, phys: &Path) -> Vec<String> {
        self.map(phys).into_iter().map(|(g, _)| g).collect()
    }
}

/// Which paths of a `notify` event to look at: (index into `paths`, deep). Empty: ignore it.
/// A path renamed away or removed is looked at deep: when it was a directory, everything
/// recorded under it went with it (a shallow look would tombstone the directory alone and
/// leave its files recorded, so peers could not delete it and a move could not be paired as
/// renames of its files).
pub fn classify(kind: &EventKind, n_paths: usize) -> Vec<(usize, bool)> {
    let all = |deep: bool| (0..n_paths).map(|i| (i, deep)).collect();
    match kind {
        EventKind::Create(_) => all(true),
        EventKind::Modify(ModifyKind::Name(_)) => all(true),
        EventKind::Modify(_) => all(false),
        EventKind::Remove(_) => all(true),
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => all(false),
        EventKind::Access(_) => Vec::new(),
        EventKind::Any | EventKind::Other => all(true),
    }
}

fn is_temp(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMP_PREFIX))
}

/// Turns one `notify` result into watch events.
pub fn translate(map: &RootMap, res: notify::Result<notify::Event>) -> Vec<WatchEvent> {
    match res {
        Ok(ev) if ev.need_rescan() => vec![WatchEvent::Lost {
            group: None,
            reason: "inotify event queue overflowed".into(),
        }],
        Ok(ev) => {
            let mut out = Vec::new();
            if moves_roots(&ev.kind) && ev.paths.iter().any(|p| map.is_root(p)) {
                let dropped = match ev.kind {
                    EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => ev
                        .paths
                        .iter()
                        .filter(|p| map.is_root(p))
                        .cloned()
                        .collect(),
                    _ => Vec::new(),
                };
                out.push(WatchEvent::RootsMoved { dropped });
            }
            for (i, deep) in classify(&ev.kind, ev.paths.len()) {
                let p = &ev.paths[i];
                if is_temp(p) {
                    continue;
                }
                for (group, logical) in map.map(p) {
                    out.push(WatchEvent::Changed {
                        group,
                        logical,
                        deep,
                    });
                }
            }
            out
        }
        Err(e) => {
            let groups: Vec<String> = e.paths.iter().flat_map(|p| map.groups_of(p)).collect();
            let reason = format!("watch error: {e}");
            if groups.is_empty() {
                vec![WatchEvent::Lost {
                    group: None,
                    reason,
                }]
            } else {
                groups
                    .into_iter()
                    .map(|g| WatchEvent::Lost {
                        group: Some(g),
                        reason: reason.clone(),
                    })
                    .collect()
            }
        }
    }
}

/// Whether an event of this kind may mean its path was created, removed or renamed (an include
/// root coming or going).
pub fn moves_roots(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Any
            | EventKind::Other
    )
}

/// Turns one event of the ancestors' watch into watch events: anything happening to an include
/// root or one of its ancestors (created, moved in, removed) means the roots must be checked.
pub fn translate_ancestor(map: &RootMap, res: notify::Result<notify::Event>) -> Vec<WatchEvent> {
    match res {
        Ok(ev) if ev.need_rescan() => vec![WatchEvent::RootsMoved {
            dropped: Vec::new(),
        }],
        Ok(ev) if moves_roots(&ev.kind) && ev.paths.iter().any(|p| map.leads_to_root(p)) => {
            vec![WatchEvent::RootsMoved {
                dropped: Vec::new(),
            }]
        }
        Ok(_) => Vec::new(),
        Err(_) => vec![WatchEvent::RootsMoved {
            dropped: Vec::new(),
        }],
    }
}

/// What identifies the object at a path: device and inode. A directory removed and recreated, a
/// mount on top of it or one taken away all change it.
pub type NodeId = (u64, u64);

fn node_id(p: &Path) -> Option<NodeId> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// What is at include root `p`, as [`root_id_of`] decides from its `symlink_metadata`.
fn root_id(p: &Path) -> Option<NodeId> {
    root_id_of(std::fs::symlink_metadata(p).ok().map(|m| RootStat {
        id: (m.dev(), m.ino()),
        symlink: m.file_type().is_symlink(),
    }))
}

fn replaced_by_symlink(root: &Path) -> String {
    format!(
        "include root {} is a symlink, not a directory; not watched or scanned until it is a \
         directory again",
        root.display()
    )
}

/// What `symlink_metadata` says about an include root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootStat {
    pub id: NodeId,
    pub symlink: bool,
}

/// The object watched for an include root, `None` when it is missing. A symlink put in place of
/// the root counts as missing: following it would watch and deep-scan the tree it points to (and
/// record everything under the root as deleted); the root is waited for until it is a directory
/// again (the scan refuses it too, see `crate::scan`).
pub fn root_id_of(stat: Option<RootStat>) -> Option<NodeId> {
    stat.filter(|s| !s.symlink).map(|s| s.id)
}

/// What to do about one include root, from what is watched (`None`: nothing) and what is at the
/// root's path now (`None`: nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootAction {
    /// Still the same (or still missing).
    Keep,
    /// It appeared: watch it and scan it.
    Watch,
    /// Another object is there now (recreated, moved in, a mount came or went): drop the old
    /// watch, watch it and scan it.
    Rewatch,
    /// It is gone: drop the old watch and wait for it to come back.
    Unwatch,
}

pub fn root_action(watched: Option<NodeId>, now: Option<NodeId>) -> RootAction {
    match (watched, now) {
        (None, None) => RootAction::Keep,
        (None, Some(_)) => RootAction::Watch,
        (Some(a), Some(b)) if a == b => RootAction::Keep,
        (Some(_), Some(_)) => RootAction::Rewatch,
        (Some(_), None) => RootAction::Unwatch,
    }
}

/// How long [`Watch::check_roots`] waits for the stat of an include root. A root on a hung NFS
/// server or a crashed FUSE mount may never answer: it is reported and skipped for the round
/// (its watch stays as it is), so one such root does not stall the daemon.
pub const ROOT_STAT_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The stat of every root, each on its own thread, waiting at most `limit` in all. Returns the
/// answers that came in time (`Some(None)`: missing) and the roots whose stat was started now and
/// did not answer in time. A root whose stat from an earlier round has not returned yet is not
/// stat'ed again (no thread piles up behind a hung mount) and is neither answered nor reported
/// again.
pub fn stat_roots(
    roots: &[PathBuf],
    in_flight: &std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>,
    limit: std::time::Duration,
    stat: fn(&Path) -> Option<NodeId>,
) -> (BTreeMap<PathBuf, Option<NodeId>>, Vec<PathBuf>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut started = Vec::new();
    for root in roots {
        if !in_flight
            .lock()
            .expect("lock poisoned")
            .insert(root.clone())
        {
            continue;
        }
        let (tx2, root2, in_flight2) = (tx.clone(), root.clone(), in_flight.clone());
        let spawned = std::thread::Builder::new()
            .name("filed-root-stat".into())
            .spawn(move || {
                let id = stat(&root2);
                in_flight2.lock().expect("lock poisoned").remove(&root2);
                let _ = tx2.send((root2, id));
            });
        match spawned {
            Ok(_) => started.push(root.clone()),
            // No thread now: not checked this round.
            Err(_) => {
                in_flight.lock().expect("lock poisoned").remove(root);
            }
        }
    }
    drop(tx);
    let deadline = std::time::Instant::now() + limit;
    let mut answers = BTreeMap::new();
    while answers.len() < started.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((root, id)) => {
                answers.insert(root, id);
            }
            Err(_) => break,
        }
    }
    let slow = started
        .into_iter()
        .filter(|r| !answers.contains_key(r))
        .collect();
    (answers, slow)
}

/// Whether adding the recursive watch of a root failed because the root itself is gone
/// (`not_found`: notify said PathNotFound; `root_now`: what is at the root's path now). A path
/// not found while a root is still there is a directory below it that vanished during notify's
/// walk: the root stays watched.
pub fn add_failed_on_gone_root(not_found: bool, root_now: Option<NodeId>) -> bool {
    not_found && root_now.is_none()
}

/// [`root_action`] for a root whose stat may not have answered this round (`None`): such a root
/// is left as it is.
pub fn root_action_if_answered(watched: Option<NodeId>, now: Option<Option<NodeId>>) -> RootAction {
    match now {
        Some(now) => root_action(watched, now),
        None => RootAction::Keep,
    }
}

/// The nearest ancestor of `root` that `exists` (the directory whose events tell when the root
/// comes back); `None` when not even `/` does.
pub fn nearest_ancestor(root: &Path, mut exists: impl FnMut(&Path) -> bool) -> Option<PathBuf> {
    root.ancestors()
        .skip(1)
        .find(|a| !a.as_os_str().is_empty() && exists(a))
        .map(Path::to_path_buf)
}

/// What [`Watch::check_roots`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RootReport {
    /// (group, logical root) of every root watched anew: scan them deep, since files may have
    /// been created in them before the watch was in place.
    pub appeared: Vec<(String, String)>,
    /// Roots that went away (their watch is dropped; their nearest ancestor is watched).
    pub gone: Vec<PathBuf>,
    /// Roots that could not be watched, as `Lost` events for their groups (rescan them).
    pub lost: Vec<WatchEvent>,
    /// Ancestors of missing roots that could not be watched (the periodic check finds the root).
    pub errors: Vec<String>,
    /// Roots whose stat did not answer within [`ROOT_STAT_LIMIT`] (a hung mount): skipped.
    pub slow: Vec<PathBuf>,
}

impl RootReport {
    /// `root` is gone (its watch dropped): listed, with a note when a symlink stands in its
    /// place.
    fn root_gone(&mut self, root: &Path) {
        if root.is_symlink() {
            self.errors.push(replaced_by_symlink(root));
        }
        self.gone.push(root.to_path_buf());
    }
}

/// A running watch; dropping it stops the watch threads.
pub struct Watch {
    map: RootMap,
    /// The recursive watch of the include roots.
    roots: notify::RecommendedWatcher,
    /// Non-recursive watches of the nearest existing ancestor of every missing root (a separate
    /// inotify instance, so it never touches the recursive watches of roots nested in others).
    ancestors: notify::RecommendedWatcher,
    /// Per physical root: what its watch was added on (`None`: not watched, missing).
    watched: BTreeMap<PathBuf, Option<NodeId>>,
    /// Ancestors watched, with what their watch was added on.
    watched_ancestors: BTreeMap<PathBuf, NodeId>,
    /// Roots whose stat has not returned yet (see [`stat_roots`]).
    stats_in_flight: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>,
}

impl Watch {
    /// Starts watching every root of `map`; events go to `tx`. A root that is missing is waited
    /// for (its nearest existing ancestor is watched); one that cannot be watched (watch limit)
    /// is reported as a `Lost` event for its groups (they are then checked by the periodic full
    /// check). Returns the watch and the roots that are missing or could not be watched.
    pub fn start(
        map: RootMap,
        tx: UnboundedSender<WatchEvent>,
    ) -> notify::Result<(Watch, Vec<String>)> {
        let (map2, tx2) = (map.clone(), tx.clone());
        let roots = notify::recommended_watcher(move |res| {
            for ev in translate(&map2, res) {
                let _ = tx2.send(ev);
            }
        })?;
        let (map3, tx3) = (map.clone(), tx.clone());
        let ancestors = notify::recommended_watcher(move |res| {
            for ev in translate_ancestor(&map3, res) {
                let _ = tx3.send(ev);
            }
        })?;
        let watched = map.dirs().into_iter().map(|d| (d, None)).collect();
        let mut w = Watch {
            map,
            roots,
            ancestors,
            watched,
            watched_ancestors: BTreeMap::new(),
            stats_in_flight: Default::default(),
        };
        let report = w.check_roots(&[]);
        let mut errors = Vec::new();
        for (root, id) in &w.watched {
            if id.is_none() && root.is_symlink() {
                errors.push(replaced_by_symlink(root));
            } else if id.is_none() {
                errors.push(format!(
                    "include root {} is missing; watching for it to appear",
                    root.display()
                ));
            }
        }
        for ev in report.lost {
            if let WatchEvent::Lost { reason, .. } = &ev
                && !errors.contains(reason)
            {
                errors.push(reason.clone());
            }
            let _ = tx.send(ev);
        }
        errors.extend(report.errors);
        Ok((w, errors))
    }

    /// Compares every include root with what is watched and re-arms: watches a root that
    /// appeared or was replaced (recreated, moved in, mounted over or unmounted), drops the watch
    /// of one that is gone, and watches the nearest existing ancestor of every missing root.
    /// Cheap when nothing changed (a stat per root). `dropped`: roots removed or renamed away
    /// since the last check (see [`WatchEvent::RootsMoved`]), watched again even when the
    /// object at their path looks the same (an inode number reused).
    pub fn check_roots(&mut self, dropped: &[PathBuf]) -> RootReport {
        let mut report = RootReport::default();
        let roots: Vec<PathBuf> = self.watched.keys().cloned().collect();
        let (ids, slow) = stat_roots(&roots, &self.stats_in_flight, ROOT_STAT_LIMIT, root_id);
        report.slow = slow;
        for root in dropped {
            if let Some(id) = self.watched.get_mut(root)
                && id.is_some()
            {
                let _ = self.roots.unwatch(root);
                *id = None;
                if ids.get(root).is_none_or(|id| id.is_none()) {
                    report.root_gone(root);
                }
            }
        }
        let mut rewatched: Vec<PathBuf> = Vec::new();
        for root in &roots {
            let now = ids.get(root).copied();
            match root_action_if_answered(self.watched[root], now) {
                RootAction::Keep => {}
                RootAction::Unwatch => {
                    // notify may have dropped it already (the root's own removal).
                    let _ = self.roots.unwatch(root);
                    self.watched.insert(root.clone(), None);
                    report.root_gone(root);
                }
                action @ (RootAction::Watch | RootAction::Rewatch) => {
                    if action == RootAction::Rewatch {
                        let _ = self.roots.unwatch(root);
                    }
                    self.add_root(root, now.flatten(), &mut report);
                    rewatched.push(root.clone());
                }
            }
        }
        // A root re-armed inside another one dropped the nested roots' watches with its own:
        // add them again (the kernel merges a watch added twice).
        for root in &roots {
            if rewatched.iter().any(|r| r != root && root.starts_with(r))
                && !rewatched.contains(root)
                && let Some(id) = self.watched[root]
            {
                let _ = self.roots.watch(root, RecursiveMode::Recursive);
                self.watched.insert(root.clone(), Some(id));
            }
        }
        self.arm_ancestors(&mut report);
        report
    }

    fn add_root(&mut self, root: &Path, now: Option<NodeId>, report: &mut RootReport) {
        match self.roots.watch(root, RecursiveMode::Recursive) {
            Ok(()) => {
                self.watched.insert(root.to_path_buf(), now);
                report.appeared.extend(self.map.roots_at(root));
            }
            Err(e)
                if add_failed_on_gone_root(
                    matches!(e.kind, notify::ErrorKind::PathNotFound),
                    root_id(root),
                ) =>
            {
                // Gone again before the watch was in place.
                let _ = self.roots.unwatch(root);
                self.watched.insert(root.to_path_buf(), None);
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {
                // A directory below the root vanished during notify's walk: the root is there
                // and keeps what was added; its groups are rescanned (the directories after the
                // vanished one may not be watched) and the periodic full check covers the rest.
                self.watched.insert(root.to_path_buf(), now);
                report.appeared.extend(self.map.roots_at(root));
                let reason = format!("incomplete watch of {}: {e}", root.display());
                for g in self.map.groups_of(root) {
                    report.lost.push(WatchEvent::Lost {
                        group: Some(g),
                        reason: reason.clone(),
                    });
                }
            }
            Err(e) => {
                // Watch limit or unreadable: the groups are rescanned now and checked by the
                // periodic full check; not retried until the root changes.
                self.watched.insert(root.to_path_buf(), now);
                let reason = format!("cannot watch {}: {e}", root.display());
                for g in self.map.groups_of(root) {
                    report.lost.push(WatchEvent::Lost {
                        group: Some(g),
                        reason: reason.clone(),
                    });
                }
            }
        }
    }

    /// Watches exactly the nearest existing ancestors of the missing roots.
    fn arm_ancestors(&mut self, report: &mut RootReport) {
        let mut want: BTreeMap<PathBuf, NodeId> = BTreeMap::new();
        for (root, id) in &self.watched {
            // The ancestor's id is kept from the stat that found it.
            let mut aid = None;
            if id.is_none()
                && let Some(a) = nearest_ancestor(root, |a| {
                    aid = node_id(a);
                    aid.is_some()
                })
                && let Some(aid) = aid
            {
                want.insert(a, aid);
            }
        }
        let stale: Vec<PathBuf> = self
            .watched_ancestors
            .iter()
            .filter(|(a, id)| want.get(*a) != Some(id))
            .map(|(a, _)| a.clone())
            .collect();
        for a in stale {
            let _ = self.ancestors.unwatch(&a);
            self.watched_ancestors.remove(&a);
        }
        for (a, id) in want {
            if self.watched_ancestors.contains_key(&a) {
                continue;
            }
            if let Err(e) = self.ancestors.watch(&a, RecursiveMode::NonRecursive) {
                // The periodic check of the roots finds the root instead; not retried until
                // the ancestor changes.
                report
                    .errors
                    .push(format!("cannot watch {}: {e}", a.display()));
            }
            self.watched_ancestors.insert(a, id);
        }
    }

    /// The directories watched while waiting for missing roots (for tests and logs).
    pub fn waiting_on(&self) -> Vec<PathBuf> {
        self.watched_ancestors.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RemoveKind, RenameMode};

    fn map() -> RootMap {
        let d = Path::new("/tmp/filed-watch-test");
        let text = format!(
            "[hosts.a]\nprefix={{d=\"{0}/a\"}}\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"%d%\"]\n[groups.h]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"%d%/sub\"]\n",
            d.display()
        );
        let c = crate::config::Config::parse(&text, &d.join("f.toml")).unwrap();
        RootMap::new(&c.hosts["a"], c.groups.values())
    }

    #[test]
    fn maps_physical_to_logical_per_group() {
        let m = map();
        assert_eq!(
            m.map(Path::new("/tmp/filed-watch-test/a/x/y")),
            vec![("g".to_string(), "%d%/x/y".to_string())]
        );
        let mut both = m.map(Path::new("/tmp/filed-watch-test/a/sub/f"));
        both.sort();
        assert_eq!(
            both,
            vec![
                ("g".to_string(), "%d%/sub/f".to_string()),
                ("h".to_string(), "%d%/sub/f".to_string())
            ]
        );
        assert_eq!(
            m.map(Path::new("/tmp/filed-watch-test/a")),
            vec![("g".to_string(), "%d%".to_string())]
        );
        assert!(m.map(Path::new("/tmp/filed-watch-test/ab")).is_empty());
        assert_eq!(m.dirs().len(), 2);
    }

    #[test]
    fn classifies_events() {
        assert_eq!(
            classify(&EventKind::Create(CreateKind::Folder), 1),
            vec![(0, true)]
        );
        assert_eq!(
            classify(&EventKind::Modify(ModifyKind::Data(DataChange::Any)), 1),
            vec![(0, false)]
        );
        assert_eq!(
            classify(&EventKind::Modify(ModifyKind::Name(RenameMode::Both)), 2),
            vec![(0, true), (1, true)]
        );
        assert_eq!(
            classify(&EventKind::Modify(ModifyKind::Name(RenameMode::From)), 1),
            vec![(0, true)],
            "a directory moved away takes its files with it"
        );
        assert_eq!(
            classify(&EventKind::Remove(RemoveKind::Folder), 1),
            vec![(0, true)]
        );
        assert!(classify(&EventKind::Access(AccessKind::Read), 1).is_empty());
    }

    #[test]
    fn overflow_and_temp_files() {
        let m = map();
        let ev = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(
            translate(&m, Ok(ev)),
            vec![WatchEvent::Lost {
                group: None,
                reason: "inotify event queue overflowed".into()
            }]
        );
        let ev = notify::Event::new(EventKind::Create(CreateKind::File))
            .add_path(PathBuf::from("/tmp/filed-watch-test/a/.filed.tmp.1.2.3"));
        assert!(translate(&m, Ok(ev)).is_empty());
        let err = notify::Error::new(notify::ErrorKind::MaxFilesWatch)
            .add_path(PathBuf::from("/tmp/filed-watch-test/a/x"));
        assert!(matches!(
            &translate(&m, Err(err))[..],
            [WatchEvent::Lost { group: Some(g), .. }] if g == "g"
        ));
    }

    #[test]
    fn root_actions() {
        assert_eq!(root_action(None, None), RootAction::Keep);
        assert_eq!(root_action(None, Some((1, 2))), RootAction::Watch);
        assert_eq!(root_action(Some((1, 2)), Some((1, 2))), RootAction::Keep);
        assert_eq!(
            root_action(Some((1, 2)), Some((1, 3))),
            RootAction::Rewatch,
            "recreated"
        );
        assert_eq!(
            root_action(Some((1, 2)), Some((7, 2))),
            RootAction::Rewatch,
            "a mount on top"
        );
        assert_eq!(root_action(Some((1, 2)), None), RootAction::Unwatch);
    }

    #[test]
    fn nearest_existing_ancestor() {
        let exists = |p: &Path| p == Path::new("/srv") || p == Path::new("/");
        assert_eq!(
            nearest_ancestor(Path::new("/srv/www/site"), exists),
            Some(PathBuf::from("/srv"))
        );
        assert_eq!(
            nearest_ancestor(Path::new("/srv/www"), exists),
            Some(PathBuf::from("/srv"))
        );
        assert_eq!(
            nearest_ancestor(Path::new("/opt/x"), exists),
            Some(PathBuf::from("/"))
        );
        assert_eq!(nearest_ancestor(Path::new("/opt/x"), |_| false), None);
    }

    #[test]
    fn root_events_ask_for_a_root_check() {
        let m = map();
        let root = PathBuf::from("/tmp/filed-watch-test/a");
        let ev = notify::Event::new(EventKind::Remove(RemoveKind::Folder)).add_path(root.clone());
        assert_eq!(
            translate(&m, Ok(ev)),
            vec![
                WatchEvent::RootsMoved {
                    dropped: vec![root.clone()]
                },
                WatchEvent::Changed {
                    group: "g".into(),
                    logical: "%d%".into(),
                    deep: true
                }
            ]
        );
        // the nested root of group h created inside g's root
        let sub = root.join("sub");
        let ev = notify::Event::new(EventKind::Create(CreateKind::Folder)).add_path(sub.clone());
        assert_eq!(
            translate(&m, Ok(ev))[0],
            WatchEvent::RootsMoved { dropped: vec![] }
        );
        // an ordinary path, and the root's own attribute change: no check
        let ev = notify::Event::new(EventKind::Create(CreateKind::File)).add_path(root.join("f"));
        assert!(
            !translate(&m, Ok(ev))
                .iter()
                .any(|e| matches!(e, WatchEvent::RootsMoved { .. }))
        );
        let ev = notify::Event::new(EventKind::Modify(ModifyKind::Metadata(
            notify::event::MetadataKind::Any,
        )))
        .add_path(root.clone());
        assert!(
            !translate(&m, Ok(ev))
                .iter()
                .any(|e| matches!(e, WatchEvent::RootsMoved { .. }))
        );
    }

    #[test]
    fn ancestor_events_about_a_root_ask_for_a_check() {
        let m = map();
        let created = |p: &str| {
            translate_ancestor(
                &m,
                Ok(notify::Event::new(EventKind::Create(CreateKind::Folder))
                    .add_path(PathBuf::from(p))),
            )
        };
        let check = vec![WatchEvent::RootsMoved { dropped: vec![] }];
        assert_eq!(created("/tmp/filed-watch-test/a"), check);
        assert_eq!(created("/tmp/filed-watch-test"), check, "an ancestor");
        assert_eq!(created("/tmp/filed-watch-test/b"), vec![], "a sibling");
        assert_eq!(created("/tmp/other"), vec![]);
        let ev = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::To)))
            .add_path(PathBuf::from("/tmp/filed-watch-test/a"));
        assert_eq!(translate_ancestor(&m, Ok(ev)), check, "moved in");
    }

    /// A real watch: a root missing at start, created, removed and recreated, moved away and
    /// replaced, is watched again each time (its events arrive) and reported as appeared.
    #[test]
    fn roots_are_rearmed() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("srv");
        std::fs::create_dir(&base).unwrap();
        let text = format!(
            "[hosts.a]\nprefix={{d=\"{0}/www\"}}\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"%d%\"]\n",
            base.display()
        );
        let c = crate::config::Config::parse(&text, &d.path().join("f.toml")).unwrap();
        let m = RootMap::new(&c.hosts["a"], c.groups.values());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (mut w, errors) = Watch::start(m, tx).unwrap();
        let root = base.join("www");
        assert_eq!(
            errors,
            vec![format!(
                "include root {} is missing; watching for it to appear",
                root.display()
            )]
        );
        assert_eq!(w.waiting_on(), vec![base.clone()]);
        let appeared = vec![("g".to_string(), "%d%".to_string())];
        // Waits for the watch to report `want`; returns the roots dropped meanwhile.
        let wait_for = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<WatchEvent>,
                        want: &WatchEvent|
         -> Vec<PathBuf> {
            let mut dropped = Vec::new();
            let t0 = std::time::Instant::now();
            while t0.elapsed() < std::time::Duration::from_secs(10) {
                match rx.try_recv() {
                    Ok(WatchEvent::RootsMoved { dropped: d }) => {
                        dropped.extend(d);
                        if want == &(WatchEvent::RootsMoved { dropped: vec![] }) {
                            return dropped;
                        }
                    }
                    Ok(ev) if &ev == want => return dropped,
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
            panic!("no {want:?}");
        };
        let file_event = |name: &str| WatchEvent::Changed {
            group: "g".into(),
            logical: format!("%d%/{name}"),
            deep: false,
        };
        let check = WatchEvent::RootsMoved { dropped: vec![] };

        // Created: the ancestor's watch sees it; the root is watched again.
        std::fs::create_dir(&root).unwrap();
        wait_for(&mut rx, &check);
        let r = w.check_roots(&[]);
        assert_eq!((r.appeared, r.gone), (appeared.clone(), vec![]));
        assert!(w.waiting_on().is_empty());
        std::fs::write(root.join("one"), b"1").unwrap();
        wait_for(&mut rx, &file_event("one"));

        // Removed and recreated.
        std::fs::remove_dir_all(&root).unwrap();
        let dropped = wait_for(
            &mut rx,
            &WatchEvent::Changed {
                group: "g".into(),
                logical: "%d%".into(),
                deep: true,
            },
        );
        assert_eq!(dropped, vec![root.clone()]);
        let r = w.check_roots(&dropped);
        assert_eq!(r.gone, vec![root.clone()]);
        assert_eq!(w.waiting_on(), vec![base.clone()]);
        std::fs::create_dir(&root).unwrap();
        wait_for(&mut rx, &check);
        assert_eq!(w.check_roots(&[]).appeared, appeared);
        std::fs::write(root.join("two"), b"2").unwrap();
        wait_for(&mut rx, &file_event("two"));

        // Moved away and replaced by another directory (no check in between): found by the
        // check, events of the old directory no longer count for the root.
        std::fs::rename(&root, base.join("old")).unwrap();
        std::fs::create_dir(&root).unwrap();
        let r = w.check_roots(&[]);
        assert_eq!((r.appeared, r.gone), (appeared.clone(), vec![]));
        std::fs::write(base.join("old/stale"), b"x").unwrap();
        std::fs::write(root.join("three"), b"3").unwrap();
        wait_for(&mut rx, &file_event("three"));
        while let Ok(ev) = rx.try_recv() {
            assert_ne!(ev, file_event("stale"));
        }
        // Nothing changed: nothing to do.
        assert_eq!(w.check_roots(&[]), RootReport::default());

        // Swapped for a symlink to another tree: missing, not watched (nothing there is seen).
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::rename(&root, base.join("old2")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &root).unwrap();
        let r = w.check_roots(&[]);
        assert_eq!(
            r,
            RootReport {
                gone: vec![root.clone()],
                errors: vec![replaced_by_symlink(&root)],
                ..RootReport::default()
            }
        );
        assert_eq!(w.waiting_on(), vec![base.clone()]);
        assert_eq!(w.check_roots(&[]), RootReport::default(), "reported once");
        // A directory again: watched and scanned.
        std::fs::remove_file(&root).unwrap();
        std::fs::create_dir(&root).unwrap();
        assert_eq!(w.check_roots(&[]).appeared, appeared);
        std::fs::write(elsewhere.join("not-ours"), b"x").unwrap();
        std::fs::write(root.join("four"), b"4").unwrap();
        wait_for(&mut rx, &file_event("four"));
        while let Ok(ev) = rx.try_recv() {
            assert_ne!(ev, file_event("not-ours"));
        }
    }

    #[test]
    fn a_vanished_subdirectory_does_not_unwatch_the_root() {
        assert!(
            add_failed_on_gone_root(true, None),
            "the root itself is gone"
        );
        assert!(
            !add_failed_on_gone_root(true, Some((1, 2))),
            "a subdirectory"
        );
        assert!(!add_failed_on_gone_root(false, None), "another error");
        assert!(!add_failed_on_gone_root(false, Some((1, 2))));
    }

    #[test]
    fn a_symlink_in_place_of_a_root_is_no_root() {
        let dir = RootStat {
            id: (1, 2),
            symlink: false,
        };
        assert_eq!(root_id_of(Some(dir)), Some((1, 2)));
        let link = RootStat {
            id: (1, 3),
            symlink: true,
        };
        assert_eq!(root_id_of(Some(link)), None);
        assert_eq!(root_id_of(None), None);
        // the watched directory replaced by a symlink: dropped like a removed root
        assert_eq!(
            root_action(Some((1, 2)), root_id_of(Some(link))),
            RootAction::Unwatch
        );
    }

    #[test]
    fn a_root_whose_stat_hangs_is_skipped_not_waited_for() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        static RELEASE: AtomicBool = AtomicBool::new(false);
        static HUNG_CALLS: AtomicUsize = AtomicUsize::new(0);
        fn stat(p: &Path) -> Option<NodeId> {
            match p.to_str() {
                Some("/hung") => {
                    HUNG_CALLS.fetch_add(1, Ordering::SeqCst);
                    while !RELEASE.load(Ordering::SeqCst) {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Some((9, 9))
                }
                Some("/ok") => Some((1, 1)),
                _ => None,
            }
        }
        let roots: Vec<PathBuf> = ["/hung", "/ok", "/gone"].map(PathBuf::from).to_vec();
        let in_flight = std::sync::Arc::default();
        let limit = std::time::Duration::from_millis(200);
        let t0 = std::time::Instant::now();
        let (ids, slow) = stat_roots(&roots, &in_flight, limit, stat);
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
        let want: BTreeMap<PathBuf, Option<NodeId>> = [
            (PathBuf::from("/ok"), Some((1, 1))),
            (PathBuf::from("/gone"), None),
        ]
        .into();
        assert_eq!(ids, want);
        assert_eq!(slow, vec![PathBuf::from("/hung")]);
        // Next round: not stat'ed again while the first stat hangs, nor reported again.
        let (ids, slow) = stat_roots(&roots, &in_flight, limit, stat);
        assert_eq!(ids, want);
        assert!(slow.is_empty());
        assert_eq!(HUNG_CALLS.load(Ordering::SeqCst), 1);
        // It answers at last: checked as usual again.
        RELEASE.store(true, Ordering::SeqCst);
        assert!(wait_until_empty(&in_flight));
        let (ids, slow) = stat_roots(&roots, &in_flight, limit, stat);
        assert_eq!(ids.get(Path::new("/hung")), Some(&Some((9, 9))));
        assert!(slow.is_empty());
        // A root that did not answer is left as it is.
        assert_eq!(
            root_action_if_answered(Some((9, 9)), None),
            RootAction::Keep
        );
        assert_eq!(root_action_if_answered(None, None), RootAction::Keep);
        assert_eq!(
            root_action_if_answered(Some((9, 9)), Some(None)),
            RootAction::Unwatch
        );
        assert_eq!(
            root_action_if_answered(Some((9, 9)), Some(Some((9, 8)))),
            RootAction::Rewatch
        );
    }

    fn wait_until_empty(
        in_flight: &std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>,
    ) -> bool {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(5) {
            if in_flight.lock().unwrap().is_empty() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }
}
