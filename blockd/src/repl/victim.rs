//! The split-brain victim's side of a resolved split brain: before the resync overwrites
//! anything, save every block the resync will rewrite (the combined bitmap for the peer,
//! after the bitmap exchange), as it is on this disk, to the side file
//! ([`super::divergent`]), made durable first. Also the names of split-brain resolutions used
//! in events, logs and the side file.

use std::sync::Arc;

use crate::repl::divergent::{self, MAX_BLOCK, SessionHeader, SessionWriter};
use crate::repl::resource::{Resource, error_chain};
use crate::repl::split_brain::{Resolution, ResolvedBy, Verdict};

/// The kebab-case name of how a split brain was resolved.
pub fn resolved_by_name(by: ResolvedBy) -> &'static str {
    match by {
        ResolvedBy::Manual => "manual",
        ResolvedBy::ManualConflict => "manual-conflict",
        ResolvedBy::Quorum => "quorum",
        ResolvedBy::Policy => "policy",
        ResolvedBy::NeedsManual => "needs-manual",
        ResolvedBy::YoungerPrimary => "younger-primary",
        ResolvedBy::OlderPrimary => "older-primary",
        ResolvedBy::ZeroChanges => "zero-changes",
        ResolvedBy::LeastChanges => "least-changes",
        ResolvedBy::TieBreak => "tie-break",
        ResolvedBy::Secondary => "secondary",
    }
}

/// One line describing a resolution from this node's point of view.
pub fn describe(r: &Resolution) -> String {
    let what = match r.verdict {
        Verdict::KeepMine => "keeping my data",
        Verdict::DiscardMine => "discarding my data",
        Verdict::Disconnect => {
            return match r.by {
                ResolvedBy::ManualConflict => {
                    "not resolved: both sides connected with --discard-my-data".into()
                }
                ResolvedBy::NeedsManual => {
                    "not resolved: needs a manual decision (the bitmaps do not cover it)".into()
                }
                _ => "not resolved by the after-sb policy".into(),
            };
        }
    };
    format!("resolved by {}: {what}", resolved_by_name(r.by))
}

/// Saves the blocks set in this node's bitmap for peer `i` to the side file; returns
/// `(records, bytes)`.
pub(crate) async fn save_divergent_blocks(
    res: &Arc<Resource>,
    i: usize,
    reason: &str,
) -> Result<(u64, u64), String> {
    let slot = res.peers[i].slot;
    let path = divergent::side_file_path(res.name(), &res.spec.me);
    let header = SessionHeader {
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        resource: res.name().to_string(),
        node_id: res.spec.me.id,
        peer_id: res.peers[i].node.id,
        peer: res.peers[i].node.name.clone(),
        generation: res.meta.lock().expect("meta").sb.generations.current.0,
        reason: reason.to_string(),
    };
    let fail = |what: &str, e: &dyn std::error::Error| {
        format!(
            "cannot save divergent blocks to {}: {what}: {}",
            path.display(),
            error_chain(e)
        )
    };
    let p = path.clone();
    let mut w = tokio::task::spawn_blocking(move || SessionWriter::begin(&p, &header))
        .await
        .map_err(|e| fail("task", &e))?
        .map_err(|e| fail("open", &e))?;
    let mut pos = 0;
    loop {
        let next =
            res.meta.lock().expect("meta").bitmaps[slot].dirty_extent_from(pos, MAX_BLOCK as u64);
        let Some((off, len)) = next else { break };
        let data = res
            .store
            .read(off, len as usize)
            .await
            .map_err(|e| fail("read", &e))?;
        w = tokio::task::spawn_blocking(move || w.block(off, &data).map(|()| w))
            .await
            .map_err(|e| fail("task", &e))?
            .map_err(|e| fail("write", &e))?;
        pos = off + len;
    }
    let (records, bytes) = tokio::task::spawn_blocking(move || w.finish())
        .await
        .map_err(|e| fail("task", &e))?
        .map_err(|e| fail("sync", &e))?;
    tracing::warn!(resource = %res.name(), peer = %res.peers[i].node.name, bytes, records,
        file = %path.display(), %reason, "blocks about to be discarded saved to the side file");
    res.emit(
        Some(i),
        "divergent-saved",
        format!("{bytes} bytes to {}", path.display()),
    );
    Ok((records, bytes))
}
