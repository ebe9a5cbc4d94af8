//! The controller's own identity for tapping proxies: it signs itself a leaf certificate with
//! its CA (`spiffe://<trust-domain>/ns/mesh-system/sa/mesh-controller` by default; what the
//! proxies' `MESH_PROXY_TAP_IDENTITY` names), presents it as the TLS client, and verifies that
//! each proxy proves exactly the SPIFFE identity the index gives its pod.
//!
//! The key never leaves memory. The leaf is reissued when less than half of its life is left
//! or when the issuer was rotated, so a long-running controller keeps a valid one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::identity::{Issuer, SharedIssuer, SpiffeId};

/// The namespace and ServiceAccount of the controller's identity, unless configured.
pub const CONTROLLER_NAMESPACE: &str = "mesh-system";
/// See [`CONTROLLER_NAMESPACE`].
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "mesh-controller";

/// Why the controller has no usable client TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TapTlsError {
    /// A key or CSR could not be made.
    #[error("making the controller's key: {0}")]
    Key(#[from] rcgen::Error),
    /// The CA refused to sign.
    #[error("signing the controller's certificate: {0}")]
    Certify(#[from] crate::identity::CertifyError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A leaf the controller signed for itself, with the issuer that signed it.
struct Leaf {
    issuer: Arc<Issuer>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    issued: SystemTime,
    valid_until: SystemTime,
}

impl Leaf {
    fn fresh(&self, issuer: &Arc<Issuer>, now: SystemTime) -> bool {
        let life = self
            .valid_until
            .duration_since(self.issued)
            .unwrap_or_default();
        let renew_at = self.issued + life / 2;
        Arc::ptr_eq(&self.issuer, issuer) && now < renew_at
    }
}

/// The controller's client identity over its CA.
pub struct ControllerIdentity {
    identity: SpiffeId,
    issuer: SharedIssuer,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    leaf: Mutex<Option<Arc<Leaf>>>,
}

impl std::fmt::Debug for ControllerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerIdentity")
            .field("identity", &self.identity.to_string())
            .finish()
    }
}

impl ControllerIdentity {
    /// `identity`, signed by `issuer` for `lifetime` at a time.
    pub fn new(identity: SpiffeId, issuer: SharedIssuer, lifetime: Duration) -> Self {
        Self {
            identity,
            issuer,
            lifetime,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            leaf: Mutex::new(None),
        }
    }

    /// The SPIFFE ID the controller presents.
    pub fn identity(&self) -> String {
        self.identity.to_string()
    }

    fn leaf(&self) -> Result<Arc<Leaf>, TapTlsError> {
        let issuer = self.issuer.current();
        let now = SystemTime::now();
        let mut slot = self
            .leaf
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(leaf) = slot.as_ref()
            && leaf.fresh(&issuer, now)
        {
            return Ok(leaf.clone());
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
        let signed = issuer.certify(&self.identity, csr.der(), self.lifetime)?;
        let chain = std::iter::once(signed.leaf)
            .chain(signed.intermediates)
            .collect();
        let leaf = Arc::new(Leaf {
            issuer,
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            issued: now,
            valid_until: signed.valid_until,
        });
        tracing::debug!(identity = %self.identity, "signed the controller's tap certificate");
        *slot = Some(leaf.clone());
        Ok(leaf)
    }

    /// A TLS 1.3 client configuration presenting the controller's identity and accepting
    /// only a server that proves `expected` (a SPIFFE ID) under the CA's trust anchors.
    pub fn client_config(&self, expected: &str) -> Result<Arc<ClientConfig>, TapTlsError> {
        let leaf = self.leaf()?;
        let mut roots = RootCertStore::empty();
        // An anchor rustls cannot use is skipped: the others still verify.
        let _ = roots
            .add_parsable_certificates(leaf.issuer.trust_anchors().certificates().iter().cloned());
        let verifier = SpiffeServerVerifier::new(Arc::new(roots), expected, self.provider.clone());
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(
                leaf.chain.clone(),
                PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
            )?;
        // No ALPN: the admin port's TLS offers only the mesh's own value, and a client
        // offering none is served (the admin port then detects HTTP/2 by its preface).
        Ok(Arc::new(config))
    }
}

use mesh_spiffe::SpiffeServerVerifier;
pub use mesh_spiffe::server_name;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{GeneratedCa, IdentityMetrics, ServiceAccountName};
    use mesh_spiffe::spiffe_id;

    #[test]
    fn the_controller_signs_itself_a_leaf_for_its_identity_and_reuses_it() {
        let ca = GeneratedCa::generate(
            "cluster.local",
            Duration::from_secs(86_400 * 10),
            Duration::from_secs(86_400 * 2),
        )
        .expect("generate a CA");
        let issuer = SharedIssuer::new(
            ca.load_issuer().expect("the CA loads"),
            &IdentityMetrics::new(),
        );
        let id = SpiffeId::new(
            "cluster.local",
            ServiceAccountName::new(CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT),
        )
        .expect("a valid identity");
        let controller = ControllerIdentity::new(id, issuer, Duration::from_secs(3600));
        let first = controller.leaf().expect("signs");
        assert_eq!(
            spiffe_id(&first.chain[0]).as_deref(),
            Some("spiffe://cluster.local/ns/mesh-system/sa/mesh-controller")
        );
        let second = controller.leaf().expect("reuses");
        assert!(Arc::ptr_eq(&first, &second), "a fresh leaf is reused");
        controller
            .client_config("spiffe://cluster.local/ns/demo/sa/web")
            .expect("a client configuration");
    }
}
