//! Fixed-newstyle option negotiation: a pure state machine ([`Negotiation`]) deciding the reply
//! to each option, and the async driver ([`negotiate`]) that moves bytes, upgrades to TLS and
//! enforces the handshake deadline.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::nbd::export::{ExportInfo, MAX_PAYLOAD, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE};
use crate::nbd::proto::{
    self, BASE_ALLOCATION, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES, HeaderError, INFO_DESCRIPTION, INFO_NAME, Info, MAX_OPTION_LEN,
    OPTION_HEADER_LEN, OptionHeader, OptionReply, OptionRequest, REP_ERR_INVALID, REP_ERR_POLICY,
    REP_ERR_TLS_REQD, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
};
use crate::nbd::tls::{MaybeTls, TlsSettings};

/// Metadata context ID blockd assigns to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Default deadline for the whole handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the server treats TLS on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS configured: `STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    Off,
    /// TLS offered; the client may upgrade.
    Optional,
    /// TLS required (FORCEDTLS): other options get `NBD_REP_ERR_TLS_REQD` until upgraded.
    Required,
}

/// What the transmission phase needs to know from the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// ID of the selected `base:allocation` context, if any.
    pub base_allocation: Option<u32>,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// Option payload as the driver could read it.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    Data(&'a [u8]),
    /// Longer than [`MAX_OPTION_LEN`]: discarded unread.
    TooBig(u32),
}

/// The decision for one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these replies and keep negotiating.
    Reply(Vec<OptionReply>),
    /// Acknowledge, then run the TLS handshake and negotiate again over TLS.
    StartTls,
    /// Acknowledge and close.
    Abort,
    /// `NBD_OPT_GO` succeeded: send the replies (ending in ACK) and enter transmission.
    Go {
        replies: Vec<OptionReply>,
        session: Session,
    },
    /// `NBD_OPT_EXPORT_NAME` succeeded: send size, flags (and padding), enter transmission.
    ExportName { size: u64, session: Session },
    /// Close without a reply (an `NBD_OPT_EXPORT_NAME` that cannot be satisfied).
    Disconnect(&'static str),
}

/// Negotiation state of one connection.
#[derive(Debug, Clone)]
pub struct Negotiation<'a> {
    export: &'a ExportInfo,
    tls: TlsMode,
    tls_active: bool,
    structured: bool,
    base_allocation: bool,
}

fn error(kind: u32, message: impl Into<String>) -> Step {
    Step::Reply(vec![OptionReply::Error {
        kind,
        message: message.into(),
    }])
}

impl<'a> Negotiation<'a> {
    pub fn new(export: &'a ExportInfo, tls: TlsMode) -> Self {
        Negotiation {
            export,
            tls,
            tls_active: false,
            structured: false,
            base_allocation: false,
        }
    }

