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

/// A weighted backend naming `authority`.
pub fn to(authority: &str, weight: u32) -> policy::WeightedBackend {
    policy::WeightedBackend {
        weight,
        backend: Some(policy::Backend {
            kind: Some(policy::backend::Kind::Authority(authority.into())),
        }),
    }
}

/// `ms` milliseconds as a protobuf duration.
pub fn millis(ms: u64) -> Option<mesh_proto::prost_types::Duration> {
    Some(mesh_proto::prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

/// The plan of `service`: `routes`, and the service itself as the default backend.
pub fn plan(service: &str, routes: Vec<policy::Route>) -> policy::OutboundPolicy {
    policy::OutboundPolicy {
        service: service.into(),
        routes,
        default_backends: vec![to(service, 1)],
        ..Default::default()
    }
}

/// A route named `name` to `backends` (none: the plan's defaults).
pub fn route(name: &str, backends: Vec<policy::WeightedBackend>) -> policy::Route {
    policy::Route {
        name: name.into(),
        backends,
        ..Default::default()
    }
}

/// Retries on `conditions` up to `limit` per request, within a budget of `ratio` per request
/// plus `min_per_second` over 10 s.
pub fn retrying(
    conditions: &[&str],
    limit: u32,
    ratio: f32,
    min_per_second: u32,
) -> policy::RetryPolicy {
    policy::RetryPolicy {
        conditions: conditions.iter().map(|c| (*c).to_owned()).collect(),
        limit,
        per_try_timeout: None,
        budget: Some(policy::RetryBudget {
            ratio,
            min_per_second,
            ttl: millis(10_000),
        }),
        max_body_bytes: 0,
    }
}
