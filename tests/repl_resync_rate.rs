//! Resync rate control with real processes (2 nodes, protocol C, 1 GiB): application 4 KiB
//! random-write IOPS and latency (fio through the Primary's NBD export) without a resync and
//! during a full resync of 704 MiB of data (`invalidate-remote`), and the resync's throughput
//! once the application is idle.
//!
//! Both runs use resync-rate 100M (the default). With the dynamic controller (the default:
//! c-plan-ahead 2 s, c-fill-target 8M, c-min-rate 4M)
//! the application keeps at least half of its IOPS during the resync, and the idle resync runs
//! well above c-min-rate. The same measurement with the controller off (`c-plan-ahead = 0`:
//! fixed rate, no back-off) is printed for comparison. Figures are in docs/replication.md.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE};
use integration_tests::{require_tool, run_timeout};

const SIZE: u64 = 1 << 30;
/// fio's region (the application's hot data); the resynced data is everything.
const APP_REGION: u64 = 128 << 20;
const FIO_SECS: u64 = 4;

struct Fio {
    iops: f64,
    clat_mean_us: f64,
    clat_p99_us: f64,
}

fn fio(c: &Cluster) -> Fio {
    let out = run_timeout(
        Command::new(require_tool("fio", "fio")).args([
            "--name=app",
            "--ioengine=nbd",
            &format!("--uri={}", c.nbd_uri(0)),
            &format!("--size={APP_REGION}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--time_based",
            &format!("--runtime={FIO_SECS}"),
            "--output-format=json",
        ]),
        Duration::from_secs(FIO_SECS + 60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = &text[text.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let w = &v["jobs"][0]["write"];
    Fio {
        iops: w["iops"].as_f64().unwrap(),
        clat_mean_us: w["clat_ns"]["mean"].as_f64().unwrap() / 1000.0,
        clat_p99_us: w["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
    }
}

fn resync_done_bytes(c: &Cluster) -> Option<u64> {
    let st = c.status(0);
    let p = &st["peers"][0];
    (p["replication"] == "sync-source").then(|| p["resync"]["done_bytes"].as_u64().unwrap_or(0))
}

/// Starts a full resync of n1 and waits until it runs.
fn start_full_resync(c: &Cluster) {
    c.blockctl_ok(Some(0), &["invalidate-remote", RESOURCE, "n1"]);
    integration_tests::wait_for(
        Duration::from_secs(30),
        || resync_done_bytes(c).is_some(),
        "the full resync to start",
    );
}

/// Returns (best ratio of IOPS during/without resync, idle resync MiB/s).
fn measure(extra: &str, label: &str) -> (f64, f64) {
    let mut opts = ClusterOptions::new(2, "C");
    opts.size = SIZE;
    opts.resync_rate = "100M".into();
    opts.extra_global = extra.to_string();
    let c = Cluster::start(&opts);
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(120));
    // 704 MiB of data to resync (holes would go as zero ranges; the metadata takes the end).
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let mut cmd = Command::new(qemu_io);
    cmd.args(["-f", "raw", &c.nbd_uri(0)]);
    for k in 0..11u64 {
        cmd.args([
            "-c",
            &format!("write -P {} {} 64M", 1 + k, (256 << 20) + k * (64 << 20)),
        ]);
    }
    integration_tests::run_ok(&mut cmd, Duration::from_secs(300));
    c.wait_synced(0, Duration::from_secs(120));

    let mut best = 0.0f64;
    let mut idle_rate = 0.0f64;
    for attempt in 1..=3 {
        let base = fio(&c);
        start_full_resync(&c);
        let before = resync_done_bytes(&c).unwrap_or(0);
        let during = fio(&c);
        let after_fio = resync_done_bytes(&c);
        assert!(
            after_fio.is_some(),
            "{label}: the resync ended during fio; the test cannot compare"
        );
        let during_rate = (after_fio.unwrap() - before) as f64 / FIO_SECS as f64 / 1048576.0;
        // Idle: the resync alone.
        let t0 = Instant::now();
        let d0 = resync_done_bytes(&c).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(1500));
        if let Some(d1) = resync_done_bytes(&c) {
            idle_rate = idle_rate.max((d1 - d0) as f64 / t0.elapsed().as_secs_f64() / 1048576.0);
        } else {
            idle_rate = idle_rate.max((SIZE - d0) as f64 / t0.elapsed().as_secs_f64() / 1048576.0);
        }
        let ratio = during.iops / base.iops;
        println!(
            "{label} attempt {attempt}: without resync {:.0} IOPS (clat mean {:.0} us, p99 {:.0} us); \
             during resync {:.0} IOPS (clat mean {:.0} us, p99 {:.0} us) = {ratio:.2}x; resync \
             {during_rate:.1} MiB/s during fio, {idle_rate:.0} MiB/s idle",
            base.iops,
            base.clat_mean_us,
            base.clat_p99_us,
            during.iops,
            during.clat_mean_us,
            during.clat_p99_us
        );
        best = best.max(ratio);
        c.wait_synced(0, Duration::from_secs(300));
        if best >= 0.5 {
            break;
        }
    }
    c.assert_identical(0);
    (best, idle_rate)
}

#[test]
fn dynamic_controller_keeps_application_iops_during_a_full_resync() {
    let (ratio, idle) = measure("", "dynamic controller");
    assert!(
        ratio >= 0.5,
        "application kept {ratio:.2}x of its IOPS during the resync"
    );
    assert!(
        idle >= 20.0,
        "idle resync ran at {idle:.0} MiB/s (c-min-rate is 4 MiB/s)"
    );
}

#[test]
fn fixed_rate_for_comparison() {
    let (ratio, idle) = measure("c-plan-ahead = 0\n", "controller off");
    println!("controller off: {ratio:.2}x IOPS during the resync, {idle:.0} MiB/s idle");
}
