use super::*;
use serde_json::json;

const ANCHORS: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn config() -> MeshConfig {
    MeshConfig {
        trust_anchors_pem: ANCHORS.to_owned(),
        ..MeshConfig::default()
    }
}

fn native() -> MeshConfig {
    MeshConfig {
        native_sidecars: true,
        ..config()
    }
}

fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).expect("a valid test pod")
}

/// A pod of namespace `shop` asking for injection, with extra annotations.
fn annotated(extra: &[(&str, &str)]) -> Pod {
    let mut annotations = serde_json::Map::new();
    annotations.insert("mesh.dev/inject".into(), "enabled".into());
    for (key, value) in extra {
        annotations.insert((*key).into(), (*value).into());
    }
    pod(json!({
        "metadata": {"name": "web-1", "namespace": "shop", "annotations": annotations},
        "spec": {"serviceAccountName": "web", "containers": [
            {"name": "app", "image": "example/app", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "db", "containerPort": 5432}]}]}
    }))
}

fn none() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn injected(pod: &Pod, namespace: &BTreeMap<String, String>, config: &MeshConfig) -> Pod {
    match inject(pod, namespace, config).expect("injection succeeds") {
        Outcome::Injected(pod) => pod,
        Outcome::Skipped(reason) => panic!("skipped: {reason}"),
    }
}

fn spec(pod: &Pod) -> &PodSpec {
    pod.spec.as_ref().expect("a spec")
}

fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    spec(pod)
        .containers
        .iter()
        .chain(spec(pod).init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env(pod: &Pod, name: &str) -> Option<String> {
    let var = container(pod, PROXY_CONTAINER)
        .env
        .iter()
        .flatten()
        .find(|var| var.name == name)?;
    match (&var.value, &var.value_from) {
        (Some(value), _) => Some(value.clone()),
        (None, Some(from)) => Some(format!(
            "fieldRef:{}",
            from.field_ref.as_ref().expect("a field ref").field_path
        )),
        (None, None) => Some(String::new()),
    }
}

fn init_args(pod: &Pod) -> Vec<String> {
    container(pod, INIT_CONTAINER)
        .args
        .clone()
        .expect("mesh-init has args")
}

fn quantity(pod: &Pod, which: &str, resource: &str) -> Option<String> {
    let resources = container(pod, PROXY_CONTAINER)
        .resources
        .as_ref()
        .expect("resources");
    let map = if which == "requests" {
        &resources.requests
    } else {
        &resources.limits
    };
    map.as_ref()?.get(resource).map(|q| q.0.clone())
}

fn names(containers: Option<&Vec<Container>>) -> Vec<&str> {
    containers
        .into_iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect()
}

#[test]
fn skip_reasons() {
    let enabled = map(&[("mesh.dev/inject", "enabled")]);
    let disabled = map(&[("mesh.dev/inject", "disabled")]);
    let cases = [
        (
            "nothing asks for injection",
            pod(
                json!({"metadata": {"namespace": "shop"}, "spec": {"containers": [{"name": "app"}]}}),
            ),
            none(),
            SkipReason::NotEnabled,
        ),
        (
            "disabled on the pod in an enabled namespace",
            pod(
                json!({"metadata": {"namespace": "shop", "annotations": {"mesh.dev/inject": "disabled"}},
                "spec": {"containers": [{"name": "app"}]}}),
            ),
            enabled.clone(),
            SkipReason::Disabled(Source::Pod),
        ),
        (
            "disabled on the namespace",
            pod(
                json!({"metadata": {"namespace": "shop"}, "spec": {"containers": [{"name": "app"}]}}),
            ),
            disabled.clone(),
            SkipReason::Disabled(Source::Namespace),
        ),
        (
            "host network",
            pod(json!({"metadata": {"namespace": "shop"},
                "spec": {"hostNetwork": true, "containers": [{"name": "app"}]}})),
            enabled.clone(),
            SkipReason::HostNetwork,
        ),
        (
            "kube-system, even when asked",
            pod(json!({"metadata": {"namespace": "kube-system",
                "annotations": {"mesh.dev/inject": "enabled"}},
                "spec": {"containers": [{"name": "app"}]}})),
            enabled.clone(),
            SkipReason::KubeSystem,
        ),
        (
            "the marker annotation",
            pod(json!({"metadata": {"namespace": "shop",
                "annotations": {"mesh.dev/inject": "enabled", "mesh.dev/injected": "0.0.1"}},
                "spec": {"containers": [{"name": "app"}]}})),
            none(),
            SkipReason::AlreadyInjected,
        ),
        (
            "a mesh-proxy container injected by hand",
            pod(json!({"metadata": {"namespace": "shop"},
                "spec": {"containers": [{"name": "app"}, {"name": "mesh-proxy"}]}})),
            enabled.clone(),
            SkipReason::AlreadyInjected,
        ),
        (
            "a native mesh-proxy sidecar",
            pod(json!({"metadata": {"namespace": "shop"},
                "spec": {"initContainers": [{"name": "mesh-proxy", "restartPolicy": "Always"}],
                    "containers": [{"name": "app"}]}})),
            enabled.clone(),
            SkipReason::AlreadyInjected,
        ),
    ];
    for (name, pod, namespace, expected) in cases {
        let got = inject(&pod, &namespace, &config()).expect(name);
        assert_eq!(got, Outcome::Skipped(expected), "{name}");
    }
}

#[test]
fn enabled_on_the_pod_or_the_namespace() {
    let bare =
        pod(json!({"metadata": {"namespace": "shop"}, "spec": {"containers": [{"name": "app"}]}}));
    let on_namespace = inject(&bare, &map(&[("mesh.dev/inject", "enabled")]), &config());
    assert!(matches!(on_namespace, Ok(Outcome::Injected(_))));
    let on_pod = inject(&annotated(&[]), &none(), &config());
    assert!(matches!(on_pod, Ok(Outcome::Injected(_))));
    let pod_wins = inject(
        &annotated(&[]),
        &map(&[("mesh.dev/inject", "disabled")]),
        &config(),
    );
    assert!(matches!(pod_wins, Ok(Outcome::Injected(_))));
}

#[test]
fn classic_sidecar_is_the_first_container_and_holds_the_app() {
    let pod = injected(&annotated(&[]), &none(), &config());
    assert_eq!(names(spec(&pod).init_containers.as_ref()), ["mesh-init"]);
    assert_eq!(names(Some(&spec(&pod).containers)), ["mesh-proxy", "app"]);
    let proxy = container(&pod, PROXY_CONTAINER);
    assert_eq!(proxy.restart_policy, None);
    let hook = proxy
        .lifecycle
        .as_ref()
        .and_then(|l| l.post_start.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("a postStart exec hook");
    // The proxy's own binary waits: the image needs no shell.
    assert_eq!(
        hook,
        ["mesh-proxy", "await", "--admin-port=4191", "--timeout=2m"]
    );
    assert!(proxy.startup_probe.is_none());
}

#[test]
fn native_sidecar_follows_mesh_init_before_the_apps_init_containers() {
    let mut original = annotated(&[]);
    if let Some(spec) = original.spec.as_mut() {
        spec.init_containers = Some(vec![Container {
            name: "migrate".into(),
            ..Container::default()
        }]);
    }
    let pod = injected(&original, &none(), &native());
    assert_eq!(
        names(spec(&pod).init_containers.as_ref()),
        ["mesh-init", "mesh-proxy", "migrate"]
    );
    assert_eq!(names(Some(&spec(&pod).containers)), ["app"]);
    let proxy = container(&pod, PROXY_CONTAINER);
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert!(proxy.lifecycle.is_none());
    let startup = proxy.startup_probe.as_ref().expect("a startup probe");
    assert_eq!(
        startup.http_get.as_ref().and_then(|g| g.path.as_deref()),
        Some("/ready")
    );

    // Classic mode keeps the app's init containers after mesh-init too.
    let classic = injected(&original, &none(), &config());
    assert_eq!(
        names(spec(&classic).init_containers.as_ref()),
        ["mesh-init", "migrate"]
    );
}

#[test]
fn the_init_container_captures_with_least_privilege() {
    let pod = injected(&annotated(&[]), &none(), &config());
    let init = container(&pod, INIT_CONTAINER);
    assert_eq!(
        init.command.as_deref(),
        Some(&["mesh-proxy".to_owned()][..])
    );
    assert_eq!(
        init_args(&pod),
        [
            "init",
            "--inbound-port=4143",
            "--outbound-port=4140",
            "--proxy-uid=2102"
        ]
    );
    let security = init.security_context.as_ref().expect("a security context");
    assert_eq!(security.run_as_user, Some(0));
    assert_eq!(security.run_as_non_root, Some(false));
    assert_eq!(security.privileged, Some(false));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        capabilities.add.as_deref(),
        Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..])
    );
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(init.image.as_deref(), Some(config().proxy_image.as_str()));
}

