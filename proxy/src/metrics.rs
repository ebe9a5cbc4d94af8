//! Prometheus metrics of the proxy, served on the admin port's `/metrics`.
//!
//! Names and labels are a contract with the Grafana dashboards and `meshctl`: change them
//! together. Label values are `Arc<str>` so recording a request clones pointers, not strings.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value shared by reference.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Label(pub Arc<str>);

impl Label {
    /// A label from static text, e.g. `"inbound"`.
    pub fn new(text: &str) -> Self {
        Self(Arc::from(text))
    }
}

impl From<String> for Label {
    fn from(text: String) -> Self {
        Self(Arc::from(text))
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

/// Which side of the proxy.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Traffic for the local application.
    Inbound,
    /// Traffic from the local application.
    Outbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// What identifies the traffic of one logical target, shared by every metric about it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// inbound or outbound.
    pub direction: Direction,
    /// The logical authority (service name and port), or the address when unknown.
    pub authority: Label,
    /// The address the traffic was for (original destination or endpoint).
    pub target_addr: Label,
    /// Whether the hop was mutually authenticated: `true` or `false`.
    pub tls: Label,
    /// The client's SPIFFE ID, when it proved one.
    pub client_id: Label,
    /// The server's SPIFFE ID, when it proved one.
    pub server_id: Label,
}

/// A response's labels: the target's plus the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    /// The target.
    #[prometheus(flatten)]
    pub target: TargetLabels,
    /// The HTTP status code.
    pub status_code: u16,
    /// `success` or `failure` (5xx, a non-OK gRPC status, or a proxy error).
    pub classification: Classification,
}

/// Whether a response counts as a success.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Classification {
    /// 1xx-4xx with gRPC OK (or not gRPC).
    Success,
    /// 5xx, a non-OK gRPC status, or an error produced by the proxy.
    Failure,
}

impl EncodeLabelValue for Classification {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::Success => "success",
            Self::Failure => "failure",
        })
    }
}

/// The target labels a response carries: those of its [`TargetMetrics`] (what the services
/// that forward put there, one extension rather than two), or bare [`TargetLabels`] (answers
/// the proxy made itself).
pub fn target_labels(extensions: &http::Extensions) -> Option<&TargetLabels> {
    extensions
        .get::<Arc<TargetMetrics>>()
        .map(|target| &target.labels)
        .or_else(|| extensions.get::<TargetLabels>())
}

/// One target's metrics, looked up once per target rather than once per request: its labels
/// and handles on its series. Recording a request then increments shared atomics instead of
/// hashing six label strings into three families. A handle is the series `/metrics` reports
/// (prometheus-client metrics are shared by clone, and families never drop series); each is
/// created on first use, so the families hold exactly the series they held before.
#[derive(Debug)]
pub struct TargetMetrics {
    /// The target's labels (other layers read them too).
    pub labels: TargetLabels,
    metrics: Arc<Metrics>,
    requests: Counter,
    /// By status and classification; a target sees a handful, so a short list.
    outcomes: Mutex<Vec<Outcome>>,
}

#[derive(Debug)]
struct Outcome {
    status_code: u16,
    classification: Classification,
    latency: Option<Histogram>,
    responses: Option<Counter>,
}

impl TargetMetrics {
    /// Resolves `labels`' series in `metrics`.
    pub fn new(metrics: Arc<Metrics>, labels: TargetLabels) -> Self {
        let requests = metrics.requests.get_or_create(&labels).clone();
        Self {
            labels,
            metrics,
            requests,
            outcomes: Mutex::new(Vec::new()),
        }
    }

    /// Counts a request (`request_total`).
    pub fn request(&self) {
        self.requests.inc();
    }

    /// Observes the time to response headers (`response_latency_ms`).
    pub fn latency(&self, status_code: u16, classification: Classification, elapsed_ms: f64) {
        let mut outcomes = self.outcomes();
        let outcome = outcome(&mut outcomes, status_code, classification);
        outcome
            .latency
            .get_or_insert_with(|| {
                let labels = self.response_labels(status_code, classification);
                self.metrics.response_latency.get_or_create(&labels).clone()
            })
            .observe(elapsed_ms);
    }

