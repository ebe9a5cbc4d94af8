//! From per-pod windows to the Stats API's rows: pure functions, tested table-driven in
//! `tests.rs`.
//!
//! - Workload, pod and namespace rows report the traffic their pods *receive* (inbound), as
//!   `linkerd viz stat` does; `authority` and `route` rows report what pods *send*.
//! - Rates are each pod's delta over its own span, summed; percentiles come from the merged
//!   histogram deltas; the mTLS share is the share of responses on mutually authenticated
//!   hops.
//! - Edges come from the clients' outbound series: the endpoint dialed (`target_addr`) is a
//!   pod IP the index knows, so both ends have a workload, and the `client_id`/`server_id`
//!   labels are the identities both proxies proved.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use mesh_proto::stats::{Denial, Edge, EgressEdge, RequestStats, ResourceRef, StatsRow, TcpStats};

use super::sample::{Direction, Histogram, TrafficCounters, TrafficKey};
use super::store::{PodInfo, PodWindow};

/// What rows are about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Namespaces.
    Namespace,
    /// Workloads of one kind (`deployment`, `statefulset`, ...), or of any kind (`None`).
    Workload(Option<String>),
    /// Pods.
    Pod,
    /// The authorities pods call.
    Authority,
    /// The routes pods call.
    Route,
}

impl Kind {
    /// Reads a kind as people type it: singular, plural or short (`deploy`, `po`, `ns`).
    pub fn parse(text: &str) -> Result<Kind, String> {
        let kind = match text.trim().to_ascii_lowercase().as_str() {
            "ns" | "namespace" | "namespaces" => Kind::Namespace,
            "workload" | "workloads" | "wl" => Kind::Workload(None),
            "deploy" | "deployment" | "deployments" => Kind::Workload(Some("deployment".into())),
            "sts" | "statefulset" | "statefulsets" => Kind::Workload(Some("statefulset".into())),
            "ds" | "daemonset" | "daemonsets" => Kind::Workload(Some("daemonset".into())),
            "job" | "jobs" => Kind::Workload(Some("job".into())),
            "po" | "pod" | "pods" => Kind::Pod,
            "au" | "authority" | "authorities" => Kind::Authority,
            "rt" | "route" | "routes" => Kind::Route,
            other => {
                return Err(format!(
                    "unknown resource kind {other:?}: use namespace, workload, deployment, \
                     statefulset, daemonset, pod, authority or route"
                ));
            }
        };
        Ok(kind)
    }
}

/// Which rows: a kind, optionally one namespace and one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// The kind of rows.
    pub kind: Kind,
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this resource.
    pub name: Option<String>,
}

/// Whose traffic: pods of one workload, one pod, or one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromFilter {
    /// `namespace`, `pod`, or a workload kind (`workload` for any).
    pub kind: String,
    /// The namespace (for a namespace: its name may stand here or in `name`).
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl FromFilter {
    /// Whether `pod` is one of the filter's pods.
    pub fn matches(&self, pod: &PodInfo) -> bool {
        let kind = self.kind.to_ascii_lowercase();
        match Kind::parse(&kind) {
            Ok(Kind::Namespace) => {
                let namespace = if self.name.is_empty() {
                    &self.namespace
                } else {
                    &self.name
                };
                pod.namespace() == *namespace
            }
            Ok(Kind::Pod) => pod.namespace() == self.namespace && pod.name() == self.name,
            Ok(Kind::Workload(kind)) => {
                pod.namespace() == self.namespace
                    && pod.workload_name() == self.name
                    && kind.is_none_or(|k| k == pod.workload_kind())
            }
            _ => false,
        }
    }
}

/// Sums of one row's traffic.
#[derive(Debug, Default)]
struct Totals {
    successes: f64,
    failures: f64,
    /// Responses per second.
    rate: f64,
    /// Responses on mutually authenticated hops.
    tls_responses: f64,
    latency: Histogram,
    open_connections: f64,
    read_rate: f64,
    write_rate: f64,
    running_pods: u32,
    meshed_pods: u32,
    /// Retries sent (route rows).
    retries: f64,
    retry_rate: f64,
}

