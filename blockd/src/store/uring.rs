//! The io_uring engine: one ring-owner thread executes reads, writes, fdatasync and fallocate.
//!
//! Callers send a [`Request`] over a channel and wake the ring thread through an eventfd the
//! ring itself is reading (at most one wake-up write is outstanding, tracked by a flag).
//! Buffers are owned by the ring thread from submission until their completion (a `BytesMut`
//! being filled, a `Bytes` being written) and handed back through a tokio oneshot. Short
//! reads/writes are resubmitted for the remainder; `EINTR`/`EAGAIN` are retried. If the ring
//! thread dies, pending and future calls get `EngineError::Gone` (never a hang); buffers the
//! kernel may still write into are leaked rather than freed.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::oneshot;

use super::in_flight::WriteGuard;
use super::{EngineError, os};

/// Kernel limit for one read/write (`MAX_RW_COUNT`); longer requests go in several pieces.
const MAX_RW: usize = 0x7fff_f000;
/// `user_data` of the eventfd read that wakes the ring thread.
const WAKE_TOKEN: u64 = u64::MAX;
/// How often an `EAGAIN`/`EINTR` completion is resubmitted before it is returned as an error.
const MAX_RETRIES: u32 = 1000;

/// io_uring tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringConfig {
    /// Submission queue entries (power of two). At most this many operations are in flight;
    /// more wait in a backlog on the ring thread.
    pub entries: u32,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig { entries: 256 }
    }
}

type Reply<T> = oneshot::Sender<io::Result<T>>;

/// One operation sent to the ring thread.
enum Request {
    Read {
        offset: u64,
        len: usize,
        reply: Reply<BytesMut>,
    },
    Write {
        offset: u64,
        data: Bytes,
        flags: i32,
        reply: Reply<()>,
        guard: WriteGuard,
    },
    Fdatasync {
        reply: Reply<()>,
    },
    Fallocate {
        mode: libc::c_int,
        offset: u64,
        len: u64,
        reply: Reply<()>,
        guard: WriteGuard,
    },
    /// Makes the ring thread exit immediately (tests of the "engine died" path).
    #[cfg(test)]
    Die,
}

/// The wake-up channel into the ring thread.
struct Wake {
    fd: OwnedFd,
    /// A wake-up is written and not yet consumed by the ring thread.
    pending: AtomicBool,
}

impl Wake {
    fn notify(&self) {
        // SeqCst pairs with the fence after `pending.store(false)` on the ring thread: either
        // the ring thread sees our queued request, or we see `pending == false` and write.
        if !self.pending.swap(true, Ordering::SeqCst) {
            self.signal();
        }
    }

    fn signal(&self) {
        if let Err(e) = os::eventfd_signal(&self.fd) {
            tracing::error!(error = %e, "cannot wake the io_uring thread");
        }
    }
}

/// Handle to the ring-owner thread.
pub struct UringEngine {
    file: Arc<File>,
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<Wake>,
    /// Joined only by the test hook; otherwise the thread exits on its own after `Drop`.
    #[cfg_attr(not(test), allow(dead_code))]
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl UringEngine {
    /// Starts the ring thread; fails if the ring cannot be set up.
    pub fn start(file: Arc<File>, config: UringConfig) -> io::Result<UringEngine> {
        let wake = Arc::new(Wake {
            fd: os::eventfd()?,
            pending: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let (setup_tx, setup_rx) = mpsc::sync_channel(1);
        let ring_file = file.clone();
        let ring_wake = wake.clone();
        let entries = config.entries.max(2).next_power_of_two();
        // The ring is built on its own thread: SINGLE_ISSUER binds it to the creating thread.
        let thread = std::thread::Builder::new()
            .name("blockd-uring".into())
            .spawn(move || match build_ring(entries) {
                Ok(ring) => {
                    let _ = setup_tx.send(Ok(()));
                    RingThread::new(ring, ring_file, ring_wake, rx, entries as usize).run();
                }
                Err(e) => {
                    let _ = setup_tx.send(Err(e));
                }
            })?;
        match setup_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("io_uring thread died during setup")),
        }
        Ok(UringEngine {
            file,
            tx: Some(tx),
            wake,
            thread: Mutex::new(Some(thread)),
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(EngineError::Gone)?;
        tx.send(make(reply)).map_err(|_| EngineError::Gone)?;
        self.wake.notify();
        match rx.await {
            Ok(r) => r.map_err(EngineError::Io),
            Err(_) => Err(EngineError::Gone),
        }
    }

    pub(crate) async fn read(&self, offset: u64, len: usize) -> Result<BytesMut, EngineError> {
        self.call(|reply| Request::Read { offset, len, reply })
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
        self.call(|reply| Request::Write {
            offset,
            data,
            flags,
            reply,
            guard,
        })
        .await
    }

    pub(crate) async fn fdatasync(&self) -> Result<(), EngineError> {
        self.call(|reply| Request::Fdatasync { reply }).await
    }

    pub(crate) async fn fallocate(
        &self,
        mode: libc::c_int,
        offset: u64,
        len: u64,
        guard: WriteGuard,
    ) -> Result<(), EngineError> {
        self.call(|reply| Request::Fallocate {
            mode,
            offset,
            len,
            reply,
            guard,
        })
        .await
    }

    /// Blocking side operations (block status, cache, ioctls) run on tokio's blocking pool.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = self.file.clone();
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(EngineError::Io),
            Err(_) => Err(EngineError::Gone),
        }
    }

    /// Test hook: makes the ring thread exit with whatever is in flight, and waits for it.
    #[cfg(test)]
    pub(crate) fn kill_for_test(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Request::Die);
            self.wake.signal();
        }
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Closing the channel and waking the thread makes it finish what is in flight and exit.
        // Not joined: an fdatasync in flight may take long, and nobody waits for its result.
        drop(self.tx.take());
        self.wake.signal();
    }
}

