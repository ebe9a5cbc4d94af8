//! Table tests of endpoint derivation: objects (as YAML, the way people write them) in,
//! endpoint sets for targets out.

use std::sync::Arc;

use super::*;
use crate::file::parse_documents;

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {config.mesh.dev/opaque-ports: "5432"}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: pg, port: 5432}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f8-aaaaa
  namespace: shop
  labels: {app: web, topology.kubernetes.io/zone: zone-a}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f8, uid: u1, controller: true}]
spec:
  serviceAccountName: web
  containers:
  - {name: app, ports: [{name: http, containerPort: 8080}]}
  - {name: mesh-proxy}
status:
  podIP: 10.0.0.1
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-7d9f8-bbbbb, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status:
  podIP: 10.0.0.2
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-pending, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: app}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-plain
  namespace: shop
  labels: {app: web}
  annotations: {config.mesh.dev/opaque-ports: "8080"}
spec:
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop, labels: {app: other}}
spec:
  containers: [{name: app}]
status: {podIP: 10.0.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: db}
  ports: [{port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-abc
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{port: 15432}]
endpoints:
- addresses: [10.0.1.1]
  conditions: {ready: true}
  zone: zone-b
  targetRef: {kind: Pod, name: db-0, namespace: shop}
- addresses: [10.0.1.2]
  conditions: {ready: false}
- addresses: [10.0.1.3]
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: shop
  labels: {app: db}
  annotations: {mesh.dev/proxy-inbound-port: "4999"}
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: u2, controller: true}]
spec: {serviceAccountName: db, containers: [{name: db}]}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  clusterIP: None
  selector: {app: nothing}
  ports: [{port: 80}]
"#;

fn objects(yaml: &str) -> Vec<Object> {
    parse_documents(yaml).expect("test fixture parses")
}

fn file_options() -> IndexOptions {
    IndexOptions {
        trust_domain: "example.org".to_owned(),
        meshed_rule: MeshedRule::InjectAnnotation,
        endpoints_from_pods: true,
        wait_for_pods: false,
        identity_enabled: true,
    }
}

fn loaded(yaml: &str, options: IndexOptions) -> (Index, watch::Receiver<Arc<Snapshot>>) {
    let (mut index, rx) = Index::new(options);
    index.replace_all(objects(yaml));
    index.publish().expect("a first load publishes");
    (index, rx)
}

fn svc(name: &str, port: u16) -> Target {
    Target::Service {
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        port,
    }
}

fn addr(text: &str) -> Target {
    Target::Addr(text.parse().expect("test address"))
}

/// One line per endpoint: `addr id=<sa> inbound=<port> opaque zone=<z> workload=<kind/name>`.
fn show(resolution: &Resolution) -> Result<(bool, Vec<String>), String> {
    match resolution {
        Resolution::NotFound(reason) => Err(reason.clone()),
        Resolution::Found(state) => Ok((
            state.exists,
            state
                .endpoints
                .values()
                .map(|ep| {
                    let mut line = ep.addr.to_string();
                    if let Some(id) = &ep.identity {
                        line.push_str(&format!(" id={id}"));
                    }
                    if let Some(port) = ep.inbound_proxy_port {
                        line.push_str(&format!(" inbound={port}"));
                    }
                    if ep.opaque {
                        line.push_str(" opaque");
                    }
                    if let Some(zone) = &ep.zone {
                        line.push_str(&format!(" zone={zone}"));
                    }
                    if let Some(pod) = &ep.pod {
                        line.push_str(&format!(
                            " workload={}/{}",
                            pod.workload_kind, pod.workload_name
                        ));
                    }
                    line
                })
                .collect(),
        )),
    }
}

