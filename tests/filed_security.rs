//! filed refuses hosts without the group key or with a certificate from another CA, and a peer's
//! change can never be written through a symlinked directory outside the synced tree.

#[path = "filed_harness.rs"]
mod harness;

use harness::*;

/// A copy of the cluster's config where alpha uses its own state and data, with `edit` applied.
fn evil_config(c: &Cluster, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&c.config).unwrap();
    let text = text
        .replace(
            "state = \"alpha/state.redb\"",
            "state = \"evil/state.redb\"",
        )
        .replace("data = \"alpha/data\"", "data = \"evil/data\"");
    let p = c.path("evil.toml");
    std::fs::write(&p, edit(text)).unwrap();
    std::fs::create_dir_all(c.path("evil/data")).unwrap();
    write(&c.path("evil/data/planted"), b"should never arrive");
    p
}

fn run_evil(c: &Cluster, cfg: &std::path::Path, args: &[&str]) -> Run {
    let mut cmd = std::process::Command::new(filed_bin());
    cmd.arg("--config")
        .arg(cfg)
        .arg("--node")
        .arg("alpha")
        .args(args);
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(60));
    let _ = c;
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

#[test]
fn host_without_the_group_key_is_refused() {
    let mut c = Cluster::new(2, "");
    c.start("beta");
    let cfg = evil_config(&c, |t| {
        t.replace("key = \"pki/data.key\"", "key = \"pki/evil.key\"")
    });
    assert_eq!(run_evil(&c, &cfg, &["keygen"]).code, 0);
    let r = run_evil(&c, &cfg, &["sync"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stdout.contains("unreachable or failed"), "{r:?}");
    assert!(!c.data("beta").join("planted").exists());
    // and the real alpha still works
    write(&c.data("alpha").join("ok"), b"fine");
    assert_eq!(c.sync("alpha").code, 0);
    assert!(c.data("beta").join("ok").exists());
    assert!(!c.data("beta").join("planted").exists());
}

#[test]
fn host_with_a_foreign_certificate_is_refused() {
    let mut c = Cluster::new(2, "");
    c.start("beta");
    let cfg = evil_config(&c, |t| {
        t.replace("ca = \"pki/ca.pem\"", "ca = \"pki2/ca.pem\"")
            .replace("ca-key = \"pki/ca.key\"", "ca-key = \"pki2/ca.key\"")
            .replace("cert = \"pki/alpha.pem\"", "cert = \"pki2/alpha.pem\"")
            .replace("key = \"pki/alpha.key\"", "key = \"pki2/alpha.key\"")
    });
    let r = run_evil(&c, &cfg, &["keygen", "--host", "alpha"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = run_evil(&c, &cfg, &["sync"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(!c.data("beta").join("planted").exists());
    assert!(c.log("beta").contains("peer refused"), "{}", c.log("beta"));
}

#[test]
fn symlinked_directory_cannot_redirect_a_write() {
    let mut c = Cluster::new(2, "");
    c.start_all();
    let outside = c.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    write(&c.data("alpha").join("evil/pwned"), b"escaped");
    std::os::unix::fs::symlink(&outside, c.data("beta").join("evil")).unwrap();
    let r = c.sync("alpha");
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "a write escaped through the symlink: {r:?}"
    );
    // the other direction: beta pulls alpha's file and must refuse the same way
    let r = c.sync("beta");
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "a write escaped through the symlink: {r:?}"
    );
}
