//! A classic-sidecar proxy in a Job's pod exits once the controller says the pod's
//! application containers have finished, so the pod completes.

mod support;

use std::pin::Pin;
use std::time::Duration;

use mesh_proto::tonic::{self, Request, Response, Status};
use mesh_proto::workload::workload_server::{Workload, WorkloadServer};
use mesh_proto::workload::{WatchWorkload, WorkloadState};
use support::*;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

/// A Workload service whose one pod's state the test sets.
#[derive(Clone)]
struct ScriptedWorkload {
    finished: watch::Sender<bool>,
    asked_for: watch::Sender<Option<(String, String)>>,
}

type States = Pin<Box<dyn Stream<Item = Result<WorkloadState, Status>> + Send>>;

#[tonic::async_trait]
impl Workload for ScriptedWorkload {
    type WatchStream = States;

    async fn watch(&self, request: Request<WatchWorkload>) -> Result<Response<States>, Status> {
        let workload = request.into_inner().workload.unwrap_or_default();
        self.asked_for
            .send_replace(Some((workload.namespace, workload.pod)));
        let states = tokio_stream::wrappers::WatchStream::new(self.finished.subscribe());
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            states,
            |app_finished| Ok(WorkloadState { app_finished }),
        ))))
    }
}

#[tokio::test]
async fn a_proxy_that_exits_with_its_app_drains_once_the_app_has_finished() {
    let stop = CancellationToken::new();
    let scripted = ScriptedWorkload {
        finished: watch::channel(false).0,
        asked_for: watch::channel(None).0,
    };
    let listener = loopback().await;
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkloadServer::new(scripted.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let controller = format!("http://{addr}");
    let mut proxy = proxy_env(
        Some(&controller),
        None,
        &[
            ("MESH_PROXY_EXIT_WITH_APP", "true"),
            ("MESH_PROXY_NAMESPACE", "batch"),
            ("MESH_PROXY_POD", "report-1"),
        ],
    )
    .await;
    // It asks about its own pod, and keeps running while the app does.
    let mut asked = scripted.asked_for.subscribe();
    tokio::time::timeout(Duration::from_secs(5), asked.wait_for(Option::is_some))
        .await
        .expect("the proxy watches its pod")
        .expect("watch");
    assert_eq!(
        *asked.borrow(),
        Some(("batch".to_owned(), "report-1".to_owned()))
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!proxy.task.is_finished(), "running while the app runs");

    scripted.finished.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.task)
        .await
        .expect("the proxy stops once the app has finished")
        .expect("the proxy task");
    assert!(proxy.drain.is_cancelled());
}
