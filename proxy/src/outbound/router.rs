//! The outbound router: for each request, find the logical target, its outbound plan and the
//! matching route, apply the route's filters, choose a weighted backend and resolve it, then
//! hand the request down the stack (timeout, retries, endpoint) with a [`Dispatch`] saying
//! where it goes.

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tower::{Service, ServiceExt};
use tracing::debug;

use super::{connect_tunnel, outbound_labels, request_authority};
use crate::app::Context;
use crate::client::HttpClients;
use crate::discovery::{Resolution, State, TargetKey};
use crate::http::{ProxyBody, ProxyError, ReqBody, is_grpc};
use crate::metrics::{Label, RouteLabels, RouteMetrics, target_labels};
use crate::retry::RouteInfo;
use crate::route::{
    BackendRef, FailureAccrual, Fault, Filter, HashKey, OutboundPlan, Route, WeightedBackend,
    pick_backend, rewrite_path,
};

/// Where a request goes, decided by the router for the layers below.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// Balanced endpoints, or one direct destination.
    pub target: DispatchTarget,
    /// The logical service, for metrics.
    pub logical: Label,
    /// The authority the request carries upstream (Host / `:authority`).
    pub uri_authority: Arc<str>,
    /// The consistent-hash key, when the plan hashes.
    pub hash: Option<u64>,
    /// Circuit breaking, when the plan enables it.
    pub accrual: Option<FailureAccrual>,
    /// The backend chosen, the key of its concurrency limit.
    pub backend: TargetKey,
    /// The plan's limit of requests in flight per backend, when it sets one.
    pub max_in_flight: Option<NonZeroU32>,
}

/// The destination kind.
#[derive(Clone, Debug)]
pub enum DispatchTarget {
    /// A discovered service's endpoints.
    Balanced(Arc<Resolution>),
    /// A destination discovery doesn't know, forwarded to unchanged.
    Direct(Box<HttpClients>),
}

/// A connection's target and its resolution.
type ConnectionTarget = (TargetKey, Arc<Resolution>);

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct OutboundRouter<S> {
    ctx: Arc<Context>,
    orig_dst: Option<SocketAddr>,
    client_ip: IpAddr,
    /// The connection's own target and its resolution: resolved once per connection (an
    /// original destination), or again when a request names another authority than the last.
    resolution: Arc<Mutex<Option<ConnectionTarget>>>,
    inner: S,
}

impl<S> OutboundRouter<S> {
    /// Routes the requests of one connection.
    pub fn new(
        ctx: Arc<Context>,
        orig_dst: Option<SocketAddr>,
        client_ip: IpAddr,
        inner: S,
    ) -> Self {
        Self {
            ctx,
            orig_dst,
            client_ip,
            resolution: Arc::new(Mutex::new(None)),
            inner,
        }
    }
}

