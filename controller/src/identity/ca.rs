//! The CA's key material: the trust anchors every proxy trusts and the issuer that signs
//! leaves, loaded from PEM files in cert-manager's layout, plus the generators `meshctl install`,
//! the demo and the tests use to make them.
//!
//! The layout is a folder (or a Kubernetes Secret of type `kubernetes.io/tls` mounted as one):
//! - `tls.crt`: the issuer certificate, optionally followed by the chain up to (not including)
//!   a trust anchor, nearest first;
//! - `tls.key`: the issuer's private key, PKCS#8 PEM (ECDSA P-256 by default);
//! - `ca.crt`: the trust-anchor bundle, one or more certificates (old and new during rotation).
//!
//! Everything is validated at load, so a bad file stops the controller with an error naming
//! the file and the problem instead of producing certificates no proxy accepts.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::gauge::Gauge;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The issuer certificate (and its chain) in the cert-manager layout.
pub const ISSUER_CERT_FILE: &str = "tls.crt";
/// The issuer's private key in the cert-manager layout.
pub const ISSUER_KEY_FILE: &str = "tls.key";
/// The trust-anchor bundle in the cert-manager layout.
pub const TRUST_ANCHORS_FILE: &str = "ca.crt";

/// How far certificates are back-dated, so that a peer whose clock is a little behind accepts
/// them at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// An issuer with less than this left is logged as a warning when it is loaded.
const ISSUER_EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Why key material could not be loaded. Each names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold what it should, in a form we can parse.
    #[error("{file}: unparsable: {reason}")]
    Unparsable {
        /// The file.
        file: String,
        /// What could not be parsed.
        reason: String,
    },
    /// A certificate that must sign others is not a CA.
    #[error("{file}: certificate {subject:?} is not a CA: {reason}")]
    NotCa {
        /// The file.
        file: String,
        /// The certificate's subject.
        subject: String,
        /// What disqualifies it.
        reason: &'static str,
    },
    /// A certificate's validity has ended.
    #[error("{file}: certificate {subject:?} expired at {not_after}")]
    Expired {
        /// The file.
        file: String,
        /// The certificate's subject.
        subject: String,
        /// When it expired.
        not_after: String,
    },
    /// A certificate's validity has not begun.
    #[error("{file}: certificate {subject:?} is not valid before {not_before}")]
    NotYetValid {
        /// The file.
        file: String,
        /// The certificate's subject.
        subject: String,
        /// When it becomes valid.
        not_before: String,
    },
    /// A certificate in `tls.crt` is not signed by the certificate after it.
    #[error(
        "{file}: certificate {subject:?} is not signed by the next certificate in the file, {next:?}"
    )]
    BrokenChain {
        /// The file.
        file: String,
        /// The certificate whose signature does not verify.
        subject: String,
        /// The certificate expected to have signed it.
        next: String,
    },
    /// The issuer's chain does not end at any trust anchor.
    #[error(
        "{file}: certificate {subject:?} (issued by {issuer:?}) is not signed by any trust anchor in {anchors_file}"
    )]
    NotSignedByAnchor {
        /// The file holding the issuer chain.
        file: String,
        /// The last certificate of the chain.
        subject: String,
        /// The issuer it names.
        issuer: String,
        /// The trust-anchor bundle.
        anchors_file: String,
    },
    /// The private key is not one the CA can sign with.
    #[error("{file}: unsupported private key: {reason}")]
    UnsupportedKey {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
    /// The private key is not the one of the issuer certificate.
    #[error("{key_file}: the private key does not match the certificate in {cert_file}")]
    KeyMismatch {
        /// The key file.
        key_file: String,
        /// The certificate file.
        cert_file: String,
    },
}

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
    if super::spiffe::is_trust_domain(trust_domain) {
        Ok(trust_domain)
    } else {
        Err(GenerateError::TrustDomain(trust_domain.to_owned()))
    }
}

fn ca_params(
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
    params.serial_number = Some(super::certify::random_serial());
    params.use_authority_key_identifier_extension = true;
    params
}

