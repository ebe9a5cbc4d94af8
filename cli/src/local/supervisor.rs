//! `meshctl local supervise`: carries out `plan.json` and keeps it running in the background.
//!
//! It builds the network (root mode), writes the controller's folder, starts the controller,
//! the loopback forwards and every pod's containers in Kubernetes' order (init containers one
//! by one, native sidecars kept running, the proxy ready before the apps), restarts containers
//! per `restartPolicy` with exponential backoff, probes readiness, and writes `state.json` and
//! the pods' status (for the controller) whenever something changes. It runs until `down`
//! stops it; everything it starts is also findable without it (see [`super::process`]).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::forward::{self, Dialer};
use super::netns;
use super::plan::{ContainerPlan, Mode, Plan, PodPlan, ProbePlan, RestartPolicy, Role};
use super::process::{self, INSTANCE_ENV};
use super::state::{
    self, ContainerState, ContainerStatus, ControllerState, Endpoint, PodPhase, PodState,
    ProcessRef, STATE_VERSION, ServiceState, State,
};

/// How often the loop looks at every process.
const TICK: Duration = Duration::from_millis(100);
/// How often a running container's probe runs.
const PROBE_PERIOD: Duration = Duration::from_millis(500);
/// The first restart delay; it doubles per crash up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A container that ran this long before exiting restarts with the first delay again.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// Proxy variables of our own environment that must not leak into the pods.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// Runs the supervisor for the mesh in `state_dir`; returns only on a fatal error.
pub fn run(state_dir: &Path) -> anyhow::Result<()> {
    let plan: Plan = state::read_json(&state::plan_file(state_dir))
        .with_context(|| format!("reading the plan in {}", state_dir.display()))?;
    let mut supervisor = Supervisor::new(plan);
    if let Err(error) = supervisor.start() {
        let message = format!("{error:#}");
        supervisor.state.fatal = Some(message.clone());
        supervisor.write_state(true);
        anyhow::bail!(message);
    }
    eprintln!(
        "meshctl local supervise: running {} pods",
        supervisor.pods.len()
    );
    let stop_request = stop_request_file(state_dir);
    loop {
        if stop_request.exists() || !state_dir.exists() {
            eprintln!("meshctl local supervise: stopping every pod and the controller");
            supervisor.shutdown();
            return Ok(());
        }
        supervisor.tick();
        std::thread::sleep(TICK);
    }
}

/// The file `down` creates to ask the supervisor to stop what it started and exit: it can
/// reap its children, which nobody else can.
pub fn stop_request_file(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("stop")
}

/// How long processes get between SIGTERM and SIGKILL when the supervisor stops them.
const STOP_GRACE: Duration = Duration::from_secs(5);

struct Supervisor {
    plan: Plan,
    dialer: Dialer,
    state: State,
    controller: Runner,
    pods: Vec<PodRuntime>,
    last_written: String,
}

/// One restartable process and what is known of it.
#[derive(Default)]
struct Runner {
    child: Option<Child>,
    process: Option<ProcessRef>,
    started_at: Option<Instant>,
    /// When the next start may happen (after a crash or a failed start).
    next_start: Option<Instant>,
    backoff: Option<Duration>,
    restarts: u32,
    /// Starts tried so far (the first is not a restart).
    attempts: u32,
    /// An init container that exited 0.
    completed: bool,
    ready: bool,
    /// A native sidecar whose startup probe passed (or that has none and runs).
    started: bool,
    last_probe: Option<Instant>,
    status: Option<ContainerStatus>,
}

