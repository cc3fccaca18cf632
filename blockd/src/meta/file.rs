//! File-backed metadata: create, open and update the metadata area of a backing device
//! (internal) or of a file of its own (external), with positional reads and writes.
//!
//! Superblock updates alternate between the two copies with an increasing `seq`, each followed
//! by `fdatasync`, so a crash mid-update leaves the previous copy intact. Opening picks the
//! newest valid copy; a damaged other copy is returned as a warning for the log (the expected
//! trace of a torn write), never repaired silently. If both copies fail, opening fails.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::activity_log::{
    PendingTransaction, ReplayedLog, RingRecord, Transaction, replay, ring_len_for,
};
use super::bitmap::Bitmap;
use super::layout::{Geometry, RECORD_SIZE, aligned_end, internal_geometry};
use super::superblock::{MAGIC, Superblock};
use super::{MetaError, Record};

/// Where the metadata of a resource lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the backing device (or file) at this path.
    Internal(PathBuf),
    /// In a file (or device) of its own.
    External(PathBuf),
}

impl MetaLocation {
    pub fn path(&self) -> &Path {
        match self {
            MetaLocation::Internal(p) | MetaLocation::External(p) => p,
        }
    }
}

/// Parameters of `create-md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    pub node_id: u8,
    /// Bitmap slots (peers this node tracks): the number of other nodes in the resource.
    pub peer_slots: u32,
    pub bitmap_block_size: u32,
    pub al_extent_size: u32,
    pub al_extents: u32,
    /// External metadata: the data size (the backing device's size). Ignored for internal.
    pub data_size: Option<u64>,
    /// Overwrite existing blockd metadata.
    pub force: bool,
}

/// What to do with a bitmap page that fails its checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDamagedPage {
    /// Fail (the default; always right after a clean shutdown).
    Refuse,
    /// Mark every block of the page dirty and report it. Only for recovery after an unclean
    /// shutdown (superblock `ATTACHED` flag found set), where a torn page write is possible:
    /// resyncing more than needed is safe, fewer never happens. Misplaced pages still fail.
    MarkDirty,
}

/// The steps of [`MetaFile::create`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CreateStep {
    /// Zero both superblock copies already there, then sync.
    InvalidateOld,
    /// Zero the activity-log ring.
    ClearLog,
    /// Write clean pages into every bitmap slot.
    ClearBitmaps,
    /// Write the new superblock into copy 0 (with a sync).
    FirstSuperblock,
    /// Write it into copy 1 (with a sync).
    SecondSuperblock,
}

impl CreateStep {
    const ALL: [CreateStep; 5] = [
        CreateStep::InvalidateOld,
        CreateStep::ClearLog,
        CreateStep::ClearBitmaps,
        CreateStep::FirstSuperblock,
        CreateStep::SecondSuperblock,
    ];
}

/// An open metadata area.
#[derive(Debug)]
pub struct MetaFile {
    file: File,
    path: PathBuf,
    /// Offset of the area in the file.
    area: u64,
    sb: Superblock,
    /// The copy holding `sb`.
    copy: u8,
}

/// The result of opening metadata.
#[derive(Debug)]
pub struct Opened {
    pub meta: MetaFile,
    /// The other superblock copy failed its checks (log it).
    pub warning: Option<MetaError>,
}

fn open_rw(path: &Path, create: bool) -> Result<File, MetaError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|source| MetaError::Open {
            path: path.to_path_buf(),
            source,
        })
}

fn file_size(file: &mut File, path: &Path) -> Result<u64, MetaError> {
    // SeekFrom::End works for regular files and block devices alike.
    file.seek(SeekFrom::End(0))
        .map_err(|source| MetaError::Size {
            path: path.to_path_buf(),
            source,
        })
}

fn read_record(
    file: &File,
    path: &Path,
    offset: u64,
) -> Result<[u8; RECORD_SIZE as usize], MetaError> {
    let mut buf = [0u8; RECORD_SIZE as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| MetaError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        })?;
    Ok(buf)
}

