//! Fuzz targets for the injector, on stable Rust under plain `cargo test` / `cargo nextest`:
//! the admission webhook's `review` on any bytes and on well-formed AdmissionReviews of
//! arbitrary pods, and the annotation parsers through `inject`. Each runs for a few seconds
//! (`MESH_FUZZ_SECONDS` for longer; `just fuzz`). proptest rather than bolero: bolero 0.13
//! pins indexmap to exactly 2.11.2, which would downgrade the indexmap of the shipped binaries
//! (the runner says more).
//!
//! The strongest property is across crates: a pod the injector admits gets a proxy and an init
//! container that accept the configuration they are given (the proxy's own `Config` parser,
//! log filter and `mesh-proxy init` flags), so an admitted pod never crash-loops on it.

#[path = "../../proxy/tests/fuzz/runner.rs"]
mod runner;

use std::collections::BTreeMap;

use clap::Parser;
use k8s_openapi::api::core::v1::{Container, Pod};
use mesh_injector::annotations::{self, CONFIG_ANNOTATIONS};
use mesh_injector::metrics::Metrics;
use mesh_injector::webhook::{StaticNamespaces, Webhook};
use mesh_injector::{
    INIT_CONTAINER, InjectError, MeshConfig, Outcome, PROXY_CONTAINER, Source, inject, is_injected,
    uninject,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use serde_json::{Value, json};

use runner::fuzz;

/// The namespace the generated pods mostly live in; its annotations are generated too.
const NAMESPACE: &str = "shop";

const UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

/// Values for each annotation injection reads: good ones, bad ones, edge cases.
fn annotation_value(name: &'static str) -> BoxedStrategy<String> {
    let examples: &[&str] = match name {
        annotations::INJECT => &["enabled", "disabled", " enabled ", "yes"],
        annotations::SKIP_INBOUND_PORTS
        | annotations::SKIP_OUTBOUND_PORTS
        | annotations::OPAQUE_PORTS => &[
            "25,3306",
            "8000-8100",
            " 80 , 443 ,",
            "80 - 90",
            "90-80",
            "0",
            "65536",
            "http",
            "admin,grpc",
            "-",
            "1-",
        ],
        annotations::SKIP_SUBNETS => &[
            "10.0.0.0/8",
            "fd00::/8,10.1.2.3",
            "10.0.0.0/33",
            "10.0.0.0/",
        ],
        annotations::PROXY_CPU_REQUEST
        | annotations::PROXY_CPU_LIMIT
        | annotations::PROXY_MEMORY_REQUEST
        | annotations::PROXY_MEMORY_LIMIT => &[
            "100m", "0.5", "64Mi", "1Gi", "1e3", "1e-3", "lots", ".", "1.2.3",
        ],
        annotations::PROXY_LOG_LEVEL => &[
            "info",
            "warn,mesh_proxy=debug",
            "DEBUG",
            "mesh::proxy=trace",
            "a-b=info",
            "=info",
            "info,",
            "",
        ],
        annotations::PROXY_IMAGE => &["ghcr.io/mesh/proxy:1.0", "a b", ""],
        annotations::DEFAULT_INBOUND_POLICY => &["deny", "audit", "all-authenticated", "allow"],
        annotations::SHUTDOWN_GRACE_PERIOD => {
            &["10s", "500ms", "1m", "99999999999999999999h", "10"]
        }
        annotations::TRACE_COLLECTOR => &[
            "otel-collector.monitoring:4317",
            "http://collector:4317/",
            "https://[::1]:4317",
            "[::1]:4317",
            "collector",
            "grpc://collector:4317",
            "collector:0",
        ],
        annotations::TRACE_SAMPLE_RATE => &["0.1", "1", "0", "-0", "1e-1", "NaN", "2", ".5", "5."],
        annotations::ACCESS_LOG => &["json", "apache", "xml"],
        _ => &["1"],
    };
    // Values built from the grammar of each kind of annotation, reaching its bounds.
    let generated = match name {
        annotations::SHUTDOWN_GRACE_PERIOD => (
            prop_oneof![0..1000u64, any::<u64>(), (u64::MAX / 3600)..=u64::MAX],
            prop::sample::select(vec!["ms", "s", "m", "h"]),
        )
            .prop_map(|(number, unit)| format!("{number}{unit}"))
            .boxed(),
        annotations::PROXY_LOG_LEVEL => {
            "((trace|debug|INFO|warn|error|off)|[a-z_:.-]{1,8}=(trace|Debug|off))(, ?(info|[a-z_:-]{1,6}=warn)){0,2}"
                .boxed()
        }
        annotations::TRACE_SAMPLE_RATE => prop_oneof![
            any::<f64>().prop_map(|rate| rate.to_string()),
            (0.0..=1.0f64).prop_map(|rate| format!("{rate:e}")),
        ]
        .boxed(),
        annotations::SKIP_INBOUND_PORTS
        | annotations::SKIP_OUTBOUND_PORTS
        | annotations::OPAQUE_PORTS => "(([0-9]{1,5}(-[0-9]{1,5})?|[a-z]{1,4}), ?){0,3}".boxed(),
        _ => "[ -~]{0,12}".boxed(),
    };
    let examples: Vec<String> = examples.iter().map(|e| (*e).to_owned()).collect();
    prop_oneof![
        4 => prop::sample::select(examples),
        2 => generated,
        1 => "[ -~]{0,12}",
        1 => ".{0,8}",
    ]
    .boxed()
}

/// Annotations of a pod or namespace: some of the ones injection reads, and others.
fn annotation_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    let mut names = vec![
        annotations::INJECT,
        annotations::INJECT,
        annotations::INJECTED,
    ];
    names.extend(CONFIG_ANNOTATIONS);
    let pair = prop::sample::select(names)
        .prop_flat_map(|name| (Just(name.to_owned()), annotation_value(name)));
    vec(pair, 0..5).prop_map(|pairs| pairs.into_iter().collect())
}

