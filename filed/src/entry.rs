//! The state of one synced path: type, size, mtime (ns), mode, owner, symlink target and content
//! hash; how to read it from the filesystem (stat, blake3) and its byte encoding for the store
//! and the wire.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::codec::{DecodeError, Reader, put_i64, put_opt_str, put_u8, put_u32, put_u64};

/// What a path is. `Deleted` is a tombstone: the path existed and was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Deleted,
}

impl Kind {
    /// The kind of an existing path, from its `lstat` file type.
    pub fn of(ft: std::fs::FileType) -> Kind {
        if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            Kind::File
        }
    }

    fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Deleted => 4,
        }
    }
    fn from_code(v: u8) -> Result<Kind, DecodeError> {
        Ok(match v {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Deleted,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "file kind",
                    value: v.into(),
                });
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Deleted => "deleted",
        }
    }
}

/// The content hash of a regular file (blake3); all zero for other kinds.
pub type Hash = [u8; 32];
pub const NO_HASH: Hash = [0; 32];

/// The state of one path as recorded in the store and sent to peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub kind: Kind,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch; for tombstones the time the deletion was seen.
    pub mtime_ns: i64,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub target: Option<String>,
    pub hash: Hash,
}

impl FileState {
    pub fn deleted(at_ns: i64) -> FileState {
        FileState {
            kind: Kind::Deleted,
            size: 0,
            mtime_ns: at_ns,
            mode: 0,
            uid: 0,
            gid: 0,
            target: None,
            hash: NO_HASH,
        }
    }

    pub fn exists(&self) -> bool {
        self.kind != Kind::Deleted
    }

    /// Same type and content (hash for files, target for symlinks); metadata is not compared.
    pub fn same_content(&self, other: &FileState) -> bool {
        self.kind == other.kind
            && match self.kind {
                Kind::File => self.hash == other.hash && self.size == other.size,
                Kind::Symlink => self.target == other.target,
                Kind::Dir | Kind::Deleted => true,
            }
    }

    /// Same mode, owner and mtime (meaningless for tombstones; symlinks have no mode of their own).
    pub fn same_meta(&self, other: &FileState) -> bool {
        match self.kind {
            Kind::Deleted => true,
            Kind::Symlink => {
                self.uid == other.uid && self.gid == other.gid && self.mtime_ns == other.mtime_ns
            }
            _ => {
                self.mode == other.mode
                    && self.uid == other.uid
                    && self.gid == other.gid
                    && self.mtime_ns == other.mtime_ns
            }
        }
    }

    /// Equal for sync purposes: same content and metadata.
    pub fn same(&self, other: &FileState) -> bool {
        self.same_content(other) && self.same_meta(other)
    }

    /// Builds a state from `lstat` metadata; the hash is left empty (see [`hash_file`]).
    pub fn from_metadata(md: &Metadata, target: Option<String>) -> FileState {
        let kind = Kind::of(md.file_type());
        FileState {
            kind,
            size: if kind == Kind::File { md.size() } else { 0 },
            mtime_ns: md
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(md.mtime_nsec()),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            target,
            hash: NO_HASH,
        }
    }

    pub fn encode(&self, buf: &mut Vec<u8>) {
        put_u8(buf, self.kind.code());
        put_u64(buf, self.size);
        put_i64(buf, self.mtime_ns);
        put_u32(buf, self.mode);
        put_u32(buf, self.uid);
        put_u32(buf, self.gid);
        put_opt_str(buf, self.target.as_deref());
        buf.extend_from_slice(&self.hash);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        self.encode(&mut v);
        v
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<FileState, DecodeError> {
        let kind = Kind::from_code(r.u8()?)?;
        let size = r.u64()?;
        let mtime_ns = r.i64()?;
        let mode = r.u32()?;
        if mode > 0o7777 {
            return Err(DecodeError::Invalid {
                what: "mode",
                value: mode.into(),
            });
        }
        let uid = r.u32()?;
        let gid = r.u32()?;
        let target = r.opt_string("symlink target")?;
        if let Some(at) = target.as_deref().and_then(|t| t.find('\0')) {
            // No path can hold it (a symlink made from it could not exist).
            return Err(DecodeError::Invalid {
                what: "symlink target (NUL byte at)",
                value: at as u64,
            });
        }
        let hash = r.array32()?;
        Ok(FileState {
            kind,
            size,
            mtime_ns,
            mode,
            uid,
            gid,
            target,
            hash,
        })
    }

    pub fn from_bytes(b: &[u8]) -> Result<FileState, DecodeError> {
        let mut r = Reader::new(b);
        let s = FileState::decode(&mut r)?;
        r.finish()?;
        Ok(s)
    }

    pub fn hash_hex(&self) -> String {
        self.hash[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Reads the state of `path` without following a final symlink; `None` when it does not exist.
/// Regular files are hashed only when `hash` is true.
pub fn read_state(path: &Path, hash: bool) -> io::Result<Option<FileState>> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let ft = md.file_type();
    if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
        return Err(not_syncable());
    }
    let target = if md.file_type().is_symlink() {
        let t = std::fs::read_link(path)?;
        Some(t.into_os_string().into_string().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, "symlink target is not UTF-8")
        })?)
    } else {
        None
    };
    let mut st = FileState::from_metadata(&md, target);
    if hash && st.kind == Kind::File {
        st.hash = hash_file(path)?;
    }
    Ok(Some(st))
}

