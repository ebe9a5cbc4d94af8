//! Outbound routing (`route.rs`): the controller's `OutboundPolicy` compiled into a plan, and
//! the per-request decisions made with it.

use std::time::Duration;

use http::Request;
use mesh_proto::common::SocketAddress;
use mesh_proto::policy::{
    self, backend, filter, header_match, path_match, path_modifier, query_param_match,
};
use mesh_proto::prost_types;
use mesh_proxy::route::{
    Filter, OutboundPlan, PathChange, compile_match, path_has_prefix, pick_backend, rewrite_path,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use crate::http::{Head, head};
use crate::runner::fuzz;

/// Paths shared by matches and requests, so that matches sometimes hold.
fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "",
            "/",
            "/books",
            "/books/",
            "/books/1",
            "/bookshelf",
            "/v2/list",
            "/mesh.demo.v1.Books/Get",
        ])
        .prop_map(str::to_owned),
        1 => "(/[a-z0-9.]{0,6}){0,3}/?",
        1 => ".{0,12}",
    ]
}

/// Regexes as a route author might write them, broken ones included.
fn regex() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            ".*",
            "/v[0-9]+/.*",
            "[0-9]+",
            "(",
            "a)|(b",
            "/books)|(.*",
            ")(",
            "\\",
            "(?x)a#",
            "[[:alpha:]]+",
            "a{2,1}",
        ])
        .prop_map(str::to_owned),
        "[a-z/.*+?()|\\[\\]{}^$\\\\0-9-]{0,10}",
    ]
}

/// Header names: valid ones the requests also use, and invalid ones.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["x-canary", "content-type", "host", "X-Upper"])
            .prop_map(str::to_owned),
        1 => ".{0,8}",
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["1", "0", "application/grpc", "books.shop"])
            .prop_map(str::to_owned),
        ".{0,8}",
    ]
}

fn header_match() -> impl Strategy<Value = policy::HeaderMatch> {
    let value = option::of(prop_oneof![
        value().prop_map(header_match::Value::Exact),
        regex().prop_map(header_match::Value::Regex),
    ]);
    (header_name(), value).prop_map(|(name, value)| policy::HeaderMatch { name, value })
}

fn query_match() -> impl Strategy<Value = policy::QueryParamMatch> {
    let value = option::of(prop_oneof![
        value().prop_map(query_param_match::Value::Exact),
        regex().prop_map(query_param_match::Value::Regex),
    ]);
    ("page|q|.{0,4}", value).prop_map(|(name, value)| policy::QueryParamMatch { name, value })
}

/// One route match on the wire: any mix of path, headers, query, method and gRPC method.
pub fn route_match() -> impl Strategy<Value = policy::RouteMatch> {
    let path = option::of(
        option::of(prop_oneof![
            path().prop_map(path_match::Kind::Exact),
            path().prop_map(path_match::Kind::Prefix),
            regex().prop_map(path_match::Kind::Regex),
        ])
        .prop_map(|kind| policy::PathMatch { kind }),
    );
    let method = prop_oneof![Just(String::new()), Just("GET".to_owned()), ".{0,6}"];
    let grpc = option::of(
        ("|mesh.demo.v1.Books|.{0,6}", "|Get|.{0,6}")
            .prop_map(|(service, method)| policy::GrpcMethodMatch { service, method }),
    );
    (
        path,
        vec(header_match(), 0..3),
        vec(query_match(), 0..2),
        method,
        grpc,
    )
        .prop_map(
            |(path, headers, query_params, method, grpc)| policy::RouteMatch {
                path,
                headers,
                query_params,
                method,
                grpc,
            },
        )
}

fn duration() -> impl Strategy<Value = prost_types::Duration> {
    prop_oneof![
        (0..100i64, 0..1_000_000_000i32),
        (any::<i64>(), any::<i32>()),
    ]
    .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos })
}

