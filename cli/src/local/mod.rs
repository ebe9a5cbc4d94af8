//! `meshctl local`: runs ordinary Kubernetes YAML on this machine as local pods, with the
//! real controller and proxies.
//!
//! - [`manifest`] reads the YAML; [`plan`] turns it into pods, addresses and files (pure);
//! - [`supervisor`] carries the plan out in the background and keeps it running, using
//!   [`netns`] (root mode's namespaces), [`forward`] (loopback forwards and probes) and
//!   [`process`] (pids, process groups, programs);
//! - [`binary`] is root mode's copy of `mesh-proxy`, reachable by the proxies' uid;
//! - [`state`] is `state.json`, read by every other command;
//! - [`up`], [`down`] and [`status`] are the commands people run.

mod binary;
mod down;
mod forward;
mod manifest;
mod netns;
mod plan;
mod process;
mod state;
mod status;
mod supervisor;
mod up;

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

/// `meshctl local ...`.
#[derive(Debug, Args)]
pub struct LocalArgs {
    #[command(subcommand)]
    command: LocalCommand,
}

/// Where the local mesh keeps its state (default: /run/mesh-local as root, else
/// $XDG_RUNTIME_DIR/mesh-local).
#[derive(Debug, Clone, Args)]
struct StateDirArg {
    /// The local mesh's state folder.
    #[arg(long, env = state::STATE_DIR_ENV, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl StateDirArg {
    fn resolve(&self) -> PathBuf {
        let dir = self
            .state_dir
            .clone()
            .unwrap_or_else(state::default_state_dir);
        // Absolute, so the marker every process carries names one folder however it was given.
        std::path::absolute(&dir).unwrap_or(dir)
    }
}

#[derive(Debug, Subcommand)]
enum LocalCommand {
    /// Run Kubernetes YAML (Namespaces, ServiceAccounts, Services, Deployments, Pods, mesh
    /// policies) here: each pod a network namespace with the mesh injected (or, without root,
    /// loopback addresses), the controller over the same objects. Returns once every pod is
    /// ready; a supervisor keeps them running until `meshctl local down`.
    Up(UpArgs),
    /// Show the local mesh's pods.
    Status {
        #[command(flatten)]
        state_dir: StateDirArg,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Print a container's log (the namespace comes from the global -n, default `default`).
    Logs {
        /// The pod: its name, or `deploy/NAME` for the first pod of a Deployment.
        pod: String,
        /// The container (default: the pod's only application container).
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[command(flatten)]
        state_dir: StateDirArg,
    },
    /// Stop every process of the local mesh and remove its namespaces, files and state.
    /// Safe to run twice, and when the supervisor died.
    Down {
        #[command(flatten)]
        state_dir: StateDirArg,
    },
    /// Run the supervisor in the foreground (`up` starts it in the background).
    #[command(hide = true)]
    Supervise {
        #[command(flatten)]
        state_dir: StateDirArg,
    },
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

/// Which isolation `up` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Root mode when running as root with `ip` and `iptables`, else loopback mode.
    Auto,
    /// Network namespaces and iptables capture (needs root).
    Root,
    /// Loopback addresses, apps use the outbound proxy as HTTP_PROXY (no root needed).
    Loopback,
}

/// `meshctl local up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// YAML files or folders of them (repeatable).
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR"
    )]
    files: Vec<PathBuf>,
    #[command(flatten)]
    state_dir: StateDirArg,
    /// Isolation of the pods.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    mode: ModeArg,
    /// Names this local mesh: its router namespace, and its pods' namespaces `<instance>-<ns>-<pod>`
    /// (`ml-<ns>-<pod>` for the default). Two meshes up at once need two names.
    #[arg(long, default_value = plan::DEFAULT_INSTANCE)]
    instance: String,
    /// How long to wait for every pod to be ready, e.g. `90s` or `2m`.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    timeout: std::time::Duration,
    /// Root mode: the loopback port forwarded to the controller's gRPC (0: any free port).
    #[arg(long, default_value_t = 8086)]
    controller_port: u16,
    /// Root mode: the loopback port forwarded to the controller's admin server (0: any).
    #[arg(long, default_value_t = 9990)]
    controller_admin_port: u16,
    /// Inject the mesh into every pod, as if every namespace were annotated
    /// `mesh.dev/inject: enabled`.
    #[arg(long)]
    inject_all: bool,
    /// The mesh-proxy binary (default: next to meshctl, then on PATH).
    #[arg(long, env = "MESHCTL_PROXY_BIN", value_name = "PATH")]
    proxy_bin: Option<PathBuf>,
    /// The mesh-controller binary (default: next to meshctl, then on PATH).
    #[arg(long, env = "MESHCTL_CONTROLLER_BIN", value_name = "PATH")]
    controller_bin: Option<PathBuf>,
    /// When `up` fails, leave what started running for inspection instead of removing it.
    #[arg(long)]
    keep_on_failure: bool,
    /// Run without identity: no CA, no certificates, plaintext between the proxies.
    #[arg(long)]
    no_identity: bool,
}

