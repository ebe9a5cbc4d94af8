//! The inbound side: connections for the local application, either captured by iptables (the
//! original destination names the application port) or sent straight to the inbound listener
//! by a client proxy (the mesh transport header names it).
//!
//! Per connection: learn the port, detect the protocol, then serve HTTP through the inbound
//! stack (`stack::inbound_http`) or forward opaque bytes, always to the application on the
//! configured local IP and the original port.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use arc_swap::ArcSwapOption;
use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::app::{Accept, Context, accept_loop};
use crate::authz::{ConnectionClient, admit_connection};
use crate::capture;
use crate::client::{Dial, HttpClients};
use crate::detect::{self, PrefixedIo, Protocol};
use crate::http::{ProxyBody, ProxyError, is_grpc};
use crate::metrics::{Direction, Label, TargetLabels, TargetMetrics};
use crate::outbound::request_authority;
use crate::tls::{self, ALPN_MESH};
use crate::transport_header::TransportHeader;
use crate::{forward, server, stack, tcp};

/// Accepts inbound connections until the drain starts.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, connections: TaskTracker) {
    let accept = Accept {
        name: "inbound",
        max_connections: ctx.config.limits.inbound_connections,
        metrics: ctx.metrics.clone(),
        stop: ctx.drain.clone(),
        connections,
        workers: ctx.workers.clone(),
    };
    accept_loop(listener, accept, move |stream, peer| {
        let ctx = ctx.clone();
        async move { connection(stream, peer, ctx).await }
    })
    .await;
}

async fn connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    let local = stream.local_addr().ok();
    let orig_dst = capture::original_dst(&stream)
        .ok()
        .filter(|dst| Some(*dst) != local);
    match orig_dst {
        Some(dst) => {
            let arrival = Arrival {
                port: dst.port(),
                opaque: ctx.config.opaque_ports.contains(&dst.port()),
                name: None,
                client_id: None,
                from_proxy: false,
                tunnel_to: None,
            };
            serve_app_port(stream, arrival, peer, ctx).await;
        }
        // Boxed: mesh TLS makes this path's state several KiB, which every captured
        // connection's task would otherwise reserve too.
        None => Box::pin(direct(stream, peer, ctx)).await,
    }
}

/// What a connection is for, once the proxy knows.
struct Arrival {
    /// The application port.
    port: u16,
    /// Forward without detection.
    opaque: bool,
    /// The logical authority the client proxy resolved.
    name: Option<String>,
    /// The client's proven identity.
    client_id: Option<String>,
    /// Sent by a client proxy (through the transport header), not captured.
    from_proxy: bool,
    /// A gateway tunnel to the proxy at this IP (its inbound port is `port`).
    tunnel_to: Option<IpAddr>,
}

/// A connection made straight to the inbound port by a client proxy: mesh TLS, then the
/// transport header naming the application port.
///
/// The header decides where in this pod the connection goes, so it is believed only from a
/// peer that proved a mesh identity: a proxy with identity accepts it only inside mutual TLS.
/// A proxy without identity (a mesh run without it) has no peer to authenticate and takes it
/// in plaintext. Either way it never names one of the proxy's own listeners
/// ([`serve_app_port`]).
async fn direct(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    let mut first = [0u8; 1];
    let is_tls =
        match tokio::time::timeout(ctx.config.detect_timeout, stream.peek(&mut first)).await {
            Ok(Ok(1)) => first[0] == 0x16,
            Ok(Ok(_)) => return,
            Ok(Err(error)) => {
                debug!(%peer, %error, "direct connection failed");
                return;
            }
            Err(_elapsed) => {
                ctx.metrics
                    .connection_timeout("inbound", "transport header");
                refuse(&ctx, peer, "no mesh transport header in time");
                return;
            }
        };
    let Some(tls) = &ctx.tls else {
        if is_tls {
            refuse(
                &ctx,
                peer,
                "mesh TLS arrived but this proxy has no identity",
            );
            return;
        }
        let mut stream = stream;
        if let Some(arrival) = read_header(&mut stream, None, peer, &ctx).await {
            if arrival.tunnel_to.is_some() {
                refuse(&ctx, peer, "gateway tunnel without mutual TLS");
                return;
            }
            serve_app_port(stream, arrival, peer, ctx).await;
        }
        return;
    };
    if !is_tls {
        refuse(&ctx, peer, "plaintext transport header");
        return;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let handshake = acceptor.accept(stream);
    let mut stream =
        match tokio::time::timeout(ctx.config.limits.tls_handshake_timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                ctx.metrics
                    .proxy_error(Direction::Inbound, "TLS handshake failed");
                warn!(%peer, %error, "mesh TLS handshake failed");
                return;
            }
            Err(_elapsed) => {
                ctx.metrics.connection_timeout("inbound", "tls handshake");
                refuse(&ctx, peer, "mesh TLS handshake timed out");
                return;
            }
        };
    let (_, session) = stream.get_ref();
    if session.alpn_protocol() != Some(ALPN_MESH) {
        refuse(&ctx, peer, "TLS without the mesh ALPN on the inbound port");
        return;
    }
    // The verifier required a certificate chaining to our anchors; it must also name the
    // client, or policy would judge an identity nobody proved.
    let Some(client_id) = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(tls::spiffe_id)
    else {
        refuse(&ctx, peer, "client certificate without a SPIFFE ID");
        return;
    };
    let Some(arrival) = read_header(&mut stream, Some(client_id), peer, &ctx).await else {
        return;
    };
    match (arrival.tunnel_to, arrival.client_id) {
        (Some(ip), Some(client_id)) if ctx.config.gateway => {
            let target = SocketAddr::new(ip, arrival.port);
            Box::pin(crate::gateway::relay(stream, target, client_id, peer, ctx)).await;
        }
        (Some(_), _) => refuse(
            &ctx,
            peer,
            "gateway tunnel to a proxy that is not a gateway",
        ),
        (None, client_id) => {
            serve_app_port(
                stream,
                Arrival {
                    client_id,
                    ..arrival
                },
                peer,
                ctx,
            )
            .await
        }
    }
}