impl Totals {
    fn add(&mut self, key: &TrafficKey, counters: &TrafficCounters, seconds: f64) {
        if seconds <= 0.0 {
            return;
        }
        self.successes += counters.successes;
        self.failures += counters.failures;
        self.rate += counters.responses() / seconds;
        if key.tls {
            self.tls_responses += counters.responses();
        }
        self.latency.merge(&counters.latency);
        self.open_connections += counters.tcp_open_connections;
        self.read_rate += counters.tcp_read_bytes / seconds;
        self.write_rate += counters.tcp_write_bytes / seconds;
    }

    fn add_pod(&mut self, pod: &PodInfo) {
        self.running_pods += 1;
        if pod.meshed() {
            self.meshed_pods += 1;
        }
    }

    fn into_row(self, resource: ResourceRef) -> StatsRow {
        let responses = self.successes + self.failures;
        let share = |part: f64| {
            if responses > 0.0 {
                part / responses
            } else {
                0.0
            }
        };
        let quantile = |q: f64| self.latency.quantile(q).unwrap_or(0.0);
        StatsRow {
            resource: Some(resource),
            meshed_pods: self.meshed_pods,
            running_pods: self.running_pods,
            requests: Some(RequestStats {
                success_count: self.successes.round() as u64,
                failure_count: self.failures.round() as u64,
                request_rate: self.rate,
                success_rate: share(self.successes),
                latency_ms_p50: quantile(0.5),
                latency_ms_p95: quantile(0.95),
                latency_ms_p99: quantile(0.99),
                mtls_share: share(self.tls_responses),
                retry_rate: self.retry_rate,
                retry_count: self.retries.round() as u64,
            }),
            tcp: Some(TcpStats {
                open_connections: self.open_connections.round() as u64,
                read_bytes_rate: self.read_rate,
                write_bytes_rate: self.write_rate,
            }),
        }
    }
}

fn resource(kind: &str, namespace: &str, name: &str) -> ResourceRef {
    ResourceRef {
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

/// A resource as a map key, ordered by namespace, name, then kind (generated messages are
/// not `Ord`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RefKey {
    namespace: String,
    name: String,
    kind: String,
}

impl RefKey {
    fn new(kind: &str, namespace: &str, name: &str) -> Self {
        RefKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            kind: kind.to_owned(),
        }
    }

    fn to_resource(&self) -> ResourceRef {
        resource(&self.kind, &self.namespace, &self.name)
    }
}

fn workload_of(pod: &PodInfo) -> RefKey {
    RefKey::new(pod.workload_kind(), pod.namespace(), pod.workload_name())
}

