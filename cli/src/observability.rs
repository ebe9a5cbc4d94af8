//! `meshctl dashboards` and `meshctl prometheus-config`: what Prometheus and Grafana users need
//! to watch the mesh with the tools they already run.
//!
//! Owns the Grafana dashboards as shipped ([`DASHBOARDS`], embedded from
//! `charts/mesh/dashboards/`, also what `meshctl install` turns into ConfigMaps) and the scrape
//! configuration whose relabeling gives every proxy series the `namespace`, `pod`, `workload`
//! and `workload_kind` labels the dashboards select on. The proxy's own labels
//! (`proxy/src/metrics.rs`) carry the traffic's side; these carry the pod's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

/// Every dashboard: the file stem and its Grafana JSON model.
pub(crate) const DASHBOARDS: &[(&str, &str)] = &[
    (
        "mesh-top-line",
        include_str!("../../charts/mesh/dashboards/mesh-top-line.json"),
    ),
    (
        "mesh-namespace",
        include_str!("../../charts/mesh/dashboards/mesh-namespace.json"),
    ),
    (
        "mesh-workload",
        include_str!("../../charts/mesh/dashboards/mesh-workload.json"),
    ),
    (
        "mesh-pod",
        include_str!("../../charts/mesh/dashboards/mesh-pod.json"),
    ),
    (
        "mesh-route",
        include_str!("../../charts/mesh/dashboards/mesh-route.json"),
    ),
    (
        "mesh-authority",
        include_str!("../../charts/mesh/dashboards/mesh-authority.json"),
    ),
    (
        "mesh-egress",
        include_str!("../../charts/mesh/dashboards/mesh-egress.json"),
    ),
    (
        "mesh-identity",
        include_str!("../../charts/mesh/dashboards/mesh-identity.json"),
    ),
    (
        "mesh-control-plane",
        include_str!("../../charts/mesh/dashboards/mesh-control-plane.json"),
    ),
];

/// The proxy's admin port name in injected pods (`injector/src/inject.rs`).
const PROXY_ADMIN_PORT_NAME: &str = "mesh-admin";
/// The injected proxy container's name.
const PROXY_CONTAINER: &str = "mesh-proxy";
/// The controller's admin port (`/metrics`), as in ARCHITECTURE.md.
const CONTROLLER_ADMIN_PORT: u16 = 9990;
/// The injector's plain-HTTP admin port (`/metrics`).
const INJECTOR_ADMIN_PORT: u16 = 9995;

/// `meshctl dashboards ...`.
#[derive(Debug, Args)]
pub struct DashboardsArgs {
    #[command(subcommand)]
    command: DashboardsCommand,
}

#[derive(Debug, Subcommand)]
enum DashboardsCommand {
    /// Print one dashboard's Grafana JSON (NAME), or write every dashboard to --dir.
    Export {
        /// The dashboard, e.g. `mesh-workload` or `workload`; `meshctl dashboards list` names
        /// them all.
        name: Option<String>,
        /// Write NAME.json files into this folder instead of printing.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// List the dashboards.
    List,
}

/// `meshctl prometheus-config`.
#[derive(Debug, Args)]
pub struct PrometheusConfigArgs {
    /// Static targets for the local mesh on this machine (`meshctl local up`, `meshctl demo
    /// --keep`) instead of Kubernetes pod discovery. A snapshot: print it again after the
    /// local mesh restarts.
    #[arg(long)]
    local: bool,
    /// With --local: the local mesh's state folder (as for `meshctl local`).
    #[arg(long, env = "MESH_LOCAL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// How often Prometheus scrapes, e.g. `15s` or `1s`.
    #[arg(long, default_value = "15s", value_parser = parse_interval)]
    scrape_interval: String,
    /// The namespace of the control plane (controller and injector pods).
    #[arg(long, default_value = "mesh-system")]
    control_plane_namespace: String,
}

/// Accepts a Prometheus duration made of a number and one unit (`500ms`, `15s`, `1m`).
fn parse_interval(text: &str) -> Result<String, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(0);
    let (number, unit) = text.split_at(split);
    match (number.parse::<u64>(), unit) {
        (Ok(n), "ms" | "s" | "m" | "h") if n > 0 => Ok(text.to_owned()),
        _ => Err(format!("{text:?} is not an interval like 15s, 500ms or 1m")),
    }
}

