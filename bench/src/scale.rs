//! Scenario 5: the controller at scale. Many services with several pods each in the file
//! backend, many concurrent `Destination.Get` streams, then endpoint churn (edits that flip
//! one pod's readiness): the controller's memory, CPU, and how long an edit takes to reach
//! every stream watching the service.
//!
//! Pod IPs are loopback addresses (127.1.x.y); nothing ever connects to them.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_proto::destination::destination_client::DestinationClient;
use mesh_proto::destination::{GetDestination, get_destination};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::load::summarize;
use crate::plan::ScalePlan;
use crate::procfs;
use crate::topology::{pod_yaml, service_host};

/// What scenario 5 measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    /// What was asked.
    pub plan: ScalePlan,
    /// Seconds from the controller's start to `/ready` (first scan of every file).
    pub ready_s: f64,
    /// VmRSS with everything loaded and no stream, KiB.
    pub rss_loaded_kib: u64,
    /// Streams that received their first update.
    pub streams_open: usize,
    /// Seconds from opening the first stream until every stream had its first update.
    pub streams_synced_s: f64,
    /// VmRSS with every stream open, KiB.
    pub rss_streams_kib: u64,
    /// VmRSS after the churn, KiB.
    pub rss_after_churn_kib: u64,
    /// The controller's peak VmRSS (VmHWM), KiB.
    pub rss_peak_kib: u64,
    /// Updates the churn should cause (edits x streams per service).
    pub updates_expected: usize,
    /// Updates that arrived.
    pub updates_received: usize,
    /// Propagation from the file's rename to a stream's update, ms.
    pub propagation_p50_ms: f64,
    /// 99th percentile, ms.
    pub propagation_p99_ms: f64,
    /// Slowest, ms.
    pub propagation_max_ms: f64,
    /// Controller CPU seconds during the churn.
    pub churn_cpu_s: f64,
    /// Controller CPU in cores while streams are open and nothing changes.
    pub idle_streams_cores: f64,
}

