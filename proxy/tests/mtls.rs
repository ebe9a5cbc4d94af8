//! Mutual TLS between real proxies with identities from a (scripted) Identity service:
//! verified identities both ways, impostors refused, renewal under traffic.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use support::ca::{IdentityMesh, ScriptedIdentity, TestCa};
use support::*;
use tokio_util::sync::CancellationToken;

const BOOKS: &str = "books.shop.svc.cluster.local:8080";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BOOKS_ID: &str = "spiffe://cluster.local/ns/shop/sa/books";

async fn setup(lifetime: Duration) -> IdentityMesh {
    IdentityMesh::new(
        lifetime,
        &[("web-token", WEB_ID), ("books-token", BOOKS_ID)],
    )
    .await
}

/// BOOKS is `backend`, behind `server`, which must prove `identity`.
fn books(
    setup: &IdentityMesh,
    backend: &Backend,
    server: &mesh_proxy::app::Running,
    identity: &str,
) {
    setup.meshed_endpoint(BOOKS, backend.addr, server, identity);
}

#[tokio::test]
async fn proxies_authenticate_each_other_and_label_the_identities() {
    let setup = setup(Duration::from_secs(3600)).await;
    let client = proxy_with(
        Some(&setup.controller),
        Some(setup.identity(WEB_ID, "web-token")),
    )
    .await;
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    assert_eq!(admin_get(&client, "/ready").await.0, StatusCode::OK);
    let backend = Backend::start("books").await;
    books(&setup, &backend, &server, BOOKS_ID);

    for _ in 0..5 {
        let body = curl(&[
            "-x",
            &format!("http://{}", client.outbound_addr),
            &format!("http://{BOOKS}/secure"),
        ])
        .await;
        assert!(body.starts_with("backend=books"), "{body}");
    }
    let (_, text) = admin_get(&client, "/metrics").await;
    let server_id = format!("server_id=\"{BOOKS_ID}\"");
    assert_eq!(
        metric(&text, "request_total", &["tls=\"true\"", &server_id]),
        5.0,
        "{text}"
    );
    assert!(metric(&text, "identity_cert_expiry_timestamp_seconds", &[]) > 1.7e9);
    let (_, text) = admin_get(&server, "/metrics").await;
    let client_id = format!("client_id=\"{WEB_ID}\"");
    assert_eq!(
        metric(
            &text,
            "request_total",
            &["direction=\"inbound\"", "tls=\"true\"", &client_id]
        ),
        5.0,
        "{text}"
    );
}

#[tokio::test]
async fn an_impostor_endpoint_is_refused_by_the_client_proxy() {
    let setup = setup(Duration::from_secs(3600)).await;
    let client = proxy_with(
        Some(&setup.controller),
        Some(setup.identity(WEB_ID, "web-token")),
    )
    .await;
    // The server proves `books`, but discovery says the endpoint must be `payments`.
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    let backend = Backend::start("books").await;
    books(
        &setup,
        &backend,
        &server,
        "spiffe://cluster.local/ns/shop/sa/payments",
    );
    let out = curl(&[
        "-x",
        &format!("http://{}", client.outbound_addr),
        "--include",
        &format!("http://{BOOKS}/"),
    ])
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(
        out.contains("server identity is spiffe://cluster.local/ns/shop/sa/books"),
        "{out}"
    );
}

