//! `meshctl tap` and `meshctl top`: live requests from the controller's `Tap` API, which
//! merges the proxies' own taps.
//!
//! A tap stream carries three events per request (start, response headers, end), possibly
//! from several proxies at once. [`Joiner`] pairs them into one [`Exchange`] per request;
//! `tap` prints each as it ends, `top` folds them into [`TopTable`] by method and path. The
//! dashboard's tap pane reads the same [`Exchange`]s. Everything here but the two `run_*`
//! functions is pure and tested below.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use mesh_proto::tap::tap_client::TapClient;
use mesh_proto::tap::tap_event::Event;
use mesh_proto::tap::{Direction, ObserveRequest, TapEvent, TapMatch};
use serde_json::json;

use crate::GlobalArgs;
use crate::controller::{Controller, ControllerArgs, ControllerChannel};
use crate::output::Output;
use crate::stat;

/// Requests a `top` asks for: it wants a picture, not a few lines.
const TOP_REQUESTS: u32 = 10_000;
/// How often `top` redraws on a terminal.
const TOP_REFRESH: Duration = Duration::from_secs(1);
/// Requests pending their end that a [`Joiner`] remembers; older ones are forgotten.
const MAX_PENDING: usize = 4096;

/// What to tap, shared by `tap` and `top`.
#[derive(Debug, Args)]
pub struct TapFilterArgs {
    /// What to watch: deploy/NAME, pod/NAME, ns/NAME (or any workload kind/NAME).
    target: String,
    /// Only requests whose path starts with this.
    #[arg(long, value_name = "PREFIX")]
    path: Option<String>,
    /// Only requests with this method.
    #[arg(long, value_name = "METHOD")]
    method: Option<String>,
    /// Only requests to this authority (host:port).
    #[arg(long, value_name = "AUTHORITY")]
    authority: Option<String>,
    /// How long to watch; the controller caps it (60s).
    #[arg(long, default_value = "30s", value_parser = crate::demo::parse_duration)]
    duration: Duration,
    #[command(flatten)]
    controller: ControllerArgs,
}

/// `meshctl tap`.
#[derive(Debug, Args)]
pub struct TapArgs {
    #[command(flatten)]
    filter: TapFilterArgs,
    /// Stop after this many requests.
    #[arg(long, default_value_t = 100)]
    max: u32,
    /// Output format: a line per request, or a JSON object per line.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// `meshctl top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    filter: TapFilterArgs,
    /// Output format: the table (redrawn every second on a terminal), or JSON at the end.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// The `match` of a tap of `target` (`kind/name`) in `namespace` (the global `-n`).
pub fn tap_match(
    target: &str,
    namespace: Option<&str>,
    path: Option<&str>,
    method: Option<&str>,
    authority: Option<&str>,
) -> anyhow::Result<TapMatch> {
    let (kind, name) = target.split_once('/').with_context(|| {
        format!("{target:?}: use KIND/NAME, e.g. deploy/web, pod/web-1, ns/demo")
    })?;
    if name.is_empty() {
        bail!("{target:?}: the name is missing after {kind}/");
    }
    let kind = stat::normalize_kind(kind)?;
    if matches!(kind, "authority" | "route") {
        bail!("{target:?}: tap watches workloads, pods or namespaces; use --authority or --path");
    }
    let short = match kind {
        "deployment" => "deploy",
        "namespace" => "ns",
        other => other,
    };
    let namespace = match kind {
        // The namespace's name is the target itself.
        "namespace" => String::new(),
        // Without -n a workload is looked up in every namespace.
        _ => namespace.unwrap_or_default().to_owned(),
    };
    Ok(TapMatch {
        namespace,
        workload: format!("{short}/{name}"),
        path_prefix: path.unwrap_or_default().to_owned(),
        method: method.unwrap_or_default().to_ascii_uppercase(),
        authority: authority.unwrap_or_default().to_owned(),
        direction: Direction::Unspecified as i32,
    })
}

/// One request, from its start to its end, as one proxy saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exchange {
    /// The proxy that saw it (`ns/pod`).
    pub reporter: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The method.
    pub method: String,
    /// The authority.
    pub authority: String,
    /// The path and query.
    pub path: String,
    /// The HTTP status, when a response started.
    pub status: Option<u32>,
    /// The gRPC status, when it was gRPC.
    pub grpc_status: Option<u32>,
    /// Why it failed without a response.
    pub error: String,
    /// From the request's start to its end.
    pub latency: Option<Duration>,
    /// The client's SPIFFE ID.
    pub source_identity: String,
    /// The server's SPIFFE ID.
    pub destination_identity: String,
}

