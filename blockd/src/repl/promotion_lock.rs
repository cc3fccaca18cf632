//! The per-resource promotion lock: at most one of several concurrent promotions succeeds.
//!
//! A promotion asks every connected peer for its view before it commits (`repl::promote`).
//! Without a lock, two Secondaries promoted at the same moment each ask the other while
//! neither is Primary yet, both hear "no Primary", and both commit: two Primaries, and NBD
//! clients may write to both before the nodes notice (split brain). DRBD avoids this with a
//! two-phase cluster-wide state change; this is the same idea for promotion only:
//!
//! - A promoting node first takes its own lock ([`PromotionLock::begin`]); it fails while this
//!   node has granted a lease to a peer that is promoting.
//! - Its view request says it intends to promote. The receiver grants it a lease
//!   ([`PromotionLock::requested`]) unless the receiver is promoting itself (`Conflict`) or has
//!   granted a lease to another peer (`Busy`); a refusal names the node holding the promotion,
//!   and the asker refuses to promote.
//! - The promoter releases the leases (`PromoteEnd`) once it committed and announced its new
//!   role, or once it gave up. A lease also ends with the session to its holder, and when the
//!   holder reports itself Primary (its promotion is visible; the role rules take over).
//!
//! Two nodes promoting at once then either both refuse (each finds the other's lock taken:
//! safe, retried by the admin) or the one whose request arrived first wins (the other's
//! `begin`, or its request, finds the lease). Never both.
//!
//! A lease has no time limit on purpose: a promoter whose commit stalls (its metadata disk
//! hangs) may still become Primary, so expiring its lease could let a second node promote
//! beside it. Other nodes refuse to promote until the holder finishes or its session ends
//! (`blockctl disconnect` on the other node ends it at once; on the promoter's own node
//! `disconnect` waits behind the stuck `promote`, as both take the resource's admin lock).
//!
//! Pure state: the caller (`repl::resource`) keeps it under a mutex and does the messaging.

/// Why this node cannot start a promotion, or refuses a peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PromotionBusy {
    #[error("node {node} is being promoted at the same time; retry")]
    Promoting { node: u8 },
}

/// The answer to a peer's request to promote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The peer holds a lease now: this node will not promote, nor grant another peer, until
    /// it is released.
    Granted,
    /// This node (the id) is promoting itself.
    Conflict(u8),
    /// Another peer (the id) holds a lease.
    Busy(u8),
}

impl RequestOutcome {
    /// The node holding a promotion that refuses the request (what a `ViewReply` carries).
    pub fn promoting(self) -> Option<u8> {
        match self {
            RequestOutcome::Granted => None,
            RequestOutcome::Conflict(n) | RequestOutcome::Busy(n) => Some(n),
        }
    }
}

/// One resource's promotion lock (peers named by node id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromotionLock {
    /// This node's id.
    me: u8,
    /// The request id of this node's own promotion in progress.
    mine: Option<u64>,
    /// The lease granted to a promoting peer: its node id and request id. One at a time: a
    /// second peer asking is refused while it is held.
    lease: Option<(u8, u64)>,
}

impl PromotionLock {
    /// An idle lock of node `me`.
    pub fn new(me: u8) -> PromotionLock {
        PromotionLock {
            me,
            mine: None,
            lease: None,
        }
    }

    /// The node whose promotion holds the lock: a peer holding a lease, else this node if it
    /// is promoting. Read only (`promote --dry-run`).
    pub fn holder(&self) -> Option<u8> {
        self.lease
            .map(|(node, _)| node)
            .or(self.mine.map(|_| self.me))
    }

    /// This node starts promoting with request id `id`: refused while a peer holds a lease,
    /// or while another promotion of this node is in progress.
    pub fn begin(&mut self, id: u64) -> Result<(), PromotionBusy> {
        if let Some(node) = self.holder() {
            return Err(PromotionBusy::Promoting { node });
        }
        self.mine = Some(id);
        Ok(())
    }

    /// This node's promotion `id` is over (committed or given up). Another id is left alone.
    pub fn finish(&mut self, id: u64) {
        if self.mine == Some(id) {
            self.mine = None;
        }
    }

    /// Peer `peer` asks, with request `id`, to promote. A peer asking again (a new promotion
    /// of it; its own lock serialises them) replaces its lease.
    pub fn requested(&mut self, peer: u8, id: u64) -> RequestOutcome {
        if self.mine.is_some() {
            return RequestOutcome::Conflict(self.me);
        }
        if let Some((other, _)) = self.lease.filter(|&(n, _)| n != peer) {
            return RequestOutcome::Busy(other);
        }
        self.lease = Some((peer, id));
        RequestOutcome::Granted
    }

    /// Peer `peer` released the lease of its request `id` (`PromoteEnd`). A release of an
    /// older request leaves a newer lease alone.
    pub fn released(&mut self, peer: u8, id: u64) {
        if self.lease == Some((peer, id)) {
            self.lease = None;
        }
    }

