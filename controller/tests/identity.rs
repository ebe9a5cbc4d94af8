//! The identity CA end to end: the `Identity` service over tonic on 127.0.0.1:0 with a real
//! client, its leaves checked the way proxies will check them (rustls with ring), trust-anchor
//! rotation, and the TokenReview authenticator against a scripted API server.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_controller::identity::{
    AuthError, CertifyResult, GeneratedCa, IdentityConfig, IdentityMetrics, IdentityService,
    Issuer, ServiceAccountName, SharedIssuer, StaticTokens, TOKEN_ANNOTATION, TOKEN_AUDIENCE,
    TokenAuthenticator, TokenReviewAuthenticator, generate_issuer, generate_trust_anchor,
};
use mesh_proto::identity::identity_client::IdentityClient;
use mesh_proto::identity::{CertifyRequest, CertifyResponse};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const TRUST_DOMAIN: &str = "cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB_TOKEN: &[u8] = b"token-of-web";

fn service_account(namespace: &str, name: &str, token: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            annotations: Some(BTreeMap::from([(
                TOKEN_ANNOTATION.to_owned(),
                token.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    }
}

/// A CSR from a fresh P-256 key, as a proxy makes it; its requested name is ignored.
fn csr() -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key");
    let params = CertificateParams::new(vec!["ignored.example".to_owned()]).expect("params");
    let csr = params.serialize_request(&key).expect("serialise the CSR");
    (key, csr.der().to_vec())
}

/// The Identity service on 127.0.0.1:0 over `issuer`, with the file backend's tokens.
async fn serve(issuer: Issuer) -> (IdentityClient<Channel>, IdentityMetrics) {
    let metrics = IdentityMetrics::new();
    let tokens = StaticTokens::from_service_accounts(&[
        service_account(
            "shop",
            "web",
            std::str::from_utf8(WEB_TOKEN).expect("ASCII"),
        ),
        service_account("shop", "api", "token-of-api"),
    ]);
    let service = IdentityService::new(
        IdentityConfig::new(TRUST_DOMAIN),
        SharedIssuer::new(issuer, &metrics),
        Arc::new(tokens),
        metrics.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("local addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = IdentityClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the identity service");
    (client, metrics)
}

async fn certify(
    client: &mut IdentityClient<Channel>,
    identity: &str,
    token: &[u8],
    csr: Vec<u8>,
) -> Result<CertifyResponse, tonic::Status> {
    client
        .certify(CertifyRequest {
            identity: identity.to_owned(),
            token: token.to_vec(),
            certificate_signing_request: csr,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn roots(anchors: &[&str]) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for pem in anchors {
        let anchors = mesh_controller::identity::TrustAnchors::from_pem(pem).expect("anchors");
        for der in anchors.certificates() {
            roots.add(der.clone()).expect("a valid root");
        }
    }
    Arc::new(roots)
}

/// Verifies `leaf` + `intermediates` chain to `anchors` for both ends of a connection, as the
/// proxies' rustls will.
fn verify_chain(
    anchors: &[&str],
    leaf: &[u8],
    intermediates: &[Vec<u8>],
) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let leaf = CertificateDer::from(leaf.to_vec());
    let intermediates: Vec<CertificateDer<'static>> = intermediates
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let now = UnixTime::now();

    // As a client certificate: chain + clientAuth.
    WebPkiClientVerifier::builder_with_provider(roots(anchors), provider.clone())
        .build()
        .expect("client verifier")
        .verify_client_cert(&leaf, &intermediates, now)?;

    // As a server certificate: chain + serverAuth are checked before the name; a SPIFFE leaf
    // has no DNS name, so reaching the name check proves the rest passed.
    let server = WebPkiServerVerifier::builder_with_provider(roots(anchors), provider)
        .build()
        .expect("server verifier");
    let name = ServerName::try_from("web.shop.svc").expect("a DNS name");
    match server.verify_server_cert(&leaf, &intermediates, &name, &[], now) {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) => Ok(()),
        Ok(_) => panic!("a SPIFFE leaf must not be valid for a DNS name"),
        Err(other) => Err(other),
    }
}

#[tokio::test]
async fn a_proxy_gets_a_leaf_for_its_identity_that_chains_to_the_anchor() {
    let ca = GeneratedCa::generate(TRUST_DOMAIN, 365 * DAY, 30 * DAY).expect("generate CA");
    let (mut client, metrics) = serve(ca.load_issuer().expect("load issuer")).await;
    let (key, csr) = csr();
    let before = SystemTime::now();

    let response = certify(&mut client, WEB, WEB_TOKEN, csr)
        .await
        .expect("certified");

    verify_chain(
        &[&ca.trust_anchor.cert_pem],
        &response.leaf_certificate,
        &response.intermediate_certificates,
    )
    .expect("the leaf chains to the trust anchor");
    let (_, leaf) = X509Certificate::from_der(&response.leaf_certificate).expect("leaf parses");
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the leaf certifies the CSR's key"
    );
    let san = leaf
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN present");
    assert_eq!(san.value.general_names, vec![GeneralName::URI(WEB)]);
    let eku = leaf
        .extended_key_usage()
        .expect("EKU parses")
        .expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);

    let valid_until = response.valid_until.expect("valid_until set");
    assert_eq!(valid_until.seconds, leaf.validity().not_after.timestamp());
    let before_secs = before
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    let lifetime = u64::try_from(valid_until.seconds).expect("positive") - before_secs;
    assert!(
        (DAY.as_secs() - 2..=DAY.as_secs() + 2).contains(&lifetime),
        "24 h by default, got {lifetime} s"
    );
    let back_dated =
        before_secs - u64::try_from(leaf.validity().not_before.timestamp()).expect("positive");
    assert!((59..=62).contains(&back_dated), "back-dated a minute");
    assert_eq!(metrics.certify_count(CertifyResult::Ok), 1);
}

#[tokio::test]
async fn refusals_have_their_status_and_are_counted() {
    let ca = GeneratedCa::generate(TRUST_DOMAIN, 365 * DAY, 30 * DAY).expect("generate CA");
    let (mut client, metrics) = serve(ca.load_issuer().expect("load issuer")).await;

    // Another identity than the token's.
    let error = certify(&mut client, API, WEB_TOKEN, csr().1)
        .await
        .expect_err("web's token cannot get api's identity");
    assert_eq!(error.code(), Code::PermissionDenied);
    assert!(
        error.message().contains(WEB) && error.message().contains(API),
        "names both identities: {}",
        error.message()
    );

    // Another trust domain.
    let error = certify(
        &mut client,
        "spiffe://other.domain/ns/shop/sa/web",
        WEB_TOKEN,
        csr().1,
    )
    .await
    .expect_err("foreign trust domain");
    assert_eq!(error.code(), Code::PermissionDenied);

    // Unknown, empty tokens.
    for token in [&b"not-a-token"[..], b"", b"  \n"] {
        let error = certify(&mut client, WEB, token, csr().1)
            .await
            .expect_err("bad token");
        assert_eq!(error.code(), Code::Unauthenticated, "{}", error.message());
        assert!(!error.message().contains("not-a-token"), "echoes the token");
    }

    // Garbage CSR; a CSR whose signature does not verify; a malformed identity.
    let error = certify(&mut client, WEB, WEB_TOKEN, b"garbage".to_vec())
        .await
        .expect_err("garbage CSR");
    assert_eq!(error.code(), Code::InvalidArgument);
    let mut forged = csr().1;
    let last = forged.len() - 2;
    forged[last] ^= 0x01;
    let error = certify(&mut client, WEB, WEB_TOKEN, forged)
        .await
        .expect_err("forged CSR");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("signature"), "{}", error.message());
    let error = certify(
        &mut client,
        "spiffe://cluster.local/web",
        WEB_TOKEN,
        csr().1,
    )
    .await
    .expect_err("malformed identity");
    assert_eq!(error.code(), Code::InvalidArgument);

    // A trailing newline (a token read from a file) still authenticates.
    certify(&mut client, WEB, b"token-of-web\n", csr().1)
        .await
        .expect("a token with a trailing newline works");

    assert_eq!(metrics.certify_count(CertifyResult::Denied), 2);
    assert_eq!(metrics.certify_count(CertifyResult::Unauthenticated), 3);
    assert_eq!(metrics.certify_count(CertifyResult::Invalid), 3);
    assert_eq!(metrics.certify_count(CertifyResult::Ok), 1);
    assert_eq!(metrics.certify_count(CertifyResult::Error), 0);
}

