//! A scripted OutboundPolicies server: each authority gets the policy the test sets, live.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use mesh_proto::policy::{self, outbound_policies_server::OutboundPolicies};
use mesh_proto::tonic::{self, Request, Response, Status};
use tokio::sync::watch;
use tokio_stream::Stream;

#[derive(Clone, Default)]
pub struct ScriptedOutbound {
    policies: Arc<Mutex<HashMap<String, watch::Sender<policy::OutboundPolicy>>>>,
}

impl ScriptedOutbound {
    /// Sets the policy of `authority`; watchers get it at once.
    pub fn set(&self, authority: &str, policy: policy::OutboundPolicy) {
        let mut policies = self.policies.lock().expect("lock");
        match policies.get(authority) {
            Some(sender) => {
                sender.send_replace(policy);
            }
            None => {
                policies.insert(authority.to_string(), watch::channel(policy).0);
            }
        }
    }
}

type Policies = Pin<Box<dyn Stream<Item = Result<policy::OutboundPolicy, Status>> + Send>>;

#[tonic::async_trait]
impl OutboundPolicies for ScriptedOutbound {
    type WatchStream = Policies;

    async fn watch(
        &self,
        request: Request<policy::OutboundPolicyRequest>,
    ) -> Result<Response<Policies>, Status> {
        let authority = match request.into_inner().target {
            Some(policy::outbound_policy_request::Target::Authority(authority)) => authority,
            _ => return Err(Status::not_found("only authorities have policies here")),
        };
        let receiver = self
            .policies
            .lock()
            .expect("lock")
            .get(&authority)
            .map(|sender| sender.subscribe())
            .ok_or_else(|| Status::not_found(format!("no policy for {authority}")))?;
        let stream = tokio_stream::wrappers::WatchStream::new(receiver);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            stream, Ok,
        ))))
    }
}
