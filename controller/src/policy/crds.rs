//! The mesh's policy CRDs, group `policy.mesh.dev`, version `v1alpha1`: Rust types with kube's
//! `CustomResource` derive, from which the CRD YAML under `charts/mesh/crds/` is generated
//! ([`crd_files`]; a test keeps the checked-in files equal to it).
//!
//! - [`Server`]: a port (number or container port name) of the pods a selector picks, and the
//!   protocol it speaks.
//! - [`AuthorizationPolicy`]: who may reach a target (a Server, an HTTPRoute or a whole
//!   Namespace): every one of its required authentications must hold.
//! - [`MeshTLSAuthentication`]: clients proving one of some mesh identities.
//! - [`NetworkAuthentication`]: clients from some networks.
//! - [`HTTPLocalRateLimitPolicy`]: request rates allowed into a Server, in total and per
//!   client identity.
//! - [`EgressNetwork`]: destinations outside the mesh, and whether traffic to them that no
//!   route allows passes.
//!
//! These are plain data: what a field means for a proxy is decided in `policy::inbound`.
//! Fields are lenient where the controller can report a mistake better than admission can
//! (e.g. a reference's kind is a string, checked and reported when the policy is computed).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the mesh's policy CRDs.
pub const GROUP: &str = "policy.mesh.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// A port of some pods, and the protocol it speaks.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "Server",
    namespaced,
    derive = "PartialEq",
    shortname = "srv",
    printcolumn = r#"{"name":"Port","type":"string","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Protocol","type":"string","jsonPath":".spec.proxyProtocol"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// The pods of the Server's namespace this Server covers (an empty selector selects every
    /// pod).
    pub pod_selector: LabelSelector,
    /// The port: a number, or the name of a container port.
    pub port: IntOrString,
    /// The protocol the port speaks; `unknown` lets the proxy detect it.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
}

/// The protocol of a Server's port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ProxyProtocol {
    /// Detected by the proxy (HTTP/1, HTTP/2, mesh TLS, else opaque).
    #[default]
    #[serde(rename = "unknown")]
    Unknown,
    /// HTTP/1.x.
    #[serde(rename = "HTTP/1")]
    Http1,
    /// HTTP/2 with prior knowledge.
    #[serde(rename = "HTTP/2")]
    Http2,
    /// gRPC.
    #[serde(rename = "gRPC")]
    Grpc,
    /// Opaque TCP, never parsed.
    #[serde(rename = "opaque")]
    Opaque,
    /// TLS originated by the application.
    #[serde(rename = "TLS")]
    Tls,
}

/// A reference to another object by group, kind and name (and namespace, when it may be
/// elsewhere).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// The API group (`policy.mesh.dev`, `gateway.networking.k8s.io`, or empty for core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The kind.
    pub kind: String,
    /// The name.
    pub name: String,
    /// The namespace; the referrer's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Who may reach a target: a client is admitted when it meets every required authentication.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    derive = "PartialEq",
    shortname = "authzpolicy",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// What is protected: a `Server` (`policy.mesh.dev`), an `HTTPRoute`
    /// (`gateway.networking.k8s.io`) or the policy's own `Namespace` (core), meaning every
    /// Server in it.
    pub target_ref: ObjectRef,
    /// What a client must prove, all of it: `MeshTLSAuthentication`, `NetworkAuthentication`
    /// (`policy.mesh.dev`) or a `ServiceAccount` (core). Empty admits every client.
    #[serde(default)]
    pub required_authentication_refs: Vec<ObjectRef>,
}

/// Clients proving one of some mesh identities.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "MeshTLSAuthentication",
    namespaced,
    derive = "PartialEq",
    shortname = "meshtlsauthn"
)]
#[serde(rename_all = "camelCase")]
pub struct MeshTLSAuthenticationSpec {
    /// SPIFFE IDs admitted; `*` admits any meshed client, and an ID ending in `*` admits the
    /// IDs it prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// ServiceAccounts whose identities are admitted (kind `ServiceAccount`), or Namespaces
    /// all of whose ServiceAccounts are (kind `Namespace`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_refs: Vec<ObjectRef>,
}

