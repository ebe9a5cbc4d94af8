//! `Workload.Watch`: what the controller knows of a proxy's own pod that the proxy cannot see
//! from inside it. Today one fact: its application containers have finished for good (a
//! Job's pod), so a classic-sidecar proxy can exit and let the pod complete.
//!
//! Each stream follows the index's snapshots ([`crate::follow`]): it sends the pod's state
//! first, then only changes; snapshots published while a slow client is not reading are
//! coalesced.

use std::net::IpAddr;
use std::sync::Arc;

use mesh_proto::workload::workload_server::{Workload, WorkloadServer};
use mesh_proto::workload::{WatchWorkload, WorkloadState};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::follow::{WatchStream, follow};
use crate::index::{PodView, Snapshot};

/// The Workload service.
#[derive(Debug, Clone)]
pub struct WorkloadService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: watch::Receiver<bool>,
}

impl WorkloadService {
    /// A service over the index's snapshots, ending its streams at `shutdown`.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            snapshots,
            shutdown,
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> WorkloadServer<Self> {
        WorkloadServer::new(self)
    }
}

/// The state of pod `namespace/name` in `snapshot`; the default for a pod it does not know.
pub fn state_of(snapshot: &Snapshot, namespace: &str, name: &str) -> WorkloadState {
    state(find(snapshot, namespace, name, None))
}

fn state(pod: Option<&Arc<PodView>>) -> WorkloadState {
    WorkloadState {
        app_finished: pod.is_some_and(|pod| pod.app_finished),
    }
}

/// Pod `namespace/name`: at `ip` (where it was last seen) when it is still there, else by a
/// scan of every pod. A pod keeps its IP for life, so the stream of a pod the index has scans
/// about once, not on every snapshot (10,000 proxies each scanning 10,000 pods per change
/// would be 10^8 steps). A stream naming a pod the index does not have still scans on every
/// snapshot, as every stream did before.
fn find<'a>(
    snapshot: &'a Snapshot,
    namespace: &str,
    name: &str,
    ip: Option<IpAddr>,
) -> Option<&'a Arc<PodView>> {
    let is_it = |pod: &&Arc<PodView>| pod.is(namespace, name);
    ip.and_then(|ip| snapshot.pod_at(ip).filter(is_it))
        .or_else(|| snapshot.pods().find(is_it))
}

#[tonic::async_trait]
impl Workload for WorkloadService {
    type WatchStream = WatchStream<WorkloadState>;

    async fn watch(
        &self,
        request: Request<WatchWorkload>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let workload = request.into_inner().workload.unwrap_or_default();
        if workload.namespace.is_empty() || workload.pod.is_empty() {
            return Err(Status::invalid_argument(
                "name the pod: workload.namespace and workload.pod are required",
            ));
        }
        let mut snapshots = self.snapshots.clone();
        let current = snapshots.borrow_and_update().clone();
        let pod = find(&current, &workload.namespace, &workload.pod, None);
        let mut ip = pod.map(|pod| pod.ip);
        let mut sent = state(pod);
        let first = vec![sent];
        let step = move |snapshot: &Arc<Snapshot>| {
            let pod = find(snapshot, &workload.namespace, &workload.pod, ip);
            ip = pod.map(|pod| pod.ip).or(ip);
            let now = state(pod);
            if now == sent {
                return Vec::new();
            }
            sent = now;
            vec![now]
        };
        Ok(Response::new(follow(
            snapshots,
            self.shutdown.clone(),
            first,
            step,
        )))
    }
}
