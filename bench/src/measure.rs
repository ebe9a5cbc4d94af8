//! Runs the load against every topology, interleaved (each kind of run goes through all the
//! topologies before the next kind starts, so background noise spreads over all of them),
//! and records what the proxies cost: CPU time from `/proc/<pid>/stat`, memory from
//! `/proc/<pid>/status`, and how busy the rest of the machine was meanwhile.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::load::{self, Entry, Measured, Shape};
use crate::plan::Plan;
use crate::procfs::{self, RssSampler};
use crate::topology::Topology;

/// Which load generator sends the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// oha for HTTP/1.1 and h2load for HTTP/2: the real benchmark.
    External,
    /// The built-in HTTP/1.1 driver (the self-test; no HTTP/2 runs).
    Builtin,
}

/// A kind of run, the same for every topology so figures compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunKind {
    /// Open loop at a fixed rate (requests per second), latency corrected.
    Rate {
        /// Requests per second.
        rps: u32,
    },
    /// Closed loop: as fast as answers come on N connections.
    Max {
        /// Connections.
        connections: u32,
    },
    /// HTTP/2 closed loop.
    Http2 {
        /// Connections.
        connections: u32,
        /// Concurrent streams per connection.
        streams: u32,
    },
}

impl RunKind {
    /// A stable key for the JSON and for matching runs across topologies.
    pub fn key(&self) -> String {
        match self {
            Self::Rate { rps } => format!("rate-{rps}"),
            Self::Max { connections } => format!("max-{connections}"),
            Self::Http2 {
                connections,
                streams,
            } => format!("h2-{connections}x{streams}"),
        }
    }

    /// How the tables name it.
    pub fn label(&self) -> String {
        match self {
            Self::Rate { rps } => format!("{rps} rps (HTTP/1.1, open loop)"),
            Self::Max { connections } => format!("max, {connections} connections (HTTP/1.1)"),
            Self::Http2 {
                connections,
                streams,
            } => format!("max, HTTP/2, {connections} connections x {streams} streams"),
        }
    }
}

/// One load run against one topology.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// What was run.
    pub kind: RunKind,
    /// `kind.key()`.
    pub key: String,
    /// Which repetition (from 0).
    pub round: usize,
    /// What the load generator measured.
    pub measured: Measured,
    /// CPU seconds per 10,000 successful requests, per watched process (same order).
    pub cpu_s_per_10k: Vec<f64>,
    /// CPU used per watched process, in cores (CPU seconds per second).
    pub cpu_cores: Vec<f64>,
    /// The largest VmRSS seen during the run per watched process, KiB.
    pub rss_max_kib: Vec<u64>,
    /// The 1-minute load average just before the run.
    pub loadavg_before: f64,
    /// CPU used during the run by processes that are not the benchmark's, in cores: other
    /// engineers' builds on a shared machine.
    pub other_cores: f64,
}

/// Memory with many idle keep-alive connections open.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    /// Connections asked for.
    pub requested: usize,
    /// Connections actually open when measured.
    pub open: usize,
    /// Why fewer were opened, if so.
    pub shortfall: Option<String>,
    /// VmRSS per watched process with them open, KiB.
    pub rss_kib: Vec<u64>,
}

/// Everything measured for one topology.
#[derive(Debug, Clone, Serialize)]
pub struct TopologyResult {
    /// The topology.
    pub topology: Topology,
    /// VmRSS per watched process before any traffic, KiB.
    pub rss_idle_kib: Vec<u64>,
    /// Of it, RssAnon (not the binary's and libraries' shared pages), KiB.
    pub anon_idle_kib: Vec<u64>,
    /// The run of each kind kept for the report: of its rounds, the median
    /// ([`representative`]).
    pub runs: Vec<Run>,
    /// Every run of every round.
    pub all_runs: Vec<Run>,
    /// The idle-connections measurement, when it ran.
    pub idle: Option<Idle>,
}

impl TopologyResult {
    /// The run of a kind, if any.
    pub fn run(&self, key: &str) -> Option<&Run> {
        self.runs.iter().find(|r| r.key == key)
    }
}

/// What the measurements need to know about the machine and the processes.
#[derive(Debug, Clone)]
pub struct Bench {
    /// Clock ticks per second.
    pub ticks: f64,
    /// Every process the benchmark runs (to tell its CPU from other people's).
    pub our_pids: Vec<u32>,
    /// Which load generator to use.
    pub generator: Generator,
    /// A folder for the load generators' files.
    pub dir: std::path::PathBuf,
}

fn our_ticks(ctx: &Bench) -> u64 {
    let me = procfs::cpu_ticks(std::process::id()).unwrap_or_default();
    let services: u64 = ctx
        .our_pids
        .iter()
        .filter_map(|pid| procfs::cpu_ticks(*pid).ok())
        .map(|t| t.own)
        .sum();
    me.own + me.children + services
}

