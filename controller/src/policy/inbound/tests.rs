use super::*;
use crate::file::parse_documents;

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

fn pod(annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\n  \
         labels: {{app: web, tier: front}}\n  annotations: {{{annotations}}}\n  \
         ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d8f9, uid: u, controller: true}}]\n\
         spec:\n  serviceAccountName: web\n  containers:\n  - name: app\n    \
         ports: [{{containerPort: 8080, name: http}}, {{containerPort: 9090, name: admin}}]\n"
    )
}

fn server(name: &str, selector: &str, port: &str, protocol: &str) -> String {
    format!(
        "apiVersion: policy.mesh.dev/v1alpha1\nkind: Server\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  podSelector: {selector}\n  port: {port}\n  proxyProtocol: {protocol}\n"
    )
}

fn authz(name: &str, target: &str, refs: &str) -> String {
    format!(
        "apiVersion: policy.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRef: {target}\n  \
         requiredAuthenticationRefs: {refs}\n"
    )
}

const MESH_TLS: &str = "apiVersion: policy.mesh.dev/v1alpha1\nkind: MeshTLSAuthentication\n\
    metadata: {name: api-clients, namespace: shop}\nspec:\n  \
    identities: ['spiffe://cluster.local/ns/ops/*']\n  \
    identityRefs: [{kind: ServiceAccount, name: api}, {kind: Namespace, name: batch}]\n";

const NETWORKS: &str = "apiVersion: policy.mesh.dev/v1alpha1\nkind: NetworkAuthentication\n\
    metadata: {name: office, namespace: shop}\nspec:\n  \
    networks: [{cidr: 10.0.0.0/8, except: [10.9.0.0/16]}]\n";

const RATE_LIMIT: &str = "apiVersion: policy.mesh.dev/v1alpha1\nkind: HTTPLocalRateLimitPolicy\n\
    metadata: {name: web-limit, namespace: shop}\nspec:\n  \
    targetRef: {group: policy.mesh.dev, kind: Server, name: web-http}\n  \
    total: {requestsPerSecond: 100}\n  identity: {requestsPerSecond: 10}\n  \
    overrides: [{requestsPerSecond: 50, clientRefs: [{kind: ServiceAccount, name: api}]}]\n";

fn workload(pod: &str) -> WorkloadRef {
    WorkloadRef {
        namespace: "shop".to_owned(),
        kind: "deployment".to_owned(),
        name: "web".to_owned(),
        pod: pod.to_owned(),
    }
}