#[test]
fn targets_resolve_to_their_ready_endpoints() {
    let (_index, rx) = loaded(SHOP, file_options());
    let snapshot = rx.borrow().clone();
    let web_80 = Ok((
        true,
        vec![
            "10.0.0.1:8080 id=spiffe://example.org/ns/shop/sa/web inbound=4143 zone=zone-a workload=deployment/web".to_owned(),
            "10.0.0.3:8080 opaque workload=pod/web-plain".to_owned(),
        ],
    ));
    type Want = Result<(bool, Vec<String>), &'static str>;
    let cases: Vec<(&str, Target, Want)> = vec![
        ("by name, from pods, named target port", svc("web", 80), web_80.clone()),
        ("by cluster IP", addr("10.96.0.10:80"), web_80),
        (
            "opaque service port",
            svc("web", 5432),
            Ok((
                true,
                vec![
                    "10.0.0.1:5432 id=spiffe://example.org/ns/shop/sa/web inbound=4143 opaque zone=zone-a workload=deployment/web".to_owned(),
                    "10.0.0.3:5432 opaque workload=pod/web-plain".to_owned(),
                ],
            )),
        ),
        ("UDP port is not served", svc("web", 53), Err("service shop/web has no TCP port 53")),
        ("unknown port", svc("web", 81), Err("service shop/web has no TCP port 81")),
        ("unknown service", svc("nope", 80), Err("service shop/nope not found (nope.shop.svc:80)")),
        (
            "from slices: ready and unknown-ready, with zone and pod",
            svc("db", 5432),
            Ok((
                true,
                vec![
                    "10.0.1.1:15432 id=spiffe://example.org/ns/shop/sa/db inbound=4999 zone=zone-b workload=statefulset/db".to_owned(),
                    "10.0.1.3:15432".to_owned(),
                ],
            )),
        ),
        ("exists with nothing ready", svc("empty", 80), Ok((true, vec![]))),
        (
            "a pod IP, even not ready, is the pod itself",
            addr("10.0.0.2:9999"),
            Ok((true, vec!["10.0.0.2:9999 workload=pod/web-7d9f8-bbbbb".to_owned()])),
        ),
        (
            "a pod IP on an opaque port",
            addr("10.0.0.3:8080"),
            Ok((true, vec!["10.0.0.3:8080 opaque workload=pod/web-plain".to_owned()])),
        ),
        (
            "unknown IP",
            addr("10.9.9.9:80"),
            Err("10.9.9.9:80 is neither a service cluster IP nor a pod IP"),
        ),
    ];
    for (name, target, want) in cases {
        let want = want.map_err(str::to_owned);
        assert_eq!(show(&snapshot.resolve(&target)), want, "{name}");
    }
}

#[test]
fn the_kubernetes_backend_reads_slices_only_and_needs_the_proxy_present() {
    let options = IndexOptions {
        trust_domain: "cluster.local".to_owned(),
        ..IndexOptions::default()
    };
    let yaml = format!(
        "{SHOP}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: injected, namespace: shop, \
         labels: {{app: web}}, annotations: {{mesh.dev/inject: enabled}}}}\nspec: {{containers: [{{name: app}}]}}\n\
         status: {{podIP: 10.0.0.7}}\n"
    );
    let (_index, rx) = loaded(&yaml, options);
    let snapshot = rx.borrow().clone();
    assert_eq!(
        show(&snapshot.resolve(&svc("web", 80))),
        Ok((true, vec![])),
        "no slices and no pod derivation: nothing"
    );
    assert_eq!(
        show(&snapshot.resolve(&addr("10.0.0.7:80"))),
        Ok((true, vec!["10.0.0.7:80 workload=pod/injected".to_owned()])),
        "the inject annotation alone is not a proxy"
    );
}

#[test]
fn unchanged_sets_keep_their_pointer_and_changes_make_new_ones() {
    let (mut index, rx) = loaded(SHOP, file_options());
    let before = rx.borrow().clone();
    let web = |s: &Snapshot| s.resolve(&svc("web", 80)).into_state();
    let db = |s: &Snapshot| s.resolve(&svc("db", 5432)).into_state();

    // Reapplying the same objects changes nothing and publishes nothing.
    index.replace_all(objects(SHOP));
    assert!(index.publish().is_none());

    // A new pod for web: web changes, db keeps its set.
    let scaled = format!(
        "{SHOP}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-new, namespace: shop, labels: {{app: web}}}}\n\
         spec: {{containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIP: 10.0.0.4}}\n"
    );
    index.replace_all(objects(&scaled));
    let after = index.publish().expect("a new pod publishes");
    assert!(!web(&before).same_as(&web(&after)));
    assert!(db(&before).same_as(&db(&after)));
    assert_eq!(web(&after).endpoints.len(), 3);
    assert!(after.version > before.version);

    // A change in another namespace rebuilds nothing here.
    let elsewhere = objects(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: other}\nstatus: {podIP: 10.1.0.1}\n",
    );
    for object in elsewhere {
        assert!(index.apply(object));
    }
    let third = index.publish().expect("a new pod publishes");
    assert!(web(&after).same_as(&web(&third)));
    assert_eq!(third.counts.get(&Kind::Pod), Some(&8));

    // Deleting the service: unknown from then on.
    assert!(index.delete(Kind::Service, &ObjectKey::new("shop", "web")));
    let gone = index.publish().expect("a deletion publishes");
    assert_eq!(
        gone.resolve(&svc("web", 80)),
        Resolution::NotFound("service shop/web not found (web.shop.svc:80)".to_owned())
    );
    assert!(matches!(
        gone.resolve(&addr("10.96.0.10:80")),
        Resolution::NotFound(_)
    ));
}

