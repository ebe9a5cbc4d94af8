//! Inbound authorization and rate limits enforced by a real server proxy, with identities
//! proven over mutual TLS and policies streamed by a (scripted) controller.

mod support;

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::policy::{self, authentication};
use mesh_proto::{destination, tap, tonic};
use support::ca::{ScriptedIdentity, TestCa};
use support::policy::ScriptedPolicy;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const BOOKS: &str = "books.shop.svc.cluster.local:8080";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BATCH_ID: &str = "spiffe://cluster.local/ns/shop/sa/batch";
const BOOKS_ID: &str = "spiffe://cluster.local/ns/shop/sa/books";

fn only(identities: &[&str]) -> policy::InboundServer {
    policy::InboundServer {
        name: "books-server".into(),
        authorizations: vec![policy::Authorization {
            name: "books-readers".into(),
            networks: vec![],
            authentication: Some(policy::Authentication {
                kind: Some(authentication::Kind::MeshTls(authentication::MeshTls {
                    identities: identities.iter().map(|s| s.to_string()).collect(),
                    identity_prefixes: vec![],
                })),
            }),
            routes: vec![],
        }],
        ..Default::default()
    }
}

struct Mesh {
    _destination: ScriptedDestination,
    controller: String,
    policy: ScriptedPolicy,
    server: mesh_proxy::app::Running,
    ca: Arc<TestCa>,
    identity_url: String,
    _backend: Backend,
    _stop: CancellationToken,
}

