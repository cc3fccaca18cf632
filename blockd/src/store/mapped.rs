//! Mapped windows of the backing: large client reads of cached data are slices of them, so that
//! the data is copied once, from the page cache into the socket, instead of twice (into a
//! buffer first); on memory-backed stores, large client writes are received straight into them
//! (one copy, from the socket into the page cache, instead of two).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};

/// Size (and alignment) of one mapped window of the backing.
pub(crate) const WINDOW: u64 = 64 << 20;
/// Windows kept mapped: 4 GiB of address space, at most 8 MiB of page tables.
pub(crate) const WINDOWS_KEPT: usize = 64;

/// The mapped windows of one backing, least recently used unmapped first.
pub(crate) struct MappedWindows {
    size: u64,
    page: u64,
    kept: usize,
    /// Windows are mapped for writing too ([`MappedWindows::writable_range`]).
    writable: bool,
    windows: Mutex<Windows>,
    /// Mapping failed once (a file system without `mmap`): every read is copied.
    unmappable: AtomicBool,
    /// Ranges handed out by `writable_range` (tests).
    #[cfg(test)]
    in_place: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Windows {
    tick: u64,
    /// Window index -> (mapping, last use).
    mapped: HashMap<u64, (Arc<MmapRaw>, u64)>,
}

impl MappedWindows {
    /// Windows over the first `size` bytes of a backing, keeping at most `kept` mapped;
    /// `writable` (the backing is open for writing) maps them for writing too.
    pub(crate) fn new(size: u64, kept: usize, writable: bool) -> MappedWindows {
        MappedWindows {
            size,
            page: page_size(),
            kept: kept.max(1),
            writable,
            windows: Mutex::default(),
            // 4 GiB of windows do not fit beside the rest of a 32-bit address space.
            unmappable: AtomicBool::new(cfg!(not(target_pointer_width = "64"))),
            #[cfg(test)]
            in_place: Default::default(),
        }
    }

    /// `offset..offset + len` of `file` as bytes, when the range lies in one window and every
    /// page of it is in the page cache (so that copying it out does no I/O); `None` otherwise
    /// (or when mapping fails), for the caller to read it the usual way.
    ///
    /// The bytes are those the file holds when they are copied out (when the reply is sent),
    /// not when this returns.
    pub(crate) fn cached_range(&self, file: &File, offset: u64, len: usize) -> Option<Bytes> {
        let (map, at) = self.resident_range(file, offset, len)?;
        Some(Bytes::from_owner(Window(map)).slice(at..at + len))
    }

    /// `offset..offset + len` of `file` as a place to receive data into, under the same
    /// conditions as [`MappedWindows::cached_range`] (one window, every page in the page cache,
    /// so that writing it allocates nothing) and only when the windows are writable.
    pub(crate) fn writable_range(&self, file: &File, offset: u64, len: usize) -> Option<InPlace> {
        if !self.writable {
            return None;
        }
        let (map, at) = self.resident_range(file, offset, len)?;
        #[cfg(test)]
        self.in_place.fetch_add(1, Ordering::Relaxed);
        Some(InPlace { map, at, len })
    }

