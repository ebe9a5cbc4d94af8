//! The identity report: what a proxy's admin server answers on `GET /identity` and what
//! `meshctl identity` reads. Certificates are described here, once, from their DER; the
//! report holds public certificates only, never a key.

use std::fmt;

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Whether a proxy holds a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityState {
    /// The proxy runs without identity (no `MESH_PROXY_IDENTITY`): plaintext only.
    Disabled,
    /// The proxy has an identity but no certificate yet.
    Pending,
    /// The proxy holds a certificate.
    Certified,
}

impl fmt::Display for IdentityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disabled => "disabled",
            Self::Pending => "pending",
            Self::Certified => "certified",
        })
    }
}

/// A proxy's identity as its admin server reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityReport {
    /// Whether the proxy holds a certificate.
    pub state: IdentityState,
    /// The SPIFFE ID the proxy is configured with (`None` when disabled).
    pub identity: Option<String>,
    /// The certificate chain the proxy presents, leaf first (empty until certified).
    pub chain: Vec<CertificateReport>,
    /// The trust anchors the proxy verifies peers with.
    pub trust_anchors: Vec<CertificateReport>,
    /// When the current certificate was installed.
    pub last_renewal: Option<Timestamp>,
    /// When the proxy will next ask for a certificate (renewal or retry).
    pub next_renewal: Option<Timestamp>,
    /// Why the last certificate request failed, if it did.
    pub last_error: Option<String>,
}

impl IdentityReport {
    /// The report of a proxy that runs without identity.
    pub fn disabled() -> Self {
        Self {
            state: IdentityState::Disabled,
            identity: None,
            chain: Vec::new(),
            trust_anchors: Vec::new(),
            last_renewal: None,
            next_renewal: None,
            last_error: None,
        }
    }
}

/// One certificate, described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateReport {
    /// The subject's distinguished name (empty for SPIFFE leaf certificates, which have none).
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// The serial number, hex bytes separated by colons.
    pub serial: String,
    /// The SPIFFE ID among its URI SANs, if any.
    pub spiffe_id: Option<String>,
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
    /// The certificate itself, PEM.
    pub pem: String,
}

/// Where a certificate stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Its validity starts later.
    NotYetValid,
    /// Within its validity.
    Valid,
    /// Its validity ended.
    Expired,
}

impl CertificateReport {
    /// Describes a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, ReportError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|error| ReportError(error.to_string()))?;
        let spiffe_id = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|name| match name {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                        Some((*uri).to_owned())
                    }
                    _ => None,
                })
            });
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            spiffe_id,
            not_before: Timestamp(cert.validity().not_before.timestamp()),
            not_after: Timestamp(cert.validity().not_after.timestamp()),
            pem: certificate_pem(der),
        })
    }

    /// Where it stands at `now` (seconds since the Unix epoch).
    pub fn validity_at(&self, now: i64) -> Validity {
        if now < self.not_before.0 {
            Validity::NotYetValid
        } else if now > self.not_after.0 {
            Validity::Expired
        } else {
            Validity::Valid
        }
    }
}

/// A certificate that cannot be described.
#[derive(Debug, thiserror::Error)]
#[error("not an X.509 certificate: {0}")]
pub struct ReportError(String);

/// A moment, to the second: seconds since the Unix epoch, written as RFC 3339 UTC
/// (`2026-12-01T18:00:00Z`) so the JSON reads without a converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Now, to the second.
    pub fn now() -> Self {
        Self::from(std::time::SystemTime::now())
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(time: std::time::SystemTime) -> Self {
        let seconds = match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
        };
        Self(seconds)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let formatted = time::OffsetDateTime::from_unix_timestamp(self.0)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
        match formatted {
            Some(text) => f.write_str(&text),
            // Out of the calendar's range: still say something true.
            None => write!(f, "@{}", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
            .map(|t| Self(t.unix_timestamp()))
            .map_err(|error| {
                serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {error}"))
            })
    }
}

/// A DER certificate as one PEM block with LF line endings.
pub fn certificate_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_both_ways() {
        let time = Timestamp(1_796_212_800);
        let json = serde_json::to_string(&time).expect("serializes");
        assert_eq!(json, "\"2026-12-02T12:00:00Z\"");
        assert_eq!(
            serde_json::from_str::<Timestamp>(&json).expect("parses"),
            time
        );
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }

    #[test]
    fn a_certificate_is_described_without_its_key() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/web"
                .try_into()
                .expect("URI"),
        )];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "web");
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x0a, 0xbc]));
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 1, 2);
        let cert = params.self_signed(&key).expect("cert");
        let report = CertificateReport::from_der(cert.der()).expect("described");
        assert_eq!(report.subject, "CN=web");
        assert_eq!(report.issuer, "CN=web");
        assert_eq!(report.serial, "0a:bc");
        assert_eq!(
            report.spiffe_id.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(report.not_before.to_string(), "2026-01-01T00:00:00Z");
        assert_eq!(report.not_after.to_string(), "2026-01-02T00:00:00Z");
        assert_eq!(report.pem, cert.pem());
        assert!(!report.pem.contains("PRIVATE KEY"));
        let start = report.not_before.0;
        assert_eq!(report.validity_at(start - 1), Validity::NotYetValid);
        assert_eq!(report.validity_at(start + 60), Validity::Valid);
        assert_eq!(report.validity_at(start + 2 * 86_400), Validity::Expired);
        assert!(CertificateReport::from_der(b"not DER").is_err());
    }
}
