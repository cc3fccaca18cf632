//! Disk failures with real processes (2 nodes, protocol C, external metadata so the metadata is
//! not on the failing disk). The Primary's backing store really fails:
//! - an nbdkit `memory` disk behind the `error` filter, mounted as a file with nbdfuse: creating
//!   the trigger file makes every I/O fail with EIO;
//! - a sparse backing file bigger than the 16 MiB tmpfs it lives on: writes hit ENOSPC.
//!
//! Under `on-io-error = detach` a writer keeps writing through NBD across the failure with no
//! failed and no lost acknowledged write, status shows Diskless with the error, reads of data
//! written before and after the failure are correct; after the store is healed `blockctl
//! attach` resyncs only what differs and the backing files end identical. Under `pass-on` the
//! client gets EIO, the disk stays attached and the range is marked out of sync.
//!
//! Needs root (FUSE, tmpfs mounts), nbdkit and nbdfuse; skipped with a message otherwise.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integration_tests::nbd_wire::Wire;
use integration_tests::repl::{
    Cluster, ClusterOptions, EventLog, FailingDisk, RESOURCE, SmallFs, can_break_disks, tail,
};

const BS: u64 = 4096;
const SIZE: u64 = 64 << 20;

/// A 2-node cluster (protocol C) where node 0's backing is `backing` and both nodes keep their
/// metadata in external files of the cluster directory. Started, node 0 Primary, in sync.
fn pair(policy: &str, backing: impl FnOnce(&Path) -> PathBuf) -> Cluster {
    pair_on(policy, 0, backing)
}

/// [`pair`] with the custom backing on node `node`.
fn pair_on(policy: &str, node: usize, backing: impl FnOnce(&Path) -> PathBuf) -> Cluster {
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = SIZE;
    opts.extra_global = format!("on-io-error = \"{policy}\"\n");
    let mut c = Cluster::create(&opts);
    let custom = backing(c.dir.path());
    c.use_external_metadata(Some((node, custom)));
    c.start_node(0);
    c.start_node(1);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));
    c
}

fn nbd_addr(c: &Cluster, i: usize) -> SocketAddr {
    format!("127.0.0.1:{}", c.nodes[i].nbd_port)
        .parse()
        .expect("addr")
}

/// The content of write number `k` (distinct for every write).
fn block(k: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    for (j, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ j as u64).to_le_bytes());
    }
    b
}

/// What a writer did: per block, the write number last acknowledged; failures.
#[derive(Default)]
struct Written {
    last: HashMap<u64, u64>,
    acked: u64,
    failed: Vec<(u64, u32)>,
    /// Acknowledged writes after `mark` was set.
    acked_after_mark: u64,
}

