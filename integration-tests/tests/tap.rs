//! Live tap end to end: the demo app in a local mesh (loopback mode, so it runs without
//! root), `meshctl tap` and `meshctl top` through the controller, which taps the real
//! proxies over mutual TLS as its own SPIFFE identity; and a client proving another identity
//! of the same CA is refused by a proxy's admin port.
//!
//! Also the two stats fixes seen from the user's side: the requests archive's policy refuses
//! count as failures in `meshctl stat`, and HTTP connections show in the TCP column.
//!
//! Every wait is bounded; a guard takes the local mesh down when the test fails half way.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mesh_controller::identity::{
    IdentityMetrics, Issuer, ServiceAccountName, SharedIssuer, SpiffeId,
};
use mesh_controller::tap::tls::ControllerIdentity;
use mesh_integration_tests::bin_path;
use mesh_integration_tests::process::run_bounded;
use mesh_proto::tap::ObserveRequest;
use mesh_proto::tap::tap_client::TapClient;

/// meshctl, with mesh-proxy and mesh-controller built beside it (where `local up` looks).
fn meshctl() -> PathBuf {
    bin_path("mesh-proxy");
    bin_path("mesh-controller");
    bin_path("meshctl")
}

/// The demo left running in a state folder of this test's own; taken down on drop.
struct Mesh {
    meshctl: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if self.state_dir.exists() {
            let _ = Command::new(&self.meshctl)
                .args(["local", "down", "--state-dir"])
                .arg(&self.state_dir)
                .status();
        }
    }
}

impl Mesh {
    /// `meshctl ARGS --state-dir DIR`, killed after `limit`: (success, stdout, stderr).
    fn run(&self, args: &[&str], limit: Duration) -> (bool, String, String) {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.extend([
            "--state-dir".to_owned(),
            self.state_dir.display().to_string(),
        ]);
        run_bounded(&self.meshctl, &all, limit)
    }
}