/// Clients from some networks.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "NetworkAuthentication",
    namespaced,
    derive = "PartialEq",
    shortname = "netauthn"
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkAuthenticationSpec {
    /// The networks admitted.
    pub networks: Vec<NetworkSpec>,
}

/// A network and the parts of it not admitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// A CIDR (`10.0.0.0/8`, `::/0`) or a single IP.
    pub cidr: String,
    /// CIDRs inside `cidr` that are not admitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// Request rates allowed into a Server.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "HTTPLocalRateLimitPolicy",
    namespaced,
    derive = "PartialEq",
    shortname = "ratelimit"
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPLocalRateLimitPolicySpec {
    /// The `Server` (`policy.mesh.dev`) limited.
    pub target_ref: ObjectRef,
    /// All clients together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Limit>,
    /// Each client identity on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Limit>,
    /// Limits for some clients, replacing `identity` for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

/// Destinations outside the mesh (addresses that are no Service's and no pod's), for the
/// clients of its namespace, or of every namespace when it lives in the control plane's.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "EgressNetwork",
    namespaced,
    derive = "PartialEq",
    shortname = "egressnet",
    printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".spec.trafficPolicy"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EgressNetworkSpec {
    /// The networks covered; every address outside the mesh when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkSpec>,
    /// What happens to traffic that no route attached to this network allows: `Allow` or
    /// `Deny`.
    pub traffic_policy: String,
}

/// A rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limit {
    /// Requests per second.
    pub requests_per_second: u32,
}

/// A rate for some clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitOverride {
    /// Requests per second, for each of the clients.
    pub requests_per_second: u32,
    /// The clients: `ServiceAccount`s (core).
    pub client_refs: Vec<ObjectRef>,
}

/// The folder of the chart's CRDs, relative to the workspace root.
pub const CRD_DIR: &str = "charts/mesh/crds";

/// Every CRD the controller reads, with its file name under [`CRD_DIR`]: the mesh's policy
/// kinds, then the Gateway API routes (our subset, see `policy::gateway`).
pub fn crds() -> Vec<(
    String,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    use kube::CustomResourceExt;

    use super::gateway::{GRPCRoute, HTTPRoute, TCPRoute, TLSRoute};
    let mut gateway = [
        HTTPRoute::crd(),
        GRPCRoute::crd(),
        TLSRoute::crd(),
        TCPRoute::crd(),
    ];
    for crd in &mut gateway {
        keep_unknown_fields(crd);
        crd.metadata.annotations = Some(
            [
                (
                    "mesh.dev/note".to_owned(),
                    "The subset of the Gateway API the mesh reads, with spec and status kept \
                     open. Skip this file when the cluster already has the Gateway API CRDs."
                        .to_owned(),
                ),
                // The API server refuses a CRD of a *.k8s.io group without this annotation;
                // a value starting with "unapproved" is accepted and says what this is.
                (
                    "api-approved.kubernetes.io".to_owned(),
                    "unapproved, the mesh's subset of the Gateway API; the Gateway API's own \
                     CRDs replace it"
                        .to_owned(),
                ),
            ]
            .into(),
        );
    }
    [
        Server::crd(),
        AuthorizationPolicy::crd(),
        MeshTLSAuthentication::crd(),
        NetworkAuthentication::crd(),
        HTTPLocalRateLimitPolicy::crd(),
        EgressNetwork::crd(),
        crate::external::ExternalWorkload::crd(),
    ]
    .into_iter()
    .chain(gateway)
    .map(|crd| {
        let name = crd.metadata.name.clone().unwrap_or_default();
        // `servers.policy.mesh.dev` -> `policy.mesh.dev_servers.yaml`, the layout of
        // upstream CRD folders.
        let file = match name.split_once('.') {
            Some((plural, group)) => format!("{group}_{plural}.yaml"),
            None => format!("{name}.yaml"),
        };
        (file, crd)
    })
    .collect()
}