fn container() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        6 => prop::sample::select(vec!["app", "sidecar", "web"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec![PROXY_CONTAINER, INIT_CONTAINER]).prop_map(str::to_owned),
        1 => "[a-z-]{0,6}",
    ];
    let port = (
        prop_oneof![1..65_536i64, any::<i32>().prop_map(i64::from), any::<i64>()],
        option::of(prop_oneof!["http|grpc|admin", "[a-z0-9-]{0,16}"]),
    )
        .prop_map(|(number, name)| match name {
            Some(name) => json!({"containerPort": number, "name": name}),
            None => json!({"containerPort": number}),
        });
    (name, vec(port, 0..3), any::<bool>()).prop_map(|(name, ports, unknown_field)| {
        let mut container = json!({"name": name, "image": "example/app", "ports": ports});
        if unknown_field {
            container["x-unknown"] = json!(1);
        }
        container
    })
}

/// A pod as a client may create it: names or a generated name, owners, annotations, any mix of
/// containers (some with the names injection adds), host networking, volumes; or noise where
/// a spec should be.
fn pod() -> impl Strategy<Value = Value> {
    let owner = option::of((
        prop::bool::ANY,
        "web-[a-z0-9]{0,6}",
        option::of(any::<bool>()),
    ));
    let metadata = (
        option::of(prop_oneof!["web-1", ".{0,8}"]),
        option::of(Just("web-")),
        option::of(prop_oneof![
            Just(NAMESPACE.to_owned()),
            Just("kube-system".to_owned()),
            Just(String::new()),
            "[a-z]{1,6}",
        ]),
        option::of(annotation_map()),
        owner,
    )
        .prop_map(|(name, generate_name, namespace, annotations, owner)| {
            let mut metadata = json!({});
            if let Some(name) = name {
                metadata["name"] = json!(name);
            }
            if let Some(generate_name) = generate_name {
                metadata["generateName"] = json!(generate_name);
            }
            if let Some(namespace) = namespace {
                metadata["namespace"] = json!(namespace);
            }
            if let Some(annotations) = annotations {
                metadata["annotations"] = json!(annotations);
            }
            if let Some((replica_set, owner_name, controller)) = owner {
                let kind = if replica_set {
                    "ReplicaSet"
                } else {
                    "StatefulSet"
                };
                metadata["labels"] = json!({"pod-template-hash": "abc12"});
                metadata["ownerReferences"] = json!([{
                    "apiVersion": "apps/v1", "kind": kind, "name": owner_name,
                    "uid": "1", "controller": controller,
                }]);
            }
            metadata
        });
    let spec = (
        vec(container(), 0..3),
        option::of(vec(container(), 0..2)),
        option::of(any::<bool>()),
        option::of(vec(
            prop::sample::select(vec!["data", "mesh-identity-token"])
                .prop_map(|name| json!({"name": name})),
            0..2,
        )),
        option::of(prop_oneof!["web", ""]),
    )
        .prop_map(
            |(containers, init_containers, host_network, volumes, service_account)| {
                let mut spec = json!({"containers": containers});
                if let Some(init_containers) = init_containers {
                    spec["initContainers"] = json!(init_containers);
                }
                if let Some(host_network) = host_network {
                    spec["hostNetwork"] = json!(host_network);
                }
                if let Some(volumes) = volumes {
                    spec["volumes"] = json!(volumes);
                }
                if let Some(service_account) = service_account {
                    spec["serviceAccountName"] = json!(service_account);
                }
                spec
            },
        );
    let spec = prop_oneof![
        8 => spec,
        1 => Just(Value::Null),
        1 => prop_oneof![Just(json!("x")), Just(json!({"containers": "x"})), Just(json!([]))],
    ];
    (metadata, spec).prop_map(|(metadata, spec)| {
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata});
        if !spec.is_null() {
            pod["spec"] = spec;
        }
        pod
    })
}