/// Builds the ring, preferring single-issuer + deferred task running (the ring is only ever
/// touched by its owner thread), falling back to a plain ring on older kernels.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries),
        Err(e) => Err(e),
    }
}

/// An operation submitted to the kernel, with the buffer it reads into or writes from. A
/// change holds its [`WriteGuard`] until its final completion.
enum Op {
    Read {
        /// Filled up to `buf.len()`; the kernel writes into the spare capacity.
        buf: BytesMut,
        len: usize,
        reply: Reply<BytesMut>,
    },
    Write {
        data: Bytes,
        /// Bytes already written.
        done: usize,
        flags: i32,
        reply: Reply<()>,
        guard: WriteGuard,
    },
    Fdatasync {
        reply: Reply<()>,
    },
    Fallocate {
        mode: libc::c_int,
        len: u64,
        reply: Reply<()>,
        guard: WriteGuard,
    },
}

struct InFlight {
    op: Op,
    offset: u64,
    retries: u32,
}

impl InFlight {
    /// The SQE for the (remaining part of the) operation, tagged with its slot.
    fn sqe(&mut self, fd: types::Fd, slot: usize) -> squeue::Entry {
        let entry = match &mut self.op {
            Op::Read { buf, len, .. } => {
                let done = buf.len();
                let n = (*len - done).min(MAX_RW);
                let ptr = buf.spare_capacity_mut().as_mut_ptr().cast::<u8>();
                opcode::Read::new(fd, ptr, n as u32)
                    .offset(self.offset + done as u64)
                    .build()
            }
            Op::Write {
                data, done, flags, ..
            } => {
                let rest = &data[*done..];
                let n = rest.len().min(MAX_RW);
                opcode::Write::new(fd, rest.as_ptr(), n as u32)
                    .offset(self.offset + *done as u64)
                    .rw_flags(*flags)
                    .build()
            }
            Op::Fdatasync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { mode, len, .. } => opcode::Fallocate::new(fd, *len)
                .offset(self.offset)
                .mode(*mode)
                .build(),
        };
        entry.user_data(slot as u64)
    }

    /// Sends the final result to the caller (who may have gone away: ignored); a change is no
    /// longer counted in flight from here on.
    fn finish(self, result: io::Result<()>) {
        match self.op {
            Op::Read { buf, reply, .. } => {
                let _ = reply.send(result.map(|()| buf));
            }
            Op::Write { reply, guard, .. } | Op::Fallocate { reply, guard, .. } => {
                let _ = reply.send(result);
                drop(guard);
            }
            Op::Fdatasync { reply } => {
                let _ = reply.send(result);
            }
        }
    }

    /// Drops the reply sender (caller sees `Gone`) but leaks the buffer: the kernel may still
    /// write into it after the ring thread stopped reaping. A change stops being counted: the
    /// engine is dead, and a freeze waiting for it would wait forever.
    fn abandon(self) {
        match self.op {
            Op::Read { buf, reply, .. } => {
                drop(reply);
                std::mem::forget(buf);
            }
            Op::Write { data, reply, .. } => {
                drop(reply);
                std::mem::forget(data);
            }
            Op::Fdatasync { reply } | Op::Fallocate { reply, .. } => drop(reply),
        }
    }
}

