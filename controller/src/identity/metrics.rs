//! The identity service's Prometheus metrics. They are registered into the controller's
//! registry by [`IdentityMetrics::register`], so with the controller's `mesh_controller` prefix
//! they read:
//! - `mesh_controller_identity_certify_total{result}`: `Certify` calls by result: `ok`,
//!   `unauthenticated` (bad, expired or unknown token), `denied` (token for another identity),
//!   `invalid` (malformed identity or CSR), `error` (the CA or the token check failed).
//! - `mesh_controller_identity_issuer_expiry_timestamp_seconds`: when the issuer certificate in
//!   use expires, in Unix seconds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// How a `Certify` call ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertifyResult {
    /// A leaf was signed.
    Ok,
    /// The token proved no identity.
    Unauthenticated,
    /// The token proved another identity than the one asked for.
    Denied,
    /// The identity or the CSR is malformed.
    Invalid,
    /// The CA or the token check failed; the caller should retry.
    Error,
}

impl CertifyResult {
    /// Every result, so each is exported (at zero) before it happens.
    pub const ALL: [CertifyResult; 5] = [
        CertifyResult::Ok,
        CertifyResult::Unauthenticated,
        CertifyResult::Denied,
        CertifyResult::Invalid,
        CertifyResult::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CertifyResult::Ok => "ok",
            CertifyResult::Unauthenticated => "unauthenticated",
            CertifyResult::Denied => "denied",
            CertifyResult::Invalid => "invalid",
            CertifyResult::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The identity service's metrics; cheap to clone (all handles are shared).
#[derive(Clone, Default)]
pub struct IdentityMetrics {
    certify: Family<ResultLabels, Counter>,
    pub(super) issuer_expiry: Gauge,
}

impl std::fmt::Debug for IdentityMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityMetrics").finish_non_exhaustive()
    }
}

impl IdentityMetrics {
    /// Metrics not yet registered anywhere.
    pub fn new() -> Self {
        let metrics = Self::default();
        for result in CertifyResult::ALL {
            let _ = metrics.certify.get_or_create(&ResultLabels {
                result: result.as_str(),
            });
        }
        metrics
    }

    /// Registers every metric into `registry` (names above, after the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "identity_certify",
            "Identity.Certify calls by result",
            self.certify.clone(),
        );
        registry.register(
            "identity_issuer_expiry_timestamp_seconds",
            "When the identity issuer certificate in use expires, in Unix seconds",
            self.issuer_expiry.clone(),
        );
    }

    /// Counts one `Certify` call.
    pub fn count(&self, result: CertifyResult) {
        self.certify
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
    }

    /// How many `Certify` calls ended with `result` (for tests and `meshctl check`).
    pub fn certify_count(&self, result: CertifyResult) -> u64 {
        self.certify
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .get()
    }

    /// The issuer expiry exported, in Unix seconds.
    pub fn issuer_expiry_seconds(&self) -> i64 {
        self.issuer_expiry.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_under_the_registry_prefix() {
        let metrics = IdentityMetrics::new();
        let mut registry = Registry::with_prefix("mesh_controller");
        metrics.register(&mut registry);
        metrics.count(CertifyResult::Ok);
        metrics.count(CertifyResult::Denied);
        metrics.issuer_expiry.set(1_900_000_000);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for want in [
            "mesh_controller_identity_certify_total{result=\"ok\"} 1",
            "mesh_controller_identity_certify_total{result=\"denied\"} 1",
            "mesh_controller_identity_certify_total{result=\"unauthenticated\"} 0",
            "mesh_controller_identity_certify_total{result=\"invalid\"} 0",
            "mesh_controller_identity_certify_total{result=\"error\"} 0",
            "mesh_controller_identity_issuer_expiry_timestamp_seconds 1900000000",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
