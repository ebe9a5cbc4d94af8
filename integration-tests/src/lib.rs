//! End-to-end tests of the mesh: real processes on loopback, network-namespace "pods" with
//! real iptables capture, and a real Kubernetes API server. Helpers live here; the tests live
//! in `tests/`. Nothing in the product depends on this crate.

mod binaries;
pub mod cluster;
pub mod http;
pub mod local;
pub mod mesh;
pub mod netns;
pub mod process;

pub use binaries::{bin_path, workspace_root};
