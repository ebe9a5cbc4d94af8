//! `meshctl demo`: the whole mesh on this machine. Brings up the built-in demo app
//! ([`crate::demo_app::MANIFEST`]) with `meshctl local up`, waits for its traffic, then opens
//! the dashboard; `--headless` instead waits `--duration`, prints a summary and says whether
//! the mesh is healthy (exit status 1 when not). The local mesh is taken down at the end, on
//! Ctrl-C and on failure, unless `--keep` asks to leave it running.
//!
//! It drives the local runtime through its command line (`meshctl local up/status/down`), so
//! the demo is exactly what a user gets from `meshctl local up -f` on the same YAML.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use mesh_proto::stats::{ResourceSelector, StatsRow};

use crate::demo_app;
use crate::stat;

/// How long the demo waits for the first successful request through web.
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(60);

/// `meshctl demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// No terminal UI: wait --duration, print a summary, exit 1 when the mesh is unhealthy.
    #[arg(long)]
    headless: bool,
    /// With --headless: how long to watch the traffic, e.g. 30s or 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Leave the mesh running at the end (`meshctl local down` stops it).
    #[arg(long)]
    keep: bool,
    /// Isolation of the pods: auto (root mode as root, else loopback), root or loopback.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// The local mesh's state folder (default: as `meshctl local`).
    #[arg(long, env = "MESH_LOCAL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Names the local mesh (see `meshctl local up --instance`).
    #[arg(long)]
    instance: Option<String>,
    /// Print the demo's Kubernetes YAML and exit.
    #[arg(long)]
    print_manifest: bool,
}

/// Runs `meshctl demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let meshctl = std::env::current_exe().context("finding meshctl's own path")?;
    if args.print_manifest {
        print!("{}", demo_app::MANIFEST);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let local = LocalMesh {
        meshctl: meshctl.clone(),
        state_dir: args.state_dir.clone(),
    };
    // Ctrl-C must reach this process as a signal we handle (so the mesh is taken down), not
    // kill it: listen before anything starts.
    let interrupted = runtime.block_on(async { interrupt_flag() });

    let manifest = write_manifest(&meshctl)?;
    let up = local.up(&manifest.path, &args);
    drop(manifest);
    if let Err(error) = up {
        if interrupted.is_set() {
            // `local up` was interrupted too; it may have left the supervisor running.
            local.down();
            bail!("interrupted");
        }
        return Err(error);
    }
    // From here on the mesh runs: take it down whatever happens, unless asked to keep it.
    let guard = DownGuard {
        local: &local,
        keep: args.keep,
    };
    let result = runtime.block_on(async {
        let controller = local.controller()?;
        tokio::select! {
            result = watch(&controller, &args) => result,
            () = interrupted.wait() => bail!("interrupted"),
        }
    });
    drop(guard);
    result
}

/// Waits for traffic, then shows the dashboard or the headless summary.
async fn watch(controller: &str, args: &DemoArgs) -> anyhow::Result<()> {
    eprintln!("meshctl demo: waiting for traffic through web (controller at {controller})");
    let mut client = wait_for_traffic(controller).await?;
    if !args.headless {
        let local = crate::controller::Controller::local(controller);
        return tokio::task::spawn_blocking(move || {
            crate::dashboard::run_blocking(crate::dashboard::Options::new(
                local,
                Some(demo_app::NAMESPACE.to_owned()),
                format!("meshctl demo — namespace {}", demo_app::NAMESPACE),
            ))
        })
        .await
        .context("the dashboard task failed")?;
    }
    let started = Instant::now();
    eprintln!(
        "meshctl demo: traffic flows; watching it for {}",
        humanize(args.duration)
    );
    while started.elapsed() < args.duration {
        let left = args.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(10))).await;
        if started.elapsed() < args.duration {
            eprintln!(
                "meshctl demo: {} left",
                humanize(args.duration.saturating_sub(started.elapsed()))
            );
        }
    }
    let selector = ResourceSelector {
        kind: "deployment".to_owned(),
        namespace: demo_app::NAMESPACE.to_owned(),
        name: String::new(),
    };
    let window = args.duration.max(Duration::from_secs(5));
    let rows = stat::summary(&mut client, selector.clone(), window, None).await?;
    let mesh_proto::stats::EdgesResponse { edges, denials, .. } =
        stat::edges(&mut client, selector, window).await?;
    println!(
        "Traffic of the last {} in namespace {}:",
        humanize(window),
        demo_app::NAMESPACE
    );
    print!("{}", stat::stat_table(&rows));
    if !edges.is_empty() {
        println!("\nEdges:");
        print!("{}", stat::edges_table(&edges));
    }
    if !denials.is_empty() {
        println!("\nRefused by policy:");
        print!("{}", stat::denials_table(&denials));
    }
    let problems = assess(&rows);
    if problems.is_empty() {
        println!("\nThe mesh is healthy.");
        Ok(())
    } else {
        println!("\nThe mesh is NOT healthy:");
        for problem in &problems {
            println!("  - {problem}");
        }
        bail!(
            "the demo's mesh is not healthy ({} problems)",
            problems.len()
        )
    }
}

