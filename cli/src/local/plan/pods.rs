//! One pod of the plan: its address, its injected containers as argv and env, its volumes,
//! its hosts file and its identity token; and the checks that refuse a pod the local mesh
//! cannot run (clashing ports).

use super::*;

pub(super) fn pod_plan(
    pod: Pod,
    ip: Ipv4Addr,
    index: usize,
    ns_annotations: &BTreeMap<String, String>,
    mesh_config: &mesh_injector::MeshConfig,
    services: &[(Service, Option<Ipv4Addr>)],
    options: &PlanOptions,
) -> Result<PodPlan, PlanError> {
    let namespace = namespace_of(&pod.metadata);
    let name = name_of(&pod.metadata);
    let object_error = |message: String| PlanError::Object {
        what: "Pod",
        namespace: namespace.clone(),
        name: name.clone(),
        message,
    };
    if pod.spec.is_none() {
        return Err(object_error("the pod has no spec".to_owned()));
    }
    let (pod, meshed) = match mesh_injector::inject(&pod, ns_annotations, mesh_config)
        .map_err(|error| object_error(format!("cannot inject the mesh: {error}")))?
    {
        mesh_injector::Outcome::Injected(pod) => (pod, true),
        mesh_injector::Outcome::Skipped(_) => (pod, false),
    };
    let spec = pod.spec.clone().unwrap_or_default();
    check_ports(&namespace, &name, &spec, meshed)?;
    let workload = workload_of(&pod);
    let log_dir = options.state_dir.join("logs").join(&namespace).join(&name);
    let PodVolumes {
        folders: volumes,
        files,
        dirs,
    } = pod_volumes(&pod, &namespace, options);
    let context = PodContext {
        volumes: &volumes,
        pod: &pod,
        ip,
        namespace: &namespace,
        workload: &workload,
        mode: options.mode,
        proxy_program: &options.proxy_program,
        services,
        log_dir: &log_dir,
    };
    let init_containers = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| context.container(c, true))
        .collect();
    let containers = spec
        .containers
        .iter()
        .map(|c| context.container(c, false))
        .collect();
    let restart_policy = match spec.restart_policy.as_deref() {
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        _ => RestartPolicy::Always,
    };
    let root = options.mode == Mode::Root;
    let netns_prefix = if options.instance == DEFAULT_INSTANCE {
        "ml"
    } else {
        options.instance.as_str()
    };
    let mut object = to_value(&pod);
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
    }
    Ok(PodPlan {
        netns: root.then(|| format!("{netns_prefix}-{namespace}-{name}")),
        veth: root.then(|| format!("vp{index}")),
        hosts: root.then(|| hosts_file(&namespace, &name, ip, services)),
        proxy_admin: meshed.then(|| SocketAddr::new(IpAddr::V4(ip), PROXY_ADMIN_PORT)),
        meshed,
        ip,
        workload,
        restart_policy,
        init_containers,
        containers,
        object,
        log_dir,
        files,
        dirs,
        namespace,
        name,
    })
}

/// The annotation of the controller's file backend naming a ServiceAccount's token.
pub(super) const TOKEN_ANNOTATION: &str = "mesh.dev/identity-token";

/// The token of one ServiceAccount: keyed by the mesh's secret, so it cannot be derived from
/// the names alone, and the same wherever it is computed (the ServiceAccount's annotation
/// and every pod's token file).
pub(super) fn service_account_token(secret: &[u8; 32], namespace: &str, account: &str) -> String {
    use rand::{Rng as _, SeedableRng as _};
    let mut seed = *secret;
    let name_hash = fnv1a(format!("{namespace}/{account}").as_bytes()).to_le_bytes();
    for (byte, mix) in seed.iter_mut().zip(name_hash) {
        *byte ^= mix;
    }
    let mut rng = rand::rngs::StdRng::from_seed(seed);
    format!("{:032x}{:032x}", rng.random::<u128>(), rng.random::<u128>())
}

