//! The inline fast path: non-blocking (`RWF_NOWAIT`) reads and writes tried on the calling
//! async thread before a request is handed to the engine (up to the configured size; an NBD
//! client's reads at any size).
//!
//! A buffered read whose pages are cached, or a buffered write the filesystem can take without
//! blocking, costs a memcpy; sending it to another thread costs two wake-ups. Anything the
//! kernel cannot do without blocking (`EAGAIN`, a short transfer) goes to the engine for the
//! remainder, as does every FUA write. Filesystems without `RWF_NOWAIT` support disable the
//! path on the first `EOPNOTSUPP`.
//!
//! Memory-backed files (tmpfs, ramfs) never wait for a device, but tmpfs rejects `RWF_NOWAIT`:
//! for them plain (and FUA: `RWF_DSYNC` is free there) reads and writes run inline, bounded by
//! the memcpy of at most `max` bytes (a client's read: any size).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;

use super::os;

/// Largest client read tried inline (when the path is on): any size. An NBD client's large
/// read runs in a task of its own, so nothing waits behind its memcpy, which costs the same
/// wherever it runs. Handed to the engine, a cached read on ext4 was copied by the io_uring
/// ring thread, which serialised the copies of every large read on that one thread, and a
/// tmpfs read cost two thread hops to a pool worker (1 MiB reads at QD8 over NBD:
/// docs/benchmarks-nbd.md, session 7). Other large reads (resync, verify, snapshots) may run
/// on a replication session's receive loop and keep to `max`.
const CLIENT_READ_MAX: usize = 64 << 20;

pub(crate) struct InlinePath {
    /// Largest write or read tried inline, a client's read aside (0 disables the path).
    max: usize,
    /// tmpfs/ramfs: blocking calls are memcpys, run them inline without `RWF_NOWAIT`.
    memory_backed: bool,
    reads: AtomicBool,
    writes: AtomicBool,
    /// A write is blocking its caller ([`InlinePath::write_or_wait`]).
    blocking_write: AtomicBool,
}

impl InlinePath {
    pub(crate) fn new(max: usize, memory_backed: bool) -> InlinePath {
        InlinePath {
            max,
            memory_backed,
            reads: AtomicBool::new(max > 0),
            writes: AtomicBool::new(max > 0),
            blocking_write: AtomicBool::new(false),
        }
    }

    /// Reads what the page cache can give without blocking (on memory-backed files: plainly):
    /// a buffer of at most `len` bytes (possibly empty), the rest to be read by the engine.
    /// `client`: an NBD client's read, running in a task of its own (any size is tried).
    pub(crate) fn read(&self, file: &File, offset: u64, len: usize, client: bool) -> BytesMut {
        let mut buf = BytesMut::new();
        // With the path off (`max` 0), `reads` is false from the start.
        let limit = if client {
            self.max.max(CLIENT_READ_MAX)
        } else {
            self.max
        };
        if len > limit || !self.reads.load(Ordering::Relaxed) {
            return buf;
        }
        while buf.len() < len {
            let done = buf.len();
            let at = offset + done as u64;
            match os::pread_append(file, &mut buf, len - done, at, self.nowait()) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.note_error(&e, &self.reads);
                    break;
                }
            }
        }
        buf
    }

    /// Writes what can be written without blocking; returns the number of bytes written.
    /// `fua` writes are only done inline on memory-backed files.
    pub(crate) fn write(&self, file: &File, offset: u64, data: &[u8], fua: bool) -> usize {
        if data.len() > self.max || !self.writes.load(Ordering::Relaxed) {
            return 0;
        }
        let flags = match (fua, self.memory_backed) {
            (false, _) => self.nowait(),
            (true, true) => libc::RWF_DSYNC,
            (true, false) => return 0,
        };
        let mut done = 0;
        while done < data.len() {
            match os::pwrite_once(file, &data[done..], offset + done as u64, flags) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => {
                    self.note_error(&e, &self.writes);
                    break;
                }
            }
        }
        done
    }

    /// A write [`Self::write`] could not do without blocking, done anyway with a plain `pwrite`
    /// on the calling thread when it is small (at most `max`), not FUA, and no other write of
    /// this file is doing so; `None` hands it to the engine.
    ///
    /// ext4 has no `RWF_NOWAIT` buffered writes, so every write of a disk-backed file landed
    /// here, and the engine then cost more than the write: io_uring hands each buffered write
    /// to an io-wq worker (one per file: the writes of a file are serialised there), so a 4 KiB
    /// write took four thread hops (task, ring thread, worker, ring thread, task), 71 us of
    /// blockd's CPU per write against 33 us written in place (4k random writes at QD32 over
    /// NBD, docs/benchmarks-nbd.md, session 13). One writer at a time: ext4 serialises the
    /// buffered writes of a file on its inode lock anyway, so a second would only sleep on it,
    /// holding a second runtime thread; this way at most one thread per file waits for the
    /// page cache (dirty-page throttling), as the receiving task of a large WRITE does.
    pub(crate) fn write_or_wait(
        &self,
        file: &File,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Option<io::Result<()>> {
        if fua || self.memory_backed || data.len() > self.max {
            return None;
        }
        self.blocking_write
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        let _slot = Slot(&self.blocking_write);
        Some(os::pwrite_full(file, data, offset, 0))
    }

    fn nowait(&self) -> libc::c_int {
        if self.memory_backed {
            0
        } else {
            libc::RWF_NOWAIT
        }
    }

    /// `EOPNOTSUPP` means this file never supports `RWF_NOWAIT`: stop trying. Any other error
    /// (`EAGAIN`, `ENOSPC`, `EIO`...) is left for the engine to hit and report.
    fn note_error(&self, e: &io::Error, flag: &AtomicBool) {
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            flag.store(false, Ordering::Relaxed);
        }
    }
}

/// Frees the blocking-write slot when the write is done (or unwinds).
struct Slot<'a>(&'a AtomicBool);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn one_small_non_fua_write_at_a_time_waits_in_place() {
        let f = tempfile::tempfile_in("/var/tmp").unwrap();
        f.set_len(1 << 20).unwrap();
        let path = InlinePath::new(128 << 10, false);
        assert!(matches!(
            path.write_or_wait(&f, 4096, &[7; 4096], false),
            Some(Ok(()))
        ));
        let mut back = [0u8; 4096];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, [7; 4096]);
        // FUA, too large, or another write already waiting: the engine's.
        assert!(path.write_or_wait(&f, 0, &[1; 4096], true).is_none());
        assert!(
            path.write_or_wait(&f, 0, &vec![1; (128 << 10) + 1], false)
                .is_none()
        );
        let held = Slot(&path.blocking_write);
        path.blocking_write.store(true, Ordering::Relaxed);
        assert!(path.write_or_wait(&f, 0, &[1; 4096], false).is_none());
        drop(held);
        assert!(path.write_or_wait(&f, 0, &[1; 4096], false).is_some());
        // Off (max 0, the per-engine test suites) and on memory-backed files (written inline
        // by `write` already).
        assert!(
            InlinePath::new(0, false)
                .write_or_wait(&f, 0, &[1; 16], false)
                .is_none()
        );
        assert!(
            InlinePath::new(128 << 10, true)
                .write_or_wait(&f, 0, &[1; 16], false)
                .is_none()
        );
    }
}
