//! Test parts for the proxy's integration tests: a scripted Destination server, real HTTP and
//! gRPC backends, and in-process proxies on 127.0.0.1:0.

#![allow(dead_code)]

pub mod ca;
pub mod outbound;
pub mod policy;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proto::destination::{self, update::Update};
use mesh_proto::tonic::{self, Request as GrpcRequest, Status};
use mesh_proxy::app::{self, Listeners, Running};
use mesh_proxy::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

/// Binds 127.0.0.1:0.
pub async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback")
}

/// A Destination server whose answers the test scripts: each authority maps to a list of
/// endpoints the test can change at any time.
#[derive(Clone, Default)]
pub struct ScriptedDestination {
    targets: Arc<Mutex<HashMap<String, watch::Sender<Vec<destination::Endpoint>>>>>,
    /// `Get` streams open now.
    pub open_streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// A meshed endpoint: the backend's address, reached through the proxy at `proxy_port`.
pub fn meshed(addr: SocketAddr, proxy_port: u16) -> destination::Endpoint {
    destination::Endpoint {
        addr: Some(addr.into()),
        weight: 0,
        inbound_proxy_port: u32::from(proxy_port),
        ..Default::default()
    }
}

/// An unmeshed endpoint, dialled directly.
pub fn plain(addr: SocketAddr) -> destination::Endpoint {
    destination::Endpoint {
        addr: Some(addr.into()),
        ..Default::default()
    }
}

impl ScriptedDestination {
    /// Sets the endpoints of `authority` (creating it), streamed to every watcher as a diff.
    pub fn set(&self, authority: &str, endpoints: Vec<destination::Endpoint>) {
        let mut targets = self.targets.lock().expect("lock");
        match targets.get(authority) {
            Some(sender) => {
                sender.send_replace(endpoints);
            }
            None => {
                targets.insert(authority.to_string(), watch::channel(endpoints).0);
            }
        }
    }

    /// Serves on 127.0.0.1:0 until `stop` fires; returns the URL.
    pub async fn serve(&self, stop: CancellationToken) -> String {
        self.serve_with(None, stop).await
    }

    /// Serves Destination and, when given, OutboundPolicies on one address.
    pub async fn serve_with(
        &self,
        outbound: Option<outbound::ScriptedOutbound>,
        stop: CancellationToken,
    ) -> String {
        let listener = loopback().await;
        let addr = listener.local_addr().expect("addr");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder()
            .add_service(destination::destination_server::DestinationServer::new(
                self.clone(),
            ))
            .add_optional_service(
                outbound
                    .map(mesh_proto::policy::outbound_policies_server::OutboundPoliciesServer::new),
            )
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned());
        tokio::spawn(server);
        format!("http://{addr}")
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<destination::Update, Status>> + Send>>;

fn key(endpoint: &destination::Endpoint) -> Vec<u8> {
    let addr = endpoint.addr.clone().unwrap_or_default();
    let mut key = addr.ip;
    key.extend_from_slice(&addr.port.to_be_bytes());
    key
}

#[tonic::async_trait]
impl destination::destination_server::Destination for ScriptedDestination {
    type GetStream = UpdateStream;

