//! `meshctl install` and `meshctl uninstall`: the control plane's objects, printed as YAML or
//! applied to (deleted from) the cluster. The objects come from [`render`], their settings from
//! the Helm chart's own `values.yaml` ([`values`]), their keys from [`certs`].

pub mod certs;
pub mod render;
pub mod values;

#[cfg(test)]
mod chart_test;

use std::path::PathBuf;

use anyhow::Context;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

use crate::GlobalArgs;
use crate::kubernetes;
use certs::{IdentityPem, WebhookPem};
use render::names;
use values::Values;

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Apply the objects to the cluster (server-side apply) instead of printing them. A
    /// re-install keeps the cluster's identity issuer and webhook certificate while they are
    /// valid for 60 more days.
    #[arg(long)]
    apply: bool,
    /// Print only the CustomResourceDefinitions.
    #[arg(long, conflicts_with = "apply")]
    crds: bool,
    /// Print the values the objects are made from (generated keys included), for
    /// `helm install -f`.
    #[arg(long, conflicts_with_all = ["apply", "crds"])]
    print_values: bool,
    /// High availability: 3 replicas of the controller and the injector, spread over nodes.
    #[arg(long)]
    ha: bool,
    /// Mirror the Services of linked clusters (`meshctl multicluster link`): the chart's
    /// `multicluster.enabled`.
    #[arg(long)]
    multicluster: bool,
    /// Run the multicluster gateway, through which linked clusters reach this one's meshed
    /// pods: the chart's `multicluster.gateway.enabled`.
    #[arg(long)]
    multicluster_gateway: bool,
    /// A values file of the Helm chart (`charts/mesh/values.yaml` documents each field);
    /// repeatable, later files win.
    #[arg(short = 'f', long = "values")]
    values: Vec<PathBuf>,
    /// The trust anchors (PEM) every proxy verifies peers with; generated when absent.
    #[arg(long, requires_all = ["identity_issuer_certificate_file", "identity_issuer_key_file"])]
    identity_trust_anchors_file: Option<PathBuf>,
    /// The issuer certificate (PEM), signed by one of the trust anchors.
    #[arg(long, requires = "identity_trust_anchors_file")]
    identity_issuer_certificate_file: Option<PathBuf>,
    /// The issuer's private key (PEM).
    #[arg(long, requires = "identity_trust_anchors_file")]
    identity_issuer_key_file: Option<PathBuf>,
    /// The URL the API server calls for injection when the injector runs outside the cluster
    /// (development); default: the mesh-injector Service.
    #[arg(long)]
    webhook_url: Option<String>,
    /// The registry the images come from (`<registry>/<name>:<tag>`): e.g. `localhost/mesh`
    /// for the images `just images` built; default: the chart's, ghcr.io/mesh.
    #[arg(long)]
    registry: Option<String>,
    /// The images' tag; default: this meshctl's version.
    #[arg(long)]
    tag: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Delete the objects from the cluster instead of printing them. This removes the CRDs
    /// too, and with them every policy resource of the cluster.
    #[arg(long)]
    delete: bool,
}

pub fn run_install(args: InstallArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    if args.crds {
        return print_yaml(&render::crds().map_err(anyhow::Error::msg)?);
    }
    let mut values = values_from(&args, global)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let client = if args.apply {
            Some(kubernetes::client(global).await?)
        } else {
            None
        };
        fill_identity(&args, &mut values, client.as_ref()).await?;
        fill_webhook(&mut values, client.as_ref()).await?;
        if args.print_values {
            return print_values(&values);
        }
        let mut objects = render::crds().map_err(anyhow::Error::msg)?;
        objects.extend(render::control_plane(&values));
        match &client {
            Some(client) => {
                let objects = keep_foreign_crds(client, objects).await?;
                kubernetes::apply(client, &objects).await?;
                // Applied first, pruned after: the webhook and the control plane are never
                // without the objects they run on, and an upgrade leaves no stale ones behind.
                let selector = format!(
                    "app.kubernetes.io/part-of=mesh,mesh.dev/control-plane-ns={}",
                    values.namespace
                );
                kubernetes::prune(client, &objects, &selector).await?;
                println!("installed; `meshctl check` tells when the control plane is ready");
                Ok(())
            }
            None => print_yaml(&objects),
        }
    })
}

