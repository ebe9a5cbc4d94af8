//! The inbound side: connections for the local application, either captured by iptables (the
//! original destination names the application port) or sent straight to the inbound listener
//! by a client proxy (the mesh transport header names it).
//!
//! Per connection: learn the port, detect the protocol, then serve HTTP through the inbound
//! stack (`stack::inbound_http`) or forward opaque bytes, always to the application on the
//! configured local IP and the original port.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::app::{Context, accept_loop};
use crate::capture;
use crate::client::{Dial, HttpClients};
use crate::detect::{self, PrefixedIo, Protocol};
use crate::http::{ProxyBody, ProxyError, is_grpc};
use crate::metrics::{Direction, Label, TargetLabels};
use crate::outbound::request_authority;
use crate::transport_header::TransportHeader;
use crate::{forward, server, stack, tcp};

/// Accepts inbound connections until the drain starts.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, connections: TaskTracker) {
    let drain = ctx.drain.clone();
    accept_loop(
        listener,
        "inbound",
        drain,
        connections,
        move |stream, peer| {
            let ctx = ctx.clone();
            async move { connection(stream, peer, ctx).await }
        },
    )
    .await;
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    let local = stream.local_addr().ok();
    let orig_dst = capture::original_dst(&stream)
        .ok()
        .filter(|dst| Some(*dst) != local);
    let (port, opaque, name) = match orig_dst {
        Some(dst) => (
            dst.port(),
            ctx.config.opaque_ports.contains(&dst.port()),
            None,
        ),
        None => {
            let header = tokio::time::timeout(
                ctx.config.detect_timeout,
                TransportHeader::read(&mut stream),
            )
            .await;
            match header {
                Ok(Ok(header)) => (
                    header.port,
                    header.opaque || ctx.config.opaque_ports.contains(&header.port),
                    Some(header.name).filter(|n| !n.is_empty()),
                ),
                Ok(Err(error)) => {
                    ctx.metrics
                        .proxy_error(Direction::Inbound, "bad transport header");
                    warn!(%peer, %error, "closing a direct inbound connection");
                    return;
                }
                Err(_elapsed) => {
                    ctx.metrics
                        .proxy_error(Direction::Inbound, "bad transport header");
                    warn!(%peer, "no mesh transport header in time; closing the connection");
                    return;
                }
            }
        }
    };
    let app = SocketAddr::new(ctx.config.inbound_app_ip, port);
    let authority = Label::from(name.unwrap_or_else(|| app.to_string()));
    let labels = TargetLabels {
        direction: Direction::Inbound,
        authority,
        target_addr: Label::from(app.to_string()),
        tls: Label::new("false"),
    };
    if opaque {
        return forward_tcp(stream, app, &ctx, &labels).await;
    }
    let (protocol, prefix) = match detect::detect(&mut stream, ctx.config.detect_timeout).await {
        Ok(detected) => detected,
        Err(error) => {
            debug!(%peer, %error, "connection failed during detection");
            return;
        }
    };
    let io = PrefixedIo::new(prefix, stream);
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let service = stack::inbound_http(
                &ctx,
                InboundHttp {
                    ctx: ctx.clone(),
                    clients: ctx.direct_clients(app),
                    labels,
                },
            );
            server::serve_http(io, protocol, service, ctx.drain.clone()).await;
        }
        Protocol::Tls | Protocol::Opaque => forward_tcp(io, app, &ctx, &labels).await,
    }
}

async fn forward_tcp<C>(client: C, app: SocketAddr, ctx: &Context, labels: &TargetLabels)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let dial = Dial::Direct(app);
    if let Err(error) = tcp::forward(
        client,
        &dial,
        ctx.config.connect_timeout,
        &ctx.metrics,
        labels,
    )
    .await
    {
        debug!(%app, %error, "inbound TCP forward ended with an error");
    }
}

/// The innermost inbound HTTP service: forwards each request to the application.
#[derive(Clone, Debug)]
pub struct InboundHttp {
    ctx: Arc<Context>,
    clients: HttpClients,
    labels: TargetLabels,
}

impl InboundHttp {
    async fn forward(self, request: Request<Incoming>) -> Response<ProxyBody> {
        let grpc = is_grpc(&request);
        let mut labels = self.labels.clone();
        let authority = request_authority(&request);
        if let Some(authority) = &authority {
            labels.authority = Label::from(authority.clone());
        }
        let uri_authority = authority.unwrap_or_else(|| labels.target_addr.0.to_string());
        match forward::forward(&self.clients, request, &uri_authority).await {
            Ok(mut response) => {
                response.extensions_mut().insert(labels);
                response
            }
            Err(error) => self.error(error, grpc, labels),
        }
    }

    fn error(&self, error: ProxyError, grpc: bool, labels: TargetLabels) -> Response<ProxyBody> {
        warn!(
            reason = error.reason(),
            detail = error.detail(),
            "inbound request failed"
        );
        self.ctx
            .metrics
            .proxy_error(Direction::Inbound, error.reason());
        let mut response = error.to_response(grpc);
        response.extensions_mut().insert(labels);
        response
    }
}

impl tower::Service<Request<Incoming>> for InboundHttp {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(request).await) })
    }
}
