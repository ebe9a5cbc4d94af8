//! Request hygiene, on both sides before routing and policy read a request: what a request may
//! not carry past the proxy, however it arrived.
//!
//! - Two `Host` headers: 400 (RFC 9112 §3.2). Routing and policy would read one and the
//!   application perhaps the other.
//! - A request target with an authority (absolute form, or HTTP/2's `:authority`) and a `Host`
//!   naming something else: `Host` becomes the target's authority (RFC 9112 §3.2.2), so
//!   routing, policy and the application all see one name.
//! - `Upgrade: h2c`: removed, with its `HTTP2-Settings`, as Envoy does. The proxy speaks
//!   HTTP/2 to the application only when the client did; an h2c upgrade passed through would
//!   turn the connection into one the proxy cannot read. WebSocket and other upgrades pass.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Layer, Service};
use tracing::debug;

use crate::http::{ProxyBody, ProxyError, is_grpc};
use crate::metrics::{Direction, Metrics};

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Cleans `request` in place, or says why it must be refused.
pub fn clean<B>(request: &mut Request<B>) -> Result<(), ProxyError> {
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ProxyError::BadRequest(format!(
            "the request has {hosts} Host headers; send one"
        )));
    }
    if let Some(authority) = request.uri().authority().map(|a| a.as_str().to_owned()) {
        let host = request.headers().get(header::HOST);
        if host.is_some_and(|host| host.as_bytes() != authority.as_bytes())
            && let Ok(value) = HeaderValue::from_str(&authority)
        {
            debug!(%authority, "Host differs from the request target's authority; using the authority");
            request.headers_mut().insert(header::HOST, value);
        }
    }
    strip_h2c_upgrade(request.headers_mut());
    Ok(())
}

/// Removes `h2c` from `Upgrade`; when nothing else is asked for, the upgrade request goes (its
/// `Connection: upgrade` token and `HTTP2-Settings` too).
fn strip_h2c_upgrade(headers: &mut HeaderMap) {
    let Some(upgrade) = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let tokens: Vec<&str> = upgrade.split(',').map(str::trim).collect();
    if !tokens.iter().any(|token| token.eq_ignore_ascii_case("h2c")) {
        return;
    }
    let rest: Vec<String> = tokens
        .into_iter()
        .filter(|token| !token.is_empty() && !token.eq_ignore_ascii_case("h2c"))
        .map(str::to_owned)
        .collect();
    headers.remove(HTTP2_SETTINGS);
    if let Some(value) = (!rest.is_empty())
        .then(|| HeaderValue::from_str(&rest.join(", ")).ok())
        .flatten()
    {
        headers.insert(header::UPGRADE, value);
        return;
    }
    headers.remove(header::UPGRADE);
    let connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.is_empty()
                && !token.eq_ignore_ascii_case("upgrade")
                && !token.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::CONNECTION);
    if let Ok(value) = HeaderValue::from_str(&connection.join(", "))
        && !connection.is_empty()
    {
        headers.insert(header::CONNECTION, value);
    }
}

/// Applies [`clean`] to every request.
#[derive(Clone, Debug)]
pub struct HygieneLayer {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl HygieneLayer {
    /// Refusals are counted in `metrics` as `direction`'s proxy errors.
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self { metrics, direction }
    }
}

impl<S> Layer<S> for HygieneLayer {
    type Service = Hygiene<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Hygiene {
            inner,
            metrics: self.metrics.clone(),
            direction: self.direction,
        }
    }
}

/// See [`HygieneLayer`].
#[derive(Clone, Debug)]
pub struct Hygiene<S> {
    inner: S,
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl<S> Service<Request<Incoming>> for Hygiene<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    // Spelled out rather than boxed: this layer sits on every request.
    type Future = futures::future::Either<
        std::future::Ready<Result<Response<ProxyBody>, Infallible>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        match clean(&mut request) {
            Ok(()) => futures::future::Either::Right(self.inner.call(request)),
            Err(error) => {
                self.metrics.proxy_error(self.direction, error.reason());
                debug!(detail = error.detail(), "refusing a malformed request");
                let response = error.to_response(is_grpc(&request));
                futures::future::Either::Left(std::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("request")
    }

    fn values(request: &Request<()>, name: &str) -> Vec<String> {
        request
            .headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect()
    }

    #[test]
    fn two_host_headers_are_refused() {
        let mut twice = request("/", &[("host", "books"), ("host", "admin")]);
        let error = clean(&mut twice).expect_err("refused");
        assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
        assert!(error.detail().contains("2 Host headers"), "{error:?}");
        let mut once = request("/", &[("host", "books")]);
        clean(&mut once).expect("one Host is fine");
        assert_eq!(values(&once, "host"), ["books"]);
    }

    #[test]
    fn the_target_authority_wins_over_host() {
        let cases = [
            ("http://books:8080/x", Some("admin"), vec!["books:8080"]),
            (
                "http://books:8080/x",
                Some("books:8080"),
                vec!["books:8080"],
            ),
            ("http://books:8080/x", None, vec![]),
            ("/x", Some("admin"), vec!["admin"]),
        ];
        for (uri, host, want) in cases {
            let headers: Vec<(&str, &str)> = host.iter().map(|h| ("host", *h)).collect();
            let mut request = request(uri, &headers);
            clean(&mut request).expect("cleaned");
            assert_eq!(values(&request, "host"), want, "{uri} {host:?}");
        }
    }

    #[test]
    fn h2c_upgrades_are_stripped_and_others_kept() {
        // (upgrade, connection) before -> (upgrade, connection) after
        let cases = [
            (("h2c", "Upgrade, HTTP2-Settings"), (vec![], vec![])),
            (
                ("websocket", "Upgrade"),
                (vec!["websocket"], vec!["Upgrade"]),
            ),
            (
                ("h2c, websocket", "keep-alive, Upgrade"),
                (vec!["websocket"], vec!["keep-alive, Upgrade"]),
            ),
            (("H2C", "upgrade, keep-alive"), (vec![], vec!["keep-alive"])),
        ];
        for ((upgrade, connection), (want_upgrade, want_connection)) in cases {
            let mut request = request(
                "/",
                &[
                    ("upgrade", upgrade),
                    ("connection", connection),
                    ("http2-settings", "AAMAAABkAAQAAP__"),
                ],
            );
            clean(&mut request).expect("cleaned");
            assert_eq!(values(&request, "upgrade"), want_upgrade, "{upgrade}");
            assert_eq!(values(&request, "connection"), want_connection, "{upgrade}");
            let kept_settings = !values(&request, "http2-settings").is_empty();
            assert_eq!(kept_settings, !upgrade.to_ascii_lowercase().contains("h2c"));
        }
    }
}