    /// Counts a finished response (`response_total`).
    pub fn response(&self, status_code: u16, classification: Classification) {
        let mut outcomes = self.outcomes();
        let outcome = outcome(&mut outcomes, status_code, classification);
        outcome
            .responses
            .get_or_insert_with(|| {
                let labels = self.response_labels(status_code, classification);
                self.metrics.responses.get_or_create(&labels).clone()
            })
            .inc();
    }

    fn outcomes(&self) -> std::sync::MutexGuard<'_, Vec<Outcome>> {
        match self.outcomes.lock() {
            Ok(outcomes) => outcomes,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn response_labels(&self, status_code: u16, classification: Classification) -> ResponseLabels {
        ResponseLabels {
            target: self.labels.clone(),
            status_code,
            classification,
        }
    }
}

/// One route's series, looked up once per route of a plan rather than once per request (as
/// [`TargetMetrics`] for targets): `route_request_total`, `route_response_latency_ms` and
/// `route_response_total` by classification, each created on first use.
#[derive(Debug)]
pub struct RouteMetrics {
    /// The route's labels.
    pub labels: RouteLabels,
    metrics: Arc<Metrics>,
    requests: OnceLock<Counter>,
    latency: OnceLock<Histogram>,
    /// By [`Classification`]: success, then failure.
    responses: [OnceLock<Counter>; 2],
}

impl RouteMetrics {
    /// The series of `labels` in `metrics`.
    pub fn new(metrics: Arc<Metrics>, labels: RouteLabels) -> Self {
        Self {
            labels,
            metrics,
            requests: OnceLock::new(),
            latency: OnceLock::new(),
            responses: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// Counts a request (`route_request_total`).
    pub fn request(&self) {
        self.requests
            .get_or_init(|| {
                self.metrics
                    .route_requests
                    .get_or_create(&self.labels)
                    .clone()
            })
            .inc();
    }

    /// Observes the time to response headers (`route_response_latency_ms`).
    pub fn latency(&self, elapsed_ms: f64) {
        self.latency
            .get_or_init(|| {
                self.metrics
                    .route_latency
                    .get_or_create(&self.labels)
                    .clone()
            })
            .observe(elapsed_ms);
    }

    /// Counts a finished response (`route_response_total`).
    pub fn response(&self, classification: Classification) {
        let index = match classification {
            Classification::Success => 0,
            Classification::Failure => 1,
        };
        self.responses[index]
            .get_or_init(|| {
                let labels = RouteResponseLabels {
                    route: self.labels.clone(),
                    classification,
                };
                self.metrics.route_responses.get_or_create(&labels).clone()
            })
            .inc();
    }
}

/// The entry of one status and classification, added when first seen.
fn outcome(
    outcomes: &mut Vec<Outcome>,
    status_code: u16,
    classification: Classification,
) -> &mut Outcome {
    let index = match outcomes
        .iter()
        .position(|o| o.status_code == status_code && o.classification == classification)
    {
        Some(index) => index,
        None => {
            outcomes.push(Outcome {
                status_code,
                classification,
                latency: None,
                responses: None,
            });
            outcomes.len() - 1
        }
    };
    &mut outcomes[index]
}

/// Errors the proxy produced itself, by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// inbound or outbound.
    pub direction: Direction,
    /// The reason, as in the `mesh-error` header.
    pub reason: Label,
}

/// An egress decision's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    /// The EgressNetwork (`namespace/name`), or `default` for the mesh-wide default.
    pub network: Label,
    /// The host asked for with its port (bounded in number), else the address.
    pub authority: Label,
    /// `http` (counted per request), `tls` or `tcp` (per connection).
    pub protocol: Label,
    /// `allowed` or `denied`.
    pub decision: Label,
}

/// An authorization decision's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// The policy (Server name or `default:<policy>`), or the rate limit's name.
    pub policy: Label,
    /// The application address.
    pub target_addr: Label,
    /// The client's SPIFFE ID, when it proved one.
    pub client_id: Label,
}

/// A retry decision's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// The service the route belongs to: route names such as `default` repeat across services.
    pub authority: Label,
    /// The route.
    pub route: Label,
    /// `retried`, `budget exhausted`, or `buffer full` (sent once, unbuffered, past the retry
    /// buffer caps).
    pub reason: Label,
}

/// A route's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The service.
    pub authority: Label,
    /// The route's name.
    pub route: Label,
}

