//! Pooled HTTP/1 connections to one destination.

use std::sync::{Mutex, MutexGuard};

use http::{Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;
use tower::Service;
use tracing::debug;

use super::{Connector, POOL_IDLE_TIMEOUT, SendError};
use crate::http::ReqBody;

/// Most connections kept for reuse; more are closed once their exchange ends.
const MAX_POOLED: usize = 64;

/// HTTP/1 connections to one destination, reused one exchange after another.
///
/// Hand-written rather than hyper-util's pooled client, which for each request clones itself,
/// hashes its pool key twice (out and back), boxes a 3 KiB future and spawns a task to return
/// the connection: a sixth of the server proxy's own instructions per request (callgrind).
/// Here a connection goes back to the list as soon as its response headers arrive, and is
/// taken again once hyper says it is ready (its response body read).
#[derive(Debug)]
pub struct Http1Pool {
    connector: Connector,
    /// Most recently used last; some may still be reading their response body.
    connections: Mutex<Vec<Pooled>>,
}

#[derive(Debug)]
struct Pooled {
    sender: http1::SendRequest<ReqBody>,
    /// When its last exchange started: a connection quiet for [`POOL_IDLE_TIMEOUT`] is closed
    /// before the server's own keep-alive timeout can race a new request.
    used: Instant,
}

impl Http1Pool {
    pub(super) fn new(connector: Connector) -> Self {
        Self {
            connector,
            connections: Mutex::new(Vec::new()),
        }
    }

    /// Sends `request` on a ready connection, or a new one; when a connection turns out closed
    /// before the request went out, once more on a new one.
    pub async fn send(&self, request: Request<ReqBody>) -> Result<Response<Incoming>, SendError> {
        let request = origin_form(request);
        let mut sender = match self.ready() {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut error) => {
                let Some(request) = error.take_message() else {
                    return Err(SendError::Http(error.into_error()));
                };
                debug!(error = %error.error(), "a pooled HTTP/1 connection closed; reconnecting");
                sender = self.connect().await?;
                sender
                    .send_request(request)
                    .await
                    .map_err(SendError::Http)?
            }
        };
        self.put_back(sender);
        Ok(response)
    }

    /// The most recently used connection that is ready for a request; closed and stale ones
    /// are dropped on the way.
    fn ready(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut connections = self.connections();
        let now = Instant::now();
        connections.retain(|pooled| {
            !pooled.sender.is_closed()
                && (now.saturating_duration_since(pooled.used) < POOL_IDLE_TIMEOUT
                    || !pooled.sender.is_ready())
        });
        let index = connections
            .iter()
            .rposition(|pooled| pooled.sender.is_ready())?;
        Some(connections.swap_remove(index).sender)
    }

    /// Keeps `sender` for a later request unless the pool is full.
    fn put_back(&self, sender: http1::SendRequest<ReqBody>) {
        let mut connections = self.connections();
        if connections.len() < MAX_POOLED {
            connections.push(Pooled {
                sender,
                used: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<ReqBody>, SendError> {
        let io = self
            .connector
            .clone()
            .call(Uri::default())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::handshake(io)
            .await
            .map_err(|error| SendError::Connect(std::io::Error::other(error)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(%error, "HTTP/1 client connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn connections(&self) -> MutexGuard<'_, Vec<Pooled>> {
        match self.connections.lock() {
            Ok(connections) => connections,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The request as an HTTP/1 server expects it from a client: `Host` from the URI when it has
/// none, and the target in origin form (`/path?query`), except CONNECT's authority form.
fn origin_form(mut request: Request<ReqBody>) -> Request<ReqBody> {
    if !request.headers().contains_key(header::HOST)
        && let Some(host) = request
            .uri()
            .authority()
            .and_then(|authority| http::HeaderValue::from_str(authority.as_str()).ok())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    if request.method() == http::Method::CONNECT {
        return request;
    }
    let origin = request.uri().path_and_query().map_or_else(
        || Uri::from_static("/"),
        |path| Uri::try_from(path.as_str()).unwrap_or_else(|_| Uri::from_static("/")),
    );
    *request.uri_mut() = origin;
    request
}
