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
use crate::access::{Action, ObserverAccess};

/// The window when a request names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// The Stats service over the scraper's store.
#[derive(Debug, Clone)]
pub struct StatsService {
    store: Arc<RwLock<Store>>,
    retention: Duration,
    access: ObserverAccess,
}

impl StatsService {
    /// A service reading `store`, whose samples reach back `retention`, for the callers
    /// `access` admits.
    pub fn new(store: Arc<RwLock<Store>>, retention: Duration, access: ObserverAccess) -> Self {
        StatsService {
            store,
            retention,
            access,
        }
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

/// The one namespace whose traffic a selector reads, or `None` for all (what the caller must
/// be allowed to read): its namespace, or the namespace it names.
fn scope(kind: &str, namespace: &str, name: &str) -> Option<String> {
    if !namespace.is_empty() {
        return Some(namespace.to_owned());
    }
    let names_namespace = matches!(Kind::parse(kind), Ok(Kind::Namespace));
    (names_namespace && !name.is_empty()).then(|| name.to_owned())
}

fn selector_scope(selector: Option<&ResourceSelector>) -> Option<String> {
    selector.and_then(|s| scope(&s.kind, &s.namespace, &s.name))
}

#[tonic::async_trait]
impl Stats for StatsService {
    async fn summary(
        &self,
        request: Request<SummaryRequest>,
    ) -> Result<Response<SummaryResponse>, Status> {
        let mut scopes = vec![selector_scope(request.get_ref().selector.as_ref())];
        if let Some(from) = &request.get_ref().from {
            // Whose traffic is read: the sender's namespace too.
            scopes.push(scope(&from.kind, &from.namespace, &from.name));
        }
        let scopes: Vec<Option<&str>> = scopes.iter().map(Option::as_deref).collect();
        self.access
            .check(request.metadata(), Action::Stats, &scopes)
            .await?;
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
        let scope = selector_scope(request.get_ref().selector.as_ref());
        self.access
            .check(request.metadata(), Action::Stats, &[scope.as_deref()])
            .await?;
        let request = request.into_inner();
        let selector = selector(request.selector.as_ref())?;
        let window = self.window(request.window.as_ref())?;
        let windows = scrape::read(&self.store).window(window);
        Ok(Response::new(EdgesResponse {
            edges: aggregate::edges(&windows, &selector),
            denials: aggregate::denials(&windows, &selector),
            egress: aggregate::egress(&windows, &selector),
        }))
    }
}
