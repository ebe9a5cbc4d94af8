//! HTTP pieces shared by the inbound and outbound sides: the body type, the responses the proxy
//! produces itself, and header hygiene.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::client::UpstreamBody;

/// The body of every response the proxy returns: the peer's, or one it wrote itself.
pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;

/// The body of every request the proxy sends: the client's, streamed, or a buffered copy
/// (retries, mirrors).
pub type ReqBody = Either<Incoming, Full<Bytes>>;

/// Marks a response the proxy produced itself, for the layers above (retries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyErrorKind {
    /// Connecting failed: the request never reached the server, so retrying is safe.
    ConnectFailed,
    /// The exchange failed after connecting.
    Upstream,
    /// Any other error the proxy produced.
    Other,
}

/// The header naming why the proxy itself answered a request.
pub const MESH_ERROR: HeaderName = HeaderName::from_static("mesh-error");

/// Why the proxy could not forward a request. Each maps to a status and a `mesh-error` reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The service is known but has no ready endpoints.
    NoEndpoints(String),
    /// Connecting to the endpoint failed (refused, unreachable, timed out).
    ConnectFailed(String),
    /// The endpoint accepted but the exchange failed (reset, protocol error).
    Upstream(String),
    /// The response did not arrive in time.
    Timeout(String),
    /// The request can't be routed (no authority, bad target).
    BadRequest(String),
    /// Discovery has not answered and there is no address to fall back to.
    DiscoveryUnavailable(String),
    /// The inbound policy does not admit the client.
    Unauthorized(String),
    /// The port has HTTPRoutes and none matches the request.
    NoRoute(String),
    /// A local rate limit is exceeded; retry after this long.
    RateLimited(String, std::time::Duration),
    /// The backend already has its limit of requests in flight (the overflow circuit breaker).
    Overloaded(String),
    /// The request names one of a proxy's own listeners, which nothing forwarded may reach.
    ProxyPort(String),
    /// The destination is outside the mesh and its EgressNetwork (or the mesh-wide default)
    /// does not allow this traffic.
    EgressDenied(String),
}

impl ProxyError {
    /// The refusal of a forward to port `port`, the proxy's `listener` port.
    pub fn own_port(port: u16, listener: &str) -> Self {
        Self::ProxyPort(format!(
            "port {port} is the proxy's {listener} port, which is not reachable through the mesh"
        ))
    }

