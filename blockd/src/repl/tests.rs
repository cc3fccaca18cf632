//! In-process runtime tests: two or three resources over loopback links, driven through the
//! library (promote, replicated writes, disconnect, resync), comparing the backing files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;

use crate::config::ClusterConfig;
use crate::repl::resource::{Resource, ResourceSpec, create_md};
use crate::repl::state::{ConnState, DiskState, ReplState, Role};

pub(super) const SIZE: u64 = 64 << 20;

pub(super) struct Cluster {
    dir: tempfile::TempDir,
    config: ClusterConfig,
    names: Vec<String>,
    listeners: Vec<Option<TcpListener>>,
}

pub(super) async fn cluster(nodes: usize, protocol: &str) -> Cluster {
    cluster_with(nodes, protocol, "").await
}

/// Like [`cluster`], with `extra` lines in the `[global]` section.
pub(super) async fn cluster_with(nodes: usize, protocol: &str, extra: &str) -> Cluster {
    cluster_in(nodes, protocol, extra, tempfile::tempdir().unwrap()).await
}

/// Like [`cluster_with`], with the backing files and metadata in `dir`.
async fn cluster_in(nodes: usize, protocol: &str, extra: &str, dir: tempfile::TempDir) -> Cluster {
    cluster_placed(nodes, protocol, extra, dir, &[]).await
}

/// Like [`cluster_in`]; the nodes numbered in `external_meta` keep their metadata in a file
/// of their own (`NAME.md`) instead of at the end of the backing file.
async fn cluster_placed(
    nodes: usize,
    protocol: &str,
    extra: &str,
    dir: tempfile::TempDir,
    external_meta: &[usize],
) -> Cluster {
    let ca = common::tls::generate_ca("test").unwrap();
    ca.write(&dir.path().join("ca.pem"), &dir.path().join("ca.key"))
        .unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
    let names: Vec<String> = ["alpha", "beta", "gamma"][..nodes]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // 64 activity-log extents unless `extra` sets them.
    let al = if extra.contains("al-extents") {
        ""
    } else {
        "al-extents = 64\n"
    };
    let mut text = format!(
        "[global]\nprotocol = \"{protocol}\"\nsecret-file = \"secret\"\nresync-rate = \"1G\"\n\
         {al}{extra}[global.tls]\nca = \"ca.pem\"\ncert = \"{{node}}.pem\"\nkey = \"{{node}}.key\"\n"
    );
    let mut listeners = Vec::new();
    for (id, n) in names.iter().enumerate() {
        common::tls::issue_cert(&ca, &[n.clone()])
            .unwrap()
            .write(
                &dir.path().join(format!("{n}.pem")),
                &dir.path().join(format!("{n}.key")),
            )
            .unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        listeners.push(Some(l));
        let img = dir.path().join(format!("{n}.img"));
        std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
        text.push_str(&format!(
            "[resource.r0.node.{n}]\nid = {id}\naddress = \"127.0.0.1:{port}\"\n\
             nbd = \"127.0.0.1:{}\"\nbacking = \"{n}.img\"\n",
            20000 + id
        ));
        if external_meta.contains(&id) {
            text.push_str(&format!("meta = \"{n}.md\"\n"));
        }
    }
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, &text).unwrap();
    let config = ClusterConfig::load(&file).unwrap();
    for n in &names {
        let local = config.resources_of(n).remove(0);
        create_md(&local, false).unwrap();
        assert!(
            create_md(&local, false).is_err(),
            "existing metadata is refused"
        );
    }
    Cluster {
        dir,
        config,
        names,
        listeners,
    }
}

impl Cluster {
    pub(super) fn start(&mut self, i: usize) -> Arc<Resource> {
        self.start_with(i, |_| {})
    }

    /// Like [`Cluster::start`], with the spec changed by `change` first.
    fn start_with(&mut self, i: usize, change: impl FnOnce(&mut ResourceSpec)) -> Arc<Resource> {
        let local = self.config.resources_of(&self.names[i]).remove(0);
        let mut spec = ResourceSpec::from_config(&local).unwrap();
        change(&mut spec);
        let res = Resource::attach(spec).unwrap();
        let l = match self.listeners[i].take() {
            Some(l) => l,
            None => {
                let std = std::net::TcpListener::bind(local.me.address).unwrap();
                std.set_nonblocking(true).unwrap();
                TcpListener::from_std(std).unwrap()
            }
        };
        tokio::spawn(res.run_with_listener(l));
        res
    }

    /// Node `i`'s replication address.
    fn address(&self, i: usize) -> std::net::SocketAddr {
        self.config
            .resources_of(&self.names[i])
            .remove(0)
            .me
            .address
    }

    fn image(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.img", self.names[i]))
    }
}

fn data_of(path: &Path, len: u64) -> Vec<u8> {
    let mut v = std::fs::read(path).unwrap();
    v.truncate(len as usize);
    v
}

pub(super) async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

pub(super) fn all_established(r: &Resource) -> bool {
    let s = r.status();
    s.peers
        .iter()
        .all(|p| p.replication == "established" && p.disk == "up-to-date")
}

pub(super) fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Under protocols A and B a flush does not wait for the peers: wait for their write acks.
async fn settle(primary: &Resource) {
    wait_for("peers to ack every write", || {
        primary.status().peers.iter().all(|p| p.in_flight == 0)
    })
    .await;
}

