//! `filed check`: walks a group's included trees on this host, compares every path with the state
//! database and records what changed (new, changed, deleted, renamed), marking it dirty for every
//! peer. Stat-only for files whose size and mtime are unchanged; a file is hashed only when they
//! differ (or when a full check is asked for).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::config::{Group, Host};
use crate::entry::{FileState, Kind, now_ns, read_state};
use crate::filter::{is_path_pattern, is_under};
use crate::owner::keep_owner;
use crate::store::{Batch, Op, StateStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading the state database failed")]
    Store(#[source] StoreError),
    #[error("path {0:?} uses a prefix not defined for this host")]
    NoPrefix(String),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ScanOptions {
    /// Hash every regular file even when size and mtime are unchanged.
    pub rehash: bool,
    /// Scan include roots that hold none of what is recorded under them (see
    /// [`RootContents::looks_unmounted`]); otherwise they are skipped with an error.
    pub allow_empty_roots: bool,
}

/// What a scan found.
#[derive(Debug, Default, Clone)]
pub struct ScanReport {
    pub new: Vec<String>,
    pub changed: Vec<String>,
    pub deleted: Vec<String>,
    /// (old path, new path) pairs with the same content hash.
    pub renamed: Vec<(String, String)>,
    pub unchanged: usize,
    pub hashed: usize,
    /// Paths that could not be read, with the reason (they keep their recorded state).
    pub errors: Vec<String>,
    /// Paths that could not be read or listed in this scan: nothing recorded at or under them is
    /// taken as deleted (see [`under_unreadable`]).
    pub unreadable: Vec<String>,
}

impl ScanReport {
    pub fn changes(&self) -> usize {
        self.new.len() + self.changed.len() + self.deleted.len()
    }

    /// Records that `path` could not be read (`why`): an error, and nothing under it deleted.
    fn unreadable(&mut self, path: &str, why: impl std::fmt::Display) {
        self.errors.push(format!("{path}: {why}"));
        self.unreadable.push(path.to_string());
    }
}

/// Whether recorded `path` lies at or under a path that could not be read in this scan. Its
/// absence from what the scan saw then says nothing: a directory that cannot be listed (no
/// permission, a crashed FUSE or stale NFS mount) hides everything below it, which must keep its
/// recorded state instead of being deleted on every peer.
pub fn under_unreadable(path: &str, unreadable: &[String]) -> bool {
    unreadable.iter().any(|u| is_under(path, u))
}

/// What a scan does with one of its starting paths, from its `symlink_metadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Start {
    /// Walk it (a path that is gone is recorded as deleted).
    Scan,
    /// An include root that does not exist (an unmounted filesystem?): skipped, nothing deleted.
    Missing,
    /// It cannot be examined (permission, ENOTCONN/ESTALE/EIO of a broken mount): skipped,
    /// nothing at or under it deleted.
    Unreadable,
    /// An include root recorded as a directory is now something else (a symlink put in its
    /// place): skipped, nothing deleted, unless the admin confirms.
    NotADirectory(Kind),
}

/// Decides [`Start`] for a starting path: `found` is the kind on disk or the stat error,
/// `explicit` whether the paths were given (a watcher's or `--only` scan: a given path that is gone
/// is a deletion), `config_root` whether it is an include root, `recorded` the kind recorded for
/// it and `allow` the admin's `--allow-empty-root`.
fn start_decision(
    found: Result<Kind, std::io::ErrorKind>,
    explicit: bool,
    config_root: bool,
    recorded: Option<Kind>,
    allow: bool,
) -> Start {
    match found {
        Err(std::io::ErrorKind::NotFound) if explicit => Start::Scan,
        Err(std::io::ErrorKind::NotFound) => Start::Missing,
        Err(_) => Start::Unreadable,
        Ok(k) if config_root && !allow && recorded == Some(Kind::Dir) && k != Kind::Dir => {
            Start::NotADirectory(k)
        }
        Ok(_) => Start::Scan,
    }
}

/// One path of a partial scan (what a watcher saw change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPath {
    pub logical: String,
    /// Walk everything below it too (a directory created or moved in); otherwise only the path.
    pub deep: bool,
    /// Hash it even when size and mtime look unchanged.
    pub rehash: bool,
}

/// Drops paths already covered by a deep path above them (or the same path), merging flags.
pub fn reduce_paths(mut paths: Vec<ScanPath>) -> Vec<ScanPath> {
    paths.sort_by(|a, b| a.logical.cmp(&b.logical).then(b.deep.cmp(&a.deep)));
    let mut out: Vec<ScanPath> = Vec::with_capacity(paths.len());
    let mut deep_roots: Vec<String> = Vec::new();
    for p in paths {
        while deep_roots.last().is_some_and(|r| !is_under(&p.logical, r)) {
            deep_roots.pop();
        }
        if let Some(last) = out.last_mut()
            && last.logical == p.logical
        {
            last.rehash |= p.rehash;
            continue;
        }
        if !deep_roots.is_empty() {
            continue;
        }
        if p.deep {
            deep_roots.push(p.logical.clone());
        }
        out.push(p);
    }
    out
}

