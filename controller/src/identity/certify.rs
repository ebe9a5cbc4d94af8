//! Signing: turns a proxy's CSR into a short-lived leaf certificate for one SPIFFE identity.
//!
//! Only the CSR's public key (and its proof of possession, the self-signature) is used; its
//! subject, SANs and extensions are ignored, so a caller cannot ask for anything but the
//! identity its token proved. The leaf carries exactly one name, the SPIFFE ID as a URI SAN,
//! and can serve both ends of a mesh connection (serverAuth + clientAuth).

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use super::ca::{CLOCK_SKEW, Issuer};
use super::spiffe::SpiffeId;

/// The leaf lifetime when none is configured.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// OID of an elliptic-curve public key (RFC 5480).
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// OID of the P-256 curve.
const OID_CURVE_P256: &str = "1.2.840.10045.3.1.7";
/// OID of the P-384 curve.
const OID_CURVE_P384: &str = "1.3.132.0.34";
/// OID of an Ed25519 public key (RFC 8410).
const OID_ED25519: &str = "1.3.101.112";

/// A signed leaf certificate and what a proxy serves with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedLeaf {
    /// The leaf certificate, DER.
    pub leaf: CertificateDer<'static>,
    /// The chain from the leaf's issuer up to (not including) the trust anchor, nearest first.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// When the leaf stops being valid (its notAfter).
    pub valid_until: SystemTime,
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// The bytes are not a DER PKCS#10 certificate signing request.
    #[error("the CSR is not a DER-encoded PKCS#10 certificate signing request: {0}")]
    MalformedCsr(String),
    /// The CSR's self-signature does not verify with its own public key.
    #[error("the CSR's signature does not verify with its public key")]
    BadCsrSignature,
    /// The CSR's key is of a kind proxies must not use.
    #[error("the CSR's key is unsupported ({0}); use ECDSA P-256")]
    UnsupportedKey(String),
    /// The issuer certificate has expired; nothing can be signed until it is replaced.
    #[error("the issuer certificate {subject:?} has expired")]
    IssuerExpired {
        /// The issuer's subject.
        subject: String,
    },
    /// The identity cannot be written as a URI SAN.
    #[error("identity {identity} cannot be put in a certificate: {reason}")]
    Identity {
        /// The identity.
        identity: String,
        /// Why.
        reason: String,
    },
    /// Signing itself failed.
    #[error("signing the leaf certificate failed: {0}")]
    Signing(#[source] rcgen::Error),
}

impl CertifyError {
    /// Whether the caller's request is at fault (as opposed to the CA).
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            Self::MalformedCsr(_) | Self::BadCsrSignature | Self::UnsupportedKey(_)
        )
    }
}

/// The public key of a verified CSR, in the form rcgen writes into a certificate.
struct CsrPublicKey {
    /// The subjectPublicKey bits (for EC keys, the uncompressed point).
    raw: Vec<u8>,
    /// The algorithm whose SubjectPublicKeyInfo identifiers describe the key.
    algorithm: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

/// Parses a DER CSR, checks its self-signature and returns its public key. Every extension is
/// ignored.
fn verified_public_key(csr_der: &[u8]) -> Result<CsrPublicKey, CertifyError> {
    let csr = match X509CertificationRequest::from_der(csr_der) {
        Ok(([], csr)) => csr,
        Ok(_) => {
            return Err(CertifyError::MalformedCsr(
                "trailing bytes after the request".to_owned(),
            ));
        }
        Err(e) => return Err(CertifyError::MalformedCsr(e.to_string())),
    };
    let spki = &csr.certification_request_info.subject_pki;
    let key_oid = spki.algorithm.algorithm.to_id_string();
    let algorithm = match key_oid.as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                OID_CURVE_P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                OID_CURVE_P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                _ => {
                    return Err(CertifyError::UnsupportedKey(format!(
                        "EC key on curve {curve:?}"
                    )));
                }
            }
        }
        OID_ED25519 => &rcgen::PKCS_ED25519,
        other => {
            return Err(CertifyError::UnsupportedKey(format!(
                "key algorithm {other}"
            )));
        }
    };
    // The signature proves the caller holds the private key of the public key it sent.
    csr.verify_signature()
        .map_err(|_| CertifyError::BadCsrSignature)?;
    Ok(CsrPublicKey {
        raw: spki.subject_public_key.data.to_vec(),
        algorithm,
    })
}

/// A random, positive, 127-bit serial number (RFC 5280 asks for at most 20 octets, unique per
/// issuer).
pub(super) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Clear the sign bit and keep the first octet non-zero so the encoding is 16 octets.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl Issuer {
    /// Signs a leaf for `identity` over the public key of `csr_der` (a verified DER PKCS#10
    /// request), valid from [`CLOCK_SKEW`] ago for `lifetime`, but never past the issuer's own
    /// expiry.
    pub fn certify(
        &self,
        identity: &SpiffeId,
        csr_der: &[u8],
        lifetime: Duration,
    ) -> Result<SignedLeaf, CertifyError> {
        let public_key = verified_public_key(csr_der)?;
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(CertifyError::IssuerExpired {
                subject: self.subject.clone(),
            });
        }
        let not_after = now
            .checked_add(lifetime)
            .unwrap_or(self.not_after)
            .min(self.not_after);
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);

        let uri = identity.to_string();
        let san = uri
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| CertifyError::Identity {
                identity: uri.clone(),
                reason: e.to_string(),
            })?;
        let mut params = CertificateParams::default();
        // An empty subject; the SAN extension is then critical, as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(san)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // Certificates carry whole seconds; truncate so `valid_until` is exactly notAfter.
        params.not_before = whole_seconds(not_before);
        params.not_after = whole_seconds(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;

        let leaf = params
            .signed_by(&public_key, &self.signer)
            .map_err(CertifyError::Signing)?;
        Ok(SignedLeaf {
            leaf: leaf.der().clone(),
            intermediates: self.intermediates.clone(),
            valid_until: SystemTime::from(params.not_after),
        })
    }
}

