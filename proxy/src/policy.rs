//! Inbound authorization policy: who may connect to each application port, and how fast.
//!
//! The controller streams one `InboundServer` per port (`InboundPolicies.Watch`); it is
//! compiled once into an [`InboundPolicy`] whose [`InboundPolicy::evaluate`] is a pure
//! function of the client (address and proven identity) and, for an HTTP request, the
//! HTTPRoute it takes ([`InboundPolicy::route_of`]). Without a controller answer the proxy's
//! default policy applies.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::Request;
use ipnet::IpNet;
use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::{
    self, authentication, inbound_policies_client::InboundPoliciesClient, inbound_server,
};
use mesh_proto::tonic::{self, transport::Channel};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::route::{Match, any_holds, compile_match};

/// The default inbound policy, when no Server resource covers a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Everyone, meshed or not.
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

impl FromStr for DefaultPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "all-unauthenticated" => Self::AllUnauthenticated,
            "all-authenticated" => Self::AllAuthenticated,
            "cluster-authenticated" => Self::ClusterAuthenticated,
            "deny" => Self::Deny,
            "audit" => Self::Audit,
            other => {
                return Err(format!(
                    "{other:?} is not all-unauthenticated, all-authenticated, cluster-authenticated, deny or audit"
                ));
            }
        })
    }
}

impl DefaultPolicy {
    /// The name reported in denials and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::AllUnauthenticated => "default:all-unauthenticated",
            Self::AllAuthenticated => "default:all-authenticated",
            Self::ClusterAuthenticated => "default:cluster-authenticated",
            Self::Deny => "default:deny",
            Self::Audit => "default:audit",
        }
    }
}

/// A policy from the controller that cannot be applied.
#[derive(Debug, thiserror::Error)]
#[error("policy {policy}: {reason}")]
pub struct PolicyError {
    policy: String,
    reason: String,
}

/// What a client must prove.
#[derive(Debug, Clone, PartialEq)]
enum Authentication {
    /// Nothing.
    Unauthenticated,
    /// A mesh identity, one of these (or any when `any`).
    MeshTls {
        any: bool,
        identities: Vec<String>,
        prefixes: Vec<String>,
    },
}

/// A client network, minus exceptions.
#[derive(Debug, Clone, PartialEq)]
struct Network {
    net: IpNet,
    except: Vec<IpNet>,
}

/// One rule admitting clients.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    name: Arc<str>,
    networks: Vec<Network>,
    authentication: Authentication,
    /// When non-empty, only requests of these HTTPRoutes are admitted.
    routes: Vec<Arc<str>>,
}

impl Rule {
    fn admits(&self, client: &Client<'_>, route: Option<&str>) -> bool {
        let route_ok = self.routes.is_empty()
            || route.is_some_and(|route| self.routes.iter().any(|r| &**r == route));
        route_ok && self.admits_client(client)
    }

    fn admits_client(&self, client: &Client<'_>) -> bool {
        // An IPv4 client on a dual-stack socket arrives IPv4-mapped (`::ffff:10.1.2.3`); its
        // networks and exceptions are written in IPv4.
        let ip = client.ip.to_canonical();
        let network_ok = self.networks.is_empty()
            || self.networks.iter().any(|network| {
                network.net.contains(&ip) && !network.except.iter().any(|e| e.contains(&ip))
            });
        let identity_ok = match &self.authentication {
            Authentication::Unauthenticated => true,
            Authentication::MeshTls {
                any,
                identities,
                prefixes,
            } => client.identity.is_some_and(|id| {
                *any || identities.iter().any(|allowed| allowed == id)
                    || prefixes
                        .iter()
                        .any(|prefix| id.starts_with(prefix.as_str()))
            }),
        };
        network_ok && identity_ok
    }
}

/// The client of a connection or request.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// Its address.
    pub ip: IpAddr,
    /// Its proven SPIFFE ID, when it has one.
    pub identity: Option<&'a str>,
}

/// The outcome of checking a client against a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted by the named rule.
    Allow(Arc<str>),
    /// Refused: no rule of the named policy admits the client.
    Deny(Arc<str>),
    /// Admitted only because the policy audits: enforcement would refuse it.
    AuditDeny(Arc<str>),
}

/// Local rate limits of a port.
pub struct RateLimits {
    name: Arc<str>,
    total: Option<DefaultDirectRateLimiter>,
    per_identity: Option<DefaultKeyedRateLimiter<String>>,
    overrides: HashMap<String, Arc<DefaultDirectRateLimiter>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("name", &self.name)
            .finish()
    }
}

