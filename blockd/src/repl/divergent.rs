//! The split-brain side file: before the resync overwrites a split-brain victim's blocks, the
//! victim appends them here, as they are on its disk (offset + data, every record with a
//! CRC-32), so a discarded change is never lost for good. `blockctl divergent` lists and
//! extracts them.
//!
//! The file is a sequence of records; one save is a *session*: `Begin` (when, with whom, why),
//! one `Block` per saved range (at most [`MAX_BLOCK`] bytes each), then `End` (counts, written
//! last and followed by fsync, so a session without it was interrupted). Sessions only ever
//! get appended. Record layout, all integers little-endian:
//!
//! ```text
//! magic "BDVR" | kind u8 | 3 zero bytes | payload length u32 | payload | CRC-32 of all before
//! ```
//!
//! The codec ([`encode`], [`decode`], [`parse`]) is pure; [`SessionWriter`] appends to a file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Record magic.
pub const MAGIC: [u8; 4] = *b"BDVR";
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 12;
/// Trailer bytes (CRC-32).
pub const TRAILER_LEN: usize = 4;
/// Largest data of one `Block` record.
pub const MAX_BLOCK: usize = 1 << 20;
/// Largest payload of any record.
const MAX_PAYLOAD: usize = MAX_BLOCK + 8;

mod kind {
    pub const BEGIN: u8 = 1;
    pub const BLOCK: u8 = 2;
    pub const END: u8 = 3;
}

/// Who saved a session, when and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SessionHeader {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub resource: String,
    /// This node (the victim).
    pub node_id: u8,
    /// The peer whose data replaces the saved blocks.
    pub peer_id: u8,
    pub peer: String,
    /// The victim's current generation when it discarded its data.
    pub generation: u64,
    /// How the split brain was resolved (e.g. `manual`, `quorum`, `least-changes`).
    pub reason: String,
}

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Begin(SessionHeader),
    /// Saved data at a device offset.
    Block {
        offset: u64,
        data: Vec<u8>,
    },
    /// The session is complete: `blocks` records holding `bytes` bytes.
    End {
        blocks: u64,
        bytes: u64,
    },
}

/// Why bytes are not a valid record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad record magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("record CRC-32 mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record payload of {0} bytes is larger than allowed")]
    TooLarge(u32),
    #[error("malformed {kind} record: {problem}")]
    Malformed {
        kind: &'static str,
        problem: &'static str,
    },
}

/// The result of decoding from the start of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A record and the bytes it took.
    Record(Record, usize),
    /// The buffer ends inside a record (a torn tail, or more bytes to read).
    Incomplete,
}

/// Appends `rec` to `dst`.
pub fn encode(rec: &Record, dst: &mut Vec<u8>) {
    let start = dst.len();
    let k = match rec {
        Record::Begin(_) => kind::BEGIN,
        Record::Block { .. } => kind::BLOCK,
        Record::End { .. } => kind::END,
    };
    dst.extend_from_slice(&MAGIC);
    dst.extend_from_slice(&[k, 0, 0, 0]);
    // The payload length, filled in below.
    dst.extend_from_slice(&[0; 4]);
    match rec {
        Record::Begin(h) => {
            dst.extend_from_slice(&h.time_ms.to_le_bytes());
            dst.push(h.node_id);
            dst.push(h.peer_id);
            dst.extend_from_slice(&h.generation.to_le_bytes());
            for s in [&h.resource, &h.peer, &h.reason] {
                // Names and reasons are short; longer text is cut at a char boundary.
                let s = truncate(s, u16::MAX as usize);
                dst.extend_from_slice(&(s.len() as u16).to_le_bytes());
                dst.extend_from_slice(s.as_bytes());
            }
        }
        Record::Block { offset, data } => {
            dst.extend_from_slice(&offset.to_le_bytes());
            dst.extend_from_slice(data);
        }
        Record::End { blocks, bytes } => {
            dst.extend_from_slice(&blocks.to_le_bytes());
            dst.extend_from_slice(&bytes.to_le_bytes());
        }
    }
    let written = (dst.len() - start - HEADER_LEN) as u32;
    dst[start + 8..start + 12].copy_from_slice(&written.to_le_bytes());
    let crc = crc32fast::hash(&dst[start..]);
    dst.extend_from_slice(&crc.to_le_bytes());
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A little reader over a payload.
struct Cur<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Malformed {
                kind: self.kind,
                problem: "payload too short",
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
        String::from_utf8(self.take(n.into())?.to_vec()).map_err(|_| DecodeError::Malformed {
            kind: self.kind,
            problem: "text is not UTF-8",
        })
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed {
                kind: self.kind,
                problem: "trailing bytes in the payload",
            })
        }
    }
}

