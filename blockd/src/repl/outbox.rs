//! Frames waiting for a link's writer: small messages encoded in place, the payload of a large
//! write or resync block kept by reference (no copy into the frame), and the slicing of the
//! queue into whole-frame writes of about [`WRITE_SLICE`] bytes.

use std::io::IoSlice;
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use common::frame::{self, HEADER_LEN};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::repl::wire::Message;

/// The writer sends queued frames in slices of about this size (whole frames), so a report of
/// acknowledged writes (`ClientAcked`) can go ahead of the rest of a long backlog.
pub const WRITE_SLICE: usize = 256 << 10;

/// Payloads at least this long are sent from the caller's buffer instead of being copied
/// behind their frame header (a 1 MiB copy costs more than the bookkeeping; a 4 KiB one not).
const SHARE_MIN: usize = 16 << 10;

/// Initial room for frames encoded in place.
const ENCODE_ROOM: usize = 256 << 10;

/// Queued frames, in order: sealed pieces, then the whole frames encoded since the last seal.
#[derive(Default)]
pub struct Frames {
    pieces: Vec<Piece>,
    /// Bytes in `pieces`.
    sealed: usize,
    /// Whole frames encoded after the last piece.
    tail: BytesMut,
}

/// A run of bytes to send; `ends_frame` when a frame ends with it (a report may follow).
struct Piece {
    bytes: Bytes,
    ends_frame: bool,
}

impl Frames {
    pub fn new() -> Frames {
        Frames {
            pieces: Vec::new(),
            sealed: 0,
            tail: BytesMut::with_capacity(ENCODE_ROOM),
        }
    }

    /// Appends `msg` as one frame.
    pub fn push(&mut self, msg: &Message) {
        let start = self.tail.len();
        self.tail.put_bytes(0, HEADER_LEN);
        let shared = msg.encode_head(&mut self.tail, SHARE_MIN);
        let body = &self.tail[start + HEADER_LEN..];
        let header = frame::encode_header_parts(body, shared.map_or(&[][..], |p| &p[..]));
        self.tail[start..start + HEADER_LEN].copy_from_slice(&header);
        if let Some(payload) = shared {
            // The frames before this one, then its head, then its payload by reference.
            let before = self.tail.split_to(start);
            self.seal_frames(before);
            let head = self.tail.split().freeze();
            self.add(head, false);
            self.add(payload.clone(), true);
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.sealed + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every frame (after they were sent), keeping the encoding room.
    pub fn clear(&mut self) {
        self.pieces.clear();
        self.sealed = 0;
        self.tail.clear();
    }

    /// Writes every frame to `w`, in slices of whole frames of about [`WRITE_SLICE`] bytes;
    /// before each slice, `between()` may give a frame to send first.
    pub async fn write_to<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        mut between: impl FnMut() -> Option<BytesMut>,
    ) -> std::io::Result<()> {
        if self.pieces.is_empty() {
            // Only frames encoded in place (small writes): slices of the buffer itself, which
            // keeps its room for the next batch.
            let mut at = 0;
            while at < self.tail.len() {
                if let Some(first) = between() {
                    w.write_all(&first).await?;
                }
                let end = at + whole_frames_end(&self.tail[at..]);
                w.write_all(&self.tail[at..end]).await?;
                at = end;
            }
            return Ok(());
        }
        let tail = self.tail.split();
        self.seal_frames(tail);
        let mut at = 0;
        while at < self.pieces.len() {
            if let Some(first) = between() {
                w.write_all(&first).await?;
            }
            let end = slice_end(&self.pieces, at);
            write_all_vectored(w, &self.pieces[at..end]).await?;
            at = end;
        }
        Ok(())
    }

    fn add(&mut self, bytes: Bytes, ends_frame: bool) {
        self.sealed += bytes.len();
        self.pieces.push(Piece { bytes, ends_frame });
    }

    /// Seals `frames` (whole frames, concatenated) as pieces of about [`WRITE_SLICE`] bytes.
    fn seal_frames(&mut self, mut frames: BytesMut) {
        while !frames.is_empty() {
            let end = whole_frames_end(&frames);
            self.add(frames.split_to(end).freeze(), true);
        }
    }
}

/// The end of the first run of whole frames in `frames` (concatenated frames): at least one
/// frame, more until [`WRITE_SLICE`] bytes are reached or the frames end.
fn whole_frames_end(frames: &[u8]) -> usize {
    let mut at = 0;
    while at < frames.len() && at < WRITE_SLICE {
        let Some(len) = frames
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        else {
            return frames.len();
        };
        at = (at + HEADER_LEN + len).min(frames.len());
    }
    at
}

/// The end (exclusive) of the slice of `pieces` that starts at `from`: at least one piece,
/// more until [`WRITE_SLICE`] bytes are reached at the end of a frame, or the pieces end.
fn slice_end(pieces: &[Piece], from: usize) -> usize {
    let mut bytes = 0;
    for (k, piece) in pieces.iter().enumerate().skip(from) {
        bytes += piece.bytes.len();
        if piece.ends_frame && bytes >= WRITE_SLICE {
            return k + 1;
        }
    }
    pieces.len()
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    pieces: &[Piece],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(&p.bytes)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        // Stay below IOV_MAX (1024) per call.
        let take = rest.len().min(512);
        let n = w.write_vectored(&rest[..take]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Encodes `msg` as one frame of its own (a message sent outside the queue).
pub fn encode_frame(msg: &Message) -> BytesMut {
    let mut frames = Frames::default();
    frames.push(msg);
    let mut out = BytesMut::with_capacity(frames.len());
    for piece in &frames.pieces {
        out.extend_from_slice(&piece.bytes);
    }
    out.extend_from_slice(&frames.tail);
    out
}

/// The frames a session's write path queues for its writer. The writer takes everything that
/// accumulated while it was busy and sends it in one go: batching without any timer.
pub struct Outbox {
    queue: Mutex<Frames>,
    pub wake: Notify,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            queue: Mutex::new(Frames::new()),
            wake: Notify::new(),
        }
    }
}

impl Outbox {
    /// Appends frames (through [`Frames::push`] in `f`) and wakes the writer.
    pub fn push(&self, f: impl FnOnce(&mut Frames)) {
        let was_empty = {
            let mut q = self.queue.lock().expect("outbox");
            let was_empty = q.is_empty();
            f(&mut q);
            was_empty
        };
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Swaps the queued frames with `spare` (empty); returns whether there were any.
    pub fn take(&self, spare: &mut Frames) -> bool {
        let mut q = self.queue.lock().expect("outbox");
        if q.is_empty() {
            return false;
        }
        std::mem::swap(&mut *q, spare);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seq: u64, len: usize) -> Message {
        Message::Data {
            seq,
            after: 0,
            offset: seq * 4096,
            flags: 0,
            payload: Bytes::from(vec![seq as u8; len]),
        }
    }

    /// Writes `frames` the way the writer does, with a report before every slice.
    fn written(frames: &mut Frames) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut reports = 0;
        let report = encode_frame(&Message::Ping);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(frames.write_to(&mut out, || {
            reports += 1;
            Some(report.clone())
        }))
        .unwrap();
        (out, reports)
    }

