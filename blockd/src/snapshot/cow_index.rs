//! Which blocks a snapshot has preserved and in which slot of its area, as a pure structure:
//! what a replicated write must copy out first, whether the area has room for it, and how the
//! preserved blocks overlay a live read of the snapshot.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The area cannot hold the blocks a write needs to preserve: the snapshot must be invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the copy-on-write area is full: {needed} more blocks needed, {free} of {capacity} free")]
pub struct CowFull {
    pub needed: u64,
    pub free: u64,
    pub capacity: u64,
}

/// A slot was claimed twice while rebuilding the index from an area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("block {block} is preserved twice (slots {first} and {second})")]
    DuplicateBlock { block: u64, first: u64, second: u64 },
    #[error("slot {slot} is beyond the area's capacity of {capacity} blocks")]
    BeyondCapacity { slot: u64, capacity: u64 },
    #[error("slot {slot} out of order (expected {expected})")]
    OutOfOrder { slot: u64, expected: u64 },
}

/// Part of a snapshot read that must come from the area instead of the live replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    /// Offset into the read's buffer.
    pub at: usize,
    /// Bytes to take.
    pub len: usize,
    /// Area slot holding the block.
    pub slot: u64,
    /// The block it preserves.
    pub block: u64,
    /// Offset inside the block where the bytes start.
    pub within: usize,
}

/// The preserved-block map of one snapshot.
#[derive(Clone, Debug)]
pub struct CowIndex {
    block_size: u64,
    capacity: u64,
    device_size: u64,
    slots: HashMap<u64, u64, BuildHasherDefault<BlockHasher>>,
}

