use super::*;
use serde_json::{Value, json};

fn review(operation: &str, kind: &str, namespace: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": object,
            "dryRun": false
        }
    }))
    .expect("a test review encodes")
}

fn app_pod(annotations: Value) -> Value {
    // No namespace in the object: the API server often leaves it to the request.
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "example/app"}]}
    })
}

fn webhook_with(namespaces: &[(&str, &[(&str, &str)])]) -> Webhook {
    let namespaces = namespaces
        .iter()
        .map(|(name, annotations)| {
            let annotations = annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            ((*name).to_owned(), annotations)
        })
        .collect();
    Webhook::new(
        MeshConfig::default(),
        StaticNamespaces(namespaces),
        Metrics::new(),
    )
}

fn meshed_webhook() -> Webhook {
    webhook_with(&[("meshed", &[("mesh.dev/inject", "enabled")])])
}

fn response(review: &AdmissionReview<DynamicObject>) -> &AdmissionResponse {
    review.response.as_ref().expect("a response")
}

fn patch_of(response: &AdmissionResponse) -> Option<json_patch::Patch> {
    response
        .patch
        .as_ref()
        .map(|bytes| serde_json::from_slice(bytes).expect("the patch is a JSONPatch"))
}

#[tokio::test]
async fn answers_by_request() {
    let cases = [
        (
            "pod created in a meshed namespace",
            review("CREATE", "Pod", "meshed", app_pod(json!({}))),
            true,
            true,
            AdmissionResult::Injected,
        ),
        (
            "pod annotated in a plain namespace",
            review(
                "CREATE",
                "Pod",
                "plain",
                app_pod(json!({"mesh.dev/inject": "enabled"})),
            ),
            true,
            true,
            AdmissionResult::Injected,
        ),
        (
            "pod in a plain namespace",
            review("CREATE", "Pod", "plain", app_pod(json!({}))),
            true,
            false,
            AdmissionResult::Skipped,
        ),
        (
            "pod opting out",
            review(
                "CREATE",
                "Pod",
                "meshed",
                app_pod(json!({"mesh.dev/inject": "disabled"})),
            ),
            true,
            false,
            AdmissionResult::Skipped,
        ),
        (
            "an update",
            review("UPDATE", "Pod", "meshed", app_pod(json!({}))),
            true,
            false,
            AdmissionResult::Skipped,
        ),
        (
            "not a pod",
            review(
                "CREATE",
                "ConfigMap",
                "meshed",
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
            ),
            true,
            false,
            AdmissionResult::Skipped,
        ),
        (
            "a bad annotation",
            review(
                "CREATE",
                "Pod",
                "meshed",
                app_pod(json!({"config.mesh.dev/skip-inbound-ports": "80,abc"})),
            ),
            false,
            false,
            AdmissionResult::Denied,
        ),
    ];
    for (name, body, allowed, patched, result) in cases {
        let webhook = meshed_webhook();
        let answer = webhook.review(&body).await.expect(name);
        let response = response(&answer);
        assert_eq!(response.allowed, allowed, "{name}");
        assert_eq!(
            response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002",
            "{name}"
        );
        assert_eq!(patch_of(response).is_some(), patched, "{name}");
        assert_eq!(webhook.metrics().count(result), 1, "{name}");
    }
}

#[tokio::test]
async fn the_patch_applied_to_the_request_object_is_the_injected_pod() {
    let object = app_pod(json!({"team": "shop"}));
    let answer = meshed_webhook()
        .review(&review("CREATE", "Pod", "meshed", object.clone()))
        .await
        .expect("a review");
    let patch = patch_of(response(&answer)).expect("a patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies to the request's object");

    let mut pod: Pod = serde_json::from_value(object).expect("a pod");
    pod.metadata.namespace = Some("meshed".into());
    let expected = match inject(
        &pod,
        &BTreeMap::from([("mesh.dev/inject".to_owned(), "enabled".to_owned())]),
        &MeshConfig::default(),
    ) {
        Ok(Outcome::Injected(pod)) => pod,
        other => panic!("expected an injection, got {other:?}"),
    };
    let mut expected = serde_json::to_value(expected).expect("encodes");
    // The request's object had no namespace, and the patch leaves that to the API server.
    if let Some(metadata) = expected.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.remove("namespace");
    }
    assert_eq!(patched, expected);
    let containers = &patched["spec"]["containers"];
    assert_eq!(containers[0]["name"], "mesh-proxy");
    assert_eq!(containers[1]["name"], "app");
    assert_eq!(patched["spec"]["initContainers"][0]["name"], "mesh-init");
}

