//! Inbound authorization (`policy.rs`): the controller's `InboundServer` compiled into a
//! policy, and the verdicts it gives clients and requests.

use std::net::{IpAddr, Ipv4Addr};

use http::Request;
use ipnet::IpNet;
use mesh_proto::policy::{self, authentication, inbound_server};
use mesh_proxy::policy::{Client, InboundPolicy, NoRoute, Verdict};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use crate::route::{request, route_match};
use crate::runner::fuzz;

/// Networks as written in a policy: IPv4, IPv6, bare addresses, IPv4-mapped, malformed.
fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "10.0.0.0/8",
            "10.1.2.3/8",
            "0.0.0.0/0",
            "::/0",
            "127.0.0.1",
            "fd00::/8",
            "::ffff:10.0.0.0/104",
            "10.0.0.0/33",
            "10.0.0.0/",
            "not a network",
            "",
        ])
        .prop_map(str::to_owned),
        1 => any::<(Ipv4Addr, u8)>().prop_map(|(ip, len)| format!("{ip}/{}", len % 40)),
        1 => ".{0,10}",
    ]
}

/// SPIFFE IDs and the patterns that admit them.
fn identity() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "spiffe://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/books",
            "spiffe://other.domain/ns/shop/sa/web",
            "*",
            "",
        ])
        .prop_map(str::to_owned),
        1 => ".{0,10}",
    ]
}

fn identity_prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/shop/",
            ""
        ])
        .prop_map(str::to_owned),
        ".{0,6}",
    ]
}

fn route_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["books", "admin", ""]).prop_map(str::to_owned),
        ".{0,4}",
    ]
}

fn authentication() -> impl Strategy<Value = policy::Authentication> {
    option::of(prop_oneof![
        Just(authentication::Kind::Unauthenticated(
            authentication::Unauthenticated {}
        )),
        (vec(identity(), 0..3), vec(identity_prefix(), 0..2)).prop_map(
            |(identities, identity_prefixes)| {
                authentication::Kind::MeshTls(authentication::MeshTls {
                    identities,
                    identity_prefixes,
                })
            }
        ),
    ])
    .prop_map(|kind| policy::Authentication { kind })
}

fn authorization() -> impl Strategy<Value = policy::Authorization> {
    let network =
        (cidr(), vec(cidr(), 0..2)).prop_map(|(cidr, except)| policy::Network { cidr, except });
    (
        vec(network, 0..3),
        option::of(authentication()),
        vec(route_name(), 0..2),
    )
        .prop_map(|(networks, authentication, routes)| policy::Authorization {
            name: String::new(),
            networks,
            authentication,
            routes,
        })
}

fn rate_limit() -> impl Strategy<Value = policy::RateLimit> {
    let rps = prop_oneof![Just(0u32), 1..10u32, any::<u32>()];
    let overrides = vec(
        (rps.clone(), vec(identity(), 0..2))
            .prop_map(|(rps, identities)| policy::rate_limit::Override { rps, identities }),
        0..2,
    );
    (".{0,6}", rps.clone(), rps, overrides).prop_map(
        |(name, total_rps, identity_rps, overrides)| policy::RateLimit {
            name,
            total_rps,
            identity_rps,
            overrides,
        },
    )
}

/// A Server's policy. Authorizations are named by position (`authz-0`, ...), so a verdict
/// tells which one admitted the client.
fn inbound_server() -> impl Strategy<Value = policy::InboundServer> {
    let http_route = (route_name(), vec(route_match(), 0..3))
        .prop_map(|(name, matches)| policy::InboundRoute { name, matches });
    let mode = prop_oneof![
        Just(inbound_server::Mode::Enforce as i32),
        Just(inbound_server::Mode::Audit as i32),
        any::<i32>(),
    ];
    (
        "web|.{0,6}",
        vec(authorization(), 0..4),
        vec(http_route, 0..3),
        option::of(rate_limit()),
        mode,
    )
        .prop_map(
            |(name, mut authorizations, http_routes, rate_limit, mode)| {
                for (i, authorization) in authorizations.iter_mut().enumerate() {
                    authorization.name = format!("authz-{i}");
                }
                policy::InboundServer {
                    name,
                    authorizations,
                    http_routes,
                    rate_limit,
                    mode,
                    ..Default::default()
                }
            },
        )
}

fn client_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        prop::sample::select(vec![
            "10.1.2.3",
            "10.0.0.1",
            "127.0.0.1",
            "192.168.1.1",
            "::1",
            "fd00::1",
            "::ffff:10.1.2.3",
        ])
        .prop_map(|ip| ip.parse().expect("test address")),
        any::<IpAddr>(),
    ]
}

/// A client: its address and, on mesh TLS, its proven identity.
fn client() -> impl Strategy<Value = (IpAddr, Option<String>)> {
    (client_ip(), option::of(identity()))
}

