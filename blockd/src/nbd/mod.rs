//! The NBD server: wire codec, option negotiation, transmission phase and the accept loop.
//!
//! Follow one request through the folders in order: [`proto`] decodes bytes, [`handshake`]
//! negotiates the session, [`transmission`] runs requests against the [`crate::store`] and
//! writes replies, [`server`] accepts connections and shuts down cleanly.

pub mod congestion;
pub mod export;
pub mod handshake;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transmission;
