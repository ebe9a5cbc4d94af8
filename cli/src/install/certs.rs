//! The install's key material: the identity trust anchor and issuer, and the injector's
//! serving certificate with the CA the API server trusts it by. Given in files, kept from the
//! cluster on a re-install, or generated here.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use mesh_controller::identity::ca::{GeneratedCa, Issuer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use x509_parser::prelude::{FromDer, X509Certificate};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// A generated trust anchor lasts ten years: rotating it is a planned operation.
pub const ANCHOR_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// A generated issuer lasts a year.
pub const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// The webhook's CA and serving certificate last a year and are renewed by a re-install once
/// fewer than [`RENEW_BEFORE`] remain.
pub const WEBHOOK_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Key material with less than this left is replaced by a re-install and is a failed check.
pub const RENEW_BEFORE: Duration = Duration::from_secs(60 * 24 * 60 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating {what}: {reason}")]
    Generate { what: &'static str, reason: String },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

fn generate_error(what: &'static str) -> impl Fn(rcgen::Error) -> CertError {
    move |e| CertError::Generate {
        what,
        reason: e.to_string(),
    }
}

/// The identity material of an install (all PEM).
#[derive(Debug, Clone)]
pub struct IdentityPem {
    pub trust_anchors: String,
    pub issuer_crt: String,
    pub issuer_key: String,
}

impl IdentityPem {
    /// A new trust anchor and an issuer it signed.
    pub fn generate(trust_domain: &str) -> Result<Self, CertError> {
        let ca =
            GeneratedCa::generate(trust_domain, ANCHOR_LIFETIME, ISSUER_LIFETIME).map_err(|e| {
                CertError::Generate {
                    what: "the identity trust anchor and issuer",
                    reason: e.to_string(),
                }
            })?;
        Ok(Self {
            trust_anchors: ca.trust_anchor.cert_pem,
            issuer_crt: ca.issuer.cert_pem,
            issuer_key: ca.issuer.key_pem,
        })
    }

    /// Checks what the controller will check when it loads it: PEM, CA, validity, the chain
    /// to an anchor, and the key matching the certificate. `source` names where it came from.
    pub fn validate(&self, source: &str) -> Result<Issuer, CertError> {
        Issuer::from_pem(&self.issuer_crt, &self.issuer_key, &self.trust_anchors).map_err(|e| {
            CertError::Invalid {
                what: format!("the identity issuer ({source})"),
                reason: e.to_string(),
            }
        })
    }
}

/// The injector's serving certificate and the CA bundle of the webhook configuration (PEM).
#[derive(Debug, Clone)]
pub struct WebhookPem {
    pub ca_bundle: String,
    pub crt: String,
    pub key: String,
}

impl WebhookPem {
    /// A new CA and a serving certificate it signed for the injector's Service names, plus
    /// the host of `url` when the API server calls an injector outside the cluster.
    pub fn generate(namespace: &str, cluster_domain: &str, url: &str) -> Result<Self, CertError> {
        let ca_key = KeyPair::generate().map_err(generate_error("the webhook CA key"))?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mesh-injector-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut ca_params, WEBHOOK_LIFETIME);
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(generate_error("the webhook CA"))?;
        let ca = rcgen::Issuer::new(ca_params, ca_key);

        let service = format!("mesh-injector.{namespace}.svc");
        let mut names = vec![service.clone(), format!("{service}.{cluster_domain}")];
        if let Some(host) = url_host(url) {
            names.push(host);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, service);
        params.subject_alt_names = names
            .into_iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name.try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(generate_error("the webhook's names"))?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, WEBHOOK_LIFETIME);
        let key = KeyPair::generate().map_err(generate_error("the webhook key"))?;
        let cert = params
            .signed_by(&key, &ca)
            .map_err(generate_error("the webhook certificate"))?;
        Ok(Self {
            ca_bundle: ca_cert.pem(),
            crt: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    // An hour of slack for clocks behind ours.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + lifetime).into();
}

/// The host of an `https://host[:port]/path` URL, without brackets.
fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// One certificate of a PEM bundle, reduced to what checks need.
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub subject: String,
    pub not_after: SystemTime,
    pub der: Vec<u8>,
}

impl CertSummary {
    /// Time left until it expires (zero when it has).
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// Whether `self` is signed by `signer`'s key.
    pub fn is_signed_by(&self, signer: &CertSummary) -> bool {
        let (Ok((_, cert)), Ok((_, signer))) = (
            X509Certificate::from_der(&self.der),
            X509Certificate::from_der(&signer.der),
        ) else {
            return false;
        };
        cert.issuer().as_raw() == signer.subject().as_raw()
            && cert.verify_signature(Some(signer.public_key())).is_ok()
    }
}

/// Every certificate of a PEM bundle, in order.
pub fn parse_bundle(pem: &str, what: &str) -> Result<Vec<CertSummary>, CertError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let invalid = |reason: String| CertError::Invalid {
        what: what.to_owned(),
        reason,
    };
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad PEM: {e}")))?;
    if ders.is_empty() {
        return Err(invalid("no CERTIFICATE block".to_owned()));
    }
    ders.iter()
        .map(|der| {
            let (_, cert) = X509Certificate::from_der(der)
                .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
            let seconds = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
            Ok(CertSummary {
                subject: cert.subject().to_string(),
                not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
                der: der.to_vec(),
            })
        })
        .collect()
}

/// "in 364 days" / "2 days ago", for check lines.
pub fn describe_expiry(cert: &CertSummary) -> String {
    match cert.not_after.duration_since(SystemTime::now()) {
        Ok(left) => format!("expires in {} days", left.as_secs() / DAY.as_secs()),
        Err(past) => format!(
            "expired {} days ago",
            past.duration().as_secs() / DAY.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_validates_and_lasts() {
        let identity = IdentityPem::generate("cluster.local").expect("generated");
        identity.validate("generated").expect("valid");
        let anchor = &parse_bundle(&identity.trust_anchors, "anchors").expect("parses")[0];
        assert!(anchor.remaining() > RENEW_BEFORE);
        let issuer = &parse_bundle(&identity.issuer_crt, "issuer").expect("parses")[0];
        assert!(issuer.is_signed_by(anchor));
    }

    #[test]
    fn an_issuer_of_another_anchor_is_refused_naming_it() {
        let one = IdentityPem::generate("cluster.local").expect("generated");
        let other = IdentityPem::generate("cluster.local").expect("generated");
        let mixed = IdentityPem {
            trust_anchors: one.trust_anchors,
            ..other
        };
        let error = mixed
            .validate("--identity-issuer-certificate-file")
            .expect_err("refused");
        assert!(
            error.to_string().contains("not signed by any trust anchor"),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("--identity-issuer-certificate-file")
        );
    }

    #[test]
    fn the_webhook_certificate_chains_to_its_bundle_and_names_the_url_host() {
        let webhook = WebhookPem::generate(
            "mesh-system",
            "cluster.local",
            "https://127.0.0.1:9443/inject",
        )
        .expect("generated");
        let ca = &parse_bundle(&webhook.ca_bundle, "ca").expect("parses")[0];
        let leaf = &parse_bundle(&webhook.crt, "crt").expect("parses")[0];
        assert!(leaf.is_signed_by(ca));
        assert!(!ca.is_signed_by(leaf));
        let (_, cert) = X509Certificate::from_der(&leaf.der).expect("x509");
        let sans = format!(
            "{:?}",
            cert.subject_alternative_name().expect("ok").expect("some")
        );
        assert!(sans.contains("mesh-injector.mesh-system.svc"), "{sans}");
        assert!(sans.contains("[127, 0, 0, 1]"), "{sans}");
    }

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("https://127.0.0.1:8443/inject").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(
            url_host("https://[::1]:8443/inject").as_deref(),
            Some("::1")
        );
        assert_eq!(
            url_host("https://injector.example/inject").as_deref(),
            Some("injector.example")
        );
        assert_eq!(url_host(""), None);
    }
}
