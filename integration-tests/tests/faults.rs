//! Faults under load, with real processes: the controller (file backend, identity CA), two
//! `books` replicas (an app and its proxy each) and a `web` client proxy on loopback, mutual
//! TLS everywhere. A traffic loop runs through web the whole time; in every scenario not one
//! request may fail.

use std::time::Duration;

use mesh_controller::identity::ca::{generate_issuer, generate_trust_anchor, write_dir};
use mesh_integration_tests::http::{Backend, http_get, loopback_ip, metric, wait_ready};
use mesh_integration_tests::mesh::{
    self, Folders, ProxySpec, Tally, Traffic, addr, exited, signal, write_anchors,
};
use mesh_integration_tests::process::Process;
use mesh_spiffe::report::IdentityReport;

const BOOKS: &str = "books.shop.svc.cluster.local:80";
const DAY: Duration = Duration::from_secs(24 * 3600);
/// The replicas' hosts; web is on host 4.
const REPLICAS: [u8; 2] = [2, 3];
const WEB: u8 = 4;

/// The ServiceAccounts with the tokens the file backend accepts, the `books` Service (with
/// `service_annotations`) and its two Ready pods, meshed.
fn services(block: u8, service_annotations: &str) -> String {
    let account = |name: &str| {
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: shop, \
             annotations: {{mesh.dev/identity-token: {name}-token}}}}\n---\n"
        )
    };
    let mut text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}{}\
         apiVersion: v1\nkind: Service\nmetadata: {{name: books, namespace: shop, annotations: {{{service_annotations}}}}}\n\
         spec:\n  clusterIP: 10.96.0.10\n  selector: {{app: books}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n",
        account("web"),
        account("books"),
    );
    for host in REPLICAS {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: books-{host}, namespace: shop, labels: {{app: books}}, \
             annotations: {{mesh.dev/inject: enabled}}}}\n\
             spec:\n  serviceAccountName: books\n  containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]\n\
             status: {{podIP: {}, phase: Running, conditions: [{{type: Ready, status: 'True'}}]}}\n---\n",
            loopback_ip(block, host)
        ));
    }
    text
}

/// The mesh of one scenario: its folders, controller, the replicas' apps and proxies, web's
/// proxy.
struct Scenario {
    block: u8,
    folders: Folders,
    controller: Option<Process>,
    controller_flags: Vec<&'static str>,
    apps: Vec<Option<Backend>>,
    replicas: Vec<Option<Process>>,
    _web: Process,
    identity_cache: bool,
}

impl Scenario {
    async fn start(
        block: u8,
        service_annotations: &str,
        controller_flags: &[&'static str],
        identity_cache: bool,
    ) -> Scenario {
        let anchor = generate_trust_anchor("cluster.local", 365 * DAY).expect("anchor");
        let issuer = generate_issuer(&anchor, "cluster.local", 30 * DAY).expect("issuer");
        let folders = Folders::new(&format!("faults-{block}"), &["web", "books"]);
        write_dir(&folders.identity(), &issuer, &anchor.cert_pem).expect("identity folder");
        write_anchors(&folders.anchors(), &anchor.cert_pem);
        folders.write_config("services.yaml", &services(block, service_annotations));
        let controller = mesh::controller(&folders, block, controller_flags).await;
        let mut apps = Vec::new();
        for host in REPLICAS {
            apps.push(Some(
                Backend::start(addr(block, host, 8080), name(host)).await,
            ));
        }
        let mut scenario = Scenario {
            block,
            controller: Some(controller),
            controller_flags: controller_flags.to_vec(),
            apps,
            replicas: Vec::new(),
            _web: mesh::proxy(
                &folders,
                &ProxySpec {
                    block,
                    host: WEB,
                    account: "web",
                    identity_cache,
                    env: &[],
                },
            ),
            folders,
            identity_cache,
        };
        for host in REPLICAS {
            let proxy = scenario.replica_proxy(host);
            scenario.replicas.push(Some(proxy));
        }
        for host in [2, 3, WEB] {
            wait_ready(addr(block, host, 4191)).await;
        }
        scenario
    }

    fn replica_proxy(&self, host: u8) -> Process {
        mesh::proxy(
            &self.folders,
            &ProxySpec {
                block: self.block,
                host,
                account: "books",
                identity_cache: self.identity_cache,
                env: &[("MESH_PROXY_SHUTDOWN_GRACE_PERIOD", "3s")],
            },
        )
    }

    fn index(host: u8) -> usize {
        usize::from(host - REPLICAS[0])
    }

    /// Traffic through web, once it reaches both replicas.
    async fn traffic(&self) -> Traffic {
        let traffic = Traffic::start(addr(self.block, WEB, 4140), BOOKS);
        traffic
            .wait_for("traffic reaching both replicas", |tally| {
                REPLICAS.iter().all(|host| served_by(tally, *host) >= 20)
            })
            .await;
        traffic
    }

    async fn restart_controller(&mut self) {
        self.controller =
            Some(mesh::controller(&self.folders, self.block, &self.controller_flags).await);
    }

    fn kill_controller(&mut self) {
        if let Some(controller) = &self.controller {
            signal(controller, "KILL");
        }
        self.controller = None;
    }
}

fn name(host: u8) -> &'static str {
    match host {
        2 => "books-2",
        _ => "books-3",
    }
}

