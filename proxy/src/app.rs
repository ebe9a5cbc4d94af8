//! Starting and stopping the proxy: bind the listeners, run the inbound, outbound and admin
//! servers, and drain them on request.
//!
//! The listeners are parameters, so tests run the real proxy in-process on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::client::{ClientSettings, Dial, HttpClients};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::identity::{self, Identity};
use crate::idle::IdleMap;
use crate::metrics::{Label, Metrics};
use crate::outbound::{InFlight, PlanStore};
use crate::policy::{InboundPolicy, PolicyStore};
use crate::tap::TapHub;
use crate::tls::TlsContext;
use crate::trace::Tracer;
use crate::workers::{ServeOn, Serving, Workers};
use crate::{admin, inbound, outbound};
use mesh_proto::identity::identity_client::IdentityClient;
use mesh_proto::tonic;

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("binding the {name} listener on {addr}: {source}")]
    Bind {
        /// inbound, outbound or admin.
        name: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The identity configuration is not usable.
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// TLS could not be configured.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A worker thread could not start.
    #[error("starting the worker threads: {0}")]
    Workers(std::io::Error),
    /// The controller address is not usable.
    #[error("controller address {addr:?}: {source}")]
    Controller {
        /// The address.
        addr: String,
        /// Why.
        source: mesh_proto::tonic::transport::Error,
    },
}

/// The proxy's three bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// Traffic for the local application.
    pub inbound: TcpListener,
    /// Traffic from the local application.
    pub outbound: TcpListener,
    /// The admin server.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses with the configured listen backlog.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let backlog = config.limits.listen_backlog;
        let bind = |name: &'static str, addr: SocketAddr| {
            bind_listener(addr, backlog).map_err(|source| StartError::Bind { name, addr, source })
        };
        Ok(Self {
            inbound: bind("inbound", config.inbound_listen)?,
            outbound: bind("outbound", config.outbound_listen)?,
            admin: bind("admin", config.admin_listen)?,
        })
    }
}

/// A listener with an explicit backlog: tokio's `bind` takes 1024, which a burst of new
/// connections overflows into resets.
fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The ports of the proxy's own listeners. Nothing the proxy forwards may reach them: through
/// the inbound side a peer would meet the admin server as a loopback client, or leave through
/// the outbound listener as this pod (with its identity); through the outbound side a proxied
/// connection would reach the admin server from loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnPorts {
    /// The inbound listener's port.
    pub inbound: u16,
    /// The outbound listener's port.
    pub outbound: u16,
    /// The admin server's port.
    pub admin: u16,
}

impl OwnPorts {
    /// The listener `port` belongs to, if it is one of ours.
    pub fn name_of(&self, port: u16) -> Option<&'static str> {
        if port == self.admin {
            Some("admin")
        } else if port == self.outbound {
            Some("outbound")
        } else if port == self.inbound {
            Some("inbound")
        } else {
            None
        }
    }

    /// Why a forward to `addr` is refused: it names one of our listeners on this host's
    /// loopback or unspecified address, where they listen.
    pub fn refuse(&self, addr: SocketAddr) -> Option<crate::http::ProxyError> {
        let ip = addr.ip().to_canonical();
        if !(ip.is_loopback() || ip.is_unspecified()) {
            return None;
        }
        self.name_of(addr.port())
            .map(|name| crate::http::ProxyError::own_port(addr.port(), name))
    }
}

