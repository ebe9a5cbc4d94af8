//! What the mesh reads from objects' metadata: whether a pod is meshed and who it is, which
//! ports are opaque, which workload owns a pod, whether it is ready. All pure, so the rules
//! are tested here once and every backend gets the same answers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::pod::{Pod, StringMap};

/// The name of the injected proxy container.
pub const PROXY_CONTAINER: &str = "mesh-proxy";
/// Pod annotation: the port of the pod's proxy inbound listener (and a sign it is meshed).
pub const ANNOTATION_INBOUND_PORT: &str = "mesh.dev/proxy-inbound-port";
/// Pod or namespace annotation asking for injection (`enabled` / `disabled`).
pub const ANNOTATION_INJECT: &str = "mesh.dev/inject";
/// Service, pod or namespace annotation: ports (numbers, ranges `a-b`, or names) whose traffic
/// is opaque.
pub const ANNOTATION_OPAQUE_PORTS: &str = "config.mesh.dev/opaque-ports";
/// The proxy's inbound port when the pod does not say otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;
/// Label on an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Well-known zone label (read from pods in the file backend, where there are no nodes).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Label the Deployment controller puts on its ReplicaSets' pods.
const LABEL_POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The ServiceAccount of a pod that names none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The SPIFFE ID of a ServiceAccount.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// A set of ports from an annotation such as `3306,5432,8000-8100,metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet {
    ranges: Vec<RangeInclusive<u16>>,
    names: Vec<String>,
}

impl PortSet {
    /// Parses the annotation leniently: a malformed item is skipped (annotations are user
    /// input and must never take discovery down); the skipped items are returned so the
    /// caller can log them.
    pub fn parse(value: &str) -> (PortSet, Vec<String>) {
        let mut set = PortSet::default();
        let mut bad = Vec::new();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parsed = match item.split_once('-') {
                Some((lo, hi)) => match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                    (Ok(lo), Ok(hi)) if lo >= 1 && lo <= hi => Some(lo..=hi),
                    _ => None,
                },
                None => match item.parse::<u16>() {
                    Ok(port) if port >= 1 => Some(port..=port),
                    Ok(_) => None,
                    Err(_) if is_port_name(item) => {
                        set.names.push(item.to_owned());
                        continue;
                    }
                    Err(_) => None,
                },
            };
            match parsed {
                Some(range) => set.ranges.push(range),
                None => bad.push(item.to_owned()),
            }
        }
        (set, bad)
    }

    /// Whether the port, by number or by name, is in the set.
    pub fn contains(&self, port: u16, name: Option<&str>) -> bool {
        self.ranges.iter().any(|r| r.contains(&port))
            || name.is_some_and(|n| !n.is_empty() && self.names.iter().any(|m| m == n))
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.names.is_empty()
    }
}

/// A Kubernetes port name: lowercase alphanumerics and dashes, with at least one letter.
fn is_port_name(s: &str) -> bool {
    s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
}

fn annotation<'a, M: StringMap>(annotations: Option<&'a M>, key: &str) -> Option<&'a str> {
    annotations.and_then(|a| a.value(key))
}

/// The opaque ports an object's annotations declare (empty without the annotation).
pub fn opaque_ports<M: StringMap>(annotations: Option<&M>) -> PortSet {
    match annotation(annotations, ANNOTATION_OPAQUE_PORTS) {
        Some(value) => {
            let (set, bad) = PortSet::parse(value);
            if !bad.is_empty() {
                tracing::debug!(
                    ?bad,
                    "ignoring malformed items of {ANNOTATION_OPAQUE_PORTS}"
                );
            }
            set
        }
        None => PortSet::default(),
    }
}

/// The opaque ports of a pod: its own annotation, or its namespace's when it has none
/// (the pod's annotation overrides, as with the injector's other config annotations).
pub fn pod_opaque_ports(pod: &Pod, namespace: Option<&Namespace>) -> PortSet {
    let own = Some(&pod.annotations);
    if annotation(own, ANNOTATION_OPAQUE_PORTS).is_some() {
        opaque_ports(own)
    } else {
        opaque_ports(namespace.and_then(|ns| ns.metadata.annotations.as_ref()))
    }
}

