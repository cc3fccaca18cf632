//! Quorum: may this node (be or become) Primary, given which nodes it can reach?
//!
//! Counting rules (all node sets are bit masks of node ids):
//! - Voters are the configured nodes, minus nodes that *departed cleanly* (they outdated their
//!   own disk and said goodbye, so they can never be promoted without a resync: DRBD's "last
//!   man standing"). A node that just vanished still votes — it might be a partition.
//! - Present voters are the voters this node reaches, itself included.
//! - `off`: always quorum. `N`: at least N present voters. `majority`: more than half of the
//!   voters present; on an exact half (an even split), the half that contains the lowest voter
//!   node id has quorum, so exactly one side of any even split wins (in a 2-node cluster, the
//!   node with the lower id keeps quorum alone; the other needs it to promote).

use std::fmt;
use std::str::FromStr;

/// The `quorum` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QuorumSetting {
    /// No quorum: any node may be Primary (two-node clusters without a tie-breaker).
    #[default]
    Off,
    /// More than half of the voters (ties broken by the lowest node id).
    Majority,
    /// At least this many present voters.
    AtLeast(u8),
}

impl fmt::Display for QuorumSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuorumSetting::Off => f.write_str("off"),
            QuorumSetting::Majority => f.write_str("majority"),
            QuorumSetting::AtLeast(n) => write!(f, "{n}"),
        }
    }
}

/// A `quorum` value that is neither `off`, `majority` nor a node count 1..=32.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quorum {0:?} (expected off, majority or a node count 1..=32)")]
pub struct InvalidQuorum(pub String);

impl FromStr for QuorumSetting {
    type Err = InvalidQuorum;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(QuorumSetting::Off),
            "majority" => Ok(QuorumSetting::Majority),
            n => match n.parse::<u8>() {
                Ok(n @ 1..=32) => Ok(QuorumSetting::AtLeast(n)),
                _ => Err(InvalidQuorum(s.to_string())),
            },
        }
    }
}

super::names::named_enum! {
    /// What a Primary does with I/O while it has no quorum (`on-no-quorum`).
    pub enum OnNoQuorum: "on-no-quorum action" {
        /// Hold I/O until quorum returns (or the node is demoted).
        SuspendIo = "suspend-io",
        /// Fail I/O with EIO.
        IoError = "io-error",
    }
}

/// Who the node can count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuorumInput {
    /// This node's id.
    pub me: u8,
    /// Configured nodes (bit i = node id i).
    pub members: u32,
    /// Nodes currently connected to this node (this node's own bit is implied).
    pub reachable: u32,
    /// Nodes that left cleanly with an outdated disk; they do not vote.
    pub departed: u32,
}

/// Why quorum is held or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuorumVerdict {
    pub quorum: bool,
    /// Present voters (self included).
    pub present: u32,
    /// Voters.
    pub voters: u32,
    /// The exact-half tie-break decided.
    pub tie_break: bool,
}

/// Decides quorum for `input` under `setting`.
pub fn decide(setting: QuorumSetting, input: &QuorumInput) -> QuorumVerdict {
    let me_bit = 1u32.checked_shl(input.me as u32).unwrap_or(0);
    let voters_mask = input.members & !input.departed;
    let present_mask = (input.reachable | me_bit) & voters_mask;
    let voters = voters_mask.count_ones();
    let present = present_mask.count_ones();
    let verdict = |quorum, tie_break| QuorumVerdict {
        quorum,
        present,
        voters,
        tie_break,
    };
    match setting {
        QuorumSetting::Off => verdict(true, false),
        QuorumSetting::AtLeast(n) => verdict(present >= u32::from(n), false),
        QuorumSetting::Majority => {
            if present * 2 > voters {
                verdict(true, false)
            } else if present * 2 == voters && voters > 0 {
                // Exact half: the half holding the lowest voter id wins.
                let lowest = voters_mask & voters_mask.wrapping_neg();
                verdict(present_mask & lowest != 0, true)
            } else {
                verdict(false, false)
            }
        }
    }
}

