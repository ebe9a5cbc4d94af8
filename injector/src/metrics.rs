//! The webhook's Prometheus metrics: admission requests by result, and how long answering
//! took. Only counting lives here; the server decides what to count.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What the webhook answered.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum AdmissionResult {
    /// Allowed with the mesh patched in.
    Injected,
    /// Allowed unchanged (not enabled, disabled, already injected, not a pod creation, ...).
    Skipped,
    /// Refused: a bad annotation or a pod injection cannot handle.
    Denied,
    /// Allowed unchanged because the webhook could not do its work (e.g. the namespace could
    /// not be read); the pod runs without the mesh.
    Error,
    /// The request was not an AdmissionReview.
    Invalid,
}

impl AdmissionResult {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AdmissionResult::Injected => "injected",
            AdmissionResult::Skipped => "skipped",
            AdmissionResult::Denied => "denied",
            AdmissionResult::Error => "error",
            AdmissionResult::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The webhook's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<ResultLabels, Counter>,
    latency: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with the injector's metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh_injector");
        let requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "Admission requests answered, by result",
            requests.clone(),
        );
        // 0.5 ms .. ~4 s: an answer is a few milliseconds unless the namespace read is slow.
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "admission_duration_seconds",
            "Time to answer one admission request",
            latency.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            latency,
        }
    }

    /// Counts one answered request.
    pub fn observe(&self, result: AdmissionResult, elapsed: Duration) {
        self.requests
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// The number of requests answered with `result` so far.
    pub fn count(&self, result: AdmissionResult) -> u64 {
        self.requests
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .get()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
