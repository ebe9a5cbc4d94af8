//! A hostile peer against real proxies: it cannot shut down, tap, read the configuration of or
//! send traffic as another pod's proxy, however it reaches the proxy's ports.
//!
//! Every test here reproduced a finding of the hardening review before its fix.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_proto::destination;
use mesh_proxy::app::Running;
use mesh_proxy::transport_header::TransportHeader;
use support::ca::{ScriptedIdentity, TestCa};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BOOKS_ID: &str = "spiffe://cluster.local/ns/shop/sa/books";
const CONTROLLER_ID: &str = "spiffe://cluster.local/ns/mesh-system/sa/mesh-controller";

struct Setup {
    destination: ScriptedDestination,
    identity_url: String,
    ca: Arc<TestCa>,
    controller: String,
    _stop: CancellationToken,
}

async fn setup() -> Setup {
    let stop = CancellationToken::new();
    let ca = Arc::new(TestCa::new("mesh test"));
    let identity = ScriptedIdentity::new(ca.clone(), Duration::from_secs(3600));
    identity.allow("web-token", WEB_ID);
    identity.allow("books-token", BOOKS_ID);
    let identity_url = identity.serve(stop.clone()).await;
    let destination = ScriptedDestination::default();
    let controller = destination.serve(stop.clone()).await;
    Setup {
        destination,
        identity_url,
        ca,
        controller,
        _stop: stop,
    }
}

impl Setup {
    fn identity(&self, id: &str, token: &str) -> TestIdentity {
        TestIdentity {
            id: id.to_string(),
            token: token.to_string(),
            anchors_pem: self.ca.anchor_pem.clone(),
            service: self.identity_url.clone(),
        }
    }

    /// `authority` is a meshed endpoint on `port` of the pod behind `server` (which proves
    /// BOOKS_ID): what discovery answers for a pod IP and any of its ports.
    fn meshed_port(&self, authority: &str, server: &Running, port: u16) {
        let addr = std::net::SocketAddr::new(server.inbound_addr.ip(), port);
        let mut endpoint = meshed(addr, server.inbound_addr.port());
        endpoint.tls_identity = Some(destination::TlsIdentity {
            spiffe_id: BOOKS_ID.to_string(),
            server_name: String::new(),
        });
        self.destination.set(authority, vec![endpoint]);
    }
}

/// Writes `bytes` on a new connection to `addr` and reads what comes back until the peer
/// closes (or two seconds pass).
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn header(port: u16) -> Vec<u8> {
    TransportHeader {
        port,
        opaque: false,
        name: String::new(),
    }
    .encode()
}

const SHUTDOWN: &[u8] = b"POST /shutdown HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n";

async fn still_running(proxy: &Running) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!proxy.task.is_finished(), "the proxy stopped");
    assert!(!proxy.drain.is_cancelled(), "the proxy is draining");
}