    /// TLS is up: forget everything negotiated in plain text.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.base_allocation = false;
    }

    fn session(&self) -> Session {
        Session {
            structured: self.structured,
            base_allocation: (self.structured && self.base_allocation)
                .then_some(BASE_ALLOCATION_ID),
            flags: self.export.transmission_flags(self.structured),
        }
    }

    /// Decides the reply to option `option` whose payload is `payload`.
    pub fn handle(&mut self, option: u32, payload: Payload<'_>) -> Step {
        let tls_missing = self.tls == TlsMode::Required && !self.tls_active;
        if tls_missing && option != proto::OPT_STARTTLS && option != proto::OPT_ABORT {
            if option == proto::OPT_EXPORT_NAME {
                return Step::Disconnect("NBD_OPT_EXPORT_NAME before the required TLS upgrade");
            }
            return error(
                REP_ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS first",
            );
        }
        let data = match payload {
            Payload::Data(data) => data,
            Payload::TooBig(len) => {
                if option == proto::OPT_EXPORT_NAME {
                    return Step::Disconnect("oversized NBD_OPT_EXPORT_NAME");
                }
                return error(
                    REP_ERR_TOO_BIG,
                    format!("option data of {len} bytes exceeds {MAX_OPTION_LEN}"),
                );
            }
        };
        let request = match proto::decode_option(option, data) {
            Ok(request) => request,
            Err(_) if option == proto::OPT_EXPORT_NAME => {
                return Step::Disconnect("malformed NBD_OPT_EXPORT_NAME");
            }
            Err(e) => return error(REP_ERR_INVALID, e.to_string()),
        };
        match request {
            OptionRequest::ExportName(name) => {
                if self.export.matches(&name) {
                    Step::ExportName {
                        size: self.export.size,
                        session: self.session(),
                    }
                } else {
                    Step::Disconnect("NBD_OPT_EXPORT_NAME for an unknown export")
                }
            }
            OptionRequest::Abort => Step::Abort,
            OptionRequest::List => Step::Reply(vec![
                OptionReply::Server {
                    name: self.export.name.clone(),
                    details: self.export.description.clone().unwrap_or_default(),
                },
                OptionReply::Ack,
            ]),
            OptionRequest::StartTls => match (self.tls, self.tls_active) {
                (TlsMode::Off, _) => error(REP_ERR_POLICY, "TLS is not configured on this server"),
                (_, true) => error(REP_ERR_INVALID, "TLS is already active"),
                _ => Step::StartTls,
            },
            OptionRequest::Info(req) | OptionRequest::Go(req) => {
                if !self.export.matches(&req.name) {
                    return error(REP_ERR_UNKNOWN, format!("no export named {:?}", req.name));
                }
                let mut replies = vec![OptionReply::Info(Info::Export {
                    size: self.export.size,
                    flags: self.export.transmission_flags(self.structured),
                })];
                if req.requests.contains(&INFO_NAME) {
                    replies.push(OptionReply::Info(Info::Name(self.export.name.clone())));
                }
                if let Some(text) = &self.export.description
                    && req.requests.contains(&INFO_DESCRIPTION)
                {
                    replies.push(OptionReply::Info(Info::Description(text.clone())));
                }
                // Minimum 1 constrains no client, so it is sent whether asked for or not.
                replies.push(OptionReply::Info(Info::BlockSize {
                    minimum: MIN_BLOCK_SIZE,
                    preferred: PREFERRED_BLOCK_SIZE,
                    maximum: MAX_PAYLOAD,
                }));
                replies.push(OptionReply::Ack);
                if option == proto::OPT_GO {
                    Step::Go {
                        replies,
                        session: self.session(),
                    }
                } else {
                    Step::Reply(replies)
                }
            }
            OptionRequest::StructuredReply => {
                self.structured = true;
                Step::Reply(vec![OptionReply::Ack])
            }
            OptionRequest::ListMetaContext(req) | OptionRequest::SetMetaContext(req) => {
                let set = option == proto::OPT_SET_META_CONTEXT;
                if !self.structured {
                    return error(REP_ERR_INVALID, "negotiate structured replies first");
                }
                if !self.export.matches(&req.name) {
                    return error(REP_ERR_UNKNOWN, format!("no export named {:?}", req.name));
                }
                let selected = if set {
                    req.queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == BASE_ALLOCATION || q == "base:")
                };
                let mut replies = Vec::with_capacity(2);
                if selected {
                    replies.push(OptionReply::MetaContext {
                        id: if set { BASE_ALLOCATION_ID } else { 0 },
                        name: BASE_ALLOCATION.to_string(),
                    });
                }
                replies.push(OptionReply::Ack);
                if set {
                    self.base_allocation = selected;
                }
                Step::Reply(replies)
            }
            OptionRequest::Unknown(code) => {
                error(REP_ERR_UNSUP, format!("option {code} is not supported"))
            }
        }
    }
}

