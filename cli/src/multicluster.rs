//! `meshctl multicluster`: link clusters so each mirrors the Services the other exports.
//!
//! `link` runs against the cluster to be linked (the one exporting Services): it applies a
//! ServiceAccount there that may only read Services, EndpointSlices and Pods, waits for its
//! token, and prints (or applies to another cluster) the link Secret that the other cluster's
//! controller follows. `unlink` prints (or deletes) that Secret; the controller then removes
//! the mirrors. The objects are pure functions ([`reader_objects`], [`link_secret`]) with
//! table tests; only the thin `run_*` functions talk to clusters.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::GlobalArgs;
use crate::install::render::{GATEWAY_PORT, names};
use crate::kubernetes::{self, FIELD_MANAGER};
// The link's format is the controller's, read there (`mesh_controller::multicluster::link`).
use mesh_controller::multicluster::link::{
    ANNOTATION_GATEWAY, ANNOTATION_GATEWAY_IDENTITY, ANNOTATION_TRUST_DOMAIN, KEY_KUBECONFIG,
    LABEL_LINK, MAX_CLUSTER_NAME, SECRET_TYPE, is_cluster_name,
};

/// The reader's ServiceAccount, ClusterRole and binding in the linked cluster.
const READER: &str = "mesh-multicluster-reader";
/// How long `link` waits for the reader's token.
const TOKEN_PATIENCE: Duration = Duration::from_secs(30);

/// `meshctl multicluster`.
#[derive(Debug, clap::Args)]
pub struct MulticlusterArgs {
    #[command(subcommand)]
    command: MulticlusterCommand,
}

#[derive(Debug, clap::Subcommand)]
enum MulticlusterCommand {
    /// Against the cluster to link (the current context): make it readable by another
    /// cluster's controller and print the link Secret to apply there
    /// (`meshctl --context east multicluster link --cluster-name east | kubectl --context west
    /// apply -f -`).
    Link(LinkArgs),
    /// Against a cluster that follows a link: print (or delete, with --delete) its link
    /// Secret; the controller then deletes the linked cluster's mirrors.
    Unlink(UnlinkArgs),
}

#[derive(Debug, clap::Args)]
struct LinkArgs {
    /// The linked cluster's name: its mirrors are named `<service>-<name>`.
    #[arg(long)]
    cluster_name: String,
    /// The API server address the other cluster reaches this one at (default: the server of
    /// the current kubeconfig context).
    #[arg(long)]
    api_server: Option<String>,
    /// The trust domain of this cluster's identities; without it the other cluster assumes
    /// its own (clusters linked with one trust anchor usually share it).
    #[arg(long)]
    trust_domain: Option<String>,
    /// The address (`IP:port`) of this cluster's multicluster gateway, when the other
    /// cluster's pods cannot route to this one's: they then go through it.
    #[arg(long, conflicts_with = "gateway")]
    gateway_address: Option<std::net::SocketAddr>,
    /// Go through this cluster's gateway (`meshctl install --multicluster-gateway`), at the
    /// load balancer address of its Service.
    #[arg(long)]
    gateway: bool,
    /// The identity the gateway proves (default: ServiceAccount mesh-gateway of the control
    /// plane's namespace, in this cluster's trust domain).
    #[arg(long)]
    gateway_identity: Option<String>,
    /// Apply the link Secret to the cluster of this kubeconfig instead of printing it.
    #[arg(long)]
    to_kubeconfig: Option<std::path::PathBuf>,
    /// With --to-kubeconfig (or alone, in the default kubeconfig): the context to apply to.
    #[arg(long)]
    to_context: Option<String>,
}

#[derive(Debug, clap::Args)]
struct UnlinkArgs {
    /// The linked cluster's name.
    #[arg(long)]
    cluster_name: String,
    /// Delete the link Secret instead of printing it.
    #[arg(long)]
    delete: bool,
}

/// The control plane's namespace: where readers and links live.
fn mesh_namespace(global: &GlobalArgs) -> String {
    global
        .namespace
        .clone()
        .unwrap_or_else(|| "mesh-system".to_owned())
}

/// The name of the link Secret of `cluster`.
pub fn link_secret_name(cluster: &str) -> String {
    format!("cluster-{cluster}")
}

