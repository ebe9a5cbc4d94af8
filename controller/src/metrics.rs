//! The controller's Prometheus metrics, served on the admin port's `/metrics`.
//!
//! Names (prefix `mesh_controller_`):
//! - `discovery_events_total{backend,kind,event}`: objects seen by the Kubernetes watchers
//!   (`apply`, `delete`, `relist`) and files seen by the file backend (`kind="file"`, `added`,
//!   `modified`, `deleted`).
//! - `discovery_watch_errors_total{kind}`: Kubernetes watch errors (the watch retries).
//! - `index_objects{kind}`: objects held in the index, by kind.
//! - `file_parse_errors_total`: versions of files that failed to parse.
//! - `files_malformed`: files whose current version does not parse.
//! - `destination_streams_active`: open `Destination.Get` streams.
//! - `destination_streams_total{outcome}`: `Destination.Get` calls by how they began
//!   (`ok`, `not_found`, `invalid_argument`, `unavailable`).
//! - `destination_updates_total{update}`: updates sent (`add`, `remove`, `no_endpoints`).
//! - `destination_update_latency_seconds`: from the backend seeing a change to the update
//!   reaching a stream's send queue.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::objects::Kind;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabels {
    backend: &'static str,
    kind: &'static str,
    event: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpdateLabels {
    update: &'static str,
}

/// Every metric of the controller; cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    discovery_events: Family<EventLabels, Counter>,
    watch_errors: Family<KindLabels, Counter>,
    index_objects: Family<KindLabels, Gauge>,
    file_parse_errors: Counter,
    files_malformed: Gauge,
    streams_active: Gauge,
    streams_total: Family<OutcomeLabels, Counter>,
    updates: Family<UpdateLabels, Counter>,
    update_latency: Histogram,
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
    /// Creates and registers every metric.
    pub fn new() -> Self {
        Self::with_registrations(|_| {})
    }

    /// Creates and registers every metric, plus those `register` adds (the identity CA's, the
    /// policy servers'): they share the `mesh_controller_` prefix and the one `/metrics`.
    pub fn with_registrations(register: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::with_prefix("mesh_controller");
        register(&mut registry);
        let m = Self {
            registry: Arc::new(Registry::default()),
            discovery_events: Family::default(),
            watch_errors: Family::default(),
            index_objects: Family::default(),
            file_parse_errors: Counter::default(),
            files_malformed: Gauge::default(),
            streams_active: Gauge::default(),
            streams_total: Family::default(),
            updates: Family::default(),
            // 100 µs .. ~6.5 s: a change reaches streams in well under a millisecond when idle.
            update_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
        };
        registry.register(
            "discovery_events",
            "Objects or files seen by the discovery backend",
            m.discovery_events.clone(),
        );
        registry.register(
            "discovery_watch_errors",
            "Kubernetes watch errors (the watch retries with backoff)",
            m.watch_errors.clone(),
        );
        registry.register(
            "index_objects",
            "Objects held in the discovery index",
            m.index_objects.clone(),
        );
        registry.register(
            "file_parse_errors",
            "Versions of config files that failed to parse",
            m.file_parse_errors.clone(),
        );
        registry.register(
            "files_malformed",
            "Config files whose current version does not parse",
            m.files_malformed.clone(),
        );
        registry.register(
            "destination_streams_active",
            "Open Destination.Get streams",
            m.streams_active.clone(),
        );
        registry.register(
            "destination_streams",
            "Destination.Get calls by how they began",
            m.streams_total.clone(),
        );
        registry.register(
            "destination_updates",
            "Destination updates sent",
            m.updates.clone(),
        );
        registry.register(
            "destination_update_latency_seconds",
            "Time from the backend seeing a change to the update being sent on a stream",
            m.update_latency.clone(),
        );
        for kind in Kind::ALL {
            m.index_objects
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(0);
        }
        Self {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn file_events(&self, event: &'static str, count: usize) {
        if count > 0 {
            self.discovery_events
                .get_or_create(&EventLabels {
                    backend: "file",
                    kind: "file",
                    event,
                })
                .inc_by(count as u64);
        }
    }

    pub(crate) fn watch_event(&self, kind: Kind, event: &'static str) {
        self.discovery_events
            .get_or_create(&EventLabels {
                backend: "kubernetes",
                kind: kind.as_str(),
                event,
            })
            .inc();
    }

    pub(crate) fn watch_error(&self, kind: Kind) {
        self.watch_errors
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub(crate) fn file_parse_error(&self) {
        self.file_parse_errors.inc();
    }

    pub(crate) fn set_files_malformed(&self, count: usize) {
        self.files_malformed
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_index_sizes(&self, counts: &BTreeMap<Kind, usize>) {
        for (kind, count) in counts {
            self.index_objects
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn stream_started(&self, outcome: &'static str) {
        self.streams_total
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts an open stream until the guard drops.
    pub(crate) fn stream_guard(&self) -> StreamGuard {
        self.streams_active.inc();
        StreamGuard(self.streams_active.clone())
    }

    pub(crate) fn update_sent(&self, update: &'static str) {
        self.updates.get_or_create(&UpdateLabels { update }).inc();
    }

    pub(crate) fn observe_latency(&self, seconds: f64) {
        self.update_latency.observe(seconds);
    }
}

/// Decrements the active stream gauge when the stream ends, however it ends.
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_its_prefix() {
        let m = Metrics::new();
        m.file_events("added", 2);
        m.file_parse_error();
        m.stream_started("ok");
        m.update_sent("add");
        m.observe_latency(0.001);
        let _guard = m.stream_guard();
        let text = m.encode();
        for want in [
            "mesh_controller_discovery_events_total{backend=\"file\",kind=\"file\",event=\"added\"} 2",
            "mesh_controller_index_objects{kind=\"Pod\"} 0",
            "mesh_controller_file_parse_errors_total 1",
            "mesh_controller_files_malformed 0",
            "mesh_controller_destination_streams_active 1",
            "mesh_controller_destination_streams_total{outcome=\"ok\"} 1",
            "mesh_controller_destination_updates_total{update=\"add\"} 1",
            "mesh_controller_destination_update_latency_seconds_count 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
