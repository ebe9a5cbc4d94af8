use super::*;
use crate::file::parse_documents;
use mesh_proto::policy::backend;

const OUTSIDE: &str = "203.0.113.9:443";

fn network(namespace: &str, name: &str, policy: &str, networks: &str) -> String {
    format!(
        "apiVersion: policy.mesh.dev/v1alpha1\nkind: EgressNetwork\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{trafficPolicy: {policy}, networks: {networks}}}\n"
    )
}

fn parent(namespace: &str, name: &str) -> String {
    format!("{{group: policy.mesh.dev, kind: EgressNetwork, name: {name}, namespace: {namespace}}}")
}

fn http_route(namespace: &str, name: &str, parent: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{parentRefs: [{parent}], {spec}}}\n"
    )
}

fn inputs(documents: &[String]) -> PolicyInputs {
    PolicyInputs::from_objects(
        documents
            .iter()
            .flat_map(|d| parse_documents(d).expect("test YAML parses")),
    )
}

fn source(namespace: &str) -> WorkloadRef {
    WorkloadRef {
        namespace: namespace.to_owned(),
        ..WorkloadRef::default()
    }
}

/// `network policy routes tls tcp` in one line, or `none`.
fn show(inputs: &PolicyInputs, from: &str, settings: &OutboundSettings) -> String {
    let destination: SocketAddr = OUTSIDE.parse().expect("an address");
    let (policy, problems) = egress_policy(inputs, destination, &source(from), settings);
    let Some(policy) = policy else {
        return format!("none problems={}", problems.len());
    };
    let egress = policy.egress.expect("an egress policy has its Egress");
    let routes: Vec<String> = policy
        .routes
        .iter()
        .map(|r| {
            let backends: Vec<String> = r
                .backends
                .iter()
                .map(|b| match b.backend.as_ref().and_then(|b| b.kind.as_ref()) {
                    Some(backend::Kind::Authority(a)) => a.clone(),
                    Some(backend::Kind::Addr(a)) => SocketAddr::try_from(a)
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    None => "?".to_owned(),
                })
                .collect();
            format!("{}{:?}->{:?}", r.name, r.hostnames, backends)
        })
        .collect();
    format!(
        "{} {} routes={routes:?} tls={:?} tcp={} problems={}",
        if egress.network.is_empty() {
            "default"
        } else {
            &egress.network
        },
        if egress.traffic_policy == egress::TrafficPolicy::Deny as i32 {
            "Deny"
        } else {
            "Allow"
        },
        egress.tls_hosts,
        egress.tcp_allowed,
        problems.len()
    )
}

#[test]
fn the_most_specific_network_of_the_source_namespace_then_the_global_one_applies() {
    let settings = OutboundSettings::default();
    let everything = network("mesh-system", "everything", "Allow", "[]");
    let global_deny = network("mesh-system", "doc-net", "Deny", "[{cidr: 203.0.113.0/24}]");
    let wide = network("shop", "wide", "Allow", "[{cidr: 203.0.0.0/16}]");
    let narrow = network("shop", "narrow", "Deny", "[{cidr: 203.0.113.0/28}]");
    let excepted = network(
        "shop",
        "excepted",
        "Deny",
        "[{cidr: 203.0.113.0/29, except: [203.0.113.9]}]",
    );
    let cases: &[(&[&String], &str, &str)] = &[
        (&[], "shop", "none problems=0"),
        (&[&everything], "shop", "mesh-system/everything Allow"),
        // A CIDR beats a network without one.
        (
            &[&everything, &global_deny],
            "web",
            "mesh-system/doc-net Deny",
        ),
        // The source's own namespace comes first, however wide.
        (&[&global_deny, &wide], "shop", "shop/wide Allow"),
        (&[&global_deny, &wide], "web", "mesh-system/doc-net Deny"),
        // The longest prefix wins within a namespace.
        (&[&wide, &narrow], "shop", "shop/narrow Deny"),
        // An excepted address is not covered.
        (&[&wide, &excepted], "shop", "shop/wide Allow"),
    ];
    for (documents, from, want) in cases {
        let documents: Vec<String> = documents.iter().map(|d| (*d).clone()).collect();
        let got = show(&inputs(&documents), from, &settings);
        assert!(
            got.starts_with(want),
            "networks {documents:?} from {from}: got {got}, want {want}"
        );
    }
}

#[test]
fn the_mesh_wide_default_applies_where_no_network_covers() {
    let deny = OutboundSettings {
        egress: EgressSettings {
            default_policy: TrafficPolicy::Deny,
            ..EgressSettings::default()
        },
        ..OutboundSettings::default()
    };
    let elsewhere = network("shop", "elsewhere", "Allow", "[{cidr: 198.51.100.0/24}]");
    assert_eq!(
        show(&inputs(std::slice::from_ref(&elsewhere)), "shop", &deny),
        "default Deny routes=[] tls=[] tcp=false problems=0"
    );
    assert_eq!(
        show(&inputs(&[elsewhere]), "shop", &OutboundSettings::default()),
        "none problems=0"
    );
}

