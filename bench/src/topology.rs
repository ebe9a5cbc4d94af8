//! The topologies under test, all on loopback and all in front of the same nginx:
//!
//! - `direct`: the load generator talks to nginx;
//! - `mesh`: load generator -> client proxy (outbound, routing by `Host`) -> server proxy
//!   (inbound, reached through discovery's `inbound_proxy_port`) -> nginx, plaintext;
//! - `mesh-mtls`: the same with identities from the controller's CA (the bench's test CA is
//!   its issuer), so the hop is mutual TLS 1.3;
//! - `haproxy`: load generator -> HAProxy -> (mutual TLS 1.3, HTTP/1.1) -> HAProxy -> nginx;
//! - `haproxy-h2`: the same with HTTP/2 between the two HAProxy processes, the protocol the
//!   mesh speaks between its proxies: a control, to tell what the hop's protocol costs from
//!   what the proxy costs.
//!
//! The real `mesh-controller` serves discovery from a folder of YAML written here; each
//! server proxy listens on its own loopback address (127.0.0.2, 127.0.0.3), which is its
//! pod's IP in that YAML.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::child::{Service, find_program, free_addr, free_port};
use crate::load::Entry;
use crate::pki::TestCa;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const NAMESPACE: &str = "bench";
const START: Duration = Duration::from_secs(20);
/// The identity tokens of the client and server proxies' ServiceAccounts.
const CLIENT_TOKEN: &str = "client-token";
const WEB_TOKEN: &str = "web-token";

/// A process whose CPU and memory a topology is judged by.
#[derive(Debug, Clone, Serialize)]
pub struct Watched {
    /// Its role, e.g. `client proxy`.
    pub role: String,
    /// Its pid.
    pub pid: u32,
}

/// One way from the load generator to nginx.
#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    /// Short key used in the JSON.
    pub key: String,
    /// A title for the tables.
    pub title: String,
    /// Where HTTP/1.1 load goes.
    pub http1: Entry,
    /// Where HTTP/2 load goes, when the topology carries it.
    pub http2: Option<Entry>,
    /// The proxies (for `direct`, the backend itself).
    pub watched: Vec<Watched>,
}

impl Topology {
    /// Whether mesh proxies carry its requests (`mesh`, `mesh-mtls`, `netns-mesh-mtls`), rather
    /// than a baseline (the direct path, HAProxy).
    pub fn is_mesh(&self) -> bool {
        self.key.contains("mesh")
    }
}

/// Where the binaries under test are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// mesh-proxy, release build.
    pub proxy: PathBuf,
    /// mesh-controller, release build.
    pub controller: PathBuf,
}

/// The backend's two ports.
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    /// HTTP/1.1.
    pub http1: SocketAddr,
    /// HTTP/2 prior knowledge.
    pub http2: SocketAddr,
}

/// Everything running for the benchmark; dropping it kills every process.
#[derive(Debug, Default)]
pub struct Running {
    services: Vec<Service>,
}

impl Running {
    /// Keeps a process alive with the others.
    pub fn keep(&mut self, service: Service) -> Result<u32> {
        let pid = service.pid()?;
        self.services.push(service);
        Ok(pid)
    }

    /// The pids of every process.
    pub fn pids(&self) -> Vec<u32> {
        self.services.iter().filter_map(|s| s.pid().ok()).collect()
    }

    /// Fails when any process has died.
    pub fn check_alive(&mut self) -> Result<()> {
        self.services.iter_mut().try_for_each(Service::check_alive)
    }

    /// Stops every process.
    pub async fn stop(self) {
        for service in self.services {
            service.stop().await;
        }
    }
}

/// The baseline: straight to nginx.
pub fn direct(backend: Backend, nginx_pid: u32) -> Topology {
    Topology {
        key: "direct".into(),
        title: "direct (no proxy)".into(),
        http1: Entry {
            addr: backend.http1,
            host: None,
            netns: None,
        },
        http2: Some(Entry {
            addr: backend.http2,
            host: None,
            netns: None,
        }),
        watched: vec![Watched {
            role: "nginx".into(),
            pid: nginx_pid,
        }],
    }
}

