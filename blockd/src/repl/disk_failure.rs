//! Disk-failure decisions, free of I/O: what an error of the local backing store does under
//! `on-io-error`, where a Primary's reads and writes go while its disk is Diskless or being
//! resynced after `blockctl attach`, which peer serves a forwarded read, which peers persist
//! writes, and which blocks a reattached disk must fetch. The runtime (`repl::local_disk`,
//! `repl::device`) executes what these functions decide.

use crate::config::OnIoError;
use crate::repl::checksum::BlockDigest;
use crate::repl::state::{ConnState, DiskState, ReplState};
use crate::store::StoreError;

/// Largest byte count one forwarded read (`ReadRequest`) may ask for; longer reads are split.
pub const MAX_FORWARDED_READ: u32 = 1 << 20;

/// What kind of failure a store error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is wrong (out of range, read-only, not fast): the disk is fine.
    Request,
    /// The backing store failed (EIO, ENOSPC, any syscall error, a dead engine).
    Disk { errno: Option<i32> },
}

/// Classifies a store error.
pub fn classify(e: &StoreError) -> ErrorClass {
    match e {
        StoreError::OutOfRange { .. } | StoreError::ReadOnly | StoreError::NotFast => {
            ErrorClass::Request
        }
        other => ErrorClass::Disk {
            errno: other.raw_os_error(),
        },
    }
}

/// What the runtime does with a failed local request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Not a disk failure: return the error to the client unchanged.
    Return,
    /// `detach`: the disk goes Failed, then Diskless; the request is retried through a peer.
    Detach,
    /// `pass-on`: the client gets this errno (EIO, or ENOSPC for a full store); the disk stays
    /// attached. `diverged` is true for modifying requests: peers may have the new data while
    /// the local disk does not, so the range is marked out of sync toward every peer.
    PassOn { errno: i32, diverged: bool },
}

/// Decides what a failed local request does.
pub fn on_local_error(policy: OnIoError, class: ErrorClass, modifying: bool) -> OnError {
    let ErrorClass::Disk { errno } = class else {
        return OnError::Return;
    };
    match policy {
        OnIoError::Detach => OnError::Detach,
        OnIoError::PassOn => OnError::PassOn {
            errno: match errno {
                Some(libc::ENOSPC) => libc::ENOSPC,
                _ => libc::EIO,
            },
            diverged: modifying,
        },
    }
}

/// What the runtime knows about one peer, for these decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub conn: ConnState,
    pub repl: ReplState,
    pub disk: DiskState,
    /// Requests sent to it and not acknowledged (load).
    pub in_flight: usize,
}

impl PeerView {
    /// Connected, mirroring, and holding the newest data: it can serve reads and persist
    /// writes for a Primary without a usable disk.
    pub fn serves_data(&self) -> bool {
        self.conn == ConnState::Connected
            && self.disk == DiskState::UpToDate
            && matches!(
                self.repl,
                ReplState::Established | ReplState::SyncSource | ReplState::PausedSyncS
            )
    }
}

/// A peer persists replicated writes unless its disk failed or was detached: writes for a
/// Diskless peer go into its bitmap, as for a disconnected one.
pub fn peer_persists_writes(peer_disk: DiskState) -> bool {
    !matches!(peer_disk, DiskState::Diskless | DiskState::Failed)
}

/// Where the Primary's local data stands for application I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalData {
    /// Usable: reads are local, writes local plus the protocol's acks.
    Usable,
    /// Attached but being resynced (after `blockctl attach`): writes go to the disk and must
    /// also be written by a peer that serves data; reads come from that peer.
    Resyncing,
    /// No local disk: reads and writes go through a peer that serves data.
    Absent,
}

/// Classifies the local disk state.
pub fn local_data(disk: DiskState) -> LocalData {
    match disk {
        DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated => LocalData::Usable,
        DiskState::Inconsistent | DiskState::Negotiating => LocalData::Resyncing,
        DiskState::Diskless | DiskState::Failed | DiskState::Attaching | DiskState::Unknown => {
            LocalData::Absent
        }
    }
}

/// No peer can stand in for the local disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no local disk ({disk}) and no connected up-to-date peer")]
pub struct NoDataPath {
    pub disk: DiskState,
}

/// Which peer serves a read the local disk cannot: the connected UpToDate peer with the
/// fewest requests in flight (the lowest index on a tie).
pub fn read_peer(disk: DiskState, peers: &[PeerView]) -> Result<usize, NoDataPath> {
    peers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.serves_data())
        .min_by_key(|(i, p)| (p.in_flight, *i))
        .map(|(i, _)| i)
        .ok_or(NoDataPath { disk })
}

