//! One multiplexed HTTP/2 connection per destination, on the `h2` crate.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tracing::debug;

use super::{Connector, Counted, POOL_IDLE_TIMEOUT, SendError};
use crate::coalesce;
use crate::http::ReqBody;

/// hyper's client defaults, which this client replaced: windows large enough that flow
/// control does not throttle one stream on a fast link, and a bound on what a stream may
/// buffer while its peer's window is closed.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams opened before the peer's SETTINGS say how many it allows.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// One multiplexed HTTP/2 connection to one destination, made on first use and again once it
/// closes; every request to the destination shares it.
///
/// Hand-written on `h2` rather than hyper's client, because hyper's client costs more per
/// request than it gives a proxy: each request crosses a channel to the connection's task,
/// which spawns one more task to await the response and hands it back over a oneshot (about
/// a tenth of the client proxy's instructions per request, callgrind). Here the request's
/// own task opens the stream and awaits its response; only a request with a body to stream
/// gets a task, to send it.
///
/// It lets a connection go once it has sent nothing for [`POOL_IDLE_TIMEOUT`]: `h2` closes it
/// when its last handle drops and its streams are done.
#[derive(Debug)]
pub struct Http2Connection {
    connector: Connector,
    /// Shared with the connection's task, which clears it when the connection idles or ends.
    current: Arc<ArcSwapOption<SendRequest<Bytes>>>,
    /// Requests sent, read by the idle check.
    sent: Arc<AtomicU64>,
    /// Requests waiting for their response headers.
    waiting: AtomicUsize,
    /// One handshake at a time: requests that find no open connection wait for it.
    connecting: tokio::sync::Mutex<()>,
}

impl Http2Connection {
    pub(super) fn new(connector: Connector) -> Self {
        Self {
            connector,
            current: Arc::new(ArcSwapOption::empty()),
            sent: Arc::new(AtomicU64::new(0)),
            waiting: AtomicUsize::new(0),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends `request`; when the connection turns out closed before the request went out, once
    /// more on a new one.
    pub async fn send(&self, request: Request<ReqBody>) -> Result<Response<Http2Body>, SendError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let _waiting = Counted::new(&self.waiting);
        // Connecting is rare and its future large (the handshake holds a whole `h2`
        // connection): boxed, so it does not grow every request's future by 5 KiB.
        let sender = match self.current.load_full() {
            Some(sender) => sender,
            None => Box::pin(self.connect(None)).await?,
        };
        // Waits while the peer's limit of concurrent streams is reached.
        let mut sender = match SendRequest::clone(&sender).ready().await {
            Ok(ready) => ready,
            Err(error) => {
                debug!(%error, "the HTTP/2 connection closed; reconnecting");
                let fresh = Box::pin(self.connect(Some(&sender))).await?;
                SendRequest::clone(&fresh)
                    .ready()
                    .await
                    .map_err(SendError::Http2)?
            }
        };
        let (parts, body) = request.into_parts();
        let end_of_stream = body.is_end_stream();
        let (response, stream) = sender
            .send_request(Request::from_parts(parts, ()), end_of_stream)
            .map_err(SendError::Http2)?;
        let upload = (!end_of_stream).then(|| spawn_upload(body, stream));
        let response = response.await.map_err(SendError::Http2)?;
        let length = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse().ok());
        Ok(response.map(|recv| Http2Body::new(recv, length, upload)))
    }

    /// Requests waiting for their response headers on this connection.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Opens the connection unless another request just did; `closed` is the handle a request
    /// found closed, replaced even if the connection's task has not cleared it yet.
    async fn connect(
        &self,
        closed: Option<&Arc<SendRequest<Bytes>>>,
    ) -> Result<Arc<SendRequest<Bytes>>, SendError> {
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(current) = self.current.load_full()
            && closed.is_none_or(|closed| !Arc::ptr_eq(closed, &current))
        {
            return Ok(current);
        }
        let (io, writes) = coalesce::split(self.connector.open().await?);
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|error| SendError::Connect(std::io::Error::other(error)))?;
        let handle = Arc::new(sender);
        self.current.store(Some(handle.clone()));
        let watch = ConnectionWatch {
            current: Arc::downgrade(&self.current),
            handle: Arc::downgrade(&handle),
            sent: self.sent.clone(),
        };
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = writes.after_each_poll(connection.as_mut()) => log_http2_end(result),
                () = watch.until_idle() => log_http2_end(writes.after_each_poll(connection).await),
            }
            // Idle or ended: no new request may pick it.
            watch.forget();
        });
        Ok(handle)
    }
}

