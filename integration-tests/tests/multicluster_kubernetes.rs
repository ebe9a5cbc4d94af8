//! Two real API servers, linked as users link clusters: `meshctl multicluster link` against
//! cluster east prints the link Secret (and applies it to cluster west with --to-kubeconfig);
//! west's controller (the `kubernetes` backend, in-process) then mirrors the Services east
//! exports as `<name>-east`, real Services with EndpointSlices, and a tonic client of
//! `Destination.Get` sees east's pods with their proxies' identities, and a real proxy of
//! west reaches a real proxy of east by the mirror's name over mTLS (flat networks: each
//! verifies the other cluster's workload identity, one trust anchor). The mirrors follow east:
//! endpoints scale, an unexported Service's mirror goes, a Service of west that merely has a
//! mirror's name is left alone, an invalid link is counted and ignored, mirrors stay while
//! east is unreachable, and unlinking removes them. On the way, an HTTPRoute with failover
//! moves west's `books` traffic to east when west's endpoints are gone and back, west reaches
//! east through east's gateway, and a host outside Kubernetes joins east with `meshctl
//! external-workload`'s join token.
//!
//! Each cluster is one started by `scripts/k8s-test-cluster` (even when `KUBECONFIG` is set:
//! the test needs two). When none can be had the test fails under `CI=true` and skips loudly
//! otherwise.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use mesh_controller::identity::GeneratedCa;
use mesh_controller::multicluster::MulticlusterSettings;
use mesh_controller::{Config, Discovery, IdentityOptions};
use mesh_integration_tests::bin_path;
use mesh_integration_tests::cluster::Cluster;
use mesh_integration_tests::http::{Backend, ProxyClient, loopback_ip, metric, wait_ready};
use mesh_integration_tests::process::Process;
use mesh_proto::destination::destination_client::DestinationClient;
use mesh_proto::destination::{GetDestination, Update, get_destination, update};
use serde_json::{Value, json};
use tonic::Streaming;

/// Bound on every wait for the API servers, the mirror writer and the stream.
const WAIT: Duration = Duration::from_secs(30);
const IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/books";

async fn client(cluster: &Cluster) -> Client {
    Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&cluster.kubeconfig).expect("read the kubeconfig"),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("a client config from the kubeconfig"),
    )
    .expect("a Kubernetes client")
}

/// Creates `object` (JSON) through `api`.
async fn create<K>(api: &Api<K>, object: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(object).expect("the object fits its schema");
    api.create(&PostParams::default(), &typed)
        .await
        .expect("create an object");
}

async fn namespaces(client: &Client, names: &[&str]) {
    let api: Api<Namespace> = Api::all(client.clone());
    for name in names {
        create(
            &api,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        )
        .await;
    }
}

/// A meshed pod of east (no kubelet: only its spec matters to the mirror, for its identity).
fn books_pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "books"}},
        "spec": {"serviceAccountName": "books", "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "books:test"},
                           {"name": "mesh-proxy", "image": "mesh-proxy:test"}]}})
}

/// The test's loopback block: east's pods are hosts 1-3, west's client is host 10.
const BLOCK: u8 = 61;
/// The port east's books app listens on (the slice's, the Service's targetPort).
const APP_PORT: u16 = 18080;

/// East's pod `books-<host>`'s IP.
fn pod_ip(host: u8) -> String {
    loopback_ip(BLOCK, host).to_string()
}

