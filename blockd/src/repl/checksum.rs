//! Block checksums for online verify and checksum-based resync, free of I/O: the digest of a
//! run of blocks (BLAKE3, 32 bytes) that both sides compare first, the per-block digests
//! (BLAKE3 truncated to 16 bytes) that locate the differing blocks of a run that differs, and
//! [`ChecksumTracker`], the bookkeeping of the runs a walker has asked its peer about (what is
//! pending, what was equal, which blocks differ, progress and the report).
//!
//! One run on the wire: the walker reads the run while it holds the range (no application write
//! in flight on it), computes both digests, and sends the run digest in a request that the peer
//! applies in stream order, so both sides hash the same state of the data. The peer answers
//! "equal", or its per-block digests; the walker compares those with the per-block digests it
//! kept for the run.

use std::collections::BTreeMap;

use crate::repl::names::named_enum;

named_enum! {
    /// When a resync compares block checksums before sending data (config `csums`).
    pub enum Csums: "csums" {
        /// Never: every dirty block is sent.
        No = "no",
        /// Every resync.
        Yes = "yes",
        /// When the bitmap is untrusted: a full sync, or a crashed primary's activity-log
        /// extents (the default).
        Auto = "auto",
    }
}

named_enum! {
    /// Why a run's checksum is asked for (the peer answers differently: a sync target clears
    /// its own bits for equal runs).
    pub enum ChecksumPurpose: "checksum purpose" {
        Verify = "verify",
        Resync = "resync",
    }
}

/// Bytes of a run digest.
pub const RUN_DIGEST_LEN: usize = 32;
/// Bytes of a per-block digest.
pub const BLOCK_DIGEST_LEN: usize = 16;

/// A run digest.
pub type RunDigest = [u8; RUN_DIGEST_LEN];
/// A per-block digest.
pub type BlockDigest = [u8; BLOCK_DIGEST_LEN];

/// The digest of a run: BLAKE3 over the run's length and bytes.
pub fn run_digest(data: &[u8]) -> RunDigest {
    let mut h = blake3::Hasher::new();
    h.update(&(data.len() as u64).to_be_bytes());
    h.update(data);
    *h.finalize().as_bytes()
}

/// The digests of every `block_size` block of `data` (the last one may be shorter).
pub fn block_digests(data: &[u8], block_size: usize) -> Vec<BlockDigest> {
    data.chunks(block_size.max(1))
        .map(|b| {
            let full = blake3::hash(b);
            let mut d = [0u8; BLOCK_DIGEST_LEN];
            d.copy_from_slice(&full.as_bytes()[..BLOCK_DIGEST_LEN]);
            d
        })
        .collect()
}

/// Both digests of a run, computed in one pass over the data.
pub fn digests(data: &[u8], block_size: usize) -> (RunDigest, Vec<BlockDigest>) {
    (run_digest(data), block_digests(data, block_size))
}

/// Number of `block_size` blocks in `len` bytes (the last one may be partial).
pub fn blocks_in(len: u64, block_size: u64) -> u64 {
    len.div_ceil(block_size.max(1))
}

/// Appends `(offset, len)` to sorted, merged `runs`, merging with the last run when adjacent.
pub fn push_run(runs: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = runs.last_mut()
        && last.0 + last.1 == offset
    {
        last.1 += len;
        return;
    }
    runs.push((offset, len));
}

/// The byte ranges of a run `[offset, offset + len)` whose blocks differ (`differ`) and agree
/// (`equal`), from both sides' per-block digests; adjacent blocks are merged into one range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockCompare {
    pub differ: Vec<(u64, u64)>,
    pub equal: Vec<(u64, u64)>,
    /// Number of differing blocks.
    pub differing_blocks: u64,
}

/// Why a peer's answer cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("checksum reply for {offset}+{len}, which was not asked for")]
    NotAsked { offset: u64, len: u64 },
    #[error("checksum reply for {offset}+{len} has {got} block digests, expected {want}")]
    BlockCount {
        offset: u64,
        len: u64,
        got: usize,
        want: usize,
    },
}

