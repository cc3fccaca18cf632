//! The Pacemaker resource agents `ops/ocf/blockd` (promotable) and `ops/ocf/filed` pass
//! `ocf-tester` (Debian's resource-agents) against real daemons; the blockd agent's promotion
//! scores follow the disk state. The work is in `ops/tests/ocf-blockd.sh` and
//! `ops/tests/ocf-filed.sh`; these tests build the binaries, pick free ports and run them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::repl::{blockctl_bin, free_port};
use integration_tests::{blockd_bin, require_tool, run_timeout, workspace_root};

/// A port P such that P..P+n are free on 127.0.0.1.
fn free_block(n: u16) -> u16 {
    for _ in 0..200 {
        let p = free_port();
        if p.checked_add(n).is_some()
            && (1..n).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok())
        {
            return p;
        }
    }
    panic!("no {n} consecutive free ports");
}

fn filed_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("FILED_BIN") {
        return PathBuf::from(b);
    }
    let st = integration_tests::without_test_env(&mut Command::new(env!("CARGO")))
        .args(["build", "--workspace", "--bins"])
        .current_dir(workspace_root())
        .status()
        .expect("run cargo build --workspace --bins");
    assert!(st.success(), "cargo build --workspace --bins failed");
    blockd_bin().with_file_name("filed")
}

fn run_script(script: &str, args: &[&Path], port: u16) -> String {
    require_tool("ocf-tester", "resource-agents");
    require_tool("xmllint", "libxml2-utils");
    let out = run_timeout(
        Command::new(workspace_root().join("ops/tests").join(script))
            .args(args)
            .arg(port.to_string())
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(600),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{text}",
        out.status
    );
    eprintln!("{text}");
    text
}

#[test]
fn ocf_tester_passes_blockd_agent() {
    let text = run_script(
        "ocf-blockd.sh",
        &[&blockd_bin(), &blockctl_bin()],
        free_block(4),
    );
    assert!(text.contains("ops/ocf/blockd passed all tests"), "{text}");
    assert!(text.contains("OCF blockd: all checks passed"), "{text}");
}

#[test]
fn ocf_tester_passes_filed_agent() {
    let text = run_script("ocf-filed.sh", &[&filed_bin()], free_block(2));
    assert!(text.contains("ops/ocf/filed passed all tests"), "{text}");
    assert!(text.contains("OCF filed: all checks passed"), "{text}");
}
