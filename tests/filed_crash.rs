//! SIGKILL of the receiving `filed serve` at random moments during an apply never leaves a partial
//! file: the target always holds the complete old or the complete new version.

#[path = "filed_harness.rs"]
mod harness;

use harness::*;
use std::time::{Duration, Instant};

fn content(i: u32) -> Vec<u8> {
    // Distinct pseudo-random 3 MiB per version (little shared content: mostly literal data).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(i).wrapping_mul(0x1234_5678_9abc_def1);
    (0..(3 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn sigkill_during_apply_never_leaves_a_partial_file() {
    let mut c = Cluster::new(2, "");
    c.start("beta");
    let target = c.data("beta").join("big.bin");
    let mut known = vec![blake3::hash(&content(0))];
    write(&c.data("alpha").join("big.bin"), &content(0));
    assert_eq!(c.sync("alpha").code, 0);
    let started = Instant::now();
    let mut kills_mid_transfer = 0;
    for i in 1..=20u32 {
        let data = content(i);
        known.push(blake3::hash(&data));
        write(&c.data("alpha").join("big.bin"), &data);
        let mut sync = std::process::Command::new(filed_bin())
            .arg("--config")
            .arg(&c.config)
            .arg("--node")
            .arg("alpha")
            .arg("sync")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // kill somewhere between "before the data arrives" and "after the rename"
        std::thread::sleep(Duration::from_millis(u64::from(i * 37 % 400)));
        c.kill("beta");
        let st = sync.wait().unwrap();
        if !st.success() {
            kills_mid_transfer += 1;
        }
        if let Ok(got) = std::fs::read(&target) {
            let h = blake3::hash(&got);
            assert!(
                known.contains(&h),
                "iteration {i}: big.bin is neither an old nor the new version ({} bytes)",
                got.len()
            );
        }
        c.start("beta");
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "crash loop took too long"
        );
    }
    // after all that, a normal sync converges and leaves no temp files behind
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    let r = c.sync("alpha");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(&target).unwrap(), content(20));
    let leftovers: Vec<_> = std::fs::read_dir(c.data("beta"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".filed.tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    eprintln!("{kills_mid_transfer} of 20 kills interrupted a sync");
    assert!(
        kills_mid_transfer >= 5,
        "too few kills hit a transfer ({kills_mid_transfer}); timing is off"
    );
}