    /// Decodes every frame of `bytes`.
    fn decoded(bytes: &[u8]) -> Vec<Message> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = frame::decode(&mut buf, u32::MAX).unwrap() {
            out.push(Message::decode(f).unwrap());
        }
        assert!(buf.is_empty(), "trailing bytes");
        out
    }

    #[test]
    fn frames_go_out_whole_and_in_order_whatever_their_size() {
        let msgs = vec![
            data(1, 4096),
            data(2, 1 << 20),
            Message::Flush { seq: 3 },
            data(4, SHARE_MIN),
            data(5, SHARE_MIN - 1),
            data(6, 300 << 10),
            Message::Ping,
        ];
        let mut frames = Frames::new();
        for m in &msgs {
            frames.push(m);
        }
        let queued = frames.len();
        let (out, reports) = written(&mut frames);
        let got = decoded(&out);
        // The reports went between frames; without them, the messages in order.
        let ours: Vec<Message> = got
            .iter()
            .filter(|m| !matches!(m, Message::Ping))
            .cloned()
            .collect();
        let expected: Vec<Message> = msgs
            .iter()
            .filter(|m| !matches!(m, Message::Ping))
            .cloned()
            .collect();
        assert_eq!(ours, expected);
        assert_eq!(
            out.len(),
            queued + reports * encode_frame(&Message::Ping).len()
        );
        // Each payload of 1 MiB or 300 KiB is a slice of its own, the small ones share one.
        assert!(reports >= 3, "{reports} slices");
    }

    #[test]
    fn large_payloads_are_not_copied() {
        let payload = Bytes::from(vec![9u8; 1 << 20]);
        let mut frames = Frames::new();
        frames.push(&Message::Data {
            seq: 1,
            after: 0,
            offset: 0,
            flags: 0,
            payload: payload.clone(),
        });
        assert!(
            frames
                .pieces
                .iter()
                .any(|p| p.bytes.as_ptr() == payload.as_ptr())
        );
        assert_eq!(frames.len(), HEADER_LEN + 26 + (1 << 20));
    }

    #[test]
    fn slices_end_on_frame_boundaries() {
        // Frames encoded in place (below SHARE_MIN) are sealed in runs of whole frames.
        let mut frames = Frames::new();
        for seq in 0..40 {
            frames.push(&data(seq, 10 << 10));
        }
        let tail = frames.tail.split();
        frames.seal_frames(tail);
        let p = &frames.pieces;
        assert!(p.len() >= 2 && p.iter().all(|p| p.ends_frame));
        let first = slice_end(p, 0);
        let bytes: usize = p[..first].iter().map(|p| p.bytes.len()).sum();
        assert!(
            (WRITE_SLICE..WRITE_SLICE + (11 << 10)).contains(&bytes),
            "{bytes}"
        );
        assert_eq!(slice_end(p, first), p.len());
        // A slice always takes at least one piece, even one larger than the slice size.
        let mut big = Frames::new();
        big.push(&data(1, 5));
        big.push(&data(2, 1 << 20));
        big.push(&data(3, 5));
        let tail = big.tail.split();
        big.seal_frames(tail);
        let ends: Vec<usize> = {
            let mut v = vec![];
            let mut at = 0;
            while at < big.pieces.len() {
                at = slice_end(&big.pieces, at);
                v.push(at);
            }
            v
        };
        // [small frame, head of the large one, its payload] then [the last small frame].
        assert_eq!(ends, vec![3, 4]);
    }

    #[test]
    fn whole_frames_end_never_reads_past_the_end() {
        let mut b = BytesMut::new();
        frame::encode(&[7u8; 100], &mut b);
        frame::encode(&[7u8; 10], &mut b);
        let one = HEADER_LEN + 100;
        assert_eq!(whole_frames_end(&b), b.len());
        assert_eq!(whole_frames_end(&b[..one + 2]), one + 2);
        let mut big = BytesMut::new();
        frame::encode(&vec![7u8; 1 << 20], &mut big);
        frame::encode(&[7u8; 5], &mut big);
        assert_eq!(whole_frames_end(&big), HEADER_LEN + (1 << 20));
    }
}
