//! rsync-style deltas in bounded memory: the receiver's signature of its base file, the sender's
//! delta of the new file as a stream of self-contained chunks, and the receiver applying those
//! chunks to its base, the result checked against the sender's BLAKE3 hash.
//!
//! The flow for one changed file (receiver R holds the old version, sender S the new one):
//!
//! 1. R: [`BaseSignature::compute`] over its base file (streaming) and sends [`BaseSignature::as_bytes`].
//! 2. S: [`BaseSignature::parse`] the bytes, [`BaseSignature::index`] them once, then
//!    [`DeltaEncoder::next_chunk`] until `None`, sending each chunk as one message; finally
//!    [`DeltaEncoder::finish`] gives the length and BLAKE3 hash of exactly the bytes that were encoded.
//! 3. R: [`DeltaApplier::apply_chunk`] for every chunk as it arrives, then
//!    [`DeltaApplier::finish`] with the sender's length and hash; a mismatch is an error.
//!
//! Every chunk is a complete fast_rsync delta (magic, commands, end) that, applied to the whole
//! base, yields the next piece of the new file; chunks are applied in order and their outputs are
//! concatenated. The sender reads the new file in windows ([`DeltaOptions::window`]), so its
//! memory is one window plus the signature index; a literal run at the end of a window that
//! could still start a match is carried into the next window, so window edges do not break
//! matching. The receiver never maps or reads the whole base: each chunk is split into segments
//! whose copy commands span at most [`SEGMENT_SPAN`] bytes of the base (built one at a time, after
//! the chunk's whole output is checked against the announced length), that span is read with
//! `pread`, and the segment is applied with `fast_rsync::apply_limited`. A base that shrinks
//! underneath is a clear error, not a `SIGBUS`.
//!
//! Wire formats are fast_rsync's (librsync-compatible) signature and delta formats; the chunk
//! codec here ([`parse_chunk`], [`encode_chunk`]) is pure and checks every field.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use fast_rsync::{ApplyError, DiffError, IndexedSignature, Signature, SignatureOptions};

/// Default bytes of the new file read per delta chunk.
pub const DEFAULT_WINDOW: usize = 4 << 20;
/// Most bytes of the base a receiver reads into memory for one segment.
pub const SEGMENT_SPAN: u64 = 4 << 20;
/// Smallest block size used in signatures.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Most blocks a generated signature holds (12 bytes each: about 12 MiB); larger files get larger blocks.
pub const MAX_BLOCKS: u64 = 1 << 20;
/// Bytes of the MD4 strong hash kept per block; the whole file is verified with BLAKE3 anyway.
pub const STRONG_LEN: u32 = 8;
/// Largest signature [`BaseSignature::parse`] accepts from a peer.
pub const MAX_SIGNATURE_LEN: usize = 12 + (MAX_BLOCKS as usize) * (4 + 16);
/// Largest block size [`BaseSignature::parse`] accepts from a peer.
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;

const SIGNATURE_HEADER_LEN: usize = 12;
const MD4_MAGIC: u32 = 0x7273_0136;
const DELTA_MAGIC: u32 = 0x7273_0236;
const OP_END: u8 = 0x00;
const OP_LITERAL_1: u8 = 0x01;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

