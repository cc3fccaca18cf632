//! Helpers shared by the integration tests: locating and building the binaries, starting `blockd standalone`
//! on port 0 and parsing its ready line, a guard that stops it with SIGTERM and checks its exit status,
//! running client tools with timeouts, and checking that those tools are installed (no silent skips).

pub mod fs_stack;
pub mod nbd_wire;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Default size of a test export: 64 MiB (sparse).
pub const DEFAULT_SIZE: u64 = 64 << 20;
/// The export name `blockd` serves when `--export` is not given.
pub const DEFAULT_EXPORT: &str = "blockd";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The workspace target directory: `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Path of the `blockd` binary: `$BLOCKD_BIN` when set (used as is), else the debug build in the workspace
/// target directory, built with `cargo build --workspace --bins` when it is missing or older than a source file of
/// `blockd/` or `common/`. Built at most once per test process (a failed build fails every later caller with
/// the same message); a file lock in the target directory serialises builds across test binaries.
pub fn blockd_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let bin = BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("BLOCKD_BIN") {
            let bin = PathBuf::from(bin);
            return if bin.is_file() {
                Ok(bin)
            } else {
                Err(format!("BLOCKD_BIN={} is not a file", bin.display()))
            };
        }
        let bin = target_dir().join("debug").join("blockd");
        if binary_is_stale(&bin, &["blockd", "common"]) {
            build_blockd()?;
        }
        if bin.exists() {
            Ok(bin)
        } else {
            Err(format!(
                "{} does not exist after `cargo build --workspace --bins`",
                bin.display()
            ))
        }
    });
    match bin {
        Ok(bin) => bin.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// True when `bin` is missing or any file under the given workspace crates is newer than it.
fn binary_is_stale(bin: &Path, crates: &[&str]) -> bool {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    let mut stack: Vec<PathBuf> = crates.iter().map(|c| workspace_root().join(c)).collect();
    stack.push(workspace_root().join("Cargo.toml"));
    stack.push(workspace_root().join("Cargo.lock"));
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if p.file_name().is_some_and(|n| n == "target" || n == "fuzz") {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if meta.modified().is_ok_and(|m| m > built) {
            return true;
        }
    }
    false
}

/// Removes from `cmd` the variables `cargo test` sets for a test (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_*`, ...), for a `cargo` run from a test: build scripts such as ring's rerun when
/// they change, so a build from inside a test would rebuild ring, rustls and everything above
/// them (and the test command's next build all of it again).
pub fn without_test_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_test = key == "OUT_DIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR"
            );
        if set_by_cargo_test {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn build_blockd() -> Result<(), String> {
    std::fs::create_dir_all(target_dir()).map_err(|e| format!("create target dir: {e}"))?;
    let lock_path = target_dir().join("integration-tests-build.lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| format!("create {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a valid, owned file descriptor; released when `lock` is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if rc != 0 {
        return Err(format!(
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // The whole workspace, as the test command builds it: `-p blockd` alone would unify the
    // dependencies' features differently and rebuild tokio, blockd and the rest for nothing.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = without_test_env(&mut Command::new(cargo))
        .args(["build", "--workspace", "--bins"])
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("run cargo build --workspace --bins: {e}"))?;
    drop(lock);
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo build --workspace --bins failed: {status}"))
    }
}

/// The io engine every blockd in this run uses: env `BLOCKD_TEST_IO_ENGINE` (auto | uring | sync), default auto.
pub fn io_engine() -> String {
    let engine = std::env::var("BLOCKD_TEST_IO_ENGINE").unwrap_or_else(|_| "auto".to_string());
    assert!(
        matches!(engine.as_str(), "auto" | "uring" | "sync"),
        "BLOCKD_TEST_IO_ENGINE must be auto, uring or sync, not {engine:?}"
    );
    engine
}

/// Finds `tool` on PATH (or as an absolute path) and fails the test with the Debian package to install when it
/// is missing. Tests never skip silently: the test command installs these packages.
pub fn require_tool(tool: &str, debian_package: &str) -> PathBuf {
    let found = if tool.contains('/') {
        let p = PathBuf::from(tool);
        p.is_file().then_some(p)
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .map(|dir| dir.join(tool))
                .find(|p| p.is_file())
        })
    };
    match found {
        Some(p) => p,
        None => panic!(
            "required tool `{tool}` is not installed: `apt-get install -y {debian_package}` \
             (the README's test command installs it)"
        ),
    }
}

/// Debian's python3 (the one that can `import nbd`, from python3-libnbd); the `python3` on PATH may be another.
pub fn debian_python() -> PathBuf {
    let py = require_tool("/usr/bin/python3", "python3");
    let out = Command::new(&py)
        .args(["-c", "import nbd"])
        .output()
        .expect("run /usr/bin/python3");
    assert!(
        out.status.success(),
        "/usr/bin/python3 cannot `import nbd`: `apt-get install -y python3-libnbd`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    py
}

/// Directory of helper scripts (tests/scripts).
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// Options for one `blockd standalone` process.
#[derive(Debug, Clone)]
pub struct BlockdOptions {
    /// Backing file; a fresh sparse file in the guard's temp dir when None.
    pub backing: Option<PathBuf>,
    /// `--size`, in bytes (passed as a plain number).
    pub size: Option<u64>,
    /// Listen on 127.0.0.1:0 (TCP).
    pub tcp: bool,
    /// Also listen on a Unix socket in the temp dir.
    pub unix_socket: bool,
    pub export: Option<String>,
    pub description: Option<String>,
    pub read_only: bool,
    /// `--tls-dir` (gnutls layout: ca-cert.pem, server-cert.pem, server-key.pem).
    pub tls_dir: Option<PathBuf>,
    /// `--tls`: TLS required.
    pub tls_required: bool,
}

impl Default for BlockdOptions {
    fn default() -> Self {
        BlockdOptions {
            backing: None,
            size: Some(DEFAULT_SIZE),
            tcp: true,
            unix_socket: false,
            export: None,
            description: None,
            read_only: false,
            tls_dir: None,
            tls_required: false,
        }
    }
}

/// A running `blockd standalone`. Dropping it sends SIGTERM, waits, and fails the test when the exit status
/// is not 0 (unless the test is already failing).
pub struct Blockd {
    child: Option<Child>,
    /// The bound TCP address parsed from the ready line.
    pub addr: Option<SocketAddr>,
    /// The Unix socket path, when one was requested.
    pub socket: Option<PathBuf>,
    pub backing: PathBuf,
    pub export: String,
    pub size: u64,
    log: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

impl Blockd {
    /// Starts blockd with default options: a fresh 64 MiB sparse backing file, TCP on 127.0.0.1:0.
    pub fn start() -> Blockd {
        Blockd::start_with(BlockdOptions::default())
    }

    pub fn start_with(opts: BlockdOptions) -> Blockd {
        let dir = tempfile::Builder::new()
            .prefix("blockd-test-")
            .tempdir()
            .expect("create temp dir");
        let backing = opts
            .backing
            .clone()
            .unwrap_or_else(|| dir.path().join("backing.img"));
        let export = opts
            .export
            .clone()
            .unwrap_or_else(|| DEFAULT_EXPORT.to_string());
        let socket = opts.unix_socket.then(|| dir.path().join("blockd.sock"));

        let mut cmd = Command::new(blockd_bin());
        cmd.arg("standalone").arg("--backing").arg(&backing);
        if let Some(size) = opts.size {
            cmd.arg("--size").arg(size.to_string());
        }
        if opts.tcp {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if let Some(sock) = &socket {
            cmd.arg("--socket").arg(sock);
        }
        if let Some(name) = &opts.export {
            cmd.arg("--export").arg(name);
        }
        if let Some(desc) = &opts.description {
            cmd.arg("--description").arg(desc);
        }
        if opts.read_only {
            cmd.arg("--read-only");
        }
        if let Some(tls) = &opts.tls_dir {
            cmd.arg("--tls-dir").arg(tls);
        }
        if opts.tls_required {
            cmd.arg("--tls");
        }
        cmd.arg("--io-engine").arg(io_engine());
        cmd.env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent; it makes the
        // server die with the test thread that started it if the test process is killed (no orphaned servers).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", blockd_bin().display()));

        // Drain stderr for the whole life of the process (a full pipe would block the server); hand the ready
        // line to this thread.
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<String>();
        let stderr = child.stderr.take().expect("piped stderr");
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[blockd] {line}");
                let is_ready = line.contains("serving") && line.contains(" on ");
                if let Some(tx) = ready_tx.take_if(|_| is_ready) {
                    let _ = tx.send(line.clone());
                }
                log2.lock().unwrap().push(line);
            }
        });

        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = child.try_wait().expect("try_wait") {
                        std::thread::sleep(Duration::from_millis(100));
                        panic!(
                            "blockd exited before its ready line ({status}); log:\n{}",
                            log.lock().unwrap().join("\n")
                        );
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        panic!(
                            "blockd printed no ready line within 30 s; log:\n{}",
                            log.lock().unwrap().join("\n")
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait");
                    panic!(
                        "blockd closed stderr before its ready line ({status}); log:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        };
        // The ready line names the engine in use: a forced engine must be the one running.
        let engine = io_engine();
        let wanted = match engine.as_str() {
            "uring" => Some("engine io_uring"),
            "sync" => Some("engine sync"),
            _ => None,
        };
        if let Some(wanted) = wanted {
            assert!(
                ready.contains(wanted),
                "BLOCKD_TEST_IO_ENGINE={engine} but blockd says {ready:?}"
            );
        }
        let addr = if opts.tcp {
            Some(
                parse_ready_addr(&ready)
                    .unwrap_or_else(|| panic!("no TCP address in ready line {ready:?}")),
            )
        } else {
            None
        };
        if let Some(sock) = &socket {
            wait_for(
                Duration::from_secs(10),
                || sock.exists(),
                "unix socket to appear",
            );
        }
        let size = opts
            .size
            .unwrap_or_else(|| std::fs::metadata(&backing).map(|m| m.len()).unwrap_or(0));
        Blockd {
            child: Some(child),
            addr,
            socket,
            backing,
            export,
            size,
            log,
            dir,
        }
    }

    /// The TCP address (panics when blockd was started without one).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("blockd has no TCP listener")
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.addr(), self.export)
    }

    /// `nbds://127.0.0.1:PORT/EXPORT?tls-certificates=DIR`
    pub fn tls_uri(&self, cert_dir: &Path) -> String {
        format!(
            "nbds://{}/{}?tls-certificates={}",
            self.addr(),
            self.export,
            cert_dir.display()
        )
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self) -> String {
        let sock = self.socket.as_ref().expect("blockd has no unix socket");
        format!("nbd+unix:///{}?socket={}", self.export, sock.display())
    }

    /// A scratch directory that lives as long as this server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything blockd wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends SIGTERM and waits (at most 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("blockd already stopped");
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                panic!(
                    "blockd did not exit within 30 s of SIGTERM (killed: {status}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and asserts a graceful exit (status 0).
    pub fn stop(mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "blockd exited with {status} after SIGTERM; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Blockd {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if std::thread::panicking() {
            if let Some(mut child) = self.child.take() {
                // SAFETY: kill(2) on our own, not yet reaped child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(Some(status)) = child.try_wait() {
                        eprintln!("blockd exited with {status}");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("blockd did not exit within 10 s of SIGTERM; killed");
            }
            return;
        }
        let status = self.terminate();
        eprintln!("blockd exited with {status}");
        assert!(
            status.success(),
            "blockd exited with {status} after SIGTERM; log:\n{}",
            self.log()
        );
    }
}

/// Kills and reaps a helper process (a client script) when dropped, so a failing test leaves no strays.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Parses the first `IP:PORT` after " on " in blockd's ready line.
pub fn parse_ready_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line
        .rsplit_once(" on ")
        .or_else(|| line.split_once(" on "))?;
    rest.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .map(|t| t.trim_matches(|c: char| c == '(' || c == ')' || c == '"' || c == '\''))
        .map(|t| t.strip_prefix("tcp://").unwrap_or(t))
        .find_map(|t| t.parse().ok())
}

/// Polls `cond` until true or panics after `timeout`.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion with a timeout (killed on expiry), capturing stdout and stderr.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let out_reader = spawn_reader(child.stdout.take().expect("stdout"));
    let err_reader = spawn_reader(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "timed out after {timeout:?}: {desc}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

fn spawn_reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs a command with a timeout and asserts it succeeded; returns stdout as a String.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run_timeout(cmd, timeout);
    assert!(
        out.status.success(),
        "{desc} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small deterministic PRNG (splitmix64) for reproducible test data.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Writes `size` bytes of seeded pseudo-random data to `path`.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = TestRng::new(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create random file"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    f.flush().expect("flush random file");
}

/// BLAKE3 checksum of a file's contents, as hex.
pub fn file_checksum(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for checksum");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.finalize().to_hex().to_string()
}

/// Creates a CA, a server certificate for 127.0.0.1/localhost and a client certificate with `openssl`, in the
/// gnutls/libnbd layout: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` in `server_dir`; `ca-cert.pem`,
/// `client-cert.pem`, `client-key.pem` in `client_dir` (what libnbd's `tls-certificates=DIR` reads).
pub fn make_tls_certs(server_dir: &Path, client_dir: &Path) {
    let openssl = require_tool("openssl", "openssl");
    std::fs::create_dir_all(server_dir).expect("mkdir server cert dir");
    std::fs::create_dir_all(client_dir).expect("mkdir client cert dir");
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let t = Duration::from_secs(60);
    let ca_cert = server_dir.join("ca-cert.pem");
    let ca_key = w.join("ca-key.pem");
    run_ok(
        Command::new(&openssl)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .args(["-days", "30", "-subj", "/CN=blockd test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca_cert),
        t,
    );
    let issue = |cn: &str, ext: &str, key: &Path, cert: &Path| {
        let csr = w.join(format!("{cn}.csr"));
        let ext_file = w.join(format!("{cn}.ext"));
        run_ok(
            Command::new(&openssl)
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                ])
                .args(["-subj", &format!("/CN={cn}")])
                .arg("-keyout")
                .arg(key)
                .arg("-out")
                .arg(&csr),
            t,
        );
        std::fs::write(&ext_file, ext).expect("write extension file");
        run_ok(
            Command::new(&openssl)
                .args(["x509", "-req", "-days", "30", "-CAcreateserial"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&ca_cert)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&ext_file)
                .arg("-out")
                .arg(cert),
            t,
        );
    };
    issue(
        "localhost",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        &server_dir.join("server-key.pem"),
        &server_dir.join("server-cert.pem"),
    );
    issue(
        "blockd-test-client",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        &client_dir.join("client-key.pem"),
        &client_dir.join("client-cert.pem"),
    );
    std::fs::copy(&ca_cert, client_dir.join("ca-cert.pem")).expect("copy ca cert");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_addresses_parse() {
        let line = r#"blockd: serving export "blockd" (1073741824 bytes, engine io_uring) on 127.0.0.1:43125"#;
        assert_eq!(
            parse_ready_addr(line),
            Some("127.0.0.1:43125".parse().unwrap())
        );
        let both =
            r#"blockd: serving export "b" (1 bytes, engine sync) on 127.0.0.1:5, unix:/tmp/x.sock"#;
        assert_eq!(parse_ready_addr(both), Some("127.0.0.1:5".parse().unwrap()));
        let v6 = "blockd: serving export \"b\" (1 bytes, engine sync) on [::1]:99";
        assert_eq!(parse_ready_addr(v6), Some("[::1]:99".parse().unwrap()));
        assert_eq!(
            parse_ready_addr("blockd: serving export on unix:/tmp/x.sock"),
            None
        );
    }

    #[test]
    fn test_rng_is_deterministic_and_fills_odd_lengths() {
        let (mut a, mut b) = (TestRng::new(7), TestRng::new(7));
        let (mut x, mut y) = (vec![0u8; 13], vec![0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert_ne!(x, vec![0u8; 13]);
        assert!((0..1000).all(|_| a.below(10) < 10));
    }
}
pub mod faults;
pub mod link_proxy;
pub mod repl;
