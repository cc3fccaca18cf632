//! Quorum at runtime, and the gate every Primary I/O passes: the quorum verdict is recomputed
//! (with [`super::quorum::decide`]) whenever a peer's connection state changes — a peer counts
//! once its handshake is done; without quorum a Primary suspends its I/O until quorum returns
//! (or it stops being Primary) or fails it with EIO (`on-no-quorum`). A Primary that loses
//! quorum while a resync target of the majority is found at reconnect steps down by itself.
//!
//! It also starts the Primary's new generation after a peer loss *lazily*, before the first
//! write that follows (DRBD starts it at once): a Primary cut off from everyone that writes
//! nothing more keeps its generation, so when the majority promotes another node, the old
//! Primary is simply behind it (a sync target), not a split brain. Until that write, the
//! Primary counts as a crashed one (`crashed_primary`), so writes in flight at the loss are
//! resynced from it if nobody else took over.
//! With quorum enabled, the new generation starts only after the peers still counted confirm
//! a quorum by a flush round trip sent after the loss ([`quorum::may_start_generation`]): the
//! links of a partition time out one by one, and a generation started in between would reach
//! no peer and look like a split brain at reconnect.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::meta::superblock::flags;
use crate::repl::quorum::{self, OnNoQuorum, QuorumInput, QuorumSetting, QuorumVerdict};
use crate::repl::resource::{Resource, fresh_uuid};
use crate::repl::state::{ConnState, ReplState, Role};
use crate::repl::wire::Message;
use crate::store::StoreError;

/// Quorum status of a resource (`blockctl status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuorumStatus {
    /// `off`, `majority` or a node count.
    pub setting: String,
    pub on_no_quorum: String,
    pub has_quorum: bool,
    /// Voters present (this node included) and voters in total.
    pub present: u32,
    pub voters: u32,
    /// This node is Primary without quorum and holds its I/O.
    pub io_suspended: bool,
}

/// The runtime quorum state of a resource.
pub(crate) struct QuorumState {
    setting: QuorumSetting,
    on_no_quorum: OnNoQuorum,
    /// This node's id and the configured nodes (bit mask).
    me: u8,
    members: u32,
    verdict: Mutex<QuorumVerdict>,
    /// Quorum held (always true when quorum is off): the fast path of every I/O.
    has: AtomicBool,
    changed: watch::Sender<bool>,
    /// A peer was lost while Primary and no write has started the new generation yet.
    new_current_pending: AtomicBool,
    new_current_lock: tokio::sync::Mutex<()>,
    /// The lowest write a lost peer may lack, until the next generation is announced; caps the
    /// `Stable` figure (see `repl::unstable::stable_below`).
    stable_floor: Mutex<StableFloor>,
}

/// See [`QuorumState::stable_floor`]. `losses` counts the peers lost while it was set, so a
/// release only clears what the announced generation covers.
#[derive(Debug, Default)]
struct StableFloor {
    below: Option<u64>,
    losses: u64,
}

impl QuorumState {
    pub(crate) fn new(
        setting: QuorumSetting,
        on_no_quorum: OnNoQuorum,
        me: u8,
        peers: &[u8],
    ) -> Self {
        let members = peers
            .iter()
            .chain(std::iter::once(&me))
            .fold(0u32, |m, &id| {
                m | 1u32.checked_shl(u32::from(id)).unwrap_or(0)
            });
        let verdict = quorum::decide(
            setting,
            &QuorumInput {
                me,
                members,
                reachable: 0,
                departed: 0,
            },
        );
        QuorumState {
            setting,
            on_no_quorum,
            me,
            members,
            verdict: Mutex::new(verdict),
            has: AtomicBool::new(verdict.quorum),
            changed: watch::channel(verdict.quorum).0,
            new_current_pending: AtomicBool::new(false),
            new_current_lock: tokio::sync::Mutex::new(()),
            stable_floor: Mutex::new(StableFloor::default()),
        }
    }

