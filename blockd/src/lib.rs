//! blockd: a userspace, DRBD-like replicated block device; the primary serves its data over NBD.

pub mod nbd;
pub mod store;
pub mod config;
pub mod meta;
pub mod repl;
pub mod control;
pub mod metrics;
pub mod snapshot;
