//! The block store: one backing regular file or block device, served as async positional I/O.
//!
//! `BlockStore` owns the backing file, checks every request against the export size and the
//! read-only flag, and turns NBD-level operations (read, write with FUA, flush, trim,
//! write-zeroes, fast-zero, cache, block-status) into file operations run by an [`Engine`]:
//! the io_uring engine ([`uring`]) or the thread-pool pread/pwrite engine ([`sync`]), picked at
//! open time by the probe in [`probe`] (`EngineKind::Auto`) or forced.
//!
//! I/O is buffered (no `O_DIRECT`), so any offset and length down to one byte is served as is:
//! there is no alignment and no read-modify-write in the store. Durability comes from
//! `RWF_DSYNC` writes (FUA) and `fdatasync` (flush). Block devices are the exception for
//! discard/zeroing ioctls, which need logical-block alignment; unaligned edges of a zeroing
//! request are written as zero buffers.
//!
//! Reads and non-FUA writes up to [`DEFAULT_INLINE_MAX`] (an NBD client's reads at any size:
//! [`BlockStore::read_for_client`]) first try `RWF_NOWAIT` on the calling thread ([`inline`]);
//! whatever the page cache cannot serve without blocking goes to the engine, except one such
//! write per file at a time, written in place ([`inline::InlinePath::write_or_wait`]: ext4 has
//! no `RWF_NOWAIT` buffered writes). A client's large read of cached data is sent from a
//! mapping of the backing ([`mapped`]).
//! On tmpfs/ramfs (memory only, but no `RWF_NOWAIT` support) they simply run on that thread,
//! and larger ones run as a plain pread/pwrite on an engine worker (io_uring would only punt
//! them to its io-wq).
//! All clones share one file, so `flush` (fdatasync) covers every write completed through any
//! connection (what NBD `CAN_MULTI_CONN` promises).
//!
//! Every change handed to the engine is counted until the engine is done with it, whether or
//! not its caller still waits ([`BlockStore::writes_in_flight`]): a snapshot's freeze waits
//! for them.

mod in_flight;
mod inline;
mod mapped;
mod os;
pub mod probe;
mod sync;
mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};

use in_flight::WriteGuard;

pub use in_flight::WritesInFlight;
pub use mapped::InPlace;
pub use os::set_receive_low_water;
pub use sync::{SyncConfig, SyncEngine};
pub use uring::{UringConfig, UringEngine};

/// Engine tuning; `Default` is what `BlockStore::open` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub uring: UringConfig,
    pub sync: SyncConfig,
    /// Requests up to this many bytes (an NBD client's reads at any size) first try the inline
    /// `RWF_NOWAIT` path ([`inline`]); 0 disables it.
    pub inline_max: usize,
}

/// Largest zero buffer written per call when zeroes must be written as data.
const ZERO_CHUNK: usize = 1 << 20;
/// A shared, never-freed buffer of zeroes for the write-zeroes fallback.
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
/// Default largest request tried on the inline `RWF_NOWAIT` path (see [`inline`]; an NBD
/// client's reads try it at any size): on this project's reference machine it doubles cached
/// 4 KiB read IOPS on ext4. Larger requests go to the engine's threads: behind an NBD
/// connection, a 1 MiB memcpy on the async worker serialised with receiving the next request,
/// and handing it off made 1 MiB sequential writes over NBD 20-40% faster
/// (docs/benchmarks-nbd.md); a client's large read now runs in a task of its own, where the
/// inline copy is the cheapest.
pub const DEFAULT_INLINE_MAX: usize = 128 << 10;
/// Upper bound on extents returned by one `block_status` call (the reply stays small; the
/// client asks again for the rest).
const MAX_EXTENTS: usize = 1024;

/// Which I/O engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring when the startup probe passes, otherwise the sync engine (logged).
    #[default]
    Auto,
    /// io_uring or fail to open.
    Uring,
    /// Thread-pool pread/pwrite.
    Sync,
}

impl FromStr for EngineKind {
    type Err = ParseEngineKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            other => Err(ParseEngineKindError(other.to_string())),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Auto => "auto",
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
        })
    }
}

/// An `--io-engine` value that is not `auto`, `uring` or `sync`.
#[derive(Debug, thiserror::Error)]
#[error("unknown I/O engine {0:?} (expected auto, uring or sync)")]
pub struct ParseEngineKindError(String);

