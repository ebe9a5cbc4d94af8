//! Protocol detection (`detect.rs`) and the mesh transport header (`transport_header.rs`): the
//! first bytes any peer sends the proxy.

use std::time::Duration;

use mesh_proxy::detect::{self, PrefixedIo, Protocol};
use mesh_proxy::transport_header::TransportHeader;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runner::fuzz;

/// Detection gives up on a request line at this length (detect.rs's `MAX_DETECT_BYTES`).
const MAX_DETECT_BYTES: usize = 8 * 1024;
/// The longest method detection waits for.
const MAX_METHOD_LEN: usize = 16;

/// Bytes a client might send first: noise, or something shaped like a request line (of any
/// length, around the bounds detection applies), the HTTP/2 preface or a TLS record, cut or
/// followed by noise.
fn first_bytes() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET".to_owned()),
        Just("PRI".to_owned()),
        "[A-Z_-]{0,20}",
        "[A-Za-z]{1,4}",
    ];
    let target = prop_oneof![
        "[!-~]{0,40}",
        (0..10_000usize).prop_map(|n| "/".to_owned() + &"a".repeat(n)),
    ];
    let version = prop_oneof![
        Just(" HTTP/1.1"),
        Just(" HTTP/1.0"),
        Just(" HTTP/2.0"),
        Just(""),
    ];
    let end = prop_oneof![Just("\r\n"), Just("\n"), Just("")];
    let request_line = (method, target, version, end, vec(any::<u8>(), 0..16)).prop_map(
        |(method, target, version, end, tail)| {
            let mut bytes = format!("{method} {target}{version}{end}").into_bytes();
            bytes.extend(tail);
            bytes
        },
    );
    let preface = (0..=24usize, vec(any::<u8>(), 0..8)).prop_map(|(len, tail)| {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..len].to_vec();
        bytes.extend(tail);
        bytes
    });
    let tls = vec(any::<u8>(), 0..8).prop_map(|tail| {
        let mut bytes = vec![0x16];
        bytes.extend(tail);
        bytes
    });
    prop_oneof![vec(any::<u8>(), 0..64), request_line, preface, tls]
}

/// `classify` decides from any prefix without panicking, and a decision stands: more bytes
/// never change it (only `None`, "need more", may become anything). Checked at random cut
/// points and at the bounds detection applies.
#[test]
fn classification_never_changes_once_made() {
    fuzz(
        (first_bytes(), vec(any::<Index>(), 0..8)),
        |(bytes, cuts)| {
            let whole = detect::classify(&bytes);
            let bounds = [MAX_METHOD_LEN, MAX_METHOD_LEN + 1, MAX_DETECT_BYTES];
            let cuts = cuts
                .iter()
                .map(|cut| cut.index(bytes.len() + 1))
                .chain(bounds.into_iter().filter(|cut| *cut <= bytes.len()));
            for cut in cuts {
                if let Some(early) = detect::classify(&bytes[..cut]) {
                    prop_assert_eq!(
                        Some(early),
                        whole,
                        "{} bytes said {:?}, all {} bytes say {:?}",
                        cut,
                        early,
                        bytes.len(),
                        whole
                    );
                }
            }
            Ok(())
        },
    );
}

/// `detect` over a connection that dribbles its bytes in arbitrary chunks returns a prefix of
/// what was written, whose classification is the protocol it reports; replaying that prefix
/// before the rest of the stream gives exactly the bytes written.
#[test]
fn detection_replays_exactly_what_was_written() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let chunks = vec(1..64usize, 1..16);
    fuzz(
        (first_bytes(), chunks, 1..4096usize),
        |(bytes, chunks, capacity)| {
            let (protocol, prefix, replayed) = runtime.block_on(async {
                let (mut client, mut server) = tokio::io::duplex(capacity);
                let written = bytes.clone();
                let writer = tokio::spawn(async move {
                    let mut rest = &written[..];
                    for size in chunks.iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let (chunk, after) = rest.split_at((*size).min(rest.len()));
                        client.write_all(chunk).await.expect("write");
                        tokio::task::yield_now().await;
                        rest = after;
                    }
                    // Dropping the client closes the stream: detection must not wait for more.
                });
                let (protocol, prefix) = detect::detect(&mut server, Duration::from_secs(30))
                    .await
                    .expect("detect");
                let mut replayed = Vec::new();
                PrefixedIo::new(prefix.clone(), server)
                    .read_to_end(&mut replayed)
                    .await
                    .expect("replay");
                writer.await.expect("writer");
                (protocol, prefix, replayed)
            });
            prop_assert!(bytes.starts_with(&prefix));
            prop_assert_eq!(
                protocol,
                detect::classify(&prefix).unwrap_or(Protocol::Opaque)
            );
            prop_assert_eq!(replayed, bytes);
            Ok(())
        },
    );
}

