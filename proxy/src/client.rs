//! HTTP clients with connection pools, one pair (HTTP/1 and HTTP/2) per place we forward to:
//! an endpoint chosen by the balancer, the local application, or an original destination.
//!
//! Each client's connector always dials its one destination whatever the request URI says, so
//! the URI can keep the request's own authority (for `Host` and `:authority`) while the pool
//! stays per destination. Pooling and HTTP/2 multiplexing come from hyper-util's client.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::transport_header::TransportHeader;

/// How to open a connection to one destination.
#[derive(Clone, Debug)]
pub enum Dial {
    /// Connect straight to the address.
    Direct(SocketAddr),
    /// Connect to a peer proxy's inbound port and send the mesh transport header first.
    Proxied {
        /// The peer proxy's inbound listener.
        proxy: SocketAddr,
        /// The header's bytes, encoded once.
        header: Bytes,
    },
}

impl Dial {
    /// Dials a meshed endpoint through its proxy.
    pub fn proxied(endpoint: SocketAddr, proxy_port: u16, opaque: bool, name: &str) -> Self {
        let header = TransportHeader {
            port: endpoint.port(),
            opaque,
            name: name.to_string(),
        };
        Self::Proxied {
            proxy: SocketAddr::new(endpoint.ip(), proxy_port),
            header: Bytes::from(header.encode()),
        }
    }

    /// The address actually connected to.
    pub fn socket_addr(&self) -> SocketAddr {
        match self {
            Self::Direct(addr) => *addr,
            Self::Proxied { proxy, .. } => *proxy,
        }
    }

    /// Opens a TCP connection (and sends the transport header when proxied).
    pub async fn connect(&self, timeout: Duration) -> io::Result<TcpStream> {
        let addr = self.socket_addr();
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out after {timeout:?}"),
                )
            })??;
        stream.set_nodelay(true)?;
        if let Self::Proxied { header, .. } = self {
            stream.write_all(header).await?;
        }
        Ok(stream)
    }
}

/// A tower connector that always dials one destination.
#[derive(Clone, Debug)]
pub struct Connector {
    dial: Arc<Dial>,
    timeout: Duration,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let dial = self.dial.clone();
        let timeout = self.timeout;
        Box::pin(async move { dial.connect(timeout).await.map(TokioIo::new) })
    }
}

/// The HTTP/1 and HTTP/2 clients of one destination.
#[derive(Clone, Debug)]
pub struct HttpClients {
    /// Dials the destination.
    pub dial: Arc<Dial>,
    /// Pooled HTTP/1 connections.
    pub http1: Client<Connector, Incoming>,
    /// One multiplexed HTTP/2 connection.
    pub http2: Client<Connector, Incoming>,
}

impl HttpClients {
    /// Clients for one destination; no connection is opened until the first request.
    pub fn new(dial: Dial, connect_timeout: Duration) -> Self {
        let connector = Connector {
            dial: Arc::new(dial),
            timeout: connect_timeout,
        };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector.clone());
        Self {
            dial: connector.dial,
            http1,
            http2,
        }
    }

    /// The client for a request of this HTTP version.
    pub fn for_version(&self, version: http::Version) -> &Client<Connector, Incoming> {
        if version == http::Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        }
    }
}
