//! Shared by the filed integration tests (included with `#[path]`): a cluster of real `filed serve`
//! processes on 127.0.0.2/.3/.4 with a generated configuration, CA, certificates and group key,
//! helpers to run the CLI against a node and to compare directory trees; `filed daemon` nodes with
//! their metrics endpoint, status, CPU time and thread counts.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

/// The filed binary: `$FILED_BIN`, else the workspace debug build (built once per test process).
pub fn filed_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("FILED_BIN") {
            return PathBuf::from(b);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let st = integration_tests::without_test_env(&mut Command::new(env!("CARGO")))
            .args(["build", "--workspace", "--bins"])
            .current_dir(&root)
            .status()
            .expect("running cargo build --workspace --bins");
        assert!(st.success(), "cargo build --workspace --bins failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let target = if target.is_absolute() {
            target
        } else {
            root.join(target)
        };
        target.join("debug/filed")
    })
    .clone()
}

fn ip(i: usize) -> String {
    format!("127.0.0.{}", i + 2)
}

/// A port free on all the given addresses.
fn free_port(n: usize) -> u16 {
    loop {
        let l = TcpListener::bind(format!("{}:0", ip(0))).unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        if (0..n).all(|i| TcpListener::bind(format!("{}:{port}", ip(i))).is_ok()) {
            return port;
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub nodes: Vec<String>,
    pub port: u16,
    servers: HashMap<String, Child>,
    /// Metrics endpoint of each daemon started with [`Cluster::start_daemon`].
    pub metrics: HashMap<String, SocketAddr>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Cluster {
    /// `n` nodes, one group "data" over `%data%` with the extra TOML lines `group_extra`.
    pub fn new(n: usize, group_extra: &str) -> Cluster {
        Cluster::with_slaves(n, 0, group_extra)
    }

    /// The last `slaves` of the `n` nodes are slaves of the group.
    pub fn with_slaves(n: usize, slaves: usize, group_extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port(n);
        let nodes: Vec<String> = NAMES[..n].iter().map(|s| s.to_string()).collect();
        let mut cfg = String::from("ca = \"pki/ca.pem\"\nca-key = \"pki/ca.key\"\n\n");
        for (i, name) in nodes.iter().enumerate() {
            cfg.push_str(&format!(
                "[hosts.{name}]\naddress = \"{}:{port}\"\nstate = \"{name}/state.redb\"\ncert = \"pki/{name}.pem\"\nkey = \"pki/{name}.key\"\nprefix = {{ data = \"{name}/data\", backup = \"{name}/backup\" }}\n\n",
                ip(i)
            ));
            std::fs::create_dir_all(dir.path().join(name).join("data")).unwrap();
        }
        let masters: Vec<String> = nodes[..n - slaves]
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect();
        let sl: Vec<String> = nodes[n - slaves..]
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect();
        cfg.push_str(&format!(
            "[groups.data]\nhosts = [{}]\nslaves = [{}]\nkey = \"pki/data.key\"\ninclude = [\"%data%\"]\nexclude = [\"*~\"]\nbackup-directory = \"%backup%\"\nbackup-generations = 3\n{group_extra}\n",
            masters.join(", "),
            sl.join(", ")
        ));
        let config = dir.path().join("filed.toml");
        std::fs::write(&config, cfg).unwrap();
        let c = Cluster {
            dir,
            config,
            nodes,
            port,
            servers: HashMap::new(),
            metrics: HashMap::new(),
        };
        let r = c.run_raw(None, &["keygen"]);
        assert_eq!(r.code, 0, "keygen: {r:?}");
        c
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The synced directory of a node.
    pub fn data(&self, node: &str) -> PathBuf {
        self.dir.path().join(node).join("data")
    }

    pub fn addr(&self, node: &str) -> SocketAddr {
        let i = self.nodes.iter().position(|n| n == node).unwrap();
        format!("{}:{}", ip(i), self.port).parse().unwrap()
    }

    pub fn run_raw(&self, node: Option<&str>, args: &[&str]) -> Run {
        self.run_raw_as(node, None, args)
    }

    /// [`Cluster::run_raw`] as user and group `ids` (`None`: as this process).
    pub fn run_raw_as(&self, node: Option<&str>, ids: Option<(u32, u32)>, args: &[&str]) -> Run {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(filed_bin());
        if let Some((uid, gid)) = ids {
            cmd.uid(uid).gid(gid);
        }
        cmd.arg("--config").arg(&self.config);
        if let Some(n) = node {
            cmd.arg("--node").arg(n);
        }
        cmd.args(args);
        let out: Output = run_with_timeout(cmd, Duration::from_secs(120));
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn filed(&self, node: &str, args: &[&str]) -> Run {
        self.run_raw(Some(node), args)
    }

    pub fn sync(&self, node: &str) -> Run {
        self.filed(node, &["sync"])
    }

    /// Starts `filed serve` on a node and waits until it accepts connections.
    pub fn start(&mut self, node: &str) {
        self.start_as(node, None);
    }

    /// Starts `filed serve` on a node as user and group `ids` (`None`: as this process), and
    /// waits until it accepts connections.
    pub fn start_as(&mut self, node: &str, ids: Option<(u32, u32)>) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(self.dir.path().join(format!("{node}.log"))).unwrap();
        let mut cmd = Command::new(filed_bin());
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(node)
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((uid, gid)) = ids {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().unwrap();
        self.servers.insert(node.to_string(), child);
        let addr = self.addr(node);
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{node} did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `filed daemon` on a node (with a metrics endpoint on 127.0.0.1) and waits until it
    /// accepts connections (its watches are in place by then).
    pub fn start_daemon(&mut self, node: &str, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{node}.log")))
            .unwrap();
        let maddr: SocketAddr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let child = Command::new(filed_bin())
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(node)
            .arg("daemon")
            .arg("--metrics-listen")
            .arg(maddr.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.insert(node.to_string(), child);
        self.metrics.insert(node.to_string(), maddr);
        let addr = self.addr(node);
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{node} did not start listening:\n{}",
                self.log(node)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start_all_daemons(&mut self, extra: &[&str]) {
        for n in self.nodes.clone() {
            self.start_daemon(&n, extra);
        }
    }

    /// The process id of a running server or daemon.
    pub fn pid(&self, node: &str) -> u32 {
        self.servers[node].id()
    }

    /// SIGTERM, wait, and return the exit code.
    pub fn stop_status(&mut self, node: &str) -> Option<i32> {
        let mut c = self.servers.remove(node)?;
        // SAFETY: kill(2) on a child pid we own.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{node} did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `filed status --json` of a node.
    pub fn status_json(&self, node: &str) -> serde_json::Value {
        let r = self.filed(node, &["status", "--json"]);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("status --json: {e}: {r:?}"))
    }

    /// Scrapes a daemon's metrics endpoint: the raw text.
    pub fn scrape(&self, node: &str) -> String {
        use std::io::{Read, Write};
        let mut s =
            TcpStream::connect_timeout(&self.metrics[node], Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    /// Sum of the samples of metric `name` whose labels include all of `labels`.
    pub fn metric(&self, node: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let samples = parse_metrics(&self.scrape(node));
        samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    pub fn start_all(&mut self) {
        for n in self.nodes.clone() {
            self.start(&n);
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self, node: &str) {
        if let Some(mut c) = self.servers.remove(node) {
            // SAFETY: kill(2) on a child pid we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self, node: &str) {
        if let Some(mut c) = self.servers.remove(node) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{node}.log"))).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in self.servers.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Parses the Prometheus text format: (name, labels, value) per sample; panics on a bad line.
pub fn parse_metrics(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => {
                let rest = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels {line:?}"));
                let mut m = BTreeMap::new();
                for kv in rest.split("\",").filter(|s| !s.is_empty()) {
                    let (k, v) = kv
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label {kv:?}"));
                    m.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (n.to_string(), m)
            }
            None => (head.to_string(), BTreeMap::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {name:?}"
        );
        out.push((name, labels, value));
    }
    out
}

/// CPU time (user + system, clock ticks) a process has used.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // fields after the name: state(0) ... utime(11) stime(12)
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Threads of a process.
pub fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Polls `f` until it returns true or `limit` passes; returns whether it did.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether two trees hold the same files (kind, content, mode, mtime), without panicking.
pub fn same_tree(a: &Path, b: &Path) -> bool {
    let snap = |p: &Path| std::panic::catch_unwind(|| snapshot(p)).ok();
    match (snap(a), snap(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn filed");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("filed did not finish within {limit:?}");
        }
    }
}

/// What a tree holds, for comparisons: path -> (kind, content hash / target, mode, mtime ns).
pub fn snapshot(root: &Path) -> BTreeMap<String, (String, String, u32, i64)> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, p: &Path, out: &mut BTreeMap<String, (String, String, u32, i64)>) {
    let md = std::fs::symlink_metadata(p).unwrap();
    let rel = p.strip_prefix(root).unwrap().display().to_string();
    let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    let mode = md.mode() & 0o7777;
    if md.file_type().is_symlink() {
        out.insert(
            rel,
            (
                "symlink".into(),
                std::fs::read_link(p).unwrap().display().to_string(),
                0,
                mtime,
            ),
        );
    } else if md.is_dir() {
        if !rel.is_empty() {
            out.insert(rel, ("dir".into(), String::new(), mode, mtime));
        }
        let mut names: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for n in names {
            walk(root, &n, out);
        }
    } else {
        let h = blake3::hash(&std::fs::read(p).unwrap())
            .to_hex()
            .to_string();
        out.insert(rel, ("file".into(), h, mode, mtime));
    }
}

/// Asserts two trees are identical in kind, content, mode and mtime (ns).
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    if sa != sb {
        let mut msg = String::new();
        for k in sa
            .keys()
            .chain(sb.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            if sa.get(k) != sb.get(k) {
                msg.push_str(&format!(
                    "{k}:\n  {}: {:?}\n  {}: {:?}\n",
                    a.display(),
                    sa.get(k),
                    b.display(),
                    sb.get(k)
                ));
            }
        }
        panic!("trees differ:\n{msg}");
    }
}

/// Sets a path's mtime (ns) without following symlinks.
pub fn set_mtime(p: &Path, ns: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: ns / 1_000_000_000,
            tv_nsec: ns % 1_000_000_000,
        },
    ];
    // SAFETY: valid C string and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

pub fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}
