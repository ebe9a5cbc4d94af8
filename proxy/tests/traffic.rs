//! Traffic management through a real outbound proxy driven by a (scripted) controller's
//! outbound policies: splits, header routing, retries within a budget, timeouts, circuit
//! breaking, consistent hashing, fault injection, filters and live policy changes.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::policy::{self, filter, header_match, path_match};
use support::outbound::{ScriptedOutbound, millis, route, to};
use support::*;
use tokio_util::sync::CancellationToken;

const BOOKS: &str = "books.shop.svc.cluster.local:8080";
const STABLE: &str = "books-stable.shop.svc.cluster.local:8080";
const CANARY: &str = "books-canary.shop.svc.cluster.local:8080";

struct Mesh {
    destination: ScriptedDestination,
    outbound: ScriptedOutbound,
    proxy: mesh_proxy::app::Running,
    _stop: CancellationToken,
}

impl Mesh {
    async fn new() -> Self {
        let stop = CancellationToken::new();
        let destination = ScriptedDestination::default();
        let outbound = ScriptedOutbound::default();
        let url = destination
            .serve_with(Some(outbound.clone()), stop.clone())
            .await;
        let proxy = proxy(Some(&url)).await;
        Self {
            destination,
            outbound,
            proxy,
            _stop: stop,
        }
    }

    fn service(&self, authority: &str, backends: &[&Backend]) {
        self.destination
            .set(authority, backends.iter().map(|b| plain(b.addr)).collect());
    }

    fn service_addrs(&self, authority: &str, addrs: &[SocketAddr]) {
        self.destination
            .set(authority, addrs.iter().map(|a| plain(*a)).collect());
    }

    async fn client(&self) -> ProxyClient {
        ProxyClient::connect(&self.proxy).await
    }
}

fn plan(routes: Vec<policy::Route>) -> policy::OutboundPolicy {
    support::outbound::plan(BOOKS, routes)
}

async fn count_backends(client: &mut ProxyClient, n: usize, path: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (status, backend, body) = client.get(&format!("http://{BOOKS}{path}"), &[]).await;
        assert_eq!(status, 200, "{body}");
        *seen.entry(backend).or_insert(0) += 1;
    }
    seen
}

#[tokio::test]
async fn a_90_10_split_lands_within_three_points() {
    let mesh = Mesh::new().await;
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    mesh.service(STABLE, &[&stable]);
    mesh.service(CANARY, &[&canary]);
    mesh.service(BOOKS, &[&stable]);
    mesh.outbound.set(
        BOOKS,
        plan(vec![route("split", vec![to(STABLE, 90), to(CANARY, 10)])]),
    );
    let mut client = mesh.client().await;
    let seen = count_backends(&mut client, 2000, "/").await;
    let canary_share = seen.get("canary").copied().unwrap_or(0) as f64 / 2000.0;
    assert!(
        (0.07..=0.13).contains(&canary_share),
        "canary got {canary_share}: {seen:?}"
    );
    let (_, text) = admin_get(&mesh.proxy, "/metrics").await;
    assert_eq!(
        metric(&text, "route_request_total", &["route=\"split\""]),
        2000.0
    );
    assert_eq!(
        metric(
            &text,
            "route_response_latency_ms_count",
            &[&format!("authority=\"{BOOKS}\""), "route=\"split\""]
        ),
        2000.0,
        "every routed request has its latency observed"
    );
}

#[tokio::test]
async fn a_header_match_sends_only_matching_requests_to_the_canary() {
    let mesh = Mesh::new().await;
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    mesh.service(STABLE, &[&stable]);
    mesh.service(CANARY, &[&canary]);
    mesh.service(BOOKS, &[&stable]);
    let mut canary_route = route("canary", vec![to(CANARY, 1)]);
    canary_route.matches = vec![policy::RouteMatch {
        headers: vec![policy::HeaderMatch {
            name: "x-canary".into(),
            value: Some(header_match::Value::Exact("yes".into())),
        }],
        ..Default::default()
    }];
    mesh.outbound.set(
        BOOKS,
        plan(vec![canary_route, route("rest", vec![to(STABLE, 1)])]),
    );
    let mut client = mesh.client().await;
    for _ in 0..50 {
        let (_, backend, _) = client
            .get(&format!("http://{BOOKS}/"), &[("x-canary", "yes")])
            .await;
        assert_eq!(backend, "canary");
        let (_, backend, _) = client.get(&format!("http://{BOOKS}/"), &[]).await;
        assert_eq!(backend, "stable");
    }
}