/// Connects to the controller and waits until web has served requests, bounded.
async fn wait_for_traffic(
    controller: &str,
) -> anyhow::Result<
    mesh_proto::stats::stats_client::StatsClient<crate::controller::ControllerChannel>,
> {
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let local = crate::controller::Controller::local(controller);
    loop {
        let problem = match stat::connect(&local).await {
            Ok(mut client) => {
                let selector = ResourceSelector {
                    kind: "deployment".to_owned(),
                    namespace: demo_app::NAMESPACE.to_owned(),
                    name: "web".to_owned(),
                };
                match stat::summary(&mut client, selector, Duration::from_secs(10), None).await {
                    Ok(rows)
                        if rows
                            .iter()
                            .any(|r| r.requests.is_some_and(|q| q.success_count > 0)) =>
                    {
                        return Ok(client);
                    }
                    Ok(_) => "web has served no request yet".to_owned(),
                    Err(error) => format!("{error:#}"),
                }
            }
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "no traffic through web within {}: {problem} (see `meshctl local logs deploy/traffic -n demo`)",
                humanize(TRAFFIC_TIMEOUT)
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What is wrong with the demo's mesh, judged from its workloads' rows: the serving
/// workloads must have traffic and mTLS, and web must mostly succeed.
pub fn assess(rows: &[StatsRow]) -> Vec<String> {
    let mut problems = Vec::new();
    for workload in demo_app::SERVING_WORKLOADS {
        let row = rows.iter().find(|row| {
            row.resource
                .as_ref()
                .is_some_and(|r| r.name == *workload && r.kind == "deployment")
        });
        let Some(row) = row else {
            problems.push(format!("no stats for deployment {workload}"));
            continue;
        };
        let requests = row.requests.unwrap_or_default();
        if !stat::has_traffic(row) {
            problems.push(format!("{workload} served no requests"));
            continue;
        }
        if requests.mtls_share <= 0.0 {
            problems.push(format!(
                "none of {workload}'s requests used mutual TLS (does the controller serve identities?)"
            ));
        }
        if *workload == "web" && requests.success_rate < 0.5 {
            problems.push(format!(
                "web's success rate is {} (below 50%)",
                stat::percent(requests.success_rate, true)
            ));
        }
    }
    problems
}

/// The demo's YAML in a file of its own, with this meshctl as the containers' program (the
/// local runtime resolves a bare `meshctl` on PATH, where it may not be).
struct ManifestFile {
    path: PathBuf,
}

impl Drop for ManifestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write_manifest(meshctl: &Path) -> anyhow::Result<ManifestFile> {
    let path = std::env::temp_dir().join(format!("mesh-demo-{}.yaml", std::process::id()));
    std::fs::write(&path, manifest_for(meshctl))
        .with_context(|| format!("writing the demo's YAML to {}", path.display()))?;
    Ok(ManifestFile { path })
}

/// [`demo_app::MANIFEST`] with `"meshctl"` replaced by `meshctl`'s path (as a JSON string,
/// which YAML reads as a double-quoted scalar).
pub fn manifest_for(meshctl: &Path) -> String {
    let quoted = serde_json::Value::String(meshctl.display().to_string()).to_string();
    demo_app::MANIFEST.replace("[\"meshctl\",", &format!("[{quoted},"))
}

/// The local mesh, through meshctl's own `local` commands.
struct LocalMesh {
    meshctl: PathBuf,
    state_dir: Option<PathBuf>,
}

impl LocalMesh {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.meshctl);
        command.args(args);
        if let Some(dir) = &self.state_dir {
            command.arg("--state-dir").arg(dir);
        }
        command
    }

    /// `meshctl local up -f FILE`, its progress on our terminal.
    fn up(&self, manifest: &Path, args: &DemoArgs) -> anyhow::Result<()> {
        let mut command = self.command(&["local", "up"]);
        command
            .arg("-f")
            .arg(manifest)
            .args(["--mode", &args.mode])
            // Any free loopback ports: a fixed one may be taken, and stat/dashboard find
            // the forward in the state anyway.
            .args(["--controller-port", "0", "--controller-admin-port", "0"]);
        if let Some(instance) = &args.instance {
            command.args(["--instance", instance]);
        }
        eprintln!("meshctl demo: starting the demo app in a local mesh");
        let status = command
            .stdin(Stdio::null())
            .status()
            .context("running `meshctl local up`")?;
        if !status.success() {
            bail!("`meshctl local up` failed ({status}); its output above says why");
        }
        Ok(())
    }

    /// The controller's gRPC address from this machine.
    fn controller(&self) -> anyhow::Result<String> {
        crate::controller::local_address(self.state_dir.as_deref())
    }

    /// `meshctl local down`; failures are reported, not returned (it runs on the way out).
    fn down(&self) {
        eprintln!("meshctl demo: taking the local mesh down");
        match self
            .command(&["local", "down"])
            .stdin(Stdio::null())
            .status()
        {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!(
                "meshctl demo: `meshctl local down` failed ({status}); run it again to clean up"
            ),
            Err(error) => eprintln!("meshctl demo: cannot run `meshctl local down`: {error}"),
        }
    }
}

/// Takes the mesh down when dropped: at the end, on error and after Ctrl-C.
struct DownGuard<'a> {
    local: &'a LocalMesh,
    keep: bool,
}

