//! The Kubernetes client of `install --apply`, `uninstall --delete` and `check`, from the global
//! `--kubeconfig`/`--context` flags, and server-side apply of untyped objects.

use std::time::Duration;

use anyhow::Context;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};
use serde_json::Value;

use crate::GlobalArgs;

/// The field manager of everything meshctl applies.
pub const FIELD_MANAGER: &str = "meshctl";

/// A client for the cluster the global flags name.
pub async fn client(global: &GlobalArgs) -> anyhow::Result<kube::Client> {
    kube::Client::try_from(config(global).await?).context("building the Kubernetes client")
}

/// The client configuration of the cluster the global flags name.
pub async fn config(global: &GlobalArgs) -> anyhow::Result<kube::Config> {
    let options = kube::config::KubeConfigOptions {
        context: global.context.clone(),
        ..Default::default()
    };
    let config = match &global.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        None if global.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("the default kubeconfig")?,
        None => kube::Config::infer()
            .await
            .context("no cluster: set --kubeconfig or KUBECONFIG, or run in a pod")?,
    };
    Ok(config)
}

/// An object's kind, name and namespace, for messages.
pub fn describe(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?");
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The API of one object's kind, found through discovery (so CRDs applied a moment ago are
/// known once `discovery` is refreshed).
fn api_for(
    client: &kube::Client,
    discovery: &Discovery,
    object: &Value,
) -> anyhow::Result<(Api<DynamicObject>, String)> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = discovery
        .resolve_gvk(&gvk)
        .with_context(|| format!("the API server does not serve {api_version} {kind}"))?;
    let name = object["metadata"]["name"]
        .as_str()
        .with_context(|| format!("{kind} without a name"))?
        .to_owned();
    let api = match (capabilities.scope, object["metadata"]["namespace"].as_str()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    };
    Ok((api, name))
}

/// How long applied CRDs may take to be served.
const CRD_SERVED_PATIENCE: Duration = Duration::from_secs(30);

/// The kinds a CRD object defines, one per served version.
fn crd_kinds(crd: &Value) -> Vec<GroupVersionKind> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let kind = spec["names"]["kind"].as_str().unwrap_or_default();
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|version| version["served"].as_bool().unwrap_or(true))
        .filter_map(|version| version["name"].as_str())
        .map(|version| GroupVersionKind::gvk(group, version, kind))
        .collect()
}