/// Scans the whole group (`only` = None) or just the given logical paths and what lies below them.
/// Changes are marked dirty for each of `peers`.
pub fn scan_group(
    store: &dyn StateStore,
    host: &Host,
    group: &Group,
    peers: &[String],
    only: Option<&[String]>,
    opts: ScanOptions,
) -> Result<ScanReport, ScanError> {
    // Explicit paths read only their own records; the include roots read the group's.
    let (logicals, explicit) = match only {
        None => (group.filter.roots(), false),
        Some(paths) => (paths.to_vec(), true),
    };
    let roots = logicals
        .into_iter()
        .map(|logical| ScanPath {
            logical,
            deep: true,
            rehash: opts.rehash,
        })
        .collect();
    scan_impl(
        store,
        host,
        group,
        peers,
        roots,
        explicit,
        opts.allow_empty_roots,
    )
}

/// Scans just `paths` (deep ones with everything below them): what a watcher reports. Only the
/// records of these paths are read from the state database, so a few changes in a large tree
/// cost a few lookups.
pub fn scan_paths(
    store: &dyn StateStore,
    host: &Host,
    group: &Group,
    peers: &[String],
    paths: Vec<ScanPath>,
) -> Result<ScanReport, ScanError> {
    scan_impl(store, host, group, peers, reduce_paths(paths), true, false)
}

/// An include root's top level compared with the state database: of the names directly in the
/// root that existing recorded entries lie at or below, how many the directory holds. Shared by
/// the scan (which skips a root that [`RootContents::looks_unmounted`]) and the receiver
/// ([`crate::apply::Applier`], which then writes and deletes nothing under it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootContents {
    /// Distinct top-level names that existing recorded entries lie at or below.
    pub recorded: usize,
    /// How many of those names the directory holds.
    pub present: usize,
    /// Existing recorded entries below the root, at any depth.
    pub below: usize,
}

impl RootContents {
    /// Counts, for include root `root`, what `recorded` (paths with their recorded states; others
    /// than at or below the root are ignored) has at its top level and how many of those names
    /// `listing` (the names in the root directory) holds.
    pub fn of<'a>(
        root: &str,
        listing: &HashSet<String>,
        recorded: impl IntoIterator<Item = (&'a str, &'a FileState)>,
    ) -> RootContents {
        let mut below = 0;
        let mut top: HashSet<&str> = HashSet::new();
        for (path, st) in recorded {
            if let Some(name) = top_name(root, path)
                && st.exists()
            {
                below += 1;
                top.insert(name);
            }
        }
        RootContents {
            recorded: top.len(),
            present: top.iter().filter(|n| listing.contains(**n)).count(),
            below,
        }
    }

    /// Nothing recorded at the root's top level is there, although something is recorded under
    /// it: what the mount point of an unmounted filesystem looks like, empty or holding only
    /// entries that were never recorded (filed's temp files, a file something wrote into the bare
    /// mount point). Scanning it would record every file under it as deleted on every peer;
    /// writing into it would put files where the filesystem is not.
    pub fn looks_unmounted(&self) -> bool {
        self.recorded > 0 && self.present == 0
    }
}

/// The name directly in include root `root` that `path` lies at or below (`None` for the root
/// itself and paths not under it).
pub fn top_name<'a>(root: &str, path: &'a str) -> Option<&'a str> {
    if path == root || !is_under(path, root) {
        return None;
    }
    let rel = path[root.len()..].trim_start_matches('/');
    rel.split('/').next().filter(|n| !n.is_empty())
}

/// The names in directory `dir` (names that are not UTF-8 are never recorded: skipped).
fn dir_names(dir: &Path) -> std::io::Result<HashSet<String>> {
    let mut names = HashSet::new();
    for e in std::fs::read_dir(dir)? {
        if let Ok(n) = e?.file_name().into_string() {
            names.insert(n);
        }
    }
    Ok(names)
}

/// Whether scanning include root `root` (at `phys`) would turn everything recorded under it
/// into deletions because none of it is there (see [`RootContents::looks_unmounted`]). Such a
/// root is not scanned unless the admin says so (`filed check --allow-empty-root`), so a
/// filesystem that is not mounted when filed starts or scans never deletes the files on every
/// peer.
fn unmounted_root(
    root: &str,
    phys: &Path,
    recorded: &HashMap<String, FileState>,
) -> Option<RootContents> {
    // A root that cannot be listed is reported by the walk (nothing under it deleted).
    let listing = dir_names(phys).ok()?;
    let contents = RootContents::of(
        root,
        &listing,
        recorded.iter().map(|(p, s)| (p.as_str(), s)),
    );
    contents.looks_unmounted().then_some(contents)
}