/// Compares per-block digests of the run `[offset, offset + len)`.
pub fn compare_blocks(
    offset: u64,
    len: u64,
    block_size: u64,
    mine: &[BlockDigest],
    theirs: &[BlockDigest],
) -> Result<BlockCompare, ChecksumError> {
    let want = blocks_in(len, block_size) as usize;
    if mine.len() != want || theirs.len() != want {
        return Err(ChecksumError::BlockCount {
            offset,
            len,
            got: theirs.len(),
            want,
        });
    }
    let mut out = BlockCompare::default();
    for (k, (a, b)) in mine.iter().zip(theirs).enumerate() {
        let start = offset + k as u64 * block_size;
        let blen = block_size.min(offset + len - start);
        if a == b {
            push_run(&mut out.equal, start, blen);
        } else {
            out.differing_blocks += 1;
            push_run(&mut out.differ, start, blen);
        }
    }
    Ok(out)
}

/// The peer's answer about one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerAnswer {
    /// Its run digest equals ours.
    Equal,
    /// It differs; these are the peer's per-block digests of the run.
    Blocks(Vec<BlockDigest>),
}

/// What an answer means for the walker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The whole run is the same on both sides.
    Equal { offset: u64, len: u64 },
    /// Some blocks differ.
    Differ(BlockCompare),
}

/// How many differing ranges a report lists (the counts always cover everything).
pub const MAX_REPORTED_RANGES: usize = 256;

/// The result of a verify (or the checksum phase of a resync) so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChecksumReport {
    /// Bytes the walk covers.
    pub total_bytes: u64,
    /// Bytes whose answer arrived.
    pub done_bytes: u64,
    /// Blocks (of `block_size`) that differ.
    pub differing_blocks: u64,
    pub differing_bytes: u64,
    /// The first [`MAX_REPORTED_RANGES`] differing ranges, `[offset, length]`, sorted and merged.
    pub ranges: Vec<(u64, u64)>,
    /// More differing ranges exist than are listed.
    pub ranges_truncated: bool,
}

impl ChecksumReport {
    /// One line for logs and events: `N blocks (B bytes) differ: off+len, ...`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} blocks ({} bytes) differ",
            self.differing_blocks, self.differing_bytes
        );
        if !self.ranges.is_empty() {
            s.push_str(": ");
            let shown: Vec<String> = self
                .ranges
                .iter()
                .take(16)
                .map(|(o, l)| format!("{o}+{l}"))
                .collect();
            s.push_str(&shown.join(","));
            if self.ranges.len() > 16 || self.ranges_truncated {
                s.push_str(",...");
            }
        }
        s
    }
}

struct PendingRun {
    len: u64,
    blocks: Vec<BlockDigest>,
}

/// The runs a walker asked its peer about and the answers so far.
pub struct ChecksumTracker {
    block_size: u64,
    pending: BTreeMap<u64, PendingRun>,
    report: ChecksumReport,
    /// Every differing range (merged), for the report's list.
    all_ranges: BTreeMap<u64, u64>,
}