impl Runner {
    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Reaps the process if it exited: `Some(exit code)` once.
    fn poll_exit(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt as _;
                let code = status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                self.child = None;
                self.ready = false;
                self.started = false;
                Some(code)
            }
            Ok(None) => None,
            Err(_) => None,
        }
    }

    /// Waits before the next start, doubling the delay per crash, back to the first delay
    /// after a long run.
    fn schedule_restart(&mut self) {
        let ran_long = self
            .started_at
            .is_some_and(|at| at.elapsed() > BACKOFF_RESET_AFTER);
        let delay = match self.backoff {
            Some(previous) if !ran_long => (previous * 2).min(MAX_BACKOFF),
            _ => FIRST_BACKOFF,
        };
        self.backoff = Some(delay);
        self.next_start = Some(Instant::now() + delay);
    }

    fn may_start(&self) -> bool {
        self.next_start.is_none_or(|at| Instant::now() >= at)
    }

    fn probe_due(&mut self) -> bool {
        let due = self
            .last_probe
            .is_none_or(|at| at.elapsed() >= PROBE_PERIOD);
        if due {
            self.last_probe = Some(Instant::now());
        }
        due
    }
}

struct PodRuntime {
    init: Vec<Runner>,
    containers: Vec<Runner>,
    phase: PodPhase,
    ready: bool,
    /// The readiness last written to the controller's folder.
    published_ready: Option<bool>,
    proxy_forward: Option<SocketAddr>,
}

impl Supervisor {
    fn new(plan: Plan) -> Self {
        let dialer = match &plan.network.router_netns {
            Some(router) => Dialer::Netns(router.clone()),
            None => Dialer::Direct,
        };
        let loopback = plan.mode == Mode::Loopback;
        let direct = |addr: SocketAddr| Endpoint {
            in_mesh: addr,
            from_host: loopback.then_some(addr),
        };
        let state = State {
            version: STATE_VERSION,
            instance: plan.instance.clone(),
            mode: plan.mode,
            state_dir: plan.state_dir.clone(),
            supervisor: ProcessRef::of(std::process::id()),
            updated_unix_ms: 0,
            router_netns: plan.network.router_netns.clone(),
            controller: ControllerState {
                process: None,
                restarts: 0,
                ready: false,
                grpc: direct(plan.controller.grpc),
                admin: direct(plan.controller.admin),
                log: plan.controller.log.clone(),
            },
            pods: Vec::new(),
            services: plan
                .services
                .iter()
                .map(|s| ServiceState {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    cluster_ip: s.cluster_ip.map(|ip| ip.to_string()),
                    ports: s.ports.clone(),
                })
                .collect(),
            fatal: None,
        };
        let pods = plan
            .pods
            .iter()
            .map(|pod| PodRuntime {
                init: pod
                    .init_containers
                    .iter()
                    .map(|_| Runner::default())
                    .collect(),
                containers: pod.containers.iter().map(|_| Runner::default()).collect(),
                phase: PodPhase::Pending,
                ready: false,
                published_ready: None,
                proxy_forward: None,
            })
            .collect();
        let mut supervisor = Supervisor {
            plan,
            dialer,
            state,
            controller: Runner::default(),
            pods,
            last_written: String::new(),
        };
        supervisor.refresh_state();
        supervisor
    }

