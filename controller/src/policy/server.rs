//! The policy gRPC servers: `InboundPolicies.Watch` and `OutboundPolicies.Watch`.
//!
//! Each stream ([`crate::follow`]) computes its policy with the pure functions
//! (`policy::inbound`, `policy::outbound`) from the current [`PolicyInputs`], sends it, and
//! computes it again on every new snapshot, sending only when it differs from what the client
//! last got (snapshots published while a slow client is not reading are coalesced). The
//! servers decide nothing themselves.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::policy::inbound_policies_server::{InboundPolicies, InboundPoliciesServer};
use mesh_proto::policy::outbound_policies_server::{OutboundPolicies, OutboundPoliciesServer};
use mesh_proto::policy::{
    InboundPolicyRequest, InboundServer, OutboundPolicy, OutboundPolicyRequest,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::egress;
use super::inbound::{self, InboundSettings};
use super::metrics::PolicyMetrics;
use super::outbound::{self, OutboundSettings};
use super::store::PolicyInputs;
use crate::follow::{WatchStream, follow};
use crate::health::Health;

/// What both servers share.
#[derive(Debug, Clone)]
pub struct PolicyContext {
    /// The policy inputs, as the index publishes them.
    pub inputs: watch::Receiver<Arc<PolicyInputs>>,
    /// Discovery's health: streams wait for the first sync.
    pub health: Health,
    /// How long a request waits for the first sync before UNAVAILABLE.
    pub sync_wait: Duration,
    /// Turns true when the controller stops.
    pub shutdown: watch::Receiver<bool>,
    /// The policy metrics.
    pub metrics: PolicyMetrics,
}

impl PolicyContext {
    async fn wait_synced(&self) -> Result<(), Status> {
        if self.health.wait_synced(self.sync_wait).await {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "discovery has not synced yet: {}",
                self.health.state().waiting_for
            )))
        }
    }

    /// Streams `first`, then whatever `next` computes from each new snapshot: `Some` is the
    /// policy now (sent when it differs from the last one sent), `None` keeps the last one.
    /// `first` was computed from `inputs`, which is marked seen.
    fn stream<T, F>(
        &self,
        api: &'static str,
        inputs: watch::Receiver<Arc<PolicyInputs>>,
        first: T,
        mut next: F,
    ) -> WatchStream<T>
    where
        T: PartialEq + Clone + Send + Sync + 'static,
        F: FnMut(&PolicyInputs) -> Option<T> + Send + 'static,
    {
        let metrics = self.metrics.clone();
        let active = metrics.stream_guard(api);
        metrics.update_sent(api);
        let mut last = first.clone();
        follow(
            inputs,
            self.shutdown.clone(),
            vec![first],
            move |snapshot| {
                let _counted_until_dropped = &active;
                match next(snapshot) {
                    Some(policy) if policy != last => {
                        metrics.update_sent(api);
                        last = policy.clone();
                        vec![policy]
                    }
                    _ => Vec::new(),
                }
            },
        )
    }

    /// A receiver of the policy inputs with the current ones marked seen, and those inputs.
    fn inputs(&self) -> (watch::Receiver<Arc<PolicyInputs>>, Arc<PolicyInputs>) {
        let mut inputs = self.inputs.clone();
        let current = inputs.borrow_and_update().clone();
        (inputs, current)
    }
}

/// `InboundPolicies`: the policy of one port of one workload.
#[derive(Debug, Clone)]
pub struct InboundPoliciesService {
    context: PolicyContext,
    settings: Arc<InboundSettings>,
}

impl InboundPoliciesService {
    /// A server computing policies with `settings`.
    pub fn new(context: PolicyContext, settings: InboundSettings) -> Self {
        Self {
            context,
            settings: Arc::new(settings),
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> InboundPoliciesServer<Self> {
        InboundPoliciesServer::new(self)
    }
}

#[tonic::async_trait]
impl InboundPolicies for InboundPoliciesService {
    type WatchStream = WatchStream<InboundServer>;

    async fn watch(
        &self,
        request: Request<InboundPolicyRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let workload = request
            .workload
            .filter(|w| !w.namespace.is_empty())
            .ok_or_else(|| Status::invalid_argument("the request names no workload namespace"))?;
        let port = u16::try_from(request.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("port {} is not in 1..=65535", request.port))
            })?;
        self.context.wait_synced().await?;
        let settings = self.settings.clone();
        let (inputs, current) = self.context.inputs();
        let first = inbound::inbound_server(&current, &workload, port, &settings);
        tracing::debug!(
            namespace = %workload.namespace,
            pod = %workload.pod,
            port,
            policy = %first.name,
            "inbound policy stream opened"
        );
        Ok(Response::new(self.context.stream(
            "inbound",
            inputs,
            first,
            move |inputs| Some(inbound::inbound_server(inputs, &workload, port, &settings)),
        )))
    }
}

