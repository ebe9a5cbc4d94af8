//! Gateway API `HTTPRoute` and `GRPCRoute` rules as the proxy's routes, validated: a pure
//! function per kind, from one route object to its routes in the outbound policy, or the first
//! problem found (naming the field and the value), in which case the whole route is invalid.
//!
//! Each match of each rule becomes one proxy route (carrying the rule's filters, backends and
//! timeouts), so routes from every object can be ordered by the Gateway API's precedence:
//! exact paths, then longer prefixes, then methods, then more header and query conditions,
//! then the older route, then the name, then the rule's order.

use std::cmp::Reverse;

use mesh_proto::policy::{
    Backend, Filter, GrpcMethodMatch, Header, HeaderMatch, HeaderModifier, Mirror, PathMatch,
    PathModifier, QueryParamMatch, Redirect, Route, RouteMatch, Timeouts, UrlRewrite,
    WeightedBackend, backend, filter, header_match, path_match, path_modifier, query_param_match,
};

use super::annotations::{self, proto_duration};
use super::duration;
use super::gateway::{self, BackendRef, GRPCRoute, HTTPRoute, RouteFilter, ValueMatch};

/// What is wrong with a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteProblem {
    /// The field, as a path (`spec.rules[0].matches[1].path.value`).
    pub field: String,
    /// Its value.
    pub value: String,
    /// Why it is invalid.
    pub reason: String,
    /// The Gateway API condition reason (`UnsupportedValue`, `InvalidKind`, ...).
    pub condition_reason: &'static str,
}

fn problem(
    field: impl Into<String>,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> RouteProblem {
    RouteProblem {
        field: field.into(),
        value: value.into(),
        reason: reason.into(),
        condition_reason: "UnsupportedValue",
    }
}

/// Where a proxy route sorts among all routes of a target (smaller first).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    path_rank: u8,
    path_len: Reverse<usize>,
    method: Reverse<bool>,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    created: Option<i64>,
    object: String,
    rule: usize,
    matched: usize,
}

/// One proxy route with its place in the order.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedRoute {
    /// Its place.
    pub precedence: Precedence,
    /// The route.
    pub route: Route,
}

/// The cluster settings route conversion needs.
#[derive(Debug, Clone, Copy)]
pub struct RouteContext<'a> {
    /// The route's namespace.
    pub namespace: &'a str,
    /// The Service port the policy is for (backends without a port use it).
    pub port: u16,
    /// The cluster's DNS domain.
    pub cluster_domain: &'a str,
    /// For routes of an `EgressNetwork`: the destination asked for, where a backendRef naming
    /// the network sends.
    pub egress: Option<std::net::SocketAddr>,
}

/// The authority of a Service port.
pub fn authority(name: &str, namespace: &str, cluster_domain: &str, port: u16) -> String {
    format!("{name}.{namespace}.svc.{cluster_domain}:{port}")
}

fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<i64> {
    meta.creation_timestamp.as_ref().map(|t| t.0.as_second())
}

fn regex_problem(field: &str, text: &str) -> Option<RouteProblem> {
    regex_lite::Regex::new(&format!("^(?:{text})$"))
        .err()
        .map(|e| problem(field, text, format!("not a regular expression: {e}")))
}

fn header_name_problem(field: &str, name: &str) -> Option<RouteProblem> {
    http::HeaderName::from_bytes(name.as_bytes())
        .is_err()
        .then(|| problem(field, name, "not an HTTP header name"))
}

fn value_match(field: &str, m: &ValueMatch, header: bool) -> Result<(String, bool), RouteProblem> {
    if header && let Some(p) = header_name_problem(&format!("{field}.name"), &m.name) {
        return Err(p);
    }
    if m.name.is_empty() {
        return Err(problem(format!("{field}.name"), "", "empty"));
    }
    match m.match_type.as_deref().unwrap_or("Exact") {
        "Exact" => Ok((m.value.clone(), false)),
        "RegularExpression" => match regex_problem(&format!("{field}.value"), &m.value) {
            Some(p) => Err(p),
            None => Ok((m.value.clone(), true)),
        },
        other => Err(problem(
            format!("{field}.type"),
            other,
            "not Exact or RegularExpression",
        )),
    }
}

