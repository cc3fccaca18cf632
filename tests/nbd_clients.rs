//! Real Debian NBD clients against `blockd standalone`: nbdinfo, qemu-io, qemu-img, nbdcopy, an nbdsh
//! (python3-libnbd) script, fio's nbd engine, the Unix-socket listener and graceful SIGTERM under load.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    Blockd, BlockdOptions, ChildGuard, TestRng, debian_python, file_checksum, require_tool, run_ok,
    run_timeout, scripts_dir, write_random_file,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

fn nbdinfo_json(args: &[&str]) -> Value {
    let out = run_ok(
        Command::new(require_tool("nbdinfo", "libnbd-bin"))
            .arg("--json")
            .args(args),
        T,
    );
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e}):\n{out}"))
}

/// Runs qemu-io with `-c` commands against `uri`; fails on a non-zero exit or any failure line.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new(require_tool("qemu-io", "qemu-utils"));
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run_ok(&mut cmd, T);
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error"),
        "qemu-io reported a failure for {cmds:?}:\n{out}"
    );
    out
}

/// Extents from `nbdinfo --map --json` as (offset, length, type).
fn map_extents(uri: &str) -> Vec<(u64, u64, u64)> {
    let v = nbdinfo_json(&["--map", uri]);
    v.as_array()
        .expect("--map --json gives an array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The allocation type (0 = data, 3 = hole+zero...) of every byte in [off, off+len) must satisfy `pred`.
fn assert_range_type(
    extents: &[(u64, u64, u64)],
    off: u64,
    len: u64,
    pred: impl Fn(u64) -> bool,
    what: &str,
) {
    for &(o, l, t) in extents {
        if o < off + len && o + l > off {
            assert!(
                pred(t),
                "range {off}+{len} should be {what}, but extent {o}+{l} has type {t}: {extents:?}"
            );
        }
    }
}

#[test]
fn nbdinfo_shows_size_name_description_flags_and_block_sizes() {
    let server = Blockd::start_with(BlockdOptions {
        size: Some(96 * MIB),
        export: Some("disk0".into()),
        description: Some("integration test export".into()),
        ..Default::default()
    });
    let v = nbdinfo_json(&[&server.uri()]);
    assert_eq!(v["protocol"], "newstyle-fixed", "{v:#}");
    assert_eq!(v["structured"], true, "{v:#}");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk0", "{v:#}");
    assert_eq!(e["description"], "integration test export", "{v:#}");
    assert_eq!(e["export-size"], 96 * MIB, "{v:#}");
    assert_eq!(e["is_read_only"], false, "{v:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        assert_eq!(e[flag], true, "{flag} in {v:#}");
    }
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{v:#}");
    let min = e["block_size_minimum"]
        .as_u64()
        .expect("block_size_minimum");
    let pref = e["block_size_preferred"]
        .as_u64()
        .expect("block_size_preferred");
    let max = e["block_size_maximum"]
        .as_u64()
        .expect("block_size_maximum");
    assert_eq!(min, 1, "any alignment down to 1 byte: {v:#}");
    assert!(pref.is_power_of_two() && pref >= 512, "{v:#}");
    assert!(max >= 64 * MIB, "single requests of at least 64 MiB: {v:#}");

    let size = run_ok(
        Command::new(require_tool("nbdinfo", "libnbd-bin")).args(["--size", &server.uri()]),
        T,
    );
    assert_eq!(size.trim(), (96 * MIB).to_string());
    server.stop();
}

#[test]
fn nbdinfo_list_shows_the_export() {
    let server = Blockd::start_with(BlockdOptions {
        export: Some("listed".into()),
        description: Some("listed export".into()),
        ..Default::default()
    });
    let v = nbdinfo_json(&["--list", &format!("nbd://{}", server.addr())]);
    let exports = v["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1, "{v:#}");
    assert_eq!(exports[0]["export-name"], "listed", "{v:#}");
    assert_eq!(exports[0]["description"], "listed export", "{v:#}");
    assert_eq!(exports[0]["export-size"], server.size, "{v:#}");
    server.stop();
}

#[test]
fn nbdinfo_map_shows_data_and_holes_on_a_sparse_export() {
    let server = Blockd::start();
    let uri = server.uri();
    let fresh = map_extents(&uri);
    assert_eq!(
        fresh.iter().map(|e| e.1).sum::<u64>(),
        server.size,
        "{fresh:?}"
    );
    assert_range_type(
        &fresh,
        0,
        server.size,
        |t| t & 1 == 1,
        "a hole on a fresh sparse export",
    );

    qemu_io(
        &uri,
        &[
            "write -P 0xab 1M 64k",
            "write -P 0x01 20M 128k",
            "write -P 0x7f 63M 1M",
            "flush",
        ],
    );
    let map = map_extents(&uri);
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), server.size, "{map:?}");
    let mut expect_off = 0;
    for &(o, l, _) in &map {
        assert_eq!(o, expect_off, "extents must be contiguous: {map:?}");
        expect_off = o + l;
    }
    assert_range_type(&map, MIB, 64 << 10, |t| t == 0, "data");
    assert_range_type(&map, 20 * MIB, 128 << 10, |t| t == 0, "data");
    assert_range_type(&map, 63 * MIB, MIB, |t| t == 0, "data");
    assert_range_type(&map, 4 * MIB, 12 * MIB, |t| t == 3, "hole,zero");
    assert_range_type(&map, 30 * MIB, 30 * MIB, |t| t == 3, "hole,zero");

    // Discard (punch hole) turns a data range back into a hole.
    qemu_io(&uri, &["discard 20M 128k", "read -P 0 20M 128k"]);
    let map = map_extents(&uri);
    assert_range_type(
        &map,
        20 * MIB,
        128 << 10,
        |t| t == 3,
        "hole,zero after discard",
    );
    server.stop();
}

#[test]
fn qemu_io_patterns_zeroes_discard_and_aio() {
    let server = Blockd::start();
    let uri = server.uri();
    qemu_io(
        &uri,
        &[
            // odd offsets and lengths, down to 1 byte
            "write -P 0x5a 1 4097",
            "read -P 0x5a 1 4097",
            "read -P 0 0 1",
            "read -P 0 4098 1",
            "write -P 0x11 12345 1",
            "read -P 0x11 12345 1",
            "read -P 0 12344 1",
            "read -P 0 12346 1",
            "write -P 0x33 1000001 777777",
            "read -P 0x33 1000001 777777",
            "read -P 0 1000000 1",
            "read -P 0 1777778 1",
            // write -z (may punch) and write -z -u (unmap allowed) over existing data
            "write -P 0x44 3M 1M",
            "write -z 3M 512k",
            "read -P 0 3M 512k",
            "read -P 0x44 3584k 512k",
            "write -P 0x45 5M 1M",
            "write -z -u 5M 1M",
            "read -P 0 5M 1M",
            "write -P 0x46 7M 8193",
            "write -z 7M 4097",
            "read -P 0 7M 4097",
            "read -P 0x46 7344129 4096",
            // discard then read zeroes
            "write -P 0x66 9M 2M",
            "discard 9M 2M",
            "read -P 0 9M 2M",
            // an aio pipeline: many writes in flight, then flush and verify
            "aio_write -P 0x71 16M 64k",
            "aio_write -P 0x72 16448k 64k",
            "aio_write -P 0x73 16512k 64k",
            "aio_write -P 0x74 16576k 64k",
            "aio_write -P 0x75 17M 1M",
            "aio_write -P 0x76 18M 3",
            "aio_flush",
            "read -P 0x71 16M 64k",
            "read -P 0x72 16448k 64k",
            "read -P 0x73 16512k 64k",
            "read -P 0x74 16576k 64k",
            "read -P 0x75 17M 1M",
            "read -P 0x76 18M 3",
            "read -P 0 18874371 1",
        ],
    );
    // A second connection sees the same data; `write -P` + FUA.
    qemu_io(
        &uri,
        &[
            "read -P 0x5a 1 4097",
            "write -f -P 0x99 60M 4k",
            "read -P 0x99 60M 4k",
        ],
    );
    server.stop();
}

/// A random file with some all-zero MiB stretches (so converters use zero/trim requests too).
fn random_image(path: &Path, size: u64, seed: u64) {
    write_random_file(path, size, seed);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let zeros = vec![0u8; MIB as usize];
    let mut rng = TestRng::new(seed ^ 0xfeed);
    for _ in 0..(size / MIB / 4).max(1) {
        let at = rng.below(size / MIB) * MIB;
        f.seek(SeekFrom::Start(at)).unwrap();
        std::io::Write::write_all(&mut f, &zeros).unwrap();
    }
}

#[test]
fn qemu_img_convert_round_trip() {
    let size = 32 * MIB;
    let server = Blockd::start_with(BlockdOptions {
        size: Some(size),
        ..Default::default()
    });
    let src = server.dir().join("src.img");
    let out = server.dir().join("out.img");
    random_image(&src, size, 1);
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(server.uri()),
        T,
    );
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(server.uri())
            .arg(&out),
        T,
    );
    assert_eq!(file_checksum(&src), file_checksum(&out));
    let cmp = run_timeout(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(server.uri()),
        T,
    );
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    server.stop();
}

#[test]
fn nbdcopy_round_trips_small_and_large_multi_conn() {
    let size = 160 * MIB;
    let server = Blockd::start_with(BlockdOptions {
        size: Some(size),
        ..Default::default()
    });
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let src = server.dir().join("src.img");
    let out = server.dir().join("out.img");

    // Default settings, small image region: file -> export -> file.
    let small = server.dir().join("small.img");
    let small_out = server.dir().join("small-out.img");
    random_image(&small, size, 2);
    run_ok(Command::new(&nbdcopy).arg(&small).arg(server.uri()), T);
    run_ok(Command::new(&nbdcopy).arg(server.uri()).arg(&small_out), T);
    assert_eq!(file_checksum(&small), file_checksum(&small_out));

    // Large requests (32 MiB, nbdcopy's maximum), 4 connections (multi-conn), 160 MiB.
    random_image(&src, size, 3);
    let started = Instant::now();
    run_ok(
        Command::new(&nbdcopy)
            .args([
                "--request-size=33554432",
                "--connections=4",
                "--requests=16",
                "--flush",
            ])
            .arg(&src)
            .arg(server.uri()),
        T,
    );
    let up = started.elapsed();
    let started = Instant::now();
    run_ok(
        Command::new(&nbdcopy)
            .args([
                "--request-size=33554432",
                "--connections=4",
                "--requests=16",
            ])
            .arg(server.uri())
            .arg(&out),
        T,
    );
    let down = started.elapsed();
    eprintln!("nbdcopy 160 MiB: upload {up:?}, download {down:?}");
    assert_eq!(file_checksum(&src), file_checksum(&out));
    // The backing file holds exactly the same bytes.
    assert_eq!(file_checksum(&src), file_checksum(&server.backing));
    server.stop();
}

/// On a tmpfs backing, a large WRITE over pages that exist is received straight into the file
/// (blockd/src/store/mapped.rs). nbdcopy fills the export (the first pass allocates every
/// page), then overwrites all of it twice with other data: over TCP with 1 MiB requests and
/// over the Unix socket with 256 KiB ones. Each time the backing file and a copy read back
/// through NBD hold exactly the new image.
#[test]
fn large_overwrites_of_a_tmpfs_backing_are_exact() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIP large_overwrites_of_a_tmpfs_backing_are_exact: no /dev/shm");
        return;
    }
    // Declared before the server, so it outlives it.
    let dir = tempfile::Builder::new()
        .prefix("blockd-shm-test-")
        .tempdir_in(shm)
        .unwrap();
    let size = 48 * MIB;
    let server = Blockd::start_with(BlockdOptions {
        backing: Some(dir.path().join("backing.img")),
        size: Some(size),
        unix_socket: true,
        ..Default::default()
    });
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let passes = [
        (21, server.uri(), "--request-size=1048576"),
        (22, server.uri(), "--request-size=1048576"),
        (23, server.unix_uri(), "--request-size=262144"),
    ];
    for (seed, uri, request_size) in passes {
        let src = server.dir().join(format!("src-{seed}.img"));
        let out = server.dir().join(format!("out-{seed}.img"));
        write_random_file(&src, size, seed);
        run_ok(
            Command::new(&nbdcopy)
                .args([request_size, "--flush"])
                .arg(&src)
                .arg(&uri),
            T,
        );
        assert_eq!(
            file_checksum(&src),
            file_checksum(&server.backing),
            "backing after pass {seed}"
        );
        run_ok(Command::new(&nbdcopy).arg(&uri).arg(&out), T);
        assert_eq!(
            file_checksum(&src),
            file_checksum(&out),
            "read back, pass {seed}"
        );
    }
    server.stop();
}

#[test]
fn nbdsh_script_exercises_every_command_and_flag() {
    require_tool("nbdsh", "python3-libnbd");
    let py = debian_python();
    let server = Blockd::start_with(BlockdOptions {
        size: Some(256 * MIB),
        ..Default::default()
    });
    let ro_backing = server.dir().join("ro.img");
    write_random_file(&ro_backing, 8 * MIB, 4);
    let ro = Blockd::start_with(BlockdOptions {
        backing: Some(ro_backing.clone()),
        size: None,
        read_only: true,
        ..Default::default()
    });
    let out = run_ok(
        Command::new(py)
            .arg(scripts_dir().join("nbd_commands.py"))
            .arg(server.uri())
            .arg(ro.uri()),
        Duration::from_secs(120),
    );
    eprintln!("{out}");
    assert!(out.contains("ALL OK"), "{out}");
    // The read-only export's file is untouched.
    let mut expect = vec![0u8; 8 * MIB as usize];
    TestRng::new(4).fill(&mut expect);
    assert!(
        std::fs::read(&ro_backing).unwrap() == expect,
        "read-only backing file changed"
    );
    ro.stop();
    server.stop();
}

#[test]
fn fio_nbd_randwrite_with_crc32c_verify() {
    let fio = require_tool("fio", "fio");
    let server = Blockd::start_with(BlockdOptions {
        size: Some(64 * MIB),
        ..Default::default()
    });
    let out = run_ok(
        Command::new(&fio)
            .args([
                "--name=verify",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bsrange=512-64k",
                "--iodepth=32",
            ])
            .args([
                "--size=64M",
                "--io_size=48M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_state_save=0",
                "--verify_fatal=1",
            ])
            .args(["--output-format=json"])
            .arg(format!("--uri={}", server.uri()))
            .current_dir(server.dir()),
        Duration::from_secs(120),
    );
    let json_start = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio output:\n{out}"));
    let v: Value = serde_json::from_str(&out[json_start..])
        .unwrap_or_else(|e| panic!("fio JSON ({e}):\n{out}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job:#}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let verified = job["read"]["io_bytes"].as_u64().unwrap();
    assert!(written >= 48 * MIB, "wrote {written}");
    assert!(verified > 0, "fio verified nothing: {job:#}");
    eprintln!(
        "fio randwrite 512-64k qd32: {:.0} IOPS write, verify read {} bytes",
        job["write"]["iops"].as_f64().unwrap_or(0.0),
        verified
    );
    server.stop();
}

#[test]
fn unix_socket_and_tcp_listeners_serve_the_same_export() {
    let server = Blockd::start_with(BlockdOptions {
        unix_socket: true,
        ..Default::default()
    });
    let v = nbdinfo_json(&[&server.unix_uri()]);
    assert_eq!(v["exports"][0]["export-size"], server.size, "{v:#}");
    qemu_io(&server.unix_uri(), &["write -P 0x3c 123457 65537", "flush"]);
    qemu_io(
        &server.uri(),
        &["read -P 0x3c 123457 65537", "write -P 0x3d 0 512"],
    );
    qemu_io(&server.unix_uri(), &["read -P 0x3d 0 512"]);
    server.stop();

    // A Unix socket alone.
    let server = Blockd::start_with(BlockdOptions {
        tcp: false,
        unix_socket: true,
        ..Default::default()
    });
    qemu_io(
        &server.unix_uri(),
        &["write -P 0x3e 1 1", "read -P 0x3e 1 1"],
    );
    server.stop();
}

#[test]
fn sigterm_with_writes_in_flight_keeps_every_acked_write() {
    let py = debian_python();
    let mut server = Blockd::start_with(BlockdOptions {
        size: Some(64 * MIB),
        ..Default::default()
    });
    let mut child = ChildGuard(
        Command::new(py)
            .arg(scripts_dir().join("nbd_inflight_writer.py"))
            .arg(server.uri())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbd_inflight_writer.py"),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "WRITING", "writer did not start: {line:?}");
    std::thread::sleep(Duration::from_millis(300));
    let status = server.terminate();
    assert!(
        status.success(),
        "blockd exited with {status} on SIGTERM under load; log:\n{}",
        server.log()
    );

    let mut rest = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "writer did not finish after the server exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stdout.read_to_string(&mut rest).unwrap();
    let v: Value =
        serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("writer output ({e}): {rest}"));
    let acked = v["acked"].as_array().unwrap();
    let slot = v["slot"].as_u64().unwrap();
    eprintln!(
        "acked {} writes, {} failed/unacked",
        acked.len(),
        v["unacked"]
    );
    assert!(
        acked.len() >= 64,
        "too few acked writes to mean anything: {v}"
    );

    let mut f = std::fs::File::open(&server.backing).unwrap();
    let mut buf = vec![0u8; slot as usize];
    for a in acked {
        let idx = a.as_u64().unwrap();
        f.seek(SeekFrom::Start(idx * slot)).unwrap();
        f.read_exact(&mut buf).unwrap();
        let want = writer_pattern(idx, slot as usize);
        assert!(
            buf == want,
            "acked write #{idx} at {} is not on disk after SIGTERM",
            idx * slot
        );
    }
}

/// The pattern nbd_inflight_writer.py writes into slot `idx`: the slot index as 8 little-endian bytes, repeated.
fn writer_pattern(idx: u64, len: usize) -> Vec<u8> {
    idx.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

#[test]
fn sigterm_with_idle_clients_connected_exits_promptly() {
    use integration_tests::nbd_wire::Wire;
    let mut server = Blockd::start();
    // One client idle in the handshake, one idle in transmission after a write.
    let mut in_handshake = Wire::connect(server.addr()).unwrap();
    in_handshake.read_greeting().unwrap();
    let (mut idle, _) = Wire::open(server.addr(), &server.export, false).unwrap();
    assert_eq!(idle.write_simple(1, 4097, &[0xA5; 4096]).unwrap(), 0);
    let started = Instant::now();
    let status = server.terminate();
    let took = started.elapsed();
    assert!(
        status.success(),
        "blockd exited with {status}; log:\n{}",
        server.log()
    );
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM with idle clients took {took:?}"
    );
    assert!(
        idle.closed_by_server(),
        "idle transmission client not disconnected"
    );
    assert!(
        in_handshake.closed_by_server(),
        "idle handshake client not disconnected"
    );
    let mut buf = vec![0u8; 4096];
    let mut f = std::fs::File::open(&server.backing).unwrap();
    f.seek(SeekFrom::Start(4097)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, vec![0xA5; 4096], "acked write lost on shutdown");
}
