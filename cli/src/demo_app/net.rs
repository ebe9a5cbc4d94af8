//! How the demo app's services find and reach each other, in both modes of a local mesh:
//!
//! - root mode: service names resolve through the pod's hosts file to cluster IPs, and the
//!   pod's iptables rules hand every connection to the outbound proxy;
//! - loopback mode: nothing is captured, so the app itself sends every request to the proxy
//!   named by `HTTP_PROXY`: HTTP/1.1 requests in absolute form (`GET http://books...`),
//!   HTTP/2 and gRPC with the service in `:authority`, which the proxy routes by.
//!
//! Also where a server listens: loopback mode shares the machine's network between pods, so
//! each listens on its own pod IP; root mode listens on every address of the pod's namespace,
//! where the inbound proxy reaches it on localhost.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// How long a connection attempt may take before the request fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The HTTP proxy the local runtime gave this pod, if any (`HTTP_PROXY`, or `http_proxy`).
pub fn http_proxy_from_env() -> anyhow::Result<Option<SocketAddr>> {
    let value = ["HTTP_PROXY", "http_proxy"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
    let Some(value) = value else {
        return Ok(None);
    };
    parse_proxy(&value).map(Some)
}

/// `http://127.77.0.2:4140` (or without the scheme) as a socket address. The proxy is
/// always an IP address in a local mesh, so no name resolution is needed.
pub fn parse_proxy(value: &str) -> anyhow::Result<SocketAddr> {
    let trimmed = value
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    trimmed
        .parse()
        .with_context(|| format!("HTTP_PROXY {value:?} is not http://IP:PORT"))
}

/// Where a server listens: `LISTEN_ADDR` when set; else, behind an HTTP proxy (loopback
/// mode, one network for every pod), the pod's own IP from `POD_IP`; else every address.
pub fn listen_addr(default_port: u16) -> anyhow::Result<SocketAddr> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    choose_listen_addr(
        env("LISTEN_ADDR").as_deref(),
        env("PORT").as_deref(),
        env("POD_IP").as_deref(),
        http_proxy_from_env()?.is_some(),
        default_port,
    )
}

