//! An HTTP/2 connection's writes gathered into one write per poll of its task.
//!
//! `h2` flushes its socket before it queues each DATA frame of more than 256 bytes (it keeps
//! the payload aside to write it without a copy). A connection carrying many requests'
//! responses at once therefore made one `writev`, one TLS record and one wake-up of the peer per
//! response: on the bench's server proxy at 64 connections, 1.0 `writev` per request on the
//! connection to the client proxy.
//!
//! [`split`] wraps the connection's I/O ([`CoalescedWrites`], handed to `h2`) and returns a
//! [`Sender`] for the task that polls the connection. While [`Sender::after_each_poll`] polls
//! the connection, flushes only hold what `h2` wrote; when that poll returns, what was held goes
//! out in one write. Everything a poll produced is sent before the task sleeps, so nothing waits
//! for a timer or another poll, and a lone request costs the same write as before.
//!
//! Hand-written: tokio's `BufWriter` writes on every flush, and no crate defers a flush to the
//! end of its task's poll.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most held before a write goes out at once: a bulk transfer still moves in large writes,
/// and the memory a connection holds stays bounded.
const MAX_HELD: usize = 64 * 1024;

/// Wraps `io`: the I/O for `h2`, and the sender for the task that polls the connection.
///
/// Both halves share the socket, since `h2` owns its I/O and the sender writes after `h2`'s
/// poll returns. The lock is never contended: one task uses both halves, one after the other
/// (a `RefCell` would do, but the connection's task must be `Send`).
pub fn split<T>(io: T) -> (CoalescedWrites<T>, Sender<T>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        held: Vec::new(),
        sent: 0,
        in_poll: false,
        error: None,
    }));
    (CoalescedWrites(shared.clone()), Sender(shared))
}

/// The I/O to hand to `h2`; see the module documentation.
#[derive(Debug)]
pub struct CoalescedWrites<T>(Arc<Mutex<Shared<T>>>);

/// Sends what the connection's I/O held, once each poll of the connection returns.
#[derive(Debug)]
pub struct Sender<T>(Arc<Mutex<Shared<T>>>);

