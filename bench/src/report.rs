//! The results of a run, as JSON (everything) and as BENCHMARKS.md (tables of each figure
//! beside its baseline and the ratio).

use std::fmt::Write as _;

use serde::Serialize;

use crate::machine::Machine;
use crate::measure::{Run, TopologyResult};
use crate::plan::Plan;
use crate::scale::ScaleResult;

/// Everything one benchmark run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where and when.
    pub machine: Machine,
    /// What was asked.
    pub plan: Plan,
    /// Per topology; the first is the direct baseline.
    pub topologies: Vec<TopologyResult>,
    /// Scenario 6, across network namespaces with iptables capture: its direct baseline
    /// across the veth, then the meshed hop. Empty when it did not run.
    pub netns: Vec<TopologyResult>,
    /// Scenario 5, when it ran.
    pub scale: Option<ScaleResult>,
    /// Things the reader must know (skipped parts, limits hit).
    pub notes: Vec<String>,
    /// Wall time of the whole run, seconds.
    pub elapsed_s: f64,
}

/// Latency in µs as text.
pub fn us(value: f64) -> String {
    if !value.is_finite() {
        "–".into()
    } else if value.abs() < 1_000.0 {
        format!("{value:.0} µs")
    } else {
        format!("{:.2} ms", value / 1_000.0)
    }
}

/// A latency difference in µs as text, signed.
pub fn added(value: f64) -> String {
    if !value.is_finite() {
        return "–".into();
    }
    let sign = if value < 0.0 { "−" } else { "+" };
    format!("{sign}{}", us(value.abs()))
}

/// Requests per second as text, with thousands separators.
pub fn rps(value: f64) -> String {
    if !value.is_finite() {
        return "–".into();
    }
    let whole = value.round() as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{out} rps")
}

/// KiB as MiB text.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A ratio as text.
pub fn ratio(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}x")
    } else {
        "–".into()
    }
}

fn cpu(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2} s")
    } else {
        "–".into()
    }
}

fn kib(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1} KiB")
    } else {
        "–".into()
    }
}

/// One figure of a run.
type Figure = fn(&Run) -> f64;

/// The two latencies the summary judges, by name.
const LATENCIES: [(&str, Figure); 2] = [
    ("p50", |r| r.measured.p50_us),
    ("p99", |r| r.measured.p99_us),
];

/// What topology `t` added to the direct path's latency `f` in the run `key`; NaN when either
/// did not run it.
fn added_at(t: &TopologyResult, direct: &TopologyResult, key: &str, f: Figure) -> f64 {
    match (t.run(key), direct.run(key)) {
        (Some(r), Some(d)) => f(r) - f(d),
        _ => f64::NAN,
    }
}

/// Topology `t`'s throughput in the run `key` as a share of the direct path's.
fn throughput(t: &TopologyResult, direct: &TopologyResult, key: &str) -> f64 {
    match (t.run(key), direct.run(key)) {
        (Some(r), Some(d)) => r.measured.rps / d.measured.rps,
        _ => f64::NAN,
    }
}

/// CPU seconds per 10,000 requests in the run `key`, averaged over the topology's proxies.
fn cpu_per_proxy(t: &TopologyResult, key: &str) -> f64 {
    t.run(key).map_or(f64::NAN, |r| {
        r.cpu_s_per_10k.iter().sum::<f64>() / r.cpu_s_per_10k.len().max(1) as f64
    })
}

/// What each idle connection added to the RSS of the topology's `i`th watched process, in KiB;
/// NaN when no idle connection was measured.
fn kib_per_idle_connection(t: &TopologyResult, i: usize) -> f64 {
    let (Some(conns), Some(idle)) = (&t.idle, t.rss_idle_kib.get(i)) else {
        return f64::NAN;
    };
    match conns.rss_kib.get(i) {
        Some(with) if conns.open > 0 => (*with as f64 - *idle as f64) / conns.open as f64,
        _ => f64::NAN,
    }
}

