//! Helpers for the fault-injection suite (tests/repl_faults.rs): a raw NBD writer that
//! remembers every write the server acknowledged and checks them on any node's backing file;
//! online-verify and split-brain side-file checks; broken backing stores; and trial
//! bookkeeping (seeded schedule, one line per trial, summary table). The link proxy and the
//! proxied 2-node cluster are in [`crate::link_proxy`].

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::nbd_wire::{CMD_WRITE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Wire, request_bytes};
use crate::repl::{Cluster, ClusterOptions, RESOURCE, tail};

/// Block size of the acked writer (= the default bitmap block size).
pub const BS: u64 = 4096;
const MAGIC: u64 = 0x4641_554c_5457_5254; // "FAULTWRT"

// ---------------------------------------------------------------------------------------------
// The acknowledged-write recorder
// ---------------------------------------------------------------------------------------------

/// The 4 KiB block the writer puts at block `idx` in trial `trial` as its `seq`-th write: it
/// says what it is, so a check names what it found instead.
pub fn block_data(trial: u64, idx: u64, seq: u64) -> Vec<u8> {
    let mut head = [0u8; 32];
    for (k, v) in [MAGIC, trial, idx, seq].into_iter().enumerate() {
        head[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    head.repeat((BS / 32) as usize)
}

fn describe_block(data: &[u8]) -> String {
    let w = |k: usize| u64::from_le_bytes(data[k * 8..k * 8 + 8].try_into().unwrap());
    if w(0) == MAGIC {
        format!("trial {} block {} seq {}", w(1), w(2), w(3))
    } else if data.iter().all(|&b| b == 0) {
        "zeroes".to_string()
    } else {
        format!("other data ({:02x?}...)", &data[..8])
    }
}

#[derive(Default)]
struct WriterState {
    /// cookie (= seq) -> block index, for writes sent and not answered yet.
    inflight: HashMap<u64, u64>,
    /// (block index, seq) of every write answered with success, in answer order.
    acked: Vec<(u64, u64)>,
    /// (block index, seq) of every write answered with an error.
    failed: Vec<(u64, u64)>,
    sender_done: bool,
    ended: Option<String>,
}

/// What an [`AckedWriter`] saw.
#[derive(Debug, Clone)]
pub struct WriterReport {
    pub trial: u64,
    /// (block index, seq) of every write the server acknowledged.
    pub acked: Vec<(u64, u64)>,
    /// Writes answered with an error.
    pub failed: u64,
    /// Writes sent and never answered (the connection ended or the drain timed out).
    pub unanswered: u64,
    /// (block index, seq) of the writes that failed or were never answered: each may or may
    /// not have reached a disk.
    pub not_acked: Vec<(u64, u64)>,
    /// Why the connection ended, if it did.
    pub ended: Option<String>,
}

/// Writes self-describing 4 KiB blocks through a raw NBD connection, `depth` in flight, and
/// records every write the server acknowledged. Two writes to one block are never in flight
/// together, so the last acknowledged write of a block is the one its data must show.
pub struct AckedWriter {
    trial: u64,
    stop: Arc<AtomicBool>,
    drain_until: Arc<Mutex<Option<Instant>>>,
    state: Arc<(Mutex<WriterState>, Condvar)>,
    stream: TcpStream,
    threads: Vec<JoinHandle<()>>,
}

impl AckedWriter {
    /// Connects to `addr` (export [`RESOURCE`]) and writes random blocks of the first `blocks`
    /// (chosen by `seed`; a block is never written twice at the same time), `depth` in flight,
    /// at most `rate` writes per second when given, until [`AckedWriter::finish`].
    pub fn start(
        addr: SocketAddr,
        trial: u64,
        seed: u64,
        blocks: u64,
        depth: usize,
        rate: Option<u32>,
    ) -> AckedWriter {
        AckedWriter::start_with_flags(addr, trial, seed, blocks, depth, rate, 0)
    }

    /// [`AckedWriter::start`] with NBD command `flags` on every write (e.g. FUA).
    pub fn start_with_flags(
        addr: SocketAddr,
        trial: u64,
        seed: u64,
        blocks: u64,
        depth: usize,
        rate: Option<u32>,
        flags: u16,
    ) -> AckedWriter {
        let (wire, _) = Wire::open(addr, RESOURCE, false)
            .unwrap_or_else(|e| panic!("NBD connection to {addr}: {e}"));
        let stream = wire.stream;
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let drain_until = Arc::new(Mutex::new(None::<Instant>));
        let state = Arc::new((Mutex::new(WriterState::default()), Condvar::new()));
        let mut threads = Vec::new();
        {
            let (mut out, stop, state) = (stream.try_clone().unwrap(), stop.clone(), state.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = crate::TestRng::new(seed);
                let started = Instant::now();
                for seq in 0u64.. {
                    if let Some(rate) = rate {
                        let due = started + Duration::from_secs_f64(seq as f64 / rate as f64);
                        while Instant::now() < due && !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(
                                (due - Instant::now()).min(Duration::from_millis(20)),
                            );
                        }
                    }
                    let idx;
                    {
                        let (m, cv) = &*state;
                        let mut st = m.lock().unwrap();
                        while st.inflight.len() >= depth
                            && !stop.load(Ordering::SeqCst)
                            && st.ended.is_none()
                        {
                            st = cv.wait_timeout(st, Duration::from_millis(50)).unwrap().0;
                        }
                        if stop.load(Ordering::SeqCst) || st.ended.is_some() {
                            break;
                        }
                        idx = loop {
                            let b = rng.below(blocks);
                            if !st.inflight.values().any(|&i| i == b) {
                                break b;
                            }
                        };
                        st.inflight.insert(seq, idx);
                    }
                    let mut req =
                        request_bytes(REQUEST_MAGIC, flags, CMD_WRITE, seq, idx * BS, BS as u32);
                    req.extend_from_slice(&block_data(trial, idx, seq));
                    if let Err(e) = out.write_all(&req) {
                        let mut st = state.0.lock().unwrap();
                        st.ended.get_or_insert(format!("send: {e}"));
                        break;
                    }
                }
                state.0.lock().unwrap().sender_done = true;
                state.1.notify_all();
            }));
        }
        {
            let (mut inp, stop, state, drain) = (
                stream.try_clone().unwrap(),
                stop.clone(),
                state.clone(),
                drain_until.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut reply = [0u8; 16];
                let mut have = 0;
                loop {
                    {
                        let st = state.0.lock().unwrap();
                        if st.ended.is_some() || (st.sender_done && st.inflight.is_empty()) {
                            break;
                        }
                        if stop.load(Ordering::SeqCst) {
                            if st.inflight.is_empty() {
                                break;
                            }
                            if drain.lock().unwrap().is_some_and(|d| Instant::now() > d) {
                                break;
                            }
                        }
                    }
                    match inp.read(&mut reply[have..]) {
                        Ok(0) => {
                            state.0.lock().unwrap().ended.get_or_insert("EOF".into());
                            break;
                        }
                        Ok(n) => have += n,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            continue;
                        }
                        Err(e) => {
                            state
                                .0
                                .lock()
                                .unwrap()
                                .ended
                                .get_or_insert(format!("recv: {e}"));
                            break;
                        }
                    }
                    if have < 16 {
                        continue;
                    }
                    have = 0;
                    let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap());
                    let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
                    let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap());
                    let (m, cv) = &*state;
                    let mut st = m.lock().unwrap();
                    if magic != SIMPLE_REPLY_MAGIC {
                        st.ended
                            .get_or_insert(format!("bad reply magic {magic:#x}"));
                        break;
                    }
                    match st.inflight.remove(&cookie) {
                        Some(idx) if error == 0 => st.acked.push((idx, cookie)),
                        Some(idx) => st.failed.push((idx, cookie)),
                        None => {
                            st.ended
                                .get_or_insert(format!("reply to unknown cookie {cookie}"));
                            break;
                        }
                    }
                    cv.notify_all();
                }
                state.1.notify_all();
            }));
        }
        AckedWriter {
            trial,
            stop,
            drain_until,
            state,
            stream,
            threads,
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> usize {
        self.state.0.lock().unwrap().acked.len()
    }

    /// True once the connection ended (server gone) or every block was written.
    pub fn finished(&self) -> bool {
        let st = self.state.0.lock().unwrap();
        st.ended.is_some() || (st.sender_done && st.inflight.is_empty())
    }

    /// Waits until at least `n` writes were acknowledged (false after `timeout`).
    pub fn wait_acked(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.acked() >= n {
                return true;
            }
            if self.finished() {
                return self.acked() >= n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Stops sending, waits up to `drain` for the answers to writes in flight, then closes.
    pub fn finish(mut self, drain: Duration) -> WriterReport {
        *self.drain_until.lock().unwrap() = Some(Instant::now() + drain);
        self.stop.store(true, Ordering::SeqCst);
        self.state.1.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        let st = self.state.0.lock().unwrap();
        WriterReport {
            trial: self.trial,
            acked: st.acked.clone(),
            failed: st.failed.len() as u64,
            unanswered: st.inflight.len() as u64,
            not_acked: st
                .failed
                .iter()
                .copied()
                .chain(st.inflight.iter().map(|(&seq, &idx)| (idx, seq)))
                .collect(),
            ended: st.ended.clone(),
        }
    }
}

impl Drop for AckedWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        *self.drain_until.lock().unwrap() = Some(Instant::now());
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Checks every acknowledged write of `report` in `backing` (a node's backing file; the data
/// area starts at offset 0): every block shows its last acknowledged write. `Ok(blocks
/// checked)`; `Err` names the first few blocks that are not what was acked.
pub fn check_acked(backing: &Path, report: &WriterReport) -> Result<usize, String> {
    let f = std::fs::File::open(backing).map_err(|e| format!("open {}: {e}", backing.display()))?;
    check_acked_with(report, &backing.display().to_string(), |idx| {
        let mut buf = vec![0u8; BS as usize];
        f.read_exact_at(&mut buf, idx * BS)
            .map_err(|e| format!("read {} at block {idx}: {e}", backing.display()))?;
        Ok(buf)
    })
}

/// [`check_acked`] through node `i`'s NBD export (reads as a client sees them).
pub fn check_acked_nbd(c: &Cluster, i: usize, report: &WriterReport) -> Result<usize, String> {
    let addr: SocketAddr = format!("127.0.0.1:{}", c.nodes[i].nbd_port)
        .parse()
        .unwrap();
    let (mut w, _) = Wire::open(addr, RESOURCE, false).map_err(|e| format!("NBD open: {e}"))?;
    let mut cookie = 0;
    let n = check_acked_with(
        report,
        &format!("{}'s NBD export", c.nodes[i].name),
        |idx| {
            cookie += 1;
            match w.read_simple(cookie, idx * BS, BS as u32) {
                Ok(Ok(data)) => Ok(data),
                Ok(Err(e)) => Err(format!("NBD read of block {idx} failed with error {e}")),
                Err(e) => Err(format!("NBD read of block {idx}: {e}")),
            }
        },
    )?;
    let _ = w.disconnect();
    Ok(n)
}

fn check_acked_with(
    report: &WriterReport,
    place: &str,
    mut read: impl FnMut(u64) -> Result<Vec<u8>, String>,
) -> Result<usize, String> {
    // The last acknowledged write of every block.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for &(idx, seq) in &report.acked {
        last.insert(idx, seq);
    }
    let mut bad = Vec::new();
    for (&idx, &seq) in &last {
        let buf = read(idx)?;
        // A write to the block issued after its last acknowledged one, never acknowledged itself,
        // may have reached the disk too: newer data, not a lost write.
        let newer_unacked = report
            .not_acked
            .iter()
            .any(|&(i, s)| i == idx && s > seq && buf == block_data(report.trial, idx, s));
        if buf != block_data(report.trial, idx, seq) && !newer_unacked {
            bad.push(format!(
                "block {idx}: last acked trial {} seq {seq}, found {}",
                report.trial,
                describe_block(&buf)
            ));
        }
    }
    if bad.is_empty() {
        Ok(last.len())
    } else {
        Err(format!(
            "{} of {} blocks lack their last acknowledged write in {place}: {}",
            bad.len(),
            last.len(),
            bad[..bad.len().min(5)].join("; ")
        ))
    }
}

/// Writes `data` at `offset` through node `i`'s NBD export, one request at a time; `Err` when
/// a write is refused or the connection fails.
pub fn write_ranges(c: &Cluster, i: usize, writes: &[(u64, Vec<u8>)]) -> Result<(), String> {
    let addr: SocketAddr = format!("127.0.0.1:{}", c.nodes[i].nbd_port)
        .parse()
        .unwrap();
    let (mut w, _) = Wire::open(addr, RESOURCE, false).map_err(|e| format!("NBD open: {e}"))?;
    for (k, (off, data)) in writes.iter().enumerate() {
        match w.write_simple(k as u64 + 1, *off, data) {
            Ok(0) => {}
            Ok(e) => return Err(format!("write at {off} failed with error {e}")),
            Err(e) => return Err(format!("write at {off}: {e}")),
        }
    }
    let _ = w.disconnect();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checks on a running cluster
// ---------------------------------------------------------------------------------------------

/// Tails of every node's log, for failure messages.
pub fn logs(c: &Cluster, lines: usize) -> String {
    (0..c.nodes.len())
        .map(|j| {
            format!(
                "--- {} log (tail)\n{}",
                c.nodes[j].name,
                tail(&c.log(j), lines)
            )
        })
        .collect()
}

/// Polls node `i`'s status until `cond` holds; `Err` with the last status after `timeout`.
pub fn wait_status(
    c: &Cluster,
    i: usize,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = c.blockctl(Some(i), &["status", RESOURCE, "--json"]);
        let st: serde_json::Value = if out.status.success() {
            serde_json::from_slice(&out.stdout).unwrap_or_default()
        } else {
            serde_json::Value::Null
        };
        if !st.is_null() && cond(&st) {
            return Ok(st);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: {what} not reached after {timeout:?}; status: {st}",
                c.nodes[i].name
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node `i`'s status entry for peer `j`.
pub fn peer<'a>(c: &Cluster, st: &'a serde_json::Value, j: usize) -> &'a serde_json::Value {
    st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["node"] == c.nodes[j].name.as_str()))
        .unwrap_or(&serde_json::Value::Null)
}

/// Runs `blockctl verify r0 --wait` on node `i` and returns the differing blocks per peer
/// (every peer must have a finished verify).
pub fn verify_diffs(c: &Cluster, i: usize) -> Result<u64, String> {
    // 32 MiB verify in well under a second here: 45 s (inside blockctl's 60 s limit) means stuck.
    let mut out = c.blockctl(Some(i), &["verify", RESOURCE, "--wait", "--timeout", "45"]);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    if !out.status.success() && text(&out).contains("verify aborted") {
        // Open bug 3 (docs/fault-injection.md): rarely, the verified peer stops answering
        // checksum requests on a live link and the verifier's watchdog aborts the verify. That
        // is not a data difference: say so loudly and verify once more; the data check stands.
        eprintln!(
            "KNOWN BUG 3: verify from {} stalled and was aborted ({}); verifying again",
            c.nodes[i].name,
            text(&out).trim()
        );
        out = c.blockctl(Some(i), &["verify", RESOURCE, "--wait", "--timeout", "45"]);
    }
    if !out.status.success() {
        return Err(format!(
            "blockctl verify --wait on {} failed ({}): {}{}; peers: {}",
            c.nodes[i].name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            c.status(i)["peers"]
        ));
    }
    let st = c.status(i);
    let mut diffs = 0;
    for p in st["peers"].as_array().into_iter().flatten() {
        let v = &p["verify"];
        if v["state"] != "done" || v["done_bytes"] != v["total_bytes"] {
            return Err(format!("verify of peer {} not done: {v}", p["node"]));
        }
        diffs += v["differing_blocks"].as_u64().unwrap_or(u64::MAX);
    }
    Ok(diffs)
}

/// The invariant of every healed scenario: no daemon crashed, `verify` from node `primary`
/// reports zero differences and every running node's backing data equals the primary's.
pub fn assert_verified_identical(c: &Cluster, primary: usize) -> Result<(), String> {
    no_panics(c)?;
    let diffs = verify_diffs(c, primary)?;
    if diffs != 0 {
        return Err(format!(
            "verify from {} reported {diffs} differing blocks: {}",
            c.nodes[primary].name,
            c.status(primary)["peers"]
        ));
    }
    let want = c.data_checksum(primary);
    for j in 0..c.nodes.len() {
        if j != primary && c.is_running(j) && c.data_checksum(j) != want {
            return Err(format!(
                "verify said 0 differences but the backing data of {} differs from {}",
                c.nodes[j].name, c.nodes[primary].name
            ));
        }
    }
    Ok(())
}

/// Every node has at most this many `resync started` lines (as source or target).
pub fn resync_count(c: &Cluster) -> usize {
    (0..c.nodes.len())
        .map(|j| c.log(j).matches("resync started").count())
        .sum()
}

/// Block-granular ranges: sorted, merged `(offset, length)` of a set of 4 KiB block indexes.
pub fn merged_ranges(blocks: &std::collections::BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b * BS => *l += BS,
            _ => out.push((b * BS, BS)),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Trial bookkeeping
// ---------------------------------------------------------------------------------------------

/// The run's seed: env `FAULT_SEED`, else the clock.
pub fn run_seed() -> u64 {
    match std::env::var("FAULT_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FAULT_SEED={s:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// A positive integer from the environment, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={s:?} is not a number")),
        Err(_) => default,
    }
}

