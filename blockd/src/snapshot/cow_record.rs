//! The copy-on-write area's on-disk format, as pure codecs and offset arithmetic: a 4 KiB
//! header naming the snapshot, then groups of [`GROUP_SLOTS`] preserved blocks — a 4 KiB table
//! page saying which block each slot of the group preserves (with the CRC-32 of its data), then
//! the slots' data, each at a block-aligned offset, so preserving a block writes whole pages
//! and nothing else. Little-endian, CRC-32 (IEEE) over every header, every table and every
//! block's data.
//!
//! ```text
//! area header (4 KiB, at offset 0):
//!    0 magic "BLKDSNAP"       8 version u32 (3)      12 state u32 (1 open, 2 closed cleanly)
//!   16 block_size u32        20 name_len u16         22 listen_len u16
//!   24 device_size u64       32 capacity_blocks u64  40 created_unix_ms u64
//!   48 generation u64 (current data generation of the replica at the freeze)
//!   56 preserved_blocks u64 (meaningful when closed)
//!   64 name (name_len bytes of UTF-8, at most 128)
//!  192 NBD listen address (listen_len bytes of UTF-8, at most 64; empty: none)
//!  256 closed_generation u64 (the replica's data generation when the area was closed cleanly;
//!      meaningful when closed: an area is reopened only over metadata that knows it)
//!  264 zero                  4092 crc32 over 0..4092
//! group g (slots g*256 .. g*256+255), at 4096 + g * (4096 + 256 * block_size):
//!   table page (4 KiB):
//!      0 magic "COWTABLE"     8 group u64 (= g)      16 slots in use u32 (1..=256)
//!     20 zero                32 + i * 12: slot g*256+i: block index u64, data crc32 u32
//!        (zero beyond the slots in use)               4092 crc32 over 0..4092
//!   slot g*256+i, at table + 4096 + i * block_size: block_size bytes of the block as it was at
//!     the freeze (the device's short last block padded with zeros)
//! ```
//!
//! A group's table is written when its last slot fills and, for the last group, when the area
//! is closed: like every record, it is trusted only in an area closed cleanly.
//! Version 1 (one 64-byte header before each block's data, unaligned) and version 2 (the same
//! as 3 without `closed_generation`: nothing tied it to the replica it froze) are refused.

/// Magic at offset 0 of an area header.
pub const AREA_MAGIC: [u8; 8] = *b"BLKDSNAP";
/// Magic at offset 0 of every table page.
pub const TABLE_MAGIC: [u8; 8] = *b"COWTABLE";
/// The format version this build reads and writes.
pub const VERSION: u32 = 3;
/// Bytes of the area header.
pub const HEADER_SIZE: usize = 4096;
/// Bytes of a group's table page.
pub const TABLE_SIZE: usize = 4096;
/// Slots per group (one table page describes them).
pub const GROUP_SLOTS: u64 = 256;
/// Longest snapshot name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest listen address, in bytes.
pub const MAX_LISTEN_LEN: usize = 64;

const NAME_AT: usize = 64;
const LISTEN_AT: usize = 192;
const CLOSED_GENERATION_AT: usize = 256;
const CRC_AT: usize = HEADER_SIZE - 4;
const TABLE_CRC_AT: usize = TABLE_SIZE - 4;
const TABLE_ENTRIES_AT: usize = 32;
const TABLE_ENTRY_LEN: usize = 12;

/// Whether an area was closed cleanly (its records can be trusted after a restart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AreaState {
    /// In use, or left behind by a crash: its last records may be missing.
    Open,
    /// Written completely and synced by a clean shutdown.
    Closed,
}

/// The decoded area header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AreaHeader {
    pub state: AreaState,
    pub block_size: u32,
    pub device_size: u64,
    pub capacity_blocks: u64,
    pub created_unix_ms: u64,
    pub generation: u64,
    pub preserved_blocks: u64,
    pub name: String,
    /// Where the snapshot is served over NBD (`ADDR:PORT`), kept across restarts.
    pub listen: String,
    /// The replica's data generation when the area was closed (meaningful when closed).
    pub closed_generation: u64,
}