#[derive(Debug)]
struct Shared<T> {
    io: T,
    /// Written by the connection and not yet sent; released once sent, so an idle connection
    /// holds nothing.
    held: Vec<u8>,
    /// How much of `held` the socket already took.
    sent: usize,
    /// Whether [`Sender::after_each_poll`] is polling the connection: only then are flushes held.
    in_poll: bool,
    /// A failed send after a poll, for the connection to learn at its next write or flush.
    error: Option<io::Error>,
}

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    // Every holder only moves bytes: a panic cannot leave the state half-changed.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<T: AsyncWrite + Unpin> Shared<T> {
    /// Sends everything held, then flushes the I/O (TLS may keep records back).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(error) = self.error.take() {
            return Poll::Ready(Err(error));
        }
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if !self.held.is_empty() {
            self.held = Vec::new();
            self.sent = 0;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Makes room for `len` more bytes: sends what is held when they would not fit.
    fn poll_room_for(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if let Some(error) = self.error.take() {
            return Poll::Ready(Err(error));
        }
        if self.held.len() + len > MAX_HELD {
            ready!(self.poll_send(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.0);
        ready!(shared.poll_room_for(cx, buf.len()))?;
        if buf.len() >= MAX_HELD {
            // Nothing is held now (room was made); a write this large needs no company.
            return Pin::new(&mut shared.io).poll_write(cx, buf);
        }
        shared.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.0);
        let len = bufs.iter().map(|buf| buf.len()).sum::<usize>();
        ready!(shared.poll_room_for(cx, len))?;
        if len >= MAX_HELD {
            return Pin::new(&mut shared.io).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            shared.held.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    /// Vectored writes are taken whole, so `h2` need not copy payloads into its own buffer.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        if shared.in_poll {
            // Sent when the poll returns, with whatever the rest of the poll adds.
            return match shared.error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Ready(Ok(())),
            };
        }
        shared.poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        ready!(shared.poll_send(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

impl<T: AsyncWrite + Unpin> Sender<T> {
    /// Polls `connection`, and after each poll sends what it wrote.
    pub fn after_each_poll<F: Future + Unpin>(&self, connection: F) -> AfterEachPoll<'_, F, T> {
        AfterEachPoll {
            connection,
            sender: self,
        }
    }
}

/// The future of [`Sender::after_each_poll`].
#[derive(Debug)]
pub struct AfterEachPoll<'a, F, T> {
    connection: F,
    sender: &'a Sender<T>,
}

impl<F: Future + Unpin, T: AsyncWrite + Unpin> Future for AfterEachPoll<'_, F, T> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        lock(&self.sender.0).in_poll = true;
        let output = Pin::new(&mut self.connection).poll(cx);
        let mut shared = lock(&self.sender.0);
        shared.in_poll = false;
        // A socket that cannot take it all now wakes this task when it can; an error reaches
        // the connection at its next write.
        if let Poll::Ready(Err(error)) = shared.poll_send(cx) {
            shared.error = Some(error);
        }
        output
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// A socket that records each write it takes, taking at most `max_write` bytes at once,
    /// or nothing while `stalled` (a peer that stopped reading).
    #[derive(Debug, Default)]
    struct RecordingIo {
        writes: Vec<Vec<u8>>,
        max_write: Option<usize>,
        stalled: bool,
        shut_down: bool,
    }

    impl AsyncWrite for RecordingIo {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.stalled {
                return Poll::Pending;
            }
            let n = self.max_write.map_or(buf.len(), |max| buf.len().min(max));
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut_down = true;
            Poll::Ready(Ok(()))
        }
    }

    fn recorded(sender: &Sender<RecordingIo>) -> Vec<Vec<u8>> {
        lock(&sender.0).io.writes.clone()
    }

    /// What a connection does in one poll: writes and flushes each of `frames`.
    async fn write_and_flush_each(io: &mut CoalescedWrites<RecordingIo>, frames: &[&[u8]]) {
        for frame in frames {
            poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, frame))
                .await
                .expect("write");
            poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx))
                .await
                .expect("flush");
        }
    }

    #[tokio::test]
    async fn what_one_poll_flushes_goes_out_in_one_write_when_it_returns() {
        let (mut io, sender) = split(RecordingIo::default());
        let mut frames = Some([&b"HEADERS 1 "[..], b"DATA 1 ", b"HEADERS 2 ", b"DATA 2"]);
        let poll = sender.after_each_poll(poll_fn(|cx| {
            if let Some(frames) = frames.take() {
                let mut one_poll = std::pin::pin!(write_and_flush_each(&mut io, &frames));
                assert!(one_poll.as_mut().poll(cx).is_ready());
            }
            assert!(
                recorded(&sender).is_empty(),
                "nothing is sent during the poll"
            );
            Poll::Ready(())
        }));
        poll.await;
        assert_eq!(
            recorded(&sender),
            vec![b"HEADERS 1 DATA 1 HEADERS 2 DATA 2".to_vec()]
        );
        assert_eq!(
            lock(&sender.0).held.capacity(),
            0,
            "an idle connection holds no buffer"
        );
    }

    #[tokio::test]
    async fn outside_the_connections_poll_a_flush_sends_at_once() {
        // A handshake writes before the connection's task polls it.
        let (mut io, sender) = split(RecordingIo::default());
        write_and_flush_each(&mut io, &[b"PRI * HTTP/2.0", b"SETTINGS"]).await;
        assert_eq!(
            recorded(&sender),
            vec![b"PRI * HTTP/2.0".to_vec(), b"SETTINGS".to_vec()]
        );
    }

    #[tokio::test]
    async fn a_partial_write_is_resumed_where_it_stopped() {
        let (mut io, sender) = split(RecordingIo {
            max_write: Some(4),
            ..RecordingIo::default()
        });
        write_and_flush_each(&mut io, &[b"0123456789"]).await;
        assert_eq!(recorded(&sender).concat(), b"0123456789");
        assert_eq!(recorded(&sender).len(), 3);
    }

    #[tokio::test]
    async fn what_would_pass_the_bound_sends_what_is_held_first() {
        let (mut io, sender) = split(RecordingIo::default());
        lock(&sender.0).in_poll = true;
        let most = vec![1u8; MAX_HELD - 10];
        write_and_flush_each(&mut io, &[&most, &[2u8; 20]]).await;
        assert_eq!(
            recorded(&sender),
            vec![most],
            "the held bytes went first, alone"
        );
        assert_eq!(lock(&sender.0).held, vec![2u8; 20]);

        let bulk = vec![3u8; MAX_HELD];
        write_and_flush_each(&mut io, &[&bulk]).await;
        let writes = recorded(&sender);
        assert_eq!(writes.len(), 3, "held bytes, then the bulk write directly");
        assert_eq!(writes[1], vec![2u8; 20]);
        assert_eq!(writes[2], bulk);
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_holds_the_connection_to_the_bound() {
        let (mut io, sender) = split(RecordingIo {
            stalled: true,
            ..RecordingIo::default()
        });
        lock(&sender.0).in_poll = true;
        let frame = [0u8; 1000];
        let mut taken = 0;
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(written) = Pin::new(&mut io).poll_write(&mut cx, &frame) {
            taken += written.expect("write");
            assert!(taken <= MAX_HELD, "held past the bound");
        }
        assert_eq!(taken, MAX_HELD / frame.len() * frame.len());
        assert!(recorded(&sender).is_empty());
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_held_before_closing() {
        let (mut io, sender) = split(RecordingIo::default());
        lock(&sender.0).in_poll = true;
        write_and_flush_each(&mut io, &[b"GOAWAY"]).await;
        assert!(recorded(&sender).is_empty());
        poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx))
            .await
            .expect("shutdown");
        assert_eq!(recorded(&sender), vec![b"GOAWAY".to_vec()]);
        assert!(lock(&sender.0).io.shut_down);
    }
}
