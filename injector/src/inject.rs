//! The pod patch: [`inject`] adds the mesh to a pod, [`inject_template`] to the pod template of
//! a workload, [`uninject`] / [`uninject_template`] take exactly that away again. Pure
//! functions over the object, the namespace's annotations and the [`MeshConfig`]: no I/O, so
//! the webhook, `meshctl inject` and `meshctl local` all get the same pod.
//!
//! What injection adds (and nothing else):
//! - the `mesh-init` init container, first: `mesh-proxy init` installs the pod's iptables
//!   capture (NET_ADMIN and NET_RAW, as root);
//! - the `mesh-proxy` container: a native sidecar (an init container with `restartPolicy:
//!   Always`, right after `mesh-init`) when [`MeshConfig::native_sidecars`], else the first
//!   ordinary container with a `postStart` hook that holds the app's start until the proxy is
//!   ready;
//! - with identity (non-empty trust anchors), the `mesh-identity-token` volume: a projected
//!   ServiceAccount token for the controller's identity service; and `mesh-identity-cache`, an
//!   in-memory `emptyDir` only the proxy mounts, where it keeps its key and certificate across
//!   its own restarts;
//! - the annotations `mesh.dev/injected` (the version; the idempotence marker) and
//!   `mesh.dev/proxy-inbound-port`.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, PodSpec, PodTemplateSpec,
    Probe, ProjectedVolumeSource, ResourceRequirements, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::annotations::{self, AnnotationError, Annotations, Injection, Settings, Source};
use crate::config::MeshConfig;

/// The init container that installs the capture rules.
pub const INIT_CONTAINER: &str = "mesh-init";
/// The proxy container (a native sidecar among the init containers, or a classic one).
pub const PROXY_CONTAINER: &str = "mesh-proxy";
/// The projected ServiceAccount token volume.
pub const IDENTITY_VOLUME: &str = "mesh-identity-token";
/// Where the token volume is mounted in the proxy.
pub const IDENTITY_DIR: &str = "/var/run/mesh/identity";
/// The proxy's identity cache: an in-memory `emptyDir` only the proxy mounts, where it keeps
/// its key and certificate so that a restart while the controller is down serves at once.
pub const IDENTITY_CACHE_VOLUME: &str = "mesh-identity-cache";
/// Where the identity cache is mounted in the proxy.
pub const IDENTITY_CACHE_DIR: &str = "/var/run/mesh/identity-cache";
/// The token file the proxy presents to the identity service.
pub const IDENTITY_TOKEN_FILE: &str = "/var/run/mesh/identity/token";
/// The audience of the token; the controller's TokenReview requires it.
pub const IDENTITY_TOKEN_AUDIENCE: &str = "mesh.dev/identity";
/// The token's lifetime; the kubelet refreshes it at 80 %.
pub const IDENTITY_TOKEN_SECONDS: i64 = 86_400;
/// Namespaces whose pods are never injected, whatever they say.
pub const NEVER_INJECTED_NAMESPACES: [&str; 1] = ["kube-system"];

/// What happened to the object.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T = Pod> {
    /// The object with the mesh added.
    Injected(T),
    /// The object is left as it is, for this reason.
    Skipped(SkipReason),
}

/// Why a pod is not injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Neither the pod nor its namespace says `mesh.dev/inject: enabled`.
    NotEnabled,
    /// `mesh.dev/inject: disabled`, on the pod or its namespace.
    Disabled(Source),
    /// The pod already has the mesh (the marker annotation or a `mesh-proxy` container).
    AlreadyInjected,
    /// The pod shares the node's network: capturing it would capture the node.
    HostNetwork,
    /// The pod is in `kube-system`, which the mesh never touches.
    KubeSystem,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotEnabled => write!(
                f,
                "neither the pod nor its namespace has {}: enabled",
                annotations::INJECT
            ),
            SkipReason::Disabled(source) => {
                write!(f, "{}: disabled on {source}", annotations::INJECT)
            }
            SkipReason::AlreadyInjected => f.write_str("already injected"),
            SkipReason::HostNetwork => f.write_str("the pod uses the host network"),
            SkipReason::KubeSystem => f.write_str("pods in kube-system are never injected"),
        }
    }
}