fn whole_seconds(at: SystemTime) -> OffsetDateTime {
    let at = OffsetDateTime::from(at);
    at.replace_nanosecond(0).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use rcgen::KeyPair;
    use x509_parser::prelude::{GeneralName, X509Certificate};

    use super::*;
    use crate::identity::ca::GeneratedCa;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn csr_for(key: &KeyPair, san: &str) -> Vec<u8> {
        let mut params =
            CertificateParams::new(vec![san.to_owned()]).expect("a DNS name is a valid SAN");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        params
            .serialize_request(key)
            .expect("rcgen serialises a CSR")
            .der()
            .to_vec()
    }

    fn identity() -> SpiffeId {
        "spiffe://cluster.local/ns/shop/sa/web"
            .parse()
            .expect("a valid SPIFFE ID")
    }

    #[test]
    fn leaf_carries_only_the_identity_and_mesh_usages() {
        let ca = GeneratedCa::generate("cluster.local", 10 * DAY, 2 * DAY).expect("generate CA");
        let issuer = ca.load_issuer().expect("generated CA loads");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let before = SystemTime::now();
        let signed = issuer
            .certify(&identity(), &csr_for(&key, "evil.example.com"), DAY)
            .expect("signs");

        let (_, leaf) = X509Certificate::from_der(&signed.leaf).expect("leaf parses");
        assert!(!leaf.is_ca());
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let san = leaf
            .subject_alternative_name()
            .expect("SAN parses")
            .expect("SAN present");
        assert!(san.critical, "an empty subject makes the SAN critical");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
        );
        let eku = leaf
            .extended_key_usage()
            .expect("EKU parses")
            .expect("EKU present");
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!eku.value.code_signing, "requested extensions are ignored");
        let usage = leaf.key_usage().expect("KU parses").expect("KU present");
        assert!(usage.value.digital_signature() && !usage.value.key_cert_sign());
        let (_, issuer_cert) =
            X509Certificate::from_der(issuer.certificate()).expect("issuer parses");
        assert_eq!(leaf.issuer().as_raw(), issuer_cert.subject().as_raw());

        let not_before = crate::identity::ca::unix_time(leaf.validity().not_before.timestamp());
        let not_after = crate::identity::ca::unix_time(leaf.validity().not_after.timestamp());
        assert_eq!(not_after, signed.valid_until);
        let skew = before.duration_since(not_before).expect("back-dated");
        assert!(skew >= Duration::from_secs(59) && skew <= Duration::from_secs(62));
        let lifetime = not_after.duration_since(before).expect("in the future");
        assert!(
            lifetime > DAY - Duration::from_secs(2) && lifetime <= DAY + Duration::from_secs(2)
        );
        assert_eq!(signed.intermediates, vec![issuer.certificate().clone()]);
    }

    #[test]
    fn leaf_never_outlives_its_issuer() {
        let ca = GeneratedCa::generate("cluster.local", 10 * DAY, Duration::from_secs(3600))
            .expect("generate CA");
        let issuer = ca.load_issuer().expect("loads");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let signed = issuer
            .certify(&identity(), &csr_for(&key, "x"), DAY)
            .expect("signs");
        let issuer_end = issuer
            .not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        let leaf_end = signed
            .valid_until
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        assert_eq!(leaf_end, issuer_end);
    }

    #[test]
    fn malformed_and_forged_csrs_are_refused() {
        let issuer = GeneratedCa::generate("cluster.local", 10 * DAY, DAY)
            .expect("generate CA")
            .load_issuer()
            .expect("loads");
        let id = identity();
        assert!(matches!(
            issuer.certify(&id, b"not a csr", DAY),
            Err(CertifyError::MalformedCsr(_))
        ));
        assert!(matches!(
            issuer.certify(&id, &[], DAY),
            Err(CertifyError::MalformedCsr(_))
        ));

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut csr = csr_for(&key, "x");
        let last = csr.len() - 2;
        csr[last] ^= 0x01; // inside the signature
        let error = issuer.certify(&id, &csr, DAY).expect_err("forged");
        assert!(matches!(error, CertifyError::BadCsrSignature), "{error:?}");
        assert!(error.is_caller_error());

        let mut trailing = csr_for(&key, "x");
        trailing.push(0);
        assert!(matches!(
            issuer.certify(&id, &trailing, DAY),
            Err(CertifyError::MalformedCsr(_))
        ));
    }

    #[test]
    fn p384_and_ed25519_keys_are_accepted() {
        let issuer = GeneratedCa::generate("cluster.local", 10 * DAY, DAY)
            .expect("generate CA")
            .load_issuer()
            .expect("loads");
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).expect("key");
            let signed = issuer
                .certify(&identity(), &csr_for(&key, "x"), DAY)
                .expect("signs");
            let (_, leaf) = X509Certificate::from_der(&signed.leaf).expect("parses");
            assert_eq!(
                leaf.public_key().raw,
                key.subject_public_key_info().as_slice()
            );
        }
    }
}
