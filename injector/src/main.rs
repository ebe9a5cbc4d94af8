//! `mesh-injector`: the mutating admission webhook that injects the sidecar. Flags in (each
//! also from its `MESH_INJECTOR_*` variable), [`mesh_injector::webhook`] out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mesh_injector::metrics::Metrics;
use mesh_injector::webhook::{self, KubeNamespaces, Webhook};
use mesh_injector::{InboundPolicy, MeshConfig};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Whether injected proxies are native sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NativeSidecars {
    /// When the API server is Kubernetes 1.29 or newer.
    Auto,
    /// Always (the cluster is known to support them).
    Enabled,
    /// Never: the proxy is a classic sidecar.
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

/// The mesh's mutating admission webhook: injects the sidecar into pods of meshed namespaces.
#[derive(Debug, Parser)]
#[command(name = "mesh-injector", version, about)]
struct Args {
    /// The HTTPS address serving AdmissionReviews at /inject (and /ready, /live, /metrics).
    #[arg(long, env = "MESH_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// A plain-HTTP address for /ready, /live and /metrics; empty to serve them only over
    /// HTTPS.
    #[arg(
        long,
        env = "MESH_INJECTOR_ADMIN_LISTEN",
        default_value = "0.0.0.0:9995"
    )]
    admin_listen: Option<String>,
    /// The serving certificate chain (PEM); its CA is the webhook configuration's caBundle.
    /// Re-read when it changes.
    #[arg(long, env = "MESH_INJECTOR_TLS_CERT")]
    tls_cert: PathBuf,
    /// The serving certificate's private key (PEM).
    #[arg(long, env = "MESH_INJECTOR_TLS_KEY")]
    tls_key: PathBuf,
    /// A kubeconfig; default: the in-cluster config or $KUBECONFIG.
    #[arg(long, env = "MESH_INJECTOR_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// The controller's gRPC URL given to proxies.
    #[arg(long, env = "MESH_INJECTOR_CONTROLLER_ADDR", default_value = mesh_injector::config::DEFAULT_CONTROLLER_ADDR)]
    controller_addr: String,
    /// The Identity service's URL given to proxies; default: the controller's.
    #[arg(long, env = "MESH_INJECTOR_IDENTITY_ADDR")]
    identity_addr: Option<String>,
    /// The trust domain of SPIFFE identities.
    #[arg(
        long,
        env = "MESH_INJECTOR_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// The trust anchors (PEM) given to proxies. Without it, proxies run without identity.
    #[arg(long, env = "MESH_INJECTOR_TRUST_ANCHORS_FILE")]
    trust_anchors_file: Option<PathBuf>,
    /// The proxy image (also runs mesh-init); default: ghcr.io/mesh/proxy:<version>.
    #[arg(long, env = "MESH_INJECTOR_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// The uid the proxy runs as.
    #[arg(long, env = "MESH_INJECTOR_PROXY_UID", default_value_t = 2102)]
    proxy_uid: i64,
    /// The proxy's inbound port.
    #[arg(long, env = "MESH_INJECTOR_PROXY_INBOUND_PORT", default_value_t = 4143)]
    proxy_inbound_port: u16,
    /// The proxy's outbound port.
    #[arg(
        long,
        env = "MESH_INJECTOR_PROXY_OUTBOUND_PORT",
        default_value_t = 4140
    )]
    proxy_outbound_port: u16,
    /// The proxy's admin port.
    #[arg(long, env = "MESH_INJECTOR_PROXY_ADMIN_PORT", default_value_t = 4191)]
    proxy_admin_port: u16,
    /// The inbound policy of ports no Server selects: all-unauthenticated, all-authenticated,
    /// cluster-authenticated, deny or audit.
    #[arg(
        long,
        env = "MESH_INJECTOR_DEFAULT_INBOUND_POLICY",
        default_value = "all-unauthenticated"
    )]
    default_inbound_policy: InboundPolicy,
    /// The proxies' log filter.
    #[arg(long, env = "MESH_INJECTOR_PROXY_LOG_LEVEL", default_value = "info")]
    proxy_log_level: String,
    /// The proxy's CPU request (empty for none).
    #[arg(long, env = "MESH_INJECTOR_PROXY_CPU_REQUEST", default_value = "100m")]
    proxy_cpu_request: String,
    /// The proxy's CPU limit (empty for none).
    #[arg(long, env = "MESH_INJECTOR_PROXY_CPU_LIMIT", default_value = "")]
    proxy_cpu_limit: String,
    /// The proxy's memory request (empty for none).
    #[arg(
        long,
        env = "MESH_INJECTOR_PROXY_MEMORY_REQUEST",
        default_value = "20Mi"
    )]
    proxy_memory_request: String,
    /// The proxy's memory limit (empty for none).
    #[arg(long, env = "MESH_INJECTOR_PROXY_MEMORY_LIMIT", default_value = "")]
    proxy_memory_limit: String,
    /// Whether the proxy is a native sidecar (an init container with restartPolicy Always).
    #[arg(
        long,
        env = "MESH_INJECTOR_NATIVE_SIDECARS",
        value_enum,
        default_value = "auto"
    )]
    native_sidecars: NativeSidecars,

    /// The injector's own log filter.
    #[arg(long, env = "MESH_INJECTOR_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// The injector's log format.
    #[arg(
        long,
        env = "MESH_INJECTOR_LOG_FORMAT",
        value_enum,
        default_value = "plain"
    )]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?}", args.log_level))?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Plain => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let tls = webhook::tls_config_from_files(&args.tls_cert, &args.tls_key)
        .context("the serving certificate")?;
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let native_sidecars = match args.native_sidecars {
        NativeSidecars::Enabled => true,
        NativeSidecars::Disabled => false,
        NativeSidecars::Auto => server_has_native_sidecars(&client).await,
    };
    let config = mesh_config(&args, native_sidecars)?;
    tracing::info!(
        native_sidecars,
        identity = !config.trust_anchors_pem.is_empty(),
        image = %config.proxy_image,
        "injector configured"
    );
    if config.trust_anchors_pem.is_empty() {
        tracing::warn!("no --trust-anchors-file: injected proxies run without identity (no mTLS)");
    }

    let metrics = Metrics::new();
    let webhook = Webhook::new(config, KubeNamespaces::new(client), metrics.clone());
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    tracing::info!(addr = %args.listen, "serving AdmissionReviews at /inject");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait_stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let admin = match args.admin_listen.as_deref().filter(|addr| !addr.is_empty()) {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --admin-listen {addr}"))?;
            let router = webhook::admin_router(metrics);
            let shutdown = wait_stop(stopped.clone());
            Some(tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }))
        }
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    webhook::serve_tls(
        listener,
        Arc::new(tls),
        webhook::router(webhook),
        wait_stop(stopped),
    )
    .await
    .context("serving the webhook")?;
    if let Some(admin) = admin {
        admin
            .await
            .context("the admin server task")?
            .context("serving the admin routes")?;
    }
    Ok(())
}