#[tokio::test]
async fn a_bundle_of_old_and_new_anchors_verifies_leaves_of_both_issuers() {
    let old = GeneratedCa::generate(TRUST_DOMAIN, 365 * DAY, 30 * DAY).expect("old CA");
    let new_anchor = generate_trust_anchor(TRUST_DOMAIN, 365 * DAY).expect("new anchor");
    let new_issuer = generate_issuer(&new_anchor, TRUST_DOMAIN, 30 * DAY).expect("new issuer");
    let bundle = format!("{}{}", old.trust_anchor.cert_pem, new_anchor.cert_pem);

    // Both issuers load against the bundle, as the controller will mid-rotation.
    let old_issuer = Issuer::from_pem(&old.issuer.cert_pem, &old.issuer.key_pem, &bundle)
        .expect("old issuer loads against the bundle");
    let new_issuer = Issuer::from_pem(&new_issuer.cert_pem, &new_issuer.key_pem, &bundle)
        .expect("new issuer loads against the bundle");

    let identity = WEB.parse().expect("valid identity");
    for (issuer, own_anchor, other_anchor) in [
        (
            &old_issuer,
            &old.trust_anchor.cert_pem,
            &new_anchor.cert_pem,
        ),
        (
            &new_issuer,
            &new_anchor.cert_pem,
            &old.trust_anchor.cert_pem,
        ),
    ] {
        let leaf = issuer
            .certify(&identity, &csr().1, DAY)
            .expect("signs a leaf");
        let intermediates: Vec<Vec<u8>> = leaf.intermediates.iter().map(|d| d.to_vec()).collect();
        verify_chain(&[&bundle], &leaf.leaf, &intermediates).expect("the bundle verifies it");
        verify_chain(&[own_anchor], &leaf.leaf, &intermediates).expect("its anchor verifies it");
        assert!(
            verify_chain(&[other_anchor], &leaf.leaf, &intermediates).is_err(),
            "the other anchor alone does not"
        );
    }
}

