//! Safe local writes of a peer's changes. Every path is checked (inside the group's includes, no
//! `..`, no absolute or relative tricks) and reached by walking directories from the include root
//! with `openat(O_NOFOLLOW)`, so a symlinked parent directory cannot redirect a write outside.
//! Files are written to a temp file in the target directory, given their metadata, fsynced and
//! renamed over the target; the old version first goes to the backup directory (N generations).
//! A crash at any point leaves the old or the new file, never a partial one.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Group, Host};
use crate::entry::{FileState, Kind};
use crate::filter::{PathRejected, is_under};
use crate::scan::RootContents;
use crate::store::{StateStore, StoreError};
use crate::written::FileId;

/// Prefix of temp files; scans skip these names.
pub const TEMP_PREFIX: &str = ".filed.tmp.";

/// Batches of up to this many received files are flushed file by file (`fsync`), larger ones
/// with one `syncfs` (see [`Applier::commit_files`]).
pub const PER_FILE_FSYNC_MAX: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused path")]
    Rejected(#[source] PathRejected),
    #[error(
        "{path}: a parent directory is a symlink or not a directory; refusing to write through it"
    )]
    SymlinkEscape { path: String },
    #[error("{path}: prefix not defined on this host")]
    NoPrefix { path: String },
    #[error("{path}: {op} failed")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: directory is not empty; not removed")]
    NotEmpty { path: String },
    #[error("{path}: refusing to remove an include root")]
    RootRemoval { path: String },
    #[error(
        "{path}: include root {} is missing (an unmounted filesystem?); not created, nothing \
         written or deleted under it",
        root.display()
    )]
    RootMissing { path: String, root: PathBuf },
    #[error(
        "{path}: include root {} is not a directory (a symlink is never followed); nothing \
         written or deleted under it",
        root.display()
    )]
    RootNotADirectory { path: String, root: PathBuf },
    #[error(
        "{path}: include root {} holds none of the {recorded} entries recorded at its top level \
         (an unmounted filesystem?); nothing written or deleted under it",
        root.display()
    )]
    RootLooksUnmounted {
        path: String,
        root: PathBuf,
        recorded: usize,
    },
    #[error("{path}: reading what is recorded under the include root failed")]
    RootRecords {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("{path}: an include root can only be a directory; refusing to put a {kind} there")]
    RootReplacement { path: String, kind: &'static str },
    #[error("{path} changed here since the decision; kept, will be decided again")]
    ChangedSinceDecision { path: String },
    #[error("{path}: rename source changed (expected size {size}, mtime {mtime_ns})")]
    RenameSourceChanged {
        path: String,
        size: u64,
        mtime_ns: i64,
    },
}

