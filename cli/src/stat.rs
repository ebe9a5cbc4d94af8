//! `meshctl stat` and `meshctl edges`: the controller's Stats API as tables, JSON or YAML.
//!
//! Also what the dashboard and the demo share with them: calling the API (the controller is
//! found and reached by [`crate::controller`]) and formatting rates, shares and latencies.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use mesh_proto::stats::stats_client::StatsClient;
use mesh_proto::stats::{
    Denial, Edge, EdgesRequest, EdgesResponse, EgressEdge, ResourceRef, ResourceSelector, StatsRow,
    SummaryRequest,
};
use serde_json::json;

use crate::GlobalArgs;
use crate::controller::{Controller, ControllerArgs, ControllerChannel};
use crate::output::Output;

/// How long one Stats call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the controller's Stats API.
pub async fn connect(controller: &Controller) -> anyhow::Result<StatsClient<ControllerChannel>> {
    Ok(StatsClient::new(
        controller.channel(Some(CALL_TIMEOUT)).await?,
    ))
}

/// A `Stats.Summary` call.
pub async fn summary(
    client: &mut StatsClient<ControllerChannel>,
    selector: ResourceSelector,
    window: Duration,
    from: Option<ResourceRef>,
) -> anyhow::Result<Vec<StatsRow>> {
    let request = SummaryRequest {
        selector: Some(selector),
        window: prost_types::Duration::try_from(window).ok(),
        from,
    };
    let response = client
        .summary(request)
        .await
        .map_err(|status| anyhow::anyhow!("Stats.Summary: {}", status.message()))?;
    Ok(response.into_inner().rows)
}

/// A `Stats.Edges` call: the edges, the policy denials and the traffic leaving the mesh.
pub async fn edges(
    client: &mut StatsClient<ControllerChannel>,
    selector: ResourceSelector,
    window: Duration,
) -> anyhow::Result<EdgesResponse> {
    let request = EdgesRequest {
        selector: Some(selector),
        window: prost_types::Duration::try_from(window).ok(),
    };
    let response = client
        .edges(request)
        .await
        .map_err(|status| anyhow::anyhow!("Stats.Edges: {}", status.message()))?
        .into_inner();
    Ok(response)
}

/// `meshctl stat`.
#[derive(Debug, Args)]
pub struct StatArgs {
    /// What to report on: deploy (default), workload, pod, ns, authority or route.
    #[arg(default_value = "deploy")]
    kind: String,
    /// One resource of that kind.
    name: Option<String>,
    /// Only the authorities or routes this resource calls, e.g. `deploy/web`.
    #[arg(long, value_name = "KIND/NAME")]
    from: Option<String>,
    /// The window rates and percentiles cover, e.g. 30s or 5m.
    #[arg(short = 't', long, default_value = "1m", value_parser = crate::demo::parse_duration)]
    window: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    controller: ControllerArgs,
}

/// `meshctl edges`.
#[derive(Debug, Args)]
pub struct EdgesArgs {
    /// One resource whose edges to show (its name; any workload kind).
    name: Option<String>,
    /// The window rates cover, e.g. 30s or 5m.
    #[arg(short = 't', long, default_value = "1m", value_parser = crate::demo::parse_duration)]
    window: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    controller: ControllerArgs,
}

/// The canonical kind name for the API, from what people type.
pub fn normalize_kind(kind: &str) -> anyhow::Result<&'static str> {
    Ok(match kind.trim().to_ascii_lowercase().as_str() {
        "deploy" | "deployment" | "deployments" => "deployment",
        "workload" | "workloads" | "wl" => "workload",
        "sts" | "statefulset" | "statefulsets" => "statefulset",
        "ds" | "daemonset" | "daemonsets" => "daemonset",
        "po" | "pod" | "pods" => "pod",
        "ns" | "namespace" | "namespaces" => "namespace",
        "au" | "authority" | "authorities" => "authority",
        "rt" | "route" | "routes" => "route",
        other => bail!(
            "unknown kind {other:?}: use deploy, workload, statefulset, daemonset, pod, ns, authority or route"
        ),
    })
}

