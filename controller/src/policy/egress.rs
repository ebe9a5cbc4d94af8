//! The egress policy of a destination outside the mesh, as seen from one source: a pure
//! function from a [`PolicyInputs`] snapshot to the `OutboundPolicy` (with its `Egress`) the
//! proxy enforces.
//!
//! - **Outside the mesh** is an address that is no Service's cluster IP and no pod's IP (a
//!   host-network pod's IP is its node's, and counts as outside).
//! - **Which EgressNetwork.** The source's namespace's networks first, then those of the
//!   global namespace (the control plane's), which apply to every client. Within a namespace,
//!   the network whose matching CIDR is the most specific wins (a network without `networks`
//!   covers every outside address, least specifically); ties go to the name.
//! - **Routes.** HTTPRoutes and GRPCRoutes whose parentRef names the network (optionally one
//!   port) allow what they match, by host name (their `hostnames`), path, headers or method;
//!   a backendRef naming the network sends to the destination asked for, one naming a
//!   Service redirects there. TLSRoutes allow server names (SNI), TCPRoutes a whole port.
//!   Routes in the source's namespace that name the network replace the network's own for
//!   that source, as consumer routes do for Services.
//! - **Everything else** gets the network's `trafficPolicy`; with no network, the mesh-wide
//!   default ([`EgressSettings::default_policy`]).
//!
//! A network with an invalid field is left out, and reported like an invalid route.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::{Egress, OutboundPolicy, Protocol, Route, egress};

use super::crds::{EgressNetwork, GROUP};
use super::gateway::ParentReference;
use super::outbound::{self, OutboundSettings, Problem};
use super::routes::{self, RankedRoute, RouteContext, RouteProblem};
use super::store::{NamespaceObjects, PolicyInputs};
use crate::objects::{Kind, ObjectKey};

/// What happens to traffic leaving the mesh that no route allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Forwarded to where it was going.
    #[default]
    Allow,
    /// Refused.
    Deny,
}

impl FromStr for TrafficPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "Allow" | "allow" => Ok(Self::Allow),
            "Deny" | "deny" => Ok(Self::Deny),
            other => Err(format!("{other:?} is not Allow or Deny")),
        }
    }
}

impl fmt::Display for TrafficPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "Allow",
            Self::Deny => "Deny",
        })
    }
}

/// The mesh-wide egress settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSettings {
    /// The namespace whose EgressNetworks apply to clients of every namespace.
    pub global_namespace: String,
    /// What happens to traffic to a destination outside the mesh that no EgressNetwork covers.
    pub default_policy: TrafficPolicy,
}

impl Default for EgressSettings {
    fn default() -> Self {
        Self {
            global_namespace: "mesh-system".to_owned(),
            default_policy: TrafficPolicy::Allow,
        }
    }
}

/// An EgressNetwork, validated.
#[derive(Debug)]
struct Network<'a> {
    namespace: &'a str,
    name: &'a str,
    /// `(cidr, except)`; empty covers every outside address.
    networks: Vec<(IpNet, Vec<IpNet>)>,
    policy: TrafficPolicy,
}

impl Network<'_> {
    /// How specifically the network covers `ip` (a longer prefix is more specific), or `None`
    /// when it does not.
    fn covers(&self, ip: IpAddr) -> Option<i16> {
        if self.networks.is_empty() {
            return Some(-1);
        }
        self.networks
            .iter()
            .filter(|(net, except)| net.contains(&ip) && !except.iter().any(|e| e.contains(&ip)))
            .map(|(net, _)| i16::from(net.prefix_len()))
            .max()
    }
}

