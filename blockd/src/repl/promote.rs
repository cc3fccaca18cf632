//! Promotion rules: may this node become Primary now?
//!
//! In order: already Primary is a no-op; another Primary among the connected peers refuses
//! (one Primary per resource); no quorum refuses (`--force` does not override quorum — lower
//! the `quorum` setting instead); UpToDate local data promotes; otherwise `--force` promotes
//! Inconsistent/Outdated/Consistent data (a new cluster's first Primary), except when a
//! connected peer is UpToDate (that peer has the newest data: promote it, or wait for the
//! resync); a node without a disk promotes only through a connected UpToDate peer.
//!
//! Every promotion starts a new generation (`GenerationIds::new_current`), so any writes made
//! as Primary are recognisable at the next handshake.

use super::state::{ConnState, DiskState, Role};

/// What the node knows about one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub node_id: u8,
    pub conn: ConnState,
    pub role: Role,
    pub disk: DiskState,
}

/// The local side of a promotion request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalView {
    pub role: Role,
    pub disk: DiskState,
    pub has_quorum: bool,
}

/// Where the new Primary reads and writes its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// The local backing device.
    Local,
    /// A connected UpToDate peer (this node has no usable disk).
    Peer(u8),
}

/// A granted promotion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromoteDecision {
    /// Nothing to do.
    AlreadyPrimary,
    /// Become Primary; `forced` when local data was not UpToDate (it becomes UpToDate, and the
    /// peers resync from it).
    Promote { forced: bool, data: DataPath },
}

/// Why a promotion is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PromoteRefusal {
    #[error("node {0} is Primary")]
    OtherPrimary(u8),
    #[error("no quorum")]
    NoQuorum,
    #[error("local data is {0}, not up-to-date (use --force to promote it anyway)")]
    NotUpToDate(DiskState),
    #[error("node {0} is connected and up-to-date: promote it, or wait for the resync to finish")]
    PeerHasNewerData(u8),
    #[error("no local disk ({0}) and no connected up-to-date peer")]
    NoData(DiskState),
}

/// Decides a promotion request.
pub fn decide(
    local: &LocalView,
    peers: &[PeerView],
    force: bool,
) -> Result<PromoteDecision, PromoteRefusal> {
    if local.role == Role::Primary {
        return Ok(PromoteDecision::AlreadyPrimary);
    }
    let connected = || peers.iter().filter(|p| p.conn == ConnState::Connected);
    if let Some(p) = connected().find(|p| p.role == Role::Primary) {
        return Err(PromoteRefusal::OtherPrimary(p.node_id));
    }
    if !local.has_quorum {
        return Err(PromoteRefusal::NoQuorum);
    }
    let up_to_date_peer = connected().find(|p| p.disk == DiskState::UpToDate);
    match local.disk {
        DiskState::UpToDate => Ok(PromoteDecision::Promote {
            forced: false,
            data: DataPath::Local,
        }),
        DiskState::Inconsistent | DiskState::Outdated | DiskState::Consistent => {
            if let Some(p) = up_to_date_peer {
                return Err(PromoteRefusal::PeerHasNewerData(p.node_id));
            }
            if force {
                Ok(PromoteDecision::Promote {
                    forced: true,
                    data: DataPath::Local,
                })
            } else {
                Err(PromoteRefusal::NotUpToDate(local.disk))
            }
        }
        // Diskless, Failed, Attaching, Negotiating, Unknown: no usable local data right now.
        other => match up_to_date_peer {
            Some(p) => Ok(PromoteDecision::Promote {
                forced: false,
                data: DataPath::Peer(p.node_id),
            }),
            None => Err(PromoteRefusal::NoData(other)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(disk: DiskState) -> LocalView {
        LocalView {
            role: Role::Secondary,
            disk,
            has_quorum: true,
        }
    }

    fn peer(node_id: u8, conn: ConnState, role: Role, disk: DiskState) -> PeerView {
        PeerView {
            node_id,
            conn,
            role,
            disk,
        }
    }

    const LOCAL_OK: Result<PromoteDecision, PromoteRefusal> = Ok(PromoteDecision::Promote {
        forced: false,
        data: DataPath::Local,
    });

    #[test]
    fn already_primary() {
        let mut l = local(DiskState::Inconsistent);
        l.role = Role::Primary;
        l.has_quorum = false;
        assert_eq!(decide(&l, &[], false), Ok(PromoteDecision::AlreadyPrimary));
    }

    #[test]
    fn one_primary_only() {
        let peers = [
            peer(
                1,
                ConnState::Connected,
                Role::Secondary,
                DiskState::UpToDate,
            ),
            peer(2, ConnState::Connected, Role::Primary, DiskState::UpToDate),
        ];
        assert_eq!(
            decide(&local(DiskState::UpToDate), &peers, true),
            Err(PromoteRefusal::OtherPrimary(2))
        );
        // A disconnected peer's last known role does not block (quorum protects instead).
        let peers = [peer(
            2,
            ConnState::Connecting,
            Role::Primary,
            DiskState::Unknown,
        )];
        assert_eq!(decide(&local(DiskState::UpToDate), &peers, false), LOCAL_OK);
    }

    #[test]
    fn quorum_required_even_with_force() {
        let mut l = local(DiskState::UpToDate);
        l.has_quorum = false;
        assert_eq!(decide(&l, &[], true), Err(PromoteRefusal::NoQuorum));
    }

    #[test]
    fn disk_states() {
        assert_eq!(decide(&local(DiskState::UpToDate), &[], false), LOCAL_OK);
        for d in [
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::Consistent,
        ] {
            assert_eq!(
                decide(&local(d), &[], false),
                Err(PromoteRefusal::NotUpToDate(d))
            );
            assert_eq!(
                decide(&local(d), &[], true),
                Ok(PromoteDecision::Promote {
                    forced: true,
                    data: DataPath::Local
                })
            );
            let peers = [peer(
                4,
                ConnState::Connected,
                Role::Secondary,
                DiskState::UpToDate,
            )];
            assert_eq!(
                decide(&local(d), &peers, true),
                Err(PromoteRefusal::PeerHasNewerData(4))
            );
        }
    }

    #[test]
    fn diskless_through_peer() {
        let peers = [
            peer(
                1,
                ConnState::Connected,
                Role::Secondary,
                DiskState::Outdated,
            ),
            peer(
                3,
                ConnState::Connected,
                Role::Secondary,
                DiskState::UpToDate,
            ),
        ];
        assert_eq!(
            decide(&local(DiskState::Diskless), &peers, false),
            Ok(PromoteDecision::Promote {
                forced: false,
                data: DataPath::Peer(3)
            })
        );
        assert_eq!(
            decide(&local(DiskState::Failed), &peers[..1], true),
            Err(PromoteRefusal::NoData(DiskState::Failed))
        );
        assert!(
            PromoteRefusal::NotUpToDate(DiskState::Outdated)
                .to_string()
                .contains("outdated")
        );
    }
}
