//! `mesh-bench`: what a meshed hop costs, measured beside a no-proxy baseline and HAProxy in
//! the same run, with real processes on loopback.
//!
//! - [`plan`]: how much to measure (`full`, `quick`, the self-test);
//! - [`topology`]: the processes of each topology (nginx, mesh-proxy pairs with the real
//!   controller, HAProxy pairs) and the controller's YAML;
//! - [`load`]: oha, h2load and a built-in driver, and their figures;
//! - [`measure`]: runs the load, interleaved across topologies, reading `/proc` meanwhile;
//! - [`netns`]: scenario 6, the meshed hop across network namespaces with iptables capture;
//! - [`scale`]: scenario 5, the controller with many services, streams and edits;
//! - [`report`]: BENCHMARKS.md and the JSON.

pub mod backend;
pub mod child;
pub mod load;
pub mod machine;
pub mod measure;
pub mod netns;
pub mod pki;
pub mod plan;
pub mod procfs;
pub mod report;
pub mod scale;
pub mod topology;
