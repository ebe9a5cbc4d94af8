//! The objects of an install, built from [`Values`]. The Helm chart's templates
//! (`charts/mesh/templates/`) build the same objects from the same values; `chart_test` keeps
//! the two equal, so a change here is a change there.

use serde_json::{Value, json};

use super::values::Values;

/// The CRDs every install carries, generated from the controller's types (policy) and the
/// Gateway API subset it reads; the chart ships the same files in `crds/`.
pub fn crds() -> Result<Vec<Value>, String> {
    let mut objects = Vec::new();
    for (name, yaml) in CRD_FILES {
        let crd: Value = serde_saphyr::from_str(yaml).map_err(|e| format!("{name}: {e}"))?;
        objects.push(crd);
    }
    Ok(objects)
}

/// The chart's `crds/` folder, compiled in.
const CRD_FILES: &[(&str, &str)] = &[
    (
        "policy.mesh.dev_servers.yaml",
        include_str!("../../../charts/mesh/crds/policy.mesh.dev_servers.yaml"),
    ),
    (
        "policy.mesh.dev_authorizationpolicies.yaml",
        include_str!("../../../charts/mesh/crds/policy.mesh.dev_authorizationpolicies.yaml"),
    ),
    (
        "policy.mesh.dev_meshtlsauthentications.yaml",
        include_str!("../../../charts/mesh/crds/policy.mesh.dev_meshtlsauthentications.yaml"),
    ),
    (
        "policy.mesh.dev_networkauthentications.yaml",
        include_str!("../../../charts/mesh/crds/policy.mesh.dev_networkauthentications.yaml"),
    ),
    (
        "policy.mesh.dev_httplocalratelimitpolicies.yaml",
        include_str!("../../../charts/mesh/crds/policy.mesh.dev_httplocalratelimitpolicies.yaml"),
    ),
    (
        "policy.mesh.dev_egressnetworks.yaml",
        include_str!("../../../charts/mesh/crds/policy.mesh.dev_egressnetworks.yaml"),
    ),
    (
        "workload.mesh.dev_externalworkloads.yaml",
        include_str!("../../../charts/mesh/crds/workload.mesh.dev_externalworkloads.yaml"),
    ),
    (
        "gateway.networking.k8s.io_httproutes.yaml",
        include_str!("../../../charts/mesh/crds/gateway.networking.k8s.io_httproutes.yaml"),
    ),
    (
        "gateway.networking.k8s.io_grpcroutes.yaml",
        include_str!("../../../charts/mesh/crds/gateway.networking.k8s.io_grpcroutes.yaml"),
    ),
    (
        "gateway.networking.k8s.io_tlsroutes.yaml",
        include_str!("../../../charts/mesh/crds/gateway.networking.k8s.io_tlsroutes.yaml"),
    ),
    (
        "gateway.networking.k8s.io_tcproutes.yaml",
        include_str!("../../../charts/mesh/crds/gateway.networking.k8s.io_tcproutes.yaml"),
    ),
];

/// Names of the install's objects, shared with `check` and `uninstall`.
pub mod names {
    pub const CONTROLLER: &str = "mesh-controller";
    pub const INJECTOR: &str = "mesh-injector";
    pub const ISSUER_SECRET: &str = "mesh-identity-issuer";
    pub const TRUST_ROOTS: &str = "mesh-identity-trust-roots";
    pub const TRUST_ROOTS_KEY: &str = "ca-bundle.crt";
    pub const INJECTOR_TLS_SECRET: &str = "mesh-injector-tls";
    pub const CONFIG: &str = "mesh-config";
    pub const WEBHOOK: &str = "mesh-injector";
    pub const GATEWAY: &str = "mesh-gateway";
}

/// The multicluster gateway's port: the proxy's inbound port.
pub const GATEWAY_PORT: u16 = 4143;
const GATEWAY_ADMIN_PORT: u16 = 4191;

