//! The userspace TCP proxy that stands in for the replication link between two test nodes
//! ([`LinkProxy`]: forward, count bytes, delay, stall, throttle, cut, small socket buffers),
//! and a 2-node cluster whose link runs through it ([`ProxiedPair`]: n1 listens on 127.0.0.2,
//! n0, which has the lower id and dials, reaches it only through the proxy on 127.0.0.1).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::repl::{Cluster, ClusterOptions, RESOURCE, free_port};

/// What the proxy does with the bytes of its link, both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Forward at once.
    Pass,
    /// Hold every chunk for this many milliseconds after it arrived, then forward in order.
    Delay(u64),
    /// Forward nothing (bytes are held, the connections stay open): a silent link.
    Stall,
    /// Every connection is closed and new ones are closed as soon as they arrive.
    Cut,
}

/// How the proxy reads and buffers: fixed when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Bytes read (and forwarded) at a time: the throttle's granularity.
    pub chunk: usize,
    /// SO_RCVBUF/SO_SNDBUF asked for on the proxy's sockets (the kernel doubles it); `None`
    /// leaves the kernel's defaults.
    pub socket_buffer: Option<i32>,
    /// At most one chunk per direction inside the proxy: the next is read only once the last
    /// was written (and throttled), so a held or throttled link fills the sender's own send
    /// queue. Without it the proxy reads whatever arrives and queues it (a delayed or stalled
    /// link still takes the bytes in, like a long network path).
    pub backpressure: bool,
}

impl LinkConfig {
    /// 64 KiB chunks, the kernel's socket buffers, reads queued: for counting, delaying,
    /// stalling and cutting a link.
    pub const QUEUED: LinkConfig = LinkConfig {
        chunk: 64 << 10,
        socket_buffer: None,
        backpressure: false,
    };

    /// 8 KiB chunks, 32 KiB socket buffers, backpressure: data held by
    /// [`LinkProxy::hold_forward`] or [`LinkProxy::throttle_forward`] waits in the dialing
    /// node's send queue rather than in the kernel or the proxy.
    pub const TIGHT: LinkConfig = LinkConfig {
        chunk: 8 << 10,
        socket_buffer: Some(32 << 10),
        backpressure: true,
    };
}

/// Forward: from the dialing side (the proxy's client) to the target; reverse: back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward = 0,
    Reverse = 1,
}

struct Shared {
    config: LinkConfig,
    mode: Mutex<LinkMode>,
    changed: Condvar,
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    accepted: AtomicU64,
    /// Bytes forwarded, by [`Direction`].
    bytes: [AtomicU64; 2],
    /// The forward direction reads nothing more while set.
    hold_forward: AtomicBool,
    /// Forward direction limit in bytes per second (0: none).
    forward_rate: AtomicU64,
}

