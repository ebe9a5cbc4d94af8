//! The Kubernetes client of `install --apply`, `uninstall --delete` and `check`, from the global
//! `--kubeconfig`/`--context` flags, and server-side apply of untyped objects.

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
    kube::Client::try_from(config).context("building the Kubernetes client")
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

/// Server-side applies `objects` in order. CRDs go first and discovery is refreshed after
/// them, so later objects may be of their kinds.
pub async fn apply(client: &kube::Client, objects: &[Value]) -> anyhow::Result<()> {
    let mut discovery = Discovery::new(client.clone())
        .run()
        .await
        .context("discovering the API server's resources")?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut saw_crd = false;
    for object in objects {
        let is_crd = object["kind"] == "CustomResourceDefinition";
        if saw_crd && !is_crd {
            // The CRDs' kinds must be served before anything of those kinds is applied.
            discovery = Discovery::new(client.clone())
                .run()
                .await
                .context("discovering the API server's resources")?;
            saw_crd = false;
        }
        saw_crd |= is_crd;
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

/// Deletes `objects` in reverse order; those already gone are skipped.
pub async fn delete(client: &kube::Client, objects: &[Value]) -> anyhow::Result<()> {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .context("discovering the API server's resources")?;
    for object in objects.iter().rev() {
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
