//! HTTP/1 connections that hold no buffers while idle.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for the whole life of an HTTP/1
//! connection, so a client that opens thousands of keep-alive connections and leaves them idle
//! pins ~15 KiB in the proxy for each (HAProxy: ~3 KiB). Here hyper only serves while the
//! connection is busy: once it has been quiet for [`RELEASE_AFTER`] with no request in flight,
//! the connection is taken back from hyper (buffers dropped, socket kept open), and a new hyper
//! connection is made when the client sends again. The release is invisible to the client: it
//! happens only when hyper is waiting for the next request head and has nothing left to write.
//!
//! Hand-written because hyper has no option to release its buffers; it does give the socket
//! back (`into_parts`), which is what this relies on.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{ConnectionService, HTTP1_MAX_BUFFER, HttpServer, ResponseBody, log_end};
use crate::detect::PrefixedIo;

/// How long a connection stays with hyper after its last byte before its buffers go. Much
/// longer than a request takes, so a busy connection is never released between requests, and
/// far cheaper than it is long: making the next hyper connection costs microseconds.
pub const RELEASE_AFTER: Duration = Duration::from_millis(250);

/// The most read at once while waiting for an idle connection's next request, handed to hyper
/// as the start of its input.
const WAKE_READ: usize = 2048;

/// Serves HTTP/1 on `io` until the client closes it, it stays idle past the header read
/// timeout, or the drain fires.
pub async fn serve<I, S, B>(io: I, service: S, server: HttpServer)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let activity = Arc::new(Activity::default());
    let mut idle = Idle {
        io: Watched {
            io: PrefixedIo::new(Bytes::new(), io),
            activity: activity.clone(),
        },
        service: Tracked {
            inner: TowerToHyperService::new(service),
            activity,
        },
    };
    // A partial request head that was taken back is served at once, and that connection is
    // not released again before a request completes: otherwise a slow client could restart
    // hyper's header read timeout forever.
    let mut may_release = true;
    loop {
        // Boxed: while busy, the connection's state (hyper's included) lives in this box, and
        // the task of an idle connection keeps room only for what is below.
        let Some(released) = Box::pin(serve_until_quiet(idle, &server, may_release)).await else {
            return;
        };
        idle = released;
        if idle.io.io.has_prefix() {
            may_release = false;
            continue;
        }
        may_release = true;
        let _parked = Parked::new(server.metrics.listener_idle(server.listener));
        tokio::select! {
            woken = idle.io.wait_for_input() => match woken {
                Ok(true) => {}
                Ok(false) => return,
                Err(error) => {
                    tracing::debug!(%error, "an idle HTTP/1 connection failed");
                    return;
                }
            },
            () = tokio::time::sleep(server.header_read_timeout.saturating_sub(RELEASE_AFTER)) => {
                server.metrics.connection_timeout(server.listener, "http header read");
                tracing::debug!(
                    listener = server.listener,
                    "closing an idle HTTP/1 keep-alive connection after {:?}",
                    server.header_read_timeout
                );
                let _ = tokio::time::timeout(RELEASE_AFTER, idle.io.shutdown()).await;
                return;
            }
            () = server.drain.cancelled() => {
                let _ = tokio::time::timeout(RELEASE_AFTER, idle.io.shutdown()).await;
                return;
            }
        }
    }
}

/// Counts a connection as parked while it lives.
struct Parked(Gauge);