    /// The quorum report of a handshake (`None` when quorum is off).
    pub(crate) fn report(&self) -> Option<bool> {
        (self.setting != QuorumSetting::Off).then(|| self.has.load(Ordering::SeqCst))
    }

    pub(crate) fn has_quorum(&self) -> bool {
        self.has.load(Ordering::SeqCst)
    }
}

/// How long the quorum probe before a new generation waits for answers (a dead link is
/// noticed within the keepalive timeout, which ends its session and drops its probe).
const PROBE_TIMEOUT: std::time::Duration =
    crate::repl::peer::KEEPALIVE_TIMEOUT.saturating_add(std::time::Duration::from_secs(1));

/// After a failed quorum probe: how long to wait for the quorum verdict to change before the
/// write passes the gate again and the probe is repeated.
const UNCONFIRMED_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// The result of one attempt to start the generation owed since a peer loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GenerationStart {
    /// None is owed (no peer lost, or already started).
    NotOwed,
    /// Started, persisted and sent to the peers that follow.
    Started,
    /// The remaining peers did not confirm a quorum: nothing changed, still owed.
    Unconfirmed,
}

fn no_quorum_error(offset: u64, len: u64) -> StoreError {
    StoreError::Write {
        offset,
        len,
        source: std::io::Error::other("no quorum (on-no-quorum = io-error)"),
    }
}

fn stepped_down_error(offset: u64, len: u64) -> StoreError {
    StoreError::Write {
        offset,
        len,
        source: std::io::Error::other(
            "I/O was suspended without quorum and this node is no longer Primary",
        ),
    }
}

impl Resource {
    /// Recomputes quorum from the peers whose handshake is done; reports a change.
    pub(crate) fn recompute_quorum(&self) {
        let q = &self.quorum;
        let reachable = {
            let st = self.state.lock().expect("state");
            self.peers
                .iter()
                .zip(&st.peers)
                .filter(|(_, s)| s.conn == ConnState::Connected)
                .fold(0u32, |m, (p, _)| {
                    m | 1u32.checked_shl(u32::from(p.node.id)).unwrap_or(0)
                })
        };
        let v = quorum::decide(
            q.setting,
            &QuorumInput {
                me: q.me,
                members: q.members,
                reachable,
                departed: 0,
            },
        );
        let before = std::mem::replace(&mut *q.verdict.lock().expect("quorum"), v);
        q.has.store(v.quorum, Ordering::SeqCst);
        if before.quorum != v.quorum {
            let word = if v.quorum { "regained" } else { "lost" };
            let primary = self.role() == Role::Primary;
            if v.quorum {
                tracing::warn!(resource = %self.name(), present = v.present, voters = v.voters,
                    primary, "quorum regained");
            } else {
                tracing::warn!(resource = %self.name(), present = v.present, voters = v.voters,
                    primary, "quorum lost");
            }
            self.emit(
                None,
                "quorum",
                format!("{word} ({}/{})", v.present, v.voters),
            );
            if primary && !v.quorum {
                self.emit(None, "io", q.on_no_quorum.as_str());
            }
            let _ = q.changed.send(v.quorum);
        }
    }

    /// Quorum for `blockctl status`.
    pub(crate) fn quorum_status(&self) -> QuorumStatus {
        let q = &self.quorum;
        let v = *q.verdict.lock().expect("quorum");
        QuorumStatus {
            setting: q.setting.to_string(),
            on_no_quorum: q.on_no_quorum.as_str().to_string(),
            has_quorum: v.quorum,
            present: v.present,
            voters: v.voters,
            io_suspended: !v.quorum
                && q.on_no_quorum == OnNoQuorum::SuspendIo
                && self.role() == Role::Primary,
        }
    }