/// Writes 4 KiB blocks in order over `blocks` blocks (wrapping), starting at `first`, until
/// `stop`; every write is checked.
fn writer(
    addr: SocketAddr,
    first: u64,
    blocks: u64,
    stop: Arc<AtomicBool>,
    mark: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Written> {
    std::thread::spawn(move || {
        let (mut w, _) = Wire::open(addr, RESOURCE, false).expect("nbd connect");
        let mut out = Written::default();
        let mut k = first;
        while !stop.load(Ordering::SeqCst) {
            let b = k % blocks;
            match w.write_simple(k, b * BS, &block(k)) {
                Ok(0) => {
                    out.last.insert(b, k);
                    out.acked += 1;
                    if mark.load(Ordering::SeqCst) {
                        out.acked_after_mark += 1;
                    }
                }
                Ok(err) => out.failed.push((k, err)),
                Err(e) => panic!("nbd write {k}: {e}"),
            }
            k += 1;
        }
        let _ = w.disconnect();
        out
    })
}

/// Marks the moment (later acknowledgements count as `acked_after_mark`), lets the writer go
/// on for `more`, stops it, and checks that no write failed.
fn finish_writer(
    w: std::thread::JoinHandle<Written>,
    mark: &AtomicBool,
    stop: &AtomicBool,
    more: Duration,
    what: &str,
) -> Written {
    mark.store(true, Ordering::SeqCst);
    std::thread::sleep(more);
    stop.store(true, Ordering::SeqCst);
    let written = w.join().expect("writer");
    eprintln!(
        "{what}: writes acknowledged {} ({} after the mark), failed {}",
        written.acked,
        written.acked_after_mark,
        written.failed.len()
    );
    assert!(
        written.failed.is_empty(),
        "failed writes: {:?}",
        written.failed
    );
    written
}

/// Reads back every block the writer acknowledged through node `i`'s export.
fn verify_reads(c: &Cluster, i: usize, written: &Written) {
    let (mut w, _) = Wire::open(nbd_addr(c, i), RESOURCE, false).expect("nbd connect");
    for (cookie, (&b, &k)) in written.last.iter().enumerate() {
        match w
            .read_simple(cookie as u64, b * BS, BS as u32)
            .expect("nbd read")
        {
            Ok(data) => assert!(data == block(k), "block {b}: not write {k}"),
            Err(e) => panic!("read of block {b} failed with {e}"),
        }
    }
    let _ = w.disconnect();
}

fn wait_status(
    c: &Cluster,
    i: usize,
    timeout: Duration,
    cond: impl Fn(&serde_json::Value) -> bool,
    what: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = c.status(i);
        if cond(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:#}\nlog:\n{}",
            tail(&c.log(i), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reattaches node 0 and waits until its disk is UpToDate again; returns the attach status.
fn attach_and_resync(c: &Cluster) -> serde_json::Value {
    c.blockctl_ok(Some(0), &["attach", RESOURCE]);
    let st = wait_status(
        c,
        0,
        Duration::from_secs(180),
        |s| s["disk"] == "up-to-date" && s["attach"]["state"] == "done",
        "up-to-date after attach",
    );
    c.wait_synced(0, Duration::from_secs(60));
    st["attach"].clone()
}

#[test]
fn detach_on_eio_keeps_serving_and_attach_resyncs() {
    if !can_break_disks() {
        return;
    }
    let disk_dir = tempfile::tempdir().expect("tempdir");
    let disk = FailingDisk::start(disk_dir.path(), SIZE);
    let c = pair("detach", |_| disk.path.clone());
    let events = EventLog::start(&c, 0, "n0");

    // Detach refuses nothing here, but attach of an attached disk is refused (exit 3).
    let out = c.blockctl(Some(0), &["attach", RESOURCE]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let mark = Arc::new(AtomicBool::new(false));
    let blocks = 4096; // 16 MiB
    let w = writer(nbd_addr(&c, 0), 0, blocks, stop.clone(), mark.clone());
    std::thread::sleep(Duration::from_millis(1500));
    disk.break_now();
    let failed = events.wait_for("disk", "failed", Duration::from_secs(30));
    events.wait_for("error", "local disk failed", Duration::from_secs(30));
    let st = wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["disk"] == "diskless",
        "diskless",
    );
    let err = st["disk_error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("os error 5") || err.contains("Input/output"),
        "{st:#}"
    );
    assert_eq!(st["role"], "primary");
    assert_eq!(st["peers"][0]["disk"], "up-to-date", "{st:#}");
    let text = c.blockctl_ok(Some(0), &["status", RESOURCE]);
    assert!(
        text.contains("disk:diskless") && text.contains("disk-error:"),
        "{text}"
    );
    let written = finish_writer(
        w,
        &mark,
        &stop,
        Duration::from_secs(2),
        "EIO (after: Diskless)",
    );
    eprintln!("disk failed at {}", failed["time_ms"]);
    assert!(
        written.acked_after_mark > 0,
        "no write acknowledged while diskless"
    );
    // Reads come from the peer now: everything acknowledged, before and after the failure.
    verify_reads(&c, 0, &written);
    // Metrics and log name the state and the cause.
    assert!(
        c.log(0).contains("local disk failed"),
        "{}",
        tail(&c.log(0), 30)
    );

    disk.heal();
    let attach = attach_and_resync(&c);
    eprintln!("attach resync: {attach}");
    let fetched = attach["fetched_bytes"].as_u64().expect("fetched");
    assert!(fetched > 0, "{attach}");
    assert!(
        fetched <= (blocks + 256) * BS,
        "resync fetched more than the written range: {attach}"
    );
    c.assert_identical(1);
    verify_reads(&c, 0, &written);
}

/// Drops the cached pages of `path` (so reads reach the broken disk).
fn drop_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open backing");
    // SAFETY: posix_fadvise(2) on a file descriptor we own, for its whole length.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

#[test]
fn pass_on_returns_eio_and_stays_attached() {
    if !can_break_disks() {
        return;
    }
    let disk_dir = tempfile::tempdir().expect("tempdir");
    let disk = FailingDisk::start(disk_dir.path(), SIZE);
    let c = pair("pass-on", |_| disk.path.clone());
    let (mut w, _) = Wire::open(nbd_addr(&c, 0), RESOURCE, false).expect("nbd connect");
    assert_eq!(w.write_simple(1, 0, &block(1)).expect("write"), 0);
    disk.break_now();
    let err = w.write_simple(2, 8 * BS, &block(2)).expect("write");
    assert_eq!(err, 5, "EIO expected");
    // A read the page cache cannot answer fails too.
    drop_cache(&disk.path);
    match w.read_simple(5, 32 * BS, BS as u32).expect("read") {
        Ok(_) => panic!("read of a broken disk succeeded under pass-on"),
        Err(e) => assert_eq!(e, 5, "EIO expected"),
    }
    let st = c.status(0);
    assert_eq!(st["disk"], "up-to-date", "{st:#}");
    assert_eq!(st["role"], "primary");
    // The peer may have the new block and this disk not: it is out of sync, not diverged.
    assert!(
        st["peers"][0]["out_of_sync_bytes"].as_u64().unwrap_or(0) >= BS,
        "{st:#}"
    );
    disk.heal();
    assert_eq!(w.write_simple(3, 16 * BS, &block(3)).expect("write"), 0);
    match w.read_simple(4, 16 * BS, BS as u32).expect("read") {
        Ok(d) => assert!(d == block(3)),
        Err(e) => panic!("read failed: {e}"),
    }
    let _ = w.disconnect();
    assert!(c.log(0).contains("pass-on"), "{}", tail(&c.log(0), 20));
}

#[test]
fn full_backing_store_detaches_on_enospc() {
    if !can_break_disks() {
        return;
    }
    let fs_dir = tempfile::tempdir().expect("tempdir");
    let small = SmallFs::mount(&fs_dir.path().join("small"), "16m");
    let backing = small.dir.join("n0.img");
    let f = std::fs::File::create(&backing).expect("create sparse backing");
    f.set_len(SIZE).expect("size sparse backing");
    drop(f);
    let c = pair("detach", |_| backing.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mark = Arc::new(AtomicBool::new(false));
    // 24 MiB of distinct blocks: more than the filesystem holds.
    let blocks = 6144;
    let w = writer(nbd_addr(&c, 0), 0, blocks, stop.clone(), mark.clone());
    let st = wait_status(
        &c,
        0,
        Duration::from_secs(120),
        |s| s["disk"] == "diskless",
        "diskless after ENOSPC",
    );
    let err = st["disk_error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("os error 28") || err.contains("No space"),
        "{st:#}"
    );
    let written = finish_writer(
        w,
        &mark,
        &stop,
        Duration::from_secs(2),
        "ENOSPC (after: Diskless)",
    );
    verify_reads(&c, 0, &written);
    small.resize("128m");
    let attach = attach_and_resync(&c);
    eprintln!("attach resync after ENOSPC: {attach}");
    c.assert_identical(1);
}

#[test]
fn admin_detach_and_attach_of_both_roles() {
    // No broken store needed: `blockctl detach` on a healthy disk (internal metadata).
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = 32 << 20;
    let c = Cluster::start(&opts);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));

    // The Secondary detaches: it reports Diskless and stays connected; the Primary shows it
    // connected with disk diskless and tracks its writes in the bitmap; attach redoes the
    // handshake, which resyncs them.
    c.blockctl_ok(Some(1), &["detach", RESOURCE]);
    wait_status(
        &c,
        1,
        Duration::from_secs(30),
        |s| s["disk"] == "diskless" && s["peers"][0]["connection"] == "connected",
        "n1 diskless and connected",
    );
    wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["peers"][0]["connection"] == "connected" && s["peers"][0]["disk"] == "diskless",
        "n1 shown connected and diskless on n0",
    );
    c.write_random(0, 1 << 20, 2 << 20, 7);
    let st = wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["peers"][0]["out_of_sync_bytes"].as_u64().unwrap_or(0) >= 2 << 20,
        "writes tracked for the diskless Secondary",
    );
    assert_eq!(st["disk"], "up-to-date");
    assert_eq!(st["peers"][0]["connection"], "connected", "{st:#}");
    assert_eq!(st["peers"][0]["replication"], "established", "{st:#}");
    // Detaching again is refused (exit 3); so is promoting a diskless node.
    assert_eq!(
        c.blockctl(Some(1), &["detach", RESOURCE]).status.code(),
        Some(3)
    );
    c.blockctl_ok(Some(1), &["attach", RESOURCE]);
    c.wait_synced(0, Duration::from_secs(120));
    wait_status(
        &c,
        1,
        Duration::from_secs(30),
        |s| s["disk"] == "up-to-date",
        "n1 up-to-date",
    );
    c.assert_identical(0);

    // The Primary detaches: it keeps serving through n1; writes while diskless are fetched by
    // the resync after attach.
    c.blockctl_ok(Some(0), &["detach", RESOURCE]);
    wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["disk"] == "diskless",
        "n0 diskless",
    );
    c.write_random(0, 4 << 20, 1 << 20, 8);
    let (mut w, _) = Wire::open(nbd_addr(&c, 0), RESOURCE, false).expect("nbd connect");
    match w.read_simple(1, 4 << 20, 4096).expect("read") {
        Ok(d) => assert_eq!(d, c.read_backing(1, 4 << 20, 4096)),
        Err(e) => panic!("read through the peer failed: {e}"),
    }
    // Without a connected UpToDate peer a Diskless Primary fails I/O with EIO; once the peer
    // is back it serves again.
    c.blockctl_ok(Some(0), &["disconnect", RESOURCE]);
    wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["peers"][0]["connection"] == "standalone",
        "n0 standalone",
    );
    assert_eq!(w.write_simple(2, 8 << 20, &block(2)).expect("write"), 5);
    match w.read_simple(3, 4 << 20, 4096).expect("read") {
        Ok(_) => panic!("a Diskless Primary without peers served a read"),
        Err(e) => assert_eq!(e, 5),
    }
    c.blockctl_ok(Some(0), &["connect", RESOURCE]);
    wait_status(
        &c,
        0,
        Duration::from_secs(60),
        |s| s["peers"][0]["replication"] == "established" && s["peers"][0]["disk"] == "up-to-date",
        "n0 connected again",
    );
    assert_eq!(w.write_simple(4, 8 << 20, &block(4)).expect("write"), 0);
    let _ = w.disconnect();
    let attach = attach_and_resync(&c);
    eprintln!("attach after admin detach: {attach}");
    assert_eq!(
        attach["fetched_bytes"].as_u64(),
        Some((1 << 20) + BS),
        "{attach}"
    );
    c.assert_identical(1);
}

