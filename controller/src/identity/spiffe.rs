//! The workload identities the CA certifies: SPIFFE IDs of Kubernetes ServiceAccounts,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
//!
//! Parsing is strict because the ID ends up as the only name in a certificate that every proxy
//! trusts: anything but exactly this shape is refused rather than normalised.

use std::fmt;
use std::str::FromStr;

/// The longest trust domain the SPIFFE specification allows.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The longest DNS label (RFC 1123), which a Kubernetes namespace name must be.
const MAX_DNS_LABEL_LEN: usize = 63;
/// The longest DNS subdomain (RFC 1123), which a ServiceAccount name must be.
const MAX_DNS_SUBDOMAIN_LEN: usize = 253;

/// A Kubernetes ServiceAccount, by namespace and name: what a caller's token proves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccountName {
    /// The namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub name: String,
}

impl ServiceAccountName {
    /// A ServiceAccount from its parts (not validated; [`SpiffeId::new`] validates).
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceAccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated SPIFFE ID of a ServiceAccount:
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    service_account: ServiceAccountName,
}

/// Why a string is not a ServiceAccount's SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// It does not start with `spiffe://`.
    #[error("{id:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme {
        /// The string given.
        id: String,
    },
    /// The path is not `/ns/<namespace>/sa/<serviceaccount>`.
    #[error(
        "{id:?} is not a ServiceAccount identity: the path must be /ns/<namespace>/sa/<serviceaccount>"
    )]
    Path {
        /// The string given.
        id: String,
    },
    /// The trust domain is empty, too long or has characters SPIFFE does not allow.
    #[error(
        "trust domain {trust_domain:?} is invalid: it must be 1-255 characters of a-z, 0-9, '.', '-', '_'"
    )]
    TrustDomain {
        /// The trust domain given.
        trust_domain: String,
    },
    /// The namespace is not a DNS label.
    #[error(
        "namespace {namespace:?} is invalid: it must be a DNS label (1-63 characters of a-z, 0-9, '-', starting and ending alphanumeric)"
    )]
    Namespace {
        /// The namespace given.
        namespace: String,
    },
    /// The ServiceAccount name is not a DNS subdomain.
    #[error(
        "serviceaccount {service_account:?} is invalid: it must be a DNS subdomain (1-253 characters of dot-separated DNS labels)"
    )]
    ServiceAccount {
        /// The name given.
        service_account: String,
    },
}

impl SpiffeId {
    /// The SPIFFE ID of `service_account` in `trust_domain`, validating every part.
    pub fn new(
        trust_domain: &str,
        service_account: ServiceAccountName,
    ) -> Result<Self, SpiffeIdError> {
        if !is_trust_domain(trust_domain) {
            return Err(SpiffeIdError::TrustDomain {
                trust_domain: trust_domain.to_owned(),
            });
        }
        if !is_dns_label(&service_account.namespace) {
            return Err(SpiffeIdError::Namespace {
                namespace: service_account.namespace,
            });
        }
        if !is_dns_subdomain(&service_account.name) {
            return Err(SpiffeIdError::ServiceAccount {
                service_account: service_account.name,
            });
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            service_account,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The ServiceAccount the ID names.
    pub fn service_account(&self) -> &ServiceAccountName {
        &self.service_account
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.service_account.namespace
    }

    /// The ServiceAccount's name.
    pub fn service_account_name(&self) -> &str {
        &self.service_account.name
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme { id: id.to_owned() })?;
        let path_error = || SpiffeIdError::Path { id: id.to_owned() };
        let (trust_domain, path) = rest.split_once('/').ok_or_else(path_error)?;
        let mut segments = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(name), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(path_error());
        };
        Self::new(trust_domain, ServiceAccountName::new(namespace, name))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.service_account.namespace, self.service_account.name
        )
    }
}

/// A SPIFFE trust domain: lowercase letters, digits, '.', '-', '_'.
pub(super) fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TRUST_DOMAIN_LEN
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// An RFC 1123 DNS label, as Kubernetes requires of namespace names.
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            bytes.len() <= MAX_DNS_LABEL_LEN
                && alphanumeric(first)
                && alphanumeric(last)
                && bytes.iter().all(|&b| alphanumeric(b) || b == b'-')
        }
        _ => false,
    }
}

/// An RFC 1123 DNS subdomain, as Kubernetes requires of ServiceAccount names.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_DNS_SUBDOMAIN_LEN && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip_through_display() {
        for id in [
            "spiffe://cluster.local/ns/shop/sa/web",
            "spiffe://example.org/ns/a/sa/b",
            "spiffe://my_domain-1.example/ns/kube-system/sa/default",
            "spiffe://cluster.local/ns/shop/sa/web.v2",
        ] {
            let parsed: SpiffeId = id.parse().expect("a valid SPIFFE ID parses");
            assert_eq!(parsed.to_string(), id);
        }
        let parsed: SpiffeId = "spiffe://td/ns/shop/sa/web".parse().expect("valid");
        assert_eq!(parsed.trust_domain(), "td");
        assert_eq!(parsed.namespace(), "shop");
        assert_eq!(parsed.service_account_name(), "web");
        assert_eq!(
            parsed.service_account(),
            &ServiceAccountName::new("shop", "web")
        );
    }

    #[test]
    fn malformed_ids_are_refused_with_the_reason() {
        let long_label = "a".repeat(64);
        // Each malformed ID and the error variant it must give.
        let cases: Vec<(String, &str)> = vec![
            ("https://cluster.local/ns/a/sa/b".into(), "Scheme"),
            ("spiffe://cluster.local".into(), "Path"),
            ("spiffe://cluster.local/ns/a/sa".into(), "Path"),
            ("spiffe://cluster.local/ns/a/sa/b/c".into(), "Path"),
            ("spiffe://cluster.local/ns/a/sa/b/".into(), "Path"),
            ("spiffe://cluster.local/sa/b/ns/a".into(), "Path"),
            ("spiffe:///ns/a/sa/b".into(), "TrustDomain"),
            ("spiffe://Cluster.Local/ns/a/sa/b".into(), "TrustDomain"),
            (
                "spiffe://cluster.local:8080/ns/a/sa/b".into(),
                "TrustDomain",
            ),
            ("spiffe://cluster.local/ns//sa/b".into(), "Namespace"),
            ("spiffe://cluster.local/ns/-a/sa/b".into(), "Namespace"),
            ("spiffe://cluster.local/ns/a.b/sa/b".into(), "Namespace"),
            (
                format!("spiffe://cluster.local/ns/{long_label}/sa/b"),
                "Namespace",
            ),
            ("spiffe://cluster.local/ns/a/sa/B".into(), "ServiceAccount"),
            (
                "spiffe://cluster.local/ns/a/sa/b..c".into(),
                "ServiceAccount",
            ),
            ("spiffe://cluster.local/ns/a/sa/b-".into(), "ServiceAccount"),
        ];
        for (id, variant) in cases {
            let error = id.parse::<SpiffeId>().expect_err(&id);
            assert!(
                format!("{error:?}").starts_with(variant),
                "{id}: expected {variant}, got {error:?}"
            );
        }
    }
}