/// A meshed pod in the controller's YAML: its IP (the server proxy's address) and port.
#[derive(Debug, Clone)]
pub struct MeshedPod {
    /// Pod and label name, e.g. `web-plain`.
    pub app: String,
    /// The pod IP: the server proxy's inbound address.
    pub ip: Ipv4Addr,
    /// The server proxy's inbound port.
    pub inbound_port: u16,
    /// Whether its proxy has an identity (mutual TLS) or runs without one (plaintext).
    pub identity: bool,
}

/// The YAML for the file backend: a namespace, and per pod two Services (`<app>` to the
/// HTTP/1.1 port, `<app>-h2` to the HTTP/2 port) and the Pod itself.
pub fn mesh_yaml(pods: &[MeshedPod], backend_http1: u16, backend_http2: u16) -> String {
    let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n");
    // The file backend's ServiceAccounts declare the tokens that prove them to the Identity
    // service: the client proxies run as `client`, the server proxies as `web`.
    for (sa, token) in [("client", CLIENT_TOKEN), ("web", WEB_TOKEN)] {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {NAMESPACE}\n\
             \x20 annotations:\n    mesh.dev/identity-token: {token}\n"
        ));
    }
    for pod in pods {
        for (suffix, port) in [("", backend_http1), ("-h2", backend_http2)] {
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {app}{suffix}\n  namespace: {NAMESPACE}\n\
                 spec:\n  selector:\n    app: {app}\n  ports:\n  - name: http\n    port: 80\n    targetPort: {port}\n",
                app = pod.app
            ));
        }
        out.push_str(&pod_yaml(
            &pod.app,
            &format!("{}-0", pod.app),
            pod.ip,
            pod.inbound_port,
            "web",
            true,
            pod.identity,
        ));
    }
    out
}

/// One meshed Pod, Ready or not, its proxy with an identity or without one.
pub fn pod_yaml(
    app: &str,
    name: &str,
    ip: Ipv4Addr,
    inbound_port: u16,
    sa: &str,
    ready: bool,
    identity: bool,
) -> String {
    let ready = if ready { "True" } else { "False" };
    // A proxy container configured without MESH_PROXY_IDENTITY: discovery then advertises the
    // pod without identity, and client proxies speak plaintext to it.
    let proxy = if identity {
        ""
    } else {
        "  - name: mesh-proxy\n    env:\n    - name: MESH_PROXY_LOG_LEVEL\n      value: warn\n"
    };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  labels:\n    app: {app}\n\
         \x20 annotations:\n    mesh.dev/inject: enabled\n    mesh.dev/proxy-inbound-port: \"{inbound_port}\"\n\
         spec:\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n{proxy}\
         status:\n  podIP: {ip}\n  conditions:\n  - type: Ready\n    status: \"{ready}\"\n"
    )
}

/// The DNS name of a bench service.
pub fn service_host(app: &str) -> String {
    format!("{app}.{NAMESPACE}.svc.cluster.local")
}

/// The SPIFFE ID of a bench ServiceAccount.
pub fn spiffe_id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}")
}

