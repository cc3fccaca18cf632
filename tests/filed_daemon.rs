//! `filed daemon` with two and three real processes watching the same group on 127.0.0.2/.3/.4:
//! a change on any node appears everywhere, then everything goes quiet (no further transfers or
//! sessions, next to no CPU); a storm of creates converges in few batches without runaway
//! threads; an inotify queue overflow (a real one: the kernel's `max_queued_events` shrunk while
//! the daemon starts, the daemon stopped while files are created) is recovered by a rescan; a
//! peer that was down catches up, and so does a daemon that was down; a concurrent edit of one
//! file on two nodes becomes a conflict; an include root removed and recreated is watched again at
//! once; a chmod/chown right after a received write propagates back; SIGTERM exits 0; the metrics
//! endpoint parses.

#[path = "filed_harness.rs"]
mod harness;

use harness::*;
use std::path::Path;
use std::time::{Duration, Instant};

const CONVERGE: Duration = Duration::from_secs(60);

fn all_same(c: &Cluster) -> bool {
    let first = c.data(&c.nodes[0]);
    c.nodes[1..].iter().all(|n| same_tree(&first, &c.data(n)))
}

fn wait_converged(c: &Cluster, what: &str) {
    if !wait_until(CONVERGE, || all_same(c)) {
        for n in &c.nodes {
            eprintln!("--- {n} log:\n{}", c.log(n));
        }
        assert_same_tree(&c.data(&c.nodes[0]), &c.data(&c.nodes[1]));
        panic!("{what}: trees did not converge");
    }
}

/// Sum over a node's peers of a session counter from `status --json`.
fn peer_counter(c: &Cluster, node: &str, key: &str) -> u64 {
    let s = c.status_json(node);
    s["groups"][0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["counters"][key].as_u64().unwrap())
        .sum()
}

fn watch_counter(c: &Cluster, node: &str, key: &str) -> u64 {
    c.status_json(node)["groups"][0]["watch"][key]
        .as_u64()
        .unwrap()
}

/// (transfers sent + received, sync runs) over all nodes.
fn activity(c: &Cluster) -> (u64, u64) {
    let mut t = 0;
    let mut r = 0;
    for n in &c.nodes {
        t += peer_counter(c, n, "transfers_sent") + peer_counter(c, n, "transfers_received");
        r += peer_counter(c, n, "sync_runs");
    }
    (t, r)
}

/// Waits until no transfer and no session happened for `quiet`.
fn wait_quiet(c: &Cluster, quiet: Duration) -> (u64, u64) {
    let mut last = activity(c);
    let mut since = Instant::now();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = activity(c);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(start.elapsed() < CONVERGE, "never went quiet: {now:?}");
    }
}

