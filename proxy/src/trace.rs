//! Distributed tracing: a span per request (server spans inbound, client spans outbound),
//! W3C `traceparent` propagation (B3 accepted). The trace context and the OTLP exporter are
//! `mesh-trace`'s, shared with the controller.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use mesh_trace::{Span, Status, attribute, int_attribute, now_nanos, span, status};
pub use mesh_trace::{SpanContext, Tracer};
use tower::{Layer, Service};

use crate::metrics::{Direction, target_labels};

/// Adds tracing to a service (a no-op without a tracer).
#[derive(Clone, Debug)]
pub struct TraceLayer {
    tracer: Option<Arc<Tracer>>,
    direction: Direction,
}

impl TraceLayer {
    /// Traces with `tracer` on one side.
    pub fn new(tracer: Option<Arc<Tracer>>, direction: Direction) -> Self {
        Self { tracer, direction }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Trace {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    layer: TraceLayer,
}

impl<S, B> Service<Request<Incoming>> for Trace<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = Infallible;
    /// The inner future as is when no span is recorded (the common case: no allocation per
    /// request for a layer that does nothing), boxed when one is.
    type Future =
        Either<S::Future, Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let Some(tracer) = self.layer.tracer.clone() else {
            return Either::Left(self.inner.call(request));
        };
        let parent = SpanContext::from_headers(request.headers());
        // Honour the parent's decision; sample new traces at the configured rate.
        let sampled = tracer.sampled(parent.as_ref());
        let context = SpanContext::child(parent.as_ref(), sampled);
        // Whoever is next joins the trace as a child of this span.
        if let Ok(value) = HeaderValue::try_from(context.traceparent()) {
            request.headers_mut().insert("traceparent", value);
        }
        if !sampled {
            return Either::Left(self.inner.call(request));
        }
        let start = now_nanos();
        let method = request.method().to_string();
        let mut attributes = vec![
            attribute("http.request.method", method.clone()),
            attribute("url.path", request.uri().path().to_string()),
            attribute(
                "server.address",
                crate::outbound::request_authority(&request).unwrap_or_default(),
            ),
            attribute(
                "network.protocol.version",
                match request.version() {
                    http::Version::HTTP_2 => "2",
                    http::Version::HTTP_10 => "1.0",
                    _ => "1.1",
                },
            ),
        ];
        let direction = self.layer.direction;
        let response = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let response = response.await?;
            let status = response.status();
            attributes.push(int_attribute(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            if let Some(labels) = target_labels(response.extensions()) {
                for (key, value) in [
                    ("mesh.client_id", &labels.client_id.0),
                    ("mesh.server_id", &labels.server_id.0),
                    ("mesh.target_addr", &labels.target_addr.0),
                    ("mesh.authority", &labels.authority.0),
                ] {
                    if !value.is_empty() {
                        attributes.push(attribute(key, value.to_string()));
                    }
                }
            }
            let failed = status.is_server_error()
                || (direction == Direction::Outbound && status.is_client_error());
            tracer.record(Span {
                trace_id: context.trace_id.to_vec(),
                span_id: context.span_id.to_vec(),
                parent_span_id: parent.map(|p| p.span_id.to_vec()).unwrap_or_default(),
                flags: 1,
                name: method,
                kind: match direction {
                    Direction::Inbound => span::SpanKind::Server as i32,
                    Direction::Outbound => span::SpanKind::Client as i32,
                },
                start_time_unix_nano: start,
                end_time_unix_nano: now_nanos(),
                attributes,
                status: Some(Status {
                    message: String::new(),
                    code: if failed {
                        status::StatusCode::Error as i32
                    } else {
                        status::StatusCode::Unset as i32
                    },
                }),
                ..Default::default()
            });
            Ok(response)
        }))
    }
}
