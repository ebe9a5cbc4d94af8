//! `meshctl demo`, end to end as a user runs it, in root mode (network namespaces, iptables
//! capture, mTLS all real): `--headless` must print a summary with traffic and mTLS for web,
//! books and authors and exit 0; and the dashboard, driven in tmux, must start, sort, filter,
//! drill in and quit, taking the mesh down.
//!
//! Those two need root and say so loudly when they cannot run (failing under CI=true); the
//! headless demo in loopback mode (apps through `HTTP_PROXY`) runs anywhere. Every wait is
//! bounded, and a guard takes the local mesh down when a test fails half way.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_integration_tests::bin_path;
use mesh_integration_tests::netns::require_root;
use mesh_integration_tests::process::run_bounded;

/// meshctl, with mesh-proxy and mesh-controller built beside it (where `local up` looks).
fn meshctl() -> PathBuf {
    bin_path("mesh-proxy");
    bin_path("mesh-controller");
    bin_path("meshctl")
}

/// A state folder and instance name of this test's own (tests run in parallel), and
/// `meshctl local down` on drop in case the demo did not take its mesh down.
struct DemoMesh {
    meshctl: PathBuf,
    state_dir: PathBuf,
    instance: String,
}

impl DemoMesh {
    fn new(test: &str) -> DemoMesh {
        let instance = format!("dm{}{}", test, std::process::id() % 100_000);
        let state_dir = std::env::temp_dir().join(format!("mesh-demo-test-{instance}"));
        DemoMesh {
            meshctl: meshctl(),
            state_dir,
            instance,
        }
    }

    /// `meshctl demo ARGS --mode MODE --state-dir DIR --instance NAME` as words.
    fn demo_args(&self, mode: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec!["demo".into()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.extend([
            "--mode".into(),
            mode.into(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--instance".into(),
            self.instance.clone(),
        ]);
        args
    }

    /// The network namespaces of this mesh still present.
    fn namespaces_left(&self) -> Vec<String> {
        let output = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| name.starts_with(&self.instance))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for DemoMesh {
    fn drop(&mut self) {
        if self.state_dir.exists() {
            let _ = Command::new(&self.meshctl)
                .args(["local", "down", "--state-dir"])
                .arg(&self.state_dir)
                .status();
        }
    }
}

/// The summary's row of one workload, as its columns: NAMESPACE NAME MESHED SUCCESS RPS
/// P50 P95 P99 MTLS TCP_CONN.
fn summary_row<'a>(summary: &'a str, workload: &str) -> Vec<&'a str> {
    summary
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|columns| columns.len() == 10 && columns[0] == "demo" && columns[1] == workload)
        .unwrap_or_else(|| panic!("no summary row for {workload} in\n{summary}"))
}

fn percent(cell: &str) -> f64 {
    cell.trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("{cell:?} is not a percentage"))
}

#[test]
fn demo_headless_reports_traffic_and_mtls_for_every_service() {
    if !require_root("demo_headless_reports_traffic_and_mtls_for_every_service") {
        return;
    }
    let mesh = DemoMesh::new("h");
    let args = mesh.demo_args("root", &["--headless", "--duration", "20s"]);
    let (success, stdout, stderr) = run_bounded(&mesh.meshctl, &args, Duration::from_secs(300));
    assert!(
        success,
        "meshctl demo --headless failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_healthy_summary(&stdout);
    assert!(
        stderr.contains("taking the local mesh down"),
        "the demo takes its mesh down\n{stderr}"
    );
    assert!(!mesh.state_dir.exists(), "the state folder is removed");
    assert_eq!(mesh.namespaces_left(), Vec::<String>::new());
}

/// Loopback mode runs anywhere (no root): the apps reach each other through their proxy as
/// `HTTP_PROXY` (HTTP/1.1 in absolute form, HTTP/2 and gRPC by authority), still with mTLS.
#[test]
fn demo_headless_in_loopback_mode_reports_traffic_and_mtls() {
    let mesh = DemoMesh::new("l");
    let args = mesh.demo_args("loopback", &["--headless", "--duration", "15s"]);
    let (success, stdout, stderr) = run_bounded(&mesh.meshctl, &args, Duration::from_secs(300));
    assert!(
        success,
        "meshctl demo --headless --mode loopback failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_healthy_summary(&stdout);
    assert!(!mesh.state_dir.exists(), "the state folder is removed");
}

/// The summary has traffic and mTLS for web, books and authors, web mostly succeeds, and
/// the denial of traffic's calls to archive shows with its policy.
fn assert_healthy_summary(stdout: &str) {
    for workload in ["web", "books", "authors"] {
        let row = summary_row(stdout, workload);
        let rps: f64 = row[4]
            .parse()
            .unwrap_or_else(|_| panic!("{workload}: RPS {:?} is not a number", row[4]));
        assert!(rps >= 5.0, "{workload} has too little traffic: {row:?}");
        assert!(
            percent(row[8]) > 99.0,
            "{workload} is not all mTLS: {row:?}"
        );
        assert_eq!(row[2], "1/1", "{workload} is meshed: {row:?}");
    }
    assert!(
        percent(summary_row(stdout, "web")[3]) > 50.0,
        "web mostly succeeds\n{stdout}"
    );
    assert!(
        stdout.contains("default:deny") && stdout.contains("ns/demo/sa/traffic"),
        "the denial of traffic's calls to archive is reported\n{stdout}"
    );
    assert!(stdout.contains("The mesh is healthy."), "{stdout}");
}

/// A tmux session running a command, killed on drop.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start(session: &str, command: &str) -> Tmux {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", session])
            .output();
        let status = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                session,
                "-x",
                "140",
                "-y",
                "45",
                command,
            ])
            .status()
            .expect("tmux runs");
        assert!(status.success(), "tmux new-session failed");
        Tmux {
            session: session.to_owned(),
        }
    }

    fn keys(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .expect("tmux send-keys runs");
        assert!(status.success(), "tmux send-keys {keys:?} failed");
    }

    fn screen(&self) -> String {
        let output = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .expect("tmux capture-pane runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until the screen satisfies `ready`, at most `limit`; returns the screen.
    fn wait_for(&self, what: &str, limit: Duration, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if ready(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .output();
    }
}

/// The workloads table's line of `workload` (the table's rows start with `│`).
fn table_line<'a>(screen: &'a str, workload: &str) -> Option<&'a str> {
    screen.lines().find(|line| {
        let cells: Vec<&str> = line
            .trim_matches(|c| c == '│' || c == ' ')
            .trim_start_matches('▶')
            .split_whitespace()
            .collect();
        cells.len() >= 9 && cells[0] == "demo" && cells[1] == workload
    })
}

