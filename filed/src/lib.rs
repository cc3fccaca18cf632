//! filed: csync2-style group file synchronisation. Read the modules in the order a change flows:
//! `config` and `filter` (what is synced), `entry` (the state of one path; `owner` when filed
//! cannot set owners), `store` (the state database), `scan` (find local changes), `plan` (pure
//! sync decisions), `proto` and `session` (the exchange with a peer over `transport`, file data
//! via `delta`), `apply` (safe writes). `filed daemon` adds `watch` (recursive inotify), `batch`
//! (event aggregation), `written` (its own writes, so they never come back as changes), `daemon`
//! (the runners), `stats` and `metrics`.

pub mod actions;
pub mod apply;
pub mod batch;
pub mod codec;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod delta;
pub mod entry;
pub mod filter;
pub mod keygen;
pub mod metrics;
pub mod node;
pub mod owner;
pub mod plan;
pub mod proto;
pub mod scan;
pub mod server;
pub mod session;
pub mod stats;
pub mod store;
pub mod transport;
pub mod watch;
pub mod written;