    /// The window holding `offset..offset + len` and the range's place in it, when the range
    /// lies in one window and all its pages are cached.
    fn resident_range(
        &self,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Option<(Arc<MmapRaw>, usize)> {
        let end = offset.checked_add(len as u64)?;
        let index = offset / WINDOW;
        if len == 0 || end > self.size || (end - 1) / WINDOW != index {
            return None;
        }
        if self.unmappable.load(Ordering::Relaxed) {
            return None;
        }
        let map = self.window(file, index)?;
        let at = (offset - index * WINDOW) as usize;
        if !self.resident(&map, at, len).ok()? {
            return None;
        }
        Some((map, at))
    }

    /// The mapping of window `index`, mapped now if it is not.
    fn window(&self, file: &File, index: u64) -> Option<Arc<MmapRaw>> {
        let mut windows = self.windows.lock().expect("mapped windows");
        windows.tick += 1;
        let tick = windows.tick;
        if let Some((map, used)) = windows.mapped.get_mut(&index) {
            *used = tick;
            return Some(Arc::clone(map));
        }
        let start = index * WINDOW;
        let len = (self.size - start).min(WINDOW) as usize;
        // A shared mapping of a range of the backing (inside its size). No reference into it is
        // ever made but the byte slices of `cached_range`, which are only handed to the kernel
        // to be copied into a plain socket (`CopyAt::Send`; TLS connections copy at the read),
        // and `InPlace`, which only the kernel writes through (a socket receive). A change of
        // the file shows as the newer data of a read that raced a write, which NBD leaves
        // undefined, and a page that cannot be read back or written (evicted, then a disk
        // error, a truncated file, a full tmpfs) fails that socket call with EFAULT: no access
        // from user space that could raise SIGBUS.
        let mut options = MmapOptions::new();
        options.offset(start).len(len);
        let mapped = if self.writable {
            options.map_raw(file)
        } else {
            options.map_raw_read_only(file)
        };
        let map = match mapped {
            Ok(map) => Arc::new(map),
            Err(e) => {
                // Out of address space or map count is passing; anything else is the file
                // system (or device) refusing mappings for good.
                if !matches!(e.raw_os_error(), Some(libc::ENOMEM | libc::EAGAIN)) {
                    tracing::info!(error = %e, "backing cannot be mapped: client reads are copied");
                    self.unmappable.store(true, Ordering::Relaxed);
                }
                return None;
            }
        };
        if windows.mapped.len() >= self.kept {
            let oldest = windows
                .mapped
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&i, _)| i);
            // Slices still being sent keep their mapping until they are dropped.
            oldest.and_then(|i| windows.mapped.remove(&i));
        }
        windows.mapped.insert(index, (Arc::clone(&map), tick));
        Some(map)
    }

    /// Whether every page of `at..at + len` of `map` is in the page cache (`mincore`).
    fn resident(&self, map: &MmapRaw, at: usize, len: usize) -> io::Result<bool> {
        let first = at as u64 / self.page * self.page;
        let span = (at + len) as u64 - first;
        let mut vec = vec![0u8; span.div_ceil(self.page) as usize];
        // SAFETY: `first..at + len` lies inside the live mapping `map` (its start is page
        // aligned, and `first` is a multiple of the page size); `vec` has one byte per page of
        // that range, which is what mincore writes.
        let ret = unsafe {
            libc::mincore(
                map.as_ptr().add(first as usize) as *mut libc::c_void,
                span as usize,
                vec.as_mut_ptr(),
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().all(|b| b & 1 == 1))
    }

    /// Windows mapped now (tests).
    #[cfg(test)]
    pub(crate) fn mapped(&self) -> usize {
        self.windows.lock().expect("mapped windows").mapped.len()
    }

    /// Ranges handed out to receive into so far (tests).
    #[cfg(test)]
    pub(crate) fn in_place(&self) -> usize {
        self.in_place.load(Ordering::Relaxed)
    }
}

/// A mapped window as the owner of the bytes sliced from it.
struct Window(Arc<MmapRaw>);

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the mapping lives as long as `self` and is `len()` bytes long; its contents
        // may change under the slice (see `MappedWindows::window`), which only the kernel
        // reads.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), self.0.len()) }
    }
}

/// A cached range of a writable window that a socket receive writes into (see
/// [`MappedWindows::writable_range`]); the data is in the file as soon as it is received.
pub struct InPlace {
    map: Arc<MmapRaw>,
    at: usize,
    len: usize,
}

impl InPlace {
    /// Bytes of the range not received yet.
    pub(crate) fn remaining(&self) -> usize {
        self.len
    }

