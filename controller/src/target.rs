//! What a `Destination.Get` asks for, parsed: a Service port by name, or an address.

use std::net::SocketAddr;

use mesh_proto::destination::{GetDestination, get_destination};

/// A resolvable target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A Service's port, named by its authority.
    Service {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
        /// The Service port (not the target port).
        port: u16,
    },
    /// An address: a Service's cluster IP and port, or a pod IP and port.
    Addr(SocketAddr),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Service {
                namespace,
                name,
                port,
            } => write!(f, "{name}.{namespace}.svc:{port}"),
            Target::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// Why a request names no target we could resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Neither an authority nor an address was given.
    #[error("the request names no target")]
    Missing,
    /// The authority has no `:port`.
    #[error("authority {0:?} has no port")]
    NoPort(String),
    /// The port is not a number in 1..=65535.
    #[error("authority {0:?} has an invalid port")]
    BadPort(String),
    /// The host is not a DNS name or IP.
    #[error("authority {0:?} has an invalid host")]
    BadHost(String),
    /// A bare service name, and the request says no namespace to look it up in.
    #[error("authority {0:?} names no namespace and the request has no source namespace")]
    NoNamespace(String),
    /// The address is not a valid socket address.
    #[error("invalid address: {0}")]
    BadAddress(String),
    /// A well-formed name outside the cluster's service domain: nothing to resolve.
    #[error("{0:?} is not a service name of this cluster (want name.ns.svc.{1}:port)")]
    NotInCluster(String, String),
}

impl TargetError {
    /// Whether the request itself was malformed (INVALID_ARGUMENT) rather than naming
    /// something that does not exist (NOT_FOUND).
    pub fn is_malformed(&self) -> bool {
        !matches!(self, TargetError::NotInCluster(..))
    }
}

/// Reads the target of a request.
pub fn from_request(req: &GetDestination, cluster_domain: &str) -> Result<Target, TargetError> {
    let source_namespace = req
        .source
        .as_ref()
        .map(|s| s.namespace.as_str())
        .filter(|ns| !ns.is_empty());
    match &req.target {
        None => Err(TargetError::Missing),
        Some(get_destination::Target::Authority(authority)) => {
            parse_authority(authority, cluster_domain, source_namespace)
        }
        Some(get_destination::Target::Addr(addr)) => SocketAddr::try_from(addr)
            .map(Target::Addr)
            .map_err(|e| TargetError::BadAddress(e.to_string())),
    }
}

/// Parses `name.ns.svc.<cluster-domain>:port`, `name.ns.svc:port`, `name.ns:port`,
/// `name:port` (in the caller's namespace) or `ip:port`.
pub fn parse_authority(
    authority: &str,
    cluster_domain: &str,
    source_namespace: Option<&str>,
) -> Result<Target, TargetError> {
    let text = authority.trim();
    if text.is_empty() {
        return Err(TargetError::Missing);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(TargetError::BadPort(authority.to_owned()));
        }
        return Ok(Target::Addr(addr));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(TargetError::NoPort(authority.to_owned()));
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| TargetError::BadPort(authority.to_owned()))?;
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    if !labels.iter().all(|l| is_dns_label(l)) {
        return Err(TargetError::BadHost(authority.to_owned()));
    }
    let domain: Vec<&str> = cluster_domain
        .trim_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .collect();
    let service = |name: &str, namespace: &str| Target::Service {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        port,
    };
    match labels.as_slice() {
        [name] => match source_namespace {
            Some(ns) => Ok(service(name, ns)),
            None => Err(TargetError::NoNamespace(authority.to_owned())),
        },
        [name, ns] => Ok(service(name, ns)),
        [name, ns, "svc", rest @ ..] if rest.is_empty() || rest == domain.as_slice() => {
            Ok(service(name, ns))
        }
        _ => Err(TargetError::NotInCluster(
            authority.to_owned(),
            cluster_domain.to_owned(),
        )),
    }
}

