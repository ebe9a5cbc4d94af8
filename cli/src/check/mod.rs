//! `meshctl check`: is the mesh installed and healthy? Each check is one line with a tick or a
//! cross; each cross says what is wrong and the command that fixes it. `--pre` checks that an
//! install can succeed; `--proxy` checks the meshed pods too. Exit status 1 when any fails.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::PostParams;

use crate::output::Output;
use serde::Serialize;

use crate::GlobalArgs;
use crate::install::certs;
use crate::install::render::{self, names};
use crate::kubernetes;

mod egress;
mod multicluster;
mod proxies;

use proxies::{identity_checks, proxy_certificates_check, proxy_check};

/// The oldest Kubernetes the mesh supports.
const MIN_MINOR: u32 = 20;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Check that the mesh can be installed (API, version, permissions) instead.
    #[arg(long)]
    pre: bool,
    /// Also check the meshed pods' proxies (version, readiness).
    #[arg(long, conflicts_with = "pre")]
    proxy: bool,
    /// Also check the linked clusters: links valid, their API servers reachable, mirrors in
    /// step, trust anchors shared.
    #[arg(long, conflicts_with = "pre")]
    multicluster: bool,
    /// The control plane's namespace.
    #[arg(long, default_value = "mesh-system")]
    control_plane_namespace: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    /// Passed, but something looks wrong: said, and not counted as a failure.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Outcome {
    fn pass(name: &str, detail: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            ok: true,
            warning: false,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            ok: false,
            warning: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            warning: true,
            ok: true,
            ..Self::fail(name, detail, fix)
        }
    }
}

pub fn run(args: CheckArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let outcomes = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(checks(&args, global));
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    match args.output {
        Output::Json | Output::Yaml => {
            args.output
                .print(&serde_json::json!({"ok": failed == 0, "checks": outcomes}))?;
        }
        Output::Table => {
            for outcome in &outcomes {
                let mark = match (outcome.ok, outcome.warning) {
                    (true, false) => '✔',
                    (true, true) => '⚠',
                    (false, _) => '✘',
                };
                println!("{mark} {}: {}", outcome.name, outcome.detail);
                if let Some(fix) = &outcome.fix {
                    println!("    fix: {fix}");
                }
            }
            println!(
                "{}",
                if failed == 0 {
                    "Status check results are ✔".to_owned()
                } else {
                    format!("{failed} check(s) failed")
                }
            );
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn checks(args: &CheckArgs, global: &GlobalArgs) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let client = match kubernetes::client(global).await {
        Ok(client) => client,
        Err(e) => {
            outcomes.push(Outcome::fail(
                "kubernetes-config",
                format!("{e:#}"),
                "set --kubeconfig (or KUBECONFIG) and --context to a cluster you can reach",
            ));
            return outcomes;
        }
    };
    let (reachable, version_ok) = api_checks(&client).await;
    let stop = !reachable.ok;
    outcomes.push(reachable);
    outcomes.extend(version_ok);
    if stop {
        return outcomes;
    }
    if args.pre {
        outcomes.extend(pre_checks(&client).await);
        return outcomes;
    }
    let ns = args.control_plane_namespace.as_str();
    outcomes.push(namespace_check(&client, ns).await);
    outcomes.push(crd_check(&client).await);
    outcomes.push(deployment_check(&client, ns, names::CONTROLLER).await);
    outcomes.push(deployment_check(&client, ns, names::INJECTOR).await);
    // The multicluster gateway, when installed.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    if let Ok(Some(_)) = deployments.get_opt(names::GATEWAY).await {
        outcomes.push(deployment_check(&client, ns, names::GATEWAY).await);
    }
    outcomes.push(webhook_check(&client, ns).await);
    outcomes.extend(identity_checks(&client, ns).await);
    outcomes.push(egress::egress_check(&client).await);
    if args.proxy {
        outcomes.push(proxy_check(&client, global.namespace.as_deref()).await);
        outcomes.push(proxy_certificates_check(&client, ns, global.namespace.as_deref()).await);
    }
    if args.multicluster {
        let trust_domain = installed_trust_domain(&client, ns).await;
        outcomes.extend(multicluster::multicluster_checks(&client, ns, &trust_domain).await);
    }
    outcomes
}

/// The trust domain the install was made with (its `mesh-config`), `cluster.local` when unknown.
async fn installed_trust_domain(client: &kube::Client, ns: &str) -> String {
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), ns);
    maps.get_opt(names::CONFIG)
        .await
        .ok()
        .flatten()
        .and_then(|m| m.data?.get("trustDomain").cloned())
        .unwrap_or_else(|| "cluster.local".to_owned())
}