async fn generate(ctx: &Bench, plan: &Plan, entry: &Entry, kind: RunKind) -> Result<Measured> {
    match (kind, ctx.generator) {
        (RunKind::Rate { rps }, generator) => {
            let shape = Shape {
                connections: plan.rate_connections,
                rate: Some(rps),
                duration: plan.rate_duration,
            };
            match generator {
                Generator::External => load::oha(entry, shape).await,
                Generator::Builtin => load::drive(entry, shape).await,
            }
        }
        (RunKind::Max { connections }, generator) => {
            let shape = Shape {
                connections,
                rate: None,
                duration: plan.max_duration,
            };
            match generator {
                Generator::External => load::oha(entry, shape).await,
                Generator::Builtin => load::drive(entry, shape).await,
            }
        }
        (
            RunKind::Http2 {
                connections,
                streams,
            },
            _,
        ) => {
            let duration = plan.h2.map(|(_, _, d)| d).unwrap_or(Duration::from_secs(5));
            load::h2load(entry, connections, streams, duration, &ctx.dir).await
        }
    }
}

/// Runs one kind of load against one topology, measuring its processes meanwhile.
pub async fn run_one(
    ctx: &Bench,
    plan: &Plan,
    topology: &Topology,
    kind: RunKind,
    round: usize,
) -> Result<Run> {
    let entry = match kind {
        RunKind::Http2 { .. } => topology
            .http2
            .as_ref()
            .context("this topology carries no HTTP/2")?,
        _ => &topology.http1,
    };
    let pids: Vec<u32> = topology.watched.iter().map(|w| w.pid).collect();
    let loadavg_before = procfs::loadavg();
    let cpu_before: Vec<u64> = pids
        .iter()
        .map(|pid| procfs::cpu_ticks(*pid).map(|t| t.own))
        .collect::<Result<_>>()?;
    let machine_before = procfs::machine_cpu()?;
    let ours_before = our_ticks(ctx);
    let sampler = RssSampler::start(pids.clone(), Duration::from_millis(250));
    let started = std::time::Instant::now();
    let measured = generate(ctx, plan, entry, kind)
        .await
        .with_context(|| format!("{} against {}", kind.label(), topology.title))?;
    let wall = started.elapsed().as_secs_f64();
    let rss_max_kib = sampler.finish().await;
    let machine_after = procfs::machine_cpu()?;
    let ours_after = our_ticks(ctx);
    let cpu_after: Vec<u64> = pids
        .iter()
        .map(|pid| procfs::cpu_ticks(*pid).map(|t| t.own))
        .collect::<Result<_>>()?;
    let seconds: Vec<f64> = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / ctx.ticks)
        .collect();
    let ok = measured.ok.max(1) as f64;
    let other_ticks = (machine_after.busy.saturating_sub(machine_before.busy))
        .saturating_sub(ours_after.saturating_sub(ours_before));
    Ok(Run {
        kind,
        key: kind.key(),
        round,
        cpu_s_per_10k: seconds.iter().map(|s| s / ok * 10_000.0).collect(),
        cpu_cores: seconds.iter().map(|s| s / wall.max(1e-9)).collect(),
        rss_max_kib,
        loadavg_before,
        other_cores: other_ticks as f64 / ctx.ticks / wall.max(1e-9),
        measured,
    })
}

/// The kinds of run of a plan, in order.
pub fn kinds(plan: &Plan, generator: Generator) -> Vec<RunKind> {
    let mut kinds: Vec<RunKind> = plan
        .rates
        .iter()
        .map(|&rps| RunKind::Rate { rps })
        .collect();
    kinds.push(RunKind::Max {
        connections: plan.max_connections,
    });
    if let (Some((connections, streams, _)), Generator::External) = (plan.h2, generator) {
        kinds.push(RunKind::Http2 {
            connections,
            streams,
        });
    }
    kinds
}

/// Warms a topology up (discovery resolved, pools filled) with a short closed loop.
async fn warm_up(ctx: &Bench, topology: &Topology) -> Result<()> {
    let shape = Shape {
        connections: 16,
        rate: None,
        duration: Duration::from_millis(if ctx.generator == Generator::Builtin {
            200
        } else {
            1_500
        }),
    };
    let measured = match ctx.generator {
        Generator::External => load::oha(&topology.http1, shape).await?,
        Generator::Builtin => load::drive(&topology.http1, shape).await?,
    };
    if measured.ok == 0 {
        anyhow::bail!(
            "{}: no request succeeded while warming up ({} errors)",
            topology.title,
            measured.errors
        );
    }
    Ok(())
}