/// How to open a [`BlockStore`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Export size. A missing regular file is created sparse with this size; an existing
    /// smaller file is grown (sparse) to it; an existing larger file is exported up to this
    /// size only. For block devices it must not exceed the device size. `None`: the whole
    /// file or device.
    pub size: Option<u64>,
    /// Open the backing read-only; every modifying call fails with [`StoreError::ReadOnly`].
    pub read_only: bool,
    /// Engine selection.
    pub engine: EngineKind,
}

/// One run of same-status bytes, for NBD `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated (a hole in a sparse file).
    pub hole: bool,
    /// Known to read as zeroes.
    pub zero: bool,
}

/// A failed store operation. One variant per operation; `raw_os_error` gives the errno.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot determine or set the size of {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotFileOrDevice { path: PathBuf },
    #[error("{path} does not exist and no size was given to create it")]
    MissingSize { path: PathBuf },
    #[error("requested size {requested} of {path} exceeds its size {actual} (cannot grow it)")]
    TooSmall {
        path: PathBuf,
        requested: u64,
        actual: u64,
    },
    #[error("io_uring engine unavailable")]
    Probe {
        #[source]
        source: io::Error,
    },
    #[error("cannot start the {engine} engine")]
    EngineStart {
        engine: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("read of {len} bytes at {offset} failed")]
    Read {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("write of {len} bytes at {offset} failed")]
    Write {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("flush failed")]
    Flush {
        #[source]
        source: io::Error,
    },
    #[error("trim of {len} bytes at {offset} failed")]
    Trim {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("write-zeroes of {len} bytes at {offset} failed")]
    WriteZeroes {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("cache of {len} bytes at {offset} failed")]
    Cache {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("block status of {len} bytes at {offset} failed")]
    BlockStatus {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("request of {len} bytes at {offset} is outside the export of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the store is read-only")]
    ReadOnly,
    #[error("zeroing this range would need writing zeroes")]
    NotFast,
    #[error("the I/O engine is gone (its thread died)")]
    EngineGone,
}

impl StoreError {
    /// The OS errno behind this error (ENOSPC, EIO, ...), if it came from a syscall.
    /// `OutOfRange`, `ReadOnly`, `NotFast` and `EngineGone` have none; callers map them.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StoreError::Open { source, .. }
            | StoreError::Create { source, .. }
            | StoreError::Size { source, .. }
            | StoreError::Probe { source }
            | StoreError::EngineStart { source, .. }
            | StoreError::Read { source, .. }
            | StoreError::Write { source, .. }
            | StoreError::Flush { source }
            | StoreError::Trim { source, .. }
            | StoreError::WriteZeroes { source, .. }
            | StoreError::Cache { source, .. }
            | StoreError::BlockStatus { source, .. } => source.raw_os_error(),
            StoreError::NotFileOrDevice { .. }
            | StoreError::MissingSize { .. }
            | StoreError::TooSmall { .. }
            | StoreError::OutOfRange { .. }
            | StoreError::ReadOnly
            | StoreError::NotFast
            | StoreError::EngineGone => None,
        }
    }
}

/// How an engine call failed: the syscall failed, or the engine can no longer run anything.
#[derive(Debug)]
pub(crate) enum EngineError {
    Io(io::Error),
    Gone,
}

impl From<io::Error> for EngineError {
    fn from(e: io::Error) -> Self {
        EngineError::Io(e)
    }
}

impl EngineError {
    /// Wraps an I/O failure into the operation's `StoreError` variant.
    fn into_store(self, wrap: impl FnOnce(io::Error) -> StoreError) -> StoreError {
        match self {
            EngineError::Io(e) => wrap(e),
            EngineError::Gone => StoreError::EngineGone,
        }
    }

    fn is_unsupported(&self) -> bool {
        matches!(self, EngineError::Io(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP))
    }
}

/// The I/O engine behind a store: one variant per backend, one file per backend.
pub(crate) enum Engine {
    Uring(UringEngine),
    Sync(SyncEngine),
}

impl Engine {
    fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Sync(_) => "sync",
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<BytesMut, EngineError> {
        match self {
            Engine::Uring(e) => e.read(offset, len).await,
            Engine::Sync(e) => e.read(offset, len).await,
        }
    }

    /// Writes `data`; `guard` counts the write until the engine is done with it.
    async fn write(
        &self,
        offset: u64,
        data: Bytes,
        dsync: bool,
        guard: WriteGuard,
    ) -> Result<(), EngineError> {
        match self {
            Engine::Uring(e) => e.write(offset, data, dsync, guard).await,
            Engine::Sync(e) => e.write(offset, data, dsync, guard).await,
        }
    }