/// Found by fuzzing (tests/fuzz.rs): a pod saying `namespace: ""` was injected without its
/// namespace's annotations (and with identity on, as `spiffe://.../ns//sa/...`).
#[tokio::test]
async fn an_empty_namespace_in_the_pod_is_the_requests() {
    let object = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"annotations": {"mesh.dev/inject": " enabled "}, "namespace": ""},
        "spec": {"containers": []}
    });
    let webhook = webhook_with(&[("shop", &[("config.mesh.dev/skip-inbound-ports", "25,3306")])]);
    let answer = webhook
        .review(&review("CREATE", "Pod", "shop", object.clone()))
        .await
        .expect("a review");
    let patch = patch_of(response(&answer)).expect("a patch");
    let mut patched = object;
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    let args = &patched["spec"]["initContainers"][0]["args"];
    assert!(
        args.as_array()
            .expect("args")
            .contains(&json!("--skip-inbound-ports=25,3306")),
        "{args}"
    );
}

#[tokio::test]
async fn a_bad_annotation_is_refused_with_its_name_and_value() {
    let body = review(
        "CREATE",
        "Pod",
        "meshed",
        app_pod(json!({"config.mesh.dev/proxy-cpu-limit": "lots"})),
    );
    let answer = meshed_webhook().review(&body).await.expect("a review");
    let response = response(&answer);
    assert!(!response.allowed);
    assert!(
        response
            .result
            .message
            .contains(r#"config.mesh.dev/proxy-cpu-limit: "lots""#),
        "{}",
        response.result.message
    );
}

struct FailingNamespaces;

impl NamespaceSource for FailingNamespaces {
    fn annotations<'a>(&'a self, namespace: &'a str) -> NamespaceFuture<'a> {
        Box::pin(async move { Err(format!("namespaces {namespace:?} is forbidden")) })
    }
}

struct HangingNamespaces;

impl NamespaceSource for HangingNamespaces {
    fn annotations<'a>(&'a self, _namespace: &'a str) -> NamespaceFuture<'a> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn an_unreadable_namespace_admits_the_pod_unchanged_and_quickly() {
    let body = review("CREATE", "Pod", "meshed", app_pod(json!({})));
    let failing = Webhook::new(MeshConfig::default(), FailingNamespaces, Metrics::new());
    let hanging = Webhook::new(MeshConfig::default(), HangingNamespaces, Metrics::new())
        .with_namespace_timeout(Duration::from_millis(50));
    for (webhook, expected) in [(failing, "forbidden"), (hanging, "took over")] {
        let started = Instant::now();
        let answer = webhook.review(&body).await.expect("a review");
        assert!(started.elapsed() < Duration::from_secs(2));
        let response = response(&answer);
        assert!(response.allowed);
        assert!(response.patch.is_none());
        let warnings = response.warnings.clone().unwrap_or_default().join("\n");
        assert!(warnings.contains(expected), "{warnings}");
        assert_eq!(webhook.metrics().count(AdmissionResult::Error), 1);
    }
}

#[tokio::test]
async fn garbage_is_not_a_review() {
    let webhook = meshed_webhook();
    for body in [
        &b"not json"[..],
        b"{}",
        br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
    ] {
        assert!(webhook.review(body).await.is_err());
    }
    assert_eq!(webhook.metrics().count(AdmissionResult::Invalid), 3);
}

#[test]
fn tls_config_names_the_bad_file() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a test certificate");
    let cert = certified.cert.pem();
    let key = certified.signing_key.serialize_pem();
    assert!(tls_config_from_pem(cert.as_bytes(), key.as_bytes()).is_ok());
    let error = tls_config_from_pem(b"", key.as_bytes()).expect_err("no certificate");
    assert!(matches!(error, TlsError::Certificate { .. }), "{error}");
    let error = tls_config_from_pem(cert.as_bytes(), b"nope").expect_err("no key");
    assert!(matches!(error, TlsError::Key { .. }), "{error}");
    let error = tls_config_from_files(Path::new("/nonexistent/tls.crt"), Path::new("/x"))
        .expect_err("no file");
    assert!(
        error.to_string().starts_with("/nonexistent/tls.crt: "),
        "{error}"
    );
}

/// One HTTPS request to the server, trusting `ca_pem`.
async fn https(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    use http_body_util::{BodyExt, Full};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("a PEM cert")).expect("a root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake with the webhook");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a request");
    let response = sender.send_request(request).await.expect("a response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes()
        .to_vec();
    (status, body)
}

#[tokio::test]
async fn serves_admission_reviews_over_tls() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a test certificate");
    let cert = certified.cert.pem();
    let tls = tls_config_from_pem(
        cert.as_bytes(),
        certified.signing_key.serialize_pem().as_bytes(),
    )
    .expect("a TLS config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_tls(
        listener,
        Arc::new(tls),
        router(meshed_webhook()),
        async move {
            let _ = stopped.await;
        },
    ));

    let run = async {
        let body = review("CREATE", "Pod", "meshed", app_pod(json!({})));
        let (status, answer) = https(addr, &cert, "POST", "/inject", body).await;
        assert_eq!(status, StatusCode::OK);
        let answer: Value = serde_json::from_slice(&answer).expect("JSON");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");

        let (status, _) = https(addr, &cert, "POST", "/inject", b"garbage".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        for path in ["/ready", "/live"] {
            let (status, _) = https(addr, &cert, "GET", path, Vec::new()).await;
            assert_eq!(status, StatusCode::OK, "{path}");
        }
        let (status, metrics) = https(addr, &cert, "GET", "/metrics", Vec::new()).await;
        assert_eq!(status, StatusCode::OK);
        let metrics = String::from_utf8(metrics).expect("text");
        assert!(
            metrics.contains(r#"mesh_injector_admission_requests_total{result="injected"} 1"#),
            "{metrics}"
        );
        assert!(
            metrics.contains("mesh_injector_admission_duration_seconds_count 2"),
            "{metrics}"
        );
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the webhook answers in time");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .expect("the server stops")
        .expect("the server task")
        .expect("the server ends cleanly");
}

#[test]
fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("mesh-injector-certs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    let write = |certified: &rcgen::CertifiedKey<rcgen::KeyPair>| {
        std::fs::write(&cert_path, certified.cert.pem()).expect("write the cert");
        std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write the key");
    };
    let generate =
        || rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (first, second) = (generate(), generate());
    write(&first);
    let resolver = ReloadingCertificate::load(&cert_path, &key_path, provider.clone())
        .expect("the first certificate loads")
        .with_check_interval(Duration::ZERO);
    let served = |resolver: &ReloadingCertificate| resolver.current().cert[0].clone();
    assert_eq!(served(&resolver), *first.cert.der());

    write(&second);
    assert_eq!(
        served(&resolver),
        *second.cert.der(),
        "the rotation is picked up"
    );

    std::fs::write(&cert_path, "half-written").expect("write garbage");
    assert_eq!(
        served(&resolver),
        *second.cert.der(),
        "a broken rotation keeps the last good certificate"
    );

    // A key that does not match its certificate is refused at start.
    std::fs::write(&cert_path, first.cert.pem()).expect("write the cert");
    std::fs::write(&key_path, second.signing_key.serialize_pem()).expect("write the key");
    let error =
        ReloadingCertificate::load(&cert_path, &key_path, provider).expect_err("mismatched key");
    assert!(matches!(error, TlsError::Config(_)), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
