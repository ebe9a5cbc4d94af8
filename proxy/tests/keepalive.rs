//! HTTP/1 keep-alive connections between requests: after `RELEASE_AFTER` of quiet the proxy
//! parks them without hyper's buffers, and serves the next request as if nothing happened.
//! Raw sockets, so that every byte and every pause is the test's.

mod support;

use std::time::Duration;

use mesh_proxy::server::RELEASE_AFTER;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Long enough for a release: the proxy looks every `RELEASE_AFTER` and wants one whole
/// period without a byte.
fn quiet() -> Duration {
    RELEASE_AFTER * 3
}

struct Setup {
    _destination: ScriptedDestination,
    stop: CancellationToken,
    proxy: mesh_proxy::app::Running,
    backend: Backend,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn setup(extra: &[(&'static str, &str)]) -> Setup {
    let destination = ScriptedDestination::default();
    let stop = CancellationToken::new();
    let url = destination.serve(stop.clone()).await;
    let proxy = proxy_env(Some(&url), None, extra).await;
    let backend = Backend::start("app").await;
    Setup {
        _destination: destination,
        stop,
        proxy,
        backend,
    }
}

impl Setup {
    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.proxy.outbound_addr)
            .await
            .expect("connect outbound")
    }

    fn get(&self, path: &str) -> String {
        let addr = self.backend.addr;
        format!("GET http://{addr}{path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
    }

    /// Connections the outbound listener has parked now.
    async fn parked(&self) -> f64 {
        let (_, text) = admin_get(&self.proxy, "/metrics").await;
        metric(
            &text,
            "listener_connections_idle",
            &["listener=\"outbound\""],
        )
    }
}

/// Reads one response: its head, and its body by content-length.
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let read = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.expect("read head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.expect("read body");
        (head, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response in time")
}

/// Sends `request` and reads its response.
async fn exchange(stream: &mut TcpStream, request: &str) -> (String, String) {
    stream.write_all(request.as_bytes()).await.expect("write");
    read_response(stream).await
}

/// Whether the proxy closes `stream` within `within` (reading and dropping what it sends).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

fn assert_kept_alive(head: &str, path: &str, body: &str) {
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "the proxy must not close a keep-alive connection: {head}"
    );
    assert!(body.contains(&format!("path={path} ")), "{body}");
}

#[tokio::test]
async fn a_quiet_connection_is_parked_and_serves_the_next_requests() {
    let setup = setup(&[]).await;
    let mut stream = setup.connect().await;
    let (head, body) = exchange(&mut stream, &setup.get("/one")).await;
    assert_kept_alive(&head, "/one", &body);

    tokio::time::sleep(quiet()).await;
    assert_eq!(setup.parked().await, 1.0, "a quiet connection is parked");

    let (head, body) = exchange(&mut stream, &setup.get("/two")).await;
    assert_kept_alive(&head, "/two", &body);
    assert_eq!(setup.parked().await, 0.0, "a connection in use is not");

    // Two pipelined requests in one write, after another quiet spell: both answered, in order.
    tokio::time::sleep(quiet()).await;
    assert_eq!(setup.parked().await, 1.0);
    let pipelined = format!("{}{}", setup.get("/three"), setup.get("/four"));
    stream.write_all(pipelined.as_bytes()).await.expect("write");
    for path in ["/three", "/four"] {
        let (head, body) = read_response(&mut stream).await;
        assert_kept_alive(&head, path, &body);
    }
}

#[tokio::test]
async fn a_request_head_interrupted_by_a_quiet_spell_is_served_whole() {
    let setup = setup(&[]).await;
    let mut stream = setup.connect().await;
    exchange(&mut stream, &setup.get("/one")).await;
    tokio::time::sleep(quiet()).await;
    assert_eq!(setup.parked().await, 1.0);

    // Half a head wakes the connection; the rest comes after a pause long enough for another
    // release, which must hand the first half back rather than lose it.
    let request = setup.get("/split");
    let (first, rest) = request.split_at(request.len() / 2);
    stream.write_all(first.as_bytes()).await.expect("write");
    tokio::time::sleep(quiet()).await;
    stream.write_all(rest.as_bytes()).await.expect("write");
    let (head, body) = read_response(&mut stream).await;
    assert_kept_alive(&head, "/split", &body);
}

#[tokio::test]
async fn a_slow_response_is_not_cut_short_by_the_quiet_on_its_connection() {
    let setup = setup(&[]).await;
    let mut stream = setup.connect().await;
    // The backend takes longer than several release periods to answer: nothing moves on the
    // connection meanwhile, but a request is in flight.
    let slow_ms = (quiet() * 2).as_millis();
    let (head, body) = exchange(&mut stream, &setup.get(&format!("/slow?ms={slow_ms}"))).await;
    assert_kept_alive(&head, "/slow", &body);
    let (head, body) = exchange(&mut stream, &setup.get("/after")).await;
    assert_kept_alive(&head, "/after", &body);
}

#[tokio::test]
async fn an_upgrade_after_a_quiet_spell_is_spliced() {
    let setup = setup(&[]).await;
    let mut stream = setup.connect().await;
    exchange(&mut stream, &setup.get("/one")).await;
    tokio::time::sleep(quiet()).await;
    assert_eq!(setup.parked().await, 1.0);

    let addr = setup.backend.addr;
    stream
        .write_all(
            format!(
                "GET http://{addr}/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Quiet again: an upgraded connection is a tunnel now, never parked.
    tokio::time::sleep(quiet()).await;
    for message in ["hello", "mesh"] {
        stream.write_all(message.as_bytes()).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("read echo");
        assert_eq!(echoed, message.as_bytes());
    }
}

#[tokio::test]
async fn a_parked_connection_closes_after_the_header_read_timeout() {
    let setup = setup(&[("MESH_PROXY_HTTP_HEADER_READ_TIMEOUT", "1s")]).await;
    let mut stream = setup.connect().await;
    exchange(&mut stream, &setup.get("/one")).await;
    tokio::time::sleep(quiet()).await;
    assert_eq!(setup.parked().await, 1.0);
    assert!(
        closed_within(&mut stream, Duration::from_secs(3)).await,
        "an idle keep-alive connection lives as long as the header read timeout"
    );
    let (_, text) = admin_get(&setup.proxy, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "connection_timeout_total",
            &["listener=\"outbound\"", "reason=\"http header read\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(setup.parked().await, 0.0);
}

#[tokio::test]
async fn pausing_mid_head_does_not_extend_the_header_read_timeout() {
    let setup = setup(&[("MESH_PROXY_HTTP_HEADER_READ_TIMEOUT", "1s")]).await;
    let mut stream = setup.connect().await;
    let addr = setup.backend.addr;
    stream
        .write_all(format!("GET http://{addr}/ HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())
        .await
        .expect("write");
    // Slowloris with pauses longer than a release period: each pause could hand the partial
    // head back and restart the timeout, were that allowed more than once.
    let pause = RELEASE_AFTER + RELEASE_AFTER / 2;
    let started = tokio::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(pause).await;
        if stream.write_all(b"x-slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut stream, Duration::from_millis(1)).await {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a head trickling in for {:?} was still open",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed only after {:?}",
        started.elapsed()
    );
}
