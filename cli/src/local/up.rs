//! `meshctl local up`: checks everything that can be checked before starting (YAML, plan,
//! binaries, mode, ports), writes the plan, starts the supervisor in the background and waits
//! until every pod is ready, or fails with the logs of the pod at fault.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::manifest::Manifests;
use mesh_controller::identity::GeneratedCa;

use super::plan::{self, IdentityInput, Mode, Plan, PlanOptions};
use super::process::{self, INSTANCE_ENV};
use super::state::{self, ContainerStatus, PodPhase, State};
use super::{ModeArg, UpArgs, binary, down, status};

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let state_dir = args.state_dir.resolve();
    check_instance_name(&args.instance)?;
    let mode = choose_mode(args.mode)?;
    eprintln!("meshctl local: {} mode: {}", mode.name(), mode.describe());

    refuse_or_clean_previous(&state_dir)?;
    let manifests = Manifests::read(&args.files)?;
    for ignored in &manifests.ignored {
        eprintln!("meshctl local: ignoring {ignored}: not a kind local pods run");
    }
    let built_proxy = find_binary("mesh-proxy", args.proxy_bin.as_deref())?;
    // Root mode's proxies run as their own uid: they run a copy they can reach.
    let proxy_program = match mode {
        Mode::Root => binary::proxy_copy_path(&state_dir),
        Mode::Loopback => built_proxy.clone(),
    };
    let options = PlanOptions {
        mode,
        instance: args.instance.clone(),
        state_dir: state_dir.clone(),
        proxy_program,
        controller_program: find_binary("mesh-controller", args.controller_bin.as_deref())?,
        controller_port: args.controller_port,
        controller_admin_port: args.controller_admin_port,
        inject_all: args.inject_all,
        identity: None,
    };
    let (options, ca) = if args.no_identity {
        (options, None)
    } else {
        let (identity, ca) = new_identity(&state_dir)?;
        (
            PlanOptions {
                identity: Some(identity),
                ..options
            },
            Some(ca),
        )
    };
    let plan = plan::plan(&manifests, &options)?;
    if plan.pods.is_empty() {
        eprintln!("meshctl local: the manifests define no pods (Deployments or Pods)");
    }
    if mode == Mode::Root
        && let Some(router) = &plan.network.router_netns
        && super::netns::exists(router)
    {
        bail!(
            "network namespace {router} already exists: another local mesh named {router} is up \
             (stop it with `meshctl local down --state-dir DIR`, or pick another --instance)"
        );
    }
    check_ports(&plan)?;
    if mode == Mode::Loopback {
        warn_shared_ports(&plan);
    }

    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating the state folder {}", state_dir.display()))?;
    if let (Some(ca), Some(identity)) = (&ca, &options.identity) {
        ca.write_dir(&identity.dir)
            .with_context(|| format!("writing the identity CA into {}", identity.dir.display()))?;
    }
    state::write_json(&state::plan_file(&state_dir), &plan)
        .with_context(|| format!("writing the plan into {}", state_dir.display()))?;
    // After the plan: a failure's cleanup (`down`) knows the folder for a local mesh's.
    if mode == Mode::Root
        && let Err(error) = install_proxy_copy(&built_proxy, &options.proxy_program, &plan)
    {
        if let Err(cleanup) = down::run_quiet(&state_dir) {
            eprintln!("meshctl local: cleaning up after the failure: {cleanup:#}");
        }
        return Err(error);
    }
    let mut supervisor = start_supervisor(&state_dir)?;

    match wait_ready(&state_dir, &mut supervisor, args.timeout) {
        Ok(state) => {
            status::print_summary(&state);
            Ok(())
        }
        Err(failure) => {
            eprintln!("{}", failure.logs);
            if args.keep_on_failure {
                eprintln!(
                    "meshctl local: left running for inspection; `meshctl local down --state-dir {}` removes it",
                    state_dir.display()
                );
            } else if let Err(error) = down::run_quiet(&state_dir) {
                eprintln!("meshctl local: cleaning up after the failure: {error:#}");
            }
            Err(anyhow::anyhow!(failure.summary))
        }
    }
}

