//! Tests of config parsing and validation.

use std::path::Path;

use super::*;

const FILE: &str = "/etc/blockd/cluster.toml";

fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
    ClusterConfig::parse(text, Path::new(FILE))
}

/// A valid two-node resource; tests splice extra lines in.
fn two_nodes(extra_resource: &str, extra_beta: &str) -> String {
    format!(
        r#"
[global]
secret-file = "secret"
[global.tls]
ca = "ca.pem"
cert = "node.pem"
key = "node.key"

[resource.r0]
{extra_resource}
[resource.r0.node.alpha]
id = 0
address = "127.0.0.1:7000"
nbd = "127.0.0.1:10809"
backing = "/data/alpha.img"

[resource.r0.node.beta]
id = 1
address = "127.0.0.2:7000"
nbd = "127.0.0.2:10809"
backing = "/data/beta.img"
{extra_beta}
"#
    )
}

/// Asserts an `Invalid` error with this key whose problem contains `needle`.
fn invalid(text: &str, key: &str, needle: &str) {
    match parse(text) {
        Err(e @ ConfigError::Invalid { .. }) => {
            let ConfigError::Invalid {
                file,
                key: k,
                problem,
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(file, Path::new(FILE));
            assert_eq!(k, key, "{e}");
            assert!(problem.contains(needle), "{e}");
            assert!(
                e.to_string().starts_with(&format!("{FILE}: {key}: ")),
                "{e}"
            );
        }
        other => panic!("expected invalid {key}: {other:?}"),
    }
}

#[test]
fn example_file_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster.toml");
    let cfg = ClusterConfig::load(&path).unwrap();
    let r0 = cfg.resource("r0").unwrap();
    assert_eq!(r0.nodes.len(), 3);
    assert_eq!(r0.protocol, Protocol::C);
    assert_eq!(r0.protocol_between("alpha", "gamma"), Protocol::A);
    assert_eq!(r0.protocol_between("gamma", "beta"), Protocol::A);
    assert_eq!(r0.protocol_between("alpha", "beta"), Protocol::C);
    assert_eq!(r0.quorum, QuorumSetting::Majority);
    assert_eq!(r0.split_brain.zero_primaries, After0Pri::DiscardZeroChanges);
    assert_eq!(r0.split_brain.one_primary, After1Pri::DiscardSecondary);
    assert_eq!(r0.split_brain.two_primaries, After2Pri::Disconnect);
    assert_eq!(r0.resync_rate, 100 << 20);
    assert_eq!(r0.bitmap_block_size, 4096);
    assert_eq!(r0.al_extent_size, 4 << 20);
    assert_eq!(r0.member_mask(), 0b111);
    let beta = r0.node("beta").unwrap();
    assert_eq!(
        beta.meta,
        MetaPlacement::External("/var/lib/blockd/r0.md".into())
    );
    assert_eq!(
        beta.meta_location(),
        MetaLocation::External("/var/lib/blockd/r0.md".into())
    );
    assert_eq!(
        r0.node("alpha").unwrap().meta_location(),
        MetaLocation::Internal("/dev/vg0/r0".into())
    );
    assert_eq!(r0.tls.as_ref().unwrap().ca, Path::new("/etc/blockd/ca.pem"));
    assert_eq!(
        cfg.local_node_name(None, "beta.example.com").unwrap(),
        "beta"
    );
    assert_eq!(cfg.local_node_name(None, "gamma.lan").unwrap(), "gamma");
}

#[test]
fn defaults_and_relative_paths() {
    let cfg = parse(&two_nodes("", "")).unwrap();
    let r = &cfg.resources[0];
    assert_eq!(r.protocol, Protocol::C);
    assert_eq!(r.quorum, QuorumSetting::Off);
    assert_eq!(r.on_no_quorum, OnNoQuorum::SuspendIo);
    assert_eq!(r.on_io_error, OnIoError::Detach);
    assert_eq!(r.split_brain, SplitBrainPolicy::default());
    assert_eq!(r.al_extents, 1237);
    assert_eq!(
        r.secret_file.as_deref(),
        Some(Path::new("/etc/blockd/secret"))
    );
    assert_eq!(
        r.tls.as_ref().unwrap().key,
        Path::new("/etc/blockd/node.key")
    );
    assert_eq!(r.node("alpha").unwrap().meta, MetaPlacement::Internal);
}

