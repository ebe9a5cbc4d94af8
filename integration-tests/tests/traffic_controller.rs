//! Traffic management end to end through the real controller: `mesh-controller` with the file
//! backend over a folder of Kubernetes YAML (Pods, Services with retry annotations, an
//! HTTPRoute splitting 90/10 with a header match), a real `mesh-proxy` process used as the
//! application's HTTP proxy, and real HTTP backends, all on loopback.
//!
//! Each test takes its own block of loopback addresses (`127.X.<block>.0/24`, X from the test
//! process id) so the fixed ports of the controller, the proxy and the backends never collide
//! with another test running at the same time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mesh_integration_tests::bin_path;
use mesh_integration_tests::http::{
    Backend, PATIENCE, ProxyClient, http_get, loopback_ip, metric, wait_ready,
};
use mesh_integration_tests::process::Process;

const BOOKS: &str = "books.shop.svc.cluster.local:80";

/// The Pods and Services: `books` selects both tracks, `books-stable` and `books-canary` one
/// each. `books` carries `annotations` (retries, timeouts).
fn services(block: u8, annotations: &str) -> String {
    let pod = |name: &str, track: &str, host: u8| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: books, track: {track}}}}}\n\
             spec:\n  containers: [{{name: app, ports: [{{containerPort: 8080, name: http}}]}}]\n\
             status: {{podIP: {}, phase: Running, conditions: [{{type: Ready, status: 'True'}}]}}\n---\n",
            loopback_ip(block, host)
        )
    };
    let service = |name: &str, selector: &str, cluster_ip: u8, annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, annotations: {{{annotations}}}}}\n\
             spec:\n  clusterIP: 10.96.0.{cluster_ip}\n  selector: {{{selector}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}{}{}{}{}",
        pod("stable-1", "stable", 2),
        pod("canary-1", "canary", 3),
        service("books", "app: books", 10, annotations),
        service("books-stable", "track: stable", 11, ""),
        service("books-canary", "track: canary", 12, ""),
    )
}

/// An HTTPRoute on `books`: requests with `x-canary: "true"` go to the canary; the rest are
/// split `stable`/`canary` by weight.
fn route(stable: i64, canary: i64) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: books, namespace: shop}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: books, port: 80}}]\n  rules:\n  \
         - matches: [{{headers: [{{name: x-canary, value: 'true'}}]}}]\n    \
           backendRefs: [{{name: books-canary, port: 80}}]\n  \
         - backendRefs: [{{name: books-stable, port: 80, weight: {stable}}}, {{name: books-canary, port: 80, weight: {canary}}}]\n"
    )
}

/// The controller over a folder, one proxy using it, and the two backends.
struct Mesh {
    block: u8,
    dir: PathBuf,
    stable: Backend,
    canary: Backend,
    // Dropped after the fields above: the proxy first, then the controller.
    _proxy: Process,
    _controller: Process,
}

impl Mesh {
    async fn start(block: u8, name: &str, annotations: &str, route_yaml: &str) -> Mesh {
        let dir = std::env::temp_dir().join(format!(
            "mesh-traffic-controller-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the config folder");
        std::fs::write(dir.join("services.yaml"), services(block, annotations))
            .expect("write services");
        std::fs::write(dir.join("route.yaml"), route_yaml).expect("write the route");
        let stable = Backend::start(SocketAddr::new(loopback_ip(block, 2), 8080), "stable").await;
        let canary = Backend::start(SocketAddr::new(loopback_ip(block, 3), 8080), "canary").await;
        let host = loopback_ip(block, 1);
        let controller = Process(
            Command::new(bin_path("mesh-controller"))
                .args(["--discovery", "file", "--poll-interval-ms", "50"])
                .arg("--config-dir")
                .arg(&dir)
                .args(["--grpc-listen", &format!("{host}:8086")])
                .args(["--admin-listen", &format!("{host}:9990")])
                .args(["--log-level", "warn"])
                .stdin(Stdio::null())
                .spawn()
                .expect("start mesh-controller"),
        );
        let proxy = Process(
            Command::new(bin_path("mesh-proxy"))
                .env("MESH_PROXY_CONTROLLER_ADDR", format!("http://{host}:8086"))
                .env("MESH_PROXY_INBOUND_LISTEN", format!("{host}:4143"))
                .env("MESH_PROXY_OUTBOUND_LISTEN", format!("{host}:4140"))
                .env("MESH_PROXY_ADMIN_LISTEN", format!("{host}:4191"))
                .env("MESH_PROXY_NAMESPACE", "web")
                .env("MESH_PROXY_LOG_LEVEL", "warn")
                .stdin(Stdio::null())
                .spawn()
                .expect("start mesh-proxy"),
        );
        let mesh = Mesh {
            block,
            dir,
            stable,
            canary,
            _proxy: proxy,
            _controller: controller,
        };
        wait_ready(SocketAddr::new(host, 9990)).await;
        wait_ready(SocketAddr::new(host, 4191)).await;
        mesh
    }

    fn outbound(&self) -> SocketAddr {
        SocketAddr::new(loopback_ip(self.block, 1), 4140)
    }

    /// Rewrites a file of the folder atomically, as an editor or `kubectl` would.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write a temp file");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename into place");
    }

    async fn proxy_metrics(&self) -> String {
        let admin = SocketAddr::new(loopback_ip(self.block, 1), 4191);
        http_get(admin, "/metrics", &[])
            .await
            .expect("proxy metrics")
            .1
    }