async fn write_some(r: &Resource, seed: u64, count: u64) {
    let mut tasks = Vec::new();
    for k in 0..count {
        let off = ((seed * 7919 + k * 104_729) % (SIZE / 4096 - 16)) * 4096;
        let len = 4096 * (1 + (k % 4) as usize);
        tasks.push(r.write(off, pattern(seed * 1000 + k, len), k % 5 == 0));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn replicate_and_resync(protocol: &str) {
    let mut c = cluster(2, protocol).await;
    let a = c.start(0);
    let b = c.start(1);
    wait_for("link", || {
        a.status().peers[0].connection == "connected"
            && b.status().peers[0].connection == "connected"
    })
    .await;
    // A secondary refuses writes.
    assert!(
        a.write(0, Bytes::from_static(&[1; 512]), false)
            .await
            .is_err()
    );
    assert!(
        a.promote(false).await.is_err(),
        "inconsistent data needs --force"
    );
    a.promote(true).await.unwrap();
    assert!(b.promote(false).await.is_err(), "one primary");
    wait_for("initial sync", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    write_some(&a, 1, 200).await;
    a.flush().await.unwrap();
    settle(&a).await;
    b.store().flush().await.unwrap();
    let size = a.size();
    assert_eq!(data_of(&c.image(0), size), data_of(&c.image(1), size));

    // Degraded mode: writes while disconnected go into the bitmap, then resync.
    a.disconnect(Some("beta")).unwrap();
    wait_for("disconnect", || {
        a.status().peers[0].connection == "standalone"
    })
    .await;
    write_some(&a, 2, 100).await;
    let dirty = a.status().peers[0].out_of_sync_bytes;
    assert!(dirty > 0 && dirty <= 100 * 4 * 4096, "dirty {dirty}");
    a.connect(Some("beta"), false).unwrap();
    wait_for("resync", || all_established(&a) && all_established(&b)).await;
    assert_eq!(a.status().peers[0].out_of_sync_bytes, 0);
    a.flush().await.unwrap();
    settle(&a).await;
    b.store().flush().await.unwrap();
    assert_eq!(data_of(&c.image(0), size), data_of(&c.image(1), size));

    // Failover: demote, promote the other side, write there, back again.
    a.demote().await.unwrap();
    wait_for("demotion seen", || b.status().peers[0].role == "secondary").await;
    b.promote(false).await.unwrap();
    write_some(&b, 3, 50).await;
    b.flush().await.unwrap();
    settle(&b).await;
    a.store().flush().await.unwrap();
    assert_eq!(data_of(&c.image(0), size), data_of(&c.image(1), size));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_c_replicates_and_resyncs() {
    replicate_and_resync("C").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_status_promote_and_errors() {
    use crate::control::client::Client;
    use crate::control::proto::{ErrorCode, Request};
    let mut c = cluster(2, "C").await;
    let a = c.start(0);
    let b = c.start(1);
    let path = c.dir.path().join("alpha.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(crate::control::server::serve(
        l,
        vec![a.clone()],
        std::future::pending(),
    ));
    let mut cl = Client::connect(&path).await.unwrap();
    let r = cl.call(&Request::new("promote", Some("r0"))).await.unwrap();
    assert_eq!(r.code, Some(ErrorCode::Refused), "{r:?}");
    let r = cl
        .call(&Request::new("status", Some("nope")))
        .await
        .unwrap();
    assert_eq!(r.code, Some(ErrorCode::Unknown));
    let mut bad = Request::new("status", None);
    bad.v = 9;
    assert_eq!(
        cl.call(&bad).await.unwrap().code,
        Some(ErrorCode::BadRequest)
    );
    let mut ev = Client::connect(&path).await.unwrap();
    assert_eq!(
        ev.call(&Request::new("events", None)).await.unwrap().ok,
        Some(true)
    );
    let mut force = Request::new("promote", Some("r0"));
    force.force = true;
    assert_eq!(cl.call(&force).await.unwrap().ok, Some(true));
    let first = ev.next().await.unwrap().event.unwrap();
    assert_eq!(first.resource, "r0");
    for _ in 0..1500 {
        if all_established(&a) && all_established(&b) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        all_established(&a) && all_established(&b),
        "{:#?} {:#?}",
        a.status(),
        b.status()
    );
    let st = cl
        .call(&Request::new("status", Some("r0")))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st[0].role, "primary");
    assert_eq!(st[0].peers[0].replication, "established");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_b_replicates_and_resyncs() {
    replicate_and_resync("B").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_a_replicates_and_resyncs() {
    replicate_and_resync("A").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_and_restart_resume() {
    let mut c = cluster(3, "C").await;
    let a = c.start(0);
    let b = c.start(1);
    let g = c.start(2);
    wait_for("links", || {
        [&a, &b, &g]
            .iter()
            .all(|r| r.status().peers.iter().all(|p| p.connection == "connected"))
    })
    .await;
    a.promote(true).await.unwrap();
    wait_for("initial sync", || all_established(&a)).await;
    write_some(&a, 5, 300).await;
    a.flush().await.unwrap();
    for r in [&b, &g] {
        r.store().flush().await.unwrap();
    }
    let size = a.size();
    let want = data_of(&c.image(0), size);
    assert_eq!(want, data_of(&c.image(1), size));
    assert_eq!(want, data_of(&c.image(2), size));

    // gamma goes away (clean shutdown), alpha keeps writing; gamma comes back and resyncs.
    g.shutdown().await;
    drop(g);
    wait_for("gamma gone", || {
        a.status().peers[1].connection != "connected"
    })
    .await;
    write_some(&a, 6, 100).await;
    assert!(a.status().peers[1].out_of_sync_bytes > 0);
    assert_eq!(a.role(), Role::Primary);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let g = c.start(2);
    wait_for("gamma resynced", || {
        all_established(&a) && all_established(&g)
    })
    .await;
    a.flush().await.unwrap();
    g.store().flush().await.unwrap();
    assert_eq!(data_of(&c.image(0), size), data_of(&c.image(2), size));
    for r in [&a, &b, &g] {
        r.shutdown().await;
    }
}

/// A write's activity-log registration is given back when its task is cancelled (a session
/// that ends aborts the Secondary's applies), also while its transaction is being persisted:
/// no slot stays counted in flight and no transaction stays "being persisted".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_log_registrations_are_given_back_when_cancelled() {
    let mut c = cluster(2, "C").await;
    let r = c.start(0);
    let es = 4 << 20;
    let extent = 5u32;
    let at = u64::from(extent) * es;
    // Cold extent: the registration persists a transaction. Poll it once, then drop it.
    {
        let fut = r.al_begin(at, 4096);
        tokio::pin!(fut);
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx).is_ready()))
                .await;
        assert!(
            !polled,
            "a cold extent's registration waits for its transaction"
        );
    }
    // The persisting task hands the registration back after it counted the transaction
    // persisted (the hold is dropped with the task's unclaimed result, a moment later).
    wait_for(
        "transaction persisted and the cancelled write given back",
        || {
            let m = r.meta.lock().unwrap();
            m.al_persisting == 0 && m.al.inflight(extent) == 0
        },
    )
    .await;
    assert!(r.meta.lock().unwrap().al.active_extents().contains(&extent));
    // Hot now: the inline registration works, and counts until dropped.
    let hold = r.al_begin_hot(at + 8192, 4096).expect("hot extent");
    assert_eq!(r.meta.lock().unwrap().al.inflight(extent), 1);
    drop(hold);
    assert_eq!(r.meta.lock().unwrap().al.inflight(extent), 0);
    // A range wider than the log is applied in parts of half its slots, ending on extents.
    assert_eq!(r.al_part_len(0), 32 * es);
    assert_eq!(r.al_part_len(es + 4096), 32 * es - 4096);
}

/// A transaction that evicts an extent ends that extent's protection, so the writes to it that
/// completed into the page cache only must be durable before it is written: else a power loss
/// takes them here while the peers have them, and the extent is in no log to resync. With
/// external metadata the backing is flushed first (the log on disk still names the evicted
/// extent while that flush runs); with internal metadata the metadata file is the backing file,
/// whose own `fdatasync` before the transaction covers the data, and nothing more is flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backing_is_flushed_before_a_transaction_evicts_an_extent() {
    let mut c = cluster_placed(2, "C", "", tempfile::tempdir().unwrap(), &[0]).await;
    let es = 4u64 << 20;
    // One node at a time: a connected pair would flush for its resync too.
    for (node, external) in [(0, true), (1, false)] {
        let r = c.start(node);
        // The extents the log on disk names each time a flush of the backing starts.
        let seen: Arc<std::sync::Mutex<Vec<Vec<u32>>>> = Arc::default();
        {
            let meta = r.meta.clone();
            let seen = seen.clone();
            r.store().on_flush_for_test(move || {
                let on_disk = meta.lock().unwrap().file.read_activity_log().unwrap();
                seen.lock().unwrap().push(on_disk.active_extents());
            });
        }
        let capacity = r.meta.lock().unwrap().al.capacity();
        // Every slot taken (empty slots first: nothing evicted, nothing flushed).
        for e in 0..capacity {
            drop(r.al_begin(u64::from(e) * es, 4096).await.unwrap());
        }
        assert_eq!(*seen.lock().unwrap(), Vec::<Vec<u32>>::new(), "node {node}");
        // A new extent evicts the least recently used one, extent 0.
        let hold = r.al_begin(u64::from(capacity) * es, 4096).await.unwrap();
        let on_disk = r.meta.lock().unwrap().file.read_activity_log().unwrap();
        assert!(
            !on_disk.active_extents().contains(&0),
            "node {node}: 0 evicted"
        );
        assert!(on_disk.active_extents().contains(&capacity), "node {node}");
        let flushes = std::mem::take(&mut *seen.lock().unwrap());
        r.store().on_flush_for_test(|| {});
        if external {
            assert_eq!(flushes.len(), 1, "one flush of the backing: {flushes:?}");
            assert!(
                flushes[0].contains(&0) && !flushes[0].contains(&capacity),
                "the backing is flushed before the evicting transaction is written: {flushes:?}"
            );
        } else {
            assert_eq!(
                flushes,
                Vec::<Vec<u32>>::new(),
                "internal metadata: the metadata file's sync covers the data"
            );
        }
        drop(hold);
        r.shutdown().await;
    }
}

/// A failed preflush of the backing is a disk failure ([`AlError::Preflush`], for
/// `on-io-error`) and the evicting transaction is not written: the extent it would have
/// evicted stays in the log, on disk and in memory. Once the disk works again the next
/// registration evicts it as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_preflush_keeps_the_extent_in_the_activity_log() {
    use crate::repl::device::AlError;
    let mut c = cluster_placed(2, "C", "", tempfile::tempdir().unwrap(), &[0]).await;
    let r = c.start(0);
    let es = 4u64 << 20;
    let capacity = r.meta.lock().unwrap().al.capacity();
    for e in 0..capacity {
        drop(r.al_begin(u64::from(e) * es, 4096).await.unwrap());
    }
    let before = r.meta.lock().unwrap().al.active_extents();
    // The disk fails its next flush (the engine is gone).
    let good = r.store.current();
    let broken =
        crate::store::BlockStore::open(&c.image(0), &crate::store::OpenOptions::default()).unwrap();
    broken.kill_engine_for_test();
    r.store.replace(broken);
    let new = u64::from(capacity) * es;
    let err = r
        .al_begin(new, 4096)
        .await
        .err()
        .expect("the preflush fails");
    assert!(matches!(err, AlError::Preflush(_)), "{err:?}");
    {
        let m = r.meta.lock().unwrap();
        assert_eq!(m.al.active_extents(), before, "nothing evicted in memory");
        assert_eq!(m.al_persisting, 0);
        let on_disk = m.file.read_activity_log().unwrap();
        assert_eq!(on_disk.active_extents(), before, "nothing evicted on disk");
    }
    r.store.replace(good);
    drop(r.al_begin(new, 4096).await.unwrap());
    let on_disk = r.meta.lock().unwrap().file.read_activity_log().unwrap();
    assert!(
        !on_disk.active_extents().contains(&0),
        "extent 0 evicted now"
    );
    assert!(on_disk.active_extents().contains(&capacity));
    r.shutdown().await;
}

