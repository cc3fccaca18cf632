//! Malformed replication frames sent by a peer that passed TLS and the shared-secret check: the
//! receiving node drops that link, keeps running, and replicates normally afterwards.

use std::path::Path;
use std::time::Duration;

use blockd::repl::link::{self, LinkNode, LinkSettings};
use integration_tests::repl::{Cluster, ClusterOptions, RESOURCE, tail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn node(c: &Cluster, i: usize) -> LinkNode {
    LinkNode {
        name: c.nodes[i].name.clone(),
        id: i as u8,
        address: format!("127.0.0.1:{}", c.nodes[i].repl_port)
            .parse()
            .unwrap(),
    }
}

/// Link settings of node `i` as the real node would load them (its certificate, the secret).
fn settings(c: &Cluster, i: usize, peer: usize) -> LinkSettings {
    let d: &Path = c.dir.path();
    let name = &c.nodes[i].name;
    LinkSettings::load(
        RESOURCE,
        node(c, i),
        vec![node(c, peer)],
        &d.join("certs/ca.pem"),
        &d.join(format!("certs/{name}.pem")),
        &d.join(format!("certs/{name}.key")),
        &d.join("secret"),
    )
    .expect("load n1's link settings")
}

/// Waits until the node closes the link (EOF or error on our read side), at most 10 s.
async fn closed_by_peer<R: tokio::io::AsyncRead + Unpin>(reader: common::frame::FrameReader<R>) {
    let (mut reader, _) = reader.into_parts();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the node kept a link open after a malformed frame"
    );
}

#[test]
fn malformed_frames_after_authentication_drop_the_link_only() {
    // n0 (the lower id) dials n1, so a fake n0 is what n1 accepts and reads frames from.
    let mut c = Cluster::create(&ClusterOptions::new(2, "C"));
    c.start_node(1);
    let fake = settings(&c, 0, 1);
    let target = node(&c, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // 1. A frame whose CRC does not match its payload.
        let link = link::connect(&fake, &target)
            .await
            .expect("authenticated link as n0");
        let mut raw = link.writer.into_inner();
        raw.write_all(&[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4])
            .await
            .unwrap();
        raw.flush().await.unwrap();
        closed_by_peer(link.reader).await;

        // 2. A well-framed payload that is no replication message.
        let mut link = link::connect(&fake, &target).await.expect("second link");
        let _ = link.writer.write_frame(&[0xff; 40]).await;
        closed_by_peer(link.reader).await;

        // 3. A frame header announcing 4 GiB.
        let link = link::connect(&fake, &target).await.expect("third link");
        let mut raw = link.writer.into_inner();
        let _ = raw.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).await;
        let _ = raw.flush().await;
        closed_by_peer(link.reader).await;
    });
    // n1 survived all three, logged them, and still serves its control socket.
    let st = c.status(1);
    assert_eq!(st["role"], "secondary", "{st:#}");
    let log = c.log(1);
    assert!(!log.contains("panicked"), "{}", tail(&log, 30));
    for reason in [
        "frame checksum mismatch",
        "unknown message tag",
        "exceeds the limit",
    ] {
        assert!(
            log.contains(reason),
            "n1 logs {reason:?}:\n{}",
            tail(&log, 30)
        );
    }
    // The real n0 then connects, becomes Primary, and replication works.
    c.start_node(0);
    c.promote(0, true);
    c.write_random(0, 8 << 20, 1 << 20, 4);
    c.wait_synced(0, Duration::from_secs(60));
    c.assert_identical(0);
    c.stop(1);
    c.stop(0);
}
