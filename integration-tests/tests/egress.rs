//! Egress, as a user meets it: a meshed client in a local mesh (network namespaces, iptables
//! capture, the real controller over a folder of YAML) calls servers outside the mesh, which
//! answer HTTP and TLS on an address no Service or pod has (198.18.0.10, on the local mesh's
//! router namespace, which routes nowhere else). The client's calls are allowed, then denied by
//! an `EgressNetwork`, then allowed for one host and path by an HTTPRoute and for one server
//! name by a TLSRoute; the proxy's metrics, `meshctl stat authority`, `meshctl tap` and
//! `meshctl edges` name the external hosts.
//!
//! Needs root; says so loudly and fails under `CI=true` when not.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_integration_tests::bin_path;
use mesh_integration_tests::local::{
    LocalMesh, assert_success, counter, curl, in_pod, netns_of, wait_for,
};
use mesh_integration_tests::netns::{ChildGuard, require_root, spawn_in};

const YAML: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  annotations:
    mesh.dev/inject: enabled
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: demo}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers:
      - name: idle
        command: [sleep, "3600"]
"#;

/// The outside address: in the benchmarking range (RFC 2544), far from the mesh's 10.77/16.
const OUTSIDE: &str = "198.18.0.10";

/// Denies everything outside the mesh for the clients of `demo`.
const DENY_ALL: &str = r#"apiVersion: policy.mesh.dev/v1alpha1
kind: EgressNetwork
metadata: {name: external, namespace: demo}
spec:
  networks: [{cidr: 198.18.0.0/15}]
  trafficPolicy: Deny
"#;

/// Allows `api.example.com` under `/allowed`, and TLS to `secure.example.com`.
const ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-allowed, namespace: demo}
spec:
  parentRefs: [{group: policy.mesh.dev, kind: EgressNetwork, name: external}]
  hostnames: [api.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /allowed}}]
    backendRefs: [{group: policy.mesh.dev, kind: EgressNetwork, name: external}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: secure, namespace: demo}
spec:
  parentRefs: [{group: policy.mesh.dev, kind: EgressNetwork, name: external, port: 8443}]
  hostnames: [secure.example.com]
"#;

/// Puts `yaml` into the controller's folder whole (written aside, then renamed).
fn apply(mesh: &LocalMesh, file: &str, yaml: &str) {
    let folder = mesh.state_dir.join("controller");
    let aside = folder.join(format!(".{file}.tmp"));
    std::fs::write(&aside, yaml).expect("write the object");
    std::fs::rename(&aside, folder.join(file)).expect("move the object into place");
}

/// `curl` to `host:port` at the outside address, as the application would call it by name:
/// the status line and headers, then the body; `TLS` for HTTPS (any certificate).
fn call(netns: &str, scheme: &str, host: &str, port: u16, path: &str) -> String {
    let resolve = format!("{host}:{port}:{OUTSIDE}");
    let url = format!("{scheme}://{host}:{port}{path}");
    curl(netns, &["--insecure", "--resolve", &resolve, &url])
}

fn status(response: &str) -> &str {
    response
        .lines()
        .next()
        .unwrap_or("(no response)")
        .trim_end()
}

/// [`call`]s until `answered` accepts the response (plans reach the proxy a moment after the
/// YAML lands, and each destination address has its own plan stream), within `timeout`.
fn call_until(
    netns: &str,
    (scheme, host, port, path): (&str, &str, u16, &str),
    timeout: Duration,
    answered: impl Fn(&str) -> bool,
) -> String {
    wait_for(
        timeout,
        || {
            let response = call(netns, scheme, host, port, path);
            answered(&response).then_some(response)
        },
        || call(netns, scheme, host, port, path),
    )
}

/// Whether the response's status line has `code`.
fn has_status(code: &'static str) -> impl Fn(&str) -> bool {
    move |response| status(response).contains(code)
}

