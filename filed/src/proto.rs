//! The sync protocol's messages as a pure codec: one message per transport frame, a tag byte then
//! the fields. Decoding checks every tag and length and never panics on hostile input.
//!
//! A session, after the transport's opening (C = initiator, S = listener):
//!
//! 1. C→S `Hello`; S→C `HelloOk` (or `Error`).
//! 2. C→S `Entry` for every path dirty for S on C (its state, its agreed state, force mark), `End`.
//! 3. S→C `Decision` per path (from C's point of view, with S's state and the transfer), each
//!    `Delta` push followed by S's `Signature`; `End`. Ordered: renames, deletions (children
//!    first), creations and updates (parents first), directory metadata (children first).
//! 4. C→S data of every push in decision order (`FileStart` `Data`*, or `DeltaChunk`*, then
//!    `FileEnd`) and a `Signature` for every delta pull; `End`.
//! 5. S→C `Outcome` per push, then data of every pull in order; `End`.
//! 6. C→S `Outcome` per pull; `End`. Both sides record agreed states.
//!
//! No round trip per file: each step is one stream of messages. For `filed compare` the initiator
//! sends `List` instead of entries and the listener answers with an `Entry` per path, then `End`.

use crate::codec::{
    DecodeError, Reader, put_bytes, put_opt_str, put_str, put_u8, put_u32, put_u64,
};
use crate::entry::FileState;

pub const PROTOCOL_VERSION: u32 = 1;
/// File data per `Data` message.
pub const DATA_CHUNK: usize = 1 << 20;

/// A decision as carried on the wire (from the initiator's point of view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDecision {
    InSync,
    Push,
    Pull,
    Conflict,
    Hold,
}

/// How a push or pull is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireTransfer {
    None,
    Full,
    Delta,
    Meta,
    MetaOnly,
    Delete,
    Rename { from: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        version: u32,
        group: String,
        from: String,
    },
    HelloOk {
        name: String,
    },
    Error {
        message: String,
    },
    Entry {
        path: String,
        state: Option<FileState>,
        base: Option<FileState>,
        force: u8,
    },
    Decision {
        path: String,
        decision: WireDecision,
        transfer: WireTransfer,
        remote: Option<FileState>,
        winner: Option<FileState>,
    },
    Signature {
        path: String,
        bytes: Vec<u8>,
    },
    FileStart {
        path: String,
        len: u64,
    },
    Data {
        bytes: Vec<u8>,
    },
    DeltaChunk {
        bytes: Vec<u8>,
    },
    FileEnd {
        hash: [u8; 32],
    },
    Outcome {
        path: String,
        error: Option<String>,
    },
    End,
    /// Instead of entries: ask for the listener's whole (freshly scanned) file list (`filed compare`).
    List,
}

fn put_opt_state(b: &mut Vec<u8>, s: &Option<FileState>) {
    match s {
        None => put_u8(b, 0),
        Some(s) => {
            put_u8(b, 1);
            s.encode(b);
        }
    }
}