impl Exchange {
    /// Whether the request succeeded: a response below 500 (and not a proxy's 403 or 429,
    /// which tap cannot tell from an application's, so those count as failures too, like the
    /// stats do for denials), a gRPC OK, no error.
    pub fn success(&self) -> bool {
        self.error.is_empty()
            && self.grpc_status.is_none_or(|code| code == 0)
            && self
                .status
                .is_some_and(|status| status < 500 && status != 403 && status != 429)
    }

    /// The status column: `200`, `200 grpc=14`, or `-` without a response.
    pub fn status_text(&self) -> String {
        match (self.status, self.grpc_status) {
            (Some(status), Some(grpc)) if grpc != 0 => format!("{status} grpc={grpc}"),
            (Some(status), _) => status.to_string(),
            (None, _) => "-".to_owned(),
        }
    }

    /// The latency column.
    pub fn latency_text(&self) -> String {
        match self.latency {
            Some(latency) => stat::latency(latency.as_secs_f64() * 1000.0, true),
            None => "-".to_owned(),
        }
    }

    /// The exchange as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "reporter": self.reporter,
            "direction": self.direction,
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "status": self.status,
            "grpc_status": self.grpc_status,
            "error": self.error,
            "latency_ms": self.latency.map(|l| l.as_secs_f64() * 1000.0),
            "success": self.success(),
            "source_identity": self.source_identity,
            "destination_identity": self.destination_identity,
        })
    }

    /// The exchange as one `tap` line.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} {} {} {}{} status={} latency={}",
            self.reporter,
            self.direction,
            self.method,
            self.authority,
            self.path,
            self.status_text(),
            self.latency_text(),
        );
        if !self.error.is_empty() {
            line.push_str(&format!(" error={:?}", self.error));
        }
        let identity = match self.direction {
            "inbound" => &self.source_identity,
            _ => &self.destination_identity,
        };
        if !identity.is_empty() {
            let side = if self.direction == "inbound" {
                "from"
            } else {
                "to"
            };
            line.push_str(&format!(" {side}={}", stat::short_identity(identity)));
        }
        line
    }
}

fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(*d).ok())
}

/// Pairs a tap stream's events into exchanges.
#[derive(Debug, Default)]
pub struct Joiner {
    pending: HashMap<(String, u64), Exchange>,
}

impl Joiner {
    /// Takes one event; returns the exchange it completes, if it is an end.
    pub fn push(&mut self, event: TapEvent) -> Option<Exchange> {
        let key = (event.reporter.clone(), event.stream_id);
        match event.event? {
            Event::RequestStart(start) => {
                if self.pending.len() >= MAX_PENDING {
                    // Ends that never came (a proxy stream cut short): forget them all rather
                    // than grow without bound.
                    self.pending.clear();
                }
                let direction = if event.direction == Direction::Outbound as i32 {
                    "outbound"
                } else {
                    "inbound"
                };
                self.pending.insert(
                    key,
                    Exchange {
                        reporter: event.reporter,
                        direction,
                        method: start.method,
                        authority: start.authority,
                        path: start.path,
                        source_identity: event.source_identity,
                        destination_identity: event.destination_identity,
                        ..Exchange::default()
                    },
                );
                None
            }
            Event::ResponseStart(response) => {
                if let Some(exchange) = self.pending.get_mut(&key) {
                    exchange.status = Some(response.http_status);
                    exchange.latency = duration(response.since_request_start.as_ref());
                    // Identities are known once the response names the hop.
                    if !event.source_identity.is_empty() {
                        exchange.source_identity = event.source_identity;
                    }
                    if !event.destination_identity.is_empty() {
                        exchange.destination_identity = event.destination_identity;
                    }
                }
                None
            }
            Event::End(end) => {
                let mut exchange = self.pending.remove(&key)?;
                exchange.grpc_status = end.grpc_status;
                exchange.error = end.error;
                exchange.latency = duration(end.since_request_start.as_ref()).or(exchange.latency);
                Some(exchange)
            }
        }
    }
}

/// One row of `top`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopRow {
    /// The method.
    pub method: String,
    /// The path, without its query.
    pub path: String,
    /// Requests seen.
    pub count: u64,
    /// Of which succeeded.
    pub successes: u64,
    /// The fastest.
    pub best: Option<Duration>,
    /// The slowest.
    pub worst: Option<Duration>,
    /// The latest.
    pub last: Option<Duration>,
}

/// `top`'s table: requests by method and path.
#[derive(Debug, Default)]
pub struct TopTable {
    rows: BTreeMap<(String, String), TopRow>,
}

impl TopTable {
    /// Counts one exchange.
    pub fn add(&mut self, exchange: &Exchange) {
        let path = exchange
            .path
            .split_once('?')
            .map_or(exchange.path.as_str(), |(path, _)| path)
            .to_owned();
        let row = self
            .rows
            .entry((exchange.method.clone(), path.clone()))
            .or_insert_with(|| TopRow {
                method: exchange.method.clone(),
                path,
                ..TopRow::default()
            });
        row.count += 1;
        if exchange.success() {
            row.successes += 1;
        }
        if let Some(latency) = exchange.latency {
            row.best = Some(row.best.map_or(latency, |best| best.min(latency)));
            row.worst = Some(row.worst.map_or(latency, |worst| worst.max(latency)));
            row.last = Some(latency);
        }
    }

