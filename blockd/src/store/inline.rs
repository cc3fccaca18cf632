//! The inline fast path: non-blocking (`RWF_NOWAIT`) reads and writes tried on the calling
//! async thread before a request is handed to the engine (up to the configured size; an NBD
//! client's reads at any size).
//!
//! A buffered read whose pages are cached, or a buffered write the filesystem can take without
//! blocking, costs a memcpy; sending it to another thread costs two wake-ups. Anything the
//! kernel cannot do without blocking (`EAGAIN`, a short transfer) goes to the engine for the
//! remainder, as does every FUA write, except one small write per file at a time, which waits
//! in place ([`InlinePath::write_or_wait`]). Filesystems without `RWF_NOWAIT` support disable
//! the non-blocking path on the first `EOPNOTSUPP`.
//!
//! Memory-backed files (tmpfs, ramfs) never wait for a device, but tmpfs rejects `RWF_NOWAIT`:
//! for them plain (and FUA: `RWF_DSYNC` is free there) reads and writes run inline, bounded by
//! the memcpy of at most `max` bytes (a client's read: any size).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
    /// Writes of this file blocking their callers now ([`InlinePath::write_or_wait`] and
    /// [`InlinePath::blocking`]).
    blocking_writes: AtomicUsize,
}

impl InlinePath {
    pub(crate) fn new(max: usize, memory_backed: bool) -> InlinePath {
        InlinePath {
            max,
            memory_backed,
            reads: AtomicBool::new(max > 0),
            writes: AtomicBool::new(max > 0),
            blocking_writes: AtomicUsize::new(0),
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
    /// this file is blocking its caller; `None` hands it to the engine.
    ///
    /// ext4 has no `RWF_NOWAIT` buffered writes, so every write of a disk-backed file landed
    /// here, and the engine then cost more than the write: io_uring hands each buffered write
    /// to the file's io-wq worker (the writes of a file are serialised there), so a 4 KiB write
    /// took four thread hops (task, ring thread, worker, ring thread, task): 62 us of blockd's
    /// CPU per write against 36 us written in place (4k random writes at QD32 over NBD on ext4,
    /// docs/benchmarks-nbd.md, session 13). Only when no other write is blocking: ext4
    /// serialises the buffered writes of a file on its inode lock anyway, so a second would
    /// only sleep on it, holding a second runtime thread (of two on a 2-CPU machine).
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
        self.blocking_writes
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        let _counted = Blocking(&self.blocking_writes);
        Some(os::pwrite_full(file, data, offset, 0))
    }

    /// Counts a write that blocks its caller by its nature (the pieces of a large NBD WRITE, a
    /// Secondary's applied writes) until the guard is dropped, so that
    /// [`Self::write_or_wait`] does not add another.
    pub(crate) fn blocking(&self) -> Blocking<'_> {
        self.blocking_writes.fetch_add(1, Ordering::Acquire);
        Blocking(&self.blocking_writes)
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

/// Uncounts a blocking write when it is done (or unwinds).
pub(crate) struct Blocking<'a>(&'a AtomicUsize);

impl Drop for Blocking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
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
        // One after the other: each is written in place, and gives the slot back.
        for (i, at) in [4096u64, 8192].into_iter().enumerate() {
            let byte = i as u8 + 7;
            assert!(matches!(
                path.write_or_wait(&f, at, &[byte; 4096], false),
                Some(Ok(()))
            ));
            let mut back = [0u8; 4096];
            f.read_exact_at(&mut back, at).unwrap();
            assert_eq!(back, [byte; 4096]);
        }
        assert_eq!(path.blocking_writes.load(Ordering::Relaxed), 0);
        // FUA, too large, or another write blocking (in place or by nature): the engine's.
        assert!(path.write_or_wait(&f, 0, &[1; 4096], true).is_none());
        assert!(
            path.write_or_wait(&f, 0, &vec![1; (128 << 10) + 1], false)
                .is_none()
        );
        let other = path.blocking();
        assert!(path.write_or_wait(&f, 0, &[1; 4096], false).is_none());
        drop(other);
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

    #[test]
    fn a_failed_write_in_place_is_its_error_and_gives_the_slot_back() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [0u8; 8192]).unwrap();
        let read_only = File::open(&p).unwrap();
        let path = InlinePath::new(128 << 10, false);
        let err = path
            .write_or_wait(&read_only, 0, &[1; 4096], false)
            .unwrap()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert_eq!(path.blocking_writes.load(Ordering::Relaxed), 0);
    }
}