fn backend() -> impl Strategy<Value = policy::Backend> {
    let kind = option::of(prop_oneof![
        "books|canary|.{0,8}".prop_map(backend::Kind::Authority),
        (
            vec(any::<u8>(), 0..17),
            prop_oneof![1..100u32, any::<u32>()]
        )
            .prop_map(|(ip, port)| backend::Kind::Addr(SocketAddress { ip, port })),
    ]);
    kind.prop_map(|kind| policy::Backend { kind })
}

fn weighted_backends() -> impl Strategy<Value = Vec<policy::WeightedBackend>> {
    let weight = prop_oneof![Just(0u32), 1..100u32, any::<u32>()];
    vec(
        (weight, option::of(backend()))
            .prop_map(|(weight, backend)| policy::WeightedBackend { weight, backend }),
        0..4,
    )
}

fn wire_header() -> impl Strategy<Value = policy::Header> {
    (header_name(), value()).prop_map(|(name, value)| policy::Header { name, value })
}

fn path_modifier() -> impl Strategy<Value = policy::PathModifier> {
    option::of(prop_oneof![
        path().prop_map(path_modifier::Kind::Full),
        path().prop_map(path_modifier::Kind::Prefix),
    ])
    .prop_map(|kind| policy::PathModifier { kind })
}

fn filter() -> impl Strategy<Value = policy::Filter> {
    let status = prop_oneof![Just(0u32), Just(301), Just(302), any::<u32>()];
    let kind = option::of(prop_oneof![
        (
            vec(wire_header(), 0..2),
            vec(wire_header(), 0..2),
            vec(header_name(), 0..2)
        )
            .prop_map(|(add, set, remove)| {
                filter::Kind::RequestHeaderModifier(policy::HeaderModifier { add, set, remove })
            }),
        (
            ".{0,5}",
            ".{0,8}",
            option::of(path_modifier()),
            any::<u32>(),
            status
        )
            .prop_map(|(scheme, hostname, path, port, status)| {
                filter::Kind::Redirect(policy::Redirect {
                    scheme,
                    hostname,
                    path,
                    port,
                    status,
                })
            }),
        (".{0,8}", option::of(path_modifier())).prop_map(|(hostname, path)| {
            filter::Kind::UrlRewrite(policy::UrlRewrite { hostname, path })
        }),
        (option::of(backend()), any::<u32>()).prop_map(|(backend, percent)| filter::Kind::Mirror(
            policy::Mirror { backend, percent }
        )),
        (
            any::<u32>(),
            prop_oneof![Just(503u32), any::<u32>()],
            any::<u32>(),
            option::of(duration())
        )
            .prop_map(|(abort_percent, abort_status, delay_percent, delay)| {
                filter::Kind::FaultInjection(policy::FaultInjection {
                    abort_percent,
                    abort_status,
                    delay_percent,
                    delay,
                })
            }),
    ]);
    kind.prop_map(|kind| policy::Filter { kind })
}

fn timeouts() -> impl Strategy<Value = policy::Timeouts> {
    (
        option::of(duration()),
        option::of(duration()),
        option::of(duration()),
    )
        .prop_map(|(request, response, idle)| policy::Timeouts {
            request,
            response,
            idle,
        })
}

fn retry() -> impl Strategy<Value = policy::RetryPolicy> {
    let condition = prop_oneof![
        prop::sample::select(vec![
            "5xx",
            "gateway-error",
            "Connect_Failure",
            "503",
            "unavailable"
        ])
        .prop_map(str::to_owned),
        ".{0,6}",
    ];
    let budget = (any::<f32>(), any::<u32>(), option::of(duration())).prop_map(
        |(ratio, min_per_second, ttl)| policy::RetryBudget {
            ratio,
            min_per_second,
            ttl,
        },
    );
    (
        vec(condition, 0..3),
        any::<u32>(),
        option::of(duration()),
        option::of(budget),
        any::<u32>(),
    )
        .prop_map(
            |(conditions, limit, per_try_timeout, budget, max_body_bytes)| policy::RetryPolicy {
                conditions,
                limit,
                per_try_timeout,
                budget,
                max_body_bytes,
            },
        )
}

