//! A minimal raw NBD client over `TcpStream` for the malformed-input tests: it writes exactly the bytes a test
//! asks for (valid or not) and reads replies with a timeout on every read, so a server that hangs fails the test.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Every read on a test socket gives up after this long.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One option reply from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// Export information from NBD_OPT_GO / NBD_OPT_INFO.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// One reply in transmission: a simple reply or one structured chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// A raw NBD connection.
pub struct Wire {
    pub stream: TcpStream,
}

impl Wire {
    /// Connects with read and write timeouts set and TCP_NODELAY.
    pub fn connect(addr: SocketAddr) -> io::Result<Wire> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Wire { stream })
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn read_u16(&mut self) -> io::Result<u16> {
        let b = self.read_exact(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn read_u32(&mut self) -> io::Result<u32> {
        let b = self.read_exact(4)?;
        Ok(u32::from_be_bytes(b.try_into().unwrap()))
    }

    pub fn read_u64(&mut self) -> io::Result<u64> {
        let b = self.read_exact(8)?;
        Ok(u64::from_be_bytes(b.try_into().unwrap()))
    }

    /// Reads the server greeting (NBDMAGIC, IHAVEOPT) and returns the handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let magic = self.read_u64()?;
        if magic != NBDMAGIC {
            return Err(bad(format!("greeting magic {magic:#x}")));
        }
        let opt = self.read_u64()?;
        if opt != IHAVEOPT {
            return Err(bad(format!("greeting IHAVEOPT {opt:#x}")));
        }
        self.read_u16()
    }

    /// Greeting plus client flags (fixed newstyle, and no-zeroes when `no_zeroes`).
    pub fn handshake(&mut self, no_zeroes: bool) -> io::Result<u16> {
        let flags = self.read_greeting()?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("server does not offer fixed newstyle".into()));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.send(&cflags.to_be_bytes())?;
        Ok(flags)
    }

    /// Sends an option with the given data.
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        self.send(&option_bytes(option, data.len() as u32, data))
    }

    /// Reads one option reply.
    pub fn read_opt_reply(&mut self) -> io::Result<OptReply> {
        let magic = self.read_u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(bad(format!("option reply magic {magic:#x}")));
        }
        let option = self.read_u32()?;
        let reply_type = self.read_u32()?;
        let len = self.read_u32()?;
        if len > 1 << 20 {
            return Err(bad(format!("option reply length {len}")));
        }
        let data = self.read_exact(len as usize)?;
        Ok(OptReply {
            option,
            reply_type,
            data,
        })
    }

    /// NBD_OPT_STRUCTURED_REPLY; returns the reply type.
    pub fn structured_reply(&mut self) -> io::Result<u32> {
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        Ok(self.read_opt_reply()?.reply_type)
    }

    /// NBD_OPT_GO for `name`, asking for block sizes; returns the export info or the error reply.
    pub fn go(&mut self, name: &str) -> io::Result<Result<ExportInfo, OptReply>> {
        self.send_option(OPT_GO, &go_data(name, &[INFO_BLOCK_SIZE]))?;
        let mut info = ExportInfo::default();
        loop {
            let rep = self.read_opt_reply()?;
            if rep.option != OPT_GO {
                return Err(bad(format!(
                    "reply for option {} to NBD_OPT_GO",
                    rep.option
                )));
            }
            match rep.reply_type {
                REP_ACK => return Ok(Ok(info)),
                REP_INFO => {
                    let d = &rep.data;
                    if d.len() < 2 {
                        return Err(bad("short NBD_REP_INFO".into()));
                    }
                    match u16::from_be_bytes([d[0], d[1]]) {
                        INFO_EXPORT if d.len() == 12 => {
                            info.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                            info.flags = u16::from_be_bytes([d[10], d[11]]);
                        }
                        INFO_BLOCK_SIZE if d.len() == 14 => {
                            info.min_block = u32::from_be_bytes(d[2..6].try_into().unwrap());
                            info.preferred_block = u32::from_be_bytes(d[6..10].try_into().unwrap());
                            info.max_block = u32::from_be_bytes(d[10..14].try_into().unwrap());
                        }
                        _ => {}
                    }
                }
                t if t & 0x8000_0000 != 0 => return Ok(Err(rep)),
                t => return Err(bad(format!("unexpected reply type {t:#x} to NBD_OPT_GO"))),
            }
        }
    }

    /// Full handshake into transmission: fixed newstyle + no zeroes, optionally structured replies, then GO.
    pub fn open(addr: SocketAddr, name: &str, structured: bool) -> io::Result<(Wire, ExportInfo)> {
        let mut w = Wire::connect(addr)?;
        w.handshake(true)?;
        if structured {
            let t = w.structured_reply()?;
            if t != REP_ACK {
                return Err(bad(format!("NBD_OPT_STRUCTURED_REPLY answered {t:#x}")));
            }
        }
        match w.go(name)? {
            Ok(info) => Ok((w, info)),
            Err(rep) => Err(bad(format!("NBD_OPT_GO refused: {rep:?}"))),
        }
    }

    /// Sends a request header (and `payload` right after it, for writes).
    pub fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = request_bytes(REQUEST_MAGIC, flags, kind, cookie, offset, length);
        b.extend_from_slice(payload);
        self.send(&b)
    }

    /// Reads one reply (simple or structured chunk). For a successful simple reply to a read, the caller reads the
    /// data with `read_exact`.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        match self.read_u32()? {
            SIMPLE_REPLY_MAGIC => {
                let error = self.read_u32()?;
                let cookie = self.read_u64()?;
                Ok(Reply::Simple { error, cookie })
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.read_u16()?;
                let kind = self.read_u16()?;
                let cookie = self.read_u64()?;
                let len = self.read_u32()?;
                if len > 128 << 20 {
                    return Err(bad(format!("structured chunk length {len}")));
                }
                let payload = self.read_exact(len as usize)?;
                Ok(Reply::Chunk {
                    flags,
                    kind,
                    cookie,
                    payload,
                })
            }
            m => Err(bad(format!("reply magic {m:#x}"))),
        }
    }

    /// Reads structured chunks for one request until the DONE chunk; returns the error number of the first error
    /// chunk (0 when none) and all chunks. Fails on a simple reply.
    pub fn read_structured(&mut self) -> io::Result<(u32, Vec<Reply>)> {
        let mut chunks = Vec::new();
        let mut err = 0;
        loop {
            let r = self.read_reply()?;
            match &r {
                Reply::Simple { error, .. } => {
                    // Allowed for non-read commands with structured replies negotiated.
                    let e = *error;
                    chunks.push(r);
                    return Ok((e, chunks));
                }
                Reply::Chunk {
                    flags,
                    kind,
                    payload,
                    ..
                } => {
                    if kind & 0x8000 != 0 && err == 0 && payload.len() >= 4 {
                        err = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                    }
                    let done = flags & REPLY_FLAG_DONE != 0;
                    chunks.push(r);
                    if done {
                        return Ok((err, chunks));
                    }
                }
            }
        }
    }

    /// Writes `data` at `offset` and returns the reply's error (0 = ok). Simple replies only.
    pub fn write_simple(&mut self, cookie: u64, offset: u64, data: &[u8]) -> io::Result<u32> {
        self.send_request(0, CMD_WRITE, cookie, offset, data.len() as u32, data)?;
        match self.read_reply()? {
            Reply::Simple { error, cookie: c } if c == cookie => Ok(error),
            r => Err(bad(format!("unexpected reply {r:?}"))),
        }
    }

    /// Reads `len` bytes at `offset` without structured replies: Ok(Ok(data)) or Ok(Err(errno)).
    pub fn read_simple(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> io::Result<Result<Vec<u8>, u32>> {
        self.send_request(0, CMD_READ, cookie, offset, len, &[])?;
        match self.read_reply()? {
            Reply::Simple {
                error: 0,
                cookie: c,
            } if c == cookie => Ok(Ok(self.read_exact(len as usize)?)),
            Reply::Simple { error, cookie: c } if c == cookie => Ok(Err(error)),
            r => Err(bad(format!("unexpected reply {r:?}"))),
        }
    }

    /// Sends NBD_CMD_DISC.
    pub fn disconnect(&mut self) -> io::Result<()> {
        self.send_request(0, CMD_DISC, 0xd15c, 0, 0, &[])
    }

    /// True when the server closed the connection (EOF or reset) within the read timeout.
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Option bytes with an explicit (possibly lying) length field.
pub fn option_bytes(option: u32, length: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// NBD_OPT_GO / NBD_OPT_INFO data: name and requested info types.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// A request header with an explicit magic.
pub fn request_bytes(
    magic: u32,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
