//! `mesh-proxy await`: waits until this pod's proxy is ready. The injector runs it as the
//! proxy container's postStart hook on clusters without native sidecars: the kubelet starts
//! the application's containers only once the hook returns, so an application never starts
//! before its proxy can carry its traffic (no "connection refused" at start).
//!
//! The proxy's own binary does this so its image needs no shell and no HTTP client. The
//! request is one line of HTTP/1.0 to loopback, written by hand: the whole exchange is a
//! status line.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How often readiness is asked for.
const POLL: Duration = Duration::from_millis(200);

/// Why the proxy was never seen ready.
#[derive(Debug, thiserror::Error)]
#[error("the proxy on 127.0.0.1:{admin_port} was not ready within {timeout:?} (last: {last})")]
pub struct NotReady {
    /// The admin port asked.
    pub admin_port: u16,
    /// How long it was given.
    pub timeout: Duration,
    /// The last answer or error.
    pub last: String,
}

/// Waits until `GET /ready` on the admin port answers 200, for at most `timeout`.
pub fn wait(admin_port: u16, timeout: Duration) -> Result<(), NotReady> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port));
    let deadline = Instant::now() + timeout;
    loop {
        let last = match status_of_ready(addr) {
            Ok(200) => return Ok(()),
            Ok(status) => format!("status {status}"),
            Err(error) => error.to_string(),
        };
        if Instant::now() + POLL > deadline {
            return Err(NotReady {
                admin_port,
                timeout,
                last,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// The status code of one `GET /ready`.
fn status_of_ready(addr: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, POLL)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut head = [0u8; 64];
    let read = stream.read(&mut head)?;
    parse_status(&head[..read]).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the admin port did not answer HTTP",
        )
    })
}

/// The status code of an HTTP/1.x status line: `HTTP/1.1 200 OK`.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut words = line.split(' ');
    words
        .next()
        .filter(|version| version.starts_with("HTTP/1."))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read() {
        let cases: &[(&[u8], Option<u16>)] = &[
            (b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n", Some(200)),
            (b"HTTP/1.0 503 Service Unavailable\r\n", Some(503)),
            (b"HTTP/1.1 20", Some(20)),
            (b"SSH-2.0-OpenSSH\r\n", None),
            (b"", None),
            (b"\xff\xfe", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                parse_status(head),
                *want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn nothing_listening_is_a_clear_timeout() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port");
        let error = wait(port, Duration::from_millis(300)).expect_err("nothing listens");
        let message = error.to_string();
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(message.contains("not ready within 300ms"), "{message}");
    }
}