fn retrying(limit: u32, ratio: f32) -> policy::RetryPolicy {
    support::outbound::retrying(&["5xx"], limit, ratio, 1)
}

#[tokio::test]
async fn retries_hide_a_flaky_backend_and_the_budget_caps_them() {
    let mesh = Mesh::new().await;
    let flaky = Backend::start("flaky").await;
    mesh.service(BOOKS, &[&flaky]);
    let mut policy = plan(vec![route("all", vec![])]);
    // Three failures in ten answers need 3 retries per 7 requests: a 0.5 budget holds.
    policy.retry = Some(retrying(3, 0.5));
    mesh.outbound.set(BOOKS, policy.clone());
    let mut client = mesh.client().await;
    // 30% of the backend's answers fail, three in a row at most.
    for i in 0..100 {
        let (status, _, body) = client
            .get(&format!("http://{BOOKS}/flaky?fail=3"), &[])
            .await;
        assert_eq!(status, 200, "request {i} failed despite retries: {body}");
    }

    // A backend that always fails: retries stop at the budget, not at 3 x requests.
    let failing = Backend::start("failing").await;
    let failing_authority = "failing.shop.svc.cluster.local:8080";
    mesh.service(failing_authority, &[&failing]);
    let mut failing_policy = policy;
    failing_policy.service = failing_authority.into();
    failing_policy.default_backends = vec![to(failing_authority, 1)];
    failing_policy.routes = vec![route("broken", vec![])];
    failing_policy.retry = Some(retrying(3, 0.2));
    mesh.outbound.set(failing_authority, failing_policy);
    for _ in 0..200 {
        let (status, _, _) = client
            .get(&format!("http://{failing_authority}/status/500"), &[])
            .await;
        assert_eq!(status, 500);
    }
    let (_, text) = admin_get(&mesh.proxy, "/metrics").await;
    let retried = metric(
        &text,
        "route_retry_total",
        &["route=\"broken\"", "reason=\"retried\""],
    );
    let refused = metric(
        &text,
        "route_retry_total",
        &["route=\"broken\"", "reason=\"budget exhausted\""],
    );
    // 10 s x 1/s + 0.2 x 200 requests = 50 retries at most; without a budget it would be 600.
    assert!(retried <= 50.0, "{retried} retries");
    assert!(refused >= 100.0, "{refused} refusals");
}

