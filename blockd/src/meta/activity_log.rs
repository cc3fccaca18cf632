//! The activity log: the set of "hot" extents (4 MiB by default) that may have writes in flight.
//! Before the first write to a cold extent, a transaction naming it is persisted in a ring of
//! 4 KiB records; after a crash, replaying the ring yields every extent that might differ
//! between this node and its peers, and only those are resynced.
//!
//! The log holds `capacity` slots (the `al-extents` setting), each naming one extent or none.
//! A transaction sets up to [`MAX_UPDATES`] slots and also repeats a window of [`MAX_CONTEXT`]
//! slots ("context", cycling through all slots), so the newest `ceil(capacity / MAX_CONTEXT)`
//! transactions always describe every slot. Record layout:
//!
//! ```text
//!   0  magic "BDAL"     4  n_updates u16     6  n_context u16
//!   8  seq u64 (transaction number, +1 per transaction)
//!  16  capacity u32     20  context_start u32
//!  24  updates: MAX_UPDATES x { slot u32, extent u32 }
//! 280  context: MAX_CONTEXT x extent u32 (slots context_start..)
//! 4092 crc32 over bytes 0..4092
//! ```
//! Extent `u32::MAX` means "slot empty". An all-zero record is an unused ring position.

use std::collections::HashMap;

use super::layout::RECORD_SIZE;
use super::{MetaError, Record, check_crc, seal};

const MAGIC: [u8; 4] = *b"BDAL";
/// Slot updates per transaction.
pub const MAX_UPDATES: usize = 32;
const UPDATES_AT: usize = 24;
const CONTEXT_AT: usize = UPDATES_AT + MAX_UPDATES * 8;
/// Context entries per transaction.
pub const MAX_CONTEXT: usize = (RECORD_SIZE as usize - 4 - CONTEXT_AT) / 4;
/// An empty slot.
pub const NO_EXTENT: u32 = u32::MAX;

/// Transactions needed to describe every slot of a log of `capacity` slots.
pub fn window_for(capacity: u32) -> u32 {
    (capacity as usize).div_ceil(MAX_CONTEXT).max(1) as u32
}

/// Ring records for a log of `capacity` slots: room for two full windows plus slack, so a torn
/// newest record never overwrites a record the replay still needs.
pub fn ring_len_for(capacity: u32) -> u32 {
    (2 * window_for(capacity) + 2).max(8)
}

/// One activity-log transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub seq: u64,
    pub capacity: u32,
    /// `(slot, extent)` pairs applied after the context.
    pub updates: Vec<(u32, u32)>,
    pub context_start: u32,
    /// Extents of slots `context_start..context_start + context.len()`.
    pub context: Vec<u32>,
}

impl Transaction {
    /// Encodes into one 4 KiB record.
    ///
    /// # Panics
    /// If there are more than [`MAX_UPDATES`] updates or [`MAX_CONTEXT`] context entries
    /// (the [`ActivityLog`] never builds such a transaction).
    pub fn encode(&self) -> [u8; RECORD_SIZE as usize] {
        assert!(self.updates.len() <= MAX_UPDATES && self.context.len() <= MAX_CONTEXT);
        let mut r = [0u8; RECORD_SIZE as usize];
        r[0..4].copy_from_slice(&MAGIC);
        r[4..6].copy_from_slice(&(self.updates.len() as u16).to_le_bytes());
        r[6..8].copy_from_slice(&(self.context.len() as u16).to_le_bytes());
        r[8..16].copy_from_slice(&self.seq.to_le_bytes());
        r[16..20].copy_from_slice(&self.capacity.to_le_bytes());
        r[20..24].copy_from_slice(&self.context_start.to_le_bytes());
        for (i, (slot, ext)) in self.updates.iter().enumerate() {
            let at = UPDATES_AT + i * 8;
            r[at..at + 4].copy_from_slice(&slot.to_le_bytes());
            r[at + 4..at + 8].copy_from_slice(&ext.to_le_bytes());
        }
        for (i, ext) in self.context.iter().enumerate() {
            let at = CONTEXT_AT + i * 4;
            r[at..at + 4].copy_from_slice(&ext.to_le_bytes());
        }
        seal(&mut r);
        r
    }