/// East's slice of books, with one endpoint per host of `hosts` (pod `books-<host>`).
fn books_slice(hosts: &[u8]) -> Value {
    let endpoints: Vec<Value> = hosts
        .iter()
        .map(|host| {
            json!({"addresses": [pod_ip(*host)], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": format!("books-{host}"), "namespace": "shop"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "books-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "books"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": APP_PORT, "protocol": "TCP"}],
        "endpoints": endpoints})
}

fn exported_service(name: &str, exported: bool) -> Value {
    let mut labels = json!({});
    if exported {
        labels["mesh.dev/exported"] = json!("true");
    }
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": APP_PORT, "protocol": "TCP"}]}})
}

/// Polls `check` until it gives Some, for at most [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The names of the mirror Services of `cluster` in west.
async fn mirrors(west: &Client, cluster: &str) -> Vec<String> {
    let services: Api<Service> = Api::all(west.clone());
    let params = ListParams::default().labels(&format!("multicluster.mesh.dev/cluster={cluster}"));
    let mut names: Vec<String> = services
        .list(&params)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    names.sort();
    names
}

/// Some when east's mirror `name` exists in west as `wanted`.
async fn has_mirror(west: &Client, name: &str, wanted: bool) -> Option<()> {
    let exists = mirrors(west, "east").await.iter().any(|m| m == name);
    (exists == wanted).then_some(())
}

/// What a Destination.Get client has been told: identity by endpoint.
#[derive(Default, Debug)]
struct Endpoints(BTreeMap<SocketAddr, String>);

impl Endpoints {
    fn apply(&mut self, update: &Update) {
        match &update.update {
            Some(update::Update::Add(add)) => {
                for ep in &add.endpoints {
                    let addr = SocketAddr::try_from(ep.addr.as_ref().expect("an address"))
                        .expect("a valid address");
                    let identity = ep
                        .tls_identity
                        .as_ref()
                        .map(|t| t.spiffe_id.clone())
                        .unwrap_or_default();
                    self.0.insert(
                        addr,
                        format!("{identity} inbound={}", ep.inbound_proxy_port),
                    );
                }
            }
            Some(update::Update::Remove(remove)) => {
                for a in &remove.addrs {
                    self.0
                        .remove(&SocketAddr::try_from(a).expect("a valid address"));
                }
            }
            Some(update::Update::NoEndpoints(_)) => self.0.clear(),
            None => {}
        }
    }

    fn shown(&self) -> Vec<String> {
        self.0.iter().map(|(a, id)| format!("{a} {id}")).collect()
    }
}

/// Reads updates until the client's endpoints are `want`.
async fn settle(stream: &mut Streaming<Update>, endpoints: &mut Endpoints, want: &[String]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while endpoints.shown() != want {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(update))) => endpoints.apply(&update),
            other => panic!(
                "waiting for {want:?}, have {:?}: {other:?}",
                endpoints.shown()
            ),
        }
    }
}

/// A controller of `cluster`, in-process on loopback ports, with the CA of `identity_dir`
/// (both clusters share it: one trust anchor), until the test ends; its gRPC and admin
/// addresses.
fn spawn_controller(
    cluster: &Cluster,
    identity_dir: &Path,
    multicluster: Option<MulticlusterSettings>,
) -> (SocketAddr, SocketAddr) {
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind gRPC");
    let admin = std::net::TcpListener::bind("127.0.0.1:0").expect("bind admin");
    let addrs = (
        grpc.local_addr().expect("gRPC address"),
        admin.local_addr().expect("admin address"),
    );
    for listener in [&grpc, &admin] {
        listener.set_nonblocking(true).expect("non-blocking");
    }
    let mut config = Config::new(Discovery::Kubernetes {
        kubeconfig: Some(cluster.kubeconfig.clone()),
    });
    config.identity = Some(IdentityOptions::new(identity_dir));
    config.multicluster = multicluster;
    tokio::spawn(async move {
        let grpc = tokio::net::TcpListener::from_std(grpc).expect("a tokio listener");
        let admin = tokio::net::TcpListener::from_std(admin).expect("a tokio listener");
        mesh_controller::run(config, grpc, admin, std::future::pending()).await
    });
    addrs
}

/// Installs the chart's CRD `file` (named `name`) in `client`'s cluster, established.
async fn install_crd(client: &Client, file: &str, name: &str) {
    let path = mesh_integration_tests::workspace_root()
        .join("charts/mesh/crds")
        .join(file);
    let yaml = std::fs::read_to_string(&path).expect("the CRD file");
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&yaml).expect("a CRD");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create the CRD");
    eventually(&format!("the CRD {name} established"), || async {
        let crd = crds.get(name).await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
}

/// A token of ServiceAccount `<namespace>/<account>` of `client`'s cluster for the mesh's
/// identity service (what the injector projects into a pod).
async fn token(client: &Client, namespace: &str, account: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["mesh.dev/identity"], "expirationSeconds": 3600},
    }))
    .expect("a token request");
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .expect("a token")
        .status
        .expect("the token's status")
        .token
}

/// A pod's proxy: on host `host` of the block, as `namespace/pod` with ServiceAccount
/// `account`'s `token`.
struct ProxyPod<'a> {
    host: u8,
    namespace: &'a str,
    pod: &'a str,
    account: &'a str,
    token: &'a str,
    /// More `MESH_PROXY_*` settings.
    env: &'a [(&'a str, &'a str)],
}

