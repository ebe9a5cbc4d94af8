//! The outbound side: connections from the local application, captured by iptables (the
//! original destination names the target) or sent to the listener as to an HTTP proxy (the
//! request's authority names it).
//!
//! Per connection: find the target, detect the protocol, then serve HTTP through the outbound
//! stack (`stack::outbound_http`) or forward opaque bytes to a balanced endpoint.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};

use http::{Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::app::{Context, accept_loop};
use crate::capture;
use crate::client::Dial;
use crate::detect::{self, PrefixedIo, Protocol};
use crate::discovery::{Resolution, State, TargetKey};
use crate::http::{ProxyBody, ProxyError, is_grpc};
use crate::metrics::{Direction, Label, TargetLabels};
use crate::{forward, server, stack, tcp};

/// Accepts outbound connections until the drain starts.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, connections: TaskTracker) {
    let drain = ctx.drain.clone();
    accept_loop(
        listener,
        "outbound",
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
    // A captured connection's original destination differs from our own listener address;
    // a connection made to the listener itself is an application using us as an HTTP proxy.
    let orig_dst = capture::original_dst(&stream)
        .ok()
        .filter(|dst| Some(*dst) != local);
    if let Some(dst) = orig_dst
        && ctx.config.opaque_ports.contains(&dst.port())
    {
        return forward_tcp(stream, TargetKey::Addr(dst), &ctx).await;
    }
    let (protocol, prefix) = match detect::detect(&mut stream, ctx.config.detect_timeout).await {
        Ok(detected) => detected,
        Err(error) => {
            debug!(%peer, %error, "connection failed during detection");
            return;
        }
    };
    let io = PrefixedIo::new(prefix, stream);
    match (protocol, orig_dst) {
        (Protocol::Http1 | Protocol::Http2, _) => {
            let service = stack::outbound_http(&ctx, OutboundHttp::new(ctx.clone(), orig_dst));
            server::serve_http(io, protocol, service, ctx.drain.clone()).await;
        }
        (Protocol::Tls | Protocol::Opaque, Some(dst)) => {
            forward_tcp(io, TargetKey::Addr(dst), &ctx).await;
        }
        (Protocol::Tls | Protocol::Opaque, None) => {
            ctx.metrics.proxy_error(Direction::Outbound, "no target");
            warn!(%peer, "a non-HTTP connection to the outbound listener has no original destination; closing it");
        }
    }
}

/// Forwards an opaque connection to a balanced endpoint of the target, or to the target
/// itself when discovery doesn't know it.
async fn forward_tcp<C>(client: C, key: TargetKey, ctx: &Context)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let resolution = ctx.discovery.resolve(key.clone());
    let state = resolution.state(ctx.config.discovery_timeout).await;
    let (dial, authority, _pick) = match state {
        State::Known { authority } => match resolution.balancer.pick(None) {
            Some(pick) => (pick.meta().tcp_dial(&authority.0), authority, Some(pick)),
            None => {
                ctx.metrics.proxy_error(Direction::Outbound, "no endpoints");
                warn!(target = %key, "no endpoints; closing the connection");
                return;
            }
        },
        State::NotFound | State::Pending => match &key {
            TargetKey::Addr(addr) => (Dial::Direct(*addr), Label::from(key.to_string()), None),
            TargetKey::Authority(_) => {
                ctx.metrics
                    .proxy_error(Direction::Outbound, "discovery unavailable");
                return;
            }
        },
    };
    let labels = outbound_labels(
        ctx,
        authority,
        dial.socket_addr().to_string(),
        dial.tls_identity(),
    );
    if let Err(error) = tcp::forward(
        client,
        &dial,
        ctx.config.connect_timeout,
        &ctx.metrics,
        &labels,
    )
    .await
    {
        debug!(target = %key, %error, "TCP forward ended with an error");
    }
}

