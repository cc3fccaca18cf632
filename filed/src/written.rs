//! What filed itself wrote while applying a peer's changes, so the watcher can tell its own writes
//! from a user's (no sync loops). A write is identified by what it left on disk — device, inode,
//! size, mtime (ns), mode and owner — captured from the written file itself before it was renamed
//! into place; the content hash of the write is what the state database records for the path. No
//! time window is involved: a user edit made at the same moment changes the identity (new inode,
//! or new size or mtime) and is treated as a change, and one that keeps all of them is caught by
//! the hash check. A `chmod`/`chown` right after filed's write changes only the mode or owner
//! (and the ctime): it is a change too, not filed's own write.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The identity of one version of a path on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    /// Permission bits (`mode & 0o7777`), as [`crate::entry::FileState`] records them.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl FileId {
    pub fn from_stat(st: &libc::stat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st
                .st_mtime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }

    pub fn from_metadata(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }
    }

    /// The identity of what is at `path` now (not following a symlink); `None` when nothing is.
    pub fn of_path(path: &Path) -> std::io::Result<Option<FileId>> {
        match std::fs::symlink_metadata(path) {
            Ok(m) => Ok(Some(FileId::from_metadata(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What an event on a path means, given what filed wrote there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The path is exactly what filed wrote: its own write, nothing to do.
    Own,
    /// filed wrote the path, but something else changed it since (content, inode, mode or
    /// owner): a local change; hash it even when size and mtime look the same.
    ChangedSince,
    /// filed did not write the path (recently): an ordinary local change to check.
    NotOurs,
}

/// Writes not yet matched with their watch event, per (group, logical path).
#[derive(Debug)]
pub struct WrittenLog {
    map: HashMap<(String, String), FileId>,
    cap: usize,
}

impl WrittenLog {
    /// `cap` bounds memory when events are lost (overflow): past it the log is emptied, which only
    /// costs a stat-and-compare against the state database per later event.
    pub fn new(cap: usize) -> WrittenLog {
        WrittenLog {
            map: HashMap::new(),
            cap,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn record(&mut self, group: &str, path: &str, id: FileId) {
        if self.map.len() >= self.cap {
            self.map.clear();
        }
        self.map.insert((group.to_string(), path.to_string()), id);
    }

    /// Judges an event on `path` whose current identity is `now` (`None`: nothing there). The
    /// entry is consumed unless the path is exactly what was written (several events may follow
    /// one write: create, attribute change, rename into place).
    pub fn check(&mut self, group: &str, path: &str, now: Option<FileId>) -> Verdict {
        let key = (group.to_string(), path.to_string());
        match (self.map.get(&key), now) {
            (None, _) => Verdict::NotOurs,
            (Some(w), Some(n)) if *w == n => Verdict::Own,
            (Some(_), _) => {
                self.map.remove(&key);
                Verdict::ChangedSince
            }
        }
    }

    /// Forgets a group's entries (after a rescan of it).
    pub fn clear_group(&mut self, group: &str) {
        self.map.retain(|(g, _), _| g != group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64, size: u64, mtime_ns: i64) -> FileId {
        FileId {
            dev: 1,
            ino,
            size,
            mtime_ns,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
        }
    }

    #[test]
    fn own_write_is_recognised_every_time_until_it_changes() {
        let mut w = WrittenLog::new(10);
        w.record("g", "/f", id(5, 10, 100));
        assert_eq!(w.check("g", "/f", Some(id(5, 10, 100))), Verdict::Own);
        assert_eq!(w.check("g", "/f", Some(id(5, 10, 100))), Verdict::Own);
        assert_eq!(w.check("h", "/f", Some(id(5, 10, 100))), Verdict::NotOurs);
        // a user edit right after: same inode and size, new mtime
        assert_eq!(
            w.check("g", "/f", Some(id(5, 10, 101))),
            Verdict::ChangedSince
        );
        assert_eq!(w.check("g", "/f", Some(id(5, 10, 100))), Verdict::NotOurs);
    }

    #[test]
    fn replaced_or_removed_is_a_change() {
        let mut w = WrittenLog::new(10);
        w.record("g", "/f", id(5, 10, 100));
        // same size and mtime but another inode (a user's `cp -p` or editor rename)
        assert_eq!(
            w.check("g", "/f", Some(id(6, 10, 100))),
            Verdict::ChangedSince
        );
        w.record("g", "/f", id(5, 10, 100));
        assert_eq!(w.check("g", "/f", None), Verdict::ChangedSince);
    }

    #[test]
    fn chmod_or_chown_after_the_write_is_a_change() {
        let mut w = WrittenLog::new(10);
        w.record("g", "/f", id(5, 10, 100));
        // chmod: same inode, size and mtime
        let chmod = FileId {
            mode: 0o600,
            ..id(5, 10, 100)
        };
        assert_eq!(w.check("g", "/f", Some(chmod)), Verdict::ChangedSince);
        w.record("g", "/f", id(5, 10, 100));
        let chown = FileId {
            uid: 33,
            ..id(5, 10, 100)
        };
        assert_eq!(w.check("g", "/f", Some(chown)), Verdict::ChangedSince);
        w.record("g", "/f", id(5, 10, 100));
        let chgrp = FileId {
            gid: 33,
            ..id(5, 10, 100)
        };
        assert_eq!(w.check("g", "/f", Some(chgrp)), Verdict::ChangedSince);
    }

    #[test]
    fn bounded() {
        let mut w = WrittenLog::new(2);
        w.record("g", "/a", id(1, 1, 1));
        w.record("g", "/b", id(2, 1, 1));
        w.record("g", "/c", id(3, 1, 1));
        assert!(w.len() <= 2);
        w.clear_group("g");
        assert!(w.is_empty());
    }

    #[test]
    fn identity_of_a_real_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        assert_eq!(FileId::of_path(&p).unwrap(), None);
        std::fs::write(&p, b"abc").unwrap();
        let a = FileId::of_path(&p).unwrap().unwrap();
        assert_eq!(a.size, 3);
        assert_eq!(a, FileId::of_path(&p).unwrap().unwrap());
        use std::os::unix::fs::PermissionsExt;
        let mode = a.mode ^ 0o070;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let b = FileId::of_path(&p).unwrap().unwrap();
        assert_eq!(b, FileId { mode, ..a }, "a chmod changes the mode only");
    }
}
