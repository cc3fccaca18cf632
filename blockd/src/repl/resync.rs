//! The resync source: walks the live bitmap for a peer in bounded chunks, rate-limited, with a
//! window of unacknowledged bytes; each chunk is read while its range is held (so an
//! application write in flight finishes first and a later one waits until the chunk is
//! queued, behind a barrier: no stale block ever overwrites a newer write). Acknowledged
//! chunks are cleared from the bitmap once they are durable on the peer (a flush sent after
//! their acknowledgement was acknowledged, see [`settle_acked`]), and the bitmap is persisted
//! as the walk advances, so a crash of either side resumes from where it was rather than
//! restarting, and a power loss of the target never leaves a block cleared here that its
//! disk lost.
//!
//! A range marked out of sync for the peer again after its chunk was read (a write that did
//! not reach the peer, a pass-on local failure...) keeps its bits: the chunk's acknowledgement
//! and settle only clear what is still claimed (`repl::resync_claims`), and the next pass sends
//! it again.
//!
//! A local failure (a read of the source's disk, persisting the end of the resync) stops the
//! walk with an error: the session then ends (see `repl::peer`), so the resync is redone by
//! the next handshake instead of staying SyncSource/SyncTarget forever. A failure that persists
//! (a bad block read under `on-io-error = pass-on`) would make that a loop of sessions as fast
//! as the link comes back: after consecutive failed sessions that cleared nothing, the next
//! resync starts only after [`retry_delay`] (1 s, doubling, at most [`RETRY_MAX`]; reset by a
//! session that clears bits or completes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::repl::pacer::Pacer;
use crate::repl::peer::{Conn, RESYNC_WINDOW};
use crate::repl::resource::{Resource, error_chain};
use crate::repl::state::{DiskState, ReplState};
use crate::repl::wire::Message;

/// Largest resync message payload.
pub const CHUNK: u64 = 1 << 20;
/// Bitmap progress is persisted at least every this many bytes of walk.
const PERSIST_EVERY: u64 = 16 << 20;
/// Delay before the resync that follows one failed session.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest delay before a resync, however many sessions failed before.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Consecutive failed resync sessions after one more failed: `progressed` (it cleared bits from
/// the bitmap before failing) starts the count again.
pub fn failed_sessions_after(failed: u32, progressed: bool) -> u32 {
    if progressed {
        0
    } else {
        failed.saturating_add(1)
    }
}

/// How long a session waits before it starts its resync as the source, after `failed`
/// consecutive failed resync sessions: none after none, then [`RETRY_FIRST`], doubling with
/// each further one, at most [`RETRY_MAX`].
pub fn retry_delay(failed: u32) -> Duration {
    match failed {
        0 => Duration::ZERO,
        n => RETRY_FIRST
            .saturating_mul(1u32.checked_shl(n - 1).unwrap_or(u32::MAX))
            .min(RETRY_MAX),
    }
}

/// How long a session still waits before its resync as the source: until `not_before` (set
/// when the last one failed), nothing once that has passed or without a failure.
pub fn resync_wait(not_before: Option<Instant>, now: Instant) -> Duration {
    not_before.map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
}

/// Runs the resync towards peer `i` until every dirty block is acknowledged, then ends it.
/// `Ok` also when the link closed (the session is over); `Err` is a local failure that must
/// end the session: its text says why.
pub async fn run_source(res: Arc<Resource>, i: usize, conn: Arc<Conn>) -> Result<(), String> {
    let slot = res.peers[i].slot;
    let total = res.meta.lock().expect("meta").bitmaps[slot].count_dirty_bytes();
    res.update_peer(i, |s| {
        s.resync_total = total;
        s.resync_done = 0;
        s.resync_started = Some(Instant::now());
    });
    tracing::info!(resource = %res.name(), peer = %res.peers[i].node.name, bytes = total,
        "resync started (source)");
    let start = Instant::now();
    let mut sent = 0u64;
    let closed = conn.closed.subscribe();
    // Rate: `resync-rate` at most, backing off for application I/O (`repl::rate_control`).
    let mut pacer = Pacer::new(res.clone(), res.spec.rate);
    let progress = {
        let (res, window) = (res.clone(), conn.resync_window.clone());
        move || {
            let done = res.state.lock().expect("state").peers[i].resync_done;
            (done, (RESYNC_WINDOW - window.available_permits()) as u64)
        }
    };
    loop {
        let mut pos = 0;
        let mut persisted_to = 0;
        loop {
            if *closed.borrow() {
                return Ok(());
            }
            let next = res.meta.lock().expect("meta").bitmaps[slot].dirty_extent_from(pos, CHUNK);
            let Some((off, len)) = next else { break };
            pacer.admit(len, &progress).await;
            let Ok(permits) = conn.resync_window.acquire_many(len as u32).await else {
                return Ok(());
            };
            permits.forget();
            send_chunk(&res, &conn, off, len).await?;
            sent += len;
            pos = off + len;
            if pos - persisted_to >= PERSIST_EVERY {
                if !settle_acked(&res, i, &conn).await {
                    return Ok(());
                }
                let from = persisted_to;
                // Best effort: a failed save only loses how far a later resync resumes from
                // (the end of the resync persists the whole bitmap, and fails the session).
                if let Err(e) = res
                    .meta_io(move |m| m.save_bitmap_range(slot, from, pos - from))
                    .await
                {
                    tracing::warn!(resource = %res.name(), "cannot persist resync progress: {}",
                        error_chain(&e));
                }
                persisted_to = pos;
            }
        }
        // Wait for every chunk in flight to be acknowledged, then look again (bits that were
        // in flight, or set behind the walk).
        let Ok(all) = conn.resync_window.acquire_many(RESYNC_WINDOW as u32).await else {
            return Ok(());
        };
        drop(all);
        if *closed.borrow() || !settle_acked(&res, i, &conn).await {
            return Ok(());
        }
        if res.meta.lock().expect("meta").bitmaps[slot]
            .dirty_extent_from(0, 1)
            .is_none()
        {
            break;
        }
    }
    finish_source(res, i, conn, sent, start).await
}