fn scan_impl(
    store: &dyn StateStore,
    host: &Host,
    group: &Group,
    peers: &[String],
    roots: Vec<ScanPath>,
    explicit: bool,
    allow_empty_roots: bool,
) -> Result<ScanReport, ScanError> {
    let recorded: HashMap<String, FileState> = if explicit {
        let mut m = HashMap::new();
        let shallow: Vec<&str> = roots
            .iter()
            .filter(|r| !r.deep)
            .map(|r| r.logical.as_str())
            .collect();
        for (p, (st, _)) in shallow.iter().zip(
            store
                .lookup(&group.name, None, &shallow)
                .map_err(ScanError::Store)?,
        ) {
            if let Some(st) = st {
                m.insert(p.to_string(), st);
            }
        }
        for r in roots.iter().filter(|r| r.deep) {
            m.extend(
                store
                    .files_under(&group.name, &r.logical)
                    .map_err(ScanError::Store)?,
            );
        }
        m
    } else {
        store
            .files(&group.name)
            .map_err(ScanError::Store)?
            .into_iter()
            .collect()
    };
    let mut report = ScanReport::default();
    let mut seen: BTreeMap<String, FileState> = BTreeMap::new();
    let config_roots = group.filter.roots();
    let mut scanned_roots: Vec<(String, bool)> = Vec::new();
    let mut to_hash = Vec::new();
    for root in &roots {
        let ScanPath {
            logical: root,
            deep,
            rehash,
        } = root;
        if !config_roots.iter().any(|r| is_under(root, r)) {
            report.errors.push(format!(
                "{root}: not inside the includes of group {}",
                group.name
            ));
            continue;
        }
        let phys = host
            .physical(root)
            .ok_or_else(|| ScanError::NoPrefix(root.clone()))?;
        let found = std::fs::symlink_metadata(&phys).map(|m| Kind::of(m.file_type()));
        let is_config_root = config_roots.iter().any(|r| r == root);
        match start_decision(
            found.as_ref().map(|k| *k).map_err(std::io::Error::kind),
            explicit,
            is_config_root,
            recorded.get(root).map(|st| st.kind),
            allow_empty_roots,
        ) {
            Start::Scan => {}
            Start::Missing => {
                // A missing include root is probably an unmounted filesystem: never turn it into
                // a mass deletion.
                report.errors.push(format!(
                    "{root}: include root {} is missing; not scanned",
                    phys.display()
                ));
                continue;
            }
            Start::Unreadable => {
                let e = found.err().map(|e| e.to_string()).unwrap_or_default();
                report.unreadable(
                    root,
                    format_args!(
                        "cannot read {}: {e}; not scanned, nothing under it deleted",
                        phys.display()
                    ),
                );
                continue;
            }
            Start::NotADirectory(k) => {
                report.unreadable(
                    root,
                    format_args!(
                        "include root {} is recorded as a directory but is now a {}; not \
                         scanned, nothing deleted. If it was replaced on purpose: filed check \
                         --allow-empty-root",
                        phys.display(),
                        match k {
                            Kind::Symlink => "symlink",
                            _ => "file",
                        }
                    ),
                );
                continue;
            }
        }
        if *deep
            && !allow_empty_roots
            && is_config_root
            && let Some(c) = unmounted_root(root, &phys, &recorded)
        {
            report.errors.push(format!(
                "{root}: include root {} holds none of the {} entries recorded at its top level \
                 ({} recorded under it; an unmounted filesystem?); not scanned, nothing deleted. \
                 If they were removed on purpose: filed check --allow-empty-root",
                phys.display(),
                c.recorded,
                c.below
            ));
            continue;
        }
        scanned_roots.push((root.clone(), *deep));
        walk(
            group,
            root,
            &phys,
            &recorded,
            &mut seen,
            &mut report,
            &mut to_hash,
            *rehash,
            *deep,
        );
    }
    for (pending, res) in hash_all(&to_hash) {
        let mut st = pending.state.clone();
        match res {
            Ok(Some(h)) => {
                st.hash = h;
                report.hashed += 1;
                seen.insert(pending.logical.clone(), st);
            }
            Ok(None) => report.unreadable(
                &pending.logical,
                "changed while being read; will retry next check",
            ),
            Err(e) => report.unreadable(&pending.logical, e),
        }
    }
    // A host that cannot set owners keeps the owners the group has for known paths: its files
    // carry its own user, which is no change (see `crate::owner`).
    let can_set_owner = crate::owner::can_set_owner();
    if !can_set_owner {
        let agreed = agreed_states(store, host, group, &seen)?;
        for (path, st) in seen.iter_mut() {
            keep_owner(st, agreed.get(path), recorded.get(path), can_set_owner);
        }
    }

    let mut batch = Batch::new();
    let now = now_ns();
    let mark = |batch: &mut Batch, path: &str| {
        for p in peers {
            batch.push(Op::MarkDirty {
                group: group.name.clone(),
                peer: p.clone(),
                path: path.to_string(),
                force: crate::store::Force::None,
            });
        }
    };
    for (path, st) in &seen {
        match recorded.get(path) {
            Some(old) if old.same(st) => report.unchanged += 1,
            old => {
                if old.is_none_or(|o| !o.exists()) {
                    report.new.push(path.clone());
                } else {
                    report.changed.push(path.clone());
                }
                batch.push(Op::SetFile {
                    group: group.name.clone(),
                    path: path.clone(),
                    state: st.clone(),
                });
                mark(&mut batch, path);
            }
        }
    }
    let mut gone: Vec<&String> = recorded
        .iter()
        .filter(|(p, st)| {
            st.exists()
                && !seen.contains_key(*p)
                && scanned_roots
                    .iter()
                    .any(|(r, deep)| if *deep { is_under(p, r) } else { *p == r })
        })
        .map(|(p, _)| p)
        .collect();
    gone.sort();
    for path in gone {
        if under_unreadable(path, &report.unreadable) {
            continue; // unreadable, or below a directory that could not be listed: not deleted
        }
        report.deleted.push(path.clone());
        batch.push(Op::SetFile {
            group: group.name.clone(),
            path: path.clone(),
            state: FileState::deleted(now),
        });
        mark(&mut batch, path);
    }
    // Renames: a deleted file and a new file with the same content.
    let mut by_hash: HashMap<[u8; 32], &String> = HashMap::new();
    for d in &report.deleted {
        if let Some(old) = recorded.get(d).filter(|o| o.kind == Kind::File) {
            by_hash.entry(old.hash).or_insert(d);
        }
    }
    let mut renamed = Vec::new();
    for n in &report.new {
        if let Some(st) = seen.get(n).filter(|s| s.kind == Kind::File)
            && let Some(from) = by_hash.remove(&st.hash)
        {
            renamed.push((from.clone(), n.clone()));
        }
    }
    report.renamed = renamed;
    store.commit(batch).map_err(ScanError::Store)?;
    Ok(report)
}