fn headers(field: &str, matches: &[ValueMatch]) -> Result<Vec<HeaderMatch>, RouteProblem> {
    matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (value, regex) = value_match(&format!("{field}.headers[{i}]"), m, true)?;
            Ok(HeaderMatch {
                name: m.name.to_ascii_lowercase(),
                value: Some(if regex {
                    header_match::Value::Regex(value)
                } else {
                    header_match::Value::Exact(value)
                }),
            })
        })
        .collect()
}

fn backends(
    field: &str,
    refs: &[BackendRef],
    ctx: RouteContext<'_>,
) -> Result<Vec<WeightedBackend>, RouteProblem> {
    refs.iter()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("{field}.backendRefs[{i}]");
            Ok(WeightedBackend {
                weight: match r.weight {
                    None => 1,
                    Some(w) => u32::try_from(w).map_err(|_| {
                        problem(format!("{field}.weight"), w.to_string(), "negative")
                    })?,
                },
                backend: Some(backend_of(&field, r, ctx)?),
            })
        })
        .collect()
}

fn backend_of(field: &str, r: &BackendRef, ctx: RouteContext<'_>) -> Result<Backend, RouteProblem> {
    let group = r.group.as_deref().unwrap_or("");
    let kind = r.kind.as_deref().unwrap_or("Service");
    if let Some(destination) = ctx.egress
        && group == super::crds::GROUP
        && kind == "EgressNetwork"
    {
        // The network itself: the destination the application asked for.
        return Ok(Backend {
            kind: Some(backend::Kind::Addr(destination.into())),
        });
    }
    if !(group.is_empty() || group == "core") || kind != "Service" {
        return Err(RouteProblem {
            condition_reason: "InvalidKind",
            ..problem(
                format!("{field}.kind"),
                format!("{group}/{kind}"),
                "only Services can be backends",
            )
        });
    }
    let port = match r.port {
        None => ctx.port,
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| problem(format!("{field}.port"), p.to_string(), "not a port"))?,
    };
    let namespace = r.namespace.as_deref().unwrap_or(ctx.namespace);
    Ok(Backend {
        kind: Some(backend::Kind::Authority(authority(
            &r.name,
            namespace,
            ctx.cluster_domain,
            port,
        ))),
    })
}

fn path_modifier(field: &str, m: &gateway::HTTPPathModifier) -> Result<PathModifier, RouteProblem> {
    let kind = match m.modifier_type.as_str() {
        "ReplaceFullPath" => {
            path_modifier::Kind::Full(m.replace_full_path.clone().unwrap_or_default())
        }
        "ReplacePrefixMatch" => {
            path_modifier::Kind::Prefix(m.replace_prefix_match.clone().unwrap_or_default())
        }
        other => {
            return Err(problem(
                format!("{field}.type"),
                other,
                "not ReplaceFullPath or ReplacePrefixMatch",
            ));
        }
    };
    Ok(PathModifier { kind: Some(kind) })
}