impl Parked {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What an idle connection keeps: its socket and its service.
struct Idle<I, S> {
    io: Watched<I>,
    service: Tracked<S>,
}

/// Serves with hyper until the connection ends (None) or has been quiet for [`RELEASE_AFTER`]
/// with nothing in flight: then hands back the socket, with any bytes hyper read and did not
/// parse put back in front.
async fn serve_until_quiet<I, S, B>(
    idle: Idle<I, TowerToHyperService<S>>,
    server: &HttpServer,
    may_release: bool,
) -> Option<Idle<I, TowerToHyperService<S>>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let activity = idle.io.activity.clone();
    let mut connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(HTTP1_MAX_BUFFER)
        .serve_connection(TokioIo::new(idle.io), idle.service)
        .with_upgrades();
    let mut seen = activity.events();
    let requests = activity.requests();
    loop {
        tokio::select! {
            result = &mut connection => {
                log_end(server, result);
                return None;
            }
            () = server.drain.cancelled() => {
                Pin::new(&mut connection).graceful_shutdown();
                log_end(server, connection.await);
                return None;
            }
            () = tokio::time::sleep(RELEASE_AFTER) => {
                let now = activity.events();
                let releasable = may_release || activity.requests() != requests;
                if releasable && now == seen && activity.is_idle() {
                    break;
                }
                seen = now;
            }
        }
    }
    // Not polled to completion, so hyper neither shuts the socket down nor answers; what it
    // read and did not parse comes back in `read_buf`. An empty `read_buf` still holds
    // hyper's whole read buffer, so `unread` drops it rather than keeping it.
    let parts = connection.into_parts()?;
    let mut io = parts.io.into_inner();
    io.io.unread(parts.read_buf);
    Some(Idle {
        io,
        service: parts.service,
    })
}

/// What the connection has been doing, shared by its socket, its service and the bodies of
/// its responses. One task touches it, so the atomics are never contended.
#[derive(Debug, Default)]
struct Activity {
    /// Reads and writes that moved bytes.
    events: AtomicU64,
    /// Requests the service has been called with.
    requests: AtomicU64,
    /// Requests whose response body hyper has not finished with.
    in_flight: AtomicUsize,
    /// The last write could not complete: hyper holds bytes the client has not taken.
    write_blocked: AtomicBool,
    /// The last request had a body hyper may still be reading.
    body_unread: AtomicBool,
}

impl Activity {
    fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn moved_bytes(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    /// True when hyper can only be waiting for the next request head: nothing in flight,
    /// nothing unwritten and no request body left to read. A request with a body keeps the
    /// connection until the next request without one, since only then has hyper surely read
    /// it all.
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && !self.write_blocked.load(Ordering::Relaxed)
            && !self.body_unread.load(Ordering::Relaxed)
    }
}

/// The socket as hyper sees it: bytes given back by an earlier hyper connection first, and
/// every read and write counted.
struct Watched<I> {
    io: PrefixedIo<I>,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> Watched<I> {
    /// Waits for the client's next bytes, holding no buffer while it waits; false when the
    /// client closed the connection instead.
    async fn wait_for_input(&mut self) -> io::Result<bool> {
        if self.io.has_prefix() {
            return Ok(true);
        }
        let read = poll_fn(|cx| {
            // On the stack only while polled: the idle task holds nothing.
            let mut buf = [0u8; WAKE_READ];
            let mut buf = ReadBuf::new(&mut buf);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            Poll::Ready(Ok::<_, io::Error>(Bytes::copy_from_slice(buf.filled())))
        })
        .await?;
        if read.is_empty() {
            return Ok(false);
        }
        self.io.unread(read);
        Ok(true)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.moved_bytes();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> Watched<I> {
    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Pending => self.activity.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(result) => {
                self.activity.write_blocked.store(false, Ordering::Relaxed);
                if matches!(result, Ok(n) if *n > 0) {
                    self.activity.moved_bytes();
                }
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.activity
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The service, counting requests in flight until hyper drops their response bodies.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<InFlightBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.requests.fetch_add(1, Ordering::Relaxed);
        self.activity
            .body_unread
            .store(!request.body().is_end_stream(), Ordering::Relaxed);
        let guard = InFlight::new(self.activity.clone());
        TrackedFuture {
            inner: self.inner.call(request),
            guard: Some(guard),
        }
    }
}

/// One request in flight; dropped with its response body (or with the request, if it never
/// got a response).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// The service's future, handing its [`InFlight`] to the response body.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<InFlightBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| InFlightBody {
            body,
            _guard: guard,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until hyper drops it.
    struct InFlightBody<B> {
        #[pin]
        body: B,
        _guard: Option<InFlight>,
    }
}

impl<B: Body> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
