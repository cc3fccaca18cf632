//! filed with two and three real `filed serve` processes: new, changed, renamed and deleted files,
//! directories, symlinks, permissions and mtimes propagate; conflicts are detected and resolved per
//! auto policy; a peer that was down gets what it missed; a peer running as an ordinary user (it
//! cannot set owners) has no false conflicts over them.

#[path = "filed_harness.rs"]
mod harness;

use harness::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn two_nodes_propagate_everything() {
    let mut c = Cluster::new(2, "auto = \"none\"");
    c.start_all();
    let (a, b) = (c.data("alpha"), c.data("beta"));
    write(&a.join("top.txt"), b"hello");
    write(&a.join("dir/sub/deep.bin"), &vec![7u8; 300_000]);
    std::fs::set_permissions(
        a.join("dir/sub/deep.bin"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(a.join("dir"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("dir/sub/deep.bin", a.join("link")).unwrap();
    write(&a.join("ignored~"), b"excluded");
    set_mtime(&a.join("top.txt"), 1_234_567_890_123_456_789);
    set_mtime(&a.join("link"), 1_111_111_111_000_000_007);
    write(&b.join("from-beta.txt"), b"beta says hi");
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!b.join("ignored~").exists(), "excluded file was sent");
    std::fs::remove_file(a.join("ignored~")).unwrap();
    assert_same_tree(&a, &b);

    // changed file: sent as a delta (fewer bytes than the file)
    let mut big = vec![0u8; 4 << 20];
    for (i, x) in big.iter_mut().enumerate() {
        *x = (i * 7919 % 251) as u8;
    }
    write(&a.join("big.bin"), &big);
    assert_eq!(c.sync("alpha").code, 0);
    big[1_000_000] ^= 0xff;
    write(&a.join("big.bin"), &big);
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    let out_bytes: u64 = r
        .stdout
        .split("; ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("byte count in output");
    assert!(
        out_bytes < 200_000,
        "a 1-byte change sent {out_bytes} bytes:\n{r:?}"
    );
    assert_same_tree(&a, &b);

    // rename: done as a rename, not a resend
    std::fs::rename(a.join("big.bin"), a.join("dir/moved.bin")).unwrap();
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("renamed  %data%/big.bin -> %data%/dir/moved.bin"),
        "{r:?}"
    );
    let out_bytes: u64 = r
        .stdout
        .lines()
        .filter(|l| l.contains("bytes out"))
        .filter_map(|l| l.split("; ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(out_bytes < 40_000, "rename of 4 MiB sent {out_bytes} bytes");
    assert_same_tree(&a, &b);

    // a change made on beta comes back when alpha syncs (pull), deletions and mode changes too
    write(&b.join("from-beta.txt"), b"beta changed it");
    std::fs::remove_file(a.join("top.txt")).unwrap();
    std::fs::remove_dir_all(a.join("dir/sub")).unwrap();
    std::fs::set_permissions(
        a.join("dir/moved.bin"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!b.join("top.txt").exists());
    assert_eq!(
        std::fs::read(a.join("from-beta.txt")).unwrap(),
        b"beta changed it"
    );
    assert_same_tree(&a, &b);
    // deleted files were backed up on the receiver
    assert!(c.path("beta/backup/%data%_top.txt.1").exists());

    // quiet after convergence: nothing to send, compare finds no difference
    let r = c.sync("alpha");
    assert!(r.stdout.contains("0 sent, 0 received"), "{r:?}");
    let r = c.filed("alpha", &["compare"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = c.filed("beta", &["dirty"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn three_nodes_and_a_peer_that_was_down() {
    let mut c = Cluster::new(3, "");
    c.start_all();
    let (a, b, g) = (c.data("alpha"), c.data("beta"), c.data("gamma"));
    write(&a.join("one"), b"1");
    assert_eq!(c.sync("alpha").code, 0);
    assert_same_tree(&a, &b);
    assert_same_tree(&a, &g);
    // a change on beta reaches both others
    write(&b.join("two"), b"2");
    let r = c.sync("beta");
    assert_eq!(r.code, 0, "{r:?}");
    assert_same_tree(&a, &b);
    assert_same_tree(&b, &g);

    // gamma is down: alpha's change waits in the dirty queue, survives, and arrives later
    c.stop("gamma");
    write(&a.join("three"), b"3");
    let r = c.sync("alpha");
    assert_eq!(r.code, 3, "unreachable peer is a partial failure: {r:?}");
    assert!(b.join("three").exists());
    assert!(!g.join("three").exists());
    let r = c.filed("alpha", &["dirty"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stdout.contains("gamma\t%data%/three"), "{r:?}");
    let r = c.filed("alpha", &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let gamma = v["groups"][0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == "gamma")
        .unwrap()
        .clone();
    assert!(
        gamma["queued"].as_u64().unwrap() >= 1 && !gamma["last_error"].as_str().unwrap().is_empty(),
        "{gamma}"
    );
    c.start("gamma");
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert_same_tree(&a, &g);
    assert_eq!(c.filed("alpha", &["dirty"]).code, 0);
}

fn conflict_setup(policy: &str) -> (Cluster, std::path::PathBuf, std::path::PathBuf) {
    let mut c = Cluster::new(2, &format!("auto = \"{policy}\""));
    c.start_all();
    let (a, b) = (c.data("alpha"), c.data("beta"));
    write(&a.join("f"), b"base");
    assert_eq!(c.sync("alpha").code, 0);
    // alpha: older and bigger; beta: younger and smaller
    write(&a.join("f"), b"alpha version, the longer one");
    set_mtime(&a.join("f"), 1_600_000_000_000_000_000);
    write(&b.join("f"), b"beta version");
    set_mtime(&b.join("f"), 1_700_000_000_000_000_000);
    (c, a, b)
}

fn expect_winner(policy: &str, initiator: &str, winner: &[u8]) {
    let (c, a, b) = conflict_setup(policy);
    let r = c.sync(initiator);
    assert_eq!(r.code, 0, "{policy}: {r:?}");
    assert_eq!(std::fs::read(a.join("f")).unwrap(), winner, "{policy}");
    assert_eq!(std::fs::read(b.join("f")).unwrap(), winner, "{policy}");
    // the loser is kept as a backup on the side that lost
    let loser_side = if winner.starts_with(b"alpha") {
        "beta"
    } else {
        "alpha"
    };
    assert!(
        c.path(&format!("{loser_side}/backup/%data%_f.1")).exists(),
        "{policy}: no backup of the losing version"
    );
    assert_eq!(c.filed("alpha", &["ls-conflicts"]).code, 0);
}

#[test]
fn auto_policies_pick_the_documented_winner() {
    expect_winner("younger", "alpha", b"beta version");
    expect_winner("older", "alpha", b"alpha version, the longer one");
    expect_winner("bigger", "beta", b"alpha version, the longer one");
    expect_winner("smaller", "alpha", b"beta version");
    expect_winner("left", "beta", b"alpha version, the longer one");
    expect_winner("right", "alpha", b"beta version");
    expect_winner("first", "alpha", b"alpha version, the longer one");
    expect_winner("first", "beta", b"beta version");
}

#[test]
fn conflicts_are_kept_until_resolved() {
    let (c, a, b) = conflict_setup("none");
    let r = c.sync("alpha");
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.contains("CONFLICT %data%/f"), "{r:?}");
    // detected every time, on both sides, nothing overwritten
    assert_eq!(c.sync("alpha").code, 2);
    assert_eq!(
        std::fs::read(a.join("f")).unwrap(),
        b"alpha version, the longer one"
    );
    assert_eq!(std::fs::read(b.join("f")).unwrap(), b"beta version");
    let r = c.filed("beta", &["ls-conflicts"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.contains("%data%/f"));
    // identical changes are not a conflict
    write(&a.join("same"), b"x");
    write(&b.join("same"), b"x");
    let r = c.sync("alpha");
    assert!(!r.stdout.contains("CONFLICT %data%/same"), "{r:?}");
    // resolve by keeping the remote version (given as a path on this host)
    let p = a.join("f").display().to_string();
    let r = c.filed("alpha", &["resolve", &p, "--keep", "remote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(a.join("f")).unwrap(), b"beta version");
    assert!(c.path("alpha/backup/%data%_f.1").exists());
    assert_eq!(c.filed("alpha", &["ls-conflicts"]).code, 0);
    assert_eq!(c.filed("beta", &["ls-conflicts"]).code, 0);
    assert_same_tree(&a, &b);
    // csync2 -f: force this side to win a new conflict
    write(&a.join("f"), b"alpha again");
    write(&b.join("f"), b"beta again");
    assert_eq!(c.sync("alpha").code, 2);
    assert_eq!(c.filed("beta", &["force", "%data%/f"]).code, 0);
    let r = c.sync("beta");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(a.join("f")).unwrap(), b"beta again");
    assert_eq!(
        c.filed("alpha", &["ls-conflicts"]).code,
        0,
        "conflict record cleared on the other side too"
    );
}

#[test]
fn slaves_only_receive() {
    let mut c = Cluster::with_slaves(2, 1, "");
    c.start_all();
    let (a, b) = (c.data("alpha"), c.data("beta"));
    write(&a.join("f"), b"master");
    assert_eq!(c.sync("alpha").code, 0);
    assert_eq!(std::fs::read(b.join("f")).unwrap(), b"master");
    // a slave's own change is not sent
    write(&b.join("local-only"), b"slave");
    let r = c.sync("beta");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!a.join("local-only").exists());
    // the master's change wins over the slave's
    write(&b.join("f"), b"slave edit");
    write(&a.join("f"), b"master edit");
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(b.join("f")).unwrap(), b"master edit");
}

/// A peer whose include root is an unmounted filesystem's bare mount point refuses a new file
/// sent into it (it stays queued on the sender) instead of writing it there: that file would make
/// the peer's next scan take every recorded file as deleted and delete them on every host.
#[test]
fn a_file_is_not_received_into_an_unmounted_include_root() {
    let mut c = Cluster::new(2, "auto = \"none\"");
    c.start("beta");
    let (a, b) = (c.data("alpha"), c.data("beta"));
    write(&a.join("etc/x.conf"), b"x");
    write(&a.join("top"), b"top");
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert_same_tree(&a, &b);
    // beta's filesystem is unmounted: its mount point is an empty directory
    let mounted = c.path("beta/data.mounted");
    std::fs::rename(&b, &mounted).unwrap();
    std::fs::create_dir(&b).unwrap();
    write(&a.join("new"), b"new");
    let r = c.sync("alpha");
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout
            .contains("holds none of the 2 entries recorded at its top level"),
        "{r:?}"
    );
    assert_eq!(std::fs::read_dir(&b).unwrap().count(), 0, "written into it");
    let r = c.filed("alpha", &["dirty"]);
    assert!(
        r.stdout.contains("%data%/new"),
        "not queued any more: {r:?}"
    );
    // beta's scans skip the root; nothing is deleted anywhere
    let r = c.filed("beta", &["check"]);
    assert!(
        r.stdout.contains("--allow-empty-root") || r.stderr.contains("--allow-empty-root"),
        "{r:?}"
    );
    assert_eq!(c.sync("alpha").code, 3);
    assert_eq!(std::fs::read(a.join("etc/x.conf")).unwrap(), b"x");
    assert_eq!(std::fs::read(a.join("top")).unwrap(), b"top");
    // mounted again: the queued file arrives
    std::fs::remove_dir(&b).unwrap();
    std::fs::rename(&mounted, &b).unwrap();
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert_same_tree(&a, &b);
}

/// A directory the scanning host cannot list (mode 000 for a filed running as an ordinary user,
/// like a crashed FUSE mount) hides its files: they are not deleted on the peer, and come back to
/// normal once it is readable again.
#[test]
fn an_unreadable_directory_is_not_deleted_on_the_peers() {
    use std::os::unix::fs::chown;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run alpha as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    let mut c = Cluster::new(2, "auto = \"none\"");
    for p in [c.dir.path().to_path_buf(), c.path("pki")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (a, b) = (c.data("alpha"), c.data("beta"));
    std::fs::create_dir(a.join("sub")).unwrap();
    write(&a.join("sub/f"), b"kept");
    write(&a.join("top"), b"top");
    let mut own = vec![c.path("alpha"), a.clone(), a.join("sub"), a.join("sub/f")];
    own.push(a.join("top"));
    own.extend(["pki/alpha.key", "pki/alpha.pem", "pki/data.key"].map(|p| c.path(p)));
    for p in own {
        chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    c.start("beta");
    let sync_alpha = || c.run_raw_as(Some("alpha"), Some((NOBODY, NOBODY)), &["sync"]);
    let r = sync_alpha();
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(b.join("sub/f")).unwrap(), b"kept");

    std::fs::set_permissions(a.join("sub"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let r = sync_alpha();
    assert!(
        r.stdout
            .contains("%data%/sub: cannot list the directory: Permission denied"),
        "{r:?}"
    );
    assert!(!r.stdout.contains("sub/f"), "{r:?}");
    assert_eq!(
        std::fs::read(b.join("sub/f")).unwrap(),
        b"kept",
        "deleted on the peer"
    );
    assert_eq!(std::fs::read(b.join("top")).unwrap(), b"top");

    std::fs::set_permissions(a.join("sub"), std::fs::Permissions::from_mode(0o755)).unwrap();
    write(&a.join("sub/f"), b"changed");
    let r = sync_alpha();
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(b.join("sub/f")).unwrap(), b"changed");
}

/// filed running as an ordinary user cannot give a received file the sender's owner. That is no
/// change: later syncs report no false conflict and send nothing back and forth, and that host's
/// own edits go out without changing the owner on the other host.
#[test]
fn a_peer_that_cannot_set_owners_has_no_false_conflicts() {
    use std::os::unix::fs::{MetadataExt, chown};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run beta as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    let mut c = Cluster::new(2, "auto = \"none\"");
    // beta runs as nobody: its tree, state, certificate and the group key are its own
    for p in [c.dir.path().to_path_buf(), c.path("pki")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut own = vec![c.path("beta"), c.data("beta")];
    own.extend(["pki/beta.key", "pki/beta.pem", "pki/data.key"].map(|p| c.path(p)));
    for p in own {
        chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    c.start("alpha");
    c.start_as("beta", Some((NOBODY, NOBODY)));
    let (a, b) = (c.data("alpha"), c.data("beta"));
    let owner = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    let settled = |what: &str| {
        for node in ["alpha", "beta"] {
            let r = c.sync(node);
            assert_eq!(r.code, 0, "{what}: sync on {node}: {r:?}");
            assert!(!r.stdout.contains("f.txt"), "{what}: sent again: {r:?}");
            let r = c.filed(node, &["dirty"]);
            assert_eq!(r.code, 0, "{what}: still queued on {node}: {r:?}");
        }
    };

    write(&a.join("f.txt"), b"version 1");
    chown(a.join("f.txt"), Some(4242), Some(4343)).unwrap();
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(b.join("f.txt")).unwrap(), b"version 1");
    assert_eq!(owner(&b.join("f.txt")), (NOBODY, NOBODY), "could not chown");
    settled("after the first copy");

    // alpha changes it: beta takes it (beta's owner is not a change of its own, no conflict)
    write(&a.join("f.txt"), b"version 2");
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "a false conflict: {r:?}\n{}", c.log("beta"));
    assert_eq!(std::fs::read(b.join("f.txt")).unwrap(), b"version 2");
    settled("after alpha's change");

    // beta changes it: alpha takes the content and keeps its owner
    write(&b.join("f.txt"), b"version 3, beta");
    let r = c.sync("beta");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(a.join("f.txt")).unwrap(), b"version 3, beta");
    assert_eq!(owner(&a.join("f.txt")), (4242, 4343), "beta's user leaked");
    settled("after beta's change");
}

#[test]
fn a_slow_action_does_not_make_the_group_busy() {
    // Received `slow*` files run a slow action on the receiver (inside its listener's session);
    // local `local*` changes run one on the sender (after its `filed sync` session). While either
    // sleeps, another session for the group with that host must go through at once: the group lock
    // is not held by a running action (a listener waits 5 s for it, then answers "busy").
    let extra = "[[groups.data.action]]\npattern = \"%data%/slow*\"\nexec = \"echo started; sleep 8\"\nlogfile = \"action.log\"\n\n\
                 [[groups.data.action]]\npattern = \"%data%/local*\"\nexec = \"echo local; sleep 8\"\nlogfile = \"action.log\"\ndo-local-only = true\n";
    let mut c = Cluster::new(2, extra);
    c.start_all();
    let (a, b) = (c.data("alpha"), c.data("beta"));
    let log = |what: &str| {
        std::fs::read_to_string(c.path("action.log"))
            .unwrap_or_default()
            .contains(what)
    };
    let timed_sync = |node: &str| {
        let t = std::time::Instant::now();
        let r = c.sync(node);
        (r, t.elapsed())
    };

    // The listener side: beta runs the action for a received file.
    write(&a.join("slow1"), b"1");
    assert_eq!(c.sync("alpha").code, 0);
    assert!(
        wait_until(std::time::Duration::from_secs(5), || log("started")),
        "the action did not start"
    );
    write(&a.join("f2"), b"2");
    let (r, took) = timed_sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(b.join("f2").exists());
    assert!(
        took < std::time::Duration::from_secs(3),
        "a sync waited {took:?} for beta's action:\n{r:?}"
    );

    // The initiator side: beta's own `filed sync` runs its do-local action after the session.
    write(&b.join("local1"), b"3");
    std::thread::scope(|s| {
        let bg = s.spawn(|| c.sync("beta"));
        assert!(
            wait_until(std::time::Duration::from_secs(10), || log("local")),
            "the local action did not start"
        );
        write(&a.join("f3"), b"4");
        let (r, took) = timed_sync("alpha");
        assert_eq!(r.code, 0, "{r:?}");
        assert!(b.join("f3").exists());
        assert!(
            took < std::time::Duration::from_secs(3),
            "a sync waited {took:?} for beta's local action:\n{r:?}"
        );
        let r = bg.join().unwrap();
        assert_eq!(r.code, 0, "{r:?}");
    });
    assert_same_tree(&a, &b);
}
