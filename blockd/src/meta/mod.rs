//! On-disk replication metadata: generation identifiers, superblock, per-peer dirty bitmaps and
//! the activity log — pure codecs over bytes ([`superblock`], [`bitmap`], [`activity_log`]),
//! their placement ([`layout`]), and a small file-backed reader/writer ([`file`]).
//!
//! Every record is 4 KiB and ends with a CRC-32 (crc32fast, IEEE) over the rest of the record;
//! integers are little-endian. A record that fails its checks is reported with the record and
//! its byte offset, never silently reinitialised.

pub mod activity_log;
pub mod bitmap;
pub mod file;
pub mod generation;
pub mod layout;
pub mod lock;
pub mod superblock;

use std::fmt;
use std::path::PathBuf;

/// Which record a problem was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Superblock copy 0 or 1.
    Superblock(u8),
    /// Activity-log ring record.
    ActivityLog(u32),
    /// Dirty bitmap page of a peer slot.
    BitmapPage { slot: u32, page: u64 },
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Superblock(copy) => write!(f, "superblock copy {copy}"),
            Record::ActivityLog(slot) => write!(f, "activity-log record {slot}"),
            Record::BitmapPage { slot, page } => write!(f, "bitmap slot {slot} page {page}"),
        }
    }
}

/// Why metadata could not be read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{record} at offset {offset} is not blockd metadata (magic {found:02x?})")]
    BadMagic {
        record: Record,
        offset: u64,
        found: Vec<u8>,
    },
    #[error(
        "{record} at offset {offset} has metadata version {found}; this build reads version {supported}"
    )]
    UnsupportedVersion {
        record: Record,
        offset: u64,
        found: u32,
        supported: u32,
    },
    #[error(
        "{record} at offset {offset} fails its CRC-32 check (stored {stored:#010x}, computed {computed:#010x})"
    )]
    ChecksumMismatch {
        record: Record,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("{record} at offset {offset} belongs elsewhere (tag {found}, expected {expected})")]
    Misplaced {
        record: Record,
        offset: u64,
        found: u64,
        expected: u64,
    },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("metadata size mismatch: {what} is {found} bytes, metadata says {expected}")]
    SizeMismatch {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    #[error("device of {size} bytes is too small for metadata (needs more than {needed})")]
    DeviceTooSmall { size: u64, needed: u64 },
    #[error("metadata belongs to node id {found}, this node is {expected}")]
    NodeIdMismatch { expected: u8, found: u8 },
    #[error("{path} already holds blockd metadata ({state}); refusing to overwrite without force")]
    AlreadyExists { path: PathBuf, state: &'static str },
    #[error("activity log: {0}")]
    ActivityLog(String),
    #[error("bitmap geometry differs: {0}")]
    BitmapGeometry(String),
    #[error(
        "metadata {path} is in use by another process (a blockd already running this resource, \
         or blockctl create-md)"
    )]
    InUse { path: PathBuf },
    #[error("cannot lock metadata {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open metadata {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read metadata {path} at offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write metadata {path} at offset {offset}")]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot flush metadata {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot size metadata {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// CRC-32 of a record body.
pub(crate) fn crc(body: &[u8]) -> u32 {
    crc32fast::hash(body)
}

/// Checks the CRC trailer (last 4 bytes) of a 4 KiB record.
pub(crate) fn check_crc(rec: &[u8], record: Record, offset: u64) -> Result<(), MetaError> {
    let (body, trailer) = rec.split_at(rec.len() - 4);
    let stored = u32::from_le_bytes(trailer.try_into().expect("4-byte trailer"));
    let computed = crc(body);
    if stored != computed {
        return Err(MetaError::ChecksumMismatch {
            record,
            offset,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Writes the CRC trailer of a 4 KiB record.
pub(crate) fn seal(rec: &mut [u8]) {
    let n = rec.len() - 4;
    let c = crc(&rec[..n]);
    rec[n..].copy_from_slice(&c.to_le_bytes());
}
