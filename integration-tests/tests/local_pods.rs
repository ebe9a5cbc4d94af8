//! `meshctl local`: Kubernetes YAML run as local pods with the real controller and proxies.
//!
//! Root mode (network namespaces, iptables capture) needs root and says so loudly when it
//! cannot run (failing under CI=true); loopback mode and the error cases run anywhere. Every
//! mesh a test starts is taken down by a guard, also when the test fails, and every wait is
//! bounded.

use std::process::Command;
use std::time::Duration;

use mesh_integration_tests::bin_path;
use mesh_integration_tests::local::{
    LocalMesh, assert_success, counter, http_get, pod_of, text, wait_for,
};
use mesh_integration_tests::netns::require_root;
use mesh_integration_tests::process::{Process, free_port};

/// A server Deployment answering HTTP on 8080, its Service on port 80, and a client
/// Deployment whose only container curls `url` twice a second and logs each status code.
fn client_server_yaml(url: &str, server_command: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  annotations:
    mesh.dev/inject: enabled
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: demo}}
spec:
  selector: {{app: server}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: server, namespace: demo}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: server}}}}
  template:
    metadata: {{labels: {{app: server}}}}
    spec:
      containers:
      - name: http
        command: [sh, -c, "{server_command}"]
        env:
        - name: POD_IP
          valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
        ports: [{{containerPort: 8080}}]
        readinessProbe: {{tcpSocket: {{port: 8080}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: client, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: client}}}}
  template:
    metadata: {{labels: {{app: client}}}}
    spec:
      containers:
      - name: curl
        command: [sh, -c]
        args:
        - |
          while true; do
            code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 2 {url})
            echo "GET {url} -> $code"
            sleep 0.5
          done
"#
    )
}

/// Every (pid, start time) the state names: the supervisor, the controller, each container.
fn processes_in(state: &serde_json::Value) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut add = |process: &serde_json::Value| {
        if let (Some(pid), Some(start)) = (process["pid"].as_u64(), process["start_time"].as_u64())
        {
            out.push((pid, start));
        }
    };
    add(&state["supervisor"]);
    add(&state["controller"]["process"]);
    for pod in state["pods"].as_array().into_iter().flatten() {
        for container in pod["containers"].as_array().into_iter().flatten() {
            add(&container["process"]);
        }
    }
    out
}

/// Whether that very process still runs (a zombie waiting for its reaper does not count).
fn is_alive(pid: u64, start_time: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(after_name) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
        return false;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields.first() != Some(&"Z") && fields.get(19).and_then(|f| f.parse().ok()) == Some(start_time)
}

fn netns_list() -> String {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// After `down`: no process of `state` runs, no namespace of the instance exists, and the
/// state folder is gone.
fn assert_all_gone(mesh: &LocalMesh, state: &serde_json::Value) {
    let processes = processes_in(state);
    assert!(
        processes.len() >= 2,
        "the state named its processes: {state:#}"
    );
    let survivors: Vec<_> = processes
        .iter()
        .filter(|(pid, start)| is_alive(*pid, *start))
        .collect();
    assert!(
        survivors.is_empty(),
        "still running after down: {survivors:?}"
    );
    let namespaces = netns_list();
    assert!(
        !namespaces
            .lines()
            .any(|line| line.starts_with(&mesh.instance)),
        "namespaces of {} left behind:\n{namespaces}",
        mesh.instance
    );
    let etc_left: Vec<_> = std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(&mesh.instance)
        })
        .collect();
    assert!(etc_left.is_empty(), "hosts files left behind: {etc_left:?}");
    assert!(
        !mesh.state_dir.exists(),
        "{} left behind",
        mesh.state_dir.display()
    );
}