/// Parses `500ms`, `90s`, `2m`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s or 2m"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(number)),
        "s" | "" => Ok(std::time::Duration::from_secs(number)),
        "m" => Ok(std::time::Duration::from_secs(number * 60)),
        _ => Err(format!("{text:?}: unknown unit {unit:?} (ms, s or m)")),
    }
}

/// This machine's local mesh as `meshctl local status -o json` prints it, run as a child (so
/// the state folder's default and format stay the local runtime's business); `Err` holds the
/// reason it gave when no mesh runs there (the first line of its error).
pub fn status_json(
    state_dir: Option<&std::path::Path>,
) -> anyhow::Result<Result<serde_json::Value, String>> {
    use anyhow::Context as _;
    let exe = std::env::current_exe().context("finding meshctl's own path")?;
    let mut command = std::process::Command::new(exe);
    command.args(["local", "status", "-o", "json"]);
    if let Some(dir) = state_dir {
        command.arg("--state-dir").arg(dir);
    }
    let output = command
        .output()
        .context("running `meshctl local status` to find the local mesh")?;
    if !output.status.success() {
        // The first line is the reason; a backtrace may follow.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr.lines().next().unwrap_or_default();
        return Ok(Err(reason
            .strip_prefix("Error: ")
            .unwrap_or(reason)
            .to_owned()));
    }
    serde_json::from_slice(&output.stdout)
        .map(Ok)
        .context("reading `meshctl local status -o json`")
}

/// The address this machine reaches a local pod's proxy admin server at (`meshctl identity
/// --local`); `pod` as for `meshctl local logs`.
pub fn proxy_admin_addr(
    state_dir: Option<&std::path::Path>,
    namespace: &str,
    pod: &str,
) -> anyhow::Result<std::net::SocketAddr> {
    let state_dir = StateDirArg {
        state_dir: state_dir.map(std::path::Path::to_path_buf),
    }
    .resolve();
    let state = state::read_state(&state_dir)?;
    let found = status::find_pod(&state, namespace, pod)?;
    if !found.meshed {
        anyhow::bail!(
            "pod {namespace}/{} of the local mesh is not meshed: it has no proxy",
            found.name
        );
    }
    found
        .proxy_admin
        .and_then(|admin| admin.from_host)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "pod {namespace}/{}'s proxy admin server is not reachable from this machine yet; \
                 wait until `meshctl local status` shows the pod ready",
                found.name
            )
        })
}

/// Runs `meshctl local ...`; `namespace` is the global `-n`.
pub fn run(args: LocalArgs, namespace: Option<&str>) -> anyhow::Result<()> {
    match args.command {
        LocalCommand::Up(up) => up::run(up),
        LocalCommand::Status { state_dir, output } => {
            status::status(&state_dir.resolve(), output == OutputFormat::Json)
        }
        LocalCommand::Logs {
            pod,
            container,
            state_dir,
        } => status::logs(
            &state_dir.resolve(),
            namespace.unwrap_or("default"),
            &pod,
            container.as_deref(),
        ),
        LocalCommand::Down { state_dir } => down::run(&state_dir.resolve()),
        LocalCommand::Supervise { state_dir } => supervisor::run(&state_dir.resolve()),
    }
}
