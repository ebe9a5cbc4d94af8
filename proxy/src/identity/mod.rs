//! The proxy's own identity: a private key generated in memory at start (never sent anywhere),
//! and a certificate for it obtained from the controller's Identity service with the pod's
//! ServiceAccount token, renewed at about 70% of its lifetime.
//!
//! The current certificate is swapped atomically; handshakes in progress keep the one they
//! started with, and the old certificate keeps serving until a new one arrives. With an
//! identity cache (`cache.rs`, the proxy's own in-memory folder) the key and the last chain
//! survive a restart of the proxy, so it serves at once even while the controller is down.

mod cache;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use mesh_proto::identity::{CertifyRequest, identity_client::IdentityClient};
use mesh_proto::tonic::transport::Channel;
use mesh_spiffe::report::{CertificateReport, IdentityReport, IdentityState, Timestamp};
use rcgen::PublicKeyData;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// An identity problem.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The trust anchors PEM holds no usable certificate.
    #[error("trust anchors: {0}")]
    Anchors(String),
    /// Generating the key or CSR failed.
    #[error("generating the key or CSR: {0}")]
    Key(String),
    /// The token file can't be read.
    #[error("reading the identity token {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The controller refused or failed.
    #[error("identity service: {0}")]
    Service(String),
    /// The certificate returned is not usable for us.
    #[error("the issued certificate is not valid for {identity}: {reason}")]
    BadCertificate {
        /// Our identity.
        identity: String,
        /// What's wrong.
        reason: String,
    },
}

/// The trust anchors: the root store peers are verified with, and the certificates it was
/// made of (a root store keeps only names and keys; the admin API reports their expiry).
#[derive(Debug, Clone)]
pub struct TrustAnchors {
    /// What verification uses.
    pub roots: RootCertStore,
    /// The anchors' certificates, as given.
    pub certificates: Vec<CertificateDer<'static>>,
}

/// Parses a PEM bundle of trust anchors.
pub fn parse_trust_anchors(pem: &str) -> Result<TrustAnchors, IdentityError> {
    let mut roots = RootCertStore::empty();
    let mut reader = pem.as_bytes();
    let certificates = rustls_pemfile_certs(&mut reader)?;
    for cert in &certificates {
        roots
            .add(cert.clone())
            .map_err(|error| IdentityError::Anchors(error.to_string()))?;
    }
    if roots.is_empty() {
        return Err(IdentityError::Anchors(
            "no CERTIFICATE block in the PEM".into(),
        ));
    }
    Ok(TrustAnchors {
        roots,
        certificates,
    })
}

fn rustls_pemfile_certs(reader: &mut &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| IdentityError::Anchors(error.to_string()))
}

/// The renewal loop's last outcome, for the admin API.
#[derive(Debug, Default, Clone)]
struct Renewal {
    last: Option<SystemTime>,
    next: Option<SystemTime>,
    last_error: Option<String>,
}

/// The local identity and its current certificate.
pub struct Identity {
    id: String,
    roots: Arc<RootCertStore>,
    anchor_certificates: Vec<CertificateDer<'static>>,
    key: rcgen::KeyPair,
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    current: ArcSwapOption<CertifiedKey>,
    renewal: Mutex<Renewal>,
    ready: watch::Sender<bool>,
    /// Where the key and the current chain are kept across restarts, if anywhere.
    cache_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("certified", &self.current.load().is_some())
            .finish()
    }
}

