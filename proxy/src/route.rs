//! Outbound routing: the controller's `OutboundPolicy` for a target, compiled once into an
//! [`OutboundPlan`], and the pure decisions made with it per request — which route matches,
//! which weighted backend takes the request, what the route's filters do.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};
use mesh_proto::policy::{self, backend, filter, header_match, path_match, path_modifier};
use regex_lite::Regex;

use crate::balance::Algorithm;
use crate::egress::{EgressPlan, HostPattern, host_of};
use crate::metrics::{Label, Metrics, RouteLabels, RouteMetrics};
use crate::retry::{RetryBudget, RetryConditions, RetryParams};

/// A policy that cannot be compiled; the last valid plan keeps applying.
#[derive(Debug, thiserror::Error)]
#[error("outbound policy for {service}: {reason}")]
pub struct PlanError {
    service: String,
    reason: String,
}

/// Where requests can go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BackendRef {
    /// A service, resolved through discovery.
    Authority(String),
    /// A fixed address.
    Addr(SocketAddr),
}

/// A backend and its share.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedBackend {
    /// Relative weight.
    pub weight: u32,
    /// The backend.
    pub backend: BackendRef,
}

/// Timeouts and retries of a route.
#[derive(Debug, Default)]
pub struct RouteParams {
    /// The route's name, the `route` metric label.
    pub name: Arc<str>,
    /// The whole request, retries included.
    pub request_timeout: Option<Duration>,
    /// One attempt until response headers.
    pub response_timeout: Option<Duration>,
    /// Retries, when configured.
    pub retry: Option<RetryParams>,
}

/// Deliberate failures.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// Percent of requests aborted.
    pub abort_percent: u32,
    /// The status they get.
    pub abort_status: u16,
    /// Percent of requests delayed.
    pub delay_percent: u32,
    /// By how long.
    pub delay: Duration,
}

/// What a route does to matching requests before forwarding them.
#[derive(Clone, Debug)]
pub enum Filter {
    /// Add, set or remove request headers.
    Headers {
        /// Added.
        add: Vec<(HeaderName, HeaderValue)>,
        /// Replaced.
        set: Vec<(HeaderName, HeaderValue)>,
        /// Removed.
        remove: Vec<HeaderName>,
    },
    /// Answer with a redirect.
    Redirect {
        /// New scheme.
        scheme: Option<String>,
        /// New host.
        host: Option<String>,
        /// New path.
        path: Option<PathChange>,
        /// New port.
        port: Option<u16>,
        /// 301 or 302.
        status: u16,
    },
    /// Rewrite before forwarding.
    Rewrite {
        /// New host.
        host: Option<String>,
        /// New path.
        path: Option<PathChange>,
    },
    /// Copy requests to another backend.
    Mirror {
        /// Where.
        backend: BackendRef,
        /// Percent of requests.
        percent: u32,
    },
    /// Fail or delay a share of requests.
    Fault(Fault),
}

/// A path change.
#[derive(Clone, Debug, PartialEq)]
pub enum PathChange {
    /// Replace the whole path.
    Full(String),
    /// Replace the matched prefix.
    Prefix(String),
}

#[derive(Debug)]
enum PathCondition {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueCondition {
    Exact(String),
    Regex(Regex),
}

impl ValueCondition {
    fn holds(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == value,
            Self::Regex(regex) => regex.is_match(value),
        }
    }
}

/// One route match: a request matches when every condition holds.
#[derive(Debug, Default)]
pub struct Match {
    path: Option<PathCondition>,
    headers: Vec<(HeaderName, ValueCondition)>,
    query: Vec<(String, ValueCondition)>,
    method: Option<Method>,
}

/// One route.
#[derive(Debug)]
pub struct Route {
    /// Host names the request's authority must match; empty matches any (egress routes only).
    hostnames: Vec<HostPattern>,
    matches: Vec<Match>,
    /// Filters, in order.
    pub filters: Vec<Filter>,
    /// Where matching requests go; empty means the plan's defaults.
    pub backends: Vec<WeightedBackend>,
    /// The backends are a failover order, not a split: the first with an available endpoint
    /// takes every request.
    pub failover: bool,
    /// Timeouts and retries.
    pub params: Arc<RouteParams>,
    /// The route's metric series, made at its first request: a route belongs to one plan,
    /// so to one service.
    metrics: OnceLock<Arc<RouteMetrics>>,
}