fn refuse(ctx: &Context, peer: SocketAddr, why: &'static str) {
    ctx.metrics.proxy_error(Direction::Inbound, why);
    warn!(%peer, "closing a direct inbound connection: {why}");
}

async fn read_header<I: AsyncRead + Unpin>(
    io: &mut I,
    client_id: Option<String>,
    peer: SocketAddr,
    ctx: &Context,
) -> Option<Arrival> {
    let header = tokio::time::timeout(ctx.config.detect_timeout, TransportHeader::read(io)).await;
    match header {
        Ok(Ok(header)) => Some(Arrival {
            port: header.port,
            opaque: header.opaque || ctx.config.opaque_ports.contains(&header.port),
            name: Some(header.name).filter(|n| !n.is_empty()),
            client_id,
            from_proxy: true,
            tunnel_to: header.tunnel_to,
        }),
        Ok(Err(error)) => {
            ctx.metrics
                .proxy_error(Direction::Inbound, "bad transport header");
            warn!(%peer, %error, "closing a direct inbound connection");
            None
        }
        Err(_elapsed) => {
            ctx.metrics
                .connection_timeout("inbound", "transport header");
            refuse(ctx, peer, "no mesh transport header in time");
            None
        }
    }
}

/// Serves a connection for the application port: opaque, or detected and served as HTTP.
async fn serve_app_port<I>(mut io: I, arrival: Arrival, peer: SocketAddr, ctx: Arc<Context>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Rare paths boxed, so that an HTTP connection's task does not reserve room for them.
    if let Some(listener) = ctx.own_ports.name_of(arrival.port) {
        return Box::pin(refuse_own_port(io, arrival, listener, peer, ctx)).await;
    }
    let app = SocketAddr::new(ctx.config.inbound_app_ip, arrival.port);
    let authority = Label::from(arrival.name.unwrap_or_else(|| app.to_string()));
    let tls = arrival.client_id.is_some();
    let labels = TargetLabels {
        direction: Direction::Inbound,
        authority,
        target_addr: Label::from(app.to_string()),
        tls: Label::new(if tls { "true" } else { "false" }),
        client_id: Label::from(arrival.client_id.unwrap_or_default()),
        server_id: if tls {
            ctx.local_id()
        } else {
            Label::default()
        },
    };
    let policy = ctx.policies.port(arrival.port).await;
    let client = ConnectionClient {
        ip: peer.ip(),
        identity: tls.then(|| labels.client_id.0.clone()),
    };
    if arrival.opaque {
        if admit_connection(&policy, &client, &ctx.metrics, &labels) {
            Box::pin(forward_tcp(io, app, &ctx, &labels)).await;
        }
        return;
    }
    let (protocol, prefix) = match detect::detect(&mut io, ctx.config.detect_timeout).await {
        Ok(detected) => detected,
        Err(error) => {
            debug!(%peer, %error, "connection failed during detection");
            return;
        }
    };
    let io = PrefixedIo::new(prefix, io);
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let forward = InboundHttp::new(
                ctx.clone(),
                ctx.direct_clients(app),
                labels.clone(),
                arrival.from_proxy,
            );
            // The connection itself is counted like an opaque one, so a workload's open
            // connections include its HTTP clients' (`stat`'s TCP column was 0 for them).
            let connection_labels = labels.clone();
            let _open = tcp::OpenConnection::new(&ctx.metrics, &connection_labels);
            let service = stack::inbound_http(&ctx, forward, policy, client, labels);
            server::serve_http(io, protocol, service, ctx.http_server("inbound")).await;
        }
        Protocol::Tls | Protocol::Opaque => {
            if admit_connection(&policy, &client, &ctx.metrics, &labels) {
                Box::pin(forward_tcp(io, app, &ctx, &labels)).await;
            }
        }
    }
}

