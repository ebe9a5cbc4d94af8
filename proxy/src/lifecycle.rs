//! The pod's lifecycle as the controller sees it: a proxy running as a classic sidecar in a
//! Job's pod exits once the pod's application containers have finished, so the pod completes
//! (a proxy that kept running would hold the Job open forever). Native sidecars need none of
//! this: the kubelet stops them.
//!
//! The proxy cannot see its pod's other containers from inside, so it asks the controller
//! (`Workload.Watch`), which reads their statuses from the API server. While the controller is
//! unreachable the proxy keeps running and asks again.

use std::time::Duration;

use mesh_proto::common::WorkloadRef;
use mesh_proto::tonic::{self, transport::Channel};
use mesh_proto::workload::{WatchWorkload, workload_client::WorkloadClient};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Watches the pod `workload` names and fires `drain` once its application has finished.
/// Returns when it did, or when the drain started for another reason.
pub async fn exit_with_app(channel: Channel, workload: WorkloadRef, drain: CancellationToken) {
    let mut client = WorkloadClient::new(channel);
    let mut backoff = Duration::from_millis(100);
    loop {
        let request = WatchWorkload {
            workload: Some(workload.clone()),
        };
        let finished = tokio::select! {
            finished = watch_once(&mut client, request) => finished,
            () = drain.cancelled() => return,
        };
        match finished {
            Ok(true) => {
                info!(pod = %workload.pod, "the pod's application containers have finished; draining so the pod completes");
                drain.cancel();
                return;
            }
            Ok(false) => backoff = Duration::from_millis(100),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                warn!(
                    "the controller does not serve Workload.Watch: this proxy will not exit with its application"
                );
                return;
            }
            Err(status) => debug!(%status, "workload watch unavailable; retrying in {backoff:?}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = drain.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Follows one stream: true once the application has finished, false when the stream ended
/// without it.
async fn watch_once(
    client: &mut WorkloadClient<Channel>,
    request: WatchWorkload,
) -> Result<bool, tonic::Status> {
    let mut stream = client.watch(request).await?.into_inner();
    while let Some(state) = stream.message().await? {
        if state.app_finished {
            return Ok(true);
        }
    }
    Ok(false)
}
