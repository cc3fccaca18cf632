//! The cluster configuration (TOML, one file copied to every host): hosts with their addresses,
//! state database, certificates and path prefixes; groups with members, slaves, key, include and
//! exclude rules, conflict policy, backups and actions. Also maps logical paths (`%prefix%/x`) to
//! the directories of one host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::filter::{Filter, Rule, check_syntax, is_path_pattern, normalize_pattern};

/// csync2's port.
pub const DEFAULT_PORT: u16 = 30865;
pub const DEFAULT_CONFIG: &str = "/etc/filed/filed.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error(
        "{path}: this host ({name}) is not in [hosts]; pass --node NAME or add a [hosts.{name}] section"
    )]
    UnknownSelf { path: PathBuf, name: String },
    #[error("cannot determine the hostname")]
    Hostname(#[source] std::io::Error),
}

/// Conflict auto-resolution, as csync2's `auto` statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoPolicy {
    /// Keep the conflict until `filed resolve`/`filed force`.
    #[default]
    None,
    /// The host that runs the sync first (the initiating side) wins.
    First,
    /// The version with the newer mtime wins.
    Younger,
    /// The version with the older mtime wins.
    Older,
    /// The bigger file wins.
    Bigger,
    /// The smaller file wins.
    Smaller,
    /// The host listed first (left) in the group's host list wins.
    Left,
    /// The host listed later (right) in the group's host list wins.
    Right,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    ca: Option<String>,
    ca_key: Option<String>,
    #[serde(default)]
    prefix: BTreeMap<String, String>,
    #[serde(default)]
    hosts: BTreeMap<String, RawHost>,
    #[serde(default)]
    groups: BTreeMap<String, RawGroup>,
    #[serde(default)]
    daemon: RawDaemon,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDaemon {
    batch_delay_ms: Option<u64>,
    full_check_interval_secs: Option<u64>,
    retry_max_secs: Option<u64>,
    #[serde(alias = "metrics_listen")]
    metrics_listen: Option<String>,
}

/// `filed daemon` settings (`[daemon]`; the same for every host, each may be overridden on the
/// command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Events are gathered this long after the first one into one batch per group.
    pub batch_delay: std::time::Duration,
    /// A full check of every group this often (the safety net behind the watches).
    pub full_check_interval: std::time::Duration,
    /// Longest wait between attempts to reach an unreachable peer (backoff from 1 s).
    pub retry_max: std::time::Duration,
    /// Prometheus metrics endpoint (`host:port`), off when `None`.
    pub metrics_listen: Option<String>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            batch_delay: std::time::Duration::from_millis(200),
            full_check_interval: std::time::Duration::from_secs(3600),
            retry_max: std::time::Duration::from_secs(30),
            metrics_listen: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawHost {
    address: Option<String>,
    state: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    #[serde(default)]
    prefix: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawGroup {
    hosts: Vec<String>,
    #[serde(default)]
    slaves: Vec<String>,
    key: String,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    rules: Vec<String>,
    #[serde(default)]
    auto: AutoPolicy,
    backup_directory: Option<String>,
    backup_generations: Option<u32>,
    #[serde(default)]
    action: Vec<RawAction>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawAction {
    pattern: OneOrMany,
    exec: String,
    logfile: Option<String>,
    #[serde(default)]
    do_local: bool,
    #[serde(default)]
    do_local_only: bool,
    once_per_batch: Option<bool>,
}

/// One host of the cluster.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// `host:port`.
    pub address: String,
    pub state: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Prefix name -> directory on this host (global `[prefix]` entries merged in).
    pub prefixes: BTreeMap<String, PathBuf>,
}

/// An action: a command run after files matching its patterns changed.
#[derive(Debug, Clone)]
pub struct Action {
    pub patterns: Vec<String>,
    pub exec: String,
    pub logfile: Option<PathBuf>,
    pub do_local: bool,
    pub do_local_only: bool,
    pub once_per_batch: bool,
}

/// One synchronisation group.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// Members that send and receive, in configuration order (for `left`/`right`).
    pub hosts: Vec<String>,
    /// Members that only receive.
    pub slaves: Vec<String>,
    pub key: PathBuf,
    pub filter: Filter,
    pub auto: AutoPolicy,
    /// Logical path (may use a `%prefix%`).
    pub backup_directory: Option<String>,
    pub backup_generations: u32,
    pub actions: Vec<Action>,
}