#[test]
fn root_mode_client_reaches_server_by_name_through_both_proxies_and_down_removes_everything() {
    if !require_root("local_pods root mode") {
        return;
    }
    let mesh = LocalMesh::new("root");
    // The short name resolves through the pod's hosts file to the Service's cluster IP, which
    // only the proxies understand: a 200 proves capture, discovery and both proxies.
    let yaml = mesh.write(
        "app.yaml",
        &client_server_yaml("http://server/", "exec python3 -m http.server 8080"),
    );
    let up = mesh.up(&yaml, &["--mode", "root"]);
    assert_success(&up, "local up");
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        stdout.contains("mode: root"),
        "up names the mode:\n{stdout}"
    );

    let state = mesh.state();
    assert_eq!(state["mode"], "root");
    for pod in state["pods"].as_array().expect("pods") {
        assert_eq!(pod["ready"], true, "{pod:#}");
        assert_eq!(pod["meshed"], true, "{pod:#}");
        let netns = pod["netns"]
            .as_str()
            .expect("root mode pods have a namespace");
        assert!(netns_list().contains(netns), "{netns} exists while up");
    }

    let client = pod_of(&state, "client")["name"]
        .as_str()
        .expect("pod name")
        .to_owned();
    wait_for(
        Duration::from_secs(30),
        || {
            let logs = mesh.meshctl(&["logs", &client, "-n", "demo"]);
            let text = String::from_utf8_lossy(&logs.stdout).into_owned();
            (text.matches("-> 200").count() >= 3).then_some(())
        },
        || text(&mesh.meshctl(&["logs", &client, "-n", "demo"])),
    );

    // The server's proxy counted them inbound; its admin port is reached through the
    // loopback forward recorded in state.json.
    let server = pod_of(&state, "server");
    let admin = server["proxy_admin"]["from_host"]
        .as_str()
        .expect("a forwarded admin address")
        .to_owned();
    assert!(admin.starts_with("127.0.0.1:"), "{admin}");
    let inbound = wait_for(
        Duration::from_secs(10),
        || {
            let metrics = http_get(&admin, "/metrics").ok()?;
            // Over mutual TLS, with the client's SPIFFE identity.
            let total = counter(
                &metrics,
                "request_total",
                &[
                    "direction=\"inbound\"",
                    "tls=\"true\"",
                    "client_id=\"spiffe://cluster.local/ns/demo/sa/default\"",
                ],
            );
            (total > 0.0).then_some(total)
        },
        || http_get(&admin, "/metrics").unwrap_or_else(|e| e.to_string()),
    );
    assert!(inbound > 0.0);
    // The controller's admin is forwarded too.
    let controller_admin = state["controller"]["admin"]["from_host"]
        .as_str()
        .expect("controller admin forward");
    let ready = http_get(controller_admin, "/ready").expect("controller /ready via its forward");
    assert!(!ready.is_empty());

    let status = mesh.meshctl(&["status"]);
    assert_success(&status, "local status");
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        table.contains("NAMESPACE") && table.contains("root"),
        "{table}"
    );

    let state = mesh.state();
    let down = mesh.down();
    assert_success(&down, "local down");
    assert_all_gone(&mesh, &state);
    // Twice is fine.
    assert_success(&mesh.down(), "a second local down");
}

