//! Service discovery from the controller's `Destination.Get` streams.
//!
//! Each target (an original destination or an authority) gets one [`Resolution`]: a balancer
//! over its live endpoints and a state telling whether the controller knows it. A background
//! task per target keeps both current, reconnects with backoff when the stream breaks, and
//! keeps serving the last known endpoints while the controller is unreachable.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::common::WorkloadRef;
use mesh_proto::destination::{
    self, destination_client::DestinationClient, get_destination::Target, update::Update,
};
use mesh_proto::tonic::{self, transport::Channel};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::balance::{self, Balancer};
use crate::client::{ClientSettings, Dial, GatewayHop, HttpClients, MeshTls};
use crate::idle::IdleMap;
use crate::metrics::Label;
use crate::route::FailureAccrual;
use crate::tls::TlsContext;

/// What the proxy resolves.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum TargetKey {
    /// An address a connection was made to (original destination).
    Addr(SocketAddr),
    /// A `host:port` authority (HTTP proxy mode).
    Authority(String),
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(addr) => write!(f, "{addr}"),
            Self::Authority(authority) => f.write_str(authority),
        }
    }
}

/// One endpoint of a resolved target, with its clients.
#[derive(Debug)]
pub struct Endpoint {
    /// The endpoint's address (pod IP and application port).
    pub addr: SocketAddr,
    /// The SPIFFE identity the endpoint must present, when meshed.
    pub identity: Option<String>,
    /// The endpoint proxy's inbound port, when meshed.
    pub proxy_port: Option<u16>,
    /// The port is opaque: never parse it.
    pub opaque: bool,
    /// Mutual TLS toward the endpoint, when it and we have identities.
    pub tls: Option<MeshTls>,
    /// The gateway of the endpoint's cluster, when it is reached through one.
    pub gateway: Option<Arc<GatewayHop>>,
    /// HTTP clients dialing this endpoint.
    pub clients: HttpClients,
    /// Consecutive failures, for failure accrual.
    failures: AtomicU32,
}

impl Endpoint {
    /// How to open a raw TCP connection to the endpoint (for opaque forwarding).
    pub fn tcp_dial(&self, name: &str) -> Dial {
        endpoint_dial(
            self.addr,
            self.proxy_port,
            self.identity.is_some(),
            self.tls.clone(),
            self.gateway.clone(),
            true,
            name,
        )
    }
}

/// How to reach an endpoint: through its proxy with the transport header when it has one, or
/// straight to its address.
fn endpoint_dial(
    addr: SocketAddr,
    proxy_port: Option<u16>,
    has_identity: bool,
    tls: Option<MeshTls>,
    gateway: Option<Arc<GatewayHop>>,
    opaque: bool,
    name: &str,
) -> Dial {
    match (proxy_port, has_identity, tls) {
        // Through a gateway, always to the proxy (the gateway refuses us without identity).
        (Some(port), _, tls) if gateway.is_some() => {
            Dial::proxied(addr, port, opaque, name, tls, gateway)
        }
        // A peer proxy with identity takes the transport header only inside mutual TLS. We
        // have none to offer, so we connect to the application port as any unmeshed client
        // would, and the peer's capture and policy judge us as unauthenticated.
        (Some(_), true, None) => Dial::Direct(addr),
        (Some(port), _, tls) => Dial::proxied(addr, port, opaque, name, tls, None),
        (None, _, _) => Dial::Direct(addr),
    }
}

/// Whether the controller knows a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// No answer yet.
    Pending,
    /// The controller doesn't know it: forward to the original destination unchanged.
    NotFound,
    /// Known; the balancer holds its ready endpoints (maybe none).
    Known {
        /// The service's name for metrics (`name.ns.svc.cluster.local:port`).
        authority: Label,
    },
}

/// A target's live resolution.
#[derive(Debug)]
pub struct Resolution {
    /// The target.
    pub key: TargetKey,
    /// Balances over the ready endpoints.
    pub balancer: Balancer<Arc<Endpoint>>,
    state: watch::Receiver<State>,
    members: Mutex<Members>,
}

/// Every discovered endpoint, and those failure accrual has ejected for now.
#[derive(Debug, Default)]
struct Members {
    all: Vec<Arc<Endpoint>>,
    ejected: HashSet<SocketAddr>,
    backoff: HashMap<SocketAddr, Duration>,
}

