//! Traffic statistics without Prometheus: the controller scrapes the proxies it knows and
//! serves `Stats.Summary` and `Stats.Edges` (what `meshctl stat`, `edges`, `dashboard` and
//! `demo` show).
//!
//! - [`scrape`]: every few seconds, GET `/metrics` from the admin port of every meshed pod
//!   in the index's latest snapshot;
//! - [`exposition`]: the Prometheus text parser; [`sample`]: one scrape reduced to our
//!   series, and the delta of two;
//! - [`store`]: a short ring of samples per pod, turned into per-pod windows;
//! - [`aggregate`]: pure functions from windows to rows, edges and denials;
//! - [`service`]: the gRPC service.
//!
//! It owns nothing of discovery: it reads snapshots like `Destination.Get` does.

pub mod aggregate;
pub mod exposition;
pub mod sample;
pub mod scrape;
pub mod service;
pub mod store;

#[cfg(test)]
mod tests;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

pub use service::StatsService;

use crate::index::Snapshot;

/// How the scraper runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsConfig {
    /// Time between two scrapes of every proxy.
    pub interval: Duration,
    /// How long samples are kept: the longest window a request can ask for.
    pub retention: Duration,
    /// The proxies' admin port.
    pub admin_port: u16,
    /// How long one scrape may take.
    pub scrape_timeout: Duration,
    /// Proxies scraped at once.
    pub concurrency: usize,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            interval: Duration::from_secs(2),
            retention: Duration::from_secs(10 * 60),
            admin_port: 4191,
            scrape_timeout: Duration::from_millis(1500),
            concurrency: 16,
        }
    }
}

/// Starts the scraper over the index's `snapshots` until `shutdown` turns true, and returns
/// the service reading what it scrapes.
pub fn spawn(
    snapshots: watch::Receiver<Arc<Snapshot>>,
    config: StatsConfig,
    access: crate::access::ObserverAccess,
    shutdown: watch::Receiver<bool>,
) -> StatsService {
    let store = Arc::new(RwLock::new(store::Store::new(config.retention)));
    tokio::spawn(scrape::run(store.clone(), snapshots, config, shutdown));
    StatsService::new(store, config.retention, access)
}