/// Runs `meshctl dashboards ...`.
pub fn run_dashboards(args: DashboardsArgs) -> anyhow::Result<()> {
    match args.command {
        DashboardsCommand::List => {
            for (name, json) in DASHBOARDS {
                let title = serde_json::from_str::<Value>(json)
                    .ok()
                    .and_then(|d| d.get("title").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                println!("{name:<20} {title}");
            }
            Ok(())
        }
        DashboardsCommand::Export { name, dir } => match (name, dir) {
            (Some(name), None) => {
                print!("{}", dashboard(&name)?.1);
                Ok(())
            }
            (Some(name), Some(dir)) => write_dashboards(&dir, &[dashboard(&name)?]),
            (None, Some(dir)) => write_dashboards(&dir, DASHBOARDS),
            (None, None) => bail!(
                "name a dashboard to print ({}), or pass --dir DIR to write them all",
                names().join(", ")
            ),
        },
    }
}

fn names() -> Vec<&'static str> {
    DASHBOARDS.iter().map(|(name, _)| *name).collect()
}

/// The dashboard called `name`, with or without its `mesh-` prefix.
fn dashboard(name: &str) -> anyhow::Result<(&'static str, &'static str)> {
    let wanted = name.trim_end_matches(".json");
    DASHBOARDS
        .iter()
        .find(|(stem, _)| *stem == wanted || stem.strip_prefix("mesh-") == Some(wanted))
        .copied()
        .with_context(|| format!("no dashboard {name:?}; there are: {}", names().join(", ")))
}

