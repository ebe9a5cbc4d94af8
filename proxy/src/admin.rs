//! The admin server: metrics, liveness, readiness, graceful shutdown and a config dump.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::app::Context;
use crate::discovery::State;

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
            let service = hyper::service::service_fn(move |request| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(&ctx, peer, request)) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "admin connection failed");
            }
        });
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
        (_, "/metrics" | "/live" | "/ready" | "/config") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
        }
        (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /ready, /live, /config, POST /shutdown\n",
        ),
    }
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
