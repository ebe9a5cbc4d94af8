//! The dashboard's data: a task that asks the controller's Stats API every refresh period
//! and publishes the answers on a `watch` channel the UI reads without ever waiting. The UI
//! says which workload it drills into on another `watch` channel.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::stats::stats_client::StatsClient;
use mesh_proto::stats::{Denial, Edge, EgressEdge, ResourceRef, ResourceSelector, StatsRow};
use tokio::sync::watch;

use crate::controller::{Controller, ControllerChannel};
use crate::stat;

/// One round of answers.
#[derive(Debug, Clone, Default)]
pub struct Feed {
    /// Counts rounds, so the UI knows a new one arrived.
    pub round: u64,
    /// Every workload's inbound traffic.
    pub workloads: Vec<StatsRow>,
    /// Who calls whom.
    pub edges: Vec<Edge>,
    /// What policy refused.
    pub denials: Vec<Denial>,
    /// What left the mesh under an egress policy, allowed or denied.
    pub egress: Vec<EgressEdge>,
    /// The drilled-into workload's details, when one is.
    pub drill: Option<Drill>,
    /// Why this round is incomplete, if it is (the rest is the previous round's).
    pub error: Option<String>,
}

/// One workload's details.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Drill {
    /// The workload.
    pub target: ResourceRef,
    /// The authorities its pods call.
    pub authorities: Vec<StatsRow>,
    /// The routes its pods call.
    pub routes: Vec<StatsRow>,
}

/// What the fetcher is asked for.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// The controller.
    pub controller: Controller,
    /// Only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// The window of rates and percentiles.
    pub window: Duration,
    /// Time between rounds.
    pub refresh: Duration,
}

/// Fetches rounds until every receiver is gone.
pub async fn run(
    config: FeedConfig,
    feed: watch::Sender<Arc<Feed>>,
    mut drill: watch::Receiver<Option<ResourceRef>>,
) {
    let mut client: Option<StatsClient<ControllerChannel>> = None;
    let mut round = 0;
    loop {
        if feed.is_closed() {
            return;
        }
        round += 1;
        let target = drill.borrow_and_update().clone();
        let previous = feed.borrow().clone();
        let next = fetch(&config, &mut client, round, target, &previous).await;
        if feed.send(Arc::new(next)).is_err() {
            return;
        }
        // A new drill target is fetched at once; otherwise wait for the next round.
        tokio::select! {
            () = tokio::time::sleep(config.refresh) => {}
            changed = drill.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

async fn fetch(
    config: &FeedConfig,
    client: &mut Option<StatsClient<ControllerChannel>>,
    round: u64,
    target: Option<ResourceRef>,
    previous: &Feed,
) -> Feed {
    let mut next = Feed {
        round,
        ..previous.clone()
    };
    if client.is_none() {
        match stat::connect(&config.controller).await {
            Ok(connected) => *client = Some(connected),
            Err(error) => {
                next.error = Some(format!("{error:#}"));
                return next;
            }
        }
    }
    let Some(connected) = client.as_mut() else {
        return next;
    };
    let namespace = config.namespace.clone().unwrap_or_default();
    let selector = |kind: &str, name: &str| ResourceSelector {
        kind: kind.to_owned(),
        namespace: namespace.clone(),
        name: name.to_owned(),
    };
    let result: anyhow::Result<()> = async {
        next.workloads =
            stat::summary(connected, selector("workload", ""), config.window, None).await?;
        let answer = stat::edges(connected, selector("workload", ""), config.window).await?;
        next.edges = answer.edges;
        next.denials = answer.denials;
        next.egress = answer.egress;
        next.drill = match &target {
            None => None,
            Some(target) => {
                let authorities = stat::summary(
                    connected,
                    selector("authority", ""),
                    config.window,
                    Some(target.clone()),
                )
                .await?;
                let routes = stat::summary(
                    connected,
                    selector("route", ""),
                    config.window,
                    Some(target.clone()),
                )
                .await?;
                Some(Drill {
                    target: target.clone(),
                    authorities,
                    routes,
                })
            }
        };
        Ok(())
    }
    .await;
    match result {
        Ok(()) => next.error = None,
        Err(error) => {
            next.error = Some(format!("{error:#}"));
            // Reconnect next round: the controller may have restarted.
            *client = None;
        }
    }
    next
}
