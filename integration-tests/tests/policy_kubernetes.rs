//! Inbound policy through a real API server: a tonic client of `InboundPolicies.Watch` on the
//! controller's `kubernetes` backend (in-process) sees, for one pod's port, every default
//! policy (from the controller's config, a namespace annotation, a pod annotation overriding
//! it), then every policy CRD kind as it is created (Server, AuthorizationPolicy on a Server,
//! a Namespace and an HTTPRoute, MeshTLSAuthentication, NetworkAuthentication,
//! HTTPLocalRateLimitPolicy), invalid objects admitting nobody, and deletions falling back to
//! the default. Each change must arrive on the stream already open. The file backend's twin
//! is `controller/tests/policy_kinds.rs`; the decisions themselves are table-tested in
//! `controller/src/policy/inbound/tests.rs`.
//!
//! The cluster: `KUBECONFIG` when set, else one started by `scripts/k8s-test-cluster`. No
//! kubelet: the test sets the pod's status as a kubelet would. When no cluster can be had
//! the test fails under `CI=true` and skips loudly otherwise.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use mesh_controller::policy::crds::{
    AuthorizationPolicy, HTTPLocalRateLimitPolicy, MeshTLSAuthentication, NetworkAuthentication,
    Server,
};
use mesh_controller::policy::gateway::HTTPRoute;
use mesh_controller::policy::inbound::{DEFAULT_POLICY_ANNOTATION, DefaultPolicy, summary};
use mesh_controller::{Config, Discovery};
use mesh_integration_tests::cluster::Cluster;
use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::inbound_policies_client::InboundPoliciesClient;
use mesh_proto::policy::{InboundPolicyRequest, InboundServer};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Streaming;

/// Bound on each wait: for the API server, the controller, and each update of the stream.
const WAIT: Duration = Duration::from_secs(20);

const ALL_POLICIES: [DefaultPolicy; 5] = [
    DefaultPolicy::AllUnauthenticated,
    DefaultPolicy::AllAuthenticated,
    DefaultPolicy::ClusterAuthenticated,
    DefaultPolicy::Deny,
    DefaultPolicy::Audit,
];

/// What a default policy must look like on the wire: its name, the authorization that admits
/// who it admits (none for deny), and audit mode for audit only.
fn default_shape(policy: DefaultPolicy) -> &'static str {
    match policy {
        DefaultPolicy::AllUnauthenticated => {
            "default:all-unauthenticated detect enforce [default:all-unauthenticated:any]"
        }
        DefaultPolicy::AllAuthenticated => {
            "default:all-authenticated detect enforce [default:all-authenticated:tls[*][]]"
        }
        DefaultPolicy::ClusterAuthenticated => {
            "default:cluster-authenticated detect enforce \
             [default:cluster-authenticated:tls[][spiffe://cluster.local/]]"
        }
        DefaultPolicy::Deny => "default:deny detect enforce []",
        DefaultPolicy::Audit => "default:audit detect audit [default:audit:tls[*][]]",
    }
}

/// The Server's policy with these authorizations (in AuthorizationPolicy name order) and rate
/// limit.
fn on_server(authorizations: &[&str], limit: Option<&str>) -> String {
    let mut text = format!("web-http http1 enforce [{}]", authorizations.join("; "));
    // The HTTPRoute `metrics` is attached to the Server exactly while an authorization names it.
    if authorizations.iter().any(|a| a.ends_with("routes=metrics")) {
        text.push_str(" http_routes=metrics:/metrics*");
    }
    if let Some(limit) = limit {
        text.push_str(&format!(" limit={limit}"));
    }
    text
}

/// The next policy on the stream, within [`WAIT`].
async fn next(stream: &mut Streaming<InboundServer>, what: &str) -> String {
    let server = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: no update within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("{what}: the stream failed: {e}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"));
    summary(&server)
}

/// The controller's kubernetes backend, in-process on loopback ports.
struct Controller {
    grpc: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), mesh_controller::Error>>,
}