/// Outcome of one trial.
#[derive(Debug, Clone)]
pub struct TrialResult {
    pub kind: &'static str,
    pub seed: u64,
    pub elapsed: Duration,
    /// `Ok(counts)` or `Err(what failed, with logs)`.
    pub outcome: Result<String, String>,
}

/// Per-kind counts for the summary table.
#[derive(Default)]
pub struct Summary {
    rows: BTreeMap<&'static str, (usize, usize, Duration)>,
    pub failures: Vec<TrialResult>,
}

impl Summary {
    pub fn add(&mut self, r: TrialResult) {
        let e = self.rows.entry(r.kind).or_default();
        e.0 += 1;
        e.2 += r.elapsed;
        if r.outcome.is_err() {
            e.1 += 1;
            self.failures.push(r);
        }
    }

    pub fn total(&self) -> usize {
        self.rows.values().map(|r| r.0).sum()
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<14} {:>6} {:>8} {:>10} {:>10}\n",
            "kind", "trials", "failed", "total s", "mean s"
        );
        for (k, (n, f, t)) in &self.rows {
            s.push_str(&format!(
                "{:<14} {:>6} {:>8} {:>10.1} {:>10.1}\n",
                k,
                n,
                f,
                t.as_secs_f64(),
                t.as_secs_f64() / (*n).max(1) as f64
            ));
        }
        s
    }
}

