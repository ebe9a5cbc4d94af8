//! The parts of a Pod the controller reads, and nothing else.
//!
//! Written by hand instead of using k8s-openapi's `Pod`: that type holds every field of the
//! API inline (2.1 KiB for the pod and 2.1 KiB more per container, most of them `None`), which
//! made a Pod cost the controller ~9 KiB; at 100,000 pods that was most of its memory. The
//! field names and shapes follow the API's (and k8s-openapi's), so code reads the same. Both
//! backends decode into these types: the file backend from YAML, the Kubernetes backend from
//! the API server's watch ([`WirePod`], whose `Resource` impl lets kube-rs watch it, becomes a
//! [`Pod`] as it arrives), so the full object is never held. Fields the API sends that are not
//! here are skipped.

use k8s_openapi::api::core::v1::ContainerPort;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde::Deserialize;

/// A Pod, as far as discovery and policy read it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "WirePod")]
pub struct Pod {
    /// Name, namespace, owners, deletion; its labels and annotations are the fields below.
    pub metadata: PodObjectMeta,
    /// Its labels, which selectors match.
    pub labels: Labels,
    /// Its annotations of the mesh's own (`*mesh.dev/...`); the others are dropped as read:
    /// in a cluster they are often most of a pod's metadata (tooling, checksums, monitoring).
    pub annotations: Labels,
    /// What the pod runs.
    pub spec: Option<PodSpec>,
    /// Where it runs and how it is doing.
    pub status: Option<PodStatus>,
}

/// The part of a pod's `ObjectMeta` discovery reads. `ObjectMeta` itself is 16 fields inline
/// (about 400 bytes, nearly all `None`), and a cluster has 100,000 pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodObjectMeta {
    /// The pod's name.
    pub name: Option<String>,
    /// Its namespace.
    pub namespace: Option<String>,
    /// Its owners: the controller among them names its workload.
    pub owner_references: Option<Vec<OwnerReference>>,
    /// Set once the pod is being deleted.
    pub deletion_timestamp: Option<Time>,
}

/// A Pod as the API server and the YAML files spell it: what the Kubernetes backend watches,
/// turned into a [`Pod`] as each one arrives.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePod {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Option<PodSpec>,
    status: Option<PodStatus>,
}

impl From<WirePod> for Pod {
    fn from(wire: WirePod) -> Self {
        let mut metadata = wire.metadata;
        let labels = Labels::from_iter(metadata.labels.take().into_iter().flatten());
        let annotations = Labels::from_iter(
            metadata
                .annotations
                .take()
                .into_iter()
                .flatten()
                .filter(|(key, _)| is_mesh_annotation(key)),
        );
        Self {
            metadata: PodObjectMeta {
                name: metadata.name,
                namespace: metadata.namespace,
                owner_references: metadata.owner_references,
                deletion_timestamp: metadata.deletion_timestamp,
            },
            labels,
            annotations,
            spec: wire.spec,
            status: wire.status,
        }
    }
}

/// A pod's labels or annotations: key-value pairs sorted by key, in one allocation.
///
/// Hand-written rather than a `BTreeMap` (what `ObjectMeta` holds): a `BTreeMap`'s first
/// node has room for eleven pairs, 640 bytes however few there are, twice per pod, and pods
/// are the objects a cluster has 100,000 of. Lookups are a binary search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_ref())
    }

    /// Every pair, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A label or annotation map, stored either way: a pod's [`Labels`], or the `BTreeMap` of
/// other objects' `ObjectMeta` (and of selectors), so the helpers that read them serve both.
pub trait StringMap {
    /// The value of `key`.
    fn value(&self, key: &str) -> Option<&str>;
}

impl StringMap for Labels {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl StringMap for std::collections::BTreeMap<String, String> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl FromIterator<(String, String)> for Labels {
    /// Pairs in any order; of two with the same key, the last is kept.
    fn from_iter<T: IntoIterator<Item = (String, String)>>(pairs: T) -> Self {
        let mut pairs: Vec<(Box<str>, Box<str>)> = pairs
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, earlier| later.0 == earlier.0);
        Self(pairs.into_boxed_slice())
    }
}

/// The pod's spec: its containers and identity.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// The application containers (and a classic sidecar proxy).
    #[serde(default)]
    pub containers: Vec<Container>,
    /// Init containers (and a native sidecar proxy).
    pub init_containers: Option<Vec<Container>>,
    /// The ServiceAccount, the pod's identity.
    pub service_account_name: Option<String>,
    /// Whether it shares its node's network.
    pub host_network: Option<bool>,
    /// `Always`, `OnFailure` or `Never`.
    pub restart_policy: Option<String>,
}

/// A container: its name, ports and the names of its environment variables.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Its name (`mesh-proxy` for the proxy).
    pub name: String,
    /// Named ports resolve Services' and Servers' named target ports.
    pub ports: Option<Vec<ContainerPort>>,
    /// The proxy's settings tell whether it runs with an identity.
    pub env: Option<Vec<EnvVar>>,
}

