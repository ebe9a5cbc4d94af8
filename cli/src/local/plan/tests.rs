use std::path::Path;

use super::pods::expand;
use super::*;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {mesh.dev/inject: enabled}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 5432}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: app
        command: [python3, -m, http.server, "$(PORT)"]
        env:
        - {name: PORT, value: "8080"}
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        - name: GREETING
          value: "on $(POD_IP) at $$(not expanded)"
        ports: [{containerPort: 8080, name: http}]
        readinessProbe: {httpGet: {port: http, path: /healthz}}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: other}
spec:
  containers:
  - {name: main, command: [sleep, infinity]}
"#;

fn manifests(text: &str) -> Manifests {
    let mut manifests = Manifests::default();
    manifests
        .add_text(Path::new("app.yaml"), text)
        .expect("test YAML is valid");
    manifests
}

fn options(mode: Mode) -> PlanOptions {
    PlanOptions {
        mode,
        instance: DEFAULT_INSTANCE.to_owned(),
        state_dir: PathBuf::from("/run/mesh-local"),
        proxy_program: PathBuf::from("/opt/mesh/mesh-proxy"),
        controller_program: PathBuf::from("/opt/mesh/mesh-controller"),
        controller_port: 8086,
        controller_admin_port: 9990,
        inject_all: false,
        identity: None,
    }
}

fn env<'a>(container: &'a ContainerPlan, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn deployment_replicas_become_pods_owned_by_a_replicaset() {
    let plan = plan(&manifests(APP), &options(Mode::Root)).expect("plans");
    let names: Vec<String> = plan.pods.iter().map(PodPlan::key).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let web: Vec<&PodPlan> = plan.pods.iter().filter(|p| p.namespace == "shop").collect();
    assert_eq!(web.len(), 2);
    assert_ne!(web[0].name, web[1].name);
    for pod in &web {
        assert_eq!(
            pod.workload,
            WorkloadRef {
                kind: "deployment".into(),
                name: "web".into()
            }
        );
        let owner = pod
            .object
            .pointer("/metadata/ownerReferences/0")
            .expect("an owner");
        let replicaset = owner["name"].as_str().expect("owner name");
        assert!(
            pod.name.starts_with(&format!("{replicaset}-")),
            "{}",
            pod.name
        );
        assert_eq!(owner["kind"], "ReplicaSet");
        assert!(replicaset.starts_with("web-"));
    }
    let plain = &plan.pods[2];
    assert_eq!(plain.key(), "other/plain");
    assert_eq!(
        plain.workload,
        WorkloadRef {
            kind: "pod".into(),
            name: "plain".into()
        }
    );
    // Names are stable across runs: the same YAML gives the same pods.
    let again = super::plan(&manifests(APP), &options(Mode::Root)).expect("plans");
    assert_eq!(again.pods[0].name, plan.pods[0].name);
}

#[test]
fn root_mode_addresses_namespaces_and_hosts() {
    let plan = plan(&manifests(APP), &options(Mode::Root)).expect("plans");
    assert_eq!(plan.network.gateway, Ipv4Addr::new(10, 77, 0, 1));
    assert_eq!(plan.network.router_netns.as_deref(), Some("mesh-local"));
    let ips: Vec<Ipv4Addr> = plan.pods.iter().map(|p| p.ip).collect();
    assert_eq!(
        ips,
        [
            Ipv4Addr::new(10, 77, 0, 2),
            Ipv4Addr::new(10, 77, 0, 3),
            Ipv4Addr::new(10, 77, 0, 4)
        ]
    );
    let web = &plan.pods[0];
    assert_eq!(
        web.netns.as_deref(),
        Some(format!("ml-shop-{}", web.name).as_str())
    );
    // The given cluster IP is kept; the other is allocated.
    let ips: BTreeMap<&str, Option<Ipv4Addr>> = plan
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.cluster_ip))
        .collect();
    assert_eq!(ips["db"], Some(Ipv4Addr::new(10, 96, 0, 10)));
    assert_eq!(ips["web"], Some(Ipv4Addr::new(10, 78, 0, 10)));
    let hosts = web.hosts.as_deref().expect("root mode writes hosts");
    assert!(
        hosts.contains("10.78.0.10\tweb.shop.svc.cluster.local web.shop.svc web.shop web\n"),
        "{hosts}"
    );
    // Another namespace's pod gets no short name for it.
    let other = plan.pods[2].hosts.as_deref().expect("hosts");
    assert!(
        other.contains("10.78.0.10\tweb.shop.svc.cluster.local web.shop.svc web.shop\n"),
        "{other}"
    );
    // The controller's Service file carries the cluster IP.
    let service = plan
        .objects
        .iter()
        .find(|o| o.file == "service.shop.web.yaml")
        .expect("web's file");
    assert_eq!(service.object["spec"]["clusterIP"], "10.78.0.10");
}