#[test]
fn secondary_eio_detaches_and_is_resynced_after_attach() {
    if !can_break_disks() {
        return;
    }
    let disk_dir = tempfile::tempdir().expect("tempdir");
    let disk = FailingDisk::start(disk_dir.path(), SIZE);
    let c = pair_on("detach", 1, |_| disk.path.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mark = Arc::new(AtomicBool::new(false));
    let blocks = 2048;
    let w = writer(nbd_addr(&c, 0), 0, blocks, stop.clone(), mark.clone());
    std::thread::sleep(Duration::from_millis(1000));
    disk.break_now();
    let st = wait_status(
        &c,
        1,
        Duration::from_secs(30),
        |s| s["disk"] == "diskless",
        "the Secondary diskless",
    );
    assert!(
        st["disk_error"]
            .as_str()
            .is_some_and(|e| e.contains("failed")),
        "{st:#}"
    );
    // The Primary stops counting it: its writes go into the bitmap.
    wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["peers"][0]["out_of_sync_bytes"].as_u64().unwrap_or(0) > 0,
        "writes tracked for the diskless Secondary",
    );
    let written = finish_writer(w, &mark, &stop, Duration::from_secs(1), "Secondary failure");
    assert!(written.acked_after_mark > 0);
    assert_eq!(c.status(0)["disk"], "up-to-date");
    disk.heal();
    c.blockctl_ok(Some(1), &["attach", RESOURCE]);
    c.wait_synced(0, Duration::from_secs(120));
    wait_status(
        &c,
        1,
        Duration::from_secs(30),
        |s| s["disk"] == "up-to-date",
        "the Secondary up-to-date",
    );
    c.assert_identical(0);
    verify_reads(&c, 0, &written);
}

