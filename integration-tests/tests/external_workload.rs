//! A host outside Kubernetes joins the mesh, with real processes: the controller (file
//! backend, identity CA), a meshed pod `web` (an app and its proxy) and a "VM": an app and a
//! mesh-proxy that no pod stands for, described by an `ExternalWorkload`. The VM's proxy gets
//! its certificate with its ServiceAccount's token; a Service selecting the VM's labels
//! reaches it over mutual TLS with web's identity, the VM calls into the mesh with its own,
//! and a Server selecting the VM's labels is enforced by the VM's proxy. A second test puts
//! the VM in a network namespace of its own with `mesh-proxy init`'s capture, as
//! `meshctl external-workload` tells a user to: its applications' connections go through its
//! proxy unchanged, and connections to its applications arrive through it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use mesh_controller::identity::ca::{generate_issuer, generate_trust_anchor, write_dir};
use mesh_integration_tests::bin_path;
use mesh_integration_tests::http::{Backend, ProxyClient, loopback_ip, metric, wait_ready};
use mesh_integration_tests::mesh::{self, Folders, ProxySpec, addr, write_anchors};
use mesh_integration_tests::netns::{NetNs, require_root};

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

/// web (a pod) and legacy (the VM `legacy-5`, an ExternalWorkload) with their Services, on the
/// test's loopback block.
fn objects() -> String {
    objects_at(
        &loopback_ip(BLOCK, WEB).to_string(),
        &loopback_ip(BLOCK, VM).to_string(),
    )
}

