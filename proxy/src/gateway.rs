//! The multicluster gateway: relays connections from other clusters' proxies to the meshed
//! proxies of this one (`MESH_PROXY_GATEWAY=true`).
//!
//! A client proxy reaches a remote endpoint through its cluster's gateway: mutual TLS with the
//! gateway (which so learns who the client is and refuses anyone without a mesh identity),
//! then a transport header with the tunnel flag naming the endpoint's proxy, then, relayed
//! unread, mutual TLS between the client proxy and that proxy. The endpoint's proxy therefore
//! sees the client's own identity and applies its own policy to it, and the client verifies
//! the endpoint's own identity: the gateway is trusted with neither. It relays only to the
//! inbound port of a proxy discovery knows as meshed, so it is no open relay into the cluster.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::app::Context;
use crate::client::Dial;
use crate::discovery::{State, TargetKey};
use crate::metrics::{Direction, Label, TargetLabels};
use crate::tcp;

/// Why a tunnel is refused (the reason of `proxy_error_total`).
pub const NOT_A_MESHED_PROXY: &str = "gateway tunnel target is not a meshed proxy";

/// Relays `io` (already mutually authenticated as `client_id`) to the proxy at `target`, if
/// discovery knows `target` as a meshed proxy's inbound port.
pub async fn relay<I>(
    io: I,
    target: SocketAddr,
    client_id: String,
    peer: SocketAddr,
    ctx: Arc<Context>,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let resolution = ctx.discovery.resolve(TargetKey::Addr(target));
    let known = resolution.state(ctx.config.discovery_timeout).await;
    if !matches!(known, State::Known { .. }) || !resolution.is_meshed_proxy(target) {
        ctx.metrics
            .proxy_error(Direction::Inbound, NOT_A_MESHED_PROXY);
        warn!(%peer, client = %client_id, %target, "refusing a gateway tunnel: {NOT_A_MESHED_PROXY}");
        return;
    }
    let labels = TargetLabels {
        direction: Direction::Inbound,
        authority: Label::from(format!("gateway:{target}")),
        target_addr: Label::from(target.to_string()),
        tls: Label::new("true"),
        client_id: Label::from(client_id),
        server_id: ctx.local_id(),
    };
    debug!(%peer, %target, "relaying a gateway tunnel");
    if let Err(error) = tcp::forward(io, &Dial::Direct(target), &ctx, &labels).await {
        debug!(%target, %error, "gateway tunnel ended with an error");
    }
}
