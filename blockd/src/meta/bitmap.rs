//! The dirty bitmap of one peer: one bit per block of data (4 KiB by default) that may differ
//! on that peer. In memory as `u64` words; on disk as 4 KiB pages:
//!
//! ```text
//!   0  bits (4088 bytes = 32704 bits, bit i of the page = byte i/8, bit i%8)
//! 4088 tag u32 (global page number: slot * pages_per_slot + page; catches misplaced pages)
//! 4092 crc32 over bytes 0..4092
//! ```

use super::layout::RECORD_SIZE;
use super::{MetaError, Record, check_crc, seal};

/// Bitmap bytes in one page.
pub const BYTES_PER_PAGE: usize = 4088;
/// Bitmap bits in one page (a whole number of 64-bit words).
pub const BITS_PER_PAGE: usize = BYTES_PER_PAGE * 8;
const WORDS_PER_PAGE: usize = BITS_PER_PAGE / 64;

/// An in-memory dirty bitmap over `data_size` bytes in blocks of `block_size`.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    data_size: u64,
    block_size: u64,
    bits: u64,
    words: Vec<u64>,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmap")
            .field("data_size", &self.data_size)
            .field("block_size", &self.block_size)
            .field("dirty_bits", &self.count_bits())
            .finish()
    }
}