#[test]
fn the_proxy_is_configured_by_its_environment() {
    let pod = injected(&annotated(&[]), &none(), &config());
    let expected = [
        ("MESH_PROXY_NAMESPACE", "fieldRef:metadata.namespace"),
        ("MESH_PROXY_POD", "fieldRef:metadata.name"),
        ("MESH_PROXY_WORKLOAD_KIND", "pod"),
        ("MESH_PROXY_WORKLOAD_NAME", "fieldRef:metadata.name"),
        ("MESH_PROXY_INBOUND_LISTEN", "0.0.0.0:4143"),
        ("MESH_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140"),
        ("MESH_PROXY_ADMIN_LISTEN", "0.0.0.0:4191"),
        (
            "MESH_PROXY_CONTROLLER_ADDR",
            "http://mesh-controller.mesh-system.svc.cluster.local:8086",
        ),
        ("MESH_PROXY_LOG_LEVEL", "info"),
        ("MESH_PROXY_DEFAULT_INBOUND_POLICY", "all-unauthenticated"),
        (
            "MESH_PROXY_IDENTITY",
            "spiffe://cluster.local/ns/shop/sa/web",
        ),
        (
            "MESH_PROXY_IDENTITY_TOKEN_FILE",
            "/var/run/mesh/identity/token",
        ),
        ("MESH_PROXY_TRUST_ANCHORS", ANCHORS),
        (
            "MESH_PROXY_IDENTITY_ADDR",
            "http://mesh-controller.mesh-system.svc.cluster.local:8086",
        ),
        (
            "MESH_PROXY_TAP_IDENTITY",
            "spiffe://cluster.local/ns/mesh-system/sa/mesh-controller",
        ),
    ];
    for (name, value) in expected {
        assert_eq!(env(&pod, name).as_deref(), Some(value), "{name}");
    }
    // The namespace variable comes first so later values can expand $(MESH_PROXY_NAMESPACE).
    let first = container(&pod, PROXY_CONTAINER)
        .env
        .as_ref()
        .and_then(|env| env.first())
        .map(|var| var.name.clone());
    assert_eq!(first.as_deref(), Some("MESH_PROXY_NAMESPACE"));
    for unset in [
        "MESH_PROXY_OPAQUE_PORTS",
        "MESH_PROXY_SHUTDOWN_GRACE_PERIOD",
        // Tracing and access logs are off unless annotated.
        "MESH_PROXY_TRACE_COLLECTOR",
        "MESH_PROXY_TRACE_SAMPLE_RATE",
        "MESH_PROXY_ACCESS_LOG",
    ] {
        assert_eq!(env(&pod, unset), None, "{unset}");
    }
}

#[test]
fn probes_ports_resources_and_uid() {
    let pod = injected(&annotated(&[]), &none(), &config());
    let proxy = container(&pod, PROXY_CONTAINER);
    let probe_path = |probe: &Option<Probe>| {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        (get.path.clone(), get.port.clone())
    };
    assert_eq!(
        probe_path(&proxy.readiness_probe),
        (Some("/ready".into()), IntOrString::Int(4191))
    );
    assert_eq!(
        probe_path(&proxy.liveness_probe),
        (Some("/live".into()), IntOrString::Int(4191))
    );
    let ports: Vec<(Option<&str>, i32)> = proxy
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [(Some("mesh-proxy"), 4143), (Some("mesh-admin"), 4191)]
    );
    assert_eq!(quantity(&pod, "requests", "cpu").as_deref(), Some("100m"));
    assert_eq!(
        quantity(&pod, "requests", "memory").as_deref(),
        Some("20Mi")
    );
    assert_eq!(quantity(&pod, "limits", "cpu"), None);
    let security = proxy.security_context.as_ref().expect("a security context");
    assert_eq!(security.run_as_user, Some(2102));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
}

#[test]
fn identity_comes_from_a_projected_token() {
    let pod = injected(&annotated(&[]), &none(), &config());
    let volume = spec(&pod)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == IDENTITY_VOLUME)
        .expect("the token volume");
    let token = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.first())
        .and_then(|s| s.service_account_token.as_ref())
        .expect("a service account token projection");
    assert_eq!(token.audience.as_deref(), Some("mesh.dev/identity"));
    assert_eq!(token.expiration_seconds, Some(86_400));
    assert_eq!(token.path, "token");
    let mount = container(&pod, PROXY_CONTAINER)
        .volume_mounts
        .as_ref()
        .and_then(|m| m.first())
        .expect("a mount");
    assert_eq!(
        (
            mount.name.as_str(),
            mount.mount_path.as_str(),
            mount.read_only
        ),
        (IDENTITY_VOLUME, "/var/run/mesh/identity", Some(true))
    );
}

