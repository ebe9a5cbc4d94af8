//! The install's values: the chart's `values.yaml` (compiled in, so `meshctl install` and the
//! Helm chart share one set of defaults), overlaid with a user's values file and flags, then
//! checked once into [`Values`].

use serde::Deserialize;
use serde_json::Value;

/// The chart's `values.yaml`: the defaults of every install.
pub const DEFAULT_VALUES_YAML: &str = include_str!("../../../charts/mesh/values.yaml");

/// A problem with the values, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ValuesError {
    #[error("the values are not valid YAML: {0}")]
    Yaml(String),
    #[error("the values do not fit the chart: {0}")]
    Shape(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// Everything an install is made from. Field names are the chart's (camelCase in YAML).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Values {
    pub namespace: String,
    pub trust_domain: String,
    pub cluster_domain: String,
    pub image: Images,
    pub ha: bool,
    pub identity: Identity,
    pub webhook: Webhook,
    pub proxy: Proxy,
    pub egress: Egress,
    pub multicluster: Multicluster,
    pub controller_log_level: String,
    pub dashboards: bool,
}

/// Traffic leaving the mesh.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Egress {
    pub default_policy: String,
}

/// Linked clusters' Services, mirrored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Multicluster {
    pub enabled: bool,
    pub gateway: MulticlusterGateway,
}

/// The multicluster gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MulticlusterGateway {
    pub enabled: bool,
    pub service_type: String,
}

/// Where the images come from: `<registry>/<name>:<tag>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Images {
    pub registry: String,
    pub tag: String,
    pub pull_policy: String,
}

