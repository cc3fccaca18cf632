//! Fault-injection suite (issue 4): real `blockd --config` nodes, randomized trials with one
//! printed seed (`FAULT_SEED=N` replays the schedule and every random choice; timing on a
//! loaded machine still varies), each trial one fault and its invariants:
//!
//! - `link-cut`: the replication link is cut under writes (proxy reset, nftables drop, or a
//!   silent proxy stall), then restored: a resync runs, every acknowledged write is on the
//!   Secondary, `blockctl verify` reports zero differences, backing data identical;
//! - `link-delay`: the link is delayed by a userspace proxy (5-65 ms each way), sometimes also
//!   stalled or dropped, under protocol C writes: while the link stayed up, every write the
//!   client saw acknowledged is already on the Secondary's disk; after healing all are, and
//!   verify reports zero differences;
//! - `kill-primary`: SIGKILL of the Primary at a random moment under protocol C writes; the
//!   Secondary is promoted and has every acknowledged write; the old Primary restarts,
//!   rejoins, resyncs; verify zero differences;
//! - `split-brain`: the link is cut, the Secondary promoted, one or both sides write, healed:
//!   when both wrote, split brain is detected on both nodes every time (status and events) and
//!   no data is touched; recovery with `connect --discard-my-data` on the victim resyncs exactly
//!   the blocks either side changed, the victim's side file (`blockctl divergent`) holds those
//!   blocks as the victim had them (its own writes included), verify zero differences;
//! - `quorum`: 3 nodes, `quorum = "majority"`, n2 cut off (Primary or Secondary): the cut-off
//!   node cannot write or be promoted, the majority goes on, no split brain after healing,
//!   acknowledged writes all kept, verify zero differences;
//! - `disk-full` / `disk-error`: the backing store of the Primary or the Secondary fails under
//!   protocol C writes — ENOSPC (a sparse file bigger than its 16 MiB tmpfs) or EIO (an nbdkit
//!   disk behind the error filter, through nbdfuse); with `on-io-error = "detach"` no write
//!   fails or is lost (checked on the healthy node's disk and read back through the Primary's
//!   export), no daemon crashes; after repair and `blockctl attach`, verify zero differences.
//!
//! Every trial prints one line (kind, seed, result, counts); the end prints a table per kind.
//! A failed trial does not stop the run: its cluster is thrown away (with its logs in the
//! failure message) and the next trial starts a fresh one; the test fails at the end.
//!
//! Environment: `FAULT_SEED` (replay), `FAULT_TRIALS` (rounds; every round runs each kind once
//! in random order; default 4), `FAULT_KINDS` (comma-separated subset), `FAULT_BUDGET_SECS`
//! (no new trial starts after this; default 300). See docs/fault-injection.md.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use integration_tests::TestRng;
use integration_tests::faults::{
    AckedWriter, BS, BrokenStore, DiskPair, Summary, TrialResult, assert_verified_identical,
    check_acked, check_acked_nbd, env_count, logs, merged_ranges, no_panics, panic_text, peer,
    resync_count, run_seed, wait_status, write_ranges,
};
use integration_tests::link_proxy::{LinkConfig, LinkMode, ProxiedPair};
use integration_tests::repl::{Cluster, ClusterOptions, EventLog, Partition, RESOURCE};

const KINDS: &[&str] = &[
    "link-cut",
    "link-delay",
    "kill-primary",
    "split-brain",
    "quorum",
    "disk-full",
    "disk-error",
];
/// Device (backing file) size of every test cluster.
const SIZE: u64 = 32 << 20;
/// Writes per second of the writer in the link and quorum trials (the kill trial writes as fast
/// as it can).
const RATE: u32 = 2000;

type Outcome = Result<String, String>;

fn err(what: impl Into<String>) -> String {
    what.into()
}

/// The 2-node cluster (link through a fault proxy) shared by the 2-node trial kinds; every
/// trial starts and ends with it healthy: one Primary, connected, in sync.
struct Pair {
    pc: ProxiedPair,
    primary: usize,
}

impl Pair {
    fn start() -> Pair {
        let mut opts = ClusterOptions::new(2, "C");
        opts.size = SIZE;
        let pc = ProxiedPair::start(&opts, LinkConfig::QUEUED);
        pc.cluster.promote(0, true);
        pc.cluster.wait_synced(0, Duration::from_secs(60));
        Pair { pc, primary: 0 }
    }
}

/// The 3-node quorum cluster (plain 127.0.0.1 links; n2's port is what gets cut).
struct Trio {
    c: Cluster,
    primary: usize,
    on_no_quorum: &'static str,
}

impl Trio {
    fn start(on_no_quorum: &'static str) -> Trio {
        let mut opts = ClusterOptions::new(3, "C");
        opts.size = SIZE;
        opts.extra_global = format!("quorum = \"majority\"\non-no-quorum = \"{on_no_quorum}\"");
        let c = Cluster::start(&opts);
        wait_status(&c, 2, Duration::from_secs(30), "quorum", |st| {
            st["quorum"]["has_quorum"] == true
        })
        .unwrap_or_else(|e| panic!("{e}"));
        c.promote(2, true);
        c.wait_synced(2, Duration::from_secs(60));
        Trio {
            c,
            primary: 2,
            on_no_quorum,
        }
    }
}

