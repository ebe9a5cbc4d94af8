//! The one in-memory index every discovery backend feeds, and the immutable snapshots that
//! `Destination.Get` streams read.
//!
//! The [`Index`] is written by one task (the backend's); each [`Index::publish`] turns the
//! changes since the last one into a new [`Snapshot`] on a `watch` channel. Only the namespaces
//! that changed are rebuilt, and an endpoint set that did not change keeps its `Arc`, so a
//! stream whose target is untouched sees the same pointer and does no work.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::watch;

use crate::endpoints::{EndpointInfo, EndpointSet, PodMeta, TargetState};
use crate::meta::{self, MeshedPod, MeshedRule, PortSet};
use crate::objects::{Kind, Object, ObjectKey};
use crate::pod::{Labels, Pod};
use crate::policy::{PolicyInputs, PolicyStore};
use crate::target::Target;

mod labels;
use labels::PodLabels;

/// How the index derives endpoints; differs between backends.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// The trust domain of SPIFFE identities.
    pub trust_domain: String,
    /// How a pod is recognised as meshed.
    pub meshed_rule: MeshedRule,
    /// Derive a Service's endpoints from its selected pods when no EndpointSlice names the
    /// Service: the file backend has no EndpointSlice controller to write them.
    pub endpoints_from_pods: bool,
    /// Hold back a slice endpoint whose pod is not in the index yet. Pods and EndpointSlices
    /// come from separate watches, so a slice can name a pod a moment before the pod arrives;
    /// published then, a meshed endpoint would go out without its identity (plaintext) and
    /// be corrected a moment later. Waiting for the pod is the safe order.
    pub wait_for_pods: bool,
    /// The controller runs a CA, so meshed proxies have identities (see [`meta::meshed`]).
    pub identity_enabled: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            meshed_rule: MeshedRule::ProxyPresent,
            endpoints_from_pods: false,
            wait_for_pods: true,
            identity_enabled: true,
        }
    }
}

/// A Service as streams need it: its cluster IPs and the ready endpoints of each TCP port.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    /// Namespace and name.
    pub key: ObjectKey,
    /// Its cluster IPs (none for a headless Service).
    pub cluster_ips: Vec<IpAddr>,
    /// Ready endpoints by Service port.
    pub ports: BTreeMap<u16, Arc<EndpointSet>>,
    /// The labels of its targets (`service`, `namespace`).
    pub labels: Arc<BTreeMap<String, String>>,
}

/// A pod reachable by its own IP, for targets that are a pod IP and port.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    /// The pod's metadata for labels, shared with its endpoints.
    pub meta: Arc<PodMeta>,
    /// Its IP.
    pub ip: IpAddr,
    /// The zone, when known.
    pub zone: Option<String>,
    /// Identity and inbound port when meshed.
    pub meshed: Option<MeshedPod>,
    /// Its opaque ports (pod or namespace annotation).
    pub opaque: PortSet,
    /// Container port names by number, to match opaque ports given by name.
    pub port_names: BTreeMap<u16, String>,
    /// Its application containers have terminated for good ([`meta::app_finished`]).
    pub app_finished: bool,
}

impl PodView {
    /// Whether this is the view of pod `namespace/name` (an IP can pass to another pod).
    pub fn is(&self, namespace: &str, name: &str) -> bool {
        self.meta.name == name && self.meta.namespace == namespace
    }

    fn endpoint(&self, port: u16) -> EndpointInfo {
        EndpointInfo {
            addr: SocketAddr::new(self.ip, port),
            zone: self.zone.clone(),
            pod: Some(self.meta.clone()),
            identity: self.meshed.as_ref().and_then(|m| m.identity.clone()),
            inbound_proxy_port: self.meshed.as_ref().map(|m| m.inbound_proxy_port),
            gateway: None,
            opaque: self
                .opaque
                .contains(port, self.port_names.get(&port).map(String::as_str)),
        }
    }
}