/// The trust-anchor bundle: the root certificates proxies verify peers against. During a
/// rotation it holds the old and the new anchor.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustAnchors {
    certificates: Vec<CertificateDer<'static>>,
    pem: String,
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subjects: Vec<String> = self
            .certificates
            .iter()
            .filter_map(|der| {
                X509Certificate::from_der(der)
                    .ok()
                    .map(|(_, c)| c.subject().to_string())
            })
            .collect();
        f.debug_struct("TrustAnchors")
            .field("subjects", &subjects)
            .finish()
    }
}

impl TrustAnchors {
    /// Parses and validates a PEM bundle of one or more CA certificates.
    pub fn from_pem(pem: &str) -> Result<Self, LoadError> {
        Self::parse(pem.as_bytes(), TRUST_ANCHORS_FILE)
    }

    fn parse(pem: &[u8], file: &str) -> Result<Self, LoadError> {
        let certificates = parse_certificates(pem, file)?;
        let now = SystemTime::now();
        for der in &certificates {
            let cert = parse_x509(der, file)?;
            check_is_ca(&cert, file)?;
            match check_validity(&cert, file, now) {
                Ok(()) => {}
                // An expired anchor left in the bundle after a rotation is harmless as long as
                // the issuer chains to another one, which loading the issuer checks.
                Err(LoadError::Expired { subject, .. }) => {
                    tracing::warn!(file, %subject, "trust anchor has expired; remove it from the bundle")
                }
                Err(error) => return Err(error),
            }
        }
        Ok(Self {
            certificates,
            pem: String::from_utf8_lossy(pem).into_owned(),
        })
    }