fn nbd_addr(c: &Cluster, i: usize) -> SocketAddr {
    format!("127.0.0.1:{}", c.nodes[i].nbd_port)
        .parse()
        .unwrap()
}

fn data_blocks(c: &Cluster) -> u64 {
    c.data_size() / BS
}

/// Starts the acknowledged-write recorder on node `i`'s export (all blocks, 16 in flight, at
/// most `rate` writes per second).
fn writer(c: &Cluster, i: usize, trial: u64, rng: &mut TestRng, rate: Option<u32>) -> AckedWriter {
    AckedWriter::start(
        nbd_addr(c, i),
        trial,
        rng.next_u64(),
        data_blocks(c),
        16,
        rate,
    )
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Promotes node `i` (plain first; `--force` when refused by state and `force_ok`), then waits
/// for its NBD export. Retries for `timeout` (the node may not have noticed the lost peer yet).
fn promote(c: &Cluster, i: usize, force_ok: bool, timeout: Duration) -> Result<bool, String> {
    let deadline = Instant::now() + timeout;
    let mut forced = false;
    loop {
        let o = c.blockctl(Some(i), &["promote", RESOURCE]);
        if o.status.success() {
            break;
        }
        if force_ok && o.status.code() == Some(3) {
            let o = c.blockctl(Some(i), &["promote", RESOURCE, "--force"]);
            if o.status.success() {
                forced = true;
                break;
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "promote of {} refused for {timeout:?}: {}",
                c.nodes[i].name,
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        sleep_ms(200);
    }
    let addr = nbd_addr(c, i);
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "{}: NBD export not up after promote",
                c.nodes[i].name
            ));
        }
        sleep_ms(50);
    }
    Ok(forced)
}

