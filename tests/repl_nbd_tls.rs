//! TLS on the NBD export of a replicated resource (`[nbd-tls]`): the Primary requires STARTTLS,
//! libnbd's `nbds://` URIs with a certificate directory work on whichever node is Primary,
//! plaintext is refused, and a certificate directory without its files stops blockd at start
//! with an error that names the setting.

use std::process::Command;
use std::time::Duration;

use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE};
use integration_tests::{debian_python, make_tls_certs, require_tool, run_ok, run_timeout};

const T: Duration = Duration::from_secs(60);

fn tls_uri(c: &Cluster, i: usize, client: &std::path::Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{RESOURCE}?tls-certificates={}",
        c.nodes[i].nbd_port,
        client.display()
    )
}

/// Writes a pattern with FUA, flushes and reads it back over `uri`; TLS must be negotiated.
fn round_trip(uri: &str, seed: u8) {
    let script = r#"
import nbd, sys
seed = int(sys.argv[2])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
assert h.get_tls_negotiated(), "TLS not negotiated"
data = bytes((i * 31 + seed) & 0xff for i in range(1024 * 1024 + 513))
h.pwrite(data, 8191, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(len(data), 8191) == data
h.shutdown()
print("TLS OK")
"#;
    let out = run_ok(
        Command::new(debian_python()).args(["-c", script, uri, &seed.to_string()]),
        T,
    );
    assert!(out.contains("TLS OK"), "{out}");
}

fn plaintext_refused(uri: &str) {
    let out = run_timeout(
        Command::new(require_tool("nbdinfo", "libnbd-bin")).arg(uri),
        T,
    );
    assert!(
        !out.status.success(),
        "plaintext NBD to a TLS-required export succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn replicated_export_requires_tls_on_every_primary() {
    let certs = tempfile::tempdir().unwrap();
    let server = certs.path().join("server");
    let client = certs.path().join("client");
    make_tls_certs(&server, &client);
    let mut opts = ClusterOptions::new(2, "C");
    opts.extra_global = format!("nbd-tls = {{ dir = \"{}\" }}", server.display());
    let mut c = Cluster::start(&opts);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(60));
    plaintext_refused(&c.nbd_uri(0));
    round_trip(&tls_uri(&c, 0, &client), 1);
    c.wait_synced(0, Duration::from_secs(60));
    c.assert_identical(0);
    // Failover by hand: the other node serves with TLS too and has the data.
    c.blockctl_ok(Some(0), &["demote", RESOURCE]);
    c.promote(1, false);
    plaintext_refused(&c.nbd_uri(1));
    round_trip(&tls_uri(&c, 1, &client), 2);
    c.wait_synced(1, Duration::from_secs(60));
    c.assert_identical(1);
    c.stop(0);
    c.stop(1);
}

#[test]
fn nbd_tls_dir_without_files_is_a_startup_error() {
    let empty = tempfile::tempdir().unwrap();
    let mut opts = ClusterOptions::new(2, "C");
    opts.extra_global = format!(
        "nbd-tls = {{ dir = \"{}\", mode = \"optional\" }}",
        empty.path().display()
    );
    let c = Cluster::create(&opts);
    let out = run_timeout(
        Command::new(integration_tests::blockd_bin())
            .arg("--config")
            .arg(&c.config)
            .args(["--node", "n0"]),
        T,
    );
    assert!(
        !out.status.success(),
        "blockd started without NBD TLS files"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nbd-tls") && stderr.contains(&*empty.path().to_string_lossy()),
        "the error should name [nbd-tls] and the directory: {stderr}"
    );
}
