//! Policy: what each proxy accepts (`InboundPolicies.Watch`) and how it sends
//! (`OutboundPolicies.Watch`).
//!
//! It owns, one module each:
//! - [`store`]: the raw objects policy reads (Namespaces, Pods, Services, ServiceAccounts and
//!   the policy kinds), kept by the discovery [`Index`](crate::index::Index) beside its
//!   endpoint views and published as immutable [`PolicyInputs`] snapshots;
//! - [`crds`]: the `policy.mesh.dev/v1alpha1` CRD types and the CRD YAML generated from them;
//! - [`gateway`]: the subset of Gateway API `HTTPRoute`/`GRPCRoute` the mesh reads;
//! - [`duration`]: Go-style durations (`10s`, `1h30m`) of routes, annotations and flags.
//!
//! It must not carry traffic nor decide anything in the servers: every decision is a pure
//! function over a [`PolicyInputs`] snapshot, table-tested beside it.

pub mod crds;
pub mod duration;
pub mod gateway;
pub mod store;

pub use store::{NamespaceObjects, PolicyInputs, PolicyStore};
