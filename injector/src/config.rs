//! [`MeshConfig`]: the mesh-wide settings the pod patch is built from (where the controller
//! is, the trust anchors, the proxy's image, ports and default resources). The webhook fills it
//! from its flags, `meshctl inject` from its own; per-pod overrides come from annotations
//! (see [`crate::annotations`]), never from here.

use std::fmt;
use std::str::FromStr;

/// The version of this crate, written into the `mesh.dev/injected` marker and the default
/// proxy image tag.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The controller's gRPC address inside a cluster installed with the defaults.
pub const DEFAULT_CONTROLLER_ADDR: &str =
    "http://mesh-controller.mesh-system.svc.cluster.local:8086";

/// Everything mesh-wide that goes into an injected pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// The controller's gRPC URL (`MESH_PROXY_CONTROLLER_ADDR`).
    pub controller_addr: String,
    /// The Identity service's URL (`MESH_PROXY_IDENTITY_ADDR`); the controller by default.
    pub identity_addr: String,
    /// The SPIFFE trust domain of the proxies' identities.
    pub trust_domain: String,
    /// The trust anchors (PEM) the proxies verify peers with. When empty, proxies run
    /// without identity (no mTLS): the proxy refuses an identity it cannot verify.
    pub trust_anchors_pem: String,
    /// The proxy image, also used for the `mesh-init` container (`mesh-proxy init`).
    pub proxy_image: String,
    /// The uid the proxy runs as; `mesh-init` exempts its traffic from capture.
    pub proxy_uid: i64,
    /// The proxy's inbound port.
    pub inbound_port: u16,
    /// The proxy's outbound port.
    pub outbound_port: u16,
    /// The proxy's admin port (probes, metrics).
    pub admin_port: u16,
    /// The inbound policy of ports no Server selects.
    pub default_inbound_policy: InboundPolicy,
    /// The proxy's log filter.
    pub proxy_log_level: String,
    /// Default proxy resources (Kubernetes quantities); `None` leaves the field unset.
    pub proxy_cpu_request: Option<String>,
    /// See [`MeshConfig::proxy_cpu_request`].
    pub proxy_cpu_limit: Option<String>,
    /// See [`MeshConfig::proxy_cpu_request`].
    pub proxy_memory_request: Option<String>,
    /// See [`MeshConfig::proxy_cpu_request`].
    pub proxy_memory_limit: Option<String>,
    /// Whether the API server runs native sidecars (Kubernetes 1.29 or newer): the proxy is
    /// then an init container with `restartPolicy: Always`, so apps start after it is ready
    /// and Jobs can finish. Otherwise it is the first ordinary container.
    pub native_sidecars: bool,
    /// The value of the `mesh.dev/injected` marker.
    pub version: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            controller_addr: DEFAULT_CONTROLLER_ADDR.to_owned(),
            identity_addr: DEFAULT_CONTROLLER_ADDR.to_owned(),
            trust_domain: "cluster.local".to_owned(),
            trust_anchors_pem: String::new(),
            proxy_image: format!("ghcr.io/mesh/proxy:{VERSION}"),
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            default_inbound_policy: InboundPolicy::AllUnauthenticated,
            proxy_log_level: "info".to_owned(),
            // Small requests so a meshed pod still schedules on a busy node; no limits by
            // default, so an annotated request can never fall above a default limit.
            proxy_cpu_request: Some("100m".to_owned()),
            proxy_cpu_limit: None,
            proxy_memory_request: Some("20Mi".to_owned()),
            proxy_memory_limit: None,
            native_sidecars: false,
            version: VERSION.to_owned(),
        }
    }
}

/// A [`MeshConfig`] value that cannot work, naming the setting (as the webhook's flag) and
/// the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {value:?}: {reason}")]
pub struct ConfigError {
    /// The setting, named like its `mesh-injector` flag.
    pub setting: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

/// The namespace and ServiceAccount the controller runs as: its SPIFFE ID is the only one
/// the proxies serve tap to (the controller's `tap::tls` signs itself that identity).
pub const CONTROLLER_SERVICE_ACCOUNT: (&str, &str) = ("mesh-system", "mesh-controller");

impl MeshConfig {
    /// The controller's SPIFFE ID in this mesh's trust domain (`MESH_PROXY_TAP_IDENTITY`).
    pub fn controller_identity(&self) -> String {
        let (namespace, account) = CONTROLLER_SERVICE_ACCOUNT;
        format!("spiffe://{}/ns/{namespace}/sa/{account}", self.trust_domain)
    }

