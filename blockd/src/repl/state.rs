//! The vocabulary of replication state: roles, disk states, connection and replication states,
//! and the replication protocols, with DRBD's names and orderings.

use super::names::named_enum;

named_enum! {
    /// The role of a node for one resource. Only a Primary serves the NBD export.
    pub enum Role: "role" {
        /// Serves the NBD export read-write and replicates every write to its peers.
        Primary = "primary",
        /// Receives replicated writes; refuses NBD writes.
        Secondary = "secondary",
        /// A peer's role while it is not connected.
        Unknown = "unknown",
    }
}

named_enum! {
    /// The state of a node's local data (DRBD's disk states; the order is DRBD's, from worst to
    /// best, so `disk >= DiskState::Outdated` reads "has consistent data").
    pub enum DiskState: "disk state" {
        /// No local disk: no backing device attached, or detached after an I/O error.
        Diskless = "diskless",
        /// Reading metadata while attaching.
        Attaching = "attaching",
        /// The backing device failed; about to become Diskless.
        Failed = "failed",
        /// Attached, but the data state is decided by the next handshake with a peer.
        Negotiating = "negotiating",
        /// Being resynced, or never synced: not a state any Primary ever had.
        Inconsistent = "inconsistent",
        /// Consistent, but known to miss writes a peer has.
        Outdated = "outdated",
        /// A peer's disk while it is not connected.
        Unknown = "unknown",
        /// Consistent, but whether it is the newest is not known (no peer reachable).
        Consistent = "consistent",
        /// Consistent and the newest data in the cluster.
        UpToDate = "up-to-date",
    }
}

impl DiskState {
    /// True when the data is consistent (a state some Primary had), newest or not.
    pub fn is_consistent(self) -> bool {
        matches!(
            self,
            DiskState::Outdated | DiskState::Consistent | DiskState::UpToDate
        )
    }

    /// True when there is local data at all (attached, possibly inconsistent).
    pub fn has_disk(self) -> bool {
        self >= DiskState::Negotiating && self != DiskState::Unknown
    }
}

named_enum! {
    /// The state of the link to one peer.
    pub enum ConnState: "connection state" {
        /// Not trying to connect: administratively disconnected, or dropped after split brain or
        /// unrelated data (needs `blockctl connect`).
        StandAlone = "standalone",
        /// Closing the link.
        Disconnecting = "disconnecting",
        /// Trying to connect (with backoff), or waiting for the peer to connect.
        Connecting = "connecting",
        /// Link up, authenticated, handshake done.
        Connected = "connected",
    }
}

named_enum! {
    /// What flows over a connected link, per peer (DRBD's replication states).
    pub enum ReplState: "replication state" {
        /// Not connected.
        Off = "off",
        /// Both in sync (or neither has data to give): writes are mirrored.
        Established = "established",
        /// Exchanging bitmaps before becoming SyncSource.
        WfBitmapS = "wf-bitmap-s",
        /// Exchanging bitmaps before becoming SyncTarget.
        WfBitmapT = "wf-bitmap-t",
        /// Sending out-of-sync blocks to the peer (writes are still mirrored).
        SyncSource = "sync-source",
        /// Receiving out-of-sync blocks; local disk Inconsistent.
        SyncTarget = "sync-target",
        /// Resync as source paused (rate limit, dependency or admin).
        PausedSyncS = "paused-sync-s",
        /// Resync as target paused.
        PausedSyncT = "paused-sync-t",
        /// Online verify, this node sends checksums.
        VerifyS = "verify-s",
        /// Online verify, this node answers checksums.
        VerifyT = "verify-t",
    }
}

impl ReplState {
    /// This node is, or is becoming, the sync target of that peer (bitmap exchange as target,
    /// resync running or paused).
    pub fn is_sync_target(self) -> bool {
        matches!(
            self,
            ReplState::WfBitmapT | ReplState::SyncTarget | ReplState::PausedSyncT
        )
    }

