//! Where and when the benchmark ran: machine, kernel, tools, commit.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// The machine and software a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// UTC date and time of the run.
    pub date: String,
    /// The git commit of the workspace (short), with `+dirty` when files differ from it.
    pub commit: String,
    /// Online CPUs (`nproc`).
    pub cpus: usize,
    /// The CPU model from /proc/cpuinfo.
    pub cpu_model: String,
    /// The kernel release.
    pub kernel: String,
    /// Versions of the programs involved.
    pub tools: BTreeMap<String, String>,
    /// The 1-minute load average when the run started.
    pub loadavg_start: f64,
    /// The open-files limit of the benchmark and its children.
    pub open_files_limit: Option<u64>,
}

fn output(program: &str, args: &[&str], dir: Option<&Path>) -> Option<String> {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let out = command.output().ok()?;
    // nginx prints its version on stderr.
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let text = String::from_utf8_lossy(&text)
        .lines()
        .next()?
        .trim()
        .to_string();
    (!text.is_empty()).then_some(text)
}

impl Machine {
    /// Reads everything now; `repo` is the workspace root.
    pub fn detect(repo: &Path, tools: &[(&str, &str, &[&str])]) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let commit = output("git", &["rev-parse", "--short", "HEAD"], Some(repo))
            .unwrap_or_else(|| "unknown".into());
        let dirty = output(
            "git",
            &["status", "--porcelain", "--untracked-files=no"],
            Some(repo),
        )
        .is_some();
        Self {
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"], None).unwrap_or_default(),
            commit: if dirty {
                format!("{commit}+dirty")
            } else {
                commit
            },
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            tools: tools
                .iter()
                .filter_map(|(name, program, args)| {
                    Some((name.to_string(), output(program, args, None)?))
                })
                .collect(),
            loadavg_start: crate::procfs::loadavg(),
            open_files_limit: crate::procfs::open_files_limit(),
        }
    }
}
