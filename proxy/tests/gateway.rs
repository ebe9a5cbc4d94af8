//! The multicluster gateway between real proxies: a client proxy reaches an endpoint of
//! another cluster through that cluster's gateway, with mutual TLS end to end (the endpoint's
//! proxy sees the client's identity, the client verifies the endpoint's, not the gateway's);
//! the gateway refuses clients without a mesh identity and targets that are not meshed
//! proxies, and a proxy that is not a gateway refuses to relay at all.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::destination;
use mesh_proxy::gateway::NOT_A_MESHED_PROXY;
use mesh_proxy::transport_header::TransportHeader;
use support::ca::IdentityMesh;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOOKS: &str = "books.shop.svc.cluster.local:8080";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BOOKS_ID: &str = "spiffe://cluster.local/ns/shop/sa/books";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/mesh-system/sa/mesh-gateway";

struct Clusters {
    setup: IdentityMesh,
    client: mesh_proxy::app::Running,
    server: mesh_proxy::app::Running,
    gateway: mesh_proxy::app::Running,
    backend: Backend,
}

/// A client proxy here; in the other cluster, books' proxy and backend and the gateway.
/// Discovery says BOOKS is behind the gateway, and knows books' proxy as a meshed pod.
async fn clusters() -> Clusters {
    let setup = IdentityMesh::new(
        Duration::from_secs(3600),
        &[
            ("web-token", WEB_ID),
            ("books-token", BOOKS_ID),
            ("gateway-token", GATEWAY_ID),
        ],
    )
    .await;
    let client = proxy_with(
        Some(&setup.controller),
        Some(setup.identity(WEB_ID, "web-token")),
    )
    .await;
    let server = proxy_with(None, Some(setup.identity(BOOKS_ID, "books-token"))).await;
    let gateway = proxy_env(
        Some(&setup.controller),
        Some(setup.identity(GATEWAY_ID, "gateway-token")),
        &[("MESH_PROXY_GATEWAY", "true")],
    )
    .await;
    let backend = Backend::start("books").await;
    let identity = |id: &str| destination::TlsIdentity {
        spiffe_id: id.to_owned(),
        server_name: String::new(),
    };
    let mut endpoint = meshed(backend.addr, server.inbound_addr.port());
    endpoint.tls_identity = Some(identity(BOOKS_ID));
    endpoint.gateway = Some(destination::Gateway {
        addr: Some(gateway.inbound_addr.into()),
        tls_identity: Some(identity(GATEWAY_ID)),
        cluster: "east".to_owned(),
    });
    setup.destination.set(BOOKS, vec![endpoint]);
    // The other cluster's controller, asked by the gateway about the proxy's address: a pod
    // IP is the pod itself, meshed, with its proxy's inbound port.
    let mut pod = meshed(server.inbound_addr, server.inbound_addr.port());
    pod.tls_identity = Some(identity(BOOKS_ID));
    setup
        .destination
        .set(&server.inbound_addr.to_string(), vec![pod]);
    setup
        .destination
        .set(&backend.addr.to_string(), vec![plain(backend.addr)]);
    Clusters {
        setup,
        client,
        server,
        gateway,
        backend,
    }
}

fn tunnel_header(to: SocketAddr) -> Vec<u8> {
    TransportHeader {
        port: to.port(),
        opaque: true,
        name: String::new(),
        tunnel_to: Some(to.ip()),
    }
    .encode()
}

/// Connects to `proxy` with mutual TLS as WEB_ID (requiring `server_id`), sends a tunnel
/// header to `to`, then `hello`; whether the connection is closed without an answer.
async fn tunnel_refused(
    clusters: &Clusters,
    proxy: SocketAddr,
    server_id: &str,
    to: SocketAddr,
) -> bool {
    let config = clusters.setup.ca.client_tls(WEB_ID, server_id);
    let connector = tokio_rustls::TlsConnector::from(config);
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let mut tls = connector
        .connect(mesh_proxy::tls::server_name(server_id), stream)
        .await
        .expect("mutual TLS with the proxy");
    tls.write_all(&tunnel_header(to)).await.expect("header");
    let _ = tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    read.is_ok() && answer.is_empty()
}