    async fn fdatasync(&self) -> Result<(), EngineError> {
        match self {
            Engine::Uring(e) => e.fdatasync().await,
            Engine::Sync(e) => e.fdatasync().await,
        }
    }

    /// `fallocate` (punch hole, zero range); `guard` counts it until the engine is done.
    async fn fallocate(
        &self,
        mode: libc::c_int,
        offset: u64,
        len: u64,
        guard: WriteGuard,
    ) -> Result<(), EngineError> {
        match self {
            Engine::Uring(e) => e.fallocate(mode, offset, len, guard).await,
            Engine::Sync(e) => e.fallocate(mode, offset, len, guard).await,
        }
    }

    /// Runs a blocking closure over the file off the async threads (block status, cache,
    /// device ioctls): on the sync engine's pool, or tokio's blocking pool for io_uring.
    async fn blocking<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        match self {
            Engine::Uring(e) => e.blocking(f).await,
            Engine::Sync(e) => e.blocking(f).await,
        }
    }
}

/// What the backing is; decides how trim and zeroing are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    File,
    /// A block device with its logical block size (alignment for discard/zero ioctls).
    Device {
        logical_block: u64,
    },
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            uring: UringConfig::default(),
            sync: SyncConfig::default(),
            inline_max: DEFAULT_INLINE_MAX,
        }
    }
}

struct Inner {
    path: PathBuf,
    file: Arc<File>,
    inline: inline::InlinePath,
    size: u64,
    read_only: bool,
    backing: Backing,
    engine: Engine,
    /// `FALLOC_FL_PUNCH_HOLE` works (cleared on the first `EOPNOTSUPP`).
    punch: AtomicBool,
    /// `FALLOC_FL_ZERO_RANGE` works (cleared on the first `EOPNOTSUPP`).
    zero_range: AtomicBool,
    /// Block devices: discard is supported.
    discard: bool,
    /// tmpfs/ramfs: page-cache operations never wait for a device.
    memory_backed: bool,
    /// Changes the engine is executing (see [`in_flight`]).
    writes: Arc<WritesInFlight>,
    /// Mapped windows of the backing for large client reads of cached data.
    mapping: mapped::MappedWindows,
    /// Test hook: called by every [`BlockStore::flush`] before its `fdatasync`.
    #[cfg(test)]
    on_flush: std::sync::Mutex<Option<FlushHook>>,
}

/// Test hook run when a flush starts ([`BlockStore::on_flush_for_test`]).
#[cfg(test)]
type FlushHook = Arc<dyn Fn() + Send + Sync>;

/// The block store. Cheap to clone; all clones share one file and one engine.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockStore")
            .field("path", &self.inner.path)
            .field("size", &self.inner.size)
            .field("read_only", &self.inner.read_only)
            .field("engine", &self.inner.engine.name())
            .finish()
    }
}

/// A fast way to zero a range: `fallocate` zero-range or punch-hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FastZero {
    ZeroRange,
    Punch,
}

/// The fast ways to zero `offset..offset + len`, in the order to try, given what the backing
/// supports (`punch`, `zero_range`: the probed flags). Empty: only writing zeroes would do.
/// A device's zero-range may fall back to writing zeroes, so only its punch-hole (aligned to the
/// logical block) counts; punching is allowed only when `may_punch` (NBD's `NO_HOLE` keeps the
/// range allocated).
fn fast_zero_modes(
    backing: Backing,
    punch: bool,
    zero_range: bool,
    offset: u64,
    len: u64,
    may_punch: bool,
) -> &'static [FastZero] {
    use FastZero::{Punch, ZeroRange};
    let punch = punch && may_punch;
    match backing {
        Backing::File => match (zero_range, punch) {
            (true, true) => &[ZeroRange, Punch],
            (true, false) => &[ZeroRange],
            (false, true) => &[Punch],
            (false, false) => &[],
        },
        Backing::Device { logical_block } => {
            let aligned = offset % logical_block == 0 && len % logical_block == 0;
            if aligned && punch { &[Punch] } else { &[] }
        }
    }
}

/// When a client's read copies its data out of the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyAt {
    /// At the read, into a buffer of its own.
    Read,
    /// When the reply is written to a plain socket, by the kernel: a large cached range is a
    /// slice of the mapped backing ([`BlockStore::read_for_client_at`]).
    Send,
}

/// Smallest client read sent from the mapped backing: below it the copy saved is worth less
/// than the `mincore` call.
const MAPPED_READ_MIN: usize = 64 << 10;

