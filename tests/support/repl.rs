//! Helpers for the replication tests: a cluster of real `blockd --config` processes on 127.0.0.1
//! (one generated config, certificates from `blockctl certs`, a secret from `blockctl
//! gen-secret`, metadata from `blockctl create-md`), `blockctl` calls, waiting for sync, data
//! checksums of the backing files, and the failover writer script.

use std::fs::OpenOptions;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::link_proxy::{LinkConfig, LinkProxy};
use crate::{blockd_bin, run_timeout};

/// The resource every test cluster runs.
pub const RESOURCE: &str = "r0";

/// `blockctl`, built beside `blockd`.
pub fn blockctl_bin() -> PathBuf {
    let bin = blockd_bin().with_file_name("blockctl");
    assert!(bin.is_file(), "{} is missing", bin.display());
    bin
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    // Ports come from below the kernel's ephemeral range (32768 and up), in a window per test
    // process: a port probed free here cannot be taken by some outgoing connection's source port
    // before the daemon binds it, which port 0 probing cannot promise.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 12) * 1_000;
    for _ in 0..1_000 {
        let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port in {base}..{}", base + 1_000)
}

/// Cluster shape.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// "A", "B" or "C".
    pub protocol: String,
    /// Backing file size (metadata is internal, at the end).
    pub size: u64,
    pub resync_rate: String,
    /// Extra `[global]` lines (e.g. `al-extents = 7`).
    pub extra_global: String,
}

impl ClusterOptions {
    pub fn new(nodes: usize, protocol: &str) -> ClusterOptions {
        ClusterOptions {
            nodes,
            protocol: protocol.to_string(),
            size: 64 << 20,
            resync_rate: "1G".to_string(),
            extra_global: String::new(),
        }
    }
}

/// One node's addresses and files.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    /// Replication address as written in the config.
    pub repl_port: u16,
    pub nbd_port: u16,
    pub backing: PathBuf,
}

/// A test cluster. Dropping it stops every running node (SIGTERM, then SIGKILL after 10 s).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub nodes: Vec<NodeInfo>,
    procs: Vec<Option<Child>>,
    data_size: Option<u64>,
}

impl Cluster {
    /// Writes the config (TLS, secret, metadata ready) without starting anything.
    pub fn create(opts: &ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("blockd-repl-test.")
            .tempdir()
            .expect("temp dir");
        let nodes: Vec<NodeInfo> = (0..opts.nodes)
            .map(|i| NodeInfo {
                name: format!("n{i}"),
                repl_port: free_port(),
                nbd_port: free_port(),
                backing: dir.path().join(format!("n{i}.img")),
            })
            .collect();
        let config = dir.path().join("cluster.toml");
        let mut text = format!(
            "[global]\nprotocol = \"{}\"\nsecret-file = \"secret\"\nresync-rate = \"{}\"\n\
             control-socket = \"{}/{{node}}.sock\"\n{}\n[global.tls]\nca = \"certs/ca.pem\"\n\
             cert = \"certs/{{node}}.pem\"\nkey = \"certs/{{node}}.key\"\n",
            opts.protocol,
            opts.resync_rate,
            dir.path().display(),
            opts.extra_global
        );
        for (i, n) in nodes.iter().enumerate() {
            text.push_str(&format!(
                "\n[resource.{RESOURCE}.node.{}]\nid = {i}\naddress = \"127.0.0.1:{}\"\n\
                 nbd = \"127.0.0.1:{}\"\nbacking = \"{}\"\nmeta = \"internal\"\n",
                n.name,
                n.repl_port,
                n.nbd_port,
                n.backing.display()
            ));
        }
        std::fs::write(&config, text).expect("write config");
        let mut c = Cluster {
            procs: nodes.iter().map(|_| None).collect(),
            dir,
            config,
            nodes,
            data_size: None,
        };
        c.blockctl_ok(
            None,
            &[
                "certs",
                "--dir",
                &c.dir.path().join("certs").to_string_lossy(),
            ],
        );
        c.blockctl_ok(
            None,
            &["gen-secret", &c.dir.path().join("secret").to_string_lossy()],
        );
        for i in 0..c.nodes.len() {
            let f = std::fs::File::create(&c.nodes[i].backing).expect("create backing");
            f.set_len(opts.size).expect("size backing");
            c.blockctl_ok(Some(i), &["create-md", RESOURCE]);
        }
        c.data_size = None;
        c
    }

