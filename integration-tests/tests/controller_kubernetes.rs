//! The controller's `kubernetes` backend against a real API server (and the real EndpointSlice
//! controller): a tonic client of `Destination.Get` sees the right endpoints and identities,
//! and each change — scale up, not ready, delete, port change, API server restart, service
//! deleted — arrives as the right diff.
//!
//! The cluster: `KUBECONFIG` when set (any cluster; the API-server restart step is then
//! skipped), else one started by `scripts/k8s-test-cluster` on free loopback ports. No
//! kubelet: the test creates a Node, sets `spec.nodeName` and patches pod status itself.
//! When no cluster can be had the test fails under `CI=true` and skips loudly otherwise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_controller::identity::GeneratedCa;
use mesh_controller::{Config, Discovery, IdentityOptions};
use mesh_integration_tests::cluster::Cluster;
use mesh_proto::destination::destination_client::DestinationClient;
use mesh_proto::destination::{Endpoint, GetDestination, Update, get_destination, update};
use serde_json::json;
use tokio::sync::oneshot;
use tonic::Streaming;

/// Bound on every wait for the API server, the EndpointSlice controller and the stream.
const WAIT: Duration = Duration::from_secs(30);
const NODE: &str = "mesh-test-node";

/// What the client has been told: endpoints by address.
#[derive(Default)]
struct Model {
    endpoints: BTreeMap<SocketAddr, Endpoint>,
    exists: Option<bool>,
}

fn addr_of(a: &mesh_proto::common::SocketAddress) -> SocketAddr {
    SocketAddr::try_from(a).expect("the controller sends valid addresses")
}

impl Model {
    /// Applies an update; returns it as a short string (`+a,b`, `-a`, `none(true)`).
    fn apply(&mut self, update: &Update) -> String {
        match &update.update {
            Some(update::Update::Add(add)) => {
                let mut shown = Vec::new();
                for ep in &add.endpoints {
                    let addr = addr_of(ep.addr.as_ref().expect("endpoints have addresses"));
                    // Every pod here runs the proxy: an endpoint without its identity would
                    // make a client connect in plaintext.
                    assert!(
                        ep.tls_identity.is_some(),
                        "an endpoint without identity: {ep:?}"
                    );
                    shown.push(addr.to_string());
                    self.endpoints.insert(addr, ep.clone());
                }
                self.exists = Some(true);
                format!("+{}", shown.join(","))
            }
            Some(update::Update::Remove(remove)) => {
                let mut shown = Vec::new();
                for a in &remove.addrs {
                    let addr = addr_of(a);
                    shown.push(addr.to_string());
                    self.endpoints.remove(&addr);
                }
                format!("-{}", shown.join(","))
            }
            Some(update::Update::NoEndpoints(none)) => {
                self.endpoints.clear();
                self.exists = Some(none.exists);
                format!("none({})", none.exists)
            }
            None => "empty".to_owned(),
        }
    }

    fn addrs(&self) -> Vec<String> {
        self.endpoints.keys().map(ToString::to_string).collect()
    }
}

/// Reads updates until the client's set is `want` (and, for an empty `want`, until it is told
/// whether the target exists); returns the updates seen. The real EndpointSlice controller
/// decides how a change is split into writes, so the test checks where the client ends up and
/// that it got there by the expected updates.
async fn settle(
    stream: &mut Streaming<Update>,
    model: &mut Model,
    want: &[&str],
    want_exists: bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if model.addrs() == want && model.exists == Some(want_exists) {
            return seen;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let next = tokio::time::timeout(left, stream.message()).await;
        match next {
            Ok(Ok(Some(update))) => seen.push(model.apply(&update)),
            Ok(other) => panic!("the stream ended: {other:?}; updates so far: {seen:?}"),
            Err(_) => panic!(
                "timed out waiting for {want:?} (exists {want_exists}); have {:?}; updates: {seen:?}",
                model.addrs()
            ),
        }
    }
}

async fn create_pod(pods: &Api<Pod>, name: &str, ip: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": "web",
            "automountServiceAccountToken": false,
            "containers": [
                {"name": "app", "image": "app:test", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "alt", "containerPort": 9090}]},
                {"name": "mesh-proxy", "image": "mesh-proxy:test"}
            ]
        }
    }))
    .expect("the test pod fits the schema");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create a pod");
    set_pod_status(pods, name, ip, true).await;
}

/// What a kubelet would report.
async fn set_pod_status(pods: &Api<Pod>, name: &str, ip: &str, ready: bool) {
    let ready = if ready { "True" } else { "False" };
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Ready", "status": ready},
            {"type": "ContainersReady", "status": ready}
        ]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch pod status");
}

