use super::*;
use crate::file::parse_documents;
use mesh_proto::policy::path_match;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: books\n  namespace: shop\n  annotations: ANNOTATIONS\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

fn service(annotations: &str) -> String {
    SERVICE.replace("ANNOTATIONS", annotations)
}

fn route(name: &str, namespace: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: books, namespace: shop, port: 80}}]\n  rules: {rules}\n"
    )
}

fn show(outcome: &OutboundOutcome) -> String {
    let Some(policy) = &outcome.policy else {
        return format!("none problems={}", outcome.problems.len());
    };
    let routes: Vec<String> = policy
        .routes
        .iter()
        .map(|r| {
            let path = r
                .matches
                .first()
                .and_then(|m| m.path.as_ref())
                .and_then(|p| p.kind.as_ref())
                .map(|k| match k {
                    path_match::Kind::Exact(p) => format!("={p}"),
                    path_match::Kind::Prefix(p) => format!("{p}*"),
                    path_match::Kind::Regex(p) => format!("~{p}"),
                })
                .unwrap_or_default();
            let backends: Vec<String> = r
                .backends
                .iter()
                .map(|b| match b.backend.as_ref().and_then(|b| b.kind.as_ref()) {
                    Some(backend::Kind::Authority(a)) => format!("{}x{a}", b.weight),
                    _ => "?".to_owned(),
                })
                .collect();
            format!(
                "{}({path})[{}]f{}{}",
                r.name,
                backends.join(","),
                r.filters.len(),
                if r.failover { " failover" } else { "" }
            )
        })
        .collect();
    format!(
        "{} routes=[{}] retry={} timeouts={} balancer={} problems={}",
        policy.service,
        routes.join(" "),
        policy
            .retry
            .as_ref()
            .map(|r| r.conditions.join(","))
            .unwrap_or_default(),
        policy.timeouts.is_some(),
        policy.balancer.as_ref().map_or(-1, |b| b.kind),
        outcome.problems.len()
    )
}

#[test]
fn policies_come_from_attached_routes_and_service_annotations() {
    let target = ServiceTarget {
        namespace: "shop".to_owned(),
        name: "books".to_owned(),
        port: 80,
    };
    let split = route(
        "split",
        "shop",
        "[{backendRefs: [{name: books, port: 80, weight: 90}, {name: books-v2, port: 80, weight: 10}]}]",
    );
    let by_path = route(
        "paths",
        "shop",
        "[{matches: [{path: {type: PathPrefix, value: /v2}}, {path: {type: Exact, value: /v2/exact}}], backendRefs: [{name: books-v2}]}]",
    );
    let bad = route(
        "bad",
        "shop",
        "[{matches: [{path: {type: RegularExpression, value: '/('}}]}]",
    );
    let failover = route(
        "failover",
        "shop",
        "[{backendRefs: [{name: books, port: 80}, {name: books-east, port: 80}]}]",
    )
    .replace(
        "namespace: shop}",
        "namespace: shop, annotations: {balancer.mesh.dev/failover: 'true'}}",
    );
    let consumer = route(
        "mine",
        "web",
        "[{backendRefs: [{name: books-v2, namespace: shop, port: 80}]}]",
    );
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        ("nothing", vec![service("{}")], "shop", "none problems=0"),
        (
            "a traffic split",
            vec![service("{}"), split.clone()],
            "shop",
            "books.shop.svc.cluster.local:80 routes=[split()[90xbooks.shop.svc.cluster.local:80,10xbooks-v2.shop.svc.cluster.local:80]f0] retry= timeouts=false balancer=-1 problems=0",
        ),
        (
            "routes in precedence order, a port-less backend on the target port",
            vec![service("{}"), split.clone(), by_path.clone()],
            "shop",
            "books.shop.svc.cluster.local:80 routes=[paths(=/v2/exact)[1xbooks-v2.shop.svc.cluster.local:80]f0 paths(/v2*)[1xbooks-v2.shop.svc.cluster.local:80]f0 split()[90xbooks.shop.svc.cluster.local:80,10xbooks-v2.shop.svc.cluster.local:80]f0] retry= timeouts=false balancer=-1 problems=0",
        ),
        (
            "annotations alone",
            vec![service(
                "{retry.mesh.dev/http: '5xx', timeout.mesh.dev/request: 5s, balancer.mesh.dev/algorithm: round-robin}",
            )],
            "shop",
            "books.shop.svc.cluster.local:80 routes=[] retry=5xx timeouts=true balancer=1 problems=0",
        ),
        (
            "fault injection on every route and the rest",
            vec![
                service("{fault.mesh.dev/abort-percent: '10'}"),
                split.clone(),
            ],
            "shop",
            "books.shop.svc.cluster.local:80 routes=[split()[90xbooks.shop.svc.cluster.local:80,10xbooks-v2.shop.svc.cluster.local:80]f1 default()[]f1] retry= timeouts=false balancer=-1 problems=0",
        ),
        (
            "a failover order instead of a split",
            vec![service("{}"), failover],
            "shop",
            "books.shop.svc.cluster.local:80 routes=[failover()[1xbooks.shop.svc.cluster.local:80,1xbooks-east.shop.svc.cluster.local:80]f0 failover] retry= timeouts=false balancer=-1 problems=0",
        ),
        (
            "failover on a Service, which has no backendRefs to order, is reported",
            vec![service("{balancer.mesh.dev/failover: 'true'}")],
            "shop",
            "books.shop.svc.cluster.local:80 routes=[] retry= timeouts=false balancer=-1 problems=1",
        ),
        (
            "an invalid route is left out and reported",
            vec![service("{}"), split.clone(), bad.clone()],
            "shop",
            "books.shop.svc.cluster.local:80 routes=[split()[90xbooks.shop.svc.cluster.local:80,10xbooks-v2.shop.svc.cluster.local:80]f0] retry= timeouts=false balancer=-1 problems=1",
        ),
        (
            "an invalid annotation is left out and reported",
            vec![service(
                "{retry.mesh.dev/http: teapot, timeout.mesh.dev/request: 5s}",
            )],
            "shop",
            "books.shop.svc.cluster.local:80 routes=[] retry= timeouts=true balancer=-1 problems=1",
        ),
        (
            "consumer routes replace producer routes for their namespace",
            vec![service("{}"), split.clone(), consumer.clone()],
            "web",
            "books.shop.svc.cluster.local:80 routes=[mine()[1xbooks-v2.shop.svc.cluster.local:80]f0] retry= timeouts=false balancer=-1 problems=0",
        ),
        (
            "other namespaces see the producer routes",
            vec![service("{}"), split.clone(), consumer.clone()],
            "ops",
            "books.shop.svc.cluster.local:80 routes=[split()[90xbooks.shop.svc.cluster.local:80,10xbooks-v2.shop.svc.cluster.local:80]f0] retry= timeouts=false balancer=-1 problems=0",
        ),
    ];
    for (what, docs, source_namespace, want) in cases {
        let objects = docs
            .iter()
            .flat_map(|d| parse_documents(d).expect("test YAML parses"));
        let inputs = PolicyInputs::from_objects(objects);
        let source = WorkloadRef {
            namespace: source_namespace.to_owned(),
            ..WorkloadRef::default()
        };
        let outcome = outbound_policy(&inputs, &target, &source, &OutboundSettings::default());
        assert_eq!(show(&outcome), want, "{what}: {:?}", outcome.problems);
    }
}

