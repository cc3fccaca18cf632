//! Safe wrappers around the raw Linux file syscalls and ioctls the block store uses.
//!
//! Every function here is blocking and works on a borrowed `&File`; the engines decide on
//! which thread they run. Errors are plain `std::io::Error`s carrying the errno.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Converts a `-1` syscall return into the thread's errno.
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Converts a u64 file offset into `off_t`, refusing values the kernel cannot represent.
fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// One `preadv2` call appending up to `want` bytes to `buf` (read into its spare capacity,
/// no zero-initialisation); returns the bytes read (0 at end of file).
pub fn pread_append(
    file: &File,
    buf: &mut bytes::BytesMut,
    want: usize,
    offset: u64,
    flags: libc::c_int,
) -> io::Result<usize> {
    buf.reserve(want);
    let spare = &mut buf.spare_capacity_mut()[..want];
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // SAFETY: `iov` covers `spare`: allocated (possibly uninitialised) memory exclusively
    // borrowed from `buf`; the kernel only writes into it and reports how much it wrote.
    let ret = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, to_off(offset)?, flags) };
    let n = check(ret as libc::c_long)? as usize;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity (n <= want).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// One `pwritev2` call of `buf` at `offset`; returns the bytes written.
pub fn pwrite_once(file: &File, buf: &[u8], offset: u64, flags: libc::c_int) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `iov` points at `buf`, valid for reads of `buf.len()` bytes for the duration of
    // the call (the kernel only reads from it for a write); the fd is owned by `file`.
    let ret = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, to_off(offset)?, flags) };
    check(ret as libc::c_long).map(|n| n as usize)
}

/// Reads exactly `len` bytes at `offset` into a new buffer, retrying short reads and `EINTR`.
/// Bytes past the end of the file read as zeroes (the file was shrunk behind our back).
pub fn pread_exact_new(file: &File, len: usize, offset: u64) -> io::Result<bytes::BytesMut> {
    let mut buf = bytes::BytesMut::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        match pread_append(file, &mut buf, len - done, offset + done as u64, 0) {
            Ok(0) => buf.resize(len, 0),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Writes all of `buf` at `offset`, retrying short writes and `EINTR`.
/// `flags` is passed to `pwritev2` (e.g. `RWF_DSYNC` for a forced-unit-access write).
pub fn pwrite_full(file: &File, buf: &[u8], offset: u64, flags: libc::c_int) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match pwrite_once(file, &buf[done..], offset + done as u64, flags) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `fdatasync(2)`.
pub fn fdatasync(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an fd owned by `file`.
    check(unsafe { libc::fdatasync(file.as_raw_fd()) } as libc::c_long).map(drop)
}

/// `fallocate(2)` with `mode` over `[offset, offset + len)`, retrying `EINTR`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an fd owned by `file`; no memory is passed.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, to_off(offset)?, to_off(len)?) };
        match check(ret as libc::c_long) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(drop),
        }
    }
}

/// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE`; `Ok(None)` when the kernel answers `ENXIO`
/// (no data at or after `offset`).
pub fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an fd owned by `file`; lseek with SEEK_DATA/HOLE does not move
    // any state other code depends on (all I/O is positional).
    let ret = unsafe { libc::lseek(file.as_raw_fd(), to_off(offset)?, whence) };
    match check(ret as libc::c_long) {
        Ok(pos) => Ok(Some(pos as u64)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `posix_fadvise(POSIX_FADV_WILLNEED)` over the range.
pub fn fadvise_willneed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd owned by `file`; no memory is passed.
    let ret = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            to_off(offset)?,
            to_off(len)?,
            libc::POSIX_FADV_WILLNEED,
        )
    };
    // posix_fadvise returns the error number instead of setting errno.
    if ret != 0 {
        Err(io::Error::from_raw_os_error(ret))
    } else {
        Ok(())
    }
}

/// The file lives in memory (tmpfs or ramfs): reads and writes never wait for a device.
pub fn is_memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: `statfs` is plain old data; zeroed is a valid value, and fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one `statfs` through the pointer, which points at a live local.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    check(ret as libc::c_long).map(|_| size)
}

/// Discards `[offset, offset + len)` of a block device (`BLKDISCARD`).
pub fn block_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64s (start, length) through the pointer, which points at a
    // live local array of exactly that shape.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    check(ret as libc::c_long).map(drop)
}

/// Reads a small sysfs attribute of a block device's queue (e.g. `discard_max_bytes`).
/// Returns `None` when it is missing or unparsable.
pub fn block_queue_attr(file: &File, attr: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let rdev = file.metadata().ok()?.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let text =
        std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/queue/{attr}")).ok()?;
    text.trim().parse().ok()
}

/// Creates a close-on-exec eventfd (used to wake the io_uring thread). It is blocking on
/// purpose: io_uring answers reads of an `O_NONBLOCK` fd with `EAGAIN` instead of waiting.
pub fn eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall; on success we take sole ownership of the returned fd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    check(fd as libc::c_long)?;
    // SAFETY: `fd` is a freshly created descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd counter (never blocks in practice: the reader drains it constantly).
pub fn eventfd_signal(fd: &impl AsRawFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local u64, as eventfd requires.
    let ret = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    match check(ret as libc::c_long) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        other => other.map(drop),
    }
}

/// Sets `SO_RCVLOWAT` on a socket: readiness (and the receiver's wake-up) waits until at least
/// `bytes` are queued, so a large payload arrives in a few big pieces instead of one wake-up per
/// segment. The kernel still reports readiness when the window is too small to reach the mark.
pub fn set_receive_low_water(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local; the fd is borrowed
    // for the duration of the call.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(libc::c_long::from(ret)).map(|_| ())
}