    async fn get(
        &self,
        request: GrpcRequest<destination::GetDestination>,
    ) -> Result<tonic::Response<Self::GetStream>, Status> {
        let authority = match request.into_inner().target {
            Some(destination::get_destination::Target::Authority(authority)) => authority,
            Some(destination::get_destination::Target::Addr(addr)) => {
                let addr = SocketAddr::try_from(&addr)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                addr.to_string()
            }
            None => return Err(Status::invalid_argument("no target")),
        };
        let mut receiver = self
            .targets
            .lock()
            .expect("lock")
            .get(&authority)
            .map(|sender| sender.subscribe())
            .ok_or_else(|| Status::not_found(format!("{authority} is unknown")))?;
        let open = OpenStream::new(&self.open_streams);
        let stream = async_stream(move |tx| async move {
            let _open = open;
            let mut sent: Vec<destination::Endpoint> = Vec::new();
            loop {
                let now = receiver.borrow_and_update().clone();
                let removed: Vec<_> = sent
                    .iter()
                    .filter(|old| !now.iter().any(|new| key(new) == key(old)))
                    .filter_map(|old| old.addr.clone())
                    .collect();
                let added: Vec<_> = now
                    .iter()
                    .filter(|new| !sent.iter().any(|old| key(new) == key(old)))
                    .cloned()
                    .collect();
                let labels = HashMap::from([
                    ("service".to_string(), "books".to_string()),
                    ("namespace".to_string(), "shop".to_string()),
                ]);
                let mut updates = Vec::new();
                if now.is_empty() {
                    updates.push(Update::NoEndpoints(destination::NoEndpoints {
                        exists: true,
                    }));
                } else {
                    if !removed.is_empty() {
                        updates.push(Update::Remove(destination::RemoveEndpoints {
                            addrs: removed,
                        }));
                    }
                    if !added.is_empty() {
                        updates.push(Update::Add(destination::AddEndpoints {
                            endpoints: added,
                            metric_labels: labels,
                        }));
                    }
                }
                for update in updates {
                    if tx
                        .send(Ok(destination::Update {
                            update: Some(update),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                sent = now;
                // Ends when the proxy drops the stream, not only at the next change.
                tokio::select! {
                    changed = receiver.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(tonic::Response::new(stream))
    }
}

/// Counts a `Get` stream open while it lives.
struct OpenStream(Arc<std::sync::atomic::AtomicUsize>);

impl OpenStream {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A stream fed by a task, so the scripted server can be written as a loop.
fn async_stream<F, Fut>(body: F) -> UpdateStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<destination::Update, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A real HTTP/1.1 + HTTP/2 backend that names itself in every answer:
/// - `/echo` returns the request body;
/// - `/large?bytes=N` returns N bytes;
/// - `/status/N` answers with status N;
/// - `/slow?ms=N` waits N ms first;
/// - an `Upgrade: echo` request switches protocols and echoes bytes;
/// - anything else returns `backend=<name> method=<m> path=<p> host=<h> version=<v>`,
///   with status 500 when the backend's name starts with `failing`.
pub struct Backend {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        Self::serve(name, loopback().await).await
    }

    /// A backend that waits `delay` before every answer: a slow replica.
    pub async fn start_answering_after(name: &str, delay: Duration) -> Self {
        Self::serve_after(name, loopback().await, delay).await
    }

    /// A backend on a listener the test bound.
    pub async fn serve(name: &str, listener: TcpListener) -> Self {
        Self::serve_after(name, listener, Duration::ZERO).await
    }

    async fn serve_after(name: &str, listener: TcpListener, delay: Duration) -> Self {
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let name: Arc<str> = Arc::from(name);
        let token = stop.clone();
        tokio::spawn(async move {
            let mut connections = Vec::new();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = token.cancelled() => break,
                };
                let Ok((stream, _)) = accepted else { continue };
                let name = name.clone();
                let token = token.clone();
                connections.push(tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let name = name.clone();
                        async move {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, Infallible>(answer(&name, request).await)
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        () = token.cancelled() => {}
                    }
                }));
            }
            // Killing a backend closes its open connections too.
            for connection in connections {
                connection.abort();
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(name: &str, mut request: Request<Incoming>) -> Response<Full<Bytes>> {
    let traceparent = request.headers().get("traceparent").cloned();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let number = |key: &str| -> u64 {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    if request.headers().get(http::header::UPGRADE).is_some() {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "echo")
            .body(Full::default())
            .expect("response");
    }
    let mut response = if path == "/echo" {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Response::new(Full::new(body))
    } else if path == "/large" {
        Response::new(Full::new(Bytes::from(vec![b'x'; number("bytes") as usize])))
    } else if path == "/flaky" {
        // Fails deterministically: the first `fail` of every 10 requests get 500.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut response = Response::new(Full::new(Bytes::from_static(b"flaky\n")));
        if n % 10 < number("fail") {
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        response
    } else if let Some(status) = path.strip_prefix("/status/") {
        let mut response = Response::new(Full::new(Bytes::from_static(b"as asked\n")));
        *response.status_mut() =
            StatusCode::from_u16(status.parse().unwrap_or(500)).unwrap_or(StatusCode::OK);
        response
    } else {
        if path == "/slow" {
            tokio::time::sleep(Duration::from_millis(number("ms"))).await;
        }
        let host = request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or(request.uri().authority().map(|a| a.as_str()))
            .unwrap_or("")
            .to_string();
        Response::new(Full::new(Bytes::from(format!(
            "backend={name} method={} path={path} host={host} version={:?}\n",
            request.method(),
            request.version()
        ))))
    };
    if name.starts_with("failing") {
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    response
        .headers_mut()
        .insert("x-backend", name.parse().expect("header value"));
    if let Some(traceparent) = traceparent {
        response
            .headers_mut()
            .insert("x-seen-traceparent", traceparent);
    }
    response
}

/// A proxy running in this process on loopback ports.
pub async fn proxy(controller: Option<&str>) -> Running {
    proxy_with(controller, None).await
}

/// How a test proxy gets its identity.
pub struct TestIdentity {
    /// The SPIFFE ID.
    pub id: String,
    /// The token proving it.
    pub token: String,
    /// The trust anchors, PEM.
    pub anchors_pem: String,
    /// The Identity service URL.
    pub service: String,
}

/// A proxy with an identity, waiting until it holds its certificate.
pub async fn proxy_with(controller: Option<&str>, identity: Option<TestIdentity>) -> Running {
    proxy_env(controller, identity, &[]).await
}

/// A proxy with an identity and extra `MESH_PROXY_*` settings.
pub async fn proxy_env(
    controller: Option<&str>,
    identity: Option<TestIdentity>,
    extra: &[(&'static str, &str)],
) -> Running {
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("MESH_PROXY_INBOUND_LISTEN", "127.0.0.1:0".to_string()),
        ("MESH_PROXY_OUTBOUND_LISTEN", "127.0.0.1:0".to_string()),
        ("MESH_PROXY_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("MESH_PROXY_DETECT_TIMEOUT", "200ms".to_string()),
        ("MESH_PROXY_SHUTDOWN_GRACE_PERIOD", "2s".to_string()),
    ]);
    if let Some(controller) = controller {
        vars.insert("MESH_PROXY_CONTROLLER_ADDR", controller.to_string());
    }
    for (var, value) in extra {
        vars.insert(var, value.to_string());
    }
    let mut token_file = None;
    if let Some(identity) = &identity {
        let path = std::env::temp_dir().join(format!(
            "mesh-token-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::write(&path, &identity.token).expect("write token");
        vars.insert("MESH_PROXY_IDENTITY", identity.id.clone());
        vars.insert("MESH_PROXY_IDENTITY_TOKEN_FILE", path.display().to_string());
        vars.insert("MESH_PROXY_TRUST_ANCHORS", identity.anchors_pem.clone());
        vars.insert("MESH_PROXY_IDENTITY_ADDR", identity.service.clone());
        token_file = Some(path);
    }
    let config = Config::from_lookup(|var| vars.get(var).cloned()).expect("test config");
    let listeners = Listeners::bind(&config)
        .await
        .expect("bind proxy listeners");
    let running = app::start(config, listeners).expect("start proxy");
    if token_file.is_some() {
        // Wait for the first certificate, as a kubelet waits on /ready.
        for _ in 0..100 {
            if admin_get(&running, "/ready").await.0 == StatusCode::OK {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    running
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A keep-alive HTTP/1 client of a proxy's outbound listener, sending absolute-form requests
/// as an application using it as its HTTP proxy would.
pub struct ProxyClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl ProxyClient {
    pub async fn connect(proxy: &Running) -> Self {
        let stream = tokio::net::TcpStream::connect(proxy.outbound_addr)
            .await
            .expect("connect outbound");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        Self { sender }
    }

    /// GETs `url` with `headers`; returns the status, the `x-backend` header and the body.
    pub async fn get(&mut self, url: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
        let uri: http::Uri = url.parse().expect("url");
        let mut builder = Request::get(url).header(
            http::header::HOST,
            uri.authority().expect("authority").as_str(),
        );
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        self.sender.ready().await.expect("connection ready");
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            self.sender
                .send_request(builder.body(Full::default()).expect("request")),
        )
        .await
        .expect("response in time")
        .expect("response");
        let status = response.status().as_u16();
        let backend = response
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, backend, String::from_utf8_lossy(&body).into_owned())
    }
}

/// GETs a path on a proxy's admin server.
pub async fn admin_get(proxy: &Running, path: &str) -> (StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(proxy.admin_addr)
        .await
        .expect("connect admin");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("admin handshake");
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get(path)
                .header("host", "admin")
                .body(Full::<Bytes>::default())
                .expect("request"),
        )
        .await
        .expect("admin request");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Runs curl with `args`, returning stdout (and failing the test with stderr on error).
pub async fn curl(args: &[&str]) -> String {
    let output = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl runs (apt-get install curl)");
    assert!(
        output.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of a metric line starting with `prefix` (name and labels), summed over matches.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An HTTP/2 frame: the 9-byte head (length, type, flags, stream) and its payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A HEADERS frame ending its stream: `GET http://books{path}` as a peer proxy sends an HTTP/1
/// request, HPACK-encoded with static-table names and literal values (no Huffman coding).
fn h2_get(stream: u32, path: &str) -> Vec<u8> {
    let literal = |block: &mut Vec<u8>, value: &str| {
        block.push(u8::try_from(value.len()).expect("short value"));
        block.extend_from_slice(value.as_bytes());
    };
    // :method GET and :scheme http are static entries 2 and 6.
    let mut block = vec![0x82, 0x86];
    // :authority (1) and :path (4), literal values without indexing.
    block.push(0x01);
    literal(&mut block, "books");
    block.push(0x04);
    literal(&mut block, path);
    // mesh-orig-proto, a literal name.
    block.push(0x00);
    literal(&mut block, "mesh-orig-proto");
    literal(&mut block, "HTTP/1.1");
    const END_STREAM_AND_HEADERS: u8 = 0x1 | 0x4;
    h2_frame(0x1, END_STREAM_AND_HEADERS, stream, &block)
}

/// Sends, in one write to `proxy`'s inbound port as a client proxy without identity does, one
/// request to `backend` that stays, `resets` requests each reset right after it, and one more
/// request. Returns the streams answered to the end of their bodies, or the debug data of the
/// GOAWAY that closed the connection first. Raw frames, written by hand: sent with the `h2`
/// client, the resets reached the server only after it had taken the streams, and the burst
/// passed even with h2's default guard of 20.
pub async fn reset_burst(
    proxy: &Running,
    backend: SocketAddr,
    resets: u32,
) -> Result<Vec<u32>, String> {
    const DATA: u8 = 0x0;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const CANCEL: u32 = 0x8;
    let header = mesh_proxy::transport_header::TransportHeader {
        port: backend.port(),
        opaque: false,
        name: String::new(),
        tunnel_to: None,
    };
    let mut bytes = header.encode();
    bytes.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    bytes.extend(h2_frame(SETTINGS, 0, 0, &[]));
    // HTTP/1 requests carried over HTTP/2, so the backend gets HTTP/1: only the proxy's
    // HTTP/2 server sees the resets.
    bytes.extend(h2_get(1, "/slow?ms=300"));
    let last = 3 + 2 * resets;
    for stream in (3..last).step_by(2) {
        bytes.extend(h2_get(stream, "/slow?ms=300"));
        bytes.extend(h2_frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    bytes.extend(h2_get(last, "/after"));
    let mut stream = tokio::net::TcpStream::connect(proxy.inbound_addr)
        .await
        .expect("connect");
    stream.write_all(&bytes).await.expect("write");

    let mut answered = Vec::new();
    let read = async {
        while answered.len() < 2 {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await.expect("a frame");
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            stream.read_exact(&mut payload).await.expect("its payload");
            if head[3] == GOAWAY {
                return Err(
                    String::from_utf8_lossy(payload.get(8..).unwrap_or_default()).into_owned(),
                );
            }
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if head[3] == DATA && head[4] & 0x1 != 0 {
                answered.push(id);
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered or closed in time")?;
    answered.sort_unstable();
    Ok(answered)
}
