//! Load generators and what they measured: `oha` (HTTP/1.1, open loop at a fixed rate with
//! latency correction, or closed loop at a fixed concurrency), `h2load` (HTTP/2), and a small
//! built-in driver for the self-test and for opening idle connections.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::child::find_program;

/// Where a load generator sends its requests.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The address connected to.
    pub addr: SocketAddr,
    /// The `Host` (HTTP/1.1) or `:authority` (HTTP/2) sent, naming the service; None sends
    /// the address.
    pub host: Option<String>,
    /// The network namespace the load generator runs in (scenario 6); None: the host's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

impl Entry {
    fn authority(&self) -> String {
        self.host.clone().unwrap_or_else(|| self.addr.to_string())
    }
}

/// How hard and how long to push.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    /// Concurrent connections.
    pub connections: u32,
    /// Requests per second for an open loop; None pushes as fast as answers come.
    pub rate: Option<u32>,
    /// How long.
    pub duration: Duration,
}

/// What one load run measured. Latencies in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Measured {
    /// Successful (2xx) answers.
    pub ok: u64,
    /// Everything else: failed requests and non-2xx answers.
    pub errors: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Successful answers per second.
    pub rps: f64,
    /// Latency percentiles, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Slowest, µs.
    pub max_us: f64,
}

/// Nearest-rank percentiles of latencies in µs (sorts them).
pub fn summarize(latencies_us: &mut [u64], ok: u64, errors: u64, seconds: f64) -> Measured {
    latencies_us.sort_unstable();
    let at = |p: f64| -> f64 {
        if latencies_us.is_empty() {
            return 0.0;
        }
        // The small subtraction keeps 99.9% of 1000 at rank 999 despite rounding.
        let rank = ((p / 100.0) * latencies_us.len() as f64 - 1e-9).ceil() as usize;
        latencies_us[rank.clamp(1, latencies_us.len()) - 1] as f64
    };
    Measured {
        ok,
        errors,
        seconds,
        rps: if seconds > 0.0 {
            ok as f64 / seconds
        } else {
            0.0
        },
        p50_us: at(50.0),
        p90_us: at(90.0),
        p99_us: at(99.0),
        p999_us: at(99.9),
        max_us: latencies_us.last().copied().unwrap_or(0) as f64,
    }
}

// ---------------------------------------------------------------------------------------
// oha

