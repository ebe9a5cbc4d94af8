//! One multiplexed HTTP/2 connection per destination.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::TokioExecutor;
use tracing::debug;

use super::{Connector, POOL_IDLE_TIMEOUT, SendError};
use crate::http::ReqBody;

/// One multiplexed HTTP/2 connection to one destination, made on first use and again once it
/// closes; every request to the destination shares it.
///
/// Hand-written rather than hyper-util's pooled client: for every request that client clones
/// itself, hashes its pool key, checks a connection out and boxes a 3 KiB future, about a
/// tenth of the client proxy's own instructions per request (callgrind), to pool one
/// connection. Here a request clones a handle and sends.
///
/// Like the pool, it lets a connection go once it has sent nothing for [`POOL_IDLE_TIMEOUT`]:
/// hyper closes it when its last handle drops and its streams are done.
#[derive(Debug)]
pub struct Http2Connection {
    connector: Connector,
    /// Shared with the connection's task, which clears it when the connection idles.
    current: Arc<ArcSwapOption<http2::SendRequest<ReqBody>>>,
    /// Requests sent, read by the idle check.
    sent: Arc<AtomicU64>,
    /// One handshake at a time: requests that find no open connection wait for it.
    connecting: tokio::sync::Mutex<()>,
}

impl Http2Connection {
    pub(super) fn new(connector: Connector) -> Self {
        Self {
            connector,
            current: Arc::new(ArcSwapOption::empty()),
            sent: Arc::new(AtomicU64::new(0)),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends `request`; when the connection turns out closed before the request went out, once
    /// more on a new one.
    pub async fn send(&self, request: Request<ReqBody>) -> Result<Response<Incoming>, SendError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let mut sender = match self.open() {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        let mut error = match sender.try_send_request(request).await {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        let Some(request) = error.take_message() else {
            return Err(SendError::Http(error.into_error()));
        };
        debug!(error = %error.error(), "the HTTP/2 connection closed; reconnecting");
        let mut sender = self.connect().await?;
        sender.send_request(request).await.map_err(SendError::Http)
    }

    /// A handle on the connection, while it is open.
    fn open(&self) -> Option<http2::SendRequest<ReqBody>> {
        let current = self.current.load();
        current
            .as_deref()
            .filter(|sender| !sender.is_closed())
            .cloned()
    }

    /// Opens the connection unless another request just did.
    async fn connect(&self) -> Result<http2::SendRequest<ReqBody>, SendError> {
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(sender) = self.open() {
            return Ok(sender);
        }
        let io = self.connector.open().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|error| SendError::Connect(std::io::Error::other(error)))?;
        let handle = Arc::new(sender.clone());
        self.current.store(Some(handle.clone()));
        let idle = IdleCheck {
            current: Arc::downgrade(&self.current),
            handle: Arc::downgrade(&handle),
            sent: self.sent.clone(),
        };
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => log_http2_end(result),
                () = idle.until_idle() => log_http2_end(connection.await),
            }
        });
        Ok(sender)
    }
}

fn log_http2_end(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        debug!(%error, "HTTP/2 client connection ended with an error");
    }
}

/// Lets an [`Http2Connection`]'s connection go once it has sent nothing for a whole
/// [`POOL_IDLE_TIMEOUT`].
struct IdleCheck {
    current: std::sync::Weak<ArcSwapOption<http2::SendRequest<ReqBody>>>,
    /// This connection's handle in `current`, so a newer connection's is left alone.
    handle: std::sync::Weak<http2::SendRequest<ReqBody>>,
    sent: Arc<AtomicU64>,
}

impl IdleCheck {
    /// Returns once the connection was idle and its handle is dropped.
    async fn until_idle(self) {
        let mut seen = self.sent.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(POOL_IDLE_TIMEOUT).await;
            let now = self.sent.load(Ordering::Relaxed);
            if now == seen {
                break;
            }
            seen = now;
        }
        if let (Some(current), Some(handle)) = (self.current.upgrade(), self.handle.upgrade()) {
            current.compare_and_swap(&Some(handle), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use bytes::Bytes;
    use hyper_util::rt::TokioIo;

    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::client::{Dial, HttpClients, test_server};

    /// An HTTP/2 server that closes each connection after its first response, saying so on
    /// `closed`.
    async fn one_request_per_connection() -> (SocketAddr, Arc<AtomicUsize>, mpsc::Receiver<()>) {
        let (closed_tx, closed) = mpsc::channel(8);
        let (addr, accepted) = test_server::counting(move |stream, n| {
            let closed_tx = closed_tx.clone();
            async move {
                let (answered_tx, mut answered) = mpsc::channel::<()>(1);
                let service = hyper::service::service_fn(move |_request| {
                    let answered_tx = answered_tx.clone();
                    async move {
                        let _ = answered_tx.try_send(());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            format!("connection {n}"),
                        ))))
                    }
                });
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = answered.recv() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
                let _ = closed_tx.send(()).await;
            }
        })
        .await;
        (addr, accepted, closed)
    }

    fn request() -> Request<ReqBody> {
        Request::builder()
            .version(http::Version::HTTP_2)
            .uri("http://books.shop:8080/")
            .body(http_body_util::Either::Right(Full::new(Bytes::new())))
            .expect("request")
    }

    #[tokio::test]
    async fn an_http2_connection_is_made_again_once_the_peer_closed_it() {
        let (addr, accepted, mut closed) = one_request_per_connection().await;
        let clients = HttpClients::new(Dial::Direct(addr), Duration::from_secs(2), 10);
        for expected in 1..=3 {
            let response = clients.send(request()).await.expect("a response");
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(body, format!("connection {expected}"));
            tokio::time::timeout(Duration::from_secs(5), closed.recv())
                .await
                .expect("the server closes the connection");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_http2_connection() {
        let (addr, accepted) = test_server::counting(|stream, _| async move {
            let service = hyper::service::service_fn(|_request| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await;
        let clients = HttpClients::new(Dial::Direct(addr), Duration::from_secs(2), 10);
        let sent = (0..20).map(|_| clients.send(request()));
        for response in futures::future::join_all(sent).await {
            assert_eq!(response.expect("a response").status(), http::StatusCode::OK);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unreachable_destination_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let clients = HttpClients::new(Dial::Direct(addr), Duration::from_secs(2), 10);
        let error = clients.send(request()).await.expect_err("nothing listens");
        assert!(error.is_connect(), "{:?}", error.as_error());
    }
}
