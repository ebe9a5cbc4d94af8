//! The mirror writer's metrics, per linked cluster.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SecretLabels {
    secret: String,
}

/// Whether each linked cluster is reachable and how many of its Services are mirrored.
#[derive(Debug, Clone, Default)]
pub struct MulticlusterMetrics {
    link_up: Family<ClusterLabels, Gauge>,
    mirrored: Family<ClusterLabels, Gauge>,
    unmirrored: Family<ClusterLabels, Gauge>,
    invalid_links: Family<SecretLabels, Counter>,
}

impl MulticlusterMetrics {
    /// Unregistered metrics; [`register`](Self::register) adds them to the controller's.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the metrics to `registry` (the controller's `mesh_controller_` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "multicluster_link_up",
            "Whether the linked cluster's API server is watched without error (1) or not (0)",
            self.link_up.clone(),
        );
        registry.register(
            "multicluster_mirrored_services",
            "Exported Services of the linked cluster mirrored here",
            self.mirrored.clone(),
        );
        registry.register(
            "multicluster_unmirrored_services",
            "Exported Services of the linked cluster that cannot be mirrored here (see the log)",
            self.unmirrored.clone(),
        );
        registry.register(
            "multicluster_invalid_links",
            "Versions of link Secrets that were not valid links",
            self.invalid_links.clone(),
        );
    }

    pub(crate) fn link_up(&self, cluster: &str, up: bool) {
        self.link_up
            .get_or_create(&labels(cluster))
            .set(i64::from(up));
    }

    pub(crate) fn mirrors(&self, cluster: &str, mirrored: usize, unmirrored: usize) {
        let labels = labels(cluster);
        self.mirrored
            .get_or_create(&labels)
            .set(i64::try_from(mirrored).unwrap_or(i64::MAX));
        self.unmirrored
            .get_or_create(&labels)
            .set(i64::try_from(unmirrored).unwrap_or(i64::MAX));
    }

    pub(crate) fn invalid_link(&self, secret: &str) {
        self.invalid_links
            .get_or_create(&SecretLabels {
                secret: secret.to_owned(),
            })
            .inc();
    }

    /// Drops a cluster that is no longer linked.
    pub(crate) fn forget(&self, cluster: &str) {
        let labels = labels(cluster);
        self.link_up.remove(&labels);
        self.mirrored.remove(&labels);
        self.unmirrored.remove(&labels);
    }
}

fn labels(cluster: &str) -> ClusterLabels {
    ClusterLabels {
        cluster: cluster.to_owned(),
    }
}
