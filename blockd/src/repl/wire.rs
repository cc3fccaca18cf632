//! The replication message codec: one [`Message`] per `common::frame` payload (the frame adds
//! the length and the CRC-32 over header and payload). Pure functions over bytes; integers are
//! big-endian; the first byte is the message tag.
//!
//! A link starts with TLS, then the shared-secret challenge-response (`common::auth`), then
//! [`Message::Hello`] both ways, then [`Message::State`] both ways (the handshake report), then
//! whatever the handshake decided (bitmap exchange, sync UUID), then the replication stream.
//!
//! Ordering: every replicated request (`Data`, `Zero`, `Flush`, `ResyncData`, `ResyncDone`) has
//! a sequence number, increasing on the stream, and `after`: the receiver applies it only once
//! every earlier request with a smaller sequence number than `after` is done (on its disk). The
//! sender sets `after` past the last request that completed before this one was issued, so a
//! peer's disk only ever goes through states the sender's disk went through, while requests
//! that were in flight together are applied concurrently. Acknowledgements cover runs of
//! sequence numbers (`RecvAck`/`WriteAck` with a count), one frame for a batch.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::meta::generation::{GenerationIds, HISTORY_LEN, MAX_NODES, Uuid};
use crate::repl::checksum::{
    BLOCK_DIGEST_LEN, BlockDigest, ChecksumPurpose, PeerAnswer, RUN_DIGEST_LEN, RunDigest,
};
use crate::repl::handshake::HandshakeSide;
use crate::repl::lost_writes::Tally;
use crate::repl::state::{DiskState, Protocol, Role};
use crate::repl::sync_decision::SideView;

/// Version of this message set, exchanged in `Hello`.
pub const PROTOCOL_VERSION: u16 = 7;
/// Largest frame accepted on a replication link (a 64 MiB write plus headers).
pub const MAX_FRAME: u32 = (64 << 20) + 4096;

/// `Data` flag: the write must be durable on the peer before it acknowledges it.
pub const FLAG_FUA: u8 = 1;

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty message")]
    Empty,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("message {tag} is truncated")]
    Truncated { tag: &'static str },
    #[error("message {tag} has {extra} trailing bytes")]
    Trailing { tag: &'static str, extra: usize },
    #[error("message {tag}: invalid {field} {value}")]
    Invalid {
        tag: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("message {tag}: text is not UTF-8")]
    Utf8 { tag: &'static str },
}

/// The handshake report of one side ([`HandshakeSide`] plus the data size and protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateReport {
    pub side: HandshakeSide,
    /// Usable data bytes of the sender.
    pub size: u64,
    /// The replication protocol the sender uses on this connection: both sides must agree (a
    /// Secondary on C would not apply what an A or B Primary already acknowledged).
    pub protocol: Protocol,
}

/// One replication message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message after authentication.
    Hello {
        version: u16,
        resource: String,
        node_id: u8,
    },
    /// The sender's handshake report.
    State(StateReport),
    /// Part of the sender's bitmap for the receiver: 64-bit words from `start_word`.
    BitmapChunk {
        start_word: u64,
        words: Vec<u64>,
    },
    /// End of the bitmap; `bits` set in total (a cross-check).
    BitmapDone {
        bits: u64,
    },
    /// Resync source to target: adopt this generation.
    SyncUuid(Uuid),
    /// A replicated write.
    Data {
        seq: u64,
        /// Apply after every earlier request with a sequence number below this one is done.
        after: u64,
        offset: u64,
        flags: u8,
        payload: Bytes,
    },
    /// A replicated zeroing: `trim` punches holes (reads back as zeroes either way).
    Zero {
        seq: u64,
        after: u64,
        offset: u64,
        len: u64,
        trim: bool,
        fua: bool,
    },
    /// Flush the peer's disk once every earlier request is done; answered by `FlushAck`.
    Flush {
        seq: u64,
    },
    /// Protocol B: the peer received writes `seq .. seq + count`.
    RecvAck {
        seq: u64,
        count: u32,
    },
    /// The peer wrote writes `seq .. seq + count` (sent under every protocol; A and B do not
    /// wait for it).
    WriteAck {
        seq: u64,
        count: u32,
    },
    /// The peer completed every earlier write and flushed.
    FlushAck {
        seq: u64,
    },
    /// Resync block(s): `zero` means the range reads as zeroes (no payload is sent).
    ResyncData {
        seq: u64,
        after: u64,
        offset: u64,
        len: u32,
        zero: bool,
        payload: Bytes,
    },
    /// The target wrote a resync range.
    ResyncAck {
        offset: u64,
        len: u32,
    },
    /// The source sent every dirty block (applied after every earlier request).
    ResyncDone {
        seq: u64,
    },
    /// The Primary started a new generation; peers in sync adopt it.
    NewUuid(Uuid),
    /// The sender's role or disk state changed.
    PeerState {
        role: Role,
        disk: DiskState,
    },
    Ping,
    PingAck,
    /// Secondary to Primary (`blockctl snapshot --consistent`): flush, then answer with
    /// `SnapshotFlushDone { id }` — sent after the `Flush` it caused.
    SnapshotFlush {
        id: u64,
    },
    /// Primary to Secondary: the flush asked for by `SnapshotFlush { id }` completed.
    SnapshotFlushDone {
        id: u64,
    },
    /// Verify or checksum resync: the sender's digest of a run, applied in stream order like
    /// `ResyncData` (see `repl::csum_resync`); answered by `ChecksumReply`.
    ChecksumRequest {
        seq: u64,
        after: u64,
        offset: u64,
        len: u32,
        /// Block size of the per-block digests of a reply.
        block_size: u32,
        purpose: ChecksumPurpose,
        digest: RunDigest,
    },
    /// The receiver's answer about a run: equal, or its per-block digests.
    ChecksumReply {
        offset: u64,
        len: u32,
        purpose: ChecksumPurpose,
        answer: PeerAnswer,
    },
    /// `blockctl invalidate-remote`: discard your data and resync it from the sender.
    Invalidate,
    /// Primary to peer: the writes of this session the sender has acknowledged to its NBD
    /// clients so far (cumulative). Sent ahead of the data still queued, so a peer learns of
    /// acknowledged writes it may never receive (see `repl::lost_writes`).
    ClientAcked(Tally),
    /// Primary to peer (DRBD's peer ack): every replicated write numbered below `below` is
    /// written on every peer it was queued to (or in the sender's bitmap for a peer whose
    /// session ended). A Secondary keeps the writes it received above the latest such figure:
    /// if the Primary is lost, those may differ on the other peers (`repl::unstable`).
    Stable {
        below: u64,
    },
    /// A Primary without a usable disk reads through the receiver (`repl::local_disk`): the
    /// receiver answers from its disk with `ReadReply { id }`, at once (not in stream order:
    /// the asker only reads ranges whose writes the receiver has confirmed). `block_size` 0
    /// asks for the data; otherwise for the per-block digests (the resync after attach).
    ReadRequest {
        id: u64,
        offset: u64,
        /// 1 ..= [`MAX_READ_REQUEST`] bytes.
        len: u32,
        block_size: u32,
    },
    /// The answer to `ReadRequest { id }`.
    ReadReply {
        id: u64,
        answer: ReadAnswer,
    },
    /// A node about to promote asks for the receiver's view (see `repl::promote`).
    ViewRequest {
        id: u64,
        /// The sender is promoting: the receiver grants it a promotion lease unless a
        /// promotion holds its lock (`repl::promotion_lock`; answered in `promoting`).
        promote: bool,
    },
    /// The answer to `ViewRequest { id }`: the sender's current generation and history
    /// (newest first), and the Primary it is connected to (itself included), if any.
    ViewReply {
        id: u64,
        current: Uuid,
        primary: Option<u8>,
        history: Vec<Uuid>,
        /// The sender has blocks marked out of sync for the asker (e.g. writes of a lost
        /// Primary that may not have reached the asker): a promotion of the asker resyncs them.
        marked: bool,
        /// The node whose promotion holds the sender's lock (the sender itself, or a peer it
        /// granted a lease): the asker's promotion is refused. `None`: the lease is granted
        /// (or none was asked for).
        promoting: Option<u8>,
    },
    /// The promotion that asked `ViewRequest { id, promote: true }` is over (committed and
    /// announced, or given up): the receiver releases the sender's lease.
    PromoteEnd {
        id: u64,
    },
}