#[test]
fn endpoints_share_their_pods_metadata_and_identity_with_the_pod_view() {
    let (_index, rx) = loaded(SHOP, file_options());
    let snapshot = rx.borrow().clone();
    let state = snapshot.resolve(&svc("web", 80)).into_state();
    let endpoint = state
        .endpoints
        .values()
        .find(|ep| ep.addr.ip().to_string() == "10.0.0.1")
        .expect("the ready web pod is an endpoint");
    let view = snapshot
        .pod_at("10.0.0.1".parse().expect("test address"))
        .expect("the pod has a view");
    let meta = endpoint.pod.as_ref().expect("the endpoint names its pod");
    assert!(Arc::ptr_eq(meta, &view.meta), "one PodMeta, not a copy");
    let identity = endpoint.identity.as_ref().expect("the pod is meshed");
    let view_identity = view.meshed.as_ref().and_then(|m| m.identity.as_ref());
    assert!(view_identity.is_some_and(|id| Arc::ptr_eq(id, identity)));
}

#[test]
fn namespace_annotations_mesh_and_make_opaque_the_pods_in_it() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {mesh.dev/inject: enabled, config.mesh.dev/opaque-ports: "6379"}
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: shop}
spec:
  selector: {app: cache}
  ports: [{port: 6379}, {name: admin, port: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: cache-0, namespace: shop, labels: {app: cache}}
spec: {serviceAccountName: cache, containers: [{name: redis}]}
status: {podIP: 10.0.2.1}
"#;
    let (mut index, rx) = loaded(yaml, file_options());
    let snapshot = rx.borrow().clone();
    assert_eq!(
        show(&snapshot.resolve(&svc("cache", 6379))),
        Ok((
            true,
            vec![
                "10.0.2.1:6379 id=spiffe://example.org/ns/shop/sa/cache inbound=4143 opaque workload=pod/cache-0"
                    .to_owned()
            ]
        ))
    );
    assert_eq!(
        show(&snapshot.resolve(&svc("cache", 9000))),
        Ok((
            true,
            vec!["10.0.2.1:9000 id=spiffe://example.org/ns/shop/sa/cache inbound=4143 workload=pod/cache-0".to_owned()]
        ))
    );
    // Removing the namespace's annotations (a Namespace change) rebuilds its services.
    assert!(
        index.apply(objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n").remove(0))
    );
    let after = index.publish().expect("a namespace change publishes");
    assert_eq!(
        show(&after.resolve(&svc("cache", 6379))),
        Ok((true, vec!["10.0.2.1:6379 workload=pod/cache-0".to_owned()]))
    );
}

#[test]
fn relisting_one_kind_replaces_only_that_kind() {
    let (mut index, rx) = loaded(SHOP, file_options());
    let pods_only: Vec<Object> = objects(SHOP)
        .into_iter()
        .filter(|o| o.kind() == Kind::Pod && o.key().name != "web-plain")
        .collect();
    index.replace_kind(Kind::Pod, pods_only);
    let after = index.publish().expect("a pod left");
    assert_eq!(after.counts.get(&Kind::Service), Some(&3));
    assert_eq!(after.counts.get(&Kind::Pod), Some(&5));
    assert_eq!(
        show(&after.resolve(&svc("web", 80))).map(|(_, eps)| eps.len()),
        Ok(1)
    );
    assert!(rx.has_changed().expect("the index is alive"));
}

#[test]
fn slice_endpoints_wait_for_their_pod_when_asked() {
    let slice = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.0.3.1]
  targetRef: {kind: Pod, name: api-0, namespace: shop}
- addresses: [10.0.3.2]
"#;
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: api-0, namespace: shop}\n\
               spec: {serviceAccountName: api, containers: [{name: app}, {name: mesh-proxy}]}\n\
               status: {podIP: 10.0.3.1}\n";
    let cases = [
        (
            "waiting: only the endpoint without a pod reference",
            true,
            false,
            vec!["10.0.3.2:8080".to_owned()],
        ),
        (
            "waiting, pod known: both, with identity",
            true,
            true,
            vec![
                "10.0.3.1:8080 id=spiffe://cluster.local/ns/shop/sa/api inbound=4143 workload=pod/api-0".to_owned(),
                "10.0.3.2:8080".to_owned(),
            ],
        ),
        (
            "not waiting: both, the unknown pod without identity",
            false,
            false,
            vec!["10.0.3.1:8080".to_owned(), "10.0.3.2:8080".to_owned()],
        ),
    ];
    for (name, wait_for_pods, with_pod, want) in cases {
        let options = IndexOptions {
            wait_for_pods,
            ..IndexOptions::default()
        };
        let yaml = if with_pod {
            format!("{slice}\n---\n{pod}")
        } else {
            slice.to_owned()
        };
        let (_index, rx) = loaded(&yaml, options);
        let snapshot = rx.borrow().clone();
        assert_eq!(
            show(&snapshot.resolve(&svc("api", 80))),
            Ok((true, want)),
            "{name}"
        );
    }
}

