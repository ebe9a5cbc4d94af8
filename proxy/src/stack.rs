//! The request paths, composed in one place: read this file to see every layer an HTTP request
//! passes through on each side, outermost first.
//!
//! Connection-level steps (capture, transport header, protocol detection, opaque forwarding)
//! are in `inbound.rs` and `outbound.rs`; what happens to each HTTP request is here.

use std::sync::Arc;

use tower::ServiceBuilder;

use crate::app::Context;
use crate::http_metrics::{HttpMetrics, HttpMetricsLayer};
use crate::inbound::InboundHttp;
use crate::outbound::OutboundHttp;

/// Outbound: metrics -> route to a balanced endpoint of the target and forward.
pub fn outbound_http(ctx: &Arc<Context>, forward: OutboundHttp) -> HttpMetrics<OutboundHttp> {
    ServiceBuilder::new()
        .layer(HttpMetricsLayer::new(ctx.metrics.clone()))
        .service(forward)
}

/// Inbound: metrics -> forward to the application.
pub fn inbound_http(ctx: &Arc<Context>, forward: InboundHttp) -> HttpMetrics<InboundHttp> {
    ServiceBuilder::new()
        .layer(HttpMetricsLayer::new(ctx.metrics.clone()))
        .service(forward)
}
