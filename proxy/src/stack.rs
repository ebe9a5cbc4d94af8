//! The request paths, composed in one place: read this file to see every layer an HTTP request
//! passes through on each side, outermost first.
//!
//! Connection-level steps (capture, transport header, TLS, protocol detection, the policy
//! check of opaque connections, forwarding) are in `inbound.rs` and `outbound.rs`; what happens
//! to each HTTP request is here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tower::ServiceBuilder;

use crate::access_log::{AccessLog, AccessLogLayer};
use crate::app::Context;
use crate::authz::{Authz, AuthzLayer, ConnectionClient};
use crate::http_metrics::{HttpMetrics, HttpMetricsLayer};
use crate::hygiene::{Hygiene, HygieneLayer};
use crate::inbound::InboundHttp;
use crate::metrics::{Direction, TargetLabels};
use crate::outbound::{ConcurrencyLimit, ConcurrencyLimitLayer, OutboundEndpoint, OutboundRouter};
use crate::policy::PortPolicy;
use crate::rate_limit::{RateLimit, RateLimitLayer};
use crate::retry::{Retry, RetryLayer};
use crate::tap::{Tap, TapLayer};
use crate::timeout::{RequestTimeout, RequestTimeoutLayer};
use crate::trace::{Trace, TraceLayer};

/// The outbound HTTP stack.
pub type OutboundStack = Tap<
    Trace<
        AccessLog<
            HttpMetrics<
                Hygiene<OutboundRouter<ConcurrencyLimit<RequestTimeout<Retry<OutboundEndpoint>>>>>,
            >,
        >,
    >,
>;

/// Outbound: tap -> trace -> access log -> metrics -> hygiene (one Host, h2c upgrades
/// stripped) -> router (target, plan, route, filters, weighted backend) -> the backend's
/// concurrency limit -> the route's request timeout -> retries within the budget and the
/// buffer caps -> a balanced endpoint, one attempt.
pub fn outbound_http(
    ctx: &Arc<Context>,
    orig_dst: Option<SocketAddr>,
    client_ip: IpAddr,
) -> OutboundStack {
    let per_request = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(ctx.clone()))
        .layer(RequestTimeoutLayer)
        .layer(RetryLayer::new(
            ctx.metrics.clone(),
            ctx.retry_buffers.clone(),
            ctx.config.limits.retry_buffer_connection_bytes,
        ))
        .service(OutboundEndpoint::new(ctx.clone()));
    ServiceBuilder::new()
        .layer(TapLayer::new(ctx.tap.clone(), Direction::Outbound))
        .layer(TraceLayer::new(ctx.tracer.clone(), Direction::Outbound))
        .layer(AccessLogLayer::new(
            ctx.config.access_log,
            Direction::Outbound,
        ))
        .layer(HttpMetricsLayer::new(ctx.metrics.clone()))
        .layer(HygieneLayer::new(ctx.metrics.clone(), Direction::Outbound))
        .service(OutboundRouter::new(
            ctx.clone(),
            orig_dst,
            client_ip,
            per_request,
        ))
}

/// The inbound HTTP stack.
pub type InboundStack = Tap<Trace<AccessLog<HttpMetrics<Hygiene<Authz<RateLimit<InboundHttp>>>>>>>;

/// Inbound: tap -> trace -> access log -> metrics -> hygiene -> authorization policy -> local
/// rate limit -> forward to the application.
pub fn inbound_http(
    ctx: &Arc<Context>,
    forward: InboundHttp,
    policy: PortPolicy,
    client: ConnectionClient,
    labels: TargetLabels,
) -> InboundStack {
    ServiceBuilder::new()
        .layer(TapLayer::new(ctx.tap.clone(), Direction::Inbound))
        .layer(TraceLayer::new(ctx.tracer.clone(), Direction::Inbound))
        .layer(AccessLogLayer::new(
            ctx.config.access_log,
            Direction::Inbound,
        ))
        .layer(HttpMetricsLayer::new(ctx.metrics.clone()))
        .layer(HygieneLayer::new(ctx.metrics.clone(), Direction::Inbound))
        .layer(AuthzLayer::new(
            policy.clone(),
            client.clone(),
            ctx.metrics.clone(),
            labels.clone(),
        ))
        .layer(RateLimitLayer::new(
            policy,
            client,
            ctx.metrics.clone(),
            labels,
        ))
        .service(forward)
}