const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

impl BlockStore {
    /// Opens (or creates) the backing and starts the engine. Blocking; call at startup.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<BlockStore, StoreError> {
        Self::open_with(path, opts, EngineConfig::default())
    }

    /// Like [`BlockStore::open`] with explicit engine tuning (benchmarks and tests).
    pub fn open_with(
        path: &Path,
        opts: &OpenOptions,
        config: EngineConfig,
    ) -> Result<BlockStore, StoreError> {
        let (file, size, backing) = open_backing(path, opts)?;
        // (A device node lives on devtmpfs, which reports itself as tmpfs: only a file's file
        // system says where its data is.)
        let memory_backed = backing == Backing::File && os::is_memory_backed(&file);
        let file = Arc::new(file);
        let (punch, zero_range, discard) = probe_zeroing(&file, backing, opts.read_only);
        let engine = match opts.engine {
            EngineKind::Sync => Engine::Sync(start_sync(&file, config.sync)?),
            EngineKind::Uring => match probe::probe_uring() {
                Ok(()) => Engine::Uring(start_uring(&file, config.uring)?),
                Err(source) => return Err(StoreError::Probe { source }),
            },
            EngineKind::Auto => match probe::probe_uring() {
                Ok(()) => Engine::Uring(start_uring(&file, config.uring)?),
                Err(e) => {
                    tracing::info!(error = %e, "io_uring unavailable, using the sync engine");
                    Engine::Sync(start_sync(&file, config.sync)?)
                }
            },
        };
        tracing::debug!(path = %path.display(), size, ?backing, engine = engine.name(),
            punch, zero_range, "block store open");
        // Only memory-backed stores take writes through the windows: on a disk a written page
        // of a shared mapping is dirtied through the file system's fault handler (block
        // allocation, journal), which a socket receive would wait for on a runtime thread.
        let mapping = mapped::MappedWindows::new(
            size,
            mapped::WINDOWS_KEPT,
            memory_backed && !opts.read_only,
        );
        Ok(BlockStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                file,
                inline: inline::InlinePath::new(config.inline_max, memory_backed),
                size,
                read_only: opts.read_only,
                backing,
                engine,
                punch: AtomicBool::new(punch),
                zero_range: AtomicBool::new(zero_range),
                discard,
                memory_backed,
                writes: Arc::default(),
                mapping,
                #[cfg(test)]
                on_flush: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn read_only(&self) -> bool {
        self.inner.read_only
    }

    /// `"io_uring"` or `"sync"`.
    pub fn engine_name(&self) -> &'static str {
        self.inner.engine.name()
    }

    /// Trim does something on this backing (punch hole on files, discard on devices).
    pub fn supports_trim(&self) -> bool {
        !self.inner.read_only
            && match self.inner.backing {
                Backing::File => self.inner.punch.load(Ordering::Relaxed),
                Backing::Device { .. } => self.inner.discard,
            }
    }

    /// Zeroing a range is fast (zero-range or punch-hole) rather than writing zeroes, for some
    /// ranges at least (`can_fast_zero` says which).
    pub fn supports_fast_zero(&self) -> bool {
        let any = match self.inner.backing {
            Backing::File => 0,
            Backing::Device { logical_block } => logical_block,
        };
        self.can_fast_zero(0, any, true)
    }

    /// `fast_zero` of this range would try a fast way (it can still find it unsupported on its
    /// first try): a replicated zeroing asks before the peers zero anything.
    pub fn can_fast_zero(&self, offset: u64, len: u64, may_punch: bool) -> bool {
        !self.inner.read_only && !self.fast_zero_modes(offset, len, may_punch).is_empty()
    }

    fn fast_zero_modes(&self, offset: u64, len: u64, may_punch: bool) -> &'static [FastZero] {
        fast_zero_modes(
            self.inner.backing,
            self.inner.punch.load(Ordering::Relaxed),
            self.inner.zero_range.load(Ordering::Relaxed),
            offset,
            len,
            may_punch,
        )
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.inner.size,
            }),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if self.inner.read_only {
            return Err(StoreError::ReadOnly);
        }
        self.check_range(offset, len)
    }

    /// Changes of the file the engine is still executing, whoever asked for them: a caller
    /// whose future was dropped leaves its write running there. Wait for
    /// [`WritesInFlight::idle`] (with new changes held off) to see the file quiet.
    pub fn writes_in_flight(&self) -> &WritesInFlight {
        &self.inner.writes
    }

    /// Writes `data` through the engine, counted until the engine is done with it.
    async fn engine_write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let guard = self.inner.writes.begin();
        self.inner.engine.write(offset, data, fua, guard).await
    }

    /// `fallocate` through the engine, counted until the engine is done with it.
    async fn engine_fallocate(
        &self,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        let guard = self.inner.writes.begin();
        self.inner.engine.fallocate(mode, offset, len, guard).await
    }

    /// Runs the change `f` on the engine's blocking pool, counted until it is done.
    async fn engine_blocking_change<F>(&self, f: F) -> Result<(), EngineError>
    where
        F: FnOnce(&File) -> io::Result<()> + Send + 'static,
    {
        let guard = self.inner.writes.begin();
        let counted = move |file: &File| {
            let _counted = guard;
            f(file)
        };
        self.inner.engine.blocking(counted).await
    }

    /// Reads exactly `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<BytesMut, StoreError> {
        self.read_inline_up_to(offset, len, false).await
    }

    /// [`Self::read`] for an NBD client, from a task of the request's own when `len` is large:
    /// cached data of any size is copied right here rather than by the engine.
    pub async fn read_for_client(&self, offset: u64, len: usize) -> Result<BytesMut, StoreError> {
        self.read_inline_up_to(offset, len, true).await
    }

    /// [`Self::read_for_client`], copied at `copy_at`. With [`CopyAt::Send`], a range of at
    /// least [`MAPPED_READ_MIN`] bytes inside one mapped window whose pages are all cached is a
    /// slice of the mapping: the data as it is when sent, copied once, by the kernel into the
    /// socket (a page evicted before that is read back from the disk inside the socket write).
    pub async fn read_for_client_at(
        &self,
        offset: u64,
        len: usize,
        copy_at: CopyAt,
    ) -> Result<Bytes, StoreError> {
        if copy_at == CopyAt::Send && len >= MAPPED_READ_MIN {
            // Ranges past the end are never mapped: the copying read reports them.
            if let Some(data) = self
                .inner
                .mapping
                .cached_range(&self.inner.file, offset, len)
            {
                return Ok(data);
            }
        }
        Ok(self.read_for_client(offset, len).await?.freeze())
    }

    async fn read_inline_up_to(
        &self,
        offset: u64,
        len: usize,
        client: bool,
    ) -> Result<BytesMut, StoreError> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(BytesMut::new());
        }
        let mut buf = self
            .inner
            .inline
            .read(&self.inner.file, offset, len, client);
        let done = buf.len();
        if done == len {
            return Ok(buf);
        }
        let (at, n) = (offset + done as u64, len - done);
        let rest = if self.inner.memory_backed {
            // tmpfs has no non-blocking reads: io_uring would hand each one to an io-wq
            // worker, two thread hops more than a worker doing the pread itself.
            let read = move |f: &File| os::pread_exact_new(f, n, at);
            self.inner.engine.blocking(read).await
        } else {
            self.inner.engine.read(at, n).await
        };
        let rest = rest.map_err(|e| {
            e.into_store(|source| StoreError::Read {
                offset,
                len: len as u64,
                source,
            })
        })?;
        if done == 0 {
            Ok(rest)
        } else {
            buf.extend_from_slice(&rest);
            Ok(buf)
        }
    }

    /// Writes `data` at `offset`; with `fua` the data is durable when this returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), StoreError> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        let done = self
            .inner
            .inline
            .write(&self.inner.file, offset, &data, fua);
        if done == data.len() {
            return Ok(());
        }
        let (at, rest) = (offset + done as u64, data.slice(done..));
        let written = if self.inner.memory_backed {
            // As for reads: a worker's pwrite, not an io-wq punt behind the ring thread.
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            self.engine_blocking_change(move |f| os::pwrite_full(f, &rest, at, flags))
                .await
        } else if let Some(r) = self
            .inner
            .inline
            .write_or_wait(&self.inner.file, at, &rest, fua)
        {
            r.map_err(EngineError::Io)
        } else {
            self.engine_write(at, rest, fua).await
        };
        written.map_err(|e| {
            e.into_store(|source| StoreError::Write {
                offset,
                len,
                source,
            })
        })
    }

    /// `offset..offset + len` as a place to receive a client's WRITE payload into: on a
    /// memory-backed store, when the range lies in one mapped window and all its pages exist
    /// (so that writing them allocates nothing), a range of the mapping, which a socket
    /// receive fills: the data is written as it is received, with one copy instead of two
    /// (into a buffer, then into the file). `None` otherwise, for the caller to receive the
    /// payload into a buffer and write it.
    pub(crate) fn write_in_place(&self, offset: u64, len: usize) -> Option<InPlace> {
        self.check_write(offset, len as u64).ok()?;
        self.inner
            .mapping
            .writable_range(&self.inner.file, offset, len)
    }

    /// Whether the backing lives in memory (tests).
    #[cfg(test)]
    pub(crate) fn memory_backed(&self) -> bool {
        self.inner.memory_backed
    }

    /// Ranges handed out by [`Self::write_in_place`] so far (tests).
    #[cfg(test)]
    pub(crate) fn in_place_receives(&self) -> usize {
        self.inner.mapping.in_place()
    }

    /// Writes `data` at `offset` with a plain `pwrite` on the calling thread, which blocks until
    /// the page cache took it (with `fua`: until it is durable). For a caller that applies a
    /// stream of writes itself (a replication Secondary, the pieces of a large NBD WRITE),
    /// where handing each one to the engine costs more thread wake-ups than the write (ext4 has
    /// no `RWF_NOWAIT` buffered writes, so the inline path never takes them there).
    pub fn write_blocking(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), StoreError> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let _counted = self.inner.inline.blocking();
        os::pwrite_full(&self.inner.file, data, offset, flags).map_err(|source| StoreError::Write {
            offset,
            len,
            source,
        })
    }

    /// Makes all completed writes durable (`fdatasync`).
    pub async fn flush(&self) -> Result<(), StoreError> {
        if self.inner.read_only {
            return Ok(());
        }
        #[cfg(test)]
        {
            let hook = self.inner.on_flush.lock().expect("flush hook").clone();
            if let Some(hook) = hook {
                hook();
            }
        }
        self.inner
            .engine
            .fdatasync()
            .await
            .map_err(|e| e.into_store(|source| StoreError::Flush { source }))
    }

    /// Advisory discard: punch hole on files, `BLKDISCARD` on devices. `Ok` when the backing
    /// cannot do it.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let wrap = |source| StoreError::Trim {
            offset,
            len,
            source,
        };
        match self.inner.backing {
            Backing::File => {
                if !self.inner.punch.load(Ordering::Relaxed) {
                    return Ok(());
                }
                match self.engine_fallocate(PUNCH, offset, len).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_unsupported() => {
                        self.inner.punch.store(false, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(e) => Err(e.into_store(wrap)),
                }
            }
            Backing::Device { logical_block } => {
                let Some((start, end)) = align_inward(offset, offset + len, logical_block) else {
                    return Ok(());
                };
                if !self.inner.discard {
                    return Ok(());
                }
                let discard = move |f: &File| os::block_discard(f, start, end - start);
                match self.engine_blocking_change(discard).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_unsupported() => Ok(()),
                    Err(e) => Err(e.into_store(wrap)),
                }
            }
        }
    }

    /// Makes `[offset, offset+len)` read as zeroes: punch hole when `may_punch`, else zero
    /// range, else zero buffers written in bounded chunks. With `fua` it is durable on return.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let wrap = |source| StoreError::WriteZeroes {
            offset,
            len,
            source,
        };
        let (start, end) = match self.inner.backing {
            Backing::File => (offset, offset + len),
            Backing::Device { logical_block } => {
                match align_inward(offset, offset + len, logical_block) {
                    Some(r) => r,
                    None => (offset, offset), // nothing aligned: all of it is written below
                }
            }
        };
        let mut done = false;
        if start < end {
            let mut modes = Vec::with_capacity(2);
            if may_punch && self.inner.punch.load(Ordering::Relaxed) {
                modes.push((PUNCH, &self.inner.punch));
            }
            if self.inner.zero_range.load(Ordering::Relaxed) {
                modes.push((ZERO_RANGE, &self.inner.zero_range));
            }
            for (mode, flag) in modes {
                match self.engine_fallocate(mode, start, end - start).await {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(e) if e.is_unsupported() => flag.store(false, Ordering::Relaxed),
                    Err(e) => return Err(e.into_store(wrap)),
                }
            }
        }
        let ranges = if done {
            [(offset, start), (end, offset + len)]
        } else {
            [(offset, offset + len), (0, 0)]
        };
        for (from, to) in ranges {
            self.write_zero_buffers(from, to, fua)
                .await
                .map_err(|e| e.into_store(wrap))?;
        }
        if fua && done {
            self.inner
                .engine
                .fdatasync()
                .await
                .map_err(|e| e.into_store(wrap))?;
        }
        Ok(())
    }

    /// Writes zero buffers over `[from, to)` in chunks of at most [`ZERO_CHUNK`].
    async fn write_zero_buffers(&self, from: u64, to: u64, fua: bool) -> Result<(), EngineError> {
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(ZERO_CHUNK as u64) as usize;
            let chunk = Bytes::from_static(&ZEROES[..n]);
            self.engine_write(pos, chunk, fua).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Zeroes the range only if that is fast (zero range, or punch hole when `may_punch`: with
    /// NBD's `NO_HOLE` the range must stay allocated); otherwise `Err(StoreError::NotFast)`
    /// without touching the data.
    pub async fn fast_zero(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
    ) -> Result<(), StoreError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        for way in self.fast_zero_modes(offset, len, may_punch) {
            let (mode, flag) = match *way {
                FastZero::ZeroRange => (ZERO_RANGE, &self.inner.zero_range),
                FastZero::Punch => (PUNCH, &self.inner.punch),
            };
            match self.engine_fallocate(mode, offset, len).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_unsupported() => {
                    if matches!(self.inner.backing, Backing::File) {
                        flag.store(false, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    return Err(e.into_store(|source| StoreError::WriteZeroes {
                        offset,
                        len,
                        source,
                    }));
                }
            }
        }
        Err(StoreError::NotFast)
    }

    /// Hints the kernel to read the range into the page cache (`POSIX_FADV_WILLNEED`).
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.inner
            .engine
            .blocking(move |f| os::fadvise_willneed(f, offset, len))
            .await
            .map_err(|e| {
                e.into_store(|source| StoreError::Cache {
                    offset,
                    len,
                    source,
                })
            })
    }

    /// Allocation status of `[offset, offset+len)` from `SEEK_DATA`/`SEEK_HOLE`: extents in
    /// order, covering at least one byte and at most `len` (empty only when `len == 0`).
    /// Holes are reported as hole+zero; devices report one data extent.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StoreError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if let Backing::Device { .. } = self.inner.backing {
            return Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }]);
        }
        // A file with as many bytes allocated as it is long has no holes: answer without
        // seeking. SEEK_HOLE inside a long data run is O(run length) on tmpfs (it visits every
        // cached page up to the next hole or EOF), milliseconds per call for a full 1 GiB file.
        // Metadata blocks can make this claim "data" over a small hole, which NBD allows.
        if let Some(extent) = fully_allocated(&self.inner.file, offset + len) {
            return Ok(vec![Extent {
                length: len,
                ..extent
            }]);
        }
        self.inner
            .engine
            .blocking(move |f| {
                map_extents(offset, offset + len, MAX_EXTENTS, |pos, whence| {
                    os::seek(f, pos, whence)
                })
            })
            .await
            .map_err(|e| {
                e.into_store(|source| StoreError::BlockStatus {
                    offset,
                    len,
                    source,
                })
            })
    }

    /// Test hook: counts a change in flight as the engine would while it executes one.
    #[cfg(test)]
    pub(crate) fn begin_write_for_test(&self) -> WriteGuard {
        self.inner.writes.begin()
    }

    /// Test hook: `hook` runs whenever a flush (of any clone) starts, before its `fdatasync`.
    #[cfg(test)]
    pub(crate) fn on_flush_for_test(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.inner.on_flush.lock().expect("flush hook") = Some(Arc::new(hook));
    }

    /// Test hook: makes the engine's worker thread(s) exit as if they had crashed.
    #[cfg(test)]
    pub(crate) fn kill_engine_for_test(&self) {
        match &self.inner.engine {
            Engine::Uring(e) => e.kill_for_test(),
            Engine::Sync(e) => e.kill_for_test(),
        }
    }
}