/// The mesh configurations the webhook runs with: the default, and with identity on.
fn mesh_config() -> impl Strategy<Value = MeshConfig> {
    prop_oneof![
        Just(MeshConfig::default()),
        Just(MeshConfig {
            trust_anchors_pem: "-----BEGIN CERTIFICATE-----\n...\n".to_owned(),
            native_sidecars: true,
            ..MeshConfig::default()
        }),
    ]
}

/// An AdmissionReview v1 as the API server sends it, for `object`.
fn review(operation: &str, kind: &str, object: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": UID,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NAMESPACE,
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": object,
            "dryRun": false
        }
    }))
    .expect("a review encodes")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// Bytes the webhook may be sent: noise, JSON of the wrong shape, and AdmissionReviews with
/// one part broken or cut short.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let review = (pod(), "CREATE|UPDATE|[A-Z]{0,6}", "Pod|ConfigMap|.{0,4}")
        .prop_map(|(pod, operation, kind)| review(&operation, &kind, &pod))
        .boxed();
    prop_oneof![
        vec(any::<u8>(), 0..64),
        Just(b"{}".to_vec()),
        Just(br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#.to_vec()),
        Just(br#"{"request": null}"#.to_vec()),
        (review.clone(), any::<prop::sample::Index>())
            .prop_map(|(body, cut)| body[..cut.index(body.len())].to_vec()),
        (review, any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut body, at, byte)| {
            let at = at.index(body.len());
            body[at] = byte;
            body
        }),
    ]
}

/// Any bytes get an answer or a clear error, never a panic: an AdmissionReview is answered
/// for its own request (by uid), anything else is refused as not being one.
#[test]
fn reviews_of_any_bytes_answer_or_refuse() {
    let runtime = runtime();
    let webhook = Webhook::new(
        MeshConfig::default(),
        StaticNamespaces::default(),
        Metrics::new(),
    );
    fuzz(body(), |body| {
        match runtime.block_on(webhook.review(&body)) {
            Ok(review) => {
                let response = review
                    .response
                    .ok_or_else(|| TestCaseError::fail("an answer without a response"))?;
                prop_assert!(!response.uid.is_empty());
            }
            Err(error) => prop_assert!(
                error.starts_with("not an AdmissionReview")
                    || error.starts_with("an AdmissionReview without a request"),
                "{}",
                error
            ),
        }
        Ok(())
    });
}

