//! The Grafana dashboards (`charts/mesh/dashboards/*.json`) against what the mesh really
//! exports.
//!
//! - Without processes: every metric a panel query names is one the proxy, the controller or
//!   the injector registers (read from their own encoders), or Prometheus's own `up`.
//! - With a real Prometheus (Debian package `prometheus`, installed by `scripts/setup`): a
//!   local mesh (the demo app in loopback mode, with retries, failure accrual, fault injection
//!   and a rate limit added, and a few CONNECT tunnels for opaque TCP, inside the mesh and out
//!   of it, where an EgressNetwork allows one port) is scraped with the configuration `meshctl prometheus-config
//!   --local` prints, and every query of every panel, its template variables filled with
//!   values from the scrape, must return data, except those listed in [`NO_DATA`] with the
//!   reason this scenario cannot produce them.
//!
//! Every wait is bounded; Prometheus and the local mesh are stopped on drop, also when the test
//! fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mesh_integration_tests::bin_path;
use mesh_integration_tests::process::free_port;
use serde_json::Value;

/// Queries this scenario cannot give data to: (dashboard, panel title, reason). A title
/// followed by `/B` names one query of the panel by its refId; without it, every query of the
/// panel.
const NO_DATA: &[(&str, &str, &str)] = &[
    (
        "mesh-identity",
        "Plaintext requests received",
        "every pod of the scenario is meshed, so every request arrives over mTLS",
    ),
    (
        "mesh-control-plane",
        "Injectors up",
        "a local mesh has no injector: `meshctl local` injects in-process",
    ),
    (
        "mesh-control-plane",
        "Injector admissions by result",
        "a local mesh has no injector: `meshctl local` injects in-process",
    ),
    (
        "mesh-control-plane",
        "Injector admission latency",
        "a local mesh has no injector: `meshctl local` injects in-process",
    ),
    (
        "mesh-control-plane",
        "Watch errors",
        "the local controller uses the file backend, which has no Kubernetes watches",
    ),
];

/// The window `$__rate_interval` stands for: several 1 s scrapes, less than the test runs.
const RATE_INTERVAL: &str = "20s";

/// How many variable combinations a dashboard may be tried with (bounds the queries).
const MAX_COMBINATIONS: usize = 60;

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/mesh/dashboards")
}

/// Every dashboard: (file stem, JSON).
fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(dashboards_dir())
        .expect("charts/mesh/dashboards exists")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let stem = path.file_stem()?.to_str()?.to_owned();
            (path.extension()? == "json").then_some(())?;
            let text = std::fs::read_to_string(&path).expect("dashboard readable");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|error| panic!("{}: not JSON: {error}", path.display()));
            Some((stem, json))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 8, "the dashboards are there: {out:?}");
    out
}

/// One query of one panel.
struct Query {
    dashboard: String,
    panel: String,
    ref_id: String,
    expr: String,
}

fn queries(dashboards: &[(String, Value)]) -> Vec<Query> {
    let mut out = Vec::new();
    for (name, dashboard) in dashboards {
        let mut ids = BTreeSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            let id = panel["id"].as_u64().expect("numeric panel id");
            assert!(ids.insert(id), "{name}: panel id {id} twice");
            for target in panel["targets"].as_array().expect("targets") {
                out.push(Query {
                    dashboard: name.clone(),
                    panel: panel["title"].as_str().expect("title").to_owned(),
                    ref_id: target["refId"].as_str().unwrap_or("A").to_owned(),
                    expr: target["expr"].as_str().expect("expr").to_owned(),
                });
            }
        }
    }
    out
}

/// The reason a query is allowed to return nothing, if it is.
fn exemption(query: &Query) -> Option<&'static str> {
    NO_DATA.iter().find_map(|(dashboard, panel, reason)| {
        let dashboard_matches = *dashboard == "*" || *dashboard == query.dashboard;
        let panel_matches = match panel.rsplit_once('/') {
            Some((title, ref_id)) if ref_id.len() == 1 => {
                title == query.panel && ref_id == query.ref_id
            }
            _ => *panel == query.panel,
        };
        (dashboard_matches && panel_matches).then_some(*reason)
    })
}

