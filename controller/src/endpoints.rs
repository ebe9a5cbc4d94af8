//! Endpoint sets and the Destination updates that move a client from one set to the next.
//!
//! Pure: [`initial`] is what a new stream receives, [`diff`] what an open stream receives when
//! its target's state changes. Both are tested table-driven below.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_proto::destination::{
    self as pb, AddEndpoints, NoEndpoints, ProtocolHint, RemoveEndpoints, TlsIdentity, Update,
    update,
};

/// The pod behind an endpoint, as metric labels need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub name: String,
    /// Kind of the owning workload, lowercase (`deployment`, `statefulset`, `pod`, ...).
    pub workload_kind: String,
    /// Name of the owning workload.
    pub workload_name: String,
    /// The pod's ServiceAccount.
    pub service_account: String,
}

/// One endpoint as discovery knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The zone, when known.
    pub zone: Option<String>,
    /// The pod behind the address, when known; shared with the pod's own view and every other
    /// endpoint of the pod (a cluster has as many endpoints as pods, or more).
    pub pod: Option<Arc<PodMeta>>,
    /// The SPIFFE ID to require, when the pod is meshed; shared like `pod`.
    pub identity: Option<Arc<str>>,
    /// The pod's proxy inbound port, when the pod is meshed.
    pub inbound_proxy_port: Option<u16>,
    /// Whether the port is opaque (no protocol detection).
    pub opaque: bool,
    /// The gateway of the endpoint's cluster, when it is reached through one.
    pub gateway: Option<Arc<GatewayInfo>>,
}

/// A multicluster gateway: where it listens and the identity it proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    /// Its address.
    pub addr: SocketAddr,
    /// Its SPIFFE ID.
    pub identity: Arc<str>,
    /// The cluster it leads to.
    pub cluster: Arc<str>,
}

/// A target's endpoints by address.
pub type EndpointSet = BTreeMap<SocketAddr, EndpointInfo>;

/// What a stream knows about its target at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetState {
    /// Whether the target exists (a Service port, or a pod).
    pub exists: bool,
    /// Its ready endpoints; shared with the index so unchanged sets compare by pointer.
    pub endpoints: Arc<EndpointSet>,
    /// Labels for the target as a whole (`service`, `namespace`); shared by every stream of
    /// a Service, which keeps them for as long as it is open.
    pub labels: Arc<BTreeMap<String, String>>,
}

impl TargetState {
    /// The state of a target that is not (or no longer) known.
    pub fn unknown() -> Self {
        Self {
            exists: false,
            endpoints: Arc::default(),
            labels: Arc::default(),
        }
    }

    /// Whether the two states are the same without looking inside the sets: the index reuses
    /// the `Arc` of a set that did not change, so most streams skip the diff entirely.
    pub fn same_as(&self, other: &TargetState) -> bool {
        self.exists == other.exists
            && Arc::ptr_eq(&self.endpoints, &other.endpoints)
            && self.labels == other.labels
    }
}

/// Endpoints per Add. A stream's encode buffer keeps the size of the largest message it
/// ever sent for as long as it lives (tonic reuses it), so a set of 20 endpoints sent whole
/// would cost every stream of that service about 4 KiB for good; in Adds of this many, and
/// with the codec handing each message on by itself (`mesh_proto::codec`), about 1.5 KiB.
const ADD_CHUNK: usize = 8;

/// The updates a stream sends first: the whole set, or that there is none.
pub fn initial(state: &TargetState) -> Vec<Update> {
    if state.endpoints.is_empty() {
        vec![no_endpoints(state.exists)]
    } else {
        adds(state.endpoints.values(), &state.labels)
    }
}

/// The updates that move a client from `old` to `new`.
///
/// Adds (new or changed endpoints; an Add replaces a known address) go before removes so a
/// client never sees an empty set while endpoints are replaced. When the set becomes empty
/// the client gets Remove for what it had, then NoEndpoints, so a client that only tracks
/// adds and removes is right as well.
pub fn diff(old: &TargetState, new: &TargetState) -> Vec<Update> {
    let mut updates = Vec::new();
    let labels_changed = old.labels != new.labels;
    let added: Vec<&EndpointInfo> = new
        .endpoints
        .values()
        .filter(|ep| labels_changed || old.endpoints.get(&ep.addr) != Some(*ep))
        .collect();
    updates.extend(adds(added, &new.labels));
    let removed: Vec<SocketAddr> = old
        .endpoints
        .keys()
        .filter(|addr| !new.endpoints.contains_key(addr))
        .copied()
        .collect();
    if !removed.is_empty() {
        updates.push(Update {
            update: Some(update::Update::Remove(RemoveEndpoints {
                addrs: removed.into_iter().map(Into::into).collect(),
            })),
        });
    }
    if new.endpoints.is_empty() && (!old.endpoints.is_empty() || old.exists != new.exists) {
        updates.push(no_endpoints(new.exists));
    }
    updates
}

