//! A mesh of real processes on loopback, without namespaces or Kubernetes: `mesh-controller`
//! with its file backend and an identity folder, `mesh-proxy` processes on a test's own
//! `127.X.<block>.<host>` addresses (inbound 4143, outbound 4140, admin 4191), and traffic
//! loops that count every failed request. Tests start, kill and restart each process when
//! they please, which is what fault scenarios need.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::bin_path;
use crate::http::{PATIENCE, ProxyClient, loopback_ip, wait_ready};
use crate::process::Process;

/// The folders a mesh of processes keeps its files in, removed on drop: the controller's
/// config folder (the file backend's YAML), its identity folder, the anchors file the proxies
/// trust, one token file per ServiceAccount and one identity-cache folder per proxy.
pub struct Folders {
    /// Everything lives under here.
    pub root: PathBuf,
}

impl Folders {
    /// Fresh folders for test `name`, with token files for `accounts` (`<account>-token`).
    pub fn new(name: &str, accounts: &[&str]) -> Folders {
        let root = std::env::temp_dir().join(format!("mesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("config")).expect("create the config folder");
        for account in accounts {
            std::fs::write(
                root.join(format!("{account}.token")),
                format!("{account}-token"),
            )
            .expect("write a token");
        }
        Folders { root }
    }

    /// The controller's identity folder (cert-manager's layout).
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }

    /// The trust anchors every proxy reads.
    pub fn anchors(&self) -> PathBuf {
        self.root.join("anchors.pem")
    }

    /// The controller's config folder.
    pub fn config(&self) -> PathBuf {
        self.root.join("config")
    }

    /// The identity-cache folder of the proxy on `host` (made on first use).
    pub fn identity_cache(&self, host: u8) -> PathBuf {
        let dir = self.root.join(format!("identity-cache-{host}"));
        std::fs::create_dir_all(&dir).expect("create an identity cache folder");
        dir
    }

    /// Rewrites `config/<file>` atomically, as an editor or `kubectl` would.
    pub fn write_config(&self, file: &str, yaml: &str) {
        let tmp = self.root.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("write a temp file");
        std::fs::rename(&tmp, self.config().join(file)).expect("rename into place");
    }
}

impl Drop for Folders {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The address `host:port` in test block `block`.
pub fn addr(block: u8, host: u8, port: u16) -> SocketAddr {
    SocketAddr::new(loopback_ip(block, host), port)
}

/// `mesh-controller` on host 1 of `block` (gRPC 8086, admin 9990) over `folders`, with
/// `extra` flags; waits until it is ready.
pub async fn controller(folders: &Folders, block: u8, extra: &[&str]) -> Process {
    let process = Process(
        Command::new(bin_path("mesh-controller"))
            .args(["--discovery", "file", "--poll-interval-ms", "50"])
            .arg("--config-dir")
            .arg(folders.config())
            .arg("--identity-dir")
            .arg(folders.identity())
            .args(["--grpc-listen", &addr(block, 1, 8086).to_string()])
            .args(["--admin-listen", &addr(block, 1, 9990).to_string()])
            .args(["--log-level", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start mesh-controller"),
    );
    wait_ready(addr(block, 1, 9990)).await;
    process
}

/// How to start one proxy.
pub struct ProxySpec<'a> {
    /// The test's block.
    pub block: u8,
    /// The proxy's host in the block (its pod's IP).
    pub host: u8,
    /// The ServiceAccount it proves (`spiffe://cluster.local/ns/shop/sa/<account>`).
    pub account: &'a str,
    /// Keep its identity across restarts in `folders.identity_cache(host)`.
    pub identity_cache: bool,
    /// More `MESH_PROXY_*` settings.
    pub env: &'a [(&'a str, &'a str)],
}

/// `mesh-proxy` as `spec` says, its controller on host 1 of the block; does not wait.
pub fn proxy(folders: &Folders, spec: &ProxySpec<'_>) -> Process {
    let ip = loopback_ip(spec.block, spec.host);
    let mut command = Command::new(bin_path("mesh-proxy"));
    command
        .env(
            "MESH_PROXY_CONTROLLER_ADDR",
            format!("http://{}", addr(spec.block, 1, 8086)),
        )
        .env("MESH_PROXY_INBOUND_LISTEN", format!("{ip}:4143"))
        .env("MESH_PROXY_INBOUND_APP_IP", ip.to_string())
        .env("MESH_PROXY_OUTBOUND_LISTEN", format!("{ip}:4140"))
        .env("MESH_PROXY_ADMIN_LISTEN", format!("{ip}:4191"))
        .env("MESH_PROXY_NAMESPACE", "shop")
        .env("MESH_PROXY_POD", format!("{}-{}", spec.account, spec.host))
        .env(
            "MESH_PROXY_IDENTITY",
            format!("spiffe://cluster.local/ns/shop/sa/{}", spec.account),
        )
        .env(
            "MESH_PROXY_IDENTITY_TOKEN_FILE",
            folders.root.join(format!("{}.token", spec.account)),
        )
        .env("MESH_PROXY_TRUST_ANCHORS_FILE", folders.anchors())
        .env("MESH_PROXY_LOG_LEVEL", "warn")
        .stdin(Stdio::null());
    if spec.identity_cache {
        command.env(
            "MESH_PROXY_IDENTITY_CACHE_DIR",
            folders.identity_cache(spec.host),
        );
    }
    for (name, value) in spec.env {
        command.env(name, value);
    }
    Process(command.spawn().expect("start mesh-proxy"))
}

/// Sends `signal` (`TERM`, `KILL`, ...) to `process`.
pub fn signal(process: &Process, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &process.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}

/// Waits (bounded) for `process` to exit.
pub async fn exited(process: &mut Process, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if process
            .0
            .try_wait()
            .expect("wait for the process")
            .is_some()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the process did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one client's traffic saw: answers per backend, and failures.
#[derive(Default, Debug, Clone)]
pub struct Tally {
    /// Successful answers by the backend that gave them.
    pub by_backend: HashMap<String, u64>,
    /// Every failed request: its number and status.
    pub failures: Vec<String>,
}

impl Tally {
    /// Successful answers so far.
    pub fn successes(&self) -> u64 {
        self.by_backend.values().sum()
    }
}

/// A traffic loop: GETs `authority` through the outbound listener at `proxy`, one request
/// every 2 ms on one keep-alive connection, until stopped (bounded: 30,000 requests or
/// 90 s).
pub struct Traffic {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// Starts the loop.
    pub fn start(proxy: SocketAddr, authority: &str) -> Traffic {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = tally.clone();
        let stopped = stop.clone();
        let authority = authority.to_owned();
        let task = tokio::spawn(async move {
            let mut client = ProxyClient::connect(proxy, &authority).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            for i in 0..30_000 {
                if stopped.load(Ordering::SeqCst) || tokio::time::Instant::now() > deadline {
                    break;
                }
                let (status, backend) = client.get("/", &[]).await;
                let mut tally = shared.lock().await;
                if status == 200 {
                    *tally.by_backend.entry(backend).or_default() += 1;
                } else {
                    tally.failures.push(format!("request {i}: status {status}"));
                }
                drop(tally);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Traffic { tally, stop, task }
    }

    /// What the loop saw so far.
    pub async fn tally(&self) -> Tally {
        self.tally.lock().await.clone()
    }

    /// Waits (bounded) until `done` holds for the tally; panics with `what` otherwise.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&Tally) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let tally = self.tally().await;
            if done(&tally) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} never happened: {tally:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for `count` more successful answers than now.
    pub async fn wait_for_more(&self, what: &str, count: u64) {
        let now = self.tally().await.successes();
        self.wait_for(what, |tally| tally.successes() >= now + count)
            .await;
    }

    /// Stops the loop and returns what it saw.
    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.tally.lock().await.clone()
    }
}

/// Writes the trust-anchor bundle the proxies read.
pub fn write_anchors(path: &Path, bundle: &str) {
    std::fs::write(path, bundle).expect("write the anchors file");
}
