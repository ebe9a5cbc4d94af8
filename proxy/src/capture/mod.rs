//! Transparent capture: the iptables rules that send a pod's TCP through its proxy, and the
//! socket option that tells the proxy where a captured connection was going.
//!
//! `mesh-proxy init` runs once per pod, as the init container, before the application starts.
//! It installs rules in the `nat` table of the pod's network namespace so that, without the
//! application knowing:
//!
//! - every inbound TCP connection (except to skipped ports) lands on the proxy's inbound port;
//! - every outbound TCP connection from any uid but the proxy's (except to loopback, skipped
//!   ports and skipped subnets) lands on the proxy's outbound port.
//!
//! The proxy then calls [`original_dst`] on each accepted connection to learn the address the
//! peer actually dialled.
//!
//! The work is split so that the decisions are testable without root:
//! - [`args`]: the flags, and their validation into typed ports and subnets;
//! - [`plan`]: a pure function from the validated flags to the iptables steps, per IP family;
//! - `exec`: the only part that runs `iptables`/`ip6tables`;
//! - `original_dst`: `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` through socket2.
//!
//! The exact rules, and why each one is there, are documented on [`plan::plan`].

pub mod args;
mod exec;
mod original_dst;
pub mod plan;

pub use args::InitArgs;
pub use original_dst::original_dst;

/// What can go wrong in `mesh-proxy init`. Each variant names the flag, value or command at
/// fault, so the init container's log is enough to fix it.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A port list held something that is not a port (1-65535) or a range `LOW-HIGH`.
    #[error("{flag}: {value:?} is not a port or port range like 4190-4191 ({reason})")]
    BadPort {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A subnet list held something that is not a CIDR.
    #[error("{flag}: {value:?} is not a CIDR like 10.0.0.0/8 or fd00::/8 ({reason})")]
    BadCidr {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
    /// The iptables program could not be started for want of a file: most often iptables
    /// itself, but a missing `/dev/null` or loader says the same.
    #[error(
        "cannot start {program}: {reason}; capture needs iptables installed and on PATH \
         (apt-get install iptables)"
    )]
    IptablesMissing {
        program: &'static str,
        reason: String,
    },
    /// An iptables command exited with an error, or could not be started.
    #[error("`{command}` failed ({status}): {stderr}")]
    IptablesFailed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Installs (or with `--remove`, removes) the capture rules in the current network namespace.
/// Idempotent: installing twice leaves the same rules as installing once, and removing what is
/// not there succeeds. With `--dry-run`, prints the commands to stdout and changes nothing.
///
/// IPv4 rules are required (a missing or failing `iptables` is an error). IPv6 rules are
/// installed when `ip6tables` exists and the kernel has the IPv6 `nat` table; otherwise IPv6 is
/// skipped with a warning, since a pod without IPv6 has nothing to capture there.
pub fn run_init(args: &InitArgs) -> Result<(), CaptureError> {
    let settings = args.validate()?;
    let steps_by_family = plan::Family::ALL.map(|family| (family, plan::plan(&settings, family)));

    if args.dry_run {
        for (family, steps) in &steps_by_family {
            println!("# {} ({})", family.program(), family.label());
            for step in steps {
                println!("{}", step.to_shell(family.program()));
            }
        }
        return Ok(());
    }

    for (family, steps) in &steps_by_family {
        let iptables = exec::Iptables::new(family.program());
        match family {
            plan::Family::Ipv4 => iptables.probe()?,
            plan::Family::Ipv6 => {
                if let Err(error) = iptables.probe() {
                    tracing::warn!(%error, "skipping IPv6 capture: ip6tables is unusable here");
                    continue;
                }
            }
        }
        for step in steps {
            iptables.apply(step)?;
        }
        tracing::info!(
            program = family.program(),
            action = if settings.remove {
                "removed"
            } else {
                "installed"
            },
            "capture rules",
        );
    }
    Ok(())
}
