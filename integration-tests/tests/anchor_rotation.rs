//! Trust-anchor rotation under traffic, with the real `mesh-controller` (file backend, identity
//! CA from a folder in cert-manager's layout) and real `mesh-proxy` processes speaking mutual
//! TLS on loopback.
//!
//! The procedure an operator follows: every proxy already trusts the bundle of the old and the
//! new anchor; the issuer is replaced by one the new anchor signed (the controller rereads its
//! folder); workloads then roll over one by one. Proxies started before the change keep their
//! old-chain certificates while new ones get new-chain certificates, so for a while every pair
//! of old and new meets in both directions. Not one request may fail.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_controller::identity::ca::{generate_issuer, generate_trust_anchor, write_dir};
use mesh_integration_tests::http::{Backend, PATIENCE, http_get, loopback_ip, metric, wait_ready};
use mesh_integration_tests::mesh::{self, Folders, ProxySpec, Traffic, write_anchors};
use mesh_integration_tests::process::Process;

const BOOKS: &str = "books.shop.svc.cluster.local:80";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DAY: Duration = Duration::from_secs(24 * 3600);
/// This test's loopback block.
const BLOCK: u8 = 31;

fn addr(host: u8, port: u16) -> SocketAddr {
    mesh::addr(BLOCK, host, port)
}

/// A `mesh-proxy` on `host` proving `account`'s identity.
fn proxy(folders: &Folders, host: u8, account: &str) -> Process {
    mesh::proxy(
        folders,
        &ProxySpec {
            block: BLOCK,
            host,
            account,
            identity_cache: false,
            env: &[],
        },
    )
}

/// Points the discovery file at the `books` pods on `hosts`.
fn write_services(folders: &Folders, hosts: &[u8]) {
    folders.write_config("services.yaml", &services(hosts));
}

/// The ServiceAccounts with the tokens the file backend accepts, and the `books` pods on
/// `hosts` (each `books-<host>`), meshed by annotation.
fn services(hosts: &[u8]) -> String {
    let account = |name: &str| {
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: shop, \
             annotations: {{mesh.dev/identity-token: {name}-token}}}}\n---\n"
        )
    };
    let pod = |host: u8| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: books-{host}, namespace: shop, labels: {{app: books}}, \
             annotations: {{mesh.dev/inject: enabled}}}}\n\
             spec:\n  serviceAccountName: books\n  containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]\n\
             status: {{podIP: {}, phase: Running, conditions: [{{type: Ready, status: 'True'}}]}}\n---\n",
            loopback_ip(BLOCK, host)
        )
    };
    let mut text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}{}\
         apiVersion: v1\nkind: Service\nmetadata: {{name: books, namespace: shop}}\n\
         spec:\n  clusterIP: 10.96.0.10\n  selector: {{app: books}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n",
        account("web"),
        account("books"),
    );
    for host in hosts {
        text.push_str(&pod(*host));
    }
    text
}

/// The issuer certificate (PEM, whitespace dropped) in the chain the proxy on `host` presents,
/// from its admin `/identity`.
async fn presented_issuer(host: u8) -> String {
    let (_, body) = http_get(addr(host, 4191), "/identity", &[])
        .await
        .expect("the proxy's identity");
    let report: serde_json::Value = serde_json::from_str(&body).expect("an identity report");
    let pem = report["chain"][1]["pem"].as_str().unwrap_or_default();
    squeeze(pem)
}

