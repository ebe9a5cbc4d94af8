//! The policy kinds as discovery objects: [`PolicyObject`] is what the index, the file
//! backend and the Kubernetes watchers carry for the `policy.mesh.dev` CRDs and the Gateway
//! API routes, behind the one `Object::Policy` variant of `crate::objects`.
//!
//! It maps documents to types and back to kinds; it must not interpret them.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crds::{
    AuthorizationPolicy, EgressNetwork, HTTPLocalRateLimitPolicy, MeshTLSAuthentication,
    NetworkAuthentication, Server,
};
use super::gateway::{GRPCRoute, HTTPRoute, TCPRoute, TLSRoute};
use crate::objects::{Kind, Object};

/// One object of a policy kind.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyObject {
    /// `policy.mesh.dev` Server.
    Server(Arc<Server>),
    /// `policy.mesh.dev` AuthorizationPolicy.
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    /// `policy.mesh.dev` MeshTLSAuthentication.
    MeshTLSAuthentication(Arc<MeshTLSAuthentication>),
    /// `policy.mesh.dev` NetworkAuthentication.
    NetworkAuthentication(Arc<NetworkAuthentication>),
    /// `policy.mesh.dev` HTTPLocalRateLimitPolicy.
    HTTPLocalRateLimitPolicy(Arc<HTTPLocalRateLimitPolicy>),
    /// `policy.mesh.dev` EgressNetwork.
    EgressNetwork(Arc<EgressNetwork>),
    /// Gateway API HTTPRoute.
    HTTPRoute(Arc<HTTPRoute>),
    /// Gateway API GRPCRoute.
    GRPCRoute(Arc<GRPCRoute>),
    /// Gateway API TLSRoute.
    TLSRoute(Arc<TLSRoute>),
    /// Gateway API TCPRoute.
    TCPRoute(Arc<TCPRoute>),
}

/// Applies `$body` to the inner `Arc` of whichever variant `$object` is.
macro_rules! each {
    ($object:expr, $inner:ident => $body:expr) => {
        match $object {
            PolicyObject::Server($inner) => $body,
            PolicyObject::AuthorizationPolicy($inner) => $body,
            PolicyObject::MeshTLSAuthentication($inner) => $body,
            PolicyObject::NetworkAuthentication($inner) => $body,
            PolicyObject::HTTPLocalRateLimitPolicy($inner) => $body,
            PolicyObject::EgressNetwork($inner) => $body,
            PolicyObject::HTTPRoute($inner) => $body,
            PolicyObject::GRPCRoute($inner) => $body,
            PolicyObject::TLSRoute($inner) => $body,
            PolicyObject::TCPRoute($inner) => $body,
        }
    };
}