#[test]
fn identity_names_the_service_account_and_namespace() {
    let cases = [
        (
            json!({"metadata": {"namespace": "shop"}, "spec": {"containers": [{"name": "app"}]}}),
            "spiffe://cluster.local/ns/shop/sa/default",
        ),
        (
            json!({"metadata": {"namespace": "shop"},
                "spec": {"serviceAccount": "legacy", "containers": [{"name": "app"}]}}),
            "spiffe://cluster.local/ns/shop/sa/legacy",
        ),
        (
            json!({"metadata": {}, "spec": {"serviceAccountName": "api", "containers": [{"name": "app"}]}}),
            "spiffe://cluster.local/ns/$(MESH_PROXY_NAMESPACE)/sa/api",
        ),
    ];
    let namespace = map(&[("mesh.dev/inject", "enabled")]);
    for (value, expected) in cases {
        let pod = injected(&pod(value), &namespace, &config());
        assert_eq!(env(&pod, "MESH_PROXY_IDENTITY").as_deref(), Some(expected));
    }
    let other_domain = MeshConfig {
        trust_domain: "example.org".into(),
        ..config()
    };
    let pod = injected(&annotated(&[]), &none(), &other_domain);
    assert_eq!(
        env(&pod, "MESH_PROXY_IDENTITY").as_deref(),
        Some("spiffe://example.org/ns/shop/sa/web")
    );
}

#[test]
fn without_trust_anchors_the_proxy_runs_without_identity() {
    let pod = injected(&annotated(&[]), &none(), &MeshConfig::default());
    for var in [
        "MESH_PROXY_IDENTITY",
        "MESH_PROXY_IDENTITY_TOKEN_FILE",
        "MESH_PROXY_TRUST_ANCHORS",
        "MESH_PROXY_IDENTITY_ADDR",
        "MESH_PROXY_TAP_IDENTITY",
    ] {
        assert_eq!(env(&pod, var), None, "{var}");
    }
    assert!(spec(&pod).volumes.is_none());
    assert!(container(&pod, PROXY_CONTAINER).volume_mounts.is_none());
}

#[test]
fn workload_from_owner_references() {
    let owned = |kind: &str, name: &str, labels: serde_json::Value| {
        pod(
            json!({"metadata": {"namespace": "shop", "labels": labels, "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}]},
            "spec": {"containers": [{"name": "app"}]}}),
        )
    };
    let cases = [
        (
            owned(
                "ReplicaSet",
                "web-5c6b7f9d48",
                json!({"pod-template-hash": "5c6b7f9d48"}),
            ),
            ("deployment", "web"),
        ),
        (owned("ReplicaSet", "web", json!({})), ("replicaset", "web")),
        (owned("StatefulSet", "db", json!({})), ("statefulset", "db")),
        (
            owned("DaemonSet", "agent", json!({})),
            ("daemonset", "agent"),
        ),
        (
            owned("Job", "backup-28391", json!({})),
            ("job", "backup-28391"),
        ),
    ];
    let namespace = map(&[("mesh.dev/inject", "enabled")]);
    for (pod, (kind, name)) in cases {
        let pod = injected(&pod, &namespace, &config());
        assert_eq!(env(&pod, "MESH_PROXY_WORKLOAD_KIND").as_deref(), Some(kind));
        assert_eq!(env(&pod, "MESH_PROXY_WORKLOAD_NAME").as_deref(), Some(name));
    }
}

#[test]
fn marker_annotations() {
    let pod = injected(&annotated(&[]), &none(), &config());
    let annotations = pod.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(
        annotations.get("mesh.dev/injected").map(String::as_str),
        Some(crate::config::VERSION)
    );
    assert_eq!(
        annotations
            .get("mesh.dev/proxy-inbound-port")
            .map(String::as_str),
        Some("4143")
    );
    assert_eq!(
        annotations.get("mesh.dev/inject").map(String::as_str),
        Some("enabled"),
        "the pod's own annotations stay"
    );
}

#[test]
fn injection_is_idempotent() {
    for config in [config(), native()] {
        let once = injected(&annotated(&[]), &none(), &config);
        assert_eq!(
            inject(&once, &none(), &config),
            Ok(Outcome::Skipped(SkipReason::AlreadyInjected))
        );
    }
}

#[test]
fn uninject_removes_exactly_what_inject_added() {
    let with_init = {
        let mut pod = annotated(&[(SKIP_PORTS_FOR_TEST, "22")]);
        if let Some(spec) = pod.spec.as_mut() {
            spec.init_containers = Some(vec![Container {
                name: "migrate".into(),
                ..Container::default()
            }]);
            spec.volumes = Some(vec![Volume {
                name: "data".into(),
                ..Volume::default()
            }]);
        }
        pod
    };
    let bare =
        pod(json!({"metadata": {"namespace": "shop"}, "spec": {"containers": [{"name": "app"}]}}));
    let namespace = map(&[("mesh.dev/inject", "enabled")]);
    for original in [annotated(&[]), with_init, bare] {
        for config in [config(), native(), MeshConfig::default()] {
            let pod = injected(&original, &namespace, &config);
            assert_eq!(uninject(&pod).as_ref(), Some(&original));
        }
    }
    assert_eq!(uninject(&annotated(&[])), None, "nothing to remove");
}

/// Found by fuzzing (tests/fuzz.rs): without identity a pod may have its own volume named
/// like the identity volume, and `uninject` removed it.
#[test]
fn uninject_keeps_a_volume_of_the_pods_own_named_like_the_identity_volume() {
    let original = pod(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {},
        "spec": {"containers": [], "volumes": [{"name": "mesh-identity-token"}]}
    }));
    let namespace = map(&[("mesh.dev/inject", " enabled ")]);
    let pod = injected(&original, &namespace, &MeshConfig::default());
    assert_eq!(uninject(&pod), Some(original));
}