/// Under protocol A a write's activity-log extent stays registered on the Primary until the
/// peer has written it (`WriteAck`) or the session's loss handler has marked it in the peer's
/// bitmap: the client is answered while the data may still wait in the outbox, and an extent
/// evicted then would be missing from the log a crashed Primary replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extent_stays_in_the_activity_log_until_the_peer_wrote_it() {
    let mut c = cluster(2, "A").await;
    let a = c.start(0);
    let b = c.start(1);
    a.promote(true).await.unwrap();
    wait_for("initial sync", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    let es = 4u64 << 20;
    let inflight = |e: u32| a.meta.lock().unwrap().al.inflight(e);
    // The peer cannot register the cold extent in its own log: it does not write or ack.
    let gate = b.al_gate.clone().lock_owned().await;
    a.write(5 * es, pattern(1, 4096), false).await.unwrap();
    assert_eq!(a.status().peers[0].in_flight, 1, "not acknowledged yet");
    assert_eq!(
        inflight(5),
        1,
        "held for the peer after the client's answer"
    );
    drop(gate);
    wait_for("the peer's ack to release the extent", || inflight(5) == 0).await;
    // Lost before it acked: released once the range is marked for the peer.
    let gate = b.al_gate.clone().lock_owned().await;
    a.write(6 * es, pattern(2, 4096), false).await.unwrap();
    assert_eq!(inflight(6), 1);
    a.disconnect(Some("beta")).unwrap();
    wait_for("disconnect", || {
        a.status().peers[0].connection == "standalone"
    })
    .await;
    assert_eq!(inflight(6), 0, "released by the loss handler");
    assert!(
        a.status().peers[0].out_of_sync_bytes >= 4096,
        "marked first"
    );
    drop(gate);
    a.shutdown().await;
    b.shutdown().await;
}

/// A request wider than the activity log (here 7 extents of 4 MiB) is registered, replicated
/// and written in parts of half the log's slots; each part stays registered until the peer
/// wrote it, so a later part waits for the peer's acks of the earlier ones (protocol A: the
/// acks of queued data release the extents, nothing deadlocks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_wider_than_the_activity_log_is_written_in_parts() {
    let mut c = cluster_with(2, "A", "al-extents = 7\n").await;
    let a = c.start(0);
    let b = c.start(1);
    a.promote(true).await.unwrap();
    wait_for("initial sync", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    let es = 4u64 << 20;
    assert_eq!(a.al_part_len(0), 3 * es);
    let held = |r: &Resource| {
        (0..16u32)
            .filter(|&e| r.meta.lock().unwrap().al.inflight(e) > 0)
            .collect::<Vec<_>>()
    };
    // 8 extents: parts of 3, 3 and 2. With the peer held back, the first two parts are in
    // the log for it and the third waits for room.
    let gate = b.al_gate.clone().lock_owned().await;
    let write = {
        let a = a.clone();
        tokio::spawn(async move { a.write(es, pattern(3, 8 * es as usize), false).await })
    };
    wait_for("two parts queued", || a.status().peers[0].in_flight == 2).await;
    assert_eq!(held(&a), [1, 2, 3, 4, 5, 6]);
    assert!(!write.is_finished());
    drop(gate);
    tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the peer's acks make room")
        .unwrap()
        .unwrap();
    // Zeroing the whole device, discarding half of it.
    let size = a.size();
    a.write_zeroes(0, size, false, false).await.unwrap();
    a.write(9 * es - 4096, pattern(4, 2 * es as usize), true)
        .await
        .unwrap();
    a.trim(0, 8 * es).await.unwrap();
    a.flush().await.unwrap();
    settle(&a).await;
    assert!(held(&a).is_empty());
    b.store().flush().await.unwrap();
    let (da, db) = (data_of(&c.image(0), size), data_of(&c.image(1), size));
    assert!(da[..8 * es as usize].iter().all(|&x| x == 0));
    assert!(da[9 * es as usize..].iter().any(|&x| x != 0));
    assert!(da == db, "the replicas are the same");
    a.shutdown().await;
    b.shutdown().await;
}

/// A replicated request past the end of the device (a malformed or hostile peer) is refused
/// before anything is registered for it: an error for the session, no panic on the overflowing
/// range, no activity-log slot taken, and the disk stays attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_request_past_the_end_is_refused() {
    use crate::repl::peer::{Op, execute};
    let mut c = cluster(2, "C").await;
    let r = c.start(0);
    let before = r.meta.lock().unwrap().al.active_extents();
    let ops = [
        Op::Zero {
            offset: u64::MAX - 10,
            len: 100,
            trim: true,
            fua: false,
        },
        Op::Zero {
            offset: SIZE - 4096,
            len: 8192,
            trim: false,
            fua: false,
        },
        Op::Write {
            offset: SIZE,
            data: Bytes::from_static(&[7; 512]),
            fua: false,
        },
    ];
    for op in ops {
        let err = execute(r.clone(), 0, op).await.err().expect("refused");
        assert!(err.contains("replicated request refused"), "{err}");
    }
    assert_eq!(r.meta.lock().unwrap().al.active_extents(), before);
    // A disk failure would detach in the background: give it the time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.status().disk, "inconsistent", "the disk stays attached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_zero_the_local_disk_cannot_do_fast_is_refused_before_the_peers_zero() {
    // tmpfs punches holes but has no zero-range: with NBD's NO_HOLE nothing is fast there.
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut c = cluster_in(2, "C", "", dir).await;
    let a = c.start(0);
    let b = c.start(1);
    a.promote(true).await.unwrap();
    wait_for("initial sync", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    a.write(0, pattern(5, 1 << 20), false).await.unwrap();
    let err = a.fast_zero(0, 65536, false).await.unwrap_err();
    assert!(matches!(err, crate::store::StoreError::NotFast), "{err}");
    // Punching is fast, on both sides.
    a.fast_zero(65536, 65536, true).await.unwrap();
    a.flush().await.unwrap();
    settle(&a).await;
    b.store().flush().await.unwrap();
    let size = a.size();
    let (da, db) = (data_of(&c.image(0), size), data_of(&c.image(1), size));
    assert_eq!(
        &da[..65536],
        &pattern(5, 65536)[..],
        "the refused range is unchanged"
    );
    assert!(da[65536..131072].iter().all(|&x| x == 0));
    assert!(da == db, "the replicas are the same");
    a.shutdown().await;
    b.shutdown().await;
}