/// How discovery decides that a pod runs a mesh proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshedRule {
    /// Only pods that already carry the proxy (container or inbound-port annotation): the
    /// API server shows pods after the webhook injected them.
    ProxyPresent,
    /// Also pods (or namespaces) annotated `mesh.dev/inject: enabled`: the file backend reads
    /// the YAML the local runner injects at start, so the proxy is not in the files.
    InjectAnnotation,
}

/// A meshed pod's identity and where its proxy listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshedPod {
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; `None` when its proxy runs without identity
    /// (peers then send it plaintext, which it alone accepts).
    pub identity: Option<Arc<str>>,
    /// The proxy's inbound port on the pod IP.
    pub inbound_proxy_port: u16,
}

/// Whether the pod is meshed, and if so its identity and inbound port. Its proxy has an
/// identity when the mesh has one (`identity_enabled`: the controller runs a CA) unless its
/// container is configured without one (`MESH_PROXY_*` settings but no `MESH_PROXY_IDENTITY`).
pub fn meshed(
    pod: &Pod,
    namespace: Option<&Namespace>,
    trust_domain: &str,
    rule: MeshedRule,
    identity_enabled: bool,
) -> Option<MeshedPod> {
    let annotations = Some(&pod.annotations);
    let port_annotation = annotation(annotations, ANNOTATION_INBOUND_PORT);
    let proxy_container = pod.spec.as_ref().and_then(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == PROXY_CONTAINER)
    });
    let has_proxy_container = proxy_container.is_some();
    let injected = rule == MeshedRule::InjectAnnotation && {
        match annotation(annotations, ANNOTATION_INJECT) {
            Some(value) => value == "enabled",
            None => {
                annotation(
                    namespace.and_then(|ns| ns.metadata.annotations.as_ref()),
                    ANNOTATION_INJECT,
                ) == Some("enabled")
            }
        }
    };
    if !(has_proxy_container || port_annotation.is_some() || injected) {
        return None;
    }
    let inbound_proxy_port = port_annotation
        .and_then(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_INBOUND_PORT);
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    let proxy_without_identity = proxy_container.is_some_and(|container| {
        let env = container.env.iter().flatten();
        let configured = env.clone().any(|var| var.name.starts_with("MESH_PROXY_"));
        configured && !env.clone().any(|var| var.name == "MESH_PROXY_IDENTITY")
    });
    Some(MeshedPod {
        identity: (identity_enabled && !proxy_without_identity)
            .then(|| spiffe_id(trust_domain, namespace, service_account).into()),
        inbound_proxy_port,
    })
}

/// Whether an EndpointSlice endpoint is ready: an unset condition means unknown, which
/// consumers are told to treat as ready.
pub fn endpoint_ready(endpoint: &k8s_openapi::api::discovery::v1::Endpoint) -> bool {
    endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false)
}

/// The name of the pod behind an EndpointSlice endpoint, when it names one.
pub fn endpoint_pod(endpoint: &k8s_openapi::api::discovery::v1::Endpoint) -> Option<&str> {
    endpoint
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| r.name.as_deref())
}

/// The pod's ServiceAccount name (`default` when unset).
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
}

/// The workload that owns a pod, as (kind, name) with the kind in lowercase: a ReplicaSet
/// made by a Deployment is reported as the Deployment (its name minus the template hash), so
/// metrics stay stable across rollouts. A pod with no owner is its own workload.
pub fn workload(pod: &Pod) -> (String, String) {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
    else {
        return ("pod".to_owned(), pod_name);
    };
    let kind = owner.kind.to_ascii_lowercase();
    if kind == "replicaset" {
        let hash = pod.labels.get(LABEL_POD_TEMPLATE_HASH);
        if let Some(deployment) = deployment_of_replicaset(&owner.name, hash) {
            return ("deployment".to_owned(), deployment.to_owned());
        }
    }
    (kind, owner.name.clone())
}