#[test]
fn injected_pods_run_the_local_binaries_with_the_local_controller() {
    let plan = plan(&manifests(APP), &options(Mode::Root)).expect("plans");
    let web = &plan.pods[0];
    assert!(web.meshed);
    assert_eq!(
        web.proxy_admin,
        Some(SocketAddr::from(([10, 77, 0, 2], PROXY_ADMIN_PORT)))
    );
    let roles: Vec<(Role, bool, bool)> = web
        .init_containers
        .iter()
        .map(|c| (c.role, c.init, c.sidecar))
        .collect();
    assert_eq!(
        roles,
        [(Role::Capture, true, false), (Role::Proxy, true, true)]
    );
    let capture = &web.init_containers[0];
    assert_eq!(capture.argv[0], "/opt/mesh/mesh-proxy");
    assert_eq!(capture.argv[1], "init");
    let proxy = &web.init_containers[1];
    assert_eq!(proxy.argv, ["/opt/mesh/mesh-proxy"]);
    assert_eq!(proxy.run_as_user, Some(2102));
    assert_eq!(
        env(proxy, "MESH_PROXY_CONTROLLER_ADDR"),
        Some("http://10.77.0.1:8086")
    );
    assert_eq!(env(proxy, "MESH_PROXY_NAMESPACE"), Some("shop"));
    assert_eq!(env(proxy, "MESH_PROXY_WORKLOAD_KIND"), Some("deployment"));
    assert_eq!(env(proxy, "MESH_PROXY_WORKLOAD_NAME"), Some("web"));
    assert_eq!(env(proxy, "MESH_PROXY_POD"), Some(web.name.as_str()));
    assert_eq!(
        proxy.startup,
        Some(ProbePlan::Http {
            addr: SocketAddr::from(([10, 77, 0, 2], PROXY_ADMIN_PORT)),
            path: "/ready".into()
        })
    );
    // The pod that is not in an injected namespace runs as it is.
    let plain = &plan.pods[2];
    assert!(!plain.meshed);
    assert!(plain.init_containers.is_empty());
}

#[test]
fn app_containers_get_kubernetes_environment_and_expansion() {
    let plan = plan(&manifests(APP), &options(Mode::Root)).expect("plans");
    let app = &plan.pods[0].containers[0];
    assert_eq!(app.role, Role::App);
    assert_eq!(app.argv, ["python3", "-m", "http.server", "8080"]);
    assert_eq!(env(app, "POD_IP"), Some("10.77.0.2"));
    assert_eq!(
        env(app, "GREETING"),
        Some("on 10.77.0.2 at $(not expanded)")
    );
    assert_eq!(env(app, "WEB_SERVICE_HOST"), Some("10.78.0.10"));
    assert_eq!(env(app, "WEB_SERVICE_PORT"), Some("80"));
    assert_eq!(env(app, "HTTP_PROXY"), None);
    assert_eq!(
        app.readiness,
        Some(ProbePlan::Http {
            addr: SocketAddr::from(([10, 77, 0, 2], 8080)),
            path: "/healthz".into()
        })
    );
}

#[test]
fn loopback_mode_uses_loopback_addresses_and_the_http_proxy() {
    let plan = plan(&manifests(APP), &options(Mode::Loopback)).expect("plans");
    assert_eq!(plan.network.router_netns, None);
    assert_eq!(
        plan.controller.grpc,
        SocketAddr::from(([127, 77, 0, 1], 8086))
    );
    let web = &plan.pods[0];
    assert_eq!(web.ip, Ipv4Addr::new(127, 77, 0, 2));
    assert_eq!(web.netns, None);
    assert_eq!(web.hosts, None);
    let capture = &web.init_containers[0];
    assert!(capture.skipped.is_some());
    let proxy = &web.init_containers[1];
    assert_eq!(proxy.run_as_user, None);
    assert_eq!(
        env(proxy, "MESH_PROXY_OUTBOUND_LISTEN"),
        Some("127.77.0.2:4140")
    );
    assert_eq!(env(proxy, "MESH_PROXY_INBOUND_APP_IP"), Some("127.77.0.2"));
    let app = &web.containers[0];
    assert_eq!(env(app, "http_proxy"), Some("http://127.77.0.2:4140"));
    assert_eq!(env(app, "HTTP_PROXY"), Some("http://127.77.0.2:4140"));
    // Another instance takes another loopback range.
    let other = super::plan(
        &manifests(APP),
        &PlanOptions {
            instance: "test-1".into(),
            ..options(Mode::Loopback)
        },
    )
    .expect("plans");
    assert_ne!(other.pods[0].ip, web.ip);
    assert!(other.pods[0].ip.is_loopback());
}