/// Most history entries a `ViewReply` may carry.
pub const MAX_VIEW_HISTORY: usize = 64;

/// Largest byte count of one `ReadRequest`.
pub const MAX_READ_REQUEST: u32 = crate::repl::disk_failure::MAX_FORWARDED_READ;

/// What a `ReadReply` carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadAnswer {
    /// The bytes asked for.
    Data(Bytes),
    /// The per-block digests of the range.
    Digests(Vec<BlockDigest>),
    /// The read failed on the peer (an errno: EIO when its disk is not usable).
    Error(u32),
}

/// Largest run a `ChecksumRequest` may cover.
pub const MAX_CHECKSUM_RUN: u32 = 64 << 20;

mod tag {
    pub const HELLO: u8 = 1;
    pub const STATE: u8 = 2;
    pub const BITMAP_CHUNK: u8 = 3;
    pub const BITMAP_DONE: u8 = 4;
    pub const SYNC_UUID: u8 = 5;
    pub const DATA: u8 = 6;
    pub const ZERO: u8 = 7;
    pub const FLUSH: u8 = 9;
    pub const RECV_ACK: u8 = 10;
    pub const WRITE_ACK: u8 = 11;
    pub const FLUSH_ACK: u8 = 12;
    pub const RESYNC_DATA: u8 = 13;
    pub const RESYNC_ACK: u8 = 14;
    pub const RESYNC_DONE: u8 = 15;
    pub const NEW_UUID: u8 = 16;
    pub const PEER_STATE: u8 = 17;
    pub const PING: u8 = 18;
    pub const PING_ACK: u8 = 19;
    pub const SNAPSHOT_FLUSH: u8 = 40;
    pub const SNAPSHOT_FLUSH_DONE: u8 = 41;
    pub const CHECKSUM_REQUEST: u8 = 50;
    pub const CHECKSUM_REPLY: u8 = 51;
    pub const INVALIDATE: u8 = 52;
    pub const CLIENT_ACKED: u8 = 70;
    pub const STABLE: u8 = 71;
    pub const READ_REQUEST: u8 = 60;
    pub const READ_REPLY: u8 = 61;
    pub const VIEW_REQUEST: u8 = 80;
    pub const VIEW_REPLY: u8 = 81;
    pub const PROMOTE_END: u8 = 82;
}

