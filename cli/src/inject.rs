//! `meshctl inject` and `meshctl uninject`: Kubernetes YAML in (a file or stdin, any number
//! of documents, `kind: List` too), the same YAML out with the mesh added to (or removed from)
//! every pod and pod template, by the injector's own [`mesh_injector::inject()`]. Documents
//! without a pod pass through unchanged. What happened to each object goes to stderr, so
//! stdout stays pipeable into `kubectl apply -f -`.
//!
//! This module only transforms text: it never talks to a cluster.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use mesh_injector::{MeshConfig, Outcome, Workload};
use serde_json::Value;

/// Flags of `meshctl inject`.
#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// The YAML to inject: a file, or `-` for stdin.
    pub file: String,
    /// The controller's gRPC URL given to proxies.
    #[arg(long, default_value = mesh_injector::config::DEFAULT_CONTROLLER_ADDR)]
    pub controller_addr: String,
    /// The Identity service's URL given to proxies; default: the controller's.
    #[arg(long)]
    pub identity_addr: Option<String>,
    /// The trust domain of SPIFFE identities.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The mesh's trust anchors (PEM). Without them, proxies run without identity (no mTLS).
    #[arg(long)]
    pub trust_anchors_file: Option<PathBuf>,
    /// The proxy image; default: ghcr.io/mesh/proxy:<version>.
    #[arg(long)]
    pub proxy_image: Option<String>,
    /// Inject the proxy as a native sidecar (Kubernetes 1.29 or newer).
    #[arg(long)]
    pub native_sidecars: bool,
}

/// Flags of `meshctl uninject`.
#[derive(Debug, clap::Args)]
pub struct UninjectArgs {
    /// The YAML to uninject: a file, or `-` for stdin.
    pub file: String,
}

/// Runs `meshctl inject`: prints the injected YAML, or fails without printing any.
pub fn run_inject(args: &InjectArgs, namespace: Option<&str>) -> anyhow::Result<()> {
    let defaults = MeshConfig::default();
    let trust_anchors_pem = match &args.trust_anchors_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("--trust-anchors-file {}", path.display()))?,
        None => {
            eprintln!(
                "warning: no --trust-anchors-file: the proxies run without identity (no mTLS)"
            );
            String::new()
        }
    };
    let config = MeshConfig {
        controller_addr: args.controller_addr.clone(),
        identity_addr: args
            .identity_addr
            .clone()
            .unwrap_or_else(|| args.controller_addr.clone()),
        trust_domain: args.trust_domain.clone(),
        trust_anchors_pem,
        proxy_image: args.proxy_image.clone().unwrap_or(defaults.proxy_image),
        native_sidecars: args.native_sidecars,
        ..MeshConfig::default()
    };
    config
        .validate()
        .map_err(|error| anyhow::anyhow!("--{error}"))?;
    let input = read_input(&args.file)?;
    let (output, reports) = transform(
        &input,
        &Mode::Inject {
            config: &config,
            namespace,
        },
    )?;
    print_results(&output, &reports);
    Ok(())
}

/// Runs `meshctl uninject`.
pub fn run_uninject(args: &UninjectArgs) -> anyhow::Result<()> {
    let input = read_input(&args.file)?;
    let (output, reports) = transform(&input, &Mode::Uninject)?;
    print_results(&output, &reports);
    Ok(())
}

fn read_input(file: &str) -> anyhow::Result<String> {
    if file == "-" {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading stdin")?;
        Ok(input)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
    }
}

fn print_results(output: &str, reports: &[String]) {
    print!("{output}");
    if !output.is_empty() && !output.ends_with('\n') {
        println!();
    }
    for report in reports {
        eprintln!("{report}");
    }
}

/// What to do to each pod.
enum Mode<'a> {
    Inject {
        config: &'a MeshConfig,
        /// `-n`: the namespace of objects that name none.
        namespace: Option<&'a str>,
    },
    Uninject,
}

/// Everything the documents of one stream share.
struct Stream<'a> {
    mode: &'a Mode<'a>,
    /// The annotations of the Namespace objects in the stream, by name.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    reports: Vec<String>,
}

/// Transforms a YAML stream; returns the YAML out and one line per object touched or skipped.
fn transform(input: &str, mode: &Mode<'_>) -> anyhow::Result<(String, Vec<String>)> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(input).context("the input is not valid YAML")?;
    // Empty documents (a stray `---`) carry nothing to apply.
    let mut documents: Vec<Value> = documents.into_iter().filter(|d| !d.is_null()).collect();
    let mut stream = Stream {
        mode,
        namespaces: namespace_annotations(&documents),
        reports: Vec::new(),
    };
    for (index, document) in documents.iter_mut().enumerate() {
        stream
            .document(document)
            .with_context(|| format!("document {}", index + 1))?;
    }
    let output = if documents.is_empty() {
        String::new()
    } else {
        serde_saphyr::to_string_multiple(&documents).context("writing YAML")?
    };
    Ok((output, stream.reports))
}

/// The annotations of every Namespace (also inside Lists) of the stream.
fn namespace_annotations(documents: &[Value]) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut namespaces = BTreeMap::new();
    let mut stack: Vec<&Value> = documents.iter().collect();
    while let Some(document) = stack.pop() {
        match document.get("kind").and_then(Value::as_str) {
            Some("List") => stack.extend(
                document
                    .get("items")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten(),
            ),
            Some("Namespace") => {
                let metadata = document.get("metadata");
                if let Some(name) = metadata.and_then(|m| m.get("name")).and_then(Value::as_str) {
                    let annotations = metadata
                        .and_then(|m| m.get("annotations"))
                        .and_then(|a| serde_json::from_value(a.clone()).ok())
                        .unwrap_or_default();
                    namespaces.insert(name.to_owned(), annotations);
                }
            }
            _ => {}
        }
    }
    namespaces
}