/// Decodes the record at the start of `src`.
pub fn decode(src: &[u8]) -> Result<Decoded, DecodeError> {
    if src.len() < HEADER_LEN {
        if src.len() >= 4 && src[..4] != MAGIC {
            return Err(DecodeError::BadMagic(src[..4].try_into().expect("4 bytes")));
        }
        return Ok(Decoded::Incomplete);
    }
    let magic: [u8; 4] = src[..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let k = src[4];
    let len = u32::from_le_bytes(src[8..12].try_into().expect("4 bytes"));
    if len as usize > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(len));
    }
    let total = HEADER_LEN + len as usize + TRAILER_LEN;
    if src.len() < total {
        return Ok(Decoded::Incomplete);
    }
    let body = &src[..HEADER_LEN + len as usize];
    let stored = u32::from_le_bytes(src[body.len()..total].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    let payload = &body[HEADER_LEN..];
    let rec = match k {
        kind::BEGIN => {
            let mut c = Cur {
                buf: payload,
                kind: "begin",
            };
            let time_ms = c.u64()?;
            let node_id = c.u8()?;
            let peer_id = c.u8()?;
            let generation = c.u64()?;
            let resource = c.string()?;
            let peer = c.string()?;
            let reason = c.string()?;
            c.end()?;
            Record::Begin(SessionHeader {
                time_ms,
                resource,
                node_id,
                peer_id,
                peer,
                generation,
                reason,
            })
        }
        kind::BLOCK => {
            let mut c = Cur {
                buf: payload,
                kind: "block",
            };
            let offset = c.u64()?;
            if c.buf.is_empty() {
                return Err(DecodeError::Malformed {
                    kind: "block",
                    problem: "no data",
                });
            }
            if offset.checked_add(c.buf.len() as u64).is_none() {
                return Err(DecodeError::Malformed {
                    kind: "block",
                    problem: "range past the end of the address space",
                });
            }
            Record::Block {
                offset,
                data: c.buf.to_vec(),
            }
        }
        kind::END => {
            let mut c = Cur {
                buf: payload,
                kind: "end",
            };
            let blocks = c.u64()?;
            let bytes = c.u64()?;
            c.end()?;
            Record::End { blocks, bytes }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Decoded::Record(rec, total))
}

/// One saved block as listed (its data stays in the file).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SavedBlock {
    /// Device offset.
    pub offset: u64,
    pub len: u64,
    /// Where its data starts in the side file.
    pub file_offset: u64,
}

/// One save of divergent blocks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Session {
    pub header: SessionHeader,
    pub blocks: Vec<SavedBlock>,
    /// The `End` record is there and agrees with the blocks.
    pub complete: bool,
}

impl Session {
    pub fn bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.len).sum()
    }

    /// The saved device ranges, adjacent blocks merged, in offset order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.blocks.iter().map(|b| (b.offset, b.len)).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (o, l) in v {
            match out.last_mut() {
                Some((lo, ll)) if *lo + *ll >= o => *ll = (*ll).max(o + l - *lo),
                _ => out.push((o, l)),
            }
        }
        out
    }
}

/// Everything readable in a side file.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Parsed {
    pub sessions: Vec<Session>,
    /// Where reading stopped early, and why (a torn tail after a crash, or damage).
    pub problem: Option<(u64, String)>,
}

