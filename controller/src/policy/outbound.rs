//! The outbound policy of one Service port as seen from one source: a pure function from a
//! [`PolicyInputs`] snapshot to the `OutboundPolicy` the proxy compiles.
//!
//! Sources, in order:
//! - Gateway API routes attached to the Service (parentRef `kind: Service`, the GAMMA
//!   pattern), optionally to one port: the Service's own namespace's routes ("producer"
//!   routes), and the source's namespace's routes naming the Service ("consumer" routes),
//!   which replace the producer routes for that source. Invalid routes are left out and
//!   reported as [`Problem`]s.
//! - The Service's annotations (`policy::annotations`): retries, timeouts, balancer, failure
//!   accrual, fault injection (a filter on every route), concurrency. Invalid ones are left
//!   out and reported.
//!
//! A Service with neither has no policy (`None`): the proxy routes by discovery alone.

use std::fmt;
use std::net::SocketAddr;

use k8s_openapi::api::core::v1::Service;
use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::{
    Backend, Filter, OutboundPolicy, Protocol, Route, WeightedBackend, backend, filter,
    outbound_policy_request,
};

use super::annotations;
use super::egress::{self, EgressSettings};
use super::gateway::ParentReference;
use super::routes::{self, RankedRoute, RouteContext, RouteProblem};
use super::store::PolicyInputs;
use crate::objects::{Kind, ObjectKey};
use crate::target::{self, Target, TargetError};

/// The cluster settings outbound policies depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundSettings {
    /// The cluster's DNS domain (`name.ns.svc.<domain>`).
    pub cluster_domain: String,
    /// Traffic leaving the mesh.
    pub egress: EgressSettings,
}

impl Default for OutboundSettings {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".to_owned(),
            egress: EgressSettings::default(),
        }
    }
}

/// What a request asks for, before it is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetRequest {
    /// A Service port by name.
    Service(ServiceTarget),
    /// A cluster IP and port.
    Addr(SocketAddr),
}

impl fmt::Display for TargetRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetRequest::Service(s) => s.fmt(f),
            TargetRequest::Addr(a) => a.fmt(f),
        }
    }
}

impl TargetRequest {
    /// Reads the target of an `OutboundPolicyRequest`.
    pub fn from_proto(
        target: Option<&outbound_policy_request::Target>,
        source: &WorkloadRef,
        settings: &OutboundSettings,
    ) -> Result<Self, TargetError> {
        let source_namespace = Some(source.namespace.as_str()).filter(|ns| !ns.is_empty());
        let parsed = match target {
            None => return Err(TargetError::Missing),
            Some(outbound_policy_request::Target::Authority(authority)) => {
                target::parse_authority(authority, &settings.cluster_domain, source_namespace)?
            }
            Some(outbound_policy_request::Target::Addr(addr)) => Target::Addr(
                SocketAddr::try_from(addr).map_err(|e| TargetError::BadAddress(e.to_string()))?,
            ),
        };
        Ok(match parsed {
            Target::Service {
                namespace,
                name,
                port,
            } => TargetRequest::Service(ServiceTarget {
                namespace,
                name,
                port,
            }),
            Target::Addr(addr) => TargetRequest::Addr(addr),
        })
    }
}

/// A Service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceTarget {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service port.
    pub port: u16,
}

impl fmt::Display for ServiceTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.svc:{}", self.name, self.namespace, self.port)
    }
}

fn service_has_port(service: &Service, port: u16) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .any(|p| p.port == i32::from(port) && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
}

/// A Service's cluster IPs (both families), as parsed.
pub(super) fn cluster_ips(service: &Service) -> impl Iterator<Item = std::net::IpAddr> + '_ {
    let spec = service.spec.as_ref();
    spec.and_then(|s| s.cluster_ips.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.cluster_ip.as_ref()))
        .filter_map(|ip| ip.parse().ok())
}

