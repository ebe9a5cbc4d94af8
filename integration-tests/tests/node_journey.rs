//! The journey a user makes, on a real single-node Kubernetes (kubelet, containerd, CNI,
//! kube-proxy, DNS: `scripts/k8s-node`), with the mesh's own images imported into the node:
//!
//! 1. `meshctl check --pre`, `meshctl install --apply` from the images, `meshctl check` green;
//! 2. an ordinary app in an injected namespace: the API server calls the webhook, the pods run
//!    mesh-init and mesh-proxy, each proxy gets its certificate with its kubelet-mounted token;
//! 3. the client reaches the server by its Service name over mutual TLS (the client's identity
//!    in the server proxy's metrics), balanced over both replicas; a `deny` default policy
//!    answers 403; an EgressNetwork allows one path of a server outside the mesh and denies
//!    the rest; `meshctl check --proxy` green; `meshctl inject` gives the webhook's spec;
//! 4. lifecycle: the app starts after its proxy is ready, a Job's pod completes, a rollout
//!    restart under traffic fails no request, a deleted pod leaves nothing on the node;
//! 5. `meshctl uninstall --delete` leaves nothing; restarted pods run unmeshed; a second
//!    install works.
//!
//! Needs root; says why and fails under `CI=true` when not. A step that fails prints what a
//! user would look at: the pods, the events, the proxies' last log lines.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mesh_integration_tests::netns::require_root;
use mesh_integration_tests::{bin_path, local, workspace_root};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const BUSYBOX: &str = "localhost/k8s-node/busybox:1";

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The stdout of `program ARGS`, which must have succeeded.
fn succeeded(program: &str, args: &[&str], output: Output) -> String {
    assert!(
        output.status.success(),
        "{program} {}:\n{}",
        args.join(" "),
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The node, stopped (and the host put back) when dropped; when the test is failing, first
/// prints what a user would look at.
struct Node {
    kubeconfig: PathBuf,
}

impl Node {
    fn up() -> Node {
        let output = Command::new(workspace_root().join("scripts/k8s-node"))
            .arg("up")
            .output()
            .expect("run scripts/k8s-node up");
        let node = Node {
            kubeconfig: PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()),
        };
        assert!(
            output.status.success(),
            "the node did not start:\n{}",
            text(&output)
        );
        node
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// `kubectl ARGS`, which must succeed; its stdout.
    fn kubectl_ok(&self, args: &[&str]) -> String {
        succeeded("kubectl", args, self.kubectl(args))
    }

    fn apply(&self, yaml: &str) {
        let path = std::env::temp_dir().join(format!("mesh-journey-{}.yaml", std::process::id()));
        std::fs::write(&path, yaml).expect("write YAML");
        self.kubectl_ok(&["apply", "-f", path.to_str().expect("UTF-8 path")]);
    }

    fn meshctl(&self, args: &[&str]) -> Output {
        Command::new(bin_path("meshctl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run meshctl")
    }

    fn meshctl_ok(&self, args: &[&str]) -> String {
        succeeded("meshctl", args, self.meshctl(args))
    }

    fn rollout(&self, namespace: &str, deployment: &str) {
        self.kubectl_ok(&[
            "rollout",
            "status",
            "-n",
            namespace,
            &format!("deploy/{deployment}"),
            "--timeout=120s",
        ]);
    }

    /// Names of the live pods of `namespace` with label `selector`: not finished, not being
    /// deleted (a rollout is complete while the old pods still terminate).
    fn pods(&self, namespace: &str, selector: &str) -> Vec<String> {
        let list: serde_json::Value = serde_json::from_str(&self.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            selector,
            "--field-selector=status.phase!=Succeeded,status.phase!=Failed",
            "-o",
            "json",
        ]))
        .expect("kubectl get pods -o json");
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
            .filter_map(|pod| pod["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    }

    fn jsonpath(&self, namespace: &str, object: &str, path: &str) -> String {
        self.kubectl_ok(&[
            "get",
            "-n",
            namespace,
            object,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }

    /// What a user would look at when something failed.
    fn diagnose(&self) {
        eprintln!(
            "==== pods\n{}",
            text(&self.kubectl(&["get", "pods", "-A", "-o", "wide"]))
        );
        eprintln!(
            "==== events\n{}",
            text(&self.kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"]))
        );
        for namespace in ["mesh-system", "shop"] {
            let names = self.kubectl(&["get", "pods", "-n", namespace, "-o", "name"]);
            for pod in String::from_utf8_lossy(&names.stdout).lines() {
                for container in ["mesh-proxy", "mesh-controller", "mesh-injector"] {
                    let logs =
                        self.kubectl(&["logs", "-n", namespace, pod, "-c", container, "--tail=20"]);
                    if logs.status.success() {
                        eprintln!("==== {namespace} {pod} {container}\n{}", text(&logs));
                    }
                }
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.diagnose();
        }
        let output = Command::new(workspace_root().join("scripts/k8s-node"))
            .arg("down")
            .output();
        if let Ok(output) = output
            && !output.status.success()
        {
            eprintln!("scripts/k8s-node down failed:\n{}", text(&output));
        }
    }
}

/// Polls `check` until it returns `Some`, failing after `timeout` with `what`.
fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    local::wait_for(timeout, check, || what.to_owned())
}

/// The mesh's images from this build (the debug binaries: a release build would take most of
/// CI's time), as `just images` makes them.
fn images() -> Vec<PathBuf> {
    let output = Command::new(workspace_root().join("scripts/images"))
        .env("MESH_IMAGES_PROFILE", "debug")
        .output()
        .expect("run scripts/images");
    assert!(
        output.status.success(),
        "scripts/images:\n{}",
        text(&output)
    );
    ["proxy", "controller", "injector"]
        .iter()
        .map(|name| workspace_root().join(format!("target/images/{name}.tar")))
        .collect()
}

const SERVER: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations:
    mesh.dev/inject: enabled
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: httpd
        image: BUSYBOX
        imagePullPolicy: Never
        command: [sh, -c, 'mkdir -p /www && echo "hello from $(hostname)" > /www/index.html && exec httpd -f -p 8080 -h /www']
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop}
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vault, namespace: shop}
spec:
  selector: {matchLabels: {app: vault}}
  template:
    metadata:
      labels: {app: vault}
      annotations: {config.mesh.dev/default-inbound-policy: deny}
    spec:
      # busybox httpd runs as PID 1 without a SIGTERM handler, so only the grace period's
      # SIGKILL stops it: the default 30 s made the deletion below outlast its bound in CI.
      terminationGracePeriodSeconds: 10
      containers:
      - name: httpd
        image: BUSYBOX
        imagePullPolicy: Never
        command: [sh, -c, 'mkdir -p /www && echo secret > /www/index.html && exec httpd -f -p 8080 -h /www']
        ports: [{containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: shop}
spec:
  selector: {app: vault}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// A client that GETs the server twice a second and logs `ok <body>` or `fail <error>`.
const CLIENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: shop}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers:
      - name: curl
        image: BUSYBOX
        imagePullPolicy: Never
        command: [sh, -c, 'while true; do if timeout 3 wget -qO- http://server/ >/tmp/out 2>/tmp/err; then echo "ok $(cat /tmp/out)"; else echo "fail $(cat /tmp/err)"; fi; sleep 0.5; done']
"#;

const JOB: &str = r#"apiVersion: batch/v1
kind: Job
metadata: {name: report, namespace: shop}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: report
        image: BUSYBOX
        imagePullPolicy: Never
        command: [sh, -c, 'timeout 5 wget -qO- http://server/ && echo done']
"#;

/// Denies what `shop` sends to the node's own address (outside the mesh: no pod or Service
/// has it), but `/allowed` on port 18080.
const EGRESS: &str = r#"apiVersion: policy.mesh.dev/v1alpha1
kind: EgressNetwork
metadata: {name: node, namespace: shop}
spec:
  networks: [{cidr: 10.200.0.1/32}]
  trafficPolicy: Deny
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: node-allowed, namespace: shop}
spec:
  parentRefs: [{group: policy.mesh.dev, kind: EgressNetwork, name: node, port: 18080}]
  rules: [{matches: [{path: {type: PathPrefix, value: /allowed}}]}]
"#;

/// A server outside the mesh on the node's address (where pods reach the API server and DNS
/// too), answering `outside` for 3 minutes; the client pod's calls to it pass its EgressNetwork.
fn egress_on_the_node(node: &Node, client_pod: &str) {
    let listener = std::net::TcpListener::bind("10.200.0.1:18080").expect("bind 10.200.0.1:18080");
    listener.set_nonblocking(true).expect("non-blocking");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    use std::io::{Read, Write};
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = stream.read(&mut [0; 4096]);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\noutside\n",
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    node.apply(EGRESS);
    let get = |path: &str| {
        let request = format!(
            "(printf 'GET {path} HTTP/1.1\\r\\nHost: node.example\\r\\nConnection: close\\r\\n\\r\\n'; \
             sleep 3) | timeout 5 nc 10.200.0.1 18080"
        );
        let output = node.kubectl(&[
            "exec", "-n", "shop", client_pod, "-c", "curl", "--", "sh", "-c", &request,
        ]);
        text(&output).to_lowercase()
    };
    // Until the client's proxy has the policy (it asks again for an unknown address every 10 s).
    let denied = wait_for("the EgressNetwork to deny", Duration::from_secs(60), || {
        let answer = get("/denied");
        answer.contains("403 forbidden").then_some(answer)
    });
    assert!(
        denied.contains("mesh-error: egress denied") && denied.contains("egressnetwork shop/node"),
        "{denied}"
    );
    let allowed = get("/allowed/1");
    assert!(
        allowed.contains("200 ok") && allowed.contains("outside"),
        "{allowed}"
    );
}

fn with_busybox(yaml: &str) -> String {
    yaml.replace("BUSYBOX", BUSYBOX)
}

/// The client's log lines so far.
fn client_log(node: &Node) -> Vec<String> {
    node.kubectl_ok(&["logs", "-n", "shop", "deploy/client", "-c", "curl"])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The names of what a pod spec carries: containers with their images, init containers,
/// volumes. What the webhook adds and `meshctl inject` adds must agree on these.
fn shape(spec: &serde_json::Value) -> BTreeSet<String> {
    let mut shape = BTreeSet::new();
    for (list, what) in [("initContainers", "init"), ("containers", "container")] {
        for container in spec[list].as_array().into_iter().flatten() {
            shape.insert(format!(
                "{what} {} {} {}",
                container["name"].as_str().unwrap_or(""),
                container["image"].as_str().unwrap_or(""),
                container["args"]
            ));
            for var in container["env"].as_array().into_iter().flatten() {
                shape.insert(format!(
                    "env {} {}",
                    container["name"].as_str().unwrap_or(""),
                    var["name"].as_str().unwrap_or("")
                ));
            }
        }
    }
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or("");
        // The API server adds the ServiceAccount token volume to every pod itself.
        if !name.starts_with("default-token") && !name.starts_with("kube-api-access") {
            shape.insert(format!("volume {name}"));
        }
    }
    shape
}

#[test]
fn a_user_installs_the_mesh_on_a_real_node_and_meshes_an_app() {
    if !require_root("node_journey") {
        return;
    }
    let images = images();
    let node = Node::up();
    let imported = Command::new(workspace_root().join("scripts/k8s-node"))
        .arg("import")
        .args(&images)
        .output()
        .expect("import the images");
    assert!(imported.status.success(), "import:\n{}", text(&imported));

    // 1. Install from the images, as the README says.
    node.meshctl_ok(&["check", "--pre"]);
    node.meshctl_ok(&[
        "install",
        "--registry",
        "localhost/mesh",
        "--tag",
        VERSION,
        "--apply",
        "--ha",
    ]);
    node.rollout("mesh-system", "mesh-controller");
    node.rollout("mesh-system", "mesh-injector");
    wait_for(
        "meshctl check is all green",
        Duration::from_secs(60),
        || node.meshctl(&["check"]).status.success().then_some(()),
    );

    // 2. An ordinary app in an injected namespace; the client starts once the server serves.
    node.apply(&with_busybox(SERVER));
    node.rollout("shop", "server");
    node.rollout("shop", "vault");
    let server_pods = node.pods("shop", "app=server");
    assert_eq!(server_pods.len(), 2, "{server_pods:?}");
    for pod in &server_pods {
        let containers = node.jsonpath("shop", &format!("pod/{pod}"), "{.spec.containers[*].name}");
        assert_eq!(containers, "mesh-proxy httpd", "the webhook injected {pod}");
        let init = node.jsonpath(
            "shop",
            &format!("pod/{pod}"),
            "{.spec.initContainers[*].name}",
        );
        assert_eq!(init, "mesh-init", "{pod}");
    }
    node.apply(&with_busybox(CLIENT));
    node.rollout("shop", "client");

    // 3. By Service name, through both proxies, over mutual TLS, over both replicas.
    let log = wait_for(
        "the client reaching both replicas",
        Duration::from_secs(60),
        || {
            let log = client_log(&node);
            server_pods
                .iter()
                .all(|pod| {
                    log.iter()
                        .any(|line| line == &format!("ok hello from {pod}"))
                })
                .then_some(log)
        },
    );
    // The app started after its proxy was ready: its very first request succeeded.
    assert!(log[0].starts_with("ok "), "the first request: {log:?}");
    let server_ip = node.jsonpath(
        "shop",
        &format!("pod/{}", server_pods[0]),
        "{.status.podIP}",
    );
    let metrics = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            &format!("http://{server_ip}:4191/metrics"),
        ])
        .output()
        .expect("curl the server proxy's metrics");
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let client_id = "client_id=\"spiffe://cluster.local/ns/shop/sa/default\"";
    assert!(
        metrics.lines().any(
            |line| line.starts_with("request_total{direction=\"inbound\"")
                && line.contains("tls=\"true\"")
                && line.contains(client_id)
        ),
        "the server proxy counts the client's requests with its identity:\n{metrics}"
    );
    // Watching it from a laptop, with only the kubeconfig: meshctl reaches the controller by a
    // port-forward through the API server; tap and stats need a user RBAC allows. The admin
    // kubeconfig's user has a client certificate, not a token, so it is told how to send one.
    let refused = node.meshctl(&["-n", "shop", "stat", "deploy"]);
    assert!(
        !refused.status.success() && text(&refused).contains("only to Kubernetes users"),
        "stat without a token: {}",
        text(&refused)
    );
    node.kubectl_ok(&["-n", "shop", "create", "serviceaccount", "watcher"]);
    node.kubectl_ok(&[
        "-n",
        "shop",
        "create",
        "rolebinding",
        "watcher-admin",
        "--clusterrole=admin",
        "--serviceaccount=shop:watcher",
    ]);
    let token = node.kubectl_ok(&["-n", "shop", "create", "token", "watcher"]);
    let token = token.trim();
    let stat = wait_for(
        "stat of the server through a port-forward",
        Duration::from_secs(60),
        || {
            let out = node.meshctl(&[
                "-n", "shop", "stat", "deploy", "-o", "json", "--token", token,
            ]);
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            rows.as_array()?
                .iter()
                .any(|row| {
                    row["resource"]["name"] == "server"
                        && row["success_count"].as_u64().is_some_and(|n| n > 0)
                })
                .then(|| text(&out))
        },
    );
    eprintln!("meshctl stat through the API server:\n{stat}");
    // The kubelet's probes pass the server's proxy too (plaintext, no identity): among a
    // few requests, the client's carry its identity.
    let tap = node.meshctl_ok(&[
        "-n",
        "shop",
        "tap",
        "deploy/server",
        "--max",
        "10",
        "--duration",
        "20s",
        "-o",
        "json",
        "--token",
        token,
    ]);
    assert!(
        tap.lines().any(|line| line
            .contains("\"source_identity\":\"spiffe://cluster.local/ns/shop/sa/default\"")),
        "tap through the API server shows requests with the caller's identity:\n{tap}"
    );
    // Who calls whom, with which identities; and the top paths.
    let edges = wait_for("the client -> server edge", Duration::from_secs(30), || {
        let out = node.meshctl(&["-n", "shop", "edges", "-o", "json", "--token", token]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        report["edges"]
            .as_array()?
            .iter()
            .any(|edge| {
                edge["source"]["name"] == "client"
                    && edge["destination"]["name"] == "server"
                    && edge["client_identity"] == "spiffe://cluster.local/ns/shop/sa/default"
            })
            .then(|| text(&out))
    });
    eprintln!("meshctl edges through the API server:\n{edges}");
    let top = node.meshctl_ok(&[
        "-n",
        "shop",
        "top",
        "deploy/server",
        "--duration",
        "5s",
        "-o",
        "json",
        "--token",
        token,
    ]);
    let rows: serde_json::Value = serde_json::from_str(&top).expect("top -o json");
    assert!(
        rows.as_array().is_some_and(|rows| rows
            .iter()
            .any(|r| r["path"] == "/" && r["count"].as_u64() > Some(0))),
        "top through the API server counts GET /: {top}"
    );
    let client_pod = node.pods("shop", "app=client").remove(0);
    let denied = node.kubectl(&[
        "exec",
        "-n",
        "shop",
        &client_pod,
        "-c",
        "curl",
        "--",
        "sh",
        "-c",
        // A raw request: busybox wget stops at the status line of an error, before the headers.
        "(printf 'GET / HTTP/1.1\\r\\nHost: vault\\r\\nConnection: close\\r\\n\\r\\n'; sleep 3) | timeout 5 nc vault 80",
    ]);
    let denied = text(&denied).to_lowercase();
    assert!(
        denied.contains("403 forbidden") && denied.contains("mesh-error:"),
        "vault denies, saying why in mesh-error: {denied}"
    );
    egress_on_the_node(&node, &client_pod);
    let proxies = node.meshctl_ok(&["check", "--proxy"]);
    assert!(
        proxies.contains("every proxy ready and current")
            && proxies.contains(
                "every certificate valid, renewed in time, under the control plane's anchors"
            ),
        "{proxies}"
    );
    // `meshctl inject` of the same YAML, with the installed trust anchors and proxy image,
    // gives the pod spec the webhook gave.
    let scratch = std::env::temp_dir().join(format!("mesh-journey-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch folder");
    let anchors = scratch.join("anchors.pem");
    std::fs::write(
        &anchors,
        node.kubectl_ok(&[
            "get",
            "configmap",
            "-n",
            "mesh-system",
            "mesh-identity-trust-roots",
            "-o",
            "jsonpath={.data.ca-bundle\\.crt}",
        ]),
    )
    .expect("write the anchors");
    let server_yaml = scratch.join("server.yaml");
    std::fs::write(&server_yaml, with_busybox(SERVER)).expect("write YAML");
    let injected = node.meshctl_ok(&[
        "inject",
        server_yaml.to_str().expect("path"),
        "--trust-anchors-file",
        anchors.to_str().expect("path"),
        "--proxy-image",
        &format!("localhost/mesh/proxy:{VERSION}"),
    ]);
    let injected_yaml = scratch.join("injected.yaml");
    std::fs::write(&injected_yaml, &injected).expect("write the injected YAML");
    // kubectl prints one JSON object per document of the stream.
    let as_json = node.kubectl_ok(&[
        "create",
        "--dry-run=client",
        "-o",
        "json",
        "-f",
        injected_yaml.to_str().expect("path"),
    ]);
    let offline = serde_json::Deserializer::from_str(&as_json)
        .into_iter::<serde_json::Value>()
        .map(|object| object.expect("kubectl reads what meshctl inject wrote"))
        .find(|object| object["kind"] == "Deployment" && object["metadata"]["name"] == "server")
        .unwrap_or_else(|| panic!("meshctl inject printed the server Deployment: {injected}"));
    let live: serde_json::Value = serde_json::from_str(&node.kubectl_ok(&[
        "get",
        "-n",
        "shop",
        &format!("pod/{}", server_pods[0]),
        "-o",
        "json",
    ]))
    .expect("the pod as JSON");
    assert_eq!(
        shape(&offline["spec"]["template"]["spec"]),
        shape(&live["spec"]),
        "meshctl inject and the webhook made the same pod"
    );

    // 4. A Job's pod completes: its proxy exits when the job's container has.
    node.apply(&with_busybox(JOB));
    wait_for("the Job to complete", Duration::from_secs(60), || {
        (node.jsonpath("shop", "job/report", "{.status.succeeded}") == "1").then_some(())
    });
    // HA: a controller replica killed under steady traffic fails no request; the proxies
    // reconnect to the others, which then carry the rollout below (new endpoints, new
    // certificates), and meshctl's port-forward finds a Ready replica.
    let count = |prefix: &str| {
        client_log(&node)
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    };
    let controllers = node.pods("mesh-system", "mesh.dev/control-plane-component=controller");
    assert_eq!(
        controllers.len(),
        3,
        "--ha runs 3 controllers: {controllers:?}"
    );
    let (failed_before_kill, ok_before_kill) = (count("fail"), count("ok"));
    node.kubectl_ok(&[
        "-n",
        "mesh-system",
        "delete",
        "pod",
        &controllers[0],
        "--grace-period=0",
        "--force",
    ]);
    wait_for(
        "10 s of traffic after a controller was killed",
        Duration::from_secs(60),
        || (count("ok") >= ok_before_kill + 20).then_some(()),
    );
    assert_eq!(
        count("fail"),
        failed_before_kill,
        "requests failed when a controller replica was killed"
    );
    node.meshctl_ok(&["-n", "shop", "stat", "deploy", "--token", token]);

    // An upgrade in place under the same steady traffic: `meshctl upgrade` applies and prunes,
    // then the control plane rolls (as a new version's images would make it) one replica at a
    // time; no request fails. (There is one version's images here; the protos' wire format
    // across versions is pinned by mesh-proto's compat test.)
    let failed_before_upgrade = count("fail");
    node.meshctl_ok(&[
        "upgrade",
        "--registry",
        "localhost/mesh",
        "--tag",
        VERSION,
        "--ha",
    ]);
    node.kubectl_ok(&[
        "rollout",
        "restart",
        "-n",
        "mesh-system",
        "deploy/mesh-controller",
        "deploy/mesh-injector",
    ]);
    node.rollout("mesh-system", "mesh-controller");
    node.rollout("mesh-system", "mesh-injector");
    let ok_after_upgrade = count("ok");
    wait_for("traffic after the upgrade", Duration::from_secs(60), || {
        (count("ok") >= ok_after_upgrade + 10).then_some(())
    });
    assert_eq!(
        count("fail"),
        failed_before_upgrade,
        "requests failed during the upgrade"
    );

    // A rollout restart under steady traffic fails no request.
    let failed_before = client_log(&node)
        .iter()
        .filter(|l| l.starts_with("fail"))
        .count();
    node.kubectl_ok(&["rollout", "restart", "-n", "shop", "deploy/server"]);
    node.rollout("shop", "server");
    let new_servers = node.pods("shop", "app=server");
    wait_for(
        "traffic on the new replicas",
        Duration::from_secs(30),
        || {
            let log = client_log(&node);
            new_servers
                .iter()
                .all(|pod| {
                    log.iter()
                        .any(|line| line == &format!("ok hello from {pod}"))
                })
                .then_some(())
        },
    );
    let log = client_log(&node);
    let failed: Vec<_> = log.iter().filter(|l| l.starts_with("fail")).collect();
    assert_eq!(
        failed.len(),
        failed_before,
        "requests failed during the rollout: {failed:?}"
    );
    // A deleted pod leaves no network namespace behind, and capture never touches the host.
    let netns = || {
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    let before = netns();
    let vault = node.pods("shop", "app=vault").remove(0);
    let deleting = Instant::now();
    node.kubectl_ok(&["delete", "-n", "shop", "deploy/vault", "--wait=true"]);
    wait_for("the vault pod gone", Duration::from_secs(60), || {
        let found = node.kubectl(&["get", "-n", "shop", &format!("pod/{vault}")]);
        (!found.status.success()).then_some(())
    });
    eprintln!(
        "the vault pod was gone {:?} after its deletion",
        deleting.elapsed()
    );
    wait_for(
        "its network namespace gone",
        Duration::from_secs(30),
        || (netns() < before).then_some(()),
    );
    let host_rules = Command::new("iptables-save")
        .output()
        .expect("iptables-save");
    assert!(
        !String::from_utf8_lossy(&host_rules.stdout).contains("MESH_"),
        "the mesh's capture rules live in pods, never on the host"
    );

    // 5. Uninstall leaves nothing; restarted pods run unmeshed; a second install works.
    node.meshctl_ok(&["uninstall", "--delete"]);
    wait_for("mesh-system gone", Duration::from_secs(90), || {
        (!node
            .kubectl(&["get", "namespace", "mesh-system"])
            .status
            .success())
        .then_some(())
    });
    for (kind, name) in [
        ("crd", "servers.policy.mesh.dev"),
        ("mutatingwebhookconfiguration", "mesh-injector"),
        ("clusterrole", "mesh-controller"),
    ] {
        assert!(
            !node.kubectl(&["get", kind, name]).status.success(),
            "{kind} {name} left after uninstall"
        );
    }
    node.kubectl_ok(&[
        "rollout",
        "restart",
        "-n",
        "shop",
        "deploy/server",
        "deploy/client",
    ]);
    node.rollout("shop", "server");
    node.rollout("shop", "client");
    for pod in node.pods("shop", "app=server") {
        let containers = node.jsonpath("shop", &format!("pod/{pod}"), "{.spec.containers[*].name}");
        assert_eq!(containers, "httpd", "{pod} runs unmeshed");
    }
    let unmeshed = node.pods("shop", "app=server");
    wait_for(
        "the unmeshed client reaching the server",
        Duration::from_secs(30),
        || {
            let log = client_log(&node);
            unmeshed
                .iter()
                .any(|pod| {
                    log.iter()
                        .any(|line| line == &format!("ok hello from {pod}"))
                })
                .then_some(())
        },
    );
    node.meshctl_ok(&[
        "install",
        "--registry",
        "localhost/mesh",
        "--tag",
        VERSION,
        "--apply",
    ]);
    node.rollout("mesh-system", "mesh-controller");
    wait_for(
        "meshctl check green after reinstalling",
        Duration::from_secs(60),
        || node.meshctl(&["check"]).status.success().then_some(()),
    );
}
