//! Finding and reaching the controller for `stat`, `edges`, `tap`, `top` and `dashboard`, in
//! this order:
//! - `--controller HOST:PORT`, a direct address;
//! - the local mesh's loopback forward, when a local mesh (`meshctl demo`, `meshctl local up`)
//!   is running or `--state-dir` names one;
//! - else the cluster of the kubeconfig (`--kubeconfig`, `--context`, `KUBECONFIG`): a
//!   port-forward through the API server to a Ready controller pod, as `kubectl port-forward`
//!   makes, so a laptop needs no route into the cluster and the API server decides who may
//!   open it (`create` on `pods/portforward` in the control plane's namespace).
//!
//! And the credentials shown to it: on a cluster the controller serves tap and stats only to
//! users RBAC allows (`mesh_controller::access`), who prove themselves with a bearer token:
//! `--token`, else the kubeconfig user's own token. A token goes only to the controller named
//! here: through the port-forward, or to the address the user typed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use secrecy::ExposeSecret as _;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::GlobalArgs;

/// How long connecting to the controller may take (a port-forward included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The label of the controller's pods, as the install sets it.
const CONTROLLER_SELECTOR: &str = "mesh.dev/control-plane-component=controller";

/// The controller container's gRPC port when it names none.
const DEFAULT_GRPC_PORT: u16 = 8086;

/// Where the controller is.
#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// The controller's gRPC address (HOST:PORT). Default: the local mesh's, when one runs on
    /// this machine; else a port-forward through the API server of the kubeconfig to a Ready
    /// controller pod.
    #[arg(long, env = "MESHCTL_CONTROLLER", value_name = "HOST:PORT")]
    pub controller: Option<String>,
    /// The local mesh's state folder (as for `meshctl local`), to find its controller.
    #[arg(long, env = "MESH_LOCAL_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The namespace of the control plane on a cluster.
    #[arg(long, default_value = "mesh-system", value_name = "NAMESPACE")]
    pub control_plane_namespace: String,
    /// The bearer token of a Kubernetes user or ServiceAccount, for a controller on a cluster:
    /// it serves tap and stats only to users RBAC allows (`kubectl create token NAME -n NS`
    /// makes one). Default: the kubeconfig user's token, when it has one. Sent to the
    /// controller named here, and nowhere else.
    #[arg(long, env = "MESH_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
}

impl ControllerArgs {
    /// The controller these flags (and the global ones) name; see the module's order.
    pub fn resolve(&self, global: &GlobalArgs) -> anyhow::Result<Controller> {
        let token = match self.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(token) => Some(bearer(token).context("--token")?),
        };
        let target = if let Some(addr) = &self.controller {
            Target::Address(addr.clone())
        } else if let Some(addr) = local_controller(self.state_dir.as_deref())? {
            Target::Address(addr)
        } else {
            Target::Cluster {
                global: global.clone(),
                namespace: self.control_plane_namespace.clone(),
            }
        };
        Ok(Controller { target, token })
    }
}

/// `Bearer <token>` as a gRPC metadata value.
fn bearer(token: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow!("the token is not printable ASCII"))
}

/// The controller to ask, and the credentials to show it.
#[derive(Clone)]
pub struct Controller {
    target: Target,
    token: Option<MetadataValue<Ascii>>,
}

#[derive(Clone, Debug)]
enum Target {
    /// `HOST:PORT` or a URL.
    Address(String),
    /// A Ready controller pod in `namespace` of the kubeconfig's cluster, by port-forward.
    Cluster {
        global: GlobalArgs,
        namespace: String,
    },
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Controller")
            .field("target", &self.target)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl std::fmt::Display for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            Target::Address(addr) => f.write_str(addr),
            Target::Cluster { namespace, .. } => {
                write!(f, "the controller in namespace {namespace} (port-forward)")
            }
        }
    }
}