/// The Service port a request names, if there is one.
pub fn resolve_target(inputs: &PolicyInputs, request: &TargetRequest) -> Option<ServiceTarget> {
    match request {
        TargetRequest::Service(target) => inputs
            .namespace(&target.namespace)?
            .services
            .get(&target.name)
            .filter(|s| service_has_port(s, target.port))
            .map(|_| target.clone()),
        TargetRequest::Addr(addr) => inputs.namespaces().find_map(|(ns, objects)| {
            objects.services.iter().find_map(|(name, service)| {
                (cluster_ips(service).any(|ip| ip == addr.ip())
                    && service_has_port(service, addr.port()))
                .then(|| ServiceTarget {
                    namespace: ns.to_owned(),
                    name: name.clone(),
                    port: addr.port(),
                })
            })
        }),
    }
}

/// Something invalid in an object the policy reads; the object (or the annotation) is left
/// out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The object's kind.
    pub kind: Kind,
    /// The object.
    pub object: ObjectKey,
    /// The field (`spec.rules[0].matches[0].path.value`, `metadata.annotations[...]`).
    pub field: String,
    /// Its value.
    pub value: String,
    /// Why it is invalid.
    pub reason: String,
    /// The Gateway API condition reason, for routes' status.
    pub condition_reason: &'static str,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} = {:?}: {}",
            self.kind, self.object, self.field, self.value, self.reason
        )
    }
}

impl Problem {
    /// A route's problem as the object's.
    pub fn of_route(kind: Kind, object: ObjectKey, p: RouteProblem) -> Self {
        Self {
            kind,
            object,
            field: p.field,
            value: p.value,
            reason: p.reason,
            condition_reason: p.condition_reason,
        }
    }
}

/// A policy and what was left out of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboundOutcome {
    /// The policy; `None` when the Service has neither routes nor annotations (or is gone).
    pub policy: Option<OutboundPolicy>,
    /// What was invalid (and left out).
    pub problems: Vec<Problem>,
}

/// Whether a parentRef names this Service (and port).
pub fn parent_is_service(
    parent: &ParentReference,
    route_namespace: &str,
    target: &ServiceTarget,
) -> bool {
    let core = parent
        .group
        .as_deref()
        .is_some_and(|g| g.is_empty() || g == "core");
    core && parent.kind.as_deref() == Some("Service")
        && parent.name == target.name
        && parent.namespace.as_deref().unwrap_or(route_namespace) == target.namespace
        && parent.port.is_none_or(|p| p == i32::from(target.port))
}

/// The routes of one namespace's route objects attached to the target.
fn attached_routes(
    inputs: &PolicyInputs,
    namespace: &str,
    target: &ServiceTarget,
    settings: &OutboundSettings,
    problems: &mut Vec<Problem>,
) -> (Vec<RankedRoute>, bool) {
    let Some(objects) = inputs.namespace(namespace) else {
        return (Vec::new(), false);
    };
    let ctx = RouteContext {
        namespace,
        port: target.port,
        cluster_domain: &settings.cluster_domain,
        egress: None,
    };
    let mut ranked = Vec::new();
    let mut any = false;
    let attached = |parents: &[ParentReference]| {
        parents
            .iter()
            .any(|p| parent_is_service(p, namespace, target))
    };
    for (name, route) in &objects.http_routes {
        if !attached(&route.spec.parent_refs) {
            continue;
        }
        any = true;
        match routes::http_routes(route, ctx) {
            Ok(mut r) => ranked.append(&mut r),
            Err(p) => problems.push(Problem::of_route(
                Kind::HTTPRoute,
                ObjectKey::new(namespace, name.as_str()),
                p,
            )),
        }
    }
    for (name, route) in &objects.grpc_routes {
        if !attached(&route.spec.parent_refs) {
            continue;
        }
        any = true;
        match routes::grpc_routes(route, ctx) {
            Ok(mut r) => ranked.append(&mut r),
            Err(p) => problems.push(Problem::of_route(
                Kind::GRPCRoute,
                ObjectKey::new(namespace, name.as_str()),
                p,
            )),
        }
    }
    (ranked, any)
}