/// What the linked cluster needs so another cluster's controller can read it: a ServiceAccount
/// that may get, list and watch Services, EndpointSlices and Pods (nothing else, nothing
/// written), and a token Secret for it.
pub fn reader_objects(namespace: &str) -> Vec<Value> {
    let labels = json!({"app.kubernetes.io/part-of": "mesh", "app.kubernetes.io/name": READER});
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": READER, "namespace": namespace, "labels": labels}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": READER, "labels": labels},
        "rules": [
            {"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            // `meshctl check --multicluster` compares the clusters' trust anchors.
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [names::TRUST_ROOTS], "verbs": ["get"]},
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": READER, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": READER},
            "subjects": [{"kind": "ServiceAccount", "name": READER, "namespace": namespace}]}),
        // A long-lived token, as a link must outlive any one session; deleting this Secret
        // revokes it.
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
            "metadata": {"name": format!("{READER}-token"), "namespace": namespace, "labels": labels,
                "annotations": {"kubernetes.io/service-account.name": READER}}}),
    ]
}

/// What the other cluster is told of this one.
#[derive(Debug, Clone, Default)]
pub struct LinkTo<'a> {
    /// Its API server.
    pub server: &'a str,
    /// The API server's CA, base64 PEM.
    pub ca_data: &'a str,
    /// The reader's token.
    pub token: &'a str,
    /// Its trust domain, when not the other cluster's.
    pub trust_domain: Option<&'a str>,
    /// Its gateway and the gateway's identity, when its pods are reached through one.
    pub gateway: Option<(std::net::SocketAddr, String)>,
}

/// The link Secret for the other cluster: the linked cluster's name, trust domain, gateway and
/// a kubeconfig with the reader's token.
pub fn link_secret(namespace: &str, cluster: &str, to: &LinkTo<'_>) -> anyhow::Result<Value> {
    let LinkTo {
        server,
        ca_data,
        token,
        trust_domain,
        ..
    } = to;
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": READER, "user": {"token": token}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": READER}}],
        "current-context": cluster,
    });
    let kubeconfig = serde_saphyr::to_string(&kubeconfig).context("writing the kubeconfig")?;
    let mut secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": link_secret_name(cluster),
            "namespace": namespace,
            "labels": {LABEL_LINK: cluster, "app.kubernetes.io/part-of": "mesh"},
        },
        "stringData": {KEY_KUBECONFIG: kubeconfig},
    });
    let mut annotations = serde_json::Map::new();
    if let Some(domain) = trust_domain {
        annotations.insert(ANNOTATION_TRUST_DOMAIN.to_owned(), json!(domain));
    }
    if let Some((addr, identity)) = &to.gateway {
        annotations.insert(ANNOTATION_GATEWAY.to_owned(), json!(addr.to_string()));
        annotations.insert(ANNOTATION_GATEWAY_IDENTITY.to_owned(), json!(identity));
    }
    if !annotations.is_empty() {
        secret["metadata"]["annotations"] = Value::Object(annotations);
    }
    Ok(secret)
}

/// The cluster name as the controller will read it, checked before anything is applied.
fn check_cluster_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_cluster_name(name),
        "--cluster-name {name:?}: use lowercase letters, digits and '-', at most \
         {MAX_CLUSTER_NAME} characters, starting and ending with a letter or digit"
    );
    Ok(())
}

/// Runs `meshctl multicluster`.
pub fn run(args: MulticlusterArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match args.command {
        MulticlusterCommand::Link(link) => runtime.block_on(run_link(link, global)),
        MulticlusterCommand::Unlink(unlink) => runtime.block_on(run_unlink(unlink, global)),
    }
}