/// An immutable view of the index at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Increases with every published change.
    pub version: u64,
    /// When the first change folded into this snapshot was seen by the backend: streams
    /// measure their update latency from here.
    pub changed_at: Instant,
    /// Number of objects of each kind.
    pub counts: BTreeMap<Kind, usize>,
    // Persistent maps: each publish starts from the previous snapshot's, and a clone shares
    // them instead of copying 100,000 pods for one that changed.
    services: imbl::HashMap<ObjectKey, Arc<ServiceView>>,
    cluster_ips: imbl::HashMap<IpAddr, ObjectKey>,
    pods: imbl::HashMap<IpAddr, Arc<PodView>>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            version: 0,
            changed_at: Instant::now(),
            counts: Kind::ALL.iter().map(|k| (*k, 0)).collect(),
            services: imbl::HashMap::new(),
            cluster_ips: imbl::HashMap::new(),
            pods: imbl::HashMap::new(),
        }
    }
}

/// The result of resolving a target against a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The target exists; here is its state.
    Found(TargetState),
    /// Nothing by that name or address; the reason names the target.
    NotFound(String),
}

impl Resolution {
    /// The state a stream moves to: an unknown target has no endpoints and does not exist.
    pub fn into_state(self) -> TargetState {
        match self {
            Resolution::Found(state) => state,
            Resolution::NotFound(_) => TargetState::unknown(),
        }
    }
}

impl Snapshot {
    /// Every pod with an IP of its own, in no particular order: the pods the stats scraper
    /// visits (`crate::stats`).
    pub fn pods(&self) -> impl Iterator<Item = &Arc<PodView>> {
        self.pods.values()
    }

    /// The pod whose own IP is `ip`.
    pub fn pod_at(&self, ip: IpAddr) -> Option<&Arc<PodView>> {
        self.pods.get(&ip)
    }

    /// The service view by key.
    pub fn service(&self, key: &ObjectKey) -> Option<&Arc<ServiceView>> {
        self.services.get(key)
    }

    /// Resolves a target to its current state.
    pub fn resolve(&self, target: &Target) -> Resolution {
        match target {
            Target::Service {
                namespace,
                name,
                port,
            } => {
                let key = ObjectKey::new(namespace.as_str(), name.as_str());
                match self.services.get(&key) {
                    Some(view) => service_port_state(view, *port),
                    None => Resolution::NotFound(format!("service {key} not found ({target})")),
                }
            }
            Target::Addr(addr) => {
                if let Some(view) = self
                    .cluster_ips
                    .get(&addr.ip())
                    .and_then(|key| self.services.get(key))
                {
                    return service_port_state(view, addr.port());
                }
                if let Some(pod) = self.pods.get(&addr.ip()) {
                    let ep = pod.endpoint(addr.port());
                    return Resolution::Found(TargetState {
                        exists: true,
                        endpoints: Arc::new([(ep.addr, ep)].into()),
                        labels: Arc::new(
                            [("namespace".to_owned(), pod.meta.namespace.clone())].into(),
                        ),
                    });
                }
                Resolution::NotFound(format!(
                    "{addr} is neither a service cluster IP nor a pod IP"
                ))
            }
        }
    }
}

fn service_port_state(view: &ServiceView, port: u16) -> Resolution {
    match view.ports.get(&port) {
        Some(set) => Resolution::Found(TargetState {
            exists: true,
            endpoints: set.clone(),
            labels: view.labels.clone(),
        }),
        None => Resolution::NotFound(format!("service {} has no TCP port {port}", view.key)),
    }
}

/// Beyond this many changed services and pods in one namespace, the whole namespace is
/// rebuilt: cheaper than working out each one's dependents (a relist, a big rollout).
const MAX_DIRTY_PER_NAMESPACE: usize = 256;

/// What changed in one namespace since the last publish.
#[derive(Debug, Default)]
struct Dirty {
    /// Rebuild everything in the namespace.
    all: bool,
    /// Services whose views must be rebuilt.
    services: BTreeSet<String>,
    /// Pods whose pod-IP views must be rebuilt.
    pods: BTreeSet<String>,
}

