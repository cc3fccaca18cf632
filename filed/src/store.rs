//! The state database: per group the recorded state of every path (tombstones for deletions), per
//! peer the last state both sides agreed on, a dirty queue per peer (survives restarts and peer
//! outages), open conflicts and per-peer sync status. A small [`StateStore`] trait with a redb
//! implementation ([`RedbStore`]); all changes go through atomic [`Batch`]es.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec::{DecodeError, Reader, put_i64, put_str};
use crate::entry::FileState;

const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
const AGREED: TableDefinition<&str, &[u8]> = TableDefinition::new("agreed");
const DIRTY: TableDefinition<&str, u8> = TableDefinition::new("dirty");
const CONFLICTS: TableDefinition<&str, &[u8]> = TableDefinition::new("conflicts");
const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("state database {path} is in use by another filed process (waited {waited:?})")]
    Busy { path: PathBuf, waited: Duration },
    #[error("cannot create the directory of state database {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state database transaction failed")]
    Transaction(#[source] redb::TransactionError),
    #[error("state database table failed")]
    Table(#[source] redb::TableError),
    #[error("state database read/write failed")]
    Storage(#[source] redb::StorageError),
    #[error("state database commit failed")]
    Commit(#[source] redb::CommitError),
    #[error("corrupt record in table {table} at key {key:?}")]
    Corrupt {
        table: &'static str,
        key: String,
        #[source]
        source: DecodeError,
    },
    #[error("name {0:?} contains a NUL byte")]
    BadName(String),
}

/// A path waiting to be sent to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirty {
    pub path: String,
    pub force: Force,
}

/// A resolution mark on a dirty entry (`filed force`, `filed resolve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Force {
    #[default]
    None,
    /// This side wins the next conflict on this path.
    Win,
    /// This side loses the next conflict on this path.
    Lose,
}

impl Force {
    pub fn code(self) -> u8 {
        match self {
            Force::None => 0,
            Force::Win => 1,
            Force::Lose => 2,
        }
    }
    pub fn from_code(v: u8) -> Force {
        match v {
            1 => Force::Win,
            2 => Force::Lose,
            _ => Force::None,
        }
    }
}

/// A conflict with a peer, kept until resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub group: String,
    pub peer: String,
    pub path: String,
    pub local: FileState,
    pub remote: FileState,
    pub seen_ns: i64,
}

/// The outcome of the last sync with a peer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerStatus {
    pub last_ok_ns: i64,
    pub last_attempt_ns: i64,
    pub last_error: String,
}

