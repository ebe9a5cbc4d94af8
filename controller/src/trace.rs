//! Server spans for the controller's gRPC handlers, exported over OTLP by `mesh-trace` (the
//! same pipeline as the proxy's). A call joins its caller's trace (`traceparent`, else B3)
//! and honours its sampling decision; new traces are sampled at the configured rate.
//!
//! A span ends when the response's headers are sent: for a unary call that is the answer, for
//! a watch stream its start (a stream lives for hours; its updates are not spans).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use mesh_trace::{
    Span, SpanContext, Status, Tracer, attribute, int_attribute, now_nanos, span, status,
};
use tower::{Layer, Service};

/// Where spans go and how many new traces are sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceOptions {
    /// The OTLP/gRPC collector, `http://host:4317`.
    pub collector: String,
    /// The share of new traces recorded, 0..=1.
    pub sample_rate: f64,
}

/// Adds a server span to each gRPC call (a no-op without a tracer).
#[derive(Clone, Debug, Default)]
pub struct GrpcTraceLayer {
    tracer: Option<Arc<Tracer>>,
}

impl GrpcTraceLayer {
    pub fn new(tracer: Option<Arc<Tracer>>) -> Self {
        Self { tracer }
    }
}

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace {
            inner,
            tracer: self.tracer.clone(),
        }
    }
}

/// See [`GrpcTraceLayer`].
#[derive(Clone, Debug)]
pub struct GrpcTrace<S> {
    inner: S,
    tracer: Option<Arc<Tracer>>,
}

impl<S, B, R> Service<http::Request<B>> for GrpcTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(tracer) = self.tracer.clone() else {
            return Box::pin(self.inner.call(request));
        };
        let parent = SpanContext::from_headers(request.headers());
        let sampled = tracer.sampled(parent.as_ref());
        if !sampled {
            return Box::pin(self.inner.call(request));
        }
        let context = SpanContext::child(parent.as_ref(), true);
        let path = request.uri().path().trim_start_matches('/').to_owned();
        let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
        let mut attributes = vec![
            attribute("rpc.system", "grpc"),
            attribute("rpc.service", service),
            attribute("rpc.method", method),
        ];
        let start = now_nanos();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            // A status in the headers is a trailers-only answer (an error, usually); a call
            // that answers with a body has OK (0) at this point.
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0),
                // tonic's own error: UNKNOWN.
                Err(_) => 2,
            };
            attributes.push(int_attribute("rpc.grpc.status_code", code));
            tracer.record(Span {
                trace_id: context.trace_id.to_vec(),
                span_id: context.span_id.to_vec(),
                parent_span_id: parent.map(|p| p.span_id.to_vec()).unwrap_or_default(),
                flags: 1,
                name: path,
                kind: span::SpanKind::Server as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: now_nanos(),
                attributes,
                status: Some(Status {
                    message: String::new(),
                    code: if code == 0 {
                        status::StatusCode::Unset as i32
                    } else {
                        status::StatusCode::Error as i32
                    },
                }),
                ..Default::default()
            });
            response
        })
    }
}
