//! Readable secondaries: point-in-time, read-only views of a replica kept by copy-on-write —
//! the on-disk records of a copy-on-write area ([`cow_record`]), which blocks a snapshot has
//! preserved and how a read is assembled ([`cow_index`]), and the file holding them ([`area`]).
//!
//! A snapshot freezes the replica between two epochs. From then on, before a replicated write
//! changes a block for the first time, the block's old contents are preserved in the snapshot's
//! area (a page-aligned slot per block); a read of the snapshot takes the live data and overlays
//! every block the area holds.
//! The area has a fixed capacity: when a write needs more, the snapshot is invalidated, never
//! the write delayed.

pub mod area;
pub mod cow_index;
pub mod cow_record;
pub mod set;