#[test]
fn down_cleans_up_after_a_dead_supervisor() {
    if !require_root("local_pods down after a dead supervisor") {
        return;
    }
    let mesh = LocalMesh::new("dead");
    let yaml = mesh.write(
        "app.yaml",
        &client_server_yaml("http://server/", "exec python3 -m http.server 8080"),
    );
    assert_success(&mesh.up(&yaml, &["--mode", "root"]), "local up");
    let state = mesh.state();
    let supervisor = state["supervisor"]["pid"].as_u64().expect("supervisor pid");
    let killed = Command::new("kill")
        .args(["-9", &supervisor.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    wait_for(
        Duration::from_secs(5),
        || {
            let start = state["supervisor"]["start_time"].as_u64()?;
            (!is_alive(supervisor, start)).then_some(())
        },
        || "the supervisor survived SIGKILL".to_owned(),
    );
    let status = mesh.meshctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("supervisor is not running"),
        "{}",
        text(&status)
    );
    assert_success(&mesh.down(), "local down");
    assert_all_gone(&mesh, &state);
}

#[test]
fn loopback_mode_client_reaches_server_through_the_outbound_http_proxy() {
    let mesh = LocalMesh::new("loop");
    // No hosts files here: the client names the service and its proxy routes by authority.
    let yaml = mesh.write(
        "app.yaml",
        &client_server_yaml(
            "http://server.demo.svc.cluster.local/",
            "exec python3 -m http.server 8080 --bind $POD_IP",
        ),
    );
    let up = mesh.up(&yaml, &["--mode", "loopback"]);
    assert_success(&up, "local up");
    assert!(
        String::from_utf8_lossy(&up.stdout).contains("mode: loopback"),
        "{}",
        text(&up)
    );
    let state = mesh.state();
    assert_eq!(state["mode"], "loopback");
    let server = pod_of(&state, "server");
    assert!(
        server["ip"].as_str().expect("ip").starts_with("127."),
        "{server:#}"
    );
    let client = pod_of(&state, "client")["name"]
        .as_str()
        .expect("pod name")
        .to_owned();
    wait_for(
        Duration::from_secs(30),
        || {
            let logs = mesh.meshctl(&["logs", &client, "-n", "demo"]);
            let text = String::from_utf8_lossy(&logs.stdout).into_owned();
            (text.matches("-> 200").count() >= 3).then_some(())
        },
        || text(&mesh.meshctl(&["logs", &client, "-n", "demo"])),
    );
    let admin = server["proxy_admin"]["from_host"]
        .as_str()
        .expect("admin address")
        .to_owned();
    let metrics = http_get(&admin, "/metrics").expect("the server proxy's metrics");
    assert!(
        counter(&metrics, "request_total", &["direction=\"inbound\""]) > 0.0,
        "{metrics}"
    );
    let state = mesh.state();
    assert_success(&mesh.down(), "local down");
    assert_all_gone(&mesh, &state);
}

/// `meshctl identity` against the proxies of a local mesh (certificates from the real
/// controller) and a bare proxy without identity.
#[test]
fn meshctl_identity_shows_a_proxys_chain_and_names_what_is_wrong() {
    let mesh = LocalMesh::new("identity");
    let yaml = mesh.write(
        "app.yaml",
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  annotations: {mesh.dev/inject: enabled}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      containers:
      - name: http
        command: [sh, -c, "exec python3 -m http.server 8080 --bind $POD_IP"]
        env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        ports: [{containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: 8080}}
"#,
    );
    assert_success(&mesh.up(&yaml, &["--mode", "loopback"]), "local up");
    let state = mesh.state();
    let server = pod_of(&state, "server");
    let pod = server["name"].as_str().expect("pod name").to_owned();
    let admin = server["proxy_admin"]["from_host"]
        .as_str()
        .expect("admin address")
        .to_owned();
    let identity = |args: &[&str]| {
        let mut command = Command::new(bin_path("meshctl"));
        command
            .arg("identity")
            .args(args)
            .env("MESH_LOCAL_STATE_DIR", &mesh.state_dir);
        command
            .output()
            .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"))
    };

    // The local pod by name: a table of the leaf, the issuer and the anchor.
    let table = identity(&["--local", "-n", "demo", &pod]);
    assert_success(&table, "meshctl identity --local");
    let out = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        out.contains("identity:      spiffe://cluster.local/ns/demo/sa/default\n"),
        "{out}"
    );
    assert!(out.contains("state:         certified\n"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .skip_while(|line| !line.starts_with("CERTIFICATE"))
        .skip(1)
        .collect();
    assert!(rows.len() >= 2, "{out}");
    assert!(rows[0].starts_with("leaf "), "{out}");
    assert!(
        rows.iter().any(|row| row.starts_with("trust anchor ")),
        "{out}"
    );
    assert!(
        rows.iter()
            .all(|row| row.contains("expires in") && row.ends_with("valid")),
        "{out}"
    );

    // The same proxy by address, as JSON: the chain as PEM, no key.
    let json = identity(&["--proxy", &admin, "-o", "json"]);
    assert_success(&json, "meshctl identity --proxy -o json");
    let out = String::from_utf8_lossy(&json.stdout).into_owned();
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["state"], "certified", "{out}");
    let leaf = &report["chain"][0];
    assert_eq!(
        leaf["spiffe_id"], "spiffe://cluster.local/ns/demo/sa/default",
        "{out}"
    );
    assert!(
        leaf["pem"]
            .as_str()
            .is_some_and(|pem| pem.starts_with("-----BEGIN CERTIFICATE-----")),
        "{out}"
    );

    // Errors name what was wrong.
    let closed = format!("127.0.0.1:{}", free_port());
    let unreachable = identity(&["--proxy", &closed]);
    assert!(!unreachable.status.success(), "{}", text(&unreachable));
    assert!(
        String::from_utf8_lossy(&unreachable.stderr)
            .contains(&format!("cannot reach the proxy at {closed}")),
        "{}",
        text(&unreachable)
    );
    let missing = identity(&["--local", "-n", "demo", "nothing-here"]);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no pod nothing-here in namespace demo"),
        "{}",
        text(&missing)
    );
    let plain_admin = format!("127.0.0.1:{}", free_port());
    let _plain = Process(
        Command::new(bin_path("mesh-proxy"))
            .env("MESH_PROXY_INBOUND_LISTEN", "127.0.0.1:0")
            .env("MESH_PROXY_OUTBOUND_LISTEN", "127.0.0.1:0")
            .env("MESH_PROXY_ADMIN_LISTEN", &plain_admin)
            .env("MESH_PROXY_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start mesh-proxy"),
    );
    wait_for(
        Duration::from_secs(20),
        || http_get(&plain_admin, "/live").ok(),
        || format!("the proxy without identity never answered on {plain_admin}"),
    );
    let no_identity = identity(&["--proxy", &plain_admin]);
    assert!(!no_identity.status.success(), "{}", text(&no_identity));
    assert!(
        String::from_utf8_lossy(&no_identity.stderr)
            .contains(&format!("the proxy at {plain_admin} runs without identity")),
        "{}",
        text(&no_identity)
    );
    assert_success(&mesh.down(), "local down");
}