/// The snapshot events seen so far.
fn snapshot_events(
    rx: &mut tokio::sync::broadcast::Receiver<crate::repl::resource::Event>,
) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if e.what == "snapshot" {
            out.push(e.value);
        }
    }
    out
}

/// A snapshot froze the local disk: detaching it invalidates every snapshot with a clear
/// reason (the disk attached later may hold other blocks, and its resync would overwrite the
/// frozen ones unpreserved), and so does attaching a disk under snapshots that are still valid
/// (reloaded over a disk that failed at start). Readers get an error, never other data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detaching_or_attaching_the_disk_invalidates_the_snapshots() {
    let mut c = cluster(2, "C").await;
    let r = c.start(0);
    let mut events = r.subscribe();
    let store = r.store();
    let snap = r.snapshots.set.open("s1", 1 << 20, 1, "").unwrap();
    assert!(snap.read(&store, 0, 4096).await.is_ok());
    r.detach(true).await.unwrap();
    let e = snap.read(&store, 0, 4096).await.unwrap_err().to_string();
    assert!(e.contains("detached"), "{e}");
    let ev = snapshot_events(&mut events);
    assert!(
        ev.iter()
            .any(|v| v.starts_with("invalidated s1:") && v.contains("detached")),
        "{ev:?}"
    );
    let st = r.snapshots();
    assert!(
        st[0].invalid.as_deref().unwrap().contains("detached"),
        "{st:?}"
    );
    // As if reloaded at a start where the disk failed: attaching invalidates it.
    let snap2 = r.snapshots.set.open("s2", 1 << 20, 1, "").unwrap();
    r.reattach().await.unwrap();
    let e = snap2
        .read(&r.store(), 0, 4096)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("attached again"), "{e}");
    let ev = snapshot_events(&mut events);
    assert_eq!(
        ev.iter().filter(|v| v.starts_with("invalidated")).count(),
        1,
        "only the snapshot still valid is reported: {ev:?}"
    );
}

/// A read error of the resync source's disk ends the session, and the next one resyncs again
/// (before: the worker stopped quietly and both sides stayed SyncSource/SyncTarget forever).
/// Once the resync has started, the source's store is swapped for a real, much smaller one:
/// the reads of the dirty blocks fail (out of range, not a disk failure, so the disk stays
/// attached; until the good store is back the handshakes fail on the size); the good store
/// back, the resync completes.
async fn resync_read_error_ends_the_session(extra: &str) {
    let mut c = cluster_with(2, "C", extra).await;
    let a = c.start(0);
    let b = c.start(1);
    wait_for("link", || {
        a.status().peers[0].connection == "connected"
            && b.status().peers[0].connection == "connected"
    })
    .await;
    a.promote(true).await.unwrap();
    wait_for("initial sync", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    a.disconnect(Some("beta")).unwrap();
    wait_for("disconnect", || {
        a.status().peers[0].connection == "standalone"
    })
    .await;
    for k in 0..8u64 {
        let off = (8 << 20) + k * (4 << 20);
        a.write(off, pattern(100 + k, 8192), false).await.unwrap();
    }
    a.flush().await.unwrap();
    assert!(a.status().peers[0].out_of_sync_bytes >= 8 * 8192);
    let good = a.store.current();
    let small = c.dir.path().join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let small =
        crate::store::BlockStore::open(&small, &crate::store::OpenOptions::default()).unwrap();
    // The first dirty run waits for this range: the store is swapped before it is read.
    let hold = a.ranges.lock(8 << 20, 4096).await;
    let mut events = a.subscribe();
    a.connect(Some("beta"), false).unwrap();
    wait_for("resync started", || {
        a.status().peers[0].replication == "sync-source"
    })
    .await;
    a.store.replace(small);
    drop(hold);
    let failed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ev = events.recv().await.unwrap();
            if ev.what == "error" && ev.value.contains("resync failed") {
                return ev.value;
            }
        }
    })
    .await
    .expect("the failed resync ends the session");
    assert!(failed.contains("resync read"), "{failed}");
    assert_eq!(
        a.status().disk,
        "up-to-date",
        "not a disk failure: attached"
    );
    assert_eq!(
        a.state.lock().unwrap().peers[0].resync_failed_sessions,
        1,
        "a failed session that cleared nothing counts"
    );
    // After one failed session the next resync as the source waits a second from that
    // failure; the admin's `connect` (after a repair) starts over without the wait.
    {
        let st = a.state.lock().unwrap();
        let wait = crate::repl::resync::resync_wait(
            st.peers[0].resync_not_before,
            std::time::Instant::now(),
        );
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
    }
    // The disk readable again: the next session's resync completes (a handshake that saw the
    // small store refused the size and left the link StandAlone: connect again).
    a.store.replace(good);
    a.connect(None, false).unwrap();
    b.connect(None, false).unwrap();
    {
        let st = a.state.lock().unwrap();
        assert_eq!(st.peers[0].resync_failed_sessions, 0);
        assert!(st.peers[0].resync_not_before.is_none());
    }
    wait_for("resync", || all_established(&a) && all_established(&b)).await;
    assert_eq!(
        a.state.lock().unwrap().peers[0].resync_failed_sessions,
        0,
        "a completed resync resets the count"
    );
    assert_eq!(a.status().peers[0].out_of_sync_bytes, 0);
    b.store().flush().await.unwrap();
    let size = a.size();
    assert_eq!(data_of(&c.image(0), size), data_of(&c.image(1), size));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_read_error_ends_the_session_plain() {
    resync_read_error_ends_the_session("csums = \"no\"\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_read_error_ends_the_session_checksum() {
    resync_read_error_ends_the_session("csums = \"yes\"\n").await;
}

/// Resync data the target acknowledged is cleared from the source's bitmap (which is persisted
/// as the walk goes and at the session's end) only once a flush sent after the acknowledgement
/// was acknowledged: the target writes resync data without FUA, and a power loss of the target
/// must not leave blocks it lost cleared on the source. Before, `acked` cleared at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_bits_are_cleared_only_after_the_targets_flush() {
    use crate::repl::peer::Conn;
    use crate::repl::resync;
    let mut c = cluster(2, "C").await;
    let a = c.start(0);
    let slot = a.peers[0].slot;
    let dirty = |r: &Resource| r.meta.lock().unwrap().bitmaps[slot].count_dirty_bytes();
    a.meta.lock().unwrap().bitmaps[slot].set_range(1 << 20, 2 << 20);
    assert_eq!(dirty(&a), 2 << 20);
    let conn = Arc::new(Conn::new(16 << 20, Box::new(|_| {})));
    resync::reading(&conn, 1 << 20, 2 << 20);
    resync::acked(&a, 0, &conn, 1 << 20, 1 << 20);
    assert_eq!(
        dirty(&a),
        2 << 20,
        "acknowledged, not yet durable: still dirty"
    );
    let settle = {
        let (a, conn) = (a.clone(), conn.clone());
        tokio::spawn(async move { resync::settle_acked(&a, 0, &conn).await })
    };
    wait_for("the flush sent", || conn.awaited_flushes().len() == 1).await;
    // Acknowledged after the flush was sent: not covered by it.
    resync::acked(&a, 0, &conn, 2 << 20, 1 << 20);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(dirty(&a), 2 << 20, "flush not acknowledged: still dirty");
    conn.flush_ack(conn.awaited_flushes()[0]);
    assert!(settle.await.unwrap(), "settled");
    assert_eq!(
        dirty(&a),
        1 << 20,
        "only the range acknowledged before the flush is cleared"
    );
    // A session that closes first clears nothing.
    let settle = {
        let (a, conn) = (a.clone(), conn.clone());
        tokio::spawn(async move { resync::settle_acked(&a, 0, &conn).await })
    };
    wait_for("the flush sent", || conn.awaited_flushes().len() == 1).await;
    conn.close();
    assert!(!settle.await.unwrap(), "link closed");
    assert_eq!(dirty(&a), 1 << 20);
    a.shutdown().await;
}

