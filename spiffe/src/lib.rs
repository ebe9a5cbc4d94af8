//! `mesh-spiffe`: SPIFFE identities in TLS, shared by the proxy (mTLS between proxies) and
//! the controller (tapping proxies): reading a certificate's SPIFFE ID, the informational
//! server name, and the client-side verifier that accepts exactly one identity under the
//! trust anchors. It must not depend on either program. [`report`] describes certificates for
//! the admin API's `/identity` and `meshctl identity`.

pub mod report;

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The TLS server name sent for a SPIFFE identity. Our certificates carry no DNS names, so
/// it is informational; it must only be a valid DNS name.
pub fn server_name(identity: &str) -> ServerName<'static> {
    let name = identity
        .strip_prefix("spiffe://")
        .and_then(|rest| {
            let mut parts = rest.split('/');
            let domain = parts.next()?;
            let (_, ns, _, sa) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            Some(format!("{sa}.{ns}.serviceaccount.identity.{domain}"))
        })
        .unwrap_or_else(|| "mesh.invalid".to_string());
    ServerName::try_from(name)
        .or_else(|_| ServerName::try_from("mesh.invalid"))
        .unwrap_or(ServerName::IpAddress(
            std::net::IpAddr::from([127, 0, 0, 1]).into(),
        ))
}

/// The SPIFFE ID in a certificate's URI SANs, if any.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some((*uri).to_string())
        }
        _ => None,
    })
}

/// Verifies that a server certificate chains to the anchors and names exactly one identity
/// (not a DNS name, which mesh certificates don't carry). TLS 1.3 only.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// Accepts a server proving `expected` (a SPIFFE ID) under `roots`.
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: impl Into<String>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            expected: expected.into(),
            provider,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match spiffe_id(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "server identity is {id}, expected {}",
                self.expected
            ))),
            None => Err(rustls::Error::General(format!(
                "server certificate has no SPIFFE identity, expected {}",
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered; a TLS 1.2 handshake never reaches here.
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
