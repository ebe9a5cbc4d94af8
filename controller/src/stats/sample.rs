//! One scrape of one proxy, reduced to the series the Stats API reports on (names and labels
//! as `mesh-proxy`'s `metrics.rs` writes them), and the difference between two scrapes.
//!
//! Counters are kept as read; [`ProxySample::delta`] turns two scrapes into what happened in
//! between, treating a counter that went down as a restarted proxy (its new value is then
//! the whole delta), as Prometheus' `increase()` does.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::exposition::{Exposition, Sample};

/// inbound or outbound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic for the pod's application.
    Inbound,
    /// Traffic from the pod's application.
    Outbound,
}

/// The labels every traffic series of one target shares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrafficKey {
    /// inbound or outbound.
    pub direction: Direction,
    /// The logical authority (`books.demo.svc.cluster.local:8080`) or an address.
    pub authority: Arc<str>,
    /// Inbound: the application's address; outbound: the endpoint dialed.
    pub target_addr: Arc<str>,
    /// Whether the hop was mutually authenticated.
    pub tls: bool,
    /// The client's SPIFFE ID, when proven.
    pub client_id: Arc<str>,
    /// The server's SPIFFE ID, when proven.
    pub server_id: Arc<str>,
}

/// A latency histogram: cumulative counts by upper bound (`le`), ascending, `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`.
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Adds `count` to the bucket `le` (summing series that differ only in status).
    fn add(&mut self, le: f64, count: f64) {
        match self
            .buckets
            .binary_search_by(|(bound, _)| bound.total_cmp(&le))
        {
            Ok(at) => self.buckets[at].1 += count,
            Err(at) => self.buckets.insert(at, (le, count)),
        }
    }

    /// Adds every bucket of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (le, count) in &other.buckets {
            self.add(*le, *count);
        }
    }

    /// What was observed between `earlier` and `self`, bucket by bucket.
    fn delta(&self, earlier: Option<&Histogram>) -> Histogram {
        let before = |le: f64| {
            earlier
                .and_then(|h| h.buckets.iter().find(|(b, _)| *b == le))
                .map_or(0.0, |(_, c)| *c)
        };
        // A proxy restart shows as the +Inf bucket (the total) going down: then everything
        // now counted happened after the restart.
        let restarted = match (self.buckets.last(), earlier.and_then(|h| h.buckets.last())) {
            (Some((_, now)), Some((_, then))) => now < then,
            _ => false,
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, count)| {
                    let delta = if restarted {
                        *count
                    } else {
                        (count - before(*le)).max(0.0)
                    };
                    (*le, delta)
                })
                .collect(),
        }
    }

    /// The total number of observations.
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |(_, c)| *c)
    }

    /// The `q` quantile (0..=1), interpolated linearly inside its bucket as Prometheus'
    /// `histogram_quantile` does; `None` without observations. A quantile in the `+Inf`
    /// bucket is reported as the largest finite bound: the best that is known.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 || self.buckets.is_empty() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut lower_bound = 0.0;
        let mut lower_count = 0.0;
        for (le, count) in &self.buckets {
            if *count >= rank && *count > lower_count {
                if le.is_infinite() {
                    return Some(lower_bound);
                }
                let share = (rank - lower_count) / (count - lower_count);
                return Some(lower_bound + (le - lower_bound) * share);
            }
            if le.is_finite() {
                lower_bound = *le;
            }
            lower_count = *count;
        }
        Some(lower_bound)
    }
}

/// The request and TCP series of one target.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficCounters {
    /// Responses classified as successes (`response_total{classification="success"}`).
    pub successes: f64,
    /// Responses classified as failures.
    pub failures: f64,
    /// `response_latency_ms`, summed over status codes.
    pub latency: Histogram,
    /// `tcp_open_total`.
    pub tcp_opens: f64,
    /// `tcp_open_connections` (a gauge: deltas keep the newer value).
    pub tcp_open_connections: f64,
    /// `tcp_read_bytes_total`.
    pub tcp_read_bytes: f64,
    /// `tcp_write_bytes_total`.
    pub tcp_write_bytes: f64,
}

impl TrafficCounters {
    /// Responses of either class.
    pub fn responses(&self) -> f64 {
        self.successes + self.failures
    }
}

