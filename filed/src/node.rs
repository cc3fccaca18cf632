//! One host's view of the cluster at run time: the configuration, its own host entry, the state
//! store, per-group locks (one sync per group at a time on this host) and the TLS settings. Shared
//! by the CLI commands, the listener and the daemon (which adds the log of filed's own writes,
//! a hook called after every session, and counters).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use common::auth::SharedKey;

use crate::config::{Config, Group, Host};
use crate::session::SessionReport;
use crate::stats::Stats;
use crate::store::StateStore;
use crate::transport::{ClientSettings, ServerSettings, TransportError};
use crate::written::WrittenLog;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("group {0:?} is not configured")]
    NoGroup(String),
    #[error("this host ({me}) is not a member of group {group:?}")]
    NotMember { me: String, group: String },
    #[error("cannot load the key of group {group:?}")]
    Key {
        group: String,
        #[source]
        source: common::auth::AuthError,
    },
    #[error("cannot load the TLS certificate/key of {me}")]
    Tls {
        me: String,
        #[source]
        source: Box<TransportError>,
    },
}

pub struct Node {
    pub config: Arc<Config>,
    pub me: Host,
    pub store: Arc<dyn StateStore>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// filed's own writes, kept only while a watcher consumes them (`filed daemon`).
    pub written: Mutex<Option<WrittenLog>>,
    pub stats: Stats,
    session_hook: OnceLock<SessionHook>,
}

/// Called after every completed session, initiator or listener side.
pub type SessionHook = Box<dyn Fn(&SessionReport) + Send + Sync>;

/// Entries of the written-files log before it is emptied (see [`WrittenLog::new`]).
const WRITTEN_CAP: usize = 1 << 20;

impl Node {
    pub fn new(config: Arc<Config>, me: Host, store: Arc<dyn StateStore>) -> Node {
        Node {
            config,
            me,
            store,
            locks: Mutex::new(HashMap::new()),
            written: Mutex::new(None),
            stats: Stats::default(),
            session_hook: OnceLock::new(),
        }
    }

    /// Starts keeping the log of filed's own writes and calls `hook` after every session.
    pub fn enable_daemon(&self, hook: SessionHook) {
        *self.written.lock().expect("lock poisoned") = Some(WrittenLog::new(WRITTEN_CAP));
        let _ = self.session_hook.set(hook);
    }

    pub fn is_daemon(&self) -> bool {
        self.session_hook.get().is_some()
    }

    /// Records what an applier wrote for `group` (when a watcher is running).
    pub fn note_written(&self, group: &str, written: &[crate::apply::Written]) {
        if let Some(log) = self.written.lock().expect("lock poisoned").as_mut() {
            for w in written {
                log.record(group, &w.logical, w.id);
            }
        }
    }

    /// Counts a finished session and tells the daemon.
    pub fn session_done(&self, r: &SessionReport) {
        self.stats.session(r);
        if let Some(h) = self.session_hook.get() {
            h(r);
        }
    }

    pub fn group(&self, name: &str) -> Result<&Group, NodeError> {
        let g = self
            .config
            .groups
            .get(name)
            .ok_or_else(|| NodeError::NoGroup(name.into()))?;
        if !g.has_member(&self.me.name) {
            return Err(NodeError::NotMember {
                me: self.me.name.clone(),
                group: name.into(),
            });
        }
        Ok(g)
    }

    /// The groups this host is a member of.
    pub fn my_groups(&self) -> Vec<&Group> {
        self.config.groups_of(&self.me.name).collect()
    }

    /// The lock serialising syncs of one group on this host.
    pub fn group_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("lock poisoned")
            .entry(group.to_string())
            .or_default()
            .clone()
    }

    pub fn group_key(&self, group: &Group) -> Result<SharedKey, NodeError> {
        SharedKey::load(&group.key).map_err(|source| NodeError::Key {
            group: group.name.clone(),
            source,
        })
    }

    pub fn client_settings(&self) -> Result<ClientSettings, NodeError> {
        ClientSettings::from_files(&self.config.ca, &self.me.cert, &self.me.key, &self.me.name)
            .map_err(|source| NodeError::Tls {
                me: self.me.name.clone(),
                source: Box::new(source),
            })
    }

    pub fn server_settings(&self) -> Result<ServerSettings, NodeError> {
        ServerSettings::from_files(&self.config.ca, &self.me.cert, &self.me.key, &self.me.name)
            .map_err(|source| NodeError::Tls {
                me: self.me.name.clone(),
                source: Box::new(source),
            })
    }
}