/// An AdmissionReview of any pod is answered: admitted unchanged, refused with a reason, or
/// admitted with a JSON Patch that applies to the request's object and makes exactly the pod
/// `inject` makes, which a second review leaves alone.
#[test]
fn admitted_pods_get_a_patch_that_applies() {
    let runtime = runtime();
    fuzz(
        (pod(), annotation_map(), mesh_config()),
        |(object, namespace_annotations, config)| {
            let namespaces = StaticNamespaces(BTreeMap::from([(
                NAMESPACE.to_owned(),
                namespace_annotations.clone(),
            )]));
            let webhook = Webhook::new(config.clone(), namespaces, Metrics::new());
            let answer = runtime
                .block_on(webhook.review(&review("CREATE", "Pod", &object)))
                .map_err(TestCaseError::fail)?;
            let response = answer
                .response
                .ok_or_else(|| TestCaseError::fail("no response"))?;
            prop_assert_eq!(&response.uid, UID);
            if !response.allowed {
                let message = &response.result.message;
                prop_assert!(
                    message.starts_with("mesh injection: ")
                        || message.starts_with("the object is not a Pod"),
                    "{}",
                    message
                );
                return Ok(());
            }
            let Some(patch) = &response.patch else {
                return Ok(());
            };
            let patch: json_patch::Patch = serde_json::from_slice(patch)
                .map_err(|e| TestCaseError::fail(format!("the patch is not a JSON Patch: {e}")))?;
            let mut patched = object.clone();
            json_patch::patch(&mut patched, &patch)
                .map_err(|e| TestCaseError::fail(format!("the patch does not apply: {e}")))?;
            let patched: Pod = serde_json::from_value(patched)
                .map_err(|e| TestCaseError::fail(format!("the patched object is no pod: {e}")))?;

            // What `inject` makes of the pod the webhook saw (its namespace from the request).
            let mut pod: Pod = serde_json::from_value(object.clone()).expect("the webhook read it");
            let own_namespace = pod.metadata.namespace.clone();
            if own_namespace.as_deref().is_none_or(str::is_empty) {
                pod.metadata.namespace = Some(NAMESPACE.to_owned());
            }
            let seen_annotations = if pod.metadata.namespace.as_deref() == Some(NAMESPACE) {
                namespace_annotations.clone()
            } else {
                BTreeMap::new()
            };
            let Ok(Outcome::Injected(mut expected)) = inject(&pod, &seen_annotations, &config)
            else {
                return Err(TestCaseError::fail("patched, but inject does not inject"));
            };
            // The patch leaves the namespace to the API server.
            expected.metadata.namespace = own_namespace;
            prop_assert_eq!(&patched, &expected);

            let spec = patched.spec.as_ref().expect("injected pods have a spec");
            prop_assert!(is_injected(&patched.metadata, spec));
            let again = serde_json::to_value(&patched).expect("encodes");
            let second = runtime
                .block_on(webhook.review(&review("CREATE", "Pod", &again)))
                .map_err(TestCaseError::fail)?;
            let second = second.response.expect("a response");
            prop_assert!(second.allowed && second.patch.is_none(), "injected twice");
            Ok(())
        },
    );
}

/// `mesh-proxy init`'s flags, as the proxy binary parses them.
#[derive(Debug, Parser)]
struct InitCommand {
    #[command(flatten)]
    args: mesh_proxy::capture::InitArgs,
}

/// The value of every environment variable of `container` that Kubernetes would set, with
/// the downward API's fields filled as the kubelet would.
fn environment(container: &Container) -> BTreeMap<String, String> {
    container
        .env
        .iter()
        .flatten()
        .map(|var| {
            let value = match &var.value {
                Some(value) => value.replace("$(MESH_PROXY_NAMESPACE)", NAMESPACE),
                None => "from-the-downward-api".to_owned(),
            };
            (var.name.clone(), value)
        })
        .collect()
}