/// Why injection refused the object; nothing is injected then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// An annotation has a value injection cannot use.
    #[error(transparent)]
    BadAnnotation(#[from] AnnotationError),
    /// The pod has no spec.
    #[error("the pod has no spec")]
    NoSpec,
    /// Something of the pod already uses a name injection adds.
    #[error("the pod already has a {what} named {name:?}, which injection would add")]
    NameTaken {
        /// `container` or `volume`.
        what: &'static str,
        /// The name.
        name: &'static str,
    },
}

/// The workload that owns a pod template, for the proxy's metrics and discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The workload's namespace when known (a manifest may leave it to `kubectl -n`).
    pub namespace: Option<String>,
    /// The kind in lowercase: `deployment`, `statefulset`, ...
    pub kind: String,
    /// The workload's name.
    pub name: String,
}

/// Injects the mesh into `pod`, with the annotations of its namespace (empty when it has
/// none) and the mesh-wide `config`.
pub fn inject(
    pod: &Pod,
    namespace_annotations: &BTreeMap<String, String>,
    config: &MeshConfig,
) -> Result<Outcome<Pod>, InjectError> {
    let spec = pod.spec.as_ref().ok_or(InjectError::NoSpec)?;
    let target = Target {
        namespace: pod.metadata.namespace.as_deref(),
        workload: pod_workload(&pod.metadata),
    };
    Ok(
        match inject_parts(&pod.metadata, spec, &target, namespace_annotations, config)? {
            Outcome::Injected((metadata, spec)) => Outcome::Injected(Pod {
                metadata,
                spec: Some(spec),
                status: pod.status.clone(),
            }),
            Outcome::Skipped(reason) => Outcome::Skipped(reason),
        },
    )
}

/// Injects the mesh into the pod template of `workload` (a Deployment, StatefulSet, ...).
pub fn inject_template(
    template: &PodTemplateSpec,
    workload: &Workload,
    namespace_annotations: &BTreeMap<String, String>,
    config: &MeshConfig,
) -> Result<Outcome<PodTemplateSpec>, InjectError> {
    let spec = template.spec.as_ref().ok_or(InjectError::NoSpec)?;
    let metadata = template.metadata.clone().unwrap_or_default();
    let target = Target {
        namespace: workload
            .namespace
            .as_deref()
            .or(metadata.namespace.as_deref()),
        workload: WorkloadEnv::Known {
            kind: workload.kind.clone(),
            name: workload.name.clone(),
        },
    };
    Ok(
        match inject_parts(&metadata, spec, &target, namespace_annotations, config)? {
            Outcome::Injected((metadata, spec)) => Outcome::Injected(PodTemplateSpec {
                metadata: Some(metadata),
                spec: Some(spec),
            }),
            Outcome::Skipped(reason) => Outcome::Skipped(reason),
        },
    )
}

/// The pod without what [`inject`] added, or `None` when it was not injected.
pub fn uninject(pod: &Pod) -> Option<Pod> {
    let spec = pod.spec.as_ref()?;
    let (metadata, spec) = uninject_parts(&pod.metadata, spec)?;
    Some(Pod {
        metadata,
        spec: Some(spec),
        status: pod.status.clone(),
    })
}

/// The template without what [`inject_template`] added, or `None` when it was not injected.
pub fn uninject_template(template: &PodTemplateSpec) -> Option<PodTemplateSpec> {
    let spec = template.spec.as_ref()?;
    let metadata = template.metadata.clone().unwrap_or_default();
    let (metadata, spec) = uninject_parts(&metadata, spec)?;
    Some(PodTemplateSpec {
        // Injection gave a template without metadata some; empty metadata goes again.
        metadata: (metadata != ObjectMeta::default()).then_some(metadata),
        spec: Some(spec),
    })
}

/// Whether the pod (or template) already carries the mesh.
pub fn is_injected(metadata: &ObjectMeta, spec: &PodSpec) -> bool {
    metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(annotations::INJECTED))
        || containers_named(spec, PROXY_CONTAINER)
}

/// Where the pod is and who owns it.
struct Target<'a> {
    namespace: Option<&'a str>,
    workload: WorkloadEnv,
}

