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
use std::time::Duration;

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
        }
    }
}

impl Resource {
    fn set_verify(&self, i: usize, v: VerifyStatus) {
        self.state.lock().expect("state").peers[i].verify = Some(v);
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

    /// `blockctl verify`: starts an online verify with `peer` (default: every connected peer).
    /// Returns once started; progress and the result are in [`Resource::status`].
    pub fn verify(self: &Arc<Self>, peer: Option<&str>) -> Result<Vec<String>, ResourceError> {
        let which = self.peers_named(peer)?;
        let me_primary = self.role() == Role::Primary;
        let mut started = Vec::new();
        let mut refusals = Vec::new();
        for i in which {
            let name = self.peers[i].node.name.clone();
            let (ps, conn) = {
                let st = self.state.lock().expect("state");
                (
                    st.peers[i].clone(),
                    self.peers[i].conn.lock().expect("conn").clone(),
                )
            };
            let refuse = if ps.conn != ConnState::Connected || conn.is_none() {
                Some(format!("{name} is not connected"))
            } else if ps.repl != ReplState::Established {
                Some(format!(
                    "{name} is {} (verify needs established replication)",
                    ps.repl
                ))
            } else if !me_primary && ps.role == Role::Primary {
                Some(format!(
                    "{name} is Primary: run verify there (its writes are ordered with the checksums)"
                ))
            } else if ps.verify.as_ref().is_some_and(|v| v.state == "running") {
                Some(format!("a verify with {name} is already running"))
            } else {
                None
            };
            match (refuse, conn) {
                (Some(why), _) => refusals.push(why),
                (None, Some(conn)) => {
                    let size = self.size();
                    let bs = {
                        let m = self.meta.lock().expect("meta");
                        m.bitmaps[self.peers[i].slot].block_size()
                    };
                    let tracker = ChecksumTracker::new(size, bs);
                    self.set_verify(i, VerifyStatus::new("running", tracker.report()));
                    let answers = conn.answers.open(ChecksumPurpose::Verify);
                    let me = self.clone();
                    tokio::spawn(async move { run_verify(me, i, conn, tracker, answers).await });
                    tracing::info!(resource = %self.name(), peer = %name, bytes = size,
                        "online verify started");
                    started.push(name);
                }
                (None, None) => unreachable!("checked above"),
            }
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
        self.meta_io(|m| {
            for b in m.bitmaps.iter_mut() {
                b.set_all();
            }
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
        if !self.state.lock().expect("state").disk.is_consistent() {
            return Err(ResourceError::Refused(
                "this node's data is not consistent: it cannot be a resync source".into(),
            ));
        }
        let mut asked = 0;
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
                Some(c) if ps.conn == ConnState::Connected => {
                    c.send(Message::Invalidate);
                    self.emit(Some(i), "invalidated", "remote");
                    asked += 1;
                }
                _ => {
                    return Err(ResourceError::Refused(format!("{name} is not connected")));
                }
            }
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
    let r: Result<(), String> = async {
        while pos < size || tracker.pending() > 0 {
            if *closed.borrow() {
                return Err("link closed".into());
            }
            while let Ok(a) = answers.try_recv() {
                on_answer(&res, slot, &mut tracker, a)?;
            }
            if last_status.elapsed() >= STATUS_EVERY {
                res.set_verify(i, VerifyStatus::new("running", tracker.report()));
                last_status = tokio::time::Instant::now();
            }
            if pos < size && tracker.pending_bytes() < VERIFY_WINDOW {
                let len = CHUNK.min(size - pos);
                // Answers are handled while waiting: they are the progress the pace follows.
                loop {
                    let (done, pending) = (tracker.report().done_bytes, tracker.pending_bytes());
                    tokio::select! {
                        () = pacer.admit(len, move || (done, pending)) => break,
                        a = answers.recv() => match a {
                            Some(a) => on_answer(&res, slot, &mut tracker, a)?,
                            None => return Err("link closed".into()),
                        },
                        _ = closed.changed() => return Err("link closed".into()),
                    }
                }
                csum_resync::ask_run(&res, &conn, &mut tracker, pos, len, ChecksumPurpose::Verify)
                    .await?;
                pos += len;
                continue;
            }
            tokio::select! {
                a = answers.recv() => match a {
                    Some(a) => on_answer(&res, slot, &mut tracker, a)?,
                    None => return Err("link closed".into()),
                },
                _ = closed.changed() => return Err("link closed".into()),
            }
        }
        Ok(())
    }
    .await;
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
                m.bitmaps[slot].set_range(o, l);
            }
        }
    }
    Ok(())
}