/// One change; a [`Batch`] of them is committed atomically.
#[derive(Debug, Clone)]
pub enum Op {
    SetFile {
        group: String,
        path: String,
        state: FileState,
    },
    RemoveFile {
        group: String,
        path: String,
    },
    SetAgreed {
        group: String,
        peer: String,
        path: String,
        state: FileState,
    },
    RemoveAgreed {
        group: String,
        peer: String,
        path: String,
    },
    /// `force` other than `Force::None` replaces the mark; `None` keeps an existing one.
    MarkDirty {
        group: String,
        peer: String,
        path: String,
        force: Force,
    },
    ClearDirty {
        group: String,
        peer: String,
        path: String,
    },
    SetConflict(Conflict),
    ClearConflict {
        group: String,
        peer: String,
        path: String,
    },
    SetPeerStatus {
        group: String,
        peer: String,
        status: PeerStatus,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// One path's recorded state and the state last agreed with a peer ([`StateStore::lookup`]).
pub type Lookup = (Option<FileState>, Option<FileState>);

/// The state database as the rest of filed sees it.
pub trait StateStore: Send + Sync {
    fn file(&self, group: &str, path: &str) -> Result<Option<FileState>, StoreError>;
    /// All recorded paths of a group (including tombstones), sorted.
    fn files(&self, group: &str) -> Result<Vec<(String, FileState)>, StoreError>;
    /// The recorded paths of a group at or below `root` (including tombstones), sorted.
    fn files_under(&self, group: &str, root: &str) -> Result<Vec<(String, FileState)>, StoreError> {
        Ok(self
            .files(group)?
            .into_iter()
            .filter(|(p, _)| crate::filter::is_under(p, root))
            .collect())
    }
    /// How many paths are queued for `peer` (without listing them).
    fn dirty_len(&self, group: &str, peer: &str) -> Result<usize, StoreError> {
        Ok(self.dirty(group, peer)?.len())
    }
    fn agreed(&self, group: &str, peer: &str, path: &str) -> Result<Option<FileState>, StoreError>;
    fn agreed_all(&self, group: &str, peer: &str) -> Result<Vec<(String, FileState)>, StoreError>;
    /// For each path, in order: its recorded state and (with `peer`) the state last agreed with
    /// that peer — all read in one transaction (a session looks up thousands of paths).
    fn lookup(
        &self,
        group: &str,
        peer: Option<&str>,
        paths: &[&str],
    ) -> Result<Vec<Lookup>, StoreError>;
    fn dirty(&self, group: &str, peer: &str) -> Result<Vec<Dirty>, StoreError>;
    fn conflicts(&self, group: Option<&str>) -> Result<Vec<Conflict>, StoreError>;
    fn peer_status(&self, group: &str, peer: &str) -> Result<PeerStatus, StoreError>;
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;
}

fn key2(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
}
fn key3(a: &str, b: &str, c: &str) -> String {
    format!("{a}\0{b}\0{c}")
}

/// The redb implementation.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl RedbStore {
    /// Opens (or creates) the database; waits up to `lock_timeout` while another process has it open.
    pub fn open(path: &Path, lock_timeout: Duration) -> Result<RedbStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: path.into(),
                source,
            })?;
        }
        let start = Instant::now();
        loop {
            match Database::create(path) {
                Ok(db) => {
                    let store = RedbStore {
                        db,
                        path: path.into(),
                    };
                    store.init()?;
                    return Ok(store);
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    if start.elapsed() >= lock_timeout {
                        return Err(StoreError::Busy {
                            path: path.into(),
                            waited: start.elapsed(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.into(),
                        source,
                    });
                }
            }
        }
    }

    /// Tries once; `Ok(None)` when another process holds the database.
    pub fn try_open(path: &Path) -> Result<Option<RedbStore>, StoreError> {
        match RedbStore::open(path, Duration::ZERO) {
            Ok(s) => Ok(Some(s)),
            Err(StoreError::Busy { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(StoreError::Transaction)?;
        {
            tx.open_table(FILES).map_err(StoreError::Table)?;
            tx.open_table(AGREED).map_err(StoreError::Table)?;
            tx.open_table(DIRTY).map_err(StoreError::Table)?;
            tx.open_table(CONFLICTS).map_err(StoreError::Table)?;
            tx.open_table(PEERS).map_err(StoreError::Table)?;
        }
        tx.commit().map_err(StoreError::Commit)
    }

    fn get_state(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &'static str,
        key: &str,
    ) -> Result<Option<FileState>, StoreError> {
        let tx = self.db.begin_read().map_err(StoreError::Transaction)?;
        let t = tx.open_table(table).map_err(StoreError::Table)?;
        match t.get(key).map_err(StoreError::Storage)? {
            None => Ok(None),
            Some(v) => FileState::from_bytes(v.value())
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    table: name,
                    key: key.replace('\0', "/"),
                    source,
                }),
        }
    }

    fn decode_state(
        name: &'static str,
        key: &str,
        v: Option<redb::AccessGuard<'_, &[u8]>>,
    ) -> Result<Option<FileState>, StoreError> {
        match v {
            None => Ok(None),
            Some(v) => FileState::from_bytes(v.value())
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    table: name,
                    key: key.replace('\0', "/"),
                    source,
                }),
        }
    }

    fn scan_states(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &'static str,
        prefix: &str,
        start: Option<&str>,
    ) -> Result<Vec<(String, FileState)>, StoreError> {
        let tx = self.db.begin_read().map_err(StoreError::Transaction)?;
        let t = tx.open_table(table).map_err(StoreError::Table)?;
        let mut out = Vec::new();
        // Keys from `prefix + start` on, while they still start with it.
        let from = format!("{prefix}{}", start.unwrap_or(""));
        for item in t.range(from.as_str()..).map_err(StoreError::Storage)? {
            let (k, v) = item.map_err(StoreError::Storage)?;
            if !k.value().starts_with(from.as_str()) {
                break;
            }
            let Some(rest) = k.value().strip_prefix(prefix) else {
                break;
            };
            let st = FileState::from_bytes(v.value()).map_err(|source| StoreError::Corrupt {
                table: name,
                key: k.value().replace('\0', "/"),
                source,
            })?;
            out.push((rest.to_string(), st));
        }
        Ok(out)
    }
}

fn check_names(names: &[&str]) -> Result<(), StoreError> {
    for n in names {
        if n.contains('\0') {
            return Err(StoreError::BadName(n.to_string()));
        }
    }
    Ok(())
}

