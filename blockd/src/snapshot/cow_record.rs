//! The copy-on-write area's on-disk records, as pure codecs: a 4 KiB header naming the
//! snapshot, then one record per preserved block — a 64-byte header and the block's old
//! contents. Little-endian, CRC-32 (IEEE) over every header and over every block's data.
//!
//! ```text
//! area header (4 KiB, at offset 0):
//!    0 magic "BLKDSNAP"       8 version u32          12 state u32 (1 open, 2 closed cleanly)
//!   16 block_size u32        20 name_len u16         22 listen_len u16
//!   24 device_size u64       32 capacity_blocks u64  40 created_unix_ms u64
//!   48 generation u64 (current data generation of the replica at the freeze)
//!   56 preserved_blocks u64 (meaningful when closed)
//!   64 name (name_len bytes of UTF-8, at most 128)
//!  192 NBD listen address (listen_len bytes of UTF-8, at most 64; empty: none)
//!  256 zero                  4092 crc32 over 0..4092
//! block record i, at 4096 + i * (64 + block_size):
//!    0 magic "COWBLOCK"       8 block index u64      16 slot u64 (= i)
//!   24 data crc32 u32         28 zero                60 crc32 over 0..60
//!   64 block_size bytes of the block as it was at the freeze
//! ```

/// Magic at offset 0 of an area header.
pub const AREA_MAGIC: [u8; 8] = *b"BLKDSNAP";
/// Magic at offset 0 of every block record.
pub const BLOCK_MAGIC: [u8; 8] = *b"COWBLOCK";
/// The format version this build reads and writes.
pub const VERSION: u32 = 1;
/// Bytes of the area header.
pub const HEADER_SIZE: usize = 4096;
/// Bytes of a block record's header (its data follows).
pub const BLOCK_HEADER_SIZE: usize = 64;
/// Longest snapshot name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest listen address, in bytes.
pub const MAX_LISTEN_LEN: usize = 64;

const NAME_AT: usize = 64;
const LISTEN_AT: usize = 192;
const CRC_AT: usize = HEADER_SIZE - 4;
const BLOCK_CRC_AT: usize = 60;

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
}

/// Why a record could not be decoded or trusted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CowRecordError {
    #[error("not a blockd snapshot area (magic {found:02x?})")]
    BadMagic { found: Vec<u8> },
    #[error("snapshot area version {found}; this build reads version {VERSION}")]
    UnsupportedVersion { found: u32 },
    #[error(
        "snapshot area header fails its CRC-32 check (stored {stored:#010x}, computed {computed:#010x})"
    )]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("snapshot area header is invalid: {reason}")]
    BadHeader { reason: String },
    #[error("copy-on-write record {slot} is truncated ({found} of {needed} bytes)")]
    Truncated {
        slot: u64,
        found: usize,
        needed: usize,
    },
    #[error("copy-on-write record {slot} is not a block record")]
    BadBlockMagic { slot: u64 },
    #[error("copy-on-write record {slot} header fails its CRC-32 check")]
    BlockHeaderChecksum { slot: u64 },
    #[error("copy-on-write record {slot} claims slot {found}")]
    Misplaced { slot: u64, found: u64 },
    #[error("copy-on-write record {slot} (block {block}) fails its data CRC-32 check")]
    BlockDataChecksum { slot: u64, block: u64 },
}

/// Byte offset of block record `slot` in an area with `block_size`-byte blocks.
pub fn record_offset(slot: u64, block_size: u32) -> u64 {
    HEADER_SIZE as u64 + slot * record_len(block_size) as u64
}

/// Bytes of one block record (header + data).
pub fn record_len(block_size: u32) -> usize {
    BLOCK_HEADER_SIZE + block_size as usize
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
    };
    validate(&h)?;
    Ok(h)
}

