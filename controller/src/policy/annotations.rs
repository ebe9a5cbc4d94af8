//! The outbound settings a Service (or a route) declares with annotations, parsed: retries,
//! timeouts, load balancing, failure accrual, fault injection and concurrency.
//!
//! | annotation | value |
//! |---|---|
//! | `retry.mesh.dev/http` | conditions, comma-separated: `5xx`, `gateway-error`, `connect-failure`, `reset`, a status, a gRPC code name |
//! | `retry.mesh.dev/limit` | retries per request |
//! | `retry.mesh.dev/timeout` | per-try timeout (`500ms`) |
//! | `retry.mesh.dev/budget-ratio` | retries per original request (`0.2`) |
//! | `retry.mesh.dev/budget-min-per-second` | retries always allowed per second |
//! | `timeout.mesh.dev/request`, `/response`, `/idle` | durations |
//! | `balancer.mesh.dev/algorithm` | `peak-ewma`, `round-robin`, `least-request`, `consistent-hash` |
//! | `balancer.mesh.dev/hash-key` | `header:NAME`, `cookie:NAME`, `client-ip` (implies `consistent-hash`) |
//! | `failure-accrual.mesh.dev/consecutive-failures` | failures that eject an endpoint |
//! | `failure-accrual.mesh.dev/min-backoff`, `/max-backoff` | probe backoff bounds |
//! | `fault.mesh.dev/abort-percent`, `/abort-status` | abort a share of requests (status default 503) |
//! | `fault.mesh.dev/delay-percent`, `/delay` | delay a share of requests |
//! | `concurrency.mesh.dev/max-in-flight` | requests in flight per backend |
//!
//! Pure: an invalid value is returned as an [`AnnotationProblem`] naming the annotation and
//! the value, and that annotation is left out of the settings.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_proto::policy::{
    Balancer, FailureAccrual, FaultInjection, RetryBudget, RetryPolicy, Timeouts, balancer,
};

use super::duration;

/// The retry annotations' prefix and names.
pub const RETRY_HTTP: &str = "retry.mesh.dev/http";
/// Retries per request.
pub const RETRY_LIMIT: &str = "retry.mesh.dev/limit";
/// Per-try timeout.
pub const RETRY_TIMEOUT: &str = "retry.mesh.dev/timeout";
/// Budget ratio.
pub const RETRY_BUDGET_RATIO: &str = "retry.mesh.dev/budget-ratio";
/// Budget floor.
pub const RETRY_BUDGET_MIN: &str = "retry.mesh.dev/budget-min-per-second";
/// Whole-request timeout.
pub const TIMEOUT_REQUEST: &str = "timeout.mesh.dev/request";
/// Per-attempt timeout until response headers.
pub const TIMEOUT_RESPONSE: &str = "timeout.mesh.dev/response";
/// Idle timeout.
pub const TIMEOUT_IDLE: &str = "timeout.mesh.dev/idle";
/// Balancer algorithm.
pub const BALANCER_ALGORITHM: &str = "balancer.mesh.dev/algorithm";
/// Consistent hash key.
pub const BALANCER_HASH_KEY: &str = "balancer.mesh.dev/hash-key";
/// Failure accrual threshold.
pub const ACCRUAL_FAILURES: &str = "failure-accrual.mesh.dev/consecutive-failures";
/// Failure accrual first probe.
pub const ACCRUAL_MIN_BACKOFF: &str = "failure-accrual.mesh.dev/min-backoff";
/// Failure accrual longest probe wait.
pub const ACCRUAL_MAX_BACKOFF: &str = "failure-accrual.mesh.dev/max-backoff";
/// Fault: share aborted.
pub const FAULT_ABORT_PERCENT: &str = "fault.mesh.dev/abort-percent";
/// Fault: abort status.
pub const FAULT_ABORT_STATUS: &str = "fault.mesh.dev/abort-status";
/// Fault: share delayed.
pub const FAULT_DELAY_PERCENT: &str = "fault.mesh.dev/delay-percent";
/// Fault: delay.
pub const FAULT_DELAY: &str = "fault.mesh.dev/delay";
/// Concurrency limit per backend.
pub const MAX_IN_FLIGHT: &str = "concurrency.mesh.dev/max-in-flight";
/// On a route: its rules' backendRefs are a failover order, not a split.
pub const BALANCER_FAILOVER: &str = "balancer.mesh.dev/failover";