fn served_by(tally: &Tally, host: u8) -> u64 {
    tally.by_backend.get(name(host)).copied().unwrap_or(0)
}

/// Waits for `count` more answers from replica `host` than it has given now.
async fn wait_served(traffic: &Traffic, host: u8, count: u64, what: &str) {
    let now = served_by(&traffic.tally().await, host);
    traffic
        .wait_for(what, |tally| served_by(tally, host) >= now + count)
        .await;
}

fn assert_no_failure(tally: &Tally) {
    assert!(
        tally.failures.is_empty(),
        "{} of {} requests failed: {:?}",
        tally.failures.len(),
        tally.failures.len() as u64 + tally.successes(),
        tally.failures
    );
}

#[tokio::test]
async fn the_controller_killed_and_restarted_under_load_fails_no_request() {
    let mut scenario = Scenario::start(41, "", &[], false).await;
    let traffic = scenario.traffic().await;
    scenario.kill_controller();
    // The proxies keep serving what they last learned.
    traffic
        .wait_for_more("traffic while the controller is gone", 500)
        .await;
    scenario.restart_controller().await;
    traffic
        .wait_for_more("traffic after the controller is back", 300)
        .await;
    let tally = traffic.stop().await;
    assert_no_failure(&tally);
}

#[tokio::test]
async fn a_replicas_app_killed_under_load_with_retries_fails_no_request() {
    // Round robin: the dead replica is sure to be picked (with peak-EWMA sequential traffic
    // may stay on the other one).
    let annotations = "retry.mesh.dev/http: gateway-error, retry.mesh.dev/limit: '2', \
                       balancer.mesh.dev/algorithm: round-robin";
    let mut scenario = Scenario::start(42, annotations, &[], false).await;
    let traffic = scenario.traffic().await;
    // books-2's application dies; its proxy stays and answers `connect failed`.
    scenario.apps[Scenario::index(2)] = None;
    traffic
        .wait_for_more("traffic while one app is dead", 500)
        .await;
    // It comes back on the same address and is given traffic again after its ejection.
    scenario.apps[Scenario::index(2)] = Some(Backend::start(addr(42, 2, 8080), "books-2").await);
    wait_served(&traffic, 2, 20, "the revived app serving again").await;
    let tally = traffic.stop().await;
    assert_no_failure(&tally);
    let (_, text) = http_get(addr(42, WEB, 4191), "/metrics", &[])
        .await
        .expect("web's metrics");
    assert!(
        metric(&text, "endpoint_ejection_total", &[]) >= 1.0,
        "the dead replica was ejected: {text}"
    );
}

#[tokio::test]
async fn a_replicas_proxy_sigtermed_under_load_drains_and_fails_no_request() {
    let mut scenario = Scenario::start(43, "", &[], false).await;
    let traffic = scenario.traffic().await;
    let index = Scenario::index(2);
    let mut draining = scenario.replicas[index].take().expect("books-2's proxy");
    signal(&draining, "TERM");
    exited(&mut draining, Duration::from_secs(10)).await;
    traffic
        .wait_for_more("traffic while books-2's proxy is gone", 500)
        .await;
    scenario.replicas[index] = Some(scenario.replica_proxy(2));
    wait_ready(addr(43, 2, 4191)).await;
    wait_served(
        &traffic,
        2,
        20,
        "books-2 serving again after its proxy restarted",
    )
    .await;
    let tally = traffic.stop().await;
    assert_no_failure(&tally);
}

