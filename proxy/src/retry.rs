//! Retries: which failures are retried, a budget that keeps retries from multiplying load, and
//! the tower layer that replays a buffered request.
//!
//! A request is retried only when its route asks for it, its body fits the bound (bodies are
//! buffered to be replayed; larger ones pass through once), the bytes buffered for retries stay
//! within the proxy's and the connection's caps (past them the request passes through once),
//! the failure matches the route's conditions, the per-request limit allows, and the route's
//! budget has a token.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, Service, ServiceExt};
use tracing::debug;

use crate::http::{ProxyBody, ProxyErrorKind, ReqBody};
use crate::metrics::Metrics;
use crate::outbound::{Dispatch, DispatchTarget};
use crate::route::RouteParams;

/// Which failures are retried.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryConditions {
    five_xx: bool,
    gateway_error: bool,
    connect_failure: bool,
    reset: bool,
    statuses: Vec<u16>,
    grpc_codes: Vec<u32>,
}

/// gRPC status codes by their lower-case names.
const GRPC_CODES: &[(&str, u32)] = &[
    ("cancelled", 1),
    ("unknown", 2),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

impl RetryConditions {
    /// Parses `5xx`, `gateway-error`, `connect-failure`, `reset`, status codes and gRPC code
    /// names (`unavailable`, `deadline-exceeded`, ...).
    pub fn parse(conditions: &[String]) -> Result<Self, String> {
        let mut parsed = Self::default();
        for condition in conditions {
            let condition = condition.trim().to_ascii_lowercase().replace('_', "-");
            match condition.as_str() {
                "5xx" => parsed.five_xx = true,
                "gateway-error" => parsed.gateway_error = true,
                "connect-failure" => parsed.connect_failure = true,
                "reset" => parsed.reset = true,
                other => {
                    if let Ok(status) = other.parse::<u16>()
                        && (100..600).contains(&status)
                    {
                        parsed.statuses.push(status);
                    } else if let Some((_, code)) =
                        GRPC_CODES.iter().find(|(name, _)| *name == other)
                    {
                        parsed.grpc_codes.push(*code);
                    } else {
                        return Err(format!(
                            "{other:?} is not a retry condition (5xx, gateway-error, connect-failure, reset, a status code, or a gRPC code name)"
                        ));
                    }
                }
            }
        }
        Ok(parsed)
    }

    /// Whether a response calls for a retry.
    pub fn should_retry(&self, response: &Response<ProxyBody>) -> bool {
        let status = response.status();
        let proxy_error = response.extensions().get::<ProxyErrorKind>();
        if let Some(kind) = proxy_error {
            match kind {
                ProxyErrorKind::ConnectFailed if self.connect_failure || self.gateway_error => {
                    return true;
                }
                ProxyErrorKind::Upstream if self.reset => return true,
                _ => {}
            }
        }
        if self.five_xx && status.is_server_error() {
            return true;
        }
        if self.gateway_error
            && matches!(
                status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            )
        {
            return true;
        }
        if self.statuses.contains(&status.as_u16()) {
            return true;
        }
        if !self.grpc_codes.is_empty()
            && let Some(code) = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
        {
            return self.grpc_codes.contains(&code);
        }
        false
    }
}

/// A route's retry settings.
#[derive(Debug)]
pub struct RetryParams {
    /// Which failures are retried.
    pub conditions: RetryConditions,
    /// Retries per request, at most.
    pub limit: u32,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<Duration>,
    /// Bodies above this are not buffered, so not retried.
    pub max_body_bytes: usize,
    /// The route's budget.
    pub budget: Arc<RetryBudget>,
}

/// Seconds of history a budget keeps, at most; longer TTLs are capped.
const BUDGET_SLOTS: usize = 60;

/// A retry budget over a sliding window of one-second slots: retries allowed =
/// `min_per_second x window + ratio x requests in the window`. Lock-free: requests deposit
/// into the current slot with atomics.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f32,
    min_per_second: u32,
    window: u64,
    started: Instant,
    slots: Vec<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    /// A budget of `ratio` retries per request plus `min_per_second`, over `ttl`.
    pub fn new(ratio: f32, min_per_second: u32, ttl: Duration) -> Self {
        let window = ttl.as_secs().clamp(1, BUDGET_SLOTS as u64);
        Self {
            ratio,
            min_per_second,
            window,
            started: Instant::now(),
            slots: (0..BUDGET_SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    fn slot(&self, now: Instant) -> &Slot {
        // Seconds are counted from 1 so a zeroed slot is never mistaken for the current one.
        let second = now.duration_since(self.started).as_secs() + 1;
        let slot = &self.slots[(second % BUDGET_SLOTS as u64) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != second
            && slot
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
        }
        slot
    }

    /// Counts an original request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    fn deposit_at(&self, now: Instant) {
        self.slot(now).requests.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes a retry token; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(Instant::now())
    }

    fn withdraw_at(&self, now: Instant) -> bool {
        let current = now.duration_since(self.started).as_secs() + 1;
        let (mut requests, mut retries) = (0u64, 0u64);
        for slot in &self.slots {
            let second = slot.second.load(Ordering::Acquire);
            if second != 0 && second + self.window > current && second <= current {
                requests += u64::from(slot.requests.load(Ordering::Acquire));
                retries += u64::from(slot.retries.load(Ordering::Acquire));
            }
        }
        // Floored: the f32 ratio widened to f64 is a hair above its decimal value.
        let allowed = (f64::from(self.min_per_second) * self.window as f64
            + f64::from(self.ratio) * requests as f64)
            .floor();
        if (retries as f64) < allowed {
            self.slot(now).retries.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }
}

/// A cap on the request bytes held for retries, shared by whoever buffers under it: one for
/// the whole proxy, one per client connection. Without it any client could make the proxy hold
/// `max_body_bytes` per request in flight (8 HTTP/2 connections of 1,000 streams held 706 MB).
#[derive(Debug)]
pub struct BufferCap {
    used: AtomicUsize,
    limit: usize,
    /// Reports `used` (the proxy-wide cap's is `retry_buffered_bytes`).
    gauge: Gauge,
}

impl BufferCap {
    /// A cap of `limit` bytes, reporting what it holds in `gauge`.
    pub fn new(limit: usize, gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
            gauge,
        })
    }

    /// Reserves `bytes`, released when the reservation drops; None when they do not fit.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let before = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .ok()?;
        self.report(before + bytes);
        Some(Reservation {
            cap: self.clone(),
            bytes,
        })
    }

    fn report(&self, used: usize) {
        self.gauge.set(i64::try_from(used).unwrap_or(i64::MAX));
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes held under a [`BufferCap`] until dropped.
#[derive(Debug)]
struct Reservation {
    cap: Arc<BufferCap>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let before = self.cap.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.cap.report(before - self.bytes);
    }
}

/// The endpoints the earlier attempts of a request went to, shared by its attempts: a retry
/// goes to another endpoint while there is one (Envoy's previous-hosts predicate), since the
/// endpoint that just failed is the likeliest to fail again.
#[derive(Debug, Default)]
pub struct TriedEndpoints(std::sync::Mutex<Vec<std::net::SocketAddr>>);

impl TriedEndpoints {
    /// Records an attempt's endpoint.
    pub fn push(&self, addr: std::net::SocketAddr) {
        self.lock().push(addr);
    }

    /// The endpoints tried so far.
    pub fn list(&self) -> Vec<std::net::SocketAddr> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<std::net::SocketAddr>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The route chosen for a request, put in its extensions by the router for the layers below.
#[derive(Clone, Debug)]
pub struct RouteInfo(pub Arc<RouteParams>);

/// Adds retries to the service of one client connection.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    metrics: Arc<Metrics>,
    proxy_cap: Arc<BufferCap>,
    connection_cap: Arc<BufferCap>,
}

impl RetryLayer {
    /// Counts retries in `metrics`; buffers within the proxy's cap and a new cap of
    /// `connection_bytes` for this connection.
    pub fn new(metrics: Arc<Metrics>, proxy_cap: Arc<BufferCap>, connection_bytes: usize) -> Self {
        Self {
            metrics,
            proxy_cap,
            connection_cap: BufferCap::new(connection_bytes, Gauge::default()),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            metrics: self.metrics.clone(),
            caps: [self.connection_cap.clone(), self.proxy_cap.clone()],
        }
    }
}

/// See [`RetryLayer`].
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    metrics: Arc<Metrics>,
    /// The connection's cap, then the proxy's.
    caps: [Arc<BufferCap>; 2],
}