    /// Checks what annotations are checked for, once, at start: quantities, a request not
    /// above its limit, the log filter, ports, URLs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let error = |setting, value: &dyn fmt::Display, reason: &str| ConfigError {
            setting,
            value: value.to_string(),
            reason: reason.to_owned(),
        };
        for (setting, url) in [
            ("controller-addr", &self.controller_addr),
            ("identity-addr", &self.identity_addr),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(error(setting, url, "expected a URL like http://host:8086"));
            }
        }
        if self.trust_domain.is_empty() || self.trust_domain.contains(['/', ' ']) {
            return Err(error(
                "trust-domain",
                &self.trust_domain,
                "expected a domain like cluster.local",
            ));
        }
        if self.proxy_image.trim().is_empty() || self.proxy_image.contains(char::is_whitespace) {
            return Err(error(
                "proxy-image",
                &self.proxy_image,
                "not an image reference",
            ));
        }
        if self.proxy_uid < 0 {
            return Err(error("proxy-uid", &self.proxy_uid, "a uid is not negative"));
        }
        let ports = [
            ("proxy-inbound-port", self.inbound_port),
            ("proxy-outbound-port", self.outbound_port),
            ("proxy-admin-port", self.admin_port),
        ];
        for (index, (setting, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return Err(error(setting, port, "port 0 is not a port"));
            }
            if ports[..index].iter().any(|(_, other)| other == port) {
                return Err(error(setting, port, "the proxy's ports must differ"));
            }
        }
        crate::annotations::check_log_level(&self.proxy_log_level)
            .map_err(|reason| error("proxy-log-level", &self.proxy_log_level, &reason))?;
        for (resource, request, limit) in [
            (
                ("proxy-cpu-request", "proxy-cpu-limit"),
                &self.proxy_cpu_request,
                &self.proxy_cpu_limit,
            ),
            (
                ("proxy-memory-request", "proxy-memory-limit"),
                &self.proxy_memory_request,
                &self.proxy_memory_limit,
            ),
        ] {
            let quantity = |setting, text: &Option<String>| {
                text.as_deref()
                    .map(|text| {
                        crate::annotations::parse_quantity(text.trim()).ok_or_else(|| {
                            error(
                                setting,
                                &text,
                                "not a Kubernetes quantity like 100m, 0.5, 64Mi or 1Gi",
                            )
                        })
                    })
                    .transpose()
            };
            let request_value = quantity(resource.0, request)?;
            let limit_value = quantity(resource.1, limit)?;
            if let (Some(request_value), Some(limit_value)) = (request_value, limit_value)
                && request_value > limit_value
            {
                return Err(error(
                    resource.0,
                    &request.as_deref().unwrap_or_default(),
                    &format!(
                        "is above {} {:?}",
                        resource.1,
                        limit.as_deref().unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Who may call a port that no Server selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundPolicy {
    /// Anyone, meshed or not.
    AllUnauthenticated,
    /// Any meshed client, from any cluster.
    AllAuthenticated,
    /// Any meshed client of this cluster.
    ClusterAuthenticated,
    /// Nobody.
    Deny,
    /// Anyone, but denials are logged and counted as if the policy were enforced.
    Audit,
}

impl InboundPolicy {
    /// Every policy, in the order of the documentation.
    pub const ALL: [InboundPolicy; 5] = [
        InboundPolicy::AllUnauthenticated,
        InboundPolicy::AllAuthenticated,
        InboundPolicy::ClusterAuthenticated,
        InboundPolicy::Deny,
        InboundPolicy::Audit,
    ];

    /// The annotation and environment form, e.g. `all-unauthenticated`.
    pub fn as_str(self) -> &'static str {
        match self {
            InboundPolicy::AllUnauthenticated => "all-unauthenticated",
            InboundPolicy::AllAuthenticated => "all-authenticated",
            InboundPolicy::ClusterAuthenticated => "cluster-authenticated",
            InboundPolicy::Deny => "deny",
            InboundPolicy::Audit => "audit",
        }
    }
}

impl fmt::Display for InboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is not one of [`InboundPolicy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an inbound policy (all-unauthenticated, all-authenticated, cluster-authenticated, deny or audit)"
)]
pub struct UnknownInboundPolicy(pub String);

impl FromStr for InboundPolicy {
    type Err = UnknownInboundPolicy;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        InboundPolicy::ALL
            .into_iter()
            .find(|policy| policy.as_str() == text)
            .ok_or_else(|| UnknownInboundPolicy(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_through_their_names() {
        for policy in InboundPolicy::ALL {
            assert_eq!(policy.as_str().parse::<InboundPolicy>(), Ok(policy));
        }
        assert!("allow".parse::<InboundPolicy>().is_err());
    }

    #[test]
    fn validate_names_the_bad_setting() {
        assert_eq!(MeshConfig::default().validate(), Ok(()));
        let cases: [(MeshConfig, &str); 7] = [
            (
                MeshConfig {
                    controller_addr: "mesh-controller:8086".into(),
                    ..MeshConfig::default()
                },
                "controller-addr",
            ),
            (
                MeshConfig {
                    proxy_cpu_request: Some("lots".into()),
                    ..MeshConfig::default()
                },
                "proxy-cpu-request",
            ),
            (
                MeshConfig {
                    proxy_memory_limit: Some("10Mi".into()),
                    ..MeshConfig::default()
                },
                "proxy-memory-request",
            ),
            (
                MeshConfig {
                    proxy_log_level: "loud".into(),
                    ..MeshConfig::default()
                },
                "proxy-log-level",
            ),
            (
                MeshConfig {
                    admin_port: 4143,
                    ..MeshConfig::default()
                },
                "proxy-admin-port",
            ),
            (
                MeshConfig {
                    proxy_image: "".into(),
                    ..MeshConfig::default()
                },
                "proxy-image",
            ),
            (
                MeshConfig {
                    trust_domain: "a/b".into(),
                    ..MeshConfig::default()
                },
                "trust-domain",
            ),
        ];
        for (config, setting) in cases {
            let error = config.validate().expect_err(setting);
            assert_eq!(error.setting, setting, "{error}");
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = MeshConfig::default();
        assert_eq!(
            config.controller_addr,
            "http://mesh-controller.mesh-system.svc.cluster.local:8086"
        );
        assert_eq!(config.identity_addr, config.controller_addr);
        assert_eq!(
            (
                config.inbound_port,
                config.outbound_port,
                config.admin_port,
                config.proxy_uid
            ),
            (4143, 4140, 4191, 2102)
        );
        assert_eq!(config.proxy_image, format!("ghcr.io/mesh/proxy:{VERSION}"));
        assert!(!config.native_sidecars);
    }
}
