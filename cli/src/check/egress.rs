//! The egress check: an `EgressNetwork` whose networks cover pod or Service addresses is a
//! mistake (traffic to those addresses is mesh traffic and never egress, so the network's
//! policy silently does not apply there), but not a broken mesh: it warns.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};

use super::Outcome;

const NAME: &str = "egress-networks";

/// One EgressNetwork's networks, with their exceptions.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressNetwork {
    /// `namespace/name`.
    pub name: String,
    /// `(cidr, except)`; empty covers only what is outside the mesh, so never overlaps it.
    pub networks: Vec<(IpNet, Vec<IpNet>)>,
}

/// An address range of the mesh and what it is (`the pod range of node n1`, `Service a/b`).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshRange {
    pub range: IpNet,
    pub what: String,
}

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Each network that covers some of the mesh's ranges, with those ranges: a line each.
pub fn overlaps(networks: &[EgressNetwork], mesh: &[MeshRange]) -> Vec<String> {
    let mut lines = Vec::new();
    for network in networks {
        let covered: Vec<String> = mesh
            .iter()
            .filter(|m| {
                network.networks.iter().any(|(cidr, except)| {
                    overlap(cidr, &m.range) && !except.iter().any(|e| e.contains(&m.range))
                })
            })
            .map(|m| format!("{} ({})", m.range, m.what))
            .collect();
        if !covered.is_empty() {
            lines.push(format!(
                "EgressNetwork {} covers {}",
                network.name,
                covered.join(", ")
            ));
        }
    }
    lines
}

/// Reads an EgressNetwork object; `None` for networks the controller would refuse too (it
/// reports those itself).
fn read_network(object: &DynamicObject) -> Option<EgressNetwork> {
    let parse = |text: &str| {
        text.parse::<IpNet>()
            .ok()
            .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
    };
    let mut networks = Vec::new();
    let listed = object.data["spec"]["networks"].as_array();
    for network in listed.into_iter().flatten() {
        let cidr = parse(network["cidr"].as_str()?)?;
        let except = network["except"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e.as_str().and_then(parse))
            .collect::<Option<Vec<_>>>()?;
        networks.push((cidr, except));
    }
    Some(EgressNetwork {
        name: qualified(&object.metadata),
        networks,
    })
}

/// `namespace/name`.
fn qualified(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// The mesh's ranges: each node's pod range (each pod's IP when no node says, or nodes may
/// not be listed) and each Service's cluster IPs.
async fn mesh_ranges(client: &kube::Client) -> Result<Vec<MeshRange>, kube::Error> {
    let mut ranges = Vec::new();
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default();
    for node in &nodes {
        let spec = node.spec.clone().unwrap_or_default();
        let cidrs = spec
            .pod_cidrs
            .unwrap_or_default()
            .into_iter()
            .chain(spec.pod_cidr);
        for cidr in cidrs {
            if let Ok(range) = cidr.parse() {
                ranges.push(MeshRange {
                    range,
                    what: format!(
                        "the pod range of node {}",
                        node.metadata.name.as_deref().unwrap_or_default()
                    ),
                });
            }
        }
    }
    if ranges.is_empty() {
        for pod in Api::<Pod>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            // A host-network pod's IP is its node's, outside the mesh.
            if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
                continue;
            }
            let ip = pod.status.and_then(|s| s.pod_ip);
            if let Some(ip) = ip.and_then(|ip| ip.parse::<std::net::IpAddr>().ok()) {
                ranges.push(MeshRange {
                    range: IpNet::from(ip),
                    what: format!("pod {}", qualified(&pod.metadata)),
                });
            }
        }
    }
    for service in Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
    {
        let spec = service.spec.unwrap_or_default();
        let ips = spec
            .cluster_ips
            .unwrap_or_default()
            .into_iter()
            .chain(spec.cluster_ip);
        let mut seen = Vec::new();
        for ip in ips.filter_map(|ip| ip.parse::<std::net::IpAddr>().ok()) {
            if seen.contains(&ip) {
                continue;
            }
            seen.push(ip);
            ranges.push(MeshRange {
                range: IpNet::from(ip),
                what: format!("Service {}", qualified(&service.metadata)),
            });
        }
    }
    Ok(ranges)
}