fn squeeze(pem: &str) -> String {
    pem.split_whitespace().collect()
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[tokio::test]
async fn a_new_anchor_and_issuer_roll_out_under_traffic_without_a_failed_request() {
    let old_anchor = generate_trust_anchor("cluster.local", 365 * DAY).expect("old anchor");
    let old_issuer = generate_issuer(&old_anchor, "cluster.local", 30 * DAY).expect("old issuer");
    let new_anchor = generate_trust_anchor("cluster.local", 365 * DAY).expect("new anchor");
    // A longer life tells the controller's issuer metric which issuer it signs with.
    let new_issuer = generate_issuer(&new_anchor, "cluster.local", 90 * DAY).expect("new issuer");
    let bundle = format!("{}{}", old_anchor.cert_pem, new_anchor.cert_pem);

    let folders = Folders::new("anchor-rotation", &["web", "books"]);
    write_dir(&folders.identity(), &old_issuer, &bundle).expect("write the identity folder");
    write_anchors(&folders.anchors(), &bundle);
    write_services(&folders, &[2]);
    let books_1 = Backend::start(addr(2, 8080), "books-1").await;
    let books_2 = Backend::start(addr(3, 8080), "books-2").await;

    let _controller = mesh::controller(
        &folders,
        BLOCK,
        &[
            "--identity-leaf-lifetime",
            "1h",
            "--identity-reload-interval",
            "200ms",
        ],
    )
    .await;
    // Before the change: the old issuer's proxies (ready means holding a certificate).
    let server_1 = proxy(&folders, 2, "books");
    let _client_1 = proxy(&folders, 4, "web");
    wait_ready(addr(2, 4191)).await;
    wait_ready(addr(4, 4191)).await;

    let old_traffic = Traffic::start(addr(4, 4140), BOOKS);
    old_traffic
        .wait_for("traffic through the old chain", |t| {
            t.by_backend.get("books-1").copied().unwrap_or(0) >= 50
        })
        .await;

    // The new issuer, signed by the new anchor; the controller rereads its folder.
    write_dir(&folders.identity(), &new_issuer, &bundle).expect("rotate the issuer");
    let switched = unix_seconds(SystemTime::now() + 60 * DAY);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, text) = http_get(addr(1, 9990), "/metrics", &[])
            .await
            .expect("controller metrics");
        if metric(
            &text,
            "mesh_controller_identity_issuer_expiry_timestamp_seconds",
            &[],
        ) > switched
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the controller never loaded the new issuer: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The rollout: a new server pod and a new client, both with new-chain certificates, beside
    // the old ones. Each client reaches each server: old and new meet both ways.
    let server_2 = proxy(&folders, 3, "books");
    let _client_2 = proxy(&folders, 5, "web");
    wait_ready(addr(3, 4191)).await;
    wait_ready(addr(5, 4191)).await;
    // The pod is Ready (in discovery) only once its proxy is, as its readiness probe makes it.
    write_services(&folders, &[2, 3]);
    // Old proxies keep the old chain (1 h certificates), new ones present the new one.
    for (host, issuer) in [
        (2, &old_issuer),
        (4, &old_issuer),
        (3, &new_issuer),
        (5, &new_issuer),
    ] {
        assert_eq!(
            presented_issuer(host).await,
            squeeze(&issuer.cert_pem),
            "the proxy on host {host} presents the other issuer"
        );
    }
    let new_traffic = Traffic::start(addr(5, 4140), BOOKS);
    for traffic in [&old_traffic, &new_traffic] {
        traffic
            .wait_for("each client reaching each server", |tally| {
                ["books-1", "books-2"]
                    .iter()
                    .all(|b| tally.by_backend.get(*b).copied().unwrap_or(0) >= 20)
            })
            .await;
    }

    // The old server pod goes away once discovery has moved the traffic off it, and traffic
    // goes on without it.
    write_services(&folders, &[3]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answered = books_1.requests();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if books_1.requests() == answered {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old server kept getting requests after it left discovery"
        );
    }
    drop(server_1);
    for traffic in [&old_traffic, &new_traffic] {
        traffic
            .wait_for_more("traffic going on without the old server", 100)
            .await;
    }

    let old_traffic = old_traffic.stop().await;
    let new_traffic = new_traffic.stop().await;
    assert!(
        old_traffic.failures.is_empty() && new_traffic.failures.is_empty(),
        "failed requests: old client {:?}, new client {:?}",
        old_traffic.failures,
        new_traffic.failures
    );
    assert!(books_2.requests() > 0);
    // Every request crossed mutual TLS: the new server saw the clients' proven identity.
    let (_, text) = http_get(addr(3, 4191), "/metrics", &[])
        .await
        .expect("server metrics");
    let client_id = format!("client_id=\"{WEB_ID}\"");
    let inbound = [r#"direction="inbound""#, "tls=\"true\"", client_id.as_str()];
    assert!(
        metric(&text, "request_total", &inbound) > 0.0,
        "the new server counted no mTLS requests from web: {text}"
    );
    let _ = server_2;
}