/// The parts of `oha --output-format json` we read (times in seconds).
#[derive(Debug, Deserialize)]
struct OhaJson {
    summary: OhaSummary,
    #[serde(rename = "latencyPercentiles")]
    latency_percentiles: std::collections::BTreeMap<String, Option<f64>>,
    #[serde(rename = "statusCodeDistribution", default)]
    status_code_distribution: std::collections::BTreeMap<String, u64>,
    #[serde(rename = "errorDistribution", default)]
    error_distribution: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
struct OhaSummary {
    total: f64,
    slowest: Option<f64>,
}

/// Reads oha's JSON report.
pub fn parse_oha(json: &str) -> Result<Measured> {
    let report: OhaJson = serde_json::from_str(json).context("oha's JSON report")?;
    let ok: u64 = report
        .status_code_distribution
        .iter()
        .filter(|(code, _)| code.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    let bad_status: u64 = report
        .status_code_distribution
        .iter()
        .filter(|(code, _)| !code.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    let errors = bad_status + report.error_distribution.values().sum::<u64>();
    let us = |key: &str| -> Result<f64> {
        let seconds = report
            .latency_percentiles
            .get(key)
            .with_context(|| format!("oha reported no {key}"))?
            .unwrap_or(f64::NAN);
        Ok(seconds * 1e6)
    };
    let seconds = report.summary.total;
    Ok(Measured {
        ok,
        errors,
        seconds,
        rps: if seconds > 0.0 {
            ok as f64 / seconds
        } else {
            0.0
        },
        p50_us: us("p50")?,
        p90_us: us("p90")?,
        p99_us: us("p99")?,
        p999_us: us("p99.9")?,
        max_us: report.summary.slowest.unwrap_or(f64::NAN) * 1e6,
    })
}

/// Runs oha against `entry` (HTTP/1.1, keep-alive) and reads its report.
pub async fn oha(entry: &Entry, shape: Shape) -> Result<Measured> {
    let oha = find_program("oha").context("oha is not installed (scripts/bench-setup)")?;
    let mut command = match &entry.netns {
        Some(netns) => {
            let mut command = tokio::process::Command::new("ip");
            command.args(["netns", "exec", netns]).arg(oha);
            command
        }
        None => tokio::process::Command::new(oha),
    };
    command
        .arg(format!("http://{}/", entry.addr))
        .args(["--no-tui", "--output-format", "json", "-w"])
        .args(["-c", &shape.connections.to_string()])
        .args(["-z", &format!("{}ms", shape.duration.as_millis())])
        .args(["-t", "10s"]);
    if let Some(host) = &entry.host {
        command.args(["-H", &format!("Host: {host}")]);
    }
    if let Some(rate) = shape.rate {
        command
            .args(["-q", &rate.to_string()])
            .arg("--latency-correction");
    }
    let output = run_bounded(command, shape.duration + Duration::from_secs(30)).await?;
    parse_oha(&String::from_utf8_lossy(&output)).context("reading oha's output")
}

// ---------------------------------------------------------------------------------------
// h2load

/// Reads h2load's summary (request counts, wall time) and its per-request log
/// (`start µs \t status \t duration µs`).
///
/// A log line with status 0 is a request whose response head arrived during the warm-up and
/// whose stream closed after it: h2load records a status only in the measured phase, yet
/// counts such a stream as succeeded. These straddle the phase boundary (the first
/// milliseconds of the log), so they are neither successes with a latency nor errors; a
/// stream that really failed (reset, connection lost) is in the summary's `failed` count.
/// Counting them as errors made every HTTP/2 run through a proxy look like it failed a few
/// requests (the 7 of ~200k of earlier runs, and the 1 of the direct baseline).
pub fn parse_h2load(summary: &str, log: &str) -> Result<Measured> {
    let finished = summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in "))
        .context("h2load printed no `finished in` line")?;
    let wall = finished.split(',').next().unwrap_or("").trim();
    let seconds = parse_h2load_duration(wall).with_context(|| format!("duration {wall:?}"))?;
    let mut latencies = Vec::new();
    let (mut ok, mut errors) = (0u64, 0u64);
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        let (Some(status), Some(duration)) = (fields.get(1), fields.get(2)) else {
            bail!("bad h2load log line {line:?}");
        };
        let status: i64 = status.trim().parse().context("h2load log status")?;
        let duration: u64 = duration.trim().parse().context("h2load log duration")?;
        if status == 0 {
            continue;
        }
        if (200..300).contains(&status) {
            ok += 1;
            latencies.push(duration);
        } else {
            errors += 1;
        }
    }
    let failed = summary
        .lines()
        .find(|l| l.trim_start().starts_with("requests:"))
        .and_then(|l| {
            l.split(',')
                .find(|part| part.trim().ends_with(" failed"))
                .and_then(|part| part.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    Ok(summarize(&mut latencies, ok, errors.max(failed), seconds))
}

fn parse_h2load_duration(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    number.trim().parse::<f64>().ok().map(|n| n * scale)
}

/// Runs h2load (HTTP/2 prior knowledge) closed-loop: `connections` connections with
/// `streams` concurrent streams each, for `duration` after a one-second warm-up.
pub async fn h2load(
    entry: &Entry,
    connections: u32,
    streams: u32,
    duration: Duration,
    dir: &Path,
) -> Result<Measured> {
    let h2load = find_program("h2load").context("h2load is not installed (nghttp2-client)")?;
    let log = dir.join("h2load-requests.tsv");
    let _ = std::fs::remove_file(&log);
    let mut command = tokio::process::Command::new(h2load);
    command
        .arg(format!("http://{}/", entry.addr))
        .args(["-c", &connections.to_string(), "-m", &streams.to_string()])
        .args(["-t", "1", "--warm-up-time", "1s"])
        .arg(format!("--duration={}", duration.as_secs().max(1)))
        .arg(format!("--log-file={}", log.display()));
    if let Some(host) = &entry.host {
        command.args(["-H", &format!(":authority: {host}")]);
    }
    let output = run_bounded(command, duration + Duration::from_secs(30)).await?;
    let log_text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    parse_h2load(&String::from_utf8_lossy(&output), &log_text)
}

/// Runs a load generator with a deadline; its stdout on success.
async fn run_bounded(mut command: tokio::process::Command, limit: Duration) -> Result<Vec<u8>> {
    command
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let what = format!("{command:?}");
    let output = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("{what} ran longer than {limit:?}"))?
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}

// ---------------------------------------------------------------------------------------
// The built-in driver

/// An HTTP/1.1 keep-alive connection to `entry`.
async fn connect(entry: &Entry) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(entry.addr)
        .await
        .with_context(|| format!("connecting to {}", entry.addr))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request on `sender`; the answer's body is read whole. True when it was a 2xx.
async fn request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    authority: &str,
) -> Result<bool> {
    sender.ready().await.context("connection closed")?;
    let request = http::Request::get("/")
        .header(http::header::HOST, authority)
        .body(Empty::new())
        .context("building a request")?;
    let response = sender.send_request(request).await?;
    let ok = response.status().is_success();
    response.into_body().collect().await?;
    Ok(ok)
}

/// Sends load with the built-in HTTP/1.1 driver. An open loop corrects for coordinated
/// omission: each request's latency counts from when it was due, not from when a connection
/// was free to send it.
pub async fn drive(entry: &Entry, shape: Shape) -> Result<Measured> {
    let authority = Arc::new(entry.authority());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + shape.duration;
    let mut tasks = Vec::new();
    for _ in 0..shape.connections.max(1) {
        let mut sender = connect(entry).await?;
        let (authority, next) = (authority.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let (mut ok, mut errors) = (0u64, 0u64);
            loop {
                let due = match shape.rate {
                    Some(rate) => {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let due = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
                        tokio::time::sleep_until(due).await;
                        due
                    }
                    None => Instant::now(),
                };
                if due >= end {
                    break;
                }
                match request(&mut sender, &authority).await {
                    Ok(true) => {
                        ok += 1;
                        latencies.push(due.elapsed().as_micros() as u64);
                    }
                    Ok(false) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, ok, errors)
        }));
    }
    let mut latencies = Vec::new();
    let (mut ok, mut errors) = (0u64, 0u64);
    for task in tasks {
        let (l, o, e) = task.await.context("a driver task failed")?;
        latencies.extend(l);
        ok += o;
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(summarize(&mut latencies, ok, errors, seconds))
}

/// Idle keep-alive connections held open: each made one request, then waits.
#[derive(Debug)]
pub struct IdleConnections {
    /// How many are open.
    pub open: usize,
    /// Why fewer than asked were opened, if so.
    pub shortfall: Option<String>,
    senders: Vec<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl IdleConnections {
    /// Closes them all.
    pub fn close(self) {
        drop(self.senders);
    }
}

/// Opens `count` connections to `entry`, each making one request, `parallel` at a time, and
/// keeps them open. Stops at the first failure and says why.
pub async fn open_idle(entry: &Entry, count: usize, parallel: usize) -> IdleConnections {
    let authority = Arc::new(entry.authority());
    let mut senders = Vec::with_capacity(count);
    let mut shortfall = None;
    while senders.len() < count && shortfall.is_none() {
        let batch = parallel.max(1).min(count - senders.len());
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (entry, authority) = (entry.clone(), authority.clone());
            set.spawn(async move {
                let open = async {
                    let mut sender = connect(&entry).await?;
                    if !request(&mut sender, &authority).await? {
                        bail!("a request on a new connection was not answered with 2xx");
                    }
                    Ok(sender)
                };
                tokio::time::timeout(Duration::from_secs(10), open)
                    .await
                    .context("a new connection's first request took over 10 s")?
            });
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(sender)) => senders.push(sender),
                Ok(Err(error)) => shortfall = Some(format!("{error:#}")),
                Err(error) => shortfall = Some(error.to_string()),
            }
        }
    }
    IdleConnections {
        open: senders.len(),
        shortfall,
        senders,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut values: Vec<u64> = (1..=1000).rev().collect();
        let m = summarize(&mut values, 1000, 2, 2.0);
        assert_eq!(m.p50_us, 500.0);
        assert_eq!(m.p90_us, 900.0);
        assert_eq!(m.p99_us, 990.0);
        assert_eq!(m.p999_us, 999.0);
        assert_eq!(m.max_us, 1000.0);
        assert_eq!(m.rps, 500.0);
        assert_eq!(m.errors, 2);
        let empty = summarize(&mut [], 0, 0, 0.0);
        assert_eq!(empty.p99_us, 0.0);
    }

    #[test]
    fn oha_json_report() {
        let json = r#"{
          "summary": {"successRate": 1.0, "total": 2.0, "slowest": 0.004, "fastest": 0.0001,
                      "average": 0.0002, "requestsPerSec": 1001.0, "totalData": 2048000,
                      "sizePerRequest": 1024, "sizePerSec": 1024000.0},
          "latencyPercentiles": {"p10": 0.0001, "p50": 0.00015, "p90": 0.0002, "p99": 0.0005,
                                 "p99.9": 0.002, "p99.99": 0.0035},
          "statusCodeDistribution": {"200": 2000, "503": 1},
          "errorDistribution": {"connection closed": 1}
        }"#;
        let m = parse_oha(json).expect("parses");
        assert_eq!(m.ok, 2000);
        assert_eq!(m.errors, 2);
        assert_eq!(m.rps, 1000.0);
        assert!((m.p50_us - 150.0).abs() < 1e-6);
        assert!((m.p999_us - 2000.0).abs() < 1e-6);
        assert!((m.max_us - 4000.0).abs() < 1e-6);
        assert!(parse_oha("{}").is_err());
    }