    /// The anchors, DER.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// The bundle as PEM, as it was read.
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// The CA's signing identity: the issuer certificate, its chain and key, and the trust anchors
/// it was checked against. `Debug` never shows the key.
pub struct Issuer {
    pub(super) signer: rcgen::Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
    /// The issuer certificate and its chain, nearest first, without any trust anchor: what
    /// each leaf is sent with.
    pub(super) intermediates: Vec<CertificateDer<'static>>,
    pub(super) subject: String,
    pub(super) not_after: SystemTime,
    trust_anchors: TrustAnchors,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("intermediates", &self.intermediates.len())
            .field("trust_anchors", &self.trust_anchors)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Loads and validates `tls.crt`, `tls.key` and `ca.crt` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map(|bytes| (path.display().to_string(), bytes))
                .map_err(|source| LoadError::Read {
                    file: path.display().to_string(),
                    source,
                })
        };
        let cert = read(ISSUER_CERT_FILE)?;
        let key = read(ISSUER_KEY_FILE)?;
        let anchors = read(TRUST_ANCHORS_FILE)?;
        Self::load(
            (&cert.0, &cert.1),
            (&key.0, &key.1),
            (&anchors.0, &anchors.1),
        )
    }

    /// Validates an issuer from the contents of `tls.crt`, `tls.key` and `ca.crt`.
    pub fn from_pem(cert_pem: &str, key_pem: &str, anchors_pem: &str) -> Result<Self, LoadError> {
        Self::load(
            (ISSUER_CERT_FILE, cert_pem.as_bytes()),
            (ISSUER_KEY_FILE, key_pem.as_bytes()),
            (TRUST_ANCHORS_FILE, anchors_pem.as_bytes()),
        )
    }

    /// The issuer certificate's subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// When the issuer certificate expires; no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The issuer certificate, DER.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The certificates sent with every leaf: the issuer and its chain, nearest first, without
    /// any trust anchor (empty when the issuer is itself an anchor).
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The trust anchors the issuer was checked against.
    pub fn trust_anchors(&self) -> &TrustAnchors {
        &self.trust_anchors
    }

    fn load(
        (cert_file, cert_pem): (&str, &[u8]),
        (key_file, key_pem): (&str, &[u8]),
        (anchors_file, anchors_pem): (&str, &[u8]),
    ) -> Result<Self, LoadError> {
        let trust_anchors = TrustAnchors::parse(anchors_pem, anchors_file)?;
        let chain = parse_certificates(cert_pem, cert_file)?;
        let now = SystemTime::now();
        let parsed = chain
            .iter()
            .map(|der| parse_x509(der, cert_file))
            .collect::<Result<Vec<_>, _>>()?;
        for cert in &parsed {
            check_is_ca(cert, cert_file)?;
            check_validity(cert, cert_file, now)?;
        }
        for pair in parsed.windows(2) {
            if pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .is_err()
            {
                return Err(LoadError::BrokenChain {
                    file: cert_file.to_owned(),
                    subject: pair[0].subject().to_string(),
                    next: pair[1].subject().to_string(),
                });
            }
        }
        let Some(last) = parsed.last() else {
            return Err(unparsable(cert_file, "no CERTIFICATE block"));
        };
        let mut anchored = false;
        for anchor_der in trust_anchors.certificates() {
            let anchor = parse_x509(anchor_der, anchors_file)?;
            if anchor.subject().as_raw() == last.issuer().as_raw()
                && last.verify_signature(Some(anchor.public_key())).is_ok()
            {
                check_validity(&anchor, anchors_file, now)?;
                anchored = true;
                break;
            }
        }
        if !anchored {
            return Err(LoadError::NotSignedByAnchor {
                file: cert_file.to_owned(),
                subject: last.subject().to_string(),
                issuer: last.issuer().to_string(),
                anchors_file: anchors_file.to_owned(),
            });
        }

        let key = parse_key(key_pem, key_file)?;
        let issuer_cert = &parsed[0];
        if key.public_key_raw() != issuer_cert.public_key().subject_public_key.data.as_ref() {
            return Err(LoadError::KeyMismatch {
                key_file: key_file.to_owned(),
                cert_file: cert_file.to_owned(),
            });
        }
        let subject = issuer_cert.subject().to_string();
        let not_after = unix_time(issuer_cert.validity().not_after.timestamp());
        drop(parsed);
        let mut chain = chain.into_iter();
        let Some(certificate) = chain.next() else {
            return Err(unparsable(cert_file, "no CERTIFICATE block"));
        };
        let signer = rcgen::Issuer::from_ca_cert_der(&certificate, key)
            .map_err(|e| unparsable(cert_file, &format!("cannot sign with it: {e}")))?;
        let intermediates = std::iter::once(certificate.clone())
            .chain(chain)
            .filter(|der| !trust_anchors.certificates().contains(der))
            .collect();
        Ok(Self {
            signer,
            certificate,
            intermediates,
            subject,
            not_after,
            trust_anchors,
        })
    }
}

fn parse_certificates(pem: &[u8], file: &str) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unparsable(file, &format!("bad PEM: {e}")))?;
    if certificates.is_empty() {
        return Err(unparsable(file, "no CERTIFICATE block"));
    }
    Ok(certificates)
}

fn parse_x509<'a>(
    der: &'a CertificateDer<'_>,
    file: &str,
) -> Result<X509Certificate<'a>, LoadError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(unparsable(file, "trailing bytes after a certificate")),
        Err(e) => Err(unparsable(file, &format!("not an X.509 certificate: {e}"))),
    }
}

fn parse_key(pem: &[u8], file: &str) -> Result<KeyPair, LoadError> {
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| unparsable(file, &format!("no private key PEM block: {e}")))?;
    let unsupported = |reason: &str| LoadError::UnsupportedKey {
        file: file.to_owned(),
        reason: reason.to_owned(),
    };
    match &key {
        PrivateKeyDer::Pkcs8(_) => {}
        PrivateKeyDer::Sec1(_) => {
            return Err(unsupported(
                "it is a SEC1 'EC PRIVATE KEY'; convert it to PKCS#8 ('PRIVATE KEY'), e.g. set privateKey.encoding: PKCS8 in the cert-manager Certificate",
            ));
        }
        PrivateKeyDer::Pkcs1(_) => {
            return Err(unsupported(
                "it is an RSA key; the issuer key must be ECDSA P-256 (PKCS#8)",
            ));
        }
        _ => return Err(unsupported("unknown key type; use ECDSA P-256 in PKCS#8")),
    }
    KeyPair::try_from(&key).map_err(|e| {
        unsupported(&format!(
            "{e}; the issuer key must be ECDSA P-256, P-384 or Ed25519 in PKCS#8"
        ))
    })
}

