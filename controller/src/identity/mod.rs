//! The identity CA: signs each proxy's short-lived leaf certificate for the SPIFFE identity of
//! its pod's ServiceAccount, once the proxy's token has proved that identity.
//!
//! It owns, one module each:
//! - [`spiffe`]: [`SpiffeId`], the only name a leaf carries;
//! - [`ca`]: the key material ([`TrustAnchors`], [`Issuer`]) loaded and validated from
//!   cert-manager's file layout, the generators `meshctl install`, the demo and tests use, and
//!   [`SharedIssuer`] / [`watch_issuer_dir`] to rotate the issuer without a restart;
//! - [`certify`]: [`Issuer::certify`], CSR in, [`SignedLeaf`] out;
//! - [`auth`]: [`TokenAuthenticator`] with [`TokenReviewAuthenticator`] (Kubernetes) and
//!   [`StaticTokens`] (the file backend's `mesh.dev/identity-token` annotations);
//! - [`service`]: [`IdentityService`], the `Identity` gRPC service over all of the above;
//! - [`metrics`]: [`IdentityMetrics`], registered into the controller's registry.
//!
//! Private keys never leave this module except as the PEM the generators return, and neither
//! keys nor tokens are ever logged or printed by `Debug`.
//!
//! Wiring (in the controller's `run`):
//! ```ignore
//! let metrics = IdentityMetrics::new();
//! metrics.register(&mut registry);
//! let issuer = SharedIssuer::new(Issuer::from_dir(&dir)?, &metrics);
//! tokio::spawn(watch_issuer_dir(dir, Duration::from_secs(10), issuer.clone(), stopped));
//! let authenticator: Arc<dyn TokenAuthenticator> = Arc::new(TokenReviewAuthenticator::new(client));
//! let identity = IdentityService::new(IdentityConfig::new(trust_domain), issuer, authenticator, metrics);
//! server.add_service(identity.into_server());
//! ```

pub mod auth;
pub mod ca;
pub mod certify;
pub mod metrics;
pub mod service;
pub mod spiffe;

pub use auth::{
    AuthError, StaticTokens, TOKEN_ANNOTATION, TOKEN_AUDIENCE, TokenAuthenticator,
    TokenReviewAuthenticator,
};
pub use ca::{
    GenerateError, GeneratedCa, Issuer, LoadError, PemCertificate, SharedIssuer, TrustAnchors,
    Validity, generate_issuer, generate_trust_anchor, watch_issuer_dir, write_dir,
};
pub use certify::{CertifyError, DEFAULT_LEAF_LIFETIME, SignedLeaf};
pub use metrics::{CertifyResult, IdentityMetrics};
pub use service::{IdentityConfig, IdentityService};
pub use spiffe::{ServiceAccountName, SpiffeId, SpiffeIdError};