/// Whether `ip` (as IPv4 when it is IPv4-mapped) is in the network and not in its exceptions.
fn contains(network: &policy::Network, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    let parse = |text: &str| {
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .ok()
    };
    parse(&network.cidr).is_some_and(|net| net.contains(&ip))
        && !network
            .except
            .iter()
            .filter_map(|except| parse(except))
            .any(|except| except.contains(&ip))
}

/// The same address as IPv4 when it is an IPv4-mapped IPv6 address.
fn mapped_pair(ip: IpAddr) -> Option<(IpAddr, IpAddr)> {
    match ip {
        IpAddr::V4(v4) => Some((ip, IpAddr::V6(v4.to_ipv6_mapped()))),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(|v4| (IpAddr::V4(v4), ip)),
    }
}

/// Any Server compiles or is refused with its name; a compiled policy gives every client and
/// request a verdict without panicking, and admits a client only by an authorization whose
/// every condition the client meets: a client without a mesh identity is never admitted by an
/// authorization that requires mesh TLS, a connection (no route) never by one limited to
/// routes, a client outside the networks never by one limited to networks. An IPv4 client gets
/// the same verdict when its address arrives IPv4-mapped on a dual-stack socket.
#[test]
fn clients_are_admitted_only_by_authorizations_they_meet() {
    fuzz(
        (inbound_server(), vec((client(), request()), 1..4)),
        |(server, calls)| {
            let policy = match InboundPolicy::from_proto(&server) {
                Ok(policy) => policy,
                Err(error) => {
                    let text = error.to_string();
                    prop_assert!(
                        text.starts_with(&format!("policy {}: ", server.name)),
                        "{}",
                        text
                    );
                    return Ok(());
                }
            };
            let audit = server.mode == inbound_server::Mode::Audit as i32;
            for ((ip, identity), request) in &calls {
                let client = Client {
                    ip: *ip,
                    identity: identity.as_deref(),
                };
                let route = route_of(&policy, &server, request)?;
                for route in [route.as_deref(), None] {
                    let verdict = policy.evaluate(&client, route);
                    check_verdict(&server, &client, route, &verdict, audit)?;
                    if let Some((v4, v6)) = mapped_pair(*ip) {
                        let as_v4 = policy.evaluate(&Client { ip: v4, ..client }, route);
                        let as_v6 = policy.evaluate(&Client { ip: v6, ..client }, route);
                        prop_assert_eq!(as_v4, as_v6, "{} and {} differ", v4, v6);
                    }
                }
                if let Some(limits) = &policy.rate_limits {
                    let _ = limits.check(client.identity);
                }
            }
            Ok(())
        },
    );
}

/// The route a request takes: none when the Server has no routes, else one of its routes'
/// names, or `NoRoute`.
fn route_of(
    policy: &InboundPolicy,
    server: &policy::InboundServer,
    request: &Request<()>,
) -> Result<Option<String>, TestCaseError> {
    match policy.route_of(request) {
        Ok(None) => {
            prop_assert!(server.http_routes.is_empty());
            Ok(None)
        }
        Ok(Some(name)) => {
            prop_assert!(server.http_routes.iter().any(|r| *r.name == **name));
            Ok(Some(name.to_string()))
        }
        Err(NoRoute) => {
            prop_assert!(!server.http_routes.is_empty());
            Ok(None)
        }
    }
}

fn check_verdict(
    server: &policy::InboundServer,
    client: &Client<'_>,
    route: Option<&str>,
    verdict: &Verdict,
    audit: bool,
) -> Result<(), TestCaseError> {
    match verdict {
        Verdict::Allow(name) => {
            let authorization = server
                .authorizations
                .iter()
                .find(|a| *a.name == **name)
                .ok_or_else(|| TestCaseError::fail(format!("admitted by unknown {name}")))?;
            let kind = authorization
                .authentication
                .as_ref()
                .and_then(|a| a.kind.as_ref());
            if client.identity.is_none() {
                prop_assert!(
                    matches!(kind, Some(authentication::Kind::Unauthenticated(_))),
                    "{} admitted a client without identity by {:?}",
                    name,
                    kind
                );
            }
            if !authorization.routes.is_empty() {
                prop_assert!(
                    route.is_some_and(|route| authorization.routes.iter().any(|r| r == route)),
                    "{} admitted route {:?}",
                    name,
                    route
                );
            }
            if !authorization.networks.is_empty() {
                prop_assert!(
                    authorization
                        .networks
                        .iter()
                        .any(|network| contains(network, client.ip)),
                    "{} admitted {} from outside its networks",
                    name,
                    client.ip
                );
            }
        }
        Verdict::AuditDeny(_) => prop_assert!(audit),
        Verdict::Deny(_) => prop_assert!(!audit),
    }
    Ok(())
}
