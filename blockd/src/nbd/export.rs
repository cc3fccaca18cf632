//! The exported device: its name, description and store, and the facts about it the handshake
//! advertises (size, transmission flags, block sizes).

use crate::nbd::proto::{
    FLAG_CAN_MULTI_CONN, FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_CACHE, FLAG_SEND_DF,
    FLAG_SEND_FAST_ZERO, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES,
};
use crate::repl::device::Device;

/// Smallest request granularity advertised in `NBD_INFO_BLOCK_SIZE` (any alignment works).
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Preferred request granularity advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest READ or WRITE payload accepted in one request (also the advertised maximum).
pub const MAX_PAYLOAD: u32 = 64 * 1024 * 1024;

/// One export served by the NBD server.
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    /// What is served: a local store (standalone) or a replicated resource.
    pub store: Device,
}

impl Export {
    /// What the handshake needs to know about this export.
    pub fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.store.size(),
            read_only: self.store.read_only(),
            trim: self.store.supports_trim(),
        }
    }
}

/// Store-independent description of an export, used by option negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub read_only: bool,
    /// Whether TRIM is worth advertising (punch-hole works on the backing).
    pub trim: bool,
}

impl ExportInfo {
    /// Whether a client-supplied export name selects this export ("" is the default export).
    pub fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    /// Transmission flags for a session that did (or did not) negotiate structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
            if self.trim {
                flags |= FLAG_SEND_TRIM;
            }
        }
        if structured {
            flags |= FLAG_SEND_DF;
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(read_only: bool, trim: bool) -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: None,
            size: 1 << 20,
            read_only,
            trim,
        }
    }

    #[test]
    fn flags_follow_capabilities() {
        let rw = info(false, true).transmission_flags(true);
        for flag in [
            FLAG_HAS_FLAGS,
            FLAG_SEND_FLUSH,
            FLAG_SEND_FUA,
            FLAG_SEND_TRIM,
            FLAG_SEND_WRITE_ZEROES,
            FLAG_SEND_FAST_ZERO,
            FLAG_SEND_CACHE,
            FLAG_CAN_MULTI_CONN,
            FLAG_SEND_DF,
        ] {
            assert_ne!(rw & flag, 0, "flag {flag:#x}");
        }
        assert_eq!(rw & FLAG_READ_ONLY, 0);
        assert_eq!(
            info(false, false).transmission_flags(false) & (FLAG_SEND_TRIM | FLAG_SEND_DF),
            0
        );
        let ro = info(true, true).transmission_flags(false);
        assert_ne!(ro & FLAG_READ_ONLY, 0);
        assert_eq!(
            ro & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FUA),
            0
        );
    }

    #[test]
    fn empty_name_is_the_default_export() {
        let e = info(false, false);
        assert!(e.matches(""));
        assert!(e.matches("disk"));
        assert!(!e.matches("other"));
    }
}
