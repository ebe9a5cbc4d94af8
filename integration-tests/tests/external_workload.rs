//! A host outside Kubernetes joins the mesh, with real processes: the controller (file
//! backend, identity CA), a meshed pod `web` (an app and its proxy) and a "VM": an app and a
//! mesh-proxy that no pod stands for, described by an `ExternalWorkload`. The VM's proxy gets
//! its certificate with its ServiceAccount's token; a Service selecting the VM's labels
//! reaches it over mutual TLS with web's identity, the VM calls into the mesh with its own,
//! and a Server selecting the VM's labels is enforced by the VM's proxy.

use std::time::Duration;

use mesh_controller::identity::ca::{generate_issuer, generate_trust_anchor, write_dir};
use mesh_integration_tests::http::{Backend, ProxyClient, loopback_ip, metric, wait_ready};
use mesh_integration_tests::mesh::{self, Folders, ProxySpec, addr, write_anchors};

const BLOCK: u8 = 64;
const WEB: u8 = 4;
const VM: u8 = 5;
const DAY: Duration = Duration::from_secs(24 * 3600);
const LEGACY: &str = "legacy.shop.svc.cluster.local:80";
const WEB_SERVICE: &str = "web.shop.svc.cluster.local:80";

fn account(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: shop, \
         annotations: {{mesh.dev/identity-token: {name}-token}}}}\n---\n"
    )
}

/// web (a pod) and legacy (the VM `legacy-5`, an ExternalWorkload) with their Services.
fn objects() -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}{}\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  clusterIP: 10.96.0.20\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: 8081}}]\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: web-{WEB}, namespace: shop, labels: {{app: web}}, \
         annotations: {{mesh.dev/inject: enabled}}}}\n\
         spec:\n  serviceAccountName: web\n  containers: [{{name: app, ports: [{{containerPort: 8081}}]}}]\n\
         status: {{podIP: {}, phase: Running, conditions: [{{type: Ready, status: 'True'}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: legacy, namespace: shop}}\n\
         spec:\n  clusterIP: 10.96.0.21\n  selector: {{app: legacy}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n---\n\
         apiVersion: workload.mesh.dev/v1alpha1\nkind: ExternalWorkload\n\
         metadata: {{name: legacy-{VM}, namespace: shop, labels: {{app: legacy}}}}\n\
         spec:\n  serviceAccountName: legacy\n  workloadIPs: [{}]\n  ports: [{{name: http, port: 8080}}]\n",
        account("web"),
        account("legacy"),
        loopback_ip(BLOCK, WEB),
        loopback_ip(BLOCK, VM),
    )
}

/// A Server of the VM's port: without an AuthorizationPolicy, nobody may use it.
const SERVER: &str = "apiVersion: policy.mesh.dev/v1alpha1\nkind: Server\n\
    metadata: {name: legacy-http, namespace: shop}\n\
    spec:\n  podSelector: {matchLabels: {app: legacy}}\n  port: 8080\n";

fn admin_metrics(host: u8) -> String {
    mesh_integration_tests::local::http_get(&addr(BLOCK, host, 4191).to_string(), "/metrics")
        .unwrap_or_default()
}

/// GETs `/` of `authority` through the proxy on `host` until the answer is `want` (at most
/// 20 s: discovery and policy changes take a moment to arrive).
async fn answers(host: u8, authority: &str, want: (u16, &str)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = ProxyClient::connect(addr(BLOCK, host, 4140), authority).await;
        let got = client.get("/", &[]).await;
        if (got.0, got.1.as_str()) == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{authority} through host {host}: {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_outside_kubernetes_joins_the_mesh_with_its_identity_and_policy() {
    let anchor = generate_trust_anchor("cluster.local", 365 * DAY).expect("anchor");
    let issuer = generate_issuer(&anchor, "cluster.local", 30 * DAY).expect("issuer");
    let folders = Folders::new("external-workload", &["web", "legacy"]);
    write_dir(&folders.identity(), &issuer, &anchor.cert_pem).expect("identity folder");
    write_anchors(&folders.anchors(), &anchor.cert_pem);
    folders.write_config("objects.yaml", &objects());
    let _controller = mesh::controller(&folders, BLOCK, &[]).await;
    let _web_app = Backend::start(addr(BLOCK, WEB, 8081), "web").await;
    let _vm_app = Backend::start(addr(BLOCK, VM, 8080), "vm").await;
    let spec = |host, account| ProxySpec {
        block: BLOCK,
        host,
        account,
        identity_cache: false,
        env: &[],
    };
    let _web = mesh::proxy(&folders, &spec(WEB, "web"));
    // The VM's proxy: the pod name it reports is the ExternalWorkload's.
    let _vm = mesh::proxy(&folders, &spec(VM, "legacy"));
    wait_ready(addr(BLOCK, WEB, 4191)).await;
    wait_ready(addr(BLOCK, VM, 4191)).await;

    // The mesh calls the VM by its Service, over mutual TLS.
    answers(WEB, LEGACY, (200, "vm")).await;
    let vm = admin_metrics(VM);
    assert!(
        metric(
            &vm,
            "request_total",
            &[
                "direction=\"inbound\"",
                "tls=\"true\"",
                "client_id=\"spiffe://cluster.local/ns/shop/sa/web\""
            ]
        ) >= 1.0,
        "the VM's proxy knows its client:\n{vm}"
    );
    assert!(
        vm.contains("identity_cert_expiry_timestamp_seconds"),
        "the VM holds a certificate:\n{vm}"
    );

    // The VM calls into the mesh, as itself.
    answers(VM, WEB_SERVICE, (200, "web")).await;
    let web = admin_metrics(WEB);
    assert!(
        metric(
            &web,
            "request_total",
            &[
                "direction=\"inbound\"",
                "tls=\"true\"",
                "client_id=\"spiffe://cluster.local/ns/shop/sa/legacy\""
            ]
        ) >= 1.0,
        "web's proxy knows the VM's identity:\n{web}"
    );

    // A Server selecting the VM's labels is the VM's proxy's policy: nobody is authorized.
    folders.write_config("server.yaml", SERVER);
    answers(WEB, LEGACY, (403, "")).await;
    std::fs::remove_file(folders.config().join("server.yaml")).expect("remove the Server");
    answers(WEB, LEGACY, (200, "vm")).await;

    // Without its ExternalWorkload, the VM is no endpoint of the Service any more.
    folders.write_config(
        "objects.yaml",
        &objects().replace("kind: ExternalWorkload", "kind: Gone"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = ProxyClient::connect(addr(BLOCK, WEB, 4140), LEGACY).await;
        if client.get("/", &[]).await.0 == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "legacy still answers"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