fn wire_route() -> impl Strategy<Value = policy::Route> {
    (
        "canary|exact|.{0,6}",
        vec(route_match(), 0..3),
        vec(filter(), 0..3),
        weighted_backends(),
        option::of(timeouts()),
        option::of(retry()),
        vec("api\\.example\\.com|\\*\\.example\\.com|.{0,8}", 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(name, matches, filters, backends, timeouts, retry, hostnames, failover)| {
                policy::Route {
                    name,
                    matches,
                    filters,
                    backends,
                    timeouts,
                    retry,
                    hostnames,
                    failover,
                }
            },
        )
}

fn balancer() -> impl Strategy<Value = policy::Balancer> {
    let hash_key = option::of(
        option::of(prop_oneof![
            header_name().prop_map(policy::balancer::hash_key::Kind::Header),
            ".{0,6}".prop_map(policy::balancer::hash_key::Kind::Cookie),
            any::<bool>().prop_map(policy::balancer::hash_key::Kind::ClientIp),
        ])
        .prop_map(|kind| policy::balancer::HashKey { kind }),
    );
    (
        prop_oneof![0..4i32, any::<i32>()],
        hash_key,
        option::of(duration()),
    )
        .prop_map(|(kind, hash_key, ewma_decay)| policy::Balancer {
            kind,
            hash_key,
            ewma_decay,
        })
}

fn outbound_policy() -> impl Strategy<Value = policy::OutboundPolicy> {
    let failure_accrual = (any::<u32>(), option::of(duration()), option::of(duration())).prop_map(
        |(consecutive_failures, min_backoff, max_backoff)| policy::FailureAccrual {
            consecutive_failures,
            min_backoff,
            max_backoff,
        },
    );
    (
        "books.shop.svc.cluster.local:8080|.{0,8}",
        vec(wire_route(), 0..4),
        weighted_backends(),
        option::of(balancer()),
        option::of(failure_accrual),
        option::of(timeouts()),
        option::of(retry()),
        any::<u32>(),
    )
        .prop_map(
            |(
                service,
                routes,
                default_backends,
                balancer,
                failure_accrual,
                timeouts,
                retry,
                max_in_flight_per_backend,
            )| policy::OutboundPolicy {
                service,
                routes,
                default_backends,
                balancer,
                failure_accrual,
                timeouts,
                retry,
                max_in_flight_per_backend,
                ..Default::default()
            },
        )
}

/// Requests whose paths and headers the policies' matches use, and arbitrary heads.
pub fn request() -> impl Strategy<Value = Request<()>> {
    let routed = (
        prop::sample::select(vec!["GET", "POST", "PUT"]),
        path(),
        option::of("(page|q)=[0-9a-z]{0,3}(&(page|q)=[0-9a-z]{0,3})?"),
        vec((header_name(), value()), 0..3),
    )
        .prop_map(|(method, path, query, headers)| {
            let target = match query {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            Head {
                method: method.as_bytes().to_vec(),
                target,
                headers: headers
                    .into_iter()
                    .map(|(name, value)| (name.into_bytes(), value.into_bytes()))
                    .collect(),
            }
        });
    prop_oneof![3 => routed, 1 => head()]
        .prop_filter_map("http refuses the head", |head| head.request())
}

/// Any policy compiles or is refused with its service named; a compiled plan routes any
/// request without panicking, to a backend with a share when the route has one, with
/// timeouts that are never zero (a zero would fail every request).
#[test]
fn plans_route_any_request_to_a_weighted_backend() {
    fuzz(
        (outbound_policy(), vec(request(), 1..4), any::<u64>()),
        |(policy, requests, draw)| {
            let plan = match OutboundPlan::from_proto(&policy) {
                Ok(plan) => plan,
                Err(error) => {
                    let text = error.to_string();
                    let context = format!("outbound policy for {}: ", policy.service);
                    prop_assert!(text.starts_with(&context), "{}", text);
                    prop_assert!(text.len() > context.len(), "{}", text);
                    return Ok(());
                }
            };
            for request in &requests {
                let route = plan.route(request);
                let params = &route.params;
                for timeout in [params.request_timeout, params.response_timeout] {
                    prop_assert_ne!(timeout, Some(Duration::ZERO));
                }
                let backends = plan.backends(route);
                let picked = pick_backend(backends, draw);
                if backends.iter().any(|b| b.weight > 0) {
                    let picked = picked.ok_or_else(|| TestCaseError::fail("no backend"))?;
                    prop_assert!(
                        backends
                            .iter()
                            .any(|b| b.weight > 0 && &b.backend == picked),
                        "picked {:?} without a share",
                        picked
                    );
                } else {
                    prop_assert_eq!(picked, backends.first().map(|b| &b.backend));
                }
                let matched_prefix = route.matched_prefix(request);
                for filter in &route.filters {
                    if let Filter::Rewrite {
                        path: Some(change), ..
                    }
                    | Filter::Redirect {
                        path: Some(change), ..
                    } = filter
                    {
                        let _ = rewrite_path(request.uri().path(), change, matched_prefix);
                    }
                }
            }
            Ok(())
        },
    );
}

/// A match compiles only from valid parts: a regex the route gives is valid on its own (the
/// anchors added around it cannot turn an invalid one valid, nor change what it means), a
/// header name is a header name, a method a method. A compiled match checks any request.
#[test]
fn matches_compile_only_from_valid_parts() {
    fuzz((route_match(), vec(request(), 0..3)), |(wire, requests)| {
        let compiled = compile_match(&wire);
        let mut regexes = Vec::new();
        if let Some(policy::PathMatch {
            kind: Some(path_match::Kind::Regex(text)),
        }) = &wire.path
        {
            regexes.push(text);
        }
        for header in &wire.headers {
            if let Some(header_match::Value::Regex(text)) = &header.value {
                regexes.push(text);
            }
        }
        for param in &wire.query_params {
            if let Some(query_param_match::Value::Regex(text)) = &param.value {
                regexes.push(text);
            }
        }
        let Ok(compiled) = compiled else {
            return Ok(());
        };
        for text in regexes {
            prop_assert!(
                regex_lite::Regex::new(text).is_ok(),
                "the invalid regex {:?} compiled",
                text
            );
        }
        for header in &wire.headers {
            prop_assert!(http::HeaderName::try_from(header.name.as_str()).is_ok());
        }
        for request in &requests {
            let _ = compiled.holds(request);
        }
        Ok(())
    });
}

/// Prefixes match whole segments, and rewriting a matched prefix to itself changes nothing.
#[test]
fn prefixes_match_whole_segments() {
    fuzz((path(), path(), path()), |(prefix, rest, replacement)| {
        let trimmed = prefix.trim_end_matches('/');
        let segment = format!("{trimmed}/{rest}");
        prop_assert!(path_has_prefix(&segment, &prefix));
        prop_assert!(path_has_prefix(trimmed, &prefix));
        if let Some(c) = rest.chars().next()
            && c != '/'
            && !trimmed.is_empty()
        {
            let glued = format!("{trimmed}{rest}");
            prop_assert!(!path_has_prefix(&glued, &prefix));
        }
        let path = segment;
        let same = rewrite_path(&path, &PathChange::Prefix(prefix.clone()), Some(&prefix));
        prop_assert_eq!(&same, &path);
        let full = rewrite_path(&path, &PathChange::Full(replacement.clone()), Some(&prefix));
        prop_assert_eq!(full, replacement.clone());
        let moved = rewrite_path(
            &path,
            &PathChange::Prefix(replacement.clone()),
            Some(&prefix),
        );
        prop_assert!(moved.ends_with(&path[trimmed.len()..]));
        Ok(())
    });
}
