//! HTTP clients with connection pools, one pair (HTTP/1 and HTTP/2) per place we forward to:
//! an endpoint chosen by the balancer, the local application, or an original destination.
//!
//! Each client's connector always dials its one destination whatever the request URI says, so
//! the URI can keep the request's own authority (for `Host` and `:authority`) while the pool
//! stays per destination. HTTP/1 pooling comes from hyper-util's client; HTTP/2 needs no pool,
//! only its one multiplexed connection ([`Http2Connection`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::Service;
use tracing::debug;

use crate::http::ReqBody;
use crate::metrics::TargetMetrics;
use crate::transport_header::TransportHeader;

/// How to open a connection to one destination.
#[derive(Clone, Debug)]
pub enum Dial {
    /// Connect straight to the address.
    Direct(SocketAddr),
    /// Connect to a peer proxy's inbound port (with mutual TLS when both sides have an
    /// identity) and send the mesh transport header first.
    Proxied {
        /// The peer proxy's inbound listener.
        proxy: SocketAddr,
        /// The header's bytes, encoded once.
        header: Bytes,
        /// Mutual TLS to the peer, when it has an identity and so do we.
        tls: Option<MeshTls>,
        /// The gateway of the peer's cluster, when it is reached through one.
        via: Option<Via>,
    },
}

/// A multicluster gateway: mutual TLS with it, proving its identity.
#[derive(Clone, Debug)]
pub struct GatewayHop {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Mutual TLS toward it.
    pub tls: MeshTls,
    /// The cluster it leads to, named when it cannot be reached.
    pub cluster: String,
}

/// How one connection goes through a gateway: to the gateway, then the tunnel header that
/// names the peer's proxy.
#[derive(Clone, Debug)]
pub struct Via {
    gateway: Arc<GatewayHop>,
    header: Bytes,
}

/// Mutual TLS toward one peer identity.
#[derive(Clone, Debug)]
pub struct MeshTls {
    /// Verifies the peer is exactly the expected identity; presents ours.
    pub config: Arc<rustls::ClientConfig>,
    /// The identity the peer must prove.
    pub identity: String,
}

impl Dial {
    /// Dials a meshed endpoint through its proxy.
    pub fn proxied(
        endpoint: SocketAddr,
        proxy_port: u16,
        opaque: bool,
        name: &str,
        tls: Option<MeshTls>,
        gateway: Option<Arc<GatewayHop>>,
    ) -> Self {
        let header = TransportHeader {
            port: endpoint.port(),
            opaque,
            name: name.to_string(),
            tunnel_to: None,
        };
        let via = gateway.map(|gateway| Via {
            gateway,
            header: Bytes::from(
                TransportHeader {
                    port: proxy_port,
                    opaque: true,
                    name: String::new(),
                    tunnel_to: Some(endpoint.ip()),
                }
                .encode(),
            ),
        });
        Self::Proxied {
            proxy: SocketAddr::new(endpoint.ip(), proxy_port),
            header: Bytes::from(header.encode()),
            tls,
            via,
        }
    }

    /// Whether this dials a peer proxy (which speaks HTTP/2 to us whatever its application
    /// speaks).
    pub fn is_proxy(&self) -> bool {
        matches!(self, Self::Proxied { .. })
    }

    /// The address actually connected to.
    pub fn socket_addr(&self) -> SocketAddr {
        match self {
            Self::Direct(addr) => *addr,
            Self::Proxied { via: Some(via), .. } => via.gateway.addr,
            Self::Proxied { proxy, .. } => *proxy,
        }
    }

    /// The peer identity the connection is verified against, when mutually authenticated.
    pub fn tls_identity(&self) -> Option<&str> {
        match self {
            Self::Proxied { tls: Some(tls), .. } => Some(&tls.identity),
            _ => None,
        }
    }

