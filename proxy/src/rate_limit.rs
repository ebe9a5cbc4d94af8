//! The local rate-limit layer of the inbound HTTP stack: requests beyond the port's
//! HTTPLocalRateLimitPolicy get 429 with `Retry-After`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Layer, Service};
use tracing::debug;

use crate::authz::ConnectionClient;
use crate::http::{ProxyBody, ProxyError, is_grpc};
use crate::metrics::{AuthzLabels, Label, Metrics, TargetLabels};
use crate::policy::PortPolicy;

/// Adds local rate limits to an inbound service.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    policy: PortPolicy,
    client: ConnectionClient,
    metrics: Arc<Metrics>,
    labels: TargetLabels,
}

impl RateLimitLayer {
    /// Limits `client`'s requests by `policy`'s rate limits.
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

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S> Service<Request<Incoming>> for RateLimit<S>
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
        let policy = self.layer.policy.current();
        let Some(limits) = &policy.rate_limits else {
            return Box::pin(self.inner.call(request));
        };
        match limits.check(self.layer.client.identity.as_deref()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(retry_after) => {
                self.layer
                    .metrics
                    .rate_limited
                    .get_or_create(&AuthzLabels {
                        policy: Label::new(limits.name()),
                        target_addr: self.layer.labels.target_addr.clone(),
                        client_id: self.layer.labels.client_id.clone(),
                    })
                    .inc();
                debug!(limit = limits.name(), "request over the local rate limit");
                let error = ProxyError::RateLimited(
                    format!("over the local rate limit {}", limits.name()),
                    retry_after,
                );
                let mut response = error.to_response(is_grpc(&request));
                response.extensions_mut().insert(self.layer.labels.clone());
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
