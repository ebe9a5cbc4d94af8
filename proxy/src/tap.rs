//! Live tap: a bounded stream of request events for whoever is watching (`Tap.Observe` on the
//! admin port), and the layer that reports them.
//!
//! Costs nothing while nobody taps: the layer checks one atomic counter per request. A tap is
//! bounded in requests and duration, and its channel is bounded: a slow watcher loses events
//! rather than slowing requests.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryFutureExt as _;
use futures::future::{Either, MapOk};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use mesh_proto::tap::{self, tap_event::Event};
use mesh_proto::tonic::{self, Status};
use tokio::sync::mpsc;
use tower::{Layer, Service};

use crate::http_metrics::ObservedBody;
use crate::metrics::{Direction, target_labels};

/// Longest tap, and the default when the watcher gives none.
const MAX_TAP_DURATION: Duration = Duration::from_secs(300);
const DEFAULT_TAP_DURATION: Duration = Duration::from_secs(60);
/// Most requests one tap reports, and the default.
const MAX_TAP_REQUESTS: u32 = 10_000;
const DEFAULT_TAP_REQUESTS: u32 = 100;
/// Events buffered per watcher before new ones are dropped.
const TAP_BUFFER: usize = 1024;

struct Subscriber {
    id: u64,
    filter: tap::TapMatch,
    remaining: AtomicUsize,
    deadline: Instant,
    events: mpsc::Sender<Result<tap::TapEvent, Status>>,
}

/// The taps in progress.
#[derive(Default)]
pub struct TapHub {
    active: AtomicUsize,
    next_id: AtomicU64,
    next_stream: AtomicU64,
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
}

impl std::fmt::Debug for TapHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapHub")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish()
    }
}

/// What the layer knows of a request, for matching and reporting.
struct RequestView<'a> {
    direction: Direction,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
}

fn matches(filter: &tap::TapMatch, request: &RequestView<'_>) -> bool {
    let direction_ok = match tap::Direction::try_from(filter.direction) {
        Ok(tap::Direction::Inbound) => request.direction == Direction::Inbound,
        Ok(tap::Direction::Outbound) => request.direction == Direction::Outbound,
        _ => true,
    };
    direction_ok
        && (filter.method.is_empty() || filter.method.eq_ignore_ascii_case(request.method))
        && (filter.authority.is_empty() || filter.authority == request.authority)
        && (filter.path_prefix.is_empty() || request.path.starts_with(&filter.path_prefix))
}

impl TapHub {
    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Starts a tap; events arrive on the returned stream until its bounds are reached.
    pub fn observe(
        self: &Arc<Self>,
        request: tap::ObserveRequest,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<tap::TapEvent, Status>> {
        let limit = match request.limit {
            0 => DEFAULT_TAP_REQUESTS,
            n => n.min(MAX_TAP_REQUESTS),
        };
        let duration = request
            .max_duration
            .and_then(|d| Some(Duration::new(u64::try_from(d.seconds).ok()?, 0)))
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_TAP_DURATION)
            .min(MAX_TAP_DURATION);
        let (tx, rx) = mpsc::channel(TAP_BUFFER);
        let subscriber = Arc::new(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            filter: request.r#match.unwrap_or_default(),
            remaining: AtomicUsize::new(limit as usize),
            deadline: Instant::now() + duration,
            events: tx,
        });
        if let Ok(mut subscribers) = self.subscribers.write() {
            subscribers.push(subscriber.clone());
            self.active.store(subscribers.len(), Ordering::Release);
        }
        // End the tap when its time is up or the watcher leaves.
        let hub = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(subscriber.deadline.into()) => {}
                () = subscriber.events.closed() => {}
            }
            hub.remove(subscriber.id);
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    fn remove(&self, id: u64) {
        if let Ok(mut subscribers) = self.subscribers.write() {
            subscribers.retain(|s| s.id != id);
            self.active.store(subscribers.len(), Ordering::Release);
        }
    }

    /// The subscribers that take this request (each counting it against its limit).
    fn takers(&self, request: &RequestView<'_>) -> Vec<Arc<Subscriber>> {
        let Ok(subscribers) = self.subscribers.read() else {
            return Vec::new();
        };
        let now = Instant::now();
        subscribers
            .iter()
            .filter(|s| now < s.deadline && matches(&s.filter, request))
            .filter(|s| {
                s.remaining
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
            })
            .cloned()
            .collect()
    }
}