impl Report {
    /// The baseline (the direct topology).
    pub fn direct(&self) -> Option<&TopologyResult> {
        self.topologies.iter().find(|t| t.topology.key == "direct")
    }

    /// A topology by key.
    pub fn topology(&self, key: &str) -> Option<&TopologyResult> {
        self.topologies.iter().find(|t| t.topology.key == key)
    }

    fn noisy(&self) -> Option<String> {
        let runs = self.topologies.iter().flat_map(|t| &t.runs);
        let max_load = runs
            .clone()
            .map(|r| r.loadavg_before)
            .fold(self.machine.loadavg_start, f64::max);
        let max_other = runs.map(|r| r.other_cores).fold(0.0, f64::max);
        let cpus = self.machine.cpus as f64;
        (max_load > cpus * 0.75 || max_other > 0.25).then(|| {
            format!(
                "**Noisy machine.** The 1-minute load average reached {max_load:.2} on {cpus} CPUs \
                 and other processes (not the benchmark's) used up to {max_other:.2} cores during a \
                 run: absolute figures are inflated and jittery; ratios measured side by side in \
                 the same run are the figures to trust. The last table lists the conditions of \
                 every run."
            )
        })
    }

    /// BENCHMARKS.md.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `just bench` (`mesh-bench`, mode `{}`); do not edit by hand. Every \
             figure is measured in the same run as its baseline (no proxy), on loopback, with \
             the same nginx behind every topology answering 1 KiB. Raw figures: \
             `bench-results.json`.\n",
            self.plan.mode
        );
        let _ = writeln!(md, "| | |\n|---|---|");
        let _ = writeln!(md, "| date | {} |", m.date);
        let _ = writeln!(md, "| commit | `{}` |", m.commit);
        let _ = writeln!(md, "| CPU | {} x {} |", m.cpus, m.cpu_model);
        let _ = writeln!(md, "| kernel | {} |", m.kernel);
        for (tool, version) in &m.tools {
            let _ = writeln!(md, "| {tool} | {version} |");
        }
        let _ = writeln!(md, "| load average at start | {:.2} |", m.loadavg_start);
        let _ = writeln!(md, "| run time | {:.0} s |\n", self.elapsed_s);
        if let Some(noise) = self.noisy() {
            let _ = writeln!(md, "{noise}\n");
        }
        for note in &self.notes {
            let _ = writeln!(md, "- {note}");
        }
        if !self.notes.is_empty() {
            md.push('\n');
        }
        self.summary(&mut md);
        self.method(&mut md);
        if let Some(direct) = self.direct() {
            self.direct_table(&mut md, direct);
            for (n, key, what) in [
                (
                    2,
                    "mesh",
                    "client -> outbound proxy -> inbound proxy -> nginx, plaintext between the proxies",
                ),
                (
                    3,
                    "mesh-mtls",
                    "the same with mutual TLS 1.3 between the proxies (SPIFFE identities from the bench's CA)",
                ),
                (
                    4,
                    "haproxy",
                    "client -> HAProxy -> HAProxy -> nginx, mutual TLS 1.3 between the two HAProxy processes",
                ),
            ] {
                if let Some(topology) = self.topology(key) {
                    self.versus_table(&mut md, n, what, direct, topology);
                }
            }
        }
        if let Some(scale) = &self.scale {
            scale_table(&mut md, scale);
        }
        let netns = |key: &str| self.netns.iter().find(|t| t.topology.key == key);
        if let (Some(direct), Some(mesh)) = (netns("netns-direct"), netns("netns-mesh-mtls")) {
            self.versus_table(
                &mut md,
                6,
                "the real sidecar path, run as root: two network namespaces (pods) joined by a veth \
                 pair. In the client pod, `mesh-proxy init`'s iptables rules capture the load \
                 generator's connections to a Service's cluster IP (OUTPUT REDIRECT to the client \
                 proxy, which reads SO_ORIGINAL_DST); the server pod has the same rules (PREROUTING \
                 REDIRECT to the inbound proxy), mutual TLS 1.3 between the proxies. The direct \
                 column is nginx reached across the same veth on a port both pods' rules skip, \
                 measured in the same run. The controller and the identity service stay on \
                 loopback, reached through relays",
                direct,
                mesh,
            );
        }
        if let (Some(direct), Some(haproxy)) = (self.direct(), self.topology("haproxy-h2")) {
            self.versus_table(
                &mut md,
                7,
                "scenario 4 with HTTP/2 between the two HAProxy processes (ALPN `h2` on both \
                 sides), the protocol the mesh speaks between its proxies: a control for the \
                 summary's last table",
                direct,
                haproxy,
            );
        }
        self.conditions(&mut md);
        md
    }

    fn summary(&self, md: &mut String) {
        let (Some(direct), Some(mesh)) = (self.direct(), self.topology("mesh-mtls")) else {
            return;
        };
        let haproxy = self.topology("haproxy");
        let rate = self.plan.rates.first().copied().unwrap_or(1_000);
        let rate_key = format!("rate-{rate}");
        let max_key = format!("max-{}", self.plan.max_connections);
        let _ = writeln!(
            md,
            "## Summary: a meshed hop with mutual TLS against HAProxy\n\n\
             Targets from the benchmark issue: add no more latency than HAProxy at p50 and p99 \
             (aim: half), reach at least its throughput (aim: 0.4x direct), use no more CPU per \
             request, stay under 10 MiB RSS idle and 20 MiB at load, hold an idle client connection \
             in 4 KiB; the controller within 400 MiB and 100 ms p99 at scale.\n"
        );
        let _ = writeln!(
            md,
            "| figure | mesh, mTLS | HAProxy, mTLS | target | met? |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        let d = direct.run(&rate_key);
        for (name, f) in LATENCIES {
            let ours = added_at(mesh, direct, &rate_key, f);
            let theirs = haproxy.map_or(f64::NAN, |h| added_at(h, direct, &rate_key, f));
            let met = verdict(ours <= theirs, ours <= theirs / 2.0, theirs.is_finite());
            let _ = writeln!(
                md,
                "| added {name} at {rate} rps (direct: {}) | {} | {} | <= HAProxy (aim: half) | {met} |",
                d.map_or("–".into(), |d| us(f(d))),
                added(ours),
                added(theirs)
            );
        }
        let ours = throughput(mesh, direct, &max_key);
        let theirs = haproxy.map_or(f64::NAN, |h| throughput(h, direct, &max_key));
        let _ = writeln!(
            md,
            "| throughput, {} connections, ratio to direct ({}) | {} | {} | >= HAProxy (aim: 0.40x) | {} |",
            self.plan.max_connections,
            direct
                .run(&max_key)
                .map_or("–".into(), |r| rps(r.measured.rps)),
            ratio(ours),
            ratio(theirs),
            verdict(ours >= theirs, ours >= 0.4, theirs.is_finite())
        );
        for key in [&rate_key, &max_key] {
            let ours = cpu_per_proxy(mesh, key);
            let theirs = haproxy.map_or(f64::NAN, |h| cpu_per_proxy(h, key));
            let label = if key == &rate_key {
                format!("at {rate} rps")
            } else {
                format!("at max, {} connections", self.plan.max_connections)
            };
            let _ = writeln!(
                md,
                "| CPU seconds per 10,000 requests per proxy, {label} | {} | {} | <= HAProxy | {} |",
                cpu(ours),
                cpu(theirs),
                verdict(ours <= theirs, ours <= theirs, theirs.is_finite())
            );
        }
        let max_of = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
        let idle_ours = max_of(&mesh.rss_idle_kib);
        let idle_theirs = haproxy.map(|h| max_of(&h.rss_idle_kib));
        let _ = writeln!(
            md,
            "| RSS idle, largest proxy | {} | {} | < 10 MiB | {} |",
            mib(idle_ours),
            idle_theirs.map_or("–".into(), mib),
            yes_no(idle_ours < 10 * 1024)
        );
        let anon_ours = max_of(&mesh.anon_idle_kib);
        let anon_theirs = haproxy.map(|h| max_of(&h.anon_idle_kib));
        let _ = writeln!(
            md,
            "| of which the process's own (RssAnon; the rest is its binary's and libraries' \
             pages, shared by every proxy of the same image) | {} | {} | | |",
            mib(anon_ours),
            anon_theirs.map_or("–".into(), mib),
        );
        let load_ours = mesh
            .runs
            .iter()
            .map(|r| max_of(&r.rss_max_kib))
            .max()
            .unwrap_or(0);
        let load_theirs = haproxy.map(|h| {
            h.runs
                .iter()
                .map(|r| max_of(&r.rss_max_kib))
                .max()
                .unwrap_or(0)
        });
        let _ = writeln!(
            md,
            "| RSS at load, largest proxy | {} | {} | < 20 MiB | {} |",
            mib(load_ours),
            load_theirs.map_or("–".into(), mib),
            yes_no(load_ours < 20 * 1024)
        );
        if let Some(idle) = &mesh.idle {
            let theirs = haproxy.and_then(|h| h.idle.as_ref());
            let _ = writeln!(
                md,
                "| RSS with {} idle connections, client proxy | {} | {} | | |",
                idle.open,
                mib(idle.rss_kib.first().copied().unwrap_or(0)),
                theirs.map_or("–".into(), |t| mib(t
                    .rss_kib
                    .first()
                    .copied()
                    .unwrap_or(0)))
            );
            let ours = kib_per_idle_connection(mesh, 0);
            let theirs = haproxy.map_or(f64::NAN, |h| kib_per_idle_connection(h, 0));
            let _ = writeln!(
                md,
                "| memory per idle client connection | {} | {} | <= 4 KiB | {} |",
                kib(ours),
                kib(theirs),
                yes_no(ours <= 4.0)
            );
        }
        if let Some(scale) = &self.scale {
            let p = &scale.plan;
            let _ = writeln!(
                md,
                "| controller: peak RSS, {} services x {} pods, {} streams (scenario 5) | {} | | <= 400 MiB | {} |",
                p.services,
                p.endpoints,
                p.streams,
                mib(scale.rss_peak_kib),
                yes_no(scale.rss_peak_kib <= 400 * 1024)
            );
            let _ = writeln!(
                md,
                "| controller: update propagation p99 (scenario 5) | {:.1} ms | | <= 100 ms | {} |",
                scale.propagation_p99_ms,
                yes_no(scale.propagation_p99_ms <= 100.0)
            );
        }
        md.push('\n');
        self.hop_protocol(md, direct, mesh);
    }

    /// The mesh beside both HAProxy pairs, on the figures that depend on the hop's protocol.
    fn hop_protocol(&self, md: &mut String, direct: &TopologyResult, mesh: &TopologyResult) {
        let (Some(http1), Some(http2)) = (self.topology("haproxy"), self.topology("haproxy-h2"))
        else {
            return;
        };
        let rate = self.plan.rates.first().copied().unwrap_or(1_000);
        let rate_key = format!("rate-{rate}");
        let max_key = format!("max-{}", self.plan.max_connections);
        let _ = writeln!(
            md,
            "### The hop's protocol\n\n\
             The HAProxy pair above speaks HTTP/1.1 between its two processes, one request at \
             a time on each of many connections. Scenario 7 runs a third pair, HAProxy speaking \
             HTTP/2 between its processes: one connection, many requests at once, cheaper under \
             load and dearer one request at a time. The mesh uses both: an HTTP/1.1 GET (or any \
             bodiless request of a method that may be repeated) goes as it is on one of two \
             HTTP/1 connections per thread while no request waits on the peer's HTTP/2 \
             connection, and joins the HTTP/2 connection otherwise. The targets above are \
             judged against the HTTP/1.1 pair; this table is for reference.\n"
        );
        let _ = writeln!(
            md,
            "| figure | mesh, mTLS | HAProxy, HTTP/1.1 hop | HAProxy, HTTP/2 hop |\n\
             |---|---|---|---|"
        );
        let topologies = [mesh, http1, http2];
        for (name, f) in LATENCIES {
            let cells: Vec<String> = topologies
                .iter()
                .map(|t| added(added_at(t, direct, &rate_key, f)))
                .collect();
            let _ = writeln!(md, "| added {name} at {rate} rps | {} |", cells.join(" | "));
        }
        let cells: Vec<String> = topologies
            .iter()
            .map(|t| ratio(throughput(t, direct, &max_key)))
            .collect();
        let _ = writeln!(
            md,
            "| throughput, {} connections, ratio to direct | {} |",
            self.plan.max_connections,
            cells.join(" | ")
        );
        for (key, label) in [
            (&rate_key, format!("at {rate} rps")),
            (&max_key, "at max".to_string()),
        ] {
            let cells: Vec<String> = topologies
                .iter()
                .map(|t| cpu(cpu_per_proxy(t, key)))
                .collect();
            let _ = writeln!(
                md,
                "| CPU seconds per 10,000 requests per proxy, {label} | {} |",
                cells.join(" | ")
            );
        }
        md.push('\n');
    }

    fn method(&self, md: &mut String) {
        let p = &self.plan;
        let rates: Vec<String> = p.rates.iter().map(|r| r.to_string()).collect();
        let _ = writeln!(
            md,
            "## How\n\n\
             - Open loop: `oha -q RATE --latency-correction` at {} rps over {} connections for {:.0} s \
             each; latency counts from when a request was due, so queueing is not hidden \
             (coordinated omission).\n\
             - Closed loop: `oha` with {} connections for {:.0} s: the maximum throughput.\n\
             - HTTP/2: `h2load`, prior knowledge, closed loop; latencies from its per-request log.\n\
             - CPU: utime + stime from `/proc/<pid>/stat` over each run, per proxy process, divided \
             by the successful requests. Memory: VmRSS from `/proc/<pid>/status` before any \
             traffic (idle), its largest value sampled every 250 ms during the runs (at load), \
             and with {} idle keep-alive connections open (each made one request; read 2 s after the last one opened).\n\
             - Every kind of run goes through all topologies before the next kind starts, so \
             background load spreads over all of them. mesh-proxy runs its default one thread \
             (unless a note says `MESH_PROXY_WORKER_THREADS`) and HAProxy as many (`nbthread`); \
             nginx one process.\n",
            rates.join(" and "),
            p.rate_connections,
            p.rate_duration.as_secs_f64(),
            p.max_connections,
            p.max_duration.as_secs_f64(),
            p.idle_connections
        );
    }

    fn direct_table(&self, md: &mut String, direct: &TopologyResult) {
        let _ = writeln!(
            md,
            "## Scenario 1: direct, client -> nginx (the baseline)\n\n\
             | run | p50 | p90 | p99 | p99.9 | throughput | errors |\n|---|---|---|---|---|---|---|"
        );
        for run in &direct.runs {
            let m = &run.measured;
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                run.kind.label(),
                us(m.p50_us),
                us(m.p90_us),
                us(m.p99_us),
                us(m.p999_us),
                rps(m.rps),
                m.errors
            );
        }
        let _ = writeln!(
            md,
            "\nnginx itself: RSS {} idle; CPU {} per 10,000 requests at max.\n",
            mib(direct.rss_idle_kib.first().copied().unwrap_or(0)),
            direct
                .run(&format!("max-{}", self.plan.max_connections))
                .and_then(|r| r.cpu_s_per_10k.first().copied())
                .map_or("–".into(), cpu)
        );
    }

    fn versus_table(
        &self,
        md: &mut String,
        n: u32,
        what: &str,
        direct: &TopologyResult,
        t: &TopologyResult,
    ) {
        let title = &t.topology.title;
        let _ = writeln!(md, "## Scenario {n}: {title}\n\n{what}.\n");
        let _ = writeln!(
            md,
            "| figure | direct | {title} | added or ratio |\n|---|---|---|---|"
        );
        for run in &t.runs {
            let Some(base) = direct.run(&run.key) else {
                continue;
            };
            let (m, b) = (&run.measured, &base.measured);
            let label = run.kind.label();
            if matches!(run.kind, crate::measure::RunKind::Rate { .. }) {
                for (name, ours, theirs) in [
                    ("p50", m.p50_us, b.p50_us),
                    ("p90", m.p90_us, b.p90_us),
                    ("p99", m.p99_us, b.p99_us),
                    ("p99.9", m.p999_us, b.p999_us),
                ] {
                    let _ = writeln!(
                        md,
                        "| {name}, {label} | {} | {} | {} |",
                        us(theirs),
                        us(ours),
                        added(ours - theirs)
                    );
                }
            } else {
                let _ = writeln!(
                    md,
                    "| throughput, {label} | {} | {} | {} |",
                    rps(b.rps),
                    rps(m.rps),
                    ratio(m.rps / b.rps)
                );
                let _ = writeln!(
                    md,
                    "| p50 / p99, {label} | {} / {} | {} / {} | {} / {} |",
                    us(b.p50_us),
                    us(b.p99_us),
                    us(m.p50_us),
                    us(m.p99_us),
                    added(m.p50_us - b.p50_us),
                    added(m.p99_us - b.p99_us)
                );
            }
            if m.errors > 0 || b.errors > 0 {
                let _ = writeln!(md, "| errors, {label} | {} | {} | |", b.errors, m.errors);
            }
        }
        for (i, watched) in t.topology.watched.iter().enumerate() {
            let role = &watched.role;
            let per_run: Vec<String> = t
                .runs
                .iter()
                .map(|r| {
                    format!(
                        "{} at {}",
                        r.cpu_s_per_10k.get(i).copied().map_or("–".into(), cpu),
                        short(&r.key)
                    )
                })
                .collect();
            let _ = writeln!(
                md,
                "| CPU per 10,000 requests, {role} | | {} | |",
                per_run.join("; ")
            );
            let max_run = t.run(&format!("max-{}", self.plan.max_connections));
            if let Some(r) = max_run {
                let _ = writeln!(
                    md,
                    "| CPU used at max, {role} | | {:.2} cores | |",
                    r.cpu_cores.get(i).copied().unwrap_or(f64::NAN)
                );
            }
            let idle = t.rss_idle_kib.get(i).copied().unwrap_or(0);
            let at_load = t
                .runs
                .iter()
                .filter_map(|r| r.rss_max_kib.get(i))
                .copied()
                .max()
                .unwrap_or(0);
            let _ = writeln!(md, "| RSS idle, {role} | | {} | |", mib(idle));
            let _ = writeln!(
                md,
                "| RSS at load (largest), {role} | | {} | |",
                mib(at_load)
            );
            if let Some(conns) = &t.idle {
                let with = conns.rss_kib.get(i).copied().unwrap_or(0);
                let per = kib_per_idle_connection(t, i);
                let per = if per.is_finite() {
                    format!("{per:.1} KiB per connection")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    md,
                    "| RSS with {} idle connections, {role} | | {} | {per} |",
                    conns.open,
                    mib(with)
                );
            }
        }
        if let Some(conns) = &t.idle
            && let Some(why) = &conns.shortfall
        {
            let _ = writeln!(
                md,
                "\nOnly {} of {} idle connections opened: {why}",
                conns.open, conns.requested
            );
        }
        md.push('\n');
    }

    fn conditions(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Conditions of each run\n\n\
             Load average before the run, and CPU used by other processes (not the benchmark's) \
             during it, in cores; of {} round(s), the run kept is the median by its headline figure \
             (p50 at a fixed rate, throughput in a closed loop) of those during which other \
             processes used no more than {} cores beyond the quietest (its round in \
             brackets).\n",
            self.plan.rounds,
            crate::measure::NOISE_CORES
        );
        let keys: Vec<String> = self
            .direct()
            .map(|d| d.runs.iter().map(|r| r.key.clone()).collect())
            .unwrap_or_default();
        let _ = write!(md, "| topology |");
        for key in &keys {
            let _ = write!(md, " {} |", short(key));
        }
        let _ = write!(md, "\n|---|");
        for _ in &keys {
            md.push_str("---|");
        }
        md.push('\n');
        for t in self.topologies.iter().chain(&self.netns) {
            let _ = write!(md, "| {} |", t.topology.title);
            for key in &keys {
                match t.run(key) {
                    Some(r) => {
                        let _ = write!(
                            md,
                            " {:.2} / {:.2} ({}) |",
                            r.loadavg_before,
                            r.other_cores,
                            r.round + 1
                        );
                    }
                    None => md.push_str(" |"),
                }
            }
            md.push('\n');
        }
        md.push('\n');
    }
}

