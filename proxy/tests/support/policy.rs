//! A scripted InboundPolicies server: every port gets the policy the test sets, live.

use std::pin::Pin;

use mesh_proto::policy::{self, inbound_policies_server::InboundPolicies};
use mesh_proto::tonic::{self, Request, Response, Status};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct ScriptedPolicy {
    policy: watch::Sender<policy::InboundServer>,
}

impl ScriptedPolicy {
    pub fn new(initial: policy::InboundServer) -> Self {
        Self {
            policy: watch::channel(initial).0,
        }
    }

    /// Replaces the policy; every watcher gets it.
    pub fn set(&self, server: policy::InboundServer) {
        self.policy.send_replace(server);
    }

    pub async fn serve(&self, stop: CancellationToken) -> String {
        let listener = super::loopback().await;
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(policy::inbound_policies_server::InboundPoliciesServer::new(
                    self.clone(),
                ))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                ),
        );
        format!("http://{addr}")
    }
}

type Servers = Pin<Box<dyn Stream<Item = Result<policy::InboundServer, Status>> + Send>>;

#[tonic::async_trait]
impl InboundPolicies for ScriptedPolicy {
    type WatchStream = Servers;

    async fn watch(
        &self,
        _request: Request<policy::InboundPolicyRequest>,
    ) -> Result<Response<Servers>, Status> {
        let receiver = self.policy.subscribe();
        let stream = tokio_stream::wrappers::WatchStream::new(receiver);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            stream, Ok,
        ))))
    }
}