fn filters(
    field: &str,
    list: &[RouteFilter],
    ctx: RouteContext<'_>,
    grpc: bool,
) -> Result<Vec<Filter>, RouteProblem> {
    let mut out = Vec::new();
    for (i, f) in list.iter().enumerate() {
        let field = format!("{field}.filters[{i}]");
        let missing = |name: &str| problem(format!("{field}.{name}"), "", "missing for this type");
        let kind = match f.filter_type.as_str() {
            "RequestHeaderModifier" => {
                let m = f
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                let pairs = |which: &str, list: &[gateway::HTTPHeader]| {
                    list.iter()
                        .enumerate()
                        .map(|(j, h)| {
                            let f = format!("{field}.requestHeaderModifier.{which}[{j}]");
                            if let Some(p) = header_name_problem(&format!("{f}.name"), &h.name) {
                                return Err(p);
                            }
                            if http::HeaderValue::from_str(&h.value).is_err() {
                                return Err(problem(
                                    format!("{f}.value"),
                                    &h.value,
                                    "not a header value",
                                ));
                            }
                            Ok(Header {
                                name: h.name.clone(),
                                value: h.value.clone(),
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                for (j, name) in m.remove.iter().enumerate() {
                    if let Some(p) = header_name_problem(
                        &format!("{field}.requestHeaderModifier.remove[{j}]"),
                        name,
                    ) {
                        return Err(p);
                    }
                }
                filter::Kind::RequestHeaderModifier(HeaderModifier {
                    add: pairs("add", &m.add)?,
                    set: pairs("set", &m.set)?,
                    remove: m.remove.clone(),
                })
            }
            "RequestRedirect" if !grpc => {
                let r = f
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| missing("requestRedirect"))?;
                let scheme = r.scheme.clone().unwrap_or_default();
                if !matches!(scheme.as_str(), "" | "http" | "https") {
                    return Err(problem(
                        format!("{field}.requestRedirect.scheme"),
                        scheme,
                        "not http or https",
                    ));
                }
                let status = match r.status_code {
                    None => 302,
                    Some(s @ (301 | 302)) => s as u32,
                    Some(s) => {
                        return Err(problem(
                            format!("{field}.requestRedirect.statusCode"),
                            s.to_string(),
                            "not 301 or 302",
                        ));
                    }
                };
                let port = match r.port {
                    None => 0,
                    Some(p) => u16::try_from(p)
                        .ok()
                        .filter(|p| *p != 0)
                        .map(u32::from)
                        .ok_or_else(|| {
                            problem(
                                format!("{field}.requestRedirect.port"),
                                p.to_string(),
                                "not a port",
                            )
                        })?,
                };
                filter::Kind::Redirect(Redirect {
                    scheme,
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(&format!("{field}.requestRedirect.path"), p))
                        .transpose()?,
                    port,
                    status,
                })
            }
            "URLRewrite" if !grpc => {
                let r = f
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| missing("urlRewrite"))?;
                filter::Kind::UrlRewrite(UrlRewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(&format!("{field}.urlRewrite.path"), p))
                        .transpose()?,
                })
            }
            "RequestMirror" => {
                let m = f
                    .request_mirror
                    .as_ref()
                    .ok_or_else(|| missing("requestMirror"))?;
                let percent = match (&m.percent, &m.fraction) {
                    (Some(p), _) => *p,
                    (None, Some(fraction)) => {
                        let denominator = fraction.denominator.unwrap_or(100);
                        if denominator <= 0 || fraction.numerator < 0 {
                            return Err(problem(
                                format!("{field}.requestMirror.fraction"),
                                format!("{}/{denominator}", fraction.numerator),
                                "not a fraction",
                            ));
                        }
                        fraction.numerator.saturating_mul(100) / denominator
                    }
                    (None, None) => 100,
                };
                let percent = u32::try_from(percent)
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| {
                        problem(
                            format!("{field}.requestMirror.percent"),
                            percent.to_string(),
                            "not in 0..=100",
                        )
                    })?;
                if percent == 0 {
                    // Mirroring nothing: the proxy reads 0 as all.
                    continue;
                }
                filter::Kind::Mirror(Mirror {
                    backend: Some(backend_of(
                        &format!("{field}.requestMirror.backendRef"),
                        &m.backend_ref,
                        ctx,
                    )?),
                    percent,
                })
            }
            other => {
                return Err(problem(
                    format!("{field}.type"),
                    other,
                    "a filter the mesh does not support",
                ));
            }
        };
        out.push(Filter { kind: Some(kind) });
    }
    Ok(out)
}

fn timeout(field: &str, text: Option<&str>) -> Result<Option<prost_types::Duration>, RouteProblem> {
    let Some(text) = text else { return Ok(None) };
    let d = duration::parse(text).map_err(|e| problem(field, text, e.to_string()))?;
    // Zero disables the timeout.
    Ok(if d.is_zero() { None } else { proto_duration(d) })
}