    /// The rows, busiest first, then by path.
    pub fn rows(&self) -> Vec<&TopRow> {
        let mut rows: Vec<&TopRow> = self.rows.values().collect();
        rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.path.cmp(&b.path)));
        rows
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_owned(), |d| {
                stat::latency(d.as_secs_f64() * 1000.0, true)
            })
        };
        let mut lines = vec![
            [
                "METHOD", "PATH", "COUNT", "SUCCESS", "BEST", "WORST", "LAST",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        for row in self.rows() {
            lines.push(vec![
                row.method.clone(),
                row.path.clone(),
                row.count.to_string(),
                stat::percent(
                    row.successes as f64 / row.count.max(1) as f64,
                    row.count > 0,
                ),
                ms(row.best),
                ms(row.worst),
                ms(row.last),
            ]);
        }
        stat::render_table(&lines)
    }

    /// The table as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        serde_json::Value::Array(
            self.rows()
                .iter()
                .map(|row| {
                    json!({
                        "method": row.method,
                        "path": row.path,
                        "count": row.count,
                        "success_rate": row.successes as f64 / row.count.max(1) as f64,
                        "best_ms": ms(row.best),
                        "worst_ms": ms(row.worst),
                        "last_ms": ms(row.last),
                    })
                })
                .collect(),
        )
    }
}

/// Connects to the controller's Tap API. No call timeout: a tap streams for as long as the
/// controller allows.
pub async fn connect(controller: &Controller) -> anyhow::Result<TapClient<ControllerChannel>> {
    Ok(TapClient::new(controller.channel(None).await?))
}

/// Opens a tap; events arrive on the returned stream.
pub async fn observe(
    client: &mut TapClient<ControllerChannel>,
    filter: TapMatch,
    limit: u32,
    max_duration: Duration,
) -> anyhow::Result<tonic::Streaming<TapEvent>> {
    let request = ObserveRequest {
        r#match: Some(filter),
        limit,
        max_duration: prost_types::Duration::try_from(max_duration).ok(),
    };
    Ok(client
        .observe(request)
        .await
        .map_err(|status| anyhow::anyhow!("Tap.Observe: {}", status.message()))?
        .into_inner())
}

impl TapFilterArgs {
    fn tap_match(&self, namespace: Option<&str>) -> anyhow::Result<TapMatch> {
        tap_match(
            &self.target,
            namespace,
            self.path.as_deref(),
            self.method.as_deref(),
            self.authority.as_deref(),
        )
    }
}

/// Runs `meshctl tap`; `namespace` is the global `-n`.
pub fn run_tap(args: TapArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let namespace = global.namespace.as_deref();
    let filter = args.filter.tap_match(namespace)?;
    let controller = args.filter.controller.resolve(global)?;
    block_on(async {
        let mut client = connect(&controller).await?;
        let mut stream = observe(&mut client, filter, args.max, args.filter.duration).await?;
        let mut joiner = Joiner::default();
        let mut seen = 0u32;
        let mut stdout = std::io::stdout().lock();
        // Bounded: the controller ends the stream after --max requests or --duration.
        while let Some(event) = stream
            .message()
            .await
            .map_err(|status| anyhow::anyhow!("tap ended: {}", status.message()))?
        {
            let Some(exchange) = joiner.push(event) else {
                continue;
            };
            match args.output {
                Output::Json | Output::Yaml => {
                    writeln!(stdout, "{}", args.output.stream_item(&exchange.to_json())?)?
                }
                Output::Table => writeln!(stdout, "{}", exchange.line())?,
            }
            stdout.flush()?;
            seen += 1;
            if seen >= args.max {
                break;
            }
        }
        if seen == 0 {
            eprintln!("no request matched in {:?}", args.filter.duration);
        }
        Ok(())
    })
}

