//! The copy-on-write area file of one snapshot: created beside the metadata, appended to before
//! a replicated write overwrites a frozen block, read back by the snapshot's readers, closed
//! cleanly on shutdown and reopened after a restart — or refused with a clear reason when it
//! cannot be trusted (left open by a crash, corrupt, or from another device).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cow_index::{CowFull, CowIndex, RestoreError};
use super::cow_record::{
    self, AreaHeader, AreaState, BLOCK_HEADER_SIZE, CowRecordError, HEADER_SIZE,
};

/// Why an area could not be created, written, read or reopened.
#[derive(Debug, thiserror::Error)]
pub enum AreaError {
    #[error("cannot create snapshot area {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open snapshot area {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot area {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: CowRecordError,
    },
    #[error("snapshot area {path}: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: RestoreError,
    },
    #[error(
        "snapshot area {path} was not closed cleanly (the node stopped while snapshot {name:?} was open); its contents cannot be trusted"
    )]
    Unclean { path: PathBuf, name: String },
    #[error("snapshot area {path} belongs to a device of {found} bytes, this one has {expected}")]
    WrongDevice {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("snapshot {name:?}: {source}")]
    Full {
        name: String,
        #[source]
        source: CowFull,
    },
    #[error("cannot write snapshot area {path} at offset {offset}")]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read snapshot area {path} at offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot area {path}: cannot preserve that run: {reason}")]
    BadRun { path: PathBuf, reason: String },
    #[error("cannot sync snapshot area {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open copy-on-write area and its index.
#[derive(Debug)]
pub struct CowArea {
    path: PathBuf,
    file: Arc<File>,
    header: AreaHeader,
    index: CowIndex,
    /// Reused buffer of the records being appended.
    scratch: Vec<u8>,
}

/// Reads preserved blocks of an area (see [`CowArea::reader`]).
#[derive(Clone, Debug)]
pub struct AreaReader {
    path: PathBuf,
    file: Arc<File>,
    block_size: u32,
}

impl AreaReader {
    /// The preserved contents of the block in `slot`, checked against their CRC.
    pub fn read_block(&self, slot: u64) -> Result<Vec<u8>, AreaError> {
        let mut rec = vec![0u8; cow_record::record_len(self.block_size)];
        read_exact_at(
            &self.file,
            &self.path,
            &mut rec,
            cow_record::record_offset(slot, self.block_size),
        )?;
        cow_record::decode_block_record(&rec, slot, self.block_size).map_err(|source| {
            AreaError::Record {
                path: self.path.clone(),
                source,
            }
        })?;
        rec.drain(..BLOCK_HEADER_SIZE);
        Ok(rec)
    }
}

impl CowArea {
    /// Creates a new area (the file must not exist) in state Open, synced.
    pub fn create(path: &Path, header: AreaHeader) -> Result<CowArea, AreaError> {
        let header = AreaHeader {
            state: AreaState::Open,
            preserved_blocks: 0,
            ..header
        };
        let buf = cow_record::encode_header(&header).map_err(|source| AreaError::Record {
            path: path.to_owned(),
            source,
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| AreaError::Create {
                path: path.to_owned(),
                source,
            })?;
        let area = CowArea {
            path: path.to_owned(),
            index: CowIndex::new(
                header.block_size,
                header.capacity_blocks,
                header.device_size,
            ),
            file: Arc::new(file),
            header,
            scratch: Vec::new(),
        };
        area.write_at(&buf, 0)?;
        area.sync()?;
        Ok(area)
    }

    /// Reopens an area closed cleanly by [`close`](Self::close), checks every record and marks it
    /// Open again. An area left Open (a crash) is refused: blocks overwritten after their last
    /// preserved record reached the disk would read back wrong.
    pub fn reopen(path: &Path, device_size: u64) -> Result<CowArea, AreaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| AreaError::Open {
                path: path.to_owned(),
                source,
            })?;
        let mut buf = vec![0u8; HEADER_SIZE];
        read_exact_at(&file, path, &mut buf, 0)?;
        let header = cow_record::decode_header(&buf).map_err(|source| AreaError::Record {
            path: path.to_owned(),
            source,
        })?;
        if header.state != AreaState::Closed {
            return Err(AreaError::Unclean {
                path: path.to_owned(),
                name: header.name,
            });
        }
        if header.device_size != device_size {
            return Err(AreaError::WrongDevice {
                path: path.to_owned(),
                found: header.device_size,
                expected: device_size,
            });
        }
        let mut index = CowIndex::new(header.block_size, header.capacity_blocks, device_size);
        let mut rec = vec![0u8; cow_record::record_len(header.block_size)];
        for slot in 0..header.preserved_blocks {
            let offset = cow_record::record_offset(slot, header.block_size);
            read_exact_at(&file, path, &mut rec, offset)?;
            let block = cow_record::decode_block_record(&rec, slot, header.block_size).map_err(
                |source| AreaError::Record {
                    path: path.to_owned(),
                    source,
                },
            )?;
            index
                .restore(slot, block)
                .map_err(|source| AreaError::Index {
                    path: path.to_owned(),
                    source,
                })?;
        }
        let mut area = CowArea {
            path: path.to_owned(),
            file: Arc::new(file),
            header,
            index,
            scratch: Vec::new(),
        };
        area.write_header(AreaState::Open)?;
        Ok(area)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &AreaHeader {
        &self.header
    }

