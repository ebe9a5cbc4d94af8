//! The policy servers' metrics, registered into the controller's registry (prefix
//! `mesh_controller_`):
//! - `policy_streams_active{api}`: open `InboundPolicies.Watch` (`api="inbound"`) and
//!   `OutboundPolicies.Watch` (`api="outbound"`) streams;
//! - `policy_updates_total{api}`: policies sent on them;
//! - `policy_invalid_objects{kind}`: routes and Services whose current version is invalid (the
//!   last valid policy keeps being served), and AuthorizationPolicies nobody can meet;
//! - `policy_invalid_total{kind}`: invalid versions seen.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ApiLabels {
    api: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The policy metrics; cheap to clone.
#[derive(Clone, Default)]
pub struct PolicyMetrics {
    streams_active: Family<ApiLabels, Gauge>,
    updates: Family<ApiLabels, Counter>,
    invalid_objects: Family<KindLabels, Gauge>,
    invalid_total: Family<KindLabels, Counter>,
}

impl std::fmt::Debug for PolicyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyMetrics").finish_non_exhaustive()
    }
}

/// Decrements a stream gauge when the stream's task ends.
pub(crate) struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl PolicyMetrics {
    /// Metrics not yet registered anywhere.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "policy_streams_active",
            "Open policy watch streams",
            self.streams_active.clone(),
        );
        registry.register(
            "policy_updates",
            "Policies sent on watch streams",
            self.updates.clone(),
        );
        registry.register(
            "policy_invalid_objects",
            "Routes and Services whose current version is invalid (the last valid policy is served), and AuthorizationPolicies nobody can meet",
            self.invalid_objects.clone(),
        );
        registry.register(
            "policy_invalid",
            "Invalid versions of routes and Services seen",
            self.invalid_total.clone(),
        );
    }

    pub(crate) fn stream_guard(&self, api: &'static str) -> StreamGuard {
        let gauge = self
            .streams_active
            .get_or_create(&ApiLabels { api })
            .clone();
        gauge.inc();
        StreamGuard(gauge)
    }

    pub(crate) fn update_sent(&self, api: &'static str) {
        self.updates.get_or_create(&ApiLabels { api }).inc();
    }

    pub(crate) fn invalid_seen(&self, kind: &'static str) {
        self.invalid_total.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn set_invalid(&self, kind: &'static str, count: usize) {
        self.invalid_objects
            .get_or_create(&KindLabels { kind })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The number of invalid versions seen of `kind` (tests).
    pub fn invalid_count(&self, kind: &'static str) -> u64 {
        self.invalid_total.get_or_create(&KindLabels { kind }).get()
    }
}