/// Measures every topology: idle memory, each kind of run interleaved across topologies,
/// then memory with idle connections open. `progress` hears what is going on.
pub async fn measure_all(
    ctx: &Bench,
    plan: &Plan,
    topologies: &[Topology],
    progress: &dyn Fn(&str),
) -> Result<Vec<TopologyResult>> {
    let mut results: Vec<TopologyResult> = topologies
        .iter()
        .map(|topology| {
            let idle: Vec<procfs::Memory> = topology
                .watched
                .iter()
                .map(|w| procfs::memory(w.pid).unwrap_or_default())
                .collect();
            TopologyResult {
                rss_idle_kib: idle.iter().map(|m| m.rss_kib).collect(),
                anon_idle_kib: idle.iter().map(|m| m.anon_kib).collect(),
                topology: topology.clone(),
                runs: Vec::new(),
                all_runs: Vec::new(),
                idle: None,
            }
        })
        .collect();
    for topology in topologies {
        progress(&format!("warming up {}", topology.title));
        warm_up(ctx, topology).await?;
    }
    for round in 0..plan.rounds.max(1) {
        for kind in kinds(plan, ctx.generator) {
            for result in &mut results {
                if matches!(kind, RunKind::Http2 { .. }) && result.topology.http2.is_none() {
                    continue;
                }
                progress(&format!(
                    "round {}: {}: {} (load average {:.2})",
                    round + 1,
                    result.topology.title,
                    kind.label(),
                    procfs::loadavg()
                ));
                let run = run_one(ctx, plan, &result.topology, kind, round).await?;
                progress(&format!(
                    "    {:.0} rps, p50 {:.0} µs, p99 {:.0} µs, errors {}; other processes used {:.2} cores",
                    run.measured.rps,
                    run.measured.p50_us,
                    run.measured.p99_us,
                    run.measured.errors,
                    run.other_cores
                ));
                result.all_runs.push(run);
            }
        }
    }
    for result in &mut results {
        result.runs = representative(&result.all_runs);
    }
    for result in &mut results {
        if plan.idle_connections == 0 {
            continue;
        }
        progress(&format!(
            "{}: {} idle connections",
            result.topology.title, plan.idle_connections
        ));
        result.idle = Some(idle(&result.topology, plan.idle_connections).await);
    }
    Ok(results)
}

/// Every run, of every round, in which a request failed: one line each, naming the topology,
/// the run and the count. Through the mesh any is a defect, so the benchmark fails on it
/// (after writing its figures) rather than reporting a throughput that hides failures.
pub fn failed_runs(title: &str, runs: &[Run]) -> Vec<String> {
    runs.iter()
        .filter(|run| run.measured.errors > 0)
        .map(|run| {
            format!(
                "{title}: {}, round {}: {} of {} requests failed",
                run.kind.label(),
                run.round + 1,
                run.measured.errors,
                run.measured.errors + run.measured.ok
            )
        })
        .collect()
}

/// More CPU than the quietest round's, in cores, that other processes may have used during a
/// round for it to stay a candidate.
pub const NOISE_CORES: f64 = 0.05;

/// Of each kind's rounds, the representative run, in the order the kinds first ran: rounds
/// during which other processes used markedly more CPU than in the quietest are left out,
/// and of the rest the median by the kind's headline figure (p50 at a fixed rate, throughput
/// in a closed loop); of two middle ones, the earlier round.
///
/// The median, not the best or the quietest: on a quiet machine the benchmark's own processes
/// are the load, so every round is as quiet as the next, and a single round's p50 moves by
/// tens of microseconds from one to the next for every topology alike. The median of three
/// keeps one unlucky or lucky round from deciding a comparison.
pub fn representative(runs: &[Run]) -> Vec<Run> {
    let mut keys: Vec<&str> = Vec::new();
    for run in runs {
        if !keys.contains(&run.key.as_str()) {
            keys.push(&run.key);
        }
    }
    keys.iter()
        .filter_map(|key| {
            let rounds: Vec<&Run> = runs.iter().filter(|run| run.key == *key).collect();
            let quietest = rounds
                .iter()
                .map(|run| run.other_cores)
                .fold(f64::INFINITY, f64::min);
            let mut candidates: Vec<&Run> = rounds
                .into_iter()
                .filter(|run| run.other_cores <= quietest + NOISE_CORES)
                .collect();
            candidates.sort_by(|a, b| {
                a.headline()
                    .total_cmp(&b.headline())
                    .then(a.round.cmp(&b.round))
            });
            let middle = candidates.len().checked_sub(1)? / 2;
            let upper = candidates.len() / 2;
            // Of two middle runs, the earlier round, whichever figure is the better.
            let kept = if candidates[upper].round < candidates[middle].round {
                candidates[upper]
            } else {
                candidates[middle]
            };
            Some(kept.clone())
        })
        .collect()
}