/// [`listen_addr`] without the environment, for tests.
pub fn choose_listen_addr(
    listen: Option<&str>,
    port: Option<&str>,
    pod_ip: Option<&str>,
    behind_http_proxy: bool,
    default_port: u16,
) -> anyhow::Result<SocketAddr> {
    if let Some(listen) = listen {
        return listen
            .parse()
            .with_context(|| format!("LISTEN_ADDR {listen:?} is not IP:PORT"));
    }
    let port = match port {
        Some(port) => port
            .parse()
            .with_context(|| format!("PORT {port:?} is not a port number"))?,
        None => default_port,
    };
    if !behind_http_proxy {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    let Some(pod_ip) = pod_ip else {
        bail!(
            "HTTP_PROXY is set (loopback mode: pods share this machine's network) but POD_IP is not: \
             give the container POD_IP from the downward API (fieldRef status.podIP) or LISTEN_ADDR"
        );
    };
    let ip: IpAddr = pod_ip
        .parse()
        .with_context(|| format!("POD_IP {pod_ip:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Connects to the request's host, or to the HTTP proxy when there is one. A connection to
/// the proxy is marked proxied, so the HTTP/1 client sends requests in absolute form.
#[derive(Clone, Debug)]
pub struct MeshConnector {
    proxy: Option<SocketAddr>,
    direct: HttpConnector,
}

impl MeshConnector {
    /// A connector through `proxy` when given, else straight to each request's host.
    pub fn new(proxy: Option<SocketAddr>) -> Self {
        let mut direct = HttpConnector::new();
        direct.set_connect_timeout(Some(CONNECT_TIMEOUT));
        direct.set_nodelay(true);
        MeshConnector { proxy, direct }
    }
}

/// A connection made by [`MeshConnector`].
#[derive(Debug)]
pub struct MeshConnection {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for MeshConnection {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for MeshConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshConnection;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshConnection, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Uri>::poll_ready(&mut self.direct, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self.proxy {
            Some(proxy) => Box::pin(async move {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(proxy))
                    .await
                    .map_err(|_| format!("connecting to the HTTP proxy {proxy} timed out"))??;
                stream.set_nodelay(true)?;
                Ok(MeshConnection {
                    io: TokioIo::new(stream),
                    proxied: true,
                })
            }),
            None => {
                let connecting = tower::Service::<Uri>::call(&mut self.direct, uri);
                Box::pin(async move {
                    let io = connecting.await?;
                    Ok(MeshConnection { io, proxied: false })
                })
            }
        }
    }
}

/// A pooled HTTP client for the demo: HTTP/1.1, or HTTP/2 with prior knowledge (`h2c`).
pub type HttpClient = Client<MeshConnector, Full<Bytes>>;

/// Which HTTP version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// A client through `proxy` (when given) speaking `version`.
pub fn http_client(proxy: Option<SocketAddr>, version: HttpVersion) -> HttpClient {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(30));
    if version == HttpVersion::Http2 {
        builder.http2_only(true);
    }
    builder.build(MeshConnector::new(proxy))
}

/// A lazily connecting gRPC channel to `url` (`http://authors.demo.svc.cluster.local:9090`)
/// through `proxy` when given.
pub fn grpc_channel(
    url: &str,
    proxy: Option<SocketAddr>,
) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("{url:?} is not a URL"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_secs(5));
    Ok(endpoint.connect_with_connector_lazy(MeshConnector::new(proxy)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LISTEN_ADDR, PORT, POD_IP, behind an HTTP proxy, and the address wanted.
    type ListenCase<'a> = (
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
        bool,
        &'a str,
    );

    #[test]
    fn listen_addresses_follow_the_mode() {
        let cases: &[ListenCase] = &[
            // Root mode: every address of the pod's own namespace.
            (None, Some("8080"), Some("10.77.0.3"), false, "0.0.0.0:8080"),
            (None, None, None, false, "0.0.0.0:9000"),
            // Loopback mode: the pod's own address on the shared loopback.
            (
                None,
                Some("8080"),
                Some("127.77.0.3"),
                true,
                "127.77.0.3:8080",
            ),
            // An explicit address wins.
            (
                Some("127.0.0.1:1"),
                Some("8080"),
                Some("127.77.0.3"),
                true,
                "127.0.0.1:1",
            ),
        ];
        for (listen, port, pod_ip, proxied, want) in cases {
            let got = choose_listen_addr(*listen, *port, *pod_ip, *proxied, 9000)
                .expect("a valid address");
            assert_eq!(
                got.to_string(),
                *want,
                "{listen:?} {port:?} {pod_ip:?} {proxied}"
            );
        }
    }

    #[test]
    fn bad_listen_settings_name_the_variable() {
        let error = choose_listen_addr(None, Some("http"), None, false, 1)
            .expect_err("not a port")
            .to_string();
        assert!(error.contains("PORT"), "{error}");
        let error = choose_listen_addr(None, None, None, true, 1)
            .expect_err("no pod IP")
            .to_string();
        assert!(error.contains("POD_IP"), "{error}");
    }

    /// A fake HTTP proxy on 127.0.0.1:0: answers one request with 200 and hands back the
    /// request's bytes as received.
    async fn fake_proxy() -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake proxy");
        let addr = listener.local_addr().expect("bound");
        let received = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("a connection");
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await.expect("read the request");
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&chunk[..n]);
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            request
        });
        (addr, received)
    }

    #[tokio::test]
    async fn behind_an_http_proxy_http1_requests_go_to_the_proxy_in_absolute_form() {
        let (proxy, received) = fake_proxy().await;
        let client = http_client(Some(proxy), HttpVersion::Http1);
        let request = http::Request::get("http://books.demo.svc.cluster.local:8080/books/7")
            .body(Full::new(Bytes::new()))
            .expect("a request");
        let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
            .await
            .expect("answered in time")
            .expect("answered");
        assert_eq!(response.status(), 200);
        let request = String::from_utf8(received.await.expect("the proxy ran"))
            .expect("an HTTP/1 head is text");
        assert!(
            request
                .starts_with("GET http://books.demo.svc.cluster.local:8080/books/7 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("host: books.demo.svc.cluster.local:8080"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn without_a_proxy_requests_go_to_the_host_in_origin_form() {
        let (server, received) = fake_proxy().await;
        let client = http_client(None, HttpVersion::Http1);
        let request = http::Request::get(format!("http://{server}/books/7"))
            .body(Full::new(Bytes::new()))
            .expect("a request");
        let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
            .await
            .expect("answered in time")
            .expect("answered");
        assert_eq!(response.status(), 200);
        let request = String::from_utf8(received.await.expect("the server ran"))
            .expect("an HTTP/1 head is text");
        assert!(
            request.starts_with("GET /books/7 HTTP/1.1\r\n"),
            "{request}"
        );
    }

    #[test]
    fn proxies_parse_with_or_without_a_scheme() {
        for (text, want) in [
            ("http://127.77.0.2:4140", "127.77.0.2:4140"),
            ("127.77.0.2:4140", "127.77.0.2:4140"),
            ("http://127.77.0.2:4140/", "127.77.0.2:4140"),
        ] {
            assert_eq!(
                parse_proxy(text).expect("valid").to_string(),
                want,
                "{text}"
            );
        }
        assert!(parse_proxy("http://proxy.example:3128").is_err());
    }
}
