//! Access logs: off by default; with `MESH_PROXY_ACCESS_LOG=json|apache`, one line per request
//! on stdout when its response headers are sent (time, method, authority, path, status,
//! latency, response size when known, client and server identity, trace id).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::future::Either;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use tower::{Layer, Service};

use crate::metrics::{Direction, target_labels};

/// The access log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// Apache's combined log format, with the identities appended.
    Apache,
}

impl std::str::FromStr for AccessLogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "json" => Ok(Self::Json),
            "apache" => Ok(Self::Apache),
            other => Err(format!("{other:?} is not json or apache")),
        }
    }
}

/// Adds access logging to a service.
#[derive(Clone, Copy, Debug)]
pub struct AccessLogLayer {
    format: Option<AccessLogFormat>,
    direction: Direction,
}

impl AccessLogLayer {
    /// Logs in `format` (None: off).
    pub fn new(format: Option<AccessLogFormat>, direction: Direction) -> Self {
        Self { format, direction }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLog {
            inner,
            layer: *self,
        }
    }
}

/// See [`AccessLogLayer`].
#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
    layer: AccessLogLayer,
}

/// What one line says.
#[derive(Debug, serde::Serialize)]
pub struct Entry {
    /// RFC 3339 UTC time the request arrived.
    pub time: String,
    /// inbound or outbound.
    pub direction: &'static str,
    /// The method.
    pub method: String,
    /// The authority.
    pub authority: String,
    /// The path and query.
    pub path: String,
    /// The response status.
    pub status: u16,
    /// Milliseconds until the response headers.
    pub latency_ms: f64,
    /// The response body size, when known in advance.
    pub response_bytes: Option<u64>,
    /// The client's SPIFFE ID.
    pub client_id: String,
    /// The server's SPIFFE ID.
    pub server_id: String,
    /// The W3C trace id, when the request carries one.
    pub trace_id: String,
    /// The client's user agent.
    pub user_agent: String,
}

impl Entry {
    /// The line in `format`.
    pub fn line(&self, format: AccessLogFormat) -> String {
        match format {
            AccessLogFormat::Json => serde_json::to_string(self).unwrap_or_default(),
            AccessLogFormat::Apache => format!(
                "- - - [{}] \"{} {} HTTP\" {} {} \"-\" \"{}\" authority={} latency_ms={:.3} client_id={} server_id={} trace_id={}",
                self.time,
                self.method,
                self.path,
                self.status,
                self.response_bytes
                    .map_or_else(|| "-".to_string(), |b| b.to_string()),
                self.user_agent,
                self.authority,
                self.latency_ms,
                dash(&self.client_id),
                dash(&self.server_id),
                dash(&self.trace_id),
            ),
        }
    }
}

fn dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// The trace id of a W3C `traceparent` header (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id<B>(request: &Request<B>) -> String {
    request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| id.len() == 32)
        .unwrap_or("")
        .to_string()
}

/// Formats a time as RFC 3339 UTC with milliseconds. Hand-written: it is the only date
/// formatting the proxy does, and the civil-from-days conversion is a few lines.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

impl<S, B> Service<Request<Incoming>> for AccessLog<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = Response<B>;
    type Error = Infallible;
    /// The inner future as is when access logging is off (no allocation per request for a
    /// layer that does nothing), boxed when on.
    type Future =
        Either<S::Future, Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let Some(format) = self.layer.format else {
            return Either::Left(self.inner.call(request));
        };
        let started = Instant::now();
        let mut entry = Entry {
            time: rfc3339(SystemTime::now()),
            direction: self.layer.direction.as_str(),
            method: request.method().to_string(),
            authority: crate::outbound::request_authority(&request).unwrap_or_default(),
            path: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            status: 0,
            latency_ms: 0.0,
            response_bytes: None,
            client_id: String::new(),
            server_id: String::new(),
            trace_id: trace_id(&request),
            user_agent: request
                .headers()
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        };
        let response = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let response = response.await?;
            entry.status = response.status().as_u16();
            entry.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            entry.response_bytes = response.body().size_hint().exact();
            if let Some(labels) = target_labels(response.extensions()) {
                entry.client_id = labels.client_id.0.to_string();
                entry.server_id = labels.server_id.0.to_string();
            }
            let mut line = entry.line(format);
            line.push('\n');
            // stdout is the log's destination by contract; a closed stdout must not fail requests.
            let _ = std::io::stdout().lock().write_all(line.as_bytes());
            Ok(response)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        let time = UNIX_EPOCH + std::time::Duration::from_millis(1_764_590_400_123);
        assert_eq!(rfc3339(time), "2025-12-01T12:00:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn json_lines_carry_every_field() {
        let entry = Entry {
            time: "2026-12-01T13:00:00.000Z".into(),
            direction: "inbound",
            method: "GET".into(),
            authority: "books.shop:8080".into(),
            path: "/books?page=2".into(),
            status: 200,
            latency_ms: 1.5,
            response_bytes: Some(1024),
            client_id: "spiffe://cluster.local/ns/shop/sa/web".into(),
            server_id: "spiffe://cluster.local/ns/shop/sa/books".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            user_agent: "curl/7.88".into(),
        };
        let parsed: serde_json::Value =
            serde_json::from_str(&entry.line(AccessLogFormat::Json)).expect("valid JSON");
        for field in [
            "time",
            "direction",
            "method",
            "authority",
            "path",
            "status",
            "latency_ms",
            "response_bytes",
            "client_id",
            "server_id",
            "trace_id",
        ] {
            assert!(parsed.get(field).is_some(), "missing {field}");
        }
        let apache = entry.line(AccessLogFormat::Apache);
        assert!(
            apache.contains("\"GET /books?page=2 HTTP\" 200 1024"),
            "{apache}"
        );
        assert!(apache.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn trace_ids_come_from_traceparent() {
        let request = Request::builder()
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(())
            .expect("request");
        assert_eq!(trace_id(&request), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id(&Request::new(())), "");
    }
}
