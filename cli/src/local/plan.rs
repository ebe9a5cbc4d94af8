//! The plan of a local mesh: a pure function from the manifests and the mode to every pod
//! (name, IP, namespace, injected containers as argv/env), every Service's cluster IP, the
//! hosts files and the objects the controller reads. `up` computes it and writes it to the
//! state folder as `plan.json`; the supervisor only carries it out.
//!
//! Nothing here touches the machine, so names, addresses, injection and the checks for
//! clashes are unit tested beside the code.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    Container, EnvVar, Namespace, Pod, PodSpec, Probe, Service, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use super::manifest::Manifests;

/// The proxy's ports, as the injector's defaults.
pub const PROXY_INBOUND_PORT: u16 = 4143;
/// The outbound port; in loopback mode also the apps' HTTP proxy.
pub const PROXY_OUTBOUND_PORT: u16 = 4140;
/// The admin port: `/ready`, `/metrics`.
pub const PROXY_ADMIN_PORT: u16 = 4191;
/// The controller's gRPC port inside the mesh.
pub const CONTROLLER_GRPC_PORT: u16 = 8086;
/// The controller's admin port inside the mesh.
pub const CONTROLLER_ADMIN_PORT: u16 = 9990;
/// The cluster's DNS domain for service names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The instance name of the default local mesh; its pod namespaces are `ml-<ns>-<pod>`.
pub const DEFAULT_INSTANCE: &str = "mesh-local";
/// The bridge inside the router namespace (one per router namespace, so the name is fixed).
pub const BRIDGE: &str = "mlbr0";

/// How the pods are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A network namespace per pod behind a router namespace, iptables capture: the real
    /// sidecar path. Needs root.
    Root,
    /// Loopback addresses per pod, no capture: apps use the outbound proxy as an HTTP proxy.
    Loopback,
}

impl Mode {
    /// One line for people: what this mode does.
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Root => {
                "root mode: a network namespace per pod, iptables capture, no route off this machine"
            }
            Mode::Loopback => {
                "loopback mode: no namespaces or iptables; pods on 127.x loopback addresses, apps reach services through the outbound proxy as HTTP_PROXY"
            }
        }
    }
}

/// What `up` was asked for, besides the manifests.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub mode: Mode,
    /// Names this local mesh (router namespace, pod namespace prefix, loopback range).
    pub instance: String,
    pub state_dir: PathBuf,
    pub proxy_program: PathBuf,
    pub controller_program: PathBuf,
    /// Root mode: the loopback port of the controller's gRPC forward (0: any free port).
    pub controller_port: u16,
    /// Root mode: the loopback port of the controller's admin forward (0: any free port).
    pub controller_admin_port: u16,
    /// Inject every pod, as if every namespace said `mesh.dev/inject: enabled`.
    pub inject_all: bool,
}

/// Why the manifests cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{what} {namespace}/{name}: {message}")]
    Object {
        what: &'static str,
        namespace: String,
        name: String,
        message: String,
    },
    #[error(
        "port clash in pod {namespace}/{pod}: port {port} is used by {first} and {second}; each port of a pod can be bound once"
    )]
    PortClash {
        namespace: String,
        pod: String,
        port: u16,
        first: String,
        second: String,
    },
    #[error("{0}")]
    Addresses(String),
    #[error("two objects are both {kind} {namespace}/{name}")]
    Duplicate {
        kind: &'static str,
        namespace: String,
        name: String,
    },
}

/// Everything the supervisor carries out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub instance: String,
    pub mode: Mode,
    pub state_dir: PathBuf,
    pub network: NetworkPlan,
    pub controller: ControllerPlan,
    pub pods: Vec<PodPlan>,
    pub services: Vec<ServicePlan>,
    /// Objects for the controller's folder that never change: Namespaces, ServiceAccounts,
    /// Services (with their cluster IPs) and the passed-through policy objects. Pods are
    /// written by the supervisor, with their status.
    pub objects: Vec<ControllerObject>,
}

/// Addresses and namespaces of the mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkPlan {
    /// The pods' subnet, e.g. `10.77.0.0/16`.
    pub pod_cidr: String,
    pub prefix_len: u8,
    /// The router's address on the bridge (root) or the controller's loopback address: the
    /// controller listens here.
    pub gateway: Ipv4Addr,
    /// Root mode: the namespace holding the bridge and the controller.
    pub router_netns: Option<String>,
    /// Root mode: the bridge in the router namespace.
    pub bridge: Option<String>,
}

