//! What `/proc` says about a process and the machine: CPU time, resident memory, load.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// CPU time a process used (user + system), in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// utime + stime of the process itself.
    pub own: u64,
    /// cutime + cstime: children it has waited for (load generators the bench ran).
    pub children: u64,
}

/// Parses `/proc/<pid>/stat`: fields after the command name, which may hold spaces or `)`.
pub fn parse_stat(text: &str) -> Result<CpuTicks> {
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no `)` closing the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, so index 11.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("too few fields")?
            .parse::<u64>()
            .with_context(|| format!("field {} is not a number", i + 3))
    };
    Ok(CpuTicks {
        own: field(11)? + field(12)?,
        children: field(13)? + field(14)?,
    })
}

/// The CPU ticks of `pid` so far.
pub fn cpu_ticks(pid: u32) -> Result<CpuTicks> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat(&text).with_context(|| format!("parsing /proc/{pid}/stat"))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we know).
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Resident memory of a process, KiB: now and its peak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// VmRSS.
    pub rss_kib: u64,
    /// VmHWM: the peak resident set since start.
    pub peak_kib: u64,
    /// RssAnon: the resident set less the mapped files (the binary and libraries, whose pages
    /// every process of the same image shares): what the process itself allocated.
    pub anon_kib: u64,
}

/// Parses the `VmRSS`, `VmHWM` and `RssAnon` lines of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Result<Memory> {
    let value = |key: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|line| line.starts_with(key))
            .with_context(|| format!("no {key} line"))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad {key} line {line:?}"))
    };
    Ok(Memory {
        rss_kib: value("VmRSS:")?,
        peak_kib: value("VmHWM:")?,
        anon_kib: value("RssAnon:")?,
    })
}

/// The memory of `pid` now.
pub fn memory(pid: u32) -> Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_status(&text).with_context(|| format!("parsing /proc/{pid}/status"))
}

/// Machine-wide CPU time from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineCpu {
    /// Every state but idle and iowait.
    pub busy: u64,
    /// All states.
    pub total: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`.
pub fn parse_machine_cpu(text: &str) -> Result<MachineCpu> {
    let line = text
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("no aggregate cpu line")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("a cpu field is not a number")?;
    if values.len() < 5 {
        bail!("cpu line has {} fields", values.len());
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = values.iter().take(8).sum();
    Ok(MachineCpu {
        busy: total - values[3] - values[4],
        total,
    })
}

/// The machine's CPU time so far.
pub fn machine_cpu() -> Result<MachineCpu> {
    parse_machine_cpu(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The soft limit on open files of this process (children inherit it).
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Samples the memory of some processes while work runs, keeping each one's largest VmRSS.
#[derive(Debug)]
pub struct RssSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    /// Starts sampling `pids` every `every`.
    pub fn start(pids: Vec<u32>, every: Duration) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut max = vec![0u64; pids.len()];
            loop {
                for (slot, pid) in max.iter_mut().zip(&pids) {
                    if let Ok(memory) = memory(*pid) {
                        *slot = (*slot).max(memory.rss_kib);
                    }
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(every) => {}
                }
            }
            max
        });
        Self { stop, task }
    }

    /// Stops and returns the largest VmRSS seen per process, KiB.
    pub async fn finish(self) -> Vec<u64> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_tricky_command_name() {
        let text = "1234 (we ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 75 4 6 20 0 3 0 100 1000 200 18446744073709551615";
        let ticks = parse_stat(text).expect("parses");
        assert_eq!(ticks.own, 325);
        assert_eq!(ticks.children, 10);
    }

    #[test]
    fn status_memory_lines() {
        let text = "Name:\tmesh-proxy\nVmHWM:\t   12000 kB\nVmRSS:\t    8000 kB\n\
                    RssAnon:\t    1500 kB\nRssFile:\t    6500 kB\n";
        assert_eq!(
            parse_status(text).expect("parses"),
            Memory {
                rss_kib: 8000,
                peak_kib: 12000,
                anon_kib: 1500,
            }
        );
        assert!(parse_status("Name:\tx\n").is_err());
    }

    #[test]
    fn machine_cpu_line() {
        let text = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 1 2 3 4\n";
        let cpu = parse_machine_cpu(text).expect("parses");
        assert_eq!(cpu.total, 1181);
        assert_eq!(cpu.busy, 161);
    }

    #[test]
    fn this_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(memory(pid).expect("status").rss_kib > 0);
        assert!(open_files_limit().is_some());
    }
}
