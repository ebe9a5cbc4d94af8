//! The mesh's sidecar proxy: the data plane.
//!
//! It owns everything a request meets between the application and the network: transparent
//! capture, protocol detection, discovery-driven load balancing, forwarding, metrics and the
//! admin server. It must not link kube or know about Kubernetes objects: everything it learns
//! about the cluster comes from the controller's gRPC APIs (`mesh-proto`).

pub mod balance;
pub mod capture;
