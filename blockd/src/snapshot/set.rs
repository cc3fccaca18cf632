//! The open snapshots of one replica: creating and dropping them, preserving frozen blocks
//! before any write changes them, serving reads of the frozen image, invalidating a snapshot
//! whose area fills or fails (replication goes on), and closing or reloading areas across
//! restarts.
//!
//! Every change of the replica (replicated data, trim, zeroes, resync, and the Primary's own
//! writes) runs under a [`ChangeGuard`] from [`Snapshots::change`] (or, for a change applied at
//! once on the caller's thread, [`Snapshots::try_change_now`]): it preserves what the change will
//! overwrite and holds the freeze gate shared until the change is done. [`Snapshots::freeze`]
//! takes the gate exclusively and waits for the writes the store's engine still runs (a
//! change whose caller went away released its gate, not its write), so a snapshot freezes the
//! replica with no change in flight; its area is created before, and removed after. The
//! replica applies epochs in order, so that image is every earlier epoch plus some writes of
//! the current one — writes the Primary had in flight together, any subset of which a power cut
//! could leave: a state the disk may be found in after a crash, never a torn one.
//!
//! Preserving costs little: only the first change of a block since the freeze copies it (a
//! hash lookup decides), the old contents of a change's blocks are read with one store read
//! (from the page cache, without waiting, on the apply path; through the engine, a large
//! change is read and preserved 1 MiB at a time), checksummed once and kept, not
//! copied, until [`WRITE_BATCH`](super::area::WRITE_BATCH) of them go to their page-aligned slots
//! with one `pwritev`; nothing is synced (an area is trusted after a restart only when a clean
//! shutdown synced and closed it). A snapshot's lock is never held across an `.await`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use super::area::{AreaError, CowArea};
use super::cow_record::{AreaHeader, AreaState, MAX_NAME_LEN, area_bytes, blocks_within};
use crate::repl::resource::error_chain as chain;
use crate::store::{BlockStore, StoreError};

/// Granularity of copy-on-write (bytes per preserved block).
pub const COW_BLOCK_SIZE: u32 = 4096;
/// File-name suffix of an area: `<resource>@<name>.snap`.
const AREA_SUFFIX: &str = ".snap";

/// How long a freeze waits for the changes in flight to finish. Replicated writes that arrive
/// meanwhile wait behind it, so a disk that does not complete a write cannot hold them longer
/// than this: the freeze is refused instead.
pub const FREEZE_QUIET_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Between the resource and the snapshot name in an area's file name. Neither name may contain
/// it (both use A-Z a-z 0-9 _ . -), so a file name says whose area it is; earlier builds used
/// '.', which both names may contain (see [`AreaFile::Legacy`]).
const AREA_SEP: char = '@';

/// What a file of the area directory is to the snapshots of one resource.
#[derive(Debug, PartialEq, Eq)]
enum AreaFile {
    /// `RES@NAME.snap`: the area of this resource's snapshot NAME.
    Ours(String),
    /// `RES.REST.snap`, as earlier builds named areas: ambiguous (`r0.x.y.snap` is snapshot
    /// `x.y` of resource `r0` or snapshot `y` of resource `r0.x`). This resource's snapshot
    /// REST only if the area's header records REST as its name: then no other resource can
    /// have written it.
    Legacy(String),
    /// Not an area of this resource.
    Other,
}

/// Classifies the file named `file` for `resource` (see [`AreaFile`]).
fn classify_area_file(resource: &str, file: &str) -> AreaFile {
    let Some(rest) = file
        .strip_suffix(AREA_SUFFIX)
        .and_then(|stem| stem.strip_prefix(resource))
    else {
        return AreaFile::Other;
    };
    if let Some(name) = rest.strip_prefix(AREA_SEP) {
        if valid_name(name) {
            return AreaFile::Ours(name.to_owned());
        }
    } else if let Some(name) = rest.strip_prefix('.')
        && valid_name(name)
    {
        return AreaFile::Legacy(name.to_owned());
    }
    AreaFile::Other
}

/// Why a snapshot could not be opened, dropped or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "snapshot name {name:?} is invalid: use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ . - (not starting with '.')"
    )]
    BadName { name: String },
    #[error("a snapshot named {name:?} is already open")]
    Exists { name: String },
    #[error("no snapshot named {name:?}")]
    Unknown { name: String },
    #[error(
        "snapshot {name:?} needs a copy-on-write area of at least {} bytes (one {COW_BLOCK_SIZE}-byte block and its table)",
        area_bytes(1, COW_BLOCK_SIZE)
    )]
    TooSmall { name: String },
    #[error("cannot open snapshot {name:?}")]
    Area {
        name: String,
        #[source]
        source: AreaError,
    },
    #[error("cannot remove the area of snapshot {name:?} at {path}")]
    Remove {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {name:?} refused: {reason}")]
    Refused { name: String, reason: String },
    #[error("snapshot {name:?} is no longer valid: {reason}")]
    Invalid { name: String, reason: String },
    #[error("snapshot {name:?}: cannot read the replica")]
    ReadLive {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("snapshot {name:?}: cannot read its copy-on-write area")]
    ReadArea {
        name: String,
        #[source]
        source: AreaError,
    },
}

/// What `status` shows of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotStatus {
    pub name: String,
    pub created_unix_ms: u64,
    /// Where it is served over NBD (`ADDR:PORT`; empty: not served).
    pub listen: String,
    /// Data generation of the replica at the freeze.
    pub generation: u64,
    pub cow_used_bytes: u64,
    pub cow_capacity_bytes: u64,
    /// `None` while valid; the reason once invalidated.
    pub invalid: Option<String>,
}

struct Frozen {
    area: Option<CowArea>,
    invalid: Option<String>,
    /// The removal of the area, under way off the async threads since the snapshot was
    /// invalidated. The snapshot stays listed until it is done (see
    /// [`Snapshots::drop_snapshot`]): its file name is not taken again before.
    removing: Option<Removing>,
    /// A drop of this snapshot is under way.
    dropping: bool,
}

/// Creates the area of a new snapshot at `path` in `dir` (see [`CowArea::create`]). Blocking
/// and slow for a large area: never under the gate.
fn create_area(dir: &Path, path: &Path, header: AreaHeader) -> Result<CowArea, AreaError> {
    // The default directory of a node without one beside its metadata may not exist yet.
    std::fs::create_dir_all(dir).map_err(|source| AreaError::Create {
        path: dir.to_owned(),
        source,
    })?;
    CowArea::create(path, header)
}

/// Unlinks an area file (gone already is fine), then closes its descriptor with `area`.
/// Blocking: closing the last descriptor of a large allocated, unlinked file frees all its
/// extents, which ext4 does synchronously.
fn remove_area(area: Option<CowArea>, path: &Path) -> std::io::Result<()> {
    let removed = match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    drop(area);
    removed
}

/// An area being removed by [`remove_area_later`].
#[derive(Clone)]
struct Removing(tokio::sync::watch::Receiver<bool>);

impl Removing {
    /// Waits until the removal is done (or was dropped unrun with the runtime).
    async fn done(mut self) {
        let _ = self.0.wait_for(|done| *done).await;
    }
}

/// Runs [`remove_area`] off the calling thread (tokio's blocking pool; on this thread when
/// there is no runtime, as at start). A failure is not reported: an area left behind is Open
/// and removed, with a message, at the next start.
fn remove_area_later(area: Option<CowArea>, path: PathBuf) -> Removing {
    let (done, removing) = tokio::sync::watch::channel(false);
    let job = move || {
        let _ = remove_area(area, &path);
        let _ = done.send(true);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(job)),
        Err(_) => job(),
    }
    Removing(removing)
}

