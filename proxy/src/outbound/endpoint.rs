//! The innermost outbound service: picks an endpoint of the chosen backend (or the direct
//! destination), forwards one attempt with the route's response timeout, and feeds the
//! latency estimate and failure accrual with the outcome.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use http::{Request, Response};
use tracing::warn;

use super::outbound_labels;
use super::router::{Dispatch, DispatchTarget};
use crate::app::Context;
use crate::client::HttpClients;
use crate::forward;
use crate::http::{MESH_ERROR, ProxyBody, ProxyError, ProxyErrorKind, ReqBody, is_grpc};
use crate::metrics::{Label, RouteLabels, TargetMetrics};
use crate::retry::{RouteInfo, TriedEndpoints};
use crate::route::FailureAccrual;

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct OutboundEndpoint {
    ctx: Arc<Context>,
}

impl OutboundEndpoint {
    /// Forwards with the proxy's clients.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    async fn attempt(self, request: Request<ReqBody>) -> Response<ProxyBody> {
        let grpc = is_grpc(&request);
        let Some(dispatch) = request.extensions().get::<Arc<Dispatch>>().cloned() else {
            return super::error_response(
                &self.ctx,
                ProxyError::BadRequest("request reached the endpoint layer unrouted".into()),
                grpc,
                None,
            );
        };
        let timeout = request.extensions().get::<RouteInfo>().and_then(|route| {
            route
                .0
                .retry
                .as_ref()
                .and_then(|retry| retry.per_try_timeout)
                .or(route.0.response_timeout)
        });
        match &dispatch.target {
            DispatchTarget::Direct(clients) => {
                let target = self.target(&dispatch, clients);
                self.send(clients, request, &dispatch, timeout, target, grpc)
                    .await
                    .0
            }
            DispatchTarget::Balanced(resolution) => {
                let tried = request.extensions().get::<Arc<TriedEndpoints>>().cloned();
                let avoid = tried.as_ref().map(|tried| tried.list()).unwrap_or_default();
                let Some(pick) = resolution.balancer.pick_avoiding(dispatch.hash, &avoid) else {
                    let detail = if resolution.has_endpoints() {
                        format!(
                            "every endpoint of {} is ejected after consecutive failures",
                            dispatch.logical.0
                        )
                    } else {
                        format!("{} has no ready endpoints", dispatch.logical.0)
                    };
                    let labels = outbound_labels(
                        &self.ctx,
                        dispatch.logical.clone(),
                        dispatch.logical.0.to_string(),
                        None,
                    );
                    return super::error_response(
                        &self.ctx,
                        ProxyError::NoEndpoints(detail),
                        grpc,
                        Some(labels),
                    );
                };
                let endpoint = pick.meta().clone();
                if let Some(tried) = &tried {
                    tried.push(endpoint.addr);
                }
                let target = self.target(&dispatch, &endpoint.clients);
                let (response, success) = self
                    .send(&endpoint.clients, request, &dispatch, timeout, target, grpc)
                    .await;
                let connect_failed = response.extensions().get::<ProxyErrorKind>()
                    == Some(&ProxyErrorKind::ConnectFailed);
                if connect_failed {
                    // A refused connection says nothing of the endpoint's latency; as a fast
                    // answer it would make a dead endpoint the balancer's favourite.
                    drop(pick);
                } else {
                    // Errors and timeouts count as latency too, so a stalled endpoint looks slow.
                    pick.complete();
                }
                // A connection failure ejects at once, whatever the plan's accrual says; a
                // success resets what connection failures counted too.
                let accrual = match (connect_failed, success) {
                    (true, _) => Some(&CONNECT_FAILURE_ACCRUAL),
                    (false, true) => dispatch.accrual.as_ref().or(Some(&CONNECT_FAILURE_ACCRUAL)),
                    (false, false) => dispatch.accrual.as_ref(),
                };
                if let Some(accrual) = accrual
                    && resolution.report(&endpoint, success, accrual)
                {
                    self.ctx
                        .metrics
                        .ejections
                        .get_or_create(&RouteLabels {
                            authority: dispatch.logical.clone(),
                            route: Label::from(endpoint.addr.to_string()),
                        })
                        .inc();
                }
                response
            }
        }
    }

    /// Sends one attempt; returns the response and whether it counts as a success for
    /// failure accrual (no proxy error, no 5xx).
    async fn send(
        &self,
        clients: &HttpClients,
        request: Request<ReqBody>,
        dispatch: &Dispatch,
        timeout: Option<Duration>,
        target: Arc<TargetMetrics>,
        grpc: bool,
    ) -> (Response<ProxyBody>, bool) {
        let sent = forward::forward(
            clients,
            request,
            &dispatch.uri_authority,
            &dispatch.logical.0,
        );
        let result = match timeout {
            None => sent.await,
            Some(timeout) => match tokio::time::timeout(timeout, sent).await {
                Ok(result) => result,
                Err(_elapsed) => {
                    warn!(service = %dispatch.logical.0, upstream = %clients.dial.socket_addr(), "no response headers within {timeout:?}");
                    Err(ProxyError::Timeout(format!(
                        "{} sent no response headers within {timeout:?}",
                        dispatch.logical.0
                    )))
                }
            },
        };
        match result {
            Ok(mut response) => {
                let success = !response.status().is_server_error();
                if clients.dial.is_proxy() && peer_could_not_connect(&response) {
                    response
                        .extensions_mut()
                        .insert(ProxyErrorKind::ConnectFailed);
                }
                response.extensions_mut().insert(target);
                (response, success)
            }
            Err(error) => (
                super::error_response(&self.ctx, error, grpc, Some(target.labels.clone())),
                false,
            ),
        }
    }

    /// The target's metrics, cached on the destination's clients while the logical target
    /// and our identity stay those they were built for.
    fn target(&self, dispatch: &Dispatch, clients: &HttpClients) -> Arc<TargetMetrics> {
        let tls_identity = clients.dial.tls_identity();
        let client_id = match tls_identity {
            Some(_) => self.ctx.local_id(),
            None => Label::default(),
        };
        if let Some(cached) = clients.target_metrics.load_full()
            && cached.labels.authority == dispatch.logical
            && cached.labels.client_id == client_id
        {
            return cached;
        }
        let labels = outbound_labels(
            &self.ctx,
            dispatch.logical.clone(),
            clients.dial.socket_addr().to_string(),
            tls_identity,
        );
        let target = Arc::new(TargetMetrics::new(self.ctx.metrics.clone(), labels));
        clients.target_metrics.store(Some(target.clone()));
        target
    }
}

/// Failure accrual for connection failures, whatever the plan says: one refused or unreachable
/// connection ejects the endpoint at once (the request never reached it, and the next would
/// fail the same way), and it rejoins as a probe after the backoff. The backoff stays short:
/// a probe that fails costs no request (it is replayed elsewhere), and a replica that comes
/// back should not wait long for traffic.
const CONNECT_FAILURE_ACCRUAL: FailureAccrual = FailureAccrual {
    consecutive_failures: 1,
    min_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(4),
};

/// Whether a peer proxy answered that it could not connect to its application (its own
/// `connect failed` error): to us that endpoint failed to connect, as if we had dialed it, so
/// the request is safe to retry elsewhere and the endpoint is ejected.
fn peer_could_not_connect(response: &Response<ProxyBody>) -> bool {
    response.status() == http::StatusCode::BAD_GATEWAY
        && response
            .headers()
            .get(MESH_ERROR)
            .is_some_and(|value| value.as_bytes().starts_with(b"connect failed:"))
}

impl tower::Service<Request<ReqBody>> for OutboundEndpoint {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.attempt(request).await) })
    }
}