/// How the controller runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerPlan {
    pub argv: Vec<String>,
    pub config_dir: PathBuf,
    /// gRPC address inside the mesh (what proxies dial).
    pub grpc: SocketAddr,
    /// Admin address inside the mesh.
    pub admin: SocketAddr,
    /// Root mode: the loopback ports of the forwards (0: any free port).
    pub grpc_forward_port: Option<u16>,
    pub admin_forward_port: Option<u16>,
    pub log: PathBuf,
}

/// One file of the controller's folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerObject {
    /// File name inside the controller's folder.
    pub file: String,
    pub object: serde_json::Value,
}

/// A Service with the cluster IP it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServicePlan {
    pub namespace: String,
    pub name: String,
    /// None for a headless Service.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<u16>,
}

/// The workload a pod belongs to, as the controller derives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRef {
    /// `deployment` or `pod`.
    pub kind: String,
    pub name: String,
}

/// The pod's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// One pod: where it lives and what runs in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Root mode: the pod's network namespace and the bridge end of its veth.
    pub netns: Option<String>,
    pub veth: Option<String>,
    pub workload: WorkloadRef,
    /// Whether the mesh was injected.
    pub meshed: bool,
    /// The proxy's admin address inside the mesh, when meshed.
    pub proxy_admin: Option<SocketAddr>,
    pub restart_policy: RestartPolicy,
    pub init_containers: Vec<ContainerPlan>,
    pub containers: Vec<ContainerPlan>,
    /// Root mode: the pod's `/etc/hosts` (service names to cluster IPs).
    pub hosts: Option<String>,
    /// The pod as the controller reads it, without status (the supervisor adds it).
    pub object: serde_json::Value,
    /// Folder of the containers' log files.
    pub log_dir: PathBuf,
}

impl PodPlan {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What a container is for: the runtime treats the mesh's own containers specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `mesh-init`: installs the capture rules (root mode only).
    Capture,
    /// `mesh-proxy`.
    Proxy,
    /// Anything of the application's.
    App,
}

/// When a probe passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ProbePlan {
    /// An HTTP GET answered with 2xx or 3xx.
    Http { addr: SocketAddr, path: String },
    /// A TCP connection accepted.
    Tcp { addr: SocketAddr },
}

/// One container as a local process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerPlan {
    pub name: String,
    pub role: Role,
    /// An init container (runs to completion, or keeps running when `sidecar`).
    pub init: bool,
    /// A native sidecar: an init container with `restartPolicy: Always`.
    pub sidecar: bool,
    /// The program and its arguments, `$(VAR)` references expanded; empty when it has none.
    pub argv: Vec<String>,
    /// The container's environment, resolved (downward API, `$(VAR)`), in order.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// Root mode: the uid (and gid) to run as.
    pub run_as_user: Option<u32>,
    pub readiness: Option<ProbePlan>,
    pub startup: Option<ProbePlan>,
    pub log: PathBuf,
    /// Why it can never start (e.g. no command); reported as a start error.
    pub unrunnable: Option<String>,
    /// Why it is not run at all in this mode (e.g. capture in loopback mode).
    pub skipped: Option<String>,
}

/// Computes the plan. Pure: reads nothing but its arguments.
pub fn plan(manifests: &Manifests, options: &PlanOptions) -> Result<Plan, PlanError> {
    let addresses = Addresses::new(options.mode, &options.instance);
    let namespaces = namespaces(manifests);
    let services = services(manifests, &addresses)?;
    let controller = controller(options, &addresses);
    let mesh_config = mesh_config(&controller);

    let mut pods = Vec::new();
    let mut seen = BTreeSet::new();
    for pod in pod_objects(manifests) {
        let key = (namespace_of(&pod.metadata), name_of(&pod.metadata));
        if !seen.insert(key.clone()) {
            return Err(PlanError::Duplicate {
                kind: "Pod",
                namespace: key.0,
                name: key.1,
            });
        }
        let ip = addresses.pod_ip(pods.len())?;
        let ns_annotations = namespace_annotations(&namespaces, &key.0, options.inject_all);
        pods.push(pod_plan(
            pod,
            ip,
            pods.len(),
            &ns_annotations,
            &mesh_config,
            &services,
            options,
        )?);
    }

    let mut objects = Vec::new();
    for (name, namespace) in &namespaces {
        objects.push(ControllerObject {
            file: format!("namespace.{name}.yaml"),
            object: to_value(namespace),
        });
    }
    for account in service_accounts(manifests, &pods) {
        objects.push(ControllerObject {
            file: format!(
                "serviceaccount.{}.{}.yaml",
                namespace_of(&account.metadata),
                name_of(&account.metadata)
            ),
            object: to_value(&account),
        });
    }
    for (service, _) in &services {
        objects.push(ControllerObject {
            file: format!(
                "service.{}.{}.yaml",
                namespace_of(&service.metadata),
                name_of(&service.metadata)
            ),
            object: to_value(service),
        });
    }
    for (i, object) in manifests.passthrough.iter().enumerate() {
        let kind = object
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("object")
            .to_ascii_lowercase();
        let name = object
            .pointer("/metadata/name")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unnamed");
        objects.push(ControllerObject {
            file: format!("{kind}.{i}.{name}.yaml"),
            object: object.clone(),
        });
    }

    Ok(Plan {
        instance: options.instance.clone(),
        mode: options.mode,
        state_dir: options.state_dir.clone(),
        network: NetworkPlan {
            pod_cidr: format!("{}/{}", addresses.network, addresses.prefix_len),
            prefix_len: addresses.prefix_len,
            gateway: addresses.gateway,
            router_netns: (options.mode == Mode::Root).then(|| options.instance.clone()),
            bridge: (options.mode == Mode::Root).then(|| BRIDGE.to_owned()),
        },
        controller,
        pods,
        services: services
            .iter()
            .map(|(service, ip)| ServicePlan {
                namespace: namespace_of(&service.metadata),
                name: name_of(&service.metadata),
                cluster_ip: *ip,
                ports: service_ports(service),
            })
            .collect(),
        objects,
    })
}