/// What the proxy is told about its workload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WorkloadEnv {
    /// An owner known from the template's workload or the pod's owner references.
    Known { kind: String, name: String },
    /// A pod with no owner is its own workload; its name comes from the downward API because
    /// a pod created with `generateName` has none yet at admission.
    ThePod,
}

/// The workload of a pod, from its controlling owner: a ReplicaSet made by a Deployment is
/// reported as the Deployment (the name minus its template hash), as the controller does.
fn pod_workload(metadata: &ObjectMeta) -> WorkloadEnv {
    let owners = metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = owners
        .iter()
        .find(|owner| owner.controller == Some(true))
        .or_else(|| owners.first())
    else {
        return WorkloadEnv::ThePod;
    };
    let kind = owner.kind.to_ascii_lowercase();
    if kind == "replicaset" {
        let hash = metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get("pod-template-hash"));
        if let Some(hash) = hash
            && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
            && !deployment.is_empty()
        {
            return WorkloadEnv::Known {
                kind: "deployment".to_owned(),
                name: deployment.to_owned(),
            };
        }
    }
    WorkloadEnv::Known {
        kind,
        name: owner.name.clone(),
    }
}

fn containers_named(spec: &PodSpec, name: &str) -> bool {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|container| container.name == name)
}

fn inject_parts(
    metadata: &ObjectMeta,
    spec: &PodSpec,
    target: &Target<'_>,
    namespace_annotations: &BTreeMap<String, String>,
    config: &MeshConfig,
) -> Result<Outcome<(ObjectMeta, PodSpec)>, InjectError> {
    if target
        .namespace
        .is_some_and(|namespace| NEVER_INJECTED_NAMESPACES.contains(&namespace))
    {
        return Ok(Outcome::Skipped(SkipReason::KubeSystem));
    }
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skipped(SkipReason::HostNetwork));
    }
    if is_injected(metadata, spec) {
        return Ok(Outcome::Skipped(SkipReason::AlreadyInjected));
    }
    let annotations = Annotations {
        pod: metadata.annotations.as_ref(),
        namespace: namespace_annotations,
    };
    match annotations.injection()? {
        Injection::Enabled => {}
        Injection::Disabled(source) => return Ok(Outcome::Skipped(SkipReason::Disabled(source))),
        Injection::Unset => return Ok(Outcome::Skipped(SkipReason::NotEnabled)),
    }
    if containers_named(spec, INIT_CONTAINER) {
        return Err(InjectError::NameTaken {
            what: "container",
            name: INIT_CONTAINER,
        });
    }
    let identity = !config.trust_anchors_pem.trim().is_empty();
    if identity {
        for name in [IDENTITY_VOLUME, IDENTITY_CACHE_VOLUME] {
            if spec
                .volumes
                .iter()
                .flatten()
                .any(|volume| volume.name == name)
            {
                return Err(InjectError::NameTaken {
                    what: "volume",
                    name,
                });
            }
        }
    }
    // Every annotation is checked before anything is built: nothing is half-injected.
    let settings = annotations.settings(config, &named_container_ports(spec))?;

    let mut metadata = metadata.clone();
    let pod_annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
    pod_annotations.insert(annotations::INJECTED.to_owned(), config.version.clone());
    pod_annotations.insert(
        annotations::PROXY_INBOUND_PORT.to_owned(),
        config.inbound_port.to_string(),
    );

    let mut spec = spec.clone();
    let proxy = proxy_container(&spec, target, &settings, config, identity);
    let mut init_containers = vec![init_container(&settings, config)];
    let existing_init_containers = spec.init_containers.take().unwrap_or_default();
    if config.native_sidecars {
        // Right after mesh-init, before the app's own init containers, whose traffic is
        // captured too and needs the proxy running.
        init_containers.push(proxy);
    } else {
        // First, so its postStart hook holds the start of the app containers after it.
        spec.containers.insert(0, proxy);
    }
    init_containers.extend(existing_init_containers);
    spec.init_containers = Some(init_containers);
    if identity {
        spec.volumes
            .get_or_insert_with(Vec::new)
            .extend([identity_volume(), identity_cache_volume()]);
    }
    Ok(Outcome::Injected((metadata, spec)))
}

