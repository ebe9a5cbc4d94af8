//! The raw objects policy decisions read, grouped by namespace, and the immutable snapshots
//! ([`PolicyInputs`]) the policy servers and the identity token refresher watch.
//!
//! The discovery [`Index`](crate::index::Index) forwards every object it is given to one
//! [`PolicyStore`] and publishes it with its own snapshots, so both backends feed policy with
//! no code of their own. Each namespace's objects sit behind an `Arc`: a change copies only
//! the namespace it touches (copy on write), and a publish copies only the outer map, so pod
//! churn in one namespace costs that namespace, not the cluster.
//!
//! This module stores; it must not interpret (no selectors, no defaults): that is the pure
//! functions' job.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use tokio::sync::watch;

use super::crds::{
    AuthorizationPolicy, EgressNetwork, HTTPLocalRateLimitPolicy, MeshTLSAuthentication,
    NetworkAuthentication, Server,
};
use super::gateway::{GRPCRoute, HTTPRoute, TCPRoute, TLSRoute};
use super::kinds::PolicyObject;
use crate::objects::{Kind, Object, ObjectKey};
use crate::pod::Pod;

/// Objects of one kind by name. A persistent map: publishing shares it with the previous
/// snapshot, and a change copies one path of the tree, not the map (copying a namespace's
/// 100,000 pods for each pod that changed was most of the controller's work under churn).
pub type ByName<T> = imbl::OrdMap<String, Arc<T>>;

/// The objects of one namespace that policy reads, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamespaceObjects {
    /// The Namespace object itself (its annotations set defaults), when known.
    pub namespace: Option<Arc<Namespace>>,
    /// Pods: labels select them, annotations override defaults, container ports name ports.
    pub pods: ByName<Pod>,
    /// Hosts outside Kubernetes, seen as pods (`crate::external`).
    pub external_workloads: ByName<Pod>,
    /// Services: ports, cluster IPs and the `retry.mesh.dev/*`-style annotations.
    pub services: ByName<Service>,
    /// ServiceAccounts: the file backend's identity tokens.
    pub service_accounts: ByName<ServiceAccount>,
    /// Servers.
    pub servers: ByName<Server>,
    /// AuthorizationPolicies.
    pub authorization_policies: ByName<AuthorizationPolicy>,
    /// MeshTLSAuthentications.
    pub mesh_tls_authentications: ByName<MeshTLSAuthentication>,
    /// NetworkAuthentications.
    pub network_authentications: ByName<NetworkAuthentication>,
    /// HTTPLocalRateLimitPolicies.
    pub rate_limits: ByName<HTTPLocalRateLimitPolicy>,
    /// EgressNetworks.
    pub egress_networks: ByName<EgressNetwork>,
    /// HTTPRoutes.
    pub http_routes: ByName<HTTPRoute>,
    /// GRPCRoutes.
    pub grpc_routes: ByName<GRPCRoute>,
    /// TLSRoutes.
    pub tls_routes: ByName<TLSRoute>,
    /// TCPRoutes.
    pub tcp_routes: ByName<TCPRoute>,
}

/// Expands `$apply!(kind, field, pattern binding the object's Arc)` for every named kind, so
/// the per-kind code is written once.
macro_rules! named_kinds {
    ($apply:ident) => {
        $apply!(Kind::Pod, pods, o, Object::Pod(o));
        $apply!(
            Kind::ExternalWorkload,
            external_workloads,
            o,
            Object::ExternalWorkload(o)
        );
        $apply!(Kind::Service, services, o, Object::Service(o));
        $apply!(
            Kind::ServiceAccount,
            service_accounts,
            o,
            Object::ServiceAccount(o)
        );
        $apply!(
            Kind::Server,
            servers,
            o,
            Object::Policy(PolicyObject::Server(o))
        );
        $apply!(
            Kind::AuthorizationPolicy,
            authorization_policies,
            o,
            Object::Policy(PolicyObject::AuthorizationPolicy(o))
        );
        $apply!(
            Kind::MeshTLSAuthentication,
            mesh_tls_authentications,
            o,
            Object::Policy(PolicyObject::MeshTLSAuthentication(o))
        );
        $apply!(
            Kind::NetworkAuthentication,
            network_authentications,
            o,
            Object::Policy(PolicyObject::NetworkAuthentication(o))
        );
        $apply!(
            Kind::HTTPLocalRateLimitPolicy,
            rate_limits,
            o,
            Object::Policy(PolicyObject::HTTPLocalRateLimitPolicy(o))
        );
        $apply!(
            Kind::HTTPRoute,
            http_routes,
            o,
            Object::Policy(PolicyObject::HTTPRoute(o))
        );
        $apply!(
            Kind::GRPCRoute,
            grpc_routes,
            o,
            Object::Policy(PolicyObject::GRPCRoute(o))
        );
        $apply!(
            Kind::EgressNetwork,
            egress_networks,
            o,
            Object::Policy(PolicyObject::EgressNetwork(o))
        );
        $apply!(
            Kind::TLSRoute,
            tls_routes,
            o,
            Object::Policy(PolicyObject::TLSRoute(o))
        );
        $apply!(
            Kind::TCPRoute,
            tcp_routes,
            o,
            Object::Policy(PolicyObject::TCPRoute(o))
        );
    };
}

