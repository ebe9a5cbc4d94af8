//! The metrics layer: counts requests and responses and measures latency, for both sides.
//!
//! The service below it names the target of each exchange by putting an `Arc<TargetMetrics>`
//! (its labels with their series resolved once per target) or bare [`TargetLabels`] in the
//! response's extensions (it alone knows where the request went); this layer turns them into
//! `request_total`, `response_latency_ms` (at response headers) and `response_total` (when the
//! response body ends, so a gRPC status in trailers classifies the exchange).
//!
//! The outbound router also puts the route's [`RouteMetrics`] there when a plan routed the
//! request; they give `route_response_latency_ms` and `route_response_total` the same way, so
//! per-route latency and success are measured exactly like the target's (filters, retries and
//! proxy errors included).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::{Layer, Service};

use crate::http::{MESH_ERROR, ProxyBody, grpc_status_failed};
use crate::metrics::{Classification, Metrics, RouteMetrics, TargetLabels, TargetMetrics};

/// Adds request metrics to a service.
#[derive(Clone, Debug)]
pub struct HttpMetricsLayer {
    metrics: Arc<Metrics>,
}

impl HttpMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`HttpMetricsLayer`].
#[derive(Clone, Debug)]
pub struct HttpMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request<Incoming>> for HttpMetrics<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ObservedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
            let status = response.status();
            let classification = classify(status, response.headers());
            // The service below resolved the target's series once ([`TargetMetrics`]); a
            // response it made itself may carry only the labels, looked up here.
            let target = match response.extensions().get::<Arc<TargetMetrics>>() {
                Some(target) => Some(target.clone()),
                None => response
                    .extensions()
                    .get::<TargetLabels>()
                    .map(|labels| Arc::new(TargetMetrics::new(metrics.clone(), labels.clone()))),
            };
            if let Some(target) = &target {
                target.request();
                target.latency(status.as_u16(), classification, elapsed_ms);
            }
            let route = response.extensions().get::<Arc<RouteMetrics>>().cloned();
            if let Some(route) = &route {
                route.latency(elapsed_ms);
            }
            let recorder = (target.is_some() || route.is_some()).then(|| Recorder {
                status_code: status.as_u16(),
                classification,
                target,
                route,
            });
            Ok(response.map(|inner| ObservedBody { inner, recorder }))
        })
    }
}

/// How a response counts at its headers: a 5xx, a non-OK gRPC status, or an answer a proxy
/// made itself (`mesh-error`: a policy denial's 403, a rate limit's 429, a refused route) is a
/// failure. A denial is not a success of the application: counted as one, a workload whose
/// callers are all refused would show 100% success.
fn classify(status: http::StatusCode, headers: &http::HeaderMap) -> Classification {
    if status.is_server_error() || grpc_status_failed(headers) || headers.contains_key(MESH_ERROR) {
        Classification::Failure
    } else {
        Classification::Success
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counts the response once it ends.
struct Recorder {
    status_code: u16,
    classification: Classification,
    target: Option<Arc<TargetMetrics>>,
    route: Option<Arc<RouteMetrics>>,
}

impl Recorder {
    fn finish(self) {
        if let Some(target) = self.target {
            target.response(self.status_code, self.classification);
        }
        if let Some(route) = self.route {
            route.response(self.classification);
        }
    }
}

/// A response body that records `response_total` when it ends (or is dropped).
pub struct ObservedBody {
    inner: ProxyBody,
    recorder: Option<Recorder>,
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(trailers), Some(recorder)) = (frame.trailers_ref(), &mut self.recorder)
                    && grpc_status_failed(trailers)
                {
                    recorder.classification = Classification::Failure;
                }
                if self.inner.is_end_stream()
                    && let Some(recorder) = self.recorder.take()
                {
                    recorder.finish();
                }
            }
            Some(Err(_)) => {
                if let Some(mut recorder) = self.recorder.take() {
                    recorder.classification = Classification::Failure;
                    recorder.finish();
                }
            }
            None => {
                if let Some(recorder) = self.recorder.take() {
                    recorder.finish();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, StatusCode};

    use super::*;

    #[test]
    fn proxy_answers_and_server_errors_are_failures() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_static(value));
            }
            map
        };
        let cases = [
            (StatusCode::OK, headers(&[]), Classification::Success),
            (StatusCode::NOT_FOUND, headers(&[]), Classification::Success),
            (StatusCode::FORBIDDEN, headers(&[]), Classification::Success),
            (
                StatusCode::FORBIDDEN,
                headers(&[("mesh-error", "unauthorized: default:deny")]),
                Classification::Failure,
            ),
            (
                StatusCode::TOO_MANY_REQUESTS,
                headers(&[("mesh-error", "rate limited: web")]),
                Classification::Failure,
            ),
            (
                StatusCode::BAD_GATEWAY,
                headers(&[]),
                Classification::Failure,
            ),
            (
                StatusCode::OK,
                headers(&[("grpc-status", "7")]),
                Classification::Failure,
            ),
            (
                StatusCode::OK,
                headers(&[("grpc-status", "0")]),
                Classification::Success,
            ),
        ];
        for (status, headers, want) in cases {
            assert_eq!(classify(status, &headers), want, "{status} {headers:?}");
        }
    }
}