    /// Decodes ring record `slot` (at area offset `offset`): `Ok(None)` for an unused (all-zero)
    /// record.
    pub fn decode(rec: &[u8], slot: u32, offset: u64) -> Result<Option<Transaction>, MetaError> {
        let record = Record::ActivityLog(slot);
        if rec.len() != RECORD_SIZE as usize {
            return Err(MetaError::SizeMismatch {
                what: "activity-log record",
                expected: RECORD_SIZE,
                found: rec.len() as u64,
            });
        }
        if rec.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if rec[0..4] != MAGIC {
            return Err(MetaError::BadMagic {
                record,
                offset,
                found: rec[0..4].to_vec(),
            });
        }
        check_crc(rec, record, offset)?;
        let u16_at = |at: usize| u16::from_le_bytes([rec[at], rec[at + 1]]) as usize;
        let u32_at = |at: usize| u32::from_le_bytes(rec[at..at + 4].try_into().expect("4"));
        let (n_updates, n_context) = (u16_at(4), u16_at(6));
        let capacity = u32_at(16);
        let context_start = u32_at(20);
        let bad = |reason: String| MetaError::ActivityLog(format!("{record}: {reason}"));
        if n_updates > MAX_UPDATES || n_context > MAX_CONTEXT {
            return Err(bad(format!(
                "{n_updates} updates / {n_context} context entries"
            )));
        }
        if capacity == 0 || context_start as usize + n_context > capacity as usize {
            return Err(bad(format!(
                "context {context_start}+{n_context} outside capacity {capacity}"
            )));
        }
        let updates: Vec<(u32, u32)> = (0..n_updates)
            .map(|i| (u32_at(UPDATES_AT + i * 8), u32_at(UPDATES_AT + i * 8 + 4)))
            .collect();
        if let Some((slot, _)) = updates.iter().find(|(s, _)| *s >= capacity) {
            return Err(bad(format!(
                "update of slot {slot} outside capacity {capacity}"
            )));
        }
        // Unused update and context entries must be zero: a record is all or nothing.
        let used_end = [UPDATES_AT + n_updates * 8, CONTEXT_AT + n_context * 4];
        if rec[used_end[0]..CONTEXT_AT].iter().any(|&b| b != 0)
            || rec[used_end[1]..RECORD_SIZE as usize - 4]
                .iter()
                .any(|&b| b != 0)
        {
            return Err(bad("non-zero bytes in unused entries".into()));
        }
        Ok(Some(Transaction {
            seq: u64::from_le_bytes(rec[8..16].try_into().expect("8")),
            capacity,
            updates,
            context_start,
            context: (0..n_context).map(|i| u32_at(CONTEXT_AT + i * 4)).collect(),
        }))
    }
}

/// What one ring position held.
#[derive(Debug)]
pub enum RingRecord {
    Unused,
    Valid(Transaction),
    Damaged(MetaError),
}