/// The header's fields before the name: magic, version, port, flags, name length.
const FIXED_LEN: usize = 10;

/// Bytes at the start of an inbound connection: noise, or a header (valid or with one field
/// changed, its name possibly cut short) followed by the application's bytes.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let header = (
        prop_oneof![Just(*b"MESH"), any::<[u8; 4]>()],
        prop_oneof![Just(1u8), any::<u8>()],
        any::<u16>(),
        any::<u8>(),
        prop_oneof![0..64u16, 1000..1100u16, any::<u16>()],
        vec(any::<u8>(), 0..1100),
        vec(any::<u8>(), 0..32),
    )
        .prop_map(|(magic, version, port, flags, len, name, rest)| {
            let mut bytes = magic.to_vec();
            bytes.push(version);
            bytes.extend(port.to_be_bytes());
            bytes.push(flags);
            bytes.extend(len.to_be_bytes());
            bytes.extend(name);
            bytes.extend(rest);
            bytes
        });
    prop_oneof![vec(any::<u8>(), 0..32), header]
}

/// `TransportHeader::read` on any bytes returns a header or an error without panicking, and
/// never reads past the header: what follows stays in the stream for the application.
#[test]
fn reading_a_header_never_reads_past_it() {
    fuzz(header_bytes(), |bytes| {
        let mut reader = &bytes[..];
        let read = futures::executor::block_on(TransportHeader::read(&mut reader));
        let consumed = bytes.len() - reader.len();
        match read {
            Ok(header) => {
                prop_assert_ne!(header.port, 0);
                prop_assert!(header.name.len() <= 1024);
                // A tunnel header adds its address: a family byte and 4 or 16 bytes.
                let tunnel = match header.tunnel_to {
                    None => 0,
                    Some(std::net::IpAddr::V4(_)) => 5,
                    Some(std::net::IpAddr::V6(_)) => 17,
                };
                prop_assert_eq!(consumed, FIXED_LEN + header.name.len() + tunnel);
            }
            Err(_) => {
                let declared = bytes
                    .get(8..FIXED_LEN)
                    .map_or(0, |len| usize::from(u16::from_be_bytes([len[0], len[1]])));
                prop_assert!(
                    consumed <= FIXED_LEN + declared.min(1024) + 17,
                    "read {} bytes of a header declaring a {}-byte name",
                    consumed,
                    declared
                );
            }
        }
        Ok(())
    });
}

/// A header's name: mostly short authorities, sometimes long or non-ASCII text up to and past
/// the 1024-byte bound.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.-]{0,64}(:[0-9]{1,5})?",
        ".{0,300}",
        (1000..1100usize, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
}

/// Whatever `encode` writes, `read` reads back: the same header for a port other than 0 and a
/// name of at most 1024 bytes; for a longer name, the name cut to fit (still text).
#[test]
fn headers_round_trip() {
    fuzz(
        (
            1..=u16::MAX,
            any::<bool>(),
            header_name(),
            proptest::option::of(any::<std::net::IpAddr>()),
            vec(any::<u8>(), 0..16),
        ),
        |(port, opaque, name, tunnel_to, rest)| {
            let header = TransportHeader {
                port,
                opaque,
                name,
                tunnel_to,
            };
            let mut bytes = header.encode();
            bytes.extend_from_slice(&rest);
            let mut reader = &bytes[..];
            let read = futures::executor::block_on(TransportHeader::read(&mut reader));
            let read = read.map_err(|error| TestCaseError::fail(error.to_string()))?;
            prop_assert_eq!(reader, &rest[..]);
            prop_assert_eq!(read.port, header.port);
            prop_assert_eq!(read.opaque, header.opaque);
            prop_assert_eq!(read.tunnel_to, header.tunnel_to);
            if header.name.len() <= 1024 {
                prop_assert_eq!(read.name, header.name);
            } else {
                prop_assert!(header.name.starts_with(&read.name));
                prop_assert!(read.name.len() > 1024 - 4);
            }
            Ok(())
        },
    );
}