    /// The HTTP status a client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoEndpoints(_) | Self::DiscoveryUnavailable(_) | Self::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ConnectFailed(_) | Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) | Self::ProxyPort(_) | Self::EgressDenied(_) => {
                StatusCode::FORBIDDEN
            }
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A short, stable reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoEndpoints(_) => "no endpoints",
            Self::ConnectFailed(_) => "connect failed",
            Self::Upstream(_) => "upstream failed",
            Self::Timeout(_) => "timeout",
            Self::BadRequest(_) => "bad request",
            Self::DiscoveryUnavailable(_) => "discovery unavailable",
            Self::Unauthorized(_) => "unauthorized",
            Self::NoRoute(_) => "no route",
            Self::RateLimited(..) => "rate limited",
            Self::Overloaded(_) => "concurrency limit",
            Self::ProxyPort(_) => "proxy port",
            Self::EgressDenied(_) => "egress denied",
        }
    }

    /// The detail for the `mesh-error` header and logs.
    pub fn detail(&self) -> &str {
        match self {
            Self::NoEndpoints(d)
            | Self::ConnectFailed(d)
            | Self::Upstream(d)
            | Self::Timeout(d)
            | Self::BadRequest(d)
            | Self::DiscoveryUnavailable(d)
            | Self::Unauthorized(d)
            | Self::NoRoute(d)
            | Self::Overloaded(d)
            | Self::ProxyPort(d)
            | Self::EgressDenied(d)
            | Self::RateLimited(d, _) => d,
        }
    }

    /// The gRPC status code for gRPC clients: UNAVAILABLE, or DEADLINE_EXCEEDED for timeouts,
    /// PERMISSION_DENIED, RESOURCE_EXHAUSTED (rate limited), UNIMPLEMENTED (no route), or
    /// INTERNAL for requests that cannot be routed.
    fn grpc_code(&self) -> u8 {
        match self {
            Self::Timeout(_) => 4,
            Self::Unauthorized(_) | Self::ProxyPort(_) | Self::EgressDenied(_) => 7,
            Self::NoRoute(_) => 12,
            Self::RateLimited(..) => 8,
            Self::BadRequest(_) => 13,
            _ => 14,
        }
    }

    /// The response the client gets: HTTP status with `mesh-error`, or for gRPC a
    /// trailers-only response with `grpc-status` and `grpc-message`.
    pub fn to_response(&self, grpc: bool) -> Response<ProxyBody> {
        let message = format!("{}: {}", self.reason(), self.detail());
        let header_value = HeaderValue::from_str(&message)
            .unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        if grpc {
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(
                "grpc-status",
                HeaderValue::from(u16::from(self.grpc_code())),
            );
            headers.insert("grpc-message", header_value.clone());
        } else {
            *response.status_mut() = self.status();
            *response.body_mut() = Either::Right(Full::new(Bytes::from(message + "\n")));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        response.headers_mut().insert(MESH_ERROR, header_value);
        response.extensions_mut().insert(match self {
            Self::ConnectFailed(_) => ProxyErrorKind::ConnectFailed,
            Self::Upstream(_) => ProxyErrorKind::Upstream,
            _ => ProxyErrorKind::Other,
        });
        if let Self::RateLimited(_, retry_after) = self {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

/// True when the request is gRPC (so errors must be gRPC statuses).
pub fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// True when an HTTP/1 request asks to switch protocols (WebSocket and the like).
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.headers().contains_key(header::UPGRADE) && connection_has(request.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), which describe one connection and must not
/// be forwarded; hyper writes its own framing. An upgrade keeps `connection` and `upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over their few names, rather than a lookup for each
    // hop-by-hop name in every message.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<&str> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let is_listed =
        |name: &HeaderName| listed.iter().any(|t| t.eq_ignore_ascii_case(name.as_str()));
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|&name| {
            if name == header::CONNECTION || name == header::UPGRADE {
                !keep_upgrade
            } else if name == header::TE {
                // gRPC needs `te: trailers` end to end over HTTP/2; any other `te` goes, all
                // of them.
                is_listed(name) || !headers.get_all(name).iter().all(|v| v == "trailers")
            } else {
                is_hop_by_hop(name) || is_listed(name)
            }
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The names [`strip_hop_by_hop`] may remove whatever `connection` lists.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::UPGRADE,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHORIZATION,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Whether a finished exchange counts as a failure: a 5xx status, or a gRPC status other than
/// OK in the headers (trailers-only) or trailers.
pub fn grpc_status_failed(headers: &HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-end-to-end", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers, false);
        let mut names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-end-to-end"]);
    }

    /// Found by fuzzing (tests/fuzz): a second `te` header was forwarded because the first
    /// said `trailers`.
    #[test]
    fn te_is_forwarded_only_as_trailers() {
        let mut headers = HeaderMap::new();
        headers.append(header::TE, HeaderValue::from_static("trailers"));
        headers.append(header::TE, HeaderValue::from_static("books.shop"));
        strip_hop_by_hop(&mut headers, false);
        assert!(!headers.contains_key(header::TE), "{headers:?}");
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let request = Request::builder()
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("request");
        assert!(is_upgrade(&request));
        let mut headers = request.headers().clone();
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(header::UPGRADE).expect("kept"), "websocket");
        assert!(headers.contains_key(header::CONNECTION));
    }

    #[tokio::test]
    async fn errors_become_clear_responses() {
        let error = ProxyError::NoEndpoints("books.shop:8080 has no ready endpoints".into());
        let response = error.to_response(false);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers()[&MESH_ERROR],
            "no endpoints: books.shop:8080 has no ready endpoints"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert!(body.starts_with(b"no endpoints"));

        let grpc = ProxyError::Timeout("no response in 1s".into()).to_response(true);
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "4");
        assert!(grpc.headers().contains_key(&MESH_ERROR));
    }
}