const GRPC_PORT: u16 = 8086;
const CONTROLLER_ADMIN_PORT: u16 = 9990;
const INJECTOR_HTTPS_PORT: u16 = 8443;
const INJECTOR_ADMIN_PORT: u16 = 9995;
/// The control plane runs as this non-root user.
const CONTROL_PLANE_UID: u16 = 2103;

/// Every object of the install but the CRDs, in the order they are applied: the namespace,
/// then who may do what, then secrets and config, then workloads, and the webhook last (it
/// must not call an injector that is not there yet; with `Ignore` it would only skip pods).
pub fn control_plane(values: &Values) -> Vec<Value> {
    let ns = values.namespace.as_str();
    [
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": ns,
                "labels": {
                    "mesh.dev/control-plane-ns": ns,
                    // The webhook's namespaceSelector skips the control plane's own pods.
                    "mesh.dev/inject": "disabled",
                },
            },
        }),
        service_account(values, names::CONTROLLER),
        service_account(values, names::INJECTOR),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": names::CONTROLLER, "labels": labels(values, "controller")},
            "rules": [
                // Discovery and policy: read-only.
                {"apiGroups": [""], "resources": ["namespaces", "services", "pods"],
                 "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["policy.mesh.dev"],
                 "resources": ["servers", "authorizationpolicies", "meshtlsauthentications",
                               "networkauthentications", "httplocalratelimitpolicies",
                               "egressnetworks"],
                 "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["gateway.networking.k8s.io"],
                 "resources": ["httproutes", "grpcroutes", "tlsroutes", "tcproutes"],
                 "verbs": ["get", "list", "watch"]},
                // Hosts outside Kubernetes, seen as pods.
                {"apiGroups": ["workload.mesh.dev"], "resources": ["externalworkloads"],
                 "verbs": ["get", "list", "watch"]},
                // Route conditions (Accepted, ResolvedRefs) are written to status only.
                {"apiGroups": ["gateway.networking.k8s.io"],
                 "resources": ["httproutes/status", "grpcroutes/status", "tlsroutes/status",
                               "tcproutes/status"],
                 "verbs": ["patch", "update"]},
                // Identity: a proxy's ServiceAccount token is checked before signing its CSR;
                // tap and stats: a user's token, then whether RBAC lets the user tap or read.
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                 "verbs": ["create"]},
                {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
                 "verbs": ["create"]},
            ],
        }),
        cluster_role_binding(values, names::CONTROLLER, "controller"),
        // The status writer's Lease, in the control plane's namespace only.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": names::CONTROLLER, "namespace": ns,
                         "labels": labels(values, "controller")},
            "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                       "verbs": ["get", "create", "update"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": names::CONTROLLER, "namespace": ns,
                         "labels": labels(values, "controller")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": names::CONTROLLER},
            "subjects": [{"kind": "ServiceAccount", "name": names::CONTROLLER, "namespace": ns}],
        }),
    ]
    .into_iter()
    .chain(multicluster_rbac(values))
    .chain([
        // What users are granted to watch the mesh (the controller asks RBAC about these
        // rules): tap by admins of a namespace, stats by anyone who may view it.
        observer_role(values, "mesh-tap", "tap.mesh.dev", "watch", "admin"),
        observer_role(values, "mesh-stats", "stats.mesh.dev", "get", "view"),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": names::INJECTOR, "labels": labels(values, "injector")},
            "rules": [
                // Namespace annotations are defaults for their pods' injection.
                {"apiGroups": [""], "resources": ["namespaces"],
                 "verbs": ["get", "list", "watch"]},
            ],
        }),
        cluster_role_binding(values, names::INJECTOR, "injector"),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": names::ISSUER_SECRET, "namespace": ns,
                         "labels": labels(values, "identity")},
            // cert-manager's layout, so cert-manager can take over the issuer's rotation.
            "stringData": {
                "tls.crt": values.identity.issuer.crt_pem,
                "tls.key": values.identity.issuer.key_pem,
                "ca.crt": values.identity.trust_anchors_pem,
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": names::TRUST_ROOTS, "namespace": ns,
                         "labels": labels(values, "identity")},
            "data": {names::TRUST_ROOTS_KEY: values.identity.trust_anchors_pem},
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": names::INJECTOR_TLS_SECRET, "namespace": ns,
                         "labels": labels(values, "injector")},
            "stringData": {
                "tls.crt": values.webhook.crt_pem,
                "tls.key": values.webhook.key_pem,
                "ca.crt": values.webhook.ca_bundle_pem,
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": names::CONFIG, "namespace": ns, "labels": labels(values, "config")},
            // What `meshctl check` and a reader need to know of the install, keys excluded.
            "data": {
                "trustDomain": values.trust_domain,
                "clusterDomain": values.cluster_domain,
                "ha": values.ha.to_string(),
                "proxyImage": values.image.of("proxy"),
                "defaultInboundPolicy": values.proxy.default_inbound_policy,
            },
        }),
        controller_deployment(values),
    ])
    .chain(dashboards(values))
    .chain([
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": names::CONTROLLER, "namespace": ns,
                         "labels": labels(values, "controller")},
            "spec": {
                "selector": selector("controller"),
                "ports": [
                    {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                    {"name": "admin", "port": CONTROLLER_ADMIN_PORT, "targetPort": "admin",
                     "protocol": "TCP"},
                ],
            },
        }),
    ])
    .chain(disruption_budget(values, names::CONTROLLER, "controller"))
    .chain([
        injector_deployment(values),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": names::INJECTOR, "namespace": ns,
                         "labels": labels(values, "injector")},
            "spec": {
                "selector": selector("injector"),
                // The protocol is spelled out: server-side apply on older API servers needs
                // every key of the ports list.
                "ports": [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}],
            },
        }),
    ])
    .chain(gateway(values))
    .chain([webhook_configuration(values)])
    .chain(disruption_budget(values, names::INJECTOR, "injector"))
    .collect()
}