impl Message {
    /// The message name (logs and errors).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::State(_) => "state",
            Message::BitmapChunk { .. } => "bitmap-chunk",
            Message::BitmapDone { .. } => "bitmap-done",
            Message::SyncUuid(_) => "sync-uuid",
            Message::Data { .. } => "data",
            Message::Zero { .. } => "zero",
            Message::Flush { .. } => "flush",
            Message::RecvAck { .. } => "recv-ack",
            Message::WriteAck { .. } => "write-ack",
            Message::FlushAck { .. } => "flush-ack",
            Message::ResyncData { .. } => "resync-data",
            Message::ResyncAck { .. } => "resync-ack",
            Message::ResyncDone { .. } => "resync-done",
            Message::NewUuid(_) => "new-uuid",
            Message::PeerState { .. } => "peer-state",
            Message::Ping => "ping",
            Message::PingAck => "ping-ack",
            Message::SnapshotFlush { .. } => "snapshot-flush",
            Message::SnapshotFlushDone { .. } => "snapshot-flush-done",
            Message::ChecksumRequest { .. } => "checksum-request",
            Message::ChecksumReply { .. } => "checksum-reply",
            Message::Invalidate => "invalidate",
            Message::ClientAcked(_) => "client-acked",
            Message::Stable { .. } => "stable",
            Message::ReadRequest { .. } => "read-request",
            Message::ReadReply { .. } => "read-reply",
            Message::ViewRequest { .. } => "view-request",
            Message::ViewReply { .. } => "view-reply",
            Message::PromoteEnd { .. } => "promote-end",
        }
    }

    /// Appends the encoded message (a frame payload) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let shared = self.encode_head(dst, usize::MAX);
        debug_assert!(shared.is_none());
    }

    /// Appends the message like [`Message::encode`], except that the payload of a `Data` or
    /// `ResyncData` of at least `share_min` bytes is left out and returned: the caller sends
    /// it by reference right behind what was encoded (the same bytes on the wire, one copy
    /// fewer).
    pub fn encode_head(&self, dst: &mut BytesMut, share_min: usize) -> Option<&Bytes> {
        match self {
            Message::Hello {
                version,
                resource,
                node_id,
            } => {
                dst.put_u8(tag::HELLO);
                dst.put_u16(*version);
                dst.put_u8(*node_id);
                dst.put_u16(resource.len() as u16);
                dst.put_slice(resource.as_bytes());
            }
            Message::State(r) => {
                dst.put_u8(tag::STATE);
                let v = &r.side.view;
                dst.put_u8(v.node_id);
                dst.put_u64(r.size);
                dst.put_u64(v.ids.current.0);
                for u in &v.ids.bitmap {
                    dst.put_u64(u.0);
                }
                for u in &v.ids.history {
                    dst.put_u64(u.0);
                }
                dst.put_u8(u8::from(v.crashed_primary));
                dst.put_u8(index_of(DiskState::ALL, v.disk));
                dst.put_u8(index_of(Role::ALL, v.role));
                dst.put_u64(r.side.dirty_bits);
                dst.put_u8(u8::from(r.side.discard_my_data));
                dst.put_u8(match r.side.quorum {
                    None => 0,
                    Some(false) => 1,
                    Some(true) => 2,
                });
                dst.put_u8(u8::from(r.side.follows_primary));
                dst.put_u8(u8::from(r.side.resyncing_from_other));
                dst.put_u8(u8::from(r.side.in_sync_with_primary));
                dst.put_u8(index_of(Protocol::ALL, r.protocol));
            }
            Message::BitmapChunk { start_word, words } => {
                dst.put_u8(tag::BITMAP_CHUNK);
                dst.put_u64(*start_word);
                dst.put_u32(words.len() as u32);
                for w in words {
                    dst.put_u64(*w);
                }
            }
            Message::BitmapDone { bits } => {
                dst.put_u8(tag::BITMAP_DONE);
                dst.put_u64(*bits);
            }
            Message::SyncUuid(u) => {
                dst.put_u8(tag::SYNC_UUID);
                dst.put_u64(u.0);
            }
            Message::Data {
                seq,
                after,
                offset,
                flags,
                payload,
            } => {
                encode_data_header(dst, *seq, *after, *offset, *flags);
                return payload_or_copy(dst, payload, share_min);
            }
            Message::Zero {
                seq,
                after,
                offset,
                len,
                trim,
                fua,
            } => {
                dst.put_u8(tag::ZERO);
                dst.put_u64(*seq);
                dst.put_u64(*after);
                dst.put_u64(*offset);
                dst.put_u64(*len);
                dst.put_u8(u8::from(*trim) | u8::from(*fua) << 1);
            }
            Message::Flush { seq } => put_seq(dst, tag::FLUSH, *seq),
            Message::RecvAck { seq, count } => {
                put_seq(dst, tag::RECV_ACK, *seq);
                dst.put_u32(*count);
            }
            Message::WriteAck { seq, count } => {
                put_seq(dst, tag::WRITE_ACK, *seq);
                dst.put_u32(*count);
            }
            Message::FlushAck { seq } => put_seq(dst, tag::FLUSH_ACK, *seq),
            Message::ResyncData {
                seq,
                after,
                offset,
                len,
                zero,
                payload,
            } => {
                encode_resync_header(dst, *seq, *after, *offset, *len, *zero);
                return payload_or_copy(dst, payload, share_min);
            }
            Message::ResyncAck { offset, len } => {
                dst.put_u8(tag::RESYNC_ACK);
                dst.put_u64(*offset);
                dst.put_u32(*len);
            }
            Message::ResyncDone { seq } => put_seq(dst, tag::RESYNC_DONE, *seq),
            Message::NewUuid(u) => {
                dst.put_u8(tag::NEW_UUID);
                dst.put_u64(u.0);
            }
            Message::PeerState { role, disk } => {
                dst.put_u8(tag::PEER_STATE);
                dst.put_u8(index_of(Role::ALL, *role));
                dst.put_u8(index_of(DiskState::ALL, *disk));
            }
            Message::Ping => dst.put_u8(tag::PING),
            Message::ClientAcked(t) => {
                dst.put_u8(tag::CLIENT_ACKED);
                dst.put_u64(t.writes);
                dst.put_u64(t.bytes);
            }
            Message::Stable { below } => put_seq(dst, tag::STABLE, *below),
            Message::PingAck => dst.put_u8(tag::PING_ACK),
            Message::SnapshotFlush { id } => put_seq(dst, tag::SNAPSHOT_FLUSH, *id),
            Message::SnapshotFlushDone { id } => put_seq(dst, tag::SNAPSHOT_FLUSH_DONE, *id),
            Message::ChecksumRequest {
                seq,
                after,
                offset,
                len,
                block_size,
                purpose,
                digest,
            } => {
                dst.put_u8(tag::CHECKSUM_REQUEST);
                dst.put_u64(*seq);
                dst.put_u64(*after);
                dst.put_u64(*offset);
                dst.put_u32(*len);
                dst.put_u32(*block_size);
                dst.put_u8(index_of(ChecksumPurpose::ALL, *purpose));
                dst.put_slice(digest);
            }
            Message::ChecksumReply {
                offset,
                len,
                purpose,
                answer,
            } => {
                dst.put_u8(tag::CHECKSUM_REPLY);
                dst.put_u64(*offset);
                dst.put_u32(*len);
                dst.put_u8(index_of(ChecksumPurpose::ALL, *purpose));
                match answer {
                    PeerAnswer::Equal => dst.put_u8(0),
                    PeerAnswer::Blocks(blocks) => {
                        dst.put_u8(1);
                        dst.put_u32(blocks.len() as u32);
                        for d in blocks {
                            dst.put_slice(d);
                        }
                    }
                }
            }
            Message::Invalidate => dst.put_u8(tag::INVALIDATE),
            Message::ReadRequest {
                id,
                offset,
                len,
                block_size,
            } => {
                dst.put_u8(tag::READ_REQUEST);
                dst.put_u64(*id);
                dst.put_u64(*offset);
                dst.put_u32(*len);
                dst.put_u32(*block_size);
            }
            Message::ReadReply { id, answer } => {
                dst.put_u8(tag::READ_REPLY);
                dst.put_u64(*id);
                match answer {
                    ReadAnswer::Data(payload) => {
                        dst.put_u8(0);
                        dst.put_slice(payload);
                    }
                    ReadAnswer::Digests(blocks) => {
                        dst.put_u8(1);
                        for d in blocks {
                            dst.put_slice(d);
                        }
                    }
                    ReadAnswer::Error(errno) => {
                        dst.put_u8(2);
                        dst.put_u32(*errno);
                    }
                }
            }
            Message::ViewRequest { id, promote } => {
                dst.put_u8(tag::VIEW_REQUEST);
                dst.put_u64(*id);
                dst.put_u8(u8::from(*promote));
            }
            Message::ViewReply {
                id,
                current,
                primary,
                history,
                marked,
                promoting,
            } => {
                dst.put_u8(tag::VIEW_REPLY);
                dst.put_u64(*id);
                dst.put_u64(current.0);
                put_node(dst, *primary);
                dst.put_u16(history.len() as u16);
                for h in history {
                    dst.put_u64(h.0);
                }
                dst.put_u8(u8::from(*marked));
                put_node(dst, *promoting);
            }
            Message::PromoteEnd { id } => put_seq(dst, tag::PROMOTE_END, *id),
        }
        None
    }

    /// The encoded message as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }

    /// Decodes one frame payload. Payloads of `Data`/`ResyncData` share `frame`'s memory.
    pub fn decode(frame: Bytes) -> Result<Message, WireError> {
        let mut c = Cursor {
            buf: frame,
            tag: "",
        };
        let t = c.u8().map_err(|_| WireError::Empty)?;
        let msg = match t {
            tag::HELLO => {
                c.tag = "hello";
                let version = c.u16()?;
                let node_id = c.node_id()?;
                let n = c.u16()? as usize;
                let raw = c.bytes(n)?;
                let resource = String::from_utf8(raw.to_vec())
                    .map_err(|_| WireError::Utf8 { tag: "hello" })?;
                Message::Hello {
                    version,
                    resource,
                    node_id,
                }
            }
            tag::STATE => {
                c.tag = "state";
                let node_id = c.node_id()?;
                let size = c.u64()?;
                let mut ids = GenerationIds::just_created();
                ids.current = Uuid(c.u64()?);
                for i in 0..MAX_NODES {
                    ids.bitmap[i] = Uuid(c.u64()?);
                }
                for i in 0..HISTORY_LEN {
                    ids.history[i] = Uuid(c.u64()?);
                }
                let crashed_primary = c.flag("crashed_primary")?;
                let disk = c.named(DiskState::ALL, "disk state")?;
                let role = c.named(Role::ALL, "role")?;
                let dirty_bits = c.u64()?;
                let discard_my_data = c.flag("discard_my_data")?;
                let quorum = match c.u8()? {
                    0 => None,
                    1 => Some(false),
                    2 => Some(true),
                    v => return Err(c.invalid("quorum", u64::from(v))),
                };
                let follows_primary = c.flag("follows_primary")?;
                let resyncing_from_other = c.flag("resyncing_from_other")?;
                let in_sync_with_primary = c.flag("in_sync_with_primary")?;
                let protocol = c.named(Protocol::ALL, "protocol")?;
                Message::State(StateReport {
                    side: HandshakeSide {
                        view: SideView {
                            node_id,
                            ids,
                            crashed_primary,
                            disk,
                            role,
                        },
                        dirty_bits,
                        discard_my_data,
                        quorum,
                        follows_primary,
                        resyncing_from_other,
                        in_sync_with_primary,
                    },
                    size,
                    protocol,
                })
            }
            tag::BITMAP_CHUNK => {
                c.tag = "bitmap-chunk";
                let start_word = c.u64()?;
                let n = c.u32()? as usize;
                if n.saturating_mul(8) > c.buf.remaining() {
                    return Err(WireError::Truncated { tag: c.tag });
                }
                let mut words = Vec::with_capacity(n);
                for _ in 0..n {
                    words.push(c.u64()?);
                }
                Message::BitmapChunk { start_word, words }
            }
            tag::BITMAP_DONE => {
                c.tag = "bitmap-done";
                Message::BitmapDone { bits: c.u64()? }
            }
            tag::SYNC_UUID => {
                c.tag = "sync-uuid";
                Message::SyncUuid(Uuid(c.u64()?))
            }
            tag::DATA => {
                c.tag = "data";
                let seq = c.u64()?;
                let after = c.u64()?;
                let offset = c.u64()?;
                let flags = c.u8()?;
                if flags & !FLAG_FUA != 0 {
                    return Err(c.invalid("flags", u64::from(flags)));
                }
                let payload = c.rest();
                Message::Data {
                    seq,
                    after,
                    offset,
                    flags,
                    payload,
                }
            }
            tag::ZERO => {
                c.tag = "zero";
                let seq = c.u64()?;
                let after = c.u64()?;
                let offset = c.u64()?;
                let len = c.u64()?;
                let f = c.u8()?;
                if f & !3 != 0 {
                    return Err(c.invalid("flags", u64::from(f)));
                }
                Message::Zero {
                    seq,
                    after,
                    offset,
                    len,
                    trim: f & 1 != 0,
                    fua: f & 2 != 0,
                }
            }
            tag::FLUSH => {
                c.tag = "flush";
                Message::Flush { seq: c.u64()? }
            }
            tag::RECV_ACK => {
                c.tag = "recv-ack";
                Message::RecvAck {
                    seq: c.u64()?,
                    count: c.u32()?,
                }
            }
            tag::WRITE_ACK => {
                c.tag = "write-ack";
                Message::WriteAck {
                    seq: c.u64()?,
                    count: c.u32()?,
                }
            }
            tag::FLUSH_ACK => {
                c.tag = "flush-ack";
                Message::FlushAck { seq: c.u64()? }
            }
            tag::RESYNC_DATA => {
                c.tag = "resync-data";
                let seq = c.u64()?;
                let after = c.u64()?;
                let offset = c.u64()?;
                let len = c.u32()?;
                let zero = c.flag("zero")?;
                let payload = c.rest();
                let expected = if zero { 0 } else { len as usize };
                if payload.len() != expected {
                    return Err(c.invalid("payload length", payload.len() as u64));
                }
                Message::ResyncData {
                    seq,
                    after,
                    offset,
                    len,
                    zero,
                    payload,
                }
            }
            tag::RESYNC_ACK => {
                c.tag = "resync-ack";
                Message::ResyncAck {
                    offset: c.u64()?,
                    len: c.u32()?,
                }
            }
            tag::RESYNC_DONE => {
                c.tag = "resync-done";
                Message::ResyncDone { seq: c.u64()? }
            }
            tag::NEW_UUID => {
                c.tag = "new-uuid";
                Message::NewUuid(Uuid(c.u64()?))
            }
            tag::PEER_STATE => {
                c.tag = "peer-state";
                let role = c.named(Role::ALL, "role")?;
                let disk = c.named(DiskState::ALL, "disk state")?;
                Message::PeerState { role, disk }
            }
            tag::PING => Message::Ping,
            tag::CLIENT_ACKED => {
                c.tag = "client-acked";
                let writes = c.u64()?;
                let bytes = c.u64()?;
                Message::ClientAcked(Tally { writes, bytes })
            }
            tag::STABLE => {
                c.tag = "stable";
                Message::Stable { below: c.u64()? }
            }
            tag::PING_ACK => Message::PingAck,
            tag::SNAPSHOT_FLUSH => {
                c.tag = "snapshot-flush";
                Message::SnapshotFlush { id: c.u64()? }
            }
            tag::SNAPSHOT_FLUSH_DONE => {
                c.tag = "snapshot-flush-done";
                Message::SnapshotFlushDone { id: c.u64()? }
            }
            tag::CHECKSUM_REQUEST => {
                c.tag = "checksum-request";
                let seq = c.u64()?;
                let after = c.u64()?;
                let offset = c.u64()?;
                let len = c.u32()?;
                if len == 0 || len > MAX_CHECKSUM_RUN {
                    return Err(c.invalid("length", u64::from(len)));
                }
                let block_size = c.u32()?;
                if !block_size.is_power_of_two() || !(512..=1 << 20).contains(&block_size) {
                    return Err(c.invalid("block size", u64::from(block_size)));
                }
                let purpose = c.named(ChecksumPurpose::ALL, "purpose")?;
                let mut digest = [0u8; RUN_DIGEST_LEN];
                digest.copy_from_slice(&c.bytes(RUN_DIGEST_LEN)?);
                Message::ChecksumRequest {
                    seq,
                    after,
                    offset,
                    len,
                    block_size,
                    purpose,
                    digest,
                }
            }
            tag::CHECKSUM_REPLY => {
                c.tag = "checksum-reply";
                let offset = c.u64()?;
                let len = c.u32()?;
                let purpose = c.named(ChecksumPurpose::ALL, "purpose")?;
                let answer = if c.flag("differs")? {
                    let n = c.u32()? as usize;
                    if n.saturating_mul(BLOCK_DIGEST_LEN) > c.buf.remaining() {
                        return Err(WireError::Truncated { tag: c.tag });
                    }
                    let mut blocks = Vec::with_capacity(n);
                    for _ in 0..n {
                        let mut d: BlockDigest = [0u8; BLOCK_DIGEST_LEN];
                        d.copy_from_slice(&c.bytes(BLOCK_DIGEST_LEN)?);
                        blocks.push(d);
                    }
                    PeerAnswer::Blocks(blocks)
                } else {
                    PeerAnswer::Equal
                };
                Message::ChecksumReply {
                    offset,
                    len,
                    purpose,
                    answer,
                }
            }
            tag::INVALIDATE => Message::Invalidate,
            tag::READ_REQUEST => {
                c.tag = "read-request";
                let id = c.u64()?;
                let offset = c.u64()?;
                let len = c.u32()?;
                if len == 0 || len > MAX_READ_REQUEST {
                    return Err(c.invalid("length", u64::from(len)));
                }
                let block_size = c.u32()?;
                if block_size != 0
                    && (!block_size.is_power_of_two()
                        || !(512..=MAX_READ_REQUEST).contains(&block_size))
                {
                    return Err(c.invalid("block size", u64::from(block_size)));
                }
                Message::ReadRequest {
                    id,
                    offset,
                    len,
                    block_size,
                }
            }
            tag::READ_REPLY => {
                c.tag = "read-reply";
                let id = c.u64()?;
                let answer = match c.u8()? {
                    0 => {
                        let payload = c.rest();
                        if payload.len() > MAX_READ_REQUEST as usize {
                            return Err(c.invalid("payload length", payload.len() as u64));
                        }
                        ReadAnswer::Data(payload)
                    }
                    1 => {
                        let rest = c.rest();
                        if !rest.len().is_multiple_of(BLOCK_DIGEST_LEN) {
                            return Err(c.invalid("digests length", rest.len() as u64));
                        }
                        ReadAnswer::Digests(
                            rest.chunks_exact(BLOCK_DIGEST_LEN)
                                .map(|d| {
                                    let mut b: BlockDigest = [0u8; BLOCK_DIGEST_LEN];
                                    b.copy_from_slice(d);
                                    b
                                })
                                .collect(),
                        )
                    }
                    2 => ReadAnswer::Error(c.u32()?),
                    v => return Err(c.invalid("answer kind", u64::from(v))),
                };
                Message::ReadReply { id, answer }
            }
            tag::VIEW_REQUEST => {
                c.tag = "view-request";
                Message::ViewRequest {
                    id: c.u64()?,
                    promote: c.flag("promote")?,
                }
            }
            tag::VIEW_REPLY => {
                c.tag = "view-reply";
                let id = c.u64()?;
                let current = Uuid(c.u64()?);
                let primary = c.opt_node_id("primary")?;
                let n = c.u16()? as usize;
                if n > MAX_VIEW_HISTORY {
                    return Err(c.invalid("history length", n as u64));
                }
                let mut history = Vec::with_capacity(n);
                for _ in 0..n {
                    history.push(Uuid(c.u64()?));
                }
                let marked = c.flag("marked")?;
                let promoting = c.opt_node_id("promoting")?;
                Message::ViewReply {
                    id,
                    current,
                    primary,
                    history,
                    marked,
                    promoting,
                }
            }
            tag::PROMOTE_END => {
                c.tag = "promote-end";
                Message::PromoteEnd { id: c.u64()? }
            }
            other => return Err(WireError::UnknownTag(other)),
        };
        if c.buf.has_remaining() {
            return Err(WireError::Trailing {
                tag: msg.name(),
                extra: c.buf.remaining(),
            });
        }
        Ok(msg)
    }
}

