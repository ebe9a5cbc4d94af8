//! Real HTTP around the mesh's processes: backends that say who answered, a keep-alive client
//! that uses a proxy's outbound listener as its HTTP proxy, one-shot GETs of admin endpoints,
//! and the loopback address blocks that keep concurrent tests apart.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// Bounds every single request and readiness wait; nothing here should take more than a few
/// seconds.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// An address in a test's own loopback block, `127.X.<block>.<host>` with X from the test
/// process id, so the fixed ports of controllers, proxies and backends never collide with
/// another test running at the same time.
pub fn loopback_ip(block: u8, host: u8) -> IpAddr {
    let process = u8::try_from(std::process::id() % 200).unwrap_or(0) + 20;
    IpAddr::V4(Ipv4Addr::new(127, process, block, host))
}

/// An HTTP/1 backend: answers 200 with `x-backend: NAME`; `/flaky` fails 3 GETs in every 10
/// with 500 (requests 1-3 of each ten), so at most three failures come in a row. Dropping it
/// closes its listener and every connection it has open.
pub struct Backend {
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Serves on `addr` until dropped.
    pub async fn start(addr: SocketAddr, name: &'static str) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("bind a backend");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            // Owned by this task: stopping the backend closes its open connections too, as a
            // killed process's would be.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let counter = counter.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<_>| {
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        let fail = request.uri().path() == "/flaky" && n % 10 < 3;
                        let status = if fail {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            StatusCode::OK
                        };
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("x-backend", name)
                                    .body(Full::new(Bytes::from_static(b"ok\n")))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend { requests, task }
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A keep-alive client of a proxy's outbound listener, as an application using it as its HTTP
/// proxy, calling one authority.
pub struct ProxyClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
}

impl ProxyClient {
    /// Connects to the proxy; requests go to `http://<authority>`.
    pub async fn connect(proxy: SocketAddr, authority: &str) -> ProxyClient {
        let stream = TcpStream::connect(proxy).await.expect("connect the proxy");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        ProxyClient {
            sender,
            authority: authority.to_owned(),
        }
    }

    /// GETs `path`; the status and the backend that answered (its `x-backend`). Panics when
    /// the connection fails or no answer comes in time.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut request = Request::get(format!("http://{}{path}", self.authority))
            .header("host", &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.sender.ready().await.expect("connection ready");
        let response = tokio::time::timeout(
            PATIENCE,
            self.sender
                .send_request(request.body(Full::default()).expect("request")),
        )
        .await
        .expect("a response in time")
        .expect("a response");
        let status = response.status().as_u16();
        let backend = response
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let _ = response.into_body().collect().await;
        (status, backend)
    }
}

/// A GET on one new connection; the status and body.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::get(path).header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::<Bytes>::default())?)
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Waits (bounded by [`PATIENCE`]) until an admin server's `/ready` answers 200.
pub async fn wait_ready(admin: SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok((status, _)) = http_get(admin, "/ready", &[]).await
            && status == StatusCode::OK
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{admin} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of a Prometheus metric's series whose line has every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
