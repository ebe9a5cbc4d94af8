//! `meshctl install --apply`, `meshctl check` and `meshctl uninstall --delete` against a real
//! API server. The test cluster has no kubelet, so the control plane runs as local processes
//! pointed at it (the injector at the `--webhook-url` the install was given, both with the key
//! material the install put in the cluster), and the test plays the kubelet's one part that
//! `check` reads: it marks the control plane's pods Ready once those processes answer.
//! Checked: `check --pre` passes; `check` fails before the install and passes after it; the API
//! server injects a Pod of an annotated namespace through the installed webhook and leaves one
//! of a plain namespace alone; `check` shows the right cross and fix for a controller that is
//! not ready, missing CRDs, an expired webhook certificate and an issuer not signed by the
//! anchor; uninstall removes it all.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use mesh_integration_tests::bin_path;
use mesh_integration_tests::cluster::Cluster;
use mesh_integration_tests::process::{Process, free_port};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "mesh-system";

fn meshctl(kubeconfig: &Path, args: &[&str]) -> Output {
    let output = Command::new(bin_path("meshctl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run meshctl");
    eprintln!(
        "meshctl {args:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A bearer token of ServiceAccount `ns/name`, made for the API server's own audience as
/// `kubectl create token` makes it.
async fn token_of(client: &Client, ns: &str, name: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account: ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name},
    }))
    .expect("service account");
    accounts
        .create(&PostParams::default(), &account)
        .await
        .expect("create a ServiceAccount");
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 3600},
    }))
    .expect("token request");
    accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("a token")
        .status
        .expect("the token's status")
        .token
}