fn short(key: &str) -> String {
    if let Some(rate) = key.strip_prefix("rate-") {
        format!("{rate} rps")
    } else if let Some(c) = key.strip_prefix("max-") {
        format!("max/{c}")
    } else if let Some(h2) = key.strip_prefix("h2-") {
        format!("h2 {h2}")
    } else {
        key.to_string()
    }
}

fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

fn verdict(met: bool, aim: bool, comparable: bool) -> &'static str {
    match (comparable, met, aim) {
        (false, _, _) => "–",
        (true, true, true) => "yes, and the aim",
        (true, true, false) => "yes",
        (true, false, _) => "no",
    }
}

fn scale_table(md: &mut String, s: &ScaleResult) {
    let p = &s.plan;
    let _ = writeln!(
        md,
        "## Scenario 5: controller scale\n\n\
         The real `mesh-controller`, file backend ({} ms poll), {} services x {} pods, {} \
         concurrent `Destination.Get` streams ({} per HTTP/2 connection), then {} edits each \
         flipping one pod's readiness ({} ms apart). Propagation: from the file's rename to the \
         update on a stream watching the service.\n",
        p.poll_interval.as_millis(),
        p.services,
        p.endpoints,
        p.streams,
        p.streams_per_connection,
        p.edits,
        p.edit_interval.as_millis()
    );
    let _ = writeln!(md, "| figure | value |\n|---|---|");
    let rows = [
        (
            "ready (first scan of every file)",
            format!("{:.2} s", s.ready_s),
        ),
        ("RSS, everything loaded, no stream", mib(s.rss_loaded_kib)),
        (
            "streams synced (first update on each)",
            format!(
                "{} of {} in {:.2} s",
                s.streams_open, p.streams, s.streams_synced_s
            ),
        ),
        ("RSS with every stream open", mib(s.rss_streams_kib)),
        (
            "CPU with streams open, nothing changing",
            format!("{:.3} cores", s.idle_streams_cores),
        ),
        (
            "updates received / expected",
            format!("{} / {}", s.updates_received, s.updates_expected),
        ),
        ("propagation p50", format!("{:.1} ms", s.propagation_p50_ms)),
        ("propagation p99", format!("{:.1} ms", s.propagation_p99_ms)),
        ("propagation max", format!("{:.1} ms", s.propagation_max_ms)),
        ("CPU during the churn", format!("{:.2} s", s.churn_cpu_s)),
        ("RSS after the churn", mib(s.rss_after_churn_kib)),
        ("peak RSS (VmHWM)", mib(s.rss_peak_kib)),
    ];
    for (name, value) in rows {
        let _ = writeln!(md, "| {name} | {value} |");
    }
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(us(84.4), "84 µs");
        assert_eq!(us(1_150.0), "1.15 ms");
        assert_eq!(added(-12.0), "−12 µs");
        assert_eq!(added(253.0), "+253 µs");
        assert_eq!(rps(1_234_567.4), "1,234,567 rps");
        assert_eq!(rps(999.0), "999 rps");
        assert_eq!(mib(20 * 1024), "20.0 MiB");
        assert_eq!(ratio(0.271), "0.27x");
        assert_eq!(short("rate-1000"), "1000 rps");
    }
}