fn propagate_and_go_quiet(n: usize) {
    let extra = "[[groups.data.action]]\npattern = \"%data%/etc\"\nexec = \"echo reload %%\"\nlogfile = \"action-LOG.log\"\n\n[daemon]\nbatch-delay-ms = 100\n";
    let mut c = Cluster::new(n, extra);
    c.start_all_daemons(&[]);
    let nodes = c.nodes.clone();
    // A change on each node, one after the other, appears everywhere.
    for (i, node) in nodes.iter().enumerate() {
        let d = c.data(node);
        write(&d.join(format!("from-{node}.txt")), node.as_bytes());
        write(
            &d.join(format!("dir-{i}/sub/deep.bin")),
            &vec![i as u8; 100_000],
        );
        write(
            &d.join("etc/shared.conf"),
            format!("set by {node}").as_bytes(),
        );
        std::os::unix::fs::symlink("shared.conf", d.join(format!("etc/link-{i}"))).unwrap();
        wait_converged(&c, &format!("change on {node}"));
    }
    // Edits, a rename and a deletion on the last node.
    let d = c.data(&nodes[n - 1]);
    write(&d.join("from-alpha.txt"), b"edited elsewhere");
    std::fs::rename(d.join("dir-0/sub/deep.bin"), d.join("dir-0/moved.bin")).unwrap();
    std::fs::remove_dir_all(d.join("dir-1")).unwrap();
    wait_converged(&c, "edit, rename and delete");
    assert!(
        !c.data(&nodes[0]).join("dir-1").exists(),
        "deleted directory came back:\n{:#?}\n{:#?}\n{}\n{}",
        snapshot(&c.data(&nodes[0])),
        snapshot(&c.data(&nodes[n - 1])),
        c.log(&nodes[0]),
        c.log(&nodes[n - 1])
    );

    // Quiet: no more transfers or sessions, and (next to) no CPU.
    let t0 = Instant::now();
    let before = wait_quiet(&c, Duration::from_secs(2));
    let quiet_after = t0.elapsed();
    let ticks0: Vec<u64> = nodes.iter().map(|x| cpu_ticks(c.pid(x))).collect();
    std::thread::sleep(Duration::from_secs(5));
    let ticks1: Vec<u64> = nodes.iter().map(|x| cpu_ticks(c.pid(x))).collect();
    let after = activity(&c);
    let suppressed: u64 = nodes
        .iter()
        .map(|x| watch_counter(&c, x, "suppressed"))
        .sum();
    let cpu: Vec<u64> = ticks0.iter().zip(&ticks1).map(|(a, b)| b - a).collect();
    eprintln!(
        "{n} daemons: quiet {quiet_after:?} after convergence; (transfers, sessions) = {before:?} then {after:?}; \
         CPU ticks per daemon over 5 s idle: {cpu:?}; own writes suppressed: {suppressed}"
    );
    assert_eq!(before, after, "activity after convergence: loop?");
    for (node, t) in nodes.iter().zip(&cpu) {
        assert!(*t <= 10, "{node} used {t} ticks in 5 s idle");
    }
    assert!(suppressed > 0, "own writes were not recognised as such");
    for node in &nodes {
        let q = c.metric(node, "filed_queue_length", &[]);
        assert_eq!(q, 0.0, "{node} queue");
        assert!(c.metric(node, "filed_sync_runs_total", &[("group", "data")]) > 0.0);
        assert!(c.metric(node, "filed_transfers_total", &[("direction", "sent")]) >= 0.0);
    }
    // Actions ran after matching changes, with their output logged, once per batch.
    let log = std::fs::read_to_string(c.path("action-LOG.log")).unwrap_or_default();
    assert!(log.contains("reload "), "action log: {log:?}");
    for node in &nodes {
        let s = c.status_json(node);
        assert_eq!(s["daemon"], true);
        for p in s["groups"][0]["peers"].as_array().unwrap() {
            assert_eq!(p["queued"], 0, "{s}");
            assert!(p["last_sync_ns"].as_i64().unwrap() > 0);
        }
    }
    for node in &nodes {
        assert_eq!(c.stop_status(node), Some(0), "{node}: SIGTERM exit code");
    }
}

#[test]
fn two_daemons_propagate_then_go_quiet() {
    propagate_and_go_quiet(2);
}

#[test]
fn three_daemons_propagate_then_go_quiet() {
    propagate_and_go_quiet(3);
}

/// A user edit made right after filed wrote the same file (same size, new content) is a change.
#[test]
fn user_edit_right_after_a_received_write_propagates() {
    let mut c = Cluster::new(2, "[daemon]\nbatch-delay-ms = 100\n");
    c.start_all_daemons(&[]);
    let (a, b) = (c.data("alpha"), c.data("beta"));
    for round in 0..5 {
        let v1 = format!("version one {round}");
        let v2 = format!("VERSION TWO {round}");
        assert_eq!(v1.len(), v2.len());
        write(&a.join("f.txt"), v1.as_bytes());
        assert!(
            wait_until(CONVERGE, || std::fs::read(b.join("f.txt")).ok()
                == Some(v1.clone().into_bytes())),
            "round {round}: v1 did not arrive"
        );
        // immediately, while beta's watcher still holds the events of filed's own write
        write(&b.join("f.txt"), v2.as_bytes());
        assert!(
            wait_until(CONVERGE, || std::fs::read(a.join("f.txt")).ok()
                == Some(v2.clone().into_bytes())),
            "round {round}: the user's edit on beta was swallowed:\n{}",
            c.log("beta")
        );
        wait_converged(&c, "edit after write");
    }
}