/// The same, web at `web_ip` and the VM at `vm_ip`.
fn objects_at(web_ip: &str, vm_ip: &str) -> String {
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
        web_ip,
        vm_ip,
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

/// The VM's and the mesh's namespaces: 10.77.0.2 and 10.77.0.1, joined by a veth pair.
const MESH_IP: &str = "10.77.0.1";
const VM_IP: &str = "10.77.0.2";

/// `curl` in `netns` with `args`: the body, or why it failed.
fn curl_in(netns: &NetNs, args: &[&str]) -> Result<String, String> {
    let output = netns
        .command("curl")
        .args(["--silent", "--show-error", "--max-time", "5"])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Retries `curl_in` for at most 20 s until the body contains `want`.
fn eventually_answers(netns: &NetNs, args: &[&str], want: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = curl_in(netns, args);
        match &answer {
            Ok(body) if body.contains(want) => return body.clone(),
            _ if std::time::Instant::now() > deadline => {
                panic!(
                    "curl {args:?} in {}: {answer:?}, not {want:?}",
                    netns.name()
                )
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `env VAR=VALUE... PROXY` for the proxy of `pod` (ServiceAccount `account`) at `ip`.
fn proxy_argv(
    proxy: &Path,
    folders: &Folders,
    pod: &str,
    account: &str,
    listen_ip: &str,
    app_ip: &str,
) -> Vec<String> {
    let mut argv = vec!["env".to_owned()];
    argv.extend(
        [
            (
                "MESH_PROXY_CONTROLLER_ADDR",
                format!("http://{MESH_IP}:8086"),
            ),
            ("MESH_PROXY_NAMESPACE", "shop".to_owned()),
            ("MESH_PROXY_POD", pod.to_owned()),
            (
                "MESH_PROXY_IDENTITY",
                format!("spiffe://cluster.local/ns/shop/sa/{account}"),
            ),
            (
                "MESH_PROXY_IDENTITY_TOKEN_FILE",
                folders
                    .root
                    .join(format!("{account}.token"))
                    .display()
                    .to_string(),
            ),
            (
                "MESH_PROXY_TRUST_ANCHORS_FILE",
                folders.anchors().display().to_string(),
            ),
            ("MESH_PROXY_INBOUND_LISTEN", format!("{listen_ip}:4143")),
            ("MESH_PROXY_OUTBOUND_LISTEN", format!("{listen_ip}:4140")),
            ("MESH_PROXY_ADMIN_LISTEN", format!("{listen_ip}:4191")),
            ("MESH_PROXY_INBOUND_APP_IP", app_ip.to_owned()),
            ("MESH_PROXY_LOG_LEVEL", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| format!("{k}={v}")),
    );
    argv.push(proxy.display().to_string());
    argv
}

#[test]
fn a_host_in_its_own_network_namespace_is_captured_like_a_pod() {
    if !require_root("a_host_in_its_own_network_namespace_is_captured_like_a_pod") {
        return;
    }
    // Built before any namespace exists: a build killed by the timeout runs no Drop.
    let (controller_bin, proxy_bin) = (bin_path("mesh-controller"), bin_path("mesh-proxy"));
    let echo = env!("CARGO_BIN_EXE_orig-dst-echo");
    let anchor = generate_trust_anchor("cluster.local", 365 * DAY).expect("anchor");
    let issuer = generate_issuer(&anchor, "cluster.local", 30 * DAY).expect("issuer");
    let folders = Folders::new("external-vm", &["web", "legacy"]);
    write_dir(&folders.identity(), &issuer, &anchor.cert_pem).expect("identity folder");
    write_anchors(&folders.anchors(), &anchor.cert_pem);
    folders.write_config("objects.yaml", &objects_at(MESH_IP, VM_IP));

    // The proxy runs as its own user (2102), who may not traverse the build's folders (a CI
    // clone lives in a 0700 temporary folder): it runs a copy in a folder it can read.
    std::fs::set_permissions(&folders.root, std::fs::Permissions::from_mode(0o755))
        .expect("open the folder");
    let proxy = folders.root.join("mesh-proxy");
    std::fs::copy(&proxy_bin, &proxy).expect("copy mesh-proxy");
    std::fs::set_permissions(&proxy, std::fs::Permissions::from_mode(0o755))
        .expect("make the copy executable");

    let mesh = NetNs::new();
    let vm = NetNs::new();
    mesh.link(&vm, &format!("{MESH_IP}/24"), &format!("{VM_IP}/24"));
    // The VM reaches the mesh's Services by their cluster IPs, as a host routed to a cluster.
    vm.run(["ip", "route", "add", "10.96.0.0/16", "via", MESH_IP]);

    // The mesh side: the controller, and the pod web (its app and its proxy).
    let controller = folders.config();
    let _controller = mesh.spawn([
        controller_bin.display().to_string(),
        "--discovery=file".to_owned(),
        format!("--config-dir={}", controller.display()),
        format!("--identity-dir={}", folders.identity().display()),
        format!("--grpc-listen={MESH_IP}:8086"),
        format!("--admin-listen={MESH_IP}:9990"),
        "--poll-interval-ms=50".to_owned(),
        "--log-level=warn".to_owned(),
    ]);
    let mut web_app = mesh.spawn([echo, &format!("{MESH_IP}:8081"), "web"]);
    assert!(web_app.read_line().starts_with("listening on "));
    let _web = mesh.spawn(proxy_argv(
        &proxy, &folders, "web-4", "web", MESH_IP, MESH_IP,
    ));

    // The host: its capture (`mesh-proxy init`, as `meshctl external-workload` prints), its
    // app, and its proxy as the proxy's own user, which the capture lets through.
    vm.run([proxy_bin.display().to_string(), "init".to_owned()]);
    let mut vm_app = vm.spawn([echo, "0.0.0.0:8080", "vm"]);
    assert!(vm_app.read_line().starts_with("listening on "));
    let mut as_proxy_user: Vec<String> =
        ["setpriv", "--reuid=2102", "--regid=2102", "--clear-groups"]
            .map(str::to_owned)
            .to_vec();
    as_proxy_user.extend(proxy_argv(
        &proxy,
        &folders,
        "legacy-5",
        "legacy",
        "0.0.0.0",
        "127.0.0.1",
    ));
    let _vm_proxy = vm.spawn(as_proxy_user);
    // Inside the host, its own address is captured like any other: loopback reaches the admin.
    eventually_answers(&vm, &["--fail", "http://127.0.0.1:4191/ready"], "ready");
    eventually_answers(
        &mesh,
        &["--fail", &format!("http://{MESH_IP}:4191/ready")],
        "ready",
    );

    // The mesh calls the VM by its Service, through the VM's proxy, over mutual TLS.
    eventually_answers(
        &mesh,
        &[
            "-x",
            &format!("http://{MESH_IP}:4140"),
            "http://legacy.shop.svc.cluster.local/",
        ],
        "vm",
    );
    // The VM's app calls a Service by its cluster IP, knowing nothing of the mesh: captured,
    // it leaves through the VM's proxy with the VM's identity.
    // web's app answers `web ...` (what it says of its original destination does not matter:
    // its proxy connects to it directly).
    eventually_answers(&vm, &["http://10.96.0.20/"], "web");
    let web_metrics =
        curl_in(&mesh, &[&format!("http://{MESH_IP}:4191/metrics")]).expect("metrics");
    assert!(
        metric(
            &web_metrics,
            "request_total",
            &[
                "direction=\"inbound\"",
                "tls=\"true\"",
                "client_id=\"spiffe://cluster.local/ns/shop/sa/legacy\""
            ]
        ) >= 1.0,
        "web's proxy saw the VM's identity:\n{web_metrics}"
    );
    // A plain client connecting to the VM's app port is captured into the VM's proxy too.
    let vm_metrics = curl_in(&vm, &["http://127.0.0.1:4191/metrics"]).expect("metrics");
    let before = metric(
        &vm_metrics,
        "request_total",
        &["direction=\"inbound\"", "tls=\"false\""],
    );
    eventually_answers(&mesh, &[&format!("http://{VM_IP}:8080/")], "vm");
    let vm_metrics = curl_in(&vm, &["http://127.0.0.1:4191/metrics"]).expect("metrics");
    assert!(
        metric(
            &vm_metrics,
            "request_total",
            &["direction=\"inbound\"", "tls=\"false\""]
        ) > before,
        "the VM's proxy served the captured connection:\n{vm_metrics}"
    );
}