/// A port bound twice in one pod's network (two containers, or a container and the proxy)
/// can never work: refuse before starting anything.
fn check_ports(namespace: &str, pod: &str, spec: &PodSpec, meshed: bool) -> Result<(), PlanError> {
    let mut owners: BTreeMap<u16, String> = BTreeMap::new();
    if meshed {
        for (port, what) in [
            (PROXY_INBOUND_PORT, "the proxy's inbound listener"),
            (PROXY_OUTBOUND_PORT, "the proxy's outbound listener"),
            (PROXY_ADMIN_PORT, "the proxy's admin server"),
        ] {
            owners.insert(port, what.to_owned());
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for container in containers {
        if container.name == mesh_injector::PROXY_CONTAINER {
            continue;
        }
        let mut own = BTreeSet::new();
        for port in container.ports.iter().flatten() {
            let Ok(number) = u16::try_from(port.container_port) else {
                continue;
            };
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            if protocol != "TCP" || !own.insert(number) {
                continue;
            }
            let this = format!("container {:?}", container.name);
            if let Some(first) = owners.insert(number, this.clone()) {
                return Err(PlanError::PortClash {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    port: number,
                    first,
                    second: this,
                });
            }
        }
    }
    Ok(())
}

/// The workload as the controller derives it from the owner references.
fn workload_of(pod: &Pod) -> WorkloadRef {
    let name = name_of(&pod.metadata);
    let owner = pod
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|o| o.controller == Some(true));
    match owner {
        Some(owner) if owner.kind == "ReplicaSet" => WorkloadRef {
            kind: "deployment".to_owned(),
            name: owner
                .name
                .rsplit_once('-')
                .map_or(owner.name.as_str(), |(deployment, _)| deployment)
                .to_owned(),
        },
        Some(owner) => WorkloadRef {
            kind: owner.kind.to_ascii_lowercase(),
            name: owner.name.clone(),
        },
        None => WorkloadRef {
            kind: "pod".to_owned(),
            name,
        },
    }
}

/// The pod's `/etc/hosts`: itself, then every Service with a cluster IP under
/// `name.ns.svc.cluster.local`, `name.ns.svc`, `name.ns`, and the bare `name` for the pod's
/// own namespace (as the cluster DNS search path would).
pub fn hosts_file(
    namespace: &str,
    pod: &str,
    ip: Ipv4Addr,
    services: &[(Service, Option<Ipv4Addr>)],
) -> String {
    let mut out = format!(
        "# Written by meshctl local: service names resolve to cluster IPs the mesh's proxies route.\n\
         127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{pod}\n"
    );
    for (service, cluster_ip) in services {
        let Some(cluster_ip) = cluster_ip else {
            continue;
        };
        let (ns, name) = (namespace_of(&service.metadata), name_of(&service.metadata));
        out.push_str(&format!(
            "{cluster_ip}\t{name}.{ns}.svc.{CLUSTER_DOMAIN} {name}.{ns}.svc {name}.{ns}"
        ));
        if ns == namespace {
            out.push(' ');
            out.push_str(&name);
        }
        out.push('\n');
    }
    out
}

/// What every container of one pod shares.
struct PodContext<'a> {
    /// Local folders of the pod's projected volumes, by volume name.
    volumes: &'a BTreeMap<String, PathBuf>,
    pod: &'a Pod,
    ip: Ipv4Addr,
    namespace: &'a str,
    workload: &'a WorkloadRef,
    mode: Mode,
    proxy_program: &'a Path,
    services: &'a [(Service, Option<Ipv4Addr>)],
    log_dir: &'a Path,
}

