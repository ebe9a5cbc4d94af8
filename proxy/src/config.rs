//! The proxy's configuration: one typed struct, parsed and validated once at start from
//! `MESH_PROXY_*` environment variables. Parsing reads from any lookup function, so tests pass
//! a map instead of touching the process environment.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_proto::common::WorkloadRef;

use crate::access_log::AccessLogFormat;
use crate::policy::DefaultPolicy;

/// A bad configuration value, naming the variable and the value.
#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?}: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub var: String,
    /// The value it had.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Everything the proxy needs to know at start.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Where the inbound listener binds (traffic for the local application).
    pub inbound_listen: SocketAddr,
    /// Where the outbound listener binds (traffic from the local application).
    pub outbound_listen: SocketAddr,
    /// Where the admin server binds.
    pub admin_listen: SocketAddr,
    /// The IP the inbound side forwards to: the application's address.
    pub inbound_app_ip: IpAddr,
    /// The controller's gRPC address (`http://host:8086`); without it the proxy forwards every
    /// connection to its original destination.
    pub controller_addr: Option<String>,
    /// Who this proxy runs for, sent with discovery requests.
    pub workload: Workload,
    /// How long protocol detection waits for the client's first bytes.
    pub detect_timeout: Duration,
    /// Ports never detected: forwarded as opaque TCP (server-speaks-first protocols).
    pub opaque_ports: BTreeSet<u16>,
    /// Timeout of one TCP connect to an endpoint or the application.
    pub connect_timeout: Duration,
    /// How long a request waits for the first discovery answer before falling back to the
    /// original destination.
    pub discovery_timeout: Duration,
    /// How long draining waits for in-flight work before exiting.
    pub shutdown_grace_period: Duration,
    /// Log filter: a level, or `target=level` pairs separated by commas (tracing-subscriber's
    /// `Targets` syntax), e.g. `warn,mesh_proxy=debug`.
    pub log_level: String,
    /// Log format: `plain` or `json`.
    pub log_format: LogFormat,
    /// The proxy's identity; without it the proxy neither originates nor accepts mesh TLS.
    pub identity: Option<IdentityConfig>,
    /// The inbound policy of ports no Server covers (and while the controller is silent).
    pub default_inbound_policy: DefaultPolicy,
    /// The identity allowed to tap this proxy over mesh TLS (the controller's).
    pub tap_identity: Option<String>,
    /// One line per request on stdout, in this format; off when None.
    pub access_log: Option<AccessLogFormat>,
    /// The OTLP/gRPC collector spans go to (`http://collector:4317`); tracing is off without.
    pub trace_collector: Option<String>,
    /// Share of new traces recorded, 0..=1 (traces started upstream follow their parent).
    pub trace_sample_rate: f64,
    /// Bounds on what peers can make the proxy hold.
    pub limits: Limits,
    /// Exit once the controller says the pod's application containers have finished
    /// (`MESH_PROXY_EXIT_WITH_APP=true`: a classic sidecar in a Job's pod).
    pub exit_with_app: bool,
    /// Threads that run the proxy (`MESH_PROXY_WORKER_THREADS`, default 1, like Linkerd's
    /// proxy cores or Istio's concurrency): one runs everything on the main thread; more suit
    /// a pod that needs more than a core of proxying, each thread serving its share of the
    /// connections on a runtime of its own (see `workers`).
    pub worker_threads: usize,
    /// A multicluster gateway (`MESH_PROXY_GATEWAY=true`): its inbound port also relays mutual
    /// TLS connections from other clusters' proxies to the meshed proxies of this one.
    pub gateway: bool,
}

