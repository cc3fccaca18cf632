//! The cluster configuration file (TOML): one file for the whole cluster, copied to every
//! node, in the spirit of drbd.conf. `[global]` holds defaults for every resource setting;
//! `[resource.NAME]` overrides them and lists its nodes (`[resource.NAME.node.NODE]`) and
//! per-pair protocol overrides (`[[resource.NAME.connection]]`). See
//! `blockd/examples/cluster.toml` for every key.
//!
//! A node finds its own sections by an explicit name (`--node NAME`) or by its host name
//! (matched against node names and their optional `hostname` key, full or short form).
//! Relative paths are relative to the directory of the config file. Every error names the
//! file, the key path and the problem; unknown keys are errors.

mod section;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::size::parse_size;

use crate::meta::file::MetaLocation;
use crate::meta::generation::MAX_NODES;
use crate::meta::layout::{DEFAULT_AL_EXTENT_SIZE, DEFAULT_AL_EXTENTS, DEFAULT_BITMAP_BLOCK_SIZE};
use crate::repl::names::named_enum;
use crate::repl::quorum::{OnNoQuorum, QuorumSetting};
use crate::repl::split_brain::{After0Pri, After1Pri, After2Pri, SplitBrainPolicy};
use crate::repl::state::Protocol;
use section::Section;

/// Default control socket of a node (`{node}` is replaced by the node name).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/blockd/{node}.sock";

/// Default resync rate limit (bytes per second).
pub const DEFAULT_RESYNC_RATE: u64 = 100 << 20;
/// Default `c-min-rate`: the resync keeps 4 MiB/s while the application is busy.
pub const DEFAULT_C_MIN_RATE: u64 = 4 << 20;
/// Default `c-fill-target`: 8 MiB of resync data in flight.
pub const DEFAULT_C_FILL_TARGET: u64 = 8 << 20;
/// Default `c-plan-ahead`: 2 s (in tenths of a second, like DRBD).
pub const DEFAULT_C_PLAN_AHEAD: u32 = 20;
/// Application bytes per 100 ms below which the application counts as idle for the resync.
pub const DEFAULT_APP_IDLE_BYTES: u64 = 64 << 10;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: invalid TOML: {message}")]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {key}: {problem}")]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{file}: no node is named {name:?} (known nodes: {known})")]
    UnknownNode {
        file: PathBuf,
        name: String,
        known: String,
    },
    #[error(
        "{file}: no node matches host name {hostname:?}; use --node NAME (known nodes: {known})"
    )]
    NoNodeForHost {
        file: PathBuf,
        hostname: String,
        known: String,
    },
    #[error("{file}: no resource is named {name:?} (known resources: {known})")]
    UnknownResource {
        file: PathBuf,
        name: String,
        known: String,
    },
    #[error("cannot determine the host name")]
    Hostname(#[source] std::io::Error),
}

named_enum! {
    /// What to do when the local backing device fails (`on-io-error`).
    pub enum OnIoError: "on-io-error action" {
        /// Detach the disk (Diskless) and keep serving through a connected UpToDate peer.
        Detach = "detach",
        /// Return the error to the NBD client.
        PassOn = "pass-on",
    }
}

/// TLS files of a node (the same paths on every node; each node has its own files there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS on the NBD export of a replicated resource (`[nbd-tls]`): a certificate directory in
/// the GnuTLS layout qemu-nbd and nbdkit use (`server-cert.pem`, `server-key.pem`, optional
/// `ca-cert.pem` to require client certificates), `{node}` replaced by the node name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdTls {
    pub dir: PathBuf,
    /// `mode = "required"` (the default): clients must STARTTLS; `"optional"`: offered only.
    pub required: bool,
}

impl NbdTls {
    /// The directory of node `node`.
    pub fn dir_for_node(&self, node: &str) -> PathBuf {
        PathBuf::from(self.dir.to_string_lossy().replace("{node}", node))
    }
}

impl TlsFiles {
    /// The files of node `node`: `{node}` in a path is replaced by the node name (lets several
    /// nodes share one config on one machine, and keeps per-node files apart in general).
    pub fn for_node(&self, node: &str) -> TlsFiles {
        let sub = |p: &Path| PathBuf::from(p.to_string_lossy().replace("{node}", node));
        TlsFiles {
            ca: sub(&self.ca),
            cert: sub(&self.cert),
            key: sub(&self.key),
        }
    }
}