/// Ends a resync as its source: `ResyncDone` (applied after every earlier request), the peer's
/// bitmap cleared and persisted, and this node UpToDate when it was Consistent. `Err` (the
/// end could not be persisted) must end the session.
pub(crate) async fn finish_source(
    res: Arc<Resource>,
    i: usize,
    conn: Arc<Conn>,
    sent: u64,
    start: Instant,
) -> Result<(), String> {
    let slot = res.peers[i].slot;
    let peer_id = res.peers[i].node.id;
    {
        let mut order = res.order.lock().expect("order");
        let (seq, _) = order.issue();
        conn.send(Message::ResyncDone { seq });
    }
    // The saved bitmap, empty unless a mark was made meanwhile, drops its repair-marks flag
    // (`MetaState::save_bitmap`), which the superblock then persists.
    let r = res
        .meta_io(move |m| {
            m.sb.generations.clear_bitmap(peer_id);
            m.save_bitmap(slot)?;
            m.save_sb()
        })
        .await;
    if let Err(e) = r {
        return Err(format!(
            "cannot persist the resync end: {}",
            error_chain(&e)
        ));
    }
    // The source's data is what the peer now holds: a Consistent source (e.g. a restarted
    // crashed primary) is UpToDate from here on.
    res.crashed_primary_settled().await;
    let now_up_to_date = {
        let mut st = res.state.lock().expect("state");
        let was = st.disk == DiskState::Consistent;
        if was {
            st.disk = DiskState::UpToDate;
        }
        was
    };
    if now_up_to_date {
        res.emit(None, "disk", DiskState::UpToDate.as_str());
        res.broadcast_state();
    }
    // The peer's disk becomes UpToDate when it says so (`PeerState`, sent once it applied
    // `ResyncDone` and persisted it), not before: a failover in between must not find a
    // "synced" peer that is still Inconsistent.
    res.update_peer(i, |s| {
        s.repl = ReplState::Established;
        s.resync_done = s.resync_total;
        s.resync_retry_reset();
    });
    tracing::info!(resource = %res.name(), peer = %res.peers[i].node.name, bytes = sent,
        secs = start.elapsed().as_secs_f64(), "resync finished (source)");
    res.emit(Some(i), "resync-done", "source");
    Ok(())
}

/// Sends `[offset, offset + len)` as resync data, read while holding the range and claimed
/// before the read ([`reading`]); a hole goes as a zero range. Its `ResyncAck` returns the
/// window space, and a later settle clears the bits. `Err`: the local read failed (the
/// on-io-error policy has decided about the disk: detach, or pass-on).
pub(crate) async fn send_chunk(
    res: &Arc<Resource>,
    conn: &Conn,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    let range = res.ranges.lock(offset, len).await;
    reading(conn, offset, len);
    let zero = is_hole(res, offset, len).await;
    let payload = if zero {
        Bytes::new()
    } else {
        res.store
            .read(offset, len as usize)
            .await
            .map_err(|e| res.apply_failed("resync read failed", &e))?
            .freeze()
    };
    {
        // Numbered like a write that completes now: application writes issued later are
        // applied after this chunk on the target.
        let mut order = res.order.lock().expect("order");
        let (seq, after) = order.issue();
        conn.send(Message::ResyncData {
            seq,
            after,
            offset,
            len: len as u32,
            zero,
            payload,
        });
        order.completed(seq);
    }
    drop(range);
    Ok(())
}

