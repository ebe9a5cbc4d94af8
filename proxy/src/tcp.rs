//! Opaque TCP forwarding, counted in the `tcp_*` metrics.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

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

/// Connects with `dial` and copies bytes both ways until both sides close.
pub async fn forward<C>(
    mut client: C,
    dial: &Dial,
    connect_timeout: std::time::Duration,
    metrics: &Metrics,
    labels: &TargetLabels,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let _open = OpenConnection::new(metrics, labels);
    let mut server = dial.connect(connect_timeout).await?;
    let (from_client, from_server) =
        tokio::io::copy_bidirectional(&mut client, &mut server).await?;
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
