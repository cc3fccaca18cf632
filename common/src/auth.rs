//! Shared-secret challenge-response between two nodes, so a node of another cluster (or without the
//! group key) is refused before any data moves.
//!
//! Both sides run the same symmetric exchange, framed with [`crate::frame`]:
//!
//! 1. each sends `HELLO = nonce (32 bytes) || name (UTF-8)`;
//! 2. each sends `PROOF = BLAKE3-keyed(key, context || 0 || peer_nonce || own_nonce || own_name)`;
//! 3. each checks the peer's proof, computed over its own nonce, the peer's nonce and the peer's name.
//!
//! The key is derived from the secret with BLAKE3's key derivation, the context string separates
//! uses (for example `"blockd-repl resource r0"` or `"filed group web"`), and proofs bind both nonces
//! and the claimed name, so a proof can be neither replayed nor reflected.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame;

/// Bytes in a nonce and in a proof.
pub const NONCE_LEN: usize = 32;
const MAX_NAME_LEN: usize = 255;

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the shared secret file {path}")]
    ReadSecret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the shared secret file {path} is empty")]
    EmptySecret { path: PathBuf },
    #[error("sending the authentication message failed")]
    Send(#[source] std::io::Error),
    #[error("receiving the authentication message failed")]
    Receive(#[source] std::io::Error),
    #[error("malformed authentication message: {0}")]
    Malformed(String),
    #[error("peer {peer:?} failed the shared-secret challenge (wrong key or another cluster)")]
    Refused { peer: String },
    #[error("peer claims our own name {0:?}")]
    SameName(String),
}

/// A key derived from a shared secret.
#[derive(Clone)]
pub struct SharedKey([u8; 32]);

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(..)")
    }
}

impl SharedKey {
    /// Derives the key from the bytes of a secret (surrounding whitespace ignored).
    pub fn from_secret(secret: &[u8]) -> Self {
        let trimmed = secret.trim_ascii();
        Self(blake3::derive_key(
            "storage-replication shared secret v1",
            trimmed,
        ))
    }

    /// Reads a secret file and derives the key; an empty file is an error.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::ReadSecret {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.trim_ascii().is_empty() {
            return Err(AuthError::EmptySecret {
                path: path.to_path_buf(),
            });
        }
        Ok(Self::from_secret(&bytes))
    }

    /// A new random secret, hex-encoded, suitable for a key file.
    pub fn generate_secret() -> String {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A fresh random nonce.
pub fn new_nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

/// The proof that the holder of `key` answers `challenge` (the peer's nonce) as `name`.
pub fn proof(
    key: &SharedKey,
    context: &str,
    challenge: &[u8; NONCE_LEN],
    own_nonce: &[u8; NONCE_LEN],
    name: &str,
) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(&key.0);
    hasher.update(context.as_bytes());
    hasher.update(&[0]);
    hasher.update(challenge);
    hasher.update(own_nonce);
    hasher.update(name.as_bytes());
    *hasher.finalize().as_bytes()
}

/// Checks a peer's proof in constant time.
pub fn verify(
    key: &SharedKey,
    context: &str,
    own_nonce: &[u8; NONCE_LEN],
    peer_nonce: &[u8; NONCE_LEN],
    peer_name: &str,
    peer_proof: &[u8],
) -> bool {
    let expected = blake3::Hash::from(proof(key, context, own_nonce, peer_nonce, peer_name));
    match <[u8; 32]>::try_from(peer_proof) {
        Ok(given) => expected == blake3::Hash::from(given),
        Err(_) => false,
    }
}

