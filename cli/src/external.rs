//! `meshctl external-workload NAME`: what a host outside Kubernetes needs to join the mesh as
//! the ExternalWorkload NAME: its proxy's settings, a join token of its ServiceAccount (a
//! TokenRequest of bounded lifetime, which the controller's TokenReview accepts like a pod's
//! projected token) and the trust anchors, written to a folder, and the commands that start
//! the proxy there. The settings are a pure function ([`proxy_settings`]) with a table test;
//! only [`run`] talks to the cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

use crate::GlobalArgs;
use crate::install::render::names;
use crate::kubernetes;

/// The audience the controller's TokenReview requires (`mesh_controller::identity`).
const TOKEN_AUDIENCE: &str = "mesh.dev/identity";

/// `meshctl external-workload`.
#[derive(Debug, clap::Args)]
pub struct ExternalWorkloadArgs {
    /// The ExternalWorkload (in -n NAMESPACE) the host is.
    name: String,
    /// Where the host reaches the controller's gRPC port (`http://HOST:8086`): a LoadBalancer
    /// of mesh-controller, or an address routed to the cluster.
    #[arg(long)]
    controller_addr: String,
    /// The folder to write `proxy.env`, `token` and `ca-bundle.crt` to (created).
    #[arg(long)]
    out_dir: PathBuf,
    /// Where those files will be on the host, for the paths in `proxy.env` (default: the
    /// --out-dir).
    #[arg(long)]
    host_dir: Option<PathBuf>,
    /// How long the join token is valid (`24h`); the proxy renews its certificate with it, so
    /// run this again before it expires.
    #[arg(long, default_value = "24h", value_parser = crate::demo::parse_duration)]
    token_lifetime: Duration,
    /// The control plane's namespace.
    #[arg(long, default_value = "mesh-system")]
    control_plane_namespace: String,
}

/// What the ExternalWorkload and the install say about the host's proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub service_account: &'a str,
    pub trust_domain: &'a str,
    pub inbound_proxy_port: u16,
    pub controller_addr: &'a str,
}

/// The proxy's `MESH_PROXY_*` settings on the host, its files in `dir`.
pub fn proxy_settings(host: &Host<'_>, dir: &Path) -> Vec<(&'static str, String)> {
    let Host {
        namespace,
        name,
        service_account,
        trust_domain,
        inbound_proxy_port,
        controller_addr,
    } = host;
    vec![
        ("MESH_PROXY_CONTROLLER_ADDR", (*controller_addr).to_owned()),
        ("MESH_PROXY_NAMESPACE", (*namespace).to_owned()),
        // The name discovery and policy know it by.
        ("MESH_PROXY_POD", (*name).to_owned()),
        ("MESH_PROXY_WORKLOAD_KIND", "externalworkload".to_owned()),
        ("MESH_PROXY_WORKLOAD_NAME", (*name).to_owned()),
        (
            "MESH_PROXY_IDENTITY",
            format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
        ),
        (
            "MESH_PROXY_IDENTITY_TOKEN_FILE",
            dir.join("token").display().to_string(),
        ),
        (
            "MESH_PROXY_TRUST_ANCHORS_FILE",
            dir.join(names::TRUST_ROOTS_KEY).display().to_string(),
        ),
        (
            "MESH_PROXY_INBOUND_LISTEN",
            format!("0.0.0.0:{inbound_proxy_port}"),
        ),
        ("MESH_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140".to_owned()),
        ("MESH_PROXY_ADMIN_LISTEN", "0.0.0.0:4191".to_owned()),
    ]
}

/// How to start the proxy with the files in `dir`.
fn instructions(dir: &Path, host: &Host<'_>) -> String {
    let dir = dir.display();
    format!(
        "On the host, with those files in {dir}, as root (the proxy runs as its own user, \
         mesh-proxy):\n\n  \
         useradd --system mesh-proxy 2>/dev/null; chown -R mesh-proxy {dir}\n  \
         # capture: the host's TCP goes through the proxy (ssh stays out)\n  \
         mesh-proxy init --proxy-uid $(id -u mesh-proxy) --inbound-port {port} --skip-inbound-ports 22\n  \
         sudo -u mesh-proxy env $(grep -v '^#' {dir}/proxy.env | xargs) mesh-proxy\n\n\
         The token is valid for its lifetime only: run meshctl external-workload again before \
         it expires (the proxy reads the file again at each renewal).\n",
        port = host.inbound_proxy_port,
    )
}

/// Runs `meshctl external-workload`.
pub fn run(args: ExternalWorkloadArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(write(args, global))
}