/// With HA, a drain or a node upgrade takes at most one replica of `component` at a time.
/// policy/v1 (Kubernetes 1.21+); `kubernetes::apply` falls back to policy/v1beta1 on older
/// API servers.
fn disruption_budget(values: &Values, name: &str, component: &str) -> Option<Value> {
    values.ha.then(|| {
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": values.namespace,
                         "labels": labels(values, component)},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(component)}},
        })
    })
}

/// The Grafana dashboards as ConfigMaps for Grafana's dashboard sidecar, each JSON compacted
/// (the chart's generated `templates/dashboards.yaml` holds the same text).
pub fn dashboards(values: &Values) -> Vec<Value> {
    if !values.dashboards {
        return Vec::new();
    }
    crate::observability::DASHBOARDS
        .iter()
        .map(|(name, json)| {
            let mut labels = labels(values, "dashboards");
            if let Value::Object(map) = &mut labels {
                map.insert("grafana_dashboard".into(), json!("1"));
            }
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": format!("grafana-dashboard-{name}"),
                             "namespace": values.namespace, "labels": labels},
                "data": {format!("{name}.json"): compact_json(json)},
            })
        })
        .collect()
}

/// The JSON on one line (the embedded files are checked JSON; text that is not is kept as is).
pub fn compact_json(json: &str) -> String {
    serde_json::from_str::<Value>(json)
        .and_then(|value| serde_json::to_string(&value))
        .unwrap_or_else(|_| json.to_owned())
}

