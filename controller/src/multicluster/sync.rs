//! Keeps the local mirrors in step with each linked cluster.
//!
//! One task watches the link Secrets of the control plane's namespace; each valid link gets a
//! task that watches the remote cluster (exported Services, EndpointSlices, Pods) with the
//! link's kubeconfig and writes the [`mirrors`] it calls for here: created, updated, and
//! deleted when the remote Service goes, stops being exported, or the link is removed. While a
//! remote cluster is unreachable its mirrors stay as last seen (clients keep their endpoints
//! and fail over by routing); its `multicluster_link_up` gauge says so.
//!
//! Only objects labelled as this cluster's mirrors are ever updated or deleted: a Service of
//! the same name that is not a mirror is reported and left alone. With several controller
//! replicas only the status writer (the Lease holder) writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::link::{LABEL_LINK, Link};
use super::metrics::MulticlusterMetrics;
use super::mirror::{
    self, LABEL_EXPORTED, LABEL_MANAGED_BY, LABEL_MIRROR_CLUSTER, MANAGER, Remote,
};
use crate::pod::{Pod, WirePod};

/// How long a burst of remote changes is gathered before the mirrors are written.
const SETTLE: Duration = Duration::from_millis(200);

/// What the mirror writer needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MulticlusterSettings {
    /// Where link Secrets live (the control plane's namespace).
    pub namespace: String,
    /// The local trust domain: a link's, unless it names its own.
    pub trust_domain: String,
    /// How often every mirror is written again, repairing what was changed by hand.
    pub resync: Duration,
}

impl MulticlusterSettings {
    /// Links in `namespace`, resynced every minute.
    pub fn new(namespace: impl Into<String>, trust_domain: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            trust_domain: trust_domain.into(),
            resync: Duration::from_secs(60),
        }
    }
}