/// The address ranges of one local mesh.
struct Addresses {
    network: Ipv4Addr,
    prefix_len: u8,
    /// The first address of the pods' range: the router or the controller.
    gateway: Ipv4Addr,
    /// Where allocated cluster IPs start.
    service_network: Ipv4Addr,
}

impl Addresses {
    fn new(mode: Mode, instance: &str) -> Self {
        let network = match mode {
            // Each root-mode mesh has its own isolated router namespace, so every instance
            // can use the same range.
            Mode::Root => Ipv4Addr::new(10, 77, 0, 0),
            // Loopback addresses are shared by every instance on the machine: another
            // instance gets another /16 of 127.0.0.0/8.
            Mode::Loopback if instance == DEFAULT_INSTANCE => Ipv4Addr::new(127, 77, 0, 0),
            Mode::Loopback => {
                let second = 78 + (fnv1a(instance.as_bytes()) % 150) as u8;
                Ipv4Addr::new(127, second, 0, 0)
            }
        };
        let [a, b, _, _] = network.octets();
        Addresses {
            network,
            prefix_len: 16,
            gateway: Ipv4Addr::new(a, b, 0, 1),
            service_network: Ipv4Addr::new(10, 78, 0, 0),
        }
    }

    /// The IP of the `index`th pod: from `.0.2` on (`.0.1` is the gateway).
    fn pod_ip(&self, index: usize) -> Result<Ipv4Addr, PlanError> {
        offset(self.network, index + 2, 65_534)
            .ok_or_else(|| PlanError::Addresses("more pods than the /16 holds".to_owned()))
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let [a, b, _, _] = self.network.octets();
        let [c, d, _, _] = ip.octets();
        (a, b) == (c, d)
    }
}

/// `base + n` within a range of `size` addresses, never the `.0` network address.
fn offset(base: Ipv4Addr, n: usize, size: usize) -> Option<Ipv4Addr> {
    if n == 0 || n > size {
        return None;
    }
    let value = u32::from(base).checked_add(u32::try_from(n).ok()?)?;
    Some(Ipv4Addr::from(value))
}

/// FNV-1a: a stable hash (the standard hasher may change between Rust releases, and names
/// derived from it must not).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// `len` characters of the alphabet Kubernetes uses for generated name suffixes (no vowels,
/// no look-alike digits), from a hash.
fn safe_suffix(mut hash: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = String::with_capacity(len);
    for _ in 0..len {
        out.push(char::from(
            ALPHABET[(hash % ALPHABET.len() as u64) as usize],
        ));
        hash /= ALPHABET.len() as u64;
    }
    out
}

fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

