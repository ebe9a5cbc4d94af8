//! Traffic policy through a real API server: an HTTPRoute attached to a Service (GAMMA), with a
//! header-matched canary rule and a 90/10 split, reaches a tonic client of
//! `OutboundPolicies.Watch` from the controller's `kubernetes` backend (and so do an
//! EgressNetwork and a TLSRoute, for an address outside the mesh), and its status says
//! `Accepted=True`; an invalid change (a Pod as backend) is reported on the route's status as
//! `Accepted=False` with the reason, and the last valid policy keeps being served. The
//! end-to-end traffic over such policies is `traffic_controller`'s (file backend) and
//! `proxy/tests/traffic.rs`'s.
//!
//! The cluster: `KUBECONFIG` when set, else one started by `scripts/k8s-test-cluster`. When no
//! cluster can be had the test fails under `CI=true` and skips loudly otherwise.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use mesh_controller::{Config, Discovery};
use mesh_integration_tests::cluster::Cluster;
use mesh_proto::policy::outbound_policies_client::OutboundPoliciesClient;
use mesh_proto::policy::{OutboundPolicy, OutboundPolicyRequest, backend, outbound_policy_request};
use serde_json::{Value, json};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

fn route(ns: &str, canary_kind: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "books", "namespace": ns},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "books", "port": 80}],
            "rules": [
                {"matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
                 "backendRefs": [{"name": "books-canary", "port": 80, "kind": canary_kind}]},
                {"backendRefs": [
                    {"name": "books-stable", "port": 80, "weight": 90},
                    {"name": "books-canary", "port": 80, "weight": 10},
                ]},
            ],
        },
    })
}

/// The split of the route's catch-all rule and where its header rule goes, as
/// (authority, weight) pairs, from one policy.
fn shape(policy: &OutboundPolicy) -> Vec<Vec<(String, u32)>> {
    policy
        .routes
        .iter()
        .map(|route| {
            route
                .backends
                .iter()
                .map(|b| {
                    let name = match b.backend.as_ref().and_then(|b| b.kind.as_ref()) {
                        Some(backend::Kind::Authority(a)) => a.clone(),
                        other => format!("{other:?}"),
                    };
                    (name, b.weight)
                })
                .collect()
        })
        .collect()
}

/// The `Accepted` condition of route `books` of `routes`.
async fn accepted(routes: &Api<DynamicObject>) -> Option<(String, String)> {
    accepted_named(routes, "books").await
}