/// Why a signature, delta or apply step failed.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("reading the base file failed")]
    ReadBase(#[source] io::Error),
    #[error("opening {path} failed")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the new file failed")]
    ReadSource(#[source] io::Error),
    #[error("malformed signature: {0}")]
    Signature(String),
    #[error("computing the delta failed")]
    Diff(#[source] DiffError),
    #[error("malformed delta chunk: {0}")]
    Malformed(String),
    #[error("delta copies {len} bytes at offset {offset}, past the base's {base_len} bytes")]
    CopyOutOfBounds {
        offset: u64,
        len: u64,
        base_len: u64,
    },
    #[error("the base file changed while the delta was applied (short read at offset {offset})")]
    BaseChanged { offset: u64 },
    #[error("the delta produces more than the announced {expected} bytes")]
    OutputTooLong { expected: u64 },
    #[error("applying a delta segment failed")]
    Apply(#[source] ApplyError),
    #[error("writing the patched output failed")]
    Write(#[source] io::Error),
    #[error("the patched file has {actual} bytes, the sender's has {expected}")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("the patched file's BLAKE3 hash {actual} differs from the sender's {expected}")]
    HashMismatch {
        expected: blake3::Hash,
        actual: blake3::Hash,
    },
}

/// Tuning of the sender side.
#[derive(Clone, Copy, Debug)]
pub struct DeltaOptions {
    /// Bytes of the new file read per chunk (raised to twice the block size when smaller).
    pub window: usize,
}

impl Default for DeltaOptions {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
        }
    }
}

/// Upper bound of the length of one chunk the encoder emits for `window` and `block_size`.
pub fn max_chunk_len(window: usize, block_size: u32) -> usize {
    let window = window.max(2 * block_size as usize);
    // Magic, end, and per literal or copy at most 17 header bytes; a chunk holds at most one
    // literal per copy, copies at most one per block.
    window + block_size as usize + 64 + 17 * 2 * (window / block_size.max(1) as usize + 1)
}

/// The signature block size for a base of `len` bytes: about the square root of the length (like
/// rsync), at least [`MIN_BLOCK_SIZE`], and large enough that at most [`MAX_BLOCKS`] blocks result.
pub fn block_size_for(len: u64) -> u32 {
    let sqrt = (len as f64).sqrt() as u64;
    let rounded = sqrt.div_ceil(64) * 64;
    let for_count = len.div_ceil(MAX_BLOCKS);
    let size = rounded.max(for_count).max(MIN_BLOCK_SIZE as u64);
    u32::try_from(size).unwrap_or(u32::MAX)
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A receiver's signature of its base file (fast_rsync/librsync MD4 format).
#[derive(Clone, Debug)]
pub struct BaseSignature {
    signature: Signature,
    block_size: u32,
    blocks: u64,
}

impl BaseSignature {
    /// Computes the signature of the `len`-byte base read from `base`, one window at a time.
    /// `len` only picks the block size; the signature covers whatever `base` yields.
    pub fn compute(mut base: impl Read, len: u64) -> Result<Self, DeltaError> {
        let block_size = block_size_for(len);
        let options = SignatureOptions {
            block_size,
            crypto_hash_size: STRONG_LEN,
        };
        let window = (DEFAULT_WINDOW / block_size as usize).max(1) * block_size as usize;
        let mut buf = vec![0u8; window];
        let mut bytes = Signature::calculate(&[], options).into_serialized();
        loop {
            let n = read_full(&mut base, &mut buf).map_err(DeltaError::ReadBase)?;
            if n == 0 {
                break;
            }
            let part = Signature::calculate(&buf[..n], options);
            bytes.extend_from_slice(&part.serialized()[SIGNATURE_HEADER_LEN..]);
            if n < buf.len() {
                break;
            }
        }
        Self::parse(bytes)
    }

    /// Computes the signature of the file at `path`.
    pub fn of_file(path: &Path) -> Result<Self, DeltaError> {
        let file = crate::entry::open_regular(path).map_err(|source| DeltaError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file.metadata().map_err(DeltaError::ReadBase)?.len();
        Self::compute(io::BufReader::with_capacity(1 << 16, file), len)
    }

    /// Checks and takes a signature received from a peer.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, DeltaError> {
        if bytes.len() < SIGNATURE_HEADER_LEN {
            return Err(DeltaError::Signature(format!(
                "{} bytes, shorter than a header",
                bytes.len()
            )));
        }
        if bytes.len() > MAX_SIGNATURE_LEN {
            return Err(DeltaError::Signature(format!(
                "{} bytes, over the limit",
                bytes.len()
            )));
        }
        let word = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let (magic, block_size, strong_len) = (word(0), word(4), word(8));
        if magic != MD4_MAGIC {
            return Err(DeltaError::Signature(format!(
                "magic {magic:#010x} is not an MD4 signature"
            )));
        }
        if block_size == 0 || block_size > MAX_BLOCK_SIZE {
            return Err(DeltaError::Signature(format!("block size {block_size}")));
        }
        if strong_len == 0 || strong_len > 16 {
            return Err(DeltaError::Signature(format!(
                "strong hash length {strong_len}"
            )));
        }
        let entry = 4 + strong_len as usize;
        let body = bytes.len() - SIGNATURE_HEADER_LEN;
        if body % entry != 0 {
            return Err(DeltaError::Signature(format!(
                "{body} body bytes are not whole {entry}-byte entries"
            )));
        }
        let blocks = (body / entry) as u64;
        let signature =
            Signature::deserialize(bytes).map_err(|e| DeltaError::Signature(e.to_string()))?;
        Ok(Self {
            signature,
            block_size,
            blocks,
        })
    }

    /// The serialized signature, to send to the peer.
    pub fn as_bytes(&self) -> &[u8] {
        self.signature.serialized()
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Builds the lookup table the encoder needs (once per file).
    pub fn index(&self) -> IndexedSignature<'_> {
        self.signature.index()
    }
}

/// What a finished delta encoding sent, and what the receiver must end up with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaSummary {
    /// Length of the new file as read.
    pub len: u64,
    /// BLAKE3 of the new file as read (exactly the bytes the chunks encode).
    pub hash: blake3::Hash,
    pub chunks: u64,
    /// Total bytes of all chunks.
    pub delta_bytes: u64,
    /// Bytes of the new file sent as literals.
    pub literal_bytes: u64,
    /// Bytes of the new file referenced from the base.
    pub copied_bytes: u64,
}

/// Encodes the delta of a new file against a [`BaseSignature`], one bounded chunk at a time.
pub struct DeltaEncoder<'s, R> {
    index: &'s IndexedSignature<'s>,
    block_size: usize,
    source: R,
    window: usize,
    /// Unconsumed bytes of the new file: a carried tail of the previous window, then new reads.
    buf: Vec<u8>,
    carry: usize,
    eof: bool,
    hasher: blake3::Hasher,
    summary: DeltaSummary,
}

impl<'s, R: Read> DeltaEncoder<'s, R> {
    /// `index` comes from [`BaseSignature::index`] of the same signature as `signature`.
    pub fn new(
        signature: &BaseSignature,
        index: &'s IndexedSignature<'s>,
        source: R,
        options: DeltaOptions,
    ) -> Self {
        let block_size = signature.block_size() as usize;
        let window = options.window.max(2 * block_size).max(1);
        Self {
            index,
            block_size,
            source,
            window,
            buf: Vec::new(),
            carry: 0,
            eof: false,
            hasher: blake3::Hasher::new(),
            summary: DeltaSummary {
                len: 0,
                hash: blake3::Hasher::new().finalize(),
                chunks: 0,
                delta_bytes: 0,
                literal_bytes: 0,
                copied_bytes: 0,
            },
        }
    }

    /// The next chunk, or `None` when the whole new file is encoded. An empty file has no chunks.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, DeltaError> {
        if self.eof && self.carry == 0 {
            return Ok(None);
        }
        if !self.eof {
            self.buf.resize(self.carry + self.window, 0);
            let n = read_full(&mut self.source, &mut self.buf[self.carry..])
                .map_err(DeltaError::ReadSource)?;
            self.hasher.update(&self.buf[self.carry..self.carry + n]);
            self.summary.len += n as u64;
            self.buf.truncate(self.carry + n);
            if n < self.window {
                self.eof = true;
            }
        }
        if self.buf.is_empty() {
            self.carry = 0;
            return Ok(None);
        }
        let mut chunk = Vec::new();
        fast_rsync::diff(self.index, &self.buf, &mut chunk).map_err(DeltaError::Diff)?;
        let mut ops = parse_chunk(&chunk).map_err(DeltaError::Malformed)?;
        // An unmatched tail shorter than a block may still start a match once the next window
        // arrives: carry it over instead of sending it as a literal now.
        let mut keep = 0;
        if !self.eof {
            if let Some(Op::Literal(tail)) = ops.last_mut() {
                keep = tail.len().min(self.block_size - 1);
                *tail = &tail[..tail.len() - keep];
                if tail.is_empty() {
                    ops.pop();
                }
            }
        }
        for op in &ops {
            match op {
                Op::Literal(data) => self.summary.literal_bytes += data.len() as u64,
                Op::Copy { len, .. } => self.summary.copied_bytes += len,
            }
        }
        if keep > 0 {
            let mut trimmed = Vec::with_capacity(chunk.len());
            encode_chunk(&ops, &mut trimmed);
            chunk = trimmed;
        } else {
            drop(ops);
        }
        let consumed = self.buf.len() - keep;
        self.buf.drain(..consumed);
        self.carry = keep;
        self.summary.chunks += 1;
        self.summary.delta_bytes += chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// Length, hash and statistics of what was encoded. Call after `next_chunk` returned `None`.
    pub fn finish(mut self) -> DeltaSummary {
        self.summary.hash = self.hasher.finalize();
        self.summary
    }
}

/// One command of a delta chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// Bytes of the new file carried in the delta.
    Literal(&'a [u8]),
    /// `len` bytes of the base starting at `offset`.
    Copy { offset: u64, len: u64 },
}

/// Parses a chunk (one complete fast_rsync delta), checking every field; the error says what is wrong.
pub fn parse_chunk(bytes: &[u8]) -> Result<Vec<Op<'_>>, String> {
    let mut cursor = bytes;
    fn take<'a>(cursor: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
        if cursor.len() < n {
            return Err(format!(
                "truncated {what}: need {n} bytes, {} left",
                cursor.len()
            ));
        }
        let (head, rest) = cursor.split_at(n);
        *cursor = rest;
        Ok(head)
    }
    fn varint(cursor: &mut &[u8], width: usize, what: &str) -> Result<u64, String> {
        let raw = take(cursor, width, what)?;
        Ok(raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
    let magic = take(&mut cursor, 4, "magic")?;
    let magic = u32::from_be_bytes([magic[0], magic[1], magic[2], magic[3]]);
    if magic != DELTA_MAGIC {
        return Err(format!("magic {magic:#010x} is not a delta"));
    }
    let mut ops = Vec::new();
    loop {
        let cmd = take(&mut cursor, 1, "command")?[0];
        match cmd {
            OP_END => break,
            OP_LITERAL_1..=OP_LITERAL_64 => {
                let len = usize::from(cmd - OP_LITERAL_1 + 1);
                ops.push(Op::Literal(take(&mut cursor, len, "literal")?));
            }
            OP_LITERAL_N1..=OP_LITERAL_N8 => {
                let width = 1usize << (cmd - OP_LITERAL_N1);
                let len = varint(&mut cursor, width, "literal length")?;
                let len = usize::try_from(len).map_err(|_| format!("literal of {len} bytes"))?;
                ops.push(Op::Literal(take(&mut cursor, len, "literal")?));
            }
            OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                let mode = cmd - OP_COPY_N1_N1;
                let offset = varint(&mut cursor, 1 << (mode / 4), "copy offset")?;
                let len = varint(&mut cursor, 1 << (mode % 4), "copy length")?;
                if len == 0 {
                    return Err("zero-length copy".into());
                }
                if offset.checked_add(len).is_none() {
                    return Err(format!("copy of {len} bytes at {offset} overflows"));
                }
                ops.push(Op::Copy { offset, len });
            }
            other => return Err(format!("unknown command {other:#04x}")),
        }
    }
    if !cursor.is_empty() {
        return Err(format!("{} bytes after the end command", cursor.len()));
    }
    Ok(ops)
}