/// Reads and decodes both superblock copies of an area ending at `end`.
fn read_superblocks(file: &File, path: &Path, end: u64) -> [Result<Superblock, MetaError>; 2] {
    [0u8, 1].map(|copy| {
        let from_end = Geometry::superblock_from_end(copy);
        let offset = end.checked_sub(from_end).ok_or(MetaError::DeviceTooSmall {
            size: end,
            needed: from_end,
        })?;
        let rec = read_record(file, path, offset)?;
        Superblock::decode(&rec, copy, offset)
    })
}

impl MetaFile {
    /// Initialises metadata (`blockctl create-md`): empty activity log, clean bitmaps, a
    /// just-created superblock in both copies. Refuses when blockd metadata (valid or damaged)
    /// is already there, unless `force`. A crash part-way leaves either no metadata or the
    /// new one (see [`CreateStep::InvalidateOld`]), never the old superblock over the cleared
    /// bitmaps.
    pub fn create(loc: &MetaLocation, opts: &CreateOptions) -> Result<MetaFile, MetaError> {
        Self::create_until(loc, opts, CreateStep::SecondSuperblock)
    }

    /// [`Self::create`] stopped after step `last` (tests simulate a crash with it).
    fn create_until(
        loc: &MetaLocation,
        opts: &CreateOptions,
        last: CreateStep,
    ) -> Result<MetaFile, MetaError> {
        let path = loc.path().to_path_buf();
        let (file, geometry, area) = match loc {
            MetaLocation::Internal(_) => {
                let mut file = open_rw(&path, false)?;
                let size = file_size(&mut file, &path)?;
                let (g, area) = internal_geometry(
                    size,
                    opts.bitmap_block_size,
                    opts.peer_slots,
                    opts.al_extent_size,
                    opts.al_extents,
                )?;
                (file, g, area)
            }
            MetaLocation::External(_) => {
                let data_size = opts.data_size.ok_or_else(|| MetaError::Invalid {
                    field: "data size",
                    reason: "external metadata needs the backing device size".into(),
                })?;
                let g = Geometry {
                    data_size,
                    bitmap_block_size: opts.bitmap_block_size,
                    peer_slots: opts.peer_slots,
                    al_slots: ring_len_for(opts.al_extents),
                    al_extent_size: opts.al_extent_size,
                    al_extents: opts.al_extents,
                };
                g.validate()?;
                let mut file = open_rw(&path, true)?;
                let size = file_size(&mut file, &path)?;
                let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
                if aligned_end(size) < g.md_size() {
                    if !is_file {
                        return Err(MetaError::DeviceTooSmall {
                            size,
                            needed: g.md_size(),
                        });
                    }
                    file.set_len(g.md_size())
                        .map_err(|source| MetaError::Size {
                            path: path.clone(),
                            source,
                        })?;
                }
                let end = aligned_end(file_size(&mut file, &path)?);
                (file, g, end - g.md_size())
            }
        };
        let end = area + geometry.md_size();
        if !opts.force {
            let found = read_superblocks(&file, &path, end);
            let state = if found.iter().any(|r| r.is_ok()) {
                Some("valid")
            } else if found
                .iter()
                .any(|r| !matches!(r, Err(MetaError::BadMagic { .. } | MetaError::Read { .. })))
            {
                Some("damaged")
            } else {
                None
            };
            if let Some(state) = state {
                return Err(MetaError::AlreadyExists { path, state });
            }
        }
        let sb = Superblock::new(opts.node_id, geometry);
        let mut meta = MetaFile {
            file,
            path,
            area,
            sb: sb.clone(),
            copy: 1,
        };
        for step in CreateStep::ALL {
            if step > last {
                break;
            }
            meta.create_step(step, &sb)?;
        }
        Ok(meta)
    }

