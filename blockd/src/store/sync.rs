//! The sync engine: blocking pread/pwrite/fdatasync/fallocate run on worker threads, results
//! delivered to async callers through oneshot channels.
//!
//! Workers are either a small dedicated pool owned by the engine or tokio's blocking pool
//! (`spawn_blocking`); [`SyncConfig`] picks one. The dedicated pool is the default (see
//! docs/benchmarks-nbd.md for the measurement).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::sync::{Arc, Condvar, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::in_flight::WriteGuard;
use super::{EngineError, os};

/// Where the sync engine runs blocking calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncConfig {
    /// A dedicated pool of this many threads (at least 1).
    Threads(usize),
    /// tokio's blocking pool (`spawn_blocking`).
    TokioBlocking,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig::Threads(default_threads())
    }
}

/// Default pool size: enough threads to keep a queue-depth-32 client busy on a page-cache
/// backed file without drowning a small machine in context switches.
fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus * 2).clamp(4, 16)
}

type Job = Box<dyn FnOnce() + Send + 'static>;

struct PoolState {
    jobs: VecDeque<Job>,
    /// No worker is left (or the pool was shut down): submissions fail with `Gone`.
    closed: bool,
    alive: usize,
}

struct PoolShared {
    state: Mutex<PoolState>,
    ready: Condvar,
}

/// A fixed pool of worker threads pulling boxed jobs from one queue.
struct ThreadPool {
    shared: Arc<PoolShared>,
}

/// Marks a worker as gone when its thread ends, normally or by panic; the last one closes the
/// pool and drops queued jobs so their callers see `Gone` instead of waiting forever.
struct WorkerGuard(Arc<PoolShared>);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        let dropped = {
            let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
            st.alive -= 1;
            if st.alive == 0 {
                st.closed = true;
                std::mem::take(&mut st.jobs)
            } else {
                VecDeque::new()
            }
        };
        drop(dropped);
    }
}

impl ThreadPool {
    fn start(threads: usize) -> io::Result<ThreadPool> {
        let shared = Arc::new(PoolShared {
            state: Mutex::new(PoolState {
                jobs: VecDeque::new(),
                closed: false,
                alive: 0,
            }),
            ready: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let s = shared.clone();
            s.state.lock().unwrap_or_else(|p| p.into_inner()).alive += 1;
            let spawned = std::thread::Builder::new()
                .name(format!("blockd-sync-{i}"))
                .spawn(move || worker(s));
            if let Err(e) = spawned {
                shared.state.lock().unwrap_or_else(|p| p.into_inner()).alive -= 1;
                ThreadPool {
                    shared: shared.clone(),
                }
                .close();
                return Err(e);
            }
        }
        Ok(ThreadPool { shared })
    }

    /// Queues a job; `false` if the pool is closed (the job is dropped).
    fn submit(&self, job: Job) -> bool {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return false;
        }
        st.jobs.push_back(job);
        drop(st);
        self.shared.ready.notify_one();
        true
    }

    /// Stops the workers after the jobs already queued.
    fn close(&self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = true;
        self.shared.ready.notify_all();
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.close();
    }
}

fn worker(shared: Arc<PoolShared>) {
    let _guard = WorkerGuard(shared.clone());
    loop {
        let job = {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = st.jobs.pop_front() {
                    break job;
                }
                if st.closed {
                    return;
                }
                st = shared.ready.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        job();
    }
}

enum Runner {
    Pool(ThreadPool),
    Tokio,
}

/// The thread-pool pread/pwrite engine.
pub struct SyncEngine {
    file: Arc<File>,
    runner: Runner,
}

impl SyncEngine {
    pub fn start(file: Arc<File>, config: SyncConfig) -> io::Result<SyncEngine> {
        let runner = match config {
            SyncConfig::Threads(n) => Runner::Pool(ThreadPool::start(n)?),
            SyncConfig::TokioBlocking => Runner::Tokio,
        };
        Ok(SyncEngine { file, runner })
    }

    /// Runs `f(&file)` on a worker and awaits its result.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = self.file.clone();
        match &self.runner {
            Runner::Pool(pool) => {
                let (tx, rx) = oneshot::channel();
                let job: Job = Box::new(move || {
                    let _ = tx.send(f(&file));
                });
                if !pool.submit(job) {
                    return Err(EngineError::Gone);
                }
                match rx.await {
                    Ok(r) => r.map_err(EngineError::Io),
                    Err(_) => Err(EngineError::Gone),
                }
            }
            Runner::Tokio => match tokio::task::spawn_blocking(move || f(&file)).await {
                Ok(r) => r.map_err(EngineError::Io),
                Err(_) => Err(EngineError::Gone),
            },
        }
    }

    pub(crate) async fn read(&self, offset: u64, len: usize) -> Result<BytesMut, EngineError> {
        self.blocking(move |f| os::pread_exact_new(f, len, offset))
            .await
    }

    pub(crate) async fn write(
        &self,
        offset: u64,
        data: Bytes,
        dsync: bool,
        guard: WriteGuard,
    ) -> Result<(), EngineError> {
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        // The guard goes with the job: dropped once the worker wrote (or the job is dropped
        // unrun), whether or not the caller still waits.
        self.blocking(move |f| {
            let _counted = guard;
            os::pwrite_full(f, &data, offset, flags)
        })
        .await
    }

    pub(crate) async fn fdatasync(&self) -> Result<(), EngineError> {
        self.blocking(os::fdatasync).await
    }

    pub(crate) async fn fallocate(
        &self,
        mode: libc::c_int,
        offset: u64,
        len: u64,
        guard: WriteGuard,
    ) -> Result<(), EngineError> {
        self.blocking(move |f| {
            let _counted = guard;
            os::fallocate(f, mode, offset, len)
        })
        .await
    }

    /// Test hook: stops the dedicated workers as if they had died.
    #[cfg(test)]
    pub(crate) fn kill_for_test(&self) {
        if let Runner::Pool(pool) = &self.runner {
            pool.close();
            // Wait until every worker has exited so the next call deterministically fails.
            while pool.shared.state.lock().unwrap().alive > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}
