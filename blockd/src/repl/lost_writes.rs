//! The truth about asynchronous replication (protocols A and B), as pure bookkeeping:
//!
//! - on the Primary, per peer session, a [`Ledger`]: every write its NBD clients were told is
//!   done (acknowledged) counts in `acked` (cumulative for the session, reported to the peer) and,
//!   while the peer has not confirmed it as written to its disk, in `unconfirmed` (the writes a
//!   crash of this node now would lose: queued, in flight, or received but not yet written);
//! - on a Secondary, per session with the Primary, a [`Hearing`]: the last `acked` figure the
//!   Primary reported, and the writes that arrived. When the link is lost,
//!   [`Hearing::never_received`] is a lower bound of the acknowledged writes this node never
//!   got (what a promotion of this node loses), and [`loss_warning`] words it for `blockctl`.
//!
//! Writes travel on the link in the order they were queued, and a report is sent ahead of the
//! data still queued when it is sent (see `repl::peer`), so a report can announce acknowledged
//! writes that are still behind it on the link: exactly those a lost link never delivers.

use serde::{Deserialize, Serialize};

/// A number of writes and their bytes (a zeroing counts its range).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub writes: u64,
    pub bytes: u64,
}

impl Tally {
    pub const ZERO: Tally = Tally {
        writes: 0,
        bytes: 0,
    };

    pub fn is_zero(&self) -> bool {
        self.writes == 0 && self.bytes == 0
    }

    /// One more write of `bytes`.
    pub fn add(&mut self, bytes: u64) {
        self.writes = self.writes.saturating_add(1);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// One write of `bytes` less (never below zero).
    pub fn remove(&mut self, bytes: u64) {
        self.writes = self.writes.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// The larger of each figure (reports are cumulative: an older one never lowers them).
    pub fn max(self, other: Tally) -> Tally {
        Tally {
            writes: self.writes.max(other.writes),
            bytes: self.bytes.max(other.bytes),
        }
    }
}

/// The Primary's account of the client-acknowledged writes of one peer session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Every write of this session acknowledged to a client (reported to the peer).
    pub acked: Tally,
    /// Acknowledged writes the peer has not confirmed as written yet.
    pub unconfirmed: Tally,
}

impl Ledger {
    /// A write of this session was acknowledged to its client; `pending` says whether the peer
    /// has not confirmed it as written yet (else it already did: it is only `acked`).
    pub fn client_acked(&mut self, bytes: u64, pending: bool) {
        self.acked.add(bytes);
        if pending {
            self.unconfirmed.add(bytes);
        }
    }

    /// The peer confirmed a write as written; `client_acked` says whether that write had been
    /// acknowledged to its client already (then it leaves `unconfirmed`).
    pub fn peer_wrote(&mut self, bytes: u64, client_acked: bool) {
        if client_acked {
            self.unconfirmed.remove(bytes);
        }
    }
}

/// A Secondary's view of its session with the Primary: the last figure of acknowledged writes
/// the Primary reported, and the writes that arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hearing {
    /// The highest report (`acked` of the Primary's [`Ledger`]).
    pub reported_acked: Tally,
    /// Writes (`Data`, `Zero`) received on this session.
    pub received: Tally,
}

impl Hearing {
    /// The Primary reported its acknowledged writes.
    pub fn report(&mut self, acked: Tally) {
        self.reported_acked = self.reported_acked.max(acked);
    }

    /// A write of `bytes` arrived.
    pub fn received(&mut self, bytes: u64) {
        self.received.add(bytes);
    }

    /// At least this many of the writes the Primary reported as acknowledged never arrived
    /// (zero when none is known to be missing).
    ///
    /// The writes that arrived are a prefix of those the Primary sent on the session, and each
    /// acknowledged write is one of those sent: at most `received` of the acknowledged ones can
    /// be here, so `acked - received` (writes, and bytes) are missing for sure. A missing byte
    /// means a missing write, and a missing write at least one missing byte.
    pub fn never_received(&self) -> Tally {
        let writes = self
            .reported_acked
            .writes
            .saturating_sub(self.received.writes);
        let bytes = self
            .reported_acked
            .bytes
            .saturating_sub(self.received.bytes);
        Tally {
            writes: writes.max(u64::from(bytes > 0)),
            bytes: bytes.max(writes),
        }
    }
}

/// What a Secondary knows it lacks from the last Primary it was connected to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownLoss {
    /// The node that was Primary.
    pub primary: String,
    /// Acknowledged writes (and their bytes) that never arrived here, at least.
    pub lost: Tally,
}

