//! The pure half of tap aggregation: which pods a tap reaches, and the bounds of a merged
//! stream (requests, requests per second, duration). Tested table-driven below.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mesh_proto::tap::{self, tap_event::Event};

use crate::stats::aggregate::{FromFilter, Kind};
use crate::stats::store::PodInfo;

/// The limits the controller puts on every tap, whatever the watcher asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapLimits {
    /// Requests reported when the watcher names no limit.
    pub default_requests: u32,
    /// The most requests one tap reports.
    pub max_requests: u32,
    /// How long a tap lasts when the watcher names no duration.
    pub default_duration: Duration,
    /// The longest a tap lasts.
    pub max_duration: Duration,
    /// The most new requests per second one tap reports; the rest are skipped (counted).
    pub max_rate: u32,
}

impl Default for TapLimits {
    fn default() -> Self {
        TapLimits {
            default_requests: 100,
            max_requests: 10_000,
            default_duration: Duration::from_secs(60),
            max_duration: Duration::from_secs(60),
            max_rate: 100,
        }
    }
}

impl TapLimits {
    /// The requests and duration of a tap asking for `limit` and `duration` (0 or absent:
    /// the defaults), capped.
    pub fn bounds(&self, limit: u32, duration: Option<Duration>) -> (u32, Duration) {
        let requests = match limit {
            0 => self.default_requests,
            n => n,
        }
        .min(self.max_requests);
        let duration = duration
            .filter(|d| !d.is_zero())
            .unwrap_or(self.default_duration)
            .min(self.max_duration);
        (requests, duration)
    }
}

/// Why a tap names no pods.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// The workload is not `kind/name`, or the kind is unknown.
    #[error("{0}")]
    BadWorkload(String),
    /// Nothing meshed matches.
    #[error("no meshed pod matches {0}")]
    NoPods(String),
}

/// The one namespace a tap's `match` reaches into, or `None` when it may reach any (what the
/// caller must be allowed to tap).
pub fn scope(filter: &tap::TapMatch) -> Option<&str> {
    if !filter.namespace.is_empty() {
        return Some(&filter.namespace);
    }
    let (kind, name) = filter.workload.trim().split_once('/')?;
    matches!(Kind::parse(kind), Ok(Kind::Namespace)).then_some(name)
}

/// The meshed pods a tap's `match` names: those of one workload (`deploy/web`), one pod
/// (`pod/web-1`) or one namespace (`ns/demo`), within the match's namespace (all namespaces
/// when empty); every meshed pod when neither is given.
pub fn select_pods(pods: &[PodInfo], filter: &tap::TapMatch) -> Result<Vec<PodInfo>, SelectError> {
    let workload = filter.workload.trim();
    let target = if workload.is_empty() {
        None
    } else {
        let (kind, name) = workload.split_once('/').ok_or_else(|| {
            SelectError::BadWorkload(format!(
                "workload {workload:?} is not KIND/NAME (deploy/web, pod/web-1, ns/demo)"
            ))
        })?;
        Kind::parse(kind).map_err(SelectError::BadWorkload)?;
        Some(FromFilter {
            kind: kind.to_owned(),
            namespace: filter.namespace.clone(),
            name: name.to_owned(),
        })
    };
    let chosen: Vec<PodInfo> = pods
        .iter()
        .filter(|pod| pod.meshed())
        .filter(|pod| filter.namespace.is_empty() || pod.namespace() == filter.namespace)
        .filter(|pod| match &target {
            // A namespace target needs no namespace of its own.
            Some(t) if matches!(Kind::parse(&t.kind), Ok(Kind::Namespace)) => {
                pod.namespace() == t.name
            }
            Some(t) if t.namespace.is_empty() => {
                // No namespace given: the workload's name alone decides, in any namespace.
                let mut any_ns = t.clone();
                any_ns.namespace = pod.namespace().to_owned();
                any_ns.matches(pod)
            }
            Some(t) => t.matches(pod),
            None => true,
        })
        .cloned()
        .collect();
    if chosen.is_empty() {
        let what = match (workload.is_empty(), filter.namespace.is_empty()) {
            (true, true) => "the mesh".to_owned(),
            (true, false) => format!("namespace {}", filter.namespace),
            (false, true) => workload.to_owned(),
            (false, false) => format!("{workload} in namespace {}", filter.namespace),
        };
        return Err(SelectError::NoPods(what));
    }
    Ok(chosen)
}

/// What to do with one event of the merged stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Send,
    /// Drop it (over the rate, or part of a request that was dropped or not counted).
    Skip,
}

/// The bookkeeping of one merged tap: at most `requests` requests, at most `max_rate` new ones
/// in any second; the later events of a reported request always pass, so every reported
/// request ends.
#[derive(Debug)]
pub struct StreamBounds {
    remaining: u32,
    max_rate: u32,
    second_started: Option<Instant>,
    in_this_second: u32,
    /// (reporter, stream id) of the requests reported and not yet ended.
    open: HashSet<(String, u64)>,
    /// Requests skipped because of the rate.
    pub skipped: u64,
}

impl StreamBounds {
    /// Bounds for `requests` requests at most `max_rate` per second.
    pub fn new(requests: u32, max_rate: u32) -> Self {
        StreamBounds {
            remaining: requests,
            max_rate: max_rate.max(1),
            second_started: None,
            in_this_second: 0,
            open: HashSet::new(),
            skipped: 0,
        }
    }

