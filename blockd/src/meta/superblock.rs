//! The superblock record: identity, geometry, flags and generation identifiers of one node's
//! metadata. Encoded into exactly 4 KiB, little-endian, CRC-32 trailer:
//!
//! ```text
//!   0  magic "BLKDMETA"        8  version u32        12  flags u32
//!  16  seq u64 (newest copy wins)                    24  data_size u64
//!  32  md_size u64             40  node_id u32       44  bitmap_block_size u32
//!  48  peer_slots u32          52  al_slots u32      56  al_extent_size u32
//!  60  al_extents u32          64  current uuid u64
//!  72  history uuids 8 x u64
//! 136  peers 32 x { bitmap uuid u64, bitmap slot u16 (0xffff: none), flags u16, 0 u32 }
//!      (peer flags: bit 0 OUTDATED, bit 1 FULL_SYNC, bit 2 REPAIR_MARKS; see [`peer_flags`])
//! 648  zero padding           4092  crc32 over bytes 0..4092
//! ```

use super::generation::{GenerationIds, HISTORY_LEN, MAX_NODES, Uuid};
use super::layout::{Geometry, RECORD_SIZE};
use super::{MetaError, Record, check_crc, seal};

/// Magic at offset 0 of every superblock.
pub const MAGIC: [u8; 8] = *b"BLKDMETA";
/// The metadata format version this build reads and writes.
pub const VERSION: u32 = 1;

const PEERS_AT: usize = 136;
const PEER_LEN: usize = 16;
const NO_SLOT: u16 = 0xffff;

/// Node flags (`Superblock::flags`).
pub mod flags {
    /// The data is consistent (cleared while this node is a sync target or never synced).
    pub const CONSISTENT: u32 = 1 << 0;
    /// The data was UpToDate when last known (Outdated/Consistent otherwise).
    pub const WAS_UP_TO_DATE: u32 = 1 << 1;
    /// Set while Primary, cleared on a clean demote: found set at attach = crashed Primary.
    pub const PRIMARY: u32 = 1 << 2;
    /// Set while attached, cleared on a clean detach: found set = unclean shutdown (replay the
    /// activity log into the bitmaps).
    pub const ATTACHED: u32 = 1 << 3;
    /// Every flag this version knows.
    pub const ALL: u32 = CONSISTENT | WAS_UP_TO_DATE | PRIMARY | ATTACHED;
}

/// Per-peer flags (`PeerSlot::flags`).
pub mod peer_flags {
    /// The peer is known to be Outdated.
    pub const OUTDATED: u16 = 1 << 0;
    /// A full sync towards this peer is pending (set all bits when it connects).
    pub const FULL_SYNC: u16 = 1 << 1;
    /// The peer's bitmap slot holds repair marks (blocks found differing by a verify, or
    /// possibly bad after a local I/O error): never cleared as obsolete, only by a resync.
    /// Persisted no later than the bitmap pages holding such marks; metadata written before
    /// this flag existed has it clear (no repair marks known). Builds that do not know it
    /// refuse metadata with it set ("unknown bits"), never read such marks as ordinary.
    pub const REPAIR_MARKS: u16 = 1 << 2;
    /// Every flag this version knows.
    pub const ALL: u16 = OUTDATED | FULL_SYNC | REPAIR_MARKS;
}

/// What the superblock records about one peer node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerSlot {
    /// The bitmap slot tracking this peer, if one is assigned.
    pub bitmap_slot: Option<u16>,
    pub flags: u16,
}

/// A decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Update counter: each write goes to the other copy with `seq + 1`.
    pub seq: u64,
    pub flags: u32,
    pub node_id: u8,
    pub geometry: Geometry,
    /// Bytes of the metadata area (checked against the geometry).
    pub md_size: u64,
    pub generations: GenerationIds,
    /// Indexed by peer node id.
    pub peers: [PeerSlot; MAX_NODES],
}

