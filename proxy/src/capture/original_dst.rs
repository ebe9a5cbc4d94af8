//! The original destination of a captured connection: where the application meant to go
//! before `REDIRECT` sent it to the proxy.

use std::io;
use std::net::{IpAddr, SocketAddr};

/// Recovers the original destination of a redirected connection, from conntrack through
/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6).
///
/// When the connection was not redirected (it was addressed to the listener itself, or
/// conntrack knows nothing of it), the error has kind [`io::ErrorKind::NotFound`]: the caller
/// then treats the connection as addressed to the proxy (e.g. as an HTTP proxy request).
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let socket = socket2::SockRef::from(stream);
    // An IPv4 connection accepted on a dual-stack `[::]` listener has an IPv4-mapped local
    // address, and conntrack tracks it as IPv4.
    let is_ipv4 = local.ip().to_canonical().is_ipv4();
    let original = if is_ipv4 {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let original = match original {
        Ok(address) => address.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the original destination is not an IP socket address",
            )
        })?,
        // ENOENT: conntrack has no entry for this connection (e.g. conntrack is not loaded).
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(not_redirected()),
        Err(error) => return Err(error),
    };
    // Conntrack answers for every tracked connection; one that was not NATed reports the
    // address it actually reached, which is the listener itself.
    if same_address(original, local) {
        return Err(not_redirected());
    }
    Ok(original)
}

fn not_redirected() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        "the connection was not redirected: it has no original destination",
    )
}

fn same_address(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical =
        |address: SocketAddr| -> (IpAddr, u16) { (address.ip().to_canonical(), address.port()) };
    canonical(a) == canonical(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without capture rules, a connection is not redirected: the answer is `NotFound`,
    /// never an address. (The redirected case needs root and a network namespace: see
    /// `integration-tests/tests/capture.rs`.)
    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
                eprintln!("skipping {bind}: this host cannot bind it");
                continue;
            };
            let address = listener
                .local_addr()
                .expect("a bound listener has an address");
            let client = tokio::net::TcpStream::connect(address);
            let (accepted, client) = tokio::join!(listener.accept(), client);
            let (server, _) = accepted.expect("accept");
            let _client = client.expect("connect");
            let error = original_dst(&server).expect_err("not redirected");
            assert_eq!(error.kind(), io::ErrorKind::NotFound, "{bind}: {error}");
        }
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_same_address() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().expect("literal");
        let plain: SocketAddr = "10.0.0.1:80".parse().expect("literal");
        let other_port: SocketAddr = "10.0.0.1:81".parse().expect("literal");
        assert!(same_address(mapped, plain));
        assert!(!same_address(mapped, other_port));
    }
}