/// A fresh CA for this local mesh (the controller's own generator) and the secret the
/// ServiceAccount tokens are derived from.
fn new_identity(state_dir: &Path) -> anyhow::Result<(IdentityInput, GeneratedCa)> {
    use rand::Rng as _;
    let ca = GeneratedCa::generate(
        "cluster.local",
        Duration::from_secs(365 * 24 * 3600),
        Duration::from_secs(30 * 24 * 3600),
    )
    .context("generating the local mesh's identity CA")?;
    let mut token_secret = [0u8; 32];
    rand::rng().fill(&mut token_secret);
    let identity = IdentityInput {
        dir: state_dir.join("identity"),
        trust_anchors_pem: ca.trust_anchor.cert_pem.clone(),
        token_secret,
    };
    Ok((identity, ca))
}

/// Copies the proxy binary to `copy` and checks that every uid the plan runs a proxy as can
/// reach it, naming the folder in the way when one cannot.
fn install_proxy_copy(built: &Path, copy: &Path, plan: &Plan) -> anyhow::Result<()> {
    binary::install_copy(built, copy).with_context(|| {
        format!(
            "copying {} to {} for the proxies",
            built.display(),
            copy.display()
        )
    })?;
    let mut uids: Vec<u32> = plan
        .pods
        .iter()
        .flat_map(|pod| pod.init_containers.iter().chain(&pod.containers))
        .filter(|container| container.role == plan::Role::Proxy)
        .filter_map(|container| container.run_as_user)
        .collect();
    uids.sort_unstable();
    uids.dedup();
    for uid in uids {
        // The supervisor starts the proxy with gid = uid and no other groups.
        if let Some((folder, mode)) =
            binary::first_closed_folder(copy, uid, uid, binary::Access::of)
        {
            bail!(
                "the proxies run as uid {uid}, which cannot enter {} (mode {mode:04o}) on the way \
                 to their binary {}: pick a state folder outside it (--state-dir; the default is \
                 /run/mesh-local) or let others through (chmod o+x {})",
                folder.display(),
                copy.display(),
                folder.display()
            );
        }
    }
    Ok(())
}

/// Instance names become namespace and file names: keep them to DNS labels.
fn check_instance_name(instance: &str) -> anyhow::Result<()> {
    let valid = !instance.is_empty()
        && instance.len() <= 32
        && instance
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !instance.starts_with('-');
    if !valid {
        bail!("--instance {instance:?}: use up to 32 lower-case letters, digits and dashes");
    }
    Ok(())
}

/// Root mode needs root, `ip` and `iptables`; `auto` falls back to loopback and says why.
fn choose_mode(wanted: ModeArg) -> anyhow::Result<Mode> {
    let root = process::is_root();
    let missing: Vec<&str> = ["ip", "iptables"]
        .into_iter()
        .filter(|tool| {
            process::find_program(tool, None).is_none()
                && !Path::new("/usr/sbin").join(tool).exists()
                && !Path::new("/sbin").join(tool).exists()
        })
        .collect();
    match wanted {
        ModeArg::Loopback => Ok(Mode::Loopback),
        ModeArg::Root if !root => bail!(
            "root mode needs root (network namespaces, iptables): run as root, or use --mode loopback"
        ),
        ModeArg::Root if !missing.is_empty() => bail!(
            "root mode needs {} (apt-get install iproute2 iptables), or use --mode loopback",
            missing.join(" and ")
        ),
        ModeArg::Root => Ok(Mode::Root),
        ModeArg::Auto if root && missing.is_empty() => Ok(Mode::Root),
        ModeArg::Auto => {
            let why = if root {
                format!("{} not installed", missing.join(" and "))
            } else {
                "not running as root".to_owned()
            };
            eprintln!(
                "meshctl local: {why}: using loopback mode (no network namespaces, no iptables capture)"
            );
            Ok(Mode::Loopback)
        }
    }
}

