//! Worker threads (`MESH_PROXY_WORKER_THREADS`): accepted connections are spread over every
//! thread, each thread reaches a destination over connections of its own, and the drain stops
//! the threads.

mod support;

use std::time::Duration;

use support::*;
use tokio_util::sync::CancellationToken;

const BOOKS: &str = "books.shop.svc.cluster.local:8080";

/// The inbound connections the server proxy holds open after a client proxy running
/// `client_threads` sent one request on each of four open downstream connections: one per
/// client thread, since each thread reaches the peer over its own multiplexed connection.
async fn peer_connections(client_threads: &str) -> f64 {
    let destination = ScriptedDestination::default();
    let stop = CancellationToken::new();
    let url = destination.serve(stop.clone()).await;
    let client = proxy_env(
        Some(&url),
        None,
        &[("MESH_PROXY_WORKER_THREADS", client_threads)],
    )
    .await;
    let server = proxy_env(None, None, &[("MESH_PROXY_WORKER_THREADS", "2")]).await;
    let backend = Backend::start("a").await;
    destination.set(
        BOOKS,
        vec![meshed(backend.addr, server.inbound_addr.port())],
    );

    // Held open, so each new one goes to a thread serving none yet while there is one.
    let mut downstream = Vec::new();
    for n in 0..4 {
        let mut connection = ProxyClient::connect(&client).await;
        let (status, _, body) = connection.get(&format!("http://{BOOKS}/on/{n}"), &[]).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains(&format!("backend=a method=GET path=/on/{n}")),
            "{body}"
        );
        downstream.push(connection);
    }
    let (_, metrics) = admin_get(&server, "/metrics").await;
    let open = metric(
        &metrics,
        "listener_connections_open",
        &["listener=\"inbound\""],
    );
    stop.cancel();
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_thread_reaches_a_peer_over_its_own_connection() {
    assert_eq!(
        peer_connections("1").await,
        1.0,
        "one thread, one connection"
    );
    assert_eq!(peer_connections("3").await, 3.0, "three threads, one each");
}

/// Names of this process's threads started by a proxy.
fn worker_threads() -> Vec<String> {
    let tasks = std::fs::read_dir("/proc/self/task").expect("read /proc/self/task");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("mesh-worker-"))
        .collect()
}

/// Waits up to two seconds for the proxy's worker threads to be `expected` (a thread names
/// itself once it runs).
async fn expect_worker_threads(expected: &[&str]) {
    let mut threads = Vec::new();
    for _ in 0..100 {
        threads = worker_threads();
        threads.sort();
        if threads == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("worker threads {threads:?}, expected {expected:?}");
}

#[tokio::test]
async fn the_drain_stops_the_worker_threads() {
    let proxy = proxy_env(None, None, &[("MESH_PROXY_WORKER_THREADS", "3")]).await;
    expect_worker_threads(&["mesh-worker-1", "mesh-worker-2"]).await;

    proxy.drain.cancel();
    tokio::time::timeout(Duration::from_secs(10), proxy.task)
        .await
        .expect("drained in time")
        .expect("proxy task");
    expect_worker_threads(&[]).await;
}
