//! Table tests of the aggregation (windows in, rows out), and the whole path once: a fake
//! proxy admin server on 127.0.0.1:0, the index, the scraper and the gRPC service.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::stats::{Denial, Edge, EgressEdge, ResourceRef, StatsRow};

use super::aggregate::{self, FromFilter, Kind, Selector};
use super::exposition;
use super::sample::{DenialKey, Direction, Histogram, ProxySample, TrafficCounters, TrafficKey};
use super::store::{PodInfo, PodWindow};

const TD: &str = "spiffe://cluster.local/ns/demo/sa";

fn id(sa: &str) -> String {
    format!("{TD}/{sa}")
}

fn pod(name: &str, workload: &str, last: u8, meshed: bool) -> PodInfo {
    PodInfo::for_test(
        "demo",
        name,
        IpAddr::from([10, 77, 0, last]),
        ("deployment", workload),
        meshed.then(|| id(workload)),
    )
}

/// A histogram with `counts[i]` observations in the i-th of the bounds 10, 20, 50, +Inf.
fn latency(counts: [f64; 4]) -> Histogram {
    let bounds = [10.0, 20.0, 50.0, f64::INFINITY];
    let mut cumulative = 0.0;
    Histogram {
        buckets: bounds
            .iter()
            .zip(counts)
            .map(|(le, count)| {
                cumulative += count;
                (*le, cumulative)
            })
            .collect(),
    }
}

struct Traffic {
    direction: Direction,
    authority: &'static str,
    target_addr: &'static str,
    tls: bool,
    client_id: String,
    server_id: String,
    successes: f64,
    failures: f64,
    latency: [f64; 4],
}

fn inbound(authority: &'static str, client: Option<&str>, ok: f64, failed: f64) -> Traffic {
    Traffic {
        direction: Direction::Inbound,
        authority,
        target_addr: "127.0.0.1:8080",
        tls: client.is_some(),
        client_id: client.map(id).unwrap_or_default(),
        server_id: String::new(),
        successes: ok,
        failures: failed,
        latency: [ok + failed, 0.0, 0.0, 0.0],
    }
}

fn outbound(
    authority: &'static str,
    target_addr: &'static str,
    ids: Option<(&str, &str)>,
    ok: f64,
    failed: f64,
) -> Traffic {
    Traffic {
        direction: Direction::Outbound,
        authority,
        target_addr,
        tls: ids.is_some(),
        client_id: ids.map(|(c, _)| id(c)).unwrap_or_default(),
        server_id: ids.map(|(_, s)| id(s)).unwrap_or_default(),
        successes: ok,
        failures: failed,
        latency: [0.0, ok + failed, 0.0, 0.0],
    }
}

fn window(pod: PodInfo, seconds: f64, traffic: Vec<Traffic>) -> PodWindow {
    let mut delta = ProxySample::default();
    for t in traffic {
        let key = TrafficKey {
            direction: t.direction,
            authority: Arc::from(t.authority),
            target_addr: Arc::from(t.target_addr),
            tls: t.tls,
            client_id: Arc::from(t.client_id.as_str()),
            server_id: Arc::from(t.server_id.as_str()),
        };
        delta.traffic.insert(
            key,
            TrafficCounters {
                successes: t.successes,
                failures: t.failures,
                latency: latency(t.latency),
                ..TrafficCounters::default()
            },
        );
    }
    PodWindow {
        pod,
        seconds,
        delta,
    }
}

