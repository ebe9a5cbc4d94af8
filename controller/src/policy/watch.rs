//! The Kubernetes watchers of the policy kinds, feeding the same index task as discovery's
//! watchers. Their CRDs may be missing (the Gateway API CRDs often are): a missing CRD is
//! logged once, its kind is treated as listed and empty, and kube's watcher keeps retrying
//! with backoff, so installing the CRD later is picked up without a restart. Nothing here
//! can stop discovery.
//!
//! RBAC (read-only, plus route status), as ClusterRole rules:
//!
//! ```yaml
//! - apiGroups: [policy.mesh.dev]
//!   resources: [servers, authorizationpolicies, meshtlsauthentications,
//!               networkauthentications, httplocalratelimitpolicies, egressnetworks]
//!   verbs: [get, list, watch]
//! - apiGroups: [gateway.networking.k8s.io]
//!   resources: [httproutes, grpcroutes, tlsroutes, tcproutes]
//!   verbs: [get, list, watch]
//! - apiGroups: [gateway.networking.k8s.io]
//!   resources: [httproutes/status, grpcroutes/status, tlsroutes/status, tcproutes/status]
//!   verbs: [get, patch, update]
//! - apiGroups: [""]
//!   resources: [serviceaccounts]   # only the file backend's tokens use them; not watched here
//!   verbs: []
//! - apiGroups: [authentication.k8s.io]
//!   resources: [tokenreviews]      # the identity CA; tap and stats users
//!   verbs: [create]
//! - apiGroups: [authorization.k8s.io]
//!   resources: [subjectaccessreviews]  # may a user tap or read stats (`access`)
//!   verbs: [create]
//! ```

use std::fmt::Debug;

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::crds::{
    AuthorizationPolicy, EgressNetwork, HTTPLocalRateLimitPolicy, MeshTLSAuthentication,
    NetworkAuthentication, Server,
};
use super::gateway::{GRPCRoute, HTTPRoute, TCPRoute, TLSRoute};
use crate::kubernetes::Change;
use crate::objects::{Kind, Object};

/// Starts one watcher per policy kind, sending to the index task's channel.
pub(crate) fn spawn_watchers(
    client: &Client,
    tx: &mpsc::Sender<(Kind, Change)>,
) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(forward(
            Api::<Server>::all(client.clone()),
            Kind::Server,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<AuthorizationPolicy>::all(client.clone()),
            Kind::AuthorizationPolicy,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<MeshTLSAuthentication>::all(client.clone()),
            Kind::MeshTLSAuthentication,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<NetworkAuthentication>::all(client.clone()),
            Kind::NetworkAuthentication,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<HTTPLocalRateLimitPolicy>::all(client.clone()),
            Kind::HTTPLocalRateLimitPolicy,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<HTTPRoute>::all(client.clone()),
            Kind::HTTPRoute,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<GRPCRoute>::all(client.clone()),
            Kind::GRPCRoute,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<EgressNetwork>::all(client.clone()),
            Kind::EgressNetwork,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<TLSRoute>::all(client.clone()),
            Kind::TLSRoute,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<TCPRoute>::all(client.clone()),
            Kind::TCPRoute,
            tx.clone(),
        )),
    ]
}

/// Whether a watch error says the resource does not exist (its CRD is not installed).
fn is_missing_resource(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => {
            matches!(e, kube::Error::Api(status) if status.code == 404)
        }
        watcher::Error::WatchError(status) => status.code == 404,
        watcher::Error::NoResourceVersion => false,
    }
}

/// Forwards one kind's events to the index task; a missing CRD is the kind listed and empty.
/// Also used for ExternalWorkloads, whose CRD may be missing as well.
pub(crate) async fn forward<K>(api: Api<K>, kind: Kind, tx: mpsc::Sender<(Kind, Change)>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Object: From<K>,
{
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut missing_reported = false;
    while let Some(event) = events.next().await {
        let changes = match event {
            Ok(Event::Apply(o)) => vec![Change::Apply(Object::from(o))],
            Ok(Event::Delete(o)) => vec![Change::Delete(Object::from(o))],
            Ok(Event::Init) => vec![Change::Init],
            Ok(Event::InitApply(o)) => vec![Change::InitApply(Object::from(o))],
            Ok(Event::InitDone) => {
                if missing_reported {
                    tracing::info!(%kind, "its CRD is installed now; watching it");
                    missing_reported = false;
                }
                vec![Change::InitDone]
            }
            Err(e) if is_missing_resource(&e) => {
                if missing_reported {
                    continue;
                }
                missing_reported = true;
                tracing::warn!(
                    %kind,
                    "its CRD is not installed: no {kind} objects until it is (retrying); \
                     `mesh-controller crds | kubectl apply -f -` installs it"
                );
                // Listed and empty: nothing of this kind applies.
                vec![Change::Init, Change::InitDone]
            }
            Err(e) => vec![Change::Error(e.to_string())],
        };
        for change in changes {
            if tx.send((kind, change)).await.is_err() {
                return;
            }
        }
    }
}
