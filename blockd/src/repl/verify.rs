//! Online verify and invalidation of a resource (`blockctl verify`, `invalidate`,
//! `invalidate-remote`).
//!
//! Verify walks the whole device in runs of [`CHUNK`] with a peer, while the device is in use:
//! each run is read and hashed while its range is held and the peer hashes its copy at the same
//! point of the replication stream ([`csum_resync::ask_run`]), so writes in flight never show up
//! as differences. Blocks that differ are set in the peer's bitmap (a reconnect resyncs them),
//! counted and listed in `status` (progress while running) and in a `verify-done` event.
//! Verify runs on the node whose writes the stream carries: the Primary, or either node when
//! neither is Primary.
//!
//! Invalidate marks this node's data Inconsistent with every block out of sync and reconnects:
//! the handshake then makes it the sync target of a full resync from an UpToDate peer.
//! Invalidate-remote asks a peer to do that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::meta::superblock::flags;
use crate::repl::checksum::{ChecksumPurpose, ChecksumReport, ChecksumTracker, RunOutcome};
use crate::repl::csum_resync::{self, Answer};
use crate::repl::pacer::Pacer;
use crate::repl::peer::Conn;
use crate::repl::resource::{Resource, ResourceError};
use crate::repl::resync::CHUNK;
use crate::repl::state::{ConnState, DiskState, ReplState, Role};
use crate::repl::wire::Message;

/// Bytes asked about and not answered yet, at most.
const VERIFY_WINDOW: u64 = 8 << 20;
/// How often the status is refreshed while a verify runs.
const STATUS_EVERY: Duration = Duration::from_millis(200);
/// A verify that makes no progress (no answer, no request sent) for this long is aborted (the
/// peer hashes a run after every earlier replicated request: a long backlog of writes to apply
/// delays it, nothing else should).
pub const VERIFY_STALL: Duration = Duration::from_secs(30);
/// How long a verify waits for a resyncing peer before it gives up.
pub const VERIFY_QUEUE_LIMIT: Duration = Duration::from_secs(600);
/// How often a queued verify looks at the peer's state again.
const QUEUE_POLL: Duration = Duration::from_millis(100);

/// What a verify request knows about one peer (and this node) when it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerReadiness {
    /// The peer's link is up (connected, with a live session).
    pub linked: bool,
    pub repl: ReplState,
    pub role: Role,
    pub disk: DiskState,
    /// A verify with this peer is running already.
    pub verify_running: bool,
    /// This node is Primary.
    pub me_primary: bool,
    /// This node's disk.
    pub my_disk: DiskState,
}

/// What to do about one peer of a verify request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyPlan {
    /// Verify now.
    Start,
    /// The data is being resynced (here or on the peer): verify once that is done (queued; the
    /// reason shows in status).
    Wait(String),
    /// Not possible with this peer (the reason is reported).
    Refuse(String),
}

/// Decides whether a verify with peer `name` may start now, must wait for a resync, or is
/// refused. Pure: the runtime calls it when asked, and again while a queued verify waits.
pub fn plan(name: &str, p: &PeerReadiness) -> VerifyPlan {
    let resyncing = matches!(
        p.repl,
        ReplState::WfBitmapS
            | ReplState::WfBitmapT
            | ReplState::SyncSource
            | ReplState::SyncTarget
            | ReplState::PausedSyncS
            | ReplState::PausedSyncT
    );
    if !p.linked {
        VerifyPlan::Refuse(format!("{name} is not connected"))
    } else if p.verify_running {
        VerifyPlan::Refuse(format!("a verify with {name} is already running"))
    } else if !p.me_primary && p.role == Role::Primary {
        VerifyPlan::Refuse(format!(
            "{name} is Primary: run verify there (its writes are ordered with the checksums)"
        ))
    } else if resyncing {
        VerifyPlan::Wait(format!(
            "{name} is resyncing with this node ({}): verify starts when it is done",
            p.repl
        ))
    } else if p.repl != ReplState::Established {
        VerifyPlan::Refuse(format!(
            "{name} is {} (verify needs established replication)",
            p.repl
        ))
    } else if p.disk == DiskState::Inconsistent {
        VerifyPlan::Wait(format!(
            "{name} is resyncing from another node (its disk is inconsistent): verify starts \
             when it is done"
        ))
    } else if p.my_disk == DiskState::Inconsistent {
        VerifyPlan::Wait(
            "this node is resyncing (its disk is inconsistent): verify starts when it is done"
                .to_string(),
        )
    } else {
        VerifyPlan::Start
    }
}

