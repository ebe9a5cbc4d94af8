//! HTTP/1 request heads through what the proxy applies to every request: the target authority
//! (`outbound::request_authority`), hop-by-hop header removal (`http::strip_hop_by_hop`), and
//! the upgrade and gRPC checks.

use http::Request;
use http::header::{self, HeaderMap, HeaderName};
use mesh_proxy::http::{is_grpc, is_upgrade, strip_hop_by_hop};
use mesh_proxy::outbound::request_authority;
use proptest::collection::vec;
use proptest::prelude::*;

use crate::runner::fuzz;

/// One request head as a client may write it, before `http` checks it.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: Vec<u8>,
    pub target: String,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Head {
    /// The request, or `None` when `http` itself refuses a part (hyper would answer 400).
    pub fn request(&self) -> Option<Request<()>> {
        let mut builder = Request::builder()
            .method(&self.method[..])
            .uri(&self.target);
        for (name, value) in &self.headers {
            builder = builder.header(&name[..], &value[..]);
        }
        builder.body(()).ok()
    }
}

fn method() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "PATCH"
        ])
        .prop_map(|m| m.as_bytes().to_vec()),
        "[A-Za-z!#$%&'*+.^_`|~-]{1,10}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..8),
    ]
}

/// A host as a client may name it: names, IPv4 and IPv6 literals (some malformed), userinfo.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "books.shop",
            "books.shop.svc.cluster.local",
            "127.0.0.1",
            "[::1]",
            "[fe80::1%25eth0]",
            "[::1",
            "::1",
            "user:pw@books.shop",
            "",
        ])
        .prop_map(str::to_owned),
        "[a-z0-9.-]{1,20}",
        "[!-~]{0,20}",
    ]
}

fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "", ":", ":80", ":8080", ":0", ":65535", ":65536", ":99999", ":abc"
        ])
        .prop_map(str::to_owned),
        "(:[0-9]{0,6})?",
    ]
}

fn authority() -> impl Strategy<Value = String> {
    (host(), port()).prop_map(|(host, port)| host + &port)
}

/// Request targets in each form (origin, absolute, authority, asterisk) and noise.
fn target() -> impl Strategy<Value = String> {
    let path = "(/[!-~]{0,20})?";
    let scheme = prop::sample::select(vec!["http", "https", "HTTP", "ftp", "h2c"]);
    prop_oneof![
        "/[!-~]{0,30}",
        (scheme, authority(), path)
            .prop_map(|(scheme, authority, path)| { format!("{scheme}://{authority}{path}") }),
        authority(),
        Just("*".to_owned()),
        ".{0,30}",
    ]
}

/// Header names the proxy treats specially, any token, and noise.
fn header_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "host",
            "Host",
            "connection",
            "Connection",
            "upgrade",
            "transfer-encoding",
            "te",
            "trailer",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "content-type",
            "x-hop",
            "x-end-to-end",
        ])
        .prop_map(|name| name.as_bytes().to_vec()),
        2 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}".prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..8),
    ]
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "close",
            "keep-alive, x-hop",
            "Upgrade",
            "upgrade, keep-alive",
            " UPGRADE ,x-end-to-end",
            "te, trailer",
            "host",
            "trailers",
            "gzip",
            "chunked",
            "websocket",
            "application/grpc",
            "application/grpc+proto",
            "text/plain",
            "books.shop:8080",
            "[::1]:",
        ])
        .prop_map(|value| value.as_bytes().to_vec()),
        2 => authority().prop_map(String::into_bytes),
        2 => "[ -~]{0,24}".prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..16),
    ]
}

pub fn head() -> impl Strategy<Value = Head> {
    (
        method(),
        target(),
        vec((header_name(), header_value()), 0..8),
    )
        .prop_map(|(method, target, headers)| Head {
            method,
            target,
            headers,
        })
}

/// When the proxy finds a target authority in a request, it is `host:port` with a port number.
#[test]
fn request_authorities_always_have_a_port() {
    fuzz(head(), |head| {
        let Some(request) = head.request() else {
            return Ok(());
        };
        if let Some(authority) = request_authority(&request) {
            let (host, port) = authority
                .rsplit_once(':')
                .ok_or_else(|| TestCaseError::fail(format!("{authority:?} has no port")))?;
            prop_assert!(!host.is_empty(), "{:?} has no host", authority);
            prop_assert!(
                port.parse::<u16>().is_ok(),
                "{:?} has no port number",
                authority
            );
        }
        Ok(())
    });
}

/// The tokens of every `Connection` header, as names.
fn connection_tokens(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

/// Hop-by-hop headers never reach the next hop: after stripping, a request that does not
/// upgrade has no `connection`, `transfer-encoding`, `keep-alive`, `proxy-connection`,
/// `upgrade`, `trailer`, `proxy-authorization`, no header its `Connection` named, and a `te`
/// only as `te: trailers`; every other header is kept as it was. An upgrade keeps
/// `connection` and `upgrade` and loses the rest the same way.
#[test]
fn stripping_leaves_no_hop_by_hop_header() {
    fuzz((head(), any::<bool>()), |(head, keep_upgrade)| {
        let Some(request) = head.request() else {
            return Ok(());
        };
        let before = request.headers().clone();
        let mut after = before.clone();
        strip_hop_by_hop(&mut after, keep_upgrade);

        let mut hop_by_hop = vec![
            header::TRANSFER_ENCODING,
            header::TRAILER,
            header::PROXY_AUTHORIZATION,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
        ];
        if !keep_upgrade {
            hop_by_hop.extend([header::CONNECTION, header::UPGRADE]);
        }
        let listed = connection_tokens(&before);
        for name in &hop_by_hop {
            prop_assert!(!after.contains_key(name), "{} was kept", name);
        }
        for name in &listed {
            if keep_upgrade && name == header::UPGRADE {
                continue;
            }
            prop_assert!(
                !after.contains_key(name),
                "{} was listed in Connection",
                name
            );
        }
        for value in after.get_all(header::TE) {
            prop_assert_eq!(value, "trailers", "te other than trailers was kept");
        }
        for name in before.keys() {
            let special = hop_by_hop.contains(name)
                || listed.contains(name)
                || name == header::TE
                || (keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE));
            if !special {
                let kept: Vec<_> = after.get_all(name).iter().collect();
                let had: Vec<_> = before.get_all(name).iter().collect();
                prop_assert_eq!(kept, had, "{} changed", name);
            }
        }
        if keep_upgrade {
            for name in [header::CONNECTION, header::UPGRADE] {
                // `upgrade` stays even when listed; `connection` unless it lists itself.
                let must_keep = name == header::UPGRADE || !listed.contains(&name);
                if must_keep {
                    let kept: Vec<_> = after.get_all(&name).iter().collect();
                    let had: Vec<_> = before.get_all(&name).iter().collect();
                    prop_assert_eq!(kept, had, "{} changed on an upgrade", name);
                }
            }
        }
        Ok(())
    });
}

/// An upgrade needs an `Upgrade` header and `upgrade` among the `Connection` tokens; gRPC is
/// told by its content type.
#[test]
fn upgrades_and_grpc_are_told_by_their_headers() {
    fuzz(head(), |head| {
        let Some(request) = head.request() else {
            return Ok(());
        };
        let headers = request.headers();
        let upgrade_listed = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        prop_assert_eq!(
            is_upgrade(&request),
            headers.contains_key(header::UPGRADE) && upgrade_listed
        );
        let grpc_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/grpc"));
        prop_assert_eq!(is_grpc(&request), grpc_type);
        Ok(())
    });
}
