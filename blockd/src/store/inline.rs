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
}

impl InlinePath {
    pub(crate) fn new(max: usize, memory_backed: bool) -> InlinePath {
        InlinePath {
            max,
            memory_backed,
            reads: AtomicBool::new(max > 0),
            writes: AtomicBool::new(max > 0),
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