/// What the verify walk does next, decided after the answers that arrived were handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkStep {
    /// Every run was asked about and answered: the verify is done.
    Done,
    /// Ask about the next run, `len` bytes at the walk's position (once the pacing admits it).
    Ask(u64),
    /// Wait for an answer: the window is full, or every run was asked about.
    Wait,
}

/// The next step of a walk at `pos` over `size` bytes with `pending_runs` runs
/// (`pending_bytes` bytes) asked about and not answered. Pure; called after every batch of
/// answers, so the last answer ends the walk however it arrived.
pub fn next_step(pos: u64, size: u64, pending_runs: usize, pending_bytes: u64) -> WalkStep {
    if pos >= size {
        if pending_runs == 0 {
            WalkStep::Done
        } else {
            WalkStep::Wait
        }
    } else if pending_bytes < VERIFY_WINDOW {
        WalkStep::Ask(CHUNK.min(size - pos))
    } else {
        WalkStep::Wait
    }
}

/// Whether a verify whose last progress (an answer, or a request sent) was at `last_progress`
/// has stalled at `now`: neither side moved for [`VERIFY_STALL`].
pub fn stalled(last_progress: Instant, now: Instant) -> bool {
    now.saturating_duration_since(last_progress) >= VERIFY_STALL
}