impl NamespaceObjects {
    /// Pods and the hosts outside Kubernetes seen as pods.
    pub fn pods_and_external_workloads(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods.values().chain(self.external_workloads.values())
    }

    fn is_empty(&self) -> bool {
        let mut empty = self.namespace.is_none();
        macro_rules! check {
            ($kind:path, $field:ident, $o:ident, $pattern:pat) => {
                empty &= self.$field.is_empty();
            };
        }
        named_kinds!(check);
        empty
    }

    /// Whether storing `object` (or removing, for `None`) under `name` would change anything.
    fn differs(&self, kind: Kind, name: &str, object: Option<&Object>) -> bool {
        fn differs<T: PartialEq>(map: &ByName<T>, name: &str, value: Option<&Arc<T>>) -> bool {
            match (map.get(name), value) {
                (Some(old), Some(new)) => !(Arc::ptr_eq(old, new) || old == new),
                (None, None) => false,
                _ => true,
            }
        }
        if kind == Kind::Namespace {
            return match object {
                Some(Object::Namespace(ns)) => !self
                    .namespace
                    .as_ref()
                    .is_some_and(|old| Arc::ptr_eq(old, ns) || old == ns),
                _ => self.namespace.is_some(),
            };
        }
        macro_rules! check {
            ($kind:path, $field:ident, $o:ident, $pattern:pat) => {
                if kind == $kind {
                    return match object {
                        Some($pattern) => differs(&self.$field, name, Some($o)),
                        _ => differs(&self.$field, name, None),
                    };
                }
            };
        }
        named_kinds!(check);
        false
    }

    /// Inserts (`Some`) or removes (`None`) one object of `kind` named `name`. Kinds policy
    /// does not read are ignored.
    fn set(&mut self, kind: Kind, name: &str, object: Option<&Object>) {
        if kind == Kind::Namespace {
            self.namespace = match object {
                Some(Object::Namespace(ns)) => Some(ns.clone()),
                _ => None,
            };
            return;
        }
        macro_rules! put {
            ($kind:path, $field:ident, $o:ident, $pattern:pat) => {
                if kind == $kind {
                    match object {
                        Some($pattern) => {
                            self.$field.insert(name.to_owned(), $o.clone());
                        }
                        _ => {
                            self.$field.remove(name);
                        }
                    }
                    return;
                }
            };
        }
        named_kinds!(put);
    }

    /// The names of the objects of `kind` held.
    fn names(&self, kind: Kind) -> Vec<String> {
        if kind == Kind::Namespace {
            return self.namespace.iter().map(|_| String::new()).collect();
        }
        macro_rules! names {
            ($kind:path, $field:ident, $o:ident, $pattern:pat) => {
                if kind == $kind {
                    return self.$field.keys().cloned().collect();
                }
            };
        }
        named_kinds!(names);
        Vec::new()
    }
}

/// Whether policy reads objects of this kind.
fn stored(kind: Kind) -> bool {
    kind.is_policy()
        || matches!(
            kind,
            Kind::Namespace
                | Kind::Pod
                | Kind::ExternalWorkload
                | Kind::Service
                | Kind::ServiceAccount
        )
}

/// An immutable view of the objects policy reads, at one moment.
#[derive(Debug, Clone, Default)]
pub struct PolicyInputs {
    /// Increases with every published change.
    pub version: u64,
    namespaces: BTreeMap<String, Arc<NamespaceObjects>>,
}

impl PolicyInputs {
    /// The objects of one namespace.
    pub fn namespace(&self, name: &str) -> Option<&NamespaceObjects> {
        self.namespaces.get(name).map(Arc::as_ref)
    }

    /// Every namespace with its objects, in name order.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &NamespaceObjects)> {
        self.namespaces
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
    }

    /// Every ServiceAccount of every namespace.
    pub fn service_accounts(&self) -> impl Iterator<Item = &ServiceAccount> {
        self.namespaces
            .values()
            .flat_map(|ns| ns.service_accounts.values().map(Arc::as_ref))
    }

    /// A snapshot of exactly `objects` (tests and tools).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut store = PolicyStore::new();
        for object in objects {
            store.apply(&object.with_default_namespace());
        }
        store.publish();
        store.current().as_ref().clone()
    }
}

