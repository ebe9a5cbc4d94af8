//! A hostile pod next door, for real: a local mesh in network namespaces with iptables capture,
//! a meshed `books` whose namespace admits only authenticated clients, a meshed `web`, and an
//! unmeshed `attacker` pod in another namespace. Everything the review found an attacker could
//! do to a proxy is tried from the attacker's (and the meshed app's) own network namespace.
//!
//! Needs root; says so loudly and fails under `CI=true` when not.

use std::time::Duration;

use mesh_integration_tests::local::{
    LocalMesh, assert_success, curl, http_get, in_pod, netns_of, pod_of, wait_for,
};
use mesh_integration_tests::netns::require_root;

const YAML: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations:
    mesh.dev/inject: enabled
    config.mesh.dev/default-inbound-policy: all-authenticated
---
apiVersion: v1
kind: Service
metadata: {name: books, namespace: shop}
spec:
  selector: {app: books}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: books, namespace: shop}
spec:
  selector: {matchLabels: {app: books}}
  template:
    metadata: {labels: {app: books}}
    spec:
      containers:
      - name: http
        command: [python3, -m, http.server, "8080"]
        ports: [{containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: 8080}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: idle
        command: [sleep, "3600"]
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: attacker, namespace: outside}
spec:
  selector: {matchLabels: {app: attacker}}
  template:
    metadata: {labels: {app: attacker}}
    spec:
      containers:
      - name: idle
        command: [sleep, "3600"]
"#;

/// Sends a mesh transport header naming `port` in plaintext to `ip:4143`, then `request`;
/// returns what came back before the proxy closed the connection (Python's repr of the bytes).
fn plaintext_header(netns: &str, ip: &str, port: u16, request: &str) -> String {
    // "MESH", version 1, port, flags 0, empty name: transport_header.rs's format.
    let mut header = b"MESH\x01".to_vec();
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0]);
    header.extend_from_slice(request.as_bytes());
    let hex: String = header.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "import socket, sys\n\
         s = socket.create_connection(('{ip}', 4143), 3)\n\
         s.sendall(bytes.fromhex('{hex}'))\n\
         s.settimeout(3)\n\
         data = b''\n\
         try:\n\
         \x20   while True:\n\
         \x20       chunk = s.recv(4096)\n\
         \x20       if not chunk: break\n\
         \x20       data += chunk\n\
         except Exception:\n\
         \x20   pass\n\
         sys.stdout.write(repr(data))\n"
    );
    in_pod(netns, &["python3", "-c", &script])
}

#[test]
fn a_hostile_pod_cannot_shut_down_tap_read_or_impersonate_a_proxy() {
    if !require_root("hostile_pod") {
        return;
    }
    let mesh = LocalMesh::new("hostile");
    let yaml = mesh.write("app.yaml", YAML);
    assert_success(&mesh.up(&yaml, &["--mode", "root"]), "local up");
    let state = mesh.state();
    let books = pod_of(&state, "books");
    assert_eq!(books["meshed"], true);
    assert_eq!(pod_of(&state, "attacker")["meshed"], false);
    let books_ip = books["ip"].as_str().expect("pod IP").to_owned();
    let books_admin = books["proxy_admin"]["from_host"]
        .as_str()
        .expect("admin forward")
        .to_owned();
    let web = netns_of(&state, "web");
    let attacker = netns_of(&state, "attacker");

    // The meshed app reaches books over mutual TLS.
    let ok = wait_for(
        Duration::from_secs(30),
        || {
            let out = curl(&web, &["http://books/"]);
            out.starts_with("HTTP/1.1 200").then_some(out)
        },
        || curl(&web, &["http://books/"]),
    );
    assert!(ok.contains("Directory listing"), "{ok}");

    // The attacker, captured at books' proxy, is not authenticated: refused by policy.
    let app = format!("http://{books_ip}:8080/");
    let out = curl(&attacker, &[&app]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("mesh-error: unauthorized"), "{out}");

    // A plaintext transport header on the inbound port is never believed: not for the admin
    // port, not for the outbound listener (impersonating books), not for the app either.
    let shutdown = "POST /shutdown HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n";
    let get_out = "GET http://books.shop.svc.cluster.local/ HTTP/1.1\r\nhost: books\r\n\r\n";
    for (port, request) in [(4191, shutdown), (4140, get_out), (8080, get_out)] {
        let answer = plaintext_header(&attacker, &books_ip, port, request);
        assert_eq!(answer, "b''", "port {port}: closed unanswered");
    }

    // The admin port: metrics for Prometheus, nothing else for another pod.
    let admin = format!("http://{books_ip}:4191");
    let metrics = curl(&attacker, &[&format!("{admin}/metrics")]);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for (method, path) in [
        ("GET", "/config"),
        ("GET", "/identity"),
        ("POST", "/shutdown"),
    ] {
        let out = curl(&attacker, &["-X", method, &format!("{admin}{path}")]);
        assert!(out.starts_with("HTTP/1.1 403"), "{method} {path}: {out}");
        assert!(
            out.contains(&format!("mesh-error: forbidden: {method} {path}")),
            "{out}"
        );
    }
    let tap = curl(
        &attacker,
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            &format!("{admin}/mesh.tap.v1.Tap/Observe"),
        ],
    );
    assert!(tap.contains("grpc-status: 7"), "tap refused: {tap}");

    // A meshed app asking its own proxy to reach books' admin port gets a clear refusal.
    let out = curl(&web, &["-X", "POST", &format!("{admin}/shutdown")]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("mesh-error: "), "{out}");

    // Through all of it books' proxy kept running, and still serves the meshed app.
    let ready = http_get(&books_admin, "/ready").expect("books' admin forward");
    assert_eq!(ready, "ready\n");
    let out = curl(&web, &["http://books/"]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The pod itself (the admin forward enters its namespace, as a port-forward does) still
    // reads its configuration.
    let config = http_get(&books_admin, "/config").expect("books' admin forward");
    assert!(config.contains("\"config\""), "{config}");

    assert_success(&mesh.down(), "local down");
}