/// The index: the objects of every kind, and the channel its snapshots go out on.
#[derive(Debug)]
pub struct Index {
    options: IndexOptions,
    objects: BTreeMap<Kind, BTreeMap<ObjectKey, Object>>,
    dirty: BTreeMap<String, Dirty>,
    dirty_since: Option<Instant>,
    /// Where each pod's view sits in the snapshot's pod-IP map.
    pod_ips: HashMap<ObjectKey, IpAddr>,
    /// The pods carrying each label, for selectors.
    pod_labels: PodLabels,
    tx: watch::Sender<Arc<Snapshot>>,
    /// The raw objects policy reads, published with each snapshot (see `policy::store`).
    policy: PolicyStore,
}

/// The labels a Service selector is matched against, or `None` for an object without any.
fn pod_labels(object: Option<&Object>) -> Option<&Labels> {
    match object {
        Some(Object::Pod(pod) | Object::ExternalWorkload(pod)) => Some(&pod.labels),
        _ => None,
    }
}

/// Whether a kind is seen as pods: pods, and hosts outside Kubernetes (`crate::external`).
/// They share one name space per namespace: a pod and an ExternalWorkload of the same name
/// are one to the views.
fn is_pod_like(kind: Kind) -> bool {
    matches!(kind, Kind::Pod | Kind::ExternalWorkload)
}

impl Index {
    /// An empty index and a receiver of its snapshots.
    pub fn new(options: IndexOptions) -> (Index, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let index = Index {
            options,
            objects: Kind::ALL.iter().map(|k| (*k, BTreeMap::new())).collect(),
            dirty: BTreeMap::new(),
            dirty_since: None,
            pod_ips: HashMap::new(),
            pod_labels: PodLabels::default(),
            tx,
            policy: PolicyStore::new(),
        };
        (index, rx)
    }

    /// Another receiver of the snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// A receiver of the policy inputs, published with the snapshots.
    pub fn subscribe_policy(&self) -> watch::Receiver<Arc<PolicyInputs>> {
        self.policy.subscribe()
    }

