//! Fuzzes the transmission request decoder and request validation.
#![no_main]

use blockd::nbd::handshake::Session;
use blockd::nbd::proto::{REQUEST_LEN, Reply, Request};
use blockd::nbd::transmission::{errno, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Reply::decode(data);
    let structured = data.first().is_some_and(|b| b & 1 != 0);
    let session = Session {
        structured,
        base_allocation: structured.then_some(1),
        flags: 0,
    };
    let read_only = data.first().is_some_and(|b| b & 2 != 0);
    let mut rest = data;
    while let Ok(request) = Request::decode(rest) {
        if let Err(e) = validate(&request, &session, 1 << 30, read_only, 64 << 20) {
            assert_ne!(errno(&e), 0);
        }
        rest = &rest[REQUEST_LEN..];
        let skip = (request.payload_len() as usize).min(rest.len());
        rest = &rest[skip..];
    }
});
