//! Services of linked clusters, mirrored here.
//!
//! A link ([`link`]) is a Secret in the control plane's namespace holding a read-only
//! kubeconfig for another cluster (`meshctl multicluster link` makes it there). For each link,
//! [`sync`] watches that cluster's Services labelled `mesh.dev/exported=true` and writes their
//! mirrors here: `<service>-<cluster>`, a real Service (so DNS and every client work) with
//! EndpointSlices that carry the remote workloads' identities ([`mirror`]). Discovery then
//! serves a mirror like any Service; the proxy verifies the remote workload's identity. This
//! module never changes the remote cluster and never touches a local object that is not one of
//! its mirrors.

pub mod link;
pub mod metrics;
pub mod mirror;
pub mod sync;

pub use link::Link;
pub use metrics::MulticlusterMetrics;
pub use sync::MulticlusterSettings;
