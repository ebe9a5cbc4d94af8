//! `books`: answers `GET /books/ID` over HTTP/1.1 or HTTP/2 in a few milliseconds, failing
//! `FAILURE_PERCENT` (default 5) percent of requests with 500 so the dashboard has failures to
//! show. The demo's `archive` runs this role too, with no failures.

use std::convert::Infallible;

use http::StatusCode;

use super::{net, serve};

/// How long an answer takes, in milliseconds (`LATENCY_MS`).
const LATENCY_MS: &str = "1-5";

pub async fn run() -> anyhow::Result<()> {
    let failure_percent: f64 = super::env_parsed("FAILURE_PERCENT", 5.0)?;
    anyhow::ensure!(
        (0.0..=100.0).contains(&failure_percent),
        "FAILURE_PERCENT={failure_percent} is not between 0 and 100"
    );
    let latency = super::parse_millis_range(
        &super::env("LATENCY_MS").unwrap_or_else(|| LATENCY_MS.to_owned()),
    )?;
    let addr = net::listen_addr(8080)?;
    eprintln!(
        "books: listening on {addr} (HTTP/1.1 and HTTP/2); failing {failure_percent}% of requests"
    );
    serve::http(addr, move |request| async move {
        let path = request.uri().path().to_owned();
        if path == "/healthz" {
            return Ok::<_, Infallible>(serve::text(StatusCode::OK, "ok\n"));
        }
        tokio::time::sleep(super::random_delay(latency)).await;
        if rand::random_range(0.0..100.0) < failure_percent {
            return Ok(serve::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the shelf collapsed (a failure on purpose)\n",
            ));
        }
        let id = path.trim_start_matches("/books/");
        Ok(serve::text(StatusCode::OK, &title(id)))
    })
    .await
}

/// A made-up title for a book id.
fn title(id: &str) -> String {
    const WORDS: [&str; 8] = [
        "Rust", "Mesh", "Proxy", "Tales", "Sidecar", "Packets", "Winter", "Garden",
    ];
    let n: usize = id.parse().unwrap_or(0);
    format!(
        "\"{} of the {}\"",
        WORDS[n % WORDS.len()],
        WORDS[(n / WORDS.len()) % WORDS.len()]
    )
}