#[tokio::test]
async fn a_hung_backend_trips_the_request_timeout() {
    let mesh = Mesh::new().await;
    let slow = Backend::start("slow").await;
    mesh.service(BOOKS, &[&slow]);
    let mut policy = plan(vec![route("all", vec![])]);
    policy.timeouts = Some(policy::Timeouts {
        request: millis(300),
        response: None,
        idle: None,
    });
    mesh.outbound.set(BOOKS, policy);
    let mut client = mesh.client().await;
    let started = std::time::Instant::now();
    let (status, _, body) = client
        .get(&format!("http://{BOOKS}/slow?ms=5000"), &[])
        .await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timeout"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_after_consecutive_failures() {
    let mesh = Mesh::new().await;
    let healthy = Backend::start("healthy").await;
    let failing = Backend::start("failing").await;
    mesh.service(BOOKS, &[&healthy, &failing]);
    let mut policy = plan(vec![route("all", vec![])]);
    policy.failure_accrual = Some(policy::FailureAccrual {
        consecutive_failures: 3,
        min_backoff: millis(60_000),
        max_backoff: millis(60_000),
    });
    policy.balancer = Some(policy::Balancer {
        kind: policy::balancer::Kind::RoundRobin as i32,
        ..Default::default()
    });
    mesh.outbound.set(BOOKS, policy);
    let mut client = mesh.client().await;
    let mut failures = 0;
    for _ in 0..40 {
        let (status, _, _) = client.get(&format!("http://{BOOKS}/"), &[]).await;
        if status != 200 {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "ejected after 3 consecutive failures");
    let (_, text) = admin_get(&mesh.proxy, "/metrics").await;
    assert_eq!(metric(&text, "endpoint_ejection_total", &[]), 1.0);
}

#[tokio::test]
async fn a_refused_endpoint_is_ejected_at_once_then_restored() {
    let mesh = Mesh::new().await;
    let healthy = Backend::start("healthy").await;
    // An address with nothing listening: connections are refused.
    let dead = loopback().await;
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    mesh.service_addrs(BOOKS, &[healthy.addr, dead_addr]);
    // No failure accrual in the plan: a refused connection ejects all the same.
    let mut policy = plan(vec![route("all", vec![])]);
    policy.balancer = Some(policy::Balancer {
        kind: policy::balancer::Kind::RoundRobin as i32,
        ..Default::default()
    });
    mesh.outbound.set(BOOKS, policy);
    let mut client = mesh.client().await;
    let mut failures = 0;
    for _ in 0..40 {
        let (status, _, _) = client.get(&format!("http://{BOOKS}/"), &[]).await;
        if status != 200 {
            failures += 1;
        }
    }
    // The one request that met the refused connection went to the other endpoint.
    assert_eq!(failures, 0, "requests failed");
    let (_, text) = admin_get(&mesh.proxy, "/metrics").await;
    assert_eq!(
        metric(&text, "endpoint_ejection_total", &[]),
        1.0,
        "ejected at the first refused connection"
    );
    assert_eq!(
        metric(&text, "route_retry_total", &["reason=\"connect failure\""]),
        1.0,
        "{text}"
    );

    // The endpoint comes back on the same address; after the backoff a probe restores it.
    let revived = tokio::net::TcpListener::bind(dead_addr)
        .await
        .expect("rebind the dead address");
    let revived_backend = Backend::serve("revived", revived).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let seen = count_backends(&mut client, 20, "/").await;
    assert!(seen.get("revived").copied().unwrap_or(0) >= 5, "{seen:?}");
    drop(revived_backend);
}

#[tokio::test]
async fn every_endpoint_ejected_fails_fast_with_a_clear_error() {
    let mesh = Mesh::new().await;
    let dead = loopback().await;
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    mesh.service_addrs(BOOKS, &[dead_addr]);
    let mut client = mesh.client().await;
    assert_eq!(client.get(&format!("http://{BOOKS}/"), &[]).await.0, 502);
    let (status, _, body) = client.get(&format!("http://{BOOKS}/"), &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("ejected"), "{body}");
}

#[tokio::test]
async fn consistent_hashing_keeps_each_key_on_one_endpoint() {
    let mesh = Mesh::new().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    mesh.service(BOOKS, &[&a, &b, &c]);
    let mut policy = plan(vec![route("all", vec![])]);
    policy.balancer = Some(policy::Balancer {
        kind: policy::balancer::Kind::ConsistentHash as i32,
        hash_key: Some(policy::balancer::HashKey {
            kind: Some(policy::balancer::hash_key::Kind::Header("x-user".into())),
        }),
        ewma_decay: None,
    });
    mesh.outbound.set(BOOKS, policy);
    let mut client = mesh.client().await;
    let mut owners = HashMap::new();
    for round in 0..5 {
        for user in 0..20 {
            let user = format!("user-{user}");
            let (_, backend, _) = client
                .get(&format!("http://{BOOKS}/"), &[("x-user", &user)])
                .await;
            let owner = owners
                .entry(user.clone())
                .or_insert_with(|| backend.clone());
            assert_eq!(*owner, backend, "{user} moved in round {round}");
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(
        distinct.len() >= 2,
        "keys spread over endpoints: {owners:?}"
    );
}

#[tokio::test]
async fn a_policy_change_under_load_drops_no_request() {
    let mesh = Mesh::new().await;
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    mesh.service(STABLE, &[&stable]);
    mesh.service(CANARY, &[&canary]);
    mesh.service(BOOKS, &[&stable]);
    mesh.outbound
        .set(BOOKS, plan(vec![route("v1", vec![to(STABLE, 1)])]));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut client = mesh.client().await;
        workers.push(tokio::spawn(async move {
            let mut seen = HashMap::new();
            for _ in 0..150 {
                let (status, backend, body) = client.get(&format!("http://{BOOKS}/"), &[]).await;
                assert_eq!(status, 200, "{body}");
                *seen.entry(backend).or_insert(0) += 1;
            }
            seen
        }));
    }
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let target = if i % 2 == 0 { CANARY } else { STABLE };
        mesh.outbound
            .set(BOOKS, plan(vec![route("flip", vec![to(target, 1)])]));
    }
    let mut total = HashMap::new();
    for worker in workers {
        for (backend, n) in worker.await.expect("worker") {
            *total.entry(backend).or_insert(0) += n;
        }
    }
    assert_eq!(total.values().sum::<usize>(), 600);
    assert!(total.contains_key("canary"), "{total:?}");
}

#[tokio::test]
async fn an_invalid_policy_leaves_the_last_valid_one_in_force() {
    let mesh = Mesh::new().await;
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    mesh.service(STABLE, &[&stable]);
    mesh.service(CANARY, &[&canary]);
    mesh.service(BOOKS, &[&stable]);
    mesh.outbound
        .set(BOOKS, plan(vec![route("to-canary", vec![to(CANARY, 1)])]));
    let mut client = mesh.client().await;
    assert_eq!(
        client.get(&format!("http://{BOOKS}/"), &[]).await.1,
        "canary"
    );
    let mut broken = route("broken", vec![to(STABLE, 1)]);
    broken.matches = vec![policy::RouteMatch {
        path: Some(policy::PathMatch {
            kind: Some(path_match::Kind::Regex("([".into())),
        }),
        ..Default::default()
    }];
    mesh.outbound.set(BOOKS, plan(vec![broken]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..10 {
        assert_eq!(
            client.get(&format!("http://{BOOKS}/"), &[]).await.1,
            "canary"
        );
    }
}

#[tokio::test]
async fn filters_inject_faults_modify_headers_rewrite_and_redirect() {
    let mesh = Mesh::new().await;
    let backend = Backend::start("books").await;
    mesh.service(BOOKS, &[&backend]);
    let prefix = |p: &str| {
        vec![policy::RouteMatch {
            path: Some(policy::PathMatch {
                kind: Some(path_match::Kind::Prefix(p.into())),
            }),
            ..Default::default()
        }]
    };
    let mut abort = route("abort", vec![]);
    abort.matches = prefix("/abort");
    abort.filters = vec![policy::Filter {
        kind: Some(filter::Kind::FaultInjection(policy::FaultInjection {
            abort_percent: 100,
            abort_status: 418,
            delay_percent: 0,
            delay: None,
        })),
    }];
    let mut rewrite = route("rewrite", vec![]);
    rewrite.matches = prefix("/old");
    rewrite.filters = vec![
        policy::Filter {
            kind: Some(filter::Kind::UrlRewrite(policy::UrlRewrite {
                hostname: String::new(),
                path: Some(policy::PathModifier {
                    kind: Some(policy::path_modifier::Kind::Prefix("/new".into())),
                }),
            })),
        },
        policy::Filter {
            kind: Some(filter::Kind::RequestHeaderModifier(
                policy::HeaderModifier {
                    add: vec![],
                    set: vec![policy::Header {
                        name: "host".into(),
                        value: "rewritten.example:8080".into(),
                    }],
                    remove: vec![],
                },
            )),
        },
    ];
    let mut redirect = route("redirect", vec![]);
    redirect.matches = prefix("/moved");
    redirect.filters = vec![policy::Filter {
        kind: Some(filter::Kind::Redirect(policy::Redirect {
            scheme: String::new(),
            hostname: "elsewhere.example".into(),
            path: None,
            port: 0,
            status: 301,
        })),
    }];
    mesh.outbound
        .set(BOOKS, plan(vec![abort, rewrite, redirect]));
    let mut client = mesh.client().await;
    let (status, _, body) = client.get(&format!("http://{BOOKS}/abort/x"), &[]).await;
    assert_eq!(status, 418, "{body}");
    let (status, _, body) = client.get(&format!("http://{BOOKS}/old/page"), &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("path=/new/page"), "{body}");
    assert!(body.contains("host=rewritten.example:8080"), "{body}");
    let (status, _, _) = client.get(&format!("http://{BOOKS}/moved/here"), &[]).await;
    assert_eq!(status, 301);
    let (_, text) = admin_get(&mesh.proxy, "/metrics").await;
    assert_eq!(
        metric(&text, "route_fault_injection_total", &["route=\"abort\""]),
        1.0
    );
}

#[tokio::test]
async fn a_backend_at_its_concurrency_limit_sheds_further_requests_with_503() {
    let mesh = Mesh::new().await;
    let slow = Backend::start("slow").await;
    mesh.service(BOOKS, &[&slow]);
    let mut policy = plan(vec![route("all", vec![])]);
    policy.max_in_flight_per_backend = 2;
    // Overflow must not be retried: the layer sits above retries.
    policy.retry = Some(retrying(3, 1.0));
    mesh.outbound.set(BOOKS, policy);

    // Two requests the backend holds for a while fill the backend's two slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = mesh.client().await;
        held.push(tokio::spawn(async move {
            client
                .get(&format!("http://{BOOKS}/slow?ms=4000"), &[])
                .await
        }));
    }
    // Wait (bounded) until both hold their slots: then a third request is refused at once.
    let in_flight = [
        &format!("authority=\"{BOOKS}\"") as &str,
        &format!("backend=\"{BOOKS}\""),
    ];
    let mut full = false;
    for _ in 0..300 {
        let (_, text) = admin_get(&mesh.proxy, "/metrics").await;
        if metric(&text, "backend_in_flight", &in_flight) == 2.0 {
            full = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(full, "the two slow requests are in flight");
    let mut probe = mesh.client().await;
    let (status, _, body) = probe.get(&format!("http://{BOOKS}/"), &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("concurrency limit: ") && body.contains("2 requests in flight"),
        "{body}"
    );
    // The refusal names itself in `mesh-error`, as every error the proxy makes does.
    let headers = curl(&[
        "--dump-header",
        "-",
        "--output",
        "/dev/null",
        "--proxy",
        &format!("http://{}", mesh.proxy.outbound_addr),
        &format!("http://{BOOKS}/"),
    ])
    .await
    .to_ascii_lowercase();
    assert!(
        headers.starts_with("http/1.1 503") && headers.contains("mesh-error: concurrency limit: "),
        "{headers}"
    );
    for request in held {
        let (status, backend, body) = request.await.expect("held request");
        assert_eq!((status, backend.as_str()), (200, "slow"), "{body}");
    }
    // The slots are free again once the responses are in.
    let (status, _, body) = probe.get(&format!("http://{BOOKS}/"), &[]).await;
    assert_eq!(status, 200, "{body}");

    let (_, text) = admin_get(&mesh.proxy, "/metrics").await;
    assert_eq!(metric(&text, "backend_in_flight", &in_flight), 0.0);
    assert_eq!(
        metric(
            &text,
            "backend_concurrency_overflow_total",
            &[
                &format!("authority=\"{BOOKS}\""),
                &format!("backend=\"{BOOKS}\"")
            ]
        ),
        2.0,
        "the probe and curl were refused"
    );
    assert_eq!(
        metric(&text, "route_retry_total", &["route=\"all\""]),
        0.0,
        "an overflow is not retried"
    );
}

/// The backends answering `n` sequential requests, each on a new client connection.
async fn count_backends_on_new_connections(mesh: &Mesh, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let mut client = mesh.client().await;
        for (backend, count) in count_backends(&mut client, 1, "/").await {
            *seen.entry(backend).or_insert(0) += count;
        }
    }
    seen
}

#[tokio::test]
async fn new_connections_one_at_a_time_reach_both_of_two_equal_replicas() {
    // The test: 100 sequential new-connection requests, 2 identical replicas, the
    // default balancer: each gets at least 20.
    let mesh = Mesh::new().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    mesh.service(BOOKS, &[&a, &b]);
    let seen = count_backends_on_new_connections(&mesh, 100).await;
    for name in ["a", "b"] {
        let share = seen.get(name).copied().unwrap_or(0);
        assert!(share >= 20, "{name} got {share} of 100: {seen:?}");
    }
}

#[tokio::test]
async fn a_ten_times_slower_replica_still_gets_some_but_under_a_tenth() {
    // Two replicas answer in about 5 ms, the third in 50: latency-aware balancing sends it
    // little, and still now and then, so it is measured again and may recover.
    let mesh = Mesh::new().await;
    let a = Backend::start_answering_after("a", Duration::from_millis(5)).await;
    let b = Backend::start_answering_after("b", Duration::from_millis(5)).await;
    let slow = Backend::start_answering_after("slow", Duration::from_millis(50)).await;
    mesh.service(BOOKS, &[&a, &b, &slow]);
    let seen = count_backends_on_new_connections(&mesh, 100).await;
    let slow_share = seen.get("slow").copied().unwrap_or(0);
    assert!(
        (1..10).contains(&slow_share),
        "the slow replica got {slow_share} of 100: {seen:?}"
    );
}

#[tokio::test]
async fn one_client_one_request_at_a_time_reaches_both_replicas() {
    // As a new user tries it: a Service of two identical replicas, one client, sequential
    // requests, the default balancer.
    let mesh = Mesh::new().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    mesh.service(BOOKS, &[&a, &b]);
    let mut client = mesh.client().await;
    let seen = count_backends(&mut client, 100, "/").await;
    for name in ["a", "b"] {
        let share = seen.get(name).copied().unwrap_or(0);
        assert!(share >= 10, "{name} got {share} of 100: {seen:?}");
    }
}

/// Sends requests until one is answered by `backend` (at most 5 s), then `n` more, which must
/// all be.
async fn settles_on(client: &mut ProxyClient, backend: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, seen, _) = client.get(&format!("http://{BOOKS}/"), &[]).await;
        if seen == backend {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached {backend}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = count_backends(client, n, "/").await;
    assert_eq!(seen.get(backend).copied(), Some(n), "{seen:?}");
}

#[tokio::test]
async fn a_failover_route_sends_everything_to_the_first_backend_with_endpoints() {
    const REMOTE: &str = "books-east.shop.svc.cluster.local:8080";
    let mesh = Mesh::new().await;
    let local = Backend::start("local").await;
    let remote = Backend::start("remote").await;
    mesh.service(STABLE, &[&local]);
    mesh.service(REMOTE, &[&remote]);
    mesh.service(BOOKS, &[&local]);
    let mut failover = route("failover", vec![to(STABLE, 1), to(REMOTE, 1)]);
    failover.failover = true;
    mesh.outbound.set(BOOKS, plan(vec![failover]));
    let mut client = mesh.client().await;
    let seen = count_backends(&mut client, 50, "/").await;
    assert_eq!(seen.get("local").copied(), Some(50), "no split: {seen:?}");
    // The local endpoints are gone (scaled to zero, or every one failed): the remote cluster
    // takes over, and hands back when they return.
    mesh.service(STABLE, &[]);
    settles_on(&mut client, "remote", 50).await;
    mesh.service(STABLE, &[&local]);
    settles_on(&mut client, "local", 50).await;
}