/// What an inbound policy refusal is labelled with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DenialKey {
    /// The policy (`default:deny`, a Server's name, a rate limit's name).
    pub policy: Arc<str>,
    /// The application address the client wanted.
    pub target_addr: Arc<str>,
    /// The client's SPIFFE ID, when proven.
    pub client_id: Arc<str>,
    /// `http` (a refused request) or `tcp` (a refused connection).
    pub protocol: &'static str,
}

/// What an egress decision is labelled with (`outbound_egress_total`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EgressKey {
    /// The EgressNetwork (`namespace/name`) or `default`.
    pub network: Arc<str>,
    /// The host and port asked for, or the address.
    pub authority: Arc<str>,
    /// `http`, `tls` or `tcp`.
    pub protocol: Arc<str>,
    /// Allowed, or denied.
    pub allowed: bool,
}

/// A route's series (`route_request_total{authority, route}`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    /// The service the route belongs to.
    pub authority: Arc<str>,
    /// The route's name.
    pub route: Arc<str>,
}

/// A route's series: `route_request_total`, `route_response_total` by classification,
/// `route_response_latency_ms` and the retries of `route_retry_total{reason="retried"}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteCounters {
    /// Requests the route took.
    pub requests: f64,
    /// Responses classified as successes.
    pub successes: f64,
    /// Responses classified as failures.
    pub failures: f64,
    /// Retries sent (the budget's refusals are not retries).
    pub retries: f64,
    /// Latency to response headers, retries included.
    pub latency: Histogram,
}

/// One scrape of one proxy, or the difference between two.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxySample {
    /// Request and TCP series by target.
    pub traffic: BTreeMap<TrafficKey, TrafficCounters>,
    /// Policy refusals.
    pub denials: BTreeMap<DenialKey, f64>,
    /// Egress decisions.
    pub egress: BTreeMap<EgressKey, f64>,
    /// Requests, outcomes, retries and latency by route.
    pub routes: BTreeMap<RouteKey, RouteCounters>,
}

/// Interns label values: one scrape repeats the same few authorities and identities in
/// dozens of series, and a ring of samples keeps many scrapes.
#[derive(Debug, Default)]
struct Interner(BTreeMap<String, Arc<str>>);

impl Interner {
    fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(text) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(text);
        self.0.insert(text.to_owned(), shared.clone());
        shared
    }
}

