//! `mesh-bench`: runs the benchmark scenarios with real processes on loopback and writes
//! BENCHMARKS.md and bench-results.json at the repository root. `just bench` runs it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use mesh_bench::child::{Service, free_addr};
use mesh_bench::machine::Machine;
use mesh_bench::measure::{self, Generator};
use mesh_bench::pki::TestCa;
use mesh_bench::plan::{Plan, ScalePlan};
use mesh_bench::report::Report;
use mesh_bench::topology::{self, Backend, Binaries, HaproxyHop, Running};
use mesh_bench::{backend, procfs, scale};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Every scenario at 1,000 and 5,000 rps; under 10 minutes.
    Full,
    /// Shorter runs at 1,000 rps only, a smaller controller scenario; under 2 minutes.
    Quick,
}

/// Benchmarks the mesh against a direct path and HAProxy, with real processes on loopback.
#[derive(Debug, Parser)]
#[command(name = "mesh-bench", version, about)]
struct Args {
    /// How much to measure.
    #[arg(value_enum, default_value = "full")]
    mode: Mode,
    /// Where to write BENCHMARKS.md and bench-results.json (default: the repository root).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Use the release binaries as they are instead of running `cargo build --release`.
    #[arg(long)]
    no_build: bool,
    /// Take mesh-proxy and mesh-controller from this folder (implies --no-build), e.g. a
    /// release build of another checkout.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Skip scenario 5 (controller scale).
    #[arg(long)]
    skip_scale: bool,
    /// Run scenario 5 (controller scale) alone and print its figures; writes no report. For
    /// iterating on the controller.
    #[arg(long, conflicts_with_all = ["skip_scale", "hold"])]
    only_scale: bool,
    /// Start the topologies, print where they listen and their pids, keep them up this many
    /// seconds (for profiling with perf or valgrind), then stop without measuring.
    #[arg(long, value_name = "SECONDS")]
    hold: Option<u64>,
    /// A note for the report (repeatable), e.g. where the binaries came from.
    #[arg(long = "note")]
    notes: Vec<String>,
    /// Skip scenario 6 (the mesh across network namespaces with iptables capture; it runs
    /// only as root).
    #[arg(long)]
    skip_netns: bool,
    /// Internal: relay TCP connections on LISTEN to the Unix socket SOCKET, then nothing else
    /// (scenario 6 runs this inside its network namespaces to reach the control plane).
    #[arg(long, hide = true, num_args = 2, value_names = ["LISTEN", "SOCKET"])]
    relay: Option<Vec<String>>,
}

/// The whole run must stay under this; scenario 5 is skipped if the rest ran long.
const BUDGET: Duration = Duration::from_secs(9 * 60);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn say(message: &str) {
    eprintln!("mesh-bench: {message}");
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if let Some(relay) = args.relay {
        let (listen, socket) = match relay.as_slice() {
            [listen, socket] => (listen.parse().context("--relay LISTEN")?, socket.into()),
            _ => bail!("--relay takes LISTEN and SOCKET"),
        };
        return runtime.block_on(mesh_bench::netns::relay_in_namespace(listen, socket));
    }
    runtime.block_on(async {
        // On ctrl-c or SIGTERM the run is dropped, and with it every process it started.
        tokio::select! {
            result = run(args) => result,
            () = interrupted() => bail!("interrupted; every process the benchmark started is stopped"),
        }
    })
}

async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn release_dir(repo: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
        .join("release")
}