/// The Summary rows for `selector`, from the pods' windows; `from` limits `authority` and
/// `route` rows to what those pods send. Sorted by namespace, then name, then kind.
pub fn summary(
    pods: &[PodWindow],
    selector: &Selector,
    from: Option<&FromFilter>,
) -> Vec<StatsRow> {
    let mut rows: BTreeMap<(String, String, String), Totals> = BTreeMap::new();
    let namespace_ok = |ns: &str| selector.namespace.as_deref().is_none_or(|want| want == ns);
    let name_ok = |name: &str| selector.name.as_deref().is_none_or(|want| want == name);
    for window in pods {
        let pod = &window.pod;
        let inbound = || {
            window
                .delta
                .traffic
                .iter()
                .filter(|(key, _)| key.direction == Direction::Inbound)
        };
        let outbound = || {
            window
                .delta
                .traffic
                .iter()
                .filter(|(key, _)| key.direction == Direction::Outbound)
        };
        match &selector.kind {
            Kind::Namespace | Kind::Workload(_) | Kind::Pod => {
                let (kind, namespace, name) = match &selector.kind {
                    Kind::Namespace => ("namespace".to_owned(), String::new(), pod.namespace()),
                    Kind::Pod => ("pod".to_owned(), pod.namespace().to_owned(), pod.name()),
                    Kind::Workload(want) => {
                        if want.as_ref().is_some_and(|k| *k != pod.workload_kind()) {
                            continue;
                        }
                        (
                            pod.workload_kind().to_owned(),
                            pod.namespace().to_owned(),
                            pod.workload_name(),
                        )
                    }
                    Kind::Authority | Kind::Route => continue,
                };
                if !namespace_ok(pod.namespace()) || !name_ok(name) {
                    continue;
                }
                let totals = rows.entry((namespace, name.to_owned(), kind)).or_default();
                totals.add_pod(pod);
                for (key, counters) in inbound() {
                    totals.add(key, counters, window.seconds);
                }
            }
            Kind::Authority => {
                if !namespace_ok(pod.namespace()) || from.is_some_and(|f| !f.matches(pod)) {
                    continue;
                }
                for (key, counters) in outbound() {
                    if !name_ok(&key.authority) {
                        continue;
                    }
                    rows.entry((
                        pod.namespace().to_owned(),
                        key.authority.to_string(),
                        "authority".to_owned(),
                    ))
                    .or_default()
                    .add(key, counters, window.seconds);
                }
            }
            Kind::Route => {
                if !namespace_ok(pod.namespace())
                    || from.is_some_and(|f| !f.matches(pod))
                    || window.seconds <= 0.0
                {
                    continue;
                }
                for (key, counters) in &window.delta.routes {
                    let name = format!("{}/{}", key.authority, key.route);
                    if !name_ok(&name) {
                        continue;
                    }
                    let totals = rows
                        .entry((pod.namespace().to_owned(), name, "route".to_owned()))
                        .or_default();
                    totals.successes += counters.successes;
                    totals.failures += counters.failures;
                    totals.rate += counters.requests / window.seconds;
                    totals.retries += counters.retries;
                    totals.retry_rate += counters.retries / window.seconds;
                    totals.latency.merge(&counters.latency);
                }
            }
        }
    }
    rows.into_iter()
        .map(|((namespace, name, kind), totals)| {
            totals.into_row(resource(&kind, &namespace, &name))
        })
        .collect()
}

/// The IP of a `target_addr` label (`10.77.0.3:4143`, or a bare IP).
fn target_ip(target_addr: &str) -> Option<IpAddr> {
    target_addr
        .parse::<SocketAddr>()
        .map(|addr| addr.ip())
        .or_else(|_| target_addr.parse::<IpAddr>())
        .ok()
}

/// Whether an edge or denial touches what `selector` names (its namespace and name, at
/// either end).
fn touches(selector: &Selector, ends: &[&RefKey]) -> bool {
    ends.iter().any(|end| {
        selector
            .namespace
            .as_deref()
            .is_none_or(|ns| ns == end.namespace)
            && selector.name.as_deref().is_none_or(|name| name == end.name)
    })
}

#[derive(Debug, Default)]
struct EdgeTotals {
    successes: f64,
    responses: f64,
    rate: f64,
}

