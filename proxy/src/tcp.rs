//! Opaque TCP forwarding, counted in the `tcp_*` metrics and closed when idle.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::app::Context;
use crate::client::Dial;
use crate::metrics::{Metrics, TargetLabels};

/// Counts a connection open for as long as it lives: opaque forwards here, and the inbound
/// HTTP connections (whose requests are counted per request too) in `inbound.rs`.
pub(crate) struct OpenConnection<'a> {
    metrics: &'a Metrics,
    labels: &'a TargetLabels,
}

impl<'a> OpenConnection<'a> {
    pub(crate) fn new(metrics: &'a Metrics, labels: &'a TargetLabels) -> Self {
        metrics.tcp_opens.get_or_create(labels).inc();
        metrics.tcp_open_connections.get_or_create(labels).inc();
        Self { metrics, labels }
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.metrics
            .tcp_open_connections
            .get_or_create(self.labels)
            .dec();
    }
}

/// Connects with `dial` and copies bytes both ways until both sides close, or until neither
/// side has sent a byte for the idle timeout (a silent connection must not hold a socket at
/// each end forever).
pub async fn forward<C>(
    client: C,
    dial: &Dial,
    ctx: &Context,
    labels: &TargetLabels,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &ctx.metrics;
    let idle_timeout = ctx.config.limits.tcp_idle_timeout;
    let _open = OpenConnection::new(metrics, labels);
    let server = dial.connect(ctx.config.connect_timeout).await?;
    let activity = Activity::new();
    let mut client = Watched {
        io: client,
        activity: &activity,
    };
    let mut server = Watched {
        io: server,
        activity: &activity,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(copy);
    let (from_client, from_server) = loop {
        let idle_until = activity.last() + idle_timeout;
        tokio::select! {
            copied = &mut copy => break copied?,
            () = tokio::time::sleep_until(idle_until) => {
                if activity.last() + idle_timeout <= tokio::time::Instant::now() {
                    metrics.connection_timeout(labels.direction.as_str(), "tcp idle");
                    debug!(target = %labels.target_addr.0, "closing a TCP connection idle for {idle_timeout:?}");
                    return Ok(());
                }
            }
        }
    };
    metrics
        .tcp_read_bytes
        .get_or_create(labels)
        .inc_by(from_client);
    metrics
        .tcp_write_bytes
        .get_or_create(labels)
        .inc_by(from_server);
    Ok(())
}

/// When bytes last moved on a forwarded connection, either way.
struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that records its reads and writes in an [`Activity`].
struct Watched<'a, I> {
    io: I,
    activity: &'a Activity,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<'_, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<'_, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