#[test]
fn read_error_detaches_and_the_read_completes_through_the_peer() {
    if !can_break_disks() {
        return;
    }
    let disk_dir = tempfile::tempdir().expect("tempdir");
    let disk = FailingDisk::start(disk_dir.path(), SIZE);
    let c = pair("detach", |_| disk.path.clone());
    let (mut w, _) = Wire::open(nbd_addr(&c, 0), RESOURCE, false).expect("nbd connect");
    assert_eq!(w.write_simple(1, 40 * BS, &block(41)).expect("write"), 0);
    disk.break_now();
    drop_cache(&disk.path);
    // The first request to see the failure is a read: it is answered by the peer, correctly.
    match w.read_simple(2, 40 * BS, BS as u32).expect("read") {
        Ok(d) => assert!(d == block(41), "wrong data through the peer"),
        Err(e) => panic!("the read that hit the error failed with {e}"),
    }
    let st = c.status(0);
    assert_eq!(st["disk"], "diskless", "{st:#}");
    let _ = w.disconnect();
}

/// The data a block may hold after `written`: its last acknowledged write, or a later write
/// that failed (a write in flight when the link dropped may have reached the peer anyway).
fn allowed_contents(written: &Written) -> HashMap<u64, Vec<u64>> {
    let mut allowed: HashMap<u64, Vec<u64>> =
        written.last.iter().map(|(&b, &k)| (b, vec![k])).collect();
    for &(k, _) in &written.failed {
        if let Some(v) = allowed.get_mut(&(k % 256)) {
            if k > v[0] {
                v.push(k);
            }
        }
    }
    allowed
}

