//! Where each metadata record lives and how big the metadata area is, for internal metadata
//! (at the end of the backing device) and external metadata (a file of its own).
//!
//! The area is a sequence of 4 KiB records and always *ends* at the 4 KiB-aligned end of its
//! device or file, so the superblock is found without knowing the geometry first:
//!
//! ```text
//! offset 0          activity-log ring       al_slots records
//! then              dirty bitmaps           peer_slots x pages_per_slot records
//! md_size - 8 KiB   superblock copy 0       (the copies alternate; the newest valid one wins)
//! md_size - 4 KiB   superblock copy 1
//! ```
//!
//! Internal metadata: the area sits at the end of the backing device and the data is
//! everything before it. External metadata: a file whose (aligned) end is the area's end.

use super::MetaError;
use super::activity_log::ring_len_for;
use super::bitmap::BITS_PER_PAGE;

/// Size of every metadata record.
pub const RECORD_SIZE: u64 = 4096;
/// Superblock copies at the start of the area.
pub const SUPERBLOCK_COPIES: u64 = 2;
/// Default bytes of data per bitmap bit.
pub const DEFAULT_BITMAP_BLOCK_SIZE: u32 = 4096;
/// Default bytes per activity-log extent (DRBD: 4 MiB).
pub const DEFAULT_AL_EXTENT_SIZE: u32 = 4 << 20;
/// Default active extents (DRBD's default al-extents).
pub const DEFAULT_AL_EXTENTS: u32 = 1237;

/// The geometry parameters stored in the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Usable data bytes (what the NBD export shows).
    pub data_size: u64,
    /// Bytes of data per bitmap bit (power of two, 512 B ..= 1 MiB).
    pub bitmap_block_size: u32,
    /// Bitmap slots (one per peer this node can track; at most 31).
    pub peer_slots: u32,
    /// Records in the activity-log ring.
    pub al_slots: u32,
    /// Bytes per activity-log extent (power of two, >= bitmap block size).
    pub al_extent_size: u32,
    /// Extents the activity log may hold active.
    pub al_extents: u32,
}

impl Geometry {
    /// Checks the parameters (shared by create and decode).
    pub fn validate(&self) -> Result<(), MetaError> {
        let bad = |field: &'static str, reason: String| Err(MetaError::Invalid { field, reason });
        let bs = self.bitmap_block_size;
        if !bs.is_power_of_two() || !(512..=1 << 20).contains(&bs) {
            return bad(
                "bitmap block size",
                format!("{bs} is not a power of two in 512..=1M"),
            );
        }
        let es = self.al_extent_size;
        if !es.is_power_of_two() || es < bs {
            return bad(
                "activity-log extent size",
                format!("{es} is not a power of two >= the bitmap block size {bs}"),
            );
        }
        if self.peer_slots > 31 {
            return bad("peer slots", format!("{} exceeds 31", self.peer_slots));
        }
        if !(1..=65534).contains(&self.al_extents) {
            return bad(
                "activity-log extents",
                format!("{} not in 1..=65534", self.al_extents),
            );
        }
        if self.al_slots < ring_len_for(self.al_extents) {
            return bad(
                "activity-log slots",
                format!(
                    "{} records cannot hold {} extents (need {})",
                    self.al_slots,
                    self.al_extents,
                    ring_len_for(self.al_extents)
                ),
            );
        }
        if self.data_size == 0 {
            return bad("data size", "is zero".into());
        }
        // Extent numbers are u32 with u32::MAX meaning "empty slot" in the log; more extents
        // would wrap (aliasing far-apart extents, colliding with the empty marker).
        let extents = self.al_extent_count();
        if extents >= u64::from(u32::MAX) {
            return bad(
                "activity-log extent count",
                format!(
                    "{} data bytes in {es}-byte extents are {extents} extents; at most {} fit \
                     (use a larger al-extent-size)",
                    self.data_size,
                    u32::MAX - 1
                ),
            );
        }
        Ok(())
    }

    /// Activity-log extents covering the data.
    pub fn al_extent_count(&self) -> u64 {
        self.data_size.div_ceil(u64::from(self.al_extent_size))
    }

    /// Bits in one peer's bitmap.
    pub fn bitmap_bits(&self) -> u64 {
        self.data_size.div_ceil(u64::from(self.bitmap_block_size))
    }

    /// 4 KiB pages per peer bitmap.
    pub fn pages_per_slot(&self) -> u64 {
        self.bitmap_bits().div_ceil(BITS_PER_PAGE as u64)
    }

    /// Bytes of the metadata area.
    pub fn md_size(&self) -> u64 {
        RECORD_SIZE
            * (SUPERBLOCK_COPIES
                + u64::from(self.al_slots)
                + u64::from(self.peer_slots) * self.pages_per_slot())
    }

    /// Offset of superblock copy `copy` (0 or 1) *before the end* of the area.
    pub fn superblock_from_end(copy: u8) -> u64 {
        RECORD_SIZE * (SUPERBLOCK_COPIES - u64::from(copy))
    }

    /// Offset (within the area) of activity-log record `slot`.
    pub fn al_offset(&self, slot: u32) -> u64 {
        RECORD_SIZE * u64::from(slot)
    }

    /// Offset (within the area) of bitmap page `page` of peer slot `slot`.
    pub fn bitmap_page_offset(&self, slot: u32, page: u64) -> u64 {
        RECORD_SIZE * (u64::from(self.al_slots) + u64::from(slot) * self.pages_per_slot() + page)
    }

