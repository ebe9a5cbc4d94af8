//! A scale check, ignored by default (run: `cargo test -p mesh-controller --release --test
//! scale -- --ignored --nocapture`): 1,000 services x 10 endpoints from files, 2,000 open
//! `Destination.Get` streams, then endpoint changes; prints how long each change takes to reach
//! the streams watching it. The benchmark harness owns the real figures; this keeps the
//! controller's side honest while developing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_controller::{Config, Discovery};
use mesh_proto::destination::destination_client::DestinationClient;
use mesh_proto::destination::{GetDestination, get_destination};

const SERVICES: usize = 1000;
const PODS: usize = 10;
const STREAMS_PER_SERVICE: usize = 2;

fn service_file(i: usize, pods: usize) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: scale}}\n\
         spec: {{selector: {{app: svc-{i}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    );
    for p in 0..pods {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{i}-{p}, namespace: scale, \
             labels: {{app: svc-{i}}}, annotations: {{mesh.dev/inject: enabled}}}}\n\
             spec: {{containers: [{{name: app}}]}}\nstatus: {{podIP: 10.{}.{}.{p}}}\n",
            i / 256,
            i % 256
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a scale check; run by hand"]
async fn thousands_of_streams_follow_changes() {
    let dir = std::env::temp_dir().join(format!("mesh-controller-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the folder");
    for i in 0..SERVICES {
        std::fs::write(dir.join(format!("svc-{i}.yaml")), service_file(i, PODS))
            .expect("write a service file");
    }
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let grpc_addr: SocketAddr = grpc.local_addr().expect("address");
    let config = Config::new(Discovery::File {
        dir: dir.clone(),
        poll_interval: Duration::from_millis(20),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
        let _ = stopped.await;
    }));

    let started = Instant::now();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut streams = Vec::new();
    for i in 0..SERVICES {
        for _ in 0..STREAMS_PER_SERVICE {
            let mut client = DestinationClient::new(channel.clone());
            let mut stream = client
                .get(GetDestination {
                    target: Some(get_destination::Target::Authority(format!(
                        "svc-{i}.scale:80"
                    ))),
                    source: None,
                })
                .await
                .expect("resolves")
                .into_inner();
            tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("first update in time")
                .expect("healthy")
                .expect("open");
            streams.push((i, stream));
        }
    }
    println!(
        "{} streams open with their full sets in {:?}",
        streams.len(),
        started.elapsed()
    );

    let mut latencies = Vec::new();
    for round in 0..20 {
        let i = (round * 37) % SERVICES;
        let changed = Instant::now();
        std::fs::write(dir.join(format!(".svc-{i}.tmp")), service_file(i, PODS - 1))
            .expect("write");
        std::fs::rename(
            dir.join(format!(".svc-{i}.tmp")),
            dir.join(format!("svc-{i}.yaml")),
        )
        .expect("rename");
        for (_, stream) in streams.iter_mut().filter(|(s, _)| *s == i) {
            tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("the change arrives in time")
                .expect("healthy")
                .expect("open");
        }
        latencies.push(changed.elapsed());
    }
    latencies.sort();
    println!(
        "change to streams (includes up to one 20 ms poll): p50 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(rss) = status.lines().find(|l| l.starts_with("VmRSS"))
    {
        println!("test process (controller + client) {rss}");
    }
    drop(streams);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let _ = std::fs::remove_dir_all(&dir);
}