fn authority(text: String) -> GetDestination {
    GetDestination {
        target: Some(get_destination::Target::Authority(text)),
        source: None,
    }
}

/// An admin client of `cluster`.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_changes_arrive_as_diffs() {
    let Some(cluster) = Cluster::get("controller_kubernetes") else {
        return;
    };
    let client = client(&cluster).await;

    let ns = format!("mesh-ctl-test-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .expect("namespace fits the schema"),
        )
        .await
        .expect("create the test namespace");
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}}}))
    .expect("node fits the schema");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create the node: {e}"),
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web"}}),
            )
            .expect("service account fits the schema"),
        )
        .await
        .expect("create the service account");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    create_pod(&pods, "web-1", "10.244.0.11").await;
    create_pod(&pods, "web-2", "10.244.0.12").await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
    .expect("service fits the schema");
    let service = services
        .create(&PostParams::default(), &service)
        .await
        .expect("create the service");
    let cluster_ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the API server assigns a cluster IP");

    // The controller, in-process, on loopback ports.
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gRPC");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin");
    let grpc_addr = grpc.local_addr().expect("gRPC address");
    let mut config = Config::new(Discovery::Kubernetes {
        kubeconfig: Some(cluster.kubeconfig.clone()),
    });
    // With its CA, as installed: meshed pods' proxies have identities.
    let identity_dir =
        std::env::temp_dir().join(format!("mesh-ctl-test-identity-{}", std::process::id()));
    GeneratedCa::generate(
        "cluster.local",
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .expect("generate a CA")
    .write_dir(&identity_dir)
    .expect("write the CA in cert-manager's layout");
    config.identity = Some(IdentityOptions::new(identity_dir));
    let (stop, stopped) = oneshot::channel::<()>();
    let controller = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
        let _ = stopped.await;
    }));
    let mut destination = DestinationClient::connect(format!("http://{grpc_addr}"))
        .await
        .expect("connect to the controller");

    let mut web = destination
        .get(authority(format!("web.{ns}.svc.cluster.local:80")))
        .await
        .expect("the service resolves")
        .into_inner();
    let mut model = Model::default();
    settle(
        &mut web,
        &mut model,
        &["10.244.0.11:8080", "10.244.0.12:8080"],
        true,
    )
    .await;
    let ep = &model.endpoints[&"10.244.0.11:8080".parse::<SocketAddr>().expect("address")];
    assert_eq!(
        ep.tls_identity.as_ref().map(|t| t.spiffe_id.clone()),
        Some(format!("spiffe://cluster.local/ns/{ns}/sa/web")),
        "the meshed pod's identity: {ep:?}"
    );
    assert_eq!(ep.inbound_proxy_port, 4143);
    assert_eq!(
        ep.metric_labels.get("pod").map(String::as_str),
        Some("web-1")
    );
    assert_eq!(
        ep.metric_labels.get("serviceaccount").map(String::as_str),
        Some("web")
    );

    // The same service by cluster IP.
    let by_ip: SocketAddr = format!("{cluster_ip}:80").parse().expect("cluster IP");
    let mut by_ip_stream = destination
        .get(GetDestination {
            target: Some(get_destination::Target::Addr(by_ip.into())),
            source: None,
        })
        .await
        .expect("the cluster IP resolves")
        .into_inner();
    let mut by_ip_model = Model::default();
    settle(
        &mut by_ip_stream,
        &mut by_ip_model,
        &["10.244.0.11:8080", "10.244.0.12:8080"],
        true,
    )
    .await;
    drop(by_ip_stream);

    // Scale up.
    create_pod(&pods, "web-3", "10.244.0.13").await;
    let seen = settle(
        &mut web,
        &mut model,
        &["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"],
        true,
    )
    .await;
    assert_eq!(seen, ["+10.244.0.13:8080"]);

    // One is no longer ready.
    set_pod_status(&pods, "web-1", "10.244.0.11", false).await;
    let seen = settle(
        &mut web,
        &mut model,
        &["10.244.0.12:8080", "10.244.0.13:8080"],
        true,
    )
    .await;
    assert_eq!(seen, ["-10.244.0.11:8080"]);

    // One is deleted.
    pods.delete("web-2", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete a pod");
    let seen = settle(&mut web, &mut model, &["10.244.0.13:8080"], true).await;
    assert_eq!(seen, ["-10.244.0.12:8080"]);

    // The port changes: the new address comes before the old one goes.
    let port_patch =
        json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": "alt"}]}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(&port_patch))
        .await
        .expect("patch the service port");
    let seen = settle(&mut web, &mut model, &["10.244.0.13:9090"], true).await;
    assert_eq!(seen, ["+10.244.0.13:9090", "-10.244.0.13:8080"]);

    // The API server restarts mid-watch: the watches recover and the stream stays right.
    if cluster.restart_apiserver() {
        create_pod(&pods, "web-4", "10.244.0.14").await;
        let seen = settle(
            &mut web,
            &mut model,
            &["10.244.0.13:9090", "10.244.0.14:9090"],
            true,
        )
        .await;
        assert_eq!(seen, ["+10.244.0.14:9090"]);
    } else {
        eprintln!("controller_kubernetes: not restarting an API server this test did not start");
        create_pod(&pods, "web-4", "10.244.0.14").await;
        settle(
            &mut web,
            &mut model,
            &["10.244.0.13:9090", "10.244.0.14:9090"],
            true,
        )
        .await;
    }

    // The service is deleted: the stream says so and stays open.
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete the service");
    let seen = settle(&mut web, &mut model, &[], false).await;
    // The EndpointSlice controller may empty the slice before the Service's deletion reaches
    // the controller: then "no endpoints, service exists" comes in between.
    let mut expected = vec!["-10.244.0.13:9090,10.244.0.14:9090", "none(false)"];
    if seen.len() == 3 {
        expected.insert(1, "none(true)");
    }
    assert_eq!(seen, expected);

    let _ = stop.send(());
    tokio::time::timeout(WAIT, controller)
        .await
        .expect("the controller stops in time")
        .expect("the controller task does not panic")
        .expect("the controller stops cleanly");
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    drop(cluster);
}

