//! TLS for NBD: the server settings (acceptor, whether TLS is required) and a stream that is
//! either plain or upgraded by `NBD_OPT_STARTTLS`.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// TLS configuration of an NBD server.
#[derive(Clone)]
pub struct TlsSettings {
    pub acceptor: TlsAcceptor,
    /// FORCEDTLS mode: every option except `STARTTLS` and `ABORT` gets `NBD_REP_ERR_TLS_REQD`
    /// until TLS is up. Without it TLS is offered but optional.
    pub required: bool,
}

/// Why TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSettingsError {
    #[error("cannot load the NBD TLS certificate directory {dir}")]
    Load {
        dir: String,
        #[source]
        source: common::tls::TlsError,
    },
}

impl TlsSettings {
    /// Loads a certificate directory in the GnuTLS layout used by qemu-nbd and nbdkit:
    /// `server-cert.pem`, `server-key.pem`, and optionally `ca-cert.pem`. When `ca-cert.pem`
    /// exists, clients must present a certificate issued by that CA.
    pub fn from_dir(dir: &Path, required: bool) -> Result<TlsSettings, TlsSettingsError> {
        let verify_clients = dir.join("ca-cert.pem").exists();
        let config =
            common::tls::nbd_server_config_from_dir(dir, verify_clients).map_err(|source| {
                TlsSettingsError::Load {
                    dir: dir.display().to_string(),
                    source,
                }
            })?;
        Ok(TlsSettings {
            acceptor: TlsAcceptor::from(config),
            required,
        })
    }
}

/// A connection before or after the TLS upgrade.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S> MaybeTls<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
