//! HTTP clients, one pair (HTTP/1 and HTTP/2) per place we forward to: an endpoint chosen by
//! the balancer, the local application, or an original destination.
//!
//! Each client dials its one destination whatever the request URI says, so the URI keeps the
//! request's own authority (for `Host` and `:authority`). HTTP/1 reuses a pool of connections
//! ([`Http1Pool`], over hyper's connection API); HTTP/2 needs only its one multiplexed
//! connection ([`Http2Connection`], over `h2`). Both are hand-written: hyper-util's pooled
//! client, and hyper's HTTP/2 client under it, cost more per request than the rest of a
//! proxy's own work on it, for generality a client of one destination does not need.

use std::borrow::Borrow;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::ReqBody;
use crate::metrics::TargetMetrics;
use crate::transport_header::TransportHeader;

mod http1;
mod http2;

pub use http1::Http1Pool;
pub use http2::{Http2Body, Http2Connection};

/// The body of a response from a destination, as the client of its version read it.
pub type UpstreamBody = http_body_util::Either<Incoming, Http2Body>;

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

/// Dials one destination, with at most `max_connections` connections open to it at once.
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

impl Connector {
    /// A connection to the destination holding one of its slots, for a client's handshake.
    async fn open(&self) -> Result<PooledIo, SendError> {
        // Waiting here is waiting for another connection to the destination to close.
        let permit =
            match tokio::time::timeout(self.timeout, self.permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    let limit = ConnectionLimit {
                        addr: self.dial.socket_addr(),
                        limit: self.max_connections,
                    };
                    return Err(SendError::Connect(io::Error::other(limit)));
                }
            };
        let io = self
            .dial
            .connect(self.timeout)
            .await
            .map_err(SendError::Connect)?;
        Ok(PooledIo {
            io,
            _permit: permit,
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

/// HTTP/1 connections a client proxy keeps to each peer proxy, per worker thread, for HTTP/1.1
/// requests sent as they are while load is light. When requests come one at a time, HTTP/1
/// over the hop costs both proxies less per request than HTTP/2 (no header compression, no
/// stream state, no task per stream on the peer): at 1000 requests per second, 30-50 µs less
/// at p50 for the pair. Under load, the multiplexed HTTP/2 connection costs less per
/// request (one write carries many responses) and keeps the peer's connection count down: once
/// a request waits on it, the next ones join it. Two, not one: a second request arriving while
/// the first is in flight is common even at low rates.
pub const PEER_HTTP1_CONNECTIONS: usize = 2;

/// One unit of a count (connections open, requests waiting), held until dropped.
struct Counted<C: Borrow<AtomicUsize>>(C);

impl<C: Borrow<AtomicUsize>> Counted<C> {
    fn new(count: C) -> Self {
        count.borrow().fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl<C: Borrow<AtomicUsize>> Drop for Counted<C> {
    fn drop(&mut self) {
        self.0.borrow().fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long an idle pooled connection is kept: under the 30 s a peer proxy's HTTP/1 server
/// keeps an idle connection (its header read timeout), so the pool closes first rather than
/// race the server's close with a new request.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How the clients of each destination connect.
#[derive(Clone, Copy, Debug)]
pub struct ClientSettings {
    /// How long a connection (TCP and TLS) may take.
    pub connect_timeout: Duration,
    /// Connections open to one destination at once, over every worker thread.
    pub max_connections: usize,
    /// Worker threads, each with its own connections (see `workers`).
    pub workers: usize,
}

impl ClientSettings {
    /// The configured settings.
    pub fn new(config: &crate::config::Config) -> Self {
        Self {
            connect_timeout: config.connect_timeout,
            max_connections: config.limits.endpoint_connections,
            workers: config.worker_threads,
        }
    }
}

/// The HTTP/1 and HTTP/2 clients of one destination: one pair per worker thread, so a request
/// uses connections driven by its own thread (under one connection limit for them all).
#[derive(Clone, Debug)]
pub struct HttpClients {
    /// Dials the destination.
    pub dial: Arc<Dial>,
    per_worker: Arc<[WorkerClients]>,
    /// The metrics of the last target sent here: a destination serves one logical target
    /// almost always, so its labels and series are built once, not per request.
    pub target_metrics: Arc<ArcSwapOption<TargetMetrics>>,
}

/// One worker thread's clients of a destination.
#[derive(Debug)]
struct WorkerClients {
    http1: Http1Pool,
    http2: Http2Connection,
}

/// In use while a clone besides the cache's exists. Counted on `target_metrics`, which only
/// clones of these clients hold (the connectors hold the `Dial` too).
impl crate::idle::InUse for HttpClients {
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.target_metrics) > 1
    }
}

impl HttpClients {
    /// Clients for one destination; no connection is opened until the first request.
    pub fn new(dial: Dial, settings: ClientSettings) -> Self {
        let connector = Connector {
            dial: Arc::new(dial),
            timeout: settings.connect_timeout,
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            max_connections: settings.max_connections,
        };
        let per_worker = (0..settings.workers.max(1))
            .map(|_| WorkerClients {
                http1: Http1Pool::new(connector.clone()),
                http2: Http2Connection::new(connector.clone()),
            })
            .collect();
        Self {
            dial: connector.dial,
            per_worker,
            target_metrics: Arc::new(ArcSwapOption::empty()),
        }
    }

    /// The current worker thread's clients.
    fn here(&self) -> &WorkerClients {
        &self.per_worker[crate::workers::index() % self.per_worker.len()]
    }

    /// The current worker thread's pool of HTTP/1 connections.
    pub fn http1(&self) -> &Http1Pool {
        &self.here().http1
    }

    /// The current worker thread's multiplexed HTTP/2 connection.
    pub fn http2(&self) -> &Http2Connection {
        &self.here().http2
    }

    /// Whether an HTTP/1.1 request to this peer proxy, sent now, should go as it is on an
    /// HTTP/1 connection: no request of this thread waits on the HTTP/2 connection (under
    /// load, that one costs less per request), and an HTTP/1 connection is idle or may be
    /// opened ([`PEER_HTTP1_CONNECTIONS`]).
    pub fn peer_http1_is_free(&self) -> bool {
        let here = self.here();
        here.http2.waiting() == 0 && here.http1.has_room(PEER_HTTP1_CONNECTIONS)
    }

    /// Sends `request` on the client of its version.
    pub async fn send(
        &self,
        request: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        if request.version() == http::Version::HTTP_2 {
            let response = self.http2().send(request).await?;
            Ok(response.map(http_body_util::Either::Right))
        } else {
            let response = self.http1().send(request).await?;
            Ok(response.map(http_body_util::Either::Left))
        }
    }
}

/// Why an exchange with a destination got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made.
    Connect(io::Error),
    /// The exchange on an HTTP/1 connection failed.
    Http(hyper::Error),
    /// The exchange on the HTTP/2 connection failed.
    Http2(h2::Error),
}

impl SendError {
    /// The error itself, to walk its sources.
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Connect(error) => error,
            Self::Http(error) => error,
            Self::Http2(error) => error,
        }
    }

    /// Whether no connection could be made (the request never left).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }

    /// The destination's connection limit was reached.
    pub fn connection_limit(&self) -> Option<&ConnectionLimit> {
        match self {
            Self::Connect(error) => error.get_ref()?.downcast_ref::<ConnectionLimit>(),
            Self::Http(_) | Self::Http2(_) => None,
        }
    }
}

/// A loopback server for the clients' tests.
#[cfg(test)]
mod test_server {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::{TcpListener, TcpStream};

    /// The clients of `addr` on one worker thread.
    pub fn clients(
        addr: SocketAddr,
        connect_timeout: std::time::Duration,
        max_connections: usize,
    ) -> super::HttpClients {
        let settings = super::ClientSettings {
            connect_timeout,
            max_connections,
            workers: 1,
        };
        super::HttpClients::new(super::Dial::Direct(addr), settings)
    }

    /// Accepts connections, counting them, and serves the n-th (from 1) with `serve`.
    pub async fn counting<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve(stream, n));
            }
        });
        (addr, accepted)
    }
}
