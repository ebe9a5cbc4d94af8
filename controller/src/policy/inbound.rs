//! The inbound policy of one port of one workload: a pure function from a [`PolicyInputs`]
//! snapshot to the `InboundServer` the proxy enforces.
//!
//! - The Servers of the pod's namespace whose selector picks the pod and whose port is the
//!   asked port (by number, or by the name of the container port with that number) cover it;
//!   when several do, the oldest (then the first by name) wins. The Server's
//!   AuthorizationPolicies (targeting it, or its namespace) become the authorizations, its
//!   HTTPLocalRateLimitPolicy the rate limit. A Server nobody is authorized for denies all.
//! - Otherwise a default policy applies: the pod's `config.mesh.dev/default-inbound-policy`
//!   annotation, else its namespace's, else the cluster's (`--default-inbound-policy`).
//!
//! Everything here is pure and deterministic; the gRPC server (`policy::server`) streams it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::{
    Authentication, Authorization, InboundRoute, InboundServer, Network, Protocol, RateLimit,
    authentication, inbound_server, path_match, rate_limit,
};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::crds::{self, AuthorizationPolicy, ObjectRef, ProxyProtocol, Server};
use super::outbound::{self, Problem};
use super::store::{NamespaceObjects, PolicyInputs};
use super::{gateway, routes};
use crate::meta;
use crate::objects::{Kind, ObjectKey};
use crate::pod::{Pod, StringMap};

/// The pod or namespace annotation naming the default inbound policy.
pub const DEFAULT_POLICY_ANNOTATION: &str = "config.mesh.dev/default-inbound-policy";

/// What applies to a port no Server covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DefaultPolicy {
    /// Every client, meshed or not.
    #[default]
    AllUnauthenticated,
    /// Only clients with a mesh identity.
    AllAuthenticated,
    /// Only clients with a mesh identity of this cluster's trust domain.
    ClusterAuthenticated,
    /// Nobody.
    Deny,
    /// Everyone, but what `all-authenticated` would refuse is logged and counted.
    Audit,
}

impl DefaultPolicy {
    /// The name as written in flags and annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::Audit => "audit",
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A text that names no default policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a default inbound policy (all-unauthenticated, all-authenticated, \
     cluster-authenticated, deny, audit)"
)]
pub struct DefaultPolicyError(pub String);

impl FromStr for DefaultPolicy {
    type Err = DefaultPolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.trim() {
            "all-unauthenticated" => DefaultPolicy::AllUnauthenticated,
            "all-authenticated" => DefaultPolicy::AllAuthenticated,
            "cluster-authenticated" => DefaultPolicy::ClusterAuthenticated,
            "deny" => DefaultPolicy::Deny,
            "audit" => DefaultPolicy::Audit,
            other => return Err(DefaultPolicyError(other.to_owned())),
        })
    }
}

/// The cluster-wide settings inbound policies depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSettings {
    /// The trust domain: `cluster-authenticated` admits `spiffe://<trust-domain>/`.
    pub trust_domain: String,
    /// The default policy when neither pod nor namespace names one.
    pub cluster_default: DefaultPolicy,
}

impl Default for InboundSettings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            cluster_default: DefaultPolicy::AllUnauthenticated,
        }
    }
}

/// The pod a proxy serves: by namespace and pod name, else the first pod (by name) of the
/// workload it names.
pub fn find_pod<'a>(inputs: &'a PolicyInputs, workload: &WorkloadRef) -> Option<&'a Pod> {
    let namespace = inputs.namespace(&workload.namespace)?;
    if let Some(pod) = namespace
        .pods
        .get(&workload.pod)
        .or_else(|| namespace.external_workloads.get(&workload.pod))
    {
        return Some(pod);
    }
    if workload.name.is_empty() {
        return None;
    }
    namespace
        .pods_and_external_workloads()
        .find(|pod| {
            let (kind, name) = meta::workload(pod);
            name == workload.name
                && (workload.kind.is_empty() || kind.eq_ignore_ascii_case(&workload.kind))
        })
        .map(AsRef::as_ref)
}