/// A live local mesh in the same folder is an error; a dead one's leftovers are removed.
fn refuse_or_clean_previous(state_dir: &Path) -> anyhow::Result<()> {
    if !state::plan_file(state_dir).exists() && !state::state_file(state_dir).exists() {
        return Ok(());
    }
    if let Ok(state) = state::read_state(state_dir)
        && let Some(supervisor) = state.supervisor
        && supervisor.is_alive()
    {
        bail!(
            "a local mesh is already up in {} (supervisor pid {}); run `meshctl local down` first",
            state_dir.display(),
            supervisor.pid
        );
    }
    eprintln!(
        "meshctl local: removing the leftovers of a stopped local mesh in {}",
        state_dir.display()
    );
    down::run_quiet(state_dir)
}

/// The binary `name`: as given, else next to this meshctl, else on PATH.
fn find_binary(name: &str, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if !path.is_file() {
            bail!("{}: no such file ({name})", path.display());
        }
        return Ok(std::path::absolute(path).unwrap_or_else(|_| path.to_owned()));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.is_file());
    if let Some(path) = beside.or_else(|| process::find_program(name, None)) {
        return Ok(path);
    }
    bail!(
        "{name} not found next to meshctl or on PATH: build it (`cargo build --bins`) or pass --{}-bin",
        name.trim_start_matches("mesh-")
    )
}

/// Every address the mesh will listen on from this namespace must be free: the controller's
/// forwards (root mode), or each pod's proxy ports and the controller (loopback mode).
fn check_ports(plan: &Plan) -> anyhow::Result<()> {
    let mut wanted: Vec<(SocketAddr, String)> = Vec::new();
    match plan.mode {
        Mode::Root => {
            for (port, what, flag) in [
                (
                    plan.controller.grpc_forward_port,
                    "the controller's gRPC forward",
                    "--controller-port",
                ),
                (
                    plan.controller.admin_forward_port,
                    "the controller's admin forward",
                    "--controller-admin-port",
                ),
            ] {
                if let Some(port) = port.filter(|p| *p != 0) {
                    wanted.push((
                        SocketAddr::from(([127, 0, 0, 1], port)),
                        format!("{what}; choose another with {flag}"),
                    ));
                }
            }
        }
        Mode::Loopback => {
            wanted.push((plan.controller.grpc, "the controller's gRPC".to_owned()));
            wanted.push((
                plan.controller.admin,
                "the controller's admin server".to_owned(),
            ));
            for pod in plan.pods.iter().filter(|p| p.meshed) {
                for port in [
                    plan::PROXY_INBOUND_PORT,
                    plan::PROXY_OUTBOUND_PORT,
                    plan::PROXY_ADMIN_PORT,
                ] {
                    wanted.push((
                        SocketAddr::from((pod.ip, port)),
                        format!("pod {}'s proxy", pod.key()),
                    ));
                }
            }
        }
    }
    for (addr, what) in wanted {
        if let Err(error) = TcpListener::bind(addr) {
            bail!("port clash: {addr} ({what}) cannot be bound: {error}");
        }
    }
    Ok(())
}

/// Loopback pods share this machine's ports: two pods declaring the same container port both
/// bind it unless each binds its own pod IP. Said before they crash-loop on it.
fn warn_shared_ports(plan: &Plan) {
    let mut owners: std::collections::BTreeMap<i64, Vec<String>> = Default::default();
    for pod in &plan.pods {
        let ports = pod
            .object
            .pointer("/spec/containers")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|c| {
                c.get("ports")
                    .and_then(serde_json::Value::as_array)
                    .into_iter()
                    .flatten()
            })
            .filter_map(|p| p.get("containerPort").and_then(serde_json::Value::as_i64));
        for port in ports.collect::<std::collections::BTreeSet<_>>() {
            owners.entry(port).or_default().push(pod.key());
        }
    }
    for (port, pods) in owners.into_iter().filter(|(_, pods)| pods.len() > 1) {
        eprintln!(
            "meshctl local: warning: pods {} all declare port {port}; in loopback mode they share this machine's ports, so each must bind its own pod IP (env from fieldRef status.podIP), not 0.0.0.0",
            pods.join(", ")
        );
    }
}

