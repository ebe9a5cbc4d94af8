//! A hostile peer against real proxies: it cannot shut down, tap, read the configuration of or
//! send traffic as another pod's proxy, however it reaches the proxy's ports.
//!
//! Every test here reproduced a finding of the hardening review before its fix.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_proto::destination;
use mesh_proxy::app::Running;
use mesh_proxy::transport_header::TransportHeader;
use support::ca::IdentityMesh;
use support::outbound::{ScriptedOutbound, plan, retrying, route};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BOOKS_ID: &str = "spiffe://cluster.local/ns/shop/sa/books";
const CONTROLLER_ID: &str = "spiffe://cluster.local/ns/mesh-system/sa/mesh-controller";

async fn setup() -> IdentityMesh {
    IdentityMesh::new(
        Duration::from_secs(3600),
        &[("web-token", WEB_ID), ("books-token", BOOKS_ID)],
    )
    .await
}

/// A client proxy for `web` (discovery from the controller) and a server proxy for `books`,
/// each with its identity.
async fn web_and_books(setup: &IdentityMesh) -> (Running, Running) {
    let client = proxy_with(
        Some(&setup.controller),
        Some(setup.identity(WEB_ID, "web-token")),
    )
    .await;
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    (client, server)
}

/// `authority` is a meshed endpoint on `port` of the pod behind `server` (which proves
/// BOOKS_ID): what discovery answers for a pod IP and any of its ports.
fn meshed_port(setup: &IdentityMesh, authority: &str, server: &Running, port: u16) {
    let addr = std::net::SocketAddr::new(server.inbound_addr.ip(), port);
    setup.meshed_endpoint(authority, addr, server, BOOKS_ID);
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
        tunnel_to: None,
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
    let (client, server) = web_and_books(&setup).await;
    let own = [
        ("admin", server.admin_addr.port()),
        ("outbound", server.outbound_addr.port()),
        ("inbound", server.inbound_addr.port()),
    ];
    for (name, port) in own {
        let authority = format!("books-{name}.shop.svc.cluster.local:{port}");
        meshed_port(&setup, &authority, &server, port);
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
    setup: &IdentityMesh,
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

const BOOKS: &str = "books.shop.svc.cluster.local:8080";

/// BOOKS routed to `backend` through one route retrying 5xx up to 3 times.
async fn retrying_books(
    backend: &Backend,
    stop: &CancellationToken,
    extra: &[(&'static str, &str)],
) -> Running {
    let destination = ScriptedDestination::default();
    let outbound = ScriptedOutbound::default();
    let url = destination
        .serve_with(Some(outbound.clone()), stop.clone())
        .await;
    destination.set(BOOKS, vec![plain(backend.addr)]);
    let mut plan = plan(BOOKS, vec![route("all", vec![])]);
    plan.retry = Some(retrying(&["5xx"], 3, 1.0, 100));
    outbound.set(BOOKS, plan);
    proxy_env(Some(&url), None, extra).await
}

#[tokio::test]
async fn bodies_buffered_for_retries_stay_within_the_caps() {
    let stop = CancellationToken::new();
    let backend = Backend::start("books").await;
    // Room for two 500-byte bodies in the proxy, one per connection.
    let client = retrying_books(
        &backend,
        &stop,
        &[
            ("MESH_PROXY_RETRY_BUFFER_BYTES", "1000"),
            ("MESH_PROXY_RETRY_BUFFER_CONNECTION_BYTES", "600"),
        ],
    )
    .await;
    // Four HTTP/2 connections of 25 slow requests each, all in flight at once.
    let mut senders = Vec::new();
    for _ in 0..4 {
        let stream = TcpStream::connect(client.outbound_addr)
            .await
            .expect("connect");
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(connection);
        senders.push(sender);
    }
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut sender = senders[i % 4].clone();
        requests.spawn(async move {
            let request = Request::post(format!("http://{BOOKS}/slow?ms=500"))
                .body(Full::new(Bytes::from(vec![b'x'; 500])))
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            response.status()
        });
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (_, text) = admin_get(&client, "/metrics").await;
    let held = metric(&text, "retry_buffered_bytes", &[]);
    assert!(held <= 1000.0, "{held} bytes held for retries: {text}");
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.expect("request task"), StatusCode::OK);
    }
    let (_, text) = admin_get(&client, "/metrics").await;
    let unbuffered = metric(&text, "route_retry_total", &["reason=\"buffer full\""]);
    assert!(unbuffered >= 98.0, "{unbuffered} sent unbuffered: {text}");
    assert_eq!(metric(&text, "retry_buffered_bytes", &[]), 0.0);
}

/// Whether the peer closes `stream` within `within` (a read returns end of stream or an
/// error) rather than leaving it open.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_elapsed) => return false,
        }
    }
}

