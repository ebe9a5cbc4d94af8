//! Egress: what the controller's `Egress` (an `EgressNetwork`, or the mesh-wide default) allows
//! of traffic to a destination outside the mesh, and the host names that traffic is known by.
//!
//! - HTTP: the router matches the plan's routes (which may name hosts); a request no route
//!   takes is refused when the network denies ([`EgressPlan::denies_unmatched_http`]).
//! - TLS: the server name of the ClientHello ([`read_server_name`], never terminated) must be
//!   one a TLSRoute names.
//! - Other TCP: a TCPRoute must name the port.
//!
//! Refusals are 403 (`mesh-error: egress denied: ...`) or a closed connection, counted in
//! `proxy_errors_total{reason="egress denied"}`. Metrics name egress traffic by the host it
//! asked for ([`HostLabels`]), bounded in number.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use mesh_proto::policy;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::detect::PrefixedIo;
use crate::http::ProxyError;
use crate::metrics::{EgressLabels, Label, Metrics};

/// A host name condition of a route: `api.example.com`, `*.example.com` (any name below it)
/// or `*` (any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// This name.
    Exact(String),
    /// Any name ending with this suffix (kept with its leading dot).
    Below(String),
    /// Any name.
    Any,
}

impl HostPattern {
    /// Reads a pattern; names are compared without case.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self::Any);
        }
        let text = text.trim_end_matches('.').to_ascii_lowercase();
        let bare = text.strip_prefix("*.").unwrap_or(&text);
        if bare.is_empty() || bare.contains('*') || bare.contains(':') || bare.contains('/') {
            return Err(format!("{text:?} is not a host name or *.suffix"));
        }
        Ok(match text.strip_prefix('*') {
            Some(suffix) => Self::Below(suffix.to_owned()),
            None => Self::Exact(text),
        })
    }

    /// Whether `host` (lower case, no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::Below(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
            Self::Any => true,
        }
    }
}

/// The host of an authority or server name, lower case, without port or trailing dot.
pub fn host_of(authority: &str) -> String {
    let host = match authority.rsplit_once(':') {
        // `[::1]:80`, `name:80`; a bare IPv6 address has more than one colon.
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
            host
        }
        _ => authority,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The compiled `Egress` of an outbound plan.
#[derive(Debug)]
pub struct EgressPlan {
    /// `EgressNetwork ns/name`, or `the mesh-wide egress default`: what refusals name.
    pub source: String,
    /// `ns/name`, or `default`: the metric label.
    network: Label,
    deny: bool,
    tls_hosts: Vec<HostPattern>,
    tcp_allowed: bool,
}

impl EgressPlan {
    /// Compiles the controller's `Egress`.
    pub fn from_proto(egress: &policy::Egress) -> Result<Self, String> {
        let deny = match policy::egress::TrafficPolicy::try_from(egress.traffic_policy) {
            Ok(policy::egress::TrafficPolicy::Allow) => false,
            Ok(policy::egress::TrafficPolicy::Deny) => true,
            Err(_) => return Err(format!("unknown traffic policy {}", egress.traffic_policy)),
        };
        Ok(Self {
            source: if egress.network.is_empty() {
                "the mesh-wide egress default".to_owned()
            } else {
                format!("EgressNetwork {}", egress.network)
            },
            network: Label::new(if egress.network.is_empty() {
                "default"
            } else {
                &egress.network
            }),
            deny,
            tls_hosts: egress
                .tls_hosts
                .iter()
                .map(|h| HostPattern::parse(h))
                .collect::<Result<_, _>>()?,
            tcp_allowed: egress.tcp_allowed,
        })
    }

    /// Whether an HTTP request no route matches is refused (a TCPRoute allows the whole port).
    pub fn denies_unmatched_http(&self) -> bool {
        self.deny && !self.tcp_allowed
    }

    /// Why a TLS connection with this server name (SNI) is refused, if it is.
    pub fn refuses_tls(&self, server_name: Option<&str>) -> Option<ProxyError> {
        if !self.deny || self.tcp_allowed {
            return None;
        }
        let host = server_name.map(host_of);
        let allowed = host
            .as_deref()
            .is_some_and(|host| self.tls_hosts.iter().any(|p| p.matches(host)));
        (!allowed).then(|| {
            self.denied(&match host {
                Some(host) => format!("TLS to {host}"),
                None => "TLS without a server name".to_owned(),
            })
        })
    }

    /// Why an opaque TCP connection is refused, if it is.
    pub fn refuses_tcp(&self) -> Option<ProxyError> {
        (self.deny && !self.tcp_allowed).then(|| self.denied("TCP"))
    }

    /// Counts one decision on `protocol` traffic to `authority`.
    pub fn count(&self, metrics: &Metrics, authority: &Label, protocol: &str, allowed: bool) {
        metrics
            .egress
            .get_or_create(&EgressLabels {
                network: self.network.clone(),
                authority: authority.clone(),
                protocol: Label::new(protocol),
                decision: Label::new(if allowed { "allowed" } else { "denied" }),
            })
            .inc();
    }

    /// The refusal of `what`, naming the network and the rule that refused it.
    pub fn denied(&self, what: &str) -> ProxyError {
        ProxyError::EgressDenied(format!(
            "{what} is not allowed by {}: no route allows it and its traffic policy is Deny",
            self.source
        ))
    }
}

/// Most bytes read looking for a ClientHello: it fits one 16 KiB record.
const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

/// The server name (SNI) of the TLS ClientHello at the start of `io`, which is left unread
/// (every byte read is put back). `None` when the hello names none, is malformed, is larger
/// than a record, or is not complete within `timeout`.
///
/// rustls' `Acceptor` parses the hello; we never answer it.
pub async fn read_server_name<I: AsyncRead + Unpin>(
    io: &mut PrefixedIo<I>,
    timeout: Duration,
) -> Option<String> {
    let mut seen = BytesMut::with_capacity(2048);
    let read = async {
        let mut acceptor = rustls::server::Acceptor::default();
        loop {
            let start = seen.len();
            if start >= MAX_CLIENT_HELLO || io.read_buf(&mut seen).await.ok()? == 0 {
                return None;
            }
            let mut fresh = &seen[start..];
            while !fresh.is_empty() {
                // Nothing taken means rustls' buffer is full: no hello of a sane size.
                if acceptor.read_tls(&mut fresh).ok()? == 0 {
                    return None;
                }
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    return accepted.client_hello().server_name().map(str::to_owned);
                }
                Ok(None) => {}
                Err(_) => return None,
            }
        }
    };
    let name = tokio::time::timeout(timeout, read).await.ok().flatten();
    io.unread(seen.freeze());
    name
}