/// Replays a ring (record `i` at ring position `i`) into the slots of a log of `capacity`:
/// returns the slot contents and the sequence number and ring position for the next
/// transaction.
///
/// The newest valid transaction and the `window - 1` before it must be intact and consecutive.
/// A damaged record is tolerated only directly after the newest one (the torn write of a
/// transaction whose data writes never started). Anything else is refused.
pub fn replay(capacity: u32, ring: Vec<RingRecord>) -> Result<ReplayedLog, MetaError> {
    let len = ring.len() as u32;
    let bad = |m: String| Err(MetaError::ActivityLog(m));
    if len < ring_len_for(capacity) {
        return bad(format!(
            "ring of {len} records is too small for {capacity} extents"
        ));
    }
    let mut txs: Vec<Option<Transaction>> = Vec::with_capacity(ring.len());
    let mut damaged = Vec::new();
    for (pos, rec) in ring.into_iter().enumerate() {
        match rec {
            RingRecord::Unused => txs.push(None),
            RingRecord::Valid(t) => {
                if t.capacity != capacity {
                    return bad(format!(
                        "record {pos} is for {} extents, metadata says {capacity}",
                        t.capacity
                    ));
                }
                txs.push(Some(t));
            }
            RingRecord::Damaged(e) => {
                damaged.push((pos as u32, e));
                txs.push(None);
            }
        }
    }
    let newest = txs
        .iter()
        .enumerate()
        .filter_map(|(pos, t)| t.as_ref().map(|t| (t.seq, pos as u32)))
        .max();
    let Some((newest_seq, newest_pos)) = newest else {
        // Nothing ever logged. Damage in a never-used ring is still corruption.
        if let Some((_, e)) = damaged.into_iter().next() {
            return Err(e);
        }
        return Ok(ReplayedLog {
            slots: vec![NO_EXTENT; capacity as usize],
            next_seq: 0,
            next_pos: 0,
            next_context: 0,
        });
    };
    for (pos, e) in damaged {
        if pos != (newest_pos + 1) % len {
            return Err(e);
        }
    }
    // Transactions are written at consecutive ring positions with consecutive sequence numbers.
    let window = u64::from(window_for(capacity)).min(newest_seq + 1);
    let mut chain = Vec::with_capacity(window as usize);
    for back in 0..window {
        let pos = (newest_pos + len - (back % u64::from(len)) as u32) % len;
        match &txs[pos as usize] {
            Some(t) if t.seq == newest_seq - back => chain.push(t),
            _ => {
                return bad(format!(
                    "transaction {} missing at ring position {pos} (newest is {newest_seq})",
                    newest_seq - back
                ));
            }
        }
    }
    let newest = chain[0];
    let next_context = (newest.context_start + newest.context.len() as u32) % capacity;
    let mut slots = vec![NO_EXTENT; capacity as usize];
    for t in chain.into_iter().rev() {
        let start = t.context_start as usize;
        slots[start..start + t.context.len()].copy_from_slice(&t.context);
        for &(slot, ext) in &t.updates {
            slots[slot as usize] = ext;
        }
    }
    Ok(ReplayedLog {
        slots,
        next_seq: newest_seq + 1,
        next_pos: (newest_pos + 1) % len,
        next_context,
    })
}

/// The state recovered from a ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayedLog {
    /// Extent per slot ([`NO_EXTENT`] when empty).
    pub slots: Vec<u32>,
    pub next_seq: u64,
    pub next_pos: u32,
    /// The slot the next transaction's context starts at: where the newest one's ended.
    /// Replay reads only the last `window` transactions, so their contexts must go on
    /// round the slots from there; restarting at slot 0 would leave the slots after the
    /// previous context out of every window a crash could replay.
    pub next_context: u32,
}

impl ReplayedLog {
    /// The extents that may have had writes in flight.
    pub fn active_extents(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .slots
            .iter()
            .copied()
            .filter(|&e| e != NO_EXTENT)
            .collect();
        v.sort_unstable();
        v
    }
}

/// A transaction to persist (at ring position `pos`) before the writes it covers start, and
/// the extents it evicted: their bitmap pages must be written before the transaction, so no
/// change tracked only in memory leaves the log's protection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingTransaction {
    pub pos: u32,
    pub tx: Transaction,
    pub evicted: Vec<u32>,
    /// Per update (same order as `tx.updates`): the extent its slot held before and that
    /// slot's last use, to undo the update when the transaction cannot be persisted
    /// ([`ActivityLog::persist_failed`]).
    previous: Vec<(u32, u64)>,
}

/// Why a write cannot enter the activity log now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AlBusy {
    /// Every slot is held by an extent with writes in flight: retry after a completion.
    #[error("all activity-log extents have writes in flight")]
    Full,
    /// The write spans more extents than the log holds.
    #[error("write spans {0} extents, more than the activity log holds")]
    TooLarge(u32),
}

/// The in-memory activity log: which extents are hot, their in-flight write counts, and the
/// transactions needed when a cold extent becomes hot (least recently used cold slot reused).
#[derive(Clone, Debug)]
pub struct ActivityLog {
    slots: Vec<u32>,
    inflight: Vec<u32>,
    last_use: Vec<u64>,
    index: HashMap<u32, u32>,
    tick: u64,
    next_seq: u64,
    next_pos: u32,
    ring_len: u32,
    next_context: u32,
    /// Ring positions from `next_pos` on that a failed persist may have written (some of its
    /// transactions, or a torn record): until transactions are persisted over all of them, no
    /// write may rely on the in-memory hot set (see [`ActivityLog::persist_failed`]).
    unsure_positions: usize,
}