impl Superblock {
    /// A new superblock for freshly created metadata.
    pub fn new(node_id: u8, geometry: Geometry) -> Superblock {
        Superblock {
            seq: 0,
            flags: 0,
            node_id,
            md_size: geometry.md_size(),
            geometry,
            generations: GenerationIds::just_created(),
            peers: [PeerSlot::default(); MAX_NODES],
        }
    }

    /// True when `flag` (from [`flags`]) is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// The bitmap slot of peer `node_id`, assigning the lowest free one if it has none.
    /// `None` when all slots are taken (or for this node's own id).
    pub fn bitmap_slot_for(&mut self, node_id: u8) -> Option<u16> {
        if node_id == self.node_id || node_id as usize >= MAX_NODES {
            return None;
        }
        if let Some(slot) = self.peers[node_id as usize].bitmap_slot {
            return Some(slot);
        }
        let used: Vec<u16> = self.peers.iter().filter_map(|p| p.bitmap_slot).collect();
        let free = (0..self.geometry.peer_slots as u16).find(|s| !used.contains(s))?;
        self.peers[node_id as usize].bitmap_slot = Some(free);
        Some(free)
    }

    /// The peer node id whose bitmap is kept in slot `slot`.
    fn node_of_slot(&self, slot: usize) -> Option<usize> {
        self.peers
            .iter()
            .position(|p| p.bitmap_slot.is_some_and(|s| usize::from(s) == slot))
    }

    /// Whether bitmap slot `slot` holds repair marks ([`peer_flags::REPAIR_MARKS`] of the
    /// peer the slot belongs to; false for a slot no peer has).
    pub fn has_repair_marks(&self, slot: usize) -> bool {
        self.node_of_slot(slot)
            .is_some_and(|n| self.peers[n].flags & peer_flags::REPAIR_MARKS != 0)
    }

    /// Sets or clears [`peer_flags::REPAIR_MARKS`] of the peer whose bitmap is in slot `slot`
    /// (in memory: persist with the superblock). Returns false when no peer has the slot.
    pub fn set_repair_marks(&mut self, slot: usize, repair_marks: bool) -> bool {
        let Some(n) = self.node_of_slot(slot) else {
            return false;
        };
        if repair_marks {
            self.peers[n].flags |= peer_flags::REPAIR_MARKS;
        } else {
            self.peers[n].flags &= !peer_flags::REPAIR_MARKS;
        }
        true
    }

    /// This superblock with the [`peer_flags::REPAIR_MARKS`] flags `wanted` has and this one
    /// lacks added (each with the bitmap slot `wanted` gives its peer), nothing else changed;
    /// `None` when none is lacking. Persists a repair-marks flag ahead of other changes of
    /// `wanted` that are not due yet (see `MetaState::persist_repair_flags`).
    pub fn with_repair_flags_of(&self, wanted: &Superblock) -> Option<Superblock> {
        let mut next = self.clone();
        let mut added = false;
        for (on_disk, w) in next.peers.iter_mut().zip(&wanted.peers) {
            let has = |p: &PeerSlot| p.flags & peer_flags::REPAIR_MARKS != 0;
            if has(w) && (!has(on_disk) || on_disk.bitmap_slot != w.bitmap_slot) {
                on_disk.bitmap_slot = w.bitmap_slot;
                on_disk.flags |= peer_flags::REPAIR_MARKS;
                added = true;
            }
        }
        added.then_some(next)
    }