/// An environment variable, by name only: no setting's value is read (or kept).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct EnvVar {
    /// The variable's name.
    pub name: String,
}

/// The pod's status.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: Option<String>,
    /// Its IP.
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// Conditions, of which `Ready` is read.
    pub conditions: Option<Vec<PodCondition>>,
    /// How each application container is doing.
    pub container_statuses: Option<Vec<ContainerStatus>>,
}

/// One condition of the pod.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PodCondition {
    /// E.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
}

/// A container's status.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ContainerStatus {
    /// The container's name.
    pub name: String,
    /// Its current state.
    pub state: Option<ContainerState>,
}

/// A container's state, of which termination is read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ContainerState {
    /// Set once the container has terminated.
    pub terminated: Option<ContainerStateTerminated>,
}

/// A terminated container.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateTerminated {
    /// Its exit code.
    pub exit_code: i32,
}

/// Whether an annotation is one of the mesh's: its prefix is `mesh.dev` or a subdomain of it.
fn is_mesh_annotation(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(prefix, _)| prefix == "mesh.dev" || prefix.ends_with(".mesh.dev"))
}

impl k8s_openapi::Resource for WirePod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for WirePod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What the API server sends for a pod, trimmed to a few fields of each kind, reads into
    /// the fields kept; the rest is skipped.
    #[test]
    fn an_api_server_pod_reads_into_the_fields_kept() {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                         "managedFields": [{"manager": "kubelet"}]},
            "spec": {
                "serviceAccountName": "web", "restartPolicy": "Always", "hostNetwork": false,
                "nodeName": "node-1", "dnsPolicy": "ClusterFirst",
                "containers": [{"name": "app", "image": "nginx",
                                "ports": [{"name": "http", "containerPort": 8080}],
                                "resources": {"limits": {"cpu": "1"}},
                                "env": [{"name": "MODE", "value": "secret"}]}],
                "initContainers": [{"name": "mesh-proxy", "restartPolicy": "Always",
                                    "env": [{"name": "MESH_PROXY_IDENTITY",
                                             "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}],
                "conditions": [{"type": "Ready", "status": "True",
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                                       "image": "nginx", "imageID": "",
                                       "state": {"terminated": {"exitCode": 3}}}]
            }
        }))
        .expect("an API server pod reads");
        assert_eq!(pod.metadata.name.as_deref(), Some("web-1"));
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(spec.containers[0].name, "app");
        let port = &spec.containers[0].ports.as_ref().expect("ports")[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8080)
        );
        let env = spec.containers[0].env.as_ref().expect("env");
        assert_eq!(
            env,
            &[EnvVar {
                name: "MODE".into()
            }]
        );
        let proxy = &spec.init_containers.as_ref().expect("init containers")[0];
        assert_eq!(proxy.name, "mesh-proxy");
        let status = pod.status.as_ref().expect("status");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(
            status.conditions.as_ref().expect("conditions")[0].type_,
            "Ready"
        );
        let terminated = status.container_statuses.as_ref().expect("statuses")[0]
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        assert_eq!(terminated, Some(3));
    }

    #[test]
    fn reading_keeps_only_the_mesh_annotations_and_every_label() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "a",
        "labels": {"app": "web", "version": "v2", "pod-template-hash": "abc"},
        "annotations": {
            "mesh.dev/inject": "enabled",
            "config.mesh.dev/opaque-ports": "5432",
            "retry.mesh.dev/http": "5xx",
            "prometheus.io/scrape": "true",
            "checksum/config": "abc",
            "notmesh.dev/x": "y",
            "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"
        }}}))
        .expect("a pod reads");
        let kept: Vec<&str> = pod.annotations.iter().map(|(k, _)| k).collect();
        assert_eq!(
            kept,
            [
                "config.mesh.dev/opaque-ports",
                "mesh.dev/inject",
                "retry.mesh.dev/http"
            ]
        );
        assert_eq!(pod.annotations.get("mesh.dev/inject"), Some("enabled"));
        assert_eq!(pod.annotations.get("prometheus.io/scrape"), None);
        assert_eq!(pod.labels.get("app"), Some("web"));
        assert_eq!(pod.labels.get("version"), Some("v2"));
        assert_eq!(pod.labels.get("pod-template-hash"), Some("abc"));
        assert_eq!(pod.labels.get("missing"), None);
        let plain: Pod = serde_json::from_value(json!({"metadata": {"annotations": {"a/b": "c"}}}))
            .expect("a pod reads");
        assert!(plain.annotations.is_empty() && plain.labels.is_empty());
    }

    #[test]
    fn labels_are_sorted_and_the_last_of_a_repeated_key_wins() {
        let labels: Labels = [("b", "1"), ("a", "2"), ("b", "3"), ("c", "4")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(
            labels.iter().collect::<Vec<_>>(),
            [("a", "2"), ("b", "3"), ("c", "4")]
        );
    }

    #[test]
    fn a_field_of_the_wrong_type_is_an_error() {
        let wrong = json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": 1}]}});
        assert!(serde_json::from_value::<Pod>(wrong).is_err());
    }
}