fn storm(files: usize) {
    let mut c = Cluster::new(2, "[daemon]\nbatch-delay-ms = 200\n");
    c.start_all_daemons(&[]);
    let (a, b) = (c.data("alpha"), c.data("beta"));
    let (pa, pb) = (c.pid("alpha"), c.pid("beta"));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = threads(pa).max(threads(pb));
                peak.fetch_max(t, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let t0 = Instant::now();
    let dirs = (files / 1000).max(1);
    for i in 0..files {
        let d = a.join(format!("d{:03}", i % dirs));
        if i < dirs {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::write(d.join(format!("f{i}")), i.to_string()).unwrap();
    }
    let created = t0.elapsed();
    let count = |p: &Path| -> usize {
        std::fs::read_dir(p)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| std::fs::read_dir(e.path()).map(|x| x.count()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    };
    let limit = Duration::from_secs(if files > 20_000 { 600 } else { 120 });
    assert!(
        wait_until(limit, || count(&b) == files),
        "storm did not arrive: {} of {files}\n{}",
        count(&b),
        c.log("alpha")
    );
    wait_converged(&c, "storm");
    let converged = t0.elapsed();
    let (_, runs) = wait_quiet(&c, Duration::from_secs(2));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let batches = watch_counter(&c, "alpha", "batches");
    let events = watch_counter(&c, "alpha", "events");
    let rescans = watch_counter(&c, "alpha", "rescans");
    let runs_alpha = peer_counter(&c, "alpha", "sync_runs");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "storm of {files} creates: created in {created:?}, converged after {converged:?}; alpha: {events} events in \
         {batches} batches, {rescans} rescans, {runs_alpha} sessions started by alpha ({runs} counted on both sides); \
         peak threads per daemon {peak}"
    );
    assert!(
        batches <= (converged.as_millis() as u64 / 200) + 5,
        "{batches} batches in {converged:?}"
    );
    assert!(runs_alpha < 200, "{runs_alpha} sessions");
    assert!(peak <= 64, "{peak} threads");
}

#[test]
fn storm_of_10000_creates_converges_in_few_batches() {
    storm(10_000);
}

/// The full-size storm (run by hand: `cargo test -p integration-tests --test filed_daemon --
/// --ignored storm_of_100000`, best with `FILED_BIN=target/release/filed`).
#[test]
#[ignore]
fn storm_of_100000_creates_converges_in_few_batches() {
    storm(100_000);
}

static SYSCTL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A real inotify queue overflow: `fs.inotify.max_queued_events` (read when an inotify instance
/// is created) is shrunk while alpha's daemon starts and restored right after; alpha is then
/// stopped (SIGSTOP) while 2,000 files are created, so its queue of 16 overflows.
#[test]
fn inotify_overflow_is_recovered_by_rescan() {
    const KNOB: &str = "/proc/sys/fs/inotify/max_queued_events";
    let Ok(orig) = std::fs::read_to_string(KNOB) else {
        eprintln!("skipped: {KNOB} not readable");
        return;
    };
    let _g = SYSCTL.lock().unwrap();
    let mut c = Cluster::new(2, "[daemon]\nbatch-delay-ms = 100\n");
    c.start_daemon("beta", &[]);
    if std::fs::write(KNOB, "16").is_err() {
        eprintln!("skipped: {KNOB} not writable (needs root)");
        return;
    }
    let restore = scopeguard(KNOB, orig.trim().to_string());
    c.start_daemon("alpha", &[]);
    drop(restore);
    let a = c.data("alpha");
    let pid = c.pid("alpha") as i32;
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for i in 0..2000 {
        write(&a.join(format!("o/f{i}")), format!("{i}").as_bytes());
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_converged(&c, "after overflow");
    let rescans = watch_counter(&c, "alpha", "rescans");
    let log = c.log("alpha");
    eprintln!("overflow: {rescans} rescans");
    assert!(rescans >= 1, "no rescan:\n{log}");
    assert!(log.contains("events lost"), "no warning:\n{log}");
    assert_eq!(
        std::fs::read_dir(c.data("beta").join("o")).unwrap().count(),
        2000
    );
}

struct Restore(&'static str, String);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, &self.1);
    }
}
fn scopeguard(knob: &'static str, v: String) -> Restore {
    Restore(knob, v)
}

#[test]
fn peer_down_catches_up_and_a_restarted_daemon_finds_what_changed() {
    let mut c = Cluster::new(2, "[daemon]\nbatch-delay-ms = 100\n");
    c.start_all_daemons(&[]);
    let (a, b) = (c.data("alpha"), c.data("beta"));
    write(&a.join("before.txt"), b"1");
    // Stays throughout: a root where none of the recorded top-level names is left looks like
    // an unmounted filesystem's mount point and is not scanned (scan::RootContents).
    write(&a.join("keep.txt"), b"k");
    wait_converged(&c, "start");
    // beta down: alpha's changes queue
    assert_eq!(c.stop_status("beta"), Some(0));
    for i in 0..20 {
        write(&a.join(format!("while-down/{i}")), b"x");
    }
    std::fs::remove_file(a.join("before.txt")).unwrap();
    assert!(
        wait_until(CONVERGE, || {
            let s = c.status_json("alpha");
            let p = &s["groups"][0]["peers"][0];
            p["queued"].as_u64().unwrap() >= 21 && !p["last_error"].as_str().unwrap().is_empty()
        }),
        "alpha does not show the queue for beta: {}",
        c.status_json("alpha")
    );
    assert!(c.metric("alpha", "filed_queue_length", &[("peer", "beta")]) >= 21.0);
    c.start_daemon("beta", &[]);
    wait_converged(&c, "beta back");
    assert!(!b.join("before.txt").exists());
    // alpha down while its tree changes: found by the check at start
    assert_eq!(c.stop_status("alpha"), Some(0));
    write(&a.join("while-alpha-down.txt"), b"y");
    std::fs::remove_dir_all(a.join("while-down")).unwrap();
    c.start_daemon("alpha", &[]);
    wait_converged(&c, "alpha restarted");
    assert!(b.join("while-alpha-down.txt").exists());
}

#[test]
fn concurrent_edit_on_two_nodes_is_a_conflict() {
    let mut c = Cluster::new(2, "auto = \"none\"\n[daemon]\nbatch-delay-ms = 200\n");
    c.start_all_daemons(&[]);
    let (a, b) = (c.data("alpha"), c.data("beta"));
    write(&a.join("shared.conf"), b"original");
    wait_converged(&c, "start");
    write(&a.join("shared.conf"), b"alpha's edit");
    write(&b.join("shared.conf"), b"beta's edit!");
    let conflict = |n: &str| c.filed(n, &["ls-conflicts"]).code == 2;
    assert!(
        wait_until(CONVERGE, || conflict("alpha") || conflict("beta")),
        "no conflict recorded\n{}\n{}",
        c.log("alpha"),
        c.log("beta")
    );
    wait_quiet(&c, Duration::from_secs(2));
    // never a silent overwrite: each side still has its own version
    assert_eq!(
        std::fs::read(a.join("shared.conf")).unwrap(),
        b"alpha's edit"
    );
    assert_eq!(
        std::fs::read(b.join("shared.conf")).unwrap(),
        b"beta's edit!"
    );
    assert!(
        c.metric("alpha", "filed_conflicts", &[]) + c.metric("beta", "filed_conflicts", &[]) >= 1.0
    );
    // resolving it on one side settles both
    let r = c.filed(
        "alpha",
        &[
            "resolve",
            a.join("shared.conf").to_str().unwrap(),
            "--keep",
            "local",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    wait_converged(&c, "resolved");
    assert_eq!(
        std::fs::read(b.join("shared.conf")).unwrap(),
        b"alpha's edit"
    );
}

/// An include root removed while the daemon runs, then created again with its file and a new
/// one in it, is watched again and scanned at once: the new file (and a later one) reaches the
/// peer long before the full check (an hour away here).
#[test]
fn recreated_include_root_is_watched_again() {
    let mut c = Cluster::new(
        2,
        "[daemon]\nbatch-delay-ms = 100\nfull-check-interval-secs = 3600\n",
    );
    c.start_all_daemons(&[]);
    let (a, b) = (c.data("alpha"), c.data("beta"));
    write(&a.join("before.txt"), b"before");
    wait_converged(&c, "start");
    std::fs::remove_dir_all(&a).unwrap();
    assert!(
        wait_until(CONVERGE, || c.log("alpha").contains("include root is gone")),
        "alpha did not notice its root went away:\n{}",
        c.log("alpha")
    );
    let t0 = Instant::now();
    std::fs::create_dir(&a).unwrap();
    // Back with what was recorded there (a root holding none of it looks like an unmounted
    // filesystem's mount point: not scanned without `filed check --allow-empty-root`).
    write(&a.join("before.txt"), b"before");
    write(&a.join("made-with-the-root.txt"), b"early");
    let arrived = |name: &str, data: &[u8]| {
        wait_until(Duration::from_secs(20), || {
            std::fs::read(b.join(name)).ok().as_deref() == Some(data)
        })
    };
    assert!(
        arrived("made-with-the-root.txt", b"early"),
        "a file in the recreated root did not arrive:\n{}\n{}",
        c.log("alpha"),
        c.log("beta")
    );
    let took = t0.elapsed();
    // the watch is back: a later change goes out by itself too
    write(&a.join("sub/later.txt"), b"later");
    assert!(
        arrived("sub/later.txt", b"later"),
        "a change in the recreated root did not arrive:\n{}",
        c.log("alpha")
    );
    eprintln!("recreated root: first file arrived after {took:?}");
    assert_eq!(
        watch_counter(&c, "alpha", "full_checks"),
        1,
        "only the one at start"
    );
    assert!(c.log("alpha").contains("include root is back"));
    wait_converged(&c, "recreated root");
}

/// A `chmod` or `chown` on the receiver right after filed wrote the file (same inode, size and
/// mtime as filed's own write) is a change: it goes back to the sender at once, not at the full
/// check (an hour away here).
#[test]
fn chmod_and_chown_right_after_a_received_write_propagate() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut c = Cluster::new(
        2,
        "[daemon]\nbatch-delay-ms = 100\nfull-check-interval-secs = 3600\n",
    );
    c.start_all_daemons(&[]);
    let (a, b) = (c.data("alpha"), c.data("beta"));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for round in 0..3u32 {
        let name = format!("f{round}.txt");
        write(&a.join(&name), format!("round {round}").as_bytes());
        std::fs::set_permissions(a.join(&name), std::fs::Permissions::from_mode(0o644)).unwrap();
        let (fa, fb) = (a.join(&name), b.join(&name));
        assert!(
            wait_until(CONVERGE, || std::fs::metadata(&fb)
                .is_ok_and(|m| m.mode() & 0o7777 == 0o644)),
            "round {round}: the file did not arrive"
        );
        // at once, while beta's watcher holds filed's own write of it
        let mode = 0o600 + round;
        std::fs::set_permissions(&fb, std::fs::Permissions::from_mode(mode)).unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || std::fs::metadata(&fa)
                .is_ok_and(|m| m.mode() & 0o7777 == mode)),
            "round {round}: the chmod on beta was swallowed:\n{}",
            c.log("beta")
        );
        if root {
            let (uid, gid) = (20_000 + round, 30_000 + round);
            std::os::unix::fs::chown(&fb, Some(uid), Some(gid)).unwrap();
            assert!(
                wait_until(Duration::from_secs(20), || std::fs::metadata(&fa)
                    .is_ok_and(|m| (m.uid(), m.gid()) == (uid, gid))),
                "round {round}: the chown on beta was swallowed:\n{}",
                c.log("beta")
            );
        }
        wait_converged(&c, "metadata back");
    }
    assert_eq!(
        watch_counter(&c, "beta", "full_checks"),
        1,
        "only the one at start"
    );
    assert!(watch_counter(&c, "beta", "suppressed") > 0);
}
