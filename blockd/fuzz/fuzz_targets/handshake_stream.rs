//! Fuzzes the whole async handshake driver with arbitrary client bytes: it must end (enter
//! transmission, abort or fail) without panicking or hanging.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use blockd::nbd::export::ExportInfo;
use blockd::nbd::handshake::{HandshakeConfig, negotiate};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let config = HandshakeConfig {
        export: ExportInfo {
            name: "blockd".into(),
            description: None,
            size: 1 << 30,
            read_only: false,
            trim: true,
        },
        tls: None,
        timeout: Duration::from_secs(5),
    };
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let input = data.to_vec();
        let feeder = tokio::spawn(async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        });
        let _ = negotiate(server, &config).await;
        feeder.abort();
        // Let the runtime release the task before returning (no leak between inputs).
        let _ = feeder.await;
    });
});
