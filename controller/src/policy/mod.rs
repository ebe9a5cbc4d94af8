//! Policy: what each proxy accepts (`InboundPolicies.Watch`) and how it sends
//! (`OutboundPolicies.Watch`).
//!
//! It owns, one module each:
//! - [`crds`]: the `policy.mesh.dev/v1alpha1` CRD types and the CRD YAML generated from them;
//! - [`gateway`]: the subset of Gateway API routes the mesh reads (`HTTPRoute`, `GRPCRoute`,
//!   and for egress `TLSRoute`, `TCPRoute`);
//! - [`kinds`]: [`PolicyObject`](kinds::PolicyObject), those kinds as discovery objects;
//! - [`store`]: the raw objects policy reads (Namespaces, Pods, Services, ServiceAccounts and
//!   the policy kinds), kept by the discovery [`Index`](crate::index::Index) beside its
//!   endpoint views and published as immutable [`PolicyInputs`] snapshots;
//! - [`inbound`]: the pure function snapshot + workload + port -> `InboundServer`;
//! - [`outbound`]: the pure function snapshot + Service port + source -> `OutboundPolicy`,
//!   with [`routes`] (Gateway API rules -> proxy routes) and [`annotations`] (the Service's
//!   `retry.mesh.dev/*`, `timeout.mesh.dev/*`, ... annotations);
//! - [`egress`]: the pure function snapshot + outside address + source -> `OutboundPolicy`
//!   with its `Egress` (the covering `EgressNetwork` and the routes attached to it);
//! - [`server`]: the two Watch servers streaming those functions' results;
//! - [`report`]: invalid routes and annotations in logs, metrics and route status;
//! - [`watch`]: the Kubernetes watchers of the policy kinds (missing CRDs tolerated);
//! - [`metrics`], [`duration`] (Go-style durations of routes, annotations and flags).
//!
//! It must not carry traffic nor decide anything in the servers: every decision is a pure
//! function over a [`PolicyInputs`] snapshot, table-tested beside it.

pub mod annotations;
pub mod crds;
pub mod duration;
pub mod egress;
pub mod gateway;
pub mod inbound;
pub mod kinds;
pub mod metrics;
pub mod outbound;
pub mod report;
pub mod routes;
pub mod server;
pub mod store;
pub mod watch;

pub use store::{NamespaceObjects, PolicyInputs, PolicyStore};
