//! The identity cache: the proxy's key and its last certificate chain, kept in a folder of the
//! proxy's own (in Kubernetes an in-memory `emptyDir` mounted in the proxy container only), so
//! that a proxy restarted while the controller is down comes back with its last identity and
//! serves at once instead of failing every request until the controller returns.
//!
//! One file, `identity.pem`: the PKCS#8 key, then the chain, leaf first. Written whole and
//! renamed into place, readable by the proxy's user only. What is read back is checked like a
//! new certificate (our SPIFFE ID, our key, chains to the current anchors, not expired) before
//! it is used; anything else is ignored and a new certificate is awaited.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const FILE: &str = "identity.pem";

/// A key and chain read back from the cache.
pub struct Cached {
    /// The key the chain was issued for.
    pub key: rcgen::KeyPair,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
}

/// Why the cache could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Reading failed (other than the file not existing).
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no usable key or certificate.
    #[error("{path} is not a key and a certificate chain: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Reads the cache in `dir`; `None` when there is nothing cached yet.
pub fn load(dir: &Path) -> Result<Option<Cached>, CacheError> {
    let path = dir.join(FILE);
    let pem = match std::fs::read_to_string(&path) {
        Ok(pem) => pem,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CacheError::Read { path, source }),
    };
    let malformed = |reason: String| CacheError::Malformed {
        path: path.clone(),
        reason,
    };
    let key = rcgen::KeyPair::from_pem(&pem).map_err(|error| malformed(error.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| malformed(error.to_string()))?;
    if chain.is_empty() {
        return Err(malformed("no CERTIFICATE block".into()));
    }
    Ok(Some(Cached { key, chain }))
}

/// Writes `key` and `chain` to the cache in `dir`, replacing what was there.
pub fn store(
    dir: &Path,
    key: &rcgen::KeyPair,
    chain: &[CertificateDer<'_>],
) -> std::io::Result<()> {
    let mut pem = key.serialize_pem();
    for cert in chain {
        pem.push_str(&mesh_spiffe::report::certificate_pem(cert.as_ref()));
    }
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(FILE))
}