/// A range marked out of sync for the peer again after its resync chunk was read (here: the
/// unstable writes of a lost Primary, marked for the other peers) keeps its bits through that
/// chunk's acknowledgement and settle, whether the mark comes before the acknowledgement or
/// after it; the rest of the chunk is cleared. Before, the settle cleared the new mark and the
/// peer kept the older data of that block with nothing left to resync it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_after_the_resync_read_survives_the_settle() {
    use crate::repl::peer::Conn;
    use crate::repl::resync;
    let mut c = cluster(3, "C").await;
    let a = c.start(0);
    let slot = a.peers[0].slot;
    let bits = |r: &Resource| {
        r.meta.lock().unwrap().bitmaps[slot]
            .dirty_extents()
            .collect::<Vec<_>>()
    };
    let conn = Arc::new(Conn::new(16 << 20, Box::new(|_| {})));
    // The session with peer 0 (beta), a resync to it running.
    *a.peers[0].conn.lock().unwrap() = Some(conn.clone());
    let settle = |a: &Arc<Resource>, conn: &Arc<Conn>| {
        let (a, conn) = (a.clone(), conn.clone());
        async move {
            let t = tokio::spawn({
                let (a, conn) = (a.clone(), conn.clone());
                async move { resync::settle_acked(&a, 0, &conn).await }
            });
            wait_for("the flush sent", || conn.awaited_flushes().len() == 1).await;
            conn.flush_ack(conn.awaited_flushes()[0]);
            assert!(t.await.unwrap(), "settled");
        }
    };
    a.meta.lock().unwrap().bitmaps[slot].set_range(1 << 20, 2 << 20);
    // Chunk 1: read, acknowledged, then a block of it marked again (the session with gamma,
    // peer 1, ended with that write not known to be on beta).
    resync::reading(&conn, 1 << 20, 1 << 20);
    resync::acked(&a, 0, &conn, 1 << 20, 1 << 20);
    a.mark_unstable(1, &[((1 << 20) + 4096, 4096)]).await;
    // Chunk 2: read, a block of it marked while in flight, then acknowledged.
    resync::reading(&conn, 2 << 20, 1 << 20);
    a.mark_unstable(1, &[((3 << 20) - 4096, 4096)]).await;
    resync::acked(&a, 0, &conn, 2 << 20, 1 << 20);
    settle(&a, &conn).await;
    assert_eq!(
        bits(&a),
        [((1 << 20) + 4096, 4096), ((3 << 20) - 4096, 4096)],
        "the blocks marked after their read are still out of sync, the rest is cleared"
    );
    assert_eq!(conn.resync_unsettled_bytes(), 0);
    // The next pass reads them after the mark: cleared.
    for (o, l) in bits(&a) {
        resync::reading(&conn, o, l);
        resync::acked(&a, 0, &conn, o, l as u32);
    }
    settle(&a, &conn).await;
    assert_eq!(bits(&a), []);
    *a.peers[0].conn.lock().unwrap() = None;
    a.shutdown().await;
}

/// `promote-check` (what `blockctl promote` asks first) waits for the writes received from a
/// lost peer to be applied, as `promote` does, instead of refusing during the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_check_waits_for_received_writes_to_be_applied() {
    let mut c = cluster(2, "C").await;
    let r = c.start(0);
    r.finishing.send_replace(1);
    let r2 = r.clone();
    let check = tokio::spawn(async move { r2.promote_check(true).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!check.is_finished(), "answered before the applies finished");
    r.finishing.send_replace(0);
    let answer = tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .expect("still waiting")
        .unwrap();
    assert!(answer.is_ok(), "{answer:?}");
}

/// The control socket: a request line without an end is refused at 1 MiB (not read without
/// bound), and commands that change the role or the disk wait for one another per resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_requests_are_bounded_and_admin_commands_serialised() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut c = cluster(2, "C").await;
    let r = c.start(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::control::server::serve(
        listener,
        vec![r.clone()],
        async move {
            let _ = stopped.await;
        },
    ));
    let ask = |line: String| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(&path).await.unwrap();
            let (rd, mut wr) = s.into_split();
            let _ = wr.write_all(line.as_bytes()).await;
            let mut reply = String::new();
            BufReader::new(rd).read_line(&mut reply).await.unwrap();
            reply
        }
    };
    let long = "x".repeat(2 << 20);
    let reply = tokio::time::timeout(Duration::from_secs(10), ask(long))
        .await
        .expect("no answer to an endless line");
    assert!(reply.contains("longer than"), "{reply}");
    let admin = r.admin.lock().await;
    let demote = tokio::spawn(ask(
        "{\"v\":1,\"cmd\":\"demote\",\"resource\":\"r0\"}\n".to_string()
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!demote.is_finished(), "ran beside another admin command");
    // Status is not an admin command: answered meanwhile.
    let status = ask("{\"v\":1,\"cmd\":\"status\"}\n".to_string()).await;
    assert!(status.contains("\"ok\":true"), "{status}");
    drop(admin);
    let reply = tokio::time::timeout(Duration::from_secs(10), demote)
        .await
        .expect("demote never ran")
        .unwrap();
    assert!(reply.contains("\"ok\""), "{reply}");
    let _ = stop.send(());
    let _ = server.await;
}

/// Whether the metadata of node `i` on disk says it is attached (the next attach replays).
fn attached_on_disk(c: &Cluster, i: usize) -> bool {
    use crate::meta::file::MetaFile;
    use crate::meta::superblock::flags;
    let local = c.config.resources_of(&c.names[i]).remove(0);
    let opened = MetaFile::open(&local.me.meta_location(), None).unwrap();
    opened.meta.superblock().has(flags::ATTACHED)
}

/// The shutdown ends the sessions and waits for them before it marks the metadata detached:
/// a session writes data, log transactions and bitmap pages until it is over (under A and B it
/// applies what it received first), so none may still run after the clean superblock. Before,
/// the connection managers were aborted behind the shutdown's back, mid-session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_the_sessions_before_marking_detached() {
    let mut c = cluster(2, "B").await;
    let a = c.start(0);
    let b = c.start(1);
    wait_for("link", || {
        a.status().peers[0].connection == "connected"
            && b.status().peers[0].connection == "connected"
    })
    .await;
    a.promote(true).await.unwrap();
    wait_for("initial sync", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    write_some(&a, 7, 50).await;
    b.shutdown().await;
    // The session ran to its end (it reports the link down last) and its manager returned.
    let peer = &b.status().peers[0];
    assert_eq!(peer.connection, "standalone", "{peer:?}");
    assert_eq!(peer.replication, "off", "{peer:?}");
    assert!(!attached_on_disk(&c, 1), "a clean Secondary shutdown");
    a.shutdown().await;
    assert!(
        attached_on_disk(&c, 0),
        "a Primary stopping is treated like a crash"
    );
}

/// A bitmap save that failed since attach (its marks may exist only in memory) keeps the
/// metadata attached through a shutdown that saves everything again: the next attach replays
/// the activity log instead of trusting the bitmaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_bitmap_save_keeps_the_metadata_attached() {
    use crate::meta::bitmap::Bitmap;
    let mut c = cluster(2, "C").await;
    // Cleanly detached when nothing failed.
    let b = c.start(1);
    b.shutdown().await;
    drop(b);
    assert!(!attached_on_disk(&c, 1));
    let b = c.start(1);
    assert!(attached_on_disk(&c, 1));
    // A save of slot 0 fails (a bitmap of another geometry is refused by the metadata file),
    // as a loss mark's save after a session does when the metadata device fails.
    let slot = b.peers[0].slot;
    let real = std::mem::replace(
        &mut b.meta.lock().unwrap().bitmaps[slot],
        Bitmap::new(4096, 4096),
    );
    assert!(b.meta_io(move |m| m.save_bitmap(slot)).await.is_err());
    b.meta.lock().unwrap().bitmaps[slot] = real;
    b.shutdown().await;
    assert!(
        attached_on_disk(&c, 1),
        "unclean: replayed at the next attach"
    );
}