    /// The number of objects of each kind now held (published or not).
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        self.objects.iter().map(|(k, m)| (*k, m.len())).collect()
    }

    fn map(&mut self, kind: Kind) -> &mut BTreeMap<ObjectKey, Object> {
        self.objects.entry(kind).or_default()
    }

    /// Records which views a change of one object (from `old` to `new`, either absent) can
    /// affect. Called with the index already holding `new`.
    fn mark(&mut self, kind: Kind, key: &ObjectKey, old: Option<&Object>, new: Option<&Object>) {
        self.dirty_since.get_or_insert_with(Instant::now);
        if is_pod_like(kind) {
            self.pod_labels
                .update(key, pod_labels(old), pod_labels(new));
        }
        let namespace = if kind == Kind::Namespace {
            key.name.clone()
        } else {
            key.namespace.clone()
        };
        // Computed before borrowing the dirty entry: it reads the index.
        let pod_services = (is_pod_like(kind)
            && !self.dirty.get(&namespace).is_some_and(|d| d.all))
        .then(|| self.services_selecting(&namespace, [pod_labels(old), pod_labels(new)]));
        let dirty = self.dirty.entry(namespace).or_default();
        if dirty.all {
            return;
        }
        match kind {
            Kind::Namespace => dirty.all = true,
            Kind::Service => {
                dirty.services.insert(key.name.clone());
            }
            Kind::EndpointSlice => {
                for object in [old, new].into_iter().flatten() {
                    if let Object::EndpointSlice(slice) = object {
                        let service = slice
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(meta::LABEL_SERVICE_NAME));
                        if let Some(service) = service {
                            dirty.services.insert(service.clone());
                        }
                    }
                }
            }
            Kind::Pod | Kind::ExternalWorkload => {
                dirty.pods.insert(key.name.clone());
                dirty.services.extend(pod_services.unwrap_or_default());
            }
            // Identities come from the pod's spec; a ServiceAccount only changes the counts
            // (the entry makes publish look).
            Kind::ServiceAccount => {}
            // Policy kinds feed `policy::store`, not discovery's views.
            kind if kind.is_policy() => {}
            _ => {}
        }
        if dirty.services.len() + dirty.pods.len() > MAX_DIRTY_PER_NAMESPACE {
            *dirty = Dirty {
                all: true,
                ..Dirty::default()
            };
        }
    }

    /// The Services of a namespace whose endpoints a pod with any of these label sets can
    /// be part of: those whose selector matches, and those without a selector (their
    /// hand-made EndpointSlices may name the pod).
    fn services_selecting(&self, namespace: &str, label_sets: [Option<&Labels>; 2]) -> Vec<String> {
        self.in_namespace(Kind::Service, namespace)
            .filter_map(|object| match object {
                Object::Service(service) => Some(service),
                _ => None,
            })
            .filter(|service| {
                let selector = service.spec.as_ref().and_then(|s| s.selector.as_ref());
                match selector {
                    Some(selector) if !selector.is_empty() => label_sets
                        .iter()
                        .any(|labels| meta::selector_matches(selector, *labels)),
                    _ => true,
                }
            })
            .map(|service| service.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    /// Adds or replaces an object; returns whether anything changed.
    pub fn apply(&mut self, object: Object) -> bool {
        let object = object.with_default_namespace();
        self.policy.apply(&object);
        let kind = object.kind();
        let key = object.key();
        let old = self.map(kind).insert(key.clone(), object.clone());
        if old.as_ref().is_some_and(|old| old.same(&object)) {
            return false;
        }
        self.mark(kind, &key, old.as_ref(), Some(&object));
        true
    }

    /// Removes an object; returns whether it was there.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) -> bool {
        self.policy.delete(kind, key);
        let Some(old) = self.map(kind).remove(key) else {
            return false;
        };
        self.mark(kind, key, Some(&old), None);
        true
    }

    /// Replaces every object of one kind (a watch relisted).
    pub fn replace_kind(&mut self, kind: Kind, objects: impl IntoIterator<Item = Object>) {
        let mut next = BTreeMap::new();
        for object in objects {
            let object = object.with_default_namespace();
            if object.kind() == kind {
                next.insert(object.key(), object);
            }
        }
        self.policy.replace_kind(kind, next.values());
        let prev = std::mem::replace(self.map(kind), next);
        let mut changes = Vec::new();
        for (key, old) in &prev {
            match self.objects.get(&kind).and_then(|m| m.get(key)) {
                Some(new) if new.same(old) => {}
                new => changes.push((key.clone(), Some(old.clone()), new.cloned())),
            }
        }
        let added: Vec<(ObjectKey, Option<Object>, Option<Object>)> = self
            .objects
            .get(&kind)
            .into_iter()
            .flatten()
            .filter(|(key, _)| !prev.contains_key(*key))
            .map(|(key, new)| (key.clone(), None, Some(new.clone())))
            .collect();
        changes.extend(added);
        for (key, old, new) in changes {
            self.mark(kind, &key, old.as_ref(), new.as_ref());
        }
    }

    /// Replaces every object (a folder was reread).
    pub fn replace_all(&mut self, objects: impl IntoIterator<Item = Object>) {
        let mut by_kind: BTreeMap<Kind, Vec<Object>> =
            Kind::ALL.iter().map(|k| (*k, Vec::new())).collect();
        for object in objects {
            by_kind.entry(object.kind()).or_default().push(object);
        }
        for (kind, objects) in by_kind {
            self.replace_kind(kind, objects);
        }
    }

    /// Folds the changes since the last call into a new snapshot and sends it, unless no
    /// view changed. Returns the snapshot sent, if any.
    pub fn publish(&mut self) -> Option<Arc<Snapshot>> {
        self.policy.publish();
        if self.dirty.is_empty() {
            return None;
        }
        let dirty = std::mem::take(&mut self.dirty);
        let changed_at = self.dirty_since.take().unwrap_or_else(Instant::now);
        let prev = self.tx.borrow().clone();
        let mut next = Snapshot {
            version: prev.version + 1,
            changed_at,
            counts: self.counts(),
            services: prev.services.clone(),
            cluster_ips: prev.cluster_ips.clone(),
            pods: prev.pods.clone(),
        };
        let mut changed = next.counts != prev.counts;
        for (namespace, dirty) in &dirty {
            changed |= self.rebuild(namespace, dirty, &prev, &mut next);
        }
        if !changed {
            return None;
        }
        let next = Arc::new(next);
        self.tx.send_replace(next.clone());
        Some(next)
    }

    /// Rebuilds the dirty views of one namespace into `next`; returns whether any changed.
    fn rebuild(
        &mut self,
        namespace: &str,
        dirty: &Dirty,
        prev: &Snapshot,
        next: &mut Snapshot,
    ) -> bool {
        let (services, pods): (Vec<String>, Vec<String>) = if dirty.all {
            let names = |kind| {
                self.in_namespace(kind, namespace)
                    .map(|o| o.key().name)
                    .collect::<Vec<_>>()
            };
            // Views of objects gone since the last publish must go as well.
            let mut services = names(Kind::Service);
            services.extend(
                prev.services
                    .keys()
                    .filter(|k| k.namespace == namespace)
                    .map(|k| k.name.clone()),
            );
            let mut pods = names(Kind::Pod);
            pods.extend(names(Kind::ExternalWorkload));
            pods.extend(
                self.pod_ips
                    .keys()
                    .filter(|k| k.namespace == namespace)
                    .map(|k| k.name.clone()),
            );
            services.sort();
            services.dedup();
            pods.sort();
            pods.dedup();
            (services, pods)
        } else {
            (
                dirty.services.iter().cloned().collect(),
                dirty.pods.iter().cloned().collect(),
            )
        };
        let mut changed = false;
        let mut pod_ips = Vec::new();
        {
            let mut ctx = NamespaceCtx::new(self, namespace);
            // Pods first: the services' endpoints then share their metadata.
            for name in pods {
                let key = ObjectKey::new(namespace, name);
                let old_ip = self.pod_ips.get(&key).copied();
                let is_this_pod = |p: &Arc<PodView>| p.is(&key.namespace, &key.name);
                let old = old_ip
                    .and_then(|ip| prev.pods.get(&ip))
                    .filter(|p| is_this_pod(p));
                if let Some(ip) = old_ip
                    && next.pods.get(&ip).is_some_and(is_this_pod)
                {
                    next.pods.remove(&ip);
                }
                let view = ctx.pod(&key.name).and_then(|pod| pod_view(&ctx, pod));
                let view = match (view, old) {
                    (Some(view), Some(old)) if **old == view => Some(old.clone()),
                    (Some(view), _) => Some(Arc::new(view)),
                    (None, _) => None,
                };
                changed |= match (&view, old) {
                    (Some(view), Some(old)) => !Arc::ptr_eq(view, old),
                    (None, None) => false,
                    _ => true,
                };
                pod_ips.push((key, view.as_ref().map(|v| v.ip)));
                if let Some(view) = view {
                    next.pods.insert(view.ip, view);
                }
            }
            ctx.pod_views = Some(&next.pods);
            for name in services {
                let key = ObjectKey::new(namespace, name);
                let old = prev.services.get(&key);
                if let Some(old) = old {
                    for ip in &old.cluster_ips {
                        if next.cluster_ips.get(ip) == Some(&key) {
                            next.cluster_ips.remove(ip);
                        }
                    }
                }
                let service = self
                    .objects
                    .get(&Kind::Service)
                    .and_then(|m| m.get(&key))
                    .and_then(|o| match o {
                        Object::Service(s) => Some(s.as_ref()),
                        _ => None,
                    });
                let Some(service) = service else {
                    changed |= next.services.remove(&key).is_some();
                    continue;
                };
                let view = service_view(&ctx, service, old.map(Arc::as_ref));
                let view = match old {
                    Some(old) if **old == view => old.clone(),
                    _ => {
                        changed = true;
                        Arc::new(view)
                    }
                };
                for ip in &view.cluster_ips {
                    next.cluster_ips.insert(*ip, key.clone());
                }
                next.services.insert(key, view);
            }
        }
        for (key, ip) in pod_ips {
            match ip {
                Some(ip) => self.pod_ips.insert(key, ip),
                None => self.pod_ips.remove(&key),
            };
        }
        changed
    }

    fn in_namespace<'a>(
        &'a self,
        kind: Kind,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Object> + 'a {
        let start = ObjectKey::new(namespace, "");
        self.objects
            .get(&kind)
            .into_iter()
            .flat_map(move |m| m.range(start.clone()..))
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, o)| o)
    }
}

