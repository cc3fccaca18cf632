//! Checksum runs on a live link, and the checksum resync source.
//!
//! [`ask_run`] reads a run while holding its range (no application write in flight on it),
//! hashes it ([`checksum::digests`]), and sends `ChecksumRequest` numbered like a write that
//! completes at once: the peer hashes its copy after every earlier request and before every
//! later one, so both sides hash the same state of the data even while the application writes.
//! The peer's `ChecksumReply` comes back through [`AnswerRoutes`] to the worker that asked.
//!
//! [`run_source`] is the resync source used when the bitmap is untrusted (`csums`): it walks
//! the dirty bits like `repl::resync`, but for each run with data it asks for the peer's
//! checksum first. Equal runs are cleared without sending data; in a differing run only the
//! differing blocks are sent as `ResyncData`. Holes still go as zero ranges (no payload).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::repl::checksum::{
    self, ChecksumPurpose, ChecksumTracker, Csums, PeerAnswer, RunOutcome,
};
use crate::repl::pacer::Pacer;
use crate::repl::peer::{Conn, RESYNC_WINDOW};
use crate::repl::resource::{Resource, ResourceError, error_chain};
use crate::repl::resync::{self, CHUNK};
use crate::repl::wire::Message;

/// A peer's answer about one run.
#[derive(Debug)]
pub(crate) struct Answer {
    pub offset: u64,
    pub len: u64,
    pub answer: PeerAnswer,
}

/// Where a session delivers checksum answers: to the worker of each purpose, if one runs.
#[derive(Default)]
pub(crate) struct AnswerRoutes {
    verify: Mutex<Route>,
    resync: Mutex<Route>,
}

#[derive(Default)]
struct Route {
    tx: Option<mpsc::UnboundedSender<Answer>>,
    /// Answers still owed to a worker that gave up: dropped as they arrive, so a later worker
    /// of the same purpose never takes them for answers to its own requests.
    stale: u64,
}

impl AnswerRoutes {
    fn slot(&self, purpose: ChecksumPurpose) -> &Mutex<Route> {
        match purpose {
            ChecksumPurpose::Verify => &self.verify,
            ChecksumPurpose::Resync => &self.resync,
        }
    }

    /// Registers the worker of `purpose`; returns its receiver.
    pub fn open(&self, purpose: ChecksumPurpose) -> mpsc::UnboundedReceiver<Answer> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.slot(purpose).lock().expect("answer routes").tx = Some(tx);
        rx
    }

    /// The worker of `purpose` stops with `unanswered` requests outstanding (each is answered
    /// once, in stream order, while the session lives): their answers are dropped when they
    /// come, except those already waiting in `rx`.
    pub fn retire(
        &self,
        purpose: ChecksumPurpose,
        rx: &mut mpsc::UnboundedReceiver<Answer>,
        unanswered: usize,
    ) {
        let mut route = self.slot(purpose).lock().expect("answer routes");
        route.tx = None;
        // Nothing more enters `rx` now: what is in it was delivered already.
        let mut waiting = 0;
        while rx.try_recv().is_ok() {
            waiting += 1;
        }
        route.stale += (unanswered as u64).saturating_sub(waiting);
    }

    /// Delivers an answer; `false` when no worker asked (an unsolicited reply). Answers owed to
    /// a retired worker are dropped.
    pub fn deliver(&self, purpose: ChecksumPurpose, a: Answer) -> bool {
        let mut route = self.slot(purpose).lock().expect("answer routes");
        if route.stale > 0 {
            route.stale -= 1;
            return true;
        }
        match route.tx.as_ref() {
            Some(tx) => tx.send(a).is_ok(),
            None => false,
        }
    }
}

/// Reads and hashes `[offset, offset + len)` while holding the range, remembers the per-block
/// digests in `tracker` and asks the peer about the run (in stream order).
pub(crate) async fn ask_run(
    res: &Arc<Resource>,
    conn: &Conn,
    tracker: &mut ChecksumTracker,
    offset: u64,
    len: u64,
    purpose: ChecksumPurpose,
) -> Result<(), String> {
    let range = res.ranges.lock(offset, len).await;
    if purpose == ChecksumPurpose::Resync {
        // Runs found equal are cleared like acknowledged chunks.
        resync::reading(conn, offset, len);
    }
    let data = match res.store.read(offset, len as usize).await {
        Ok(d) => d.freeze(),
        // A resync hands a failure of its disk to the on-io-error policy like the plain one.
        Err(e) if purpose == ChecksumPurpose::Resync => {
            return Err(res.apply_failed(&format!("checksum resync read at {offset} failed"), &e));
        }
        Err(e) => return Err(format!("checksum read at {offset}: {}", error_chain(&e))),
    };
    let bs = tracker.block_size() as usize;
    let (digest, blocks) = tokio::task::spawn_blocking(move || checksum::digests(&data, bs))
        .await
        .map_err(|e| format!("checksum task failed: {e}"))?;
    tracker.asked(offset, len, blocks);
    {
        let mut order = res.order.lock().expect("order");
        let (seq, after) = order.issue();
        conn.send(Message::ChecksumRequest {
            seq,
            after,
            offset,
            len: len as u32,
            block_size: bs as u32,
            purpose,
            digest,
        });
        order.completed(seq);
    }
    drop(range);
    Ok(())
}

