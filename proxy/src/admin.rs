//! The admin server: metrics, liveness, readiness, graceful shutdown, a config dump, the
//! proxy's identity (certificates only, never the key), and the Tap gRPC service.
//!
//! HTTP/1 and HTTP/2 share the port, which every workload can reach, so what a caller may do
//! depends on who it is (as Linkerd's admin server does):
//! - `/metrics`, `/ready`, `/live`: anyone (Prometheus, the kubelet);
//! - `/config`, `/identity` and tap, which reveal configuration and traffic: the pod itself
//!   (plaintext from loopback) and, over mesh TLS, the controller's identity
//!   (`MESH_PROXY_TAP_IDENTITY`);
//! - `POST /shutdown`: the pod itself only.
//!
//! "Loopback" means the pod: the proxy never forwards a connection to its own listeners
//! (`app::OwnPorts`), so no peer reaches this server from loopback through the proxy. A
//! refusal is 403 with `mesh-error` naming the caller and who may ask.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_proto::tap::tap_server::TapServer;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tracing::{debug, info, warn};

use crate::app::{Accept, Context, accept_loop};
use crate::discovery::State;
use crate::tap::TapService;

/// Serves the admin API until the task is aborted.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>) {
    let accept = Accept {
        name: "admin",
        max_connections: ctx.config.limits.admin_connections,
        metrics: ctx.metrics.clone(),
        // The admin server outlives the drain (it reports not ready meanwhile): it stops when
        // its task is aborted.
        stop: CancellationToken::new(),
        connections: TaskTracker::new(),
        // On the main thread: the admin server is not on the request path.
        workers: crate::workers::Workers::none(),
    };
    accept_loop(listener, accept, move |stream, peer| {
        let ctx = ctx.clone();
        async move { connection(stream, peer, ctx).await }
    })
    .await;
}

/// Who is asking, as far as the admin server can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Caller {
    /// Plaintext from loopback: a process of the pod itself (the proxy never forwards a
    /// connection to its own listeners, so no peer arrives this way through it).
    Pod,
    /// Over mesh TLS, proving this SPIFFE ID.
    Identity(String),
    /// Plaintext from another address: the kubelet, Prometheus, any other pod.
    Remote(IpAddr),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pod => f.write_str("the pod itself"),
            Self::Identity(id) => f.write_str(id),
            Self::Remote(ip) => write!(f, "{ip} (no mesh identity)"),
        }
    }
}

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Metrics and probes: Prometheus and the kubelet reach them from anywhere.
    Open,
    /// What reveals the proxy's configuration and traffic (`/config`, `/identity`, tap): the
    /// pod itself and the controller's identity.
    Reveal,
    /// What changes the proxy's state (`/shutdown`): the pod itself only.
    Control,
}

impl Caller {
    fn may(&self, access: Access, controller: Option<&str>) -> bool {
        match (access, self) {
            (Access::Open, _) | (_, Self::Pod) => true,
            (Access::Reveal, Self::Identity(id)) => Some(id.as_str()) == controller,
            _ => false,
        }
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    let limits = &ctx.config.limits;
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(
        limits.http_header_read_timeout,
        stream.peek(&mut first),
    )
    .await
    {
        Ok(Ok(1)) => first[0] == 0x16,
        Ok(_) => return,
        Err(_elapsed) => {
            ctx.metrics.connection_timeout("admin", "first byte");
            return;
        }
    };
    if !is_tls {
        // A TLS client is judged by the identity it proved, wherever it connects from; only
        // plaintext from loopback is the pod itself.
        let ip = peer.ip().to_canonical();
        let caller = if ip.is_loopback() {
            Caller::Pod
        } else {
            Caller::Remote(ip)
        };
        return serve_connection(stream, ctx, caller).await;
    }
    let Some(tls) = &ctx.tls else {
        debug!(%peer, "TLS on the admin port of a proxy without identity; closing");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let stream =
        match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                debug!(%peer, %error, "admin TLS handshake failed");
                return;
            }
            Err(_elapsed) => {
                ctx.metrics.connection_timeout("admin", "tls handshake");
                warn!(%peer, "admin TLS handshake timed out");
                return;
            }
        };
    let Some(client) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(crate::tls::spiffe_id)
    else {
        debug!(%peer, "admin TLS client certificate names no SPIFFE ID; closing");
        return;
    };
    serve_connection(stream, ctx, Caller::Identity(client)).await;
}

