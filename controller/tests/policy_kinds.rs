//! The inbound policy matrix with the file backend, as a proxy sees it: a tonic client of
//! `InboundPolicies.Watch` on `run()`'s gRPC port, while the folder's files change. Every
//! default policy (from the controller's config, a namespace annotation, a pod annotation
//! overriding it), every policy CRD kind, invalid objects, and deletions falling back; each
//! change must arrive on the stream that is already open. `integration-tests/tests/
//! policy_kubernetes.rs` asserts the same matrix through a real API server.

use std::path::PathBuf;
use std::time::Duration;

use mesh_controller::policy::inbound::{DefaultPolicy, summary};
use mesh_controller::{Config, Discovery};
use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::inbound_policies_client::InboundPoliciesClient;
use mesh_proto::policy::{InboundPolicyRequest, InboundServer};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tonic::Streaming;

/// Bound on each wait for an update (the folder is polled every 20 ms).
const WAIT: Duration = Duration::from_secs(10);
const NS: &str = "shop";
const ANNOTATION: &str = "config.mesh.dev/default-inbound-policy";

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

fn annotations(policy: Option<DefaultPolicy>) -> Value {
    match policy {
        Some(policy) => json!({ANNOTATION: policy.as_str()}),
        None => json!({}),
    }
}

fn namespace(policy: Option<DefaultPolicy>) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "annotations": annotations(policy)}})
}

fn pod(policy: Option<DefaultPolicy>) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": NS, "labels": {"app": "web"},
            "annotations": annotations(policy)},
        "spec": {"serviceAccountName": "web",
            "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"podIP": "10.0.0.5", "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// A `policy.mesh.dev` object of the test namespace.
fn policy_object(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "policy.mesh.dev/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

fn server_ref() -> Value {
    json!({"group": "policy.mesh.dev", "kind": "Server", "name": "web-http"})
}

/// Writes `object` as `<name>.yaml` in `dir` (JSON is YAML), renamed into place so the
/// poller never reads half a file.
fn write(dir: &std::path::Path, name: &str, object: &Value) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, object.to_string()).expect("write a temp file");
    std::fs::rename(&tmp, dir.join(format!("{name}.yaml"))).expect("rename into place");
}

struct Controller {
    grpc: std::net::SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), mesh_controller::Error>>,
}