struct Walk {
    res: Arc<Resource>,
    i: usize,
    conn: Arc<Conn>,
    tracker: ChecksumTracker,
    /// Bytes sent as data (differing blocks and holes).
    data_bytes: u64,
    /// Bytes found equal (not sent).
    equal_bytes: u64,
}

impl Walk {
    async fn on_answer(&mut self, a: Answer) -> Result<(), String> {
        let outcome = self
            .tracker
            .answered(a.offset, a.len, a.answer)
            .map_err(|e| e.to_string())?;
        match outcome {
            RunOutcome::Equal { offset, len } => {
                self.equal_bytes += len;
                resync::acked(&self.res, self.i, &self.conn, offset, len as u32);
            }
            RunOutcome::Differ(cmp) => {
                for (o, l) in cmp.equal {
                    self.equal_bytes += l;
                    resync::acked(&self.res, self.i, &self.conn, o, l as u32);
                }
                for (o, l) in cmp.differ {
                    self.data_bytes += l;
                    resync::send_chunk(&self.res, &self.conn, o, l).await?;
                }
            }
        }
        Ok(())
    }
}

/// Runs a checksum resync towards peer `i` until every dirty block is equal or acknowledged,
/// then ends it like `repl::resync::run_source`. `Ok` also when the link closed; `Err` is a
/// local failure (a read, a checksum answer that does not fit, persisting the end) that must
/// end the session.
pub async fn run_source(res: Arc<Resource>, i: usize, conn: Arc<Conn>) -> Result<(), String> {
    let slot = res.peers[i].slot;
    let (total, bs) = {
        let m = res.meta.lock().expect("meta");
        (
            m.bitmaps[slot].count_dirty_bytes(),
            m.bitmaps[slot].block_size(),
        )
    };
    res.update_peer(i, |s| {
        s.resync_total = total;
        s.resync_done = 0;
        s.resync_started = Some(Instant::now());
    });
    tracing::info!(resource = %res.name(), peer = %res.peers[i].node.name, bytes = total,
        "checksum resync started (source)");
    let start = Instant::now();
    let mut answers = conn.answers.open(ChecksumPurpose::Resync);
    let mut closed = conn.closed.subscribe();
    let mut pacer = Pacer::new(res.clone(), res.spec.rate);
    let mut w = Walk {
        res: res.clone(),
        i,
        conn: conn.clone(),
        tracker: ChecksumTracker::new(total, bs),
        data_bytes: 0,
        equal_bytes: 0,
    };
    let window = conn.resync_window.clone();
    let progress = {
        let res = res.clone();
        let window = window.clone();
        move || {
            let done = res.state.lock().expect("state").peers[i].resync_done;
            (done, (RESYNC_WINDOW - window.available_permits()) as u64)
        }
    };
    let r: Result<(), String> = async {
        loop {
            let mut pos = 0;
            loop {
                if *closed.borrow() {
                    return Err("link closed".into());
                }
                while let Ok(a) = answers.try_recv() {
                    w.on_answer(a).await?;
                }
                let next =
                    res.meta.lock().expect("meta").bitmaps[slot].dirty_extent_from(pos, CHUNK);
                let Some((off, len)) = next else { break };
                // Answers are handled while waiting: they are what the controller counts as
                // progress (and what returns window space).
                loop {
                    tokio::select! {
                        () = pacer.admit(len, &progress) => break,
                        Some(a) = answers.recv() => w.on_answer(a).await?,
                        _ = closed.changed() => return Err("link closed".into()),
                    }
                }
                // Window space; answers return space, so keep handling them while waiting.
                let permits = loop {
                    tokio::select! {
                        p = window.clone().acquire_many_owned(len as u32) => {
                            break p.map_err(|_| "link closed".to_string())?;
                        }
                        Some(a) = answers.recv() => w.on_answer(a).await?,
                        _ = closed.changed() => return Err("link closed".into()),
                    }
                };
                permits.forget();
                if resync::is_hole(&res, off, len).await {
                    w.data_bytes += len;
                    resync::send_chunk(&res, &conn, off, len).await?;
                } else {
                    ask_run(
                        &res,
                        &conn,
                        &mut w.tracker,
                        off,
                        len,
                        ChecksumPurpose::Resync,
                    )
                    .await?;
                }
                pos = off + len;
            }
            // Wait until every run is answered and every block sent is acknowledged.
            loop {
                tokio::select! {
                    all = window.clone().acquire_many_owned(RESYNC_WINDOW as u32) => {
                        drop(all.map_err(|_| "link closed".to_string())?);
                        break;
                    }
                    Some(a) = answers.recv() => w.on_answer(a).await?,
                    _ = closed.changed() => return Err("link closed".into()),
                }
            }
            // Runs found equal and blocks written: cleared once durable on the target.
            if !resync::settle_acked(&res, i, &conn).await {
                return Err("link closed".into());
            }
            if res.meta.lock().expect("meta").bitmaps[slot]
                .dirty_extent_from(0, 1)
                .is_none()
            {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = r {
        if *closed.borrow() {
            // The session is over anyway; the next one resumes.
            tracing::info!(resource = %res.name(), peer = %res.peers[i].node.name,
                "checksum resync stopped: {e}");
            return Ok(());
        }
        return Err(e);
    }
    tracing::info!(resource = %res.name(), peer = %res.peers[i].node.name,
        equal = w.equal_bytes, sent = w.data_bytes,
        "checksum resync compared every dirty block");
    resync::finish_source(res, i, conn, w.data_bytes, start).await
}

impl Resource {
    /// Whether the resync this node is about to run as the source of peer `i` compares
    /// checksums: `csums = yes`, or `auto` with an untrusted bitmap (full sync, crashed
    /// primary), or a pending `blockctl connect --checksum` (used once).
    pub(crate) fn checksum_resync(&self, i: usize, untrusted: bool) -> bool {
        let requested =
            std::mem::take(&mut self.state.lock().expect("state").peers[i].checksum_next);
        match self.spec.csums {
            Csums::Yes => true,
            Csums::No => requested,
            Csums::Auto => untrusted || requested,
        }
    }

    /// `blockctl connect --checksum`: the next resync with `peer` (default: every peer)
    /// compares checksums first (`on = false` withdraws a pending request).
    pub fn request_checksum_resync(
        &self,
        peer: Option<&str>,
        on: bool,
    ) -> Result<(), ResourceError> {
        let which: Vec<usize> = match peer {
            Some(n) => vec![
                self.peers
                    .iter()
                    .position(|p| p.node.name == n)
                    .ok_or_else(|| ResourceError::UnknownPeer(n.to_string()))?,
            ],
            None => (0..self.peers.len()).collect(),
        };
        let mut st = self.state.lock().expect("state");
        for i in which {
            st.peers[i].checksum_next = on;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(offset: u64) -> Answer {
        Answer {
            offset,
            len: 4096,
            answer: PeerAnswer::Equal,
        }
    }

    #[test]
    fn answers_owed_to_a_retired_worker_never_reach_the_next_one() {
        let routes = AnswerRoutes::default();
        let mut rx = routes.open(ChecksumPurpose::Verify);
        // The first worker asked about five runs: one answer handled, two delivered and not
        // read when it gave up, two still to come.
        for at in 0..3 {
            assert!(routes.deliver(ChecksumPurpose::Verify, answer(at)));
        }
        assert_eq!(rx.try_recv().unwrap().offset, 0);
        routes.retire(ChecksumPurpose::Verify, &mut rx, 4);
        // A second worker asks about the same offsets again.
        let mut next = routes.open(ChecksumPurpose::Verify);
        for at in 3..5 {
            assert!(
                routes.deliver(ChecksumPurpose::Verify, answer(at)),
                "dropped"
            );
        }
        assert!(
            next.try_recv().is_err(),
            "an old answer reached the new worker"
        );
        assert!(routes.deliver(ChecksumPurpose::Verify, answer(0)));
        assert_eq!(next.try_recv().unwrap().offset, 0);
        // Other purposes are not affected.
        let mut resync = routes.open(ChecksumPurpose::Resync);
        assert!(routes.deliver(ChecksumPurpose::Resync, answer(9)));
        assert_eq!(resync.try_recv().unwrap().offset, 9);
    }
}
