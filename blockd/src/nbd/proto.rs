//! NBD wire format: constants plus pure encoders and decoders for every message blockd sends or
//! receives (handshake, option haggling, requests, simple and structured replies).
//!
//! Decoders work over a byte slice and never perform I/O: they return [`Incomplete`] as a value
//! when more bytes are needed, so callers decide how to read. They never panic and never allocate
//! more than the bytes they were given (lengths inside messages are checked against the input
//! first). Encoders append to a `BytesMut` or return fixed-size arrays for the hot path.
//!
//! Reference: `doc/proto.md` of NetworkBlockDevice/nbd. blockd speaks fixed newstyle only, with
//! compact (non-extended) headers.

use bytes::{Buf, BufMut, Bytes, BytesMut};

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags
// ---------------------------------------------------------------------------------------------

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Commands and their flags
// ---------------------------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context blockd serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

// Error values of the transmission phase (spec "Error values").
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Sizes and limits
// ---------------------------------------------------------------------------------------------

/// Bytes of `NBDMAGIC` + `IHAVEOPT` + handshake flags.
pub const SERVER_GREETING_LEN: usize = 18;
/// Bytes of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Longest option payload blockd accepts; longer ones are discarded and refused.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, query, ...) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Most information requests accepted in one `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const MAX_INFO_REQUESTS: usize = 256;
/// Most metadata-context queries accepted in one option.
pub const MAX_META_QUERIES: usize = 256;

/// More bytes are needed before the message can be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incomplete;

/// Why a fixed-size message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("more bytes needed")]
    Incomplete,
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
}

impl From<Incomplete> for HeaderError {
    fn from(_: Incomplete) -> Self {
        HeaderError::Incomplete
    }
}

fn need(buf: &[u8], len: usize) -> Result<(), Incomplete> {
    if buf.len() < len {
        Err(Incomplete)
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Greeting and client flags
// ---------------------------------------------------------------------------------------------

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; SERVER_GREETING_LEN] {
    let mut out = [0u8; SERVER_GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Decodes the server greeting (for clients and tests); returns the handshake flags.
pub fn decode_greeting(mut buf: &[u8]) -> Result<u16, HeaderError> {
    need(buf, SERVER_GREETING_LEN)?;
    let magic = buf.get_u64();
    if magic != NBD_MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    let opt = buf.get_u64();
    if opt != IHAVEOPT {
        return Err(HeaderError::BadMagic(opt));
    }
    Ok(buf.get_u16())
}

/// Decodes the client's 32-bit flags.
pub fn decode_client_flags(mut buf: &[u8]) -> Result<u32, Incomplete> {
    need(buf, 4)?;
    Ok(buf.get_u32())
}

// ---------------------------------------------------------------------------------------------
// Option requests
// ---------------------------------------------------------------------------------------------

/// Header of one option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte header; the payload of `length` bytes follows it.
    pub fn decode(mut buf: &[u8]) -> Result<OptionHeader, HeaderError> {
        need(buf, OPTION_HEADER_LEN)?;
        let magic = buf.get_u64();
        if magic != IHAVEOPT {
            return Err(HeaderError::BadMagic(magic));
        }
        Ok(OptionHeader {
            option: buf.get_u32(),
            length: buf.get_u32(),
        })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// One decoded option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// An option blockd does not implement (answered with `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// Why an option payload is malformed (answered with `NBD_REP_ERR_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOption {
    #[error("option {option} carries {length} bytes of data but takes none")]
    UnexpectedData { option: u32, length: usize },
    #[error("option payload ends inside a field")]
    Truncated,
    #[error("option payload has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("{0} entries exceed the limit")]
    TooManyEntries(usize),
}

fn take_string(buf: &mut &[u8], len: usize) -> Result<String, InvalidOption> {
    if len > MAX_STRING_LEN {
        return Err(InvalidOption::StringTooLong(len));
    }
    if buf.len() < len {
        return Err(InvalidOption::Truncated);
    }
    let (text, rest) = buf.split_at(len);
    *buf = rest;
    let text = std::str::from_utf8(text).map_err(|_| InvalidOption::BadString)?;
    if text.contains('\0') {
        return Err(InvalidOption::BadString);
    }
    Ok(text.to_owned())
}

fn take_u32(buf: &mut &[u8]) -> Result<u32, InvalidOption> {
    if buf.len() < 4 {
        return Err(InvalidOption::Truncated);
    }
    Ok(buf.get_u32())
}

fn take_u16(buf: &mut &[u8]) -> Result<u16, InvalidOption> {
    if buf.len() < 2 {
        return Err(InvalidOption::Truncated);
    }
    Ok(buf.get_u16())
}

fn finish(buf: &[u8]) -> Result<(), InvalidOption> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(InvalidOption::TrailingBytes(buf.len()))
    }
}

fn no_data(option: u32, payload: &[u8]) -> Result<(), InvalidOption> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(InvalidOption::UnexpectedData {
            option,
            length: payload.len(),
        })
    }
}