impl Mesh {
    async fn new(initial: policy::InboundServer, server_env: &[(&'static str, &str)]) -> Self {
        let stop = CancellationToken::new();
        let ca = Arc::new(TestCa::new("policy test"));
        let identity = ScriptedIdentity::new(ca.clone(), Duration::from_secs(3600));
        for (token, id) in [("web", WEB_ID), ("batch", BATCH_ID), ("books", BOOKS_ID)] {
            identity.allow(token, id);
        }
        let identity_url = identity.serve(stop.clone()).await;
        let policy = ScriptedPolicy::new(initial);
        let policy_url = policy.serve(stop.clone()).await;
        let server = proxy_env(
            Some(&policy_url),
            Some(TestIdentity {
                id: BOOKS_ID.into(),
                token: "books".into(),
                anchors_pem: ca.anchor_pem.clone(),
                service: identity_url.clone(),
            }),
            server_env,
        )
        .await;
        let backend = Backend::start("books").await;
        let destination = ScriptedDestination::default();
        let controller = destination.serve(stop.clone()).await;
        let mut endpoint = meshed(backend.addr, server.inbound_addr.port());
        endpoint.tls_identity = Some(destination::TlsIdentity {
            spiffe_id: BOOKS_ID.into(),
            server_name: String::new(),
        });
        destination.set(BOOKS, vec![endpoint]);
        Self {
            _destination: destination,
            controller,
            policy,
            server,
            ca,
            identity_url,
            _backend: backend,
            _stop: stop,
        }
    }

    /// A client proxy proving `id` with `token`; None for a client without identity.
    async fn client(&self, identity: Option<(&str, &str)>) -> mesh_proxy::app::Running {
        let identity = identity.map(|(id, token)| TestIdentity {
            id: id.into(),
            token: token.into(),
            anchors_pem: self.ca.anchor_pem.clone(),
            service: self.identity_url.clone(),
        });
        proxy_with(Some(&self.controller), identity).await
    }
}

async fn get(client: &mesh_proxy::app::Running, path: &str) -> String {
    curl(&[
        "-x",
        &format!("http://{}", client.outbound_addr),
        "--include",
        &format!("http://{BOOKS}{path}"),
    ])
    .await
}

#[tokio::test]
async fn only_the_authorized_identity_gets_through() {
    let mesh = Mesh::new(only(&[WEB_ID]), &[]).await;
    let web = mesh.client(Some((WEB_ID, "web"))).await;
    let batch = mesh.client(Some((BATCH_ID, "batch"))).await;

    // Unauthenticated clients reach a proxy with identity only through capture (it takes the
    // transport header only inside mesh TLS): `integration-tests/tests/hostile_pod.rs` sends
    // them from a real unmeshed pod.
    assert!(get(&web, "/").await.starts_with("HTTP/1.1 200"));
    for _ in 0..2 {
        let out = get(&batch, "/").await;
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(
            out.contains("mesh-error: unauthorized: policy books-server does not authorize"),
            "{out}"
        );
    }
    let (_, text) = admin_get(&mesh.server, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "inbound_http_authz_deny_total",
            &["policy=\"books-server\""]
        ),
        2.0,
        "{text}"
    );
}

/// A Server with two HTTPRoutes: `books-read` (GET under /books) open to any meshed client,
/// `books-admin` (/admin) to web only; the port-wide rule admits batch everywhere.
fn routed() -> policy::InboundServer {
    let prefix = |method: &str, path: &str| policy::RouteMatch {
        method: method.into(),
        path: Some(policy::PathMatch {
            kind: Some(policy::path_match::Kind::Prefix(path.into())),
        }),
        ..Default::default()
    };
    let rule = |name: &str, identities: &[&str], routes: &[&str]| policy::Authorization {
        name: name.into(),
        networks: vec![],
        authentication: Some(policy::Authentication {
            kind: Some(authentication::Kind::MeshTls(authentication::MeshTls {
                identities: identities.iter().map(|s| s.to_string()).collect(),
                identity_prefixes: vec![],
            })),
        }),
        routes: routes.iter().map(|s| s.to_string()).collect(),
    };
    policy::InboundServer {
        name: "books-server".into(),
        http_routes: vec![
            policy::InboundRoute {
                name: "books-read".into(),
                matches: vec![prefix("GET", "/books")],
            },
            policy::InboundRoute {
                name: "books-admin".into(),
                matches: vec![prefix("", "/admin")],
            },
        ],
        authorizations: vec![
            rule("readers", &["*"], &["books-read"]),
            rule("admins", &[WEB_ID], &["books-admin"]),
            rule("batch-everywhere", &[BATCH_ID], &[]),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn authorizations_on_routes_admit_only_their_routes() {
    let mesh = Mesh::new(routed(), &[]).await;
    let web = mesh.client(Some((WEB_ID, "web"))).await;
    let batch = mesh.client(Some((BATCH_ID, "batch"))).await;

    let status = |out: String| out.split(' ').nth(1).unwrap_or_default().to_owned();
    // (client, path, status): web reads and administers; batch's port-wide rule covers every
    // route.
    let cases = [
        (&web, "/books/1", "200"),
        (&web, "/admin/reindex", "200"),
        (&batch, "/books/1", "200"),
        (&batch, "/admin/reindex", "200"),
        (&web, "/elsewhere", "404"),
    ];
    for (client, path, want) in cases {
        let out = get(client, path).await;
        assert_eq!(status(out.clone()), want, "{path}: {out}");
    }
    // A client admitted on one route only is refused on the other, and told which route.
    mesh.policy.set(policy::InboundServer {
        authorizations: routed().authorizations[..2].to_vec(),
        ..routed()
    });
    let mut refused = String::new();
    for _ in 0..50 {
        let out = get(&batch, "/admin/reindex").await;
        if out.starts_with("HTTP/1.1 403") {
            refused = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused.contains(
            "does not authorize spiffe://cluster.local/ns/shop/sa/batch on route books-admin"
        ),
        "{refused}"
    );
    assert!(get(&batch, "/books/2").await.starts_with("HTTP/1.1 200"));
    let out = get(&web, "/nowhere").await;
    assert!(
        out.contains("mesh-error: no route: no HTTPRoute of books-server matches GET /nowhere"),
        "{out}"
    );
}

#[tokio::test]
async fn a_policy_change_applies_to_the_next_request() {
    let mesh = Mesh::new(only(&[WEB_ID, BATCH_ID]), &[]).await;
    let batch = mesh.client(Some((BATCH_ID, "batch"))).await;
    assert!(get(&batch, "/").await.starts_with("HTTP/1.1 200"));
    mesh.policy.set(only(&[WEB_ID]));
    let mut refused = false;
    for _ in 0..50 {
        if get(&batch, "/").await.starts_with("HTTP/1.1 403") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the narrower policy applies without a restart");
}

#[tokio::test]
async fn denied_grpc_calls_get_permission_denied() {
    let mesh = Mesh::new(only(&[WEB_ID]), &[]).await;
    let batch = mesh.client(Some((BATCH_ID, "batch"))).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", batch.outbound_addr))
            .expect("endpoint")
            .origin(format!("http://{BOOKS}").parse().expect("origin"))
            .connect()
            .await
            .expect("connect");
    let status = tap::tap_client::TapClient::new(channel)
        .observe(tap::ObserveRequest::default())
        .await
        .expect_err("denied");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("books-server"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn default_deny_closes_opaque_connections() {
    // No controller policy for the server: its default applies.
    let stop = CancellationToken::new();
    let server = proxy_env(None, None, &[("MESH_PROXY_DEFAULT_INBOUND_POLICY", "deny")]).await;
    let echo = loopback().await;
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    // Speak the transport header directly, marking the connection opaque.
    let mut stream = tokio::net::TcpStream::connect(server.inbound_addr)
        .await
        .expect("connect");
    let header = mesh_proxy::transport_header::TransportHeader {
        port: echo_addr.port(),
        opaque: true,
        name: String::new(),
        tunnel_to: None,
    };
    stream.write_all(&header.encode()).await.expect("header");
    stream.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "connection closed, got {read:?}"
    );
    let (_, text) = admin_get(&server, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "inbound_tcp_authz_deny_total",
            &["policy=\"default:deny\""]
        ),
        1.0,
        "{text}"
    );
    stop.cancel();
}

#[tokio::test]
async fn audit_mode_admits_but_counts() {
    let mut audited = only(&[WEB_ID]);
    audited.mode = policy::inbound_server::Mode::Audit as i32;
    let mesh = Mesh::new(audited, &[]).await;
    let batch = mesh.client(Some((BATCH_ID, "batch"))).await;
    for _ in 0..3 {
        assert!(get(&batch, "/").await.starts_with("HTTP/1.1 200"));
    }
    let (_, text) = admin_get(&mesh.server, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "inbound_authz_audit_total",
            &["policy=\"books-server\""]
        ),
        3.0,
        "{text}"
    );
}

#[tokio::test]
async fn rate_limited_requests_get_429_with_retry_after() {
    let mut limited = only(&[WEB_ID]);
    limited.rate_limit = Some(policy::RateLimit {
        name: "books-limit".into(),
        total_rps: 5,
        identity_rps: 0,
        overrides: vec![],
    });
    let mesh = Mesh::new(limited, &[]).await;
    let web = mesh.client(Some((WEB_ID, "web"))).await;
    let mut statuses = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..15 {
        let out = get(&web, "/").await;
        if out.starts_with("HTTP/1.1 429") {
            assert!(out.to_lowercase().contains("retry-after: 1"), "{out}");
            assert!(out.contains("mesh-error: rate limited"), "{out}");
        }
        statuses.push(out[9..12].to_string());
    }
    // A burst of 5, then 5 more per second the loop took.
    let allowed = 5 + (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    let ok = statuses.iter().filter(|s| *s == "200").count();
    let limited = statuses.iter().filter(|s| *s == "429").count();
    assert!(ok >= 5 && ok <= allowed, "{ok} allowed of {statuses:?}");
    assert!(limited >= 1, "{statuses:?}");
    assert_eq!(ok + limited, 15, "{statuses:?}");
}
