//! Scenario 6, the real sidecar path: two network namespaces joined by a veth pair, as two
//! pods on two nodes would be.
//!
//! - the client pod: the load generator and the client proxy, with `mesh-proxy init`'s
//!   iptables rules capturing the generator's outbound TCP to a Service's cluster IP;
//! - the server pod: nginx and the server proxy, behind the same rules (inbound capture).
//!
//! The proxies run as init's default proxy uid, so their own connections are not captured;
//! the generator runs as root and is. The direct baseline crosses the same veth to nginx on a
//! port both pods' rules skip.
//!
//! The namespaces have no route anywhere but to each other. The controller and the bench's
//! identity service stay on the host's loopback: each namespace reaches them through relays,
//! a `mesh-bench --relay` process listening on the namespace's loopback and joined to the bench
//! by a Unix socket (the namespaces share the file system, not the network). Every namespace
//! made here is deleted when [`Lab`] drops, also on failure; one left by a killed run is
//! deleted by the next.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::process::Command;

use crate::child::{Service, find_program};
use crate::load::Entry;
use crate::topology::{Binaries, Running, Topology, Watched, pass_worker_threads, pod_yaml};

/// Prefix of every namespace made here: `mesh-b-<creator pid>-<role>`.
const NAME_PREFIX: &str = "mesh-b-";
/// The client pod's and the server pod's addresses on the veth.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);
/// The Service's cluster IP: routed to the client pod's loopback, captured before it matters.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// nginx's port in the server pod (the Service's targetPort and the direct baseline's port).
const APP_PORT: u16 = 8080;
/// nginx's HTTP/2 port, on the server pod's loopback; unused, but nginx's configuration has one.
const APP_H2_PORT: u16 = 8082;
/// The relays' ports on each namespace's loopback.
const CONTROLLER_RELAY_PORT: u16 = 9186;
/// `mesh-proxy init`'s default proxy uid: the proxies run as it.
const PROXY_UID: &str = "2102";
const START: Duration = Duration::from_secs(20);

/// Whether this process runs as root (namespaces and iptables need it). From `id -u`, so the
/// crate needs no unsafe `getuid`.
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.status.success() && output.stdout.trim_ascii() == b"0")
}

/// A network namespace with its loopback up; deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    async fn create(role: &str) -> Result<Self> {
        let name = format!("{NAME_PREFIX}{}-{role}", std::process::id());
        checked(Command::new("ip").args(["netns", "add", &name])).await?;
        let namespace = Self { name };
        namespace.run(&["ip", "link", "set", "lo", "up"]).await?;
        Ok(namespace)
    }

    /// Its name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command running `program` inside the namespace.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `argv` inside the namespace; fails with its stderr.
    async fn run(&self, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().context("an empty command")?;
        let mut command = self.command(program);
        command.args(args);
        checked(&mut command).await
    }

    /// Whether something listens on TCP `port` inside the namespace.
    async fn listening(&self, port: u16) -> bool {
        let filter = format!("sport = :{port}");
        self.run(&["ss", "-Hltn", &filter])
            .await
            .is_ok_and(|out| !out.trim().is_empty())
    }

    /// An HTTP GET from inside the namespace with curl (at most 2 s): status and body.
    async fn curl(&self, url: &str) -> Result<(u16, String)> {
        let out = self
            .run(&["curl", "-s", "-m", "2", "-w", "\n%{http_code}", url])
            .await?;
        let (body, status) = out.rsplit_once('\n').context("no status from curl")?;
        Ok((status.trim().parse().context("curl's status")?, body.into()))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Also removes the veth; the processes inside were killed before (see `Lab`).
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

async fn checked(command: &mut Command) -> Result<String> {
    let output = tokio::time::timeout(Duration::from_secs(10), command.output())
        .await
        .with_context(|| format!("{command:?} took over 10 s"))?
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Deletes the namespaces of benchmark runs that are gone (killed before they could clean up).
fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(creator) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{creator}")).exists() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .output();
        }
    }
}

/// A task aborted on drop.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything scenario 6 runs. Dropping it kills the processes, then deletes the namespaces
/// (fields drop in declaration order).
#[derive(Debug)]
pub struct Lab {
    running: Running,
    _relays: Vec<AbortOnDrop>,
    client: Namespace,
    server: Namespace,
}

impl Lab {
    /// Every process the lab runs.
    pub fn pids(&self) -> Vec<u32> {
        self.running.pids()
    }

    /// Stops every process, then deletes the namespaces.
    pub async fn stop(self) {
        let Self {
            running,
            _relays,
            client,
            server,
        } = self;
        running.stop().await;
        drop(_relays);
        drop((client, server));
    }
}