impl ActivityLog {
    /// A log restored from a replayed ring (or `replay` of an unused ring for a fresh one).
    pub fn new(replayed: ReplayedLog, ring_len: u32) -> ActivityLog {
        let capacity = replayed.slots.len();
        let index = replayed
            .slots
            .iter()
            .enumerate()
            .filter(|(_, e)| **e != NO_EXTENT)
            .map(|(s, e)| (*e, s as u32))
            .collect();
        ActivityLog {
            slots: replayed.slots,
            inflight: vec![0; capacity],
            last_use: vec![0; capacity],
            index,
            tick: 0,
            next_seq: replayed.next_seq,
            next_pos: replayed.next_pos,
            ring_len,
            next_context: replayed.next_context,
            unsure_positions: 0,
        }
    }

    /// Slots in the log (the most extents one write may touch).
    pub fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Hot extents.
    pub fn active_extents(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.index.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Writes in flight in `extent`.
    pub fn inflight(&self, extent: u32) -> u32 {
        self.index
            .get(&extent)
            .map_or(0, |&s| self.inflight[s as usize])
    }

    /// Registers a write to extents `first..=last`. Returns the transactions to persist, in
    /// order, before the write may start (empty when every extent is already hot and no
    /// earlier persist failed). On error nothing changed. When they cannot be persisted, give
    /// them to [`Self::persist_failed`].
    pub fn begin(&mut self, first: u32, last: u32) -> Result<Vec<PendingTransaction>, AlBusy> {
        let count = last - first + 1;
        if count as usize > self.slots.len() {
            return Err(AlBusy::TooLarge(count));
        }
        let cold: Vec<u32> = (first..=last)
            .filter(|e| !self.index.contains_key(e))
            .collect();
        if cold.is_empty() && self.unsure_positions == 0 {
            self.touch(first, last);
            return Ok(Vec::new());
        }
        // Victims: empty slots first, then cold slots (no writes in flight), least recent first,
        // never a slot of this very write.
        let mut candidates: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&s| {
                let e = self.slots[s as usize];
                e == NO_EXTENT || (self.inflight[s as usize] == 0 && !(first..=last).contains(&e))
            })
            .collect();
        if candidates.len() < cold.len() {
            return Err(AlBusy::Full);
        }
        candidates.sort_by_key(|&s| {
            (
                self.slots[s as usize] != NO_EXTENT,
                self.last_use[s as usize],
            )
        });
        let mut pending = Vec::new();
        for chunk in cold.chunks(MAX_UPDATES) {
            let mut updates = Vec::with_capacity(chunk.len());
            let mut evicted = Vec::new();
            let mut previous = Vec::with_capacity(chunk.len());
            for (&ext, slot) in chunk.iter().zip(candidates.drain(..chunk.len())) {
                let old = self.slots[slot as usize];
                if old != NO_EXTENT {
                    self.index.remove(&old);
                    evicted.push(old);
                }
                previous.push((old, self.last_use[slot as usize]));
                self.slots[slot as usize] = ext;
                self.index.insert(ext, slot);
                updates.push((slot, ext));
            }
            pending.push(self.transaction(updates, evicted, previous));
        }
        // After a failed persist, the ring positions it may have written are overwritten by
        // this write's transactions (padded with ones that only repeat context): a stale
        // transaction of the failed attempt left after them would be the newest, and replay
        // would restore its slots instead of these.
        while pending.len() < self.unsure_positions {
            pending.push(self.transaction(Vec::new(), Vec::new(), Vec::new()));
        }
        self.unsure_positions = 0;
        self.touch(first, last);
        Ok(pending)
    }