fn size_class(value: u64) -> u8 {
    match value {
        0..=0xff => 0,
        0x100..=0xffff => 1,
        0x1_0000..=0xffff_ffff => 2,
        _ => 3,
    }
}

fn put_varint(out: &mut Vec<u8>, value: u64, class: u8) {
    let width = 1usize << class;
    out.extend_from_slice(&value.to_be_bytes()[8 - width..]);
}

/// Encodes commands as one complete fast_rsync delta (empty literals and copies are skipped).
pub fn encode_chunk(ops: &[Op<'_>], out: &mut Vec<u8>) {
    out.extend_from_slice(&DELTA_MAGIC.to_be_bytes());
    for op in ops {
        match *op {
            Op::Literal(data) if data.is_empty() => {}
            Op::Literal(data) => {
                let len = data.len() as u64;
                if len <= 64 {
                    out.push(OP_LITERAL_1 + (len - 1) as u8);
                } else {
                    let class = size_class(len);
                    out.push(OP_LITERAL_N1 + class);
                    put_varint(out, len, class);
                }
                out.extend_from_slice(data);
            }
            Op::Copy { len: 0, .. } => {}
            Op::Copy { offset, len } => {
                let (oc, lc) = (size_class(offset), size_class(len));
                out.push(OP_COPY_N1_N1 + oc * 4 + lc);
                put_varint(out, offset, oc);
                put_varint(out, len, lc);
            }
        }
    }
    out.push(OP_END);
}

/// Splits commands into segments whose copies span at most `span` bytes of the base; copies
/// longer than `span` are cut. Yields each segment's commands with the base range `lo..hi` its
/// copies read. Lazy: one segment exists at a time, so a chunk of a few bytes per copy that each
/// copy a whole large base (thousands of segments per copy) costs no more memory than one.
struct Segments<'a> {
    ops: std::vec::IntoIter<Op<'a>>,
    /// The uncut rest of a copy that did not fit the previous segment.
    pending: Option<(u64, u64)>,
    span: u64,
}