#[test]
fn meshctl_tap_and_top_watch_real_requests_through_the_controller_over_mtls() {
    let instance = format!("tp{}", std::process::id() % 100_000);
    let mesh = Mesh {
        meshctl: meshctl(),
        state_dir: std::env::temp_dir().join(format!("mesh-tap-test-{instance}")),
    };
    let _ = std::fs::remove_dir_all(&mesh.state_dir);
    let state_dir = mesh.state_dir.display().to_string();
    let demo: Vec<String> = [
        "demo",
        "--headless",
        "--duration",
        "5s",
        "--keep",
        "--mode",
        "loopback",
        "--state-dir",
        &state_dir,
        "--instance",
        &instance,
    ]
    .map(str::to_owned)
    .to_vec();
    let (ok, stdout, stderr) = run_bounded(&mesh.meshctl, &demo, Duration::from_secs(300));
    assert!(
        ok,
        "meshctl demo --keep failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // tap: books' proxy reports the requests web sends it, as JSON lines.
    let (ok, stdout, stderr) = mesh.run(
        &[
            "tap",
            "deploy/books",
            "-n",
            "demo",
            "--max",
            "5",
            "--duration",
            "30s",
            "-o",
            "json",
        ],
        Duration::from_secs(60),
    );
    assert!(
        ok,
        "meshctl tap failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 5, "--max 5 requests\n{stdout}");
    for line in &lines {
        assert!(
            line["reporter"]
                .as_str()
                .is_some_and(|r| r.starts_with("demo/books")),
            "{line}"
        );
        assert!(
            line["method"].as_str().is_some_and(|m| !m.is_empty()),
            "{line}"
        );
        assert!(
            line["path"].as_str().is_some_and(|p| p.starts_with('/')),
            "{line}"
        );
        assert!(line["status"].as_u64().is_some(), "{line}");
        assert!(line["latency_ms"].as_f64().is_some(), "{line}");
    }
    // Inbound at books, the hop was mTLS: both identities are there.
    let inbound = lines
        .iter()
        .find(|line| line["direction"] == "inbound")
        .unwrap_or_else(|| panic!("an inbound request at books\n{stdout}"));
    let books_identity = inbound["destination_identity"]
        .as_str()
        .filter(|id| id.starts_with("spiffe://"))
        .unwrap_or_else(|| panic!("books' identity in {inbound}"))
        .to_owned();
    assert!(
        inbound["source_identity"]
            .as_str()
            .is_some_and(|id| id.starts_with("spiffe://")),
        "the caller's identity in {inbound}"
    );

    // tap filters: a path no request has yields none (and says so).
    let (ok, stdout, stderr) = mesh.run(
        &[
            "tap",
            "deploy/books",
            "-n",
            "demo",
            "--path",
            "/no-such-path",
            "--duration",
            "3s",
        ],
        Duration::from_secs(30),
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "", "nothing matches /no-such-path");
    assert!(stderr.contains("no request matched"), "{stderr}");

    // top: the same traffic counted by path.
    let (ok, stdout, stderr) = mesh.run(
        &[
            "top",
            "deploy/books",
            "-n",
            "demo",
            "--duration",
            "4s",
            "-o",
            "json",
        ],
        Duration::from_secs(30),
    );
    assert!(
        ok,
        "meshctl top failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let rows: serde_json::Value = serde_json::from_str(&stdout).expect("top -o json is JSON");
    let rows = rows.as_array().expect("an array of rows");
    assert!(!rows.is_empty(), "top saw requests\n{stdout}");
    assert!(
        rows.iter()
            .all(|row| row["count"].as_u64().is_some_and(|c| c > 0)),
        "{stdout}"
    );

    // A target that is not there is a clear error, not an empty stream.
    let (ok, _, stderr) = mesh.run(
        &["tap", "deploy/nothing", "-n", "demo", "--duration", "2s"],
        Duration::from_secs(30),
    );
    assert!(!ok);
    assert!(stderr.contains("no meshed pod matches"), "{stderr}");

    // The proxies serve tap only to the controller's identity: the same CA's certificate for
    // another identity is refused; the controller's is served.
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(mesh.state_dir.join("state.json")).expect("state.json"),
    )
    .expect("state.json is JSON");
    let admin = state["pods"]
        .as_array()
        .and_then(|pods| {
            pods.iter()
                .find(|pod| pod["name"].as_str().is_some_and(|n| n.starts_with("books")))
        })
        .and_then(|pod| {
            pod.pointer("/proxy_admin/from_host")
                .filter(|v| !v.is_null())
                .or_else(|| pod.pointer("/proxy_admin/in_mesh"))
        })
        .and_then(serde_json::Value::as_str)
        .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("books' admin address in {state}"));
    let issuer = SharedIssuer::new(
        Issuer::from_dir(&mesh.state_dir.join("identity")).expect("the local mesh's CA"),
        &IdentityMetrics::new(),
    );
    let as_identity = |namespace: &str, account: &str| {
        Arc::new(ControllerIdentity::new(
            SpiffeId::new("cluster.local", ServiceAccountName::new(namespace, account))
                .expect("a valid identity"),
            issuer.clone(),
            Duration::from_secs(600),
        ))
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let observe = |identity: Arc<ControllerIdentity>| {
        let expected = books_identity.clone();
        runtime.block_on(async move {
            let channel =
                mesh_controller::tap::connect(admin, Some(&expected), Some(&identity)).await?;
            let request = ObserveRequest {
                limit: 1,
                max_duration: Some(mesh_proto::prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            };
            let describe =
                |status: tonic::Status| format!("{:?}: {}", status.code(), status.message());
            let mut stream = TapClient::new(channel)
                .observe(request)
                .await
                .map_err(describe)?
                .into_inner();
            stream.message().await.map(|_| ()).map_err(describe)
        })
    };
    let refused = observe(as_identity("demo", "web"));
    assert!(
        refused
            .as_ref()
            .is_err_and(|error| error.starts_with("PermissionDenied: tap is only for")),
        "a proxy must refuse tap to spiffe://cluster.local/ns/demo/sa/web: {refused:?}"
    );
    let served = observe(as_identity("mesh-system", "mesh-controller"));
    assert_eq!(served, Ok(()), "the controller's identity is served");

    // Stats: archive refuses every request the traffic generator sends it, and those are
    // failures, not successes; HTTP connections are counted.
    let (ok, stdout, stderr) = mesh.run(
        &["stat", "deploy", "-n", "demo", "-o", "json"],
        Duration::from_secs(30),
    );
    assert!(ok, "meshctl stat failed\n{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).expect("stat -o json is JSON");
    let rows = rows.as_array().expect("an array of rows");
    let archive = rows
        .iter()
        .find(|row| row.pointer("/resource/name").and_then(|n| n.as_str()) == Some("archive"))
        .unwrap_or_else(|| panic!("a row for archive in {stdout}"));
    assert!(
        archive["failure_count"].as_u64().is_some_and(|n| n > 0),
        "archive's refused requests count as failures: {archive}"
    );
    assert!(
        rows.iter()
            .any(|row| row["tcp_open_connections"].as_u64().is_some_and(|n| n > 0)),
        "HTTP connections are counted open: {stdout}"
    );

    let (ok, _, stderr) = mesh.run(&["local", "down"], Duration::from_secs(60));
    assert!(ok, "local down failed: {stderr}");
    assert!(!mesh.state_dir.exists(), "the state folder is removed");
}