impl Stream<'_> {
    fn document(&mut self, document: &mut Value) -> anyhow::Result<()> {
        let kind = document
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let metadata = document.get("metadata");
        let name = metadata
            .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let namespace = metadata
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let object = format!("{}/{name}", kind.to_ascii_lowercase());
        let template_path: &[&str] = match kind.as_str() {
            "List" => {
                if let Some(items) = document.get_mut("items").and_then(Value::as_array_mut) {
                    for (index, item) in items.iter_mut().enumerate() {
                        self.document(item)
                            .with_context(|| format!("item {}", index + 1))?;
                    }
                }
                return Ok(());
            }
            "Pod" => {
                return self
                    .pod(document, namespace)
                    .with_context(|| object.clone());
            }
            "Deployment"
            | "StatefulSet"
            | "DaemonSet"
            | "ReplicaSet"
            | "Job"
            | "ReplicationController" => &["spec", "template"],
            "CronJob" => &["spec", "jobTemplate", "spec", "template"],
            _ => return Ok(()),
        };
        let Some(template) = template_path
            .iter()
            .try_fold(&mut *document, |value, key| value.get_mut(*key))
        else {
            return Ok(());
        };
        let workload = Workload {
            namespace,
            kind: kind.to_ascii_lowercase(),
            name,
        };
        self.template(template, workload)
            .with_context(|| object.clone())
    }

    fn pod(&mut self, document: &mut Value, namespace: Option<String>) -> anyhow::Result<()> {
        let mut pod: Pod = serde_json::from_value(document.clone()).context("not a valid Pod")?;
        let object = format!("pod/{}", pod.metadata.name.clone().unwrap_or_default());
        let changed = match self.mode {
            Mode::Inject {
                config,
                namespace: default_namespace,
            } => {
                // Known on both sides of the diff, so the output does not gain a namespace.
                let namespace = namespace.or_else(|| default_namespace.map(str::to_owned));
                pod.metadata.namespace.clone_from(&namespace);
                let annotations = self.annotations_of(namespace.as_deref());
                match mesh_injector::inject(&pod, &annotations, config)? {
                    Outcome::Injected(injected) => Some(injected),
                    Outcome::Skipped(reason) => {
                        self.reports.push(format!("{object} skipped: {reason}"));
                        None
                    }
                }
            }
            Mode::Uninject => mesh_injector::uninject(&pod),
        };
        if let Some(changed) = changed {
            apply_change(document, &pod, &changed)?;
            self.reports.push(format!("{object} {}", self.verb()));
        }
        Ok(())
    }

    fn template(&mut self, template: &mut Value, workload: Workload) -> anyhow::Result<()> {
        let spec: PodTemplateSpec =
            serde_json::from_value(template.clone()).context("not a valid pod template")?;
        let object = format!("{}/{}", workload.kind, workload.name);
        let changed = match self.mode {
            Mode::Inject {
                config,
                namespace: default_namespace,
            } => {
                let workload = Workload {
                    namespace: workload
                        .namespace
                        .clone()
                        .or_else(|| default_namespace.map(str::to_owned)),
                    ..workload
                };
                let annotations = self.annotations_of(workload.namespace.as_deref());
                match mesh_injector::inject_template(&spec, &workload, &annotations, config)? {
                    Outcome::Injected(injected) => Some(injected),
                    Outcome::Skipped(reason) => {
                        self.reports.push(format!("{object} skipped: {reason}"));
                        None
                    }
                }
            }
            Mode::Uninject => mesh_injector::uninject_template(&spec),
        };
        if let Some(changed) = changed {
            apply_change(template, &spec, &changed)?;
            self.reports.push(format!("{object} {}", self.verb()));
        }
        Ok(())
    }

    /// The namespace's annotations from the stream, with injection enabled: asking
    /// `meshctl inject` is asking for the mesh (a pod's own `disabled` still wins).
    fn annotations_of(&self, namespace: Option<&str>) -> BTreeMap<String, String> {
        let mut annotations = namespace
            .and_then(|namespace| self.namespaces.get(namespace))
            .cloned()
            .unwrap_or_default();
        annotations.insert(
            mesh_injector::annotations::INJECT.to_owned(),
            "enabled".to_owned(),
        );
        annotations
    }

    fn verb(&self) -> &'static str {
        match self.mode {
            Mode::Inject { .. } => "injected",
            Mode::Uninject => "uninjected",
        }
    }
}

/// Applies the difference between the typed object before and after to the document, so
/// whatever the typed model does not know (fields of newer Kubernetes versions) stays. If the
/// difference does not apply to the document, the typed result replaces it.
fn apply_change<T: serde::Serialize>(
    document: &mut Value,
    before: &T,
    after: &T,
) -> anyhow::Result<()> {
    let before = serde_json::to_value(before).context("encoding the object")?;
    let after = serde_json::to_value(after).context("encoding the object")?;
    let patch = json_patch::diff(&before, &after);
    let mut patched = document.clone();
    if json_patch::patch(&mut patched, &patch).is_ok() {
        *document = patched;
    } else {
        *document = after;
    }
    Ok(())
}