/// The gRPC code names the proxy retries on.
const GRPC_CODES: [&str; 6] = [
    "cancelled",
    "unknown",
    "deadline-exceeded",
    "resource-exhausted",
    "internal",
    "unavailable",
];

/// An annotation whose value is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationProblem {
    /// The annotation.
    pub annotation: &'static str,
    /// Its value.
    pub value: String,
    /// Why it is invalid.
    pub reason: String,
}

/// What a Service's (or route's) annotations declare; every field absent when not declared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnnotatedSettings {
    /// Retries.
    pub retry: Option<RetryPolicy>,
    /// Timeouts.
    pub timeouts: Option<Timeouts>,
    /// Balancer.
    pub balancer: Option<Balancer>,
    /// Failure accrual.
    pub failure_accrual: Option<FailureAccrual>,
    /// Fault injection.
    pub fault: Option<FaultInjection>,
    /// Requests in flight per backend.
    pub max_in_flight: Option<u32>,
    /// Backends in failover order (routes only).
    pub failover: Option<bool>,
}

impl AnnotatedSettings {
    /// Whether anything is declared.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Whether an annotation is one of the mesh's outbound settings.
pub fn is_outbound_annotation(name: &str) -> bool {
    [
        "retry.",
        "timeout.",
        "balancer.",
        "failure-accrual.",
        "fault.",
        "concurrency.",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix) && name.contains(".mesh.dev/"))
}

struct Reader<'a> {
    annotations: &'a BTreeMap<String, String>,
    problems: Vec<AnnotationProblem>,
}

impl Reader<'_> {
    fn raw(&self, name: &'static str) -> Option<&str> {
        self.annotations.get(name).map(|v| v.trim())
    }

    fn problem(&mut self, name: &'static str, reason: impl Into<String>) {
        let value = self.raw(name).unwrap_or_default().to_owned();
        self.problems.push(AnnotationProblem {
            annotation: name,
            value,
            reason: reason.into(),
        });
    }

    fn parsed<T>(
        &mut self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = self.raw(name)?.to_owned();
        match parse(&raw) {
            Ok(value) => Some(value),
            Err(reason) => {
                self.problem(name, reason);
                None
            }
        }
    }

    fn duration(&mut self, name: &'static str) -> Option<prost_types::Duration> {
        self.parsed(name, |text| {
            duration::parse(text)
                .map_err(|e| e.to_string())
                .and_then(|d| proto_duration(d).ok_or_else(|| "out of range".to_owned()))
        })
    }

    fn number(&mut self, name: &'static str, min: u32, max: u32) -> Option<u32> {
        self.parsed(name, |text| {
            text.parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("not a whole number in {min}..={max}"))
        })
    }
}

/// A duration as protobuf's.
pub fn proto_duration(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).ok()?,
        nanos: i32::try_from(d.subsec_nanos()).ok()?,
    })
}

