//! `mesh-proxy`: runs the sidecar proxy, configured from `MESH_PROXY_*` environment variables;
//! with `init`, installs the pod's iptables capture rules; with `await`, waits until the
//! pod's proxy is ready.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_proxy::app;
use mesh_proxy::capture::{self, InitArgs};
use mesh_proxy::config::{Config, LogFormat};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    /// Wait until this pod's proxy is ready: the postStart hook that holds the application's
    /// containers until then.
    Await(AwaitArgs),
}

#[derive(Debug, clap::Args)]
struct AwaitArgs {
    /// The proxy's admin port, on 127.0.0.1.
    #[arg(long, default_value_t = mesh_proxy::config::DEFAULT_ADMIN_PORT)]
    admin_port: u16,
    /// How long to wait (`500ms`, `2m`).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    timeout: std::time::Duration,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    mesh_proxy::config::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration like 500ms, 10s or 2m"))
}

/// jemalloc rather than glibc's malloc: a proxied request makes some thirty small allocations
/// on each side, and glibc's (with its consolidation of freed chunks) took 11% of the proxy's
/// CPU under load. `RUSTFLAGS="--cfg mesh_sysalloc"` builds without it, for heap profilers
/// that intercept malloc (heaptrack).
#[cfg_attr(not(mesh_sysalloc), global_allocator)]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Command::Init(init)) => {
            init_logging("info", LogFormat::Plain)?;
            return capture::run_init(&init).context("mesh-proxy init");
        }
        Some(Command::Await(wait)) => {
            mesh_proxy::ready::wait(wait.admin_port, wait.timeout)?;
            return Ok(());
        }
        None => {}
    }
    let config = Config::from_env().context("invalid proxy configuration")?;
    init_logging(&config.log_level, config.log_format)?;
    // The main thread is the first worker; `app::start` starts the others (see `workers`), each
    // with a runtime of its own like this one.
    let runtime = tokio::runtime::Builder::new_current_thread()
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
    // `Targets` (a level, or `target=level` pairs) rather than `EnvFilter`, whose span and
    // field directives bring two regex engines into the binary for a setting read once.
    let filter: Targets = level
        .parse()
        .with_context(|| format!("MESH_PROXY_LOG_LEVEL={level:?} is not a log filter"))?;
    // Logs go to stderr: stdout carries the access log.
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(logs.json()).try_init(),
        LogFormat::Plain => registry.with(logs).try_init(),
    }
    .context("installing the logger")?;
    Ok(())
}