/// The compiled outbound policy of one target.
#[derive(Debug)]
pub struct OutboundPlan {
    /// The service, `name.ns.svc.cluster.local:port`.
    pub service: Arc<str>,
    routes: Vec<Route>,
    default_route: Route,
    /// The balancing algorithm.
    pub algorithm: Algorithm,
    /// What consistent hashing hashes.
    pub hash_key: Option<HashKey>,
    /// Circuit breaking, when enabled.
    pub failure_accrual: Option<FailureAccrual>,
    /// Most requests in flight to one backend; `None` is unlimited.
    pub max_in_flight_per_backend: Option<NonZeroU32>,
    /// Set when the target is outside the mesh: what its EgressNetwork allows.
    pub egress: Option<EgressPlan>,
}

/// What consistent hashing hashes.
#[derive(Clone, Debug, PartialEq)]
pub enum HashKey {
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP.
    ClientIp,
}

/// Failure accrual settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureAccrual {
    /// Consecutive failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// First probe delay.
    pub min_backoff: Duration,
    /// Longest probe delay.
    pub max_backoff: Duration,
}

fn duration(d: Option<&mesh_proto::prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos)).filter(|d| !d.is_zero())
}

impl OutboundPlan {
    /// Compiles the controller's policy; anything invalid refuses the whole plan.
    pub fn from_proto(policy: &policy::OutboundPolicy) -> Result<Self, PlanError> {
        let error = |reason: String| PlanError {
            service: policy.service.clone(),
            reason,
        };
        let default_params =
            compile_params("default", policy.timeouts.as_ref(), policy.retry.as_ref())
                .map_err(error)?;
        let default_backends = compile_backends(&policy.default_backends).map_err(error)?;
        let mut routes = Vec::with_capacity(policy.routes.len());
        for route in &policy.routes {
            let name = if route.name.is_empty() {
                "unnamed"
            } else {
                &route.name
            };
            let in_route = |reason: String| error(format!("route {name}: {reason}"));
            let params = compile_params(
                name,
                route.timeouts.as_ref().or(policy.timeouts.as_ref()),
                route.retry.as_ref().or(policy.retry.as_ref()),
            )
            .map_err(in_route)?;
            routes.push(Route {
                hostnames: route
                    .hostnames
                    .iter()
                    .map(|h| HostPattern::parse(h))
                    .collect::<Result<_, _>>()
                    .map_err(in_route)?,
                matches: route
                    .matches
                    .iter()
                    .map(compile_match)
                    .collect::<Result<_, _>>()
                    .map_err(in_route)?,
                filters: route
                    .filters
                    .iter()
                    .map(compile_filter)
                    .collect::<Result<_, _>>()
                    .map_err(in_route)?,
                backends: compile_backends(&route.backends).map_err(in_route)?,
                failover: route.failover,
                params: Arc::new(params),
                metrics: OnceLock::new(),
            });
        }
        let balancer = policy.balancer.clone().unwrap_or_default();
        let decay = duration(balancer.ewma_decay.as_ref()).unwrap_or(Duration::from_secs(10));
        let algorithm = match policy::balancer::Kind::try_from(balancer.kind) {
            Ok(policy::balancer::Kind::RoundRobin) => Algorithm::RoundRobin,
            Ok(policy::balancer::Kind::LeastRequest) => Algorithm::LeastRequest,
            Ok(policy::balancer::Kind::ConsistentHash) => Algorithm::ConsistentHash,
            Ok(policy::balancer::Kind::PeakEwma) => Algorithm::PeakEwma { decay },
            Err(_) => return Err(error(format!("unknown balancer kind {}", balancer.kind))),
        };
        let hash_key = match balancer.hash_key.and_then(|k| k.kind) {
            Some(policy::balancer::hash_key::Kind::Header(name)) => Some(HashKey::Header(
                HeaderName::try_from(name.as_str())
                    .map_err(|_| error(format!("hash header {name:?} is not a header name")))?,
            )),
            Some(policy::balancer::hash_key::Kind::Cookie(name)) => Some(HashKey::Cookie(name)),
            Some(policy::balancer::hash_key::Kind::ClientIp(true)) => Some(HashKey::ClientIp),
            _ => None,
        };
        let failure_accrual = policy.failure_accrual.as_ref().map(|f| FailureAccrual {
            consecutive_failures: if f.consecutive_failures == 0 {
                7
            } else {
                f.consecutive_failures
            },
            min_backoff: duration(f.min_backoff.as_ref()).unwrap_or(Duration::from_secs(1)),
            max_backoff: duration(f.max_backoff.as_ref()).unwrap_or(Duration::from_secs(60)),
        });
        let egress = policy
            .egress
            .as_ref()
            .map(EgressPlan::from_proto)
            .transpose()
            .map_err(error)?;
        Ok(Self {
            service: Arc::from(policy.service.as_str()),
            routes,
            default_route: Route {
                hostnames: Vec::new(),
                matches: Vec::new(),
                filters: Vec::new(),
                backends: default_backends,
                failover: false,
                params: Arc::new(default_params),
                metrics: OnceLock::new(),
            },
            algorithm,
            hash_key,
            failure_accrual,
            max_in_flight_per_backend: NonZeroU32::new(policy.max_in_flight_per_backend),
            egress,
        })
    }