fn uninject_parts(metadata: &ObjectMeta, spec: &PodSpec) -> Option<(ObjectMeta, PodSpec)> {
    if !is_injected(metadata, spec) {
        return None;
    }
    let mut metadata = metadata.clone();
    if let Some(pod_annotations) = metadata.annotations.as_mut() {
        pod_annotations.remove(annotations::INJECTED);
        pod_annotations.remove(annotations::PROXY_INBOUND_PORT);
        if pod_annotations.is_empty() {
            metadata.annotations = None;
        }
    }
    let mut spec = spec.clone();
    // The identity volumes are ours only when our proxy mounts them: without identity, a pod
    // may have volumes of those names of its own.
    let identity_added = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|container| container.name == PROXY_CONTAINER)
        .flat_map(|container| container.volume_mounts.iter().flatten())
        .any(|mount| mount.name == IDENTITY_VOLUME);
    spec.containers
        .retain(|container| container.name != PROXY_CONTAINER);
    if let Some(init_containers) = spec.init_containers.as_mut() {
        init_containers.retain(|c| c.name != PROXY_CONTAINER && c.name != INIT_CONTAINER);
        if init_containers.is_empty() {
            spec.init_containers = None;
        }
    }
    if let Some(volumes) = spec.volumes.as_mut().filter(|_| identity_added) {
        volumes.retain(|volume| {
            volume.name != IDENTITY_VOLUME && volume.name != IDENTITY_CACHE_VOLUME
        });
        if volumes.is_empty() {
            spec.volumes = None;
        }
    }
    Some((metadata, spec))
}

/// The pod's named container ports, for opaque ports given by name.
fn named_container_ports(spec: &PodSpec) -> BTreeMap<String, u16> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|container| container.ports.iter().flatten())
        .filter_map(|port| {
            let name = port.name.clone()?;
            let number = u16::try_from(port.container_port).ok()?;
            Some((name, number))
        })
        .collect()
}

