//! The real controller on 127.0.0.1:0 over a folder of YAML, a real tonic client, and edits to
//! the files: each change arrives on an open `Destination.Get` stream as the right diff.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_controller::identity::GeneratedCa;
use mesh_controller::{Config, Discovery, IdentityOptions};
use mesh_proto::destination::destination_client::DestinationClient;
use mesh_proto::destination::{GetDestination, ProtocolHint, Update, get_destination, update};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tonic::Streaming;
use tonic::transport::Channel;

/// Bound on every wait: a change reaches a stream in ~one poll (20 ms here).
const WAIT: Duration = Duration::from_secs(5);

struct Controller {
    grpc: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), mesh_controller::Error>>,
}

impl Controller {
    /// Starts the controller over a new folder holding `files`, written before the start so
    /// the first scan (and so `/ready`) already includes them.
    async fn start(name: &str, files: &[(&str, &str)]) -> Controller {
        Self::start_polling(name, files, Duration::from_millis(20)).await
    }

    /// [`Controller::start`] with its poll every `poll_interval`.
    async fn start_polling(
        name: &str,
        files: &[(&str, &str)],
        poll_interval: Duration,
    ) -> Controller {
        let dir =
            std::env::temp_dir().join(format!("mesh-controller-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the config folder");
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("write an initial file");
        }
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin");
        let grpc_addr = grpc.local_addr().expect("gRPC address");
        let admin_addr = admin.local_addr().expect("admin address");
        let mut config = Config::new(Discovery::File {
            dir: dir.clone(),
            poll_interval,
        });
        // With a CA, as a local mesh runs: meshed endpoints carry their identities.
        let identity_dir = std::env::temp_dir().join(format!(
            "mesh-controller-it-{name}-identity-{}",
            std::process::id()
        ));
        GeneratedCa::generate(
            "cluster.local",
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        )
        .expect("generate a CA")
        .write_dir(&identity_dir)
        .expect("write the CA in cert-manager's layout");
        config.identity = Some(IdentityOptions::new(identity_dir));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
            let _ = stopped.await;
        }));
        Controller {
            grpc: grpc_addr,
            admin: admin_addr,
            dir,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> DestinationClient<Channel> {
        DestinationClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to the controller")
    }

    /// Writes a file atomically (temp name, then rename), as editors and tools should.
    fn write(&self, name: &str, text: &str) {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write a temp file");
        std::fs::rename(&tmp, &path).expect("rename into place");
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).expect("remove a file");
    }

    async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the controller stops promptly")
            .expect("the controller task does not panic");
        result.expect("the controller stops cleanly");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal HTTP/1.0 GET: the admin port needs nothing more, and the test stays free of an
/// HTTP client dependency.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("admin connect in time")
        .expect("admin connect");
    let request = format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("admin answers in time")
        .expect("read the response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn authority(text: &str) -> GetDestination {
    GetDestination {
        target: Some(get_destination::Target::Authority(text.to_owned())),
        source: None,
    }
}

fn address(text: &str) -> GetDestination {
    let addr: SocketAddr = text.parse().expect("test address");
    GetDestination {
        target: Some(get_destination::Target::Addr(addr.into())),
        source: None,
    }
}

/// An update as a short string: `+a,b`, `-a,b`, `none(exists)`.
fn show(update: &Update) -> String {
    let addr = |a: &mesh_proto::common::SocketAddress| {
        SocketAddr::try_from(a)
            .expect("a valid address")
            .to_string()
    };
    match &update.update {
        Some(update::Update::Add(add)) => {
            let mut addrs: Vec<String> = add
                .endpoints
                .iter()
                .map(|e| addr(e.addr.as_ref().expect("endpoints have addresses")))
                .collect();
            addrs.sort();
            format!("+{}", addrs.join(","))
        }
        Some(update::Update::Remove(remove)) => {
            let mut addrs: Vec<String> = remove.addrs.iter().map(addr).collect();
            addrs.sort();
            format!("-{}", addrs.join(","))
        }
        Some(update::Update::NoEndpoints(none)) => format!("none({})", none.exists),
        None => "empty".to_owned(),
    }
}

async fn next(stream: &mut Streaming<Update>) -> Update {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an update arrives in time")
        .expect("the stream is healthy")
        .expect("the stream is still open")
}