/// Runs `meshctl top`; `namespace` is the global `-n`.
pub fn run_top(args: TopArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let namespace = global.namespace.as_deref();
    let filter = args.filter.tap_match(namespace)?;
    let controller = args.filter.controller.resolve(global)?;
    let live = args.output == Output::Table && std::io::stdout().is_terminal();
    let table = block_on(async {
        let mut client = connect(&controller).await?;
        let mut stream = observe(&mut client, filter, TOP_REQUESTS, args.filter.duration).await?;
        let mut joiner = Joiner::default();
        let mut table = TopTable::default();
        let mut drawn = Instant::now();
        // Bounded: the controller ends the stream after its duration.
        while let Some(event) = stream
            .message()
            .await
            .map_err(|status| anyhow::anyhow!("tap ended: {}", status.message()))?
        {
            if let Some(exchange) = joiner.push(event) {
                table.add(&exchange);
            }
            if live && drawn.elapsed() >= TOP_REFRESH {
                drawn = Instant::now();
                // Clear the screen and home the cursor, then the fresh table.
                print!("\x1b[2J\x1b[H{}", table.render());
                std::io::stdout().flush()?;
            }
        }
        Ok(table)
    })?;
    match args.output {
        Output::Json | Output::Yaml => args.output.print(&table.to_json())?,
        Output::Table if table.rows().is_empty() => {
            eprintln!("no request matched in {:?}", args.filter.duration);
        }
        Output::Table => {
            if live {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", table.render());
        }
    }
    Ok(())
}

/// Runs a future on a small runtime of its own.
fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

#[cfg(test)]
mod tests {
    use mesh_proto::tap::{End, RequestStart, ResponseStart};

    use super::*;

    #[test]
    fn targets_become_matches() {
        let cases = [
            ("deploy/web", Some("demo"), Ok(("demo", "deploy/web"))),
            ("deployment/web", None, Ok(("", "deploy/web"))),
            ("pod/web-1", Some("demo"), Ok(("demo", "pod/web-1"))),
            ("ns/demo", Some("other"), Ok(("", "ns/demo"))),
            ("web", None, Err(())),
            ("deploy/", None, Err(())),
            ("route/x", None, Err(())),
            ("widget/x", None, Err(())),
        ];
        for (target, namespace, want) in cases {
            let got = tap_match(target, namespace, Some("/books"), Some("get"), None);
            match want {
                Ok((ns, workload)) => {
                    let got = got.expect(target);
                    assert_eq!(
                        (got.namespace.as_str(), got.workload.as_str()),
                        (ns, workload)
                    );
                    assert_eq!(got.path_prefix, "/books");
                    assert_eq!(got.method, "GET");
                }
                Err(()) => assert!(got.is_err(), "{target}"),
            }
        }
    }

    fn ms(n: u64) -> Option<prost_types::Duration> {
        prost_types::Duration::try_from(Duration::from_millis(n)).ok()
    }

    fn events(reporter: &str, id: u64, path: &str, status: u32, latency: u64) -> Vec<TapEvent> {
        let base = TapEvent {
            reporter: reporter.to_owned(),
            stream_id: id,
            direction: Direction::Inbound as i32,
            ..Default::default()
        };
        vec![
            TapEvent {
                event: Some(Event::RequestStart(RequestStart {
                    method: "GET".into(),
                    scheme: "http".into(),
                    authority: "books:8080".into(),
                    path: path.into(),
                })),
                ..base.clone()
            },
            TapEvent {
                source_identity: "spiffe://cluster.local/ns/demo/sa/web".into(),
                event: Some(Event::ResponseStart(ResponseStart {
                    http_status: status,
                    since_request_start: ms(latency),
                })),
                ..base.clone()
            },
            TapEvent {
                event: Some(Event::End(End {
                    since_request_start: ms(latency + 1),
                    ..Default::default()
                })),
                ..base
            },
        ]
    }

    #[test]
    fn events_of_interleaved_requests_join_into_exchanges() {
        let a = events("demo/books-1", 1, "/books/1?x=1", 200, 5);
        let b = events("demo/books-2", 1, "/books/2", 403, 1);
        let mut joiner = Joiner::default();
        let mut done = Vec::new();
        for event in [&a[0], &b[0], &b[1], &a[1], &a[2], &b[2]] {
            done.extend(joiner.push((*event).clone()));
        }
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].reporter, "demo/books-1");
        assert_eq!(done[0].status, Some(200));
        assert_eq!(done[0].latency, Some(Duration::from_millis(6)));
        assert_eq!(
            done[0].source_identity,
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        assert!(done[0].success());
        assert!(!done[1].success(), "a 403 is a denial, not a success");
        assert!(
            done[0]
                .line()
                .contains("GET books:8080/books/1?x=1 status=200")
        );
        assert!(
            joiner.push(a[2].clone()).is_none(),
            "an end without a start"
        );

        let mut table = TopTable::default();
        for exchange in &done {
            table.add(exchange);
        }
        table.add(&done[0]);
        let rows = table.rows();
        assert_eq!(
            rows[0].path, "/books/1",
            "the query is not part of the path"
        );
        assert_eq!((rows[0].count, rows[0].successes), (2, 2));
        assert_eq!((rows[1].count, rows[1].successes), (1, 0));
        let text = table.render();
        assert!(text.contains("COUNT"), "{text}");
        assert!(text.contains("/books/2"), "{text}");
    }
}