fn init_container(settings: &Settings, config: &MeshConfig) -> Container {
    let mut args = vec![
        "init".to_owned(),
        format!("--inbound-port={}", config.inbound_port),
        format!("--outbound-port={}", config.outbound_port),
        format!("--proxy-uid={}", config.proxy_uid),
    ];
    // `mesh-proxy init` always lets the default admin port through; another one must be
    // skipped explicitly or probes would be captured.
    let admin_skip = (config.admin_port != 4191).then(|| config.admin_port.to_string());
    let skip_inbound: Vec<&str> = admin_skip
        .iter()
        .map(String::as_str)
        .chain(settings.skip_inbound_ports.as_deref())
        .filter(|list| !list.is_empty())
        .collect();
    if !skip_inbound.is_empty() {
        args.push(format!("--skip-inbound-ports={}", skip_inbound.join(",")));
    }
    for (flag, list) in [
        ("--skip-outbound-ports", &settings.skip_outbound_ports),
        ("--skip-subnets", &settings.skip_subnets),
    ] {
        if let Some(list) = list.as_deref().filter(|list| !list.is_empty()) {
            args.push(format!("{flag}={list}"));
        }
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(settings.image.clone()),
        command: Some(vec!["mesh-proxy".to_owned()]),
        args: Some(args),
        resources: Some(resources(
            [("cpu", Some("10m")), ("memory", Some("10Mi"))],
            [("cpu", Some("100m")), ("memory", Some("50Mi"))],
        )),
        security_context: Some(SecurityContext {
            // iptables needs root with NET_ADMIN and NET_RAW, and nothing more.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn proxy_container(
    spec: &PodSpec,
    target: &Target<'_>,
    settings: &Settings,
    config: &MeshConfig,
    identity: bool,
) -> Container {
    let mut env = vec![
        field_env("MESH_PROXY_NAMESPACE", "metadata.namespace"),
        field_env("MESH_PROXY_POD", "metadata.name"),
    ];
    match &target.workload {
        WorkloadEnv::Known { kind, name } => {
            env.push(value_env("MESH_PROXY_WORKLOAD_KIND", kind));
            env.push(value_env("MESH_PROXY_WORKLOAD_NAME", name));
        }
        WorkloadEnv::ThePod => {
            env.push(value_env("MESH_PROXY_WORKLOAD_KIND", "pod"));
            env.push(field_env("MESH_PROXY_WORKLOAD_NAME", "metadata.name"));
        }
    }
    env.extend([
        value_env(
            "MESH_PROXY_INBOUND_LISTEN",
            &format!("0.0.0.0:{}", config.inbound_port),
        ),
        // Captured outbound traffic is redirected to the loopback address.
        value_env(
            "MESH_PROXY_OUTBOUND_LISTEN",
            &format!("127.0.0.1:{}", config.outbound_port),
        ),
        value_env(
            "MESH_PROXY_ADMIN_LISTEN",
            &format!("0.0.0.0:{}", config.admin_port),
        ),
        value_env("MESH_PROXY_CONTROLLER_ADDR", &config.controller_addr),
        value_env("MESH_PROXY_LOG_LEVEL", &settings.log_level),
        value_env(
            "MESH_PROXY_DEFAULT_INBOUND_POLICY",
            settings.default_inbound_policy.as_str(),
        ),
    ]);
    // The proxy runs one thread unless it may use more cores: as with Linkerd and Istio, a
    // CPU limit of N cores gives it N threads (rounded up).
    if let Some(threads) = settings
        .resources
        .cpu
        .limit
        .as_deref()
        .and_then(worker_threads)
    {
        env.push(value_env("MESH_PROXY_WORKER_THREADS", &threads.to_string()));
    }
    // A classic sidecar in a pod that runs to completion (a Job's) must exit when the app
    // has, or the pod never completes; the kubelet stops native sidecars itself.
    let runs_to_completion = matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure"));
    if runs_to_completion && !config.native_sidecars {
        env.push(value_env("MESH_PROXY_EXIT_WITH_APP", "true"));
    }
    if let Some(ports) = &settings.opaque_ports {
        env.push(value_env("MESH_PROXY_OPAQUE_PORTS", ports));
    }
    if let Some(period) = &settings.shutdown_grace_period {
        env.push(value_env("MESH_PROXY_SHUTDOWN_GRACE_PERIOD", period));
    }
    for (name, value) in [
        ("MESH_PROXY_TRACE_COLLECTOR", &settings.trace_collector),
        ("MESH_PROXY_TRACE_SAMPLE_RATE", &settings.trace_sample_rate),
        ("MESH_PROXY_ACCESS_LOG", &settings.access_log),
    ] {
        if let Some(value) = value {
            env.push(value_env(name, value));
        }
    }
    let mut volume_mounts = None;
    if identity {
        let service_account = spec
            .service_account_name
            .as_deref()
            .or(spec.service_account.as_deref())
            .filter(|name| !name.is_empty())
            .unwrap_or("default");
        // Kubernetes expands $(VAR) from the variables defined before it in the container.
        let namespace = target.namespace.unwrap_or("$(MESH_PROXY_NAMESPACE)");
        env.extend([
            value_env(
                "MESH_PROXY_IDENTITY",
                &format!(
                    "spiffe://{}/ns/{namespace}/sa/{service_account}",
                    config.trust_domain
                ),
            ),
            value_env("MESH_PROXY_IDENTITY_TOKEN_FILE", IDENTITY_TOKEN_FILE),
            value_env("MESH_PROXY_IDENTITY_CACHE_DIR", IDENTITY_CACHE_DIR),
            value_env("MESH_PROXY_TRUST_ANCHORS", &config.trust_anchors_pem),
            value_env("MESH_PROXY_IDENTITY_ADDR", &config.identity_addr),
            // Only the controller may tap this proxy (its admin port checks the client's
            // SPIFFE ID); named here so the pod spec says who can watch its requests.
            value_env("MESH_PROXY_TAP_IDENTITY", &config.controller_identity()),
        ]);
        volume_mounts = Some(vec![
            VolumeMount {
                name: IDENTITY_VOLUME.to_owned(),
                mount_path: IDENTITY_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: IDENTITY_CACHE_VOLUME.to_owned(),
                mount_path: IDENTITY_CACHE_DIR.to_owned(),
                ..VolumeMount::default()
            },
        ]);
    }
    let admin_get = |path: &str| HTTPGetAction {
        path: Some(path.to_owned()),
        port: IntOrString::Int(i32::from(config.admin_port)),
        ..HTTPGetAction::default()
    };
    let cpu = &settings.resources.cpu;
    let memory = &settings.resources.memory;
    let mut proxy = Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(settings.image.clone()),
        command: Some(vec!["mesh-proxy".to_owned()]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("mesh-proxy".to_owned()),
                container_port: i32::from(config.inbound_port),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("mesh-admin".to_owned()),
                container_port: i32::from(config.admin_port),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(admin_get("/ready")),
            initial_delay_seconds: Some(2),
            period_seconds: Some(5),
            timeout_seconds: Some(1),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(admin_get("/live")),
            initial_delay_seconds: Some(10),
            period_seconds: Some(10),
            timeout_seconds: Some(1),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        resources: Some(resources(
            [
                ("cpu", cpu.request.as_deref()),
                ("memory", memory.request.as_deref()),
            ],
            [
                ("cpu", cpu.limit.as_deref()),
                ("memory", memory.limit.as_deref()),
            ],
        )),
        security_context: Some(SecurityContext {
            run_as_user: Some(config.proxy_uid),
            run_as_non_root: Some(config.proxy_uid != 0),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts,
        ..Container::default()
    };
    if config.native_sidecars {
        proxy.restart_policy = Some("Always".to_owned());
        // The kubelet starts the next container once a native sidecar's startup probe passes:
        // the app starts with its proxy ready.
        proxy.startup_probe = Some(Probe {
            http_get: Some(admin_get("/ready")),
            period_seconds: Some(1),
            timeout_seconds: Some(1),
            failure_threshold: Some(120),
            ..Probe::default()
        });
    } else {
        // The kubelet runs a container's postStart hook before starting the next container:
        // the app starts once the proxy answers /ready (bounded: a proxy never ready fails
        // the hook, and the kubelet restarts it). The proxy's own binary waits, so its image
        // needs no shell.
        proxy.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "mesh-proxy".to_owned(),
                        "await".to_owned(),
                        format!("--admin-port={}", config.admin_port),
                        "--timeout=2m".to_owned(),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
    }
    proxy
}

fn identity_volume() -> Volume {
    Volume {
        name: IDENTITY_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(IDENTITY_TOKEN_AUDIENCE.to_owned()),
                    expiration_seconds: Some(IDENTITY_TOKEN_SECONDS),
                    path: "token".to_owned(),
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn identity_cache_volume() -> Volume {
    Volume {
        name: IDENTITY_CACHE_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            // tmpfs: the key is never written to the node's disk.
            medium: Some("Memory".to_owned()),
            size_limit: Some(Quantity("64Ki".to_owned())),
        }),
        ..Volume::default()
    }
}

/// Most threads a CPU limit gives the proxy.
const MAX_WORKER_THREADS: f64 = 64.0;

/// The proxy's worker threads under a CPU limit (a quantity, already validated): the cores it
/// may use, rounded up; `None` for one (the proxy's default) or an unreadable limit.
fn worker_threads(cpu_limit: &str) -> Option<u32> {
    let cores = annotations::parse_quantity(cpu_limit.trim())?;
    if !cores.is_finite() {
        return None;
    }
    // Within 1..=64 by the clamp, so the cast is exact.
    let threads = cores.ceil().clamp(1.0, MAX_WORKER_THREADS) as u32;
    (threads > 1).then_some(threads)
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Requests and limits from (resource, quantity) pairs, leaving out the unset ones.
fn resources<const N: usize>(
    requests: [(&str, Option<&str>); N],
    limits: [(&str, Option<&str>); N],
) -> ResourceRequirements {
    let map = |pairs: [(&str, Option<&str>); N]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(resource, quantity)| {
                Some((resource.to_owned(), Quantity(quantity?.to_owned())))
            })
            .collect();
        (!map.is_empty()).then_some(map)
    };
    ResourceRequirements {
        requests: map(requests),
        limits: map(limits),
        ..ResourceRequirements::default()
    }
}

#[cfg(test)]
mod tests;