impl<S> Service<Request<ReqBody>> for Retry<S>
where
    S: Service<Request<ReqBody>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let route = request.extensions().get::<RouteInfo>().cloned();
        match route {
            Some(route) if route.0.retry.is_some() => self.buffered(request, route),
            _ if unsent_replayable(&request) => self.replay_unsent(request),
            _ => Box::pin(self.inner.call(request)),
        }
    }
}

impl<S> Retry<S>
where
    S: Service<Request<ReqBody>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// The route's retries: the body buffered within the caps, replayed on the route's
    /// conditions within its budget.
    fn buffered(&mut self, request: Request<ReqBody>, route: RouteInfo) -> BoxFuture {
        let Some(retry) = route.0.retry.as_ref() else {
            return Box::pin(self.inner.call(request));
        };
        retry.budget.deposit();
        let max_body = retry.max_body_bytes;
        let Some(body_bytes) = request
            .body()
            .size_hint()
            .upper()
            .and_then(|upper| usize::try_from(upper).ok())
            .filter(|upper| *upper <= max_body)
        else {
            debug!(route = %route.0.name, "body too large or unknown to replay; not retrying");
            return Box::pin(self.inner.call(request));
        };
        let authority = authority_of(&request);
        let [connection_cap, proxy_cap] = &self.caps;
        let Some(held) = connection_cap
            .reserve(body_bytes)
            .and_then(|connection| Some((connection, proxy_cap.reserve(body_bytes)?)))
        else {
            self.metrics.retry(&authority, &route.0.name, "buffer full");
            debug!(route = %route.0.name, body_bytes, "retry buffers full; sending once, unbuffered");
            return Box::pin(self.inner.call(request));
        };
        let inner = self.inner.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            // Held until the last attempt has its response: the buffered body lives that long.
            let _held = held;
            let retry = match route.0.retry.as_ref() {
                Some(retry) => retry,
                None => return inner.oneshot(request).await,
            };
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(Arc::new(TriedEndpoints::default()));
            let body = match Limited::new(body, retry.max_body_bytes).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let error = crate::http::ProxyError::BadRequest(format!(
                        "reading the request body: {error}"
                    ));
                    return Ok(error.to_response(false));
                }
            };
            let build =
                |body: Bytes| Request::from_parts(parts.clone(), Either::Right(Full::new(body)));
            let mut attempt = 0;
            let mut unsent_retried = false;
            loop {
                let response = inner.clone().oneshot(build(body.clone())).await?;
                // One attempt that never reached the application is replayed for free.
                if !unsent_retried && never_reached_the_app(&response) {
                    unsent_retried = true;
                    metrics.retry(&authority, &route.0.name, "connect failure");
                    continue;
                }
                if attempt >= retry.limit || !retry.conditions.should_retry(&response) {
                    return Ok(response);
                }
                if !retry.budget.withdraw() {
                    metrics.retry(&authority, &route.0.name, "budget exhausted");
                    return Ok(response);
                }
                metrics.retry(&authority, &route.0.name, "retried");
                attempt += 1;
            }
        })
    }

    /// A request without a body and without a retry policy: when its attempt never reached the
    /// application (a refused connection, ours or the peer proxy's), it is sent once more, to
    /// another endpoint. Nothing was processed, so this is safe for any method; it is what
    /// keeps a replica's restart or a proxy's drain from failing requests while other replicas
    /// are up.
    fn replay_unsent(&mut self, request: Request<ReqBody>) -> BoxFuture {
        let inner = self.inner.clone();
        let metrics = self.metrics.clone();
        let authority = authority_of(&request);
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(Arc::new(TriedEndpoints::default()));
            let first = Request::from_parts(parts.clone(), body);
            let response = inner.clone().oneshot(first).await?;
            if !never_reached_the_app(&response) {
                return Ok(response);
            }
            let route = parts
                .extensions
                .get::<RouteInfo>()
                .map(|route| route.0.name.clone())
                .unwrap_or_default();
            metrics.retry(&authority, &route, "connect failure");
            inner
                .oneshot(Request::from_parts(parts, Either::Right(Full::default())))
                .await
        })
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// The logical service of a routed request, for the retry metric.
fn authority_of(request: &Request<ReqBody>) -> crate::metrics::Label {
    request
        .extensions()
        .get::<Arc<Dispatch>>()
        .map(|dispatch| dispatch.logical.clone())
        .unwrap_or_default()
}

