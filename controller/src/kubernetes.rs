//! The `kubernetes` discovery backend: kube-rs watchers on Services, EndpointSlices
//! (`discovery.k8s.io/v1`), Pods and Namespaces, feeding the same [`Index`] as the file
//! backend.
//!
//! One watcher per kind forwards its events to one task that owns the index, so the index
//! has a single writer; the task applies every event already queued before publishing, so a
//! burst (a relist, a rollout) becomes one snapshot. A watch error is counted, reported on
//! `/ready`, and retried by kube's watcher with its default exponential backoff; after a
//! reconnect the watcher relists, and the relist replaces that kind wholesale, so objects
//! deleted (or deleted and recreated) while the watch was down are right again.
//!
//! RBAC (read-only), as a ClusterRole:
//!
//! ```yaml
//! rules:
//! - apiGroups: [""]
//!   resources: [services, pods, namespaces]
//!   verbs: [get, list, watch]
//! - apiGroups: [discovery.k8s.io]
//!   resources: [endpointslices]
//!   verbs: [get, list, watch]
//! - apiGroups: [workload.mesh.dev]
//!   resources: [externalworkloads]
//!   verbs: [get, list, watch]
//! ```

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::Health;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::objects::{Kind, Object};
use crate::pod::{Pod, WirePod};

/// The kinds watched; the backend is synced once each has listed once.
const WATCHED: [Kind; 4] = [
    Kind::Namespace,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
];

/// Builds a client from a kubeconfig file, or (without one) from the environment: the
/// in-cluster service account, or `KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, crate::Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| crate::Error::Kubernetes(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| crate::Error::Kubernetes(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| crate::Error::Kubernetes(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| crate::Error::Kubernetes(e.to_string()))
}

/// One watcher event, reduced to what the index needs.
#[derive(Debug)]
pub(crate) enum Change {
    Apply(Object),
    Delete(Object),
    Init,
    InitApply(Object),
    InitDone,
    Error(String),
}

/// What the index task knows of one kind's watch.
#[derive(Debug, Default)]
struct WatchState {
    /// Objects of a relist in progress.
    relist: Option<Vec<Object>>,
    listed: bool,
}

/// Runs the backend until `shutdown` turns true.
pub(crate) async fn run(
    client: Client,
    mut index: Index,
    health: Health,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    // Big enough to absorb a relist page without stalling the watchers.
    let (tx, mut rx) = mpsc::channel::<(Kind, Change)>(1024);
    // The policy kinds' watchers (`policy::watch`) tolerate missing CRDs and do not hold back
    // the sync.
    let mut policy_watchers = crate::policy::watch::spawn_watchers(&client, &tx);
    // Hosts outside Kubernetes, seen as pods; their CRD may be missing too.
    policy_watchers.push(tokio::spawn(crate::policy::watch::forward(
        Api::<crate::external::ExternalWorkload>::all(client.clone()),
        Kind::ExternalWorkload,
        tx.clone(),
    )));
    let watchers = [
        tokio::spawn(forward(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespace,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<Service>::all(client.clone()),
            Kind::Service,
            tx.clone(),
        )),
        tokio::spawn(forward(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            tx.clone(),
        )),
        tokio::spawn(forward(Api::<WirePod>::all(client), Kind::Pod, tx)),
    ];
    let mut states: BTreeMap<Kind, WatchState> = WATCHED
        .iter()
        .map(|k| (*k, WatchState::default()))
        .collect();
    let mut synced = false;
    loop {
        let first = tokio::select! {
            next = rx.recv() => next,
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while let Ok(next) = rx.try_recv() {
            batch.push(next);
        }
        for (kind, change) in batch {
            apply(&mut index, &mut states, &health, &metrics, kind, change);
        }
        index.publish();
        metrics.set_index_sizes(&index.counts());
        if !synced && states.values().all(|s| s.listed) {
            synced = true;
            health.set_synced();
            tracing::info!(counts = ?index.counts(), "kubernetes discovery synced");
        }
    }
    for watcher in watchers.into_iter().chain(policy_watchers) {
        watcher.abort();
    }
}

fn apply(
    index: &mut Index,
    states: &mut BTreeMap<Kind, WatchState>,
    health: &Health,
    metrics: &Metrics,
    kind: Kind,
    change: Change,
) {
    let state = states.entry(kind).or_default();
    if !matches!(change, Change::Error(_)) {
        health.set_problem("kubernetes", kind.as_str(), None);
    }
    match change {
        Change::Apply(object) => {
            metrics.watch_event(kind, "apply");
            index.apply(object);
        }
        Change::Delete(object) => {
            metrics.watch_event(kind, "delete");
            let key = object.with_default_namespace().key();
            index.delete(kind, &key);
        }
        Change::Init => {
            metrics.watch_event(kind, "relist");
            state.relist = Some(Vec::new());
        }
        Change::InitApply(object) => state.relist.get_or_insert_with(Vec::new).push(object),
        Change::InitDone => {
            let objects = state.relist.take().unwrap_or_default();
            tracing::debug!(%kind, count = objects.len(), "listed");
            index.replace_kind(kind, objects);
            state.listed = true;
        }
        Change::Error(message) => {
            metrics.watch_error(kind);
            tracing::warn!(%kind, error = %message, "watch failed; retrying with backoff");
            health.set_problem("kubernetes", kind.as_str(), Some(message));
        }
    }
}

/// Watches one kind and forwards its events until the receiver is gone.
async fn forward<K>(api: Api<K>, kind: Kind, tx: mpsc::Sender<(Kind, Change)>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Object: From<K>,
{
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(Event::Apply(o)) => Change::Apply(Object::from(o)),
            Ok(Event::Delete(o)) => Change::Delete(Object::from(o)),
            Ok(Event::Init) => Change::Init,
            Ok(Event::InitApply(o)) => Change::InitApply(Object::from(o)),
            Ok(Event::InitDone) => Change::InitDone,
            Err(e) => Change::Error(e.to_string()),
        };
        if tx.send((kind, change)).await.is_err() {
            return;
        }
    }
}