/// The edges between workloads, from the clients' outbound traffic, sorted by source then
/// destination. A destination that is no pod the index knows is named by its authority.
pub fn edges(pods: &[PodWindow], selector: &Selector) -> Vec<Edge> {
    let by_ip: BTreeMap<IpAddr, &PodInfo> = pods.iter().map(|w| (w.pod.ip(), &w.pod)).collect();
    type EdgeKey = (RefKey, RefKey, String, String, String);
    let mut edges: BTreeMap<EdgeKey, EdgeTotals> = BTreeMap::new();
    for window in pods.iter().filter(|w| w.seconds > 0.0) {
        let source = workload_of(&window.pod);
        for (key, counters) in &window.delta.traffic {
            if key.direction != Direction::Outbound || counters.responses() <= 0.0 {
                continue;
            }
            let server = target_ip(&key.target_addr).and_then(|ip| by_ip.get(&ip).copied());
            let destination = match server {
                Some(pod) => workload_of(pod),
                None => RefKey::new("authority", "", &key.authority),
            };
            let no_identity_reason = if !key.server_id.is_empty() {
                String::new()
            } else {
                match server {
                    None => "destination is not a pod of the mesh".to_owned(),
                    Some(pod) if !pod.meshed() => "destination not meshed".to_owned(),
                    Some(_) => {
                        "no mutual TLS between the proxies (does each have an identity?)".to_owned()
                    }
                }
            };
            let totals = edges
                .entry((
                    source.clone(),
                    destination,
                    key.client_id.to_string(),
                    key.server_id.to_string(),
                    no_identity_reason,
                ))
                .or_default();
            totals.successes += counters.successes;
            totals.responses += counters.responses();
            totals.rate += counters.responses() / window.seconds;
        }
    }
    edges
        .into_iter()
        .filter(|((source, destination, ..), _)| touches(selector, &[source, destination]))
        .map(
            |((source, destination, client_identity, server_identity, reason), totals)| Edge {
                source: Some(source.to_resource()),
                destination: Some(destination.to_resource()),
                client_identity,
                server_identity,
                no_identity_reason: reason,
                request_rate: totals.rate,
                success_rate: if totals.responses > 0.0 {
                    totals.successes / totals.responses
                } else {
                    0.0
                },
            },
        )
        .collect()
}

/// The requests and connections inbound policies refused, by server workload, policy and
/// client identity; sorted by destination, then policy.
pub fn denials(pods: &[PodWindow], selector: &Selector) -> Vec<Denial> {
    type DenialKey = (RefKey, String, String, &'static str);
    let mut denials: BTreeMap<DenialKey, (f64, f64)> = BTreeMap::new();
    for window in pods.iter().filter(|w| w.seconds > 0.0) {
        let destination = workload_of(&window.pod);
        for (key, count) in &window.delta.denials {
            if *count <= 0.0 {
                continue;
            }
            let totals = denials
                .entry((
                    destination.clone(),
                    key.policy.to_string(),
                    key.client_id.to_string(),
                    key.protocol,
                ))
                .or_default();
            totals.0 += count;
            totals.1 += count / window.seconds;
        }
    }
    denials
        .into_iter()
        .filter(|((destination, ..), _)| touches(selector, &[destination]))
        .map(
            |((destination, policy, client_identity, protocol), (count, rate))| Denial {
                destination: Some(destination.to_resource()),
                policy,
                client_identity,
                count: count.round() as u64,
                rate,
                protocol: protocol.to_owned(),
            },
        )
        .collect()
}

/// The traffic each workload sent out of the mesh under an egress policy, by network, host and
/// protocol, allowed and denied; sorted by source, network, authority, protocol.
pub fn egress(pods: &[PodWindow], selector: &Selector) -> Vec<EgressEdge> {
    type EgressKey = (RefKey, String, String, String);
    #[derive(Default)]
    struct Totals {
        allowed: f64,
        denied: f64,
        rate: f64,
    }
    let mut egress: BTreeMap<EgressKey, Totals> = BTreeMap::new();
    for window in pods.iter().filter(|w| w.seconds > 0.0) {
        let source = workload_of(&window.pod);
        for (key, count) in &window.delta.egress {
            if *count <= 0.0 {
                continue;
            }
            let totals = egress
                .entry((
                    source.clone(),
                    key.network.to_string(),
                    key.authority.to_string(),
                    key.protocol.to_string(),
                ))
                .or_default();
            if key.allowed {
                totals.allowed += count;
            } else {
                totals.denied += count;
            }
            totals.rate += count / window.seconds;
        }
    }
    egress
        .into_iter()
        .filter(|((source, ..), _)| touches(selector, &[source]))
        .map(
            |((source, network, authority, protocol), totals)| EgressEdge {
                source: Some(source.to_resource()),
                network,
                authority,
                protocol,
                allowed: totals.allowed.round() as u64,
                denied: totals.denied.round() as u64,
                rate: totals.rate,
            },
        )
        .collect()
}