/// For each of `seen`, the existing state last agreed with one of this host's peers in the group
/// (the first peer that has one): the owner the group agreed on (see [`keep_owner`]).
fn agreed_states(
    store: &dyn StateStore,
    host: &Host,
    group: &Group,
    seen: &BTreeMap<String, FileState>,
) -> Result<HashMap<String, FileState>, ScanError> {
    let paths: Vec<&str> = seen.keys().map(String::as_str).collect();
    let mut out: HashMap<String, FileState> = HashMap::new();
    for peer in group.peers_of(&host.name) {
        let found = store
            .lookup(&group.name, Some(&peer), &paths)
            .map_err(ScanError::Store)?;
        for (p, (_, agreed)) in paths.iter().zip(found) {
            if let Some(a) = agreed.filter(|a| a.exists())
                && !out.contains_key(*p)
            {
                out.insert(p.to_string(), a);
            }
        }
    }
    Ok(out)
}

/// A regular file whose content must be hashed (new, or size/mtime changed).
struct ToHash {
    logical: String,
    phys: PathBuf,
    state: FileState,
}

/// Hashes the files on a few threads (many small files are bound by per-file system calls).
fn hash_all(files: &[ToHash]) -> Vec<(&ToHash, std::io::Result<Option<[u8; 32]>>)> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4);
    if threads < 2 || files.len() < 64 {
        return files
            .iter()
            .map(|f| (f, hash_stable(&f.phys, &f.state)))
            .collect();
    }
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|f| (f, hash_stable(&f.phys, &f.state)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}

#[allow(clippy::too_many_arguments)]
fn walk(
    group: &Group,
    logical: &str,
    phys: &Path,
    recorded: &HashMap<String, FileState>,
    seen: &mut BTreeMap<String, FileState>,
    report: &mut ScanReport,
    to_hash: &mut Vec<ToHash>,
    rehash: bool,
    descend: bool,
) {
    let included = group.filter.included(logical);
    if included {
        let mut st = match read_state(phys, false) {
            Ok(Some(st)) => st,
            Ok(None) => return,
            Err(e) => {
                report.unreadable(logical, e);
                return;
            }
        };
        if st.kind == Kind::File {
            match recorded.get(logical) {
                Some(old)
                    if !rehash
                        && old.kind == Kind::File
                        && old.size == st.size
                        && old.mtime_ns == st.mtime_ns =>
                {
                    st.hash = old.hash;
                }
                _ => {
                    to_hash.push(ToHash {
                        logical: logical.to_string(),
                        phys: phys.to_path_buf(),
                        state: st,
                    });
                    return;
                }
            }
        }
        let is_dir = st.kind == Kind::Dir;
        seen.insert(logical.to_string(), st);
        if !is_dir || !descend {
            return;
        }
    } else {
        // Excluded: only descend when a later include rule may re-include something below.
        let reincluded = group.filter.rules().iter().any(|r| {
            r.include
                && is_path_pattern(&r.pattern)
                && is_under(&r.pattern, logical)
                && r.pattern != logical
        });
        if !reincluded || !descend || !phys.is_dir() {
            return;
        }
    }
    let entries = match std::fs::read_dir(phys) {
        Ok(e) => e,
        Err(e) => {
            report.unreadable(logical, format_args!("cannot list the directory: {e}"));
            return;
        }
    };
    let mut names = Vec::new();
    for e in entries {
        match e {
            Ok(e) => match e.file_name().into_string() {
                Ok(n) if n.starts_with(crate::apply::TEMP_PREFIX) => {
                    remove_stale_temp(&phys.join(&n), &n)
                }
                Ok(n) => names.push(n),
                Err(n) => report.errors.push(format!(
                    "{logical}/{}: name is not UTF-8; skipped",
                    n.to_string_lossy()
                )),
            },
            Err(e) => report.unreadable(logical, format_args!("cannot list the directory: {e}")),
        }
    }
    names.sort();
    for n in names {
        let child = if logical == "/" {
            format!("/{n}")
        } else {
            format!("{logical}/{n}")
        };
        walk(
            group,
            &child,
            &phys.join(&n),
            recorded,
            seen,
            report,
            to_hash,
            rehash,
            true,
        );
    }
}