/// What endpoint derivation needs to know about one namespace; the costlier lookups are
/// built on first use, once per publish.
struct NamespaceCtx<'a> {
    name: &'a str,
    namespace: Option<&'a Namespace>,
    pods: Option<&'a BTreeMap<ObjectKey, Object>>,
    external_workloads: Option<&'a BTreeMap<ObjectKey, Object>>,
    slices: HashMap<&'a str, Vec<&'a EndpointSlice>>,
    pod_labels: &'a PodLabels,
    options: &'a IndexOptions,
    /// The pods' views once this publish has rebuilt them: endpoints share their metadata.
    pod_views: Option<&'a imbl::HashMap<IpAddr, Arc<PodView>>>,
}

impl<'a> NamespaceCtx<'a> {
    fn new(index: &'a Index, name: &'a str) -> Self {
        let namespace = index
            .objects
            .get(&Kind::Namespace)
            .and_then(|m| m.get(&ObjectKey::new("", name)))
            .and_then(|o| match o {
                Object::Namespace(ns) => Some(ns.as_ref()),
                _ => None,
            });
        let mut slices: HashMap<&str, Vec<&EndpointSlice>> = HashMap::new();
        for object in index.in_namespace(Kind::EndpointSlice, name) {
            if let Object::EndpointSlice(slice) = object {
                let service = slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(meta::LABEL_SERVICE_NAME));
                if let Some(service) = service {
                    slices
                        .entry(service.as_str())
                        .or_default()
                        .push(slice.as_ref());
                }
            }
        }
        Self {
            name,
            namespace,
            pods: index.objects.get(&Kind::Pod),
            external_workloads: index.objects.get(&Kind::ExternalWorkload),
            slices,
            pod_labels: &index.pod_labels,
            options: &index.options,
            pod_views: None,
        }
    }

    /// A pod of the namespace by name, or an external workload seen as one.
    fn pod(&self, name: &str) -> Option<&'a Pod> {
        let key = ObjectKey::new(self.name, name);
        let object = self
            .pods
            .and_then(|pods| pods.get(&key))
            .or_else(|| self.external_workloads?.get(&key))?;
        match object {
            Object::Pod(pod) | Object::ExternalWorkload(pod) => Some(pod.as_ref()),
            _ => None,
        }
    }

    /// The pods a selector picks, in name order; costs about the number of pods carrying the
    /// selector's rarest label, not the namespace's pods.
    fn selected_pods(&self, selector: &BTreeMap<String, String>) -> Vec<&'a Pod> {
        if selector.is_empty() {
            return Vec::new();
        }
        self.pod_labels
            .candidates(self.name, selector)
            .into_iter()
            .flatten()
            .filter_map(|name| self.pod(name))
            .filter(|pod| meta::selector_matches(selector, Some(&pod.labels)))
            .collect()
    }

    /// The endpoint for a pod (or an unknown owner) at an address.
    fn endpoint(
        &self,
        addr: SocketAddr,
        pod: Option<&Pod>,
        zone: Option<String>,
        service_opaque: bool,
    ) -> EndpointInfo {
        let Some(pod) = pod else {
            let ns_opaque = meta::opaque_ports(
                self.namespace
                    .and_then(|ns| ns.metadata.annotations.as_ref()),
            );
            return EndpointInfo {
                addr,
                zone,
                pod: None,
                identity: None,
                inbound_proxy_port: None,
                opaque: service_opaque || ns_opaque.contains(addr.port(), None),
                gateway: None,
            };
        };
        let view = self
            .pod_views
            .and_then(|views| views.get(&addr.ip()))
            .filter(|view| {
                view.is(
                    pod.metadata.namespace.as_deref().unwrap_or_default(),
                    pod.metadata.name.as_deref().unwrap_or_default(),
                )
            });
        if let Some(view) = view {
            let mut endpoint = view.endpoint(addr.port());
            endpoint.opaque |= service_opaque;
            endpoint.zone = zone.or(endpoint.zone);
            return endpoint;
        }
        let meshed = meta::meshed(
            pod,
            self.namespace,
            &self.options.trust_domain,
            self.options.meshed_rule,
            self.options.identity_enabled,
        );
        let port_names = container_port_names(pod);
        let opaque = service_opaque
            || meta::pod_opaque_ports(pod, self.namespace).contains(
                addr.port(),
                port_names.get(&addr.port()).map(String::as_str),
            );
        EndpointInfo {
            addr,
            zone: zone.or_else(|| pod_zone(pod)),
            pod: Some(Arc::new(pod_meta(pod))),
            identity: meshed.as_ref().and_then(|m| m.identity.clone()),
            inbound_proxy_port: meshed.map(|m| m.inbound_proxy_port),
            opaque,
            gateway: None,
        }
    }
}