/// Marks `spec` and `status` of every version as open, so fields our subset does not model
/// are stored rather than pruned.
fn keep_unknown_fields(
    crd: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) {
    for version in &mut crd.spec.versions {
        let properties = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut());
        for (name, property) in properties.into_iter().flatten() {
            if name == "spec" || name == "status" {
                property.x_kubernetes_preserve_unknown_fields = Some(true);
            }
        }
    }
}

/// Why the CRD YAML could not be produced.
#[derive(Debug, thiserror::Error)]
#[error("serialising CRD {name}: {reason}")]
pub struct CrdYamlError {
    /// The CRD.
    pub name: String,
    /// What failed.
    pub reason: String,
}

/// Each CRD as a YAML file: `(file name, text)`.
pub fn crd_files() -> Result<Vec<(String, String)>, CrdYamlError> {
    crds()
        .into_iter()
        .map(|(file, crd)| {
            let yaml = serde_saphyr::to_string(&crd).map_err(|e| CrdYamlError {
                name: crd.metadata.name.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?;
            Ok((
                file,
                format!(
                    "# Generated by `mesh-controller crds` from the Rust types; do not edit.\n{yaml}"
                ),
            ))
        })
        .collect()
}

/// Every CRD as one multi-document YAML stream (`mesh-controller crds`, `meshctl install`).
pub fn crd_stream() -> Result<String, CrdYamlError> {
    Ok(crd_files()?
        .into_iter()
        .map(|(_, yaml)| format!("---\n{yaml}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRDs equal the generated ones. `MESH_UPDATE_CRDS=1 cargo test -p
    /// mesh-controller crds` (or `mesh-controller crds`) regenerates them.
    #[test]
    fn checked_in_crds_are_generated_from_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CRD_DIR);
        let files = crd_files().expect("CRDs serialise");
        if std::env::var_os("MESH_UPDATE_CRDS").is_some() {
            std::fs::create_dir_all(&dir).expect("create the CRD folder");
            for (file, yaml) in &files {
                std::fs::write(dir.join(file), yaml).expect("write a CRD");
            }
        }
        for (file, yaml) in &files {
            let checked_in = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            assert!(
                checked_in == *yaml,
                "{CRD_DIR}/{file} is not what the types generate; \
                 run `MESH_UPDATE_CRDS=1 cargo test -p mesh-controller crds` and commit it"
            );
        }
    }

    #[test]
    fn crd_documents_read_back_as_the_kinds_they_define() {
        let kinds: Vec<String> = crds()
            .iter()
            .map(|(_, crd)| format!("{}/{}", crd.spec.group, crd.spec.names.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                "policy.mesh.dev/Server",
                "policy.mesh.dev/AuthorizationPolicy",
                "policy.mesh.dev/MeshTLSAuthentication",
                "policy.mesh.dev/NetworkAuthentication",
                "policy.mesh.dev/HTTPLocalRateLimitPolicy",
                "policy.mesh.dev/EgressNetwork",
                "workload.mesh.dev/ExternalWorkload",
                "gateway.networking.k8s.io/HTTPRoute",
                "gateway.networking.k8s.io/GRPCRoute",
                "gateway.networking.k8s.io/TLSRoute",
                "gateway.networking.k8s.io/TCPRoute",
            ]
        );
        let stream = crd_stream().expect("CRDs serialise");
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&stream).expect("the stream is YAML");
        assert_eq!(documents.len(), kinds.len());
        let server = &documents[0];
        assert_eq!(server["spec"]["names"]["plural"], "servers");
        let schema = &server["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_eq!(
            schema["properties"]["spec"]["properties"]["port"]["x-kubernetes-int-or-string"],
            true
        );
        let route = &documents[7];
        assert_eq!(
            route["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
    }
}