/// The policy for `port` of the workload a proxy serves.
pub fn inbound_server(
    inputs: &PolicyInputs,
    workload: &WorkloadRef,
    port: u16,
    settings: &InboundSettings,
) -> InboundServer {
    let namespace = inputs.namespace(&workload.namespace);
    let pod = find_pod(inputs, workload);
    if let (Some(namespace), Some(pod)) = (namespace, pod)
        && let Some(server) = covering_server(namespace, pod, port)
    {
        return server_policy(namespace, &workload.namespace, server, settings);
    }
    let policy = default_policy(pod, namespace, settings.cluster_default);
    let opaque = pod.is_some_and(|pod| {
        let port_name = container_port_name(pod, port);
        meta::pod_opaque_ports(pod, namespace.and_then(|n| n.namespace.as_deref()))
            .contains(port, port_name.as_deref())
    });
    default_server(policy, &workload.namespace, &settings.trust_domain, opaque)
}

/// The default policy of a pod: its annotation, its namespace's, the cluster's. A value that
/// names no policy is passed over (the injector refuses such annotations up front).
pub fn default_policy(
    pod: Option<&Pod>,
    namespace: Option<&NamespaceObjects>,
    cluster_default: DefaultPolicy,
) -> DefaultPolicy {
    fn annotation<M: StringMap>(annotations: Option<&M>) -> Option<DefaultPolicy> {
        annotations?
            .value(DEFAULT_POLICY_ANNOTATION)?
            .parse::<DefaultPolicy>()
            .ok()
    }
    pod.and_then(|p| annotation(Some(&p.annotations)))
        .or_else(|| {
            namespace
                .and_then(|n| n.namespace.as_ref())
                .and_then(|n| annotation(n.metadata.annotations.as_ref()))
        })
        .unwrap_or(cluster_default)
}

/// The `InboundServer` of a default policy.
pub fn default_server(
    policy: DefaultPolicy,
    namespace: &str,
    trust_domain: &str,
    opaque: bool,
) -> InboundServer {
    let name = format!("default:{policy}");
    let rule = |authentication| Authorization {
        name: name.clone(),
        networks: Vec::new(),
        authentication: Some(Authentication {
            kind: Some(authentication),
        }),
        routes: Vec::new(),
    };
    let any_identity = || {
        authentication::Kind::MeshTls(authentication::MeshTls {
            identities: vec!["*".to_owned()],
            identity_prefixes: Vec::new(),
        })
    };
    let (mode, authorizations) = match policy {
        DefaultPolicy::AllUnauthenticated => (
            inbound_server::Mode::Enforce,
            vec![rule(authentication::Kind::Unauthenticated(
                authentication::Unauthenticated {},
            ))],
        ),
        DefaultPolicy::AllAuthenticated => {
            (inbound_server::Mode::Enforce, vec![rule(any_identity())])
        }
        DefaultPolicy::ClusterAuthenticated => (
            inbound_server::Mode::Enforce,
            vec![rule(authentication::Kind::MeshTls(
                authentication::MeshTls {
                    identities: Vec::new(),
                    identity_prefixes: vec![format!("spiffe://{trust_domain}/")],
                },
            ))],
        ),
        DefaultPolicy::Deny => (inbound_server::Mode::Enforce, Vec::new()),
        DefaultPolicy::Audit => (inbound_server::Mode::Audit, vec![rule(any_identity())]),
    };
    InboundServer {
        name,
        protocol: if opaque {
            Protocol::Opaque
        } else {
            Protocol::Detect
        } as i32,
        detect_timeout: None,
        authorizations,
        rate_limit: None,
        mode: mode as i32,
        labels: labels("default", policy.as_str(), namespace),
        http_routes: Vec::new(),
    }
}

