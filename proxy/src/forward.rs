//! Forwarding one HTTP request to a destination's clients, shared by both sides: header
//! hygiene, protocol upgrades, HTTP/1 between proxies (as it is, or over HTTP/2), and turning
//! client failures into [`ProxyError`]s.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use tracing::{debug, warn};

use crate::client::{HttpClients, SendError};
use crate::http::{ProxyBody, ProxyError, ReqBody, is_upgrade, strip_hop_by_hop};

/// Names the HTTP/1 version of a request a client proxy carries to a peer proxy over HTTP/2
/// (as Linkerd's `l5d-orig-proto`): the peer restores it before the application sees it.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("mesh-orig-proto");

/// Sends `request` with `clients`, keeping `authority` as its Host/`:authority`, and returns
/// the response ready for the client (hop-by-hop headers removed, upgrades spliced).
///
/// An HTTP/1.1 request to a peer proxy goes as it is, on an HTTP/1 connection, while load is
/// light ([`HttpClients::peer_http1_is_free`]) and the request may be sent again
/// ([`Replay`]); otherwise, and for HTTP/1.0, it rides the one HTTP/2 connection to that proxy
/// (with [`ORIG_PROTO`]), so a thousand HTTP/1 clients cost the peer a few connections rather
/// than one each. Upgrades (WebSocket) stay HTTP/1: HTTP/2 cannot carry them this way.
///
/// `service` names the destination in errors the client sees; the endpoint's address goes to
/// the log only.
pub async fn forward(
    clients: &HttpClients,
    mut request: Request<ReqBody>,
    authority: &str,
    service: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    let client_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let client_version = request.version();
    let to_peer =
        clients.dial.is_proxy() && client_upgrade.is_none() && client_version < Version::HTTP_2;
    let as_http1 = to_peer
        && client_version == Version::HTTP_11
        && Replay::possible(&request)
        && clients.peer_http1_is_free();
    let mut request = prepare_request(request, authority, client_upgrade.is_some())?;
    let sent = if as_http1 {
        let replay = Replay::of(&request);
        match clients.send(request).await {
            // No response head came: the peer closed the connection, most likely draining
            // as the request reached it. HTTP/1 cannot say whether the peer took the
            // request; it may be sent again, and over HTTP/2, whose GOAWAY does say.
            Err(SendError::Http(error)) if !error.is_user() => {
                debug!(%error, "an HTTP/1 connection to a peer proxy failed; once more over HTTP/2");
                clients.send(over_http2(replay.request())).await
            }
            sent => sent,
        }
    } else {
        if to_peer {
            request = over_http2(request);
        }
        clients.send(request).await
    };
    let mut response = sent.map_err(|error| client_error(&error, clients, service))?;
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let Some(client_upgrade) = client_upgrade
        && switching
    {
        let server_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(splice_upgrades(client_upgrade, server_upgrade));
    }
    strip_hop_by_hop(response.headers_mut(), switching);
    // An HTTP/1 client hears its own version back, whatever spoke upstream: HTTP/2 between
    // proxies, or an HTTP/1.0 application behind the peer.
    if client_version < Version::HTTP_2 {
        *response.version_mut() = client_version;
    }
    Ok(response.map(Either::Left))
}

/// Marks an HTTP/1 request for the HTTP/2 connection to a peer proxy: [`ORIG_PROTO`] names
/// the version the peer restores for its application.
fn over_http2(mut request: Request<ReqBody>) -> Request<ReqBody> {
    let name = if request.version() == Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    request
        .headers_mut()
        .insert(ORIG_PROTO, HeaderValue::from_static(name));
    *request.version_mut() = Version::HTTP_2;
    request
}

/// What it takes to send a request once more: only for a request without a body whose method
/// may be repeated (RFC 9110, 9.2.2), so a second copy does no harm even if the peer did act on
/// the first.
struct Replay(http::request::Parts);

impl Replay {
    fn possible(request: &Request<ReqBody>) -> bool {
        request.method().is_idempotent() && hyper::body::Body::is_end_stream(request.body())
    }