#[test]
fn resource_overrides_global() {
    let cfg = parse(&two_nodes(
        "protocol = \"a\"\nresync-rate = 1048576\nquorum = 2\non-no-quorum = \"io-error\"\non-io-error = \"pass-on\"\nbitmap-block-size = \"64K\"\nal-extents = 67\nal-extent-size = \"1M\"\nafter-sb-2pri = \"violently-as0p\"",
        "meta = \"beta.md\"",
    ))
    .unwrap();
    let r = &cfg.resources[0];
    assert_eq!(r.protocol, Protocol::A);
    assert_eq!(r.resync_rate, 1 << 20);
    assert_eq!(r.quorum, QuorumSetting::AtLeast(2));
    assert_eq!(r.on_no_quorum, OnNoQuorum::IoError);
    assert_eq!(r.on_io_error, OnIoError::PassOn);
    assert_eq!(r.bitmap_block_size, 64 << 10);
    assert_eq!((r.al_extents, r.al_extent_size), (67, 1 << 20));
    assert_eq!(r.split_brain.two_primaries, After2Pri::ViolentlyAs0Pri);
    assert_eq!(
        r.node("beta").unwrap().meta,
        MetaPlacement::External("/etc/blockd/beta.md".into())
    );
}

#[test]
fn node_selection() {
    let cfg = parse(&two_nodes("", "hostname = \"b.example\"")).unwrap();
    assert_eq!(
        cfg.local_node_name(Some("alpha"), "whatever").unwrap(),
        "alpha"
    );
    assert_eq!(cfg.local_node_name(None, "alpha").unwrap(), "alpha");
    assert_eq!(
        cfg.local_node_name(None, "alpha.example.org").unwrap(),
        "alpha"
    );
    assert_eq!(cfg.local_node_name(None, "b.example").unwrap(), "beta");
    let e = cfg.local_node_name(Some("delta"), "x").unwrap_err();
    assert!(e.to_string().contains("alpha, beta"), "{e}");
    let e = cfg.local_node_name(None, "delta").unwrap_err();
    assert!(matches!(e, ConfigError::NoNodeForHost { .. }), "{e}");
    let mine = cfg.resources_of("beta");
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].me.id, 1);
    assert_eq!(
        mine[0]
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["alpha"]
    );
    assert!(cfg.resources_of("delta").is_empty());
    assert!(!hostname().unwrap().is_empty());
}

