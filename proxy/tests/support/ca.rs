//! A test certificate authority and a scripted Identity service that signs with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::identity::{self, identity_server::Identity};
use mesh_proto::tonic::{self, Request, Response, Status};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tokio_util::sync::CancellationToken;

/// A trust anchor and an intermediate issuer.
pub struct TestCa {
    /// The anchor, PEM.
    pub anchor_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let ca_params = |cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let anchor = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} root")),
            KeyPair::generate().expect("key"),
        )
        .expect("anchor");
        let issuer = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} issuer")),
            KeyPair::generate().expect("key"),
            &anchor,
        )
        .expect("issuer");
        Self {
            anchor_pem: anchor.pem(),
            issuer,
        }
    }

    /// Signs a CSR for `identity`, valid for `lifetime` from now.
    pub fn sign(&self, csr: &[u8], identity: &str, lifetime: Duration) -> (Vec<u8>, Vec<u8>) {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr.to_vec());
        let mut request = CertificateSigningRequestParams::from_der(&der).expect("valid CSR");
        request.params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().expect("URI SAN"),
        )];
        request.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        request.params.not_before = now - time::Duration::minutes(1);
        request.params.not_after = now + time::Duration::milliseconds(lifetime.as_millis() as i64);
        let leaf = request.signed_by(&self.issuer).expect("sign");
        (leaf.der().to_vec(), self.issuer.der().to_vec())
    }
}

/// An Identity service: each token proves one identity; certificates live `lifetime`.
#[derive(Clone)]
pub struct ScriptedIdentity {
    ca: Arc<TestCa>,
    tokens: Arc<Mutex<HashMap<Vec<u8>, String>>>,
    lifetime: Duration,
    /// Certificates issued so far.
    pub issued: Arc<AtomicUsize>,
}

impl ScriptedIdentity {
    pub fn new(ca: Arc<TestCa>, lifetime: Duration) -> Self {
        Self {
            ca,
            tokens: Arc::default(),
            lifetime,
            issued: Arc::default(),
        }
    }

    /// Lets `token` prove `identity`.
    pub fn allow(&self, token: &str, identity: &str) {
        self.tokens
            .lock()
            .expect("lock")
            .insert(token.as_bytes().to_vec(), identity.to_string());
    }

    pub async fn serve(&self, stop: CancellationToken) -> String {
        let listener = super::loopback().await;
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(identity::identity_server::IdentityServer::new(self.clone()))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                ),
        );
        format!("http://{addr}")
    }
}

#[tonic::async_trait]
impl Identity for ScriptedIdentity {
    async fn certify(
        &self,
        request: Request<identity::CertifyRequest>,
    ) -> Result<Response<identity::CertifyResponse>, Status> {
        let request = request.into_inner();
        let proven = self
            .tokens
            .lock()
            .expect("lock")
            .get(&request.token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if proven != request.identity {
            return Err(Status::permission_denied("token is for another identity"));
        }
        let (leaf, issuer) = self.ca.sign(
            &request.certificate_signing_request,
            &request.identity,
            self.lifetime,
        );
        self.issued.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(identity::CertifyResponse {
            leaf_certificate: leaf,
            intermediate_certificates: vec![issuer],
            valid_until: None,
        }))
    }
}

impl TestCa {
    /// A mesh TLS client configuration presenting `identity` (signed by this CA) and requiring
    /// the server to prove `server`: what another proxy or the controller's tap client presents.
    pub fn client_tls(&self, identity: &str, server: &str) -> Arc<rustls::ClientConfig> {
        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .serialize_request(&key)
            .expect("CSR");
        let (leaf, issuer) = self.sign(csr.der(), identity, Duration::from_secs(3600));
        let anchors = mesh_proxy::identity::parse_trust_anchors(&self.anchor_pem).expect("anchors");
        let provider = mesh_proxy::tls::provider();
        let verifier = mesh_spiffe::SpiffeServerVerifier::new(
            Arc::new(anchors.roots),
            server,
            provider.clone(),
        );
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(
                vec![leaf.into(), issuer.into()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("client certificate");
        config.alpn_protocols = vec![mesh_proxy::tls::ALPN_MESH.to_vec()];
        Arc::new(config)
    }
}

/// Stand-ins for the controller in mesh-TLS tests: a test CA, an Identity service that knows
/// the tokens it was given, and a Destination service.
pub struct IdentityMesh {
    pub destination: super::ScriptedDestination,
    pub identity: ScriptedIdentity,
    pub identity_url: String,
    pub ca: Arc<TestCa>,
    /// The Destination service's URL.
    pub controller: String,
    /// Stops the Identity service (the Destination service keeps running).
    pub identity_stop: CancellationToken,
    _stop: CancellationToken,
}

impl IdentityMesh {
    /// Certificates live `lifetime`; each `(token, identity)` pair is accepted.
    pub async fn new(lifetime: Duration, tokens: &[(&str, &str)]) -> Self {
        let stop = CancellationToken::new();
        let identity_stop = CancellationToken::new();
        let ca = Arc::new(TestCa::new("mesh test"));
        let identity = ScriptedIdentity::new(ca.clone(), lifetime);
        for (token, id) in tokens {
            identity.allow(token, id);
        }
        let identity_url = identity.serve(identity_stop.clone()).await;
        let destination = super::ScriptedDestination::default();
        let controller = destination.serve(stop.clone()).await;
        Self {
            destination,
            identity,
            identity_url,
            ca,
            controller,
            identity_stop,
            _stop: stop,
        }
    }

    /// How a proxy proves `id` with `token` here.
    pub fn identity(&self, id: &str, token: &str) -> super::TestIdentity {
        super::TestIdentity {
            id: id.to_string(),
            token: token.to_string(),
            anchors_pem: self.ca.anchor_pem.clone(),
            service: self.identity_url.clone(),
        }
    }

    /// `authority` is one meshed endpoint: `addr`, behind the proxy `server`, which must prove
    /// `identity`.
    pub fn meshed_endpoint(
        &self,
        authority: &str,
        addr: std::net::SocketAddr,
        server: &mesh_proxy::app::Running,
        identity: &str,
    ) {
        let mut endpoint = super::meshed(addr, server.inbound_addr.port());
        endpoint.tls_identity = Some(mesh_proto::destination::TlsIdentity {
            spiffe_id: identity.to_string(),
            server_name: String::new(),
        });
        self.destination.set(authority, vec![endpoint]);
    }
}
