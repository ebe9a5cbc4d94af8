//! The `Stats` gRPC service: reads the store's windows and answers with the aggregation's
//! rows. Requests never wait for a scrape: they read what the last scrapes left.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_proto::stats::stats_server::{Stats, StatsServer};
use mesh_proto::stats::{
    EdgesRequest, EdgesResponse, ResourceSelector, SummaryRequest, SummaryResponse,
};
use tonic::{Request, Response, Status};

use super::aggregate::{self, FromFilter, Kind, Selector};
use super::scrape;
use super::store::Store;

/// The window when a request names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// The Stats service over the scraper's store.
#[derive(Debug, Clone)]
pub struct StatsService {
    store: Arc<RwLock<Store>>,
    retention: Duration,
}

impl StatsService {
    /// A service reading `store`, whose samples reach back `retention`.
    pub fn new(store: Arc<RwLock<Store>>, retention: Duration) -> Self {
        StatsService { store, retention }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> StatsServer<Self> {
        StatsServer::new(self)
    }

    fn window(&self, requested: Option<&prost_types::Duration>) -> Result<Duration, Status> {
        let Some(requested) = requested else {
            return Ok(DEFAULT_WINDOW.min(self.retention));
        };
        let window = Duration::try_from(*requested)
            .map_err(|_| Status::invalid_argument("the window must be a positive duration"))?;
        if window.is_zero() {
            return Err(Status::invalid_argument("the window must be longer than 0"));
        }
        Ok(window.min(self.retention))
    }
}

/// The selector of a request; an absent one or an empty kind means deployments.
fn selector(selector: Option<&ResourceSelector>) -> Result<Selector, Status> {
    let empty = ResourceSelector::default();
    let selector = selector.unwrap_or(&empty);
    let kind = if selector.kind.is_empty() {
        Kind::Workload(Some("deployment".to_owned()))
    } else {
        Kind::parse(&selector.kind).map_err(Status::invalid_argument)?
    };
    let some = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    Ok(Selector {
        kind,
        namespace: some(&selector.namespace),
        name: some(&selector.name),
    })
}

#[tonic::async_trait]
impl Stats for StatsService {
    async fn summary(
        &self,
        request: Request<SummaryRequest>,
    ) -> Result<Response<SummaryResponse>, Status> {
        let request = request.into_inner();
        let selector = selector(request.selector.as_ref())?;
        let window = self.window(request.window.as_ref())?;
        let from = request.from.map(|from| FromFilter {
            kind: from.kind,
            namespace: from.namespace,
            name: from.name,
        });
        let windows = scrape::read(&self.store).window(window);
        let rows = aggregate::summary(&windows, &selector, from.as_ref());
        Ok(Response::new(SummaryResponse { rows }))
    }

    async fn edges(
        &self,
        request: Request<EdgesRequest>,
    ) -> Result<Response<EdgesResponse>, Status> {
        let request = request.into_inner();
        let selector = selector(request.selector.as_ref())?;
        let window = self.window(request.window.as_ref())?;
        let windows = scrape::read(&self.store).window(window);
        Ok(Response::new(EdgesResponse {
            edges: aggregate::edges(&windows, &selector),
            denials: aggregate::denials(&windows, &selector),
        }))
    }
}