/// Runs until `shutdown`, writing only while `leading` says so (always without it).
pub async fn run(
    local: Client,
    settings: MulticlusterSettings,
    mut leading: Option<watch::Receiver<bool>>,
    metrics: MulticlusterMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Some(leading) = leading.as_mut() {
            tokio::select! {
                held = leading.wait_for(|l| *l) => if held.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let lost = async {
            match leading.as_mut() {
                Some(leading) => {
                    let _ = leading.wait_for(|l| !*l).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = manage_links(local.clone(), &settings, &metrics) => {}
            () = lost => tracing::info!("no longer the status writer: mirrors are left to the new one"),
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// One link's task and what it was started from.
struct Following {
    link: Link,
    task: JoinHandle<()>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows the link Secrets: starts, restarts and stops each link's task; removes the mirrors
/// of links that are gone.
async fn manage_links(
    local: Client,
    settings: &MulticlusterSettings,
    metrics: &MulticlusterMetrics,
) {
    let secrets: Api<Secret> = Api::namespaced(local.clone(), &settings.namespace);
    let config = watcher::Config::default().labels(LABEL_LINK);
    let mut events = watcher::watcher(secrets, config).default_backoff().boxed();
    let mut following: BTreeMap<String, Following> = BTreeMap::new();
    let mut relist: Option<Vec<Secret>> = None;
    while let Some(event) = events.next().await {
        let secrets = match event {
            Ok(Event::Apply(secret)) => vec![secret],
            Ok(Event::Delete(secret)) => {
                let name = secret.metadata.name.clone().unwrap_or_default();
                if let Some(gone) = following.remove(&name) {
                    drop_link(&local, gone, metrics).await;
                }
                continue;
            }
            Ok(Event::Init) => {
                relist = Some(Vec::new());
                continue;
            }
            Ok(Event::InitApply(secret)) => {
                relist.get_or_insert_with(Vec::new).push(secret);
                continue;
            }
            Ok(Event::InitDone) => {
                let listed = relist.take().unwrap_or_default();
                let names: BTreeSet<_> = listed
                    .iter()
                    .filter_map(|s| s.metadata.name.clone())
                    .collect();
                let gone: Vec<String> = following
                    .keys()
                    .filter(|n| !names.contains(*n))
                    .cloned()
                    .collect();
                for name in gone {
                    if let Some(gone) = following.remove(&name) {
                        drop_link(&local, gone, metrics).await;
                    }
                }
                // Mirrors of clusters no Secret links any more (removed while no replica
                // was writing).
                let clusters: BTreeSet<String> = listed
                    .iter()
                    .filter_map(|s| Link::from_secret(s, &settings.trust_domain).ok())
                    .map(|l| l.cluster)
                    .collect();
                remove_orphans(&local, &clusters).await;
                listed
            }
            Err(e) => {
                tracing::warn!(namespace = %settings.namespace, error = %e, "cannot watch link Secrets; retrying");
                continue;
            }
        };
        for secret in secrets {
            let name = secret.metadata.name.clone().unwrap_or_default();
            match Link::from_secret(&secret, &settings.trust_domain) {
                Ok(link) => {
                    if following.get(&name).is_some_and(|f| f.link == link) {
                        continue;
                    }
                    // A changed link restarts its task (dropping the old one stops it); one
                    // that names another cluster also takes the old cluster's mirrors away.
                    match following.remove(&name) {
                        Some(old) if old.link.cluster != link.cluster => {
                            drop_link(&local, old, metrics).await;
                        }
                        _ => {}
                    }
                    tracing::info!(secret = %name, cluster = %link.cluster, "following a linked cluster");
                    let task = tokio::spawn(follow(
                        local.clone(),
                        link.clone(),
                        settings.resync,
                        metrics.clone(),
                    ));
                    following.insert(name, Following { link, task });
                }
                Err(error) => {
                    // The last valid version of the link, if any, keeps being followed.
                    metrics.invalid_link(&name);
                    tracing::warn!(
                        secret = %format!("{}/{name}", settings.namespace),
                        %error,
                        "invalid link Secret: ignored"
                    );
                }
            }
        }
    }
}

/// Stops following a link and removes its cluster's mirrors.
async fn drop_link(local: &Client, gone: Following, metrics: &MulticlusterMetrics) {
    let cluster = gone.link.cluster.clone();
    drop(gone);
    tracing::info!(%cluster, "link removed: deleting its mirrors");
    metrics.forget(&cluster);
    let removed = delete_mirrors_except(local, &cluster, &Keep::default()).await;
    if let Err(error) = removed {
        tracing::warn!(%cluster, %error, "cannot delete the mirrors of a removed link");
    }
}

/// Deletes the mirrors of every cluster not in `linked`.
async fn remove_orphans(local: &Client, linked: &BTreeSet<String>) {
    let services: Api<Service> = Api::all(local.clone());
    let Ok(list) = services
        .list(&ListParams::default().labels(LABEL_MIRROR_CLUSTER))
        .await
    else {
        return;
    };
    let clusters: BTreeSet<String> = list
        .items
        .iter()
        .filter_map(|s| {
            s.metadata
                .labels
                .as_ref()?
                .get(LABEL_MIRROR_CLUSTER)
                .cloned()
        })
        .filter(|c| !linked.contains(c))
        .collect();
    for cluster in clusters {
        tracing::info!(%cluster, "deleting the mirrors of a cluster no longer linked");
        if let Err(error) = delete_mirrors_except(local, &cluster, &Keep::default()).await {
            tracing::warn!(%cluster, %error, "cannot delete orphaned mirrors");
        }
    }
}

/// Watches one linked cluster and keeps its mirrors written, until aborted.
async fn follow(local: Client, link: Link, resync: Duration, metrics: MulticlusterMetrics) {
    let cluster = link.cluster.clone();
    let remote = loop {
        match link.client().await {
            Ok(client) => break client,
            Err(error) => {
                metrics.link_up(&cluster, false);
                tracing::warn!(%cluster, %error, "cannot reach the linked cluster; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    };
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (pods, pods_writer) = reflector::store::<WirePod>();
    let exported = watcher::Config::default().labels(&format!("{LABEL_EXPORTED}=true"));
    let mut changes = futures::stream::select_all([
        watched(
            0,
            reflector::reflector(
                services_writer,
                watcher::watcher(Api::all(remote.clone()), exported),
            ),
        ),
        watched(
            1,
            reflector::reflector(
                slices_writer,
                watcher::watcher(Api::all(remote.clone()), watcher::Config::default()),
            ),
        ),
        watched(
            2,
            reflector::reflector(
                pods_writer,
                watcher::watcher(Api::all(remote), watcher::Config::default()),
            ),
        ),
    ]);
    let mut listed = [false; 3];
    let mut written = Written::default();
    let mut resync_at = tokio::time::Instant::now() + resync;
    loop {
        let change = tokio::time::timeout_at(resync_at, changes.next()).await;
        match change {
            Ok(None) => return,
            Ok(Some((_, Err(error)))) => {
                metrics.link_up(&cluster, false);
                tracing::warn!(%cluster, %error, "watch of the linked cluster failed; retrying with backoff");
                continue;
            }
            Ok(Some((kind, Ok(done)))) => {
                listed[kind] |= done;
                // Gather the rest of a burst (a relist, a rollout) into one write.
                let settle = tokio::time::sleep(SETTLE);
                tokio::pin!(settle);
                loop {
                    tokio::select! {
                        () = &mut settle => break,
                        next = changes.next() => match next {
                            Some((kind, Ok(done))) => listed[kind] |= done,
                            Some((_, Err(_))) => {}
                            None => return,
                        },
                    }
                }
            }
            Err(_) => {
                written.clear();
                resync_at = tokio::time::Instant::now() + resync;
            }
        }
        if !listed.iter().all(|l| *l) {
            continue;
        }
        metrics.link_up(&cluster, true);
        let state = remote_state(&services, &slices, &pods);
        let desired = mirror::mirrors(&link, &state);
        for problem in &desired.problems {
            tracing::warn!(%cluster, problem, "cannot mirror an exported Service");
        }
        match write_mirrors(&local, &cluster, &desired, &mut written).await {
            Ok(problems) => {
                for problem in &problems {
                    tracing::warn!(%cluster, problem, "mirror not written");
                }
                metrics.mirrors(
                    &cluster,
                    desired.services.len(),
                    desired.problems.len() + problems.len(),
                );
            }
            Err(error) => {
                written.clear();
                tracing::warn!(%cluster, %error, "cannot write mirrors here; retrying on the next change");
            }
        }
    }
}

/// One remote kind's changes: (which kind, Ok(whether a list just finished) or the error).
type Changes = futures::stream::BoxStream<'static, (usize, Result<bool, String>)>;

/// A reflector's events as [`Changes`].
fn watched<K>(
    kind: usize,
    events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
) -> Changes
where
    K: Send + 'static,
{
    events
        .default_backoff()
        .map(move |event| {
            (
                kind,
                event
                    .map(|e| matches!(e, Event::InitDone))
                    .map_err(|e| e.to_string()),
            )
        })
        .boxed()
}

fn remote_state(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    pods: &Store<WirePod>,
) -> Remote {
    let services = services.state();
    let slices = slices.state();
    let pods = mirror::wanted_pods(&services, &slices)
        .into_iter()
        .filter_map(|(namespace, name)| {
            let wire = pods.get(&ObjectRef::new(&name).within(&namespace))?;
            Some(((namespace, name), Pod::from((*wire).clone())))
        })
        .collect();
    Remote {
        services,
        slices,
        pods,
    }
}

/// What this task last wrote, by kind and key, so an unchanged mirror is not written again
/// (cleared on every resync and after an error).
#[derive(Debug, Default)]
struct Written(HashMap<(&'static str, String, String), serde_json::Value>);

impl Written {
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The mirrors to keep when deleting the others: (namespace, name) by kind.
#[derive(Debug, Default)]
struct Keep {
    services: BTreeSet<(String, String)>,
    slices: BTreeSet<(String, String)>,
}

fn key_of<K: Resource>(object: &K) -> (String, String) {
    let meta = object.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Writes `desired`'s objects and deletes this cluster's other mirrors; returns what could not
/// be written and why (a namespace missing here, a Service that is not a mirror).
async fn write_mirrors(
    local: &Client,
    cluster: &str,
    desired: &mirror::Mirrors,
    written: &mut Written,
) -> Result<Vec<String>, kube::Error> {
    let mut problems = Vec::new();
    let mut keep = Keep::default();
    for service in &desired.services {
        if let Some(problem) = write(local, cluster, service, written).await? {
            problems.push(problem);
        } else {
            keep.services.insert(key_of(service));
        }
    }
    for slice in &desired.slices {
        let (namespace, _) = key_of(slice);
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::meta::LABEL_SERVICE_NAME))
            .cloned()
            .unwrap_or_default();
        // A slice is written only with its Service (discovery reads it through it).
        if !keep.services.contains(&(namespace, owner)) {
            continue;
        }
        if let Some(problem) = write(local, cluster, slice, written).await? {
            problems.push(problem);
        } else {
            keep.slices.insert(key_of(slice));
        }
    }
    delete_mirrors_except(local, cluster, &keep).await?;
    written.0.retain(|(kind, ns, name), _| match *kind {
        "Service" => keep.services.contains(&(ns.clone(), name.clone())),
        _ => keep.slices.contains(&(ns.clone(), name.clone())),
    });
    Ok(problems)
}

/// Creates or updates one mirror object; Some(problem) when it may not or cannot be written.
async fn write<K>(
    local: &Client,
    cluster: &str,
    object: &K,
    written: &mut Written,
) -> Result<Option<String>, kube::Error>
where
    K: k8s_openapi::Resource
        + Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let (namespace, name) = key_of(object);
    let kind = <K as k8s_openapi::Resource>::KIND;
    let value = serde_json::to_value(object).map_err(kube::Error::SerdeError)?;
    let key = (kind, namespace.clone(), name.clone());
    if written.0.get(&key) == Some(&value) {
        return Ok(None);
    }
    let api: Api<K> = Api::namespaced(local.clone(), &namespace);
    let existing = match api.get_opt(&name).await {
        Ok(existing) => existing,
        Err(kube::Error::Api(status)) if status.code == 404 => None,
        Err(e) => return Err(e),
    };
    let result = match existing {
        Some(existing) => {
            let mirror_of = existing
                .meta()
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_MIRROR_CLUSTER));
            if mirror_of.map(String::as_str) != Some(cluster) {
                return Ok(Some(format!(
                    "{kind} {namespace}/{name} exists here and is not a mirror of cluster {cluster}: left alone"
                )));
            }
            api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map(drop)
        }
        None => api.create(&PostParams::default(), object).await.map(drop),
    };
    match result {
        Ok(()) => {
            written.0.insert(key, value);
            Ok(None)
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Some(format!(
            "{kind} {namespace}/{name}: namespace {namespace} does not exist in this cluster"
        ))),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Some(format!(
            "{kind} {namespace}/{name}: conflict ({}); retried on the next change",
            status.message
        ))),
        Err(e) => Err(e),
    }
}

/// Deletes `cluster`'s mirror Services and slices that `keep` does not name.
async fn delete_mirrors_except(
    local: &Client,
    cluster: &str,
    keep: &Keep,
) -> Result<(), kube::Error> {
    let selector = format!("{LABEL_MIRROR_CLUSTER}={cluster}");
    let services: Api<Service> = Api::all(local.clone());
    for service in services
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let key = key_of(&service);
        if !keep.services.contains(&key) {
            tracing::info!(%cluster, service = %format!("{}/{}", key.0, key.1), "deleting a mirror");
            delete::<Service>(local, &key).await?;
        }
    }
    let slices: Api<EndpointSlice> = Api::all(local.clone());
    let slice_selector = format!("{selector},{LABEL_MANAGED_BY}={MANAGER}");
    for slice in slices
        .list(&ListParams::default().labels(&slice_selector))
        .await?
        .items
    {
        let key = key_of(&slice);
        if !keep.slices.contains(&key) {
            delete::<EndpointSlice>(local, &key).await?;
        }
    }
    Ok(())
}

async fn delete<K>(local: &Client, (namespace, name): &(String, String)) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(local.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
