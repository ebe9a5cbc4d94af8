//! Which replica does what must be done once. With several controller replicas (`--ha`) every
//! one serves proxies, but only one writes route status: the holder of a
//! `coordination.k8s.io/v1` Lease, as Kubernetes' own controllers elect theirs.
//!
//! The holder renews the Lease every [`RENEW_EVERY`]; another replica takes it over when it
//! has seen the same record unchanged for [`LEASE_DURATION`] by its own clock (so clocks of
//! different nodes need not agree), and a holder that stops releases it, so the next one takes
//! over at once. Writes use the Lease's resourceVersion: two replicas racing for it cannot both
//! win. kube-rs has no leader election of its own; this is the small part of client-go's we
//! need.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a holder's record stays valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);

/// How often the holder renews.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// How often a replica that does not hold the Lease looks again.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// The Lease the route status writer holds.
pub const STATUS_WRITER_LEASE: &str = "mesh-controller-status-writer";

/// Where and as whom to compete for a Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Election {
    /// The Lease's namespace (the control plane's).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica (its pod name, in a cluster).
    pub identity: String,
}

/// Competes for the Lease until `shutdown`; the receiver says whether this replica holds it.
pub fn spawn(
    client: kube::Client,
    election: Election,
    shutdown: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (leading_tx, leading_rx) = watch::channel(false);
    tokio::spawn(run(client, election, leading_tx, shutdown));
    leading_rx
}

/// What this replica last saw of the Lease, and when by its own clock.
struct Observed {
    holder: Option<String>,
    renewed: Option<MicroTime>,
    at: Instant,
}

async fn run(
    client: kube::Client,
    election: Election,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client, &election.namespace);
    let mut observed: Option<Observed> = None;
    loop {
        let holds = match try_acquire_or_renew(&leases, &election, &mut observed).await {
            Ok(holds) => holds,
            Err(e) => {
                tracing::warn!(lease = %election.name, error = %e, "cannot read or write the lease");
                // Unsure whether it still holds: a holder that cannot renew stops acting
                // before another may take over (it has LEASE_DURATION; this is sooner).
                false
            }
        };
        leading.send_if_modified(|was| {
            if *was != holds {
                tracing::info!(lease = %election.name, identity = %election.identity, leading = holds, "leadership changed");
                *was = holds;
                true
            } else {
                false
            }
        });
        let wait = if holds { RENEW_EVERY } else { RETRY_EVERY };
        let stopping = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            _ = shutdown.wait_for(|stop| *stop) => true,
        };
        if stopping {
            if holds {
                release(&leases, &election).await;
            }
            let _ = leading.send(false);
            return;
        }
    }
}

/// One round: creates, renews or takes over the Lease when it may; whether it holds it now.
async fn try_acquire_or_renew(
    leases: &Api<Lease>,
    election: &Election,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let Some(mut lease) = leases.get_opt(&election.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(election.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(election.identity.clone()),
                lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Another replica created it first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let ours = holder.as_deref() == Some(election.identity.as_str());
    // The record's age by this replica's clock: when it last changed here.
    let record_changed = observed
        .as_ref()
        .is_none_or(|o| o.holder != holder || o.renewed != spec.renew_time);
    if record_changed {
        *observed = Some(Observed {
            holder: holder.clone(),
            renewed: spec.renew_time.clone(),
            at: Instant::now(),
        });
    }
    let expired = holder.is_none()
        || observed
            .as_ref()
            .is_some_and(|o| o.at.elapsed() >= LEASE_DURATION);
    if !ours && !expired {
        return Ok(false);
    }
    if !ours {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(election.identity.clone());
    spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
    spec.renew_time = Some(now);
    // Carries the resourceVersion read above: a replica that wrote in between wins, we lose.
    match leases
        .replace(&election.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (holder cleared), so the next replica need not wait for it to expire.
async fn release(leases: &Api<Lease>, election: &Election) {
    let Ok(Some(mut lease)) = leases.get_opt(&election.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    if let Err(e) = leases
        .replace(&election.name, &PostParams::default(), &lease)
        .await
    {
        tracing::debug!(lease = %election.name, error = %e, "cannot release the lease; it expires");
    }
}
