//! Promotion rules: may this node become Primary now?
//!
//! In order: already Primary is a no-op; another Primary among the connected peers refuses
//! (one Primary per resource); no quorum refuses (`--force` does not override quorum — lower
//! the `quorum` setting instead); UpToDate local data promotes; otherwise `--force` promotes
//! Inconsistent/Outdated/Consistent data (a new cluster's first Primary), except when a
//! connected peer is UpToDate (that peer has the newest data: promote it, or wait for the
//! resync); a node without a disk promotes only through a connected UpToDate peer.
//!
//! Before promoting, the node also asks every connected peer for its view of the cluster
//! ([`decide_cluster`]): a peer whose generation history contains our current generation (it
//! went on without us), or a peer that did not answer refuses the promotion unless `--force`.
//! A peer connected to a Primary this node cannot see (a partial partition), and a peer whose
//! promotion lock is held (it is promoting itself, or granted another node's promotion:
//! `repl::promotion_lock`), refuse it even with `--force`: force is about the data, not about
//! two Primaries.
//!
//! Every promotion starts a new generation (`GenerationIds::new_current`), so any writes made
//! as Primary are recognisable at the next handshake.

use super::state::{ConnState, DiskState, Role};
use crate::meta::generation::Uuid;

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

/// A connected peer's answer to "what do you see?", asked at promotion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterAnswer {
    /// The peer did not answer in time.
    Unknown,
    /// The peer's current generation, its history (newest first), the Primary it is
    /// connected to (itself included), if any, whether it has blocks marked out of sync
    /// for the asker, and the node whose promotion holds its promotion lock (refusing the
    /// asker's lease), if any.
    View {
        current: Uuid,
        history: Vec<Uuid>,
        primary: Option<u8>,
        marked: bool,
        promoting: Option<u8>,
    },
}

/// Whether a connected peer's session is restarted when this node (current generation `ours`,
/// `marked_here`: blocks marked out of sync for that peer) is promoted, so the handshake
/// resyncs it from the new Primary's bitmap (and the peer's, exchanged) instead of the peer
/// adopting the new generation as is: its generation differs, it did not answer, or blocks
/// are marked on either side — such as the writes of a lost Primary that reached one of the
/// two and maybe not the other (`repl::unstable`).
pub fn resync_on_promotion(ours: Uuid, answer: &ClusterAnswer, marked_here: bool) -> bool {
    match answer {
        ClusterAnswer::View {
            current, marked, ..
        } => marked_here || *marked || !current.same(ours),
        ClusterAnswer::Unknown => true,
    }
}

/// Why the connected peers' views refuse a promotion (`--force` promotes anyway past data
/// refusals, never past another Primary or another node's promotion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterRefusal {
    #[error("node {node} is being promoted at the same time; retry (answer of node {peer})")]
    PeerPromoting { peer: u8, node: u8 },
    #[error(
        "node {peer} is connected to Primary node {primary}: demote node {primary} first, or \
         wait until node {peer} loses it (a dead Primary is noticed within the 5 s keepalive)"
    )]
    PeerSeesPrimary { peer: u8, primary: u8 },
    #[error(
        "node {peer} holds newer data (generation {generation}): promote node {peer} or resync \
         first (use --force to promote anyway)"
    )]
    PeerAhead { peer: u8, generation: Uuid },
    #[error(
        "node {0} did not report its view in time: its data and role are unknown (use --force \
         to promote anyway)"
    )]
    PeerUnknown(u8),
}