async fn expect(stream: &mut Streaming<Update>, want: &[&str]) {
    for w in want {
        let got = next(stream).await;
        assert_eq!(show(&got), *w, "full update: {got:?}");
    }
}

/// Nothing arrives for a while (several polls).
async fn expect_quiet(stream: &mut Streaming<Update>) {
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
        panic!("expected no update, got {got:?}");
    }
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";

fn service(target_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  \
         clusterIP: 10.96.0.10\n  selector:\n    app: web\n  ports:\n  - name: http\n    port: 80\n    \
         targetPort: {target_port}\n"
    )
}

fn pod(name: &str, ip: &str, ready: bool) -> String {
    let ready = if ready { "True" } else { "False" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels:\n    app: web\n  \
         annotations:\n    mesh.dev/inject: enabled\n  ownerReferences:\n  - apiVersion: apps/v1\n    \
         kind: ReplicaSet\n    name: web-7d9f8\n    uid: u1\n    controller: true\nspec:\n  \
         serviceAccountName: web\n  containers:\n  - name: app\nstatus:\n  podIP: {ip}\n  conditions:\n  \
         - type: Ready\n    status: \"{ready}\"\n"
    )
}

async fn wait_ready(controller: &Controller) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = controller.admin_get("/ready").await;
        if status == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the controller never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn file_edits_arrive_as_diffs_on_open_streams() {
    let controller = Controller::start(
        "diffs",
        &[
            ("00-namespace.yaml", NAMESPACE),
            ("service.yaml", &service(8080)),
            ("web-1.yaml", &pod("web-7d9f8-aaaaa", "10.0.0.1", true)),
        ],
    )
    .await;
    wait_ready(&controller).await;
    let (status, body) = controller.admin_get("/live").await;
    assert_eq!((status, body.as_str()), (200, "live\n"));

    let mut client = controller.client().await;
    let mut web = client
        .get(authority("web.shop.svc.cluster.local:80"))
        .await
        .expect("the service resolves")
        .into_inner();

    // The full set first, with identity, inbound port, hint and labels.
    let first = next(&mut web).await;
    assert_eq!(show(&first), "+10.0.0.1:8080");
    let Some(update::Update::Add(add)) = &first.update else {
        panic!("the first update is an Add");
    };
    assert_eq!(
        add.metric_labels.get("service").map(String::as_str),
        Some("web")
    );
    assert_eq!(
        add.metric_labels.get("namespace").map(String::as_str),
        Some("shop")
    );
    let ep = &add.endpoints[0];
    assert_eq!(
        ep.tls_identity.as_ref().map(|t| t.spiffe_id.as_str()),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert_eq!(ep.inbound_proxy_port, 4143);
    assert_eq!(ep.protocol_hint, ProtocolHint::Http2 as i32);
    assert_eq!(
        ep.metric_labels.get("workload_kind").map(String::as_str),
        Some("deployment")
    );
    assert_eq!(
        ep.metric_labels.get("workload_name").map(String::as_str),
        Some("web")
    );
    assert_eq!(
        ep.metric_labels.get("serviceaccount").map(String::as_str),
        Some("web")
    );
    assert_eq!(
        ep.metric_labels.get("pod").map(String::as_str),
        Some("web-7d9f8-aaaaa")
    );

    // The same service by cluster IP, and the pod by its own IP.
    let mut by_ip = client
        .get(address("10.96.0.10:80"))
        .await
        .expect("the cluster IP resolves")
        .into_inner();
    expect(&mut by_ip, &["+10.0.0.1:8080"]).await;
    let mut the_pod = client
        .get(address("10.0.0.1:3000"))
        .await
        .expect("the pod IP resolves")
        .into_inner();
    expect(&mut the_pod, &["+10.0.0.1:3000"]).await;

    // Scale up.
    controller.write("web-2.yaml", &pod("web-7d9f8-bbbbb", "10.0.0.2", true));
    expect(&mut web, &["+10.0.0.2:8080"]).await;
    expect(&mut by_ip, &["+10.0.0.2:8080"]).await;

    // One becomes not ready, then ready again.
    controller.write("web-1.yaml", &pod("web-7d9f8-aaaaa", "10.0.0.1", false));
    expect(&mut web, &["-10.0.0.1:8080"]).await;
    controller.write("web-1.yaml", &pod("web-7d9f8-aaaaa", "10.0.0.1", true));
    expect(&mut web, &["+10.0.0.1:8080"]).await;

    // Delete one.
    controller.remove("web-2.yaml");
    expect(&mut web, &["-10.0.0.2:8080"]).await;

    // Change the target port: the new address is added before the old one goes.
    controller.write("service.yaml", &service(9090));
    expect(&mut web, &["+10.0.0.1:9090", "-10.0.0.1:8080"]).await;

    // A malformed file: reported, and its last good state stays served.
    controller.write(
        "service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
    );
    expect_quiet(&mut web).await;
    let (status, body) = controller.admin_get("/ready").await;
    assert_eq!(
        status, 200,
        "a malformed file does not make discovery unready: {body}"
    );
    let bad_path = controller.dir.join("service.yaml");
    assert!(
        body.contains(&format!(
            "file problem: {}: invalid YAML",
            bad_path.display()
        )),
        "the /ready body names the file and the error: {body}"
    );
    let (_, metrics) = controller.admin_get("/metrics").await;
    assert!(
        metrics.contains("mesh_controller_file_parse_errors_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mesh_controller_files_malformed 1"),
        "{metrics}"
    );
    let mut fresh = client
        .get(authority("web.shop:80"))
        .await
        .expect("the last good state still resolves")
        .into_inner();
    expect(&mut fresh, &["+10.0.0.1:9090"]).await;
    drop(fresh);

    // Fixed again (same content as the last good one): nothing to send, problem cleared.
    controller.write("service.yaml", &service(9090));
    expect_quiet(&mut web).await;
    let (_, body) = controller.admin_get("/ready").await;
    assert_eq!(body, "ready\n");

    // Delete the service: the stream says so and stays open; the service comes back.
    controller.remove("service.yaml");
    expect(&mut web, &["-10.0.0.1:9090", "none(false)"]).await;
    controller.write("service.yaml", &service(9090));
    expect(&mut web, &["+10.0.0.1:9090"]).await;

    // The last pod goes: the service exists with nothing ready.
    controller.remove("web-1.yaml");
    expect(&mut web, &["-10.0.0.1:9090", "none(true)"]).await;
    expect(&mut the_pod, &["-10.0.0.1:3000", "none(false)"]).await;

    let (_, metrics) = controller.admin_get("/metrics").await;
    for want in [
        "mesh_controller_destination_streams_active 3",
        "mesh_controller_index_objects{kind=\"Service\"} 1",
        "mesh_controller_index_objects{kind=\"Pod\"} 0",
        "mesh_controller_destination_update_latency_seconds_count",
        "mesh_controller_discovery_events_total{backend=\"file\",kind=\"file\",event=\"deleted\"}",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in:\n{metrics}");
    }

    // Shutdown ends open streams and returns.
    controller.stop().await;
    let end = tokio::time::timeout(WAIT, web.message())
        .await
        .expect("the stream ends in time");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no more updates after shutdown: {end:?}"
    );
}

