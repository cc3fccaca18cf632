//! The control socket: a Unix socket where `blockctl` talks to a running blockd with a small
//! versioned JSON-lines protocol — one request line, one response line (`events`: then one
//! line per event until the client hangs up). See [`proto`] for the messages.

pub mod client;
pub mod proto;
pub mod server;