/// The demo's shape: traffic -> web -> books, web -> authors; an unmeshed pod.
fn demo() -> Vec<PodWindow> {
    vec![
        window(
            pod("traffic-1", "traffic", 2, true),
            10.0,
            vec![outbound(
                "web.demo.svc.cluster.local:8080",
                "10.77.0.3:4143",
                Some(("traffic", "web")),
                100.0,
                0.0,
            )],
        ),
        window(
            pod("web-1", "web", 3, true),
            10.0,
            vec![
                inbound(
                    "web.demo.svc.cluster.local:8080",
                    Some("traffic"),
                    95.0,
                    5.0,
                ),
                outbound(
                    "books.demo.svc.cluster.local:8080",
                    "10.77.0.4:4143",
                    Some(("web", "books")),
                    95.0,
                    5.0,
                ),
                outbound(
                    "authors.demo.svc.cluster.local:9090",
                    "10.77.0.5:4143",
                    Some(("web", "authors")),
                    100.0,
                    0.0,
                ),
            ],
        ),
        window(
            pod("books-1", "books", 4, true),
            10.0,
            vec![inbound(
                "books.demo.svc.cluster.local:8080",
                Some("web"),
                95.0,
                5.0,
            )],
        ),
        window(
            pod("authors-1", "authors", 5, true),
            10.0,
            vec![
                // Half of authors' traffic came in without mTLS.
                inbound(
                    "authors.demo.svc.cluster.local:9090",
                    Some("web"),
                    50.0,
                    0.0,
                ),
                inbound("authors.demo.svc.cluster.local:9090", None, 50.0, 0.0),
            ],
        ),
        window(pod("legacy-1", "legacy", 6, false), 0.0, vec![]),
    ]
}

fn selector(kind: &str, namespace: Option<&str>, name: Option<&str>) -> Selector {
    Selector {
        kind: Kind::parse(kind).expect("a valid kind"),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    }
}

/// A row reduced to what the tables compare: (kind, namespace, name, running pods, meshed
/// pods, rps, success rate, mTLS share).
type Brief = (String, String, String, u32, u32, f64, f64, f64);

fn brief(row: &StatsRow) -> Brief {
    let resource = row.resource.clone().unwrap_or_default();
    let requests = row.requests.unwrap_or_default();
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    (
        resource.kind,
        resource.namespace,
        resource.name,
        row.running_pods,
        row.meshed_pods,
        round(requests.request_rate),
        round(requests.success_rate),
        round(requests.mtls_share),
    )
}

fn b(kind: &str, ns: &str, name: &str, pods: (u32, u32), rps: f64, sr: f64, mtls: f64) -> Brief {
    (
        kind.into(),
        ns.into(),
        name.into(),
        pods.0,
        pods.1,
        rps,
        sr,
        mtls,
    )
}

#[test]
fn summary_rows_per_kind() {
    let pods = demo();
    let cases: Vec<(Selector, Option<FromFilter>, Vec<Brief>)> = vec![
        (
            selector("deploy", None, None),
            None,
            vec![
                b("deployment", "demo", "authors", (1, 1), 10.0, 1.0, 0.5),
                b("deployment", "demo", "books", (1, 1), 10.0, 0.95, 1.0),
                b("deployment", "demo", "legacy", (1, 0), 0.0, 0.0, 0.0),
                b("deployment", "demo", "traffic", (1, 1), 0.0, 0.0, 0.0),
                b("deployment", "demo", "web", (1, 1), 10.0, 0.95, 1.0),
            ],
        ),
        (
            selector("deployment", Some("demo"), Some("web")),
            None,
            vec![b("deployment", "demo", "web", (1, 1), 10.0, 0.95, 1.0)],
        ),
        (selector("deployment", Some("other"), None), None, vec![]),
        (
            selector("po", None, Some("books-1")),
            None,
            vec![b("pod", "demo", "books-1", (1, 1), 10.0, 0.95, 1.0)],
        ),
        (
            selector("ns", None, None),
            None,
            vec![b("namespace", "", "demo", (5, 4), 30.0, 0.967, 0.833)],
        ),
        (
            selector("authority", None, None),
            None,
            vec![
                b(
                    "authority",
                    "demo",
                    "authors.demo.svc.cluster.local:9090",
                    (0, 0),
                    10.0,
                    1.0,
                    1.0,
                ),
                b(
                    "authority",
                    "demo",
                    "books.demo.svc.cluster.local:8080",
                    (0, 0),
                    10.0,
                    0.95,
                    1.0,
                ),
                b(
                    "authority",
                    "demo",
                    "web.demo.svc.cluster.local:8080",
                    (0, 0),
                    10.0,
                    1.0,
                    1.0,
                ),
            ],
        ),
        (
            // Drill-in: only what web calls.
            selector("authority", Some("demo"), None),
            Some(FromFilter {
                kind: "deployment".into(),
                namespace: "demo".into(),
                name: "web".into(),
            }),
            vec![
                b(
                    "authority",
                    "demo",
                    "authors.demo.svc.cluster.local:9090",
                    (0, 0),
                    10.0,
                    1.0,
                    1.0,
                ),
                b(
                    "authority",
                    "demo",
                    "books.demo.svc.cluster.local:8080",
                    (0, 0),
                    10.0,
                    0.95,
                    1.0,
                ),
            ],
        ),
    ];
    for (selector, from, want) in cases {
        let rows = aggregate::summary(&pods, &selector, from.as_ref());
        let got: Vec<Brief> = rows.iter().map(brief).collect();
        assert_eq!(got, want, "{selector:?} from {from:?}");
    }
}