#[test]
fn policies_come_from_servers_else_the_default_of_pod_namespace_or_cluster() {
    let tls_server = server("web-http", "{matchLabels: {app: web}}", "http", "HTTP/1");
    struct Case {
        what: &'static str,
        docs: Vec<String>,
        cluster_default: DefaultPolicy,
        pod: &'static str,
        port: u16,
        want: &'static str,
    }
    let base = |extra: &[&str]| -> Vec<String> {
        let mut docs = vec![NAMESPACE.to_owned(), pod("")];
        docs.extend(extra.iter().map(|s| s.to_string()));
        docs
    };
    let cases = vec![
        Case {
            what: "cluster default",
            docs: base(&[]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "default:all-unauthenticated detect enforce [default:all-unauthenticated:any]",
        },
        Case {
            what: "cluster default deny",
            docs: base(&[]),
            cluster_default: DefaultPolicy::Deny,
            pod: "web-1",
            port: 8080,
            want: "default:deny detect enforce []",
        },
        Case {
            what: "namespace annotation beats the cluster",
            docs: vec![
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {config.mesh.dev/default-inbound-policy: all-authenticated}}\n".to_owned(),
                pod(""),
            ],
            cluster_default: DefaultPolicy::Deny,
            pod: "web-1",
            port: 8080,
            want: "default:all-authenticated detect enforce [default:all-authenticated:tls[*][]]",
        },
        Case {
            what: "pod annotation beats the namespace",
            docs: vec![
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {config.mesh.dev/default-inbound-policy: deny}}\n".to_owned(),
                pod("config.mesh.dev/default-inbound-policy: cluster-authenticated"),
            ],
            cluster_default: DefaultPolicy::Deny,
            pod: "web-1",
            port: 8080,
            want: "default:cluster-authenticated detect enforce [default:cluster-authenticated:tls[][spiffe://cluster.local/]]",
        },
        Case {
            what: "audit",
            docs: vec![NAMESPACE.to_owned(), pod("config.mesh.dev/default-inbound-policy: audit")],
            cluster_default: DefaultPolicy::Deny,
            pod: "web-1",
            port: 8080,
            want: "default:audit detect audit [default:audit:tls[*][]]",
        },
        Case {
            what: "an invalid pod annotation is passed over",
            docs: vec![NAMESPACE.to_owned(), pod("config.mesh.dev/default-inbound-policy: allow-all")],
            cluster_default: DefaultPolicy::Deny,
            pod: "web-1",
            port: 8080,
            want: "default:deny detect enforce []",
        },
        Case {
            what: "opaque ports are declared opaque",
            docs: vec![NAMESPACE.to_owned(), pod("config.mesh.dev/opaque-ports: '8080'")],
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "default:all-unauthenticated opaque enforce [default:all-unauthenticated:any]",
        },
        Case {
            what: "a Server nobody is authorized for denies all",
            docs: base(&[&tls_server]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "web-http http1 enforce []",
        },
        Case {
            what: "a Server on another port leaves this one to the default",
            docs: base(&[&tls_server]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 9090,
            want: "default:all-unauthenticated detect enforce [default:all-unauthenticated:any]",
        },
        Case {
            what: "a Server selecting other pods does not apply",
            docs: base(&[&server("other", "{matchLabels: {app: books}}", "8080", "opaque")]),
            cluster_default: DefaultPolicy::Deny,
            pod: "web-1",
            port: 8080,
            want: "default:deny detect enforce []",
        },
        Case {
            what: "matchExpressions and a port number",
            docs: base(&[&server(
                "front",
                "{matchExpressions: [{key: tier, operator: In, values: [front, edge]}, {key: canary, operator: DoesNotExist}]}",
                "9090",
                "gRPC",
            )]),
            cluster_default: DefaultPolicy::Deny,
            pod: "web-1",
            port: 9090,
            want: "front grpc enforce []",
        },
        Case {
            what: "mesh TLS authentication by identities, ServiceAccounts and namespaces",
            docs: base(&[
                &tls_server,
                MESH_TLS,
                &authz(
                    "web-from-api",
                    "{group: policy.mesh.dev, kind: Server, name: web-http}",
                    "[{group: policy.mesh.dev, kind: MeshTLSAuthentication, name: api-clients}]",
                ),
            ]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "web-http http1 enforce [web-from-api:tls[spiffe://cluster.local/ns/shop/sa/api][spiffe://cluster.local/ns/batch/,spiffe://cluster.local/ns/ops/]]",
        },
        Case {
            what: "a namespace-wide policy with networks and a ServiceAccount",
            docs: base(&[
                &tls_server,
                NETWORKS,
                &authz(
                    "office",
                    "{kind: Namespace, name: shop}",
                    "[{group: policy.mesh.dev, kind: NetworkAuthentication, name: office}]",
                ),
                &authz(
                    "from-admin",
                    "{kind: Namespace, name: shop}",
                    "[{kind: ServiceAccount, name: admin, namespace: ops}]",
                ),
            ]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "web-http http1 enforce [from-admin:tls[spiffe://cluster.local/ns/ops/sa/admin][]; office:any nets=10.0.0.0/8-10.9.0.0/16]",
        },
        Case {
            what: "a policy requiring a missing authentication admits nobody",
            docs: base(&[
                &tls_server,
                &authz(
                    "broken",
                    "{group: policy.mesh.dev, kind: Server, name: web-http}",
                    "[{group: policy.mesh.dev, kind: MeshTLSAuthentication, name: missing}]",
                ),
            ]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "web-http http1 enforce []",
        },
        Case {
            what: "a policy on another Server does not apply",
            docs: base(&[
                &tls_server,
                &authz("elsewhere", "{group: policy.mesh.dev, kind: Server, name: other}", "[]"),
            ]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "web-http http1 enforce []",
        },
        Case {
            what: "an HTTPRoute of the Server scopes its policy to the route",
            docs: base(&[
                &tls_server,
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: metrics, namespace: shop}\n\
                 spec:\n  parentRefs: [{group: policy.mesh.dev, kind: Server, name: web-http}]\n  \
                 rules: [{matches: [{path: {type: PathPrefix, value: /metrics}}]}]\n",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: live, namespace: shop}\n\
                 spec:\n  parentRefs: [{group: policy.mesh.dev, kind: Server, name: web-http}]\n  \
                 rules: [{matches: [{path: {type: Exact, value: /metrics/live}}]}]\n",
                &authz("scrape", "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: metrics}", "[]"),
            ]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            // The exact path sorts before the prefix, as the Gateway API orders matches.
            want: "web-http http1 enforce [scrape:any routes=metrics] http_routes=live:=/metrics/live,metrics:/metrics*",
        },
        Case {
            what: "the rate limit of the Server",
            docs: base(&[&tls_server, RATE_LIMIT]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "web-http http1 enforce [] limit=web-limit:100/10 spiffe://cluster.local/ns/shop/sa/api=50",
        },
        Case {
            what: "an unknown pod name falls back to the workload",
            docs: base(&[&tls_server]),
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-2",
            port: 8080,
            want: "web-http http1 enforce []",
        },
        Case {
            what: "a pod not known at all gets its namespace's default",
            docs: vec![
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {config.mesh.dev/default-inbound-policy: deny}}\n".to_owned(),
            ],
            cluster_default: DefaultPolicy::AllUnauthenticated,
            pod: "web-1",
            port: 8080,
            want: "default:deny detect enforce []",
        },
    ];
    for case in cases {
        let objects = case
            .docs
            .iter()
            .flat_map(|doc| parse_documents(doc).expect("test YAML parses"));
        let inputs = PolicyInputs::from_objects(objects);
        let settings = InboundSettings {
            trust_domain: "cluster.local".to_owned(),
            cluster_default: case.cluster_default,
        };
        let server = inbound_server(&inputs, &workload(case.pod), case.port, &settings);
        assert_eq!(summary(&server), case.want, "{}", case.what);
        assert_eq!(
            server.labels.get("namespace").map(String::as_str),
            Some("shop")
        );
    }
}

#[test]
fn default_policy_names_round_trip() {
    for policy in [
        DefaultPolicy::AllUnauthenticated,
        DefaultPolicy::AllAuthenticated,
        DefaultPolicy::ClusterAuthenticated,
        DefaultPolicy::Deny,
        DefaultPolicy::Audit,
    ] {
        assert_eq!(policy.as_str().parse::<DefaultPolicy>(), Ok(policy));
    }
    let error = "allow".parse::<DefaultPolicy>().expect_err("not a policy");
    assert!(
        error.to_string().contains("cluster-authenticated"),
        "{error}"
    );
}

#[test]
fn unusable_authorization_policies_and_server_routes_are_reported_with_why() {
    let tls_server = server("web-http", "{matchLabels: {app: web}}", "8080", "HTTP/1");
    let docs = [
        NAMESPACE.to_owned(),
        tls_server,
        MESH_TLS.to_owned(),
        authz(
            "fine",
            "{group: policy.mesh.dev, kind: Server, name: web-http}",
            "[{group: policy.mesh.dev, kind: MeshTLSAuthentication, name: api-clients}]",
        ),
        authz(
            "dangling",
            "{group: policy.mesh.dev, kind: Server, name: web-http}",
            "[{group: policy.mesh.dev, kind: MeshTLSAuthentication, name: missing}]",
        ),
        "apiVersion: policy.mesh.dev/v1alpha1\nkind: NetworkAuthentication\n\
         metadata: {name: typo, namespace: shop}\nspec:\n  networks: [{cidr: 10.0.0.0/33}]\n"
            .to_owned(),
        authz(
            "bad-network",
            "{group: policy.mesh.dev, kind: Server, name: web-http}",
            "[{group: policy.mesh.dev, kind: NetworkAuthentication, name: typo}]",
        ),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: broken, namespace: shop}\n\
         spec:\n  parentRefs: [{group: policy.mesh.dev, kind: Server, name: web-http}]\n  \
         rules: [{matches: [{path: {type: PathPrefix, value: metrics}}]}]\n"
            .to_owned(),
    ];
    let inputs = PolicyInputs::from_objects(
        docs.iter()
            .flat_map(|doc| parse_documents(doc).expect("test YAML parses")),
    );
    let problems: Vec<String> = problems(&inputs).iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "AuthorizationPolicy shop/bad-network: spec.requiredAuthenticationRefs = \
             \"NetworkAuthentication/typo\": NetworkAuthentication \"typo\" has \"10.0.0.0/33\", \
             which is not a CIDR; the policy admits nobody",
            "AuthorizationPolicy shop/dangling: spec.requiredAuthenticationRefs = \
             \"MeshTLSAuthentication/missing\": requires MeshTLSAuthentication \"missing\", which \
             does not exist in namespace shop; the policy admits nobody",
            "HTTPRoute shop/broken: spec.rules[0].matches[0].path.value = \"metrics\": does not \
             start with /",
        ]
    );
}