async fn run_link(args: LinkArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    check_cluster_name(&args.cluster_name)?;
    let namespace = mesh_namespace(global);
    let config = kubernetes::config(global).await?;
    let server = match &args.api_server {
        Some(server) => server.clone(),
        None => config.cluster_url.to_string(),
    };
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    for object in reader_objects(&namespace) {
        apply_typed(&client, &object).await?;
        eprintln!("applied {}", kubernetes::describe(&object));
    }
    let (token, ca_data) = reader_token(&client, &namespace).await?;
    let gateway_address = match (args.gateway_address, args.gateway) {
        (Some(addr), _) => Some(addr),
        (None, true) => Some(gateway_address(&client, &namespace).await?),
        (None, false) => None,
    };
    anyhow::ensure!(
        gateway_address.is_some() || args.gateway_identity.is_none(),
        "--gateway-identity needs --gateway or --gateway-address"
    );
    let gateway = gateway_address.map(|addr| {
        let identity = args.gateway_identity.clone().unwrap_or_else(|| {
            let domain = args.trust_domain.as_deref().unwrap_or("cluster.local");
            format!("spiffe://{domain}/ns/{namespace}/sa/mesh-gateway")
        });
        (addr, identity)
    });
    let secret = link_secret(
        &namespace,
        &args.cluster_name,
        &LinkTo {
            server: &server,
            ca_data: &ca_data,
            token: &token,
            trust_domain: args.trust_domain.as_deref(),
            gateway,
        },
    )?;
    if args.to_kubeconfig.is_none() && args.to_context.is_none() {
        print!(
            "{}",
            serde_saphyr::to_string(&secret).context("writing YAML")?
        );
        return Ok(());
    }
    let to = GlobalArgs {
        kubeconfig: args.to_kubeconfig.clone().or(global.kubeconfig.clone()),
        context: args.to_context.clone(),
        ..global.clone()
    };
    let target = kubernetes::client(&to).await?;
    apply_typed(&target, &secret)
        .await
        .context("applying the link Secret to the other cluster")?;
    eprintln!(
        "applied {}: its controller now mirrors the Services {} exports",
        kubernetes::describe(&secret),
        args.cluster_name
    );
    Ok(())
}

async fn run_unlink(args: UnlinkArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    check_cluster_name(&args.cluster_name)?;
    let namespace = mesh_namespace(global);
    let name = link_secret_name(&args.cluster_name);
    if !args.delete {
        let stub = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace}});
        print!(
            "{}",
            serde_saphyr::to_string(&stub).context("writing YAML")?
        );
        return Ok(());
    }
    let client = kubernetes::client(global).await?;
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    match secrets.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {
            println!(
                "deleted Secret {namespace}/{name}: the controller now deletes the mirrors of {}",
                args.cluster_name
            );
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => anyhow::bail!(
            "no link to {}: Secret {namespace}/{name} does not exist",
            args.cluster_name
        ),
        Err(e) => Err(e).with_context(|| format!("deleting Secret {namespace}/{name}")),
    }
}

/// Where other clusters reach this one's gateway: its Service's load balancer address.
async fn gateway_address(
    client: &kube::Client,
    namespace: &str,
) -> anyhow::Result<std::net::SocketAddr> {
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), namespace);
    let service = services
        .get_opt(names::GATEWAY)
        .await
        .with_context(|| format!("reading Service {namespace}/{}", names::GATEWAY))?
        .with_context(|| {
            format!(
                "Service {namespace}/{} does not exist: install with --multicluster-gateway",
                names::GATEWAY
            )
        })?;
    let ip = service
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .into_iter()
        .flatten()
        .find_map(|ingress| ingress.ip?.parse::<std::net::IpAddr>().ok())
        .with_context(|| {
            format!(
                "Service {namespace}/{} has no load balancer IP (yet): give --gateway-address \
                 IP:PORT, where the other cluster reaches it",
                names::GATEWAY
            )
        })?;
    Ok(std::net::SocketAddr::new(ip, GATEWAY_PORT))
}

/// Server-side applies one object of a built-in kind.
async fn apply_typed(client: &kube::Client, object: &Value) -> anyhow::Result<()> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let typed: DynamicObject = serde_json::from_value(object.clone()).with_context(|| {
        format!(
            "{} is not a Kubernetes object",
            kubernetes::describe(object)
        )
    })?;
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&typed),
    )
    .await
    .with_context(|| format!("applying {}", kubernetes::describe(object)))?;
    Ok(())
}