/// Parses a whole side file. Records before damage are kept; a block outside any session
/// is reported as a problem.
pub fn parse(src: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    let mut pos = 0usize;
    while pos < src.len() {
        let (rec, used) = match decode(&src[pos..]) {
            Ok(Decoded::Record(r, n)) => (r, n),
            Ok(Decoded::Incomplete) => {
                out.problem = Some((pos as u64, "torn record at the end".into()));
                break;
            }
            Err(e) => {
                out.problem = Some((pos as u64, e.to_string()));
                break;
            }
        };
        match rec {
            Record::Begin(header) => out.sessions.push(Session {
                header,
                blocks: Vec::new(),
                complete: false,
            }),
            Record::Block { offset, data } => match out.sessions.last_mut() {
                Some(s) if !s.complete => s.blocks.push(SavedBlock {
                    offset,
                    len: data.len() as u64,
                    file_offset: (pos + HEADER_LEN + 8) as u64,
                }),
                _ => {
                    out.problem = Some((pos as u64, "block record outside a session".into()));
                    break;
                }
            },
            Record::End { blocks, bytes } => match out.sessions.last_mut() {
                Some(s) if !s.complete => {
                    s.complete = blocks == s.blocks.len() as u64 && bytes == s.bytes();
                    if !s.complete {
                        out.problem =
                            Some((pos as u64, "end record disagrees with its blocks".into()));
                        break;
                    }
                }
                _ => {
                    out.problem = Some((pos as u64, "end record outside a session".into()));
                    break;
                }
            },
        }
        pos += used;
    }
    out
}

/// The bytes of `[offset, offset + len)` from `session`'s blocks in `file` (the whole side
/// file's bytes); `Err` names the first byte not saved. Later blocks win where they overlap.
pub fn extract(file: &[u8], session: &Session, offset: u64, len: u64) -> Result<Vec<u8>, u64> {
    let mut out = vec![0u8; len as usize];
    let mut covered = vec![(offset + len, offset + len)];
    for b in &session.blocks {
        let start = b.offset.max(offset);
        let end = (b.offset + b.len).min(offset + len);
        if start >= end {
            continue;
        }
        let src = (b.file_offset + (start - b.offset)) as usize;
        let n = (end - start) as usize;
        let Some(data) = file.get(src..src + n) else {
            return Err(start);
        };
        out[(start - offset) as usize..(end - offset) as usize].copy_from_slice(data);
        covered.push((start, end));
    }
    covered.sort_unstable();
    let mut at = offset;
    for (s, e) in covered {
        if s > at {
            return Err(at);
        }
        at = at.max(e);
    }
    Ok(out)
}

/// Where a node keeps its side file: beside its metadata (`<metadata file>.divergent` for
/// external metadata, `<backing file>.divergent` for internal metadata on a file). For
/// internal metadata on a block device, `/var/lib/blockd/<resource>.<node>.divergent`.
pub fn side_file_path(resource: &str, node: &crate::config::Node) -> PathBuf {
    let beside = |p: &Path| {
        let mut s = p.as_os_str().to_owned();
        s.push(".divergent");
        PathBuf::from(s)
    };
    match &node.meta {
        crate::config::MetaPlacement::External(p) => beside(p),
        crate::config::MetaPlacement::Internal => {
            let is_block_device = {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(&node.backing).is_ok_and(|m| m.file_type().is_block_device())
            };
            if is_block_device {
                PathBuf::from(format!(
                    "/var/lib/blockd/{resource}.{}.divergent",
                    node.name
                ))
            } else {
                beside(&node.backing)
            }
        }
    }
}

/// One session as `blockctl divergent` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SessionSummary {
    pub index: usize,
    pub time_ms: u64,
    /// The time in UTC (`YYYY-MM-DD HH:MM:SS UTC`).
    pub time: String,
    pub peer: String,
    pub peer_id: u8,
    pub node_id: u8,
    pub reason: String,
    /// The victim's generation at the time, in hex.
    pub generation: String,
    pub complete: bool,
    pub records: usize,
    pub bytes: u64,
    /// Saved device ranges `[offset, length]`, adjacent ones merged.
    pub ranges: Vec<(u64, u64)>,
}

/// Where reading a side file stopped early.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReadProblem {
    pub offset: u64,
    pub error: String,
}

/// A side file as `blockctl divergent` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Listing {
    pub file: String,
    pub sessions: Vec<SessionSummary>,
    pub problem: Option<ReadProblem>,
}