impl Controller {
    /// A controller that needs no credentials (a local mesh's).
    pub fn local(addr: impl Into<String>) -> Self {
        Controller {
            target: Target::Address(addr.into()),
            token: None,
        }
    }

    /// A channel to it that shows the credentials with every call; each call may take
    /// `call_timeout` when given. A port-forward picks a Ready pod on each connect, so a
    /// reconnect reaches another replica when one went away.
    pub async fn channel(
        &self,
        call_timeout: Option<Duration>,
    ) -> anyhow::Result<ControllerChannel> {
        let with_timeout = |mut endpoint: Endpoint| {
            endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT);
            if let Some(timeout) = call_timeout {
                endpoint = endpoint.timeout(timeout);
            }
            endpoint
        };
        let (channel, kubeconfig_token) = match &self.target {
            Target::Address(addr) => {
                let url = if addr.contains("://") {
                    addr.clone()
                } else {
                    format!("http://{addr}")
                };
                let endpoint = Endpoint::from_shared(url.clone())
                    .with_context(|| format!("{addr:?} is not HOST:PORT"))?;
                let channel = with_timeout(endpoint)
                    .connect()
                    .await
                    .with_context(|| format!("connecting to the controller at {url}"))?;
                (channel, None)
            }
            Target::Cluster { global, namespace } => {
                port_forward(global, namespace, with_timeout).await?
            }
        };
        let token = self.token.clone().or(kubeconfig_token);
        Ok(InterceptedService::new(channel, Credentials(token)))
    }
}

/// A channel to the controller that sends the user's bearer token, when there is one.
pub type ControllerChannel = InterceptedService<Channel, Credentials>;

/// Adds `authorization: Bearer ...` to every call.
#[derive(Clone)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A channel whose every connection is a port-forward to a Ready controller pod in
/// `namespace`, and the kubeconfig user's bearer token, when it has one.
async fn port_forward(
    global: &GlobalArgs,
    namespace: &str,
    with_timeout: impl Fn(Endpoint) -> Endpoint,
) -> anyhow::Result<(Channel, Option<MetadataValue<Ascii>>)> {
    let config = crate::kubernetes::config(global).await?;
    let token = kubeconfig_token(&config)?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let found = tokio::time::timeout(
        CONNECT_TIMEOUT,
        pods.list(&ListParams::default().labels(CONTROLLER_SELECTOR)),
    )
    .await
    .map_err(|_| anyhow!("the API server did not answer within {CONNECT_TIMEOUT:?}"))?
    .with_context(|| {
        format!("listing the controller's pods in namespace {namespace} (may you list pods there?)")
    })?;
    if found.items.is_empty() {
        bail!(
            "the mesh is not installed in this cluster: no controller pod in namespace \
             {namespace} (install it with `meshctl install --apply`, or name its namespace with \
             --control-plane-namespace)"
        );
    }
    let Some((pod, port)) = found.items.iter().find_map(ready_controller) else {
        bail!(
            "the mesh's controller is not ready: none of its {} pods in namespace {namespace} is \
             Ready (see `kubectl -n {namespace} get pods -l {CONTROLLER_SELECTOR}`)",
            found.items.len()
        );
    };
    let where_ = format!("{namespace}/{pod}:{port}");
    let ns = namespace.to_owned();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (pods, pod, where_, ns) = (pods.clone(), pod.clone(), where_.clone(), ns.clone());
        async move {
            let mut forwarder = pods.portforward(&pod, &[port]).await.map_err(|e| {
                anyhow!(
                    "port-forwarding to the controller {where_} (needs the `create` verb on \
                     pods/portforward in namespace {ns}): {e}"
                )
            })?;
            let stream = forwarder
                .take_stream(port)
                .ok_or_else(|| anyhow!("the port-forward to {where_} opened no stream"))?;
            // The forwarder's task lives as long as the stream; nothing else to keep.
            Ok::<_, anyhow::Error>(TokioIo::new(stream))
        }
    });
    let channel = with_timeout(Endpoint::from_static("http://mesh-controller"))
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            // The connector's own error says what failed; tonic wraps it.
            let mut cause = String::new();
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(error) = source {
                cause = error.to_string();
                source = error.source();
            }
            anyhow!("connecting to the controller in namespace {namespace}: {cause}")
        })?;
    Ok((channel, token))
}