    /// Runs one step of [`Self::create`] on the area `self` describes.
    fn create_step(&mut self, step: CreateStep, sb: &Superblock) -> Result<(), MetaError> {
        let geometry = sb.geometry;
        let zero = [0u8; RECORD_SIZE as usize];
        match step {
            CreateStep::InvalidateOld => {
                // The superblocks sit at the same place whatever the geometry, so these are the
                // copies a forced create replaces. They usually have a higher seq than the new
                // ones, and with the same geometry their page tags match the cleared bitmaps:
                // left valid, a crash before both new copies are durable would reopen the old
                // generations and flags over all-clear bitmaps. Zeroed and synced first, a
                // crash leaves no metadata at all (create-md again) instead.
                for copy in [0u8, 1] {
                    self.write_at(sb.md_size - Geometry::superblock_from_end(copy), &zero)?;
                }
                self.sync()
            }
            CreateStep::ClearLog => {
                for slot in 0..geometry.al_slots {
                    self.write_at(geometry.al_offset(slot), &zero)?;
                }
                Ok(())
            }
            CreateStep::ClearBitmaps => {
                let clean = Bitmap::new(geometry.data_size, geometry.bitmap_block_size);
                for slot in 0..geometry.peer_slots {
                    self.write_bitmap_pages(slot, &clean, 0..clean.pages())?;
                }
                Ok(())
            }
            // Both copies, so a fresh area opens without warnings; the first one's sync makes
            // the cleared log and bitmaps durable before any superblock vouches for them.
            CreateStep::FirstSuperblock | CreateStep::SecondSuperblock => self.write_superblock(sb),
        }
    }

    /// Opens existing metadata; `expected_node` refuses metadata of another node id. For
    /// internal metadata, the data size must end exactly where the area starts.
    pub fn open(loc: &MetaLocation, expected_node: Option<u8>) -> Result<Opened, MetaError> {
        let path = loc.path().to_path_buf();
        let mut file = open_rw(&path, false)?;
        let size = file_size(&mut file, &path)?;
        let end = aligned_end(size);
        let [c0, c1] = read_superblocks(&file, &path, end);
        let (sb, copy, warning) = match (c0, c1) {
            (Ok(a), Ok(b)) => {
                if a.seq >= b.seq {
                    (a, 0, None)
                } else {
                    (b, 1, None)
                }
            }
            (Ok(a), Err(e)) => (a, 0, Some(e)),
            (Err(e), Ok(b)) => (b, 1, Some(e)),
            // Report the more telling error: a damaged copy rather than a missing one.
            (Err(e0), Err(e1)) => {
                return Err(match e0 {
                    MetaError::BadMagic { .. } => e1,
                    e => e,
                });
            }
        };
        if let Some(expected) = expected_node
            && sb.node_id != expected
        {
            return Err(MetaError::NodeIdMismatch {
                expected,
                found: sb.node_id,
            });
        }
        let area = end.checked_sub(sb.md_size).ok_or(MetaError::SizeMismatch {
            what: "metadata file",
            expected: sb.md_size,
            found: end,
        })?;
        if let MetaLocation::Internal(_) = loc
            && sb.geometry.data_size != area
        {
            return Err(MetaError::SizeMismatch {
                what: "backing device data area",
                expected: sb.geometry.data_size,
                found: area,
            });
        }
        Ok(Opened {
            meta: MetaFile {
                file,
                path,
                area,
                sb,
                copy,
            },
            warning,
        })
    }

    /// The newest superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The path of the file or device holding the area.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Persists `sb` (with the next `seq`) in the other copy, then `fdatasync`s. The geometry
    /// and node id cannot change.
    pub fn write_superblock(&mut self, sb: &Superblock) -> Result<(), MetaError> {
        if sb.geometry != self.sb.geometry || sb.node_id != self.sb.node_id {
            return Err(MetaError::Invalid {
                field: "superblock update",
                reason: "geometry and node id are fixed at create-md".into(),
            });
        }
        let mut next = sb.clone();
        next.seq = self.sb.seq + 1;
        next.md_size = self.sb.md_size;
        let copy = 1 - self.copy;
        let offset = self.sb.md_size - Geometry::superblock_from_end(copy);
        self.write_at(offset, &next.encode())?;
        self.sync()?;
        self.sb = next;
        self.copy = copy;
        Ok(())
    }