/// Why a record could not be decoded or trusted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CowRecordError {
    #[error("not a blockd snapshot area (magic {found:02x?})")]
    BadMagic { found: Vec<u8> },
    #[error(
        "snapshot area format version {found}; this build reads version {VERSION} only (an area written by another blockd version cannot be reopened)"
    )]
    UnsupportedVersion { found: u32 },
    #[error(
        "snapshot area header fails its CRC-32 check (stored {stored:#010x}, computed {computed:#010x})"
    )]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("snapshot area header is invalid: {reason}")]
    BadHeader { reason: String },
    #[error("copy-on-write table {group} is truncated ({found} of {TABLE_SIZE} bytes)")]
    TruncatedTable { group: u64, found: usize },
    #[error("copy-on-write table {group} is not a table page")]
    BadTableMagic { group: u64 },
    #[error("copy-on-write table {group} fails its CRC-32 check")]
    TableChecksum { group: u64 },
    #[error("copy-on-write table {group} claims to be table {found}")]
    MisplacedTable { group: u64, found: u64 },
    #[error(
        "copy-on-write table {group} lists {found} slots in use, the area header implies {expected}"
    )]
    TableCount {
        group: u64,
        found: u64,
        expected: u64,
    },
    #[error("copy-on-write table {group}: cannot describe {count} slots (1 to {GROUP_SLOTS})")]
    TableSize { group: u64, count: usize },
    #[error("copy-on-write slot {slot} (block {block}) fails its data CRC-32 check")]
    BlockDataChecksum { slot: u64, block: u64 },
}

/// What a table says of one slot: the block it preserves and the CRC-32 of its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotEntry {
    pub block: u64,
    pub crc: u32,
}

impl SlotEntry {
    /// The entry of `block` preserved as `data` (exactly one block, padded if short).
    pub fn of(block: u64, data: &[u8]) -> SlotEntry {
        SlotEntry {
            block,
            crc: crc32fast::hash(data),
        }
    }

    /// Checks that `data`, read from `slot`, is what this entry recorded.
    pub fn check(&self, slot: u64, data: &[u8]) -> Result<(), CowRecordError> {
        if crc32fast::hash(data) == self.crc {
            Ok(())
        } else {
            Err(CowRecordError::BlockDataChecksum {
                slot,
                block: self.block,
            })
        }
    }
}

/// Bytes of one group (table page and data slots) in an area of `block_size`-byte blocks.
pub fn group_len(block_size: u32) -> u64 {
    TABLE_SIZE as u64 + GROUP_SLOTS * u64::from(block_size)
}

/// Byte offset of the table page of `group`.
pub fn table_offset(group: u64, block_size: u32) -> u64 {
    HEADER_SIZE as u64 + group * group_len(block_size)
}

/// Byte offset of the data of `slot` (block-aligned when `block_size` divides 4 KiB or is a
/// multiple of it).
pub fn data_offset(slot: u64, block_size: u32) -> u64 {
    table_offset(slot / GROUP_SLOTS, block_size)
        + TABLE_SIZE as u64
        + (slot % GROUP_SLOTS) * u64::from(block_size)
}

/// Bytes `blocks` preserved blocks take in an area (data and tables, not the area header).
pub fn area_bytes(blocks: u64, block_size: u32) -> u64 {
    blocks * u64::from(block_size) + blocks.div_ceil(GROUP_SLOTS) * TABLE_SIZE as u64
}