/// A route's response labels: the route's plus the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResponseLabels {
    /// The route.
    #[prometheus(flatten)]
    pub route: RouteLabels,
    /// `success` or `failure`, classified as `response_total` is.
    pub classification: Classification,
}

/// A backend's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The service the request was sent to.
    pub authority: Label,
    /// The backend its route chose.
    pub backend: Label,
}

/// A listener's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// inbound, outbound or admin.
    pub listener: Label,
}

/// Why a listener refused or closed a connection itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerReasonLabels {
    /// inbound, outbound or admin.
    pub listener: Label,
    /// The limit or timeout that tripped.
    pub reason: Label,
}

/// Latency buckets in milliseconds: fine below 10 ms where a mesh hop lives, coarse above.
const LATENCY_BUCKETS_MS: [f64; 18] = [
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
    2000.0, 5000.0, 10000.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// Every metric of the proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    started: f64,
    /// `request_total`: requests received.
    pub requests: Family<TargetLabels, Counter>,
    /// `response_total`: responses sent, by status and classification.
    pub responses: Family<ResponseLabels, Counter>,
    /// `response_latency_ms`: time from request to response headers.
    pub response_latency: Family<ResponseLabels, Histogram, fn() -> Histogram>,
    /// `tcp_open_total`: connections opened.
    pub tcp_opens: Family<TargetLabels, Counter>,
    /// `tcp_open_connections`: connections open now.
    pub tcp_open_connections: Family<TargetLabels, Gauge>,
    /// `tcp_read_bytes_total`: bytes read from the client side.
    pub tcp_read_bytes: Family<TargetLabels, Counter>,
    /// `tcp_write_bytes_total`: bytes written to the client side.
    pub tcp_write_bytes: Family<TargetLabels, Counter>,
    /// `proxy_error_total`: errors the proxy produced itself (no endpoints, timeouts, ...).
    pub proxy_errors: Family<ErrorLabels, Counter>,
    /// `outbound_egress_total`: requests and connections an egress policy judged.
    pub egress: Family<EgressLabels, Counter>,
    /// `inbound_http_authz_deny_total`: requests refused by policy.
    pub http_authz_denies: Family<AuthzLabels, Counter>,
    /// `inbound_tcp_authz_deny_total`: connections refused by policy.
    pub tcp_authz_denies: Family<AuthzLabels, Counter>,
    /// `inbound_authz_audit_total`: requests and connections admitted only because the policy
    /// audits.
    pub authz_audits: Family<AuthzLabels, Counter>,
    /// `inbound_http_ratelimit_total`: requests refused by a local rate limit.
    pub rate_limited: Family<AuthzLabels, Counter>,
    /// `route_retry_total`: retries by route and outcome.
    pub retries: Family<RetryLabels, Counter>,
    /// `retry_buffered_bytes`: request body bytes held for retries now.
    pub retry_buffered_bytes: Gauge,
    /// `route_request_total`: requests by route.
    pub route_requests: Family<RouteLabels, Counter>,
    /// `route_response_latency_ms`: time from a request to its response headers, by route,
    /// retries and the route's filters included.
    pub route_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// `route_response_total`: responses by route and classification.
    pub route_responses: Family<RouteResponseLabels, Counter>,
    /// `route_fault_injection_total`: requests failed or delayed on purpose.
    pub fault_injections: Family<RouteLabels, Counter>,
    /// `endpoint_ejection_total`: endpoints ejected by failure accrual.
    pub ejections: Family<RouteLabels, Counter>,
    /// `backend_concurrency_overflow_total`: requests refused because their backend had its
    /// limit of requests in flight.
    pub concurrency_overflows: Family<BackendLabels, Counter>,
    /// `backend_in_flight`: requests holding a slot of their backend's concurrency limit now.
    pub backend_in_flight: Family<BackendLabels, Gauge>,
    /// `listener_connections_open`: connections each listener serves now.
    pub listener_open: Family<ListenerLabels, Gauge>,
    /// `listener_connections_idle`: HTTP/1 keep-alive connections parked between requests,
    /// holding no buffers.
    pub listener_idle: Family<ListenerLabels, Gauge>,
    /// `listener_connections_refused_total`: connections closed at accept (connection limit).
    pub listener_refused: Family<ListenerReasonLabels, Counter>,
    /// `connection_timeout_total`: connections closed because a peer was too slow (header
    /// read, TLS handshake, transport header, idle TCP).
    pub connection_timeouts: Family<ListenerReasonLabels, Counter>,
    /// `trace_spans_dropped_total`: spans not exported (queue full or collector failing).
    pub spans_dropped: Counter,
    /// `identity_cert_expiry_timestamp_seconds`: when the current certificate expires.
    pub identity_expiry: Gauge,
    /// `identity_cert_renewals_total`: certificates obtained.
    pub identity_renewals: Counter,
    /// `identity_cert_renewal_failures_total`: failed certificate requests.
    pub identity_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        registry.register("request", "Requests received", requests.clone());
        let responses = Family::default();
        registry.register("response", "Responses sent", responses.clone());
        let response_latency =
            Family::<ResponseLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "response_latency_ms",
            "Time from a request to its response headers, in milliseconds",
            response_latency.clone(),
        );
        let tcp_opens = Family::default();
        registry.register("tcp_open", "TCP connections opened", tcp_opens.clone());
        let tcp_open_connections = Family::default();
        registry.register(
            "tcp_open_connections",
            "TCP connections open now",
            tcp_open_connections.clone(),
        );
        let tcp_read_bytes = Family::default();
        registry.register(
            "tcp_read_bytes",
            "Bytes read from the client side of TCP connections",
            tcp_read_bytes.clone(),
        );
        let tcp_write_bytes = Family::default();
        registry.register(
            "tcp_write_bytes",
            "Bytes written to the client side of TCP connections",
            tcp_write_bytes.clone(),
        );
        let proxy_errors = Family::default();
        registry.register(
            "proxy_error",
            "Errors produced by the proxy itself, by reason",
            proxy_errors.clone(),
        );
        let egress = Family::default();
        registry.register(
            "outbound_egress",
            "Requests (HTTP) and connections (TLS, TCP) to destinations outside the mesh that \
             an EgressNetwork or the mesh-wide default covers, by network, host and decision",
            egress.clone(),
        );
        let http_authz_denies = Family::default();
        registry.register(
            "inbound_http_authz_deny",
            "HTTP requests refused by the inbound policy",
            http_authz_denies.clone(),
        );
        let tcp_authz_denies = Family::default();
        registry.register(
            "inbound_tcp_authz_deny",
            "TCP connections refused by the inbound policy",
            tcp_authz_denies.clone(),
        );
        let authz_audits = Family::default();
        registry.register(
            "inbound_authz_audit",
            "Requests and connections an audit-mode policy would have refused",
            authz_audits.clone(),
        );
        let rate_limited = Family::default();
        registry.register(
            "inbound_http_ratelimit",
            "HTTP requests refused by a local rate limit",
            rate_limited.clone(),
        );
        let retries = Family::default();
        registry.register(
            "route_retry",
            "Retries by route and outcome",
            retries.clone(),
        );
        let retry_buffered_bytes = Gauge::default();
        registry.register(
            "retry_buffered_bytes",
            "Request body bytes held for retries now, within MESH_PROXY_RETRY_BUFFER_BYTES",
            retry_buffered_bytes.clone(),
        );
        let route_requests = Family::default();
        registry.register("route_request", "Requests by route", route_requests.clone());
        let route_latency =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "route_response_latency_ms",
            "Time from a request to its response headers by route, retries included, in milliseconds",
            route_latency.clone(),
        );
        let route_responses = Family::default();
        registry.register(
            "route_response",
            "Responses by route and classification",
            route_responses.clone(),
        );
        let fault_injections = Family::default();
        registry.register(
            "route_fault_injection",
            "Requests failed or delayed on purpose by a route's fault injection",
            fault_injections.clone(),
        );
        let ejections = Family::default();
        registry.register(
            "endpoint_ejection",
            "Endpoints ejected by failure accrual (circuit breaking)",
            ejections.clone(),
        );
        let concurrency_overflows = Family::default();
        registry.register(
            "backend_concurrency_overflow",
            "Requests refused because their backend had its limit of requests in flight",
            concurrency_overflows.clone(),
        );
        let backend_in_flight = Family::default();
        registry.register(
            "backend_in_flight",
            "Requests in flight to backends that have a concurrency limit",
            backend_in_flight.clone(),
        );
        let listener_open = Family::default();
        registry.register(
            "listener_connections_open",
            "Connections each listener serves now",
            listener_open.clone(),
        );
        let listener_idle = Family::default();
        registry.register(
            "listener_connections_idle",
            "HTTP/1 keep-alive connections parked between requests, holding no buffers",
            listener_idle.clone(),
        );
        let listener_refused = Family::default();
        registry.register(
            "listener_connections_refused",
            "Connections a listener closed as soon as it accepted them, by reason",
            listener_refused.clone(),
        );
        let connection_timeouts = Family::default();
        registry.register(
            "connection_timeout",
            "Connections closed because the peer was too slow, by listener and timeout",
            connection_timeouts.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Spans dropped because the export queue was full or the collector failed",
            spans_dropped.clone(),
        );
        let identity_expiry = Gauge::default();
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "When the proxy's current certificate expires, in seconds since the Unix epoch",
            identity_expiry.clone(),
        );
        let identity_renewals = Counter::default();
        registry.register(
            "identity_cert_renewals",
            "Certificates obtained from the identity service",
            identity_renewals.clone(),
        );
        let identity_failures = Counter::default();
        registry.register(
            "identity_cert_renewal_failures",
            "Failed certificate requests",
            identity_failures.clone(),
        );
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        Self {
            registry,
            started,
            requests,
            responses,
            response_latency,
            tcp_opens,
            tcp_open_connections,
            tcp_read_bytes,
            tcp_write_bytes,
            proxy_errors,
            egress,
            http_authz_denies,
            tcp_authz_denies,
            authz_audits,
            rate_limited,
            retries,
            retry_buffered_bytes,
            route_requests,
            route_latency,
            route_responses,
            fault_injections,
            ejections,
            concurrency_overflows,
            backend_in_flight,
            listener_open,
            listener_idle,
            listener_refused,
            connection_timeouts,
            spans_dropped,
            identity_expiry,
            identity_renewals,
            identity_failures,
        }
    }

    /// Counts an error the proxy produced.
    pub fn proxy_error(&self, direction: Direction, reason: &'static str) {
        self.proxy_errors
            .get_or_create(&ErrorLabels {
                direction,
                reason: Label::new(reason),
            })
            .inc();
    }

    /// The gauge of `listener`'s open connections.
    pub fn listener_open(&self, listener: &'static str) -> Gauge {
        self.listener_open
            .get_or_create(&ListenerLabels {
                listener: Label::new(listener),
            })
            .clone()
    }

    /// The gauge of `listener`'s parked HTTP/1 connections.
    pub fn listener_idle(&self, listener: &'static str) -> Gauge {
        self.listener_idle
            .get_or_create(&ListenerLabels {
                listener: Label::new(listener),
            })
            .clone()
    }

    /// Counts a connection `listener` closed at accept.
    pub fn listener_refused(&self, listener: &'static str, reason: &'static str) {
        self.listener_refused
            .get_or_create(&ListenerReasonLabels {
                listener: Label::new(listener),
                reason: Label::new(reason),
            })
            .inc();
    }

    /// Counts a connection closed because its peer was too slow.
    pub fn connection_timeout(&self, listener: &'static str, timeout: &'static str) {
        self.connection_timeouts
            .get_or_create(&ListenerReasonLabels {
                listener: Label::new(listener),
                reason: Label::new(timeout),
            })
            .inc();
    }

    /// Counts a retry decision on `route`.
    pub fn retry(&self, authority: &Label, route: &str, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                authority: authority.clone(),
                route: Label::new(route),
                reason: Label::new(reason),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric, process metrics included.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).is_err() {
            out.push_str("# error encoding metrics\n");
        }
        encode_process_metrics(&mut out, self.started);
        out.push_str("# EOF\n");
        out
    }
}