impl Images {
    /// The image of `name` (`controller`, `injector` or `proxy`).
    pub fn of(&self, name: &str) -> String {
        format!(
            "{}/{name}:{}",
            self.registry.trim_end_matches('/'),
            self.tag
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    #[serde(rename = "trustAnchorsPEM")]
    pub trust_anchors_pem: String,
    pub issuer: CertAndKey,
    pub leaf_lifetime: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertAndKey {
    #[serde(rename = "crtPEM")]
    pub crt_pem: String,
    #[serde(rename = "keyPEM")]
    pub key_pem: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Webhook {
    #[serde(rename = "caBundlePEM")]
    pub ca_bundle_pem: String,
    #[serde(rename = "crtPEM")]
    pub crt_pem: String,
    #[serde(rename = "keyPEM")]
    pub key_pem: String,
    pub failure_policy: String,
    pub timeout_seconds: i64,
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Proxy {
    pub default_inbound_policy: String,
    pub log_level: String,
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
}

/// The chart's defaults as a YAML tree, to overlay.
pub fn default_tree() -> Result<Value, ValuesError> {
    serde_saphyr::from_str(DEFAULT_VALUES_YAML).map_err(|e| ValuesError::Yaml(e.to_string()))
}

/// Parses a user's values file (YAML) into a tree to overlay on the defaults.
pub fn parse_tree(yaml: &str) -> Result<Value, ValuesError> {
    let tree: Value = serde_saphyr::from_str(yaml).map_err(|e| ValuesError::Yaml(e.to_string()))?;
    match tree {
        Value::Object(_) | Value::Null => Ok(tree),
        other => Err(ValuesError::Shape(format!(
            "a values file is a mapping, not {other}"
        ))),
    }
}

/// Overlays `top` on `base` the way Helm merges values files: mappings merge key by key,
/// anything else replaces.
pub fn overlay(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(base), Value::Object(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(slot) => overlay(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (_, Value::Null) => {}
        (slot, value) => *slot = value,
    }
}

impl Values {
    /// Checks a values tree into [`Values`]: unknown fields, wrong types and bad settings are
    /// refused with the field's name. Certificates are checked elsewhere (they may still be
    /// generated).
    pub fn from_tree(tree: Value) -> Result<Values, ValuesError> {
        let values: Values =
            serde_json::from_value(tree).map_err(|e| ValuesError::Shape(e.to_string()))?;
        values.validate()?;
        Ok(values)
    }

    fn validate(&self) -> Result<(), ValuesError> {
        let invalid = |field, message: String| Err(ValuesError::Invalid { field, message });
        if !matches!(self.webhook.failure_policy.as_str(), "Ignore" | "Fail") {
            return invalid(
                "webhook.failurePolicy",
                format!(
                    "{:?} is neither Ignore nor Fail",
                    self.webhook.failure_policy
                ),
            );
        }
        if !(1..=30).contains(&self.webhook.timeout_seconds) {
            return invalid(
                "webhook.timeoutSeconds",
                format!("{} is not within 1-30", self.webhook.timeout_seconds),
            );
        }
        if !matches!(
            self.image.pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            return invalid(
                "image.pullPolicy",
                format!(
                    "{:?} is not Always, IfNotPresent or Never",
                    self.image.pull_policy
                ),
            );
        }
        if let Err(e) = self
            .proxy
            .default_inbound_policy
            .parse::<mesh_injector::InboundPolicy>()
        {
            return invalid("proxy.defaultInboundPolicy", e.to_string());
        }
        if !matches!(self.egress.default_policy.as_str(), "allow" | "deny") {
            return invalid(
                "egress.defaultPolicy",
                format!("{:?} is neither allow nor deny", self.egress.default_policy),
            );
        }
        let service_type = &self.multicluster.gateway.service_type;
        if !matches!(
            service_type.as_str(),
            "LoadBalancer" | "NodePort" | "ClusterIP"
        ) {
            return invalid(
                "multicluster.gateway.serviceType",
                format!("{service_type:?} is none of LoadBalancer, NodePort, ClusterIP"),
            );
        }
        if self.namespace.is_empty() {
            return invalid("namespace", "is empty".to_owned());
        }
        // Image references: a registry path of host, port and path characters; a tag of
        // letters, digits, `_`, `.` and `-` (the OCI distribution spec's grammar).
        let registry_ok = |r: &str| {
            !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/' | ':'))
        };
        if !registry_ok(&self.image.registry) {
            return invalid(
                "image.registry",
                format!(
                    "{:?} is not a registry like ghcr.io/mesh or localhost/mesh",
                    self.image.registry
                ),
            );
        }
        let tag_ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if !tag_ok(&self.image.tag) {
            return invalid(
                "image.tag",
                format!("{:?} is not an image tag", self.image.tag),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values_with(yaml: &str) -> Result<Values, ValuesError> {
        let mut tree = default_tree().expect("the chart's values parse");
        overlay(&mut tree, parse_tree(yaml).expect("test YAML parses"));
        Values::from_tree(tree)
    }

    #[test]
    fn images_are_the_registrys_at_this_version_by_default() {
        let values = values_with("{}").expect("defaults are valid");
        assert_eq!(
            values.image.tag,
            env!("CARGO_PKG_VERSION"),
            "bump values.yaml's image.tag"
        );
        assert_eq!(
            values.image.of("proxy"),
            format!("ghcr.io/mesh/proxy:{}", env!("CARGO_PKG_VERSION"))
        );
        let local = values_with("image: {registry: localhost/mesh/, tag: dev}").expect("valid");
        assert_eq!(
            local.image.of("controller"),
            "localhost/mesh/controller:dev"
        );
        for (yaml, field) in [
            ("image: {registry: ''}", "image.registry"),
            ("image: {registry: 'my registry'}", "image.registry"),
            ("image: {tag: 'v1 beta'}", "image.tag"),
            ("image: {tag: ''}", "image.tag"),
        ] {
            let error = values_with(yaml).expect_err(yaml).to_string();
            assert!(error.starts_with(field), "{yaml}: {error}");
        }
    }

    #[test]
    fn the_charts_defaults_are_valid() {
        let values = values_with("{}").expect("defaults are valid");
        assert_eq!(values.namespace, "mesh-system");
        assert!(!values.ha);
        assert_eq!(values.webhook.failure_policy, "Ignore");
    }

    #[test]
    fn an_overlay_merges_mappings_and_replaces_the_rest() {
        let values = values_with("ha: true\nproxy: {logLevel: debug}\n").expect("valid");
        assert!(values.ha);
        assert_eq!(values.proxy.log_level, "debug");
        // Siblings of an overlaid key keep their defaults.
        assert_eq!(values.proxy.cpu_request, "100m");
    }

    #[test]
    fn bad_values_name_the_field() {
        let error = values_with("webhook: {failurePolicy: Sometimes}").expect_err("refused");
        assert!(
            error.to_string().contains("webhook.failurePolicy"),
            "{error}"
        );
        let error = values_with("proxy: {defaultInboundPolicy: everyone}").expect_err("refused");
        assert!(
            error.to_string().contains("proxy.defaultInboundPolicy"),
            "{error}"
        );
        let error = values_with("proxyy: {}").expect_err("refused");
        assert!(error.to_string().contains("proxyy"), "{error}");
        let error = values_with("ha: maybe").expect_err("refused");
        assert!(
            error.to_string().contains("ha") || error.to_string().contains("bool"),
            "{error}"
        );
    }
}