/// Starts the real controller over `dir` (file backend); returns it and its gRPC URL.
pub async fn start_controller(
    binary: &Path,
    dir: &Path,
    identity_dir: Option<&Path>,
    log_dir: &Path,
    name: &str,
    poll: Duration,
) -> Result<(Service, String, SocketAddr)> {
    let grpc = free_addr(LOCALHOST)?;
    let admin = free_addr(LOCALHOST)?;
    let mut command = Command::new(binary);
    command
        .args(["--discovery", "file", "--config-dir"])
        .arg(dir)
        .args(["--grpc-listen", &grpc.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--poll-interval-ms", &poll.as_millis().to_string()])
        .args(["--log-level", "warn"]);
    if let Some(identity_dir) = identity_dir {
        command.arg("--identity-dir").arg(identity_dir);
    }
    let mut service = Service::spawn(name, command, log_dir)?;
    service.wait_listening(grpc, START).await?;
    wait_ready(&mut service, admin).await?;
    Ok((service, format!("http://{grpc}"), admin))
}

/// A minimal HTTP/1.0 GET; the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
        .await
        .context("an admin server did not answer in 5s")??;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until an admin server's `/ready` answers 200.
pub async fn wait_ready(service: &mut Service, admin: SocketAddr) -> Result<()> {
    let deadline = tokio::time::Instant::now() + START;
    loop {
        service.check_alive()?;
        let last = match http_get(admin, "/ready").await {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => format!("{status} {body}"),
            Err(error) => format!("{error:#}"),
        };
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{} is not ready after {START:?} (last /ready: {last}); its log ends with:\n{}",
                service.name,
                service.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a proxy process is given.
struct ProxySpec<'a> {
    name: &'a str,
    inbound: SocketAddr,
    controller: &'a str,
    identity: Option<(&'a str, &'a Path, &'a Path, &'a str)>,
}

/// Starts a mesh-proxy process; returns it, its outbound and its admin address once ready.
async fn start_proxy(
    binary: &Path,
    spec: ProxySpec<'_>,
    log_dir: &Path,
) -> Result<(Service, SocketAddr, SocketAddr)> {
    let outbound = free_addr(LOCALHOST)?;
    let admin = free_addr(LOCALHOST)?;
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("MESH_PROXY_INBOUND_LISTEN", spec.inbound.to_string())
        .env("MESH_PROXY_OUTBOUND_LISTEN", outbound.to_string())
        .env("MESH_PROXY_ADMIN_LISTEN", admin.to_string())
        .env("MESH_PROXY_CONTROLLER_ADDR", spec.controller)
        .env("MESH_PROXY_LOG_LEVEL", "warn")
        .env("MESH_PROXY_NAMESPACE", NAMESPACE)
        .env("MESH_PROXY_POD", spec.name);
    pass_worker_threads(&mut command);
    if let Some((id, token_file, anchors_file, identity_addr)) = spec.identity {
        command
            .env("MESH_PROXY_IDENTITY", id)
            .env("MESH_PROXY_IDENTITY_TOKEN_FILE", token_file)
            .env("MESH_PROXY_TRUST_ANCHORS_FILE", anchors_file)
            .env("MESH_PROXY_IDENTITY_ADDR", identity_addr);
    }
    let mut service = Service::spawn(spec.name, command, log_dir)?;
    service.wait_listening(admin, START).await?;
    wait_ready(&mut service, admin).await?;
    Ok((service, outbound, admin))
}

/// How many threads each proxy of the bench runs: mesh-proxy's `MESH_PROXY_WORKER_THREADS`
/// when set (`MESH_PROXY_WORKER_THREADS=2 just bench`), else its default, one. HAProxy runs as
/// many (`nbthread`): a proxy with a second thread can fill the second core while the first
/// waits, so the two are compared only at the same count.
pub fn proxy_threads() -> Result<usize> {
    parse_threads(std::env::var("MESH_PROXY_WORKER_THREADS").ok().as_deref())
}

fn parse_threads(value: Option<&str>) -> Result<usize> {
    let Some(value) = value else { return Ok(1) };
    value
        .parse()
        .ok()
        .filter(|threads| *threads > 0)
        .with_context(|| {
            format!("MESH_PROXY_WORKER_THREADS={value:?} is not a positive number of threads")
        })
}

/// Passes the bench's `MESH_PROXY_WORKER_THREADS` on to a proxy, to compare runtimes.
pub fn pass_worker_threads(command: &mut Command) {
    if let Ok(threads) = std::env::var("MESH_PROXY_WORKER_THREADS") {
        command.env("MESH_PROXY_WORKER_THREADS", threads);
    }
}

/// Starts the controller (with its identity CA) and both meshes (plaintext and mutual TLS);
/// returns the two topologies and where the control plane listens (scenario 6 reuses it).
pub async fn start_meshes(
    binaries: &Binaries,
    backend: Backend,
    ca: &Arc<TestCa>,
    dir: &Path,
    running: &mut Running,
) -> Result<(Vec<Topology>, crate::netns::ControlPlane)> {
    let plain_ip = Ipv4Addr::new(127, 0, 0, 2);
    let tls_ip = Ipv4Addr::new(127, 0, 0, 3);
    let plain_in = SocketAddr::new(IpAddr::V4(plain_ip), free_port(IpAddr::V4(plain_ip))?);
    let tls_in = SocketAddr::new(IpAddr::V4(tls_ip), free_port(IpAddr::V4(tls_ip))?);
    let pods = [
        MeshedPod {
            app: "web-plain".into(),
            ip: plain_ip,
            inbound_port: plain_in.port(),
            identity: false,
        },
        MeshedPod {
            app: "web-tls".into(),
            ip: tls_ip,
            inbound_port: tls_in.port(),
            identity: true,
        },
    ];
    let config_dir = dir.join("controller-config");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(
        config_dir.join("bench.yaml"),
        mesh_yaml(&pods, backend.http1.port(), backend.http2.port()),
    )?;
    let identity_dir = dir.join("identity");
    ca.write_issuer_dir(&identity_dir)?;
    let (controller, controller_url, _) = start_controller(
        &binaries.controller,
        &config_dir,
        Some(&identity_dir),
        dir,
        "mesh-controller",
        Duration::from_millis(250),
    )
    .await?;
    running.keep(controller)?;

    // Identities: the client runs as ServiceAccount `client`, the server as `web`; the
    // controller's Identity service certifies both.
    let (client_id, server_id) = (spiffe_id("client"), spiffe_id("web"));
    let identity_url = controller_url.clone();
    let anchors = dir.join("trust-anchors.pem");
    std::fs::write(&anchors, &ca.anchor_pem)?;
    let (client_token, web_token) = (dir.join("client.token"), dir.join("web.token"));
    std::fs::write(&client_token, CLIENT_TOKEN)?;
    std::fs::write(&web_token, WEB_TOKEN)?;

    let addr_of = |url: &str| -> Result<SocketAddr> {
        url.trim_start_matches("http://")
            .parse()
            .with_context(|| format!("an address in {url}"))
    };
    let control = crate::netns::ControlPlane {
        controller: addr_of(&controller_url)?,
        config_dir: config_dir.clone(),
        anchors: anchors.clone(),
        client: (client_token.clone(), client_id.clone()),
        server: (web_token.clone(), server_id.clone()),
    };
    let mut topologies = Vec::new();
    for (key, title, pod, inbound, tls) in [
        ("mesh", "mesh, plaintext", &pods[0], plain_in, false),
        ("mesh-mtls", "mesh, mutual TLS", &pods[1], tls_in, true),
    ] {
        let client_identity = tls.then_some((
            client_id.as_str(),
            client_token.as_path(),
            anchors.as_path(),
            identity_url.as_str(),
        ));
        let server_identity = tls.then_some((
            server_id.as_str(),
            web_token.as_path(),
            anchors.as_path(),
            identity_url.as_str(),
        ));
        // The client proxy's own inbound listener is unused; it gets a port of its own.
        let (client, outbound, client_admin) = start_proxy(
            &binaries.proxy,
            ProxySpec {
                name: &format!("{key}-client-proxy"),
                inbound: free_addr(LOCALHOST)?,
                controller: &controller_url,
                identity: client_identity,
            },
            dir,
        )
        .await?;
        let (server, _, server_admin) = start_proxy(
            &binaries.proxy,
            ProxySpec {
                name: &format!("{key}-server-proxy"),
                inbound,
                controller: &controller_url,
                identity: server_identity,
            },
            dir,
        )
        .await?;
        let http1 = Entry {
            addr: outbound,
            host: Some(service_host(&pod.app)),
            netns: None,
        };
        check_path(
            &http1,
            client_admin,
            server_admin,
            tls.then_some(&server_id),
        )
        .await
        .with_context(|| format!("checking the {title} path"))?;
        let client_pid = running.keep(client)?;
        let server_pid = running.keep(server)?;
        topologies.push(Topology {
            key: key.into(),
            title: title.into(),
            http1,
            http2: Some(Entry {
                addr: outbound,
                host: Some(format!("{}:80", service_host(&format!("{}-h2", pod.app)))),
                netns: None,
            }),
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
        });
    }
    Ok((topologies, control))
}

/// Sends a few requests through a mesh and checks, from both proxies' metrics, that they
/// took the meshed path: through the server proxy and, when `tls_peer` is set, over mutual
/// TLS with that peer identity.
async fn check_path(
    entry: &Entry,
    client_admin: SocketAddr,
    server_admin: SocketAddr,
    tls_peer: Option<&String>,
) -> Result<()> {
    let shape = crate::load::Shape {
        connections: 1,
        rate: None,
        duration: Duration::from_millis(200),
    };
    let measured = crate::load::drive(entry, shape).await?;
    if measured.ok == 0 || measured.errors > 0 {
        bail!("requests through the mesh failed: {measured:?}");
    }
    let (_, client) = http_get(client_admin, "/metrics").await?;
    let (_, server) = http_get(server_admin, "/metrics").await?;
    let has = |text: &str, labels: &[&str]| {
        text.lines()
            .any(|l| l.starts_with("request_total") && labels.iter().all(|x| l.contains(x)))
    };
    if !has(&server, &["direction=\"inbound\""]) {
        bail!("the server proxy counted no inbound request; its metrics:\n{server}");
    }
    if let Some(peer) = tls_peer {
        let server_id = format!("server_id=\"{peer}\"");
        if !has(&client, &["tls=\"true\"", &server_id]) {
            bail!("the client proxy counted no request over mutual TLS to {peer}:\n{client}");
        }
    }
    Ok(())
}

/// What the two HAProxy processes speak to each other, inside mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaproxyHop {
    /// One request at a time per connection, connections reused (`http-reuse always`).
    Http1,
    /// Requests multiplexed on shared connections, as between two mesh proxies.
    Http2,
}

impl HaproxyHop {
    /// The ALPN protocol both sides offer, which selects it.
    fn alpn(self) -> &'static str {
        match self {
            Self::Http1 => "http/1.1",
            Self::Http2 => "h2",
        }
    }

    /// The topology's key, which also names its files.
    fn key(self) -> &'static str {
        match self {
            Self::Http1 => "haproxy",
            Self::Http2 => "haproxy-h2",
        }
    }
}