    async fn controller_metrics(&self) -> String {
        let admin = SocketAddr::new(loopback_ip(self.block, 1), 9990);
        http_get(admin, "/metrics", &[])
            .await
            .expect("controller metrics")
            .1
    }

    /// Sends `n` GETs of `path` through the proxy; returns how many each backend answered,
    /// failing on any non-200.
    async fn count(
        &self,
        n: usize,
        path: &str,
        headers: &[(&str, &str)],
    ) -> HashMap<String, usize> {
        let mut client = ProxyClient::connect(self.outbound(), BOOKS).await;
        let mut seen = HashMap::new();
        for i in 0..n {
            let (status, backend) = client.get(path, headers).await;
            assert_eq!(status, 200, "request {i} of {n} to {path} failed");
            *seen.entry(backend).or_default() += 1;
        }
        seen
    }

    /// Waits (bounded) until the proxy routes as `expect` says.
    async fn wait_for_routing(&self, headers: &[(&str, &str)], expect: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let seen = self.count(20, "/", headers).await;
            if seen.get(expect) == Some(&20) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy never sent everything to {expect}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_90_10_split_lands_within_three_points_and_a_header_picks_the_canary() {
    let mesh = Mesh::start(1, "split", "", &route(90, 10)).await;
    // The first request already follows the route (the proxy waits briefly for the policy),
    // but the controller may still be reading the folder: wait until a header-matched
    // request reaches the canary.
    mesh.wait_for_routing(&[("x-canary", "true")], "canary")
        .await;

    let seen = mesh.count(2000, "/", &[]).await;
    let canary = seen.get("canary").copied().unwrap_or(0) as f64 / 2000.0;
    assert!(
        (0.07..=0.13).contains(&canary),
        "canary got {canary}: {seen:?}"
    );

    // Only requests carrying the header go to the canary because of it.
    let before = mesh.canary.requests();
    let matched = mesh.count(200, "/", &[("x-canary", "true")]).await;
    assert_eq!(matched.get("canary"), Some(&200), "{matched:?}");
    assert_eq!(mesh.canary.requests() - before, 200);
    let other = mesh.count(200, "/", &[("x-canary", "false")]).await;
    let other_canary = other.get("canary").copied().unwrap_or(0);
    assert!(
        other_canary < 60,
        "a non-matching header is split, not sent to the canary: {other:?}"
    );
    assert!(mesh.stable.requests() > 0);

    let metrics = mesh.proxy_metrics().await;
    assert!(
        metric(
            &metrics,
            "route_request_total",
            &["authority=\"books.shop.svc.cluster.local:80\""]
        ) >= 2400.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "route_response_latency_ms_count", &[]) >= 2400.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn retries_from_service_annotations_absorb_a_backend_failing_30_percent_of_gets() {
    let annotations = "retry.mesh.dev/http: 5xx, retry.mesh.dev/limit: '3', \
                       retry.mesh.dev/budget-ratio: '0.5', timeout.mesh.dev/request: 5s";
    // Everything to the stable backend, which fails 3 GETs of /flaky in every 10.
    let mesh = Mesh::start(2, "retries", annotations, &route(1, 0)).await;
    mesh.wait_for_routing(&[("x-canary", "true")], "canary")
        .await;
    let seen = mesh.count(300, "/flaky", &[]).await;
    assert_eq!(seen.get("stable"), Some(&300), "{seen:?}");
    // The backend saw the failures; the client saw none.
    assert!(
        mesh.stable.requests() >= 300 + 80,
        "{}",
        mesh.stable.requests()
    );
    let metrics = mesh.proxy_metrics().await;
    let retried = metric(&metrics, "route_retry_total", &["reason=\"retried\""]);
    assert!(retried >= 80.0, "{retried} retries\n{metrics}");
}

#[tokio::test]
async fn a_policy_change_under_load_drops_no_request() {
    let mesh = Arc::new(Mesh::start(3, "change", "", &route(100, 0)).await);
    mesh.wait_for_routing(&[], "stable").await;
    // Four clients, each a bounded number of requests, while the route is rewritten.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mesh = mesh.clone();
        clients.push(tokio::spawn(async move { mesh.count(400, "/", &[]).await }));
    }
    for (stable, canary) in [(50, 50), (0, 100), (100, 0), (0, 100)] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        mesh.write("route.yaml", &route(stable, canary));
    }
    for client in clients {
        // `count` fails on any non-200: no request was dropped or failed during the changes.
        client.await.expect("a client finished with only 200s");
    }
    // The last policy applies.
    mesh.wait_for_routing(&[], "canary").await;
}

#[tokio::test]
async fn an_invalid_http_route_keeps_the_last_valid_policy() {
    let mesh = Mesh::start(4, "invalid", "", &route(0, 100)).await;
    mesh.wait_for_routing(&[], "canary").await;
    let invalid_before = metric(
        &mesh.controller_metrics().await,
        "mesh_controller_policy_invalid_total",
        &[],
    );

    // A negative weight is invalid: the controller reports it and keeps serving the last
    // valid policy (everything to the canary), rather than none (everything to `books`).
    mesh.write("route.yaml", &route(-5, 100));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = mesh.controller_metrics().await;
        if metric(&text, "mesh_controller_policy_invalid_total", &[]) > invalid_before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the controller never counted the invalid route:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = mesh.count(200, "/", &[]).await;
    assert_eq!(seen.get("canary"), Some(&200), "{seen:?}");

    // Fixed, the route applies again.
    mesh.write("route.yaml", &route(100, 0));
    mesh.wait_for_routing(&[], "stable").await;
}