/// Both sides must replicate with the same protocol: a Secondary configured for C skips
/// applying what it received when the session ends, which a Primary on A or B has already
/// acknowledged. A mismatch is refused by the handshake on both sides, like a size mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_mismatch_refuses_the_session() {
    use crate::repl::state::Protocol;
    let mut c = cluster(2, "C").await;
    let a = c.start_with(0, |spec| spec.peers[0].1 = Protocol::A);
    let b = c.start(1);
    let refused = |r: &Resource| {
        let p = &r.status().peers[0];
        p.connection == "standalone"
            && p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("protocol mismatch"))
    };
    wait_for("both sides refusing", || refused(&a) && refused(&b)).await;
    let why = b.status().peers[0].last_error.clone().unwrap();
    assert!(why.contains("ours C, peer's A"), "{why}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A shutdown before the run loop subscribed to the stop signal still stops it (the signal was
/// dropped when nobody listened yet, and a run loop started afterwards ran forever; a shutdown
/// right after a start then waited for it in vain and left the metadata attached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_loop_started_after_the_shutdown_stops() {
    let mut c = cluster(2, "C").await;
    let local = c.config.resources_of(&c.names[1]).remove(0);
    let res = Resource::attach(ResourceSpec::from_config(&local).unwrap()).unwrap();
    res.shutdown().await;
    assert!(!attached_on_disk(&c, 1));
    let l = c.listeners[1].take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), res.run_with_listener(l))
        .await
        .expect("the run loop sees the earlier shutdown");
}

/// A flush that fails on a Secondary (fdatasync EIO: the kernel may have dropped the dirty
/// pages) loses writes it had already acknowledged as written (protocol C: the Primary forgot
/// them). The Secondary marks the extents it wrote since its last good flush out of sync before
/// its session ends, so the next handshake resyncs them. Before, the failure ended the session
/// with a plain error: nothing was marked, both sides reconnected "in sync" and the lost blocks
/// stayed lost on the Secondary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_on_the_secondary_marks_what_it_may_have_lost() {
    use std::os::unix::fs::FileExt;
    let mut c = cluster_with(2, "C", "on-io-error = \"pass-on\"\n").await;
    let a = c.start(0);
    let b = c.start(1);
    wait_for("link", || {
        a.status().peers[0].connection == "connected"
            && b.status().peers[0].connection == "connected"
    })
    .await;
    a.promote(true).await.unwrap();
    wait_for("initial sync", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    let offsets: Vec<u64> = (0..4).map(|k| (8 << 20) + k * (4 << 20)).collect();
    for (k, &off) in offsets.iter().enumerate() {
        a.write(off, pattern(500 + k as u64, 8192), false)
            .await
            .unwrap();
    }
    assert_eq!(a.status().peers[0].out_of_sync_bytes, 0, "written on b");
    // b's disk fails its next flush (the engine is gone), and the blocks it wrote are no
    // longer on it (the dropped dirty pages).
    let good = b.store.current();
    let broken =
        crate::store::BlockStore::open(&c.image(1), &crate::store::OpenOptions::default()).unwrap();
    broken.kill_engine_for_test();
    b.store.replace(broken);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.image(1))
            .unwrap();
        for &off in &offsets {
            f.write_all_at(&[0; 8192], off).unwrap();
        }
    }
    let mut events = b.subscribe();
    // The Primary's disk flushed; the peer's flush failed and its session ended.
    a.flush().await.unwrap();
    let slot = b.peers[0].slot;
    let marked = b.meta.lock().unwrap().bitmaps[slot].count_dirty_bytes();
    assert!(
        marked >= 4 * 8192,
        "the written extents are marked for the Primary: {marked}"
    );
    assert_eq!(
        b.status().disk,
        "up-to-date",
        "pass-on: the disk stays attached"
    );
    b.store.replace(good);
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ev = events.recv().await.unwrap();
            if ev.what == "resync-done" {
                return;
            }
        }
    })
    .await
    .expect("the marked blocks are resynced");
    wait_for("in sync", || {
        all_established(&a)
            && all_established(&b)
            && a.status().peers[0].out_of_sync_bytes == 0
            && b.status().peers[0].out_of_sync_bytes == 0
    })
    .await;
    b.store().flush().await.unwrap();
    let size = a.size();
    assert_eq!(data_of(&c.image(0), size), data_of(&c.image(1), size));
    a.shutdown().await;
    b.shutdown().await;
}