async fn api_checks(client: &kube::Client) -> (Outcome, Option<Outcome>) {
    const NAME: &str = "kubernetes-api";
    let version =
        match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
            Ok(Ok(version)) => version,
            Ok(Err(e)) => {
                return (
                    Outcome::fail(
                        NAME,
                        format!("cannot reach the API server: {e}"),
                        "check --kubeconfig/--context and that the cluster is up (kubectl version)",
                    ),
                    None,
                );
            }
            Err(_) => {
                return (
                    Outcome::fail(
                        NAME,
                        "the API server did not answer within 10s",
                        "check --kubeconfig/--context and that the cluster is up (kubectl version)",
                    ),
                    None,
                );
            }
        };
    let reachable = Outcome::pass(NAME, format!("reached {}", version.git_version));
    let minor: Option<u32> = version
        .minor
        .trim_end_matches('+')
        .parse()
        .ok()
        .filter(|_| version.major == "1");
    let supported = match minor {
        Some(minor) if minor >= MIN_MINOR => Outcome::pass(
            "kubernetes-version",
            format!(
                "{} is supported (1.{MIN_MINOR} or newer)",
                version.git_version
            ),
        ),
        _ => Outcome::fail(
            "kubernetes-version",
            format!(
                "{} is older than 1.{MIN_MINOR} (or unrecognised)",
                version.git_version
            ),
            format!("upgrade the cluster to Kubernetes 1.{MIN_MINOR} or newer"),
        ),
    };
    (reachable, Some(supported))
}

/// Whether this user may create each kind the install creates.
async fn pre_checks(client: &kube::Client) -> Vec<Outcome> {
    const KINDS: &[(&str, &str, bool)] = &[
        ("apiextensions.k8s.io", "customresourcedefinitions", false),
        ("", "namespaces", false),
        ("rbac.authorization.k8s.io", "clusterroles", false),
        ("rbac.authorization.k8s.io", "clusterrolebindings", false),
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            false,
        ),
        ("", "serviceaccounts", true),
        ("", "secrets", true),
        ("", "configmaps", true),
        ("", "services", true),
        ("apps", "deployments", true),
    ];
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for (group, resource, namespaced) in KINDS {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some((*group).to_owned()),
                    resource: Some((*resource).to_owned()),
                    verb: Some("create".to_owned()),
                    namespace: namespaced.then(|| "mesh-system".to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match reviews.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => denied.push((*resource).to_owned()),
            Err(e) => denied.push(format!("{resource} (review failed: {e})")),
        }
    }
    let outcome = if denied.is_empty() {
        Outcome::pass(
            "install-permissions",
            "may create every kind of object the install creates",
        )
    } else {
        Outcome::fail(
            "install-permissions",
            format!("may not create: {}", denied.join(", ")),
            "run the install as a cluster admin (e.g. a context bound to cluster-admin)",
        )
    };
    vec![outcome]
}

async fn namespace_check(client: &kube::Client, ns: &str) -> Outcome {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.get_opt(ns).await {
        Ok(Some(_)) => Outcome::pass("control-plane-namespace", format!("{ns} exists")),
        Ok(None) => Outcome::fail(
            "control-plane-namespace",
            format!("namespace {ns} does not exist: the mesh is not installed"),
            "meshctl install --apply",
        ),
        Err(e) => Outcome::fail(
            "control-plane-namespace",
            format!("cannot read namespace {ns}: {e}"),
            "check that you may read namespaces",
        ),
    }
}