/// An RFC 1123 label: what Service and namespace names are made of.
fn is_dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ns: &str, port: u16) -> Result<Target, TargetError> {
        Ok(Target::Service {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            port,
        })
    }

    #[test]
    fn authorities_parse_to_targets() {
        let cd = "cluster.local";
        let addr = |s: &str| Ok(Target::Addr(s.parse().expect("test address")));
        let cases: Vec<(&str, Option<&str>, Result<Target, TargetError>)> = vec![
            (
                "web.shop.svc.cluster.local:80",
                None,
                svc("web", "shop", 80),
            ),
            (
                "web.shop.svc.cluster.local.:80",
                None,
                svc("web", "shop", 80),
            ),
            ("Web.Shop.svc:8080", None, svc("web", "shop", 8080)),
            ("web.shop:80", None, svc("web", "shop", 80)),
            ("web:80", Some("shop"), svc("web", "shop", 80)),
            (
                "web:80",
                None,
                Err(TargetError::NoNamespace("web:80".into())),
            ),
            ("10.96.0.10:53", None, addr("10.96.0.10:53")),
            ("[fd00::1]:443", None, addr("[fd00::1]:443")),
            ("", None, Err(TargetError::Missing)),
            (
                "web.shop",
                None,
                Err(TargetError::NoPort("web.shop".into())),
            ),
            (
                "web.shop:http",
                None,
                Err(TargetError::BadPort("web.shop:http".into())),
            ),
            (
                "web.shop:0",
                None,
                Err(TargetError::BadPort("web.shop:0".into())),
            ),
            (
                "web.shop:70000",
                None,
                Err(TargetError::BadPort("web.shop:70000".into())),
            ),
            (
                "10.0.0.1:0",
                None,
                Err(TargetError::BadPort("10.0.0.1:0".into())),
            ),
            (
                "we_b.shop:80",
                None,
                Err(TargetError::BadHost("we_b.shop:80".into())),
            ),
            (
                "web..shop:80",
                None,
                Err(TargetError::BadHost("web..shop:80".into())),
            ),
            (
                "fd00::1:80",
                None,
                Err(TargetError::BadHost("fd00::1:80".into())),
            ),
            (
                "web.shop.svc.example.org:80",
                None,
                Err(TargetError::NotInCluster(
                    "web.shop.svc.example.org:80".into(),
                    cd.into(),
                )),
            ),
            (
                "api.example.org:443",
                None,
                Err(TargetError::NotInCluster(
                    "api.example.org:443".into(),
                    cd.into(),
                )),
            ),
        ];
        for (text, source_ns, want) in cases {
            assert_eq!(parse_authority(text, cd, source_ns), want, "{text:?}");
        }
    }

    #[test]
    fn requests_name_a_target_or_are_malformed() {
        use mesh_proto::common::{SocketAddress, WorkloadRef};
        let cases = [
            (GetDestination::default(), Err(TargetError::Missing)),
            (
                GetDestination {
                    target: Some(get_destination::Target::Authority("web:80".into())),
                    source: Some(WorkloadRef {
                        namespace: "shop".into(),
                        ..Default::default()
                    }),
                },
                svc("web", "shop", 80),
            ),
            (
                GetDestination {
                    target: Some(get_destination::Target::Addr(SocketAddress {
                        ip: vec![10, 0, 0, 1],
                        port: 8080,
                    })),
                    source: None,
                },
                Ok(Target::Addr("10.0.0.1:8080".parse().expect("test address"))),
            ),
            (
                GetDestination {
                    target: Some(get_destination::Target::Addr(SocketAddress {
                        ip: vec![10, 0, 1],
                        port: 8080,
                    })),
                    source: None,
                },
                Err(TargetError::BadAddress(
                    "IP address of 3 bytes (want 4 or 16)".into(),
                )),
            ),
        ];
        for (req, want) in cases {
            assert_eq!(from_request(&req, "cluster.local"), want, "{req:?}");
        }
        assert!(TargetError::Missing.is_malformed());
        assert!(!TargetError::NotInCluster(String::new(), String::new()).is_malformed());
    }
}