    /// The request line and headers; not the extensions, which the clients do not read.
    fn of(request: &Request<ReqBody>) -> Self {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = request.method().clone();
        parts.uri = request.uri().clone();
        parts.version = request.version();
        parts.headers = request.headers().clone();
        Self(parts)
    }

    fn request(self) -> Request<ReqBody> {
        Request::from_parts(self.0, Either::Right(Full::new(Bytes::new())))
    }
}

/// Removes [`ORIG_PROTO`] from a request and, when `from_proxy` (the connection came from a
/// client proxy through the transport header), restores the HTTP/1 version it names. From
/// anyone else the header is dropped unread: only a peer proxy downgrades a request.
pub fn restore_orig_proto<B>(request: &mut Request<B>, from_proxy: bool) {
    let Some(value) = request.headers_mut().remove(ORIG_PROTO) else {
        return;
    };
    if !from_proxy || request.version() != Version::HTTP_2 {
        return;
    }
    match value.as_bytes() {
        b"HTTP/1.1" => *request.version_mut() = Version::HTTP_11,
        b"HTTP/1.0" => *request.version_mut() = Version::HTTP_10,
        _ => debug!(?value, "ignoring an unknown mesh-orig-proto"),
    }
}

/// Rewrites a request for the upstream client: absolute URI with the request's authority (the
/// connector ignores it and dials the chosen endpoint) and no hop-by-hop headers. The URI
/// takes the request's own `Host` when it has one, so an HTTP/1 request carried over HTTP/2
/// keeps the exact name its client sent (`authority` has the default port added).
fn prepare_request(
    mut request: Request<ReqBody>,
    authority: &str,
    upgrade: bool,
) -> Result<Request<ReqBody>, ProxyError> {
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok());
    let authority = match host {
        Some(host) => host,
        None => Authority::try_from(authority)
            .map_err(|error| ProxyError::BadRequest(format!("invalid request target: {error}")))?,
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    *request.uri_mut() = Uri::from_parts(parts)
        .map_err(|error| ProxyError::BadRequest(format!("invalid request target: {error}")))?;
    strip_hop_by_hop(request.headers_mut(), upgrade);
    Ok(request)
}

/// What the client is told of a failed exchange with `service`: what went wrong, not where.
/// The endpoint's address and the whole error go to the log.
fn client_error(error: &SendError, clients: &HttpClients, service: &str) -> ProxyError {
    let chain = error_chain(error.as_error());
    warn!(%service, upstream = %clients.dial.socket_addr(), error = %chain, "forwarding failed");
    if error.connection_limit().is_some() {
        return ProxyError::Overloaded(format!("{service}: {chain}"));
    }
    if request_body_failed(error.as_error()) {
        return ProxyError::BadRequest(format!("the request body could not be read: {chain}"));
    }
    if error.is_connect() {
        ProxyError::ConnectFailed(format!("{service}: {chain}"))
    } else {
        ProxyError::Upstream(format!("{service}: {chain}"))
    }
}

/// The first error of type `E` in `error`'s chain.
fn find_source<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

/// Whether an exchange failed because the client's own request body did (a malformed chunk, a
/// body cut short): hyper reports the body stream's error as a "user" error of the client
/// whose source is the error our server side read.
fn request_body_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    find_source::<hyper::Error>(error).is_some_and(|hyper_error| {
        hyper_error.is_user()
            && std::error::Error::source(hyper_error)
                .and_then(|source| find_source::<hyper::Error>(source))
                .is_some()
    })
}

/// Copies bytes between the two sides of an upgraded (101) connection.
async fn splice_upgrades(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, server) {
        Ok((client, server)) => {
            let mut client = hyper_util::rt::TokioIo::new(client);
            let mut server = hyper_util::rt::TokioIo::new(server);
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                debug!(%error, "upgraded connection ended with an error");
            }
        }
        Err(error) => debug!(%error, "upgrade failed"),
    }
}

