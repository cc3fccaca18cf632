//! Readable secondaries (`blockctl snapshot`): while a python3-libnbd writer keeps issuing
//! self-describing 4 KiB writes through NBD on the Primary, a snapshot opened on the Secondary
//! reads back identical bytes twice, minutes apart; every block in it is a version the writer
//! issued, whole (no torn or mixed block), and at least as new as what was acknowledged before
//! the snapshot was asked for (protocol C); after it is dropped the copies are identical. Also:
//! a full copy-on-write area invalidates the snapshot (readers get an error, replication goes
//! on), a clean restart of the Secondary keeps a snapshot, and the Primary refuses snapshots.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::fs_stack::FsStack;
use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE};
use integration_tests::{
    ChildGuard, debian_python, require_tool, run_ok, run_timeout, workspace_root,
};

const BS: usize = 4096;
const MAGIC: u64 = 0x534E_4150_424C_4B44;
/// The writer covers the first 16 MiB of the 64 MiB device.
const BLOCKS: usize = 4096;

/// Seconds between the two reads of the snapshot (the issue asks for "minutes apart").
fn gap() -> Duration {
    let secs = std::env::var("SNAPSHOT_TEST_GAP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// Copies the whole export at `uri` into a file and returns its bytes.
fn read_export(uri: &str, dir: &Path, name: &str) -> Vec<u8> {
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let out_path = dir.join(name);
    let out = run_timeout(
        Command::new(nbdcopy).arg(uri).arg(&out_path),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "nbdcopy {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&out_path).unwrap()
}

/// The NBD URI `blockctl snapshot` printed.
fn uri_of(out: &str) -> String {
    out.split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no nbd:// URI in {out:?}"))
        .to_string()
}

/// `(idx, version)` of a whole self-describing block, `None` for a never-written (zero) block;
/// panics on a torn or foreign block.
fn decode_block(i: usize, b: &[u8]) -> Option<(u64, u64)> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let rec = &b[..32];
    assert!(
        b.chunks(32).all(|c| c == rec),
        "block {i} is torn or mixed (its 32-byte records differ)"
    );
    let w = |k: usize| u64::from_le_bytes(rec[k * 8..k * 8 + 8].try_into().unwrap());
    assert_eq!(w(0), MAGIC, "block {i} is not a writer block");
    assert_eq!(w(3), MAGIC ^ w(1) ^ w(2), "block {i} fails its check word");
    assert_eq!(w(1), i as u64, "block {i} holds block {}'s data", w(1));
    Some((w(1), w(2)))
}

#[test]
fn a_snapshot_stays_frozen_while_replication_goes_on() {
    let python = debian_python();
    let c = Cluster::start(&ClusterOptions::new(2, "C"));
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(60));
    let log = c.dir.path().join("writer.json");
    let script = workspace_root().join("tests/scripts/snapshot_writer.py");
    let mut writer = ChildGuard(
        Command::new(&python)
            .arg(&script)
            .arg(c.nbd_uri(0))
            .arg(BLOCKS.to_string())
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the writer"),
    );
    let mut lines = BufReader::new(writer.0.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "WRITING");
    std::thread::sleep(Duration::from_secs(1));
    // Everything acknowledged before this mark is on the Secondary (protocol C).
    let pid = writer.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-USR1", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(200));
    let out = c.blockctl_ok(
        Some(1),
        &["snapshot", RESOURCE, "--name", "s1", "--cow-size", "64M"],
    );
    let uri = uri_of(&out);
    println!("{}", out.trim());

    let first = read_export(&uri, c.dir.path(), "snap-1.img");
    assert_eq!(first.len() as u64, c.data_size());
    let gap = gap();
    println!("reading the snapshot again in {gap:?} while the writer goes on");
    std::thread::sleep(gap);
    let st = c.status(1);
    let snaps = st["snapshots"].as_array().expect("snapshots in status");
    assert_eq!(snaps.len(), 1, "{st}");
    let cow_used = snaps[0]["cow_used_bytes"].as_u64().unwrap();
    assert!(cow_used > 0, "the writer overwrote frozen blocks: {st}");
    assert!(snaps[0].get("invalid").is_none(), "{st}");
    let second = read_export(&uri, c.dir.path(), "snap-2.img");
    assert!(first == second, "the snapshot changed between two reads");

    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(lines.next().unwrap().unwrap(), "DONE");
    let _ = writer.0.wait();
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    let issued: HashSet<(u64, u64)> = log["issued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect();
    let before: HashMap<u64, u64> = log["before"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
        .collect();
    assert!(
        !before.is_empty(),
        "writes were acknowledged before the snapshot"
    );
    let mut written = 0;
    for (i, b) in first.chunks(BS).enumerate() {
        match decode_block(i, b) {
            Some(v) => {
                assert!(i < BLOCKS, "block {i} is outside the writer's range");
                assert!(issued.contains(&v), "block {i} holds {v:?}, never issued");
                written += 1;
                if let Some(&acked) = before.get(&(i as u64)) {
                    assert!(
                        v.1 >= acked,
                        "block {i} holds version {} but {acked} was acknowledged before the snapshot",
                        v.1
                    );
                }
            }
            None => assert!(
                !before.contains_key(&(i as u64)),
                "block {i} is empty but was acknowledged before the snapshot"
            ),
        }
    }
    println!(
        "snapshot: {written} written blocks, all whole and issued; {} writes acknowledged in all; \
         copy-on-write area used {cow_used} bytes",
        log["acked"]
    );

    c.blockctl_ok(Some(1), &["snapshot", RESOURCE, "--drop", "s1"]);
    assert!(c.status(1).get("snapshots").is_none());
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let out = run_timeout(Command::new(nbdinfo).arg(&uri), Duration::from_secs(30));
    assert!(
        !out.status.success(),
        "the dropped snapshot is no longer served"
    );
    c.wait_synced(0, Duration::from_secs(60));
    c.assert_identical(0);
}

#[test]
fn a_full_area_invalidates_the_snapshot_and_replication_goes_on() {
    let c = Cluster::start(&ClusterOptions::new(2, "C"));
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(60));
    c.write_random(0, 0, 1 << 20, 1);
    c.wait_synced(0, Duration::from_secs(60));
    let out = c.blockctl_ok(
        Some(1),
        &["snapshot", RESOURCE, "--name", "small", "--cow-size", "1M"],
    );
    let uri = uri_of(&out);
    // 1 MiB of area holds 252 blocks of 4 KiB: 2 MiB of overwrites cannot fit.
    c.write_random(0, 0, 2 << 20, 2);
    c.wait_synced(0, Duration::from_secs(60));
    let st = c.status(1);
    let why = st["snapshots"][0]["invalid"]
        .as_str()
        .unwrap_or_else(|| panic!("{st}"));
    assert!(why.contains("full"), "{why}");
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let out = run_timeout(
        Command::new(nbdcopy)
            .arg(&uri)
            .arg(c.dir.path().join("x.img")),
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success(),
        "reading an invalidated snapshot fails"
    );
    c.assert_identical(0);
    c.blockctl_ok(Some(1), &["snapshot", RESOURCE, "--drop", "small"]);
}

#[test]
fn a_snapshot_survives_a_clean_restart_and_the_primary_refuses_one() {
    let mut c = Cluster::start(&ClusterOptions::new(2, "C"));
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(60));
    c.write_random(0, 0, 1 << 20, 3);
    c.wait_synced(0, Duration::from_secs(60));
    let refused = c.blockctl(Some(0), &["snapshot", RESOURCE]);
    assert_eq!(
        refused.status.code(),
        Some(3),
        "the Primary refuses: {refused:?}"
    );
    let out = c.blockctl_ok(Some(1), &["snapshot", RESOURCE, "--name", "keep"]);
    let uri = uri_of(&out);
    let before = read_export(&uri, c.dir.path(), "a.img");
    c.stop(1);
    c.write_random(0, 0, 1 << 20, 4);
    c.start_node(1);
    c.wait_synced(0, Duration::from_secs(60));
    let after = read_export(&uri, c.dir.path(), "b.img");
    assert!(
        before == after,
        "the snapshot changed across a restart and a resync"
    );
    c.blockctl_ok(Some(1), &["snapshot", RESOURCE, "--drop", "keep"]);
    c.assert_identical(0);
}

/// Checks a snapshot image of ext4: `e2fsck -fn` as frozen must be clean when `clean_as_is`;
/// otherwise at most a journal replay (done on the image, a scratch copy) is needed, after which
/// `e2fsck -fn` is clean. Every fsynced file must read back identical (debugfs).
fn check_ext4_image(img: &Path, files: &[(String, Vec<u8>)], clean_as_is: bool) -> String {
    let e2fsck = require_tool("e2fsck", "e2fsprogs");
    let debugfs = require_tool("debugfs", "e2fsprogs");
    let t = Duration::from_secs(120);
    let raw = run_timeout(Command::new(&e2fsck).args(["-f", "-n"]).arg(img), t);
    let raw_text = format!(
        "{}{}",
        String::from_utf8_lossy(&raw.stdout),
        String::from_utf8_lossy(&raw.stderr)
    );
    if clean_as_is {
        assert!(
            raw.status.success(),
            "e2fsck -fn on the snapshot: {}\n{raw_text}",
            raw.status
        );
    } else {
        let replay = run_timeout(Command::new(&e2fsck).arg("-p").arg(img), t);
        assert!(
            matches!(replay.status.code(), Some(0 | 1)),
            "journal replay of the snapshot failed ({}): {}{}",
            replay.status,
            String::from_utf8_lossy(&replay.stdout),
            String::from_utf8_lossy(&replay.stderr)
        );
        let after = run_timeout(Command::new(&e2fsck).args(["-f", "-n"]).arg(img), t);
        assert!(
            after.status.success(),
            "e2fsck -fn after journal replay found problems ({}):\n{}{}",
            after.status,
            String::from_utf8_lossy(&after.stdout),
            String::from_utf8_lossy(&after.stderr)
        );
    }
    for (name, data) in files {
        let dump = img.with_extension(format!("{name}.dump"));
        run_ok(
            Command::new(&debugfs)
                .arg("-R")
                .arg(format!("dump /{name} {}", dump.display()))
                .arg(img),
            t,
        );
        assert!(
            std::fs::read(&dump).unwrap() == *data,
            "{name} differs in the snapshot"
        );
    }
    format!("e2fsck -fn as frozen: {}", raw.status)
}

/// ext4 mounted on the Primary (nbdfuse + loop), files written and fsynced, a writer still
/// appending. (1) `blockctl snapshot --consistent` on the Secondary while the filesystem is busy:
/// the image is what a power cut would leave — at most a journal replay, then `e2fsck -fn` is
/// clean. (2) With the filesystem frozen on the Primary (`fsfreeze -f`, the way to get a clean
/// image of a mounted filesystem, as with LVM snapshots): `e2fsck -fn` of the snapshot as it is
/// is clean. Both times every fsynced file reads back identical.
#[test]
fn a_consistent_snapshot_of_a_mounted_ext4_is_clean() {
    let c = Cluster::start(&ClusterOptions::new(2, "C"));
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(60));
    let work = c.dir.path().join("fs");
    std::fs::create_dir_all(&work).unwrap();
    let mut fs = FsStack::new(&c.nbd_uri(0), &work);
    let dev = fs.attach_loop();
    run_ok(
        Command::new(require_tool("mkfs.ext4", "e2fsprogs")).args(["-q", "-F", &dev]),
        Duration::from_secs(120),
    );
    let mnt = work.join("mnt");
    fs.mount(&mnt);
    let mut files = Vec::new();
    for i in 0..20usize {
        let data: Vec<u8> = (0..(4096 * (i + 1)))
            .map(|k| (k * 31 + i * 7) as u8)
            .collect();
        let path = mnt.join(format!("f{i}.bin"));
        std::fs::write(&path, &data).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        files.push((format!("f{i}.bin"), data));
    }
    let busy = mnt.join("busy.log");
    let mut appender = ChildGuard(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "i=0; while :; do echo line $i >> {0}; i=$((i+1)); [ $((i % 50)) -eq 0 ] && sync {0}; done",
                busy.display()
            ))
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));

    let out = c.blockctl_ok(
        Some(1),
        &["snapshot", RESOURCE, "--consistent", "--name", "busy"],
    );
    read_export(&uri_of(&out), c.dir.path(), "busy.img");
    let busy_report = check_ext4_image(&c.dir.path().join("busy.img"), &files, false);

    let fsfreeze = require_tool("fsfreeze", "util-linux");
    run_ok(
        Command::new(&fsfreeze).arg("-f").arg(&mnt),
        Duration::from_secs(60),
    );
    let out = c.blockctl(
        Some(1),
        &["snapshot", RESOURCE, "--consistent", "--name", "frozen"],
    );
    run_ok(
        Command::new(&fsfreeze).arg("-u").arg(&mnt),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "snapshot of the frozen fs: {out:?}");
    let uri = uri_of(&String::from_utf8_lossy(&out.stdout));
    let _ = appender.0.kill();
    let _ = appender.0.wait();
    read_export(&uri, c.dir.path(), "frozen.img");
    check_ext4_image(&c.dir.path().join("frozen.img"), &files, true);
    println!(
        "busy ext4: {busy_report}, clean after journal replay; frozen ext4: e2fsck -fn clean as is; \
         {} fsynced files intact in both",
        files.len()
    );
    fs.umount();
    fs.detach_loop();
    drop(fs);
    for name in ["busy", "frozen"] {
        c.blockctl_ok(Some(1), &["snapshot", RESOURCE, "--drop", name]);
    }
}