/// A Ready pod's name and its controller container's gRPC port.
fn ready_controller(pod: &Pod) -> Option<(String, u16)> {
    let ready = pod
        .status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("grpc"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_GRPC_PORT);
    Some((pod.metadata.name.clone()?, port))
}

/// The kubeconfig user's bearer token (`token`, or `tokenFile`), when it has one. Users of
/// client certificates or exec plugins have none here: they pass `--token`.
fn kubeconfig_token(config: &kube::Config) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
    let auth = &config.auth_info;
    let token = match (&auth.token, &auth.token_file) {
        (Some(token), _) => token.expose_secret().trim().to_owned(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("reading the kubeconfig's tokenFile {file}"))?
            .trim()
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if token.is_empty() {
        return Ok(None);
    }
    Ok(Some(bearer(&token).context("the kubeconfig's token")?))
}

/// The local mesh's controller: `None` when no local mesh runs and no state folder was named.
fn local_controller(state_dir: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let found = match crate::local::status_json(state_dir)? {
        Ok(state) => {
            controller_from_state(&state).ok_or_else(|| "its controller is not up yet".to_owned())
        }
        Err(reason) => Err(reason),
    };
    match found {
        Ok(addr) => Ok(Some(addr)),
        Err(why) if state_dir.is_some() => bail!(
            "no local mesh's controller in that --state-dir ({why}): start one with `meshctl \
             demo` or `meshctl local up -f FILE`"
        ),
        Err(_) => Ok(None),
    }
}

/// The local mesh's controller address, or why there is none.
pub fn local_address(state_dir: Option<&std::path::Path>) -> anyhow::Result<String> {
    local_controller(state_dir)?.ok_or_else(|| {
        anyhow!(
            "no local mesh runs on this machine: start one with `meshctl demo` or \
             `meshctl local up -f FILE`"
        )
    })
}

/// The controller's address as seen from this machine, in a local mesh's state.
pub fn controller_from_state(state: &serde_json::Value) -> Option<String> {
    state
        .pointer("/controller/grpc/from_host")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: &str, grpc: Option<i32>) -> Pod {
        let ports = grpc.map(|p| serde_json::json!([{"name": "grpc", "containerPort": p}]));
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "controller", "ports": ports}]},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }))
        .expect("a pod")
    }

    #[test]
    fn only_ready_pods_are_forwarded_to_on_their_grpc_port() {
        assert_eq!(
            ready_controller(&pod("c-1", "True", Some(9000))),
            Some(("c-1".to_owned(), 9000))
        );
        assert_eq!(
            ready_controller(&pod("c-2", "True", None)),
            Some(("c-2".to_owned(), DEFAULT_GRPC_PORT))
        );
        assert_eq!(ready_controller(&pod("c-3", "False", Some(9000))), None);
    }

    #[test]
    fn the_controller_comes_from_the_local_state() {
        let state = serde_json::json!({"controller": {"grpc": {"in_mesh": "10.77.0.1:8086", "from_host": "127.0.0.1:41234"}}});
        assert_eq!(
            controller_from_state(&state).as_deref(),
            Some("127.0.0.1:41234")
        );
        let starting = serde_json::json!({"controller": {"grpc": {"in_mesh": "10.77.0.1:8086", "from_host": null}}});
        assert_eq!(controller_from_state(&starting), None);
    }

    #[test]
    fn tokens_become_bearer_credentials() {
        assert_eq!(
            bearer("abc").expect("ascii").to_str().expect("text"),
            "Bearer abc"
        );
        assert!(bearer("a\nb").is_err());
    }
}