/// Bytes in binary units, one decimal when not whole (`148 KiB`, `1.5 MiB`, `512 bytes`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    let rounded = (v * 10.0).round() / 10.0;
    if rounded.fract() == 0.0 {
        format!("{} {}", rounded as u64, UNITS[u])
    } else {
        format!("{rounded:.1} {}", UNITS[u])
    }
}

/// The warning `blockctl promote` prints before promoting a node that lacks acknowledged
/// writes (`None` when none is known to be lost).
pub fn loss_warning(resource: &str, loss: &KnownLoss) -> Option<String> {
    if loss.lost.is_zero() {
        return None;
    }
    let n = loss.lost.writes;
    Some(format!(
        "promote {resource}: the last Primary ({}) had acknowledged at least {n} write{} ({}) \
         that this node never received; they will be lost",
        loss.primary,
        if n == 1 { "" } else { "s" },
        human_bytes(loss.lost.bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(writes: u64, bytes: u64) -> Tally {
        Tally { writes, bytes }
    }

    #[test]
    fn ledger_counts_acknowledged_writes_until_the_peer_wrote_them() {
        let mut l = Ledger::default();
        // Protocol A: acknowledged while queued; the peer writes it later.
        l.client_acked(4096, true);
        l.client_acked(8192, true);
        assert_eq!(l.unconfirmed, t(2, 12288));
        l.peer_wrote(4096, true);
        assert_eq!(l.unconfirmed, t(1, 8192));
        // The peer wrote it before the client was told (fast peer): acked, never unconfirmed.
        l.client_acked(512, false);
        assert_eq!(l.unconfirmed, t(1, 8192));
        // A write the peer confirms before its client ack does not touch the figure.
        l.peer_wrote(1 << 20, false);
        assert_eq!(l.unconfirmed, t(1, 8192));
        l.peer_wrote(8192, true);
        assert_eq!(l.unconfirmed, Tally::ZERO);
        assert_eq!(l.acked, t(3, 4096 + 8192 + 512));
        // Never below zero, whatever the order of events.
        l.peer_wrote(1, true);
        assert_eq!(l.unconfirmed, Tally::ZERO);
    }

    #[test]
    fn reports_are_cumulative() {
        let mut h = Hearing::default();
        h.report(t(10, 40960));
        h.report(t(7, 28672));
        assert_eq!(h.reported_acked, t(10, 40960));
    }

    #[test]
    fn nothing_missing_when_everything_reported_arrived() {
        let mut h = Hearing::default();
        for _ in 0..5 {
            h.received(4096);
        }
        h.report(t(5, 20480));
        assert_eq!(h.never_received(), Tally::ZERO);
        // Protocol B/C: more arrived than was acknowledged when the report left.
        h.received(4096);
        assert_eq!(h.never_received(), Tally::ZERO);
        // No report at all: nothing known.
        assert_eq!(Hearing::default().never_received(), Tally::ZERO);
    }

    #[test]
    fn acknowledged_writes_behind_the_report_are_missing() {
        let mut h = Hearing::default();
        h.received(4096);
        h.received(4096);
        h.report(t(39, 39 * 4096));
        assert_eq!(h.never_received(), t(37, 37 * 4096));
    }

    #[test]
    fn a_missing_byte_is_a_missing_write_and_back() {
        // Three writes arrived (small ones) but the three acknowledged are larger.
        let h = Hearing {
            reported_acked: t(3, 3 * 65536),
            received: t(3, 3 * 512),
        };
        assert_eq!(h.never_received(), t(1, 3 * 65536 - 3 * 512));
        // More writes missing than bytes (many zero-length-looking figures): bytes >= writes.
        let h = Hearing {
            reported_acked: t(10, 100),
            received: t(2, 100),
        };
        assert_eq!(h.never_received(), t(8, 8));
    }

    #[test]
    fn warning_text() {
        let loss = KnownLoss {
            primary: "alpha".into(),
            lost: t(37, 148 << 10),
        };
        assert_eq!(
            loss_warning("r0", &loss).unwrap(),
            "promote r0: the last Primary (alpha) had acknowledged at least 37 writes (148 KiB) \
             that this node never received; they will be lost"
        );
        let one = KnownLoss {
            primary: "b".into(),
            lost: t(1, 512),
        };
        assert!(
            loss_warning("r1", &one)
                .unwrap()
                .contains("at least 1 write (512 bytes) that")
        );
        assert_eq!(loss_warning("r0", &KnownLoss::default()), None);
    }

    #[test]
    fn byte_units() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1024), "1 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3 MiB");
        assert_eq!(human_bytes(u64::MAX), "16384 PiB");
    }
}