fn pod_meta(pod: &Pod) -> PodMeta {
    let (workload_kind, workload_name) = meta::workload(pod);
    PodMeta {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        workload_kind,
        workload_name,
        service_account: meta::service_account(pod).to_owned(),
    }
}

fn pod_zone(pod: &Pod) -> Option<String> {
    pod.labels.get(meta::LABEL_ZONE).map(str::to_owned)
}

fn container_port_names(pod: &Pod) -> BTreeMap<u16, String> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((u16::try_from(p.container_port).ok()?, p.name.clone()?)))
        .collect()
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.unwrap_or("TCP") == "TCP"
}

/// A pod reachable by its own IP; none for pods without an IP of their own.
fn pod_view(ctx: &NamespaceCtx<'_>, pod: &Pod) -> Option<PodView> {
    if meta::pod_uses_host_network(pod) {
        // Its IP is the node's, shared with other pods: it cannot name this pod.
        return None;
    }
    let ip = meta::pod_ip(pod)?;
    Some(PodView {
        meta: Arc::new(pod_meta(pod)),
        ip,
        zone: pod_zone(pod),
        meshed: meta::meshed(
            pod,
            ctx.namespace,
            &ctx.options.trust_domain,
            ctx.options.meshed_rule,
            ctx.options.identity_enabled,
        ),
        opaque: meta::pod_opaque_ports(pod, ctx.namespace),
        port_names: container_port_names(pod),
        app_finished: meta::app_finished(pod),
    })
}

