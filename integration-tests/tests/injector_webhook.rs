//! The injector's webhook called by a real API server: a MutatingWebhookConfiguration with
//! `url: https://127.0.0.1:PORT/inject`, its CA bundle, a namespaceSelector on the label
//! `mesh.dev/inject=enabled` and `failurePolicy: Ignore`. Checked:
//! - a Pod created in a labelled and annotated namespace comes back injected (classic sidecar:
//!   the test cluster is 1.20), and so do the pods a Deployment's ReplicaSet creates, named
//!   for the Deployment;
//! - a Pod in an un-annotated namespace is untouched;
//! - a bad annotation refuses the Pod with the annotation named;
//! - with the webhook down, pods of the meshed namespace are still admitted (unmeshed).
//!
//! The cluster: `KUBECONFIG` when set (it must be able to reach 127.0.0.1 of this machine),
//! else one started by `scripts/k8s-test-cluster` on free loopback ports. When no cluster can
//! be had the test fails under `CI=true` and skips loudly otherwise.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use mesh_injector::MeshConfig;
use mesh_injector::metrics::{AdmissionResult, Metrics};
use mesh_injector::webhook::{self, KubeNamespaces, Webhook};
use mesh_integration_tests::cluster::Cluster;
use serde_json::json;

/// Bound on every wait for the API server and its controllers.
const WAIT: Duration = Duration::from_secs(30);

/// A client of the test cluster.
async fn client(cluster: &Cluster) -> Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&cluster.kubeconfig).expect("read the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("a client config from the kubeconfig");
    Client::try_from(config).expect("a Kubernetes client")
}

/// A CA and a serving certificate for 127.0.0.1 signed by it: (CA PEM, cert PEM, key PEM).
fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mesh-injector-test-ca");
    let ca = ca_params.self_signed(&ca_key).expect("the CA");
    let key = KeyPair::generate().expect("a serving key");
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned()]).expect("serving cert params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).expect("the serving cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn pod(name: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}
    }))
    .expect("a pod fits the schema")
}

fn container_names(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let spec = pod.spec.as_ref().expect("a spec");
    let names = |containers: Option<&Vec<k8s_openapi::api::core::v1::Container>>| {
        containers
            .into_iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    (
        names(spec.init_containers.as_ref()),
        names(Some(&spec.containers)),
    )
}

fn proxy_env(pod: &Pod, name: &str) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == "mesh-proxy")?
        .env
        .as_ref()?
        .iter()
        .find(|v| v.name == name)?
        .value
        .clone()
}

