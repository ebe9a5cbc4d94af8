//! Certificates for the benchmark: one test CA signs the proxies' leaves (through a small
//! Identity service speaking the mesh's API) and HAProxy's server and client certificates, so
//! both meshes do mutual TLS 1.3 with ECDSA P-256 keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_proto::identity::{self, identity_server::Identity};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::{Request, Response, Status};

/// A trust anchor and the issuer below it.
pub struct TestCa {
    /// The anchor, PEM: what every party trusts.
    pub anchor_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A leaf certificate with its chain and key, PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The leaf followed by the issuer.
    pub chain_pem: String,
    /// The private key, PKCS#8.
    pub key_pem: String,
}

fn ca_params(cn: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after =
        now + time::Duration::seconds(i64::try_from(lifetime.as_secs()).unwrap_or(86_400));
}

impl TestCa {
    /// A new anchor and issuer.
    pub fn new() -> Result<Self> {
        let anchor =
            CertifiedIssuer::self_signed(ca_params("mesh-bench root")?, KeyPair::generate()?)
                .context("self-signing the anchor")?;
        let issuer = CertifiedIssuer::signed_by(
            ca_params("mesh-bench issuer")?,
            KeyPair::generate()?,
            &anchor,
        )
        .context("signing the issuer")?;
        Ok(Self {
            anchor_pem: anchor.pem(),
            issuer,
        })
    }

    /// A leaf for a DNS name, usable as TLS server and client (HAProxy's hops).
    pub fn leaf(&self, dns_name: &str) -> Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![dns_name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, dns_name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, Duration::from_secs(86_400));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a proxy's CSR for a SPIFFE identity: (leaf DER, issuer DER).
    pub fn sign_csr(&self, csr: &[u8], spiffe_id: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr.to_vec());
        let mut request = CertificateSigningRequestParams::from_der(&der).context("CSR")?;
        request.params.subject_alt_names = vec![SanType::URI(
            spiffe_id.to_string().try_into().context("URI SAN")?,
        )];
        request.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut request.params, Duration::from_secs(86_400));
        let leaf = request.signed_by(&self.issuer)?;
        Ok((leaf.der().to_vec(), self.issuer.der().to_vec()))
    }
}

/// The mesh's Identity API over the test CA: each token proves one SPIFFE ID.
#[derive(Debug, Clone)]
pub struct BenchIdentity {
    ca: Arc<TestCa>,
    tokens: Arc<Mutex<HashMap<Vec<u8>, String>>>,
}

impl BenchIdentity {
    /// An Identity service signing with `ca` and knowing no token yet.
    pub fn new(ca: Arc<TestCa>) -> Self {
        Self {
            ca,
            tokens: Arc::default(),
        }
    }

    /// Lets `token` prove `spiffe_id`.
    pub fn allow(&self, token: &str, spiffe_id: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(token.as_bytes().to_vec(), spiffe_id.to_string());
        }
    }

    /// Serves on 127.0.0.1:0 in this process until the runtime ends; returns the URL.
    pub async fn serve(&self) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(identity::identity_server::IdentityServer::new(self.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(format!("http://{addr}"))
    }
}

#[tonic::async_trait]
impl Identity for BenchIdentity {
    async fn certify(
        &self,
        request: Request<identity::CertifyRequest>,
    ) -> Result<Response<identity::CertifyResponse>, Status> {
        let request = request.into_inner();
        let proven = self
            .tokens
            .lock()
            .map_err(|_| Status::internal("token table poisoned"))?
            .get(&request.token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if proven != request.identity {
            return Err(Status::permission_denied("token is for another identity"));
        }
        let (leaf, issuer) = self
            .ca
            .sign_csr(&request.certificate_signing_request, &request.identity)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(Response::new(identity::CertifyResponse {
            leaf_certificate: leaf,
            intermediate_certificates: vec![issuer],
            valid_until: None,
        }))
    }
}