    /// Whether `event`, from `reporter`, arriving `now`, is sent.
    pub fn admit(&mut self, reporter: &str, event: &tap::TapEvent, now: Instant) -> Verdict {
        let key = (reporter.to_owned(), event.stream_id);
        match &event.event {
            Some(Event::RequestStart(_)) => {
                if self.remaining == 0 {
                    return Verdict::Skip;
                }
                let fresh_second = self
                    .second_started
                    .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1));
                if fresh_second {
                    self.second_started = Some(now);
                    self.in_this_second = 0;
                }
                if self.in_this_second >= self.max_rate {
                    self.skipped += 1;
                    return Verdict::Skip;
                }
                self.in_this_second += 1;
                self.remaining -= 1;
                self.open.insert(key);
                Verdict::Send
            }
            Some(Event::ResponseStart(_)) if self.open.contains(&key) => Verdict::Send,
            Some(Event::End(_)) if self.open.remove(&key) => Verdict::Send,
            _ => Verdict::Skip,
        }
    }

    /// Whether the tap is done: every request it may report was reported and ended.
    pub fn done(&self) -> bool {
        self.remaining == 0 && self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn a_tap_reaches_into_its_namespace_or_all() {
        let filter = |namespace: &str, workload: &str| tap::TapMatch {
            namespace: namespace.to_owned(),
            workload: workload.to_owned(),
            ..tap::TapMatch::default()
        };
        assert_eq!(scope(&filter("books", "deploy/web")), Some("books"));
        assert_eq!(scope(&filter("", "ns/books")), Some("books"));
        assert_eq!(scope(&filter("books", "ns/other")), Some("books"));
        assert_eq!(scope(&filter("", "deploy/web")), None);
        assert_eq!(scope(&filter("", "")), None);
    }

    fn pod(namespace: &str, name: &str, kind: &str, workload: &str, meshed: bool) -> PodInfo {
        PodInfo::for_test(
            namespace,
            name,
            IpAddr::from([10, 77, 0, 2]),
            (kind, workload),
            meshed.then(|| format!("spiffe://cluster.local/ns/{namespace}/sa/default")),
        )
    }

    #[test]
    fn a_tap_reaches_the_meshed_pods_it_names() {
        let pods = vec![
            pod("demo", "web-1", "deployment", "web", true),
            pod("demo", "web-2", "deployment", "web", true),
            pod("demo", "books-1", "deployment", "books", true),
            pod("demo", "plain-1", "deployment", "plain", false),
            pod("other", "web-1", "deployment", "web", true),
        ];
        let names = |ns: &str, workload: &str| {
            select_pods(
                &pods,
                &tap::TapMatch {
                    namespace: ns.to_owned(),
                    workload: workload.to_owned(),
                    ..Default::default()
                },
            )
            .map(|pods| {
                pods.iter()
                    .map(|p| format!("{}/{}", p.namespace(), p.name()))
                    .collect::<Vec<_>>()
            })
        };
        // The pods chosen, or `None` for an error.
        let cases: [(&str, &str, Option<Vec<&str>>); 8] = [
            ("demo", "deploy/web", Some(vec!["demo/web-1", "demo/web-2"])),
            ("demo", "deployment/books", Some(vec!["demo/books-1"])),
            ("demo", "pod/web-2", Some(vec!["demo/web-2"])),
            (
                "",
                "ns/demo",
                Some(vec!["demo/web-1", "demo/web-2", "demo/books-1"]),
            ),
            (
                "",
                "deploy/web",
                Some(vec!["demo/web-1", "demo/web-2", "other/web-1"]),
            ),
            ("demo", "deploy/plain", None),
            ("demo", "web", None),
            ("demo", "widget/web", None),
        ];
        for (ns, workload, want) in cases {
            let got = names(ns, workload);
            match want {
                Some(want) => assert_eq!(got, Ok(want.iter().map(|s| s.to_string()).collect())),
                None => assert!(got.is_err(), "{ns} {workload}: {got:?}"),
            }
        }
    }

    fn event(stream_id: u64, event: Event) -> tap::TapEvent {
        tap::TapEvent {
            stream_id,
            event: Some(event),
            ..Default::default()
        }
    }

    #[test]
    fn the_merged_stream_keeps_its_limit_and_rate_and_ends_what_it_started() {
        let start = |id| event(id, Event::RequestStart(tap::RequestStart::default()));
        let end = |id| event(id, Event::End(tap::End::default()));
        let t0 = Instant::now();
        let mut bounds = StreamBounds::new(3, 2);
        assert_eq!(bounds.admit("a", &start(1), t0), Verdict::Send);
        assert_eq!(
            bounds.admit("b", &start(1), t0),
            Verdict::Send,
            "another proxy's stream 1"
        );
        assert_eq!(bounds.admit("a", &start(2), t0), Verdict::Skip, "over 2/s");
        assert_eq!(bounds.admit("a", &end(2), t0), Verdict::Skip, "its end too");
        assert_eq!(bounds.skipped, 1);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            bounds.admit("a", &start(3), t1),
            Verdict::Send,
            "a new second"
        );
        assert_eq!(
            bounds.admit("a", &start(4), t1),
            Verdict::Skip,
            "the limit of 3"
        );
        assert!(!bounds.done(), "three requests are open");
        for (reporter, id) in [("a", 1), ("b", 1), ("a", 3)] {
            assert_eq!(bounds.admit(reporter, &end(id), t1), Verdict::Send);
        }
        assert!(bounds.done());
    }

    #[test]
    fn limits_cap_what_the_watcher_asks() {
        let limits = TapLimits::default();
        assert_eq!(limits.bounds(0, None), (100, Duration::from_secs(60)));
        assert_eq!(
            limits.bounds(50_000, Some(Duration::from_secs(3600))),
            (10_000, Duration::from_secs(60))
        );
        assert_eq!(
            limits.bounds(5, Some(Duration::from_secs(2))),
            (5, Duration::from_secs(2))
        );
    }
}
