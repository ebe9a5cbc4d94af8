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

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::watch;

use crate::endpoints::{EndpointInfo, EndpointSet, PodMeta, TargetState};
use crate::meta::{self, MeshedPod, MeshedRule, PortSet};
use crate::objects::{Kind, Object, ObjectKey};
use crate::target::Target;

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
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            meshed_rule: MeshedRule::ProxyPresent,
            endpoints_from_pods: false,
            wait_for_pods: true,
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
}

/// A pod reachable by its own IP, for targets that are a pod IP and port.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    /// The pod's metadata for labels.
    pub meta: PodMeta,
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
}

impl PodView {
    fn endpoint(&self, port: u16) -> EndpointInfo {
        EndpointInfo {
            addr: SocketAddr::new(self.ip, port),
            zone: self.zone.clone(),
            pod: Some(self.meta.clone()),
            identity: self.meshed.as_ref().map(|m| m.identity.clone()),
            inbound_proxy_port: self.meshed.as_ref().map(|m| m.inbound_proxy_port),
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
    services: HashMap<ObjectKey, Arc<ServiceView>>,
    cluster_ips: HashMap<IpAddr, ObjectKey>,
    pods: HashMap<IpAddr, Arc<PodView>>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            version: 0,
            changed_at: Instant::now(),
            counts: Kind::ALL.iter().map(|k| (*k, 0)).collect(),
            services: HashMap::new(),
            cluster_ips: HashMap::new(),
            pods: HashMap::new(),
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
                        labels: [("namespace".to_owned(), pod.meta.namespace.clone())].into(),
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
            labels: [
                ("service".to_owned(), view.key.name.clone()),
                ("namespace".to_owned(), view.key.namespace.clone()),
            ]
            .into(),
        }),
        None => Resolution::NotFound(format!("service {} has no TCP port {port}", view.key)),
    }
}

/// The index: the objects of every kind, and the channel its snapshots go out on.
#[derive(Debug)]
pub struct Index {
    options: IndexOptions,
    objects: BTreeMap<Kind, BTreeMap<ObjectKey, Object>>,
    dirty: BTreeSet<String>,
    dirty_since: Option<Instant>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Index {
    /// An empty index and a receiver of its snapshots.
    pub fn new(options: IndexOptions) -> (Index, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let index = Index {
            options,
            objects: Kind::ALL.iter().map(|k| (*k, BTreeMap::new())).collect(),
            dirty: BTreeSet::new(),
            dirty_since: None,
            tx,
        };
        (index, rx)
    }

    /// Another receiver of the snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The number of objects of each kind now held (published or not).
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        self.objects.iter().map(|(k, m)| (*k, m.len())).collect()
    }

    fn mark(&mut self, namespace: String) {
        self.dirty_since.get_or_insert_with(Instant::now);
        self.dirty.insert(namespace);
    }

    fn map(&mut self, kind: Kind) -> &mut BTreeMap<ObjectKey, Object> {
        self.objects.entry(kind).or_default()
    }

    /// Adds or replaces an object; returns whether anything changed.
    pub fn apply(&mut self, object: Object) -> bool {
        let object = object.with_default_namespace();
        let key = object.key();
        let namespace = object.affected_namespace();
        let map = self.map(object.kind());
        if map.get(&key) == Some(&object) {
            return false;
        }
        map.insert(key, object);
        self.mark(namespace);
        true
    }