/// Where a node keeps its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaPlacement {
    /// At the end of the backing device.
    Internal,
    /// In this file.
    External(PathBuf),
}

/// Snapshot areas of nodes whose metadata is on a block device and that name no `snapshot-dir`.
pub const DEFAULT_SNAPSHOT_DIR: &str = "/var/lib/blockd/snapshots";

/// One node of a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Node id, 0..=31, unique in the resource.
    pub id: u8,
    /// Replication address: this node listens here, peers connect here.
    pub address: SocketAddr,
    /// NBD listen address (used while Primary).
    pub nbd: SocketAddr,
    /// Backing device or file.
    pub backing: PathBuf,
    pub meta: MetaPlacement,
    /// Host name to match instead of the node name.
    pub hostname: Option<String>,
    /// Prometheus endpoint of this node for this resource (`metrics-listen`; default: the
    /// `[global]` one; none: no endpoint).
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of this node's snapshot areas (`snapshot-dir`; default: see
    /// [`Node::snapshot_dir`]).
    pub snapshot_dir: Option<PathBuf>,
}

impl Node {
    /// Where the node's metadata lives.
    pub fn meta_location(&self) -> MetaLocation {
        match &self.meta {
            MetaPlacement::Internal => MetaLocation::Internal(self.backing.clone()),
            MetaPlacement::External(p) => MetaLocation::External(p.clone()),
        }
    }

    /// Where this node keeps its snapshot areas: `snapshot-dir`, else beside the metadata
    /// (internal metadata: beside the backing file), unless the metadata is on a block device:
    /// its directory, `/dev`, is a memory filesystem that a reboot empties, so then
    /// [`DEFAULT_SNAPSHOT_DIR`].
    pub fn snapshot_dir(&self) -> PathBuf {
        if let Some(d) = &self.snapshot_dir {
            return d.clone();
        }
        let meta = match self.meta_location() {
            MetaLocation::Internal(p) | MetaLocation::External(p) => p,
        };
        let on_device = std::fs::metadata(&meta)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        match meta.parent().filter(|p| !p.as_os_str().is_empty()) {
            _ if on_device || meta.starts_with("/dev") => PathBuf::from(DEFAULT_SNAPSHOT_DIR),
            Some(p) => p.to_path_buf(),
            None => PathBuf::from("."),
        }
    }

    fn matches_host(&self, hostname: &str) -> bool {
        let short = hostname.split('.').next().unwrap_or(hostname);
        let candidates = [Some(self.name.as_str()), self.hostname.as_deref()];
        candidates
            .into_iter()
            .flatten()
            .any(|c| c == hostname || c == short)
    }
}

/// A protocol override for the link between two nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionOverride {
    pub nodes: [String; 2],
    pub protocol: Protocol,
}

/// One replicated resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub protocol: Protocol,
    pub nodes: Vec<Node>,
    pub connections: Vec<ConnectionOverride>,
    /// Required when the resource has more than one node.
    pub tls: Option<TlsFiles>,
    /// TLS on the NBD export (`[nbd-tls]`); plain NBD without it.
    pub nbd_tls: Option<NbdTls>,
    pub secret_file: Option<PathBuf>,
    /// Bytes per second.
    pub resync_rate: u64,
    /// Copy-on-write area of each snapshot, bytes (`snapshot-cow-size`; default a quarter of
    /// the device).
    pub snapshot_cow_size: Option<u64>,
    pub quorum: QuorumSetting,
    pub on_no_quorum: OnNoQuorum,
    pub split_brain: SplitBrainPolicy,
    pub on_io_error: OnIoError,
    pub bitmap_block_size: u32,
    pub al_extents: u32,
    pub al_extent_size: u32,
    /// Resync rate while the application is busy (`c-min-rate`), bytes per second.
    pub c_min_rate: u64,
    /// Resync bytes in flight the dynamic controller aims for (`c-fill-target`).
    pub c_fill_target: u64,
    /// Planning horizon of the dynamic resync controller in tenths of a second
    /// (`c-plan-ahead`; 0: fixed rate `resync-rate`, no back-off for the application).
    pub c_plan_ahead: u32,
    /// When resyncs compare checksums first (`csums`).
    pub csums: crate::repl::checksum::Csums,
    /// Bytes of replicated writes queued to a peer and not yet acknowledged, at most
    /// (`sndbuf-size`; protocol A writes wait beyond it, see `repl::congestion`).
    pub sndbuf_size: u64,
    /// TCP congestion control of NBD clients on this host (`nbd-same-host-congestion`; see
    /// `nbd::congestion`).
    pub nbd_same_host_congestion: crate::nbd::congestion::SameHost,
}