    /// One non-blocking receive from the stream socket `socket` into the range: the bytes
    /// received (0 at the end of the stream), `WouldBlock` when none are waiting, `EFAULT`
    /// when a page could not be written (a page punched out meanwhile on a full tmpfs, a
    /// truncated file): what was received before it is in place, the rest is still waiting in
    /// the socket.
    pub(crate) fn receive(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        if self.len == 0 {
            return Ok(0);
        }
        // SAFETY: `at..at + len` lies inside the live mapping `map` (`resident_range` checked
        // it), which is writable; only the kernel writes through the pointer, and a page it
        // cannot write fails the receive with EFAULT instead of a fault in user space.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                self.map.as_mut_ptr().add(self.at) as *mut libc::c_void,
                self.len,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        self.at += n;
        self.len -= n;
        Ok(n)
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    /// A sparse file of `windows` windows with `data` written at `at`, on tmpfs and on disk.
    fn files_with(windows: u64, at: u64, data: &[u8]) -> Vec<(tempfile::NamedTempFile, u64)> {
        ["/dev/shm", "/var/tmp"]
            .iter()
            .map(|dir| {
                let f = tempfile::NamedTempFile::new_in(dir).unwrap();
                let size = windows * WINDOW;
                f.as_file().set_len(size).unwrap();
                f.as_file().write_all_at(data, at).unwrap();
                (f, size)
            })
            .collect()
    }

    /// Whether `bytes` lie in some window `windows` has mapped now.
    fn in_a_window(windows: &MappedWindows, bytes: &Bytes) -> bool {
        let w = windows.windows.lock().unwrap();
        let p = bytes.as_ptr() as usize;
        w.mapped.values().any(|(m, _)| {
            let start = m.as_ptr() as usize;
            p >= start && p + bytes.len() <= start + m.len()
        })
    }

    #[test]
    fn a_cached_range_is_a_slice_of_a_window_holding_the_files_bytes() {
        let data: Vec<u8> = (0..256 << 10).map(|i| (i * 7 % 251) as u8).collect();
        let at = WINDOW + 12_345;
        for (f, size) in files_with(2, at, &data) {
            let windows = MappedWindows::new(size, 4, true);
            let got = windows.cached_range(f.as_file(), at, data.len()).unwrap();
            assert_eq!(&got[..], &data[..]);
            assert!(in_a_window(&windows, &got), "not a slice of a window");
            assert_eq!(windows.mapped(), 1);
        }
    }

    #[test]
    fn ranges_across_windows_past_the_end_or_uncached_are_not_mapped() {
        let data = vec![9u8; 8192];
        for (f, size) in files_with(2, WINDOW - 4096, &data) {
            let windows = MappedWindows::new(size, 4, true);
            let file = f.as_file();
            // Across the boundary of windows 0 and 1.
            assert!(windows.cached_range(file, WINDOW - 4096, 8192).is_none());
            // Past the end, and empty.
            assert!(windows.cached_range(file, size - 4096, 8192).is_none());
            assert!(windows.cached_range(file, 0, 0).is_none());
            // A hole never read is in no cache (far from the written range, which a huge
            // page of tmpfs could cover).
            assert!(
                windows
                    .cached_range(file, WINDOW + (32 << 20), 1 << 20)
                    .is_none()
            );
            // Each half of the written range is.
            assert_eq!(
                &windows.cached_range(file, WINDOW - 4096, 4096).unwrap()[..],
                &data[..4096]
            );
            assert_eq!(
                &windows.cached_range(file, WINDOW, 4096).unwrap()[..],
                &data[..4096]
            );
        }
    }

    #[test]
    fn the_least_recently_used_window_is_unmapped_and_its_slices_stay_valid() {
        for (f, size) in files_with(3, 0, &[1u8; 4096]) {
            let file = f.as_file();
            for w in 1..3 {
                file.write_all_at(&[w as u8 + 1; 4096], w * WINDOW).unwrap();
            }
            let windows = MappedWindows::new(size, 2, true);
            let first = windows.cached_range(file, 0, 4096).unwrap();
            let second = windows.cached_range(file, WINDOW, 4096).unwrap();
            // Window 0 used again: window 1 is now the oldest, and goes for window 2.
            windows.cached_range(file, 0, 4096).unwrap();
            let third = windows.cached_range(file, 2 * WINDOW, 4096).unwrap();
            let kept: Vec<u64> = {
                let w = windows.windows.lock().unwrap();
                let mut k: Vec<u64> = w.mapped.keys().copied().collect();
                k.sort();
                k
            };
            assert_eq!(kept, vec![0, 2]);
            assert!(!in_a_window(&windows, &second));
            // Slices keep their own mapping after their window is unmapped, or all are.
            assert_eq!(&second[..], &[2u8; 4096][..]);
            drop(windows);
            assert_eq!(&first[..], &[1u8; 4096][..]);
            assert_eq!(&third[..], &[3u8; 4096][..]);
        }
    }

    /// Receives everything `target` still wants from `socket` (the data is already waiting).
    fn receive_all(target: &mut InPlace, socket: &std::os::unix::net::UnixStream) -> usize {
        let mut total = 0;
        loop {
            match target.receive(socket.as_fd()) {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(e) => panic!("receive: {e}"),
            }
        }
    }

    #[test]
    fn a_writable_range_receives_straight_into_the_file() {
        use std::io::Write;
        let old = vec![5u8; 256 << 10];
        let at = WINDOW + 8192;
        for (f, size) in files_with(2, at, &old) {
            let file = f.as_file();
            let windows = MappedWindows::new(size, 4, true);
            let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
            let data: Vec<u8> = (0..100_000).map(|i| (i * 13 % 251) as u8).collect();
            let mut target = windows.writable_range(file, at + 1000, data.len()).unwrap();
            tx.write_all(&data).unwrap();
            assert_eq!(receive_all(&mut target, &rx), data.len());
            // Nothing more is wanted, and nothing more is waiting.
            assert_eq!(target.receive(rx.as_fd()).unwrap(), 0);
            let mut back = vec![0u8; 102_000];
            file.read_exact_at(&mut back, at).unwrap();
            assert_eq!(&back[..1000], &old[..1000]);
            assert!(back[1000..101_000] == data[..]);
            assert_eq!(&back[101_000..], &old[101_000..102_000]);
            assert_eq!(windows.in_place(), 1);
            // Nothing waiting: would block, and the range still wants its bytes.
            let mut target = windows.writable_range(file, at, 4096).unwrap();
            let e = target.receive(rx.as_fd()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            // Holes (no page to write), ranges across windows, past the end: not in place.
            assert!(windows.writable_range(file, 0, 4096).is_none());
            assert!(windows.writable_range(file, WINDOW - 4096, 8192).is_none());
            assert!(windows.writable_range(file, size - 4096, 8192).is_none());
            // Windows mapped for reading only never are.
            let read_only = MappedWindows::new(size, 4, false);
            assert!(read_only.writable_range(file, at, 4096).is_none());
            assert!(read_only.cached_range(file, at, 4096).is_some());
        }
    }

    #[test]
    fn a_page_that_cannot_be_written_fails_the_receive_and_leaves_the_data_waiting() {
        use std::io::{Read, Write};
        for (f, size) in files_with(1, 0, &[1u8; 64 << 10]) {
            let file = f.as_file();
            let windows = MappedWindows::new(size, 1, true);
            let mut target = windows.writable_range(file, 0, 64 << 10).unwrap();
            // The file is cut short after the range was handed out: its pages are gone.
            file.set_len(0).unwrap();
            let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
            let data = vec![7u8; 64 << 10];
            tx.write_all(&data).unwrap();
            let e = target.receive(rx.as_fd()).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
            let mut waiting = vec![0u8; data.len()];
            rx.read_exact(&mut waiting).unwrap();
            assert_eq!(waiting, data);
        }
    }

    #[test]
    fn a_slice_holds_the_data_of_when_it_is_sent() {
        for (f, size) in files_with(1, 0, &[1u8; 4096]) {
            let windows = MappedWindows::new(size, 1, true);
            let slice = windows.cached_range(f.as_file(), 0, 4096).unwrap();
            f.as_file().write_all_at(&[2u8; 4096], 0).unwrap();
            assert_eq!(&slice[..], &[2u8; 4096][..]);
        }
    }
}