/// Reads every block in `allowed` through node `i`'s export and checks it holds one of them.
fn verify_allowed(c: &Cluster, i: usize, allowed: &HashMap<u64, Vec<u64>>) {
    let (mut w, _) = Wire::open(nbd_addr(c, i), RESOURCE, false).expect("nbd connect");
    for (cookie, (&b, ks)) in allowed.iter().enumerate() {
        match w
            .read_simple(cookie as u64, b * BS, BS as u32)
            .expect("nbd read")
        {
            Ok(data) => assert!(
                ks.iter().any(|&k| data == block(k)),
                "block {b}: none of the writes {ks:?} (acknowledged write lost)"
            ),
            Err(e) => panic!("read of block {b} failed with {e}"),
        }
    }
    let _ = w.disconnect();
}

/// A Diskless Primary that loses its only peer counts as a crashed Primary and has blocks
/// marked for the peer (writes in flight at the loss); its detached store still holds the
/// data of before the detach. When the peer comes back, the Primary must not be the resync
/// source (it would send that stale data over writes acknowledged while Diskless): no resync
/// in either direction, the peer's data serves, nothing acknowledged is lost, and after attach
/// both copies are identical.
#[test]
fn diskless_primary_that_lost_its_peer_is_never_a_resync_source() {
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = 32 << 20;
    let c = Cluster::start(&opts);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));
    // Old contents on both disks, so a stale copy differs from every acknowledged write.
    c.write_random(0, 0, 1 << 20, 3);
    c.blockctl_ok(Some(0), &["detach", RESOURCE]);
    wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["disk"] == "diskless",
        "n0 diskless",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mark = Arc::new(AtomicBool::new(false));
    let w = writer(nbd_addr(&c, 0), 1, 256, stop.clone(), mark.clone());
    std::thread::sleep(Duration::from_millis(1500));
    // The peer leaves while writes are in flight: they fail (EIO) from then on.
    c.blockctl_ok(Some(1), &["disconnect", RESOURCE]);
    wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["peers"][0]["connection"] != "connected",
        "n0 lost its peer",
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let written = w.join().expect("writer");
    eprintln!(
        "Diskless Primary: {} writes acknowledged, {} failed after the peer left",
        written.acked,
        written.failed.len()
    );
    assert!(written.acked > 0);
    assert!(
        written.failed.iter().all(|&(_, e)| e == 5),
        "{:?}",
        written.failed
    );
    assert!(!written.failed.is_empty(), "no write failed without a peer");

    c.blockctl_ok(Some(1), &["connect", RESOURCE]);
    wait_status(
        &c,
        0,
        Duration::from_secs(60),
        |s| s["peers"][0]["replication"] == "established" && s["peers"][0]["disk"] == "up-to-date",
        "n0 serving through n1 again",
    );
    let log = c.log(0);
    assert!(
        log.contains("NoDiskSelf"),
        "handshake rule: {}",
        tail(&log, 30)
    );
    assert_eq!(c.status(1)["disk"], "up-to-date");
    let allowed = allowed_contents(&written);
    verify_allowed(&c, 0, &allowed);
    // The peer's own disk (a Secondary has no export) holds them too.
    for (&b, ks) in &allowed {
        let data = c.read_backing(1, b * BS, BS);
        assert!(
            ks.iter().any(|&k| data == block(k)),
            "n1 block {b}: none of {ks:?}"
        );
    }
    attach_and_resync(&c);
    c.assert_identical(0);
    verify_allowed(&c, 0, &allowed);
}

