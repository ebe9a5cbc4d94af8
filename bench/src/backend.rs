//! The servers behind every topology: nginx (HTTP/1.1 on one port, HTTP/2 prior knowledge on
//! another) and a small hyper server for the self-test. Both answer every request with the
//! same 1 KiB body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::child::{Service, find_program};

/// The size of every answer.
pub const BODY_BYTES: usize = 1024;

/// The body every backend answers.
pub fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY_BYTES])
}

/// nginx's configuration: one single-process server (no master, so /proc shows all of its
/// CPU under one pid), no logs, connections kept alive for the whole run.
pub fn nginx_conf(dir: &Path, http1: SocketAddr, http2: SocketAddr) -> String {
    // Stay within the open-files limit, which nginx cannot raise either.
    let connections = crate::procfs::open_files_limit()
        .unwrap_or(1024)
        .saturating_sub(100)
        .max(512);
    let dir = dir.display();
    let body = "x".repeat(BODY_BYTES);
    format!(
        "master_process off;\n\
         worker_processes 1;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/nginx-error.log warn;\n\
         events {{\n    worker_connections {connections};\n}}\n\
         http {{\n    access_log off;\n    default_type text/plain;\n\
         \x20   client_body_temp_path {dir}/nginx-body;\n    proxy_temp_path {dir}/nginx-proxy;\n\
         \x20   fastcgi_temp_path {dir}/nginx-fastcgi;\n    uwsgi_temp_path {dir}/nginx-uwsgi;\n\
         \x20   scgi_temp_path {dir}/nginx-scgi;\n\
         \x20   keepalive_requests 10000000;\n    keepalive_timeout 600s;\n\
         \x20   http2_max_concurrent_streams 256;\n\
         \x20   server {{\n        listen {http1} backlog=4096;\n        location / {{ return 200 \"{body}\"; }}\n    }}\n\
         \x20   server {{\n        listen {http2} http2 backlog=4096;\n        location / {{ return 200 \"{body}\"; }}\n    }}\n\
         }}\n"
    )
}

/// Starts nginx in the foreground with its own configuration in `dir`.
pub async fn start_nginx(dir: &Path, http1: SocketAddr, http2: SocketAddr) -> Result<Service> {
    let nginx = find_program("nginx").context("nginx is not installed (scripts/bench-setup)")?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir, http1, http2)).context("writing nginx.conf")?;
    let mut command = tokio::process::Command::new(nginx);
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"]);
    let mut service = Service::spawn("nginx", command, dir)?;
    service
        .wait_listening(http1, std::time::Duration::from_secs(10))
        .await?;
    service
        .wait_listening(http2, std::time::Duration::from_secs(10))
        .await?;
    Ok(service)
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until the task is dropped,
/// answering every request with [`body`].
pub async fn serve(listener: TcpListener) {
    let body = body();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
