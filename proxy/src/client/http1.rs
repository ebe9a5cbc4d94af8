//! Pooled HTTP/1 connections to one destination.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use http::{Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;
use tracing::debug;

use super::{Connector, Counted, POOL_IDLE_TIMEOUT, SendError};
use crate::http::ReqBody;

/// Most idle connections kept for reuse; the oldest beyond go. Busy ones are bounded by the
/// destination's connection limit.
const MAX_IDLE: usize = 64;

/// HTTP/1 connections to one destination, reused one exchange after another.
///
/// Hand-written rather than hyper-util's pooled client, which for each request clones itself,
/// hashes its pool key twice (out and back), boxes a 3 KiB future and spawns a task to return
/// the connection: a sixth of the server proxy's own instructions per request (callgrind).
/// Here a connection goes back to the list as soon as its response headers arrive, and is
/// taken again once hyper says it is ready (its response body read).
#[derive(Debug)]
pub struct Http1Pool {
    connector: Connector,
    /// Most recently used last; some may still be reading their response body.
    connections: Mutex<Vec<Pooled>>,
    /// Connections open or being opened, busy or idle.
    open: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Pooled {
    sender: http1::SendRequest<ReqBody>,
    /// When its last response arrived: a connection quiet for [`POOL_IDLE_TIMEOUT`] since is
    /// closed before the server's own keep-alive timeout can race a new request.
    used: Instant,
}

impl Http1Pool {
    pub(super) fn new(connector: Connector) -> Self {
        Self {
            connector,
            connections: Mutex::new(Vec::new()),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether a request sent now would not wait behind another: a connection is idle, or
    /// fewer than `limit` are open or being opened, so one more may be.
    pub fn has_room(&self, limit: usize) -> bool {
        self.open.load(Ordering::Relaxed) < limit
            || self
                .connections()
                .iter()
                .any(|pooled| pooled.sender.is_ready())
    }

    /// Sends `request` on a ready connection, or a new one; when a connection turns out closed
    /// before the request went out, once more on a new one.
    pub async fn send(&self, request: Request<ReqBody>) -> Result<Response<Incoming>, SendError> {
        let request = origin_form(request);
        // Boxed: connecting is rare, and its future (hyper's handshake) would grow every
        // request's future by kilobytes.
        let mut sender = match self.ready() {
            Some(sender) => sender,
            None => Box::pin(self.connect()).await?,
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut error) => {
                let Some(request) = error.take_message() else {
                    return Err(SendError::Http(error.into_error()));
                };
                debug!(error = %error.error(), "a pooled HTTP/1 connection closed; reconnecting");
                sender = Box::pin(self.connect()).await?;
                sender
                    .send_request(request)
                    .await
                    .map_err(SendError::Http)?
            }
        };
        self.put_back(sender);
        Ok(response)
    }

    /// The most recently used connection that is ready for a request. Closed ones, ready ones
    /// quiet too long and the oldest ready ones past [`MAX_IDLE`] are dropped on the way.
    fn ready(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut connections = self.connections();
        let now = Instant::now();
        let idle = connections.iter().filter(|p| p.sender.is_ready()).count();
        // The one about to be taken is not idle for long.
        let mut excess = idle.saturating_sub(MAX_IDLE + 1);
        connections.retain(|pooled| {
            if pooled.sender.is_closed() {
                return false;
            }
            if !pooled.sender.is_ready() {
                return true;
            }
            if excess > 0 || now.saturating_duration_since(pooled.used) >= POOL_IDLE_TIMEOUT {
                excess = excess.saturating_sub(1);
                return false;
            }
            true
        });
        let index = connections
            .iter()
            .rposition(|pooled| pooled.sender.is_ready())?;
        Some(connections.remove(index).sender)
    }

    /// Keeps `sender` for a later request.
    fn put_back(&self, sender: http1::SendRequest<ReqBody>) {
        self.connections().push(Pooled {
            sender,
            used: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<http1::SendRequest<ReqBody>, SendError> {
        // Counted at once, so requests deciding meanwhile see it (`has_room`).
        let counted = Counted::new(self.open.clone());
        let io = self.connector.open().await?;
        let (sender, connection) = http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|error| SendError::Connect(std::io::Error::other(error)))?;
        tokio::spawn(async move {
            let _counted = counted;
            if let Err(error) = connection.with_upgrades().await {
                debug!(%error, "HTTP/1 client connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn connections(&self) -> MutexGuard<'_, Vec<Pooled>> {
        match self.connections.lock() {
            Ok(connections) => connections,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The request as an HTTP/1 server expects it from a client: `Host` from the URI when it has
/// none, and the target in origin form (`/path?query`), except CONNECT's authority form.
fn origin_form(mut request: Request<ReqBody>) -> Request<ReqBody> {
    if !request.headers().contains_key(header::HOST)
        && let Some(host) = request
            .uri()
            .authority()
            .and_then(|authority| http::HeaderValue::from_str(authority.as_str()).ok())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    if request.method() == http::Method::CONNECT {
        return request;
    }
    let mut origin = http::uri::Parts::default();
    origin.path_and_query = Some(
        request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    // A path alone is always a valid URI.
    *request.uri_mut() = Uri::from_parts(origin).unwrap_or_else(|_| Uri::from_static("/"));
    request
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    use crate::client::{HttpClients, test_server};
    use crate::http::ReqBody;

    /// An HTTP/1 server answering the request target it saw after `delay`; with `one_each`,
    /// it closes every connection after one exchange (keep-alive off).
    async fn server(one_each: bool, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        test_server::counting(move |stream, _| async move {
            let service = hyper::service::service_fn(move |request: http::Request<_>| {
                let host = request.headers().get(http::header::HOST);
                let host = host.and_then(|h| h.to_str().ok()).unwrap_or("-");
                let seen = format!("{} host={host}", request.uri());
                async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        seen,
                    ))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(!one_each)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await
    }

    fn request(uri: &str) -> http::Request<ReqBody> {
        http::Request::builder()
            .uri(uri)
            .body(http_body_util::Either::Right(Full::new(Bytes::new())))
            .expect("request")
    }

    async fn body(clients: &HttpClients, uri: &str) -> Bytes {
        let response = clients.send(request(uri)).await.expect("a response");
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection_in_origin_form() {
        let (addr, accepted) = server(false, Duration::from_millis(10)).await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        for _ in 0..5 {
            let seen = body(&clients, "http://books.shop:8080/a?b=1").await;
            assert_eq!(seen, "/a?b=1 host=books.shop:8080");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn room_is_an_idle_connection_or_one_under_the_limit() {
        let (addr, _) = server(false, Duration::from_millis(300)).await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        let pool = clients.http1();
        assert!(pool.has_room(1), "nothing open yet");
        // Counted from when it is dialled, before it is open.
        let mut busy = Box::pin(body(&clients, "http://a/"));
        assert!(
            futures::poll!(busy.as_mut()).is_pending(),
            "the request waits for its answer"
        );
        assert!(!pool.has_room(1), "the one allowed is being opened");
        assert!(pool.has_room(2), "a second may be opened");
        busy.await;
        assert!(
            pool.has_room(0),
            "an idle connection is room whatever the limit"
        );
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_no_longer_counted() {
        let (addr, _) = server(true, Duration::ZERO).await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        body(&clients, "http://a/").await;
        let pool = clients.http1();
        for _ in 0..100 {
            if pool.has_room(1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the closed connection still counts against the limit after 1 s");
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_then_share_them() {
        let (addr, accepted) = server(false, Duration::from_millis(10)).await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        let first = futures::future::join_all((0..4).map(|_| body(&clients, "http://a/"))).await;
        assert_eq!(first.len(), 4);
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        let again = futures::future::join_all((0..4).map(|_| body(&clients, "http://a/"))).await;
        assert_eq!(again.len(), 4);
        assert_eq!(accepted.load(Ordering::SeqCst), 4, "the four were reused");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_used_again() {
        let (addr, accepted) = server(true, Duration::from_millis(10)).await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        for _ in 0..3 {
            assert_eq!(body(&clients, "http://a/x").await, "/x host=a");
            // The server's close reaches hyper's connection task.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn past_the_connection_limit_a_request_fails_with_a_clear_error() {
        let (addr, accepted) = server(false, Duration::from_secs(1)).await;
        // One connection at most; a second request waits the connect timeout for it.
        let clients = test_server::clients(addr, Duration::from_millis(200), 1);
        let busy = clients.send(request("http://a/"));
        let refused = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            clients.send(request("http://a/")).await
        };
        let (busy, refused) = tokio::join!(busy, refused);
        assert_eq!(busy.expect("the first").status(), http::StatusCode::OK);
        let error = refused.expect_err("no second connection");
        let limit = error.connection_limit().expect("the limit is named");
        assert_eq!(limit.limit, 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