    /// The first route with a matching rule, else the default route.
    pub fn route<B>(&self, request: &Request<B>) -> &Route {
        self.matched(request).unwrap_or(&self.default_route)
    }

    /// The route of requests no other route matches.
    pub fn default_route(&self) -> &Route {
        &self.default_route
    }

    /// The first route with a matching rule, if any.
    pub fn matched<B>(&self, request: &Request<B>) -> Option<&Route> {
        let mut host = None;
        self.routes.iter().find(|route| {
            if !route.hostnames.is_empty() {
                let host = host.get_or_insert_with(|| request_host(request));
                if !route.hostnames.iter().any(|p| p.matches(host)) {
                    return false;
                }
            }
            any_holds(&route.matches, request)
        })
    }

    /// The backends of a route, its own or the plan's defaults.
    pub fn backends<'a>(&'a self, route: &'a Route) -> &'a [WeightedBackend] {
        if route.backends.is_empty() {
            &self.default_route.backends
        } else {
            &route.backends
        }
    }
}

impl Match {
    /// Whether `request` meets every condition.
    pub fn holds<B>(&self, request: &Request<B>) -> bool {
        if let Some(method) = &self.method
            && request.method() != method
        {
            return false;
        }
        let path = request.uri().path();
        let path_ok = match &self.path {
            None => true,
            Some(PathCondition::Exact(exact)) => path == exact,
            Some(PathCondition::Prefix(prefix)) => path_has_prefix(path, prefix),
            Some(PathCondition::Regex(regex)) => regex.is_match(path),
        };
        path_ok
            && self.headers.iter().all(|(name, condition)| {
                request
                    .headers()
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| condition.holds(v))
            })
            && self.query.iter().all(|(name, condition)| {
                request
                    .uri()
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .any(|(key, value)| key == name && condition.holds(value))
            })
    }
}