fn decode_info_request(mut buf: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let name_len = take_u32(&mut buf)? as usize;
    let name = take_string(&mut buf, name_len)?;
    let count = take_u16(&mut buf)? as usize;
    if count > MAX_INFO_REQUESTS {
        return Err(InvalidOption::TooManyEntries(count));
    }
    if buf.len() < count * 2 {
        return Err(InvalidOption::Truncated);
    }
    let requests = (0..count).map(|_| buf.get_u16()).collect();
    finish(buf)?;
    Ok(InfoRequest { name, requests })
}

fn decode_meta_request(mut buf: &[u8]) -> Result<MetaContextRequest, InvalidOption> {
    let name_len = take_u32(&mut buf)? as usize;
    let name = take_string(&mut buf, name_len)?;
    let count = take_u32(&mut buf)? as usize;
    if count > MAX_META_QUERIES {
        return Err(InvalidOption::TooManyEntries(count));
    }
    let mut queries = Vec::with_capacity(count.min(buf.len() / 4));
    for _ in 0..count {
        let len = take_u32(&mut buf)? as usize;
        queries.push(take_string(&mut buf, len)?);
    }
    finish(buf)?;
    Ok(MetaContextRequest { name, queries })
}

/// Decodes the payload of option `option`. Unknown options are not an error here.
pub fn decode_option(option: u32, payload: &[u8]) -> Result<OptionRequest, InvalidOption> {
    Ok(match option {
        OPT_EXPORT_NAME => {
            let mut buf = payload;
            OptionRequest::ExportName(take_string(&mut buf, payload.len())?)
        }
        OPT_ABORT => {
            // Some clients send data with ABORT; the spec says to ack regardless.
            OptionRequest::Abort
        }
        OPT_LIST => {
            no_data(option, payload)?;
            OptionRequest::List
        }
        OPT_STARTTLS => {
            no_data(option, payload)?;
            OptionRequest::StartTls
        }
        OPT_INFO => OptionRequest::Info(decode_info_request(payload)?),
        OPT_GO => OptionRequest::Go(decode_info_request(payload)?),
        OPT_STRUCTURED_REPLY => {
            no_data(option, payload)?;
            OptionRequest::StructuredReply
        }
        OPT_LIST_META_CONTEXT => OptionRequest::ListMetaContext(decode_meta_request(payload)?),
        OPT_SET_META_CONTEXT => OptionRequest::SetMetaContext(decode_meta_request(payload)?),
        other => OptionRequest::Unknown(other),
    })
}

impl OptionRequest {
    /// The option code of this request.
    pub fn code(&self) -> u32 {
        match self {
            OptionRequest::ExportName(_) => OPT_EXPORT_NAME,
            OptionRequest::Abort => OPT_ABORT,
            OptionRequest::List => OPT_LIST,
            OptionRequest::StartTls => OPT_STARTTLS,
            OptionRequest::Info(_) => OPT_INFO,
            OptionRequest::Go(_) => OPT_GO,
            OptionRequest::StructuredReply => OPT_STRUCTURED_REPLY,
            OptionRequest::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            OptionRequest::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            OptionRequest::Unknown(code) => *code,
        }
    }