impl<S> OutboundRouter<S>
where
    S: Service<Request<ReqBody>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    async fn route(self, request: Request<Incoming>) -> Response<ProxyBody> {
        let grpc = is_grpc(&request);
        let authority = request_authority(&request);
        let key = match (self.orig_dst, &authority) {
            (Some(dst), _) => TargetKey::Addr(dst),
            (None, Some(authority)) => TargetKey::Authority(authority.clone()),
            (None, None) => {
                return super::error_response(
                    &self.ctx,
                    ProxyError::BadRequest("the request names no authority (Host)".into()),
                    grpc,
                    None,
                );
            }
        };
        if request.method() == Method::CONNECT {
            return connect_tunnel(self.ctx.clone(), request, key);
        }
        let plan = self.ctx.plans.plan(&key).await;
        let mut request = request.map(Either::Left);
        let mut uri_authority = authority.unwrap_or_else(|| key.to_string());

        let mut route_series = None;
        let (backend_key, route_info, logical) = match &plan {
            None => (key.clone(), None, None),
            Some(plan) => {
                // Egress traffic is known by the host it asked for, else by its address.
                let logical = match (&plan.egress, &key) {
                    (Some(_), TargetKey::Addr(addr)) => {
                        let host = crate::egress::host_of(&uri_authority);
                        Label::from(
                            self.ctx
                                .egress_hosts
                                .label(&host, addr.port(), &plan.service),
                        )
                    }
                    _ => Label::new(&plan.service),
                };
                let matched = plan.matched(&request);
                if let Some(egress) = &plan.egress {
                    let allowed = matched.is_some() || !egress.denies_unmatched_http();
                    egress.count(&self.ctx.metrics, &logical, "http", allowed);
                }
                let route = match (matched, &plan.egress) {
                    (Some(route), _) => route,
                    (None, Some(egress)) if egress.denies_unmatched_http() => {
                        let what = format!(
                            "{} {}{}",
                            request.method(),
                            uri_authority,
                            request.uri().path()
                        );
                        let labels = outbound_labels(&self.ctx, logical, key.to_string(), None);
                        return super::error_response(
                            &self.ctx,
                            egress.denied(&what),
                            grpc,
                            Some(labels),
                        );
                    }
                    (None, _) => plan.default_route(),
                };
                // An egress route counts under the host asked for, so its series vary.
                let series = match &plan.egress {
                    None => route.metrics(&self.ctx.metrics, &logical),
                    Some(_) => Arc::new(RouteMetrics::new(
                        self.ctx.metrics.clone(),
                        RouteLabels {
                            authority: logical.clone(),
                            route: Label::new(&route.params.name),
                        },
                    )),
                };
                series.request();
                if let Some(mut answer) = self
                    .apply_filters(plan, route, &mut request, &mut uri_authority, grpc)
                    .await
                {
                    answer.extensions_mut().insert(series);
                    return answer;
                }
                route_series = Some(series);
                let backends = plan.backends(route);
                let backend = if route.failover {
                    self.first_available(backends).await
                } else {
                    pick_backend(backends, rand::random::<u64>()).cloned()
                };
                let backend = backend.map_or_else(|| key.clone(), backend_key);
                (
                    backend,
                    Some(RouteInfo(route.params.clone())),
                    Some(logical),
                )
            }
        };

        let resolution = if backend_key == key {
            self.connection_resolution(&key)
        } else {
            self.ctx.discovery.resolve(backend_key.clone())
        };
        let state = match resolution.current_state() {
            State::Pending => resolution.state(self.ctx.config.discovery_timeout).await,
            state => state,
        };
        let (target, logical) = match state {
            State::Known { authority } => (
                DispatchTarget::Balanced(resolution.clone()),
                logical.unwrap_or(authority),
            ),
            State::NotFound | State::Pending => {
                match direct_target(&backend_key, &self.ctx).await {
                    Ok(addr) => (
                        DispatchTarget::Direct(Box::new(self.ctx.direct_clients(addr))),
                        logical.unwrap_or_else(|| Label::from(key.to_string())),
                    ),
                    Err(error) => return super::error_response(&self.ctx, error, grpc, None),
                }
            }
        };
        let mut hash = None;
        let mut accrual = None;
        let mut max_in_flight = None;
        if let Some(plan) = &plan {
            if let DispatchTarget::Balanced(resolution) = &target
                && resolution.balancer.algorithm() != plan.algorithm
            {
                resolution.balancer.set_algorithm(plan.algorithm.clone());
            }
            hash = plan
                .hash_key
                .as_ref()
                .and_then(|key| hash_request(key, &request, self.client_ip));
            accrual = plan.failure_accrual.clone();
            max_in_flight = plan.max_in_flight_per_backend;
        }
        let dispatch = Dispatch {
            target,
            logical: logical.clone(),
            uri_authority: Arc::from(uri_authority),
            hash,
            accrual,
            backend: backend_key,
            max_in_flight,
        };
        // Shared: the layers below read it, and the endpoint keeps it per attempt.
        request.extensions_mut().insert(Arc::new(dispatch));
        if let Some(route_info) = route_info {
            request.extensions_mut().insert(route_info);
        }
        let mut response = match self.inner.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        // The metrics layer measures the route's latency and outcome with these.
        if let Some(series) = route_series {
            response.extensions_mut().insert(series);
        }
        // Errors produced above the endpoint (timeouts) still need the target's labels.
        if target_labels(response.extensions()).is_none() {
            let labels = outbound_labels(&self.ctx, logical.clone(), logical.0.to_string(), None);
            response.extensions_mut().insert(labels);
        }
        response
    }

    /// The first of a failover route's `backends` with an endpoint that is known and not
    /// ejected (a fixed address always counts); the last when none has one, so the answer
    /// names the last resort. Resolving each in turn is a cache lookup once they are known.
    async fn first_available(&self, backends: &[WeightedBackend]) -> Option<BackendRef> {
        for weighted in backends {
            let BackendRef::Authority(_) = &weighted.backend else {
                return Some(weighted.backend.clone());
            };
            let resolution = self
                .ctx
                .discovery
                .resolve(backend_key(weighted.backend.clone()));
            let state = match resolution.current_state() {
                State::Pending => resolution.state(self.ctx.config.discovery_timeout).await,
                state => state,
            };
            if matches!(state, State::Known { .. }) && resolution.has_available_endpoints() {
                return Some(weighted.backend.clone());
            }
        }
        backends.last().map(|weighted| weighted.backend.clone())
    }

    /// The resolution of the connection's own target, kept across its requests.
    fn connection_resolution(&self, key: &TargetKey) -> Arc<Resolution> {
        let mut cached = match self.resolution.lock() {
            Ok(cached) => cached,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &*cached {
            Some((cached_key, resolution)) if cached_key == key => resolution.clone(),
            _ => {
                let resolution = self.ctx.discovery.resolve(key.clone());
                *cached = Some((key.clone(), resolution.clone()));
                resolution
            }
        }
    }

    /// Applies a route's filters; returns a response when a filter answers the request itself
    /// (redirect, injected abort).
    async fn apply_filters(
        &self,
        plan: &OutboundPlan,
        route: &Route,
        request: &mut Request<ReqBody>,
        uri_authority: &mut String,
        grpc: bool,
    ) -> Option<Response<ProxyBody>> {
        let route_labels = || RouteLabels {
            authority: Label::new(&plan.service),
            route: Label::new(&route.params.name),
        };
        for filter in &route.filters {
            match filter {
                Filter::Headers { add, set, remove } => {
                    let headers = request.headers_mut();
                    for name in remove {
                        headers.remove(name);
                    }
                    for (name, value) in set {
                        headers.insert(name.clone(), value.clone());
                    }
                    for (name, value) in add {
                        headers.append(name.clone(), value.clone());
                    }
                }
                Filter::Redirect {
                    scheme,
                    host,
                    path,
                    port,
                    status,
                } => {
                    let current_host = uri_authority
                        .rsplit_once(':')
                        .map_or(uri_authority.as_str(), |(host, _)| host);
                    let host = host.as_deref().unwrap_or(current_host);
                    let scheme = scheme.as_deref().unwrap_or("http");
                    let path = match path {
                        Some(change) => rewrite_path(
                            request.uri().path(),
                            change,
                            route.matched_prefix(request),
                        ),
                        None => request.uri().path().to_string(),
                    };
                    let location = match port {
                        Some(port) => format!("{scheme}://{host}:{port}{path}"),
                        None => format!("{scheme}://{host}{path}"),
                    };
                    let mut response = Response::new(Either::Right(Full::default()));
                    *response.status_mut() =
                        StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND);
                    if let Ok(location) = HeaderValue::try_from(location) {
                        response.headers_mut().insert(header::LOCATION, location);
                    }
                    return Some(response);
                }
                Filter::Rewrite { host, path } => {
                    if let Some(host) = host {
                        let port = uri_authority
                            .rsplit_once(':')
                            .map(|(_, port)| port.to_string());
                        *uri_authority = match port {
                            Some(port) => format!("{host}:{port}"),
                            None => host.clone(),
                        };
                        if let Ok(value) = HeaderValue::try_from(uri_authority.as_str()) {
                            request.headers_mut().insert(header::HOST, value);
                        }
                    }
                    if let Some(change) = path {
                        let path = rewrite_path(
                            request.uri().path(),
                            change,
                            route.matched_prefix(request),
                        );
                        let path_and_query = match request.uri().query() {
                            Some(query) => format!("{path}?{query}"),
                            None => path,
                        };
                        if let Ok(uri) = Uri::builder().path_and_query(path_and_query).build() {
                            *request.uri_mut() = uri;
                        }
                    }
                }
                Filter::Mirror { backend, percent } => {
                    if rand::random::<u32>() % 100 < *percent {
                        self.mirror(request, backend.clone(), uri_authority);
                    }
                }
                Filter::Fault(Fault {
                    abort_percent,
                    abort_status,
                    delay_percent,
                    delay,
                }) => {
                    if rand::random::<u32>() % 100 < *delay_percent {
                        self.ctx
                            .metrics
                            .fault_injections
                            .get_or_create(&route_labels())
                            .inc();
                        tokio::time::sleep(*delay).await;
                    }
                    if rand::random::<u32>() % 100 < *abort_percent {
                        self.ctx
                            .metrics
                            .fault_injections
                            .get_or_create(&route_labels())
                            .inc();
                        let mut response = Response::new(Either::Right(Full::new(
                            bytes::Bytes::from_static(b"fault injected\n"),
                        )));
                        if grpc {
                            response
                                .headers_mut()
                                .insert("grpc-status", HeaderValue::from_static("14"));
                        } else {
                            *response.status_mut() = StatusCode::from_u16(*abort_status)
                                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                        }
                        response.headers_mut().insert(
                            crate::http::MESH_ERROR,
                            HeaderValue::from_static("fault injected"),
                        );
                        return Some(response);
                    }
                }
            }
        }
        None
    }

    /// Sends a copy of a bodiless request to `backend`, ignoring the answer. Requests with a
    /// body are not mirrored: copying would mean buffering every body.
    fn mirror(&self, request: &Request<ReqBody>, backend: BackendRef, uri_authority: &str) {
        if request.body().size_hint().exact() != Some(0) {
            debug!("not mirroring a request with a body");
            return;
        }
        let mut copy = Request::new(Either::Right(Full::default()));
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.headers_mut() = request.headers().clone();
        *copy.version_mut() = request.version();
        let ctx = self.ctx.clone();
        let uri_authority = uri_authority.to_string();
        tokio::spawn(async move {
            let resolution = ctx.discovery.resolve(backend_key(backend));
            if let State::Known { .. } = resolution.state(ctx.config.discovery_timeout).await
                && let Some(pick) = resolution.balancer.pick(None)
            {
                let clients = &pick.meta().clients;
                let _ = crate::forward::forward(clients, copy, &uri_authority, "the mirror").await;
                pick.complete();
            }
        });
    }
}