impl<'a> Segments<'a> {
    fn new(ops: Vec<Op<'a>>, span: u64) -> Self {
        Self {
            ops: ops.into_iter(),
            pending: None,
            span,
        }
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = (Vec<Op<'a>>, u64, u64);

    fn next(&mut self) -> Option<Self::Item> {
        let mut current: Vec<Op<'a>> = Vec::new();
        let mut range: Option<(u64, u64)> = None;
        loop {
            let (mut offset, mut len) = match self.pending.take() {
                Some(copy) => copy,
                None => match self.ops.next() {
                    Some(Op::Copy { offset, len }) => (offset, len),
                    Some(literal) => {
                        current.push(literal);
                        continue;
                    }
                    None => break,
                },
            };
            while len > 0 {
                let piece = len.min(self.span);
                let (lo, hi) = match range {
                    Some((lo, hi)) => (lo.min(offset), hi.max(offset + piece)),
                    None => (offset, offset + piece),
                };
                if hi - lo > self.span {
                    // Starts the next segment; `range` is only set once a copy is in `current`.
                    self.pending = Some((offset, len));
                    let (lo, hi) = range.unwrap_or((0, 0));
                    return Some((current, lo, hi));
                }
                range = Some((lo, hi));
                current.push(Op::Copy { offset, len: piece });
                offset += piece;
                len -= piece;
            }
        }
        if current.is_empty() {
            return None;
        }
        let (lo, hi) = range.unwrap_or((0, 0));
        Some((current, lo, hi))
    }
}

/// Writes through to `inner`, hashing and counting.
struct HashingWriter<'w, W> {
    inner: &'w mut W,
    hasher: &'w mut blake3::Hasher,
    written: &'w mut u64,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        *self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Applies delta chunks to a base file, writing the new file to `out` (wrap files in a `BufWriter`).
pub struct DeltaApplier<W> {
    base: File,
    base_len: u64,
    out: W,
    expected_len: u64,
    written: u64,
    hasher: blake3::Hasher,
    base_buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl<W: Write> DeltaApplier<W> {
    /// `expected_len` is the sender's announced length: the output may never exceed it.
    pub fn new(base: File, out: W, expected_len: u64) -> Result<Self, DeltaError> {
        let base_len = base.metadata().map_err(DeltaError::ReadBase)?.len();
        Ok(Self {
            base,
            base_len,
            out,
            expected_len,
            written: 0,
            hasher: blake3::Hasher::new(),
            base_buf: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Bytes of the new file written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Applies the next chunk in order.
    pub fn apply_chunk(&mut self, chunk: &[u8]) -> Result<(), DeltaError> {
        let ops = parse_chunk(chunk).map_err(DeltaError::Malformed)?;
        // The chunk's whole output is known before anything is read or written: one that would
        // pass the announced length is refused at once, not after writing up to it.
        let mut output: u64 = 0;
        for op in &ops {
            let len = match *op {
                Op::Copy { offset, len } => {
                    if offset + len > self.base_len {
                        return Err(DeltaError::CopyOutOfBounds {
                            offset,
                            len,
                            base_len: self.base_len,
                        });
                    }
                    len
                }
                Op::Literal(data) => data.len() as u64,
            };
            output = output.saturating_add(len);
        }
        if output > self.expected_len - self.written {
            return Err(DeltaError::OutputTooLong {
                expected: self.expected_len,
            });
        }
        for (ops, lo, hi) in Segments::new(ops, SEGMENT_SPAN) {
            let span = (hi - lo) as usize;
            self.base_buf.resize(span, 0);
            if span > 0 {
                self.base
                    .read_exact_at(&mut self.base_buf, lo)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            DeltaError::BaseChanged { offset: lo }
                        } else {
                            DeltaError::ReadBase(e)
                        }
                    })?;
            }
            let rebased: Vec<Op<'_>> = ops
                .into_iter()
                .map(|op| match op {
                    Op::Copy { offset, len } => Op::Copy {
                        offset: offset - lo,
                        len,
                    },
                    literal => literal,
                })
                .collect();
            self.scratch.clear();
            encode_chunk(&rebased, &mut self.scratch);
            let remaining = self.expected_len - self.written;
            let limit = usize::try_from(remaining).unwrap_or(usize::MAX);
            let mut writer = HashingWriter {
                inner: &mut self.out,
                hasher: &mut self.hasher,
                written: &mut self.written,
            };
            fast_rsync::apply_limited(&self.base_buf, &self.scratch, &mut writer, limit).map_err(
                |e| match e {
                    ApplyError::OutputLimit { .. } => DeltaError::OutputTooLong {
                        expected: self.expected_len,
                    },
                    ApplyError::Io(source) => DeltaError::Write(source),
                    other => DeltaError::Apply(other),
                },
            )?;
        }
        Ok(())
    }

    /// Checks the result against the sender's length and hash and gives back the writer (flushed).
    pub fn finish(mut self, expected_hash: &blake3::Hash) -> Result<W, DeltaError> {
        self.out.flush().map_err(DeltaError::Write)?;
        if self.written != self.expected_len {
            return Err(DeltaError::LengthMismatch {
                expected: self.expected_len,
                actual: self.written,
            });
        }
        let actual = self.hasher.finalize();
        if actual != *expected_hash {
            return Err(DeltaError::HashMismatch {
                expected: *expected_hash,
                actual,
            });
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// Deterministic pseudo-random bytes (xorshift), so tests need no extra crates.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn base_file(dir: &Path, data: &[u8]) -> File {
        let path = dir.join("base");
        std::fs::write(&path, data).unwrap();
        File::open(&path).unwrap()
    }

    /// Runs the whole flow in memory and returns (patched output, summary).
    fn round_trip(base: &[u8], new: &[u8], window: usize) -> (Vec<u8>, DeltaSummary) {
        let dir = tempfile::tempdir().unwrap();
        let signature = BaseSignature::compute(Cursor::new(base), base.len() as u64).unwrap();
        let received = BaseSignature::parse(signature.as_bytes().to_vec()).unwrap();
        let index = received.index();
        let mut encoder =
            DeltaEncoder::new(&received, &index, Cursor::new(new), DeltaOptions { window });
        let mut applier =
            DeltaApplier::new(base_file(dir.path(), base), Vec::new(), new.len() as u64).unwrap();
        while let Some(chunk) = encoder.next_chunk().unwrap() {
            assert!(chunk.len() <= max_chunk_len(window, received.block_size()));
            applier.apply_chunk(&chunk).unwrap();
        }
        let summary = encoder.finish();
        assert_eq!(summary.len, new.len() as u64);
        assert_eq!(summary.hash, blake3::hash(new));
        let out = applier.finish(&summary.hash).unwrap();
        (out, summary)
    }

    #[test]
    fn block_size_grows_with_the_file() {
        assert_eq!(block_size_for(0), MIN_BLOCK_SIZE);
        assert_eq!(block_size_for(64 << 20), 8192);
        assert_eq!(block_size_for(2 << 30), 46400);
        assert!((1u64 << 42).div_ceil(block_size_for(1 << 42) as u64) <= MAX_BLOCKS);
    }

    #[test]
    fn streamed_signature_equals_one_shot() {
        let data = noise(3 * DEFAULT_WINDOW + 12345, 1);
        let streamed = BaseSignature::compute(Cursor::new(&data), data.len() as u64).unwrap();
        let options = SignatureOptions {
            block_size: block_size_for(data.len() as u64),
            crypto_hash_size: STRONG_LEN,
        };
        assert_eq!(
            streamed.as_bytes(),
            Signature::calculate(&data, options).serialized()
        );
        assert_eq!(
            streamed.blocks(),
            (data.len() as u64).div_ceil(streamed.block_size() as u64)
        );
    }

    #[test]
    fn identical_files_give_a_tiny_delta() {
        let data = noise(64 << 20, 2);
        let (out, summary) = round_trip(&data, &data, DEFAULT_WINDOW);
        assert!(out == data);
        assert_eq!(summary.literal_bytes, 0);
        assert!(summary.delta_bytes < 512, "{summary:?}");
    }

    #[test]
    fn one_byte_change_in_64_mib_costs_a_few_kib() {
        let base = noise(64 << 20, 3);
        let mut new = base.clone();
        new[40_000_123] ^= 0x5a;
        let (out, summary) = round_trip(&base, &new, DEFAULT_WINDOW);
        assert!(out == new);
        let signature = BaseSignature::compute(Cursor::new(&base), base.len() as u64).unwrap();
        assert!(summary.delta_bytes < 3 * 8192, "{summary:?}");
        assert!(
            signature.as_bytes().len() < 128 * 1024,
            "{}",
            signature.as_bytes().len()
        );
    }

    #[test]
    fn insertions_and_deletions_shift_data() {
        let base = noise(10 << 20, 4);
        let mut new = Vec::new();
        new.extend_from_slice(b"inserted at the start");
        new.extend_from_slice(&base[..3_000_000]);
        new.extend_from_slice(&noise(777, 5));
        new.extend_from_slice(&base[3_000_000..6_000_000]);
        new.extend_from_slice(&base[6_100_000..]); // 100,000 bytes deleted
        // Small windows so matches must survive many window edges at odd offsets.
        let (out, summary) = round_trip(&base, &new, 256 * 1024);
        assert!(out == new);
        assert!(summary.literal_bytes < 64 * 1024, "{summary:?}");
    }

    #[test]
    fn empty_files() {
        let some = noise(5000, 6);
        let (out, summary) = round_trip(&[], &[], DEFAULT_WINDOW);
        assert!(out.is_empty());
        assert_eq!(summary.chunks, 0);
        let (out, _) = round_trip(&[], &some, DEFAULT_WINDOW);
        assert_eq!(out, some);
        let (out, summary) = round_trip(&some, &[], DEFAULT_WINDOW);
        assert!(out.is_empty());
        assert_eq!(summary.chunks, 0);
    }

    #[test]
    fn corrupted_or_lying_deltas_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let base = noise(1 << 20, 7);
        let mut new = base.clone();
        new[500_000] ^= 1;
        let signature = BaseSignature::compute(Cursor::new(&base), base.len() as u64).unwrap();
        let index = signature.index();
        let mut encoder = DeltaEncoder::new(
            &signature,
            &index,
            Cursor::new(&new),
            DeltaOptions::default(),
        );
        let chunk = encoder.next_chunk().unwrap().unwrap();
        assert!(encoder.next_chunk().unwrap().is_none());
        let summary = encoder.finish();
        let applier = || {
            DeltaApplier::new(base_file(dir.path(), &base), Vec::new(), new.len() as u64).unwrap()
        };

        // A flipped literal byte: applies, but the hash check refuses the result.
        let ops = parse_chunk(&chunk).unwrap();
        let literal_at = chunk.len() - 2; // last literal byte or copy field before END
        let mut bad = chunk.clone();
        bad[literal_at] ^= 0xff;
        let mut a = applier();
        match a.apply_chunk(&bad) {
            Ok(()) => assert!(matches!(
                a.finish(&summary.hash),
                Err(DeltaError::HashMismatch { .. } | DeltaError::LengthMismatch { .. })
            )),
            Err(_) => {}
        }
        assert!(ops.iter().any(|op| matches!(op, Op::Literal(_))));

        // Truncated, trailing garbage, wrong magic, unknown command.
        let mut a = applier();
        assert!(matches!(
            a.apply_chunk(&chunk[..chunk.len() - 1]),
            Err(DeltaError::Malformed(_))
        ));
        let mut long = chunk.clone();
        long.push(0);
        assert!(matches!(
            applier().apply_chunk(&long),
            Err(DeltaError::Malformed(_))
        ));
        assert!(matches!(
            applier().apply_chunk(b"xxxx\0"),
            Err(DeltaError::Malformed(_))
        ));
        let mut unknown = DELTA_MAGIC.to_be_bytes().to_vec();
        unknown.push(0x99);
        assert!(matches!(
            applier().apply_chunk(&unknown),
            Err(DeltaError::Malformed(_))
        ));

        // A copy past the end of the base.
        let mut oob = Vec::new();
        encode_chunk(
            &[Op::Copy {
                offset: base.len() as u64 - 10,
                len: 11,
            }],
            &mut oob,
        );
        assert!(matches!(
            applier().apply_chunk(&oob),
            Err(DeltaError::CopyOutOfBounds { .. })
        ));

        // More output than announced.
        let mut a = DeltaApplier::new(base_file(dir.path(), &base), Vec::new(), 10).unwrap();
        assert!(matches!(
            a.apply_chunk(&chunk),
            Err(DeltaError::OutputTooLong { .. })
        ));

        // Missing chunk: the length check catches it.
        let a = applier();
        assert!(matches!(
            a.finish(&summary.hash),
            Err(DeltaError::LengthMismatch { .. })
        ));

        // The genuine chunk works.
        let mut a = applier();
        a.apply_chunk(&chunk).unwrap();
        assert!(a.finish(&summary.hash).unwrap() == new);
    }

    #[test]
    fn base_shrinking_underneath_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let base = noise(1 << 20, 8);
        let file = base_file(dir.path(), &base);
        let mut a = DeltaApplier::new(file, Vec::new(), base.len() as u64).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("base"))
            .unwrap()
            .set_len(1000)
            .unwrap();
        let mut chunk = Vec::new();
        encode_chunk(
            &[Op::Copy {
                offset: 0,
                len: base.len() as u64,
            }],
            &mut chunk,
        );
        assert!(matches!(
            a.apply_chunk(&chunk),
            Err(DeltaError::BaseChanged { .. })
        ));
    }

    #[test]
    fn bad_signatures_are_refused() {
        assert!(BaseSignature::parse(vec![]).is_err());
        assert!(BaseSignature::parse(vec![0; 12]).is_err());
        let mut sig = BaseSignature::compute(Cursor::new(noise(10_000, 9)), 10_000)
            .unwrap()
            .as_bytes()
            .to_vec();
        sig.pop();
        assert!(BaseSignature::parse(sig.clone()).is_err());
        let mut zero_block = sig.clone();
        zero_block[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(BaseSignature::parse(zero_block).is_err());
    }

    #[test]
    fn long_copies_are_split_into_bounded_segments() {
        let ops = vec![
            Op::Copy {
                offset: 0,
                len: 3 * SEGMENT_SPAN + 5,
            },
            Op::Literal(b"x"),
            Op::Copy {
                offset: 10 * SEGMENT_SPAN,
                len: 10,
            },
            Op::Copy {
                offset: 10,
                len: 10,
            },
        ];
        let segs: Vec<_> = Segments::new(ops, SEGMENT_SPAN).collect();
        for (ops, lo, hi) in &segs {
            assert!(hi - lo <= SEGMENT_SPAN);
            for op in ops {
                if let Op::Copy { offset, len } = op {
                    assert!(*offset >= *lo && offset + len <= *hi);
                }
            }
        }
        let total: u64 = segs
            .iter()
            .flat_map(|(ops, _, _)| ops)
            .map(|op| match op {
                Op::Copy { len, .. } => *len,
                Op::Literal(d) => d.len() as u64,
            })
            .sum();
        assert_eq!(total, 3 * SEGMENT_SPAN + 5 + 1 + 20);
    }

    #[test]
    fn a_chunk_longer_than_announced_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let base = noise(1 << 20, 9);
        let mut chunk = Vec::new();
        let copy = Op::Copy {
            offset: 0,
            len: base.len() as u64,
        };
        encode_chunk(&[Op::Literal(b"12345"), copy], &mut chunk);
        let mut applier = DeltaApplier::new(base_file(dir.path(), &base), Vec::new(), 10).unwrap();
        let err = applier.apply_chunk(&chunk).unwrap_err();
        assert!(
            matches!(err, DeltaError::OutputTooLong { expected: 10 }),
            "{err}"
        );
        assert_eq!(applier.written(), 0);
        assert!(
            applier.out.is_empty(),
            "nothing of the refused chunk is written"
        );
    }

    /// A writer whose every write fails (a full disk).
    struct FullDisk;

    impl Write for FullDisk {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("no space left"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Set in the child process that runs the memory measurement alone.
    const MEMORY_CHILD: &str = "FILED_DELTA_MEMORY_CHILD";

    /// A peer's chunk of 10000 copies of a whole 1 GiB base (9 bytes each, 256 segments each)
    /// must not build its 2.56 million segments up front (about 250 MiB): the peer controls the
    /// count, and with a larger base and a full frame it is about 100 GB. Measured in a child
    /// process running only this test, so other tests do not move the peak.
    #[test]
    fn whole_base_copies_cost_one_segment_of_memory() {
        const NAME: &str = "delta::tests::whole_base_copies_cost_one_segment_of_memory";
        if std::env::var_os(MEMORY_CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(MEMORY_CHILD, "1")
                .output()
                .unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "child failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        File::create(&path).unwrap().set_len(1 << 30).unwrap();
        let copies = vec![
            Op::Copy {
                offset: 0,
                len: 1 << 30,
            };
            10_000
        ];
        let mut chunk = Vec::new();
        encode_chunk(&copies, &mut chunk);
        drop(copies);
        let before = peak_rss();
        let mut applier =
            DeltaApplier::new(File::open(&path).unwrap(), FullDisk, u64::MAX).unwrap();
        let err = applier.apply_chunk(&chunk).unwrap_err();
        assert!(matches!(err, DeltaError::Write(_)), "{err}");
        let grown = peak_rss().saturating_sub(before);
        assert!(
            grown < 32 << 20,
            "applying grew the peak RSS by {} MiB",
            grown >> 20
        );
    }

    fn arb_op() -> impl Strategy<Value = (bool, Vec<u8>, u64, u64)> {
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 1..300),
            prop_oneof![0u64..300, 0u64..70_000, 0u64..u64::MAX / 4],
            prop_oneof![1u64..300, 1u64..70_000, 1u64..(1 << 40)],
        )
    }

    proptest! {
        #[test]
        fn chunk_codec_round_trips(raw in proptest::collection::vec(arb_op(), 0..20)) {
            let ops: Vec<Op<'_>> = raw
                .iter()
                .map(|(lit, data, offset, len)| if *lit { Op::Literal(data) } else { Op::Copy { offset: *offset, len: *len } })
                .collect();
            let mut bytes = Vec::new();
            encode_chunk(&ops, &mut bytes);
            prop_assert_eq!(parse_chunk(&bytes).unwrap(), ops);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_chunk(&bytes);
            let mut with_magic = DELTA_MAGIC.to_be_bytes().to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = parse_chunk(&with_magic);
        }

        #[test]
        fn random_edits_round_trip(seed in any::<u64>(), edits in proptest::collection::vec((0usize..200_000, 0usize..3000, any::<bool>()), 0..6)) {
            let base = noise(200_000, seed);
            let mut new = base.clone();
            for (at, len, insert) in edits {
                let at = at.min(new.len());
                if insert {
                    let piece = noise(len, seed ^ at as u64);
                    new.splice(at..at, piece);
                } else {
                    let end = (at + len).min(new.len());
                    new.drain(at..end);
                }
            }
            let (out, _) = round_trip(&base, &new, 16 * 1024);
            prop_assert!(out == new);
        }
    }

    /// Peak resident memory of this process (VmHWM), in bytes.
    fn peak_rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    /// Writes a 2 GiB file that is mostly holes with some data regions; `edit` changes a few bytes.
    fn sparse_file(path: &Path, edit: bool) {
        let file = File::create(path).unwrap();
        file.set_len(2 << 30).unwrap();
        for i in 0..16u64 {
            let mut data = noise(1 << 20, i);
            if edit && i % 5 == 0 {
                data[12345] ^= 0xff;
            }
            file.write_all_at(&data, i * (128 << 20)).unwrap();
        }
        if edit {
            file.write_all_at(b"appended tail", 2 << 30).unwrap();
        }
    }

    /// Run alone: `cargo test -p filed --release delta::tests::two_gib -- --ignored --nocapture`.
    #[test]
    #[ignore = "2 GiB of I/O; measures peak RSS, run alone"]
    fn two_gib_file_in_bounded_memory() {
        let dir = tempfile::tempdir_in(
            std::env::var_os("FILED_BIG_TMP").unwrap_or_else(|| "/var/tmp".into()),
        )
        .unwrap();
        let (base_path, new_path) = (dir.path().join("base"), dir.path().join("new"));
        sparse_file(&base_path, false);
        sparse_file(&new_path, true);
        let before = peak_rss();
        let started = std::time::Instant::now();
        let signature = BaseSignature::of_file(&base_path).unwrap();
        let index = signature.index();
        let new_file = File::open(&new_path).unwrap();
        let new_len = new_file.metadata().unwrap().len();
        let mut encoder = DeltaEncoder::new(&signature, &index, new_file, DeltaOptions::default());
        let mut applier =
            DeltaApplier::new(File::open(&base_path).unwrap(), io::sink(), new_len).unwrap();
        while let Some(chunk) = encoder.next_chunk().unwrap() {
            applier.apply_chunk(&chunk).unwrap();
        }
        let summary = encoder.finish();
        applier.finish(&summary.hash).unwrap();
        let peak = peak_rss();
        eprintln!(
            "2 GiB: signature {} B, delta {} B in {} chunks, literal {} B, {:.1} s, VmHWM before {} MiB, after {} MiB",
            signature.as_bytes().len(),
            summary.delta_bytes,
            summary.chunks,
            summary.literal_bytes,
            started.elapsed().as_secs_f64(),
            before >> 20,
            peak >> 20
        );
        assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);
        assert!(summary.delta_bytes < 1 << 20);
    }
}
