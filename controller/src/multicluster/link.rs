//! A link to another cluster: a Secret in the control plane's namespace that holds a kubeconfig
//! for that cluster's API server (read-only), its name, and its trust domain. `meshctl
//! multicluster link` writes it; this module reads and validates it, by field.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;

use crate::endpoints::GatewayInfo;

/// The label that makes a Secret a link, valued with the linked cluster's name.
pub const LABEL_LINK: &str = "multicluster.mesh.dev/cluster-name";
/// The Secret type of a link.
pub const SECRET_TYPE: &str = "mesh.dev/remote-kubeconfig";
/// The key of the kubeconfig in a link's data.
pub const KEY_KUBECONFIG: &str = "kubeconfig";
/// The linked cluster's trust domain; without it, the local one (clusters share it by
/// default, see ARCHITECTURE.md).
pub const ANNOTATION_TRUST_DOMAIN: &str = "multicluster.mesh.dev/trust-domain";

/// The linked cluster's gateway (`IP:port`), when its network is not routed to from here.
pub const ANNOTATION_GATEWAY: &str = "multicluster.mesh.dev/gateway";
/// The identity that gateway proves.
pub const ANNOTATION_GATEWAY_IDENTITY: &str = "multicluster.mesh.dev/gateway-identity";

/// The longest cluster name: a mirror is named `<service>-<cluster>` and must stay a DNS label,
/// so the name leaves most of its 63 characters to the Service's.
pub const MAX_CLUSTER_NAME: usize = 20;

/// One link, read from its Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The Secret's name.
    pub secret: String,
    /// The linked cluster's name: the suffix of its mirrors.
    pub cluster: String,
    /// The trust domain of the linked cluster's identities.
    pub trust_domain: String,
    /// Its kubeconfig, as YAML.
    pub kubeconfig: String,
    /// Its gateway, when its pods are reached through one (else directly: flat networks).
    pub gateway: Option<Arc<GatewayInfo>>,
}

/// Why a Secret labelled as a link is not a usable one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The cluster name is not a short DNS label.
    #[error(
        "label {LABEL_LINK}: {0:?} is not a cluster name (lowercase letters, digits and '-', \
         at most {MAX_CLUSTER_NAME} characters, starting and ending with a letter or digit)"
    )]
    ClusterName(String),
    /// The kubeconfig is missing or not UTF-8 YAML of a kubeconfig.
    #[error("data.{KEY_KUBECONFIG}: {0}")]
    Kubeconfig(String),
    /// The trust domain annotation is not a trust domain.
    #[error("annotation {ANNOTATION_TRUST_DOMAIN}: {0:?} is not a trust domain")]
    TrustDomain(String),
    /// The gateway annotations are not an address and an identity.
    #[error("annotation {0}: {1}")]
    Gateway(&'static str, String),
}

/// Whether `name` can name a cluster.
pub fn is_cluster_name(name: &str) -> bool {
    is_dns_label(name) && name.len() <= MAX_CLUSTER_NAME
}

/// An RFC 1123 label: what Kubernetes accepts as a Service's name.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

impl Link {
    /// Reads a link from its Secret; `local_trust_domain` when it names none.
    pub fn from_secret(secret: &Secret, local_trust_domain: &str) -> Result<Link, LinkError> {
        let empty = BTreeMap::new();
        let labels = secret.metadata.labels.as_ref().unwrap_or(&empty);
        let annotations = secret.metadata.annotations.as_ref().unwrap_or(&empty);
        let cluster = labels.get(LABEL_LINK).cloned().unwrap_or_default();
        if !is_cluster_name(&cluster) {
            return Err(LinkError::ClusterName(cluster));
        }
        let trust_domain = match annotations.get(ANNOTATION_TRUST_DOMAIN) {
            None => local_trust_domain.to_owned(),
            Some(domain) if is_trust_domain(domain) => domain.clone(),
            Some(domain) => return Err(LinkError::TrustDomain(domain.clone())),
        };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KEY_KUBECONFIG))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(KEY_KUBECONFIG))
                    .map(|s| s.clone().into_bytes())
            })
            .ok_or_else(|| LinkError::Kubeconfig("missing".to_owned()))?;
        let kubeconfig = String::from_utf8(bytes)
            .map_err(|_| LinkError::Kubeconfig("not UTF-8 text".to_owned()))?;
        kube::config::Kubeconfig::from_yaml(&kubeconfig)
            .map_err(|e| LinkError::Kubeconfig(format!("not a kubeconfig: {e}")))?;
        let gateway = match annotations.get(ANNOTATION_GATEWAY) {
            None => None,
            Some(addr) => {
                let addr = addr.parse().map_err(|_| {
                    LinkError::Gateway(ANNOTATION_GATEWAY, format!("{addr:?} is not IP:port"))
                })?;
                let identity = annotations
                    .get(ANNOTATION_GATEWAY_IDENTITY)
                    .filter(|id| id.starts_with("spiffe://"))
                    .ok_or_else(|| {
                        LinkError::Gateway(
                            ANNOTATION_GATEWAY_IDENTITY,
                            "a gateway needs the SPIFFE ID it proves".to_owned(),
                        )
                    })?;
                Some(Arc::new(GatewayInfo {
                    addr,
                    identity: Arc::from(identity.as_str()),
                    cluster: Arc::from(cluster.as_str()),
                }))
            }
        };
        Ok(Link {
            secret: secret.metadata.name.clone().unwrap_or_default(),
            cluster,
            trust_domain,
            kubeconfig,
            gateway,
        })
    }
}