/// The route-level settings from a route's annotations (`retry.mesh.dev/*`,
/// `timeout.mesh.dev/*`); any invalid one makes the route invalid.
fn route_annotations(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<annotations::AnnotatedSettings, RouteProblem> {
    let (settings, problems) = annotations::parse(meta.annotations.as_ref());
    match problems.into_iter().next() {
        Some(p) => Err(problem(
            format!("metadata.annotations[{}]", p.annotation),
            p.value,
            p.reason,
        )),
        None => Ok(settings),
    }
}

fn rule_name(route: &str, rule: Option<&str>, index: usize, rules: usize) -> String {
    match rule {
        Some(name) => format!("{route}/{name}"),
        None if rules == 1 => route.to_owned(),
        None => format!("{route}/{index}"),
    }
}

/// The routes of an HTTPRoute, for a policy of `ctx.port`.
pub fn http_routes(
    route: &HTTPRoute,
    ctx: RouteContext<'_>,
) -> Result<Vec<RankedRoute>, RouteProblem> {
    let object = format!(
        "{}/{}",
        ctx.namespace,
        route.metadata.name.as_deref().unwrap_or_default()
    );
    let annotated = route_annotations(&route.metadata)?;
    let mut out = Vec::new();
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{r}]");
        let filters = filters(&field, &rule.filters, ctx, false)?;
        let backends = backends(&field, &rule.backend_refs, ctx)?;
        let mut timeouts = annotated.timeouts.unwrap_or_default();
        if let Some(t) = &rule.timeouts {
            if let Some(request) =
                timeout(&format!("{field}.timeouts.request"), t.request.as_deref())?
            {
                timeouts.request = Some(request);
            }
            if let Some(backend) = timeout(
                &format!("{field}.timeouts.backendRequest"),
                t.backend_request.as_deref(),
            )? {
                timeouts.response = Some(backend);
            }
        }
        let name = rule_name(
            route.metadata.name.as_deref().unwrap_or_default(),
            rule.name.as_deref(),
            r,
            route.spec.rules.len(),
        );
        for (precedence, matched) in http_rule_matches(route, &object, r, rule)? {
            out.push(RankedRoute {
                precedence,
                route: Route {
                    name: name.clone(),
                    matches: vec![matched],
                    filters: filters.clone(),
                    backends: backends.clone(),
                    timeouts: (timeouts != Timeouts::default()).then_some(timeouts),
                    retry: annotated.retry.clone(),
                    hostnames: Vec::new(),
                    failover: annotated.failover.unwrap_or(false),
                },
            });
        }
    }
    Ok(out)
}

/// The matches of one HTTPRoute rule, each with its place in the Gateway API order.
fn http_rule_matches(
    route: &HTTPRoute,
    object: &str,
    r: usize,
    rule: &gateway::HTTPRouteRule,
) -> Result<Vec<(Precedence, RouteMatch)>, RouteProblem> {
    let field = format!("spec.rules[{r}]");
    let mut out = Vec::new();
    let default_match = [gateway::HTTPRouteMatch::default()];
    let matches = if rule.matches.is_empty() {
        &default_match[..]
    } else {
        &rule.matches[..]
    };
    for (m, matched) in matches.iter().enumerate() {
        let field = format!("{field}.matches[{m}]");
        let (path, path_rank, path_len) = match &matched.path {
            None => (None, 2, 1),
            Some(p) => {
                let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
                let value_field = format!("{field}.path.value");
                match p.match_type.as_deref().unwrap_or("PathPrefix") {
                    "Exact" | "PathPrefix" if !value.starts_with('/') => {
                        return Err(problem(value_field, value, "does not start with /"));
                    }
                    "Exact" => (Some(path_match::Kind::Exact(value.clone())), 0, value.len()),
                    "PathPrefix" => (
                        Some(path_match::Kind::Prefix(value.clone())),
                        2,
                        value.len(),
                    ),
                    "RegularExpression" => {
                        if let Some(p) = regex_problem(&value_field, &value) {
                            return Err(p);
                        }
                        (Some(path_match::Kind::Regex(value.clone())), 1, value.len())
                    }
                    other => {
                        return Err(problem(
                            format!("{field}.path.type"),
                            other,
                            "not Exact, PathPrefix or RegularExpression",
                        ));
                    }
                }
            }
        };
        let headers = headers(&field, &matched.headers)?;
        let query_params = matched
            .query_params
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (value, regex) = value_match(&format!("{field}.queryParams[{i}]"), q, false)?;
                Ok(QueryParamMatch {
                    name: q.name.clone(),
                    value: Some(if regex {
                        query_param_match::Value::Regex(value)
                    } else {
                        query_param_match::Value::Exact(value)
                    }),
                })
            })
            .collect::<Result<Vec<_>, RouteProblem>>()?;
        let method = matched.method.clone().unwrap_or_default();
        if !method.is_empty() && http::Method::from_bytes(method.as_bytes()).is_err() {
            return Err(problem(
                format!("{field}.method"),
                method,
                "not an HTTP method",
            ));
        }
        out.push((
            Precedence {
                path_rank,
                path_len: Reverse(path_len),
                method: Reverse(!method.is_empty()),
                headers: Reverse(headers.len()),
                query: Reverse(query_params.len()),
                created: created(&route.metadata),
                object: object.to_owned(),
                rule: r,
                matched: m,
            },
            RouteMatch {
                path: path.map(|kind| PathMatch { kind: Some(kind) }),
                headers,
                query_params,
                method,
                grpc: None,
            },
        ));
    }
    Ok(out)
}

