//! Forwarding one HTTP request to a destination's clients, shared by both sides: header
//! hygiene, protocol upgrades, and turning client failures into [`ProxyError`]s.

use http::{Request, Response, StatusCode, Uri};
use http_body_util::Either;
use tracing::debug;

use crate::client::HttpClients;
use crate::http::{ProxyBody, ProxyError, ReqBody, is_upgrade, strip_hop_by_hop};

/// Sends `request` with `clients`, keeping `authority` as its Host/`:authority`, and returns
/// the response ready for the client (hop-by-hop headers removed, upgrades spliced).
pub async fn forward(
    clients: &HttpClients,
    mut request: Request<ReqBody>,
    authority: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    let client_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let request = prepare_request(request, authority, client_upgrade.is_some())?;
    let client = clients.for_version(request.version());
    let mut response = client.request(request).await.map_err(|error| {
        let detail = format!("{}: {}", clients.dial.socket_addr(), error_chain(&error));
        if error.is_connect() {
            ProxyError::ConnectFailed(detail)
        } else {
            ProxyError::Upstream(detail)
        }
    })?;
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let Some(client_upgrade) = client_upgrade
        && switching
    {
        let server_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(splice_upgrades(client_upgrade, server_upgrade));
    }
    strip_hop_by_hop(response.headers_mut(), switching);
    Ok(response.map(Either::Left))
}

/// Rewrites a request for the upstream client: absolute URI with the request's authority (the
/// connector ignores it and dials the chosen endpoint) and no hop-by-hop headers.
fn prepare_request(
    request: Request<ReqBody>,
    authority: &str,
    upgrade: bool,
) -> Result<Request<ReqBody>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|error| ProxyError::BadRequest(format!("invalid request target: {error}")))?;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    Ok(Request::from_parts(parts, body))
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