    /// Creates the cluster and starts every node.
    pub fn start(opts: &ClusterOptions) -> Cluster {
        let mut c = Cluster::create(opts);
        for i in 0..c.nodes.len() {
            c.start_node(i);
        }
        c
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.nodes[i].name))
    }

    /// Everything node `i` logged (all its runs).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Starts node `i` with `config` (default: the cluster config) and waits until its control
    /// socket answers.
    pub fn start_node_with(&mut self, i: usize, config: &Path) {
        assert!(self.procs[i].is_none(), "node {i} already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("open log");
        let child = Command::new(blockd_bin())
            .arg("--config")
            .arg(config)
            .args(["--node", &self.nodes[i].name])
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn blockd");
        self.procs[i] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.procs[i]
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("node {i} exited with {st}:\n{}", self.log(i));
            }
            if self
                .blockctl(Some(i), &["status", RESOURCE])
                .status
                .success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} not up:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.data_size.is_none() {
            self.data_size = Some(self.status(i)["size"].as_u64().expect("size"));
        }
    }

    pub fn start_node(&mut self, i: usize) {
        let config = self.config.clone();
        self.start_node_with(i, &config);
    }

    /// Writes a copy of the cluster config named `file` (in the test directory) in which node
    /// `node`'s replication address is `addr` (another interface, or a proxy in front of it);
    /// returns its path, for [`Cluster::start_node_with`].
    pub fn config_with_address(&self, file: &str, node: usize, addr: &str) -> PathBuf {
        let base = std::fs::read_to_string(&self.config).expect("read config");
        let line = format!("address = \"127.0.0.1:{}\"", self.nodes[node].repl_port);
        assert!(
            base.contains(&line),
            "config names {}'s address",
            self.nodes[node].name
        );
        let path = self.dir.path().join(file);
        std::fs::write(&path, base.replace(&line, &format!("address = \"{addr}\"")))
            .expect("write config");
        path
    }

    /// Starts every node, the replication links to node `to` from the nodes in `via_proxy`
    /// each through a [`LinkProxy`] (queued reads): the lower id dials, so those nodes' configs
    /// name the proxy as `to`'s address, while `to` itself listens on 127.0.0.2. Returns each
    /// node's config file (to restart it with) and the proxies, in `via_proxy` order.
    pub fn start_with_proxied_links(
        &mut self,
        to: usize,
        via_proxy: &[usize],
    ) -> (Vec<PathBuf>, Vec<LinkProxy>) {
        let to_addr = format!("127.0.0.2:{}", self.nodes[to].repl_port);
        let target: SocketAddr = to_addr.parse().expect("proxy target");
        let direct = self.config_with_address("direct.toml", to, &to_addr);
        let mut configs = vec![direct; self.nodes.len()];
        let mut proxies = Vec::with_capacity(via_proxy.len());
        for &i in via_proxy {
            let port = free_port();
            let via = format!("127.0.0.1:{port}");
            configs[i] = self.config_with_address(&format!("n{i}.toml"), to, &via);
            proxies.push(LinkProxy::start_with(port, target, LinkConfig::QUEUED));
        }
        for (i, config) in configs.iter().enumerate() {
            self.start_node_with(i, config);
        }
        (configs, proxies)
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(c) = self.procs[i].take() {
            let st = terminate(c);
            assert!(st.success(), "node {i} exited with {st}:\n{}", self.log(i));
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.procs[i].is_some()
    }

    /// Runs `blockctl --config C [--node N] ARGS` (60 s timeout).
    pub fn blockctl(&self, node: Option<usize>, args: &[&str]) -> Output {
        let mut cmd = Command::new(blockctl_bin());
        cmd.arg("--config").arg(&self.config);
        if let Some(i) = node {
            cmd.args(["--node", &self.nodes[i].name]);
        }
        cmd.args(args);
        run_timeout(&mut cmd, Duration::from_secs(60))
    }

    pub fn blockctl_ok(&self, node: Option<usize>, args: &[&str]) -> String {
        let out = self.blockctl(node, args);
        assert!(
            out.status.success(),
            "blockctl {args:?} on {node:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `blockctl status r0 --json` of node `i`.
    pub fn status(&self, i: usize) -> serde_json::Value {
        let text = self.blockctl_ok(Some(i), &["status", RESOURCE, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status json {e}: {text}"))
    }

    /// Promotes node `i` and waits until its NBD export accepts connections.
    pub fn promote(&self, i: usize, force: bool) {
        let mut args = vec!["promote", RESOURCE];
        if force {
            args.push("--force");
        }
        // Promotion asks the connected peers for their view; right after a Primary vanished a
        // peer may still report it connected until its keepalive notices. Retry that (and a
        // peer that did not answer yet) for a while, as an admin would; anything else fails.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = self.blockctl(Some(i), &args);
            if o.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            let transient =
                err.contains("is connected to Primary") || err.contains("did not report its view");
            if !transient || Instant::now() > deadline {
                panic!("promote of node {i} failed: {o:?}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let addr: SocketAddr = format!("127.0.0.1:{}", self.nodes[i].nbd_port)
            .parse()
            .expect("addr");
        crate::wait_for(
            Duration::from_secs(10),
            || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
            "the NBD export of the new Primary",
        );
    }

    /// Moves every node's metadata to an external file `n{i}.meta` of the cluster directory
    /// (so it is not on a backing store a test breaks), optionally with another backing path for
    /// one node, and recreates the metadata. Call before starting the nodes.
    pub fn use_external_metadata(&mut self, backing: Option<(usize, PathBuf)>) {
        let dir = self.dir.path().to_path_buf();
        let mut text = std::fs::read_to_string(&self.config).expect("config");
        for i in 0..self.nodes.len() {
            let old = format!(
                "backing = \"{}\"\nmeta = \"internal\"\n",
                self.nodes[i].backing.display()
            );
            if let Some((n, path)) = &backing
                && *n == i
            {
                self.nodes[i].backing = path.clone();
            }
            let new = format!(
                "backing = \"{}\"\nmeta = \"{}\"\n",
                self.nodes[i].backing.display(),
                dir.join(format!("n{i}.meta")).display()
            );
            assert!(text.contains(&old), "config layout changed: {text}");
            text = text.replace(&old, &new);
        }
        std::fs::write(&self.config, text).expect("write config");
        for i in 0..self.nodes.len() {
            self.blockctl_ok(Some(i), &["create-md", RESOURCE, "--force"]);
        }
    }

    pub fn nbd_uri(&self, i: usize) -> String {
        format!("nbd://127.0.0.1:{}/{RESOURCE}", self.nodes[i].nbd_port)
    }

    /// Waits until node `i` (the Primary) sees every running peer connected, established, with
    /// nothing out of sync and no request in flight.
    pub fn wait_synced(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status(i);
            let peers = st["peers"].as_array().expect("peers");
            let running: Vec<&serde_json::Value> = peers
                .iter()
                .filter(|p| {
                    let name = p["node"].as_str().unwrap_or_default();
                    self.nodes
                        .iter()
                        .position(|n| n.name == name)
                        .is_some_and(|j| self.is_running(j))
                })
                .collect();
            let done = running.iter().all(|p| {
                p["connection"] == "connected"
                    && p["replication"] == "established"
                    && p["out_of_sync_bytes"] == 0
                    && p["in_flight"] == 0
                    && p["disk"] == "up-to-date"
            });
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not in sync after {timeout:?}: {st:#}\nlogs:\n{}",
                (0..self.nodes.len())
                    .map(|j| format!("--- {}\n{}", self.nodes[j].name, tail(&self.log(j), 30)))
                    .collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Bytes of the data area (backing size minus internal metadata).
    pub fn data_size(&self) -> u64 {
        self.data_size.expect("a node has run")
    }

    /// BLAKE3 of node `i`'s data area, read from its backing file.
    pub fn data_checksum(&self, i: usize) -> String {
        let mut f = std::fs::File::open(&self.nodes[i].backing).expect("open backing");
        let mut left = self.data_size();
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n]).expect("read backing");
            h.update(&buf[..n]);
            left -= n as u64;
        }
        h.finalize().to_hex().to_string()
    }

    /// Asserts every running node's data area equals node `primary`'s.
    pub fn assert_identical(&self, primary: usize) {
        let want = self.data_checksum(primary);
        for j in 0..self.nodes.len() {
            if j != primary && self.is_running(j) {
                assert_eq!(
                    self.data_checksum(j),
                    want,
                    "data of {} differs from the primary {}",
                    self.nodes[j].name,
                    self.nodes[primary].name
                );
            }
        }
    }

    /// `qemu-io` writing 64 KiB of `pattern` at `offset` through node `i`'s NBD export (then a
    /// flush), as a child process (stdout and stderr piped).
    pub fn spawn_write(&self, i: usize, offset: u64, pattern: u8) -> crate::ChildGuard {
        let qemu_io = crate::require_tool("qemu-io", "qemu-utils");
        crate::ChildGuard(
            Command::new(qemu_io)
                .args([
                    "-f",
                    "raw",
                    &self.nbd_uri(i),
                    "-c",
                    &format!("write -P {pattern} {offset} 64k"),
                    "-c",
                    "flush",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn qemu-io"),
        )
    }

    /// Writes `len` bytes of random data at `offset` through NBD on node `i` with qemu-io
    /// (then a flush).
    pub fn write_random(&self, i: usize, offset: u64, len: u64, seed: u64) {
        let file = self.dir.path().join(format!("random-{seed}-{offset}.bin"));
        crate::write_random_file(&file, len, seed);
        let qemu_io = crate::require_tool("qemu-io", "qemu-utils");
        crate::run_ok(
            Command::new(qemu_io).args([
                "-f",
                "raw",
                &self.nbd_uri(i),
                "-c",
                &format!("write -s {} {offset} {len}", file.display()),
                "-c",
                "flush",
            ]),
            Duration::from_secs(120),
        );
        let _ = std::fs::remove_file(file);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().filter_map(Option::take) {
            terminate(c);
        }
    }
}

fn terminate(mut c: Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped yet.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            return c.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n") + "\n"
}

/// The failover writer (python3-libnbd). `write URI ITER SEED BLOCKS LOG`: writes 4 KiB blocks
/// at distinct shuffled block indexes, 16 in flight, and appends `INDEX SEQ` to LOG for every
/// write the server acknowledged; each block says what it is (magic, iteration, index, seq).
/// It stops when the connection drops. `verify URI ITER LOG`: reads every logged block and
/// prints `verified N`, or exits 1 naming the first block that differs.
pub const WRITER_PY: &str = r#"
import nbd, random, struct, sys
BS = 4096
MAGIC = 0x424c4f434b445752
def block(it, idx, seq):
    return struct.pack('<QQQQ', MAGIC, it, idx, seq) * (BS // 32)
mode, uri, it = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
if mode == 'write':
    seed, blocks, logpath = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    order = list(range(blocks))
    random.Random(seed).shuffle(order)
    log = open(logpath, 'w', buffering=1)
    inflight = {}
    pos = seq = 0
    try:
        while True:
            while len(inflight) < 16 and pos < len(order):
                idx = order[pos]; pos += 1
                buf = nbd.Buffer.from_bytearray(bytearray(block(it, idx, seq)))
                c = h.aio_pwrite(buf, idx * BS)
                inflight[c] = (idx, seq, buf); seq += 1
            if not inflight:
                break
            h.poll(-1)
            for c in list(inflight):
                if h.aio_command_completed(c):
                    idx, s, _ = inflight.pop(c)
                    log.write('%d %d\n' % (idx, s))
    except Exception as e:
        print('writer stopped: %s' % e, file=sys.stderr)
    print('acked %d' % (seq - len(inflight)))
else:
    logpath = sys.argv[4]
    n = 0
    for line in open(logpath):
        parts = line.split()
        if len(parts) != 2:
            continue  # a torn last line
        idx, s = int(parts[0]), int(parts[1])
        got = h.pread(BS, idx * BS)
        if got != block(it, idx, s):
            head = struct.unpack('<QQQQ', got[:32])
            print('block %d: want iteration %d seq %d, got %r' % (idx, it, s, head))
            sys.exit(1)
        n += 1
    print('verified %d' % n)
"#;

/// `blockctl events r0 --json` of one node, written to a file while it runs (killed on drop).
pub struct EventLog {
    pub path: PathBuf,
    _child: crate::ChildGuard,
}

impl EventLog {
    /// Subscribes to node `i`'s events; returns once the subscription is live.
    pub fn start(c: &Cluster, i: usize, name: &str) -> EventLog {
        let path = c.dir.path().join(format!("events-{name}.jsonl"));
        let out = std::fs::File::create(&path).expect("create events file");
        let child = Command::new(blockctl_bin())
            .arg("--config")
            .arg(&c.config)
            .args(["--node", &c.nodes[i].name, "events", RESOURCE, "--json"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn blockctl events");
        // The server answers the subscription before streaming; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        EventLog {
            path,
            _child: crate::ChildGuard(child),
        }
    }

    /// The events received so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until an event with `what` (and a value containing `value`) arrived.
    pub fn wait_for(&self, what: &str, value: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| {
                e["what"] == what && e["value"].as_str().is_some_and(|v| v.contains(value))
            }) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no event {what}:{value} after {timeout:?}; got {:?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Cluster {
    /// `len` bytes at `offset` of node `i`'s data area, read from its backing file.
    pub fn read_backing(&self, i: usize, offset: u64, len: u64) -> Vec<u8> {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.nodes[i].backing).expect("open backing");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).expect("read backing");
        buf
    }

    /// Waits until node `i`'s status of peer `peer` satisfies `cond`.
    pub fn wait_peer(
        &self,
        i: usize,
        peer: usize,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status(i);
            let p = st["peers"]
                .as_array()
                .expect("peers")
                .iter()
                .find(|p| p["node"] == self.nodes[peer].name.as_str())
                .cloned()
                .expect("peer in status");
            if cond(&p) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what} not reached after {timeout:?}: {st:#}\nlogs:\n{}",
                self.nodes[i].name,
                (0..self.nodes.len())
                    .map(|j| format!("--- {}\n{}", self.nodes[j].name, tail(&self.log(j), 40)))
                    .collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The byte count of the last "resync started (source)" line in node `i`'s log.
    pub fn last_resync_source_bytes(&self, i: usize) -> Option<u64> {
        self.log(i)
            .lines()
            .filter(|l| l.contains("resync started (source)"))
            .next_back()
            .and_then(|l| l.split("bytes=").nth(1))
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
    }
}

/// A dedicated nftables table that drops TCP traffic to and from chosen ports (a network
/// partition on loopback). The table is deleted when dropped.
pub struct Partition {
    table: String,
}

impl Partition {
    /// Creates an empty table `name` (any leftover of that name is replaced).
    pub fn new(name: &str) -> Partition {
        let table = format!("blockd_test_{name}_{}", std::process::id());
        let _ = nft(&["delete", "table", "inet", &table]);
        nft(&["add", "table", "inet", &table]).expect("nft add table");
        for (chain, hook) in [("out", "output"), ("in", "input")] {
            nft(&[
                "add",
                "chain",
                "inet",
                &table,
                chain,
                &format!("{{ type filter hook {hook} priority 0; policy accept; }}"),
            ])
            .expect("nft add chain");
        }
        Partition { table }
    }

    /// Drops every TCP segment from or to `port` on loopback.
    pub fn cut_port(&self, port: u16) {
        for chain in ["out", "in"] {
            for dir in ["dport", "sport"] {
                nft(&[
                    "add",
                    "rule",
                    "inet",
                    &self.table,
                    chain,
                    "tcp",
                    dir,
                    &port.to_string(),
                    "drop",
                ])
                .expect("nft add rule");
            }
        }
    }

    /// Removes every rule (heals the partition; the table stays).
    pub fn heal(&self) {
        for chain in ["out", "in"] {
            nft(&["flush", "chain", "inet", &self.table, chain]).expect("nft flush chain");
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = nft(&["delete", "table", "inet", &self.table]);
    }
}

/// Runs `nft ARGS`; `Err` with its stderr on failure.
pub fn nft(args: &[&str]) -> Result<(), String> {
    let out = crate::run_timeout(Command::new("nft").args(args), Duration::from_secs(10));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

// --- Disk failures (tests/repl_disk_failure.rs, usable by fault-injection tests) ---

/// Whether this machine can break backing stores for real (root, /dev/fuse, nbdkit, nbdfuse,
/// fusermount3); prints why not.
pub fn can_break_disks() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["nbdkit", "nbdfuse", "fusermount3"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let ok = root && tools && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("skipped: needs root, /dev/fuse, nbdkit, nbdfuse and fusermount3");
    }
    ok
}

/// An nbdkit memory disk (zeroes) behind one nbdkit filter, as a file through nbdfuse: what
/// [`FailingDisk`] and [`SlowDisk`] are made of. Unmounted and stopped on drop.
struct FuseDisk {
    /// The file to use as backing.
    path: PathBuf,
    mount: PathBuf,
    fuse: Option<crate::ChildGuard>,
    _nbdkit: crate::ChildGuard,
}

impl FuseDisk {
    /// Starts nbdkit (`--filter=FILTER memory SIZE FILTER_ARGS...`) and nbdfuse in `dir`.
    fn start(dir: &Path, size: u64, filter: &str, filter_args: &[String]) -> FuseDisk {
        let sock = dir.join("nbdkit.sock");
        let mount = dir.join("fuse");
        std::fs::create_dir_all(&mount).expect("mount dir");
        let nbdkit = crate::ChildGuard(
            Command::new("nbdkit")
                .args(["-f", "-U"])
                .arg(&sock)
                .arg(format!("--filter={filter}"))
                .args(["memory", &size.to_string()])
                .args(filter_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nbdkit"),
        );
        crate::wait_for(Duration::from_secs(10), || sock.exists(), "nbdkit socket");
        let path = mount.join("disk");
        let fuse = crate::ChildGuard(
            Command::new("nbdfuse")
                .arg(&path)
                .arg("--unix")
                .arg(&sock)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nbdfuse"),
        );
        crate::wait_for(
            Duration::from_secs(10),
            || std::fs::metadata(&path).is_ok_and(|m| m.len() == size),
            "the nbdfuse file",
        );
        FuseDisk {
            path,
            mount,
            fuse: Some(fuse),
            _nbdkit: nbdkit,
        }
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        let _ = crate::run_timeout(
            Command::new("fusermount3").arg("-u").arg(&self.mount),
            Duration::from_secs(20),
        );
        drop(self.fuse.take());
    }
}

/// An nbdkit memory disk behind the error filter, as a file through nbdfuse. Creating the
/// trigger file makes every request fail with EIO; removing it heals the disk.
pub struct FailingDisk {
    /// The file to use as backing.
    pub path: PathBuf,
    /// While this file exists, every I/O fails.
    pub trigger: PathBuf,
    _disk: FuseDisk,
}

impl FailingDisk {
    /// Starts nbdkit and nbdfuse in `dir` (a `size`-byte disk, zeroes).
    pub fn start(dir: &Path, size: u64) -> FailingDisk {
        let trigger = dir.join("break-disk");
        let args = [
            "error=EIO".to_string(),
            "error-rate=100%".to_string(),
            format!("error-file={}", trigger.display()),
        ];
        let disk = FuseDisk::start(dir, size, "error", &args);
        FailingDisk {
            path: disk.path.clone(),
            trigger,
            _disk: disk,
        }
    }

    /// Every I/O fails with EIO from now on.
    pub fn break_now(&self) {
        std::fs::File::create(&self.trigger).expect("create trigger");
    }

    /// I/O works again.
    pub fn heal(&self) {
        std::fs::remove_file(&self.trigger).expect("remove trigger");
    }
}

/// A small tmpfs mounted in a directory (unmounted on drop).
pub struct SmallFs {
    pub dir: PathBuf,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` (e.g. `16m`) on `dir` (created).
    pub fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).expect("tmpfs dir");
        crate::run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
            Duration::from_secs(20),
        );
        SmallFs {
            dir: dir.to_path_buf(),
        }
    }

    /// Remounts it with another size.
    pub fn resize(&self, size: &str) {
        crate::run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(&self.dir),
            Duration::from_secs(20),
        );
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = crate::run_timeout(
            Command::new("umount").arg("-l").arg(&self.dir),
            Duration::from_secs(20),
        );
    }
}

/// An nbdkit memory disk behind the `delay` filter, as a file through nbdfuse: every write
/// that reaches it takes `delay_ms` (a slow backing store; tests/repl_protocol_b.rs).
pub struct SlowDisk {
    /// The file to use as backing.
    pub path: PathBuf,
    _disk: FuseDisk,
}

impl SlowDisk {
    /// Starts nbdkit and nbdfuse in `dir` (a `size`-byte disk, zeroes).
    pub fn start(dir: &Path, size: u64, delay_ms: u32) -> SlowDisk {
        let disk = FuseDisk::start(dir, size, "delay", &[format!("delay-write={delay_ms}ms")]);
        SlowDisk {
            path: disk.path.clone(),
            _disk: disk,
        }
    }
}