/// Encodes the header of block record `slot` preserving `data` as block `block`.
pub fn encode_block_header(slot: u64, block: u64, data: &[u8]) -> [u8; BLOCK_HEADER_SIZE] {
    let mut buf = [0u8; BLOCK_HEADER_SIZE];
    buf[..8].copy_from_slice(&BLOCK_MAGIC);
    put_u64(&mut buf, 8, block);
    put_u64(&mut buf, 16, slot);
    put_u32(&mut buf, 24, crc32fast::hash(data));
    let crc = crc32fast::hash(&buf[..BLOCK_CRC_AT]);
    put_u32(&mut buf, BLOCK_CRC_AT, crc);
    buf
}

/// Decodes block record `slot` (header + data, exactly [`record_len`] bytes) and returns the
/// block index it preserves; the data is `record[BLOCK_HEADER_SIZE..]`.
pub fn decode_block_record(
    record: &[u8],
    slot: u64,
    block_size: u32,
) -> Result<u64, CowRecordError> {
    let needed = record_len(block_size);
    if record.len() < needed {
        return Err(CowRecordError::Truncated {
            slot,
            found: record.len(),
            needed,
        });
    }
    if record[..8] != BLOCK_MAGIC {
        return Err(CowRecordError::BadBlockMagic { slot });
    }
    if get_u32(record, BLOCK_CRC_AT) != crc32fast::hash(&record[..BLOCK_CRC_AT]) {
        return Err(CowRecordError::BlockHeaderChecksum { slot });
    }
    let found = get_u64(record, 16);
    if found != slot {
        return Err(CowRecordError::Misplaced { slot, found });
    }
    let block = get_u64(record, 8);
    let data = &record[BLOCK_HEADER_SIZE..needed];
    if get_u32(record, 24) != crc32fast::hash(data) {
        return Err(CowRecordError::BlockDataChecksum { slot, block });
    }
    Ok(block)
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
        }
    }

    proptest! {
        #[test]
        fn header_round_trips(name in "[a-zA-Z0-9_.-]{1,128}", listen in "[0-9.:]{0,64}", closed: bool, bs_shift in 9u32..=20,
                              dev: u64, cap in 0u64..1 << 40, gen_id: u64, ms: u64, used_frac in 0.0f64..=1.0) {
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
            };
            let buf = encode_header(&h).unwrap();
            prop_assert_eq!(decode_header(&buf).unwrap(), h);
        }

        #[test]
        fn block_record_round_trips(slot: u64, block: u64, data in proptest::collection::vec(any::<u8>(), 512)) {
            let mut rec = encode_block_header(slot, block, &data).to_vec();
            rec.extend_from_slice(&data);
            prop_assert_eq!(decode_block_record(&rec, slot, 512).unwrap(), block);
        }

        #[test]
        fn any_flipped_header_byte_is_refused(at in 0usize..HEADER_SIZE, bit in 0u8..8) {
            let mut buf = encode_header(&header("s1")).unwrap();
            buf[at] ^= 1 << bit;
            prop_assert!(decode_header(&buf).is_err());
        }

        #[test]
        fn any_flipped_record_byte_is_refused(at in 0usize..BLOCK_HEADER_SIZE + 512, bit in 0u8..8) {
            let data = vec![7u8; 512];
            let mut rec = encode_block_header(3, 9, &data).to_vec();
            rec.extend_from_slice(&data);
            rec[at] ^= 1 << bit;
            prop_assert!(decode_block_record(&rec, 3, 512).is_err());
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
    fn record_in_the_wrong_slot_is_refused() {
        let data = vec![1u8; 512];
        let mut rec = encode_block_header(4, 9, &data).to_vec();
        rec.extend_from_slice(&data);
        assert_eq!(
            decode_block_record(&rec, 5, 512),
            Err(CowRecordError::Misplaced { slot: 5, found: 4 })
        );
        assert!(matches!(
            decode_block_record(&rec[..100], 4, 512),
            Err(CowRecordError::Truncated { .. })
        ));
        assert_eq!(record_offset(2, 512), 4096 + 2 * 576);
    }
}
