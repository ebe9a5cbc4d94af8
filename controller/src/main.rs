//! `mesh-controller`: the mesh's control plane. Flags in, [`mesh_controller::run`] out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use mesh_controller::policy::egress::{EgressSettings, TrafficPolicy};
use mesh_controller::policy::inbound::DefaultPolicy;
use mesh_controller::{Config, Discovery, IdentityOptions};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// Watch a Kubernetes API server.
    Kubernetes,
    /// Read a folder of Kubernetes-style YAML.
    File,
}

/// The mesh's control plane: discovery (Destination API) over gRPC, plus an admin port.
#[derive(Debug, Parser)]
#[command(name = "mesh-controller", version, about)]
struct Args {
    /// Something else than running the controller.
    #[command(subcommand)]
    command: Option<Command>,
    /// Where discovery reads the cluster from.
    #[arg(
        long,
        env = "MESH_CONTROLLER_DISCOVERY",
        value_enum,
        default_value = "kubernetes"
    )]
    discovery: Backend,
    /// The folder of YAML for `--discovery file` (read recursively, watched for changes).
    #[arg(
        long,
        env = "MESH_CONTROLLER_CONFIG_DIR",
        required_if_eq("discovery", "file")
    )]
    config_dir: Option<PathBuf>,
    /// How often the file backend looks for changes, in milliseconds, besides rescanning on
    /// each filesystem event (the poll catches what events miss, e.g. on network shares).
    #[arg(long, env = "MESH_CONTROLLER_POLL_INTERVAL_MS", default_value_t = 250)]
    poll_interval_ms: u64,
    /// The gRPC address (Destination API).
    #[arg(
        long,
        env = "MESH_CONTROLLER_GRPC_LISTEN",
        default_value = "0.0.0.0:8086"
    )]
    grpc_listen: SocketAddr,
    /// The admin address (/metrics, /ready, /live).
    #[arg(
        long,
        env = "MESH_CONTROLLER_ADMIN_LISTEN",
        default_value = "0.0.0.0:9990"
    )]
    admin_listen: SocketAddr,
    /// A kubeconfig for `--discovery kubernetes`; default: in-cluster config or $KUBECONFIG.
    #[arg(long, env = "MESH_CONTROLLER_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The trust domain of SPIFFE identities.
    #[arg(
        long,
        env = "MESH_CONTROLLER_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// The cluster's DNS domain (`name.ns.svc.<domain>`).
    #[arg(
        long,
        env = "MESH_CONTROLLER_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    cluster_domain: String,
    /// The identity CA's folder in cert-manager's layout (`tls.crt`, `tls.key`, `ca.crt`).
    /// Without it the Identity service is not served and proxies run without mTLS.
    #[arg(long, env = "MESH_CONTROLLER_IDENTITY_DIR")]
    identity_dir: Option<PathBuf>,
    /// How long issued leaf certificates are valid (`24h`, `90m`).
    #[arg(
        long,
        env = "MESH_CONTROLLER_IDENTITY_LEAF_LIFETIME",
        default_value = "24h",
        value_parser = parse_duration
    )]
    identity_leaf_lifetime: Duration,
    /// How often the identity folder is checked for a rotated issuer (`10s`).
    #[arg(
        long,
        env = "MESH_CONTROLLER_IDENTITY_RELOAD_INTERVAL",
        default_value = "10s",
        value_parser = parse_duration
    )]
    identity_reload_interval: Duration,
    /// The inbound policy of ports no Server covers, unless the pod or its namespace names
    /// one: all-unauthenticated, all-authenticated, cluster-authenticated, deny or audit.
    #[arg(
        long,
        env = "MESH_CONTROLLER_DEFAULT_INBOUND_POLICY",
        default_value = "all-unauthenticated"
    )]
    default_inbound_policy: DefaultPolicy,
    /// The namespace whose EgressNetworks apply to clients of every namespace (the control
    /// plane's).
    #[arg(
        long,
        env = "MESH_CONTROLLER_EGRESS_NAMESPACE",
        default_value = "mesh-system"
    )]
    egress_namespace: String,
    /// What happens to traffic leaving the mesh that no EgressNetwork covers: allow or deny.
    #[arg(
        long,
        env = "MESH_CONTROLLER_DEFAULT_EGRESS_POLICY",
        default_value = "allow"
    )]
    default_egress_policy: TrafficPolicy,
    /// Mirror the Services that clusters linked by Secrets in this namespace (the control
    /// plane's) export (`meshctl multicluster link`); off without it.
    #[arg(long, env = "MESH_CONTROLLER_MULTICLUSTER_NAMESPACE")]
    multicluster_namespace: Option<String>,
    /// This replica's name (its pod's, from the downward API): with --lease-namespace, the
    /// replicas elect one route status writer with a Lease.
    #[arg(long, env = "MESH_CONTROLLER_POD_NAME")]
    pod_name: Option<String>,
    /// Where the status writer's Lease lives (the control plane's namespace).
    #[arg(long, env = "MESH_CONTROLLER_POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// An OpenTelemetry collector (OTLP/gRPC, `http://host:4317`) for spans of the gRPC
    /// handlers; none without it.
    #[arg(long, env = "MESH_CONTROLLER_TRACE_COLLECTOR")]
    trace_collector: Option<String>,
    /// The share of new traces recorded (0 to 1); a caller's sampled trace is always joined.
    #[arg(
        long,
        env = "MESH_CONTROLLER_TRACE_SAMPLE_RATE",
        default_value_t = 0.01,
        value_parser = parse_sample_rate
    )]
    trace_sample_rate: f64,
    /// Log filter: a level (`info`, `debug`) or tracing directives (`mesh_controller=debug`).
    #[arg(long, env = "MESH_CONTROLLER_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CRDs the controller reads (policy.mesh.dev and the Gateway API routes) as
    /// one YAML stream, for `kubectl apply -f -`.
    Crds,
    /// Write a new trust anchor (a year) and issuer (90 days) to DIR in cert-manager's layout
    /// (tls.crt, tls.key, ca.crt), for --identity-dir outside a cluster (`meshctl install`
    /// makes them for a cluster).
    GenerateCa {
        /// The folder (created).
        dir: PathBuf,
        /// The trust domain of the identities it will issue.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

/// jemalloc rather than glibc's malloc: the index churns many small objects across the
/// runtime's threads, and glibc's per-thread arenas kept the freed memory (the scale
/// benchmark's RSS grew by a sixth with every minute of endpoint churn).
/// `RUSTFLAGS="--cfg mesh_sysalloc"` builds without it, for heap profilers (heaptrack).
#[cfg_attr(not(mesh_sysalloc), global_allocator)]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.command {
        Some(Command::Crds) => {
            print!(
                "{}",
                mesh_controller::policy::crds::crd_stream().context("generating the CRDs")?
            );
            return Ok(());
        }
        Some(Command::GenerateCa { dir, trust_domain }) => {
            const DAY: Duration = Duration::from_secs(24 * 3600);
            mesh_controller::identity::GeneratedCa::generate(trust_domain, 365 * DAY, 90 * DAY)
                .context("generating the trust anchor and issuer")?
                .write_dir(dir)
                .with_context(|| format!("writing them to {}", dir.display()))?;
            println!("wrote {}/{{tls.crt,tls.key,ca.crt}}", dir.display());
            return Ok(());
        }
        None => {}
    }
    let filter = EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("invalid --log-level {:?}", args.log_level))?;
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let discovery = match args.discovery {
        Backend::File => Discovery::File {
            dir: args
                .config_dir
                .clone()
                .context("--discovery file needs --config-dir")?,
            poll_interval: Duration::from_millis(args.poll_interval_ms.max(10)),
        },
        Backend::Kubernetes => Discovery::Kubernetes {
            kubeconfig: args.kubeconfig.clone(),
        },
    };
    let config = Config {
        trust_domain: args.trust_domain.clone(),
        cluster_domain: args.cluster_domain.clone(),
        identity: args.identity_dir.clone().map(|dir| IdentityOptions {
            leaf_lifetime: args.identity_leaf_lifetime,
            reload_interval: args.identity_reload_interval,
            ..IdentityOptions::new(dir)
        }),
        default_inbound_policy: args.default_inbound_policy,
        egress: EgressSettings {
            global_namespace: args.egress_namespace.clone(),
            default_policy: args.default_egress_policy,
        },
        trace: args
            .trace_collector
            .clone()
            .map(|collector| mesh_controller::trace::TraceOptions {
                collector,
                sample_rate: args.trace_sample_rate,
            }),
        multicluster: args.multicluster_namespace.clone().map(|namespace| {
            mesh_controller::multicluster::MulticlusterSettings::new(
                namespace,
                args.trust_domain.clone(),
            )
        }),
        status_lease: match (&args.lease_namespace, &args.pod_name) {
            (Some(namespace), Some(identity)) => Some(mesh_controller::lease::Election {
                namespace: namespace.clone(),
                name: mesh_controller::lease::STATUS_WRITER_LEASE.to_owned(),
                identity: identity.clone(),
            }),
            _ => None,
        },
        ..Config::new(discovery)
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
            .await
            .with_context(|| format!("binding --grpc-listen {}", args.grpc_listen))?;
        let admin = tokio::net::TcpListener::bind(args.admin_listen)
            .await
            .with_context(|| format!("binding --admin-listen {}", args.admin_listen))?;
        mesh_controller::run(config, grpc, admin, shutdown_signal())
            .await
            .context("controller failed")
    })
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    mesh_controller::policy::duration::parse(text).map_err(|e| e.to_string())
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

fn parse_sample_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("{text:?} is not a number from 0 to 1")),
    }
}