/// The most blocks an area of at most `bytes` (data and tables) holds: the inverse of
/// [`area_bytes`].
pub fn blocks_within(bytes: u64, block_size: u32) -> u64 {
    let group = group_len(block_size);
    (bytes / group) * GROUP_SLOTS
        + (bytes % group).saturating_sub(TABLE_SIZE as u64) / u64::from(block_size)
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Encodes an area header. Fails if the name or geometry cannot be represented.
pub fn encode_header(h: &AreaHeader) -> Result<[u8; HEADER_SIZE], CowRecordError> {
    validate(h)?;
    let mut buf = [0u8; HEADER_SIZE];
    buf[..8].copy_from_slice(&AREA_MAGIC);
    put_u32(&mut buf, 8, VERSION);
    put_u32(
        &mut buf,
        12,
        match h.state {
            AreaState::Open => 1,
            AreaState::Closed => 2,
        },
    );
    put_u32(&mut buf, 16, h.block_size);
    buf[20..22].copy_from_slice(&(h.name.len() as u16).to_le_bytes());
    buf[22..24].copy_from_slice(&(h.listen.len() as u16).to_le_bytes());
    put_u64(&mut buf, 24, h.device_size);
    put_u64(&mut buf, 32, h.capacity_blocks);
    put_u64(&mut buf, 40, h.created_unix_ms);
    put_u64(&mut buf, 48, h.generation);
    put_u64(&mut buf, 56, h.preserved_blocks);
    buf[NAME_AT..NAME_AT + h.name.len()].copy_from_slice(h.name.as_bytes());
    buf[LISTEN_AT..LISTEN_AT + h.listen.len()].copy_from_slice(h.listen.as_bytes());
    put_u64(&mut buf, CLOSED_GENERATION_AT, h.closed_generation);
    let crc = crc32fast::hash(&buf[..CRC_AT]);
    put_u32(&mut buf, CRC_AT, crc);
    Ok(buf)
}

fn validate(h: &AreaHeader) -> Result<(), CowRecordError> {
    let bad = |reason: String| Err(CowRecordError::BadHeader { reason });
    if h.name.is_empty() || h.name.len() > MAX_NAME_LEN {
        return bad(format!(
            "name must be 1 to {MAX_NAME_LEN} bytes, not {}",
            h.name.len()
        ));
    }
    if h.listen.len() > MAX_LISTEN_LEN {
        return bad(format!("listen address longer than {MAX_LISTEN_LEN} bytes"));
    }
    if !h.block_size.is_power_of_two() || !(512..=1 << 20).contains(&h.block_size) {
        return bad(format!(
            "block size {} is not a power of two in 512..=1MiB",
            h.block_size
        ));
    }
    if h.preserved_blocks > h.capacity_blocks {
        return bad(format!(
            "{} preserved blocks exceed the capacity of {}",
            h.preserved_blocks, h.capacity_blocks
        ));
    }
    Ok(())
}

/// Decodes and checks an area header.
pub fn decode_header(buf: &[u8]) -> Result<AreaHeader, CowRecordError> {
    if buf.len() < HEADER_SIZE {
        return Err(CowRecordError::BadHeader {
            reason: format!("{} bytes, a header has {HEADER_SIZE}", buf.len()),
        });
    }
    if buf[..8] != AREA_MAGIC {
        return Err(CowRecordError::BadMagic {
            found: buf[..8].to_vec(),
        });
    }
    let stored = get_u32(buf, CRC_AT);
    let computed = crc32fast::hash(&buf[..CRC_AT]);
    if stored != computed {
        return Err(CowRecordError::HeaderChecksum { stored, computed });
    }
    let version = get_u32(buf, 8);
    if version != VERSION {
        return Err(CowRecordError::UnsupportedVersion { found: version });
    }
    let state = match get_u32(buf, 12) {
        1 => AreaState::Open,
        2 => AreaState::Closed,
        other => {
            return Err(CowRecordError::BadHeader {
                reason: format!("unknown state {other}"),
            });
        }
    };
    let name_len = get_u16(buf, 20) as usize;
    if name_len > MAX_NAME_LEN {
        return Err(CowRecordError::BadHeader {
            reason: format!("name length {name_len} exceeds {MAX_NAME_LEN}"),
        });
    }
    let name = std::str::from_utf8(&buf[NAME_AT..NAME_AT + name_len])
        .map_err(|_| CowRecordError::BadHeader {
            reason: "name is not UTF-8".into(),
        })?
        .to_owned();
    let listen_len = get_u16(buf, 22) as usize;
    if listen_len > MAX_LISTEN_LEN {
        return Err(CowRecordError::BadHeader {
            reason: format!("listen address length {listen_len} exceeds {MAX_LISTEN_LEN}"),
        });
    }
    let listen = std::str::from_utf8(&buf[LISTEN_AT..LISTEN_AT + listen_len])
        .map_err(|_| CowRecordError::BadHeader {
            reason: "listen address is not UTF-8".into(),
        })?
        .to_owned();
    let h = AreaHeader {
        state,
        block_size: get_u32(buf, 16),
        device_size: get_u64(buf, 24),
        capacity_blocks: get_u64(buf, 32),
        created_unix_ms: get_u64(buf, 40),
        generation: get_u64(buf, 48),
        preserved_blocks: get_u64(buf, 56),
        name,
        listen,
        closed_generation: get_u64(buf, CLOSED_GENERATION_AT),
    };
    validate(&h)?;
    Ok(h)
}

/// Encodes the table page of `group` for its slots in use, `entries` (1 to [`GROUP_SLOTS`]).
pub fn encode_table(group: u64, entries: &[SlotEntry]) -> Result<[u8; TABLE_SIZE], CowRecordError> {
    if entries.is_empty() || entries.len() as u64 > GROUP_SLOTS {
        return Err(CowRecordError::TableSize {
            group,
            count: entries.len(),
        });
    }
    let mut buf = [0u8; TABLE_SIZE];
    buf[..8].copy_from_slice(&TABLE_MAGIC);
    put_u64(&mut buf, 8, group);
    put_u32(&mut buf, 16, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let at = TABLE_ENTRIES_AT + i * TABLE_ENTRY_LEN;
        put_u64(&mut buf, at, e.block);
        put_u32(&mut buf, at + 8, e.crc);
    }
    let crc = crc32fast::hash(&buf[..TABLE_CRC_AT]);
    put_u32(&mut buf, TABLE_CRC_AT, crc);
    Ok(buf)
}

/// Decodes and checks the table page of `group`, which must list exactly `expected` slots in
/// use (what the area header's count of preserved blocks implies).
pub fn decode_table(
    buf: &[u8],
    group: u64,
    expected: u64,
) -> Result<Vec<SlotEntry>, CowRecordError> {
    if buf.len() < TABLE_SIZE {
        return Err(CowRecordError::TruncatedTable {
            group,
            found: buf.len(),
        });
    }
    if buf[..8] != TABLE_MAGIC {
        return Err(CowRecordError::BadTableMagic { group });
    }
    if get_u32(buf, TABLE_CRC_AT) != crc32fast::hash(&buf[..TABLE_CRC_AT]) {
        return Err(CowRecordError::TableChecksum { group });
    }
    let found = get_u64(buf, 8);
    if found != group {
        return Err(CowRecordError::MisplacedTable { group, found });
    }
    let count = u64::from(get_u32(buf, 16));
    if count != expected || count == 0 || count > GROUP_SLOTS {
        return Err(CowRecordError::TableCount {
            group,
            found: count,
            expected,
        });
    }
    Ok((0..count as usize)
        .map(|i| {
            let at = TABLE_ENTRIES_AT + i * TABLE_ENTRY_LEN;
            SlotEntry {
                block: get_u64(buf, at),
                crc: get_u32(buf, at + 8),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(name: &str) -> AreaHeader {
        AreaHeader {
            state: AreaState::Open,
            block_size: 4096,
            device_size: 1 << 30,
            capacity_blocks: 1000,
            created_unix_ms: 1_700_000_000_000,
            generation: 0xdead_beef,
            preserved_blocks: 0,
            name: name.into(),
            listen: "127.0.0.1:10900".into(),
            closed_generation: 0x1234_5678_9abc_def0,
        }
    }

    proptest! {
        #[test]
        fn header_round_trips(name in "[a-zA-Z0-9_.-]{1,128}", listen in "[0-9.:]{0,64}", closed: bool, bs_shift in 9u32..=20,
                              dev: u64, cap in 0u64..1 << 40, gen_id: u64, ms: u64, used_frac in 0.0f64..=1.0,
                              closed_gen: u64) {
            let h = AreaHeader {
                state: if closed { AreaState::Closed } else { AreaState::Open },
                block_size: 1 << bs_shift,
                device_size: dev,
                capacity_blocks: cap,
                created_unix_ms: ms,
                generation: gen_id,
                preserved_blocks: (cap as f64 * used_frac) as u64,
                name,
                listen,
                closed_generation: closed_gen,
            };
            let buf = encode_header(&h).unwrap();
            prop_assert_eq!(decode_header(&buf).unwrap(), h);
        }

        #[test]
        fn table_round_trips(group in 0u64..1 << 40, entries in proptest::collection::vec((any::<u64>(), any::<u32>()), 1..=256)) {
            let entries: Vec<SlotEntry> = entries.into_iter().map(|(block, crc)| SlotEntry { block, crc }).collect();
            let buf = encode_table(group, &entries).unwrap();
            prop_assert_eq!(decode_table(&buf, group, entries.len() as u64).unwrap(), entries);
        }

        #[test]
        fn any_flipped_table_byte_is_refused(at in 0usize..TABLE_SIZE, bit in 0u8..8, n in 1u64..=256) {
            let entries: Vec<SlotEntry> = (0..n).map(|i| SlotEntry { block: i * 7, crc: i as u32 }).collect();
            let mut buf = encode_table(5, &entries).unwrap();
            buf[at] ^= 1 << bit;
            prop_assert!(decode_table(&buf, 5, n).is_err());
        }

        #[test]
        fn area_bytes_and_blocks_within_agree(blocks in 0u64..1 << 30, bs_shift in 9u32..=20, spare in 0u64..4096) {
            let bs = 1u32 << bs_shift;
            let bytes = area_bytes(blocks, bs);
            prop_assert_eq!(blocks_within(bytes, bs), blocks);
            prop_assert!(blocks_within(bytes + spare.min(u64::from(bs) - 1), bs) == blocks);
            // Every slot's data lies before the next group's table, after its own.
            let slot = blocks;
            let g = slot / GROUP_SLOTS;
            prop_assert!(data_offset(slot, bs) >= table_offset(g, bs) + TABLE_SIZE as u64);
            prop_assert!(data_offset(slot, bs) + u64::from(bs) <= table_offset(g + 1, bs));
        }

        #[test]
        fn any_flipped_header_byte_is_refused(at in 0usize..HEADER_SIZE, bit in 0u8..8) {
            let mut buf = encode_header(&header("s1")).unwrap();
            buf[at] ^= 1 << bit;
            prop_assert!(decode_header(&buf).is_err());
        }

    }

    #[test]
    fn refuses_foreign_and_bad_headers() {
        assert!(matches!(
            decode_header(&[0u8; HEADER_SIZE]),
            Err(CowRecordError::BadMagic { .. })
        ));
        assert!(matches!(
            decode_header(&[0u8; 10]),
            Err(CowRecordError::BadHeader { .. })
        ));
        assert!(encode_header(&header("")).is_err());
        assert!(encode_header(&header(&"x".repeat(129))).is_err());
        let mut h = header("a");
        h.preserved_blocks = 1001;
        assert!(encode_header(&h).is_err());
        h.preserved_blocks = 0;
        h.block_size = 3000;
        assert!(encode_header(&h).is_err());
    }

    #[test]
    fn tables_out_of_place_or_with_the_wrong_count_are_refused() {
        let entries = [
            SlotEntry { block: 9, crc: 1 },
            SlotEntry { block: 3, crc: 2 },
        ];
        let buf = encode_table(4, &entries).unwrap();
        assert_eq!(
            decode_table(&buf, 5, 2),
            Err(CowRecordError::MisplacedTable {
                group: 4 + 1,
                found: 4
            })
        );
        assert!(matches!(
            decode_table(&buf, 4, 3),
            Err(CowRecordError::TableCount {
                found: 2,
                expected: 3,
                ..
            })
        ));
        assert!(matches!(
            decode_table(&buf[..100], 4, 2),
            Err(CowRecordError::TruncatedTable { .. })
        ));
        assert!(matches!(
            decode_table(&[0u8; TABLE_SIZE], 4, 2),
            Err(CowRecordError::BadTableMagic { .. })
        ));
        assert!(encode_table(0, &[]).is_err());
        assert!(encode_table(0, &[entries[0]; 257]).is_err());
        assert_eq!(table_offset(0, 4096), 4096);
        assert_eq!(data_offset(0, 4096), 8192);
        assert_eq!(data_offset(255, 4096), 8192 + 255 * 4096);
        assert_eq!(table_offset(1, 4096), 4096 + 257 * 4096);
        assert_eq!(data_offset(256, 4096), 4096 + 258 * 4096);
        assert_eq!(area_bytes(1, 4096), 8192);
        assert_eq!(area_bytes(256, 4096), 257 * 4096);
        assert_eq!(blocks_within(8191, 4096), 0);
    }

    #[test]
    fn data_checks_against_its_entry() {
        let data = vec![5u8; 4096];
        let e = SlotEntry::of(17, &data);
        e.check(3, &data).unwrap();
        let mut bad = data.clone();
        bad[4000] ^= 1;
        assert_eq!(
            e.check(3, &bad),
            Err(CowRecordError::BlockDataChecksum { slot: 3, block: 17 })
        );
    }

    #[test]
    fn older_versions_are_refused_with_a_clear_message() {
        for version in [1, 2] {
            let mut buf = encode_header(&header("old")).unwrap();
            put_u32(&mut buf, 8, version);
            let crc = crc32fast::hash(&buf[..CRC_AT]);
            put_u32(&mut buf, CRC_AT, crc);
            let e = decode_header(&buf).unwrap_err();
            assert_eq!(e, CowRecordError::UnsupportedVersion { found: version });
            let msg = e.to_string();
            assert!(
                msg.contains(&format!(
                    "format version {version}; this build reads version 3"
                )),
                "{msg}"
            );
        }
    }
}
