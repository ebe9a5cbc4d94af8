//! `Destination.Get`: resolves a target against the index and streams its endpoint set.
//!
//! Each stream is one task holding the last state it sent. When a snapshot arrives it
//! resolves its target again (a map lookup); if the endpoint set is the same `Arc` as before
//! (the index reuses unchanged sets) it does nothing, otherwise it sends the diff. Snapshots
//! that arrive while a slow client is still being sent to are coalesced by the `watch`
//! channel: the next diff is taken against what the client last got, so it is always right.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::destination::destination_server::{Destination, DestinationServer};
use mesh_proto::destination::{GetDestination, Update, update};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::endpoints::{self, TargetState};
use crate::health::Health;
use crate::index::{Resolution, Snapshot};
use crate::metrics::Metrics;
use crate::target::{self, Target};

/// Updates buffered per stream before the stream's task waits for the client.
const STREAM_BUFFER: usize = 16;

/// The Destination service.
#[derive(Debug, Clone)]
pub struct DestinationService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    health: Health,
    metrics: Metrics,
    cluster_domain: String,
    sync_wait: Duration,
    shutdown: watch::Receiver<bool>,
}

impl DestinationService {
    /// A service over the index's snapshots. Requests wait up to `sync_wait` for the backend's
    /// first sync, so a proxy starting with the controller gets answers, not NOT_FOUND.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        health: Health,
        metrics: Metrics,
        cluster_domain: String,
        sync_wait: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            snapshots,
            health,
            metrics,
            cluster_domain,
            sync_wait,
            shutdown,
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> DestinationServer<Self> {
        DestinationServer::new(self)
    }
}

#[tonic::async_trait]
impl Destination for DestinationService {
    type GetStream = ReceiverStream<Result<Update, Status>>;

    async fn get(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let request = request.into_inner();
        let target = match target::from_request(&request, &self.cluster_domain) {
            Ok(target) => target,
            Err(e) if e.is_malformed() => {
                self.metrics.stream_started("invalid_argument");
                return Err(Status::invalid_argument(e.to_string()));
            }
            Err(e) => {
                self.metrics.stream_started("not_found");
                return Err(Status::not_found(e.to_string()));
            }
        };
        if !self.health.wait_synced(self.sync_wait).await {
            self.metrics.stream_started("unavailable");
            return Err(Status::unavailable(format!(
                "discovery has not synced yet: {}",
                self.health.state().waiting_for
            )));
        }
        let mut snapshots = self.snapshots.clone();
        let snapshot = snapshots.borrow_and_update().clone();
        let state = match snapshot.resolve(&target) {
            Resolution::Found(state) => state,
            Resolution::NotFound(reason) => {
                self.metrics.stream_started("not_found");
                return Err(Status::not_found(reason));
            }
        };
        self.metrics.stream_started("ok");
        tracing::debug!(%target, "destination stream opened");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = Stream {
            target,
            snapshots,
            tx,
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(stream.run(state));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// One open `Get` stream.
struct Stream {
    target: Target,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    tx: mpsc::Sender<Result<Update, Status>>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
}

impl Stream {
    async fn run(mut self, first: TargetState) {
        let _active = self.metrics.stream_guard();
        if !self.send(endpoints::initial(&first), None).await {
            return;
        }
        let mut last = first;
        loop {
            tokio::select! {
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        // The index is gone: the controller is stopping.
                        return;
                    }
                }
                _ = self.tx.closed() => {
                    tracing::debug!(target = %self.target, "destination stream closed by the client");
                    return;
                }
                _ = stopped(&mut self.shutdown) => {
                    // Ending the stream lets the server drain; the client reconnects elsewhere.
                    let _ = self.tx.send(Err(Status::unavailable("the controller is shutting down"))).await;
                    return;
                }
            }
            let snapshot = self.snapshots.borrow_and_update().clone();
            let next = snapshot.resolve(&self.target).into_state();
            if next.same_as(&last) {
                continue;
            }
            let updates = endpoints::diff(&last, &next);
            if !self.send(updates, Some(&snapshot)).await {
                return;
            }
            last = next;
        }
    }

    /// Sends updates; false when the client is gone.
    async fn send(&self, updates: Vec<Update>, snapshot: Option<&Snapshot>) -> bool {
        if updates.is_empty() {
            return true;
        }
        for update in updates {
            let kind = match &update.update {
                Some(update::Update::Add(_)) => "add",
                Some(update::Update::Remove(_)) => "remove",
                Some(update::Update::NoEndpoints(_)) => "no_endpoints",
                None => "none",
            };
            if self.tx.send(Ok(update)).await.is_err() {
                return false;
            }
            self.metrics.update_sent(kind);
        }
        if let Some(snapshot) = snapshot {
            self.metrics
                .observe_latency(snapshot.changed_at.elapsed().as_secs_f64());
        }
        true
    }
}