impl RateLimits {
    fn from_proto(limit: &policy::RateLimit) -> Option<Self> {
        let quota = |rps: u32| NonZeroU32::new(rps).map(Quota::per_second);
        let limits = Self {
            name: Arc::from(limit.name.as_str()),
            total: quota(limit.total_rps).map(RateLimiter::direct),
            per_identity: quota(limit.identity_rps).map(RateLimiter::keyed),
            overrides: limit
                .overrides
                .iter()
                .filter_map(|o| Some((quota(o.rps)?, &o.identities)))
                .flat_map(|(quota, identities)| {
                    let limiter = Arc::new(RateLimiter::direct(quota));
                    identities
                        .iter()
                        .map(move |id| (id.clone(), limiter.clone()))
                })
                .collect(),
        };
        let unlimited =
            limits.total.is_none() && limits.per_identity.is_none() && limits.overrides.is_empty();
        (!unlimited).then_some(limits)
    }

    /// `Err(retry_after)` when the request exceeds a limit.
    pub fn check(&self, identity: Option<&str>) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        let wait = |not_until: governor::NotUntil<_>| not_until.wait_time_from(clock.now());
        if let Some(identity) = identity {
            if let Some(limiter) = self.overrides.get(identity) {
                limiter.check().map_err(wait)?;
            } else if let Some(limiter) = &self.per_identity {
                limiter.check_key(&identity.to_string()).map_err(wait)?;
            }
        }
        if let Some(total) = &self.total {
            total.check().map_err(wait)?;
        }
        Ok(())
    }

    /// The HTTPLocalRateLimitPolicy's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One match of an HTTPRoute attached to the port.
#[derive(Debug)]
struct InboundRoute {
    name: Arc<str>,
    matches: Vec<Match>,
}

/// A request on a port with HTTPRoutes that none of them matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoute;

/// The compiled policy of one inbound port.
#[derive(Debug)]
pub struct InboundPolicy {
    /// The policy's name (`Server` name or `default:<policy>`).
    pub name: Arc<str>,
    audit: bool,
    rules: Vec<Rule>,
    /// The port's HTTPRoutes in precedence order; empty when it has none.
    routes: Vec<InboundRoute>,
    /// Local rate limits, when any.
    pub rate_limits: Option<RateLimits>,
}

impl InboundPolicy {
    /// The default policy; `trust_domain` scopes `cluster-authenticated`.
    pub fn default_policy(policy: DefaultPolicy, trust_domain: &str) -> Self {
        let name: Arc<str> = Arc::from(policy.name());
        let rule = |authentication| Rule {
            name: name.clone(),
            networks: Vec::new(),
            authentication,
            routes: Vec::new(),
        };
        let any_identity = Authentication::MeshTls {
            any: true,
            identities: Vec::new(),
            prefixes: Vec::new(),
        };
        let (audit, rules) = match policy {
            DefaultPolicy::AllUnauthenticated => {
                (false, vec![rule(Authentication::Unauthenticated)])
            }
            DefaultPolicy::AllAuthenticated => (false, vec![rule(any_identity)]),
            DefaultPolicy::ClusterAuthenticated => (
                false,
                vec![rule(Authentication::MeshTls {
                    any: false,
                    identities: Vec::new(),
                    prefixes: vec![format!("spiffe://{trust_domain}/")],
                })],
            ),
            DefaultPolicy::Deny => (false, Vec::new()),
            DefaultPolicy::Audit => (true, vec![rule(any_identity)]),
        };
        Self {
            name,
            audit,
            rules,
            routes: Vec::new(),
            rate_limits: None,
        }
    }