#[test]
fn latency_percentiles_come_from_the_merged_bucket_deltas() {
    let pods = demo();
    let rows = aggregate::summary(&pods, &selector("deploy", None, Some("web")), None);
    let requests = rows[0].requests.unwrap_or_default();
    // All 100 inbound observations are in the first bucket (0-10 ms): interpolated.
    assert_eq!(requests.latency_ms_p50, 5.0);
    assert_eq!(requests.latency_ms_p99, 9.9);
    let rows = aggregate::summary(
        &pods,
        &selector("authority", None, Some("books.demo.svc.cluster.local:8080")),
        None,
    );
    let requests = rows[0].requests.unwrap_or_default();
    // Outbound observations are in the 10-20 ms bucket.
    assert_eq!(requests.latency_ms_p50, 15.0);
}

#[test]
fn histogram_quantiles() {
    let cases: Vec<([f64; 4], f64, Option<f64>)> = vec![
        ([0.0, 0.0, 0.0, 0.0], 0.5, None),
        ([10.0, 0.0, 0.0, 0.0], 0.5, Some(5.0)),
        ([5.0, 5.0, 0.0, 0.0], 0.5, Some(10.0)),
        ([5.0, 5.0, 0.0, 0.0], 0.75, Some(15.0)),
        ([0.0, 0.0, 10.0, 0.0], 0.9, Some(47.0)),
        // Beyond the last finite bound: the largest bound known.
        ([0.0, 0.0, 0.0, 10.0], 0.5, Some(50.0)),
        ([9.0, 0.0, 0.0, 1.0], 0.99, Some(50.0)),
    ];
    for (counts, q, want) in cases {
        let got = latency(counts).quantile(q);
        let got = got.map(|v| (v * 1000.0).round() / 1000.0);
        assert_eq!(got, want, "{counts:?} q={q}");
    }
}