/// Bytes of a `Data` message before its payload.
pub const DATA_HEADER: usize = 26;

/// Encodes a `Data` message's header (everything before the payload) into `dst`: the write
/// path appends the payload itself, so the payload is copied once, straight into the frame.
pub fn encode_data_header(dst: &mut BytesMut, seq: u64, after: u64, offset: u64, flags: u8) {
    dst.put_u8(tag::DATA);
    dst.put_u64(seq);
    dst.put_u64(after);
    dst.put_u64(offset);
    dst.put_u8(flags);
}

/// A trailing payload: returned to be sent by reference when it has at least `share_min` bytes,
/// else copied behind the rest of the message.
fn payload_or_copy<'a>(
    dst: &mut BytesMut,
    payload: &'a Bytes,
    share_min: usize,
) -> Option<&'a Bytes> {
    if payload.len() >= share_min {
        return Some(payload);
    }
    dst.put_slice(payload);
    None
}

fn encode_resync_header(
    dst: &mut BytesMut,
    seq: u64,
    after: u64,
    offset: u64,
    len: u32,
    zero: bool,
) {
    dst.put_u8(tag::RESYNC_DATA);
    dst.put_u64(seq);
    dst.put_u64(after);
    dst.put_u64(offset);
    dst.put_u32(len);
    dst.put_u8(u8::from(zero));
}