/// What to do with a completion.
enum Progress {
    Done(io::Result<()>),
    Resubmit,
}

/// Applies one CQE result to an operation: short transfers and `EINTR`/`EAGAIN` resubmit.
fn apply_completion(inflight: &mut InFlight, res: i32) -> Progress {
    if res < 0 {
        let errno = -res;
        if (errno == libc::EINTR || errno == libc::EAGAIN) && inflight.retries < MAX_RETRIES {
            inflight.retries += 1;
            return Progress::Resubmit;
        }
        return Progress::Done(Err(io::Error::from_raw_os_error(errno)));
    }
    let n = res as usize;
    match &mut inflight.op {
        Op::Read { buf, len, .. } => {
            if n == 0 {
                // End of file: the file shrank behind our back; the rest reads as zeroes.
                buf.resize(*len, 0);
                return Progress::Done(Ok(()));
            }
            let done = buf.len() + n;
            // SAFETY: the kernel wrote `n` bytes into the spare capacity starting at
            // `buf.len()`, and `n` is at most the length we submitted (spare capacity).
            unsafe { buf.set_len(done) };
            if done < *len {
                Progress::Resubmit
            } else {
                Progress::Done(Ok(()))
            }
        }
        Op::Write { data, done, .. } => {
            if n == 0 {
                return Progress::Done(Err(io::Error::from_raw_os_error(libc::EIO)));
            }
            *done += n;
            if *done < data.len() {
                Progress::Resubmit
            } else {
                Progress::Done(Ok(()))
            }
        }
        Op::Fdatasync { .. } | Op::Fallocate { .. } => Progress::Done(Ok(())),
    }
}

/// The state owned by the ring thread.
struct RingThread {
    ring: IoUring,
    fd: types::Fd,
    /// Keeps the fd open while operations reference it.
    _file: Arc<File>,
    wake: Arc<Wake>,
    /// 8-byte target of the eventfd read; leaked so a late kernel write never hits freed memory.
    wake_buf: &'static mut u64,
    rx: mpsc::Receiver<Request>,
    closed: bool,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    backlog: VecDeque<Request>,
    cqes: Vec<(u64, i32)>,
}