/// The view of one Service: its cluster IPs and, per TCP port, its ready endpoints, from its
/// EndpointSlices or (when allowed and it has none) from the pods its selector picks. Sets
/// equal to the previous view's keep their `Arc`.
fn service_view(
    ctx: &NamespaceCtx<'_>,
    service: &Service,
    prev: Option<&ServiceView>,
) -> ServiceView {
    let key = ObjectKey::new(
        service.metadata.namespace.clone().unwrap_or_default(),
        service.metadata.name.clone().unwrap_or_default(),
    );
    let slices = ctx
        .slices
        .get(key.name.as_str())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let from_pods = slices.is_empty() && ctx.options.endpoints_from_pods;
    let selected = match spec_selector(service) {
        Some(selector) if from_pods => ctx.selected_pods(selector),
        _ => Vec::new(),
    };
    // No EndpointSlice controller knows hosts outside Kubernetes: where endpoints come from
    // slices, the external workloads the selector picks join them.
    let external: Vec<&Pod> = match spec_selector(service) {
        Some(selector) if !from_pods && ctx.external_workloads.is_some_and(|m| !m.is_empty()) => {
            ctx.selected_pods(selector)
                .into_iter()
                .filter(|pod| crate::external::is_external(pod))
                .collect()
        }
        _ => Vec::new(),
    };
    let spec = service.spec.as_ref();
    let mut cluster_ips: Vec<IpAddr> = spec
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(spec.and_then(|s| s.cluster_ip.clone()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    cluster_ips.sort();
    cluster_ips.dedup();
    let opaque = meta::opaque_ports(service.metadata.annotations.as_ref());
    let mut ports = BTreeMap::new();
    for sp in spec.and_then(|s| s.ports.as_deref()).unwrap_or_default() {
        if !is_tcp(sp.protocol.as_deref()) {
            continue;
        }
        let Ok(port) = u16::try_from(sp.port) else {
            continue;
        };
        let service_opaque = opaque.contains(port, sp.name.as_deref());
        let set = if from_pods {
            endpoints_from_pods(ctx, service, &selected, sp, service_opaque)
        } else {
            let mut set = endpoints_from_slices(ctx, sp, slices, service_opaque);
            if !external.is_empty() {
                set.extend(endpoints_from_pods(
                    ctx,
                    service,
                    &external,
                    sp,
                    service_opaque,
                ));
            }
            set
        };
        let set = match prev.and_then(|p| p.ports.get(&port)) {
            Some(old) if **old == set => old.clone(),
            _ => Arc::new(set),
        };
        ports.insert(port, set);
    }
    let labels = match prev {
        Some(prev) => prev.labels.clone(),
        None => Arc::new(
            [
                ("service".to_owned(), key.name.clone()),
                ("namespace".to_owned(), key.namespace.clone()),
            ]
            .into(),
        ),
    };
    ServiceView {
        key,
        cluster_ips,
        ports,
        labels,
    }
}

fn spec_selector(service: &Service) -> Option<&BTreeMap<String, String>> {
    service.spec.as_ref()?.selector.as_ref()
}

/// The ready endpoints of one Service port, read from its EndpointSlices.
fn endpoints_from_slices(
    ctx: &NamespaceCtx<'_>,
    service_port: &ServicePort,
    slices: &[&EndpointSlice],
    service_opaque: bool,
) -> EndpointSet {
    let port_name = service_port.name.as_deref().unwrap_or_default();
    let mut set = EndpointSet::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or_default() == port_name && is_tcp(p.protocol.as_deref())
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        let remote = crate::multicluster::mirror::remote_endpoints(slice);
        for ep in &slice.endpoints {
            if !meta::endpoint_ready(ep) {
                continue;
            }
            let pod_name = meta::endpoint_pod(ep);
            let pod = pod_name.and_then(|name| ctx.pod(name));
            if let (Some(name), None, true) = (pod_name, pod, ctx.options.wait_for_pods) {
                tracing::debug!(
                    pod = name,
                    "holding back an endpoint until its pod is known"
                );
                continue;
            }
            for address in &ep.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    tracing::debug!(address, "skipping an endpoint address that is not an IP");
                    continue;
                };
                let addr = SocketAddr::new(ip, port);
                set.entry(addr).or_insert_with(|| {
                    let mut endpoint = ctx.endpoint(addr, pod, ep.zone.clone(), service_opaque);
                    // A linked cluster's endpoint: its proxy's identity comes with the slice.
                    if let (None, Some(remote)) = (pod, &remote) {
                        endpoint.identity = ctx
                            .options
                            .identity_enabled
                            .then(|| remote.identity.clone());
                        endpoint.inbound_proxy_port = Some(remote.inbound_proxy_port);
                        endpoint.gateway = remote.gateway.clone();
                    }
                    endpoint
                });
            }
        }
    }
    set
}

/// The ready endpoints of one Service port, from the pods its selector picks (what the
/// EndpointSlice controller would write).
fn endpoints_from_pods(
    ctx: &NamespaceCtx<'_>,
    service: &Service,
    selected: &[&Pod],
    service_port: &ServicePort,
    service_opaque: bool,
) -> EndpointSet {
    let spec = service.spec.as_ref();
    let publish_not_ready = spec
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut set = EndpointSet::new();
    for pod in selected {
        let Some(ip) = meta::pod_ip(pod) else {
            continue;
        };
        if !publish_not_ready && !meta::pod_is_ready(pod) {
            continue;
        }
        let Some(port) = meta::target_port(service_port, pod) else {
            continue;
        };
        let addr = SocketAddr::new(ip, port);
        set.entry(addr)
            .or_insert_with(|| ctx.endpoint(addr, Some(pod), None, service_opaque));
    }
    set
}

#[cfg(test)]
mod tests;
