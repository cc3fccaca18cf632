//! Length-prefixed, CRC-32-checked frames: a pure codec over bytes plus a buffered async connection.
//!
//! Wire layout of one frame (all big-endian):
//!
//! ```text
//! +-----------+-----------------+------------------+
//! | len: u32  | crc32: u32      | payload: len B   |
//! +-----------+-----------------+------------------+
//! ```
//!
//! The CRC-32 covers the 4 length bytes followed by the payload, so a corrupted length is caught
//! as surely as a corrupted payload. Decoding never allocates more than `max_len` bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;

/// Why a frame could not be decoded or moved.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: u32, max: u32 },
    #[error("frame checksum mismatch: header says {expected:#010x}, payload gives {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("reading a frame failed")]
    Read(#[source] std::io::Error),
    #[error("writing a frame failed")]
    Write(#[source] std::io::Error),
}

fn checksum(len_bytes: [u8; 4], parts: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

/// Appends one frame carrying `payload` to `dst`.
///
/// # Panics
/// Never for payloads below 4 GiB; longer payloads are a programming error and panic.
pub fn encode(payload: &[u8], dst: &mut BytesMut) {
    let len = u32::try_from(payload.len()).expect("frame payload below 4 GiB");
    let len_bytes = len.to_be_bytes();
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_slice(&len_bytes);
    dst.put_u32(checksum(len_bytes, &[payload]));
    dst.put_slice(payload);
}

/// Encodes the 8-byte header for `payload`, for callers that write header and payload separately
/// (vectored writes of large payloads without copying).
pub fn encode_header(payload: &[u8]) -> [u8; HEADER_LEN] {
    encode_header_parts(payload, &[])
}

/// Encodes the 8-byte header for a payload made of `head` followed by `tail`, for callers that
/// keep a large trailing part by reference instead of copying it behind the rest.
pub fn encode_header_parts(head: &[u8], tail: &[u8]) -> [u8; HEADER_LEN] {
    let len = u32::try_from(head.len() + tail.len()).expect("frame payload below 4 GiB");
    let len_bytes = len.to_be_bytes();
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&len_bytes);
    header[4..].copy_from_slice(&checksum(len_bytes, &[head, tail]).to_be_bytes());
    header
}

/// Takes one complete frame off the front of `src`.
///
/// Returns `Ok(None)` when `src` does not yet hold a whole frame (nothing is consumed), and an
/// error as soon as the header announces more than `max_len` bytes or the checksum fails.
pub fn decode(src: &mut BytesMut, max_len: u32) -> Result<Option<Bytes>, FrameError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len_bytes = [src[0], src[1], src[2], src[3]];
    let len = u32::from_be_bytes(len_bytes);
    if len > max_len {
        return Err(FrameError::TooLong { len, max: max_len });
    }
    let total = HEADER_LEN + len as usize;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    let expected = u32::from_be_bytes([src[4], src[5], src[6], src[7]]);
    let actual = checksum(len_bytes, &[&src[HEADER_LEN..total]]);
    if expected != actual {
        return Err(FrameError::Checksum { expected, actual });
    }
    src.advance(HEADER_LEN);
    Ok(Some(src.split_to(len as usize).freeze()))
}

/// Reads frames from a byte stream, owning the receive buffer.
pub struct FrameReader<R> {
    inner: R,
    buffer: BytesMut,
    max_len: u32,
    bytes_read: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `inner`; frames longer than `max_len` are refused.
    pub fn new(inner: R, max_len: u32) -> Self {
        Self {
            inner,
            buffer: BytesMut::with_capacity(64 * 1024),
            max_len,
            bytes_read: 0,
        }
    }

    /// Returns the next frame, `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(frame) = decode(&mut self.buffer, self.max_len)? {
                return Ok(Some(frame));
            }
            if self.buffer.capacity() - self.buffer.len() < 8 * 1024 {
                self.buffer.reserve(64 * 1024);
            }
            let n = self
                .inner
                .read_buf(&mut self.buffer)
                .await
                .map_err(FrameError::Read)?;
            if n == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.bytes_read += n as u64;
        }
    }

    /// Total bytes received from the stream so far (headers included).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Gives back the stream and any bytes already buffered but not yet decoded.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buffer)
    }
}

/// Writes frames to a byte stream.
pub struct FrameWriter<W> {
    inner: W,
    bytes_written: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            bytes_written: 0,
        }
    }

    /// Writes one frame and flushes it.
    pub async fn write_frame(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        self.write_frame_unflushed(payload).await?;
        self.flush().await
    }

    /// Writes one frame without flushing, for batching several frames before one flush.
    pub async fn write_frame_unflushed(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        let header = encode_header(payload);
        self.inner
            .write_all(&header)
            .await
            .map_err(FrameError::Write)?;
        self.inner
            .write_all(payload)
            .await
            .map_err(FrameError::Write)?;
        self.bytes_written += (HEADER_LEN + payload.len()) as u64;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), FrameError> {
        self.inner.flush().await.map_err(FrameError::Write)
    }

    /// Total bytes sent on the stream so far (headers included).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut buf = BytesMut::new();
            for p in &payloads {
                encode(p, &mut buf);
            }
            for p in &payloads {
                let frame = decode(&mut buf, 1024).unwrap().unwrap();
                prop_assert_eq!(&frame[..], &p[..]);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn a_header_over_two_parts_is_the_header_over_their_concatenation(
            payload in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..300,
        ) {
            let cut = cut.min(payload.len());
            let (head, tail) = payload.split_at(cut);
            prop_assert_eq!(encode_header_parts(head, tail), encode_header(&payload));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode(&mut buf, 32);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..64), bit in 0usize..512) {
            let mut buf = BytesMut::new();
            encode(&payload, &mut buf);
            let bit = bit % (buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            // A flip in the length may make the frame look incomplete or too long; it must never decode.
            let decoded = decode(&mut buf, 1 << 20);
            prop_assert!(!matches!(decoded, Ok(Some(_))));
        }
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut whole = BytesMut::new();
        encode(b"hello", &mut whole);
        let mut buf = BytesMut::from(&whole[..6]);
        assert!(decode(&mut buf, 64).unwrap().is_none());
        assert_eq!(buf.len(), 6);
        buf.extend_from_slice(&whole[6..]);
        assert_eq!(&decode(&mut buf, 64).unwrap().unwrap()[..], b"hello");
    }

    #[test]
    fn oversize_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(1 << 30);
        buf.put_u32(0);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[tokio::test]
    async fn reader_and_writer_over_a_pipe() {
        let (a, b) = tokio::io::duplex(1024);
        let mut writer = FrameWriter::new(a);
        let mut reader = FrameReader::new(b, 1 << 20);
        let big = vec![7u8; 100_000];
        let send = async {
            writer.write_frame(b"one").await.unwrap();
            writer.write_frame(&big).await.unwrap();
            drop(writer);
        };
        let recv = async {
            assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"one");
            assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 100_000);
            assert!(reader.read_frame().await.unwrap().is_none());
        };
        tokio::join!(send, recv);
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error() {
        let mut whole = BytesMut::new();
        encode(b"hello world", &mut whole);
        let cut = whole[..10].to_vec();
        let mut reader = FrameReader::new(&cut[..], 1024);
        assert!(matches!(
            reader.read_frame().await,
            Err(FrameError::Truncated)
        ));
    }
}