    /// Everything done once: network, files, forwards, the controller.
    fn start(&mut self) -> anyhow::Result<()> {
        let plan = &self.plan;
        std::fs::create_dir_all(&plan.controller.config_dir)
            .with_context(|| format!("creating {}", plan.controller.config_dir.display()))?;
        for object in &plan.objects {
            let path = plan.controller.config_dir.join(&object.file);
            state::write_json(&path, &object.object)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        for pod in &plan.pods {
            std::fs::create_dir_all(&pod.log_dir)
                .with_context(|| format!("creating {}", pod.log_dir.display()))?;
            for file in &pod.files {
                write_private(&file.path, &file.contents, file.owner).with_context(|| {
                    format!("writing {} for pod {}", file.path.display(), pod.key())
                })?;
            }
            for dir in &pod.dirs {
                make_private_dir(&dir.path, dir.owner).with_context(|| {
                    format!("making {} for pod {}", dir.path.display(), pod.key())
                })?;
            }
        }
        if let (Some(router), Some(bridge)) = (&plan.network.router_netns, &plan.network.bridge) {
            netns::create_router(
                router,
                bridge,
                plan.network.gateway,
                plan.network.prefix_len,
            )
            .with_context(|| format!("creating the router namespace {router}"))?;
            for pod in &plan.pods {
                let (Some(pod_netns), Some(veth), Some(hosts)) =
                    (&pod.netns, &pod.veth, &pod.hosts)
                else {
                    continue;
                };
                netns::create_pod(&netns::PodNetwork {
                    router,
                    bridge,
                    netns: pod_netns,
                    veth,
                    ip: pod.ip,
                    prefix_len: plan.network.prefix_len,
                    gateway: plan.network.gateway,
                    hosts,
                })
                .with_context(|| format!("creating the network of pod {}", pod.key()))?;
            }
            self.start_forwards()?;
        }
        for i in 0..self.plan.pods.len() {
            self.publish_pod(i, false);
        }
        self.start_controller();
        self.refresh_state();
        self.write_state(true);
        Ok(())
    }

    /// Root mode: the controller's forwards on the ports asked for, and one per proxy admin
    /// server on any free port.
    fn start_forwards(&mut self) -> anyhow::Result<()> {
        let controller = &self.plan.controller;
        let wanted = [
            (
                controller.grpc,
                controller.grpc_forward_port,
                "--controller-port",
            ),
            (
                controller.admin,
                controller.admin_forward_port,
                "--controller-admin-port",
            ),
        ];
        let mut bound = Vec::new();
        for (target, port, flag) in wanted {
            let port = port.unwrap_or(0);
            let listener = forward::bind_loopback(port).map_err(|error| {
                anyhow::anyhow!(
                    "port clash: cannot listen on 127.0.0.1:{port} for the controller's forward: {error}; choose another with {flag}"
                )
            })?;
            bound.push((listener, target));
        }
        let mut addresses = Vec::new();
        for (listener, target) in bound {
            addresses.push(listener.local_addr()?);
            forward::spawn_forward(listener, target, self.dialer.clone());
        }
        self.state.controller.grpc.from_host = addresses.first().copied();
        self.state.controller.admin.from_host = addresses.get(1).copied();
        for (pod, runtime) in self.plan.pods.iter().zip(&mut self.pods) {
            let (Some(admin), Some(netns)) = (pod.proxy_admin, &pod.netns) else {
                continue;
            };
            let listener = forward::bind_loopback(0)
                .with_context(|| format!("listening for pod {}'s admin forward", pod.key()))?;
            runtime.proxy_forward = Some(listener.local_addr()?);
            // As `kubectl port-forward` does: from inside the pod to its loopback, where the
            // proxy serves its configuration and identity to the pod itself only.
            let target = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin.port());
            forward::spawn_forward(listener, target, forward::Dialer::Netns(netns.clone()));
        }
        Ok(())
    }

    fn start_controller(&mut self) {
        let plan = &self.plan.controller;
        let mut command = Command::new(&plan.argv[0]);
        command.args(&plan.argv[1..]).env("NO_COLOR", "1");
        let netns = self.plan.network.router_netns.clone();
        let log = plan.log.clone();
        self.controller.attempts += 1;
        match spawn(command, &log, &self.plan.state_dir, netns.as_deref()) {
            Ok(child) => {
                self.controller.process = ProcessRef::of(child.id());
                self.controller.child = Some(child);
                self.controller.started_at = Some(Instant::now());
            }
            Err(error) => {
                append_log(&log, &format!("cannot start the controller: {error}"));
                self.controller.schedule_restart();
            }
        }
    }

