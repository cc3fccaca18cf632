//! Tests of the block store: every scenario runs once per engine (io_uring and sync) and, where
//! the backing filesystem matters, on tmpfs (/dev/shm) and on a disk filesystem (/var/tmp).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;

use super::*;

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// Which engine a scenario runs on, and whether the inline `RWF_NOWAIT` path is in front of it
/// (off for the per-engine suites, so every byte goes through the engine under test).
#[derive(Debug, Clone, Copy)]
struct Setup {
    kind: EngineKind,
    inline_max: usize,
}

impl Setup {
    fn open(&self, path: &Path, o: &OpenOptions) -> Result<BlockStore, StoreError> {
        let config = EngineConfig {
            inline_max: self.inline_max,
            sync: SyncConfig::Threads(2),
            ..EngineConfig::default()
        };
        BlockStore::open_with(
            path,
            &OpenOptions {
                engine: self.kind,
                ..o.clone()
            },
            config,
        )
    }
}

fn opts(size: u64, engine: impl Into<Option<Setup>>) -> OpenOptions {
    OpenOptions {
        size: Some(size),
        read_only: false,
        engine: engine.into().map_or(EngineKind::Sync, |s| s.kind),
    }
}

/// Where backing files live: tmpfs and a disk filesystem.
#[derive(Debug, Clone, Copy)]
enum Fs {
    Tmpfs,
    Disk,
}

fn tempdir(fs: Fs) -> tempfile::TempDir {
    let base = match fs {
        Fs::Tmpfs => "/dev/shm",
        Fs::Disk => "/var/tmp",
    };
    tempfile::Builder::new()
        .prefix("blockd-store-test")
        .tempdir_in(base)
        .expect("tempdir")
}

fn expect_engine(store: &BlockStore, engine: Setup) {
    match engine.kind {
        EngineKind::Uring => assert_eq!(store.engine_name(), "io_uring"),
        EngineKind::Sync => assert_eq!(store.engine_name(), "sync"),
        EngineKind::Auto => {}
    }
}

async fn round_trip(engine: Setup, fs: Fs) {
    let dir = tempdir(fs);
    let size = 8 << 20;
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    expect_engine(&store, engine);
    let mut model = vec![0u8; size as usize];
    let cases: &[(u64, usize)] = &[
        (0, 1),
        (1, 1),
        (511, 2),
        (4095, 4098),
        (12345, 77777),
        ((1 << 20) + 3, (2 << 20) + 5),
        (size - 1, 1),
        (size - 4097, 4097),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64, len);
        let fua = i % 2 == 1;
        store
            .write(off, Bytes::from(data.clone()), fua)
            .await
            .unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        let back = store.read(off, len).await.unwrap();
        assert_eq!(&back[..], &data[..], "read back at {off}+{len}");
    }
    store.flush().await.unwrap();
    // Whole-device read compares against the model (also exercises a big single read).
    let all = store.read(0, size as usize).await.unwrap();
    assert!(all[..] == model[..], "whole image differs from model");
    // Odd-sized reads spanning several writes.
    for &(off, len) in &[(3u64, 10_000usize), (4000, 200_000), (size - 9999, 9999)] {
        let got = store.read(off, len).await.unwrap();
        assert!(got[..] == model[off as usize..off as usize + len]);
    }
    // Zero-length calls are no-ops.
    assert!(store.read(5, 0).await.unwrap().is_empty());
    store.write(5, Bytes::new(), false).await.unwrap();
}