#[tokio::test]
async fn unknown_and_malformed_targets_fail_at_once() {
    let controller = Controller::start(
        "errors",
        &[("ns.yaml", NAMESPACE), ("service.yaml", &service(8080))],
    )
    .await;
    wait_ready(&controller).await;
    let mut client = controller.client().await;

    let cases = [
        (
            authority("nope.shop.svc.cluster.local:80"),
            tonic::Code::NotFound,
            "nope",
        ),
        (authority("web.shop:81"), tonic::Code::NotFound, "port 81"),
        (address("10.9.9.9:80"), tonic::Code::NotFound, "10.9.9.9:80"),
        (
            authority("api.example.org:443"),
            tonic::Code::NotFound,
            "api.example.org:443",
        ),
        (
            authority("web.shop"),
            tonic::Code::InvalidArgument,
            "no port",
        ),
        (
            authority("web:80"),
            tonic::Code::InvalidArgument,
            "no namespace",
        ),
        (
            GetDestination::default(),
            tonic::Code::InvalidArgument,
            "no target",
        ),
    ];
    for (request, code, needle) in cases {
        let what = format!("{request:?}");
        let status = tokio::time::timeout(WAIT, client.get(request))
            .await
            .expect("answers without hanging")
            .expect_err("fails");
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: {}",
            status.message()
        );
    }

    // A service with no ready pod exists: NoEndpoints{exists: true}.
    let mut empty = client
        .get(authority("web.shop.svc:80"))
        .await
        .expect("resolves")
        .into_inner();
    expect(&mut empty, &["none(true)"]).await;
    controller.stop().await;
}