    /// Stops everything, as the kubelet stops a pod: the apps first, then the proxies and
    /// other sidecars (which the apps' last requests still need), then the controller.
    fn shutdown(&mut self) {
        let mut apps = Vec::new();
        let mut mesh = Vec::new();
        for (pod, runtime) in self.plan.pods.iter().zip(&mut self.pods) {
            let plans = pod.init_containers.iter().chain(&pod.containers);
            let runners = runtime.init.iter_mut().chain(&mut runtime.containers);
            for (container, runner) in plans.zip(runners) {
                if let Some(child) = runner.child.take() {
                    if container.role == Role::App && !container.sidecar {
                        apps.push(child);
                    } else {
                        mesh.push(child);
                    }
                }
            }
        }
        stop_children(apps);
        stop_children(mesh);
        stop_children(self.controller.child.take().into_iter().collect());
    }

    /// One pass over everything.
    fn tick(&mut self) {
        if let Some(code) = self.controller.poll_exit() {
            append_log(
                &self.plan.controller.log,
                &format!("the controller exited with status {code}; restarting"),
            );
            self.controller.restarts += 1;
            self.controller.schedule_restart();
        }
        if !self.controller.is_running() && self.controller.may_start() {
            self.start_controller();
        }
        if self.controller.is_running() && self.controller.probe_due() {
            self.controller.ready = forward::http_get_status(
                &self.dialer,
                self.plan.controller.admin,
                "/ready",
                Duration::from_secs(1),
            )
            .is_ok_and(|code| code == 200);
        }
        for i in 0..self.pods.len() {
            self.step_pod(i);
        }
        self.refresh_state();
        self.write_state(false);
    }

    /// Moves one pod along: init containers in order, then the regular containers (the proxy
    /// first and ready before the others), restarts, probes, phase and readiness.
    fn step_pod(&mut self, index: usize) {
        let plan = self.plan.pods[index].clone();
        let context = RunContext {
            pod: &plan,
            mode: self.plan.mode,
            state_dir: &self.plan.state_dir,
            dialer: &self.dialer,
        };
        let runtime = &mut self.pods[index];
        if matches!(runtime.phase, PodPhase::Succeeded | PodPhase::Failed) {
            return;
        }
        // Init containers, one at a time; native sidecars start and stay.
        let mut initialized = true;
        for (container, runner) in plan.init_containers.iter().zip(&mut runtime.init) {
            if container.skipped.is_some() {
                runner.completed = true;
                continue;
            }
            if container.sidecar {
                context.keep_running(container, runner, RestartPolicy::Always);
                if !runner.started {
                    initialized = false;
                    break;
                }
                continue;
            }
            if runner.completed {
                continue;
            }
            if let Some(code) = runner.poll_exit() {
                context.note_exit(container, runner, code);
                if code == 0 {
                    runner.completed = true;
                    continue;
                }
                if plan.restart_policy == RestartPolicy::Never {
                    runtime.phase = PodPhase::Failed;
                    return;
                }
                runner.restarts += 1;
                runner.schedule_restart();
            }
            if !runner.is_running() && runner.may_start() {
                context.start(container, runner);
            }
            initialized = false;
            break;
        }
        if !initialized {
            runtime.ready = false;
            self.publish_pod(index, false);
            return;
        }
        runtime.phase = PodPhase::Running;
        let mut hold = false;
        for (container, runner) in plan.containers.iter().zip(&mut runtime.containers) {
            if hold {
                break;
            }
            context.keep_running(container, runner, plan.restart_policy);
            // As the injector's postStart hook does: apps start once the proxy is ready.
            if container.role == Role::Proxy && !runner.ready {
                hold = true;
            }
        }
        let finished: Vec<Option<i32>> = runtime
            .containers
            .iter()
            .map(
                |runner| match (&runner.status, runner.is_running(), runner.next_start) {
                    (Some(ContainerStatus::Terminated { exit_code, .. }), false, None) => {
                        Some(*exit_code)
                    }
                    _ => None,
                },
            )
            .collect();
        if !finished.is_empty() && finished.iter().all(Option::is_some) {
            runtime.phase = if finished.iter().all(|code| *code == Some(0)) {
                PodPhase::Succeeded
            } else {
                PodPhase::Failed
            };
        }
        let sidecars_ready = plan
            .init_containers
            .iter()
            .zip(&runtime.init)
            .filter(|(c, _)| c.sidecar)
            .all(|(_, r)| r.ready);
        runtime.ready = runtime.phase == PodPhase::Running
            && sidecars_ready
            && runtime.containers.iter().all(|r| r.ready);
        let ready = runtime.ready;
        self.publish_pod(index, ready);
    }