async fn crd_check(client: &kube::Client) -> Outcome {
    const NAME: &str = "crds";
    let Ok(wanted) = render::crds() else {
        return Outcome::fail(NAME, "meshctl's own CRDs do not parse", "report this bug");
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    for crd in &wanted {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        match crds.get_opt(name).await {
            Ok(Some(found)) => {
                let established = found
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if !established {
                    missing.push(format!("{name} (not established)"));
                }
            }
            Ok(None) => missing.push(name.to_owned()),
            Err(e) => missing.push(format!("{name} (cannot read: {e})")),
        }
    }
    if missing.is_empty() {
        Outcome::pass(NAME, format!("all {} CRDs are installed", wanted.len()))
    } else {
        Outcome::fail(
            NAME,
            format!("missing: {}", missing.join(", ")),
            "meshctl install --crds | kubectl apply -f -",
        )
    }
}

async fn deployment_check(client: &kube::Client, ns: &str, name: &str) -> Outcome {
    let check = format!("{name}-ready");
    let fix = format!("kubectl -n {ns} describe deploy/{name}; kubectl -n {ns} logs deploy/{name}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    match deployments.get_opt(name).await {
        Ok(Some(deployment)) => {
            let wanted = deployment.spec.and_then(|s| s.replicas).unwrap_or(1);
            let ready = deployment
                .status
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            if ready >= 1 {
                Outcome::pass(&check, format!("{ready} of {wanted} replicas ready"))
            } else {
                Outcome::fail(&check, format!("0 of {wanted} replicas ready"), fix)
            }
        }
        Ok(None) => Outcome::fail(
            &check,
            format!("deployment {ns}/{name} does not exist"),
            "meshctl install --apply",
        ),
        Err(e) => Outcome::fail(&check, format!("cannot read deploy/{name}: {e}"), fix),
    }
}

async fn secret_text(
    client: &kube::Client,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<String, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read Secret {ns}/{name}: {e}"))?
        .ok_or_else(|| format!("Secret {ns}/{name} does not exist"))?;
    secret
        .data
        .and_then(|data| {
            data.get(key)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        })
        .ok_or_else(|| format!("Secret {ns}/{name} has no {key}"))
}

/// The webhook is configured, its CA bundle signed the injector's certificate, that
/// certificate has time left, and (for an injector at a URL) the injector serves it.
async fn webhook_check(client: &kube::Client, ns: &str) -> Outcome {
    const NAME: &str = "injector-webhook";
    let renew = "meshctl install --apply (renews the webhook certificate)";
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let webhook = match configs.get_opt(names::WEBHOOK).await {
        Ok(Some(config)) => config.webhooks.unwrap_or_default().into_iter().next(),
        Ok(None) => None,
        Err(e) => {
            return Outcome::fail(
                NAME,
                format!("cannot read the webhook configuration: {e}"),
                renew,
            );
        }
    };
    let Some(webhook) = webhook else {
        return Outcome::fail(
            NAME,
            format!("MutatingWebhookConfiguration {} is missing", names::WEBHOOK),
            "meshctl install --apply",
        );
    };
    let bundle_pem = webhook
        .client_config
        .ca_bundle
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default();
    let ca = match certs::parse_bundle(&bundle_pem, "the webhook's caBundle") {
        Ok(ca) => ca,
        Err(e) => return Outcome::fail(NAME, e.to_string(), renew),
    };
    let serving = match secret_text(client, ns, names::INJECTOR_TLS_SECRET, "tls.crt")
        .await
        .and_then(|pem| {
            certs::parse_bundle(&pem, "the injector's tls.crt").map_err(|e| e.to_string())
        }) {
        Ok(serving) => serving,
        Err(e) => return Outcome::fail(NAME, e, renew),
    };
    let Some(leaf) = serving.first() else {
        return Outcome::fail(NAME, "the injector's tls.crt is empty", renew);
    };
    if !ca.iter().any(|ca| leaf.is_signed_by(ca)) {
        return Outcome::fail(
            NAME,
            "the injector's certificate is not signed by the webhook's caBundle: the API server will refuse it",
            renew,
        );
    }
    if leaf.remaining() < certs::RENEW_BEFORE {
        return Outcome::fail(
            NAME,
            format!(
                "the injector's certificate {}",
                certs::describe_expiry(leaf)
            ),
            renew,
        );
    }
    if let Some(url) = webhook.client_config.url.as_deref()
        && let Err(e) = served_chain_ok(url, &bundle_pem).await
    {
        return Outcome::fail(
            NAME,
            format!("the injector at {url} does not serve a certificate of the caBundle: {e}"),
            "start the injector with the certificate of Secret mesh-injector-tls",
        );
    }
    Outcome::pass(
        NAME,
        format!(
            "configured; its certificate chains to the caBundle and {}",
            certs::describe_expiry(leaf)
        ),
    )
}

/// A TLS handshake with the injector at `url`, trusting only `bundle_pem`.
async fn served_chain_ok(url: &str, bundle_pem: &str) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    let authority = url
        .strip_prefix("https://")
        .and_then(|rest| rest.split('/').next())
        .ok_or("not an https:// URL")?;
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_matches(['[', ']']);
    let address = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        let der = der.map_err(|e| e.to_string())?;
        roots.add(der).map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| "no answer within 5s".to_owned())??;
    Ok(())
}
