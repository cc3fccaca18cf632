//! The exclusive lock a process holds on a node's metadata while it uses it: a running
//! blockd for as long as the resource is attached, `blockctl create-md` while it writes. A
//! second blockd started for the same resource (a systemd unit beside a cluster manager's)
//! or a `create-md` against a running one is refused before it reads or writes anything,
//! instead of treating the live metadata as an unclean shutdown and rewriting it.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::MetaError;

/// Held while alive: an advisory `flock(LOCK_EX)` on the metadata path (the backing device
/// itself for internal metadata). The kernel drops it when the process ends, however it ends.
#[derive(Debug)]
pub struct MetaLock {
    _file: File,
    path: PathBuf,
}

/// How long [`MetaLock::take`] retries a lock held by someone else: udev holds a shared lock on
/// a block device for a moment while it handles the device's events (after `lvcreate`, or after
/// `create-md` closed a device it wrote to); a blockd holds it for good.
pub const IN_USE_WAIT: Duration = Duration::from_secs(3);

impl MetaLock {
    /// Takes the lock, retrying for [`IN_USE_WAIT`]: [`MetaError::InUse`] when another process
    /// still holds it then.
    pub fn take(path: &Path) -> Result<MetaLock, MetaError> {
        Self::take_within(path, IN_USE_WAIT)
    }

    /// Takes the lock, retrying for `wait`.
    pub fn take_within(path: &Path, wait: Duration) -> Result<MetaLock, MetaError> {
        let file = File::open(path).map_err(|source| MetaError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(MetaLock {
                        _file: file,
                        path: path.to_path_buf(),
                    });
                }
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(MetaError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                Err(TryLockError::Error(source)) => {
                    return Err(MetaError::Lock {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
    }

    /// The locked path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r0.meta");
        std::fs::write(&path, b"x").unwrap();
        let first = MetaLock::take(&path).unwrap();
        assert_eq!(first.path(), path);
        // Another open file description, as another process would have.
        assert!(matches!(
            MetaLock::take_within(&path, Duration::ZERO),
            Err(MetaError::InUse { path: p }) if p == path
        ));
        // A holder that lets go within the wait (udev) is waited for.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        MetaLock::take_within(&path, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        assert!(matches!(
            MetaLock::take(&dir.path().join("missing")),
            Err(MetaError::Open { .. })
        ));
    }
}
