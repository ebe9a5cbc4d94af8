//! Outbound policies from the controller's `OutboundPolicies.Watch`, one live plan per target.
//! A target without a policy (or a controller without the API) is routed as discovery alone
//! says: every request to the target's own endpoints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::{
    self, outbound_policies_client::OutboundPoliciesClient, outbound_policy_request::Target,
};
use mesh_proto::tonic::{self, transport::Channel};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::discovery::TargetKey;
use crate::route::OutboundPlan;

type PlanWatch = watch::Receiver<Option<Option<Arc<OutboundPlan>>>>;

/// Live outbound plans per target.
#[derive(Debug)]
pub struct PlanStore {
    client: Option<OutboundPoliciesClient<Channel>>,
    source: WorkloadRef,
    wait: Duration,
    targets: Mutex<HashMap<TargetKey, PlanWatch>>,
}

impl PlanStore {
    /// Plans from `controller` (None: no plans).
    pub fn new(
        controller: Option<&str>,
        source: WorkloadRef,
        connect_timeout: Duration,
        wait: Duration,
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
            targets: Mutex::new(HashMap::new()),
        })
    }

    /// The plan of `key`, if the controller has one; the first call waits briefly for the
    /// answer so the first request already follows the routes.
    pub async fn plan(&self, key: &TargetKey) -> Option<Arc<OutboundPlan>> {
        let client = self.client.as_ref()?;
        let mut receiver = {
            let mut targets = match self.targets.lock() {
                Ok(targets) => targets,
                Err(poisoned) => poisoned.into_inner(),
            };
            // Most calls find the target: look it up without cloning the key.
            if let Some(receiver) = targets.get(key) {
                receiver.clone()
            } else {
                targets
                    .entry(key.clone())
                    .or_insert_with(|| {
                        // Outer None: no answer yet; inner None: the target has no policy.
                        let (tx, rx) = watch::channel(None);
                        tokio::spawn(watch_target(
                            client.clone(),
                            self.source.clone(),
                            key.clone(),
                            tx,
                        ));
                        rx
                    })
                    .clone()
            }
        };
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
                    match stream.message().await {
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
                tokio::time::sleep(Duration::from_secs(10)).await;
                continue;
            }
            Err(status) => {
                debug!(target = %key, %status, "outbound policy unavailable; retrying in {backoff:?}");
                if plan.borrow().is_none() {
                    plan.send_replace(Some(None));
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
