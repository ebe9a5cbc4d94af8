//! Forwarding one HTTP request to a destination's clients, shared by both sides: header
//! hygiene, protocol upgrades, HTTP/1 carried over HTTP/2 between proxies, and turning client
//! failures into [`ProxyError`]s.

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use tracing::{debug, warn};

use crate::client::{HttpClients, SendError};
use crate::http::{ProxyBody, ProxyError, ReqBody, is_upgrade, strip_hop_by_hop};

/// Names the HTTP/1 version of a request a client proxy carries to a peer proxy over HTTP/2
/// (as Linkerd's `l5d-orig-proto`): the peer restores it before the application sees it.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("mesh-orig-proto");

/// Sends `request` with `clients`, keeping `authority` as its Host/`:authority`, and returns
/// the response ready for the client (hop-by-hop headers removed, upgrades spliced).
///
/// An HTTP/1 request to a peer proxy travels over the one HTTP/2 connection to that proxy
/// (with [`ORIG_PROTO`]), so a thousand HTTP/1 clients cost the peer one connection rather than
/// one each. Upgrades (WebSocket) stay HTTP/1: HTTP/2 cannot carry them this way.
///
/// `service` names the destination in errors the client sees; the endpoint's address goes to
/// the log only.
pub async fn forward(
    clients: &HttpClients,
    mut request: Request<ReqBody>,
    authority: &str,
    service: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    let client_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let client_version = request.version();
    let orig_version = (clients.dial.is_proxy()
        && client_upgrade.is_none()
        && request.version() < Version::HTTP_2)
        .then(|| request.version());
    let mut request = prepare_request(request, authority, client_upgrade.is_some())?;
    if let Some(version) = orig_version {
        let name = if version == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        request
            .headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static(name));
        *request.version_mut() = Version::HTTP_2;
    }
    let mut response = clients
        .send(request)
        .await
        .map_err(|error| client_error(&error, clients, service))?;
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let Some(client_upgrade) = client_upgrade
        && switching
    {
        let server_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(splice_upgrades(client_upgrade, server_upgrade));
    }
    strip_hop_by_hop(response.headers_mut(), switching);
    // An HTTP/1 client hears its own version back, whatever spoke upstream: HTTP/2 between
    // proxies, or an HTTP/1.0 application behind the peer.
    if client_version < Version::HTTP_2 {
        *response.version_mut() = client_version;
    }
    Ok(response.map(Either::Left))
}

/// Removes [`ORIG_PROTO`] from a request and, when `from_proxy` (the connection came from a
/// client proxy through the transport header), restores the HTTP/1 version it names. From
/// anyone else the header is dropped unread: only a peer proxy downgrades a request.
pub fn restore_orig_proto<B>(request: &mut Request<B>, from_proxy: bool) {
    let Some(value) = request.headers_mut().remove(ORIG_PROTO) else {
        return;
    };
    if !from_proxy || request.version() != Version::HTTP_2 {
        return;
    }
    match value.as_bytes() {
        b"HTTP/1.1" => *request.version_mut() = Version::HTTP_11,
        b"HTTP/1.0" => *request.version_mut() = Version::HTTP_10,
        _ => debug!(?value, "ignoring an unknown mesh-orig-proto"),
    }
}

/// Rewrites a request for the upstream client: absolute URI with the request's authority (the
/// connector ignores it and dials the chosen endpoint) and no hop-by-hop headers. The URI
/// takes the request's own `Host` when it has one, so an HTTP/1 request carried over HTTP/2
/// keeps the exact name its client sent (`authority` has the default port added).
fn prepare_request(
    mut request: Request<ReqBody>,
    authority: &str,
    upgrade: bool,
) -> Result<Request<ReqBody>, ProxyError> {
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok());
    let authority = match host {
        Some(host) => host,
        None => Authority::try_from(authority)
            .map_err(|error| ProxyError::BadRequest(format!("invalid request target: {error}")))?,
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    *request.uri_mut() = Uri::from_parts(parts)
        .map_err(|error| ProxyError::BadRequest(format!("invalid request target: {error}")))?;
    strip_hop_by_hop(request.headers_mut(), upgrade);
    Ok(request)
}

/// What the client is told of a failed exchange with `service`: what went wrong, not where.
/// The endpoint's address and the whole error go to the log.
fn client_error(error: &SendError, clients: &HttpClients, service: &str) -> ProxyError {
    let chain = error_chain(error.as_error());
    warn!(%service, upstream = %clients.dial.socket_addr(), error = %chain, "forwarding failed");
    if error.connection_limit().is_some() {
        return ProxyError::Overloaded(format!("{service}: {chain}"));
    }
    if request_body_failed(error.as_error()) {
        return ProxyError::BadRequest(format!("the request body could not be read: {chain}"));
    }
    if error.is_connect() {
        ProxyError::ConnectFailed(format!("{service}: {chain}"))
    } else {
        ProxyError::Upstream(format!("{service}: {chain}"))
    }
}

/// The first error of type `E` in `error`'s chain.
fn find_source<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

/// Whether an exchange failed because the client's own request body did (a malformed chunk, a
/// body cut short): hyper reports the body stream's error as a "user" error of the client
/// whose source is the error our server side read.
fn request_body_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    find_source::<hyper::Error>(error).is_some_and(|hyper_error| {
        hyper_error.is_user()
            && std::error::Error::source(hyper_error)
                .and_then(|source| find_source::<hyper::Error>(source))
                .is_some()
    })
}

/// Copies bytes between the two sides of an upgraded (101) connection.
async fn splice_upgrades(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, server) {
        Ok((client, server)) => {
            let mut client = hyper_util::rt::TokioIo::new(client);
            let mut server = hyper_util::rt::TokioIo::new(server);
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                debug!(%error, "upgraded connection ended with an error");
            }
        }
        Err(error) => debug!(%error, "upgrade failed"),
    }
}

/// An error with its sources, for the `mesh-error` detail.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
