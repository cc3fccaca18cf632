//! Control protocol messages (JSON, one per line). Every message carries `"v": 1`; a server
//! refuses other versions with code `bad-request`.
//!
//! ```text
//! -> {"v":1,"cmd":"status","resource":"r0"}
//! <- {"v":1,"ok":true,"status":[{...}]}
//! -> {"v":1,"cmd":"promote","resource":"r0","force":false}
//! <- {"v":1,"ok":false,"code":"refused","error":"promotion refused: node 1 is Primary"}
//! -> {"v":1,"cmd":"promote-check","resource":"r0","force":false}
//! <- {"v":1,"ok":true,"losses":[{"primary":"n0","lost":{"writes":37,"bytes":151552}}]}
//! -> {"v":1,"cmd":"attach","resource":"r0"}
//! <- {"v":1,"ok":false,"code":"refused","error":"refused: the disk is attached (up-to-date); detach it first"}
//! -> {"v":1,"cmd":"events"}
//! <- {"v":1,"ok":true}   then   {"v":1,"event":{...}}  per state change
//! ```

use serde::{Deserialize, Serialize};

use crate::repl::resource::{Event, Status};

/// Protocol version.
pub const VERSION: u32 = 1;

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    pub v: u32,
    pub cmd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub discard_my_data: bool,
    /// `connect --checksum`: the next resync compares block checksums first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checksum: bool,
    /// `snapshot`/`snapshot-drop`: the snapshot's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `snapshot`: ask the Primary for a flush boundary first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub consistent: bool,
    /// `snapshot`: NBD listen address `ADDR:PORT` (default: the node's NBD address, any port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// `snapshot`: copy-on-write area size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cow_size: Option<u64>,
}

impl Request {
    pub fn new(cmd: &str, resource: Option<&str>) -> Request {
        Request {
            v: VERSION,
            cmd: cmd.to_string(),
            resource: resource.map(str::to_string),
            peer: None,
            force: false,
            discard_my_data: false,
            checksum: false,
            name: None,
            consistent: false,
            listen: None,
            cow_size: None,
        }
    }
}

/// Machine-readable failure classes (blockctl maps them to exit codes).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Malformed request or unsupported version.
    BadRequest,
    /// No such resource or peer.
    Unknown,
    /// The state does not allow it (promotion rules).
    Refused,
    /// It was tried and failed (I/O, metadata).
    Failed,
}

/// A response line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<Status>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    /// `snapshot`: the snapshot opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<crate::repl::snapshot::SnapshotInfo>,
    /// `promote-check`: acknowledged writes of former Primaries a promotion would lose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub losses: Option<Vec<crate::repl::lost_writes::KnownLoss>>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            v: VERSION,
            ok: Some(true),
            code: None,
            error: None,
            status: None,
            event: None,
            snapshot: None,
            losses: None,
        }
    }

    pub fn error(code: ErrorCode, error: impl Into<String>) -> Response {
        Response {
            ok: Some(false),
            code: Some(code),
            error: Some(error.into()),
            ..Response::ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_defaults() {
        let r = Request::new("status", Some("r0"));
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"v":1,"cmd":"status","resource":"r0","force":false,"discard_my_data":false}"#
        );
        let back: Request =
            serde_json::from_str(r#"{"v":1,"cmd":"demote","resource":"r0"}"#).unwrap();
        assert_eq!(back.cmd, "demote");
        assert!(!back.force);
        let e = Response::error(ErrorCode::Refused, "no");
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.contains(r#""code":"refused""#), "{line}");
    }
}