/// Decides from the connected peers' answers (`(node id, answer)`) whether this node, whose
/// current generation is `ours`, may become Primary. `--force` overrides the refusals about
/// data (a peer ahead, a peer that did not answer) but not those that would make two
/// Primaries: another node's promotion in progress (its lease or its own lock), or a Primary a
/// peer is connected to (a partial partition: that Primary may have quorum through the peer,
/// and forcing past it made two Primaries, each with quorum).
pub fn decide_cluster(
    ours: Uuid,
    answers: &[(u8, ClusterAnswer)],
    force: bool,
) -> Result<(), ClusterRefusal> {
    for (peer, a) in answers {
        if let ClusterAnswer::View {
            promoting: Some(node),
            ..
        } = a
        {
            return Err(ClusterRefusal::PeerPromoting {
                peer: *peer,
                node: *node,
            });
        }
    }
    for (peer, a) in answers {
        if let ClusterAnswer::View {
            primary: Some(primary),
            ..
        } = a
        {
            return Err(ClusterRefusal::PeerSeesPrimary {
                peer: *peer,
                primary: *primary,
            });
        }
    }
    if force {
        return Ok(());
    }
    for (peer, a) in answers {
        let peer = *peer;
        match a {
            ClusterAnswer::Unknown => return Err(ClusterRefusal::PeerUnknown(peer)),
            ClusterAnswer::View {
                current, history, ..
            } => {
                if !current.same(ours) && !ours.is_zero() && history.iter().any(|h| h.same(ours)) {
                    return Err(ClusterRefusal::PeerAhead {
                        peer,
                        generation: *current,
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(current: u64, history: &[u64], primary: Option<u8>) -> ClusterAnswer {
        ClusterAnswer::View {
            current: Uuid(current),
            history: history.iter().map(|&h| Uuid(h)).collect(),
            primary,
            marked: false,
            promoting: None,
        }
    }

    #[test]
    fn peers_out_of_sync_or_with_marked_blocks_resync_on_promotion() {
        let ours = Uuid(0x100);
        let same = view(0x100, &[], None);
        assert!(!resync_on_promotion(ours, &same, false));
        assert!(resync_on_promotion(ours, &same, true));
        let marked = ClusterAnswer::View {
            current: Uuid(0x100),
            history: vec![],
            primary: None,
            marked: true,
            promoting: None,
        };
        assert!(resync_on_promotion(ours, &marked, false));
        assert!(resync_on_promotion(
            ours,
            &view(0x200, &[0x100], None),
            false
        ));
        assert!(resync_on_promotion(ours, &ClusterAnswer::Unknown, false));
    }

    #[test]
    fn cluster_in_sync_promotes() {
        let answers = [(1, view(0x100, &[0x80], None)), (2, view(0x100, &[], None))];
        assert_eq!(decide_cluster(Uuid(0x100), &answers, false), Ok(()));
        assert_eq!(decide_cluster(Uuid(0x100), &[], false), Ok(()));
        // A peer behind us (our history holds its generation) does not refuse.
        let answers = [(1, view(0x80, &[0x40], None))];
        assert_eq!(decide_cluster(Uuid(0x100), &answers, false), Ok(()));
    }

    #[test]
    fn cluster_peer_sees_primary_refuses_even_with_force() {
        let answers = [(1, view(0x100, &[], Some(2)))];
        let r = decide_cluster(Uuid(0x100), &answers, false);
        assert_eq!(
            r,
            Err(ClusterRefusal::PeerSeesPrimary {
                peer: 1,
                primary: 2
            })
        );
        let text = r.unwrap_err().to_string();
        assert!(
            text.contains("node 1 is connected to Primary node 2"),
            "{text}"
        );
        assert!(
            !text.contains("--force"),
            "force does not make a second Primary: {text}"
        );
        // A partial partition: A is Primary through C, B cannot see A; forcing B refuses,
        // whatever the other answers say.
        assert_eq!(
            decide_cluster(Uuid(0x100), &answers, true),
            Err(ClusterRefusal::PeerSeesPrimary {
                peer: 1,
                primary: 2
            })
        );
        let answers = [(3, ClusterAnswer::Unknown), (1, view(0x100, &[], Some(2)))];
        for force in [false, true] {
            assert_eq!(
                decide_cluster(Uuid(0x100), &answers, force),
                Err(ClusterRefusal::PeerSeesPrimary {
                    peer: 1,
                    primary: 2
                })
            );
        }
    }

    #[test]
    fn cluster_peer_ahead() {
        let answers = [
            (2, view(0x100, &[], None)),
            (1, view(0x200, &[0x100], None)),
        ];
        let r = decide_cluster(Uuid(0x100), &answers, false);
        assert_eq!(
            r,
            Err(ClusterRefusal::PeerAhead {
                peer: 1,
                generation: Uuid(0x200)
            })
        );
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("promote node 1 or resync")
        );
        // The Primary bit of a generation does not matter.
        let answers = [(1, view(0x200, &[0x101], None))];
        assert!(decide_cluster(Uuid(0x100), &answers, false).is_err());
        assert_eq!(decide_cluster(Uuid(0x100), &answers, true), Ok(()));
    }

    #[test]
    fn cluster_peer_promoting_refuses_even_with_force() {
        let promoting = |node| ClusterAnswer::View {
            current: Uuid(0x100),
            history: vec![],
            primary: None,
            marked: false,
            promoting: Some(node),
        };
        // The peer promotes itself, or granted node 2's promotion; the other answers agree.
        for (answers, node) in [
            (vec![(1, promoting(1))], 1),
            (vec![(3, view(0x100, &[], None)), (1, promoting(2))], 2),
        ] {
            let want = Err(ClusterRefusal::PeerPromoting { peer: 1, node });
            assert_eq!(decide_cluster(Uuid(0x100), &answers, false), want);
            assert_eq!(decide_cluster(Uuid(0x100), &answers, true), want);
        }
        let text = decide_cluster(Uuid(0x100), &[(1, promoting(2))], true)
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("node 2 is being promoted at the same time; retry"),
            "{text}"
        );
    }

    #[test]
    fn cluster_unknown_peer_refuses_without_force() {
        let answers = [(1, view(0x100, &[], None)), (2, ClusterAnswer::Unknown)];
        let r = decide_cluster(Uuid(0x100), &answers, false);
        assert_eq!(r, Err(ClusterRefusal::PeerUnknown(2)));
        assert!(r.unwrap_err().to_string().contains("--force"));
        assert_eq!(decide_cluster(Uuid(0x100), &answers, true), Ok(()));
    }

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
