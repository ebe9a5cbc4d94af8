//! `Workload.Watch`: what the controller knows of a proxy's own pod that the proxy cannot see
//! from inside it. Today one fact: its application containers have finished for good (a
//! Job's pod), so a classic-sidecar proxy can exit and let the pod complete.
//!
//! Each stream is one task following the index's snapshots; it sends the pod's state first,
//! then only changes. Streams are bounded like the Destination service's: a small buffer, and
//! snapshots that arrive while a slow client is being sent to are coalesced.

use std::sync::Arc;

use mesh_proto::workload::workload_server::{Workload, WorkloadServer};
use mesh_proto::workload::{WatchWorkload, WorkloadState};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::index::Snapshot;

/// States buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 4;

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
    let app_finished = snapshot
        .pods()
        .find(|pod| pod.meta.namespace == namespace && pod.meta.name == name)
        .is_some_and(|pod| pod.app_finished);
    WorkloadState { app_finished }
}

#[tonic::async_trait]
impl Workload for WorkloadService {
    type WatchStream = ReceiverStream<Result<WorkloadState, Status>>;

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
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut snapshots = self.snapshots.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut sent = None;
            loop {
                let state = {
                    let snapshot = snapshots.borrow_and_update();
                    state_of(&snapshot, &workload.namespace, &workload.pod)
                };
                if sent.as_ref() != Some(&state) {
                    if tx.send(Ok(state)).await.is_err() {
                        return;
                    }
                    sent = Some(state);
                }
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