impl ChecksumTracker {
    /// A walk over `total_bytes` comparing blocks of `block_size` bytes.
    pub fn new(total_bytes: u64, block_size: u64) -> ChecksumTracker {
        ChecksumTracker {
            block_size: block_size.max(1),
            pending: BTreeMap::new(),
            report: ChecksumReport {
                total_bytes,
                ..ChecksumReport::default()
            },
            all_ranges: BTreeMap::new(),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// A run was asked about; `blocks` are our per-block digests of it.
    pub fn asked(&mut self, offset: u64, len: u64, blocks: Vec<BlockDigest>) {
        self.pending.insert(offset, PendingRun { len, blocks });
    }

    /// Runs asked about and not answered yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Bytes asked about and not answered yet.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.values().map(|p| p.len).sum()
    }

    /// The peer answered about the run at `offset`.
    pub fn answered(
        &mut self,
        offset: u64,
        len: u64,
        answer: PeerAnswer,
    ) -> Result<RunOutcome, ChecksumError> {
        match self.pending.get(&offset) {
            Some(p) if p.len == len => {}
            _ => return Err(ChecksumError::NotAsked { offset, len }),
        }
        let outcome = match answer {
            PeerAnswer::Equal => RunOutcome::Equal { offset, len },
            PeerAnswer::Blocks(theirs) => {
                let p = &self.pending[&offset];
                let cmp = compare_blocks(offset, len, self.block_size, &p.blocks, &theirs)?;
                if cmp.differ.is_empty() {
                    // Same blocks, different run digest cannot happen for honest peers; treat
                    // the run as equal (the per-block digests are what locate differences).
                    RunOutcome::Equal { offset, len }
                } else {
                    RunOutcome::Differ(cmp)
                }
            }
        };
        self.pending.remove(&offset);
        self.report.done_bytes += len;
        if let RunOutcome::Differ(cmp) = &outcome {
            self.report.differing_blocks += cmp.differing_blocks;
            for &(o, l) in &cmp.differ {
                self.report.differing_bytes += l;
                self.add_range(o, l);
            }
        }
        Ok(outcome)
    }

    fn add_range(&mut self, offset: u64, len: u64) {
        let mut start = offset;
        let mut end = offset + len;
        // Merge with a range ending at or after `start` that begins before it.
        if let Some((&s, &l)) = self.all_ranges.range(..=start).next_back()
            && s + l >= start
        {
            start = s;
            end = end.max(s + l);
            self.all_ranges.remove(&s);
        }
        // Merge with ranges starting inside or right after the new one.
        while let Some((&s, &l)) = self.all_ranges.range(start..=end).next() {
            end = end.max(s + l);
            self.all_ranges.remove(&s);
        }
        self.all_ranges.insert(start, end - start);
    }

    /// The report so far (ranges sorted and merged, the first [`MAX_REPORTED_RANGES`]).
    pub fn report(&self) -> ChecksumReport {
        let mut r = self.report.clone();
        r.ranges = self
            .all_ranges
            .iter()
            .take(MAX_REPORTED_RANGES)
            .map(|(&o, &l)| (o, l))
            .collect();
        r.ranges_truncated = self.all_ranges.len() > MAX_REPORTED_RANGES;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: u64 = 4096;

    #[test]
    fn digests_see_every_byte_and_the_length() {
        let a = vec![7u8; 3 * BS as usize];
        let mut b = a.clone();
        assert_eq!(run_digest(&a), run_digest(&b));
        b[5000] ^= 1;
        assert_ne!(run_digest(&a), run_digest(&b));
        assert_ne!(run_digest(&a[..4096]), run_digest(&a[..4097]));
        let (da, db) = (
            block_digests(&a, BS as usize),
            block_digests(&b, BS as usize),
        );
        assert_eq!(da.len(), 3);
        assert_eq!(da[0], db[0]);
        assert_ne!(da[1], db[1]);
        assert_eq!(da[2], db[2]);
        assert_eq!(block_digests(&a[..5000], 4096).len(), 2);
    }

    #[test]
    fn compare_merges_adjacent_blocks_and_handles_a_short_last_block() {
        let len = 5 * BS + 100;
        let mine = vec![[0u8; 16]; 6];
        let mut theirs = mine.clone();
        theirs[1] = [1; 16];
        theirs[2] = [1; 16];
        theirs[5] = [1; 16];
        let c = compare_blocks(1 << 20, len, BS, &mine, &theirs).unwrap();
        assert_eq!(c.differing_blocks, 3);
        assert_eq!(
            c.differ,
            vec![((1 << 20) + BS, 2 * BS), ((1 << 20) + 5 * BS, 100)]
        );
        assert_eq!(c.equal, vec![(1 << 20, BS), ((1 << 20) + 3 * BS, 2 * BS)]);
        assert_eq!(
            compare_blocks(0, len, BS, &mine, &theirs[..5]),
            Err(ChecksumError::BlockCount {
                offset: 0,
                len,
                got: 5,
                want: 6
            })
        );
    }

    #[test]
    fn tracker_counts_progress_and_reports_merged_ranges() {
        let mut t = ChecksumTracker::new(8 * BS, BS);
        let mine = vec![[3u8; 16]; 4];
        t.asked(0, 4 * BS, mine.clone());
        t.asked(4 * BS, 4 * BS, mine.clone());
        assert_eq!((t.pending(), t.pending_bytes()), (2, 8 * BS));
        assert_eq!(
            t.answered(0, BS, PeerAnswer::Equal),
            Err(ChecksumError::NotAsked { offset: 0, len: BS })
        );
        assert_eq!(
            t.answered(0, 4 * BS, PeerAnswer::Equal).unwrap(),
            RunOutcome::Equal {
                offset: 0,
                len: 4 * BS
            }
        );
        let mut theirs = mine.clone();
        theirs[0] = [9; 16];
        theirs[3] = [9; 16];
        let out = t
            .answered(4 * BS, 4 * BS, PeerAnswer::Blocks(theirs))
            .unwrap();
        let RunOutcome::Differ(c) = out else {
            panic!("{out:?}")
        };
        assert_eq!(c.differ, vec![(4 * BS, BS), (7 * BS, BS)]);
        // An answer is used once.
        assert!(t.answered(4 * BS, 4 * BS, PeerAnswer::Equal).is_err());
        let r = t.report();
        assert_eq!(r.done_bytes, 8 * BS);
        assert_eq!(r.differing_blocks, 2);
        assert_eq!(r.differing_bytes, 2 * BS);
        assert_eq!(r.ranges, vec![(4 * BS, BS), (7 * BS, BS)]);
        assert!(!r.ranges_truncated);
        assert_eq!(
            r.summary(),
            "2 blocks (8192 bytes) differ: 16384+4096,28672+4096"
        );
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn per_block_answer_with_no_difference_is_equal() {
        let mut t = ChecksumTracker::new(BS, BS);
        t.asked(0, BS, vec![[1; 16]]);
        assert_eq!(
            t.answered(0, BS, PeerAnswer::Blocks(vec![[1; 16]]))
                .unwrap(),
            RunOutcome::Equal { offset: 0, len: BS }
        );
    }

    #[test]
    fn report_lists_a_bounded_number_of_ranges() {
        let n = MAX_REPORTED_RANGES as u64 + 10;
        let mut t = ChecksumTracker::new(2 * n * BS, BS);
        for k in 0..n {
            t.asked(2 * k * BS, BS, vec![[0; 16]]);
            t.answered(2 * k * BS, BS, PeerAnswer::Blocks(vec![[1; 16]]))
                .unwrap();
        }
        let r = t.report();
        assert_eq!(r.differing_blocks, n);
        assert_eq!(r.ranges.len(), MAX_REPORTED_RANGES);
        assert!(r.ranges_truncated);
        assert!(r.summary().ends_with(",..."));
    }

    proptest! {
        /// Answers in any order give merged, sorted ranges covering exactly the differing
        /// blocks.
        #[test]
        fn ranges_cover_exactly_the_differing_blocks(
            diff in proptest::collection::vec(any::<bool>(), 1..64),
            run_blocks in 1usize..9,
            order_seed in any::<u64>(),
        ) {
            let total = diff.len() as u64 * BS;
            let mut t = ChecksumTracker::new(total, BS);
            let mut runs = Vec::new();
            for (k, chunk) in diff.chunks(run_blocks).enumerate() {
                let off = (k * run_blocks) as u64 * BS;
                t.asked(off, chunk.len() as u64 * BS, vec![[0; 16]; chunk.len()]);
                let theirs: Vec<BlockDigest> =
                    chunk.iter().map(|&d| if d { [1; 16] } else { [0; 16] }).collect();
                runs.push((off, chunk.len() as u64 * BS, theirs));
            }
            // A deterministic shuffle.
            let mut s = order_seed | 1;
            for i in (1..runs.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                runs.swap(i, (s % (i as u64 + 1)) as usize);
            }
            for (off, len, theirs) in runs {
                t.answered(off, len, PeerAnswer::Blocks(theirs)).unwrap();
            }
            let r = t.report();
            let mut want = Vec::new();
            for (k, &d) in diff.iter().enumerate() {
                if d { push_run(&mut want, k as u64 * BS, BS); }
            }
            prop_assert_eq!(r.ranges, want);
            prop_assert_eq!(r.differing_blocks, diff.iter().filter(|&&d| d).count() as u64);
            prop_assert_eq!(r.done_bytes, total);
        }
    }
}
