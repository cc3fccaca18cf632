//! Failover under protocol C with real processes: a python3-libnbd writer issues 4 KiB writes
//! (16 in flight, each block self-describing) through NBD on the Primary and logs every write
//! the server acknowledged; the Primary is killed with SIGKILL at a random moment; the
//! Secondary is promoted with `blockctl promote` (no --force); its NBD export must return every
//! acknowledged write bit for bit. The killed node then restarts as Secondary (a crashed
//! primary), resyncs from the new Primary, and the roles swap for the next iteration.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE, WRITER_PY, tail};
use integration_tests::{ChildGuard, TestRng, debian_python, run_timeout};

const ITERATIONS: usize = 20;
/// Upper bound for the whole loop.
const BUDGET: Duration = Duration::from_secs(200);

#[test]
fn sigkill_primary_then_promote_keeps_every_acknowledged_write() {
    let python = debian_python();
    let mut c = Cluster::start(&ClusterOptions::new(2, "C"));
    c.promote(0, true);
    c.wait_synced(0, Duration::from_secs(60));
    let script = c.dir.path().join("writer.py");
    std::fs::write(&script, WRITER_PY).unwrap();
    let blocks = (c.data_size() / 4096).min(8192);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = TestRng::new(seed);
    let started = Instant::now();
    let mut primary = 0;
    let mut total_acked = 0u64;
    for it in 1..=ITERATIONS {
        assert!(
            started.elapsed() < BUDGET,
            "only {} iterations in {BUDGET:?}",
            it - 1
        );
        let log = c.dir.path().join(format!("acked-{it}.log"));
        let mut writer = ChildGuard(
            Command::new(&python)
                .arg(&script)
                .args([
                    "write",
                    &c.nbd_uri(primary),
                    &it.to_string(),
                    &rng.next_u64().to_string(),
                    &blocks.to_string(),
                ])
                .arg(&log)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn writer"),
        );
        // Let the writer get going, then crash the Primary at a random moment.
        integration_tests::wait_for(
            Duration::from_secs(20),
            || std::fs::metadata(&log).is_ok_and(|m| m.len() > 0),
            "the writer's first acknowledged write",
        );
        std::thread::sleep(Duration::from_millis(rng.below(700)));
        c.kill(primary);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = writer.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the writer did not stop");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        std::io::Read::read_to_string(writer.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(status.success(), "writer failed: {out}");

        // Promote the survivor (it may take a moment to notice the lost peer).
        let next = 1 - primary;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let o = c.blockctl(Some(next), &["promote", RESOURCE]);
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "promote of {} refused: {}\n{}",
                c.nodes[next].name,
                String::from_utf8_lossy(&o.stderr),
                tail(&c.log(next), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c.promote(next, false); // already Primary: waits for the NBD export
        let o = run_timeout(
            Command::new(&python)
                .arg(&script)
                .args(["verify", &c.nbd_uri(next), &it.to_string()])
                .arg(&log),
            Duration::from_secs(60),
        );
        let verified = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "iteration {it}: an acknowledged write is missing on the new Primary {}: {verified}{}",
            c.nodes[next].name,
            String::from_utf8_lossy(&o.stderr)
        );
        let n: u64 = verified
            .trim()
            .strip_prefix("verified ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("verify output {verified:?}"));
        assert!(n > 0);
        total_acked += n;

        // The crashed node comes back as Secondary and resyncs.
        c.start_node(primary);
        c.wait_synced(next, Duration::from_secs(60));
        c.assert_identical(next);
        println!(
            "iteration {it}: killed {} after {} acknowledged writes, {} promoted, all present; resynced",
            c.nodes[primary].name, n, c.nodes[next].name
        );
        primary = next;
    }
    println!(
        "failover: {ITERATIONS} iterations, {total_acked} acknowledged writes verified, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