    pub fn index(&self) -> &CowIndex {
        &self.index
    }

    /// Bytes of the area used by preserved blocks (headers included).
    pub fn used_bytes(&self) -> u64 {
        self.index.used() * cow_record::record_len(self.header.block_size) as u64
    }

    /// The blocks a write at `offset..offset+len` must preserve first, or `Full`.
    pub fn to_preserve(&self, offset: u64, len: u64) -> Result<Vec<u64>, AreaError> {
        self.index
            .to_preserve(offset, len)
            .map_err(|source| AreaError::Full {
                name: self.header.name.clone(),
                source,
            })
    }

    /// Appends `data` (the block's contents at the freeze, [`CowIndex::block_len`] bytes) as
    /// the preserved copy of `block`; returns its slot. See [`preserve_run`](Self::preserve_run).
    pub fn preserve(&mut self, block: u64, data: &[u8]) -> Result<u64, AreaError> {
        let slot = self.index.used();
        self.preserve_run(&[block], block * self.index.block_size(), data)?;
        Ok(slot)
    }

    /// Appends the contents at the freeze of `blocks` (strictly ascending, none preserved yet)
    /// to consecutive slots with one write; `old` holds the device's bytes from offset `start`
    /// and covers every block. The area is left unchanged on error, and a full area refuses
    /// the whole run. Not synced: an area is trusted after a restart only if [`close`]
    /// (Self::close) synced it, so a crash makes it untrusted anyway.
    pub fn preserve_run(
        &mut self,
        blocks: &[u64],
        start: u64,
        old: &[u8],
    ) -> Result<(), AreaError> {
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else {
            return Ok(());
        };
        let bs = self.index.block_size();
        let bad = |reason: String| {
            Err(AreaError::BadRun {
                path: self.path.clone(),
                reason,
            })
        };
        if !blocks.windows(2).all(|w| w[0] < w[1]) {
            return bad(format!("blocks {blocks:?} are not strictly ascending"));
        }
        if first * bs < start || last * bs + self.index.block_len(last) > start + old.len() as u64 {
            return bad(format!(
                "{} bytes at {start} do not cover blocks {first}..={last}",
                old.len()
            ));
        }
        if let Some(&b) = blocks.iter().find(|&&b| self.index.slot_of(b).is_some()) {
            return bad(format!("block {b} is preserved already"));
        }
        let free = self.index.capacity() - self.index.used();
        if blocks.len() as u64 > free {
            return Err(AreaError::Full {
                name: self.header.name.clone(),
                source: CowFull {
                    needed: blocks.len() as u64,
                    free,
                    capacity: self.index.capacity(),
                },
            });
        }
        let rec_len = cow_record::record_len(self.header.block_size);
        let first_slot = self.index.used();
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(blocks.len() * rec_len, 0);
        for (i, (&block, rec)) in blocks.iter().zip(buf.chunks_exact_mut(rec_len)).enumerate() {
            let at = (block * bs - start) as usize;
            let n = self.index.block_len(block) as usize;
            let (head, data) = rec.split_at_mut(BLOCK_HEADER_SIZE);
            data[..n].copy_from_slice(&old[at..at + n]);
            head.copy_from_slice(&cow_record::encode_block_header(
                first_slot + i as u64,
                block,
                data,
            ));
        }
        let written = self.write_at(
            &buf,
            cow_record::record_offset(first_slot, self.header.block_size),
        );
        self.scratch = buf;
        written?;
        for &block in blocks {
            let slot = self.index.insert(block);
            debug_assert!(slot.is_some(), "checked above");
        }
        Ok(())
    }

    /// A handle that reads preserved blocks without borrowing the area (records never change
    /// once written, so readers need no lock while they read them).
    pub fn reader(&self) -> AreaReader {
        AreaReader {
            path: self.path.clone(),
            file: self.file.clone(),
            block_size: self.header.block_size,
        }
    }

    /// The preserved contents of the block in `slot`, checked against their CRC.
    pub fn read_block(&self, slot: u64) -> Result<Vec<u8>, AreaError> {
        self.reader().read_block(slot)
    }

    /// Syncs every record and marks the area Closed, so a restart can reopen it.
    pub fn close(mut self) -> Result<(), AreaError> {
        self.sync()?;
        self.write_header(AreaState::Closed)
    }