/// HAProxy's two configurations: the client side (plain HTTP in, TLS 1.3 out with a client
/// certificate) and the server side (TLS 1.3 in, requiring a client certificate; plain HTTP
/// to nginx), speaking `protocol` between them. Both keep connections alive and reuse them, and
/// run `threads` threads, as many as each mesh-proxy runs (see [`proxy_threads`]).
/// `no strict-limits`: HAProxy reserves two descriptors per connection, more than the
/// open-files limit allows for 10,000 connections, though the client side needs one each.
pub fn haproxy_confs(
    dir: &Path,
    (front, hop, backend): (SocketAddr, SocketAddr, SocketAddr),
    protocol: HaproxyHop,
    maxconn: u64,
    threads: usize,
) -> (String, String) {
    let dir = dir.display();
    let key = protocol.key();
    let alpn = protocol.alpn();
    let common = format!(
        "global\n    nbthread {threads}\n    maxconn {maxconn}\n    no strict-limits\n    ssl-default-bind-options ssl-min-ver TLSv1.3\n\
         \x20   ssl-default-server-options ssl-min-ver TLSv1.3\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 600s\n    timeout server 600s\n\
         \x20   timeout http-keep-alive 600s\n    http-reuse always\n"
    );
    let client = format!(
        "{common}frontend outbound\n    bind {front}\n    default_backend hop\n\
         backend hop\n    server web {hop} ssl verify required ca-file {dir}/ca.pem crt {dir}/{key}-client.pem \
         sni str(web.bench) verifyhost web.bench alpn {alpn}\n"
    );
    let server = format!(
        "{common}frontend inbound\n    bind {hop} ssl crt {dir}/{key}-server.pem ca-file {dir}/ca.pem verify required alpn {alpn}\n\
         \x20   default_backend app\n\
         backend app\n    server nginx {backend}\n"
    );
    (client, server)
}