/// `OutboundPolicies`: routes, retries, timeouts and balancing for one target.
#[derive(Debug, Clone)]
pub struct OutboundPoliciesService {
    context: PolicyContext,
    settings: Arc<OutboundSettings>,
}

impl OutboundPoliciesService {
    /// The egress policy of an address outside the mesh: NOT_FOUND when it is in the mesh
    /// after all (a pod's IP), or when nothing covers it and the mesh-wide default allows, so
    /// the proxy forwards it unchanged and asks again later.
    fn egress_stream(
        &self,
        inputs: watch::Receiver<Arc<PolicyInputs>>,
        current: &PolicyInputs,
        destination: std::net::SocketAddr,
        source: mesh_proto::common::WorkloadRef,
    ) -> Result<Response<WatchStream<OutboundPolicy>>, Status> {
        let not_found = || {
            Status::not_found(format!(
                "{destination} is not a Service port, and no EgressNetwork covers it"
            ))
        };
        let settings = self.settings.clone();
        let (first, _) = egress::egress_policy(current, destination, &source, &settings);
        let first = first.ok_or_else(not_found)?;
        // Asked last: it scans every Service and pod.
        if egress::in_mesh(current, destination.ip()) {
            return Err(not_found());
        }
        tracing::debug!(%destination, network = ?first.egress.as_ref().map(|e| &e.network), "egress policy stream opened");
        Ok(Response::new(self.context.stream(
            "outbound",
            inputs,
            first,
            move |inputs| {
                let (policy, problems) =
                    egress::egress_policy(inputs, destination, &source, &settings);
                // As for Services: an invalid route keeps the last valid policy; a network
                // that went away leaves the destination unrestricted.
                if !problems.is_empty() {
                    return None;
                }
                Some(policy.unwrap_or_else(|| egress::unrestricted(destination)))
            },
        )))
    }

    /// A server computing policies with `settings`.
    pub fn new(context: PolicyContext, settings: OutboundSettings) -> Self {
        Self {
            context,
            settings: Arc::new(settings),
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> OutboundPoliciesServer<Self> {
        OutboundPoliciesServer::new(self)
    }
}

#[tonic::async_trait]
impl OutboundPolicies for OutboundPoliciesService {
    type WatchStream = WatchStream<OutboundPolicy>;

    async fn watch(
        &self,
        request: Request<OutboundPolicyRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let source = request.source.unwrap_or_default();
        let wanted =
            outbound::TargetRequest::from_proto(request.target.as_ref(), &source, &self.settings)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.context.wait_synced().await?;
        let settings = self.settings.clone();
        let (inputs, current) = self.context.inputs();
        let Some(target) = outbound::resolve_target(&current, &wanted) else {
            return match wanted {
                outbound::TargetRequest::Addr(destination) => {
                    self.egress_stream(inputs, &current, destination, source)
                }
                outbound::TargetRequest::Service(_) => {
                    Err(Status::not_found(format!("{wanted} is not a Service port")))
                }
            };
        };
        let outcome = outbound::outbound_policy(&current, &target, &source, &settings);
        // A target with neither routes nor annotations has no policy: the proxy then routes
        // by discovery alone.
        let first = outcome
            .policy
            .ok_or_else(|| Status::not_found(format!("{target} has no outbound policy")))?;
        tracing::debug!(%target, "outbound policy stream opened");
        Ok(Response::new(self.context.stream(
            "outbound",
            inputs,
            first,
            move |inputs| {
                let outcome = outbound::outbound_policy(inputs, &target, &source, &settings);
                // An invalid route or annotation keeps the last valid policy (reported by
                // `policy::report`); a policy that went away becomes the plain one, which
                // routes exactly as discovery alone would.
                if !outcome.problems.is_empty() {
                    return None;
                }
                Some(
                    outcome
                        .policy
                        .unwrap_or_else(|| outbound::plain_policy(&target, &settings)),
                )
            },
        )))
    }
}