/// The policy for `target` as seen from `source`.
pub fn outbound_policy(
    inputs: &PolicyInputs,
    target: &ServiceTarget,
    source: &WorkloadRef,
    settings: &OutboundSettings,
) -> OutboundOutcome {
    let mut problems = Vec::new();
    let Some(service) = inputs
        .namespace(&target.namespace)
        .and_then(|ns| ns.services.get(&target.name))
    else {
        return OutboundOutcome::default();
    };
    // Consumer routes (in the source's namespace) replace producer routes for that source.
    let mut ranked = Vec::new();
    let mut has_routes = false;
    if !source.namespace.is_empty() && source.namespace != target.namespace {
        let (consumer, any) =
            attached_routes(inputs, &source.namespace, target, settings, &mut problems);
        ranked = consumer;
        has_routes = any;
    }
    if !has_routes {
        let (producer, any) =
            attached_routes(inputs, &target.namespace, target, settings, &mut problems);
        ranked = producer;
        has_routes = any;
    }
    ranked.sort_by(|a, b| a.precedence.cmp(&b.precedence));

    let (annotated, annotation_problems) =
        annotations::parse(service.metadata.annotations.as_ref());
    let service_key = ObjectKey::new(target.namespace.as_str(), target.name.as_str());
    problems.extend(annotation_problems.into_iter().map(|p| Problem {
        kind: Kind::Service,
        object: service_key.clone(),
        field: format!("metadata.annotations[{}]", p.annotation),
        value: p.value,
        reason: p.reason,
        condition_reason: "UnsupportedValue",
    }));
    if let Some(failover) = annotated.failover {
        problems.push(Problem {
            kind: Kind::Service,
            object: service_key.clone(),
            field: format!("metadata.annotations[{}]", annotations::BALANCER_FAILOVER),
            value: failover.to_string(),
            reason: "orders a route's backendRefs: put it on the HTTPRoute or GRPCRoute".to_owned(),
            condition_reason: "UnsupportedValue",
        });
    }
    if !has_routes && annotated.is_empty() {
        return OutboundOutcome {
            policy: None,
            problems,
        };
    }

    let mut policy = plain_policy(target, settings);
    let mut routes: Vec<Route> = ranked.into_iter().map(|r| r.route).collect();
    if let Some(fault) = annotated.fault {
        let fault = Filter {
            kind: Some(filter::Kind::FaultInjection(fault)),
        };
        for route in &mut routes {
            route.filters.insert(0, fault.clone());
        }
        // Requests no route matches meet the fault too.
        routes.push(Route {
            name: "default".to_owned(),
            filters: vec![fault],
            ..Route::default()
        });
    }
    policy.protocol = protocol(service, target.port) as i32;
    policy.routes = routes;
    policy.balancer = annotated.balancer;
    policy.failure_accrual = annotated.failure_accrual;
    policy.timeouts = annotated.timeouts;
    policy.retry = annotated.retry;
    policy.max_in_flight_per_backend = annotated.max_in_flight.unwrap_or(0);
    OutboundOutcome {
        policy: Some(policy),
        problems,
    }
}

/// The protocol of a Service port: its `appProtocol`, else opaque when annotated so, else
/// detected.
fn protocol(service: &Service, port: u16) -> Protocol {
    let service_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .find(|p| p.port == i32::from(port));
    let app_protocol = service_port
        .and_then(|p| p.app_protocol.as_deref())
        .map(str::to_ascii_lowercase);
    match app_protocol.as_deref() {
        Some("http" | "kubernetes.io/http") => return Protocol::Http1,
        Some("http2" | "h2c" | "kubernetes.io/h2c") => return Protocol::Http2,
        Some("grpc") => return Protocol::Grpc,
        _ => {}
    }
    let opaque = crate::meta::opaque_ports(service.metadata.annotations.as_ref())
        .contains(port, service_port.and_then(|p| p.name.as_deref()));
    if opaque {
        Protocol::Opaque
    } else {
        Protocol::Detect
    }
}

