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
//!
//! - this module: [`TrustAnchors`] and [`Issuer`], loaded and validated;
//! - [`generate`]: new anchors and issuers, and writing them in the layout (`meshctl install`,
//!   the local mesh, tests);
//! - [`shared`]: [`SharedIssuer`] and [`watch_issuer_dir`], the issuer replaced while serving.

mod generate;
mod shared;

pub use generate::{
    GenerateError, GeneratedCa, PemCertificate, Validity, generate_issuer, generate_trust_anchor,
    write_dir,
};
pub use shared::{SharedIssuer, watch_issuer_dir};

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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

#[cfg(test)]
mod tests;