impl Resource {
    /// The resync pacing of this resource (see `repl::rate_control`).
    pub fn rate_settings(&self) -> crate::repl::rate_control::RateSettings {
        use crate::repl::rate_control::RateSettings;
        if self.c_plan_ahead == 0 {
            return RateSettings::fixed(self.resync_rate);
        }
        RateSettings {
            max_rate: self.resync_rate,
            min_rate: self.c_min_rate,
            fill_target: self.c_fill_target,
            plan_ahead: std::time::Duration::from_millis(u64::from(self.c_plan_ahead) * 100),
            app_idle_bytes: DEFAULT_APP_IDLE_BYTES,
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The protocol of the link between nodes `a` and `b`.
    pub fn protocol_between(&self, a: &str, b: &str) -> Protocol {
        self.connections
            .iter()
            .find(|c| (c.nodes[0] == a && c.nodes[1] == b) || (c.nodes[0] == b && c.nodes[1] == a))
            .map_or(self.protocol, |c| c.protocol)
    }

    /// Bit mask of the node ids (for quorum).
    pub fn member_mask(&self) -> u32 {
        self.nodes.iter().fold(0, |m, n| m | 1 << n.id)
    }
}

/// A resource as seen from one of its nodes.
#[derive(Clone, Debug)]
pub struct LocalResource<'a> {
    pub resource: &'a Resource,
    pub me: &'a Node,
    pub peers: Vec<&'a Node>,
}

/// The whole cluster file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub file: PathBuf,
    /// Control socket path template (`[global] control-socket`); `{node}` is replaced by the
    /// node name. Default [`DEFAULT_CONTROL_SOCKET`].
    pub control_socket: String,
    /// Prometheus endpoint (`[global] metrics-listen`) for nodes that name none themselves.
    pub metrics_listen: Option<SocketAddr>,
    /// Sorted by name.
    pub resources: Vec<Resource>,
}

/// Settings allowed in `[global]` and in each resource (resource values win).
#[derive(Default)]
struct Settings {
    protocol: Option<Protocol>,
    tls: Option<TlsFiles>,
    nbd_tls: Option<NbdTls>,
    secret_file: Option<PathBuf>,
    resync_rate: Option<u64>,
    snapshot_cow_size: Option<u64>,
    quorum: Option<QuorumSetting>,
    on_no_quorum: Option<OnNoQuorum>,
    after_sb_0pri: Option<After0Pri>,
    after_sb_1pri: Option<After1Pri>,
    after_sb_2pri: Option<After2Pri>,
    on_io_error: Option<OnIoError>,
    bitmap_block_size: Option<u32>,
    al_extents: Option<u32>,
    al_extent_size: Option<u32>,
    c_min_rate: Option<u64>,
    c_fill_target: Option<u64>,
    c_plan_ahead: Option<u32>,
    csums: Option<crate::repl::checksum::Csums>,
    sndbuf_size: Option<u64>,
    nbd_same_host_congestion: Option<crate::nbd::congestion::SameHost>,
}