impl Drop for DownGuard<'_> {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "meshctl demo: left running (--keep): `meshctl stat -n demo`, `meshctl dashboard`, \
                 `meshctl local down` to stop it"
            );
        } else {
            self.local.down();
        }
    }
}

/// Whether Ctrl-C (or SIGTERM) arrived; listening starts when it is made.
#[derive(Clone)]
struct InterruptFlag(tokio::sync::watch::Receiver<bool>);

impl InterruptFlag {
    fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    async fn wait(&self) {
        let mut receiver = self.0.clone();
        let _ = receiver.wait_for(|set| *set).await;
    }
}

/// Starts listening for Ctrl-C and SIGTERM (call inside the runtime).
fn interrupt_flag() -> InterruptFlag {
    let (sender, receiver) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::spawn(async move {
        let term = async {
            match term.as_mut() {
                Some(term) => {
                    term.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        eprintln!("meshctl demo: interrupted; stopping");
        let _ = sender.send(true);
    });
    InterruptFlag(receiver)
}

/// `30s`, `2m`, `1m30s`.
fn humanize(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match (seconds / 60, seconds % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

/// Parses `500ms`, `30s`, `2m` or `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("an empty duration (use e.g. 30s or 2m)".to_owned());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration like 30s, 2m or 1m30s"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        total += match unit {
            "ms" => Duration::from_millis(number),
            "s" | "" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m or h)")),
        };
        rest = next;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use mesh_proto::stats::{RequestStats, ResourceRef};

    use super::*;

    #[test]
    fn durations_parse() {
        for (text, want) in [
            ("30s", Some(30_000)),
            ("2m", Some(120_000)),
            ("1m30s", Some(90_000)),
            ("500ms", Some(500)),
            ("20", Some(20_000)),
            ("", None),
            ("soon", None),
            ("5d", None),
        ] {
            let got = parse_duration(text).ok().map(|d| d.as_millis() as u64);
            assert_eq!(got, want, "{text:?}");
        }
        assert_eq!(humanize(Duration::from_secs(90)), "1m30s");
        assert_eq!(humanize(Duration::from_secs(20)), "20s");
    }

    #[test]
    fn the_manifest_runs_this_meshctl() {
        let yaml = manifest_for(Path::new("/opt/my mesh/meshctl"));
        assert!(yaml.contains(r#"command: ["/opt/my mesh/meshctl", "demo-app", "web"]"#));
        assert!(!yaml.contains(r#"["meshctl","#));
    }

    fn row(name: &str, rps: f64, success: f64, mtls: f64) -> StatsRow {
        StatsRow {
            resource: Some(ResourceRef {
                kind: "deployment".into(),
                namespace: "demo".into(),
                name: name.into(),
            }),
            meshed_pods: 1,
            running_pods: 1,
            requests: Some(RequestStats {
                success_count: (rps * 30.0 * success) as u64,
                failure_count: (rps * 30.0 * (1.0 - success)) as u64,
                request_rate: rps,
                success_rate: success,
                mtls_share: mtls,
                ..RequestStats::default()
            }),
            tcp: None,
        }
    }

    #[test]
    fn health_is_judged_from_the_serving_workloads() {
        let healthy = vec![
            row("web", 10.0, 0.95, 1.0),
            row("books", 10.0, 0.95, 1.0),
            row("authors", 10.0, 1.0, 1.0),
            row("traffic", 0.0, 0.0, 0.0),
        ];
        assert_eq!(assess(&healthy), Vec::<String>::new());
        let cases: Vec<(Vec<StatsRow>, &str)> = vec![
            (vec![], "no stats for deployment web"),
            (
                vec![
                    row("web", 0.0, 0.0, 0.0),
                    healthy[1].clone(),
                    healthy[2].clone(),
                ],
                "web served no requests",
            ),
            (
                vec![
                    row("web", 10.0, 0.3, 1.0),
                    healthy[1].clone(),
                    healthy[2].clone(),
                ],
                "web's success rate is 30.00% (below 50%)",
            ),
            (
                vec![
                    healthy[0].clone(),
                    row("books", 10.0, 0.95, 0.0),
                    healthy[2].clone(),
                ],
                "none of books's requests used mutual TLS",
            ),
        ];
        for (rows, want) in cases {
            let problems = assess(&rows);
            assert!(
                problems.iter().any(|p| p.starts_with(want)),
                "{want:?} not in {problems:?}"
            );
        }
    }
}