async fn write(args: ExternalWorkloadArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let namespace = global
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let client = kubernetes::client(global).await?;
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "workload.mesh.dev",
        "v1alpha1",
        "ExternalWorkload",
    ));
    let workloads: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let workload = workloads
        .get_opt(&args.name)
        .await
        .with_context(|| format!("reading ExternalWorkload {namespace}/{}", args.name))?
        .with_context(|| format!("ExternalWorkload {namespace}/{} does not exist", args.name))?;
    let spec = &workload.data["spec"];
    let service_account = spec["serviceAccountName"].as_str().unwrap_or("default");
    let inbound_proxy_port = spec["inboundProxyPort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(4143);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &args.control_plane_namespace);
    let config = |name: &str| {
        let maps = maps.clone();
        let name = name.to_owned();
        async move {
            maps.get_opt(&name)
                .await
                .ok()
                .flatten()
                .and_then(|m| m.data)
        }
    };
    let trust_domain = config(names::CONFIG)
        .await
        .and_then(|d| d.get("trustDomain").cloned())
        .unwrap_or_else(|| "cluster.local".to_owned());
    let anchors = config(names::TRUST_ROOTS)
        .await
        .and_then(|d| d.get(names::TRUST_ROOTS_KEY).cloned())
        .with_context(|| {
            format!(
                "ConfigMap {}/{} has no trust anchors: is the mesh installed?",
                args.control_plane_namespace,
                names::TRUST_ROOTS
            )
        })?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client, &namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![TOKEN_AUDIENCE.to_owned()],
            expiration_seconds: Some(i64::try_from(args.token_lifetime.as_secs()).unwrap_or(86400)),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = accounts
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("a token of ServiceAccount {namespace}/{service_account} (does it exist?)")
        })?
        .status
        .context("the TokenRequest has no status")?
        .token;

    let host = Host {
        namespace: &namespace,
        name: &args.name,
        service_account,
        trust_domain: &trust_domain,
        inbound_proxy_port,
        controller_addr: &args.controller_addr,
    };
    let dir = &args.out_dir;
    let host_dir = args.host_dir.as_ref().unwrap_or(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let env: String = std::iter::once(format!(
        "# mesh-proxy of ExternalWorkload {namespace}/{}\n",
        args.name
    ))
    .chain(
        proxy_settings(&host, host_dir)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n")),
    )
    .collect();
    write_file(&dir.join("proxy.env"), &env, 0o644)?;
    write_file(&dir.join("token"), &token, 0o600)?;
    write_file(&dir.join(names::TRUST_ROOTS_KEY), &anchors, 0o644)?;
    println!(
        "Wrote {0}/proxy.env, {0}/token and {0}/{1}.",
        dir.display(),
        names::TRUST_ROOTS_KEY
    );
    print!("{}", instructions(host_dir, &host));
    Ok(())
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_is_the_workload_with_its_service_accounts_identity() {
        let host = Host {
            namespace: "shop",
            name: "legacy-1",
            service_account: "legacy",
            trust_domain: "cluster.local",
            inbound_proxy_port: 4200,
            controller_addr: "http://192.0.2.1:8086",
        };
        let settings: std::collections::BTreeMap<_, _> =
            proxy_settings(&host, Path::new("/etc/mesh"))
                .into_iter()
                .collect();
        let want = [
            ("MESH_PROXY_CONTROLLER_ADDR", "http://192.0.2.1:8086"),
            ("MESH_PROXY_NAMESPACE", "shop"),
            ("MESH_PROXY_POD", "legacy-1"),
            ("MESH_PROXY_WORKLOAD_KIND", "externalworkload"),
            (
                "MESH_PROXY_IDENTITY",
                "spiffe://cluster.local/ns/shop/sa/legacy",
            ),
            ("MESH_PROXY_IDENTITY_TOKEN_FILE", "/etc/mesh/token"),
            ("MESH_PROXY_TRUST_ANCHORS_FILE", "/etc/mesh/ca-bundle.crt"),
            ("MESH_PROXY_INBOUND_LISTEN", "0.0.0.0:4200"),
        ];
        for (key, value) in want {
            assert_eq!(settings.get(key).map(String::as_str), Some(value), "{key}");
        }
        let text = instructions(Path::new("/etc/mesh"), &host);
        assert!(
            text.contains("mesh-proxy init --proxy-uid $(id -u mesh-proxy) --inbound-port 4200"),
            "{text}"
        );
        assert!(
            text.contains("--skip-inbound-ports 22"),
            "ssh stays reachable: {text}"
        );
    }
}