    /// True while a resync is running or paused in either direction.
    pub fn is_resync(self) -> bool {
        matches!(
            self,
            ReplState::WfBitmapS
                | ReplState::WfBitmapT
                | ReplState::SyncSource
                | ReplState::SyncTarget
                | ReplState::PausedSyncS
                | ReplState::PausedSyncT
        )
    }
}

named_enum! {
    /// When a mirrored write counts as done (DRBD's protocols).
    pub enum Protocol: "protocol" {
        /// Local write done and the data queued for sending to every connected peer.
        A = "A",
        /// Local write done and every connected peer has received the data (in memory).
        B = "B",
        /// Local write done and every connected peer has written the data to its disk.
        C = "C",
    }
}

impl Protocol {
    /// Parses `A`, `B`, `C` in either case.
    pub fn parse_loose(text: &str) -> Result<Protocol, super::names::UnknownName> {
        text.to_ascii_uppercase().parse()
    }

    /// The peer acknowledgement a write waits for before it completes under this protocol.
    pub fn peer_ack(self) -> PeerAck {
        match self {
            Protocol::A => PeerAck::None,
            Protocol::B => PeerAck::Received,
            Protocol::C => PeerAck::Written,
        }
    }
}

/// The acknowledgement a peer sends for a replicated write, ordered by strength.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerAck {
    /// No acknowledgement is awaited (protocol A; the write only had to be queued).
    None,
    /// The peer has the data in memory (`RecvAck`, protocol B).
    Received,
    /// The peer has written the data (`WriteAck`, protocol C).
    Written,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &d in DiskState::ALL {
            assert_eq!(d.as_str().parse::<DiskState>(), Ok(d));
        }
        for &r in ReplState::ALL {
            assert_eq!(r.to_string().parse::<ReplState>(), Ok(r));
        }
        for &c in ConnState::ALL {
            assert_eq!(c.to_string().parse::<ConnState>(), Ok(c));
        }
        for &r in Role::ALL {
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
        }
        let err = "uptodate".parse::<DiskState>().unwrap_err();
        assert_eq!(err.kind, "disk state");
        assert!(err.to_string().contains("up-to-date"), "{err}");
    }

    #[test]
    fn disk_state_order_and_predicates() {
        assert!(DiskState::UpToDate > DiskState::Consistent);
        assert!(DiskState::Outdated > DiskState::Inconsistent);
        assert!(DiskState::Inconsistent > DiskState::Diskless);
        let consistent: Vec<_> = DiskState::ALL
            .iter()
            .copied()
            .filter(|d| d.is_consistent())
            .collect();
        assert_eq!(
            consistent,
            [
                DiskState::Outdated,
                DiskState::Consistent,
                DiskState::UpToDate
            ]
        );
        let with_disk: Vec<_> = DiskState::ALL
            .iter()
            .copied()
            .filter(|d| d.has_disk())
            .collect();
        assert_eq!(
            with_disk,
            [
                DiskState::Negotiating,
                DiskState::Inconsistent,
                DiskState::Outdated,
                DiskState::Consistent,
                DiskState::UpToDate
            ]
        );
    }

    #[test]
    fn resync_states() {
        let resync: Vec<_> = ReplState::ALL
            .iter()
            .copied()
            .filter(|r| r.is_resync())
            .collect();
        assert_eq!(resync.len(), 6);
        assert!(!ReplState::Established.is_resync());
        assert!(!ReplState::VerifyS.is_resync());
    }

    #[test]
    fn protocol_ack_points() {
        assert_eq!(Protocol::parse_loose("c"), Ok(Protocol::C));
        assert_eq!(Protocol::parse_loose("B"), Ok(Protocol::B));
        assert!(Protocol::parse_loose("D").is_err());
        assert_eq!(Protocol::A.peer_ack(), PeerAck::None);
        assert_eq!(Protocol::B.peer_ack(), PeerAck::Received);
        assert_eq!(Protocol::C.peer_ack(), PeerAck::Written);
        assert!(PeerAck::Written > PeerAck::Received);
    }
}