fn log_http2_end(result: Result<(), h2::Error>) {
    if let Err(error) = result {
        debug!(%error, "HTTP/2 client connection ended with an error");
    }
}

/// Clears an [`Http2Connection`]'s handle once its connection has sent nothing for a whole
/// [`POOL_IDLE_TIMEOUT`], or has ended.
struct ConnectionWatch {
    current: std::sync::Weak<ArcSwapOption<SendRequest<Bytes>>>,
    /// This connection's handle in `current`, so a newer connection's is left alone.
    handle: std::sync::Weak<SendRequest<Bytes>>,
    sent: Arc<AtomicU64>,
}

impl ConnectionWatch {
    /// Returns once the connection was idle, its handle dropped.
    async fn until_idle(&self) {
        let mut seen = self.sent.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(POOL_IDLE_TIMEOUT).await;
            let now = self.sent.load(Ordering::Relaxed);
            if now == seen {
                break;
            }
            seen = now;
        }
        self.forget();
    }

    fn forget(&self) {
        if let (Some(current), Some(handle)) = (self.current.upgrade(), self.handle.upgrade()) {
            current.compare_and_swap(&Some(handle), None);
        }
    }
}

/// Streams a request's body on its own task, while the request's task awaits the response.
/// Dropping the returned sender (with the response, or the response body) stops it, and `h2`
/// resets the stream.
fn spawn_upload<B>(body: B, stream: SendStream<Bytes>) -> oneshot::Sender<()>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            result = upload(body, stream) => {
                if let Err(error) = result {
                    debug!(%error, "the request body was not sent whole");
                }
            }
            _ = stopped => {}
        }
    });
    stop
}