fn not_connected(c: &Cluster, i: usize, j: usize, timeout: Duration) -> Result<(), String> {
    wait_status(c, i, timeout, "peer disconnected", |st| {
        peer(c, st, j)["connection"] != "connected"
    })
    .map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// link-cut
// ---------------------------------------------------------------------------------------------

fn link_cut(pair: &mut Pair, rng: &mut TestRng, trial: u64) -> Outcome {
    let (p, s) = (pair.primary, 1 - pair.primary);
    let c = &pair.pc.cluster;
    c.wait_synced(p, Duration::from_secs(60));
    let method = ["proxy-reset", "nft-drop", "proxy-stall"][rng.below(3) as usize];
    let resyncs = resync_count(c);
    let w = writer(c, p, trial, rng, Some(RATE));
    if !w.wait_acked(1, Duration::from_secs(20)) {
        return Err(err("the writer got no acknowledgement"));
    }
    sleep_ms(100 + rng.below(900));
    let mut part = None;
    match method {
        "proxy-reset" => pair.pc.proxy.set(LinkMode::Cut),
        "proxy-stall" => pair.pc.proxy.set(LinkMode::Stall),
        _ => {
            let pt = Partition::new("faults_cut");
            pt.cut_port(c.nodes[1].repl_port);
            part = Some(pt);
        }
    }
    let cut = Instant::now();
    not_connected(c, p, s, Duration::from_secs(30))?;
    let detected = cut.elapsed();
    // Writes go on while the peer is away (and must all be acknowledged).
    let at_detect = w.acked();
    if !w.wait_acked(at_detect + 50, Duration::from_secs(30)) {
        return Err(format!(
            "writes stalled on the Primary while the link was cut ({} acked)",
            w.acked()
        ));
    }
    sleep_ms(rng.below(800));
    let rep = w.finish(Duration::from_secs(30));
    if rep.failed > 0 || rep.unanswered > 0 || rep.ended.is_some() {
        return Err(format!(
            "writes failed during the cut: {} failed, {} unanswered, ended {:?}",
            rep.failed, rep.unanswered, rep.ended
        ));
    }
    let oos = peer(c, &c.status(p), s)["out_of_sync_bytes"]
        .as_u64()
        .unwrap_or(0);
    if oos == 0 {
        return Err(err("writes during the cut left nothing out of sync"));
    }
    // Heal.
    pair.pc.proxy.set(LinkMode::Pass);
    if let Some(pt) = part.take() {
        pt.heal();
    }
    let healed = Instant::now();
    c.wait_synced(p, Duration::from_secs(90));
    let resync_s = healed.elapsed().as_secs_f64();
    if resync_count(c) <= resyncs {
        return Err(err("no resync ran after the link came back"));
    }
    let checked = check_acked(&c.nodes[s].backing, &rep)?;
    assert_verified_identical(c, p)?;
    Ok(format!(
        "method={method} detected={:.1}s acked={} acked_checked_on_secondary={checked} \
         out_of_sync={oos} resync+reconnect={resync_s:.1}s diffs=0",
        detected.as_secs_f64(),
        rep.acked.len()
    ))
}

// ---------------------------------------------------------------------------------------------
// link-delay
// ---------------------------------------------------------------------------------------------

fn link_delay(pair: &mut Pair, rng: &mut TestRng, trial: u64) -> Outcome {
    let (p, s) = (pair.primary, 1 - pair.primary);
    let c = &pair.pc.cluster;
    c.wait_synced(p, Duration::from_secs(60));
    let delay = 5 + rng.below(61);
    let event = ["none", "short-stall", "drop", "long-stall"][rng.below(4) as usize];
    let proxy = &pair.pc.proxy;
    let conns = proxy.connections();
    proxy.set(LinkMode::Delay(delay));
    let w = writer(c, p, trial, rng, Some(RATE));
    if !w.wait_acked(1, Duration::from_secs(20)) {
        return Err(err("the writer got no acknowledgement"));
    }
    sleep_ms(300 + rng.below(1000));
    match event {
        "short-stall" => {
            proxy.set(LinkMode::Stall);
            sleep_ms(500 + rng.below(1500));
            proxy.set(LinkMode::Delay(delay));
        }
        "drop" => {
            proxy.set(LinkMode::Cut);
            sleep_ms(200 + rng.below(800));
            proxy.set(LinkMode::Delay(delay));
        }
        "long-stall" => {
            // Longer than the 5 s keepalive: both nodes drop the link.
            proxy.set(LinkMode::Stall);
            sleep_ms(6500 + rng.below(1000));
            proxy.set(LinkMode::Delay(delay));
        }
        _ => {}
    }
    sleep_ms(500 + rng.below(1500));
    let rep = w.finish(Duration::from_secs(30));
    if rep.failed > 0 || rep.unanswered > 0 || rep.ended.is_some() {
        return Err(format!(
            "writes failed: {} failed, {} unanswered, ended {:?}",
            rep.failed, rep.unanswered, rep.ended
        ));
    }
    // While the link stayed up, protocol C acknowledged a write only once the Secondary had
    // written it: check before anything heals.
    let st = c.status(p);
    let link_stayed = proxy.connections() == conns && peer(c, &st, s)["connection"] == "connected";
    let strict =
        if link_stayed {
            Some(check_acked(&c.nodes[s].backing, &rep).map_err(|e| {
                format!("protocol C with the link up (delay {delay} ms, {event}): {e}")
            })?)
        } else {
            None
        };
    proxy.set(LinkMode::Pass);
    c.wait_synced(p, Duration::from_secs(90));
    let checked = check_acked(&c.nodes[s].backing, &rep)?;
    assert_verified_identical(c, p)?;
    Ok(format!(
        "delay={delay}ms event={event} link_stayed_up={link_stayed} acked={} \
         acked_on_secondary_before_heal={} acked_checked_after_heal={checked} diffs=0",
        rep.acked.len(),
        strict.map_or("n/a".to_string(), |n| n.to_string())
    ))
}

// ---------------------------------------------------------------------------------------------
// kill-primary
// ---------------------------------------------------------------------------------------------

fn kill_primary(pair: &mut Pair, rng: &mut TestRng, trial: u64) -> Outcome {
    let (p, s) = (pair.primary, 1 - pair.primary);
    pair.pc.cluster.wait_synced(p, Duration::from_secs(60));
    let w = {
        let c = &pair.pc.cluster;
        writer(c, p, trial, rng, None)
    };
    if !w.wait_acked(1, Duration::from_secs(20)) {
        return Err(err("the writer got no acknowledgement"));
    }
    let wait = rng.below(1200);
    sleep_ms(wait);
    pair.pc.cluster.kill(p);
    let rep = w.finish(Duration::from_secs(10));
    let c = &pair.pc.cluster;
    let forced = promote(c, s, false, Duration::from_secs(30))?;
    let checked = check_acked(&c.nodes[s].backing, &rep)
        .map_err(|e| format!("after SIGKILL of the Primary and promotion: {e}"))?;
    // The old Primary comes back as a Secondary (a crashed primary) and resyncs.
    let resyncs = resync_count(c);
    pair.pc.start_node(p);
    pair.primary = s;
    let c = &pair.pc.cluster;
    let back = Instant::now();
    c.wait_synced(s, Duration::from_secs(90));
    let resync_s = back.elapsed().as_secs_f64();
    assert_verified_identical(c, s)?;
    Ok(format!(
        "killed={} after={wait}ms acked={} acked_checked_on_new_primary={checked} \
         in_flight_at_kill={} forced_promote={forced} resyncs={} rejoin+resync={resync_s:.1}s diffs=0",
        c.nodes[p].name,
        rep.acked.len(),
        rep.unanswered,
        resync_count(c) - resyncs
    ))
}

// ---------------------------------------------------------------------------------------------
// split-brain
// ---------------------------------------------------------------------------------------------

/// Random writes for one side: `(offset, data)` of 1-8 blocks each, about half of them in the
/// first 256 blocks (shared with the other side, so both sides overlap sometimes).
fn random_writes(c: &Cluster, rng: &mut TestRng) -> Vec<(u64, Vec<u8>)> {
    let n = 1 + rng.below(6);
    let blocks = data_blocks(c);
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(8);
            let start = if rng.below(2) == 0 {
                rng.below(256 - len)
            } else {
                rng.below(blocks - len)
            };
            let mut data = vec![0u8; (len * BS) as usize];
            rng.fill(&mut data);
            (start * BS, data)
        })
        .collect()
}

/// Block index -> the data a side's writes left there (later writes win).
fn written_blocks(writes: &[(u64, Vec<u8>)]) -> BTreeMap<u64, Vec<u8>> {
    let mut m = BTreeMap::new();
    for (off, data) in writes {
        for (k, chunk) in data.chunks(BS as usize).enumerate() {
            m.insert(off / BS + k as u64, chunk.to_vec());
        }
    }
    m
}