fn encode_conflict(c: &Conflict) -> Vec<u8> {
    let mut b = Vec::new();
    c.local.encode(&mut b);
    c.remote.encode(&mut b);
    put_i64(&mut b, c.seen_ns);
    b
}

fn decode_conflict(group: &str, peer: &str, path: &str, v: &[u8]) -> Result<Conflict, DecodeError> {
    let mut r = Reader::new(v);
    let local = FileState::decode(&mut r)?;
    let remote = FileState::decode(&mut r)?;
    let seen_ns = r.i64()?;
    r.finish()?;
    Ok(Conflict {
        group: group.into(),
        peer: peer.into(),
        path: path.into(),
        local,
        remote,
        seen_ns,
    })
}

fn encode_status(s: &PeerStatus) -> Vec<u8> {
    let mut b = Vec::new();
    put_i64(&mut b, s.last_ok_ns);
    put_i64(&mut b, s.last_attempt_ns);
    put_str(&mut b, &s.last_error);
    b
}

fn decode_status(v: &[u8]) -> Result<PeerStatus, DecodeError> {
    let mut r = Reader::new(v);
    let s = PeerStatus {
        last_ok_ns: r.i64()?,
        last_attempt_ns: r.i64()?,
        last_error: r.string("error")?,
    };
    r.finish()?;
    Ok(s)
}

impl StateStore for RedbStore {
    fn file(&self, group: &str, path: &str) -> Result<Option<FileState>, StoreError> {
        self.get_state(FILES, "files", &key2(group, path))
    }

    fn files(&self, group: &str) -> Result<Vec<(String, FileState)>, StoreError> {
        self.scan_states(FILES, "files", &format!("{group}\0"), None)
    }

    fn files_under(&self, group: &str, root: &str) -> Result<Vec<(String, FileState)>, StoreError> {
        // Keys sort as "group\0path": every path under `root` starts with "group\0root".
        Ok(self
            .scan_states(FILES, "files", &format!("{group}\0"), Some(root))?
            .into_iter()
            .filter(|(p, _)| crate::filter::is_under(p, root))
            .collect())
    }