fn labels(kind: &str, name: &str, namespace: &str) -> std::collections::HashMap<String, String> {
    [
        ("kind".to_owned(), kind.to_owned()),
        ("name".to_owned(), name.to_owned()),
        ("namespace".to_owned(), namespace.to_owned()),
    ]
    .into()
}

/// The name of the pod's container port numbered `port`, if it has one.
fn container_port_name(pod: &Pod, port: u16) -> Option<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.container_port == i32::from(port))
        .and_then(|p| p.name.clone())
}

/// Whether a label selector (matchLabels and matchExpressions) picks these labels.
pub fn label_selector_matches<M: StringMap>(selector: &LabelSelector, labels: Option<&M>) -> bool {
    let get = |key: &str| labels.and_then(|l| l.value(key));
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| get(k) == Some(v.as_str()));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let has_value = || get(&e.key).is_some_and(|v| values.iter().any(|w| w == v));
        match e.operator.as_str() {
            "In" => has_value(),
            "NotIn" => !has_value(),
            "Exists" => get(&e.key).is_some(),
            "DoesNotExist" => get(&e.key).is_none(),
            // An operator the API server would have refused: select nothing.
            _ => false,
        }
    });
    labels_match && expressions_match
}

/// The Server covering the pod's port: oldest first, then by name.
fn covering_server<'a>(
    namespace: &'a NamespaceObjects,
    pod: &Pod,
    port: u16,
) -> Option<&'a Server> {
    let port_name = container_port_name(pod, port);
    let mut covering: Vec<&Server> = namespace
        .servers
        .values()
        .map(AsRef::as_ref)
        .filter(|server| {
            let port_matches = match &server.spec.port {
                IntOrString::Int(number) => *number == i32::from(port),
                IntOrString::String(name) => port_name.as_deref() == Some(name.as_str()),
            };
            port_matches && label_selector_matches(&server.spec.pod_selector, Some(&pod.labels))
        })
        .collect();
    covering.sort_by(|a, b| {
        let created = |s: &Server| s.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    covering.first().copied()
}

fn protocol(proxy_protocol: ProxyProtocol) -> Protocol {
    match proxy_protocol {
        ProxyProtocol::Unknown => Protocol::Detect,
        ProxyProtocol::Http1 => Protocol::Http1,
        ProxyProtocol::Http2 => Protocol::Http2,
        ProxyProtocol::Grpc => Protocol::Grpc,
        ProxyProtocol::Opaque => Protocol::Opaque,
        ProxyProtocol::Tls => Protocol::Tls,
    }
}

/// Whether a reference names `kind` in `group` (an absent group counts as the kind's usual
/// one).
fn names_kind(reference: &ObjectRef, group: &str, kind: &str) -> bool {
    reference.kind.eq_ignore_ascii_case(kind)
        && reference
            .group
            .as_deref()
            .is_none_or(|g| g == group || (group.is_empty() && g == "core"))
}

/// The `InboundServer` of a Server.
fn server_policy(
    namespace: &NamespaceObjects,
    namespace_name: &str,
    server: &Server,
    settings: &InboundSettings,
) -> InboundServer {
    let server_name = server.metadata.name.clone().unwrap_or_default();
    // HTTPRoutes attached to this Server: an AuthorizationPolicy on one admits its requests.
    let routes_of_server: BTreeMap<&str, &gateway::HTTPRoute> = namespace
        .http_routes
        .iter()
        .filter(|(_, route)| {
            route
                .spec
                .parent_refs
                .iter()
                .any(|parent| is_server(parent) && parent.name == server_name)
        })
        .map(|(name, route)| (name.as_str(), route.as_ref()))
        .collect();
    let mut authorizations = Vec::new();
    for policy in namespace.authorization_policies.values() {
        let target = &policy.spec.target_ref;
        let on_server = names_kind(target, crds::GROUP, "Server") && target.name == server_name;
        let on_namespace = names_kind(target, "", "Namespace")
            && (target.name.is_empty() || target.name == namespace_name);
        let routes = if on_server || on_namespace {
            Vec::new()
        } else if names_kind(target, gateway::GROUP, "HTTPRoute")
            && routes_of_server.contains_key(target.name.as_str())
        {
            vec![target.name.clone()]
        } else {
            continue;
        };
        if let Ok(mut authorization) =
            authorization(namespace, namespace_name, policy, &settings.trust_domain)
        {
            authorization.routes = routes;
            authorizations.push(authorization);
        }
    }
    let rate_limit = namespace
        .rate_limits
        .values()
        .find(|limit| {
            names_kind(&limit.spec.target_ref, crds::GROUP, "Server")
                && limit.spec.target_ref.name == server_name
        })
        .map(|limit| {
            let spec = &limit.spec;
            RateLimit {
                name: limit.metadata.name.clone().unwrap_or_default(),
                total_rps: spec.total.map_or(0, |l| l.requests_per_second),
                identity_rps: spec.identity.map_or(0, |l| l.requests_per_second),
                overrides: spec
                    .overrides
                    .iter()
                    .map(|o| rate_limit::Override {
                        rps: o.requests_per_second,
                        identities: o
                            .client_refs
                            .iter()
                            .filter(|r| names_kind(r, "", "ServiceAccount"))
                            .map(|r| {
                                meta::spiffe_id(
                                    &settings.trust_domain,
                                    r.namespace.as_deref().unwrap_or(namespace_name),
                                    &r.name,
                                )
                            })
                            .collect(),
                    })
                    .collect(),
            }
        });
    InboundServer {
        name: server_name.clone(),
        protocol: protocol(server.spec.proxy_protocol) as i32,
        detect_timeout: None,
        authorizations,
        rate_limit,
        mode: inbound_server::Mode::Enforce as i32,
        labels: labels("Server", &server_name, namespace_name),
        http_routes: inbound_routes(routes_of_server, namespace_name),
    }
}

/// The matches of a Server's HTTPRoutes in the Gateway API order, each named by its route. An
/// invalid route is left out, so its requests get 404 rather than an authorization meant for
/// another route.
fn inbound_routes(
    routes_of_server: BTreeMap<&str, &gateway::HTTPRoute>,
    namespace_name: &str,
) -> Vec<InboundRoute> {
    let mut ranked: Vec<_> = routes_of_server
        .into_iter()
        .filter_map(|(name, route)| {
            let matches = routes::inbound_http_matches(route, namespace_name).ok()?;
            Some(
                matches
                    .into_iter()
                    .map(move |(precedence, matched)| (precedence, name, matched)),
            )
        })
        .flatten()
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    ranked
        .into_iter()
        .map(|(_, name, matched)| InboundRoute {
            name: name.to_owned(),
            matches: vec![matched],
        })
        .collect()
}

/// One AuthorizationPolicy as an authorization: its network authentications become the
/// networks, its identity authentications (MeshTLSAuthentications and ServiceAccounts) the
/// identities admitted (any one of them); without identity authentications any client is
/// admitted from those networks. `Err` (why) when a required authentication does not exist or
/// is invalid: a requirement nobody can meet admits nobody.
fn authorization(
    namespace: &NamespaceObjects,
    namespace_name: &str,
    policy: &AuthorizationPolicy,
    trust_domain: &str,
) -> Result<Authorization, String> {
    let mut networks = Vec::new();
    let mut identities: Vec<String> = Vec::new();
    let mut prefixes: Vec<String> = Vec::new();
    let mut needs_identity = false;
    for reference in &policy.spec.required_authentication_refs {
        // Authentications live in the policy's namespace unless the reference says otherwise;
        // only same-namespace ones can be looked up in this namespace's objects.
        let elsewhere = reference
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != namespace_name);
        let missing = || {
            format!(
                "requires {} {:?}, which does not exist in namespace {namespace_name}",
                reference.kind, reference.name
            )
        };
        if names_kind(reference, crds::GROUP, "NetworkAuthentication") {
            let authn = namespace
                .network_authentications
                .get(&reference.name)
                .filter(|_| !elsewhere)
                .ok_or_else(missing)?;
            for network in &authn.spec.networks {
                if let Some(bad) = std::iter::once(&network.cidr)
                    .chain(&network.except)
                    .find(|text| !is_net(text))
                {
                    return Err(format!(
                        "NetworkAuthentication {:?} has {bad:?}, which is not a CIDR",
                        reference.name
                    ));
                }
                networks.push(Network {
                    cidr: network.cidr.clone(),
                    except: network.except.clone(),
                });
            }
        } else if names_kind(reference, crds::GROUP, "MeshTLSAuthentication") {
            needs_identity = true;
            let authn = namespace
                .mesh_tls_authentications
                .get(&reference.name)
                .filter(|_| !elsewhere)
                .ok_or_else(missing)?;
            for identity in &authn.spec.identities {
                match identity.strip_suffix('*') {
                    _ if identity == "*" => identities.push("*".to_owned()),
                    Some(prefix) => prefixes.push(prefix.to_owned()),
                    None => identities.push(identity.clone()),
                }
            }
            for identity_ref in &authn.spec.identity_refs {
                let ns = identity_ref.namespace.as_deref().unwrap_or(namespace_name);
                if names_kind(identity_ref, "", "ServiceAccount") {
                    identities.push(meta::spiffe_id(trust_domain, ns, &identity_ref.name));
                } else if names_kind(identity_ref, "", "Namespace") {
                    prefixes.push(format!("spiffe://{trust_domain}/ns/{}/", identity_ref.name));
                } else {
                    return Err(format!(
                        "MeshTLSAuthentication {:?} names a {}, not a ServiceAccount or Namespace",
                        reference.name, identity_ref.kind
                    ));
                }
            }
        } else if names_kind(reference, "", "ServiceAccount") {
            needs_identity = true;
            let ns = reference.namespace.as_deref().unwrap_or(namespace_name);
            identities.push(meta::spiffe_id(trust_domain, ns, &reference.name));
        } else {
            return Err(format!(
                "requires a {}, not a NetworkAuthentication, MeshTLSAuthentication or ServiceAccount",
                reference.kind
            ));
        }
    }
    let authentication = if needs_identity {
        identities.sort();
        identities.dedup();
        prefixes.sort();
        prefixes.dedup();
        authentication::Kind::MeshTls(authentication::MeshTls {
            identities,
            identity_prefixes: prefixes,
        })
    } else {
        authentication::Kind::Unauthenticated(authentication::Unauthenticated {})
    };
    Ok(Authorization {
        name: policy.metadata.name.clone().unwrap_or_default(),
        networks,
        authentication: Some(Authentication {
            kind: Some(authentication),
        }),
        routes: Vec::new(),
    })
}

