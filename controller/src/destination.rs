//! `Destination.Get`: resolves a target against the index and streams its endpoint set.
//!
//! Each stream follows the index's snapshots ([`crate::follow`]) holding the last state it
//! sent. On a new snapshot it resolves its target again (a map lookup); if the endpoint set is
//! the same `Arc` as before (the index reuses unchanged sets) it sends nothing, otherwise the
//! diff. Snapshots published while a slow client is not reading are coalesced, and the next
//! diff is taken against what the client last got, so it is always right.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::destination::destination_server::{Destination, DestinationServer};
use mesh_proto::destination::{GetDestination, Update, update};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::endpoints::{self, TargetState};
use crate::follow::{WatchStream, follow};
use crate::health::Health;
use crate::index::{Resolution, Snapshot};
use crate::metrics::{Metrics, StreamGuard};
use crate::target::{self, Target};

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
    type GetStream = WatchStream<Update>;

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
        let first = endpoints::initial(&state);
        count_sent(&self.metrics, &first);
        let mut stream = Stream {
            target,
            last: state,
            metrics: self.metrics.clone(),
            _active: self.metrics.stream_guard(),
        };
        Ok(Response::new(follow(
            snapshots,
            self.shutdown.clone(),
            first,
            move |snapshot: &Arc<Snapshot>| stream.step(snapshot),
        )))
    }
}

/// What one open `Get` stream keeps between snapshots.
struct Stream {
    target: Target,
    /// The state the client was last sent.
    last: TargetState,
    metrics: Metrics,
    _active: StreamGuard,
}

impl Stream {
    /// The updates that bring the client to `snapshot`.
    fn step(&mut self, snapshot: &Snapshot) -> Vec<Update> {
        let next = snapshot.resolve(&self.target).into_state();
        if next.same_as(&self.last) {
            return Vec::new();
        }
        let updates = endpoints::diff(&self.last, &next);
        self.last = next;
        if !updates.is_empty() {
            count_sent(&self.metrics, &updates);
            self.metrics
                .observe_latency(snapshot.changed_at.elapsed().as_secs_f64());
        }
        updates
    }
}

fn count_sent(metrics: &Metrics, updates: &[Update]) {
    for update in updates {
        metrics.update_sent(match &update.update {
            Some(update::Update::Add(_)) => "add",
            Some(update::Update::Remove(_)) => "remove",
            Some(update::Update::NoEndpoints(_)) => "no_endpoints",
            None => "none",
        });
    }
}