/// Found by fuzzing (tests/fuzz.rs): `trace, -=warn` passed the injector's check but the
/// proxy's filter parser takes no spaces, so the proxy could not start.
#[test]
fn the_log_filter_reaches_the_proxy_without_spaces() {
    let pod = injected(
        &annotated(&[(annotations::PROXY_LOG_LEVEL, "trace, -=warn")]),
        &none(),
        &config(),
    );
    assert_eq!(
        env(&pod, "MESH_PROXY_LOG_LEVEL").as_deref(),
        Some("trace,-=warn")
    );
}

const SKIP_PORTS_FOR_TEST: &str = annotations::SKIP_INBOUND_PORTS;

#[test]
fn each_annotation_takes_effect() {
    type Check = fn(&Pod);
    let cases: [(&str, &str, Check); 22] = [
        (annotations::SKIP_INBOUND_PORTS, " 22, 8000-8010 ", |pod| {
            assert!(init_args(pod).contains(&"--skip-inbound-ports=22,8000-8010".to_owned()))
        }),
        (annotations::SKIP_OUTBOUND_PORTS, "5432,6379", |pod| {
            assert!(init_args(pod).contains(&"--skip-outbound-ports=5432,6379".to_owned()))
        }),
        (
            annotations::SKIP_SUBNETS,
            "10.0.0.0/8, fd00::/8,192.168.1.1",
            |pod| {
                assert!(
                    init_args(pod)
                        .contains(&"--skip-subnets=10.0.0.0/8,fd00::/8,192.168.1.1".to_owned())
                )
            },
        ),
        (annotations::SKIP_INBOUND_PORTS, "", |pod| {
            assert!(
                !init_args(pod)
                    .iter()
                    .any(|a| a.starts_with("--skip-inbound"))
            )
        }),
        (annotations::OPAQUE_PORTS, "3306,8000-8002", |pod| {
            assert_eq!(
                env(pod, "MESH_PROXY_OPAQUE_PORTS").as_deref(),
                Some("3306,8000-8002")
            )
        }),
        (annotations::OPAQUE_PORTS, "db,http,unknown", |pod| {
            assert_eq!(
                env(pod, "MESH_PROXY_OPAQUE_PORTS").as_deref(),
                Some("5432,8080")
            )
        }),
        (annotations::PROXY_CPU_REQUEST, "250m", |pod| {
            assert_eq!(quantity(pod, "requests", "cpu").as_deref(), Some("250m"))
        }),
        (annotations::PROXY_CPU_LIMIT, "1", |pod| {
            assert_eq!(quantity(pod, "limits", "cpu").as_deref(), Some("1"));
            assert_eq!(
                env(pod, "MESH_PROXY_WORKER_THREADS"),
                None,
                "one core, one thread"
            );
        }),
        (annotations::PROXY_CPU_LIMIT, "2500m", |pod| {
            assert_eq!(quantity(pod, "limits", "cpu").as_deref(), Some("2500m"));
            assert_eq!(env(pod, "MESH_PROXY_WORKER_THREADS").as_deref(), Some("3"));
        }),
        (annotations::PROXY_MEMORY_REQUEST, "64Mi", |pod| {
            assert_eq!(quantity(pod, "requests", "memory").as_deref(), Some("64Mi"))
        }),
        (annotations::PROXY_MEMORY_LIMIT, "256Mi", |pod| {
            assert_eq!(quantity(pod, "limits", "memory").as_deref(), Some("256Mi"))
        }),
        (
            annotations::PROXY_LOG_LEVEL,
            "warn,mesh_proxy=debug",
            |pod| {
                assert_eq!(
                    env(pod, "MESH_PROXY_LOG_LEVEL").as_deref(),
                    Some("warn,mesh_proxy=debug")
                )
            },
        ),
        (
            annotations::PROXY_IMAGE,
            "registry.local/proxy:dev",
            |pod| {
                for name in [PROXY_CONTAINER, INIT_CONTAINER] {
                    assert_eq!(
                        container(pod, name).image.as_deref(),
                        Some("registry.local/proxy:dev")
                    );
                }
            },
        ),
        (annotations::DEFAULT_INBOUND_POLICY, "deny", |pod| {
            assert_eq!(
                env(pod, "MESH_PROXY_DEFAULT_INBOUND_POLICY").as_deref(),
                Some("deny")
            )
        }),
        (
            annotations::DEFAULT_INBOUND_POLICY,
            "cluster-authenticated",
            |pod| {
                assert_eq!(
                    env(pod, "MESH_PROXY_DEFAULT_INBOUND_POLICY").as_deref(),
                    Some("cluster-authenticated")
                )
            },
        ),
        (annotations::DEFAULT_INBOUND_POLICY, "audit", |pod| {
            assert_eq!(
                env(pod, "MESH_PROXY_DEFAULT_INBOUND_POLICY").as_deref(),
                Some("audit")
            )
        }),
        (annotations::SHUTDOWN_GRACE_PERIOD, "30s", |pod| {
            assert_eq!(
                env(pod, "MESH_PROXY_SHUTDOWN_GRACE_PERIOD").as_deref(),
                Some("30s")
            )
        }),
        (
            annotations::TRACE_COLLECTOR,
            "otel-collector.monitoring:4317",
            |pod| {
                assert_eq!(
                    env(pod, "MESH_PROXY_TRACE_COLLECTOR").as_deref(),
                    Some("http://otel-collector.monitoring:4317")
                )
            },
        ),
        (
            annotations::TRACE_COLLECTOR,
            " https://collector.example:4317/ ",
            |pod| {
                assert_eq!(
                    env(pod, "MESH_PROXY_TRACE_COLLECTOR").as_deref(),
                    Some("https://collector.example:4317")
                )
            },
        ),
        (annotations::TRACE_SAMPLE_RATE, "0.25", |pod| {
            assert_eq!(
                env(pod, "MESH_PROXY_TRACE_SAMPLE_RATE").as_deref(),
                Some("0.25")
            )
        }),
        (annotations::ACCESS_LOG, "json", |pod| {
            assert_eq!(env(pod, "MESH_PROXY_ACCESS_LOG").as_deref(), Some("json"))
        }),
        (annotations::ACCESS_LOG, "apache", |pod| {
            assert_eq!(env(pod, "MESH_PROXY_ACCESS_LOG").as_deref(), Some("apache"))
        }),
    ];
    for (annotation, value, check) in cases {
        // On the pod...
        check(&injected(
            &annotated(&[(annotation, value)]),
            &none(),
            &config(),
        ));
        // ...and on the namespace.
        let namespace = map(&[("mesh.dev/inject", "enabled"), (annotation, value)]);
        let bare = pod(
            json!({"metadata": {"namespace": "shop"}, "spec": {"containers": [
            {"name": "app", "ports": [{"name": "http", "containerPort": 8080},
                {"name": "db", "containerPort": 5432}]}]}}),
        );
        check(&injected(&bare, &namespace, &config()));
    }
    // Every config annotation is covered above.
    for annotation in annotations::CONFIG_ANNOTATIONS {
        assert!(
            cases.iter().any(|(a, _, _)| *a == annotation),
            "{annotation} has no case"
        );
    }
}