impl Resolution {
    /// The state once the controller answered, or after `timeout` whatever it is.
    pub async fn state(&self, timeout: Duration) -> State {
        let mut state = self.state.clone();
        let answered = tokio::time::timeout(timeout, state.wait_for(|s| *s != State::Pending));
        match answered.await {
            Ok(Ok(state)) => state.clone(),
            _ => self.state.borrow().clone(),
        }
    }

    /// The current state, without waiting.
    pub fn current_state(&self) -> State {
        self.state.borrow().clone()
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        match self.members.lock() {
            Ok(members) => members,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether `addr` is the inbound port of a meshed proxy discovery knows (what a gateway
    /// may relay to).
    pub fn is_meshed_proxy(&self, addr: SocketAddr) -> bool {
        self.members().all.iter().any(|endpoint| {
            endpoint.addr.ip() == addr.ip()
                && endpoint.proxy_port == Some(addr.port())
                && endpoint.identity.is_some()
        })
    }

    /// Whether an endpoint is known and not ejected: what failover routes ask of a backend.
    pub fn has_available_endpoints(&self) -> bool {
        let members = self.members();
        members
            .all
            .iter()
            .any(|endpoint| !members.ejected.contains(&endpoint.addr))
    }

    /// Whether discovery knows any endpoint, ejected or not.
    pub fn has_endpoints(&self) -> bool {
        !self.members().all.is_empty()
    }

    fn set_endpoints(&self, all: Vec<Arc<Endpoint>>) {
        let mut members = self.members();
        members
            .ejected
            .retain(|addr| all.iter().any(|e| e.addr == *addr));
        members.all = all;
        self.rebalance(&members);
    }

    /// The balancer serves every endpoint that is not ejected.
    fn rebalance(&self, members: &Members) {
        self.balancer.update(
            members
                .all
                .iter()
                .filter(|endpoint| !members.ejected.contains(&endpoint.addr))
                .map(|endpoint| balance::Endpoint {
                    addr: endpoint.addr,
                    weight: 0,
                    meta: endpoint.clone(),
                })
                .collect(),
        );
    }

    /// Feeds failure accrual (circuit breaking) with the outcome of one exchange with
    /// `endpoint`. After `consecutive_failures` it is ejected from the balancer; after a
    /// backoff it rejoins as a probe: a success restores it, a failure ejects it again for
    /// twice as long (up to `max_backoff`). Returns true when this call ejected it.
    pub fn report(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        success: bool,
        accrual: &FailureAccrual,
    ) -> bool {
        if success {
            if endpoint.failures.swap(0, Ordering::AcqRel) > 0 {
                self.members().backoff.remove(&endpoint.addr);
            }
            return false;
        }
        let failures = endpoint.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < accrual.consecutive_failures {
            return false;
        }
        let backoff = {
            let mut members = self.members();
            if members.ejected.contains(&endpoint.addr) {
                return false;
            }
            let backoff = members
                .backoff
                .get(&endpoint.addr)
                .map_or(accrual.min_backoff, |last| {
                    (*last * 2).min(accrual.max_backoff)
                });
            members.backoff.insert(endpoint.addr, backoff);
            members.ejected.insert(endpoint.addr);
            self.rebalance(&members);
            backoff
        };
        warn!(target = %self.key, endpoint = %endpoint.addr, failures, "endpoint ejected for {backoff:?}");
        let resolution = Arc::downgrade(self);
        let addr = endpoint.addr;
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            if let Some(resolution) = resolution.upgrade() {
                let mut members = resolution.members();
                members.ejected.remove(&addr);
                resolution.rebalance(&members);
                // What was measured before the ejection says nothing now: unmeasured and idle,
                // the endpoint gets the next request as its probe.
                resolution.balancer.forget_latency(addr);
                info!(target = %resolution.key, endpoint = %addr, "ejected endpoint rejoins as a probe");
            }
        });
        true
    }
}

/// Resolves targets through the controller, caching one resolution per target.
#[derive(Debug)]
pub struct Discovery {
    client: Option<DestinationClient<Channel>>,
    source: WorkloadRef,
    clients: ClientSettings,
    tls: Option<Arc<TlsContext>>,
    cache: Arc<IdleMap<TargetKey, Arc<Resolution>>>,
}

/// Backoff bounds for reconnecting to the controller.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often an unknown target is asked about again (it may be created later).
const NOT_FOUND_RETRY: Duration = Duration::from_secs(5);

impl Discovery {
    /// Discovery through the controller at `controller` (None: every target is unknown and
    /// forwarded to its original destination). Connects lazily, so a controller that is down
    /// at start is not an error. Each endpoint's clients connect as `clients` says;
    /// a target no connection has used for `idle` is forgotten (its stream closed).
    pub fn new(
        controller: Option<&str>,
        source: WorkloadRef,
        clients: ClientSettings,
        idle: Duration,
        tls: Option<Arc<TlsContext>>,
    ) -> Result<Self, tonic::transport::Error> {
        let client = match controller {
            Some(addr) => {
                let channel = tonic::transport::Endpoint::from_shared(addr.to_string())?
                    .connect_timeout(clients.connect_timeout)
                    .tcp_nodelay(true)
                    .connect_lazy();
                Some(DestinationClient::new(channel))
            }
            None => None,
        };
        Ok(Self {
            client,
            source,
            clients,
            tls,
            cache: {
                let cache = IdleMap::new(idle);
                cache.sweep_in_background();
                cache
            },
        })
    }