/// Starts two HAProxy processes speaking `protocol` to each other; returns the topology.
pub async fn start_haproxy(
    backend: Backend,
    protocol: HaproxyHop,
    ca: &TestCa,
    dir: &Path,
    running: &mut Running,
    (maxconn, threads): (u64, usize),
) -> Result<Topology> {
    let haproxy =
        find_program("haproxy").context("haproxy is not installed (scripts/bench-setup)")?;
    let hop_ip = Ipv4Addr::new(127, 0, 0, 4);
    let front = free_addr(LOCALHOST)?;
    let hop = SocketAddr::new(IpAddr::V4(hop_ip), free_port(IpAddr::V4(hop_ip))?);
    std::fs::write(dir.join("ca.pem"), &ca.anchor_pem)?;
    let key = protocol.key();
    let (client, server) = (format!("{key}-client"), format!("{key}-server"));
    for name in [&client, &server] {
        let leaf = ca.leaf("web.bench")?;
        std::fs::write(
            dir.join(format!("{name}.pem")),
            format!("{}{}", leaf.chain_pem, leaf.key_pem),
        )?;
    }
    let (client_conf, server_conf) =
        haproxy_confs(dir, (front, hop, backend.http1), protocol, maxconn, threads);
    let mut pids = Vec::new();
    for (name, conf, listen) in [(&server, server_conf, hop), (&client, client_conf, front)] {
        let path = dir.join(format!("{name}.cfg"));
        std::fs::write(&path, conf)?;
        let mut command = Command::new(&haproxy);
        command.arg("-db").arg("-f").arg(&path);
        let mut service = Service::spawn(name, command, dir)?;
        service.wait_listening(listen, START).await?;
        pids.push(running.keep(service)?);
    }
    Ok(Topology {
        key: key.into(),
        title: match protocol {
            HaproxyHop::Http1 => "HAProxy, mutual TLS".into(),
            HaproxyHop::Http2 => "HAProxy, mutual TLS, HTTP/2 hop".into(),
        },
        http1: Entry {
            addr: front,
            host: None,
            netns: None,
        },
        http2: None,
        watched: vec![
            Watched {
                role: "client proxy".into(),
                pid: pids[1],
            },
            Watched {
                role: "server proxy".into(),
                pid: pids[0],
            },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_threads_default_to_one_and_refuse_what_is_not_a_count() {
        assert_eq!(parse_threads(None).expect("default"), 1);
        assert_eq!(parse_threads(Some("2")).expect("two"), 2);
        for bad in ["0", "-1", "two", ""] {
            let error = parse_threads(Some(bad)).expect_err(bad).to_string();
            assert!(error.contains("MESH_PROXY_WORKER_THREADS"), "{error}");
        }
    }

    #[test]
    fn haproxy_runs_as_many_threads_as_the_mesh_proxy() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let (client, server) = haproxy_confs(
            Path::new("/tmp"),
            (addr, addr, addr),
            HaproxyHop::Http1,
            100,
            3,
        );
        for conf in [client, server] {
            assert!(conf.contains("\n    nbthread 3\n"), "{conf}");
        }
    }

    #[test]
    fn haproxy_pairs_offer_the_hop_protocol_on_both_sides() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("address");
        for (protocol, alpn, other) in [
            (HaproxyHop::Http1, "alpn http/1.1\n", "alpn h2"),
            (HaproxyHop::Http2, "alpn h2\n", "alpn http/1.1"),
        ] {
            let (client, server) =
                haproxy_confs(Path::new("/tmp"), (addr, addr, addr), protocol, 100, 1);
            for conf in [client, server] {
                assert!(conf.contains(alpn), "{protocol:?}: {conf}");
                assert!(!conf.contains(other), "{protocol:?}: {conf}");
                assert!(
                    conf.contains(&format!("/tmp/{}-", protocol.key())),
                    "{conf}"
                );
            }
        }
    }
}