fn name_of(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn to_value<T: Serialize>(object: &T) -> serde_json::Value {
    // Serializing k8s-openapi types to a JSON value cannot fail (no maps with non-string
    // keys); Null would only make the controller skip the file.
    serde_json::to_value(object).unwrap_or(serde_json::Value::Null)
}

/// Every namespace used, the declared ones as declared, the others as plain Namespaces.
fn namespaces(manifests: &Manifests) -> BTreeMap<String, Namespace> {
    let mut namespaces: BTreeMap<String, Namespace> = manifests
        .namespaces
        .iter()
        .map(|ns| (name_of(&ns.metadata), ns.clone()))
        .collect();
    let used = manifests
        .services
        .iter()
        .map(|o| &o.metadata)
        .chain(manifests.deployments.iter().map(|o| &o.metadata))
        .chain(manifests.pods.iter().map(|o| &o.metadata))
        .chain(manifests.service_accounts.iter().map(|o| &o.metadata))
        .map(namespace_of)
        .collect::<BTreeSet<_>>();
    for name in used {
        namespaces.entry(name.clone()).or_insert_with(|| Namespace {
            metadata: ObjectMeta {
                name: Some(name),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        });
    }
    namespaces
}

fn namespace_annotations(
    namespaces: &BTreeMap<String, Namespace>,
    namespace: &str,
    inject_all: bool,
) -> BTreeMap<String, String> {
    let mut annotations = namespaces
        .get(namespace)
        .and_then(|ns| ns.metadata.annotations.clone())
        .unwrap_or_default();
    if inject_all {
        annotations.insert("mesh.dev/inject".to_owned(), "enabled".to_owned());
    }
    annotations
}

/// Services with their cluster IPs: `spec.clusterIP` when given, else the next free one of
/// 10.78.0.0/16; `None` for headless Services.
fn services(
    manifests: &Manifests,
    addresses: &Addresses,
) -> Result<Vec<(Service, Option<Ipv4Addr>)>, PlanError> {
    let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut keys = BTreeSet::new();
    let mut wanted = Vec::new();
    for service in &manifests.services {
        let (namespace, name) = (namespace_of(&service.metadata), name_of(&service.metadata));
        if !keys.insert((namespace.clone(), name.clone())) {
            return Err(PlanError::Duplicate {
                kind: "Service",
                namespace,
                name,
            });
        }
        let given = service
            .spec
            .as_ref()
            .and_then(|spec| spec.cluster_ip.clone())
            .filter(|ip| !ip.is_empty());
        let error = |message: String| PlanError::Object {
            what: "Service",
            namespace: namespace.clone(),
            name: name.clone(),
            message,
        };
        let ip = match given.as_deref() {
            None => Some(None),
            Some("None") => None,
            Some(text) => {
                let ip: Ipv4Addr = text.parse().map_err(|_| {
                    error(format!(
                        "spec.clusterIP {text:?} is not an IPv4 address (local meshes are IPv4)"
                    ))
                })?;
                if addresses.contains(ip) || ip.is_loopback() || ip.is_unspecified() {
                    return Err(error(format!(
                        "spec.clusterIP {ip} is in a range the local mesh uses for pods or loopback"
                    )));
                }
                if let Some(other) = taken.insert(ip, format!("{namespace}/{name}")) {
                    return Err(error(format!(
                        "spec.clusterIP {ip} is also Service {other}'s"
                    )));
                }
                Some(Some(ip))
            }
        };
        wanted.push((service, ip));
    }
    let mut next = 10;
    let mut out = Vec::new();
    for (service, wanted_ip) in wanted {
        let ip = match wanted_ip {
            // Headless.
            None => None,
            Some(Some(ip)) => Some(ip),
            Some(None) => loop {
                let ip = offset(addresses.service_network, next, 65_534).ok_or_else(|| {
                    PlanError::Addresses("more Services than 10.78.0.0/16 holds".to_owned())
                })?;
                next += 1;
                if let std::collections::btree_map::Entry::Vacant(entry) = taken.entry(ip) {
                    entry.insert(String::new());
                    break Some(ip);
                }
            },
        };
        let mut service = service.clone();
        service.metadata.namespace = Some(namespace_of(&service.metadata));
        let spec = service.spec.get_or_insert_with(Default::default);
        let text = ip.map_or_else(|| "None".to_owned(), |ip| ip.to_string());
        spec.cluster_ip = Some(text.clone());
        spec.cluster_ips = Some(vec![text]);
        out.push((service, ip));
    }
    Ok(out)
}

fn service_ports(service: &Service) -> Vec<u16> {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_deref())
        .unwrap_or_default()
        .iter()
        .filter_map(|port| u16::try_from(port.port).ok())
        .collect()
}

/// Every pod to run: each Deployment replica (owned by a ReplicaSet-like `<deploy>-<hash>`,
/// as Kubernetes names them, so the controller derives the Deployment), then each Pod.
fn pod_objects(manifests: &Manifests) -> Vec<Pod> {
    let mut pods = Vec::new();
    for deployment in &manifests.deployments {
        let namespace = namespace_of(&deployment.metadata);
        let name = name_of(&deployment.metadata);
        let Some(spec) = deployment.spec.as_ref() else {
            continue;
        };
        let replicas = spec.replicas.unwrap_or(1).max(0);
        let template_json = serde_json::to_string(&spec.template).unwrap_or_default();
        let template_hash = safe_suffix(fnv1a(template_json.as_bytes()), 10);
        let replicaset = format!("{name}-{template_hash}");
        let template_meta = spec.template.metadata.clone().unwrap_or_default();
        for replica in 0..replicas {
            let suffix = safe_suffix(fnv1a(format!("{replicaset}/{replica}").as_bytes()), 5);
            let pod_name = format!("{replicaset}-{suffix}");
            let mut labels = template_meta.labels.clone().unwrap_or_default();
            labels.insert("pod-template-hash".to_owned(), template_hash.clone());
            pods.push(Pod {
                metadata: ObjectMeta {
                    name: Some(pod_name.clone()),
                    namespace: Some(namespace.clone()),
                    labels: Some(labels),
                    annotations: template_meta.annotations.clone(),
                    uid: Some(fake_uid(&namespace, &pod_name)),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "apps/v1".to_owned(),
                        kind: "ReplicaSet".to_owned(),
                        name: replicaset.clone(),
                        uid: fake_uid(&namespace, &replicaset),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]),
                    ..ObjectMeta::default()
                },
                spec: spec.template.spec.clone(),
                status: None,
            });
        }
    }
    for pod in &manifests.pods {
        let mut pod = pod.clone();
        let namespace = namespace_of(&pod.metadata);
        let name = name_of(&pod.metadata);
        pod.metadata.namespace = Some(namespace.clone());
        pod.metadata.uid = Some(fake_uid(&namespace, &name));
        pod.status = None;
        pods.push(pod);
    }
    pods
}