/// Parses the outbound annotations; invalid ones are returned as problems and left out.
pub fn parse(
    annotations: Option<&BTreeMap<String, String>>,
) -> (AnnotatedSettings, Vec<AnnotationProblem>) {
    let empty = BTreeMap::new();
    let mut r = Reader {
        annotations: annotations.unwrap_or(&empty),
        problems: Vec::new(),
    };
    let mut settings = AnnotatedSettings::default();

    // Retries: `retry.mesh.dev/http` turns them on; the rest tunes them.
    let conditions = r.parsed(RETRY_HTTP, |text| {
        let conditions: Vec<String> = text
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase().replace('_', "-"))
            .filter(|c| !c.is_empty())
            .collect();
        if conditions.is_empty() {
            return Err("no conditions".to_owned());
        }
        for condition in &conditions {
            let known = matches!(
                condition.as_str(),
                "5xx" | "gateway-error" | "connect-failure" | "reset"
            ) || GRPC_CODES.contains(&condition.as_str())
                || condition
                    .parse::<u16>()
                    .is_ok_and(|s| (100..600).contains(&s));
            if !known {
                return Err(format!(
                    "{condition:?} is not a retry condition (5xx, gateway-error, connect-failure, \
                     reset, a status code, or one of the gRPC codes {})",
                    GRPC_CODES.join(", ")
                ));
            }
        }
        Ok(conditions)
    });
    let limit = r.number(RETRY_LIMIT, 1, 100);
    let per_try_timeout = r.duration(RETRY_TIMEOUT);
    let ratio = r.parsed(RETRY_BUDGET_RATIO, |text| {
        text.parse::<f32>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0 && *r <= 1000.0)
            .ok_or_else(|| "not a number in (0, 1000]".to_owned())
    });
    let min_per_second = r.number(RETRY_BUDGET_MIN, 0, 1_000_000);
    match conditions {
        Some(conditions) => {
            settings.retry = Some(RetryPolicy {
                conditions,
                limit: limit.unwrap_or(0),
                per_try_timeout,
                budget: (ratio.is_some() || min_per_second.is_some()).then(|| RetryBudget {
                    ratio: ratio.unwrap_or(0.0),
                    min_per_second: min_per_second.unwrap_or(0),
                    ttl: None,
                }),
                max_body_bytes: 0,
            });
        }
        None => {
            for name in [
                RETRY_LIMIT,
                RETRY_TIMEOUT,
                RETRY_BUDGET_RATIO,
                RETRY_BUDGET_MIN,
            ] {
                if r.raw(name).is_some() && !r.problems.iter().any(|p| p.annotation == name) {
                    r.problem(
                        name,
                        format!("needs {RETRY_HTTP} (which failures to retry)"),
                    );
                }
            }
        }
    }

    let timeouts = Timeouts {
        request: r.duration(TIMEOUT_REQUEST),
        response: r.duration(TIMEOUT_RESPONSE),
        idle: r.duration(TIMEOUT_IDLE),
    };
    if timeouts != Timeouts::default() {
        settings.timeouts = Some(timeouts);
    }

    let algorithm = r.parsed(BALANCER_ALGORITHM, |text| match text {
        "peak-ewma" => Ok(balancer::Kind::PeakEwma),
        "round-robin" => Ok(balancer::Kind::RoundRobin),
        "least-request" => Ok(balancer::Kind::LeastRequest),
        "consistent-hash" => Ok(balancer::Kind::ConsistentHash),
        _ => Err("not peak-ewma, round-robin, least-request or consistent-hash".to_owned()),
    });
    let hash_key = r.parsed(BALANCER_HASH_KEY, |text| {
        use balancer::hash_key::Kind;
        let kind = match text.split_once(':') {
            _ if text == "client-ip" => Kind::ClientIp(true),
            Some(("header", name)) if is_token(name) => Kind::Header(name.to_ascii_lowercase()),
            Some(("cookie", name)) if is_token(name) => Kind::Cookie(name.to_owned()),
            _ => return Err("not header:NAME, cookie:NAME or client-ip".to_owned()),
        };
        Ok(balancer::HashKey { kind: Some(kind) })
    });
    match (algorithm, hash_key) {
        (None, None) => {}
        (Some(kind), None) if kind != balancer::Kind::ConsistentHash => {
            settings.balancer = Some(Balancer {
                kind: kind as i32,
                ..Balancer::default()
            });
        }
        // Consistent hashing without a key hashes the client's IP.
        (Some(_), None) => {
            settings.balancer = Some(Balancer {
                kind: balancer::Kind::ConsistentHash as i32,
                hash_key: Some(balancer::HashKey {
                    kind: Some(balancer::hash_key::Kind::ClientIp(true)),
                }),
                ewma_decay: None,
            });
        }
        (Some(kind), Some(_)) if kind != balancer::Kind::ConsistentHash => {
            r.problem(
                BALANCER_HASH_KEY,
                format!("needs {BALANCER_ALGORITHM}: consistent-hash"),
            );
            settings.balancer = Some(Balancer {
                kind: kind as i32,
                ..Balancer::default()
            });
        }
        (_, Some(key)) => {
            settings.balancer = Some(Balancer {
                kind: balancer::Kind::ConsistentHash as i32,
                hash_key: Some(key),
                ewma_decay: None,
            });
        }
    }

    let failures = r.number(ACCRUAL_FAILURES, 1, 1000);
    let min_backoff = r.duration(ACCRUAL_MIN_BACKOFF);
    let max_backoff = r.duration(ACCRUAL_MAX_BACKOFF);
    if failures.is_some() || min_backoff.is_some() || max_backoff.is_some() {
        settings.failure_accrual = Some(FailureAccrual {
            consecutive_failures: failures.unwrap_or(0),
            min_backoff,
            max_backoff,
        });
    }

    let abort_percent = r.number(FAULT_ABORT_PERCENT, 0, 100);
    let abort_status = r.number(FAULT_ABORT_STATUS, 100, 599);
    let delay_percent = r.number(FAULT_DELAY_PERCENT, 0, 100);
    let delay = r.duration(FAULT_DELAY);
    if delay_percent.is_some_and(|p| p > 0) && delay.is_none() && r.raw(FAULT_DELAY).is_none() {
        r.problem(FAULT_DELAY_PERCENT, format!("needs {FAULT_DELAY}"));
    } else if abort_percent.is_some() || delay_percent.is_some() {
        settings.fault = Some(FaultInjection {
            abort_percent: abort_percent.unwrap_or(0),
            abort_status: abort_status.unwrap_or(503),
            delay_percent: delay_percent.unwrap_or(0),
            delay,
        });
    }

    settings.max_in_flight = r.number(MAX_IN_FLIGHT, 1, u32::MAX);
    settings.failover = r.parsed(BALANCER_FAILOVER, |text| match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("not true or false".to_owned()),
    });

    for name in r.annotations.keys() {
        if is_outbound_annotation(name) && !KNOWN.contains(&name.as_str()) {
            let name = name.clone();
            r.problems.push(AnnotationProblem {
                annotation: "(unknown)",
                value: name,
                reason: "not an annotation the mesh knows".to_owned(),
            });
        }
    }
    (settings, r.problems)
}

