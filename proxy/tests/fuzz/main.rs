//! Fuzz targets for the proxy's parsers and pure decisions, on stable Rust under plain
//! `cargo test` / `cargo nextest`: each target draws random (and structured) inputs for a few
//! seconds and checks properties, not only the absence of panics. `just fuzz` runs them
//! longer; `runner.rs` says how, and why proptest rather than bolero.
//!
//! A failure found here gets a named regression unit test beside the code it broke.

mod runner;

mod config;
mod detect;
mod http;
mod policy;
mod route;
