//! The annotations that steer injection, and their validation. A value is looked up on the
//! pod first, then on its namespace; every value is checked here, before anything is built,
//! so a bad one refuses the whole injection with a message naming the annotation, the value
//! and where it was set. This module only reads annotations; it builds no containers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::config::{InboundPolicy, MeshConfig};

/// Pod or namespace: `enabled` injects the pod, `disabled` never does.
pub const INJECT: &str = "mesh.dev/inject";
/// Written by injection: the version that injected the pod. Its presence makes injection
/// idempotent.
pub const INJECTED: &str = "mesh.dev/injected";
/// Written by injection: the proxy's inbound port, read by the controller's discovery.
pub const PROXY_INBOUND_PORT: &str = "mesh.dev/proxy-inbound-port";

/// Inbound ports (or ranges) that bypass the proxy.
pub const SKIP_INBOUND_PORTS: &str = "config.mesh.dev/skip-inbound-ports";
/// Outbound destination ports (or ranges) that bypass the proxy.
pub const SKIP_OUTBOUND_PORTS: &str = "config.mesh.dev/skip-outbound-ports";
/// Outbound destination subnets (CIDRs) that bypass the proxy.
pub const SKIP_SUBNETS: &str = "config.mesh.dev/skip-subnets";
/// Ports (numbers, ranges or container port names) the proxy forwards without detection.
pub const OPAQUE_PORTS: &str = "config.mesh.dev/opaque-ports";
/// The proxy container's CPU request.
pub const PROXY_CPU_REQUEST: &str = "config.mesh.dev/proxy-cpu-request";
/// The proxy container's CPU limit.
pub const PROXY_CPU_LIMIT: &str = "config.mesh.dev/proxy-cpu-limit";
/// The proxy container's memory request.
pub const PROXY_MEMORY_REQUEST: &str = "config.mesh.dev/proxy-memory-request";
/// The proxy container's memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "config.mesh.dev/proxy-memory-limit";
/// The proxy's log filter (`info`, `warn,mesh_proxy=debug`, ...).
pub const PROXY_LOG_LEVEL: &str = "config.mesh.dev/proxy-log-level";
/// The proxy image (also runs `mesh-init`).
pub const PROXY_IMAGE: &str = "config.mesh.dev/proxy-image";
/// The inbound policy of ports no Server selects.
pub const DEFAULT_INBOUND_POLICY: &str = "config.mesh.dev/default-inbound-policy";
/// How long the proxy drains in-flight work when the pod stops.
pub const SHUTDOWN_GRACE_PERIOD: &str = "config.mesh.dev/shutdown-grace-period";

/// Where the proxy sends its OpenTelemetry spans (OTLP/gRPC): `host:port` or a URL.
pub const TRACE_COLLECTOR: &str = "config.mesh.dev/trace-collector";
/// The share of new traces the proxy samples, from 0 to 1.
pub const TRACE_SAMPLE_RATE: &str = "config.mesh.dev/trace-sample-rate";
/// One line per request on the proxy's stdout: `json` or `apache`.
pub const ACCESS_LOG: &str = "config.mesh.dev/access-log";

/// Every `config.mesh.dev/*` annotation injection reads.
pub const CONFIG_ANNOTATIONS: [&str; 15] = [
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    SKIP_SUBNETS,
    OPAQUE_PORTS,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    PROXY_LOG_LEVEL,
    PROXY_IMAGE,
    DEFAULT_INBOUND_POLICY,
    SHUTDOWN_GRACE_PERIOD,
    TRACE_COLLECTOR,
    TRACE_SAMPLE_RATE,
    ACCESS_LOG,
];

/// Where a setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The pod's (or pod template's) own annotations.
    Pod,
    /// The annotations of the pod's namespace.
    Namespace,
    /// The mesh configuration (the injector's flags), when an annotation conflicts with it.
    MeshConfig,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Pod => "the pod",
            Source::Namespace => "the namespace",
            Source::MeshConfig => "the mesh configuration",
        })
    }
}