/// The text of a caught panic.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "panic".to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Broken backing stores
// ---------------------------------------------------------------------------------------------

/// How a node's backing store is made to fail.
pub enum BrokenStore {
    /// An nbdkit disk behind the error filter ([`crate::repl::FailingDisk`]): EIO on demand.
    Eio(crate::repl::FailingDisk),
    /// A sparse backing file bigger than the small tmpfs it lives on: ENOSPC once it fills.
    Full(crate::repl::SmallFs),
}

/// A started 2-node cluster (protocol C, `on-io-error = "detach"`, external metadata) where
/// node `broken`'s backing store can fail; node `primary` is Primary and in sync. The cluster
/// is stopped before the store goes away (field order).
pub struct DiskPair {
    pub c: Cluster,
    pub store: BrokenStore,
    pub broken: usize,
    _dir: tempfile::TempDir,
}

impl DiskPair {
    /// `full`: ENOSPC (a `size`-byte sparse file on a tmpfs of `tmpfs_size`); else EIO.
    pub fn start(
        full: bool,
        broken: usize,
        primary: usize,
        size: u64,
        tmpfs_size: &str,
    ) -> DiskPair {
        let dir = tempfile::Builder::new()
            .prefix("blockd-faults-disk.")
            .tempdir()
            .expect("tempdir");
        let (store, path) = if full {
            let fs = crate::repl::SmallFs::mount(&dir.path().join("small"), tmpfs_size);
            let path = fs.dir.join("backing.img");
            let f = std::fs::File::create(&path).expect("create sparse backing");
            f.set_len(size).expect("size sparse backing");
            (BrokenStore::Full(fs), path)
        } else {
            let disk = crate::repl::FailingDisk::start(dir.path(), size);
            let path = disk.path.clone();
            (BrokenStore::Eio(disk), path)
        };
        let mut opts = ClusterOptions::new(2, "C");
        opts.size = size;
        opts.extra_global = "on-io-error = \"detach\"\n".to_string();
        let mut c = Cluster::create(&opts);
        c.use_external_metadata(Some((broken, path)));
        c.start_node(0);
        c.start_node(1);
        c.promote(primary, true);
        c.wait_synced(primary, Duration::from_secs(120));
        DiskPair {
            c,
            store,
            broken,
            _dir: dir,
        }
    }
}

/// `Err` naming the first running node that does not answer `status` or whose log shows a
/// panic (the daemon must never crash).
pub fn no_panics(c: &Cluster) -> Result<(), String> {
    for i in 0..c.nodes.len() {
        if c.is_running(i) && !c.blockctl(Some(i), &["status", RESOURCE]).status.success() {
            return Err(format!(
                "{} does not answer status (crashed?):\n{}",
                c.nodes[i].name,
                tail(&c.log(i), 30)
            ));
        }
        if let Some(l) = c.log(i).lines().find(|l| l.contains("panicked at")) {
            return Err(format!("{} panicked: {l}", c.nodes[i].name));
        }
    }
    Ok(())
}
