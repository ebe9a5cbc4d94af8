//! The scraper: every interval, reads the list of pods from the index's latest snapshot,
//! GETs `/metrics` from the admin port of each meshed one (a few at a time, each with a
//! timeout) and records the samples in the [`Store`].

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use super::StatsConfig;
use super::exposition;
use super::sample::ProxySample;
use super::store::{PodInfo, Store};
use crate::index::Snapshot;

/// The largest `/metrics` body read: a proxy with thousands of series stays far below.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No connection, or no answer in time.
    #[error("{0}")]
    Connect(String),
    /// An HTTP error or a status other than 200.
    #[error("{0}")]
    Http(String),
}

/// The pods of a snapshot, as the stats need them.
pub fn pods_of(snapshot: &Snapshot) -> Vec<PodInfo> {
    snapshot
        .pods()
        .map(|view| PodInfo::new(view.clone()))
        .collect()
}

/// Scrapes until `shutdown` turns true.
pub async fn run(
    store: Arc<RwLock<Store>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    config: StatsConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let snapshot = snapshots.borrow().clone();
        let pods = pods_of(&snapshot);
        write(&store).set_pods(pods.iter().cloned());
        let meshed: Vec<PodInfo> = pods.into_iter().filter(PodInfo::meshed).collect();
        let results: Vec<_> = futures::stream::iter(meshed)
            .map(|pod| async move {
                let addr = SocketAddr::new(pod.ip(), config.admin_port);
                let result = scrape(addr, config.scrape_timeout).await;
                (pod, Instant::now(), result)
            })
            .buffer_unordered(config.concurrency.max(1))
            .collect()
            .await;
        {
            let mut store = write(&store);
            for (pod, at, result) in results {
                match result {
                    Ok(sample) => store.record(pod.ip(), at, sample),
                    Err(error) => {
                        tracing::debug!(pod = %format!("{}/{}", pod.namespace(), pod.name()), %error, "scrape failed");
                        store.record_error(pod.ip(), error.to_string());
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// The store for writing; a panic elsewhere while holding it leaves data that is still
/// consistent enough to serve, so poisoning is ignored.
pub fn write(store: &RwLock<Store>) -> std::sync::RwLockWriteGuard<'_, Store> {
    store
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The store for reading.
pub fn read(store: &RwLock<Store>) -> std::sync::RwLockReadGuard<'_, Store> {
    store
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// GETs `http://addr/metrics` and parses it.
pub async fn scrape(addr: SocketAddr, timeout: Duration) -> Result<ProxySample, ScrapeError> {
    let text = tokio::time::timeout(timeout, get_metrics(addr))
        .await
        .map_err(|_| ScrapeError::Connect(format!("{addr}: no answer within {timeout:?}")))??;
    Ok(ProxySample::from_exposition(&exposition::parse(&text)))
}

async fn get_metrics(addr: SocketAddr) -> Result<String, ScrapeError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|error| ScrapeError::Connect(format!("{addr}: {error}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| ScrapeError::Http(format!("{addr}: {error}")))?;
    // The connection is driven until the response is read; it ends with this task.
    let driver = tokio::spawn(connection);
    let request = http::Request::get("/metrics")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|error| ScrapeError::Http(error.to_string()))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| ScrapeError::Http(format!("{addr}: {error}")))?;
        if response.status() != http::StatusCode::OK {
            return Err(ScrapeError::Http(format!(
                "{addr}/metrics answered {}",
                response.status()
            )));
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|error| ScrapeError::Http(format!("{addr}/metrics: {error}")))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
    .await;
    driver.abort();
    result
}