impl RingThread {
    fn new(
        ring: IoUring,
        file: Arc<File>,
        wake: Arc<Wake>,
        rx: mpsc::Receiver<Request>,
        max_in_flight: usize,
    ) -> RingThread {
        RingThread {
            ring,
            fd: types::Fd(file.as_raw_fd()),
            _file: file,
            wake,
            wake_buf: Box::leak(Box::new(0u64)),
            rx,
            closed: false,
            slots: (0..max_in_flight).map(|_| None).collect(),
            free: (0..max_in_flight).rev().collect(),
            backlog: VecDeque::new(),
            cqes: Vec::with_capacity(max_in_flight * 2),
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn run(mut self) {
        if let Err(e) = self.arm_wake() {
            tracing::error!(error = %e, "io_uring thread cannot arm its wake-up");
            return;
        }
        loop {
            if !self.closed && self.drain_channel() {
                return; // Die
            }
            if let Err(e) = self.admit_backlog() {
                tracing::error!(error = %e, "io_uring submission failed; engine stops");
                return;
            }
            if self.closed && self.in_flight() == 0 && self.backlog.is_empty() {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; engine stops");
                    return;
                }
            }
            if let Err(e) = self.reap() {
                tracing::error!(error = %e, "io_uring completion handling failed; engine stops");
                return;
            }
        }
    }

    /// Moves queued requests into the backlog; `true` if told to die.
    fn drain_channel(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                #[cfg(test)]
                Ok(Request::Die) => return true,
                Ok(req) => self.backlog.push_back(req),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closed = true;
                    return false;
                }
            }
        }
    }

    /// Submits backlog requests while there are free slots.
    fn admit_backlog(&mut self) -> io::Result<()> {
        while let Some(slot) = self.free.last().copied() {
            let Some(req) = self.backlog.pop_front() else {
                break;
            };
            self.free.pop();
            let inflight = match req {
                Request::Read { offset, len, reply } => InFlight {
                    op: Op::Read {
                        buf: BytesMut::with_capacity(len),
                        len,
                        reply,
                    },
                    offset,
                    retries: 0,
                },
                Request::Write {
                    offset,
                    data,
                    flags,
                    reply,
                    guard,
                } => InFlight {
                    op: Op::Write {
                        data,
                        done: 0,
                        flags,
                        reply,
                        guard,
                    },
                    offset,
                    retries: 0,
                },
                Request::Fdatasync { reply } => InFlight {
                    op: Op::Fdatasync { reply },
                    offset: 0,
                    retries: 0,
                },
                Request::Fallocate {
                    mode,
                    offset,
                    len,
                    reply,
                    guard,
                } => InFlight {
                    op: Op::Fallocate {
                        mode,
                        len,
                        reply,
                        guard,
                    },
                    offset,
                    retries: 0,
                },
                #[cfg(test)]
                Request::Die => unreachable!("Die is handled in drain_channel"),
            };
            self.slots[slot] = Some(inflight);
            self.submit_slot(slot)?;
        }
        Ok(())
    }

    /// Pushes the SQE for the operation in `slot`, flushing the SQ to the kernel when full.
    fn submit_slot(&mut self, slot: usize) -> io::Result<()> {
        let entry = match &mut self.slots[slot] {
            Some(inflight) => inflight.sqe(self.fd, slot),
            None => return Err(io::Error::other("submit of an empty slot")),
        };
        self.push(&entry)
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an SQE points at is owned by `self.slots` (or is the leaked
            // `wake_buf`) and stays there, unmoved on the heap, until its CQE is reaped; if the
            // thread stops first, `Drop` leaks those buffers instead of freeing them. The fd is
            // kept open by `_file`.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {
                    // CQ is full: reap to make room, then retry.
                    self.reap()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.wake.fd.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        self.push(&entry)
    }

    /// Handles every available completion.
    fn reap(&mut self) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let result = self.handle_cqes(&cqes);
        self.cqes = cqes;
        result
    }

    fn handle_cqes(&mut self, cqes: &[(u64, i32)]) -> io::Result<()> {
        for &(token, res) in cqes {
            if token == WAKE_TOKEN {
                if res < 0 && !matches!(-res, libc::EINTR | libc::EAGAIN | libc::ECANCELED) {
                    return Err(io::Error::from_raw_os_error(-res));
                }
                self.wake.pending.store(false, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                self.arm_wake()?;
                continue;
            }
            let slot = token as usize;
            let Some(inflight) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                return Err(io::Error::other(format!(
                    "completion for unknown slot {slot}"
                )));
            };
            match apply_completion(inflight, res) {
                Progress::Resubmit => self.submit_slot(slot)?,
                Progress::Done(result) => {
                    if let Some(inflight) = self.slots[slot].take() {
                        inflight.finish(result);
                    }
                    self.free.push(slot);
                }
            }
        }
        Ok(())
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        // Normal exit has nothing in flight. After a fatal error or panic the kernel may still
        // own buffers: leak those, but drop the reply senders so callers see `Gone`.
        let mut leaked = 0;
        for inflight in self.slots.iter_mut().filter_map(Option::take) {
            inflight.abandon();
            leaked += 1;
        }
        if leaked > 0 {
            tracing::error!(leaked, "io_uring thread stopped with operations in flight");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WritesInFlight;

    /// A write stays counted in flight through its partial completions until its final one,
    /// whether or not its caller still waits; a read is never counted.
    #[test]
    fn a_change_is_counted_until_its_final_completion() {
        let writes = Arc::new(WritesInFlight::default());
        let (reply, rx) = oneshot::channel();
        drop(rx);
        let mut write = InFlight {
            op: Op::Write {
                data: Bytes::from_static(b"abcd"),
                done: 0,
                flags: 0,
                reply,
                guard: writes.begin(),
            },
            offset: 0,
            retries: 0,
        };
        assert!(matches!(
            apply_completion(&mut write, 2),
            Progress::Resubmit
        ));
        assert_eq!(writes.count(), 1, "half written");
        assert!(matches!(
            apply_completion(&mut write, -libc::EAGAIN),
            Progress::Resubmit
        ));
        let Progress::Done(result) = apply_completion(&mut write, 2) else {
            panic!("all written");
        };
        assert_eq!(writes.count(), 1, "until it is finished");
        write.finish(result);
        assert_eq!(writes.count(), 0);
        let (reply, _rx) = oneshot::channel();
        let zeroing = InFlight {
            op: Op::Fallocate {
                mode: 0,
                len: 4096,
                reply,
                guard: writes.begin(),
            },
            offset: 0,
            retries: 0,
        };
        assert_eq!(writes.count(), 1);
        zeroing.abandon();
        assert_eq!(writes.count(), 0, "a dead engine holds nothing up");
    }
}
