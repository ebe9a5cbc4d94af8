//! `meshctl inject` / `meshctl uninject` as a user runs them: the real binary on sample YAML,
//! from a file and from stdin, checking the YAML it prints and its exit status.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

/// Runs meshctl with `args`, feeding `stdin`, bounded in time by the OS process (the
/// command reads its input to the end and exits).
fn meshctl(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(MESHCTL)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshctl starts");
    child
        .stdin
        .take()
        .expect("a stdin pipe")
        .write_all(stdin.as_bytes())
        .expect("meshctl reads stdin");
    child.wait_with_output().expect("meshctl finishes")
}

fn ok(output: Output) -> (String, String) {
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 stdout");
    let stderr = String::from_utf8(output.stderr).expect("UTF-8 stderr");
    assert!(output.status.success(), "meshctl failed: {stderr}");
    (stdout, stderr)
}

fn inject(yaml: &str, flags: &[&str]) -> String {
    let mut args = vec!["inject", "-"];
    args.extend_from_slice(flags);
    ok(meshctl(&args, yaml)).0
}

fn uninject(yaml: &str) -> String {
    ok(meshctl(&["uninject", "-"], yaml)).0
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("meshctl prints valid YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn container_names(spec: &Value, key: &str) -> Vec<String> {
    spec[key]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: solo}
spec:
  containers: [{name: app, image: example/app}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: example/web, ports: [{containerPort: 8080}]}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: example/db}]}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec: {containers: [{name: agent, image: example/agent}]}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: rs}