fn pod_ip(n: usize) -> Ipv4Addr {
    let n = u32::try_from(n).unwrap_or(0);
    Ipv4Addr::new(127, 1 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn service_name(s: usize) -> String {
    format!("svc-{s:04}")
}

/// One service's file: the Service and its pods; pod `not_ready` (if any) is not Ready.
pub fn service_file(plan: &ScalePlan, s: usize, not_ready: Option<usize>) -> String {
    let app = service_name(s);
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {app}\n  namespace: bench\n\
         spec:\n  selector:\n    app: {app}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n"
    );
    for k in 0..plan.endpoints {
        let ip = pod_ip(s * plan.endpoints + k);
        let ready = not_ready != Some(k);
        out.push_str(&pod_yaml(
            &app,
            &format!("{app}-{k}"),
            ip,
            4143,
            &app,
            ready,
            true,
        ));
    }
    out
}

/// Writes the namespace and every service's file into `dir`.
pub fn write_files(plan: &ScalePlan, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("00-namespace.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n",
    )?;
    for s in 0..plan.services {
        std::fs::write(
            dir.join(format!("{}.yaml", service_name(s))),
            service_file(plan, s, None),
        )?;
    }
    Ok(())
}

/// Rewrites one service's file atomically (temp name, rename), as the file backend asks.
fn rewrite(dir: &Path, s: usize, text: &str) -> Result<()> {
    let name = format!("{}.yaml", service_name(s));
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

struct Arrival {
    service: usize,
    at: Instant,
    first: bool,
}

/// Opens the streams, then churns the files; `pid` is the controller's process.
pub async fn measure(
    plan: &ScalePlan,
    dir: &Path,
    grpc_url: &str,
    pid: u32,
    ready_s: f64,
) -> Result<ScaleResult> {
    let ticks = procfs::ticks_per_second();
    let rss_loaded_kib = procfs::memory(pid)?.rss_kib;
    let (tx, mut rx) = mpsc::unbounded_channel::<Arrival>();
    let connections = plan.streams.div_ceil(plan.streams_per_connection.max(1));
    let opened = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let channel = tonic::transport::Endpoint::from_shared(grpc_url.to_string())?
            .connect()
            .await
            .with_context(|| format!("connecting to the controller at {grpc_url}"))?;
        for i in 0..plan.streams_per_connection {
            let stream = c * plan.streams_per_connection + i;
            if stream >= plan.streams {
                break;
            }
            let service = stream % plan.services;
            let mut client = DestinationClient::new(channel.clone());
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let request = GetDestination {
                    target: Some(get_destination::Target::Authority(format!(
                        "{}:80",
                        service_host(&service_name(service))
                    ))),
                    source: None,
                };
                let mut updates = client.get(request).await?.into_inner();
                let mut first = true;
                while let Some(_update) = updates.message().await? {
                    let _ = tx.send(Arrival {
                        service,
                        at: Instant::now(),
                        first,
                    });
                    first = false;
                }
                Ok::<_, tonic::Status>(())
            }));
        }
    }
    drop(tx);

    // Every stream's first update.
    let mut synced = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while synced < plan.streams {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(arrival)) if arrival.first => synced += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let streams_synced_s = opened.elapsed().as_secs_f64();
    if synced == 0 {
        bail!("no Destination.Get stream received an update");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_streams_kib = procfs::memory(pid)?.rss_kib;
    let quiet_before = procfs::cpu_ticks(pid)?.own;
    let quiet = Duration::from_secs(2);
    tokio::time::sleep(quiet).await;
    let quiet_after = procfs::cpu_ticks(pid)?.own;
    let idle_streams_cores =
        quiet_after.saturating_sub(quiet_before) as f64 / ticks / quiet.as_secs_f64();

    // Churn: each edit touches a service no earlier edit touched, so every update on it
    // after the edit is that edit's.
    let edits = plan.edits.min(plan.services);
    let stride = (plan.services / edits.max(1)).max(1);
    let mut edited: HashMap<usize, Instant> = HashMap::new();
    let streams_per_service: HashMap<usize, usize> =
        (0..plan.streams).fold(HashMap::new(), |mut m, i| {
            *m.entry(i % plan.services).or_default() += 1;
            m
        });
    let mut updates_expected = 0;
    let cpu_before = procfs::cpu_ticks(pid)?.own;
    let mut latencies_us: Vec<u64> = Vec::new();
    let record = |arrival: Arrival, edited: &HashMap<usize, Instant>, out: &mut Vec<u64>| {
        if let Some(t0) = edited.get(&arrival.service)
            && !arrival.first
        {
            out.push(arrival.at.saturating_duration_since(*t0).as_micros() as u64);
        }
    };
    for e in 0..edits {
        let service = (e * stride) % plan.services;
        let text = service_file(plan, service, Some(0));
        let t0 = Instant::now();
        rewrite(dir, service, &text)?;
        edited.insert(service, t0);
        updates_expected += streams_per_service.get(&service).copied().unwrap_or(0);
        let next = Instant::now() + plan.edit_interval;
        while let Ok(Some(arrival)) = tokio::time::timeout_at(next.into(), rx.recv()).await {
            record(arrival, &edited, &mut latencies_us);
        }
    }
    let drain_until = Instant::now() + plan.poll_interval * 4 + Duration::from_secs(2);
    while latencies_us.len() < updates_expected {
        match tokio::time::timeout_at(drain_until.into(), rx.recv()).await {
            Ok(Some(arrival)) => record(arrival, &edited, &mut latencies_us),
            _ => break,
        }
    }
    let churn_cpu_s = procfs::cpu_ticks(pid)?.own.saturating_sub(cpu_before) as f64 / ticks;
    let rss_after_churn_kib = procfs::memory(pid)?.rss_kib;
    let rss_peak_kib = procfs::memory(pid)?.peak_kib;
    for task in &tasks {
        task.abort();
    }
    let updates_received = latencies_us.len();
    let summary = summarize(&mut latencies_us, updates_received as u64, 0, 1.0);
    Ok(ScaleResult {
        plan: plan.clone(),
        ready_s,
        rss_loaded_kib,
        streams_open: synced,
        streams_synced_s,
        rss_streams_kib,
        rss_after_churn_kib,
        rss_peak_kib,
        updates_expected,
        updates_received,
        propagation_p50_ms: summary.p50_us / 1e3,
        propagation_p99_ms: summary.p99_us / 1e3,
        propagation_max_ms: summary.max_us / 1e3,
        churn_cpu_s,
        idle_streams_cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ips_stay_on_loopback_and_are_distinct() {
        let ips: std::collections::HashSet<Ipv4Addr> = (0..20_000).map(pod_ip).collect();
        assert_eq!(ips.len(), 20_000);
        assert!(ips.iter().all(Ipv4Addr::is_loopback));
    }
}