/// A stable UUID-shaped uid for an object.
fn fake_uid(namespace: &str, name: &str) -> String {
    let a = fnv1a(format!("{namespace}/{name}").as_bytes());
    let b = fnv1a(format!("{name}/{namespace}").as_bytes());
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// Declared ServiceAccounts, plus the ones pods name (and `default`) when not declared.
fn service_accounts(manifests: &Manifests, pods: &[PodPlan]) -> Vec<ServiceAccount> {
    let mut accounts: BTreeMap<(String, String), ServiceAccount> = BTreeMap::new();
    for account in &manifests.service_accounts {
        let mut account = account.clone();
        account.metadata.namespace = Some(namespace_of(&account.metadata));
        accounts.insert(
            (namespace_of(&account.metadata), name_of(&account.metadata)),
            account,
        );
    }
    for pod in pods {
        let name = pod
            .object
            .pointer("/spec/serviceAccountName")
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_owned();
        accounts
            .entry((pod.namespace.clone(), name.clone()))
            .or_insert_with(|| ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(pod.namespace.clone()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            });
    }
    accounts.into_values().collect()
}

fn controller(options: &PlanOptions, addresses: &Addresses) -> ControllerPlan {
    let grpc = SocketAddr::new(IpAddr::V4(addresses.gateway), CONTROLLER_GRPC_PORT);
    let admin = SocketAddr::new(IpAddr::V4(addresses.gateway), CONTROLLER_ADMIN_PORT);
    let config_dir = options.state_dir.join("controller");
    let root = options.mode == Mode::Root;
    ControllerPlan {
        argv: vec![
            options.controller_program.display().to_string(),
            "--discovery=file".to_owned(),
            format!("--config-dir={}", config_dir.display()),
            format!("--grpc-listen={grpc}"),
            format!("--admin-listen={admin}"),
        ],
        config_dir,
        grpc,
        admin,
        grpc_forward_port: root.then_some(options.controller_port),
        admin_forward_port: root.then_some(options.controller_admin_port),
        log: options.state_dir.join("logs").join("controller.log"),
    }
}

/// The injector's mesh-wide settings for a local mesh: its controller, native sidecars (the
/// runtime starts the apps once the proxy is ready, as the kubelet does).
fn mesh_config(controller: &ControllerPlan) -> mesh_injector::MeshConfig {
    let url = format!("http://{}", controller.grpc);
    mesh_injector::MeshConfig {
        controller_addr: url.clone(),
        identity_addr: url,
        native_sidecars: true,
        ..mesh_injector::MeshConfig::default()
    }
}

fn pod_plan(
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
    let context = PodContext {
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
        namespace,
        name,
    })
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
        let env = self.env(container, role);
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

#[cfg(test)]
mod tests;