fn opt_state(r: &mut Reader<'_>) -> Result<Option<FileState>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(FileState::decode(r)?)),
        v => Err(DecodeError::Invalid {
            what: "state tag",
            value: v.into(),
        }),
    }
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        match self {
            Message::Hello {
                version,
                group,
                from,
            } => {
                put_u8(&mut b, 1);
                put_u32(&mut b, *version);
                put_str(&mut b, group);
                put_str(&mut b, from);
            }
            Message::HelloOk { name } => {
                put_u8(&mut b, 2);
                put_str(&mut b, name);
            }
            Message::Error { message } => {
                put_u8(&mut b, 3);
                put_str(&mut b, message);
            }
            Message::Entry {
                path,
                state,
                base,
                force,
            } => {
                put_u8(&mut b, 4);
                put_str(&mut b, path);
                put_opt_state(&mut b, state);
                put_opt_state(&mut b, base);
                put_u8(&mut b, *force);
            }
            Message::Decision {
                path,
                decision,
                transfer,
                remote,
                winner,
            } => {
                put_u8(&mut b, 5);
                put_str(&mut b, path);
                put_u8(
                    &mut b,
                    match decision {
                        WireDecision::InSync => 0,
                        WireDecision::Push => 1,
                        WireDecision::Pull => 2,
                        WireDecision::Conflict => 3,
                        WireDecision::Hold => 4,
                    },
                );
                let (code, from) = match transfer {
                    WireTransfer::None => (0, None),
                    WireTransfer::Full => (1, None),
                    WireTransfer::Delta => (2, None),
                    WireTransfer::Meta => (3, None),
                    WireTransfer::MetaOnly => (4, None),
                    WireTransfer::Delete => (5, None),
                    WireTransfer::Rename { from } => (6, Some(from.as_str())),
                };
                put_u8(&mut b, code);
                put_opt_str(&mut b, from);
                put_opt_state(&mut b, remote);
                put_opt_state(&mut b, winner);
            }
            Message::Signature { path, bytes } => {
                put_u8(&mut b, 6);
                put_str(&mut b, path);
                put_bytes(&mut b, bytes);
            }
            Message::FileStart { path, len } => {
                put_u8(&mut b, 7);
                put_str(&mut b, path);
                put_u64(&mut b, *len);
            }
            Message::Data { bytes } => {
                put_u8(&mut b, 8);
                put_bytes(&mut b, bytes);
            }
            Message::DeltaChunk { bytes } => {
                put_u8(&mut b, 9);
                put_bytes(&mut b, bytes);
            }
            Message::FileEnd { hash } => {
                put_u8(&mut b, 10);
                b.extend_from_slice(hash);
            }
            Message::Outcome { path, error } => {
                put_u8(&mut b, 11);
                put_str(&mut b, path);
                put_opt_str(&mut b, error.as_deref());
            }
            Message::End => put_u8(&mut b, 12),
            Message::List => put_u8(&mut b, 13),
        }
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader::new(buf);
        let m = match r.u8()? {
            1 => Message::Hello {
                version: r.u32()?,
                group: r.string("group")?,
                from: r.string("host")?,
            },
            2 => Message::HelloOk {
                name: r.string("host")?,
            },
            3 => Message::Error {
                message: r.string("error")?,
            },
            4 => Message::Entry {
                path: r.string("path")?,
                state: opt_state(&mut r)?,
                base: opt_state(&mut r)?,
                force: r.u8()?,
            },
            5 => {
                let path = r.string("path")?;
                let decision = match r.u8()? {
                    0 => WireDecision::InSync,
                    1 => WireDecision::Push,
                    2 => WireDecision::Pull,
                    3 => WireDecision::Conflict,
                    4 => WireDecision::Hold,
                    v => {
                        return Err(DecodeError::Invalid {
                            what: "decision",
                            value: v.into(),
                        });
                    }
                };
                let code = r.u8()?;
                let from = r.opt_string("rename source")?;
                let transfer = match (code, from) {
                    (0, None) => WireTransfer::None,
                    (1, None) => WireTransfer::Full,
                    (2, None) => WireTransfer::Delta,
                    (3, None) => WireTransfer::Meta,
                    (4, None) => WireTransfer::MetaOnly,
                    (5, None) => WireTransfer::Delete,
                    (6, Some(from)) => WireTransfer::Rename { from },
                    (v, _) => {
                        return Err(DecodeError::Invalid {
                            what: "transfer",
                            value: v.into(),
                        });
                    }
                };
                Message::Decision {
                    path,
                    decision,
                    transfer,
                    remote: opt_state(&mut r)?,
                    winner: opt_state(&mut r)?,
                }
            }
            6 => Message::Signature {
                path: r.string("path")?,
                bytes: r.bytes()?.to_vec(),
            },
            7 => Message::FileStart {
                path: r.string("path")?,
                len: r.u64()?,
            },
            8 => Message::Data {
                bytes: r.bytes()?.to_vec(),
            },
            9 => Message::DeltaChunk {
                bytes: r.bytes()?.to_vec(),
            },
            10 => Message::FileEnd { hash: r.array32()? },
            11 => Message::Outcome {
                path: r.string("path")?,
                error: r.opt_string("error")?,
            },
            12 => Message::End,
            13 => Message::List,
            v => {
                return Err(DecodeError::Invalid {
                    what: "message tag",
                    value: v.into(),
                });
            }
        };
        r.finish()?;
        Ok(m)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::HelloOk { .. } => "HelloOk",
            Message::Error { .. } => "Error",
            Message::Entry { .. } => "Entry",
            Message::Decision { .. } => "Decision",
            Message::Signature { .. } => "Signature",
            Message::FileStart { .. } => "FileStart",
            Message::Data { .. } => "Data",
            Message::DeltaChunk { .. } => "DeltaChunk",
            Message::FileEnd { .. } => "FileEnd",
            Message::Outcome { .. } => "Outcome",
            Message::End => "End",
            Message::List => "List",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::tests::arb_state;
    use proptest::prelude::*;

    fn arb_transfer() -> impl Strategy<Value = WireTransfer> {
        prop_oneof![
            Just(WireTransfer::None),
            Just(WireTransfer::Full),
            Just(WireTransfer::Delta),
            Just(WireTransfer::Meta),
            Just(WireTransfer::MetaOnly),
            Just(WireTransfer::Delete),
            "[a-z/%]{0,12}".prop_map(|from| WireTransfer::Rename { from }),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let s = "[a-z/%.]{0,16}";
        let st = || proptest::option::of(arb_state());
        let bytes = proptest::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            (any::<u32>(), s, s).prop_map(|(version, group, from)| Message::Hello {
                version,
                group,
                from
            }),
            s.prop_map(|name| Message::HelloOk { name }),
            s.prop_map(|message| Message::Error { message }),
            (s, st(), st(), any::<u8>()).prop_map(|(path, state, base, force)| Message::Entry {
                path,
                state,
                base,
                force
            }),
            (s, 0u8..5, arb_transfer(), st(), st()).prop_map(
                |(path, d, transfer, remote, winner)| Message::Decision {
                    path,
                    decision: [
                        WireDecision::InSync,
                        WireDecision::Push,
                        WireDecision::Pull,
                        WireDecision::Conflict,
                        WireDecision::Hold
                    ][d as usize],
                    transfer,
                    remote,
                    winner
                }
            ),
            (s, bytes.clone()).prop_map(|(path, bytes)| Message::Signature { path, bytes }),
            (s, any::<u64>()).prop_map(|(path, len)| Message::FileStart { path, len }),
            bytes.clone().prop_map(|bytes| Message::Data { bytes }),
            bytes.prop_map(|bytes| Message::DeltaChunk { bytes }),
            any::<[u8; 32]>().prop_map(|hash| Message::FileEnd { hash }),
            (s, proptest::option::of(s)).prop_map(|(path, error)| Message::Outcome { path, error }),
            Just(Message::End),
            Just(Message::List),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(m in arb_message()) {
            prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn decode_is_fuzz_safe(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&b);
        }

        #[test]
        fn truncation_is_an_error(m in arb_message(), cut in 0usize..100) {
            let e = m.encode();
            if cut < e.len() {
                prop_assert!(Message::decode(&e[..cut]).is_err());
            }
        }
    }
}
