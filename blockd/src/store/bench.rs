//! Micro-benchmark of the store engines (ignored tests; they print a table, assert nothing).
//!
//! `cargo test --release -p blockd --lib store::bench -- --ignored --nocapture --test-threads 1`
//! Environment: `BENCH_DIR` (default: /dev/shm and /var/tmp), `BENCH_SECS` (default 3),
//! `BENCH_SIZE_MB` (default 1024).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

#[derive(Clone, Copy, Debug)]
enum Job {
    RandWrite4k,
    RandRead4k,
    SeqWrite1m,
    SeqRead1m,
}

impl Job {
    fn shape(self) -> (usize, usize, bool, bool) {
        // (block size, queue depth, write?, random?)
        match self {
            Job::RandWrite4k => (4096, 32, true, true),
            Job::RandRead4k => (4096, 32, false, true),
            Job::SeqWrite1m => (1 << 20, 8, true, false),
            Job::SeqRead1m => (1 << 20, 8, false, false),
        }
    }
}

/// CPU time (user + system) consumed by this process so far, in microseconds; includes the
/// engine threads and the kernel's io_uring workers (they are threads of this process).
fn cpu_micros() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass; it has no other side effects.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs one job for `secs` with `depth` concurrent tasks; returns (operations per second,
/// CPU microseconds per operation).
async fn run_job(store: &BlockStore, job: Job, secs: f64) -> (f64, f64) {
    let (bs, depth, write, random) = job.shape();
    let blocks = store.size() / bs as u64;
    let seq = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let payload = Bytes::from(vec![0xA5u8; bs]);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..depth {
        let store = store.clone();
        let seq = seq.clone();
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
            let mut ops = 0u64;
            while Instant::now() < deadline {
                let block = if random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % blocks
                } else {
                    seq.fetch_add(1, Ordering::Relaxed) % blocks
                };
                let off = block * bs as u64;
                if write {
                    store.write(off, payload.clone(), false).await.unwrap();
                } else {
                    std::hint::black_box(store.read(off, bs).await.unwrap());
                }
                ops += 1;
            }
            ops
        });
    }
    let start = Instant::now();
    let cpu = cpu_micros();
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r.unwrap();
    }
    let cpu_per_op = (cpu_micros() - cpu) / total.max(1) as f64;
    (total as f64 / start.elapsed().as_secs_f64(), cpu_per_op)
}

fn configs() -> Vec<(String, EngineKind, EngineConfig)> {
    let mut v = Vec::new();
    for entries in [64, 256] {
        v.push((
            format!("uring entries={entries}"),
            EngineKind::Uring,
            EngineConfig {
                uring: UringConfig { entries },
                ..EngineConfig::default()
            },
        ));
    }
    for threads in [2, 4, 8, 16] {
        v.push((
            format!("sync threads={threads}"),
            EngineKind::Sync,
            EngineConfig {
                sync: SyncConfig::Threads(threads),
                ..EngineConfig::default()
            },
        ));
    }
    for inline_max in [64 << 10, 1 << 20] {
        for (name, kind) in [("uring", EngineKind::Uring), ("sync", EngineKind::Sync)] {
            v.push((
                format!("{name} inline<={}K", inline_max >> 10),
                kind,
                EngineConfig {
                    inline_max,
                    sync: SyncConfig::Threads(2),
                    ..EngineConfig::default()
                },
            ));
        }
    }
    v.push((
        "sync spawn_blocking".into(),
        EngineKind::Sync,
        EngineConfig {
            sync: SyncConfig::TokioBlocking,
            ..EngineConfig::default()
        },
    ));
    v
}

fn bench_dir(dir: &Path) {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let size_mb: u64 = std::env::var("BENCH_SIZE_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let tmp = tempfile::Builder::new()
        .prefix("blockd-bench")
        .tempdir_in(dir)
        .unwrap();
    let path = tmp.path().join("disk");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Fill the file once so reads hit allocated data.
    rt.block_on(async {
        let store = BlockStore::open(
            &path,
            &OpenOptions {
                size: Some(size_mb << 20),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let chunk = Bytes::from(vec![1u8; 1 << 20]);
        for i in 0..size_mb {
            store.write(i << 20, chunk.clone(), false).await.unwrap();
        }
        store.flush().await.unwrap();
    });
    println!(
        "\n{} ({size_mb} MiB file, {secs} s per job, 2 tokio workers)",
        dir.display()
    );
    println!(
        "{:<22} {:>18} {:>18} {:>18} {:>18}",
        "engine (rate, CPU/op)",
        "4k randwrite IOPS",
        "4k randread IOPS",
        "1M write MiB/s",
        "1M read MiB/s"
    );
    for (name, kind, config) in configs() {
        let o = OpenOptions {
            size: None,
            read_only: false,
            engine: kind,
        };
        let store = BlockStore::open_with(&path, &o, config).unwrap();
        let mut cols = Vec::new();
        for job in [
            Job::RandWrite4k,
            Job::RandRead4k,
            Job::SeqWrite1m,
            Job::SeqRead1m,
        ] {
            let (ops, cpu) = rt.block_on(run_job(&store, job, secs));
            cols.push(format!("{ops:>9.0} {cpu:>6.1}us"));
        }
        println!("{name:<22} {}", cols.join(" "));
    }
}

#[test]
#[ignore = "benchmark; run explicitly in release mode"]
fn engines() {
    match std::env::var("BENCH_DIR") {
        Ok(d) => bench_dir(Path::new(&d)),
        Err(_) => {
            bench_dir(Path::new("/dev/shm"));
            bench_dir(Path::new("/var/tmp"));
        }
    }
}