/// An annotation value injection cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{annotation}: {value:?}: {reason}{}", match set_on {
    Source::Pod => String::new(),
    other => format!(" (set on {other})"),
})]
pub struct AnnotationError {
    /// The annotation's name.
    pub annotation: &'static str,
    /// Its whole value, as written.
    pub value: String,
    /// What is wrong, naming the faulty item of a list.
    pub reason: String,
    /// Where the value was set.
    pub set_on: Source,
}

/// The pod's annotations over its namespace's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Annotations<'a> {
    pub pod: Option<&'a BTreeMap<String, String>>,
    pub namespace: &'a BTreeMap<String, String>,
}

/// One looked-up annotation.
struct Value<'a> {
    annotation: &'static str,
    text: &'a str,
    source: Source,
}

impl Value<'_> {
    fn error(&self, reason: impl Into<String>) -> AnnotationError {
        AnnotationError {
            annotation: self.annotation,
            value: self.text.to_owned(),
            reason: reason.into(),
            set_on: self.source,
        }
    }

    fn trimmed(&self) -> &str {
        self.text.trim()
    }
}

impl<'a> Annotations<'a> {
    fn get(&self, annotation: &'static str) -> Option<Value<'a>> {
        let on_pod = self
            .pod
            .and_then(|pod| pod.get(annotation))
            .map(|text| (text, Source::Pod));
        on_pod
            .or_else(|| {
                self.namespace
                    .get(annotation)
                    .map(|text| (text, Source::Namespace))
            })
            .map(|(text, source)| Value {
                annotation,
                text: text.as_str(),
                source,
            })
    }

    /// What `mesh.dev/inject` says, the pod's value over the namespace's.
    pub fn injection(&self) -> Result<Injection, AnnotationError> {
        let Some(value) = self.get(INJECT) else {
            return Ok(Injection::Unset);
        };
        match value.trimmed() {
            "enabled" => Ok(Injection::Enabled),
            "disabled" => Ok(Injection::Disabled(value.source)),
            _ => Err(value.error("expected enabled or disabled")),
        }
    }

    /// Every `config.mesh.dev/*` setting, validated, with the mesh configuration's defaults
    /// for those not annotated.
    pub fn settings(
        &self,
        config: &MeshConfig,
        container_ports: &BTreeMap<String, u16>,
    ) -> Result<Settings, AnnotationError> {
        let port_list = |annotation| -> Result<Option<String>, AnnotationError> {
            self.get(annotation)
                .map(|value| {
                    let items = list_items(value.text)
                        .map(|item| {
                            parse_port_range(item).map(|_| item).map_err(|reason| {
                                value.error(format!("{item:?} is not a port {reason}"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(items.join(","))
                })
                .transpose()
        };
        let skip_subnets = self
            .get(SKIP_SUBNETS)
            .map(|value| {
                let items = list_items(value.text)
                    .map(|item| {
                        parse_cidr(item).map(|_| item).map_err(|reason| {
                            value.error(format!(
                                "{item:?} is not a subnet like 10.0.0.0/8 or fd00::/8 ({reason})"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(items.join(","))
            })
            .transpose()?;
        let opaque_ports = self
            .get(OPAQUE_PORTS)
            .map(|value| opaque_ports(&value, container_ports))
            .transpose()?;
        let resources = ProxyResources {
            cpu: self.request_and_limit(
                (PROXY_CPU_REQUEST, &config.proxy_cpu_request),
                (PROXY_CPU_LIMIT, &config.proxy_cpu_limit),
                "CPU",
            )?,
            memory: self.request_and_limit(
                (PROXY_MEMORY_REQUEST, &config.proxy_memory_request),
                (PROXY_MEMORY_LIMIT, &config.proxy_memory_limit),
                "memory",
            )?,
        };
        let log_level = match self.get(PROXY_LOG_LEVEL) {
            None => config.proxy_log_level.clone(),
            Some(value) => {
                check_log_level(value.trimmed()).map_err(|reason| value.error(reason))?;
                // The proxy's filter parser takes no spaces around the directives.
                let directives: Vec<&str> = value.trimmed().split(',').map(str::trim).collect();
                directives.join(",")
            }
        };
        let image = match self.get(PROXY_IMAGE) {
            None => config.proxy_image.clone(),
            Some(value) => {
                let image = value.trimmed();
                if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(value.error("not an image reference like ghcr.io/mesh/proxy:1.0"));
                }
                image.to_owned()
            }
        };
        let default_inbound_policy =
            match self.get(DEFAULT_INBOUND_POLICY) {
                None => config.default_inbound_policy,
                Some(value) => value.trimmed().parse().map_err(
                    |error: crate::config::UnknownInboundPolicy| value.error(error.to_string()),
                )?,
            };
        let shutdown_grace_period = self
            .get(SHUTDOWN_GRACE_PERIOD)
            .map(|value| {
                if is_duration(value.trimmed()) {
                    Ok(value.trimmed().to_owned())
                } else {
                    Err(value.error("not a duration like 500ms, 10s, 2m or 1h"))
                }
            })
            .transpose()?;
        let trace_collector = self
            .get(TRACE_COLLECTOR)
            .map(|value| collector_url(value.trimmed()).map_err(|reason| value.error(reason)))
            .transpose()?;
        let trace_sample_rate = self
            .get(TRACE_SAMPLE_RATE)
            .map(|value| match value.trimmed().parse::<f64>() {
                Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(value.trimmed().to_owned()),
                _ => Err(value.error("not a number from 0 to 1, like 0.1")),
            })
            .transpose()?;
        let access_log = self
            .get(ACCESS_LOG)
            .map(|value| match value.trimmed() {
                format @ ("json" | "apache") => Ok(format.to_owned()),
                _ => Err(value.error("expected json or apache")),
            })
            .transpose()?;
        Ok(Settings {
            skip_inbound_ports: port_list(SKIP_INBOUND_PORTS)?,
            skip_outbound_ports: port_list(SKIP_OUTBOUND_PORTS)?,
            skip_subnets,
            opaque_ports,
            resources,
            log_level,
            image,
            default_inbound_policy,
            shutdown_grace_period,
            trace_collector,
            trace_sample_rate,
            access_log,
        })
    }

    /// A request and a limit, each from its annotation or the configuration, checked to be
    /// quantities with the request not above the limit (the API server would refuse the pod).
    fn request_and_limit(
        &self,
        (request_annotation, request_default): (&'static str, &Option<String>),
        (limit_annotation, limit_default): (&'static str, &Option<String>),
        resource: &str,
    ) -> Result<RequestAndLimit, AnnotationError> {
        let resolve =
            |annotation: &'static str, default: &Option<String>| match self.get(annotation) {
                Some(value) => {
                    let quantity = parse_quantity(value.trimmed()).ok_or_else(|| {
                        value.error("not a Kubernetes quantity like 100m, 0.5, 64Mi or 1Gi")
                    })?;
                    Ok(Some((value.trimmed().to_owned(), quantity, value.source)))
                }
                None => Ok(default.as_ref().map(|text| {
                    let quantity = parse_quantity(text.trim()).unwrap_or(f64::NAN);
                    (text.trim().to_owned(), quantity, Source::MeshConfig)
                })),
            };
        let request = resolve(request_annotation, request_default)?;
        let limit = resolve(limit_annotation, limit_default)?;
        if let (Some((request_text, request, request_source)), Some((limit_text, limit, _))) =
            (&request, &limit)
            && request > limit
        {
            // Blame the request unless only the limit was annotated.
            let (annotation, value, reason, source) =
                if *request_source == Source::MeshConfig && self.get(limit_annotation).is_some() {
                    let source = self.get(limit_annotation).map_or(Source::Pod, |v| v.source);
                    (
                        limit_annotation,
                        limit_text,
                        format!("is below the proxy's {resource} request {request_text:?}"),
                        source,
                    )
                } else {
                    (
                        request_annotation,
                        request_text,
                        format!("is above the proxy's {resource} limit {limit_text:?}"),
                        *request_source,
                    )
                };
            return Err(AnnotationError {
                annotation,
                value: value.clone(),
                reason,
                set_on: source,
            });
        }
        Ok(RequestAndLimit {
            request: request.map(|(text, _, _)| text),
            limit: limit.map(|(text, _, _)| text),
        })
    }
}

/// What `mesh.dev/inject` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injection {
    Enabled,
    Disabled(Source),
    Unset,
}

/// The validated settings of one injection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    /// `--skip-inbound-ports` for `mesh-proxy init`, as annotated (checked, trimmed).
    pub skip_inbound_ports: Option<String>,
    /// `--skip-outbound-ports`.
    pub skip_outbound_ports: Option<String>,
    /// `--skip-subnets`.
    pub skip_subnets: Option<String>,
    /// `MESH_PROXY_OPAQUE_PORTS`: numbers and ranges, names resolved.
    pub opaque_ports: Option<String>,
    pub resources: ProxyResources,
    pub log_level: String,
    pub image: String,
    pub default_inbound_policy: InboundPolicy,
    pub shutdown_grace_period: Option<String>,
    /// `MESH_PROXY_TRACE_COLLECTOR`: the collector's URL (`http://` added to `host:port`).
    pub trace_collector: Option<String>,
    /// `MESH_PROXY_TRACE_SAMPLE_RATE`, as annotated.
    pub trace_sample_rate: Option<String>,
    /// `MESH_PROXY_ACCESS_LOG`: `json` or `apache`.
    pub access_log: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyResources {
    pub cpu: RequestAndLimit,
    pub memory: RequestAndLimit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestAndLimit {
    pub request: Option<String>,
    pub limit: Option<String>,
}

/// The proxy's collector URL from `host:port` (plain OTLP/gRPC, as collectors serve inside a
/// cluster) or an `http://` / `https://` URL with a host and a port; the proxy takes only URLs.
fn collector_url(text: &str) -> Result<String, String> {
    const EXPECTED: &str = "not a collector address like otel-collector.monitoring:4317 or \
                            http://otel-collector.monitoring:4317";
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
        Some(_) => return Err(EXPECTED.to_owned()),
        None => ("http", text),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| EXPECTED.to_owned())?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'));
    let port_ok = port.parse::<u16>().is_ok_and(|port| port > 0);
    if host_ok && port_ok {
        Ok(format!("{scheme}://{host}:{port}"))
    } else {
        Err(EXPECTED.to_owned())
    }
}

/// The non-empty, trimmed items of a comma list (a trailing comma is not an error).
fn list_items(text: &str) -> impl Iterator<Item = &str> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// The opaque ports for the proxy: numbers and ranges as written, names replaced by the
/// numbers of the pod's container ports of that name. A well-formed name no container uses
/// is dropped: a namespace-wide annotation names ports some pods do not have.
fn opaque_ports(
    value: &Value<'_>,
    container_ports: &BTreeMap<String, u16>,
) -> Result<String, AnnotationError> {
    let mut ports = Vec::new();
    for item in list_items(value.text) {
        if let Ok(_range) = parse_port_range(item) {
            ports.push(item.to_owned());
        } else if is_port_name(item) {
            if let Some(port) = container_ports.get(item) {
                ports.push(port.to_string());
            }
        } else {
            return Err(value.error(format!(
                "{item:?} is not a port (1-65535), a range like 8000-8100 or a port name"
            )));
        }
    }
    Ok(ports.join(","))
}

/// Checks `8080` or `4190-4191`; the error completes "is not a port ...".
fn parse_port_range(item: &str) -> Result<(u16, u16), &'static str> {
    const EXPECTED: &str = "(1-65535) or a range like 4190-4191";
    let port = |text: &str| {
        let text = text.trim();
        if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        text.parse::<u16>().ok().filter(|port| *port != 0)
    };
    let range = match item.split_once('-') {
        None => port(item).map(|port| (port, port)),
        Some((low, high)) => port(low).zip(port(high)),
    };
    match range {
        Some((low, high)) if low > high => Err("range: it ends before it starts"),
        Some(range) => Ok(range),
        None => Err(EXPECTED),
    }
}

/// A Kubernetes port name (IANA_SVC_NAME): 1-15 lowercase letters, digits and inner single
/// dashes, with at least one letter.
fn is_port_name(text: &str) -> bool {
    (1..=15).contains(&text.len())
        && text
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && text.bytes().any(|byte| byte.is_ascii_lowercase())
        && !text.starts_with('-')
        && !text.ends_with('-')
        && !text.contains("--")
}

/// Checks `10.0.0.0/8`, `fd00::/8` or a bare address, as `mesh-proxy init` accepts them.
fn parse_cidr(item: &str) -> Result<(), &'static str> {
    let (address, prefix_len) = match item.split_once('/') {
        Some((address, prefix_len)) => (address, Some(prefix_len)),
        None => (item, None),
    };
    let address: IpAddr = address.parse().map_err(|_| "not an IP address")?;
    let max_len: u8 = if address.is_ipv4() { 32 } else { 128 };
    match prefix_len {
        None => Ok(()),
        Some(text) if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) => {
            match text.parse::<u8>() {
                Ok(len) if len <= max_len => Ok(()),
                _ if max_len == 32 => Err("an IPv4 prefix length is at most 32"),
                _ => Err("an IPv6 prefix length is at most 128"),
            }
        }
        Some(_) => Err("the prefix length is not a number"),
    }
}

/// The value of a Kubernetes quantity (`100m`, `0.5`, `64Mi`, `1e3`), for comparing a request
/// with a limit; `None` when it is not one.
pub(crate) fn parse_quantity(text: &str) -> Option<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        exponent => {
            let digits = exponent
                .strip_prefix(['e', 'E'])?
                .trim_start_matches(['+', '-']);
            let sign_len = exponent.len() - 1 - digits.len();
            if digits.is_empty() || sign_len > 1 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let exponent: i32 = exponent.get(1..)?.parse().ok()?;
            10f64.powi(exponent)
        }
    };
    Some(number * scale)
}

/// `500ms`, `10s`, `2m`, `1h`: what the proxy's `MESH_PROXY_SHUTDOWN_GRACE_PERIOD` accepts.
fn is_duration(text: &str) -> bool {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let Ok(number) = number.parse::<u64>() else {
        return false;
    };
    // As many seconds as the proxy can hold (a u64).
    match unit {
        "ms" | "s" => true,
        "m" => number.checked_mul(60).is_some(),
        "h" => number.checked_mul(3600).is_some(),
        _ => false,
    }
}

/// Checks a tracing filter made of `level` and `target=level` directives.
pub(crate) fn check_log_level(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |level: &str| LEVELS.contains(&level.to_ascii_lowercase().as_str());
    let is_target = |target: &str| {
        !target.is_empty()
            && target
                .chars()
                // What the proxy's filter parser takes as a target (no `.`).
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
    };
    if text.is_empty() {
        return Err(
            "empty; expected a level like info or a filter like warn,mesh_proxy=debug".into(),
        );
    }
    for directive in text.split(',').map(str::trim) {
        let ok = match directive.split_once('=') {
            None => is_level(directive),
            Some((target, level)) => is_target(target) && is_level(level),
        };
        if !ok {
            return Err(format!(
                "{directive:?} is not a level (trace, debug, info, warn, error, off) or target=level"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_pod_overrides_the_namespace() {
        let pod = map(&[(PROXY_LOG_LEVEL, "debug")]);
        let namespace = map(&[(PROXY_LOG_LEVEL, "warn"), (PROXY_IMAGE, "example/proxy:1")]);
        let settings = Annotations {
            pod: Some(&pod),
            namespace: &namespace,
        }
        .settings(&MeshConfig::default(), &BTreeMap::new())
        .expect("valid");
        assert_eq!(settings.log_level, "debug");
        assert_eq!(settings.image, "example/proxy:1");
    }

    #[test]
    fn injection_annotation() {
        let cases = [
            (None, None, Ok(Injection::Unset)),
            (Some("enabled"), None, Ok(Injection::Enabled)),
            (None, Some("enabled"), Ok(Injection::Enabled)),
            (
                Some("disabled"),
                Some("enabled"),
                Ok(Injection::Disabled(Source::Pod)),
            ),
            (
                None,
                Some("disabled"),
                Ok(Injection::Disabled(Source::Namespace)),
            ),
            (Some("enabled"), Some("disabled"), Ok(Injection::Enabled)),
            (
                Some("yes"),
                None,
                Err(r#"mesh.dev/inject: "yes": expected enabled or disabled"#),
            ),
            (
                None,
                Some("true"),
                Err(
                    r#"mesh.dev/inject: "true": expected enabled or disabled (set on the namespace)"#,
                ),
            ),
        ];
        for (on_pod, on_namespace, expected) in cases {
            let pod = on_pod.map(|v| map(&[(INJECT, v)]));
            let namespace = on_namespace.map_or_else(BTreeMap::new, |v| map(&[(INJECT, v)]));
            let got = Annotations {
                pod: pod.as_ref(),
                namespace: &namespace,
            }
            .injection()
            .map_err(|error| error.to_string());
            assert_eq!(
                got,
                expected.map_err(str::to_owned),
                "{on_pod:?} {on_namespace:?}"
            );
        }
    }

    #[test]
    fn quantities() {
        let cases = [
            ("100m", Some(0.1)),
            ("1", Some(1.0)),
            ("0.5", Some(0.5)),
            ("64Mi", Some(64.0 * 1024.0 * 1024.0)),
            ("1Gi", Some(1024.0 * 1024.0 * 1024.0)),
            ("2k", Some(2000.0)),
            ("1e3", Some(1000.0)),
            ("1E-3", Some(0.001)),
            ("", None),
            ("m", None),
            ("1.2.3", None),
            ("-1", None),
            ("10 Mi", None),
            ("10MB", None),
            ("1e", None),
            ("1e+-3", None),
            ("lots", None),
        ];
        for (text, expected) in cases {
            let got = parse_quantity(text);
            match (got, expected) {
                (Some(got), Some(expected)) => {
                    assert!((got - expected).abs() < 1e-9 * expected.max(1.0), "{text}")
                }
                (got, expected) => assert_eq!(got, expected, "{text}"),
            }
        }
    }

    #[test]
    fn durations_and_log_levels() {
        for good in ["500ms", "10s", "2m", "1h", "0s"] {
            assert!(is_duration(good), "{good}");
        }
        for bad in ["", "10", "s", "ten", "1.5s", "10 s", "-1s", "1d"] {
            assert!(!is_duration(bad), "{bad}");
        }
        for good in [
            "info",
            "WARN",
            "off",
            "warn,mesh_proxy=debug",
            "hyper::proto=trace",
        ] {
            assert!(check_log_level(good).is_ok(), "{good}");
        }
        for bad in ["", "loud", "info,", "=debug", "mesh_proxy=loud", "a b=info"] {
            assert!(check_log_level(bad).is_err(), "{bad}");
        }
    }

    /// Found by fuzzing (tests/fuzz.rs): the proxy refused a duration the injector had
    /// admitted (more seconds than it can hold), so the pod's proxy could not start.
    #[test]
    fn durations_the_proxy_refuses_are_refused() {
        assert!(!is_duration("307445734561825861m"));
        assert!(is_duration("307445734561825860m"));
    }

    /// Found by fuzzing (tests/fuzz.rs): the proxy refused a filter the injector had admitted
    /// (its parser takes no `.` in a target), so the pod's proxy could not start.
    #[test]
    fn log_filters_the_proxy_refuses_are_refused() {
        assert!(check_log_level(".=trace").is_err());
    }

    #[test]
    fn port_names() {
        for good in ["http", "metrics", "h2c-8080", "a"] {
            assert!(is_port_name(good), "{good}");
        }
        for bad in [
            "",
            "HTTP",
            "-http",
            "http-",
            "a--b",
            "8080",
            "name_with_underscore",
            "sixteen-letters1",
        ] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }
}