spec:
  selector: {matchLabels: {app: rs}}
  template:
    metadata: {labels: {app: rs}}
    spec: {containers: [{name: rs, image: example/rs}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  template:
    spec: {restartPolicy: Never, containers: [{name: once, image: example/once}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec: {restartPolicy: OnFailure, containers: [{name: nightly, image: example/nightly}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {port: "8080", enabled: "true"}
"#;

/// The pod spec of each document (None for documents without one).
fn pod_specs(documents: &[Value]) -> Vec<Option<&Value>> {
    documents
        .iter()
        .map(|d| {
            let spec = match d["kind"].as_str() {
                Some("Pod") => &d["spec"],
                Some("CronJob") => &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                _ => &d["spec"]["template"]["spec"],
            };
            spec.is_object().then_some(spec)
        })
        .collect()
}

#[test]
fn every_kind_with_a_pod_template_is_injected_and_the_rest_pass_through() {
    let input = documents(WORKLOADS);
    let (output, stderr) = ok(meshctl(&["inject", "-"], WORKLOADS));
    let output = documents(&output);
    assert_eq!(output.len(), input.len());
    for (index, (before, after)) in input.iter().zip(&output).enumerate() {
        let kind = before["kind"].as_str().unwrap_or_default();
        match pod_specs(std::slice::from_ref(after))[0] {
            Some(spec) if kind != "Service" => {
                assert_eq!(
                    container_names(spec, "containers")[0],
                    "mesh-proxy",
                    "{kind}"
                );
                assert_eq!(
                    container_names(spec, "initContainers"),
                    ["mesh-init"],
                    "{kind}"
                );
            }
            _ => assert_eq!(before, after, "document {index} ({kind}) is unchanged"),
        }
    }
    for object in [
        "pod/solo",
        "deployment/web",
        "statefulset/db",
        "daemonset/agent",
        "replicaset/rs",
        "job/once",
        "cronjob/nightly",
    ] {
        assert!(
            stderr.contains(&format!("{object} injected")),
            "{object}: {stderr}"
        );
    }
    // The workload is named for the proxy.
    let deployment_env = &pod_specs(&output)[1].expect("a spec")["containers"][0]["env"];
    let workload: Vec<&str> = deployment_env
        .as_array()
        .expect("env")
        .iter()
        .filter(|v| {
            v["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("MESH_PROXY_WORKLOAD"))
        })
        .filter_map(|v| v["value"].as_str())
        .collect();
    assert_eq!(workload, ["deployment", "web"]);
    // Strings that look like numbers or booleans stay strings.
    let template = &output[1]["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(template["mesh.dev/proxy-inbound-port"], "4143");
    assert_eq!(output[8]["data"]["enabled"], "true");
}

#[test]
fn uninject_removes_exactly_what_inject_added() {
    for flags in [&[][..], &["--native-sidecars"][..]] {
        let injected = inject(WORKLOADS, flags);
        assert_ne!(documents(&injected), documents(WORKLOADS));
        assert_eq!(documents(&uninject(&injected)), documents(WORKLOADS));
    }
}

#[test]
fn inject_is_idempotent() {
    let once = inject(WORKLOADS, &[]);
    let (twice, stderr) = ok(meshctl(&["inject", "-"], &once));
    assert_eq!(documents(&twice), documents(&once));
    assert!(
        stderr.contains("deployment/web skipped: already injected"),
        "{stderr}"
    );
}

#[test]
fn native_sidecars_are_init_containers() {
    let output = documents(&inject(WORKLOADS, &["--native-sidecars"]));
    let spec = pod_specs(&output)[1].expect("the deployment's spec");
    assert_eq!(
        container_names(spec, "initContainers"),
        ["mesh-init", "mesh-proxy"]
    );
    assert_eq!(container_names(spec, "containers"), ["web"]);
    assert_eq!(spec["initContainers"][1]["restartPolicy"], "Always");
}

#[test]
fn lists_are_walked() {
    let list = r#"
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web}
  spec:
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web}}
      spec: {containers: [{name: web, image: example/web}]}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: c}
"#;
    let output = documents(&inject(list, &[]));
    let items = output[0]["items"].as_array().expect("items");
    assert_eq!(
        container_names(&items[0]["spec"]["template"]["spec"], "containers"),
        ["mesh-proxy", "web"]
    );
    assert_eq!(items[1], documents(list)[0]["items"][1]);
}

#[test]
fn files_and_trust_anchors() {
    let dir = std::env::temp_dir().join(format!("meshctl-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let manifest = dir.join("app.yaml");
    std::fs::write(&manifest, WORKLOADS).expect("write the manifest");
    let anchors = dir.join("ca.crt");
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    std::fs::write(&anchors, pem).expect("write the anchors");
    let manifest = manifest.to_str().expect("a UTF-8 path");
    let anchors = anchors.to_str().expect("a UTF-8 path");
    let (stdout, _) = ok(meshctl(
        &[
            "inject",
            manifest,
            "--trust-anchors-file",
            anchors,
            "-n",
            "prod",
        ],
        "",
    ));
    let output = documents(&stdout);
    let env = |spec: &Value, name: &str| -> Option<String> {
        spec["containers"][0]["env"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["value"].as_str().map(str::to_owned))
    };
    let specs = pod_specs(&output);
    // The Pod names no namespace: -n gives it; the Deployment keeps its own.
    assert_eq!(
        env(specs[0].expect("pod spec"), "MESH_PROXY_IDENTITY").as_deref(),
        Some("spiffe://cluster.local/ns/prod/sa/default")
    );
    assert_eq!(
        env(specs[1].expect("deployment spec"), "MESH_PROXY_IDENTITY").as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/default")
    );
    assert_eq!(
        env(
            specs[1].expect("deployment spec"),
            "MESH_PROXY_TRUST_ANCHORS"
        )
        .as_deref(),
        Some(pem)
    );
    assert!(
        output[0]["metadata"].get("namespace").is_none(),
        "-n adds no namespace"
    );
    assert!(
        output[1]["spec"]["template"]["spec"]["volumes"][0]["projected"].is_object(),
        "the token volume"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_annotation_fails_naming_it_and_prints_nothing() {
    let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {config.mesh.dev/skip-inbound-ports: "80,abc"}
    spec: {containers: [{name: web, image: example/web}]}
"#;
    let output = meshctl(&["inject", "-"], yaml);
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "nothing half-injected is printed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("deployment/web"), "{stderr}");
    assert!(
        stderr.contains(r#"config.mesh.dev/skip-inbound-ports: "80,abc": "abc" is not a port"#),
        "{stderr}"
    );
}

#[test]
fn pods_that_must_not_be_meshed_are_left_alone() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: node-agent}
spec: {hostNetwork: true, containers: [{name: agent, image: example/agent}]}
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: kube-system}
spec: {containers: [{name: dns, image: example/dns}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, annotations: {mesh.dev/inject: disabled}}
spec: {containers: [{name: app, image: example/app}]}
"#;
    let (stdout, stderr) = ok(meshctl(&["inject", "-"], yaml));
    assert_eq!(documents(&stdout), documents(yaml));
    for reason in ["host network", "kube-system", "disabled"] {
        assert!(stderr.contains(reason), "{reason}: {stderr}");
    }
}

#[test]
fn unreadable_input_fails() {
    let output = meshctl(&["inject", "-"], "kind: [unclosed");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not valid YAML"));
    let output = meshctl(&["uninject", "/nonexistent/app.yaml"], "");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/app.yaml"));
    let (stdout, _) = ok(meshctl(&["inject", "-"], ""));
    assert!(stdout.is_empty());
}