/// The metric names a PromQL expression selects: identifiers outside label matchers,
/// strings, ranges and `by (...)` lists that are not functions or keywords.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 24] = [
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' | '[' | '"' => {
                let close = match c {
                    '{' => '}',
                    '[' => ']',
                    _ => '"',
                };
                i += 1;
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' && close != '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if skip_group => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                skip_group = false;
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next] == ' ' {
                    next += 1;
                }
                let is_call = chars.get(next) == Some(&'(');
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str())
                {
                    skip_group = true;
                } else if !is_call && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number, possibly 1e-3.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The metric names registered in a source file (`register("NAME", ...)` calls), after
/// `prefix`, each with the sample suffixes its type may add (`_total` for counters, `_bucket`,
/// `_sum` and `_count` for histograms). Read from the sources because a family without series
/// is left out of its registry's exposition, so an encoder cannot list what it may export.
fn registered_names(file: &str, prefix: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    let source = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mut names = BTreeSet::new();
    for (_, rest) in source
        .match_indices("register(")
        .map(|(i, _)| source.split_at(i + 9))
    {
        let rest = rest.trim_start();
        let Some(quoted) = rest.strip_prefix('"') else {
            continue;
        };
        let Some((name, _)) = quoted.split_once('"') else {
            continue;
        };
        let name = format!("{prefix}{name}");
        for suffix in ["", "_total", "_bucket", "_sum", "_count"] {
            names.insert(format!("{name}{suffix}"));
        }
    }
    assert!(!names.is_empty(), "{file} registers no metric");
    names
}