/// Waits for a removal of the area already under way (`removing`), then runs [`remove_area`]
/// on tokio's blocking pool and reports how it went.
async fn remove_area_after(
    removing: Option<Removing>,
    area: Option<CowArea>,
    path: PathBuf,
) -> std::io::Result<()> {
    if let Some(r) = removing {
        r.done().await;
    }
    tokio::task::spawn_blocking(move || remove_area(area, &path))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// What [`Snapshot::preserve_now`] did.
enum PreservedNow {
    /// Nothing to preserve, or preserved.
    Done,
    /// The snapshot had to be invalidated, for this reason.
    Invalidated(String),
    /// The old contents cannot be read without waiting: nothing was done.
    WouldBlock,
}

/// One open snapshot: a frozen image of the replica.
///
/// Its area sits behind a plain mutex that is never held across an `.await`: taking it costs
/// nothing when uncontended, and it is held only for bookkeeping and the (page-cache) writes
/// of preserved blocks; readers take it just to find where the blocks they need are.
pub struct Snapshot {
    name: String,
    header: AreaHeader,
    path: PathBuf,
    frozen: Mutex<Frozen>,
    /// Copy of the area's usage, for status without taking the lock.
    used_bytes: std::sync::atomic::AtomicU64,
    invalid: Mutex<Option<String>>,
    /// Most bytes one [`preserve`](Self::preserve) step read (the memory it held).
    #[cfg(test)]
    largest_read: std::sync::atomic::AtomicU64,
}

impl Snapshot {
    fn new(name: String, path: PathBuf, area: CowArea) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            name,
            header: area.header().clone(),
            path,
            used_bytes: std::sync::atomic::AtomicU64::new(area.used_bytes()),
            frozen: Mutex::new(Frozen {
                area: Some(area),
                invalid: None,
                removing: None,
                dropping: false,
            }),
            invalid: Mutex::new(None),
            #[cfg(test)]
            largest_read: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it is served over NBD (`ADDR:PORT`; empty: not served).
    pub fn listen(&self) -> &str {
        &self.header.listen
    }

    /// Device size of the frozen image.
    pub fn size(&self) -> u64 {
        self.header.device_size
    }

    pub fn status(&self) -> SnapshotStatus {
        SnapshotStatus {
            name: self.name.clone(),
            created_unix_ms: self.header.created_unix_ms,
            listen: self.header.listen.clone(),
            generation: self.header.generation,
            cow_used_bytes: self.used_bytes.load(Ordering::Relaxed),
            cow_capacity_bytes: area_bytes(self.header.capacity_blocks, self.header.block_size),
            invalid: self.invalid.lock().expect("not poisoned").clone(),
        }
    }

    fn invalid_reason(&self) -> Option<String> {
        self.invalid.lock().expect("not poisoned").clone()
    }

    fn frozen(&self) -> std::sync::MutexGuard<'_, Frozen> {
        self.frozen.lock().expect("not poisoned")
    }

    /// Reads `len` bytes at `offset` of the frozen image: the live replica overlaid with every
    /// block preserved since the freeze (including blocks preserved while the live read ran).
    pub async fn read(
        &self,
        store: &BlockStore,
        offset: u64,
        len: usize,
    ) -> Result<BytesMut, SnapshotError> {
        self.check_valid()?;
        let mut buf = store
            .read(offset, len)
            .await
            .map_err(|source| SnapshotError::ReadLive {
                name: self.name.clone(),
                source,
            })?;
        // Only where the preserved blocks are is looked up under the lock: a written block
        // never changes, so it is read afterwards without holding up the replica's writes (and
        // blocks still waiting to be written are shared from memory).
        let (overlays, reader) = {
            let frozen = self.frozen();
            let Some(area) = frozen.area.as_ref() else {
                return Err(self.invalid_error(frozen.invalid.clone()));
            };
            let overlays: Vec<_> = area
                .index()
                .overlays(offset, len as u64)
                .into_iter()
                .map(|o| (o, area.preserved(o.slot)))
                .collect();
            let reader = (!overlays.is_empty()).then(|| area.reader());
            (overlays, reader)
        };
        if let Some(reader) = reader {
            for (o, preserved) in overlays {
                // The index and the area's slots are kept together: a slot the index names is
                // always in use (if not, fail the read rather than show live data).
                let block = preserved
                    .ok_or_else(|| AreaError::BadRun {
                        path: self.path.clone(),
                        reason: format!("slot {} of block {} is not in use", o.slot, o.block),
                    })
                    .and_then(|p| reader.read(&p))
                    .map_err(|source| SnapshotError::ReadArea {
                        name: self.name.clone(),
                        source,
                    })?;
                buf[o.at..o.at + o.len].copy_from_slice(&block[o.within..o.within + o.len]);
            }
        }
        // A snapshot invalidated during the read may have missed a preserve: never return it.
        self.check_valid()?;
        Ok(buf)
    }

    fn check_valid(&self) -> Result<(), SnapshotError> {
        match self.invalid_reason() {
            None => Ok(()),
            reason => Err(self.invalid_error(reason)),
        }
    }

    fn invalid_error(&self, reason: Option<String>) -> SnapshotError {
        SnapshotError::Invalid {
            name: self.name.clone(),
            reason: reason.unwrap_or_else(|| "dropped".into()),
        }
    }

    /// Gives up on the snapshot: its readers get `reason` from now on and its area is removed,
    /// off this thread (the caller may be a receive task, and holds the snapshot's lock).
    fn invalidate(&self, frozen: &mut Frozen, reason: String) -> String {
        let area = frozen.area.take();
        frozen.invalid = Some(reason.clone());
        *self.invalid.lock().expect("not poisoned") = Some(reason.clone());
        frozen.removing = Some(remove_area_later(area, self.path.clone()));
        reason
    }

    /// Waits until the area of an invalidated snapshot is removed (tests).
    #[cfg(test)]
    async fn area_removed(&self) {
        let removing = self.frozen().removing.clone();
        if let Some(r) = removing {
            r.done().await;
        }
    }

    /// The blocks a change of `offset..offset+len` must preserve and the device range holding
    /// them, or `Err(reason)` once the snapshot had to be invalidated (area full).
    fn plan(&self, frozen: &mut Frozen, offset: u64, len: u64) -> Result<Option<Run>, String> {
        let Some(area) = frozen.area.as_ref() else {
            return Ok(None);
        };
        match area.to_preserve(offset, len) {
            Ok(blocks) => Ok(Run::of(area, blocks)),
            Err(e) => Err(self.invalidate(frozen, chain(&e))),
        }
    }

    /// Preserves `run`'s old contents `old` (blocks preserved meanwhile are skipped); on
    /// failure invalidates the snapshot and returns the reason.
    fn append(&self, frozen: &mut Frozen, mut run: Run, old: &Bytes) -> Option<String> {
        let area = frozen.area.as_mut()?;
        run.blocks.retain(|&b| area.index().slot_of(b).is_none());
        let result = area.preserve_run(&run.blocks, run.start, old);
        self.used_bytes.store(area.used_bytes(), Ordering::Relaxed);
        let e = result.err()?;
        Some(self.invalidate(frozen, chain(&e)))
    }

    /// Preserves the blocks a change of `offset..offset+len` would alter, waiting for the
    /// engine if their old contents are not cached. On failure the snapshot is invalidated (and
    /// its area removed) and the reason returned.
    ///
    /// The whole change is planned at once (an area too small for it is found before anything
    /// is read), then preserved in pieces of at most [`PRESERVE_PIECE`] bytes, each appended
    /// before the next is read: a large trim or zeroing never holds its range in memory.
    async fn preserve(&self, store: &BlockStore, offset: u64, len: u64) -> Option<String> {
        let run = match self.plan(&mut self.frozen(), offset, len) {
            Ok(run) => run?,
            Err(reason) => return Some(reason),
        };
        let bs = u64::from(self.header.block_size);
        for piece in run.pieces(bs, PRESERVE_PIECE) {
            #[cfg(test)]
            self.largest_read.fetch_max(piece.len, Ordering::Relaxed);
            // The blocks cannot change meanwhile: overlapping changes are never in flight
            // together.
            let old = store.read(piece.start, piece.len as usize).await;
            let mut frozen = self.frozen();
            // Invalidated or dropped meanwhile: nothing more to preserve, nothing to report.
            frozen.area.as_ref()?;
            let failed = match old {
                Ok(old) => self.append(&mut frozen, piece, &old.freeze()),
                Err(e) => {
                    let reason = format!("cannot read the blocks to preserve: {}", chain(&e));
                    Some(self.invalidate(&mut frozen, reason))
                }
            };
            if failed.is_some() {
                return failed;
            }
        }
        None
    }

    /// Like [`preserve`](Self::preserve), but only if the old contents can be read without
    /// waiting (they are in the page cache): all on the calling thread, under the lock.
    fn preserve_now(&self, store: &BlockStore, offset: u64, len: u64) -> PreservedNow {
        let mut frozen = self.frozen();
        let run = match self.plan(&mut frozen, offset, len) {
            Ok(Some(run)) => run,
            Ok(None) => return PreservedNow::Done,
            Err(reason) => return PreservedNow::Invalidated(reason),
        };
        if run.len > crate::store::DEFAULT_INLINE_MAX as u64 {
            return PreservedNow::WouldBlock;
        }
        let old = match poll_once(store.read(run.start, run.len as usize)) {
            Some(Ok(old)) => old.freeze(),
            Some(Err(e)) => {
                let reason = format!("cannot read the blocks to preserve: {}", chain(&e));
                return PreservedNow::Invalidated(self.invalidate(&mut frozen, reason));
            }
            None => return PreservedNow::WouldBlock,
        };
        match self.append(&mut frozen, run, &old) {
            None => PreservedNow::Done,
            Some(reason) => PreservedNow::Invalidated(reason),
        }
    }
}

/// Blocks to preserve for one change, and the device range that holds them.
struct Run {
    blocks: Vec<u64>,
    start: u64,
    len: u64,
}

/// Most bytes of old contents [`Snapshot::preserve`] reads at once (a multiple of
/// [`COW_BLOCK_SIZE`]).
const PRESERVE_PIECE: u64 = 1 << 20;

impl Run {
    /// This run split into runs whose blocks lie within one `piece`-aligned stretch of the
    /// device each, so each reads at most `piece` bytes (`piece` a multiple of `bs`, the block
    /// size); in order, together the same blocks.
    fn pieces(self, bs: u64, piece: u64) -> Vec<Run> {
        let end = self.start + self.len;
        let mut out: Vec<Run> = Vec::new();
        for block in self.blocks {
            let at = block * bs;
            match out.last_mut() {
                Some(r) if r.start / piece == at / piece => r.blocks.push(block),
                _ => out.push(Run {
                    blocks: vec![block],
                    start: at,
                    len: 0,
                }),
            }
        }
        for r in &mut out {
            let last = *r.blocks.last().expect("a piece has a block");
            // Only the device's last block is short: it ends where the whole run ends.
            r.len = (last * bs + bs).min(end) - r.start;
        }
        out
    }

