//! Malformed and hostile input over a raw TcpStream: truncated handshakes at each stage, wrong magics, unknown
//! and oversize options, bad requests (past the end, oversize, unknown type). Each test then checks that the
//! server still serves a fresh client. Every socket read has a timeout, so a hanging server fails the test.

use std::net::Shutdown;

use integration_tests::nbd_wire::*;
use integration_tests::{Blockd, BlockdOptions};

const MIB: u64 = 1 << 20;

/// A fresh client can negotiate, write, read back and disconnect.
fn assert_serves_fresh_client(server: &Blockd) {
    for structured in [false, true] {
        let (mut w, info) =
            Wire::open(server.addr(), &server.export, structured).expect("fresh client handshake");
        assert_eq!(info.size, server.size);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
        assert_eq!(
            w.write_simple(1, 4096 * 3 + 1, &data)
                .expect("fresh client write"),
            0
        );
        if structured {
            w.send_request(0, CMD_READ, 2, 4096 * 3 + 1, 4096, &[])
                .unwrap();
            let (err, chunks) = w.read_structured().expect("fresh client structured read");
            assert_eq!(err, 0, "{chunks:?}");
            let got = reassemble(&chunks, 4096 * 3 + 1, 4096);
            assert!(
                got == data,
                "fresh client read back different data (structured)"
            );
        } else {
            let got = w
                .read_simple(2, 4096 * 3 + 1, 4096)
                .expect("fresh client read")
                .expect("read ok");
            assert!(got == data, "fresh client read back different data");
        }
        w.disconnect().unwrap();
        assert!(
            w.closed_by_server(),
            "server did not close after NBD_CMD_DISC"
        );
    }
}

/// Assembles the data of a structured read from its OFFSET_DATA / OFFSET_HOLE chunks.
fn reassemble(chunks: &[Reply], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xEEu8; len];
    let mut covered = 0usize;
    for c in chunks {
        if let Reply::Chunk { kind, payload, .. } = c {
            match *kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = u64::from_be_bytes(payload[0..8].try_into().unwrap()) - offset;
                    let d = &payload[8..];
                    out[at as usize..at as usize + d.len()].copy_from_slice(d);
                    covered += d.len();
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let at = u64::from_be_bytes(payload[0..8].try_into().unwrap()) - offset;
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                    out[at as usize..at as usize + n].fill(0);
                    covered += n;
                }
                REPLY_TYPE_NONE => {}
                k => panic!("unexpected chunk type {k:#x} in a read reply: {c:?}"),
            }
        }
    }
    assert_eq!(
        covered, len,
        "read chunks do not cover the request: {chunks:?}"
    );
    out
}

/// Either an option error reply or a closed connection, within the read timeout (never silence).
fn expect_opt_error_or_close(w: &mut Wire, what: &str) -> Option<OptReply> {
    match w.read_opt_reply() {
        Ok(rep) => {
            assert!(
                rep.reply_type & 0x8000_0000 != 0,
                "{what}: expected an error reply, got {rep:?}"
            );
            Some(rep)
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "{what}: server neither answered nor closed within {READ_TIMEOUT:?}: {e}"
            );
            None
        }
    }
}

/// Expects a simple-reply error `want` (any of them) for cookie, on a connection without structured replies.
fn expect_simple_error(w: &mut Wire, cookie: u64, want: &[u32], what: &str) {
    match w
        .read_reply()
        .unwrap_or_else(|e| panic!("{what}: no reply: {e}"))
    {
        Reply::Simple { error, cookie: c } => {
            assert_eq!(c, cookie, "{what}: wrong cookie");
            assert!(
                want.contains(&error),
                "{what}: error {error}, expected one of {want:?}"
            );
        }
        r => panic!("{what}: expected a simple reply, got {r:?}"),
    }
}

fn big_server() -> Blockd {
    Blockd::start_with(BlockdOptions {
        size: Some(256 * MIB),
        ..Default::default()
    })
}