    /// Reads the bitmap of peer slot `slot`; returns it and the pages marked dirty because
    /// they were damaged (only with [`OnDamagedPage::MarkDirty`]).
    pub fn read_bitmap(
        &self,
        slot: u32,
        on_damage: OnDamagedPage,
    ) -> Result<(Bitmap, Vec<u64>), MetaError> {
        let g = &self.sb.geometry;
        if slot >= g.peer_slots {
            return Err(MetaError::Invalid {
                field: "bitmap slot",
                reason: format!("{slot} of {}", g.peer_slots),
            });
        }
        let mut bitmap = Bitmap::new(g.data_size, g.bitmap_block_size);
        let mut damaged = Vec::new();
        for page in 0..bitmap.pages() {
            let offset = g.bitmap_page_offset(slot, page);
            let rec = self.read_at(offset)?;
            let record = Record::BitmapPage { slot, page };
            match bitmap.decode_page(&rec, page, g.page_tag(slot, page), record, offset) {
                Ok(()) => {}
                Err(e @ MetaError::Misplaced { .. }) => return Err(e),
                Err(e) => match on_damage {
                    OnDamagedPage::Refuse => return Err(e),
                    OnDamagedPage::MarkDirty => {
                        bitmap.set_page(page);
                        damaged.push(page);
                    }
                },
            }
        }
        Ok((bitmap, damaged))
    }

    /// Writes pages `pages` of `bitmap` into peer slot `slot` (no sync: call [`Self::sync`]).
    pub fn write_bitmap_pages(
        &self,
        slot: u32,
        bitmap: &Bitmap,
        pages: Range<u64>,
    ) -> Result<(), MetaError> {
        let g = &self.sb.geometry;
        if slot >= g.peer_slots
            || bitmap.data_size() != g.data_size
            || bitmap.block_size() != u64::from(g.bitmap_block_size)
        {
            return Err(MetaError::BitmapGeometry(format!(
                "slot {slot} of {}, {} bytes in {}-byte blocks",
                g.peer_slots,
                bitmap.data_size(),
                bitmap.block_size()
            )));
        }
        for page in pages.start..pages.end.min(bitmap.pages()) {
            let rec = bitmap.encode_page(page, g.page_tag(slot, page));
            self.write_at(g.bitmap_page_offset(slot, page), &rec)?;
        }
        Ok(())
    }

    /// Reads and replays the activity-log ring.
    pub fn read_activity_log(&self) -> Result<ReplayedLog, MetaError> {
        let g = &self.sb.geometry;
        let mut ring = Vec::with_capacity(g.al_slots as usize);
        for slot in 0..g.al_slots {
            let offset = g.al_offset(slot);
            let rec = self.read_at(offset)?;
            ring.push(match Transaction::decode(&rec, slot, offset) {
                Ok(None) => RingRecord::Unused,
                Ok(Some(t)) => RingRecord::Valid(t),
                Err(e) => RingRecord::Damaged(e),
            });
        }
        replay(g.al_extents, ring)
    }

    /// Persists an activity-log transaction and `fdatasync`s: call before the writes it covers.
    pub fn write_al_transaction(&self, pending: &PendingTransaction) -> Result<(), MetaError> {
        let g = &self.sb.geometry;
        if pending.pos >= g.al_slots || pending.tx.capacity != g.al_extents {
            return Err(MetaError::ActivityLog(format!(
                "transaction for position {} / {} extents does not fit this log",
                pending.pos, pending.tx.capacity
            )));
        }
        self.write_at(g.al_offset(pending.pos), &pending.tx.encode())?;
        self.sync()
    }

