//! Conversions between the wire `SocketAddress` and `std::net::SocketAddr`, needed by every
//! user of the APIs, so they live here once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::common::SocketAddress;

/// A `SocketAddress` from the wire that is not a valid socket address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// The IP is neither 4 nor 16 bytes long.
    IpLength(usize),
    /// The port is 0 or above 65535.
    Port(u32),
}

impl std::fmt::Display for AddressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::IpLength(len) => write!(f, "IP address of {len} bytes (want 4 or 16)"),
            Self::Port(port) => write!(f, "port {port} out of range 1..=65535"),
        }
    }
}

impl std::error::Error for AddressError {}

impl From<SocketAddr> for SocketAddress {
    fn from(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        Self {
            ip,
            port: u32::from(addr.port()),
        }
    }
}

impl TryFrom<&SocketAddress> for SocketAddr {
    type Error = AddressError;

    fn try_from(addr: &SocketAddress) -> Result<Self, Self::Error> {
        let ip = match addr.ip.len() {
            4 => {
                let mut octets = [0u8; 4];
                octets.copy_from_slice(&addr.ip);
                IpAddr::V4(Ipv4Addr::from(octets))
            }
            16 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&addr.ip);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            len => return Err(AddressError::IpLength(len)),
        };
        let port = u16::try_from(addr.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(AddressError::Port(addr.port))?;
        Ok(SocketAddr::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_for_both_families() {
        for text in ["10.1.2.3:8080", "[fd00::1]:443", "127.0.0.1:1"] {
            let addr: SocketAddr = text.parse().expect("test address parses");
            let wire = SocketAddress::from(addr);
            assert_eq!(SocketAddr::try_from(&wire), Ok(addr), "{text}");
        }
    }

    #[test]
    fn malformed_wire_addresses_are_refused_with_the_reason() {
        let short = SocketAddress {
            ip: vec![10, 0, 0],
            port: 80,
        };
        assert_eq!(SocketAddr::try_from(&short), Err(AddressError::IpLength(3)));
        let zero_port = SocketAddress {
            ip: vec![10, 0, 0, 1],
            port: 0,
        };
        assert_eq!(SocketAddr::try_from(&zero_port), Err(AddressError::Port(0)));
        let big_port = SocketAddress {
            ip: vec![10, 0, 0, 1],
            port: 70_000,
        };
        assert_eq!(
            SocketAddr::try_from(&big_port),
            Err(AddressError::Port(70_000))
        );
    }
}