/// The policy of a target with no routes or annotations: everything to the Service itself,
/// exactly what discovery alone does.
pub fn plain_policy(target: &ServiceTarget, settings: &OutboundSettings) -> OutboundPolicy {
    let service = routes::authority(
        &target.name,
        &target.namespace,
        &settings.cluster_domain,
        target.port,
    );
    OutboundPolicy {
        service: service.clone(),
        protocol: Protocol::Detect as i32,
        routes: Vec::new(),
        default_backends: vec![WeightedBackend {
            weight: 1,
            backend: Some(Backend {
                kind: Some(backend::Kind::Authority(service)),
            }),
        }],
        balancer: None,
        failure_accrual: None,
        timeouts: None,
        retry: None,
        max_in_flight_per_backend: 0,
        labels: [
            ("kind".to_owned(), "Service".to_owned()),
            ("name".to_owned(), target.name.clone()),
            ("namespace".to_owned(), target.namespace.clone()),
        ]
        .into(),
        egress: None,
    }
}

/// Every problem of every route object, Service and EgressNetwork in the snapshot, whatever
/// targets them: what `policy::report` logs, counts and writes to route status.
pub fn all_problems(inputs: &PolicyInputs, settings: &OutboundSettings) -> Vec<Problem> {
    let mut problems = egress::all_problems(inputs, settings);
    for (namespace, objects) in inputs.namespaces() {
        for (name, route) in &objects.http_routes {
            for port in route_ports(&route.spec.parent_refs, namespace, inputs) {
                let ctx = RouteContext {
                    namespace,
                    port,
                    cluster_domain: &settings.cluster_domain,
                    egress: None,
                };
                if let Err(p) = routes::http_routes(route, ctx) {
                    problems.push(Problem::of_route(
                        Kind::HTTPRoute,
                        ObjectKey::new(namespace, name.as_str()),
                        p,
                    ));
                    break;
                }
            }
        }
        for (name, route) in &objects.grpc_routes {
            for port in route_ports(&route.spec.parent_refs, namespace, inputs) {
                let ctx = RouteContext {
                    namespace,
                    port,
                    cluster_domain: &settings.cluster_domain,
                    egress: None,
                };
                if let Err(p) = routes::grpc_routes(route, ctx) {
                    problems.push(Problem::of_route(
                        Kind::GRPCRoute,
                        ObjectKey::new(namespace, name.as_str()),
                        p,
                    ));
                    break;
                }
            }
        }
        for (name, service) in &objects.services {
            let (_, annotation_problems) =
                annotations::parse(service.metadata.annotations.as_ref());
            problems.extend(annotation_problems.into_iter().map(|p| Problem {
                kind: Kind::Service,
                object: ObjectKey::new(namespace, name.as_str()),
                field: format!("metadata.annotations[{}]", p.annotation),
                value: p.value,
                reason: p.reason,
                condition_reason: "UnsupportedValue",
            }));
        }
    }
    problems
}

/// The port a route is validated for: its first Service parent's, else any (validity does
/// not depend on the port, save for backends without one, which take it). Routes attached to
/// no Service are not the mesh's to judge.
fn route_ports(parents: &[ParentReference], _namespace: &str, _inputs: &PolicyInputs) -> Vec<u16> {
    parents
        .iter()
        .find(|p| attaches_to_services(std::slice::from_ref(p)))
        .map(|p| p.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(1))
        .into_iter()
        .collect()
}

/// Whether a route object attaches to any Service (GAMMA) at all.
pub fn attaches_to_services(parents: &[ParentReference]) -> bool {
    parents.iter().any(|p| {
        p.kind.as_deref() == Some("Service")
            && p.group
                .as_deref()
                .is_some_and(|g| g.is_empty() || g == "core")
    })
}

#[cfg(test)]
mod tests;
