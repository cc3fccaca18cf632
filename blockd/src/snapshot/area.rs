//! The copy-on-write area file of one snapshot: created beside the metadata, written before a
//! replicated write overwrites a frozen block, read back by the snapshot's readers, closed
//! cleanly on shutdown and reopened after a restart — or refused with a clear reason when it
//! cannot be trusted (left open by a crash, corrupt, from another device or format version).
//!
//! Preserved blocks are written in batches: up to [`WRITE_BATCH`] blocks (the old data the
//! write path read, shared, never copied) wait in memory and then go to their page-aligned
//! slots with one `pwritev`; readers take waiting blocks from memory. A group's table page is
//! written once its last slot is, the last group's at [`CowArea::close`]. Nothing is synced
//! before `close`: an area is trusted after a restart only if `close` synced it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::cow_index::{CowFull, CowIndex, RestoreError};
use super::cow_record::{
    self, AreaHeader, AreaState, CowRecordError, GROUP_SLOTS, HEADER_SIZE, SlotEntry, TABLE_SIZE,
};

/// Preserved blocks kept in memory before they are written with one `pwritev` (a divisor of
/// [`GROUP_SLOTS`]: a batch never spans two groups unless a run does).
pub const WRITE_BATCH: usize = 16;

/// Blocks preserved from a buffer larger than this are written at once, so that waiting
/// blocks never keep more than `WRITE_BATCH` such buffers alive.
const KEEP_BUFFER_MAX: usize = 64 << 10;

/// Why an area could not be created, written, read or reopened.
#[derive(Debug, thiserror::Error)]
pub enum AreaError {
    #[error(
        "cannot reserve {bytes} bytes for snapshot area {path} (a smaller --cow-size, or free space)"
    )]
    Reserve {
        path: PathBuf,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
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
    #[error(
        "snapshot area {path} was closed over data generation {generation:016X}, which this replica's metadata does not know (another disk or recreated metadata)"
    )]
    OtherReplica { path: PathBuf, generation: u64 },
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

/// Where the preserved contents of one block are (see [`CowArea::preserved`]).
#[derive(Clone, Debug)]
pub enum PreservedBlock {
    /// Still waiting in memory to be written.
    Waiting(Bytes),
    /// In the area file, at `slot`, described by `entry`.
    Stored { slot: u64, entry: SlotEntry },
}

/// An open copy-on-write area and its index.
#[derive(Debug)]
pub struct CowArea {
    path: PathBuf,
    file: Arc<File>,
    header: AreaHeader,
    index: CowIndex,
    /// Block and data CRC of every slot in use, by slot.
    entries: Vec<SlotEntry>,
    /// Slots below this are written to the file; the data of the others is in `waiting`.
    written: u64,
    waiting: Vec<Bytes>,
}

/// Reads preserved blocks of an area (see [`CowArea::reader`]).
#[derive(Clone, Debug)]
pub struct AreaReader {
    path: PathBuf,
    file: Arc<File>,
    block_size: u32,
}

impl AreaReader {
    /// The contents of a preserved block: from memory, or read from the area and checked
    /// against the CRC its entry recorded.
    pub fn read(&self, block: &PreservedBlock) -> Result<Bytes, AreaError> {
        let (slot, entry) = match block {
            PreservedBlock::Waiting(data) => return Ok(data.clone()),
            PreservedBlock::Stored { slot, entry } => (*slot, *entry),
        };
        let mut data = vec![0u8; self.block_size as usize];
        let offset = cow_record::data_offset(slot, self.block_size);
        read_exact_at(&self.file, &self.path, &mut data, offset)?;
        entry
            .check(slot, &data)
            .map_err(|source| AreaError::Record {
                path: self.path.clone(),
                source,
            })?;
        Ok(data.into())
    }
}