impl Group {
    /// All members, masters first then slaves, in configuration order.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.hosts
            .iter()
            .chain(self.slaves.iter())
            .map(String::as_str)
    }
    pub fn has_member(&self, name: &str) -> bool {
        self.members().any(|m| m == name)
    }
    pub fn is_slave(&self, name: &str) -> bool {
        self.slaves.iter().any(|s| s == name)
    }
    /// Position in the member list (for `left`/`right`).
    pub fn position(&self, name: &str) -> Option<usize> {
        self.members().position(|m| m == name)
    }
    /// The other members that `me` exchanges files with. Two slaves never talk to each other.
    pub fn peers_of(&self, me: &str) -> Vec<String> {
        let me_slave = self.is_slave(me);
        self.members()
            .filter(|m| *m != me && !(me_slave && self.is_slave(m)))
            .map(str::to_owned)
            .collect()
    }
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub ca: PathBuf,
    pub ca_key: Option<PathBuf>,
    pub hosts: BTreeMap<String, Host>,
    pub groups: BTreeMap<String, Group>,
    pub daemon: DaemonConfig,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates; relative paths are resolved against the directory of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let abs = |s: &str| -> PathBuf {
            let p = Path::new(s);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let invalid = |key: String, problem: String| ConfigError::Invalid {
            path: path.into(),
            key,
            problem,
        };

        for (name, v) in &raw.prefix {
            check_prefix(name, v).map_err(|p| invalid(format!("prefix.{name}"), p))?;
        }
        let mut hosts = BTreeMap::new();
        for (name, h) in raw.hosts {
            check_name(&name).map_err(|p| invalid(format!("hosts.{name}"), p))?;
            let address = match &h.address {
                Some(a) => {
                    normalize_address(a).map_err(|p| invalid(format!("hosts.{name}.address"), p))?
                }
                None => format!("{name}:{DEFAULT_PORT}"),
            };
            let mut prefixes: BTreeMap<String, PathBuf> = raw
                .prefix
                .iter()
                .map(|(k, v)| (k.clone(), abs(v)))
                .collect();
            for (k, v) in &h.prefix {
                check_prefix(k, v).map_err(|p| invalid(format!("hosts.{name}.prefix.{k}"), p))?;
                prefixes.insert(k.clone(), abs(v));
            }
            let host = Host {
                address,
                state: h
                    .state
                    .as_deref()
                    .map(abs)
                    .unwrap_or_else(|| PathBuf::from(format!("/var/lib/filed/{name}.redb"))),
                cert: h
                    .cert
                    .as_deref()
                    .map(abs)
                    .unwrap_or_else(|| PathBuf::from(format!("/etc/filed/{name}.pem"))),
                key: h
                    .key
                    .as_deref()
                    .map(abs)
                    .unwrap_or_else(|| PathBuf::from(format!("/etc/filed/{name}.key"))),
                prefixes,
                name: name.clone(),
            };
            hosts.insert(name, host);
        }

        let daemon = {
            let d = &raw.daemon;
            let def = DaemonConfig::default();
            let ms = d
                .batch_delay_ms
                .unwrap_or(def.batch_delay.as_millis() as u64);
            if ms > 60_000 {
                return Err(invalid(
                    "daemon.batch-delay-ms".into(),
                    format!("{ms} ms is more than a minute"),
                ));
            }
            let full = d
                .full_check_interval_secs
                .unwrap_or(def.full_check_interval.as_secs());
            if full == 0 {
                return Err(invalid(
                    "daemon.full-check-interval-secs".into(),
                    "must be at least 1".into(),
                ));
            }
            let retry = d.retry_max_secs.unwrap_or(def.retry_max.as_secs());
            if retry == 0 {
                return Err(invalid(
                    "daemon.retry-max-secs".into(),
                    "must be at least 1".into(),
                ));
            }
            if let Some(a) = &d.metrics_listen {
                a.parse::<std::net::SocketAddr>()
                    .map_err(|e| invalid("daemon.metrics-listen".into(), format!("{a:?}: {e}")))?;
            }
            DaemonConfig {
                batch_delay: std::time::Duration::from_millis(ms),
                full_check_interval: std::time::Duration::from_secs(full),
                retry_max: std::time::Duration::from_secs(retry),
                metrics_listen: d.metrics_listen.clone(),
            }
        };
        let mut groups = BTreeMap::new();
        for (name, g) in raw.groups {
            let key = |k: &str| format!("groups.{name}.{k}");
            check_name(&name).map_err(|p| invalid(format!("groups.{name}"), p))?;
            if g.hosts.is_empty() {
                return Err(invalid(
                    key("hosts"),
                    "a group needs at least one host".into(),
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for m in g.hosts.iter().chain(g.slaves.iter()) {
                if !hosts.contains_key(m) {
                    return Err(invalid(
                        key("hosts"),
                        format!("host {m:?} has no [hosts.{m}] section"),
                    ));
                }
                if !seen.insert(m.clone()) {
                    return Err(invalid(key("hosts"), format!("host {m:?} is listed twice")));
                }
            }
            // (configuration key, include?, pattern as written), in rule order.
            let mut written: Vec<(&str, bool, &str)> = Vec::new();
            written.extend(g.include.iter().map(|p| ("include", true, p.as_str())));
            written.extend(g.exclude.iter().map(|p| ("exclude", false, p.as_str())));
            for r in &g.rules {
                let (inc, pat) = if let Some(p) = r.strip_prefix("include ") {
                    (true, p.trim())
                } else if let Some(p) = r.strip_prefix("exclude ") {
                    (false, p.trim())
                } else {
                    return Err(invalid(
                        key("rules"),
                        format!("{r:?} must start with \"include \" or \"exclude \""),
                    ));
                };
                written.push(("rules", inc, pat));
            }
            let mut rules = Vec::new();
            for (k, include, p) in written {
                let pattern = normalize_pattern(p).map_err(|e| invalid(key(k), e.to_string()))?;
                if is_path_pattern(&pattern) {
                    check_prefix_use(&pattern, &g, &hosts).map_err(|p| invalid(key(k), p))?;
                }
                rules.push(Rule { include, pattern });
            }
            if !rules.iter().any(|r| r.include && r.is_path_pattern()) {
                return Err(invalid(
                    key("include"),
                    "no include path (starting with / or %prefix%)".into(),
                ));
            }
            let filter = Filter::new(rules);
            for root in filter.roots() {
                check_syntax(&root).map_err(|e| invalid(key("include"), e.to_string()))?;
            }
            if let Some(b) = &g.backup_directory {
                check_syntax(b).map_err(|e| invalid(key("backup-directory"), e.to_string()))?;
                check_prefix_use(b, &g, &hosts).map_err(|p| invalid(key("backup-directory"), p))?;
                if filter.roots().iter().any(|r| crate::filter::is_under(b, r))
                    && filter.included(b)
                {
                    return Err(invalid(
                        key("backup-directory"),
                        "lies inside the synced tree; exclude it".into(),
                    ));
                }
            }
            let mut actions = Vec::new();
            for (i, a) in g.action.iter().enumerate() {
                let written: &[String] = match &a.pattern {
                    OneOrMany::One(s) => std::slice::from_ref(s),
                    OneOrMany::Many(v) => v,
                };
                let pattern_key = format!("groups.{name}.action[{i}].pattern");
                if written.is_empty() {
                    return Err(invalid(pattern_key, "no pattern".into()));
                }
                // The same pattern rules as include/exclude: a pattern written like one but never
                // matching would silently never run the action.
                let mut patterns = Vec::with_capacity(written.len());
                for p in written {
                    let p = normalize_pattern(p)
                        .map_err(|e| invalid(pattern_key.clone(), e.to_string()))?;
                    check_prefix_use(&p, &g, &hosts)
                        .map_err(|problem| invalid(pattern_key.clone(), problem))?;
                    patterns.push(p);
                }
                let exec_key = format!("groups.{name}.action[{i}].exec");
                if a.exec.trim().is_empty() {
                    return Err(invalid(exec_key, "empty command".into()));
                }
                crate::actions::check_exec(&a.exec)
                    .map_err(|e| invalid(exec_key, e.to_string()))?;
                actions.push(Action {
                    patterns,
                    exec: a.exec.clone(),
                    logfile: a.logfile.as_deref().map(abs),
                    do_local: a.do_local || a.do_local_only,
                    do_local_only: a.do_local_only,
                    once_per_batch: a.once_per_batch.unwrap_or(true),
                });
            }
            groups.insert(
                name.clone(),
                Group {
                    name: name.clone(),
                    hosts: g.hosts,
                    slaves: g.slaves,
                    key: abs(&g.key),
                    filter,
                    auto: g.auto,
                    backup_directory: g.backup_directory,
                    backup_generations: g.backup_generations.unwrap_or(3),
                    actions,
                },
            );
        }
        Ok(Config {
            file: path.into(),
            ca: raw
                .ca
                .as_deref()
                .map(abs)
                .unwrap_or_else(|| PathBuf::from("/etc/filed/ca.pem")),
            ca_key: raw.ca_key.as_deref().map(abs),
            hosts,
            groups,
            daemon,
        })
    }

    /// The local host: `--node NAME`, else the hostname (full, then up to the first dot).
    pub fn local_host(&self, node: Option<&str>) -> Result<&Host, ConfigError> {
        let name = match node {
            Some(n) => n.to_string(),
            None => hostname().map_err(ConfigError::Hostname)?,
        };
        if let Some(h) = self.hosts.get(&name) {
            return Ok(h);
        }
        if node.is_none()
            && let Some(short) = name.split('.').next()
            && let Some(h) = self.hosts.get(short)
        {
            return Ok(h);
        }
        Err(ConfigError::UnknownSelf {
            path: self.file.clone(),
            name,
        })
    }

    /// Groups this host is a member of.
    pub fn groups_of<'a>(&'a self, me: &'a str) -> impl Iterator<Item = &'a Group> + 'a {
        self.groups.values().filter(move |g| g.has_member(me))
    }
}

impl Host {
    /// Maps a logical path (`%prefix%/x` or `/x`) to this host's filesystem.
    pub fn physical(&self, logical: &str) -> Option<PathBuf> {
        if let Some(rest) = logical.strip_prefix('%') {
            let end = rest.find('%')?;
            let dir = self.prefixes.get(&rest[..end])?;
            let tail = &rest[end + 1..];
            let tail = tail.strip_prefix('/').unwrap_or(tail);
            if tail.is_empty() {
                Some(dir.clone())
            } else {
                Some(dir.join(tail))
            }
        } else if logical.starts_with('/') {
            Some(PathBuf::from(logical))
        } else {
            None
        }
    }
}

fn check_name(n: &str) -> Result<(), String> {
    if n.is_empty()
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "name {n:?} may only use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

fn check_prefix(name: &str, value: &str) -> Result<(), String> {
    check_name(name)?;
    if value.is_empty() || value.contains(['*', '?', '[']) {
        return Err(format!(
            "prefix value {value:?} must be a directory without wildcards"
        ));
    }
    Ok(())
}

/// A `%prefix%` at the start of a path pattern must be defined for every member host.
fn check_prefix_use(
    pattern: &str,
    g: &RawGroup,
    hosts: &BTreeMap<String, Host>,
) -> Result<(), String> {
    if !is_path_pattern(pattern) {
        return Ok(());
    }
    let Some(rest) = pattern.strip_prefix('%') else {
        return Ok(());
    };
    let Some(end) = rest.find('%') else {
        return Err(format!("{pattern:?}: unterminated %prefix%"));
    };
    let name = &rest[..end];
    let tail = &rest[end + 1..];
    if !(tail.is_empty() || tail.starts_with('/')) {
        return Err(format!(
            "{pattern:?}: %{name}% must be followed by / or nothing"
        ));
    }
    for m in g.hosts.iter().chain(g.slaves.iter()) {
        if !hosts.get(m).is_some_and(|h| h.prefixes.contains_key(name)) {
            return Err(format!(
                "prefix %{name}% is not defined for host {m:?} (hosts.{m}.prefix.{name} or [prefix])"
            ));
        }
    }
    Ok(())
}

fn normalize_address(a: &str) -> Result<String, String> {
    if a.is_empty() {
        return Err("empty address".into());
    }
    if a.starts_with('[') {
        // [v6]:port or [v6]
        return Ok(if a.contains("]:") {
            a.to_string()
        } else {
            format!("{a}:{DEFAULT_PORT}")
        });
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            p.parse::<u16>()
                .map_err(|_| format!("bad port {p:?} in {a:?}"))?;
            Ok(a.to_string())
        }
        Some(_) => Ok(format!("[{a}]:{DEFAULT_PORT}")),
        None => Ok(format!("{a}:{DEFAULT_PORT}")),
    }
}

/// The kernel's hostname.
pub use common::host::hostname;

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/two-nodes.toml");

    #[test]
    fn daemon_section_defaults_and_errors() {
        let base = "[hosts.a]\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"/x\"]\n";
        let c = Config::parse(base, Path::new("/f.toml")).unwrap();
        assert_eq!(c.daemon, DaemonConfig::default());
        assert_eq!(c.daemon.batch_delay, std::time::Duration::from_millis(200));
        let c = Config::parse(
            &format!("{base}[daemon]\nbatch-delay-ms = 50\nfull-check-interval-secs = 60\nmetrics_listen = \"127.0.0.1:9465\"\n"),
            Path::new("/f.toml"),
        )
        .unwrap();
        assert_eq!(c.daemon.batch_delay, std::time::Duration::from_millis(50));
        assert_eq!(c.daemon.full_check_interval.as_secs(), 60);
        assert_eq!(c.daemon.metrics_listen.as_deref(), Some("127.0.0.1:9465"));
        for bad in [
            "batch-delay-ms = 60001",
            "full-check-interval-secs = 0",
            "metrics-listen = \"nowhere\"",
            "bogus = 1",
        ] {
            let e = Config::parse(&format!("{base}[daemon]\n{bad}\n"), Path::new("/f.toml"));
            assert!(e.is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn example_parses() {
        let c = Config::parse(EXAMPLE, Path::new("/x/two-nodes.toml")).unwrap();
        let a = &c.hosts["alpha"];
        assert_eq!(a.address, "127.0.0.2:30865");
        assert_eq!(a.state, PathBuf::from("/x/alpha/state.redb"));
        assert_eq!(
            a.physical("%data%/sub/f"),
            Some(PathBuf::from("/x/alpha/data/sub/f"))
        );
        assert_eq!(
            c.hosts["beta"].physical("%data%"),
            Some(PathBuf::from("/x/beta/data"))
        );
        let g = &c.groups["data"];
        assert_eq!(g.backup_generations, 3);
        assert_eq!(g.auto, AutoPolicy::None);
        assert_eq!(g.peers_of("alpha"), vec!["beta".to_string()]);
        assert_eq!(c.ca, PathBuf::from("/x/pki/ca.pem"));
        assert_eq!(c.local_host(Some("beta")).unwrap().name, "beta");
        assert!(matches!(
            c.local_host(Some("nope")),
            Err(ConfigError::UnknownSelf { .. })
        ));
    }

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("/etc/filed/f.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_file_key_problem() {
        let e = err("[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"/x\"]\n");
        assert!(
            e.contains("/etc/filed/f.toml") && e.contains("groups.g.hosts") && e.contains("\"a\""),
            "{e}"
        );
        let e = err("[hosts.a]\naddress=\"h:99999\"\n");
        assert!(e.contains("hosts.a.address") && e.contains("port"), "{e}");
        let e = err("[hosts.a]\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"%p%/x\"]\n");
        assert!(e.contains("groups.g.include") && e.contains("%p%"), "{e}");
        let e = err("[hosts.a]\nbogus=1\n");
        assert!(e.contains("f.toml") && e.contains("bogus"), "{e}");
        let e = err(
            "[hosts.a]\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"/x\"]\nauto=\"sideways\"\n",
        );
        assert!(e.contains("sideways"), "{e}");
        let e = err("[hosts.a]\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\nexclude=[\"*~\"]\n");
        assert!(e.contains("groups.g.include"), "{e}");
        let e = err(
            "[hosts.a]\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"/x\"]\nbackup-directory=\"/x/bak\"\n",
        );
        assert!(e.contains("backup-directory"), "{e}");
    }

    #[test]
    fn patterns_normalized_or_refused_by_key() {
        let group = |rules: &str| {
            format!(
                "[hosts.a]\nprefix={{data=\"/srv\"}}\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\n{rules}\n"
            )
        };
        let c = Config::parse(
            &group(
                "include=[\"/etc/\", \"%data%/\"]\nexclude=[\"/etc/ssl/private/\", \"cache/\"]\n\
                 [[groups.g.action]]\npattern=[\"*.conf\", \"%data%/www/\"]\nexec=\"true\"\n",
            ),
            Path::new("/f.toml"),
        )
        .unwrap();
        let g = &c.groups["g"];
        assert!(g.filter.included("/etc/hosts"));
        assert!(
            !g.filter.included("/etc/ssl/private/key.pem"),
            "a trailing slash must not void an exclude"
        );
        assert!(g.filter.included("%data%/x"));
        assert!(!g.filter.included("%data%/app/cache/x"));
        let a = &g.actions[0];
        assert_eq!(a.patterns, vec!["*.conf".to_string(), "%data%/www".into()]);
        assert!(crate::actions::matches(a, "/etc/nginx/site.conf"));
        assert!(crate::actions::matches(a, "%data%/www/index.html"));
        assert!(!crate::actions::matches(a, "%data%/other"));

        for (rules, key, pattern) in [
            (
                "include=[\"/x\"]\nexclude=[\"tmp/cache\"]",
                "groups.g.exclude",
                "tmp/cache",
            ),
            ("include=[\"/x//y\"]", "groups.g.include", "/x//y"),
            (
                "include=[\"/x\"]\nrules=[\"exclude /x/../y\"]",
                "groups.g.rules",
                "/x/../y",
            ),
            (
                "include=[\"/x\"]\n[[groups.g.action]]\npattern=\"nginx/*.conf\"\nexec=\"true\"",
                "groups.g.action[0].pattern",
                "nginx/*.conf",
            ),
            (
                "include=[\"/x\"]\n[[groups.g.action]]\npattern=\"%nope%/x\"\nexec=\"true\"",
                "groups.g.action[0].pattern",
                "%nope%",
            ),
        ] {
            let e = err(&group(rules));
            assert!(e.contains(key) && e.contains(pattern), "{rules}: {e}");
        }
    }

    #[test]
    fn defaults_and_addresses() {
        let c = Config::parse(
            "[prefix]\nroot=\"/srv\"\n[hosts.a]\n[hosts.b]\naddress=\"10.0.0.2\"\nprefix={root=\"/b\"}\n[groups.g]\nhosts=[\"a\"]\nslaves=[\"b\"]\nkey=\"/k\"\ninclude=[\"%root%/w\"]\nrules=[\"exclude %root%/w/tmp\"]\n[[groups.g.action]]\npattern=\"%root%/w/*.conf\"\nexec=\"true\"\n",
            Path::new("/etc/filed/filed.toml"),
        )
        .unwrap();
        assert_eq!(c.hosts["a"].address, format!("a:{DEFAULT_PORT}"));
        assert_eq!(c.hosts["b"].address, "10.0.0.2:30865");
        assert_eq!(
            c.hosts["a"].physical("%root%/w/x"),
            Some(PathBuf::from("/srv/w/x"))
        );
        assert_eq!(
            c.hosts["b"].physical("%root%/w/x"),
            Some(PathBuf::from("/b/w/x"))
        );
        let g = &c.groups["g"];
        assert!(g.is_slave("b"));
        assert_eq!(g.peers_of("b"), vec!["a".to_string()]);
        assert!(!g.filter.included("%root%/w/tmp/x"));
        assert!(g.actions[0].once_per_batch);
        assert_eq!(normalize_address("::1").unwrap(), "[::1]:30865");
    }
}
