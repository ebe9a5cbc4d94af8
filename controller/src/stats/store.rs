//! The scraped samples: per pod, a short ring of timestamped [`ProxySample`]s, and what the
//! index said about the pod. [`Store::window`] turns the rings into [`PodWindow`]s, the
//! per-pod deltas over a window that the aggregation reads.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sample::ProxySample;
use crate::index::PodView;

/// A pod as the stats (and tap) need it: the index's view of it, shared rather than copied.
/// Every scrape round lists every pod, so a copy of each pod's names per round was, at
/// 100,000 pods, a copy of the cluster's names every few seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo(Arc<PodView>);

impl PodInfo {
    /// The pod as the index sees it.
    pub fn new(view: Arc<PodView>) -> Self {
        Self(view)
    }

    /// The pod's namespace.
    pub fn namespace(&self) -> &str {
        &self.0.meta.namespace
    }

    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.0.meta.name
    }

    /// Its IP.
    pub fn ip(&self) -> IpAddr {
        self.0.ip
    }

    /// The owning workload's kind, lower case (`deployment`, `pod`, ...).
    pub fn workload_kind(&self) -> &str {
        &self.0.meta.workload_kind
    }

    /// The owning workload's name.
    pub fn workload_name(&self) -> &str {
        &self.0.meta.workload_name
    }

    /// The SPIFFE ID its proxy has, when meshed.
    pub fn identity(&self) -> Option<&str> {
        self.0.meshed.as_ref()?.identity.as_deref()
    }

    /// Whether the pod has a proxy (with an identity: only those are scraped and tapped).
    pub fn meshed(&self) -> bool {
        self.identity().is_some()
    }

    /// A pod of a `deployment` for tests, meshed with `identity` when given.
    #[cfg(test)]
    pub fn for_test(
        namespace: &str,
        name: &str,
        ip: IpAddr,
        workload: (&str, &str),
        identity: Option<String>,
    ) -> Self {
        use crate::endpoints::PodMeta;
        use crate::meta::MeshedPod;
        Self(Arc::new(PodView {
            meta: Arc::new(PodMeta {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                workload_kind: workload.0.to_owned(),
                workload_name: workload.1.to_owned(),
                service_account: "default".to_owned(),
            }),
            ip,
            zone: None,
            meshed: identity.map(|identity| MeshedPod {
                identity: Some(identity.into()),
                inbound_proxy_port: 4143,
            }),
            opaque: Default::default(),
            port_names: Default::default(),
            app_finished: false,
        }))
    }
}

/// One pod's ring of scrapes, oldest first.
#[derive(Debug, Default)]
struct Ring {
    samples: VecDeque<(Instant, Arc<ProxySample>)>,
    /// When the last scrape failed, and why: reported instead of silently going stale.
    last_error: Option<String>,
}

/// Every pod's samples.
#[derive(Debug)]
pub struct Store {
    /// How long samples are kept: the longest window that can be asked for.
    retention: Duration,
    /// Every pod the index knows, meshed or not.
    pods: BTreeMap<IpAddr, PodInfo>,
    rings: BTreeMap<IpAddr, Ring>,
}

/// One pod's traffic over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct PodWindow {
    /// The pod.
    pub pod: PodInfo,
    /// Seconds between the two scrapes compared; 0 when there are not two yet.
    pub seconds: f64,
    /// What happened in between (gauges: their latest value).
    pub delta: ProxySample,
}

impl Store {
    /// An empty store keeping samples for `retention`.
    pub fn new(retention: Duration) -> Self {
        Store {
            retention,
            pods: BTreeMap::new(),
            rings: BTreeMap::new(),
        }
    }

    /// Replaces the set of known pods; the rings of pods that are gone (or whose IP now
    /// belongs to another pod) are dropped.
    pub fn set_pods(&mut self, pods: impl IntoIterator<Item = PodInfo>) {
        let pods: BTreeMap<IpAddr, PodInfo> = pods.into_iter().map(|p| (p.ip(), p)).collect();
        self.rings.retain(|ip, _| {
            pods.get(ip).is_some_and(|pod| {
                self.pods.get(ip).is_none_or(|old| {
                    old.namespace() == pod.namespace() && old.name() == pod.name()
                })
            })
        });
        self.pods = pods;
    }

    /// Every known pod.
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    /// Records a scrape of the pod at `ip` taken at `at`.
    pub fn record(&mut self, ip: IpAddr, at: Instant, sample: ProxySample) {
        if !self.pods.contains_key(&ip) {
            return;
        }
        let ring = self.rings.entry(ip).or_default();
        ring.samples.push_back((at, Arc::new(sample)));
        ring.last_error = None;
        // Keep the newest sample at least `retention` old, so a window as long as the
        // retention still has a start: drop the oldest only while the next one is as old.
        while ring
            .samples
            .get(1)
            .is_some_and(|(next, _)| at.duration_since(*next) >= self.retention)
        {
            ring.samples.pop_front();
        }
    }

    /// Records that scraping the pod at `ip` failed.
    pub fn record_error(&mut self, ip: IpAddr, error: String) {
        if self.pods.contains_key(&ip) {
            self.rings.entry(ip).or_default().last_error = Some(error);
        }
    }

    /// The pods whose last scrape failed, with why.
    pub fn errors(&self) -> Vec<(PodInfo, String)> {
        self.rings
            .iter()
            .filter_map(|(ip, ring)| Some((self.pods.get(ip)?.clone(), ring.last_error.clone()?)))
            .collect()
    }