/// `Some(data extent)` when `file` reaches at least `end` and has no holes by its block count.
fn fully_allocated(file: &File, end: u64) -> Option<Extent> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    (meta.len() >= end && meta.blocks().saturating_mul(512) >= meta.len()).then_some(Extent {
        length: 0,
        hole: false,
        zero: false,
    })
}

/// Largest sub-range of `[start, end)` whose ends are multiples of `align`; `None` if empty.
fn align_inward(start: u64, end: u64, align: u64) -> Option<(u64, u64)> {
    let s = start.div_ceil(align) * align;
    let e = end / align * align;
    (s < e).then_some((s, e))
}

/// Walks `[start, end)` with a `SEEK_DATA`/`SEEK_HOLE` oracle (`seek(pos, whence)` returns
/// `None` for "no data at or after pos") and returns the extents, at most `max` of them.
/// Pure over the oracle so it is unit-testable without a file.
fn map_extents(
    start: u64,
    end: u64,
    max: usize,
    mut seek: impl FnMut(u64, libc::c_int) -> io::Result<Option<u64>>,
) -> io::Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = start;
    while pos < end && out.len() < max {
        let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(u64::MAX);
        let (next, hole) = if data > pos {
            (data.min(end), true)
        } else {
            // pos is in data; SEEK_HOLE always finds at least the implicit hole at EOF.
            let h = seek(pos, libc::SEEK_HOLE)?.unwrap_or(u64::MAX);
            // A racing truncate could give h <= pos; report one byte of data to make progress.
            (h.max(pos + 1).min(end), false)
        };
        let length = next - pos;
        match out.last_mut() {
            Some(last) if last.hole == hole => last.length += length,
            _ => out.push(Extent {
                length,
                hole,
                zero: hole,
            }),
        }
        pos = next;
    }
    Ok(out)
}

