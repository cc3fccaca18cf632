//! `filed keygen` (csync2 -k): group key files, and with a configuration the cluster CA and the
//! host certificates it names (only files that are missing are created).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use common::auth::SharedKey;
use common::tls::{self, PemPair};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("{path} exists; not overwritten")]
    Exists { path: PathBuf },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate operation failed")]
    Tls(#[source] common::tls::TlsError),
    #[error(
        "host {host} has no certificate and the CA key is unknown (set `ca-key` in the config)"
    )]
    NoCaKey { host: String },
}

/// Writes a new random group key (mode 0600); refuses to overwrite.
pub fn write_group_key(path: &Path) -> Result<(), KeygenError> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|source| KeygenError::Write {
            path: path.into(),
            source,
        })?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeygenError::Exists { path: path.into() }
            } else {
                KeygenError::Write {
                    path: path.into(),
                    source,
                }
            }
        })?;
    writeln!(f, "{}", SharedKey::generate_secret()).map_err(|source| KeygenError::Write {
        path: path.into(),
        source,
    })
}

fn mkparent(p: &Path) -> Result<(), KeygenError> {
    if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|source| KeygenError::Write {
            path: p.into(),
            source,
        })?;
    }
    Ok(())
}

/// Creates every missing file the configuration names: CA (when `ca-key` is set), host
/// certificates (for `hosts`, or all hosts), group keys. Returns what was created.
pub fn generate_missing(
    config: &Config,
    hosts: Option<&[String]>,
) -> Result<Vec<PathBuf>, KeygenError> {
    let mut made = Vec::new();
    let ca = match &config.ca_key {
        Some(ca_key) if !config.ca.exists() => {
            let pair = tls::generate_ca("filed cluster CA").map_err(KeygenError::Tls)?;
            mkparent(&config.ca)?;
            mkparent(ca_key)?;
            pair.write(&config.ca, ca_key).map_err(KeygenError::Tls)?;
            made.push(config.ca.clone());
            Some(pair)
        }
        Some(ca_key) => Some(PemPair::read(&config.ca, ca_key).map_err(KeygenError::Tls)?),
        None => None,
    };
    for h in config.hosts.values() {
        if hosts.is_some_and(|list| !list.contains(&h.name)) || h.cert.exists() {
            continue;
        }
        let ca = ca.as_ref().ok_or_else(|| KeygenError::NoCaKey {
            host: h.name.clone(),
        })?;
        let mut names = vec![h.name.clone()];
        if let Some((addr, _)) = h.address.rsplit_once(':') {
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            if addr != h.name {
                names.push(addr.to_string());
            }
        }
        let pair = tls::issue_cert(ca, &names).map_err(KeygenError::Tls)?;
        mkparent(&h.cert)?;
        mkparent(&h.key)?;
        pair.write(&h.cert, &h.key).map_err(KeygenError::Tls)?;
        made.push(h.cert.clone());
    }
    for g in config.groups.values() {
        if !g.key.exists() {
            write_group_key(&g.key)?;
            made.push(g.key.clone());
        }
    }
    Ok(made)
}