/// The host a request names (its URI's authority, else `Host`), for hostname matches.
fn request_host<B>(request: &Request<B>) -> String {
    let authority = request.uri().authority().map(|a| a.as_str()).or_else(|| {
        request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    authority.map(host_of).unwrap_or_default()
}

/// Whether a route with `matches` takes `request`: no matches take everything, else any one.
pub fn any_holds<B>(matches: &[Match], request: &Request<B>) -> bool {
    matches.is_empty() || matches.iter().any(|m| m.holds(request))
}

/// A Gateway API path prefix matches whole segments: `/books` matches `/books` and
/// `/books/1` but not `/bookshelf`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn regex(text: &str) -> Result<Regex, String> {
    let invalid = |e: regex_lite::Error| format!("invalid regex {text:?}: {e}");
    // Checked alone first: a text like `a)|(b` is invalid, but would close the group below
    // and escape its anchors.
    Regex::new(text).map_err(invalid)?;
    // Gateway API regexes match the whole value.
    Regex::new(&format!("^(?:{text})$")).map_err(invalid)
}

/// Compiles a match from the controller (regexes once, here).
pub fn compile_match(wire: &policy::RouteMatch) -> Result<Match, String> {
    let path = match wire.path.as_ref().and_then(|p| p.kind.as_ref()) {
        None => None,
        Some(path_match::Kind::Exact(exact)) => Some(PathCondition::Exact(exact.clone())),
        Some(path_match::Kind::Prefix(prefix)) => Some(PathCondition::Prefix(prefix.clone())),
        Some(path_match::Kind::Regex(text)) => Some(PathCondition::Regex(regex(text)?)),
    };
    let value = |value: Option<&header_match::Value>| -> Result<ValueCondition, String> {
        match value {
            Some(header_match::Value::Exact(exact)) => Ok(ValueCondition::Exact(exact.clone())),
            Some(header_match::Value::Regex(text)) => Ok(ValueCondition::Regex(regex(text)?)),
            None => Err("a header match without a value".into()),
        }
    };
    let mut headers = Vec::new();
    for header in &wire.headers {
        let name = HeaderName::try_from(header.name.as_str())
            .map_err(|_| format!("{:?} is not a header name", header.name))?;
        headers.push((name, value(header.value.as_ref())?));
    }
    let mut query = Vec::new();
    for param in &wire.query_params {
        let condition = match &param.value {
            Some(policy::query_param_match::Value::Exact(exact)) => {
                ValueCondition::Exact(exact.clone())
            }
            Some(policy::query_param_match::Value::Regex(text)) => {
                ValueCondition::Regex(regex(text)?)
            }
            None => return Err("a query match without a value".into()),
        };
        query.push((param.name.clone(), condition));
    }
    let mut path = path;
    if let Some(grpc) = &wire.grpc {
        // A gRPC method is the path `/<service>/<method>`.
        path = match (grpc.service.is_empty(), grpc.method.is_empty()) {
            (true, true) => path,
            (false, true) => Some(PathCondition::Prefix(format!("/{}", grpc.service))),
            (false, false) => Some(PathCondition::Exact(format!(
                "/{}/{}",
                grpc.service, grpc.method
            ))),
            (true, false) => Some(PathCondition::Regex(regex(&format!(
                "/[^/]+/{}",
                regex_lite::escape(&grpc.method)
            ))?)),
        };
    }
    let method = if wire.method.is_empty() {
        None
    } else {
        Some(
            Method::from_bytes(wire.method.as_bytes())
                .map_err(|_| format!("{:?} is not an HTTP method", wire.method))?,
        )
    };
    Ok(Match {
        path,
        headers,
        query,
        method,
    })
}

fn compile_backends(wire: &[policy::WeightedBackend]) -> Result<Vec<WeightedBackend>, String> {
    wire.iter()
        .map(|weighted| {
            Ok(WeightedBackend {
                weight: weighted.weight,
                backend: compile_backend(weighted.backend.as_ref())?,
            })
        })
        .collect()
}

fn compile_backend(wire: Option<&policy::Backend>) -> Result<BackendRef, String> {
    match wire.and_then(|b| b.kind.as_ref()) {
        Some(backend::Kind::Authority(authority)) => Ok(BackendRef::Authority(authority.clone())),
        Some(backend::Kind::Addr(addr)) => SocketAddr::try_from(addr)
            .map(BackendRef::Addr)
            .map_err(|e| format!("backend address: {e}")),
        None => Err("a backend names neither an authority nor an address".into()),
    }
}

fn header_pair(header: &policy::Header) -> Result<(HeaderName, HeaderValue), String> {
    Ok((
        HeaderName::try_from(header.name.as_str())
            .map_err(|_| format!("{:?} is not a header name", header.name))?,
        HeaderValue::try_from(header.value.as_str())
            .map_err(|_| format!("{:?} is not a header value", header.value))?,
    ))
}

fn path_change(wire: Option<&policy::PathModifier>) -> Option<PathChange> {
    match wire?.kind.as_ref()? {
        path_modifier::Kind::Full(full) => Some(PathChange::Full(full.clone())),
        path_modifier::Kind::Prefix(prefix) => Some(PathChange::Prefix(prefix.clone())),
    }
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

fn compile_filter(wire: &policy::Filter) -> Result<Filter, String> {
    match wire.kind.as_ref() {
        Some(filter::Kind::RequestHeaderModifier(modifier)) => Ok(Filter::Headers {
            add: modifier
                .add
                .iter()
                .map(header_pair)
                .collect::<Result<_, _>>()?,
            set: modifier
                .set
                .iter()
                .map(header_pair)
                .collect::<Result<_, _>>()?,
            remove: modifier
                .remove
                .iter()
                .map(|name| {
                    HeaderName::try_from(name.as_str())
                        .map_err(|_| format!("{name:?} is not a header name"))
                })
                .collect::<Result<_, _>>()?,
        }),
        Some(filter::Kind::Redirect(redirect)) => Ok(Filter::Redirect {
            scheme: non_empty(&redirect.scheme),
            host: non_empty(&redirect.hostname),
            path: path_change(redirect.path.as_ref()),
            port: u16::try_from(redirect.port).ok().filter(|p| *p != 0),
            status: match redirect.status {
                0 => 302,
                301 | 302 => redirect.status as u16,
                other => return Err(format!("redirect status {other} is not 301 or 302")),
            },
        }),
        Some(filter::Kind::UrlRewrite(rewrite)) => Ok(Filter::Rewrite {
            host: non_empty(&rewrite.hostname),
            path: path_change(rewrite.path.as_ref()),
        }),
        Some(filter::Kind::Mirror(mirror)) => Ok(Filter::Mirror {
            backend: compile_backend(mirror.backend.as_ref())?,
            percent: if mirror.percent == 0 {
                100
            } else {
                mirror.percent.min(100)
            },
        }),
        Some(filter::Kind::FaultInjection(fault)) => {
            let status = u16::try_from(fault.abort_status)
                .ok()
                .filter(|s| (100..600).contains(s));
            if fault.abort_percent > 0 && status.is_none() {
                return Err(format!(
                    "fault abort status {} is not an HTTP status",
                    fault.abort_status
                ));
            }
            Ok(Filter::Fault(Fault {
                abort_percent: fault.abort_percent.min(100),
                abort_status: status.unwrap_or(503),
                delay_percent: fault.delay_percent.min(100),
                delay: duration(fault.delay.as_ref()).unwrap_or_default(),
            }))
        }
        None => Err("an empty filter".into()),
    }
}

fn compile_params(
    name: &str,
    timeouts: Option<&policy::Timeouts>,
    retry: Option<&policy::RetryPolicy>,
) -> Result<RouteParams, String> {
    let retry = match retry {
        None => None,
        Some(retry) => {
            let budget = retry.budget.unwrap_or_default();
            Some(RetryParams {
                conditions: RetryConditions::parse(&retry.conditions)?,
                limit: if retry.limit == 0 { 1 } else { retry.limit },
                per_try_timeout: duration(retry.per_try_timeout.as_ref()),
                max_body_bytes: if retry.max_body_bytes == 0 {
                    64 * 1024
                } else {
                    retry.max_body_bytes as usize
                },
                budget: Arc::new(RetryBudget::new(
                    if budget.ratio > 0.0 {
                        budget.ratio
                    } else {
                        0.2
                    },
                    if budget.min_per_second > 0 {
                        budget.min_per_second
                    } else {
                        10
                    },
                    duration(budget.ttl.as_ref()).unwrap_or(Duration::from_secs(10)),
                )),
            })
        }
    };
    Ok(RouteParams {
        name: Arc::from(name),
        request_timeout: timeouts.and_then(|t| duration(t.request.as_ref())),
        response_timeout: timeouts.and_then(|t| duration(t.response.as_ref())),
        retry,
    })
}

/// Picks a backend by weight from a uniformly random `draw`.
pub fn pick_backend(backends: &[WeightedBackend], draw: u64) -> Option<&BackendRef> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return backends.first().map(|b| &b.backend);
    }
    let mut point = draw % total;
    for weighted in backends {
        let weight = u64::from(weighted.weight);
        if point < weight {
            return Some(&weighted.backend);
        }
        point -= weight;
    }
    None
}

