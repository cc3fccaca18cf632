//! Fuzzes option haggling: arbitrary bytes parsed as a sequence of option requests and fed
//! through the negotiation state machine, plus the option-reply decoder.
#![no_main]

use blockd::nbd::export::ExportInfo;
use blockd::nbd::handshake::{Negotiation, Payload, TlsMode};
use blockd::nbd::proto::{self, OptionHeader, OptionReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = OptionReply::decode(data);
    let export = ExportInfo {
        name: "blockd".into(),
        description: Some("fuzz".into()),
        size: 1 << 30,
        read_only: false,
        trim: true,
    };
    let mode = match data.first().map(|b| b % 3) {
        Some(0) => TlsMode::Off,
        Some(1) => TlsMode::Optional,
        _ => TlsMode::Required,
    };
    let mut negotiation = Negotiation::new(&export, mode);
    let mut rest = data.get(1..).unwrap_or_default();
    while let Ok(header) = OptionHeader::decode(rest) {
        rest = &rest[proto::OPTION_HEADER_LEN..];
        let len = header.length as usize;
        let payload = if header.length > proto::MAX_OPTION_LEN {
            Payload::TooBig(header.length)
        } else if len <= rest.len() {
            let (p, r) = rest.split_at(len);
            rest = r;
            Payload::Data(p)
        } else {
            break;
        };
        let _ = proto::decode_option(
            header.option,
            match payload {
                Payload::Data(p) => p,
                Payload::TooBig(_) => &[],
            },
        );
        let _ = negotiation.handle(header.option, payload);
    }
});
