//! `systemd-analyze verify` passes on the units in `ops/systemd/` (blockd@.service as the
//! instance blockd@r0.service; filed.service when present), with the binaries they start
//! pointed at this build (the units name /usr/local/bin, where `cargo install --root
//! /usr/local` puts them). Also checks the restart and ordering settings the docs promise.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::repl::blockctl_bin;
use integration_tests::{blockd_bin, require_tool, run_timeout, workspace_root};

fn verify(unit_dir: &Path, instance: &str) {
    let out = run_timeout(
        Command::new(require_tool("systemd-analyze", "systemd"))
            .args(["verify", "--man=no"])
            .arg(unit_dir.join(instance))
            .current_dir(unit_dir),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "verify {instance} failed:\n{text}");
    assert!(text.trim().is_empty(), "verify {instance} warned:\n{text}");
}

#[test]
fn units_verify() {
    let bin_dir = blockd_bin().parent().unwrap().to_path_buf();
    assert!(blockctl_bin().is_file());
    let src = workspace_root().join("ops/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let local = text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        std::fs::write(dir.path().join(&name), local).unwrap();
        checked.push(name);
    }
    let blockd = std::fs::read_to_string(src.join("blockd@.service")).unwrap();
    for want in [
        "After=network-online.target",
        "Wants=network-online.target",
        "Restart=on-failure",
        "--resource %i",
        "RuntimeDirectoryPreserve=yes",
    ] {
        assert!(blockd.contains(want), "blockd@.service lacks {want}");
    }
    verify(dir.path(), "blockd@r0.service");
    if checked.iter().any(|n| n == "filed.service") {
        let st = integration_tests::without_test_env(&mut Command::new(env!("CARGO")))
            .args(["build", "--workspace", "--bins"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build --workspace --bins");
        assert!(st.success(), "cargo build --workspace --bins failed");
        assert!(bin_dir.join("filed").is_file());
        verify(dir.path(), "filed.service");
    }
    eprintln!("verified: {checked:?}");
}