/// Bounds on what a peer can make the proxy hold: connections, waits and buffers. Every port
/// of the proxy is reachable by any workload, so none of these is unbounded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    /// Connections open at once on the inbound listener; past it new ones are closed at accept
    /// (`MESH_PROXY_INBOUND_MAX_CONNECTIONS`).
    pub inbound_connections: usize,
    /// The same for the outbound listener (`MESH_PROXY_OUTBOUND_MAX_CONNECTIONS`).
    pub outbound_connections: usize,
    /// The same for the admin server (`MESH_PROXY_ADMIN_MAX_CONNECTIONS`).
    pub admin_connections: usize,
    /// The listen backlog of each listener (`MESH_PROXY_LISTEN_BACKLOG`; the kernel caps it at
    /// `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// How long an HTTP/1 server waits for a request's headers once it starts waiting for
    /// them, so also how long an idle keep-alive connection lives
    /// (`MESH_PROXY_HTTP_HEADER_READ_TIMEOUT`).
    pub http_header_read_timeout: Duration,
    /// How long an opaque TCP connection may carry no byte either way before it is closed
    /// (`MESH_PROXY_TCP_IDLE_TIMEOUT`).
    pub tcp_idle_timeout: Duration,
    /// How long a TLS handshake on the inbound or admin port may take
    /// (`MESH_PROXY_TLS_HANDSHAKE_TIMEOUT`).
    pub tls_handshake_timeout: Duration,
    /// Bytes of request bodies the whole proxy holds for retries; past it requests go out
    /// unbuffered and are not retried (`MESH_PROXY_RETRY_BUFFER_BYTES`).
    pub retry_buffer_bytes: usize,
    /// The same per client connection (`MESH_PROXY_RETRY_BUFFER_CONNECTION_BYTES`).
    pub retry_buffer_connection_bytes: usize,
    /// Connections open at once to one endpoint or application address; requests past it wait
    /// for one to free up, within the connect timeout (`MESH_PROXY_ENDPOINT_MAX_CONNECTIONS`).
    pub endpoint_connections: usize,
    /// How long what the proxy keeps per target (its discovery stream, outbound policy stream,
    /// connection pool) outlives the target's last use by a connection
    /// (`MESH_PROXY_TARGET_IDLE_TIMEOUT`).
    pub target_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            inbound_connections: 10_000,
            outbound_connections: 10_000,
            admin_connections: 100,
            listen_backlog: 4096,
            http_header_read_timeout: Duration::from_secs(30),
            tcp_idle_timeout: Duration::from_secs(3600),
            tls_handshake_timeout: Duration::from_secs(10),
            retry_buffer_bytes: 16 << 20,
            retry_buffer_connection_bytes: 1 << 20,
            endpoint_connections: 1000,
            target_idle_timeout: Duration::from_secs(300),
        }
    }
}

/// How the proxy obtains and checks certificates.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentityConfig {
    /// The SPIFFE ID to request (`MESH_PROXY_IDENTITY`).
    pub id: String,
    /// The ServiceAccount token proving it, re-read at each renewal.
    pub token_file: std::path::PathBuf,
    /// The trust anchors, PEM.
    pub trust_anchors_pem: String,
    /// The Identity service URL (the controller unless `MESH_PROXY_IDENTITY_ADDR` says).
    pub service_addr: String,
    /// Where the key and the current certificate are kept across restarts of the proxy
    /// (`MESH_PROXY_IDENTITY_CACHE_DIR`: a folder only the proxy can read, in memory); without
    /// it a restarted proxy waits for the controller.
    pub cache_dir: Option<std::path::PathBuf>,
}

/// The workload this proxy serves.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Workload {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Owning workload kind, e.g. `deployment`.
    pub kind: String,
    /// Owning workload name.
    pub name: String,
    /// Pod name.
    pub pod: String,
}

impl IdentityConfig {
    /// The trust domain of the identity (`spiffe://<domain>/...`).
    pub fn trust_domain(&self) -> &str {
        self.id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("cluster.local")
    }
}