/// How the Primary runs a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WritePlan {
    /// Write the local disk.
    pub local: bool,
    /// Wait until peers have written it (protocol C toward the client) whatever the protocol,
    /// and fail the request unless a peer that serves data did.
    pub peer_written: bool,
}

/// Whether and how a Primary can accept a write in its local disk state.
pub fn write_plan(disk: DiskState, peers: &[PeerView]) -> Result<WritePlan, NoDataPath> {
    match local_data(disk) {
        LocalData::Usable => Ok(WritePlan {
            local: true,
            peer_written: false,
        }),
        data => {
            read_peer(disk, peers)?;
            Ok(WritePlan {
                local: data == LocalData::Resyncing,
                peer_written: true,
            })
        }
    }
}

/// Where a Primary's read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    Local,
    Peer(usize),
}

/// Decides where a read goes.
pub fn read_source(disk: DiskState, peers: &[PeerView]) -> Result<ReadSource, NoDataPath> {
    match local_data(disk) {
        LocalData::Usable => Ok(ReadSource::Local),
        _ => read_peer(disk, peers).map(ReadSource::Peer),
    }
}

/// The outcome of a write that had to be persisted by a peer: `acks` has, per peer it was
/// sent to, whether that peer serves data and whether it confirmed the write.
pub fn peer_write_outcome(acks: &[(bool, bool)]) -> Result<(), NoDataPath> {
    if acks.iter().any(|&(serves, written)| serves && written) {
        Ok(())
    } else {
        Err(NoDataPath {
            disk: DiskState::Diskless,
        })
    }
}

/// Why `blockctl attach` or `blockctl detach` is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminRefusal {
    #[error("the disk is attached ({0}); detach it first")]
    Attached(DiskState),
    #[error("the disk is not attached ({0})")]
    NotAttached(DiskState),
    #[error("a Primary cannot detach without a connected up-to-date peer to serve its I/O")]
    NoPeerForPrimary,
    /// A disk comes back from `attach` Inconsistent (it may be a replacement): detaching the
    /// last up-to-date copy in reach would leave no node to resync anyone from.
    #[error(
        "no connected peer is up to date: this disk holds the only up-to-date copy in reach \
         (use --force to detach it anyway)"
    )]
    LastUpToDate,
}

/// What a Diskless Primary does with the blocks marked in its bitmap for a peer that
/// reconnects at the same generation (writes in flight when the link dropped, which the peer
/// may or may not have written). It cannot resync them: it has no data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkedOnReturn {
    /// Nothing marked.
    Keep,
    /// The peer is the Primary's only peer: a write it did not confirm was confirmed by nobody
    /// (never acknowledged), so whatever the peer holds is the data the Primary exposes.
    Clear,
    /// Another peer may have confirmed writes this one lacks: it must not serve the Primary's
    /// reads or count for its writes (shown `outdated`) until it is resynced from an
    /// up-to-date node.
    Distrust,
}

/// Decides [`MarkedOnReturn`] from the bits marked for the returning peer and the number of
/// other peers the resource has.
pub fn marked_on_return(marked_bits: u64, other_peers: usize) -> MarkedOnReturn {
    match (marked_bits, other_peers) {
        (0, _) => MarkedOnReturn::Keep,
        (_, 0) => MarkedOnReturn::Clear,
        _ => MarkedOnReturn::Distrust,
    }
}

/// `blockctl attach`: only a Diskless node attaches.
pub fn may_attach(disk: DiskState) -> Result<(), AdminRefusal> {
    match disk {
        DiskState::Diskless => Ok(()),
        other => Err(AdminRefusal::Attached(other)),
    }
}

/// `blockctl detach`: an attached disk detaches; a Primary only while a peer can serve.
pub fn may_detach(
    disk: DiskState,
    primary: bool,
    peers: &[PeerView],
    force: bool,
) -> Result<(), AdminRefusal> {
    if !disk.has_disk() {
        return Err(AdminRefusal::NotAttached(disk));
    }
    if primary && read_peer(disk, peers).is_err() {
        return Err(AdminRefusal::NoPeerForPrimary);
    }
    let up_to_date_peer = peers
        .iter()
        .any(|p| p.conn == ConnState::Connected && p.disk == DiskState::UpToDate);
    if disk == DiskState::UpToDate && !up_to_date_peer && !force {
        return Err(AdminRefusal::LastUpToDate);
    }
    Ok(())
}

