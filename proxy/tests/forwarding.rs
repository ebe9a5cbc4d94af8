//! The proxy end to end on loopback: a real client, the client's outbound proxy, the server's
//! inbound proxy (reached with the mesh transport header), and real backends, with a scripted
//! Destination server standing in for the controller.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const BOOKS: &str = "books.shop.svc.cluster.local:8080";

/// A mesh of one client proxy and one server proxy in front of the given backends.
struct Mesh {
    destination: ScriptedDestination,
    controller_stop: CancellationToken,
    client: mesh_proxy::app::Running,
    server: mesh_proxy::app::Running,
}

impl Mesh {
    async fn new() -> Self {
        let destination = ScriptedDestination::default();
        let controller_stop = CancellationToken::new();
        let url = destination.serve(controller_stop.clone()).await;
        let client = proxy(Some(&url)).await;
        let server = proxy(None).await;
        Self {
            destination,
            controller_stop,
            client,
            server,
        }
    }

    /// Publishes `backends` as the meshed endpoints of BOOKS, behind the server proxy.
    fn books(&self, backends: &[&Backend]) {
        let port = self.server.inbound_addr.port();
        self.destination.set(
            BOOKS,
            backends.iter().map(|b| meshed(b.addr, port)).collect(),
        );
    }

    fn proxy_url(&self) -> String {
        format!("http://{}", self.client.outbound_addr)
    }
}

#[tokio::test]
async fn http1_requests_cross_both_proxies_and_are_balanced() {
    let mesh = Mesh::new().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    mesh.books(&[&a, &b]);

    let mut seen = HashMap::new();
    for _ in 0..40 {
        let body = curl(&["-x", &mesh.proxy_url(), &format!("http://{BOOKS}/hello")]).await;
        assert!(body.contains("path=/hello"), "{body}");
        assert!(
            body.contains(&format!("host={BOOKS}")),
            "Host is kept: {body}"
        );
        let backend = body
            .split_whitespace()
            .next()
            .expect("backend field")
            .to_string();
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both endpoints get traffic: {seen:?}");

    let (_, text) = admin_get(&mesh.client, "/metrics").await;
    let outbound = format!("authority=\"{BOOKS}\"");
    assert_eq!(
        metric(
            &text,
            "request_total",
            &["direction=\"outbound\"", &outbound]
        ),
        40.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "response_total",
            &["status_code=\"200\"", "classification=\"success\""]
        ),
        40.0
    );
    let (_, text) = admin_get(&mesh.server, "/metrics").await;
    assert_eq!(
        metric(&text, "request_total", &["direction=\"inbound\""]),
        40.0,
        "{text}"
    );
}