    /// `fdatasync` of the metadata file.
    pub fn sync(&self) -> Result<(), MetaError> {
        self.file.sync_data().map_err(|source| MetaError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    fn read_at(&self, offset: u64) -> Result<[u8; RECORD_SIZE as usize], MetaError> {
        read_record(&self.file, &self.path, self.area + offset)
    }

    fn write_at(&self, offset: u64, rec: &[u8]) -> Result<(), MetaError> {
        let at = self.area + offset;
        self.file
            .write_all_at(rec, at)
            .map_err(|source| MetaError::Write {
                path: self.path.clone(),
                offset: at,
                source,
            })
    }
}

/// True when `rec` starts with the superblock magic (for "is something there" checks).
pub fn looks_like_superblock(rec: &[u8]) -> bool {
    rec.len() >= MAGIC.len() && rec[..MAGIC.len()] == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::activity_log::ActivityLog;
    use crate::meta::generation::Uuid;
    use crate::meta::superblock::flags;

    fn opts() -> CreateOptions {
        CreateOptions {
            node_id: 1,
            peer_slots: 2,
            bitmap_block_size: 4096,
            al_extent_size: 4 << 20,
            al_extents: 1237,
            data_size: None,
            force: false,
        }
    }

    fn backing(dir: &Path, size: u64) -> PathBuf {
        let p = dir.join("backing.img");
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn internal_create_open_update() {
        let dir = tempfile::tempdir().unwrap();
        let size = (64 << 20) + 777;
        let loc = MetaLocation::Internal(backing(dir.path(), size));
        let meta = MetaFile::create(&loc, &opts()).unwrap();
        let g = meta.superblock().geometry;
        assert_eq!(g.data_size + g.md_size(), aligned_end(size));
        drop(meta);

        // Refuses to overwrite without force; force works.
        assert!(matches!(
            MetaFile::create(&loc, &opts()),
            Err(MetaError::AlreadyExists { state: "valid", .. })
        ));
        MetaFile::create(
            &loc,
            &CreateOptions {
                force: true,
                ..opts()
            },
        )
        .unwrap();

        let Opened { mut meta, warning } = MetaFile::open(&loc, Some(1)).unwrap();
        assert!(warning.is_none());
        assert!(matches!(
            MetaFile::open(&loc, Some(2)),
            Err(MetaError::NodeIdMismatch {
                expected: 2,
                found: 1
            })
        ));
        let mut sb = meta.superblock().clone();
        sb.flags |= flags::CONSISTENT | flags::ATTACHED;
        sb.generations.new_current(0xABC0, true, &[0]);
        meta.write_superblock(&sb).unwrap();
        sb.generations.new_current(0xDEF0, true, &[0]);
        meta.write_superblock(&sb).unwrap();
        let seq = meta.superblock().seq;
        drop(meta);
        let Opened { meta, .. } = MetaFile::open(&loc, None).unwrap();
        assert_eq!(meta.superblock().seq, seq);
        assert_eq!(meta.superblock().generations.current, Uuid(0xDEF1));
        // 0xABC1 is what peer 0 missed: its bitmap tracks changes since then.
        assert_eq!(meta.superblock().generations.bitmap[0], Uuid(0xABC1));

        // Geometry is fixed.
        let mut other = meta.superblock().clone();
        other.geometry.al_extents = 7;
        let mut meta = meta;
        assert!(matches!(
            meta.write_superblock(&other),
            Err(MetaError::Invalid { .. })
        ));
    }

    /// A bitmap slot's repair-marks flag is persisted with the superblock and read back at
    /// open; a fresh (or forced) create-md starts without it.
    #[test]
    fn repair_marks_flag_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let loc = MetaLocation::Internal(backing(dir.path(), 32 << 20));
        let mut meta = MetaFile::create(&loc, &opts()).unwrap();
        let mut sb = meta.superblock().clone();
        let slot = usize::from(sb.bitmap_slot_for(0).unwrap());
        assert!(!sb.has_repair_marks(slot));
        assert!(sb.set_repair_marks(slot, true));
        meta.write_superblock(&sb).unwrap();
        drop(meta);
        let Opened { meta, warning } = MetaFile::open(&loc, Some(1)).unwrap();
        assert!(warning.is_none());
        assert!(meta.superblock().has_repair_marks(slot));
        drop(meta);
        let force = CreateOptions {
            force: true,
            ..opts()
        };
        let fresh = MetaFile::create(&loc, &force).unwrap();
        assert!(!fresh.superblock().has_repair_marks(slot));
    }

    #[test]
    fn forced_create_interrupted_never_reopens_the_old_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let path = backing(dir.path(), 64 << 20);
        let loc = MetaLocation::Internal(path.clone());
        let mut meta = MetaFile::create(&loc, &opts()).unwrap();
        // An attached node with history and out-of-sync blocks, updated often (high seq).
        let mut sb = meta.superblock().clone();
        sb.flags |= flags::CONSISTENT | flags::ATTACHED;
        sb.generations.new_current(0xABC0, true, &[0]);
        for _ in 0..5 {
            meta.write_superblock(&sb).unwrap();
        }
        let (mut bm, _) = meta.read_bitmap(0, OnDamagedPage::Refuse).unwrap();
        bm.set_range(1 << 20, 1 << 20);
        meta.write_bitmap_pages(0, &bm, 0..bm.pages()).unwrap();
        meta.sync().unwrap();
        drop(meta);
        let old = std::fs::read(&path).unwrap();
        let force = CreateOptions {
            force: true,
            ..opts()
        };
        for step in CreateStep::ALL {
            std::fs::write(&path, &old).unwrap();
            // The crash: nothing after `step` reaches the disk.
            drop(MetaFile::create_until(&loc, &force, step).unwrap());
            match MetaFile::open(&loc, None) {
                // No metadata left: create-md again.
                Err(MetaError::BadMagic { .. }) => assert!(step < CreateStep::FirstSuperblock),
                Ok(Opened { meta, .. }) => {
                    // Either the old node, bits intact, or the new one with clean bitmaps:
                    // never the old generations and flags over cleared bitmaps.
                    let sb = meta.superblock();
                    let (now, _) = meta.read_bitmap(0, OnDamagedPage::Refuse).unwrap();
                    if sb.generations.current == Uuid::JUST_CREATED {
                        assert_eq!(sb.flags, 0, "after {step:?}");
                        assert_eq!(now.count_bits(), 0, "after {step:?}");
                    } else {
                        assert_eq!(now, bm, "old superblock over new bitmaps after {step:?}");
                    }
                }
                Err(e) => panic!("after {step:?}: {e}"),
            }
        }
    }

    #[test]
    fn torn_superblock_falls_back_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let path = backing(dir.path(), 32 << 20);
        let loc = MetaLocation::Internal(path.clone());
        let mut meta = MetaFile::create(&loc, &opts()).unwrap();
        let mut sb = meta.superblock().clone();
        sb.generations.new_current(0x5550, false, &[]);
        meta.write_superblock(&sb).unwrap();
        // Tear the newest copy (the one just written).
        let end = aligned_end(32 << 20);
        let newest = end - Geometry::superblock_from_end(meta.copy);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xAA; 100], newest + 1000).unwrap();
        let Opened {
            meta: back,
            warning,
        } = MetaFile::open(&loc, None).unwrap();
        assert!(matches!(warning, Some(MetaError::ChecksumMismatch { .. })));
        assert_eq!(back.superblock().generations.current, Uuid::JUST_CREATED);
        // Both torn: refused with the checksum error.
        let older = end - Geometry::superblock_from_end(1 - meta.copy);
        f.write_all_at(&[0xAA; 100], older + 1000).unwrap();
        assert!(matches!(
            MetaFile::open(&loc, None),
            Err(MetaError::ChecksumMismatch { .. })
        ));
        // A damaged area is still refused by create without force.
        assert!(matches!(
            MetaFile::create(&loc, &opts()),
            Err(MetaError::AlreadyExists {
                state: "damaged",
                ..
            })
        ));
    }

    #[test]
    fn foreign_and_missing_metadata_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = backing(dir.path(), 32 << 20);
        let loc = MetaLocation::Internal(path.clone());
        assert!(matches!(
            MetaFile::open(&loc, None),
            Err(MetaError::BadMagic { .. })
        ));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let end = aligned_end(32 << 20);
        f.write_all_at(&[0x42; 8192], end - 8192).unwrap();
        match MetaFile::open(&loc, None) {
            Err(e @ MetaError::BadMagic { .. }) => {
                assert!(e.to_string().contains("not blockd metadata"))
            }
            other => panic!("{other:?}"),
        }
        // Not blockd metadata: create proceeds without force.
        MetaFile::create(&loc, &opts()).unwrap();
        // Internal metadata whose device changed size is refused.
        f.set_len((32 << 20) + 8192).unwrap();
        assert!(MetaFile::open(&loc, None).is_err());
        let tiny = MetaLocation::Internal(backing(dir.path(), 4096));
        assert!(matches!(
            MetaFile::create(&tiny, &opts()),
            Err(MetaError::DeviceTooSmall { .. })
        ));
        let missing = MetaLocation::Internal(dir.path().join("nope"));
        assert!(matches!(
            MetaFile::open(&missing, None),
            Err(MetaError::Open { .. })
        ));
    }

    #[test]
    fn external_bitmaps_and_activity_log() {
        let dir = tempfile::tempdir().unwrap();
        let loc = MetaLocation::External(dir.path().join("r0.md"));
        assert!(matches!(
            MetaFile::create(&loc, &opts()),
            Err(MetaError::Invalid { .. })
        ));
        // More extents than u32 extent numbers can name: refused before anything is written.
        let too_many = CreateOptions {
            data_size: Some(16 << 40),
            al_extent_size: 4096,
            ..opts()
        };
        assert!(matches!(
            MetaFile::create(&loc, &too_many),
            Err(MetaError::Invalid {
                field: "activity-log extent count",
                ..
            })
        ));
        assert!(!loc.path().exists());
        let data_size = 3 << 30;
        let meta = MetaFile::create(
            &loc,
            &CreateOptions {
                data_size: Some(data_size),
                ..opts()
            },
        )
        .unwrap();
        let g = meta.superblock().geometry;
        assert_eq!(g.data_size, data_size);
        assert_eq!(std::fs::metadata(loc.path()).unwrap().len(), g.md_size());

        let (mut bm, damaged) = meta.read_bitmap(1, OnDamagedPage::Refuse).unwrap();
        assert!(damaged.is_empty());
        assert_eq!(bm.count_bits(), 0);
        bm.set_range(2 << 30, 1 << 20);
        let pages = bm.pages_for_range(2 << 30, 1 << 20);
        meta.write_bitmap_pages(1, &bm, pages.clone()).unwrap();
        meta.sync().unwrap();
        assert_eq!(meta.read_bitmap(1, OnDamagedPage::Refuse).unwrap().0, bm);
        assert_eq!(
            meta.read_bitmap(0, OnDamagedPage::Refuse)
                .unwrap()
                .0
                .count_bits(),
            0
        );
        assert!(meta.read_bitmap(2, OnDamagedPage::Refuse).is_err());
        assert!(
            meta.write_bitmap_pages(0, &Bitmap::new(1, 4096), 0..1)
                .is_err()
        );

        // Damage a page: refused, or marked dirty on request.
        let f = OpenOptions::new().write(true).open(loc.path()).unwrap();
        f.write_all_at(&[1], g.bitmap_page_offset(1, pages.start) + 5)
            .unwrap();
        assert!(matches!(
            meta.read_bitmap(1, OnDamagedPage::Refuse),
            Err(MetaError::ChecksumMismatch {
                record: Record::BitmapPage { slot: 1, .. },
                ..
            })
        ));
        let (dirty, damaged) = meta.read_bitmap(1, OnDamagedPage::MarkDirty).unwrap();
        assert_eq!(damaged, [pages.start]);
        assert!(dirty.count_bits() >= bm.count_bits());
        // A page copied to the wrong place is refused even when marking dirty.
        let rec = bm.encode_page(0, g.page_tag(0, 0));
        f.write_all_at(&rec, g.bitmap_page_offset(1, 0)).unwrap();
        assert!(matches!(
            meta.read_bitmap(1, OnDamagedPage::MarkDirty),
            Err(MetaError::Misplaced { .. })
        ));

        // Activity log: persist transactions, replay them.
        let replayed = meta.read_activity_log().unwrap();
        assert!(replayed.active_extents().is_empty());
        let mut al = ActivityLog::new(replayed, g.al_slots);
        for e in [5u32, 9, 5, 700] {
            for p in al.begin(e, e + 1).unwrap() {
                meta.write_al_transaction(&p).unwrap();
            }
            al.complete(e, e + 1);
        }
        assert_eq!(
            meta.read_activity_log().unwrap().active_extents(),
            [5, 6, 9, 10, 700, 701]
        );
        let mut bad = al.begin(900, 900).unwrap().remove(0);
        bad.pos = 999;
        assert!(meta.write_al_transaction(&bad).is_err());
        assert!(looks_like_superblock(&meta.superblock().encode()));
        assert!(!looks_like_superblock(&[0; 3]));
    }
}
