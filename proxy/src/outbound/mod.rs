//! The outbound side: connections from the local application, captured by iptables (the
//! original destination names the target) or sent to the listener as to an HTTP proxy (the
//! request's authority names it).
//!
//! Per connection: find the target, detect the protocol, then serve HTTP through the outbound
//! stack (`stack::outbound_http`: router, concurrency limit, timeout, retries, endpoint) or forward opaque bytes
//! to a balanced endpoint.

mod concurrency;
mod endpoint;
mod plans;
mod router;

pub use concurrency::{ConcurrencyLimit, ConcurrencyLimitLayer, InFlight, Slot};
pub use endpoint::OutboundEndpoint;
pub use plans::PlanStore;
pub use router::{Dispatch, DispatchTarget, OutboundRouter};

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::app::{Accept, Context, accept_loop};
use crate::capture;
use crate::client::Dial;
use crate::detect::{self, PrefixedIo, Protocol};
use crate::discovery::{State, TargetKey};
use crate::http::ProxyBody;
use crate::metrics::{Direction, Label, TargetLabels};
use crate::{server, stack, tcp};

/// Accepts outbound connections until the drain starts.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, connections: TaskTracker) {
    let accept = Accept {
        name: "outbound",
        max_connections: ctx.config.limits.outbound_connections,
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
        // Forwarding's state (discovery, dial, TLS, copy) is boxed wherever it is awaited, so
        // that an HTTP connection's task does not reserve room for it: 6.8 -> 1.8 KiB a task.
        let io = PrefixedIo::new(bytes::Bytes::new(), stream);
        return Box::pin(forward_tcp(io, TargetKey::Addr(dst), None, &ctx)).await;
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
            let service = stack::outbound_http(&ctx, orig_dst, peer.ip());
            server::serve_http(io, protocol, service, ctx.http_server("outbound")).await;
        }
        (Protocol::Tls | Protocol::Opaque, Some(dst)) => {
            Box::pin(forward_tcp(io, TargetKey::Addr(dst), Some(protocol), &ctx)).await;
        }
        (Protocol::Tls | Protocol::Opaque, None) => {
            ctx.metrics.proxy_error(Direction::Outbound, "no target");
            warn!(%peer, "a non-HTTP connection to the outbound listener has no original destination; closing it");
        }
    }
}

/// Forwards an opaque connection to a balanced endpoint of the target, or to the target
/// itself when discovery doesn't know it (and, outside the mesh, its EgressNetwork allows it:
/// TLS by the server name it asks for, anything else by port). `protocol` is `None` where
/// nothing was detected (opaque ports, CONNECT tunnels).
async fn forward_tcp<C>(
    mut client: PrefixedIo<C>,
    key: TargetKey,
    protocol: Option<Protocol>,
    ctx: &Context,
) where
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
            TargetKey::Addr(addr) => {
                if let Some(error) = ctx.own_ports.refuse(*addr) {
                    ctx.metrics.proxy_error(Direction::Outbound, error.reason());
                    warn!(target = %key, "closing a connection: {}", error.detail());
                    return;
                }
                let authority = match egress_check(&mut client, *addr, protocol, ctx).await {
                    Ok(authority) => authority,
                    Err(error) => {
                        ctx.metrics.proxy_error(Direction::Outbound, error.reason());
                        warn!(target = %key, "closing a connection: {}", error.detail());
                        return;
                    }
                };
                (Dial::Direct(*addr), authority, None)
            }
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
    if let Err(error) = tcp::forward(client, &dial, ctx, &labels).await {
        debug!(target = %key, %error, "TCP forward ended with an error");
    }
}