/// Verify progress and result towards one peer (`blockctl status`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VerifyStatus {
    /// `running`, `done` or `aborted` (the link dropped or a read failed).
    pub state: String,
    pub percent: f64,
    #[serde(flatten)]
    pub report: ChecksumReport,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Queued: why it has not started yet (a resync in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

impl VerifyStatus {
    fn new(state: &str, report: ChecksumReport) -> VerifyStatus {
        let percent = if report.total_bytes == 0 {
            100.0
        } else {
            (report.done_bytes as f64 * 1000.0 / report.total_bytes as f64).round() / 10.0
        };
        VerifyStatus {
            state: state.to_string(),
            percent,
            report,
            error: None,
            waiting: None,
        }
    }
}

impl Resource {
    fn set_verify(&self, i: usize, v: VerifyStatus) {
        self.state.lock().expect("state").peers[i].verify = Some(v);
    }

    /// Records `v` as peer `i`'s verify unless one is running: the check and the claim under
    /// one lock, so two requests at once start one verify.
    fn claim_verify(&self, i: usize, v: VerifyStatus) -> bool {
        let mut st = self.state.lock().expect("state");
        let slot = &mut st.peers[i].verify;
        if slot.as_ref().is_some_and(|v| v.state == "running") {
            return false;
        }
        *slot = Some(v);
        true
    }

    fn peers_named(&self, peer: Option<&str>) -> Result<Vec<usize>, ResourceError> {
        match peer {
            Some(n) => self
                .peers
                .iter()
                .position(|p| p.node.name == n)
                .map(|i| vec![i])
                .ok_or_else(|| ResourceError::UnknownPeer(n.to_string())),
            None => Ok((0..self.peers.len()).collect()),
        }
    }

    /// What verify needs to know about peer `i` and this node now.
    fn readiness(&self, i: usize, verify_running: bool) -> (PeerReadiness, Option<Arc<Conn>>) {
        let me_primary = self.role() == Role::Primary;
        let st = self.state.lock().expect("state");
        let ps = &st.peers[i];
        let conn = self.peers[i].conn.lock().expect("conn").clone();
        let r = PeerReadiness {
            linked: ps.conn == ConnState::Connected && conn.is_some(),
            repl: ps.repl,
            role: ps.role,
            disk: ps.disk,
            verify_running: verify_running
                && ps.verify.as_ref().is_some_and(|v| v.state == "running"),
            me_primary,
            my_disk: st.disk,
        };
        (r, conn)
    }

    /// `blockctl verify`: starts an online verify with `peer` (default: every connected peer).
    /// A peer that is resyncing gets a queued verify that starts once the resync is done.
    /// Returns once started; progress and the result are in [`Resource::status`].
    pub fn verify(self: &Arc<Self>, peer: Option<&str>) -> Result<Vec<String>, ResourceError> {
        let which = self.peers_named(peer)?;
        let mut started = Vec::new();
        let mut refusals = Vec::new();
        for i in which {
            let name = self.peers[i].node.name.clone();
            let (readiness, conn) = self.readiness(i, true);
            let (waiting, conn) = match (plan(&name, &readiness), conn) {
                (VerifyPlan::Start, Some(conn)) => (None, conn),
                (VerifyPlan::Wait(why), Some(conn)) => (Some(why), conn),
                (VerifyPlan::Refuse(why), _) => {
                    refusals.push(why);
                    continue;
                }
                // `linked` needs a session: refused above.
                (_, None) => {
                    refusals.push(format!("{name} is not connected"));
                    continue;
                }
            };
            let size = self.size();
            let bs = {
                let m = self.meta.lock().expect("meta");
                m.bitmaps[self.peers[i].slot].block_size()
            };
            let tracker = ChecksumTracker::new(size, bs);
            let mut v = VerifyStatus::new("running", tracker.report());
            v.waiting = waiting.clone();
            if !self.claim_verify(i, v) {
                // Another request started one since the check above.
                refusals.push(format!("a verify with {name} is already running"));
                continue;
            }
            let answers = conn.answers.open(ChecksumPurpose::Verify);
            let me = self.clone();
            tokio::spawn(async move { run_verify(me, i, conn, tracker, answers).await });
            match &waiting {
                None => tracing::info!(resource = %self.name(), peer = %name, bytes = size,
                    "online verify started"),
                Some(why) => tracing::info!(resource = %self.name(), peer = %name,
                    bytes = size, "online verify queued: {why}"),
            }
            started.push(name);
        }
        for why in &refusals {
            tracing::info!(resource = %self.name(), "online verify skipped: {why}");
        }
        if started.is_empty() {
            return Err(ResourceError::Refused(if refusals.is_empty() {
                "no peer to verify with".into()
            } else {
                refusals.join("; ")
            }));
        }
        Ok(started)
    }

    /// `blockctl invalidate`: discards this node's data; a full resync from an UpToDate peer
    /// follows.
    pub async fn invalidate(&self) -> Result<(), ResourceError> {
        if self.role() == Role::Primary {
            return Err(ResourceError::Refused(
                "this node is Primary: its data is in use (demote first)".into(),
            ));
        }
        let source = {
            let st = self.state.lock().expect("state");
            st.peers
                .iter()
                .any(|p| p.conn == ConnState::Connected && p.disk == DiskState::UpToDate)
        };
        if !source {
            return Err(ResourceError::Refused(
                "no connected UpToDate peer to resync from".into(),
            ));
        }
        {
            // Withdrawn from a resync this node runs as a source (its data is discarded).
            let mut m = self.meta.lock().expect("meta");
            for slot in 0..m.bitmaps.len() {
                self.mark_out_of_sync(&mut m, slot, 0, u64::MAX);
            }
        }
        self.meta_io(|m| {
            for slot in 0..m.bitmaps.len() {
                m.save_bitmap(slot)?;
            }
            m.sb.flags &= !flags::CONSISTENT;
            m.save_sb()
        })
        .await
        .map_err(ResourceError::MetaUpdate)?;
        self.set_disk(DiskState::Inconsistent);
        tracing::warn!(resource = %self.name(), "invalidated: local data discarded, full resync follows");
        self.emit(None, "invalidated", "local");
        // Reconnect every link: the handshake makes this node the sync target.
        for p in &self.peers {
            if p.conn.lock().expect("conn").is_some() {
                p.kill.notify_one();
            }
        }
        Ok(())
    }

    /// `blockctl invalidate-remote`: asks `peer` (default: every connected peer) to discard its
    /// data and resync it from here.
    pub fn invalidate_remote(&self, peer: Option<&str>) -> Result<(), ResourceError> {
        let which = self.peers_named(peer)?;
        // The peers resync from this node: only the newest data will do (an Outdated disk is
        // consistent, but older than the Primary's).
        let disk = self.state.lock().expect("state").disk;
        if disk != DiskState::UpToDate {
            return Err(ResourceError::Refused(format!(
                "this node's disk is {disk}, not up-to-date: it cannot be the resync source"
            )));
        }
        // Every named peer is checked before any is asked: all or none.
        let mut targets = Vec::new();
        for i in which {
            let ps = self.state.lock().expect("state").peers[i].clone();
            let name = &self.peers[i].node.name;
            if ps.role == Role::Primary {
                return Err(ResourceError::Refused(format!(
                    "{name} is Primary: its data is in use"
                )));
            }
            let conn = self.peers[i].conn.lock().expect("conn").clone();
            match conn {
                Some(c) if ps.conn == ConnState::Connected => targets.push((i, c)),
                _ => {
                    return Err(ResourceError::Refused(format!("{name} is not connected")));
                }
            }
        }
        let mut asked = 0;
        for (i, c) in targets {
            c.send(Message::Invalidate);
            self.emit(Some(i), "invalidated", "remote");
            asked += 1;
        }
        if asked == 0 {
            return Err(ResourceError::Refused("no peer to invalidate".into()));
        }
        Ok(())
    }
}

async fn run_verify(
    res: Arc<Resource>,
    i: usize,
    conn: Arc<Conn>,
    mut tracker: ChecksumTracker,
    mut answers: tokio::sync::mpsc::UnboundedReceiver<Answer>,
) {
    let slot = res.peers[i].slot;
    let size = res.size();
    let mut closed = conn.closed.subscribe();
    let mut pacer = Pacer::new(res.clone(), res.spec.rate);
    let mut pos = 0u64;
    let mut last_status = tokio::time::Instant::now();
    let started = std::time::Instant::now();
    let peer_name = res.peers[i].node.name.clone();
    let r: Result<(), String> = async {
        wait_until_ready(&res, i, &peer_name, &mut closed).await?;
        // The last answer, or the first request sent while none was outstanding.
        let mut progress = tokio::time::Instant::now();
        let stall = |pending: usize| {
            if pending > 0 {
                format!(
                    "{peer_name} answered none of {pending} outstanding checksum requests for \
                     {} s: verify aborted",
                    VERIFY_STALL.as_secs()
                )
            } else {
                format!(
                    "no checksum request to {peer_name} was admitted by the pacing for {} s \
                     (none outstanding): verify aborted",
                    VERIFY_STALL.as_secs()
                )
            }
        };
        loop {
            if *closed.borrow() {
                return Err("link closed".into());
            }
            while let Ok(a) = answers.try_recv() {
                on_answer(&res, slot, &mut tracker, a)?;
                progress = tokio::time::Instant::now();
            }
            let now = tokio::time::Instant::now();
            if stalled(progress.into_std(), now.into_std()) {
                return Err(stall(tracker.pending()));
            }
            if last_status.elapsed() >= STATUS_EVERY {
                res.set_verify(i, VerifyStatus::new("running", tracker.report()));
                last_status = tokio::time::Instant::now();
            }
            let ask = match next_step(pos, size, tracker.pending(), tracker.pending_bytes()) {
                WalkStep::Done => break,
                WalkStep::Ask(len) => Some(len),
                WalkStep::Wait => None,
            };
            // Wait for the pace to admit the next run (when there is one to ask) or for an
            // answer: answers are the progress the pace follows, and the walk decides again
            // after each.
            let done = tracker.report().done_bytes;
            let pending = tracker.pending_bytes();
            let stalls_at = progress + VERIFY_STALL;
            let admitted = tokio::select! {
                () = pacer.admit(ask.unwrap_or(0), move || (done, pending)), if ask.is_some() => {
                    true
                }
                a = answers.recv() => match a {
                    Some(a) => {
                        on_answer(&res, slot, &mut tracker, a)?;
                        progress = tokio::time::Instant::now();
                        false
                    }
                    None => return Err("link closed".into()),
                },
                _ = closed.changed() => return Err("link closed".into()),
                () = tokio::time::sleep_until(stalls_at) => return Err(stall(tracker.pending())),
            };
            let Some(len) = ask.filter(|_| admitted) else {
                continue;
            };
            // Holding the range, reading and hashing it: bounded too (a stuck local read would
            // hold the range and the verify forever).
            let ask =
                csum_resync::ask_run(&res, &conn, &mut tracker, pos, len, ChecksumPurpose::Verify);
            match tokio::time::timeout(VERIFY_STALL, ask).await {
                Ok(r) => {
                    r?;
                    progress = tokio::time::Instant::now();
                }
                Err(_) => {
                    return Err(format!(
                        "reading and hashing the run at {pos} ({len} bytes) took over {} s: \
                         verify aborted",
                        VERIFY_STALL.as_secs()
                    ));
                }
            }
            pos += len;
        }
        Ok(())
    }
    .await;
    // Requests still unanswered are answered later on this session: not to the next verify.
    conn.answers
        .retire(ChecksumPurpose::Verify, &mut answers, tracker.pending());
    let report = tracker.report();
    let peer = &res.peers[i].node.name;
    match r {
        Ok(()) => {
            if report.differing_blocks > 0 {
                let saved = res.meta_io(move |m| m.save_bitmap(slot)).await;
                if let Err(e) = saved {
                    tracing::error!(resource = %res.name(), "cannot persist the bitmap: {e}");
                }
            }
            let summary = report.summary();
            tracing::info!(resource = %res.name(), %peer,
                secs = started.elapsed().as_secs_f64(), "online verify done: {summary}");
            res.set_verify(i, VerifyStatus::new("done", report));
            res.emit(Some(i), "verify-done", summary);
        }
        Err(e) => {
            tracing::warn!(resource = %res.name(), %peer, "online verify aborted: {e}");
            let mut v = VerifyStatus::new("aborted", report);
            v.error = Some(e.clone());
            res.set_verify(i, v);
            res.emit(Some(i), "verify-aborted", e);
        }
    }
}

/// A queued verify: waits until [`plan`] lets it start (the resync it waits for ended), for at
/// most [`VERIFY_QUEUE_LIMIT`]. `Err` when it is refused meanwhile or the link closes.
async fn wait_until_ready(
    res: &Resource,
    i: usize,
    name: &str,
    closed: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + VERIFY_QUEUE_LIMIT;
    let mut queued = false;
    loop {
        if *closed.borrow() {
            return Err("link closed".into());
        }
        match plan(name, &res.readiness(i, false).0) {
            VerifyPlan::Start => {
                if queued {
                    tracing::info!(resource = %res.name(), peer = %name,
                        "online verify started (it was queued)");
                }
                return Ok(());
            }
            VerifyPlan::Refuse(why) => return Err(why),
            VerifyPlan::Wait(why) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "{why}; not done after {} s",
                        VERIFY_QUEUE_LIMIT.as_secs()
                    ));
                }
                queued = true;
            }
        }
        tokio::select! {
            c = closed.changed() => if c.is_err() {
                return Err("link closed".into());
            },
            () = tokio::time::sleep(QUEUE_POLL) => {}
        }
    }
}