impl PolicyObject {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            PolicyObject::Server(_) => Kind::Server,
            PolicyObject::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            PolicyObject::MeshTLSAuthentication(_) => Kind::MeshTLSAuthentication,
            PolicyObject::NetworkAuthentication(_) => Kind::NetworkAuthentication,
            PolicyObject::HTTPLocalRateLimitPolicy(_) => Kind::HTTPLocalRateLimitPolicy,
            PolicyObject::EgressNetwork(_) => Kind::EgressNetwork,
            PolicyObject::HTTPRoute(_) => Kind::HTTPRoute,
            PolicyObject::GRPCRoute(_) => Kind::GRPCRoute,
            PolicyObject::TLSRoute(_) => Kind::TLSRoute,
            PolicyObject::TCPRoute(_) => Kind::TCPRoute,
        }
    }

    /// Whether two objects are equal, cheaply when they share an allocation.
    pub fn same(&self, other: &PolicyObject) -> bool {
        match (self, other) {
            (PolicyObject::Server(a), PolicyObject::Server(b)) => Arc::ptr_eq(a, b) || a == b,
            (PolicyObject::AuthorizationPolicy(a), PolicyObject::AuthorizationPolicy(b)) => {
                Arc::ptr_eq(a, b) || a == b
            }
            (PolicyObject::MeshTLSAuthentication(a), PolicyObject::MeshTLSAuthentication(b)) => {
                Arc::ptr_eq(a, b) || a == b
            }
            (PolicyObject::NetworkAuthentication(a), PolicyObject::NetworkAuthentication(b)) => {
                Arc::ptr_eq(a, b) || a == b
            }
            (
                PolicyObject::HTTPLocalRateLimitPolicy(a),
                PolicyObject::HTTPLocalRateLimitPolicy(b),
            ) => Arc::ptr_eq(a, b) || a == b,
            (PolicyObject::HTTPRoute(a), PolicyObject::HTTPRoute(b)) => Arc::ptr_eq(a, b) || a == b,
            (PolicyObject::GRPCRoute(a), PolicyObject::GRPCRoute(b)) => Arc::ptr_eq(a, b) || a == b,
            (PolicyObject::EgressNetwork(a), PolicyObject::EgressNetwork(b)) => {
                Arc::ptr_eq(a, b) || a == b
            }
            (PolicyObject::TLSRoute(a), PolicyObject::TLSRoute(b)) => Arc::ptr_eq(a, b) || a == b,
            (PolicyObject::TCPRoute(a), PolicyObject::TCPRoute(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        each!(self, o => &o.metadata)
    }

    /// The object's metadata, for changing (copies a shared object).
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        each!(self, o => &mut Arc::make_mut(o).metadata)
    }

    /// Reads a document of a policy kind: `None` when `api_version`/`kind` is not one.
    pub fn from_value(
        api_version: &str,
        kind: &str,
        value: serde_json::Value,
    ) -> Option<Result<PolicyObject, serde_json::Error>> {
        fn read<T: serde::de::DeserializeOwned>(
            value: serde_json::Value,
            wrap: fn(Arc<T>) -> PolicyObject,
        ) -> Result<PolicyObject, serde_json::Error> {
            serde_json::from_value(value).map(|o| wrap(Arc::new(o)))
        }
        let group = match api_version {
            "policy.mesh.dev/v1alpha1" => "policy.mesh.dev",
            // v1beta1 routes have the same shape for the fields the mesh reads, and so do
            // v1alpha2 (TLSRoute and TCPRoute live there) and v1alpha3.
            "gateway.networking.k8s.io/v1"
            | "gateway.networking.k8s.io/v1beta1"
            | "gateway.networking.k8s.io/v1alpha2"
            | "gateway.networking.k8s.io/v1alpha3" => "gateway.networking.k8s.io",
            _ => return None,
        };
        Some(match (group, kind) {
            ("policy.mesh.dev", "Server") => read(value, PolicyObject::Server),
            ("policy.mesh.dev", "AuthorizationPolicy") => {
                read(value, PolicyObject::AuthorizationPolicy)
            }
            ("policy.mesh.dev", "MeshTLSAuthentication") => {
                read(value, PolicyObject::MeshTLSAuthentication)
            }
            ("policy.mesh.dev", "NetworkAuthentication") => {
                read(value, PolicyObject::NetworkAuthentication)
            }
            ("policy.mesh.dev", "HTTPLocalRateLimitPolicy") => {
                read(value, PolicyObject::HTTPLocalRateLimitPolicy)
            }
            ("policy.mesh.dev", "EgressNetwork") => read(value, PolicyObject::EgressNetwork),
            ("gateway.networking.k8s.io", "HTTPRoute") => read(value, PolicyObject::HTTPRoute),
            ("gateway.networking.k8s.io", "TLSRoute") => read(value, PolicyObject::TLSRoute),
            ("gateway.networking.k8s.io", "TCPRoute") => read(value, PolicyObject::TCPRoute),
            ("gateway.networking.k8s.io", "GRPCRoute") => read(value, PolicyObject::GRPCRoute),
            _ => return None,
        })
    }
}

/// Objects from the API server, minus what policy never reads (managed fields).
macro_rules! from_watched {
    ($($kind:ident),*) => {$(
        impl From<$kind> for Object {
            fn from(mut object: $kind) -> Self {
                object.metadata.managed_fields = None;
                Object::Policy(PolicyObject::$kind(Arc::new(object)))
            }
        }
    )*};
}

from_watched!(
    Server,
    AuthorizationPolicy,
    MeshTLSAuthentication,
    NetworkAuthentication,
    HTTPLocalRateLimitPolicy,
    EgressNetwork,
    HTTPRoute,
    GRPCRoute,
    TLSRoute,
    TCPRoute
);
