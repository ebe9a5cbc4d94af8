//! What the local cluster should hold for one linked cluster: a pure function from the remote
//! cluster's exported Services, their EndpointSlices and the pods behind them to mirror
//! Services and EndpointSlices, with table tests beside it.
//!
//! A mirror is `<service>-<cluster>` in the Service's own namespace: a selectorless Service
//! (so it gets a cluster IP and DNS name here) with the remote Service's ports, and
//! EndpointSlices with the remote pods' addresses (the flat data path: the networks route to
//! each other). The slices are grouped by the identity the remote pods' proxies present, so
//! each carries that identity (and the proxy's inbound port) in annotations that discovery
//! reads ([`remote_identity`]); clients then verify the remote *workload's* identity.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::link::{Link, is_dns_label};
use crate::endpoints::GatewayInfo;
use crate::meta::{self, MeshedRule};
use crate::pod::Pod;

/// The label that exports a Service to linked clusters.
pub const LABEL_EXPORTED: &str = "mesh.dev/exported";
/// On mirrors: the cluster they mirror.
pub const LABEL_MIRROR_CLUSTER: &str = "multicluster.mesh.dev/cluster";
/// On mirrors: the remote Service's name.
pub const LABEL_REMOTE_NAME: &str = "multicluster.mesh.dev/remote-name";
/// EndpointSlices' standard owner label, and our value of it.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Who writes mirror slices (and the field manager of every mirror write).
pub const MANAGER: &str = "multicluster.mesh.dev";
/// On mirror slices: the identity its endpoints' proxies present.
pub const ANNOTATION_IDENTITY: &str = "multicluster.mesh.dev/identity";
/// On mirror slices: the port of its endpoints' proxies' inbound listener.
pub const ANNOTATION_INBOUND_PORT: &str = "multicluster.mesh.dev/inbound-proxy-port";
pub use super::link::{ANNOTATION_GATEWAY, ANNOTATION_GATEWAY_IDENTITY};

/// The mirror objects of one linked cluster.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Mirrors {
    /// Mirror Services.
    pub services: Vec<Service>,
    /// Their EndpointSlices.
    pub slices: Vec<EndpointSlice>,
    /// Exported Services that cannot be mirrored, and why.
    pub problems: Vec<String>,
}

/// What the remote cluster holds, as its watches see it.
#[derive(Debug, Default)]
pub struct Remote {
    /// Its Services (only the exported ones are mirrored).
    pub services: Vec<Arc<Service>>,
    /// Its EndpointSlices.
    pub slices: Vec<Arc<EndpointSlice>>,
    /// The pods behind the exported Services' endpoints, by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
}

/// The name of the mirror of `service` from `cluster`.
pub fn mirror_name(service: &str, cluster: &str) -> String {
    format!("{service}-{cluster}")
}