/// Whether an attempt failed before the request reached any application: the connection to
/// the endpoint (or the peer proxy's to its application) was refused.
fn never_reached_the_app(response: &Response<ProxyBody>) -> bool {
    response.extensions().get::<ProxyErrorKind>() == Some(&ProxyErrorKind::ConnectFailed)
}

/// Whether a request can be sent again without buffering anything (it has no body and is no
/// upgrade) and has another endpoint to go to (its service has two or more).
fn unsent_replayable(request: &Request<ReqBody>) -> bool {
    request.body().size_hint().exact() == Some(0)
        && !crate::http::is_upgrade(request)
        && request
            .extensions()
            .get::<Arc<Dispatch>>()
            .is_some_and(|dispatch| match &dispatch.target {
                DispatchTarget::Balanced(resolution) => resolution.balancer.len() >= 2,
                DispatchTarget::Direct(_) => false,
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_and_refuse_unknown_ones() {
        let conditions = RetryConditions::parse(&[
            "5xx".into(),
            "connect-failure".into(),
            "429".into(),
            "UNAVAILABLE".into(),
        ])
        .expect("valid");
        assert!(conditions.five_xx && conditions.connect_failure);
        assert_eq!(conditions.statuses, vec![429]);
        assert_eq!(conditions.grpc_codes, vec![14]);
        let error = RetryConditions::parse(&["sometimes".into()]).expect_err("unknown");
        assert!(error.contains("sometimes"));
    }

    fn response(status: u16, grpc: Option<&str>) -> Response<ProxyBody> {
        let mut response = Response::new(Either::Right(Full::default()));
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        if let Some(code) = grpc {
            response
                .headers_mut()
                .insert("grpc-status", code.parse().expect("value"));
        }
        response
    }

    #[test]
    fn responses_are_classified_for_retry() {
        let five_xx = RetryConditions::parse(&["5xx".into()]).expect("valid");
        assert!(five_xx.should_retry(&response(500, None)));
        assert!(!five_xx.should_retry(&response(404, None)));
        let gateway = RetryConditions::parse(&["gateway-error".into()]).expect("valid");
        assert!(gateway.should_retry(&response(503, None)));
        assert!(!gateway.should_retry(&response(500, None)));
        let grpc = RetryConditions::parse(&["unavailable".into()]).expect("valid");
        assert!(grpc.should_retry(&response(200, Some("14"))));
        assert!(!grpc.should_retry(&response(200, Some("5"))));
        let mut refused = response(502, None);
        refused
            .extensions_mut()
            .insert(ProxyErrorKind::ConnectFailed);
        let connect = RetryConditions::parse(&["connect-failure".into()]).expect("valid");
        assert!(connect.should_retry(&refused));
        assert!(!connect.should_retry(&response(502, None)));
    }

    #[test]
    fn buffer_caps_hold_what_fits_and_release_on_drop() {
        let gauge = Gauge::default();
        let cap = BufferCap::new(100, gauge.clone());
        let first = cap.reserve(60).expect("fits");
        assert!(cap.reserve(50).is_none(), "60 + 50 > 100");
        let second = cap.reserve(40).expect("exactly fills the cap");
        assert_eq!(cap.used(), 100);
        assert_eq!(gauge.get(), 100);
        drop(first);
        assert_eq!(cap.used(), 40);
        assert!(cap.reserve(60).is_some());
        drop(second);
        assert_eq!(cap.used(), 0);
        assert_eq!(gauge.get(), 0);
        assert!(cap.reserve(usize::MAX).is_none(), "no overflow");
    }

    #[test]
    fn the_budget_allows_the_minimum_plus_the_ratio() {
        let budget = RetryBudget::new(0.2, 1, Duration::from_secs(10));
        let now = Instant::now();
        // 10 s x 1/s minimum = 10 retries with no traffic at all.
        let free = (0..100).filter(|_| budget.withdraw_at(now)).count();
        assert_eq!(free, 10);
        // 100 requests add 20 more.
        for _ in 0..100 {
            budget.deposit_at(now);
        }
        let more = (0..100).filter(|_| budget.withdraw_at(now)).count();
        assert_eq!(more, 20);
        // Once the window has passed, the old retries no longer count.
        let later = now + Duration::from_secs(11);
        assert!(budget.withdraw_at(later));
    }
}