/// `mesh-proxy` as `spec` says, its controller at `controller`; stopped on drop.
fn proxy(controller: SocketAddr, spec: &ProxyPod<'_>, identity_dir: &Path) -> Process {
    let ProxyPod {
        host,
        namespace,
        pod,
        account,
        token,
        env,
    } = spec;
    let ip = loopback_ip(BLOCK, *host);
    let token_file = identity_dir.join(format!("{pod}.token"));
    std::fs::write(&token_file, token).expect("write the token");
    Process(
        Command::new(bin_path("mesh-proxy"))
            .envs(env.iter().copied())
            .env("MESH_PROXY_CONTROLLER_ADDR", format!("http://{controller}"))
            .env("MESH_PROXY_INBOUND_LISTEN", format!("{ip}:4143"))
            .env("MESH_PROXY_INBOUND_APP_IP", ip.to_string())
            .env("MESH_PROXY_OUTBOUND_LISTEN", format!("{ip}:4140"))
            .env("MESH_PROXY_ADMIN_LISTEN", format!("{ip}:4191"))
            .env("MESH_PROXY_NAMESPACE", namespace)
            .env("MESH_PROXY_POD", pod)
            .env(
                "MESH_PROXY_IDENTITY",
                format!("spiffe://cluster.local/ns/{namespace}/sa/{account}"),
            )
            .env("MESH_PROXY_IDENTITY_TOKEN_FILE", token_file)
            .env("MESH_PROXY_TRUST_ANCHORS_FILE", identity_dir.join("ca.crt"))
            .env("MESH_PROXY_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start mesh-proxy"),
    )
}

fn meshctl(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin_path("meshctl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run meshctl")
}

