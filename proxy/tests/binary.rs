//! The real `mesh-proxy` binary: configured from the environment, refusing bad values by
//! name, writing access logs, and stopping on SIGTERM-like shutdown.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs the proxy with `variable=value` and asserts it refuses to start, naming both.
async fn refuses_to_start_with(variable: &str, value: &str) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env(variable, value)
        .output()
        .await
        .expect("run mesh-proxy");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(variable) && stderr.contains(value),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_bad_setting_exits_with_the_variable_and_the_value() {
    refuses_to_start_with("MESH_PROXY_DETECT_TIMEOUT", "soon").await;
}

#[tokio::test]
async fn a_log_filter_with_an_unknown_level_exits_naming_it() {
    refuses_to_start_with("MESH_PROXY_LOG_LEVEL", "warn,mesh_proxy=loud").await;
}

#[tokio::test]
async fn json_access_logs_have_every_field() {
    let backend = Backend::start("books").await;
    let (outbound, admin) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_INBOUND_LISTEN", "127.0.0.1:0")
        .env(
            "MESH_PROXY_OUTBOUND_LISTEN",
            format!("127.0.0.1:{outbound}"),
        )
        .env("MESH_PROXY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("MESH_PROXY_ACCESS_LOG", "json")
        .env("MESH_PROXY_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start mesh-proxy");
    let stdout = child.stdout.take().expect("stdout");
    // Wait for the proxy to listen.
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", outbound))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the proxy listens");
    let body = curl(&[
        "-x",
        &format!("http://127.0.0.1:{outbound}"),
        "-H",
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        &format!("http://{}/logged?x=1", backend.addr),
    ])
    .await;
    assert!(body.starts_with("backend=books"), "{body}");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("a log line in time")
        .expect("read stdout")
        .expect("a line");
    let entry: serde_json::Value = serde_json::from_str(&line).expect("the line is JSON");
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["path"], "/logged?x=1");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["direction"], "outbound");
    assert_eq!(entry["authority"], backend.addr.to_string());
    assert_eq!(entry["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    for field in [
        "time",
        "latency_ms",
        "client_id",
        "server_id",
        "response_bytes",
    ] {
        assert!(entry.get(field).is_some(), "missing {field} in {line}");
    }
    let _ = child.kill().await;
}
