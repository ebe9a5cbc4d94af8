//! The `Identity` gRPC service: authenticate the caller's token, check it proves the identity
//! asked for, sign the CSR. Each refusal has its own gRPC status and metric result, and its
//! message says what was wrong without echoing the token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::identity::identity_server::{Identity, IdentityServer};
use mesh_proto::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use super::auth::{AuthError, TokenAuthenticator};
use super::ca::SharedIssuer;
use super::certify::{CertifyError, DEFAULT_LEAF_LIFETIME, SignedLeaf};
use super::metrics::{CertifyResult, IdentityMetrics};
use super::spiffe::SpiffeId;

/// What the service needs besides its issuer and authenticator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The only trust domain the CA signs for.
    pub trust_domain: String,
    /// How long leaves are valid (capped by the issuer's own expiry).
    pub leaf_lifetime: Duration,
}

impl IdentityConfig {
    /// The config for `trust_domain` with the default 24 h leaf lifetime.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            leaf_lifetime: DEFAULT_LEAF_LIFETIME,
        }
    }
}

/// The identity service: the controller's CA behind `Identity.Certify`. Cheap to clone.
#[derive(Clone)]
pub struct IdentityService {
    config: Arc<IdentityConfig>,
    issuer: SharedIssuer,
    authenticator: Arc<dyn TokenAuthenticator>,
    metrics: IdentityMetrics,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("config", &self.config)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// Why a `Certify` call was refused.
#[derive(Debug)]
enum Refusal {
    Unauthenticated(String),
    Denied(String),
    Invalid(String),
    Unavailable(String),
    Internal(String),
}

impl Refusal {
    fn result(&self) -> CertifyResult {
        match self {
            Refusal::Unauthenticated(_) => CertifyResult::Unauthenticated,
            Refusal::Denied(_) => CertifyResult::Denied,
            Refusal::Invalid(_) => CertifyResult::Invalid,
            Refusal::Unavailable(_) | Refusal::Internal(_) => CertifyResult::Error,
        }
    }

    fn into_status(self) -> Status {
        match self {
            Refusal::Unauthenticated(m) => Status::unauthenticated(m),
            Refusal::Denied(m) => Status::permission_denied(m),
            Refusal::Invalid(m) => Status::invalid_argument(m),
            Refusal::Unavailable(m) => Status::unavailable(m),
            Refusal::Internal(m) => Status::internal(m),
        }
    }
}

impl IdentityService {
    /// A service signing with `issuer` for callers `authenticator` accepts.
    pub fn new(
        config: IdentityConfig,
        issuer: SharedIssuer,
        authenticator: Arc<dyn TokenAuthenticator>,
        metrics: IdentityMetrics,
    ) -> Self {
        Self {
            config: Arc::new(config),
            issuer,
            authenticator,
            metrics,
        }
    }

    /// The tonic server to add to a `tonic::transport::Server`.
    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    async fn certify_request(
        &self,
        request: &CertifyRequest,
    ) -> Result<(SpiffeId, SignedLeaf), Refusal> {
        let token = request.token.trim_ascii();
        if token.is_empty() {
            return Err(Refusal::Unauthenticated(
                "no token: send the pod's ServiceAccount token".to_owned(),
            ));
        }
        let proven = self
            .authenticator
            .authenticate(token)
            .await
            .map_err(|e| match e {
                AuthError::Rejected(reason) => Refusal::Unauthenticated(reason),
                AuthError::Unavailable(reason) => Refusal::Unavailable(reason),
            })?;
        let identity: SpiffeId = request
            .identity
            .parse()
            .map_err(|e| Refusal::Invalid(format!("identity: {e}")))?;
        let proven_id = SpiffeId::new(&self.config.trust_domain, proven.clone())
            .map(|id| id.to_string())
            .unwrap_or_else(|_| format!("ServiceAccount {proven}"));
        if identity.trust_domain() != self.config.trust_domain {
            return Err(Refusal::Denied(format!(
                "identity {identity} is outside the trust domain {:?}; the token proves {proven_id}",
                self.config.trust_domain
            )));
        }
        if *identity.service_account() != proven {
            return Err(Refusal::Denied(format!(
                "the token proves {proven_id}, not the identity asked for, {identity}"
            )));
        }
        let issuer = self.issuer.current();
        let signed = issuer
            .certify(
                &identity,
                &request.certificate_signing_request,
                self.config.leaf_lifetime,
            )
            .map_err(|e| match e {
                e if e.is_caller_error() => Refusal::Invalid(e.to_string()),
                e @ CertifyError::IssuerExpired { .. } => Refusal::Unavailable(e.to_string()),
                e => Refusal::Internal(e.to_string()),
            })?;
        Ok((identity, signed))
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer: Option<SocketAddr> = request.remote_addr();
        let request = request.into_inner();
        match self.certify_request(&request).await {
            Ok((identity, signed)) => {
                self.metrics.count(CertifyResult::Ok);
                let valid_until = prost_types::Timestamp::from(signed.valid_until);
                tracing::info!(%identity, ?peer, %valid_until, "certified");
                Ok(Response::new(CertifyResponse {
                    leaf_certificate: signed.leaf.to_vec(),
                    intermediate_certificates: signed
                        .intermediates
                        .iter()
                        .map(|der| der.to_vec())
                        .collect(),
                    valid_until: Some(valid_until),
                }))
            }
            Err(refusal) => {
                let result = refusal.result();
                self.metrics.count(result);
                match &refusal {
                    Refusal::Unavailable(reason) | Refusal::Internal(reason) => tracing::warn!(
                        identity = %request.identity, ?peer, %reason, "certify failed"
                    ),
                    Refusal::Unauthenticated(reason)
                    | Refusal::Denied(reason)
                    | Refusal::Invalid(reason) => tracing::info!(
                        identity = %request.identity,
                        ?peer,
                        result = result.as_str(),
                        %reason,
                        "certify refused"
                    ),
                }
                Err(refusal.into_status())
            }
        }
    }
}