#[tokio::test]
async fn a_listener_at_its_connection_limit_closes_new_connections_at_once() {
    let server = proxy_env(None, None, &[("MESH_PROXY_ADMIN_MAX_CONNECTIONS", "3")]).await;
    // Three connections that say nothing hold the admin server's three slots.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            TcpStream::connect(server.admin_addr)
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = TcpStream::connect(server.admin_addr)
        .await
        .expect("the kernel still accepts");
    assert!(
        closed_within(&mut fourth, Duration::from_secs(2)).await,
        "the connection past the limit is closed at once"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, text) = admin_get(&server, "/metrics").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "slots free again once the holders leave"
    );
    assert_eq!(
        metric(
            &text,
            "listener_connections_refused_total",
            &["listener=\"admin\"", "reason=\"connection limit\""]
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_slow_http1_client_is_closed_after_the_header_read_timeout() {
    let client = proxy_env(
        None,
        None,
        &[("MESH_PROXY_HTTP_HEADER_READ_TIMEOUT", "300ms")],
    )
    .await;
    // Slowloris: a request head that never ends.
    let mut stream = TcpStream::connect(client.outbound_addr)
        .await
        .expect("connect");
    stream
        .write_all(b"GET http://books/ HTTP/1.1\r\nhost: books\r\n")
        .await
        .expect("write");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.write_all(b"x-slow: 1\r\n").await;
    }
    assert!(closed_within(&mut stream, Duration::from_secs(2)).await);
    let (_, text) = admin_get(&client, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "connection_timeout_total",
            &["listener=\"outbound\"", "reason=\"http header read\""]
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_silent_opaque_connection_is_closed_when_idle() {
    let server = proxy_env(None, None, &[("MESH_PROXY_TCP_IDLE_TIMEOUT", "300ms")]).await;
    // An application that accepts and never speaks.
    let app = loopback().await;
    let app_port = app.local_addr().expect("addr").port();
    let accepted = tokio::spawn(async move { app.accept().await });
    let mut stream = TcpStream::connect(server.inbound_addr)
        .await
        .expect("connect");
    let opaque = TransportHeader {
        port: app_port,
        opaque: true,
        name: String::new(),
        tunnel_to: None,
    };
    stream.write_all(&opaque.encode()).await.expect("write");
    stream.write_all(b"hello").await.expect("write");
    assert!(closed_within(&mut stream, Duration::from_secs(2)).await);
    accepted.await.expect("task").expect("the app was reached");
    let (_, text) = admin_get(&server, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "connection_timeout_total",
            &["listener=\"inbound\"", "reason=\"tcp idle\""]
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_stalled_tls_handshake_on_the_admin_port_is_closed() {
    let setup = setup().await;
    let server = proxy_env(
        None,
        Some(setup.identity(BOOKS_ID, "books-token")),
        &[("MESH_PROXY_TLS_HANDSHAKE_TIMEOUT", "300ms")],
    )
    .await;
    for addr in [server.admin_addr, server.inbound_addr] {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // The first byte of a TLS record, and nothing more.
        stream.write_all(&[0x16]).await.expect("write");
        assert!(
            closed_within(&mut stream, Duration::from_secs(2)).await,
            "{addr}"
        );
    }
    let (_, text) = admin_get(&server, "/metrics").await;
    for listener in ["admin", "inbound"] {
        assert_eq!(
            metric(
                &text,
                "connection_timeout_total",
                &[
                    &format!("listener=\"{listener}\""),
                    "reason=\"tls handshake\""
                ]
            ),
            1.0,
            "{listener}: {text}"
        );
    }
}

#[tokio::test]
async fn listeners_take_the_configured_backlog() {
    let server = proxy_env(None, None, &[("MESH_PROXY_LISTEN_BACKLOG", "777")]).await;
    // `ss -ltn` shows a listening socket's backlog in its Send-Q column.
    let output = tokio::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", server.inbound_addr.port())])
        .output()
        .await
        .expect("ss runs (iproute2)");
    let listing = String::from_utf8_lossy(&output.stdout);
    let send_q = listing.split_whitespace().nth(2);
    assert_eq!(send_q, Some("777"), "{listing}");
}

#[tokio::test]
async fn a_client_hears_http_1_1_from_an_http_1_0_app_behind_a_peer() {
    let setup = setup().await;
    let (client, server) = web_and_books(&setup).await;
    // An application that answers every request in HTTP/1.0 and closes, as Python's
    // http.server does.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app_port = app.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nold")
                    .await;
            });
        }
    });
    meshed_port(&setup, BOOKS, &server, app_port);
    let proxy = format!("http://{}", client.outbound_addr);
    // Twice: the first over a new HTTP/1 connection to the peer, the second reusing it.
    for _ in 0..2 {
        let out = curl(&["-si", "-x", &proxy, &format!("http://{BOOKS}/")]).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("old"), "{out}");
    }
}