/// `meshctl stat` (`tap: false`) or `meshctl tap` of namespace `ns` (all namespaces when
/// `None`) at `controller` with `token`: whether it succeeded, and its stderr.
fn observe(
    kubeconfig: &Path,
    controller: &str,
    token: Option<&str>,
    tap: bool,
    ns: Option<&str>,
) -> (bool, String) {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    if tap {
        args.extend(["tap", "deploy/web", "--duration", "1s", "--max", "1"]);
    } else {
        args.extend(["stat", "deploy"]);
    }
    args.extend(["--controller", controller]);
    if let Some(token) = token {
        args.extend(["--token", token]);
    }
    let output = meshctl(kubeconfig, &args);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits (bounded: the controller remembers a refusal for a second) until observing as
/// `token` is no longer refused by RBAC; returns the last stderr.
fn wait_not_refused(
    kubeconfig: &Path,
    controller: &str,
    token: &str,
    tap: bool,
    ns: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, stderr) = observe(kubeconfig, controller, Some(token), tap, Some(ns));
        if !stderr.contains("may not") {
            return stderr;
        }
        assert!(
            Instant::now() < deadline,
            "still refused after the grant: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Tap and stats on a cluster: refused without a token, with a token the API server does not
/// know, and to a user RBAC does not allow (naming the user, the verb, the namespace and the
/// `kubectl create rolebinding` that grants it); served once that very command ran, in that
/// namespace only; and the installed roles reach the built-in ones by aggregation: `view`
/// may read stats but not tap, `admin` may tap.
async fn observers_are_authorized_by_rbac(client: &Client, kubeconfig: &Path, controller: &str) {
    for ns in ["observed", "observers"] {
        let namespace: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
        }))
        .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create a namespace");
    }
    let alice = token_of(client, "observers", "alice").await;

    let (ok, stderr) = observe(kubeconfig, controller, None, false, Some("observed"));
    assert!(
        !ok && stderr.contains("only to Kubernetes users"),
        "{stderr}"
    );
    let (ok, stderr) = observe(
        kubeconfig,
        controller,
        Some("made-up"),
        true,
        Some("observed"),
    );
    assert!(
        !ok && stderr.contains("does not accept the bearer token"),
        "{stderr}"
    );

    for (tap, doing, role) in [
        (false, "read the traffic stats of pods", "mesh-stats"),
        (true, "tap pods", "mesh-tap"),
    ] {
        let (ok, stderr) = observe(kubeconfig, controller, Some(&alice), tap, Some("observed"));
        assert!(!ok, "served without a grant: {stderr}");
        assert!(
            stderr.contains(&format!(
                "user \"system:serviceaccount:observers:alice\" may not {doing} in namespace \"observed\""
            )),
            "{stderr}"
        );
        let grant = stderr
            .split("an admin grants it with: ")
            .nth(1)
            .and_then(|rest| rest.lines().next())
            .unwrap_or_else(|| panic!("no grant in {stderr}"))
            .to_owned();
        assert!(grant.contains(&format!("--clusterrole={role}")), "{grant}");
        // The grant as printed, run as the admin would.
        let status = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(grant.trim_start_matches("kubectl ").split_whitespace())
            .status()
            .expect("run kubectl");
        assert!(status.success(), "{grant}: {status}");
        let stderr = wait_not_refused(kubeconfig, controller, &alice, tap, "observed");
        if tap {
            // Authorized: what is left to say is that nothing there runs the proxy.
            assert!(stderr.contains("no meshed pod matches"), "{stderr}");
        }
        // Granted in one namespace, not in another, nor in all of them.
        let (ok, stderr) = observe(kubeconfig, controller, Some(&alice), tap, Some("observers"));
        assert!(
            !ok && stderr.contains("in namespace \"observers\""),
            "{stderr}"
        );
        let (ok, stderr) = observe(kubeconfig, controller, Some(&alice), tap, None);
        assert!(!ok && stderr.contains("in all namespaces"), "{stderr}");
        assert!(
            stderr.contains("kubectl create clusterrolebinding"),
            "{stderr}"
        );
    }
    let (ok, stderr) = observe(
        kubeconfig,
        controller,
        Some(&alice),
        false,
        Some("observed"),
    );
    assert!(ok, "stats after the grant: {stderr}");

    // The built-in roles, by aggregation: view reads stats but may not tap; admin taps.
    let bob = token_of(client, "observers", "bob").await;
    let bind = |role: &str| {
        let status = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "create",
                "rolebinding",
                &format!("bob-{role}"),
                "--namespace=observed",
            ])
            .arg(format!("--clusterrole={role}"))
            .arg("--serviceaccount=observers:bob")
            .status()
            .expect("run kubectl");
        assert!(status.success(), "bind {role}: {status}");
    };
    bind("view");
    wait_not_refused(kubeconfig, controller, &bob, false, "observed");
    let (ok, stderr) = observe(kubeconfig, controller, Some(&bob), true, Some("observed"));
    assert!(
        !ok && stderr.contains("may not tap pods"),
        "view may tap: {stderr}"
    );
    bind("admin");
    let stderr = wait_not_refused(kubeconfig, controller, &bob, true, "observed");
    assert!(stderr.contains("no meshed pod matches"), "{stderr}");
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `meshctl check`'s output, asserting it failed with `cross` and `fix` among its lines.
fn assert_check_cross(kubeconfig: &Path, cross: &str, fix: &str) {
    let output = meshctl(kubeconfig, &["check"]);
    let text = stdout(&output);
    assert!(!output.status.success(), "check must fail:\n{text}");
    assert!(
        text.contains(&format!("✘ {cross}")),
        "no cross {cross:?}:\n{text}"
    );
    assert!(
        text.contains(&format!("fix: {fix}")),
        "no fix {fix:?}:\n{text}"
    );
}

fn http_ok(port: u16, path: &str) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

async fn client(cluster: &Cluster) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(&cluster.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

async fn secret_files(client: &Client, name: &str, dir: &Path) {
    let secret = Api::<Secret>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .expect("the install's secret");
    std::fs::create_dir_all(dir).expect("mkdir");
    for (key, value) in secret.data.unwrap_or_default() {
        std::fs::write(dir.join(key), value.0).expect("write a key file");
    }
}

/// What the kubelet would do once a container's readiness probe passes: sets the pods of the
/// component Ready (or not), and waits for the Deployment to count them.
async fn set_pods_ready(client: &Client, component: &str, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let selector = format!("mesh.dev/control-plane-component={component}");
    let deadline = Instant::now() + WAIT;
    loop {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .expect("list pods");
        for pod in &list.items {
            let name = pod.metadata.name.clone().expect("a name");
            let status = if ready { "True" } else { "False" };
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let patch = json!({"status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Ready", "status": status, "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": status, "lastTransitionTime": now},
                ],
            }});
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("patch a pod's status");
        }
        let deployment = deployments
            .get(&format!("mesh-{component}"))
            .await
            .expect("the deployment");
        let counted = deployment
            .status
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if !list.items.is_empty() && (counted >= 1) == ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "deploy/mesh-{component} never counted its pods ready={ready}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Creates a pod, retrying while the namespace's default ServiceAccount (token) is not there.
async fn create_pod(client: &Client, ns: &str, name: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
    }))
    .expect("a pod");
    let deadline = Instant::now() + WAIT;
    loop {
        match pods.create(&PostParams::default(), &pod).await {
            Err(kube::Error::Api(e))
                if (e.message.contains("serviceaccount")
                    || e.message.contains("service account"))
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other.expect("create a pod"),
        }
    }
}