#[tokio::test]
async fn curl_features_work_through_the_mesh() {
    let mesh = Mesh::new().await;
    let backend = Backend::start("a").await;
    mesh.books(&[&backend]);
    let proxy = mesh.proxy_url();

    // A chunked upload comes back intact.
    let upload: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let path = std::env::temp_dir().join(format!("mesh-upload-{}", std::process::id()));
    std::fs::write(&path, &upload).expect("write upload");
    let file_arg = format!("@{}", path.display());
    let echoed = curl(&[
        "-x",
        &proxy,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &file_arg,
        &format!("http://{BOOKS}/echo"),
    ])
    .await;
    assert_eq!(echoed, upload);

    // Expect: 100-continue is answered and the body flows.
    let echoed = curl(&[
        "-x",
        &proxy,
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &file_arg,
        &format!("http://{BOOKS}/echo"),
    ])
    .await;
    assert_eq!(echoed, upload);
    let _ = std::fs::remove_file(&path);

    // A large download arrives whole.
    let large = curl(&["-x", &proxy, &format!("http://{BOOKS}/large?bytes=5000000")]).await;
    assert_eq!(large.len(), 5_000_000);

    // Keep-alive: two requests in one curl run reuse one client connection.
    let verbose = tokio::process::Command::new("curl")
        .args(["--silent", "--verbose", "--max-time", "10", "-x", &proxy])
        .arg(format!("http://{BOOKS}/one"))
        .arg(format!("http://{BOOKS}/two"))
        .output()
        .await
        .expect("curl");
    let stderr = String::from_utf8_lossy(&verbose.stderr);
    assert!(
        stderr.contains("Re-using existing connection") || stderr.contains("Reusing existing"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&verbose.stdout);
    assert!(stdout.contains("path=/one") && stdout.contains("path=/two"));
}

#[tokio::test]
async fn upgraded_connections_are_spliced() {
    let mesh = Mesh::new().await;
    let backend = Backend::start("a").await;
    mesh.books(&[&backend]);

    let mut stream = tokio::net::TcpStream::connect(mesh.client.outbound_addr)
        .await
        .expect("connect");
    stream
        .write_all(
            format!(
                "GET http://{BOOKS}/ws HTTP/1.1\r\nHost: {BOOKS}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for message in ["hello", "mesh"] {
        stream.write_all(message.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("read echo");
        assert_eq!(buf, message.as_bytes());
    }
}

#[tokio::test]
async fn http2_prior_knowledge_is_kept_end_to_end() {
    let mesh = Mesh::new().await;
    let backend = Backend::start("a").await;
    mesh.books(&[&backend]);

    let stream = tokio::net::TcpStream::connect(mesh.client.outbound_addr)
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    // Several concurrent streams on the one connection.
    let mut answers = Vec::new();
    for i in 0..5 {
        let request = Request::get(format!("http://{BOOKS}/stream/{i}"))
            .body(Full::<Bytes>::default())
            .expect("request");
        answers.push(sender.send_request(request));
    }
    for (i, answer) in answers.into_iter().enumerate() {
        let response = answer.await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(&format!("path=/stream/{i}")), "{body}");
        assert!(body.contains("version=HTTP/2.0"), "{body}");
    }
}

#[tokio::test]
async fn opaque_tcp_tunnels_through_connect() {
    let mesh = Mesh::new().await;
    // A raw TCP echo server that speaks no HTTP.
    let echo = loopback().await;
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    mesh.destination.set(
        BOOKS,
        vec![meshed(echo_addr, mesh.server.inbound_addr.port())],
    );
    let mut stream = tokio::net::TcpStream::connect(mesh.client.outbound_addr)
        .await
        .expect("connect");
    stream
        .write_all(format!("CONNECT {BOOKS} HTTP/1.1\r\nHost: {BOOKS}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("read");
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    // Bytes that are not HTTP pass through the detection of the server proxy untouched.
    let payload = b"\x00\x01binary\xffpayload";
    stream.write_all(payload).await.expect("write");
    let mut buf = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&buf, payload);
}

#[tokio::test]
async fn endpoint_changes_apply_mid_traffic_without_failures() {
    let mesh = Mesh::new().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    mesh.books(&[&a]);
    let proxy = mesh.proxy_url();
    let url = format!("http://{BOOKS}/");
    let client = reqwest_like(&proxy);

    for i in 0..60 {
        if i == 20 {
            mesh.books(&[&a, &b]);
        }
        if i == 40 {
            mesh.books(&[&b]);
        }
        let body = client(&url).await;
        assert!(body.starts_with("backend="), "request {i}: {body}");
    }
    // After the last change only b answers.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..10 {
        assert!(client(&url).await.starts_with("backend=b"));
    }
}

/// A closure GETting a URL through the HTTP proxy with curl.
fn reqwest_like(proxy: &str) -> impl Fn(&str) -> std::pin::Pin<Box<dyn Future<Output = String>>> {
    let proxy = proxy.to_string();
    move |url: &str| {
        let proxy = proxy.clone();
        let url = url.to_string();
        Box::pin(async move { curl(&["-x", &proxy, &url]).await })
    }
}

#[tokio::test]
async fn a_dead_endpoint_gives_a_clear_502_and_no_endpoints_a_503() {
    let mesh = Mesh::new().await;
    let dead = Backend::start("dead").await;
    let dead_addr = dead.addr;
    drop(dead);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Unmeshed endpoint so the client proxy dials it directly and sees the refusal.
    mesh.destination.set(BOOKS, vec![plain(dead_addr)]);
    let out = curl(&[
        "-x",
        &mesh.proxy_url(),
        "--include",
        &format!("http://{BOOKS}/"),
    ])
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(out.contains("mesh-error: connect failed"), "{out}");

    mesh.destination.set(BOOKS, vec![]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = curl(&[
        "-x",
        &mesh.proxy_url(),
        "--include",
        &format!("http://{BOOKS}/"),
    ])
    .await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("mesh-error: no endpoints"), "{out}");
    let (_, text) = admin_get(&mesh.client, "/metrics").await;
    assert!(metric(&text, "proxy_error_total", &["reason=\"no endpoints\""]) >= 1.0);
}

#[tokio::test]
async fn the_last_endpoints_keep_serving_when_the_controller_dies() {
    let mesh = Mesh::new().await;
    let a = Backend::start("a").await;
    mesh.books(&[&a]);
    let url = format!("http://{BOOKS}/");
    assert!(
        curl(&["-x", &mesh.proxy_url(), &url])
            .await
            .starts_with("backend=a")
    );
    mesh.controller_stop.cancel();
    for _ in 0..20 {
        let body = curl(&["-x", &mesh.proxy_url(), &url]).await;
        assert!(body.starts_with("backend=a"), "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn unknown_targets_are_forwarded_unchanged() {
    let mesh = Mesh::new().await;
    let outside = Backend::start("outside").await;
    let body = curl(&[
        "-x",
        &mesh.proxy_url(),
        &format!("http://{}/direct", outside.addr),
    ])
    .await;
    assert!(body.starts_with("backend=outside"), "{body}");
}

#[tokio::test]
async fn admin_reports_readiness_and_drains_on_shutdown() {
    let mesh = Mesh::new().await;
    let a = Backend::start("a").await;
    mesh.books(&[&a]);
    assert_eq!(admin_get(&mesh.client, "/ready").await.0, StatusCode::OK);
    assert_eq!(admin_get(&mesh.client, "/live").await.0, StatusCode::OK);
    let (status, dump) = admin_get(&mesh.client, "/config").await;
    assert_eq!(status, StatusCode::OK);
    assert!(dump.contains("\"outbound_listen\""), "{dump}");

    // A slow request in flight finishes during the drain.
    let proxy = mesh.proxy_url();
    let slow =
        tokio::spawn(
            async move { curl(&["-x", &proxy, &format!("http://{BOOKS}/slow?ms=500")]).await },
        );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stream = tokio::net::TcpStream::connect(mesh.client.admin_addr)
        .await
        .expect("connect admin");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::post("/shutdown")
                .header("host", "admin")
                .body(Full::<Bytes>::default())
                .expect("request"),
        )
        .await
        .expect("shutdown");
    assert_eq!(response.status(), StatusCode::OK);
    let body = slow.await.expect("slow request");
    assert!(body.contains("path=/slow"), "{body}");
    tokio::time::timeout(Duration::from_secs(5), mesh.client.task)
        .await
        .expect("proxy stops within the grace period")
        .expect("proxy task");
    // Stopped: new connections are refused.
    assert!(
        tokio::net::TcpStream::connect(mesh.client.outbound_addr)
            .await
            .is_err()
    );
}