    /// Encodes header and payload (client side; used by tests and the fuzz corpus).
    pub fn encode(&self, dst: &mut BytesMut) {
        let mut payload = BytesMut::new();
        match self {
            OptionRequest::ExportName(name) => payload.put_slice(name.as_bytes()),
            OptionRequest::Info(req) | OptionRequest::Go(req) => {
                payload.put_u32(req.name.len() as u32);
                payload.put_slice(req.name.as_bytes());
                payload.put_u16(req.requests.len() as u16);
                for r in &req.requests {
                    payload.put_u16(*r);
                }
            }
            OptionRequest::ListMetaContext(req) | OptionRequest::SetMetaContext(req) => {
                payload.put_u32(req.name.len() as u32);
                payload.put_slice(req.name.as_bytes());
                payload.put_u32(req.queries.len() as u32);
                for q in &req.queries {
                    payload.put_u32(q.len() as u32);
                    payload.put_slice(q.as_bytes());
                }
            }
            OptionRequest::Abort
            | OptionRequest::List
            | OptionRequest::StartTls
            | OptionRequest::StructuredReply
            | OptionRequest::Unknown(_) => {}
        }
        let header = OptionHeader {
            option: self.code(),
            length: payload.len() as u32,
        };
        dst.put_slice(&header.encode());
        dst.put_slice(&payload);
    }
}

// ---------------------------------------------------------------------------------------------
// Option replies
// ---------------------------------------------------------------------------------------------

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
}

/// One option reply (the server may send several for one option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    Server {
        name: String,
        details: String,
    },
    Info(Info),
    MetaContext {
        id: u32,
        name: String,
    },
    /// An error reply type (bit 31 set) with a human-readable message.
    Error {
        kind: u32,
        message: String,
    },
}

/// Why an option reply could not be decoded (client side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyDecodeError {
    #[error("more bytes needed")]
    Incomplete,
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("malformed payload for reply type {0:#x}")]
    Malformed(u32),
}

impl OptionReply {
    fn kind(&self) -> u32 {
        match self {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { .. } => REP_SERVER,
            OptionReply::Info(_) => REP_INFO,
            OptionReply::MetaContext { .. } => REP_META_CONTEXT,
            OptionReply::Error { kind, .. } => *kind,
        }
    }