impl Workload {
    /// The wire form sent to the controller.
    pub fn to_proto(&self) -> WorkloadRef {
        WorkloadRef {
            namespace: self.namespace.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            pod: self.pod.clone(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Ports whose server speaks first (SMTP, MySQL, PostgreSQL, ...): detection would wait for
/// bytes the client never sends first, so they are opaque unless configured otherwise.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// The proxy's default ports, as in DESIGN.md.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;
/// The outbound port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 4140;
/// The admin port.
pub const DEFAULT_ADMIN_PORT: u16 = 4191;

/// Worker threads by default: one. A sidecar shares its pod's CPU; on one thread the proxy
/// spends 31% less CPU per request at load than on two (no wake-ups or work stealing between
/// threads: BENCHMARKS.md) and still serves ~50k requests a second.
pub const DEFAULT_WORKER_THREADS: usize = 1;

impl Config {
    /// Parses the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// Parses from any lookup of variable names (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let opaque_ports = match env.get("MESH_PROXY_OPAQUE_PORTS") {
            Some(value) => parse_ports("MESH_PROXY_OPAQUE_PORTS", &value)?,
            None => DEFAULT_OPAQUE_PORTS.iter().copied().collect(),
        };
        let log_format = match env.get("MESH_PROXY_LOG_FORMAT").as_deref() {
            None | Some("plain") => LogFormat::Plain,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError {
                    var: "MESH_PROXY_LOG_FORMAT".into(),
                    value: other.into(),
                    reason: "expected `plain` or `json`".into(),
                });
            }
        };
        let controller_addr = env
            .get("MESH_PROXY_CONTROLLER_ADDR")
            .filter(|s| !s.is_empty());
        if let Some(addr) = &controller_addr
            && !(addr.starts_with("http://") || addr.starts_with("https://"))
        {
            return Err(ConfigError {
                var: "MESH_PROXY_CONTROLLER_ADDR".into(),
                value: addr.clone(),
                reason: "expected a URL like http://mesh-controller.mesh-system:8086".into(),
            });
        }
        let identity = match env.get("MESH_PROXY_IDENTITY").filter(|s| !s.is_empty()) {
            None => None,
            Some(id) => Some(identity_config(&env, id, controller_addr.as_deref())?),
        };
        let default_inbound_policy = match env.get("MESH_PROXY_DEFAULT_INBOUND_POLICY") {
            None => DefaultPolicy::AllUnauthenticated,
            Some(value) => value.parse().map_err(|reason| ConfigError {
                var: "MESH_PROXY_DEFAULT_INBOUND_POLICY".into(),
                value: value.clone(),
                reason,
            })?,
        };
        let tap_identity = env.get("MESH_PROXY_TAP_IDENTITY").or_else(|| {
            identity.as_ref().map(|identity| {
                format!(
                    "spiffe://{}/ns/mesh-system/sa/mesh-controller",
                    identity.trust_domain()
                )
            })
        });
        let access_log = match env.get("MESH_PROXY_ACCESS_LOG").filter(|v| !v.is_empty()) {
            None => None,
            Some(value) => Some(value.parse().map_err(|reason| ConfigError {
                var: "MESH_PROXY_ACCESS_LOG".into(),
                value: value.clone(),
                reason,
            })?),
        };
        let trace_collector = env
            .get("MESH_PROXY_TRACE_COLLECTOR")
            .filter(|v| !v.is_empty());
        if let Some(collector) = &trace_collector
            && !(collector.starts_with("http://") || collector.starts_with("https://"))
        {
            return Err(ConfigError {
                var: "MESH_PROXY_TRACE_COLLECTOR".into(),
                value: collector.clone(),
                reason: "expected a URL like http://otel-collector.monitoring:4317".into(),
            });
        }
        let trace_sample_rate: f64 =
            env.parse("MESH_PROXY_TRACE_SAMPLE_RATE", 0.01, "a number from 0 to 1")?;
        if !(0.0..=1.0).contains(&trace_sample_rate) {
            return Err(ConfigError {
                var: "MESH_PROXY_TRACE_SAMPLE_RATE".into(),
                value: env.get("MESH_PROXY_TRACE_SAMPLE_RATE").unwrap_or_default(),
                reason: "expected a number from 0 to 1".into(),
            });
        }
        let defaults = Limits::default();
        let limits = Limits {
            inbound_connections: env.count(
                "MESH_PROXY_INBOUND_MAX_CONNECTIONS",
                defaults.inbound_connections,
            )?,
            outbound_connections: env.count(
                "MESH_PROXY_OUTBOUND_MAX_CONNECTIONS",
                defaults.outbound_connections,
            )?,
            admin_connections: env.count(
                "MESH_PROXY_ADMIN_MAX_CONNECTIONS",
                defaults.admin_connections,
            )?,
            listen_backlog: u32::try_from(env.count(
                "MESH_PROXY_LISTEN_BACKLOG",
                defaults.listen_backlog as usize,
            )?)
            .unwrap_or(u32::MAX),
            http_header_read_timeout: env.positive_duration(
                "MESH_PROXY_HTTP_HEADER_READ_TIMEOUT",
                defaults.http_header_read_timeout,
            )?,
            tcp_idle_timeout: env
                .positive_duration("MESH_PROXY_TCP_IDLE_TIMEOUT", defaults.tcp_idle_timeout)?,
            tls_handshake_timeout: env.positive_duration(
                "MESH_PROXY_TLS_HANDSHAKE_TIMEOUT",
                defaults.tls_handshake_timeout,
            )?,
            retry_buffer_bytes: env
                .bytes("MESH_PROXY_RETRY_BUFFER_BYTES", defaults.retry_buffer_bytes)?,
            retry_buffer_connection_bytes: env.bytes(
                "MESH_PROXY_RETRY_BUFFER_CONNECTION_BYTES",
                defaults.retry_buffer_connection_bytes,
            )?,
            endpoint_connections: env.count(
                "MESH_PROXY_ENDPOINT_MAX_CONNECTIONS",
                defaults.endpoint_connections,
            )?,
            target_idle_timeout: env.positive_duration(
                "MESH_PROXY_TARGET_IDLE_TIMEOUT",
                defaults.target_idle_timeout,
            )?,
        };
        Ok(Self {
            exit_with_app: env.flag("MESH_PROXY_EXIT_WITH_APP")?,
            gateway: env.flag("MESH_PROXY_GATEWAY")?,
            worker_threads: env.count("MESH_PROXY_WORKER_THREADS", DEFAULT_WORKER_THREADS)?,
            limits,
            trace_collector,
            trace_sample_rate,
            access_log,
            tap_identity,
            default_inbound_policy,
            identity,
            inbound_listen: env.socket_addr(
                "MESH_PROXY_INBOUND_LISTEN",
                SocketAddr::new(any, DEFAULT_INBOUND_PORT),
            )?,
            outbound_listen: env.socket_addr(
                "MESH_PROXY_OUTBOUND_LISTEN",
                SocketAddr::new(local, DEFAULT_OUTBOUND_PORT),
            )?,
            admin_listen: env.socket_addr(
                "MESH_PROXY_ADMIN_LISTEN",
                SocketAddr::new(any, DEFAULT_ADMIN_PORT),
            )?,
            inbound_app_ip: env.parse("MESH_PROXY_INBOUND_APP_IP", local, "an IP address")?,
            controller_addr,
            workload: Workload {
                namespace: env.get("MESH_PROXY_NAMESPACE").unwrap_or_default(),
                kind: env.get("MESH_PROXY_WORKLOAD_KIND").unwrap_or_default(),
                name: env.get("MESH_PROXY_WORKLOAD_NAME").unwrap_or_default(),
                pod: env.get("MESH_PROXY_POD").unwrap_or_default(),
            },
            detect_timeout: env.duration("MESH_PROXY_DETECT_TIMEOUT", Duration::from_secs(1))?,
            opaque_ports,
            connect_timeout: env.duration("MESH_PROXY_CONNECT_TIMEOUT", Duration::from_secs(1))?,
            discovery_timeout: env
                .duration("MESH_PROXY_DISCOVERY_TIMEOUT", Duration::from_secs(3))?,
            shutdown_grace_period: env
                .duration("MESH_PROXY_SHUTDOWN_GRACE_PERIOD", Duration::from_secs(10))?,
            log_level: env
                .get("MESH_PROXY_LOG_LEVEL")
                .unwrap_or_else(|| "info".to_string()),
            log_format,
        })
    }
}

