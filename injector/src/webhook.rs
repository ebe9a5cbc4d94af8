//! The admission webhook: AdmissionReview v1 at `POST /inject` over HTTPS (rustls), answering
//! with a JSONPatch computed by [`crate::inject()`]; `/ready`, `/live` and `/metrics` beside it.
//!
//! The rules it keeps:
//! - It never panics on a request and never blocks for long: the namespace read is bounded by
//!   [`NAMESPACE_READ_TIMEOUT`], well under the API server's 10 s webhook timeout.
//! - A bad annotation denies the pod (`allowed: false`, the message names the annotation and
//!   the value). Anything else that goes wrong (the namespace cannot be read) admits the pod
//!   unchanged, as `failurePolicy: Ignore` would if the webhook were down.
//! - The server takes a bound listener, so tests serve on 127.0.0.1:0.
//! - The serving certificate comes from files and is re-read when they change
//!   ([`ReloadingCertificate`]), so a rotated Secret needs no restart.
//!
//! It owns no Kubernetes client of its own: namespace annotations come through a
//! [`NamespaceSource`].

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::MeshConfig;
use crate::inject::{Outcome, inject};
use crate::metrics::{AdmissionResult, Metrics};

/// How long reading a namespace's annotations may take before the pod is admitted unchanged.
pub const NAMESPACE_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may finish their requests once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server caps objects near 3 MiB; an AdmissionReview wraps one pod, maybe twice.
const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;

/// A future returned by a [`NamespaceSource`].
pub type NamespaceFuture<'a> =
    Pin<Box<dyn Future<Output = Result<BTreeMap<String, String>, String>> + Send + 'a>>;

/// Where the webhook reads a namespace's annotations.
pub trait NamespaceSource: Send + Sync + 'static {
    /// The annotations of `namespace` (empty when it has none), or why they cannot be read.
    fn annotations<'a>(&'a self, namespace: &'a str) -> NamespaceFuture<'a>;
}

/// Namespaces from a fixed map; an unknown namespace has no annotations. For tests and for
/// callers that already hold the namespaces.
#[derive(Debug, Clone, Default)]
pub struct StaticNamespaces(pub BTreeMap<String, BTreeMap<String, String>>);

impl NamespaceSource for StaticNamespaces {
    fn annotations<'a>(&'a self, namespace: &'a str) -> NamespaceFuture<'a> {
        let annotations = self.0.get(namespace).cloned().unwrap_or_default();
        Box::pin(async move { Ok(annotations) })
    }
}

/// Namespaces read from the API server, one metadata GET per admission request (pods are
/// created seldom enough; a cache would add a staleness window for `mesh.dev/inject`).
#[derive(Clone)]
pub struct KubeNamespaces {
    api: kube::Api<Namespace>,
}

impl std::fmt::Debug for KubeNamespaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeNamespaces").finish_non_exhaustive()
    }
}

impl KubeNamespaces {
    /// Reads namespaces through `client` (needs `get` on namespaces).
    pub fn new(client: kube::Client) -> Self {
        KubeNamespaces {
            api: kube::Api::all(client),
        }
    }
}

impl NamespaceSource for KubeNamespaces {
    fn annotations<'a>(&'a self, namespace: &'a str) -> NamespaceFuture<'a> {
        Box::pin(async move {
            let meta = self
                .api
                .get_metadata(namespace)
                .await
                .map_err(|error| format!("cannot read namespace {namespace:?}: {error}"))?;
            Ok(meta.metadata.annotations.unwrap_or_default())
        })
    }
}

/// The webhook's state: the mesh configuration, where namespaces come from, and metrics.
#[derive(Clone)]
pub struct Webhook {
    config: Arc<MeshConfig>,
    namespaces: Arc<dyn NamespaceSource>,
    namespace_timeout: Duration,
    metrics: Metrics,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// A webhook injecting with `config`, reading namespaces from `namespaces`.
    pub fn new(config: MeshConfig, namespaces: impl NamespaceSource, metrics: Metrics) -> Self {
        Webhook {
            config: Arc::new(config),
            namespaces: Arc::new(namespaces),
            namespace_timeout: NAMESPACE_READ_TIMEOUT,
            metrics,
        }
    }

    /// Bounds namespace reads by `timeout` instead of [`NAMESPACE_READ_TIMEOUT`].
    pub fn with_namespace_timeout(mut self, timeout: Duration) -> Self {
        self.namespace_timeout = timeout;
        self
    }