/// `meshctl upgrade`: `install --apply` over an installed control plane, which must be there.
pub fn run_upgrade(mut args: InstallArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    if args.crds || args.print_values {
        anyhow::bail!("upgrade applies: --crds and --print-values are for `meshctl install`");
    }
    let values = values_from(&args, global)?;
    runtime()?.block_on(async {
        let client = kubernetes::client(global).await?;
        let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
            kube::Api::namespaced(client, &values.namespace);
        let installed = deployments
            .get_opt(names::CONTROLLER)
            .await
            .with_context(|| {
                format!(
                    "reading deployment {}/{}",
                    values.namespace,
                    names::CONTROLLER
                )
            })?;
        let Some(installed) = installed else {
            anyhow::bail!(
                "nothing to upgrade: no {} deployment in namespace {} (install with `meshctl \
                 install --apply`)",
                names::CONTROLLER,
                values.namespace
            );
        };
        let image = installed
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.containers.into_iter().next())
            .and_then(|c| c.image)
            .unwrap_or_default();
        println!(
            "upgrading the control plane in {} (controller image was {image})",
            values.namespace
        );
        anyhow::Ok(())
    })?;
    args.apply = true;
    run_install(args, global)
}

pub fn run_uninstall(args: UninstallArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let mut tree = values::default_tree()?;
    // With HA and multicluster, so what only such an install has (disruption budgets, the
    // mirror writer's roles) is listed too.
    values::overlay(
        &mut tree,
        json!({"ha": true, "multicluster": {"enabled": true, "gateway": {"enabled": true}}}),
    );
    if let Some(ns) = &global.namespace {
        values::overlay(&mut tree, json!({"namespace": ns}));
    }
    let values = Values::from_tree(tree)?;
    let mut objects = render::crds().map_err(anyhow::Error::msg)?;
    objects.extend(render::control_plane(&values));
    if !args.delete {
        // Only what identifies each object: enough for `kubectl delete -f -`.
        let stubs: Vec<Value> = objects
            .iter()
            .map(|o| {
                json!({"apiVersion": o["apiVersion"], "kind": o["kind"], "metadata": {
                    "name": o["metadata"]["name"], "namespace": o["metadata"]["namespace"]}})
            })
            .map(drop_nulls)
            .collect();
        return print_yaml(&stubs);
    }
    runtime()?.block_on(async {
        let client = kubernetes::client(global).await?;
        kubernetes::delete(&client, &objects).await
    })
}

/// Leaves out our Gateway API subset where the cluster has the Gateway API's own CRDs (those
/// without our note): they are a superset, and replacing them would break other users.
async fn keep_foreign_crds(
    client: &kube::Client,
    objects: Vec<Value>,
) -> anyhow::Result<Vec<Value>> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let mut kept = Vec::with_capacity(objects.len());
    for object in objects {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        if object["kind"] == "CustomResourceDefinition"
            && name.ends_with(".gateway.networking.k8s.io")
        {
            let existing = crds
                .get_opt(name)
                .await
                .with_context(|| format!("reading CustomResourceDefinition {name}"))?;
            let foreign = existing.is_some_and(|crd| {
                !crd.metadata
                    .annotations
                    .unwrap_or_default()
                    .contains_key("mesh.dev/note")
            });
            if foreign {
                println!("kept the cluster's own CustomResourceDefinition {name}");
                continue;
            }
        }
        kept.push(object);
    }
    Ok(kept)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// The chart's defaults, then each values file, then the flags.