/// Client reads sent from the mapped backing: cached ranges as they are when sent, uncached
/// ones (holes, a range across two mapped windows) copied as before.
async fn client_reads_sent(engine: Setup, fs: Fs) {
    let dir = tempdir(fs);
    let size = mapped::WINDOW + (8 << 20);
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    let data = pattern(3, 4 << 20);
    let at = mapped::WINDOW - (2 << 20);
    store
        .write(at, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    // Inside the first window (mapped), and across the first two (copied).
    for (off, len) in [(at, 1 << 20), (at + 12_345, 100_000), (at, 4 << 20)] {
        let got = store
            .read_for_client_at(off, len, CopyAt::Send)
            .await
            .unwrap();
        let from = (off - at) as usize;
        assert!(got[..] == data[from..from + len], "read {off}+{len}");
    }
    assert_eq!(
        store.inner.mapping.mapped(),
        1,
        "the cached reads were mapped"
    );
    // A mapped read holds what the file holds when it is sent; one copied at the read (as for
    // TLS) what it held then.
    let mapped = store
        .read_for_client_at(at, 1 << 20, CopyAt::Send)
        .await
        .unwrap();
    let copied = store
        .read_for_client_at(at, 1 << 20, CopyAt::Read)
        .await
        .unwrap();
    let newer = pattern(4, 1 << 20);
    store
        .write(at, Bytes::from(newer.clone()), false)
        .await
        .unwrap();
    assert!(mapped[..] == newer[..]);
    assert!(copied[..] == data[..1 << 20]);
    // A hole (not cached): zeroes, copied into a buffer of its own.
    let hole = store
        .read_for_client_at(1 << 20, 1 << 20, CopyAt::Send)
        .await
        .unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    // Small reads are copied; past the end is an error either way.
    assert_eq!(
        &store
            .read_for_client_at(at, 10, CopyAt::Send)
            .await
            .unwrap()[..],
        &newer[..10]
    );
    assert_eq!(store.inner.mapping.mapped(), 1);
    assert!(matches!(
        store
            .read_for_client_at(size - 4096, 1 << 20, CopyAt::Send)
            .await,
        Err(StoreError::OutOfRange { .. })
    ));
    // WRITE payloads are received in place on tmpfs only, into pages that exist, inside the
    // export.
    let in_place = store.write_in_place(at, 1 << 20);
    assert_eq!(in_place.is_some(), matches!(fs, Fs::Tmpfs), "{fs:?}");
    assert!(store.write_in_place(1 << 20, 4096).is_none(), "a hole");
    assert!(
        store.write_in_place(size - 4096, 8192).is_none(),
        "past the end"
    );
}

async fn large_request(engine: Setup) {
    let dir = tempdir(Fs::Tmpfs);
    let size = 80 << 20;
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    let data = pattern(7, 64 << 20);
    store
        .write(4097, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    let back = store.read(4097, 64 << 20).await.unwrap();
    assert!(back[..] == data[..]);
}

async fn trim_reads_zeroes(engine: Setup, fs: Fs) {
    let dir = tempdir(fs);
    let size = 4 << 20;
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    assert!(store.supports_trim(), "{fs:?} supports punch hole");
    store
        .write(0, Bytes::from(vec![0xAB; size as usize]), false)
        .await
        .unwrap();
    store.trim(1 << 20, 1 << 20).await.unwrap();
    let got = store.read(0, size as usize).await.unwrap();
    assert!(got[..1 << 20].iter().all(|&b| b == 0xAB));
    assert!(got[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert!(got[2 << 20..].iter().all(|&b| b == 0xAB));
    // Unaligned trim: punch zeroes partial blocks, which is allowed for trim.
    store.trim(3 << 20 | 100, 5000).await.unwrap();
    let got = store.read(3 << 20, 8192).await.unwrap();
    assert!(got[..100].iter().all(|&b| b == 0xAB));
    assert!(got[100..5100].iter().all(|&b| b == 0));
    assert!(got[5100..].iter().all(|&b| b == 0xAB));
}

async fn write_zeroes_modes(engine: Setup, fs: Fs) {
    let dir = tempdir(fs);
    let size = 4 << 20;
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    for (i, &(may_punch, fua)) in [(true, false), (false, false), (true, true), (false, true)]
        .iter()
        .enumerate()
    {
        store
            .write(0, Bytes::from(vec![0x5A; size as usize]), false)
            .await
            .unwrap();
        let (off, len) = (1000 + i as u64 * 7, (1 << 20) + 12_345);
        store.write_zeroes(off, len, may_punch, fua).await.unwrap();
        let got = store.read(0, size as usize).await.unwrap();
        let (a, b) = (off as usize, (off + len) as usize);
        assert!(
            got[..a].iter().all(|&x| x == 0x5A),
            "before, punch={may_punch}"
        );
        assert!(
            got[a..b].iter().all(|&x| x == 0),
            "zeroed, punch={may_punch}"
        );
        assert!(
            got[b..].iter().all(|&x| x == 0x5A),
            "after, punch={may_punch}"
        );
        if may_punch {
            // The aligned middle became a hole.
            let ext = store.block_status(1 << 20, 4096).await.unwrap();
            assert!(ext[0].hole && ext[0].zero, "{ext:?}");
        }
    }
    // More than one fallback chunk of zero buffers (tmpfs cannot ZERO_RANGE).
    store.write_zeroes(0, 3 << 20, false, false).await.unwrap();
    assert!(
        store
            .read(0, 3 << 20)
            .await
            .unwrap()
            .iter()
            .all(|&x| x == 0)
    );
}

async fn fast_zero(engine: Setup, fs: Fs) {
    let dir = tempdir(fs);
    let size = 2 << 20;
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    assert!(store.supports_fast_zero());
    store
        .write(0, Bytes::from(vec![1; size as usize]), false)
        .await
        .unwrap();
    store.fast_zero(4096, 65536, true).await.unwrap();
    let got = store.read(0, size as usize).await.unwrap();
    assert!(got[..4096].iter().all(|&x| x == 1));
    assert!(got[4096..69632].iter().all(|&x| x == 0));
    assert!(got[69632..].iter().all(|&x| x == 1));

    // NBD NO_HOLE: the range stays allocated, zeroed in place or refused as not fast.
    let path = dir.path().join("disk");
    let blocks = || std::fs::metadata(&path).unwrap().blocks();
    let before = blocks();
    match store.fast_zero(1 << 20, 65536, false).await {
        Ok(()) => {
            let got = store.read(1 << 20, 65536).await.unwrap();
            assert!(got.iter().all(|&x| x == 0));
        }
        Err(StoreError::NotFast) => {
            let got = store.read(1 << 20, 65536).await.unwrap();
            assert!(got.iter().all(|&x| x == 1), "refused, yet changed");
        }
        Err(e) => panic!("fast zero without punching: {e:?}"),
    }
    assert_eq!(
        blocks(),
        before,
        "a fast zero with NO_HOLE deallocated blocks"
    );
}

async fn block_status_sparse(engine: Setup, fs: Fs) {
    let dir = tempdir(fs);
    let size = 8 << 20;
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    let ext = store.block_status(0, size).await.unwrap();
    assert_eq!(
        ext,
        vec![Extent {
            length: size,
            hole: true,
            zero: true
        }]
    );
    store
        .write(1 << 20, Bytes::from(vec![9; 4096]), false)
        .await
        .unwrap();
    store
        .write(4 << 20, Bytes::from(vec![9; 65536]), false)
        .await
        .unwrap();
    let ext = store.block_status(0, size).await.unwrap();
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), size, "{ext:?}");
    // Rebuild byte ranges and check each written byte is in data and the start is a hole.
    let mut pos = 0;
    let mut data_ranges = Vec::new();
    for e in &ext {
        assert_eq!(e.hole, e.zero);
        if !e.hole {
            data_ranges.push((pos, pos + e.length));
        }
        pos += e.length;
    }
    assert!(ext[0].hole && ext[0].length >= 512 << 10, "{ext:?}");
    for want in [(1u64 << 20, (1 << 20) + 4096), (4 << 20, (4 << 20) + 65536)] {
        assert!(
            data_ranges.iter().any(|r| r.0 <= want.0 && want.1 <= r.1),
            "{want:?} not data in {ext:?}"
        );
    }
    // A sub-range starting mid-hole and ending mid-data, unaligned.
    let ext = store.block_status((1 << 20) - 100, 150).await.unwrap();
    assert_eq!(
        ext,
        vec![
            Extent {
                length: 100,
                hole: true,
                zero: true
            },
            Extent {
                length: 50,
                hole: false,
                zero: false
            }
        ]
    );
    assert!(store.block_status(0, 0).await.unwrap().is_empty());
    // Fully written: one data extent (answered from the block count, without seeking).
    store
        .write(0, Bytes::from(vec![3; size as usize]), false)
        .await
        .unwrap();
    assert_eq!(
        store.block_status(4095, size - 4095).await.unwrap(),
        vec![Extent {
            length: size - 4095,
            hole: false,
            zero: false
        }]
    );
}

async fn out_of_range(engine: Setup) {
    let dir = tempdir(Fs::Tmpfs);
    let size = 1 << 20;
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    let oor = |r: Result<(), StoreError>| {
        assert!(
            matches!(r, Err(StoreError::OutOfRange { .. })),
            "expected OutOfRange, got {r:?}"
        )
    };
    oor(store.read(size - 1, 2).await.map(drop));
    oor(store.read(size, 1).await.map(drop));
    oor(store.read(u64::MAX, 1).await.map(drop));
    oor(store.write(size, Bytes::from_static(b"x"), false).await);
    oor(store
        .write(u64::MAX - 1, Bytes::from_static(b"xyz"), false)
        .await);
    oor(store.trim(size - 10, 11).await);
    oor(store.write_zeroes(0, size + 1, true, false).await);
    oor(store.fast_zero(size, 1, true).await);
    oor(store.cache(0, size + 1).await);
    oor(store.block_status(1, size).await.map(drop));
    // The edges themselves are fine.
    store.read(size - 1, 1).await.unwrap();
    store.cache(0, size).await.unwrap();
    assert_eq!(
        StoreError::OutOfRange {
            offset: 0,
            len: 0,
            size: 0
        }
        .raw_os_error(),
        None
    );
}

async fn read_only(engine: Setup) {
    let dir = tempdir(Fs::Tmpfs);
    let path = dir.path().join("disk");
    let size = 1 << 20;
    {
        let store = engine.open(&path, &opts(size, engine)).unwrap();
        store
            .write(10, Bytes::from_static(b"hello"), true)
            .await
            .unwrap();
    }
    let ro = OpenOptions {
        size: None,
        read_only: true,
        engine: engine.kind,
    };
    let store = engine.open(&path, &ro).unwrap();
    assert!(store.read_only());
    assert_eq!(store.size(), size);
    assert!(!store.supports_trim() && !store.supports_fast_zero());
    assert_eq!(&store.read(10, 5).await.unwrap()[..], b"hello");
    let ro_err =
        |r: Result<(), StoreError>| assert!(matches!(r, Err(StoreError::ReadOnly)), "got {r:?}");
    ro_err(store.write(0, Bytes::from_static(b"x"), false).await);
    ro_err(store.trim(0, 10).await);
    ro_err(store.write_zeroes(0, 10, true, false).await);
    ro_err(store.fast_zero(0, 10, true).await);
    // (A cached range of a read-only store is no place to receive a WRITE into either.)
    assert!(store.write_in_place(10, 5).is_none());
    store.flush().await.unwrap();
    store.block_status(0, size).await.unwrap();
    // Growing a read-only file is refused.
    let grow = OpenOptions {
        size: Some(size * 2),
        ..ro
    };
    assert!(matches!(
        BlockStore::open(&path, &grow),
        Err(StoreError::TooSmall { .. })
    ));
}

async fn concurrent_writes(engine: Setup, fs: Fs) {
    let dir = tempdir(fs);
    let blocks = 600u64;
    let size = blocks * 4096;
    let store = engine
        .open(&dir.path().join("disk"), &opts(size, engine))
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for b in 0..blocks {
        let s = store.clone();
        tasks.spawn(async move {
            // Odd sub-block layout: each task writes its block in two unequal pieces.
            let data = pattern(b, 4096);
            let (a, c) = data.split_at(1000);
            let (x, y) = tokio::join!(
                s.write(b * 4096, Bytes::copy_from_slice(a), b % 7 == 0),
                s.write(b * 4096 + 1000, Bytes::copy_from_slice(c), false)
            );
            x.unwrap();
            y.unwrap();
            let back = s.read(b * 4096, 4096).await.unwrap();
            assert!(back[..] == data[..], "block {b}");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    store.flush().await.unwrap();
    let all = store.read(0, size as usize).await.unwrap();
    for b in 0..blocks {
        let range = (b * 4096) as usize..((b + 1) * 4096) as usize;
        assert!(all[range] == pattern(b, 4096)[..], "block {b} after all");
    }
}

async fn read_past_shrunk_eof(engine: Setup) {
    let dir = tempdir(Fs::Tmpfs);
    let path = dir.path().join("disk");
    let store = engine.open(&path, &opts(65536, engine)).unwrap();
    store
        .write(0, Bytes::from(vec![7; 65536]), false)
        .await
        .unwrap();
    // Someone truncates the file behind the store: reads past the new EOF give zeroes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let got = store.read(500, 1000).await.unwrap();
    assert_eq!(got.len(), 1000);
    assert!(got[..500].iter().all(|&b| b == 7));
    assert!(got[500..].iter().all(|&b| b == 0));
    // A client's large read: the truncated pages are no longer cached, so it is copied, not
    // mapped (a mapping past the end of the file would fault).
    let got = store
        .read_for_client_at(0, 65536, CopyAt::Send)
        .await
        .unwrap();
    assert!(got[..1000].iter().all(|&b| b == 7));
    assert!(got[1000..].iter().all(|&b| b == 0));
}

async fn engine_gone(engine: Setup) {
    // On disk: large reads of memory-backed files skip the io_uring ring (a worker preads).
    let dir = tempdir(Fs::Disk);
    let store = engine
        .open(&dir.path().join("disk"), &opts(4 << 20, engine))
        .unwrap();
    store
        .write(0, Bytes::from_static(b"x"), false)
        .await
        .unwrap();
    store.kill_engine_for_test();
    // Larger than the inline limit, so it must go through the (dead) engine.
    let big = DEFAULT_INLINE_MAX + 1;
    let r = tokio::time::timeout(Duration::from_secs(5), store.read(0, big))
        .await
        .expect("a dead engine must not hang");
    assert!(matches!(r, Err(StoreError::EngineGone)), "got {r:?}");
    let r = tokio::time::timeout(Duration::from_secs(5), store.flush())
        .await
        .expect("a dead engine must not hang");
    assert!(matches!(r, Err(StoreError::EngineGone)), "got {r:?}");
}

/// Polls `fut` once, as a caller that goes away right after would.
fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    fut.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

/// Changes whose callers went away (their futures dropped once the change was handed to the
/// engine) still land, and the store counts them in flight until they did: once
/// `writes_in_flight` is idle, they are in the file.
async fn abandoned_changes(engine: Setup, fs: Fs) {
    let dir = tempdir(fs);
    let store = engine
        .open(&dir.path().join("disk"), &opts(4 << 20, engine))
        .unwrap();
    let mib = 1usize << 20;
    let old = pattern(1, mib);
    store
        .write(2 << 20, Bytes::from(old.clone()), false)
        .await
        .unwrap();
    let data = pattern(2, mib);
    // Larger than the inline path takes: handed to the engine at the first poll.
    for (at, fua) in [(0u64, false), (1 << 20, true)] {
        let mut write = std::pin::pin!(store.write(at, Bytes::from(data.clone()), fua));
        let _ = poll_once(write.as_mut());
    }
    {
        let mut zero = std::pin::pin!(store.write_zeroes(2 << 20, mib as u64, false, false));
        let _ = poll_once(zero.as_mut());
    }
    tokio::time::timeout(Duration::from_secs(10), store.writes_in_flight().idle())
        .await
        .expect("the engine finishes the changes");
    assert_eq!(store.writes_in_flight().count(), 0);
    assert_eq!(&store.read(0, mib).await.unwrap()[..], &data[..]);
    assert_eq!(&store.read(1 << 20, mib).await.unwrap()[..], &data[..]);
    assert_eq!(
        &store.read(2 << 20, mib).await.unwrap()[..],
        &vec![0u8; mib][..]
    );
}

/// Runs `cmd`, returning trimmed stdout, or a description of why it failed.
fn run(cmd: &mut Command) -> Result<String, String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(format!(
            "{cmd:?}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

/// A tmpfs of `size` mounted on a temporary directory, unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(size: &str) -> Result<SmallTmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "blockd-test"])
            .arg(dir.path()))?;
        Ok(SmallTmpfs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn full_filesystem_enospc(engine: Setup) {
    let fs = match SmallTmpfs::mount("1M") {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("SKIP full_filesystem_enospc: cannot mount a small tmpfs: {e}");
            return;
        }
    };
    let store = engine
        .open(&fs.path().join("disk"), &opts(8 << 20, engine))
        .unwrap();
    let mut err = None;
    for i in 0..128u64 {
        if let Err(e) = store
            .write(i * 65536, Bytes::from(vec![1; 65536]), false)
            .await
        {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("writing 8 MiB into a 1 MiB tmpfs must fail");
    assert!(matches!(err, StoreError::Write { .. }), "{err:?}");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err:?}");
    // Zeroing by writing also reports ENOSPC; the store keeps working for reads.
    let err = store
        .write_zeroes(4 << 20, 2 << 20, false, false)
        .await
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err:?}");
    store.read(0, 4096).await.unwrap();
}

/// A loop device over a 16 MiB image file, detached on drop.
struct LoopDevice {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn attach() -> Result<LoopDevice, String> {
        let dir = tempdir(Fs::Disk);
        let img = dir.path().join("loop.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(16 << 20))
            .map_err(|e| e.to_string())?;
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&img))?;
        Ok(LoopDevice {
            dev: PathBuf::from(dev),
            _dir: dir,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

async fn block_device(engine: Setup) {
    let lo = match LoopDevice::attach() {
        Ok(lo) => lo,
        Err(e) => {
            eprintln!("SKIP block_device: cannot attach a loop device: {e}");
            return;
        }
    };
    let o = OpenOptions {
        size: None,
        read_only: false,
        engine: engine.kind,
    };
    let store = engine.open(&lo.dev, &o).unwrap();
    assert_eq!(store.size(), 16 << 20);
    // Its node lives on devtmpfs, which says it is tmpfs: the device is no memory all the same.
    assert!(!store.inner.memory_backed);
    let data = pattern(3, 100_001);
    store
        .write(12_345, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    assert!(store.read(12_345, data.len()).await.unwrap()[..] == data[..]);
    store.flush().await.unwrap();
    assert_eq!(
        store.block_status(0, 1 << 20).await.unwrap(),
        vec![Extent {
            length: 1 << 20,
            hole: false,
            zero: false
        }]
    );
    // Zeroing with unaligned edges: the edges are written, the middle zeroed by the device.
    for may_punch in [true, false] {
        store
            .write(0, Bytes::from(vec![0xEE; 1 << 20]), false)
            .await
            .unwrap();
        store
            .write_zeroes(100, 300_000, may_punch, true)
            .await
            .unwrap();
        let got = store.read(0, 1 << 20).await.unwrap();
        assert!(got[..100].iter().all(|&b| b == 0xEE));
        assert!(got[100..300_100].iter().all(|&b| b == 0));
        assert!(got[300_100..].iter().all(|&b| b == 0xEE));
    }
    // Trim is advisory: it must succeed (aligned or not); contents are unspecified.
    store.trim(0, 1 << 20).await.unwrap();
    store.trim(1, 1000).await.unwrap();
    // Unaligned fast zero cannot be done by the device without writing.
    assert!(matches!(
        store.fast_zero(1, 512, true).await,
        Err(StoreError::NotFast)
    ));
    match store.fast_zero(0, 1 << 20, true).await {
        Ok(()) => assert!(
            store
                .read(0, 1 << 20)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        ),
        Err(StoreError::NotFast) => eprintln!("this loop device cannot zero without writing"),
        Err(e) => panic!("fast_zero on a loop device: {e:?}"),
    }
    // Asking for more than the device holds fails at open.
    let too_big = OpenOptions {
        size: Some(17 << 20),
        ..o
    };
    assert!(matches!(
        BlockStore::open(&lo.dev, &too_big),
        Err(StoreError::TooSmall { .. })
    ));
    let smaller = OpenOptions {
        size: Some(1 << 20),
        ..o
    };
    let s = BlockStore::open(&lo.dev, &smaller).unwrap();
    assert_eq!(s.size(), 1 << 20);
}

/// Instantiates every scenario for one engine.
macro_rules! engine_suite {
    ($name:ident, $engine:expr, $inline_max:expr) => {
        mod $name {
            use super::*;
            const E: Setup = Setup {
                kind: $engine,
                inline_max: $inline_max,
            };

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_trip_tmpfs() {
                round_trip(E, Fs::Tmpfs).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_trip_disk() {
                round_trip(E, Fs::Disk).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn client_reads_sent_tmpfs() {
                client_reads_sent(E, Fs::Tmpfs).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn client_reads_sent_disk() {
                client_reads_sent(E, Fs::Disk).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn large_request_64m() {
                large_request(E).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn trim_tmpfs() {
                trim_reads_zeroes(E, Fs::Tmpfs).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn trim_disk() {
                trim_reads_zeroes(E, Fs::Disk).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn write_zeroes_tmpfs() {
                write_zeroes_modes(E, Fs::Tmpfs).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn write_zeroes_disk() {
                write_zeroes_modes(E, Fs::Disk).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fast_zero_tmpfs() {
                fast_zero(E, Fs::Tmpfs).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fast_zero_disk() {
                fast_zero(E, Fs::Disk).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn block_status_tmpfs() {
                block_status_sparse(E, Fs::Tmpfs).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn block_status_disk() {
                block_status_sparse(E, Fs::Disk).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn out_of_range_requests() {
                out_of_range(E).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn read_only_store() {
                read_only(E).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writes_tmpfs() {
                concurrent_writes(E, Fs::Tmpfs).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writes_disk() {
                concurrent_writes(E, Fs::Disk).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn read_past_shrunk_eof_gives_zeroes() {
                read_past_shrunk_eof(E).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_engine_gives_engine_gone() {
                engine_gone(E).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn full_filesystem_gives_enospc() {
                full_filesystem_enospc(E).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn loop_block_device() {
                block_device(E).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn abandoned_changes_tmpfs() {
                abandoned_changes(E, Fs::Tmpfs).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn abandoned_changes_disk() {
                abandoned_changes(E, Fs::Disk).await
            }
        }
    };
}

engine_suite!(uring, EngineKind::Uring, 0);
engine_suite!(sync, EngineKind::Sync, 0);
// The default configuration: inline RWF_NOWAIT path in front of the probed engine.
engine_suite!(auto_inline, EngineKind::Auto, DEFAULT_INLINE_MAX);

/// A change queued in the engine is counted in flight from the moment its caller handed it
/// over until the engine did it, even though the caller went away at once; waiting for the
/// count to be idle waits for it. The sync engine's only worker is held busy meanwhile.
#[tokio::test]
async fn a_change_is_in_flight_until_the_engine_did_it() {
    let dir = tempdir(Fs::Disk);
    let store = BlockStore::open_with(
        &dir.path().join("disk"),
        &opts(1 << 20, None),
        EngineConfig {
            inline_max: 0,
            sync: SyncConfig::Threads(1),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert_eq!(store.engine_name(), "sync");
    let (started_tx, started) = std::sync::mpsc::channel();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let mut blocker = std::pin::pin!(store.inner.engine.blocking(move |_| {
        let _ = started_tx.send(());
        let _ = held.recv();
        Ok(())
    }));
    assert!(poll_once(blocker.as_mut()).is_pending());
    started.recv().unwrap();
    assert_eq!(store.writes_in_flight().count(), 0, "not a change");
    {
        let mut write = std::pin::pin!(store.write(0, Bytes::from(vec![7u8; 8192]), false));
        assert!(poll_once(write.as_mut()).is_pending());
        let mut zero = std::pin::pin!(store.write_zeroes(65536, 4096, false, false));
        assert!(poll_once(zero.as_mut()).is_pending());
        let mut trim = std::pin::pin!(store.trim(131072, 4096));
        assert!(poll_once(trim.as_mut()).is_pending());
    }
    assert_eq!(
        store.writes_in_flight().count(),
        3,
        "their callers are gone, the engine has them queued"
    );
    let mut idle = std::pin::pin!(store.writes_in_flight().idle());
    assert!(poll_once(idle.as_mut()).is_pending());
    release.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), idle)
        .await
        .expect("idle once the engine did them");
    assert_eq!(store.writes_in_flight().count(), 0);
    assert_eq!(&store.read(0, 8192).await.unwrap()[..], &[7u8; 8192][..]);
    blocker.await.unwrap();
}

#[tokio::test]
async fn sync_engine_on_tokio_blocking_pool() {
    let dir = tempdir(Fs::Tmpfs);
    let store = BlockStore::open_with(
        &dir.path().join("disk"),
        &opts(1 << 20, None),
        EngineConfig {
            sync: SyncConfig::TokioBlocking,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    store
        .write(3, Bytes::from_static(b"abc"), true)
        .await
        .unwrap();
    assert_eq!(&store.read(3, 3).await.unwrap()[..], b"abc");
}

#[test]
fn auto_picks_uring_here_or_falls_back() {
    let dir = tempdir(Fs::Tmpfs);
    let store = BlockStore::open(
        &dir.path().join("disk"),
        &OpenOptions {
            engine: EngineKind::Auto,
            ..opts(4096, None)
        },
    )
    .unwrap();
    let expected = if probe::probe_uring().is_ok() {
        "io_uring"
    } else {
        "sync"
    };
    assert_eq!(store.engine_name(), expected);
}

#[test]
fn engine_kind_parses() {
    assert_eq!("auto".parse::<EngineKind>().unwrap(), EngineKind::Auto);
    assert_eq!("uring".parse::<EngineKind>().unwrap(), EngineKind::Uring);
    assert_eq!("sync".parse::<EngineKind>().unwrap(), EngineKind::Sync);
    assert!("aio".parse::<EngineKind>().is_err());
    for k in [EngineKind::Auto, EngineKind::Uring, EngineKind::Sync] {
        assert_eq!(k.to_string().parse::<EngineKind>().unwrap(), k);
    }
}

#[test]
fn open_sizes() {
    let dir = tempdir(Fs::Disk);
    let path = dir.path().join("disk");
    let no_size = OpenOptions::default();
    assert!(matches!(
        BlockStore::open(&path, &no_size),
        Err(StoreError::MissingSize { .. })
    ));
    // Created sparse.
    let s = BlockStore::open(&path, &opts(64 << 20, None)).unwrap();
    assert_eq!(s.size(), 64 << 20);
    drop(s);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "created sparse");
    // Existing: whole file without size, grown with a bigger size, prefix with a smaller one.
    assert_eq!(BlockStore::open(&path, &no_size).unwrap().size(), 64 << 20);
    let s = BlockStore::open(&path, &opts(128 << 20, None)).unwrap();
    assert_eq!(s.size(), 128 << 20);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 << 20);
    let s = BlockStore::open(&path, &opts(1 << 20, None)).unwrap();
    assert_eq!(s.size(), 1 << 20);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        128 << 20,
        "not shrunk"
    );
    // Neither file nor device.
    assert!(matches!(
        BlockStore::open(dir.path(), &no_size),
        Err(StoreError::Open { .. } | StoreError::NotFileOrDevice { .. })
    ));
    // Missing and read-only cannot be created.
    let ro = OpenOptions {
        size: Some(4096),
        read_only: true,
        engine: EngineKind::Sync,
    };
    let err = BlockStore::open(&dir.path().join("nope"), &ro).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err:?}");
}

#[test]
fn char_device_is_refused() {
    let o = OpenOptions {
        size: None,
        read_only: true,
        engine: EngineKind::Sync,
    };
    assert!(matches!(
        BlockStore::open(Path::new("/dev/null"), &o),
        Err(StoreError::NotFileOrDevice { .. })
    ));
}

/// An oracle over a list of data ranges, behaving like SEEK_DATA/SEEK_HOLE on a file of `eof`.
fn oracle(data: &[(u64, u64)], eof: u64) -> impl FnMut(u64, i32) -> io::Result<Option<u64>> {
    let data = data.to_vec();
    move |pos, whence| {
        if pos >= eof {
            return Ok(None); // lseek answers ENXIO, which `os::seek` turns into None
        }
        Ok(if whence == libc::SEEK_DATA {
            data.iter().find(|r| r.1 > pos).map(|r| r.0.max(pos))
        } else {
            Some(
                data.iter()
                    .find(|r| r.0 <= pos && pos < r.1)
                    .map_or(pos, |r| r.1)
                    .min(eof),
            )
        })
    }
}

#[test]
fn map_extents_over_oracle() {
    let ext = |l, h| Extent {
        length: l,
        hole: h,
        zero: h,
    };
    let data = [(100, 200), (200, 300), (500, 600)];
    assert_eq!(
        map_extents(0, 1000, 100, oracle(&data, 1000)).unwrap(),
        vec![
            ext(100, true),
            ext(200, false),
            ext(200, true),
            ext(100, false),
            ext(400, true)
        ]
    );
    assert_eq!(
        map_extents(150, 160, 100, oracle(&data, 1000)).unwrap(),
        vec![ext(10, false)]
    );
    assert_eq!(
        map_extents(0, 1000, 2, oracle(&[(100, 300), (500, 600)], 1000)).unwrap(),
        vec![ext(100, true), ext(200, false)]
    );
    // Past the file's end (store bigger than file): a hole.
    assert_eq!(
        map_extents(0, 1000, 100, oracle(&[], 10)).unwrap(),
        vec![ext(1000, true)]
    );
    let failing = |_: u64, _: i32| -> io::Result<Option<u64>> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    };
    assert!(map_extents(0, 10, 10, failing).is_err());
}

#[test]
fn align_inward_cases() {
    assert_eq!(align_inward(0, 4096, 512), Some((0, 4096)));
    assert_eq!(align_inward(1, 4096, 512), Some((512, 4096)));
    assert_eq!(align_inward(1, 1000, 512), None);
    assert_eq!(align_inward(100, 1100, 512), Some((512, 1024)));
}

#[test]
fn errors_carry_errno() {
    let e = StoreError::Write {
        offset: 0,
        len: 1,
        source: io::Error::from_raw_os_error(libc::ENOSPC),
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert!(std::error::Error::source(&e).is_some());
    assert_eq!(StoreError::ReadOnly.raw_os_error(), None);
}

#[test]
fn memory_backed_detection() {
    for (fs, expected) in [(Fs::Tmpfs, true), (Fs::Disk, false)] {
        let dir = tempdir(fs);
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        assert_eq!(os::is_memory_backed(&f), expected, "{fs:?}");
    }
}

#[test]
fn inline_path_serves_cached_and_memory_backed_io() {
    for fs in [Fs::Tmpfs, Fs::Disk] {
        let dir = tempdir(fs);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let path = inline::InlinePath::new(1 << 20, os::is_memory_backed(&f));
        let data = pattern(11, 10_000);
        let written = path.write(&f, 123, &data, false);
        match fs {
            // tmpfs: plain inline write; ext4 rejects RWF_NOWAIT writes (0 bytes, path off).
            Fs::Tmpfs => assert_eq!(written, data.len()),
            Fs::Disk => os::pwrite_full(&f, &data[written..], 123 + written as u64, 0).unwrap(),
        }
        // Cached (or memory-backed) data is read inline in full.
        let got = path.read(&f, 123, data.len(), false);
        assert!(got[..] == data[..], "{fs:?}");
        // Larger than the limit: nothing inline, but a client's read at any size.
        assert_eq!(path.write(&f, 0, &vec![1u8; (1 << 20) + 1], false), 0);
        assert!(path.read(&f, 0, (1 << 20) + 1, false).is_empty());
        let big = path.read(&f, 0, (1 << 20) + 1, true);
        assert_eq!(big.len(), 1 << 20, "reads stop at the end of the file");
        assert!(big[123..123 + data.len()] == data[..], "{fs:?}");
    }
}

#[test]
fn fast_zero_ways_follow_the_backing_and_no_hole() {
    use FastZero::{Punch, ZeroRange};
    let file = Backing::File;
    assert_eq!(
        fast_zero_modes(file, true, true, 1, 3, true),
        [ZeroRange, Punch]
    );
    // NO_HOLE: punching is out; a file that can only punch (tmpfs) has no fast way left.
    assert_eq!(
        fast_zero_modes(file, true, true, 0, 4096, false),
        [ZeroRange]
    );
    assert!(fast_zero_modes(file, true, false, 0, 4096, false).is_empty());
    assert!(fast_zero_modes(file, false, false, 0, 4096, true).is_empty());
    // A device: only an aligned punch (its zero-range may write zeroes).
    let dev = Backing::Device { logical_block: 512 };
    assert_eq!(fast_zero_modes(dev, true, true, 512, 1024, true), [Punch]);
    assert!(fast_zero_modes(dev, true, true, 512, 1000, true).is_empty());
    assert!(fast_zero_modes(dev, true, true, 100, 512, true).is_empty());
    assert!(fast_zero_modes(dev, true, true, 0, 512, false).is_empty());
    assert!(fast_zero_modes(dev, false, true, 0, 512, true).is_empty());
}