fn no_endpoints(exists: bool) -> Update {
    Update {
        update: Some(update::Update::NoEndpoints(NoEndpoints { exists })),
    }
}

/// Adds for `endpoints`, [`ADD_CHUNK`] to each; none for none.
fn adds<'a>(
    endpoints: impl IntoIterator<Item = &'a EndpointInfo>,
    labels: &BTreeMap<String, String>,
) -> Vec<Update> {
    let endpoints: Vec<pb::Endpoint> = endpoints.into_iter().map(to_proto).collect();
    endpoints
        .chunks(ADD_CHUNK)
        .map(|chunk| Update {
            update: Some(update::Update::Add(AddEndpoints {
                endpoints: chunk.to_vec(),
                metric_labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })),
        })
        .collect()
}

/// The wire form of an endpoint.
pub fn to_proto(ep: &EndpointInfo) -> pb::Endpoint {
    let mut labels = std::collections::HashMap::new();
    if let Some(pod) = &ep.pod {
        labels.insert("pod".to_owned(), pod.name.clone());
        labels.insert("namespace".to_owned(), pod.namespace.clone());
        labels.insert("workload_kind".to_owned(), pod.workload_kind.clone());
        labels.insert("workload_name".to_owned(), pod.workload_name.clone());
        labels.insert("serviceaccount".to_owned(), pod.service_account.clone());
    }
    if let Some(zone) = &ep.zone {
        labels.insert("zone".to_owned(), zone.clone());
    }
    let hint = if ep.opaque {
        ProtocolHint::Opaque
    } else if ep.identity.is_some() {
        ProtocolHint::Http2
    } else {
        ProtocolHint::Unknown
    };
    pb::Endpoint {
        addr: Some(ep.addr.into()),
        weight: 0,
        metric_labels: labels,
        tls_identity: ep.identity.as_ref().map(|id| TlsIdentity {
            spiffe_id: id.to_string(),
            server_name: String::new(),
        }),
        protocol_hint: hint as i32,
        zone: ep.zone.clone().unwrap_or_default(),
        inbound_proxy_port: ep.inbound_proxy_port.map(u32::from).unwrap_or(0),
        gateway: ep.gateway.as_ref().map(|gateway| pb::Gateway {
            addr: Some(gateway.addr.into()),
            tls_identity: Some(TlsIdentity {
                spiffe_id: gateway.identity.to_string(),
                server_name: String::new(),
            }),
            cluster: gateway.cluster.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str) -> EndpointInfo {
        EndpointInfo {
            addr: addr.parse().expect("test address"),
            zone: None,
            pod: None,
            identity: None,
            inbound_proxy_port: None,
            opaque: false,
            gateway: None,
        }
    }

    fn state(exists: bool, eps: &[EndpointInfo]) -> TargetState {
        TargetState {
            exists,
            endpoints: Arc::new(eps.iter().map(|e| (e.addr, e.clone())).collect()),
            labels: Arc::new([("service".to_owned(), "web".to_owned())].into()),
        }
    }

    /// A readable form of an update: `+a,b` / `-a,b` / `none(exists)`.
    fn show(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match &u.update {
                Some(update::Update::Add(a)) => {
                    let addrs: Vec<String> = a
                        .endpoints
                        .iter()
                        .map(|e| {
                            let addr = e.addr.as_ref().expect("endpoints carry an address");
                            SocketAddr::try_from(addr)
                                .expect("valid address")
                                .to_string()
                        })
                        .collect();
                    format!("+{}", addrs.join(","))
                }
                Some(update::Update::Remove(r)) => {
                    let addrs: Vec<String> = r
                        .addrs
                        .iter()
                        .map(|a| SocketAddr::try_from(a).expect("valid address").to_string())
                        .collect();
                    format!("-{}", addrs.join(","))
                }
                Some(update::Update::NoEndpoints(n)) => format!("none({})", n.exists),
                None => "empty".to_owned(),
            })
            .collect()
    }

    const A: &str = "10.0.0.1:80";
    const B: &str = "10.0.0.2:80";
    const C: &str = "10.0.0.3:80";

    #[test]
    fn initial_sends_the_whole_set_or_none() {
        let cases = [
            (
                state(true, &[ep(A), ep(B)]),
                vec!["+10.0.0.1:80,10.0.0.2:80"],
            ),
            (state(true, &[]), vec!["none(true)"]),
            (state(false, &[]), vec!["none(false)"]),
        ];
        for (st, want) in cases {
            assert_eq!(show(&initial(&st)), want, "{st:?}");
        }
    }

    #[test]
    fn large_sets_go_in_adds_of_a_bounded_size() {
        let many: Vec<EndpointInfo> = (1..=ADD_CHUNK * 2 + 1)
            .map(|i| ep(&format!("10.0.1.{i}:80")))
            .collect();
        let sizes = |updates: Vec<Update>| -> Vec<usize> {
            updates
                .into_iter()
                .map(|u| match u.update {
                    Some(update::Update::Add(add)) => add.endpoints.len(),
                    other => panic!("expected only adds, got {other:?}"),
                })
                .collect()
        };
        let whole = state(true, &many);
        assert_eq!(sizes(initial(&whole)), [ADD_CHUNK, ADD_CHUNK, 1]);
        assert_eq!(
            sizes(diff(&state(true, &[]), &whole)),
            [ADD_CHUNK, ADD_CHUNK, 1]
        );
    }

    #[test]
    fn diffs_move_a_client_from_one_set_to_the_next() {
        let mut changed_b = ep(B);
        changed_b.zone = Some("z1".to_owned());
        let cases = [
            (
                "nothing changed",
                state(true, &[ep(A)]),
                state(true, &[ep(A)]),
                vec![],
            ),
            (
                "scale up",
                state(true, &[ep(A)]),
                state(true, &[ep(A), ep(B)]),
                vec!["+10.0.0.2:80"],
            ),
            (
                "scale down",
                state(true, &[ep(A), ep(B)]),
                state(true, &[ep(A)]),
                vec!["-10.0.0.2:80"],
            ),
            (
                "replace all: add before remove",
                state(true, &[ep(A)]),
                state(true, &[ep(B), ep(C)]),
                vec!["+10.0.0.2:80,10.0.0.3:80", "-10.0.0.1:80"],
            ),
            (
                "changed metadata is an add",
                state(true, &[ep(A), ep(B)]),
                state(true, &[ep(A), changed_b]),
                vec!["+10.0.0.2:80"],
            ),
            (
                "last one goes",
                state(true, &[ep(A)]),
                state(true, &[]),
                vec!["-10.0.0.1:80", "none(true)"],
            ),
            (
                "service deleted",
                state(true, &[ep(A)]),
                state(false, &[]),
                vec!["-10.0.0.1:80", "none(false)"],
            ),
            (
                "empty service deleted",
                state(true, &[]),
                state(false, &[]),
                vec!["none(false)"],
            ),
            (
                "empty service back",
                state(false, &[]),
                state(true, &[]),
                vec!["none(true)"],
            ),
            ("still empty", state(true, &[]), state(true, &[]), vec![]),
            (
                "comes back",
                state(false, &[]),
                state(true, &[ep(A)]),
                vec!["+10.0.0.1:80"],
            ),
        ];
        for (name, old, new, want) in cases {
            assert_eq!(show(&diff(&old, &new)), want, "{name}");
        }
    }

    #[test]
    fn endpoints_carry_identity_hint_zone_and_labels_on_the_wire() {
        let meshed = EndpointInfo {
            addr: A.parse().expect("test address"),
            zone: Some("zone-a".to_owned()),
            pod: Some(Arc::new(PodMeta {
                namespace: "shop".to_owned(),
                name: "web-7d9f8-abcde".to_owned(),
                workload_kind: "deployment".to_owned(),
                workload_name: "web".to_owned(),
                service_account: "web".to_owned(),
            })),
            identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            inbound_proxy_port: Some(4143),
            opaque: false,
            gateway: None,
        };
        let wire = to_proto(&meshed);
        assert_eq!(wire.gateway, None);
        assert_eq!(
            wire.tls_identity.map(|t| t.spiffe_id).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(wire.protocol_hint, ProtocolHint::Http2 as i32);
        assert_eq!(wire.inbound_proxy_port, 4143);
        assert_eq!(wire.zone, "zone-a");
        let labels: BTreeMap<_, _> = wire.metric_labels.into_iter().collect();
        let want: BTreeMap<String, String> = [
            ("namespace", "shop"),
            ("pod", "web-7d9f8-abcde"),
            ("serviceaccount", "web"),
            ("workload_kind", "deployment"),
            ("workload_name", "web"),
            ("zone", "zone-a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(labels, want);

        let mut opaque = meshed.clone();
        opaque.opaque = true;
        assert_eq!(to_proto(&opaque).protocol_hint, ProtocolHint::Opaque as i32);
        let plain = to_proto(&ep(B));
        assert_eq!(plain.protocol_hint, ProtocolHint::Unknown as i32);
        assert!(plain.tls_identity.is_none());
        assert_eq!(plain.inbound_proxy_port, 0);

        let mut remote = meshed.clone();
        remote.gateway = Some(Arc::new(GatewayInfo {
            addr: "192.0.2.7:4143".parse().expect("test address"),
            identity: "spiffe://cluster.local/ns/mesh-system/sa/mesh-gateway".into(),
            cluster: "east".into(),
        }));
        let gateway = to_proto(&remote).gateway.expect("the gateway on the wire");
        assert_eq!(
            gateway
                .addr
                .map(|a| SocketAddr::try_from(&a).expect("an address")),
            Some("192.0.2.7:4143".parse().expect("test address"))
        );
        assert_eq!(
            gateway.tls_identity.map(|t| t.spiffe_id).as_deref(),
            Some("spiffe://cluster.local/ns/mesh-system/sa/mesh-gateway")
        );
        assert_eq!(gateway.cluster, "east");
    }
}