/// Objects from the API server, minus what discovery never reads (managed fields and kubectl's
/// copy of the last applied object are often most of an object's size).
macro_rules! from_watched {
    ($($kind:ident),*) => {$(
        impl From<$kind> for Object {
            fn from(mut object: $kind) -> Self {
                object.metadata.managed_fields = None;
                if let Some(annotations) = object.metadata.annotations.as_mut() {
                    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
                }
                Object::$kind(Arc::new(object))
            }
        }
    )*};
}

from_watched!(Namespace, Service, EndpointSlice);

impl From<WirePod> for Object {
    fn from(pod: WirePod) -> Self {
        Object::Pod(Arc::new(Pod::from(pod)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::parse_documents;
    use crate::index::IndexOptions;

    fn service(name: &str) -> Object {
        parse_documents(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n"
        ))
        .expect("test service parses")
        .remove(0)
    }

    #[test]
    fn watch_events_and_relists_keep_the_index_right() {
        let (mut index, _rx) = Index::new(IndexOptions::default());
        let health = Health::new("test");
        let metrics = Metrics::new();
        let mut states = BTreeMap::new();
        let services = |index: &Index| index.counts().get(&Kind::Service).copied();
        let problems = |health: &Health| health.state().problems.len();
        let steps: Vec<(Change, Option<usize>, usize)> = vec![
            (Change::Init, Some(0), 0),
            (Change::InitApply(service("a")), Some(0), 0),
            (Change::InitApply(service("b")), Some(0), 0),
            (Change::InitDone, Some(2), 0),
            (Change::Apply(service("c")), Some(3), 0),
            (Change::Delete(service("a")), Some(2), 0),
            (Change::Error("connection refused".to_owned()), Some(2), 1),
            // Reconnected: the relist no longer has c (deleted while disconnected).
            (Change::Init, Some(2), 0),
            (Change::InitApply(service("b")), Some(2), 0),
            (Change::InitDone, Some(1), 0),
        ];
        for (i, (change, want_services, want_problems)) in steps.into_iter().enumerate() {
            apply(
                &mut index,
                &mut states,
                &health,
                &metrics,
                Kind::Service,
                change,
            );
            assert_eq!(services(&index), want_services, "step {i}");
            assert_eq!(problems(&health), want_problems, "step {i}");
        }
        assert!(states[&Kind::Service].listed);
        let text = metrics.encode();
        assert!(
            text.contains("mesh_controller_discovery_watch_errors_total{kind=\"Service\"} 1"),
            "{text}"
        );
    }
}