#[tokio::test]
async fn a_remote_endpoint_is_reached_through_the_gateway_with_identities_end_to_end() {
    let clusters = clusters().await;
    for _ in 0..3 {
        let body = curl(&[
            "-x",
            &format!("http://{}", clusters.client.outbound_addr),
            &format!("http://{BOOKS}/through"),
        ])
        .await;
        assert!(body.starts_with("backend=books"), "{body}");
    }
    let (_, server) = admin_get(&clusters.server, "/metrics").await;
    assert_eq!(
        metric(
            &server,
            "request_total",
            &[
                "direction=\"inbound\"",
                "tls=\"true\"",
                &format!("client_id=\"{WEB_ID}\"")
            ]
        ),
        3.0,
        "books' proxy sees the client's own identity, not the gateway's:\n{server}"
    );
    let (_, client) = admin_get(&clusters.client, "/metrics").await;
    assert_eq!(
        metric(
            &client,
            "response_total",
            &[
                "direction=\"outbound\"",
                &format!("server_id=\"{BOOKS_ID}\""),
                "status_code=\"200\""
            ]
        ),
        3.0,
        "the client verified books' identity:\n{client}"
    );
    let (_, gateway) = admin_get(&clusters.gateway, "/metrics").await;
    let relayed = format!("authority=\"gateway:{}\"", clusters.server.inbound_addr);
    assert!(
        metric(
            &gateway,
            "tcp_open_total",
            &[&relayed, &format!("client_id=\"{WEB_ID}\"")]
        ) >= 1.0,
        "the gateway relayed, knowing the client:\n{gateway}"
    );
}

#[tokio::test]
async fn the_gateway_relays_only_to_meshed_proxies_and_only_meshed_clients() {
    let clusters = clusters().await;
    // Straight to the application's port: no proxy there, so not relayed (nor to anything
    // else in the cluster).
    assert!(
        tunnel_refused(
            &clusters,
            clusters.gateway.inbound_addr,
            GATEWAY_ID,
            clusters.backend.addr
        )
        .await
    );
    let unknown: SocketAddr = "127.0.0.1:9".parse().expect("an address");
    assert!(
        tunnel_refused(
            &clusters,
            clusters.gateway.inbound_addr,
            GATEWAY_ID,
            unknown
        )
        .await
    );
    let (_, gateway) = admin_get(&clusters.gateway, "/metrics").await;
    assert_eq!(
        metric(
            &gateway,
            "proxy_error_total",
            &[&format!("reason=\"{NOT_A_MESHED_PROXY}\"")]
        ),
        2.0,
        "{gateway}"
    );

    // Without mutual TLS, the gateway takes no header at all.
    let mut plain = TcpStream::connect(clusters.gateway.inbound_addr)
        .await
        .expect("connect");
    plain
        .write_all(&tunnel_header(clusters.server.inbound_addr))
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok() && answer.is_empty(), "closed unanswered");
    let (_, gateway) = admin_get(&clusters.gateway, "/metrics").await;
    assert_eq!(
        metric(
            &gateway,
            "proxy_error_total",
            &["reason=\"plaintext transport header\""]
        ),
        1.0,
        "{gateway}"
    );
}

#[tokio::test]
async fn a_proxy_that_is_not_a_gateway_refuses_to_relay() {
    let clusters = clusters().await;
    assert!(
        tunnel_refused(
            &clusters,
            clusters.server.inbound_addr,
            BOOKS_ID,
            clusters.backend.addr
        )
        .await
    );
    let (_, server) = admin_get(&clusters.server, "/metrics").await;
    assert_eq!(
        metric(
            &server,
            "proxy_error_total",
            &["reason=\"gateway tunnel to a proxy that is not a gateway\""]
        ),
        1.0,
        "{server}"
    );
}

#[tokio::test]
async fn an_unreachable_gateway_is_named_with_its_cluster() {
    let clusters = clusters().await;
    // The gateway's address now answers nothing.
    let closed = loopback().await;
    let closed_addr = closed.local_addr().expect("an address");
    drop(closed);
    let mut endpoint = meshed(clusters.backend.addr, clusters.server.inbound_addr.port());
    endpoint.tls_identity = Some(destination::TlsIdentity {
        spiffe_id: BOOKS_ID.to_owned(),
        server_name: String::new(),
    });
    endpoint.gateway = Some(destination::Gateway {
        addr: Some(closed_addr.into()),
        tls_identity: Some(destination::TlsIdentity {
            spiffe_id: GATEWAY_ID.to_owned(),
            server_name: String::new(),
        }),
        cluster: "east".to_owned(),
    });
    clusters.setup.destination.set(BOOKS, vec![endpoint]);
    let out = curl(&[
        "-x",
        &format!("http://{}", clusters.client.outbound_addr),
        "--include",
        &format!("http://{BOOKS}/"),
    ])
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(out.contains("the gateway of cluster east"), "{out}");
}