/// An error with its sources, for the `mesh-error` detail.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::client::{ClientSettings, Dial};

    /// What the stand-in peer proxy does with an HTTP/1 request after its first.
    #[derive(Clone, Copy, Debug)]
    enum Close {
        /// Reads it, then closes (FIN): the peer drained as the request arrived.
        AfterReading,
        /// Closes with it unread, so the kernel resets the connection (RST).
        Unread,
    }

    const HEADER: &[u8] = b"mesh";

    /// A stand-in for a peer proxy: takes the transport header, then answers the first HTTP/1
    /// request of all with `h1` and closes on every later one as `close` says; answers every
    /// HTTP/2 request with `h2 ` and the `mesh-orig-proto` it carried.
    async fn peer(close: Close) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let http1_requests = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, close, http1_requests.clone()));
            }
        });
        addr
    }

    async fn serve(mut stream: TcpStream, close: Close, http1_requests: Arc<AtomicUsize>) {
        let mut header = [0; HEADER.len()];
        stream
            .read_exact(&mut header)
            .await
            .expect("transport header");
        let mut first = [0; 3];
        stream.peek(&mut first).await.expect("peek");
        if &first == b"PRI" {
            let service = hyper::service::service_fn(|request: Request<hyper::body::Incoming>| {
                let proto = request.headers().get(ORIG_PROTO).cloned();
                async move {
                    let proto = proto
                        .map(|value| value.as_bytes().to_vec())
                        .unwrap_or_default();
                    let body = [b"h2 ".as_slice(), &proto].concat();
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            return;
        }
        loop {
            if http1_requests.fetch_add(1, Ordering::SeqCst) > 0 {
                match close {
                    Close::AfterReading => {
                        let _ = read_head(&mut stream).await;
                    }
                    Close::Unread => {
                        let _ = stream.readable().await;
                    }
                }
                return;
            }
            if read_head(&mut stream).await.is_none() {
                return;
            }
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nh1";
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
    }

    /// Reads up to the end of a request head; `None` when the connection closes first.
    async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0];
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(head)
    }

    fn clients(peer: SocketAddr) -> HttpClients {
        let dial = Dial::Proxied {
            proxy: peer,
            header: Bytes::from_static(HEADER),
            tls: None,
            via: None,
        };
        let settings = ClientSettings {
            connect_timeout: Duration::from_secs(2),
            max_connections: 10,
            workers: 1,
        };
        HttpClients::new(dial, settings)
    }

    /// Forwards an HTTP/1.1 request; the body the peer answered.
    async fn send(clients: &HttpClients, method: http::Method, body: &'static str) -> String {
        let request = Request::builder()
            .method(method)
            .uri("/")
            .header(http::header::HOST, "books")
            .body(Either::Right(Full::new(Bytes::from_static(
                body.as_bytes(),
            ))))
            .expect("request");
        let response = forward(clients, request, "books:80", "books")
            .await
            .expect("an answer");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.version(),
            Version::HTTP_11,
            "the client's own version"
        );
        let body = response.into_body().collect().await.expect("body");
        String::from_utf8_lossy(&body.to_bytes()).into_owned()
    }

    #[tokio::test]
    async fn a_get_the_peer_closes_on_over_http1_goes_once_more_over_http2() {
        for close in [Close::AfterReading, Close::Unread] {
            let clients = clients(peer(close).await);
            assert_eq!(
                send(&clients, http::Method::GET, "").await,
                "h1",
                "{close:?}"
            );
            // Let the connection go back to the pool, so the next request reuses it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(
                send(&clients, http::Method::GET, "").await,
                "h2 HTTP/1.1",
                "{close:?}: answered over HTTP/2, as HTTP/1.1 for the application"
            );
        }
    }

    #[tokio::test]
    async fn only_bodiless_requests_of_repeatable_methods_go_over_http1() {
        let clients = clients(peer(Close::AfterReading).await);
        // Nothing would retry these, so they go where a drain cannot lose them.
        assert_eq!(send(&clients, http::Method::POST, "").await, "h2 HTTP/1.1");
        assert_eq!(
            send(&clients, http::Method::PUT, "data").await,
            "h2 HTTP/1.1"
        );
        assert_eq!(send(&clients, http::Method::GET, "").await, "h1");
    }
}