/// With multicluster: the link Secrets of the control plane's namespace are read, and mirror
/// Services and EndpointSlices written (the controller changes and deletes only objects it
/// labelled as mirrors).
fn multicluster_rbac(values: &Values) -> Vec<Value> {
    if !values.multicluster.enabled {
        return Vec::new();
    }
    let name = "mesh-controller-multicluster";
    let ns = values.namespace.as_str();
    let subjects = json!([{"kind": "ServiceAccount", "name": names::CONTROLLER, "namespace": ns}]);
    vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels(values, "controller")},
            "rules": [
                {"apiGroups": [""], "resources": ["services"],
                 "verbs": ["create", "patch", "update", "delete"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["create", "patch", "update", "delete"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels(values, "controller")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": name},
            "subjects": subjects,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": ns, "labels": labels(values, "controller")},
            "rules": [{"apiGroups": [""], "resources": ["secrets"],
                       "verbs": ["get", "list", "watch"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": ns, "labels": labels(values, "controller")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": subjects,
        }),
    ]
}

fn labels(values: &Values, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": format!("mesh-{component}"),
        "app.kubernetes.io/part-of": "mesh",
        "mesh.dev/control-plane-ns": values.namespace,
    })
}

/// A ClusterRole that lets its holders `verb` the `pods` of API group `group` through the
/// controller, aggregated into the built-in role `aggregate_to` (and, for `view`, into `edit`
/// and `admin`, which aggregate `view`).
fn observer_role(
    values: &Values,
    name: &str,
    group: &str,
    verb: &str,
    aggregate_to: &str,
) -> Value {
    let mut labels = labels(values, "controller");
    labels[format!("rbac.authorization.k8s.io/aggregate-to-{aggregate_to}")] = json!("true");
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels},
        "rules": [{"apiGroups": [group], "resources": ["pods"], "verbs": [verb]}],
    })
}

fn selector(component: &str) -> Value {
    json!({"mesh.dev/control-plane-component": component})
}

fn service_account(values: &Values, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": values.namespace,
                     "labels": labels(values, name.trim_start_matches("mesh-"))},
    })
}

fn cluster_role_binding(values: &Values, name: &str, component: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": labels(values, component)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": values.namespace}],
    })
}

fn replicas(values: &Values) -> u8 {
    if values.ha { 3 } else { 1 }
}

/// The pod template's scheduling: with HA, replicas prefer different nodes (required would
/// leave replicas pending on a cluster with fewer nodes than replicas).
fn affinity(values: &Values, component: &str) -> Value {
    if !values.ha {
        return Value::Null;
    }
    json!({
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {"matchLabels": selector(component)},
                    "topologyKey": "kubernetes.io/hostname",
                },
            }],
        },
    })
}

fn container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": CONTROL_PLANE_UID,
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
    })
}

fn deployment(values: &Values, name: &str, component: &str, pod_spec: Value) -> Value {
    let mut pod_labels = labels(values, component);
    if let (Value::Object(map), Value::Object(sel)) = (&mut pod_labels, selector(component)) {
        map.extend(sel);
    }
    let mut spec = pod_spec;
    if let Value::Object(map) = &mut spec {
        map.insert("serviceAccountName".into(), json!(name));
        let affinity = affinity(values, component);
        if !affinity.is_null() {
            map.insert("affinity".into(), affinity);
        }
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": values.namespace,
                     "labels": labels(values, component)},
        "spec": {
            "replicas": replicas(values),
            "selector": {"matchLabels": selector(component)},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {"mesh.dev/inject": "disabled"},
                },
                "spec": spec,
            },
        },
    })
}

fn controller_deployment(values: &Values) -> Value {
    let mut args = vec![
        "--discovery=kubernetes".to_owned(),
        format!("--grpc-listen=0.0.0.0:{GRPC_PORT}"),
        format!("--admin-listen=0.0.0.0:{CONTROLLER_ADMIN_PORT}"),
        format!("--trust-domain={}", values.trust_domain),
        format!("--cluster-domain={}", values.cluster_domain),
        "--identity-dir=/var/run/mesh/identity".to_owned(),
        format!("--identity-leaf-lifetime={}", values.identity.leaf_lifetime),
        format!(
            "--default-inbound-policy={}",
            values.proxy.default_inbound_policy
        ),
        format!("--egress-namespace={}", values.namespace),
        format!("--default-egress-policy={}", values.egress.default_policy),
    ];
    if values.multicluster.enabled {
        args.push(format!("--multicluster-namespace={}", values.namespace));
    }
    args.push(format!("--log-level={}", values.controller_log_level));
    let pod = json!({
        "containers": [{
            "name": "controller",
            "image": values.image.of("controller"),
            "imagePullPolicy": values.image.pull_policy,
            "args": args,
            // Who this replica is and where the replicas elect the route status writer.
            "env": [
                {"name": "MESH_CONTROLLER_POD_NAME",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "MESH_CONTROLLER_POD_NAMESPACE",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            ],
            "ports": [
                {"name": "grpc", "containerPort": GRPC_PORT},
                {"name": "admin", "containerPort": CONTROLLER_ADMIN_PORT},
            ],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "admin"}},
            "livenessProbe": {"httpGet": {"path": "/live", "port": "admin"}},
            "resources": {"requests": {"cpu": "100m", "memory": "50Mi"}},
            "securityContext": container_security(),
            "volumeMounts": [
                {"name": "identity", "mountPath": "/var/run/mesh/identity", "readOnly": true},
            ],
        }],
        "volumes": [{"name": "identity", "secret": {"secretName": names::ISSUER_SECRET}}],
    });
    deployment(values, names::CONTROLLER, "controller", pod)
}