/// The byte ranges of `[offset, offset + len)` whose blocks differ between the local and the
/// peer's digests (adjacent blocks merged). Blocks without a digest on either side (lists of
/// different lengths) differ.
pub fn differing_ranges(
    offset: u64,
    len: u64,
    block_size: u64,
    local: &[BlockDigest],
    peer: &[BlockDigest],
) -> Vec<(u64, u64)> {
    let blocks = len.div_ceil(block_size.max(1)) as usize;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in 0..blocks {
        if local.get(b).is_some() && local.get(b) == peer.get(b) {
            continue;
        }
        let start = offset + b as u64 * block_size;
        push_range(&mut out, start, (start + block_size).min(offset + len));
    }
    out
}

/// Appends `[start, end)` to ascending `ranges` (offset, length), merged with the last one when
/// they touch.
pub(crate) fn push_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    match ranges.last_mut() {
        Some((s, l)) if *s + *l == start => *l = end - *s,
        _ => ranges.push((start, end - start)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn marked_blocks_of_a_returning_peer() {
        assert_eq!(marked_on_return(0, 0), MarkedOnReturn::Keep);
        assert_eq!(marked_on_return(0, 2), MarkedOnReturn::Keep);
        assert_eq!(marked_on_return(5, 0), MarkedOnReturn::Clear);
        assert_eq!(marked_on_return(5, 1), MarkedOnReturn::Distrust);
    }

    use super::*;

    fn peer(conn: ConnState, repl: ReplState, disk: DiskState, in_flight: usize) -> PeerView {
        PeerView {
            conn,
            repl,
            disk,
            in_flight,
        }
    }

    fn good(in_flight: usize) -> PeerView {
        peer(
            ConnState::Connected,
            ReplState::Established,
            DiskState::UpToDate,
            in_flight,
        )
    }

    fn io(errno: i32) -> StoreError {
        StoreError::Write {
            offset: 0,
            len: 1,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn classify_store_errors() {
        assert_eq!(
            classify(&io(libc::EIO)),
            ErrorClass::Disk {
                errno: Some(libc::EIO)
            }
        );
        assert_eq!(
            classify(&StoreError::EngineGone),
            ErrorClass::Disk { errno: None }
        );
        assert_eq!(classify(&StoreError::ReadOnly), ErrorClass::Request);
        assert_eq!(classify(&StoreError::NotFast), ErrorClass::Request);
        assert_eq!(
            classify(&StoreError::OutOfRange {
                offset: 0,
                len: 1,
                size: 0
            }),
            ErrorClass::Request
        );
    }

    #[test]
    fn error_policy() {
        let eio = classify(&io(libc::EIO));
        let enospc = classify(&io(libc::ENOSPC));
        let gone = classify(&StoreError::EngineGone);
        assert_eq!(
            on_local_error(OnIoError::Detach, eio, true),
            OnError::Detach
        );
        assert_eq!(
            on_local_error(OnIoError::Detach, enospc, false),
            OnError::Detach
        );
        assert_eq!(
            on_local_error(OnIoError::PassOn, eio, true),
            OnError::PassOn {
                errno: libc::EIO,
                diverged: true
            }
        );
        assert_eq!(
            on_local_error(OnIoError::PassOn, enospc, true),
            OnError::PassOn {
                errno: libc::ENOSPC,
                diverged: true
            }
        );
        assert_eq!(
            on_local_error(OnIoError::PassOn, gone, false),
            OnError::PassOn {
                errno: libc::EIO,
                diverged: false
            }
        );
        for p in [OnIoError::Detach, OnIoError::PassOn] {
            assert_eq!(
                on_local_error(p, ErrorClass::Request, true),
                OnError::Return
            );
        }
    }

    #[test]
    fn serving_peers() {
        assert!(good(0).serves_data());
        let mut p = good(0);
        p.repl = ReplState::SyncSource;
        assert!(p.serves_data());
        p.repl = ReplState::SyncTarget;
        assert!(!p.serves_data());
        p = good(0);
        p.disk = DiskState::Consistent;
        assert!(!p.serves_data());
        p = good(0);
        p.conn = ConnState::Connecting;
        assert!(!p.serves_data());
        assert!(!peer_persists_writes(DiskState::Diskless));
        assert!(!peer_persists_writes(DiskState::Failed));
        assert!(peer_persists_writes(DiskState::Inconsistent));
        assert!(peer_persists_writes(DiskState::UpToDate));
    }

    #[test]
    fn read_peer_picks_least_loaded_up_to_date() {
        let bad = peer(
            ConnState::Connected,
            ReplState::Established,
            DiskState::Diskless,
            0,
        );
        assert_eq!(
            read_peer(DiskState::Diskless, &[bad, good(3), good(1)]),
            Ok(2)
        );
        assert_eq!(read_peer(DiskState::Diskless, &[good(1), good(1)]), Ok(0));
        assert_eq!(
            read_peer(DiskState::Failed, &[bad]),
            Err(NoDataPath {
                disk: DiskState::Failed
            })
        );
        assert!(read_peer(DiskState::Diskless, &[]).is_err());
    }

    #[test]
    fn local_data_states() {
        for d in DiskState::ALL {
            let want = if d.is_consistent() {
                LocalData::Usable
            } else if d.has_disk() {
                LocalData::Resyncing
            } else {
                LocalData::Absent
            };
            assert_eq!(local_data(*d), want, "{d}");
        }
    }

    #[test]
    fn read_and_write_plans() {
        let peers = [good(0)];
        assert_eq!(read_source(DiskState::UpToDate, &[]), Ok(ReadSource::Local));
        assert_eq!(
            read_source(DiskState::Diskless, &peers),
            Ok(ReadSource::Peer(0))
        );
        assert_eq!(
            read_source(DiskState::Inconsistent, &peers),
            Ok(ReadSource::Peer(0))
        );
        assert!(read_source(DiskState::Diskless, &[]).is_err());

        assert_eq!(
            write_plan(DiskState::UpToDate, &[]),
            Ok(WritePlan {
                local: true,
                peer_written: false
            })
        );
        assert_eq!(
            write_plan(DiskState::Diskless, &peers),
            Ok(WritePlan {
                local: false,
                peer_written: true
            })
        );
        assert_eq!(
            write_plan(DiskState::Inconsistent, &peers),
            Ok(WritePlan {
                local: true,
                peer_written: true
            })
        );
        assert_eq!(
            write_plan(DiskState::Diskless, &[]),
            Err(NoDataPath {
                disk: DiskState::Diskless
            })
        );
        let err = write_plan(DiskState::Failed, &[]).unwrap_err().to_string();
        assert!(err.contains("no connected up-to-date peer"), "{err}");
    }

    #[test]
    fn peer_write_needs_a_serving_peer_that_wrote() {
        assert!(peer_write_outcome(&[(true, true)]).is_ok());
        assert!(peer_write_outcome(&[(false, true), (true, true)]).is_ok());
        assert!(peer_write_outcome(&[(true, false)]).is_err());
        assert!(peer_write_outcome(&[(false, true)]).is_err());
        assert!(peer_write_outcome(&[]).is_err());
    }

    #[test]
    fn attach_and_detach_rules() {
        assert_eq!(may_attach(DiskState::Diskless), Ok(()));
        assert_eq!(
            may_attach(DiskState::UpToDate),
            Err(AdminRefusal::Attached(DiskState::UpToDate))
        );
        assert!(may_attach(DiskState::Failed).is_err());
        assert_eq!(
            may_detach(DiskState::UpToDate, false, &[good(0)], false),
            Ok(())
        );
        assert_eq!(
            may_detach(DiskState::Inconsistent, true, &[good(0)], false),
            Ok(())
        );
        assert_eq!(
            may_detach(DiskState::UpToDate, true, &[], true),
            Err(AdminRefusal::NoPeerForPrimary)
        );
        assert_eq!(
            may_detach(DiskState::Diskless, false, &[good(0)], false),
            Err(AdminRefusal::NotAttached(DiskState::Diskless))
        );
        // The only up-to-date copy in reach: a sync source of an Inconsistent peer, or a
        // Secondary whose peers are gone. Its disk would come back Inconsistent.
        let mut target = good(0);
        target.disk = DiskState::Inconsistent;
        target.repl = ReplState::SyncTarget;
        let mut gone = good(0);
        gone.conn = ConnState::Connecting;
        for peers in [&[target][..], &[gone], &[]] {
            assert_eq!(
                may_detach(DiskState::UpToDate, false, peers, false),
                Err(AdminRefusal::LastUpToDate)
            );
            assert_eq!(may_detach(DiskState::UpToDate, false, peers, true), Ok(()));
        }
        // A disk that is not up to date loses nobody anything.
        assert_eq!(may_detach(DiskState::Outdated, false, &[], false), Ok(()));
    }

    #[test]
    fn differing_blocks_are_merged() {
        let a = [1u8; 16];
        let b = [2u8; 16];
        assert!(differing_ranges(0, 3 * 4096, 4096, &[a, a, a], &[a, a, a]).is_empty());
        assert_eq!(
            differing_ranges(8192, 4 * 4096, 4096, &[a, b, b, a], &[a, a, a, a]),
            vec![(12288, 8192)]
        );
        assert_eq!(
            differing_ranges(0, 3 * 4096, 4096, &[b, a, b], &[a, a, a]),
            vec![(0, 4096), (8192, 4096)]
        );
        // A short last block, and a missing digest, count as different.
        assert_eq!(
            differing_ranges(0, 4096 + 100, 4096, &[a, a], &[a]),
            vec![(4096, 100)]
        );
    }
}
