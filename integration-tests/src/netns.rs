//! Network namespaces as throwaway "pods" for tests that need root: capture rules, routes and
//! listeners that must not touch the host.
//!
//! A fresh namespace has only a loopback interface and no route to the host's network, so
//! nothing a test does inside can leave the machine. Every namespace and process made here is
//! removed on drop, also when the test fails.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::hash::BuildHasher;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Returns whether the test may create namespaces (runs as root). When not, says so loudly;
/// under `CI=true` it panics, because CI must never pass a namespace test that did not run.
/// Use as: `if !require_root("test name") { return; }`.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let message = format!(
        "\n!!!!!!!!\n!!! {test}: NOT RUN: needs root (network namespaces, iptables).\n\
         !!! Run as root, e.g. `sudo -E cargo test -p mesh-integration-tests`.\n!!!!!!!!\n"
    );
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{message}(CI=true: a test that cannot run fails)");
    }
    eprintln!("{message}");
    false
}

/// Root is uid 0; the uid comes from `id -u` so this crate needs no unsafe `getuid`.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.status.success() && output.stdout.trim_ascii() == b"0")
}

/// Prefix of every namespace made here: `mesh-t-<creator pid>-<random>`.
const NAME_PREFIX: &str = "mesh-t-";

/// A network namespace `mesh-t-<pid>-<random>` with its loopback up, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace. Panics when it cannot (tests cannot go on without it).
    pub fn new() -> NetNs {
        remove_orphans();
        let netns = NetNs {
            name: format!("{NAME_PREFIX}{}-{}", std::process::id(), unique_suffix()),
        };
        run_checked(Command::new("ip").args(["netns", "add", &netns.name]));
        netns.run(["ip", "link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `argv` inside the namespace and returns its stdout; panics, with its stderr, when
    /// it fails.
    pub fn run<I, S>(&self, argv: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv = argv.into_iter();
        let program = argv.next().expect("a command has a program");
        let output = run_checked(self.command(program).args(argv));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts `argv` inside the namespace with its stdout piped; the process is killed when
    /// the returned guard drops.
    pub fn spawn<I, S>(&self, argv: I) -> ChildGuard
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        spawn_in(&self.name, argv)
    }

    /// Joins this namespace and `peer` with a veth pair, giving this end `address` and the
    /// peer's end `peer_address` (CIDRs of one subnet, e.g. `10.77.0.1/24`).
    pub fn link(&self, peer: &NetNs, address: &str, peer_address: &str) {
        // Interface names hold at most 15 bytes.
        let suffix = unique_suffix();
        let (here, there) = (format!("vm{suffix}a"), format!("vm{suffix}b"));
        run_checked(Command::new("ip").args([
            "link", "add", &here, "netns", &self.name, "type", "veth", "peer", "name", &there,
            "netns", &peer.name,
        ]));
        for (netns, interface, address) in [(self, &here, address), (peer, &there, peer_address)] {
            netns.run(["ip", "addr", "add", address, "dev", interface]);
            netns.run(["ip", "link", "set", interface, "up"]);
        }
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Also removes the veth pairs; processes still inside are the ChildGuards' to kill.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "netns: cannot delete {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!("netns: cannot delete {}: {error}", self.name),
        }
    }
}

/// Starts `argv` inside the existing namespace `netns` (one made elsewhere, e.g. a local
/// mesh's) with its stdout piped; the process is killed when the returned guard drops.
pub fn spawn_in<I, S>(netns: &str, argv: I) -> ChildGuard
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", netns])
        .args(argv)
        .stdout(Stdio::piped());
    let child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    ChildGuard { child }
}

/// A child process, killed and reaped on drop. Declare it after the namespace it runs in so it
/// drops first.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Reads the next line of the child's stdout (without the newline); panics at end of output.
    pub fn read_line(&mut self) -> String {
        let stdout: &mut ChildStdout = self
            .child
            .stdout
            .as_mut()
            .expect("spawned with stdout piped");
        // One byte at a time so no output past the line is swallowed by a buffer.
        let mut line = Vec::new();
        let mut reader = BufReader::with_capacity(1, stdout);
        let read = reader
            .read_until(b'\n', &mut line)
            .expect("read the child's stdout");
        assert!(read > 0, "the child ended without a line of output");
        String::from_utf8_lossy(&line).trim_end().to_owned()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes the namespaces of test processes that are gone. A test killed by its timeout
/// (nextest sends SIGTERM, then SIGKILL) runs no `Drop`, so its namespace outlives it; the
/// creator's pid in the name tells an orphan from a namespace still in use.
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
        if std::path::Path::new(&format!("/proc/{creator}")).exists() {
            continue;
        }
        eprintln!("netns: deleting {name}, left behind by process {creator}");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
}

/// Runs a command and panics with its stderr when it fails.
fn run_checked(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    output
}

/// Eight hex digits, different for every call in this process and (with overwhelming
/// likelihood) across the processes of parallel test runs.
fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded randomly per process; hashing the counter spreads it.
    let random = RandomState::new().hash_one((count, std::process::id()));
    format!("{:08x}", random as u32)
}