#[test]
fn edges_join_clients_to_servers_by_endpoint_ip() {
    let mut pods = demo();
    // web also calls something outside the mesh, and an unmeshed pod without mTLS.
    pods[1].delta.traffic.insert(
        TrafficKey {
            direction: Direction::Outbound,
            authority: Arc::from("example.com:80"),
            target_addr: Arc::from("93.184.216.34:80"),
            tls: false,
            client_id: Arc::from(""),
            server_id: Arc::from(""),
        },
        TrafficCounters {
            successes: 10.0,
            ..TrafficCounters::default()
        },
    );
    pods[1].delta.traffic.insert(
        TrafficKey {
            direction: Direction::Outbound,
            authority: Arc::from("legacy.demo.svc.cluster.local:80"),
            target_addr: Arc::from("10.77.0.6:80"),
            tls: false,
            client_id: Arc::from(""),
            server_id: Arc::from(""),
        },
        TrafficCounters {
            successes: 5.0,
            failures: 5.0,
            ..TrafficCounters::default()
        },
    );
    let deploy = |name: &str| ResourceRef {
        kind: "deployment".into(),
        namespace: "demo".into(),
        name: name.into(),
    };
    let edge = |src: &str,
                dst: ResourceRef,
                ids: Option<(&str, &str)>,
                reason: &str,
                rps: f64,
                sr: f64| Edge {
        source: Some(deploy(src)),
        destination: Some(dst),
        client_identity: ids.map(|(c, _)| id(c)).unwrap_or_default(),
        server_identity: ids.map(|(_, s)| id(s)).unwrap_or_default(),
        no_identity_reason: reason.into(),
        request_rate: rps,
        success_rate: sr,
    };
    let all = vec![
        edge(
            "traffic",
            deploy("web"),
            Some(("traffic", "web")),
            "",
            10.0,
            1.0,
        ),
        edge(
            "web",
            ResourceRef {
                kind: "authority".into(),
                namespace: String::new(),
                name: "example.com:80".into(),
            },
            None,
            "destination is not a pod of the mesh",
            1.0,
            1.0,
        ),
        edge(
            "web",
            deploy("authors"),
            Some(("web", "authors")),
            "",
            10.0,
            1.0,
        ),
        edge(
            "web",
            deploy("books"),
            Some(("web", "books")),
            "",
            10.0,
            0.95,
        ),
        edge(
            "web",
            deploy("legacy"),
            None,
            "destination not meshed",
            1.0,
            0.5,
        ),
    ];
    let cases: Vec<(Selector, Vec<Edge>)> = vec![
        (selector("deploy", None, None), all.clone()),
        (
            selector("deploy", Some("demo"), Some("books")),
            vec![all[3].clone()],
        ),
        (
            selector("deploy", Some("demo"), Some("traffic")),
            vec![all[0].clone()],
        ),
        (selector("deploy", Some("elsewhere"), None), vec![]),
    ];
    for (selector, want) in cases {
        assert_eq!(aggregate::edges(&pods, &selector), want, "{selector:?}");
    }
}

#[test]
fn denials_name_the_server_the_policy_and_the_client() {
    let mut pods = demo();
    let deny = |policy: &str, client: &str, protocol: &'static str| DenialKey {
        policy: Arc::from(policy),
        target_addr: Arc::from("127.0.0.1:8080"),
        client_id: Arc::from(client),
        protocol,
    };
    pods[3].delta.denials = BTreeMap::from([
        (deny("default:all-authenticated", "", "http"), 20.0),
        (deny("default:all-authenticated", "", "tcp"), 0.0),
    ]);
    pods[2].delta.denials = BTreeMap::from([(deny("default:deny", &id("traffic"), "http"), 10.0)]);
    let got = aggregate::denials(&pods, &selector("deploy", None, None));
    let want = vec![
        Denial {
            destination: Some(ResourceRef {
                kind: "deployment".into(),
                namespace: "demo".into(),
                name: "authors".into(),
            }),
            policy: "default:all-authenticated".into(),
            client_identity: String::new(),
            count: 20,
            rate: 2.0,
            protocol: "http".into(),
        },
        Denial {
            destination: Some(ResourceRef {
                kind: "deployment".into(),
                namespace: "demo".into(),
                name: "books".into(),
            }),
            policy: "default:deny".into(),
            client_identity: id("traffic"),
            count: 10,
            rate: 1.0,
            protocol: "http".into(),
        },
    ];
    assert_eq!(got, want);
    assert_eq!(
        aggregate::denials(&pods, &selector("deploy", Some("demo"), Some("books"))),
        vec![want[1].clone()]
    );
}