/// Sends one exchange's events to the subscribers that took it.
struct Reporter {
    takers: Vec<Arc<Subscriber>>,
    base: tap::TapEvent,
    started: Instant,
    response_bytes: u64,
    grpc_status: Option<u32>,
}

impl Reporter {
    fn send(&self, event: Event) {
        let event = tap::TapEvent {
            event: Some(event),
            ..self.base.clone()
        };
        for taker in &self.takers {
            // A full buffer drops the event: the watcher is too slow, the request must not wait.
            let _ = taker.events.try_send(Ok(event.clone()));
        }
    }

    fn since_start(&self) -> mesh_proto::prost_types::Duration {
        let elapsed = self.started.elapsed();
        mesh_proto::prost_types::Duration {
            seconds: elapsed.as_secs() as i64,
            nanos: elapsed.subsec_nanos() as i32,
        }
    }

    fn end(&mut self, error: &str) {
        let since = self.since_start();
        self.send(Event::End(tap::End {
            grpc_status: self.grpc_status,
            error: error.to_string(),
            since_request_start: Some(since),
            request_bytes: 0,
            response_bytes: self.response_bytes,
        }));
    }
}

/// Adds tap reporting to a service.
#[derive(Clone, Debug)]
pub struct TapLayer {
    hub: Arc<TapHub>,
    direction: Direction,
}

impl TapLayer {
    /// Reports to `hub` the requests of one side.
    pub fn new(hub: Arc<TapHub>, direction: Direction) -> Self {
        Self { hub, direction }
    }
}