#[test]
fn clashes_and_bad_objects_are_clear_errors() {
    let cases = [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  \
             - {name: a, command: [x], ports: [{containerPort: 80}]}\n  \
             - {name: b, command: [z], ports: [{containerPort: 80}]}\n",
            "port clash in pod default/p: port 80 is used by container \"a\" and container \"b\"",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {mesh.dev/inject: enabled}}\n\
             spec:\n  containers:\n  - {name: a, command: [x], ports: [{containerPort: 4191}]}\n",
            "port clash in pod default/p: port 4191 is used by the proxy's admin server and container \"a\"",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.9.0.1}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.9.0.1}\n",
            "Service default/b: spec.clusterIP 10.9.0.1 is also Service default/a's",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: ten}\n",
            "Service default/a: spec.clusterIP \"ten\" is not an IPv4 address",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, command: [x]}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, command: [x]}]}\n",
            "two objects are both Pod default/p",
        ),
    ];
    for (text, want) in cases {
        let error = plan(&manifests(text), &options(Mode::Root))
            .expect_err(want)
            .to_string();
        assert!(error.starts_with(want), "got {error:?}, want {want:?}");
    }
}

#[test]
fn a_container_without_command_cannot_start_and_says_why() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: nginx}]}\n";
    let plan = plan(&manifests(text), &options(Mode::Root)).expect("plans");
    let why = plan.pods[0].containers[0]
        .unrunnable
        .as_deref()
        .expect("no command");
    assert!(why.contains("has no command"), "{why}");
}

#[test]
fn expansion_follows_kubernetes() {
    let vars = BTreeMap::from([("A", "1"), ("B", "two")]);
    let cases = [
        ("$(A)", "1"),
        ("x$(A)y$(B)z", "x1ytwoz"),
        ("$$(A)", "$(A)"),
        ("$(C)", "$(C)"),
        ("$A", "$A"),
        ("$(A", "$(A"),
        ("cost: $5", "cost: $5"),
    ];
    for (text, want) in cases {
        assert_eq!(expand(text, &vars), want, "{text:?}");
    }
}

#[test]
fn identity_gives_each_proxy_its_service_account_token_and_the_anchors() {
    let options = PlanOptions {
        identity: Some(IdentityInput {
            dir: PathBuf::from("/run/mesh-local/identity"),
            trust_anchors_pem: "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".into(),
            token_secret: [7; 32],
        }),
        ..options(Mode::Root)
    };
    let plan = plan(&manifests(APP), &options).expect("plans");
    assert!(
        plan.controller
            .argv
            .contains(&"--identity-dir=/run/mesh-local/identity".to_owned())
    );
    let web = &plan.pods[0];
    let proxy = &web.init_containers[1];
    assert_eq!(
        env(proxy, "MESH_PROXY_IDENTITY"),
        Some("spiffe://cluster.local/ns/shop/sa/default")
    );
    let token_file = env(proxy, "MESH_PROXY_IDENTITY_TOKEN_FILE").expect("a token file");
    assert!(
        token_file.starts_with(&format!("/run/mesh-local/volumes/shop/{}/", web.name)),
        "{token_file}"
    );
    let file = web
        .files
        .iter()
        .find(|f| f.path == Path::new(token_file))
        .expect("the token file is written");
    assert_eq!(file.owner, Some(2102));
    // The controller's ServiceAccount carries the same token.
    let account = plan
        .objects
        .iter()
        .find(|o| o.file == "serviceaccount.shop.default.yaml")
        .expect("shop's default ServiceAccount");
    assert_eq!(
        account.object["metadata"]["annotations"]["mesh.dev/identity-token"],
        file.contents.as_str()
    );
    assert_eq!(file.contents.len(), 64);
    // Another account, another token.
    let other = plan
        .objects
        .iter()
        .find(|o| o.file == "serviceaccount.other.default.yaml")
        .expect("other's default ServiceAccount");
    assert_ne!(
        other.object["metadata"]["annotations"]["mesh.dev/identity-token"],
        file.contents.as_str()
    );
}