#[test]
fn egress_edges_name_the_client_the_network_and_the_host_from_two_scrapes() {
    let scrape = |allowed: u32, denied: u32| {
        let series = |authority: &str, protocol: &str, decision: &str, count: u32| {
            format!(
                "outbound_egress_total{{network=\"demo/external\",authority=\"{authority}\",\
                 protocol=\"{protocol}\",decision=\"{decision}\"}} {count}\n"
            )
        };
        let text = series("api.example.com:443", "tls", "allowed", allowed)
            + &series("evil.example.com:443", "tls", "denied", denied)
            + "# EOF\n";
        ProxySample::from_exposition(&exposition::parse(&text))
    };
    let mut pods = demo();
    // web (pods[1]) over 10 s: 20 allowed, 5 denied.
    pods[1].delta = scrape(25, 7).delta(&scrape(5, 2));
    let got = aggregate::egress(&pods, &selector("deploy", None, None));
    let web = Some(ResourceRef {
        kind: "deployment".into(),
        namespace: "demo".into(),
        name: "web".into(),
    });
    let want = vec![
        EgressEdge {
            source: web.clone(),
            network: "demo/external".into(),
            authority: "api.example.com:443".into(),
            protocol: "tls".into(),
            allowed: 20,
            denied: 0,
            rate: 2.0,
        },
        EgressEdge {
            source: web,
            network: "demo/external".into(),
            authority: "evil.example.com:443".into(),
            protocol: "tls".into(),
            allowed: 0,
            denied: 5,
            rate: 0.5,
        },
    ];
    assert_eq!(got, want);
    assert!(aggregate::egress(&pods, &selector("deploy", Some("demo"), Some("books"))).is_empty());
}

/// A proxy's route series after `requests` requests, `failures` of them failed, `retries`
/// retried and `refused` refused by the budget; latencies land in the 10 ms bucket but for the
/// slowest 5% at 500 ms.
fn route_exposition(requests: u32, failures: u32, retries: u32, refused: u32) -> String {
    let labels = "authority=\"books.demo.svc.cluster.local:8080\",route=\"get-book\"";
    let slow = requests / 20;
    let mut text = format!(
        "route_request_total{{{labels}}} {requests}\n\
         route_response_total{{{labels},classification=\"success\"}} {}\n\
         route_response_total{{{labels},classification=\"failure\"}} {failures}\n\
         route_retry_total{{{labels},reason=\"retried\"}} {retries}\n\
         route_retry_total{{{labels},reason=\"budget exhausted\"}} {refused}\n",
        requests - failures
    );
    for (le, count) in [
        ("5.0", 0),
        ("10.0", requests - slow),
        ("500.0", requests),
        ("+Inf", requests),
    ] {
        text.push_str(&format!(
            "route_response_latency_ms_bucket{{le=\"{le}\",{labels}}} {count}\n"
        ));
    }
    text
}

#[test]
fn route_rows_report_rate_success_latency_and_retries() {
    let earlier = ProxySample::from_exposition(&exposition::parse(&route_exposition(100, 0, 0, 0)));
    let later = ProxySample::from_exposition(&exposition::parse(&route_exposition(600, 25, 40, 7)));
    let mut pods = demo();
    pods[1].delta.routes = later.delta(&earlier).routes;
    let rows = aggregate::summary(&pods, &selector("route", None, None), None);
    let got: Vec<Brief> = rows.iter().map(brief).collect();
    // 500 requests over the 10 s window, 25 of them failed.
    assert_eq!(
        got,
        vec![b(
            "route",
            "demo",
            "books.demo.svc.cluster.local:8080/get-book",
            (0, 0),
            50.0,
            0.95,
            0.0
        )]
    );
    let requests = rows[0].requests.unwrap_or_default();
    assert_eq!((requests.success_count, requests.failure_count), (475, 25));
    assert_eq!(requests.retry_count, 40, "budget refusals are not retries");
    assert!((requests.retry_rate - 4.0).abs() < 1e-9, "{requests:?}");
    assert!(
        requests.latency_ms_p50 > 5.0 && requests.latency_ms_p50 <= 10.0,
        "{requests:?}"
    );
    assert!(
        requests.latency_ms_p99 > 10.0 && requests.latency_ms_p99 <= 500.0,
        "{requests:?}"
    );
}