fn values_from(args: &InstallArgs, global: &GlobalArgs) -> anyhow::Result<Values> {
    let mut tree = values::default_tree()?;
    for path in &args.values {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the values file {}", path.display()))?;
        let overlay = values::parse_tree(&text).with_context(|| path.display().to_string())?;
        values::overlay(&mut tree, overlay);
    }
    if let Some(ns) = &global.namespace {
        values::overlay(&mut tree, json!({"namespace": ns}));
    }
    if args.ha {
        values::overlay(&mut tree, json!({"ha": true}));
    }
    if args.multicluster {
        values::overlay(&mut tree, json!({"multicluster": {"enabled": true}}));
    }
    if args.multicluster_gateway {
        values::overlay(
            &mut tree,
            json!({"multicluster": {"gateway": {"enabled": true}}}),
        );
    }
    if let Some(url) = &args.webhook_url {
        values::overlay(&mut tree, json!({"webhook": {"url": url}}));
    }
    if let Some(registry) = &args.registry {
        values::overlay(&mut tree, json!({"image": {"registry": registry}}));
    }
    if let Some(tag) = &args.tag {
        values::overlay(&mut tree, json!({"image": {"tag": tag}}));
    }
    Ok(Values::from_tree(tree)?)
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Identity from the flags' files, else the values, else the cluster's current issuer (a
/// re-install must not change the mesh's keys), else generated. Checked in every case.
async fn fill_identity(
    args: &InstallArgs,
    values: &mut Values,
    client: Option<&kube::Client>,
) -> anyhow::Result<()> {
    let (identity, source) = if let (Some(anchors), Some(crt), Some(key)) = (
        &args.identity_trust_anchors_file,
        &args.identity_issuer_certificate_file,
        &args.identity_issuer_key_file,
    ) {
        let identity = IdentityPem {
            trust_anchors: read(anchors)?,
            issuer_crt: read(crt)?,
            issuer_key: read(key)?,
        };
        (identity, "the --identity-* files")
    } else if !values.identity.issuer.crt_pem.is_empty() {
        let identity = IdentityPem {
            trust_anchors: values.identity.trust_anchors_pem.clone(),
            issuer_crt: values.identity.issuer.crt_pem.clone(),
            issuer_key: values.identity.issuer.key_pem.clone(),
        };
        (identity, "the values' identity")
    } else if let Some(existing) = existing_identity(client, &values.namespace).await? {
        (existing, "the cluster's current issuer")
    } else {
        (
            IdentityPem::generate(&values.trust_domain)?,
            "a generated issuer",
        )
    };
    identity.validate(source)?;
    values.identity.trust_anchors_pem = identity.trust_anchors;
    values.identity.issuer.crt_pem = identity.issuer_crt;
    values.identity.issuer.key_pem = identity.issuer_key;
    Ok(())
}

async fn secret_data(
    client: Option<&kube::Client>,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<std::collections::BTreeMap<String, String>>> {
    let Some(client) = client else {
        return Ok(None);
    };
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?;
    Ok(secret.and_then(|s| s.data).map(|data| {
        data.into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect()
    }))
}

async fn existing_identity(
    client: Option<&kube::Client>,
    namespace: &str,
) -> anyhow::Result<Option<IdentityPem>> {
    let Some(data) = secret_data(client, namespace, names::ISSUER_SECRET).await? else {
        return Ok(None);
    };
    let field = |key: &str| data.get(key).cloned().unwrap_or_default();
    let identity = IdentityPem {
        trust_anchors: field("ca.crt"),
        issuer_crt: field("tls.crt"),
        issuer_key: field("tls.key"),
    };
    // A broken or expired issuer in the cluster is reported, not silently replaced: the
    // proxies trust its anchor, and a new anchor would cut them off.
    identity
        .validate(&format!("Secret {namespace}/{}", names::ISSUER_SECRET))
        .context("give a valid issuer with --identity-* files")?;
    Ok(Some(identity))
}

/// The webhook certificate from the values, else the cluster's while it chains to its CA and
/// has 60 days left, else generated.
async fn fill_webhook(values: &mut Values, client: Option<&kube::Client>) -> anyhow::Result<()> {
    if !values.webhook.crt_pem.is_empty() {
        return Ok(());
    }
    let existing = secret_data(client, &values.namespace, names::INJECTOR_TLS_SECRET)
        .await?
        .map(|data| WebhookPem {
            ca_bundle: data.get("ca.crt").cloned().unwrap_or_default(),
            crt: data.get("tls.crt").cloned().unwrap_or_default(),
            key: data.get("tls.key").cloned().unwrap_or_default(),
        })
        .filter(webhook_still_good);
    let webhook = match existing {
        Some(webhook) => webhook,
        None => WebhookPem::generate(
            &values.namespace,
            &values.cluster_domain,
            &values.webhook.url,
        )?,
    };
    values.webhook.ca_bundle_pem = webhook.ca_bundle;
    values.webhook.crt_pem = webhook.crt;
    values.webhook.key_pem = webhook.key;
    Ok(())
}

fn webhook_still_good(webhook: &WebhookPem) -> bool {
    let (Ok(ca), Ok(crt)) = (
        certs::parse_bundle(&webhook.ca_bundle, "ca.crt"),
        certs::parse_bundle(&webhook.crt, "tls.crt"),
    ) else {
        return false;
    };
    let (Some(ca), Some(leaf)) = (ca.first(), crt.first()) else {
        return false;
    };
    leaf.is_signed_by(ca)
        && leaf.remaining() > certs::RENEW_BEFORE
        && ca.remaining() > certs::RENEW_BEFORE
}

/// The values as a YAML tree in the chart's field names.
pub fn values_tree(values: &Values) -> Value {
    json!({
        "namespace": values.namespace,
        "trustDomain": values.trust_domain,
        "clusterDomain": values.cluster_domain,
        "image": {
            "registry": values.image.registry,
            "tag": values.image.tag,
            "pullPolicy": values.image.pull_policy,
        },
        "ha": values.ha,
        "identity": {
            "trustAnchorsPEM": values.identity.trust_anchors_pem,
            "issuer": {
                "crtPEM": values.identity.issuer.crt_pem,
                "keyPEM": values.identity.issuer.key_pem,
            },
            "leafLifetime": values.identity.leaf_lifetime,
        },
        "webhook": {
            "caBundlePEM": values.webhook.ca_bundle_pem,
            "crtPEM": values.webhook.crt_pem,
            "keyPEM": values.webhook.key_pem,
            "failurePolicy": values.webhook.failure_policy,
            "timeoutSeconds": values.webhook.timeout_seconds,
            "url": values.webhook.url,
        },
        "proxy": {
            "defaultInboundPolicy": values.proxy.default_inbound_policy,
            "logLevel": values.proxy.log_level,
            "cpuRequest": values.proxy.cpu_request,
            "cpuLimit": values.proxy.cpu_limit,
            "memoryRequest": values.proxy.memory_request,
            "memoryLimit": values.proxy.memory_limit,
        },
        "egress": {
            "defaultPolicy": values.egress.default_policy,
        },
        "multicluster": {
            "enabled": values.multicluster.enabled,
            "gateway": {
                "enabled": values.multicluster.gateway.enabled,
                "serviceType": values.multicluster.gateway.service_type,
            },
        },
        "controllerLogLevel": values.controller_log_level,
        "dashboards": values.dashboards,
    })
}

fn print_values(values: &Values) -> anyhow::Result<()> {
    let yaml = serde_saphyr::to_string(&values_tree(values)).context("writing YAML")?;
    print!("{yaml}");
    Ok(())
}

fn print_yaml(objects: &[Value]) -> anyhow::Result<()> {
    let yaml = serde_saphyr::to_string_multiple(objects).context("writing YAML")?;
    print!("{yaml}");
    Ok(())
}

fn drop_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, drop_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}