/// Process metrics read from /proc at scrape time. Hand-written because prometheus-client has
/// no process collector and these are a few lines of /proc parsing.
fn encode_process_metrics(out: &mut String, started: f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok());
    if let Some(kib) = rss_kib {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             process_resident_memory_bytes {}",
            kib * 1024
        );
    }
    // Fields 14 and 15 of /proc/self/stat are user and system time in clock ticks; Linux
    // reports them at USER_HZ, which is 100 on every architecture we build for.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    if let (Some(utime), Some(stime)) = (
        fields.get(11).and_then(|v| v.parse::<u64>().ok()),
        fields.get(12).and_then(|v| v.parse::<u64>().ok()),
    ) {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds counter\n\
             process_cpu_seconds_total {}",
            (utime + stime) as f64 / 100.0
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\n\
             process_open_fds {}",
            fds.count()
        );
    }
    let _ = writeln!(
        out,
        "# HELP process_start_time_seconds Start time of the process since the Unix epoch.\n\
         # TYPE process_start_time_seconds gauge\n\
         process_start_time_seconds {started}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_metrics_record_into_the_families_series_created_on_first_use() {
        let metrics = Arc::new(Metrics::new());
        let labels = TargetLabels {
            direction: Direction::Inbound,
            authority: Label::new("web:80"),
            target_addr: Label::new("127.0.0.1:8080"),
            tls: Label::new("true"),
            client_id: Label::new("spiffe://cluster.local/ns/a/sa/b"),
            server_id: Label::new("spiffe://cluster.local/ns/a/sa/c"),
        };
        let target = TargetMetrics::new(metrics.clone(), labels.clone());
        // A response counted as a failure at its end but not at its headers (a gRPC status
        // in trailers) has its latency under success and its count under failure only.
        for _ in 0..2 {
            target.request();
            target.latency(200, Classification::Success, 1.5);
            target.response(200, Classification::Failure);
        }
        let text = metrics.encode();
        let series = |name: &str, class: &str| {
            text.lines()
                .filter(|l| {
                    l.starts_with(name) && l.contains(&format!("classification=\"{class}\""))
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert!(
            text.contains("request_total{direction=\"inbound\",authority=\"web:80\",target_addr=\"127.0.0.1:8080\",tls=\"true\",client_id=\"spiffe://cluster.local/ns/a/sa/b\",server_id=\"spiffe://cluster.local/ns/a/sa/c\"} 2"),
            "{text}"
        );
        assert_eq!(series("response_total", "failure").len(), 1, "{text}");
        assert!(
            series("response_total", "failure")[0].ends_with(" 2"),
            "{text}"
        );
        assert!(series("response_total", "success").is_empty(), "{text}");
        assert!(
            series("response_latency_ms_count", "success")[0].ends_with(" 2"),
            "{text}"
        );
        assert!(
            series("response_latency_ms_count", "failure").is_empty(),
            "{text}"
        );
        // A second handle on the same labels shares the series.
        TargetMetrics::new(metrics.clone(), labels).request();
        assert!(
            metrics
                .encode()
                .contains("server_id=\"spiffe://cluster.local/ns/a/sa/c\"} 3")
        );
    }

    #[test]
    fn exposition_has_the_documented_names_and_labels() {
        let metrics = Metrics::new();
        let target = TargetLabels {
            direction: Direction::Outbound,
            authority: Label::new("books.shop.svc.cluster.local:8080"),
            target_addr: Label::new("10.96.0.10:8080"),
            tls: Label::new("false"),
            client_id: Label::default(),
            server_id: Label::default(),
        };
        metrics.requests.get_or_create(&target).inc();
        let response = ResponseLabels {
            target: target.clone(),
            status_code: 503,
            classification: Classification::Failure,
        };
        metrics.responses.get_or_create(&response).inc();
        metrics
            .response_latency
            .get_or_create(&response)
            .observe(2.5);
        metrics.tcp_opens.get_or_create(&target).inc();
        metrics.proxy_error(Direction::Outbound, "no endpoints");
        let text = metrics.encode();
        for want in [
            "request_total{direction=\"outbound\",authority=\"books.shop.svc.cluster.local:8080\",target_addr=\"10.96.0.10:8080\",tls=\"false\",client_id=\"\",server_id=\"\"} 1",
            "response_total{direction=\"outbound\",authority=\"books.shop.svc.cluster.local:8080\",target_addr=\"10.96.0.10:8080\",tls=\"false\",client_id=\"\",server_id=\"\",status_code=\"503\",classification=\"failure\"} 1",
            "response_latency_ms_bucket{",
            "tcp_open_total{",
            "proxy_error_total{direction=\"outbound\",reason=\"no endpoints\"} 1",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