    /// Compiles the controller's policy; a malformed one is refused whole.
    pub fn from_proto(server: &policy::InboundServer) -> Result<Self, PolicyError> {
        let error = |reason: String| PolicyError {
            policy: server.name.clone(),
            reason,
        };
        let parse_net = |text: &str| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| error(format!("{text:?} is not a CIDR")))
        };
        let mut rules = Vec::with_capacity(server.authorizations.len());
        for authorization in &server.authorizations {
            let mut networks = Vec::new();
            for network in &authorization.networks {
                networks.push(Network {
                    net: parse_net(&network.cidr)?,
                    except: network
                        .except
                        .iter()
                        .map(|e| parse_net(e))
                        .collect::<Result<_, _>>()?,
                });
            }
            let authentication = match authorization
                .authentication
                .as_ref()
                .and_then(|a| a.kind.as_ref())
            {
                Some(authentication::Kind::Unauthenticated(_)) => Authentication::Unauthenticated,
                Some(authentication::Kind::MeshTls(tls)) => Authentication::MeshTls {
                    any: tls.identities.iter().any(|id| id == "*"),
                    identities: tls.identities.clone(),
                    prefixes: tls.identity_prefixes.clone(),
                },
                None => {
                    return Err(error(format!(
                        "authorization {:?} names no authentication",
                        authorization.name
                    )));
                }
            };
            rules.push(Rule {
                name: Arc::from(authorization.name.as_str()),
                networks,
                authentication,
                routes: authorization
                    .routes
                    .iter()
                    .map(|r| Arc::from(r.as_str()))
                    .collect(),
            });
        }
        let mut routes = Vec::with_capacity(server.http_routes.len());
        for route in &server.http_routes {
            routes.push(InboundRoute {
                name: Arc::from(route.name.as_str()),
                matches: route
                    .matches
                    .iter()
                    .map(compile_match)
                    .collect::<Result<_, _>>()
                    .map_err(|reason| error(format!("route {}: {reason}", route.name)))?,
            });
        }
        Ok(Self {
            name: Arc::from(server.name.as_str()),
            audit: server.mode == inbound_server::Mode::Audit as i32,
            rules,
            routes,
            rate_limits: server.rate_limit.as_ref().and_then(RateLimits::from_proto),
        })
    }

    /// The HTTPRoute a request takes: `Ok(None)` when the port has no routes, `Err` when it
    /// has some and none matches.
    pub fn route_of<B>(&self, request: &Request<B>) -> Result<Option<&Arc<str>>, NoRoute> {
        if self.routes.is_empty() {
            return Ok(None);
        }
        self.routes
            .iter()
            .find(|route| any_holds(&route.matches, request))
            .map(|route| Some(&route.name))
            .ok_or(NoRoute)
    }

    /// Checks a client, on `route` for an HTTP request (`None` for a TCP connection or a port
    /// without routes: rules limited to routes do not admit it).
    pub fn evaluate(&self, client: &Client<'_>, route: Option<&str>) -> Verdict {
        match self.rules.iter().find(|rule| rule.admits(client, route)) {
            Some(rule) => Verdict::Allow(rule.name.clone()),
            None if self.audit => Verdict::AuditDeny(self.name.clone()),
            None => Verdict::Deny(self.name.clone()),
        }
    }
}

/// The policies of every inbound port, kept current from the controller.
#[derive(Debug)]
pub struct PolicyStore {
    client: Option<InboundPoliciesClient<Channel>>,
    workload: WorkloadRef,
    default: Arc<InboundPolicy>,
    wait: Duration,
    ports: Mutex<HashMap<u16, watch::Receiver<Option<Arc<InboundPolicy>>>>>,
}

impl PolicyStore {
    /// A store asking `controller` (None: the default policy everywhere).
    pub fn new(
        controller: Option<&str>,
        workload: WorkloadRef,
        default: InboundPolicy,
        connect_timeout: Duration,
        wait: Duration,
    ) -> Result<Self, tonic::transport::Error> {
        let client = match controller {
            Some(addr) => Some(InboundPoliciesClient::new(
                tonic::transport::Endpoint::from_shared(addr.to_string())?
                    .connect_timeout(connect_timeout)
                    .connect_lazy(),
            )),
            None => None,
        };
        Ok(Self {
            client,
            workload,
            default: Arc::new(default),
            wait,
            ports: Mutex::new(HashMap::new()),
        })
    }

    /// The live policy of `port`: the first time, waits a little for the controller's
    /// answer so a restrictive policy is not bypassed at start.
    pub async fn port(&self, port: u16) -> PortPolicy {
        let Some(client) = &self.client else {
            return PortPolicy {
                receiver: None,
                default: self.default.clone(),
            };
        };
        let mut receiver = {
            let mut ports = match self.ports.lock() {
                Ok(ports) => ports,
                Err(poisoned) => poisoned.into_inner(),
            };
            ports
                .entry(port)
                .or_insert_with(|| {
                    let (tx, rx) = watch::channel(None);
                    tokio::spawn(watch_port(
                        client.clone(),
                        self.workload.clone(),
                        port,
                        self.default.clone(),
                        tx,
                    ));
                    rx
                })
                .clone()
        };
        if receiver.borrow().is_none() {
            let _ = tokio::time::timeout(self.wait, receiver.wait_for(Option::is_some)).await;
        }
        PortPolicy {
            receiver: Some(receiver),
            default: self.default.clone(),
        }
    }
}