/// One line saying what a proxy enforces for a port, for logs and tests: `name protocol mode
/// [authorization; ...] http_routes=... limit=...`, each authorization as
/// `name:any|tls[identities][prefixes] nets=cidr-except routes=...`, each route as
/// `name:=exact|prefix*|~regex`.
pub fn summary(server: &InboundServer) -> String {
    let protocol = Protocol::try_from(server.protocol)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("PROTOCOL_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("protocol({})", server.protocol));
    let mode = match inbound_server::Mode::try_from(server.mode) {
        Ok(inbound_server::Mode::Enforce) => "enforce".to_owned(),
        Ok(inbound_server::Mode::Audit) => "audit".to_owned(),
        Err(_) => format!("mode({})", server.mode),
    };
    let rules: Vec<String> = server
        .authorizations
        .iter()
        .map(|a| {
            let auth = match a.authentication.as_ref().and_then(|a| a.kind.as_ref()) {
                Some(authentication::Kind::Unauthenticated(_)) => "any".to_owned(),
                Some(authentication::Kind::MeshTls(tls)) => format!(
                    "tls[{}][{}]",
                    tls.identities.join(","),
                    tls.identity_prefixes.join(",")
                ),
                None => "none".to_owned(),
            };
            let mut text = format!("{}:{auth}", a.name);
            let nets: Vec<String> = a
                .networks
                .iter()
                .map(|n| {
                    [n.cidr.clone()]
                        .into_iter()
                        .chain(n.except.clone())
                        .collect::<Vec<_>>()
                        .join("-")
                })
                .collect();
            if !nets.is_empty() {
                text.push_str(&format!(" nets={}", nets.join(",")));
            }
            if !a.routes.is_empty() {
                text.push_str(&format!(" routes={}", a.routes.join(",")));
            }
            text
        })
        .collect();
    let mut text = format!("{} {protocol} {mode} [{}]", server.name, rules.join("; "));
    if !server.http_routes.is_empty() {
        let routes: Vec<String> = server
            .http_routes
            .iter()
            .map(|route| {
                let paths: Vec<String> = route
                    .matches
                    .iter()
                    .map(|m| match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
                        Some(path_match::Kind::Exact(p)) => format!("={p}"),
                        Some(path_match::Kind::Prefix(p)) => format!("{p}*"),
                        Some(path_match::Kind::Regex(p)) => format!("~{p}"),
                        None => "*".to_owned(),
                    })
                    .collect();
                format!("{}:{}", route.name, paths.join(","))
            })
            .collect();
        text.push_str(&format!(" http_routes={}", routes.join(",")));
    }
    if let Some(limit) = &server.rate_limit {
        text.push_str(&format!(
            " limit={}:{}/{}",
            limit.name, limit.total_rps, limit.identity_rps
        ));
        for o in &limit.overrides {
            text.push_str(&format!(" {}={}", o.identities.join(","), o.rps));
        }
    }
    text
}