#[test]
fn every_dashboard_query_names_only_metrics_the_mesh_exports() {
    let mut known = registered_names("proxy/src/metrics.rs", "");
    for file in [
        "controller/src/metrics.rs",
        "controller/src/identity/metrics.rs",
        "controller/src/policy/metrics.rs",
    ] {
        known.extend(registered_names(file, "mesh_controller_"));
    }
    known.extend(registered_names(
        "injector/src/metrics.rs",
        "mesh_injector_",
    ));
    // The process metrics the proxy writes by hand, as its real exposition has them.
    let proxy_exposition = mesh_proxy::metrics::Metrics::new().encode();
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            proxy_exposition.contains(&format!("\n{name} ")),
            "{name} in\n{proxy_exposition}"
        );
        known.insert(name.to_owned());
    }
    // Prometheus's own series per target.
    known.insert("up".to_owned());

    let dashboards = dashboards();
    let mut unknown = Vec::new();
    for query in queries(&dashboards) {
        for name in metric_names(&query.expr) {
            if !known.contains(&name) {
                unknown.push(format!(
                    "{} / {}: {name} in {}",
                    query.dashboard, query.panel, query.expr
                ));
            }
        }
    }
    for (name, dashboard) in &dashboards {
        for variable in dashboard["templating"]["list"]
            .as_array()
            .expect("templating")
        {
            if let Some(query) = variable["query"]["query"].as_str() {
                let (metric, _) = label_values(query).expect("label_values(METRIC, LABEL)");
                for metric in metric_names(&metric) {
                    if !known.contains(&metric) {
                        unknown.push(format!("{name}: variable {}: {metric}", variable["name"]));
                    }
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queries name metrics nobody exports:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn metric_names_skips_labels_functions_and_groupings() {
    let names = metric_names(
        r#"histogram_quantile(0.95, sum by (le, authority) (rate(response_latency_ms_bucket{namespace="a{b}", le!="1"}[$__rate_interval]))) / on (x) up - time() > 1e-3"#,
    );
    let expected: BTreeSet<String> = ["response_latency_ms_bucket", "up"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(names, expected);
}

/// `label_values(SELECTOR, LABEL)` split into its selector and label.
fn label_values(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_owned(), label.trim().to_owned()))
}

/// Replaces `$name` and `${name}` in `text`, longest names first.
fn substitute(text: &str, values: &BTreeMap<String, String>) -> String {
    let mut names: Vec<&String> = values.keys().collect();
    names.sort_by_key(|name| std::cmp::Reverse(name.len()));
    let mut out = text.replace("$__rate_interval", RATE_INTERVAL);
    for name in names {
        out = out
            .replace(&format!("${{{name}}}"), &values[name])
            .replace(&format!("${name}"), &values[name]);
    }
    out
}

// ---- the real Prometheus ----

/// `curl` against the Prometheus HTTP API; the JSON answer's `data`, or None on any failure.
fn api(base: &str, path: &str, params: &[(&str, &str)]) -> Option<Value> {
    let mut command = Command::new("curl");
    command.args(["-sS", "--fail", "--max-time", "5", "-G"]);
    for (key, value) in params {
        command
            .arg("--data-urlencode")
            .arg(format!("{key}={value}"));
    }
    command.arg(format!("{base}{path}"));
    let output = command.output().ok()?;
    if !output.status.success() {
        return None;
    }
    let answer: Value = serde_json::from_slice(&output.stdout).ok()?;
    (answer["status"] == "success").then(|| answer["data"].clone())
}

/// The result vector of an instant query (panics when the query itself is refused: a broken
/// expression is a test failure, not missing data).
fn query(base: &str, expr: &str) -> Vec<Value> {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--max-time", "5", "-G", "--data-urlencode"])
        .arg(format!("query={expr}"))
        .arg(format!("{base}/api/v1/query"));
    let output = command.output().expect("curl runs");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "Prometheus answered {expr:?} with no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(answer["status"], "success", "query {expr:?}: {answer}");
    answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A running Prometheus, killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, config: &str) -> Prometheus {
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write the Prometheus config");
        let check = Command::new("promtool")
            .args(["check", "config"])
            .arg(&config_file)
            .output()
            .expect("promtool runs");
        assert!(
            check.status.success(),
            "promtool refuses the config:\n{}{}\n{config}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir: dir.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until `ready` holds, at most `limit`.
    fn wait_for(&self, what: &str, limit: Duration, ready: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        while !ready(&self.base) {
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} for {what}; Prometheus's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local mesh of this test's own, taken down on drop.
struct LocalMesh {
    meshctl: PathBuf,
    dir: PathBuf,
    state_dir: PathBuf,
}

impl LocalMesh {
    fn new() -> LocalMesh {
        let meshctl = bin_path("meshctl");
        let dir = std::env::temp_dir().join(format!("mesh-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the test folder");
        LocalMesh {
            meshctl,
            state_dir: dir.join("state"),
            dir,
        }
    }

    fn meshctl(&self, args: &[&str]) -> Output {
        Command::new(&self.meshctl)
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env("MESHCTL_PROXY_BIN", bin_path("mesh-proxy"))
            .env("MESHCTL_CONTROLLER_BIN", bin_path("mesh-controller"))
            .stdin(Stdio::null())
            .output()
            .expect("meshctl runs")
    }

    fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.state_dir.join("state.json"))
            .expect("state.json exists while the mesh is up");
        serde_json::from_str(&text).expect("state.json is JSON")
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        if self.state_dir.exists() {
            let down = self.meshctl(&["local", "down"]);
            if !down.status.success() {
                eprintln!(
                    "cleanup: meshctl local down failed: {}",
                    String::from_utf8_lossy(&down.stderr)
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The demo's manifest, runnable by `local up` (its `meshctl` is this build's), with
/// resilience settings on its Services so retries, ejections and faults happen (books fails 5%
/// of its requests), and a rate limit on books below what web sends it.
fn scenario_manifest(meshctl: &Path) -> String {
    let output = Command::new(meshctl)
        .args(["demo", "--print-manifest"])
        .output()
        .expect("meshctl demo --print-manifest runs");
    assert!(output.status.success(), "meshctl demo --print-manifest");
    let manifest = String::from_utf8(output.stdout).expect("UTF-8 manifest");
    let quoted = Value::String(meshctl.display().to_string()).to_string();
    let manifest = manifest.replace("[\"meshctl\",", &format!("[{quoted},"));
    let annotate = |manifest: String, service: &str, annotations: &str| {
        let from = format!("kind: Service\nmetadata:\n  name: {service}\n  namespace: demo\n");
        assert!(manifest.contains(&from), "the demo has a Service {service}");
        manifest.replace(&from, &format!("{from}  annotations:\n{annotations}"))
    };
    let manifest = annotate(
        manifest,
        "books",
        "    retry.mesh.dev/http: \"5xx\"\n    retry.mesh.dev/limit: \"2\"\n    \
         failure-accrual.mesh.dev/consecutive-failures: \"1\"\n    \
         failure-accrual.mesh.dev/min-backoff: \"50ms\"\n    \
         failure-accrual.mesh.dev/max-backoff: \"200ms\"\n",
    );
    let manifest = annotate(
        manifest,
        "authors",
        "    fault.mesh.dev/abort-percent: \"2\"\n",
    );
    format!("{manifest}\n---\n{BOOKS_RATE_LIMIT}\n---\n{EGRESS}")
}

/// Outside the mesh (no pod or Service there): demo's clients may open TCP connections to
/// port 9 of 127.0.99.0/24 and nothing else.
const EGRESS: &str = "\
apiVersion: policy.mesh.dev/v1alpha1
kind: EgressNetwork
metadata: {name: outside, namespace: demo}
spec:
  networks: [{cidr: 127.0.99.0/24}]
  trafficPolicy: Deny
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: discard, namespace: demo}
spec:
  parentRefs: [{group: policy.mesh.dev, kind: EgressNetwork, name: outside, port: 9}]
";

/// A Server for books' port admitting every client, limited to fewer requests per second than
/// the demo's traffic makes web send.
const BOOKS_RATE_LIMIT: &str = "\
apiVersion: policy.mesh.dev/v1alpha1
kind: Server
metadata: {name: books-http, namespace: demo}
spec:
  podSelector: {matchLabels: {app: books}}
  port: 8080
---
apiVersion: policy.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: books-everyone, namespace: demo}
spec:
  targetRef: {group: policy.mesh.dev, kind: Server, name: books-http}
  requiredAuthenticationRefs: []
---
apiVersion: policy.mesh.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: books-limit, namespace: demo}
spec:
  targetRef: {group: policy.mesh.dev, kind: Server, name: books-http}
  total: {requestsPerSecond: 8}
";

/// Every assignment of a dashboard's variables (datasource aside), each variable's values
/// read from Prometheus with its `label_values` query and the variables before it.
fn combinations(base: &str, dashboard: &Value) -> Vec<BTreeMap<String, String>> {
    let mut combos = vec![BTreeMap::new()];
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        let Some(definition) = variable["query"]["query"].as_str() else {
            continue;
        };
        let name = variable["name"].as_str().expect("variable name").to_owned();
        let mut next = Vec::new();
        for combo in &combos {
            let (selector, label) = label_values(&substitute(definition, combo))
                .unwrap_or_else(|| panic!("{definition} is not label_values(SELECTOR, LABEL)"));
            let values = api(
                base,
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", &selector)],
            )
            .and_then(|data| data.as_array().cloned())
            .unwrap_or_default();
            for value in values.iter().filter_map(Value::as_str) {
                let mut extended = combo.clone();
                extended.insert(name.clone(), value.to_owned());
                next.push(extended);
            }
        }
        next.truncate(MAX_COMBINATIONS);
        combos = next;
    }
    combos
}

#[test]
fn every_dashboard_panel_has_data_in_a_real_prometheus_scraping_a_local_mesh() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        let message = "every_dashboard_panel_has_data_in_a_real_prometheus_scraping_a_local_mesh: \
                       NOT RUN: prometheus is not installed (run scripts/setup)";
        assert!(
            std::env::var("CI").map_or(true, |ci| ci != "true"),
            "{message}"
        );
        eprintln!("{message}");
        return;
    }
    let mesh = LocalMesh::new();
    let manifest = mesh.dir.join("scenario.yaml");
    std::fs::write(&manifest, scenario_manifest(&mesh.meshctl)).expect("write the manifest");
    let instance = format!("pm{}", std::process::id() % 100_000);
    let up = mesh.meshctl(&[
        "local",
        "up",
        "-f",
        manifest.to_str().expect("UTF-8 path"),
        "--mode",
        "loopback",
        "--instance",
        &instance,
        "--controller-port",
        "0",
        "--controller-admin-port",
        "0",
        "--timeout",
        "60s",
    ]);
    assert!(
        up.status.success(),
        "meshctl local up failed:\n{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );

    let config = mesh.meshctl(&["prometheus-config", "--local", "--scrape-interval", "1s"]);
    assert!(
        config.status.success(),
        "meshctl prometheus-config --local failed: {}",
        String::from_utf8_lossy(&config.stderr)
    );
    let config = String::from_utf8(config.stdout).expect("UTF-8 config");
    assert!(
        config.contains("job_name: mesh-proxy") && config.contains("job_name: mesh-controller")
    );
    let prometheus = Prometheus::start(&mesh.dir, &config);

    // Every target up: five proxies and the controller.
    prometheus.wait_for(
        "every target to be scraped",
        Duration::from_secs(30),
        |base| {
            let Some(targets) = api(base, "/api/v1/targets", &[]) else {
                return false;
            };
            let active = targets["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            active.len() == 6 && active.iter().all(|t| t["health"] == "up")
        },
    );
    // Opaque TCP: CONNECT tunnels through traffic's outbound proxy (its HTTP-proxy mode) are
    // forwarded as TCP and counted in tcp_* on both sides; archive refuses them per connection.
    let state = mesh.state();
    let traffic_ip = state["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|pod| pod["workload"]["name"] == "traffic"))
        .and_then(|pod| pod["ip"].as_str())
        .expect("the traffic pod's IP in state.json")
        .to_owned();
    // Egress: the same tunnels to an address outside the mesh, one port allowed, one denied.
    let targets = ["web", "web", "web", "archive", "archive"]
        .map(|service| format!("http://{service}.demo.svc.cluster.local:8080/"))
        .into_iter()
        .chain([
            "http://127.0.99.1:9/".to_owned(),
            "http://127.0.99.1:7/".to_owned(),
        ]);
    for target in targets {
        // Outcomes vary (archive refuses, web sometimes fails); only the tunnels matter here.
        let _ = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "--proxytunnel",
                "--proxy",
            ])
            .arg(format!("http://{traffic_ip}:4140"))
            .arg(target)
            .output();
    }
    // Traffic with its retries and ejections, over more than one rate window.
    prometheus.wait_for(
        "traffic, retries, ejections and faults",
        Duration::from_secs(45),
        |base| {
            [
                "sum(rate(request_total[20s])) > 0",
                "sum(route_retry_total) > 0",
                "sum(endpoint_ejection_total) > 0",
                "sum(inbound_http_ratelimit_total) > 0",
                "sum(inbound_tcp_authz_deny_total) > 0",
                "sum(outbound_egress_total{decision=\"denied\"}) > 0",
                "sum(outbound_egress_total{decision=\"allowed\"}) > 0",
                // 2% of authors' requests: rare enough to be missing from a short run.
                "sum(route_fault_injection_total) > 0",
            ]
            .iter()
            .all(|expr| !query(base, expr).is_empty())
        },
    );
    std::thread::sleep(Duration::from_secs(5));

    let dashboards = dashboards();
    let mut combos_by_dashboard = BTreeMap::new();
    for (name, dashboard) in &dashboards {
        let combos = combinations(&prometheus.base, dashboard);
        assert!(
            !combos.is_empty(),
            "{name}: no values for its variables in the scrape"
        );
        combos_by_dashboard.insert(name.clone(), combos);
    }
    let mut missing = Vec::new();
    let mut exempt_with_data = Vec::new();
    let mut checked = 0;
    for query_ in queries(&dashboards) {
        let combos = &combos_by_dashboard[&query_.dashboard];
        let has_data = combos
            .iter()
            .any(|combo| !query(&prometheus.base, &substitute(&query_.expr, combo)).is_empty());
        checked += 1;
        match (has_data, exemption(&query_)) {
            (true, Some(_)) => {
                exempt_with_data.push(format!("{} / {}", query_.dashboard, query_.panel))
            }
            (false, None) => missing.push(format!(
                "{} / {} ({}): {}",
                query_.dashboard, query_.panel, query_.ref_id, query_.expr
            )),
            _ => {}
        }
    }
    if !exempt_with_data.is_empty() {
        eprintln!(
            "listed as having no data in this scenario, but had some (shorten NO_DATA):\n{}",
            exempt_with_data.join("\n")
        );
    }
    assert!(
        missing.is_empty(),
        "{} of {checked} panel queries returned no data:\n{}",
        missing.len(),
        missing.join("\n")
    );
    drop(prometheus);
    let down = mesh.meshctl(&["local", "down"]);
    assert!(down.status.success(), "meshctl local down");
}
