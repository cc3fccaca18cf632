//! A 2-node test cluster whose replication link runs through a [`CountingProxy`] (the "wire"):
//! n1 listens on 127.0.0.2, n0 reaches it only through the proxy on 127.0.0.1. Used by the
//! tests that count resync bytes (checksum resync, crash recovery from the activity log).

use std::path::PathBuf;

use crate::repl::{Cluster, ClusterOptions, CountingProxy, free_port};

/// A created (not started) 2-node cluster with its link through a counting proxy, and the
/// per-node configs to start each node with.
pub struct ProxiedPair {
    pub cluster: Cluster,
    pub proxy: CountingProxy,
    pub configs: [PathBuf; 2],
}

impl ProxiedPair {
    /// Creates the cluster (certificates, secret, metadata) and the proxy; starts nothing.
    pub fn create(opts: &ClusterOptions) -> ProxiedPair {
        assert_eq!(opts.nodes, 2, "a proxied pair has two nodes");
        let c = Cluster::create(opts);
        let good = std::fs::read_to_string(&c.config).expect("read config");
        let n1_line = format!("address = \"127.0.0.1:{}\"", c.nodes[1].repl_port);
        assert!(good.contains(&n1_line), "config names n1's address");
        let proxy_port = free_port();
        let n1_conf = c.dir.path().join("n1.toml");
        std::fs::write(
            &n1_conf,
            good.replace(
                &n1_line,
                &format!("address = \"127.0.0.2:{}\"", c.nodes[1].repl_port),
            ),
        )
        .expect("write n1 config");
        let n0_conf = c.dir.path().join("n0.toml");
        std::fs::write(
            &n0_conf,
            good.replace(&n1_line, &format!("address = \"127.0.0.1:{proxy_port}\"")),
        )
        .expect("write n0 config");
        let proxy = CountingProxy::start(
            proxy_port,
            format!("127.0.0.2:{}", c.nodes[1].repl_port)
                .parse()
                .expect("proxy target"),
        );
        ProxiedPair {
            cluster: c,
            proxy,
            configs: [n0_conf, n1_conf],
        }
    }

    /// Starts node `i` with its proxied config.
    pub fn start_node(&mut self, i: usize) {
        let conf = self.configs[i].clone();
        self.cluster.start_node_with(i, &conf);
    }
}