/// `kind/name` (or `kind name`) as a resource in `namespace`.
fn parse_from(text: &str, namespace: Option<&str>) -> anyhow::Result<ResourceRef> {
    let (kind, name) = text
        .split_once('/')
        .with_context(|| format!("--from {text:?}: use KIND/NAME, e.g. deploy/web"))?;
    let kind = normalize_kind(kind)?;
    let namespace = namespace.unwrap_or(if kind == "namespace" { name } else { "default" });
    Ok(ResourceRef {
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// Runs `meshctl stat`; `namespace` is the global `-n` (absent: every namespace).
pub fn run_stat(args: StatArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let namespace = global.namespace.as_deref();
    let controller = args.controller.resolve(global)?;
    let kind = normalize_kind(&args.kind)?;
    let from = args
        .from
        .as_deref()
        .map(|text| parse_from(text, namespace))
        .transpose()?;
    let selector = ResourceSelector {
        kind: kind.to_owned(),
        namespace: namespace.unwrap_or_default().to_owned(),
        name: args.name.clone().unwrap_or_default(),
    };
    let rows = block_on(async {
        let mut client = connect(&controller).await?;
        summary(&mut client, selector, args.window, from).await
    })?;
    match args.output {
        Output::Json | Output::Yaml => args
            .output
            .print(&rows.iter().map(row_json).collect::<Vec<_>>())?,
        Output::Table if rows.is_empty() => {
            eprintln!(
                "no {kind} with that name{}",
                match namespace {
                    Some(ns) => format!(" in namespace {ns}"),
                    None => String::new(),
                }
            );
        }
        Output::Table if kind == "route" => print!("{}", route_table(&rows)),
        Output::Table => print!("{}", stat_table(&rows)),
    }
    Ok(())
}

/// Runs `meshctl edges`.
pub fn run_edges(args: EdgesArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let namespace = global.namespace.as_deref();
    let controller = args.controller.resolve(global)?;
    let selector = ResourceSelector {
        kind: "workload".to_owned(),
        namespace: namespace.unwrap_or_default().to_owned(),
        name: args.name.clone().unwrap_or_default(),
    };
    let EdgesResponse {
        edges: edge_list,
        denials,
        egress,
    } = block_on(async {
        let mut client = connect(&controller).await?;
        edges(&mut client, selector, args.window).await
    })?;
    match args.output {
        Output::Json | Output::Yaml => args.output.print(&json!({
            "edges": edge_list.iter().map(edge_json).collect::<Vec<_>>(),
            "denials": denials.iter().map(denial_json).collect::<Vec<_>>(),
            "egress": egress.iter().map(egress_json).collect::<Vec<_>>(),
        }))?,
        Output::Table => {
            if edge_list.is_empty() {
                eprintln!("no traffic between workloads in the last {:?}", args.window);
            } else {
                print!("{}", edges_table(&edge_list));
            }
            if !denials.is_empty() {
                println!();
                println!("Refused by policy:");
                print!("{}", denials_table(&denials));
            }
            if !egress.is_empty() {
                println!();
                println!("Leaving the mesh:");
                print!("{}", egress_table(&egress));
            }
        }
    }
    Ok(())
}

/// Runs a future on a small runtime of its own: these commands make a call or two.
fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

/// Whether a row saw any request in its window.
pub fn has_traffic(row: &StatsRow) -> bool {
    row.requests
        .is_some_and(|r| r.success_count + r.failure_count > 0 || r.request_rate > 0.0)
}

/// `95.12%`, or `-` when there is nothing to divide.
pub fn percent(share: f64, known: bool) -> String {
    if known {
        format!("{:.2}%", share * 100.0)
    } else {
        "-".to_owned()
    }
}

/// `12.3` requests per second.
pub fn rate(rps: f64) -> String {
    format!("{rps:.1}")
}

/// `3ms`, `1.5ms`, `120ms`, `2.5s`, or `-`.
pub fn latency(ms: f64, known: bool) -> String {
    if !known {
        return "-".to_owned();
    }
    if ms >= 1000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else if ms >= 10.0 || ms == ms.trunc() {
        format!("{ms:.0}ms")
    } else {
        format!("{ms:.1}ms")
    }
}

/// The table of `meshctl stat` (and the demo's summary).
pub fn stat_table(rows: &[StatsRow]) -> String {
    let mut lines = vec![
        [
            "NAMESPACE",
            "NAME",
            "MESHED",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
            "MTLS",
            "TCP_CONN",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for row in rows {
        let resource = row.resource.clone().unwrap_or_default();
        let requests = row.requests.unwrap_or_default();
        let tcp = row.tcp.unwrap_or_default();
        let known = has_traffic(row);
        let pods = if resource.kind == "authority" || resource.kind == "route" {
            "-".to_owned()
        } else {
            format!("{}/{}", row.meshed_pods, row.running_pods)
        };
        let name = match resource.kind.as_str() {
            "deployment" | "authority" | "namespace" | "pod" | "route" => resource.name,
            kind => format!("{kind}/{}", resource.name),
        };
        lines.push(vec![
            if resource.namespace.is_empty() {
                "-".to_owned()
            } else {
                resource.namespace
            },
            name,
            pods,
            percent(requests.success_rate, known),
            if known {
                rate(requests.request_rate)
            } else {
                "-".to_owned()
            },
            latency(requests.latency_ms_p50, known),
            latency(requests.latency_ms_p95, known),
            latency(requests.latency_ms_p99, known),
            percent(requests.mtls_share, known),
            tcp.open_connections.to_string(),
        ]);
    }
    render_table(&lines)
}

/// The table of `meshctl stat route`: what each route's callers saw, retries included.
/// `RETRIES` is retries per second; a route whose retries approach its RPS is failing behind
/// them.
pub fn route_table(rows: &[StatsRow]) -> String {
    let mut lines = vec![
        [
            "NAMESPACE",
            "ROUTE",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
            "RETRIES",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for row in rows {
        let resource = row.resource.clone().unwrap_or_default();
        let requests = row.requests.unwrap_or_default();
        let known = has_traffic(row);
        let answered = requests.success_count + requests.failure_count > 0;
        lines.push(vec![
            or_dash(&resource.namespace),
            resource.name,
            percent(requests.success_rate, answered),
            if known {
                rate(requests.request_rate)
            } else {
                "-".to_owned()
            },
            latency(requests.latency_ms_p50, answered),
            latency(requests.latency_ms_p95, answered),
            latency(requests.latency_ms_p99, answered),
            if known {
                rate(requests.retry_rate)
            } else {
                "-".to_owned()
            },
        ]);
    }
    render_table(&lines)
}

/// `kind/name` of a resource, namespaced when it has one.
pub fn resource_name(resource: Option<&ResourceRef>) -> String {
    match resource {
        None => "-".to_owned(),
        Some(r) if r.kind == "authority" => r.name.clone(),
        Some(r) if r.namespace.is_empty() => format!("{}/{}", short_kind(&r.kind), r.name),
        Some(r) => format!("{}/{}/{}", r.namespace, short_kind(&r.kind), r.name),
    }
}

/// `deploy` for deployment, as kubectl abbreviates.
fn short_kind(kind: &str) -> &str {
    match kind {
        "deployment" => "deploy",
        "statefulset" => "sts",
        "daemonset" => "ds",
        "namespace" => "ns",
        "pod" => "po",
        other => other,
    }
}

/// The table of `meshctl edges`.
pub fn edges_table(edges: &[Edge]) -> String {
    let mut lines = vec![
        [
            "SRC",
            "DST",
            "CLIENT_ID",
            "SERVER_ID",
            "RPS",
            "SUCCESS",
            "MSG",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for edge in edges {
        lines.push(vec![
            resource_name(edge.source.as_ref()),
            resource_name(edge.destination.as_ref()),
            or_dash(&short_identity(&edge.client_identity)),
            or_dash(&short_identity(&edge.server_identity)),
            rate(edge.request_rate),
            percent(edge.success_rate, edge.request_rate > 0.0),
            edge.no_identity_reason.clone(),
        ]);
    }
    render_table(&lines)
}

/// The table of policy denials.
pub fn denials_table(denials: &[Denial]) -> String {
    let mut lines = vec![
        [
            "DST",
            "POLICY",
            "CLIENT_ID",
            "PROTOCOL",
            "COUNT",
            "PER_SECOND",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for denial in denials {
        lines.push(vec![
            resource_name(denial.destination.as_ref()),
            denial.policy.clone(),
            if denial.client_identity.is_empty() {
                "(unauthenticated)".to_owned()
            } else {
                short_identity(&denial.client_identity)
            },
            denial.protocol.clone(),
            denial.count.to_string(),
            format!("{:.2}", denial.rate),
        ]);
    }
    render_table(&lines)
}

/// The table of traffic leaving the mesh.
pub fn egress_table(egress: &[EgressEdge]) -> String {
    let mut lines = vec![
        [
            "SRC",
            "NETWORK",
            "AUTHORITY",
            "PROTOCOL",
            "ALLOWED",
            "DENIED",
            "PER_SECOND",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for edge in egress {
        lines.push(vec![
            resource_name(edge.source.as_ref()),
            edge.network.clone(),
            edge.authority.clone(),
            edge.protocol.clone(),
            edge.allowed.to_string(),
            edge.denied.to_string(),
            format!("{:.2}", edge.rate),
        ]);
    }
    render_table(&lines)
}

/// A SPIFFE ID without its scheme and trust domain when they are the usual ones:
/// `spiffe://cluster.local/ns/demo/sa/web` reads `ns/demo/sa/web`.
pub fn short_identity(id: &str) -> String {
    id.strip_prefix("spiffe://cluster.local/")
        .unwrap_or(id)
        .to_owned()
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// Columns padded to their widest cell, two spaces apart.
pub fn render_table(lines: &[Vec<String>]) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .filter_map(|l| l.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (c, cell) in line.iter().enumerate() {
            if c + 1 == line.len() {
                text.push_str(cell);
            } else {
                let pad = widths[c].saturating_sub(cell.chars().count());
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn resource_json(resource: Option<&ResourceRef>) -> serde_json::Value {
    match resource {
        Some(r) => json!({ "kind": r.kind, "namespace": r.namespace, "name": r.name }),
        None => serde_json::Value::Null,
    }
}

/// A row as JSON (numbers as numbers, for scripts).
pub fn row_json(row: &StatsRow) -> serde_json::Value {
    let requests = row.requests.unwrap_or_default();
    let tcp = row.tcp.unwrap_or_default();
    json!({
        "resource": resource_json(row.resource.as_ref()),
        "meshed_pods": row.meshed_pods,
        "running_pods": row.running_pods,
        "success_count": requests.success_count,
        "failure_count": requests.failure_count,
        "request_rate": requests.request_rate,
        "success_rate": requests.success_rate,
        "latency_ms_p50": requests.latency_ms_p50,
        "latency_ms_p95": requests.latency_ms_p95,
        "latency_ms_p99": requests.latency_ms_p99,
        "mtls_share": requests.mtls_share,
        "retry_rate": requests.retry_rate,
        "retry_count": requests.retry_count,
        "tcp_open_connections": tcp.open_connections,
        "tcp_read_bytes_rate": tcp.read_bytes_rate,
        "tcp_write_bytes_rate": tcp.write_bytes_rate,
    })
}

fn edge_json(edge: &Edge) -> serde_json::Value {
    json!({
        "source": resource_json(edge.source.as_ref()),
        "destination": resource_json(edge.destination.as_ref()),
        "client_identity": edge.client_identity,
        "server_identity": edge.server_identity,
        "no_identity_reason": edge.no_identity_reason,
        "request_rate": edge.request_rate,
        "success_rate": edge.success_rate,
    })
}

fn denial_json(denial: &Denial) -> serde_json::Value {
    json!({
        "destination": resource_json(denial.destination.as_ref()),
        "policy": denial.policy,
        "client_identity": denial.client_identity,
        "protocol": denial.protocol,
        "count": denial.count,
        "rate": denial.rate,
    })
}

fn egress_json(edge: &EgressEdge) -> serde_json::Value {
    json!({
        "source": resource_json(edge.source.as_ref()),
        "network": edge.network,
        "authority": edge.authority,
        "protocol": edge.protocol,
        "allowed": edge.allowed,
        "denied": edge.denied,
        "rate": edge.rate,
    })
}

#[cfg(test)]
mod tests {
    use mesh_proto::stats::{RequestStats, TcpStats};

    use super::*;

    fn row(name: &str, rps: f64, success: f64, p50: f64, mtls: f64) -> StatsRow {
        StatsRow {
            resource: Some(ResourceRef {
                kind: "deployment".into(),
                namespace: "demo".into(),
                name: name.into(),
            }),
            meshed_pods: 1,
            running_pods: 1,
            requests: Some(RequestStats {
                success_count: (rps * 60.0 * success) as u64,
                failure_count: (rps * 60.0 * (1.0 - success)) as u64,
                request_rate: rps,
                success_rate: success,
                latency_ms_p50: p50,
                latency_ms_p95: p50 * 2.0,
                latency_ms_p99: p50 * 3.0,
                mtls_share: mtls,
                ..Default::default()
            }),
            tcp: Some(TcpStats {
                open_connections: 2,
                ..TcpStats::default()
            }),
        }
    }

    #[test]
    fn the_stat_table_lines_up_and_marks_idle_rows() {
        let rows = vec![
            row("web", 10.0, 0.95, 35.0, 1.0),
            row("traffic", 0.0, 0.0, 0.0, 0.0),
        ];
        let table = stat_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE  NAME     MESHED  SUCCESS  RPS   LATENCY_P50  LATENCY_P95  LATENCY_P99  MTLS     TCP_CONN"
        );
        assert_eq!(
            lines[1],
            "demo       web      1/1     95.00%   10.0  35ms         70ms         105ms        100.00%  2"
        );
        assert_eq!(
            lines[2],
            "demo       traffic  1/1     -        -     -            -            -            -        2"
        );
    }

    #[test]
    fn the_route_table_shows_success_latency_and_retries() {
        let mut get_book = row(
            "books.demo.svc.cluster.local:8080/get-book",
            20.0,
            0.99,
            4.0,
            1.0,
        );
        get_book.resource = Some(ResourceRef {
            kind: "route".into(),
            namespace: "demo".into(),
            name: "books.demo.svc.cluster.local:8080/get-book".into(),
        });
        if let Some(requests) = get_book.requests.as_mut() {
            requests.retry_rate = 1.5;
        }
        let table = route_table(&[get_book]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "NAMESPACE  ROUTE                                       SUCCESS  RPS   LATENCY_P50  LATENCY_P95  LATENCY_P99  RETRIES",
                "demo       books.demo.svc.cluster.local:8080/get-book  99.00%   20.0  4ms          8ms          12ms         1.5",
            ]
        );
    }

    #[test]
    fn formats() {
        assert_eq!(latency(2.5, true), "2.5ms");
        assert_eq!(latency(3.0, true), "3ms");
        assert_eq!(latency(47.4, true), "47ms");
        assert_eq!(latency(2500.0, true), "2.5s");
        assert_eq!(latency(1.0, false), "-");
        assert_eq!(percent(0.9512, true), "95.12%");
        assert_eq!(
            short_identity("spiffe://cluster.local/ns/demo/sa/web"),
            "ns/demo/sa/web"
        );
        assert_eq!(
            short_identity("spiffe://other.org/ns/a/sa/b"),
            "spiffe://other.org/ns/a/sa/b"
        );
    }

    #[test]
    fn kinds_and_from_parse() {
        assert_eq!(normalize_kind("deploy").expect("known"), "deployment");
        assert_eq!(normalize_kind("NS").expect("known"), "namespace");
        assert!(normalize_kind("svc").is_err());
        let from = parse_from("deploy/web", Some("demo")).expect("valid");
        assert_eq!(
            (
                from.kind.as_str(),
                from.namespace.as_str(),
                from.name.as_str()
            ),
            ("deployment", "demo", "web")
        );
        assert!(parse_from("web", None).is_err());
    }

    #[test]
    fn edges_and_denials_tables() {
        let deploy = |name: &str| ResourceRef {
            kind: "deployment".into(),
            namespace: "demo".into(),
            name: name.into(),
        };
        let table = edges_table(&[Edge {
            source: Some(deploy("web")),
            destination: Some(deploy("books")),
            client_identity: "spiffe://cluster.local/ns/demo/sa/web".into(),
            server_identity: "spiffe://cluster.local/ns/demo/sa/books".into(),
            no_identity_reason: String::new(),
            request_rate: 10.0,
            success_rate: 0.95,
        }]);
        assert!(
            table.contains(
                "demo/deploy/web  demo/deploy/books  ns/demo/sa/web  ns/demo/sa/books  10.0  95.00%"
            ),
            "{table}"
        );
        let table = denials_table(&[Denial {
            destination: Some(deploy("archive")),
            policy: "default:deny".into(),
            client_identity: "spiffe://cluster.local/ns/demo/sa/traffic".into(),
            count: 30,
            rate: 1.0,
            protocol: "http".into(),
        }]);
        assert!(
            table.contains(
                "demo/deploy/archive  default:deny  ns/demo/sa/traffic  http      30     1.00"
            ),
            "{table}"
        );
    }
}