/// Creates a pod, retrying while the namespace's default ServiceAccount or its token does not
/// exist yet (the controller-manager creates them shortly after the namespace).
async fn create_pod(pods: &Api<Pod>, pod: &Pod) -> Result<Pod, kube::Error> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match pods.create(&PostParams::default(), pod).await {
            // "serviceaccount \"default\" not found", or "No API token found for service
            // account \"default\"" until its token Secret exists.
            Err(kube::Error::Api(error))
                if (error.message.contains("serviceaccount")
                    || error.message.contains("service account"))
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

async fn create_namespace(client: &Client, name: &str, meshed: bool) {
    let mut metadata = json!({"name": name});
    if meshed {
        metadata["labels"] = json!({"mesh.dev/inject": "enabled"});
        metadata["annotations"] = json!({"mesh.dev/inject": "enabled"});
    }
    let namespace: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}),
    )
    .expect("a namespace fits the schema");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create a test namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_injects_through_the_webhook() {
    let Some(cluster) = Cluster::get("injector_webhook") else {
        return;
    };
    let client = client(&cluster).await;
    let run = async {
        let id = std::process::id();
        let meshed = format!("mesh-inj-meshed-{id}");
        let plain = format!("mesh-inj-plain-{id}");
        create_namespace(&client, &meshed, true).await;
        create_namespace(&client, &plain, false).await;

        // The webhook, in-process on a free loopback port.
        let (ca_pem, cert_pem, key_pem) = certificates();
        let tls = webhook::tls_config_from_pem(cert_pem.as_bytes(), key_pem.as_bytes())
            .expect("a TLS config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook");
        let port = listener.local_addr().expect("an address").port();
        let metrics = Metrics::new();
        let config = MeshConfig {
            trust_anchors_pem: ca_pem.clone(),
            // The test cluster is 1.20: no native sidecars.
            native_sidecars: false,
            ..MeshConfig::default()
        };
        let hook = Webhook::new(config, KubeNamespaces::new(client.clone()), metrics.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(webhook::serve_tls(
            listener,
            Arc::new(tls),
            webhook::router(hook),
            async move {
                let _ = stopped.await;
            },
        ));

        let name = format!("mesh-injector-test-{id}");
        let mut configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": "inject.mesh.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "timeoutSeconds": 5,
                "reinvocationPolicy": "Never",
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/inject")},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                    "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"mesh.dev/inject": "enabled"}}
            }]
        }))
        .expect("a webhook configuration fits the schema");
        if let Some(hook) = configuration.webhooks.as_mut().and_then(|w| w.first_mut()) {
            hook.client_config.ca_bundle = Some(ByteString(ca_pem.clone().into_bytes()));
        }
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        configurations
            .create(&PostParams::default(), &configuration)
            .await
            .expect("create the MutatingWebhookConfiguration");

        // The API server picks new webhook configurations up asynchronously: probe until a
        // pod of the meshed namespace comes back injected.
        let meshed_pods: Api<Pod> = Api::namespaced(client.clone(), &meshed);
        let deadline = tokio::time::Instant::now() + WAIT;
        let injected = loop {
            let probe = create_pod(&meshed_pods, &pod("web", json!({})))
                .await
                .expect("create a pod in the meshed namespace");
            if container_names(&probe).1.first().map(String::as_str) == Some("mesh-proxy") {
                break probe;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no pod came back injected within {WAIT:?}: {:?}",
                container_names(&probe)
            );
            meshed_pods
                .delete("web", &DeleteParams::default().grace_period(0))
                .await
                .expect("delete the unmeshed probe");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let (init, containers) = container_names(&injected);
        assert_eq!(init, ["mesh-init"]);
        assert_eq!(containers, ["mesh-proxy", "app"]);
        let annotations = injected.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.get("mesh.dev/injected").map(String::as_str),
            Some(mesh_injector::VERSION)
        );
        assert_eq!(
            annotations
                .get("mesh.dev/proxy-inbound-port")
                .map(String::as_str),
            Some("4143")
        );
        assert_eq!(
            proxy_env(&injected, "MESH_PROXY_IDENTITY"),
            Some(format!("spiffe://cluster.local/ns/{meshed}/sa/default"))
        );
        let volumes: Vec<String> = injected
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert!(
            volumes.contains(&"mesh-identity-token".to_owned()),
            "{volumes:?}"
        );

        // A pod of an un-annotated namespace is untouched: the API server never asks.
        let plain_pods: Api<Pod> = Api::namespaced(client.clone(), &plain);
        let untouched = create_pod(&plain_pods, &pod("web", json!({"team": "shop"})))
            .await
            .expect("create a pod in the plain namespace");
        assert_eq!(
            container_names(&untouched),
            (vec![], vec!["app".to_owned()])
        );
        assert_eq!(
            untouched
                .metadata
                .annotations
                .clone()
                .unwrap_or_default()
                .len(),
            1,
            "no annotation added"
        );

        // A bad annotation is refused, naming it.
        let refused = create_pod(
            &meshed_pods,
            &pod(
                "bad",
                json!({"config.mesh.dev/skip-inbound-ports": "80,abc"}),
            ),
        )
        .await
        .expect_err("a bad annotation refuses the pod");
        let message = refused.to_string();
        assert!(
            message.contains(r#"config.mesh.dev/skip-inbound-ports: \"80,abc\""#)
                || message.contains(r#"config.mesh.dev/skip-inbound-ports: "80,abc""#),
            "{message}"
        );

        // A Deployment's pods (created by the ReplicaSet controller) are injected and named
        // for the Deployment.
        let deployment: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "shop"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "shop"}},
                "template": {
                    "metadata": {"labels": {"app": "shop"}},
                    "spec": {"containers": [{"name": "shop", "image": "example/shop:1"}]}
                }
            }
        }))
        .expect("a deployment fits the schema");
        Api::<Deployment>::namespaced(client.clone(), &meshed)
            .create(&PostParams::default(), &deployment)
            .await
            .expect("create the deployment");
        let deadline = tokio::time::Instant::now() + WAIT;
        let replica = loop {
            let listed = meshed_pods
                .list(&ListParams::default().labels("app=shop"))
                .await
                .expect("list the deployment's pods");
            if let Some(pod) = listed.items.into_iter().next() {
                break pod;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the ReplicaSet made no pod within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(container_names(&replica).1, ["mesh-proxy", "shop"]);
        assert_eq!(
            proxy_env(&replica, "MESH_PROXY_WORKLOAD_KIND").as_deref(),
            Some("deployment")
        );
        assert_eq!(
            proxy_env(&replica, "MESH_PROXY_WORKLOAD_NAME").as_deref(),
            Some("shop")
        );
        assert!(metrics.count(AdmissionResult::Injected) >= 2);
        assert!(metrics.count(AdmissionResult::Denied) >= 1);

        // The webhook down: failurePolicy Ignore admits the pod, unmeshed, well within time.
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(15), server)
            .await
            .expect("the webhook stops")
            .expect("the webhook task")
            .expect("the webhook ends cleanly");
        let started = tokio::time::Instant::now();
        let admitted = create_pod(&meshed_pods, &pod("while-down", json!({})))
            .await
            .expect("with the webhook down a pod is still admitted");
        assert_eq!(container_names(&admitted), (vec![], vec!["app".to_owned()]));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "admitted in {:?}",
            started.elapsed()
        );

        // Leave a shared cluster as it was.
        let _ = configurations.delete(&name, &DeleteParams::default()).await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for namespace in [&meshed, &plain] {
            let _ = namespaces.delete(namespace, &DeleteParams::default()).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the webhook test finishes within 3 minutes");
}