    /// Every pod's traffic over the `window` ending with its latest scrape: the latest
    /// sample against the newest one at least `window` older (or the oldest kept, when the
    /// ring is younger than that). Pods without a proxy or without samples come with an
    /// empty delta, so they still count as pods of their workload.
    pub fn window(&self, window: Duration) -> Vec<PodWindow> {
        self.pods
            .values()
            .map(|pod| {
                let (seconds, delta) = self
                    .rings
                    .get(&pod.ip())
                    .and_then(|ring| window_of(&ring.samples, window))
                    .unwrap_or((0.0, ProxySample::default()));
                PodWindow {
                    pod: pod.clone(),
                    seconds,
                    delta,
                }
            })
            .collect()
    }
}

/// The seconds spanned and the delta over `window` of one ring, if it has two samples.
fn window_of(
    samples: &VecDeque<(Instant, Arc<ProxySample>)>,
    window: Duration,
) -> Option<(f64, ProxySample)> {
    let (latest_at, latest) = samples.back()?;
    let (start_at, start) = samples
        .iter()
        .rev()
        .find(|(at, _)| latest_at.duration_since(*at) >= window)
        .or_else(|| samples.front())?;
    (start_at < latest_at).then(|| {
        (
            latest_at.duration_since(*start_at).as_secs_f64(),
            latest.delta(start),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::sample::{Direction, TrafficCounters, TrafficKey};

    fn pod(name: &str, last: u8) -> PodInfo {
        PodInfo::for_test(
            "demo",
            name,
            IpAddr::from([10, 0, 0, last]),
            ("deployment", name),
            Some(format!("spiffe://cluster.local/ns/demo/sa/{name}")),
        )
    }

    fn sample(successes: f64) -> ProxySample {
        let key = TrafficKey {
            direction: Direction::Inbound,
            authority: Arc::from("web:8080"),
            target_addr: Arc::from("127.0.0.1:8080"),
            tls: true,
            client_id: Arc::from(""),
            server_id: Arc::from(""),
        };
        ProxySample {
            traffic: [(
                key,
                TrafficCounters {
                    successes,
                    ..TrafficCounters::default()
                },
            )]
            .into(),
            ..ProxySample::default()
        }
    }

    fn successes(window: &PodWindow) -> f64 {
        window.delta.traffic.values().map(|c| c.successes).sum()
    }

    #[test]
    fn windows_compare_the_latest_scrape_with_one_a_window_older() {
        let t0 = Instant::now();
        let mut store = Store::new(Duration::from_secs(60));
        store.set_pods([pod("web", 1)]);
        let ip = IpAddr::from([10, 0, 0, 1]);
        for (second, total) in [(0, 0.0), (10, 10.0), (20, 30.0), (30, 60.0)] {
            store.record(ip, t0 + Duration::from_secs(second), sample(total));
        }
        let cases = [
            // (window, seconds compared, successes in between)
            (Duration::from_secs(10), 10.0, 30.0),
            (Duration::from_secs(15), 20.0, 50.0),
            (Duration::from_secs(30), 30.0, 60.0),
            // Longer than the ring: the oldest sample is the start.
            (Duration::from_secs(300), 30.0, 60.0),
        ];
        for (window, seconds, want) in cases {
            let windows = store.window(window);
            assert_eq!(windows.len(), 1);
            assert_eq!(windows[0].seconds, seconds, "{window:?}");
            assert_eq!(successes(&windows[0]), want, "{window:?}");
        }
    }

    #[test]
    fn one_sample_gives_no_rate_and_unknown_pods_are_ignored() {
        let t0 = Instant::now();
        let mut store = Store::new(Duration::from_secs(60));
        store.set_pods([pod("web", 1), pod("books", 2)]);
        store.record(IpAddr::from([10, 0, 0, 1]), t0, sample(5.0));
        store.record(IpAddr::from([10, 0, 0, 9]), t0, sample(5.0));
        let windows = store.window(Duration::from_secs(60));
        assert_eq!(windows.len(), 2, "every known pod, with or without samples");
        assert!(
            windows
                .iter()
                .all(|w| w.seconds == 0.0 && w.delta.traffic.is_empty())
        );
    }

    #[test]
    fn old_samples_expire_and_gone_pods_lose_their_ring() {
        let t0 = Instant::now();
        let mut store = Store::new(Duration::from_secs(20));
        store.set_pods([pod("web", 1)]);
        let ip = IpAddr::from([10, 0, 0, 1]);
        for second in 0..10 {
            store.record(
                ip,
                t0 + Duration::from_secs(second * 10),
                sample(second as f64),
            );
        }
        let kept = store.rings.get(&ip).map_or(0, |r| r.samples.len());
        assert_eq!(
            kept, 3,
            "the samples of the last 20 s, the first exactly 20 s old"
        );
        store.record_error(ip, "connection refused".into());
        assert_eq!(store.errors().len(), 1);
        store.set_pods([pod("books", 2)]);
        assert!(store.rings.is_empty());
        assert!(store.errors().is_empty());
    }

    #[test]
    fn a_new_pod_on_an_old_ip_starts_a_new_ring() {
        let t0 = Instant::now();
        let mut store = Store::new(Duration::from_secs(60));
        store.set_pods([pod("web", 1)]);
        let ip = IpAddr::from([10, 0, 0, 1]);
        store.record(ip, t0, sample(100.0));
        let other = pod("books", 1);
        assert_eq!(other.ip(), ip, "another pod on the same IP");
        store.set_pods([other]);
        store.record(ip, t0 + Duration::from_secs(10), sample(3.0));
        let windows = store.window(Duration::from_secs(60));
        assert_eq!(
            windows[0].seconds, 0.0,
            "no sample of the old pod is compared"
        );
    }
}
