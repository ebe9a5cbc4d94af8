//! Outbound policies from the controller's `OutboundPolicies.Watch`, one live plan per target.
//! A target without a policy (or a controller without the API) is routed as discovery alone
//! says: every request to the target's own endpoints.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::{
    self, outbound_policies_client::OutboundPoliciesClient, outbound_policy_request::Target,
};
use mesh_proto::tonic::{self, transport::Channel};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::discovery::TargetKey;
use crate::idle::{IdleMap, InUse};
use crate::route::OutboundPlan;

type PlanWatch = watch::Receiver<Option<Option<Arc<OutboundPlan>>>>;

/// Requests take the plan out of the watch and keep nothing of it: only the last use counts.
impl InUse for PlanWatch {
    fn in_use(&self) -> bool {
        false
    }
}

/// Live outbound plans per target; a target unused for a while is forgotten (its stream
/// closed).
#[derive(Debug)]
pub struct PlanStore {
    client: Option<OutboundPoliciesClient<Channel>>,
    source: WorkloadRef,
    wait: Duration,
    targets: Arc<IdleMap<TargetKey, PlanWatch>>,
}

impl PlanStore {
    /// Plans from `controller` (None: no plans); a target asked for no plan during `idle` is
    /// forgotten.
    pub fn new(
        controller: Option<&str>,
        source: WorkloadRef,
        connect_timeout: Duration,
        wait: Duration,
        idle: Duration,
    ) -> Result<Self, tonic::transport::Error> {
        let client = match controller {
            Some(addr) => Some(OutboundPoliciesClient::new(
                tonic::transport::Endpoint::from_shared(addr.to_string())?
                    .connect_timeout(connect_timeout)
                    .connect_lazy(),
            )),
            None => None,
        };
        Ok(Self {
            client,
            source,
            wait,
            targets: {
                let targets = IdleMap::new(idle);
                targets.sweep_in_background();
                targets
            },
        })
    }

    /// The plan of `key`, if the controller has one; the first call waits briefly for the
    /// answer so the first request already follows the routes.
    pub async fn plan(&self, key: &TargetKey) -> Option<Arc<OutboundPlan>> {
        let client = self.client.as_ref()?;
        let mut receiver = self.targets.get_or_insert_with(key, || {
            // Outer None: no answer yet; inner None: the target has no policy.
            let (tx, rx) = watch::channel(None);
            tokio::spawn(watch_target(
                client.clone(),
                self.source.clone(),
                key.clone(),
                tx,
            ));
            rx
        });
        if let Some(answer) = receiver.borrow().clone() {
            return answer;
        }
        match tokio::time::timeout(self.wait, receiver.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone().flatten(),
            _ => None,
        }
    }
}

async fn watch_target(
    mut client: OutboundPoliciesClient<Channel>,
    source: WorkloadRef,
    key: TargetKey,
    plan: watch::Sender<Option<Option<Arc<OutboundPlan>>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let request = policy::OutboundPolicyRequest {
            source: Some(source.clone()),
            target: Some(match &key {
                TargetKey::Addr(addr) => Target::Addr((*addr).into()),
                TargetKey::Authority(authority) => Target::Authority(authority.clone()),
            }),
        };
        match client.watch(request).await {
            Ok(response) => {
                backoff = Duration::from_millis(100);
                let mut stream = response.into_inner();
                loop {
                    // Ends once the store forgot the target (every receiver is gone).
                    let message = tokio::select! {
                        message = stream.message() => message,
                        () = plan.closed() => return,
                    };
                    match message {
                        Ok(Some(wire)) => match OutboundPlan::from_proto(&wire) {
                            Ok(compiled) => {
                                info!(target = %key, service = %compiled.service, "outbound policy updated");
                                plan.send_replace(Some(Some(Arc::new(compiled))));
                            }
                            // The last valid plan keeps applying.
                            Err(error) => {
                                warn!(target = %key, %error, "ignoring an invalid outbound policy")
                            }
                        },
                        Ok(None) => break,
                        Err(status) => {
                            debug!(target = %key, %status, "outbound policy stream failed");
                            break;
                        }
                    }
                }
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::NotFound | tonic::Code::Unimplemented
                ) =>
            {
                if plan.borrow().is_none() {
                    plan.send_replace(Some(None));
                }
                // The target may get a policy later; the API may appear with an upgrade.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(10)) => continue,
                    () = plan.closed() => return,
                }
            }
            Err(status) => {
                debug!(target = %key, %status, "outbound policy unavailable; retrying in {backoff:?}");
                if plan.borrow().is_none() {
                    plan.send_replace(Some(None));
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = plan.closed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