/// What makes inbound policy objects unusable, for the report: AuthorizationPolicies whose
/// required authentications are missing or invalid (they admit nobody), and HTTPRoutes on a
/// Server that cannot be converted (their requests get 404). HTTPRoutes that also attach to a
/// Service are reported by the outbound side.
pub fn problems(inputs: &PolicyInputs) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (namespace_name, namespace) in inputs.namespaces() {
        for (name, policy) in &namespace.authorization_policies {
            // The trust domain only shapes the identities admitted, not whether they can be.
            if let Err(reason) = authorization(namespace, namespace_name, policy, "") {
                let value = policy
                    .spec
                    .required_authentication_refs
                    .iter()
                    .map(|r| format!("{}/{}", r.kind, r.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                problems.push(Problem {
                    kind: Kind::AuthorizationPolicy,
                    object: ObjectKey::new(namespace_name, name.as_str()),
                    field: "spec.requiredAuthenticationRefs".to_owned(),
                    value,
                    reason: format!("{reason}; the policy admits nobody"),
                    condition_reason: "InvalidAuthentication",
                });
            }
        }
        for (name, route) in &namespace.http_routes {
            let on_server = route.spec.parent_refs.iter().any(is_server);
            if on_server
                && !outbound::attaches_to_services(&route.spec.parent_refs)
                && let Err(problem) = routes::inbound_http_matches(route, namespace_name)
            {
                problems.push(Problem::of_route(
                    Kind::HTTPRoute,
                    ObjectKey::new(namespace_name, name.as_str()),
                    problem,
                ));
            }
        }
    }
    problems
}

/// Whether a route's parent is one of our Servers.
fn is_server(parent: &gateway::ParentReference) -> bool {
    parent.kind.as_deref() == Some("Server") && parent.group.as_deref() == Some(crds::GROUP)
}

fn is_net(text: &str) -> bool {
    super::egress::parse_net(text).is_some()
}

#[cfg(test)]
mod tests;