#[test]
fn targets_resolve_by_name_or_cluster_ip_to_a_service_port() {
    let inputs = PolicyInputs::from_objects(parse_documents(&service("{}")).expect("parses"));
    let settings = OutboundSettings::default();
    let resolve = |target: outbound_policy_request::Target| {
        TargetRequest::from_proto(Some(&target), &WorkloadRef::default(), &settings)
            .ok()
            .and_then(|t| resolve_target(&inputs, &t))
            .map(|t| t.to_string())
    };
    let addr = |text: &str| {
        outbound_policy_request::Target::Addr(
            text.parse::<SocketAddr>().expect("test address").into(),
        )
    };
    let authority = |text: &str| outbound_policy_request::Target::Authority(text.to_owned());
    assert_eq!(
        resolve(authority("books.shop.svc.cluster.local:80")),
        Some("books.shop.svc:80".to_owned())
    );
    assert_eq!(resolve(authority("books.shop.svc.cluster.local:81")), None);
    assert_eq!(
        resolve(addr("10.96.0.10:80")),
        Some("books.shop.svc:80".to_owned())
    );
    assert_eq!(resolve(addr("10.96.0.11:80")), None);
}

#[test]
fn route_problems_name_the_object_field_and_value() {
    let docs = [
        service("{}"),
        route(
            "bad",
            "shop",
            "[{filters: [{type: ResponseHeaderModifier}]}]",
        ),
        route(
            "weights",
            "shop",
            "[{backendRefs: [{name: books, weight: -1}]}]",
        ),
    ];
    let inputs = PolicyInputs::from_objects(
        docs.iter()
            .flat_map(|d| parse_documents(d).expect("test YAML parses")),
    );
    let problems: Vec<String> = all_problems(&inputs, &OutboundSettings::default())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        problems,
        [
            "HTTPRoute shop/bad: spec.rules[0].filters[0].type = \"ResponseHeaderModifier\": a filter the mesh does not support",
            "HTTPRoute shop/weights: spec.rules[0].backendRefs[0].weight = \"-1\": negative",
        ]
    );
}
