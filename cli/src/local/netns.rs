//! Root mode's network: the router namespace with its bridge, a namespace per pod joined to
//! it by a veth pair, the pods' hosts files, and running code inside a namespace.
//!
//! The router namespace has no link to the host's namespace, and pods route everything to the
//! router, which routes nowhere: no packet of a local mesh can leave the machine. The host
//! reaches inside only through the loopback forwards of [`super::forward`].

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;

/// Where `ip netns exec` finds a namespace's own `/etc` files (bind-mounted over `/etc`).
const ETC_NETNS: &str = "/etc/netns";

/// Runs `work` on a fresh thread that has joined network namespace `netns`: sockets it
/// creates and processes it spawns live there. Our own threads stay where they are.
pub fn in_netns<T: Send>(
    netns: &str,
    work: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let path = Path::new("/run/netns").join(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path).map_err(|error| {
                    io::Error::new(error.kind(), format!("network namespace {netns}: {error}"))
                })?;
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| {
                    io::Error::other(format!("cannot enter network namespace {netns}: {errno}"))
                })?;
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("a namespace thread panicked")))
    })
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> io::Result<()> {
    let output = Command::new("ip").args(args).output().map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot run `ip`: {error} (install iproute2)"),
        )
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// Whether a network namespace of that name exists.
pub fn exists(netns: &str) -> bool {
    Path::new("/run/netns").join(netns).exists()
}

/// Creates the router namespace: loopback up, a bridge holding `gateway/prefix_len`, no
/// other link and no default route.
pub fn create_router(
    router: &str,
    bridge: &str,
    gateway: Ipv4Addr,
    prefix_len: u8,
) -> io::Result<()> {
    ip(&["netns", "add", router])?;
    ip(&["-n", router, "link", "set", "lo", "up"])?;
    ip(&["-n", router, "link", "add", bridge, "type", "bridge"])?;
    ip(&[
        "-n",
        router,
        "addr",
        "add",
        &format!("{gateway}/{prefix_len}"),
        "dev",
        bridge,
    ])?;
    ip(&["-n", router, "link", "set", bridge, "up"])
}

/// What a pod's namespace is made of.
#[derive(Debug)]
pub struct PodNetwork<'a> {
    pub router: &'a str,
    pub bridge: &'a str,
    pub netns: &'a str,
    /// The router's end of the veth pair (the pod's end is `eth0`).
    pub veth: &'a str,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// The pod's `/etc/hosts`.
    pub hosts: &'a str,
}

/// Creates a pod's namespace: loopback up, `eth0` on the bridge with the pod's IP, every
/// route via the router (so cluster IPs route and iptables can redirect them), and its hosts
/// file and a resolver that fails fast for names not in it.
pub fn create_pod(pod: &PodNetwork<'_>) -> io::Result<()> {
    let (router, netns) = (pod.router, pod.netns);
    ip(&["netns", "add", netns])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", router, "link", "add", pod.veth, "type", "veth", "peer", "name", "eth0", "netns",
        netns,
    ])?;
    ip(&["-n", router, "link", "set", pod.veth, "master", pod.bridge])?;
    ip(&["-n", router, "link", "set", pod.veth, "up"])?;
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{}/{}", pod.ip, pod.prefix_len),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        netns,
        "route",
        "add",
        "default",
        "via",
        &pod.gateway.to_string(),
    ])?;
    let etc = etc_dir(netns);
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("hosts"), pod.hosts)?;
    // Names not in the hosts file must not wait for a DNS server that cannot be reached:
    // nothing listens on the pod's own loopback, so a lookup fails at once.
    std::fs::write(
        etc.join("resolv.conf"),
        "# Written by meshctl local: service names are in /etc/hosts.\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )?;
    Ok(())
}

/// The folder `ip netns exec` bind-mounts over `/etc` files for `netns`.
pub fn etc_dir(netns: &str) -> PathBuf {
    Path::new(ETC_NETNS).join(netns)
}

/// Deletes a namespace (and with it its links, addresses and iptables rules) and its `/etc`
/// files. Absent ones are fine: `down` may run twice.
pub fn delete(netns: &str) -> io::Result<()> {
    if exists(netns) {
        ip(&["netns", "del", netns])?;
    }
    match std::fs::remove_dir_all(etc_dir(netns)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// The pids of every process inside a namespace (`ip netns pids`).
pub fn pids(netns: &str) -> Vec<u32> {
    if !exists(netns) {
        return Vec::new();
    }
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