/// The Deployment a ReplicaSet name belongs to: the name minus `-<hash>`, where the hash is
/// the pod's `pod-template-hash` label or, without one, a suffix of the alphabet Kubernetes
/// uses for those hashes (files written by hand often leave the label out).
fn deployment_of_replicaset<'a>(
    replicaset: &'a str,
    template_hash: Option<&str>,
) -> Option<&'a str> {
    const HASH_ALPHABET: &str = "bcdfghjklmnpqrstvwxz2456789";
    let (prefix, suffix) = replicaset.rsplit_once('-')?;
    if prefix.is_empty() {
        return None;
    }
    let is_hash = match template_hash {
        Some(hash) => suffix == hash,
        None => {
            (1..=10).contains(&suffix.len()) && suffix.chars().all(|c| HASH_ALPHABET.contains(c))
        }
    };
    is_hash.then_some(prefix)
}

/// The pod's IP, when it has one it can be reached on: not finished, not being deleted.
pub fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// Whether every application container of the pod (all but the proxy, which runs as a classic
/// sidecar) has terminated and will not be restarted: with `restartPolicy: Never` whatever its
/// exit code, with `OnFailure` only when it succeeded, with `Always` never. A pod whose statuses
/// do not list all its application containers has not finished.
pub fn app_finished(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let restart = spec.restart_policy.as_deref().unwrap_or("Always");
    if restart == "Always" {
        return false;
    }
    let statuses = pod
        .status
        .as_ref()
        .and_then(|status| status.container_statuses.as_deref())
        .unwrap_or_default();
    let apps: Vec<&str> = spec
        .containers
        .iter()
        .map(|container| container.name.as_str())
        .filter(|name| *name != PROXY_CONTAINER)
        .collect();
    !apps.is_empty()
        && apps.iter().all(|app| {
            let terminated = statuses
                .iter()
                .find(|status| status.name == *app)
                .and_then(|status| status.state.as_ref())
                .and_then(|state| state.terminated.as_ref());
            match terminated {
                Some(terminated) => restart == "Never" || terminated.exit_code == 0,
                None => false,
            }
        })
}

/// Whether the pod is ready: a pod counts as ready unless its Ready condition says otherwise
/// (files describing pods by hand rarely write conditions).
pub fn pod_is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref());
    !conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status != "True")
}

/// Whether the pod shares its node's network (its IP is not its own).
pub fn pod_uses_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// Whether every label of the selector is on the object. An empty selector selects nothing,
/// as for Services (a Service without a selector has its endpoints managed by hand).
pub fn selector_matches<M: StringMap>(
    selector: &BTreeMap<String, String>,
    labels: Option<&M>,
) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.value(k)) == Some(v.as_str()))
}