fn sessions(c: &Cluster, i: usize) -> Result<Vec<serde_json::Value>, String> {
    let text = c.blockctl_ok(Some(i), &["divergent", RESOURCE, "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("divergent json {e}: {text}"))?;
    Ok(v["sessions"].as_array().cloned().unwrap_or_default())
}

fn split_brain(pair: &mut Pair, rng: &mut TestRng, _trial: u64) -> Outcome {
    let (p, q) = (pair.primary, 1 - pair.primary);
    let c = &pair.pc.cluster;
    c.wait_synced(p, Duration::from_secs(60));
    let method = if rng.below(3) == 0 {
        "nft-drop"
    } else {
        "proxy-reset"
    };
    // Who writes during the split: both (half the trials), only the new Primary, only the old.
    let who = ["both", "both", "new-primary-only", "old-primary-only"][rng.below(4) as usize];
    let mut part = None;
    if method == "proxy-reset" {
        pair.pc.proxy.set(LinkMode::Cut);
    } else {
        let pt = Partition::new("faults_sb");
        pt.cut_port(c.nodes[1].repl_port);
        part = Some(pt);
    }
    not_connected(c, p, q, Duration::from_secs(30))?;
    not_connected(c, q, p, Duration::from_secs(30))?;
    let forced = promote(c, q, true, Duration::from_secs(20))?;
    let p_writes = if who != "new-primary-only" {
        random_writes(c, rng)
    } else {
        Vec::new()
    };
    let q_writes = if who != "old-primary-only" {
        random_writes(c, rng)
    } else {
        Vec::new()
    };
    write_ranges(c, p, &p_writes).map_err(|e| format!("old Primary write: {e}"))?;
    write_ranges(c, q, &q_writes).map_err(|e| format!("new Primary write: {e}"))?;
    let (pw, qw) = (written_blocks(&p_writes), written_blocks(&q_writes));
    let union: BTreeSet<u64> = pw.keys().chain(qw.keys()).copied().collect();
    // One-sided: the side that did not write steps down before the link returns.
    match who {
        "new-primary-only" => {
            c.blockctl_ok(Some(p), &["demote", RESOURCE]);
        }
        "old-primary-only" => {
            c.blockctl_ok(Some(q), &["demote", RESOURCE]);
        }
        _ => {}
    }
    let sums = (c.data_checksum(p), c.data_checksum(q));
    let events = [EventLog::start(c, p, "sb-p"), EventLog::start(c, q, "sb-q")];
    let log_len = [c.log(0).len(), c.log(1).len()];
    // The default policy (after-sb-* = disconnect) never resolves a split brain by itself, and
    // this trial gave no --discard-my-data before healing.
    let auto_resolved = || {
        (0..2).find_map(|i| {
            c.log(i)[log_len[i]..]
                .lines()
                .find(|l| {
                    // "split brain detected: RULE resolved by manual: discarding my data"
                    l.contains("split brain detected: ")
                        && l.contains(" resolved by ")
                        && !l.contains("not resolved")
                })
                .map(|l| format!("{}: {l}", c.nodes[i].name))
        })
    };
    pair.pc.proxy.set(LinkMode::Pass);
    if let Some(pt) = part.take() {
        pt.heal();
    }
    let healed = Instant::now();
    // Wait for the outcome: split brain on both sides, or connected and in sync.
    let sb = |j: usize, st: &serde_json::Value| {
        let pe = peer(c, st, j);
        pe["connection"] == "standalone"
            && pe["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("split brain"))
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let detected = loop {
        let (sp, sq) = (c.status(p), c.status(q));
        if sb(q, &sp) && sb(p, &sq) {
            break true;
        }
        let synced = |st: &serde_json::Value, j| {
            let pe = peer(c, st, j);
            pe["connection"] == "connected"
                && pe["replication"] == "established"
                && pe["out_of_sync_bytes"] == 0
        };
        if let Some(line) = auto_resolved() {
            return Err(format!(
                "{who} wrote; the split brain was resolved without being asked (default policy \
                 disconnect, no --discard-my-data in this trial; a stale flag from an earlier \
                 `connect --discard-my-data`?): {line}"
            ));
        }
        if who != "both" && synced(&sp, q) && synced(&sq, p) {
            break false;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after healing ({who} wrote): neither split brain on both nodes nor in sync \
                 within 40 s;\n{}: {}\n{}: {}",
                c.nodes[p].name, sp["peers"], c.nodes[q].name, sq["peers"]
            ));
        }
        sleep_ms(100);
    };
    let detect_s = healed.elapsed().as_secs_f64();
    if who == "both" && !detected {
        return Err(err("both sides wrote but no split brain was detected"));
    }
    if !detected {
        // One side wrote and the other stepped down: it must simply have synced from the
        // writer, keeping every block it wrote.
        let writer = if who == "new-primary-only" { q } else { p };
        pair.primary = writer;
        c.wait_synced(writer, Duration::from_secs(90));
        let wb = if writer == q { &qw } else { &pw };
        for (&b, data) in wb {
            let other = 1 - writer;
            if c.read_backing(other, b * BS, BS) != *data {
                return Err(format!(
                    "{who}: block {b} written on {} is not on {} after the resync",
                    c.nodes[writer].name, c.nodes[other].name
                ));
            }
        }
        assert_verified_identical(c, writer)?;
        return Ok(format!(
            "method={method} wrote={who} forced_promote={forced} split_brain=no \
             (synced from the writer) blocks_written={} diffs=0",
            union.len()
        ));
    }
    // Events are delivered asynchronously: give them a moment.
    for (k, ev) in events.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ev.events().iter().any(|e| e["what"] == "split-brain") {
            if Instant::now() > deadline {
                return Err(format!(
                    "no split-brain event on {}",
                    c.nodes[[p, q][k]].name
                ));
            }
            sleep_ms(50);
        }
    }
    // No data touched, nothing reconnects by itself.
    sleep_ms(1000);
    if (c.data_checksum(p), c.data_checksum(q)) != sums {
        return Err(err("split brain detected but data was touched"));
    }
    for (i, j) in [(p, q), (q, p)] {
        if peer(c, &c.status(i), j)["connection"] != "standalone" {
            return Err(format!("{} reconnected by itself", c.nodes[i].name));
        }
    }

    // Manual recovery: a random victim (the one that did not write, in one-sided trials).
    let victim = match who {
        "both" => [p, q][rng.below(2) as usize],
        "new-primary-only" => p,
        _ => q,
    };
    let survivor = 1 - victim;
    let victim_wrote = if victim == p { &pw } else { &qw };
    let before_sessions = sessions(c, victim)?.len();
    let victim_old: BTreeMap<u64, Vec<u8>> = union
        .iter()
        .map(|&b| (b, c.read_backing(victim, b * BS, BS)))
        .collect();
    for (&b, data) in victim_wrote {
        if victim_old[&b] != *data {
            return Err(format!(
                "block {b} on the victim is not what it wrote before the recovery"
            ));
        }
    }
    if c.status(victim)["role"] == "primary" {
        c.blockctl_ok(Some(victim), &["demote", RESOURCE]);
    }
    c.blockctl_ok(Some(victim), &["connect", RESOURCE, "--discard-my-data"]);
    c.blockctl_ok(Some(survivor), &["connect", RESOURCE]);
    pair.primary = survivor;
    c.wait_synced(survivor, Duration::from_secs(90));
    let sent = c.last_resync_source_bytes(survivor).unwrap_or(0);
    let want = union.len() as u64 * BS;
    if sent != want {
        return Err(format!(
            "the recovery resynced {sent} bytes, not the {want} bytes both sides changed"
        ));
    }
    // The side file: one new complete session holding exactly the union, as the victim had it.
    let ss = sessions(c, victim)?;
    if ss.len() != before_sessions + 1 {
        return Err(format!(
            "side file of {}: {} sessions, want {}",
            c.nodes[victim].name,
            ss.len(),
            before_sessions + 1
        ));
    }
    let s = &ss[ss.len() - 1];
    let ranges: Vec<(u64, u64)> = s["ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r[0].as_u64().unwrap_or(0), r[1].as_u64().unwrap_or(0)))
        .collect();
    if s["complete"] != true
        || s["peer"] != c.nodes[survivor].name.as_str()
        || s["bytes"].as_u64() != Some(want)
        || ranges != merged_ranges(&union)
    {
        return Err(format!(
            "side file session {s} is not the {} blocks {:?} from {}",
            union.len(),
            merged_ranges(&union),
            c.nodes[survivor].name
        ));
    }
    let image = c.dir.path().join(format!("divergent-{}.img", ss.len() - 1));
    c.blockctl_ok(
        Some(victim),
        &[
            "divergent",
            RESOURCE,
            "--session",
            &(ss.len() - 1).to_string(),
            "--extract",
            &image.to_string_lossy(),
        ],
    );
    let img = std::fs::read(&image).map_err(|e| format!("read {}: {e}", image.display()))?;
    for (&b, old) in &victim_old {
        let at = (b * BS) as usize;
        if img.get(at..at + BS as usize) != Some(old.as_slice()) {
            return Err(format!(
                "block {b} in the side file is not the victim's discarded data"
            ));
        }
    }
    let _ = std::fs::remove_file(&image);
    assert_verified_identical(c, survivor)?;
    Ok(format!(
        "method={method} wrote={who} forced_promote={forced} split_brain=detected({detect_s:.1}s) \
         victim={} blocks_discarded={} (victim's own {}) in_side_file=all resync_bytes={sent} diffs=0",
        c.nodes[victim].name,
        union.len(),
        victim_wrote.len()
    ))
}

// ---------------------------------------------------------------------------------------------
// quorum
// ---------------------------------------------------------------------------------------------

/// The first split brain any node reported (event or log line) since `log_len`.
fn split_brain_seen(c: &Cluster, events: &[EventLog], log_len: &[usize]) -> Option<String> {
    for i in 0..c.nodes.len() {
        let log = c.log(i);
        let line = log[log_len[i]..]
            .lines()
            .find(|l| l.contains("split brain detected") || l.contains("split-brain:"));
        let event = events[i]
            .events()
            .into_iter()
            .find(|e| e["what"] == "split-brain");
        if line.is_some() || event.is_some() {
            return Some(format!(
                "{}: {}",
                c.nodes[i].name,
                line.map(str::to_string)
                    .unwrap_or_else(|| event.map(|e| e.to_string()).unwrap_or_default())
            ));
        }
    }
    None
}

/// After healing a quorum partition: waits until `primary` sees every peer in sync, failing
/// at once when any node reports a split brain (quorum must have prevented it).
fn heal_wait(
    c: &Cluster,
    primary: usize,
    events: &[EventLog],
    log_len: &[usize],
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(n) = split_brain_seen(c, events, log_len) {
            sleep_ms(1000); // let every node log its side
            return Err(format!(
                "split brain with quorum = majority: {n} (first report; every node's view is in the logs below)"
            ));
        }
        let st = c.status(primary);
        let synced = (0..c.nodes.len()).filter(|&j| j != primary).all(|j| {
            let pe = peer(c, &st, j);
            pe["connection"] == "connected"
                && pe["replication"] == "established"
                && pe["out_of_sync_bytes"] == 0
                && pe["disk"] == "up-to-date"
        });
        if synced {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not in sync 90 s after healing: {}", st["peers"]));
        }
        sleep_ms(100);
    }
}

/// Waits until every node sees every other node connected, established and in sync (the
/// whole mesh, not just the Primary's links).
fn wait_mesh(c: &Cluster, timeout: Duration) -> Result<(), String> {
    for i in 0..c.nodes.len() {
        wait_status(c, i, timeout, "every link connected and in sync", |st| {
            (0..c.nodes.len()).filter(|&j| j != i).all(|j| {
                let pe = peer(c, st, j);
                pe["connection"] == "connected"
                    && pe["replication"] == "established"
                    && pe["out_of_sync_bytes"] == 0
            })
        })?;
    }
    Ok(())
}

fn quorum(trio: &mut Trio, isolate_primary: bool, rng: &mut TestRng, trial: u64) -> Outcome {
    let c = &trio.c;
    c.wait_synced(trio.primary, Duration::from_secs(60));
    // Put the Primary where the variant wants it: n2 (cut off) or one of the majority.
    let want_primary = if isolate_primary {
        2
    } else if trio.primary != 2 {
        trio.primary
    } else {
        rng.below(2) as usize
    };
    if want_primary != trio.primary {
        c.blockctl_ok(Some(trio.primary), &["demote", RESOURCE]);
        promote(c, want_primary, false, Duration::from_secs(30))?;
        trio.primary = want_primary;
        c.wait_synced(want_primary, Duration::from_secs(60));
    }
    let p = trio.primary;
    let events: Vec<EventLog> = (0..3)
        .map(|i| EventLog::start(c, i, &format!("q{trial}-{i}")))
        .collect();
    let log_len: Vec<usize> = (0..3).map(|i| c.log(i).len()).collect();
    let w = writer(c, p, trial, rng, Some(RATE));
    if !w.wait_acked(1, Duration::from_secs(20)) {
        return Err(err("the writer got no acknowledgement"));
    }
    sleep_ms(rng.below(800));
    let part = Partition::new("faults_quorum");
    part.cut_port(c.nodes[2].repl_port);
    wait_status(c, 2, Duration::from_secs(30), "quorum lost", |st| {
        st["quorum"]["has_quorum"] == false
    })?;
    let detail;
    if isolate_primary {
        // The cut-off Primary acknowledges nothing more.
        sleep_ms(300);
        let a = w.acked();
        sleep_ms(1500);
        if w.acked() != a {
            return Err(format!(
                "the Primary without quorum acknowledged {} more writes",
                w.acked() - a
            ));
        }
        // The majority promotes n0: it has every write the old Primary acknowledged. Then it
        // writes.
        promote(c, 0, false, Duration::from_secs(30))?;
        let rep = w.finish(Duration::from_millis(500));
        let checked = check_acked(&c.nodes[0].backing, &rep)
            .map_err(|e| format!("the majority's new Primary lacks acked writes: {e}"))?;
        let mut mrng = TestRng::new(rng.next_u64());
        let writes = random_writes(c, &mut mrng);
        write_ranges(c, 0, &writes).map_err(|e| format!("majority write: {e}"))?;
        part.heal();
        trio.primary = 0;
        heal_wait(c, 0, &events, &log_len)?;
        let st2 = c.status(2);
        if st2["role"] != "secondary" {
            return Err(format!(
                "the old Primary did not step down: {}",
                st2["role"]
            ));
        }
        detail = format!(
            "cut=primary(n2) acked={} acked_checked_on_n0={checked} failed_without_quorum={} \
             held={}",
            rep.acked.len(),
            rep.failed,
            rep.unanswered
        );
    } else {
        // The cut-off Secondary cannot become Primary, even with --force.
        for args in [
            &["promote", RESOURCE][..],
            &["promote", RESOURCE, "--force"][..],
        ] {
            let o = c.blockctl(Some(2), args);
            if o.status.code() != Some(3) {
                return Err(format!(
                    "{args:?} on the cut-off n2 was not refused by state: {:?} {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
        // The majority goes on writing.
        let a = w.acked();
        if !w.wait_acked(a + 50, Duration::from_secs(30)) {
            return Err(err("the majority Primary stopped acknowledging writes"));
        }
        let rep = w.finish(Duration::from_secs(30));
        if rep.failed > 0 || rep.unanswered > 0 {
            return Err(format!(
                "majority writes failed: {} failed {} unanswered",
                rep.failed, rep.unanswered
            ));
        }
        let other = 1 - p;
        let strict = check_acked(&c.nodes[other].backing, &rep)
            .map_err(|e| format!("protocol C, the connected majority peer: {e}"))?;
        part.heal();
        heal_wait(c, p, &events, &log_len)?;
        let checked = check_acked(&c.nodes[2].backing, &rep)?;
        detail = format!(
            "cut=secondary(n2) primary={} acked={} on_majority_peer={strict} on_n2_after_heal={checked} \
             promote_refused=yes",
            c.nodes[p].name,
            rep.acked.len()
        );
    }
    if let Some(n) = split_brain_seen(c, &events, &log_len) {
        return Err(format!("split brain with quorum = majority: {n}"));
    }
    wait_mesh(c, Duration::from_secs(30))?;
    assert_verified_identical(c, trio.primary)?;
    Ok(format!(
        "on-no-quorum={} {detail} split_brain=none diffs=0",
        trio.on_no_quorum
    ))
}

// ---------------------------------------------------------------------------------------------
// disk-full, disk-error
// ---------------------------------------------------------------------------------------------

/// A backing store fails under protocol C writes (`on-io-error = "detach"`): ENOSPC (`full`,
/// a sparse file bigger than its 16 MiB tmpfs) or EIO (an nbdkit disk behind the error
/// filter), on the Primary or on the Secondary. No write fails and none is lost (every
/// acknowledged write is on the healthy node's disk and reads back through the Primary's
/// export, diskless or not); no daemon crashes; after repair and `blockctl attach` the node is
/// UpToDate and verify reports zero differences.
fn disk_trial(full: bool, rng: &mut TestRng, trial: u64) -> Outcome {
    let broken = rng.below(2) as usize;
    let primary = if rng.below(3) == 0 {
        1 - broken
    } else {
        broken
    };
    let dp = DiskPair::start(full, broken, primary, SIZE, "16m");
    let c = &dp.c;
    let good = 1 - broken;
    let where_ = if broken == primary {
        "primary"
    } else {
        "secondary"
    };
    let outcome = (|| -> Outcome {
        // ENOSPC comes by itself once the tmpfs is full: write as fast as possible then.
        let w = writer(c, primary, trial, rng, if full { None } else { Some(RATE) });
        if !w.wait_acked(1, Duration::from_secs(20)) {
            return Err(err("the writer got no acknowledgement"));
        }
        if let BrokenStore::Eio(disk) = &dp.store {
            sleep_ms(200 + rng.below(1300));
            disk.break_now();
        }
        let failed_at = Instant::now();
        let st = wait_status(c, broken, Duration::from_secs(120), "diskless", |s| {
            s["disk"] == "diskless"
        })?;
        let detach_s = failed_at.elapsed().as_secs_f64();
        let cause = st["disk_error"].as_str().unwrap_or_default().to_string();
        let want = if full { "os error 28" } else { "os error 5" };
        if !cause.contains(want) {
            return Err(format!("disk_error {cause:?} does not name {want}"));
        }
        if c.status(primary)["role"] != "primary" {
            return Err(err("the Primary lost its role when a disk failed"));
        }
        // Writes go on (through the peer when the Primary is the diskless one).
        let a = w.acked();
        if !w.wait_acked(a + 50, Duration::from_secs(30)) {
            return Err(format!(
                "writes stopped after the {where_}'s disk failed ({} acked)",
                w.acked()
            ));
        }
        sleep_ms(rng.below(1000));
        let rep = w.finish(Duration::from_secs(30));
        if rep.failed > 0 || rep.unanswered > 0 || rep.ended.is_some() {
            return Err(format!(
                "writes failed across the disk failure: {} failed, {} unanswered, ended {:?}",
                rep.failed, rep.unanswered, rep.ended
            ));
        }
        let on_good = check_acked(&c.nodes[good].backing, &rep)
            .map_err(|e| format!("the healthy node after the failure: {e}"))?;
        let via_export = check_acked_nbd(c, primary, &rep)
            .map_err(|e| format!("reads through the Primary's export: {e}"))?;
        no_panics(c)?;
        // Repair, attach, resync.
        match &dp.store {
            BrokenStore::Eio(disk) => disk.heal(),
            BrokenStore::Full(fs) => fs.resize("128m"),
        }
        let out = c.blockctl(Some(broken), &["attach", RESOURCE]);
        if !out.status.success() {
            return Err(format!(
                "blockctl attach failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let attached = Instant::now();
        wait_status(
            c,
            broken,
            Duration::from_secs(180),
            "up-to-date after attach",
            |s| s["disk"] == "up-to-date",
        )?;
        c.wait_synced(primary, Duration::from_secs(120));
        let attach_s = attached.elapsed().as_secs_f64();
        let on_repaired = check_acked(&c.nodes[broken].backing, &rep)
            .map_err(|e| format!("the repaired node after attach: {e}"))?;
        assert_verified_identical(c, primary)?;
        no_panics(c)?;
        Ok(format!(
            "broken={where_}({}) cause={want} detached_after={detach_s:.1}s acked={} \
             on_healthy={on_good} via_export={via_export} on_repaired_after_attach={on_repaired} \
             attach+resync={attach_s:.1}s diffs=0",
            c.nodes[broken].name,
            rep.acked.len()
        ))
    })();
    outcome.map_err(|e| format!("{e}\n{}", logs(c, 40)))
}

// ---------------------------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------------------------

#[test]
fn fault_injection_trials() {
    let seed = run_seed();
    let rounds = env_count("FAULT_TRIALS", 4);
    let budget = Duration::from_secs(env_count("FAULT_BUDGET_SECS", 300) as u64);
    let kinds: Vec<&'static str> = match std::env::var("FAULT_KINDS") {
        Ok(list) => {
            let want: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
            for k in &want {
                assert!(
                    KINDS.contains(&k.as_str()),
                    "unknown kind {k:?} in FAULT_KINDS"
                );
            }
            KINDS
                .iter()
                .copied()
                .filter(|k| want.iter().any(|w| w == k))
                .collect()
        }
        Err(_) => KINDS.to_vec(),
    };
    // Breaking disks needs root, FUSE, nbdkit and nbdfuse (can_break_disks says what is missing).
    let kinds: Vec<&'static str> = if kinds.iter().any(|k| k.starts_with("disk-"))
        && !integration_tests::repl::can_break_disks()
    {
        println!("disk-full and disk-error trials NOT run: this machine cannot break disks");
        kinds
            .into_iter()
            .filter(|k| !k.starts_with("disk-"))
            .collect()
    } else {
        kinds
    };
    println!(
        "fault injection: seed {seed} (replay with FAULT_SEED={seed}), {rounds} round(s) of {kinds:?}, budget {budget:?}"
    );
    let mut rng = TestRng::new(seed);
    let started = Instant::now();
    let mut pair: Option<Pair> = None;
    // One 3-node cluster per on-no-quorum mode, started when first needed.
    let mut trios: [Option<Trio>; 2] = [None, None];
    let mut summary = Summary::default();
    let mut trial = 0u64;
    let mut skipped = 0usize;
    // Quorum trials go through the four cases (on-no-quorum suspend-io / io-error, the Primary
    // or a Secondary cut off) in turn, from a random start: 4 rounds cover each once.
    let mut quorum_case = rng.below(4) as usize;
    'rounds: for _ in 0..rounds {
        let mut order = kinds.clone();
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        for kind in order {
            if started.elapsed() > budget {
                skipped = rounds * kinds.len() - summary.total();
                println!("budget of {budget:?} used up: {skipped} trial(s) not started");
                break 'rounds;
            }
            trial += 1;
            let tseed = rng.next_u64();
            let mode = quorum_case % 2;
            let isolate_primary = (quorum_case / 2) % 2 == 1;
            if kind == "quorum" {
                quorum_case += 1;
            }
            let on_no_quorum = ["suspend-io", "io-error"][mode];
            let t0 = Instant::now();
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| -> Outcome {
                let mut trng = TestRng::new(tseed);
                if kind == "quorum" {
                    let t = trios[mode].get_or_insert_with(|| Trio::start(on_no_quorum));
                    quorum(t, isolate_primary, &mut trng, trial)
                } else if kind == "disk-full" || kind == "disk-error" {
                    disk_trial(kind == "disk-full", &mut trng, trial)
                } else {
                    let p = pair.get_or_insert_with(Pair::start);
                    match kind {
                        "link-cut" => link_cut(p, &mut trng, trial),
                        "link-delay" => link_delay(p, &mut trng, trial),
                        "kill-primary" => kill_primary(p, &mut trng, trial),
                        "split-brain" => split_brain(p, &mut trng, trial),
                        _ => unreachable!(),
                    }
                }
            }))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&*p))));
            let elapsed = t0.elapsed();
            let outcome = match outcome {
                Ok(counts) => Ok(counts),
                Err(e) => {
                    // The cluster's state is unknown now: keep its logs, start a fresh one.
                    let node_logs = if kind == "quorum" {
                        trios[mode].take().map(|t| logs(&t.c, 40))
                    } else {
                        pair.take().map(|p| logs(&p.pc.cluster, 40))
                    };
                    Err(format!("{e}\n{}", node_logs.unwrap_or_default()))
                }
            };
            match &outcome {
                Ok(counts) => println!(
                    "trial {trial:>3} {kind:<13} seed={tseed} result=ok {:.1}s {counts}",
                    elapsed.as_secs_f64()
                ),
                Err(e) => println!(
                    "trial {trial:>3} {kind:<13} seed={tseed} result=FAILED {:.1}s {}",
                    elapsed.as_secs_f64(),
                    e.lines().next().unwrap_or_default()
                ),
            }
            summary.add(TrialResult {
                kind,
                seed: tseed,
                elapsed,
                outcome,
            });
        }
    }
    drop(pair);
    drop(trios);
    println!(
        "\nfault injection summary (seed {seed}, {:.1} s, {} trials, {} failed, {skipped} not started):\n{}",
        started.elapsed().as_secs_f64(),
        summary.total(),
        summary.failures.len(),
        summary.table()
    );
    let failures: Vec<String> = summary
        .failures
        .iter()
        .map(|f| {
            format!(
                "=== {} (trial seed {}) failed after {:.1} s:\n{}",
                f.kind,
                f.seed,
                f.elapsed.as_secs_f64(),
                f.outcome.as_ref().unwrap_err()
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} fault trials failed (replay: FAULT_SEED={seed}):\n{}",
        failures.len(),
        summary.total(),
        failures.join("\n")
    );
    assert!(
        summary.total() >= kinds.len().min(rounds * kinds.len()),
        "only {} trials ran within the budget",
        summary.total()
    );
}
