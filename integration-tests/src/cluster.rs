//! A Kubernetes API server for the tests that need one: the cluster of `KUBECONFIG` when set,
//! else a throwaway one (etcd + kube-apiserver + kube-controller-manager, no kubelet) started
//! by `scripts/k8s-test-cluster` on free loopback ports and stopped on drop.
//!
//! When no cluster can be had, a test fails under `CI=true` (it must never pass unseen) and
//! skips loudly otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A cluster to test against.
#[derive(Debug)]
pub struct Cluster {
    /// Its kubeconfig.
    pub kubeconfig: PathBuf,
    /// The state folder, when this process started the cluster (and may restart it).
    started: Option<PathBuf>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/k8s-test-cluster")
}

fn free_port() -> Option<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    Some(listener.local_addr().ok()?.port())
}

impl Cluster {
    /// A cluster for the test named `test`, or None (after saying so loudly) when none can be
    /// had outside CI.
    pub fn get(test: &str) -> Option<Cluster> {
        if let Some(kubeconfig) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
            eprintln!("{test}: using the cluster of KUBECONFIG={kubeconfig:?}");
            return Some(Cluster {
                kubeconfig: PathBuf::from(kubeconfig),
                started: None,
            });
        }
        Self::start(test)
    }

    /// A throwaway cluster of this test's own, even when `KUBECONFIG` names one: for tests
    /// that need two clusters. None (after saying so loudly) when none can be had outside CI.
    pub fn start(test: &str) -> Option<Cluster> {
        let state = std::env::temp_dir().join(format!("mesh-k8s-{test}-{}", std::process::id()));
        let (Some(api), Some(etcd), Some(peer)) = (free_port(), free_port(), free_port()) else {
            return unavailable(test, "no free loopback ports");
        };
        let output = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&state)
            .env("API_PORT", api.to_string())
            .env("ETCD_PORT", etcd.to_string())
            .env("ETCD_PEER", peer.to_string())
            .output();
        let cluster = Cluster {
            kubeconfig: state.join("kubeconfig"),
            started: Some(state),
        };
        match output {
            Ok(out) if out.status.success() => Some(cluster),
            Ok(out) => unavailable(
                test,
                &format!(
                    "scripts/k8s-test-cluster start failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => unavailable(test, &format!("cannot run scripts/k8s-test-cluster: {e}")),
        }
    }

    /// Restarts the API server (same flags, same etcd); false when this process did not
    /// start the cluster.
    pub fn restart_apiserver(&self) -> bool {
        let Some(state) = &self.started else {
            return false;
        };
        let status = Command::new("bash")
            .arg(script())
            .arg("restart-apiserver")
            .arg(state)
            .status()
            .expect("run scripts/k8s-test-cluster restart-apiserver");
        assert!(status.success(), "the API server restarts: {status}");
        true
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(state) = &self.started {
            let _ = Command::new("bash")
                .arg(script())
                .arg("stop")
                .arg(state)
                .status();
            let _ = std::fs::remove_dir_all(state);
        }
    }
}

fn unavailable(test: &str, reason: &str) -> Option<Cluster> {
    let banner = "!".repeat(78);
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "\n{banner}\n{test}: CI=true and no Kubernetes API server could be started, so \
             this test FAILS rather than pass unseen.\n{reason}\n{banner}"
        );
    }
    eprintln!(
        "\n{banner}\nSKIPPED {test}: no Kubernetes API server.\n{reason}\n\
         Set KUBECONFIG or make scripts/k8s-test-cluster work (in CI this test fails).\n{banner}"
    );
    None
}
