//! The parts of a Pod the controller reads, and nothing else.
//!
//! Written by hand instead of using k8s-openapi's `Pod`: that type holds every field of the
//! API inline (2.1 KiB for the pod and 2.1 KiB more per container, most of them `None`), which
//! made a Pod cost the controller ~9 KiB; at 100,000 pods that was most of its memory. The
//! field names and shapes follow the API's (and k8s-openapi's), so code reads the same. Both
//! backends decode straight into these types: the file backend from YAML, the Kubernetes
//! backend from the API server's watch (the `Resource` impls below let kube-rs watch them),
//! so the full object is never held. Fields the API sends that are not here are skipped.

use k8s_openapi::api::core::v1::ContainerPort;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// A Pod, as far as discovery and policy read it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    /// Name, namespace, labels, annotations, owners, deletion.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What the pod runs.
    pub spec: Option<PodSpec>,
    /// Where it runs and how it is doing.
    pub status: Option<PodStatus>,
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

impl Pod {
    /// The pod without what the controller never reads and need not hold: managed fields,
    /// and annotations outside the mesh's own (`*mesh.dev/...`), which in a cluster are often
    /// most of a pod's metadata (tooling, checksums, monitoring).
    pub fn trimmed(mut self) -> Self {
        self.metadata.managed_fields = None;
        if let Some(annotations) = self.metadata.annotations.as_mut() {
            annotations.retain(|key, _| is_mesh_annotation(key));
            if annotations.is_empty() {
                self.metadata.annotations = None;
            }
        }
        self
    }
}

/// Whether an annotation is one of the mesh's: its prefix is `mesh.dev` or a subdomain of it.
fn is_mesh_annotation(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(prefix, _)| prefix == "mesh.dev" || prefix.ends_with(".mesh.dev"))
}

impl k8s_openapi::Resource for Pod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Pod {
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
    fn trimming_keeps_only_the_mesh_annotations() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "a", "annotations": {
            "mesh.dev/inject": "enabled",
            "config.mesh.dev/opaque-ports": "5432",
            "retry.mesh.dev/http": "5xx",
            "prometheus.io/scrape": "true",
            "checksum/config": "abc",
            "notmesh.dev/x": "y",
            "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"
        }}}))
        .expect("a pod reads");
        let kept: Vec<String> = pod
            .trimmed()
            .metadata
            .annotations
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            kept,
            [
                "config.mesh.dev/opaque-ports",
                "mesh.dev/inject",
                "retry.mesh.dev/http"
            ]
        );
        let plain: Pod = serde_json::from_value(json!({"metadata": {"annotations": {"a/b": "c"}}}))
            .expect("a pod reads");
        assert_eq!(plain.trimmed().metadata.annotations, None);
    }

    #[test]
    fn a_field_of_the_wrong_type_is_an_error() {
        let wrong = json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": 1}]}});
        assert!(serde_json::from_value::<Pod>(wrong).is_err());
    }
}