/// The reader's token and the cluster's CA (base64 PEM), once the token controller has
/// filled its Secret in.
async fn reader_token(client: &kube::Client, namespace: &str) -> anyhow::Result<(String, String)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = format!("{READER}-token");
    let deadline = tokio::time::Instant::now() + TOKEN_PATIENCE;
    loop {
        let secret = secrets
            .get(&name)
            .await
            .with_context(|| format!("reading Secret {namespace}/{name}"))?;
        // As JSON, `data` is base64: the token is decoded, the CA is wanted encoded.
        let data =
            serde_json::to_value(&secret).context("reading the token Secret")?["data"].clone();
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .and_then(|t| String::from_utf8(t.0.clone()).ok());
        if let (Some(token), Some(ca)) = (token, data["ca.crt"].as_str()) {
            return Ok((token, ca.to_owned()));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "Secret {namespace}/{name} has no token and ca.crt after {}s: is the cluster's \
             token controller running (kube-controller-manager with --root-ca-file)?",
            TOKEN_PATIENCE.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_may_only_read_what_mirrors_need() {
        let objects = reader_objects("mesh-system");
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Secret"
            ]
        );
        let rules = objects[1]["rules"].as_array().expect("rules");
        for rule in &rules[..2] {
            assert_eq!(
                rule["verbs"],
                json!(["get", "list", "watch"]),
                "read-only: {rule}"
            );
        }
        assert_eq!(
            rules[2],
            json!({"apiGroups": [""], "resources": ["configmaps"],
                   "resourceNames": ["mesh-identity-trust-roots"], "verbs": ["get"]}),
            "of ConfigMaps, the trust anchors only"
        );
        let resources: Vec<&str> = rules
            .iter()
            .flat_map(|r| r["resources"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            resources,
            ["services", "pods", "endpointslices", "configmaps"],
            "no Secrets, nothing else"
        );
        assert_eq!(
            objects[3]["metadata"]["annotations"]["kubernetes.io/service-account.name"],
            READER
        );
    }

    #[test]
    fn the_link_secret_holds_what_the_controller_reads() {
        let to = LinkTo {
            server: "https://10.0.0.1:6443",
            ca_data: "Q0E=",
            token: "tok",
            trust_domain: Some("east.example"),
            gateway: Some((
                "192.0.2.7:4143".parse().expect("an address"),
                "spiffe://east.example/ns/mesh-system/sa/mesh-gateway".to_owned(),
            )),
        };
        let secret = link_secret("mesh-system", "east", &to).expect("a link Secret");
        assert_eq!(secret["metadata"]["name"], "cluster-east");
        assert_eq!(secret["type"], SECRET_TYPE);
        // Read back as the controller reads it (the API server turns stringData into data).
        let mut applied = secret.clone();
        let text = applied["stringData"]["kubeconfig"].take();
        applied["stringData"] = json!({});
        let mut typed: Secret = serde_json::from_value(applied).expect("a Secret");
        typed.string_data = Some(
            [(
                KEY_KUBECONFIG.to_owned(),
                text.as_str().unwrap_or_default().to_owned(),
            )]
            .into(),
        );
        let link = mesh_controller::multicluster::Link::from_secret(&typed, "cluster.local")
            .expect("the controller reads the link");
        assert_eq!(link.cluster, "east");
        assert_eq!(link.trust_domain, "east.example");
        let gateway = link.gateway.expect("the gateway");
        assert_eq!(gateway.addr.to_string(), "192.0.2.7:4143");
        assert_eq!(
            &*gateway.identity,
            "spiffe://east.example/ns/mesh-system/sa/mesh-gateway"
        );
        let kubeconfig =
            kube::config::Kubeconfig::from_yaml(&link.kubeconfig).expect("a kubeconfig");
        let cluster = kubeconfig.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("Q0E="));
        assert_eq!(kubeconfig.current_context.as_deref(), Some("east"));

        let flat = link_secret(
            "mesh-system",
            "east",
            &LinkTo {
                trust_domain: None,
                gateway: None,
                ..to
            },
        )
        .expect("a link");
        assert!(
            flat["metadata"]["annotations"].is_null(),
            "the local trust domain is assumed, and the networks are flat"
        );
    }

    #[test]
    fn cluster_names_are_checked_before_anything_is_applied() {
        assert!(check_cluster_name("east").is_ok());
        assert!(check_cluster_name("us-east-1").is_ok());
        for bad in [
            "",
            "East",
            "-east",
            "east-",
            "a.b",
            "a-very-long-cluster-name",
        ] {
            let error = check_cluster_name(bad).expect_err(bad).to_string();
            assert!(error.contains("--cluster-name"), "{error}");
        }
    }
}
