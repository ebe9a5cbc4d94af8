//! The Kubernetes objects discovery reads, in one enum so that every backend (the API server's
//! watchers, a folder of YAML) hands the index the same input model.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::pod::Pod;
use crate::policy::kinds::PolicyObject;

/// The namespace of a namespaced object that names none, as `kubectl apply` assumes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Which kind of object: the index keeps one map per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Namespace (cluster-scoped).
    Namespace,
    /// core/v1 Service.
    Service,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// core/v1 Pod.
    Pod,
    /// core/v1 ServiceAccount.
    ServiceAccount,
    /// workload.mesh.dev ExternalWorkload: a host outside Kubernetes, seen as a pod.
    ExternalWorkload,
    // Policy kinds (see `crate::policy::kinds`): no discovery view reads them.
    /// policy.mesh.dev Server.
    Server,
    /// policy.mesh.dev AuthorizationPolicy.
    AuthorizationPolicy,
    /// policy.mesh.dev MeshTLSAuthentication.
    MeshTLSAuthentication,
    /// policy.mesh.dev NetworkAuthentication.
    NetworkAuthentication,
    /// policy.mesh.dev HTTPLocalRateLimitPolicy.
    HTTPLocalRateLimitPolicy,
    /// policy.mesh.dev EgressNetwork.
    EgressNetwork,
    /// gateway.networking.k8s.io HTTPRoute.
    HTTPRoute,
    /// gateway.networking.k8s.io GRPCRoute.
    GRPCRoute,
    /// gateway.networking.k8s.io TLSRoute.
    TLSRoute,
    /// gateway.networking.k8s.io TCPRoute.
    TCPRoute,
}

impl Kind {
    /// Every kind, in a fixed order (metrics report each, even when zero).
    pub const ALL: [Kind; 16] = [
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::ServiceAccount,
        Kind::ExternalWorkload,
        Kind::Server,
        Kind::AuthorizationPolicy,
        Kind::MeshTLSAuthentication,
        Kind::NetworkAuthentication,
        Kind::HTTPLocalRateLimitPolicy,
        Kind::EgressNetwork,
        Kind::HTTPRoute,
        Kind::GRPCRoute,
        Kind::TLSRoute,
        Kind::TCPRoute,
    ];

    /// Whether this is a policy kind (read by `crate::policy`, not by discovery's views).
    pub fn is_policy(self) -> bool {
        matches!(
            self,
            Kind::Server
                | Kind::AuthorizationPolicy
                | Kind::MeshTLSAuthentication
                | Kind::NetworkAuthentication
                | Kind::HTTPLocalRateLimitPolicy
                | Kind::EgressNetwork
                | Kind::HTTPRoute
                | Kind::GRPCRoute
                | Kind::TLSRoute
                | Kind::TCPRoute
        )
    }

    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::ExternalWorkload => "ExternalWorkload",
            Kind::Server => "Server",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::MeshTLSAuthentication => "MeshTLSAuthentication",
            Kind::NetworkAuthentication => "NetworkAuthentication",
            Kind::HTTPLocalRateLimitPolicy => "HTTPLocalRateLimitPolicy",
            Kind::EgressNetwork => "EgressNetwork",
            Kind::HTTPRoute => "HTTPRoute",
            Kind::GRPCRoute => "GRPCRoute",
            Kind::TLSRoute => "TLSRoute",
            Kind::TCPRoute => "TCPRoute",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names an object within its kind. Cluster-scoped objects (Namespaces) have an empty
/// namespace. Ordered by namespace first, so one namespace's objects are a contiguous range.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// The namespace; empty for cluster-scoped objects.
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// One object discovery understands. Shared (`Arc`): the API server's reflectors hand out
/// `Arc`s, and the index clones objects into snapshots' inputs without copying them.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A Namespace: its annotations set defaults for the pods in it.
    Namespace(Arc<Namespace>),
    /// A Service: ports, cluster IPs, selector.
    Service(Arc<Service>),
    /// An EndpointSlice of a Service.
    EndpointSlice(Arc<EndpointSlice>),
    /// A Pod: identity, readiness, ports, owner.
    Pod(Arc<Pod>),
    /// A ServiceAccount (counted; the identity comes from the pod's `serviceAccountName`).
    ServiceAccount(Arc<ServiceAccount>),
    /// An ExternalWorkload, as the pod discovery sees (`crate::external`).
    ExternalWorkload(Arc<Pod>),
    /// A policy CRD or Gateway API route, read by `crate::policy`.
    Policy(PolicyObject),
}

/// A document that looked like one of our kinds but does not fit its schema.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {name}: {source}")]
pub struct ObjectError {
    /// The kind the document claimed.
    pub kind: String,
    /// The name it claimed, or `?`.
    pub name: String,
    /// Why it does not fit.
    #[source]
    pub source: serde_json::Error,
}

