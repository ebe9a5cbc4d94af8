//! Serving one accepted connection as HTTP/1 or HTTP/2 with hyper, within the proxy's limits,
//! draining gracefully.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::coalesce;
use crate::detect::Protocol;
use crate::metrics::Metrics;

mod http1;

pub use http1::RELEASE_AFTER;

/// Streams per HTTP/2 connection at once.
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Streams a client may reset before the server took them, queued at once, before the
/// connection is closed (h2's guard against rapid-reset floods, 20 by default). A peer proxy
/// carries many clients' requests on one connection, and they give up on them together (a
/// deadline, a closed page): at 20, one such burst closed the connection and failed every other
/// request on it. As many as the streams a client may open keeps the queue bounded.
const MAX_PENDING_ACCEPT_RESETS: usize = MAX_CONCURRENT_STREAMS as usize;

/// The most an HTTP/1 connection buffers while reading: a request head must fit (hyper's
/// default, ~400 KiB per connection, lets each slow client pin that much).
const HTTP1_MAX_BUFFER: usize = 64 * 1024;

/// How one listener serves HTTP.
#[derive(Clone, Debug)]
pub struct HttpServer {
    /// inbound or outbound, for metrics and logs.
    pub listener: &'static str,
    /// Fires when the proxy drains.
    pub drain: CancellationToken,
    /// How long an HTTP/1 client may take to send a request's headers, measured from when the
    /// server starts waiting for them: also how long an idle keep-alive connection lives.
    pub header_read_timeout: Duration,
    /// Where timeouts are counted.
    pub metrics: Arc<Metrics>,
}

/// The HTTP stack a connection is served with: cloned for each request by hyper.
pub trait ConnectionService<B>:
    tower::Service<
        Request<Incoming>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Unpin
    + 'static
{
}

impl<S, B> ConnectionService<B> for S where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Unpin
        + 'static
{
}

/// The body of the responses a connection sends.
pub trait ResponseBody:
    http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> ResponseBody for B where
    B: http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// Serves `io` until the client closes it, or until `drain` fires: then in-flight requests
/// finish and the connection closes (HTTP/2 GOAWAY, HTTP/1 `connection: close`).
pub async fn serve_http<I, S, B>(io: I, protocol: Protocol, service: S, server: HttpServer)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    if protocol == Protocol::Http2 {
        // Boxed: an HTTP/2 connection's state is large (3 KiB with hyper's), and every HTTP/1
        // connection's task would otherwise reserve room for it too.
        Box::pin(serve_http2(io, service, server)).await;
    } else {
        http1::serve(io, service, server).await;
    }
}

async fn serve_http2<I, S, B>(io: I, service: S, server: HttpServer)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS);
    let (io, sender) = coalesce::split(io);
    let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = sender.after_each_poll(connection.as_mut()) => result,
        () = server.drain.cancelled() => {
            connection.as_mut().graceful_shutdown();
            sender.after_each_poll(connection).await
        }
    };
    log_end(&server, result);
}

/// Counts and logs how a connection ended.
fn log_end(server: &HttpServer, result: Result<(), hyper::Error>) {
    match result {
        Err(error) if error.is_timeout() => {
            server
                .metrics
                .connection_timeout(server.listener, "http header read");
            // Debug, not info: an idle keep-alive connection ends this way too, all day long.
            debug!(
                listener = server.listener,
                "closing an HTTP/1 connection: no complete request head within {:?} (idle \
                 keep-alive, or a client too slow)",
                server.header_read_timeout
            );
        }
        Err(error) => debug!(%error, "HTTP connection ended with an error"),
        Ok(()) => {}
    }
}
