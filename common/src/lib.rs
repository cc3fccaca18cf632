//! Shared building blocks of blockd and filed: framing, TLS, peer authentication, sizes and telemetry.

pub mod auth;
pub mod control_line;
pub mod frame;
pub mod host;
pub mod size;
pub mod telemetry;
pub mod tls;