#[tokio::test]
async fn http1_requests_between_proxies_share_a_few_connections() {
    let setup = setup().await;
    let (client, server) = web_and_books(&setup).await;
    let backend = Backend::start("books").await;
    meshed_port(&setup, BOOKS, &server, backend.addr.port());
    // Fifty HTTP/1 client connections, each with one slow request in flight.
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..50 {
        let proxy = format!("http://{}", client.outbound_addr);
        requests.spawn(async move {
            curl(&[
                "-x",
                &proxy,
                "-H",
                &format!("x-request: {i}"),
                &format!("http://{BOOKS}/slow?ms=2000"),
            ])
            .await
        });
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, text) = admin_get(&server, "/metrics").await;
    let open = metric(
        &text,
        "listener_connections_open",
        &["listener=\"inbound\""],
    );
    // The first two took the client proxy's two HTTP/1 connections to its peer
    // (`client::PEER_HTTP1_CONNECTIONS`); the other 48 share one HTTP/2 connection.
    assert_eq!(
        open, 3.0,
        "inbound connections from the one client proxy: {text}"
    );
    while let Some(body) = requests.join_next().await {
        let body = body.expect("request task");
        // The application still sees the HTTP/1.1 request its client made, Host included.
        assert!(
            body.starts_with(&format!(
                "backend=books method=GET path=/slow host={BOOKS} version=HTTP/1.1"
            )),
            "{body}"
        );
    }
}

/// A client proxy whose discovery knows BOOKS as `endpoints`.
async fn client_for_books(
    stop: &CancellationToken,
    endpoints: Vec<destination::Endpoint>,
) -> Running {
    let destination = ScriptedDestination::default();
    let url = destination.serve(stop.clone()).await;
    destination.set(BOOKS, endpoints);
    proxy(Some(&url)).await
}