fn check_is_ca(cert: &X509Certificate<'_>, file: &str) -> Result<(), LoadError> {
    let not_ca = |reason| LoadError::NotCa {
        file: file.to_owned(),
        subject: cert.subject().to_string(),
        reason,
    };
    if !cert.is_ca() {
        return Err(not_ca("its basic constraints do not say CA:TRUE"));
    }
    match cert.key_usage() {
        Ok(Some(usage)) if !usage.value.key_cert_sign() => {
            Err(not_ca("its key usage does not allow keyCertSign"))
        }
        Ok(_) => Ok(()),
        Err(_) => Err(not_ca("its key usage extension is malformed")),
    }
}

fn check_validity(
    cert: &X509Certificate<'_>,
    file: &str,
    now: SystemTime,
) -> Result<(), LoadError> {
    let validity = cert.validity();
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    if now > validity.not_after.timestamp() {
        return Err(LoadError::Expired {
            file: file.to_owned(),
            subject: cert.subject().to_string(),
            not_after: validity.not_after.to_string(),
        });
    }
    if now < validity.not_before.timestamp() {
        return Err(LoadError::NotYetValid {
            file: file.to_owned(),
            subject: cert.subject().to_string(),
            not_before: validity.not_before.to_string(),
        });
    }
    Ok(())
}

fn unparsable(file: &str, reason: &str) -> LoadError {
    LoadError::Unparsable {
        file: file.to_owned(),
        reason: reason.to_owned(),
    }
}

pub(super) fn unix_time(seconds: i64) -> SystemTime {
    u64::try_from(seconds)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .unwrap_or(UNIX_EPOCH)
}

/// The issuer the service signs with, replaceable while it serves (issuer rotation, a renewed
/// Secret). Cheap to clone; every clone sees replacements.
#[derive(Clone)]
pub struct SharedIssuer {
    current: Arc<RwLock<Arc<Issuer>>>,
    expiry_gauge: Gauge,
}

impl fmt::Debug for SharedIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedIssuer")
            .field(&self.current())
            .finish()
    }
}

impl SharedIssuer {
    /// Shares `issuer`, reporting its expiry in `metrics`.
    pub fn new(issuer: Issuer, metrics: &super::IdentityMetrics) -> Self {
        let shared = Self {
            current: Arc::new(RwLock::new(Arc::new(issuer))),
            expiry_gauge: metrics.issuer_expiry.clone(),
        };
        shared.report_expiry();
        shared
    }

    /// The issuer now.
    pub fn current(&self) -> Arc<Issuer> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            // A writer cannot panic while holding the lock (it only swaps an Arc).
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs with `issuer` from now on.
    pub fn replace(&self, issuer: Issuer) {
        let issuer = Arc::new(issuer);
        match self.current.write() {
            Ok(mut guard) => *guard = issuer,
            Err(poisoned) => *poisoned.into_inner() = issuer,
        }
        self.report_expiry();
    }

    fn report_expiry(&self) {
        let issuer = self.current();
        let not_after = issuer
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.expiry_gauge.set(not_after);
        let remaining = issuer
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if remaining < ISSUER_EXPIRY_WARNING {
            tracing::warn!(
                subject = issuer.subject(),
                remaining_hours = remaining.as_secs() / 3600,
                "the identity issuer certificate expires soon; rotate it"
            );
        }
    }
}