    fn dirty_len(&self, group: &str, peer: &str) -> Result<usize, StoreError> {
        let prefix = format!("{group}\0{peer}\0");
        let tx = self.db.begin_read().map_err(StoreError::Transaction)?;
        let t = tx.open_table(DIRTY).map_err(StoreError::Table)?;
        let mut n = 0;
        for item in t.range(prefix.as_str()..).map_err(StoreError::Storage)? {
            let (k, _) = item.map_err(StoreError::Storage)?;
            if !k.value().starts_with(prefix.as_str()) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn agreed(&self, group: &str, peer: &str, path: &str) -> Result<Option<FileState>, StoreError> {
        self.get_state(AGREED, "agreed", &key3(group, peer, path))
    }

    fn agreed_all(&self, group: &str, peer: &str) -> Result<Vec<(String, FileState)>, StoreError> {
        self.scan_states(AGREED, "agreed", &format!("{group}\0{peer}\0"), None)
    }

    fn lookup(
        &self,
        group: &str,
        peer: Option<&str>,
        paths: &[&str],
    ) -> Result<Vec<Lookup>, StoreError> {
        let tx = self.db.begin_read().map_err(StoreError::Transaction)?;
        let files = tx.open_table(FILES).map_err(StoreError::Table)?;
        let agreed = match peer {
            Some(_) => Some(tx.open_table(AGREED).map_err(StoreError::Table)?),
            None => None,
        };
        let mut out = Vec::with_capacity(paths.len());
        for path in paths {
            let k = key2(group, path);
            let file = Self::decode_state(
                "files",
                &k,
                files.get(k.as_str()).map_err(StoreError::Storage)?,
            )?;
            let base = match (&agreed, peer) {
                (Some(t), Some(peer)) => {
                    let k = key3(group, peer, path);
                    Self::decode_state(
                        "agreed",
                        &k,
                        t.get(k.as_str()).map_err(StoreError::Storage)?,
                    )?
                }
                _ => None,
            };
            out.push((file, base));
        }
        Ok(out)
    }

    fn dirty(&self, group: &str, peer: &str) -> Result<Vec<Dirty>, StoreError> {
        let prefix = format!("{group}\0{peer}\0");
        let tx = self.db.begin_read().map_err(StoreError::Transaction)?;
        let t = tx.open_table(DIRTY).map_err(StoreError::Table)?;
        let mut out = Vec::new();
        for item in t.range(prefix.as_str()..).map_err(StoreError::Storage)? {
            let (k, v) = item.map_err(StoreError::Storage)?;
            let Some(rest) = k.value().strip_prefix(prefix.as_str()) else {
                break;
            };
            out.push(Dirty {
                path: rest.to_string(),
                force: Force::from_code(v.value()),
            });
        }
        Ok(out)
    }

    fn conflicts(&self, group: Option<&str>) -> Result<Vec<Conflict>, StoreError> {
        let prefix = group.map(|g| format!("{g}\0")).unwrap_or_default();
        let tx = self.db.begin_read().map_err(StoreError::Transaction)?;
        let t = tx.open_table(CONFLICTS).map_err(StoreError::Table)?;
        let mut out = Vec::new();
        for item in t.range(prefix.as_str()..).map_err(StoreError::Storage)? {
            let (k, v) = item.map_err(StoreError::Storage)?;
            let key = k.value();
            if !key.starts_with(prefix.as_str()) {
                break;
            }
            let mut parts = key.splitn(3, '\0');
            let (g, p, path) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            let c =
                decode_conflict(g, p, path, v.value()).map_err(|source| StoreError::Corrupt {
                    table: "conflicts",
                    key: key.replace('\0', "/"),
                    source,
                })?;
            out.push(c);
        }
        Ok(out)
    }

    fn peer_status(&self, group: &str, peer: &str) -> Result<PeerStatus, StoreError> {
        let key = key2(group, peer);
        let tx = self.db.begin_read().map_err(StoreError::Transaction)?;
        let t = tx.open_table(PEERS).map_err(StoreError::Table)?;
        match t.get(key.as_str()).map_err(StoreError::Storage)? {
            None => Ok(PeerStatus::default()),
            Some(v) => decode_status(v.value()).map_err(|source| StoreError::Corrupt {
                table: "peers",
                key: key.replace('\0', "/"),
                source,
            }),
        }
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(StoreError::Transaction)?;
        {
            let mut files = tx.open_table(FILES).map_err(StoreError::Table)?;
            let mut agreed = tx.open_table(AGREED).map_err(StoreError::Table)?;
            let mut dirty = tx.open_table(DIRTY).map_err(StoreError::Table)?;
            let mut conflicts = tx.open_table(CONFLICTS).map_err(StoreError::Table)?;
            let mut peers = tx.open_table(PEERS).map_err(StoreError::Table)?;
            for op in &batch.ops {
                match op {
                    Op::SetFile { group, path, state } => {
                        check_names(&[group, path])?;
                        files
                            .insert(key2(group, path).as_str(), state.to_bytes().as_slice())
                            .map_err(StoreError::Storage)?;
                    }
                    Op::RemoveFile { group, path } => {
                        files
                            .remove(key2(group, path).as_str())
                            .map_err(StoreError::Storage)?;
                    }
                    Op::SetAgreed {
                        group,
                        peer,
                        path,
                        state,
                    } => {
                        check_names(&[group, peer, path])?;
                        agreed
                            .insert(
                                key3(group, peer, path).as_str(),
                                state.to_bytes().as_slice(),
                            )
                            .map_err(StoreError::Storage)?;
                    }
                    Op::RemoveAgreed { group, peer, path } => {
                        agreed
                            .remove(key3(group, peer, path).as_str())
                            .map_err(StoreError::Storage)?;
                    }
                    Op::MarkDirty {
                        group,
                        peer,
                        path,
                        force,
                    } => {
                        check_names(&[group, peer, path])?;
                        let k = key3(group, peer, path);
                        let old = dirty
                            .get(k.as_str())
                            .map_err(StoreError::Storage)?
                            .map(|v| v.value())
                            .unwrap_or(0);
                        let new = if *force == Force::None {
                            old
                        } else {
                            force.code()
                        };
                        dirty.insert(k.as_str(), new).map_err(StoreError::Storage)?;
                    }
                    Op::ClearDirty { group, peer, path } => {
                        dirty
                            .remove(key3(group, peer, path).as_str())
                            .map_err(StoreError::Storage)?;
                    }
                    Op::SetConflict(c) => {
                        check_names(&[&c.group, &c.peer, &c.path])?;
                        conflicts
                            .insert(
                                key3(&c.group, &c.peer, &c.path).as_str(),
                                encode_conflict(c).as_slice(),
                            )
                            .map_err(StoreError::Storage)?;
                    }
                    Op::ClearConflict { group, peer, path } => {
                        conflicts
                            .remove(key3(group, peer, path).as_str())
                            .map_err(StoreError::Storage)?;
                    }
                    Op::SetPeerStatus {
                        group,
                        peer,
                        status,
                    } => {
                        check_names(&[group, peer])?;
                        peers
                            .insert(key2(group, peer).as_str(), encode_status(status).as_slice())
                            .map_err(StoreError::Storage)?;
                    }
                }
            }
        }
        tx.commit().map_err(StoreError::Commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Kind;

    fn st(n: u8) -> FileState {
        FileState {
            kind: Kind::File,
            size: n.into(),
            mtime_ns: n.into(),
            mode: 0o644,
            uid: 1,
            gid: 2,
            target: None,
            hash: [n; 32],
        }
    }

    #[test]
    fn round_trip_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/state.redb");
        {
            let s = RedbStore::open(&p, Duration::ZERO).unwrap();
            let mut b = Batch::new();
            b.push(Op::SetFile {
                group: "g".into(),
                path: "/a".into(),
                state: st(1),
            });
            b.push(Op::SetFile {
                group: "g".into(),
                path: "/b".into(),
                state: FileState::deleted(5),
            });
            b.push(Op::SetFile {
                group: "g2".into(),
                path: "/a".into(),
                state: st(9),
            });
            b.push(Op::SetAgreed {
                group: "g".into(),
                peer: "p".into(),
                path: "/a".into(),
                state: st(1),
            });
            b.push(Op::MarkDirty {
                group: "g".into(),
                peer: "p".into(),
                path: "/a".into(),
                force: Force::None,
            });
            b.push(Op::MarkDirty {
                group: "g".into(),
                peer: "q".into(),
                path: "/b".into(),
                force: Force::Win,
            });
            b.push(Op::MarkDirty {
                group: "g".into(),
                peer: "q".into(),
                path: "/b".into(),
                force: Force::None,
            });
            b.push(Op::SetConflict(Conflict {
                group: "g".into(),
                peer: "p".into(),
                path: "/c".into(),
                local: st(3),
                remote: st(4),
                seen_ns: 7,
            }));
            b.push(Op::SetPeerStatus {
                group: "g".into(),
                peer: "p".into(),
                status: PeerStatus {
                    last_ok_ns: 1,
                    last_attempt_ns: 2,
                    last_error: "x".into(),
                },
            });
            s.commit(b).unwrap();
            // a second open while the first is held is refused quickly
            assert!(RedbStore::try_open(&p).unwrap().is_none());
        }
        let s = RedbStore::open(&p, Duration::ZERO).unwrap();
        assert_eq!(s.file("g", "/a").unwrap(), Some(st(1)));
        assert_eq!(s.files("g").unwrap().len(), 2);
        assert_eq!(s.files("g2").unwrap(), vec![("/a".to_string(), st(9))]);
        assert_eq!(s.agreed("g", "p", "/a").unwrap(), Some(st(1)));
        assert_eq!(s.agreed_all("g", "p").unwrap().len(), 1);
        assert_eq!(
            s.dirty("g", "p").unwrap(),
            vec![Dirty {
                path: "/a".into(),
                force: Force::None
            }]
        );
        assert_eq!(
            s.dirty("g", "q").unwrap(),
            vec![Dirty {
                path: "/b".into(),
                force: Force::Win
            }],
            "force is sticky"
        );
        assert_eq!(s.conflicts(Some("g")).unwrap()[0].remote, st(4));
        assert_eq!(s.conflicts(None).unwrap().len(), 1);
        assert!(s.conflicts(Some("g2")).unwrap().is_empty());
        assert_eq!(s.peer_status("g", "p").unwrap().last_error, "x");
        let mut b = Batch::new();
        b.push(Op::ClearDirty {
            group: "g".into(),
            peer: "p".into(),
            path: "/a".into(),
        });
        b.push(Op::ClearConflict {
            group: "g".into(),
            peer: "p".into(),
            path: "/c".into(),
        });
        b.push(Op::RemoveFile {
            group: "g".into(),
            path: "/a".into(),
        });
        s.commit(b).unwrap();
        assert!(s.dirty("g", "p").unwrap().is_empty());
        assert!(s.conflicts(None).unwrap().is_empty());
        assert!(s.file("g", "/a").unwrap().is_none());
    }

    #[test]
    fn nul_in_names_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&d.path().join("s.redb"), Duration::ZERO).unwrap();
        let mut b = Batch::new();
        b.push(Op::SetFile {
            group: "g".into(),
            path: "/a\0b".into(),
            state: st(1),
        });
        assert!(matches!(s.commit(b), Err(StoreError::BadName(_))));
    }
}