/// The incremental rebuild (only what a change can affect) must give exactly what a fresh
/// index built from the same objects gives, after every step of a series of edits.
#[test]
fn incremental_rebuilds_match_a_fresh_build() {
    let edits: Vec<(&str, &str)> = vec![
        // A pod relabelled out of web's selector.
        (
            "relabel",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-plain, namespace: shop, labels: {app: gone}}\n\
             spec: {containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.0.0.3}\n",
        ),
        // The not-ready pod becomes ready, with a new IP.
        (
            "ready",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-7d9f8-bbbbb, namespace: shop, labels: {app: web}}\n\
             spec: {containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.0.0.22}\n",
        ),
        // The selector changes to pick the relabelled pod only.
        (
            "selector",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.11, selector: {app: gone}, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
        ),
        // The slice of db drops an endpoint and names a new port.
        (
            "slice",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-abc, namespace: shop, \
             labels: {kubernetes.io/service-name: db}}\naddressType: IPv4\nports: [{port: 25432}]\n\
             endpoints: [{addresses: [10.0.1.1], targetRef: {kind: Pod, name: db-0}}]\n",
        ),
        // The namespace turns on injection: every pod there becomes meshed.
        (
            "namespace",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {mesh.dev/inject: enabled}}\n",
        ),
        // A new pod for the empty headless service.
        (
            "new pod",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: lone, namespace: shop, labels: {app: nothing}}\n\
             spec: {containers: [{name: app}]}\nstatus: {podIP: 10.0.0.30}\n",
        ),
    ];
    let targets = [
        svc("web", 80),
        svc("web", 5432),
        svc("db", 5432),
        svc("empty", 80),
        addr("10.96.0.10:80"),
        addr("10.96.0.11:80"),
        addr("10.0.0.2:80"),
        addr("10.0.0.22:80"),
        addr("10.0.0.3:8080"),
        addr("10.0.0.30:80"),
        addr("10.0.1.1:5432"),
    ];
    let (mut incremental, rx) = loaded(SHOP, file_options());
    let mut all = objects(SHOP);
    for (name, edit) in edits {
        for object in objects(edit) {
            let key = (object.kind(), object.key());
            all.retain(|o| (o.kind(), o.key()) != key);
            all.push(object.clone());
            incremental.apply(object);
        }
        incremental.publish();
        let (_fresh, fresh_rx) = loaded_objects(all.clone());
        let got = rx.borrow().clone();
        let want = fresh_rx.borrow().clone();
        for target in &targets {
            assert_eq!(
                got.resolve(target),
                want.resolve(target),
                "after {name}: {target}"
            );
        }
        assert_eq!(got.counts, want.counts, "after {name}");
    }
    // Deleting pods and the service goes the same way.
    for (kind, key) in [
        (Kind::Pod, ObjectKey::new("shop", "web-7d9f8-aaaaa")),
        (Kind::Service, ObjectKey::new("shop", "web")),
        (Kind::Pod, ObjectKey::new("shop", "lone")),
    ] {
        incremental.delete(kind, &key);
        all.retain(|o| (o.kind(), o.key()) != (kind, key.clone()));
        incremental.publish();
        let (_fresh, fresh_rx) = loaded_objects(all.clone());
        let got = rx.borrow().clone();
        let want = fresh_rx.borrow().clone();
        for target in &targets {
            assert_eq!(
                got.resolve(target),
                want.resolve(target),
                "after deleting {key}: {target}"
            );
        }
    }
}

fn loaded_objects(objects: Vec<Object>) -> (Index, watch::Receiver<Arc<Snapshot>>) {
    let (mut index, rx) = Index::new(file_options());
    index.replace_all(objects);
    index.publish();
    (index, rx)
}

