//! Protocol detection: read the client's first bytes (bounded in size and time), decide what
//! it speaks, and hand on a stream that replays those bytes.
//!
//! Hand-written because the decision is ours (which prefixes mean HTTP/1, HTTP/2 or TLS, and
//! when to give up and treat the stream as opaque); hyper's own sniffing only tells HTTP/1
//! from HTTP/2 and cannot fall back to TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest prefix read while detecting; a request line longer than this is treated as opaque.
const MAX_DETECT_BYTES: usize = 8 * 1024;

/// Longest method an HTTP/1 request line may start with.
const MAX_METHOD_LEN: usize = 16;

/// What a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 preface (prior knowledge, so also gRPC).
    Http2,
    /// A TLS ClientHello record.
    Tls,
    /// Anything else: forwarded byte for byte.
    Opaque,
}

impl Protocol {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1",
            Self::Http2 => "h2",
            Self::Tls => "tls",
            Self::Opaque => "opaque",
        }
    }
}

/// Decides the protocol from a prefix, or `None` when more bytes are needed.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    // HTTP/2 preface, possibly still arriving.
    let common = prefix.len().min(H2_PREFACE.len());
    if prefix[..common] == H2_PREFACE[..common] {
        return if prefix.len() >= H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    // TLS handshake record: content type 22, then protocol version 3.x.
    if prefix[0] == 0x16 {
        return match prefix.get(1) {
            None => None,
            Some(0x03) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    classify_http1(prefix)
}

/// An HTTP/1 request line is `METHOD SP target SP HTTP/1.x CRLF`; the method is an upper-case
/// token. Decide as soon as the bytes so far can no longer be one.
fn classify_http1(prefix: &[u8]) -> Option<Protocol> {
    let method_len = prefix
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
        .count();
    // Methods are short: a longer one is opaque however the bytes arrived.
    if method_len > MAX_METHOD_LEN {
        return Some(Protocol::Opaque);
    }
    if method_len == prefix.len() {
        // Only method characters so far.
        return None;
    }
    if method_len == 0 || prefix[method_len] != b' ' {
        return Some(Protocol::Opaque);
    }
    match prefix.windows(2).position(|w| w == b"\r\n") {
        // The line and its CRLF must fit in what detection reads, or the verdict would hang on
        // whether the CRLF arrived in the same read.
        Some(end) if end + 2 > MAX_DETECT_BYTES => Some(Protocol::Opaque),
        Some(end) => {
            let line = &prefix[..end];
            if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                Some(Protocol::Http1)
            } else {
                Some(Protocol::Opaque)
            }
        }
        None if prefix.len() >= MAX_DETECT_BYTES => Some(Protocol::Opaque),
        None => None,
    }
}

/// Reads from `io` until the protocol is known, the timeout passes (opaque), or the client
/// closes. Returns the protocol and the bytes read, which the caller must replay.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            if let Some(protocol) = classify(&buf) {
                return Ok::<_, io::Error>(protocol);
            }
            if buf.len() >= MAX_DETECT_BYTES {
                return Ok(Protocol::Opaque);
            }
            if io.read_buf(&mut buf).await? == 0 {
                // The client closed before we could tell: nothing to parse, forward as is.
                return Ok(Protocol::Opaque);
            }
        }
    };
    let protocol = match tokio::time::timeout(timeout, read).await {
        Ok(result) => result?,
        Err(_elapsed) => Protocol::Opaque,
    };
    Ok((protocol, buf.freeze()))
}

/// A stream that first yields bytes already read from it (during detection), then reads on.
#[derive(Debug)]
pub struct PrefixedIo<I> {
    prefix: Bytes,
    io: I,
}

impl<I> PrefixedIo<I> {
    /// Wraps `io`, replaying `prefix` first.
    pub fn new(prefix: Bytes, io: I) -> Self {
        Self { prefix, io }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Puts `bytes` back in front of what is still to be read.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            // Dropped, not kept: an empty `Bytes` can still hold a whole buffer.
            return;
        }
        if self.prefix.is_empty() {
            self.prefix = bytes;
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            self.prefix = joined.freeze();
        }
    }

    /// Whether bytes read earlier are still to be replayed.
    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An emptied `Bytes` still holds its allocation (the detection buffer, 1 KiB
                // or more) for as long as the connection lives; let it go now.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_prefixes() {
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"GE", None),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Some(Protocol::Http1)),
            (b"POST /upload HTTP/1.0\r\n", Some(Protocol::Http1)),
            (b"GET /path/still/arriving", None),
            (b"GET / HTTP/2.0\r\n", Some(Protocol::Opaque)),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Protocol::Http2)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
                Some(Protocol::Http2),
            ),
            (&[0x16], None),
            (&[0x16, 0x03, 0x01, 0x02, 0x00], Some(Protocol::Tls)),
            (&[0x16, 0x01], Some(Protocol::Opaque)),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Some(Protocol::Opaque)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Some(Protocol::Opaque)),
            (b"get / HTTP/1.1\r\n", Some(Protocol::Opaque)),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", Some(Protocol::Opaque)),
            (b"HELO mail.example\r\n", Some(Protocol::Opaque)),
        ];
        for (prefix, want) in cases {
            assert_eq!(
                classify(prefix),
                *want,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    /// Found by fuzzing (tests/fuzz): a 17-character method was opaque while the line was
    /// arriving but HTTP/1 once it was complete, so the verdict hung on how the bytes were read.
    #[test]
    fn a_method_too_long_to_wait_for_stays_opaque() {
        let line = b"AAAAAA_A_AAAAA__A  HTTP/1.1\r\n";
        assert_eq!(classify(&line[..17]), Some(Protocol::Opaque));
        assert_eq!(classify(line), Some(Protocol::Opaque));
    }

    /// Found by fuzzing (tests/fuzz): a request line whose CRLF ended just past the 8 KiB
    /// bound was opaque when read in pieces and HTTP/1 when read at once.
    #[test]
    fn a_request_line_past_the_bound_stays_opaque() {
        let line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(8177));
        let line = line.as_bytes();
        assert_eq!(line.len(), MAX_DETECT_BYTES + 1);
        assert_eq!(classify(&line[..MAX_DETECT_BYTES]), Some(Protocol::Opaque));
        assert_eq!(classify(line), Some(Protocol::Opaque));
        let fits = format!("GET /{} HTTP/1.1\r\n", "a".repeat(8176));
        assert_eq!(classify(fits.as_bytes()), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn detection_replays_what_it_read() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (protocol, prefix) = detect(&mut server, Duration::from_secs(5))
            .await
            .expect("detect");
        assert_eq!(protocol, Protocol::Http1);
        let mut replay = PrefixedIo::new(prefix, server);
        drop(client);
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let (protocol, prefix) = detect(&mut server, Duration::from_millis(50))
            .await
            .expect("detect");
        assert_eq!(protocol, Protocol::Opaque);
        assert!(prefix.is_empty());
    }

    #[tokio::test]
    async fn a_bytes_dribbling_request_is_still_http() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            for chunk in [&b"GE"[..], b"T /a", b" HTTP/1.", b"1\r\n"] {
                client.write_all(chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client
        });
        let (protocol, _) = detect(&mut server, Duration::from_secs(5))
            .await
            .expect("detect");
        assert_eq!(protocol, Protocol::Http1);
        writer.await.expect("writer");
    }
}