    /// The metrics this webhook counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one AdmissionReview (the request body), counting the result. `Err` is a body
    /// that is not an AdmissionReview at all.
    pub async fn review(&self, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, String> {
        let started = Instant::now();
        let answer = self.answer(body).await;
        let result = match &answer {
            Ok((_, result)) => *result,
            Err(_) => AdmissionResult::Invalid,
        };
        self.metrics.observe(result, started.elapsed());
        answer.map(|(response, _)| response.into_review())
    }

    async fn answer(&self, body: &[u8]) -> Result<(AdmissionResponse, AdmissionResult), String> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
            .map_err(|error| format!("not an AdmissionReview: {error}"))?;
        let request: AdmissionRequest<DynamicObject> = review
            .try_into()
            .map_err(|_| "an AdmissionReview without a request".to_owned())?;
        let allowed = AdmissionResponse::from(&request);
        let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
        if !is_pod || request.operation != Operation::Create || request.sub_resource.is_some() {
            return Ok((allowed, AdmissionResult::Skipped));
        }
        let Some(object) = &request.object else {
            return Ok((allowed, AdmissionResult::Skipped));
        };
        let mut pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
            Ok(pod) => pod,
            Err(error) => {
                let message = format!("the object is not a Pod: {error}");
                return Ok((allowed.deny(message), AdmissionResult::Denied));
            }
        };
        // A pod created in a namespace may not say so itself (no namespace, or an empty one,
        // which the API server fills in); the request does.
        if pod.metadata.namespace.as_deref().is_none_or(str::is_empty)
            && request.namespace.is_some()
        {
            pod.metadata.namespace = request.namespace.clone();
        }
        let pod_name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let namespace_annotations = match tokio::time::timeout(
            self.namespace_timeout,
            self.namespaces.annotations(&namespace),
        )
        .await
        {
            Ok(Ok(annotations)) => annotations,
            Ok(Err(error)) => {
                return Ok(self.admit_unchanged(allowed, &namespace, &pod_name, error));
            }
            Err(_elapsed) => {
                let error = format!(
                    "reading namespace {namespace:?} took over {:?}",
                    self.namespace_timeout
                );
                return Ok(self.admit_unchanged(allowed, &namespace, &pod_name, error));
            }
        };
        match inject(&pod, &namespace_annotations, &self.config) {
            Ok(Outcome::Injected(injected)) => {
                let before = serde_json::to_value(&pod);
                let after = serde_json::to_value(&injected);
                let patch = match (before, after) {
                    (Ok(before), Ok(after)) => json_patch::diff(&before, &after),
                    (Err(error), _) | (_, Err(error)) => {
                        let error = format!("cannot encode the pod: {error}");
                        return Ok(self.admit_unchanged(allowed, &namespace, &pod_name, error));
                    }
                };
                match allowed.clone().with_patch(patch) {
                    Ok(response) => {
                        tracing::info!(%namespace, pod = %pod_name, "injected");
                        Ok((response, AdmissionResult::Injected))
                    }
                    Err(error) => {
                        let error = format!("cannot encode the patch: {error}");
                        Ok(self.admit_unchanged(allowed, &namespace, &pod_name, error))
                    }
                }
            }
            Ok(Outcome::Skipped(reason)) => {
                tracing::debug!(%namespace, pod = %pod_name, %reason, "not injected");
                Ok((allowed, AdmissionResult::Skipped))
            }
            Err(error) => {
                tracing::warn!(%namespace, pod = %pod_name, %error, "refused");
                let message = format!("mesh injection: {error}");
                Ok((allowed.deny(message), AdmissionResult::Denied))
            }
        }
    }

    /// Admits the pod without the mesh, as if the webhook were down, and says why.
    fn admit_unchanged(
        &self,
        mut allowed: AdmissionResponse,
        namespace: &str,
        pod: &str,
        error: String,
    ) -> (AdmissionResponse, AdmissionResult) {
        tracing::warn!(%namespace, %pod, %error, "admitted without injection");
        allowed.warnings = Some(vec![format!("mesh injection skipped: {error}")]);
        (allowed, AdmissionResult::Error)
    }
}

/// The webhook's routes: `POST /inject`, and the admin routes.
pub fn router(webhook: Webhook) -> Router {
    admin_router(webhook.metrics.clone()).merge(
        Router::new()
            .route("/inject", post(inject_handler))
            .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
            .with_state(webhook),
    )
}

/// `/ready`, `/live` and `/metrics`, for a plain-HTTP admin listener too.
pub fn admin_router(metrics: Metrics) -> Router {
    Router::new()
        .route("/ready", get(|| async { "ready\n" }))
        .route("/live", get(|| async { "live\n" }))
        .route(
            "/metrics",
            get(|State(metrics): State<Metrics>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }),
        )
        .with_state(metrics)
}