    /// Removes an object; returns whether it was there.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) -> bool {
        if self.map(kind).remove(key).is_none() {
            return false;
        }
        let namespace = if kind == Kind::Namespace {
            key.name.clone()
        } else {
            key.namespace.clone()
        };
        self.mark(namespace);
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
        let prev = std::mem::take(self.map(kind));
        let mut touched = Vec::new();
        for (key, object) in &prev {
            if next.get(key) != Some(object) {
                touched.push(object.affected_namespace());
            }
        }
        for (key, object) in &next {
            if !prev.contains_key(key) {
                touched.push(object.affected_namespace());
            }
        }
        *self.map(kind) = next;
        for namespace in touched {
            self.mark(namespace);
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
        next.services.retain(|k, _| !dirty.contains(&k.namespace));
        next.cluster_ips
            .retain(|_, k| !dirty.contains(&k.namespace));
        next.pods.retain(|_, p| !dirty.contains(&p.meta.namespace));
        let mut changed = next.counts != prev.counts;
        for namespace in &dirty {
            let views = self.build_namespace(namespace, &prev);
            changed |= views.changed;
            for (key, view) in views.services {
                for ip in &view.cluster_ips {
                    next.cluster_ips.insert(*ip, key.clone());
                }
                next.services.insert(key, view);
            }
            for (ip, pod) in views.pods {
                next.pods.insert(ip, pod);
            }
        }
        if !changed {
            return None;
        }
        let next = Arc::new(next);
        self.tx.send_replace(next.clone());
        Some(next)
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

    fn build_namespace(&self, namespace: &str, prev: &Snapshot) -> NamespaceViews {
        let ns_object = self
            .objects
            .get(&Kind::Namespace)
            .and_then(|m| m.get(&ObjectKey::new("", namespace)))
            .and_then(|o| match o {
                Object::Namespace(ns) => Some(ns.as_ref()),
                _ => None,
            });
        let pods: BTreeMap<&str, &Pod> = self
            .in_namespace(Kind::Pod, namespace)
            .filter_map(|o| match o {
                Object::Pod(p) => {
                    Some((p.metadata.name.as_deref().unwrap_or_default(), p.as_ref()))
                }
                _ => None,
            })
            .collect();
        let mut slices: HashMap<&str, Vec<&EndpointSlice>> = HashMap::new();
        for object in self.in_namespace(Kind::EndpointSlice, namespace) {
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
        let ctx = NamespaceCtx {
            namespace: ns_object,
            pods: &pods,
            options: &self.options,
        };

        let prev_count = prev
            .services
            .keys()
            .filter(|k| k.namespace == namespace)
            .count()
            + prev
                .pods
                .values()
                .filter(|p| p.meta.namespace == namespace)
                .count();
        let mut views = NamespaceViews::default();
        for object in self.in_namespace(Kind::Service, namespace) {
            let Object::Service(service) = object else {
                continue;
            };
            let key = object.key();
            let own_slices = slices
                .get(key.name.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            let old = prev.services.get(&key);
            let view = service_view(&ctx, service, own_slices, old.map(Arc::as_ref));
            let view = match old {
                Some(old) if **old == view => old.clone(),
                _ => {
                    views.changed = true;
                    Arc::new(view)
                }
            };
            views.services.push((key, view));
        }
        for pod in pods.values() {
            let Some(view) = pod_view(&ctx, pod) else {
                continue;
            };
            let view = match prev.pods.get(&view.ip) {
                Some(old) if **old == view => old.clone(),
                _ => {
                    views.changed = true;
                    Arc::new(view)
                }
            };
            views.pods.push((view.ip, view));
        }
        if views.services.len() + views.pods.len() != prev_count {
            views.changed = true;
        }
        views
    }
}

#[derive(Default)]
struct NamespaceViews {
    services: Vec<(ObjectKey, Arc<ServiceView>)>,
    pods: Vec<(IpAddr, Arc<PodView>)>,
    changed: bool,
}

/// What endpoint derivation needs to know about one namespace.
struct NamespaceCtx<'a> {
    namespace: Option<&'a Namespace>,
    pods: &'a BTreeMap<&'a str, &'a Pod>,
    options: &'a IndexOptions,
}

impl NamespaceCtx<'_> {
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
            };
        };
        let meshed = meta::meshed(
            pod,
            self.namespace,
            &self.options.trust_domain,
            self.options.meshed_rule,
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
            pod: Some(pod_meta(pod)),
            identity: meshed.as_ref().map(|m| m.identity.clone()),
            inbound_proxy_port: meshed.map(|m| m.inbound_proxy_port),
            opaque,
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
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(meta::LABEL_ZONE))
        .cloned()
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
        meta: pod_meta(pod),
        ip,
        zone: pod_zone(pod),
        meshed: meta::meshed(
            pod,
            ctx.namespace,
            &ctx.options.trust_domain,
            ctx.options.meshed_rule,
        ),
        opaque: meta::pod_opaque_ports(pod, ctx.namespace),
        port_names: container_port_names(pod),
    })
}

/// The view of one Service: its cluster IPs and, per TCP port, its ready endpoints, from its
/// EndpointSlices or (when allowed and it has none) from the pods its selector picks. Sets
/// equal to the previous view's keep their `Arc`.
fn service_view(
    ctx: &NamespaceCtx<'_>,
    service: &Service,
    slices: &[&EndpointSlice],
    prev: Option<&ServiceView>,
) -> ServiceView {
    let key = ObjectKey::new(
        service.metadata.namespace.clone().unwrap_or_default(),
        service.metadata.name.clone().unwrap_or_default(),
    );
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
        let set = if !slices.is_empty() || !ctx.options.endpoints_from_pods {
            endpoints_from_slices(ctx, sp, slices, service_opaque)
        } else {
            endpoints_from_pods(ctx, service, sp, service_opaque)
        };
        let set = match prev.and_then(|p| p.ports.get(&port)) {
            Some(old) if **old == set => old.clone(),
            _ => Arc::new(set),
        };
        ports.insert(port, set);
    }
    ServiceView {
        key,
        cluster_ips,
        ports,
    }
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
        for ep in &slice.endpoints {
            // An unset condition means unknown, which consumers are told to treat as ready.
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let pod_name = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref());
            let pod = pod_name.and_then(|name| ctx.pods.get(name).copied());
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
                set.entry(addr)
                    .or_insert_with(|| ctx.endpoint(addr, pod, ep.zone.clone(), service_opaque));
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
    service_port: &ServicePort,
    service_opaque: bool,
) -> EndpointSet {
    let spec = service.spec.as_ref();
    let Some(selector) = spec.and_then(|s| s.selector.as_ref()) else {
        return EndpointSet::new();
    };
    let publish_not_ready = spec
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut set = EndpointSet::new();
    for pod in ctx.pods.values() {
        if !meta::selector_matches(selector, pod.metadata.labels.as_ref()) {
            continue;
        }
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