impl Identity {
    /// The identity `id` under `anchors`. With a `cache_dir` holding a key and a chain that are
    /// still good (ours, chained to `anchors`, unexpired), it starts with them; otherwise it
    /// starts with a fresh ECDSA P-256 key and no certificate yet.
    pub fn new(
        id: String,
        anchors: TrustAnchors,
        cache_dir: Option<PathBuf>,
    ) -> Result<Self, IdentityError> {
        let cached = cache_dir.as_deref().and_then(|dir| match cache::load(dir) {
            Ok(cached) => cached,
            Err(error) => {
                warn!(%error, "ignoring the identity cache");
                None
            }
        });
        if let Some(cached) = cached {
            let identity =
                Self::with_key(id.clone(), anchors.clone(), cached.key, cache_dir.clone())?;
            let mut chain = cached.chain.into_iter().map(|cert| cert.to_vec());
            let leaf = chain.next().unwrap_or_default();
            match identity.install(leaf, chain.collect()) {
                Ok(expiry) => {
                    let remaining = expiry
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    info!(identity = %id, ?remaining, "serving with the certificate cached before this restart until a new one arrives");
                    return Ok(identity);
                }
                Err(error) => {
                    warn!(%error, "the cached certificate is not usable; waiting for a new one");
                }
            }
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|error| IdentityError::Key(error.to_string()))?;
        Self::with_key(id, anchors, key, cache_dir)
    }