/// Two Secondaries promoted at once can both become Primary (each asks the cluster, then
/// decides: the questions may cross). What the other then announces, its new generation or
/// its role, must not be applied over a Primary's own: the session ends StandAlone with the
/// reason instead (`two primaries`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_hearing_another_primary_goes_standalone() {
    use crate::meta::generation::Uuid;
    use crate::repl::state::DiskState;
    use crate::repl::wire::Message;
    for announce_generation in [true, false] {
        let mut c = cluster(2, "C").await;
        let a = c.start(0);
        let b = c.start(1);
        a.promote(true).await.unwrap();
        wait_for("initial sync", || {
            all_established(&a) && all_established(&b)
        })
        .await;
        // b's own promotion went through at the same moment (its question to a crossed a's).
        b.state.lock().unwrap().role = Role::Primary;
        let before = b.meta.lock().unwrap().sb.generations.current;
        let conn = a.peers[0]
            .conn
            .lock()
            .unwrap()
            .clone()
            .expect("a's session");
        conn.send(if announce_generation {
            Message::NewUuid(Uuid(0x7777_0001))
        } else {
            Message::PeerState {
                role: Role::Primary,
                disk: DiskState::UpToDate,
            }
        });
        wait_for("b standalone", || {
            b.status().peers[0].connection == "standalone"
        })
        .await;
        let why = b.status().peers[0].last_error.clone().unwrap_or_default();
        assert!(why.contains("two primaries"), "{why}");
        assert_eq!(b.meta.lock().unwrap().sb.generations.current, before);
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// A node restarted after a crash as Primary (its metadata still says Primary) rejoins, as the
/// resync source (same generation) or target (the peer was promoted meanwhile): once that
/// resync is done its on-disk Primary flag is cleared, so a later restart no longer claims to
/// be a crashed Primary (which wins same-generation resyncs with whatever it holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoined_crashed_primary_forgets_its_primary_flag() {
    use crate::meta::superblock::flags;
    let on_disk_primary = |r: &Resource| r.meta.lock().unwrap().sb.has(flags::PRIMARY);
    let mut c = cluster(2, "C").await;
    let a = c.start(0);
    let b = c.start(1);
    a.promote(true).await.unwrap();
    wait_for("initial sync", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    write_some(&a, 7, 50).await;
    a.flush().await.unwrap();

    // a stops as Primary (as a crash would leave it) and comes back: the sync source.
    a.shutdown().await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = c.start(0);
    assert!(a.state.lock().unwrap().crashed_primary);
    assert_eq!(a.role(), Role::Secondary);
    wait_for("a resynced b", || {
        all_established(&a) && all_established(&b)
    })
    .await;
    wait_for("a's Primary flag cleared", || !on_disk_primary(&a)).await;
    a.shutdown().await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = c.start(0);
    assert!(
        !a.state.lock().unwrap().crashed_primary,
        "a claims a crash again"
    );
    wait_for("a back", || all_established(&a) && all_established(&b)).await;

    // b becomes Primary and stops as one; a is promoted and writes: b comes back behind, the
    // sync target.
    b.promote(false).await.unwrap();
    write_some(&b, 8, 20).await;
    b.flush().await.unwrap();
    b.shutdown().await;
    drop(b);
    wait_for("b gone", || a.status().peers[0].connection != "connected").await;
    a.promote(true).await.unwrap();
    write_some(&a, 9, 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = c.start(1);
    assert!(b.state.lock().unwrap().crashed_primary);
    wait_for("b resynced", || all_established(&a) && all_established(&b)).await;
    wait_for("b's Primary flag cleared", || !on_disk_primary(&b)).await;
    assert!(on_disk_primary(&a), "the live Primary keeps its flag");
    b.shutdown().await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = c.start(1);
    assert!(
        !b.state.lock().unwrap().crashed_primary,
        "b claims a crash again"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A node that is the sync target of two peers at once (their handshakes ran together) is made
/// consistent by the end of the last of those resyncs only: the first `ResyncDone` says
/// nothing of the blocks the other source still sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_of_two_resyncs_to_end_leaves_the_disk_inconsistent() {
    use crate::meta::superblock::flags;
    use crate::repl::peer::{Done, Op, execute};
    use crate::repl::state::ReplState;
    let mut c = cluster(3, "C").await;
    let r = c.start(0);
    let consistent = |r: &Resource| r.meta.lock().unwrap().sb.has(flags::CONSISTENT);
    assert!(!consistent(&r));
    for p in r.state.lock().unwrap().peers.iter_mut() {
        p.repl = ReplState::SyncTarget;
    }
    let done = execute(r.clone(), 0, Op::ResyncDone).await.unwrap();
    assert!(matches!(done, Done::ResyncFinished { up_to_date: false }));
    assert!(!consistent(&r), "consistent while peer 1 still resyncs it");
    r.state.lock().unwrap().peers[0].repl = ReplState::Established;
    let done = execute(r.clone(), 1, Op::ResyncDone).await.unwrap();
    assert!(matches!(done, Done::ResyncFinished { up_to_date: true }));
    assert!(consistent(&r));
    r.shutdown().await;
}

/// A Secondary reports itself in sync with the Primary (marks between Secondaries may then be
/// cleared as obsolete) only while that session is not ending: its teardown marks the Primary's
/// unstable writes, which a handshake with the other Secondary in that window must not clear.
/// And marks of a verify or a local I/O error are never obsolete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_primary_and_repair_marks_keep_marks_between_secondaries() {
    let mut c = cluster(3, "C").await;
    let r = c.start(0);
    r.set_disk(DiskState::UpToDate);
    r.update_peer(0, |s| {
        s.role = Role::Primary;
        s.conn = ConnState::Connected;
        s.repl = ReplState::Established;
    });
    assert!(r.state_report(1).side.in_sync_with_primary);
    assert!(r.state_report(1).side.follows_primary);
    r.update_peer(0, |s| s.leaving = true);
    assert!(!r.state_report(1).side.in_sync_with_primary);
    assert!(!r.state_report(1).side.follows_primary);
    let slot = r.peers[1].slot;
    assert!(!r.meta.lock().unwrap().has_repair_marks(slot));
    {
        let mut m = r.meta.lock().unwrap();
        r.mark_for_repair(&mut m, slot, 0, 4096);
    }
    assert!(r.meta.lock().unwrap().has_repair_marks(slot));
    // A resync that emptied the bitmap leaves none (`resync::finish_source` saves it).
    r.meta.lock().unwrap().bitmaps[slot].clear_all();
    r.meta_io(move |m| m.save_bitmap(slot)).await.unwrap();
    assert!(!r.meta.lock().unwrap().has_repair_marks(slot));
    r.shutdown().await;
}

/// A node whose session with a Primary is tearing down (the Primary is lost; the session
/// applies what it received, up to a minute) does not answer another node's promotion with
/// that Primary: the refusal, which `--force` no longer overrides, would block a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_session_is_ending_does_not_refuse_a_promotion() {
    use crate::repl::wire::Message;
    let mut c = cluster(3, "C").await;
    let r = c.start(0);
    let primary_of = |reply: Message| match reply {
        Message::ViewReply { primary, .. } => primary,
        other => panic!("not a view reply: {other:?}"),
    };
    r.update_peer(0, |s| {
        s.role = Role::Primary;
        s.conn = ConnState::Connected;
        s.repl = ReplState::Established;
    });
    let id = r.peers[0].node.id;
    assert_eq!(primary_of(r.view_reply(1, 7, false)), Some(id));
    r.update_peer(0, |s| s.leaving = true);
    assert_eq!(primary_of(r.view_reply(1, 8, false)), None);
    r.shutdown().await;
}

/// A resync emptied bitmap `slot` of `r` (the end of one as source, or `ResyncDone` on the
/// target): the bitmap is saved, then the superblock.
async fn resync_emptied(r: &Resource, slot: usize) {
    r.meta_io(move |m| {
        m.bitmaps[slot].clear_all();
        m.save_bitmap(slot)?;
        m.save_sb()
    })
    .await
    .unwrap();
}

/// Whether the on-disk superblock of node `i` says bitmap `slot` holds repair marks.
fn repair_marks_on_disk(c: &Cluster, i: usize, slot: usize) -> bool {
    use crate::meta::file::MetaFile;
    let local = c.config.resources_of(&c.names[i]).remove(0);
    let opened = MetaFile::open(&local.me.meta_location(), None).unwrap();
    opened.meta.superblock().has_repair_marks(slot)
}

/// Repair marks (a verify's differing blocks, a local I/O error) keep their kind across a
/// restart of the node that set them, a crash included: a handshake that finds the marks
/// between two Secondaries obsolete keeps them (they wait for a resync) while it clears the
/// ordinary ones. The fact used to live in memory only: after a restart the repair marks were
/// cleared like ordinary ones and the differing blocks stayed different for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_marks_survive_a_restart_and_are_never_obsolete() {
    let c = cluster(3, "C").await;
    let local = c.config.resources_of(&c.names[0]).remove(0);
    let attach = || Resource::attach(ResourceSpec::from_config(&local).unwrap()).unwrap();
    let r = attach();
    let (repair, ordinary) = (r.peers[0].slot, r.peers[1].slot);
    {
        let mut m = r.meta.lock().unwrap();
        r.mark_for_repair(&mut m, repair, 1 << 20, 3 * 4096);
        r.mark_out_of_sync(&mut m, ordinary, 2 << 20, 4096);
    }
    // Only the bitmaps are saved (as a verify does at its end), then the node crashes: the
    // flag reached the disk before the pages holding the marks.
    for slot in [repair, ordinary] {
        r.meta_io(move |m| m.save_bitmap(slot)).await.unwrap();
    }
    drop(r);
    assert!(repair_marks_on_disk(&c, 0, repair));
    assert!(!repair_marks_on_disk(&c, 0, ordinary));

    let r = attach();
    {
        let mut m = r.meta.lock().unwrap();
        assert!(m.has_repair_marks(repair), "lost at the restart");
        assert!(!m.has_repair_marks(ordinary));
        assert!(
            m.clear_for_handshake(repair, true, true),
            "repair marks kept"
        );
        assert!(!m.clear_for_handshake(ordinary, true, true));
        assert_eq!(
            m.bitmaps[repair].count_bits(),
            3,
            "repair marks cleared as obsolete"
        );
        assert_eq!(
            m.bitmaps[ordinary].count_bits(),
            0,
            "obsolete marks cleared"
        );
    }
    // A clean restart keeps them too.
    r.shutdown().await;
    drop(r);
    let r = attach();
    assert!(r.meta.lock().unwrap().has_repair_marks(repair));
    // A resync as source empties the bitmap: the flag goes with the superblock saved after it.
    resync_emptied(&r, repair).await;
    assert!(!r.meta.lock().unwrap().has_repair_marks(repair));
    r.shutdown().await;
    drop(r);
    assert!(!repair_marks_on_disk(&c, 0, repair));
}