const KNOWN: [&str; 20] = [
    RETRY_HTTP,
    RETRY_LIMIT,
    RETRY_TIMEOUT,
    RETRY_BUDGET_RATIO,
    RETRY_BUDGET_MIN,
    TIMEOUT_REQUEST,
    TIMEOUT_RESPONSE,
    TIMEOUT_IDLE,
    BALANCER_ALGORITHM,
    BALANCER_HASH_KEY,
    ACCRUAL_FAILURES,
    ACCRUAL_MIN_BACKOFF,
    ACCRUAL_MAX_BACKOFF,
    FAULT_ABORT_PERCENT,
    FAULT_ABORT_STATUS,
    FAULT_DELAY_PERCENT,
    FAULT_DELAY,
    MAX_IN_FLIGHT,
    BALANCER_FAILOVER,
    // Read by discovery, not here; listed so it is not reported as unknown.
    "config.mesh.dev/opaque-ports",
];

/// Whether `name` is an HTTP header or cookie name (an RFC 7230 token).
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn secs(s: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    }

    #[test]
    fn annotations_parse_into_settings_and_bad_values_are_named() {
        type Check = fn(&AnnotatedSettings) -> bool;
        type Case = (
            &'static str,
            Vec<(&'static str, &'static str)>,
            Check,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            ("nothing", vec![], |s| s.is_empty(), vec![]),
            (
                "retries with a budget",
                vec![
                    (RETRY_HTTP, "5xx, gateway-error,503,unavailable"),
                    (RETRY_LIMIT, "3"),
                    (RETRY_TIMEOUT, "2s"),
                    (RETRY_BUDGET_RATIO, "0.25"),
                    (RETRY_BUDGET_MIN, "5"),
                ],
                |s| {
                    s.retry
                        == Some(RetryPolicy {
                            conditions: vec![
                                "5xx".into(),
                                "gateway-error".into(),
                                "503".into(),
                                "unavailable".into(),
                            ],
                            limit: 3,
                            per_try_timeout: secs(2),
                            budget: Some(RetryBudget {
                                ratio: 0.25,
                                min_per_second: 5,
                                ttl: None,
                            }),
                            max_body_bytes: 0,
                        })
                },
                vec![],
            ),
            (
                "an unknown retry condition",
                vec![(RETRY_HTTP, "5xx,teapot")],
                |s| s.retry.is_none(),
                vec![RETRY_HTTP],
            ),
            (
                "a retry limit without conditions",
                vec![(RETRY_LIMIT, "2")],
                |s| s.retry.is_none(),
                vec![RETRY_LIMIT],
            ),
            (
                "timeouts",
                vec![(TIMEOUT_REQUEST, "10s"), (TIMEOUT_IDLE, "1m")],
                |s| {
                    s.timeouts
                        == Some(Timeouts {
                            request: secs(10),
                            response: None,
                            idle: secs(60),
                        })
                },
                vec![],
            ),
            (
                "a bad timeout leaves the others",
                vec![(TIMEOUT_REQUEST, "10"), (TIMEOUT_RESPONSE, "1s")],
                |s| {
                    s.timeouts
                        .as_ref()
                        .is_some_and(|t| t.request.is_none() && t.response == secs(1))
                },
                vec![TIMEOUT_REQUEST],
            ),
            (
                "round robin",
                vec![(BALANCER_ALGORITHM, "round-robin")],
                |s| {
                    s.balancer
                        .as_ref()
                        .is_some_and(|b| b.kind == balancer::Kind::RoundRobin as i32)
                },
                vec![],
            ),
            (
                "a hash key implies consistent hashing",
                vec![(BALANCER_HASH_KEY, "header:X-User")],
                |s| {
                    s.balancer.as_ref().is_some_and(|b| {
                        b.kind == balancer::Kind::ConsistentHash as i32
                            && b.hash_key
                                == Some(balancer::HashKey {
                                    kind: Some(balancer::hash_key::Kind::Header("x-user".into())),
                                })
                    })
                },
                vec![],
            ),
            (
                "an unknown algorithm",
                vec![(BALANCER_ALGORITHM, "random")],
                |s| s.balancer.is_none(),
                vec![BALANCER_ALGORITHM],
            ),
            (
                "a bad hash key",
                vec![
                    (BALANCER_ALGORITHM, "consistent-hash"),
                    (BALANCER_HASH_KEY, "body"),
                ],
                |s| {
                    s.balancer
                        .as_ref()
                        .is_some_and(|b| b.kind == balancer::Kind::ConsistentHash as i32)
                },
                vec![BALANCER_HASH_KEY],
            ),
            (
                "failure accrual",
                vec![(ACCRUAL_FAILURES, "5"), (ACCRUAL_MAX_BACKOFF, "30s")],
                |s| {
                    s.failure_accrual
                        == Some(FailureAccrual {
                            consecutive_failures: 5,
                            min_backoff: None,
                            max_backoff: secs(30),
                        })
                },
                vec![],
            ),
            (
                "fault injection",
                vec![
                    (FAULT_ABORT_PERCENT, "10"),
                    (FAULT_ABORT_STATUS, "502"),
                    (FAULT_DELAY_PERCENT, "5"),
                    (FAULT_DELAY, "100ms"),
                ],
                |s| {
                    s.fault
                        == Some(FaultInjection {
                            abort_percent: 10,
                            abort_status: 502,
                            delay_percent: 5,
                            delay: Some(prost_types::Duration {
                                seconds: 0,
                                nanos: 100_000_000,
                            }),
                        })
                },
                vec![],
            ),
            (
                "an abort share above 100",
                vec![(FAULT_ABORT_PERCENT, "150")],
                |s| s.fault.is_none(),
                vec![FAULT_ABORT_PERCENT],
            ),
            (
                "max in flight",
                vec![(MAX_IN_FLIGHT, "64")],
                |s| s.max_in_flight == Some(64),
                vec![],
            ),
            (
                "failover",
                vec![(BALANCER_FAILOVER, "true")],
                |s| s.failover == Some(true),
                vec![],
            ),
            (
                "failover that is not a boolean",
                vec![(BALANCER_FAILOVER, "yes")],
                |s| s.failover.is_none(),
                vec![BALANCER_FAILOVER],
            ),
            (
                "an unknown mesh annotation",
                vec![("retry.mesh.dev/budget", "0.2")],
                |s| s.is_empty(),
                vec!["(unknown)"],
            ),
        ];
        for (what, pairs, check, want_problems) in cases {
            let (settings, problems) = parse(Some(&annotations(&pairs)));
            assert!(check(&settings), "{what}: {settings:?}");
            let got: Vec<&str> = problems.iter().map(|p| p.annotation).collect();
            assert_eq!(got, want_problems, "{what}: {problems:?}");
        }
    }
}