fn injector_deployment(values: &Values) -> Value {
    let controller_addr = format!(
        "http://{}.{}.svc.{}:{GRPC_PORT}",
        names::CONTROLLER,
        values.namespace,
        values.cluster_domain
    );
    let pod = json!({
        "containers": [{
            "name": "injector",
            "image": values.image.of("injector"),
            "imagePullPolicy": values.image.pull_policy,
            "args": [
                format!("--listen=0.0.0.0:{INJECTOR_HTTPS_PORT}"),
                format!("--admin-listen=0.0.0.0:{INJECTOR_ADMIN_PORT}"),
                "--tls-cert=/var/run/mesh/tls/tls.crt",
                "--tls-key=/var/run/mesh/tls/tls.key",
                format!("--controller-addr={controller_addr}"),
                format!("--trust-domain={}", values.trust_domain),
                format!("--trust-anchors-file=/var/run/mesh/trust-roots/{}", names::TRUST_ROOTS_KEY),
                format!("--proxy-image={}", values.image.of("proxy")),
                format!("--default-inbound-policy={}", values.proxy.default_inbound_policy),
                format!("--proxy-log-level={}", values.proxy.log_level),
                format!("--proxy-cpu-request={}", values.proxy.cpu_request),
                format!("--proxy-cpu-limit={}", values.proxy.cpu_limit),
                format!("--proxy-memory-request={}", values.proxy.memory_request),
                format!("--proxy-memory-limit={}", values.proxy.memory_limit),
                format!("--log-level={}", values.controller_log_level),
            ],
            "ports": [
                {"name": "https", "containerPort": INJECTOR_HTTPS_PORT},
                {"name": "admin", "containerPort": INJECTOR_ADMIN_PORT},
            ],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "admin"}},
            "livenessProbe": {"httpGet": {"path": "/live", "port": "admin"}},
            "resources": {"requests": {"cpu": "50m", "memory": "20Mi"}},
            "securityContext": container_security(),
            "volumeMounts": [
                {"name": "tls", "mountPath": "/var/run/mesh/tls", "readOnly": true},
                {"name": "trust-roots", "mountPath": "/var/run/mesh/trust-roots", "readOnly": true},
            ],
        }],
        "volumes": [
            {"name": "tls", "secret": {"secretName": names::INJECTOR_TLS_SECRET}},
            {"name": "trust-roots", "configMap": {"name": names::TRUST_ROOTS}},
        ],
    });
    deployment(values, names::INJECTOR, "injector", pod)
}