    /// Writes the pod, with its IP and Ready condition, to the controller's folder when its
    /// readiness changed: the controller only sends ready endpoints.
    fn publish_pod(&mut self, index: usize, ready: bool) {
        if self.pods[index].published_ready == Some(ready) {
            return;
        }
        let pod = &self.plan.pods[index];
        let mut object = pod.object.clone();
        if let Some(map) = object.as_object_mut() {
            map.insert(
                "status".to_owned(),
                serde_json::json!({
                    "phase": "Running",
                    "podIP": pod.ip.to_string(),
                    "podIPs": [{"ip": pod.ip.to_string()}],
                    "hostIP": self.plan.network.gateway.to_string(),
                    "conditions": [
                        {"type": "Ready", "status": if ready { "True" } else { "False" }},
                    ],
                }),
            );
        }
        let path = self
            .plan
            .controller
            .config_dir
            .join(format!("pod.{}.{}.yaml", pod.namespace, pod.name));
        match state::write_json(&path, &object) {
            Ok(()) => self.pods[index].published_ready = Some(ready),
            Err(error) => eprintln!("cannot write {}: {error}", path.display()),
        }
    }

    /// Rebuilds `state` from the runtime.
    fn refresh_state(&mut self) {
        let controller = &self.controller;
        self.state.controller.process = controller
            .is_running()
            .then_some(controller.process)
            .flatten();
        self.state.controller.restarts = controller.restarts;
        self.state.controller.ready = controller.ready;
        let loopback = self.plan.mode == Mode::Loopback;
        self.state.pods = self
            .plan
            .pods
            .iter()
            .zip(&self.pods)
            .map(|(pod, runtime)| {
                let containers: Vec<ContainerState> = pod
                    .init_containers
                    .iter()
                    .zip(&runtime.init)
                    .chain(pod.containers.iter().zip(&runtime.containers))
                    .map(|(container, runner)| container_state(container, runner))
                    .collect();
                PodState {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    ip: pod.ip.to_string(),
                    netns: pod.netns.clone(),
                    workload: pod.workload.clone(),
                    meshed: pod.meshed,
                    phase: runtime.phase,
                    ready: runtime.ready,
                    restarts: containers.iter().map(|c| c.restarts).sum(),
                    proxy_admin: pod.proxy_admin.map(|admin| Endpoint {
                        in_mesh: admin,
                        from_host: if loopback {
                            Some(admin)
                        } else {
                            runtime.proxy_forward
                        },
                    }),
                    containers,
                }
            })
            .collect();
    }

    /// Writes `state.json` when it changed (or always, with `force`).
    fn write_state(&mut self, force: bool) {
        self.state.updated_unix_ms = 0;
        let content = serde_json::to_string(&self.state).unwrap_or_default();
        if !force && content == self.last_written {
            return;
        }
        self.state.updated_unix_ms = state::now_unix_ms();
        let path = state::state_file(&self.plan.state_dir);
        match state::write_json(&path, &self.state) {
            Ok(()) => self.last_written = content,
            Err(error) => eprintln!("cannot write {}: {error}", path.display()),
        }
    }
}