/// Annotations on the pod over its namespace's: a bad value refuses the pod with an error that
/// names the annotation and the value where it was set; an injected pod's proxy accepts its
/// configuration (environment and log filter), `mesh-proxy init` accepts its flags, and
/// `uninject` gives the pod back.
#[test]
fn annotations_are_refused_by_name_or_work_in_the_proxy() {
    fuzz(
        (pod(), annotation_map(), mesh_config()),
        |(object, namespace_annotations, config)| {
            let Ok(pod) = serde_json::from_value::<Pod>(object) else {
                return Ok(());
            };
            let pod_annotations = pod.metadata.annotations.clone().unwrap_or_default();
            let injected = match inject(&pod, &namespace_annotations, &config) {
                Ok(Outcome::Injected(injected)) => injected,
                Ok(Outcome::Skipped(_))
                | Err(InjectError::NoSpec | InjectError::NameTaken { .. }) => {
                    return Ok(());
                }
                Err(InjectError::BadAnnotation(error)) => {
                    let set = match error.set_on {
                        Source::Pod => pod_annotations.get(error.annotation),
                        Source::Namespace => namespace_annotations.get(error.annotation),
                        Source::MeshConfig => {
                            return Err(TestCaseError::fail(format!(
                                "the default configuration is at fault: {error}"
                            )));
                        }
                    };
                    prop_assert_eq!(set, Some(&error.value), "{}", error);
                    prop_assert!(error.to_string().starts_with(error.annotation), "{}", error);
                    return Ok(());
                }
            };
            let spec = injected.spec.as_ref().expect("injected pods have a spec");
            let proxy = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == PROXY_CONTAINER)
                .ok_or_else(|| TestCaseError::fail("no proxy container"))?;
            let env = environment(proxy);
            let proxy_config = mesh_proxy::config::Config::from_lookup(|var| env.get(var).cloned())
                .map_err(|e| {
                    TestCaseError::fail(format!("the proxy refuses its configuration: {e}"))
                })?;
            tracing_subscriber::EnvFilter::try_new(&proxy_config.log_level).map_err(|e| {
                TestCaseError::fail(format!(
                    "the proxy refuses its log filter {:?}: {e}",
                    proxy_config.log_level
                ))
            })?;

            let init = spec
                .init_containers
                .iter()
                .flatten()
                .find(|c| c.name == INIT_CONTAINER)
                .ok_or_else(|| TestCaseError::fail("no init container"))?;
            let args = init.args.clone().unwrap_or_default();
            prop_assert_eq!(args.first().map(String::as_str), Some("init"));
            let flags =
                std::iter::once("mesh-proxy init".to_owned()).chain(args.into_iter().skip(1));
            let command = InitCommand::try_parse_from(flags).map_err(|e| {
                TestCaseError::fail(format!("mesh-proxy init refuses its flags: {e}"))
            })?;
            command.args.validate().map_err(|e| {
                TestCaseError::fail(format!("mesh-proxy init refuses its flags: {e}"))
            })?;

            prop_assert_eq!(uninject(&injected).map(normalized), Some(normalized(pod)));
            Ok(())
        },
    );
}

/// The pod with empty annotations, init containers and volumes absent instead, which is the
/// same to Kubernetes: `uninject` drops what injection added and leaves nothing empty.
fn normalized(mut pod: Pod) -> Pod {
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(BTreeMap::is_empty)
    {
        pod.metadata.annotations = None;
    }
    if let Some(spec) = pod.spec.as_mut() {
        if spec.init_containers.as_ref().is_some_and(Vec::is_empty) {
            spec.init_containers = None;
        }
        if spec.volumes.as_ref().is_some_and(Vec::is_empty) {
            spec.volumes = None;
        }
    }
    pod
}
