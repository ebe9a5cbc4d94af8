//! `meshctl demo-app ROLE` (hidden): the demo application `meshctl demo` runs, shipped inside
//! meshctl so the demo needs nothing downloaded. Each role is one service:
//!
//! ```text
//! traffic --HTTP/1.1--> web --HTTP/2 (h2c)--> books      (fails 5% with 500, a few ms)
//!    |                   \--gRPC-----------> authors    (20-50 ms; all-authenticated policy)
//!    \--HTTP/1.1--> archive                               (a `books` whose policy is deny)
//! ```
//!
//! Services address each other by Kubernetes service names, so the same commands work in a
//! local mesh's root mode (hosts file + iptables capture) and loopback mode (`HTTP_PROXY`),
//! and in a real cluster. [`net`] holds that; [`MANIFEST`] is the built-in demo YAML.
//! Settings come from the environment, as in a Deployment's `env`.

mod authors;
mod books;
mod net;
mod serve;
mod traffic;
mod web;

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

/// The demo's gRPC API, generated from `cli/proto/demo/v1/authors.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("mesh.demo.v1");
}

/// The built-in demo: Namespace `demo` (meshed), its ServiceAccounts, Services and
/// Deployments. Container commands say `meshctl`; `meshctl demo` puts its own path there.
pub const MANIFEST: &str = include_str!("demo.yaml");

/// The workloads of [`MANIFEST`] that serve traffic, in the order a summary lists them.
pub const SERVING_WORKLOADS: &[&str] = &["web", "books", "authors"];

/// The namespace of [`MANIFEST`].
pub const NAMESPACE: &str = "demo";

/// `meshctl demo-app`.
#[derive(Debug, Args)]
pub struct DemoAppArgs {
    /// Which service to run.
    #[arg(value_enum)]
    role: Role,
}

/// The services of the demo app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// HTTP/1.1 front end on $PORT (8080): each request calls books (HTTP/2) and authors (gRPC).
    Web,
    /// HTTP/1.1 and HTTP/2 server on $PORT (8080); fails $FAILURE_PERCENT (5) % with 500.
    Books,
    /// gRPC server on $PORT (9090), answering in $LATENCY_MS (20-50) milliseconds.
    Authors,
    /// Calls $TARGET_URL at $RATE per second, printing per-second counts; also calls
    /// $DENIED_URL once a second, which policy refuses.
    Traffic,
}

/// Runs one service until it is stopped (or, for `traffic`, until $DURATION passes).
pub fn run(args: DemoAppArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The demo app shares two cores with the whole mesh: keep each service small.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match args.role {
            Role::Web => web::run().await,
            Role::Books => books::run().await,
            Role::Authors => authors::run().await,
            Role::Traffic => traffic::run().await,
        }
    })
}

/// An environment variable, when set and not empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// An environment variable parsed, or `default` when unset; a bad value names the variable.
fn env_parsed<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match env(name) {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={text:?} is not a valid value")),
    }
}

/// A range of milliseconds: `20-50` or `30`.
fn parse_millis_range(text: &str) -> anyhow::Result<(u64, u64)> {
    let parse = |part: &str| {
        part.trim()
            .parse::<u64>()
            .with_context(|| format!("{text:?} is not milliseconds like 20-50"))
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (parse(low)?, parse(high)?),
        None => {
            let value = parse(text)?;
            (value, value)
        }
    };
    anyhow::ensure!(low <= high, "{text:?}: the range is backwards");
    Ok((low, high))
}

/// A random duration in the range.
fn random_delay((low, high): (u64, u64)) -> Duration {
    Duration::from_millis(rand::random_range(low..=high))
}

/// Stops on SIGTERM or Ctrl-C, as a container does.
async fn stopped() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millisecond_ranges_parse() {
        assert_eq!(parse_millis_range("20-50").expect("valid"), (20, 50));
        assert_eq!(parse_millis_range("7").expect("valid"), (7, 7));
        assert!(parse_millis_range("50-20").is_err());
        assert!(parse_millis_range("fast").is_err());
    }

    #[test]
    fn the_manifest_has_every_role_and_the_policies() {
        for want in [
            "name: demo",
            "mesh.dev/inject: enabled",
            "[\"meshctl\", \"demo-app\", \"web\"]",
            "[\"meshctl\", \"demo-app\", \"books\"]",
            "[\"meshctl\", \"demo-app\", \"authors\"]",
            "[\"meshctl\", \"demo-app\", \"traffic\"]",
            "config.mesh.dev/default-inbound-policy: all-authenticated",
            "config.mesh.dev/default-inbound-policy: deny",
        ] {
            assert!(MANIFEST.contains(want), "the demo YAML lacks {want}");
        }
    }
}
