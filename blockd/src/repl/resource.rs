//! One replicated resource on this node: its metadata (superblock, per-peer bitmaps, activity
//! log), its role and disk state, one connection manager per peer (dial or accept, backoff,
//! sessions), roles (promote/demote), status and the event stream. The write path is in
//! [`super::device`], the per-link protocol in [`super::peer`], the resync worker in
//! [`super::resync`].

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast, mpsc, watch};

use crate::config::{LocalResource, Node};
use crate::meta::MetaError;
use crate::meta::activity_log::ActivityLog;
use crate::meta::bitmap::Bitmap;
use crate::meta::file::{MetaFile, OnDamagedPage};
use crate::meta::generation::Uuid;
use crate::meta::lock::MetaLock;
use crate::meta::superblock::{Superblock, flags};
use crate::repl::handshake::HandshakeSide;
use crate::repl::link::{self, Link, LinkError, LinkNode, LinkSettings};
use crate::repl::peer::{self, Conn, SessionEnd};
use crate::repl::promote::{
    self, ClusterAnswer, DataPath, LocalView, PeerView, PromoteDecision, PromoteRefusal,
};
use crate::repl::promotion_lock::{PromotionBusy, PromotionLock};
use crate::repl::ranges::Ranges;
use crate::repl::setup_limit::{RefusalLog, SetupLimit};
use crate::repl::split_brain::SplitBrainPolicy;
use crate::repl::state::{ConnState, DiskState, Protocol, ReplState, Role};
use crate::repl::sync_decision::SideView;
use crate::repl::wire::{Message, StateReport};
use crate::store::{BlockStore, EngineKind, OpenOptions, StoreError};

/// Why a resource could not start or an administrative request failed.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("resource {resource}: cannot open the metadata")]
    Meta {
        resource: String,
        #[source]
        source: MetaError,
    },
    #[error("resource {resource}: cannot open the backing device")]
    Store {
        resource: String,
        #[source]
        source: StoreError,
    },
    #[error("resource {resource}: {problem}")]
    Config { resource: String, problem: String },
    #[error("resource {resource}: cannot set up replication links")]
    Link {
        resource: String,
        #[source]
        source: LinkError,
    },
    #[error(
        "resource {resource}: backing {path} does not exist, but the metadata says it holds the \
         resource's data (refusing to create an empty one; restore it, or run create-md --force \
         for a new, empty replica)"
    )]
    MissingBacking { resource: String, path: String },
    #[error("resource {resource}: cannot load the NBD TLS files ([nbd-tls])")]
    NbdTls {
        resource: String,
        #[source]
        source: crate::nbd::tls::TlsSettingsError,
    },
    #[error("resource {resource}: cannot listen on {addr}")]
    Listen {
        resource: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("promotion refused: {0}")]
    PromoteRefused(#[source] PromoteRefusal),
    #[error("promotion through a peer's disk (diskless primary) is not supported")]
    Diskless,
    #[error("cannot update the metadata")]
    MetaUpdate(#[source] MetaError),
    #[error("flush before demotion failed")]
    DemoteFlush(#[source] StoreError),
    #[error("resource has no peer named {0:?}")]
    UnknownPeer(String),
    /// The state does not allow the request (verify, invalidate).
    #[error("refused: {0}")]
    Refused(String),
    #[error("snapshot refused: {0}")]
    SnapshotRefused(String),
    #[error("resource {resource}: snapshot failed")]
    Snapshot {
        resource: String,
        #[source]
        source: crate::snapshot::set::SnapshotError,
    },
}

/// The metadata of a resource, in memory and on disk.
pub(crate) struct MetaState {
    pub file: MetaFile,
    /// The superblock as it should be; [`MetaState::save_sb`] persists it.
    pub sb: Superblock,
    /// Per bitmap slot.
    pub bitmaps: Vec<Bitmap>,
    pub al: ActivityLog,
    /// Activity-log transactions being persisted (writes then take the slow path).
    pub al_persisting: usize,
    /// A bitmap save failed since attach: marks it carried (a lost peer's writes, unstable
    /// writes) may exist only in memory, so the shutdown must not claim a clean detach (see
    /// [`detach_cleanly`]).
    pub bitmap_save_failed: bool,
}

impl MetaState {
    /// Registers a write to extents `first..=last` when all are hot and no transaction is
    /// being persisted (a write to an extent whose transaction is not on disk yet must wait).
    pub fn al_begin_hot(&mut self, first: u32, last: u32) -> bool {
        self.al_persisting == 0 && self.al.begin_hot(first, last)
    }

    pub fn save_sb(&mut self) -> Result<(), MetaError> {
        let sb = self.sb.clone();
        self.file.write_superblock(&sb)?;
        self.sb = self.file.superblock().clone();
        Ok(())
    }

    /// Writes every page of a bitmap slot and syncs. A slot found empty no longer holds
    /// repair marks: the flag is cleared in [`Self::sb`] (persisted by the next
    /// [`Self::save_sb`], never before the empty bitmap is on disk, which it now is).
    pub fn save_bitmap(&mut self, slot: usize) -> Result<(), MetaError> {
        let b = &self.bitmaps[slot];
        let pages = 0..b.pages();
        self.save_bitmap_pages(slot, pages)?;
        if self.bitmaps[slot].dirty_extent_from(0, 1).is_none() {
            self.sb.set_repair_marks(slot, false);
        }
        Ok(())
    }

    /// A handshake's `ClearBitmap` of slot `slot` (in memory); never when the slot holds
    /// repair marks, also ones set before a restart: the blocks really differ or are bad, and
    /// only a resync may clear them. With a resync following (`obsolete_only` false: we are
    /// its target and the source copies its bitmap of another node for us) the marks go,
    /// except repair marks: the slot is kept whole (its marks cannot be told apart), so the
    /// bitmap exchange that follows hands them to the source, which ORs them into its bitmap
    /// for us and resyncs them too (a few ordinary blocks more at worst); the flag goes once a
    /// full save finds the slot empty (`ResyncDone` here). Obsolete marks (no resync follows,
    /// `handshake::marks_obsolete`) go only if no mark was made since our state report
    /// (`none_made_since_report`), which said we were in sync with the Primary (a session with
    /// it that ended since marks its unstable writes: those must stay). Returns true when
    /// repair marks were kept with no resync following (shown as waiting for the next Primary,
    /// as marks between Secondaries are while a Primary lives).
    pub fn clear_for_handshake(
        &mut self,
        slot: usize,
        obsolete_only: bool,
        none_made_since_report: bool,
    ) -> bool {
        if self.has_repair_marks(slot) {
            return obsolete_only;
        }
        if !obsolete_only || none_made_since_report {
            self.bitmaps[slot].clear_all();
        }
        false
    }

    /// Whether bitmap `slot` holds marks of [`Resource::mark_for_repair`]: its flag in the
    /// superblock (so the answer survives a restart) over a bitmap with bits set (a flag
    /// left over a bitmap emptied otherwise than by a full save holds nothing).
    pub fn has_repair_marks(&self, slot: usize) -> bool {
        self.sb.has_repair_marks(slot) && self.bitmaps[slot].dirty_extent_from(0, 1).is_some()
    }

    /// Writes the pages of a slot covering a byte range and syncs.
    pub fn save_bitmap_range(
        &mut self,
        slot: usize,
        offset: u64,
        len: u64,
    ) -> Result<(), MetaError> {
        let pages = self.bitmaps[slot].pages_for_range(offset, len);
        self.save_bitmap_pages(slot, pages)
    }

    /// Persists the `REPAIR_MARKS` flags set in [`Self::sb`] but not yet on disk; run before
    /// any bitmap page is written (a save here, an activity-log eviction in
    /// `repl::device::persist_al_transactions`). Repair marks on disk must never look
    /// ordinary (a restart would let a handshake clear them as obsolete), so a slot's flag
    /// reaches the disk before the pages that hold its marks; the other way round, a crash
    /// leaves a flag over marks not yet written: harmless. Only the flags are added, to the
    /// superblock on disk: other changes of [`Self::sb`] not persisted yet (a bitmap UUID
    /// pinned or cleared before its bitmap is saved) must not reach the disk before their
    /// callers' own [`Self::save_sb`].
    pub fn persist_repair_flags(&mut self) -> Result<(), MetaError> {
        match self.file.superblock().with_repair_flags_of(&self.sb) {
            Some(next) => self.file.write_superblock(&next),
            None => Ok(()),
        }
    }

    fn save_bitmap_pages(&mut self, slot: usize, pages: Range<u64>) -> Result<(), MetaError> {
        let r = self.persist_repair_flags();
        let b = &self.bitmaps[slot];
        let r = r.and_then(|()| {
            self.file
                .write_bitmap_pages(slot as u32, b, pages)
                .and_then(|()| self.file.sync())
        });
        // Callers that cannot act on the failure only log it; remembered for the shutdown.
        self.bitmap_save_failed |= r.is_err();
        r
    }
}

/// Whether a shutdown may clear `ATTACHED`, telling the next attach that the bitmaps on disk
/// are complete (no activity-log replay). Not for a Primary (stopping without demotion is
/// treated like a crash), nor when the data could not be flushed, a bitmap save failed since
/// attach (marks that lived only in memory are re-derived by the replay), or a session could
/// still write.
pub(crate) fn detach_cleanly(
    primary: bool,
    sessions_ended: bool,
    flushed: bool,
    bitmap_save_failed: bool,
) -> bool {
    !primary && sessions_ended && flushed && !bitmap_save_failed
}

/// What this node knows about one peer (status and decisions).
#[derive(Clone, Debug)]
pub(crate) struct PeerState {
    pub conn: ConnState,
    pub repl: ReplState,
    /// The session is ending (from the start of its teardown until the state says so): its
    /// Primary no longer counts as one this node follows or is in sync with.
    pub leaving: bool,
    pub role: Role,
    pub disk: DiskState,
    pub last_error: Option<String>,
    pub resync_total: u64,
    pub resync_done: u64,
    pub resync_started: Option<Instant>,
    /// Consecutive sessions whose resync (this node the source) failed without clearing a bit
    /// (`repl::resync::retry_delay`).
    pub resync_failed_sessions: u32,
    /// When the delayed resync of this session starts (status), while it waits.
    pub resync_retry_at: Option<Instant>,
    /// The earliest start of the next resync as the source, set when a session's resync failed
    /// (`retry_delay` of the count from then on): a session that ends while it waits leaves it
    /// as it was, so the next one waits only for the rest.
    pub resync_not_before: Option<Instant>,
    pub discard_my_data: bool,
    /// Online verify with this peer: progress, then the result.
    pub verify: Option<crate::repl::verify::VerifyStatus>,
    /// `blockctl connect --checksum`: the next resync to this peer compares checksums.
    pub checksum_next: bool,
    /// This peer was Primary when the link was lost and had acknowledged writes this node
    /// never received (cleared by the next handshake with it, or by promoting this node).
    pub known_loss: Option<crate::repl::lost_writes::KnownLoss>,
    /// The last handshake kept blocks marked for the next Primary (`handshake::marks_wait`).
    pub marks_wait: bool,
}

impl PeerState {
    /// The resync moved, completed, or an admin started over (`connect`, `attach`): the count
    /// of failed resync sessions and the wait it imposes are gone.
    pub(crate) fn resync_retry_reset(&mut self) {
        self.resync_failed_sessions = 0;
        self.resync_not_before = None;
    }
}

pub(crate) struct State {
    pub role: Role,
    pub disk: DiskState,
    pub crashed_primary: bool,
    pub peers: Vec<PeerState>,
}

/// Runtime of one peer.
pub(crate) struct PeerRt {
    pub node: Node,
    pub protocol: Protocol,
    pub slot: usize,
    pub conn: Mutex<Option<Arc<Conn>>>,
    pub admin_down: AtomicBool,
    /// Wakes the connection manager (connect request) or ends the session (disconnect).
    pub wake: Notify,
    pub kill: Notify,
    /// The pending `ViewRequest` to this peer (its id) and where its answer goes.
    pub view_waiter: Mutex<Option<(u64, tokio::sync::oneshot::Sender<ClusterAnswer>)>>,
    /// This peer's replicated writes in the activity log's slow path (see
    /// [`Resource::al_room_waiters`]).
    pub al_slow_path: AtomicUsize,
    accepted_tx: mpsc::Sender<Link>,
    accepted_rx: tokio::sync::Mutex<mpsc::Receiver<Link>>,
}

/// Ordering of the requests this node replicates (see `repl::wire`): sequence numbers, and
/// the `after` every new request carries.
#[derive(Default)]
pub(crate) struct Order {
    /// The next sequence number (never reset: a peer's session sees them increase).
    pub seq: u64,
    /// One past the highest sequence number of a completed request (0: none yet).
    pub after: u64,
}

impl Order {
    /// Numbers a new request: `(seq, after)`.
    pub fn issue(&mut self) -> (u64, u64) {
        let seq = self.seq;
        self.seq += 1;
        (seq, self.after)
    }

    /// Request `seq` completed: requests issued from now on are applied after it.
    pub fn completed(&mut self, seq: u64) {
        self.after = self.after.max(seq + 1);
    }
}

/// A state change, for `blockctl events`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// `role`, `disk`, `connection`, `replication`, `peer-role`, `peer-disk`, `resync-done`,
    /// `split-brain`, `lost-acked-writes`, `error` (and more: docs/interfaces.md).
    pub what: String,
    pub value: String,
}

impl Event {
    /// One human-readable line.
    pub fn line(&self) -> String {
        match &self.peer {
            Some(p) => format!("{} peer:{} {}:{}", self.resource, p, self.what, self.value),
            None => format!("{} {}:{}", self.resource, self.what, self.value),
        }
    }
}

/// Resync progress of one peer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ResyncStatus {
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub percent: f64,
    /// Bytes per second since the resync started.
    pub rate: u64,
    /// Seconds (rounded up) until the resync starts: it waits after consecutive failed
    /// sessions (`repl::resync::retry_delay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_secs: Option<u64>,
}