/// Polls `leaders` until `want` (a, b, c) holds, failing after `within`.
async fn wait_leaders(
    leaders: &[&tokio::sync::watch::Receiver<bool>],
    want: &[bool],
    within: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now: Vec<bool> = leaders.iter().map(|l| *l.borrow()).collect();
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: leaders {now:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// HA: replicas elect exactly one route status writer with a Lease; a writer that stops hands
/// over at once (it releases the Lease); one that vanished without releasing (a killed pod) is
/// replaced once its record has not been renewed for the lease's duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_elect_one_status_writer_and_hand_over() {
    use k8s_openapi::api::coordination::v1::Lease;
    use mesh_controller::lease::{self, Election, LEASE_DURATION};
    use tokio::sync::watch;

    let Some(cluster) = Cluster::get("controller_lease") else {
        return;
    };
    let client = client(&cluster).await;
    let election = |name: &str, identity: &str| Election {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        identity: identity.to_owned(),
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity);

    let (stop_a, stop_a_rx) = watch::channel(false);
    let (stop_b, stop_b_rx) = watch::channel(false);
    let a = lease::spawn(client.clone(), election("writer", "a"), stop_a_rx);
    let b = lease::spawn(client.clone(), election("writer", "b"), stop_b_rx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while *a.borrow() == *b.borrow() {
        assert!(!(*a.borrow() && *b.borrow()), "two leaders");
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Exactly one, through more than one renewal, and the Lease names it.
    let a_leads = *a.borrow();
    for _ in 0..70 {
        assert_ne!(
            *a.borrow(),
            *b.borrow(),
            "exactly one leader at every moment"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        holder(leases.get("writer").await.expect("lease")).as_deref(),
        Some(if a_leads { "a" } else { "b" })
    );
    // The leader stops: it releases, and the other takes over within a retry.
    let (leader_stop, follower) = if a_leads {
        (&stop_a, &b)
    } else {
        (&stop_b, &a)
    };
    leader_stop.send(true).expect("stop the leader");
    wait_leaders(&[follower], &[true], Duration::from_secs(5), "hand-over").await;

    // A holder that vanished without releasing: its record stands until it is stale.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    let ghost: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "ghosted"},
        "spec": {"holderIdentity": "killed-pod", "leaseDurationSeconds": 15,
                 "renewTime": now, "acquireTime": now},
    }))
    .expect("lease");
    leases
        .create(&PostParams::default(), &ghost)
        .await
        .expect("create the ghost's lease");
    let (_stop_c, stop_c_rx) = watch::channel(false);
    let started = tokio::time::Instant::now();
    let c = lease::spawn(client.clone(), election("ghosted", "c"), stop_c_rx);
    wait_leaders(
        &[&c],
        &[true],
        LEASE_DURATION + Duration::from_secs(10),
        "take-over",
    )
    .await;
    assert!(
        started.elapsed() >= LEASE_DURATION - Duration::from_secs(1),
        "took over a lease that was not stale yet ({:?})",
        started.elapsed()
    );
    assert_eq!(
        holder(leases.get("ghosted").await.expect("lease")).as_deref(),
        Some("c")
    );
}