/// Where the loopback control plane listens: what the namespaces' relays reach.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// The controller's gRPC address (Destination, Policies and Identity).
    pub controller: SocketAddr,
    /// The controller's folder of YAML (file backend).
    pub config_dir: PathBuf,
    /// The trust anchors' PEM file.
    pub anchors: PathBuf,
    /// The client proxy's token and SPIFFE ID.
    pub client: (PathBuf, String),
    /// The server proxy's token and SPIFFE ID.
    pub server: (PathBuf, String),
}

/// Serves the TCP side of a relay: a listener inside a namespace whose connections go, over
/// the Unix socket `socket`, to the bench. Runs until the process is killed.
pub async fn relay_in_namespace(listen: SocketAddr, socket: PathBuf) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    loop {
        let (mut tcp, _) = listener.accept().await?;
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Ok(mut unix) = UnixStream::connect(&socket).await {
                let _ = tcp.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            }
        });
    }
}

/// The bench's side of a relay: connections on the Unix socket go to `target` on loopback.
async fn relay_to_host(listener: UnixListener, target: SocketAddr) {
    while let Ok((mut unix, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut tcp) = TcpStream::connect(target).await {
                let _ = tcp.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
            }
        });
    }
}

/// The controller's YAML for the server pod: a Service with a cluster IP and the Pod.
fn yaml() -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web-ns\n  namespace: bench\n\
         spec:\n  clusterIP: {CLUSTER_IP}\n  selector:\n    app: web-ns\n  ports:\n  - name: http\n    port: 80\n    targetPort: {APP_PORT}\n"
    );
    out.push_str(&pod_yaml(
        "web-ns", "web-ns-0", SERVER_IP, 4143, "web", true, true,
    ));
    out
}