/// Encodes a HELLO payload.
pub fn encode_hello(nonce: &[u8; NONCE_LEN], name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(NONCE_LEN + name.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(name.as_bytes());
    out
}

/// Decodes a HELLO payload into the nonce and the claimed name.
pub fn decode_hello(payload: &[u8]) -> Result<([u8; NONCE_LEN], String), AuthError> {
    if payload.len() < NONCE_LEN || payload.len() > NONCE_LEN + MAX_NAME_LEN {
        return Err(AuthError::Malformed(format!(
            "hello of {} bytes",
            payload.len()
        )));
    }
    let (nonce, name) = payload.split_at(NONCE_LEN);
    let name = std::str::from_utf8(name)
        .map_err(|_| AuthError::Malformed("peer name is not UTF-8".into()))?;
    if name.is_empty() {
        return Err(AuthError::Malformed("empty peer name".into()));
    }
    Ok((
        nonce.try_into().expect("split at NONCE_LEN"),
        name.to_string(),
    ))
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, payload: &[u8]) -> Result<(), AuthError> {
    let mut buf = BytesMut::new();
    frame::encode(payload, &mut buf);
    stream.write_all(&buf).await.map_err(AuthError::Send)?;
    stream.flush().await.map_err(AuthError::Send)
}

/// Reads exactly one frame without reading past it, so the stream can be handed on afterwards.
async fn receive<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, AuthError> {
    let mut header = [0u8; frame::HEADER_LEN];
    stream
        .read_exact(&mut header)
        .await
        .map_err(AuthError::Receive)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > NONCE_LEN + MAX_NAME_LEN {
        return Err(AuthError::Malformed(format!("message of {len} bytes")));
    }
    let mut whole = BytesMut::with_capacity(frame::HEADER_LEN + len);
    whole.extend_from_slice(&header);
    whole.resize(frame::HEADER_LEN + len, 0);
    stream
        .read_exact(&mut whole[frame::HEADER_LEN..])
        .await
        .map_err(AuthError::Receive)?;
    match frame::decode(&mut whole, (NONCE_LEN + MAX_NAME_LEN) as u32) {
        Ok(Some(payload)) => Ok(payload.to_vec()),
        Ok(None) => Err(AuthError::Malformed("incomplete message".into())),
        Err(e) => Err(AuthError::Malformed(e.to_string())),
    }
}

/// Runs the symmetric challenge-response on `stream` (usually already inside TLS) and returns the
/// name the peer proved. Callers check that name against their configuration and any timeout.
pub async fn mutual_auth<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &SharedKey,
    context: &str,
    own_name: &str,
) -> Result<String, AuthError> {
    let own_nonce = new_nonce();
    send(stream, &encode_hello(&own_nonce, own_name)).await?;
    let (peer_nonce, peer_name) = decode_hello(&receive(stream).await?)?;
    if peer_name == own_name {
        return Err(AuthError::SameName(peer_name));
    }
    send(
        stream,
        &proof(key, context, &peer_nonce, &own_nonce, own_name),
    )
    .await?;
    let peer_proof = receive(stream).await?;
    if verify(
        key,
        context,
        &own_nonce,
        &peer_nonce,
        &peer_name,
        &peer_proof,
    ) {
        Ok(peer_name)
    } else {
        Err(AuthError::Refused { peer: peer_name })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_key_authenticates_both_ways() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let key = SharedKey::from_secret(b"s3cret\n");
        let key2 = SharedKey::from_secret(b"s3cret");
        let (ra, rb) = tokio::join!(
            mutual_auth(&mut a, &key, "ctx", "alpha"),
            mutual_auth(&mut b, &key2, "ctx", "beta")
        );
        assert_eq!(ra.unwrap(), "beta");
        assert_eq!(rb.unwrap(), "alpha");
    }

    #[tokio::test]
    async fn wrong_key_or_context_is_refused() {
        for (key_b, ctx_b) in [("other", "ctx"), ("s3cret", "other ctx")] {
            let (mut a, mut b) = tokio::io::duplex(4096);
            let (ka, kb) = (
                SharedKey::from_secret(b"s3cret"),
                SharedKey::from_secret(key_b.as_bytes()),
            );
            let (ra, rb) = tokio::join!(
                mutual_auth(&mut a, &ka, "ctx", "alpha"),
                mutual_auth(&mut b, &kb, ctx_b, "beta")
            );
            assert!(matches!(ra, Err(AuthError::Refused { .. })));
            assert!(matches!(rb, Err(AuthError::Refused { .. })));
        }
    }

    #[test]
    fn reflected_proof_does_not_verify() {
        let key = SharedKey::from_secret(b"k");
        let mine = new_nonce();
        let theirs = new_nonce();
        // An attacker sending back our own proof (computed for our name) under our name is caught
        // by the same-name check; under another name the proof does not match.
        let ours = proof(&key, "c", &theirs, &mine, "alpha");
        assert!(!verify(&key, "c", &mine, &theirs, "mallory", &ours));
        assert!(verify(
            &key,
            "c",
            &mine,
            &theirs,
            "beta",
            &proof(&key, "c", &mine, &theirs, "beta")
        ));
    }

    #[tokio::test]
    async fn garbage_is_malformed_not_a_panic() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let attacker = async {
            b.write_all(&[0xff; 64]).await.unwrap();
            drop(b);
        };
        let key = SharedKey::from_secret(b"k");
        let (res, _) = tokio::join!(mutual_auth(&mut a, &key, "c", "alpha"), attacker);
        assert!(res.is_err());
    }

    #[test]
    fn secret_file_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.key");
        std::fs::write(&empty, "  \n").unwrap();
        assert!(matches!(
            SharedKey::load(&empty),
            Err(AuthError::EmptySecret { .. })
        ));
        let missing = dir.path().join("missing.key");
        assert!(
            SharedKey::load(&missing)
                .unwrap_err()
                .to_string()
                .contains("missing.key")
        );
        assert_eq!(SharedKey::generate_secret().len(), 64);
    }
}