/// The metric labels of outbound traffic; `server_id` is the identity the peer proved.
fn outbound_labels(
    ctx: &Context,
    authority: Label,
    target_addr: String,
    server_id: Option<&str>,
) -> TargetLabels {
    TargetLabels {
        direction: Direction::Outbound,
        authority,
        target_addr: Label::from(target_addr),
        tls: Label::new(if server_id.is_some() { "true" } else { "false" }),
        client_id: if server_id.is_some() {
            ctx.local_id()
        } else {
            Label::default()
        },
        server_id: Label::new(server_id.unwrap_or_default()),
    }
}

/// The innermost outbound HTTP service: routes each request to an endpoint and forwards it.
#[derive(Clone, Debug)]
pub struct OutboundHttp {
    ctx: Arc<Context>,
    orig_dst: Option<SocketAddr>,
    /// The connection's target resolution, when the connection has one target.
    resolution: Arc<OnceLock<Arc<Resolution>>>,
}

impl OutboundHttp {
    fn new(ctx: Arc<Context>, orig_dst: Option<SocketAddr>) -> Self {
        Self {
            ctx,
            orig_dst,
            resolution: Arc::new(OnceLock::new()),
        }
    }

    fn resolve(&self, key: TargetKey) -> Arc<Resolution> {
        if self.orig_dst.is_some() {
            return self
                .resolution
                .get_or_init(|| self.ctx.discovery.resolve(key))
                .clone();
        }
        self.ctx.discovery.resolve(key)
    }

    async fn forward(self, request: Request<Incoming>) -> Response<ProxyBody> {
        let grpc = is_grpc(&request);
        let authority = request_authority(&request);
        let key = match (self.orig_dst, &authority) {
            (Some(dst), _) => TargetKey::Addr(dst),
            (None, Some(authority)) => TargetKey::Authority(authority.clone()),
            (None, None) => {
                return self.error(
                    ProxyError::BadRequest("the request names no authority (Host)".into()),
                    grpc,
                    None,
                );
            }
        };
        if request.method() == Method::CONNECT {
            return self.connect_tunnel(request, key).await;
        }
        let resolution = self.resolve(key.clone());
        let state = match resolution.current_state() {
            State::Pending => resolution.state(self.ctx.config.discovery_timeout).await,
            state => state,
        };
        let (clients, logical, pick) = match state {
            State::Known { authority } => match resolution.balancer.pick(None) {
                Some(pick) => (pick.meta().clients.clone(), authority, Some(pick)),
                None => {
                    let labels = outbound_labels(
                        &self.ctx,
                        authority.clone(),
                        authority.0.to_string(),
                        None,
                    );
                    return self.error(
                        ProxyError::NoEndpoints(format!("{} has no ready endpoints", authority.0)),
                        grpc,
                        Some(labels),
                    );
                }
            },
            State::NotFound | State::Pending => match self.direct_target(&key).await {
                Ok(addr) => (
                    self.ctx.direct_clients(addr),
                    Label::from(key.to_string()),
                    None,
                ),
                Err(error) => return self.error(error, grpc, None),
            },
        };
        let labels = outbound_labels(
            &self.ctx,
            logical,
            clients.dial.socket_addr().to_string(),
            clients.dial.tls_identity(),
        );

        let uri_authority = authority.unwrap_or_else(|| key.to_string());
        let forwarded = forward::forward(&clients, request, &uri_authority).await;
        match forwarded {
            Ok(mut response) => {
                if let Some(pick) = pick {
                    pick.complete();
                }
                response.extensions_mut().insert(labels);
                response
            }
            Err(error) => self.error(error, grpc, Some(labels)),
        }
    }