/// The multicluster gateway, when enabled: a mesh proxy of its own identity (ServiceAccount
/// mesh-gateway) with `MESH_PROXY_GATEWAY`, behind a Service other clusters reach.
fn gateway(values: &Values) -> Vec<Value> {
    if !values.multicluster.gateway.enabled {
        return Vec::new();
    }
    let controller_addr = format!(
        "http://{}.{}.svc.{}:{GRPC_PORT}",
        names::CONTROLLER,
        values.namespace,
        values.cluster_domain
    );
    let env = |name: &str, value: String| json!({"name": name, "value": value});
    let pod = json!({
        "containers": [{
            "name": "mesh-proxy",
            "image": values.image.of("proxy"),
            "imagePullPolicy": values.image.pull_policy,
            "env": [
                env("MESH_PROXY_GATEWAY", "true".to_owned()),
                {"name": "MESH_PROXY_NAMESPACE",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "MESH_PROXY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                env("MESH_PROXY_INBOUND_LISTEN", format!("0.0.0.0:{GATEWAY_PORT}")),
                env("MESH_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140".to_owned()),
                env("MESH_PROXY_ADMIN_LISTEN", format!("0.0.0.0:{GATEWAY_ADMIN_PORT}")),
                env("MESH_PROXY_CONTROLLER_ADDR", controller_addr),
                env("MESH_PROXY_LOG_LEVEL", values.proxy.log_level.clone()),
                env("MESH_PROXY_IDENTITY", format!(
                    "spiffe://{}/ns/{}/sa/{}", values.trust_domain, values.namespace, names::GATEWAY)),
                env("MESH_PROXY_IDENTITY_TOKEN_FILE", "/var/run/mesh/identity-token/token".to_owned()),
                env("MESH_PROXY_TRUST_ANCHORS_FILE",
                    format!("/var/run/mesh/trust-roots/{}", names::TRUST_ROOTS_KEY)),
            ],
            "ports": [
                {"name": "gateway", "containerPort": GATEWAY_PORT},
                {"name": "admin", "containerPort": GATEWAY_ADMIN_PORT},
            ],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "admin"}},
            "livenessProbe": {"httpGet": {"path": "/live", "port": "admin"}},
            "resources": {"requests": {"cpu": values.proxy.cpu_request,
                                       "memory": values.proxy.memory_request}},
            "securityContext": container_security(),
            "volumeMounts": [
                {"name": "identity-token", "mountPath": "/var/run/mesh/identity-token",
                 "readOnly": true},
                {"name": "trust-roots", "mountPath": "/var/run/mesh/trust-roots", "readOnly": true},
            ],
        }],
        "volumes": [
            {"name": "identity-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "mesh.dev/identity", "expirationSeconds": 86400, "path": "token"}}]}},
            {"name": "trust-roots", "configMap": {"name": names::TRUST_ROOTS}},
        ],
    });
    vec![
        service_account(values, names::GATEWAY),
        deployment(values, names::GATEWAY, "gateway", pod),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": names::GATEWAY, "namespace": values.namespace,
                         "labels": labels(values, "gateway")},
            "spec": {
                "type": values.multicluster.gateway.service_type,
                "selector": selector("gateway"),
                "ports": [{"name": "gateway", "port": GATEWAY_PORT, "targetPort": "gateway",
                           "protocol": "TCP"}],
            },
        }),
    ]
}

fn webhook_configuration(values: &Values) -> Value {
    let client_config = if values.webhook.url.is_empty() {
        json!({"service": {"name": names::INJECTOR, "namespace": values.namespace,
                           "path": "/inject", "port": 443}})
    } else {
        json!({"url": values.webhook.url})
    };
    let mut client_config = client_config;
    if let Value::Object(map) = &mut client_config {
        map.insert(
            "caBundle".into(),
            base64_encode(values.webhook.ca_bundle_pem.as_bytes()),
        );
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": names::WEBHOOK, "labels": labels(values, "injector")},
        "webhooks": [{
            "name": "inject.mesh.dev",
            "clientConfig": client_config,
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            // Namespaces labelled out (the control plane's own) are never sent; kube-system
            // is refused by the injector itself, since 1.20 has no namespace name label.
            "namespaceSelector": {"matchExpressions": [
                {"key": "mesh.dev/inject", "operator": "NotIn", "values": ["disabled"]},
            ]},
            "failurePolicy": values.webhook.failure_policy,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": values.webhook.timeout_seconds,
            "reinvocationPolicy": "Never",
        }],
    })
}

/// Standard base64 with padding, as the API expects `[]byte` fields (k8s-openapi's
/// `ByteString` serializes so).
pub fn base64_encode(bytes: &[u8]) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).unwrap_or(Value::Null)
}