    #[test]
    fn h2load_summary_and_log() {
        let summary = "starting benchmark...\n\nfinished in 2.00s, 3.00 req/s, 3KB/s\n\
                       requests: 6 total, 6 started, 6 done, 5 succeeded, 1 failed, 1 errored, 0 timeout\n";
        let log = "1700000000000000\t200\t100\n1700000000000100\t200\t300\n\
                   1700000000000200\t200\t200\n1700000000000300\t200\t400\n\
                   1700000000000400\t200\t500\n1700000000000500\t-1\t9\n";
        let m = parse_h2load(summary, log).expect("parses");
        assert_eq!(m.ok, 5);
        assert_eq!(m.errors, 1);
        assert_eq!(m.seconds, 2.0);
        assert_eq!(m.p50_us, 300.0);
        assert_eq!(m.max_us, 500.0);
        // Responses begun in the warm-up (status 0) are neither successes nor errors; a reset
        // in the measured phase is still an error through the summary's `failed`.
        let straddling = format!("1699999999999990\t0\t700\n{log}");
        let m = parse_h2load(summary, &straddling).expect("parses");
        assert_eq!((m.ok, m.errors), (5, 1));
        assert_eq!(m.max_us, 500.0);
        let clean = summary.replace("1 failed", "0 failed");
        let m = parse_h2load(
            &clean,
            "1699999999999990\t0\t700\n1700000000000000\t200\t100\n",
        )
        .expect("parses");
        assert_eq!((m.ok, m.errors), (1, 0));
        assert_eq!(parse_h2load_duration("150.5ms"), Some(0.1505));
        assert!(parse_h2load("nothing", "").is_err());
    }
}
