//! `mesh-controller`: the mesh's control plane.
//!
//! This crate owns discovery: one in-memory [`index`] of Services, EndpointSlices, Pods,
//! Namespaces and ServiceAccounts, fed by a backend ([`kubernetes`]: an API server's watches;
//! [`file`]: a folder of the same YAML), served to proxies by `Destination.Get` over gRPC, with an admin
//! port for `/metrics`, `/ready` and `/live`. It must not carry traffic, and it must never
//! panic or stop serving because of what it reads from files or the network: bad input is
//! reported and the last good state stays served.
//!
//! The decisions are pure functions over snapshots, tested beside them: [`meta`] (meshed,
//! identity, opaque ports, workload), [`index`] (endpoints of a Service port or a pod),
//! [`endpoints`] (the diffs a stream sends), [`target`] (what a request names).
//! [`stats`] and [`tap`] aggregate what the proxies report for meshctl, to the users
//! [`access`] admits (Kubernetes RBAC). With several replicas, [`lease`] elects the one that
//! writes route status, and [`multicluster`] mirrors the Services linked clusters export.
//! [`run`] takes already-bound listeners so tests run it on `127.0.0.1:0`.

pub mod access;
pub mod admin;
pub mod destination;
pub mod endpoints;
pub mod external;
pub mod file;
pub mod follow;
pub mod health;
pub mod identity;
pub mod index;
pub mod kubernetes;
pub mod lease;
pub mod meta;
pub mod metrics;
pub mod multicluster;
pub mod objects;
pub mod pod;
pub mod policy;
pub mod stats;
pub mod tap;
pub mod target;
pub mod trace;
pub mod workload;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

pub use health::{Health, HealthState};
pub use metrics::Metrics;

use crate::destination::DestinationService;
use crate::index::{Index, IndexOptions};
use crate::meta::MeshedRule;

/// Where discovery reads the cluster from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A folder of Kubernetes-style YAML, polled for changes.
    File {
        /// The folder (read recursively).
        dir: PathBuf,
        /// How often to look for changes.
        poll_interval: Duration,
    },
    /// A Kubernetes API server.
    Kubernetes {
        /// A kubeconfig file; without one, the in-cluster config or `KUBECONFIG`.
        kubeconfig: Option<PathBuf>,
    },
}

/// Everything [`run`] needs besides its listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The discovery backend.
    pub discovery: Discovery,
    /// The trust domain of SPIFFE identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    pub trust_domain: String,
    /// The cluster's DNS domain: `name.ns.svc.<cluster-domain>` names a Service.
    pub cluster_domain: String,
    /// How long a `Destination.Get` waits for discovery's first sync before UNAVAILABLE.
    pub sync_wait: Duration,
    /// The identity CA; without it the Identity service is not served (no mTLS).
    pub identity: Option<IdentityOptions>,
    /// The inbound policy of ports no Server covers, unless the pod or its namespace names
    /// one (`config.mesh.dev/default-inbound-policy`).
    pub default_inbound_policy: policy::inbound::DefaultPolicy,
    /// Spans of the gRPC handlers, exported over OTLP; none without it.
    pub trace: Option<trace::TraceOptions>,
    /// The Lease replicas compete for to write route status (Kubernetes, several replicas);
    /// without it this replica writes alone.
    pub status_lease: Option<lease::Election>,
    /// Traffic leaving the mesh: the global EgressNetworks' namespace and the default policy.
    pub egress: policy::egress::EgressSettings,
    /// Mirrors of the Services other clusters export (Kubernetes only); none without it.
    pub multicluster: Option<multicluster::MulticlusterSettings>,
}

/// Where the identity CA's issuer comes from and how it signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityOptions {
    /// A folder in cert-manager's layout: `tls.crt`, `tls.key` (the issuer), `ca.crt` (the
    /// trust anchors). Reread when its files change, so an issuer rotates without a restart.
    pub dir: PathBuf,
    /// How long issued leaf certificates are valid.
    pub leaf_lifetime: Duration,
    /// How often the folder is checked for a new issuer.
    pub reload_interval: Duration,
}