/// The matches of every rule of an HTTPRoute attached to a Server, in the Gateway API order
/// (only their routing half: a Server's routes choose an authorization, not a backend).
pub fn inbound_http_matches(
    route: &HTTPRoute,
    namespace: &str,
) -> Result<Vec<(Precedence, RouteMatch)>, RouteProblem> {
    let object = format!(
        "{namespace}/{}",
        route.metadata.name.as_deref().unwrap_or_default()
    );
    let mut out = Vec::new();
    for (r, rule) in route.spec.rules.iter().enumerate() {
        out.extend(http_rule_matches(route, &object, r, rule)?);
    }
    Ok(out)
}

/// The routes of a GRPCRoute, for a policy of `ctx.port`.
pub fn grpc_routes(
    route: &GRPCRoute,
    ctx: RouteContext<'_>,
) -> Result<Vec<RankedRoute>, RouteProblem> {
    let object = format!(
        "{}/{}",
        ctx.namespace,
        route.metadata.name.as_deref().unwrap_or_default()
    );
    let annotated = route_annotations(&route.metadata)?;
    let mut out = Vec::new();
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{r}]");
        let filters = filters(&field, &rule.filters, ctx, true)?;
        let backends = backends(&field, &rule.backend_refs, ctx)?;
        let name = rule_name(
            route.metadata.name.as_deref().unwrap_or_default(),
            rule.name.as_deref(),
            r,
            route.spec.rules.len(),
        );
        let default_match = [gateway::GRPCRouteMatch::default()];
        let matches = if rule.matches.is_empty() {
            &default_match[..]
        } else {
            &rule.matches[..]
        };
        for (m, matched) in matches.iter().enumerate() {
            let field = format!("{field}.matches[{m}]");
            let (grpc, rank, len) = match &matched.method {
                None => (None, 2, 0),
                Some(method) => {
                    let service = method.service.clone().unwrap_or_default();
                    let name = method.method.clone().unwrap_or_default();
                    if method.match_type.as_deref().unwrap_or("Exact") != "Exact" {
                        return Err(problem(
                            format!("{field}.method.type"),
                            method.match_type.clone().unwrap_or_default(),
                            "only Exact method matches are supported",
                        ));
                    }
                    for (part, text) in [("service", &service), ("method", &name)] {
                        if text.contains('/') {
                            return Err(problem(
                                format!("{field}.method.{part}"),
                                text.clone(),
                                "contains /",
                            ));
                        }
                    }
                    let rank = match (service.is_empty(), name.is_empty()) {
                        (false, false) => 0,
                        _ => 1,
                    };
                    let len = service.len() + name.len();
                    (
                        Some(GrpcMethodMatch {
                            service,
                            method: name,
                        }),
                        rank,
                        len,
                    )
                }
            };
            let headers = headers(&field, &matched.headers)?;
            out.push(RankedRoute {
                precedence: Precedence {
                    path_rank: rank,
                    path_len: Reverse(len),
                    method: Reverse(false),
                    headers: Reverse(headers.len()),
                    query: Reverse(0),
                    created: created(&route.metadata),
                    object: object.clone(),
                    rule: r,
                    matched: m,
                },
                route: Route {
                    name: name.clone(),
                    matches: vec![RouteMatch {
                        path: None,
                        headers,
                        query_params: Vec::new(),
                        method: String::new(),
                        grpc,
                    }],
                    filters: filters.clone(),
                    backends: backends.clone(),
                    timeouts: annotated.timeouts,
                    retry: annotated.retry.clone(),
                    hostnames: Vec::new(),
                    failover: annotated.failover.unwrap_or(false),
                },
            });
        }
    }
    Ok(out)
}