/// May a Primary that lost a peer start its new generation now? Only when the peers that
/// just *confirmed* they are alive (`answered`: a round trip after the loss; DRBD 9.0.20 likewise
/// pings its peers to check quorum before creating a new current UUID after a loss) still make
/// a quorum. Counting the peers that merely still look connected is not enough: when a
/// partition cuts several links at once they time out one after another, and a generation
/// started between the first and the last timeout is known to this node only. No write under
/// it can then be acknowledged (quorum is gone before the acks), yet on reconnect it would look
/// like an independent history (a split brain). Without the new generation the cut-off Primary
/// is simply behind the majority. Always true when quorum is off.
pub fn may_start_generation(setting: QuorumSetting, me: u8, members: u32, answered: u32) -> bool {
    decide(
        setting,
        &QuorumInput {
            me,
            members,
            reachable: answered,
            departed: 0,
        },
    )
    .quorum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(me: u8, members: u32, reachable: u32, departed: u32) -> QuorumInput {
        QuorumInput {
            me,
            members,
            reachable,
            departed,
        }
    }

    #[test]
    fn parse_and_display() {
        assert_eq!("off".parse(), Ok(QuorumSetting::Off));
        assert_eq!("majority".parse(), Ok(QuorumSetting::Majority));
        assert_eq!("2".parse(), Ok(QuorumSetting::AtLeast(2)));
        assert!("0".parse::<QuorumSetting>().is_err());
        assert!("33".parse::<QuorumSetting>().is_err());
        assert!("most".parse::<QuorumSetting>().is_err());
        assert_eq!(QuorumSetting::AtLeast(3).to_string(), "3");
        assert_eq!(QuorumSetting::Majority.to_string(), "majority");
        assert_eq!(QuorumSetting::Off.to_string(), "off");
        assert_eq!("io-error".parse(), Ok(OnNoQuorum::IoError));
    }

    #[test]
    fn off_always_has_quorum() {
        let v = decide(QuorumSetting::Off, &input(0, 0b111, 0, 0));
        assert!(v.quorum);
        assert_eq!((v.present, v.voters), (1, 3));
    }

    /// A three-node partition: exactly one side can be Primary.
    #[test]
    fn three_node_partition() {
        let all = 0b111;
        let alone = decide(QuorumSetting::Majority, &input(0, all, 0, 0));
        assert!(!alone.quorum);
        let pair = decide(QuorumSetting::Majority, &input(1, all, 0b100, 0));
        assert!(pair.quorum);
        assert_eq!((pair.present, pair.voters, pair.tie_break), (2, 3, false));
        // Everyone connected.
        assert!(decide(QuorumSetting::Majority, &input(2, all, 0b011, 0)).quorum);
    }

    #[test]
    fn even_split_tie_break() {
        // Two nodes: node 0 alone keeps quorum, node 1 alone does not.
        let v0 = decide(QuorumSetting::Majority, &input(0, 0b11, 0, 0));
        assert!(v0.quorum && v0.tie_break);
        let v1 = decide(QuorumSetting::Majority, &input(1, 0b11, 0, 0));
        assert!(!v1.quorum && v1.tie_break);
        // Four nodes {1,3,5,7} split {1,7} / {3,5}: the half with node 1 wins.
        let members = 0b1010_1010;
        assert!(decide(QuorumSetting::Majority, &input(7, members, 1 << 1, 0)).quorum);
        assert!(!decide(QuorumSetting::Majority, &input(3, members, 1 << 5, 0)).quorum);
        // Less than half.
        assert!(!decide(QuorumSetting::Majority, &input(1, members, 0, 0)).quorum);
    }

    #[test]
    fn departed_nodes_do_not_vote() {
        // Three nodes; 1 and 2 left cleanly: node 0 is the last man standing.
        let v = decide(QuorumSetting::Majority, &input(0, 0b111, 0, 0b110));
        assert!(v.quorum);
        assert_eq!((v.present, v.voters), (1, 1));
        // A departed node that is reachable still does not count.
        let v = decide(QuorumSetting::AtLeast(2), &input(0, 0b111, 0b010, 0b010));
        assert!(!v.quorum);
        // Everyone departed, including me: no voters, no quorum.
        assert!(!decide(QuorumSetting::Majority, &input(0, 0b1, 0, 0b1)).quorum);
    }

    /// The new generation after a peer loss needs peers that answered after the loss.
    #[test]
    fn new_generation_needs_confirmed_quorum() {
        let all = 0b111;
        // n2 lost n0; n1 answered the probe: 2 of 3, the generation may start.
        assert!(may_start_generation(QuorumSetting::Majority, 2, all, 0b010));
        // n1 did not answer (its link is cut too, not yet timed out): no new generation.
        assert!(!may_start_generation(QuorumSetting::Majority, 2, all, 0));
        // A fixed count.
        assert!(!may_start_generation(
            QuorumSetting::AtLeast(3),
            2,
            all,
            0b010
        ));
        assert!(may_start_generation(
            QuorumSetting::AtLeast(3),
            2,
            all,
            0b011
        ));
        // Quorum off (two nodes without a tie-breaker): always, as before.
        assert!(may_start_generation(QuorumSetting::Off, 1, 0b11, 0));
    }

    #[test]
    fn fixed_count() {
        assert!(decide(QuorumSetting::AtLeast(2), &input(0, 0b111, 0b010, 0)).quorum);
        assert!(!decide(QuorumSetting::AtLeast(3), &input(0, 0b111, 0b010, 0)).quorum);
        // Reachable nodes that are not members do not count.
        assert!(!decide(QuorumSetting::AtLeast(2), &input(0, 0b001, 0b1000, 0)).quorum);
        // Node id 31 works (bit shifts stay in range).
        assert!(decide(QuorumSetting::AtLeast(1), &input(31, 1 << 31, 0, 0)).quorum);
    }
}