#[tokio::test]
async fn a_proxy_restarted_while_the_controller_is_down_comes_back_with_its_identity() {
    let mut scenario = Scenario::start(44, "", &[], true).await;
    let traffic = scenario.traffic().await;
    scenario.kill_controller();
    let index = Scenario::index(2);
    // Restarted as the kubelet restarts a container: SIGTERM, then a new process.
    let mut restarted = scenario.replicas[index].take().expect("books-2's proxy");
    signal(&restarted, "TERM");
    exited(&mut restarted, Duration::from_secs(10)).await;
    scenario.replicas[index] = Some(scenario.replica_proxy(2));
    // Ready without the controller: it serves with the identity it kept.
    wait_ready(addr(44, 2, 4191)).await;
    wait_served(&traffic, 2, 20, "books-2 serving with its kept identity").await;
    scenario.restart_controller().await;
    traffic
        .wait_for_more("traffic after the controller is back", 200)
        .await;
    let tally = traffic.stop().await;
    assert_no_failure(&tally);
}

/// A proxy's identity report from its admin `/identity`.
async fn identity(host_admin: std::net::SocketAddr) -> IdentityReport {
    let (_, body) = http_get(host_admin, "/identity", &[])
        .await
        .expect("the proxy's identity");
    serde_json::from_str(&body).expect("an identity report")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Sleeps until Unix time `at` (seconds).
async fn sleep_until_unix(at: i64) {
    let wait = u64::try_from(at - unix_now()).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(wait)).await;
}

#[tokio::test]
async fn certificates_renew_while_the_controller_is_down_without_a_failed_request() {
    // 30-second certificates: each renewed 21 s after it is issued.
    let flags = ["--identity-leaf-lifetime", "30s"];
    let mut scenario = Scenario::start(45, "", &flags, false).await;
    let traffic = scenario.traffic().await;
    let hosts = [2, 3, WEB];
    let mut renewals = Vec::new();
    let mut expiries = Vec::new();
    for host in hosts {
        let report = identity(addr(45, host, 4191)).await;
        renewals.push(report.next_renewal.expect("a renewal is scheduled").0);
        expiries.push(report.chain.first().expect("a certificate").not_after.0);
    }
    let first_renewal = renewals.iter().copied().min().unwrap_or_default();
    let last_renewal = renewals.iter().copied().max().unwrap_or_default();
    let first_expiry = expiries.iter().copied().min().unwrap_or_default();
    assert!(
        last_renewal + 4 < first_expiry,
        "renewals {renewals:?} too close to expiries {expiries:?} on this machine"
    );
    // Down across every proxy's renewal time, back before any certificate expires.
    sleep_until_unix(first_renewal - 1).await;
    scenario.kill_controller();
    sleep_until_unix(last_renewal + 2).await;
    scenario.restart_controller().await;
    assert!(
        unix_now() < first_expiry,
        "the controller came back too late"
    );
    for host in hosts {
        let admin = addr(45, host, 4191);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, text) = http_get(admin, "/metrics", &[]).await.expect("metrics");
            let failures = metric(&text, "identity_cert_renewal_failures_total", &[]);
            let renewed = metric(&text, "identity_cert_renewals_total", &[]);
            if failures >= 1.0 && renewed >= 2.0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "host {host} did not renew after failing to: {text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            identity(admin).await.chain[0].not_after.0 > first_expiry,
            "host {host} presents a renewed certificate"
        );
    }
    // Past the first certificates' expiry, a new client's connections handshake with the
    // renewed ones.
    sleep_until_unix(first_expiry + 1).await;
    let _second_web = mesh::proxy(
        &scenario.folders,
        &ProxySpec {
            block: 45,
            host: 5,
            account: "web",
            identity_cache: false,
            env: &[],
        },
    );
    wait_ready(addr(45, 5, 4191)).await;
    let fresh = Traffic::start(addr(45, 5, 4140), BOOKS);
    fresh
        .wait_for_more("new connections after the renewal", 100)
        .await;
    assert_no_failure(&fresh.stop().await);
    let tally = traffic.stop().await;
    assert_no_failure(&tally);
}