    fn of(area: &CowArea, blocks: Vec<u64>) -> Option<Run> {
        let (&first, &last) = (blocks.first()?, blocks.last()?);
        let bs = area.index().block_size();
        let start = first * bs;
        let len = last * bs + area.index().block_len(last) - start;
        Some(Run { blocks, start, len })
    }
}

/// Polls `fut` once: its output if it completes without waiting. A store read completes at
/// once when the page cache holds the range (`RWF_NOWAIT`); otherwise it was handed to the
/// engine, whose result is then dropped (the engine owns the buffer: dropping is safe). The
/// caller then reads again through [`Snapshots::change`]: that costs one more engine request,
/// not one more disk read (both wait for the same pages; the first read has usually filled
/// them). A store operation that only tries the cache would save the request.
fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// A snapshot that [`Snapshots::before_write`] had to invalidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidated {
    pub name: String,
    pub reason: String,
}

/// The snapshots of one replica.
///
/// The area file of snapshot NAME is only created, written or removed by whoever holds the
/// name: the freeze that reserved it in `creating`, then the listed snapshot until its drop
/// unlists it, which is after its area is removed. So a drop never removes the area of a
/// new snapshot of the same name.
pub struct Snapshots {
    dir: PathBuf,
    resource: String,
    device_size: u64,
    open: Arc<Mutex<Vec<Arc<Snapshot>>>>,
    count: Arc<AtomicUsize>,
    /// Names of the snapshots being frozen (not listed yet). Lock order: `open`, then this.
    creating: Arc<Mutex<Vec<String>>>,
    /// Held shared by every change of the replica, exclusively by a freeze.
    gate: tokio::sync::RwLock<()>,
}

/// A snapshot name taken by a freeze under way, with the area created for it: listed by
/// [`Snapshots::list`], or given up ([`give_up`](Self::give_up), or dropped when the freeze is
/// cancelled): then the area is removed, off the async threads, before the name is free again.
struct Reservation {
    creating: Arc<Mutex<Vec<String>>>,
    name: String,
    path: PathBuf,
    area: Option<CowArea>,
    /// A removal of the area that began while it was listed, to wait for.
    removing: Option<Removing>,
    listed: bool,
}

impl Reservation {
    /// Removes the area (waiting for it), then frees the name.
    async fn give_up(mut self) {
        let (area, removing) = (self.area.take(), self.removing.take());
        let _ = remove_area_after(removing, area, self.path.clone()).await;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.listed {
            return;
        }
        let (creating, name) = (self.creating.clone(), std::mem::take(&mut self.name));
        let release = move || {
            creating
                .lock()
                .expect("not poisoned")
                .retain(|n| *n != name);
        };
        if self.area.is_none() && self.removing.is_none() {
            return release();
        }
        // Cancelled with an area still there: removed in the background, then released.
        let (area, path, removing) = (self.area.take(), self.path.clone(), self.removing.take());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(async move {
                let _ = remove_area_after(removing, area, path).await;
                release();
            })),
            // No runtime, so no removal under way either.
            Err(_) => {
                let _ = remove_area(area, &path);
                release();
            }
        }
    }
}

/// [`Snapshots::try_change_now`] could not make the change at once.
#[derive(Debug, Default)]
pub struct NotNow {
    /// Snapshots it had to invalidate before it found out (area full or failing): reported by
    /// no one else.
    pub invalidated: Vec<Invalidated>,
}

/// Held while one change of the replica runs (see [`Snapshots::change`]).
pub struct ChangeGuard<'a> {
    _gate: tokio::sync::RwLockReadGuard<'a, ()>,
    /// Snapshots this change had to invalidate (area full or failing).
    pub invalidated: Vec<Invalidated>,
}

impl Snapshots {
    /// The snapshots of `resource` whose areas live in `dir`, reloading every area a clean
    /// shutdown left over this replica (a device of `device_size` bytes whose metadata
    /// `known`s the data generation the area was closed over); an area that cannot be trusted
    /// is removed, with the reason returned.
    pub fn load(
        dir: &Path,
        resource: &str,
        device_size: u64,
        known: impl Fn(u64) -> bool,
    ) -> (Snapshots, Vec<String>) {
        let set = Snapshots {
            dir: dir.to_owned(),
            resource: resource.to_owned(),
            device_size,
            open: Arc::default(),
            count: Arc::default(),
            creating: Arc::default(),
            gate: tokio::sync::RwLock::new(()),
        };
        let mut dropped = Vec::new();
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        files.sort();
        for file in files {
            let name = match classify_area_file(resource, &file) {
                AreaFile::Other => continue,
                AreaFile::Ours(name) => name,
                AreaFile::Legacy(name) => match set.adopt_legacy(&dir.join(&file), &name) {
                    Ok(true) => name,
                    Ok(false) => continue,
                    Err(why) => {
                        dropped.push(why);
                        continue;
                    }
                },
            };
            let path = set.area_path(&name);
            match CowArea::reopen(&path, device_size, &known) {
                Ok(area) if area.header().name == name => set.insert(name, path, area),
                Ok(area) => {
                    let recorded = area.header().name.clone();
                    drop(area);
                    let _ = std::fs::remove_file(&path);
                    dropped.push(format!(
                        "snapshot {name:?} dropped: its area {} records snapshot {recorded:?}",
                        path.display()
                    ));
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    dropped.push(format!("snapshot {name:?} dropped: {}", chain(&e)));
                }
            }
        }
        (set, dropped)
    }

    /// An area named as by earlier builds (`RES.NAME.snap`, see [`AreaFile::Legacy`]): when
    /// its header records `name`, it is this resource's and is renamed to `RES@NAME.snap`
    /// (`Ok(true)`); when it records another name it is another resource's (`Ok(false)`).
    /// One whose header cannot be read may be another resource's: it is left in place, and
    /// the message says so.
    fn adopt_legacy(&self, path: &Path, name: &str) -> Result<bool, String> {
        match CowArea::read_header(path) {
            Ok(h) if h.name == name => {}
            Ok(_) => return Ok(false),
            Err(e) => {
                return Err(format!(
                    "snapshot area {} left in place: it may be another resource's, and its header                      cannot be read ({}); remove it by hand if it is not",
                    path.display(),
                    chain(&e)
                ));
            }
        }
        let to = self.area_path(name);
        if to.exists() {
            return Err(format!(
                "snapshot {name:?}: area {} left in place: {} exists",
                path.display(),
                to.display()
            ));
        }
        std::fs::rename(path, &to).map_err(|e| {
            format!(
                "snapshot {name:?}: cannot rename area {} to {}: {e}",
                path.display(),
                to.display()
            )
        })?;
        Ok(true)
    }

    fn area_path(&self, name: &str) -> PathBuf {
        self.dir
            .join(format!("{}{AREA_SEP}{name}{AREA_SUFFIX}", self.resource))
    }

    /// Lists a reloaded area (at start: nothing else runs).
    fn insert(&self, name: String, path: PathBuf, area: CowArea) {
        let mut open = self.open.lock().expect("not poisoned");
        open.push(Snapshot::new(name, path, area));
        self.count.store(open.len(), Ordering::Release);
    }