impl ProxySample {
    /// Picks our series out of a parsed exposition; everything else is ignored.
    pub fn from_exposition(exposition: &Exposition) -> ProxySample {
        let mut sample = ProxySample::default();
        let mut interner = Interner::default();
        for series in &exposition.samples {
            if !series.value.is_finite() {
                continue;
            }
            match series.name.as_str() {
                "response_total" => {
                    let Some(key) = traffic_key(series, &mut interner) else {
                        continue;
                    };
                    let counters = sample.traffic.entry(key).or_default();
                    if series.label("classification") == "failure" {
                        counters.failures += series.value;
                    } else {
                        counters.successes += series.value;
                    }
                }
                "response_latency_ms_bucket" => {
                    let Some(key) = traffic_key(series, &mut interner) else {
                        continue;
                    };
                    let Ok(le) = series.label("le").parse::<f64>() else {
                        continue;
                    };
                    sample
                        .traffic
                        .entry(key)
                        .or_default()
                        .latency
                        .add(le, series.value);
                }
                "tcp_open_total"
                | "tcp_open_connections"
                | "tcp_read_bytes_total"
                | "tcp_write_bytes_total" => {
                    let Some(key) = traffic_key(series, &mut interner) else {
                        continue;
                    };
                    let counters = sample.traffic.entry(key).or_default();
                    let field = match series.name.as_str() {
                        "tcp_open_total" => &mut counters.tcp_opens,
                        "tcp_open_connections" => &mut counters.tcp_open_connections,
                        "tcp_read_bytes_total" => &mut counters.tcp_read_bytes,
                        _ => &mut counters.tcp_write_bytes,
                    };
                    *field += series.value;
                }
                "inbound_http_authz_deny_total" | "inbound_tcp_authz_deny_total" => {
                    let key = DenialKey {
                        policy: interner.get(series.label("policy")),
                        target_addr: interner.get(series.label("target_addr")),
                        client_id: interner.get(series.label("client_id")),
                        protocol: if series.name.starts_with("inbound_http") {
                            "http"
                        } else {
                            "tcp"
                        },
                    };
                    *sample.denials.entry(key).or_default() += series.value;
                }
                "outbound_egress_total" => {
                    let key = EgressKey {
                        network: interner.get(series.label("network")),
                        authority: interner.get(series.label("authority")),
                        protocol: interner.get(series.label("protocol")),
                        allowed: series.label("decision") == "allowed",
                    };
                    *sample.egress.entry(key).or_default() += series.value;
                }
                "route_request_total"
                | "route_response_total"
                | "route_response_latency_ms_bucket"
                | "route_retry_total" => {
                    let key = RouteKey {
                        authority: interner.get(series.label("authority")),
                        route: interner.get(series.label("route")),
                    };
                    let counters = sample.routes.entry(key).or_default();
                    match series.name.as_str() {
                        "route_request_total" => counters.requests += series.value,
                        "route_response_total" if series.label("classification") == "failure" => {
                            counters.failures += series.value;
                        }
                        "route_response_total" => counters.successes += series.value,
                        "route_retry_total" if series.label("reason") == "retried" => {
                            counters.retries += series.value;
                        }
                        "route_retry_total" => {}
                        _ => {
                            if let Ok(le) = series.label("le").parse::<f64>() {
                                counters.latency.add(le, series.value);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        sample
    }

    /// What happened between `earlier` and `self` (the later scrape of the same proxy).
    pub fn delta(&self, earlier: &ProxySample) -> ProxySample {
        let traffic = self
            .traffic
            .iter()
            .map(|(key, now)| {
                let then = earlier.traffic.get(key);
                let counter = |f: fn(&TrafficCounters) -> f64| {
                    counter_delta(f(now), then.map(f).unwrap_or(0.0))
                };
                let delta = TrafficCounters {
                    successes: counter(|c| c.successes),
                    failures: counter(|c| c.failures),
                    latency: now.latency.delta(then.map(|c| &c.latency)),
                    tcp_opens: counter(|c| c.tcp_opens),
                    tcp_open_connections: now.tcp_open_connections,
                    tcp_read_bytes: counter(|c| c.tcp_read_bytes),
                    tcp_write_bytes: counter(|c| c.tcp_write_bytes),
                };
                (key.clone(), delta)
            })
            .collect();
        let denials = counters_delta(&self.denials, &earlier.denials);
        let egress = counters_delta(&self.egress, &earlier.egress);
        let routes = self
            .routes
            .iter()
            .map(|(key, now)| {
                let then = earlier.routes.get(key);
                let counter = |f: fn(&RouteCounters) -> f64| {
                    counter_delta(f(now), then.map(f).unwrap_or(0.0))
                };
                let delta = RouteCounters {
                    requests: counter(|c| c.requests),
                    successes: counter(|c| c.successes),
                    failures: counter(|c| c.failures),
                    retries: counter(|c| c.retries),
                    latency: now.latency.delta(then.map(|c| &c.latency)),
                };
                (key.clone(), delta)
            })
            .collect();
        ProxySample {
            traffic,
            denials,
            egress,
            routes,
        }
    }
}

/// Each counter's increase from `earlier` to `now`.
fn counters_delta<K: Ord + Clone>(
    now: &BTreeMap<K, f64>,
    earlier: &BTreeMap<K, f64>,
) -> BTreeMap<K, f64> {
    now.iter()
        .map(|(key, now)| {
            let then = earlier.get(key).copied().unwrap_or(0.0);
            (key.clone(), counter_delta(*now, then))
        })
        .collect()
}

/// A counter's increase; a decrease means the proxy restarted and counts from zero again.
pub fn counter_delta(now: f64, then: f64) -> f64 {
    if now >= then { now - then } else { now }
}

/// The traffic labels of a series, or `None` when it has no direction we know.
fn traffic_key(series: &Sample, interner: &mut Interner) -> Option<TrafficKey> {
    let direction = match series.label("direction") {
        "inbound" => Direction::Inbound,
        "outbound" => Direction::Outbound,
        _ => return None,
    };
    Some(TrafficKey {
        direction,
        authority: interner.get(series.label("authority")),
        target_addr: interner.get(series.label("target_addr")),
        tls: series.label("tls") == "true",
        client_id: interner.get(series.label("client_id")),
        server_id: interner.get(series.label("server_id")),
    })
}