#[test]
fn kinds_parse_as_people_type_them() {
    for (text, want) in [
        ("deploy", Some(Kind::Workload(Some("deployment".into())))),
        (
            "Deployments",
            Some(Kind::Workload(Some("deployment".into()))),
        ),
        ("workload", Some(Kind::Workload(None))),
        ("sts", Some(Kind::Workload(Some("statefulset".into())))),
        ("po", Some(Kind::Pod)),
        ("ns", Some(Kind::Namespace)),
        ("authority", Some(Kind::Authority)),
        ("rt", Some(Kind::Route)),
        ("service", None),
    ] {
        assert_eq!(Kind::parse(text).ok(), want, "{text}");
    }
}

/// What a proxy's `/metrics` looks like (the labels of `mesh-proxy`'s metrics.rs).
fn exposition_text(inbound_ok: u64, inbound_failed: u64, denied: u64) -> String {
    let target = r#"direction="inbound",authority="web.demo.svc.cluster.local:8080",target_addr="127.0.0.1:8080",tls="true",client_id="spiffe://cluster.local/ns/demo/sa/traffic",server_id="spiffe://cluster.local/ns/demo/sa/web""#;
    let mut text = String::from("# HELP request Requests received.\n# TYPE request counter\n");
    text.push_str(&format!(
        "request_total{{{target}}} {}\n",
        inbound_ok + inbound_failed
    ));
    text.push_str(&format!(
        "response_total{{{target},status_code=\"200\",classification=\"success\"}} {inbound_ok}\n"
    ));
    text.push_str(&format!(
        "response_total{{{target},status_code=\"500\",classification=\"failure\"}} {inbound_failed}\n"
    ));
    for (status, class, count) in [
        ("200", "success", inbound_ok),
        ("500", "failure", inbound_failed),
    ] {
        for (le, share) in [
            ("1.0", 0),
            ("5.0", count / 2),
            ("10.0", count),
            ("+Inf", count),
        ] {
            text.push_str(&format!(
                "response_latency_ms_bucket{{{target},status_code=\"{status}\",classification=\"{class}\",le=\"{le}\"}} {share}\n"
            ));
        }
        text.push_str(&format!(
            "response_latency_ms_sum{{{target},status_code=\"{status}\",classification=\"{class}\"}} 1.0\n"
        ));
    }
    text.push_str(&format!("tcp_open_connections{{{target}}} 2\n"));
    text.push_str(&format!(
        "inbound_http_authz_deny_total{{policy=\"default:deny\",target_addr=\"127.0.0.1:8080\",client_id=\"\"}} {denied}\n"
    ));
    text.push_str("process_resident_memory_bytes 1234\n# EOF\n");
    text
}

#[test]
fn a_scrape_reduces_to_our_series_and_two_give_a_delta() {
    let first = ProxySample::from_exposition(&exposition::parse(&exposition_text(10, 2, 1)));
    let second = ProxySample::from_exposition(&exposition::parse(&exposition_text(30, 4, 4)));
    assert_eq!(first.traffic.len(), 1);
    let counters = first.traffic.values().next().expect("one target");
    assert_eq!((counters.successes, counters.failures), (10.0, 2.0));
    assert_eq!(counters.latency.count(), 12.0, "statuses are merged");
    assert_eq!(counters.tcp_open_connections, 2.0);
    let delta = second.delta(&first);
    let counters = delta.traffic.values().next().expect("one target");
    assert_eq!((counters.successes, counters.failures), (20.0, 2.0));
    assert_eq!(counters.latency.count(), 22.0);
    assert_eq!(
        delta.denials.values().copied().collect::<Vec<_>>(),
        vec![3.0]
    );
    // A restarted proxy: its counters start again, so the newer values are the delta.
    let restarted = first.delta(&second);
    let counters = restarted.traffic.values().next().expect("one target");
    assert_eq!((counters.successes, counters.failures), (10.0, 2.0));
    assert_eq!(counters.latency.count(), 12.0);
}