/// Sends `body` on `stream` as the peer's flow control allows.
///
/// It claims stream capacity only with a chunk in hand, one byte at a time, as hyper does: a
/// claim made before the body has data would pin connection window that other streams need.
async fn upload<B>(mut body: B, mut stream: SendStream<Bytes>) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        let frame = tokio::select! {
            biased;
            reset = poll_fn(|cx| stream.poll_reset(cx)) => {
                return Err(format!("the peer reset the stream: {:?}", reset?).into());
            }
            frame = body.frame() => frame,
        };
        let frame = match frame {
            None => return Ok(stream.send_data(Bytes::new(), true)?),
            Some(Err(error)) => {
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return Err(error.into());
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end_of_stream = body.is_end_stream();
                if !data.is_empty() {
                    stream.reserve_capacity(1);
                    while stream.capacity() == 0 {
                        match poll_fn(|cx| stream.poll_capacity(cx)).await {
                            Some(result) => {
                                result?;
                            }
                            None => return Err("the stream closed while sending its body".into()),
                        }
                    }
                }
                stream.send_data(data, end_of_stream)?;
                if end_of_stream {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    return Ok(stream.send_trailers(trailers)?);
                }
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a response that came over HTTP/2: its data as it arrives, then its trailers.
/// Received data is handed back to the connection's flow control as it is read, so the peer
/// sends only as fast as the proxy's own client reads.
#[derive(Debug)]
pub struct Http2Body {
    recv: RecvStream,
    data_done: bool,
    /// The response's content-length less the data read, when it declared one.
    remaining: Option<u64>,
    /// Held while the request's body may still be uploading: dropped, it stops the upload.
    _upload: Option<oneshot::Sender<()>>,
}

impl Http2Body {
    /// `length` is what the response's headers declared, for the size hint (`h2` checks the
    /// data against it).
    fn new(recv: RecvStream, length: Option<u64>, upload: Option<oneshot::Sender<()>>) -> Self {
        Self {
            data_done: false,
            // A response to HEAD declares the length of a body it does not carry.
            remaining: if recv.is_end_stream() {
                Some(0)
            } else {
                length
            },
            recv,
            _upload: upload,
        }
    }
}

impl Body for Http2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Only fails once the stream is gone, which the next read reports.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut self.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use bytes::Bytes;
    use hyper_util::rt::TokioIo;

    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use hyper_util::rt::TokioExecutor;

    use super::*;
    use crate::client::{HttpClients, test_server};

    /// An HTTP/2 server that closes each connection after its first response, saying so on
    /// `closed`.
    async fn one_request_per_connection() -> (SocketAddr, Arc<AtomicUsize>, mpsc::Receiver<()>) {
        let (closed_tx, closed) = mpsc::channel(8);
        let (addr, accepted) = test_server::counting(move |stream, n| {
            let closed_tx = closed_tx.clone();
            async move {
                let (answered_tx, mut answered) = mpsc::channel::<()>(1);
                let service = hyper::service::service_fn(move |_request| {
                    let answered_tx = answered_tx.clone();
                    async move {
                        let _ = answered_tx.try_send(());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            format!("connection {n}"),
                        ))))
                    }
                });
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = answered.recv() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
                let _ = closed_tx.send(()).await;
            }
        })
        .await;
        (addr, accepted, closed)
    }

    fn request() -> Request<ReqBody> {
        Request::builder()
            .version(http::Version::HTTP_2)
            .uri("http://books.shop:8080/")
            .body(http_body_util::Either::Right(Full::new(Bytes::new())))
            .expect("request")
    }

    /// An HTTP/2 server answering every request after `delay`; counts its connections.
    async fn answering_after(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        test_server::counting(move |stream, _| async move {
            let service = hyper::service::service_fn(move |_request| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await
    }

    #[tokio::test]
    async fn while_a_request_waits_on_http2_the_next_ones_join_it() {
        let (addr, _) = answering_after(Duration::from_millis(300)).await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        assert!(clients.peer_http1_is_free(), "nothing in flight");
        let mut waiting = Box::pin(clients.send(request()));
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "the request waits for its answer"
        );
        assert!(!clients.peer_http1_is_free(), "one request waits on HTTP/2");
        waiting.await.expect("a response");
        assert!(clients.peer_http1_is_free(), "its answer came");
    }

    #[tokio::test]
    async fn an_http2_connection_is_made_again_once_the_peer_closed_it() {
        let (addr, accepted, mut closed) = one_request_per_connection().await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        for expected in 1..=3 {
            let response = clients.send(request()).await.expect("a response");
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(body, format!("connection {expected}"));
            tokio::time::timeout(Duration::from_secs(5), closed.recv())
                .await
                .expect("the server closes the connection");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_http2_connection() {
        let (addr, accepted) = answering_after(Duration::from_millis(20)).await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        let sent = (0..20).map(|_| clients.send(request()));
        for response in futures::future::join_all(sent).await {
            assert_eq!(response.expect("a response").status(), http::StatusCode::OK);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// An HTTP/2 server answering each request with its own body, then trailers.
    async fn echo_server() -> SocketAddr {
        let (addr, _) = test_server::counting(|stream, _| async move {
            let service =
                hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let frames = futures::stream::iter([
                        Ok::<_, std::convert::Infallible>(Frame::data(body)),
                        Ok(Frame::trailers(trailers)),
                    ]);
                    Ok::<_, hyper::Error>(Response::new(http_body_util::StreamBody::new(frames)))
                });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await;
        addr
    }

    #[tokio::test]
    async fn bodies_larger_than_every_window_go_both_ways_with_trailers() {
        let addr = echo_server().await;
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        // Past the server's stream window (1 MiB) and ours (2 MiB): both sides must hand
        // capacity back as they read, or the exchange stalls.
        let sent: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let mut request = request();
        *request.method_mut() = http::Method::POST;
        *request.body_mut() = http_body_util::Either::Right(Full::new(Bytes::from(sent.clone())));
        let response = tokio::time::timeout(Duration::from_secs(10), async {
            let response = clients.send(request).await.expect("a response");
            response
                .into_body()
                .collect()
                .await
                .expect("the whole body")
        })
        .await
        .expect("the exchange does not stall");
        let trailers = response.trailers().cloned().expect("trailers");
        assert_eq!(response.to_bytes(), Bytes::from(sent));
        assert_eq!(trailers.get("grpc-status").expect("grpc-status"), "0");
    }

    /// Opens a POST stream to `addr` whose body the test sends itself; the clients hold the
    /// connection open.
    async fn open_post(
        addr: SocketAddr,
    ) -> (HttpClients, h2::client::ResponseFuture, SendStream<Bytes>) {
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        let sender = clients.http2().connect(None).await.expect("connected");
        let mut sender = SendRequest::clone(&sender).ready().await.expect("ready");
        let request = Request::post("http://books.shop:8080/")
            .body(())
            .expect("request");
        let (response, stream) = sender.send_request(request, false).expect("sent");
        (clients, response, stream)
    }

    #[tokio::test]
    async fn request_trailers_follow_the_body() {
        let (addr, _) = test_server::counting(|stream, _| async move {
            let service =
                hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let whole = request.into_body().collect().await?;
                    let trailer = whole
                        .trailers()
                        .and_then(|trailers| trailers.get("checksum"))
                        .cloned();
                    let answer = format!("{} bytes, checksum {trailer:?}", whole.to_bytes().len());
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(answer))))
                });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await;
        let (_clients, response, stream) = open_post(addr).await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("checksum", http::HeaderValue::from_static("abc"));
        let frames = futures::stream::iter([
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let _upload = spawn_upload(http_body_util::StreamBody::new(frames), stream);
        let response = response.await.expect("a response");
        let body = Http2Body::new(response.into_body(), None, None);
        let body = body.collect().await.expect("body").to_bytes();
        assert_eq!(body, "5 bytes, checksum Some(\"abc\")");
    }

    #[tokio::test]
    async fn dropping_the_response_stops_the_upload_and_resets_the_stream() {
        let (ended_tx, mut ended) = mpsc::channel::<Result<usize, String>>(1);
        let (addr, _) = test_server::counting(move |stream, _| {
            let ended_tx = ended_tx.clone();
            async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let ended_tx = ended_tx.clone();
                        async move {
                            // Reads the body to its end, never answering.
                            let mut body = request.into_body();
                            let mut read = 0;
                            let end = loop {
                                match body.frame().await {
                                    Some(Ok(frame)) => {
                                        read += frame.data_ref().map_or(0, Bytes::len)
                                    }
                                    Some(Err(error)) => break Err(format!("{error:?}")),
                                    None => break Ok(read),
                                }
                            };
                            let _ = ended_tx.send(end).await;
                            std::future::pending::<Result<Response<Full<Bytes>>, hyper::Error>>()
                                .await
                        }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        })
        .await;
        let (_clients, response, stream) = open_post(addr).await;
        // A body that never ends: a chunk now, then nothing more.
        let (chunks_tx, chunks) =
            mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        chunks_tx
            .send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("queued");
        let stop = spawn_upload(
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(chunks)),
            stream,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(response);
        drop(stop);
        let end = tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("the server's body ends")
            .expect("a result");
        let error = end.expect_err("the stream is reset, not finished");
        assert!(
            error.contains("CANCEL") || error.contains("cancel"),
            "{error}"
        );
        drop(chunks_tx);
    }

    #[tokio::test]
    async fn an_unreachable_destination_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let clients = test_server::clients(addr, Duration::from_secs(2), 10);
        let error = clients.send(request()).await.expect_err("nothing listens");
        assert!(error.is_connect(), "{:?}", error.as_error());
    }
}
