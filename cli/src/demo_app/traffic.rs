//! `traffic`: the demo's load: `RATE` (default 10) HTTP/1.1 requests a second to
//! `TARGET_URL` (web), at most `MAX_IN_FLIGHT` (50) at once, each with a timeout; and one a
//! second to `DENIED_URL` (archive), which the mesh's policy refuses. Prints one line of counts
//! per second. Runs until stopped, or for `DURATION` (e.g. `30s`) when set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use tokio::time::{Instant, MissedTickBehavior};

use super::net::{self, HttpClient, HttpVersion};

/// The default of `TARGET_URL`.
const TARGET_URL: &str = "http://web.demo.svc.cluster.local:8080/";
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What happened to the requests of one second.
#[derive(Debug, Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    denied: AtomicU64,
    denied_calls: AtomicU64,
}

impl Counts {
    fn take(counter: &AtomicU64) -> u64 {
        counter.swap(0, Ordering::Relaxed)
    }
}

pub async fn run() -> anyhow::Result<()> {
    let rate: u32 = super::env_parsed("RATE", 10)?;
    anyhow::ensure!((1..=1000).contains(&rate), "RATE={rate}: use 1 to 1000");
    let max_in_flight: u64 = super::env_parsed("MAX_IN_FLIGHT", 50)?;
    let duration = super::env("DURATION")
        .map(|text| {
            crate::demo::parse_duration(&text).map_err(|e| anyhow::anyhow!("DURATION: {e}"))
        })
        .transpose()?;
    let target = super::env("TARGET_URL").unwrap_or_else(|| TARGET_URL.to_owned());
    let denied_url = super::env("DENIED_URL");
    let proxy = net::http_proxy_from_env()?;
    let client = net::http_client(proxy, HttpVersion::Http1);
    eprintln!(
        "traffic: {rate} requests/s to {target}{}{}",
        denied_url
            .as_deref()
            .map_or_else(String::new, |url| format!(
                ", 1/s to {url} (policy should refuse it)"
            )),
        proxy.map_or_else(String::new, |p| format!(", through the HTTP proxy {p}"))
    );

    let counts = Arc::new(Counts::default());
    let in_flight = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut report =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let stop = super::stopped();
    tokio::pin!(stop);
    loop {
        if duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        tokio::select! {
            () = &mut stop => return Ok(()),
            _ = tick.tick() => {
                if in_flight.load(Ordering::Relaxed) >= max_in_flight {
                    counts.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (client, target, counts, in_flight) =
                    (client.clone(), target.clone(), counts.clone(), in_flight.clone());
                tokio::spawn(async move {
                    match get(&client, &target).await {
                        Ok(status) if status.is_success() => counts.ok.fetch_add(1, Ordering::Relaxed),
                        _ => counts.failed.fetch_add(1, Ordering::Relaxed),
                    };
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = report.tick() => {
                if let Some(url) = &denied_url {
                    let (client, url, counts) = (client.clone(), url.clone(), counts.clone());
                    tokio::spawn(async move {
                        counts.denied_calls.fetch_add(1, Ordering::Relaxed);
                        // A policy refusal is a 403 from the server's proxy, or a refused
                        // connection for opaque traffic: either way not a success.
                        if !get(&client, &url).await.is_ok_and(|s| s.is_success()) {
                            counts.denied.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                let line = format!(
                    "traffic: {:>4}s  web: {} ok, {} failed{}{}",
                    started.elapsed().as_secs(),
                    Counts::take(&counts.ok),
                    Counts::take(&counts.failed),
                    match Counts::take(&counts.skipped) {
                        0 => String::new(),
                        n => format!(", {n} skipped (too many in flight)"),
                    },
                    match Counts::take(&counts.denied_calls) {
                        0 => String::new(),
                        calls => format!(
                            "  archive: {} of {calls} refused",
                            Counts::take(&counts.denied)
                        ),
                    },
                );
                println!("{line}");
            }
        }
    }
}

/// One GET, its body read and dropped; the status, or why there is none.
async fn get(client: &HttpClient, url: &str) -> anyhow::Result<StatusCode> {
    let request = Request::get(url)
        .body(Full::new(Bytes::new()))
        .with_context(|| format!("{url:?} is not a URL"))?;
    let call = async {
        let response = client.request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        anyhow::Ok(status)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .context("timed out")?
}