/// Warns about EgressNetworks that cover the mesh's own addresses.
pub(super) async fn egress_check(client: &kube::Client) -> Outcome {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "policy.mesh.dev",
        "v1alpha1",
        "EgressNetwork",
    ));
    let listed = Api::<DynamicObject>::all_with(client.clone(), &resource)
        .list(&ListParams::default())
        .await;
    let objects = match listed {
        Ok(list) => list.items,
        // The CRD check names a missing CRD.
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(e) => {
            return Outcome::fail(
                NAME,
                format!("cannot list EgressNetworks: {e}"),
                "check that you may list egressnetworks.policy.mesh.dev",
            );
        }
    };
    let networks: Vec<EgressNetwork> = objects.iter().filter_map(read_network).collect();
    if networks.iter().all(|n| n.networks.is_empty()) {
        return Outcome::pass(
            NAME,
            format!("{} EgressNetwork(s), none naming networks", networks.len()),
        );
    }
    let mesh = match mesh_ranges(client).await {
        Ok(mesh) => mesh,
        Err(e) => {
            return Outcome::fail(
                NAME,
                format!("cannot list pods or Services to compare with: {e}"),
                "check that you may list pods and Services in every namespace",
            );
        }
    };
    let lines = overlaps(&networks, &mesh);
    if lines.is_empty() {
        Outcome::pass(
            NAME,
            format!(
                "{} EgressNetwork(s), none covering pod or Service addresses",
                networks.len()
            ),
        )
    } else {
        Outcome::warn(
            NAME,
            format!(
                "{}: traffic to those addresses is mesh traffic, never egress, so these \
                 networks' policies do not apply there",
                lines.join("; ")
            ),
            "narrow the networks' spec.networks, or list the mesh's ranges in their except",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().expect("a CIDR")
    }

    #[test]
    fn networks_covering_pod_ranges_or_service_ips_are_named_with_them() {
        let mesh = [
            MeshRange {
                range: net("10.244.0.0/24"),
                what: "the pod range of node n1".into(),
            },
            MeshRange {
                range: net("10.96.0.10/32"),
                what: "Service kube-system/kube-dns".into(),
            },
        ];
        let networks = [
            EgressNetwork {
                name: "shop/outside".into(),
                networks: vec![(net("203.0.113.0/24"), vec![])],
            },
            EgressNetwork {
                name: "shop/everything".into(),
                networks: vec![(net("0.0.0.0/0"), vec![])],
            },
            EgressNetwork {
                name: "shop/careful".into(),
                networks: vec![(net("0.0.0.0/0"), vec![net("10.0.0.0/8")])],
            },
            EgressNetwork {
                name: "shop/inside-a-pod-range".into(),
                networks: vec![(net("10.244.0.128/25"), vec![])],
            },
            EgressNetwork {
                name: "mesh-system/outside-only".into(),
                networks: vec![],
            },
        ];
        assert_eq!(
            overlaps(&networks, &mesh),
            [
                "EgressNetwork shop/everything covers 10.244.0.0/24 (the pod range of node n1), \
                 10.96.0.10/32 (Service kube-system/kube-dns)",
                "EgressNetwork shop/inside-a-pod-range covers 10.244.0.0/24 (the pod range of \
                 node n1)",
            ]
        );
    }

    #[test]
    fn networks_are_read_from_their_objects() {
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.mesh.dev/v1alpha1",
            "kind": "EgressNetwork",
            "metadata": {"name": "outside", "namespace": "shop"},
            "spec": {
                "trafficPolicy": "Deny",
                "networks": [{"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.1.1"]}],
            },
        }))
        .expect("an object");
        assert_eq!(
            read_network(&object),
            Some(EgressNetwork {
                name: "shop/outside".into(),
                networks: vec![(
                    net("0.0.0.0/0"),
                    vec![net("10.0.0.0/8"), net("192.168.1.1/32")]
                )],
            })
        );
        let mut broken = object.clone();
        broken.data["spec"]["networks"][0]["cidr"] = serde_json::json!("not-a-cidr");
        assert_eq!(read_network(&broken), None);
    }
}