fn write_dashboards(dir: &Path, dashboards: &[(&str, &str)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, json) in dashboards {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Runs `meshctl prometheus-config`.
pub fn run_prometheus_config(args: PrometheusConfigArgs) -> anyhow::Result<()> {
    let config = if args.local {
        let state = local_state(args.state_dir.as_deref())?;
        local_config(&state, &args.scrape_interval)?
    } else {
        kubernetes_config(&args.scrape_interval, &args.control_plane_namespace)
    };
    print!("{config}");
    Ok(())
}

/// The local mesh's state, or why there is none to scrape.
fn local_state(state_dir: Option<&Path>) -> anyhow::Result<Value> {
    crate::local::status_json(state_dir)?.map_err(|reason| {
        anyhow::anyhow!("no local mesh to scrape: {reason}; or run `meshctl demo --keep`")
    })
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn quote(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

fn header(out: &mut String, interval: &str, what: &str) {
    let _ = writeln!(
        out,
        "# Prometheus scrape configuration for the mesh ({what}), from `meshctl prometheus-config`.\n\
         # Proxy series get namespace, pod, workload and workload_kind labels: the Grafana\n\
         # dashboards (`meshctl dashboards export`) select on them.\n\
         global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n\
         scrape_configs:"
    );
}

/// Static targets: every meshed pod's proxy admin forward and the controller's admin forward.
fn local_config(state: &Value, interval: &str) -> anyhow::Result<String> {
    let text = |value: &Value, pointer: &str| {
        value
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut out = String::new();
    header(&mut out, interval, "a local mesh");
    let _ = writeln!(out, "  - job_name: mesh-proxy\n    static_configs:");
    let mut proxies = 0;
    for pod in state
        .get("pods")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let Some(admin) = pod
            .pointer("/proxy_admin/from_host")
            .and_then(Value::as_str)
        else {
            continue;
        };
        proxies += 1;
        let _ = writeln!(
            out,
            "      - targets: [{}]\n        labels:\n          namespace: {}\n          pod: {}\n          workload: {}\n          workload_kind: {}",
            quote(admin),
            quote(&text(pod, "/namespace")),
            quote(&text(pod, "/name")),
            quote(&text(pod, "/workload/name")),
            quote(&text(pod, "/workload/kind")),
        );
    }
    if proxies == 0 {
        bail!(
            "the local mesh has no meshed pod with an admin forward yet; wait for `meshctl local \
             status` to show them ready"
        );
    }
    let _ = writeln!(out, "  - job_name: mesh-controller\n    static_configs:");
    match state
        .pointer("/controller/admin/from_host")
        .and_then(Value::as_str)
    {
        Some(admin) => {
            let _ = writeln!(
                out,
                "      - targets: [{}]\n        labels:\n          component: controller",
                quote(admin)
            );
        }
        None => {
            let _ = writeln!(out, "      []");
        }
    }
    Ok(out)
}

/// Kubernetes pod discovery: the `mesh-admin` port of every `mesh-proxy` container, and the
/// controller's and injector's admin ports in the control plane's namespace. A native sidecar
/// is an init container, whose ports Prometheus discovers too (2.40 and later, as
/// `__meta_kubernetes_pod_container_init="true"`).
fn kubernetes_config(interval: &str, control_plane_namespace: &str) -> String {
    let mut out = String::new();
    header(&mut out, interval, "Kubernetes pod discovery");
    let _ = write!(
        out,
        r#"  - job_name: mesh-proxy
    kubernetes_sd_configs:
      - role: pod
    relabel_configs:
      # Only the injected proxy's admin port.
      - source_labels: [__meta_kubernetes_pod_container_name, __meta_kubernetes_pod_container_port_name]
        action: keep
        regex: {PROXY_CONTAINER};{PROXY_ADMIN_PORT_NAME}
      - source_labels: [__meta_kubernetes_pod_phase]
        action: drop
        regex: Succeeded|Failed
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      # The workload: a bare pod is its own; otherwise the pod's controller, where a
      # ReplicaSet's name without its pod-template hash names its Deployment.
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: workload
      - target_label: workload_kind
        replacement: pod
      - source_labels: [__meta_kubernetes_pod_controller_name]
        regex: (.+)
        target_label: workload
      - source_labels: [__meta_kubernetes_pod_controller_kind]
        regex: (.+)
        target_label: workload_kind
      - source_labels: [workload_kind]
        target_label: workload_kind
        action: lowercase
      - source_labels: [__meta_kubernetes_pod_controller_kind, __meta_kubernetes_pod_controller_name]
        regex: ReplicaSet;(.+)-[^-]+
        target_label: workload
      - source_labels: [__meta_kubernetes_pod_controller_kind, __meta_kubernetes_pod_controller_name]
        regex: ReplicaSet;(.+)-[^-]+
        target_label: workload_kind
        replacement: deployment
"#
    );
    for (job, component, port) in [
        ("mesh-controller", "controller", CONTROLLER_ADMIN_PORT),
        ("mesh-injector", "injector", INJECTOR_ADMIN_PORT),
    ] {
        let _ = write!(
            out,
            r#"  - job_name: {job}
    kubernetes_sd_configs:
      - role: pod
        namespaces:
          names: [{namespace}]
    relabel_configs:
      # The {component}'s plain-HTTP admin port (/metrics).
      - source_labels: [__meta_kubernetes_pod_container_port_number]
        action: keep
        regex: "{port}"
      - source_labels: [__meta_kubernetes_pod_phase]
        action: drop
        regex: Succeeded|Failed
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - target_label: component
        replacement: {component}
"#,
            namespace = quote(control_plane_namespace),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;

    #[test]
    fn every_dashboard_is_grafana_json_with_unique_panel_ids_and_a_datasource_variable() {
        let files: BTreeSet<String> = std::fs::read_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/mesh/dashboards"
        ))
        .expect("the dashboards folder")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".json").map(str::to_owned)
        })
        .collect();
        let embedded: BTreeSet<String> = names().into_iter().map(str::to_owned).collect();
        assert_eq!(
            files, embedded,
            "every dashboard file is embedded, and only those"
        );
        let mut uids = BTreeSet::new();
        for (name, text) in DASHBOARDS {
            let dashboard: Value = serde_json::from_str(text)
                .unwrap_or_else(|error| panic!("{name}: not JSON: {error}"));
            assert!(dashboard["schemaVersion"].as_u64() >= Some(36), "{name}");
            assert!(uids.insert(dashboard["uid"].as_str().expect("uid").to_owned()));
            let variables = dashboard["templating"]["list"]
                .as_array()
                .expect("templating");
            assert_eq!(variables[0]["name"], "datasource", "{name}");
            assert_eq!(variables[0]["query"], "prometheus", "{name}");
            let panels = dashboard["panels"].as_array().expect("panels");
            assert!(!panels.is_empty(), "{name}");
            let mut ids = BTreeSet::new();
            for panel in panels {
                let id = panel["id"].as_u64().expect("a numeric panel id");
                assert!(ids.insert(id), "{name}: panel id {id} twice");
                assert_eq!(panel["datasource"]["uid"], "${datasource}", "{name}");
                let targets = panel["targets"].as_array().expect("targets");
                assert!(
                    !targets.is_empty(),
                    "{name}: {} has no query",
                    panel["title"]
                );
                for target in targets {
                    assert!(target["expr"].as_str().is_some_and(|e| !e.is_empty()));
                }
            }
        }
    }

    #[test]
    fn dashboards_are_found_with_or_without_their_prefix() {
        assert_eq!(dashboard("workload").expect("found").0, "mesh-workload");
        assert_eq!(dashboard("mesh-pod.json").expect("found").0, "mesh-pod");
        let error = dashboard("nope").expect_err("unknown").to_string();
        assert!(error.contains("mesh-control-plane"), "{error}");
    }

    #[test]
    fn intervals_are_checked() {
        for good in ["1s", "500ms", "15s", "2m"] {
            assert_eq!(parse_interval(good).as_deref(), Ok(good));
        }
        for bad in ["", "s", "0s", "15", "1.5s", "10 s", "1d"] {
            assert!(parse_interval(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_local_config_lists_every_meshed_pod_with_its_labels_and_the_controller() {
        let state = json!({
            "controller": {"admin": {"in_mesh": "10.77.0.2:9990", "from_host": "127.0.0.1:9990"}},
            "pods": [
                {"namespace": "demo", "name": "web-0", "workload": {"kind": "deployment", "name": "web"},
                 "proxy_admin": {"in_mesh": "10.77.0.5:4191", "from_host": "127.0.0.1:40001"}},
                {"namespace": "demo", "name": "plain", "workload": {"kind": "pod", "name": "plain"},
                 "proxy_admin": null},
            ],
        });
        let config = local_config(&state, "1s").expect("a config");
        for want in [
            "scrape_interval: 1s",
            "- job_name: mesh-proxy",
            "- targets: [\"127.0.0.1:40001\"]",
            "namespace: \"demo\"",
            "pod: \"web-0\"",
            "workload: \"web\"",
            "workload_kind: \"deployment\"",
            "- job_name: mesh-controller",
            "- targets: [\"127.0.0.1:9990\"]",
        ] {
            assert!(config.contains(want), "missing {want:?} in\n{config}");
        }
        assert!(
            !config.contains("plain"),
            "an unmeshed pod is not scraped\n{config}"
        );

        let empty = json!({"controller": {}, "pods": []});
        assert!(local_config(&empty, "1s").is_err());
    }

    #[test]
    fn the_kubernetes_config_keeps_the_proxy_admin_port_and_the_control_plane() {
        let config = kubernetes_config("15s", "mesh-system");
        for want in [
            "regex: mesh-proxy;mesh-admin",
            "- role: pod",
            "names: [\"mesh-system\"]",
            "regex: \"9990\"",
            "regex: \"9995\"",
            "- job_name: mesh-controller",
            "- job_name: mesh-injector",
            "replacement: deployment",
        ] {
            assert!(config.contains(want), "missing {want:?} in\n{config}");
        }
    }
}