impl Listing {
    pub fn new(path: &Path, parsed: &Parsed) -> Listing {
        Listing {
            file: path.display().to_string(),
            sessions: parsed
                .sessions
                .iter()
                .enumerate()
                .map(|(index, s)| SessionSummary {
                    index,
                    time_ms: s.header.time_ms,
                    time: utc(s.header.time_ms),
                    peer: s.header.peer.clone(),
                    peer_id: s.header.peer_id,
                    node_id: s.header.node_id,
                    reason: s.header.reason.clone(),
                    generation: format!("{:016x}", s.header.generation),
                    complete: s.complete,
                    records: s.blocks.len(),
                    bytes: s.bytes(),
                    ranges: s.ranges(),
                })
                .collect(),
            problem: parsed.problem.as_ref().map(|(offset, error)| ReadProblem {
                offset: *offset,
                error: error.clone(),
            }),
        }
    }
}

/// Reads and parses a side file; a missing file has no sessions.
pub fn read(path: &Path) -> std::io::Result<(Vec<u8>, Parsed)> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let parsed = parse(&bytes);
            Ok((bytes, parsed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Vec::new(), Parsed::default())),
        Err(e) => Err(e),
    }
}

/// Why an extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("the side file has no session {0}")]
    NoSession(usize),
    #[error("the byte at device offset {0} was not saved in this session")]
    NotSaved(u64),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes saved data of session `index` to `out`: the bytes of `range` (`offset, length`) as
