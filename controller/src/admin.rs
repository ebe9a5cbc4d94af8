//! The admin HTTP server: `/metrics`, `/ready`, `/live`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Metrics,
}

/// The admin routes.
pub fn router(health: Health, metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/ready", get(ready))
        .route("/live", get(live))
        .with_state(AdminState { health, metrics })
}

async fn metrics_handler(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// 200 once discovery has synced, 503 with the reason before. The body lists the problems
/// discovery is serving around (e.g. malformed files), which do not make it unready: the
/// last good state is still served.
async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    let health = state.health.state();
    let status = if health.synced {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, health.report())
}

async fn live() -> &'static str {
    "live\n"
}

/// Serves the admin routes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(health, metrics))
        .with_graceful_shutdown(shutdown)
        .await
}
