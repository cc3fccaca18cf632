//! Reading one request line from a local control socket with a size limit: a client that
//! never sends a newline gets an error instead of growing the daemon's memory without bound.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// The longest request line accepted (far more than any admin command needs).
pub const MAX_CONTROL_LINE: usize = 1 << 20;

/// Why a control line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ControlLineError {
    #[error("cannot read the control request")]
    Read(#[source] std::io::Error),
    #[error("control request longer than {max} bytes")]
    TooLong { max: usize },
    #[error("control request is not UTF-8")]
    NotUtf8,
}

/// Reads the next line (without its newline) of at most `max` bytes; `None` at the end of
/// the stream. A last line without a newline is returned as is.
pub async fn read_control_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<String>, ControlLineError> {
    let mut buf = Vec::new();
    let n = reader
        .take(max as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(ControlLineError::Read)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Err(ControlLineError::TooLong { max });
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| ControlLineError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_up_to_the_limit_and_no_further() {
        let mut r: &[u8] = b"{\"a\":1}\nlast";
        assert_eq!(
            read_control_line(&mut r, 16).await.unwrap().as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(
            read_control_line(&mut r, 16).await.unwrap().as_deref(),
            Some("last")
        );
        assert!(read_control_line(&mut r, 16).await.unwrap().is_none());
        // Exactly the limit, with its newline, is fine; one byte more is refused without
        // reading the rest.
        let mut r: &[u8] = b"0123456789abcdef\n";
        assert_eq!(
            read_control_line(&mut r, 16).await.unwrap().as_deref(),
            Some("0123456789abcdef")
        );
        let long = vec![b'x'; 100];
        let mut r: &[u8] = &long;
        assert!(matches!(
            read_control_line(&mut r, 16).await,
            Err(ControlLineError::TooLong { max: 16 })
        ));
        let mut r: &[u8] = b"\xff\xfe\n";
        assert!(matches!(
            read_control_line(&mut r, 16).await,
            Err(ControlLineError::NotUtf8)
        ));
    }
}