fn backend_key(backend: BackendRef) -> TargetKey {
    match backend {
        BackendRef::Authority(authority) => TargetKey::Authority(authority),
        BackendRef::Addr(addr) => TargetKey::Addr(addr),
    }
}

/// Where to send a request discovery doesn't know: its original destination, or in proxy
/// mode the authority resolved as the application would have (DNS, /etc/hosts). Never one of
/// the proxy's own listeners.
pub async fn direct_target(key: &TargetKey, ctx: &Context) -> Result<SocketAddr, ProxyError> {
    let addr = match key {
        TargetKey::Addr(addr) => *addr,
        TargetKey::Authority(authority) => tokio::net::lookup_host(authority.as_str())
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| {
                ProxyError::DiscoveryUnavailable(format!(
                    "{authority} is not a mesh service and does not resolve"
                ))
            })?,
    };
    match ctx.own_ports.refuse(addr) {
        Some(error) => Err(error),
        None => Ok(addr),
    }
}

/// The consistent-hash key of a request. The hasher has fixed keys, so every proxy maps a key
/// to the same endpoint.
fn hash_request<B>(key: &HashKey, request: &Request<B>, client_ip: IpAddr) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    match key {
        HashKey::Header(name) => request.headers().get(name)?.as_bytes().hash(&mut hasher),
        HashKey::Cookie(name) => request
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| key == name)?
            .1
            .hash(&mut hasher),
        HashKey::ClientIp => client_ip.hash(&mut hasher),
    }
    Some(hasher.finish())
}

impl<S> Service<Request<Incoming>> for OutboundRouter<S>
where
    S: Service<Request<ReqBody>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.route(request).await) })
    }
}