/// Status of one peer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub id: u8,
    pub protocol: String,
    pub connection: String,
    pub replication: String,
    pub role: String,
    pub disk: String,
    pub out_of_sync_bytes: u64,
    pub in_flight: usize,
    /// Bytes of the in-flight writes (sent, not yet acknowledged by the peer).
    #[serde(default)]
    pub in_flight_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The running or last online verify with this peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<crate::repl::verify::VerifyStatus>,
    /// On the Primary: writes acknowledged to NBD clients that this peer has not confirmed as
    /// written to its disk yet (protocol A: queued, in flight or received; B: received; C: 0).
    #[serde(default)]
    pub unconfirmed_writes: u64,
    /// Bytes of `unconfirmed_writes`.
    #[serde(default)]
    pub unconfirmed_bytes: u64,
    /// On a Secondary after the link to this peer (then Primary) was lost: acknowledged writes
    /// it had reported that never arrived here, at least (a promotion loses them).
    #[serde(default)]
    pub lost_acked_writes: u64,
    /// Bytes of `lost_acked_writes`, at least.
    #[serde(default)]
    pub lost_acked_bytes: u64,
    /// Bytes of replicated writes queued or sent to this peer and not yet acknowledged, as
    /// counted against `sndbuf_size` (payloads; see `repl::congestion`).
    #[serde(default)]
    pub queued_bytes: u64,
    /// `sndbuf-size`: beyond it, protocol A writes wait for this peer.
    #[serde(default)]
    pub sndbuf_size: u64,
    /// Writes wait for room in this peer's send buffer now.
    #[serde(default)]
    pub congested: bool,
    /// Writes that had to wait for room, since the link came up.
    #[serde(default)]
    pub congested_writes: u64,
    /// Both nodes are Secondaries following a live Primary: `out_of_sync_bytes` are blocks
    /// marked after a Primary's link was lost, kept for the next Primary to resync rather than
    /// resynced between the two (see docs/replication.md); `wait-sync` does not wait for them.
    #[serde(default)]
    pub marks_wait_for_primary: bool,
}

/// Status of the resource.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub resource: String,
    pub node: String,
    pub id: u8,
    pub role: String,
    pub disk: String,
    pub size: u64,
    /// Quorum of this node (`setting` "off": always held).
    #[serde(default)]
    pub quorum: crate::repl::io_gate::QuorumStatus,
    pub peers: Vec<PeerStatus>,
    /// Open snapshots of this node's replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<crate::repl::snapshot::SnapshotInfo>,
    /// The local I/O error that detached the disk (until `blockctl attach`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_error: Option<String>,
    /// The resync after the last `blockctl attach`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<crate::repl::local_disk::AttachStatus>,
}

/// Static settings of a resource on this node.
#[derive(Clone)]
pub struct ResourceSpec {
    pub name: String,
    pub me: Node,
    pub peers: Vec<(Node, Protocol)>,
    pub resync_rate: u64,
    /// Resync pacing (`resync-rate`, `c-min-rate`, `c-fill-target`, `c-plan-ahead`).
    pub rate: crate::repl::rate_control::RateSettings,
    /// When resyncs compare checksums first (`csums`).
    pub csums: crate::repl::checksum::Csums,
    /// Send buffer of each peer session (`sndbuf-size`, see `repl::congestion`).
    pub sndbuf_size: u64,
    /// Default copy-on-write area of a snapshot (None: a quarter of the device).
    pub snapshot_cow_size: Option<u64>,
    pub split_brain: SplitBrainPolicy,
    pub quorum: crate::repl::quorum::QuorumSetting,
    pub on_no_quorum: crate::repl::quorum::OnNoQuorum,
    /// What a local I/O error does (`on-io-error`, see `repl::disk_failure`).
    pub on_io_error: crate::config::OnIoError,
    pub link: LinkSettings,
    /// TLS of the NBD export (`[nbd-tls]`), loaded at start so bad files fail early.
    pub nbd_tls: Option<crate::nbd::tls::TlsSettings>,
    /// TCP congestion control of NBD clients on this host (`nbd-same-host-congestion`).
    pub nbd_same_host_congestion: crate::nbd::congestion::SameHost,
    pub engine: EngineKind,
}