impl Controller {
    async fn start(cluster: &Cluster, default: DefaultPolicy) -> Controller {
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
        config.default_inbound_policy = default;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
            let _ = stopped.await;
        }));
        Controller {
            grpc: grpc_addr,
            stop,
            task,
        }
    }

    /// The policy stream of port 8080 of pod `web-1` in `ns`.
    async fn watch(&self, ns: &str) -> Streaming<InboundServer> {
        let deadline = Instant::now() + WAIT;
        let mut client = loop {
            match InboundPoliciesClient::connect(format!("http://{}", self.grpc)).await {
                Ok(client) => break client,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect to the controller: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        client
            .watch(InboundPolicyRequest {
                workload: Some(WorkloadRef {
                    namespace: ns.to_owned(),
                    kind: "pod".to_owned(),
                    name: "web-1".to_owned(),
                    pod: "web-1".to_owned(),
                }),
                port: 8080,
            })
            .await
            .expect("the inbound watch opens")
            .into_inner()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the controller stops in time")
            .expect("the controller task does not panic")
            .expect("the controller stops cleanly");
    }
}

/// Creates, changes and deletes the test namespace's objects of any kind the test uses.
struct Objects {
    client: Client,
    ns: String,
}

impl Objects {
    fn api(&self, kind: &str) -> Api<DynamicObject> {
        let resource = match kind {
            "Server" => ApiResource::erase::<Server>(&()),
            "AuthorizationPolicy" => ApiResource::erase::<AuthorizationPolicy>(&()),
            "MeshTLSAuthentication" => ApiResource::erase::<MeshTLSAuthentication>(&()),
            "NetworkAuthentication" => ApiResource::erase::<NetworkAuthentication>(&()),
            "HTTPLocalRateLimitPolicy" => ApiResource::erase::<HTTPLocalRateLimitPolicy>(&()),
            "HTTPRoute" => ApiResource::erase::<HTTPRoute>(&()),
            other => panic!("the test uses no kind {other}"),
        };
        Api::namespaced_with(self.client.clone(), &self.ns, &resource)
    }

    /// A `policy.mesh.dev` object of the test namespace.
    fn policy(&self, kind: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": "policy.mesh.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec})
    }

    /// Creates `object`, retried while its just-created CRD is not served yet.
    async fn create(&self, object: Value) {
        let kind = object["kind"].as_str().expect("objects have a kind");
        let api = self.api(kind);
        let object: DynamicObject = serde_json::from_value(object.clone()).expect("an object");
        let deadline = Instant::now() + WAIT;
        while let Err(e) = api.create(&PostParams::default(), &object).await {
            assert!(Instant::now() < deadline, "create a {kind}: {e}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn set_spec(&self, kind: &str, name: &str, spec: Value) {
        self.api(kind)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .unwrap_or_else(|e| panic!("patch the {kind} {name}: {e}"));
    }

    async fn delete(&self, kind: &str, name: &str) {
        self.api(kind)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete the {kind} {name}: {e}"));
    }

    /// Sets (or, with `None`, removes) the default-policy annotation of the namespace.
    async fn annotate_namespace(&self, value: Option<&str>) {
        Api::<Namespace>::all(self.client.clone())
            .patch(
                &self.ns,
                &PatchParams::default(),
                &Patch::Merge(&annotation_patch(value)),
            )
            .await
            .expect("annotate the namespace");
    }

    /// Sets (or, with `None`, removes) the default-policy annotation of the pod.
    async fn annotate_pod(&self, value: Option<&str>) {
        Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .patch(
                "web-1",
                &PatchParams::default(),
                &Patch::Merge(&annotation_patch(value)),
            )
            .await
            .expect("annotate the pod");
    }

    fn server_ref(&self) -> Value {
        json!({"group": "policy.mesh.dev", "kind": "Server", "name": "web-http"})
    }
}

/// A merge patch setting the default-policy annotation, or removing it (JSON null).
fn annotation_patch(value: Option<&str>) -> Value {
    json!({"metadata": {"annotations": {DEFAULT_POLICY_ANNOTATION: value}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_policies_through_the_api_server_reach_an_open_stream() {
    let Some(cluster) = Cluster::get("policy_kubernetes") else {
        return;
    };
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&cluster.kubeconfig).expect("read the kubeconfig"),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("a client config from the kubeconfig"),
    )
    .expect("a Kubernetes client");

    // The CRDs, as `meshctl install` applies them.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in mesh_controller::policy::crds::crds() {
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("create a CRD: {e}"),
        }
    }

    // A namespace, a ServiceAccount and a "running" pod with a named port.
    let ns = format!("mesh-policy-{}", std::process::id());
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
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
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
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "web",
            // No token controller is needed: the test needs no token.
            "automountServiceAccountToken": false,
            "containers": [
                {"name": "app", "image": "app:test",
                 "ports": [{"name": "http", "containerPort": 8080}]},
                {"name": "mesh-proxy", "image": "mesh-proxy:test"}
            ]
        }
    }))
    .expect("the test pod fits the schema");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    // What a kubelet would report.
    let status = json!({"status": {"phase": "Running", "podIP": "10.244.1.11",
        "podIPs": [{"ip": "10.244.1.11"}],
        "conditions": [{"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"}]}});
    pods.patch_status("web-1", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch the pod's status");
    let objects = Objects {
        client: client.clone(),
        ns: ns.clone(),
    };

    // The cluster default, from the controller's config: one short-lived controller each.
    for policy in ALL_POLICIES {
        let controller = Controller::start(&cluster, policy).await;
        let mut stream = controller.watch(&ns).await;
        assert_eq!(
            next(&mut stream, "the cluster default").await,
            default_shape(policy),
            "cluster default {policy}"
        );
        drop(stream);
        controller.stop().await;
    }

    // From here one controller and one stream, with deny as the cluster default so that
    // every annotation below visibly changes the policy.
    let controller = Controller::start(&cluster, DefaultPolicy::Deny).await;
    let mut stream = controller.watch(&ns).await;
    assert_eq!(
        next(&mut stream, "the cluster default").await,
        default_shape(DefaultPolicy::Deny)
    );

    // Each policy as the namespace's annotation: each differs from the one before.
    for policy in ALL_POLICIES {
        objects.annotate_namespace(Some(policy.as_str())).await;
        assert_eq!(
            next(&mut stream, "a namespace annotation").await,
            default_shape(policy),
            "namespace annotation {policy}"
        );
    }
    // The pod's annotation overrides its namespace's.
    objects
        .annotate_namespace(Some(DefaultPolicy::AllAuthenticated.as_str()))
        .await;
    assert_eq!(
        next(&mut stream, "the namespace annotation").await,
        default_shape(DefaultPolicy::AllAuthenticated)
    );
    for policy in ALL_POLICIES {
        objects.annotate_pod(Some(policy.as_str())).await;
        assert_eq!(
            next(&mut stream, "a pod annotation").await,
            default_shape(policy),
            "pod annotation {policy} over the namespace's all-authenticated"
        );
    }
    // A pod annotation naming no policy is passed over: the namespace's applies.
    objects.annotate_pod(Some("allow-all")).await;
    assert_eq!(
        next(&mut stream, "an invalid pod annotation").await,
        default_shape(DefaultPolicy::AllAuthenticated)
    );
    objects.annotate_pod(None).await;
    // Without annotations, the cluster's default again.
    objects.annotate_namespace(None).await;
    assert_eq!(
        next(&mut stream, "the annotations removed").await,
        default_shape(DefaultPolicy::Deny)
    );

    // A Server on the pod's port (by container port name): nobody is authorized yet, so it
    // denies all.
    objects
        .create(objects.policy(
            "Server",
            "web-http",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "port": "http",
                "proxyProtocol": "HTTP/1"}),
        ))
        .await;
    assert_eq!(next(&mut stream, "the Server").await, on_server(&[], None));

    // A policy requiring an authentication that does not exist admits nobody (no update: the
    // next one must already be the authentication's) ...
    objects
        .create(objects.policy(
            "AuthorizationPolicy",
            "from-api",
            json!({"targetRef": objects.server_ref(), "requiredAuthenticationRefs": [
                {"group": "policy.mesh.dev", "kind": "MeshTLSAuthentication", "name": "api-clients"}]}),
        ))
        .await;
    // ... until it exists: identities as given (a trailing `*` is a prefix), ServiceAccount
    // refs as their SPIFFE IDs (in the policy's namespace unless named), Namespace refs as
    // prefixes.
    objects
        .create(objects.policy(
            "MeshTLSAuthentication",
            "api-clients",
            json!({"identities": ["spiffe://cluster.local/ns/ops/*",
                    format!("spiffe://cluster.local/ns/{ns}/sa/batch")],
                "identityRefs": [{"kind": "ServiceAccount", "name": "api"},
                    {"kind": "ServiceAccount", "name": "admin", "namespace": "ops"},
                    {"kind": "Namespace", "name": "monitoring"}]}),
        ))
        .await;
    // Sorted: the test namespace (`mesh-policy-*`) before `ops`.
    let from_api = format!(
        "from-api:tls[spiffe://cluster.local/ns/{ns}/sa/api,\
         spiffe://cluster.local/ns/{ns}/sa/batch,spiffe://cluster.local/ns/ops/sa/admin]\
         [spiffe://cluster.local/ns/monitoring/,spiffe://cluster.local/ns/ops/]"
    );
    let from_api = from_api.as_str();
    assert_eq!(
        next(&mut stream, "the MeshTLSAuthentication").await,
        on_server(&[from_api], None)
    );

    // A NetworkAuthentication nobody requires changes nothing; a policy requiring it admits
    // any client from its networks.
    let networks = json!({"networks": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]},
        {"cidr": "192.168.1.10"}]});
    objects
        .create(objects.policy("NetworkAuthentication", "office", networks.clone()))
        .await;
    objects
        .create(objects.policy(
            "AuthorizationPolicy",
            "office",
            json!({"targetRef": objects.server_ref(), "requiredAuthenticationRefs": [
                {"group": "policy.mesh.dev", "kind": "NetworkAuthentication", "name": "office"}]}),
        ))
        .await;
    let office = "office:any nets=10.0.0.0/8-10.9.0.0/16,192.168.1.10";
    assert_eq!(
        next(&mut stream, "the network policy").await,
        on_server(&[from_api, office], None)
    );

    // A policy on the whole namespace applies to its Servers; a ServiceAccount can be
    // required directly.
    objects
        .create(objects.policy(
            "AuthorizationPolicy",
            "namespace-admins",
            json!({"targetRef": {"kind": "Namespace", "name": ns},
                "requiredAuthenticationRefs": [
                    {"kind": "ServiceAccount", "name": "admin", "namespace": "ops"}]}),
        ))
        .await;
    let namespace_admins = "namespace-admins:tls[spiffe://cluster.local/ns/ops/sa/admin][]";
    assert_eq!(
        next(&mut stream, "the namespace policy").await,
        on_server(&[from_api, namespace_admins, office], None)
    );

    // A policy on an HTTPRoute applies once the route is attached to the Server, scoped to
    // it. (Policy first, so that the route's arrival is one update however the route itself
    // is served.)
    objects
        .create(objects.policy(
            "AuthorizationPolicy",
            "scrape",
            json!({"targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                "name": "metrics"}}),
        ))
        .await;
    objects
        .create(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "metrics", "namespace": ns},
            "spec": {"parentRefs": [objects.server_ref()],
                "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/metrics"}}]}]}}),
        )
        .await;
    let scrape = "scrape:any routes=metrics";
    assert_eq!(
        next(&mut stream, "the HTTPRoute").await,
        on_server(&[from_api, namespace_admins, office, scrape], None)
    );

    // The rate limit of the Server: total, per identity, and an override per ServiceAccount.
    objects
        .create(objects.policy(
            "HTTPLocalRateLimitPolicy",
            "web-limit",
            json!({"targetRef": objects.server_ref(), "total": {"requestsPerSecond": 100},
                "identity": {"requestsPerSecond": 10},
                "overrides": [{"requestsPerSecond": 50,
                    "clientRefs": [{"kind": "ServiceAccount", "name": "api"}]}]}),
        ))
        .await;
    let limit = format!("web-limit:100/10 spiffe://cluster.local/ns/{ns}/sa/api=50");
    let limit = Some(limit.as_str());
    assert_eq!(
        next(&mut stream, "the rate limit").await,
        on_server(&[from_api, namespace_admins, office, scrape], limit)
    );

    // An invalid NetworkAuthentication (no such CIDR; the API server stores any string): the
    // policy requiring it admits nobody, and the stream says so at once.
    let mut invalid = networks.clone();
    invalid["networks"][0]["cidr"] = json!("10.0.0.0/33");
    objects
        .set_spec("NetworkAuthentication", "office", invalid)
        .await;
    assert_eq!(
        next(&mut stream, "the invalid NetworkAuthentication").await,
        on_server(&[from_api, namespace_admins, scrape], limit)
    );
    objects
        .set_spec("NetworkAuthentication", "office", networks)
        .await;
    assert_eq!(
        next(&mut stream, "the NetworkAuthentication fixed").await,
        on_server(&[from_api, namespace_admins, office, scrape], limit)
    );

    // Deleting falls back, one object at a time.
    objects.delete("HTTPRoute", "metrics").await;
    assert_eq!(
        next(&mut stream, "the HTTPRoute deleted").await,
        on_server(&[from_api, namespace_admins, office], limit)
    );
    objects
        .delete("HTTPLocalRateLimitPolicy", "web-limit")
        .await;
    assert_eq!(
        next(&mut stream, "the rate limit deleted").await,
        on_server(&[from_api, namespace_admins, office], None)
    );
    // The authentication a policy requires goes away: that policy admits nobody.
    objects.delete("MeshTLSAuthentication", "api-clients").await;
    assert_eq!(
        next(&mut stream, "the MeshTLSAuthentication deleted").await,
        on_server(&[namespace_admins, office], None)
    );
    objects.delete("AuthorizationPolicy", "office").await;
    assert_eq!(
        next(&mut stream, "the network policy deleted").await,
        on_server(&[namespace_admins], None)
    );
    objects.delete("Server", "web-http").await;
    assert_eq!(
        next(&mut stream, "the Server deleted").await,
        default_shape(DefaultPolicy::Deny)
    );

    drop(stream);
    controller.stop().await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    drop(cluster);
}