    /// Appends the reply to option `option`.
    pub fn encode(&self, option: u32, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u64(OPTION_REPLY_MAGIC);
        dst.put_u32(option);
        dst.put_u32(self.kind());
        dst.put_u32(0); // length, patched below
        let payload_start = dst.len();
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, details } => {
                dst.put_u32(name.len() as u32);
                dst.put_slice(name.as_bytes());
                dst.put_slice(details.as_bytes());
            }
            OptionReply::Info(info) => match info {
                Info::Export { size, flags } => {
                    dst.put_u16(INFO_EXPORT);
                    dst.put_u64(*size);
                    dst.put_u16(*flags);
                }
                Info::Name(name) => {
                    dst.put_u16(INFO_NAME);
                    dst.put_slice(name.as_bytes());
                }
                Info::Description(text) => {
                    dst.put_u16(INFO_DESCRIPTION);
                    dst.put_slice(text.as_bytes());
                }
                Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                } => {
                    dst.put_u16(INFO_BLOCK_SIZE);
                    dst.put_u32(*minimum);
                    dst.put_u32(*preferred);
                    dst.put_u32(*maximum);
                }
            },
            OptionReply::MetaContext { id, name } => {
                dst.put_u32(*id);
                dst.put_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => dst.put_slice(message.as_bytes()),
        }
        let len = (dst.len() - payload_start) as u32;
        dst[start + 16..start + 20].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one option reply; returns the option it answers, the reply and the bytes used.
    pub fn decode(buf: &[u8]) -> Result<(u32, OptionReply, usize), ReplyDecodeError> {
        if buf.len() < OPTION_REPLY_HEADER_LEN {
            return Err(ReplyDecodeError::Incomplete);
        }
        let mut head = buf;
        let magic = head.get_u64();
        if magic != OPTION_REPLY_MAGIC {
            return Err(ReplyDecodeError::BadMagic(magic));
        }
        let option = head.get_u32();
        let kind = head.get_u32();
        let len = head.get_u32() as usize;
        if head.len() < len {
            return Err(ReplyDecodeError::Incomplete);
        }
        let mut payload = &head[..len];
        let malformed = || ReplyDecodeError::Malformed(kind);
        let text = |bytes: &[u8]| {
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| ReplyDecodeError::Malformed(kind))
        };
        let reply = match kind {
            REP_ACK if len == 0 => OptionReply::Ack,
            REP_SERVER if len >= 4 => {
                let name_len = payload.get_u32() as usize;
                if name_len > payload.len() {
                    return Err(malformed());
                }
                let (name, details) = payload.split_at(name_len);
                OptionReply::Server {
                    name: text(name)?,
                    details: text(details)?,
                }
            }
            REP_INFO if len >= 2 => {
                let info = payload.get_u16();
                OptionReply::Info(match info {
                    INFO_EXPORT if payload.len() == 10 => Info::Export {
                        size: payload.get_u64(),
                        flags: payload.get_u16(),
                    },
                    INFO_NAME => Info::Name(text(payload)?),
                    INFO_DESCRIPTION => Info::Description(text(payload)?),
                    INFO_BLOCK_SIZE if payload.len() == 12 => Info::BlockSize {
                        minimum: payload.get_u32(),
                        preferred: payload.get_u32(),
                        maximum: payload.get_u32(),
                    },
                    _ => return Err(malformed()),
                })
            }
            REP_META_CONTEXT if len >= 4 => {
                let id = payload.get_u32();
                OptionReply::MetaContext {
                    id,
                    name: text(payload)?,
                }
            }
            k if k & (1 << 31) != 0 => OptionReply::Error {
                kind: k,
                message: text(payload)?,
            },
            _ => return Err(malformed()),
        };
        Ok((option, reply, OPTION_REPLY_HEADER_LEN + len))
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and the 124 zero bytes unless
/// `NO_ZEROES` was agreed.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool, dst: &mut BytesMut) {
    dst.put_u64(size);
    dst.put_u16(flags);
    if !no_zeroes {
        dst.put_bytes(0, EXPORT_NAME_PADDING);
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission requests
// ---------------------------------------------------------------------------------------------

/// A transmission request header. `kind` is kept raw so unknown commands can be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes the 28-byte header (a WRITE's payload follows it on the wire).
    pub fn decode(mut buf: &[u8]) -> Result<Request, HeaderError> {
        need(buf, REQUEST_LEN)?;
        let magic = buf.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(HeaderError::BadMagic(u64::from(magic)));
        }
        Ok(Request {
            flags: buf.get_u16(),
            kind: buf.get_u16(),
            cookie: buf.get_u64(),
            offset: buf.get_u64(),
            length: buf.get_u32(),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        let mut dst = &mut out[..];
        dst.put_u32(REQUEST_MAGIC);
        dst.put_u16(self.flags);
        dst.put_u16(self.kind);
        dst.put_u64(self.cookie);
        dst.put_u64(self.offset);
        dst.put_u32(self.length);
        out
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// Header of a simple reply (read data, if any, follows it).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    let mut dst = &mut out[..];
    dst.put_u32(SIMPLE_REPLY_MAGIC);
    dst.put_u32(error);
    dst.put_u64(cookie);
    out
}

/// Header of a structured reply chunk; `length` bytes of payload follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        let mut dst = &mut out[..];
        dst.put_u32(STRUCTURED_REPLY_MAGIC);
        dst.put_u16(self.flags);
        dst.put_u16(self.kind);
        dst.put_u64(self.cookie);
        dst.put_u32(self.length);
        out
    }
}

/// Bytes of an OFFSET_DATA chunk header including its offset field.
pub const DATA_CHUNK_PREFIX_LEN: usize = CHUNK_HEADER_LEN + 8;

/// Header + offset of an `OFFSET_DATA` chunk carrying `data_len` bytes that follow it.
pub fn encode_data_chunk_prefix(
    cookie: u64,
    done: bool,
    offset: u64,
    data_len: u32,
) -> [u8; DATA_CHUNK_PREFIX_LEN] {
    let mut out = [0u8; DATA_CHUNK_PREFIX_LEN];
    let header = ChunkHeader {
        flags: if done { REPLY_FLAG_DONE } else { 0 },
        kind: REPLY_TYPE_OFFSET_DATA,
        cookie,
        length: data_len + 8,
    };
    out[..CHUNK_HEADER_LEN].copy_from_slice(&header.encode());
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// Appends an `OFFSET_HOLE` chunk.
pub fn encode_hole_chunk(cookie: u64, done: bool, offset: u64, len: u32, dst: &mut BytesMut) {
    let header = ChunkHeader {
        flags: if done { REPLY_FLAG_DONE } else { 0 },
        kind: REPLY_TYPE_OFFSET_HOLE,
        cookie,
        length: 12,
    };
    dst.put_slice(&header.encode());
    dst.put_u64(offset);
    dst.put_u32(len);
}

/// Appends a final `NONE` chunk.
pub fn encode_none_chunk(cookie: u64, dst: &mut BytesMut) {
    let header = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_NONE,
        cookie,
        length: 0,
    };
    dst.put_slice(&header.encode());
}