impl Link {
    /// A client of the linked cluster's API server, with the link's credentials.
    pub async fn client(&self) -> Result<kube::Client, String> {
        let kubeconfig =
            kube::config::Kubeconfig::from_yaml(&self.kubeconfig).map_err(|e| e.to_string())?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        kube::Client::try_from(config).map_err(|e| e.to_string())
    }
}

/// A SPIFFE trust domain: lowercase letters, digits, '.', '-' and '_'.
fn is_trust_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 255
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: east\n  \
        cluster: {server: 'https://127.0.0.1:6443'}\nusers:\n- name: reader\n  user: {token: t}\n\
        contexts:\n- name: east\n  context: {cluster: east, user: reader}\ncurrent-context: east\n";

    fn with_annotations(mut secret: Secret, pairs: &[(&str, &str)]) -> Secret {
        let annotations = secret
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new);
        for (k, v) in pairs {
            annotations.insert((*k).to_owned(), (*v).to_owned());
        }
        secret
    }

    fn secret(cluster: &str, domain: Option<&str>, kubeconfig: Option<&[u8]>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("cluster-east".to_owned()),
                labels: Some([(LABEL_LINK.to_owned(), cluster.to_owned())].into()),
                annotations: domain
                    .map(|d| [(ANNOTATION_TRUST_DOMAIN.to_owned(), d.to_owned())].into()),
                ..Default::default()
            },
            data: kubeconfig.map(|k| [(KEY_KUBECONFIG.to_owned(), ByteString(k.to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn links_are_read_and_each_bad_field_is_named() {
        let link = Link::from_secret(&secret("east", None, Some(KUBECONFIG.as_bytes())), "local")
            .expect("a valid link");
        assert_eq!(link.cluster, "east");
        assert_eq!(
            link.trust_domain, "local",
            "the local trust domain by default"
        );
        assert_eq!(link.secret, "cluster-east");
        let own = Link::from_secret(
            &secret("east", Some("east.example"), Some(KUBECONFIG.as_bytes())),
            "local",
        );
        assert_eq!(own.map(|l| l.trust_domain).as_deref(), Ok("east.example"));

        assert_eq!(link.gateway, None, "flat by default");
        let gatewayed = Link::from_secret(
            &with_annotations(
                secret("east", None, Some(KUBECONFIG.as_bytes())),
                &[
                    (ANNOTATION_GATEWAY, "192.0.2.7:4143"),
                    (
                        ANNOTATION_GATEWAY_IDENTITY,
                        "spiffe://cluster.local/ns/mesh-system/sa/mesh-gateway",
                    ),
                ],
            ),
            "local",
        )
        .expect("a link through a gateway");
        let gateway = gatewayed.gateway.expect("a gateway");
        assert_eq!(gateway.addr.to_string(), "192.0.2.7:4143");

        let valid = || secret("east", None, Some(KUBECONFIG.as_bytes()));
        let cases: [(Secret, &str); 8] = [
            (
                with_annotations(valid(), &[(ANNOTATION_GATEWAY, "gateway.example:4143")]),
                "annotation multicluster.mesh.dev/gateway: \"gateway.example:4143\" is not IP:port",
            ),
            (
                with_annotations(valid(), &[(ANNOTATION_GATEWAY, "192.0.2.7:4143")]),
                "annotation multicluster.mesh.dev/gateway-identity",
            ),
            (secret("East", None, Some(KUBECONFIG.as_bytes())), "label"),
            (secret("", None, Some(KUBECONFIG.as_bytes())), "label"),
            (
                secret(
                    "a-very-long-cluster-name",
                    None,
                    Some(KUBECONFIG.as_bytes()),
                ),
                "at most 20",
            ),
            (secret("east", None, None), "data.kubeconfig: missing"),
            (
                secret("east", None, Some(b"clusters: 7\n")),
                "data.kubeconfig: not a kubeconfig",
            ),
            (
                secret("east", Some("Bad Domain"), Some(KUBECONFIG.as_bytes())),
                "annotation multicluster.mesh.dev/trust-domain",
            ),
        ];
        for (secret, want) in cases {
            let error = Link::from_secret(&secret, "local").expect_err(want);
            assert!(error.to_string().contains(want), "{error} lacks {want:?}");
        }
    }

    #[test]
    fn dns_labels() {
        for good in ["a", "east", "us-east-1", "0a"] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