    /// Peer `peer`'s lease ends whatever its request: the session with it ended, or it
    /// reported itself Primary.
    pub fn peer_gone(&mut self, peer: u8) {
        if self.lease.is_some_and(|(n, _)| n == peer) {
            self.lease = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(node: u8) -> Result<(), PromotionBusy> {
        Err(PromotionBusy::Promoting { node })
    }

    #[test]
    fn an_idle_lock_grants_and_begins() {
        let mut a = PromotionLock::new(0);
        assert_eq!(a.holder(), None);
        assert_eq!(a.begin(7), Ok(()));
        assert_eq!(a.holder(), Some(0));
        a.finish(7);
        assert_eq!(a.holder(), None);
        assert_eq!(a.requested(1, 9), RequestOutcome::Granted);
        assert_eq!(a.holder(), Some(1));
    }

    #[test]
    fn a_lease_blocks_local_promotion_and_other_peers_until_released() {
        let mut a = PromotionLock::new(0);
        assert_eq!(a.requested(1, 10), RequestOutcome::Granted);
        assert_eq!(a.begin(20), busy(1));
        assert_eq!(a.requested(2, 30), RequestOutcome::Busy(1));
        // A release of another request id (an older one) keeps the lease.
        a.released(1, 11);
        assert_eq!(a.begin(20), busy(1));
        a.released(1, 10);
        assert_eq!(a.begin(20), Ok(()));
    }

    #[test]
    fn a_promoting_node_refuses_every_peer() {
        let mut a = PromotionLock::new(3);
        a.begin(1).unwrap();
        assert_eq!(a.requested(1, 2), RequestOutcome::Conflict(3));
        assert_eq!(a.requested(2, 2), RequestOutcome::Conflict(3));
        // Refused requests hold nothing: once this promotion is over, they may ask again.
        a.finish(1);
        assert_eq!(a.holder(), None);
        assert_eq!(a.requested(2, 5), RequestOutcome::Granted);
    }

    #[test]
    fn a_second_local_promotion_is_refused_while_one_runs() {
        let mut a = PromotionLock::new(4);
        a.begin(1).unwrap();
        assert_eq!(a.begin(2), busy(4));
        // Finishing the refused one does not end the running one.
        a.finish(2);
        assert_eq!(a.holder(), Some(4));
        a.finish(1);
        assert_eq!(a.begin(2), Ok(()));
    }

    #[test]
    fn a_peer_asking_again_replaces_its_lease() {
        let mut a = PromotionLock::new(0);
        assert_eq!(a.requested(1, 10), RequestOutcome::Granted);
        assert_eq!(a.requested(1, 11), RequestOutcome::Granted);
        a.released(1, 10);
        assert_eq!(a.holder(), Some(1));
        a.released(1, 11);
        assert_eq!(a.holder(), None);
    }

    #[test]
    fn the_session_ending_or_the_holder_becoming_primary_drops_its_lease() {
        let mut a = PromotionLock::new(0);
        a.requested(2, 10);
        a.peer_gone(1);
        assert_eq!(a.begin(1), busy(2));
        a.peer_gone(2);
        assert_eq!(a.begin(1), Ok(()));
    }

    /// Nodes `a` (id 0) and `b` (id 1) are both asked to promote: each takes its own lock,
    /// then each one's request reaches the other. `a_won`/`b_won`: whether it may commit
    /// (its `begin` succeeded and the other granted its request).
    fn race(
        b_begins_before_a_request_arrives: bool,
        a_begins_before_b_request_arrives: bool,
    ) -> (bool, bool) {
        let mut a = PromotionLock::new(0);
        let mut b = PromotionLock::new(1);
        let mut a_ok = None;
        let mut b_ok = None;
        // Each node's events in its own order; the two nodes interleave as given.
        if a_begins_before_b_request_arrives {
            a_ok = Some(a.begin(100).is_ok());
        }
        if b_begins_before_a_request_arrives {
            b_ok = Some(b.begin(200).is_ok());
        }
        // The requests arrive (a begun node asks; a node that did not begin yet has not).
        let mut b_granted_a = false;
        let mut a_granted_b = false;
        if a_ok == Some(true) {
            b_granted_a = b.requested(0, 100) == RequestOutcome::Granted;
        }
        if b_ok == Some(true) {
            a_granted_b = a.requested(1, 200) == RequestOutcome::Granted;
        }
        // Late beginners start now, then ask.
        if a_ok.is_none() {
            a_ok = Some(a.begin(100).is_ok());
            if a_ok == Some(true) {
                b_granted_a = b.requested(0, 100) == RequestOutcome::Granted;
            }
        }
        if b_ok.is_none() {
            b_ok = Some(b.begin(200).is_ok());
            if b_ok == Some(true) {
                a_granted_b = a.requested(1, 200) == RequestOutcome::Granted;
            }
        }
        (
            a_ok == Some(true) && b_granted_a,
            b_ok == Some(true) && a_granted_b,
        )
    }

    #[test]
    fn two_nodes_promoting_at_once_never_both_win() {
        // Both lock before either request arrives: both refuse (each sees the other's lock).
        assert_eq!(race(true, true), (false, false));
        // `a` locks and its request reaches `b` before `b` locks: `a` wins, `b` finds the lease.
        assert_eq!(race(false, true), (true, false));
        // The mirror image.
        assert_eq!(race(true, false), (false, true));
    }

    #[test]
    fn two_nodes_asking_a_third_get_one_lease() {
        // `a` and `b` do not see each other (or did not ask each other yet); `c` decides.
        let mut c = PromotionLock::new(2);
        assert_eq!(c.requested(0, 1), RequestOutcome::Granted);
        assert_eq!(c.requested(1, 2), RequestOutcome::Busy(0));
        assert_eq!(RequestOutcome::Busy(0).promoting(), Some(0));
        assert_eq!(RequestOutcome::Granted.promoting(), None);
        // `a` gave up: `b` may try again.
        c.released(0, 1);
        assert_eq!(c.requested(1, 3), RequestOutcome::Granted);
        assert_eq!(c.begin(4), busy(1));
    }

    #[test]
    fn the_refusal_names_the_node_and_says_retry() {
        let text = PromotionBusy::Promoting { node: 2 }.to_string();
        assert_eq!(text, "node 2 is being promoted at the same time; retry");
    }
}