/// Reloads the issuer from `dir` whenever its files change, until `shutdown` resolves. A
/// version that fails to load is logged and the current issuer stays in use, so a half-written
/// rotation never stops signing.
pub async fn watch_issuer_dir(
    dir: PathBuf,
    interval: Duration,
    issuer: SharedIssuer,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let read_all = |dir: &Path| -> Vec<Option<Vec<u8>>> {
        [ISSUER_CERT_FILE, ISSUER_KEY_FILE, TRUST_ANCHORS_FILE]
            .iter()
            .map(|name| std::fs::read(dir.join(name)).ok())
            .collect()
    };
    let mut seen = read_all(&dir);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        let now = read_all(&dir);
        if now == seen {
            continue;
        }
        seen = now;
        match Issuer::from_dir(&dir) {
            Ok(loaded) => {
                tracing::info!(
                    dir = %dir.display(),
                    subject = loaded.subject(),
                    "identity issuer reloaded"
                );
                issuer.replace(loaded);
            }
            Err(error) => {
                tracing::warn!(%error, "identity issuer files changed but do not load; still signing with the previous issuer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn past(days_ago_start: u32, days_ago_end: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - days_ago_start * DAY,
            not_after: now - days_ago_end * DAY,
        }
    }

    fn generated() -> GeneratedCa {
        GeneratedCa::generate("cluster.local", 365 * DAY, 30 * DAY).expect("generate CA")
    }

    #[test]
    fn generated_ca_loads_and_describes_itself() {
        let ca = generated();
        let issuer = ca.load_issuer().expect("loads");
        assert_eq!(issuer.subject(), "CN=identity.mesh.cluster.local");
        assert_eq!(
            issuer.intermediates(),
            std::slice::from_ref(issuer.certificate())
        );
        assert_eq!(issuer.trust_anchors().certificates().len(), 1);
        assert_eq!(issuer.trust_anchors().pem(), ca.trust_anchor.cert_pem);
        let remaining = issuer
            .not_after()
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(remaining > 29 * DAY && remaining <= 30 * DAY);
        assert!(
            ca.trust_anchor
                .key_pem
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let debug = format!("{ca:?} {issuer:?}");
        assert!(!debug.contains("PRIVATE KEY"), "Debug leaks a key: {debug}");
    }

    #[test]
    fn write_dir_then_from_dir_round_trips() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-{}", rand::random::<u64>()));
        let ca = generated();
        ca.write_dir(&dir).expect("writes");
        let issuer = Issuer::from_dir(&dir).expect("loads from the folder");
        assert_eq!(issuer.subject(), "CN=identity.mesh.cluster.local");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join(ISSUER_KEY_FILE))
                .expect("key written")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
        }
        std::fs::remove_file(dir.join(ISSUER_KEY_FILE)).expect("remove key");
        let error = Issuer::from_dir(&dir).expect_err("no key");
        assert!(matches!(&error, LoadError::Read { file, .. } if file.ends_with("tls.key")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_anchor_may_sign_leaves_itself() {
        let anchor = generate_trust_anchor("cluster.local", DAY).expect("anchor");
        let issuer = Issuer::from_pem(&anchor.cert_pem, &anchor.key_pem, &anchor.cert_pem)
            .expect("a root as its own issuer loads");
        assert!(issuer.intermediates().is_empty(), "anchors are never sent");
    }

    #[test]
    fn a_chain_in_tls_crt_is_checked_and_sent() {
        let root = generate_trust_anchor("cluster.local", DAY).expect("root");
        let middle = generate_issuer(&root, "cluster.local", DAY).expect("middle");
        // generate_issuer constrains its output to sign leaves only; make a CA under the
        // root that may sign one more level.
        let middle_key = KeyPair::from_pem(&middle.key_pem).expect("key");
        let root_signer = rcgen::Issuer::from_ca_cert_pem(
            &root.cert_pem,
            KeyPair::from_pem(&root.key_pem).expect("root key"),
        )
        .expect("root signer");
        let middle_cert = ca_params(
            "middle".to_owned(),
            BasicConstraints::Constrained(1),
            Validity::from_now(DAY),
        )
        .signed_by(&middle_key, &root_signer)
        .expect("middle");
        let middle = PemCertificate {
            cert_pem: middle_cert.pem(),
            key_pem: middle.key_pem,
        };
        let leaf_issuer = generate_issuer(&middle, "cluster.local", DAY).expect("issuer");
        let chain_pem = format!("{}{}", leaf_issuer.cert_pem, middle.cert_pem);
        let issuer =
            Issuer::from_pem(&chain_pem, &leaf_issuer.key_pem, &root.cert_pem).expect("loads");
        assert_eq!(issuer.intermediates().len(), 2);

        let reversed = format!("{}{}", middle.cert_pem, leaf_issuer.cert_pem);
        let error = Issuer::from_pem(&reversed, &leaf_issuer.key_pem, &root.cert_pem)
            .expect_err("wrong order");
        assert!(matches!(error, LoadError::BrokenChain { .. }), "{error}");
    }

    #[test]
    fn bad_key_material_is_refused_naming_the_file_and_problem() {
        let ca = generated();
        let other = generated();
        let anchor = &ca.trust_anchor.cert_pem;
        let expired = {
            let issuer = generate_issuer(&ca.trust_anchor, "cluster.local", past(2, 1))
                .expect("expired issuer");
            Issuer::from_pem(&issuer.cert_pem, &issuer.key_pem, anchor)
        };
        let not_yet_valid = {
            let now = SystemTime::now();
            let validity = Validity {
                not_before: now + DAY,
                not_after: now + 2 * DAY,
            };
            let issuer =
                generate_issuer(&ca.trust_anchor, "cluster.local", validity).expect("future");
            Issuer::from_pem(&issuer.cert_pem, &issuer.key_pem, anchor)
        };
        let not_ca = {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
            let signer = rcgen::Issuer::from_ca_cert_pem(
                anchor,
                KeyPair::from_pem(&ca.trust_anchor.key_pem).expect("anchor key"),
            )
            .expect("signer");
            let mut params =
                CertificateParams::new(vec!["leaf.example".to_owned()]).expect("params");
            params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
            params.not_after = OffsetDateTime::now_utc() + time::Duration::hours(1);
            let cert = params.signed_by(&key, &signer).expect("leaf");
            Issuer::from_pem(&cert.pem(), &key.serialize_pem(), anchor)
        };
        let expired_anchor = {
            let old = generate_trust_anchor("cluster.local", past(3, 1)).expect("old anchor");
            let issuer = generate_issuer(&old, "cluster.local", DAY).expect("issuer");
            Issuer::from_pem(&issuer.cert_pem, &issuer.key_pem, &old.cert_pem)
        };
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n";

        let cases: Vec<(&str, Result<Issuer, LoadError>, &str)> = vec![
            (
                "expired issuer",
                expired,
                "tls.crt: certificate \"CN=identity.mesh.cluster.local\" expired at",
            ),
            (
                "future issuer",
                not_yet_valid,
                "tls.crt: certificate \"CN=identity.mesh.cluster.local\" is not valid before",
            ),
            (
                "leaf as issuer",
                not_ca,
                "tls.crt: certificate \"CN=rcgen self signed cert\" is not a CA",
            ),
            (
                "expired anchor",
                expired_anchor,
                "ca.crt: certificate \"CN=root.mesh.cluster.local\" expired at",
            ),
            (
                "foreign anchor",
                Issuer::from_pem(
                    &ca.issuer.cert_pem,
                    &ca.issuer.key_pem,
                    &other.trust_anchor.cert_pem,
                ),
                "tls.crt: certificate \"CN=identity.mesh.cluster.local\" (issued by \"CN=root.mesh.cluster.local\") is not signed by any trust anchor in ca.crt",
            ),
            (
                "key of another issuer",
                Issuer::from_pem(&ca.issuer.cert_pem, &other.issuer.key_pem, anchor),
                "tls.key: the private key does not match the certificate in tls.crt",
            ),
            (
                "SEC1 key",
                Issuer::from_pem(&ca.issuer.cert_pem, sec1, anchor),
                "tls.key: unsupported private key: it is a SEC1 'EC PRIVATE KEY'",
            ),
            (
                "no key",
                Issuer::from_pem(&ca.issuer.cert_pem, "", anchor),
                "tls.key: unparsable: no private key PEM block",
            ),
            (
                "garbage certificate",
                Issuer::from_pem(
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                    &ca.issuer.key_pem,
                    anchor,
                ),
                "tls.crt: unparsable: not an X.509 certificate",
            ),
            (
                "empty certificate file",
                Issuer::from_pem("", &ca.issuer.key_pem, anchor),
                "tls.crt: unparsable: no CERTIFICATE block",
            ),
            (
                "empty bundle",
                Issuer::from_pem(&ca.issuer.cert_pem, &ca.issuer.key_pem, "nothing here"),
                "ca.crt: unparsable: no CERTIFICATE block",
            ),
            (
                "issuer as anchor",
                Issuer::from_pem(
                    &ca.issuer.cert_pem,
                    &ca.issuer.key_pem,
                    &other.issuer.cert_pem,
                ),
                "is not signed by any trust anchor in ca.crt",
            ),
        ];
        for (case, result, want) in cases {
            let error = result.expect_err(case);
            let message = error.to_string();
            assert!(message.contains(want), "{case}: {message:?} lacks {want:?}");
            assert!(
                !message.contains("PRIVATE KEY-----"),
                "{case}: leaks key material"
            );
        }
    }

    #[test]
    fn an_expired_anchor_beside_a_valid_one_only_warns() {
        let old = generate_trust_anchor("cluster.local", past(3, 1)).expect("old anchor");
        let ca = generated();
        let bundle = format!("{}{}", old.cert_pem, ca.trust_anchor.cert_pem);
        let issuer =
            Issuer::from_pem(&ca.issuer.cert_pem, &ca.issuer.key_pem, &bundle).expect("loads");
        assert_eq!(issuer.trust_anchors().certificates().len(), 2);
    }

    #[test]
    fn invalid_trust_domains_are_refused_by_the_generators() {
        assert!(matches!(
            generate_trust_anchor("Not A Domain", DAY),
            Err(GenerateError::TrustDomain(_))
        ));
        let anchor = generate_trust_anchor("ok", DAY).expect("anchor");
        assert!(matches!(
            generate_issuer(&anchor, "", DAY),
            Err(GenerateError::TrustDomain(_))
        ));
        let broken = PemCertificate {
            cert_pem: anchor.cert_pem.clone(),
            key_pem: "not a key".to_owned(),
        };
        assert!(matches!(
            generate_issuer(&broken, "ok", DAY),
            Err(GenerateError::Anchor(_))
        ));
    }

    #[tokio::test]
    async fn the_shared_issuer_follows_its_folder() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-{}", rand::random::<u64>()));
        let first = generated();
        first.write_dir(&dir).expect("writes");
        let metrics = super::super::IdentityMetrics::new();
        let shared = SharedIssuer::new(Issuer::from_dir(&dir).expect("loads"), &metrics);
        let first_expiry = metrics.issuer_expiry_seconds();
        assert!(first_expiry > 0);

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(watch_issuer_dir(
            dir.clone(),
            Duration::from_millis(20),
            shared.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));
        // A half-written rotation (new certificate, old key) keeps the old issuer.
        let second = GeneratedCa::generate("cluster.local", 365 * DAY, 7 * DAY).expect("second");
        std::fs::write(dir.join(ISSUER_CERT_FILE), &second.issuer.cert_pem).expect("write");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            shared.current().certificate(),
            first.load_issuer().expect("loads").certificate()
        );

        second.write_dir(&dir).expect("rotate");
        let want = second.load_issuer().expect("loads").certificate().clone();
        let mut rotated = false;
        for _ in 0..200 {
            if *shared.current().certificate() == want {
                rotated = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(rotated, "the watcher picked up the new issuer");
        assert!(metrics.issuer_expiry_seconds() < first_expiry);
        let _ = stop_tx.send(());
        watcher.await.expect("watcher stops");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