/// blake3 of a file's content, read in a streaming way.
pub fn hash_file(path: &Path) -> io::Result<Hash> {
    let f = open_regular(path)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)?;
    Ok(*h.finalize().as_bytes())
}

/// Opens `path` for reading if it is a regular file. Opened non-blocking and checked before
/// anything is read: a FIFO or a device put in its place never blocks or streams for ever.
pub fn open_regular(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(not_syncable());
    }
    Ok(f)
}

fn not_syncable() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "not a regular file, directory or symlink (a FIFO, socket or device): not synced",
    )
}

/// Now, in nanoseconds since the epoch (for tombstones and conflict records).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn arb_state() -> impl Strategy<Value = FileState> + Clone {
        (
            prop_oneof![
                Just(Kind::File),
                Just(Kind::Dir),
                Just(Kind::Symlink),
                Just(Kind::Deleted)
            ],
            any::<u64>(),
            any::<i64>(),
            0u32..=0o7777,
            any::<u32>(),
            any::<u32>(),
            proptest::option::of("[a-z/.]{0,20}"),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(kind, size, mtime_ns, mode, uid, gid, target, hash)| FileState {
                    kind,
                    size,
                    mtime_ns,
                    mode,
                    uid,
                    gid,
                    target,
                    hash,
                },
            )
    }

    proptest! {
        #[test]
        fn state_round_trip(s in arb_state()) {
            prop_assert_eq!(FileState::from_bytes(&s.to_bytes()).unwrap(), s);
        }

        #[test]
        fn a_symlink_target_with_a_nul_byte_is_refused(at in 0usize..8) {
            let mut s = FileState::from_bytes(&FileState {
                kind: Kind::Symlink,
                size: 0,
                mtime_ns: 1,
                mode: 0o777,
                uid: 0,
                gid: 0,
                target: Some("abcdefgh".into()),
                hash: [0; 32],
            }.to_bytes()).unwrap();
            let mut t = s.target.take().unwrap().into_bytes();
            t[at] = 0;
            s.target = Some(String::from_utf8(t).unwrap());
            prop_assert!(FileState::from_bytes(&s.to_bytes()).is_err());
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = FileState::from_bytes(&b);
        }
    }

    #[test]
    fn reads_file_dir_symlink() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        std::os::unix::fs::symlink("f", d.path().join("l")).unwrap();
        let s = read_state(&f, true).unwrap().unwrap();
        assert_eq!(s.kind, Kind::File);
        assert_eq!(s.size, 5);
        assert_eq!(s.hash, *blake3::hash(b"hello").as_bytes());
        let l = read_state(&d.path().join("l"), true).unwrap().unwrap();
        assert_eq!(l.kind, Kind::Symlink);
        assert_eq!(l.target.as_deref(), Some("f"));
        assert_eq!(read_state(d.path(), true).unwrap().unwrap().kind, Kind::Dir);
        assert!(read_state(&d.path().join("nope"), true).unwrap().is_none());
    }

    #[test]
    fn same_content_ignores_meta() {
        let a = FileState {
            kind: Kind::File,
            size: 1,
            mtime_ns: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: None,
            hash: [1; 32],
        };
        let mut b = a.clone();
        b.mtime_ns = 2;
        assert!(a.same_content(&b));
        assert!(!a.same(&b));
        b.hash = [2; 32];
        assert!(!a.same_content(&b));
    }
}