    /// Transactions `pending` (from the latest [`Self::begin`]) could not be persisted (an I/O
    /// error; any prefix of them, or a torn record, may be on disk): restores the log as it was
    /// before that `begin`, counting its write in flight no more in the extents it made hot.
    /// Its slots, sequence number and ring position are reused, so the ring does not lose a
    /// transaction (replay would refuse the gap) and no extent stays hot in memory that no
    /// persisted transaction names. Until a later transaction is persisted over every position
    /// the failed ones may have reached, every write goes through `begin` again: what replay
    /// finds now is some prefix of the failed transactions, which evicts extents the restored
    /// log holds hot (their bitmap pages are written, but a new write to one would not be
    /// covered).
    ///
    /// The caller still ends the write with [`Self::complete`] (for its extents that were hot
    /// before; the ones made hot are no longer in the log and are skipped).
    pub fn persist_failed(&mut self, pending: &[PendingTransaction]) {
        let Some(first) = pending.first() else {
            return;
        };
        for p in pending.iter().rev() {
            for (&(slot, ext), &(old, used)) in p.tx.updates.iter().zip(&p.previous).rev() {
                let s = slot as usize;
                self.index.remove(&ext);
                self.slots[s] = old;
                if old != NO_EXTENT {
                    self.index.insert(old, slot);
                }
                // Only a cold slot (nothing in flight) is ever reused, and nothing but the
                // failed write could register in it while its transaction was being persisted.
                self.inflight[s] = 0;
                self.last_use[s] = used;
            }
        }
        self.next_seq = first.tx.seq;
        self.next_pos = first.pos;
        self.next_context = first.tx.context_start;
        // Counted from the same position every time: each retry writes at least as many.
        self.unsure_positions = self.unsure_positions.max(pending.len());
    }

    /// Registers a write whose extents are all hot already (no transaction needed); returns
    /// `false`, changing nothing, when one of them is cold, or when an earlier persist failed
    /// and no transaction has been persisted since.
    pub fn begin_hot(&mut self, first: u32, last: u32) -> bool {
        if self.unsure_positions > 0 || !(first..=last).all(|e| self.index.contains_key(&e)) {
            return false;
        }
        self.touch(first, last);
        true
    }

    /// Counts a write in flight in every extent of `first..=last` (all hot).
    fn touch(&mut self, first: u32, last: u32) {
        self.tick += 1;
        for e in first..=last {
            let s = self.index[&e] as usize;
            self.inflight[s] += 1;
            self.last_use[s] = self.tick;
        }
    }

    /// A write to extents `first..=last` completed.
    pub fn complete(&mut self, first: u32, last: u32) {
        for e in first..=last {
            if let Some(&s) = self.index.get(&e) {
                self.inflight[s as usize] = self.inflight[s as usize].saturating_sub(1);
            }
        }
    }