/// One port's policy as it changes.
#[derive(Debug, Clone)]
pub struct PortPolicy {
    receiver: Option<watch::Receiver<Option<Arc<InboundPolicy>>>>,
    default: Arc<InboundPolicy>,
}

impl PortPolicy {
    /// The policy in force now.
    pub fn current(&self) -> Arc<InboundPolicy> {
        self.receiver
            .as_ref()
            .and_then(|receiver| receiver.borrow().clone())
            .unwrap_or_else(|| self.default.clone())
    }
}

/// Follows one port's policy stream for as long as the proxy runs, reconnecting with backoff.
/// While the controller is unreachable and nothing was ever learned, `default` applies at
/// once: connections must not each wait for a controller that is down.
async fn watch_port(
    mut client: InboundPoliciesClient<Channel>,
    workload: WorkloadRef,
    port: u16,
    default: Arc<InboundPolicy>,
    policy: watch::Sender<Option<Arc<InboundPolicy>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let request = policy::InboundPolicyRequest {
            workload: Some(workload.clone()),
            port: u32::from(port),
        };
        match client.watch(request).await {
            Ok(response) => {
                backoff = Duration::from_millis(100);
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(server)) => match InboundPolicy::from_proto(&server) {
                            Ok(compiled) => {
                                info!(port, policy = %compiled.name, "inbound policy updated");
                                policy.send_replace(Some(Arc::new(compiled)));
                            }
                            // The last valid policy keeps applying.
                            Err(error) => warn!(port, %error, "ignoring an invalid inbound policy"),
                        },
                        Ok(None) => break,
                        Err(status) => {
                            debug!(port, %status, "inbound policy stream failed");
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                debug!(
                    port,
                    "the controller serves no inbound policy; using the default"
                );
                return;
            }
            Err(status) => {
                debug!(port, %status, "inbound policy unavailable; retrying in {backoff:?}");
                if policy.borrow().is_none() {
                    policy.send_replace(Some(default.clone()));
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::policy::{Authentication as WireAuth, Authorization, Network as WireNet};

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const OTHER_DOMAIN: &str = "spiffe://other.example/ns/shop/sa/web";

    fn client(ip: &str, identity: Option<&'static str>) -> Client<'static> {
        Client {
            ip: ip.parse().expect("ip"),
            identity,
        }
    }

    #[test]
    fn default_policies() {
        use DefaultPolicy::*;
        let cases = [
            (AllUnauthenticated, None, "allow"),
            (AllUnauthenticated, Some(WEB), "allow"),
            (AllAuthenticated, None, "deny"),
            (AllAuthenticated, Some(WEB), "allow"),
            (ClusterAuthenticated, Some(WEB), "allow"),
            (ClusterAuthenticated, Some(OTHER_DOMAIN), "deny"),
            (ClusterAuthenticated, None, "deny"),
            (Deny, Some(WEB), "deny"),
            (Audit, None, "audit"),
            (Audit, Some(WEB), "allow"),
        ];
        for (default, identity, want) in cases {
            let policy = InboundPolicy::default_policy(default, "cluster.local");
            let got = match policy.evaluate(&client("10.1.0.5", identity), None) {
                Verdict::Allow(_) => "allow",
                Verdict::Deny(name) => {
                    assert_eq!(&*name, default.name());
                    "deny"
                }
                Verdict::AuditDeny(_) => "audit",
            };
            assert_eq!(got, want, "{default:?} {identity:?}");
        }
    }

    #[test]
    fn default_policies_parse_from_annotation_values() {
        assert_eq!(
            "cluster-authenticated".parse::<DefaultPolicy>(),
            Ok(DefaultPolicy::ClusterAuthenticated)
        );
        assert!("allow-all".parse::<DefaultPolicy>().is_err());
    }

    fn server(authorizations: Vec<Authorization>) -> policy::InboundServer {
        policy::InboundServer {
            name: "books-http".into(),
            authorizations,
            ..Default::default()
        }
    }

    fn mesh_tls(identities: &[&str], prefixes: &[&str]) -> Option<WireAuth> {
        Some(WireAuth {
            kind: Some(authentication::Kind::MeshTls(authentication::MeshTls {
                identities: identities.iter().map(|s| s.to_string()).collect(),
                identity_prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            })),
        })
    }

    #[test]
    fn rules_check_identities_and_networks() {
        let policy = InboundPolicy::from_proto(&server(vec![
            Authorization {
                name: "web-only".into(),
                networks: vec![],
                authentication: mesh_tls(&[WEB], &[]),
                routes: vec![],
            },
            Authorization {
                name: "probes".into(),
                networks: vec![WireNet {
                    cidr: "10.0.0.0/8".into(),
                    except: vec!["10.9.0.0/16".into()],
                }],
                authentication: Some(WireAuth {
                    kind: Some(authentication::Kind::Unauthenticated(
                        authentication::Unauthenticated {},
                    )),
                }),
                routes: vec![],
            },
        ]))
        .expect("valid policy");
        let cases = [
            (
                client("192.168.1.1", Some(WEB)),
                Verdict::Allow("web-only".into()),
            ),
            (client("10.1.2.3", None), Verdict::Allow("probes".into())),
            (client("10.9.2.3", None), Verdict::Deny("books-http".into())),
            (
                client(
                    "192.168.1.1",
                    Some("spiffe://cluster.local/ns/shop/sa/batch"),
                ),
                Verdict::Deny("books-http".into()),
            ),
        ];
        for (client, want) in cases {
            assert_eq!(policy.evaluate(&client, None), want, "{client:?}");
        }
    }

    /// Found by fuzzing (tests/fuzz): an IPv4 client arriving IPv4-mapped on a dual-stack
    /// socket was outside every IPv4 network, and so also outside their exceptions.
    #[test]
    fn ipv4_mapped_clients_are_their_ipv4_address() {
        let unauthenticated = Some(WireAuth {
            kind: Some(authentication::Kind::Unauthenticated(
                authentication::Unauthenticated {},
            )),
        });
        let policy = InboundPolicy::from_proto(&policy::InboundServer {
            name: "web".into(),
            authorizations: vec![Authorization {
                name: "authz-0".into(),
                networks: vec![WireNet {
                    cidr: "0.0.0.0/0".into(),
                    except: vec![],
                }],
                authentication: unauthenticated.clone(),
                routes: vec![],
            }],
            ..Default::default()
        })
        .expect("valid policy");
        assert_eq!(
            policy.evaluate(&client("::ffff:10.1.2.3", None), None),
            Verdict::Allow("authz-0".into())
        );
        let except = InboundPolicy::from_proto(&server(vec![Authorization {
            name: "all-but-10".into(),
            networks: vec![WireNet {
                cidr: "::/0".into(),
                except: vec!["10.0.0.0/8".into()],
            }],
            authentication: unauthenticated,
            routes: vec![],
        }]))
        .expect("valid policy");
        assert_eq!(
            except.evaluate(&client("::ffff:10.1.2.3", None), None),
            Verdict::Deny("books-http".into())
        );
    }

    #[test]
    fn malformed_policies_are_refused_whole() {
        let bad_cidr = server(vec![Authorization {
            name: "x".into(),
            networks: vec![WireNet {
                cidr: "10.0.0/8".into(),
                except: vec![],
            }],
            authentication: mesh_tls(&["*"], &[]),
            routes: vec![],
        }]);
        let error = InboundPolicy::from_proto(&bad_cidr).expect_err("bad CIDR");
        assert!(error.to_string().contains("10.0.0/8"), "{error}");
        let no_auth = server(vec![Authorization {
            name: "x".into(),
            ..Default::default()
        }]);
        assert!(InboundPolicy::from_proto(&no_auth).is_err());
    }

    #[test]
    fn rate_limits_apply_per_identity_with_overrides_and_in_total() {
        let limits = RateLimits::from_proto(&policy::RateLimit {
            name: "books-limit".into(),
            total_rps: 5,
            identity_rps: 2,
            overrides: vec![policy::rate_limit::Override {
                rps: 3,
                identities: vec!["vip".into()],
            }],
        })
        .expect("limits");
        assert!(limits.check(Some("a")).is_ok());
        assert!(limits.check(Some("a")).is_ok());
        let retry_after = limits.check(Some("a")).expect_err("a is over its 2 rps");
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
        for _ in 0..3 {
            assert!(limits.check(Some("vip")).is_ok(), "vip has 3 rps");
        }
        // 2 (a) + 3 (vip) = 5: the total is spent for everyone.
        assert!(limits.check(Some("b")).is_err());
        assert!(RateLimits::from_proto(&policy::RateLimit::default()).is_none());
    }
}