#[test]
fn syntax_errors_have_line_and_column() {
    match parse("[resource.r0]\nprotocol = C\n") {
        Err(ConfigError::Syntax {
            line, column, file, ..
        }) => {
            assert_eq!((line, column), (2, 12));
            assert_eq!(file, Path::new(FILE));
        }
        other => panic!("{other:?}"),
    }
    let e = ClusterConfig::load(Path::new("/nonexistent/cluster.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
}

#[test]
fn invalid_values_name_the_key() {
    let beta = "resource.r0.node.beta";
    invalid(
        &two_nodes("", "").replace("id = 1", "id = 0"),
        &format!("{beta}.id"),
        "also used by node alpha",
    );
    invalid(
        &two_nodes("", "").replace("id = 1", "id = 32"),
        &format!("{beta}.id"),
        "0..=31",
    );
    invalid(
        &two_nodes("", "").replace("id = 1", "id = \"one\""),
        &format!("{beta}.id"),
        "expected an integer",
    );
    invalid(
        &two_nodes("", "").replace("127.0.0.2:7000", "127.0.0.1:7000"),
        &format!("{beta}.address"),
        "also used",
    );
    invalid(
        &two_nodes("", "").replace("127.0.0.2:7000", "beta:7000"),
        &format!("{beta}.address"),
        "IP:port",
    );
    invalid(
        &two_nodes("", "").replace("127.0.0.2:10809", "127.0.0.1:10809"),
        &format!("{beta}.nbd"),
        "also used",
    );
    invalid(
        &two_nodes("", "").replace("backing = \"/data/beta.img\"", ""),
        &format!("{beta}.backing"),
        "missing",
    );
    invalid(
        &two_nodes("", "meta = \"/data/beta.img\""),
        &format!("{beta}.meta"),
        "backing",
    );
    invalid(
        &two_nodes("", "meta = \"\""),
        &format!("{beta}.meta"),
        "empty",
    );
    invalid(
        &two_nodes("", "colour = \"red\""),
        &format!("{beta}.colour"),
        "unknown key",
    );
    invalid(
        &two_nodes("protocol = \"D\"", ""),
        "resource.r0.protocol",
        "A, B, C",
    );
    invalid(
        &two_nodes("quorum = 3", ""),
        "resource.r0.quorum",
        "exceeds the 2 nodes",
    );
    invalid(
        &two_nodes("quorum = \"most\"", ""),
        "resource.r0.quorum",
        "invalid quorum",
    );
    invalid(
        &two_nodes("after-sb-1pri = \"discard-least-changes\"", ""),
        "resource.r0.after-sb-1pri",
        "discard-secondary",
    );
    invalid(
        &two_nodes("on-io-error = \"panic\"", ""),
        "resource.r0.on-io-error",
        "detach",
    );
    invalid(
        &two_nodes("resync-rate = \"fast\"", ""),
        "resource.r0.resync-rate",
        "invalid size",
    );
    invalid(
        &two_nodes("resync-rate = 0", ""),
        "resource.r0.resync-rate",
        "more than 0",
    );
    invalid(
        &two_nodes("bitmap-block-size = \"3K\"", ""),
        "resource.r0.bitmap-block-size",
        "power of two",
    );
    invalid(
        &two_nodes("al-extent-size = \"2K\"", ""),
        "resource.r0.al-extent-size",
        "power of two",
    );
    invalid(
        &two_nodes("bitmap-block-size = \"1M\"\nal-extent-size = \"64K\"", ""),
        "resource.r0.al-extent-size",
        "smaller",
    );
    invalid(
        &two_nodes("al-extents = 0", ""),
        "resource.r0.al-extents",
        "1..=65534",
    );
    invalid(
        &two_nodes("tls = \"yes\"", ""),
        "resource.r0.tls",
        "expected a table",
    );
    invalid(
        &two_nodes("[resource.r0.tls]\nca = \"a\"\ncert = \"b\"", ""),
        "resource.r0.tls.key",
        "missing",
    );
    invalid(
        &two_nodes("", "").replace("[global.tls]", "[global.tls]\nextra = 1"),
        "global.tls.extra",
        "unknown key",
    );
    invalid(
        &two_nodes("", "").replace("[global]\nsecret-file = \"secret\"", "[global]"),
        "resource.r0.secret-file",
        "required for more than one node",
    );
    invalid(
        &format!("[other]\nx = 1\n{}", two_nodes("", "")),
        "other",
        "unknown key",
    );
    invalid("[global]\n", "resource", "no resources");
    invalid(
        "[resource.r0]\nprotocol = \"C\"\n",
        "resource.r0.node",
        "at least one node",
    );
    invalid(
        &two_nodes("", "").replace("[resource.r0.node.beta]", "[resource.r0.node.\"be ta\"]"),
        "resource.r0.node.be ta",
        "node names",
    );
    invalid(
        &two_nodes("", "")
            .replace("[resource.r0]", "[resource.\"r 0\"]")
            .replace("resource.r0.node", "resource.\"r 0\".node"),
        "resource.r 0",
        "resource names",
    );
    invalid(
        &two_nodes("", "").replace("[resource.r0.node.alpha]", "[[resource.r0.node.alpha]]"),
        "resource.r0.node.alpha",
        "expected a table",
    );
}

#[test]
fn connections() {
    let conn = |body: &str| two_nodes("", &format!("[[resource.r0.connection]]\n{body}"));
    let cfg = parse(&conn("nodes = [\"beta\", \"alpha\"]\nprotocol = \"B\"")).unwrap();
    assert_eq!(
        cfg.resources[0].protocol_between("alpha", "beta"),
        Protocol::B
    );
    let c = "resource.r0.connection[0]";
    invalid(
        &conn("nodes = [\"alpha\"]\nprotocol = \"B\""),
        &format!("{c}.nodes"),
        "exactly two",
    );
    invalid(
        &conn("nodes = [\"alpha\", \"alpha\"]\nprotocol = \"B\""),
        &format!("{c}.nodes"),
        "differ",
    );
    invalid(
        &conn("nodes = [\"alpha\", \"delta\"]\nprotocol = \"B\""),
        &format!("{c}.nodes"),
        "no node \"delta\"",
    );
    invalid(
        &conn("nodes = [\"alpha\", \"beta\"]"),
        &format!("{c}.protocol"),
        "missing",
    );
    invalid(
        &conn("nodes = [\"alpha\", 1]\nprotocol = \"B\""),
        &format!("{c}.nodes"),
        "array of strings",
    );
    invalid(&conn("protocol = \"B\""), &format!("{c}.nodes"), "missing");
    let twice = conn(
        "nodes = [\"alpha\", \"beta\"]\nprotocol = \"B\"\n[[resource.r0.connection]]\nnodes = [\"beta\", \"alpha\"]\nprotocol = \"A\"",
    );
    invalid(&twice, "resource.r0.connection[1].nodes", "already");
    invalid(
        &two_nodes("connection = 5", ""),
        "resource.r0.connection",
        "array of tables",
    );
}

fn resource(name: &str, port: u16, alpha_backing: &str) -> String {
    format!(
        r#"
[resource.{name}.node.alpha]
id = 0
address = "127.0.0.1:{port}"
nbd = "127.0.0.1:{nbd}"
backing = "{alpha_backing}"
[resource.{name}.node.beta]
id = 1
address = "127.0.0.2:{port}"
nbd = "127.0.0.2:{nbd}"
backing = "/data/{name}-beta.img"
meta = "/data/{name}-beta.md"
"#,
        nbd = port + 1000
    )
}

#[test]
fn across_resources() {
    let global =
        "[global]\nsecret-file = \"s\"\n[global.tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n";
    let ok = format!(
        "{global}{}{}",
        resource("r0", 7000, "/a0"),
        resource("r1", 7001, "/a1")
    );
    let cfg = parse(&ok).unwrap();
    assert_eq!(cfg.resources.len(), 2);
    assert_eq!(cfg.resources_of("alpha").len(), 2);
    // The same backing device for the same node in two resources: refused.
    let same_disk = format!(
        "{global}{}{}",
        resource("r0", 7000, "/a0"),
        resource("r1", 7001, "/a0")
    );
    invalid(
        &same_disk,
        "resource.r1.node.alpha.backing",
        "also used by resource.r0.node.alpha.backing",
    );
    // The same replication address in two resources: refused.
    let same_addr = format!(
        "{global}{}{}",
        resource("r0", 7000, "/a0"),
        resource("r1", 7000, "/a1")
    );
    invalid(
        &same_addr,
        "resource.r1.node.alpha.address",
        "also used by resource r0",
    );
    // One node's NBD export of r1 on r0's NBD address, on the wildcard address with r0's NBD
    // port, or on r0's replication address: refused (the second export could never listen).
    for nbd in ["127.0.0.1:8000", "0.0.0.0:8000", "127.0.0.1:7000"] {
        let r1 = resource("r1", 7001, "/a1").replace("127.0.0.1:8001", nbd);
        invalid(
            &format!("{global}{}{r1}", resource("r0", 7000, "/a0")),
            "resource.r1.node.alpha.nbd",
            "on the same node",
        );
    }
    // The same port on another node's address is fine (another host).
    let r1 = resource("r1", 7001, "/a1").replace("127.0.0.1:8001", "127.0.0.2:8000");
    assert!(parse(&format!("{global}{}{r1}", resource("r0", 7000, "/a0"))).is_ok());
}

#[test]
fn single_node_needs_no_tls() {
    let cfg = parse(
        "[resource.solo.node.a]\nid = 5\naddress = \"127.0.0.1:7000\"\nnbd = \"127.0.0.1:10809\"\nbacking = \"a.img\"\n",
    )
    .unwrap();
    let r = cfg.resource("solo").unwrap();
    assert!(r.tls.is_none());
    assert_eq!(r.nodes[0].backing, Path::new("/etc/blockd/a.img"));
    assert!(cfg.resource("nope").is_none());
}

#[test]
fn too_many_nodes() {
    let mut text = String::new();
    for i in 0..33 {
        text += &format!(
            "[resource.big.node.n{i}]\nid = {}\naddress = \"127.0.0.1:{}\"\nnbd = \"127.0.1.1:{}\"\nbacking = \"d{i}\"\n",
            i % 32,
            7000 + i,
            9000 + i
        );
    }
    invalid(&text, "resource.big.node", "at most 32");
}

#[test]
fn metrics_listen_global_and_per_node() {
    let text = two_nodes("", "metrics-listen = \"127.0.0.2:9943\"").replacen(
        "[global]\n",
        "[global]\nmetrics-listen = \"127.0.0.1:9942\"\n",
        1,
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9942".parse().unwrap()));
    let alpha = &cfg.resources_of("alpha")[0];
    let beta = &cfg.resources_of("beta")[0];
    assert_eq!(
        cfg.metrics_listen_of(alpha),
        Some("127.0.0.1:9942".parse().unwrap())
    );
    assert_eq!(
        cfg.metrics_listen_of(beta),
        Some("127.0.0.2:9943".parse().unwrap())
    );
    let none = parse(&two_nodes("", "")).unwrap();
    assert_eq!(none.metrics_listen_of(&none.resources_of("alpha")[0]), None);
    invalid(
        &two_nodes("", "metrics-listen = \"localhost\""),
        "resource.r0.node.beta.metrics-listen",
        "is not an IP:port address",
    );
    invalid(
        &two_nodes("", "").replacen("[global]\n", "[global]\nmetrics-listen = 9942\n", 1),
        "global.metrics-listen",
        "expected a string",
    );
}

#[test]
fn one_resource_per_process() {
    let text = format!(
        "{}\n{}",
        two_nodes("", ""),
        resource("r1", 7100, "/data/alpha-r1.img")
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(
        cfg.control_socket_of_resource("alpha", "r1"),
        Path::new("/run/blockd/alpha-r1.sock")
    );
    let only = cfg.only_resource("r1").unwrap();
    assert_eq!(only.resources.len(), 1);
    assert_eq!(only.resources[0].name, "r1");
    assert_eq!(
        only.control_socket_of("alpha"),
        cfg.control_socket_of_resource("alpha", "r1")
    );
    let e = cfg.only_resource("r9").unwrap_err();
    assert!(matches!(e, ConfigError::UnknownResource { .. }), "{e}");
    assert!(e.to_string().contains("known resources: r0, r1"), "{e}");
    // A template without `.sock` gets the suffix appended.
    assert_eq!(
        resource_socket_template("/run/b/{node}", "r0"),
        "/run/b/{node}-r0"
    );
}

#[test]
fn resync_control_and_checksum_keys() {
    use crate::repl::checksum::Csums;
    let cfg = parse(&two_nodes("", "")).unwrap();
    let r = &cfg.resources[0];
    assert_eq!(r.csums, Csums::Auto);
    assert_eq!(
        (r.c_min_rate, r.c_fill_target, r.c_plan_ahead),
        (4 << 20, 8 << 20, 20)
    );
    let s = r.rate_settings();
    assert_eq!((s.max_rate, s.min_rate), (r.resync_rate, 4 << 20));
    assert_eq!(s.plan_ahead, std::time::Duration::from_secs(2));
    let cfg = parse(&two_nodes(
        "csums = \"no\"\nc-min-rate = \"1M\"\nc-fill-target = \"2M\"\nc-plan-ahead = 5",
        "",
    ))
    .unwrap();
    let r = &cfg.resources[0];
    assert_eq!(r.csums, Csums::No);
    assert_eq!(
        (r.c_min_rate, r.c_fill_target, r.c_plan_ahead),
        (1 << 20, 2 << 20, 5)
    );
    // c-plan-ahead = 0: a fixed rate, no back-off for the application.
    let cfg = parse(&two_nodes("c-plan-ahead = 0", "")).unwrap();
    let s = cfg.resources[0].rate_settings();
    assert_eq!(s.min_rate, s.max_rate);
    invalid(
        &two_nodes("csums = \"sometimes\"", ""),
        "resource.r0.csums",
        "auto",
    );
    invalid(
        &two_nodes("c-plan-ahead = 301", ""),
        "resource.r0.c-plan-ahead",
        "0..=300",
    );
    invalid(
        &two_nodes("c-min-rate = \"slow\"", ""),
        "resource.r0.c-min-rate",
        "invalid size",
    );
}

#[test]
fn sndbuf_size_per_resource_with_a_global_default() {
    let cfg = parse(&two_nodes("", "")).unwrap();
    assert_eq!(cfg.resources[0].sndbuf_size, 16 << 20);
    let cfg = parse(&two_nodes("sndbuf-size = \"4M\"", "")).unwrap();
    assert_eq!(cfg.resources[0].sndbuf_size, 4 << 20);
    // From [global]; a resource's own value wins.
    let global = two_nodes("", "").replace("[global]\n", "[global]\nsndbuf-size = \"32M\"\n");
    assert_eq!(parse(&global).unwrap().resources[0].sndbuf_size, 32 << 20);
    let both = two_nodes("sndbuf-size = 2097152", "")
        .replace("[global]\n", "[global]\nsndbuf-size = \"32M\"\n");
    assert_eq!(parse(&both).unwrap().resources[0].sndbuf_size, 2 << 20);
    invalid(
        &two_nodes("sndbuf-size = 0", ""),
        "resource.r0.sndbuf-size",
        "at least 1M",
    );
    invalid(
        &two_nodes("sndbuf-size = \"512K\"", ""),
        "resource.r0.sndbuf-size",
        "at least 1M",
    );
    invalid(
        &two_nodes("sndbuf-size = \"big\"", ""),
        "resource.r0.sndbuf-size",
        "invalid size",
    );
    invalid(
        &two_nodes("", "").replace("[global]\n", "[global]\nsndbuf-size = \"100K\"\n"),
        "global.sndbuf-size",
        "at least 1M",
    );
}

#[test]
fn nbd_same_host_congestion_per_resource_with_a_global_default() {
    use crate::nbd::congestion::SameHost;
    let get = |text: &str| parse(text).unwrap().resources[0].nbd_same_host_congestion;
    assert_eq!(get(&two_nodes("", "")), SameHost::default());
    assert_eq!(
        get(&two_nodes("nbd-same-host-congestion = \"reno\"", "")),
        "reno".parse().unwrap()
    );
    let global = two_nodes("", "").replace(
        "[global]\n",
        "[global]\nnbd-same-host-congestion = \"system\"\n",
    );
    assert_eq!(get(&global), SameHost::System);
    let both = two_nodes("nbd-same-host-congestion = \"cubic\"", "").replace(
        "[global]\n",
        "[global]\nnbd-same-host-congestion = \"system\"\n",
    );
    assert_eq!(get(&both), SameHost::default());
    invalid(
        &two_nodes("nbd-same-host-congestion = \"no such\"", ""),
        "resource.r0.nbd-same-host-congestion",
        "not a TCP congestion control algorithm name",
    );
}

#[test]
fn snapshot_areas_never_default_to_dev() {
    // Beside a backing file; a node's own `snapshot-dir` wins; never in /dev.
    let cfg = parse(&two_nodes("", "snapshot-dir = \"snaps\"")).unwrap();
    let r = &cfg.resources[0];
    assert_eq!(r.node("alpha").unwrap().snapshot_dir(), Path::new("/data"));
    assert_eq!(
        r.node("beta").unwrap().snapshot_dir(),
        Path::new("/etc/blockd/snaps")
    );
    let on_lvm = two_nodes("", "").replace("/data/alpha.img", "/dev/vg0/r0");
    let cfg = parse(&on_lvm).unwrap();
    assert_eq!(
        cfg.resources[0].node("alpha").unwrap().snapshot_dir(),
        Path::new(DEFAULT_SNAPSHOT_DIR)
    );
}