fn has_proxy(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref().expect("spec");
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == "mesh-proxy")
}

/// A CA and a certificate for 127.0.0.1 it signed that expired yesterday (CA PEM, cert, key).
fn expired_webhook_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::new()).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(10 * 86_400)).into();
    params.not_after = (now - Duration::from_secs(86_400)).into();
    let cert = params
        .signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key))
        .expect("cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_check_and_uninstall_against_a_real_api_server() {
    let Some(cluster) = Cluster::get("install_check") else {
        return;
    };
    let kubeconfig = cluster.kubeconfig.clone();
    let client = client(&cluster).await;
    let temp = std::env::temp_dir().join(format!("mesh-install-check-{}", std::process::id()));

    // Before the install: --pre passes, check fails naming the fix.
    let pre = meshctl(&kubeconfig, &["check", "--pre"]);
    assert!(
        pre.status.success(),
        "check --pre must pass as cluster admin"
    );
    assert!(stdout(&pre).contains("✔ install-permissions"));
    assert_check_cross(
        &kubeconfig,
        "control-plane-namespace",
        "meshctl install --apply",
    );

    // Nothing to upgrade yet.
    let early = meshctl(&kubeconfig, &["upgrade"]);
    assert!(
        !early.status.success()
            && String::from_utf8_lossy(&early.stderr).contains("nothing to upgrade"),
        "upgrade before any install"
    );

    // The install, its injector at a loopback URL.
    let injector_port = free_port();
    let url = format!("https://127.0.0.1:{injector_port}/inject");
    let install = meshctl(&kubeconfig, &["install", "--apply", "--webhook-url", &url]);
    assert!(install.status.success(), "install --apply must succeed");
    for kind in [
        "CustomResourceDefinition servers.policy.mesh.dev",
        "Deployment mesh-system/mesh-controller",
        "MutatingWebhookConfiguration mesh-injector",
    ] {
        assert!(
            stdout(&install).contains(&format!("applied {kind}")),
            "{kind} not applied"
        );
    }

    // The control plane as local processes, with the install's key material.
    let identity_dir = temp.join("identity");
    let webhook_dir = temp.join("webhook");
    secret_files(&client, "mesh-identity-issuer", &identity_dir).await;
    secret_files(&client, "mesh-injector-tls", &webhook_dir).await;
    let controller_admin = free_port();
    let controller_grpc = free_port();
    let _controller = Process(
        Command::new(bin_path("mesh-controller"))
            .args(["--discovery", "kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--grpc-listen", &format!("127.0.0.1:{controller_grpc}")])
            .args(["--admin-listen", &format!("127.0.0.1:{controller_admin}")])
            .arg("--identity-dir")
            .arg(&identity_dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("start mesh-controller"),
    );
    let injector_admin = free_port();
    let _injector = Process(
        Command::new(bin_path("mesh-injector"))
            .args(["--listen", &format!("127.0.0.1:{injector_port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{injector_admin}")])
            .arg("--tls-cert")
            .arg(webhook_dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(webhook_dir.join("tls.key"))
            .arg("--trust-anchors-file")
            .arg(identity_dir.join("ca.crt"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--native-sidecars", "disabled"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start mesh-injector"),
    );
    let deadline = Instant::now() + WAIT;
    while !(http_ok(controller_admin, "/ready") && http_ok(injector_admin, "/ready")) {
        assert!(
            Instant::now() < deadline,
            "the control plane never became ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    set_pods_ready(&client, "controller", true).await;
    set_pods_ready(&client, "injector", true).await;

    // Green.
    let check = meshctl(&kubeconfig, &["check", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).expect("check -o json");
    assert!(
        check.status.success(),
        "check must pass after the install: {report:#}"
    );
    assert_eq!(report["ok"], json!(true));
    let names: Vec<&str> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for name in [
        "crds",
        "mesh-controller-ready",
        "mesh-injector-ready",
        "injector-webhook",
        "identity-issuer",
    ] {
        assert!(names.contains(&name), "no {name} check in {names:?}");
    }

    // An EgressNetwork covering the cluster's own addresses is a warning, not a failure.
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "policy.mesh.dev",
        "v1alpha1",
        "EgressNetwork",
    ));
    let networks: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &resource);
    let everything: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "policy.mesh.dev/v1alpha1", "kind": "EgressNetwork",
        "metadata": {"name": "everything", "namespace": "default"},
        "spec": {"trafficPolicy": "Deny", "networks": [{"cidr": "0.0.0.0/0"}]},
    }))
    .expect("an EgressNetwork");
    networks
        .create(&PostParams::default(), &everything)
        .await
        .expect("create an EgressNetwork");
    let check = meshctl(&kubeconfig, &["check", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).expect("check -o json");
    assert!(check.status.success(), "a warning passes: {report:#}");
    let egress = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "egress-networks")
        .unwrap_or_else(|| panic!("no egress-networks check in {report:#}"));
    assert_eq!(egress["warning"], json!(true), "{egress:#}");
    let detail = egress["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("EgressNetwork default/everything covers")
            && detail.contains("(Service default/kubernetes)"),
        "{detail}"
    );
    networks
        .delete("everything", &Default::default())
        .await
        .expect("delete the EgressNetwork");

    // An upgrade in place: a leftover of an older version (labelled as the mesh's) is pruned,
    // what is not the mesh's stays, and the identity issuer is kept.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    for (name, labels) in [
        (
            "mesh-retired",
            json!({"app.kubernetes.io/part-of": "mesh", "mesh.dev/control-plane-ns": NS}),
        ),
        ("someone-elses", json!({})),
    ] {
        let config_map: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": labels},
        }))
        .expect("config map");
        config_maps
            .create(&PostParams::default(), &config_map)
            .await
            .expect("create a ConfigMap");
    }
    let issuer = |secret: Secret| secret.data.and_then(|d| d.get("tls.crt").cloned());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let issuer_before = issuer(secrets.get("mesh-identity-issuer").await.expect("issuer"));
    let upgrade = meshctl(&kubeconfig, &["upgrade", "--webhook-url", &url]);
    assert!(upgrade.status.success(), "upgrade must succeed");
    assert!(
        stdout(&upgrade).contains("pruned ConfigMap mesh-system/mesh-retired"),
        "{}",
        stdout(&upgrade)
    );
    assert!(
        config_maps
            .get_opt("mesh-retired")
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        config_maps
            .get_opt("someone-elses")
            .await
            .expect("read")
            .is_some()
    );
    assert_eq!(
        issuer(secrets.get("mesh-identity-issuer").await.expect("issuer")),
        issuer_before,
        "the upgrade replaced the identity issuer"
    );

    observers_are_authorized_by_rbac(
        &client,
        &kubeconfig,
        &format!("127.0.0.1:{controller_grpc}"),
    )
    .await;

    // The installed webhook injects a pod of an annotated namespace, and only there.
    for (ns, annotations) in [
        ("install-meshed", json!({"mesh.dev/inject": "enabled"})),
        ("install-plain", json!({})),
    ] {
        let namespace: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "annotations": annotations},
        }))
        .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create a namespace");
    }
    assert!(
        has_proxy(&create_pod(&client, "install-meshed", "app").await),
        "not injected"
    );
    assert!(
        !has_proxy(&create_pod(&client, "install-plain", "app").await),
        "injected outside the mesh"
    );

    // Crosses, each with its fix.
    set_pods_ready(&client, "controller", false).await;
    assert_check_cross(
        &kubeconfig,
        "mesh-controller-ready: 0 of 1 replicas ready",
        "kubectl -n mesh-system describe deploy/mesh-controller",
    );
    set_pods_ready(&client, "controller", true).await;

    Api::<CustomResourceDefinition>::all(client.clone())
        .delete("servers.policy.mesh.dev", &DeleteParams::default())
        .await
        .expect("delete a CRD");
    let deadline = Instant::now() + WAIT;
    loop {
        let check = stdout(&meshctl(&kubeconfig, &["check"]));
        if check.contains("✘ crds: missing: servers.policy.mesh.dev") {
            assert!(
                check.contains("fix: meshctl install --crds | kubectl apply -f -"),
                "{check}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the missing CRD was never reported"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let (ca, crt, key) = expired_webhook_certificate();
    let patch = json!({"stringData": {"tls.crt": crt, "tls.key": key, "ca.crt": ca}});
    secrets
        .patch(
            "mesh-injector-tls",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("expire the webhook certificate");
    let webhook_patch = json!({"webhooks": [{"name": "inject.mesh.dev",
        "clientConfig": {"caBundle": k8s_openapi::ByteString(ca.into_bytes())}}]});
    Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
        client.clone(),
    )
    .patch(
        "mesh-injector",
        &PatchParams::default(),
        &Patch::Strategic(&webhook_patch),
    )
    .await
    .expect("patch the caBundle");
    assert_check_cross(
        &kubeconfig,
        "injector-webhook: the injector's certificate expired 1 days ago",
        "meshctl install --apply (renews the webhook certificate)",
    );
    // The fix fixes it: a re-install renews the expired certificate (and puts the CRD back).
    let reinstall = meshctl(&kubeconfig, &["install", "--apply", "--webhook-url", &url]);
    assert!(reinstall.status.success());
    // The injector notices its rewritten files and serves the renewed certificate.
    secret_files(&client, "mesh-injector-tls", &webhook_dir).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let text = stdout(&meshctl(&kubeconfig, &["check"]));
        if text.contains("✔ injector-webhook") {
            assert!(text.contains("✔ crds"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate never checked out"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // HA adds disruption budgets (policy/v1beta1 on this 1.20 API server, which does not
    // serve policy/v1 yet).
    let ha = meshctl(
        &kubeconfig,
        &["install", "--apply", "--ha", "--webhook-url", &url],
    );
    assert!(ha.status.success(), "install --ha must succeed");
    for name in ["mesh-controller", "mesh-injector"] {
        assert!(
            stdout(&ha).contains(&format!("applied PodDisruptionBudget mesh-system/{name}")),
            "{}",
            stdout(&ha)
        );
    }
    let pdbs = || {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["-n", NS, "get", "pdb", "-o", "name"])
            .output()
            .expect("run kubectl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(pdbs().contains("mesh-controller"), "{}", pdbs());

    // An issuer of another anchor.
    let other = temp.join("other");
    std::fs::create_dir_all(&other).expect("mkdir");
    let ca = mesh_controller::identity::GeneratedCa::generate(
        "cluster.local",
        Duration::from_secs(86_400 * 365),
        Duration::from_secs(86_400 * 365),
    )
    .expect("another CA");
    let patch =
        json!({"stringData": {"tls.crt": ca.issuer.cert_pem, "tls.key": ca.issuer.key_pem}});
    secrets
        .patch(
            "mesh-identity-issuer",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("replace the issuer");
    assert_check_cross(
        &kubeconfig,
        "identity-issuer: the identity issuer (Secret mesh-system/mesh-identity-issuer)",
        "meshctl install --apply --identity-trust-anchors-file",
    );
    let text = stdout(&meshctl(&kubeconfig, &["check"]));
    assert!(text.contains("is not signed by any trust anchor"), "{text}");

    // Uninstall removes what install made.
    let uninstall = meshctl(&kubeconfig, &["uninstall", "--delete"]);
    assert!(uninstall.status.success());
    assert_eq!(pdbs().trim(), "", "uninstall left disruption budgets");
    let webhooks =
        Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
            client.clone(),
        );
    assert!(
        webhooks
            .get_opt("mesh-injector")
            .await
            .expect("read")
            .is_none()
    );
    for role in ["mesh-tap", "mesh-stats"] {
        assert!(
            Api::<ClusterRole>::all(client.clone())
                .get_opt(role)
                .await
                .expect("read")
                .is_none(),
            "uninstall left ClusterRole {role}"
        );
    }
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let deadline = Instant::now() + WAIT;
    while crds
        .get_opt("authorizationpolicies.policy.mesh.dev")
        .await
        .expect("read")
        .is_some()
    {
        assert!(Instant::now() < deadline, "the CRDs were not removed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = std::fs::remove_dir_all(&temp);
}