/// Appends a final `ERROR` chunk with a message (truncated to fit the 16-bit length).
pub fn encode_error_chunk(cookie: u64, error: u32, message: &str, dst: &mut BytesMut) {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message[..end];
    let header = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_ERROR,
        cookie,
        length: 6 + message.len() as u32,
    };
    dst.put_slice(&header.encode());
    dst.put_u32(error);
    dst.put_u16(message.len() as u16);
    dst.put_slice(message.as_bytes());
}

/// One `base:allocation` descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub status: u32,
}

/// Appends a final `BLOCK_STATUS` chunk for context `context_id`.
pub fn encode_block_status_chunk(
    cookie: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
    dst: &mut BytesMut,
) {
    let header = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_BLOCK_STATUS,
        cookie,
        length: 4 + 8 * descriptors.len() as u32,
    };
    dst.put_slice(&header.encode());
    dst.put_u32(context_id);
    for d in descriptors {
        dst.put_u32(d.length);
        dst.put_u32(d.status);
    }
}

/// A decoded reply message (client side: tests, fuzzing). A simple reply's read data is not
/// part of the message because its length depends on the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk { header: ChunkHeader, payload: Chunk },
}

/// Payload of a structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    Data {
        offset: u64,
        data: Bytes,
    },
    Hole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        descriptors: Vec<BlockDescriptor>,
    },
    Error {
        error: u32,
        message: String,
    },
    Other(Bytes),
}

/// Why a reply could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("more bytes needed")]
    Incomplete,
    #[error("bad reply magic {0:#x}")]
    BadMagic(u32),
    #[error("malformed chunk of type {0}")]
    Malformed(u16),
}

impl Reply {
    /// Decodes one reply (simple header, or a whole structured chunk); returns it and the bytes used.
    pub fn decode(buf: &[u8]) -> Result<(Reply, usize), ReplyError> {
        if buf.len() < 4 {
            return Err(ReplyError::Incomplete);
        }
        let mut cur = buf;
        match cur.get_u32() {
            SIMPLE_REPLY_MAGIC => {
                if buf.len() < SIMPLE_REPLY_LEN {
                    return Err(ReplyError::Incomplete);
                }
                let error = cur.get_u32();
                let cookie = cur.get_u64();
                Ok((Reply::Simple { error, cookie }, SIMPLE_REPLY_LEN))
            }
            STRUCTURED_REPLY_MAGIC => {
                if buf.len() < CHUNK_HEADER_LEN {
                    return Err(ReplyError::Incomplete);
                }
                let header = ChunkHeader {
                    flags: cur.get_u16(),
                    kind: cur.get_u16(),
                    cookie: cur.get_u64(),
                    length: cur.get_u32(),
                };
                let len = header.length as usize;
                if cur.len() < len {
                    return Err(ReplyError::Incomplete);
                }
                let mut p = &cur[..len];
                let bad = || ReplyError::Malformed(header.kind);
                let payload = match header.kind {
                    REPLY_TYPE_NONE if len == 0 => Chunk::None,
                    REPLY_TYPE_OFFSET_DATA if len > 8 => Chunk::Data {
                        offset: p.get_u64(),
                        data: Bytes::copy_from_slice(p),
                    },
                    REPLY_TYPE_OFFSET_HOLE if len == 12 => Chunk::Hole {
                        offset: p.get_u64(),
                        length: p.get_u32(),
                    },
                    REPLY_TYPE_BLOCK_STATUS if len >= 12 && (len - 4).is_multiple_of(8) => {
                        let context_id = p.get_u32();
                        let descriptors = (0..(len - 4) / 8)
                            .map(|_| BlockDescriptor {
                                length: p.get_u32(),
                                status: p.get_u32(),
                            })
                            .collect();
                        Chunk::BlockStatus {
                            context_id,
                            descriptors,
                        }
                    }
                    REPLY_TYPE_ERROR if len >= 6 => {
                        let error = p.get_u32();
                        let msg_len = p.get_u16() as usize;
                        if msg_len != p.len() {
                            return Err(bad());
                        }
                        Chunk::Error {
                            error,
                            message: String::from_utf8(p.to_vec()).map_err(|_| bad())?,
                        }
                    }
                    REPLY_TYPE_NONE
                    | REPLY_TYPE_OFFSET_DATA
                    | REPLY_TYPE_OFFSET_HOLE
                    | REPLY_TYPE_BLOCK_STATUS
                    | REPLY_TYPE_ERROR => return Err(bad()),
                    _ => Chunk::Other(Bytes::copy_from_slice(p)),
                };
                Ok((Reply::Chunk { header, payload }, CHUNK_HEADER_LEN + len))
            }
            other => Err(ReplyError::BadMagic(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> + Clone {
        "[a-zA-Z0-9:/ _.-]{0,40}"
    }

    fn info() -> impl Strategy<Value = Info> {
        prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| Info::Export { size, flags }),
            name().prop_map(Info::Name),
            name().prop_map(Info::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
                Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                }
            }),
        ]
    }

