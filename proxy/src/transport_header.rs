//! The mesh transport header: the first bytes a client proxy sends on a connection to a peer
//! proxy's inbound port, naming the application port the connection is for.
//!
//! It lets a client reach a meshed pod's proxy directly (the endpoint's `inbound_proxy_port`
//! from discovery), so the server side needs no capture to learn the target port. The format
//! is ours and tiny, so it is hand-written:
//!
//! ```text
//! "MESH" | version u8 = 1 | port u16 BE | flags u8 | name length u16 BE | name (UTF-8)
//! ```
//!
//! Flags: bit 0 = opaque (skip protocol detection); bit 1 = tunnel: the header is for a
//! multicluster gateway and is followed by the address of the proxy to relay to
//! (`family u8 = 4 | 6` and its 4 or 16 bytes), whose inbound port is `port`. The name is the
//! logical authority the client resolved (for metrics); it may be empty.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt};

const MAGIC: &[u8; 4] = b"MESH";
const VERSION: u8 = 1;
const FLAG_OPAQUE: u8 = 0b1;
const FLAG_TUNNEL: u8 = 0b10;
/// Longest name accepted, so a peer cannot make us buffer without bound.
const MAX_NAME_LEN: usize = 1024;

/// What a client proxy tells the server proxy about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportHeader {
    /// The application port on the server's pod.
    pub port: u16,
    /// Forward as opaque TCP without detecting a protocol.
    pub opaque: bool,
    /// The logical authority the client resolved; may be empty.
    pub name: String,
    /// For a gateway: relay the connection to the proxy at this IP and `port`.
    pub tunnel_to: Option<IpAddr>,
}

/// A header that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The connection does not start with the magic bytes.
    #[error("connection does not start with a mesh transport header")]
    NoHeader,
    /// A version this proxy does not know.
    #[error("unsupported mesh transport header version {0}")]
    Version(u8),
    /// The port is 0.
    #[error("mesh transport header names port 0")]
    Port,
    /// The name is too long or not UTF-8.
    #[error("mesh transport header name is invalid: {0}")]
    Name(&'static str),
    /// The tunnel address is of an unknown family.
    #[error("mesh transport header tunnel address family {0} is neither 4 nor 6")]
    Family(u8),
    /// Reading failed.
    #[error("reading the mesh transport header: {0}")]
    Io(#[from] io::Error),
}

impl TransportHeader {
    /// The header's bytes. A name longer than the bound is cut at a character boundary, so
    /// the peer can still read it as text.
    pub fn encode(&self) -> Vec<u8> {
        let mut name_len = self.name.len().min(MAX_NAME_LEN);
        while !self.name.is_char_boundary(name_len) {
            name_len -= 1;
        }
        let name = &self.name.as_bytes()[..name_len];
        let mut out = Vec::with_capacity(27 + name.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.port.to_be_bytes());
        let mut flags = if self.opaque { FLAG_OPAQUE } else { 0 };
        if self.tunnel_to.is_some() {
            flags |= FLAG_TUNNEL;
        }
        out.push(flags);
        // The slice above is at most MAX_NAME_LEN (1024) bytes, so it fits in a u16.
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        match self.tunnel_to {
            Some(IpAddr::V4(ip)) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            Some(IpAddr::V6(ip)) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
            None => {}
        }
        out
    }

    /// Reads a header from the start of a connection; reads nothing beyond it.
    pub async fn read<I: AsyncRead + Unpin>(io: &mut I) -> Result<Self, HeaderError> {
        let mut fixed = [0u8; 10];
        io.read_exact(&mut fixed).await?;
        if &fixed[..4] != MAGIC {
            return Err(HeaderError::NoHeader);
        }
        if fixed[4] != VERSION {
            return Err(HeaderError::Version(fixed[4]));
        }
        let port = u16::from_be_bytes([fixed[5], fixed[6]]);
        if port == 0 {
            return Err(HeaderError::Port);
        }
        let opaque = fixed[7] & FLAG_OPAQUE != 0;
        let name_len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        if name_len > MAX_NAME_LEN {
            return Err(HeaderError::Name("longer than 1024 bytes"));
        }
        let mut name = vec![0u8; name_len];
        io.read_exact(&mut name).await?;
        let name = String::from_utf8(name).map_err(|_| HeaderError::Name("not UTF-8"))?;
        let tunnel_to = if fixed[7] & FLAG_TUNNEL != 0 {
            Some(match io.read_u8().await? {
                4 => {
                    let mut octets = [0u8; 4];
                    io.read_exact(&mut octets).await?;
                    IpAddr::V4(Ipv4Addr::from(octets))
                }
                6 => {
                    let mut octets = [0u8; 16];
                    io.read_exact(&mut octets).await?;
                    IpAddr::V6(Ipv6Addr::from(octets))
                }
                family => return Err(HeaderError::Family(family)),
            })
        } else {
            None
        };
        Ok(Self {
            port,
            opaque,
            name,
            tunnel_to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_reads_nothing_more() {
        let header = TransportHeader {
            port: 8080,
            opaque: true,
            name: "books.shop.svc.cluster.local:8080".into(),
            tunnel_to: None,
        };
        let tunnels = [
            None,
            Some(IpAddr::from([10, 1, 0, 3])),
            Some(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 3])),
        ];
        for tunnel_to in tunnels {
            let header = TransportHeader {
                tunnel_to,
                ..header.clone()
            };
            let mut bytes = header.encode();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut reader = bytes.as_slice();
            let read = TransportHeader::read(&mut reader).await.expect("valid");
            assert_eq!(read, header);
            assert_eq!(reader, b"GET / HTTP/1.1\r\n");
        }
    }

    /// Found by fuzzing (tests/fuzz): a name past 1024 bytes was cut inside a character, so
    /// the peer refused the header as "not UTF-8".
    #[tokio::test]
    async fn a_long_name_is_cut_at_a_character_boundary() {
        let header = TransportHeader {
            port: 1,
            opaque: false,
            name: "\u{800}".repeat(1000),
            tunnel_to: None,
        };
        let bytes = header.encode();
        let read = TransportHeader::read(&mut bytes.as_slice())
            .await
            .expect("readable");
        assert_eq!(read.name, "\u{800}".repeat(341));
    }

    #[tokio::test]
    async fn refuses_malformed_headers() {
        let good = TransportHeader {
            port: 80,
            opaque: false,
            name: String::new(),
            tunnel_to: None,
        }
        .encode();
        let mut wrong_magic = good.clone();
        wrong_magic[0] = b'X';
        let mut wrong_version = good.clone();
        wrong_version[4] = 9;
        let mut zero_port = good.clone();
        zero_port[5] = 0;
        zero_port[6] = 0;
        let mut long_name = good.clone();
        long_name[8] = 0xff;
        let truncated = good[..6].to_vec();
        let mut bad_family = good.clone();
        bad_family[7] = FLAG_TUNNEL;
        bad_family.push(5);
        let mut short_tunnel = good.clone();
        short_tunnel[7] = FLAG_TUNNEL;
        short_tunnel.extend_from_slice(&[4, 10, 1]);
        for (bytes, want) in [
            (wrong_magic, "does not start"),
            (wrong_version, "version 9"),
            (zero_port, "port 0"),
            (long_name, "longer than"),
            (truncated, "reading"),
            (bad_family, "family 5"),
            (short_tunnel, "reading"),
        ] {
            let error = TransportHeader::read(&mut bytes.as_slice())
                .await
                .expect_err(want);
            assert!(error.to_string().contains(want), "{error}");
        }
    }
}