/// Bounds the host names egress metrics carry: the first [`MAX_HOST_LABELS`] names seen keep
/// their own series, later ones are counted under their address, so an application calling
/// many hosts cannot grow `/metrics` without bound.
#[derive(Debug, Default)]
pub struct HostLabels {
    known: Mutex<HashSet<String>>,
}

/// Distinct egress host names with their own metric series.
pub const MAX_HOST_LABELS: usize = 100;

impl HostLabels {
    /// The label of egress traffic to `host:port` at `addr`: the host while there is room.
    pub fn label(&self, host: &str, port: u16, addr: &str) -> String {
        let mut known = match self.known.lock() {
            Ok(known) => known,
            Err(poisoned) => poisoned.into_inner(),
        };
        if known.contains(host) || known.len() < MAX_HOST_LABELS {
            known.insert(host.to_owned());
            format!("{host}:{port}")
        } else {
            addr.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_exact_names_and_names_below_a_suffix() {
        let cases = [
            ("api.example.com", "api.example.com", true),
            ("API.Example.com.", "api.example.com", true),
            ("api.example.com", "www.example.com", false),
            ("*.example.com", "api.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("*", "anything.at.all", true),
        ];
        for (pattern, host, want) in cases {
            let parsed = HostPattern::parse(pattern).expect("a pattern");
            assert_eq!(parsed.matches(host), want, "{pattern} vs {host}");
        }
        for bad in ["", "*.", "a.*.com", "host:80", "a/b"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hosts_lose_their_port_case_and_trailing_dot() {
        assert_eq!(host_of("API.example.com:8080"), "api.example.com");
        assert_eq!(host_of("api.example.com."), "api.example.com");
        assert_eq!(host_of("[::1]:80"), "[::1]");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("203.0.113.9:443"), "203.0.113.9");
    }

    fn plan(deny: bool, tls_hosts: &[&str], tcp_allowed: bool) -> EgressPlan {
        EgressPlan::from_proto(&policy::Egress {
            network: "shop/external".into(),
            traffic_policy: if deny {
                policy::egress::TrafficPolicy::Deny
            } else {
                policy::egress::TrafficPolicy::Allow
            } as i32,
            tls_hosts: tls_hosts.iter().map(|h| (*h).to_owned()).collect(),
            tcp_allowed,
        })
        .expect("a valid egress")
    }

    #[test]
    fn deny_refuses_what_no_route_allows_and_names_the_network() {
        let allow = plan(false, &[], false);
        assert!(allow.refuses_tls(Some("x.example.com")).is_none());
        assert!(allow.refuses_tcp().is_none());
        assert!(!allow.denies_unmatched_http());

        let deny = plan(true, &["secure.example.com", "*.cdn.example"], false);
        assert!(deny.denies_unmatched_http());
        assert!(deny.refuses_tls(Some("secure.example.com")).is_none());
        assert!(deny.refuses_tls(Some("img.cdn.example")).is_none());
        let refused = deny.refuses_tls(Some("evil.example.com")).expect("refused");
        assert_eq!(refused.reason(), "egress denied");
        assert!(
            refused.detail().contains("TLS to evil.example.com")
                && refused.detail().contains("EgressNetwork shop/external"),
            "{}",
            refused.detail()
        );
        assert!(deny.refuses_tls(None).is_some());
        assert!(deny.refuses_tcp().is_some());

        // A TCPRoute allows the whole port, whatever it carries.
        let port_allowed = plan(true, &[], true);
        assert!(port_allowed.refuses_tcp().is_none());
        assert!(port_allowed.refuses_tls(Some("any.example.com")).is_none());
        assert!(!port_allowed.denies_unmatched_http());
    }

    #[test]
    fn host_labels_are_bounded() {
        let labels = HostLabels::default();
        for i in 0..MAX_HOST_LABELS {
            assert_eq!(
                labels.label(&format!("h{i}.example.com"), 443, "203.0.113.9:443"),
                format!("h{i}.example.com:443")
            );
        }
        assert_eq!(
            labels.label("one-too-many.example.com", 443, "203.0.113.9:443"),
            "203.0.113.9:443"
        );
        // Known names keep their series.
        assert_eq!(
            labels.label("h0.example.com", 80, "203.0.113.9:80"),
            "h0.example.com:80"
        );
    }

    /// The server name found in `bytes` (sent whole, then closed), and what reading on gives.
    async fn name_and_replay(bytes: &[u8]) -> (Option<String>, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        let (mut writer, reader) = tokio::io::duplex(64 * 1024);
        writer.write_all(bytes).await.expect("write");
        drop(writer);
        let mut io = PrefixedIo::new(bytes::Bytes::new(), reader);
        let name = read_server_name(&mut io, Duration::from_secs(5)).await;
        let mut replayed = Vec::new();
        io.read_to_end(&mut replayed).await.expect("replayed");
        (name, replayed)
    }

    /// A ClientHello from a real client (rustls), split across reads, gives its server name
    /// and is replayed whole.
    #[tokio::test]
    async fn the_server_name_is_read_from_a_client_hello_and_put_back() {
        use std::sync::Arc;
        use tokio::io::AsyncWriteExt;

        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("secure.example.com").expect("a name");
        let mut client =
            rustls::ClientConnection::new(Arc::new(config), name).expect("a client connection");
        let mut hello = Vec::new();
        client.write_tls(&mut hello).expect("a ClientHello");

        let (mut writer, reader) = tokio::io::duplex(64 * 1024);
        let first = hello[..10].to_vec();
        let rest = hello[10..].to_vec();
        tokio::spawn(async move {
            writer.write_all(&first).await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.write_all(&rest).await.expect("write");
        });
        let mut io = PrefixedIo::new(bytes::Bytes::new(), reader);
        let found = read_server_name(&mut io, Duration::from_secs(5)).await;
        assert_eq!(found.as_deref(), Some("secure.example.com"));
        let mut replayed = vec![0; hello.len()];
        io.read_exact(&mut replayed).await.expect("replayed");
        assert_eq!(replayed, hello);

        // Not TLS at all: no name, and the bytes are still there.
        let not_tls = b"\x16\x03\x01\x00\x05hello".to_vec();
        assert_eq!(name_and_replay(&not_tls).await, (None, not_tls));
        // Larger than any hello: given up on, and every byte still there.
        let mut big = b"\x16\x03\x01\x40\x00".to_vec();
        big.extend(std::iter::repeat_n(1u8, 40_000));
        assert_eq!(name_and_replay(&big).await, (None, big));
    }
}
