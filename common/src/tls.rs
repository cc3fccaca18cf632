//! TLS for peer links and NBD: PEM loading, rustls configurations on the ring provider,
//! certificate issuing from a cluster CA, and checks that a peer's certificate names the expected host.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS setting could not be loaded, built or generated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}")]
    ReadCerts {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read a private key from {path}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA certificate in {path} is not usable as a trust anchor")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("invalid TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("cannot build the client-certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid TLS peer name (expected a DNS name or an IP address)")]
    BadName(String),
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The crypto provider every configuration here uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCerts {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::ReadKey {
        path: path.to_path_buf(),
        source,
    })
}

/// A trust store holding the certificates of `ca`.
pub fn root_store(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

/// A server configuration presenting `cert`/`key`. With `client_ca`, every client must present a
/// certificate issued by that CA (mutual TLS); without it, clients are not asked for one.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
                    .build()
                    .map_err(TlsError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

/// A client configuration trusting `ca`, presenting `identity` (certificate, key) when given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(root_store(ca)?);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(TlsError::Config)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A server configuration from a certificate directory in the layout GnuTLS-based NBD tools use
/// (`server-cert.pem`, `server-key.pem`, and `ca-cert.pem`). Client certificates are required and
/// checked against `ca-cert.pem` only when `verify_clients` is set.
pub fn nbd_server_config_from_dir(
    dir: &Path,
    verify_clients: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let ca = dir.join("ca-cert.pem");
    server_config(
        &dir.join("server-cert.pem"),
        &dir.join("server-key.pem"),
        verify_clients.then_some(ca.as_path()),
    )
}

/// Converts a host name or IP address into the form rustls verifies against.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::BadName(name.to_string()))
}

/// Whether the end-entity certificate of a verified chain is valid for `name` (a DNS name or IP
/// address in its subject alternative names). Used by servers to tie a client certificate to the
/// node it claims to be; the chain itself was already verified by the handshake.
pub fn peer_certificate_names(certs: &[CertificateDer<'_>], name: &str) -> bool {
    let Some(end_entity) = certs.first() else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(end_entity) else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&server_name).is_ok()
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl PemPair {
    /// Reads a certificate file and a key file.
    pub fn read(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Self {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600).
    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let write = |path: &Path, text: &str, mode: u32| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(path)
                .and_then(|mut file| file.write_all(text.as_bytes()))
                .map_err(|source| TlsError::Write {
                    path: path.to_path_buf(),
                    source,
                })
        };
        write(cert, &self.cert_pem, 0o644)?;
        write(key, &self.key_pem, 0o600)
    }
}

/// Makes a self-signed certificate authority for a cluster.
pub fn generate_ca(common_name: &str) -> Result<PemPair, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate signed by `ca`, valid for both server and client authentication, for the
/// given names (DNS names or IP addresses; the first is also the common name).
pub fn issue_cert(ca: &PemPair, names: &[String]) -> Result<PemPair, TlsError> {
    let mut params = CertificateParams::new(names.to_vec()).map_err(TlsError::Generate)?;
    let mut dn = DistinguishedName::new();
    if let Some(first) = names.first() {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(TlsError::Generate)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(TlsError::Generate)?;
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(TlsError::Generate)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn write_pair(dir: &Path, stem: &str, pair: &PemPair) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}-cert.pem"));
        let key = dir.join(format!("{stem}-key.pem"));
        pair.write(&cert, &key).unwrap();
        (cert, key)
    }

    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> Result<Vec<CertificateDer<'static>>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let sname = server_name(name).unwrap();
        let (server_side, client_side) =
            tokio::join!(acceptor.accept(a), connector.connect(sname, b));
        let mut client_side = client_side.map_err(|e| e.to_string())?;
        let mut server_side = server_side.map_err(|e| e.to_string())?;
        client_side.write_all(b"ping").await.unwrap();
        client_side.flush().await.unwrap();
        let mut buf = [0u8; 4];
        server_side.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        Ok(server_side
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default())
    }

    #[tokio::test]
    async fn mutual_tls_with_issued_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test cluster").unwrap();
        let (ca_cert, _) = write_pair(dir.path(), "ca", &ca);
        let alpha = issue_cert(&ca, &["alpha".into(), "127.0.0.2".into()]).unwrap();
        let beta = issue_cert(&ca, &["beta".into()]).unwrap();
        let (a_cert, a_key) = write_pair(dir.path(), "alpha", &alpha);
        let (b_cert, b_key) = write_pair(dir.path(), "beta", &beta);

        let server = server_config(&a_cert, &a_key, Some(&ca_cert)).unwrap();
        let client = client_config(&ca_cert, Some((&b_cert, &b_key))).unwrap();
        let peer = handshake(server.clone(), client.clone(), "alpha")
            .await
            .unwrap();
        assert!(peer_certificate_names(&peer, "beta"));
        assert!(!peer_certificate_names(&peer, "alpha"));
        // The server certificate also covers its IP address.
        handshake(server.clone(), client.clone(), "127.0.0.2")
            .await
            .unwrap();
        // Wrong expected server name fails.
        assert!(handshake(server.clone(), client, "gamma").await.is_err());
        // A client without a certificate is refused by a mutual-TLS server.
        let anonymous = client_config(&ca_cert, None).unwrap();
        assert!(handshake(server, anonymous, "alpha").await.is_err());
    }

    #[tokio::test]
    async fn foreign_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("ours").unwrap();
        let other = generate_ca("theirs").unwrap();
        let (ca_cert, _) = write_pair(dir.path(), "ca", &ca);
        let (other_ca, _) = write_pair(dir.path(), "other", &other);
        let (s_cert, s_key) = write_pair(
            dir.path(),
            "server",
            &issue_cert(&ca, &["alpha".into()]).unwrap(),
        );
        let (m_cert, m_key) = write_pair(
            dir.path(),
            "mallory",
            &issue_cert(&other, &["beta".into()]).unwrap(),
        );
        let server = server_config(&s_cert, &s_key, Some(&ca_cert)).unwrap();
        let client = client_config(&other_ca, Some((&m_cert, &m_key))).unwrap();
        assert!(handshake(server.clone(), client, "alpha").await.is_err());
        let client = client_config(&ca_cert, Some((&m_cert, &m_key))).unwrap();
        assert!(handshake(server, client, "alpha").await.is_err());
    }

    #[test]
    fn missing_files_name_the_path() {
        let err = load_certs(Path::new("/nonexistent/cert.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"));
    }
}