/// A CIDR, or a single IP as its /32 or /128: how every policy kind writes a network.
pub(super) fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Reads one EgressNetwork, or the problem that leaves it out.
fn network<'a>(
    namespace: &'a str,
    name: &'a str,
    object: &EgressNetwork,
) -> Result<Network<'a>, RouteProblem> {
    let problem = |field: String, value: &str, reason: &str| RouteProblem {
        field,
        value: value.to_owned(),
        reason: reason.to_owned(),
        condition_reason: "UnsupportedValue",
    };
    let policy = object.spec.traffic_policy.parse().map_err(|_| {
        problem(
            "spec.trafficPolicy".to_owned(),
            &object.spec.traffic_policy,
            "not Allow or Deny",
        )
    })?;
    let cidr = |field: String, text: &str| {
        parse_net(text).ok_or_else(|| problem(field, text, "not a CIDR or an IP"))
    };
    let mut networks = Vec::with_capacity(object.spec.networks.len());
    for (i, spec) in object.spec.networks.iter().enumerate() {
        let net = cidr(format!("spec.networks[{i}].cidr"), &spec.cidr)?;
        let except = (spec.except.iter().enumerate())
            .map(|(j, text)| cidr(format!("spec.networks[{i}].except[{j}]"), text))
            .collect::<Result<_, _>>()?;
        networks.push((net, except));
    }
    Ok(Network {
        namespace,
        name,
        networks,
        policy,
    })
}

/// The network of `namespace` that covers `ip` most specifically.
fn covering_in<'a>(
    namespace: &'a str,
    objects: &'a NamespaceObjects,
    ip: IpAddr,
) -> Option<Network<'a>> {
    let mut best: Option<(i16, Network<'a>)> = None;
    // In name order, so among equally specific networks the first name wins.
    for (name, object) in &objects.egress_networks {
        let Ok(network) = network(namespace, name, object) else {
            continue;
        };
        if let Some(rank) = network.covers(ip)
            && best.as_ref().is_none_or(|(best, _)| rank > *best)
        {
            best = Some((rank, network));
        }
    }
    best.map(|(_, network)| network)
}

/// Whether `ip` is a Service's cluster IP or a pod's IP (not a host-network pod's: that is a
/// node's address). It scans every Service and pod, so
/// callers ask once per stream, not per snapshot.
pub fn in_mesh(inputs: &PolicyInputs, ip: IpAddr) -> bool {
    inputs.namespaces().any(|(_, objects)| {
        objects
            .services
            .values()
            .any(|service| outbound::cluster_ips(service).any(|cluster_ip| cluster_ip == ip))
            || objects.pods_and_external_workloads().any(|pod| {
                // A host-network pod's IP is its node's: no proxy of the mesh answers there.
                let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
                !host_network
                    && pod
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.as_deref())
                        .is_some_and(|text| text.parse::<IpAddr>() == Ok(ip))
            })
    })
}

/// Whether a parentRef names the network (and, when it names a port, this one).
fn parent_is_network(
    parent: &ParentReference,
    route_namespace: &str,
    network: &Network<'_>,
    port: u16,
) -> bool {
    parent.group.as_deref() == Some(GROUP)
        && parent.kind.as_deref() == Some("EgressNetwork")
        && parent.name == network.name
        && parent.namespace.as_deref().unwrap_or(route_namespace) == network.namespace
        && parent.port.is_none_or(|p| p == i32::from(port))
}

/// Whether any parentRef names some EgressNetwork.
pub fn attaches_to_networks(parents: &[ParentReference]) -> bool {
    parents
        .iter()
        .any(|p| p.group.as_deref() == Some(GROUP) && p.kind.as_deref() == Some("EgressNetwork"))
}

/// What one namespace's routes allow on the network.
#[derive(Default)]
struct Attached {
    any: bool,
    routes: Vec<RankedRoute>,
    tls_hosts: Vec<String>,
    tcp_allowed: bool,
}

/// Why a route hostname is not a DNS name, or `*.` and one.
fn hostname_problem(name: &str) -> Option<&'static str> {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    (!valid).then_some("not a host name (a DNS name, or `*.` and one)")
}

/// A route's hostnames, lower-cased, or the problem.
fn hostnames(names: &[String]) -> Result<Vec<String>, RouteProblem> {
    for (i, name) in names.iter().enumerate() {
        if let Some(reason) = hostname_problem(name) {
            return Err(RouteProblem {
                field: format!("spec.hostnames[{i}]"),
                value: name.clone(),
                reason: reason.to_owned(),
                condition_reason: "UnsupportedValue",
            });
        }
    }
    Ok(names.iter().map(|n| n.to_ascii_lowercase()).collect())
}