#[tokio::test]
async fn mesh_errors_name_the_service_and_the_reason_never_an_address() {
    let stop = CancellationToken::new();
    // Nothing listens on this address any more.
    let gone = loopback().await.local_addr().expect("addr");
    let client = client_for_books(&stop, vec![plain(gone)]).await;
    let out = curl(&[
        "-x",
        &format!("http://{}", client.outbound_addr),
        "--include",
        &format!("http://{BOOKS}/"),
    ])
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(
        out.contains(&format!("mesh-error: connect failed: {BOOKS}: ")),
        "{out}"
    );
    assert!(
        !out.contains("127.0.0.1"),
        "an address reached the client: {out}"
    );
    assert!(!out.contains(&gone.port().to_string()), "{out}");
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_error() {
    let stop = CancellationToken::new();
    let backend = Backend::start("books").await;
    let client = client_for_books(&stop, vec![plain(backend.addr)]).await;
    let request = format!(
        "POST http://{BOOKS}/echo HTTP/1.1\r\nhost: {BOOKS}\r\ntransfer-encoding: chunked\r\n\r\n\
         5\r\nhello\r\nnot-a-chunk-size\r\n"
    );
    let answer = exchange(client.outbound_addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("mesh-error: bad request"), "{answer}");
}

#[tokio::test]
async fn a_request_with_two_host_headers_is_refused() {
    let stop = CancellationToken::new();
    let backend = Backend::start("books").await;
    let client = client_for_books(&stop, vec![plain(backend.addr)]).await;
    let request = format!(
        "GET http://{BOOKS}/ HTTP/1.1\r\nhost: {BOOKS}\r\nhost: admin.internal\r\nconnection: close\r\n\r\n"
    );
    let answer = exchange(client.outbound_addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("2 Host headers"), "{answer}");
    // An absolute-form target and a Host naming something else: the target wins.
    let request = format!(
        "GET http://{BOOKS}/ HTTP/1.1\r\nhost: admin.internal\r\nconnection: close\r\n\r\n"
    );
    let answer = exchange(client.outbound_addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(&format!("host={BOOKS} ")), "{answer}");
}

#[tokio::test]
async fn h2c_upgrades_are_stripped_and_websockets_kept() {
    let stop = CancellationToken::new();
    let backend = Backend::start("books").await;
    let client = client_for_books(&stop, vec![plain(backend.addr)]).await;
    let h2c = format!(
        "GET http://{BOOKS}/ HTTP/1.1\r\nhost: {BOOKS}\r\nconnection: Upgrade, HTTP2-Settings\r\n\
         upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n"
    );
    let answer = exchange(client.outbound_addr, h2c.as_bytes()).await;
    // The backend switches protocols for any upgrade it sees; it saw none.
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("backend=books"), "{answer}");
    let websocket = format!(
        "GET http://{BOOKS}/ HTTP/1.1\r\nhost: {BOOKS}\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n"
    );
    let answer = exchange(client.outbound_addr, websocket.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
}

#[tokio::test]
async fn retries_go_to_another_replica_and_a_dead_app_is_ejected_at_once() {
    let stop = CancellationToken::new();
    let destination = ScriptedDestination::default();
    let outbound = ScriptedOutbound::default();
    let url = destination
        .serve_with(Some(outbound.clone()), stop.clone())
        .await;
    let client = proxy(Some(&url)).await;
    // Two replicas, each behind its proxy; the second's application is dead (its proxy is up
    // and answers 502 `connect failed`).
    let healthy_proxy = proxy(None).await;
    let dead_proxy = proxy(None).await;
    let healthy = Backend::start("healthy").await;
    let dead_app = loopback().await.local_addr().expect("addr");
    destination.set(
        BOOKS,
        vec![
            meshed(healthy.addr, healthy_proxy.inbound_addr.port()),
            meshed(dead_app, dead_proxy.inbound_addr.port()),
        ],
    );
    let mut plan = plan(BOOKS, vec![route("all", vec![])]);
    plan.retry = Some(retrying(&["gateway-error"], 1, 0.2, 10));
    outbound.set(BOOKS, plan);
    let mut requests = ProxyClient::connect(&client).await;
    for i in 0..200 {
        let (status, backend, body) = requests.get(&format!("http://{BOOKS}/"), &[]).await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(backend, "healthy");
    }
    let (_, text) = admin_get(&client, "/metrics").await;
    assert!(
        metric(&text, "endpoint_ejection_total", &[]) >= 1.0,
        "the dead replica was ejected: {text}"
    );
    // Once ejected, the dead replica is tried again only as a probe after its backoff: at
    // most a couple of retries in 200 requests, not one per request.
    let retried = metric(&text, "route_retry_total", &["reason=\"retried\""]);
    assert!(retried <= 3.0, "{retried} retries");
}

#[tokio::test]
async fn a_proxy_restarted_while_the_controller_is_down_serves_with_its_cached_identity() {
    let setup = setup().await;
    let test_identity = |id: &str, token: &str| setup.identity(id, token);
    let destination = &setup.destination;
    let controller = &setup.controller;
    let cache = std::env::temp_dir().join(format!("mesh-identity-cache-{}", std::process::id()));
    std::fs::create_dir_all(&cache).expect("cache folder");
    let cache_env = [(
        "MESH_PROXY_IDENTITY_CACHE_DIR",
        cache.to_str().expect("UTF-8 path"),
    )];
    let client = proxy_with(Some(controller), Some(test_identity(WEB_ID, "web-token"))).await;
    let first = proxy_env(
        None,
        Some(test_identity(BOOKS_ID, "books-token")),
        &cache_env,
    )
    .await;
    assert_eq!(admin_get(&first, "/ready").await.0, StatusCode::OK);
    // Only the proxy's user may read what it keeps.
    let kept = std::fs::metadata(cache.join("identity.pem")).expect("the identity is cached");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&kept.permissions()) & 0o777,
        0o600
    );
    first.drain.cancel();
    let _ = first.task.await;

    // The controller goes away; the proxy restarts.
    setup.identity_stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let restarted = proxy_env(
        None,
        Some(test_identity(BOOKS_ID, "books-token")),
        &cache_env,
    )
    .await;
    assert_eq!(
        admin_get(&restarted, "/ready").await.0,
        StatusCode::OK,
        "ready at once with the cached certificate"
    );
    let backend = Backend::start("books").await;
    let mut endpoint = meshed(backend.addr, restarted.inbound_addr.port());
    endpoint.tls_identity = Some(destination::TlsIdentity {
        spiffe_id: BOOKS_ID.to_string(),
        server_name: String::new(),
    });
    destination.set(BOOKS, vec![endpoint]);
    let body = curl(&[
        "-x",
        &format!("http://{}", client.outbound_addr),
        &format!("http://{BOOKS}/after-restart"),
    ])
    .await;
    assert!(body.starts_with("backend=books"), "{body}");

    // Without the cache a restarted proxy has nothing to serve with until the controller
    // returns: it says so by not being ready.
    let uncached = proxy_with(None, Some(test_identity(BOOKS_ID, "books-token"))).await;
    assert_eq!(
        admin_get(&uncached, "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn what_the_proxy_keeps_per_target_goes_once_the_target_is_idle() {
    let stop = CancellationToken::new();
    let destination = ScriptedDestination::default();
    let url = destination.serve(stop.clone()).await;
    let backend = Backend::start("books").await;
    let client = proxy_env(
        Some(&url),
        None,
        &[("MESH_PROXY_TARGET_IDLE_TIMEOUT", "2s")],
    )
    .await;
    // An application calling twenty services once each.
    for i in 0..20 {
        let authority = format!("svc-{i}.shop.svc.cluster.local:8080");
        destination.set(&authority, vec![plain(backend.addr)]);
        let body = curl(&[
            "-x",
            &format!("http://{}", client.outbound_addr),
            &format!("http://{authority}/"),
        ])
        .await;
        assert!(body.starts_with("backend=books"), "{body}");
    }
    let open = || {
        destination
            .open_streams
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    assert!(open() >= 20, "one discovery stream per target: {}", open());
    // Unused for longer than the idle timeout: every stream is closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while open() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} discovery streams still open",
            open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A target used again is resolved afresh.
    let body = curl(&[
        "-x",
        &format!("http://{}", client.outbound_addr),
        "http://svc-0.shop.svc.cluster.local:8080/",
    ])
    .await;
    assert!(body.starts_with("backend=books"), "{body}");
}

/// A peer proxy multiplexes many clients' requests on one HTTP/2 connection, and clients give
/// up on requests all at once (a deadline, a closed page): the streams it resets before this
/// proxy's server took them must not cost the other requests on that connection. h2's guard
/// against rapid-reset floods closed the connection past 20 such streams.
#[tokio::test]
async fn a_burst_of_cancelled_streams_from_a_peer_keeps_its_connection_and_other_requests() {
    let server = proxy(None).await;
    let backend = Backend::start("a").await;
    let answered = reset_burst(&server, backend.addr, 80).await;
    assert_eq!(answered, Ok(vec![1, 163]));
}

/// The guard still holds past the streams a client may have open at once.
#[tokio::test]
async fn a_flood_of_reset_streams_closes_the_connection() {
    let server = proxy(None).await;
    let backend = Backend::start("a").await;
    let closed = reset_burst(&server, backend.addr, 1500).await;
    assert_eq!(closed, Err("too_many_resets".to_string()));
    still_running(&server).await;
}