    /// The gate of every Primary request: passes at once with quorum; without it, waits for
    /// quorum (`suspend-io`; fails when the node stops being Primary or shuts down) or fails
    /// (`io-error`).
    pub(crate) async fn quorum_gate(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let q = &self.quorum;
        if q.has.load(Ordering::SeqCst) {
            return Ok(());
        }
        if q.on_no_quorum == OnNoQuorum::IoError {
            return Err(no_quorum_error(offset, len));
        }
        let mut quorum = q.changed.subscribe();
        let mut role = self.watch_role();
        let mut stop = self.stop_signal();
        loop {
            if *quorum.borrow_and_update() {
                return Ok(());
            }
            if *role.borrow_and_update() != Role::Primary || *stop.borrow_and_update() {
                return Err(stepped_down_error(offset, len));
            }
            tokio::select! {
                r = quorum.changed() => if r.is_err() { return Err(stepped_down_error(offset, len)) },
                r = role.changed() => if r.is_err() { return Err(stepped_down_error(offset, len)) },
                r = stop.changed() => if r.is_err() { return Err(stepped_down_error(offset, len)) },
            }
        }
    }

    /// The session with peer `i` is ending: it stops counting for quorum before its
    /// unacknowledged writes are released (so none of them completes on a quorum it no longer
    /// has).
    pub(crate) fn peer_leaving(&self, i: usize) {
        self.update_peer(i, |s| {
            if s.conn == ConnState::Connected {
                s.conn = ConnState::Connecting;
            }
        });
    }

    /// A Primary is losing a peer that may lack every write numbered from `missed_from` on (its
    /// lowest unconfirmed one, or the next number when none was pending): the `Stable` figure
    /// stays below it until the next generation is announced (see
    /// `repl::unstable::stable_below`). Called under the numbering lock while the session is
    /// still visible to [`Resource::announce_stable`], so no announcement misses both.
    pub(crate) fn hold_stable_for_lost_peer(&self, missed_from: u64) {
        let mut f = self.quorum.stable_floor.lock().expect("stable floor");
        f.below = Some(f.below.map_or(missed_from, |b| b.min(missed_from)));
        f.losses += 1;
    }

    /// The cap of the `Stable` figure, if a lost peer set one.
    pub(crate) fn stable_floor(&self) -> Option<u64> {
        self.quorum.stable_floor.lock().expect("stable floor").below
    }

    /// The peers lost so far (read before choosing who gets the next generation's `NewUuid`).
    pub(crate) fn stable_floor_losses(&self) -> u64 {
        self.quorum
            .stable_floor
            .lock()
            .expect("stable floor")
            .losses
    }

    /// The new generation was queued to every peer that follows it (`NewUuid`, in-stream before
    /// any later `Stable`): a survivor that misses it is behind by a generation, and writes a
    /// lost peer never got no longer need holding in the survivors' windows. `losses_before` is
    /// [`Self::stable_floor_losses`] from before the peers that follow were chosen: if a peer
    /// was lost since, its floor stays and a new generation is owed for it again.
    pub(crate) fn release_stable_floor(&self, losses_before: u64) {
        let mut f = self.quorum.stable_floor.lock().expect("stable floor");
        if f.losses == losses_before {
            f.below = None;
        } else {
            drop(f);
            self.quorum
                .new_current_pending
                .store(true, Ordering::SeqCst);
        }
    }

    /// A Primary lost a peer: the next write starts a new generation; until then it counts as
    /// a crashed Primary (its unacknowledged writes are only here).
    pub(crate) fn peer_lost_while_primary(&self) {
        self.quorum
            .new_current_pending
            .store(true, Ordering::SeqCst);
        self.state.lock().expect("state").crashed_primary = true;
    }

