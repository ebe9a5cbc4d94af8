//! Mutual TLS between proxies: TLS 1.3 only, certificates carrying SPIFFE identities, and an
//! ALPN value that marks mesh traffic.
//!
//! The client side verifies that the server's certificate chains to our trust anchors and
//! names exactly the identity discovery promised for that endpoint (not a DNS name, which our
//! certificates don't carry). The server side requires a client certificate chaining to the
//! same anchors and reports the client's identity for policy and metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

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
        let verifier = SpiffeServerVerifier::new(
            self.identity.roots(),
            expected_identity,
            self.provider.clone(),
        );
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

use mesh_spiffe::SpiffeServerVerifier;
pub use mesh_spiffe::{server_name, spiffe_id};

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
