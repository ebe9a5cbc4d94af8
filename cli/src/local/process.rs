//! Processes of the local mesh: who we are (root or not), telling a process we started from a
//! later one that reuses its pid, finding programs on a `PATH`, and stopping process groups.
//!
//! Every process the runtime starts leads a process group of its own (so a shell and its
//! children stop together) and carries [`INSTANCE_ENV`] naming the state folder, so `down`
//! finds them all even when `state.json` missed one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::state::ProcessRef;

/// Set on every process a local mesh starts: its state folder.
pub const INSTANCE_ENV: &str = "MESH_LOCAL_INSTANCE";

/// The effective uid, from `/proc/self/status` (no unsafe `geteuid` here).
pub fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|euid| euid.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// Whether we run as root.
pub fn is_root() -> bool {
    effective_uid() == 0
}

impl ProcessRef {
    /// The running process `pid`, if it exists.
    pub fn of(pid: u32) -> Option<ProcessRef> {
        start_time(pid).map(|start_time| ProcessRef { pid, start_time })
    }

    /// Whether this very process still runs (not a zombie, not a newer one with its pid).
    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    fn pid(&self) -> Option<Pid> {
        i32::try_from(self.pid).ok().map(Pid::from_raw)
    }

    /// Sends `signal` to the process's group (it leads one), or to it alone when the group
    /// is gone. Does nothing when it no longer runs.
    pub fn signal_group(&self, signal: Signal) {
        if !self.is_alive() {
            return;
        }
        if let Some(pid) = self.pid()
            && killpg(pid, signal).is_err()
        {
            let _ = kill(pid, signal);
        }
    }

    /// Sends `signal` to the process alone.
    pub fn signal(&self, signal: Signal) {
        if self.is_alive()
            && let Some(pid) = self.pid()
        {
            let _ = kill(pid, signal);
        }
    }
}

/// Sends `signal` to the process group led by `pid` (a child we started, so its pid cannot
/// have been reused while we have not reaped it).
pub fn signal_group_of(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_name = &stat[stat.rfind(')')? + 1..];
            after_name.split_whitespace().next().map(|s| s == "Z")
        })
        .unwrap_or(false)
}

/// Stops processes: SIGTERM to each group, then SIGKILL to whatever still runs after
/// `grace`. Returns the ones that survived even that (should be none).
pub fn stop_all(processes: &[ProcessRef], grace: Duration) -> Vec<ProcessRef> {
    for process in processes {
        process.signal_group(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && processes.iter().any(ProcessRef::is_alive) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for process in processes.iter().filter(|p| p.is_alive()) {
        process.signal_group(Signal::SIGKILL);
        process.signal(Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && processes.iter().any(ProcessRef::is_alive) {
        std::thread::sleep(Duration::from_millis(20));
    }
    processes
        .iter()
        .copied()
        .filter(ProcessRef::is_alive)
        .collect()
}

/// Every running process whose environment has `INSTANCE_ENV=<state_dir>`.
pub fn processes_of_instance(state_dir: &Path) -> Vec<ProcessRef> {
    let marker = format!("{INSTANCE_ENV}={}", state_dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|byte| *byte == 0)
                    .any(|var| var == marker.as_bytes())
            })
        })
        .filter_map(ProcessRef::of)
        .collect()
}

/// The program a container's `argv[0]` names: a path as given, or the first executable of
/// that name on `path` (the container's `PATH`, or ours).
pub fn find_program(program: &str, path: Option<&str>) -> Option<PathBuf> {
    if program.contains('/') {
        let candidate = PathBuf::from(program);
        return is_executable(&candidate).then_some(candidate);
    }
    let path = path
        .map(str::to_owned)
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessRef::of(std::process::id()).expect("we run");
        assert!(me.is_alive());
        let impostor = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.is_alive());
    }

    #[test]
    fn programs_are_found_on_the_path_given() {
        assert!(find_program("sh", Some("/usr/bin:/bin")).is_some());
        assert!(find_program("no-such-program-here", Some("/usr/bin:/bin")).is_none());
        assert!(find_program("/bin/sh", None).is_some());
        assert!(find_program("/no/such/file", None).is_none());
    }
}
