//! The recursive watch of every group's include roots (inotify through `notify`): maps each event
//! to (group, logical path, deep?) and reports lost events — a queue overflow or a watch that
//! could not be added (watch limit) — so the daemon rescans what is affected. `notify` adds a
//! watch for every directory created below a root; a directory that appears is reported "deep",
//! so the files created in it before its watch was in place are found by walking it.
//!
//! Why not notify-debouncer-full: it debounces per path and walks the whole tree at start to
//! build its file-id cache; filed needs one batch per group with a latency bounded from the first
//! event (see [`crate::batch`]) and finds renames itself (same content hash).

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

/// A running watch; dropping it stops the watch thread.
pub struct Watch {
    _inner: notify::RecommendedWatcher,
}

/// Starts watching every root of `map`; events go to `tx`. A root that cannot be watched (absent,
/// watch limit) is reported as a `Lost` event for its groups (they are then checked by the
/// periodic full check) and returned as an error text.
pub fn start(
    map: RootMap,
    tx: UnboundedSender<WatchEvent>,
) -> notify::Result<(Watch, Vec<String>)> {
    let dirs = map.dirs();
    let map2 = map.clone();
    let tx2 = tx.clone();
    let mut w = notify::recommended_watcher(move |res| {
        for ev in translate(&map2, res) {
            let _ = tx2.send(ev);
        }
    })?;
    let mut errors = Vec::new();
    for d in dirs {
        if let Err(e) = w.watch(&d, RecursiveMode::Recursive) {
            let msg = format!("cannot watch {}: {e}", d.display());
            for g in map.groups_of(&d) {
                let _ = tx.send(WatchEvent::Lost {
                    group: Some(g),
                    reason: msg.clone(),
                });
            }
            errors.push(msg);
        }
    }
    Ok((Watch { _inner: w }, errors))
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
}