/// What every part of the running proxy shares.
#[derive(Debug)]
pub struct Context {
    /// The configuration.
    pub config: Config,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Target resolution.
    pub discovery: Discovery,
    /// Mesh TLS, when the proxy has an identity.
    pub tls: Option<Arc<TlsContext>>,
    /// Inbound policies per port.
    pub policies: PolicyStore,
    /// Outbound routing plans per target.
    pub plans: PlanStore,
    /// Requests in flight per backend, for the plans' concurrency limits.
    pub in_flight: InFlight,
    /// Live taps in progress.
    pub tap: Arc<TapHub>,
    /// The bytes of request bodies every connection together may hold for retries.
    pub retry_buffers: Arc<crate::retry::BufferCap>,
    /// Span export, when a collector is configured.
    pub tracer: Option<Arc<Tracer>>,
    /// Fires when the proxy starts draining.
    pub drain: CancellationToken,
    /// Set once the proxy serves traffic.
    pub ready: AtomicBool,
    /// The ports of our own listeners, which nothing forwarded may reach.
    pub own_ports: OwnPorts,
    /// The host names egress metrics name traffic by, bounded.
    pub egress_hosts: crate::egress::HostLabels,
    /// The threads that serve connections.
    pub workers: Workers,
    local_id: Label,
    /// Clients for addresses forwarded to unchanged (targets discovery doesn't know).
    direct_clients: Arc<IdleMap<SocketAddr, HttpClients>>,
}

impl Context {
    /// Ready to serve: listening, and holding a certificate when identity is configured.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && self
                .tls
                .as_ref()
                .is_none_or(|tls| tls.identity().is_certified())
    }

    /// How `listener` serves HTTP.
    pub fn http_server(&self, listener: &'static str) -> crate::server::HttpServer {
        crate::server::HttpServer {
            listener,
            drain: self.drain.clone(),
            header_read_timeout: self.config.limits.http_header_read_timeout,
            metrics: self.metrics.clone(),
        }
    }

    /// The local SPIFFE ID, or an empty label.
    pub fn local_id(&self) -> Label {
        self.local_id.clone()
    }

    /// The clients dialing `addr` directly, created on first use.
    pub fn direct_clients(&self, addr: SocketAddr) -> HttpClients {
        self.direct_clients.get_or_insert_with(&addr, || {
            HttpClients::new(Dial::Direct(addr), ClientSettings::new(&self.config))
        })
    }
}