    fn option_reply() -> impl Strategy<Value = OptionReply> {
        prop_oneof![
            Just(OptionReply::Ack),
            (name(), name()).prop_map(|(name, details)| OptionReply::Server { name, details }),
            info().prop_map(OptionReply::Info),
            (any::<u32>(), name()).prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
            ((1u32 << 31)..=u32::MAX, name())
                .prop_map(|(kind, message)| OptionReply::Error { kind, message }),
        ]
    }

    fn option_request() -> impl Strategy<Value = OptionRequest> {
        let info = || {
            (name(), prop::collection::vec(any::<u16>(), 0..8))
                .prop_map(|(name, requests)| InfoRequest { name, requests })
        };
        let meta = || {
            (name(), prop::collection::vec(name(), 0..5))
                .prop_map(|(name, queries)| MetaContextRequest { name, queries })
        };
        prop_oneof![
            name().prop_map(OptionRequest::ExportName),
            Just(OptionRequest::Abort),
            Just(OptionRequest::List),
            Just(OptionRequest::StartTls),
            info().prop_map(OptionRequest::Info),
            info().prop_map(OptionRequest::Go),
            Just(OptionRequest::StructuredReply),
            meta().prop_map(OptionRequest::ListMetaContext),
            meta().prop_map(OptionRequest::SetMetaContext),
            (11u32..1000).prop_map(OptionRequest::Unknown),
        ]
    }