impl ResourceSpec {
    /// The settings of `local` (loads TLS files and the secret).
    pub fn from_config(local: &LocalResource<'_>) -> Result<ResourceSpec, ResourceError> {
        let r = local.resource;
        let cfg_err = |problem: &str| ResourceError::Config {
            resource: r.name.clone(),
            problem: problem.to_string(),
        };
        let lnode = |n: &Node| LinkNode {
            name: n.name.clone(),
            id: n.id,
            address: n.address,
        };
        let tls = r
            .tls
            .as_ref()
            .ok_or_else(|| cfg_err("replication needs [tls] (ca, cert, key)"))?
            .for_node(&local.me.name);
        let secret = r
            .secret_file
            .as_ref()
            .ok_or_else(|| cfg_err("replication needs secret-file"))?;
        let link = LinkSettings::load(
            &r.name,
            lnode(local.me),
            local.peers.iter().map(|p| lnode(p)).collect(),
            &tls.ca,
            &tls.cert,
            &tls.key,
            secret,
        )
        .map_err(|source| ResourceError::Link {
            resource: r.name.clone(),
            source,
        })?;
        let nbd_tls = r
            .nbd_tls
            .as_ref()
            .map(|t| {
                crate::nbd::tls::TlsSettings::from_dir(&t.dir_for_node(&local.me.name), t.required)
            })
            .transpose()
            .map_err(|source| ResourceError::NbdTls {
                resource: r.name.clone(),
                source,
            })?;
        Ok(ResourceSpec {
            name: r.name.clone(),
            me: local.me.clone(),
            peers: local
                .peers
                .iter()
                .map(|p| ((*p).clone(), r.protocol_between(&local.me.name, &p.name)))
                .collect(),
            resync_rate: r.resync_rate,
            rate: r.rate_settings(),
            csums: r.csums,
            sndbuf_size: r.sndbuf_size,
            snapshot_cow_size: r.snapshot_cow_size,
            split_brain: r.split_brain,
            quorum: r.quorum,
            on_no_quorum: r.on_no_quorum,
            on_io_error: r.on_io_error,
            link,
            nbd_tls,
            nbd_same_host_congestion: r.nbd_same_host_congestion,
            engine: EngineKind::Auto,
        })
    }
}

/// One replicated resource on this node.
pub struct Resource {
    /// Held for the resource's life: no other process attaches to or recreates its metadata.
    _meta_lock: MetaLock,
    /// Serialises the admin commands that change the role or the disk (`control::server`).
    pub(crate) admin: tokio::sync::Mutex<()>,
    pub(crate) spec: ResourceSpec,
    /// The backing store (replaced by `blockctl attach`, see `repl::local_disk`).
    pub(crate) store: crate::repl::local_disk::LocalStore,
    /// Detach, forwarded reads and the resync after attach (see `repl::local_disk`).
    pub(crate) disk_rt: crate::repl::local_disk::DiskRuntime,
    pub(crate) meta: Arc<Mutex<MetaState>>,
    pub(crate) state: Mutex<State>,
    pub(crate) peers: Vec<PeerRt>,
    pub(crate) order: Mutex<Order>,
    pub(crate) ranges: Ranges,
    /// Serialises activity-log transactions (a write to an extent whose transaction is being
    /// persisted must wait for it).
    pub(crate) al_gate: Arc<tokio::sync::Mutex<()>>,
    pub(crate) al_freed: Arc<Notify>,
    /// Writes waiting for room in the activity log. Room can depend on a peer's
    /// acknowledgements (extents held by writes this node made as Primary), which a receive
    /// loop paused at its backlog bound would never read: while one waits for room, every
    /// write in the log's slow path (waiting behind `al_gate`, for room, or for its
    /// transaction) is behind it, and a session's writes there (`PeerRt::al_slow_path`) do
    /// not count as able to complete (`repl::backlog`).
    pub(crate) al_room_waiters: AtomicUsize,
    /// Bytes per activity-log extent (fixed by the metadata).
    pub(crate) al_extent_size: u32,
    /// Held shared by every request of the Primary; demotion takes it exclusively.
    pub(crate) role_gate: tokio::sync::RwLock<()>,
    /// This node's promotion in progress and the leases granted to promoting peers: at most
    /// one of concurrent promotions succeeds (`repl::promotion_lock`).
    pub(crate) promotion_lock: Mutex<PromotionLock>,
    /// Counts the marks made in any bitmap ([`Self::mark_out_of_sync`], under the metadata
    /// lock): a handshake that clears obsolete marks does so only if none was made since its
    /// state report.
    pub(crate) marks_made: AtomicU64,
    events: broadcast::Sender<Event>,
    role_tx: watch::Sender<Role>,
    /// Quorum and the Primary's I/O gate (see `repl::io_gate`).
    pub(crate) quorum: crate::repl::io_gate::QuorumState,
    /// Bumped by every promotion after the new generation is in place: a link whose state
    /// report predates it re-runs its handshake.
    pub(crate) role_epoch: std::sync::atomic::AtomicU64,
    /// Ended sessions still applying what they received (see `repl::peer`): promotion waits.
    pub(crate) finishing: watch::Sender<usize>,
    stop: watch::Sender<bool>,
    /// Run loops ([`Resource::run_with_listener`]: the listener, the connection managers and
    /// their sessions) running; the shutdown waits for none.
    running: watch::Sender<usize>,
    /// Application bytes read and written (the resync backs off while it grows).
    pub(crate) app_io_bytes: std::sync::atomic::AtomicU64,
    /// Snapshots of the replica and their NBD services.
    pub(crate) snapshots: crate::repl::snapshot::SnapshotService,
    /// Extents the peers' replicated requests wrote here since the last successful flush
    /// (marked out of sync when a flush fails, see `repl::unflushed`).
    pub(crate) unflushed: Mutex<crate::repl::unflushed::UnflushedWrites>,
}

/// Milliseconds since the Unix epoch.
/// How long a promoting node waits for its peers' views.
const VIEW_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This node's promotion in progress (`Resource::promote`): holds its promotion lock and
/// the sessions asked for a lease. Dropped on every way out of the promotion: the lock is
/// released and every peer asked gets `PromoteEnd` (queued behind the new role's
/// announcement when the promotion succeeded, so the peer sees this node Primary first; a
/// session that ended meanwhile drops it, its lease having ended with it).
struct PromotionGuard<'a> {
    res: &'a Resource,
    /// The request id of this promotion (the lock's and every `ViewRequest`'s).
    id: u64,
    asked: Vec<Arc<Conn>>,
}

impl Drop for PromotionGuard<'_> {
    fn drop(&mut self) {
        self.res
            .promotion_lock
            .lock()
            .expect("promotion lock")
            .finish(self.id);
        for conn in &self.asked {
            conn.send(Message::PromoteEnd { id: self.id });
        }
    }
}

/// A random generation identifier (never zero or JUST_CREATED).
pub(crate) fn fresh_uuid() -> u64 {
    loop {
        let mut b = [0u8; 8];
        // getrandom(2) never fails for 8 bytes once the pool is initialised; fall back to time.
        // SAFETY: `b` is a valid, writable 8-byte buffer for the duration of the call.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
        let v = if n == 8 {
            u64::from_le_bytes(b)
        } else {
            now_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15)
        };
        let u = Uuid(v);
        if !u.is_zero() && !u.same(Uuid::JUST_CREATED) {
            return v;
        }
    }
}

