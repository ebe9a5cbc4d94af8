//! The harness end to end in about five seconds, without oha, nginx, HAProxy or release
//! binaries: an in-process backend, the real controller (in-process, over the YAML the bench
//! writes) and two real proxies (in-process), the built-in load driver, scenarios 1, 2 and 5
//! shrunk to a second or so, then the report. It proves the harness measures and reports
//! every figure; the figures themselves mean nothing here.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_bench::load::Entry;
use mesh_bench::machine::Machine;
use mesh_bench::measure::{self, Bench, Generator};
use mesh_bench::plan::Plan;
use mesh_bench::report::Report;
use mesh_bench::topology::{self, MeshedPod, Topology, Watched};
use mesh_bench::{backend, scale};
use tokio::net::TcpListener;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// The real controller in this process over `dir`; its gRPC URL once ready.
async fn controller(dir: PathBuf, poll: Duration) -> String {
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let grpc_addr = grpc.local_addr().expect("addr");
    let admin_addr = admin.local_addr().expect("addr");
    let config = mesh_controller::Config::new(mesh_controller::Discovery::File {
        dir,
        poll_interval: poll,
    });
    tokio::spawn(mesh_controller::run(
        config,
        grpc,
        admin,
        std::future::pending(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = topology::http_get(admin_addr, "/ready").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the controller never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    format!("http://{grpc_addr}")
}

/// A real proxy in this process.
async fn proxy(inbound: &str, controller: Option<&str>) -> mesh_proxy::app::Running {
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("MESH_PROXY_INBOUND_LISTEN", inbound.to_string()),
        ("MESH_PROXY_OUTBOUND_LISTEN", "127.0.0.1:0".to_string()),
        ("MESH_PROXY_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("MESH_PROXY_SHUTDOWN_GRACE_PERIOD", "1s".to_string()),
    ]);
    if let Some(url) = controller {
        vars.insert("MESH_PROXY_CONTROLLER_ADDR", url.to_string());
    }
    let config =
        mesh_proxy::config::Config::from_lookup(|v| vars.get(v).cloned()).expect("proxy config");
    let listeners = mesh_proxy::app::Listeners::bind(&config)
        .await
        .expect("bind proxy listeners");
    mesh_proxy::app::start(config, listeners).expect("start the proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_measures_and_reports_scenarios_1_2_and_5() {
    let started = Instant::now();
    let me = std::process::id();
    let dir = temp_dir("self-test");

    // The backend: HTTP/1.1 and HTTP/2 on one port.
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let backend_addr = listener.local_addr().expect("addr");
    tokio::spawn(backend::serve(listener));

    // Scenario 2's topology: the server proxy on its pod IP, the controller's YAML, the client.
    let server = proxy("127.0.0.2:0", None).await;
    let pod = MeshedPod {
        app: "web-plain".into(),
        ip: Ipv4Addr::new(127, 0, 0, 2),
        inbound_port: server.inbound_addr.port(),
        identity: false,
    };
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::write(
        config_dir.join("bench.yaml"),
        topology::mesh_yaml(&[pod], backend_addr.port(), backend_addr.port()),
    )
    .expect("write YAML");
    let url = controller(config_dir, Duration::from_millis(20)).await;
    let client = proxy("127.0.0.1:0", Some(&url)).await;

    let watched = |role: &str| Watched {
        role: role.into(),
        pid: me,
    };
    let topologies = vec![
        Topology {
            key: "direct".into(),
            title: "direct (no proxy)".into(),
            http1: Entry {
                addr: backend_addr,
                host: None,
                netns: None,
            },
            http2: None,
            watched: vec![watched("backend")],
        },
        Topology {
            key: "mesh".into(),
            title: "mesh, plaintext".into(),
            http1: Entry {
                addr: client.outbound_addr,
                host: Some(topology::service_host("web-plain")),
                netns: None,
            },
            http2: None,
            watched: vec![watched("client proxy"), watched("server proxy")],
        },
    ];
    let plan = Plan::self_test();
    let bench = Bench {
        ticks: mesh_bench::procfs::ticks_per_second(),
        our_pids: vec![],
        generator: Generator::Builtin,
        dir: dir.clone(),
    };
    let results = measure::measure_all(&bench, &plan, &topologies, &|line| eprintln!("{line}"))
        .await
        .expect("the scenarios run");

    // Scenario 5, tiny, against the in-process controller.
    let scale_plan = plan
        .scale
        .clone()
        .expect("the self-test plan has a scale part");
    let scale_dir = dir.join("scale");
    scale::write_files(&scale_plan, &scale_dir).expect("write the scale files");
    let scale_url = controller(scale_dir.clone(), scale_plan.poll_interval).await;
    let scaled = scale::measure(&scale_plan, &scale_dir, &scale_url, me, 0.1)
        .await
        .expect("scenario 5 runs");

    let report = Report {
        machine: Machine::detect(std::path::Path::new("."), &[]),
        plan: plan.clone(),
        topologies: results,
        netns: vec![],
        scale: Some(scaled),
        notes: vec![],
        elapsed_s: started.elapsed().as_secs_f64(),
    };

    // Every run measured something real.
    for t in &report.topologies {
        assert_eq!(t.runs.len(), 2, "{}: one rate, one max", t.topology.title);
        for run in &t.runs {
            let m = &run.measured;
            assert!(m.ok > 0, "{} {}: {m:?}", t.topology.title, run.key);
            assert_eq!(m.errors, 0, "{} {}: {m:?}", t.topology.title, run.key);
            assert!(
                m.p50_us > 0.0 && m.p50_us <= m.p99_us && m.p99_us <= m.max_us,
                "{m:?}"
            );
            assert_eq!(run.cpu_s_per_10k.len(), t.topology.watched.len());
            assert!(run.rss_max_kib.iter().all(|k| *k > 0));
        }
        let rate = t.run("rate-200").expect("the rate run");
        assert_eq!(t.all_runs.len(), 4, "two rounds of two kinds");
        // An open loop at 200 rps for 0.5 s: about 100 requests.
        assert!(
            (80..=110).contains(&rate.measured.ok),
            "{}",
            rate.measured.ok
        );
        let idle = t.idle.as_ref().expect("idle connections measured");
        assert_eq!(idle.open, plan.idle_connections, "{idle:?}");
        assert!(t.rss_idle_kib.iter().all(|k| *k > 0));
    }
    let scaled = report.scale.as_ref().expect("scale");
    assert_eq!(scaled.streams_open, scale_plan.streams);
    assert_eq!(
        scaled.updates_received, scaled.updates_expected,
        "{scaled:?}"
    );
    assert!(scaled.propagation_p50_ms > 0.0);

    // The report has every table, and the JSON reads back.
    let md = report.markdown();
    for needle in [
        "# Benchmarks",
        "## Scenario 1: direct",
        "## Scenario 2: mesh, plaintext",
        "| p99, 200 rps (HTTP/1.1, open loop) |",
        "| throughput, max, 4 connections (HTTP/1.1) |",
        "CPU per 10,000 requests, client proxy",
        "RSS with 50 idle connections, server proxy",
        "## Scenario 5: controller scale",
        "propagation p99",
        "## Conditions of each run",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in:\n{md}");
    }
    let json = serde_json::to_value(&report).expect("JSON");
    assert!(
        json["topologies"][1]["runs"][0]["measured"]["p99_us"]
            .as_f64()
            .is_some()
    );
    let _: SocketAddr = json["topologies"][0]["topology"]["http1"]["addr"]
        .as_str()
        .expect("an address")
        .parse()
        .expect("parses");
    drop((client, server));
    let _ = std::fs::remove_dir_all(&dir);
}