async fn accepted_named(routes: &Api<DynamicObject>, name: &str) -> Option<(String, String)> {
    let route = routes.get(name).await.ok()?;
    let condition = route.data["status"]["parents"][0]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    Some((
        condition["status"].as_str()?.to_owned(),
        condition["reason"].as_str()?.to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_through_the_api_server_reach_proxies_and_report_status() {
    let Some(cluster) = Cluster::get("routes_kubernetes") else {
        return;
    };
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&cluster.kubeconfig).expect("kubeconfig"),
            &Default::default(),
        )
        .await
        .expect("client config"),
    )
    .expect("client");

    // The CRDs, as `meshctl install` applies them.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in mesh_controller::policy::crds::crds() {
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("create a CRD: {e}"),
        }
    }
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "httproutes");

    let ns = format!("mesh-routes-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns}}))
            .expect("namespace"),
        )
        .await
        .expect("create the namespace");
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    for name in ["books", "books-stable", "books-canary"] {
        let service: Service =
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}}))
            .expect("service");
        services
            .create(&PostParams::default(), &service)
            .await
            .expect("create a service");
    }
    // The route, retried while the just-created CRD is not served yet.
    let routes: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let object: DynamicObject = serde_json::from_value(route(&ns, "Service")).expect("route");
    let deadline = Instant::now() + WAIT;
    while let Err(e) = routes.create(&PostParams::default(), &object).await {
        assert!(Instant::now() < deadline, "create the HTTPRoute: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The controller, in-process.
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let grpc_addr = grpc.local_addr().expect("address");
    let config = Config::new(Discovery::Kubernetes {
        kubeconfig: Some(cluster.kubeconfig.clone()),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + WAIT;
    let mut policies = loop {
        match OutboundPoliciesClient::connect(format!("http://{grpc_addr}")).await {
            Ok(client) => break client,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect to the controller: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let authority = format!("books.{ns}.svc.cluster.local:80");
    let mut stream = policies
        .watch(OutboundPolicyRequest {
            source: None,
            target: Some(outbound_policy_request::Target::Authority(
                authority.clone(),
            )),
        })
        .await
        .expect("watch the policy")
        .into_inner();

    let canary = format!("books-canary.{ns}.svc.cluster.local:80");
    let stable = format!("books-stable.{ns}.svc.cluster.local:80");
    let wanted = vec![
        vec![(canary.clone(), 1)],
        vec![(stable.clone(), 90), (canary.clone(), 10)],
    ];
    let deadline = Instant::now() + WAIT;
    let mut last = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let policy = tokio::time::timeout(remaining, stream.message())
            .await
            .expect("the route's policy in time")
            .expect("the stream stays up")
            .expect("a policy");
        if shape(&policy) == wanted {
            break policy;
        }
    };
    assert_eq!(
        last.routes[0].matches.len(),
        1,
        "the header rule keeps its match"
    );

    let deadline = Instant::now() + WAIT;
    while accepted(&routes).await != Some(("True".into(), "Accepted".into())) {
        assert!(
            Instant::now() < deadline,
            "the route was never Accepted: {:?}",
            accepted(&routes).await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // An invalid change: reported on the status, and the last valid policy stays.
    let invalid = route(&ns, "Pod");
    routes
        .patch(
            "books",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": invalid["spec"]})),
        )
        .await
        .expect("patch the route");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((status, reason)) = accepted(&routes).await
            && status == "False"
        {
            assert_eq!(reason, "InvalidKind");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the invalid route was never reported"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Whatever the stream said since, it still routes as the valid route did.
    while let Ok(Ok(Some(policy))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        last = policy;
    }
    assert_eq!(shape(&last), wanted, "the last valid policy keeps applying");

    // Egress through the API server: an EgressNetwork and a TLSRoute attached to it answer
    // for an address outside the mesh, as seen from the namespace's clients.
    let create = |group: &str, version: &str, kind: &str, plural: &str, object: Value| {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let api: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            &ns,
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        );
        let object: DynamicObject = serde_json::from_value(object).expect("an object");
        let kind = kind.to_owned();
        async move {
            let deadline = Instant::now() + WAIT;
            while let Err(e) = api.create(&PostParams::default(), &object).await {
                assert!(Instant::now() < deadline, "create a {kind}: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    create(
        "policy.mesh.dev",
        "v1alpha1",
        "EgressNetwork",
        "egressnetworks",
        json!({
            "apiVersion": "policy.mesh.dev/v1alpha1", "kind": "EgressNetwork",
            "metadata": {"name": "outside"},
            "spec": {"trafficPolicy": "Deny", "networks": [{"cidr": "203.0.113.0/24"}]},
        }),
    )
    .await;
    create("gateway.networking.k8s.io", "v1alpha2", "TLSRoute", "tlsroutes", json!({
        "apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TLSRoute",
        "metadata": {"name": "payments"},
        "spec": {
            "parentRefs": [{"group": "policy.mesh.dev", "kind": "EgressNetwork", "name": "outside"}],
            "hostnames": ["payments.example.com"],
        },
    }))
    .await;
    let outside = OutboundPolicyRequest {
        source: Some(mesh_proto::common::WorkloadRef {
            namespace: ns.clone(),
            ..Default::default()
        }),
        target: Some(outbound_policy_request::Target::Addr(
            "203.0.113.9:443"
                .parse::<std::net::SocketAddr>()
                .expect("an address")
                .into(),
        )),
    };
    let deadline = Instant::now() + WAIT;
    let egress = loop {
        // NOT_FOUND until the watchers have both; then the stream's first answer, waited for
        // a bounded time (a stream that has not answered yet is asked again).
        if let Ok(response) = policies.watch(outside.clone()).await
            && let Ok(Ok(Some(policy))) =
                tokio::time::timeout(Duration::from_secs(2), response.into_inner().message()).await
            && let Some(egress) = policy.egress.filter(|e| !e.tls_hosts.is_empty())
        {
            break egress;
        }
        assert!(
            Instant::now() < deadline,
            "no egress policy for 203.0.113.9:443"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(egress.network, format!("{ns}/outside"));
    assert_eq!(
        egress.traffic_policy,
        mesh_proto::policy::egress::TrafficPolicy::Deny as i32
    );
    assert_eq!(egress.tls_hosts, ["payments.example.com"]);
    // Its status says the mesh accepted it on the EgressNetwork.
    let tls_routes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1alpha2", "TLSRoute"),
            "tlsroutes",
        ),
    );
    let deadline = Instant::now() + WAIT;
    while accepted_named(&tls_routes, "payments").await != Some(("True".into(), "Accepted".into()))
    {
        assert!(
            Instant::now() < deadline,
            "the TLSRoute was never Accepted: {:?}",
            tls_routes.get("payments").await.map(|r| r.data)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}