impl Run {
    /// The figure the kind of run is for: p50 at a fixed rate, throughput in a closed loop.
    fn headline(&self) -> f64 {
        match self.kind {
            RunKind::Rate { .. } => self.measured.p50_us,
            RunKind::Max { .. } | RunKind::Http2 { .. } => self.measured.rps,
        }
    }
}

/// How long connections stay idle before the memory they hold is read.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// Opens idle connections, measures memory, closes them.
async fn idle(topology: &Topology, count: usize) -> Idle {
    let mut shortfall = None;
    let mut requested = count;
    if let Some(limit) = procfs::open_files_limit() {
        let usable = usize::try_from(limit.saturating_sub(1_000)).unwrap_or(usize::MAX);
        if usable < count {
            shortfall = Some(format!(
                "the open-files limit is {limit}; raise it with `ulimit -n` to open {count}"
            ));
            requested = usable;
        }
    }
    let connections = load::open_idle(&topology.http1, requested, 200).await;
    // Let the connections be idle a while before reading memory: a proxy frees what an idle
    // connection does not need only once it is idle (mesh-proxy parks an HTTP/1 connection
    // after 250 ms of quiet, and its allocator returns freed pages within about a second).
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss_kib = topology
        .watched
        .iter()
        .map(|w| procfs::memory(w.pid).map(|m| m.rss_kib).unwrap_or(0))
        .collect();
    let open = connections.open;
    let shortfall = shortfall.or(connections.shortfall.clone());
    connections.close();
    // Give the processes a moment to close their sides before the next measurement.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Idle {
        requested: count,
        open,
        shortfall,
        rss_kib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: RunKind, round: usize, ok: u64, errors: u64) -> Run {
        Run {
            kind,
            key: kind.key(),
            round,
            measured: Measured {
                ok,
                errors,
                ..Measured::default()
            },
            cpu_s_per_10k: Vec::new(),
            cpu_cores: Vec::new(),
            rss_max_kib: Vec::new(),
            loadavg_before: 0.0,
            other_cores: 0.0,
        }
    }

    /// A run of `kind` in `round` with `headline` as its p50 (fixed rate) or throughput.
    fn round_of(kind: RunKind, round: usize, headline: f64, other_cores: f64) -> Run {
        let mut run = run(kind, round, 1000, 0);
        run.measured.p50_us = headline;
        run.measured.rps = headline;
        run.other_cores = other_cores;
        run
    }

    fn kept(runs: &[Run]) -> Vec<(String, usize)> {
        representative(runs)
            .into_iter()
            .map(|run| (run.key, run.round))
            .collect()
    }

    #[test]
    fn the_run_kept_of_each_kind_is_its_median_round() {
        let rate = RunKind::Rate { rps: 1000 };
        let max = RunKind::Max { connections: 64 };
        let runs = [
            round_of(rate, 0, 300.0, 0.0),
            round_of(max, 0, 30_000.0, 0.0),
            round_of(rate, 1, 250.0, 0.0),
            round_of(max, 1, 25_000.0, 0.0),
            round_of(rate, 2, 280.0, 0.0),
            round_of(max, 2, 28_000.0, 0.0),
        ];
        assert_eq!(kept(&runs), [(rate.key(), 2), (max.key(), 2)]);
    }

    #[test]
    fn a_round_that_shared_the_machine_is_left_out_and_of_two_the_earlier_is_kept() {
        let rate = RunKind::Rate { rps: 1000 };
        let runs = [
            round_of(rate, 0, 100.0, 0.5),
            round_of(rate, 1, 300.0, 0.01),
            round_of(rate, 2, 280.0, 0.02),
        ];
        assert_eq!(kept(&runs), [(rate.key(), 1)]);
        assert_eq!(kept(&runs[..1]), [(rate.key(), 0)], "one round is kept");
        assert!(kept(&[]).is_empty());
    }

    #[test]
    fn every_run_with_an_error_is_a_failure_whatever_its_round() {
        let h2 = RunKind::Http2 {
            connections: 8,
            streams: 8,
        };
        let runs = [
            run(RunKind::Max { connections: 64 }, 0, 1000, 0),
            run(h2, 0, 1000, 0),
            run(h2, 1, 982, 18),
        ];
        assert_eq!(
            failed_runs("mesh, plaintext", &runs),
            vec![
                "mesh, plaintext: max, HTTP/2, 8 connections x 8 streams, round 2: 18 of 1000 \
                 requests failed"
            ]
        );
        assert!(failed_runs("direct", &runs[..2]).is_empty());
    }
}
