//! Reports invalid routes, Service annotations and AuthorizationPolicies: a warning naming the
//! object, the field and the value (once per new problem), the `policy_invalid_*` metrics, and
//! on Kubernetes the route's status (`Accepted` on each Service or EgressNetwork parent,
//! `False` with a reason when invalid).
//!
//! It only reports; the outbound streams keep serving the last valid policy on their own, and
//! an AuthorizationPolicy nobody can meet admits nobody.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;

use super::egress;
use super::gateway::{
    GRPCRoute, HTTPRoute, ParentReference, RouteParentStatus, TCPRoute, TLSRoute,
};
use super::inbound;
use super::metrics::PolicyMetrics;
use super::outbound::{self, OutboundSettings, Problem};
use super::store::PolicyInputs;
use crate::objects::{Kind, ObjectKey};

/// What each route's status was last written as: its generation and its problem, if any.
type Written = BTreeMap<(Kind, ObjectKey), (Option<i64>, Option<String>)>;

/// The controller name written into route status.
pub const CONTROLLER_NAME: &str = "mesh.dev/controller";

/// Runs until `shutdown` turns true, reporting on every new snapshot. Route status is
/// written through `client` while `leading` says this replica holds the status writer's Lease
/// (always, without an election: one replica).
pub async fn run(
    mut inputs: watch::Receiver<Arc<PolicyInputs>>,
    settings: OutboundSettings,
    metrics: PolicyMetrics,
    client: Option<kube::Client>,
    mut leading: Option<watch::Receiver<bool>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reported: BTreeSet<String> = BTreeSet::new();
    // What each route's status was last patched to: (generation, accepted problem text).
    let mut written = Written::new();
    loop {
        let snapshot = inputs.borrow_and_update().clone();
        let mut problems = outbound::all_problems(&snapshot, &settings);
        problems.extend(inbound::problems(&snapshot));
        let mut now = BTreeSet::new();
        let mut per_kind: BTreeMap<&'static str, BTreeSet<&ObjectKey>> = BTreeMap::new();
        for problem in &problems {
            let text = problem.to_string();
            if !reported.contains(&text) {
                tracing::warn!(
                    kind = %problem.kind,
                    object = %problem.object,
                    field = %problem.field,
                    value = %problem.value,
                    reason = %problem.reason,
                    "invalid policy configuration"
                );
                metrics.invalid_seen(problem.kind.as_str());
            }
            now.insert(text);
            per_kind
                .entry(problem.kind.as_str())
                .or_default()
                .insert(&problem.object);
        }
        for kind in [
            Kind::HTTPRoute,
            Kind::GRPCRoute,
            Kind::TLSRoute,
            Kind::TCPRoute,
            Kind::EgressNetwork,
            Kind::Service,
            Kind::AuthorizationPolicy,
        ] {
            metrics.set_invalid(
                kind.as_str(),
                per_kind.get(kind.as_str()).map_or(0, BTreeSet::len),
            );
        }
        reported = now;
        let writes = leading.as_mut().is_none_or(|l| *l.borrow_and_update());
        match &client {
            Some(client) if writes => {
                write_route_status(client, &snapshot, &problems, &mut written).await;
            }
            // Another replica writes; when this one takes over, it writes everything afresh.
            _ => written.clear(),
        }
        let leadership_changed = async {
            match leading.as_mut() {
                Some(l) => l.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = inputs.changed() => if changed.is_err() { return },
            ok = leadership_changed => if !ok { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

fn condition(generation: Option<i64>, problem: Option<&Problem>) -> Condition {
    let (status, reason, message) = match problem {
        None => (
            "True",
            "Accepted".to_owned(),
            "accepted by the mesh".to_owned(),
        ),
        Some(p) => (
            "False",
            p.condition_reason.to_owned(),
            format!("{} = {:?}: {}", p.field, p.value, p.reason),
        ),
    };
    Condition {
        type_: "Accepted".to_owned(),
        status: status.to_owned(),
        reason,
        message,
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Patches the status of each route whose validity (or generation) changed since it was
/// last written.
async fn write_route_status(
    client: &kube::Client,
    snapshot: &PolicyInputs,
    problems: &[Problem],
    written: &mut Written,
) {
    let problem_of =
        |kind: Kind, key: &ObjectKey| problems.iter().find(|p| p.kind == kind && p.object == *key);
    let mut seen = BTreeSet::new();
    for (namespace, objects) in snapshot.namespaces() {
        let routes = (objects.http_routes.iter())
            .map(|(n, r)| (Kind::HTTPRoute, n, &r.metadata, &r.spec.parent_refs))
            .chain(
                (objects.grpc_routes.iter())
                    .map(|(n, r)| (Kind::GRPCRoute, n, &r.metadata, &r.spec.parent_refs)),
            )
            .chain(
                (objects.tls_routes.iter())
                    .map(|(n, r)| (Kind::TLSRoute, n, &r.metadata, &r.spec.parent_refs)),
            )
            .chain(
                (objects.tcp_routes.iter())
                    .map(|(n, r)| (Kind::TCPRoute, n, &r.metadata, &r.spec.parent_refs)),
            );
        for (kind, name, meta, parents) in routes {
            // The parents the mesh answers for: Services (GAMMA) and EgressNetworks.
            let parents: Vec<ParentReference> = parents
                .iter()
                .filter(|p| {
                    let one = std::slice::from_ref(*p);
                    outbound::attaches_to_services(one) || egress::attaches_to_networks(one)
                })
                .cloned()
                .collect();
            if parents.is_empty() {
                continue;
            }
            let key = ObjectKey::new(namespace, name.as_str());
            let problem = problem_of(kind, &key);
            let state = (meta.generation, problem.map(ToString::to_string));
            seen.insert((kind, key.clone()));
            if written.get(&(kind, key.clone())) == Some(&state) {
                continue;
            }
            let status = serde_json::json!({
                "status": {
                    "parents": parents.iter().map(|parent| RouteParentStatus {
                        parent_ref: parent.clone(),
                        controller_name: CONTROLLER_NAME.to_owned(),
                        conditions: vec![condition(meta.generation, problem)],
                    }).collect::<Vec<_>>()
                }
            });
            let params = PatchParams::default();
            let patch = Patch::Merge(&status);
            let result = match kind {
                Kind::HTTPRoute => Api::<HTTPRoute>::namespaced(client.clone(), namespace)
                    .patch_status(name, &params, &patch)
                    .await
                    .map(|_| ()),
                Kind::GRPCRoute => Api::<GRPCRoute>::namespaced(client.clone(), namespace)
                    .patch_status(name, &params, &patch)
                    .await
                    .map(|_| ()),
                Kind::TLSRoute => Api::<TLSRoute>::namespaced(client.clone(), namespace)
                    .patch_status(name, &params, &patch)
                    .await
                    .map(|_| ()),
                _ => Api::<TCPRoute>::namespaced(client.clone(), namespace)
                    .patch_status(name, &params, &patch)
                    .await
                    .map(|_| ()),
            };
            match result {
                Ok(()) => {
                    written.insert((kind, key), state);
                }
                Err(e) => {
                    tracing::warn!(%kind, object = %key, error = %e, "cannot write the route's status");
                }
            }
        }
    }
    written.retain(|k, _| seen.contains(k));
}