#[test]
fn mirror_slices_give_their_endpoints_the_remote_identity() {
    let mirror = r#"
apiVersion: v1
kind: Service
metadata: {name: books-east, namespace: shop, labels: {multicluster.mesh.dev/cluster: east}}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: books-east-1
  namespace: shop
  labels:
    kubernetes.io/service-name: books-east
    endpointslice.kubernetes.io/managed-by: multicluster.mesh.dev
  annotations:
    multicluster.mesh.dev/identity: spiffe://cluster.local/ns/shop/sa/books
    multicluster.mesh.dev/inbound-proxy-port: "4143"
addressType: IPv4
ports: [{name: http, port: 80}]
endpoints: [{addresses: [10.1.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: books-east-2
  namespace: shop
  labels: {kubernetes.io/service-name: books-east}
  annotations: {multicluster.mesh.dev/identity: spiffe://cluster.local/ns/kube-system/sa/admin}
addressType: IPv4
ports: [{name: http, port: 80}]
endpoints: [{addresses: [10.1.0.2]}]
"#;
    let kubernetes = IndexOptions {
        trust_domain: "cluster.local".to_owned(),
        ..IndexOptions::default()
    };
    let (_index, rx) = loaded(mirror, kubernetes.clone());
    let snapshot = rx.borrow().clone();
    assert_eq!(
        show(&snapshot.resolve(&svc("books-east", 8080))),
        Ok((
            true,
            vec![
                "10.1.0.1:80 id=spiffe://cluster.local/ns/shop/sa/books inbound=4143".to_owned(),
                "10.1.0.2:80".to_owned(),
            ]
        )),
        "only a slice the mirror writer manages names an identity"
    );
    let (_index, rx) = loaded(
        mirror,
        IndexOptions {
            identity_enabled: false,
            ..kubernetes
        },
    );
    let snapshot = rx.borrow().clone();
    assert_eq!(
        show(&snapshot.resolve(&svc("books-east", 8080))),
        Ok((
            true,
            vec![
                "10.1.0.1:80 inbound=4143".to_owned(),
                "10.1.0.2:80".to_owned()
            ]
        )),
        "without a mesh identity there is no identity to expect"
    );
}

#[test]
fn external_workloads_join_the_services_that_select_them_and_resolve_by_ip() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec:
  clusterIP: 10.96.0.60
  selector: {app: legacy}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy-pod, namespace: shop, labels: {app: legacy}}
spec:
  serviceAccountName: legacy
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}, {name: mesh-proxy}]
status: {podIP: 10.0.0.20, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: legacy-1, namespace: shop, labels: {kubernetes.io/service-name: legacy}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.20], targetRef: {kind: Pod, name: legacy-pod}}]
---
apiVersion: workload.mesh.dev/v1alpha1
kind: ExternalWorkload
metadata: {name: vm-1, namespace: shop, labels: {app: legacy}}
spec:
  serviceAccountName: legacy
  workloadIPs: [192.0.2.10]
  ports: [{name: http, port: 9090}]
"#;
    let id = "spiffe://cluster.local/ns/shop/sa/legacy";
    let want = vec![
        format!("10.0.0.20:8080 id={id} inbound=4143 workload=pod/legacy-pod"),
        format!("192.0.2.10:9090 id={id} inbound=4143 workload=externalworkload/vm-1"),
    ];
    for (backend, options) in [
        (
            "kubernetes (slices, plus the selected external workloads)",
            IndexOptions {
                trust_domain: "cluster.local".to_owned(),
                ..IndexOptions::default()
            },
        ),
        (
            "file (from pods)",
            IndexOptions {
                trust_domain: "cluster.local".to_owned(),
                ..file_options()
            },
        ),
    ] {
        let (mut index, rx) = loaded(yaml, options);
        let snapshot = rx.borrow().clone();
        assert_eq!(
            show(&snapshot.resolve(&svc("legacy", 80))),
            Ok((true, want.clone())),
            "{backend}"
        );
        assert_eq!(
            show(&snapshot.resolve(&addr("192.0.2.10:9090"))),
            Ok((true, vec![want[1].clone()])),
            "{backend}: its IP is the workload itself"
        );
        // Removed: it leaves the Service.
        index.delete(Kind::ExternalWorkload, &ObjectKey::new("shop", "vm-1"));
        index.publish();
        let snapshot = rx.borrow().clone();
        assert_eq!(
            show(&snapshot.resolve(&svc("legacy", 80))),
            Ok((true, vec![want[0].clone()])),
            "{backend}: deleted"
        );
    }
}