#[tokio::test]
async fn a_plaintext_transport_header_is_refused_by_a_proxy_with_identity() {
    let setup = setup().await;
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    let backend = Backend::start("books").await;
    // Neither the proxy's admin port nor even an application port: plaintext carries no
    // identity, so the header it brings is not believed.
    for port in [server.admin_addr.port(), backend.addr.port()] {
        let mut bytes = header(port);
        bytes.extend_from_slice(SHUTDOWN);
        let answer = exchange(server.inbound_addr, &bytes).await;
        assert_eq!(
            answer, "",
            "port {port}: the connection is closed unanswered"
        );
    }
    still_running(&server).await;
    let (_, text) = admin_get(&server, "/metrics").await;
    assert_eq!(
        metric(&text, "proxy_error_total", &["plaintext transport header"]),
        2.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_meshed_peer_cannot_reach_the_proxys_own_listeners_through_it() {
    let setup = setup().await;
    let client = proxy_with(
        Some(&setup.controller),
        Some(setup.identity(WEB_ID, "web-token")),
    )
    .await;
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    let own = [
        ("admin", server.admin_addr.port()),
        ("outbound", server.outbound_addr.port()),
        ("inbound", server.inbound_addr.port()),
    ];
    for (name, port) in own {
        let authority = format!("books-{name}.shop.svc.cluster.local:{port}");
        setup.meshed_port(&authority, &server, port);
        // `curl -X POST http://POD_IP:4191/shutdown` from a meshed app.
        let out = curl(&[
            "-x",
            &format!("http://{}", client.outbound_addr),
            "--include",
            "-X",
            "POST",
            &format!("http://{authority}/shutdown"),
        ])
        .await;
        assert!(out.starts_with("HTTP/1.1 403"), "{name}: {out}");
        assert!(
            out.contains(&format!(
                "mesh-error: proxy port: port {port} is the proxy's {name} port"
            )),
            "{name}: {out}"
        );
    }
    still_running(&server).await;
}

#[tokio::test]
async fn without_identity_a_header_still_never_names_the_proxys_own_ports() {
    let server = proxy(None).await;
    // Headers nested in headers, each naming the inbound port again: refused at the first.
    let fds_before = open_fds();
    for _ in 0..25 {
        let mut bytes = Vec::new();
        for _ in 0..500 {
            bytes.extend_from_slice(&header(server.inbound_addr.port()));
        }
        let answer = exchange(server.inbound_addr, &bytes).await;
        assert_eq!(answer, "");
    }
    assert!(
        open_fds() < fds_before + 20,
        "{} file descriptors open, {fds_before} before",
        open_fds()
    );
    let mut bytes = header(server.admin_addr.port());
    bytes.extend_from_slice(SHUTDOWN);
    let answer = exchange(server.inbound_addr, &bytes).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("proxy's admin port"), "{answer}");
    still_running(&server).await;
    // An application port is still served: a mesh without identity is plaintext.
    let backend = Backend::start("books").await;
    let mut bytes = header(backend.addr.port());
    bytes.extend_from_slice(b"GET /plain HTTP/1.1\r\nhost: books\r\nconnection: close\r\n\r\n");
    let answer = exchange(server.inbound_addr, &bytes).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("backend=books"), "{answer}");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

#[tokio::test]
async fn the_outbound_listener_never_forwards_to_the_proxys_own_listeners() {
    let client = proxy(None).await;
    for (name, addr) in [
        ("admin", client.admin_addr),
        ("inbound", client.inbound_addr),
        ("outbound", client.outbound_addr),
    ] {
        let out = curl(&[
            "-x",
            &format!("http://{}", client.outbound_addr),
            "--include",
            "-X",
            "POST",
            &format!("http://{addr}/shutdown"),
        ])
        .await;
        assert!(out.starts_with("HTTP/1.1 403"), "{name}: {out}");
        assert!(out.contains("proxy's"), "{name}: {out}");
    }
    still_running(&client).await;
}

/// An HTTP/1 request to the admin server over mesh TLS, presenting `client_id`.
async fn admin_over_tls(
    setup: &Setup,
    proxy: &Running,
    client_id: &str,
    method: &str,
    path: &str,
) -> (StatusCode, String, String) {
    let config = setup.ca.client_tls(client_id, BOOKS_ID);
    let stream = TcpStream::connect(proxy.admin_addr)
        .await
        .expect("connect admin");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(mesh_proxy::tls::server_name(BOOKS_ID), stream)
        .await
        .expect("TLS handshake with the admin server");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::builder()
                .method(method)
                .uri(path)
                .header("host", "admin")
                .body(Full::<Bytes>::default())
                .expect("request"),
        )
        .await
        .expect("admin answers");
    let status = response.status();
    let mesh_error = response
        .headers()
        .get("mesh-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        mesh_error,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn the_admin_server_reveals_configuration_only_to_the_pod_and_the_controller() {
    let setup = setup().await;
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    // Another workload, authenticated: the open endpoints only.
    for path in ["/metrics", "/ready", "/live"] {
        let (status, _, _) = admin_over_tls(&setup, &server, WEB_ID, "GET", path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    for (method, path) in [
        ("GET", "/config"),
        ("GET", "/identity"),
        ("POST", "/shutdown"),
    ] {
        let (status, mesh_error, _) = admin_over_tls(&setup, &server, WEB_ID, method, path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert!(mesh_error.contains(WEB_ID), "{path}: {mesh_error}");
        assert!(mesh_error.contains(path), "{path}: {mesh_error}");
    }
    // The controller's identity reads the configuration, but never stops the proxy.
    for path in ["/config", "/identity"] {
        let (status, _, body) = admin_over_tls(&setup, &server, CONTROLLER_ID, "GET", path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let (status, _, _) = admin_over_tls(&setup, &server, CONTROLLER_ID, "POST", "/shutdown").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    still_running(&server).await;
    // The pod itself, on loopback.
    let (status, body) = admin_get(&server, "/config").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