    /// Opens a connection: TCP, then TLS and the transport header when proxied. Errors do not
    /// name the address (they may reach a client in `mesh-error`); callers log it.
    pub async fn connect(&self, timeout: Duration) -> io::Result<MeshIo> {
        let addr = self.socket_addr();
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            )
        };
        let connected = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())
            .and_then(|connected| connected);
        let stream = match (connected, self) {
            (Ok(stream), _) => stream,
            (Err(error), Self::Proxied { via: Some(via), .. }) => {
                return Err(io::Error::new(
                    error.kind(),
                    format!("the gateway of cluster {}: {error}", via.gateway.cluster),
                ));
            }
            (Err(error), _) => return Err(error),
        };
        stream.set_nodelay(true)?;
        match self {
            Self::Direct(_) => Ok(MeshIo::Plain(stream)),
            Self::Proxied {
                tls: None,
                via: Some(_),
                ..
            } => Err(io::Error::other(
                "the endpoint is behind a gateway, which takes only mutual TLS, and this proxy \
                 has no identity",
            )),
            Self::Proxied {
                header, tls: None, ..
            } => {
                let mut stream = stream;
                stream.write_all(header).await?;
                Ok(MeshIo::Plain(stream))
            }
            Self::Proxied {
                header,
                tls: Some(tls),
                via: None,
                ..
            } => {
                let mut stream = tls_handshake(tls, stream, timeout).await?;
                stream.write_all(header).await?;
                Ok(MeshIo::Tls(Box::new(stream)))
            }
            // Mutual TLS with the gateway, which relays the rest unread to the peer's proxy;
            // then mutual TLS with that proxy inside, so its own identity is verified.
            Self::Proxied {
                header,
                tls: Some(tls),
                via: Some(via),
                ..
            } => {
                let gateway = &via.gateway;
                let unreachable = |error: io::Error| {
                    io::Error::new(
                        error.kind(),
                        format!("the gateway of cluster {}: {error}", gateway.cluster),
                    )
                };
                let mut outer = tls_handshake(&gateway.tls, stream, timeout)
                    .await
                    .map_err(unreachable)?;
                outer.write_all(&via.header).await.map_err(unreachable)?;
                let mut inner = tls_handshake(tls, outer, timeout).await?;
                inner.write_all(header).await?;
                Ok(MeshIo::Tunneled(Box::new(inner)))
            }
        }
    }
}

/// A mutual TLS handshake over `io` toward `tls`'s identity, bounded by `timeout`.
async fn tls_handshake<S>(
    tls: &MeshTls,
    io: S,
    timeout: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let handshake = connector.connect(crate::tls::server_name(&tls.identity), io);
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "TLS handshake with {} timed out after {timeout:?}",
                    tls.identity
                ),
            )
        })?
        .map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("TLS handshake with {}: {error}", tls.identity),
            )
        })
}

/// A connection to a destination: plain TCP or mesh TLS.
#[derive(Debug)]
pub enum MeshIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mutual TLS to a peer proxy.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Mutual TLS to a peer proxy, inside mutual TLS to its cluster's gateway.
    Tunneled(Box<TunneledTls>),
}

/// The TLS session with a peer proxy carried by the TLS session with a gateway.
pub type TunneledTls = tokio_rustls::client::TlsStream<tokio_rustls::client::TlsStream<TcpStream>>;