/// Removes a temp file left by a filed process that no longer runs (killed during an apply).
fn remove_stale_temp(path: &Path, name: &str) {
    let pid = name[crate::apply::TEMP_PREFIX.len()..]
        .split('.')
        .next()
        .and_then(|p| p.parse::<u32>().ok());
    if let Some(pid) = pid
        && !Path::new(&format!("/proc/{pid}")).exists()
    {
        match std::fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a temp file left by a killed filed")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale temp file")
            }
        }
    }
}

/// Hashes a file and checks it did not change meanwhile (same size and mtime after reading).
fn hash_stable(phys: &Path, before: &FileState) -> std::io::Result<Option<[u8; 32]>> {
    for _ in 0..3 {
        let h = crate::entry::hash_file(phys)?;
        match read_state(phys, false)? {
            Some(after) if after.size == before.size && after.mtime_ns == before.mtime_ns => {
                return Ok(Some(h));
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::RedbStore;
    use std::time::Duration;

    pub(crate) fn setup(dir: &Path) -> (Config, RedbStore) {
        let text = format!(
            "[hosts.a]\nprefix={{d=\"{0}/a\"}}\nstate=\"{0}/a.redb\"\n[hosts.b]\nprefix={{d=\"{0}/b\"}}\n[groups.g]\nhosts=[\"a\",\"b\"]\nkey=\"k\"\ninclude=[\"%d%\"]\nexclude=[\"*~\"]\n",
            dir.display()
        );
        std::fs::create_dir_all(dir.join("a")).unwrap();
        let c = Config::parse(&text, &dir.join("f.toml")).unwrap();
        let s = RedbStore::open(&dir.join("a.redb"), Duration::ZERO).unwrap();
        (c, s)
    }

    fn run(c: &Config, s: &RedbStore) -> ScanReport {
        scan_group(
            s,
            &c.hosts["a"],
            &c.groups["g"],
            &["b".to_string()],
            None,
            ScanOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn finds_new_changed_deleted_renamed() {
        let d = tempfile::tempdir().unwrap();
        let (c, s) = setup(d.path());
        let a = d.path().join("a");
        std::fs::create_dir(a.join("sub")).unwrap();
        std::fs::write(a.join("sub/f"), b"one").unwrap();
        std::fs::write(a.join("big"), vec![7u8; 10000]).unwrap();
        std::fs::write(a.join("x~"), b"ignored").unwrap();
        std::os::unix::fs::symlink("sub/f", a.join("l")).unwrap();
        let r = run(&c, &s);
        assert_eq!(
            r.new,
            vec!["%d%", "%d%/big", "%d%/l", "%d%/sub", "%d%/sub/f"]
        );
        assert_eq!(s.dirty("g", "b").unwrap().len(), 5);
        let r = run(&c, &s);
        assert_eq!(r.changes(), 0);
        assert_eq!(r.hashed, 0, "unchanged files are not re-read");
        std::fs::write(a.join("sub/f"), b"two!").unwrap();
        std::fs::rename(a.join("big"), a.join("big2")).unwrap();
        let r = run(&c, &s);
        assert_eq!(
            r.changed
                .iter()
                .filter(|p| p.as_str() == "%d%/sub/f")
                .count(),
            1
        );
        assert_eq!(r.deleted, vec!["%d%/big"]);
        assert_eq!(
            r.renamed,
            vec![("%d%/big".to_string(), "%d%/big2".to_string())]
        );
        assert_eq!(s.file("g", "%d%/big").unwrap().unwrap().kind, Kind::Deleted);
        std::fs::remove_dir_all(a.join("sub")).unwrap();
        let r = run(&c, &s);
        assert_eq!(
            r.deleted,
            vec!["%d%/l", "%d%/sub", "%d%/sub/f"]
                .into_iter()
                .filter(|p| *p != "%d%/l")
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn missing_root_is_not_a_mass_deletion() {
        let d = tempfile::tempdir().unwrap();
        let (c, s) = setup(d.path());
        std::fs::write(d.path().join("a/f"), b"x").unwrap();
        run(&c, &s);
        std::fs::remove_dir_all(d.path().join("a")).unwrap();
        let r = run(&c, &s);
        assert!(r.deleted.is_empty());
        assert_eq!(r.errors.len(), 1);
    }

    #[test]
    fn an_empty_include_root_is_not_a_mass_deletion() {
        let d = tempfile::tempdir().unwrap();
        let (c, s) = setup(d.path());
        std::fs::create_dir(d.path().join("a/sub")).unwrap();
        std::fs::write(d.path().join("a/sub/f"), b"x").unwrap();
        std::fs::write(d.path().join("a/g"), b"y").unwrap();
        run(&c, &s);
        // The filesystem is unmounted: its mountpoint is an empty directory.
        std::fs::remove_dir_all(d.path().join("a/sub")).unwrap();
        std::fs::remove_file(d.path().join("a/g")).unwrap();
        let r = run(&c, &s);
        assert!(r.deleted.is_empty(), "{r:?}");
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("--allow-empty-root"), "{r:?}");
        // A watcher's scan of the root does not delete them either.
        let paths = vec![ScanPath {
            logical: "%d%".into(),
            deep: true,
            rehash: false,
        }];
        let r = scan_paths(&s, &c.hosts["a"], &c.groups["g"], &["b".into()], paths).unwrap();
        assert!(r.deleted.is_empty(), "{r:?}");
        // The admin confirms: the deletions are recorded.
        let opts = ScanOptions {
            allow_empty_roots: true,
            ..ScanOptions::default()
        };
        let r = scan_group(&s, &c.hosts["a"], &c.groups["g"], &["b".into()], None, opts);
        let r = r.unwrap();
        assert_eq!(r.deleted, vec!["%d%/g", "%d%/sub", "%d%/sub/f"], "{r:?}");
        // Nothing recorded under it any more: an empty root is scanned as usual.
        assert!(run(&c, &s).errors.is_empty());
    }

    #[test]
    fn a_fifo_is_skipped_with_an_error_not_read() {
        let d = tempfile::tempdir().unwrap();
        let (c, s) = setup(d.path());
        std::fs::write(d.path().join("a/f"), b"x").unwrap();
        let fifo = std::ffi::CString::new(d.path().join("a/pipe").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Opening the FIFO for reading would block for ever (no writer).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(run(&c, &s)).unwrap());
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the scan blocked on the FIFO");
        assert_eq!(r.new, vec!["%d%", "%d%/f"], "{r:?}");
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("FIFO"), "{r:?}");
    }

    #[test]
    fn only_scans_given_paths() {
        let d = tempfile::tempdir().unwrap();
        let (c, s) = setup(d.path());
        std::fs::write(d.path().join("a/f"), b"x").unwrap();
        std::fs::write(d.path().join("a/g"), b"y").unwrap();
        let r = scan_group(
            &s,
            &c.hosts["a"],
            &c.groups["g"],
            &[],
            Some(&["%d%/f".to_string()]),
            ScanOptions::default(),
        )
        .unwrap();
        assert_eq!(r.new, vec!["%d%/f"]);
        std::fs::remove_file(d.path().join("a/f")).unwrap();
        let r = scan_group(
            &s,
            &c.hosts["a"],
            &c.groups["g"],
            &[],
            Some(&["%d%/f".to_string()]),
            ScanOptions::default(),
        )
        .unwrap();
        assert_eq!(r.deleted, vec!["%d%/f"]);
    }

    fn sp(p: &str, deep: bool) -> ScanPath {
        ScanPath {
            logical: p.into(),
            deep,
            rehash: false,
        }
    }

    #[test]
    fn reduce_drops_paths_below_deep_ones() {
        let mut r = sp("%d%/x", false);
        r.rehash = true;
        let out = reduce_paths(vec![
            sp("%d%/a/b", false),
            sp("%d%/a", true),
            sp("%d%/ab", false),
            r.clone(),
            sp("%d%/x", false),
            sp("%d%/a/c/d", true),
        ]);
        assert_eq!(out, vec![sp("%d%/a", true), sp("%d%/ab", false), r]);
    }

    #[test]
    fn shallow_paths_do_not_descend_or_delete_children() {
        let d = tempfile::tempdir().unwrap();
        let (c, s) = setup(d.path());
        std::fs::create_dir(d.path().join("a/sub")).unwrap();
        std::fs::write(d.path().join("a/sub/f"), b"x").unwrap();
        run(&c, &s);
        std::fs::write(d.path().join("a/sub/new"), b"y").unwrap();
        std::fs::remove_file(d.path().join("a/sub/f")).unwrap();
        let scan = |paths| scan_paths(&s, &c.hosts["a"], &c.groups["g"], &[], paths).unwrap();
        let r = scan(vec![sp("%d%/sub", false)]);
        assert_eq!(r.changed, vec!["%d%/sub"], "directory mtime changed");
        assert!(r.new.is_empty() && r.deleted.is_empty(), "{r:?}");
        let r = scan(vec![sp("%d%/sub", true)]);
        assert_eq!(r.new, vec!["%d%/sub/new"]);
        assert_eq!(r.deleted, vec!["%d%/sub/f"]);
    }

    #[test]
    fn nothing_at_or_under_an_unreadable_path_is_deleted() {
        let u = vec!["%d%/sub".to_string(), "%d%/x/f".to_string()];
        assert!(under_unreadable("%d%/sub", &u));
        assert!(under_unreadable("%d%/sub/f", &u));
        assert!(under_unreadable("%d%/sub/a/b", &u));
        assert!(under_unreadable("%d%/x/f", &u));
        assert!(!under_unreadable("%d%/subway", &u));
        assert!(!under_unreadable("%d%/x", &u));
        assert!(!under_unreadable("%d%/x/g", &u));
        assert!(!under_unreadable("%d%/sub", &[]));
        assert!(under_unreadable("/etc/f", &["/".to_string()]));
    }

    #[test]
    fn start_decisions() {
        use std::io::ErrorKind::{
            NotConnected, NotFound, PermissionDenied, StaleNetworkFileHandle,
        };
        let d =
            |found, explicit, root, rec, allow| start_decision(found, explicit, root, rec, allow);
        let dir = Some(Kind::Dir);
        assert_eq!(d(Ok(Kind::Dir), false, true, dir, false), Start::Scan);
        assert_eq!(d(Err(NotFound), false, true, dir, false), Start::Missing);
        assert_eq!(d(Err(NotFound), true, true, dir, false), Start::Scan);
        for e in [NotConnected, StaleNetworkFileHandle, PermissionDenied] {
            assert_eq!(d(Err(e), false, true, dir, false), Start::Unreadable);
            assert_eq!(d(Err(e), true, false, dir, true), Start::Unreadable);
        }
        let sym = Start::NotADirectory(Kind::Symlink);
        assert_eq!(d(Ok(Kind::Symlink), false, true, dir, false), sym);
        assert_eq!(d(Ok(Kind::Symlink), true, true, dir, false), sym);
        assert_eq!(
            d(Ok(Kind::File), false, true, dir, false),
            Start::NotADirectory(Kind::File)
        );
        // confirmed by the admin; a root not recorded as a directory; a path that is no root
        assert_eq!(d(Ok(Kind::Symlink), false, true, dir, true), Start::Scan);
        assert_eq!(d(Ok(Kind::Symlink), false, true, None, false), Start::Scan);
        let link = Some(Kind::Symlink);
        assert_eq!(d(Ok(Kind::Symlink), false, true, link, false), Start::Scan);
        assert_eq!(d(Ok(Kind::Symlink), true, false, dir, false), Start::Scan);
    }

    #[test]
    fn an_include_root_that_cannot_be_examined_is_not_a_mass_deletion() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "[hosts.a]\nprefix={{d=\"{0}/p/a\"}}\n[hosts.b]\nprefix={{d=\"{0}/b\"}}\n[groups.g]\nhosts=[\"a\",\"b\"]\nkey=\"k\"\ninclude=[\"%d%\"]\n",
            d.path().display()
        );
        let c = Config::parse(&text, &d.path().join("f.toml")).unwrap();
        let s = RedbStore::open(&d.path().join("a.redb"), Duration::ZERO).unwrap();
        std::fs::create_dir_all(d.path().join("p/a/sub")).unwrap();
        std::fs::write(d.path().join("p/a/sub/f"), b"x").unwrap();
        assert_eq!(run(&c, &s).new, vec!["%d%", "%d%/sub", "%d%/sub/f"]);
        // stat of the root fails with ENOTDIR, not NotFound (as ENOTCONN of a crashed FUSE mount)
        std::fs::rename(d.path().join("p"), d.path().join("p.old")).unwrap();
        std::fs::write(d.path().join("p"), b"").unwrap();
        let r = run(&c, &s);
        assert!(r.deleted.is_empty(), "{r:?}");
        assert_eq!(r.unreadable, vec!["%d%"], "{r:?}");
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("nothing under it deleted"), "{r:?}");
        let scan = |p| scan_paths(&s, &c.hosts["a"], &c.groups["g"], &["b".into()], vec![p]);
        let r = scan(sp("%d%", true)).unwrap();
        assert!(r.deleted.is_empty(), "{r:?}");
        assert_eq!(r.unreadable, vec!["%d%"], "{r:?}");
        let r = scan(sp("%d%/sub/f", false)).unwrap();
        assert!(r.deleted.is_empty(), "{r:?}");
        assert_eq!(r.unreadable, vec!["%d%/sub/f"], "{r:?}");
        assert_eq!(s.file("g", "%d%/sub/f").unwrap().unwrap().kind, Kind::File);
        assert!(s.dirty("g", "b").unwrap().len() == 3, "nothing new to send");
    }

    #[test]
    fn an_include_root_replaced_by_a_symlink_is_not_scanned() {
        let d = tempfile::tempdir().unwrap();
        let (c, s) = setup(d.path());
        let a = d.path().join("a");
        std::fs::create_dir(a.join("sub")).unwrap();
        std::fs::write(a.join("sub/f"), b"x").unwrap();
        run(&c, &s);
        std::fs::rename(&a, d.path().join("a.old")).unwrap();
        std::fs::create_dir(d.path().join("elsewhere")).unwrap();
        std::fs::write(d.path().join("elsewhere/g"), b"y").unwrap();
        std::os::unix::fs::symlink(d.path().join("elsewhere"), &a).unwrap();
        let r = run(&c, &s);
        assert!(
            r.deleted.is_empty() && r.new.is_empty() && r.changed.is_empty(),
            "{r:?}"
        );
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("is now a symlink"), "{r:?}");
        // a watcher's deep scan of the root neither
        let r = scan_paths(
            &s,
            &c.hosts["a"],
            &c.groups["g"],
            &["b".into()],
            vec![sp("%d%", true)],
        )
        .unwrap();
        assert!(r.deleted.is_empty() && r.changed.is_empty(), "{r:?}");
        assert_eq!(s.file("g", "%d%").unwrap().unwrap().kind, Kind::Dir);
        // the admin confirms: the root is recorded as the symlink, what was under it deleted
        let opts = ScanOptions {
            allow_empty_roots: true,
            ..ScanOptions::default()
        };
        let r = scan_group(&s, &c.hosts["a"], &c.groups["g"], &["b".into()], None, opts).unwrap();
        assert_eq!(r.changed, vec!["%d%"], "{r:?}");
        assert_eq!(r.deleted, vec!["%d%/sub", "%d%/sub/f"], "{r:?}");
        assert_eq!(s.file("g", "%d%").unwrap().unwrap().kind, Kind::Symlink);
    }

    #[test]
    fn root_contents_count_recorded_top_level_names_present() {
        let f = |kind| FileState {
            kind,
            ..FileState::deleted(1)
        };
        let (file, dir, gone) = (f(Kind::File), f(Kind::Dir), f(Kind::Deleted));
        let recorded = [
            ("%d%", &dir),
            ("%d%/etc", &dir),
            ("%d%/etc/x", &file),
            ("%d%/f", &file),
            ("%d%/old", &gone),
            ("%d%x/y", &file),
            ("%e%/z", &file),
        ];
        let listing = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        let c = RootContents::of("%d%", &listing(&[]), recorded);
        assert_eq!((c.recorded, c.present, c.below), (2, 0, 3));
        assert!(c.looks_unmounted());
        // entries never recorded (a temp file, a file written into the bare mount point) or
        // recorded as deleted do not make it look mounted
        let c = RootContents::of(
            "%d%",
            &listing(&[".filed.tmp.1.2.3", "stray", "old"]),
            recorded,
        );
        assert!(c.looks_unmounted(), "{c:?}");
        let c = RootContents::of("%d%", &listing(&["f", "stray"]), recorded);
        assert_eq!((c.recorded, c.present), (2, 1));
        assert!(!c.looks_unmounted());
        // nothing recorded under it: a new tree, not an unmounted one
        let c = RootContents::of("%e%/z", &listing(&[]), recorded);
        assert!(!c.looks_unmounted(), "{c:?}");
        let c = RootContents::of("/", &listing(&["srv"]), [("/srv/www", &file)]);
        assert_eq!((c.recorded, c.present), (1, 1));
        assert_eq!(top_name("%d%", "%d%/a/b"), Some("a"));
        assert_eq!(top_name("%d%", "%d%"), None);
        assert_eq!(top_name("%d%", "%dx/a"), None);
    }

    #[test]
    fn an_include_root_holding_only_unrecorded_entries_is_not_a_mass_deletion() {
        let d = tempfile::tempdir().unwrap();
        let (c, s) = setup(d.path());
        let a = d.path().join("a");
        std::fs::create_dir(a.join("sub")).unwrap();
        std::fs::write(a.join("sub/f"), b"x").unwrap();
        std::fs::write(a.join("g"), b"y").unwrap();
        run(&c, &s);
        // Unmounted: the bare mount point holds a temp file of a running filed and a file some
        // program wrote there, none of them recorded.
        std::fs::remove_dir_all(a.join("sub")).unwrap();
        std::fs::remove_file(a.join("g")).unwrap();
        let temp = format!("{}{}.1.2", crate::apply::TEMP_PREFIX, std::process::id());
        std::fs::write(a.join(&temp), b"").unwrap();
        std::fs::write(a.join("stray.pid"), b"1").unwrap();
        let r = run(&c, &s);
        assert!(r.deleted.is_empty() && r.new.is_empty(), "{r:?}");
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("--allow-empty-root"), "{r:?}");
        assert!(s.dirty("g", "b").unwrap().len() == 4, "nothing new to send");
        // Mounted again: scanned as usual (one recorded name there is enough).
        std::fs::write(a.join("g"), b"y").unwrap();
        let r = run(&c, &s);
        assert_eq!(r.deleted, vec!["%d%/sub", "%d%/sub/f"], "{r:?}");
        assert_eq!(r.new, vec!["%d%/stray.pid"], "{r:?}");
    }
}