/// Marks the differing blocks of an answered run out of sync for the peer.
fn on_answer(
    res: &Resource,
    slot: usize,
    tracker: &mut ChecksumTracker,
    a: Answer,
) -> Result<(), String> {
    match tracker
        .answered(a.offset, a.len, a.answer)
        .map_err(|e| e.to_string())?
    {
        RunOutcome::Equal { .. } => {}
        RunOutcome::Differ(cmp) => {
            let mut m = res.meta.lock().expect("meta");
            for (o, l) in cmp.differ {
                res.mark_for_repair(&mut m, slot, o, l);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> PeerReadiness {
        PeerReadiness {
            linked: true,
            repl: ReplState::Established,
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            verify_running: false,
            me_primary: true,
            my_disk: DiskState::UpToDate,
        }
    }

    #[test]
    fn the_walk_ends_when_the_last_answer_is_in_however_it_arrived() {
        let size = 3 * CHUNK + 100;
        // Every run asked about: wait while any is unanswered, done at the last answer (the
        // walk used to wait for one more answer when the last one was already handled, and
        // aborted after VERIFY_STALL).
        assert_eq!(next_step(size, size, 1, CHUNK), WalkStep::Wait);
        assert_eq!(next_step(size, size, 0, 0), WalkStep::Done);
        // Runs left: ask while the window has room, the last one short.
        assert_eq!(next_step(0, size, 0, 0), WalkStep::Ask(CHUNK));
        assert_eq!(next_step(3 * CHUNK, size, 2, 2 * CHUNK), WalkStep::Ask(100));
        assert_eq!(
            next_step(CHUNK, size, 9, VERIFY_WINDOW),
            WalkStep::Wait,
            "a full window waits for answers"
        );
        assert_eq!(next_step(0, 0, 0, 0), WalkStep::Done);
    }

    #[test]
    fn an_established_up_to_date_peer_starts_at_once() {
        assert_eq!(plan("n0", &ready()), VerifyPlan::Start);
        // Neither Primary: either node may verify.
        let p = PeerReadiness {
            me_primary: false,
            ..ready()
        };
        assert_eq!(plan("n0", &p), VerifyPlan::Start);
    }

    #[test]
    fn a_resyncing_peer_is_queued_with_the_reason() {
        for repl in [
            ReplState::WfBitmapS,
            ReplState::WfBitmapT,
            ReplState::SyncSource,
            ReplState::SyncTarget,
            ReplState::PausedSyncS,
            ReplState::PausedSyncT,
        ] {
            let p = PeerReadiness { repl, ..ready() };
            match plan("n0", &p) {
                VerifyPlan::Wait(why) => {
                    assert!(why.contains("n0 is resyncing"), "{why}");
                    assert!(why.contains(repl.as_str()), "{why}");
                }
                other => panic!("{repl}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_peer_resyncing_from_a_third_node_is_queued() {
        // The case of the hang: n0 established with this node but Inconsistent because it is
        // the target of another node's resync.
        let p = PeerReadiness {
            disk: DiskState::Inconsistent,
            ..ready()
        };
        assert!(matches!(plan("n0", &p), VerifyPlan::Wait(w) if w.contains("from another node")));
        let me = PeerReadiness {
            my_disk: DiskState::Inconsistent,
            ..ready()
        };
        assert!(matches!(plan("n0", &me), VerifyPlan::Wait(w) if w.contains("this node")));
    }

    #[test]
    fn refusals_name_the_peer_and_the_reason() {
        let cases = [
            (
                PeerReadiness {
                    linked: false,
                    ..ready()
                },
                "n0 is not connected",
            ),
            (
                PeerReadiness {
                    verify_running: true,
                    ..ready()
                },
                "already running",
            ),
            (
                PeerReadiness {
                    me_primary: false,
                    role: Role::Primary,
                    ..ready()
                },
                "n0 is Primary",
            ),
            (
                PeerReadiness {
                    repl: ReplState::Off,
                    ..ready()
                },
                "needs established replication",
            ),
        ];
        for (p, want) in cases {
            match plan("n0", &p) {
                VerifyPlan::Refuse(why) => assert!(why.contains(want), "{why} / {want}"),
                other => panic!("{p:?}: {other:?}"),
            }
        }
        // Not connected wins over everything else (nothing to wait for).
        let p = PeerReadiness {
            linked: false,
            repl: ReplState::SyncTarget,
            ..ready()
        };
        assert!(matches!(plan("n0", &p), VerifyPlan::Refuse(_)));
    }

    #[test]
    fn a_verify_stalls_when_nothing_moved_for_the_whole_limit() {
        let t0 = Instant::now();
        assert!(!stalled(t0, t0));
        assert!(!stalled(t0, t0 + VERIFY_STALL - Duration::from_millis(1)));
        assert!(stalled(t0, t0 + VERIFY_STALL));
        // `now` before the last progress (another clock reading order) is no stall.
        assert!(!stalled(t0 + VERIFY_STALL, t0));
    }
}