#[test]
fn a_custom_admin_port_is_skipped_and_probed() {
    let config = MeshConfig {
        admin_port: 5191,
        ..config()
    };
    let pod = injected(
        &annotated(&[(annotations::SKIP_INBOUND_PORTS, "22")]),
        &none(),
        &config,
    );
    assert!(init_args(&pod).contains(&"--skip-inbound-ports=5191,22".to_owned()));
    assert_eq!(
        env(&pod, "MESH_PROXY_ADMIN_LISTEN").as_deref(),
        Some("0.0.0.0:5191")
    );
}

#[test]
fn bad_values_refuse_injection_naming_the_annotation_and_value() {
    let cases = [
        (
            annotations::SKIP_INBOUND_PORTS,
            "80,abc",
            r#"config.mesh.dev/skip-inbound-ports: "80,abc": "abc" is not a port"#,
        ),
        (
            annotations::SKIP_INBOUND_PORTS,
            "90-80",
            r#"config.mesh.dev/skip-inbound-ports: "90-80": "90-80" is not a port range: it ends before it starts"#,
        ),
        (
            annotations::SKIP_OUTBOUND_PORTS,
            "0",
            r#"config.mesh.dev/skip-outbound-ports: "0": "0" is not a port"#,
        ),
        (
            annotations::SKIP_OUTBOUND_PORTS,
            "65536",
            r#"config.mesh.dev/skip-outbound-ports: "65536": "65536" is not a port"#,
        ),
        (
            annotations::SKIP_SUBNETS,
            "10.0.0/8",
            r#"config.mesh.dev/skip-subnets: "10.0.0/8": "10.0.0/8" is not a subnet"#,
        ),
        (
            annotations::SKIP_SUBNETS,
            "10.0.0.0/33",
            r#"config.mesh.dev/skip-subnets: "10.0.0.0/33": "10.0.0.0/33" is not a subnet like 10.0.0.0/8 or fd00::/8 (an IPv4 prefix length is at most 32)"#,
        ),
        (
            annotations::OPAQUE_PORTS,
            "3306,My_Port",
            r#"config.mesh.dev/opaque-ports: "3306,My_Port": "My_Port" is not a port"#,
        ),
        (
            annotations::PROXY_CPU_REQUEST,
            "lots",
            r#"config.mesh.dev/proxy-cpu-request: "lots": not a Kubernetes quantity"#,
        ),
        (
            annotations::PROXY_CPU_LIMIT,
            "1 core",
            r#"config.mesh.dev/proxy-cpu-limit: "1 core": not a Kubernetes quantity"#,
        ),
        (
            annotations::PROXY_MEMORY_REQUEST,
            "64MB",
            r#"config.mesh.dev/proxy-memory-request: "64MB": not a Kubernetes quantity"#,
        ),
        (
            annotations::PROXY_MEMORY_LIMIT,
            "-1Gi",
            r#"config.mesh.dev/proxy-memory-limit: "-1Gi": not a Kubernetes quantity"#,
        ),
        (
            annotations::PROXY_CPU_LIMIT,
            "50m",
            r#"config.mesh.dev/proxy-cpu-limit: "50m": is below the proxy's CPU request "100m""#,
        ),
        (
            annotations::PROXY_LOG_LEVEL,
            "loud",
            r#"config.mesh.dev/proxy-log-level: "loud": "loud" is not a level"#,
        ),
        (
            annotations::PROXY_IMAGE,
            "my image",
            r#"config.mesh.dev/proxy-image: "my image": not an image reference"#,
        ),
        (
            annotations::DEFAULT_INBOUND_POLICY,
            "allow",
            r#"config.mesh.dev/default-inbound-policy: "allow": "allow" is not an inbound policy"#,
        ),
        (
            annotations::SHUTDOWN_GRACE_PERIOD,
            "10",
            r#"config.mesh.dev/shutdown-grace-period: "10": not a duration"#,
        ),
        (
            annotations::TRACE_COLLECTOR,
            "otel-collector",
            r#"config.mesh.dev/trace-collector: "otel-collector": not a collector address"#,
        ),
        (
            annotations::TRACE_COLLECTOR,
            "grpc://otel:4317",
            r#"config.mesh.dev/trace-collector: "grpc://otel:4317": not a collector address"#,
        ),
        (
            annotations::TRACE_COLLECTOR,
            "otel:99999",
            r#"config.mesh.dev/trace-collector: "otel:99999": not a collector address"#,
        ),
        (
            annotations::TRACE_COLLECTOR,
            "otel collector:4317",
            r#"config.mesh.dev/trace-collector: "otel collector:4317": not a collector address"#,
        ),
        (
            annotations::TRACE_SAMPLE_RATE,
            "1.5",
            r#"config.mesh.dev/trace-sample-rate: "1.5": not a number from 0 to 1"#,
        ),
        (
            annotations::TRACE_SAMPLE_RATE,
            "10%",
            r#"config.mesh.dev/trace-sample-rate: "10%": not a number from 0 to 1"#,
        ),
        (
            annotations::TRACE_SAMPLE_RATE,
            "NaN",
            r#"config.mesh.dev/trace-sample-rate: "NaN": not a number from 0 to 1"#,
        ),
        (
            annotations::ACCESS_LOG,
            "xml",
            r#"config.mesh.dev/access-log: "xml": expected json or apache"#,
        ),
        (
            annotations::INJECT,
            "true",
            r#"mesh.dev/inject: "true": expected enabled or disabled"#,
        ),
    ];
    for (annotation, value, expected) in cases {
        let pod = annotated(&[(annotation, value)]);
        let error = inject(&pod, &none(), &config())
            .expect_err(expected)
            .to_string();
        assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
        // On the namespace, the message says so.
        let namespace = map(&[("mesh.dev/inject", "enabled"), (annotation, value)]);
        let bare = pod_in_shop();
        let error = inject(&bare, &namespace, &config())
            .expect_err(expected)
            .to_string();
        assert!(error.starts_with(expected), "{error}");
        assert!(error.ends_with("(set on the namespace)"), "{error}");
    }
}

