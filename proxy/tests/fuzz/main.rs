//! Fuzz targets for the proxy's parsers and pure decisions, on stable Rust under plain
//! `cargo test` / `cargo nextest`: each target draws random (and structured) inputs for a few
//! seconds and checks properties, not only the absence of panics. `just fuzz` runs them
//! longer. proptest rather than bolero: bolero 0.13 pins indexmap to exactly 2.11.2, which
//! would downgrade the indexmap of the shipped binaries (`runner.rs` says more).
//!
//! A failure found here gets a named regression unit test beside the code it broke.

mod runner;

mod config;
mod detect;
mod http;
mod policy;
mod route;