/// a plain file of that length, or, without a range, every saved block at its device offset
/// (a sparse image of the saved parts). Returns the bytes written.
pub fn extract_to(
    file: &[u8],
    parsed: &Parsed,
    index: usize,
    range: Option<(u64, u64)>,
    out: &Path,
) -> Result<u64, ExtractError> {
    use std::os::unix::fs::FileExt;
    let s = parsed
        .sessions
        .get(index)
        .ok_or(ExtractError::NoSession(index))?;
    let werr = |source| ExtractError::Write {
        path: out.to_path_buf(),
        source,
    };
    match range {
        Some((offset, len)) => {
            let data = extract(file, s, offset, len).map_err(ExtractError::NotSaved)?;
            std::fs::write(out, &data).map_err(werr)?;
            Ok(len)
        }
        None => {
            let f = File::create(out).map_err(werr)?;
            let mut n = 0;
            for b in &s.blocks {
                let start = b.file_offset as usize;
                let data = file
                    .get(start..start + b.len as usize)
                    .ok_or(ExtractError::NotSaved(b.offset))?;
                f.write_all_at(data, b.offset).map_err(werr)?;
                n += b.len;
            }
            Ok(n)
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of milliseconds since the Unix epoch.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Appends one session to a side file (blocking I/O: run it off the async workers).
pub struct SessionWriter {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    blocks: u64,
    bytes: u64,
}

impl SessionWriter {
    /// Opens (creating) the side file and appends the session's `Begin` record.
    pub fn begin(path: &Path, header: &SessionHeader) -> std::io::Result<SessionWriter> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut w = SessionWriter {
            file,
            path: path.to_path_buf(),
            buf: Vec::with_capacity(MAX_BLOCK + 64),
            blocks: 0,
            bytes: 0,
        };
        w.append(&Record::Begin(header.clone()))?;
        Ok(w)
    }

    fn append(&mut self, rec: &Record) -> std::io::Result<()> {
        self.buf.clear();
        encode(rec, &mut self.buf);
        self.file.write_all(&self.buf)
    }

    /// Appends data read at `offset` (split into records of at most [`MAX_BLOCK`] bytes).
    pub fn block(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        for (k, chunk) in data.chunks(MAX_BLOCK).enumerate() {
            let rec = Record::Block {
                offset: offset + (k * MAX_BLOCK) as u64,
                data: chunk.to_vec(),
            };
            self.append(&rec)?;
            self.blocks += 1;
            self.bytes += chunk.len() as u64;
        }
        Ok(())
    }

    /// Appends the `End` record and makes the session durable (file and directory synced).
    /// Returns `(blocks, bytes)`.
    pub fn finish(mut self) -> std::io::Result<(u64, u64)> {
        let end = Record::End {
            blocks: self.blocks,
            bytes: self.bytes,
        };
        self.append(&end)?;
        self.file.sync_all()?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok((self.blocks, self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> SessionHeader {
        SessionHeader {
            time_ms: 1_700_000_000_000,
            resource: "r0".into(),
            node_id: 1,
            peer_id: 0,
            peer: "alpha".into(),
            generation: 0xdead_beef,
            reason: "manual".into(),
        }
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                any::<u64>(),
                ".{0,20}",
                any::<u8>(),
                any::<u8>(),
                ".{0,20}",
                any::<u64>(),
                ".{0,40}"
            )
                .prop_map(|(t, r, n, p, pn, g, why)| Record::Begin(SessionHeader {
                    time_ms: t,
                    resource: r,
                    node_id: n,
                    peer_id: p,
                    peer: pn,
                    generation: g,
                    reason: why,
                })),
            (0u64..1 << 40, prop::collection::vec(any::<u8>(), 1..2000))
                .prop_map(|(offset, data)| Record::Block { offset, data }),
            (any::<u64>(), any::<u64>()).prop_map(|(blocks, bytes)| Record::End { blocks, bytes }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(recs in prop::collection::vec(arb_record(), 1..8)) {
            let mut buf = Vec::new();
            for r in &recs {
                encode(r, &mut buf);
            }
            let mut pos = 0;
            for r in &recs {
                match decode(&buf[pos..]) {
                    Ok(Decoded::Record(got, used)) => {
                        prop_assert_eq!(&got, r);
                        pos += used;
                    }
                    other => prop_assert!(false, "{other:?}"),
                }
            }
            prop_assert_eq!(pos, buf.len());
        }

        /// Any prefix decodes as Incomplete (or the records before it); never a panic.
        #[test]
        fn truncated_is_incomplete(rec in arb_record(), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode(&rec, &mut buf);
            let n = cut.index(buf.len());
            prop_assert_eq!(decode(&buf[..n]), Ok(Decoded::Incomplete));
        }

        /// A flipped bit anywhere is detected (bad magic, bad length, or bad CRC).
        #[test]
        fn corruption_detected(rec in arb_record(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut buf = Vec::new();
            encode(&rec, &mut buf);
            let i = at.index(buf.len());
            buf[i] ^= 1 << bit;
            match decode(&buf) {
                Ok(Decoded::Record(got, _)) => prop_assert!(false, "accepted {got:?}"),
                Ok(Decoded::Incomplete) | Err(_) => {}
            }
        }

        /// Junk never panics.
        #[test]
        fn junk(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
            let _ = parse(&bytes);
        }
    }

    fn session_bytes(blocks: &[(u64, Vec<u8>)], end: bool) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&Record::Begin(header()), &mut buf);
        for (o, d) in blocks {
            encode(
                &Record::Block {
                    offset: *o,
                    data: d.clone(),
                },
                &mut buf,
            );
        }
        if end {
            let bytes = blocks.iter().map(|(_, d)| d.len() as u64).sum();
            encode(
                &Record::End {
                    blocks: blocks.len() as u64,
                    bytes,
                },
                &mut buf,
            );
        }
        buf
    }

    #[test]
    fn parse_sessions_ranges_and_extract() {
        let blocks = vec![
            (8192, vec![2u8; 4096]),
            (4096, vec![1u8; 4096]),
            (65536, vec![3u8; 4096]),
        ];
        let mut file = session_bytes(&blocks, true);
        file.extend(session_bytes(&[(0, vec![9u8; 512])], false));
        let p = parse(&file);
        assert_eq!(p.problem, None);
        assert_eq!(p.sessions.len(), 2);
        let s = &p.sessions[0];
        assert!(s.complete);
        assert_eq!(s.bytes(), 3 * 4096);
        assert_eq!(s.ranges(), vec![(4096, 8192), (65536, 4096)]);
        assert_eq!(s.header, header());
        assert!(!p.sessions[1].complete);

        let got = extract(&file, s, 4096, 8192).unwrap();
        assert_eq!(&got[..4096], &[1u8; 4096][..]);
        assert_eq!(&got[4096..], &[2u8; 4096][..]);
        assert_eq!(extract(&file, s, 6000, 100).unwrap(), vec![1u8; 100]);
        // A hole in the saved ranges names its first byte.
        assert_eq!(extract(&file, s, 4096, 16384), Err(12288));
        assert_eq!(extract(&file, s, 0, 10), Err(0));
    }

    #[test]
    fn damage_keeps_what_came_before() {
        let mut file = session_bytes(&[(0, vec![5u8; 100])], true);
        let good = file.len();
        file.extend(session_bytes(&[(4096, vec![6u8; 100])], true));
        file[good + 20] ^= 0xff;
        let p = parse(&file);
        assert_eq!(p.sessions.len(), 1);
        assert!(p.sessions[0].complete);
        let (at, why) = p.problem.unwrap();
        assert_eq!(at, good as u64);
        assert!(why.contains("CRC"), "{why}");

        // A torn tail.
        let mut torn = session_bytes(&[(0, vec![5u8; 100])], false);
        torn.truncate(torn.len() - 3);
        let p = parse(&torn);
        assert_eq!(p.sessions[0].blocks.len(), 0);
        assert!(p.problem.unwrap().1.contains("torn"));

        // A block before any Begin, and an End that disagrees.
        let mut orphan = Vec::new();
        encode(
            &Record::Block {
                offset: 0,
                data: vec![1],
            },
            &mut orphan,
        );
        assert!(parse(&orphan).problem.unwrap().1.contains("outside"));
        let mut bad_end = session_bytes(&[(0, vec![1u8; 10])], false);
        encode(
            &Record::End {
                blocks: 1,
                bytes: 11,
            },
            &mut bad_end,
        );
        let p = parse(&bad_end);
        assert!(!p.sessions[0].complete);
        assert!(p.problem.unwrap().1.contains("disagrees"));
    }

    #[test]
    fn malformed_records() {
        let mut buf = Vec::new();
        encode(
            &Record::End {
                blocks: 1,
                bytes: 2,
            },
            &mut buf,
        );
        buf[4] = 99;
        let crc = crc32fast::hash(&buf[..buf.len() - 4]);
        let n = buf.len();
        buf[n - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&buf), Err(DecodeError::UnknownKind(99)));
        let mut big = Vec::new();
        big.extend_from_slice(&MAGIC);
        big.extend_from_slice(&[kind::BLOCK, 0, 0, 0]);
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&big), Err(DecodeError::TooLarge(u32::MAX)));
        assert_eq!(decode(b"XXXX"), Err(DecodeError::BadMagic(*b"XXXX")));
    }

    #[test]
    fn utc_and_extract_to() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
        let file = session_bytes(&[(8192, vec![7u8; 4096])], true);
        let p = parse(&file);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        assert_eq!(extract_to(&file, &p, 0, None, &img).unwrap(), 4096);
        let got = std::fs::read(&img).unwrap();
        assert_eq!(got.len(), 8192 + 4096);
        assert_eq!(&got[8192..], &[7u8; 4096][..]);
        assert!(got[..8192].iter().all(|&b| b == 0));
        let part = dir.path().join("part");
        assert_eq!(
            extract_to(&file, &p, 0, Some((9000, 10)), &part).unwrap(),
            10
        );
        assert_eq!(std::fs::read(&part).unwrap(), vec![7u8; 10]);
        assert!(matches!(
            extract_to(&file, &p, 0, Some((0, 10)), &part),
            Err(ExtractError::NotSaved(0))
        ));
        assert!(matches!(
            extract_to(&file, &p, 1, None, &part),
            Err(ExtractError::NoSession(1))
        ));
        let l = Listing::new(&img, &p);
        assert_eq!(l.sessions[0].ranges, vec![(8192, 4096)]);
        assert_eq!(l.sessions[0].generation, "00000000deadbeef");
        assert_eq!(
            read(&dir.path().join("missing")).unwrap().1,
            Parsed::default()
        );
    }

    #[test]
    fn writer_appends_durable_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("r0.divergent");
        let mut w = SessionWriter::begin(&path, &header()).unwrap();
        let data: Vec<u8> = (0..(MAX_BLOCK + 4096)).map(|i| i as u8).collect();
        w.block(1 << 20, &data).unwrap();
        assert_eq!(w.finish().unwrap(), (2, data.len() as u64));
        let w = SessionWriter::begin(&path, &header()).unwrap();
        w.finish().unwrap();
        let file = std::fs::read(&path).unwrap();
        let p = parse(&file);
        assert_eq!(p.problem, None);
        assert_eq!(p.sessions.len(), 2);
        assert_eq!(p.sessions[0].ranges(), vec![(1 << 20, data.len() as u64)]);
        assert_eq!(
            extract(&file, &p.sessions[0], 1 << 20, data.len() as u64).unwrap(),
            data
        );
        assert!(p.sessions[1].complete && p.sessions[1].blocks.is_empty());
    }
}