/// The routes of `namespace` attached to `network` for `destination`.
fn attached(
    inputs: &PolicyInputs,
    namespace: &str,
    network: &Network<'_>,
    destination: SocketAddr,
    settings: &OutboundSettings,
    problems: &mut Vec<Problem>,
) -> Attached {
    let mut out = Attached::default();
    let Some(objects) = inputs.namespace(namespace) else {
        return out;
    };
    let port = destination.port();
    let ctx = RouteContext {
        namespace,
        port,
        cluster_domain: &settings.cluster_domain,
        egress: Some(destination),
    };
    let on_network = |parents: &[ParentReference]| {
        parents
            .iter()
            .any(|p| parent_is_network(p, namespace, network, port))
    };
    let mut problem = |kind: Kind, name: &str, p: RouteProblem| {
        problems.push(Problem::of_route(kind, ObjectKey::new(namespace, name), p));
    };
    // HTTP and gRPC routes: each rule takes only requests for the route's hostnames.
    let http = (objects.http_routes.iter())
        .filter(|(_, r)| on_network(&r.spec.parent_refs))
        .map(|(name, r)| {
            let ranked = hostnames(&r.spec.hostnames)
                .and_then(|hosts| Ok((hosts, routes::http_routes(r, ctx)?)));
            (Kind::HTTPRoute, name, ranked)
        });
    let grpc = (objects.grpc_routes.iter())
        .filter(|(_, r)| on_network(&r.spec.parent_refs))
        .map(|(name, r)| {
            let ranked = hostnames(&r.spec.hostnames)
                .and_then(|hosts| Ok((hosts, routes::grpc_routes(r, ctx)?)));
            (Kind::GRPCRoute, name, ranked)
        });
    for (kind, name, ranked) in http.chain(grpc) {
        out.any = true;
        match ranked {
            Ok((hosts, ranked)) => out.routes.extend(ranked.into_iter().map(|mut r| {
                r.route.hostnames.clone_from(&hosts);
                r
            })),
            Err(p) => problem(kind, name, p),
        }
    }
    for (name, route) in &objects.tls_routes {
        if !on_network(&route.spec.parent_refs) {
            continue;
        }
        out.any = true;
        match hostnames(&route.spec.hostnames) {
            // A TLSRoute without host names takes every server name.
            Ok(hosts) if hosts.is_empty() => out.tls_hosts.push("*".to_owned()),
            Ok(hosts) => out.tls_hosts.extend(hosts),
            Err(p) => problem(Kind::TLSRoute, name, p),
        }
    }
    if objects
        .tcp_routes
        .values()
        .any(|route| on_network(&route.spec.parent_refs))
    {
        out.any = true;
        out.tcp_allowed = true;
    }
    out
}

/// The egress policy of `destination`, an address outside the mesh ([`in_mesh`] is false), as
/// seen from `source`: `None` when nothing would differ from forwarding it unchanged (no
/// network covers it and the mesh-wide default allows).
pub fn egress_policy(
    inputs: &PolicyInputs,
    destination: SocketAddr,
    source: &WorkloadRef,
    settings: &OutboundSettings,
) -> (Option<OutboundPolicy>, Vec<Problem>) {
    let ip = destination.ip();
    let local = inputs
        .namespace(&source.namespace)
        .filter(|_| !source.namespace.is_empty())
        .and_then(|objects| covering_in(&source.namespace, objects, ip));
    let network = local.or_else(|| {
        let global = settings.egress.global_namespace.as_str();
        inputs
            .namespace(global)
            .and_then(|objects| covering_in(global, objects, ip))
    });
    if network.is_none() && settings.egress.default_policy == TrafficPolicy::Allow {
        return (None, Vec::new());
    }
    let mut problems = Vec::new();
    let Some(network) = network else {
        return (
            Some(policy(
                destination,
                None,
                Attached::default(),
                settings.egress.default_policy,
            )),
            problems,
        );
    };
    let mut attached_routes = Attached::default();
    if !source.namespace.is_empty() && source.namespace != network.namespace {
        attached_routes = attached(
            inputs,
            &source.namespace,
            &network,
            destination,
            settings,
            &mut problems,
        );
    }
    if !attached_routes.any {
        attached_routes = attached(
            inputs,
            network.namespace,
            &network,
            destination,
            settings,
            &mut problems,
        );
    }
    attached_routes
        .routes
        .sort_by(|a, b| a.precedence.cmp(&b.precedence));
    let policy_of_network = network.policy;
    (
        Some(policy(
            destination,
            Some(&network),
            attached_routes,
            policy_of_network,
        )),
        problems,
    )
}