/// Whether the egress policy of `addr`, an address discovery does not know, allows this
/// connection; its metric label (the TLS server name when there is one) when it does. An
/// undetected connection is detected only when its port alone is not allowed, so a
/// server-speaks-first protocol is not held up where nothing needs its first bytes.
async fn egress_check<C>(
    client: &mut PrefixedIo<C>,
    addr: SocketAddr,
    protocol: Option<Protocol>,
    ctx: &Context,
) -> Result<Label, crate::http::ProxyError>
where
    C: tokio::io::AsyncRead + Unpin,
{
    let by_address = || Label::from(addr.to_string());
    let Some(plan) = ctx.plans.plan(&TargetKey::Addr(addr)).await else {
        return Ok(by_address());
    };
    let Some(egress) = &plan.egress else {
        return Ok(by_address());
    };
    let protocol = match protocol {
        Some(protocol) => protocol,
        None if egress.refuses_tcp().is_none() => {
            let authority = by_address();
            egress.count(&ctx.metrics, &authority, "tcp", true);
            return Ok(authority);
        }
        None => match detect::detect(client, ctx.config.detect_timeout).await {
            Ok((protocol, prefix)) => {
                client.unread(prefix);
                protocol
            }
            Err(_) => Protocol::Opaque,
        },
    };
    let (authority, refusal, kind) = if protocol == Protocol::Tls {
        let server_name = crate::egress::read_server_name(client, ctx.config.detect_timeout).await;
        let authority = match &server_name {
            Some(name) => Label::from(ctx.egress_hosts.label(
                &crate::egress::host_of(name),
                addr.port(),
                &addr.to_string(),
            )),
            None => by_address(),
        };
        (authority, egress.refuses_tls(server_name.as_deref()), "tls")
    } else {
        (by_address(), egress.refuses_tcp(), "tcp")
    };
    egress.count(&ctx.metrics, &authority, kind, refusal.is_none());
    refusal.map_or(Ok(authority), Err)
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

/// The answer to an outbound request the proxy cannot forward: logged, counted, and labelled
/// for the metrics layer when the target is known.
fn error_response(
    ctx: &Context,
    error: crate::http::ProxyError,
    grpc: bool,
    labels: Option<TargetLabels>,
) -> Response<ProxyBody> {
    warn!(
        reason = error.reason(),
        detail = error.detail(),
        "outbound request failed"
    );
    ctx.metrics.proxy_error(Direction::Outbound, error.reason());
    let mut response = error.to_response(grpc);
    if let Some(labels) = labels {
        response.extensions_mut().insert(labels);
    }
    response
}

/// An HTTP proxy CONNECT: answer 200, then forward the tunnel's bytes as TCP.
fn connect_tunnel(
    ctx: Arc<Context>,
    mut request: Request<Incoming>,
    key: TargetKey,
) -> Response<ProxyBody> {
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
                let io =
                    PrefixedIo::new(bytes::Bytes::new(), hyper_util::rt::TokioIo::new(upgraded));
                let resolution = ctx.discovery.resolve(key.clone());
                let state = resolution.state(ctx.config.discovery_timeout).await;
                match (state, &key) {
                    (State::NotFound | State::Pending, TargetKey::Authority(authority)) => {
                        // Not a mesh service: resolve the name as the app would have.
                        match router::direct_target(&key, &ctx).await {
                            Ok(addr) => forward_tcp(io, TargetKey::Addr(addr), None, &ctx).await,
                            Err(_) => debug!(%authority, "CONNECT target does not resolve"),
                        }
                    }
                    _ => forward_tcp(io, key, None, &ctx).await,
                }
            }
            Err(error) => debug!(%error, "CONNECT upgrade failed"),
        }
    });
    Response::new(Either::Right(Full::default()))
}

/// The request's `host:port`: from an absolute URI or the Host header, with the scheme's
/// default port when none is given.
pub fn request_authority<B>(request: &Request<B>) -> Option<String> {
    let authority = match request.uri().authority() {
        Some(authority) => authority.as_str(),
        None => request.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    // An empty port is the scheme's default (RFC 3986 §3.2.3); an empty host names nothing.
    let authority = authority.strip_suffix(':').unwrap_or(authority);
    if authority.is_empty() || authority.starts_with(':') {
        return None;
    }
    if has_port(authority) {
        return Some(authority.to_string());
    }
    let port = if request.uri().scheme_str() == Some("https") {
        ":443"
    } else {
        ":80"
    };
    // Once per request: concatenated, not formatted.
    let mut with_port = String::with_capacity(authority.len() + port.len());
    with_port.push_str(authority);
    with_port.push_str(port);
    Some(with_port)
}

fn has_port(authority: &str) -> bool {
    if let Some(rest) = authority.strip_prefix('[') {
        // An IPv6 literal: the port, if any, follows the closing bracket.
        return rest.split_once(']').is_some_and(|(_, after)| {
            after
                .strip_prefix(':')
                .is_some_and(|port| port.parse::<u16>().is_ok())
        });
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

    /// Found by fuzzing (tests/fuzz): `[::1]:` came back without a port number and `:80`
    /// without a host.
    #[test]
    fn an_empty_port_is_the_default_and_an_empty_host_is_none() {
        let cases = [
            ("[::1]:", None, Some("[::1]:80")),
            ("/x", Some("[::1]:"), Some("[::1]:80")),
            ("/x", Some("books.shop:"), Some("books.shop:80")),
            (":80", None, None),
            ("/x", Some(":"), None),
        ];
        for (uri, host, want) in cases {
            assert_eq!(authority_of(uri, host).as_deref(), want, "{uri} {host:?}");
        }
    }
}