fn mesh_config(args: &Args, native_sidecars: bool) -> anyhow::Result<MeshConfig> {
    let defaults = MeshConfig::default();
    let trust_anchors_pem = match &args.trust_anchors_file {
        None => String::new(),
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("--trust-anchors-file {}", path.display()))?,
    };
    let optional = |text: &str| Some(text.trim().to_owned()).filter(|text| !text.is_empty());
    let config = MeshConfig {
        controller_addr: args.controller_addr.clone(),
        identity_addr: args
            .identity_addr
            .clone()
            .unwrap_or_else(|| args.controller_addr.clone()),
        trust_domain: args.trust_domain.clone(),
        trust_anchors_pem,
        proxy_image: args.proxy_image.clone().unwrap_or(defaults.proxy_image),
        proxy_uid: args.proxy_uid,
        inbound_port: args.proxy_inbound_port,
        outbound_port: args.proxy_outbound_port,
        admin_port: args.proxy_admin_port,
        default_inbound_policy: args.default_inbound_policy,
        proxy_log_level: args.proxy_log_level.clone(),
        proxy_cpu_request: optional(&args.proxy_cpu_request),
        proxy_cpu_limit: optional(&args.proxy_cpu_limit),
        proxy_memory_request: optional(&args.proxy_memory_request),
        proxy_memory_limit: optional(&args.proxy_memory_limit),
        native_sidecars,
        version: defaults.version,
    };
    config
        .validate()
        .map_err(|error| anyhow::anyhow!("--{error}"))?;
    Ok(config)
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig: neither in-cluster nor $KUBECONFIG")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Whether the API server runs native sidecars (1.29+). When its version cannot be read the
/// answer is no: a classic sidecar works everywhere.
async fn server_has_native_sidecars(client: &kube::Client) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(info)) => {
            let number = |text: &str| {
                text.trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse::<u32>()
                    .ok()
            };
            let native = matches!(
                (number(&info.major), number(&info.minor)),
                (Some(major), Some(minor)) if major > 1 || (major == 1 && minor >= 29)
            );
            tracing::info!(version = %info.git_version, native, "API server version");
            native
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the API server version; using classic sidecars");
            false
        }
        Err(_elapsed) => {
            tracing::warn!("the API server version took over 5 s; using classic sidecars");
            false
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
