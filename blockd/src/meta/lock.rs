//! The exclusive lock a process holds on a node's metadata while it uses it: a running
//! blockd for as long as the resource is attached, `blockctl create-md` while it writes. A
//! second blockd started for the same resource (a systemd unit beside a cluster manager's)
//! or a `create-md` against a running one is refused before it reads or writes anything,
//! instead of treating the live metadata as an unclean shutdown and rewriting it.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

use super::MetaError;

/// Held while alive: an advisory `flock(LOCK_EX)` on the metadata path (the backing device
/// itself for internal metadata). The kernel drops it when the process ends, however it ends.
#[derive(Debug)]
pub struct MetaLock {
    _file: File,
    path: PathBuf,
}

impl MetaLock {
    /// Takes the lock without waiting: [`MetaError::InUse`] when another process holds it.
    pub fn take(path: &Path) -> Result<MetaLock, MetaError> {
        let file = File::open(path).map_err(|source| MetaError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        match file.try_lock() {
            Ok(()) => Ok(MetaLock {
                _file: file,
                path: path.to_path_buf(),
            }),
            Err(TryLockError::WouldBlock) => Err(MetaError::InUse {
                path: path.to_path_buf(),
            }),
            Err(TryLockError::Error(source)) => Err(MetaError::Lock {
                path: path.to_path_buf(),
                source,
            }),
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
            MetaLock::take(&path),
            Err(MetaError::InUse { path: p }) if p == path
        ));
        drop(first);
        MetaLock::take(&path).unwrap();
        assert!(matches!(
            MetaLock::take(&dir.path().join("missing")),
            Err(MetaError::Open { .. })
        ));
    }
}