impl PodContext<'_> {
    fn container(&self, container: &Container, init: bool) -> ContainerPlan {
        let role = match container.name.as_str() {
            mesh_injector::INIT_CONTAINER => Role::Capture,
            mesh_injector::PROXY_CONTAINER => Role::Proxy,
            _ => Role::App,
        };
        let mut env = self.env(container, role);
        // Paths inside mounted volumes point at the volumes' local folders.
        for mount in container.volume_mounts.iter().flatten() {
            let Some(local) = self.volumes.get(&mount.name) else {
                continue;
            };
            let mount_path = mount.mount_path.trim_end_matches('/');
            for (_, value) in &mut env {
                if let Some(rest) = value.strip_prefix(mount_path)
                    && (rest.is_empty() || rest.starts_with('/'))
                {
                    *value = format!("{}{rest}", local.display());
                }
            }
        }
        let lookup: BTreeMap<&str, &str> = env
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let mut argv: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .map(|word| expand(word, &lookup))
            .collect();
        // The image is ignored, so the mesh's own image is the locally built binary.
        let mesh_binary = |program: &str| {
            Path::new(program)
                .file_name()
                .is_some_and(|f| f == "mesh-proxy")
        };
        if role != Role::App && argv.is_empty() {
            argv.push("mesh-proxy".to_owned());
        }
        if argv.first().is_some_and(|program| mesh_binary(program)) {
            argv[0] = self.proxy_program.display().to_string();
        }
        let unrunnable = if container.command.as_ref().is_none_or(Vec::is_empty)
            && role == Role::App
        {
            Some(format!(
                "container {:?} has no command: local pods ignore the image, so `command` must name a program on this machine",
                container.name
            ))
        } else {
            None
        };
        let skipped = (role == Role::Capture && self.mode == Mode::Loopback).then(|| {
            "loopback mode installs no iptables capture; apps use HTTP_PROXY instead".to_owned()
        });
        let run_as_user = match (self.mode, role) {
            (Mode::Root, _) => container
                .security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .or_else(|| {
                    self.pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.security_context.as_ref())
                        .and_then(|s| s.run_as_user)
                })
                .and_then(|uid| u32::try_from(uid).ok())
                .filter(|uid| *uid != 0),
            (Mode::Loopback, _) => None,
        };
        ContainerPlan {
            name: container.name.clone(),
            role,
            init,
            sidecar: init && container.restart_policy.as_deref() == Some("Always"),
            argv,
            working_dir: container.working_dir.clone().filter(|d| !d.is_empty()),
            run_as_user,
            readiness: container
                .readiness_probe
                .as_ref()
                .and_then(|p| self.probe(p, container)),
            startup: container
                .startup_probe
                .as_ref()
                .and_then(|p| self.probe(p, container)),
            log: self.log_dir.join(format!("{}.log", container.name)),
            unrunnable,
            skipped,
            env,
        }
    }

    /// The container's environment: Kubernetes' service links (root mode), the container's
    /// own variables (downward API resolved, `$(VAR)` expanded), and what this mode needs.
    fn env(&self, container: &Container, role: Role) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, name: &str, value: String| {
            env.retain(|(n, _)| n != name);
            env.push((name.to_owned(), value));
        };
        set(&mut env, "HOSTNAME", name_of(&self.pod.metadata));
        if self.mode == Mode::Root {
            for (service, ip) in self.services {
                let (Some(ip), true) = (ip, namespace_of(&service.metadata) == self.namespace)
                else {
                    continue;
                };
                let prefix = name_of(&service.metadata)
                    .to_ascii_uppercase()
                    .replace('-', "_");
                set(&mut env, &format!("{prefix}_SERVICE_HOST"), ip.to_string());
                if let Some(port) = service_ports(service).first() {
                    set(
                        &mut env,
                        &format!("{prefix}_SERVICE_PORT"),
                        port.to_string(),
                    );
                }
            }
        }
        for var in container.env.iter().flatten() {
            let value = self.env_value(var, &env);
            set(&mut env, &var.name, value);
        }
        let ip = self.ip;
        match (role, self.mode) {
            (Role::Proxy, mode) => {
                set(&mut env, "MESH_PROXY_NAMESPACE", self.namespace.to_owned());
                set(&mut env, "MESH_PROXY_POD", name_of(&self.pod.metadata));
                set(
                    &mut env,
                    "MESH_PROXY_WORKLOAD_KIND",
                    self.workload.kind.clone(),
                );
                set(
                    &mut env,
                    "MESH_PROXY_WORKLOAD_NAME",
                    self.workload.name.clone(),
                );
                if mode == Mode::Loopback {
                    // Every pod shares the machine's loopback: each proxy listens on its own
                    // pod IP and forwards to the app there.
                    set(
                        &mut env,
                        "MESH_PROXY_INBOUND_LISTEN",
                        format!("{ip}:{PROXY_INBOUND_PORT}"),
                    );
                    set(
                        &mut env,
                        "MESH_PROXY_OUTBOUND_LISTEN",
                        format!("{ip}:{PROXY_OUTBOUND_PORT}"),
                    );
                    set(
                        &mut env,
                        "MESH_PROXY_ADMIN_LISTEN",
                        format!("{ip}:{PROXY_ADMIN_PORT}"),
                    );
                    set(&mut env, "MESH_PROXY_INBOUND_APP_IP", ip.to_string());
                }
            }
            (Role::App, Mode::Loopback) => {
                let proxy = format!("http://{ip}:{PROXY_OUTBOUND_PORT}");
                let no_proxy = format!("localhost,127.0.0.1,{ip}");
                // curl reads only the lower-case http_proxy; most other clients either.
                for name in ["HTTP_PROXY", "http_proxy"] {
                    set(&mut env, name, proxy.clone());
                }
                for name in ["NO_PROXY", "no_proxy"] {
                    set(&mut env, name, no_proxy.clone());
                }
            }
            _ => {}
        }
        env
    }

    /// One variable's value: literal (with `$(VAR)` expanded over the ones before it) or from
    /// the downward API. Sources a local mesh does not have (Secrets, ConfigMaps, resources)
    /// give an empty value.
    fn env_value(&self, var: &EnvVar, before: &[(String, String)]) -> String {
        if let Some(value) = &var.value {
            let lookup: BTreeMap<&str, &str> = before
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            return expand(value, &lookup);
        }
        let Some(field) = var
            .value_from
            .as_ref()
            .and_then(|from| from.field_ref.as_ref())
        else {
            return String::new();
        };
        let meta = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        let path = field.field_path.as_str();
        let bracketed = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix("['"))
                .and_then(|rest| rest.strip_suffix("']"))
                .map(str::to_owned)
        };
        match path {
            "metadata.name" => name_of(meta),
            "metadata.namespace" => self.namespace.to_owned(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "status.podIP" | "status.podIPs" => self.ip.to_string(),
            "status.hostIP" | "status.hostIPs" => self.ip.to_string(),
            "spec.nodeName" => "local".to_owned(),
            "spec.serviceAccountName" => spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            _ => {
                if let Some(key) = bracketed("metadata.labels") {
                    meta.labels
                        .as_ref()
                        .and_then(|l| l.get(&key))
                        .cloned()
                        .unwrap_or_default()
                } else if let Some(key) = bracketed("metadata.annotations") {
                    meta.annotations
                        .as_ref()
                        .and_then(|a| a.get(&key))
                        .cloned()
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            }
        }
    }

    /// An HTTP or TCP probe as an address; exec and gRPC probes are not run locally.
    fn probe(&self, probe: &Probe, container: &Container) -> Option<ProbePlan> {
        let port_of = |port: &IntOrString| -> Option<u16> {
            match port {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(name) => self
                    .pod
                    .spec
                    .iter()
                    .flat_map(|s| {
                        s.containers
                            .iter()
                            .chain(s.init_containers.iter().flatten())
                    })
                    .chain(std::iter::once(container))
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
            }
        };
        if let Some(get) = &probe.http_get {
            let addr = SocketAddr::new(IpAddr::V4(self.ip), port_of(&get.port)?);
            return Some(ProbePlan::Http {
                addr,
                path: get.path.clone().unwrap_or_else(|| "/".to_owned()),
            });
        }
        if let Some(tcp) = &probe.tcp_socket {
            let addr = SocketAddr::new(IpAddr::V4(self.ip), port_of(&tcp.port)?);
            return Some(ProbePlan::Tcp { addr });
        }
        None
    }
}

/// Kubernetes' `$(VAR)` expansion: a reference to a defined variable is replaced, `$$`
/// escapes a `$`, anything else stays as written.
pub fn expand(text: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
            && let Some(value) = vars.get(&inner[..close])
        {
            out.push_str(value);
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}
