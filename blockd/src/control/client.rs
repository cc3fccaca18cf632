//! The control socket client used by `blockctl`.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedReadHalf;

use super::proto::{Request, Response};

/// Why talking to blockd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the control socket {path} (is blockd running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O failed")]
    Io(#[source] std::io::Error),
    #[error("blockd closed the control connection")]
    Closed,
    #[error("malformed response from blockd: {0}")]
    Malformed(String),
}

/// A connection to the control socket.
pub struct Client {
    lines: Lines<BufReader<OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = s.into_split();
        Ok(Client {
            lines: BufReader::new(r).lines(),
            w,
        })
    }

    /// Sends a request and reads one response line.
    pub async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let mut line =
            serde_json::to_vec(req).map_err(|e| ClientError::Malformed(e.to_string()))?;
        line.push(b'\n');
        self.w.write_all(&line).await.map_err(ClientError::Io)?;
        self.next().await
    }

    /// Reads the next response line (events).
    pub async fn next(&mut self) -> Result<Response, ClientError> {
        let line = self
            .lines
            .next_line()
            .await
            .map_err(ClientError::Io)?
            .ok_or(ClientError::Closed)?;
        serde_json::from_str(&line).map_err(|e| ClientError::Malformed(format!("{e}: {line}")))
    }
}