impl Controller {
    /// A controller over a fresh folder holding the namespace and the pod, with `default` as
    /// the cluster's default policy.
    async fn start(name: &str, default: DefaultPolicy) -> Controller {
        let dir = std::env::temp_dir().join(format!(
            "mesh-controller-policy-kinds-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the config folder");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin");
        let grpc_addr = grpc.local_addr().expect("gRPC address");
        let mut config = Config::new(Discovery::File {
            dir: dir.clone(),
            poll_interval: Duration::from_millis(20),
        });
        config.default_inbound_policy = default;
        // Written before the controller starts, so its first sync (which the watch waits
        // for) already knows the pod.
        write(&dir, "namespace", &namespace(None));
        write(&dir, "pod", &pod(None));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
            let _ = stopped.await;
        }));
        Controller {
            grpc: grpc_addr,
            dir,
            stop: Some(stop),
            task,
        }
    }

    fn write(&self, name: &str, object: &Value) {
        write(&self.dir, name, object);
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join(format!("{name}.yaml"))).expect("remove a file");
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the controller stops promptly")
            .expect("the controller task does not panic")
            .expect("the controller stops cleanly");
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The policy stream of the pod's port 8080.
    async fn watch(&self) -> Streaming<InboundServer> {
        let mut client = InboundPoliciesClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect");
        client
            .watch(InboundPolicyRequest {
                workload: Some(WorkloadRef {
                    namespace: NS.to_owned(),
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
}

async fn next(stream: &mut Streaming<InboundServer>, what: &str) -> String {
    let server = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: no update within {WAIT:?}"))
        .expect("the stream is healthy")
        .expect("the stream is open");
    summary(&server)
}

/// Asserts that nothing arrives for 300 ms: a change that must not alter the policy sends
/// nothing (identical policies are not resent).
async fn quiet(stream: &mut Streaming<InboundServer>, what: &str) {
    if let Ok(message) = tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
        let shown = message.map(|m| m.as_ref().map(summary));
        panic!("{what}: expected no update, got {shown:?}");
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

#[tokio::test]
async fn default_policies_come_from_the_config_then_the_namespace_then_the_pod() {
    // The cluster default, from the controller's config.
    for policy in ALL_POLICIES {
        let controller = Controller::start(policy.as_str(), policy).await;
        let mut stream = controller.watch().await;
        assert_eq!(
            next(&mut stream, "the cluster default").await,
            default_shape(policy),
            "cluster default {policy}"
        );
        controller.stop().await;
    }

    // Deny as the cluster default, then each policy as the namespace's annotation: each
    // differs from the one before, so each must arrive on the open stream.
    let controller = Controller::start("annotations", DefaultPolicy::Deny).await;
    let mut stream = controller.watch().await;
    assert_eq!(
        next(&mut stream, "the cluster default").await,
        default_shape(DefaultPolicy::Deny)
    );
    for policy in ALL_POLICIES {
        controller.write("namespace", &namespace(Some(policy)));
        assert_eq!(
            next(&mut stream, "a namespace annotation").await,
            default_shape(policy),
            "namespace annotation {policy}"
        );
    }

    // The pod's annotation overrides its namespace's.
    controller.write(
        "namespace",
        &namespace(Some(DefaultPolicy::AllAuthenticated)),
    );
    assert_eq!(
        next(&mut stream, "the namespace annotation").await,
        default_shape(DefaultPolicy::AllAuthenticated)
    );
    for policy in ALL_POLICIES {
        controller.write("pod", &pod(Some(policy)));
        assert_eq!(
            next(&mut stream, "a pod annotation").await,
            default_shape(policy),
            "pod annotation {policy} over the namespace's all-authenticated"
        );
    }

    // A pod annotation naming no policy is passed over: the namespace's applies.
    let mut misspelt = pod(None);
    misspelt["metadata"]["annotations"] = json!({ANNOTATION: "allow-all"});
    controller.write("pod", &misspelt);
    assert_eq!(
        next(&mut stream, "an invalid pod annotation").await,
        default_shape(DefaultPolicy::AllAuthenticated)
    );
    controller.write("pod", &pod(None));
    quiet(&mut stream, "the invalid annotation removed").await;

    // Without annotations, the cluster's default again.
    controller.write("namespace", &namespace(None));
    assert_eq!(
        next(&mut stream, "the namespace annotation removed").await,
        default_shape(DefaultPolicy::Deny)
    );
    controller.stop().await;
}

#[tokio::test]
async fn every_policy_kind_reaches_the_stream_and_deleting_falls_back() {
    let controller = Controller::start("kinds", DefaultPolicy::AllUnauthenticated).await;
    let mut stream = controller.watch().await;
    assert_eq!(
        next(&mut stream, "the cluster default").await,
        default_shape(DefaultPolicy::AllUnauthenticated)
    );

    // A Server on the pod's port (by container port name): nobody is authorized yet, so it
    // denies all.
    controller.write(
        "server",
        &policy_object(
            "Server",
            "web-http",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "port": "http",
                "proxyProtocol": "HTTP/1"}),
        ),
    );
    assert_eq!(next(&mut stream, "the Server").await, on_server(&[], None));

    // A policy requiring an authentication that does not exist admits nobody ...
    controller.write(
        "authz-from-api",
        &policy_object(
            "AuthorizationPolicy",
            "from-api",
            json!({"targetRef": server_ref(), "requiredAuthenticationRefs": [
                {"group": "policy.mesh.dev", "kind": "MeshTLSAuthentication", "name": "api-clients"}]}),
        ),
    );
    quiet(&mut stream, "a policy whose authentication is missing").await;
    // ... until it exists: identities as given (a trailing `*` is a prefix), ServiceAccount
    // refs as their SPIFFE IDs (in the policy's namespace unless named), Namespace refs as
    // prefixes.
    controller.write(
        "mesh-tls",
        &policy_object(
            "MeshTLSAuthentication",
            "api-clients",
            json!({"identities": ["spiffe://cluster.local/ns/ops/*",
                    "spiffe://cluster.local/ns/shop/sa/batch"],
                "identityRefs": [{"kind": "ServiceAccount", "name": "api"},
                    {"kind": "ServiceAccount", "name": "admin", "namespace": "ops"},
                    {"kind": "Namespace", "name": "monitoring"}]}),
        ),
    );
    let from_api = "from-api:tls[spiffe://cluster.local/ns/ops/sa/admin,\
        spiffe://cluster.local/ns/shop/sa/api,spiffe://cluster.local/ns/shop/sa/batch]\
        [spiffe://cluster.local/ns/monitoring/,spiffe://cluster.local/ns/ops/]";
    assert_eq!(
        next(&mut stream, "the MeshTLSAuthentication").await,
        on_server(&[from_api], None)
    );

    // A NetworkAuthentication nobody requires changes nothing; a policy requiring it admits
    // any client from its networks.
    let networks = json!({"networks": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]},
        {"cidr": "192.168.1.10"}]});
    controller.write(
        "networks",
        &policy_object("NetworkAuthentication", "office", networks.clone()),
    );
    quiet(&mut stream, "an unreferenced NetworkAuthentication").await;
    controller.write(
        "authz-office",
        &policy_object(
            "AuthorizationPolicy",
            "office",
            json!({"targetRef": server_ref(), "requiredAuthenticationRefs": [
                {"group": "policy.mesh.dev", "kind": "NetworkAuthentication", "name": "office"}]}),
        ),
    );
    let office = "office:any nets=10.0.0.0/8-10.9.0.0/16,192.168.1.10";
    assert_eq!(
        next(&mut stream, "the network policy").await,
        on_server(&[from_api, office], None)
    );

    // A policy on the whole namespace applies to its Servers; a ServiceAccount can be
    // required directly.
    controller.write(
        "authz-namespace",
        &policy_object(
            "AuthorizationPolicy",
            "namespace-admins",
            json!({"targetRef": {"kind": "Namespace", "name": NS},
                "requiredAuthenticationRefs": [
                    {"kind": "ServiceAccount", "name": "admin", "namespace": "ops"}]}),
        ),
    );
    let namespace_admins = "namespace-admins:tls[spiffe://cluster.local/ns/ops/sa/admin][]";
    assert_eq!(
        next(&mut stream, "the namespace policy").await,
        on_server(&[from_api, namespace_admins, office], None)
    );

    // A policy on an HTTPRoute applies once the route is attached to the Server, scoped to
    // it. (Policy first, so that the route's arrival is one update however the route itself
    // is served.)
    controller.write(
        "authz-scrape",
        &policy_object(
            "AuthorizationPolicy",
            "scrape",
            json!({"targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                "name": "metrics"}}),
        ),
    );
    quiet(&mut stream, "a policy on a route that does not exist").await;
    controller.write(
        "route",
        &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "metrics", "namespace": NS},
            "spec": {"parentRefs": [server_ref()],
                "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/metrics"}}]}]}}),
    );
    let scrape = "scrape:any routes=metrics";
    assert_eq!(
        next(&mut stream, "the HTTPRoute").await,
        on_server(&[from_api, namespace_admins, office, scrape], None)
    );

    // The rate limit of the Server: total, per identity, and an override per ServiceAccount.
    controller.write(
        "rate-limit",
        &policy_object(
            "HTTPLocalRateLimitPolicy",
            "web-limit",
            json!({"targetRef": server_ref(), "total": {"requestsPerSecond": 100},
                "identity": {"requestsPerSecond": 10},
                "overrides": [{"requestsPerSecond": 50,
                    "clientRefs": [{"kind": "ServiceAccount", "name": "api"}]}]}),
        ),
    );
    let limit = "web-limit:100/10 spiffe://cluster.local/ns/shop/sa/api=50";
    assert_eq!(
        next(&mut stream, "the rate limit").await,
        on_server(&[from_api, namespace_admins, office, scrape], Some(limit))
    );

    // An invalid NetworkAuthentication (no such CIDR): the policy requiring it admits nobody.
    let mut invalid = networks.clone();
    invalid["networks"][0]["cidr"] = json!("10.0.0.0/33");
    controller.write(
        "networks",
        &policy_object("NetworkAuthentication", "office", invalid),
    );
    assert_eq!(
        next(&mut stream, "the invalid NetworkAuthentication").await,
        on_server(&[from_api, namespace_admins, scrape], Some(limit))
    );
    controller.write(
        "networks",
        &policy_object("NetworkAuthentication", "office", networks),
    );
    assert_eq!(
        next(&mut stream, "the NetworkAuthentication fixed").await,
        on_server(&[from_api, namespace_admins, office, scrape], Some(limit))
    );

    // Deleting falls back, one object at a time.
    controller.remove("route");
    assert_eq!(
        next(&mut stream, "the HTTPRoute deleted").await,
        on_server(&[from_api, namespace_admins, office], Some(limit))
    );
    controller.remove("rate-limit");
    assert_eq!(
        next(&mut stream, "the rate limit deleted").await,
        on_server(&[from_api, namespace_admins, office], None)
    );
    controller.remove("mesh-tls");
    assert_eq!(
        next(&mut stream, "the MeshTLSAuthentication deleted").await,
        on_server(&[namespace_admins, office], None)
    );
    controller.remove("authz-office");
    assert_eq!(
        next(&mut stream, "the network policy deleted").await,
        on_server(&[namespace_admins], None)
    );
    controller.remove("server");
    assert_eq!(
        next(&mut stream, "the Server deleted").await,
        default_shape(DefaultPolicy::AllUnauthenticated)
    );
    controller.stop().await;
}