/// Applies a rewrite's path change to `path`, given the prefix the route matched.
pub fn rewrite_path(path: &str, change: &PathChange, matched_prefix: Option<&str>) -> String {
    match change {
        PathChange::Full(full) => full.clone(),
        PathChange::Prefix(replacement) => {
            let prefix = matched_prefix.unwrap_or("").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            let joined = format!("{replacement}{rest}");
            if joined.is_empty() {
                "/".into()
            } else {
                joined
            }
        }
    }
}

impl Route {
    /// This route's metric series, counted under `service`: made once, since a route belongs
    /// to one plan.
    pub fn metrics(&self, metrics: &Arc<Metrics>, service: &Label) -> Arc<RouteMetrics> {
        self.metrics
            .get_or_init(|| {
                Arc::new(RouteMetrics::new(
                    metrics.clone(),
                    RouteLabels {
                        authority: service.clone(),
                        route: Label::new(&self.params.name),
                    },
                ))
            })
            .clone()
    }

    /// The prefix this request matched, for prefix rewrites.
    pub fn matched_prefix<B>(&self, request: &Request<B>) -> Option<&str> {
        self.matches
            .iter()
            .find(|m| m.holds(request))
            .and_then(|m| match &m.path {
                Some(PathCondition::Prefix(prefix)) => Some(prefix.as_str()),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::policy::{HeaderMatch, PathMatch, QueryParamMatch, RouteMatch};

    fn authority(name: &str) -> Option<policy::Backend> {
        Some(policy::Backend {
            kind: Some(backend::Kind::Authority(name.into())),
        })
    }

    fn plan(routes: Vec<policy::Route>) -> OutboundPlan {
        OutboundPlan::from_proto(&policy::OutboundPolicy {
            service: "books.shop.svc.cluster.local:8080".into(),
            routes,
            default_backends: vec![policy::WeightedBackend {
                weight: 1,
                backend: authority("books.shop.svc.cluster.local:8080"),
            }],
            ..Default::default()
        })
        .expect("valid plan")
    }

    fn route(name: &str, matches: Vec<RouteMatch>) -> policy::Route {
        policy::Route {
            name: name.into(),
            matches,
            backends: vec![policy::WeightedBackend {
                weight: 1,
                backend: authority(&format!("{name}.shop.svc.cluster.local:8080")),
            }],
            ..Default::default()
        }
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn the_first_matching_route_wins() {
        let plan = plan(vec![
            route(
                "canary",
                vec![RouteMatch {
                    headers: vec![HeaderMatch {
                        name: "x-canary".into(),
                        value: Some(header_match::Value::Exact("1".into())),
                    }],
                    ..Default::default()
                }],
            ),
            route(
                "exact",
                vec![RouteMatch {
                    path: Some(PathMatch {
                        kind: Some(path_match::Kind::Exact("/books/1".into())),
                    }),
                    method: "GET".into(),
                    ..Default::default()
                }],
            ),
            route(
                "prefix",
                vec![RouteMatch {
                    path: Some(PathMatch {
                        kind: Some(path_match::Kind::Prefix("/books".into())),
                    }),
                    ..Default::default()
                }],
            ),
            route(
                "regex-query",
                vec![RouteMatch {
                    path: Some(PathMatch {
                        kind: Some(path_match::Kind::Regex("/v[0-9]+/.*".into())),
                    }),
                    query_params: vec![QueryParamMatch {
                        name: "page".into(),
                        value: Some(policy::query_param_match::Value::Regex("[0-9]+".into())),
                    }],
                    ..Default::default()
                }],
            ),
        ]);
        let cases = [
            (request("GET", "/anything", &[("x-canary", "1")]), "canary"),
            (request("GET", "/books/1", &[]), "exact"),
            (request("POST", "/books/1", &[]), "prefix"),
            (request("GET", "/books", &[]), "prefix"),
            (request("GET", "/bookshelf", &[]), "default"),
            (request("GET", "/v2/list?page=3", &[]), "regex-query"),
            (request("GET", "/v2/list?page=last", &[]), "default"),
            (request("GET", "/x", &[("x-canary", "0")]), "default"),
        ];
        for (request, want) in cases {
            let route = plan.route(&request);
            assert_eq!(&*route.params.name, want, "{}", request.uri());
        }
    }

    #[test]
    fn routes_with_hostnames_take_only_requests_for_those_hosts() {
        let mut api = route("api", vec![]);
        api.hostnames = vec!["api.example.com".into()];
        let mut cdn = route(
            "cdn",
            vec![RouteMatch {
                path: Some(PathMatch {
                    kind: Some(path_match::Kind::Prefix("/v1".into())),
                }),
                ..Default::default()
            }],
        );
        cdn.hostnames = vec!["*.example.org".into()];
        let plan = plan(vec![api, cdn]);
        let cases = [
            (
                request("GET", "/x", &[("host", "API.example.com:80")]),
                Some("api"),
            ),
            (request("GET", "/x", &[("host", "www.example.com")]), None),
            (
                request("GET", "http://img.example.org/v1/a", &[]),
                Some("cdn"),
            ),
            (
                request("GET", "/v2/a", &[("host", "img.example.org")]),
                None,
            ),
            (request("GET", "/v1/a", &[("host", "example.org")]), None),
            (request("GET", "/v1/a", &[]), None),
        ];
        for (request, want) in cases {
            let got = plan.matched(&request).map(|r| &*r.params.name);
            assert_eq!(got, want, "{} {:?}", request.uri(), request.headers());
        }
    }

    #[test]
    fn grpc_methods_match_their_paths() {
        let plan = plan(vec![route(
            "get-book",
            vec![RouteMatch {
                grpc: Some(policy::GrpcMethodMatch {
                    service: "mesh.demo.v1.Books".into(),
                    method: "Get".into(),
                }),
                ..Default::default()
            }],
        )]);
        let hit = request("POST", "/mesh.demo.v1.Books/Get", &[]);
        let miss = request("POST", "/mesh.demo.v1.Books/List", &[]);
        assert_eq!(&*plan.route(&hit).params.name, "get-book");
        assert_eq!(&*plan.route(&miss).params.name, "default");
    }

    #[test]
    fn invalid_policies_are_refused_with_the_route_and_reason() {
        let bad = OutboundPlan::from_proto(&policy::OutboundPolicy {
            service: "books".into(),
            routes: vec![route(
                "broken",
                vec![RouteMatch {
                    path: Some(PathMatch {
                        kind: Some(path_match::Kind::Regex("(".into())),
                    }),
                    ..Default::default()
                }],
            )],
            ..Default::default()
        })
        .expect_err("bad regex");
        let text = bad.to_string();
        assert!(
            text.contains("route broken") && text.contains("invalid regex"),
            "{text}"
        );
    }

    /// Found by fuzzing (tests/fuzz): `a)|(b` closed the group the anchors wrap, compiling to
    /// `^(?:a)|(b)$`, which matches any path starting with `a`.
    #[test]
    fn a_regex_cannot_escape_its_anchors() {
        let wire = RouteMatch {
            path: Some(PathMatch {
                kind: Some(path_match::Kind::Regex("a)|(b".into())),
            }),
            ..Default::default()
        };
        let error = compile_match(&wire).expect_err("invalid on its own");
        assert!(error.contains("invalid regex"), "{error}");
    }

    #[test]
    fn weighted_backends_split_by_weight() {
        let backends = vec![
            WeightedBackend {
                weight: 90,
                backend: BackendRef::Authority("stable".into()),
            },
            WeightedBackend {
                weight: 10,
                backend: BackendRef::Authority("canary".into()),
            },
        ];
        let canary = (0..1000u64)
            .filter(|draw| {
                pick_backend(&backends, *draw) == Some(&BackendRef::Authority("canary".into()))
            })
            .count();
        assert_eq!(canary, 100);
        assert!(pick_backend(&[], 3).is_none());
    }

    #[test]
    fn prefixes_match_whole_segments_and_rewrite() {
        assert!(path_has_prefix("/books/1", "/books"));
        assert!(path_has_prefix("/books", "/books/"));
        assert!(!path_has_prefix("/bookshelf", "/books"));
        assert!(path_has_prefix("/anything", "/"));
        let prefix = PathChange::Prefix("/v2/books".into());
        assert_eq!(
            rewrite_path("/books/1", &prefix, Some("/books")),
            "/v2/books/1"
        );
        assert_eq!(
            rewrite_path("/books/1", &PathChange::Full("/all".into()), Some("/books")),
            "/all"
        );
        assert_eq!(
            rewrite_path("/books", &PathChange::Prefix("/".into()), Some("/books")),
            "/"
        );
    }
}