impl AsyncRead for MeshIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
            Self::Tunneled(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
            Self::Tunneled(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
            Self::Tunneled(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(io) => io.is_write_vectored(),
            Self::Tunneled(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
            Self::Tunneled(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
            Self::Tunneled(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A tower connector that always dials one destination, with at most `permits` connections
/// open to it at once.
#[derive(Clone, Debug)]
pub struct Connector {
    dial: Arc<Dial>,
    timeout: Duration,
    permits: Arc<Semaphore>,
    max_connections: usize,
}

/// A new connection would exceed the destination's connection limit, and none freed up within
/// the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("{limit} connections to the destination are open already")]
pub struct ConnectionLimit {
    /// The destination.
    pub addr: SocketAddr,
    /// Its limit.
    pub limit: usize,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<PooledIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let dial = self.dial.clone();
        let timeout = self.timeout;
        let permits = self.permits.clone();
        let limit = self.max_connections;
        Box::pin(async move {
            // Waiting here is waiting for a pooled connection to close: hyper hands the
            // request an idle connection instead if one is returned first.
            let permit = match tokio::time::timeout(timeout, permits.acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    let addr = dial.socket_addr();
                    return Err(io::Error::other(ConnectionLimit { addr, limit }));
                }
            };
            let io = dial.connect(timeout).await?;
            Ok(TokioIo::new(PooledIo {
                io,
                _permit: permit,
            }))
        })
    }
}

/// A pooled connection holding its slot of the destination's connection limit.
#[derive(Debug)]
pub struct PooledIo {
    io: MeshIo,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for PooledIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connection for PooledIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// How long an idle pooled connection is kept: under the 30 s a peer proxy's HTTP/1 server
/// keeps an idle connection (its header read timeout), so the pool closes first rather than
/// race the server's close with a new request.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP/1 and HTTP/2 clients of one destination.
#[derive(Clone, Debug)]
pub struct HttpClients {
    /// Dials the destination.
    pub dial: Arc<Dial>,
    /// Pooled HTTP/1 connections.
    pub http1: Client<Connector, ReqBody>,
    /// The one multiplexed HTTP/2 connection.
    pub http2: Arc<Http2Connection>,
    /// The metrics of the last target sent here: a destination serves one logical target
    /// almost always, so its labels and series are built once, not per request.
    pub target_metrics: Arc<ArcSwapOption<TargetMetrics>>,
}

/// In use while a clone besides the cache's exists. Counted on `target_metrics`, which only
/// clones of these clients hold (the connectors hold the `Dial` too).
impl crate::idle::InUse for HttpClients {
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.target_metrics) > 1
    }
}

impl HttpClients {
    /// Clients for one destination, with at most `max_connections` open to it at once; no
    /// connection is opened until the first request.
    pub fn new(dial: Dial, connect_timeout: Duration, max_connections: usize) -> Self {
        let connector = Connector {
            dial: Arc::new(dial),
            timeout: connect_timeout,
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
        };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(64)
            .build(connector.clone());
        Self {
            dial: connector.dial.clone(),
            http1,
            http2: Arc::new(Http2Connection::new(connector)),
            target_metrics: Arc::new(ArcSwapOption::empty()),
        }
    }

    /// Sends `request` on the client of its version.
    pub async fn send(&self, request: Request<ReqBody>) -> Result<Response<Incoming>, SendError> {
        if request.version() == http::Version::HTTP_2 {
            self.http2.send(request).await
        } else {
            self.http1.request(request).await.map_err(SendError::Pooled)
        }
    }
}

/// Why an exchange with a destination got no response.
#[derive(Debug)]
pub enum SendError {
    /// The pooled HTTP/1 client failed (connecting included).
    Pooled(hyper_util::client::legacy::Error),
    /// No HTTP/2 connection could be made.
    Connect(io::Error),
    /// The exchange on the HTTP/2 connection failed.
    Http2(hyper::Error),
}

impl SendError {
    /// The error itself, to walk its sources.
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Pooled(error) => error,
            Self::Connect(error) => error,
            Self::Http2(error) => error,
        }
    }

    /// Whether no connection could be made (the request never left).
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Pooled(error) => error.is_connect(),
            Self::Connect(_) => true,
            Self::Http2(_) => false,
        }
    }

    /// The destination's connection limit was reached.
    pub fn connection_limit(&self) -> Option<&ConnectionLimit> {
        let io_error = match self {
            Self::Connect(error) => Some(error),
            Self::Pooled(error) => std::error::Error::source(error)
                .and_then(|source| source.downcast_ref::<io::Error>()),
            Self::Http2(_) => None,
        };
        io_error
            .and_then(|error| error.get_ref())
            .and_then(|inner| inner.downcast_ref::<ConnectionLimit>())
    }
}

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
    fn new(connector: Connector) -> Self {
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
            return Err(SendError::Http2(error.into_error()));
        };
        debug!(error = %error.error(), "the HTTP/2 connection closed; reconnecting");
        let mut sender = self.connect().await?;
        sender.send_request(request).await.map_err(SendError::Http2)
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
        let io = self
            .connector
            .clone()
            .call(Uri::default())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|error| SendError::Connect(io::Error::other(error)))?;
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
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// An HTTP/2 server that closes each connection after its first response, saying so on
    /// `closed`.
    async fn one_request_per_connection() -> (SocketAddr, Arc<AtomicUsize>, mpsc::Receiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = mpsc::channel(8);
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let (answered_tx, mut answered) = mpsc::channel::<()>(1);
                    let service = hyper::service::service_fn(move |_request| {
                        let answered_tx = answered_tx.clone();
                        async move {
                            let _ = answered_tx.try_send(());
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(format!("connection {n}")),
                            )))
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
                });
            }
        });
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
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_request| async {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
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