    /// Runs before a change of `len` bytes at `offset` of the replica: preserves the frozen
    /// contents it will overwrite in every open snapshot and holds off freezes until the
    /// returned guard is dropped (after the change is done).
    pub async fn change(&self, store: &BlockStore, offset: u64, len: u64) -> ChangeGuard<'_> {
        let gate = self.gate.read().await;
        let invalidated = self.before_write(store, offset, len).await;
        ChangeGuard {
            _gate: gate,
            invalidated,
        }
    }

    /// For a change made without waiting (on the caller's thread): preserves what the change
    /// will overwrite in every open snapshot if the old contents are cached, and returns the
    /// guard to hold until the change is done. [`NotNow`] (nothing was preserved that would
    /// not be again) when a freeze is under way or a read would wait: use
    /// [`change`](Self::change), and report the snapshots it says were invalidated meanwhile.
    pub fn try_change_now(
        &self,
        store: &BlockStore,
        offset: u64,
        len: u64,
    ) -> Result<ChangeGuard<'_>, NotNow> {
        let Ok(gate) = self.gate.try_read() else {
            return Err(NotNow::default());
        };
        let mut invalidated = Vec::new();
        if !self.is_empty() && len > 0 {
            // Held across the (non-waiting) preserves: lock order is `open`, then a snapshot's.
            let snaps = self.open.lock().expect("not poisoned");
            for snap in snaps.iter() {
                match snap.preserve_now(store, offset, len) {
                    PreservedNow::Done => {}
                    PreservedNow::Invalidated(reason) => invalidated.push(Invalidated {
                        name: snap.name.clone(),
                        reason,
                    }),
                    // Snapshots invalidated by now are not seen again by `change`: the caller
                    // reports them.
                    PreservedNow::WouldBlock => return Err(NotNow { invalidated }),
                }
            }
        }
        Ok(ChangeGuard {
            _gate: gate,
            invalidated,
        })
    }

    /// Freezes the replica as it is once the changes in flight are done, as snapshot `name`
    /// with an area of at most `capacity_bytes`; changes that arrive meanwhile wait.
    ///
    /// The area is created, allocated whole and synced first, while changes go on (allocating
    /// a large area takes long); under the gate the freeze only waits for the changes in
    /// flight, including those still running in `store`'s engine after their caller went
    /// away (an apply aborted at the end of a session), decides and lists. An area given up
    /// is removed after the gate is released, off the async threads.
    ///
    /// `may_freeze` decides, with no change in flight, whether the replica may be frozen now
    /// (`Ok` with its data generation, or `Err` with the reason): whatever was checked before
    /// waiting for the gate may have changed meanwhile (a resync started). It is asked again
    /// once the snapshot is listed, so a state change racing with the freeze is either seen
    /// here or made after the snapshot was listed (where its invalidation finds it).
    pub async fn freeze(
        &self,
        store: &BlockStore,
        name: &str,
        capacity_bytes: u64,
        listen: &str,
        may_freeze: impl Fn() -> Result<u64, String>,
    ) -> Result<Arc<Snapshot>, SnapshotError> {
        let (reserved, header) = self.reserve(name, capacity_bytes, listen)?;
        let dir = self.dir.clone();
        // The reservation goes with the job: if this freeze is cancelled meanwhile, the area
        // is removed once created, and only then is the name free again.
        let creating = tokio::task::spawn_blocking(move || {
            let mut reserved = reserved;
            let created = create_area(&dir, &reserved.path, header).map(|area| {
                reserved.area = Some(area);
            });
            (reserved, created)
        });
        let area_error = |source| SnapshotError::Area {
            name: name.to_owned(),
            source,
        };
        // Not run (the runtime is stopping) or panicked: the reservation went with the job.
        let (mut reserved, created) = creating.await.map_err(|e| {
            area_error(AreaError::Create {
                path: self.area_path(name),
                source: std::io::Error::other(e.to_string()),
            })
        })?;
        created.map_err(area_error)?;
        let refused = |reason| SnapshotError::Refused {
            name: name.to_owned(),
            reason,
        };
        let quiet = tokio::time::timeout(FREEZE_QUIET_LIMIT, async {
            let gate = self.gate.write().await;
            store.writes_in_flight().idle().await;
            gate
        });
        let outcome = match quiet.await {
            Err(_) => Err(format!(
                "the writes in flight did not finish within {} s (a slow or stuck disk); \
                 try again",
                FREEZE_QUIET_LIMIT.as_secs()
            )),
            Ok(_quiet) => match may_freeze() {
                Err(reason) => Err(reason),
                Ok(generation) => {
                    let snap = self.list(&mut reserved, generation);
                    match may_freeze() {
                        Ok(_) => Ok(snap),
                        Err(reason) => {
                            self.unlist_refused(&snap, &mut reserved);
                            Err(reason)
                        }
                    }
                }
            },
        };
        match outcome {
            Ok(snap) => Ok(snap),
            Err(reason) => {
                reserved.give_up().await;
                Err(refused(reason))
            }
        }
    }

    /// Opens snapshot `name` at once with the given generation, as [`freeze`](Self::freeze)
    /// does but on this thread and without the gate: call only with no change in flight.
    #[cfg(test)]
    pub(crate) fn open(
        &self,
        name: &str,
        capacity_bytes: u64,
        generation: u64,
        listen: &str,
    ) -> Result<Arc<Snapshot>, SnapshotError> {
        let (mut reserved, header) = self.reserve(name, capacity_bytes, listen)?;
        let area = create_area(&self.dir, &reserved.path, header).map_err(|source| {
            SnapshotError::Area {
                name: name.to_owned(),
                source,
            }
        })?;
        reserved.area = Some(area);
        Ok(self.list(&mut reserved, generation))
    }

    /// Takes the name for a new snapshot (refused when invalid, listed or being frozen) and
    /// says what its area's header is.
    fn reserve(
        &self,
        name: &str,
        capacity_bytes: u64,
        listen: &str,
    ) -> Result<(Reservation, AreaHeader), SnapshotError> {
        if !valid_name(name) {
            return Err(SnapshotError::BadName {
                name: name.to_owned(),
            });
        }
        let capacity_blocks = blocks_within(capacity_bytes, COW_BLOCK_SIZE);
        if capacity_blocks == 0 {
            return Err(SnapshotError::TooSmall {
                name: name.to_owned(),
            });
        }
        {
            let open = self.open.lock().expect("not poisoned");
            let mut creating = self.creating.lock().expect("not poisoned");
            if open.iter().any(|s| s.name == name) || creating.iter().any(|n| n == name) {
                return Err(SnapshotError::Exists {
                    name: name.to_owned(),
                });
            }
            creating.push(name.to_owned());
        }
        let header = AreaHeader {
            state: AreaState::Open,
            block_size: COW_BLOCK_SIZE,
            device_size: self.device_size,
            capacity_blocks,
            // Both decided at the freeze (`list`).
            created_unix_ms: 0,
            generation: 0,
            preserved_blocks: 0,
            name: name.to_owned(),
            listen: listen.to_owned(),
            // Set by `close`.
            closed_generation: 0,
        };
        let reserved = Reservation {
            creating: self.creating.clone(),
            name: name.to_owned(),
            path: self.area_path(name),
            area: None,
            removing: None,
            listed: false,
        };
        Ok((reserved, header))
    }

    /// Lists the reserved snapshot, frozen now at `generation`: call with no change in flight.
    fn list(&self, reserved: &mut Reservation, generation: u64) -> Arc<Snapshot> {
        let mut area = reserved
            .area
            .take()
            .expect("a reserved snapshot's area is created");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        area.set_frozen_at(generation, now);
        let snap = Snapshot::new(reserved.name.clone(), reserved.path.clone(), area);
        let mut open = self.open.lock().expect("not poisoned");
        open.push(snap.clone());
        self.count.store(open.len(), Ordering::Release);
        self.creating
            .lock()
            .expect("not poisoned")
            .retain(|n| *n != reserved.name);
        reserved.listed = true;
        snap
    }

    /// Takes back a snapshot [`list`](Self::list) listed that the freeze then refused: invalid
    /// before it is unlisted (as in a drop), its name reserved again and its area (or its
    /// removal under way, if it was invalidated meanwhile) back in `reserved`.
    fn unlist_refused(&self, snap: &Arc<Snapshot>, reserved: &mut Reservation) {
        let mut open = self.open.lock().expect("not poisoned");
        {
            let mut frozen = snap.frozen();
            reserved.area = frozen.area.take();
            reserved.removing = frozen.removing.take();
            frozen.invalid = Some("refused".into());
            *snap.invalid.lock().expect("not poisoned") = Some("refused".into());
        }
        open.retain(|s| !Arc::ptr_eq(s, snap));
        self.count.store(open.len(), Ordering::Release);
        self.creating
            .lock()
            .expect("not poisoned")
            .push(reserved.name.clone());
        reserved.listed = false;
    }

    pub fn get(&self, name: &str) -> Option<Arc<Snapshot>> {
        self.open
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }

    /// True when no snapshot is open (the write path's fast check).
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Ends snapshot `name`: its readers get errors from now on and its area is removed. The
    /// snapshot is unlisted only once its area is gone (until then a new snapshot cannot take
    /// its name and file); this is done to the end even if the caller goes away meanwhile. A
    /// drop while another one of the same snapshot is under way finds nothing to drop.
    pub async fn drop_snapshot(&self, name: &str) -> Result<(), SnapshotError> {
        let (snap, area, removing) = {
            let open = self.open.lock().expect("not poisoned");
            let Some(snap) = open.iter().find(|s| s.name == name).cloned() else {
                return Err(SnapshotError::Unknown {
                    name: name.to_owned(),
                });
            };
            // Invalid before it is unlisted (lock order: `open`, then the snapshot's): a change
            // that no longer finds it, and so preserves nothing for it, can only come after
            // every reader's last check fails.
            let mut frozen = snap.frozen();
            if frozen.dropping {
                return Err(SnapshotError::Unknown {
                    name: name.to_owned(),
                });
            }
            frozen.dropping = true;
            frozen.invalid = Some("dropped".into());
            *snap.invalid.lock().expect("not poisoned") = Some("dropped".into());
            let (area, removing) = (frozen.area.take(), frozen.removing.take());
            drop(frozen);
            (snap, area, removing)
        };
        let (open, count) = (self.open.clone(), self.count.clone());
        let path = snap.path.clone();
        let dropping = tokio::spawn(async move {
            let removed = remove_area_after(removing, area, path).await;
            let mut open = open.lock().expect("not poisoned");
            open.retain(|s| !Arc::ptr_eq(s, &snap));
            count.store(open.len(), Ordering::Release);
            removed
        });
        let removed = dropping
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        removed.map_err(|source| SnapshotError::Remove {
            name: name.to_owned(),
            path: self.area_path(name),
            source,
        })
    }

    /// Gives up on every open snapshot that is still valid, for `reason`: their readers get it
    /// from now on and their areas are removed (they stay listed, like a snapshot whose area
    /// filled, until dropped). For when the replica they froze is gone, e.g. its disk was
    /// detached: preserving from another disk would make them silently wrong. Returns the
    /// snapshots invalidated by this call.
    pub fn invalidate_all(&self, reason: &str) -> Vec<Invalidated> {
        let snaps: Vec<Arc<Snapshot>> = self.open.lock().expect("not poisoned").clone();
        let mut out = Vec::new();
        for snap in snaps {
            let mut frozen = snap.frozen();
            if frozen.area.is_none() {
                continue;
            }
            let reason = snap.invalidate(&mut frozen, reason.to_owned());
            out.push(Invalidated {
                name: snap.name.clone(),
                reason,
            });
        }
        out
    }

    /// Preserves, in every open snapshot, the frozen contents of the blocks a change of
    /// `len` bytes at `offset` is about to alter. Never fails the change: a snapshot that
    /// cannot preserve (area full, I/O error) is invalidated and returned. Overlapping changes
    /// must not be in flight together (the replica's epochs ensure it).
    pub async fn before_write(
        &self,
        store: &BlockStore,
        offset: u64,
        len: u64,
    ) -> Vec<Invalidated> {
        if self.is_empty() || len == 0 {
            return Vec::new();
        }
        let snaps: Vec<Arc<Snapshot>> = self.open.lock().expect("not poisoned").clone();
        let mut out = Vec::new();
        for snap in snaps {
            if let Some(reason) = snap.preserve(store, offset, len).await {
                out.push(Invalidated {
                    name: snap.name.clone(),
                    reason,
                });
            }
        }
        out
    }

    /// Closes every area cleanly (on shutdown), so the snapshots survive a restart. Waits for
    /// the changes in flight, and holds every later change off for good: a change the areas
    /// did not see would make a reloaded snapshot silently wrong. `flush_replica` runs between
    /// the two: an area marked closed over replica writes still in the page cache would, after
    /// a machine crash, describe data that is not on disk; when it fails, no area is marked
    /// closed (they are dropped with a message at the next start). Areas are marked closed
    /// over the replica's data generation `generation` gives then: the next start reopens
    /// them only over metadata that knows it.
    pub async fn close_all<F>(
        &self,
        flush_replica: F,
        generation: impl FnOnce() -> u64,
    ) -> Vec<String>
    where
        F: std::future::Future<Output = Result<(), String>>,
    {
        std::mem::forget(self.gate.write().await);
        let snaps: Vec<Arc<Snapshot>> = self.open.lock().expect("not poisoned").drain(..).collect();
        self.count.store(0, Ordering::Release);
        // Areas of invalidated snapshots still being removed: gone before the node stops.
        let removing: Vec<Removing> = snaps
            .iter()
            .filter_map(|s| s.frozen().removing.clone())
            .collect();
        for r in removing {
            r.done().await;
        }
        let mut errors = Vec::new();
        if let Err(e) = flush_replica.await {
            for snap in snaps {
                errors.push(format!(
                    "snapshot {:?}: not kept, the replica could not be flushed: {e}",
                    snap.name
                ));
            }
            return errors;
        }
        let generation = generation();
        for snap in snaps {
            let area = snap.frozen().area.take();
            if let Some(area) = area
                && let Err(e) = area.close(generation)
            {
                errors.push(format!("snapshot {:?}: {}", snap.name, chain(&e)));
            }
        }
        errors
    }

    pub fn status(&self) -> Vec<SnapshotStatus> {
        self.open
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|s| s.status())
            .collect()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OpenOptions;
    use bytes::Bytes;

    /// The replica's data generation when these tests close areas.
    const GEN: u64 = 0xfeed_0000_0002;

    /// The generations the replica's metadata knows, in these tests.
    fn known(g: u64) -> bool {
        g == GEN
    }

    fn setup(name: &str, size: u64) -> (PathBuf, BlockStore) {
        let dir =
            std::env::temp_dir().join(format!("blockd-snapset-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let opts = OpenOptions {
            size: Some(size),
            ..OpenOptions::default()
        };
        let store = BlockStore::open(&dir.join("data"), &opts).unwrap();
        (dir, store)
    }

    async fn fill(store: &BlockStore, byte: u8, size: u64) {
        store
            .write(0, Bytes::from(vec![byte; size as usize]), false)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_snapshot_keeps_its_image_while_the_replica_changes() {
        let size = 64 * 1024 + 100;
        let (dir, store) = setup("image", size);
        fill(&store, 1, size).await;
        let (set, dropped) = Snapshots::load(&dir, "r0", size, known);
        assert!(dropped.is_empty());
        assert!(set.is_empty());
        let snap = set.open("s1", 1 << 20, 7, "").unwrap();
        for (off, len, byte) in [
            (10u64, 5000usize, 2u8),
            (4096, 1, 3),
            (size - 50, 50, 4),
            (0, size as usize, 5),
        ] {
            assert!(set.before_write(&store, off, len as u64).await.is_empty());
            store
                .write(off, Bytes::from(vec![byte; len]), false)
                .await
                .unwrap();
        }
        assert_eq!(
            &snap.read(&store, 0, size as usize).await.unwrap()[..],
            &vec![1u8; size as usize][..]
        );
        assert_eq!(&store.read(0, 10).await.unwrap()[..], &[5u8; 10]);
        let st = &set.status()[0];
        assert_eq!(
            st.cow_used_bytes,
            area_bytes(17, 4096),
            "17 blocks preserved once each"
        );
        assert_eq!(st.generation, 7);
        // A second snapshot sees the image as of its own freeze.
        let snap2 = set.open("s2", 1 << 20, 8, "").unwrap();
        set.before_write(&store, 0, 3).await;
        store
            .write(0, Bytes::from_static(b"zzz"), false)
            .await
            .unwrap();
        assert_eq!(&snap2.read(&store, 0, 4).await.unwrap()[..], &[5u8; 4]);
        assert_eq!(&snap.read(&store, 0, 4).await.unwrap()[..], &[1u8; 4]);
        assert!(matches!(
            set.open("s2", 1 << 20, 8, ""),
            Err(SnapshotError::Exists { .. })
        ));
        assert!(matches!(
            set.open("../x", 1 << 20, 8, ""),
            Err(SnapshotError::BadName { .. })
        ));
        set.drop_snapshot("s2").await.unwrap();
        assert!(matches!(
            snap2.read(&store, 0, 4).await,
            Err(SnapshotError::Invalid { .. })
        ));
        assert!(matches!(
            set.drop_snapshot("s2").await,
            Err(SnapshotError::Unknown { .. })
        ));
    }

    #[tokio::test]
    async fn a_full_area_invalidates_the_snapshot_not_the_write() {
        let size = 1 << 20;
        let (dir, store) = setup("full", size);
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let snap = set.open("small", area_bytes(2, 4096), 1, "").unwrap();
        assert!(set.before_write(&store, 0, 8192).await.is_empty());
        let inv = set.before_write(&store, 8192, 1).await;
        assert_eq!(inv.len(), 1);
        assert!(inv[0].reason.contains("full"), "{}", inv[0].reason);
        let e = snap.read(&store, 0, 1).await.unwrap_err();
        assert!(e.to_string().contains("no longer valid"), "{e}");
        assert_eq!(
            set.status()[0].invalid.as_deref(),
            Some(inv[0].reason.as_str())
        );
        assert!(set.before_write(&store, 8192, 1).await.is_empty());
    }

    #[tokio::test]
    async fn clean_shutdown_keeps_snapshots_and_a_crash_drops_them() {
        let size = 1 << 20;
        let (dir, store) = setup("restart", size);
        fill(&store, 1, size).await;
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        set.open("kept", 1 << 20, 1, "").unwrap();
        set.before_write(&store, 0, 4096).await;
        store
            .write(0, Bytes::from(vec![2u8; 4096]), false)
            .await
            .unwrap();
        assert!(set.close_all(async { Ok(()) }, || GEN).await.is_empty());
        let (set, dropped) = Snapshots::load(&dir, "r0", size, known);
        assert!(dropped.is_empty(), "{dropped:?}");
        let snap = set.get("kept").unwrap();
        assert_eq!(&snap.read(&store, 0, 4).await.unwrap()[..], &[1u8; 4]);
        // Now "crash": no close_all.
        drop(snap);
        drop(set);
        let (set, dropped) = Snapshots::load(&dir, "r0", size, known);
        assert!(set.is_empty());
        assert_eq!(dropped.len(), 1);
        assert!(dropped[0].contains("not closed cleanly"), "{}", dropped[0]);
        let (set, dropped) = Snapshots::load(&dir, "r0", size, known);
        assert!(dropped.is_empty(), "the untrusted area was removed");
        // Closed cleanly, then reloaded over metadata that does not know the data generation
        // it was closed over (recreated, or another disk's): dropped.
        set.open("other", 1 << 20, 1, "").unwrap();
        assert!(set.close_all(async { Ok(()) }, || GEN).await.is_empty());
        let (set, dropped) = Snapshots::load(&dir, "r0", size, |g| g == GEN + 2);
        assert!(set.is_empty());
        assert_eq!(dropped.len(), 1);
        assert!(
            dropped[0].contains("does not know") && dropped[0].contains("\"other\""),
            "{}",
            dropped[0]
        );
        assert!(!dir.join("r0@other.snap").exists());
    }

    #[tokio::test]
    async fn a_freeze_waits_for_changes_in_flight_and_holds_new_ones() {
        let size = 1 << 20;
        let (dir, store) = setup("gate", size);
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let set = Arc::new(set);
        let guard = set.change(&store, 0, 4096).await;
        let (s2, st2) = (set.clone(), store.clone());
        let freeze = tokio::spawn(async move {
            s2.freeze(&st2, "f", 1 << 20, "", || Ok(1))
                .await
                .map(|_| ())
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !freeze.is_finished(),
            "the freeze waits for the change in flight"
        );
        store
            .write(0, Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap();
        drop(guard);
        freeze.await.unwrap().unwrap();
        let snap = set.get("f").unwrap();
        assert_eq!(&snap.read(&store, 0, 2).await.unwrap()[..], &[9u8; 2]);
        let g = set.change(&store, 0, 4096).await;
        assert!(g.invalidated.is_empty());
        store
            .write(0, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        drop(g);
        assert_eq!(&snap.read(&store, 0, 2).await.unwrap()[..], &[9u8; 2]);
    }

    /// A change that never finishes (a stuck disk) cannot hold a freeze, nor the changes that
    /// queue behind it, for longer than the limit: the freeze is refused, its area removed, and
    /// the changes go on.
    #[tokio::test]
    async fn a_freeze_behind_a_stuck_change_is_refused_after_the_limit() {
        let size = 1 << 20;
        let (dir, store) = setup("stuck", size);
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let set = Arc::new(set);
        let stuck = set.change(&store, 0, 4096).await;
        let (s2, st2) = (set.clone(), store.clone());
        let freeze = tokio::spawn(async move {
            s2.freeze(&st2, "f", 1 << 20, "", || Ok(1))
                .await
                .map(|_| ())
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (s3, st3) = (set.clone(), store.clone());
        let queued = tokio::spawn(async move { s3.change(&st3, 8192, 4096).await.invalidated });
        let started = std::time::Instant::now();
        let err = freeze.await.unwrap().unwrap_err();
        assert!(started.elapsed() < FREEZE_QUIET_LIMIT + std::time::Duration::from_secs(1));
        assert!(
            matches!(&err, SnapshotError::Refused { reason, .. } if reason.contains("did not finish")),
            "{err}"
        );
        let invalidated = tokio::time::timeout(std::time::Duration::from_secs(1), queued)
            .await
            .expect("the change queued behind the freeze goes on")
            .unwrap();
        assert!(invalidated.is_empty());
        assert!(set.get("f").is_none());
        assert!(!dir.join("r0@f.snap").exists(), "the area was removed");
        drop(stuck);
        // The name is free again.
        set.freeze(&store, "f", 1 << 20, "", || Ok(1))
            .await
            .unwrap();
    }

    /// The freeze decides whether the replica may be frozen with no change in flight: a state
    /// change made while it waited for the gate (a resync started, the disk went Inconsistent)
    /// refuses it, and so does one seen right after the snapshot was listed. Nothing is left.
    #[tokio::test]
    async fn a_freeze_rechecks_the_state_under_the_gate() {
        use std::sync::atomic::AtomicBool;
        let size = 1 << 20;
        let (dir, store) = setup("recheck", size);
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let set = Arc::new(set);
        let consistent = Arc::new(AtomicBool::new(true));
        let guard = set.change(&store, 0, 4096).await;
        let (s2, c2, st2) = (set.clone(), consistent.clone(), store.clone());
        let freeze = tokio::spawn(async move {
            s2.freeze(&st2, "f", 1 << 20, "", || {
                if c2.load(Ordering::SeqCst) {
                    Ok(7)
                } else {
                    Err("the local data is inconsistent".into())
                }
            })
            .await
            .map(|_| ())
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!freeze.is_finished(), "the freeze waits for the change");
        // The change in flight was the first write of a resync: Inconsistent before it.
        consistent.store(false, Ordering::SeqCst);
        drop(guard);
        let e = freeze.await.unwrap().unwrap_err();
        assert!(
            matches!(&e, SnapshotError::Refused { reason, .. } if reason.contains("inconsistent")),
            "{e}"
        );
        assert!(set.get("f").is_none() && set.is_empty());
        assert!(!dir.join("r0@f.snap").exists());
        // The state changes between the first check and the listing: the second check sees it.
        let calls = AtomicUsize::new(0);
        let e = set
            .freeze(&store, "g", 1 << 20, "", || {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Ok(7),
                    _ => Err("the local disk failed".into()),
                }
            })
            .await
            .err()
            .expect("refused");
        assert!(matches!(e, SnapshotError::Refused { .. }), "{e}");
        assert!(set.get("g").is_none() && set.is_empty());
        assert!(!dir.join("r0@g.snap").exists());
        let snap = set
            .freeze(&store, "h", 1 << 20, "", || Ok(9))
            .await
            .unwrap();
        assert_eq!(snap.status().generation, 9);
    }

    /// A change whose caller went away (an apply aborted at the end of a replication session)
    /// released its gate, but its write may still be running in the engine: the freeze waits
    /// for it, holding new changes off meanwhile, and the image holds the write.
    #[tokio::test]
    async fn a_freeze_waits_for_writes_still_running_in_the_engine() {
        let size = 1 << 20;
        let (dir, store) = setup("engine", size);
        fill(&store, 1, size).await;
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let set = Arc::new(set);
        let g = set.change(&store, 0, 4096).await;
        let running = store.begin_write_for_test();
        drop(g);
        let (s2, st2) = (set.clone(), store.clone());
        let freeze = tokio::spawn(async move { s2.freeze(&st2, "f", 1 << 20, "", || Ok(1)).await });
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while set.gate.try_read().is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the freeze takes the gate");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!freeze.is_finished(), "the freeze waits for the write");
        assert!(
            set.try_change_now(&store, 4096, 1).is_err(),
            "new changes wait for the freeze"
        );
        // The engine writes, then is done.
        store
            .write(0, Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap();
        drop(running);
        let snap = freeze.await.unwrap().unwrap();
        let g = set.change(&store, 0, 4096).await;
        store
            .write(0, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        drop(g);
        assert_eq!(&snap.read(&store, 0, 4).await.unwrap()[..], &[9u8; 4]);
    }

    /// The area is created and allocated before the freeze takes the gate: changes go on
    /// meanwhile, and one that fails (no room for the area) never held them up.
    #[tokio::test]
    async fn a_freeze_creates_its_area_before_taking_the_gate() {
        let size = 1 << 20;
        let (dir, store) = setup("early", size);
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let g = set.change(&store, 0, 4096).await;
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            set.freeze(&store, "huge", 1 << 60, "", || Ok(1)),
        )
        .await
        .expect("not waiting for the change in flight")
        .err()
        .expect("no room");
        assert!(
            matches!(
                &e,
                SnapshotError::Area {
                    source: AreaError::Reserve { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(!dir.join("r0@huge.snap").exists(), "nothing left");
        drop(g);
        set.freeze(&store, "huge", 1 << 20, "", || Ok(1))
            .await
            .expect("the name is free again");
    }

    /// A snapshot's name is taken from the start of its freeze until its drop removed its area:
    /// a freeze of the same name meanwhile is refused, so no drop or invalidation removes the
    /// area of a newer snapshot of that name. A freeze that is cancelled gives its name back
    /// once its area is removed; a second drop under way finds nothing to drop.
    #[tokio::test]
    async fn a_name_is_taken_until_its_area_is_gone() {
        let size = 1 << 20;
        let (dir, store) = setup("names", size);
        fill(&store, 1, size).await;
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let set = Arc::new(set);
        let exists = |e: Result<Arc<Snapshot>, SnapshotError>| {
            matches!(e, Err(SnapshotError::Exists { .. }))
        };
        // Being frozen (waiting for a change in flight, its area created).
        let g = set.change(&store, 0, 4096).await;
        let (s2, st2) = (set.clone(), store.clone());
        let freeze = tokio::spawn(async move { s2.freeze(&st2, "s", 1 << 20, "", || Ok(1)).await });
        let area = dir.join("r0@s.snap");
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !area.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the area is created before the gate");
        assert!(exists(set.open("s", 1 << 20, 1, "")));
        // Cancelled: the area is removed and the name given back.
        freeze.abort();
        assert!(matches!(freeze.await, Err(e) if e.is_cancelled()));
        drop(g);
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !set.creating.lock().unwrap().is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the name is given back");
        assert!(!area.exists(), "the cancelled freeze's area is removed");
        // Invalidated (area full): listed, its name taken, until dropped.
        let small = set.open("s", area_bytes(1, 4096), 1, "").unwrap();
        let g = set.change(&store, 0, 8192).await;
        assert_eq!(g.invalidated.len(), 1);
        drop(g);
        assert!(exists(set.open("s", 1 << 20, 1, "")));
        // Two drops at once: one drops it, the other finds nothing.
        let (d1, d2) = tokio::join!(set.drop_snapshot("s"), set.drop_snapshot("s"));
        assert!(
            matches!(
                (&d1, &d2),
                (Ok(()), Err(SnapshotError::Unknown { .. }))
                    | (Err(SnapshotError::Unknown { .. }), Ok(()))
            ),
            "{d1:?} {d2:?}"
        );
        assert!(small.read(&store, 0, 1).await.is_err());
        // Taken again at once: nothing of the old one removes the new area.
        let snap = set
            .freeze(&store, "s", 1 << 20, "", || Ok(2))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(area.exists());
        let g = set.change(&store, 0, 4096).await;
        store
            .write(0, Bytes::from(vec![5u8; 4096]), false)
            .await
            .unwrap();
        drop(g);
        assert_eq!(&snap.read(&store, 0, 4).await.unwrap()[..], &[1u8; 4]);
        assert!(set.close_all(async { Ok(()) }, || GEN).await.is_empty());
        let (set, dropped) = Snapshots::load(&dir, "r0", size, known);
        assert!(dropped.is_empty(), "{dropped:?}");
        assert_eq!(set.get("s").unwrap().status().generation, 2);
    }

    /// A dropped snapshot is invalid before a change can stop preserving for it: never
    /// unlisted (so skipped by changes) while a reader could still trust it. The drop is held
    /// inside, between its two steps, by holding the snapshot's lock here.
    #[tokio::test]
    async fn a_dropped_snapshot_is_invalid_before_it_is_unlisted() {
        let size = 1 << 20;
        let (dir, store) = setup("droprace", size);
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let set = Arc::new(set);
        let snap = set.open("s", 1 << 20, 1, "").unwrap();
        let held = snap.frozen();
        let s2 = set.clone();
        let dropping = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(s2.drop_snapshot("s"))
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        // A change lists the open snapshots under `open`: if it can, the snapshot must be
        // either still listed or already invalid.
        if let Ok(open) = set.open.try_lock() {
            let listed = open.iter().any(|s| s.name == "s");
            assert!(
                listed || snap.invalid_reason().is_some(),
                "unlisted (changes no longer preserve for it) while readers still trust it"
            );
        }
        drop(held);
        dropping.join().unwrap().unwrap();
        assert!(set.get("s").is_none());
        assert!(matches!(
            snap.read(&store, 0, 1).await,
            Err(SnapshotError::Invalid { .. })
        ));
        assert!(!dir.join("r0@s.snap").exists());
    }

    /// Drops the store's cached pages (clean after `sync_all`), so reads must wait for the disk.
    fn evict(dir: &Path) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(dir.join("data")).unwrap();
        f.sync_all().unwrap();
        // SAFETY: `f` is an open descriptor for the whole call; fadvise only drops clean pages.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
    }

    #[tokio::test]
    async fn changes_preserve_at_once_when_cached_and_through_the_engine_otherwise() {
        let size = 1 << 20;
        let (dir, store) = setup("now", size);
        fill(&store, 1, size).await;
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let g = set
            .try_change_now(&store, 0, 4096)
            .expect("no snapshot: at once");
        assert!(g.invalidated.is_empty());
        drop(g);
        let snap = set.open("s", 1 << 20, 1, "").unwrap();
        // Cached: preserved on this thread, one record per block, a run of three at once.
        let g = set
            .try_change_now(&store, 4096 + 10, 2 * 4096)
            .expect("cached");
        assert!(g.invalidated.is_empty());
        store
            .write(4096 + 10, Bytes::from(vec![2u8; 2 * 4096]), false)
            .await
            .unwrap();
        drop(g);
        assert_eq!(set.status()[0].cow_used_bytes, area_bytes(3, 4096));
        // Already preserved: nothing to read, at once even when uncached.
        evict(&dir);
        let g = set
            .try_change_now(&store, 4096, 4096)
            .expect("nothing to preserve");
        drop(g);
        // Not cached: nothing done, the change goes through `change`. Whether the kernel really
        // dropped the page is up to it (a tmpfs TMPDIR keeps it, readahead may bring it back):
        // then the change is made at once, and the outcome below must be the same.
        evict(&dir);
        let g = match set.try_change_now(&store, 8 * 4096, 4096) {
            Err(_) => {
                assert_eq!(set.status()[0].cow_used_bytes, area_bytes(3, 4096));
                set.change(&store, 8 * 4096, 4096).await
            }
            Ok(g) => {
                eprintln!("the evicted block was cached again: the change was made at once");
                g
            }
        };
        assert!(g.invalidated.is_empty());
        store
            .write(8 * 4096, Bytes::from(vec![3u8; 4096]), false)
            .await
            .unwrap();
        drop(g);
        assert_eq!(set.status()[0].cow_used_bytes, area_bytes(4, 4096));
        assert_eq!(
            &snap.read(&store, 0, size as usize).await.unwrap()[..],
            &vec![1u8; size as usize][..]
        );
        // A freeze under way holds off changes made at once.
        let freeze = set.gate.write().await;
        assert!(set.try_change_now(&store, 0, 1).is_err());
        drop(freeze);
        // A full area invalidates the snapshot, and the change goes on.
        let small = set.open("small", area_bytes(1, 4096), 2, "").unwrap();
        let g = set.try_change_now(&store, 0, 8192).expect("cached");
        assert_eq!(g.invalidated.len(), 1);
        assert_eq!(g.invalidated[0].name, "small");
        assert!(g.invalidated[0].reason.contains("full"));
        drop(g);
        assert!(small.read(&store, 0, 1).await.is_err());
        small.area_removed().await;
        assert!(!dir.join("r0@small.snap").exists(), "its area is removed");
        assert_eq!(&snap.read(&store, 0, 4).await.unwrap()[..], &[1u8; 4]);
    }

    /// A change that cannot be made at once still reports the snapshots it invalidated before
    /// it found out: `change` will not see them again (their areas are gone).
    #[tokio::test]
    async fn a_change_not_made_at_once_reports_what_it_invalidated() {
        let size = 1 << 20;
        let (dir, store) = setup("notnow", size);
        fill(&store, 1, size).await;
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let _small = set.open("small", area_bytes(1, 4096), 1, "").unwrap();
        let _big = set.open("big", 1 << 20, 1, "").unwrap();
        // Too large to preserve at once for "big"; too large to fit at all in "small".
        let len = crate::store::DEFAULT_INLINE_MAX as u64 + 4096;
        let not_now = set
            .try_change_now(&store, 0, len)
            .err()
            .expect("too large to preserve at once");
        assert_eq!(not_now.invalidated.len(), 1, "{not_now:?}");
        assert_eq!(not_now.invalidated[0].name, "small");
        assert!(not_now.invalidated[0].reason.contains("full"));
        let g = set.change(&store, 0, len).await;
        assert!(
            g.invalidated.is_empty(),
            "already invalid: not reported again"
        );
    }

    #[test]
    fn a_run_is_split_into_pieces_of_at_most_the_piece_size() {
        // Blocks 0-1, 255-257 (across a 1 MiB boundary), 600 (in the third MiB), and the
        // device's short last block 1000 (100 bytes).
        let blocks = vec![0, 1, 255, 256, 257, 600, 1000];
        let run = Run {
            blocks: blocks.clone(),
            start: 0,
            len: 1000 * 4096 + 100,
        };
        let pieces = run.pieces(4096, 1 << 20);
        let got: Vec<(Vec<u64>, u64, u64)> = pieces
            .iter()
            .map(|p| (p.blocks.clone(), p.start, p.len))
            .collect();
        assert_eq!(
            got,
            vec![
                (vec![0, 1, 255], 0, 256 * 4096),
                (vec![256, 257], 256 * 4096, 2 * 4096),
                (vec![600], 600 * 4096, 4096),
                (vec![1000], 1000 * 4096, 100),
            ]
        );
        assert!(pieces.iter().all(|p| p.len <= 1 << 20));
        let all: Vec<u64> = pieces.into_iter().flat_map(|p| p.blocks).collect();
        assert_eq!(all, blocks);
    }

    /// A large zeroing is preserved a bounded piece at a time, and the image stays whole.
    #[tokio::test]
    async fn a_large_change_is_preserved_in_bounded_pieces() {
        let size = (5 << 20) + 100;
        let (dir, store) = setup("pieces", size);
        let frozen: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
        store
            .write(0, Bytes::from(frozen.clone()), false)
            .await
            .unwrap();
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let snap = set.open("z", 8 << 20, 1, "").unwrap();
        // One block preserved already, in the middle of the first piece.
        let g = set.change(&store, 8192, 1).await;
        store
            .write(8192, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        drop(g);
        let g = set.change(&store, 100, size - 100).await;
        assert!(g.invalidated.is_empty());
        store
            .write_zeroes(100, size - 100, true, false)
            .await
            .unwrap();
        drop(g);
        let largest = snap.largest_read.load(Ordering::Relaxed);
        assert!(largest <= PRESERVE_PIECE, "{largest} bytes read at once");
        assert_eq!(
            &snap.read(&store, 0, size as usize).await.unwrap()[..],
            &frozen[..]
        );
        let blocks = size.div_ceil(4096);
        assert_eq!(set.status()[0].cow_used_bytes, area_bytes(blocks, 4096));
    }

    #[test]
    fn an_area_file_is_a_resources_only_by_its_own_name() {
        use AreaFile::*;
        let c = classify_area_file;
        assert_eq!(c("r0", "r0@s1.snap"), Ours("s1".into()));
        assert_eq!(c("r0", "r0@x.y.snap"), Ours("x.y".into()));
        assert_eq!(c("r0.x", "r0.x@y.snap"), Ours("y".into()));
        assert_eq!(c("r0", "r0.x@y.snap"), Other, "r0.x's area");
        assert_eq!(c("r0", "r0.x.y.snap"), Legacy("x.y".into()));
        assert_eq!(c("r0.x", "r0.x.y.snap"), Legacy("y".into()));
        assert_eq!(c("r0", "r0@.hidden.snap"), Other);
        assert_eq!(c("r0", "r0@.snap"), Other);
        assert_eq!(c("r0", "r0.snap"), Other);
        assert_eq!(c("r0", "r1@s.snap"), Other);
        assert_eq!(c("r0", "r0@s.snap.tmp"), Other);
        assert_eq!(c("r0", "r0-meta"), Other);
    }

    /// Resources `r0` and `r0.x` share the directory: each creates, keeps, reloads and removes
    /// only its own areas, also those named as by earlier builds (`RES.NAME.snap`, adopted
    /// only when their header records that name; one that cannot be read is left alone).
    #[tokio::test]
    async fn resources_whose_names_share_a_prefix_keep_to_their_own_areas() {
        let size = 1 << 20;
        let (dir, store) = setup("prefix", size);
        fill(&store, 1, size).await;
        let (r0, _) = Snapshots::load(&dir, "r0", size, known);
        let (r0x, _) = Snapshots::load(&dir, "r0.x", size, known);
        // The same file name under the old scheme: r0.x.y.snap.
        r0.open("x.y", 1 << 20, 1, "").unwrap();
        r0x.open("y", 1 << 20, 2, "").unwrap();
        r0x.open("z", 1 << 20, 3, "").unwrap();
        r0.before_write(&store, 0, 4096).await;
        r0x.before_write(&store, 0, 4096).await;
        assert!(r0.close_all(async { Ok(()) }, || GEN).await.is_empty());
        assert!(r0x.close_all(async { Ok(()) }, || GEN).await.is_empty());
        let names = |s: &Snapshots| s.status().into_iter().map(|s| s.name).collect::<Vec<_>>();
        let (r0, dropped) = Snapshots::load(&dir, "r0", size, known);
        assert!(dropped.is_empty(), "{dropped:?}");
        assert_eq!(names(&r0), ["x.y"]);
        let (r0x, dropped) = Snapshots::load(&dir, "r0.x", size, known);
        assert!(dropped.is_empty(), "{dropped:?}");
        assert_eq!(names(&r0x), ["y", "z"]);
        // Areas named by an earlier build: r0's "x.y" and r0.x's "z" (r0.x's "y" cannot have
        // existed beside r0's "x.y": one file name), and an unreadable one.
        assert!(r0.close_all(async { Ok(()) }, || GEN).await.is_empty());
        assert!(r0x.close_all(async { Ok(()) }, || GEN).await.is_empty());
        std::fs::remove_file(dir.join("r0.x@y.snap")).unwrap();
        std::fs::rename(dir.join("r0@x.y.snap"), dir.join("r0.x.y.snap")).unwrap();
        std::fs::rename(dir.join("r0.x@z.snap"), dir.join("r0.x.z.snap")).unwrap();
        std::fs::write(dir.join("r0.x.bad.snap"), b"not an area").unwrap();
        let (r0x, dropped) = Snapshots::load(&dir, "r0.x", size, known);
        assert_eq!(names(&r0x), ["z"], "r0's x.y is not r0.x's y");
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        assert!(dropped[0].contains("left in place"), "{dropped:?}");
        assert!(dir.join("r0.x.y.snap").exists(), "r0's area is left alone");
        assert!(
            dir.join("r0.x@z.snap").exists(),
            "renamed to the new scheme"
        );
        let (r0, dropped) = Snapshots::load(&dir, "r0", size, known);
        assert_eq!(names(&r0), ["x.y"]);
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        assert!(
            dir.join("r0.x.bad.snap").exists(),
            "never removed: not provably ours"
        );
        assert!(dir.join("r0@x.y.snap").exists() && !dir.join("r0.x.y.snap").exists());
        assert_eq!(
            &r0.get("x.y").unwrap().read(&store, 0, 4).await.unwrap()[..],
            &[1u8; 4]
        );
        assert_eq!(r0.get("x.y").unwrap().status().generation, 1);
        assert_eq!(r0x.get("z").unwrap().status().generation, 3);
        // An area of ours left open by a crash is removed; the other resource's is not touched.
        drop(r0);
        let (r0, dropped) = Snapshots::load(&dir, "r0", size, known);
        assert!(r0.is_empty());
        assert_eq!(dropped.len(), 2, "{dropped:?}");
        assert!(!dir.join("r0@x.y.snap").exists());
        assert!(dir.join("r0.x@z.snap").exists());
    }

    /// CPU time of this thread, in microseconds.
    fn thread_cpu_us() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the call.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0);
        ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
    }

    /// Not a test: the CPU cost of the Secondary's inline write path (`try_change_now` and a
    /// 4 KiB page-cache write) with and without a snapshot that must preserve every block,
    /// measured on this thread (robust to a loaded machine). Run with
    /// `cargo test -p blockd --release cow_cost -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore]
    async fn cow_cost() {
        let size = 256u64 << 20;
        let blocks = size / 4096;
        let (dir, store) = setup("cost", size);
        fill(&store, 1, size).await;
        let (set, _) = Snapshots::load(&dir, "r0", size, known);
        let data = vec![7u8; 4096];
        // A permutation of the blocks (odd multiplier modulo a power of two).
        let order = |i: u64, salt: u64| (i.wrapping_mul(2_654_435_761) + salt) % blocks;
        let run = |salt: u64| {
            let t0 = thread_cpu_us();
            for i in 0..blocks {
                let off = order(i, salt) * 4096;
                let g = set.try_change_now(&store, off, 4096).expect("cached");
                assert!(g.invalidated.is_empty());
                store.write_blocking(off, &data, false).unwrap();
                drop(g);
            }
            (thread_cpu_us() - t0) / blocks as f64
        };
        let mut out = Vec::new();
        for rep in 0..3u64 {
            // Start every run with no writeback under way.
            store.flush().await.unwrap();
            let without = run(rep * 7);
            store.flush().await.unwrap();
            let snap = set.open(&format!("c{rep}"), 2 * size, 1, "").unwrap();
            let with = run(rep * 7 + 3);
            assert!(set.status()[0].cow_used_bytes / 4096 >= blocks);
            drop(snap);
            set.drop_snapshot(&format!("c{rep}")).await.unwrap();
            out.push((without, with));
        }
        for (without, with) in &out {
            eprintln!(
                "cow_cost: {blocks} 4 KiB writes: {without:.2} us/write without a snapshot, {with:.2} with one (+{:.2} per preserved block)",
                with - without
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Model check over real files: whichever way changes preserve (at once or through the
        /// engine), a snapshot reads back its frozen image byte for byte, across a clean restart.
        #[test]
        fn a_snapshot_reads_its_frozen_image_whatever_the_path(
            writes in proptest::collection::vec(
                (0u64..40_000, 1u64..10_000, proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>()),
                1..24,
            ),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let size = 40_000u64;
                let (dir, store) = setup("model", size);
                let frozen: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
                store.write(0, Bytes::from(frozen.clone()), false).await.unwrap();
                let (set, _) = Snapshots::load(&dir, "r0", size, known);
                let snap = set.open("m", 1 << 20, 1, "").unwrap();
                let mut live = frozen.clone();
                for (off, len, byte, now) in writes {
                    let len = len.min(size - off.min(size));
                    if len == 0 {
                        continue;
                    }
                    let g = match now.then(|| set.try_change_now(&store, off, len).ok()).flatten() {
                        Some(g) => g,
                        None => set.change(&store, off, len).await,
                    };
                    assert!(g.invalidated.is_empty());
                    store.write(off, Bytes::from(vec![byte; len as usize]), false).await.unwrap();
                    drop(g);
                    live[off as usize..(off + len) as usize].fill(byte);
                }
                assert_eq!(&store.read(0, size as usize).await.unwrap()[..], &live[..]);
                assert_eq!(&snap.read(&store, 0, size as usize).await.unwrap()[..], &frozen[..]);
                drop(snap);
                assert!(set.close_all(async { Ok(()) }, || GEN).await.is_empty());
                let (set, dropped) = Snapshots::load(&dir, "r0", size, known);
                assert!(dropped.is_empty(), "{dropped:?}");
                let snap = set.get("m").unwrap();
                assert_eq!(&snap.read(&store, 0, size as usize).await.unwrap()[..], &frozen[..]);
            });
        }
    }
}