#[tokio::test]
async fn a_client_from_another_trust_domain_is_refused_by_the_server_proxy() {
    let setup = setup(Duration::from_secs(3600)).await;
    // A second CA: the client trusts both anchors (so it accepts the server), but its own
    // certificate comes from the CA the server does not trust.
    let other = Arc::new(TestCa::new("other"));
    let other_identity = ScriptedIdentity::new(other.clone(), Duration::from_secs(3600));
    other_identity.allow("web-token", WEB_ID);
    let stop = CancellationToken::new();
    let other_url = other_identity.serve(stop.clone()).await;
    let client = proxy_with(
        Some(&setup.controller),
        Some(TestIdentity {
            id: WEB_ID.into(),
            token: "web-token".into(),
            anchors_pem: format!("{}{}", setup.ca.anchor_pem, other.anchor_pem),
            service: other_url,
        }),
    )
    .await;
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    let backend = Backend::start("books").await;
    books(&setup, &backend, &server, BOOKS_ID);
    let out = curl(&[
        "-x",
        &format!("http://{}", client.outbound_addr),
        "--include",
        &format!("http://{BOOKS}/"),
    ])
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    let (_, text) = admin_get(&server, "/metrics").await;
    assert!(
        metric(&text, "proxy_error_total", &["TLS handshake failed"]) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn certificates_renew_under_traffic_without_failed_requests() {
    // Three-second certificates: renewed about every two seconds.
    let setup = setup(Duration::from_secs(3)).await;
    let client = proxy_with(
        Some(&setup.controller),
        Some(setup.identity(WEB_ID, "web-token")),
    )
    .await;
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    let backend = Backend::start("books").await;
    books(&setup, &backend, &server, BOOKS_ID);
    let issued_before = setup.identity.issued.load(Ordering::SeqCst);

    let proxy_url = format!("http://{}", client.outbound_addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut requests = 0;
    while tokio::time::Instant::now() < deadline {
        // A new connection each time, so each request makes a fresh handshake.
        let body = curl(&["-x", &proxy_url, &format!("http://{BOOKS}/renew")]).await;
        assert!(
            body.starts_with("backend=books"),
            "request {requests}: {body}"
        );
        requests += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let renewals = setup.identity.issued.load(Ordering::SeqCst) - issued_before;
    assert!(requests > 20, "{requests}");
    assert!(
        renewals >= 2,
        "both proxies renewed at least once: {renewals}"
    );
}

#[tokio::test]
async fn a_proxy_is_not_ready_until_it_holds_a_certificate() {
    let setup = setup(Duration::from_secs(3600)).await;
    // A token the identity service does not accept: no certificate, never ready.
    let proxy = proxy_with(None, Some(setup.identity(WEB_ID, "wrong-token"))).await;
    assert_eq!(
        admin_get(&proxy, "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (_, text) = admin_get(&proxy, "/metrics").await;
    assert!(metric(&text, "identity_cert_renewal_failures_total", &[]) >= 1.0);
}

#[tokio::test]
async fn the_admin_api_reports_the_issued_chain_and_never_the_key() {
    use mesh_spiffe::report::{IdentityReport, IdentityState};

    let setup = setup(Duration::from_secs(3600)).await;
    let proxy = proxy_with(None, Some(setup.identity(WEB_ID, "web-token"))).await;
    let (status, body) = admin_get(&proxy, "/identity").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Public certificates only: every PEM block is a certificate, nothing names a key.
    assert_eq!(
        body.matches("-----BEGIN ").count(),
        body.matches("-----BEGIN CERTIFICATE-----").count(),
        "{body}"
    );
    assert!(!body.to_ascii_lowercase().contains("key\""), "{body}");
    let report: IdentityReport = serde_json::from_str(&body).expect("an identity report");
    assert_eq!(report.state, IdentityState::Certified);
    assert_eq!(report.identity.as_deref(), Some(WEB_ID));
    let [leaf, issuer] = report.chain.as_slice() else {
        panic!("leaf and issuer expected: {body}");
    };
    assert_eq!(leaf.spiffe_id.as_deref(), Some(WEB_ID));
    assert_eq!(leaf.issuer, "CN=mesh test issuer");
    // The test CA backdates by a minute.
    assert_eq!(leaf.not_after.0 - leaf.not_before.0, 3600 + 60);
    assert_eq!(issuer.subject, "CN=mesh test issuer");
    assert_eq!(issuer.issuer, "CN=mesh test root");
    assert_eq!(report.trust_anchors.len(), 1, "{body}");
    assert_eq!(report.trust_anchors[0].subject, "CN=mesh test root");
    assert_eq!(
        report.trust_anchors[0].pem.trim(),
        setup.ca.anchor_pem.trim()
    );
    let last = report.last_renewal.expect("renewed once");
    let next = report.next_renewal.expect("renewal scheduled");
    // Renewal at about 70% of the hour.
    assert!((2400..=2600).contains(&(next.0 - last.0)), "{body}");
    assert_eq!(report.last_error, None);

    // Without identity: a 404 that still says why, in the same shape.
    let plain = proxy_with(None, None).await;
    let (status, body) = admin_get(&plain, "/identity").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let report: IdentityReport = serde_json::from_str(&body).expect("an identity report");
    assert_eq!(report.state, IdentityState::Disabled);
    assert!(report.chain.is_empty());
}