/// The whole path: the index knows a meshed pod on 127.0.0.1, a fake admin server serves its
/// metrics, the scraper reads them twice, and `Stats.Summary`/`Edges` answer over gRPC.
#[tokio::test]
async fn the_service_serves_what_the_scraper_read_from_a_proxy() {
    use mesh_proto::stats::stats_client::StatsClient;
    use mesh_proto::stats::{EdgesRequest, ResourceSelector, SummaryRequest};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // A fake admin server: every GET gets the next exposition (counters growing).
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake admin port");
    let admin_port = admin.local_addr().expect("bound").port();
    tokio::spawn(async move {
        let mut served = 0u64;
        loop {
            let Ok((mut stream, _)) = admin.accept().await else {
                return;
            };
            served += 1;
            let body = exposition_text(10 * served, served, served);
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });

    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f8-bbbbb
  namespace: demo
  labels: {pod-template-hash: 7d9f8}
  annotations: {mesh.dev/inject: enabled}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f8, uid: u1, controller: true}]
spec:
  serviceAccountName: web
  containers: [{name: app}]
status:
  podIP: 127.0.0.1
  conditions: [{type: Ready, status: "True"}]
"#;
    let (mut index, snapshots) = crate::index::Index::new(crate::index::IndexOptions {
        meshed_rule: crate::meta::MeshedRule::InjectAnnotation,
        ..crate::index::IndexOptions::default()
    });
    index.replace_all(crate::file::parse_documents(yaml).expect("the fixture parses"));
    index.publish().expect("the first load publishes");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let service = super::spawn(
        snapshots,
        super::StatsConfig {
            interval: Duration::from_millis(100),
            admin_port,
            ..super::StatsConfig::default()
        },
        crate::access::ObserverAccess::Open,
        stop_rx.clone(),
    );
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the gRPC port");
    let grpc_addr = grpc.local_addr().expect("bound");
    let mut stopped = stop_rx.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc),
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            ),
    );
    let mut client = StatsClient::connect(format!("http://{grpc_addr}"))
        .await
        .expect("connect to the Stats service");

    // Bounded: a few scrapes happen within a second or two.
    let mut row = None;
    for _ in 0..50 {
        let rows = client
            .summary(SummaryRequest {
                selector: Some(ResourceSelector {
                    kind: "deployment".into(),
                    ..ResourceSelector::default()
                }),
                window: None,
                from: None,
            })
            .await
            .expect("Summary answers")
            .into_inner()
            .rows;
        if let Some(found) = rows
            .into_iter()
            .find(|r| r.requests.is_some_and(|q| q.request_rate > 0.0))
        {
            row = Some(found);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = row.expect("a row with traffic within 5 s");
    let resource = row.resource.clone().unwrap_or_default();
    assert_eq!(
        (resource.kind.as_str(), resource.name.as_str()),
        ("deployment", "web")
    );
    let requests = row.requests.unwrap_or_default();
    assert!(
        (requests.success_rate - 10.0 / 11.0).abs() < 0.01,
        "{requests:?}"
    );
    assert_eq!(requests.mtls_share, 1.0);
    assert_eq!((row.meshed_pods, row.running_pods), (1, 1));

    let edges = client
        .edges(EdgesRequest::default())
        .await
        .expect("Edges answers")
        .into_inner();
    assert!(edges.edges.is_empty(), "no outbound traffic, no edges");
    let denial = edges.denials.first().expect("the denials are reported");
    assert_eq!(denial.policy, "default:deny");
    assert_eq!(
        denial.destination.as_ref().map(|d| d.name.as_str()),
        Some("web")
    );

    let error = client
        .summary(SummaryRequest {
            selector: Some(ResourceSelector {
                kind: "services".into(),
                ..ResourceSelector::default()
            }),
            window: None,
            from: None,
        })
        .await
        .expect_err("an unknown kind is refused");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    let _ = stop_tx.send(true);
}
