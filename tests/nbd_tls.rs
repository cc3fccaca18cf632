//! TLS: blockd with `--tls-dir` (and `--tls` for TLS-required mode) against libnbd's `nbds://` URIs with
//! `tls-certificates=DIR`; plaintext is refused in TLS-required mode, a client trusting another CA fails.

use std::process::Command;
use std::time::Duration;

use integration_tests::nbd_wire::*;
use integration_tests::{
    Blockd, BlockdOptions, debian_python, file_checksum, make_tls_certs, require_tool, run_ok,
    run_timeout, write_random_file,
};

const T: Duration = Duration::from_secs(60);

struct Certs {
    _dir: tempfile::TempDir,
    server: std::path::PathBuf,
    client: std::path::PathBuf,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("server");
    let client = dir.path().join("client");
    make_tls_certs(&server, &client);
    Certs {
        _dir: dir,
        server,
        client,
    }
}

fn nbdinfo_ok(uri: &str) -> serde_json::Value {
    let out = run_ok(
        Command::new(require_tool("nbdinfo", "libnbd-bin")).args(["--json", uri]),
        T,
    );
    serde_json::from_str(&out).unwrap()
}

fn nbdinfo_fails(uri: &str) -> String {
    let out = run_timeout(
        Command::new(require_tool("nbdinfo", "libnbd-bin")).arg(uri),
        T,
    );
    assert!(
        !out.status.success(),
        "nbdinfo {uri} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes, flushes and reads back through libnbd over `uri`.
fn nbdsh_round_trip(uri: &str) {
    let py = debian_python();
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
assert h.get_tls_negotiated(), "TLS not negotiated"
data = bytes((i * 13 + 5) & 0xff for i in range(3 * 1024 * 1024 + 7))
h.pwrite(data, 4097, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(len(data), 4097) == data
h.shutdown()
print("TLS OK")
"#;
    let out = run_ok(Command::new(py).args(["-c", script, uri]), T);
    assert!(out.contains("TLS OK"), "{out}");
}

#[test]
fn tls_required_serves_nbds_and_refuses_plaintext() {
    let c = certs();
    let server = Blockd::start_with(BlockdOptions {
        tls_dir: Some(c.server.clone()),
        tls_required: true,
        description: Some("tls export".into()),
        ..Default::default()
    });
    let uri = server.tls_uri(&c.client);
    let v = nbdinfo_ok(&uri);
    assert_eq!(v["TLS"], true, "{v:#}");
    assert_eq!(v["exports"][0]["export-size"], server.size, "{v:#}");
    assert_eq!(v["exports"][0]["description"], "tls export", "{v:#}");
    nbdsh_round_trip(&uri);

    // nbdcopy through TLS both ways.
    let src = server.dir().join("src.img");
    let out = server.dir().join("out.img");
    write_random_file(&src, server.size, 21);
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    run_ok(
        Command::new(&nbdcopy)
            .arg("--connections=2")
            .arg(&src)
            .arg(&uri),
        T,
    );
    run_ok(Command::new(&nbdcopy).arg(&uri).arg(&out), T);
    assert_eq!(file_checksum(&src), file_checksum(&out));

    // Plaintext clients are refused.
    nbdinfo_fails(&server.uri());
    let list = run_timeout(
        Command::new(require_tool("nbdinfo", "libnbd-bin"))
            .args(["--list", &format!("nbd://{}", server.addr())]),
        T,
    );
    assert!(
        !list.status.success() || !String::from_utf8_lossy(&list.stdout).contains(&server.export)
    );

    // On the wire: every option but STARTTLS/ABORT gets NBD_REP_ERR_TLS_REQD, and the session continues.
    let mut w = Wire::connect(server.addr()).unwrap();
    w.handshake(true).unwrap();
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_GO, go_data(&server.export, &[])),
        (OPT_INFO, go_data(&server.export, &[])),
        (OPT_STRUCTURED_REPLY, Vec::new()),
    ] {
        w.send_option(opt, &data).unwrap();
        let rep = w.read_opt_reply().unwrap();
        assert_eq!(rep.reply_type, REP_ERR_TLS_REQD, "option {opt}: {rep:?}");
    }
    // EXPORT_NAME cannot be refused with an error: the server must close.
    w.send_option(OPT_EXPORT_NAME, server.export.as_bytes())
        .unwrap();
    assert!(
        w.closed_by_server(),
        "EXPORT_NAME without TLS must end the session"
    );
    // The export still works over TLS afterwards.
    nbdinfo_ok(&uri);
    server.stop();
}

#[test]
fn tls_optional_serves_both_and_a_client_trusting_another_ca_fails() {
    let c = certs();
    let other = certs();
    let server = Blockd::start_with(BlockdOptions {
        tls_dir: Some(c.server.clone()),
        ..Default::default()
    });
    let v = nbdinfo_ok(&server.tls_uri(&c.client));
    assert_eq!(v["TLS"], true, "{v:#}");
    let v = nbdinfo_ok(&server.uri());
    assert_eq!(v["TLS"], false, "{v:#}");
    nbdsh_round_trip(&server.tls_uri(&c.client));

    // A client with a different CA (and a client certificate from that CA) must not connect.
    let err = nbdinfo_fails(&server.tls_uri(&other.client));
    eprintln!("wrong CA: {err}");
    // The server's --tls-dir has ca-cert.pem, so clients must present a certificate that CA issued.
    let anonymous = server.dir().join("anonymous-client");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::copy(c.client.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let err = nbdinfo_fails(&server.tls_uri(&anonymous));
    eprintln!("no client certificate: {err}");
    // A client presenting a certificate from another CA is refused too.
    let foreign = server.dir().join("foreign-client");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::copy(c.client.join("ca-cert.pem"), foreign.join("ca-cert.pem")).unwrap();
    std::fs::copy(
        other.client.join("client-cert.pem"),
        foreign.join("client-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        other.client.join("client-key.pem"),
        foreign.join("client-key.pem"),
    )
    .unwrap();
    let err = nbdinfo_fails(&server.tls_uri(&foreign));
    eprintln!("client certificate from another CA: {err}");
    // The server keeps serving the right client afterwards.
    nbdinfo_ok(&server.tls_uri(&c.client));
    server.stop();
}

#[test]
fn tls_dir_missing_files_is_a_clear_startup_error() {
    let empty = tempfile::tempdir().unwrap();
    let out = run_timeout(
        Command::new(integration_tests::blockd_bin())
            .args([
                "standalone",
                "--size",
                "1M",
                "--listen",
                "127.0.0.1:0",
                "--tls",
                "--backing",
            ])
            .arg(empty.path().join("b.img"))
            .arg("--tls-dir")
            .arg(empty.path()),
        T,
    );
    assert!(
        !out.status.success(),
        "blockd started with an empty --tls-dir"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pem") || stderr.contains("cert") || stderr.contains("key"),
        "startup error should name the missing certificate/key: {stderr}"
    );
}