/// A scripted API server answering TokenReviews: `good` is shop/web's token for the mesh's
/// audience, `other-audience` is valid only for another audience, `user` is a person's.
fn fake_api_server() -> kube::Client {
    let service = tower::service_fn(|request: http::Request<kube::client::Body>| async move {
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(
            request.uri().path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let body = request
            .into_body()
            .collect()
            .await
            .expect("read the request")
            .to_bytes();
        let review: TokenReview = serde_json::from_slice(&body).expect("a TokenReview");
        assert_eq!(
            review.spec.audiences.as_deref(),
            Some(&[TOKEN_AUDIENCE.to_owned()][..])
        );
        let authenticated = |username: &str, audiences: &[&str]| TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                ..UserInfo::default()
            }),
            error: None,
        };
        let status = match review.spec.token.as_deref() {
            Some("good") => authenticated("system:serviceaccount:shop:web", &[TOKEN_AUDIENCE]),
            Some("other-audience") => {
                authenticated("system:serviceaccount:shop:web", &["kubernetes"])
            }
            Some("user") => authenticated("alice", &[TOKEN_AUDIENCE]),
            _ => TokenReviewStatus {
                authenticated: Some(false),
                error: Some("token has expired".to_owned()),
                ..TokenReviewStatus::default()
            },
        };
        let answer = TokenReview {
            status: Some(status),
            ..review
        };
        let json = serde_json::to_string(&answer).expect("serialise");
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("content-type", "application/json")
                .body(json)
                .expect("a response"),
        )
    });
    kube::Client::new(service, "default")
}

#[tokio::test]
async fn token_reviews_map_service_account_tokens_to_identities() {
    let authenticator = TokenReviewAuthenticator::new(fake_api_server());
    assert_eq!(
        authenticator.authenticate(b"good").await,
        Ok(ServiceAccountName::new("shop", "web"))
    );
    for (token, why) in [
        (&b"expired"[..], "token has expired"),
        (b"other-audience", "audience"),
        (b"user", "not to a ServiceAccount"),
        (b"\xff\xfe", "UTF-8"),
    ] {
        match authenticator.authenticate(token).await {
            Err(AuthError::Rejected(reason)) => {
                assert!(reason.contains(why), "{reason:?} lacks {why:?}")
            }
            other => panic!("{why}: expected a rejection, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_not_unauthenticated() {
    let service = tower::service_fn(|_request: http::Request<kube::client::Body>| async {
        Ok::<_, Infallible>(
            http::Response::builder()
                .status(403)
                .header("content-type", "application/json")
                .body(
                    r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"forbidden","reason":"Forbidden","code":403}"#
                        .to_owned(),
                )
                .expect("a response"),
        )
    });
    let authenticator = TokenReviewAuthenticator::new(kube::Client::new(service, "default"));
    match authenticator.authenticate(b"good").await {
        Err(AuthError::Unavailable(reason)) => {
            assert!(reason.contains("tokenreviews"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}
