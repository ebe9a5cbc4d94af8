//! Reaching into the mesh from this machine: dialing an in-mesh address (from inside the
//! router namespace in root mode), the loopback forwards built on that, and the HTTP/TCP
//! probes the supervisor runs.
//!
//! A forward's listener is bound on 127.0.0.1 in the host's namespace; each accepted
//! connection is matched by one the dialer makes from inside the router namespace. The bytes
//! pass through this process: the host's namespace and the mesh's are never linked.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use super::netns::in_netns;

/// How to open a TCP connection to an in-mesh address.
#[derive(Debug, Clone)]
pub enum Dialer {
    /// From here (loopback mode: the mesh is on this namespace's loopback).
    Direct,
    /// From inside this network namespace (root mode: the router namespace).
    Netns(String),
}

impl Dialer {
    /// Connects to `addr`, giving up after `timeout`.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        match self {
            Dialer::Direct => TcpStream::connect_timeout(&addr, timeout),
            // The socket is created inside the namespace and stays there; the thread that
            // made it ends, ours never moves.
            Dialer::Netns(netns) => in_netns(netns, || TcpStream::connect_timeout(&addr, timeout)),
        }
    }
}

/// Binds a forward's listener on 127.0.0.1:`port` (0: any free port).
pub fn bind_loopback(port: u16) -> io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
}

/// Serves a forward until the process ends: every connection accepted on `listener` is
/// relayed to `target`, dialed with `dialer`. One thread per direction per connection: the
/// forwards carry admin requests and a few gRPC streams, not bulk traffic.
pub fn spawn_forward(listener: TcpListener, target: SocketAddr, dialer: Dialer) {
    std::thread::spawn(move || {
        for incoming in listener.incoming() {
            let Ok(client) = incoming else {
                continue;
            };
            let dialer = dialer.clone();
            std::thread::spawn(move || relay(client, target, &dialer));
        }
    });
}

fn relay(client: TcpStream, target: SocketAddr, dialer: &Dialer) {
    let Ok(upstream) = dialer.connect(target, Duration::from_secs(3)) else {
        // Closing the client's connection is the answer: nothing listens there (yet).
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client_reader), Ok(upstream_writer)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let upload = std::thread::spawn(move || copy_then_close(client_reader, upstream_writer));
    copy_then_close(upstream, client);
    let _ = upload.join();
}

/// Copies until end of stream, then half-closes the writer so the peer sees the end too.
fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// `GET path` over HTTP/1.1 to `addr`: the status code, or why there is none.
pub fn http_get_status(
    dialer: &Dialer,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<u16> {
    let mut stream = dialer.connect(addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: meshctl-local-probe\r\nConnection: close\r\n\r\n"
    )?;
    // The status line fits in the first read of any sane server; read a little more if not.
    let mut head = Vec::with_capacity(64);
    let mut buffer = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response from {addr}")))
}