/// A connection naming one of the proxy's own ports (through the transport header or the
/// original destination): never forwarded. An HTTP client is told why with `mesh-error`; any
/// other connection is closed.
async fn refuse_own_port<I>(
    mut io: I,
    arrival: Arrival,
    listener: &'static str,
    peer: SocketAddr,
    ctx: Arc<Context>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let error = ProxyError::own_port(arrival.port, listener);
    ctx.metrics.proxy_error(Direction::Inbound, error.reason());
    warn!(
        %peer,
        client = arrival.client_id.as_deref().unwrap_or("unauthenticated"),
        port = arrival.port,
        "refusing a connection for the proxy's own {listener} port"
    );
    if arrival.opaque {
        return;
    }
    let Ok((protocol @ (Protocol::Http1 | Protocol::Http2), prefix)) =
        detect::detect(&mut io, ctx.config.detect_timeout).await
    else {
        return;
    };
    let refusal = tower::service_fn(move |request: Request<Incoming>| {
        let response = error.to_response(is_grpc(&request));
        async move { Ok::<_, Infallible>(response) }
    });
    let io = PrefixedIo::new(prefix, io);
    server::serve_http(io, protocol, refusal, ctx.http_server("inbound")).await;
}

async fn forward_tcp<C>(client: C, app: SocketAddr, ctx: &Context, labels: &TargetLabels)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = tcp::forward(client, &Dial::Direct(app), ctx, labels).await {
        debug!(%app, %error, "inbound TCP forward ended with an error");
    }
}

/// The innermost inbound HTTP service: forwards each request to the application.
///
/// One per connection, shared: hyper clones the whole stack for every request, and the
/// clients alone are ~700 bytes of handles.
#[derive(Clone, Debug)]
pub struct InboundHttp(Arc<InboundConnection>);

#[derive(Debug)]
struct InboundConnection {
    ctx: Arc<Context>,
    clients: HttpClients,
    labels: TargetLabels,
    /// The metrics of the connection's last authority: a connection's requests almost always
    /// name the same one, so its labels and series are built once, not per request.
    target: ArcSwapOption<TargetMetrics>,
    /// The connection came from a client proxy, which may carry HTTP/1 over HTTP/2.
    from_proxy: bool,
}

impl InboundHttp {
    /// Forwards a connection's requests to the application with `clients`.
    pub fn new(
        ctx: Arc<Context>,
        clients: HttpClients,
        labels: TargetLabels,
        from_proxy: bool,
    ) -> Self {
        Self(Arc::new(InboundConnection {
            ctx,
            clients,
            labels,
            target: ArcSwapOption::empty(),
            from_proxy,
        }))
    }
}

impl InboundConnection {
    async fn forward(&self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        forward::restore_orig_proto(&mut request, self.from_proxy);
        let grpc = is_grpc(&request);
        let authority = request_authority(&request);
        let target = self.target(authority.as_deref());
        let uri_authority = authority.unwrap_or_else(|| target.labels.target_addr.0.to_string());
        let request = request.map(Either::Left);
        match forward::forward(&self.clients, request, &uri_authority, &uri_authority).await {
            Ok(mut response) => {
                response.extensions_mut().insert(target);
                response
            }
            Err(error) => self.error(error, grpc, target.labels.clone()),
        }
    }

    /// The connection's labels with the request's authority, when it names one.
    fn target(&self, authority: Option<&str>) -> Arc<TargetMetrics> {
        let wanted = authority.unwrap_or(&self.labels.authority.0);
        if let Some(cached) = self.target.load_full()
            && *cached.labels.authority.0 == *wanted
        {
            return cached;
        }
        let mut labels = self.labels.clone();
        if let Some(authority) = authority {
            labels.authority = Label::from(authority.to_string());
        }
        let target = Arc::new(TargetMetrics::new(self.ctx.metrics.clone(), labels));
        self.target.store(Some(target.clone()));
        target
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
        let this = self.0.clone();
        Box::pin(async move { Ok(this.forward(request).await) })
    }
}