#[test]
fn truncated_handshakes_at_every_stage() {
    let server = Blockd::start();
    let addr = server.addr();
    let mut stalled = Vec::new();

    // 1. Connect and close at once; connect and close after reading half the greeting.
    drop(Wire::connect(addr).unwrap());
    let mut w = Wire::connect(addr).unwrap();
    w.read_exact(9).unwrap();
    drop(w);
    // 2. Two of the four client-flag bytes, then close / then stall.
    for keep in [false, true] {
        let mut w = Wire::connect(addr).unwrap();
        w.read_greeting().unwrap();
        w.send(&[0, 0]).unwrap();
        if keep {
            stalled.push(w);
        }
    }
    // 3. Half an option header.
    for keep in [false, true] {
        let mut w = Wire::connect(addr).unwrap();
        w.handshake(true).unwrap();
        w.send(&IHAVEOPT.to_be_bytes()).unwrap();
        w.send(&OPT_GO.to_be_bytes()[..2]).unwrap();
        if keep {
            stalled.push(w);
        }
    }
    // 4. An option whose data is shorter than its length field.
    for keep in [false, true] {
        let mut w = Wire::connect(addr).unwrap();
        w.handshake(true).unwrap();
        let data = go_data(&server.export, &[]);
        w.send(&option_bytes(OPT_GO, data.len() as u32 + 50, &data))
            .unwrap();
        if keep {
            stalled.push(w);
        }
    }
    // 5. Half a request header in transmission.
    for keep in [false, true] {
        let (mut w, _) = Wire::open(addr, &server.export, true).unwrap();
        w.send(&request_bytes(REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[..13])
            .unwrap();
        if keep {
            stalled.push(w);
        }
    }
    // 6. A write whose payload is cut short.
    for keep in [false, true] {
        let (mut w, _) = Wire::open(addr, &server.export, false).unwrap();
        let mut b = request_bytes(REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 65536);
        b.extend_from_slice(&[0xAB; 1000]);
        w.send(&b).unwrap();
        if keep {
            stalled.push(w);
        }
    }
    // 7. A client that half-closes right after the greeting.
    let mut w = Wire::connect(addr).unwrap();
    w.read_greeting().unwrap();
    w.stream.shutdown(Shutdown::Write).unwrap();
    assert!(
        w.closed_by_server(),
        "server kept a half-closed handshake open"
    );

    // All those stalled clients do not block a fresh one.
    assert_serves_fresh_client(&server);
    // The data written by the truncated write (if any) did not corrupt the store beyond its range.
    drop(stalled);
    assert_serves_fresh_client(&server);
    server.stop();
}

#[test]
fn wrong_magic_and_unknown_client_flags_close_the_connection() {
    let server = Blockd::start();
    let addr = server.addr();

    // Wrong option magic.
    let mut w = Wire::connect(addr).unwrap();
    w.handshake(true).unwrap();
    let mut b = option_bytes(OPT_LIST, 0, &[]);
    b[0] ^= 0xFF;
    w.send(&b).unwrap();
    assert!(
        w.closed_by_server(),
        "server did not close after a wrong option magic"
    );

    // Unknown client flags (bit 5).
    let mut w = Wire::connect(addr).unwrap();
    w.read_greeting().unwrap();
    w.send(&(FLAG_C_FIXED_NEWSTYLE | 0x20).to_be_bytes())
        .unwrap();
    w.send(&option_bytes(OPT_LIST, 0, &[])).ok();
    assert!(
        w.closed_by_server(),
        "server did not close after unknown client flags"
    );

    // Garbage instead of a handshake.
    let mut w = Wire::connect(addr).unwrap();
    w.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(w.closed_by_server(), "server did not close after garbage");

    // A request with a bad magic in transmission.
    let (mut w, _) = Wire::open(addr, &server.export, false).unwrap();
    w.send(&request_bytes(0x1234_5678, 0, CMD_READ, 1, 0, 512))
        .unwrap();
    assert!(
        w.closed_by_server(),
        "server did not close after a request with a bad magic"
    );
    let (mut w, _) = Wire::open(addr, &server.export, true).unwrap();
    w.send(&request_bytes(SIMPLE_REPLY_MAGIC, 0, CMD_READ, 1, 0, 512))
        .unwrap();
    assert!(
        w.closed_by_server(),
        "server did not close after a request with a reply magic"
    );

    assert_serves_fresh_client(&server);
    server.stop();
}

#[test]
fn unknown_options_get_err_unsup_and_the_session_continues() {
    let server = Blockd::start();
    let mut w = Wire::connect(server.addr()).unwrap();
    w.handshake(true).unwrap();
    for (opt, data) in [
        (999u32, &b"hello"[..]),
        (4, &[][..]),
        (0x7fff_ffff, &[0u8; 300][..]),
    ] {
        w.send_option(opt, data).unwrap();
        let rep = w.read_opt_reply().unwrap();
        assert_eq!(rep.option, opt, "{rep:?}");
        assert_eq!(rep.reply_type, REP_ERR_UNSUP, "option {opt}: {rep:?}");
    }
    // NBD_OPT_LIST with data is invalid; the session continues.
    w.send_option(OPT_LIST, b"x").unwrap();
    let rep = w.read_opt_reply().unwrap();
    assert_eq!(rep.reply_type, REP_ERR_INVALID, "{rep:?}");
    // STARTTLS without TLS configured: an error (POLICY or UNSUP), never ACK.
    w.send_option(OPT_STARTTLS, &[]).unwrap();
    let rep = w.read_opt_reply().unwrap();
    assert!(
        matches!(rep.reply_type, REP_ERR_POLICY | REP_ERR_UNSUP),
        "{rep:?}"
    );
    // An unknown export name in GO: an error, session continues.
    let info = w.go("no-such-export").unwrap();
    let rep = info.expect_err("GO for an unknown export must fail");
    assert!(
        matches!(
            rep.reply_type,
            REP_ERR_UNKNOWN | REP_ERR_POLICY | REP_ERR_INVALID
        ),
        "{rep:?}"
    );
    // NBD_OPT_LIST works and lists our export.
    w.send_option(OPT_LIST, &[]).unwrap();
    let mut names = Vec::new();
    loop {
        let rep = w.read_opt_reply().unwrap();
        match rep.reply_type {
            REP_SERVER => {
                let n = u32::from_be_bytes(rep.data[0..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(rep.data[4..4 + n].to_vec()).unwrap());
            }
            REP_ACK => break,
            t => panic!("unexpected reply {t:#x} to NBD_OPT_LIST"),
        }
    }
    assert_eq!(names, vec![server.export.clone()]);
    // Finally GO into transmission and read.
    assert_eq!(w.structured_reply().unwrap(), REP_ACK);
    let info = w.go(&server.export).unwrap().expect("GO");
    assert_eq!(info.size, server.size);
    w.send_request(0, CMD_READ, 7, 0, 512, &[]).unwrap();
    let (err, _) = w.read_structured().unwrap();
    assert_eq!(err, 0);
    // NBD_OPT_ABORT on another connection: ACK (or close), then closed.
    let mut a = Wire::connect(server.addr()).unwrap();
    a.handshake(false).unwrap();
    a.send_option(OPT_ABORT, &[]).unwrap();
    if let Ok(rep) = a.read_opt_reply() {
        assert_eq!(rep.reply_type, REP_ACK, "{rep:?}");
    }
    assert!(a.closed_by_server());
    drop(w);
    assert_serves_fresh_client(&server);
    server.stop();
}

#[test]
fn oversize_option_lengths_are_refused_without_hanging() {
    let server = Blockd::start();
    // A huge option length with no data behind it: an error reply or a close, not a wait for 4 GiB.
    for opt in [999u32, OPT_GO, OPT_LIST, OPT_SET_META_CONTEXT] {
        let mut w = Wire::connect(server.addr()).unwrap();
        w.handshake(true).unwrap();
        w.send(&option_bytes(opt, 0xFFFF_FFF0, &[])).unwrap();
        if let Some(rep) =
            expect_opt_error_or_close(&mut w, &format!("option {opt} with length 0xfffffff0"))
        {
            assert_eq!(rep.option, opt);
        }
    }
    // An oversize option sent in full: an error reply, and the session stays in sync.
    {
        let mut w = Wire::connect(server.addr()).unwrap();
        w.handshake(true).unwrap();
        w.send_option(999, &vec![0x41u8; 200_000]).unwrap();
        if let Some(rep) = expect_opt_error_or_close(&mut w, "option 999 with 200000 bytes of data")
        {
            assert_eq!(rep.option, 999);
            let info = w
                .go(&server.export)
                .unwrap()
                .expect("GO after an oversize option");
            assert_eq!(info.size, server.size);
        }
    }
    // An export name longer than the spec's 4096-byte limit, sent in full: an error reply, then the session works.
    {
        let mut w = Wire::connect(server.addr()).unwrap();
        w.handshake(true).unwrap();
        let long = "x".repeat(10_000);
        w.send_option(OPT_GO, &go_data(&long, &[])).unwrap();
        if expect_opt_error_or_close(&mut w, "GO with a 10000-byte name").is_some() {
            let info = w
                .go(&server.export)
                .unwrap()
                .expect("GO after an oversize name");
            assert_eq!(info.size, server.size);
        }
    }
    // A GO whose inner name length exceeds the option length: invalid.
    let mut w = Wire::connect(server.addr()).unwrap();
    w.handshake(true).unwrap();
    let mut data = go_data(&server.export, &[]);
    data[0..4].copy_from_slice(&1000u32.to_be_bytes());
    w.send_option(OPT_GO, &data).unwrap();
    if let Some(rep) = expect_opt_error_or_close(&mut w, "GO with an inconsistent name length") {
        assert_eq!(rep.reply_type, REP_ERR_INVALID, "{rep:?}");
        let info = w
            .go(&server.export)
            .unwrap()
            .expect("GO after an invalid GO");
        assert_eq!(info.size, server.size);
    }
    drop(w);
    assert_serves_fresh_client(&server);
    server.stop();
}

#[test]
fn export_name_option_sends_zeroes_unless_no_zeroes() {
    let server = Blockd::start();
    for no_zeroes in [false, true] {
        let mut w = Wire::connect(server.addr()).unwrap();
        let flags = w.handshake(no_zeroes).unwrap();
        assert!(flags & FLAG_NO_ZEROES != 0, "server should offer NO_ZEROES");
        w.send_option(OPT_EXPORT_NAME, server.export.as_bytes())
            .unwrap();
        assert_eq!(w.read_u64().unwrap(), server.size);
        let tflags = w.read_u16().unwrap();
        assert!(tflags & 1 != 0, "HAS_FLAGS");
        if !no_zeroes {
            assert_eq!(w.read_exact(124).unwrap(), vec![0u8; 124]);
        }
        // The next bytes are the reply to our first request (no stray zeroes in between).
        let got = w
            .read_simple(5, 0, 16)
            .unwrap()
            .expect("read after EXPORT_NAME");
        assert_eq!(got.len(), 16);
        w.disconnect().unwrap();
        assert!(w.closed_by_server());
    }
    // EXPORT_NAME for an unknown export: the server must close.
    let mut w = Wire::connect(server.addr()).unwrap();
    w.handshake(true).unwrap();
    w.send_option(OPT_EXPORT_NAME, b"nope").unwrap();
    assert!(
        w.closed_by_server(),
        "server kept a session for an unknown EXPORT_NAME"
    );
    assert_serves_fresh_client(&server);
    server.stop();
}

#[test]
fn requests_past_the_end_get_einval_and_the_connection_stays() {
    let server = Blockd::start();
    let size = server.size;
    let (mut w, _) = Wire::open(server.addr(), &server.export, false).unwrap();
    let mut cookie = 100;
    // The spec allows ENOSPC (its SHOULD) besides EINVAL for writes beyond the end.
    let write_errs: &[u32] = &[EINVAL, ENOSPC];
    let cases: &[(u16, u64, u32, &str)] = &[
        (CMD_READ, size - 100, 4096, "read across the end"),
        (CMD_READ, size, 1, "read at the end"),
        (
            CMD_READ,
            u64::MAX - 10,
            4096,
            "read with offset+length overflowing u64",
        ),
        (CMD_TRIM, size - 100, 4096, "trim across the end"),
        (CMD_WRITE_ZEROES, size - 1, 2, "write zeroes across the end"),
        (CMD_CACHE, size + 4096, 4096, "cache beyond the end"),
        (CMD_WRITE, size - 100, 4096, "write across the end"),
        (
            CMD_WRITE,
            u64::MAX - 10,
            4096,
            "write with offset+length overflowing u64",
        ),
    ];
    for &(kind, offset, len, what) in cases {
        cookie += 1;
        let payload = if kind == CMD_WRITE {
            vec![0x5Au8; len as usize]
        } else {
            Vec::new()
        };
        w.send_request(0, kind, cookie, offset, len, &payload)
            .unwrap();
        let want: &[u32] = if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            write_errs
        } else {
            &[EINVAL]
        };
        expect_simple_error(&mut w, cookie, want, what);
        // The connection still works.
        let got = w
            .read_simple(cookie + 1000, size - 4096, 4096)
            .unwrap()
            .expect("read in range");
        assert_eq!(got.len(), 4096);
    }
    // A write across the end changed nothing: the last bytes are still zero.
    let tail = w.read_simple(1, size - 200, 200).unwrap().unwrap();
    assert_eq!(tail, vec![0u8; 200]);

    // With structured replies, the read error is an error chunk.
    let (mut s, _) = Wire::open(server.addr(), &server.export, true).unwrap();
    s.send_request(0, CMD_READ, 9, size - 1, 2, &[]).unwrap();
    let (err, chunks) = s.read_structured().unwrap();
    assert_eq!(err, EINVAL, "{chunks:?}");
    s.send_request(0, CMD_READ, 10, size - 1, 1, &[]).unwrap();
    let (err, chunks) = s.read_structured().unwrap();
    assert_eq!(err, 0, "{chunks:?}");
    drop((w, s));
    assert_serves_fresh_client(&server);
    server.stop();
}

#[test]
fn oversize_requests_get_an_error_and_the_connection_stays() {
    let server = big_server();
    let (mut w, info) = Wire::open(server.addr(), &server.export, false).unwrap();
    assert!(
        info.max_block as u64 >= 64 * MIB,
        "max block size {} < 64 MiB",
        info.max_block
    );
    let max = info.max_block;
    let too_big: &[u32] = &[EINVAL, EOVERFLOW, ENOMEM];

    // Exactly the maximum works (a read of max bytes).
    let got = w
        .read_simple(1, 0, max)
        .unwrap()
        .expect("read of exactly the maximum");
    assert_eq!(got.len(), max as usize);

    // A read above the maximum, and one of 4 GiB - 1.
    if (max as u64) < server.size {
        w.send_request(0, CMD_READ, 2, 0, max + 1, &[]).unwrap();
        expect_simple_error(&mut w, 2, too_big, "read of max+1 bytes");
    }
    w.send_request(0, CMD_READ, 3, 0, u32::MAX, &[]).unwrap();
    expect_simple_error(&mut w, 3, too_big, "read of 4 GiB - 1");
    assert_eq!(w.read_simple(4, 0, 512).unwrap().unwrap().len(), 512);

    // A write above the maximum, payload sent in full: an error, and the payload is not taken as requests.
    let over = max + 4096;
    let payload = vec![0x77u8; over as usize];
    w.send_request(0, CMD_WRITE, 5, 0, over, &payload).unwrap();
    expect_simple_error(&mut w, 5, too_big, "write of max+4096 bytes");
    let got = w
        .read_simple(6, 0, 4096)
        .unwrap()
        .expect("read after an oversize write");
    assert_eq!(
        got,
        vec![0u8; 4096],
        "an oversize write must not be applied"
    );

    // Structured: the read error arrives as an error chunk; the connection stays.
    let (mut s, _) = Wire::open(server.addr(), &server.export, true).unwrap();
    s.send_request(0, CMD_READ, 7, 0, u32::MAX, &[]).unwrap();
    let (err, chunks) = s.read_structured().unwrap();
    assert!(
        too_big.contains(&err),
        "structured oversize read: {chunks:?}"
    );
    s.send_request(0, CMD_READ, 8, 0, 512, &[]).unwrap();
    assert_eq!(s.read_structured().unwrap().0, 0);
    drop((w, s));
    assert_serves_fresh_client(&server);
    server.stop();
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let server = Blockd::start();
    let (mut w, _) = Wire::open(server.addr(), &server.export, false).unwrap();
    for (i, kind) in [8u16, 99, 0x7fff, 0xffff].into_iter().enumerate() {
        let cookie = 0xC0FFEE + i as u64;
        w.send_request(0, kind, cookie, 0, 512, &[]).unwrap();
        expect_simple_error(&mut w, cookie, &[EINVAL], &format!("command type {kind}"));
    }
    // BLOCK_STATUS without a negotiated meta context: EINVAL.
    w.send_request(0, CMD_BLOCK_STATUS, 77, 0, 4096, &[])
        .unwrap();
    expect_simple_error(&mut w, 77, &[EINVAL], "block status without a meta context");
    assert_eq!(w.read_simple(78, 0, 512).unwrap().unwrap().len(), 512);
    w.disconnect().unwrap();
    assert!(w.closed_by_server());
    assert_serves_fresh_client(&server);
    server.stop();
}

#[test]
fn pipelined_requests_are_answered_by_cookie() {
    let server = Blockd::start();
    let (mut w, _) = Wire::open(server.addr(), &server.export, false).unwrap();
    // 64 writes in one burst, then 64 reads; replies may come in any order but each cookie exactly once.
    let mut burst = Vec::new();
    for i in 0..64u64 {
        let data = vec![i as u8 + 1; 1000];
        burst.extend(request_bytes(
            REQUEST_MAGIC,
            0,
            CMD_WRITE,
            1000 + i,
            i * 1001,
            1000,
        ));
        burst.extend(data);
    }
    w.send(&burst).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        match w.read_reply().unwrap() {
            Reply::Simple { error: 0, cookie } => {
                assert!(seen.insert(cookie), "cookie {cookie} twice")
            }
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(seen, (1000..1064).collect());
    for i in 0..64u64 {
        let got = w.read_simple(5000 + i, i * 1001, 1000).unwrap().unwrap();
        assert_eq!(got, vec![i as u8 + 1; 1000], "write {i}");
    }
    drop(w);
    assert_serves_fresh_client(&server);
    server.stop();
}