fn pod_in_shop() -> Pod {
    pod(json!({"metadata": {"namespace": "shop"}, "spec": {"containers": [{"name": "app"}]}}))
}

#[test]
fn a_request_above_a_limit_is_refused() {
    let pod = annotated(&[
        (annotations::PROXY_MEMORY_REQUEST, "1Gi"),
        (annotations::PROXY_MEMORY_LIMIT, "512Mi"),
    ]);
    let error = inject(&pod, &none(), &config()).expect_err("request above limit");
    assert_eq!(
        error.to_string(),
        r#"config.mesh.dev/proxy-memory-request: "1Gi": is above the proxy's memory limit "512Mi""#
    );
    let limited = MeshConfig {
        proxy_cpu_limit: Some("200m".into()),
        ..config()
    };
    let pod = annotated(&[(annotations::PROXY_CPU_REQUEST, "500m")]);
    let error = inject(&pod, &none(), &limited).expect_err("request above the configured limit");
    assert_eq!(
        error.to_string(),
        r#"config.mesh.dev/proxy-cpu-request: "500m": is above the proxy's CPU limit "200m""#
    );
}

#[test]
fn names_injection_would_add_must_be_free() {
    let cases = [
        json!({"metadata": {"namespace": "shop"},
            "spec": {"initContainers": [{"name": "mesh-init"}], "containers": [{"name": "app"}]}}),
        json!({"metadata": {"namespace": "shop"},
            "spec": {"volumes": [{"name": "mesh-identity-token", "emptyDir": {}}],
                "containers": [{"name": "app"}]}}),
    ];
    let namespace = map(&[("mesh.dev/inject", "enabled")]);
    for value in cases {
        let error = inject(&pod(value), &namespace, &config()).expect_err("a name clash");
        assert!(matches!(error, InjectError::NameTaken { .. }), "{error}");
    }
    let no_spec = Pod::default();
    assert_eq!(
        inject(&no_spec, &namespace, &config()),
        Err(InjectError::NoSpec)
    );
}