/// The policy objects, written by the index's single writer.
#[derive(Debug)]
pub struct PolicyStore {
    namespaces: BTreeMap<String, Arc<NamespaceObjects>>,
    dirty: bool,
    tx: watch::Sender<Arc<PolicyInputs>>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl PolicyStore {
    /// An empty store.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(PolicyInputs::default()));
        Self {
            namespaces: BTreeMap::new(),
            dirty: false,
            tx,
        }
    }

    /// A receiver of the published snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PolicyInputs>> {
        self.tx.subscribe()
    }

    /// The last published snapshot.
    pub fn current(&self) -> Arc<PolicyInputs> {
        self.tx.borrow().clone()
    }

    fn namespace_of(kind: Kind, key: &ObjectKey) -> &str {
        if kind == Kind::Namespace {
            &key.name
        } else {
            &key.namespace
        }
    }

    fn set(&mut self, kind: Kind, key: &ObjectKey, object: Option<&Object>) {
        if !stored(kind) {
            return;
        }
        let namespace = Self::namespace_of(kind, key).to_owned();
        let entry = self.namespaces.entry(namespace.clone()).or_default();
        // Checked first so an unchanged object does not copy a shared namespace.
        if !entry.differs(kind, &key.name, object) {
            if entry.is_empty() {
                self.namespaces.remove(&namespace);
            }
            return;
        }
        let objects = Arc::make_mut(entry);
        objects.set(kind, &key.name, object);
        if objects.is_empty() {
            self.namespaces.remove(&namespace);
        }
        self.dirty = true;
    }

    /// Adds or replaces an object (namespace already defaulted).
    pub fn apply(&mut self, object: &Object) {
        self.set(object.kind(), &object.key(), Some(object));
    }

    /// Removes an object.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) {
        self.set(kind, key, None);
    }

    /// Replaces every object of one kind (a relist, a reread folder).
    pub fn replace_kind<'a>(&mut self, kind: Kind, objects: impl IntoIterator<Item = &'a Object>) {
        if !stored(kind) {
            return;
        }
        let mut next: BTreeMap<ObjectKey, &Object> = BTreeMap::new();
        for object in objects.into_iter().filter(|o| o.kind() == kind) {
            next.insert(object.key(), object);
        }
        let held: Vec<ObjectKey> = self
            .namespaces
            .iter()
            .flat_map(|(ns, objects)| {
                objects.names(kind).into_iter().map(move |name| {
                    if kind == Kind::Namespace {
                        ObjectKey::new("", ns.clone())
                    } else {
                        ObjectKey::new(ns.clone(), name)
                    }
                })
            })
            .collect();
        for key in held {
            if !next.contains_key(&key) {
                self.set(kind, &key, None);
            }
        }
        for (key, object) in next {
            self.set(kind, &key, Some(object));
        }
    }

    /// Sends a new snapshot when anything changed since the last one.
    pub fn publish(&mut self) -> Option<Arc<PolicyInputs>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let version = self.tx.borrow().version + 1;
        let next = Arc::new(PolicyInputs {
            version,
            namespaces: self.namespaces.clone(),
        });
        self.tx.send_replace(next.clone());
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::parse_documents;

    fn objects(yaml: &str) -> Vec<Object> {
        parse_documents(yaml).expect("test YAML parses")
    }

    #[test]
    fn changes_publish_once_and_unchanged_namespaces_keep_their_arc() {
        let mut store = PolicyStore::new();
        let docs = objects(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: other}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        );
        for object in &docs {
            store.apply(object);
        }
        let first = store.publish().expect("first publish");
        assert_eq!(first.version, 1);
        let shop = first.namespace("shop").expect("shop");
        assert!(shop.namespace.is_some());
        assert_eq!(shop.pods.len(), 1);
        assert!(store.publish().is_none(), "nothing changed");

        // The same objects again: no change.
        for object in &docs {
            store.apply(object);
        }
        assert!(
            store.publish().is_none(),
            "re-applying equal objects changes nothing"
        );

        // A pod in shop changes: other keeps its Arc.
        store.apply(
            &objects("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: shop}\n")[0],
        );
        let second = store.publish().expect("second publish");
        assert!(Arc::ptr_eq(
            &first.namespaces["other"],
            &second.namespaces["other"]
        ));
        assert_eq!(second.namespace("shop").map(|n| n.pods.len()), Some(2));

        // A relist without pod a removes it; deleting the service empties `other`.
        store.replace_kind(
            Kind::Pod,
            &objects("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: shop}\n"),
        );
        store.delete(Kind::Service, &ObjectKey::new("other", "web"));
        let third = store.publish().expect("third publish");
        assert_eq!(
            third
                .namespace("shop")
                .map(|n| n.pods.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["b".to_owned()])
        );
        assert!(third.namespace("other").is_none());
    }
}