impl Shared {
    fn mode(&self) -> LinkMode {
        *self.mode.lock().unwrap()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A TCP proxy for one replication link whose behaviour the test changes at any time: the
/// [`LinkMode`] of both directions, a hold or a rate limit on the forward direction, and byte
/// counters. Dropping it stops it and closes every connection.
pub struct LinkProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl LinkProxy {
    /// Listens on 127.0.0.1:`listen_port` and forwards every connection to `target`
    /// ([`LinkConfig::QUEUED`]).
    pub fn start(listen_port: u16, target: SocketAddr) -> LinkProxy {
        LinkProxy::start_with(listen_port, target, LinkConfig::QUEUED)
    }

    /// [`LinkProxy::start`] with another [`LinkConfig`].
    pub fn start_with(listen_port: u16, target: SocketAddr, config: LinkConfig) -> LinkProxy {
        let listener = TcpListener::bind(("127.0.0.1", listen_port)).expect("bind link proxy");
        if let Some(size) = config.socket_buffer {
            // Accepted sockets inherit the buffers (and the window they advertise).
            set_buffers(&listener, size);
        }
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared {
            config,
            mode: Mutex::new(LinkMode::Pass),
            changed: Condvar::new(),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            hold_forward: AtomicBool::new(false),
            forward_rate: AtomicU64::new(0),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            while !sh.stopped() {
                match listener.accept() {
                    Ok((client, _)) => {
                        if sh.mode() == LinkMode::Cut {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let sh = sh.clone();
                        // Connecting may hang (a SYN dropped by nftables): not on the accept loop.
                        std::thread::spawn(move || connect_and_pump(client, target, sh));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        LinkProxy {
            port: listen_port,
            shared,
        }
    }

    pub fn mode(&self) -> LinkMode {
        self.shared.mode()
    }

    /// Switches the link's behaviour; `Cut` also closes every open connection.
    pub fn set(&self, mode: LinkMode) {
        *self.shared.mode.lock().unwrap() = mode;
        self.shared.changed.notify_all();
        if mode == LinkMode::Cut {
            for s in self.shared.conns.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Holds (true) or releases (false) the forward direction: after the chunk in hand (one
    /// read just before the hold is held too) nothing more is read from the dialing side; the
    /// reverse direction flows.
    pub fn hold_forward(&self, on: bool) {
        self.shared.hold_forward.store(on, Ordering::SeqCst);
    }

    /// Limits the forward direction to `bytes_per_sec` (0: no limit).
    pub fn throttle_forward(&self, bytes_per_sec: u64) {
        self.shared
            .forward_rate
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Connections accepted and forwarded so far (a reconnect of the nodes adds one).
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far, both directions, every connection.
    pub fn bytes(&self) -> u64 {
        self.shared
            .bytes
            .iter()
            .map(|b| b.load(Ordering::SeqCst))
            .sum()
    }

    /// Bytes forwarded so far from the dialing side to the target, every connection.
    pub fn forwarded(&self) -> u64 {
        self.shared.bytes[Direction::Forward as usize].load(Ordering::SeqCst)
    }

    /// Sets the byte counters to zero.
    pub fn reset_bytes(&self) {
        for b in &self.shared.bytes {
            b.store(0, Ordering::SeqCst);
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.set(LinkMode::Cut);
    }
}

fn set_buffers(socket: &impl AsRawFd, size: i32) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt(2) on an open socket borrowed for the call, with a pointer to a
        // live c_int and its size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

fn connect_and_pump(client: TcpStream, target: SocketAddr, sh: Arc<Shared>) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    if let Some(size) = sh.config.socket_buffer {
        set_buffers(&server, size);
    }
    {
        // Registered under the lock that `set(Cut)` drains: a connection made while the link
        // was being cut is closed here.
        let mut conns = sh.conns.lock().unwrap();
        if sh.mode() == LinkMode::Cut || sh.stopped() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            return;
        }
        for s in [&client, &server] {
            if let Ok(s) = s.try_clone() {
                conns.push(s);
            }
        }
    }
    sh.accepted.fetch_add(1, Ordering::SeqCst);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    for (from, to, dir) in [
        (client.try_clone(), server.try_clone(), Direction::Forward),
        (server.try_clone(), client.try_clone(), Direction::Reverse),
    ] {
        let (Ok(from), Ok(to)) = (from, to) else {
            continue;
        };
        let sh = sh.clone();
        std::thread::spawn(move || pump_direction(from, to, dir, sh));
    }
}

/// One direction: a reader thread stamps each chunk with its arrival time; this thread
/// forwards it once the mode allows (after the delay, not while stalled) and at the rate.
fn pump_direction(mut from: TcpStream, mut to: TcpStream, dir: Direction, sh: Arc<Shared>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    // With backpressure, the forwarding side answers each chunk once it is written.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let sh_r = sh.clone();
    std::thread::spawn(move || {
        let sh = sh_r;
        let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = vec![0u8; sh.config.chunk];
        let mut outstanding = 0usize;
        'read: loop {
            if sh.stopped() {
                break;
            }
            while sh.config.backpressure && outstanding > 0 {
                match done_rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(()) => outstanding -= 1,
                    Err(mpsc::RecvTimeoutError::Timeout) if !sh.stopped() => {}
                    // Stopped, or the forwarding side ended (cut, write failed).
                    Err(_) => break 'read,
                }
            }
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(_) => break,
            };
            // Checked after the read: a chunk read just before a hold is held too.
            while dir == Direction::Forward && sh.hold_forward.load(Ordering::SeqCst) {
                if sh.stopped() {
                    break 'read;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            outstanding += 1;
            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
        // EOF or error: dropping `tx` lets the forwarding side send what is queued, then close.
    });
    'chunks: while let Ok((arrived, chunk)) = rx.recv() {
        loop {
            if sh.stopped() {
                break 'chunks;
            }
            let release = match sh.mode() {
                LinkMode::Pass => arrived,
                LinkMode::Delay(ms) => arrived + Duration::from_millis(ms),
                LinkMode::Cut => break 'chunks,
                LinkMode::Stall => {
                    let g = sh.mode.lock().unwrap();
                    let _ = sh.changed.wait_timeout(g, Duration::from_millis(50));
                    continue;
                }
            };
            let now = Instant::now();
            if release <= now {
                break;
            }
            // Sleep in short steps so a mode change (heal, cut) takes effect promptly.
            std::thread::sleep((release - now).min(Duration::from_millis(20)));
        }
        let rate = match dir {
            Direction::Forward => sh.forward_rate.load(Ordering::SeqCst),
            Direction::Reverse => 0,
        };
        let started = Instant::now();
        if to.write_all(&chunk).is_err() {
            break;
        }
        sh.bytes[dir as usize].fetch_add(chunk.len() as u64, Ordering::SeqCst);
        if rate > 0 {
            let due = Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
            if let Some(left) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(left);
            }
        }
        if sh.config.backpressure {
            let _ = done_tx.send(());
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// A 2-node cluster whose replication link runs through a [`LinkProxy`]: n1 listens on
/// 127.0.0.2, n0 (the lower id, so it dials) reaches it only through the proxy on 127.0.0.1.
/// `configs[i]` starts node `i`.
pub struct ProxiedPair {
    pub cluster: Cluster,
    pub proxy: LinkProxy,
    pub configs: [PathBuf; 2],
}

impl ProxiedPair {
    /// Creates the cluster (certificates, secret, metadata) and the proxy; starts nothing.
    pub fn create(opts: &ClusterOptions, link: LinkConfig) -> ProxiedPair {
        assert_eq!(opts.nodes, 2, "a proxied pair has two nodes");
        let c = Cluster::create(opts);
        let proxy_port = free_port();
        let n1_addr = format!("127.0.0.2:{}", c.nodes[1].repl_port);
        let n1_conf = c.config_with_address("n1.toml", 1, &n1_addr);
        let n0_conf = c.config_with_address("n0.toml", 1, &format!("127.0.0.1:{proxy_port}"));
        let proxy = LinkProxy::start_with(proxy_port, n1_addr.parse().expect("proxy target"), link);
        ProxiedPair {
            cluster: c,
            proxy,
            configs: [n0_conf, n1_conf],
        }
    }

    /// [`ProxiedPair::create`], then starts n0 and n1.
    pub fn start(opts: &ClusterOptions, link: LinkConfig) -> ProxiedPair {
        let mut p = ProxiedPair::create(opts, link);
        p.start_node(0);
        p.start_node(1);
        p
    }

    /// Starts (or restarts) node `i` with its proxied config.
    pub fn start_node(&mut self, i: usize) {
        let conf = self.configs[i].clone();
        self.cluster.start_node_with(i, &conf);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on 127.0.0.1; returns its address.
    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        addr
    }

    fn connect(p: &LinkProxy) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn echo(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
        s.write_all(data).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
        back
    }

    #[test]
    fn forwards_and_counts_both_directions() {
        let p = LinkProxy::start(free_port(), echo_server());
        let mut s = connect(&p);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(echo(&mut s, &data), data);
        // A chunk is counted once written on: the client may read the last one first.
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.bytes() < 2 * data.len() as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.forwarded(), data.len() as u64);
        assert_eq!(p.bytes(), 2 * data.len() as u64);
        assert_eq!(p.connections(), 1);
        p.reset_bytes();
        assert_eq!(p.bytes(), 0);
    }

    #[test]
    fn delay_holds_each_chunk() {
        let p = LinkProxy::start(free_port(), echo_server());
        p.set(LinkMode::Delay(150));
        let mut s = connect(&p);
        let t = Instant::now();
        assert_eq!(echo(&mut s, b"ping"), b"ping");
        // Delayed once each way.
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn stall_holds_until_pass_and_cut_closes() {
        let p = LinkProxy::start(free_port(), echo_server());
        let mut s = connect(&p);
        assert_eq!(echo(&mut s, b"a"), b"a");
        p.set(LinkMode::Stall);
        s.write_all(b"b").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut one = [0u8; 1];
        assert!(
            s.read(&mut one).is_err(),
            "nothing comes back while stalled"
        );
        p.set(LinkMode::Pass);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"b");
        p.set(LinkMode::Cut);
        assert_eq!(s.read(&mut one).unwrap_or(0), 0, "the connection is closed");
        let mut again = connect(&p);
        assert_eq!(again.read(&mut one).unwrap_or(0), 0, "new ones are closed");
    }

    #[test]
    fn tight_hold_pushes_back_and_throttle_limits_the_rate() {
        let p = LinkProxy::start_with(free_port(), echo_server(), LinkConfig::TIGHT);
        let mut s = connect(&p);
        assert_eq!(echo(&mut s, b"x"), b"x");
        p.hold_forward(true);
        // With the proxy reading nothing more, the sender's writes stop being taken.
        s.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 0usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "writes never blocked ({sent} bytes)"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(p.forwarded(), 1, "nothing forwarded while held");
        s.set_nonblocking(false).unwrap();
        // Released at 1 MB/s: what was queued arrives at about that rate.
        p.throttle_forward(1 << 20);
        p.hold_forward(false);
        let t = Instant::now();
        let mut back = vec![0u8; sent];
        s.read_exact(&mut back).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let expect = sent as f64 / (1 << 20) as f64;
        assert!(
            secs >= expect * 0.7,
            "{sent} bytes in {secs:.2} s at 1 MiB/s"
        );
    }
}