fn put_seq(dst: &mut BytesMut, t: u8, seq: u64) {
    dst.put_u8(t);
    dst.put_u64(seq);
}

/// An optional node id: a flag byte, then the id when there is one.
fn put_node(dst: &mut BytesMut, node: Option<u8>) {
    match node {
        Some(n) => {
            dst.put_u8(1);
            dst.put_u8(n);
        }
        None => dst.put_u8(0),
    }
}

fn index_of<T: PartialEq>(all: &[T], v: T) -> u8 {
    all.iter().position(|x| *x == v).expect("variant is in ALL") as u8
}

struct Cursor {
    buf: Bytes,
    tag: &'static str,
}

impl Cursor {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.remaining() < n {
            Err(WireError::Truncated { tag: self.tag })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, WireError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    fn invalid(&self, field: &'static str, value: u64) -> WireError {
        WireError::Invalid {
            tag: self.tag,
            field,
            value,
        }
    }
    fn flag(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(field, u64::from(v))),
        }
    }
    /// A flag, then a node id when it is set.
    fn opt_node_id(&mut self, field: &'static str) -> Result<Option<u8>, WireError> {
        if self.flag(field)? {
            Ok(Some(self.node_id()?))
        } else {
            Ok(None)
        }
    }
    fn node_id(&mut self) -> Result<u8, WireError> {
        let id = self.u8()?;
        if id as usize >= MAX_NODES {
            return Err(self.invalid("node id", u64::from(id)));
        }
        Ok(id)
    }
    fn named<T: Copy>(&mut self, all: &[T], field: &'static str) -> Result<T, WireError> {
        let i = self.u8()?;
        all.get(i as usize)
            .copied()
            .ok_or_else(|| self.invalid(field, u64::from(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_ids() -> impl Strategy<Value = GenerationIds> {
        (
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), MAX_NODES),
            proptest::collection::vec(any::<u64>(), HISTORY_LEN),
        )
            .prop_map(|(c, b, h)| {
                let mut ids = GenerationIds::just_created();
                ids.current = Uuid(c);
                for (i, v) in b.into_iter().enumerate() {
                    ids.bitmap[i] = Uuid(v);
                }
                for (i, v) in h.into_iter().enumerate() {
                    ids.history[i] = Uuid(v);
                }
                ids
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..600).prop_map(Bytes::from);
        prop_oneof![
            (any::<u16>(), "[a-z0-9._-]{0,40}", 0u8..32).prop_map(
                |(version, resource, node_id)| {
                    Message::Hello {
                        version,
                        resource,
                        node_id,
                    }
                }
            ),
            (
                0u8..32,
                any::<u64>(),
                arb_ids(),
                any::<bool>(),
                0..DiskState::ALL.len(),
                0..Role::ALL.len(),
                any::<u64>(),
                any::<bool>(),
                proptest::option::of(any::<bool>()),
                (any::<bool>(), any::<bool>()),
                any::<bool>(),
                0..Protocol::ALL.len()
            )
                .prop_map(
                    |(node_id, size, ids, cp, d, r, dirty, dmd, q, (fp, rfo), isp, p)| {
                        Message::State(StateReport {
                            side: HandshakeSide {
                                view: SideView {
                                    node_id,
                                    ids,
                                    crashed_primary: cp,
                                    disk: DiskState::ALL[d],
                                    role: Role::ALL[r],
                                },
                                dirty_bits: dirty,
                                discard_my_data: dmd,
                                quorum: q,
                                follows_primary: fp,
                                resyncing_from_other: rfo,
                                in_sync_with_primary: isp,
                            },
                            size,
                            protocol: Protocol::ALL[p],
                        })
                    },
                ),
            (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..50))
                .prop_map(|(start_word, words)| Message::BitmapChunk { start_word, words }),
            any::<u64>().prop_map(|bits| Message::BitmapDone { bits }),
            any::<u64>().prop_map(|u| Message::SyncUuid(Uuid(u))),
            (any::<u64>(), any::<u64>(), any::<u64>(), 0u8..2, bytes()).prop_map(
                |(seq, after, offset, flags, payload)| Message::Data {
                    seq,
                    after,
                    offset,
                    flags,
                    payload
                }
            ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(seq, after, offset, len, trim, fua)| Message::Zero {
                    seq,
                    after,
                    offset,
                    len,
                    trim,
                    fua
                }),
            any::<u64>().prop_map(|seq| Message::Flush { seq }),
            (any::<u64>(), any::<u32>()).prop_map(|(seq, count)| Message::RecvAck { seq, count }),
            (any::<u64>(), any::<u32>()).prop_map(|(seq, count)| Message::WriteAck { seq, count }),
            any::<u64>().prop_map(|seq| Message::FlushAck { seq }),
            (any::<u64>(), bytes()).prop_map(|(offset, payload)| Message::ResyncData {
                seq: offset ^ 0x55,
                after: offset / 3,
                offset,
                len: payload.len() as u32,
                zero: false,
                payload
            }),
            (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Message::ResyncData {
                seq: offset.rotate_left(7),
                after: 0,
                offset,
                len,
                zero: true,
                payload: Bytes::new()
            }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(offset, len)| Message::ResyncAck { offset, len }),
            any::<u64>().prop_map(|seq| Message::ResyncDone { seq }),
            any::<u64>().prop_map(|u| Message::NewUuid(Uuid(u))),
            (0..Role::ALL.len(), 0..DiskState::ALL.len()).prop_map(|(r, d)| {
                Message::PeerState {
                    role: Role::ALL[r],
                    disk: DiskState::ALL[d],
                }
            }),
            Just(Message::Ping),
            Just(Message::PingAck),
            any::<u64>().prop_map(|id| Message::SnapshotFlush { id }),
            any::<u64>().prop_map(|id| Message::SnapshotFlushDone { id }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                1u32..=MAX_CHECKSUM_RUN,
                9u32..=20,
                0..ChecksumPurpose::ALL.len(),
                any::<[u8; RUN_DIGEST_LEN]>()
            )
                .prop_map(|(seq, after, offset, len, bs, p, digest)| {
                    Message::ChecksumRequest {
                        seq,
                        after,
                        offset,
                        len,
                        block_size: 1 << bs,
                        purpose: ChecksumPurpose::ALL[p],
                        digest,
                    }
                }),
            (
                any::<u64>(),
                any::<u32>(),
                0..ChecksumPurpose::ALL.len(),
                proptest::option::of(proptest::collection::vec(
                    any::<[u8; BLOCK_DIGEST_LEN]>(),
                    0..40
                ))
            )
                .prop_map(|(offset, len, p, blocks)| Message::ChecksumReply {
                    offset,
                    len,
                    purpose: ChecksumPurpose::ALL[p],
                    answer: blocks.map_or(PeerAnswer::Equal, PeerAnswer::Blocks),
                }),
            Just(Message::Invalidate),
            (any::<u64>(), any::<u64>())
                .prop_map(|(writes, bytes)| Message::ClientAcked(Tally { writes, bytes })),
            any::<u64>().prop_map(|below| Message::Stable { below }),
            (
                any::<u64>(),
                any::<u64>(),
                1u32..=MAX_READ_REQUEST,
                prop_oneof![Just(0u32), (9u32..=20).prop_map(|b| 1 << b)]
            )
                .prop_map(|(id, offset, len, block_size)| Message::ReadRequest {
                    id,
                    offset,
                    len,
                    block_size,
                }),
            (any::<u64>(), bytes()).prop_map(|(id, payload)| Message::ReadReply {
                id,
                answer: ReadAnswer::Data(payload),
            }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<[u8; BLOCK_DIGEST_LEN]>(), 0..40)
            )
                .prop_map(|(id, blocks)| Message::ReadReply {
                    id,
                    answer: ReadAnswer::Digests(blocks),
                }),
            (any::<u64>(), any::<u32>()).prop_map(|(id, errno)| Message::ReadReply {
                id,
                answer: ReadAnswer::Error(errno),
            }),
            (any::<u64>(), any::<bool>())
                .prop_map(|(id, promote)| Message::ViewRequest { id, promote }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::option::of(0u8..crate::meta::generation::MAX_NODES as u8),
                proptest::collection::vec(any::<u64>(), 0..=MAX_VIEW_HISTORY),
                any::<bool>(),
                proptest::option::of(0u8..crate::meta::generation::MAX_NODES as u8)
            )
                .prop_map(|(id, current, primary, history, marked, promoting)| {
                    Message::ViewReply {
                        id,
                        current: Uuid(current),
                        primary,
                        history: history.into_iter().map(Uuid).collect(),
                        marked,
                        promoting,
                    }
                }),
            any::<u64>().prop_map(|id| Message::PromoteEnd { id }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msg in arb_message()) {
            let bytes = msg.to_bytes();
            prop_assert_eq!(Message::decode(bytes.clone()), Ok(msg.clone()));
            // Every strict prefix is refused, never accepted as something else or a panic
            // (except where the tail is a free-length payload).
            for cut in 0..bytes.len() {
                let r = Message::decode(bytes.slice(..cut));
                if let Ok(m) = r {
                    prop_assert!(matches!(m, Message::Data { .. } | Message::Hello { .. } | Message::ReadReply { .. }), "{:?}", m);
                }
            }
        }

        #[test]
        fn a_head_and_its_shared_payload_are_the_whole_encoding(msg in arb_message(), share_min in 0usize..64) {
            let mut head = BytesMut::new();
            if let Some(payload) = msg.encode_head(&mut head, share_min) {
                prop_assert!(payload.len() >= share_min);
                head.extend_from_slice(payload);
            }
            prop_assert_eq!(head.freeze(), msg.to_bytes());
        }

        #[test]
        fn garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Message::decode(Bytes::from(raw));
        }
    }

    #[test]
    fn data_header_matches_the_message_encoding() {
        let payload = Bytes::from_static(b"some bytes");
        let mut a = BytesMut::new();
        encode_data_header(&mut a, 7, 3, 4096, FLAG_FUA);
        assert_eq!(a.len(), DATA_HEADER);
        a.extend_from_slice(&payload);
        let msg = Message::Data {
            seq: 7,
            after: 3,
            offset: 4096,
            flags: FLAG_FUA,
            payload,
        };
        assert_eq!(a.freeze(), msg.to_bytes());
    }

    #[test]
    fn malformed_read_requests_are_refused() {
        let request = |len: u32, block_size: u32| {
            let mut b = BytesMut::new();
            b.put_u8(tag::READ_REQUEST);
            b.put_u64(1);
            b.put_u64(0);
            b.put_u32(len);
            b.put_u32(block_size);
            Message::decode(b.freeze())
        };
        assert!(request(4096, 0).is_ok());
        assert!(request(4096, 4096).is_ok());
        for (len, bs, field) in [
            (0, 0, "length"),
            (MAX_READ_REQUEST + 1, 0, "length"),
            (4096, 3000, "block size"),
            (4096, 256, "block size"),
        ] {
            assert!(
                matches!(request(len, bs), Err(WireError::Invalid { field: f, .. }) if f == field),
                "{len} {bs}"
            );
        }
        let mut b = BytesMut::new();
        b.put_u8(tag::READ_REPLY);
        b.put_u64(1);
        b.put_u8(1);
        b.put_slice(&[0; BLOCK_DIGEST_LEN + 1]);
        assert!(matches!(
            Message::decode(b.freeze()),
            Err(WireError::Invalid {
                field: "digests length",
                ..
            })
        ));
        let mut b = BytesMut::new();
        b.put_u8(tag::READ_REPLY);
        b.put_u64(1);
        b.put_u8(7);
        assert!(matches!(
            Message::decode(b.freeze()),
            Err(WireError::Invalid {
                field: "answer kind",
                ..
            })
        ));
    }

    #[test]
    fn malformed_messages_are_named() {
        assert_eq!(Message::decode(Bytes::new()), Err(WireError::Empty));
        assert_eq!(
            Message::decode(Bytes::from_static(&[200])),
            Err(WireError::UnknownTag(200))
        );
        assert_eq!(
            Message::decode(Bytes::from_static(&[tag::PING, 0])),
            Err(WireError::Trailing {
                tag: "ping",
                extra: 1
            })
        );
        let mut b = BytesMut::new();
        Message::ResyncData {
            seq: 1,
            after: 0,
            offset: 0,
            len: 8,
            zero: false,
            payload: Bytes::from_static(&[1; 8]),
        }
        .encode(&mut b);
        b.truncate(b.len() - 1);
        assert!(matches!(
            Message::decode(b.freeze()),
            Err(WireError::Invalid {
                field: "payload length",
                ..
            })
        ));
        assert!(matches!(
            Message::decode(Bytes::from_static(&[tag::PEER_STATE, 9, 0])),
            Err(WireError::Invalid { field: "role", .. })
        ));
        let request = |len: u32, block_size: u32| {
            Message::ChecksumRequest {
                seq: 1,
                after: 0,
                offset: 0,
                len,
                block_size,
                purpose: ChecksumPurpose::Verify,
                digest: [0; RUN_DIGEST_LEN],
            }
            .to_bytes()
        };
        assert!(matches!(
            Message::decode(request(0, 4096)),
            Err(WireError::Invalid {
                field: "length",
                ..
            })
        ));
        assert!(matches!(
            Message::decode(request(4096, 3000)),
            Err(WireError::Invalid {
                field: "block size",
                ..
            })
        ));
        // A reply announcing more digests than it carries is truncated, not a huge allocation.
        let mut b = BytesMut::new();
        b.put_u8(tag::CHECKSUM_REPLY);
        b.put_u64(0);
        b.put_u32(4096);
        b.put_u8(0);
        b.put_u8(1);
        b.put_u32(u32::MAX);
        assert!(matches!(
            Message::decode(b.freeze()),
            Err(WireError::Truncated {
                tag: "checksum-reply"
            })
        ));
    }
}