fn cargo_build(repo: &Path) -> Result<()> {
    say("building mesh-proxy and mesh-controller (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    // `cargo run` gave this process its package's variables (CARGO_MANIFEST_DIR, CARGO_PKG_*).
    // Build scripts that watch one (ring's does) would see it change between `just bench`'s own
    // build and this one, and every run would rebuild them and all that depends on them.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_PKG_")
            || matches!(
                &*name,
                "CARGO_BIN_NAME" | "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            command.env_remove(&*name);
        }
    }
    let status = command
        .current_dir(repo)
        .args([
            "build",
            "--release",
            "-p",
            "mesh-proxy",
            "-p",
            "mesh-controller",
            "--bins",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p mesh-proxy -p mesh-controller failed");
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let repo = repo_root();
    // Before the run, not after it: a report with nowhere to go would lose minutes of work.
    if let Some(out_dir) = &args.out_dir {
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("creating the output folder {}", out_dir.display()))?;
    }
    let mut plan = match args.mode {
        Mode::Full => Plan::full(),
        Mode::Quick => Plan::quick(),
    };
    if args.skip_scale {
        plan.scale = None;
    }
    if !args.no_build && args.bin_dir.is_none() {
        cargo_build(&repo)?;
    }
    // The time budget counts from here: the build is not part of the benchmark.
    let started = Instant::now();
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| release_dir(&repo));
    let binaries = Binaries {
        proxy: bin_dir.join("mesh-proxy"),
        controller: bin_dir.join("mesh-controller"),
    };
    for binary in [&binaries.proxy, &binaries.controller] {
        if !binary.is_file() {
            bail!(
                "{} is missing: run `cargo build --release -p mesh-proxy -p mesh-controller`",
                binary.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    say(&format!(
        "working in {} (logs of every process)",
        dir.display()
    ));
    if args.only_scale {
        let scale_plan = plan.scale.as_ref().context("this mode has no scenario 5")?;
        let result = controller_scale(scale_plan, &binaries, &dir).await?;
        println!("{}", serde_json::to_string_pretty(&result)?);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }

    let proxy = binaries.proxy.display().to_string();
    let machine = Machine::detect(
        &repo,
        &[
            ("mesh-proxy", proxy.as_str(), &["--version"]),
            ("oha", "oha", &["--version"]),
            ("h2load", "h2load", &["--version"]),
            ("nginx", "nginx", &["-v"]),
            ("haproxy", "haproxy", &["-v"]),
        ],
    );
    let mut notes = args.notes.clone();
    if let Some(dir) = &args.bin_dir {
        notes.push(format!(
            "mesh-proxy and mesh-controller from {} (not built from this checkout).",
            dir.display()
        ));
    }
    let threads = topology::proxy_threads()?;
    if threads != 1 {
        notes.push(format!(
            "The proxies ran {threads} threads each: mesh-proxy with \
             MESH_PROXY_WORKER_THREADS={threads}, HAProxy with nbthread {threads}."
        ));
    }
    let netns = if args.skip_netns {
        false
    } else if mesh_bench::netns::is_root() {
        true
    } else {
        notes.push("Scenario 6 (network namespaces and iptables) skipped: it needs root.".into());
        false
    };
    let result = measure_topologies(
        &plan, &binaries, &dir, &mut notes, args.hold, netns, threads,
    )
    .await;
    let (topologies, netns) = match result {
        Ok(t) => t,
        Err(error) => {
            say(&format!("failed; the logs are in {}", dir.display()));
            return Err(error);
        }
    };
    if args.hold.is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }

    let scale = match &plan.scale {
        None => None,
        // Scenario 5 takes under a minute at full size.
        Some(_) if started.elapsed() > BUDGET - Duration::from_secs(60) => {
            notes.push("Scenario 5 skipped: the other scenarios used the time budget.".into());
            None
        }
        Some(scale_plan) => match controller_scale(scale_plan, &binaries, &dir).await {
            Ok(result) => Some(result),
            Err(error) => {
                say(&format!("scenario 5 failed: {error:#}"));
                notes.push(format!("Scenario 5 failed: {error:#}"));
                None
            }
        },
    };

    // A failed request through the mesh fails the benchmark; one of a baseline is noted only
    // (h2load against nginx alone fails about one request in a few million).
    let mut failures = Vec::new();
    for t in topologies.iter().chain(&netns) {
        for failure in measure::failed_runs(&t.topology.title, &t.all_runs) {
            if t.topology.is_mesh() {
                notes.push(format!("**Failed run.** {failure}."));
                failures.push(failure);
            } else {
                notes.push(format!("A baseline failed requests: {failure}."));
            }
        }
    }
    let report = Report {
        machine,
        plan,
        topologies,
        netns,
        scale,
        notes,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let out_dir = args.out_dir.unwrap_or(repo);
    let json = out_dir.join("bench-results.json");
    let md = out_dir.join("BENCHMARKS.md");
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    say(&format!(
        "wrote {} and {} in {:.0} s",
        md.display(),
        json.display(),
        report.elapsed_s
    ));
    if !failures.is_empty() {
        bail!(
            "{} runs through the mesh had failed requests (each is noted in {}):\n{}",
            failures.len(),
            md.display(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// Scenarios 1 to 4, then 6 when `netns`: start everything, measure, stop everything.
/// Returns the loopback topologies' results and the namespaces' (empty when not run).
async fn measure_topologies(
    plan: &Plan,
    binaries: &Binaries,
    dir: &Path,
    notes: &mut Vec<String>,
    hold: Option<u64>,
    netns: bool,
    threads: usize,
) -> Result<(Vec<measure::TopologyResult>, Vec<measure::TopologyResult>)> {
    let localhost = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let backend_addrs = Backend {
        http1: free_addr(localhost)?,
        http2: free_addr(localhost)?,
    };
    let mut running = Running::default();
    let nginx = backend::start_nginx(dir, backend_addrs.http1, backend_addrs.http2).await?;
    let nginx_pid = running.keep(nginx)?;
    let mut topologies = vec![topology::direct(backend_addrs, nginx_pid)];
    let ca = Arc::new(TestCa::new()?);
    say("starting the controller and two pairs of mesh proxies");
    let (meshes, control) =
        topology::start_meshes(binaries, backend_addrs, &ca, dir, &mut running).await?;
    topologies.extend(meshes);
    let limit = procfs::open_files_limit().unwrap_or(1024);
    let maxconn = (limit.saturating_sub(200) / 2).max(plan.idle_connections as u64 + 100);
    for (protocol, scenario) in [(HaproxyHop::Http1, 4), (HaproxyHop::Http2, 7)] {
        say(&format!(
            "starting two HAProxy processes, {protocol:?} between them"
        ));
        let limits = (maxconn, threads);
        match topology::start_haproxy(backend_addrs, protocol, &ca, dir, &mut running, limits).await
        {
            Ok(haproxy) => topologies.push(haproxy),
            Err(error) => {
                say(&format!("HAProxy did not start: {error:#}"));
                notes.push(format!(
                    "HAProxy (scenario {scenario}) did not start: {error:#}"
                ));
            }
        }
    }
    if let Some(seconds) = hold {
        for t in &topologies {
            let pids: Vec<String> = t
                .watched
                .iter()
                .map(|w| format!("{} pid {}", w.role, w.pid))
                .collect();
            say(&format!(
                "{}: http://{}/ with Host {:?}; {}",
                t.title,
                t.http1.addr,
                t.http1.host.as_deref().unwrap_or("-"),
                pids.join(", ")
            ));
        }
        say(&format!("holding for {seconds} s"));
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        running.stop().await;
        return Ok((Vec::new(), Vec::new()));
    }
    let ctx = measure::Bench {
        ticks: procfs::ticks_per_second(),
        our_pids: running.pids(),
        generator: Generator::External,
        dir: dir.to_path_buf(),
    };
    let result = measure::measure_all(&ctx, plan, &topologies, &|line| say(line)).await;
    if let Err(error) = running.check_alive() {
        say(&format!("{error:#}"));
    }
    let across_namespaces = match (&result, netns) {
        (Ok(_), true) => match namespaces(plan, binaries, &control, &ctx).await {
            Ok(results) => results,
            Err(error) => {
                say(&format!("scenario 6 failed: {error:#}"));
                notes.push(format!("Scenario 6 failed: {error:#}"));
                Vec::new()
            }
        },
        _ => Vec::new(),
    };
    running.stop().await;
    Ok((result?, across_namespaces))
}

/// Scenario 6: the direct path and the meshed hop with mutual TLS across two network
/// namespaces with iptables capture; the same rates and closed loop as on loopback, one round
/// (no HTTP/2, no idle connections: the generator runs inside the client namespace).
async fn namespaces(
    plan: &Plan,
    binaries: &Binaries,
    control: &mesh_bench::netns::ControlPlane,
    ctx: &measure::Bench,
) -> Result<Vec<measure::TopologyResult>> {
    say("scenario 6: two network namespaces with iptables capture");
    let (lab, topologies) = mesh_bench::netns::start(binaries, control, &ctx.dir).await?;
    // One round: with two, scenario 6 would push scenario 5 past the time budget.
    let plan = Plan {
        rounds: 1,
        h2: None,
        idle_connections: 0,
        ..plan.clone()
    };
    let ctx = measure::Bench {
        our_pids: ctx.our_pids.iter().copied().chain(lab.pids()).collect(),
        ..ctx.clone()
    };
    let result = measure::measure_all(&ctx, &plan, &topologies, &|line| say(line)).await;
    lab.stop().await;
    result
}

/// Scenario 5 with the real controller binary.
async fn controller_scale(
    plan: &ScalePlan,
    binaries: &Binaries,
    dir: &Path,
) -> Result<scale::ScaleResult> {
    say(&format!(
        "scenario 5: {} services x {} pods, {} streams",
        plan.services, plan.endpoints, plan.streams
    ));
    let config = dir.join("scale-config");
    scale::write_files(plan, &config)?;
    let started = Instant::now();
    let (controller, url, _admin): (Service, String, _) = topology::start_controller(
        &binaries.controller,
        &config,
        None,
        dir,
        "scale-controller",
        plan.poll_interval,
    )
    .await?;
    let ready_s = started.elapsed().as_secs_f64();
    let result = scale::measure(plan, &config, &url, controller.pid()?, ready_s).await;
    controller.stop().await;
    let result = result?;
    say(&format!(
        "    propagation p50 {:.1} ms, p99 {:.1} ms; RSS {:.1} MiB with {} streams",
        result.propagation_p50_ms,
        result.propagation_p99_ms,
        result.rss_streams_kib as f64 / 1024.0,
        result.streams_open
    ));
    Ok(result)
}