    /// The global page number stored in a page's trailer (catches misdirected writes).
    pub fn page_tag(&self, slot: u32, page: u64) -> u32 {
        (u64::from(slot) * self.pages_per_slot() + page) as u32
    }
}

/// The 4 KiB-aligned end of a device or file of `size` bytes: where the metadata area ends.
pub fn aligned_end(size: u64) -> u64 {
    size / RECORD_SIZE * RECORD_SIZE
}

/// Geometry for internal metadata on a device of `device_size` bytes: the metadata area is
/// sized for a bitmap of the whole device and ends at its aligned end; the data is everything
/// before it. Returns the geometry and the area's offset.
pub fn internal_geometry(
    device_size: u64,
    bitmap_block_size: u32,
    peer_slots: u32,
    al_extent_size: u32,
    al_extents: u32,
) -> Result<(Geometry, u64), MetaError> {
    let mut g = Geometry {
        data_size: device_size,
        bitmap_block_size,
        peer_slots,
        al_slots: ring_len_for(al_extents),
        al_extent_size,
        al_extents,
    };
    g.validate()?;
    let md_size = g.md_size();
    let offset = aligned_end(device_size).saturating_sub(md_size);
    if offset == 0 {
        return Err(MetaError::DeviceTooSmall {
            size: device_size,
            needed: md_size + RECORD_SIZE,
        });
    }
    g.data_size = offset;
    Ok((g, offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(data_size: u64) -> Geometry {
        Geometry {
            data_size,
            bitmap_block_size: 4096,
            peer_slots: 2,
            al_slots: ring_len_for(1237),
            al_extent_size: 4 << 20,
            al_extents: 1237,
        }
    }

    #[test]
    fn sizes_and_offsets() {
        let g = geometry(1 << 30);
        assert_eq!(g.bitmap_bits(), 262_144);
        assert_eq!(
            g.pages_per_slot(),
            262_144u64.div_ceil(BITS_PER_PAGE as u64)
        );
        assert_eq!(g.pages_per_slot(), 9);
        let al = u64::from(g.al_slots);
        assert_eq!(g.md_size(), 4096 * (2 + al + 2 * 9));
        assert_eq!(g.al_offset(1), 4096);
        assert_eq!(g.bitmap_page_offset(0, 0), 4096 * al);
        assert_eq!(g.bitmap_page_offset(1, 2), 4096 * (al + 9 + 2));
        // The last bitmap page ends where superblock copy 0 starts.
        assert_eq!(
            g.bitmap_page_offset(1, 8) + 4096,
            g.md_size() - Geometry::superblock_from_end(0)
        );
        assert_eq!(g.page_tag(1, 2), 11);
        assert_eq!(Geometry::superblock_from_end(1), 4096);
        assert_eq!(aligned_end(8191), 4096);
        g.validate().unwrap();
    }

    #[test]
    fn internal_placement() {
        let dev = (1u64 << 30) + 12345;
        let (g, off) = internal_geometry(dev, 4096, 1, 4 << 20, 1237).unwrap();
        assert_eq!(off % 4096, 0);
        assert_eq!(g.data_size, off);
        assert_eq!(
            off + g.md_size(),
            aligned_end(dev),
            "area ends at the aligned end"
        );
        assert!(matches!(
            internal_geometry(16 << 10, 4096, 1, 4 << 20, 1237),
            Err(MetaError::DeviceTooSmall { .. })
        ));
    }

    #[test]
    fn extent_numbers_fit_below_the_empty_marker() {
        let max = Geometry {
            data_size: (u64::from(u32::MAX) - 1) * 4096,
            al_extent_size: 4096,
            ..geometry(0)
        };
        max.validate().unwrap();
        assert_eq!(max.al_extent_count(), u64::from(u32::MAX) - 1);
        // One byte more starts extent u32::MAX - 1 + 1, the empty marker.
        let over = Geometry {
            data_size: max.data_size + 1,
            ..max
        };
        let err = over.validate().unwrap_err();
        assert!(
            matches!(
                err,
                MetaError::Invalid {
                    field: "activity-log extent count",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("larger al-extent-size"), "{err}");
        // The same size in the default 4 MiB extents is fine.
        Geometry {
            al_extent_size: 4 << 20,
            ..over
        }
        .validate()
        .unwrap();
        assert!(internal_geometry(over.data_size + (1 << 30), 4096, 1, 4096, 1237).is_err());
    }

    #[test]
    fn validation() {
        let ok = geometry(1 << 20);
        let cases: [(Geometry, &str); 8] = [
            (
                Geometry {
                    bitmap_block_size: 3000,
                    ..ok
                },
                "bitmap block size",
            ),
            (
                Geometry {
                    bitmap_block_size: 256,
                    ..ok
                },
                "bitmap block size",
            ),
            (
                Geometry {
                    al_extent_size: 2048,
                    ..ok
                },
                "activity-log extent size",
            ),
            (
                Geometry {
                    peer_slots: 32,
                    ..ok
                },
                "peer slots",
            ),
            (
                Geometry {
                    al_extents: 0,
                    ..ok
                },
                "activity-log extents",
            ),
            (Geometry { al_slots: 1, ..ok }, "activity-log slots"),
            (Geometry { data_size: 0, ..ok }, "data size"),
            (
                Geometry {
                    data_size: 16 << 40,
                    al_extent_size: 4096,
                    ..ok
                },
                "activity-log extent count",
            ),
        ];
        for (g, field) in cases {
            match g.validate() {
                Err(MetaError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