impl Bitmap {
    /// A clean bitmap. `block_size` must be a power of two (checked by the geometry).
    pub fn new(data_size: u64, block_size: u32) -> Bitmap {
        let block_size = u64::from(block_size);
        let bits = data_size.div_ceil(block_size);
        Bitmap {
            data_size,
            block_size,
            bits,
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of bits (blocks).
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Bytes covered by block `bit` (the last block may be short).
    fn block_len(&self, bit: u64) -> u64 {
        (self.data_size - bit * self.block_size).min(self.block_size)
    }

    /// True when block `bit` is dirty.
    pub fn get(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn set_bits(&mut self, start: u64, end: u64, value: bool) -> u64 {
        let end = end.min(self.bits);
        let mut changed = 0;
        let mut bit = start;
        while bit < end {
            // Whole words at a time; partial words at the edges.
            let in_word = bit % 64;
            let n = (64 - in_word).min(end - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << in_word
            };
            let w = &mut self.words[(bit / 64) as usize];
            let before = *w;
            *w = if value { before | mask } else { before & !mask };
            changed += u64::from((before ^ *w).count_ones());
            bit += n;
        }
        changed
    }

    /// Marks every block touched by bytes `[offset, offset + len)` dirty (clamped to the data
    /// size). Returns the number of bits that changed.
    pub fn set_range(&mut self, offset: u64, len: u64) -> u64 {
        if len == 0 || offset >= self.data_size {
            return 0;
        }
        let end = offset.saturating_add(len).min(self.data_size);
        self.set_bits(
            offset / self.block_size,
            end.div_ceil(self.block_size),
            true,
        )
    }

    /// Marks clean the blocks *entirely* inside `[offset, offset + len)` (a block counts as
    /// entirely inside when the range reaches the end of the data). Partially covered blocks
    /// stay dirty: never clean more than was synced. Returns the number of bits that changed.
    pub fn clear_range(&mut self, offset: u64, len: u64) -> u64 {
        if len == 0 || offset >= self.data_size {
            return 0;
        }
        let end = offset.saturating_add(len).min(self.data_size);
        let first = offset.div_ceil(self.block_size);
        let last = if end == self.data_size {
            self.bits
        } else {
            end / self.block_size
        };
        if first >= last {
            return 0;
        }
        self.set_bits(first, last, false)
    }

    /// Marks every block dirty (full sync).
    pub fn set_all(&mut self) {
        self.set_bits(0, self.bits, true);
    }

    /// Marks every block clean.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Number of dirty blocks.
    pub fn count_bits(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Bytes in dirty blocks (a short last block counts its real length).
    pub fn count_dirty_bytes(&self) -> u64 {
        let mut total = self.count_bits() * self.block_size;
        if self.bits > 0 && self.get(self.bits - 1) {
            total -= self.block_size - self.block_len(self.bits - 1);
        }
        total
    }

    /// Dirty byte ranges `(offset, len)`, adjacent dirty blocks merged, in order.
    pub fn dirty_extents(&self) -> DirtyExtents<'_> {
        DirtyExtents { map: self, next: 0 }
    }

    /// The first run of dirty blocks at or after byte `offset` (rounded down to its block),
    /// at most `max_len` bytes long: `(offset, len)`. The resync walk uses it on the live map.
    pub fn dirty_extent_from(&self, offset: u64, max_len: u64) -> Option<(u64, u64)> {
        let start = self.next_set(offset / self.block_size)?;
        let max_bits = (max_len / self.block_size).max(1);
        let end = self.next_clear(start).min(start + max_bits);
        let from = start * self.block_size;
        let to = (end * self.block_size).min(self.data_size);
        Some((from, to - from))
    }

    /// The raw 64-bit words (bit i of the map is bit i%64 of word i/64), for the wire.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// ORs raw words received from a peer into this map (same geometry: same word count).
    pub fn or_words(&mut self, words: &[u64]) -> Result<(), MetaError> {
        if words.len() != self.words.len() {
            return Err(MetaError::BitmapGeometry(format!(
                "{} words received, this bitmap has {}",
                words.len(),
                self.words.len()
            )));
        }
        for (a, b) in self.words.iter_mut().zip(words) {
            *a |= *b;
        }
        // Bits past the end of the data never count.
        if self.bits % 64 != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << (self.bits % 64)) - 1;
        }
        Ok(())
    }

    /// Finds the first dirty block at or after `bit`.
    fn next_set(&self, from: u64) -> Option<u64> {
        let mut bit = from;
        while bit < self.bits {
            let word = self.words[(bit / 64) as usize] >> (bit % 64);
            if word != 0 {
                let found = bit + u64::from(word.trailing_zeros());
                return (found < self.bits).then_some(found);
            }
            bit = (bit / 64 + 1) * 64;
        }
        None
    }

    fn next_clear(&self, from: u64) -> u64 {
        let mut bit = from;
        while bit < self.bits {
            let word = !self.words[(bit / 64) as usize] >> (bit % 64);
            if word != 0 {
                return (bit + u64::from(word.trailing_zeros())).min(self.bits);
            }
            bit = (bit / 64 + 1) * 64;
        }
        self.bits
    }

    /// ORs `other` into this bitmap (combining both sides' changes after a split brain).
    pub fn merge(&mut self, other: &Bitmap) -> Result<(), MetaError> {
        if other.data_size != self.data_size || other.block_size != self.block_size {
            return Err(MetaError::BitmapGeometry(format!(
                "{} bytes in {}-byte blocks vs {} bytes in {}-byte blocks",
                self.data_size, self.block_size, other.data_size, other.block_size
            )));
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        Ok(())
    }

    /// Copies all bits from `other` (same geometry), e.g. a bitmap slot copied for another peer.
    pub fn copy_from(&mut self, other: &Bitmap) -> Result<(), MetaError> {
        self.clear_all();
        self.merge(other)
    }

    /// Pages needed on disk.
    pub fn pages(&self) -> u64 {
        self.bits.div_ceil(BITS_PER_PAGE as u64)
    }

    /// The pages holding blocks touched by bytes `[offset, offset + len)`: the pages to write
    /// after `set_range` on that range.
    pub fn pages_for_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 || offset >= self.data_size {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.data_size);
        let first = offset / self.block_size / BITS_PER_PAGE as u64;
        let last = (end.div_ceil(self.block_size) - 1) / BITS_PER_PAGE as u64;
        first..last + 1
    }

    /// Encodes page `page` with trailer tag `tag`.
    pub fn encode_page(&self, page: u64, tag: u32) -> [u8; RECORD_SIZE as usize] {
        let mut r = [0u8; RECORD_SIZE as usize];
        let first = page as usize * WORDS_PER_PAGE;
        for (i, w) in self
            .words
            .iter()
            .skip(first)
            .take(WORDS_PER_PAGE)
            .enumerate()
        {
            r[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        r[BYTES_PER_PAGE..BYTES_PER_PAGE + 4].copy_from_slice(&tag.to_le_bytes());
        seal(&mut r);
        r
    }

    /// Decodes page `page` (of `record`, at area offset `offset`) into this bitmap, checking
    /// the CRC, the tag and that no bit past the end of the data is set.
    pub fn decode_page(
        &mut self,
        rec: &[u8],
        page: u64,
        tag: u32,
        record: Record,
        offset: u64,
    ) -> Result<(), MetaError> {
        if rec.len() != RECORD_SIZE as usize || page >= self.pages() {
            return Err(MetaError::SizeMismatch {
                what: "bitmap page",
                expected: RECORD_SIZE,
                found: rec.len() as u64,
            });
        }
        check_crc(rec, record, offset)?;
        let found = u32::from_le_bytes(
            rec[BYTES_PER_PAGE..BYTES_PER_PAGE + 4]
                .try_into()
                .expect("4"),
        );
        if found != tag {
            return Err(MetaError::Misplaced {
                record,
                offset,
                found: u64::from(found),
                expected: u64::from(tag),
            });
        }
        let first = page as usize * WORDS_PER_PAGE;
        let n = WORDS_PER_PAGE.min(self.words.len() - first);
        for i in 0..WORDS_PER_PAGE {
            let w = u64::from_le_bytes(rec[i * 8..i * 8 + 8].try_into().expect("8"));
            let valid = if i < n { self.valid_mask(first + i) } else { 0 };
            if w & !valid != 0 {
                return Err(MetaError::Invalid {
                    field: "bitmap page",
                    reason: format!("{record}: bits set past the end of the data"),
                });
            }
            if i < n {
                self.words[first + i] = w;
            }
        }
        Ok(())
    }

    /// Marks every block of page `page` dirty (recovery of a damaged page after a crash).
    pub fn set_page(&mut self, page: u64) {
        let start = page * BITS_PER_PAGE as u64;
        self.set_bits(start, start + BITS_PER_PAGE as u64, true);
    }

    fn valid_mask(&self, word: usize) -> u64 {
        let start = word as u64 * 64;
        if start + 64 <= self.bits {
            u64::MAX
        } else if start >= self.bits {
            0
        } else {
            (1u64 << (self.bits - start)) - 1
        }
    }
}

/// Iterator over dirty byte ranges; see [`Bitmap::dirty_extents`].
pub struct DirtyExtents<'a> {
    map: &'a Bitmap,
    next: u64,
}

impl Iterator for DirtyExtents<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.map.next_set(self.next)?;
        let end = self.map.next_clear(start);
        self.next = end;
        let offset = start * self.map.block_size;
        let end_byte = (end * self.map.block_size).min(self.map.data_size);
        Some((offset, end_byte - offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dirty_extent_from_walks_in_bounded_runs() {
        let mut b = Bitmap::new(100 * 4096, 4096);
        b.set_range(10 * 4096, 20 * 4096);
        b.set_range(90 * 4096, 4096);
        assert_eq!(
            b.dirty_extent_from(0, 8 * 4096),
            Some((10 * 4096, 8 * 4096))
        );
        assert_eq!(
            b.dirty_extent_from(18 * 4096, 1 << 20),
            Some((18 * 4096, 12 * 4096))
        );
        assert_eq!(
            b.dirty_extent_from(30 * 4096, 1 << 20),
            Some((90 * 4096, 4096))
        );
        assert_eq!(b.dirty_extent_from(91 * 4096, 1 << 20), None);
    }

    #[test]
    fn set_clear_count_iterate() {
        // 10 blocks of 4 KiB, the last one 100 bytes short.
        let size = 10 * 4096 - 100;
        let mut b = Bitmap::new(size, 4096);
        assert_eq!(b.bits(), 10);
        assert_eq!(b.set_range(4095, 2), 2, "straddles blocks 0 and 1");
        assert_eq!(b.set_range(4096, 1), 0, "already dirty");
        assert_eq!(b.set_range(5 * 4096, 3 * 4096), 3);
        assert_eq!(b.set_range(size - 1, 1000), 1, "clamped to the data");
        assert_eq!(b.set_range(size, 10), 0, "past the end");
        assert_eq!(b.set_range(0, 0), 0);
        assert_eq!(b.count_bits(), 6);
        assert_eq!(b.count_dirty_bytes(), 6 * 4096 - 100);
        let ext: Vec<_> = b.dirty_extents().collect();
        assert_eq!(
            ext,
            [(0, 2 * 4096), (5 * 4096, 3 * 4096), (9 * 4096, 4096 - 100)]
        );
        // Clearing only removes fully covered blocks.
        assert_eq!(b.clear_range(100, 4096), 0);
        assert_eq!(b.clear_range(0, 4096 + 1), 1);
        assert!(!b.get(0) && b.get(1));
        // The short last block is fully covered when the range reaches the end.
        assert_eq!(b.clear_range(9 * 4096, 4096 - 100), 1);
        assert_eq!(b.clear_range(size + 5, 1), 0);
        assert_eq!(b.clear_range(0, 0), 0);
        assert!(!b.get(1000));
        b.set_all();
        assert_eq!(b.count_dirty_bytes(), size);
        assert_eq!(b.dirty_extents().collect::<Vec<_>>(), [(0, size)]);
        b.clear_all();
        assert_eq!(b.dirty_extents().next(), None);
        assert!(format!("{b:?}").contains("dirty_bits: 0"));
    }

    #[test]
    fn merge_and_copy() {
        let mut a = Bitmap::new(1 << 20, 4096);
        let mut b = Bitmap::new(1 << 20, 4096);
        a.set_range(0, 8192);
        b.set_range(4096, 8192);
        let mut m = a.clone();
        m.merge(&b).unwrap();
        assert_eq!(m.dirty_extents().collect::<Vec<_>>(), [(0, 3 * 4096)]);
        m.copy_from(&b).unwrap();
        assert_eq!(m, b);
        assert!(matches!(
            a.merge(&Bitmap::new(1 << 21, 4096)),
            Err(MetaError::BitmapGeometry(_))
        ));
    }

    #[test]
    fn pages() {
        let bs = 4096u64;
        let size = (BITS_PER_PAGE as u64 * 2 + 10) * bs;
        let mut b = Bitmap::new(size, 4096);
        assert_eq!(b.pages(), 3);
        let page_bytes = BITS_PER_PAGE as u64 * bs;
        assert_eq!(b.pages_for_range(0, 1), 0..1);
        assert_eq!(b.pages_for_range(page_bytes - 1, 2), 0..2);
        assert_eq!(b.pages_for_range(size - 1, 100), 2..3);
        assert_eq!(b.pages_for_range(size, 1), 0..0);
        b.set_range(page_bytes - 4096, 8192);
        b.set_range(size - 1, 1);
        let mut back = Bitmap::new(size, 4096);
        for p in 0..b.pages() {
            let rec = b.encode_page(p, 40 + p as u32);
            back.decode_page(
                &rec,
                p,
                40 + p as u32,
                Record::BitmapPage { slot: 0, page: p },
                0,
            )
            .unwrap();
        }
        assert_eq!(back, b);
        // A page written for another place is refused.
        let rec = b.encode_page(1, 41);
        assert!(matches!(
            back.decode_page(&rec, 1, 7, Record::BitmapPage { slot: 0, page: 1 }, 0),
            Err(MetaError::Misplaced {
                found: 41,
                expected: 7,
                ..
            })
        ));
        assert!(matches!(
            back.decode_page(&rec, 9, 41, Record::BitmapPage { slot: 0, page: 9 }, 0),
            Err(MetaError::SizeMismatch { .. })
        ));
        // Bits past the end of the data are refused even with a valid CRC.
        let mut rec = b.encode_page(2, 42);
        rec[100] = 0xff;
        seal(&mut rec);
        assert!(matches!(
            back.decode_page(&rec, 2, 42, Record::BitmapPage { slot: 0, page: 2 }, 0),
            Err(MetaError::Invalid { .. })
        ));
        let mut empty = Bitmap::new(size, 4096);
        empty.set_page(2);
        assert_eq!(empty.count_bits(), 10);
    }

    #[test]
    fn every_single_bit_flip_in_a_page_is_detected() {
        let mut b = Bitmap::new(1 << 30, 4096);
        b.set_range(12345, 999_999);
        let rec = b.encode_page(0, 3);
        let rec_id = Record::BitmapPage { slot: 0, page: 0 };
        for bit in 0..rec.len() * 8 {
            let mut r = rec;
            r[bit / 8] ^= 1 << (bit % 8);
            let mut t = Bitmap::new(1 << 30, 4096);
            assert!(t.decode_page(&r, 0, 3, rec_id, 0).is_err(), "bit {bit}");
        }
    }

    proptest! {
        #[test]
        fn extents_match_bits(
            size in 1u64..(1 << 22),
            ranges in proptest::collection::vec((0u64..(1 << 22), 0u64..(1 << 18)), 0..8),
            clears in proptest::collection::vec((0u64..(1 << 22), 0u64..(1 << 18)), 0..4),
        ) {
            let mut b = Bitmap::new(size, 4096);
            for (o, l) in &ranges { b.set_range(*o, *l); }
            for (o, l) in &clears { b.clear_range(*o, *l); }
            // Every set range that was not cleared afterwards is covered by the extents.
            let ext: Vec<_> = b.dirty_extents().collect();
            let total: u64 = ext.iter().map(|e| e.1).sum();
            prop_assert_eq!(total, b.count_dirty_bytes());
            for w in ext.windows(2) { prop_assert!(w[0].0 + w[0].1 < w[1].0, "merged"); }
            for (o, l) in ext {
                prop_assert!(o + l <= size);
                prop_assert!(b.get(o / 4096) && b.get((o + l - 1) / 4096));
            }
            // Page round trip.
            let mut back = Bitmap::new(size, 4096);
            for p in 0..b.pages() {
                let rec = b.encode_page(p, p as u32);
                back.decode_page(&rec, p, p as u32, Record::BitmapPage { slot: 0, page: p }, 0).unwrap();
            }
            prop_assert_eq!(back, b);
        }
    }
}