/// An activity-log eviction writes the bitmap pages of the evicted extent for every slot,
/// with repair marks not saved otherwise yet (a verify saves at its end, a pass-on write error
/// never): the slot's repair-marks flag must reach the disk first. It used to be skipped
/// there, so after a crash the marks looked ordinary and a NoSync handshake between two
/// Secondaries cleared them. Only the flag goes early: a bitmap UUID pinned in memory but not
/// saved yet stays off the disk (it must not get there before its bitmap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_persists_the_repair_flag_before_the_marks() {
    let c = cluster_with(3, "C", "al-extents = 2\n").await;
    let local = c.config.resources_of(&c.names[0]).remove(0);
    let attach = || Resource::attach(ResourceSpec::from_config(&local).unwrap()).unwrap();
    let r = attach();
    let slot = r.peers[0].slot;
    let peer_id = r.peers[0].node.id;
    let uuids_on_disk = r.meta.lock().unwrap().file.superblock().generations.clone();
    {
        let mut m = r.meta.lock().unwrap();
        // In extent 0, which the third write's transaction evicts (two extents in the log).
        r.mark_for_repair(&mut m, slot, 4096, 2 * 4096);
        m.sb.generations.pin_bitmap(peer_id);
        let mut evicted = Vec::new();
        for extent in 0..3 {
            let pending = m.al.begin(extent, extent).unwrap();
            evicted.extend(pending.iter().flat_map(|t| t.evicted.clone()));
            crate::repl::device::persist_al_transactions(&mut m, &pending).unwrap();
            m.al.complete(extent, extent);
        }
        assert_eq!(evicted, [0]);
    }
    // A crash: the marks are on disk only through the eviction.
    drop(r);
    let r = attach();
    {
        let m = r.meta.lock().unwrap();
        // (The replay marks the two extents still hot, 1 and 2, in every slot.)
        let b = &m.bitmaps[slot];
        assert_eq!(
            b.dirty_extent_from(0, u64::MAX),
            Some((4096, 2 * 4096)),
            "the eviction wrote the marks"
        );
        assert!(
            m.has_repair_marks(slot),
            "repair marks on disk without their flag"
        );
        assert_eq!(
            m.sb.generations, uuids_on_disk,
            "an unsaved bitmap UUID reached the disk with the flag"
        );
    }
    r.shutdown().await;
}

/// A sync target whose source copies its bitmap of another node for it
/// (`BitmapPlan::PeerCopiesSlot`) clears its own bits for the source before the bitmap exchange
/// (`Command::ClearBitmap`), but never repair marks: kept, the exchange hands them to the
/// source, which resyncs them with the rest. They used to be cleared too: the source got an
/// empty bitmap and, e.g., this node's own pass-on write-error marks were never resynced. The
/// flag stays until the resync has emptied the slot (`ResyncDone`: cleared and saved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_slot_resync_keeps_repair_marks_for_the_exchange() {
    let c = cluster(3, "C").await;
    let local = c.config.resources_of(&c.names[0]).remove(0);
    let r = Resource::attach(ResourceSpec::from_config(&local).unwrap()).unwrap();
    let (repair, ordinary) = (r.peers[0].slot, r.peers[1].slot);
    {
        let mut m = r.meta.lock().unwrap();
        r.mark_for_repair(&mut m, repair, 1 << 20, 3 * 4096);
        r.mark_out_of_sync(&mut m, ordinary, 2 << 20, 4096);
        // A resync follows (`obsolete_only` false): nothing waits for a Primary.
        assert!(!m.clear_for_handshake(repair, false, true));
        assert!(!m.clear_for_handshake(ordinary, false, true));
        assert_eq!(
            m.bitmaps[repair].count_bits(),
            3,
            "repair marks cleared before the exchange"
        );
        assert_eq!(m.bitmaps[ordinary].count_bits(), 0, "ordinary marks kept");
        // The resync sent part of them, then the session ended: still repair marks.
        m.bitmaps[repair].clear_range(1 << 20, 4096);
        m.save_bitmap(repair).unwrap();
        m.save_sb().unwrap();
        assert!(m.has_repair_marks(repair));
    }
    assert!(
        repair_marks_on_disk(&c, 0, repair),
        "flag dropped before the resync ended"
    );
    // The resync's end (`ResyncDone` on the target) empties the slot: the flag goes.
    resync_emptied(&r, repair).await;
    assert!(!repair_marks_on_disk(&c, 0, repair));
    r.shutdown().await;
}

/// Two connected Secondaries promoted at the same moment: each asks the other for its view
/// while neither is Primary yet. At most one may succeed (two Primaries would take writes
/// from their NBD clients before noticing each other); the other is refused with "retry"
/// (`repl::promotion_lock`). Many rounds, so both interleavings (both locked first, one
/// request first) come up; with three nodes the third one's lease decides too.
async fn concurrent_promotions(nodes: usize) {
    let mut c = cluster(nodes, "C").await;
    let all: Vec<Arc<Resource>> = (0..nodes).map(|i| c.start(i)).collect();
    let (a, b) = (&all[0], &all[1]);
    let everyone_sees = |role: &str| {
        all.iter()
            .all(|r| r.status().peers.iter().all(|p| p.role == role))
    };
    a.promote(true).await.unwrap();
    wait_for("initial sync", || all.iter().all(|r| all_established(r))).await;
    a.demote().await.unwrap();
    wait_for("demotion seen", || everyone_sees("secondary")).await;
    let refused_as_expected = |e: &crate::repl::resource::ResourceError| {
        let text = e.to_string();
        // Refused by the lock, or (the winner's commit was seen first) by the role rules.
        text.contains("is being promoted at the same time; retry") || text.contains("is Primary")
    };
    let (mut wins, mut both_refused) = (0, 0);
    for round in 0..20 {
        let (ra, rb) = tokio::join!(a.promote(false), b.promote(false));
        assert!(
            !(ra.is_ok() && rb.is_ok()),
            "round {round}: both nodes were promoted"
        );
        for r in [&ra, &rb] {
            if let Err(e) = r {
                assert!(refused_as_expected(e), "round {round}: {e}");
            }
        }
        let winner = match (&ra, &rb) {
            (Ok(()), _) => Some(a),
            (_, Ok(())) => Some(b),
            _ => None,
        };
        match winner {
            Some(w) => {
                wins += 1;
                let name = w.status().node;
                wait_for("the winner seen Primary", || {
                    all.iter().all(|r| {
                        r.status()
                            .peers
                            .iter()
                            .all(|p| (p.role == "primary") == (p.node == name))
                    })
                })
                .await;
                w.demote().await.unwrap();
                wait_for("demotion seen", || everyone_sees("secondary")).await;
            }
            None => both_refused += 1,
        }
        // Still one cluster: no split brain dropped a link.
        wait_for("links kept", || all.iter().all(|r| all_established(r))).await;
    }
    eprintln!(
        "{nodes} nodes, concurrent promotion rounds: {wins} won, {both_refused} both refused"
    );
    // The locks are free again: a lone promotion succeeds.
    wait_for("leases released", || {
        all.iter()
            .all(|r| r.promotion_lock.lock().unwrap().holder().is_none())
    })
    .await;
    a.promote(false).await.unwrap();
    for r in &all {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_promotions_of_two_nodes_never_both_succeed() {
    concurrent_promotions(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_promotions_among_three_nodes_never_both_succeed() {
    concurrent_promotions(3).await;
}

/// Idle connections to a replication listener (TCP, never a TLS hello) beyond its limit of link
/// setups are closed at once, and a peer still connects while the ones within the limit hold
/// their slots (each for up to `SETUP_TIMEOUT`): without the limit every connection held a task
/// and a socket until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_over_the_setup_limit_are_closed_and_a_peer_still_connects() {
    use crate::repl::link::SETUP_TIMEOUT;
    use crate::repl::setup_limit::MAX_OTHER_SETUPS;
    use tokio::io::AsyncReadExt;
    let mut c = cluster(2, "C").await;
    // beta (the higher node id) accepts the link alpha dials.
    let b = c.start(1);
    let addr = c.address(1);
    let opened = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..MAX_OTHER_SETUPS * 2 + 8 {
        // From another loopback address than the peers' (127.0.0.1).
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(s.connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut closed = 0;
    for s in &mut idle {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(20), s.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(_)) => panic!("the listener sent bytes before the client's TLS hello"),
            Err(_) => {} // still in its setup
        }
    }
    assert_eq!(
        closed,
        idle.len() - MAX_OTHER_SETUPS,
        "{} idle connections",
        idle.len()
    );
    let a = c.start(0);
    wait_for("link", || {
        a.status().peers[0].connection == "connected"
            && b.status().peers[0].connection == "connected"
    })
    .await;
    assert!(
        opened.elapsed() < SETUP_TIMEOUT,
        "the peer connected only once the idle setups timed out"
    );
    drop(idle);
    a.shutdown().await;
    b.shutdown().await;
}