impl CowArea {
    /// Creates a new area (the file must not exist) in state Open, allocated whole and synced.
    /// Slow for a large area (the allocation): create it before freezing anything. When any
    /// step fails, the file is removed again, so the name stays free for a retry.
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
            entries: Vec::new(),
            written: 0,
            waiting: Vec::new(),
        };
        area.initialized(&buf)
    }

    /// This new area with its header written, allocated and durable; its file removed when any
    /// step fails.
    fn initialized(self, header: &[u8]) -> Result<CowArea, AreaError> {
        match self.initialize(header) {
            Ok(()) => Ok(self),
            Err(e) => {
                let path = self.path.clone();
                drop(self);
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Writes the header of a new area, allocates it and makes it durable.
    fn initialize(&self, header: &[u8]) -> Result<(), AreaError> {
        self.write_at(header, 0)?;
        self.reserve()?;
        self.sync()?;
        // The new name is durable too: a power cut cannot lose an area its snapshot relies on.
        if let Some(dir) = self.path.parent().and_then(|d| File::open(d).ok()) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Records the point the area was frozen at (the replica's data generation then, and the
    /// time), decided after the area was created. Only in memory: the header on disk says Open
    /// (never trusted after a restart) until [`close`](Self::close) writes it whole.
    pub fn set_frozen_at(&mut self, generation: u64, created_unix_ms: u64) {
        self.header.generation = generation;
        self.header.created_unix_ms = created_unix_ms;
    }

    /// Allocates the whole area on its filesystem now (the file's size is unchanged): a
    /// filesystem without room refuses the snapshot at once, instead of its growing area later
    /// taking the space the replica's own writes need. Filesystems without `fallocate` skip it.
    fn reserve(&self) -> Result<(), AreaError> {
        let bytes = HEADER_SIZE as u64
            + cow_record::area_bytes(self.header.capacity_blocks, self.header.block_size);
        let len = libc::off_t::try_from(bytes).unwrap_or(libc::off_t::MAX);
        // SAFETY: fallocate on a descriptor this area owns; no pointers involved.
        let rc =
            unsafe { libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(());
        }
        Err(AreaError::Reserve {
            path: self.path.clone(),
            bytes,
            source,
        })
    }

    /// The header of the area at `path` (any state), read without changing the file.
    pub fn read_header(path: &Path) -> Result<AreaHeader, AreaError> {
        let file = File::open(path).map_err(|source| AreaError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut buf = vec![0u8; HEADER_SIZE];
        read_exact_at(&file, path, &mut buf, 0)?;
        cow_record::decode_header(&buf).map_err(|source| AreaError::Record {
            path: path.to_owned(),
            source,
        })
    }

    /// Reopens an area closed cleanly by [`close`](Self::close), checks every table and every
    /// block's data and marks it Open again. An area left Open (a crash) is refused: blocks
    /// overwritten after their preserved copy was last written out would read back wrong. So
    /// is one for another device size, or closed over a data generation `known` says the
    /// replica's metadata does not know: it was not closed over this replica.
    pub fn reopen(
        path: &Path,
        device_size: u64,
        known: impl Fn(u64) -> bool,
    ) -> Result<CowArea, AreaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| AreaError::Open {
                path: path.to_owned(),
                source,
            })?;
        let record = |source| AreaError::Record {
            path: path.to_owned(),
            source,
        };
        let mut buf = vec![0u8; HEADER_SIZE];
        read_exact_at(&file, path, &mut buf, 0)?;
        let header = cow_record::decode_header(&buf).map_err(record)?;
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
        if !known(header.closed_generation) {
            return Err(AreaError::OtherReplica {
                path: path.to_owned(),
                generation: header.closed_generation,
            });
        }
        let bs = header.block_size;
        let mut index = CowIndex::new(bs, header.capacity_blocks, device_size);
        let mut entries = Vec::new();
        let mut table = vec![0u8; TABLE_SIZE];
        let mut data = Vec::new();
        for group in 0..header.preserved_blocks.div_ceil(GROUP_SLOTS) {
            let first = group * GROUP_SLOTS;
            let count = (header.preserved_blocks - first).min(GROUP_SLOTS);
            read_exact_at(&file, path, &mut table, cow_record::table_offset(group, bs))?;
            let group_entries = cow_record::decode_table(&table, group, count).map_err(record)?;
            data.resize(count as usize * bs as usize, 0);
            read_exact_at(&file, path, &mut data, cow_record::data_offset(first, bs))?;
            for ((slot, entry), block) in (first..)
                .zip(group_entries)
                .zip(data.chunks_exact(bs as usize))
            {
                entry.check(slot, block).map_err(record)?;
                index
                    .restore(slot, entry.block)
                    .map_err(|source| AreaError::Index {
                        path: path.to_owned(),
                        source,
                    })?;
                entries.push(entry);
            }
        }
        let mut area = CowArea {
            path: path.to_owned(),
            file: Arc::new(file),
            written: header.preserved_blocks,
            header,
            index,
            entries,
            waiting: Vec::new(),
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

    /// Bytes of the area used by preserved blocks (their tables included).
    pub fn used_bytes(&self) -> u64 {
        cow_record::area_bytes(self.index.used(), self.header.block_size)
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

    /// Preserves `data` (the block's contents at the freeze, [`CowIndex::block_len`] bytes) as
    /// the copy of `block`; returns its slot. See [`preserve_run`](Self::preserve_run).
    pub fn preserve(&mut self, block: u64, data: &[u8]) -> Result<u64, AreaError> {
        let slot = self.index.used();
        let start = block * self.index.block_size();
        self.preserve_run(&[block], start, &Bytes::copy_from_slice(data))?;
        Ok(slot)
    }

    /// Preserves the contents at the freeze of `blocks` (strictly ascending, none preserved
    /// yet) in consecutive slots; `old` holds the device's bytes from offset `start` and covers
    /// every block (its blocks are kept, not copied, until written). A bad or too large run
    /// (area full) is refused whole, leaving the area unchanged; when writing a batch out
    /// fails, the area can no longer be trusted and the caller must give it up. Not synced: an
    /// area is trusted after a restart only if [`close`](Self::close) synced it, so a crash
    /// makes it untrusted anyway.
    pub fn preserve_run(
        &mut self,
        blocks: &[u64],
        start: u64,
        old: &Bytes,
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
        for &block in blocks {
            let at = (block * bs - start) as usize;
            let n = self.index.block_len(block) as usize;
            let data = if n == bs as usize {
                old.slice(at..at + n)
            } else {
                // The device's short last block: padded to a whole slot.
                let mut padded = BytesMut::zeroed(bs as usize);
                padded[..n].copy_from_slice(&old[at..at + n]);
                padded.freeze()
            };
            self.entries.push(SlotEntry::of(block, &data));
            self.waiting.push(data);
            let slot = self.index.insert(block);
            debug_assert!(slot.is_some(), "checked above");
        }
        if self.waiting.len() >= WRITE_BATCH || old.len() > KEEP_BUFFER_MAX {
            self.write_waiting()?;
        }
        Ok(())
    }

    /// Where the preserved contents of the block in `slot` are, for a reader to fetch without
    /// holding the area (records never change once written, waiting blocks are shared).
    pub fn preserved(&self, slot: u64) -> Option<PreservedBlock> {
        let entry = *self.entries.get(slot as usize)?;
        Some(match slot.checked_sub(self.written) {
            Some(i) => PreservedBlock::Waiting(self.waiting[i as usize].clone()),
            None => PreservedBlock::Stored { slot, entry },
        })
    }

    /// A handle that reads preserved blocks without borrowing the area.
    pub fn reader(&self) -> AreaReader {
        AreaReader {
            path: self.path.clone(),
            file: self.file.clone(),
            block_size: self.header.block_size,
        }
    }

    /// The preserved contents of the block in `slot` (checked against their CRC if stored).
    pub fn read_block(&self, slot: u64) -> Result<Bytes, AreaError> {
        let Some(block) = self.preserved(slot) else {
            return Err(AreaError::BadRun {
                path: self.path.clone(),
                reason: format!("slot {slot} is not in use"),
            });
        };
        self.reader().read(&block)
    }

    /// Writes every waiting block to its slot (one `pwritev` per group), then the table of
    /// each group that became full.
    fn write_waiting(&mut self) -> Result<(), AreaError> {
        let bs = self.header.block_size;
        while !self.waiting.is_empty() {
            let group = self.written / GROUP_SLOTS;
            let end = self.index.used().min((group + 1) * GROUP_SLOTS);
            let n = (end - self.written) as usize;
            let offset = cow_record::data_offset(self.written, bs);
            pwritev_all(&self.file, &self.waiting[..n], offset).map_err(|source| {
                AreaError::Write {
                    path: self.path.clone(),
                    offset,
                    source,
                }
            })?;
            self.waiting.drain(..n);
            self.written = end;
            if end.is_multiple_of(GROUP_SLOTS) {
                self.write_table(group)?;
            }
        }
        Ok(())
    }

    /// Writes the table of `group` as its slots in use are now.
    fn write_table(&self, group: u64) -> Result<(), AreaError> {
        let first = (group * GROUP_SLOTS) as usize;
        let end = self.entries.len().min(first + GROUP_SLOTS as usize);
        let table =
            cow_record::encode_table(group, &self.entries[first..end]).map_err(|source| {
                AreaError::Record {
                    path: self.path.clone(),
                    source,
                }
            })?;
        self.write_at(
            &table,
            cow_record::table_offset(group, self.header.block_size),
        )
    }

    /// Writes the waiting blocks and the last group's table, syncs everything and marks the
    /// area Closed over the replica's data generation now, `generation`, so a restart can
    /// reopen it over the same replica.
    pub fn close(mut self, generation: u64) -> Result<(), AreaError> {
        self.header.closed_generation = generation;
        self.write_waiting()?;
        let used = self.index.used();
        if !used.is_multiple_of(GROUP_SLOTS) {
            self.write_table(used / GROUP_SLOTS)?;
        }
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

/// Writes `bufs` one after another at `offset` with `pwritev`, retrying short writes.
fn pwritev_all(file: &File, bufs: &[Bytes], mut offset: u64) -> std::io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let count = (iov.len() - first).min(1024) as libc::c_int;
        // SAFETY: the descriptor is open for the call (`file` is borrowed), and each of the
        // `count` iovecs from `first` points at `iov_len` readable bytes inside a `Bytes` of
        // `bufs`, borrowed (so alive and unchanged) for the whole call; pwritev only reads them.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov[first..].as_ptr(),
                count,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: `n < iov_len`, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
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
            device_size: 1 << 30,
            capacity_blocks: cap,
            created_unix_ms: 1,
            generation: 42,
            preserved_blocks: 0,
            name: "nightly".into(),
            listen: String::new(),
            closed_generation: 0,
        }
    }

    /// The data generation these tests close areas over.
    const GEN: u64 = 0xfeed_0000_0002;

    /// The generations the replica's metadata knows, in these tests.
    fn known(g: u64) -> bool {
        g == GEN
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("blockd-area-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("area")
    }

    /// The contents this test preserves for `block`: different for every block.
    fn content(block: u64) -> Vec<u8> {
        (0..4096u64)
            .map(|i| (block.wrapping_mul(31) ^ i) as u8)
            .collect()
    }

    #[test]
    fn preserved_blocks_survive_a_clean_close() {
        let path = tmp("clean");
        let mut a = CowArea::create(&path, header(4)).unwrap();
        assert_eq!(a.to_preserve(0, 8192).unwrap(), vec![0, 1]);
        assert_eq!(a.preserve(1, &[1u8; 4096]).unwrap(), 0);
        assert_eq!(a.preserve(0, &[2u8; 4096]).unwrap(), 1);
        assert!(a.preserve(0, &[3u8; 4096]).is_err());
        assert_eq!(a.used_bytes(), 2 * 4096 + 4096);
        assert_eq!(&a.read_block(0).unwrap()[..], &[1u8; 4096][..], "waiting");
        a.close(GEN).unwrap();
        let b = CowArea::reopen(&path, 1 << 30, known).unwrap();
        assert_eq!(b.index().slot_of(1), Some(0));
        assert_eq!(&b.read_block(1).unwrap()[..], &[2u8; 4096][..]);
        assert_eq!(&b.read_block(0).unwrap()[..], &[1u8; 4096][..]);
        assert!(b.read_block(2).is_err(), "unused slot");
        assert_eq!(b.header().generation, 42);
        assert!(
            CowArea::create(&path, header(4)).is_err(),
            "never overwrites"
        );
    }

    /// Many groups, runs of every size, reads while blocks wait and after they are written,
    /// then a clean close, a reopen that checks everything, more blocks and another reopen.
    #[test]
    fn groups_round_trip_across_reopens() {
        let path = tmp("groups");
        let total = 3 * GROUP_SLOTS + 37;
        let mut a = CowArea::create(&path, header(total + 100)).unwrap();
        let mut next = 0u64;
        let mut run = 1u64;
        while next < 2 * GROUP_SLOTS + 5 {
            // Every other block of a run of `run` blocks (strictly ascending, with gaps).
            let blocks: Vec<u64> = (0..run).map(|i| 2 * (next + i)).collect();
            let start = blocks[0] * 4096;
            let mut old = vec![0u8; ((blocks[blocks.len() - 1] + 1) * 4096 - start) as usize];
            for &b in &blocks {
                let at = (b * 4096 - start) as usize;
                old[at..at + 4096].copy_from_slice(&content(b));
            }
            a.preserve_run(&blocks, start, &Bytes::from(old)).unwrap();
            next += run;
            run = run % 40 + 7;
            for slot in [0, next / 2, next - 1] {
                let b = 2 * slot;
                assert_eq!(a.index().slot_of(b), Some(slot));
                assert_eq!(&a.read_block(slot).unwrap()[..], &content(b)[..]);
            }
        }
        let used = a.index().used();
        assert_eq!(
            a.used_bytes(),
            used * 4096 + used.div_ceil(GROUP_SLOTS) * 4096
        );
        a.close(GEN).unwrap();
        let mut b = CowArea::reopen(&path, 1 << 30, known).unwrap();
        assert_eq!(b.index().used(), used);
        for slot in 0..used {
            assert_eq!(&b.read_block(slot).unwrap()[..], &content(2 * slot)[..]);
        }
        for blk in (2 * used + 1)..(2 * used + 1 + total - used) {
            b.preserve(blk, &content(blk)).unwrap();
        }
        b.close(GEN).unwrap();
        let c = CowArea::reopen(&path, 1 << 30, known).unwrap();
        assert_eq!(c.index().used(), total);
        for slot in used..total {
            let blk = 2 * used + 1 + (slot - used);
            assert_eq!(c.index().slot_of(blk), Some(slot));
            assert_eq!(&c.read_block(slot).unwrap()[..], &content(blk)[..]);
        }
        // Slots are page-aligned in the file.
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, cow_record::data_offset(total - 1, 4096) + 4096);
        assert_eq!(len % 4096, 0);
    }

    #[test]
    fn a_new_area_is_allocated_whole_up_front() {
        use std::os::unix::fs::MetadataExt;
        let path = tmp("reserved");
        let cap = 3 * GROUP_SLOTS;
        let a = CowArea::create(&path, header(cap)).unwrap();
        let whole = HEADER_SIZE as u64 + cow_record::area_bytes(cap, 4096);
        let md = std::fs::metadata(&path).unwrap();
        assert!(
            md.blocks() * 512 >= whole,
            "{} bytes allocated for an area of {whole}",
            md.blocks() * 512
        );
        assert!(md.len() < whole, "the file's size is unchanged");
        drop(a);
        // More than the filesystem holds: refused at once, and no file is left behind.
        let huge = tmp("huge");
        let e = CowArea::create(&huge, header(1 << 40)).unwrap_err();
        assert!(matches!(e, AreaError::Reserve { .. }), "{e}");
        assert!(!huge.exists());
    }

    #[test]
    fn an_area_left_open_is_refused_after_a_restart() {
        let path = tmp("unclean");
        let mut a = CowArea::create(&path, header(4)).unwrap();
        a.preserve(3, &[9u8; 4096]).unwrap();
        drop(a);
        let e = CowArea::reopen(&path, 1 << 30, known).unwrap_err();
        assert!(matches!(e, AreaError::Unclean { .. }), "{e}");
        assert!(e.to_string().contains("not closed cleanly"));
    }

    /// Closes an area holding `n` blocks and returns its path.
    fn closed_area(name: &str, n: u64) -> PathBuf {
        let path = tmp(name);
        let mut a = CowArea::create(&path, header(1000)).unwrap();
        for b in 0..n {
            a.preserve(b * 3, &content(b * 3)).unwrap();
        }
        a.close(GEN).unwrap();
        path
    }

    fn flip(path: &Path, offset: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], offset).unwrap();
    }

    #[test]
    fn corruption_and_foreign_devices_are_refused() {
        let path = closed_area("corrupt", GROUP_SLOTS + 3);
        assert!(matches!(
            CowArea::reopen(&path, 2 << 30, known),
            Err(AreaError::WrongDevice { .. })
        ));
        let e = CowArea::reopen(&path, 1 << 30, |g| g == GEN + 2).unwrap_err();
        assert!(
            matches!(
                e,
                AreaError::OtherReplica {
                    generation: GEN,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("does not know"), "{e}");
        CowArea::reopen(&path, 1 << 30, known)
            .unwrap()
            .close(GEN)
            .unwrap();
        // Data of a slot in the second group.
        flip(&path, cow_record::data_offset(GROUP_SLOTS + 1, 4096) + 100);
        let e = CowArea::reopen(&path, 1 << 30, known).unwrap_err();
        assert!(e.to_string().contains("data CRC-32"), "{e}");
        // A table entry.
        let path = closed_area("corrupt-table", 5);
        flip(&path, cow_record::table_offset(0, 4096) + 40);
        let e = CowArea::reopen(&path, 1 << 30, known).unwrap_err();
        assert!(e.to_string().contains("table 0 fails its CRC-32"), "{e}");
        // The area header.
        let path = closed_area("corrupt-header", 5);
        flip(&path, 30);
        let e = CowArea::reopen(&path, 1 << 30, known).unwrap_err();
        assert!(e.to_string().contains("header fails its CRC-32"), "{e}");
        // Not an area at all, or cut short.
        let path = tmp("foreign");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let e = CowArea::reopen(&path, 1 << 30, known).unwrap_err();
        assert!(e.to_string().contains("not a blockd snapshot area"), "{e}");
        let path = closed_area("short", 5);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(cow_record::data_offset(4, 4096) + 10).unwrap();
        let e = CowArea::reopen(&path, 1 << 30, known).unwrap_err();
        assert!(matches!(e, AreaError::Read { .. }), "{e}");
    }

    #[test]
    fn an_area_of_format_version_1_is_refused() {
        let path = tmp("v1");
        let h = cow_record::encode_header(&AreaHeader {
            state: AreaState::Closed,
            ..header(4)
        })
        .unwrap();
        let mut v1 = h.to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&v1[..HEADER_SIZE - 4]);
        v1[HEADER_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &v1).unwrap();
        let e = CowArea::reopen(&path, 1 << 30, known).unwrap_err();
        let chain = crate::repl::resource::error_chain(&e);
        assert!(chain.contains("format version 1"), "{chain}");
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
    fn a_run_is_preserved_whole_or_not_at_all() {
        let path = tmp("run");
        let mut h = header(3);
        h.device_size = 3 * 4096 + 100;
        let mut a = CowArea::create(&path, h).unwrap();
        let old = Bytes::from(
            (0..3 * 4096 + 100)
                .map(|i| (i % 253) as u8)
                .collect::<Vec<u8>>(),
        );
        // Blocks 1 and 3 (the short last one) from the bytes at 4096...
        a.preserve_run(&[1, 3], 4096, &old.slice(4096..)).unwrap();
        assert_eq!(a.index().slot_of(1), Some(0));
        assert_eq!(a.index().slot_of(3), Some(1));
        for bad in [
            a.preserve_run(&[2, 2], 8192, &old.slice(8192..)),
            a.preserve_run(&[2], 8192, &old.slice(8192..9000)),
            a.preserve_run(&[0, 1], 0, &old),
            a.preserve_run(&[0, 2], 4096, &old.slice(4096..)),
        ] {
            assert!(matches!(bad, Err(AreaError::BadRun { .. })), "{bad:?}");
        }
        assert_eq!(a.index().used(), 2, "refused runs change nothing");
        a.preserve_run(&[], 0, &Bytes::new()).unwrap();
        a.close(GEN).unwrap();
        let mut b = CowArea::reopen(&path, 3 * 4096 + 100, known).unwrap();
        assert_eq!(b.read_block(0).unwrap(), old[4096..8192]);
        let mut last = old[3 * 4096..].to_vec();
        last.resize(4096, 0);
        assert_eq!(b.read_block(1).unwrap(), last);
        let e = b.preserve_run(&[0, 2], 0, &old).unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        assert_eq!(b.index().used(), 2);
        b.preserve_run(&[0, 2], 0, &old.slice(..3 * 4096))
            .unwrap_err();
        b.preserve_run(&[2], 8192, &old.slice(8192..3 * 4096))
            .unwrap();
        let p = b.preserved(2).unwrap();
        assert!(matches!(p, PreservedBlock::Waiting(_)));
        assert_eq!(b.reader().read(&p).unwrap(), old[8192..3 * 4096]);
    }

    #[test]
    fn blocks_wait_for_a_batch_unless_their_buffer_is_large() {
        let path = tmp("batch");
        let mut a = CowArea::create(&path, header(1000)).unwrap();
        for b in 0..WRITE_BATCH as u64 - 1 {
            a.preserve(b, &content(b)).unwrap();
        }
        assert!(matches!(a.preserved(0), Some(PreservedBlock::Waiting(_))));
        a.preserve(100, &content(100)).unwrap();
        for slot in 0..WRITE_BATCH as u64 {
            assert!(matches!(
                a.preserved(slot),
                Some(PreservedBlock::Stored { .. })
            ));
        }
        // One block out of a large buffer: written at once, the buffer is not kept.
        let big = Bytes::from(vec![3u8; KEEP_BUFFER_MAX + 4096]);
        a.preserve_run(&[200], 200 * 4096, &big).unwrap();
        let slot = WRITE_BATCH as u64;
        assert!(matches!(
            a.preserved(slot),
            Some(PreservedBlock::Stored { .. })
        ));
        assert_eq!(&a.read_block(slot).unwrap()[..], &[3u8; 4096][..]);
        assert!(a.preserved(slot + 1).is_none());
    }

    /// A new area whose header cannot be written (here: through a read-only descriptor) is
    /// removed again, like one that cannot be allocated: a retry of the name is not refused.
    #[test]
    fn a_new_area_that_fails_is_removed() {
        let path = tmp("failed-create");
        let a = CowArea::create(&path, header(4)).unwrap();
        let ro = CowArea {
            file: Arc::new(File::open(&path).unwrap()),
            ..a
        };
        let buf = cow_record::encode_header(&header(4)).unwrap();
        let e = ro.initialized(&buf).unwrap_err();
        assert!(matches!(e, AreaError::Write { offset: 0, .. }), "{e}");
        assert!(!path.exists());
        CowArea::create(&path, header(4)).expect("the name is free again");
    }

    #[test]
    fn a_failed_write_is_reported() {
        let path = tmp("ro");
        let a = CowArea::create(&path, header(100)).unwrap();
        // The same area through a read-only descriptor: writing the batch fails.
        let mut ro = CowArea {
            file: Arc::new(File::open(&path).unwrap()),
            ..a
        };
        for b in 0..WRITE_BATCH as u64 - 1 {
            ro.preserve(b, &content(b)).unwrap();
        }
        let e = ro.preserve(99, &content(99)).unwrap_err();
        assert!(matches!(e, AreaError::Write { .. }), "{e}");
    }
}