    /// An HTTP proxy CONNECT: answer 200, then forward the tunnel's bytes as TCP.
    async fn connect_tunnel(
        &self,
        mut request: Request<Incoming>,
        key: TargetKey,
    ) -> Response<ProxyBody> {
        let ctx = self.ctx.clone();
        let upgrade = hyper::upgrade::on(&mut request);
        let key = match &key {
            TargetKey::Authority(authority) => match authority.parse::<SocketAddr>() {
                Ok(addr) => TargetKey::Addr(addr),
                Err(_) => key,
            },
            TargetKey::Addr(_) => key,
        };
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let io = hyper_util::rt::TokioIo::new(upgraded);
                    let resolution = ctx.discovery.resolve(key.clone());
                    let state = resolution.state(ctx.config.discovery_timeout).await;
                    match (state, &key) {
                        (State::NotFound | State::Pending, TargetKey::Authority(authority)) => {
                            // Not a mesh service: resolve the name as the app would have.
                            let addr = tokio::net::lookup_host(authority.as_str())
                                .await
                                .ok()
                                .and_then(|mut addrs| addrs.next());
                            match addr {
                                Some(addr) => forward_tcp(io, TargetKey::Addr(addr), &ctx).await,
                                None => debug!(%authority, "CONNECT target does not resolve"),
                            }
                        }
                        _ => forward_tcp(io, key, &ctx).await,
                    }
                }
                Err(error) => debug!(%error, "CONNECT upgrade failed"),
            }
        });
        Response::new(Either::Right(Full::default()))
    }

    /// Where to send a request discovery doesn't know: its original destination, or in proxy
    /// mode the authority resolved as the application would have (DNS, /etc/hosts).
    async fn direct_target(&self, key: &TargetKey) -> Result<SocketAddr, ProxyError> {
        match key {
            TargetKey::Addr(addr) => Ok(*addr),
            TargetKey::Authority(authority) => tokio::net::lookup_host(authority.as_str())
                .await
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| {
                    ProxyError::DiscoveryUnavailable(format!(
                        "{authority} is not a mesh service and does not resolve"
                    ))
                }),
        }
    }

    fn error(
        &self,
        error: ProxyError,
        grpc: bool,
        labels: Option<TargetLabels>,
    ) -> Response<ProxyBody> {
        warn!(
            reason = error.reason(),
            detail = error.detail(),
            "outbound request failed"
        );
        self.ctx
            .metrics
            .proxy_error(Direction::Outbound, error.reason());
        let mut response = error.to_response(grpc);
        if let Some(labels) = labels {
            response.extensions_mut().insert(labels);
        }
        response
    }
}

impl tower::Service<Request<Incoming>> for OutboundHttp {
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

/// The request's `host:port`: from an absolute URI or the Host header, with the scheme's
/// default port when none is given.
pub fn request_authority<B>(request: &Request<B>) -> Option<String> {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })?;
    if authority.is_empty() {
        return None;
    }
    if has_port(&authority) {
        return Some(authority);
    }
    let port = if request.uri().scheme_str() == Some("https") {
        443
    } else {
        80
    };
    Some(format!("{authority}:{port}"))
}

fn has_port(authority: &str) -> bool {
    if let Some(rest) = authority.strip_prefix('[') {
        // An IPv6 literal: the port, if any, follows the closing bracket.
        return rest
            .split_once(']')
            .is_some_and(|(_, after)| after.starts_with(':'));
    }
    authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority_of(uri: &str, host: Option<&str>) -> Option<String> {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header("host", host);
        }
        request_authority(&builder.body(()).expect("request"))
    }

    #[test]
    fn authorities_get_their_default_port() {
        let cases = [
            ("http://books.shop:8080/x", None, Some("books.shop:8080")),
            ("http://books.shop/x", None, Some("books.shop:80")),
            ("/x", Some("books.shop"), Some("books.shop:80")),
            ("/x", Some("books.shop:9090"), Some("books.shop:9090")),
            ("/x", Some("[::1]:9090"), Some("[::1]:9090")),
            ("/x", Some("[::1]"), Some("[::1]:80")),
            ("https://secure.shop/x", None, Some("secure.shop:443")),
            ("/x", None, None),
        ];
        for (uri, host, want) in cases {
            assert_eq!(authority_of(uri, host).as_deref(), want, "{uri} {host:?}");
        }
    }
}
