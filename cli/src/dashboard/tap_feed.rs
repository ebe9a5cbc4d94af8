//! The dashboard's live tap: a task of its own keeps a tap open on the controller (reopening
//! it when the controller's duration bound ends it) and publishes the latest requests on a
//! `watch` channel, which the UI reads without waiting, as it reads the stats [`super::feed`].
//!
//! Only what the servers' proxies report (inbound) is asked for: a request between two
//! meshed pods is reported by both proxies, and the server's side is the one that knows the
//! policy's verdict.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::tap::{Direction, TapMatch};
use tokio::sync::watch;

use crate::controller::Controller;
use crate::tap::{self, Exchange, Joiner};

/// Requests the pane keeps, newest first.
pub const KEPT: usize = 50;
/// Requests one tap asks for before it is reopened.
const PER_TAP: u32 = 1000;
/// How long one tap asks to last (the controller's cap is 60 s).
const TAP_DURATION: Duration = Duration::from_secs(60);
/// The pause before reopening a tap that ended or failed.
const RETRY: Duration = Duration::from_secs(2);

/// The latest requests.
#[derive(Debug, Clone, Default)]
pub struct TapFeed {
    /// Counts updates, so the UI knows a new one arrived.
    pub round: u64,
    /// The latest requests, newest first, at most [`KEPT`].
    pub exchanges: VecDeque<Exchange>,
    /// Why the tap is not running, when it is not.
    pub error: Option<String>,
}

impl TapFeed {
    /// Adds one finished request, forgetting the oldest beyond [`KEPT`].
    pub fn push(&mut self, exchange: Exchange) {
        self.round += 1;
        self.exchanges.push_front(exchange);
        self.exchanges.truncate(KEPT);
    }
}

/// What the pane taps: the namespace's pods, or the whole mesh.
pub fn tap_match(namespace: Option<&str>) -> TapMatch {
    TapMatch {
        workload: namespace.map_or_else(String::new, |ns| format!("ns/{ns}")),
        direction: Direction::Inbound as i32,
        ..TapMatch::default()
    }
}

/// Taps until every receiver is gone.
pub async fn run(
    controller: Controller,
    namespace: Option<String>,
    feed: watch::Sender<Arc<TapFeed>>,
) {
    let mut current = TapFeed::default();
    let filter = tap_match(namespace.as_deref());
    // Each pass is one bounded tap (PER_TAP requests, TAP_DURATION); the loop ends with the UI.
    while !feed.is_closed() {
        let result: anyhow::Result<()> = async {
            let mut client = tap::connect(&controller).await?;
            let mut stream =
                tap::observe(&mut client, filter.clone(), PER_TAP, TAP_DURATION).await?;
            let mut joiner = Joiner::default();
            while let Some(event) = stream
                .message()
                .await
                .map_err(|status| anyhow::anyhow!("tap: {}", status.message()))?
            {
                if let Some(exchange) = joiner.push(event) {
                    current.push(exchange);
                    current.error = None;
                    if feed.send(Arc::new(current.clone())).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(error) = result {
            current.round += 1;
            current.error = Some(format!("{error:#}"));
            if feed.send(Arc::new(current.clone())).is_err() {
                return;
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}