    fn transaction(
        &mut self,
        updates: Vec<(u32, u32)>,
        evicted: Vec<u32>,
        previous: Vec<(u32, u64)>,
    ) -> PendingTransaction {
        let capacity = self.slots.len() as u32;
        let start = self.next_context;
        let n = (MAX_CONTEXT as u32).min(capacity - start);
        self.next_context = (start + n) % capacity;
        let tx = Transaction {
            seq: self.next_seq,
            capacity,
            // The context shows the slots including this transaction's updates; replay applies
            // the context first and the updates after it, which gives the same result.
            context: self.slots[start as usize..(start + n) as usize].to_vec(),
            context_start: start,
            updates,
        };
        let pos = self.next_pos;
        self.next_seq += 1;
        self.next_pos = (self.next_pos + 1) % self.ring_len;
        PendingTransaction {
            pos,
            tx,
            evicted,
            previous,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fresh(capacity: u32) -> ActivityLog {
        let ring = (0..ring_len_for(capacity))
            .map(|_| RingRecord::Unused)
            .collect();
        ActivityLog::new(replay(capacity, ring).unwrap(), ring_len_for(capacity))
    }

    /// Writes every pending transaction into a ring of records and replays it.
    fn persist(ring: &mut [[u8; 4096]], pending: &[PendingTransaction]) {
        for p in pending {
            ring[p.pos as usize] = p.tx.encode();
        }
    }

    fn replay_ring(capacity: u32, ring: &[[u8; 4096]]) -> Result<ReplayedLog, MetaError> {
        let recs = ring
            .iter()
            .enumerate()
            .map(|(i, r)| match Transaction::decode(r, i as u32, 0) {
                Ok(None) => RingRecord::Unused,
                Ok(Some(t)) => RingRecord::Valid(t),
                Err(e) => RingRecord::Damaged(e),
            })
            .collect();
        replay(capacity, recs)
    }

    #[test]
    fn constants() {
        assert_eq!(MAX_CONTEXT, 953);
        assert_eq!(window_for(1237), 2);
        assert_eq!(ring_len_for(1237), 8);
        assert_eq!(ring_len_for(65534), 2 * 69 + 2);
    }

    #[test]
    fn codec_round_trip_and_refusals() {
        let t = Transaction {
            seq: 99,
            capacity: 1237,
            updates: vec![(1, 7), (5, NO_EXTENT)],
            context_start: 953,
            context: vec![3; 284],
        };
        let rec = t.encode();
        assert_eq!(Transaction::decode(&rec, 0, 0).unwrap(), Some(t.clone()));
        assert_eq!(Transaction::decode(&[0u8; 4096], 0, 0).unwrap(), None);
        for bit in 0..rec.len() * 8 {
            let mut r = rec;
            r[bit / 8] ^= 1 << (bit % 8);
            assert!(Transaction::decode(&r, 0, 0).is_err(), "bit {bit}");
        }
        let resealed = |f: &dyn Fn(&mut [u8])| {
            let mut r = rec;
            f(&mut r);
            seal(&mut r);
            Transaction::decode(&r, 3, 0)
        };
        for f in [
            &(|r: &mut [u8]| r[4] = 200) as &dyn Fn(&mut [u8]),
            &|r| r[20..24].copy_from_slice(&1000u32.to_le_bytes()),
            &|r| r[UPDATES_AT..UPDATES_AT + 4].copy_from_slice(&5000u32.to_le_bytes()),
            &|r| r[CONTEXT_AT + 300 * 4] = 1,
            &|r| r[16..20].copy_from_slice(&0u32.to_le_bytes()),
        ] {
            assert!(matches!(resealed(f), Err(MetaError::ActivityLog(_))));
        }
        assert!(matches!(
            Transaction::decode(&rec[..10], 0, 0),
            Err(MetaError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn begin_complete_evict() {
        let mut al = fresh(3);
        let p = al.begin(10, 11).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].tx.updates, [(0, 10), (1, 11)]);
        assert!(p[0].evicted.is_empty());
        assert!(al.begin(10, 10).unwrap().is_empty(), "hot");
        assert_eq!(al.inflight(10), 2);
        al.begin(12, 12).unwrap();
        // Full: every slot has writes in flight.
        assert_eq!(al.begin(13, 13), Err(AlBusy::Full));
        assert_eq!(al.begin(0, 5), Err(AlBusy::TooLarge(6)));
        al.complete(10, 11);
        al.complete(10, 10);
        assert_eq!(al.inflight(10), 0);
        assert_eq!(al.inflight(99), 0);
        // Extent 11 was last used before extent 10: it is the least recently used cold one.
        let p = al.begin(13, 13).unwrap();
        assert_eq!(p[0].evicted, [11]);
        assert_eq!(p[0].tx.updates, [(1, 13)]);
        assert_eq!(al.active_extents(), [10, 12, 13]);
    }

    #[test]
    fn crash_replay_recovers_exactly_the_active_set() {
        let capacity = 2000; // window of 3 transactions
        let len = ring_len_for(capacity);
        let mut ring = vec![[0u8; 4096]; len as usize];
        let mut al = ActivityLog::new(replay_ring(capacity, &ring).unwrap(), len);
        for i in 0..5000u32 {
            let e = (i * 7919) % 10_000;
            let p = al.begin(e, e).unwrap();
            persist(&mut ring, &p);
            al.complete(e, e);
            if i % 997 == 0 {
                let back = replay_ring(capacity, &ring).unwrap();
                assert_eq!(back.active_extents(), al.active_extents(), "after {i}");
            }
        }
        let back = replay_ring(capacity, &ring).unwrap();
        assert_eq!(back.active_extents(), al.active_extents());
        // Resume from the replay and keep going.
        let mut al2 = ActivityLog::new(back.clone(), len);
        let p = al2.begin(123_456, 123_456).unwrap();
        assert_eq!(p[0].pos, back.next_pos);
        assert_eq!(p[0].tx.seq, back.next_seq);
        persist(&mut ring, &p);
        al2.complete(123_456, 123_456);
        assert!(al2.active_extents().contains(&123_456));
        assert_eq!(
            replay_ring(capacity, &ring).unwrap().active_extents(),
            al2.active_extents()
        );

        // A torn record right after the newest is tolerated.
        let mut torn = ring.clone();
        let next = replay_ring(capacity, &ring).unwrap().next_pos as usize;
        torn[next][100] ^= 1;
        torn[next][0..4].copy_from_slice(b"BDAL");
        assert!(replay_ring(capacity, &torn).is_ok());
        // Damage anywhere else is refused.
        let mut bad = ring.clone();
        let victim = (next + 3) % len as usize;
        bad[victim][200] ^= 1;
        assert!(matches!(
            replay_ring(capacity, &bad),
            Err(MetaError::ChecksumMismatch {
                record: Record::ActivityLog(_),
                ..
            })
        ));
        // A missing transaction inside the window is refused.
        let mut gap = ring.clone();
        let newest = (next + len as usize - 2) % len as usize;
        gap[newest] = [0; 4096];
        gap[(newest + len as usize - 1) % len as usize] = [0; 4096];
        assert!(matches!(
            replay_ring(capacity, &gap),
            Err(MetaError::ActivityLog(_))
        ));
        // Capacity mismatch and a too-small ring are refused.
        assert!(replay_ring(capacity + 1, &ring).is_err());
        assert!(replay_ring(capacity, &ring[..4]).is_err());
        // Damage in a never-used ring is refused.
        let mut junk = vec![[0u8; 4096]; len as usize];
        junk[2][0..4].copy_from_slice(b"BDAL");
        assert!(replay_ring(capacity, &junk).is_err());
    }

    /// A persist that fails after writing `written` of `pending` (the next one torn when
    /// `torn`): what reached the ring.
    fn persist_partly(
        ring: &mut [[u8; 4096]],
        pending: &[PendingTransaction],
        written: usize,
        torn: bool,
    ) {
        persist(ring, &pending[..written.min(pending.len())]);
        if torn && let Some(p) = pending.get(written) {
            let mut rec = p.tx.encode();
            rec[300] ^= 1;
            ring[p.pos as usize] = rec;
        }
    }

    #[test]
    fn a_failed_persist_restores_the_log_and_the_next_one_rewrites_its_positions() {
        let capacity = 40; // two transactions for 33 cold extents
        let len = ring_len_for(capacity);
        let mut ring = vec![[0u8; 4096]; len as usize];
        let mut al = ActivityLog::new(replay_ring(capacity, &ring).unwrap(), len);
        for e in 0..40u32 {
            persist(&mut ring, &al.begin(e, e).unwrap());
            al.complete(e, e);
        }
        // Extent 7 has a write in flight: never evicted.
        assert!(al.begin(7, 7).unwrap().is_empty());
        let before = al.clone();
        let pending = al.begin(100, 132).unwrap();
        assert_eq!(pending.len(), 2);
        // The first transaction reached the disk, the second failed (torn).
        persist_partly(&mut ring, &pending, 1, true);
        al.persist_failed(&pending);
        assert_eq!(al.active_extents(), before.active_extents());
        assert_eq!(al.slots, before.slots);
        assert_eq!(al.inflight, before.inflight);
        assert_eq!(
            (al.next_seq, al.next_pos, al.next_context),
            (before.next_seq, before.next_pos, before.next_context)
        );
        // What a crash now replays is the persisted prefix: some restored extents are evicted
        // there, so no write may use the hot set until the log is rewritten.
        assert!(!al.begin_hot(3, 3));
        // The failed write ends; extent 7's write is still counted.
        al.complete(100, 132);
        assert_eq!(al.inflight(7), 1);
        assert_eq!(al.inflight(100), 0);
        // A write to a hot extent persists transactions over both positions the failed
        // attempt reached before it starts.
        let again = al.begin(3, 3).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].pos, pending[0].pos);
        assert_eq!(again[0].tx.seq, pending[0].tx.seq);
        assert!(again.iter().all(|p| p.tx.updates.is_empty()));
        persist(&mut ring, &again);
        al.complete(3, 3);
        assert_eq!(
            replay_ring(capacity, &ring).unwrap().active_extents(),
            al.active_extents()
        );
        assert!(
            al.begin_hot(3, 3),
            "hot again after a persisted transaction"
        );
        al.complete(3, 3);
    }

    #[test]
    fn a_persist_that_wrote_nothing_leaves_no_gap_in_the_ring() {
        let capacity = 8;
        let len = ring_len_for(capacity);
        let mut ring = vec![[0u8; 4096]; len as usize];
        let mut al = ActivityLog::new(replay_ring(capacity, &ring).unwrap(), len);
        persist(&mut ring, &al.begin(1, 1).unwrap());
        al.complete(1, 1);
        let pending = al.begin(2, 2).unwrap();
        al.persist_failed(&pending);
        al.complete(2, 2);
        assert_eq!(al.active_extents(), [1]);
        persist(&mut ring, &al.begin(3, 3).unwrap());
        al.complete(3, 3);
        assert_eq!(
            replay_ring(capacity, &ring).unwrap().active_extents(),
            [1, 3]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Persists fail at random points (any prefix written, the next record maybe torn);
        /// after each, a crash replays at least every extent a write may use without a new
        /// transaction (or refuses), and once a later persist succeeded, exactly the hot set.
        #[test]
        fn replay_matches_memory_across_failed_persists(
            capacity in 1u32..120,
            writes in proptest::collection::vec(
                (0u32..300, 0u32..40, proptest::option::of((0usize..4, any::<bool>()))),
                1..150),
        ) {
            let len = ring_len_for(capacity);
            let mut ring = vec![[0u8; 4096]; len as usize];
            let mut al = ActivityLog::new(replay_ring(capacity, &ring).unwrap(), len);
            for (e, span, failure) in writes {
                let last = (e + span).min(e + capacity - 1);
                let Ok(p) = al.begin(e, last) else {
                    prop_assert!(last - e + 1 > capacity);
                    continue;
                };
                match failure {
                    Some((written, torn)) if !p.is_empty() => {
                        persist_partly(&mut ring, &p, written, torn);
                        al.persist_failed(&p);
                        al.complete(e, last);
                        // Torn records of two failed attempts in a row are refused by replay
                        // (loudly) until a persist succeeds over them.
                        let Ok(replayed) = replay_ring(capacity, &ring) else {
                            continue;
                        };
                        let replayed = replayed.active_extents();
                        for x in al.active_extents() {
                            let mut probe = al.clone();
                            prop_assert!(
                                !probe.begin_hot(x, x) || replayed.contains(&x),
                                "extent {} usable without a transaction, not replayed", x
                            );
                        }
                    }
                    _ => {
                        persist(&mut ring, &p);
                        al.complete(e, last);
                        prop_assert_eq!(
                            replay_ring(capacity, &ring).unwrap().active_extents(),
                            al.active_extents()
                        );
                    }
                }
            }
        }
        #[test]
        fn replay_matches_memory(
            capacity in 1u32..3000,
            writes in proptest::collection::vec((0u32..5000, 0u32..3), 1..200),
        ) {
            let len = ring_len_for(capacity);
            let mut ring = vec![[0u8; 4096]; len as usize];
            let mut al = ActivityLog::new(replay_ring(capacity, &ring).unwrap(), len);
            for (e, span) in writes {
                let last = (e + span).min(e + capacity - 1);
                match al.begin(e, last) {
                    Ok(p) => { persist(&mut ring, &p); al.complete(e, last); }
                    Err(_) => prop_assert!(last - e + 1 > capacity),
                }
            }
            prop_assert_eq!(replay_ring(capacity, &ring).unwrap().active_extents(), al.active_extents());
        }

        /// A log resumed from its replay (a restart, clean or not) and written on must still
        /// replay to exactly its hot set, after any number of restarts.
        #[test]
        fn replay_matches_memory_across_restarts(
            // More slots than one context holds, and lives long enough to fill them.
            capacity in (MAX_CONTEXT as u32 + 1)..2200,
            lives in proptest::collection::vec(
                proptest::collection::vec((0u32..5000, 0u32..3), 0..1300), 1..4),
        ) {
            let len = ring_len_for(capacity);
            let mut ring = vec![[0u8; 4096]; len as usize];
            for writes in lives {
                let mut al = ActivityLog::new(replay_ring(capacity, &ring).unwrap(), len);
                for (e, span) in writes {
                    let last = (e + span).min(e + capacity - 1);
                    match al.begin(e, last) {
                        Ok(p) => { persist(&mut ring, &p); al.complete(e, last); }
                        Err(_) => prop_assert!(last - e + 1 > capacity),
                    }
                }
                prop_assert_eq!(
                    replay_ring(capacity, &ring).unwrap().active_extents(),
                    al.active_extents()
                );
            }
        }
    }
}
