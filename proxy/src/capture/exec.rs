//! Runs the plan: the only code that calls `iptables`/`ip6tables`.
//!
//! The checks that make steps idempotent (does the chain exist, is the jump there) are asked of
//! iptables itself rather than parsed from a listing, so they agree with how iptables matches.
//! A failed check means "absent" only because [`Iptables::probe`] first proved that the `nat`
//! table is usable at all; any other failure is reported with the command and its stderr.

use std::io;
use std::process::{Command, Output};

use super::CaptureError;
use super::plan::{Rule, Step, chain_args};

/// At most this many copies of a jump are deleted: enough for any past mishap, and a bound on
/// the loop should `-D` ever keep succeeding.
const MAX_DUPLICATE_JUMPS: usize = 64;

/// One iptables program (`iptables` or `ip6tables`).
pub(super) struct Iptables {
    program: &'static str,
}

impl Iptables {
    pub(super) fn new(program: &'static str) -> Self {
        Iptables { program }
    }

    /// Proves that the program exists and may read the `nat` table here.
    pub(super) fn probe(&self) -> Result<(), CaptureError> {
        self.must(&["-t", "nat", "-S"].map(str::to_owned))
    }

    pub(super) fn apply(&self, step: &Step) -> Result<(), CaptureError> {
        match step {
            Step::ResetChain(chain) => {
                if !self.succeeds(&chain_args("-N", chain))? {
                    self.must(&chain_args("-F", chain))?;
                }
            }
            Step::Append(rule) => self.must(&rule.args("-A"))?,
            Step::AppendUnlessPresent(rule) => {
                if !self.succeeds(&rule.args("-C"))? {
                    self.must(&rule.args("-A"))?;
                }
            }
            Step::DeleteEvery(rule) => self.delete_every(rule)?,
            Step::DeleteChain(chain) => {
                if self.succeeds(&chain_args("-S", chain))? {
                    self.must(&chain_args("-F", chain))?;
                    self.must(&chain_args("-X", chain))?;
                }
            }
        }
        Ok(())
    }

    fn delete_every(&self, rule: &Rule) -> Result<(), CaptureError> {
        for _ in 0..MAX_DUPLICATE_JUMPS {
            if !self.succeeds(&rule.args("-D"))? {
                return Ok(());
            }
        }
        Err(CaptureError::IptablesFailed {
            command: self.display(&rule.args("-D")),
            status: "still succeeding".to_owned(),
            stderr: format!("the rule was deleted {MAX_DUPLICATE_JUMPS} times and is still there"),
        })
    }

    /// Runs a command that must succeed.
    fn must(&self, args: &[String]) -> Result<(), CaptureError> {
        let output = self.run(args)?;
        if output.status.success() {
            return Ok(());
        }
        Err(CaptureError::IptablesFailed {
            command: self.display(args),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }

    /// Runs a check; a non-zero exit is the answer "no", not an error.
    fn succeeds(&self, args: &[String]) -> Result<bool, CaptureError> {
        Ok(self.run(args)?.status.success())
    }

    fn run(&self, args: &[String]) -> Result<Output, CaptureError> {
        tracing::debug!(command = %self.display(args), "running");
        // `-w`: wait for the xtables lock instead of failing when another process holds it
        // (legacy backend; nf_tables accepts and ignores it).
        Command::new(self.program)
            .arg("-w")
            .args(args)
            .output()
            .map_err(|error| match error.kind() {
                io::ErrorKind::NotFound => CaptureError::IptablesMissing {
                    program: self.program,
                    reason: error.to_string(),
                },
                _ => CaptureError::IptablesFailed {
                    command: self.display(args),
                    status: "could not start".to_owned(),
                    stderr: error.to_string(),
                },
            })
    }

    fn display(&self, args: &[String]) -> String {
        format!("{} -w {}", self.program, args.join(" "))
    }
}
