//! The mesh's sidecar proxy: the data plane.
//!
//! It owns everything a request meets between the application and the network: transparent
//! capture, protocol detection, discovery-driven load balancing, forwarding, metrics and the
//! admin server. It must not link kube or know about Kubernetes objects: everything it learns
//! about the cluster comes from the controller's gRPC APIs (`mesh-proto`).
//!
//! Start reading at `stack.rs` (the HTTP request path of each side), then `outbound.rs` and
//! `inbound.rs` (the connection path), then `app.rs` (startup and drain).

pub mod access_log;
pub mod admin;
pub mod app;
pub mod authz;
pub mod balance;
pub mod capture;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod egress;
pub mod forward;
pub mod gateway;
pub mod http;
pub mod http_metrics;
pub mod hygiene;
pub mod identity;
pub mod idle;
pub mod inbound;
pub mod lifecycle;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod rate_limit;
pub mod ready;
pub mod retry;
pub mod route;
pub mod server;
pub mod stack;
pub mod tap;
pub mod tcp;
pub mod timeout;
pub mod tls;
pub mod trace;
pub mod transport_header;
pub mod workers;