#[test]
fn demo_dashboard_in_tmux_starts_sorts_drills_in_and_quits() {
    if !require_root("demo_dashboard_in_tmux_starts_sorts_drills_in_and_quits") {
        return;
    }
    if Command::new("tmux").arg("-V").output().is_err() {
        let message = "demo_dashboard_in_tmux_starts_sorts_drills_in_and_quits: NOT RUN: tmux is not installed (apt-get install tmux)";
        assert!(
            std::env::var("CI").map_or(true, |ci| ci != "true"),
            "{message}"
        );
        eprintln!("{message}");
        return;
    }
    let mesh = DemoMesh::new("t");
    let exit_file = mesh.state_dir.with_extension("exit");
    let _ = std::fs::remove_file(&exit_file);
    let args: Vec<String> = mesh
        .demo_args("root", &[])
        .iter()
        .map(|arg| format!("'{arg}'"))
        .collect();
    let command = format!(
        "'{}' {} 2>/dev/null; echo $? > '{}'; sleep 600",
        mesh.meshctl.display(),
        args.join(" "),
        exit_file.display()
    );
    let tmux = Tmux::start(&mesh.instance, &command);

    // Start: the overview with traffic through web.
    tmux.wait_for(
        "the dashboard with web's traffic",
        Duration::from_secs(180),
        |screen| {
            screen.contains("Workloads")
                && table_line(screen, "web").is_some_and(|line| line.contains('%'))
        },
    );
    // Sort: by requests per second.
    tmux.keys(&["s"]);
    tmux.wait_for("sorting by rps", Duration::from_secs(5), |screen| {
        screen.contains("sort: rps")
    });
    // Filter to web, then drill into it: what it calls, by authority.
    tmux.keys(&["/", "w", "e", "b", "Enter"]);
    tmux.wait_for("the filter", Duration::from_secs(5), |screen| {
        screen.contains("filter: web") && table_line(screen, "books").is_none()
    });
    tmux.keys(&["Enter"]);
    let drill = tmux.wait_for("web's authorities", Duration::from_secs(15), |screen| {
        screen.contains("deploy/web in demo")
            && screen.contains("books.demo.svc.cluster.local:8080")
            && screen.contains("authors.demo.svc.cluster.local:9090")
    });
    assert!(
        drill.contains("ns/demo/sa/web → ns/demo/sa/books"),
        "web's edges with identities:\n{drill}"
    );
    // Back, help, quit.
    tmux.keys(&["Escape"]);
    tmux.wait_for("the overview again", Duration::from_secs(5), |screen| {
        screen.contains("Requests per second")
    });
    tmux.keys(&["?"]);
    tmux.wait_for("the help", Duration::from_secs(5), |screen| {
        screen.contains("pause or resume the live updates")
    });
    tmux.keys(&["Escape"]);
    tmux.keys(&["q"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !exit_file.exists() {
        assert!(
            Instant::now() < deadline,
            "meshctl demo did not exit after q; the screen:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let code = std::fs::read_to_string(&exit_file).unwrap_or_default();
    let _ = std::fs::remove_file(&exit_file);
    assert_eq!(code.trim(), "0", "meshctl demo exits 0 after q");
    assert!(
        !tmux.screen().contains("Workloads"),
        "the terminal is restored (no dashboard left on screen)"
    );
    assert!(!mesh.state_dir.exists(), "the mesh is taken down");
    assert_eq!(mesh.namespaces_left(), Vec::<String>::new());
}