/// Discovery once every kind in `kinds` is served. A new CRD is served a moment after it is
/// created (until it is established its group's discovery answers 404), so this retries,
/// bounded by [`CRD_SERVED_PATIENCE`].
async fn discover_serving(
    client: &kube::Client,
    kinds: &[GroupVersionKind],
) -> anyhow::Result<Discovery> {
    let deadline = tokio::time::Instant::now() + CRD_SERVED_PATIENCE;
    loop {
        let attempt = Discovery::new(client.clone()).run().await;
        let missing: Vec<String> = match &attempt {
            Ok(discovery) => kinds
                .iter()
                .filter(|gvk| discovery.resolve_gvk(gvk).is_none())
                .map(|gvk| format!("{}/{} {}", gvk.group, gvk.version, gvk.kind))
                .collect(),
            Err(_) => Vec::new(),
        };
        match attempt {
            Ok(discovery) if missing.is_empty() => return Ok(discovery),
            // Only a group being established is worth waiting for; anything else says so now.
            Err(error) if kinds.is_empty() || tokio::time::Instant::now() >= deadline => {
                return Err(error).context("discovering the API server's resources");
            }
            Ok(_) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!(
                    "the API server still does not serve {} {}s after their CRDs were applied",
                    missing.join(", "),
                    CRD_SERVED_PATIENCE.as_secs()
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Server-side applies `objects` in order. CRDs go first and discovery is refreshed after
/// them (waiting until their kinds are served), so later objects may be of their kinds.
pub async fn apply(client: &kube::Client, objects: &[Value]) -> anyhow::Result<()> {
    let mut discovery = discover_serving(client, &[]).await?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut new_kinds = Vec::new();
    for object in objects {
        let is_crd = object["kind"] == "CustomResourceDefinition";
        if !new_kinds.is_empty() && !is_crd {
            // The CRDs' kinds must be served before anything of those kinds is applied.
            discovery = discover_serving(client, &new_kinds).await?;
            new_kinds.clear();
        }
        if is_crd {
            new_kinds.extend(crd_kinds(object));
        }
        let object = &served_version(&discovery, object);
        let (api, name) = api_for(client, &discovery, object)?;
        let typed: DynamicObject = serde_json::from_value(object.clone())
            .with_context(|| format!("{} is not a Kubernetes object", describe(object)))?;
        api.patch(&name, &params, &Patch::Apply(&typed))
            .await
            .with_context(|| format!("applying {}", describe(object)))?;
        println!("applied {}", describe(object));
    }
    Ok(())
}

/// The kinds [`prune`] looks at: all the control plane is made of but its CRDs and its
/// namespace, which hold the users' own objects and are never deleted behind their back.
const PRUNABLE: &[(&str, &str, &str)] = &[
    ("", "v1", "ServiceAccount"),
    ("", "v1", "ConfigMap"),
    ("", "v1", "Secret"),
    ("", "v1", "Service"),
    ("apps", "v1", "Deployment"),
    ("rbac.authorization.k8s.io", "v1", "ClusterRole"),
    ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io", "v1", "Role"),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
    (
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
    ),
    ("policy", "v1", "PodDisruptionBudget"),
    ("policy", "v1beta1", "PodDisruptionBudget"),
];

/// Deletes what the cluster has of the mesh (objects labelled `selector`, of the
/// [`PRUNABLE`] kinds) that `objects` no longer has: what an older version installed and this
/// one does not. Returns what it deleted.
pub async fn prune(
    client: &kube::Client,
    objects: &[Value],
    selector: &str,
) -> anyhow::Result<Vec<String>> {
    let key = |kind: &str, namespace: Option<&str>, name: &str| {
        format!("{kind} {}/{name}", namespace.unwrap_or_default())
    };
    let wanted: std::collections::BTreeSet<String> = objects
        .iter()
        .map(|o| {
            key(
                o["kind"].as_str().unwrap_or_default(),
                o["metadata"]["namespace"].as_str(),
                o["metadata"]["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let discovery = discover_serving(client, &[]).await?;
    let mut deleted = Vec::new();
    for (group, version, kind) in PRUNABLE {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        // Not served here (an older API server): nothing of it can be left.
        let Some((resource, _)) = discovery.resolve_gvk(&gvk) else {
            continue;
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let found = api
            .list(&kube::api::ListParams::default().labels(selector))
            .await
            .with_context(|| format!("listing the mesh's {kind}s"))?;
        for object in found.items {
            let (namespace, name) = (
                object.metadata.namespace.as_deref(),
                object.metadata.name.as_deref().unwrap_or_default(),
            );
            if wanted.contains(&key(kind, namespace, name)) {
                continue;
            }
            let api: Api<DynamicObject> = match namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            let what = match namespace {
                Some(ns) => format!("{kind} {ns}/{name}"),
                None => format!("{kind} {name}"),
            };
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {
                    println!("pruned {what} (this version no longer has it)");
                    deleted.push(what);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("pruning {what}")),
            }
        }
    }
    Ok(deleted)
}

/// Older API versions of what the mesh renders, with the same fields, for API servers that do
/// not serve the current one yet: (current, kind, older).
const OLDER_VERSIONS: &[(&str, &str, &str)] =
    &[("policy/v1", "PodDisruptionBudget", "policy/v1beta1")];

/// `object`, or the same at an older API version the server serves when it does not serve
/// `object`'s (a PodDisruptionBudget on Kubernetes 1.20).
fn served_version(discovery: &Discovery, object: &Value) -> Value {
    let served = |api_version: &str, kind: &str| {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        discovery
            .resolve_gvk(&GroupVersionKind::gvk(group, version, kind))
            .is_some()
    };
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    if !served(api_version, kind) {
        for (current, older_kind, older) in OLDER_VERSIONS {
            if *current == api_version && *older_kind == kind && served(older, kind) {
                let mut older_object = object.clone();
                older_object["apiVersion"] = Value::from(*older);
                return older_object;
            }
        }
    }
    object.clone()
}

/// Deletes `objects` in reverse order; those already gone are skipped.
pub async fn delete(client: &kube::Client, objects: &[Value]) -> anyhow::Result<()> {
    let discovery = discover_serving(client, &[]).await?;
    for object in objects.iter().rev() {
        let object = &served_version(&discovery, object);
        let Ok((api, name)) = api_for(client, &discovery, object) else {
            // Its kind is not served (a CRD already removed): nothing of it is left.
            continue;
        };
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => println!("deleted {}", describe(object)),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("deleting {}", describe(object))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crd_defines_its_kind_in_each_served_version() {
        let crd = serde_json::json!({
            "kind": "CustomResourceDefinition",
            "spec": {
                "group": "policy.mesh.dev",
                "names": {"kind": "Server"},
                "versions": [
                    {"name": "v1alpha1", "served": true},
                    {"name": "v1alpha0", "served": false},
                    {"name": "v1beta1"},
                ],
            },
        });
        let kinds: Vec<String> = crd_kinds(&crd)
            .iter()
            .map(|gvk| format!("{}/{} {}", gvk.group, gvk.version, gvk.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                "policy.mesh.dev/v1alpha1 Server",
                "policy.mesh.dev/v1beta1 Server"
            ]
        );
    }
}