#[test]
fn templates_are_injected_for_their_workload() {
    let template: PodTemplateSpec = serde_json::from_value(json!({
        "metadata": {"labels": {"app": "web"}, "annotations": {"mesh.dev/inject": "enabled"}},
        "spec": {"containers": [{"name": "app"}]}
    }))
    .expect("a template");
    let workload = Workload {
        namespace: Some("shop".into()),
        kind: "deployment".into(),
        name: "web".into(),
    };
    let Ok(Outcome::Injected(injected)) = inject_template(&template, &workload, &none(), &config())
    else {
        panic!("the template is injected");
    };
    let pod = Pod {
        metadata: injected.metadata.clone().unwrap_or_default(),
        spec: injected.spec.clone(),
        status: None,
    };
    assert_eq!(
        env(&pod, "MESH_PROXY_WORKLOAD_KIND").as_deref(),
        Some("deployment")
    );
    assert_eq!(
        env(&pod, "MESH_PROXY_WORKLOAD_NAME").as_deref(),
        Some("web")
    );
    assert_eq!(
        env(&pod, "MESH_PROXY_IDENTITY").as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/default")
    );
    assert_eq!(uninject_template(&injected), Some(template.clone()));

    let in_kube_system = Workload {
        namespace: Some("kube-system".into()),
        ..workload
    };
    assert_eq!(
        inject_template(&template, &in_kube_system, &none(), &config()),
        Ok(Outcome::Skipped(SkipReason::KubeSystem))
    );

    // A template with no metadata gets none back from uninject.
    let bare = PodTemplateSpec {
        metadata: None,
        spec: template.spec.clone(),
    };
    let enabled = map(&[("mesh.dev/inject", "enabled")]);
    let Ok(Outcome::Injected(injected)) = inject_template(
        &bare,
        &Workload {
            namespace: None,
            kind: "job".into(),
            name: "once".into(),
        },
        &enabled,
        &config(),
    ) else {
        panic!("the template is injected");
    };
    assert_eq!(uninject_template(&injected), Some(bare));
}

#[test]
fn a_classic_sidecar_in_a_pod_that_runs_to_completion_exits_with_its_app() {
    let with_restart = |policy: Option<&str>| {
        let mut pod = annotated(&[]);
        if let Some(spec) = pod.spec.as_mut() {
            spec.restart_policy = policy.map(str::to_owned);
        }
        pod
    };
    // (restart policy, native sidecars, exits with the app)
    let cases = [
        (Some("Never"), false, true),
        (Some("OnFailure"), false, true),
        (Some("Always"), false, false),
        (None, false, false),
        // The kubelet stops native sidecars when the app is done.
        (Some("Never"), true, false),
    ];
    for (policy, native_sidecars, exits) in cases {
        let config = if native_sidecars { native() } else { config() };
        let pod = injected(&with_restart(policy), &none(), &config);
        assert_eq!(
            env(&pod, "MESH_PROXY_EXIT_WITH_APP").as_deref(),
            exits.then_some("true"),
            "{policy:?} native={native_sidecars}"
        );
    }
}

#[test]
fn a_cpu_limit_gives_the_proxy_a_thread_per_core() {
    let cases = [
        ("500m", None),
        ("1", None),
        ("1001m", Some(2)),
        ("2", Some(2)),
        ("2.5", Some(3)),
        ("1e3", Some(64)),
        ("lots", None),
    ];
    for (limit, want) in cases {
        assert_eq!(worker_threads(limit), want, "{limit}");
    }
}
