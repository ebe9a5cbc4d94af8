//! `meshctl local status` and `meshctl local logs`: read-only views of `state.json` and the
//! log files, also used by `up` to report.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::bail;

use super::plan::Role;
use super::state::{self, ContainerStatus, PodState, State};

pub fn status(state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let state = state::read_state(state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    let supervisor_alive = state.supervisor.is_some_and(|s| s.is_alive());
    if !supervisor_alive {
        eprintln!(
            "meshctl local: the supervisor is not running: this is the last state it wrote; `meshctl local down` cleans up"
        );
    }
    print_summary(&state);
    Ok(())
}

/// The mode, the controller's addresses and the pods' table.
pub fn print_summary(state: &State) {
    println!("mode: {} ({})", state.mode.name(), state.mode.describe());
    let from_host = |endpoint: &state::Endpoint| {
        endpoint
            .from_host
            .map_or_else(|| "-".to_owned(), |a| a.to_string())
    };
    println!(
        "controller: grpc {} admin {} (in the mesh: {}){}",
        from_host(&state.controller.grpc),
        from_host(&state.controller.admin),
        state.controller.grpc.in_mesh,
        if state.controller.ready {
            ""
        } else {
            " NOT READY"
        }
    );
    print!("{}", pods_table(state));
}

/// The table of pods: namespace, name, IP, ready containers, status, restarts, mode.
pub fn pods_table(state: &State) -> String {
    let mode = state.mode.name();
    let mut rows = vec![[
        "NAMESPACE".to_owned(),
        "NAME".to_owned(),
        "IP".to_owned(),
        "READY".to_owned(),
        "STATUS".to_owned(),
        "RESTARTS".to_owned(),
        "MESHED".to_owned(),
        "ADMIN".to_owned(),
        "MODE".to_owned(),
    ]];
    for pod in &state.pods {
        let regular: Vec<_> = pod
            .containers
            .iter()
            .filter(|c| !c.init || c.role == Role::Proxy)
            .collect();
        let ready = regular.iter().filter(|c| c.ready).count();
        rows.push([
            pod.namespace.clone(),
            pod.name.clone(),
            pod.ip.clone(),
            format!("{ready}/{}", regular.len()),
            pod_status(pod),
            pod.restarts.to_string(),
            if pod.meshed { "yes" } else { "no" }.to_owned(),
            pod.proxy_admin
                .and_then(|a| a.from_host)
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
            mode.to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|row| row[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// Like `kubectl get pods`' STATUS: the phase, or the reason a container waits.
fn pod_status(pod: &PodState) -> String {
    for container in &pod.containers {
        if let ContainerStatus::Waiting { reason, .. } = &container.status
            && matches!(reason.as_str(), "StartError" | "CrashLoopBackOff")
        {
            return reason.clone();
        }
    }
    format!("{:?}", pod.phase)
}

/// Every container log of a pod, with headers, for error reports.
pub fn pod_logs_text(pod: &PodState) -> String {
    let mut out = String::new();
    for container in &pod.containers {
        let _ = writeln!(
            out,
            "==> pod {}/{} container {} ({}) <==\n{}",
            pod.namespace,
            pod.name,
            container.name,
            container.log.display(),
            super::up::tail_file(&container.log)
        );
    }
    out
}

/// A pod by name, or `deploy/NAME` for the first pod of a Deployment; the error lists the
/// pods there are.
pub fn find_pod<'a>(state: &'a State, namespace: &str, pod: &str) -> anyhow::Result<&'a PodState> {
    let found = match pod
        .strip_prefix("deploy/")
        .or_else(|| pod.strip_prefix("deployment/"))
    {
        Some(deployment) => state.pods.iter().find(|p| {
            p.namespace == namespace
                && p.workload.kind == "deployment"
                && p.workload.name == deployment
        }),
        None => state
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == pod),
    };
    let Some(found) = found else {
        let names: Vec<String> = state
            .pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        bail!(
            "no pod {pod} in namespace {namespace} of the local mesh; pods: {}",
            names.join(", ")
        );
    };
    Ok(found)
}

pub fn logs(
    state_dir: &Path,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
) -> anyhow::Result<()> {
    let state = state::read_state(state_dir)?;
    let found = find_pod(&state, namespace, pod)?;
    let chosen = match container {
        Some(name) => found.containers.iter().find(|c| c.name == name),
        None => {
            let apps: Vec<_> = found
                .containers
                .iter()
                .filter(|c| c.role == Role::App && !c.init)
                .collect();
            match apps.as_slice() {
                [only] => Some(*only),
                _ => None,
            }
        }
    };
    let Some(chosen) = chosen else {
        let names: Vec<&str> = found.containers.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "pod {}/{}: choose a container with -c: {}",
            found.namespace,
            found.name,
            names.join(", ")
        );
    };
    match std::fs::read_to_string(&chosen.log) {
        Ok(text) => print!("{text}"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => bail!("{}: {error}", chosen.log.display()),
    }
    Ok(())
}