fn identity_config(
    env: &Env<'_>,
    id: String,
    controller_addr: Option<&str>,
) -> Result<IdentityConfig, ConfigError> {
    let missing = |var: &str, reason: &str| ConfigError {
        var: var.into(),
        value: String::new(),
        reason: reason.into(),
    };
    if !id.starts_with("spiffe://") || id.matches('/').count() < 6 {
        return Err(ConfigError {
            var: "MESH_PROXY_IDENTITY".into(),
            value: id,
            reason: "expected a SPIFFE ID like spiffe://cluster.local/ns/NS/sa/SA".into(),
        });
    }
    let token_file = env.get("MESH_PROXY_IDENTITY_TOKEN_FILE").ok_or_else(|| {
        missing(
            "MESH_PROXY_IDENTITY_TOKEN_FILE",
            "required when MESH_PROXY_IDENTITY is set",
        )
    })?;
    let trust_anchors_pem = match (
        env.get("MESH_PROXY_TRUST_ANCHORS"),
        env.get("MESH_PROXY_TRUST_ANCHORS_FILE"),
    ) {
        (Some(pem), _) if !pem.is_empty() => pem,
        (_, Some(path)) => std::fs::read_to_string(&path).map_err(|error| ConfigError {
            var: "MESH_PROXY_TRUST_ANCHORS_FILE".into(),
            value: path.clone(),
            reason: format!("cannot read it: {error}"),
        })?,
        _ => {
            return Err(missing(
                "MESH_PROXY_TRUST_ANCHORS",
                "MESH_PROXY_TRUST_ANCHORS or MESH_PROXY_TRUST_ANCHORS_FILE is required when MESH_PROXY_IDENTITY is set",
            ));
        }
    };
    let service_addr = env
        .get("MESH_PROXY_IDENTITY_ADDR")
        .or_else(|| controller_addr.map(str::to_string))
        .ok_or_else(|| {
            missing(
                "MESH_PROXY_IDENTITY_ADDR",
                "required when MESH_PROXY_IDENTITY is set and MESH_PROXY_CONTROLLER_ADDR is not",
            )
        })?;
    let cache_dir = env
        .get("MESH_PROXY_IDENTITY_CACHE_DIR")
        .filter(|dir| !dir.is_empty())
        .map(std::path::PathBuf::from);
    Ok(IdentityConfig {
        id,
        token_file: token_file.into(),
        trust_anchors_pem,
        service_addr,
        cache_dir,
    })
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn get(&self, var: &str) -> Option<String> {
        (self.0)(var).map(|v| v.trim().to_string())
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &str,
        default: T,
        expected: &str,
    ) -> Result<T, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|_| ConfigError {
                var: var.into(),
                reason: format!("expected {expected}"),
                value,
            }),
        }
    }

    fn socket_addr(&self, var: &str, default: SocketAddr) -> Result<SocketAddr, ConfigError> {
        self.parse(var, default, "an address like 0.0.0.0:4143")
    }

    /// `true` or `false` (unset or empty: false).
    fn flag(&self, var: &str) -> Result<bool, ConfigError> {
        match self.get(var).as_deref() {
            None | Some("" | "false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(ConfigError {
                var: var.into(),
                value: other.into(),
                reason: "expected `true` or `false`".into(),
            }),
        }
    }

    /// A count of at least one.
    fn count(&self, var: &str, default: usize) -> Result<usize, ConfigError> {
        let count = self.parse(var, default, "a whole number of at least 1")?;
        if count == 0 {
            return Err(ConfigError {
                var: var.into(),
                value: self.get(var).unwrap_or_default(),
                reason: "expected a whole number of at least 1".into(),
            });
        }
        Ok(count)
    }

    /// A size in bytes: `65536`, `64Ki`, `16Mi` or `1Gi`, at least one byte.
    fn bytes(&self, var: &str, default: usize) -> Result<usize, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(value) => parse_bytes(&value)
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError {
                    var: var.into(),
                    value,
                    reason: "expected a size like 65536, 64Ki or 16Mi".into(),
                }),
        }
    }

    /// A duration longer than zero: a timeout of zero would refuse everything.
    fn positive_duration(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        let duration = self.duration(var, default)?;
        if duration.is_zero() {
            return Err(ConfigError {
                var: var.into(),
                value: self.get(var).unwrap_or_default(),
                reason: "expected a duration longer than zero, like 10s".into(),
            });
        }
        Ok(duration)
    }

    fn duration(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(value) => parse_duration(&value).ok_or_else(|| ConfigError {
                var: var.into(),
                value,
                reason: "expected a duration like 500ms, 10s or 2m".into(),
            }),
        }
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h` (an integer and a unit).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => number.checked_mul(60).map(Duration::from_secs),
        "h" => number.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Parses a size in bytes with an optional binary suffix (`65536`, `64Ki`, `16Mi`, `1Gi`).
pub fn parse_bytes(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().ok()?;
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

/// Parses a comma-separated list of ports and ranges (`25,3306,8000-8010`).
pub fn parse_ports(var: &str, value: &str) -> Result<BTreeSet<u16>, ConfigError> {
    let error = |reason: String| ConfigError {
        var: var.into(),
        value: value.into(),
        reason,
    };
    let port = |text: &str| -> Result<u16, ConfigError> {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| error(format!("{text:?} is not a port (1-65535)")))
    };
    let mut ports = BTreeSet::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (port(low)?, port(high)?);
                if low > high {
                    return Err(error(format!("range {item:?} is backwards")));
                }
                ports.extend(low..=high);
            }
            None => {
                ports.insert(port(item)?);
            }
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|var| map.get(var).cloned())
    }

    #[test]
    fn defaults_are_the_documented_ports() {
        let config = parse(&[]).expect("empty environment is valid");
        assert_eq!(config.inbound_listen, "0.0.0.0:4143".parse().expect("addr"));
        assert_eq!(
            config.outbound_listen,
            "127.0.0.1:4140".parse().expect("addr")
        );
        assert_eq!(config.admin_listen, "0.0.0.0:4191".parse().expect("addr"));
        assert!(config.opaque_ports.contains(&5432));
        assert!(config.controller_addr.is_none());
        assert_eq!(config.detect_timeout, Duration::from_secs(1));
    }

    #[test]
    fn values_are_parsed() {
        let config = parse(&[
            ("MESH_PROXY_INBOUND_LISTEN", "127.0.0.1:0"),
            ("MESH_PROXY_OPAQUE_PORTS", "25, 8000-8002"),
            ("MESH_PROXY_DETECT_TIMEOUT", "250ms"),
            ("MESH_PROXY_CONTROLLER_ADDR", "http://127.0.0.1:8086"),
            ("MESH_PROXY_LOG_FORMAT", "json"),
        ])
        .expect("valid");
        assert_eq!(config.inbound_listen.port(), 0);
        assert_eq!(
            config.opaque_ports.into_iter().collect::<Vec<_>>(),
            vec![25, 8000, 8001, 8002]
        );
        assert_eq!(config.detect_timeout, Duration::from_millis(250));
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        let cases = [
            ("MESH_PROXY_INBOUND_LISTEN", "4143"),
            ("MESH_PROXY_DETECT_TIMEOUT", "ten"),
            ("MESH_PROXY_DETECT_TIMEOUT", "10 parsecs"),
            ("MESH_PROXY_OPAQUE_PORTS", "25,70000"),
            ("MESH_PROXY_OPAQUE_PORTS", "90-80"),
            ("MESH_PROXY_INBOUND_APP_IP", "localhost"),
            ("MESH_PROXY_CONTROLLER_ADDR", "127.0.0.1:8086"),
            ("MESH_PROXY_LOG_FORMAT", "xml"),
            ("MESH_PROXY_DEFAULT_INBOUND_POLICY", "allow-everything"),
            ("MESH_PROXY_ACCESS_LOG", "xml"),
            ("MESH_PROXY_TRACE_SAMPLE_RATE", "2"),
            ("MESH_PROXY_TRACE_COLLECTOR", "collector:4317"),
            ("MESH_PROXY_IDENTITY", "web"),
            ("MESH_PROXY_INBOUND_MAX_CONNECTIONS", "0"),
            ("MESH_PROXY_LISTEN_BACKLOG", "many"),
            ("MESH_PROXY_TCP_IDLE_TIMEOUT", "0s"),
            ("MESH_PROXY_RETRY_BUFFER_BYTES", "16MB"),
            ("MESH_PROXY_EXIT_WITH_APP", "yes"),
            ("MESH_PROXY_WORKER_THREADS", "0"),
        ];
        for (var, value) in cases {
            let error = parse(&[(var, value)]).expect_err(var);
            let message = error.to_string();
            assert!(message.contains(var), "{message}");
            assert!(message.contains(value), "{message}");
        }
    }

    /// Found by fuzzing (tests/fuzz): these errors named the value as the proxy read it
    /// (`"10"`, `"0"`), not as it was written.
    #[test]
    fn errors_name_the_value_as_written() {
        for (var, value) in [
            ("MESH_PROXY_TRACE_SAMPLE_RATE", "1e1"),
            ("MESH_PROXY_INBOUND_MAX_CONNECTIONS", "00"),
        ] {
            let error = parse(&[(var, value)]).expect_err(var);
            assert_eq!((error.var.as_str(), error.value.as_str()), (var, value));
        }
    }

    #[test]
    fn one_worker_thread_unless_told() {
        assert_eq!(parse(&[]).expect("valid").worker_threads, 1);
        let config = parse(&[("MESH_PROXY_WORKER_THREADS", "4")]).expect("valid");
        assert_eq!(config.worker_threads, 4);
    }

    #[test]
    fn limits_have_defaults_and_take_sizes() {
        let config = parse(&[
            ("MESH_PROXY_RETRY_BUFFER_BYTES", "32Mi"),
            ("MESH_PROXY_ADMIN_MAX_CONNECTIONS", "8"),
            ("MESH_PROXY_HTTP_HEADER_READ_TIMEOUT", "2s"),
        ])
        .expect("valid");
        assert_eq!(config.limits.retry_buffer_bytes, 32 << 20);
        assert_eq!(config.limits.admin_connections, 8);
        assert_eq!(
            config.limits.http_header_read_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(config.limits.inbound_connections, 10_000);
        assert_eq!(parse_bytes("64Ki"), Some(65536));
        assert_eq!(parse_bytes("12"), Some(12));
        assert_eq!(parse_bytes("1Ti"), None);
        assert_eq!(parse_bytes("Mi"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("ms"), None);
    }
}
