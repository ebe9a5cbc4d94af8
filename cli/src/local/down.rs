//! `meshctl local down`: stops the supervisor, then every process of the local mesh (from
//! `state.json`, from the namespaces, and any process marked with the instance), deletes the
//! namespaces (their links and iptables rules go with them) and hosts files, and removes the
//! state folder. Idempotent, and needs nothing from a supervisor that may have died.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::netns;
use super::plan::Plan;
use super::state::{self, ProcessRef};
use super::{process, supervisor};

/// How long processes get to exit on SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// How long the supervisor gets to stop everything (apps, then the mesh, each with a grace
/// period of its own) before it is killed.
const SUPERVISOR_STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub fn run(state_dir: &Path) -> anyhow::Result<()> {
    if !state_dir.exists() {
        eprintln!(
            "meshctl local: no local mesh in {} (nothing to do)",
            state_dir.display()
        );
        return Ok(());
    }
    run_quiet(state_dir)?;
    eprintln!("meshctl local: down ({} removed)", state_dir.display());
    Ok(())
}

/// `down` without the final message: also what a failed `up` cleans up with.
pub fn run_quiet(state_dir: &Path) -> anyhow::Result<()> {
    if !state_dir.exists() {
        return Ok(());
    }
    let plan: Option<Plan> = state::read_json(&state::plan_file(state_dir)).ok();
    let saved = state::read_state(state_dir).ok();
    if plan.is_none() && saved.is_none() {
        bail!(
            "{} holds no plan.json or state.json: not a local mesh's state folder, left alone",
            state_dir.display()
        );
    }

    // The supervisor first, so it restarts nothing while the rest stops. Asked politely, it
    // stops (and reaps) everything it started; a supervisor that does not answer is killed,
    // and whatever it started is stopped below.
    if let Some(supervisor) = saved.as_ref().and_then(|s| s.supervisor)
        && supervisor.is_alive()
    {
        let _ = std::fs::write(supervisor::stop_request_file(state_dir), b"down\n");
        let deadline = Instant::now() + SUPERVISOR_STOP_TIMEOUT;
        while supervisor.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        process::stop_all(&[supervisor], Duration::from_secs(2));
    }

    let mut namespaces: Vec<String> = Vec::new();
    if let Some(plan) = &plan {
        namespaces.extend(plan.pods.iter().filter_map(|p| p.netns.clone()));
        namespaces.extend(plan.network.router_netns.clone());
    } else if let Some(saved) = &saved {
        namespaces.extend(saved.pods.iter().filter_map(|p| p.netns.clone()));
        namespaces.extend(saved.router_netns.clone());
    }

    let mut processes: BTreeSet<(u32, u64)> = BTreeSet::new();
    let mut add = |process: ProcessRef| {
        processes.insert((process.pid, process.start_time));
    };
    if let Some(saved) = &saved {
        saved.controller.process.into_iter().for_each(&mut add);
        for pod in &saved.pods {
            pod.containers
                .iter()
                .filter_map(|c| c.process)
                .for_each(&mut add);
        }
    }
    process::processes_of_instance(state_dir)
        .into_iter()
        .for_each(&mut add);
    for name in &namespaces {
        netns::pids(name)
            .into_iter()
            .filter_map(ProcessRef::of)
            .for_each(&mut add);
    }
    let processes: Vec<ProcessRef> = processes
        .into_iter()
        .map(|(pid, start_time)| ProcessRef { pid, start_time })
        .collect();
    let survivors = process::stop_all(&processes, GRACE);
    if !survivors.is_empty() {
        let pids: Vec<String> = survivors.iter().map(|p| p.pid.to_string()).collect();
        bail!(
            "processes {} survived SIGKILL; the namespaces and {} are left for another `down`",
            pids.join(", "),
            state_dir.display()
        );
    }

    let mut errors = Vec::new();
    // Pods before the router: deleting a pod's namespace removes its veth from the bridge.
    for name in &namespaces {
        if let Err(error) = netns::delete(name) {
            errors.push(format!("{name}: {error}"));
        }
    }
    if !errors.is_empty() {
        bail!("cannot delete namespaces: {}", errors.join("; "));
    }
    std::fs::remove_dir_all(state_dir)
        .with_context(|| format!("removing {}", state_dir.display()))?;
    Ok(())
}
