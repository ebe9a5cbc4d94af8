//! Tap aggregation: the controller serves `Tap.Observe` to meshctl by opening `Tap.Observe` on
//! the admin port of every meshed pod the request names, and merging their streams.
//!
//! - [`bounds`]: which pods a tap reaches, and the bounds of the merged stream (requests,
//!   requests per second, duration), pure and tested;
//! - [`tls`]: the controller's own SPIFFE identity, signed by its CA, presented to the proxies
//!   (which serve tap only to it, `MESH_PROXY_TAP_IDENTITY`), verifying each proxy's identity.
//!
//! Without a CA the controller taps in plaintext, which the proxies accept only from loopback
//! (the loopback-mode local mesh). Each event is stamped with its reporter (`ns/pod`) and the
//! reporting pod's labels on its side of the exchange.

pub mod bounds;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::tap::tap_client::TapClient;
use mesh_proto::tap::tap_server::{Tap, TapServer};
use mesh_proto::tap::{self as api, ObserveRequest, TapEvent};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use self::bounds::{StreamBounds, TapLimits, Verdict};
use self::tls::ControllerIdentity;
use crate::access::{Action, ObserverAccess};
use crate::index::Snapshot;
use crate::stats::scrape::pods_of;
use crate::stats::store::PodInfo;

/// How the controller taps the proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapConfig {
    /// The proxies' admin port.
    pub admin_port: u16,
    /// How long connecting to one proxy may take.
    pub connect_timeout: Duration,
    /// The bounds of every tap.
    pub limits: TapLimits,
}

impl Default for TapConfig {
    fn default() -> Self {
        TapConfig {
            admin_port: 4191,
            connect_timeout: Duration::from_secs(3),
            limits: TapLimits::default(),
        }
    }
}

/// Events buffered between the proxies' streams and the watcher.
const MERGE_BUFFER: usize = 1024;

/// The `Tap` service of the controller.
#[derive(Debug, Clone)]
pub struct TapService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    identity: Option<Arc<ControllerIdentity>>,
    access: ObserverAccess,
    config: TapConfig,
}