#[tokio::test]
async fn a_missing_config_folder_is_an_error_naming_it() {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dir = Path::new("/nonexistent/mesh-controller-config");
    let config = Config::new(Discovery::File {
        dir: dir.to_owned(),
        poll_interval: Duration::from_millis(20),
    });
    let err = tokio::time::timeout(
        WAIT,
        mesh_controller::run(config, grpc, admin, std::future::pending()),
    )
    .await
    .expect("fails at once")
    .expect_err("a missing folder is an error");
    assert!(
        err.to_string()
            .contains("/nonexistent/mesh-controller-config"),
        "{err}"
    );
}

#[tokio::test]
async fn edits_arrive_on_filesystem_events_long_before_the_next_poll() {
    // An hour between polls: only the filesystem's change events can bring these edits.
    let controller = Controller::start_polling(
        "events",
        &[
            ("00-namespace.yaml", NAMESPACE),
            ("service.yaml", &service(8080)),
        ],
        Duration::from_secs(3600),
    )
    .await;
    wait_ready(&controller).await;
    let mut client = controller.client().await;
    let mut web = client
        .get(authority("web.shop.svc.cluster.local:80"))
        .await
        .expect("the service resolves")
        .into_inner();
    expect(&mut web, &["none(true)"]).await;
    for (i, ip) in ["10.0.0.1", "10.0.0.2", "10.0.0.3"].iter().enumerate() {
        controller.write(
            &format!("web-{i}.yaml"),
            &pod(&format!("web-7d9f8-{i}"), ip, true),
        );
        expect(&mut web, &[&format!("+{ip}:8080")]).await;
    }
    controller.remove("web-0.yaml");
    expect(&mut web, &["-10.0.0.1:8080"]).await;
    controller.stop().await;
}

/// A Job's pod (`restartPolicy: Never`) with a proxy and one application container, in
/// `state` (`running: {}` or `terminated: {exitCode: 0}`).
fn job_pod(state: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: batch}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: report-1, namespace: batch}}\n\
         spec:\n  restartPolicy: Never\n  containers: [{{name: mesh-proxy}}, {{name: report}}]\n\
         status:\n  phase: Running\n  podIP: 10.0.9.1\n  containerStatuses:\n\
         \x20 - {{name: mesh-proxy, ready: true, restartCount: 0, image: p, imageID: '', state: {{running: {{}}}}}}\n\
         \x20 - {{name: report, ready: false, restartCount: 0, image: r, imageID: '', state: {{{state}}}}}\n"
    )
}

#[tokio::test]
async fn a_jobs_proxy_learns_when_its_application_has_finished() {
    use mesh_proto::common::WorkloadRef;
    use mesh_proto::workload::WatchWorkload;
    use mesh_proto::workload::workload_client::WorkloadClient;

    let controller = Controller::start("workload", &[("job.yaml", &job_pod("running: {}"))]).await;
    let mut client = WorkloadClient::connect(format!("http://{}", controller.grpc))
        .await
        .expect("connect to the controller");
    let refused = client
        .watch(WatchWorkload {
            workload: Some(WorkloadRef {
                namespace: "batch".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("a pod must be named");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("workload.pod"), "{refused}");

    let mut stream = client
        .watch(WatchWorkload {
            workload: Some(WorkloadRef {
                namespace: "batch".into(),
                pod: "report-1".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("watch the pod")
        .into_inner();
    assert!(!next_state(&mut stream).await.app_finished, "still running");
    controller.write("job.yaml", &job_pod("terminated: {exitCode: 0}"));
    assert!(
        next_state(&mut stream).await.app_finished,
        "the report container is done"
    );
}

async fn next_state(
    stream: &mut Streaming<mesh_proto::workload::WorkloadState>,
) -> mesh_proto::workload::WorkloadState {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a state arrives in time")
        .expect("the stream is healthy")
        .expect("the stream is still open")
}