async fn serve_connection<I>(io: I, ctx: Arc<Context>, caller: Caller)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tap = TapServer::new(TapService::new(ctx.tap.clone()));
    let header_read_timeout = ctx.config.limits.http_header_read_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let ctx = ctx.clone();
        let mut tap = tap.clone();
        let caller = caller.clone();
        async move {
            let controller = ctx.config.tap_identity.as_deref();
            if request.uri().path().starts_with("/mesh.tap.v1.Tap/") {
                if !caller.may(Access::Reveal, controller) {
                    return Ok::<_, Infallible>(tap_refused(&caller).map(Either::Left));
                }
                let response = match tap.call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                return Ok(response.map(Either::Right));
            }
            Ok(handle(&ctx, &caller, request).map(Either::Left))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    if let Err(error) = builder.serve_connection(TokioIo::new(io), service).await {
        debug!(%error, "admin connection failed");
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A gRPC refusal (trailers-only, PERMISSION_DENIED), so a tap client is told why rather
/// than seeing an HTTP status it cannot place.
fn tap_refused(caller: &Caller) -> Response<Full<Bytes>> {
    debug!(%caller, "tap refused");
    let mut response = Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", header::HeaderValue::from_static("7"));
    headers.insert(
        "grpc-message",
        header::HeaderValue::from_static(
            "tap is only for the pod itself (loopback) and the controller's identity",
        ),
    );
    response
}

/// The refusal of `request` to `caller`, with `mesh-error` naming who may ask instead.
fn forbidden(
    ctx: &Context,
    caller: &Caller,
    request: &Request<Incoming>,
    access: Access,
) -> Response<Full<Bytes>> {
    let who = match (access, ctx.config.tap_identity.as_deref()) {
        (Access::Reveal, Some(controller)) => {
            format!("the pod itself (plaintext on loopback) and {controller}")
        }
        _ => "the pod itself (plaintext on loopback)".to_string(),
    };
    let message = format!(
        "forbidden: {} {} is only served to {who}; the caller is {caller}",
        request.method(),
        request.uri().path()
    );
    info!(%caller, path = request.uri().path(), "admin request refused");
    let mut response = text(StatusCode::FORBIDDEN, format!("{message}\n"));
    if let Ok(value) = header::HeaderValue::from_str(&message) {
        response
            .headers_mut()
            .insert(crate::http::MESH_ERROR, value);
    }
    response
}

fn handle(ctx: &Context, caller: &Caller, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let access = match request.uri().path() {
        "/config" | "/identity" => Access::Reveal,
        "/shutdown" => Access::Control,
        _ => Access::Open,
    };
    if !caller.may(access, ctx.config.tap_identity.as_deref()) {
        return forbidden(ctx, caller, &request, access);
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut response = text(StatusCode::OK, ctx.metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if ctx.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::POST, "/shutdown") => {
            info!(%caller, "shutdown requested");
            ctx.drain.cancel();
            text(StatusCode::OK, "shutting down\n")
        }
        (&Method::GET, "/config") => {
            let mut response = text(StatusCode::OK, config_dump(ctx));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        (&Method::GET, "/identity") => identity(ctx),
        (_, "/metrics" | "/live" | "/ready" | "/config" | "/identity") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
        }
        (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /ready, /live, /config, /identity, POST /shutdown\n",
        ),
    }
}

/// `GET /identity`: the identity report as JSON; 404 (with a report saying `disabled`) when
/// the proxy runs without identity, so a client can tell that from a proxy without the
/// endpoint.
fn identity(ctx: &Context) -> Response<Full<Bytes>> {
    let (status, report) = match &ctx.tls {
        Some(tls) => (StatusCode::OK, tls.identity().report()),
        None => (
            StatusCode::NOT_FOUND,
            mesh_spiffe::report::IdentityReport::disabled(),
        ),
    };
    let body = serde_json::to_string_pretty(&report)
        .unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"));
    let mut response = text(status, body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn config_dump(ctx: &Context) -> String {
    let targets: Vec<_> = ctx
        .discovery
        .snapshot()
        .iter()
        .map(|resolution| {
            let state = match resolution.current_state() {
                State::Pending => "pending".to_string(),
                State::NotFound => "not found".to_string(),
                State::Known { authority } => format!("known as {}", authority.0),
            };
            serde_json::json!({
                "target": resolution.key.to_string(),
                "state": state,
                "endpoints": resolution
                    .balancer
                    .addrs()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    let dump = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "config": ctx.config,
        "targets": targets,
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_gets_what_it_may() {
        let controller = "spiffe://cluster.local/ns/mesh-system/sa/mesh-controller";
        let pod = Caller::Pod;
        let controller_id = Caller::Identity(controller.to_owned());
        let other_id = Caller::Identity("spiffe://cluster.local/ns/shop/sa/web".to_owned());
        let remote = Caller::Remote("10.0.0.7".parse().expect("ip"));
        // (caller, access, allowed)
        let cases = [
            (&pod, Access::Open, true),
            (&pod, Access::Reveal, true),
            (&pod, Access::Control, true),
            (&controller_id, Access::Open, true),
            (&controller_id, Access::Reveal, true),
            (&controller_id, Access::Control, false),
            (&other_id, Access::Open, true),
            (&other_id, Access::Reveal, false),
            (&other_id, Access::Control, false),
            (&remote, Access::Open, true),
            (&remote, Access::Reveal, false),
            (&remote, Access::Control, false),
        ];
        for (caller, access, allowed) in cases {
            assert_eq!(
                caller.may(access, Some(controller)),
                allowed,
                "{caller} {access:?}"
            );
        }
        // Without a controller identity configured, only the pod reads its configuration.
        assert!(!controller_id.may(Access::Reveal, None));
    }
}