/// `meshctl check --multicluster -o json` against `kubeconfig`: each check's outcome by name.
/// (The install's own checks fail here: these clusters have no control plane installed.)
fn check_multicluster(kubeconfig: &Path) -> BTreeMap<String, Value> {
    let output = meshctl(kubeconfig, &["check", "--multicluster", "-o", "json"]);
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("check's JSON: {e}: {}", text(&output.stderr)));
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| (c["name"].as_str().unwrap_or_default().to_owned(), c.clone()))
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn metrics(admin: SocketAddr) -> String {
    mesh_integration_tests::local::http_get(&admin.to_string(), "/metrics").unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_services_are_mirrored_and_follow_the_linked_cluster() {
    let Some(east_cluster) = Cluster::start("multicluster-east") else {
        return;
    };
    let Some(west_cluster) = Cluster::start("multicluster-west") else {
        return;
    };
    let east = client(&east_cluster).await;
    let west = client(&west_cluster).await;
    namespaces(&east, &["shop", "mesh-system"]).await;
    namespaces(&west, &["shop", "mesh-system"]).await;
    install_crd(
        &east,
        "workload.mesh.dev_externalworkloads.yaml",
        "externalworkloads.workload.mesh.dev",
    )
    .await;
    install_crd(
        &west,
        "gateway.networking.k8s.io_httproutes.yaml",
        "httproutes.gateway.networking.k8s.io",
    )
    .await;

    // East: books (exported) on two meshed pods, private (not exported).
    let east_accounts: Api<ServiceAccount> = Api::namespaced(east.clone(), "shop");
    create(
        &east_accounts,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "books"}}),
    )
    .await;
    let east_pods: Api<Pod> = Api::namespaced(east.clone(), "shop");
    for host in 1..=3 {
        create(&east_pods, books_pod(&format!("books-{host}"))).await;
    }
    let east_services: Api<Service> = Api::namespaced(east.clone(), "shop");
    create(&east_services, exported_service("books", true)).await;
    create(&east_services, exported_service("private", false)).await;
    let east_slices: Api<EndpointSlice> = Api::namespaced(east.clone(), "shop");
    create(&east_slices, books_slice(&[1, 2])).await;
    // West already has a Service named like a mirror to be: it is not the mirror writer's.
    let west_services: Api<Service> = Api::namespaced(west.clone(), "shop");
    create(&west_services, exported_service("taken-east", false)).await;

    eprintln!("multicluster: The link");
    // The link, as a user makes it: printed against east...
    let printed = meshctl(
        &east_cluster.kubeconfig,
        &["multicluster", "link", "--cluster-name", "east"],
    );
    assert!(printed.status.success(), "link: {}", text(&printed.stderr));
    let secret: Value = serde_saphyr::from_str(&text(&printed.stdout)).expect("a YAML Secret");
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(
        secret["metadata"]["labels"]["multicluster.mesh.dev/cluster-name"],
        "east"
    );
    let kubeconfig = secret["stringData"]["kubeconfig"]
        .as_str()
        .expect("a kubeconfig");
    assert!(kubeconfig.contains("token:"), "{kubeconfig}");
    // ...whose reader may read but not write east.
    let reader = kube::config::Kubeconfig::from_yaml(kubeconfig).expect("a kubeconfig");
    let reader = Client::try_from(
        kube::Config::from_custom_kubeconfig(reader, &Default::default())
            .await
            .expect("the reader's config"),
    )
    .expect("the reader's client");
    let as_reader: Api<Service> = Api::namespaced(reader.clone(), "shop");
    assert!(
        as_reader.get("books").await.is_ok(),
        "the reader reads Services"
    );
    let forbidden = as_reader.delete("books", &Default::default()).await;
    assert!(
        matches!(&forbidden, Err(kube::Error::Api(s)) if s.code == 403),
        "the reader must not write: {forbidden:?}"
    );
    let reader_secrets: Api<Secret> = Api::namespaced(reader, "mesh-system");
    assert!(
        matches!(reader_secrets.list(&Default::default()).await, Err(kube::Error::Api(s)) if s.code == 403),
        "the reader must not read Secrets"
    );
    // Through a gateway east does not run: said, and nothing printed.
    let no_gateway = meshctl(
        &east_cluster.kubeconfig,
        &[
            "multicluster",
            "link",
            "--cluster-name",
            "east",
            "--gateway",
        ],
    );
    assert!(!no_gateway.status.success());
    assert!(no_gateway.stdout.is_empty());
    assert!(
        text(&no_gateway.stderr).contains("install with --multicluster-gateway"),
        "{}",
        text(&no_gateway.stderr)
    );
    // ...and applied to west.
    let applied = meshctl(
        &east_cluster.kubeconfig,
        &[
            "multicluster",
            "link",
            "--cluster-name",
            "east",
            "--to-kubeconfig",
            west_cluster.kubeconfig.to_str().expect("a UTF-8 path"),
        ],
    );
    assert!(applied.status.success(), "link: {}", text(&applied.stderr));

    eprintln!("multicluster: West's controller");
    // West's controller, with a CA (so meshed endpoints carry identities) and multicluster on.
    let identity_dir =
        std::env::temp_dir().join(format!("mesh-mc-test-identity-{}", std::process::id()));
    GeneratedCa::generate(
        "cluster.local",
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .expect("generate a CA")
    .write_dir(&identity_dir)
    .expect("write the CA");
    // Both clusters' installs share the trust anchor (what `meshctl check` compares).
    let anchors = std::fs::read_to_string(identity_dir.join("ca.crt")).expect("the anchors");
    for cluster in [&east, &west] {
        let maps: Api<ConfigMap> = Api::namespaced(cluster.clone(), "mesh-system");
        create(
            &maps,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "mesh-identity-trust-roots"},
                   "data": {"ca-bundle.crt": anchors}}),
        )
        .await;
    }
    let (grpc_addr, admin_addr) = spawn_controller(
        &west_cluster,
        &identity_dir,
        Some(MulticlusterSettings {
            resync: Duration::from_secs(3),
            ..MulticlusterSettings::new("mesh-system", "cluster.local")
        }),
    );

    eprintln!("multicluster: The mirror");
    // The mirror: a real Service in west, only for the exported one.
    let names = eventually("books-east in west", || async {
        let names = mirrors(&west, "east").await;
        (!names.is_empty()).then_some(names)
    })
    .await;
    assert_eq!(names, ["books-east"], "private is not exported");
    let mirror = west_services.get("books-east").await.expect("the mirror");
    let spec = mirror.spec.expect("a spec");
    assert!(
        spec.cluster_ip.is_some_and(|ip| !ip.is_empty()),
        "a cluster IP of west's"
    );
    assert_eq!(spec.ports.expect("ports")[0].port, 8080);
    let checks = check_multicluster(&west_cluster.kubeconfig);
    for name in [
        "multicluster-reach/east",
        "multicluster-mirrors/east",
        "multicluster-anchors/east",
    ] {
        assert_eq!(checks[name]["ok"], true, "{name}: {}", checks[name]);
    }

    eprintln!("multicluster: Discovery serves it");
    // Discovery serves it with east's pods and their proxies' identity.
    let mut destination = DestinationClient::connect(format!("http://{grpc_addr}"))
        .await
        .expect("connect to the controller");
    let mut stream = destination
        .get(GetDestination {
            target: Some(get_destination::Target::Authority(
                "books-east.shop.svc.cluster.local:8080".to_owned(),
            )),
            source: None,
        })
        .await
        .expect("Destination.Get")
        .into_inner();
    let mut endpoints = Endpoints::default();
    let ep = |host: u8| format!("{}:{APP_PORT} {IDENTITY} inbound=4143", pod_ip(host));
    settle(&mut stream, &mut endpoints, &[ep(1), ep(2)]).await;

    eprintln!("multicluster: East scales up");
    // East scales up, then down to nothing: the mirror follows.
    let apply = PatchParams::apply("multicluster-test").force();
    let scaled = |hosts: &[u8]| Patch::Apply(books_slice(hosts));
    east_slices
        .patch("books-1", &apply, &scaled(&[1, 2, 3]))
        .await
        .expect("scale east up");
    settle(&mut stream, &mut endpoints, &[ep(1), ep(2), ep(3)]).await;
    east_slices
        .patch("books-1", &apply, &scaled(&[3]))
        .await
        .expect("scale east down");
    settle(&mut stream, &mut endpoints, &[ep(3)]).await;

    eprintln!("multicluster: the flat data path");
    // The flat data path: west's client proxy calls books-east by name and reaches east's
    // books-3 through its proxy, over mTLS, each side proving its own cluster's identity.
    let east_grpc = spawn_controller(&east_cluster, &identity_dir, None).0;
    let _app = Backend::start(
        SocketAddr::new(loopback_ip(BLOCK, 3), APP_PORT),
        "books-3 in east",
    )
    .await;
    let east_proxy = proxy(
        east_grpc,
        &ProxyPod {
            host: 3,
            namespace: "shop",
            pod: "books-3",
            account: "books",
            token: &token(&east, "shop", "books").await,
            env: &[],
        },
        &identity_dir,
    );
    let west_token = {
        let accounts: Api<ServiceAccount> = Api::namespaced(west.clone(), "shop");
        create(
            &accounts,
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web"}}),
        )
        .await;
        token(&west, "shop", "web").await
    };
    let west_proxy = proxy(
        grpc_addr,
        &ProxyPod {
            host: 10,
            namespace: "shop",
            pod: "web-10",
            account: "web",
            token: &west_token,
            env: &[],
        },
        &identity_dir,
    );
    wait_ready(SocketAddr::new(loopback_ip(BLOCK, 3), 4191)).await;
    wait_ready(SocketAddr::new(loopback_ip(BLOCK, 10), 4191)).await;
    let mut app = ProxyClient::connect(
        SocketAddr::new(loopback_ip(BLOCK, 10), 4140),
        "books-east.shop.svc.cluster.local:8080",
    )
    .await;
    assert_eq!(app.get("/", &[]).await, (200, "books-3 in east".to_owned()));
    let inbound = metrics(SocketAddr::new(loopback_ip(BLOCK, 3), 4191));
    assert_eq!(
        metric(
            &inbound,
            "request_total",
            &[
                "direction=\"inbound\"",
                "tls=\"true\"",
                "client_id=\"spiffe://cluster.local/ns/shop/sa/web\"",
            ]
        ),
        1.0,
        "east's proxy served west's client over mTLS, knowing who it is:\n{inbound}"
    );
    let outbound = metrics(SocketAddr::new(loopback_ip(BLOCK, 10), 4191));
    assert_eq!(
        metric(
            &outbound,
            "response_total",
            &[
                "direction=\"outbound\"",
                "tls=\"true\"",
                &format!("server_id=\"{IDENTITY}\""),
                "status_code=\"200\"",
            ]
        ),
        1.0,
        "west's proxy verified east's workload identity:\n{outbound}"
    );

    // Failover across clusters is routing: west's own books first, east's mirror when west's
    // endpoints are gone, and back.
    eprintln!("multicluster: failover from west's books to east's");
    let _west_books = Backend::start(
        SocketAddr::new(loopback_ip(BLOCK, 11), APP_PORT),
        "books in west",
    )
    .await;
    create(&west_services, exported_service("books", false)).await;
    let west_slices: Api<EndpointSlice> = Api::namespaced(west.clone(), "shop");
    let local_books = |ips: &[String]| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "books-west", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "books"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": APP_PORT, "protocol": "TCP"}],
            "endpoints": ips.iter().map(|ip| json!({"addresses": [ip]})).collect::<Vec<_>>()})
    };
    create(&west_slices, local_books(&[pod_ip(11)])).await;
    let routes: Api<DynamicObject> = Api::namespaced_with(
        west.clone(),
        "shop",
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "gateway.networking.k8s.io",
            "v1",
            "HTTPRoute",
        )),
    );
    let failover: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "books-failover", "namespace": "shop",
                     "annotations": {"balancer.mesh.dev/failover": "true"}},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "books", "port": 8080}],
            "rules": [{"backendRefs": [{"name": "books", "port": 8080},
                                       {"name": "books-east", "port": 8080}]}],
        },
    }))
    .expect("an HTTPRoute");
    routes
        .create(&PostParams::default(), &failover)
        .await
        .expect("create the route");
    let books = "books.shop.svc.cluster.local:8080";
    let west_client = SocketAddr::new(loopback_ip(BLOCK, 10), 4140);
    let answered_by = |want: &'static str| async move {
        let mut app = ProxyClient::connect(west_client, books).await;
        let (status, backend) = app.get("/", &[]).await;
        (status == 200 && backend == want).then_some(())
    };
    eventually("west's own books", || answered_by("books in west")).await;
    west_slices
        .patch("books-west", &apply, &Patch::Apply(local_books(&[])))
        .await
        .expect("west's books scale to nothing");
    eventually("failover to east", || answered_by("books-3 in east")).await;
    west_slices
        .patch(
            "books-west",
            &apply,
            &Patch::Apply(local_books(&[pod_ip(11)])),
        )
        .await
        .expect("west's books come back");
    eventually("back to west's books", || answered_by("books in west")).await;

    // Through east's gateway, when west's pods cannot route to east's: the link names it, the
    // mirror's endpoints follow, and west's client reaches books-3 through it, the two
    // workloads still proving their own identities to each other.
    eprintln!("multicluster: through east's gateway");
    east_pods
        .patch_status(
            "books-3",
            &PatchParams::default(),
            // What east's kubelet would report: how east's controller knows the pod by its IP.
            &Patch::Merge(json!({"status": {"phase": "Running", "podIP": pod_ip(3),
                "podIPs": [{"ip": pod_ip(3)}],
                "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .expect("books-3 runs");
    let east_system: Api<ServiceAccount> = Api::namespaced(east.clone(), "mesh-system");
    create(
        &east_system,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "mesh-gateway"}}),
    )
    .await;
    let gateway_token = token(&east, "mesh-system", "mesh-gateway").await;
    let gateway = proxy(
        east_grpc,
        &ProxyPod {
            host: 20,
            namespace: "mesh-system",
            pod: "mesh-gateway-20",
            account: "mesh-gateway",
            token: &gateway_token,
            env: &[("MESH_PROXY_GATEWAY", "true")],
        },
        &identity_dir,
    );
    wait_ready(SocketAddr::new(loopback_ip(BLOCK, 20), 4191)).await;
    let gateway_addr = SocketAddr::new(loopback_ip(BLOCK, 20), 4143).to_string();
    let relinked = meshctl(
        &east_cluster.kubeconfig,
        &[
            "multicluster",
            "link",
            "--cluster-name",
            "east",
            "--gateway-address",
            &gateway_addr,
            "--to-kubeconfig",
            west_cluster.kubeconfig.to_str().expect("a UTF-8 path"),
        ],
    );
    assert!(
        relinked.status.success(),
        "link: {}",
        text(&relinked.stderr)
    );
    let relayed = format!("authority=\"gateway:{}:4143\"", pod_ip(3));
    let web = "client_id=\"spiffe://cluster.local/ns/shop/sa/web\"";
    let gateway_admin = SocketAddr::new(loopback_ip(BLOCK, 20), 4191);
    eventually("a request through east's gateway", || async {
        let mut app = ProxyClient::connect(
            SocketAddr::new(loopback_ip(BLOCK, 10), 4140),
            "books-east.shop.svc.cluster.local:8080",
        )
        .await;
        assert_eq!(app.get("/", &[]).await, (200, "books-3 in east".to_owned()));
        let through = metric(&metrics(gateway_admin), "tcp_open_total", &[&relayed, web]);
        (through >= 1.0).then_some(())
    })
    .await;
    let gateway_check = &check_multicluster(&west_cluster.kubeconfig)["multicluster-gateway/east"];
    assert_eq!(gateway_check["ok"], true, "{gateway_check}");
    let inbound = metrics(SocketAddr::new(loopback_ip(BLOCK, 3), 4191));
    assert!(
        metric(
            &inbound,
            "request_total",
            &["direction=\"inbound\"", "tls=\"true\"", web]
        ) >= 2.0,
        "through the gateway too, east's proxy saw west's client itself:\n{inbound}"
    );

    // A host outside Kubernetes joins east: `meshctl external-workload` writes its proxy's
    // settings, a join token of its ServiceAccount and the anchors; a proxy started from them
    // gets its certificate from east's controller.
    eprintln!("multicluster: a host outside Kubernetes joins east");
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "workload.mesh.dev",
        "v1alpha1",
        "ExternalWorkload",
    ));
    let workloads: Api<DynamicObject> = Api::namespaced_with(east.clone(), "shop", &resource);
    let vm: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "workload.mesh.dev/v1alpha1", "kind": "ExternalWorkload",
        "metadata": {"name": "vm-30", "labels": {"app": "vm"}},
        "spec": {"serviceAccountName": "books", "workloadIPs": [pod_ip(30)],
                 "ports": [{"name": "http", "port": APP_PORT}]},
    }))
    .expect("an ExternalWorkload");
    workloads
        .create(&PostParams::default(), &vm)
        .await
        .expect("create the ExternalWorkload");
    let vm_dir = identity_dir.join("vm-30");
    let written = meshctl(
        &east_cluster.kubeconfig,
        &[
            "-n",
            "shop",
            "external-workload",
            "vm-30",
            "--controller-addr",
            &format!("http://{east_grpc}"),
            "--out-dir",
            vm_dir.to_str().expect("a UTF-8 path"),
            "--token-lifetime",
            "1h",
        ],
    );
    assert!(
        written.status.success(),
        "external-workload: {}",
        text(&written.stderr)
    );
    assert!(
        text(&written.stdout).contains("mesh-proxy init"),
        "{}",
        text(&written.stdout)
    );
    let settings = std::fs::read_to_string(vm_dir.join("proxy.env")).expect("proxy.env");
    assert!(
        settings.contains("MESH_PROXY_IDENTITY=spiffe://cluster.local/ns/shop/sa/books"),
        "{settings}"
    );
    let vm_ip = pod_ip(30);
    let vm_proxy = Process(
        Command::new(bin_path("mesh-proxy"))
            .envs(
                settings
                    .lines()
                    .filter(|line| !line.starts_with('#'))
                    .filter_map(|line| line.split_once('=')),
            )
            // On this machine the "host" is a loopback address of its own.
            .env("MESH_PROXY_INBOUND_LISTEN", format!("{vm_ip}:4143"))
            .env("MESH_PROXY_OUTBOUND_LISTEN", format!("{vm_ip}:4140"))
            .env("MESH_PROXY_ADMIN_LISTEN", format!("{vm_ip}:4191"))
            .env("MESH_PROXY_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start the host's proxy"),
    );
    wait_ready(SocketAddr::new(loopback_ip(BLOCK, 30), 4191)).await;
    let vm_metrics = metrics(SocketAddr::new(loopback_ip(BLOCK, 30), 4191));
    assert!(
        metric(&vm_metrics, "identity_cert_expiry_timestamp_seconds", &[]) > 1.7e9,
        "the host holds a certificate issued with its join token:\n{vm_metrics}"
    );
    drop((east_proxy, west_proxy, gateway, vm_proxy));

    eprintln!("multicluster: A Service of west that has");
    // A Service of west that has a mirror's name is not taken over.
    create(&east_services, exported_service("taken", true)).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // more than a resync
    let taken = west_services.get("taken-east").await.expect("west's own");
    assert_eq!(
        taken
            .metadata
            .labels
            .unwrap_or_default()
            .get("multicluster.mesh.dev/cluster"),
        None,
        "west's own Service is left alone"
    );
    let checks = check_multicluster(&west_cluster.kubeconfig);
    let mirrors_check = &checks["multicluster-mirrors/east"];
    assert_eq!(mirrors_check["ok"], false);
    assert!(
        mirrors_check["detail"]
            .as_str()
            .is_some_and(|d| d.contains("missing shop/taken-east")),
        "{mirrors_check}"
    );
    let text_metrics = metrics(admin_addr);
    assert!(
        text_metrics
            .contains("mesh_controller_multicluster_unmirrored_services{cluster=\"east\"} 1"),
        "{text_metrics}"
    );
    assert!(
        text_metrics.contains("mesh_controller_multicluster_link_up{cluster=\"east\"} 1"),
        "{text_metrics}"
    );

    eprintln!("multicluster: A mirror removed by hand");
    // A mirror removed by hand comes back on the next resync.
    west_services
        .delete("books-east", &Default::default())
        .await
        .expect("delete the mirror by hand");
    eventually("books-east restored", || {
        has_mirror(&west, "books-east", true)
    })
    .await;

    eprintln!("multicluster: Unexported in east");
    // Unexported in east: the mirror goes.
    east_services
        .patch(
            "books",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"mesh.dev/exported": null}}})),
        )
        .await
        .expect("unexport books");
    eventually("books-east gone", || has_mirror(&west, "books-east", false)).await;
    // Its slices go with it (deleted just after the Service).
    eventually("books-east's slices gone", || async {
        let left = west_slices
            .list(&ListParams::default().labels("multicluster.mesh.dev/remote-name=books"))
            .await
            .ok()?;
        left.items.is_empty().then_some(())
    })
    .await;
    east_services
        .patch(
            "books",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"mesh.dev/exported": "true"}}})),
        )
        .await
        .expect("export books again");
    eventually("books-east back", || has_mirror(&west, "books-east", true)).await;

    eprintln!("multicluster: An invalid link");
    // An invalid link is counted and ignored; the valid one keeps working.
    let west_secrets: Api<Secret> = Api::namespaced(west.clone(), "mesh-system");
    create(
        &west_secrets,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cluster-broken",
            "labels": {"multicluster.mesh.dev/cluster-name": "Broken"}},
            "stringData": {"kubeconfig": "not: [a kubeconfig"}}),
    )
    .await;
    eventually("the invalid link counted", || async {
        metrics(admin_addr)
            .contains(
                "mesh_controller_multicluster_invalid_links_total{secret=\"cluster-broken\"} 1",
            )
            .then_some(())
    })
    .await;

    eprintln!("multicluster: East goes away");
    // East goes away: its mirrors stay as last seen, and the link is reported down.
    drop(east_cluster);
    eventually("the link reported down", || async {
        metrics(admin_addr)
            .contains("mesh_controller_multicluster_link_up{cluster=\"east\"} 0")
            .then_some(())
    })
    .await;
    assert!(
        mirrors(&west, "east")
            .await
            .contains(&"books-east".to_owned())
    );
    assert_eq!(endpoints.shown(), [ep(3)]);
    let checks = check_multicluster(&west_cluster.kubeconfig);
    let reach = &checks["multicluster-reach/east"];
    assert_eq!(reach["ok"], false, "{reach}");
    assert!(
        reach["fix"]
            .as_str()
            .is_some_and(|f| f.contains("multicluster link")),
        "{reach}"
    );

    eprintln!("multicluster: Unlinked");
    // Unlinked: the mirrors go.
    let unlinked = meshctl(
        &west_cluster.kubeconfig,
        &[
            "multicluster",
            "unlink",
            "--cluster-name",
            "east",
            "--delete",
        ],
    );
    assert!(
        unlinked.status.success(),
        "unlink: {}",
        text(&unlinked.stderr)
    );
    eventually("no mirrors of east", || async {
        mirrors(&west, "east").await.is_empty().then_some(())
    })
    .await;
    settle(&mut stream, &mut endpoints, &[]).await;
    assert!(
        west_services.get("taken-east").await.is_ok(),
        "west's own Service stays"
    );
    let again = meshctl(
        &west_cluster.kubeconfig,
        &[
            "multicluster",
            "unlink",
            "--cluster-name",
            "east",
            "--delete",
        ],
    );
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("no link to east"),
        "{}",
        text(&again.stderr)
    );

    let _ = std::fs::remove_dir_all(identity_dir);
}
