//! The authorization layer of the inbound HTTP stack: each request is checked against the
//! port's policy, on the HTTPRoute it takes; a refused request gets 403 (gRPC
//! PERMISSION_DENIED) naming the policy, one that no route of the port matches 404.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Layer, Service};
use tracing::{info, warn};

use crate::http::{ProxyBody, ProxyError, is_grpc};
use crate::metrics::{AuthzLabels, Label, Metrics, TargetLabels};
use crate::policy::{Client, NoRoute, PortPolicy, Verdict};

/// Who is calling on a connection, known once its TLS (if any) is done.
#[derive(Clone, Debug)]
pub struct ConnectionClient {
    /// The client's IP.
    pub ip: IpAddr,
    /// Its proven SPIFFE ID.
    pub identity: Option<Arc<str>>,
}

impl ConnectionClient {
    /// The policy's view of the client.
    pub fn as_policy_client(&self) -> Client<'_> {
        Client {
            ip: self.ip,
            identity: self.identity.as_deref(),
        }
    }

    fn describe(&self) -> String {
        match &self.identity {
            Some(id) => id.to_string(),
            None => format!("unauthenticated client {}", self.ip),
        }
    }
}

/// Checks a TCP connection (opaque traffic); false when it must be closed.
pub fn admit_connection(
    policy: &PortPolicy,
    client: &ConnectionClient,
    metrics: &Metrics,
    labels: &TargetLabels,
) -> bool {
    let policy = policy.current();
    match policy.evaluate(&client.as_policy_client(), None) {
        Verdict::Allow(_) => true,
        Verdict::AuditDeny(name) => {
            metrics
                .authz_audits
                .get_or_create(&authz_labels(&name, labels))
                .inc();
            info!(policy = %name, client = %client.describe(), "audit: the policy would refuse this connection");
            true
        }
        Verdict::Deny(name) => {
            metrics
                .tcp_authz_denies
                .get_or_create(&authz_labels(&name, labels))
                .inc();
            warn!(policy = %name, client = %client.describe(), target = %labels.target_addr.0, "connection refused by policy");
            false
        }
    }
}

fn authz_labels(policy: &str, labels: &TargetLabels) -> AuthzLabels {
    AuthzLabels {
        policy: Label::new(policy),
        target_addr: labels.target_addr.clone(),
        client_id: labels.client_id.clone(),
    }
}

/// Adds per-request authorization to an inbound service.
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    policy: PortPolicy,
    client: ConnectionClient,
    metrics: Arc<Metrics>,
    labels: TargetLabels,
}

impl AuthzLayer {
    /// Checks requests of `client` against `policy`.
    pub fn new(
        policy: PortPolicy,
        client: ConnectionClient,
        metrics: Arc<Metrics>,
        labels: TargetLabels,
    ) -> Self {
        Self {
            policy,
            client,
            metrics,
            labels,
        }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AuthzLayer`].
#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

impl<S> Service<Request<Incoming>> for Authz<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let layer = &self.layer;
        let policy = layer.policy.current();
        let route = match policy.route_of(&request) {
            Ok(route) => route.cloned(),
            Err(NoRoute) => {
                let error = ProxyError::NoRoute(format!(
                    "no HTTPRoute of {} matches {} {}",
                    policy.name,
                    request.method(),
                    request.uri().path()
                ));
                return Box::pin(std::future::ready(Ok(layer.refusal(error, &request))));
            }
        };
        match policy.evaluate(&layer.client.as_policy_client(), route.as_deref()) {
            Verdict::Allow(_) => Box::pin(self.inner.call(request)),
            Verdict::AuditDeny(name) => {
                layer
                    .metrics
                    .authz_audits
                    .get_or_create(&authz_labels(&name, &layer.labels))
                    .inc();
                info!(policy = %name, client = %layer.client.describe(), path = request.uri().path(), "audit: the policy would refuse this request");
                Box::pin(self.inner.call(request))
            }
            Verdict::Deny(name) => {
                layer
                    .metrics
                    .http_authz_denies
                    .get_or_create(&authz_labels(&name, &layer.labels))
                    .inc();
                let on_route = route.map(|r| format!(" on route {r}")).unwrap_or_default();
                let error = ProxyError::Unauthorized(format!(
                    "policy {name} does not authorize {}{on_route}",
                    layer.client.describe()
                ));
                warn!(policy = %name, client = %layer.client.describe(), path = request.uri().path(), "request refused by policy");
                Box::pin(std::future::ready(Ok(layer.refusal(error, &request))))
            }
        }
    }
}

impl AuthzLayer {
    /// The proxy's own answer to a refused request, labelled for the metrics layer above.
    fn refusal(&self, error: ProxyError, request: &Request<Incoming>) -> Response<ProxyBody> {
        let mut response = error.to_response(is_grpc(request));
        response.extensions_mut().insert(self.labels.clone());
        response
    }
}