/// Starts `meshctl local supervise` detached: its own process group, output to
/// `supervisor.log`, so it outlives this command and its terminal.
fn start_supervisor(state_dir: &Path) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("finding meshctl's own path")?;
    let log_path = state_dir.join("supervisor.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    Command::new(exe)
        .args(["local", "supervise", "--state-dir"])
        .arg(state_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env(INSTANCE_ENV, state_dir)
        .process_group(0)
        .spawn()
        .context("starting the supervisor")
}

/// Why `up` failed: one line, and the logs that explain it.
struct Failure {
    summary: String,
    logs: String,
}

/// Waits until the controller and every pod are ready (or finished), the supervisor died, a
/// container cannot start, or `timeout` passed.
fn wait_ready(
    state_dir: &Path,
    supervisor: &mut std::process::Child,
    timeout: Duration,
) -> Result<State, Failure> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<State> = None;
    loop {
        let current = state::read_state(state_dir).ok();
        if let Some(state) = &current {
            if let Some(fatal) = &state.fatal {
                return Err(Failure {
                    summary: format!("the local mesh could not start: {fatal}"),
                    logs: tail_file(&state_dir.join("supervisor.log")),
                });
            }
            if let Some(failure) = start_error(state) {
                return Err(failure);
            }
            let pods_done = state
                .pods
                .iter()
                .all(|pod| pod.ready || pod.phase == PodPhase::Succeeded);
            if state.controller.ready && pods_done {
                return Ok(state.clone());
            }
        }
        if let Ok(Some(exit)) = supervisor.try_wait() {
            return Err(Failure {
                summary: format!("the supervisor exited ({exit}) before every pod was ready"),
                logs: tail_file(&state_dir.join("supervisor.log")),
            });
        }
        if current.is_some() {
            last = current;
        }
        if Instant::now() >= deadline {
            return Err(timed_out(last.as_ref(), timeout));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A container that cannot start (no such command, no such folder) never will: fail now,
/// naming it.
fn start_error(state: &State) -> Option<Failure> {
    for pod in &state.pods {
        for container in &pod.containers {
            if let ContainerStatus::Waiting { reason, message } = &container.status
                && reason == "StartError"
            {
                return Some(Failure {
                    summary: format!(
                        "pod {}/{}: container {:?} cannot start: {message}",
                        pod.namespace, pod.name, container.name
                    ),
                    logs: status::pod_logs_text(pod),
                });
            }
        }
    }
    None
}

fn timed_out(state: Option<&State>, timeout: Duration) -> Failure {
    let Some(state) = state else {
        return Failure {
            summary: format!("the local mesh did not start within {timeout:?}"),
            logs: String::new(),
        };
    };
    let mut waiting = Vec::new();
    let mut logs = String::new();
    if !state.controller.ready {
        waiting.push("the controller".to_owned());
        logs.push_str(&format!(
            "==> controller ({}) <==\n{}\n",
            state.controller.log.display(),
            tail_file(&state.controller.log)
        ));
    }
    for pod in state
        .pods
        .iter()
        .filter(|p| !p.ready && p.phase != PodPhase::Succeeded)
    {
        waiting.push(format!(
            "pod {}/{} ({:?})",
            pod.namespace, pod.name, pod.phase
        ));
        logs.push_str(&status::pod_logs_text(pod));
    }
    Failure {
        summary: format!(
            "not ready within {timeout:?}: {} (raise --timeout if they are just slow)",
            waiting.join(", ")
        ),
        logs,
    }
}

/// The last lines of a file, for error reports.
pub fn tail_file(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