impl Object {
    /// Whether two objects are equal, cheaply when they are the same allocation (unchanged
    /// files and relists hand the index the same `Arc`s again).
    pub fn same(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Namespace(a), Object::Namespace(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Service(a), Object::Service(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::EndpointSlice(a), Object::EndpointSlice(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Pod(a), Object::Pod(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::ExternalWorkload(a), Object::ExternalWorkload(b)) => {
                Arc::ptr_eq(a, b) || a == b
            }
            (Object::ServiceAccount(a), Object::ServiceAccount(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Policy(a), Object::Policy(b)) => a.same(b),
            _ => false,
        }
    }

    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::ExternalWorkload(_) => Kind::ExternalWorkload,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::Policy(o) => o.kind(),
        }
    }

    /// The object's name and namespace, as written.
    fn name_and_namespace(&self) -> (&Option<String>, &Option<String>) {
        let meta = match self {
            Object::Namespace(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            // A pod keeps only the metadata discovery reads (`PodObjectMeta`).
            Object::Pod(o) | Object::ExternalWorkload(o) => {
                return (&o.metadata.name, &o.metadata.namespace);
            }
            Object::ServiceAccount(o) => &o.metadata,
            Object::Policy(o) => o.metadata(),
        };
        (&meta.name, &meta.namespace)
    }

    /// The object's namespace, to write; copies a shared object.
    fn namespace_mut(&mut self) -> &mut Option<String> {
        match self {
            Object::Namespace(o) => &mut Arc::make_mut(o).metadata.namespace,
            Object::Service(o) => &mut Arc::make_mut(o).metadata.namespace,
            Object::EndpointSlice(o) => &mut Arc::make_mut(o).metadata.namespace,
            Object::Pod(o) | Object::ExternalWorkload(o) => {
                &mut Arc::make_mut(o).metadata.namespace
            }
            Object::ServiceAccount(o) => &mut Arc::make_mut(o).metadata.namespace,
            Object::Policy(o) => &mut o.metadata_mut().namespace,
        }
    }

    /// The object's key. Namespaced objects without a namespace get [`DEFAULT_NAMESPACE`]
    /// (see [`Object::with_default_namespace`]); cluster-scoped ones an empty namespace.
    pub fn key(&self) -> ObjectKey {
        let (name, namespace) = self.name_and_namespace();
        let name = name.clone().unwrap_or_default();
        if self.kind() == Kind::Namespace {
            return ObjectKey::new("", name);
        }
        let namespace = namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        ObjectKey::new(namespace, name)
    }

    /// The same object with its namespace filled in when it named none, as the API server
    /// would do on create; files often leave it out.
    pub fn with_default_namespace(mut self) -> Self {
        // Checked before `namespace_mut`, which copies a shared object.
        if self.kind() != Kind::Namespace
            && self
                .name_and_namespace()
                .1
                .as_deref()
                .is_none_or(str::is_empty)
        {
            *self.namespace_mut() = Some(DEFAULT_NAMESPACE.to_owned());
        }
        self
    }

    /// The namespaces whose derived views this object can change: its own namespace, or the
    /// namespace it is.
    pub fn affected_namespace(&self) -> String {
        let key = self.key();
        if self.kind() == Kind::Namespace {
            key.name
        } else {
            key.namespace
        }
    }

    /// Reads one document given as a JSON value (YAML is parsed into the same model).
    /// `Ok(None)` for a kind discovery does not use; an error when the document claims one of
    /// our kinds but does not fit its schema.
    pub fn from_value(value: serde_json::Value) -> Result<Option<Object>, ObjectError> {
        let kind = value
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let api_version = value
            .get("apiVersion")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = value
            .pointer("/metadata/name")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let wrap = |source| ObjectError {
            kind: kind.clone(),
            name: name.clone(),
            source,
        };
        let object = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => {
                Object::Namespace(Arc::new(serde_json::from_value(value).map_err(wrap)?))
            }
            ("v1", "Service") => {
                Object::Service(Arc::new(serde_json::from_value(value).map_err(wrap)?))
            }
            ("v1", "Pod") => Object::Pod(Arc::new(
                serde_json::from_value::<Pod>(value).map_err(wrap)?,
            )),
            ("v1", "ServiceAccount") => {
                Object::ServiceAccount(Arc::new(serde_json::from_value(value).map_err(wrap)?))
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                Object::EndpointSlice(Arc::new(serde_json::from_value(value).map_err(wrap)?))
            }
            ("workload.mesh.dev/v1alpha1", "ExternalWorkload") => Object::from(
                serde_json::from_value::<crate::external::ExternalWorkload>(value).map_err(wrap)?,
            ),
            _ => match PolicyObject::from_value(&api_version, &kind, value) {
                Some(read) => Object::Policy(read.map_err(wrap)?),
                None => return Ok(None),
            },
        };
        Ok(Some(object))
    }
}

impl From<crate::external::ExternalWorkload> for Object {
    fn from(workload: crate::external::ExternalWorkload) -> Self {
        Object::ExternalWorkload(Arc::new(crate::external::as_pod(&workload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_map_to_kinds_and_keys() {
        let cases = [
            (
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}),
                Some((Kind::Service, ObjectKey::new("default", "web"))),
            ),
            (
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"}}),
                Some((Kind::Pod, ObjectKey::new("shop", "p"))),
            ),
            (
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
                Some((Kind::Namespace, ObjectKey::new("", "shop"))),
            ),
            (
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "web-1", "namespace": "shop"}, "addressType": "IPv4",
                       "endpoints": []}),
                Some((Kind::EndpointSlice, ObjectKey::new("shop", "web-1"))),
            ),
            (
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}),
                None,
            ),
            (
                json!({"apiVersion": "policy.mesh.dev/v1", "kind": "Server", "metadata": {"name": "s"}}),
                None,
            ),
        ];
        for (doc, want) in cases {
            let got = Object::from_value(doc.clone())
                .expect("document fits its schema")
                .map(|o| (o.kind(), o.key()));
            assert_eq!(got, want, "{doc}");
        }
    }

    #[test]
    fn a_document_that_does_not_fit_its_kind_is_an_error_naming_it() {
        let doc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                         "spec": {"ports": "eighty"}});
        let err = Object::from_value(doc).expect_err("ports must be a list");
        let text = err.to_string();
        assert!(text.starts_with("Service web:"), "{text}");
    }
}
