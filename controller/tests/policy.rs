//! Policy end to end with the file backend: real tonic clients watch `InboundPolicies` and
//! `OutboundPolicies` on `run()`'s gRPC port while the folder's files change.

use std::path::PathBuf;
use std::time::Duration;

use mesh_controller::{Config, Discovery};
use mesh_proto::common::WorkloadRef;
use mesh_proto::policy::inbound_policies_client::InboundPoliciesClient;
use mesh_proto::policy::outbound_policies_client::OutboundPoliciesClient;
use mesh_proto::policy::{
    InboundPolicyRequest, InboundServer, OutboundPolicy, OutboundPolicyRequest, authentication,
    outbound_policy_request,
};
use tokio::sync::oneshot;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\n\
spec:\n  serviceAccountName: web\n  containers: [{name: app, ports: [{containerPort: 8080, name: http}]}]\n\
status: {podIP: 10.0.0.5, phase: Running, conditions: [{type: Ready, status: 'True'}]}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: books, namespace: shop}\n\
spec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

const SERVER_AND_POLICY: &str = "apiVersion: policy.mesh.dev/v1alpha1\nkind: Server\n\
metadata: {name: web-http, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  port: http\n  proxyProtocol: HTTP/1\n---\n\
apiVersion: policy.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: from-api, namespace: shop}\n\
spec:\n  targetRef: {group: policy.mesh.dev, kind: Server, name: web-http}\n  \
requiredAuthenticationRefs: [{kind: ServiceAccount, name: api}]\n";

fn route(weight_v2: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: split, namespace: shop}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: books, port: 80}}]\n  \
         rules: [{{backendRefs: [{{name: books, port: 80, weight: 90}}, {{name: books-v2, port: 80, weight: {weight_v2}}}]}}]\n"
    )
}

struct Controller {
    grpc: std::net::SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), mesh_controller::Error>>,
}

impl Controller {
    async fn start(name: &str, files: &[(&str, &str)]) -> Controller {
        let dir = std::env::temp_dir().join(format!(
            "mesh-controller-policy-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the config folder");
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("write a file");
        }
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin");
        let grpc_addr = grpc.local_addr().expect("gRPC address");
        let config = Config::new(Discovery::File {
            dir: dir.clone(),
            poll_interval: Duration::from_millis(20),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
            let _ = stopped.await;
        }));
        Controller {
            grpc: grpc_addr,
            dir,
            stop: Some(stop),
            task,
        }
    }

    fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write a temp file");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename into place");
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the controller stops promptly")
            .expect("the controller task does not panic")
            .expect("the controller stops cleanly");
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    async fn inbound(&self, port: u32) -> Streaming<InboundServer> {
        let mut client = InboundPoliciesClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect");
        client
            .watch(InboundPolicyRequest {
                workload: Some(WorkloadRef {
                    namespace: "shop".to_owned(),
                    kind: "pod".to_owned(),
                    name: "web-1".to_owned(),
                    pod: "web-1".to_owned(),
                }),
                port,
            })
            .await
            .expect("the inbound watch opens")
            .into_inner()
    }

    async fn outbound(
        &self,
        target: outbound_policy_request::Target,
    ) -> Result<Streaming<OutboundPolicy>, tonic::Status> {
        let mut client = OutboundPoliciesClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect");
        client
            .watch(OutboundPolicyRequest {
                source: Some(WorkloadRef {
                    namespace: "web".to_owned(),
                    ..WorkloadRef::default()
                }),
                target: Some(target),
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

async fn next<T>(stream: &mut Streaming<T>) -> T {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an update in time")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

async fn quiet<T: std::fmt::Debug>(stream: &mut Streaming<T>) {
    if let Ok(message) = tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
        panic!("expected no update, got {message:?}");
    }
}

fn weights(policy: &OutboundPolicy) -> Vec<u32> {
    policy
        .routes
        .iter()
        .flat_map(|r| r.backends.iter().map(|b| b.weight))
        .collect()
}

#[tokio::test]
async fn inbound_policy_follows_servers_and_authorization_policies() {
    let controller = Controller::start("inbound", &[("base.yaml", BASE)]).await;
    let mut stream = controller.inbound(8080).await;
    let first = next(&mut stream).await;
    assert_eq!(first.name, "default:all-unauthenticated");

    controller.write("policy.yaml", SERVER_AND_POLICY);
    let second = next(&mut stream).await;
    assert_eq!(second.name, "web-http");
    let identities = match second.authorizations[0]
        .authentication
        .as_ref()
        .and_then(|a| a.kind.as_ref())
    {
        Some(authentication::Kind::MeshTls(tls)) => tls.identities.clone(),
        other => panic!("expected mesh TLS, got {other:?}"),
    };
    assert_eq!(identities, ["spiffe://cluster.local/ns/shop/sa/api"]);

    // An unrelated change sends nothing: identical policies are not resent.
    controller.write(
        "other.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
    );
    quiet(&mut stream).await;

    // Removing the Server brings the default back.
    controller.write("policy.yaml", "");
    assert_eq!(next(&mut stream).await.name, "default:all-unauthenticated");
    controller.stop().await;
}

#[tokio::test]
async fn outbound_policy_follows_routes_and_keeps_the_last_valid_one() {
    let controller = Controller::start("outbound", &[("base.yaml", BASE)]).await;
    let by_name =
        outbound_policy_request::Target::Authority("books.shop.svc.cluster.local:80".to_owned());
    let status = controller
        .outbound(by_name.clone())
        .await
        .expect_err("no routes, no annotations: no policy");
    assert_eq!(status.code(), Code::NotFound);

    controller.write("route.yaml", &route("10"));
    let mut stream = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match controller.outbound(by_name.clone()).await {
                Ok(stream) => break stream,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("the route never applied: {status}"),
            }
        }
    };
    let first = next(&mut stream).await;
    assert_eq!(first.service, "books.shop.svc.cluster.local:80");
    assert_eq!(weights(&first), [90, 10]);

    // By cluster IP, the same policy.
    let addr: std::net::SocketAddr = "10.96.0.10:80".parse().expect("address");
    let mut by_ip = controller
        .outbound(outbound_policy_request::Target::Addr(addr.into()))
        .await
        .expect("by cluster IP");
    assert_eq!(weights(&next(&mut by_ip).await), [90, 10]);

    // A bad route (negative weight) is reported; the last valid policy stays.
    controller.write("route.yaml", &route("-5"));
    quiet(&mut stream).await;

    // Fixed: the new policy arrives.
    controller.write("route.yaml", &route("30"));
    assert_eq!(weights(&next(&mut stream).await), [90, 30]);

    // A Service annotation adds retries.
    controller.write(
        "base.yaml",
        &BASE.replace(
            "metadata: {name: books, namespace: shop}",
            "metadata: {name: books, namespace: shop, annotations: {retry.mesh.dev/http: 5xx}}",
        ),
    );
    let with_retries = next(&mut stream).await;
    assert_eq!(
        with_retries.retry.map(|r| r.conditions),
        Some(vec!["5xx".to_owned()])
    );
    controller.stop().await;
}