/// Hashes block numbers for the index: the splitmix64 finalizer, a few cycles instead of
/// SipHash's dozens (this map is looked up on every replicated write while a snapshot is
/// open; its keys are block numbers, not attacker-chosen strings, and sequential or strided
/// numbers still spread over every bit).
#[derive(Default)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = self.0.wrapping_add(v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl CowIndex {
    /// An empty index for an area of `capacity` blocks of `block_size` bytes over a device of
    /// `device_size` bytes.
    pub fn new(block_size: u32, capacity: u64, device_size: u64) -> CowIndex {
        CowIndex {
            block_size: u64::from(block_size),
            capacity,
            device_size,
            slots: HashMap::default(),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Blocks preserved so far (= slots used).
    pub fn used(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Slot of `block`, if preserved.
    pub fn slot_of(&self, block: u64) -> Option<u64> {
        self.slots.get(&block).copied()
    }

    /// Bytes the block at `block` covers on the device (the last block may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        let start = block * self.block_size;
        self.block_size.min(self.device_size.saturating_sub(start))
    }

    fn blocks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.device_size);
        if offset >= end {
            return 0..0;
        }
        offset / self.block_size..end.div_ceil(self.block_size)
    }

    /// The blocks a write of `len` bytes at `offset` must preserve first (ascending), or
    /// [`CowFull`] when the area cannot take them all.
    pub fn to_preserve(&self, offset: u64, len: u64) -> Result<Vec<u64>, CowFull> {
        let needed: Vec<u64> = self
            .blocks(offset, len)
            .filter(|b| !self.slots.contains_key(b))
            .collect();
        let free = self.capacity - self.used();
        if needed.len() as u64 > free {
            return Err(CowFull {
                needed: needed.len() as u64,
                free,
                capacity: self.capacity,
            });
        }
        Ok(needed)
    }

    /// Records that `block` is now preserved in the next free slot, which is returned. Call
    /// only for blocks [`to_preserve`](Self::to_preserve) returned; `None` if the area is full
    /// or the block is already preserved.
    pub fn insert(&mut self, block: u64) -> Option<u64> {
        let slot = self.used();
        if slot >= self.capacity {
            return None;
        }
        match self.slots.entry(block) {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(v) => Some(*v.insert(slot)),
        }
    }

    /// Rebuilds the index from an area read back in slot order.
    pub fn restore(&mut self, slot: u64, block: u64) -> Result<(), RestoreError> {
        if slot >= self.capacity {
            return Err(RestoreError::BeyondCapacity {
                slot,
                capacity: self.capacity,
            });
        }
        if slot != self.used() {
            return Err(RestoreError::OutOfOrder {
                slot,
                expected: self.used(),
            });
        }
        if let Some(&first) = self.slots.get(&block) {
            return Err(RestoreError::DuplicateBlock {
                block,
                first,
                second: slot,
            });
        }
        self.slots.insert(block, slot);
        Ok(())
    }

    /// Where a snapshot read of `len` bytes at `offset` must take preserved bytes instead of
    /// live ones (ascending by `at`). The caller reads the live range first and then applies
    /// these: a block preserved while the live read ran is overlaid too.
    pub fn overlays(&self, offset: u64, len: u64) -> Vec<Overlay> {
        let end = offset.saturating_add(len).min(self.device_size);
        let mut out = Vec::new();
        for block in self.blocks(offset, len) {
            let Some(slot) = self.slot_of(block) else {
                continue;
            };
            let bstart = block * self.block_size;
            let from = bstart.max(offset);
            let to = (bstart + self.block_size).min(end);
            out.push(Overlay {
                at: (from - offset) as usize,
                len: (to - from) as usize,
                slot,
                block,
                within: (from - bstart) as usize,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_write_preserves_each_touched_block_once() {
        let mut ix = CowIndex::new(4096, 10, 1 << 20);
        assert_eq!(ix.to_preserve(100, 1), Ok(vec![0]));
        assert_eq!(ix.to_preserve(4095, 2), Ok(vec![0, 1]));
        assert_eq!(ix.insert(0), Some(0));
        assert_eq!(ix.insert(0), None);
        assert_eq!(ix.to_preserve(0, 3 * 4096), Ok(vec![1, 2]));
        assert_eq!(ix.to_preserve(0, 0), Ok(vec![]));
        assert_eq!(ix.to_preserve(1 << 20, 4096), Ok(vec![]));
    }

    #[test]
    fn a_full_area_refuses_the_whole_write() {
        let mut ix = CowIndex::new(4096, 2, 1 << 20);
        ix.insert(5).unwrap();
        assert_eq!(
            ix.to_preserve(0, 3 * 4096),
            Err(CowFull {
                needed: 3,
                free: 1,
                capacity: 2
            })
        );
        assert_eq!(ix.to_preserve(5 * 4096, 4096), Ok(vec![]));
        ix.insert(6).unwrap();
        assert_eq!(ix.insert(7), None);
    }

    #[test]
    fn overlays_cover_exactly_the_preserved_parts() {
        let mut ix = CowIndex::new(4096, 10, 5 * 4096 + 100);
        ix.insert(1).unwrap();
        ix.insert(5).unwrap();
        assert_eq!(
            ix.overlays(4000, 5000),
            vec![Overlay {
                at: 96,
                len: 4096,
                slot: 0,
                block: 1,
                within: 0
            }]
        );
        // The short last block.
        assert_eq!(ix.block_len(5), 100);
        assert_eq!(
            ix.overlays(5 * 4096 + 10, 1000),
            vec![Overlay {
                at: 0,
                len: 90,
                slot: 1,
                block: 5,
                within: 10
            }]
        );
    }

    #[test]
    fn restore_checks_order_capacity_and_duplicates() {
        let mut ix = CowIndex::new(4096, 2, 1 << 20);
        assert_eq!(ix.restore(0, 9), Ok(()));
        assert_eq!(
            ix.restore(2, 3),
            Err(RestoreError::BeyondCapacity {
                slot: 2,
                capacity: 2
            })
        );
        assert_eq!(
            ix.restore(1, 9),
            Err(RestoreError::DuplicateBlock {
                block: 9,
                first: 0,
                second: 1
            })
        );
        assert_eq!(ix.restore(1, 4), Ok(()));
        assert_eq!(ix.slot_of(4), Some(1));
    }

    proptest! {
        /// Model check: applying writes through the index and reading through overlays gives
        /// back the frozen image, byte for byte, until the area is full.
        #[test]
        fn reads_through_the_index_return_the_frozen_image(
            writes in proptest::collection::vec((0u64..4000, 1u64..600, any::<u8>()), 1..40),
            reads in proptest::collection::vec((0u64..4000, 0u64..800), 1..10),
            cap in 0u64..40,
        ) {
            let dev = 4000u64;
            let bs = 512u32;
            let frozen: Vec<u8> = (0..dev).map(|i| (i % 251) as u8).collect();
            let mut live = frozen.clone();
            let mut area: Vec<Vec<u8>> = Vec::new();
            let mut ix = CowIndex::new(bs, cap, dev);
            let mut valid = true;
            for (off, len, byte) in writes {
                match ix.to_preserve(off, len) {
                    Ok(blocks) => {
                        for b in blocks {
                            let s = (b * 512) as usize;
                            let e = (s + 512).min(dev as usize);
                            prop_assert_eq!(ix.insert(b), Some(area.len() as u64));
                            area.push(live[s..e].to_vec());
                        }
                    }
                    Err(_) => valid = false,
                }
                let e = (off + len).min(dev);
                for x in &mut live[off as usize..e as usize] { *x = byte; }
            }
            if valid {
                for (off, len) in reads {
                    let e = (off + len).min(dev) as usize;
                    let mut buf = live[off as usize..e].to_vec();
                    for o in ix.overlays(off, len) {
                        buf[o.at..o.at + o.len].copy_from_slice(&area[o.slot as usize][o.within..o.within + o.len]);
                    }
                    prop_assert_eq!(&buf[..], &frozen[off as usize..e]);
                }
            }
        }
    }
}