fn io_err<'a>(path: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> ApplyError + 'a {
    move |source| ApplyError::Io {
        path: path.to_string(),
        op,
        source,
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("paths are checked for NUL before use")
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn openat(
    dir: &OwnedFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is a valid open descriptor and `name` a NUL-terminated string; the returned
    // descriptor is owned by nobody else.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    })?;
    // SAFETY: fd was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: c is NUL-terminated; the returned descriptor is owned by nobody else.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just returned by open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A path that reaches the directory open as `dir` (for std calls that take a path).
fn fd_path(dir: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

fn fstatat(dir: &OwnedFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    // SAFETY: an all-zero stat is a valid value for this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated name, st points to writable memory of the right type.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(st))
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}
fn is_link(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

/// The state of a non-symlink from its `stat` (no hash), as [`FileState::from_metadata`] builds it.
fn state_from_stat(st: &libc::stat) -> FileState {
    let kind = if is_dir(st) { Kind::Dir } else { Kind::File };
    FileState {
        kind,
        size: if kind == Kind::File {
            st.st_size as u64
        } else {
            0
        },
        mtime_ns: st
            .st_mtime
            .saturating_mul(1_000_000_000)
            .saturating_add(st.st_mtime_nsec),
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        target: None,
        hash: crate::entry::NO_HASH,
    }
}

fn is_reg(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn timespec(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

/// The parent directory of a target, opened safely, and the target's name in it.
pub struct Target {
    pub logical: String,
    dir: Arc<OwnedFd>,
    name: CString,
}

/// A new file being received: written to a temp file next to its target.
pub struct PendingFile {
    pub file: File,
    target: Target,
    tmp: CString,
    /// What the decision assumed is at the target (`None`: nothing): checked again just before
    /// the rename, which comes long after the check before the data (a batch of files).
    expected: Option<FileState>,
    done: bool,
}

impl PendingFile {
    /// The logical path this file will replace.
    pub fn logical(&self) -> &str {
        &self.target.logical
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: valid descriptor and NUL-terminated name.
            unsafe { libc::unlinkat(self.target.dir.as_raw_fd(), self.tmp.as_ptr(), 0) };
        }
    }
}

/// Applies changes to one group's trees on this host.
pub struct Applier {
    group: Group,
    roots: Vec<(String, PathBuf)>,
    /// The state database: what is recorded under an include root tells an unmounted
    /// filesystem's mount point from the tree (see [`RootContents::looks_unmounted`]).
    store: Arc<dyn StateStore>,
    /// Include roots found usable by this applier (device and inode of the directory opened):
    /// checked once, again only when another directory is at the root's path.
    usable_roots: Mutex<HashSet<(u64, u64)>>,
    /// Include roots checked for writing by this applier (see [`Applier::target`]).
    writable_roots: Mutex<HashSet<String>>,
    /// Every filesystem this applier changed since the last [`Applier::sync`] (a root may hold
    /// mount points): its device, a descriptor on it and a path changed there (for errors).
    changed: Mutex<HashMap<libc::dev_t, (OwnedFd, String)>>,
    backup: Option<PathBuf>,
    generations: u32,
    /// Parent directories already walked safely (logical path → descriptor), so a batch of files
    /// in one directory costs one walk. Cleared whenever this applier removes a directory.
    dir_cache: Mutex<HashMap<String, Arc<OwnedFd>>>,
    /// What this applier wrote: logical path, its state as written (files and directories; from
    /// the written inode itself, before any rename) and its identity on disk.
    written: Mutex<Vec<Written>>,
}

/// One path written by an [`Applier`].
#[derive(Debug, Clone)]
pub struct Written {
    pub logical: String,
    /// Kind, size, mtime, mode and owner as written (no hash); `None` for symlinks.
    pub state: Option<FileState>,
    pub id: FileId,
}

fn fstat(f: &impl AsRawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer to a stat.
    cvt(unsafe { libc::fstat(f.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// Names of an include root looked up in the state database at a time (see
/// [`Applier::open_root`]).
const LOOKUP_CHUNK: usize = 64;

/// Entries kept in [`Applier::dir_cache`] before it is emptied.
const DIR_CACHE_MAX: usize = 4096;

impl Applier {
    pub fn new(
        host: &Host,
        group: &Group,
        store: Arc<dyn StateStore>,
    ) -> Result<Applier, ApplyError> {
        let mut roots = Vec::new();
        for r in group.filter.roots() {
            let phys = host
                .physical(&r)
                .ok_or_else(|| ApplyError::NoPrefix { path: r.clone() })?;
            roots.push((r, phys));
        }
        // Longest root first so nested lookups pick the deepest.
        roots.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));
        let backup = match &group.backup_directory {
            Some(b) => Some(
                host.physical(b)
                    .ok_or_else(|| ApplyError::NoPrefix { path: b.clone() })?,
            ),
            None => None,
        };
        Ok(Applier {
            group: group.clone(),
            roots,
            store,
            usable_roots: Mutex::new(HashSet::new()),
            writable_roots: Mutex::new(HashSet::new()),
            changed: Mutex::new(HashMap::new()),
            backup,
            generations: group.backup_generations,
            dir_cache: Mutex::new(HashMap::new()),
            written: Mutex::new(Vec::new()),
        })
    }

    fn note(&self, logical: &str, st: &libc::stat, with_state: bool) {
        self.written.lock().expect("lock poisoned").push(Written {
            logical: logical.to_string(),
            state: with_state.then(|| state_from_stat(st)),
            id: FileId::from_stat(st),
        });
    }

    /// Everything written so far (and forgets it).
    pub fn take_written(&self) -> Vec<Written> {
        std::mem::take(&mut *self.written.lock().expect("lock poisoned"))
    }

    /// The state of `logical` as this applier last wrote it (no hash), if it did.
    pub fn written_state(&self, logical: &str) -> Option<FileState> {
        self.written
            .lock()
            .expect("lock poisoned")
            .iter()
            .rev()
            .find(|w| w.logical == logical)
            .and_then(|w| w.state.clone())
    }

    /// Checks a logical path and opens its parent directory (creating missing parents when
    /// `create` is set) without following any symlink below the include root.
    pub fn target(&self, logical: &str, create: bool) -> Result<Option<Target>, ApplyError> {
        self.group
            .filter
            .check(logical)
            .map_err(ApplyError::Rejected)?;
        let (root, phys) = self
            .roots
            .iter()
            .find(|(r, _)| is_under(logical, r))
            .ok_or_else(|| ApplyError::Rejected(PathRejected::Outside(logical.into())))?;
        let rel = logical[root.len()..].trim_start_matches('/');
        if rel.is_empty() {
            // The include root itself (a directory, or a file for a single-file include):
            // addressed from its parent directory (set up by the admin). A symlink there is
            // neither followed nor replaced (the scan records it as a symlink and walks nothing
            // under it).
            let (parent, name) = self.open_root_parent(logical, phys)?;
            if fstatat(&parent, &name)
                .ok()
                .flatten()
                .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
            {
                return Err(ApplyError::RootNotADirectory {
                    path: logical.into(),
                    root: phys.to_path_buf(),
                });
            }
            return Ok(Some(Target {
                logical: logical.into(),
                dir: Arc::new(parent),
                name,
            }));
        }
        let comps: Vec<&str> = rel.split('/').collect();
        let (last, parents) = comps.split_last().expect("non-empty");
        let parent_key = &logical[..logical.len() - last.len()];
        if create && !self.writable_roots().contains(root) {
            // A directory cached by a read does not say the root may be written into: check it
            // once (the unmounted-root check of `open_root`) before any write under it.
            self.open_root(logical, root, phys, true)?;
            self.writable_roots().insert(root.clone());
        }
        if let Some(dir) = self.cache().get(parent_key) {
            return Ok(Some(Target {
                logical: logical.into(),
                dir: dir.clone(),
                name: cstr(last),
            }));
        }
        let (_, _, mut dir) = self.open_root(logical, root, phys, create)?;
        for c in parents {
            let name = cstr(c);
            let flags = libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY;
            dir = match openat(&dir, &name, flags, 0) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    self.touch_dir(logical, &dir)?;
                    // SAFETY: valid descriptor and NUL-terminated name.
                    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) };
                    if rc < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::AlreadyExists {
                            return Err(io_err(logical, "create parent directory")(e));
                        }
                    }
                    openat(&dir, &name, flags, 0).map_err(|_| ApplyError::SymlinkEscape {
                        path: logical.into(),
                    })?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e)
                    if e.raw_os_error() == Some(libc::ELOOP)
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    return Err(ApplyError::SymlinkEscape {
                        path: logical.into(),
                    });
                }
                Err(e) => return Err(io_err(logical, "open parent directory")(e)),
            };
        }
        let dir = Arc::new(dir);
        let mut cache = self.cache();
        if cache.len() >= DIR_CACHE_MAX {
            cache.clear();
        }
        cache.insert(parent_key.to_string(), dir.clone());
        Ok(Some(Target {
            logical: logical.into(),
            dir,
            name: cstr(last),
        }))
    }

    /// The parent directory of include root `phys` (the admin's path, followed like any
    /// configured path) and the root's name in it.
    fn open_root_parent(
        &self,
        logical: &str,
        phys: &Path,
    ) -> Result<(OwnedFd, CString), ApplyError> {
        let (parent_path, name) = match phys.file_name() {
            Some(n) => (
                phys.parent().unwrap_or(Path::new("/")),
                CString::new(n.as_bytes()).expect("paths hold no NUL"),
            ),
            None => (phys, cstr(".")),
        };
        match open_dir_path(parent_path) {
            Ok(d) => Ok((d, name)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ApplyError::RootMissing {
                path: logical.into(),
                root: phys.to_path_buf(),
            }),
            Err(e) => Err(io_err(logical, "open the include root's parent")(e)),
        }
    }

    /// Opens include root `root` (at `phys`) for a path under it: the root's parent, the root's
    /// name in it and the root itself, never through a symlink (the scan records a symlinked
    /// root as a symlink and sees nothing under it: what was written there would be taken as
    /// deleted and deleted on every peer). Refused, like the scan skips it: a root that is missing (not created for a
    /// path under it: it may be the mount point of an unmounted filesystem) or not a directory;
    /// and for a write (`create`), a root holding none of what is recorded under it (an
    /// unmounted filesystem's mount point: a file written there would make the next scan take
    /// every recorded file as deleted, on every peer). Reads and deletions there find nothing
    /// and change nothing.
    fn open_root(
        &self,
        logical: &str,
        root: &str,
        phys: &Path,
        create: bool,
    ) -> Result<(OwnedFd, CString, OwnedFd), ApplyError> {
        let (parent, name) = self.open_root_parent(logical, phys)?;
        let flags = libc::O_DIRECTORY | libc::O_RDONLY;
        let opened = openat(&parent, &name, flags | libc::O_NOFOLLOW, 0);
        let dir = match opened {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ApplyError::RootMissing {
                    path: logical.into(),
                    root: phys.to_path_buf(),
                });
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => {
                return Err(ApplyError::RootNotADirectory {
                    path: logical.into(),
                    root: phys.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err(logical, "open include root")(e)),
        };
        if !create {
            return Ok((parent, name, dir));
        }
        let st = fstat(&dir).map_err(io_err(logical, "stat include root"))?;
        let id = (st.st_dev, st.st_ino);
        if !self.usable().contains(&id) {
            if let Some(c) = self.unmounted_root(logical, root, &dir)? {
                return Err(ApplyError::RootLooksUnmounted {
                    path: logical.into(),
                    root: phys.to_path_buf(),
                    recorded: c.recorded,
                });
            }
            self.usable().insert(id);
        }
        Ok((parent, name, dir))
    }

    /// What is recorded at the top level of include root `root` (open as `dir`) when none of it
    /// is there ([`RootContents::looks_unmounted`]); `None` when the root holds some of it or
    /// nothing is recorded. The names in the root are looked up first, as the directory is read:
    /// one recorded name there settles it, so a usable root costs a few lookups, not a read of
    /// all its records (those are read only when none of its names is recorded).
    fn unmounted_root(
        &self,
        logical: &str,
        root: &str,
        dir: &OwnedFd,
    ) -> Result<Option<RootContents>, ApplyError> {
        let records = |source| ApplyError::RootRecords {
            path: logical.into(),
            source,
        };
        let mut entries =
            std::fs::read_dir(fd_path(dir)).map_err(io_err(logical, "list include root"))?;
        let mut listing = HashSet::new();
        let mut chunk: Vec<String> = Vec::with_capacity(LOOKUP_CHUNK);
        let mut listed = false;
        while !listed {
            chunk.clear();
            while chunk.len() < LOOKUP_CHUNK {
                let Some(entry) = entries.next() else {
                    listed = true;
                    break;
                };
                let entry = entry.map_err(io_err(logical, "list include root"))?;
                // Names that are not UTF-8 are never recorded.
                if let Ok(name) = entry.file_name().into_string() {
                    chunk.push(if root == "/" {
                        format!("/{name}")
                    } else {
                        format!("{root}/{name}")
                    });
                    listing.insert(name);
                }
            }
            let paths: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let found = self
                .store
                .lookup(&self.group.name, None, &paths)
                .map_err(records)?;
            if found
                .iter()
                .any(|(st, _)| st.as_ref().is_some_and(|s| s.exists()))
            {
                return Ok(None);
            }
        }
        let recorded = self
            .store
            .files_under(&self.group.name, root)
            .map_err(records)?;
        let contents = RootContents::of(
            root,
            &listing,
            recorded.iter().map(|(p, s)| (p.as_str(), s)),
        );
        Ok(contents.looks_unmounted().then_some(contents))
    }

    fn writable_roots(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.writable_roots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, u64)>> {
        self.usable_roots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses to put anything but a directory at an include root's own path: a symlink there
    /// would lead every later write wherever it points, a file would take the tree's place (and
    /// an emptied root directory would be removed for it).
    ///
    /// A root that is a regular file here, or missing, is a single-file include: a file may
    /// replace it. A root that is a directory or a symlink (the admin's) here is never replaced,
    /// and a symlink is never put at a root's path (later writes under it would follow it).
    fn refuse_root_replacement(&self, logical: &str, kind: Kind) -> Result<(), ApplyError> {
        let Some((_, phys)) = self.roots.iter().find(|(r, _)| r == logical) else {
            return Ok(());
        };
        if kind == Kind::Dir {
            return Ok(());
        }
        let here = std::fs::symlink_metadata(phys);
        let single_file = match &here {
            Ok(md) => md.is_file(),
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        };
        if single_file && kind == Kind::File {
            return Ok(());
        }
        Err(ApplyError::RootReplacement {
            path: logical.into(),
            kind: kind.name(),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<OwnedFd>>> {
        self.dir_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn need_target(&self, logical: &str) -> Result<Target, ApplyError> {
        self.target(logical, true)?
            .ok_or_else(|| io_err(logical, "open parent")(io::ErrorKind::NotFound.into()))
    }

    /// Opens the current regular file at `logical` for reading (the base of a delta).
    pub fn open_current(&self, logical: &str) -> Result<Option<File>, ApplyError> {
        let Some(t) = self.target(logical, false)? else {
            return Ok(None);
        };
        // Non-blocking: a FIFO in the file's place is found below instead of blocking here.
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        match openat(&t.dir, &t.name, flags, 0) {
            Ok(fd) => {
                let f = File::from(fd);
                let md = f.metadata().map_err(io_err(logical, "stat"))?;
                Ok(if md.is_file() { Some(f) } else { None })
            }
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) =>
            {
                Ok(None)
            }
            Err(e) => Err(io_err(logical, "open")(e)),
        }
    }

    /// Starts receiving a regular file: a temp file in the target's directory. `expected` is what
    /// the decision assumed is at the target (see [`unchanged_since_decision`]): the file
    /// replaces only that.
    pub fn begin_file(
        &self,
        logical: &str,
        expected: Option<&FileState>,
    ) -> Result<PendingFile, ApplyError> {
        self.refuse_root_replacement(logical, Kind::File)?;
        let target = self.need_target(logical)?;
        for attempt in 0..100u32 {
            let tmp = cstr(&temp_name(attempt));
            match openat(
                &target.dir,
                &tmp,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            ) {
                Ok(fd) => {
                    return Ok(PendingFile {
                        file: File::from(fd),
                        target,
                        tmp,
                        expected: expected.cloned(),
                        done: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(logical, "create temp file")(e)),
            }
        }
        Err(io_err(logical, "create temp file")(
            io::ErrorKind::AlreadyExists.into(),
        ))
    }

    /// Finishes a received file: metadata, fsync, backup of the old version, atomic rename, and
    /// the directory fsynced.
    pub fn commit_file(&self, p: PendingFile, state: &FileState) -> Result<(), ApplyError> {
        let logical = p.target.logical.clone();
        let dir = p.target.dir.clone();
        let (_, res) = self
            .commit_files(vec![(p, state.clone())])
            .pop()
            .expect("one result per file");
        res?;
        fsync_dir(&dir).map_err(io_err(&logical, "fsync directory"))
    }

    /// Finishes many received files with two filesystem flushes instead of two per file: metadata
    /// on every temp file, their contents made durable, then backups and renames; the caller ends
    /// the batch with [`Applier::sync`] before recording it as agreed. Up to
    /// [`PER_FILE_FSYNC_MAX`] files are flushed with one `fsync` each (a daemon's typical batch:
    /// the file becomes visible without waiting for every other dirty file on the filesystem);
    /// larger batches with one `syncfs`. Either way no rename happens before its content is
    /// durable.
    pub fn commit_files(
        &self,
        batch: Vec<(PendingFile, FileState)>,
    ) -> Vec<(String, Result<(), ApplyError>)> {
        let mut ready = Vec::with_capacity(batch.len());
        let mut out = Vec::with_capacity(batch.len());
        for (p, st) in batch {
            let logical = p.target.logical.clone();
            match set_file_meta(&p.file, &st).and_then(|_| fstat(&p.file)) {
                Ok(written) => ready.push((p, written)),
                Err(e) => out.push((logical.clone(), Err(io_err(&logical, "set metadata")(e)))),
            }
        }
        if ready.len() <= PER_FILE_FSYNC_MAX {
            let mut synced = Vec::with_capacity(ready.len());
            for (p, written) in ready.drain(..) {
                match p.file.sync_all() {
                    Ok(()) => synced.push((p, written)),
                    Err(e) => {
                        let logical = p.target.logical.clone();
                        out.push((logical.clone(), Err(io_err(&logical, "fsync")(e))));
                    }
                }
            }
            ready = synced;
        } else {
            // One syncfs per filesystem written to: the files of one batch may lie on several
            // (roots on different filesystems, a filesystem mounted inside a root).
            let mut failed: HashMap<libc::dev_t, io::Error> = HashMap::new();
            for i in first_per_device(ready.iter().map(|(_, written)| written.st_dev)) {
                let (p, written) = &ready[i];
                // SAFETY: valid descriptor.
                if let Err(e) = cvt(unsafe { libc::syncfs(p.file.as_raw_fd()) }) {
                    failed.insert(written.st_dev, e);
                }
            }
            if !failed.is_empty() {
                let (lost, synced): (Vec<_>, Vec<_>) = std::mem::take(&mut ready)
                    .into_iter()
                    .partition(|(_, written)| failed.contains_key(&written.st_dev));
                ready = synced;
                for (p, written) in lost {
                    let e = &failed[&written.st_dev];
                    let e = io::Error::new(e.kind(), e.to_string());
                    let logical = p.target.logical.clone();
                    out.push((logical.clone(), Err(io_err(&logical, "syncfs")(e))));
                }
            }
        }
        for (mut p, written) in ready {
            let logical = p.target.logical.clone();
            // A local change made while the data streamed in is kept (the temp file is dropped):
            // this is the last moment before the old version is replaced.
            let res = self
                .refuse_changed(&p)
                .and_then(|_| self.touch(&logical, written.st_dev, p.target.dir.as_fd()))
                .and_then(|_| self.clear_for(&p.target, false))
                .and_then(|_| {
                    // SAFETY: valid descriptors and NUL-terminated names.
                    cvt(unsafe {
                        libc::renameat(
                            p.target.dir.as_raw_fd(),
                            p.tmp.as_ptr(),
                            p.target.dir.as_raw_fd(),
                            p.target.name.as_ptr(),
                        )
                    })
                    .map(|_| ())
                    .map_err(io_err(&logical, "rename into place"))
                });
            if res.is_ok() {
                p.done = true;
                self.note(&logical, &written, true);
            }
            out.push((logical, res));
        }
        out
    }

    /// Refuses a received file whose target is no longer what the decision assumed.
    fn refuse_changed(&self, p: &PendingFile) -> Result<(), ApplyError> {
        let now = self.state_at(&p.target)?;
        if unchanged_since_decision(p.expected.as_ref(), now.as_ref()) {
            Ok(())
        } else {
            Err(ApplyError::ChangedSinceDecision {
                path: p.target.logical.clone(),
            })
        }
    }

    /// Makes every change so far durable (renames, deletions, directory entries, metadata): one
    /// `syncfs` per filesystem this applier changed, include roots' and those mounted inside them.
    pub fn sync(&self) -> Result<(), ApplyError> {
        let mut changed = self.changed();
        for (fd, logical) in changed.values() {
            // SAFETY: valid descriptor.
            cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map_err(io_err(logical, "syncfs"))?;
        }
        changed.clear();
        Ok(())
    }

    /// The devices of the filesystems changed since the last [`Applier::sync`].
    pub fn changed_filesystems(&self) -> Vec<libc::dev_t> {
        let mut devs: Vec<libc::dev_t> = self.changed().keys().copied().collect();
        devs.sort_unstable();
        devs
    }

    fn changed(&self) -> std::sync::MutexGuard<'_, HashMap<libc::dev_t, (OwnedFd, String)>> {
        self.changed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers filesystem `dev` (`fd` is on it) for [`Applier::sync`]: `logical` is about to
    /// change there.
    fn touch(&self, logical: &str, dev: libc::dev_t, fd: BorrowedFd<'_>) -> Result<(), ApplyError> {
        let mut changed = self.changed();
        if let std::collections::hash_map::Entry::Vacant(e) = changed.entry(dev) {
            let fd = fd
                .try_clone_to_owned()
                .map_err(io_err(logical, "duplicate descriptor"))?;
            e.insert((fd, logical.to_string()));
        }
        Ok(())
    }

    /// [`Applier::touch`] for the filesystem of directory `dir`, whose entries are about to change.
    fn touch_dir(&self, logical: &str, dir: &OwnedFd) -> Result<(), ApplyError> {
        let st = fstat(dir).map_err(io_err(logical, "stat directory"))?;
        self.touch(logical, st.st_dev, dir.as_fd())
    }

    /// Makes the target free for a new non-directory entry: backs up and removes an old file or
    /// symlink (kept when `keep_file`), removes an empty directory.
    fn clear_for(&self, t: &Target, remove_file: bool) -> Result<(), ApplyError> {
        let Some(st) = fstatat(&t.dir, &t.name).map_err(io_err(&t.logical, "stat"))? else {
            return Ok(());
        };
        if is_dir(&st) {
            self.touch_dir(&t.logical, &t.dir)?;
            // Cached descriptors may point into the directory being removed.
            self.cache().clear();
            // SAFETY: valid descriptor and NUL-terminated name.
            let rc =
                unsafe { libc::unlinkat(t.dir.as_raw_fd(), t.name.as_ptr(), libc::AT_REMOVEDIR) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOTEMPTY)
                    || e.raw_os_error() == Some(libc::EEXIST)
                {
                    return Err(ApplyError::NotEmpty {
                        path: t.logical.clone(),
                    });
                }
                return Err(io_err(&t.logical, "remove directory")(e));
            }
            return Ok(());
        }
        if is_reg(&st) {
            self.backup(t)?;
        }
        if remove_file {
            self.touch_dir(&t.logical, &t.dir)?;
            // SAFETY: valid descriptor and NUL-terminated name.
            cvt(unsafe { libc::unlinkat(t.dir.as_raw_fd(), t.name.as_ptr(), 0) })
                .map_err(io_err(&t.logical, "remove"))?;
        }
        Ok(())
    }

    /// Keeps the current regular file at the target as backup generation 1 (older ones shift).
    /// The copy is made under a temporary name first: generations are rotated only once it
    /// exists, so a backup that fails (a full backup filesystem) leaves the older ones as they
    /// were and no partial copy behind.
    fn backup(&self, t: &Target) -> Result<(), ApplyError> {
        let Some(dir) = &self.backup else {
            return Ok(());
        };
        if self.generations == 0 {
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(io_err(&t.logical, "create backup directory"))?;
        let base = t.logical.replace('/', "_");
        let gen_path = |n: u32| dir.join(format!("{base}.{n}"));
        let tmp = dir.join(temp_name("backup"));
        if let Err(e) = self.copy_for_backup(t, &tmp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let _ = std::fs::remove_file(gen_path(self.generations));
        for n in (1..self.generations).rev() {
            let _ = std::fs::rename(gen_path(n), gen_path(n + 1));
        }
        std::fs::rename(&tmp, gen_path(1)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(&t.logical, "rename backup")(e)
        })
    }

    /// The current file at `t` as `dest`: a hard link (cheap, same filesystem) or a synced copy.
    fn copy_for_backup(&self, t: &Target, dest: &std::path::Path) -> Result<(), ApplyError> {
        let dest_c = CString::new(dest.as_os_str().as_bytes())
            .map_err(|_| io_err(&t.logical, "backup")(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: valid descriptor, NUL-terminated names; AT_FDCWD with an absolute/relative path.
        let rc = unsafe {
            libc::linkat(
                t.dir.as_raw_fd(),
                t.name.as_ptr(),
                libc::AT_FDCWD,
                dest_c.as_ptr(),
                0,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let mut src = File::from(
            openat(
                &t.dir,
                &t.name,
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                0,
            )
            .map_err(io_err(&t.logical, "open for backup"))?,
        );
        let mut out = File::create(dest).map_err(io_err(&t.logical, "create backup"))?;
        io::copy(&mut src, &mut out).map_err(io_err(&t.logical, "copy to backup"))?;
        out.sync_all().map_err(io_err(&t.logical, "fsync backup"))?;
        Ok(())
    }

    /// Creates (or keeps) a directory and sets its mode and owner; its mtime is set by
    /// [`Applier::set_meta`] after its contents are in place.
    pub fn make_dir(&self, logical: &str, state: &FileState) -> Result<(), ApplyError> {
        let t = self.need_target(logical)?;
        match fstatat(&t.dir, &t.name).map_err(io_err(logical, "stat"))? {
            Some(st) if is_dir(&st) => {}
            Some(_) => {
                self.clear_for(&t, true)?;
                self.touch_dir(logical, &t.dir)?;
                mkdirat(&t, state.mode)?;
            }
            None => {
                self.touch_dir(logical, &t.dir)?;
                mkdirat(&t, state.mode)?
            }
        }
        let fd = openat(
            &t.dir,
            &t.name,
            libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY,
            0,
        )
        .map_err(io_err(logical, "open directory"))?;
        let f = File::from(fd);
        // A directory that is a mount point: its metadata is on the filesystem mounted there.
        let st = fstat(&f).map_err(io_err(logical, "stat"))?;
        self.touch(logical, st.st_dev, f.as_fd())?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(state.mode))
            .map_err(io_err(logical, "chmod"))?;
        chown_ok(std::os::unix::fs::fchown(
            &f,
            Some(state.uid),
            Some(state.gid),
        ))
        .map_err(io_err(logical, "chown"))?;
        Ok(())
    }

    /// Creates or replaces a symlink atomically (temp link + rename) and sets its owner and mtime.
    pub fn make_symlink(&self, logical: &str, state: &FileState) -> Result<(), ApplyError> {
        self.refuse_root_replacement(logical, Kind::Symlink)?;
        let t = self.need_target(logical)?;
        let target = CString::new(state.target.as_deref().unwrap_or(""))
            .map_err(|_| io_err(logical, "create symlink")(io::ErrorKind::InvalidInput.into()))?;
        let tmp = cstr(&temp_name("l"));
        self.touch_dir(logical, &t.dir)?;
        // SAFETY: valid descriptor and NUL-terminated strings.
        cvt(unsafe { libc::symlinkat(target.as_ptr(), t.dir.as_raw_fd(), tmp.as_ptr()) })
            .map_err(io_err(logical, "create symlink"))?;
        let meta = lchown_times(&t.dir, &tmp, state)
            .and_then(|_| fstatat(&t.dir, &tmp)?.ok_or_else(|| io::ErrorKind::NotFound.into()));
        let written = meta.as_ref().ok().copied();
        let res = meta
            .map(|_| ())
            .map_err(io_err(logical, "set symlink metadata"))
            .and_then(|_| self.clear_for(&t, false))
            .and_then(|_| {
                // SAFETY: valid descriptors and NUL-terminated names.
                cvt(unsafe {
                    libc::renameat(
                        t.dir.as_raw_fd(),
                        tmp.as_ptr(),
                        t.dir.as_raw_fd(),
                        t.name.as_ptr(),
                    )
                })
                .map(|_| ())
                .map_err(io_err(logical, "rename symlink into place"))
            });
        match (&res, written) {
            (Ok(()), Some(st)) => self.note(logical, &st, false),
            (Ok(()), None) => {}
            (Err(_), _) => {
                // SAFETY: valid descriptor and NUL-terminated name.
                unsafe { libc::unlinkat(t.dir.as_raw_fd(), tmp.as_ptr(), 0) };
            }
        }
        res
    }

    /// Sets mode, owner and mtime of an existing path (directories after their contents; files
    /// whose content did not change).
    pub fn set_meta(&self, logical: &str, state: &FileState) -> Result<(), ApplyError> {
        // Never creates parents: the path exists (or the call fails), e.g. a parent whose mtime
        // is restored after its children were deleted with it.
        if state.exists() {
            self.refuse_root_replacement(logical, state.kind)?;
        }
        let t = self
            .target(logical, false)?
            .ok_or_else(|| io_err(logical, "open parent")(io::ErrorKind::NotFound.into()))?;
        match state.kind {
            Kind::Symlink => {
                self.touch_dir(logical, &t.dir)?;
                lchown_times(&t.dir, &t.name, state).map_err(io_err(logical, "set metadata"))?;
                if let Ok(Some(st)) = fstatat(&t.dir, &t.name) {
                    self.note(logical, &st, false);
                }
                Ok(())
            }
            Kind::Deleted => Ok(()),
            Kind::File | Kind::Dir => {
                let flags = if state.kind == Kind::Dir {
                    libc::O_DIRECTORY
                } else {
                    0
                };
                let fd = openat(
                    &t.dir,
                    &t.name,
                    flags | libc::O_NOFOLLOW | libc::O_RDONLY,
                    0,
                )
                .map_err(io_err(logical, "open"))?;
                let f = File::from(fd);
                let st = fstat(&f).map_err(io_err(logical, "stat"))?;
                self.touch(logical, st.st_dev, f.as_fd())?;
                set_file_meta(&f, state).map_err(io_err(logical, "set metadata"))?;
                let st = fstat(&f).map_err(io_err(logical, "stat"))?;
                self.note(logical, &st, true);
                Ok(())
            }
        }
    }

    /// Removes a path (a regular file is backed up first; a directory must be empty).
    pub fn delete(&self, logical: &str) -> Result<(), ApplyError> {
        if self.roots.iter().any(|(r, _)| r == logical) {
            return Err(ApplyError::RootRemoval {
                path: logical.into(),
            });
        }
        let Some(t) = self.target(logical, false)? else {
            return Ok(());
        };
        self.clear_for(&t, true)
    }

    /// Renames `from` (which must still be the regular file described by `expect`) to `to`, then
    /// gives it `state`'s metadata. The version at `to`, if any, is backed up first.
    pub fn rename(
        &self,
        from: &str,
        to: &str,
        expect: &FileState,
        state: &FileState,
    ) -> Result<(), ApplyError> {
        if self.roots.iter().any(|(r, _)| r == from) {
            return Err(ApplyError::RootRemoval { path: from.into() });
        }
        self.refuse_root_replacement(to, Kind::File)?;
        let src = self
            .target(from, false)?
            .ok_or_else(|| io_err(from, "rename")(io::ErrorKind::NotFound.into()))?;
        match fstatat(&src.dir, &src.name).map_err(io_err(from, "stat"))? {
            Some(st)
                if is_reg(&st)
                    && st.st_size as u64 == expect.size
                    && st.st_mtime * 1_000_000_000 + st.st_mtime_nsec == expect.mtime_ns => {}
            _ => {
                return Err(ApplyError::RenameSourceChanged {
                    path: from.into(),
                    size: expect.size,
                    mtime_ns: expect.mtime_ns,
                });
            }
        }
        let dst = self.need_target(to)?;
        self.clear_for(&dst, false)?;
        self.touch_dir(from, &src.dir)?;
        self.touch_dir(to, &dst.dir)?;
        // SAFETY: valid descriptors and NUL-terminated names.
        cvt(unsafe {
            libc::renameat(
                src.dir.as_raw_fd(),
                src.name.as_ptr(),
                dst.dir.as_raw_fd(),
                dst.name.as_ptr(),
            )
        })
        .map_err(io_err(to, "rename"))?;
        self.set_meta(to, state)
    }

    /// The current state of a path (not hashed), reached safely.
    pub fn current(&self, logical: &str) -> Result<Option<FileState>, ApplyError> {
        let Some(t) = self.target(logical, false)? else {
            return Ok(None);
        };
        self.state_at(&t)
    }

    /// The current state of the path at `t` (not hashed).
    fn state_at(&self, t: &Target) -> Result<Option<FileState>, ApplyError> {
        let logical = t.logical.as_str();
        let Some(st) = fstatat(&t.dir, &t.name).map_err(io_err(logical, "stat"))? else {
            return Ok(None);
        };
        if !is_link(&st) {
            return Ok(Some(state_from_stat(&st)));
        }
        // Symlinks (their target is needed) through std, like the scanner.
        let path = fd_path(&t.dir).join(t.name.to_str().unwrap_or(""));
        crate::entry::read_state(&path, false).map_err(io_err(logical, "stat"))
    }
}

/// Whether the path on disk (`now`) is still what the decision assumed this side has
/// (`expected`, the recorded state). A local change the scanner has not recorded yet (a
/// watcher's batch still gathering, an edit while the data streamed in) must not be
/// overwritten: the item is refused, stays queued on the sender, and the next session sees both
/// changes (a conflict, or the local one wins).
pub fn unchanged_since_decision(expected: Option<&FileState>, now: Option<&FileState>) -> bool {
    match (expected.filter(|s| s.exists()), now) {
        (None, None) => true,
        (None, Some(n)) => n.kind == Kind::Dir,
        (Some(_), None) => false,
        (Some(e), Some(n)) => match (e.kind, n.kind) {
            (Kind::Dir, Kind::Dir) => true,
            (Kind::File, Kind::File) => e.size == n.size && e.mtime_ns == n.mtime_ns,
            (Kind::Symlink, Kind::Symlink) => e.target == n.target,
            _ => false,
        },
    }
}

/// The index of the first of `devices` on each distinct device, in order: the files of a batch
/// to `syncfs` through, one per filesystem.
fn first_per_device(devices: impl IntoIterator<Item = libc::dev_t>) -> Vec<usize> {
    let mut seen = HashSet::new();
    devices
        .into_iter()
        .enumerate()
        .filter(|(_, dev)| seen.insert(*dev))
        .map(|(i, _)| i)
        .collect()
}

/// Raises this process's soft open-file limit to its hard limit (batches of received files keep
/// their temp files open until the batch is committed). Returns the new soft limit.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer to an rlimit.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

fn mkdirat(t: &Target, mode: u32) -> Result<(), ApplyError> {
    // SAFETY: valid descriptor and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(t.dir.as_raw_fd(), t.name.as_ptr(), mode as libc::mode_t) })
        .map(|_| ())
        .map_err(io_err(&t.logical, "mkdir"))
}

fn set_file_meta(f: &File, state: &FileState) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    chown_ok(std::os::unix::fs::fchown(
        f,
        Some(state.uid),
        Some(state.gid),
    ))?;
    f.set_permissions(std::fs::Permissions::from_mode(state.mode))?;
    let t = system_time(state.mtime_ns);
    f.set_times(
        std::fs::FileTimes::new()
            .set_modified(t)
            .set_accessed(SystemTime::now()),
    )
}

fn lchown_times(dir: &OwnedFd, name: &CStr, state: &FileState) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    let rc = unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            state.uid,
            state.gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    chown_ok(if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    })?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        timespec(state.mtime_ns),
    ];
    // SAFETY: valid descriptor, NUL-terminated name, times points to two timespecs.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(|_| ())
}

/// Not being allowed to set the owner is not an error: the file keeps this process's owner.
/// EPERM: not root (or root without `CAP_CHOWN`, root_squash NFS). EINVAL: an id with no mapping
/// in this user namespace (root in a container has `CAP_CHOWN` but cannot give ids it does not
/// map), which otherwise failed that file's apply at every session.
fn chown_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) => Ok(()),
        r => r,
    }
}

fn fsync_dir(dir: &OwnedFd) -> io::Result<()> {
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fsync(dir.as_raw_fd()) }).map(|_| ())
}

/// A temporary name filed writes under before renaming into place (`TEMP_PREFIX`, the pid, a
/// random part, then `tag`): the watcher and the scan skip such names.
fn temp_name(tag: impl std::fmt::Display) -> String {
    format!(
        "{TEMP_PREFIX}{}.{}.{tag}",
        std::process::id(),
        rand_suffix()
    )
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    t ^ (N.fetch_add(1, Ordering::Relaxed) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_that_cannot_be_set_is_no_error() {
        let os = |n| Err(io::Error::from_raw_os_error(n));
        assert!(chown_ok(Ok(())).is_ok());
        assert!(chown_ok(os(libc::EPERM)).is_ok(), "not root");
        assert!(chown_ok(os(libc::EINVAL)).is_ok(), "id unmapped here");
        let e = chown_ok(os(libc::EIO)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let e = chown_ok(os(libc::ENOENT)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
    use crate::config::Config;
    use crate::entry::read_state;
    use crate::store::RedbStore;
    use std::io::Write;

    fn setup(dir: &Path) -> (Config, Applier, Arc<RedbStore>) {
        let text = format!(
            "[hosts.a]\nprefix={{d=\"{0}/a\", b=\"{0}/bak\"}}\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"%d%\"]\nbackup-directory=\"%b%\"\nbackup-generations=2\n",
            dir.display()
        );
        let c = Config::parse(&text, &dir.join("f.toml")).unwrap();
        std::fs::create_dir_all(dir.join("a")).unwrap();
        let store = Arc::new(RedbStore::open(&dir.join("a.redb"), Duration::ZERO).unwrap());
        let a = Applier::new(&c.hosts["a"], &c.groups["g"], store.clone()).unwrap();
        (c, a, store)
    }

    fn fstate(hash_of: &[u8], mtime: i64, mode: u32) -> FileState {
        FileState {
            kind: Kind::File,
            size: hash_of.len() as u64,
            mtime_ns: mtime,
            mode,
            uid: 0,
            gid: 0,
            target: None,
            hash: *blake3::hash(hash_of).as_bytes(),
        }
    }

    fn write(a: &Applier, path: &str, data: &[u8], mtime: i64) {
        let cur = a.current(path).unwrap();
        let mut p = a.begin_file(path, cur.as_ref()).unwrap();
        p.file.write_all(data).unwrap();
        let mut st = fstate(data, mtime, 0o640);
        st.uid = nix_uid();
        st.gid = nix_gid();
        a.commit_file(p, &st).unwrap();
    }
    fn nix_uid() -> u32 {
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() }
    }
    fn nix_gid() -> u32 {
        // SAFETY: getgid has no preconditions.
        unsafe { libc::getgid() }
    }

    #[test]
    fn writes_files_with_meta_and_backups() {
        let d = tempfile::tempdir().unwrap();
        let (_c, a, _s) = setup(d.path());
        write(&a, "%d%/sub/f", b"one", 1_500_000_000_123_456_789);
        let f = d.path().join("a/sub/f");
        assert_eq!(std::fs::read(&f).unwrap(), b"one");
        let st = read_state(&f, true).unwrap().unwrap();
        assert_eq!(st.mtime_ns, 1_500_000_000_123_456_789);
        assert_eq!(st.mode, 0o640);
        write(&a, "%d%/sub/f", b"two", 2);
        write(&a, "%d%/sub/f", b"three", 3);
        write(&a, "%d%/sub/f", b"four", 4);
        assert_eq!(std::fs::read(&f).unwrap(), b"four");
        let bak = d.path().join("bak");
        assert_eq!(std::fs::read(bak.join("%d%_sub_f.1")).unwrap(), b"three");
        assert_eq!(std::fs::read(bak.join("%d%_sub_f.2")).unwrap(), b"two");
        assert!(!bak.join("%d%_sub_f.3").exists());
        a.delete("%d%/sub/f").unwrap();
        assert!(!f.exists());
        assert_eq!(std::fs::read(bak.join("%d%_sub_f.1")).unwrap(), b"four");
        // no temp files left behind
        assert_eq!(
            std::fs::read_dir(d.path().join("a/sub")).unwrap().count(),
            0
        );
    }

    #[test]
    fn dirs_symlinks_renames() {
        let d = tempfile::tempdir().unwrap();
        let (_c, a, _s) = setup(d.path());
        let mut ds = FileState {
            kind: Kind::Dir,
            size: 0,
            mtime_ns: 7_000_000_001,
            mode: 0o750,
            uid: nix_uid(),
            gid: nix_gid(),
            target: None,
            hash: [0; 32],
        };
        a.make_dir("%d%/x", &ds).unwrap();
        a.set_meta("%d%/x", &ds).unwrap();
        let got = read_state(&d.path().join("a/x"), false).unwrap().unwrap();
        assert_eq!(
            (got.kind, got.mode, got.mtime_ns),
            (Kind::Dir, 0o750, 7_000_000_001)
        );
        ds.mode = 0o700;
        a.make_dir("%d%/x", &ds).unwrap();
        assert_eq!(
            read_state(&d.path().join("a/x"), false)
                .unwrap()
                .unwrap()
                .mode,
            0o700
        );
        let ls = FileState {
            kind: Kind::Symlink,
            size: 0,
            mtime_ns: 5_000_000_000,
            mode: 0o777,
            uid: nix_uid(),
            gid: nix_gid(),
            target: Some("../elsewhere".into()),
            hash: [0; 32],
        };
        a.make_symlink("%d%/x/l", &ls).unwrap();
        let got = read_state(&d.path().join("a/x/l"), false).unwrap().unwrap();
        assert_eq!(
            (got.target.as_deref(), got.mtime_ns),
            (Some("../elsewhere"), 5_000_000_000)
        );
        write(&a, "%d%/x/f", b"data", 9);
        let cur = a.current("%d%/x/f").unwrap().unwrap();
        let newst = fstate(b"data", 11, 0o600);
        a.rename(
            "%d%/x/f",
            "%d%/y/g",
            &cur,
            &FileState {
                uid: nix_uid(),
                gid: nix_gid(),
                ..newst.clone()
            },
        )
        .unwrap();
        assert!(!d.path().join("a/x/f").exists());
        assert_eq!(std::fs::read(d.path().join("a/y/g")).unwrap(), b"data");
        // a changed source is refused
        assert!(matches!(
            a.rename("%d%/y/g", "%d%/z", &cur, &newst),
            Err(ApplyError::RenameSourceChanged { .. })
        ));
        // non-empty directory is not removed; empty one is
        assert!(matches!(
            a.delete("%d%/x"),
            Err(ApplyError::NotEmpty { .. })
        ));
        a.delete("%d%/x/l").unwrap();
        a.delete("%d%/x").unwrap();
        assert!(!d.path().join("a/x").exists());
        assert!(matches!(
            a.delete("%d%"),
            Err(ApplyError::RootRemoval { .. })
        ));
        // a file replaces a directory and vice versa
        a.make_dir("%d%/t", &ds).unwrap();
        write(&a, "%d%/t", b"now a file", 1);
        assert!(d.path().join("a/t").is_file());
        a.make_dir("%d%/t", &ds).unwrap();
        assert!(d.path().join("a/t").is_dir());
    }

    #[test]
    fn refuses_traversal_and_symlink_escapes() {
        let d = tempfile::tempdir().unwrap();
        let (_c, a, _s) = setup(d.path());
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        std::fs::create_dir_all(d.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), d.path().join("a/link")).unwrap();
        assert!(matches!(
            a.begin_file("%d%/link/evil", None),
            Err(ApplyError::SymlinkEscape { .. })
        ));
        assert!(matches!(
            a.make_dir("%d%/link/sub/x", &fstate(b"", 1, 0o755)),
            Err(ApplyError::SymlinkEscape { .. })
        ));
        assert!(matches!(
            a.begin_file("%d%/../outside/evil", None),
            Err(ApplyError::Rejected(_))
        ));
        assert!(matches!(
            a.begin_file("/etc/passwd", None),
            Err(ApplyError::Rejected(_))
        ));
        assert!(matches!(
            a.delete("%d%/link/x"),
            Err(ApplyError::SymlinkEscape { .. })
        ));
        assert_eq!(
            std::fs::read_dir(d.path().join("outside")).unwrap().count(),
            0
        );
        // replacing the symlink itself is fine: it is the target, not a parent
        write(&a, "%d%/link", b"file", 1);
        assert!(d.path().join("a/link").is_file());
        assert_eq!(
            std::fs::read_dir(d.path().join("outside")).unwrap().count(),
            0
        );
    }

    #[test]
    fn commit_files_small_and_large_batches_replace_old_versions() {
        // Both flush paths: one fsync per file (small batch) and one syncfs (large batch).
        for n in [PER_FILE_FSYNC_MAX, PER_FILE_FSYNC_MAX + 4] {
            let d = tempfile::tempdir().unwrap();
            let (_c, a, _s) = setup(d.path());
            let mut batch = Vec::new();
            for i in 0..n {
                let path = format!("%d%/f{i}");
                write(&a, &path, b"old", 1);
                let data = format!("new {i}");
                let cur = a.current(&path).unwrap();
                let mut p = a.begin_file(&path, cur.as_ref()).unwrap();
                p.file.write_all(data.as_bytes()).unwrap();
                let mut st = fstate(data.as_bytes(), 2_000_000_000, 0o640);
                st.uid = nix_uid();
                st.gid = nix_gid();
                batch.push((p, st));
            }
            let out = a.commit_files(batch);
            assert_eq!(out.len(), n);
            assert!(out.iter().all(|(_, r)| r.is_ok()), "{out:?}");
            a.sync().unwrap();
            for i in 0..n {
                let f = d.path().join(format!("a/f{i}"));
                assert_eq!(std::fs::read(&f).unwrap(), format!("new {i}").as_bytes());
                assert_eq!(
                    std::fs::read(d.path().join(format!("bak/%d%_f{i}.1"))).unwrap(),
                    b"old"
                );
            }
            // No temp file left behind.
            assert_eq!(std::fs::read_dir(d.path().join("a")).unwrap().count(), n);
        }
    }

    #[test]
    fn dropped_pending_file_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (_c, a, _s) = setup(d.path());
        write(&a, "%d%/f", b"old", 1);
        {
            let mut p = a.begin_file("%d%/f", None).unwrap();
            p.file.write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read(d.path().join("a/f")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(d.path().join("a")).unwrap().count(), 1);
    }

    /// Records `paths` in the state database as this host's files (a directory for the root).
    fn record(s: &RedbStore, paths: &[&str]) {
        let mut b = crate::store::Batch::new();
        for p in paths {
            let mut st = fstate(p.as_bytes(), 1, 0o644);
            if *p == "%d%" {
                st.kind = Kind::Dir;
            }
            b.push(crate::store::Op::SetFile {
                group: "g".into(),
                path: p.to_string(),
                state: st,
            });
        }
        s.commit(b).unwrap();
    }

    fn dstate() -> FileState {
        FileState {
            kind: Kind::Dir,
            size: 0,
            mtime_ns: 1,
            mode: 0o755,
            uid: nix_uid(),
            gid: nix_gid(),
            target: None,
            hash: [0; 32],
        }
    }

    #[test]
    fn nothing_is_written_into_an_include_root_that_looks_unmounted() {
        let d = tempfile::tempdir().unwrap();
        let (c, a, s) = setup(d.path());
        record(&s, &["%d%", "%d%/etc", "%d%/etc/x", "%d%/f"]);
        let root = d.path().join("a");
        // The bare mount point of the unmounted filesystem, holding only entries never recorded:
        // a temp file and a file something wrote there.
        std::fs::write(root.join(format!("{TEMP_PREFIX}1.2.3")), b"").unwrap();
        std::fs::write(root.join("stray"), b"").unwrap();
        let unmounted = |r: Result<_, ApplyError>| {
            matches!(r, Err(ApplyError::RootLooksUnmounted { recorded: 2, .. }))
        };
        // A read first (it finds nothing, and caches the root's directory): the write after it
        // is still checked.
        assert!(a.current("%d%/other").unwrap().is_none());
        assert!(unmounted(a.begin_file("%d%/new", None).map(|_| ())));
        assert!(unmounted(a.begin_file("%d%/etc/new", None).map(|_| ())));
        assert!(unmounted(a.make_dir("%d%/etc", &dstate())));
        assert!(unmounted(a.make_symlink("%d%/l", &fstate(b"", 1, 0o777))));
        // Deletions and reads go on: they find nothing recorded there and change nothing.
        a.delete("%d%/gone").unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "nothing written or removed: {names:?}");
        // Mounted again: one recorded name is there (among many that are not: looked up a
        // chunk at a time), the root is written into.
        std::fs::create_dir(root.join("etc")).unwrap();
        for i in 0..3 * LOOKUP_CHUNK {
            std::fs::write(root.join(format!("unrecorded{i}")), b"").unwrap();
        }
        let a = Applier::new(&c.hosts["a"], &c.groups["g"], s.clone()).unwrap();
        write(&a, "%d%/etc/new", b"n", 1);
        write(&a, "%d%/new", b"n", 1);
        // Nothing recorded under a root (a new tree): an empty root is written into.
        let d2 = tempfile::tempdir().unwrap();
        let (_c, a, _s) = setup(d2.path());
        write(&a, "%d%/first", b"1", 1);
        assert!(d2.path().join("a/first").is_file());
    }

    #[test]
    fn a_missing_include_root_is_not_created() {
        let d = tempfile::tempdir().unwrap();
        let (_c, a, _s) = setup(d.path());
        let root = d.path().join("a");
        std::fs::remove_dir(&root).unwrap();
        let missing = |r: Result<_, ApplyError>| matches!(r, Err(ApplyError::RootMissing { .. }));
        assert!(missing(a.begin_file("%d%/sub/f", None).map(|_| ())));
        assert!(missing(a.make_dir("%d%/sub", &dstate())));
        assert!(missing(a.delete("%d%/f")), "not taken as already deleted");
        assert!(missing(a.current("%d%/f").map(|_| ())));
        assert!(!root.exists());
        // The root itself, sent as a directory (a new host), is created in its parent.
        a.make_dir("%d%", &dstate()).unwrap();
        assert!(root.is_dir());
    }

    #[test]
    fn an_include_root_is_never_replaced_or_followed() {
        let d = tempfile::tempdir().unwrap();
        let (c, a, s) = setup(d.path());
        let root = d.path().join("a");
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let mut link = fstate(b"", 1, 0o777);
        link.kind = Kind::Symlink;
        link.target = Some(outside.display().to_string());
        let replaced =
            |r: Result<_, ApplyError>| matches!(r, Err(ApplyError::RootReplacement { .. }));
        assert!(replaced(a.make_symlink("%d%", &link)));
        assert!(replaced(a.begin_file("%d%", None).map(|_| ())));
        assert!(replaced(a.set_meta("%d%", &fstate(b"", 1, 0o644))));
        write(&a, "%d%/f", b"f", 1);
        let cur = a.current("%d%/f").unwrap().unwrap();
        assert!(replaced(a.rename("%d%/f", "%d%", &cur, &cur)));
        assert!(root.is_dir() && !root.is_symlink());
        // A symlink put in the place of a root recorded as a directory is not followed by the
        // next session (the scan skips such a root too).
        record(&s, &["%d%"]);
        std::fs::rename(&root, d.path().join("a.old")).unwrap();
        std::os::unix::fs::symlink(&outside, &root).unwrap();
        let a = Applier::new(&c.hosts["a"], &c.groups["g"], s.clone()).unwrap();
        let not_dir =
            |r: Result<_, ApplyError>| matches!(r, Err(ApplyError::RootNotADirectory { .. }));
        assert!(not_dir(a.begin_file("%d%/evil", None).map(|_| ())));
        assert!(not_dir(a.make_dir("%d%/evil", &dstate())));
        assert!(not_dir(a.make_symlink("%d%/evil", &link)));
        assert!(replaced(a.make_symlink("%d%", &link)));
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    /// A single-file include (its root is a file) is received like any file; a symlink at a
    /// root's path is neither followed nor replaced (the scan records it as a symlink and walks
    /// nothing under it: what was written through it would be deleted on every peer).
    #[test]
    fn single_file_roots_and_an_admins_root_symlink_are_synced() {
        let d = tempfile::tempdir().unwrap();
        let (_c, a, s) = setup(d.path());
        let root = d.path().join("a");
        std::fs::remove_dir(&root).unwrap();
        write(&a, "%d%", b"one file", 1);
        assert_eq!(std::fs::read(&root).unwrap(), b"one file");
        write(&a, "%d%", b"changed", 2);
        assert_eq!(std::fs::read(&root).unwrap(), b"changed");
        drop(s);
        let d = tempfile::tempdir().unwrap();
        let (_c, a, _s) = setup(d.path());
        let root = d.path().join("a");
        let real = d.path().join("real");
        std::fs::rename(&root, &real).unwrap();
        std::os::unix::fs::symlink(&real, &root).unwrap();
        let not_dir =
            |r: Result<_, ApplyError>| matches!(r, Err(ApplyError::RootNotADirectory { .. }));
        assert!(not_dir(a.begin_file("%d%/f", None).map(|_| ())));
        assert!(not_dir(a.make_dir("%d%", &dstate())));
        assert!(not_dir(a.set_meta("%d%", &dstate())));
        assert!(root.is_symlink(), "the admin's symlink was replaced");
        assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
    }

    #[test]
    fn a_local_change_made_while_receiving_is_not_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let (_c, a, _s) = setup(d.path());
        let root = d.path().join("a");
        write(&a, "%d%/edited", b"old", 1);
        write(&a, "%d%/kept", b"old", 1);
        a.take_written();
        let mut batch = Vec::new();
        for path in ["%d%/edited", "%d%/kept", "%d%/created"] {
            // what the decision assumed: the recorded state (nothing for the new file)
            let cur = a.current(path).unwrap();
            let mut p = a.begin_file(path, cur.as_ref()).unwrap();
            p.file.write_all(b"received").unwrap();
            let mut st = fstate(b"received", 2_000_000_000, 0o640);
            (st.uid, st.gid) = (nix_uid(), nix_gid());
            batch.push((p, st));
        }
        // Local edits while the data streamed in (after the check before the data).
        std::fs::write(root.join("edited"), b"local edit").unwrap();
        std::fs::write(root.join("created"), b"made here").unwrap();
        let out: HashMap<String, Result<(), ApplyError>> =
            a.commit_files(batch).into_iter().collect();
        let changed = |p: &str| matches!(out[p], Err(ApplyError::ChangedSinceDecision { .. }));
        assert!(changed("%d%/edited"), "{out:?}");
        assert!(changed("%d%/created"), "{out:?}");
        assert!(out["%d%/kept"].is_ok(), "{out:?}");
        assert_eq!(std::fs::read(root.join("edited")).unwrap(), b"local edit");
        assert_eq!(std::fs::read(root.join("created")).unwrap(), b"made here");
        assert_eq!(std::fs::read(root.join("kept")).unwrap(), b"received");
        // not taken for filed's own writes (the watcher reports the local edits) ...
        let written: Vec<String> = a.take_written().into_iter().map(|w| w.logical).collect();
        assert_eq!(written, vec!["%d%/kept"]);
        // ... and no temp file left
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 3);
    }

    #[test]
    fn unchanged_since_decision_compares_kind_size_mtime_and_link_target() {
        let f = fstate(b"abc", 5, 0o644);
        let mut other = f.clone();
        assert!(unchanged_since_decision(Some(&f), Some(&other)));
        other.mode = 0o600;
        assert!(
            unchanged_since_decision(Some(&f), Some(&other)),
            "metadata only"
        );
        other.mtime_ns = 6;
        assert!(!unchanged_since_decision(Some(&f), Some(&other)));
        assert!(!unchanged_since_decision(Some(&f), None));
        assert!(!unchanged_since_decision(None, Some(&f)));
        assert!(unchanged_since_decision(None, Some(&dstate())));
        assert!(unchanged_since_decision(Some(&FileState::deleted(1)), None));
    }

    #[test]
    fn one_syncfs_per_filesystem_of_a_batch() {
        assert_eq!(first_per_device([5, 5, 7, 5, 9, 7]), vec![0, 2, 4]);
        assert_eq!(first_per_device([3]), vec![0]);
        assert!(first_per_device([]).is_empty());
    }

    #[test]
    fn every_filesystem_written_to_is_synced() {
        use std::os::unix::fs::MetadataExt;
        // Two include roots on two filesystems (tmpfs /dev/shm when there is one).
        let d = tempfile::tempdir().unwrap();
        let other =
            tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let text = format!(
            "[hosts.a]\nprefix={{d=\"{}/a\", e=\"{}/e\"}}\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"%d%\", \"%e%\"]\n",
            d.path().display(),
            other.path().display()
        );
        let c = Config::parse(&text, &d.path().join("f.toml")).unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::fs::create_dir(other.path().join("e")).unwrap();
        let store = Arc::new(RedbStore::open(&d.path().join("a.redb"), Duration::ZERO).unwrap());
        let a = Applier::new(&c.hosts["a"], &c.groups["g"], store).unwrap();
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        let mut devs = vec![dev(&d.path().join("a")), dev(&other.path().join("e"))];
        devs.sort_unstable();
        devs.dedup();
        // A batch large enough for the syncfs path, spread over both roots.
        let mut batch = Vec::new();
        for i in 0..PER_FILE_FSYNC_MAX + 2 {
            let path = format!("{}/f{i}", if i % 2 == 0 { "%d%" } else { "%e%" });
            let mut p = a.begin_file(&path, None).unwrap();
            p.file.write_all(b"data").unwrap();
            let mut st = fstate(b"data", 1, 0o644);
            (st.uid, st.gid) = (nix_uid(), nix_gid());
            batch.push((p, st));
        }
        let out = a.commit_files(batch);
        assert!(out.iter().all(|(_, r)| r.is_ok()), "{out:?}");
        assert_eq!(a.changed_filesystems(), devs);
        a.sync().unwrap();
        assert!(a.changed_filesystems().is_empty());
        a.make_dir("%e%/sub", &dstate()).unwrap();
        assert_eq!(a.changed_filesystems(), vec![dev(&other.path().join("e"))]);
        a.delete("%d%/f0").unwrap();
        assert_eq!(a.changed_filesystems(), devs);
        a.sync().unwrap();
        assert!(a.changed_filesystems().is_empty());
    }
}