/// The pod port a Service port forwards to: `targetPort` as a number, as the name of one of
/// the pod's TCP container ports, or the service port itself when unset.
pub fn target_port(service_port: &ServicePort, pod: &Pod) -> Option<u16> {
    match &service_port.target_port {
        None => u16::try_from(service_port.port).ok(),
        Some(IntOrString::Int(port)) => u16::try_from(*port).ok().filter(|p| *p != 0),
        Some(IntOrString::String(name)) => {
            // A numeric string is what some hand-written YAML has; Kubernetes would reject
            // it, but reading it as the number is the only sensible meaning.
            if let Ok(port) = name.parse::<u16>() {
                return Some(port).filter(|p| *p != 0);
            }
            let spec = pod.spec.as_ref()?;
            spec.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                })
                .and_then(|p| u16::try_from(p.container_port).ok())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        let mut doc = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"}});
        merge(&mut doc, value);
        serde_json::from_value(doc).expect("test pod fits the schema")
    }

    fn namespace(annotations: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "annotations": annotations}}))
        .expect("test namespace fits the schema")
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    #[test]
    fn port_sets_parse_numbers_ranges_and_names_and_skip_garbage() {
        type Probe = (u16, Option<&'static str>, bool);
        let cases: [(&str, &[Probe], &[&str]); 5] = [
            ("3306", &[(3306, None, true), (3307, None, false)], &[]),
            (
                "3306, 8000-8002,metrics",
                &[
                    (8001, None, true),
                    (8003, None, false),
                    (9, Some("metrics"), true),
                ],
                &[],
            ),
            ("", &[(1, None, false)], &[]),
            (
                "0,x y,9-3,70000,-5",
                &[(9, None, false)],
                &["0", "x y", "9-3", "70000", "-5"],
            ),
            ("25,", &[(25, None, true), (26, Some(""), false)], &[]),
        ];
        for (text, probes, want_bad) in cases {
            let (set, bad) = PortSet::parse(text);
            assert_eq!(bad, want_bad, "{text:?}");
            for (port, name, want) in probes {
                assert_eq!(
                    set.contains(*port, *name),
                    *want,
                    "{text:?} contains {port} {name:?}"
                );
            }
        }
    }

    #[test]
    fn meshed_pods_are_recognised_with_identity_and_inbound_port() {
        let td = "cluster.local";
        let id = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        let cases = [
            (
                "plain pod",
                pod(json!({})),
                None,
                MeshedRule::InjectAnnotation,
                None,
            ),
            (
                "proxy container, default sa",
                pod(json!({"spec": {"containers": [{"name": "app"}, {"name": "mesh-proxy"}]}})),
                None,
                MeshedRule::ProxyPresent,
                Some((id("default"), 4143)),
            ),
            (
                "native sidecar",
                pod(
                    json!({"spec": {"serviceAccountName": "web", "containers": [{"name": "app"}],
                    "initContainers": [{"name": "mesh-proxy"}]}}),
                ),
                None,
                MeshedRule::ProxyPresent,
                Some((id("web"), 4143)),
            ),
            (
                "inbound port annotation",
                pod(
                    json!({"metadata": {"annotations": {"mesh.dev/proxy-inbound-port": "5143"}},
                    "spec": {"serviceAccountName": "api", "containers": [{"name": "app"}]}}),
                ),
                None,
                MeshedRule::ProxyPresent,
                Some((id("api"), 5143)),
            ),
            (
                "malformed inbound port falls back to the default",
                pod(json!({"metadata": {"annotations": {"mesh.dev/proxy-inbound-port": "x"}}})),
                None,
                MeshedRule::ProxyPresent,
                Some((id("default"), 4143)),
            ),
            (
                "inject annotation ignored for the API server",
                pod(json!({"metadata": {"annotations": {"mesh.dev/inject": "enabled"}}})),
                None,
                MeshedRule::ProxyPresent,
                None,
            ),
            (
                "inject annotation counts for files",
                pod(json!({"metadata": {"annotations": {"mesh.dev/inject": "enabled"}}})),
                None,
                MeshedRule::InjectAnnotation,
                Some((id("default"), 4143)),
            ),
            (
                "namespace injection",
                pod(json!({})),
                Some(namespace(json!({"mesh.dev/inject": "enabled"}))),
                MeshedRule::InjectAnnotation,
                Some((id("default"), 4143)),
            ),
            (
                "pod opts out of namespace injection",
                pod(json!({"metadata": {"annotations": {"mesh.dev/inject": "disabled"}}})),
                Some(namespace(json!({"mesh.dev/inject": "enabled"}))),
                MeshedRule::InjectAnnotation,
                None,
            ),
        ];
        for (name, pod, ns, rule, want) in cases {
            let got = meshed(&pod, ns.as_ref(), td, rule, true).map(|m| {
                (
                    m.identity.as_deref().unwrap_or_default().to_owned(),
                    m.inbound_proxy_port,
                )
            });
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_proxy_has_an_identity_when_the_mesh_has_one_and_its_container_says_nothing_else() {
        let td = "cluster.local";
        let rule = MeshedRule::ProxyPresent;
        let with_env = |env: serde_json::Value| {
            pod(json!({"spec": {"containers": [{"name": "mesh-proxy", "env": env}]}}))
        };
        let cases = [
            (
                "bare container, identity on",
                pod(json!({"spec": {"containers": [{"name": "mesh-proxy"}]}})),
                true,
                true,
            ),
            (
                "bare container, no CA",
                pod(json!({"spec": {"containers": [{"name": "mesh-proxy"}]}})),
                false,
                false,
            ),
            (
                "injected with identity",
                with_env(json!([{"name": "MESH_PROXY_LOG_LEVEL", "value": "info"},
                                {"name": "MESH_PROXY_IDENTITY", "value": "spiffe://cluster.local/ns/shop/sa/default"}])),
                true,
                true,
            ),
            (
                "injected without identity",
                with_env(json!([{"name": "MESH_PROXY_LOG_LEVEL", "value": "info"}])),
                true,
                false,
            ),
        ];
        for (name, pod, enabled, want) in cases {
            let meshed = meshed(&pod, None, td, rule, enabled).expect("meshed");
            assert_eq!(meshed.identity.is_some(), want, "{name}");
        }
    }

    #[test]
    fn a_pod_has_finished_when_its_app_containers_terminated_for_good() {
        let job = |restart: &str, statuses: serde_json::Value| {
            pod(json!({
                "spec": {"restartPolicy": restart, "containers": [
                    {"name": "mesh-proxy"}, {"name": "work"}, {"name": "report"}]},
                "status": {"containerStatuses": statuses}
            }))
        };
        let running = json!({"running": {}});
        let done = |code: i32| json!({"terminated": {"exitCode": code}});
        let statuses = |work: serde_json::Value, report: serde_json::Value| {
            json!([
                {"name": "mesh-proxy", "state": {"running": {}}, "ready": true, "restartCount": 0, "image": "p", "imageID": ""},
                {"name": "work", "state": work, "ready": false, "restartCount": 0, "image": "w", "imageID": ""},
                {"name": "report", "state": report, "ready": false, "restartCount": 0, "image": "r", "imageID": ""},
            ])
        };
        let cases = [
            ("both done", job("Never", statuses(done(0), done(0))), true),
            (
                "one still running",
                job("Never", statuses(done(0), running.clone())),
                false,
            ),
            (
                "failed, never restarted",
                job("Never", statuses(done(1), done(0))),
                true,
            ),
            (
                "failed, to be restarted",
                job("OnFailure", statuses(done(1), done(0))),
                false,
            ),
            (
                "succeeded under OnFailure",
                job("OnFailure", statuses(done(0), done(0))),
                true,
            ),
            (
                "a Deployment's pod restarts",
                job("Always", statuses(done(0), done(0))),
                false,
            ),
            ("no statuses yet", job("Never", json!([])), false),
        ];
        for (name, pod, want) in cases {
            assert_eq!(app_finished(&pod), want, "{name}");
        }
    }

    #[test]
    fn workloads_come_from_owner_references() {
        let owned = |kind: &str, name: &str, labels: serde_json::Value| {
            pod(
                json!({"metadata": {"name": "p-1", "labels": labels, "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}]}}),
            )
        };
        let cases = [
            (pod(json!({"metadata": {"name": "solo"}})), ("pod", "solo")),
            (
                owned("ReplicaSet", "web-7d9f8", json!({})),
                ("deployment", "web"),
            ),
            (
                owned(
                    "ReplicaSet",
                    "web-api-5c6b7f9d48",
                    json!({"pod-template-hash": "5c6b7f9d48"}),
                ),
                ("deployment", "web-api"),
            ),
            (
                owned("ReplicaSet", "web-api", json!({"pod-template-hash": "abc"})),
                ("replicaset", "web-api"),
            ),
            (
                owned("ReplicaSet", "frontend", json!({})),
                ("replicaset", "frontend"),
            ),
            (
                owned("ReplicaSet", "my-app", json!({})),
                ("replicaset", "my-app"),
            ),
            (owned("StatefulSet", "db", json!({})), ("statefulset", "db")),
            (
                owned("DaemonSet", "agent", json!({})),
                ("daemonset", "agent"),
            ),
            (
                owned("Job", "migrate-28374920", json!({})),
                ("job", "migrate-28374920"),
            ),
        ];
        for (pod, (kind, name)) in cases {
            assert_eq!(
                workload(&pod),
                (kind.to_owned(), name.to_owned()),
                "{pod:?}"
            );
        }
    }

    #[test]
    fn pod_readiness_and_addresses() {
        let cases = [
            ("no status", json!({}), None, true),
            (
                "ip, no conditions",
                json!({"status": {"podIP": "10.0.0.1"}}),
                Some("10.0.0.1"),
                true,
            ),
            (
                "ready true",
                json!({"status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}),
                Some("10.0.0.1"),
                true,
            ),
            (
                "ready false",
                json!({"status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "False"}]}}),
                Some("10.0.0.1"),
                false,
            ),
            (
                "other condition false",
                json!({"status": {"podIP": "fd00::1", "conditions": [{"type": "PodScheduled", "status": "False"}]}}),
                Some("fd00::1"),
                true,
            ),
            (
                "finished",
                json!({"status": {"podIP": "10.0.0.1", "phase": "Succeeded"}}),
                None,
                true,
            ),
            (
                "being deleted",
                json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}, "status": {"podIP": "10.0.0.1"}}),
                None,
                true,
            ),
            (
                "garbage ip",
                json!({"status": {"podIP": "ten"}}),
                None,
                true,
            ),
        ];
        for (name, value, ip, ready) in cases {
            let pod = pod(value);
            assert_eq!(
                pod_ip(&pod),
                ip.map(|s| s.parse().expect("test ip")),
                "{name}"
            );
            assert_eq!(pod_is_ready(&pod), ready, "{name}");
        }
    }

    #[test]
    fn target_ports_resolve_by_number_name_or_default() {
        let pod = pod(json!({"spec": {"containers": [
            {"name": "app", "ports": [{"name": "http", "containerPort": 8080},
                                      {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]}}));
        let port = |value: serde_json::Value| -> ServicePort {
            serde_json::from_value(value).expect("test port fits the schema")
        };
        let cases = [
            (json!({"port": 80}), Some(80)),
            (json!({"port": 80, "targetPort": 9090}), Some(9090)),
            (json!({"port": 80, "targetPort": "http"}), Some(8080)),
            (json!({"port": 80, "targetPort": "grpc"}), None),
            (json!({"port": 53, "targetPort": "dns"}), None),
            (json!({"port": 80, "targetPort": "8081"}), Some(8081)),
            (json!({"port": 80, "targetPort": 0}), None),
        ];
        for (sp, want) in cases {
            assert_eq!(target_port(&port(sp.clone()), &pod), want, "{sp}");
        }
    }

    #[test]
    fn selectors_need_every_label_and_select_nothing_when_empty() {
        let labels: BTreeMap<String, String> = [
            ("app".to_owned(), "web".to_owned()),
            ("tier".to_owned(), "fe".to_owned()),
        ]
        .into();
        let sel = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(selector_matches(&sel(&[("app", "web")]), Some(&labels)));
        assert!(selector_matches(
            &sel(&[("app", "web"), ("tier", "fe")]),
            Some(&labels)
        ));
        assert!(!selector_matches(&sel(&[("app", "api")]), Some(&labels)));
        assert!(!selector_matches(
            &sel(&[("app", "web"), ("x", "y")]),
            Some(&labels)
        ));
        assert!(!selector_matches(&sel(&[]), Some(&labels)));
        assert!(!selector_matches::<BTreeMap<String, String>>(
            &sel(&[("app", "web")]),
            None
        ));
    }
}
