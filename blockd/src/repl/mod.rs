//! Replication decisions, free of I/O: roles, disk/connection/replication states, the resync
//! direction from generation identifiers, split-brain recovery, quorum and promotion rules,
//! and the handshake that combines them into commands. The runtime (links, resync workers)
//! executes what these functions decide.

pub mod apply_order;
pub mod backlog;
pub mod setup_limit;
pub mod checksum;
pub mod csum_resync;
pub(crate) mod pacer;
pub mod rate_control;
pub mod verify;
pub mod divergent;
pub mod io_gate;
pub mod victim;
pub mod handshake;
pub mod names;
pub mod lost_writes;
pub mod unstable;
pub mod unflushed;
pub mod promote;
pub mod promotion_lock;
pub mod quorum;
pub mod split_brain;
pub mod state;
pub mod sync_decision;
pub mod link;
pub mod outbox;
pub mod wire;
pub mod congestion;
pub mod device;
pub mod peer;
pub mod ranges;
pub mod resource;
pub mod resync;
pub mod resync_claims;
#[cfg(test)]
mod tests;
pub mod node;
pub mod export;
pub mod snapshot;
pub mod disk_failure;
pub mod local_disk;