impl TapService {
    /// Taps the meshed pods of the index's `snapshots`, over mTLS as `identity` when given,
    /// for the callers `access` admits.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        identity: Option<Arc<ControllerIdentity>>,
        access: ObserverAccess,
        config: TapConfig,
    ) -> Self {
        TapService {
            snapshots,
            identity,
            access,
            config,
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> TapServer<Self> {
        TapServer::new(self)
    }
}

/// One proxy's event, or why its stream ended early.
enum FromProxy {
    Event(String, Box<TapEvent>),
    Failed(String, String),
}

#[tonic::async_trait]
impl Tap for TapService {
    type ObserveStream = ReceiverStream<Result<TapEvent, Status>>;

    async fn observe(
        &self,
        request: Request<ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let filter = request.get_ref().r#match.clone().unwrap_or_default();
        self.access
            .check(request.metadata(), Action::Tap, &[bounds::scope(&filter)])
            .await?;
        let request = request.into_inner();
        let snapshot = self.snapshots.borrow().clone();
        let pods =
            bounds::select_pods(&pods_of(&snapshot), &filter).map_err(|error| match error {
                bounds::SelectError::BadWorkload(_) => Status::invalid_argument(error.to_string()),
                bounds::SelectError::NoPods(_) => Status::not_found(error.to_string()),
            })?;
        let asked = request
            .max_duration
            .and_then(|d| Duration::try_from(d).ok());
        let (requests, duration) = self.config.limits.bounds(request.limit, asked);
        tracing::info!(
            pods = pods.len(),
            requests,
            ?duration,
            workload = %filter.workload,
            namespace = %filter.namespace,
            "tap started"
        );
        // The proxies filter by request; who the pods are was decided here.
        let proxy_request = ObserveRequest {
            r#match: Some(api::TapMatch {
                namespace: String::new(),
                workload: String::new(),
                ..filter
            }),
            limit: requests,
            max_duration: prost_types::Duration::try_from(duration).ok(),
        };
        let deadline = Instant::now() + duration;
        let (merged_tx, merged_rx) = mpsc::channel(MERGE_BUFFER);
        let mut tasks = Vec::with_capacity(pods.len());
        for pod in pods.iter() {
            let pod = pod.clone();
            let tx = merged_tx.clone();
            let request = proxy_request.clone();
            let identity = self.identity.clone();
            let config = self.config;
            tasks.push(tokio::spawn(async move {
                let reporter = format!("{}/{}", pod.namespace(), pod.name());
                if let Err(error) = tap_pod(&pod, identity.as_deref(), config, request, &tx).await {
                    tracing::debug!(%reporter, %error, "tap of a proxy failed");
                    let _ = tx.send(FromProxy::Failed(reporter, error)).await;
                }
            }));
        }
        drop(merged_tx);
        let (out_tx, out_rx) = mpsc::channel(MERGE_BUFFER);
        tokio::spawn(merge(
            merged_rx,
            out_tx,
            tasks,
            pods.len(),
            StreamBounds::new(requests, self.config.limits.max_rate),
            deadline,
        ));
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

/// Forwards the proxies' events to the watcher within the bounds, until the deadline, the
/// bounds are spent, every proxy stream ended, or the watcher left; then stops the proxy
/// streams (dropping them ends the taps on the proxies).
async fn merge(
    mut merged: mpsc::Receiver<FromProxy>,
    out: mpsc::Sender<Result<TapEvent, Status>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    proxies: usize,
    mut bounds: StreamBounds,
    deadline: Instant,
) {
    let mut failures: Vec<String> = Vec::new();
    loop {
        let next = tokio::select! {
            next = merged.recv() => next,
            () = tokio::time::sleep_until(deadline.into()) => break,
            () = out.closed() => break,
        };
        match next {
            None => break,
            Some(FromProxy::Failed(reporter, error)) => {
                failures.push(format!("{reporter}: {error}"));
                if failures.len() == proxies {
                    // Not one proxy could be tapped: say why instead of an empty stream.
                    let _ = out
                        .send(Err(Status::unavailable(format!(
                            "no proxy could be tapped: {}",
                            failures.join("; ")
                        ))))
                        .await;
                    break;
                }
            }
            Some(FromProxy::Event(reporter, event)) => {
                if bounds.admit(&reporter, &event, Instant::now()) == Verdict::Send
                    && out.send(Ok(*event)).await.is_err()
                {
                    break;
                }
                if bounds.done() {
                    break;
                }
            }
        }
    }
    if bounds.skipped > 0 {
        tracing::debug!(
            skipped = bounds.skipped,
            "tap skipped requests over its rate"
        );
    }
    for task in tasks {
        task.abort();
    }
}

/// Streams one pod's tap into `tx` until it ends or `tx` closes.
async fn tap_pod(
    pod: &PodInfo,
    identity: Option<&ControllerIdentity>,
    config: TapConfig,
    request: ObserveRequest,
    tx: &mpsc::Sender<FromProxy>,
) -> Result<(), String> {
    let addr = SocketAddr::new(pod.ip(), config.admin_port);
    let channel = tokio::time::timeout(
        config.connect_timeout,
        connect(addr, pod.identity(), identity),
    )
    .await
    .map_err(|_| {
        format!(
            "no connection to {addr} within {:?}",
            config.connect_timeout
        )
    })??;
    let mut stream = TapClient::new(channel)
        .observe(request)
        .await
        .map_err(|status| describe(&status))?
        .into_inner();
    let reporter = format!("{}/{}", pod.namespace(), pod.name());
    let labels: HashMap<String, String> = [
        ("namespace".to_owned(), pod.namespace().to_owned()),
        (
            pod.workload_kind().to_owned(),
            pod.workload_name().to_owned(),
        ),
        ("pod".to_owned(), pod.name().to_owned()),
    ]
    .into();
    // Bounded by the proxy's own limits and the merge's deadline, which aborts this task.
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(()),
            Err(status) => return Err(describe(&status)),
        };
        let mut event = event;
        event.reporter = reporter.clone();
        // The reporting pod is the server of what it received and the client of what it sent.
        let side = if event.direction == api::Direction::Outbound as i32 {
            &mut event.source_labels
        } else {
            &mut event.destination_labels
        };
        for (key, value) in &labels {
            side.entry(key.clone()).or_insert_with(|| value.clone());
        }
        if tx
            .send(FromProxy::Event(reporter.clone(), Box::new(event)))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

/// A tonic status as a short reason; a proxy's 403 (a wrong identity) comes back as a
/// transport-level error naming it.
fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// A gRPC channel to a proxy's admin port at `addr`: mutual TLS as `identity` when given,
/// accepting only a proxy proving `expected` (the pod's SPIFFE ID); plaintext otherwise.
pub async fn connect(
    addr: SocketAddr,
    expected: Option<&str>,
    identity: Option<&ControllerIdentity>,
) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|error| error.to_string())?
        .tcp_nodelay(true);
    let (Some(identity), Some(expected)) = (identity, expected) else {
        return endpoint
            .connect()
            .await
            .map_err(|error| format!("{addr}: {error}"));
    };
    let config = identity
        .client_config(expected)
        .map_err(|error| error.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let server_name = tls::server_name(expected);
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            let stream = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connect)
        .await
        .map_err(|error| {
            let mut reason = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(inner) = source {
                reason = format!("{reason}: {inner}");
                source = inner.source();
            }
            format!("{addr}: {reason}")
        })
}