/// A proxy running in the background (tests and embedding).
#[derive(Debug)]
pub struct Running {
    /// Where the inbound listener is.
    pub inbound_addr: SocketAddr,
    /// Where the outbound listener is.
    pub outbound_addr: SocketAddr,
    /// Where the admin server is.
    pub admin_addr: SocketAddr,
    /// Fire to drain and stop.
    pub drain: CancellationToken,
    /// Finishes when the proxy has stopped.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the proxy on the given listeners; it runs until `drain` fires (SIGTERM, `POST
/// /shutdown`, or the caller), then finishes in-flight work up to the grace period.
pub fn start(config: Config, listeners: Listeners) -> Result<Running, StartError> {
    let local = |listener: &TcpListener| {
        listener.local_addr().map_err(|source| StartError::Bind {
            name: "bound",
            addr: config.admin_listen,
            source,
        })
    };
    let inbound_addr = local(&listeners.inbound)?;
    let outbound_addr = local(&listeners.outbound)?;
    let admin_addr = local(&listeners.admin)?;
    let own_ports = OwnPorts {
        inbound: inbound_addr.port(),
        outbound: outbound_addr.port(),
        admin: admin_addr.port(),
    };
    let metrics = Arc::new(Metrics::new());
    let tls = match &config.identity {
        Some(identity_config) => {
            let anchors = identity::parse_trust_anchors(&identity_config.trust_anchors_pem)?;
            let identity = Arc::new(Identity::new(
                identity_config.id.clone(),
                anchors,
                identity_config.cache_dir.clone(),
            )?);
            let channel =
                tonic::transport::Endpoint::from_shared(identity_config.service_addr.clone())
                    .map_err(|source| StartError::Controller {
                        addr: identity_config.service_addr.clone(),
                        source,
                    })?
                    .connect_timeout(config.connect_timeout)
                    .connect_lazy();
            tokio::spawn(identity.clone().run_renewal(
                IdentityClient::new(channel),
                identity_config.token_file.clone(),
                metrics.clone(),
            ));
            Some(Arc::new(TlsContext::new(identity)?))
        }
        None => None,
    };
    let discovery = Discovery::new(
        config.controller_addr.as_deref(),
        config.workload.to_proto(),
        ClientSettings::new(&config),
        config.limits.target_idle_timeout,
        tls.clone(),
    )
    .map_err(|source| StartError::Controller {
        addr: config.controller_addr.clone().unwrap_or_default(),
        source,
    })?;
    let trust_domain = config
        .identity
        .as_ref()
        .map_or("cluster.local", |identity| identity.trust_domain());
    let policies = PolicyStore::new(
        config.controller_addr.as_deref(),
        config.workload.to_proto(),
        InboundPolicy::default_policy(config.default_inbound_policy, trust_domain),
        config.connect_timeout,
        config.discovery_timeout,
    )
    .map_err(|source| StartError::Controller {
        addr: config.controller_addr.clone().unwrap_or_default(),
        source,
    })?;
    let plans = PlanStore::new(
        config.controller_addr.as_deref(),
        config.workload.to_proto(),
        config.connect_timeout,
        config.discovery_timeout,
        config.limits.target_idle_timeout,
    )
    .map_err(|source| StartError::Controller {
        addr: config.controller_addr.clone().unwrap_or_default(),
        source,
    })?;
    let tracer = match &config.trace_collector {
        Some(collector) => {
            let service = match (&config.workload.name, &config.workload.namespace) {
                (name, ns) if !name.is_empty() => format!("{name}.{ns}"),
                _ => "mesh-proxy".to_string(),
            };
            Some(Arc::new(
                Tracer::start(
                    collector,
                    service,
                    config.trace_sample_rate,
                    metrics.spans_dropped.clone(),
                )
                .map_err(|source| StartError::Controller {
                    addr: collector.clone(),
                    source,
                })?,
            ))
        }
        None => None,
    };
    let local_id = Label::from(
        config
            .identity
            .as_ref()
            .map(|identity| identity.id.clone())
            .unwrap_or_default(),
    );
    let workers = Workers::start(config.worker_threads).map_err(StartError::Workers)?;
    let drain = CancellationToken::new();
    let grace = config.shutdown_grace_period;
    let direct_clients = IdleMap::new(config.limits.target_idle_timeout);
    direct_clients.sweep_in_background();
    let retry_buffers = crate::retry::BufferCap::new(
        config.limits.retry_buffer_bytes,
        metrics.retry_buffered_bytes.clone(),
    );
    let ctx = Arc::new(Context {
        config,
        metrics,
        discovery,
        tls,
        policies,
        plans,
        in_flight: InFlight::default(),
        tap: Arc::new(TapHub::default()),
        retry_buffers,
        tracer,
        drain: drain.clone(),
        ready: AtomicBool::new(false),
        own_ports,
        egress_hosts: crate::egress::HostLabels::default(),
        workers,
        local_id,
        direct_clients,
    });
    let connections = TaskTracker::new();
    let admin = tokio::spawn(admin::serve(listeners.admin, ctx.clone()));
    let inbound = tokio::spawn(inbound::serve(
        listeners.inbound,
        ctx.clone(),
        connections.clone(),
    ));
    let outbound = tokio::spawn(outbound::serve(
        listeners.outbound,
        ctx.clone(),
        connections.clone(),
    ));
    if ctx.config.exit_with_app
        && let Some(controller) = &ctx.config.controller_addr
    {
        let channel = tonic::transport::Endpoint::from_shared(controller.clone())
            .map_err(|source| StartError::Controller {
                addr: controller.clone(),
                source,
            })?
            .connect_timeout(ctx.config.connect_timeout)
            .connect_lazy();
        tokio::spawn(crate::lifecycle::exit_with_app(
            channel,
            ctx.config.workload.to_proto(),
            ctx.drain.clone(),
        ));
    }
    ctx.ready.store(true, Ordering::Release);
    info!(%inbound_addr, %outbound_addr, %admin_addr, "proxy ready");

    let task = tokio::spawn(async move {
        ctx.drain.cancelled().await;
        info!("draining: no new connections; finishing in-flight work for up to {grace:?}");
        ctx.ready.store(false, Ordering::Release);
        let _ = tokio::join!(inbound, outbound);
        connections.close();
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            warn!(
                open = connections.len(),
                "grace period over; closing the remaining connections"
            );
        }
        admin.abort();
        ctx.workers.stop();
        info!("proxy stopped");
    });
    Ok(Running {
        inbound_addr,
        outbound_addr,
        admin_addr,
        drain,
        task,
    })
}