    fn with_key(
        id: String,
        anchors: TrustAnchors,
        key: rcgen::KeyPair,
        cache_dir: Option<PathBuf>,
    ) -> Result<Self, IdentityError> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&der)
            .map_err(|error| IdentityError::Key(error.to_string()))?;
        Ok(Self {
            id,
            roots: Arc::new(anchors.roots),
            anchor_certificates: anchors.certificates,
            key,
            signing_key,
            current: ArcSwapOption::empty(),
            renewal: Mutex::default(),
            ready: watch::channel(false).0,
            cache_dir,
        })
    }

    /// The SPIFFE ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The trust anchors.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// How long the certificate in hand stays valid, if there is one.
    fn remaining(&self) -> Option<Duration> {
        let current = self.current.load_full()?;
        let leaf = current.cert.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let expiry = UNIX_EPOCH
            + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).ok()?);
        Some(
            expiry
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }

    /// Whether a certificate is in hand.
    pub fn is_certified(&self) -> bool {
        self.current.load().is_some()
    }

    /// Waits until a certificate is in hand.
    pub async fn certified(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// A DER CSR for our key; its subject is ignored by the CA.
    fn csr(&self) -> Result<Vec<u8>, IdentityError> {
        let params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|error| IdentityError::Key(error.to_string()))?;
        let csr = params
            .serialize_request(&self.key)
            .map_err(|error| IdentityError::Key(error.to_string()))?;
        Ok(csr.der().to_vec())
    }

    /// Checks an issued chain and makes it current; returns its expiry.
    pub fn install(
        &self,
        leaf: Vec<u8>,
        intermediates: Vec<Vec<u8>>,
    ) -> Result<SystemTime, IdentityError> {
        let bad = |reason: String| IdentityError::BadCertificate {
            identity: self.id.clone(),
            reason,
        };
        let leaf = CertificateDer::from(leaf);
        let intermediates: Vec<CertificateDer<'static>> = intermediates
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|error| bad(format!("unparsable: {error}")))?;
        if parsed.public_key().raw != self.key.subject_public_key_info().as_slice() {
            return Err(bad("it is for another key".into()));
        }
        match crate::tls::spiffe_id(&leaf) {
            Some(id) if id == self.id => {}
            other => return Err(bad(format!("it names {other:?}"))),
        }
        let expiry = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );
        let check = ParsedCertificate::try_from(&leaf).map_err(|error| bad(error.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &check,
            &self.roots,
            &intermediates,
            UnixTime::now(),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|error| bad(format!("it does not chain to the trust anchors: {error}")))?;
        let mut chain = vec![leaf];
        chain.extend(intermediates);
        self.current.store(Some(Arc::new(CertifiedKey::new(
            chain,
            self.signing_key.clone(),
        ))));
        self.ready.send_replace(true);
        self.renewal_mut().last = Some(SystemTime::now());
        Ok(expiry)
    }

    fn renewal_mut(&self) -> std::sync::MutexGuard<'_, Renewal> {
        // The renewal record is plain data: a panic elsewhere cannot leave it inconsistent.
        self.renewal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the admin API reports: the chain presented (public certificates only), the
    /// anchors, and the renewal's timing.
    pub fn report(&self) -> IdentityReport {
        let describe = |certs: &[CertificateDer<'_>]| -> Vec<CertificateReport> {
            certs
                .iter()
                // Every certificate here was parsed before it was accepted.
                .filter_map(|cert| CertificateReport::from_der(cert.as_ref()).ok())
                .collect()
        };
        let current = self.current.load_full();
        let renewal = self.renewal_mut().clone();
        IdentityReport {
            state: if current.is_some() {
                IdentityState::Certified
            } else {
                IdentityState::Pending
            },
            identity: Some(self.id.clone()),
            chain: current
                .as_deref()
                .map(|certified| describe(&certified.cert))
                .unwrap_or_default(),
            trust_anchors: describe(&self.anchor_certificates),
            last_renewal: renewal.last.map(Timestamp::from),
            next_renewal: renewal.next.map(Timestamp::from),
            last_error: renewal.last_error,
        }
    }

    /// Obtains a certificate once.
    async fn certify(
        &self,
        client: &mut IdentityClient<Channel>,
        token_file: &PathBuf,
    ) -> Result<SystemTime, IdentityError> {
        let token = tokio::fs::read(token_file)
            .await
            .map_err(|source| IdentityError::Token {
                path: token_file.clone(),
                source,
            })?;
        let response = client
            .certify(CertifyRequest {
                identity: self.id.clone(),
                token,
                certificate_signing_request: self.csr()?,
            })
            .await
            .map_err(|status| {
                IdentityError::Service(format!("{:?}: {}", status.code(), status.message()))
            })?
            .into_inner();
        let expiry = self.install(
            response.leaf_certificate,
            response.intermediate_certificates,
        )?;
        if let (Some(dir), Some(current)) = (&self.cache_dir, self.current.load_full())
            && let Err(error) = cache::store(dir, &self.key, &current.cert)
        {
            warn!(dir = %dir.display(), %error, "cannot keep the certificate in the identity cache");
        }
        Ok(expiry)
    }

    /// Keeps a valid certificate in hand forever: renews at 70% of each lifetime, retries
    /// failures with backoff (1 s doubling to 1 min) while the current one keeps serving.
    pub async fn run_renewal(
        self: Arc<Self>,
        mut client: IdentityClient<Channel>,
        token_file: PathBuf,
        metrics: Arc<Metrics>,
    ) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.certify(&mut client, &token_file).await {
                Ok(expiry) => {
                    backoff = Duration::from_secs(1);
                    metrics.identity_renewals.inc();
                    let expiry_unix = expiry
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    metrics
                        .identity_expiry
                        .set(i64::try_from(expiry_unix).unwrap_or(i64::MAX));
                    let remaining = expiry
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    let wait = remaining.mul_f64(0.7).max(Duration::from_secs(1));
                    {
                        let mut renewal = self.renewal_mut();
                        renewal.next = Some(SystemTime::now() + wait);
                        renewal.last_error = None;
                    }
                    info!(identity = %self.id, ?remaining, "certificate issued; renewing in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    metrics.identity_failures.inc();
                    // Closer to expiry, retries come faster: the certificate in hand must not
                    // run out while the backoff sleeps.
                    let wait = self
                        .remaining()
                        .map_or(backoff, |remaining| backoff.min(remaining / 8))
                        .max(Duration::from_secs(1));
                    warn!(identity = %self.id, %error, "certificate request failed; retrying in {wait:?}");
                    {
                        let mut renewal = self.renewal_mut();
                        renewal.next = Some(SystemTime::now() + wait);
                        renewal.last_error = Some(error.to_string());
                    }
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for Identity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl rustls::client::ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        self.is_certified()
    }
}