impl Resource {
    /// Attaches the local disk: opens the metadata (refusing foreign or corrupt metadata),
    /// recovers from an unclean shutdown (activity-log extents marked out of sync for every
    /// peer), opens the data area, and marks the metadata attached. Nodes start Secondary.
    pub fn attach(spec: ResourceSpec) -> Result<Arc<Resource>, ResourceError> {
        let rname = spec.name.clone();
        let meta_err = |source| ResourceError::Meta {
            resource: rname.clone(),
            source,
        };
        let loc = spec.me.meta_location();
        // Before anything is read: another blockd attached to this metadata would otherwise
        // look like an unclean shutdown, and we would rewrite its bitmaps and snapshot areas.
        let meta_lock = MetaLock::take(loc.path()).map_err(meta_err)?;
        let opened = MetaFile::open(&loc, Some(spec.me.id)).map_err(meta_err)?;
        if let Some(w) = &opened.warning {
            tracing::warn!(resource = %spec.name, "metadata: {w} (using the other superblock copy)");
        }
        let file = opened.meta;
        let mut sb = file.superblock().clone();
        let unclean = sb.has(flags::ATTACHED);
        let crashed_primary = sb.has(flags::PRIMARY);
        let g = sb.geometry;
        let on_damage = if unclean {
            OnDamagedPage::MarkDirty
        } else {
            OnDamagedPage::Refuse
        };
        let mut bitmaps = Vec::new();
        for slot in 0..g.peer_slots {
            let (b, damaged) = file.read_bitmap(slot, on_damage).map_err(meta_err)?;
            if !damaged.is_empty() {
                tracing::warn!(resource = %spec.name, slot, ?damaged,
                    "torn bitmap pages after an unclean shutdown: marked all-dirty");
            }
            bitmaps.push(b);
        }
        let replayed = file.read_activity_log().map_err(meta_err)?;
        let active = replayed.active_extents();
        let al = ActivityLog::new(replayed, g.al_slots);
        let mut peers = Vec::new();
        for (node, protocol) in &spec.peers {
            let slot = sb
                .bitmap_slot_for(node.id)
                .ok_or_else(|| ResourceError::Config {
                    resource: spec.name.clone(),
                    problem: format!(
                        "no free bitmap slot for peer {} (metadata has {} slots; re-run create-md)",
                        node.name, g.peer_slots
                    ),
                })? as usize;
            let (accepted_tx, accepted_rx) = mpsc::channel(1);
            peers.push(PeerRt {
                node: node.clone(),
                protocol: *protocol,
                slot,
                conn: Mutex::new(None),
                admin_down: AtomicBool::new(false),
                wake: Notify::new(),
                kill: Notify::new(),
                view_waiter: Mutex::new(None),
                al_slow_path: AtomicUsize::new(0),
                accepted_tx,
                accepted_rx: tokio::sync::Mutex::new(accepted_rx),
            });
        }
        let mut meta = MetaState {
            file,
            sb: sb.clone(),
            bitmaps,
            al,
            al_persisting: 0,
            bitmap_save_failed: false,
        };
        if unclean {
            let ext = u64::from(g.al_extent_size);
            tracing::warn!(resource = %spec.name, extents = active.len(), crashed_primary,
                "unclean shutdown: activity-log extents marked out of sync for every peer");
            for e in &active {
                for b in &mut meta.bitmaps {
                    b.set_range(u64::from(*e) * ext, ext);
                }
            }
            for slot in 0..meta.bitmaps.len() {
                meta.save_bitmap(slot).map_err(meta_err)?;
            }
        }
        meta.sb.flags |= flags::ATTACHED;
        meta.save_sb().map_err(meta_err)?;
        sb = meta.sb.clone();
        let disk = if !sb.has(flags::CONSISTENT) {
            DiskState::Inconsistent
        } else if sb.has(flags::WAS_UP_TO_DATE) {
            DiskState::Consistent
        } else {
            DiskState::Outdated
        };
        // The metadata exists, so the data must too: a store opened with a size would create a
        // missing file, and the node would come up "consistent" on zeros.
        if !spec.me.backing.exists() {
            return Err(ResourceError::MissingBacking {
                resource: spec.name.clone(),
                path: spec.me.backing.display().to_string(),
            });
        }
        let store = BlockStore::open(
            &spec.me.backing,
            &OpenOptions {
                size: Some(g.data_size),
                read_only: false,
                engine: spec.engine,
            },
        )
        .map_err(|source| ResourceError::Store {
            resource: spec.name.clone(),
            source,
        })?;
        // A disk that fails reads at start comes up Diskless (like a detach; see
        // `repl::local_disk`), its metadata no longer consistent.
        let failed = crate::repl::local_disk::failed_at_start(
            &spec.name,
            spec.on_io_error,
            &spec.me.backing,
            g.data_size,
        );
        let disk = if failed.is_some() {
            meta.sb.flags &= !(flags::CONSISTENT | flags::WAS_UP_TO_DATE);
            if let Err(e) = meta.save_sb() {
                tracing::warn!(resource = %spec.name, "cannot mark the metadata inconsistent: {e}");
            }
            DiskState::Diskless
        } else {
            disk
        };
        let peer_states = spec
            .peers
            .iter()
            .map(|_| PeerState {
                leaving: false,
                conn: ConnState::Connecting,
                repl: ReplState::Off,
                role: Role::Unknown,
                disk: DiskState::Unknown,
                last_error: None,
                resync_total: 0,
                resync_done: 0,
                resync_started: None,
                resync_failed_sessions: 0,
                resync_retry_at: None,
                resync_not_before: None,
                discard_my_data: false,
                verify: None,
                checksum_next: false,
                known_loss: None,
                marks_wait: false,
            })
            .collect();
        tracing::info!(resource = %spec.name, node = %spec.me.name, size = g.data_size,
            disk = %disk, current = %sb.generations.current, "attached");
        let snapshots = crate::repl::snapshot::SnapshotService::load(
            &spec.me.snapshot_dir(),
            &spec.name,
            g.data_size,
            &sb.generations,
        );
        Ok(Arc::new(Resource {
            _meta_lock: meta_lock,
            admin: tokio::sync::Mutex::new(()),
            store: crate::repl::local_disk::LocalStore::new(store),
            disk_rt: crate::repl::local_disk::DiskRuntime::at_start(failed),
            meta: Arc::new(Mutex::new(meta)),
            state: Mutex::new(State {
                role: Role::Secondary,
                disk,
                crashed_primary,
                peers: peer_states,
            }),
            peers,
            order: Mutex::new(Order::default()),
            ranges: Ranges::default(),
            al_gate: Arc::new(tokio::sync::Mutex::new(())),
            al_freed: Arc::new(Notify::new()),
            al_room_waiters: AtomicUsize::new(0),
            al_extent_size: g.al_extent_size,
            role_gate: tokio::sync::RwLock::new(()),
            promotion_lock: Mutex::new(PromotionLock::new(spec.me.id)),
            marks_made: AtomicU64::new(0),
            events: broadcast::channel(1024).0,
            role_tx: watch::channel(Role::Secondary).0,
            quorum: crate::repl::io_gate::QuorumState::new(
                spec.quorum,
                spec.on_no_quorum,
                spec.me.id,
                &spec.peers.iter().map(|(n, _)| n.id).collect::<Vec<_>>(),
            ),
            role_epoch: std::sync::atomic::AtomicU64::new(0),
            finishing: watch::channel(0).0,
            stop: watch::channel(false).0,
            running: watch::channel(0).0,
            app_io_bytes: std::sync::atomic::AtomicU64::new(0),
            snapshots,
            unflushed: Mutex::new(crate::repl::unflushed::UnflushedWrites::new(u64::from(
                g.al_extent_size,
            ))),
            spec,
        }))
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Becomes true when the resource shuts down.
    pub(crate) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// The NBD listen address of this node for the resource.
    pub fn nbd_address(&self) -> SocketAddr {
        self.spec.me.nbd
    }

    /// Usable data bytes.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// The backing store now (`blockctl attach` replaces it).
    pub fn store(&self) -> BlockStore {
        self.store.current()
    }

    pub fn role(&self) -> Role {
        self.state.lock().expect("state").role
    }

    /// Follows the role (the NBD export runs while Primary).
    pub fn watch_role(&self) -> watch::Receiver<Role> {
        self.role_tx.subscribe()
    }

    /// Sets the role others follow (the NBD export, suspended I/O).
    pub(crate) fn send_role(&self, role: Role) {
        let _ = self.role_tx.send(role);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub(crate) fn emit(&self, peer: Option<usize>, what: &str, value: impl Into<String>) {
        let ev = Event {
            time_ms: now_ms(),
            resource: self.spec.name.clone(),
            peer: peer.map(|i| self.peers[i].node.name.clone()),
            what: what.to_string(),
            value: value.into(),
        };
        tracing::info!(target: "blockd::events", "{}", ev.line());
        let _ = self.events.send(ev);
    }

    /// Runs blocking metadata I/O off the async workers.
    /// Records in the metadata that this node is not Primary (a demotion, a step-down, a
    /// settled crash): no crashed-Primary claim at the next attach.
    pub(crate) async fn persist_not_primary(&self) -> Result<(), MetaError> {
        self.meta_io(|m| {
            m.sb.flags &= !flags::PRIMARY;
            m.sb.generations.set_primary(false);
            m.save_sb()
        })
        .await
    }

    pub(crate) async fn meta_io<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut MetaState) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, MetaError> {
        let m = self.meta.clone();
        tokio::task::spawn_blocking(move || f(&mut m.lock().expect("meta")))
            .await
            .expect("metadata task panicked")
    }

    pub(crate) fn set_disk(&self, disk: DiskState) {
        let changed = {
            let mut st = self.state.lock().expect("state");
            std::mem::replace(&mut st.disk, disk) != disk
        };
        if changed {
            self.emit(None, "disk", disk.as_str());
            self.broadcast_state();
        }
    }

    pub(crate) fn update_peer(&self, i: usize, f: impl FnOnce(&mut PeerState)) {
        let (before, after) = {
            let mut st = self.state.lock().expect("state");
            let before = st.peers[i].clone();
            f(&mut st.peers[i]);
            (before, st.peers[i].clone())
        };
        if before.conn != after.conn {
            self.emit(Some(i), "connection", after.conn.as_str());
            self.recompute_quorum();
        }
        if before.repl != after.repl {
            self.emit(Some(i), "replication", after.repl.as_str());
        }
        if before.role != after.role {
            self.emit(Some(i), "peer-role", after.role.as_str());
        }
        if before.disk != after.disk {
            self.emit(Some(i), "peer-disk", after.disk.as_str());
        }
    }

    /// Resync progress of a sync target (bytes received from whichever peer is the source).
    pub(crate) fn note_resync_received(&self, len: u64) {
        let mut st = self.state.lock().expect("state");
        for p in st.peers.iter_mut() {
            if p.repl == ReplState::SyncTarget {
                p.resync_done += len;
            }
        }
    }

    /// Tells every connected peer our role and disk state.
    pub(crate) fn broadcast_state(&self) {
        let (role, disk) = {
            let st = self.state.lock().expect("state");
            (st.role, st.disk)
        };
        for p in &self.peers {
            if let Some(c) = p.conn.lock().expect("conn").as_ref() {
                c.send(Message::PeerState { role, disk });
            }
        }
    }

    /// Our handshake report for peer `i`.
    pub(crate) fn state_report(&self, i: usize) -> StateReport {
        let (role, disk, crashed, discard, follows_primary, resyncing_from_other, in_sync) = {
            let st = self.state.lock().expect("state");
            // A third node that is Primary and connected sends its writes here, whether in
            // sync with us or resyncing us.
            let follows_primary = st.peers.iter().enumerate().any(|(j, p)| {
                j != i && p.role == Role::Primary && p.conn == ConnState::Connected && !p.leaving
            });
            // Another session is (becoming) sync target: one resync toward us at a time.
            let resyncing_from_other = st
                .peers
                .iter()
                .enumerate()
                .any(|(j, p)| j != i && p.repl.is_sync_target());
            // A Secondary whose data is a live Primary's: up to date and Established with it.
            let in_sync_with_primary = st.role != Role::Primary
                && st.disk == DiskState::UpToDate
                && st.peers.iter().enumerate().any(|(j, p)| {
                    j != i
                        && p.role == Role::Primary
                        && p.conn == ConnState::Connected
                        && p.repl == ReplState::Established
                        && !p.leaving
                });
            (
                st.role,
                st.disk,
                st.crashed_primary,
                st.peers[i].discard_my_data,
                follows_primary,
                resyncing_from_other,
                in_sync_with_primary,
            )
        };
        // A Primary whose reattached disk is still being resynced through its own worker (see
        // `repl::local_disk`) has no disk to offer a handshake: it must not become a sync
        // target whose (empty) resync would mark it up to date.
        let disk = if role == Role::Primary && disk == DiskState::Inconsistent {
            DiskState::Diskless
        } else {
            disk
        };
        let m = self.meta.lock().expect("meta");
        StateReport {
            side: HandshakeSide {
                view: SideView {
                    node_id: self.spec.me.id,
                    ids: m.sb.generations.clone(),
                    crashed_primary: crashed,
                    disk,
                    role,
                },
                dirty_bits: m.bitmaps[self.peers[i].slot].count_bits(),
                discard_my_data: discard,
                quorum: self.quorum.report(),
                follows_primary,
                resyncing_from_other,
                in_sync_with_primary: in_sync,
            },
            size: self.store.size(),
            protocol: self.peers[i].protocol,
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        let quorum = self.quorum_status();
        let st = self.state.lock().expect("state");
        let m = self.meta.lock().expect("meta");
        let peers = self
            .peers
            .iter()
            .zip(&st.peers)
            .map(|(p, ps)| {
                let conn = p.conn.lock().expect("conn").clone();
                let (in_flight, in_flight_bytes) =
                    conn.as_ref().map_or((0, 0), |c| c.in_flight_with_bytes());
                let unconfirmed = conn.as_ref().map(|c| c.unconfirmed()).unwrap_or_default();
                let (queued_bytes, congested, congested_writes) =
                    conn.as_ref().map_or((0, false, 0), |c| c.send_buffer());
                let lost = ps.known_loss.as_ref().map(|k| k.lost).unwrap_or_default();
                let resync = ps.repl.is_resync().then(|| {
                    let secs = ps
                        .resync_started
                        .map_or(0.0, |t| t.elapsed().as_secs_f64())
                        .max(0.001);
                    ResyncStatus {
                        total_bytes: ps.resync_total,
                        done_bytes: ps.resync_done.min(ps.resync_total),
                        percent: if ps.resync_total == 0 {
                            100.0
                        } else {
                            (ps.resync_done.min(ps.resync_total) as f64 * 100.0
                                / ps.resync_total as f64
                                * 10.0)
                                .round()
                                / 10.0
                        },
                        rate: (ps.resync_done as f64 / secs) as u64,
                        retry_in_secs: ps.resync_retry_at.map(|t| {
                            t.saturating_duration_since(Instant::now())
                                .as_millis()
                                .div_ceil(1000) as u64
                        }),
                    }
                });
                PeerStatus {
                    node: p.node.name.clone(),
                    id: p.node.id,
                    protocol: p.protocol.as_str().to_string(),
                    connection: ps.conn.as_str().to_string(),
                    replication: ps.repl.as_str().to_string(),
                    role: ps.role.as_str().to_string(),
                    disk: ps.disk.as_str().to_string(),
                    // Blocks the peer acknowledged are in sync for the user, though their bits
                    // stay set until its flush makes them durable (`resync::settle_acked`).
                    out_of_sync_bytes: m.bitmaps[p.slot]
                        .count_dirty_bytes()
                        .saturating_sub(conn.as_ref().map_or(0, |c| c.resync_unsettled_bytes())),
                    in_flight,
                    in_flight_bytes,
                    resync,
                    last_error: ps.last_error.clone(),
                    verify: ps.verify.clone(),
                    unconfirmed_writes: unconfirmed.writes,
                    unconfirmed_bytes: unconfirmed.bytes,
                    lost_acked_writes: lost.writes,
                    lost_acked_bytes: lost.bytes,
                    queued_bytes,
                    sndbuf_size: self.spec.sndbuf_size,
                    congested,
                    congested_writes,
                    marks_wait_for_primary: ps.marks_wait
                        && ps.conn == ConnState::Connected
                        && ps.repl == ReplState::Established,
                }
            })
            .collect();
        Status {
            resource: self.spec.name.clone(),
            node: self.spec.me.name.clone(),
            id: self.spec.me.id,
            role: st.role.as_str().to_string(),
            disk: st.disk.as_str().to_string(),
            size: self.store.size(),
            quorum,
            peers,
            snapshots: self.snapshots(),
            disk_error: self.disk_rt.last_error.lock().expect("last error").clone(),
            attach: self.disk_rt.attach.lock().expect("attach").clone(),
        }
    }

    /// What the promotion rules see: this node and every peer.
    fn promote_views(&self) -> (LocalView, Vec<PeerView>) {
        let st = self.state.lock().expect("state");
        let views: Vec<PeerView> = self
            .peers
            .iter()
            .zip(&st.peers)
            .map(|(p, s)| PeerView {
                node_id: p.node.id,
                conn: s.conn,
                role: s.role,
                disk: s.disk,
            })
            .collect();
        (
            LocalView {
                role: st.role,
                disk: st.disk,
                has_quorum: self.quorum.has_quorum(),
            },
            views,
        )
    }

    /// The Primary says which of its writes are on every peer (`repl::unstable`): announces
    /// the figure on every live session. The next number is read under the numbering lock:
    /// every write numbered below it is then queued on each session it goes to (or in a
    /// bitmap), so the sessions' pending writes looked at afterwards miss none of them.
    pub(crate) fn announce_stable(&self) {
        let next = self.order.lock().expect("order").seq;
        let conns: Vec<_> = self
            .peers
            .iter()
            .filter_map(|p| p.conn.lock().expect("conn").clone())
            .collect();
        let pending: Vec<Option<u64>> = conns.iter().map(|c| c.lowest_pending()).collect();
        // The floor is read after the sessions' pending writes: a session that closed before
        // its writes were looked at had set it first.
        let below = crate::repl::unstable::stable_below(next, self.stable_floor(), pending);
        for c in &conns {
            c.announce_stable(below);
        }
    }

    /// Marks `[offset, offset + len)` out of sync in bitmap `slot` because the blocks differ or
    /// may be bad (online verify, a local I/O error under pass-on): such marks are never
    /// cleared as obsolete between two Secondaries (`handshake::marks_obsolete`); they wait for
    /// a resync. The slot's `REPAIR_MARKS` peer flag is set in the superblock, and persisted
    /// before any page holding the marks ([`MetaState::persist_repair_flags`], by a bitmap save or an
    /// activity-log eviction), so the marks keep
    /// their kind across a restart. It is cleared once a full save finds the slot empty (a
    /// resync as source ended, `repl::resync::finish_source`).
    pub(crate) fn mark_for_repair(&self, m: &mut MetaState, slot: usize, offset: u64, len: u64) {
        self.mark_out_of_sync(m, slot, offset, len);
        // A slot no peer has (more slots than peers) has no flag; nobody reads its marks.
        m.sb.set_repair_marks(slot, true);
    }

    /// Marks `[offset, offset + len)` out of sync in bitmap `slot`, `m` being the locked
    /// metadata. Every path that sets bits while a resync to the peer of that slot may run goes
    /// through here: the range is withdrawn from that resync's claims, so the acknowledgement of
    /// a chunk read before the mark never clears it (`repl::resync_claims`; lock order: meta,
    /// then the peer's session, then its claims).
    pub(crate) fn mark_out_of_sync(&self, m: &mut MetaState, slot: usize, offset: u64, len: u64) {
        m.bitmaps[slot].set_range(offset, len);
        self.marks_made.fetch_add(1, Ordering::SeqCst);
        for p in self.peers.iter().filter(|p| p.slot == slot) {
            if let Some(c) = p.conn.lock().expect("conn").as_ref() {
                c.resync_claims
                    .lock()
                    .expect("resync claims")
                    .marked(offset, len);
            }
        }
    }

    /// The session with peer `i`, our Primary, ended with writes of it (`ranges`) not yet known
    /// to be on the other peers: they are marked out of sync for each of them (and persisted),
    /// so whoever becomes Primary next resyncs those blocks (see `promote`).
    pub(crate) async fn mark_unstable(&self, i: usize, ranges: &[(u64, u64)]) {
        let slots: Vec<usize> = (0..self.peers.len())
            .filter(|&j| j != i)
            .map(|j| self.peers[j].slot)
            .collect();
        if slots.is_empty() || ranges.is_empty() {
            return;
        }
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        {
            let mut m = self.meta.lock().expect("meta");
            for &slot in &slots {
                for &(o, l) in ranges {
                    self.mark_out_of_sync(&mut m, slot, o, l);
                }
            }
        }
        for slot in slots {
            if let Err(e) = self.meta_io(move |m| m.save_bitmap(slot)).await {
                tracing::error!(resource = %self.spec.name, "cannot persist the bitmap: {e}");
            }
        }
        tracing::info!(resource = %self.spec.name, peer = %self.peers[i].node.name,
            ranges = ranges.len(), bytes,
            "the Primary's last writes may not have reached the other peers: marked out of sync \
             for them (resynced by the next Primary)");
    }

    /// Our answer to peer `i`'s `ViewRequest { id, promote }`: our generations, the Primary we
    /// are connected to (ourselves included), other than peer `i`, and when the peer is
    /// promoting, whether it gets a lease of our promotion lock (`repl::promotion_lock`).
    pub(crate) fn view_reply(&self, i: usize, id: u64, promote: bool) -> Message {
        let promoting = if promote {
            let outcome = self
                .promotion_lock
                .lock()
                .expect("promotion lock")
                .requested(self.peers[i].node.id, id);
            if let Some(node) = outcome.promoting() {
                tracing::info!(resource = %self.spec.name, peer = %self.peers[i].node.name,
                    promoting = node, "refused a peer's promotion: another one is in progress");
            }
            outcome.promoting()
        } else {
            None
        };
        let primary = {
            let st = self.state.lock().expect("state");
            if st.role == Role::Primary {
                Some(self.spec.me.id)
            } else {
                self.peers
                    .iter()
                    .zip(&st.peers)
                    .enumerate()
                    // A session tearing down (its Primary lost: applying what it received,
                    // up to a minute) no longer counts, as in `state_report`: refusing a
                    // promotion for it, `--force` included, would block a failover.
                    .find(|(j, (_, s))| {
                        *j != i
                            && s.conn == ConnState::Connected
                            && s.role == Role::Primary
                            && !s.leaving
                    })
                    .map(|(_, (p, _))| p.node.id)
            }
        };
        let m = self.meta.lock().expect("meta");
        let g = &m.sb.generations;
        Message::ViewReply {
            id,
            marked: m.bitmaps[self.peers[i].slot].count_bits() > 0,
            current: g.current,
            primary,
            promoting,
            history: g
                .history
                .iter()
                .copied()
                .filter(|h| !h.is_zero())
                .take(crate::repl::wire::MAX_VIEW_HISTORY)
                .collect(),
        }
    }

    /// Peer `i`'s promotion `id` is over (`PromoteEnd`): its lease is released.
    pub(crate) fn promotion_ended(&self, i: usize, id: u64) {
        self.promotion_lock
            .lock()
            .expect("promotion lock")
            .released(self.peers[i].node.id, id);
    }

    /// Peer `i`'s lease ends whatever its promotion: its session ended, or it reported itself
    /// Primary (then the role rules refuse other promotions).
    pub(crate) fn promotion_lease_ends(&self, i: usize) {
        self.promotion_lock
            .lock()
            .expect("promotion lock")
            .peer_gone(self.peers[i].node.id);
    }

    /// Takes this node's promotion lock (refused while a peer's promotion holds a lease).
    fn begin_promotion(&self) -> Result<PromotionGuard<'_>, PromotionBusy> {
        let id = fresh_uuid();
        self.promotion_lock
            .lock()
            .expect("promotion lock")
            .begin(id)?;
        Ok(PromotionGuard {
            res: self,
            id,
            asked: Vec::new(),
        })
    }

    /// Peer `i` answered `ViewRequest { id }`.
    pub(crate) fn view_answered(&self, i: usize, id: u64, answer: ClusterAnswer) {
        let mut w = self.peers[i].view_waiter.lock().expect("view waiter");
        if w.as_ref().is_some_and(|(want, _)| *want == id)
            && let Some((_, tx)) = w.take()
        {
            let _ = tx.send(answer);
        }
    }

    /// Asks every connected, established peer for its view and a lease for `promotion`
    /// (bounded by `VIEW_TIMEOUT`; a peer that does not answer is `ClusterAnswer::Unknown`).
    /// Every session asked is recorded in `promotion`, which releases the leases when dropped.
    async fn ask_views(&self, promotion: &mut PromotionGuard<'_>) -> Vec<(usize, ClusterAnswer)> {
        let mut pending = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let established = {
                let st = self.state.lock().expect("state");
                st.peers[i].conn == ConnState::Connected
                    && st.peers[i].repl == ReplState::Established
            };
            let conn = p.conn.lock().expect("conn").clone();
            let (true, Some(conn)) = (established, conn) else {
                continue;
            };
            let id = promotion.id;
            let (tx, rx) = tokio::sync::oneshot::channel();
            *p.view_waiter.lock().expect("view waiter") = Some((id, tx));
            conn.send(Message::ViewRequest { id, promote: true });
            promotion.asked.push(conn);
            pending.push((i, rx));
        }
        let deadline = tokio::time::Instant::now() + VIEW_TIMEOUT;
        let mut answers = Vec::new();
        for (i, rx) in pending {
            let a = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(a)) => a,
                _ => ClusterAnswer::Unknown,
            };
            self.peers[i]
                .view_waiter
                .lock()
                .expect("view waiter")
                .take();
            answers.push((i, a));
        }
        answers
    }

    /// Acknowledged writes of former Primaries that never reached this node: what promoting it
    /// loses (see `repl::lost_writes`).
    pub fn known_losses(&self) -> Vec<crate::repl::lost_writes::KnownLoss> {
        let st = self.state.lock().expect("state");
        st.peers
            .iter()
            .filter_map(|p| p.known_loss.clone())
            .collect()
    }

    /// `blockctl promote --dry-run` (and the check `blockctl promote` prints before it
    /// promotes): refuses like [`Resource::promote`] would, else returns what a promotion
    /// would lose. Changes nothing.
    pub async fn promote_check(
        &self,
        force: bool,
    ) -> Result<Vec<crate::repl::lost_writes::KnownLoss>, ResourceError> {
        // What it would lose is known once the writes received from a lost peer are applied:
        // wait for them as `promote` does (a failover is exactly when they are; refusing made
        // `blockctl promote` fail there).
        self.applies_finished().await;
        let (local, views) = self.promote_views();
        let decision =
            promote::decide(&local, &views, force).map_err(ResourceError::PromoteRefused)?;
        // A promotion in progress (a peer's lease) would refuse ours; only looked at: a dry
        // run takes no lock and asks no peer for a lease.
        let holder = self.promotion_lock.lock().expect("promotion lock").holder();
        if let (Some(node), false) = (holder, decision == PromoteDecision::AlreadyPrimary) {
            return Err(ResourceError::Refused(format!(
                "promotion refused: {}",
                PromotionBusy::Promoting { node }
            )));
        }
        match decision {
            PromoteDecision::AlreadyPrimary => Ok(Vec::new()),
            PromoteDecision::Promote {
                data: DataPath::Peer(_),
                ..
            } => Err(ResourceError::Diskless),
            PromoteDecision::Promote { .. } => Ok(self.known_losses()),
        }
    }

    /// `blockctl promote`: becomes Primary when the rules allow (see [`promote::decide`]).
    pub async fn promote(&self, force: bool) -> Result<(), ResourceError> {
        // Writes received from a lost Primary are applied first (bounded, see `repl::peer`).
        self.applies_finished().await;
        let (local, views) = self.promote_views();
        if let PromoteDecision::AlreadyPrimary =
            promote::decide(&local, &views, force).map_err(ResourceError::PromoteRefused)?
        {
            return Ok(());
        }
        // At most one of concurrent promotions succeeds (`repl::promotion_lock`): this node's
        // lock first (refused while it granted a peer's promotion), then a lease from every
        // peer asked below. Released on every way out of here (the guard's drop), after the
        // new role is announced when the promotion succeeds.
        let mut promotion = self
            .begin_promotion()
            .map_err(|e| ResourceError::Refused(format!("promotion refused: {e}")))?;
        // Promotion is a cluster-wide decision: the connected peers' views may refuse it.
        let answers = self.ask_views(&mut promotion).await;
        let ours = self.meta.lock().expect("meta").sb.generations.current;
        let by_node: Vec<(u8, ClusterAnswer)> = answers
            .iter()
            .map(|(i, a)| (self.peers[*i].node.id, a.clone()))
            .collect();
        promote::decide_cluster(ours, &by_node, force)
            .map_err(|e| ResourceError::Refused(format!("promotion refused: {e}")))?;
        // A connected peer whose generation differs from ours is not in sync, whatever its
        // session says, and blocks marked out of sync on either side (writes of a lost Primary
        // that reached one of us only) must be resynced: such sessions are restarted so the
        // handshake decides the resync.
        let differs: Vec<usize> = {
            let m = self.meta.lock().expect("meta");
            answers
                .iter()
                .filter(|(i, a)| {
                    let marked_here = m.bitmaps[self.peers[*i].slot].count_bits() > 0;
                    promote::resync_on_promotion(ours, a, marked_here)
                })
                .map(|(i, _)| *i)
                .collect()
        };
        let _gate = self.role_gate.write().await;
        let (local, views) = self.promote_views();
        let forced =
            match promote::decide(&local, &views, force).map_err(ResourceError::PromoteRefused)? {
                PromoteDecision::AlreadyPrimary => return Ok(()),
                PromoteDecision::Promote {
                    data: DataPath::Peer(_),
                    ..
                } => return Err(ResourceError::Diskless),
                PromoteDecision::Promote { forced, .. } => forced,
            };
        // Peers that do not get this generation's writes track them in their bitmaps. A forced
        // promotion resyncs every connected peer that is not up to date: drop and reconnect them.
        // A link still in its handshake (state report sent before this promotion) is
        // reconnected too, so the peer learns the new generation.
        let mut reconnect = Vec::new();
        let mut in_sync = Vec::new();
        let mut out_of_sync = Vec::new();
        for (i, v) in views.iter().enumerate() {
            let established = {
                let st = self.state.lock().expect("state");
                st.peers[i].repl == ReplState::Established
            };
            if v.conn == ConnState::Connected
                && established
                && !differs.contains(&i)
                && !(forced && v.disk != DiskState::UpToDate)
            {
                in_sync.push(i);
            } else {
                out_of_sync.push(v.node_id);
                reconnect.push(i);
            }
        }
        let fresh = fresh_uuid();
        let current = self
            .meta_io(move |m| {
                m.sb.generations.new_current(fresh, true, &out_of_sync);
                m.sb.flags |= flags::PRIMARY | flags::CONSISTENT | flags::WAS_UP_TO_DATE;
                m.save_sb()?;
                Ok(m.sb.generations.current)
            })
            .await
            .map_err(ResourceError::MetaUpdate)?;
        // A peer lost from here on (we are Primary) holds `Stable` back; see below.
        let losses = self.stable_floor_losses();
        {
            let mut st = self.state.lock().expect("state");
            st.role = Role::Primary;
            st.disk = DiskState::UpToDate;
            // What a former Primary had acknowledged beyond this node's data is gone now.
            for p in st.peers.iter_mut() {
                p.known_loss = None;
            }
        }
        for &i in &in_sync {
            if let Some(c) = self.peers[i].conn.lock().expect("conn").as_ref() {
                c.send(Message::NewUuid(current));
            }
        }
        self.role_epoch.fetch_add(1, Ordering::SeqCst);
        for &i in &reconnect {
            if self.peers[i].conn.lock().expect("conn").is_some() {
                self.peers[i].kill.notify_one();
            }
        }
        self.generation_started();
        // A floor left from an earlier time as Primary is covered by this generation; one set
        // by a peer lost during the promotion stays, with a generation owed for it.
        self.release_stable_floor(losses);
        tracing::info!(resource = %self.spec.name, forced, %current, "promoted to Primary");
        self.emit(None, "role", Role::Primary.as_str());
        self.emit(None, "disk", DiskState::UpToDate.as_str());
        self.broadcast_state();
        let _ = self.role_tx.send(Role::Primary);
        // The peers' leases end behind the announcement of the new role.
        drop(promotion);
        Ok(())
    }

    /// This node's claim to be a crashed Primary is settled (a handshake found both sides in
    /// sync, or a resync from it finished): forget it, and unless this node is Primary now
    /// clear the on-disk `PRIMARY` flag too. Left set, every later restart would claim "crashed
    /// Primary" again (read at attach) and win resyncs with stale blocks. Under the role gate,
    /// so a promotion (which sets the flag) cannot come in between.
    pub(crate) async fn crashed_primary_settled(&self) {
        {
            let mut st = self.state.lock().expect("state");
            st.crashed_primary = false;
            if st.role == Role::Primary {
                return;
            }
        }
        if !self.meta.lock().expect("meta").sb.has(flags::PRIMARY) {
            return;
        }
        let _gate = self.role_gate.read().await;
        if self.role() == Role::Primary {
            return;
        }
        if let Err(e) = self.persist_not_primary().await {
            tracing::error!(resource = %self.spec.name,
                "cannot clear the Primary flag of a settled crash: {}", error_chain(&e));
        }
    }

    /// `blockctl demote`: stops accepting writes, waits for those in flight, flushes locally and
    /// on every peer, and becomes Secondary.
    pub async fn demote(&self) -> Result<(), ResourceError> {
        if self.role() != Role::Primary {
            return Ok(());
        }
        // Writes not acknowledged by a lost peer are only here: start the generation owed
        // since the loss, so the next handshake resyncs them (see `repl::io_gate`).
        if let Err(e) = self.settle_generation().await {
            tracing::error!(resource = %self.spec.name, "new generation before demotion: {e}");
        }
        let _ = self.role_tx.send(Role::Secondary);
        let gate = self.role_gate.write().await;
        {
            let mut st = self.state.lock().expect("state");
            st.role = Role::Secondary;
        }
        drop(gate);
        let flushed = self.flush_everywhere().await;
        self.persist_not_primary()
            .await
            .map_err(ResourceError::MetaUpdate)?;
        self.state.lock().expect("state").crashed_primary = false;
        tracing::info!(resource = %self.spec.name, "demoted to Secondary");
        self.emit(None, "role", Role::Secondary.as_str());
        self.broadcast_state();
        flushed.map_err(ResourceError::DemoteFlush)
    }

    fn peer_index(&self, name: &str) -> Result<usize, ResourceError> {
        self.peers
            .iter()
            .position(|p| p.node.name == name)
            .ok_or_else(|| ResourceError::UnknownPeer(name.to_string()))
    }

    /// `blockctl disconnect`: drops the link(s) and stays StandAlone.
    pub fn disconnect(&self, peer: Option<&str>) -> Result<(), ResourceError> {
        let which: Vec<usize> = match peer {
            Some(n) => vec![self.peer_index(n)?],
            None => (0..self.peers.len()).collect(),
        };
        for i in which {
            self.peers[i].admin_down.store(true, Ordering::SeqCst);
            self.peers[i].kill.notify_one();
            self.peers[i].wake.notify_one();
        }
        Ok(())
    }

    /// `blockctl connect`: (re)enables connecting; `discard_my_data` marks this node the victim
    /// of a split brain.
    pub fn connect(&self, peer: Option<&str>, discard_my_data: bool) -> Result<(), ResourceError> {
        if discard_my_data && self.role() == Role::Primary {
            // The resync would write the peer's blocks under the Primary's users (DRBD
            // refuses the same: "I shall become SyncTarget, but I am primary!").
            return Err(ResourceError::Refused(
                "--discard-my-data on a Primary: demote this node first".into(),
            ));
        }
        let which: Vec<usize> = match peer {
            Some(n) => vec![self.peer_index(n)?],
            None => (0..self.peers.len()).collect(),
        };
        for i in which {
            self.update_peer(i, |p| {
                p.discard_my_data = discard_my_data;
                // An admin asking again (after a repair): resync at once.
                p.resync_retry_reset();
            });
            self.peers[i].admin_down.store(false, Ordering::SeqCst);
            self.peers[i].wake.notify_one();
        }
        Ok(())
    }

    /// Stops every task of the resource: ends the sessions and waits for them (under A and B
    /// a session still applies what it received, and every session persists its loss marks
    /// when it ends), flushes the data, saves the bitmaps, and marks the metadata cleanly
    /// detached when [`detach_cleanly`] allows it.
    pub async fn shutdown(&self) {
        // Stored even with no receiver yet (`send` would drop it): a run loop that starts or
        // subscribes later must still see it.
        self.stop.send_replace(true);
        for p in &self.peers {
            p.kill.notify_one();
        }
        // The connection managers see `stop` (and their sessions the kill) and return.
        let mut running = self.running.subscribe();
        let sessions_ended = matches!(
            tokio::time::timeout(SESSIONS_END_TIMEOUT, running.wait_for(|n| *n == 0)).await,
            Ok(Ok(_))
        );
        if !sessions_ended {
            tracing::error!(resource = %self.spec.name,
                "sessions still running after {SESSIONS_END_TIMEOUT:?}: metadata left attached \
                 (replayed at the next attach)");
        }
        let flush_error = Mutex::new(None);
        let flush = async {
            let r = self.store.flush().await.map_err(|e| error_chain(&e));
            if let Err(e) = &r {
                *flush_error.lock().expect("flush error") = Some(e.clone());
            }
            r
        };
        let generation = || self.meta.lock().expect("meta").sb.generations.current.0;
        for e in self.snapshots.set.close_all(flush, generation).await {
            tracing::error!(resource = %self.spec.name, "cannot keep a snapshot: {e}");
        }
        let flush_error = flush_error.into_inner().expect("flush error");
        if let Some(e) = &flush_error {
            tracing::error!(resource = %self.spec.name,
                "cannot flush the data: metadata left attached (replayed at the next attach): {e}");
        }
        let primary = self.role() == Role::Primary;
        let flushed = flush_error.is_none();
        let r = self
            .meta_io(move |m| {
                // Checked before this save: it writes every page, but a failed save's marks
                // may have been lost on the way (a failed fdatasync may drop dirty pages).
                let save_failed = m.bitmap_save_failed;
                for slot in 0..m.bitmaps.len() {
                    m.save_bitmap(slot)?;
                }
                if detach_cleanly(primary, sessions_ended, flushed, save_failed) {
                    m.sb.flags &= !flags::ATTACHED;
                }
                m.save_sb()?;
                Ok(save_failed)
            })
            .await;
        match r {
            Ok(true) if !primary => tracing::warn!(resource = %self.spec.name,
                "a bitmap save failed since attach: metadata left attached (the next attach \
                 replays the activity log)"),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(resource = %self.spec.name, "cannot mark metadata detached: {e}")
            }
        }
    }

    /// Binds the replication listener and starts every connection manager. Returns when the
    /// resource is shut down.
    pub async fn run(self: &Arc<Self>) -> Result<(), ResourceError> {
        let addr = self.spec.me.address;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ResourceError::Listen {
                resource: self.spec.name.clone(),
                addr,
                source,
            })?;
        self.run_with_listener(listener).await;
        Ok(())
    }

    /// Like [`Resource::run`] with a bound listener. Counted as running from this call on, not
    /// from the future's first poll: a shutdown right after a spawn still waits for it.
    pub fn run_with_listener(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> impl Future<Output = ()> + Send + 'static {
        let running = Running::new(&self.running);
        let me = self.clone();
        async move {
            me.run_loops(listener).await;
            drop(running);
        }
    }

    async fn run_loops(self: &Arc<Self>, listener: TcpListener) {
        self.serve_reloaded_snapshots().await;
        let mut tasks = tokio::task::JoinSet::new();
        let me = self.clone();
        tasks.spawn(async move { me.accept_loop(listener).await });
        let mut peer_loops = tokio::task::JoinSet::new();
        for i in 0..self.peers.len() {
            let me = self.clone();
            peer_loops.spawn(async move { me.peer_loop(i).await });
        }
        let mut stop = self.stop.subscribe();
        let _ = stop.wait_for(|s| *s).await;
        tasks.shutdown().await;
        // Not aborted: each ends its session on its own (see `shutdown`).
        while peer_loops.join_next().await.is_some() {}
    }

    /// Accepts links on our replication listener, each set up on its own task; setups before
    /// the peer is authenticated are limited (`repl::setup_limit`): a connection over the
    /// limit is closed at once.
    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let setups = SetupLimit::new(self.spec.link.peers.iter().map(|p| p.address.ip()));
        let mut refusals = RefusalLog::default();
        loop {
            let (tcp, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(resource = %self.spec.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = setups.admit(from.ip()) else {
                drop(tcp);
                if let Some(refused) = refusals.refused(Instant::now()) {
                    tracing::warn!(resource = %self.spec.name, %from,
                        refused_since_last_report = refused,
                        "too many replication link setups in progress: connection closed");
                }
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let accepted = link::accept(&me.spec.link, tcp).await;
                drop(slot);
                match accepted {
                    Ok(link) => {
                        let Some(i) = me.peers.iter().position(|p| p.node.name == link.peer.name)
                        else {
                            return;
                        };
                        if me.spec.me.id < me.peers[i].node.id {
                            tracing::warn!(resource = %me.spec.name, peer = %link.peer.name,
                                "refusing a link from a peer that should accept (we dial it)");
                            return;
                        }
                        if me.peers[i].admin_down.load(Ordering::SeqCst) {
                            tracing::info!(resource = %me.spec.name, peer = %link.peer.name,
                                "refusing a link: administratively disconnected");
                            return;
                        }
                        let _ = me.peers[i].accepted_tx.try_send(link);
                    }
                    Err(e) => {
                        tracing::warn!(resource = %me.spec.name, %from,
                            "replication link refused: {}", error_chain(&e));
                    }
                }
            });
        }
    }

    async fn peer_loop(self: Arc<Self>, i: usize) {
        let p = &self.peers[i];
        let dial = self.spec.me.id < p.node.id;
        let lnode = LinkNode {
            name: p.node.name.clone(),
            id: p.node.id,
            address: p.node.address,
        };
        let mut backoff = Duration::from_millis(100);
        let mut accepted = p.accepted_rx.lock().await;
        let mut stop = self.stop.subscribe();
        loop {
            if *stop.borrow_and_update() {
                self.update_peer(i, |s| s.conn = ConnState::StandAlone);
                return;
            }
            if p.admin_down.load(Ordering::SeqCst) {
                self.update_peer(i, |s| s.conn = ConnState::StandAlone);
                tokio::select! {
                    _ = p.wake.notified() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            self.update_peer(i, |s| s.conn = ConnState::Connecting);
            let link = if dial {
                tokio::select! {
                    r = link::connect(&self.spec.link, &lnode) => r.map_err(|e| error_chain(&e)),
                    _ = p.wake.notified() => continue,
                    _ = stop.changed() => continue,
                }
            } else {
                tokio::select! {
                    l = accepted.recv() => match l {
                        Some(l) => Ok(l),
                        None => return,
                    },
                    _ = p.wake.notified() => continue,
                    _ = stop.changed() => continue,
                }
            };
            match link {
                Ok(link) => {
                    backoff = Duration::from_millis(100);
                    // A kill meant for an earlier session (`notify_one` keeps a permit when no
                    // session waits) must not end this one; a disconnect since is seen here.
                    tokio::select! {
                        biased;
                        _ = p.kill.notified() => {}
                        _ = std::future::ready(()) => {}
                    }
                    // A shutdown's kill may have been the one just consumed.
                    if p.admin_down.load(Ordering::SeqCst) || *stop.borrow() {
                        continue;
                    }
                    let end = peer::run_session(&self, i, link).await;
                    match end {
                        SessionEnd::StandAlone(why) => {
                            tracing::warn!(resource = %self.spec.name, peer = %p.node.name,
                                "standalone: {why}");
                            self.update_peer(i, |s| s.last_error = Some(why.clone()));
                            p.admin_down.store(true, Ordering::SeqCst);
                        }
                        SessionEnd::Lost(why) => {
                            tracing::warn!(resource = %self.spec.name, peer = %p.node.name,
                                "connection lost: {why}");
                            self.update_peer(i, |s| s.last_error = Some(why));
                        }
                        SessionEnd::Killed => {}
                    }
                }
                Err(why) => {
                    tracing::debug!(resource = %self.spec.name, peer = %p.node.name,
                        "cannot connect: {why}");
                    self.update_peer(i, |s| s.last_error = Some(why));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = p.wake.notified() => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                }
            }
        }
    }
}

/// How long a shutdown waits for the sessions to end: under A and B a session may apply what
/// it received for up to [`peer::FINISH_APPLIES_LIMIT`], then wait up to
/// [`peer::STOP_APPLIES_LIMIT`] for the requests still running on the disk, then persists its
/// loss marks.
const SESSIONS_END_TIMEOUT: Duration = Duration::from_secs(
    peer::FINISH_APPLIES_LIMIT.as_secs() + peer::STOP_APPLIES_LIMIT.as_secs() + 15,
);

/// Counts one run loop as running while it lives (dropped when it returns or is aborted).
struct Running(watch::Sender<usize>);

impl Running {
    fn new(count: &watch::Sender<usize>) -> Running {
        count.send_modify(|n| *n += 1);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// An error and its sources, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `blockctl create-md`: initialises the metadata of this node for `local` (refusing existing
/// metadata unless `force`). Internal metadata takes the end of the backing device; external
/// metadata covers the whole backing device.
pub fn create_md(local: &LocalResource<'_>, force: bool) -> Result<(), ResourceError> {
    let r = local.resource;
    let meta_err = |source| ResourceError::Meta {
        resource: r.name.clone(),
        source,
    };
    let loc = local.me.meta_location();
    // A running blockd holds this lock: its live metadata is never overwritten. (Metadata
    // that does not exist yet cannot be in use.)
    let _lock = if loc.path().exists() {
        Some(MetaLock::take(loc.path()).map_err(meta_err)?)
    } else {
        None
    };
    let data_size = match &local.me.meta {
        crate::config::MetaPlacement::Internal => None,
        crate::config::MetaPlacement::External(_) => {
            // Seek to the end: a block device's file metadata says 0 bytes.
            let len = std::fs::File::open(&local.me.backing)
                .and_then(|mut f| {
                    use std::io::Seek;
                    f.seek(std::io::SeekFrom::End(0))
                })
                .map_err(|source| ResourceError::Store {
                    resource: r.name.clone(),
                    source: StoreError::Open {
                        path: local.me.backing.clone(),
                        source,
                    },
                })?;
            Some(len)
        }
    };
    let opts = crate::meta::file::CreateOptions {
        node_id: local.me.id,
        peer_slots: (local.peers.len() as u32).max(1),
        bitmap_block_size: r.bitmap_block_size,
        al_extent_size: r.al_extent_size,
        al_extents: r.al_extents,
        data_size,
        force,
    };
    MetaFile::create(&loc, &opts).map_err(meta_err)?;
    Ok(())
}