async fn inject_handler(State(webhook): State<Webhook>, body: Bytes) -> Response {
    match webhook.review(&body).await {
        Ok(review) => match serde_json::to_vec(&review) {
            Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
            Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
        },
        Err(error) => (StatusCode::BAD_REQUEST, error).into_response(),
    }
}

/// A serving certificate that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file holds no usable certificate.
    #[error("{path}: {reason}")]
    Certificate {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key file holds no usable private key.
    #[error("{path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("the certificate and key cannot serve TLS: {0}")]
    Config(#[from] rustls::Error),
}

/// The TLS server configuration from a PEM certificate chain and a PEM private key.
pub fn tls_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = certified_key(cert_pem, key_pem, "(certificate)", "(key)", &provider)?;
    server_config(provider, Arc::new(FixedCertificate(Arc::new(key))))
}

/// The TLS server configuration from the files given as `--tls-cert` and `--tls-key`, re-read
/// when they change (see [`ReloadingCertificate`]).
pub fn tls_config_from_files(
    cert_path: &Path,
    key_path: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCertificate::load(cert_path, key_path, provider.clone())?;
    server_config(provider, Arc::new(resolver))
}

fn server_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // The router speaks HTTP/1.1; the API server's webhook client falls back to it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Certificate {
            path: cert_name.to_owned(),
            reason: format!("not PEM certificates: {error}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cert_name.to_owned(),
            reason: "no certificate in it".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| TlsError::Key {
        path: key_name.to_owned(),
        reason: format!("no PEM private key: {error}"),
    })?;
    Ok(CertifiedKey::from_der(certs, key, provider)?)
}

/// One certificate, always.
#[derive(Debug)]
struct FixedCertificate(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// How often a handshake may look at the certificate files for changes.
pub const CERTIFICATE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// The serving certificate from files, re-read when their contents change, so a rotated
/// certificate (a renewed Secret, cert-manager) is served without a restart. A
/// rotation that cannot be loaded (half-written files, a key that does not match) keeps the
/// previous certificate and is retried at the next check.
#[derive(Debug)]
pub struct ReloadingCertificate {
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    check_interval: Duration,
    loaded: std::sync::Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' contents the key was built from. Contents, not modification times: those
    /// are coarse on some filesystems, and a Secret volume swaps a symlink.
    pem: PemFiles,
    checked: Instant,
}

/// The contents of the certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PemFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl ReloadingCertificate {
    /// Loads the certificate and key, failing when they cannot serve TLS.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let pem = read_pem_files(cert_path, key_path)?;
        let key = certified_key_from_files(&pem, cert_path, key_path, &provider)?;
        Ok(ReloadingCertificate {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            check_interval: CERTIFICATE_CHECK_INTERVAL,
            loaded: std::sync::Mutex::new(Loaded {
                key: Arc::new(key),
                pem,
                checked: Instant::now(),
            }),
        })
    }

    /// Looks at the files at most once per `interval` (tests use zero).
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// The certificate to serve now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        // A panic elsewhere while holding the lock leaves valid data: keep serving it.
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if loaded.checked.elapsed() >= self.check_interval {
            loaded.checked = Instant::now();
            let changed = read_pem_files(&self.cert_path, &self.key_path)
                .ok()
                .filter(|pem| *pem != loaded.pem);
            if let Some(pem) = changed {
                match certified_key_from_files(
                    &pem,
                    &self.cert_path,
                    &self.key_path,
                    &self.provider,
                ) {
                    Ok(key) => {
                        tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded");
                        loaded.key = Arc::new(key);
                        loaded.pem = pem;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the changed serving certificate cannot be used; keeping the previous one");
                    }
                }
            }
        }
        loaded.key.clone()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read_pem_files(cert_path: &Path, key_path: &Path) -> Result<PemFiles, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| (path.display().to_string(), error.to_string()))
    };
    Ok(PemFiles {
        cert: read(cert_path).map_err(|(path, reason)| TlsError::Certificate { path, reason })?,
        key: read(key_path).map_err(|(path, reason)| TlsError::Key { path, reason })?,
    })
}

fn certified_key_from_files(
    pem: &PemFiles,
    cert_path: &Path,
    key_path: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    certified_key(
        &pem.cert,
        &pem.key,
        &cert_path.display().to_string(),
        &key_path.display().to_string(),
        provider,
    )
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then lets open
/// connections finish (bounded).
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_elapsed) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