fn container_state(container: &ContainerPlan, runner: &Runner) -> ContainerState {
    let status = if container.skipped.is_some() {
        ContainerStatus::Terminated {
            exit_code: 0,
            reason: "Skipped".to_owned(),
        }
    } else if let (Some(ContainerStatus::Terminated { exit_code, .. }), false, Some(delay)) = (
        &runner.status,
        runner.is_running(),
        runner.next_start.and(runner.backoff),
    ) {
        // Exited and waiting out its restart delay, as `kubectl get pods` shows it.
        ContainerStatus::Waiting {
            reason: "CrashLoopBackOff".to_owned(),
            message: format!(
                "back-off {delay:?} restarting failed container (exit status {exit_code})"
            ),
        }
    } else {
        runner.status.clone().unwrap_or(ContainerStatus::Waiting {
            reason: if container.init {
                "PodInitializing".to_owned()
            } else {
                "ContainerCreating".to_owned()
            },
            message: String::new(),
        })
    };
    ContainerState {
        name: container.name.clone(),
        role: container.role,
        init: container.init,
        status,
        ready: runner.ready,
        restarts: runner.restarts,
        process: runner.is_running().then_some(runner.process).flatten(),
        log: container.log.clone(),
    }
}

/// What starting one pod's containers needs.
struct RunContext<'a> {
    pod: &'a PodPlan,
    mode: Mode,
    state_dir: &'a Path,
    dialer: &'a Dialer,
}

impl RunContext<'_> {
    /// Keeps a container running per `policy`: notes exits, restarts after the backoff,
    /// probes readiness.
    fn keep_running(&self, container: &ContainerPlan, runner: &mut Runner, policy: RestartPolicy) {
        if let Some(code) = runner.poll_exit() {
            self.note_exit(container, runner, code);
            let restart = match policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => code != 0,
                RestartPolicy::Never => false,
            };
            if restart {
                runner.restarts += 1;
                runner.schedule_restart();
            } else {
                runner.next_start = None;
                return;
            }
        }
        if !runner.is_running() {
            let terminated_for_good =
                matches!(runner.status, Some(ContainerStatus::Terminated { .. }))
                    && runner.next_start.is_none()
                    && runner.attempts > 0;
            if !terminated_for_good && runner.may_start() {
                self.start(container, runner);
            }
            return;
        }
        if runner.probe_due() {
            let startup_ok = runner.started
                || container
                    .startup
                    .as_ref()
                    .is_none_or(|probe| self.probe(probe));
            runner.started = startup_ok;
            runner.ready = startup_ok
                && container
                    .readiness
                    .as_ref()
                    .is_none_or(|probe| self.probe(probe));
        }
    }

    fn probe(&self, probe: &ProbePlan) -> bool {
        let timeout = Duration::from_secs(1);
        match probe {
            ProbePlan::Http { addr, path } => {
                forward::http_get_status(self.dialer, *addr, path, timeout)
                    .is_ok_and(|code| (200..400).contains(&code))
            }
            ProbePlan::Tcp { addr } => self.dialer.connect(*addr, timeout).is_ok(),
        }
    }

    fn note_exit(&self, container: &ContainerPlan, runner: &mut Runner, code: i32) {
        let reason = if code == 0 { "Completed" } else { "Error" };
        append_log(
            &container.log,
            &format!("container {:?} exited with status {code}", container.name),
        );
        runner.status = Some(ContainerStatus::Terminated {
            exit_code: code,
            reason: reason.to_owned(),
        });
    }

    /// Starts a container, or records why it cannot start (and tries again after the
    /// backoff, as the kubelet does).
    fn start(&self, container: &ContainerPlan, runner: &mut Runner) {
        runner.attempts += 1;
        if runner.attempts > 1 && !matches!(runner.status, Some(ContainerStatus::Terminated { .. }))
        {
            // A start that failed before counts as a restart too.
            runner.restarts += 1;
        }
        match self.spawn_container(container) {
            Ok(child) => {
                runner.process = ProcessRef::of(child.id());
                runner.child = Some(child);
                runner.started_at = Some(Instant::now());
                runner.next_start = None;
                runner.status = Some(ContainerStatus::Running {
                    since_unix_ms: state::now_unix_ms(),
                });
            }
            Err(message) => {
                append_log(
                    &container.log,
                    &format!("cannot start container {:?}: {message}", container.name),
                );
                runner.status = Some(ContainerStatus::Waiting {
                    reason: "StartError".to_owned(),
                    message,
                });
                runner.started_at = None;
                runner.schedule_restart();
            }
        }
    }

    fn spawn_container(&self, container: &ContainerPlan) -> Result<Child, String> {
        if let Some(why) = &container.unrunnable {
            return Err(why.clone());
        }
        let Some(program) = container.argv.first() else {
            return Err("no command".to_owned());
        };
        let path_var = container
            .env
            .iter()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| value.as_str());
        let resolved = process::find_program(program, path_var).ok_or_else(|| {
            format!("exec: {program:?}: executable file not found in $PATH (the command must exist on this machine)")
        })?;
        if let Some(dir) = &container.working_dir
            && !Path::new(dir).is_dir()
        {
            return Err(format!(
                "workingDir {dir:?} is not a folder on this machine"
            ));
        }
        let netns = self.pod.netns.as_deref();
        let (mut command, spawn_netns) = match (self.mode, container.role, netns) {
            // Apps through `ip netns exec`, which also puts the pod's hosts file in place.
            (Mode::Root, Role::App, Some(netns)) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]);
                if let Some(uid) = container.run_as_user {
                    command.args([
                        "setpriv",
                        &format!("--reuid={uid}"),
                        &format!("--regid={uid}"),
                        "--clear-groups",
                        "--",
                    ]);
                }
                command.arg(&resolved);
                (command, None)
            }
            // The mesh's own containers need no hosts file; the proxy runs as its uid, which
            // `ip netns exec` could not switch to, so these start from inside the namespace.
            (Mode::Root, _, Some(netns)) => {
                let mut command = Command::new(&resolved);
                if let Some(uid) = container.run_as_user {
                    command.uid(uid).gid(uid);
                }
                (command, Some(netns))
            }
            _ => (Command::new(&resolved), None),
        };
        command.args(&container.argv[1..]);
        for var in PROXY_VARS {
            command.env_remove(var);
        }
        if container.role != Role::App {
            // The mesh's logs go to files: no terminal colours in them.
            command.env("NO_COLOR", "1");
        }
        command.envs(container.env.iter().map(|(n, v)| (n, v)));
        if let Some(dir) = &container.working_dir {
            command.current_dir(dir);
        }
        spawn(command, &container.log, self.state_dir, spawn_netns)
            .map_err(|error| format!("{error}"))
    }
}