    /// Before a write: starts the new generation owed since a peer loss (persisted before the
    /// write proceeds), tells the peers in sync, and has peers in a handshake redo it.
    ///
    /// With quorum enabled the generation starts only once the peers still counted have
    /// confirmed, by a round trip *after* the loss, that they are alive and make a quorum
    /// ([`quorum::may_start_generation`]): a partition cuts several links at once but they time
    /// out one by one, and a generation started in between would exist on this node only (its
    /// `NewUuid` lost on a dead link, its write never acknowledged) and look like a split brain
    /// to the majority later. When the confirmation fails, the write goes back to the quorum
    /// gate (it waits or fails there once the loss is noticed) and the probe is repeated.
    pub(crate) async fn ensure_generation(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        loop {
            match self.start_owed_generation(offset, len).await? {
                GenerationStart::Started | GenerationStart::NotOwed => return Ok(()),
                GenerationStart::Unconfirmed => {
                    // Give the link-loss handling a moment, then pass the gate again.
                    let mut quorum = self.quorum.changed.subscribe();
                    let _ = tokio::time::timeout(UNCONFIRMED_RETRY, quorum.changed()).await;
                    self.quorum_gate(offset, len).await?;
                }
            }
        }
    }

    /// One attempt of [`Self::ensure_generation`].
    async fn start_owed_generation(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<GenerationStart, StoreError> {
        let q = &self.quorum;
        if !q.new_current_pending.load(Ordering::SeqCst) {
            return Ok(GenerationStart::NotOwed);
        }
        let _g = q.new_current_lock.lock().await;
        if !q.new_current_pending.load(Ordering::SeqCst) {
            return Ok(GenerationStart::NotOwed);
        }
        let losses = self.stable_floor_losses();
        let (mut in_sync, mut out_of_sync, mut reconnect) = {
            let st = self.state.lock().expect("state");
            let mut in_sync = Vec::new();
            let mut out_of_sync = Vec::new();
            let mut reconnect = Vec::new();
            for (i, (p, s)) in self.peers.iter().zip(&st.peers).enumerate() {
                // Connected peers that get every write (in sync, or our resync target, which
                // ends up with this generation) follow it; a peer in its handshake redoes it.
                let follows = s.conn == ConnState::Connected
                    && matches!(s.repl, ReplState::Established | ReplState::SyncSource);
                if follows {
                    in_sync.push(i);
                } else {
                    out_of_sync.push(p.node.id);
                    if s.conn != ConnState::Connected {
                        reconnect.push(i);
                    }
                }
            }
            (in_sync, out_of_sync, reconnect)
        };
        if q.setting != QuorumSetting::Off {
            let answered = self.probe_peers(&in_sync).await;
            let mask = answered.iter().fold(0u32, |m, &i| {
                m | 1u32
                    .checked_shl(u32::from(self.peers[i].node.id))
                    .unwrap_or(0)
            });
            if !quorum::may_start_generation(q.setting, q.me, q.members, mask) {
                tracing::info!(resource = %self.name(), answered = answered.len(),
                    counted = in_sync.len(),
                    "no new generation: the remaining peers did not confirm quorum");
                return Ok(GenerationStart::Unconfirmed);
            }
            // A peer that looks connected but did not answer does not follow: it tracks the
            // old generation and redoes its handshake.
            for i in in_sync.clone() {
                if !answered.contains(&i) {
                    in_sync.retain(|&j| j != i);
                    out_of_sync.push(self.peers[i].node.id);
                    reconnect.push(i);
                }
            }
        }
        let fresh = fresh_uuid();
        let current = self
            .meta_io(move |m| {
                m.sb.generations.new_current(fresh, true, &out_of_sync);
                m.sb.flags |= flags::PRIMARY;
                m.save_sb()?;
                Ok(m.sb.generations.current)
            })
            .await
            .map_err(|e| StoreError::Write {
                offset,
                len,
                source: std::io::Error::other(format!("replication metadata: {e}")),
            })?;
        q.new_current_pending.store(false, Ordering::SeqCst);
        for &i in &in_sync {
            if let Some(c) = self.peers[i].conn.lock().expect("conn").as_ref() {
                c.send(Message::NewUuid(current));
            }
        }
        self.release_stable_floor(losses);
        self.role_epoch.fetch_add(1, Ordering::SeqCst);
        for &i in &reconnect {
            if self.peers[i].conn.lock().expect("conn").is_some() {
                self.peers[i].kill.notify_one();
            }
        }
        tracing::info!(resource = %self.name(), %current, "new generation after a peer loss");
        Ok(GenerationStart::Started)
    }

    /// The quorum probe: a flush round trip to each peer in `peers` (indices), sent after the
    /// loss; returns the peers that answered. A dead link answers when its session ends (its
    /// flushes are dropped); [`PROBE_TIMEOUT`] bounds the wait in any case.
    async fn probe_peers(&self, peers: &[usize]) -> Vec<usize> {
        let mut waits = Vec::new();
        let seq = {
            let mut order = self.order.lock().expect("order");
            let (seq, _) = order.issue();
            for &i in peers {
                if let Some(c) = self.peers[i].conn.lock().expect("conn").as_ref()
                    && let Some(rx) = c.track_flush(seq, true)
                {
                    waits.push((i, rx));
                }
            }
            seq
        };
        let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
        let mut answered = Vec::new();
        for (i, rx) in waits {
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, rx).await {
                answered.push(i);
            }
        }
        self.completed(seq);
        answered
    }

