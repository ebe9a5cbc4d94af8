//! Mutual TLS between proxies: TLS 1.3 only, certificates carrying SPIFFE identities, and an
//! ALPN value that marks mesh traffic.
//!
//! The client side verifies that the server's certificate chains to our trust anchors and
//! names exactly the identity discovery promised for that endpoint (not a DNS name, which our
//! certificates don't carry). The server side requires a client certificate chaining to the
//! same anchors and reports the client's identity for policy and metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::identity::Identity;

/// The ALPN protocol a client proxy offers: it tells the server proxy the connection is mesh
/// traffic carrying a transport header, not an application's own TLS.
pub const ALPN_MESH: &[u8] = b"mesh.dev/proxy/1";

/// A TLS setup problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The trust anchors are unusable.
    #[error("trust anchors: {0}")]
    Anchors(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The proxy's TLS configurations, built once; client configurations are cached per expected
/// server identity.
#[derive(Debug)]
pub struct TlsContext {
    identity: Arc<Identity>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

/// The ring crypto provider, shared by every configuration.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsContext {
    /// TLS for a proxy whose certificates come from `identity`.
    pub fn new(identity: Arc<Identity>) -> Result<Self, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(identity.roots(), provider.clone())
                .build()
                .map_err(|error| TlsError::Anchors(error.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(identity.clone());
        server.alpn_protocols = vec![ALPN_MESH.to_vec()];
        Ok(Self {
            identity,
            provider,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The local identity.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// The configuration for terminating mesh TLS on the inbound side.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The configuration for connecting to a peer that must prove `expected_identity`.
    pub fn client_config(&self, expected_identity: &str) -> Result<Arc<ClientConfig>, TlsError> {
        let mut clients = match self.clients.lock() {
            Ok(clients) => clients,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(config) = clients.get(expected_identity) {
            return Ok(config.clone());
        }
        let verifier = SpiffeServerVerifier {
            roots: self.identity.roots(),
            expected: expected_identity.to_string(),
            provider: self.provider.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.identity.clone());
        config.alpn_protocols = vec![ALPN_MESH.to_vec()];
        let config = Arc::new(config);
        clients.insert(expected_identity.to_string(), config.clone());
        Ok(config)
    }
}

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
        .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("a valid DNS name"))
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

/// Verifies that a server certificate chains to the anchors and names exactly one identity.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_dns_names_derived_from_the_identity() {
        assert_eq!(
            server_name("spiffe://cluster.local/ns/shop/sa/books").to_str(),
            "books.shop.serviceaccount.identity.cluster.local"
        );
        assert_eq!(server_name("not an id").to_str(), "mesh.invalid");
    }
}
