//! New key material: a trust anchor, an issuer signed by it, and writing both in the layout
//! the controller loads (`meshctl install`, the local mesh and tests make theirs here).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use super::{CLOCK_SKEW, ISSUER_CERT_FILE, ISSUER_KEY_FILE, Issuer, LoadError, TRUST_ANCHORS_FILE};

/// Why key material could not be generated or written.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The trust domain cannot be put in a certificate name.
    #[error(
        "trust domain {0:?} is invalid: it must be 1-255 characters of a-z, 0-9, '.', '-', '_'"
    )]
    TrustDomain(String),
    /// The signing anchor given to [`generate_issuer`] is unusable.
    #[error("trust anchor: {0}")]
    Anchor(#[source] rcgen::Error),
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// When a generated certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The first instant it is valid.
    pub not_before: SystemTime,
    /// The last instant it is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from [`CLOCK_SKEW`] ago until `lifetime` from now.
    pub fn from_now(lifetime: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now.checked_sub(CLOCK_SKEW).unwrap_or(now),
            not_after: now + lifetime,
        }
    }
}

impl From<Duration> for Validity {
    fn from(lifetime: Duration) -> Self {
        Self::from_now(lifetime)
    }
}

/// A certificate and its private key, both PEM. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PemCertificate {
    /// The certificate, PEM (`CERTIFICATE`).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (`PRIVATE KEY`).
    pub key_pem: String,
}

impl fmt::Debug for PemCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemCertificate")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Generates a self-signed trust anchor (root CA, ECDSA P-256) for `trust_domain`.
pub fn generate_trust_anchor(
    trust_domain: &str,
    validity: impl Into<Validity>,
) -> Result<PemCertificate, GenerateError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(
        format!("root.mesh.{}", checked_trust_domain(trust_domain)?),
        BasicConstraints::Unconstrained,
        validity.into(),
    );
    let cert = params.self_signed(&key)?;
    Ok(PemCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Generates an issuer (intermediate CA, ECDSA P-256) for `trust_domain`, signed by `anchor`.
pub fn generate_issuer(
    anchor: &PemCertificate,
    trust_domain: &str,
    validity: impl Into<Validity>,
) -> Result<PemCertificate, GenerateError> {
    let anchor_key = KeyPair::from_pem(&anchor.key_pem).map_err(GenerateError::Anchor)?;
    let anchor_signer = rcgen::Issuer::from_ca_cert_pem(&anchor.cert_pem, anchor_key)
        .map_err(GenerateError::Anchor)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(
        format!("identity.mesh.{}", checked_trust_domain(trust_domain)?),
        // The issuer signs leaves only.
        BasicConstraints::Constrained(0),
        validity.into(),
    );
    let cert = params.signed_by(&key, &anchor_signer)?;
    Ok(PemCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A freshly generated trust anchor and an issuer it signed: what `meshctl install` makes when
/// it is given no certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedCa {
    /// The trust anchor; its key is needed only to sign the next issuer.
    pub trust_anchor: PemCertificate,
    /// The issuer the controller signs with.
    pub issuer: PemCertificate,
}

impl GeneratedCa {
    /// Generates a trust anchor and an issuer for `trust_domain`.
    pub fn generate(
        trust_domain: &str,
        anchor_validity: impl Into<Validity>,
        issuer_validity: impl Into<Validity>,
    ) -> Result<Self, GenerateError> {
        let trust_anchor = generate_trust_anchor(trust_domain, anchor_validity)?;
        let issuer = generate_issuer(&trust_anchor, trust_domain, issuer_validity)?;
        Ok(Self {
            trust_anchor,
            issuer,
        })
    }

    /// Writes the issuer and the anchor (as the whole bundle) to `dir` in cert-manager's layout.
    pub fn write_dir(&self, dir: &Path) -> Result<(), GenerateError> {
        write_dir(dir, &self.issuer, &self.trust_anchor.cert_pem)
    }

    /// Loads the issuer the controller would load from [`GeneratedCa::write_dir`]'s files.
    pub fn load_issuer(&self) -> Result<Issuer, LoadError> {
        Issuer::from_pem(
            &self.issuer.cert_pem,
            &self.issuer.key_pem,
            &self.trust_anchor.cert_pem,
        )
    }
}

/// Writes `issuer` and the `trust_anchors_pem` bundle to `dir` (created if missing) in
/// cert-manager's layout. Each file is replaced atomically (written aside, then renamed); the
/// key is readable by its owner only. The bundle is written first, so a reader never sees a
/// new issuer without its anchor.
pub fn write_dir(
    dir: &Path,
    issuer: &PemCertificate,
    trust_anchors_pem: &str,
) -> Result<(), GenerateError> {
    std::fs::create_dir_all(dir).map_err(|source| GenerateError::Write {
        path: dir.to_owned(),
        source,
    })?;
    write_file_atomically(&dir.join(TRUST_ANCHORS_FILE), trust_anchors_pem, 0o644)?;
    write_file_atomically(&dir.join(ISSUER_KEY_FILE), &issuer.key_pem, 0o600)?;
    write_file_atomically(&dir.join(ISSUER_CERT_FILE), &issuer.cert_pem, 0o644)?;
    Ok(())
}

fn write_file_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), GenerateError> {
    let write_error = |source| GenerateError::Write {
        path: path.to_owned(),
        source,
    };
    let mut aside = path.as_os_str().to_owned();
    aside.push(".tmp");
    let aside = PathBuf::from(aside);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&aside).map_err(write_error)?;
    file.write_all(contents.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    std::fs::rename(&aside, path).map_err(write_error)
}

fn checked_trust_domain(trust_domain: &str) -> Result<&str, GenerateError> {
    if crate::identity::spiffe::is_trust_domain(trust_domain) {
        Ok(trust_domain)
    } else {
        Err(GenerateError::TrustDomain(trust_domain.to_owned()))
    }
}

pub(super) fn ca_params(
    common_name: String,
    constraints: BasicConstraints,
    validity: Validity,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::from(validity.not_before);
    params.not_after = OffsetDateTime::from(validity.not_after);
    params.serial_number = Some(crate::identity::certify::random_serial());
    params.use_authority_key_identifier_extension = true;
    params
}