    /// The resolution of `key`, starting its watch on first use.
    pub fn resolve(&self, key: TargetKey) -> Arc<Resolution> {
        self.cache
            .get_or_insert_with(&key, || self.start_resolution(key.clone()))
    }

    fn start_resolution(&self, key: TargetKey) -> Arc<Resolution> {
        let (tx, rx) = watch::channel(State::Pending);
        let resolution = Arc::new(Resolution {
            key: key.clone(),
            balancer: Balancer::new(balance::Algorithm::default()),
            state: rx,
            members: Mutex::new(Members::default()),
        });
        match &self.client {
            Some(client) => {
                let watch = Watch {
                    client: client.clone(),
                    source: self.source.clone(),
                    clients: self.clients,
                    tls: self.tls.clone(),
                    resolution: Arc::downgrade(&resolution),
                    key,
                    state: tx,
                    endpoints: HashMap::new(),
                };
                tokio::spawn(watch.run());
            }
            None => {
                let _ = tx.send(State::NotFound);
            }
        }
        resolution
    }

    /// Every cached resolution, for the config dump.
    pub fn snapshot(&self) -> Vec<Arc<Resolution>> {
        self.cache.values()
    }
}

/// The service's authority for metrics, from the labels the controller sends with endpoints:
/// `authority` when given, else `service.namespace.svc.cluster.local:port`.
fn service_authority(labels: &HashMap<String, String>, key: &TargetKey) -> Option<String> {
    if let Some(authority) = labels.get("authority") {
        return Some(authority.clone());
    }
    let port = match key {
        TargetKey::Addr(addr) => addr.port(),
        TargetKey::Authority(authority) => authority.rsplit_once(':')?.1.parse().ok()?,
    };
    Some(format!(
        "{}.{}.svc.cluster.local:{port}",
        labels.get("service")?,
        labels.get("namespace")?
    ))
}

/// The background task that follows one target's stream.
struct Watch {
    client: DestinationClient<Channel>,
    source: WorkloadRef,
    clients: ClientSettings,
    tls: Option<Arc<TlsContext>>,
    resolution: std::sync::Weak<Resolution>,
    key: TargetKey,
    state: watch::Sender<State>,
    endpoints: HashMap<SocketAddr, Arc<Endpoint>>,
}

impl Watch {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let request = destination::GetDestination {
                target: Some(match &self.key {
                    TargetKey::Addr(addr) => Target::Addr((*addr).into()),
                    TargetKey::Authority(authority) => Target::Authority(authority.clone()),
                }),
                source: Some(self.source.clone()),
            };
            let wait = match self.client.get(request).await {
                Ok(response) => {
                    backoff = MIN_BACKOFF;
                    let mut stream = response.into_inner();
                    // The server starts every stream with the full set: the first update after
                    // a reconnect replaces what we had rather than merging into it.
                    let mut fresh = true;
                    loop {
                        // The stream ends with the resolution: once no connection uses the
                        // target and the cache forgot it, the state's receivers are gone.
                        let message = tokio::select! {
                            message = stream.message() => message,
                            () = self.state.closed() => return,
                        };
                        match message {
                            Ok(Some(update)) => {
                                if !self.apply(update, std::mem::take(&mut fresh)) {
                                    return;
                                }
                            }
                            Ok(None) => {
                                debug!(target = %self.key, "destination stream ended");
                                break;
                            }
                            Err(status) => {
                                warn!(target = %self.key, %status, "destination stream failed; keeping the last endpoints");
                                break;
                            }
                        }
                    }
                    MIN_BACKOFF
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    debug!(target = %self.key, "not a mesh target; forwarding unchanged");
                    self.endpoints.clear();
                    if !self.publish(State::NotFound) {
                        return;
                    }
                    NOT_FOUND_RETRY
                }
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    warn!(target = %self.key, %status, "controller refused the target");
                    if !self.publish(State::NotFound) {
                        return;
                    }
                    MAX_BACKOFF
                }
                Err(status) => {
                    warn!(target = %self.key, %status, "controller unreachable; keeping the last endpoints, retrying in {backoff:?}");
                    if self.state.borrow().clone() == State::Pending
                        && !self.publish(State::NotFound)
                    {
                        return;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::time::sleep(wait).await;
            if self.resolution.strong_count() == 0 {
                return;
            }
        }
    }