    /// Encodes into one 4 KiB record.
    pub fn encode(&self) -> [u8; RECORD_SIZE as usize] {
        let mut r = [0u8; RECORD_SIZE as usize];
        let g = &self.geometry;
        r[0..8].copy_from_slice(&MAGIC);
        put32(&mut r, 8, VERSION);
        put32(&mut r, 12, self.flags);
        put64(&mut r, 16, self.seq);
        put64(&mut r, 24, g.data_size);
        put64(&mut r, 32, self.md_size);
        put32(&mut r, 40, u32::from(self.node_id));
        put32(&mut r, 44, g.bitmap_block_size);
        put32(&mut r, 48, g.peer_slots);
        put32(&mut r, 52, g.al_slots);
        put32(&mut r, 56, g.al_extent_size);
        put32(&mut r, 60, g.al_extents);
        put64(&mut r, 64, self.generations.current.0);
        for (i, h) in self.generations.history.iter().enumerate() {
            put64(&mut r, 72 + 8 * i, h.0);
        }
        for n in 0..MAX_NODES {
            let at = PEERS_AT + n * PEER_LEN;
            put64(&mut r, at, self.generations.bitmap[n].0);
            let slot = self.peers[n].bitmap_slot.unwrap_or(NO_SLOT);
            r[at + 8..at + 10].copy_from_slice(&slot.to_le_bytes());
            r[at + 10..at + 12].copy_from_slice(&self.peers[n].flags.to_le_bytes());
        }
        seal(&mut r);
        r
    }

    /// Decodes superblock copy `copy` read from area offset `offset`.
    pub fn decode(rec: &[u8], copy: u8, offset: u64) -> Result<Superblock, MetaError> {
        let record = Record::Superblock(copy);
        if rec.len() != RECORD_SIZE as usize {
            return Err(MetaError::SizeMismatch {
                what: "superblock record",
                expected: RECORD_SIZE,
                found: rec.len() as u64,
            });
        }
        if rec[0..8] != MAGIC {
            return Err(MetaError::BadMagic {
                record,
                offset,
                found: rec[0..8].to_vec(),
            });
        }
        let version = get32(rec, 8);
        if version != VERSION {
            return Err(MetaError::UnsupportedVersion {
                record,
                offset,
                found: version,
                supported: VERSION,
            });
        }
        check_crc(rec, record, offset)?;
        let invalid = |field, reason: String| MetaError::Invalid { field, reason };
        let flags = get32(rec, 12);
        if flags & !flags::ALL != 0 {
            return Err(invalid("flags", format!("unknown bits {flags:#x}")));
        }
        let node_id = get32(rec, 40);
        if node_id as usize >= MAX_NODES {
            return Err(invalid("node id", format!("{node_id} exceeds 31")));
        }
        let geometry = Geometry {
            data_size: get64(rec, 24),
            bitmap_block_size: get32(rec, 44),
            peer_slots: get32(rec, 48),
            al_slots: get32(rec, 52),
            al_extent_size: get32(rec, 56),
            al_extents: get32(rec, 60),
        };
        geometry.validate()?;
        let md_size = get64(rec, 32);
        if md_size != geometry.md_size() {
            return Err(MetaError::SizeMismatch {
                what: "metadata area per geometry",
                expected: md_size,
                found: geometry.md_size(),
            });
        }
        let mut generations = GenerationIds::just_created();
        generations.current = Uuid(get64(rec, 64));
        for i in 0..HISTORY_LEN {
            generations.history[i] = Uuid(get64(rec, 72 + 8 * i));
        }
        let mut peers = [PeerSlot::default(); MAX_NODES];
        let mut used = 0u32;
        #[allow(clippy::needless_range_loop)] // n indexes two arrays and the record
        for n in 0..MAX_NODES {
            let at = PEERS_AT + n * PEER_LEN;
            generations.bitmap[n] = Uuid(get64(rec, at));
            let slot = u16::from_le_bytes([rec[at + 8], rec[at + 9]]);
            let pflags = u16::from_le_bytes([rec[at + 10], rec[at + 11]]);
            if pflags & !peer_flags::ALL != 0 {
                return Err(invalid(
                    "peer flags",
                    format!("node {n}: unknown bits {pflags:#x}"),
                ));
            }
            let bitmap_slot = if slot == NO_SLOT {
                None
            } else if u32::from(slot) >= geometry.peer_slots || used & (1 << slot) != 0 {
                return Err(invalid(
                    "bitmap slot",
                    format!("node {n}: slot {slot} out of range or assigned twice"),
                ));
            } else {
                used |= 1 << slot;
                Some(slot)
            };
            peers[n] = PeerSlot {
                bitmap_slot,
                flags: pflags,
            };
        }
        Ok(Superblock {
            seq: get64(rec, 16),
            flags,
            node_id: node_id as u8,
            geometry,
            md_size,
            generations,
            peers,
        })
    }
}

