//! The admin server: metrics, liveness, readiness, graceful shutdown, a config dump, the
//! proxy's identity (certificates only, never the key), and the Tap gRPC service.
//!
//! HTTP/1 and HTTP/2 share the port. Tap exposes request metadata, so it is served only to
//! the pod itself (plaintext from loopback) and, over mesh TLS, to the identity allowed to
//! tap (`MESH_PROXY_TAP_IDENTITY`, the controller's by default).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proto::tap::tap_server::TapServer;
use tokio::net::TcpListener;
use tower::Service;
use tracing::{debug, info};

use crate::app::Context;
use crate::discovery::State;
use crate::tap::TapService;

/// Serves the admin API until the task is aborted.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            let is_tls = matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16);
            match (is_tls, &ctx.tls) {
                (true, Some(tls)) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                    match acceptor.accept(stream).await {
                        Ok(stream) => {
                            let client = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .and_then(crate::tls::spiffe_id);
                            serve_connection(stream, ctx, peer, client).await;
                        }
                        Err(error) => debug!(%peer, %error, "admin TLS handshake failed"),
                    }
                }
                _ => serve_connection(stream, ctx, peer, None).await,
            }
        });
    }
}

async fn serve_connection<I>(io: I, ctx: Arc<Context>, peer: SocketAddr, client: Option<String>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tap = TapServer::new(TapService::new(ctx.tap.clone()));
    // A TLS client is judged by the identity it proved, wherever it connects from: on a
    // shared loopback (the local mesh without namespaces) every pod is "local", and a
    // client presenting the wrong identity must still be refused. Plaintext is for the pod
    // itself only.
    let may_tap = match client.as_deref() {
        Some(id) => Some(id) == ctx.config.tap_identity.as_deref(),
        None => peer.ip().is_loopback(),
    };
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let ctx = ctx.clone();
        let mut tap = tap.clone();
        async move {
            if request.uri().path().starts_with("/mesh.tap.v1.Tap/") {
                if !may_tap {
                    return Ok::<_, Infallible>(tap_refused().map(Either::Left));
                }
                let response = match tap.call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                return Ok(response.map(Either::Right));
            }
            Ok(handle(&ctx, peer, request).map(Either::Left))
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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
fn tap_refused() -> Response<Full<Bytes>> {
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

fn handle(ctx: &Context, peer: SocketAddr, request: Request<Incoming>) -> Response<Full<Bytes>> {
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
            // Only the pod itself may stop its proxy.
            if peer.ip().is_loopback() {
                info!(%peer, "shutdown requested");
                ctx.drain.cancel();
                text(StatusCode::OK, "shutting down\n")
            } else {
                text(
                    StatusCode::FORBIDDEN,
                    "shutdown is only allowed from loopback\n",
                )
            }
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