/// The mirrors `link`'s cluster calls for.
pub fn mirrors(link: &Link, remote: &Remote) -> Mirrors {
    let mut out = Mirrors::default();
    let mut slices_by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &remote.slices {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(service) = label(&slice.metadata, meta::LABEL_SERVICE_NAME) {
            slices_by_service
                .entry((namespace, service))
                .or_default()
                .push(slice);
        }
    }
    for service in &remote.services {
        if label(&service.metadata, LABEL_EXPORTED) != Some("true") {
            continue;
        }
        let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let mirror = mirror_name(name, &link.cluster);
        if !is_dns_label(&mirror) {
            out.problems.push(format!(
                "Service {namespace}/{name}: its mirror's name {mirror:?} is longer than 63 \
                 characters"
            ));
            continue;
        }
        out.services
            .push(mirror_service(link, service, namespace, name, &mirror));
        let slices = slices_by_service
            .get(&(namespace, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for slice in slices {
            out.slices
                .extend(mirror_slices(link, remote, slice, namespace, name, &mirror));
        }
    }
    out
}

/// The pods behind the endpoints of exported Services: the ones [`mirrors`] reads.
pub fn wanted_pods(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
) -> Vec<(String, String)> {
    let exported: std::collections::BTreeSet<(&str, &str)> = services
        .iter()
        .filter(|s| label(&s.metadata, LABEL_EXPORTED) == Some("true"))
        .map(|s| {
            (
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default(),
            )
        })
        .collect();
    let mut pods = Vec::new();
    for slice in slices {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        let Some(service) = label(&slice.metadata, meta::LABEL_SERVICE_NAME) else {
            continue;
        };
        if !exported.contains(&(namespace, service)) {
            continue;
        }
        for name in slice.endpoints.iter().filter_map(meta::endpoint_pod) {
            pods.push((namespace.to_owned(), name.to_owned()));
        }
    }
    pods
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn mirror_labels(link: &Link, remote_name: &str) -> BTreeMap<String, String> {
    [
        (LABEL_MIRROR_CLUSTER.to_owned(), link.cluster.clone()),
        (LABEL_REMOTE_NAME.to_owned(), remote_name.to_owned()),
    ]
    .into()
}

fn mirror_service(
    link: &Link,
    service: &Service,
    namespace: &str,
    name: &str,
    mirror: &str,
) -> Service {
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .map(|p| ServicePort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
            ..Default::default()
        })
        .collect();
    // The mesh's own annotations (opaque ports) hold for the mirror too.
    let annotations: BTreeMap<String, String> = service
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("config.mesh.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Service {
        metadata: ObjectMeta {
            name: Some(mirror.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(mirror_labels(link, name)),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

/// The mirror slices of one remote slice: its ready endpoints, grouped by the identity and
/// inbound port of their proxies.
fn mirror_slices(
    link: &Link,
    remote: &Remote,
    slice: &EndpointSlice,
    namespace: &str,
    name: &str,
    mirror: &str,
) -> Vec<EndpointSlice> {
    let mut groups: BTreeMap<(Option<String>, Option<u16>), Vec<Endpoint>> = BTreeMap::new();
    for endpoint in &slice.endpoints {
        if !meta::endpoint_ready(endpoint) {
            continue;
        }
        let key = match meta::endpoint_pod(endpoint) {
            None => (None, None),
            Some(pod_name) => {
                // Until its pod is known its identity is not, and without it a client would
                // connect in plaintext: hold the endpoint back.
                let Some(pod) = remote
                    .pods
                    .get(&(namespace.to_owned(), pod_name.to_owned()))
                else {
                    continue;
                };
                match meta::meshed(
                    pod,
                    None,
                    &link.trust_domain,
                    MeshedRule::ProxyPresent,
                    true,
                ) {
                    Some(meshed) => (
                        meshed.identity.map(|id| id.to_string()),
                        Some(meshed.inbound_proxy_port),
                    ),
                    None => (None, None),
                }
            }
        };
        // A gateway tunnels only to meshed proxies (it is no open relay): an endpoint
        // without an identity cannot be reached through it.
        if link.gateway.is_some() && key.0.is_none() {
            continue;
        }
        groups.entry(key).or_default().push(Endpoint {
            addresses: endpoint.addresses.clone(),
            conditions: Some(EndpointConditions {
                ready: Some(true),
                ..Default::default()
            }),
            zone: endpoint.zone.clone(),
            ..Default::default()
        });
    }
    let remote_slice = slice.metadata.name.as_deref().unwrap_or_default();
    groups
        .into_iter()
        .map(|((identity, port), endpoints)| {
            let mut labels = mirror_labels(link, name);
            labels.insert(meta::LABEL_SERVICE_NAME.to_owned(), mirror.to_owned());
            labels.insert(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned());
            let gateway = link.gateway.iter().flat_map(|g| {
                [
                    (ANNOTATION_GATEWAY.to_owned(), g.addr.to_string()),
                    (
                        ANNOTATION_GATEWAY_IDENTITY.to_owned(),
                        g.identity.to_string(),
                    ),
                ]
            });
            let annotations: BTreeMap<String, String> = identity
                .iter()
                .map(|id| (ANNOTATION_IDENTITY.to_owned(), id.clone()))
                .chain(port.map(|p| (ANNOTATION_INBOUND_PORT.to_owned(), p.to_string())))
                .chain(gateway)
                .collect();
            let group = format!(
                "{remote_slice}/{}/{}",
                identity.as_deref().unwrap_or_default(),
                port.unwrap_or_default()
            );
            EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{mirror}-{:08x}", fnv1a(group.as_bytes()))),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(labels),
                    annotations: (!annotations.is_empty()).then_some(annotations),
                    ..Default::default()
                },
                address_type: slice.address_type.clone(),
                endpoints,
                ports: slice.ports.clone(),
            }
        })
        .collect()
}

/// What a mirror slice says of its endpoints' proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteEndpoints {
    /// The identity they prove.
    pub identity: Arc<str>,
    /// Their inbound port.
    pub inbound_proxy_port: u16,
    /// The gateway they are reached through, if any.
    pub gateway: Option<Arc<GatewayInfo>>,
}

/// What a mirror slice names for its endpoints: only slices this module writes are read.
/// Trusting a slice's word costs nothing a writer of slices could use: a client verifies the
/// identities (the endpoint's, and the gateway's), so a false one only makes connections fail.
pub fn remote_endpoints(slice: &EndpointSlice) -> Option<RemoteEndpoints> {
    if label(&slice.metadata, LABEL_MANAGED_BY) != Some(MANAGER) {
        return None;
    }
    let annotations = slice.metadata.annotations.as_ref()?;
    let identity = annotations.get(ANNOTATION_IDENTITY)?;
    let inbound_proxy_port = annotations
        .get(ANNOTATION_INBOUND_PORT)
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .unwrap_or(meta::DEFAULT_INBOUND_PORT);
    let gateway = annotations
        .get(ANNOTATION_GATEWAY)
        .and_then(|addr| addr.parse().ok())
        .zip(annotations.get(ANNOTATION_GATEWAY_IDENTITY))
        .map(|(addr, identity)| {
            Arc::new(GatewayInfo {
                addr,
                identity: Arc::from(identity.as_str()),
                cluster: Arc::from(
                    label(&slice.metadata, LABEL_MIRROR_CLUSTER).unwrap_or_default(),
                ),
            })
        });
    Some(RemoteEndpoints {
        identity: Arc::from(identity.as_str()),
        inbound_proxy_port,
        gateway,
    })
}

/// FNV-1a (32 bits): short names for mirror slices that stay the same across restarts and
/// versions (std's hasher promises neither). Too small for a crate.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::parse_documents;
    use crate::objects::Object;

    fn link() -> Link {
        Link {
            secret: "cluster-east".to_owned(),
            cluster: "east".to_owned(),
            trust_domain: "cluster.local".to_owned(),
            kubeconfig: String::new(),
            gateway: None,
        }
    }

    fn objects(yaml: &str) -> Vec<Object> {
        parse_documents(yaml).expect("test objects parse")
    }

    const REMOTE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: books
  namespace: shop
  labels: {mesh.dev/exported: "true"}
  annotations: {config.mesh.dev/opaque-ports: "9000", other.example/x: "y"}
spec:
  selector: {app: books}
  ports: [{name: http, port: 8080, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: private, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: books-abc
  namespace: shop
  labels: {kubernetes.io/service-name: books}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- addresses: [10.1.0.1]
  targetRef: {kind: Pod, name: books-1}
- addresses: [10.1.0.2]
  targetRef: {kind: Pod, name: books-2}
- addresses: [10.1.0.3]
  targetRef: {kind: Pod, name: legacy}
- addresses: [10.1.0.4]
  conditions: {ready: false}
  targetRef: {kind: Pod, name: books-4}
- addresses: [10.1.0.5]
  targetRef: {kind: Pod, name: not-yet-seen}
---
apiVersion: v1
kind: Pod
metadata: {name: books-1, namespace: shop}
spec:
  serviceAccountName: books
  containers: [{name: app, image: books}, {name: mesh-proxy, image: proxy}]
---
apiVersion: v1
kind: Pod
metadata: {name: books-2, namespace: shop, annotations: {mesh.dev/proxy-inbound-port: "4200"}}
spec:
  serviceAccountName: books
  containers: [{name: app, image: books}, {name: mesh-proxy, image: proxy}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop}
spec:
  containers: [{name: app, image: books}]
"#;

    fn mirrors_of(yaml: &str, link: &Link) -> Mirrors {
        let objects = objects(yaml);
        let mut remote = Remote::default();
        for object in &objects {
            match object {
                Object::Service(s) => remote.services.push(s.clone()),
                Object::EndpointSlice(s) => remote.slices.push(s.clone()),
                Object::Pod(p) => {
                    remote.pods.insert(
                        (
                            p.metadata.namespace.clone().unwrap_or_default(),
                            p.metadata.name.clone().unwrap_or_default(),
                        ),
                        (**p).clone(),
                    );
                }
                _ => {}
            }
        }
        mirrors(link, &remote)
    }

    #[test]
    fn exported_services_are_mirrored_with_their_endpoints_grouped_by_identity() {
        let out = mirrors_of(REMOTE, &link());
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let names: Vec<_> = out
            .services
            .iter()
            .map(|s| s.metadata.name.as_deref().unwrap_or_default())
            .collect();
        assert_eq!(names, ["books-east"], "only the exported Service");
        let service = &out.services[0];
        assert_eq!(service.metadata.namespace.as_deref(), Some("shop"));
        let spec = service.spec.as_ref().expect("spec");
        assert_eq!(spec.selector, None, "a mirror selects no local pods");
        let ports = spec.ports.as_ref().expect("ports");
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("http"), 8080)
        );
        let annotations = service.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            ["config.mesh.dev/opaque-ports"],
            "only the mesh's own annotations travel"
        );

        // (identity, inbound port, addresses) of each slice.
        let mut groups: Vec<(Option<String>, Option<String>, Vec<String>)> = out
            .slices
            .iter()
            .map(|s| {
                let a = s.metadata.annotations.clone().unwrap_or_default();
                let labels = s.metadata.labels.as_ref().expect("labels");
                assert_eq!(labels[meta::LABEL_SERVICE_NAME], "books-east");
                assert_eq!(labels[LABEL_MANAGED_BY], MANAGER);
                assert_eq!(labels[LABEL_MIRROR_CLUSTER], "east");
                assert_eq!(s.ports.as_ref().expect("ports")[0].port, Some(80));
                (
                    a.get(ANNOTATION_IDENTITY).cloned(),
                    a.get(ANNOTATION_INBOUND_PORT).cloned(),
                    s.endpoints
                        .iter()
                        .flat_map(|e| e.addresses.clone())
                        .collect(),
                )
            })
            .collect();
        groups.sort();
        let id = || Some("spiffe://cluster.local/ns/shop/sa/books".to_owned());
        assert_eq!(
            groups,
            [
                (None, None, vec!["10.1.0.3".to_owned()]),
                (id(), Some("4143".to_owned()), vec!["10.1.0.1".to_owned()]),
                (id(), Some("4200".to_owned()), vec!["10.1.0.2".to_owned()]),
            ],
            "unready endpoints and those of pods not seen yet are left out; an unmeshed pod \
             gets no identity"
        );
        let mut slice_names: Vec<_> = out.slices.iter().map(|s| &s.metadata.name).collect();
        slice_names.sort();
        slice_names.dedup();
        assert_eq!(slice_names.len(), 3, "distinct names");

        // Discovery reads the identity back, and only from slices this module wrote.
        let meshed = out
            .slices
            .iter()
            .find(|s| s.endpoints[0].addresses == ["10.1.0.2"])
            .expect("the slice of books-2");
        assert_eq!(
            remote_endpoints(meshed),
            Some(RemoteEndpoints {
                identity: Arc::from("spiffe://cluster.local/ns/shop/sa/books"),
                inbound_proxy_port: 4200,
                gateway: None,
            })
        );
        let mut forged = meshed.clone();
        forged
            .metadata
            .labels
            .as_mut()
            .expect("labels")
            .remove(LABEL_MANAGED_BY);
        assert_eq!(remote_endpoints(&forged), None);
    }

    #[test]
    fn through_a_gateway_only_meshed_endpoints_are_mirrored_and_slices_name_it() {
        let gateway = Arc::new(GatewayInfo {
            addr: "192.0.2.7:4143".parse().expect("test address"),
            identity: Arc::from("spiffe://cluster.local/ns/mesh-system/sa/mesh-gateway"),
            cluster: Arc::from("east"),
        });
        let link = Link {
            gateway: Some(gateway.clone()),
            ..link()
        };
        let out = mirrors_of(REMOTE, &link);
        let mut addresses: Vec<String> = out
            .slices
            .iter()
            .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
            .collect();
        addresses.sort();
        assert_eq!(
            addresses,
            ["10.1.0.1", "10.1.0.2"],
            "the unmeshed legacy pod is left out"
        );
        for slice in &out.slices {
            let read = remote_endpoints(slice).expect("a mirror slice");
            assert_eq!(read.gateway.as_deref(), Some(gateway.as_ref()));
        }
    }

    #[test]
    fn the_remote_trust_domain_names_identities_and_long_names_are_reported() {
        let own = Link {
            trust_domain: "east.example".to_owned(),
            ..link()
        };
        let out = mirrors_of(REMOTE, &own);
        assert!(out.slices.iter().any(|s| {
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_IDENTITY))
                == Some(&"spiffe://east.example/ns/shop/sa/books".to_owned())
        }));

        let long = REMOTE.replace("name: books\n", &format!("name: {}\n", "b".repeat(60)));
        let out = mirrors_of(&long, &link());
        assert!(out.services.is_empty());
        assert_eq!(out.problems.len(), 1);
        assert!(
            out.problems[0].contains("longer than 63"),
            "{:?}",
            out.problems
        );
    }

    #[test]
    fn slice_names_are_stable() {
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
    }
}