fn put32(r: &mut [u8], at: usize, v: u32) {
    r[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(r: &mut [u8], at: usize, v: u64) {
    r[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get32(r: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(r[at..at + 4].try_into().expect("in bounds"))
}

fn get64(r: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(r[at..at + 8].try_into().expect("in bounds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::activity_log::ring_len_for;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        let g = Geometry {
            data_size: 1 << 30,
            bitmap_block_size: 4096,
            peer_slots: 3,
            al_slots: ring_len_for(1237),
            al_extent_size: 4 << 20,
            al_extents: 1237,
        };
        let mut sb = Superblock::new(2, g);
        sb.seq = 7;
        sb.flags = flags::CONSISTENT | flags::PRIMARY;
        sb.generations.current = Uuid(0xDEAD_BEEF_0000_0001);
        sb.generations.history[0] = Uuid(0x1234);
        sb.generations.bitmap[0] = Uuid(0x5678);
        sb.peers[0] = PeerSlot {
            bitmap_slot: Some(1),
            flags: peer_flags::OUTDATED,
        };
        sb
    }

    #[test]
    fn round_trip_and_layout() {
        let sb = sample();
        let rec = sb.encode();
        assert_eq!(&rec[..8], b"BLKDMETA");
        assert_eq!(Superblock::decode(&rec, 0, 0).unwrap(), sb);
    }

    #[test]
    fn refusals() {
        let rec = sample().encode();
        let mut foreign = rec;
        foreign[..8].copy_from_slice(b"DRBD9MD!");
        assert!(matches!(
            Superblock::decode(&foreign, 1, 4096),
            Err(MetaError::BadMagic {
                record: Record::Superblock(1),
                offset: 4096,
                ..
            })
        ));
        let mut newer = rec;
        newer[8] = 2;
        assert!(matches!(
            Superblock::decode(&newer, 0, 0),
            Err(MetaError::UnsupportedVersion { found: 2, .. })
        ));
        assert!(matches!(
            Superblock::decode(&rec[..100], 0, 0),
            Err(MetaError::SizeMismatch { .. })
        ));
        // Semantically invalid but correctly sealed records are refused too.
        let resealed = |f: &dyn Fn(&mut [u8])| {
            let mut r = rec;
            f(&mut r);
            seal(&mut r);
            Superblock::decode(&r, 0, 0)
        };
        let field = |e: Result<Superblock, MetaError>| match e {
            Err(MetaError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(resealed(&|r| r[12] = 0x80)), "flags");
        assert_eq!(field(resealed(&|r| put32(r, 40, 40))), "node id");
        assert_eq!(
            field(resealed(&|r| put32(r, 44, 1000))),
            "bitmap block size"
        );
        let at = PEERS_AT + 5 * PEER_LEN;
        assert_eq!(
            field(resealed(
                &|r| r[at + 8..at + 10].copy_from_slice(&9u16.to_le_bytes())
            )),
            "bitmap slot"
        );
        // Slot 1 is already assigned to node 0.
        assert_eq!(
            field(resealed(
                &|r| r[at + 8..at + 10].copy_from_slice(&1u16.to_le_bytes())
            )),
            "bitmap slot"
        );
        assert_eq!(field(resealed(&|r| r[at + 10] = 0x40)), "peer flags");
        assert_eq!(field(resealed(&|r| r[at + 10] = 0x08)), "peer flags");
        // Metadata of a device with more extents than u32 extent numbers can name.
        assert_eq!(
            field(resealed(&|r| {
                put64(r, 24, 16 << 40);
                put32(r, 56, 4096);
            })),
            "activity-log extent count"
        );
        assert!(matches!(
            resealed(&|r| put64(r, 32, 1)),
            Err(MetaError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let rec = sample().encode();
        for bit in 0..rec.len() * 8 {
            let mut r = rec;
            r[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Superblock::decode(&r, 0, 0).is_err(),
                "bit {bit} flip undetected"
            );
        }
    }

    /// The repair-marks fact of a bitmap slot is a flag of the peer owning the slot: it
    /// survives an encode/decode, leaves the other flags alone, and metadata written before the
    /// flag existed (peer flags 0..=3 only) reads as holding no repair marks.
    #[test]
    fn repair_marks_flag_round_trips_per_slot() {
        let mut sb = sample();
        // Node 0 has slot 1 (sample); give node 4 slot 0. Slot 2 belongs to nobody.
        assert_eq!(sb.bitmap_slot_for(4), Some(0));
        let old = Superblock::decode(&sb.encode(), 0, 0).unwrap();
        assert!((0..3).all(|slot| !old.has_repair_marks(slot)));

        assert!(sb.set_repair_marks(1, true));
        assert!(!sb.set_repair_marks(2, true), "no peer has slot 2");
        let rec = sb.encode();
        let at = PEERS_AT;
        assert_eq!(
            u16::from_le_bytes([rec[at + 10], rec[at + 11]]),
            peer_flags::OUTDATED | peer_flags::REPAIR_MARKS
        );
        let back = Superblock::decode(&rec, 1, 4096).unwrap();
        assert_eq!(back, sb);
        assert!(back.has_repair_marks(1));
        assert!(!back.has_repair_marks(0));
        assert!(!back.has_repair_marks(2));
        assert!(back.peers[0].flags & peer_flags::OUTDATED != 0);

        let mut cleared = back;
        assert!(cleared.set_repair_marks(1, false));
        assert!(!cleared.has_repair_marks(1));
        assert_eq!(cleared.peers[0].flags, peer_flags::OUTDATED);
        assert_eq!(
            Superblock::decode(&cleared.encode(), 0, 0).unwrap(),
            cleared
        );
    }

    #[test]
    fn bitmap_slot_assignment() {
        let mut sb = sample();
        assert_eq!(sb.bitmap_slot_for(0), Some(1));
        assert_eq!(sb.bitmap_slot_for(2), None, "own id");
        assert_eq!(sb.bitmap_slot_for(40), None);
        assert_eq!(sb.bitmap_slot_for(5), Some(0));
        assert_eq!(sb.bitmap_slot_for(6), Some(2));
        assert_eq!(sb.bitmap_slot_for(7), None, "all 3 slots taken");
        assert_eq!(sb.bitmap_slot_for(5), Some(0), "stable");
    }

    proptest! {
        #[test]
        fn round_trips(
            seq in any::<u64>(),
            flags_v in 0u32..16,
            node_id in 0u8..32,
            current in any::<u64>(),
            history in proptest::collection::vec(any::<u64>(), HISTORY_LEN),
            bitmaps in proptest::collection::vec(any::<u64>(), MAX_NODES),
            pflags in proptest::collection::vec(0u16..8, MAX_NODES),
            slots in 0u32..32,
        ) {
            let mut sb = sample();
            sb.seq = seq;
            sb.flags = flags_v;
            sb.node_id = node_id;
            sb.geometry.peer_slots = slots.min(31);
            sb.md_size = sb.geometry.md_size();
            sb.generations.current = Uuid(current);
            for (slot, h) in sb.generations.history.iter_mut().zip(&history) { *slot = Uuid(*h); }
            for n in 0..MAX_NODES {
                sb.generations.bitmap[n] = Uuid(bitmaps[n]);
                sb.peers[n] = PeerSlot { bitmap_slot: None, flags: pflags[n] };
            }
            for n in 0..MAX_NODES as u8 { sb.bitmap_slot_for(n); }
            let rec = sb.encode();
            prop_assert_eq!(Superblock::decode(&rec, 0, 0).unwrap(), sb);
        }
    }
}