/// SIGTERM to each child's process group, SIGKILL after [`STOP_GRACE`], every one reaped.
fn stop_children(mut children: Vec<Child>) {
    use nix::sys::signal::Signal;
    for child in &children {
        process::signal_group_of(child.id(), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while !children.is_empty() && Instant::now() < deadline {
        children.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
        std::thread::sleep(Duration::from_millis(20));
    }
    for mut child in children {
        process::signal_group_of(child.id(), Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts `command` as the leader of a process group, output appended to `log`, marked with
/// the instance, from inside `netns` when given.
fn spawn(
    mut command: Command,
    log: &Path,
    state_dir: &Path,
    netns: Option<&str>,
) -> std::io::Result<Child> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = File::options().create(true).append(true).open(log)?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .env(INSTANCE_ENV, state_dir)
        .process_group(0);
    match netns {
        Some(netns) => netns::in_netns(netns, move || command.spawn()),
        None => command.spawn(),
    }
}

/// Writes a secret file readable by its owner only (the uid given, or us).
fn write_private(path: &Path, contents: &str, owner: Option<u32>) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        // The folder must let the owner through to the file.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// Makes an empty folder usable by its owner only (the uid given, or us), as an `emptyDir`.
fn make_private_dir(path: &Path, owner: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// Appends one line of ours to a log file, marked as the runtime's.
fn append_log(log: &Path, line: &str) {
    use std::io::Write as _;
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut file) = File::options().create(true).append(true).open(log) {
        let _ = writeln!(file, "meshctl local: {line}");
    }
}