/// Opens the file or device and decides the export size.
fn open_backing(path: &Path, opts: &OpenOptions) -> Result<(File, u64, Backing), StoreError> {
    let open = |create: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .create_new(create)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    };
    let file = match open(false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let Some(size) = opts.size else {
                return Err(StoreError::MissingSize {
                    path: path.to_path_buf(),
                });
            };
            if opts.read_only {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
            let f = open(true).map_err(|source| StoreError::Create {
                path: path.to_path_buf(),
                source,
            })?;
            f.set_len(size).map_err(|source| StoreError::Create {
                path: path.to_path_buf(),
                source,
            })?;
            return Ok((f, size, Backing::File));
        }
        Err(source) => {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let size_err = |source| StoreError::Size {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(size_err)?;
    let ft = meta.file_type();
    if ft.is_file() {
        let actual = meta.len();
        let size = match opts.size {
            None => actual,
            Some(s) if s <= actual => s,
            Some(s) if opts.read_only => {
                return Err(StoreError::TooSmall {
                    path: path.to_path_buf(),
                    requested: s,
                    actual,
                });
            }
            Some(s) => {
                file.set_len(s).map_err(size_err)?;
                s
            }
        };
        Ok((file, size, Backing::File))
    } else if ft.is_block_device() {
        let actual = os::block_device_size(&file).map_err(size_err)?;
        let size = match opts.size {
            None => actual,
            Some(s) if s <= actual => s,
            Some(s) => {
                return Err(StoreError::TooSmall {
                    path: path.to_path_buf(),
                    requested: s,
                    actual,
                });
            }
        };
        let logical_block = os::block_queue_attr(&file, "logical_block_size")
            .filter(|b| b.is_power_of_two())
            .unwrap_or(512);
        Ok((file, size, Backing::Device { logical_block }))
    } else {
        Err(StoreError::NotFileOrDevice {
            path: path.to_path_buf(),
        })
    }
}

/// Finds out which zeroing methods the backing supports: `(punch, zero_range, discard)`.
/// Files are probed past their end (KEEP_SIZE, so nothing visible changes); devices are asked
/// through sysfs.
fn probe_zeroing(file: &File, backing: Backing, read_only: bool) -> (bool, bool, bool) {
    if read_only {
        return (false, false, false);
    }
    match backing {
        Backing::File => {
            let Ok(end) = file.metadata().map(|m| m.len()) else {
                return (false, false, false);
            };
            let unsupported = |r: io::Result<()>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP));
            let probe_len = 4096;
            let zero_range = !unsupported(os::fallocate(file, ZERO_RANGE, end, probe_len));
            let punch = !unsupported(os::fallocate(file, PUNCH, end, probe_len));
            (punch, zero_range, false)
        }
        Backing::Device { .. } => {
            let wz = os::block_queue_attr(file, "write_zeroes_max_bytes").unwrap_or(0) > 0;
            let discard = os::block_queue_attr(file, "discard_max_bytes").unwrap_or(0) > 0;
            (wz, true, discard)
        }
    }
}

fn start_sync(file: &Arc<File>, config: SyncConfig) -> Result<SyncEngine, StoreError> {
    SyncEngine::start(file.clone(), config).map_err(|source| StoreError::EngineStart {
        engine: "sync",
        source,
    })
}

fn start_uring(file: &Arc<File>, config: UringConfig) -> Result<UringEngine, StoreError> {
    UringEngine::start(file.clone(), config).map_err(|source| StoreError::EngineStart {
        engine: "io_uring",
        source,
    })
}

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;