/// Whether `[offset, offset + len)` reads as zeroes on this node without reading it.
pub(crate) async fn is_hole(res: &Resource, offset: u64, len: u64) -> bool {
    matches!(res.store.block_status(offset, len).await.as_deref(),
        Ok([e, ..]) if e.zero && e.length >= len)
}

/// A chunk's read is about to start, its range held: its bits may be cleared once the target
/// acknowledged it and a later flush, unless the range is marked out of sync again first (see
/// `repl::resync_claims`). Called before every read whose acknowledgement clears bits.
pub(crate) fn reading(conn: &Conn, offset: u64, len: u64) {
    conn.resync_claims
        .lock()
        .expect("resync claims")
        .reading(offset, len);
}

/// The target wrote a chunk (or found it equal): return its window space, count progress. Its
/// bits are cleared by the next [`settle_acked`], once the target's disk holds it for sure
/// (the part of it not marked out of sync again since its read).
pub(crate) fn acked(res: &Resource, i: usize, conn: &Conn, offset: u64, len: u32) {
    conn.resync_claims
        .lock()
        .expect("resync claims")
        .acked(offset, u64::from(len));
    conn.resync_window.add_permits(len as usize);
    res.state.lock().expect("state").peers[i].resync_done += u64::from(len);
}

/// Makes the resync ranges acknowledged so far durable on the target, then clears them from the
/// bitmap: a `Flush` numbered after them (the target applies it once every earlier request is
/// done, then flushes its store) and its `FlushAck`. The target writes resync data without
/// FUA; without this, a bitmap persisted with those bits cleared (here, or at the end of the
/// session) would outlive blocks a power loss of the target took back. `false`: the link
/// closed first (nothing cleared: the next session sends those blocks again).
pub(crate) async fn settle_acked(res: &Resource, i: usize, conn: &Conn) -> bool {
    // The ranges stay listed until cleared (status counts them as in sync meanwhile); those
    // acknowledged after the flush is sent wait for the next one.
    let point = {
        let claims = conn.resync_claims.lock().expect("resync claims");
        if !claims.has_acked() {
            return true;
        }
        claims.flush_point()
    };
    let (seq, ack) = {
        let mut order = res.order.lock().expect("order");
        let (seq, _) = order.issue();
        (seq, conn.track_flush(seq, true))
    };
    let flushed = match ack {
        Some(rx) => rx.await.is_ok(),
        None => false,
    };
    res.completed(seq);
    if !flushed {
        return false;
    }
    let slot = res.peers[i].slot;
    // Under the metadata lock, like every mark: a range marked since its read is no longer
    // listed (`Resource::mark_out_of_sync`).
    let mut m = res.meta.lock().expect("meta");
    let settled = conn
        .resync_claims
        .lock()
        .expect("resync claims")
        .settle(point);
    let progressed = !settled.is_empty();
    for (offset, len) in settled {
        m.bitmaps[slot].clear_range(offset, len);
    }
    drop(m);
    if progressed {
        // The resync moves: a later failure starts the count of failed sessions again.
        res.state.lock().expect("state").peers[i].resync_retry_reset();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_delay_doubles_up_to_its_bound() {
        let secs = |n| retry_delay(n).as_secs();
        assert_eq!(retry_delay(0), Duration::ZERO, "no failure: at once");
        assert_eq!(
            (1..=8).map(secs).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 60, 60]
        );
        assert_eq!(retry_delay(31), RETRY_MAX);
        assert_eq!(retry_delay(32), RETRY_MAX, "no overflow");
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn failed_sessions_count_up_until_one_progresses() {
        let mut failed = 0;
        for expect in 1..=3 {
            failed = failed_sessions_after(failed, false);
            assert_eq!(failed, expect);
        }
        assert_eq!(retry_delay(failed), Duration::from_secs(4));
        assert_eq!(failed_sessions_after(failed, true), 0, "cleared bits first");
        assert_eq!(failed_sessions_after(u32::MAX, false), u32::MAX);
    }

    #[test]
    fn a_session_waits_only_for_the_rest_of_the_delay() {
        let failed_at = Instant::now();
        let not_before = Some(failed_at + retry_delay(3));
        assert_eq!(resync_wait(None, failed_at), Duration::ZERO, "no failure");
        assert_eq!(resync_wait(not_before, failed_at), Duration::from_secs(4));
        // A session that started after a link drop 3 s into the wait waits 1 s more.
        let later = failed_at + Duration::from_secs(3);
        assert_eq!(resync_wait(not_before, later), Duration::from_secs(1));
        let past = failed_at + Duration::from_secs(60);
        assert_eq!(resync_wait(not_before, past), Duration::ZERO);
    }
}