/// The policy of a destination nothing restricts any more (its network went away).
pub fn unrestricted(destination: SocketAddr) -> OutboundPolicy {
    policy(destination, None, Attached::default(), TrafficPolicy::Allow)
}

fn policy(
    destination: SocketAddr,
    network: Option<&Network<'_>>,
    attached: Attached,
    traffic_policy: TrafficPolicy,
) -> OutboundPolicy {
    let (network_name, labels) = match network {
        Some(n) => (
            format!("{}/{}", n.namespace, n.name),
            [
                ("kind".to_owned(), "EgressNetwork".to_owned()),
                ("name".to_owned(), n.name.to_owned()),
                ("namespace".to_owned(), n.namespace.to_owned()),
            ]
            .into(),
        ),
        None => (
            String::new(),
            [("kind".to_owned(), "default".to_owned())].into(),
        ),
    };
    OutboundPolicy {
        service: destination.to_string(),
        protocol: Protocol::Detect as i32,
        routes: attached
            .routes
            .into_iter()
            .map(|r| r.route)
            .collect::<Vec<Route>>(),
        // No default backends: what no route sends elsewhere goes where it was going.
        default_backends: Vec::new(),
        labels,
        egress: Some(Egress {
            network: network_name,
            traffic_policy: match traffic_policy {
                TrafficPolicy::Allow => egress::TrafficPolicy::Allow,
                TrafficPolicy::Deny => egress::TrafficPolicy::Deny,
            } as i32,
            tls_hosts: attached.tls_hosts,
            tcp_allowed: attached.tcp_allowed,
        }),
        ..OutboundPolicy::default()
    }
}

/// Every problem of every EgressNetwork, and of every route attached to one (routes attached
/// to no Service are otherwise not checked).
pub fn all_problems(inputs: &PolicyInputs, settings: &OutboundSettings) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (namespace, objects) in inputs.namespaces() {
        for (name, object) in &objects.egress_networks {
            let network = match network(namespace, name, object) {
                Ok(network) => network,
                Err(p) => {
                    let key = ObjectKey::new(namespace, name.as_str());
                    problems.push(Problem::of_route(Kind::EgressNetwork, key, p));
                    continue;
                }
            };
            // Any outside address, for the routes' sake: their validity does not depend on it.
            let destination = SocketAddr::from(([192, 0, 2, 1], 1));
            for port in network_ports(objects, &network) {
                let destination = SocketAddr::new(destination.ip(), port);
                attached(
                    inputs,
                    namespace,
                    &network,
                    destination,
                    settings,
                    &mut problems,
                );
            }
        }
    }
    problems.sort_by(|a, b| (a.kind, &a.object, &a.field).cmp(&(b.kind, &b.object, &b.field)));
    problems.dedup();
    problems
}

/// The ports the network's own routes name (1 standing for "every port").
fn network_ports(objects: &NamespaceObjects, network: &Network<'_>) -> Vec<u16> {
    let parents = objects
        .http_routes
        .values()
        .flat_map(|r| r.spec.parent_refs.iter())
        .chain(
            objects
                .grpc_routes
                .values()
                .flat_map(|r| r.spec.parent_refs.iter()),
        );
    let mut ports: Vec<u16> = parents
        .filter(|p| p.name == network.name && attaches_to_networks(std::slice::from_ref(p)))
        .map(|p| p.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(1))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        ports.push(1);
    }
    ports
}

#[cfg(test)]
mod tests;