/// One listener's accept loop settings.
#[derive(Debug)]
pub struct Accept {
    /// inbound, outbound or admin: the `listener` label of its metrics and logs.
    pub name: &'static str,
    /// Connections served at once; past it new ones are closed as soon as accepted.
    pub max_connections: usize,
    /// Where the refusals and the open connections are counted.
    pub metrics: Arc<Metrics>,
    /// Accepting stops when this fires.
    pub stop: CancellationToken,
    /// Tracks the connections' tasks (so the drain can wait for them).
    pub connections: TaskTracker,
    /// The threads connections are spread over.
    pub workers: Workers,
}

/// How often, at most, a listener at its connection limit says so in the log: a flood must
/// not become a flood of log lines.
const LIMIT_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection's share of its listener and of its worker thread: counted as open, holding one
/// of the listener's permits, until it ends (or its task is dropped).
struct ConnectionSlot {
    open: Gauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _worker: Option<Serving>,
}

impl ConnectionSlot {
    fn new(
        open: Gauge,
        permit: tokio::sync::OwnedSemaphorePermit,
        worker: Option<Serving>,
    ) -> Self {
        open.inc();
        Self {
            open,
            _permit: permit,
            _worker: worker,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Serves an accepted connection on another worker's runtime. The socket moves to that
/// runtime's reactor, so its readiness wakes that thread rather than this one.
fn serve_on<F, Fut>(
    worker: &tokio::runtime::Handle,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    connections: &TaskTracker,
    handle: F,
    slot: ConnectionSlot,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => {
            warn!(%peer, %error, "could not hand a connection to a worker thread");
            return;
        }
    };
    let served = async move {
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => handle(stream, peer).await,
            Err(error) => warn!(%peer, %error, "a worker thread could not take a connection"),
        }
        drop(slot);
    };
    connections.spawn_on(served, worker);
}

/// Accepts connections until `accept.stop` fires, handing each to `handle` on its own task,
/// at most `accept.max_connections` at once. A connection past the limit is closed at once
/// (the client sees a reset or an immediate close, not a hang), counted in
/// `listener_connections_refused_total` and logged. Each connection is served on the worker
/// thread serving the fewest.
pub async fn accept_loop<F, Fut>(listener: TcpListener, accept: Accept, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Accept {
        name,
        max_connections,
        metrics,
        stop,
        connections,
        workers,
    } = accept;
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let open = metrics.listener_open(name);
    let mut last_warned: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    metrics.listener_refused(name, "connection limit");
                    if last_warned.is_none_or(|at| at.elapsed() >= LIMIT_LOG_INTERVAL) {
                        last_warned = Some(tokio::time::Instant::now());
                        warn!(
                            listener = name,
                            %peer,
                            max_connections,
                            "connection limit reached; closing new connections until some end"
                        );
                    }
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (served_on, worker) = workers.assign();
                let slot = ConnectionSlot::new(open.clone(), permit, worker);
                match served_on {
                    // `map` rather than an `async` block awaiting `served`: the block would
                    // keep room for the connection's future twice, doubling every task.
                    ServeOn::Here => {
                        connections.spawn(handle(stream, peer).map(move |()| drop(slot)));
                    }
                    ServeOn::There(worker) => {
                        serve_on(worker, stream, peer, &connections, handle.clone(), slot);
                    }
                }
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