/// Starts the two pods and everything in them; returns the lab and its two topologies: the
/// direct baseline across the veth, and the meshed hop with mutual TLS through capture.
pub async fn start(
    binaries: &Binaries,
    control: &ControlPlane,
    dir: &Path,
) -> Result<(Lab, Vec<Topology>)> {
    for program in ["iptables", "curl", "ss", "setpriv"] {
        find_program(program).with_context(|| format!("{program} is not installed"))?;
    }
    let setpriv = find_program("setpriv").context("setpriv is not installed")?;
    let nginx = find_program("nginx").context("nginx is not installed")?;
    let me = std::env::current_exe().context("finding mesh-bench's own binary")?;
    remove_orphans();
    let server = Namespace::create("server").await?;
    let client = Namespace::create("client").await?;
    let mut lab = Lab {
        running: Running::default(),
        _relays: Vec::new(),
        client,
        server,
    };
    let (client, server) = (&lab.client, &lab.server);
    let pid = std::process::id();
    let (client_if, server_if) = (format!("mbc{pid}"), format!("mbs{pid}"));
    checked(Command::new("ip").args([
        "link",
        "add",
        &client_if,
        "netns",
        client.name(),
        "type",
        "veth",
        "peer",
        "name",
        &server_if,
        "netns",
        server.name(),
    ]))
    .await?;
    for (namespace, interface, ip) in [
        (client, &client_if, CLIENT_IP),
        (server, &server_if, SERVER_IP),
    ] {
        namespace
            .run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", interface])
            .await?;
        namespace
            .run(&["ip", "link", "set", interface, "up"])
            .await?;
    }
    // A route for the cluster IP, so connecting to it reaches the OUTPUT chain's capture.
    client
        .run(&[
            "ip",
            "route",
            "add",
            "local",
            &format!("{CLUSTER_IP}/32"),
            "dev",
            "lo",
        ])
        .await?;
    // The pods' capture, as the injected init container installs it. The direct baseline's
    // port bypasses both sides.
    let proxy = binaries.proxy.to_string_lossy().into_owned();
    let skip = APP_PORT.to_string();
    server
        .run(&[&proxy, "init", "--skip-inbound-ports", &skip])
        .await
        .context("mesh-proxy init in the server pod")?;
    client
        .run(&[&proxy, "init", "--skip-outbound-ports", &skip])
        .await
        .context("mesh-proxy init in the client pod")?;

    // A relay to the control plane on the host's loopback (the controller serves Identity too).
    let socket = dir.join("netns-controller.sock");
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    let relays = vec![AbortOnDrop(tokio::spawn(relay_to_host(
        listener,
        control.controller,
    )))];
    for namespace in [client, server] {
        let mut command = namespace.command(&me);
        command
            .arg("--relay")
            .arg(format!("127.0.0.1:{CONTROLLER_RELAY_PORT}"))
            .arg(&socket);
        let name = format!(
            "netns-{}-controller-relay",
            &namespace.name()[NAME_PREFIX.len()..]
        );
        let mut service = Service::spawn(&name, command, dir)?;
        wait_until(&mut service, || namespace.listening(CONTROLLER_RELAY_PORT)).await?;
        lab.running.keep(service)?;
    }
    lab._relays = relays;

    // nginx in the server pod.
    let nginx_dir = dir.join("netns-nginx");
    std::fs::create_dir_all(&nginx_dir)?;
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(
        &conf,
        crate::backend::nginx_conf(
            &nginx_dir,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, APP_PORT)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, APP_H2_PORT)),
        ),
    )?;
    let mut command = server.command(&nginx);
    command
        .arg("-p")
        .arg(&nginx_dir)
        .arg("-e")
        .arg(nginx_dir.join("nginx-error.log"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"]);
    let mut service = Service::spawn("netns-nginx", command, dir)?;
    wait_until(&mut service, || server.listening(APP_PORT)).await?;
    let nginx_pid = lab.running.keep(service)?;

    // The controller learns the server pod and its Service (it polls its folder).
    std::fs::write(control.config_dir.join("netns.yaml"), yaml())?;

    let mut pids = Vec::new();
    for (namespace, role, (token, id)) in [
        (server, "server", &control.server),
        (client, "client", &control.client),
    ] {
        let mut command = namespace.command(&setpriv);
        command
            .args([
                &format!("--reuid={PROXY_UID}"),
                &format!("--regid={PROXY_UID}"),
                "--clear-groups",
            ])
            .arg(&binaries.proxy)
            .env_clear()
            .env("MESH_PROXY_INBOUND_LISTEN", "0.0.0.0:4143")
            .env("MESH_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140")
            .env("MESH_PROXY_ADMIN_LISTEN", "127.0.0.1:4191")
            .env(
                "MESH_PROXY_CONTROLLER_ADDR",
                format!("http://127.0.0.1:{CONTROLLER_RELAY_PORT}"),
            )
            .env("MESH_PROXY_LOG_LEVEL", "warn")
            .env("MESH_PROXY_NAMESPACE", "bench")
            .env("MESH_PROXY_POD", format!("netns-{role}"))
            .env("MESH_PROXY_IDENTITY", id)
            .env("MESH_PROXY_IDENTITY_TOKEN_FILE", token)
            .env("MESH_PROXY_TRUST_ANCHORS_FILE", &control.anchors);
        pass_worker_threads(&mut command);
        let mut service = Service::spawn(&format!("netns-{role}-proxy"), command, dir)?;
        wait_until(&mut service, || async {
            namespace
                .curl("http://127.0.0.1:4191/ready")
                .await
                .is_ok_and(|(status, _)| status == 200)
        })
        .await?;
        pids.push(lab.running.keep(service)?);
    }
    let (server_pid, client_pid) = (pids[0], pids[1]);

    check_path(&lab)
        .await
        .context("checking the captured path")?;
    let topologies = vec![
        Topology {
            key: "netns-direct".into(),
            title: "direct across the veth (no proxy)".into(),
            http1: Entry {
                addr: SocketAddr::from((SERVER_IP, APP_PORT)),
                host: None,
                netns: Some(lab.client.name().into()),
            },
            http2: None,
            watched: vec![Watched {
                role: "nginx".into(),
                pid: nginx_pid,
            }],
        },
        Topology {
            key: "netns-mesh-mtls".into(),
            title: "mesh, mutual TLS, captured".into(),
            http1: Entry {
                addr: SocketAddr::from((CLUSTER_IP, 80)),
                host: None,
                netns: Some(lab.client.name().into()),
            },
            http2: None,
            watched: vec![
                Watched {
                    role: "client proxy".into(),
                    pid: client_pid,
                },
                Watched {
                    role: "server proxy".into(),
                    pid: server_pid,
                },
            ],
        },
    ];
    Ok((lab, topologies))
}

/// Polls `ready` every 50 ms until it holds, failing when the process dies or after 20 s.
async fn wait_until<F, Fut>(service: &mut Service, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + START;
    loop {
        service.check_alive()?;
        if ready().await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{} is not ready after {START:?}; its log ends with:\n{}",
                service.name,
                service.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request from the client pod to the cluster IP must be captured, cross the veth over
/// mutual TLS and reach nginx through the server proxy. Discovery may take a poll of the
/// controller's folder, so this retries for a few seconds.
async fn check_path(lab: &Lab) -> Result<()> {
    let url = format!("http://{CLUSTER_IP}/");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last = match lab.client.curl(&url).await {
            Ok((200, _)) => break,
            Ok((status, body)) => format!("{status} {body}"),
            Err(error) => format!("{error:#}"),
        };
        if tokio::time::Instant::now() > deadline {
            bail!("{url} from the client pod did not answer 200 (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = lab.server.curl("http://127.0.0.1:4191/metrics").await?;
    let meshed = metrics.lines().any(|line| {
        line.starts_with("request_total")
            && line.contains("direction=\"inbound\"")
            && line.contains("tls=\"true\"")
    });
    if !meshed {
        bail!(
            "the server proxy counted no inbound request over mutual TLS; its metrics:\n{metrics}"
        );
    }
    Ok(())
}