    proptest! {
        #[test]
        fn option_request_round_trips(req in option_request()) {
            let mut buf = BytesMut::new();
            req.encode(&mut buf);
            let header = OptionHeader::decode(&buf).unwrap();
            prop_assert_eq!(header.length as usize, buf.len() - OPTION_HEADER_LEN);
            let decoded = decode_option(header.option, &buf[OPTION_HEADER_LEN..]).unwrap();
            prop_assert_eq!(decoded, req);
        }

        #[test]
        fn option_reply_round_trips(option in any::<u32>(), reply in option_reply()) {
            let mut buf = BytesMut::new();
            reply.encode(option, &mut buf);
            let (opt, decoded, used) = OptionReply::decode(&buf).unwrap();
            prop_assert_eq!(opt, option);
            prop_assert_eq!(decoded, reply);
            prop_assert_eq!(used, buf.len());
            for cut in 0..buf.len() {
                prop_assert_eq!(OptionReply::decode(&buf[..cut]), Err(ReplyDecodeError::Incomplete));
            }
        }

        #[test]
        fn request_round_trips(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
                               offset in any::<u64>(), length in any::<u32>()) {
            let req = Request { flags, kind, cookie, offset, length };
            let bytes = req.encode();
            prop_assert_eq!(Request::decode(&bytes), Ok(req));
            for cut in 0..REQUEST_LEN {
                prop_assert_eq!(Request::decode(&bytes[..cut]), Err(HeaderError::Incomplete));
            }
        }

        #[test]
        fn decoders_never_panic(option in any::<u32>(), bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = OptionHeader::decode(&bytes);
            let _ = decode_option(option, &bytes);
            for code in 1..=12 {
                let _ = decode_option(code, &bytes);
            }
            let _ = Request::decode(&bytes);
            let _ = OptionReply::decode(&bytes);
            let _ = Reply::decode(&bytes);
            let _ = decode_greeting(&bytes);
        }

        #[test]
        fn data_chunk_round_trips(cookie in any::<u64>(), done in any::<bool>(), offset in any::<u64>(),
                                  data in prop::collection::vec(any::<u8>(), 1..200)) {
            let mut buf = BytesMut::new();
            buf.put_slice(&encode_data_chunk_prefix(cookie, done, offset, data.len() as u32));
            buf.put_slice(&data);
            let (reply, used) = Reply::decode(&buf).unwrap();
            prop_assert_eq!(used, buf.len());
            let Reply::Chunk { header, payload } = reply else { panic!("not a chunk") };
            prop_assert_eq!(header.cookie, cookie);
            prop_assert_eq!(header.flags & REPLY_FLAG_DONE != 0, done);
            prop_assert_eq!(payload, Chunk::Data { offset, data: Bytes::from(data) });
        }

        #[test]
        fn hole_and_status_chunks_round_trip(cookie in any::<u64>(), offset in any::<u64>(), len in any::<u32>(),
                                             id in any::<u32>(),
                                             descs in prop::collection::vec((any::<u32>(), any::<u32>()), 1..20)) {
            let mut buf = BytesMut::new();
            encode_hole_chunk(cookie, false, offset, len, &mut buf);
            let descriptors: Vec<_> = descs.iter().map(|&(length, status)| BlockDescriptor { length, status }).collect();
            encode_block_status_chunk(cookie, id, &descriptors, &mut buf);
            let (first, used) = Reply::decode(&buf).unwrap();
            prop_assert_eq!(first, Reply::Chunk {
                header: ChunkHeader { flags: 0, kind: REPLY_TYPE_OFFSET_HOLE, cookie, length: 12 },
                payload: Chunk::Hole { offset, length: len },
            });
            let (second, used2) = Reply::decode(&buf[used..]).unwrap();
            prop_assert_eq!(used + used2, buf.len());
            let Reply::Chunk { header, payload } = second else { panic!("not a chunk") };
            prop_assert_eq!(header.flags, REPLY_FLAG_DONE);
            prop_assert_eq!(payload, Chunk::BlockStatus { context_id: id, descriptors });
        }

        #[test]
        fn error_chunk_round_trips(cookie in any::<u64>(), error in 1u32.., message in name()) {
            let mut buf = BytesMut::new();
            encode_error_chunk(cookie, error, &message, &mut buf);
            let (reply, _) = Reply::decode(&buf).unwrap();
            let Reply::Chunk { payload, .. } = reply else { panic!("not a chunk") };
            prop_assert_eq!(payload, Chunk::Error { error, message });
        }
    }

    #[test]
    fn simple_reply_decodes() {
        let bytes = encode_simple_reply(EIO, 42);
        assert_eq!(
            Reply::decode(&bytes),
            Ok((
                Reply::Simple {
                    error: EIO,
                    cookie: 42
                },
                16
            ))
        );
    }

    #[test]
    fn greeting_round_trips() {
        let bytes = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(decode_greeting(&bytes), Ok(3));
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut bytes = Request {
            flags: 0,
            kind: 0,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        bytes[0] ^= 1;
        assert!(matches!(
            Request::decode(&bytes),
            Err(HeaderError::BadMagic(_))
        ));
    }

    #[test]
    fn lengths_inside_options_are_checked_before_allocating() {
        // name length claims 4 GiB
        let payload = [0xff, 0xff, 0xff, 0xff, b'a'];
        assert_eq!(
            decode_option(OPT_GO, &payload),
            Err(InvalidOption::StringTooLong(u32::MAX as usize))
        );
        // 65535 info requests but no bytes for them
        let payload = [0, 0, 0, 0, 0xff, 0xff];
        assert_eq!(
            decode_option(OPT_GO, &payload),
            Err(InvalidOption::TooManyEntries(65535))
        );
        // meta queries count huge
        let payload = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_option(OPT_SET_META_CONTEXT, &payload),
            Err(InvalidOption::TooManyEntries(_))
        ));
        assert_eq!(
            decode_option(OPT_LIST, b"x"),
            Err(InvalidOption::UnexpectedData {
                option: OPT_LIST,
                length: 1
            })
        );
        assert_eq!(
            decode_option(OPT_EXPORT_NAME, b"a\0b"),
            Err(InvalidOption::BadString)
        );
    }
}