/// A backing store that fails reads while blockd starts: the resource comes up Diskless (status
/// shows the error, the Primary tracks its writes), `blockctl attach` is refused while the disk
/// still fails and works once it is healed, and the resync makes both copies identical. A
/// foreign metadata area is still refused at start with a clear error (not a disk failure).
#[test]
fn disk_failing_at_start_comes_up_diskless_and_attaches_later() {
    if !can_break_disks() {
        return;
    }
    let disk_dir = tempfile::tempdir().expect("tempdir");
    let disk = FailingDisk::start(disk_dir.path(), SIZE);
    let mut c = pair_on("detach", 1, |_| disk.path.clone());
    c.stop(1);
    disk.break_now();
    drop_cache(&disk.path);
    c.start_node(1);
    let st = wait_status(
        &c,
        1,
        Duration::from_secs(30),
        |s| s["disk"] == "diskless",
        "n1 diskless at start",
    );
    assert!(
        st["disk_error"]
            .as_str()
            .is_some_and(|e| e.contains("failed at start")),
        "{st:#}"
    );
    // The Primary goes on; its writes are tracked for n1.
    c.write_random(0, 2 << 20, 1 << 20, 11);
    wait_status(
        &c,
        0,
        Duration::from_secs(30),
        |s| s["peers"][0]["out_of_sync_bytes"].as_u64().unwrap_or(0) >= 1 << 20,
        "writes tracked for n1",
    );
    // Attach while the disk still fails: refused with the error, still Diskless.
    let out = c.blockctl(Some(1), &["attach", RESOURCE]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed"),
        "{out:?}"
    );
    assert_eq!(c.status(1)["disk"], "diskless");
    disk.heal();
    c.blockctl_ok(Some(1), &["attach", RESOURCE]);
    c.wait_synced(0, Duration::from_secs(120));
    wait_status(
        &c,
        1,
        Duration::from_secs(30),
        |s| s["disk"] == "up-to-date",
        "n1 up-to-date",
    );
    c.assert_identical(0);

    // Foreign metadata (n1's external metadata overwritten) is refused at start.
    c.stop(1);
    let meta = c.dir.path().join("n1.meta");
    let len = std::fs::metadata(&meta).expect("meta").len();
    std::fs::write(&meta, vec![0x5au8; len as usize]).expect("overwrite metadata");
    let err_path = c.dir.path().join("n1-foreign.log");
    let err = std::fs::File::create(&err_path).expect("log");
    let mut child = std::process::Command::new(integration_tests::blockd_bin())
        .arg("--config")
        .arg(&c.config)
        .args(["--node", &c.nodes[1].name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .expect("run blockd");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("blockd kept running on foreign metadata");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(!status.success(), "started on foreign metadata: {text}");
    assert!(text.contains("not blockd metadata"), "{text}");
}

/// A backing file that disappeared while its (external) metadata remains is refused at start:
/// opening it would create an empty file and the node would come up "consistent" on zeros.
#[test]
fn a_missing_backing_with_existing_metadata_is_refused_at_start() {
    let mut c = pair("detach", |dir| dir.join("n0.img"));
    c.stop(1);
    std::fs::remove_file(&c.nodes[1].backing).expect("remove n1's backing");
    let out = integration_tests::run_timeout(
        std::process::Command::new(integration_tests::blockd_bin())
            .arg("--config")
            .arg(&c.config)
            .args(["--node", &c.nodes[1].name]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its backing: {text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(
        !c.nodes[1].backing.exists(),
        "blockd created an empty backing file"
    );
}