/// An HTTP server (`orig-dst-echo`) on 8080 and a TLS one (`openssl s_server -www`) on 8443 at
/// the outside address, in the router namespace.
fn outside_servers(router: &str, dir: &Path) -> (ChildGuard, ChildGuard) {
    let run = |argv: &[&str]| {
        let output = Command::new("ip")
            .args(["netns", "exec", router])
            .args(argv)
            .output()
            .unwrap_or_else(|error| panic!("cannot run {argv:?}: {error}"));
        assert!(
            output.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&["ip", "addr", "add", &format!("{OUTSIDE}/32"), "dev", "lo"]);
    let mut http = spawn_in(
        router,
        [
            env!("CARGO_BIN_EXE_orig-dst-echo"),
            &format!("{OUTSIDE}:8080"),
            "external",
        ],
    );
    assert!(http.read_line().starts_with("listening on "));

    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=secure.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (scripts/setup installs it)");
    assert!(status.status.success(), "openssl req: {status:?}");
    let tls = spawn_in(
        router,
        [
            "openssl".as_ref(),
            "s_server".as_ref(),
            "-accept".as_ref(),
            format!("{OUTSIDE}:8443").as_ref(),
            "-cert".as_ref(),
            cert.as_os_str(),
            "-key".as_ref(),
            key.as_os_str(),
            "-www".as_ref(),
            "-quiet".as_ref(),
        ],
    );
    (http, tls)
}

#[test]
fn egress_networks_and_routes_allow_and_deny_traffic_leaving_the_mesh() {
    if !require_root("egress") {
        return;
    }
    let mesh = LocalMesh::new("egress");
    let yaml = mesh.write("app.yaml", YAML);
    assert_success(&mesh.up(&yaml, &["--mode", "root"]), "local up");
    let state = mesh.state();
    let client = netns_of(&state, "client");
    let router = state["router_netns"]
        .as_str()
        .expect("root mode has a router namespace")
        .to_owned();
    let (_http, _tls) = outside_servers(&router, &mesh.dir);

    // Nothing covers the outside yet: forwarded unchanged, as before egress existed.
    let open = call_until(
        &client,
        ("http", "api.example.com", 8080, "/other"),
        Duration::from_secs(20),
        has_status(" 200"),
    );
    assert!(open.contains("external not redirected"), "{open}");
    let tls_open = call_until(
        &client,
        ("https", "evil.example.com", 8443, "/"),
        Duration::from_secs(20),
        has_status(" 200"),
    );
    assert!(tls_open.contains("s_server"), "{tls_open}");

    // Denied: a 403 naming the network and why; TLS closed before the handshake.
    apply(&mesh, "egress.yaml", DENY_ALL);
    let denied = call_until(
        &client,
        ("http", "api.example.com", 8080, "/other"),
        Duration::from_secs(30),
        has_status(" 403"),
    );
    assert!(
        denied.contains("mesh-error: egress denied: GET api.example.com:8080/other")
            && denied.contains("EgressNetwork demo/external"),
        "{denied}"
    );
    // Each destination address has its own plan stream, so 8443's update may land after
    // 8080's: wait for it as for the first.
    call_until(
        &client,
        ("https", "evil.example.com", 8443, "/"),
        Duration::from_secs(30),
        |response| !response.contains(" 200"),
    );

    // Routes: one host and path over HTTP, one server name over TLS.
    apply(&mesh, "routes.yaml", ROUTES);
    let allowed = call_until(
        &client,
        ("http", "api.example.com", 8080, "/allowed/1"),
        Duration::from_secs(30),
        has_status(" 200"),
    );
    assert!(allowed.contains("external not redirected"), "{allowed}");
    for (host, path) in [
        ("api.example.com", "/other"),
        ("www.example.com", "/allowed"),
    ] {
        let response = call(&client, "http", host, 8080, path);
        assert!(
            status(&response).contains(" 403"),
            "{host}{path}: {response}"
        );
    }
    let secure = call_until(
        &client,
        ("https", "secure.example.com", 8443, "/"),
        Duration::from_secs(30),
        has_status(" 200"),
    );
    assert!(secure.contains("s_server"), "{secure}");
    let evil = call(&client, "https", "evil.example.com", 8443, "/");
    assert!(!evil.contains(" 200"), "{evil}");

    // The client's proxy names the external hosts and counts the refusals.
    let metrics = in_pod(
        &client,
        &["curl", "--silent", "http://127.0.0.1:4191/metrics"],
    );
    for host in ["api.example.com:8080", "secure.example.com:8443"] {
        assert!(
            metrics.contains(&format!("authority=\"{host}\"")),
            "no series for {host} in:\n{metrics}"
        );
    }
    let refusals = counter(&metrics, "proxy_error_total", &["reason=\"egress denied\""]);
    assert!(refusals >= 4.0, "{refusals} refusals counted:\n{metrics}");
    let decisions = |labels: &[&str]| counter(&metrics, "outbound_egress_total", labels);
    let network = "network=\"demo/external\"";
    for (labels, at_least) in [
        (
            &[
                "authority=\"api.example.com:8080\"",
                "protocol=\"http\"",
                "decision=\"allowed\"",
            ],
            1.0,
        ),
        (
            &[
                "authority=\"api.example.com:8080\"",
                "protocol=\"http\"",
                "decision=\"denied\"",
            ],
            2.0,
        ),
        (
            &[
                "authority=\"www.example.com:8080\"",
                "protocol=\"http\"",
                "decision=\"denied\"",
            ],
            1.0,
        ),
        (
            &[
                "authority=\"secure.example.com:8443\"",
                "protocol=\"tls\"",
                "decision=\"allowed\"",
            ],
            1.0,
        ),
        (
            &[
                "authority=\"evil.example.com:8443\"",
                "protocol=\"tls\"",
                "decision=\"denied\"",
            ],
            2.0,
        ),
    ] {
        let mut labels = labels.to_vec();
        labels.push(network);
        let counted = decisions(&labels);
        assert!(
            counted >= at_least,
            "{counted} for {labels:?} in:\n{metrics}"
        );
    }

    // So does `meshctl stat authority`, from the controller's aggregate of the proxies.
    let stat = || {
        let output = Command::new(bin_path("meshctl"))
            .args(["stat", "authority", "-n", "demo", "--state-dir"])
            .arg(&mesh.state_dir)
            .output()
            .expect("run meshctl stat");
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    };
    wait_for(
        Duration::from_secs(30),
        || stat().contains("api.example.com:8080").then_some(()),
        stat,
    );
    // `meshctl tap` shows each request by the host it asked for, denied ones with their 403.
    let mut tap = Command::new(bin_path("meshctl"))
        .args([
            "tap",
            "deploy/client",
            "-n",
            "demo",
            "--authority",
            "api.example.com:8080",
        ])
        .args([
            "--max",
            "2",
            "--duration",
            "30s",
            "-o",
            "json",
            "--state-dir",
        ])
        .arg(&mesh.state_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start meshctl tap");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tap.try_wait().expect("poll meshctl tap").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "meshctl tap saw nothing"
        );
        call(&client, "http", "api.example.com", 8080, "/allowed/tap");
        call(&client, "http", "api.example.com", 8080, "/denied/tap");
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut tapped = String::new();
    std::io::Read::read_to_string(&mut tap.stdout.take().expect("piped"), &mut tapped)
        .expect("read meshctl tap");
    let exchanges: Vec<serde_json::Value> = tapped
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    assert!(
        !exchanges.is_empty()
            && exchanges
                .iter()
                .all(|e| e["authority"] == "api.example.com:8080" && e["direction"] == "outbound"),
        "{tapped}"
    );
    assert!(
        exchanges
            .iter()
            .any(|e| e["path"] == "/denied/tap" && e["status"] == 403)
            || exchanges
                .iter()
                .any(|e| e["path"] == "/allowed/tap" && e["status"] == 200),
        "{tapped}"
    );

    // And `meshctl edges` (the dashboard's source): who left the mesh, allowed and denied.
    let edges = || {
        let output = Command::new(bin_path("meshctl"))
            .args(["edges", "-n", "demo", "-o", "json", "--state-dir"])
            .arg(&mesh.state_dir)
            .output()
            .expect("run meshctl edges");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap_or_default()
    };
    let denied_tls = |answer: &serde_json::Value| {
        answer["egress"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|edge| {
                edge["source"]["name"] == "client"
                    && edge["network"] == "demo/external"
                    && edge["authority"] == "evil.example.com:8443"
                    && edge["protocol"] == "tls"
                    && edge["denied"].as_u64().is_some_and(|n| n > 0)
            })
    };
    wait_for(
        Duration::from_secs(30),
        || denied_tls(&edges()).then_some(()),
        || format!("{:#}", edges()),
    );
}
