//! The sidecar injector: the pure pod patch shared by the admission webhook, `meshctl inject`
//! and `meshctl local`, and the webhook server around it.
//!
//! - [`inject()`] / [`inject_template`] add the mesh to a pod or a workload's pod template;
//!   [`uninject`] / [`uninject_template`] remove exactly that again. They do no I/O: the
//!   namespace's annotations and the [`MeshConfig`] are passed in.
//! - [`annotations`] names and validates every annotation injection reads.
//! - [`webhook`] serves the patch as a mutating admission webhook (AdmissionReview v1 over
//!   rustls), with [`metrics`].
//!
//! This crate must not depend on `meshctl`, and the patch functions must never reach the
//! network: callers fetch what they need (e.g. namespace annotations) themselves.

pub mod annotations;
pub mod config;
mod inject;
pub mod metrics;
pub mod webhook;

pub use annotations::{AnnotationError, Source};
pub use config::{ConfigError, InboundPolicy, MeshConfig, VERSION};
pub use inject::{
    IDENTITY_DIR, IDENTITY_TOKEN_AUDIENCE, IDENTITY_TOKEN_FILE, IDENTITY_VOLUME, INIT_CONTAINER,
    InjectError, NEVER_INJECTED_NAMESPACES, Outcome, PROXY_CONTAINER, SkipReason, Workload, inject,
    inject_template, is_injected, uninject, uninject_template,
};