#[test]
fn routes_attached_to_the_network_allow_by_host_port_and_server_name() {
    let settings = OutboundSettings::default();
    let net = network("shop", "external", "Deny", "[]");
    let to_origin = http_route(
        "shop",
        "api",
        &parent("shop", "external"),
        "hostnames: [API.example.com], rules: [{matches: [{path: {type: PathPrefix, value: /v1}}], \
         backendRefs: [{group: policy.mesh.dev, kind: EgressNetwork, name: external}]}]",
    );
    let redirected = http_route(
        "shop",
        "mirror-in",
        &parent("shop", "external"),
        "hostnames: ['*.internal.example'], rules: [{backendRefs: [{name: cache, port: 8080}]}]",
    );
    let other_port = http_route(
        "shop",
        "other-port",
        "{group: policy.mesh.dev, kind: EgressNetwork, name: external, port: 80}",
        "rules: [{}]",
    );
    let tls = format!(
        "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\n\
         metadata: {{name: tls, namespace: shop}}\n\
         spec: {{parentRefs: [{}], hostnames: [secure.example.com]}}\n",
        parent("shop", "external")
    );
    let tcp = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\n\
               metadata: {name: db, namespace: shop}\n\
               spec: {parentRefs: [{group: policy.mesh.dev, kind: EgressNetwork, name: external, port: 5432}]}\n"
        .to_owned();
    let any_port = tcp.replace(", port: 5432", "");
    let with_any_port = show(&inputs(&[net.clone(), any_port]), "shop", &settings);
    assert!(with_any_port.contains("tcp=true"), "{with_any_port}");
    let got = show(
        &inputs(&[net, to_origin, redirected, other_port, tls, tcp]),
        "shop",
        &settings,
    );
    assert_eq!(
        got,
        "shop/external Deny routes=[\"api[\\\"api.example.com\\\"]->[\\\"203.0.113.9:443\\\"]\", \
         \"mirror-in[\\\"*.internal.example\\\"]->[\\\"cache.shop.svc.cluster.local:8080\\\"]\"] \
         tls=[\"secure.example.com\"] tcp=false problems=0"
    );
}

#[test]
fn consumer_routes_replace_the_networks_own_for_their_namespace() {
    let settings = OutboundSettings::default();
    let global = network("mesh-system", "internet", "Deny", "[]");
    let own = http_route(
        "mesh-system",
        "everyone",
        &parent("mesh-system", "internet"),
        "hostnames: [public.example.com], rules: [{}]",
    );
    let consumer = http_route(
        "shop",
        "shop-only",
        &parent("mesh-system", "internet"),
        "hostnames: [payments.example.com], rules: [{}]",
    );
    let all = inputs(&[global, own, consumer]);
    let shop = show(&all, "shop", &settings);
    assert!(
        shop.contains(r#"shop-only[\"payments.example.com\"]"#),
        "{shop}"
    );
    assert!(!shop.contains("everyone"), "{shop}");
    let web = show(&all, "web", &settings);
    assert!(web.contains(r#"everyone[\"public.example.com\"]"#), "{web}");
}

#[test]
fn invalid_networks_and_routes_are_left_out_and_reported_by_field() {
    let settings = OutboundSettings::default();
    let bad_policy = network("shop", "typo", "Maybe", "[]");
    let bad_cidr = network("shop", "bad-cidr", "Deny", "[{cidr: 203.0.113.0/99}]");
    let good = network("shop", "good", "Deny", "[]");
    let bad_host = http_route(
        "shop",
        "bad-host",
        &parent("shop", "good"),
        "hostnames: ['api..example.com'], rules: [{}]",
    );
    let all = inputs(&[bad_policy, bad_cidr, good, bad_host]);
    // The invalid networks do not cover anything; the invalid route is left out.
    assert_eq!(
        show(&all, "shop", &settings),
        "shop/good Deny routes=[] tls=[] tcp=false problems=1"
    );
    let problems: Vec<String> = all_problems(&all, &settings)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        problems,
        [
            "EgressNetwork shop/bad-cidr: spec.networks[0].cidr = \"203.0.113.0/99\": not a CIDR or an IP",
            "EgressNetwork shop/typo: spec.trafficPolicy = \"Maybe\": not Allow or Deny",
            "HTTPRoute shop/bad-host: spec.hostnames[0] = \"api..example.com\": not a host name (a DNS name, or `*.` and one)",
        ]
    );
}

#[test]
fn service_and_pod_addresses_are_in_the_mesh() {
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: books, namespace: shop}\n\
                   spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n"
        .to_owned();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: books-1, namespace: shop}\n\
               spec: {containers: [{name: app}]}\nstatus: {podIP: 10.244.0.7}\n"
        .to_owned();
    let host_network =
        "apiVersion: v1\nkind: Pod\nmetadata: {name: agent, namespace: kube-system}\n\
                        spec: {hostNetwork: true, containers: [{name: agent}]}\n\
                        status: {podIP: 10.200.0.1}\n"
            .to_owned();
    let all = inputs(&[service, pod, host_network]);
    assert!(in_mesh(&all, "10.96.0.10".parse().expect("an IP")));
    assert!(in_mesh(&all, "10.244.0.7".parse().expect("an IP")));
    assert!(!in_mesh(&all, "203.0.113.9".parse().expect("an IP")));
    // A node's address, though a host-network pod reports it as its own.
    assert!(!in_mesh(&all, "10.200.0.1".parse().expect("an IP")));
}