    /// Applies one update; false when nobody holds the resolution any more.
    fn apply(&mut self, update: destination::Update, replace: bool) -> bool {
        let Some(resolution) = self.resolution.upgrade() else {
            return false;
        };
        if replace {
            self.endpoints.clear();
        }
        let mut authority = None;
        match update.update {
            Some(Update::Add(add)) => {
                authority = service_authority(&add.metric_labels, &self.key);
                for endpoint in add.endpoints {
                    match self.endpoint(&endpoint) {
                        Some(endpoint) => {
                            self.endpoints.insert(endpoint.addr, Arc::new(endpoint));
                        }
                        None => {
                            warn!(target = %self.key, ?endpoint, "ignoring a malformed endpoint")
                        }
                    }
                }
            }
            Some(Update::Remove(remove)) => {
                for addr in &remove.addrs {
                    if let Ok(addr) = SocketAddr::try_from(addr) {
                        self.endpoints.remove(&addr);
                    }
                }
            }
            Some(Update::NoEndpoints(_)) => self.endpoints.clear(),
            None => {}
        }
        resolution.set_endpoints(self.endpoints.values().cloned().collect());
        info!(target = %self.key, endpoints = self.endpoints.len(), "endpoints updated");
        let authority = authority
            .or_else(|| match &*self.state.borrow() {
                State::Known { authority } => Some(authority.0.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| self.key.to_string());
        self.publish(State::Known {
            authority: Label::from(authority),
        })
    }

    fn endpoint(&self, wire: &destination::Endpoint) -> Option<Endpoint> {
        let addr = SocketAddr::try_from(wire.addr.as_ref()?).ok()?;
        let opaque = wire.protocol_hint == destination::ProtocolHint::Opaque as i32;
        let proxy_port = u16::try_from(wire.inbound_proxy_port)
            .ok()
            .filter(|p| *p != 0);
        let name = self.key.to_string();
        let identity = wire
            .tls_identity
            .as_ref()
            .map(|id| id.spiffe_id.clone())
            .filter(|id| !id.is_empty());
        // Mutual TLS needs both sides to have an identity; otherwise the hop stays plaintext
        // (and the peer's policy decides whether it accepts that).
        let tls = identity
            .as_deref()
            .and_then(|identity| self.mesh_tls(identity));
        let gateway = wire.gateway.as_ref().and_then(|gateway| {
            let addr = SocketAddr::try_from(gateway.addr.as_ref()?).ok()?;
            let identity = gateway.tls_identity.as_ref()?.spiffe_id.as_str();
            Some(Arc::new(GatewayHop {
                addr,
                tls: self.mesh_tls(identity)?,
                cluster: gateway.cluster.clone(),
            }))
        });
        let dial = endpoint_dial(
            addr,
            proxy_port,
            identity.is_some(),
            tls.clone(),
            gateway.clone(),
            opaque,
            &name,
        );
        Some(Endpoint {
            addr,
            identity,
            proxy_port,
            opaque,
            tls,
            gateway,
            clients: HttpClients::new(dial, self.clients),
            failures: AtomicU32::new(0),
        })
    }

    /// Mutual TLS toward `identity`: none when we have no identity ourselves (the hop then
    /// stays plaintext, and the peer's policy decides whether it accepts that).
    fn mesh_tls(&self, identity: &str) -> Option<MeshTls> {
        let context = self.tls.as_ref()?;
        match context.client_config(identity) {
            Ok(config) => Some(MeshTls {
                config,
                identity: identity.to_owned(),
            }),
            Err(error) => {
                warn!(%identity, %error, "cannot build TLS toward the endpoint");
                None
            }
        }
    }

    fn publish(&self, state: State) -> bool {
        self.state.send_replace(state);
        self.resolution.strong_count() > 0
    }
}
