//! The state folder of a local mesh and `state.json`, the one file other commands read
//! (`meshctl local status/logs/down`, and `meshctl stat`/`dashboard` to find the controller's
//! and the proxies' admin addresses).
//!
//! Layout of the state folder:
//! ```text
//! plan.json            what `up` planned (the supervisor's input)
//! state.json           what runs now (written by the supervisor, atomically)
//! supervisor.log       the supervisor's own log
//! controller/          the controller's folder of YAML (`--discovery file`)
//! logs/controller.log  the controller's output
//! logs/<ns>/<pod>/<container>.log
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plan::{Mode, Role, WorkloadRef};

/// The version of the `state.json` format; bumped on incompatible changes.
pub const STATE_VERSION: u32 = 1;

/// The environment variable naming the state folder, for every `meshctl local` command.
pub const STATE_DIR_ENV: &str = "MESH_LOCAL_STATE_DIR";

/// The default state folder: `/run/mesh-local` as root, else `$XDG_RUNTIME_DIR/mesh-local`
/// (or `/tmp/mesh-local-<uid>` without one).
pub fn default_state_dir() -> PathBuf {
    if super::process::is_root() {
        return PathBuf::from("/run/mesh-local");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("mesh-local"),
        _ => PathBuf::from(format!(
            "/tmp/mesh-local-{}",
            super::process::effective_uid()
        )),
    }
}

/// A process started by the local mesh. The start time (clock ticks since boot, from
/// `/proc/PID/stat`) tells it apart from a later process that reuses the pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub start_time: u64,
}

/// An address as seen from inside the mesh and from this machine's loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// What pods (and the controller) dial.
    pub in_mesh: SocketAddr,
    /// What this machine dials: a loopback forward in root mode, the same address in
    /// loopback mode. `None` until the forward listens.
    pub from_host: Option<SocketAddr>,
}

/// The whole `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub instance: String,
    pub mode: Mode,
    pub state_dir: PathBuf,
    /// The supervisor keeping it running.
    pub supervisor: Option<ProcessRef>,
    /// Milliseconds since the Unix epoch of the last write.
    pub updated_unix_ms: u64,
    /// Root mode: the router namespace (bridge and controller).
    pub router_netns: Option<String>,
    pub controller: ControllerState,
    pub pods: Vec<PodState>,
    pub services: Vec<ServiceState>,
    /// Set when the supervisor gave up (e.g. it could not create the network).
    pub fatal: Option<String>,
}

/// The controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerState {
    pub process: Option<ProcessRef>,
    pub restarts: u32,
    pub ready: bool,
    pub grpc: Endpoint,
    pub admin: Endpoint,
    pub log: PathBuf,
}

/// A Service and its cluster IP.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceState {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<String>,
    pub ports: Vec<u16>,
}

/// Where a pod is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// One pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub netns: Option<String>,
    pub workload: WorkloadRef,
    pub meshed: bool,
    pub phase: PodPhase,
    pub ready: bool,
    /// Restarts of all its containers.
    pub restarts: u32,
    /// The proxy's admin server (`/metrics`, `/ready`), when meshed.
    pub proxy_admin: Option<Endpoint>,
    pub containers: Vec<ContainerState>,
}

/// What a container is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ContainerStatus {
    /// Not running: not started yet, waiting for a restart, or unable to start.
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        since_unix_ms: u64,
    },
    Terminated {
        exit_code: i32,
        reason: String,
    },
}

/// One container of a pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    pub name: String,
    pub role: Role,
    pub init: bool,
    #[serde(flatten)]
    pub status: ContainerStatus,
    pub ready: bool,
    pub restarts: u32,
    pub process: Option<ProcessRef>,
    pub log: PathBuf,
}

/// Why the state folder cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no local mesh in {0} (no state.json); start one with `meshctl local up -f FILE`")]
    Missing(PathBuf),
    #[error("{path}: {message}")]
    Unreadable { path: PathBuf, message: String },
}

/// Path of `state.json` in a state folder.
pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("state.json")
}

/// Path of `plan.json` in a state folder.
pub fn plan_file(state_dir: &Path) -> PathBuf {
    state_dir.join("plan.json")
}

/// Reads `state.json`.
pub fn read_state(state_dir: &Path) -> Result<State, StateError> {
    read_json(&state_file(state_dir))
}

/// Reads a JSON file of the state folder.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(StateError::Missing(
                path.parent().unwrap_or(path).to_path_buf(),
            ));
        }
        Err(error) => {
            return Err(StateError::Unreadable {
                path: path.to_owned(),
                message: error.to_string(),
            });
        }
    };
    serde_json::from_str(&text).map_err(|error| StateError::Unreadable {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

/// Writes a file atomically: to a hidden temporary name, then renamed into place, so readers
/// (and the controller's folder scanner) never see half a file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, &text)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