    /// Before a demotion: the generation owed since a peer loss is started only if that peer
    /// has blocks to catch up on (writes it never acknowledged); otherwise nothing changed
    /// since it left and no new generation is needed (so a majority that promoted meanwhile
    /// finds this node simply behind, not split-brained). Without a confirmed quorum none is
    /// started either: nothing was acknowledged since the loss, and the majority (or the lost
    /// peer, which finds the marked blocks at the same generation) resyncs this node.
    pub(crate) async fn settle_generation(&self) -> Result<(), StoreError> {
        if !self.quorum.new_current_pending.load(Ordering::SeqCst) {
            return Ok(());
        }
        let owed = {
            let st = self.state.lock().expect("state");
            let m = self.meta.lock().expect("meta");
            self.peers
                .iter()
                .zip(&st.peers)
                .any(|(p, s)| s.conn != ConnState::Connected && m.bitmaps[p.slot].count_bits() > 0)
        };
        let quorate = self.quorum.has_quorum();
        if owed && quorate {
            match self.start_owed_generation(0, 0).await? {
                GenerationStart::Unconfirmed => self.generation_started(),
                GenerationStart::Started | GenerationStart::NotOwed => {}
            }
        } else {
            self.generation_started();
        }
        Ok(())
    }

    /// A new generation was started some other way (promotion): none is owed any more.
    pub(crate) fn generation_started(&self) {
        self.quorum
            .new_current_pending
            .store(false, Ordering::SeqCst);
    }

    /// A Primary without quorum found at a handshake that it is behind (a sync target): the
    /// majority went on without it. It becomes Secondary locally (its suspended I/O fails), so
    /// the resync can overwrite its disk. No flush is sent to peers (none is in sync).
    pub(crate) async fn step_down(&self, why: &str) {
        if self.role() != Role::Primary {
            return;
        }
        self.send_role(Role::Secondary);
        let gate = self.role_gate.write().await;
        self.state.lock().expect("state").role = Role::Secondary;
        drop(gate);
        if let Err(e) = self.store.flush().await {
            tracing::error!(resource = %self.name(), "flush while stepping down failed: {e}");
        }
        if let Err(e) = self.persist_not_primary().await {
            tracing::error!(resource = %self.name(), "cannot persist stepping down: {e}");
        }
        self.quorum
            .new_current_pending
            .store(false, Ordering::SeqCst);
        tracing::warn!(resource = %self.name(), "stepped down to Secondary: {why}");
        self.emit(None, "role", Role::Secondary.as_str());
        self.broadcast_state();
    }
}
