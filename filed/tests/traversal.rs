//! A group member with valid credentials that speaks the protocol directly cannot make the
//! listener touch paths outside the group: `..`, absolute paths outside the includes, excluded
//! paths and NUL bytes are refused before anything is written.

use std::sync::Arc;
use std::time::Duration;

use filed::config::Config;
use filed::node::Node;
use filed::proto::{Message, PROTOCOL_VERSION};
use filed::server;
use filed::session::ServeOptions;
use filed::store::RedbStore;
use filed::transport;

fn config(dir: &std::path::Path) -> Arc<Config> {
    let text = r#"
ca = "pki/ca.pem"
ca-key = "pki/ca.key"
[hosts.alpha]
address = "127.0.0.2:1"
state = "alpha/state.redb"
cert = "pki/alpha.pem"
key = "pki/alpha.key"
prefix = { data = "alpha/data" }
[hosts.beta]
address = "127.0.0.3:1"
state = "beta/state.redb"
cert = "pki/beta.pem"
key = "pki/beta.key"
prefix = { data = "beta/data" }
[groups.data]
hosts = ["alpha", "beta"]
key = "pki/data.key"
include = ["%data%"]
exclude = ["*.secret"]
"#;
    let p = dir.join("filed.toml");
    std::fs::write(&p, text).unwrap();
    std::fs::create_dir_all(dir.join("beta/data")).unwrap();
    let c = Config::load(&p).unwrap();
    filed::keygen::generate_missing(&c, None).unwrap();
    Arc::new(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_paths_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let beta = cfg.hosts["beta"].clone();
    let store = RedbStore::open(&beta.state, Duration::from_secs(5)).unwrap();
    let node = Arc::new(Node::new(cfg.clone(), beta.clone(), Arc::new(store)));
    let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::serve(
        node,
        listener,
        None,
        ServeOptions::default(),
        async {
            let _ = stop_rx.await;
        },
    ));

    let alpha = &cfg.hosts["alpha"];
    let settings =
        transport::ClientSettings::from_files(&cfg.ca, &alpha.cert, &alpha.key, "alpha").unwrap();
    let key = common::auth::SharedKey::load(&cfg.groups["data"].key).unwrap();
    let state = filed::entry::FileState {
        kind: filed::entry::Kind::File,
        size: 5,
        mtime_ns: 1,
        mode: 0o644,
        uid: 0,
        gid: 0,
        target: None,
        hash: *blake3::hash(b"owned").as_bytes(),
    };
    for bad in [
        "%data%/../../escape",
        "/etc/filed-escape",
        "%data%/a/../../../escape",
        "%data%/x.secret",
        "%data%/a\0b",
        "relative/path",
        "%other%/x",
    ] {
        let mut conn = transport::connect(&addr, &settings, "data", &key, "beta")
            .await
            .unwrap();
        conn.send(
            &Message::Hello {
                version: PROTOCOL_VERSION,
                group: "data".into(),
                from: "alpha".into(),
            }
            .encode(),
        )
        .await
        .unwrap();
        let m = Message::decode(&conn.recv().await.unwrap().unwrap()).unwrap();
        assert!(matches!(m, Message::HelloOk { .. }), "{m:?}");
        conn.send(
            &Message::Entry {
                path: bad.into(),
                state: Some(state.clone()),
                base: None,
                force: 1,
            }
            .encode(),
        )
        .await
        .unwrap();
        conn.send(&Message::End.encode()).await.unwrap();
        let reply = conn
            .recv()
            .await
            .unwrap()
            .map(|f| Message::decode(&f).unwrap());
        match reply {
            Some(Message::Error { message }) => {
                assert!(message.contains("refused"), "{bad}: {message}")
            }
            other => panic!("{bad}: expected a refusal, got {other:?}"),
        }
    }
    // Nothing was written anywhere under the test directory except the states and keys.
    assert!(!d.path().join("escape").exists());
    assert!(!std::path::Path::new("/etc/filed-escape").exists());
    assert_eq!(
        std::fs::read_dir(d.path().join("beta/data"))
            .unwrap()
            .count(),
        0
    );

    // A malformed message is an error for that session, not a crash of the listener.
    let mut conn = transport::connect(&addr, &settings, "data", &key, "beta")
        .await
        .unwrap();
    conn.send(&[0xff, 1, 2, 3]).await.unwrap();
    let _ = conn.recv().await;
    let mut conn = transport::connect(&addr, &settings, "data", &key, "beta")
        .await
        .unwrap();
    conn.send(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            group: "data".into(),
            from: "alpha".into(),
        }
        .encode(),
    )
    .await
    .unwrap();
    assert!(matches!(
        Message::decode(&conn.recv().await.unwrap().unwrap()).unwrap(),
        Message::HelloOk { .. }
    ));
    // Closed now: a session left open would hold the listener's shutdown for its 120 s grace.
    drop(conn);
    // Claiming to be another host than the authenticated one is refused.
    let mut conn = transport::connect(&addr, &settings, "data", &key, "beta")
        .await
        .unwrap();
    conn.send(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            group: "data".into(),
            from: "beta".into(),
        }
        .encode(),
    )
    .await
    .unwrap();
    assert!(matches!(
        Message::decode(&conn.recv().await.unwrap().unwrap()).unwrap(),
        Message::Error { .. }
    ));

    let _ = stop_tx.send(());
    srv.await.unwrap().unwrap();
}