/// Why a handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("sending the greeting failed")]
    Greeting(#[source] io::Error),
    #[error("reading the client flags failed")]
    ClientFlags(#[source] io::Error),
    #[error("client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("client does not speak fixed newstyle, which TLS requires")]
    NotFixedNewstyle,
    #[error("reading an option failed")]
    ReadOption(#[source] io::Error),
    #[error("option header has a bad magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("writing an option reply failed")]
    WriteReply(#[source] io::Error),
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("handshake not finished within {0:?}")]
    TimedOut(Duration),
    #[error("closing the connection: {0}")]
    Rejected(&'static str),
}

/// Handshake parameters of a server.
#[derive(Clone)]
pub struct HandshakeConfig {
    pub export: ExportInfo,
    pub tls: Option<TlsSettings>,
    pub timeout: Duration,
}

impl HandshakeConfig {
    fn tls_mode(&self) -> TlsMode {
        match &self.tls {
            None => TlsMode::Off,
            Some(t) if t.required => TlsMode::Required,
            Some(_) => TlsMode::Optional,
        }
    }
}

/// How a handshake ended.
pub enum Negotiated<S> {
    /// Transmission phase begins on `stream`.
    Transmission {
        stream: MaybeTls<S>,
        session: Session,
    },
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

/// Runs the whole handshake on `stream` within `config.timeout`.
pub async fn negotiate<S>(
    stream: S,
    config: &HandshakeConfig,
) -> Result<Negotiated<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(config.timeout, negotiate_inner(stream, config)).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::TimedOut(config.timeout)),
    }
}

async fn negotiate_inner<S>(
    stream: S,
    config: &HandshakeConfig,
) -> Result<Negotiated<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = MaybeTls::Plain(stream);
    stream
        .write_all(&proto::encode_greeting(
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        ))
        .await
        .map_err(HandshakeError::Greeting)?;
    let mut flags = [0u8; 4];
    stream
        .read_exact(&mut flags)
        .await
        .map_err(HandshakeError::ClientFlags)?;
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut tls_mode = config.tls_mode();
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        if tls_mode == TlsMode::Required {
            return Err(HandshakeError::NotFixedNewstyle);
        }
        tls_mode = TlsMode::Off;
    }

    let mut negotiation = Negotiation::new(&config.export, tls_mode);
    let mut payload = Vec::new();
    let mut out = BytesMut::with_capacity(512);
    loop {
        let mut head = [0u8; OPTION_HEADER_LEN];
        stream
            .read_exact(&mut head)
            .await
            .map_err(HandshakeError::ReadOption)?;
        let header = match OptionHeader::decode(&head) {
            Ok(h) => h,
            Err(HeaderError::BadMagic(m)) => return Err(HandshakeError::BadOptionMagic(m)),
            Err(HeaderError::Incomplete) => unreachable!("header buffer has the full length"),
        };
        let step = if header.length > MAX_OPTION_DISCARD {
            // Skipping gigabytes would let one client pin a task for the whole handshake timeout:
            // refuse the option without reading its data, then hang up (the spec allows a hard
            // disconnect for denial-of-service protection).
            if let Step::Reply(replies) =
                negotiation.handle(header.option, Payload::TooBig(header.length))
            {
                out.clear();
                for r in &replies {
                    r.encode(header.option, &mut out);
                }
                let _ = send(&mut stream, &out).await;
            }
            let _ = stream.shutdown().await;
            return Err(HandshakeError::Rejected("option data too long to skip"));
        } else if header.length > MAX_OPTION_LEN {
            discard(&mut stream, u64::from(header.length)).await?;
            negotiation.handle(header.option, Payload::TooBig(header.length))
        } else {
            payload.resize(header.length as usize, 0);
            stream
                .read_exact(&mut payload)
                .await
                .map_err(HandshakeError::ReadOption)?;
            negotiation.handle(header.option, Payload::Data(&payload))
        };
        tracing::debug!(option = header.option, len = header.length, ?step, "option");

        out.clear();
        match step {
            Step::Reply(replies) => {
                for r in &replies {
                    r.encode(header.option, &mut out);
                }
                send(&mut stream, &out).await?;
            }
            Step::Abort => {
                OptionReply::Ack.encode(header.option, &mut out);
                // The client may already be gone; that is fine.
                let _ = send(&mut stream, &out).await;
                let _ = stream.shutdown().await;
                return Ok(Negotiated::Aborted);
            }
            Step::StartTls => {
                OptionReply::Ack.encode(header.option, &mut out);
                send(&mut stream, &out).await?;
                let (MaybeTls::Plain(plain), Some(tls)) = (stream, config.tls.as_ref()) else {
                    unreachable!("STARTTLS is only accepted on a plain stream with TLS configured");
                };
                let upgraded = tls
                    .acceptor
                    .accept(plain)
                    .await
                    .map_err(HandshakeError::Tls)?;
                stream = MaybeTls::Tls(Box::new(upgraded));
                negotiation.tls_started();
            }
            Step::Go { replies, session } => {
                for r in &replies {
                    r.encode(header.option, &mut out);
                }
                send(&mut stream, &out).await?;
                return Ok(Negotiated::Transmission { stream, session });
            }
            Step::ExportName { size, session } => {
                proto::encode_export_name_reply(size, session.flags, no_zeroes, &mut out);
                send(&mut stream, &out).await?;
                return Ok(Negotiated::Transmission { stream, session });
            }
            Step::Disconnect(why) => return Err(HandshakeError::Rejected(why)),
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), HandshakeError> {
    stream
        .write_all(bytes)
        .await
        .map_err(HandshakeError::WriteReply)?;
    stream.flush().await.map_err(HandshakeError::WriteReply)
}

/// Longest option payload that is read and skipped to keep the session in sync; longer ones
/// are refused and the connection closed.
const MAX_OPTION_DISCARD: u32 = 1024 * 1024;

/// Reads and drops `len` bytes without buffering them.
async fn discard<S: AsyncRead + Unpin>(stream: &mut S, len: u64) -> Result<(), HandshakeError> {
    let copied = tokio::io::copy(&mut (&mut *stream).take(len), &mut tokio::io::sink())
        .await
        .map_err(HandshakeError::ReadOption)?;
    if copied < len {
        return Err(HandshakeError::ReadOption(
            io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nbd::proto::*;
    use tokio::io::DuplexStream;

    pub(crate) fn export() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: Some("test disk".into()),
            size: 1 << 20,
            read_only: false,
            trim: true,
        }
    }

    fn option(code: u32, req: &OptionRequest) -> Vec<u8> {
        let mut b = BytesMut::new();
        req.encode(&mut b);
        assert_eq!(u32::from_be_bytes(b[8..12].try_into().unwrap()), code);
        b[OPTION_HEADER_LEN..].to_vec()
    }

    fn go(name: &str) -> OptionRequest {
        OptionRequest::Go(InfoRequest {
            name: name.into(),
            requests: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
        })
    }

    fn meta(queries: &[&str]) -> MetaContextRequest {
        MetaContextRequest {
            name: "disk".into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        }
    }

    fn err_kind(step: &Step) -> u32 {
        match step {
            Step::Reply(r) => match &r[..] {
                [OptionReply::Error { kind, .. }] => *kind,
                other => panic!("not an error: {other:?}"),
            },
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[test]
    fn go_reports_export_and_block_size() {
        let e = export();
        let mut n = Negotiation::new(&e, TlsMode::Off);
        let step = n.handle(OPT_GO, Payload::Data(&option(OPT_GO, &go("disk"))));
        let Step::Go { replies, session } = step else {
            panic!("{step:?}")
        };
        assert_eq!(
            replies,
            vec![
                OptionReply::Info(Info::Export {
                    size: 1 << 20,
                    flags: e.transmission_flags(false)
                }),
                OptionReply::Info(Info::Name("disk".into())),
                OptionReply::Info(Info::Description("test disk".into())),
                OptionReply::Info(Info::BlockSize {
                    minimum: 1,
                    preferred: 4096,
                    maximum: 64 << 20
                }),
                OptionReply::Ack,
            ]
        );
        assert!(!session.structured);
        assert_eq!(session.base_allocation, None);
    }

    #[test]
    fn unknown_export_and_option_are_errors() {
        let e = export();
        let mut n = Negotiation::new(&e, TlsMode::Off);
        let step = n.handle(
            OPT_INFO,
            Payload::Data(&option(OPT_INFO, &{
                let OptionRequest::Go(r) = go("nope") else {
                    unreachable!()
                };
                OptionRequest::Info(r)
            })),
        );
        assert_eq!(err_kind(&step), REP_ERR_UNKNOWN);
        assert_eq!(
            err_kind(&n.handle(99, Payload::Data(b"xyz"))),
            REP_ERR_UNSUP
        );
        assert_eq!(
            err_kind(&n.handle(OPT_LIST, Payload::Data(b"x"))),
            REP_ERR_INVALID
        );
        assert_eq!(
            err_kind(&n.handle(OPT_GO, Payload::TooBig(1 << 20))),
            REP_ERR_TOO_BIG
        );
        assert_eq!(
            err_kind(&n.handle(OPT_STARTTLS, Payload::Data(&[]))),
            REP_ERR_POLICY
        );
        assert!(matches!(
            n.handle(OPT_EXPORT_NAME, Payload::Data(b"nope")),
            Step::Disconnect(_)
        ));
        assert!(matches!(
            n.handle(OPT_EXPORT_NAME, Payload::Data(b"")),
            Step::ExportName { size: 1048576, .. }
        ));
    }

    #[test]
    fn meta_contexts_need_structured_replies() {
        let e = export();
        let mut n = Negotiation::new(&e, TlsMode::Off);
        let set = option(
            OPT_SET_META_CONTEXT,
            &OptionRequest::SetMetaContext(meta(&[BASE_ALLOCATION])),
        );
        assert_eq!(
            err_kind(&n.handle(OPT_SET_META_CONTEXT, Payload::Data(&set))),
            REP_ERR_INVALID
        );
        assert_eq!(
            n.handle(OPT_STRUCTURED_REPLY, Payload::Data(&[])),
            Step::Reply(vec![OptionReply::Ack])
        );
        let list = option(
            OPT_LIST_META_CONTEXT,
            &OptionRequest::ListMetaContext(meta(&["base:"])),
        );
        assert_eq!(
            n.handle(OPT_LIST_META_CONTEXT, Payload::Data(&list)),
            Step::Reply(vec![
                OptionReply::MetaContext {
                    id: 0,
                    name: BASE_ALLOCATION.into()
                },
                OptionReply::Ack
            ])
        );
        let other = option(
            OPT_LIST_META_CONTEXT,
            &OptionRequest::ListMetaContext(meta(&["qemu:dirty-bitmap:x"])),
        );
        assert_eq!(
            n.handle(OPT_LIST_META_CONTEXT, Payload::Data(&other)),
            Step::Reply(vec![OptionReply::Ack])
        );
        assert_eq!(
            n.handle(OPT_SET_META_CONTEXT, Payload::Data(&set)),
            Step::Reply(vec![
                OptionReply::MetaContext {
                    id: BASE_ALLOCATION_ID,
                    name: BASE_ALLOCATION.into()
                },
                OptionReply::Ack
            ])
        );
        let Step::Go { session, .. } = n.handle(OPT_GO, Payload::Data(&option(OPT_GO, &go(""))))
        else {
            panic!()
        };
        assert!(session.structured);
        assert_eq!(session.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_ne!(session.flags & FLAG_SEND_DF, 0);
        // Setting an empty list deselects.
        let none = option(
            OPT_SET_META_CONTEXT,
            &OptionRequest::SetMetaContext(meta(&[])),
        );
        assert_eq!(
            n.handle(OPT_SET_META_CONTEXT, Payload::Data(&none)),
            Step::Reply(vec![OptionReply::Ack])
        );
        assert_eq!(n.session().base_allocation, None);
    }

    #[test]
    fn tls_required_refuses_everything_but_starttls_and_abort() {
        let e = export();
        let mut n = Negotiation::new(&e, TlsMode::Required);
        assert_eq!(
            err_kind(&n.handle(OPT_LIST, Payload::Data(&[]))),
            REP_ERR_TLS_REQD
        );
        assert_eq!(
            err_kind(&n.handle(OPT_GO, Payload::Data(&option(OPT_GO, &go("disk"))))),
            REP_ERR_TLS_REQD
        );
        assert_eq!(
            err_kind(&n.handle(77, Payload::Data(&[]))),
            REP_ERR_TLS_REQD
        );
        assert!(matches!(
            n.handle(OPT_EXPORT_NAME, Payload::Data(b"disk")),
            Step::Disconnect(_)
        ));
        assert_eq!(
            n.handle(OPT_STRUCTURED_REPLY, Payload::Data(&[])),
            Step::Reply(vec![OptionReply::Error {
                kind: REP_ERR_TLS_REQD,
                message: "TLS is required: send NBD_OPT_STARTTLS first".into()
            }])
        );
        assert_eq!(n.handle(OPT_STARTTLS, Payload::Data(&[])), Step::StartTls);
        n.tls_started();
        assert_eq!(
            err_kind(&n.handle(OPT_STARTTLS, Payload::Data(&[]))),
            REP_ERR_INVALID
        );
        assert!(matches!(
            n.handle(OPT_GO, Payload::Data(&option(OPT_GO, &go("disk")))),
            Step::Go { .. }
        ));
        let mut n = Negotiation::new(&e, TlsMode::Required);
        assert_eq!(n.handle(OPT_ABORT, Payload::Data(&[])), Step::Abort);
    }

    #[test]
    fn starttls_resets_negotiated_state() {
        let e = export();
        let mut n = Negotiation::new(&e, TlsMode::Optional);
        n.handle(OPT_STRUCTURED_REPLY, Payload::Data(&[]));
        assert!(n.session().structured);
        assert_eq!(n.handle(OPT_STARTTLS, Payload::Data(&[])), Step::StartTls);
        n.tls_started();
        assert!(!n.session().structured);
    }

    // ----- driver tests over an in-memory duplex -----

    pub(crate) fn config(timeout: Duration) -> HandshakeConfig {
        HandshakeConfig {
            export: export(),
            tls: None,
            timeout,
        }
    }

    pub(crate) async fn read_reply(c: &mut DuplexStream) -> (u32, OptionReply) {
        let mut head = [0u8; OPTION_REPLY_HEADER_LEN];
        c.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut all = head.to_vec();
        all.resize(OPTION_REPLY_HEADER_LEN + len, 0);
        c.read_exact(&mut all[OPTION_REPLY_HEADER_LEN..])
            .await
            .unwrap();
        let (opt, reply, used) = OptionReply::decode(&all).unwrap();
        assert_eq!(used, all.len());
        (opt, reply)
    }

    pub(crate) async fn client_start(c: &mut DuplexStream, flags: u32) {
        let mut greet = [0u8; SERVER_GREETING_LEN];
        c.read_exact(&mut greet).await.unwrap();
        assert_eq!(
            decode_greeting(&greet),
            Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        );
        c.write_all(&flags.to_be_bytes()).await.unwrap();
    }

    pub(crate) async fn send_option(c: &mut DuplexStream, req: &OptionRequest) {
        let mut b = BytesMut::new();
        req.encode(&mut b);
        c.write_all(&b).await.unwrap();
    }

    #[tokio::test]
    async fn full_negotiation_over_duplex() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let cfg = config(Duration::from_secs(5));
        let server = tokio::spawn(async move { negotiate(server, &cfg).await });
        client_start(&mut client, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        send_option(&mut client, &OptionRequest::List).await;
        assert_eq!(
            read_reply(&mut client).await,
            (
                OPT_LIST,
                OptionReply::Server {
                    name: "disk".into(),
                    details: "test disk".into()
                }
            )
        );
        assert_eq!(read_reply(&mut client).await, (OPT_LIST, OptionReply::Ack));
        // An unknown option with data is skipped and refused.
        client
            .write_all(
                &OptionHeader {
                    option: 1234,
                    length: 3,
                }
                .encode(),
            )
            .await
            .unwrap();
        client.write_all(b"abc").await.unwrap();
        let (_, r) = read_reply(&mut client).await;
        assert!(matches!(
            r,
            OptionReply::Error {
                kind: REP_ERR_UNSUP,
                ..
            }
        ));
        // An oversized option is discarded and refused; the connection stays in sync.
        client
            .write_all(
                &OptionHeader {
                    option: OPT_LIST,
                    length: MAX_OPTION_LEN + 10,
                }
                .encode(),
            )
            .await
            .unwrap();
        client
            .write_all(&vec![0u8; MAX_OPTION_LEN as usize + 10])
            .await
            .unwrap();
        let (_, r) = read_reply(&mut client).await;
        assert!(matches!(
            r,
            OptionReply::Error {
                kind: REP_ERR_TOO_BIG,
                ..
            }
        ));
        send_option(&mut client, &OptionRequest::StructuredReply).await;
        assert_eq!(read_reply(&mut client).await.1, OptionReply::Ack);
        send_option(&mut client, &go("disk")).await;
        loop {
            let (_, r) = read_reply(&mut client).await;
            if r == OptionReply::Ack {
                break;
            }
        }
        match server.await.unwrap().unwrap() {
            Negotiated::Transmission { session, stream } => {
                assert!(session.structured);
                assert!(!stream.is_tls());
            }
            Negotiated::Aborted => panic!("aborted"),
        }
    }

    #[tokio::test]
    async fn export_name_sends_padding_unless_no_zeroes() {
        for (flags, expect) in [
            (FLAG_C_FIXED_NEWSTYLE, 10 + 124),
            (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
        ] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let cfg = config(Duration::from_secs(5));
            let server = tokio::spawn(async move { negotiate(server, &cfg).await.map(|_| ()) });
            client_start(&mut client, flags).await;
            send_option(&mut client, &OptionRequest::ExportName("disk".into())).await;
            server.await.unwrap().unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest.len(), expect);
            assert_eq!(u64::from_be_bytes(rest[..8].try_into().unwrap()), 1 << 20);
        }
    }

    #[tokio::test]
    async fn truncated_and_bad_handshakes_end_the_connection() {
        // Client closes in the middle of an option header.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let cfg = config(Duration::from_secs(5));
        let task = tokio::spawn(async move { negotiate(server, &cfg).await.map(|_| ()) });
        client_start(&mut client, FLAG_C_FIXED_NEWSTYLE).await;
        client
            .write_all(&IHAVEOPT.to_be_bytes()[..5])
            .await
            .unwrap();
        drop(client);
        assert!(matches!(
            task.await.unwrap(),
            Err(HandshakeError::ReadOption(_))
        ));

        // Unknown client flags.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let cfg = config(Duration::from_secs(5));
        let task = tokio::spawn(async move { negotiate(server, &cfg).await.map(|_| ()) });
        client_start(&mut client, 0x80).await;
        assert!(matches!(
            task.await.unwrap(),
            Err(HandshakeError::UnknownClientFlags(0x80))
        ));

        // Bad option magic.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let cfg = config(Duration::from_secs(5));
        let task = tokio::spawn(async move { negotiate(server, &cfg).await.map(|_| ()) });
        client_start(&mut client, FLAG_C_FIXED_NEWSTYLE).await;
        client.write_all(&[0u8; 16]).await.unwrap();
        assert!(matches!(
            task.await.unwrap(),
            Err(HandshakeError::BadOptionMagic(0))
        ));
    }

    #[tokio::test]
    async fn stalled_client_times_out() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let cfg = config(Duration::from_millis(200));
        let task = tokio::spawn(async move { negotiate(server, &cfg).await.map(|_| ()) });
        client_start(&mut client, FLAG_C_FIXED_NEWSTYLE).await;
        // Send half an option and stall.
        client.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
        assert!(matches!(
            task.await.unwrap(),
            Err(HandshakeError::TimedOut(_))
        ));
        drop(client);
    }

    #[tokio::test]
    async fn abort_is_acknowledged() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let cfg = config(Duration::from_secs(5));
        let task = tokio::spawn(async move { negotiate(server, &cfg).await });
        client_start(&mut client, FLAG_C_FIXED_NEWSTYLE).await;
        send_option(&mut client, &OptionRequest::Abort).await;
        assert_eq!(read_reply(&mut client).await, (OPT_ABORT, OptionReply::Ack));
        assert!(matches!(task.await.unwrap(), Ok(Negotiated::Aborted)));
    }

    /// Writes a CA and a server certificate for "localhost" in the GnuTLS directory layout.
    pub(crate) fn tls_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let ca = common::tls::generate_ca("test ca").unwrap();
        let server = common::tls::issue_cert(&ca, &["localhost".to_string()]).unwrap();
        server
            .write(
                &dir.path().join("server-cert.pem"),
                &dir.path().join("server-key.pem"),
            )
            .unwrap();
        std::fs::write(dir.path().join("client-ca.pem"), &ca.cert_pem).unwrap();
        dir
    }

    #[tokio::test]
    async fn starttls_upgrades_and_renegotiates() {
        let dir = tls_dir();
        let mut cfg = config(Duration::from_secs(5));
        cfg.tls = Some(TlsSettings::from_dir(dir.path(), true).unwrap());
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move {
            match negotiate(server, &cfg).await {
                Ok(Negotiated::Transmission { stream, session }) => Ok((stream.is_tls(), session)),
                Ok(Negotiated::Aborted) => panic!("aborted"),
                Err(e) => Err(e),
            }
        });
        client_start(&mut client, FLAG_C_FIXED_NEWSTYLE).await;
        send_option(&mut client, &go("disk")).await;
        let (_, r) = read_reply(&mut client).await;
        assert!(matches!(
            r,
            OptionReply::Error {
                kind: REP_ERR_TLS_REQD,
                ..
            }
        ));
        send_option(&mut client, &OptionRequest::StartTls).await;
        assert_eq!(
            read_reply(&mut client).await,
            (OPT_STARTTLS, OptionReply::Ack)
        );

        let client_config =
            common::tls::client_config(&dir.path().join("client-ca.pem"), None).unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let mut tls = connector
            .connect(common::tls::server_name("localhost").unwrap(), client)
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        OptionRequest::StartTls.encode(&mut buf);
        OptionRequest::StructuredReply.encode(&mut buf);
        go("disk").encode(&mut buf);
        tls.write_all(&buf).await.unwrap();
        tls.flush().await.unwrap();
        let mut replies = Vec::new();
        let mut pending = Vec::new();
        while !matches!(replies.last(), Some((OPT_GO, OptionReply::Ack))) {
            let mut chunk = [0u8; 4096];
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "server closed the TLS stream");
            pending.extend_from_slice(&chunk[..n]);
            while let Ok((opt, reply, used)) = OptionReply::decode(&pending) {
                replies.push((opt, reply));
                pending.drain(..used);
            }
        }
        assert!(matches!(
            replies[0],
            (
                OPT_STARTTLS,
                OptionReply::Error {
                    kind: REP_ERR_INVALID,
                    ..
                }
            )
        ));
        assert_eq!(replies[1], (OPT_STRUCTURED_REPLY, OptionReply::Ack));
        let (is_tls, session) = task.await.unwrap().unwrap();
        assert!(is_tls);
        assert!(session.structured);
    }

    #[tokio::test]
    async fn failed_tls_handshake_closes_the_connection() {
        let dir = tls_dir();
        let mut cfg = config(Duration::from_secs(5));
        cfg.tls = Some(TlsSettings::from_dir(dir.path(), false).unwrap());
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { negotiate(server, &cfg).await.map(|_| ()) });
        client_start(&mut client, FLAG_C_FIXED_NEWSTYLE).await;
        send_option(&mut client, &OptionRequest::StartTls).await;
        assert_eq!(
            read_reply(&mut client).await,
            (OPT_STARTTLS, OptionReply::Ack)
        );
        client
            .write_all(b"this is not a TLS client hello")
            .await
            .unwrap();
        assert!(matches!(task.await.unwrap(), Err(HandshakeError::Tls(_))));
    }
}
