//! The documentation cannot rot: the `doc-test` shell blocks of docs/user-guide.md run against
//! the built binaries (ops/tests/doc-commands.sh); every (sub)command's arguments have help
//! text (ops/tests/help-check.sh); every message docs/troubleshooting.md quotes is printed by
//! the code; the release build installs with `cargo install` and links only libc-family
//! libraries (ops/tests/release-check.sh).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use integration_tests::repl::{blockctl_bin, free_port};
use integration_tests::{blockd_bin, require_tool, run_timeout, workspace_root};

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

fn script(name: &str, args: &[&std::ffi::OsStr], timeout: Duration) -> (Output, String) {
    let out = run_timeout(
        // The scripts run cargo (release-check.sh): see `without_test_env`.
        integration_tests::without_test_env(&mut Command::new(
            workspace_root().join("ops/tests").join(name),
        ))
        .args(args)
        .env("RUST_BACKTRACE", "0"),
        timeout,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn filed_bin() -> PathBuf {
    let st = integration_tests::without_test_env(&mut Command::new(env!("CARGO")))
        .args(["build", "--workspace", "--bins"])
        .current_dir(workspace_root())
        .status()
        .expect("run cargo build --workspace --bins");
    assert!(st.success(), "cargo build --workspace --bins failed");
    blockd_bin().with_file_name("filed")
}

#[test]
fn user_guide_commands_run() {
    for (tool, pkg) in [
        ("qemu-io", "qemu-utils"),
        ("nbdinfo", "libnbd-bin"),
        ("curl", "curl"),
    ] {
        require_tool(tool, pkg);
    }
    assert!(blockctl_bin().is_file());
    let bin_dir = blockd_bin().parent().unwrap().to_path_buf();
    let port = free_block(6).to_string();
    let (out, text) = script(
        "doc-commands.sh",
        &[
            workspace_root().join("docs/user-guide.md").as_os_str(),
            bin_dir.as_os_str(),
            port.as_ref(),
        ],
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "doc-test blocks failed:\n{text}");
    assert!(text.contains("doc-test blocks passed"), "{text}");
    assert!(text.contains("alpha and beta hold the same data"), "{text}");
}

#[test]
fn blockd_and_blockctl_help_is_complete() {
    let (out, text) = script(
        "help-check.sh",
        &[blockd_bin().as_os_str(), blockctl_bin().as_os_str()],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("checked: blockctl wait-sync"), "{text}");
}

#[test]
fn filed_help_is_complete() {
    let (out, text) = script(
        "help-check.sh",
        &[filed_bin().as_os_str()],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{text}");
}

/// Every message in the first column of docs/troubleshooting.md's tables: its literal parts
/// (between `{...}` placeholders) occur in the sources of blockd, common or filed.
#[test]
fn troubleshooting_messages_exist_in_the_code() {
    let root = workspace_root();
    let mut sources = String::new();
    let mut stack: Vec<PathBuf> = ["blockd/src", "common/src", "filed/src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.extension().is_some_and(|e| e == "rs") {
            sources.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
    let doc = std::fs::read_to_string(root.join("docs/troubleshooting.md")).unwrap();
    let mut checked = 0;
    let mut missing = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.split(" | ").next().unwrap();
        for quoted in cell.split('`').skip(1).step_by(2) {
            for part in literal_parts(quoted) {
                checked += 1;
                if !sources.contains(&part) {
                    missing.push(format!("{part:?} (from {quoted:?})"));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} fragments found");
    assert!(
        missing.is_empty(),
        "messages not in the code:\n{}",
        missing.join("\n")
    );
}

/// The literal fragments (at least 8 characters) of a message with `{...}` placeholders;
/// `...` in the docs also separates fragments.
fn literal_parts(message: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut depth = 0;
    for c in message.chars() {
        match c {
            '{' => {
                depth += 1;
                parts.push(std::mem::take(&mut cur));
            }
            '}' if depth > 0 => depth -= 1,
            _ if depth == 0 => cur.push(c),
            _ => {}
        }
    }
    parts.push(cur);
    parts
        .iter()
        .flat_map(|p| p.split("...").map(str::to_string).collect::<Vec<_>>())
        .map(|p| {
            p.trim_matches(|c: char| c == ' ' || c == '(' || c == ')')
                .to_string()
        })
        .filter(|p| p.chars().count() >= 8)
        .collect()
}

#[test]
fn release_build_installs_and_links_only_libc() {
    // The dev profile: the same `cargo install` and link check without the ~5 minute LTO build
    // (ops/tests/release-check.sh without --debug checks the release profile itself).
    let (out, text) = script(
        "release-check.sh",
        &["--debug".as_ref()],
        Duration::from_secs(3000),
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("release check passed"), "{text}");
}
