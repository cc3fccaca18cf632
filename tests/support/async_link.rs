//! For the asynchronous-replication tests (tests/repl_async_truth.rs): a replication link
//! proxy that can stall or throttle the Primary-to-Secondary direction while the other direction
//! flows (so the Primary's keepalive holds), with small socket buffers so that held data waits
//! in the Primary's send queue rather than in the kernel; a 2-node cluster whose link runs
//! through it; and the control-socket status read in-process (fast enough for a short stall).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::repl::{Cluster, ClusterOptions, RESOURCE, free_port};

/// Socket buffer size asked for on the proxy's sockets (the kernel doubles it).
const PROXY_SOCKET_BUFFER: i32 = 32 << 10;

/// A TCP proxy for one replication link. The forward direction (the dialing node, n0, to the
/// listening node) can be stalled (nothing forwarded, bytes held) or throttled to a rate; the
/// reverse direction always flows. Dropping it cuts every connection.
pub struct StallProxy {
    pub port: u16,
    stalled: Arc<AtomicBool>,
    /// Forward direction limit in bytes per second (0: none).
    rate: Arc<AtomicU64>,
    /// Bytes forwarded in the forward direction so far.
    forwarded: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn set_buffers(fd: i32) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt(2) on an open socket we own, with a pointer to a live c_int and its
        // size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&PROXY_SOCKET_BUFFER as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

impl StallProxy {
    /// Listens on `listen_port` (127.0.0.1) and forwards every connection to `target`.
    pub fn start(listen_port: u16, target: SocketAddr) -> StallProxy {
        let listener = TcpListener::bind(("127.0.0.1", listen_port)).expect("bind proxy");
        // Accepted sockets inherit the small buffers (and the window they advertise).
        set_buffers(listener.as_raw_fd());
        listener.set_nonblocking(true).expect("nonblocking");
        let stalled = Arc::new(AtomicBool::new(false));
        let rate = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (st, rt, sp, fw) = (
            stalled.clone(),
            rate.clone(),
            stop.clone(),
            forwarded.clone(),
        );
        std::thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) =
                            TcpStream::connect_timeout(&target, Duration::from_secs(2))
                        else {
                            continue;
                        };
                        set_buffers(server.as_raw_fd());
                        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                            continue;
                        };
                        let fwd = Gate {
                            stalled: st.clone(),
                            rate: rt.clone(),
                            bytes: fw.clone(),
                        };
                        let back = Gate {
                            stalled: Arc::new(AtomicBool::new(false)),
                            rate: Arc::new(AtomicU64::new(0)),
                            bytes: Arc::new(AtomicU64::new(0)),
                        };
                        let (s1, s2_) = (sp.clone(), sp.clone());
                        std::thread::spawn(move || pump(client, server, fwd, &s1));
                        std::thread::spawn(move || pump(s2, c2, back, &s2_));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        StallProxy {
            port: listen_port,
            stalled,
            rate,
            forwarded,
            stop,
        }
    }

    /// Holds (true) or releases (false) the forward direction.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }

    /// Limits the forward direction to `bytes_per_sec` (0: no limit).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Bytes forwarded from n0 to n1 so far (every connection).
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a direction obeys.
struct Gate {
    stalled: Arc<AtomicBool>,
    rate: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

/// Bytes forwarded per step (the throttle's granularity).
const STEP: usize = 8 << 10;

fn pump(mut from: TcpStream, mut to: TcpStream, gate: Gate, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; STEP];
    'outer: loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        // Checked after the read: a chunk read just before a stall is held too.
        while gate.stalled.load(Ordering::SeqCst) {
            if stop.load(Ordering::SeqCst) {
                break 'outer;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let rate = gate.rate.load(Ordering::SeqCst);
        let started = Instant::now();
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        gate.bytes.fetch_add(n as u64, Ordering::SeqCst);
        if rate > 0 {
            let due = Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(left) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(left);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// A created 2-node cluster whose link runs through a [`StallProxy`]: n1 listens on
/// 127.0.0.2, n0 (which dials, and is the Primary in these tests) reaches it only through
/// the proxy.
pub struct StalledPair {
    pub cluster: Cluster,
    pub proxy: StallProxy,
    pub configs: [PathBuf; 2],
}

impl StalledPair {
    /// Creates the cluster and the proxy, starts both nodes.
    pub fn start(opts: &ClusterOptions) -> StalledPair {
        assert_eq!(opts.nodes, 2, "a stalled pair has two nodes");
        let c = Cluster::create(opts);
        let good = std::fs::read_to_string(&c.config).expect("read config");
        let n1_line = format!("address = \"127.0.0.1:{}\"", c.nodes[1].repl_port);
        assert!(good.contains(&n1_line), "config names n1's address");
        let proxy_port = free_port();
        let n1_conf = c.dir.path().join("n1.toml");
        let n1_addr = format!("127.0.0.2:{}", c.nodes[1].repl_port);
        std::fs::write(
            &n1_conf,
            good.replace(&n1_line, &format!("address = \"{n1_addr}\"")),
        )
        .expect("write n1 config");
        let n0_conf = c.dir.path().join("n0.toml");
        std::fs::write(
            &n0_conf,
            good.replace(&n1_line, &format!("address = \"127.0.0.1:{proxy_port}\"")),
        )
        .expect("write n0 config");
        let proxy = StallProxy::start(proxy_port, n1_addr.parse().expect("proxy target"));
        let mut p = StalledPair {
            cluster: c,
            proxy,
            configs: [n0_conf, n1_conf],
        };
        for i in 0..2 {
            let conf = p.configs[i].clone();
            p.cluster.start_node_with(i, &conf);
        }
        p
    }

    /// The control socket of node `i` (the cluster config puts it in the test directory).
    pub fn control_socket(&self, i: usize) -> PathBuf {
        self.cluster
            .dir
            .path()
            .join(format!("{}.sock", self.cluster.nodes[i].name))
    }

    /// Node `i`'s status of the test resource, read straight from its control socket (no
    /// process start: milliseconds, while a stall must stay shorter than the keepalive).
    pub fn status(&self, i: usize) -> serde_json::Value {
        let mut s = UnixStream::connect(self.control_socket(i)).expect("control socket");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let req = format!("{{\"v\":1,\"cmd\":\"status\",\"resource\":\"{RESOURCE}\"}}\n");
        s.write_all(req.as_bytes()).expect("send status request");
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .expect("status reply");
        let v: serde_json::Value = serde_json::from_str(&line).expect("status json");
        assert_eq!(v["ok"], true, "status failed: {line}");
        v["status"][0].clone()
    }

    /// The status of node `i`'s only peer.
    pub fn peer_status(&self, i: usize) -> serde_json::Value {
        self.status(i)["peers"][0].clone()
    }
}