impl<S> Layer<S> for TapLayer {
    type Service = Tap<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Tap {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`TapLayer`].
#[derive(Clone, Debug)]
pub struct Tap<S> {
    inner: S,
    layer: TapLayer,
}

impl<S> Service<Request<Incoming>> for Tap<S>
where
    S: Service<Request<Incoming>, Response = Response<ObservedBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<TapBody>;
    type Error = Infallible;
    /// Without a tap watching, the inner future with its response wrapped (no allocation per
    /// request for a layer that does nothing); boxed when a tap may report the request.
    type Future = Either<
        MapOk<S::Future, fn(Response<ObservedBody>) -> Response<TapBody>>,
        Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        if !self.layer.hub.is_active() {
            let unreported: fn(Response<ObservedBody>) -> Response<TapBody> = |response| {
                response.map(|inner| TapBody {
                    inner,
                    reporter: None,
                })
            };
            return Either::Left(self.inner.call(request).map_ok(unreported));
        }
        let authority = crate::outbound::request_authority(&request).unwrap_or_default();
        let view = RequestView {
            direction: self.layer.direction,
            method: request.method().as_str(),
            authority: &authority,
            path: request.uri().path(),
        };
        let takers = self.layer.hub.takers(&view);
        let reporter = (!takers.is_empty()).then(|| {
            let reporter = Reporter {
                takers,
                base: tap::TapEvent {
                    direction: match self.layer.direction {
                        Direction::Inbound => tap::Direction::Inbound as i32,
                        Direction::Outbound => tap::Direction::Outbound as i32,
                    },
                    stream_id: self.layer.hub.next_stream.fetch_add(1, Ordering::Relaxed),
                    ..Default::default()
                },
                started: Instant::now(),
                response_bytes: 0,
                grpc_status: None,
            };
            reporter.send(Event::RequestStart(tap::RequestStart {
                method: request.method().to_string(),
                scheme: request.uri().scheme_str().unwrap_or("http").to_string(),
                authority: authority.clone(),
                path: request
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into()),
            }));
            reporter
        });
        let response = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let response = response.await?;
            let reporter = reporter.map(|mut reporter| {
                if let Some(labels) = target_labels(response.extensions()) {
                    reporter.base.destination_identity = labels.server_id.0.to_string();
                    reporter.base.source_identity = labels.client_id.0.to_string();
                    reporter.base.destination_labels = [
                        ("authority".to_string(), labels.authority.0.to_string()),
                        ("target_addr".to_string(), labels.target_addr.0.to_string()),
                    ]
                    .into();
                }
                let since = reporter.since_start();
                reporter.send(Event::ResponseStart(tap::ResponseStart {
                    http_status: u32::from(response.status().as_u16()),
                    since_request_start: Some(since),
                }));
                reporter.grpc_status = grpc_status(response.headers());
                reporter
            });
            Ok(response.map(|inner| TapBody { inner, reporter }))
        }))
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A response body that reports the end of the exchange to its tap.
pub struct TapBody {
    inner: ObservedBody,
    reporter: Option<Reporter>,
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(reporter) = self.reporter.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        reporter.response_bytes += data.len() as u64;
                    }
                    if let Some(trailers) = frame.trailers_ref() {
                        reporter.grpc_status = grpc_status(trailers).or(reporter.grpc_status);
                    }
                }
                Some(Err(error)) => {
                    let error = error.to_string();
                    if let Some(mut reporter) = self.reporter.take() {
                        reporter.end(&error);
                    }
                }
                None => {
                    if let Some(mut reporter) = self.reporter.take() {
                        reporter.end("");
                    }
                }
            }
        }
        if self.inner.is_end_stream()
            && let Some(mut reporter) = self.reporter.take()
        {
            reporter.end("");
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

impl Drop for TapBody {
    fn drop(&mut self) {
        if let Some(mut reporter) = self.reporter.take() {
            reporter.end("");
        }
    }
}

/// The `Tap` gRPC service over a hub.
#[derive(Clone, Debug)]
pub struct TapService {
    hub: Arc<TapHub>,
}

impl TapService {
    /// Serves taps of `hub`.
    pub fn new(hub: Arc<TapHub>) -> Self {
        Self { hub }
    }
}

#[tonic::async_trait]
impl tap::tap_server::Tap for TapService {
    type ObserveStream = tokio_stream::wrappers::ReceiverStream<Result<tap::TapEvent, Status>>;

    async fn observe(
        &self,
        request: tonic::Request<tap::ObserveRequest>,
    ) -> Result<tonic::Response<Self::ObserveStream>, Status> {
        Ok(tonic::Response::new(self.hub.observe(request.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_direction_method_authority_and_path() {
        let request = RequestView {
            direction: Direction::Outbound,
            method: "GET",
            authority: "books.shop:8080",
            path: "/books/1",
        };
        let cases = [
            (tap::TapMatch::default(), true),
            (
                tap::TapMatch {
                    path_prefix: "/books".into(),
                    method: "get".into(),
                    ..Default::default()
                },
                true,
            ),
            (
                tap::TapMatch {
                    direction: tap::Direction::Inbound as i32,
                    ..Default::default()
                },
                false,
            ),
            (
                tap::TapMatch {
                    authority: "authors.shop:8080".into(),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (filter, want) in cases {
            assert_eq!(matches(&filter, &request), want, "{filter:?}");
        }
    }

    #[tokio::test]
    async fn a_tap_takes_at_most_its_limit_and_ends() {
        let hub = Arc::new(TapHub::default());
        assert!(!hub.is_active());
        let _stream = hub.observe(tap::ObserveRequest {
            limit: 2,
            ..Default::default()
        });
        assert!(hub.is_active());
        let view = RequestView {
            direction: Direction::Inbound,
            method: "GET",
            authority: "a",
            path: "/",
        };
        assert_eq!(hub.takers(&view).len(), 1);
        assert_eq!(hub.takers(&view).len(), 1);
        assert_eq!(hub.takers(&view).len(), 0, "the limit of 2 is spent");
    }
}