impl Settings {
    fn read(sec: &mut Section<'_>) -> Result<Settings, ConfigError> {
        fn named<T: std::str::FromStr<Err = crate::repl::names::UnknownName>>(
            sec: &mut Section<'_>,
            key: &str,
        ) -> Result<Option<T>, ConfigError> {
            match sec.string(key)? {
                None => Ok(None),
                Some(s) => s
                    .parse()
                    .map(Some)
                    .map_err(|e: crate::repl::names::UnknownName| {
                        sec.error(
                            key,
                            format!("{:?} is not one of: {}", e.value, e.expected_list()),
                        )
                    }),
            }
        }
        let size = |sec: &mut Section<'_>, key: &str| -> Result<Option<u64>, ConfigError> {
            match sec.string_or_integer(key)? {
                None => Ok(None),
                Some(s) => parse_size(&s)
                    .map(Some)
                    .map_err(|e| sec.error(key, e.to_string())),
            }
        };
        let protocol = match sec.string("protocol")? {
            None => None,
            Some(p) => Some(
                Protocol::parse_loose(&p)
                    .map_err(|_| sec.error("protocol", format!("{p:?} is not one of: A, B, C")))?,
            ),
        };
        let tls = match sec.table("tls")? {
            None => None,
            Some(mut t) => {
                let mut file = |k: &str| -> Result<PathBuf, ConfigError> {
                    t.path(k)?.ok_or_else(|| t.error(k, "missing (required)"))
                };
                let files = TlsFiles {
                    ca: file("ca")?,
                    cert: file("cert")?,
                    key: file("key")?,
                };
                t.finish()?;
                Some(files)
            }
        };
        let nbd_tls = match sec.table("nbd-tls")? {
            None => None,
            Some(mut t) => {
                let dir = t
                    .path("dir")?
                    .ok_or_else(|| t.error("dir", "missing (required)"))?;
                let required = match t.string("mode")?.as_deref() {
                    None | Some("required") => true,
                    Some("optional") => false,
                    Some(other) => {
                        return Err(t.error(
                            "mode",
                            format!("{other:?} is not one of: required, optional"),
                        ));
                    }
                };
                t.finish()?;
                Some(NbdTls { dir, required })
            }
        };
        let secret_file = sec.path("secret-file")?;
        let resync_rate = size(sec, "resync-rate")?;
        if resync_rate == Some(0) {
            return Err(sec.error("resync-rate", "must be more than 0"));
        }
        let snapshot_cow_size = size(sec, "snapshot-cow-size")?;
        if snapshot_cow_size.is_some_and(|s| s < 1 << 20) {
            return Err(sec.error("snapshot-cow-size", "must be at least 1M"));
        }
        let quorum = match sec.string_or_integer("quorum")? {
            None => None,
            Some(q) => Some(q.parse().map_err(|e: crate::repl::quorum::InvalidQuorum| {
                sec.error("quorum", e.to_string())
            })?),
        };
        let on_no_quorum = named(sec, "on-no-quorum")?;
        let after_sb_0pri = named(sec, "after-sb-0pri")?;
        let after_sb_1pri = named(sec, "after-sb-1pri")?;
        let after_sb_2pri = named(sec, "after-sb-2pri")?;
        let on_io_error = named(sec, "on-io-error")?;
        let bitmap_block_size = match size(sec, "bitmap-block-size")? {
            None => None,
            Some(b) if b.is_power_of_two() && (512..=1 << 20).contains(&b) => Some(b as u32),
            Some(b) => {
                return Err(sec.error(
                    "bitmap-block-size",
                    format!("{b} is not a power of two between 512 and 1M"),
                ));
            }
        };
        let al_extent_size = match size(sec, "al-extent-size")? {
            None => None,
            Some(b) if b.is_power_of_two() && (4096..=1 << 30).contains(&b) => Some(b as u32),
            Some(b) => {
                return Err(sec.error(
                    "al-extent-size",
                    format!("{b} is not a power of two between 4K and 1G"),
                ));
            }
        };
        let al_extents = match sec.integer("al-extents")? {
            None => None,
            Some(n @ 1..=65534) => Some(n as u32),
            Some(n) => return Err(sec.error("al-extents", format!("{n} is not in 1..=65534"))),
        };
        let c_min_rate = size(sec, "c-min-rate")?;
        let c_fill_target = size(sec, "c-fill-target")?;
        let c_plan_ahead = match sec.integer("c-plan-ahead")? {
            None => None,
            Some(n @ 0..=300) => Some(n as u32),
            Some(n) => {
                return Err(sec.error(
                    "c-plan-ahead",
                    format!("{n} is not in 0..=300 (tenths of a second)"),
                ));
            }
        };
        let csums = named(sec, "csums")?;
        let sndbuf_size = size(sec, "sndbuf-size")?;
        if sndbuf_size.is_some_and(|s| s < crate::repl::congestion::MIN_SNDBUF_SIZE) {
            return Err(sec.error("sndbuf-size", "must be at least 1M"));
        }
        let nbd_same_host_congestion = match sec.string("nbd-same-host-congestion")? {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|e: crate::nbd::congestion::BadAlgorithm| {
                        sec.error("nbd-same-host-congestion", format!("{e}, or \"system\""))
                    })?,
            ),
        };
        Ok(Settings {
            protocol,
            tls,
            nbd_tls,
            secret_file,
            resync_rate,
            snapshot_cow_size,
            quorum,
            on_no_quorum,
            after_sb_0pri,
            after_sb_1pri,
            after_sb_2pri,
            on_io_error,
            bitmap_block_size,
            al_extents,
            al_extent_size,
            c_min_rate,
            c_fill_target,
            c_plan_ahead,
            csums,
            sndbuf_size,
            nbd_same_host_congestion,
        })
    }

    /// `self` with unset values taken from `defaults`.
    fn or(self, defaults: &Settings) -> Settings {
        Settings {
            protocol: self.protocol.or(defaults.protocol),
            tls: self.tls.or_else(|| defaults.tls.clone()),
            nbd_tls: self.nbd_tls.or_else(|| defaults.nbd_tls.clone()),
            secret_file: self.secret_file.or_else(|| defaults.secret_file.clone()),
            resync_rate: self.resync_rate.or(defaults.resync_rate),
            snapshot_cow_size: self.snapshot_cow_size.or(defaults.snapshot_cow_size),
            quorum: self.quorum.or(defaults.quorum),
            on_no_quorum: self.on_no_quorum.or(defaults.on_no_quorum),
            after_sb_0pri: self.after_sb_0pri.or(defaults.after_sb_0pri),
            after_sb_1pri: self.after_sb_1pri.or(defaults.after_sb_1pri),
            after_sb_2pri: self.after_sb_2pri.or(defaults.after_sb_2pri),
            on_io_error: self.on_io_error.or(defaults.on_io_error),
            bitmap_block_size: self.bitmap_block_size.or(defaults.bitmap_block_size),
            al_extents: self.al_extents.or(defaults.al_extents),
            al_extent_size: self.al_extent_size.or(defaults.al_extent_size),
            c_min_rate: self.c_min_rate.or(defaults.c_min_rate),
            c_fill_target: self.c_fill_target.or(defaults.c_fill_target),
            c_plan_ahead: self.c_plan_ahead.or(defaults.c_plan_ahead),
            csums: self.csums.or(defaults.csums),
            sndbuf_size: self.sndbuf_size.or(defaults.sndbuf_size),
            nbd_same_host_congestion: self
                .nbd_same_host_congestion
                .or(defaults.nbd_same_host_congestion),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn socket_addr(sec: &mut Section<'_>, key: &str) -> Result<SocketAddr, ConfigError> {
    let text = sec.required_string(key)?;
    text.parse()
        .map_err(|_| sec.error(key, format!("{text:?} is not an IP:port address")))
}

fn optional_socket_addr(
    sec: &mut Section<'_>,
    key: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    match sec.string(key)? {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| sec.error(key, format!("{text:?} is not an IP:port address"))),
    }
}

fn read_node(name: String, mut sec: Section<'_>) -> Result<Node, ConfigError> {
    if !valid_name(&name) {
        return Err(sec.error_here("node names use letters, digits, '-', '_' and '.'"));
    }
    let id = match sec.integer("id")? {
        None => return Err(sec.error("id", "missing (required)")),
        Some(id @ 0..=31) => id as u8,
        Some(id) => return Err(sec.error("id", format!("{id} is not in 0..=31"))),
    };
    let address = socket_addr(&mut sec, "address")?;
    let nbd = socket_addr(&mut sec, "nbd")?;
    let backing = sec
        .path("backing")?
        .ok_or_else(|| sec.error("backing", "missing (required)"))?;
    let meta = match sec.string("meta")?.as_deref() {
        None | Some("internal") => MetaPlacement::Internal,
        Some("") => return Err(sec.error("meta", "empty path (use \"internal\" or a file)")),
        Some(p) => MetaPlacement::External(sec.resolve(p)),
    };
    if meta == MetaPlacement::External(backing.clone()) {
        return Err(sec.error("meta", "is the backing device; use \"internal\""));
    }
    let hostname = sec.string("hostname")?;
    let metrics_listen = optional_socket_addr(&mut sec, "metrics-listen")?;
    let snapshot_dir = sec.path("snapshot-dir")?;
    sec.finish()?;
    Ok(Node {
        name,
        id,
        address,
        nbd,
        backing,
        meta,
        hostname,
        metrics_listen,
        snapshot_dir,
    })
}

fn read_resource(
    name: String,
    mut sec: Section<'_>,
    global: &Settings,
) -> Result<Resource, ConfigError> {
    if !valid_name(&name) {
        return Err(sec.error_here("resource names use letters, digits, '-', '_' and '.'"));
    }
    let settings = Settings::read(&mut sec)?.or(global);
    let mut nodes = Vec::new();
    for (node_name, node_sec) in sec.tables("node")? {
        nodes.push(read_node(node_name, node_sec)?);
    }
    if nodes.is_empty() {
        return Err(sec.error("node", "a resource needs at least one node"));
    }
    if nodes.len() > MAX_NODES {
        return Err(sec.error(
            "node",
            format!("{} nodes, at most {MAX_NODES}", nodes.len()),
        ));
    }
    // Uniqueness inside the resource (node names are unique as TOML keys).
    let node_key = |n: &Node, k: &str| sec.key(&format!("node.{}.{k}", n.name));
    let dup = |key: String, problem: String| ConfigError::Invalid {
        file: PathBuf::new(),
        key,
        problem,
    };
    let mut ids = HashMap::new();
    let mut addrs = HashMap::new();
    let mut nbds = HashMap::new();
    let mut hosts = HashMap::new();
    for n in &nodes {
        if let Some(other) = ids.insert(n.id, &n.name) {
            return Err(dup(
                node_key(n, "id"),
                format!("id {} is also used by node {other}", n.id),
            ));
        }
        if let Some(other) = addrs.insert(n.address, &n.name) {
            return Err(dup(
                node_key(n, "address"),
                format!("{} is also used by node {other}", n.address),
            ));
        }
        if let Some(other) = nbds.insert(n.nbd, &n.name) {
            return Err(dup(
                node_key(n, "nbd"),
                format!("{} is also used by node {other}", n.nbd),
            ));
        }
        if let Some(h) = &n.hostname
            && let Some(other) = hosts.insert(h.clone(), &n.name)
        {
            return Err(dup(
                node_key(n, "hostname"),
                format!("{h:?} is also used by node {other}"),
            ));
        }
    }
    let mut connections = Vec::new();
    let mut pairs = HashSet::new();
    for mut c in sec.array_of_tables("connection")? {
        let names = c
            .strings("nodes")?
            .ok_or_else(|| c.error("nodes", "missing (required)"))?;
        let [a, b]: [String; 2] = names
            .try_into()
            .map_err(|_| c.error("nodes", "expected exactly two node names"))?;
        for n in [&a, &b] {
            if !nodes.iter().any(|x| &x.name == n) {
                return Err(c.error("nodes", format!("no node {n:?} in this resource")));
            }
        }
        if a == b {
            return Err(c.error("nodes", "the two nodes must differ"));
        }
        let key = if a < b {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        if !pairs.insert(key) {
            return Err(c.error(
                "nodes",
                format!("{a} and {b} already have a connection entry"),
            ));
        }
        let p = c.required_string("protocol")?;
        let protocol = Protocol::parse_loose(&p)
            .map_err(|_| c.error("protocol", format!("{p:?} is not one of: A, B, C")))?;
        c.finish()?;
        connections.push(ConnectionOverride {
            nodes: [a, b],
            protocol,
        });
    }
    if nodes.len() > 1 {
        if settings.tls.is_none() {
            return Err(sec.error(
                "tls",
                "missing (required for more than one node; or set it in [global])",
            ));
        }
        if settings.secret_file.is_none() {
            return Err(sec.error(
                "secret-file",
                "missing (required for more than one node; or set it in [global])",
            ));
        }
    }
    let quorum = settings.quorum.unwrap_or_default();
    if let QuorumSetting::AtLeast(n) = quorum
        && usize::from(n) > nodes.len()
    {
        return Err(sec.error(
            "quorum",
            format!("{n} exceeds the {} nodes of the resource", nodes.len()),
        ));
    }
    let bitmap_block_size = settings
        .bitmap_block_size
        .unwrap_or(DEFAULT_BITMAP_BLOCK_SIZE);
    let al_extent_size = settings.al_extent_size.unwrap_or(DEFAULT_AL_EXTENT_SIZE);
    if al_extent_size < bitmap_block_size {
        return Err(sec.error(
            "al-extent-size",
            format!("{al_extent_size} is smaller than bitmap-block-size {bitmap_block_size}"),
        ));
    }
    sec.finish()?;
    nodes.sort_by_key(|n| n.id);
    Ok(Resource {
        name,
        protocol: settings.protocol.unwrap_or(Protocol::C),
        nodes,
        connections,
        tls: settings.tls,
        nbd_tls: settings.nbd_tls,
        secret_file: settings.secret_file,
        resync_rate: settings.resync_rate.unwrap_or(DEFAULT_RESYNC_RATE),
        snapshot_cow_size: settings.snapshot_cow_size,
        quorum,
        on_no_quorum: settings.on_no_quorum.unwrap_or(OnNoQuorum::SuspendIo),
        split_brain: SplitBrainPolicy {
            zero_primaries: settings.after_sb_0pri.unwrap_or(After0Pri::Disconnect),
            one_primary: settings.after_sb_1pri.unwrap_or(After1Pri::Disconnect),
            two_primaries: settings.after_sb_2pri.unwrap_or(After2Pri::Disconnect),
        },
        on_io_error: settings.on_io_error.unwrap_or(OnIoError::Detach),
        bitmap_block_size,
        al_extents: settings.al_extents.unwrap_or(DEFAULT_AL_EXTENTS),
        al_extent_size,
        c_min_rate: settings.c_min_rate.unwrap_or(DEFAULT_C_MIN_RATE),
        c_fill_target: settings.c_fill_target.unwrap_or(DEFAULT_C_FILL_TARGET),
        c_plan_ahead: settings.c_plan_ahead.unwrap_or(DEFAULT_C_PLAN_AHEAD),
        csums: settings.csums.unwrap_or(crate::repl::checksum::Csums::Auto),
        sndbuf_size: settings
            .sndbuf_size
            .unwrap_or(crate::repl::congestion::DEFAULT_SNDBUF_SIZE),
        nbd_same_host_congestion: settings.nbd_same_host_congestion.unwrap_or_default(),
    })
}

impl ClusterConfig {
    /// Reads and validates the config file at `file`.
    pub fn load(file: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        ClusterConfig::parse(&text, file)
    }

    /// Parses and validates `text` as if read from `file` (relative paths resolve against
    /// its directory).
    pub fn parse(text: &str, file: &Path) -> Result<ClusterConfig, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Syntax {
                file: file.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        let mut root = Section::root(file, table);
        let mut control_socket = DEFAULT_CONTROL_SOCKET.to_string();
        let mut metrics_listen = None;
        let global = match root.table("global")? {
            None => Settings::default(),
            Some(mut g) => {
                let s = Settings::read(&mut g)?;
                metrics_listen = optional_socket_addr(&mut g, "metrics-listen")?;
                if let Some(p) = g.string("control-socket")? {
                    if p.is_empty() {
                        return Err(g.error("control-socket", "empty path"));
                    }
                    control_socket = g.resolve(&p).to_string_lossy().into_owned();
                }
                g.finish()?;
                s
            }
        };
        let mut resources = Vec::new();
        for (name, sec) in root.tables("resource")? {
            resources.push(read_resource(name, sec, &global).map_err(|e| with_file(e, file))?);
        }
        if resources.is_empty() {
            return Err(root.error("resource", "no resources defined"));
        }
        root.finish()?;
        check_across_resources(&resources, file)?;
        Ok(ClusterConfig {
            file: file.to_path_buf(),
            control_socket,
            metrics_listen,
            resources,
        })
    }

    /// The control socket of node `node`.
    pub fn control_socket_of(&self, node: &str) -> PathBuf {
        PathBuf::from(self.control_socket.replace("{node}", node))
    }

    /// The control socket of a blockd that runs only `resource` of node `node`
    /// (`blockd --resource`): the node's socket with `-RESOURCE` before `.sock`
    /// (`/run/blockd/alpha.sock` -> `/run/blockd/alpha-r0.sock`).
    pub fn control_socket_of_resource(&self, node: &str, resource: &str) -> PathBuf {
        PathBuf::from(
            resource_socket_template(&self.control_socket, resource).replace("{node}", node),
        )
    }

    /// The config reduced to the one resource `name` (for `blockd --resource NAME`, one
    /// process per resource): its control socket becomes the per-resource one (see
    /// [`ClusterConfig::control_socket_of_resource`]).
    pub fn only_resource(&self, name: &str) -> Result<ClusterConfig, ConfigError> {
        let Some(r) = self.resource(name) else {
            return Err(ConfigError::UnknownResource {
                file: self.file.clone(),
                name: name.to_string(),
                known: self
                    .resources
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        Ok(ClusterConfig {
            file: self.file.clone(),
            control_socket: resource_socket_template(&self.control_socket, name),
            metrics_listen: self.metrics_listen,
            resources: vec![r.clone()],
        })
    }

    /// The Prometheus endpoint of `local` on its node: the node's `metrics-listen`, else the
    /// `[global]` one.
    pub fn metrics_listen_of(&self, local: &LocalResource<'_>) -> Option<SocketAddr> {
        local.me.metrics_listen.or(self.metrics_listen)
    }

    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    fn known_nodes(&self) -> String {
        let mut names: Vec<&str> = self
            .resources
            .iter()
            .flat_map(|r| r.nodes.iter().map(|n| n.name.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        names.join(", ")
    }

    /// The name of the local node: `explicit` if given (it must exist), else the node whose
    /// name or `hostname` equals `hostname` (or its first label).
    pub fn local_node_name(
        &self,
        explicit: Option<&str>,
        hostname: &str,
    ) -> Result<String, ConfigError> {
        let all = || self.resources.iter().flat_map(|r| r.nodes.iter());
        if let Some(name) = explicit {
            return match all().find(|n| n.name == name) {
                Some(n) => Ok(n.name.clone()),
                None => Err(ConfigError::UnknownNode {
                    file: self.file.clone(),
                    name: name.to_string(),
                    known: self.known_nodes(),
                }),
            };
        }
        match all().find(|n| n.matches_host(hostname)) {
            Some(n) => Ok(n.name.clone()),
            None => Err(ConfigError::NoNodeForHost {
                file: self.file.clone(),
                hostname: hostname.to_string(),
                known: self.known_nodes(),
            }),
        }
    }

    /// Every resource the node `name` belongs to, from its point of view.
    pub fn resources_of(&self, name: &str) -> Vec<LocalResource<'_>> {
        self.resources
            .iter()
            .filter_map(|r| {
                let me = r.node(name)?;
                Some(LocalResource {
                    resource: r,
                    me,
                    peers: r.nodes.iter().filter(|n| n.name != name).collect(),
                })
            })
            .collect()
    }
}

/// `template` with `-RESOURCE` inserted before a trailing `.sock` (appended otherwise).
fn resource_socket_template(template: &str, resource: &str) -> String {
    match template.strip_suffix(".sock") {
        Some(stem) => format!("{stem}-{resource}.sock"),
        None => format!("{template}-{resource}"),
    }
}

/// This machine's host name (from the kernel).
pub fn hostname() -> Result<String, ConfigError> {
    common::host::hostname().map_err(ConfigError::Hostname)
}

fn with_file(e: ConfigError, file: &Path) -> ConfigError {
    match e {
        ConfigError::Invalid {
            file: f,
            key,
            problem,
        } if f.as_os_str().is_empty() => ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            problem,
        },
        other => other,
    }
}

/// Two listen addresses of one host collide: the same port on the same address, or on the
/// wildcard address of either.
fn listen_collides(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Replication addresses are unique across the cluster (each resource listens on its own
/// port); on each node, no two listeners (replication and NBD, of any resources) collide; a
/// node's backing devices and external metadata files are unique across resources.
fn check_across_resources(resources: &[Resource], file: &Path) -> Result<(), ConfigError> {
    let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
    let mut disks: HashMap<(String, PathBuf), String> = HashMap::new();
    // Per node: every listen address seen so far, with its key.
    let mut listens: HashMap<String, Vec<(SocketAddr, String)>> = HashMap::new();
    for r in resources {
        for n in &r.nodes {
            let key = |k: &str| format!("resource.{}.node.{}.{k}", r.name, n.name);
            let err = |k: &str, problem: String| ConfigError::Invalid {
                file: file.to_path_buf(),
                key: key(k),
                problem,
            };
            if let Some(other) = addrs.insert(n.address, format!("resource {}", r.name))
                && other != format!("resource {}", r.name)
            {
                return Err(err(
                    "address",
                    format!("{} is also used by {other}", n.address),
                ));
            }
            let mine = listens.entry(n.name.clone()).or_default();
            for (k, a) in [("address", n.address), ("nbd", n.nbd)] {
                if let Some((_, other)) = mine
                    .iter()
                    .find(|(b, other)| *other != key(k) && listen_collides(a, *b))
                {
                    return Err(err(
                        k,
                        format!("{a} collides with {other} on the same node"),
                    ));
                }
                mine.push((a, key(k)));
            }
            let mut paths = vec![("backing", n.backing.clone())];
            if let MetaPlacement::External(p) = &n.meta {
                paths.push(("meta", p.clone()));
            }
            for (k, p) in paths {
                if let Some(other) = disks.insert((n.name.clone(), p.clone()), key(k)) {
                    return Err(err(k, format!("{} is also used by {other}", p.display())));
                }
            }
        }
    }
    Ok(())
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
