//! Hosts outside Kubernetes: an `ExternalWorkload` (`workload.mesh.dev/v1alpha1`) is a machine
//! (a VM, a bare-metal host) that runs mesh-proxy and joins the mesh with the identity of a
//! ServiceAccount, as Linkerd's ExternalWorkload and Istio's WorkloadEntry do.
//!
//! Discovery sees it as a pod ([`as_pod`]): running and ready at its first workload IP, with a
//! mesh proxy (so meshed, with `spiffe://<trust-domain>/ns/<ns>/sa/<serviceAccountName>`), its
//! labels and ports, owned by the ExternalWorkload (its workload in metrics). So a Service
//! whose selector matches its labels has it as an endpoint, its IP resolves to it, and its
//! proxy's inbound policy, identity and stats work as a pod's. Its proxy proves the identity
//! with a token of that ServiceAccount (`meshctl external-workload` prints one and the proxy's
//! settings). Nothing here trusts the machine more than a pod of that ServiceAccount.

use std::net::IpAddr;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::pod::Pod;

/// A machine outside Kubernetes that runs a mesh proxy.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "workload.mesh.dev",
    version = "v1alpha1",
    kind = "ExternalWorkload",
    namespaced,
    derive = "PartialEq",
    shortname = "extwl",
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".spec.workloadIPs[0]"}"#,
    printcolumn = r#"{"name":"ServiceAccount","type":"string","jsonPath":".spec.serviceAccountName"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalWorkloadSpec {
    /// The ServiceAccount whose identity its proxy proves; `default` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Its IP addresses; the mesh reaches it at the first.
    #[serde(rename = "workloadIPs")]
    pub workload_ips: Vec<String>,
    /// The ports its applications serve (names let Services target them by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<WorkloadPort>,
    /// Its proxy's inbound port; 4143 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_proxy_port: Option<u16>,
}

/// A port an external workload serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkloadPort {
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port.
    pub port: u16,
}

/// Whether a pod is an external workload seen as one.
pub fn is_external(pod: &Pod) -> bool {
    pod.metadata.owner_references.iter().flatten().any(|owner| {
        owner.kind == "ExternalWorkload" && owner.api_version == "workload.mesh.dev/v1alpha1"
    })
}

/// The pod discovery sees: what a kubelet would report for it. A workload without a valid
/// first IP is a pod without an IP (no endpoints, reported in the log).
pub fn as_pod(workload: &ExternalWorkload) -> Pod {
    let name = workload.metadata.name.clone().unwrap_or_default();
    let namespace = workload.metadata.namespace.clone();
    let ip = workload.spec.workload_ips.first().filter(|ip| {
        let valid = ip.parse::<IpAddr>().is_ok();
        if !valid {
            tracing::warn!(
                workload = %name,
                ip = %ip,
                "ExternalWorkload spec.workloadIPs[0] is not an IP: it has no endpoints"
            );
        }
        valid
    });
    let mut annotations = workload.metadata.annotations.clone().unwrap_or_default();
    if let Some(port) = workload.spec.inbound_proxy_port {
        annotations.insert(
            crate::meta::ANNOTATION_INBOUND_PORT.to_owned(),
            port.to_string(),
        );
    }
    let ports: Vec<serde_json::Value> = workload
        .spec
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "containerPort": p.port}))
        .collect();
    let wire = json!({
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": workload.metadata.labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "workload.mesh.dev/v1alpha1",
                "kind": "ExternalWorkload",
                "name": name,
                "uid": workload.metadata.uid.clone().unwrap_or_default(),
                "controller": true,
            }],
            "deletionTimestamp": workload.metadata.deletion_timestamp,
        },
        "spec": {
            "serviceAccountName": workload.spec.service_account_name,
            "containers": [{"name": crate::meta::PROXY_CONTAINER, "ports": ports}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": ip.map(|ip| vec![json!({"ip": ip})]).unwrap_or_default(),
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    });
    // Every field above is one a Pod has, of the type it has: this cannot fail.
    serde_json::from_value(wire).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{self, MeshedRule};

    fn workload(yaml: &str) -> ExternalWorkload {
        serde_saphyr::from_str(yaml).expect("test workload parses")
    }

    #[test]
    fn a_workload_is_a_ready_meshed_pod_of_its_service_account() {
        let vm = workload(
            "apiVersion: workload.mesh.dev/v1alpha1\nkind: ExternalWorkload\n\
             metadata: {name: legacy-1, namespace: shop, labels: {app: legacy}}\n\
             spec: {serviceAccountName: legacy, workloadIPs: [192.0.2.10, 192.0.2.11], \
             ports: [{name: http, port: 8080}], inboundProxyPort: 4200}\n",
        );
        let pod = as_pod(&vm);
        assert_eq!(
            meta::pod_ip(&pod),
            Some("192.0.2.10".parse().expect("an IP"))
        );
        assert!(meta::pod_is_ready(&pod));
        assert_eq!(pod.labels.get("app"), Some("legacy"));
        assert_eq!(
            meta::workload(&pod),
            ("externalworkload".to_owned(), "legacy-1".to_owned())
        );
        let meshed = meta::meshed(&pod, None, "cluster.local", MeshedRule::ProxyPresent, true)
            .expect("meshed");
        assert_eq!(
            meshed.identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/legacy")
        );
        assert_eq!(meshed.inbound_proxy_port, 4200);

        let bad = workload(
            "apiVersion: workload.mesh.dev/v1alpha1\nkind: ExternalWorkload\n\
             metadata: {name: bad, namespace: shop}\nspec: {workloadIPs: [not-an-ip]}\n",
        );
        let pod = as_pod(&bad);
        assert_eq!(
            meta::pod_ip(&pod),
            None,
            "no endpoint at an address that is none"
        );
        assert_eq!(meta::service_account(&pod), "default");
    }
}