impl IdentityOptions {
    /// The issuer in `dir`, 24 h leaves, checked every 10 s.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            leaf_lifetime: identity::DEFAULT_LEAF_LIFETIME,
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// A config with the defaults for everything but the backend.
    pub fn new(discovery: Discovery) -> Self {
        Self {
            discovery,
            trust_domain: "cluster.local".to_owned(),
            cluster_domain: "cluster.local".to_owned(),
            sync_wait: Duration::from_secs(10),
            identity: None,
            default_inbound_policy: policy::inbound::DefaultPolicy::AllUnauthenticated,
            trace: None,
            status_lease: None,
            egress: policy::egress::EgressSettings::default(),
            multicluster: None,
        }
    }
}

/// Why the controller could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The trace collector's address is not a usable URL.
    #[error("trace collector {0}")]
    Trace(String),
    /// The config folder of the file backend is not a readable folder.
    #[error("config folder {path}: {reason}")]
    ConfigDir {
        /// The folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No Kubernetes client could be built (kubeconfig, in-cluster config).
    #[error("kubernetes client: {0}")]
    Kubernetes(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The admin server failed.
    #[error("admin server: {0}")]
    Admin(#[source] std::io::Error),
    /// The identity issuer could not be loaded.
    #[error("identity issuer in {path}: {source}")]
    Identity {
        /// The identity folder.
        path: PathBuf,
        /// Why it does not load.
        #[source]
        source: identity::LoadError,
    },
}

/// Runs the controller: discovery, the gRPC server on `grpc`, the admin server on `admin`,
/// until `shutdown` resolves; then stops accepting, ends open streams and returns.
pub async fn run(
    config: Config,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let identity_metrics = identity::IdentityMetrics::new();
    let policy_metrics = policy::metrics::PolicyMetrics::new();
    let multicluster_metrics = multicluster::MulticlusterMetrics::new();
    let spans_dropped = prometheus_client::metrics::counter::Counter::default();
    let metrics = Metrics::with_registrations(|registry| {
        identity_metrics.register(registry);
        policy_metrics.register(registry);
        multicluster_metrics.register(registry);
        registry.register(
            "trace_spans_dropped",
            "Spans not exported: the queue was full or the collector failed",
            spans_dropped.clone(),
        );
    });
    let tracer = match &config.trace {
        Some(options) => Some(std::sync::Arc::new(
            mesh_trace::Tracer::start(
                &options.collector,
                "mesh-controller".to_owned(),
                options.sample_rate,
                spans_dropped,
            )
            .map_err(|e| Error::Trace(format!("{}: {e}", options.collector)))?,
        )),
        None => None,
    };
    // Loaded before anything starts, so a bad identity folder fails the start, not a proxy.
    let issuer = match &config.identity {
        Some(options) => {
            let loaded =
                identity::Issuer::from_dir(&options.dir).map_err(|source| Error::Identity {
                    path: options.dir.clone(),
                    source,
                })?;
            tracing::info!(
                dir = %options.dir.display(),
                subject = loaded.subject(),
                leaf_lifetime = ?options.leaf_lifetime,
                "identity CA loaded"
            );
            Some(identity::SharedIssuer::new(loaded, &identity_metrics))
        }
        None => {
            tracing::warn!(
                "no identity folder (--identity-dir): the Identity service is NOT served, so \
                 proxies get no certificates and run without mTLS"
            );
            None
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    let signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = signal.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let (health, snapshots, backend, authenticator, policy_inputs, kube_client) =
        match &config.discovery {
            Discovery::File { dir, poll_interval } => {
                let meta = std::fs::metadata(dir).map_err(|e| Error::ConfigDir {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
                if !meta.is_dir() {
                    return Err(Error::ConfigDir {
                        path: dir.clone(),
                        reason: "not a folder".to_owned(),
                    });
                }
                let (index, snapshots) = Index::new(IndexOptions {
                    trust_domain: config.trust_domain.clone(),
                    meshed_rule: MeshedRule::InjectAnnotation,
                    endpoints_from_pods: true,
                    // Hand-written slices may name pods the files do not define.
                    wait_for_pods: false,
                    identity_enabled: config.identity.is_some(),
                });
                let health = Health::new(format!("the first scan of {}", dir.display()));
                // The file backend's ServiceAccounts declare the tokens; refreshed on every change.
                let tokens = std::sync::Arc::new(identity::StaticTokens::default());
                tokio::spawn(refresh_static_tokens(
                    index.subscribe_policy(),
                    tokens.clone(),
                    stop_rx.clone(),
                ));
                let authenticator: std::sync::Arc<dyn identity::TokenAuthenticator> = tokens;
                let policy_inputs = index.subscribe_policy();
                let backend = tokio::spawn(file::run(
                    dir.clone(),
                    *poll_interval,
                    index,
                    health.clone(),
                    metrics.clone(),
                    stop_rx.clone(),
                ));
                (
                    health,
                    snapshots,
                    backend,
                    authenticator,
                    policy_inputs,
                    None,
                )
            }
            Discovery::Kubernetes { kubeconfig } => {
                let client = kubernetes::client(kubeconfig.as_deref()).await?;
                let (index, snapshots) = Index::new(IndexOptions {
                    trust_domain: config.trust_domain.clone(),
                    meshed_rule: MeshedRule::ProxyPresent,
                    endpoints_from_pods: false,
                    wait_for_pods: true,
                    identity_enabled: config.identity.is_some(),
                });
                let health =
                    Health::new("the first list of Namespaces, Services, EndpointSlices and Pods");
                let authenticator: std::sync::Arc<dyn identity::TokenAuthenticator> =
                    std::sync::Arc::new(identity::TokenReviewAuthenticator::new(client.clone()));
                let policy_inputs = index.subscribe_policy();
                let kube_client = Some(client.clone());
                let backend = tokio::spawn(kubernetes::run(
                    client,
                    index,
                    health.clone(),
                    metrics.clone(),
                    stop_rx.clone(),
                ));
                (
                    health,
                    snapshots,
                    backend,
                    authenticator,
                    policy_inputs,
                    kube_client,
                )
            }
        };
    // The controller's own identity, for tapping the proxies over mTLS.
    let tap_identity = issuer.as_ref().and_then(|issuer| {
        let account = identity::ServiceAccountName::new(
            tap::tls::CONTROLLER_NAMESPACE,
            tap::tls::CONTROLLER_SERVICE_ACCOUNT,
        );
        match identity::SpiffeId::new(&config.trust_domain, account) {
            Ok(id) => Some(std::sync::Arc::new(tap::tls::ControllerIdentity::new(
                id,
                issuer.clone(),
                config
                    .identity
                    .as_ref()
                    .map_or(identity::DEFAULT_LEAF_LIFETIME, |o| o.leaf_lifetime),
            ))),
            Err(error) => {
                tracing::warn!(%error, "no identity for the controller: tap runs without mTLS");
                None
            }
        }
    });
    let identity_service = issuer.map(|issuer| {
        if let Some(options) = &config.identity {
            tokio::spawn(identity::watch_issuer_dir(
                options.dir.clone(),
                options.reload_interval,
                issuer.clone(),
                stopped(stop_rx.clone()),
            ));
        }
        identity::IdentityService::new(
            identity::IdentityConfig {
                leaf_lifetime: config
                    .identity
                    .as_ref()
                    .map_or(identity::DEFAULT_LEAF_LIFETIME, |o| o.leaf_lifetime),
                ..identity::IdentityConfig::new(config.trust_domain.clone())
            },
            issuer,
            authenticator,
            identity_metrics,
        )
        .into_server()
    });

    let admin_server = tokio::spawn(admin::serve(
        admin,
        health.clone(),
        metrics.clone(),
        stopped(stop_rx.clone()),
    ));

    // On Kubernetes, tap and stats are for the users RBAC allows; a local mesh's are open.
    let observer_access = match &kube_client {
        Some(client) => access::ObserverAccess::rbac(client.clone()),
        None => access::ObserverAccess::Open,
    };
    // Scrapes the proxies the index knows; serves Stats.Summary/Edges (meshctl stat, dashboard).
    let stats = stats::spawn(
        snapshots.clone(),
        stats::StatsConfig::default(),
        observer_access.clone(),
        stop_rx.clone(),
    );
    let policy_context = policy::server::PolicyContext {
        inputs: policy_inputs.clone(),
        health: health.clone(),
        sync_wait: config.sync_wait,
        shutdown: stop_rx.clone(),
        metrics: policy_metrics.clone(),
    };
    let outbound_settings = policy::outbound::OutboundSettings {
        cluster_domain: config.cluster_domain.clone(),
        egress: config.egress.clone(),
    };
    let leading = match (&kube_client, &config.status_lease) {
        (Some(client), Some(election)) => Some(lease::spawn(
            client.clone(),
            election.clone(),
            stop_rx.clone(),
        )),
        _ => None,
    };
    match (&kube_client, &config.multicluster) {
        (Some(client), Some(settings)) => {
            tokio::spawn(multicluster::sync::run(
                client.clone(),
                settings.clone(),
                leading.clone(),
                multicluster_metrics,
                stop_rx.clone(),
            ));
        }
        (None, Some(_)) => {
            tracing::warn!(
                "multicluster links need the kubernetes backend: no Service is mirrored"
            );
        }
        _ => {}
    }
    tokio::spawn(policy::report::run(
        policy_inputs,
        outbound_settings.clone(),
        policy_metrics,
        kube_client,
        leading,
        stop_rx.clone(),
    ));
    let inbound_policies = policy::server::InboundPoliciesService::new(
        policy_context.clone(),
        policy::inbound::InboundSettings {
            trust_domain: config.trust_domain.clone(),
            cluster_default: config.default_inbound_policy,
        },
    );
    let outbound_policies =
        policy::server::OutboundPoliciesService::new(policy_context, outbound_settings);
    let tap = tap::TapService::new(
        snapshots.clone(),
        tap_identity,
        observer_access,
        tap::TapConfig::default(),
    );
    let workload = workload::WorkloadService::new(snapshots.clone(), stop_rx.clone());
    let destination = DestinationService::new(
        snapshots,
        health,
        metrics,
        config.cluster_domain.clone(),
        config.sync_wait,
        stop_rx.clone(),
    );
    tracing::info!(
        grpc = ?grpc.local_addr().ok(),
        discovery = ?config.discovery,
        "controller serving"
    );
    // Updates are small and latency-bound: without TCP_NODELAY, Nagle's algorithm meets the
    // client's delayed ACKs and each update can wait ~40 ms.
    let incoming = TcpListenerStream::new(grpc).map(|conn| {
        conn.inspect(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    });
    let served = tonic::transport::Server::builder()
        // Finds proxies that vanished without closing their streams.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(trace::GrpcTraceLayer::new(tracer))
        .add_service(destination.into_server())
        .add_service(stats.into_server())
        .add_service(tap.into_server())
        .add_optional_service(identity_service)
        .add_service(inbound_policies.into_server())
        .add_service(outbound_policies.into_server())
        .add_service(workload.into_server())
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()))
        .await;
    // Whatever ended the gRPC server ends the rest too.
    let _ = stop_tx.send(true);
    let admin_result = admin_server.await;
    let _ = backend.await;
    served?;
    match admin_result {
        Ok(result) => result.map_err(Error::Admin),
        Err(join) => Err(Error::Admin(std::io::Error::other(join))),
    }
}

/// Keeps the file backend's identity tokens equal to what its ServiceAccounts declare, until
/// `shutdown` turns true.
async fn refresh_static_tokens(
    mut inputs: watch::Receiver<std::sync::Arc<policy::PolicyInputs>>,
    tokens: std::sync::Arc<identity::StaticTokens>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let current = inputs.borrow_and_update().clone();
        let service_accounts: Vec<_> = current.service_accounts().cloned().collect();
        tokens.set_service_accounts(&service_accounts);
        tracing::debug!(tokens = tokens.len(), "identity tokens refreshed");
        tokio::select! {
            changed = inputs.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