#[test]
fn malformed_yaml_is_a_clear_error_naming_the_file() {
    let mesh = LocalMesh::new("yaml");
    let yaml = mesh.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n",
    );
    let up = mesh.up(&yaml, &["--mode", "loopback"]);
    assert!(!up.status.success(), "{}", text(&up));
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(
        stderr.contains("broken.yaml") && stderr.contains("invalid YAML"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!mesh.state_dir.exists(), "nothing was started");

    let not_an_object = mesh.write("list.yaml", "- a\n- b\n");
    let up = mesh.up(&not_an_object, &["--mode", "loopback"]);
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(
        !up.status.success() && stderr.contains("list.yaml: document 1: not a Kubernetes object"),
        "{}",
        text(&up)
    );
}

#[test]
fn a_command_that_does_not_exist_fails_up_naming_the_pod_and_container() {
    let root = require_root("local_pods missing command (root mode)");
    let mesh = LocalMesh::new("nocmd");
    let yaml = mesh.write(
        "app.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: broken\n  annotations: {mesh.dev/inject: enabled}\n\
         spec:\n  containers:\n  - name: app\n    command: [no-such-program-anywhere, --flag]\n",
    );
    let mode = if root { "root" } else { "loopback" };
    let up = mesh.up(&yaml, &["--mode", mode]);
    assert!(!up.status.success(), "{}", text(&up));
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(
        stderr.contains("pod default/broken")
            && stderr.contains("container \"app\"")
            && stderr.contains("no-such-program-anywhere"),
        "{stderr}"
    );
    // The pod's log, printed by up, says it too.
    assert!(stderr.contains("executable file not found"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A failed up removes what it started.
    assert!(!mesh.state_dir.exists(), "{}", text(&up));
    if root {
        assert!(!netns_list().contains(&mesh.instance), "{}", netns_list());
    }
}

#[test]
fn port_clashes_are_clear_errors() {
    let mesh = LocalMesh::new("clash");
    // Two containers of one pod on one port.
    let yaml = mesh.write(
        "app.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: twice}\nspec:\n  containers:\n\
         \x20 - {name: one, command: [sleep, '60'], ports: [{containerPort: 8080}]}\n\
         \x20 - {name: two, command: [sleep, '60'], ports: [{containerPort: 8080}]}\n",
    );
    let up = mesh.up(&yaml, &["--mode", "loopback"]);
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(
        !up.status.success()
            && stderr.contains("port clash in pod default/twice: port 8080")
            && stderr.contains("\"one\"")
            && stderr.contains("\"two\""),
        "{}",
        text(&up)
    );
    assert!(!mesh.state_dir.exists());

    if !require_root("local_pods forward port clash (root mode)") {
        return;
    }
    // The controller's forward port taken by someone else.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken
        .local_addr()
        .expect("bound address")
        .port()
        .to_string();
    let yaml = mesh.write(
        "ok.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ok}\nspec:\n  containers:\n\
         \x20 - {name: one, command: [sleep, '60']}\n",
    );
    let file = yaml.to_str().expect("UTF-8 path");
    let up = mesh.meshctl(&[
        "up",
        "-f",
        file,
        "--mode",
        "root",
        "--instance",
        &mesh.instance,
        "--controller-port",
        &port,
        "--controller-admin-port",
        "0",
        "--timeout",
        "30s",
    ]);
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(
        !up.status.success()
            && stderr.contains(&format!("port clash: 127.0.0.1:{port}"))
            && stderr.contains("--controller-port"),
        "{}",
        text(&up)
    );
    assert!(!netns_list().contains(&mesh.instance), "{}", netns_list());
}
