//! `mesh-proxy`: runs the sidecar proxy, configured from `MESH_PROXY_*` environment variables,
//! or with `init`, installs the pod's iptables capture rules.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_proxy::app;
use mesh_proxy::capture::{self, InitArgs};
use mesh_proxy::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// The mesh's sidecar proxy. With no subcommand it runs the proxy, configured from
/// `MESH_PROXY_*` environment variables (see ARCHITECTURE.md).
#[derive(Debug, Parser)]
#[command(name = "mesh-proxy", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install (or with --remove, remove) the iptables rules that send the pod's TCP through
    /// the proxy. Run once per pod, as root with NET_ADMIN, before the application starts.
    Init(InitArgs),
}

/// jemalloc rather than glibc's malloc: a proxied request makes some thirty small allocations
/// on each side, and glibc's (with its consolidation of freed chunks) took 11% of the proxy's
/// CPU under load.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Init(init)) = args.command {
        init_logging("info", LogFormat::Plain)?;
        return capture::run_init(&init).context("mesh-proxy init");
    }
    let config = Config::from_env().context("invalid proxy configuration")?;
    init_logging(&config.log_level, config.log_format)?;
    // Two worker threads: a sidecar shares its pod's CPU and must stay small.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listeners = app::Listeners::bind(&config).await?;
    let running = app::start(config, listeners)?;
    let drain = running.drain.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        drain.cancel();
    });
    running.task.await.context("proxy task failed")?;
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level)
        .with_context(|| format!("MESH_PROXY_LOG_LEVEL={level:?} is not a log filter"))?;
    // Logs go to stderr: stdout carries the access log.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.init(),
    }
    Ok(())
}
