//! A local mesh (`meshctl local up`) for tests: Kubernetes YAML run as local pods with the
//! real controller and proxies, in a folder and an instance of its own, taken down on drop;
//! and the small helpers tests use to read it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::bin_path;

/// A local mesh in a folder of its own with an instance name of its own (tests run in
/// parallel); `down` on drop.
pub struct LocalMesh {
    /// Where `local up` keeps its state.
    pub state_dir: PathBuf,
    /// The instance name (prefixes the pods' network namespaces).
    pub instance: String,
    /// The folder of the test's YAML and state.
    pub dir: PathBuf,
}

impl LocalMesh {
    pub fn new(test: &str) -> LocalMesh {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("mesh-local-{test}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test folder");
        LocalMesh {
            state_dir: dir.join("state"),
            // Short: it prefixes every pod's namespace name.
            instance: format!("t{id}"),
            dir,
        }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write the test YAML");
        path
    }

    /// `meshctl local ARGS --state-dir ...` with the freshly built binaries.
    pub fn meshctl(&self, args: &[&str]) -> Output {
        let mut command = Command::new(bin_path("meshctl"));
        command
            .arg("local")
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env("MESHCTL_PROXY_BIN", bin_path("mesh-proxy"))
            .env("MESHCTL_CONTROLLER_BIN", bin_path("mesh-controller"));
        command
            .output()
            .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"))
    }

    /// `local up -f FILE` with this mesh's instance, any free controller ports and a bounded
    /// wait.
    pub fn up(&self, file: &Path, extra: &[&str]) -> Output {
        let file = file.to_str().expect("UTF-8 temp path");
        let mut args = vec![
            "up",
            "-f",
            file,
            "--instance",
            &self.instance,
            "--controller-port",
            "0",
            "--controller-admin-port",
            "0",
            "--timeout",
            "60s",
        ];
        args.extend_from_slice(extra);
        self.meshctl(&args)
    }

    pub fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state_dir.join("state.json"))
            .expect("state.json exists while the mesh is up");
        serde_json::from_str(&text).expect("state.json is JSON")
    }

    pub fn down(&self) -> Output {
        self.meshctl(&["down"])
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        if self.state_dir.exists() {
            let output = self.down();
            if !output.status.success() {
                eprintln!(
                    "cleanup: meshctl local down failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn text(output: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn assert_success(output: &Output, what: &str) {
    assert!(output.status.success(), "{what} failed:\n{}", text(output));
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `timeout` with
/// `explain()`.
pub fn wait_for<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    explain: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "gave up after {timeout:?}: {}",
            explain()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pod of a Deployment in `state.json`.
pub fn pod_of<'a>(state: &'a serde_json::Value, deployment: &str) -> &'a serde_json::Value {
    state["pods"]
        .as_array()
        .expect("pods is a list")
        .iter()
        .find(|pod| pod["workload"]["name"] == deployment)
        .unwrap_or_else(|| panic!("no pod of deployment {deployment} in {state:#}"))
}

/// The network namespace of a Deployment's pod (root mode).
pub fn netns_of(state: &serde_json::Value, deployment: &str) -> String {
    pod_of(state, deployment)["netns"]
        .as_str()
        .expect("root mode pods have a namespace")
        .to_owned()
}

/// Runs `argv` inside network namespace `netns`: its stdout, whatever the exit status.
pub fn in_pod(netns: &str, argv: &[&str]) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(argv)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {argv:?} in {netns}: {error}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `curl` from inside `netns`: the status line and headers (`--include`), then the body.
pub fn curl(netns: &str, args: &[&str]) -> String {
    let mut argv = vec!["curl", "--silent", "--include", "--max-time", "5"];
    argv.extend_from_slice(args);
    in_pod(netns, &argv)
}

/// A plain HTTP/1.0 GET (no chunking to undo): the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// The sum of a Prometheus counter's samples whose labels contain every one of `labels`.
pub fn counter(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