    fn write_header(&mut self, state: AreaState) -> Result<(), AreaError> {
        self.header.state = state;
        self.header.preserved_blocks = self.index.used();
        let buf = cow_record::encode_header(&self.header).map_err(|source| AreaError::Record {
            path: self.path.clone(),
            source,
        })?;
        self.write_at(&buf, 0)?;
        self.sync()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), AreaError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| AreaError::Write {
                path: self.path.clone(),
                offset,
                source,
            })
    }

    fn sync(&self) -> Result<(), AreaError> {
        self.file.sync_data().map_err(|source| AreaError::Sync {
            path: self.path.clone(),
            source,
        })
    }
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), AreaError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| AreaError::Read {
            path: path.to_owned(),
            offset,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cap: u64) -> AreaHeader {
        AreaHeader {
            state: AreaState::Open,
            block_size: 4096,
            device_size: 1 << 20,
            capacity_blocks: cap,
            created_unix_ms: 1,
            generation: 42,
            preserved_blocks: 0,
            name: "nightly".into(),
            listen: String::new(),
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("blockd-area-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("area")
    }

    #[test]
    fn preserved_blocks_survive_a_clean_close() {
        let path = tmp("clean");
        let mut a = CowArea::create(&path, header(4)).unwrap();
        assert_eq!(a.to_preserve(0, 8192).unwrap(), vec![0, 1]);
        assert_eq!(a.preserve(1, &[1u8; 4096]).unwrap(), 0);
        assert_eq!(a.preserve(0, &[2u8; 4096]).unwrap(), 1);
        assert!(a.preserve(0, &[3u8; 4096]).is_err());
        assert_eq!(a.used_bytes(), 2 * (4096 + 64));
        a.close().unwrap();
        let b = CowArea::reopen(&path, 1 << 20).unwrap();
        assert_eq!(b.index().slot_of(1), Some(0));
        assert_eq!(b.read_block(1).unwrap(), vec![2u8; 4096]);
        assert_eq!(b.read_block(0).unwrap(), vec![1u8; 4096]);
        assert_eq!(b.header().generation, 42);
        assert!(
            CowArea::create(&path, header(4)).is_err(),
            "never overwrites"
        );
    }

    #[test]
    fn an_area_left_open_is_refused_after_a_restart() {
        let path = tmp("unclean");
        let mut a = CowArea::create(&path, header(4)).unwrap();
        a.preserve(3, &[9u8; 4096]).unwrap();
        drop(a);
        let e = CowArea::reopen(&path, 1 << 20).unwrap_err();
        assert!(matches!(e, AreaError::Unclean { .. }), "{e}");
        assert!(e.to_string().contains("not closed cleanly"));
    }

    #[test]
    fn corruption_and_foreign_devices_are_refused() {
        let path = tmp("corrupt");
        let mut a = CowArea::create(&path, header(4)).unwrap();
        a.preserve(3, &[9u8; 4096]).unwrap();
        a.close().unwrap();
        assert!(matches!(
            CowArea::reopen(&path, 2 << 20),
            Err(AreaError::WrongDevice { .. })
        ));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], HEADER_SIZE as u64 + 100).unwrap();
        let e = CowArea::reopen(&path, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("data CRC-32"), "{e}");
    }

    #[test]
    fn a_full_area_says_so() {
        let path = tmp("full");
        let mut a = CowArea::create(&path, header(1)).unwrap();
        a.preserve(0, &[0u8; 4096]).unwrap();
        let e = a.to_preserve(4096, 8192).unwrap_err();
        assert!(e.to_string().contains("snapshot \"nightly\""), "{e}");
        assert!(e.to_string().contains("area is full") || format!("{:?}", e).contains("CowFull"));
    }

    #[test]
    fn a_run_is_appended_whole_or_not_at_all() {
        let path = tmp("run");
        let mut h = header(3);
        h.device_size = 3 * 4096 + 100;
        let mut a = CowArea::create(&path, h).unwrap();
        let old: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 253) as u8).collect();
        // Blocks 1 and 3 (the short last one) from the bytes at 4096.., one write.
        a.preserve_run(&[1, 3], 4096, &old[4096..]).unwrap();
        assert_eq!(a.index().slot_of(1), Some(0));
        assert_eq!(a.index().slot_of(3), Some(1));
        for bad in [
            a.preserve_run(&[2, 2], 8192, &old[8192..]),
            a.preserve_run(&[2], 8192, &old[8192..9000]),
            a.preserve_run(&[0, 1], 0, &old),
            a.preserve_run(&[0, 2], 4096, &old[4096..]),
        ] {
            assert!(matches!(bad, Err(AreaError::BadRun { .. })), "{bad:?}");
        }
        assert_eq!(a.index().used(), 2, "refused runs change nothing");
        a.preserve_run(&[], 0, &[]).unwrap();
        a.close().unwrap();
        let mut b = CowArea::reopen(&path, 3 * 4096 + 100).unwrap();
        assert_eq!(b.read_block(0).unwrap(), old[4096..8192]);
        let mut last = old[3 * 4096..].to_vec();
        last.resize(4096, 0);
        assert_eq!(b.read_block(1).unwrap(), last);
        let e = b.preserve_run(&[0, 2], 0, &old[..]).unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        assert_eq!(b.index().used(), 2);
        b.preserve_run(&[0, 2], 0, &old[..3 * 4096]).unwrap_err();
        b.preserve_run(&[2], 8192, &old[8192..3 * 4096]).unwrap();
        assert_eq!(b.reader().read_block(2).unwrap(), old[8192..3 * 4096]);
    }
}
