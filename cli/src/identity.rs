//! `meshctl identity`: a proxy's certificate chain, trust anchors and renewal, read from its
//! admin server's `GET /identity` — directly (`--proxy HOST:PORT`), through the Kubernetes API
//! server (a port-forward, `-n NS POD`), or from a local mesh's pod (`--local -n NS POD`).
//!
//! The proxy describes its certificates (`mesh_spiffe::report`); this module only fetches the
//! report, judges it against the clock and prints it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt as _, Full, Limited};
use k8s_openapi::api::core::v1::Pod;
use mesh_spiffe::report::{CertificateReport, IdentityReport, IdentityState, Timestamp, Validity};

use crate::GlobalArgs;
use crate::output::Output;

/// The proxy's admin port when the pod does not name it (`mesh-admin`).
const DEFAULT_ADMIN_PORT: u16 = 4191;
/// The container port name the injector gives the proxy's admin server.
const ADMIN_PORT_NAME: &str = "mesh-admin";
/// A report is a few kilobytes; anything much larger is not one.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// `meshctl identity`.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// The pod whose proxy to ask (in the namespace of -n, default `default`).
    #[arg(value_name = "POD", required_unless_present = "proxy")]
    pod: Option<String>,
    /// Ask the proxy admin server at HOST:PORT directly (e.g. a port-forward to 4191).
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["pod", "local"])]
    proxy: Option<String>,
    /// Find POD in the local mesh (`meshctl local up`) instead of the Kubernetes cluster.
    #[arg(long)]
    local: bool,
    /// The local mesh's state folder (as for `meshctl local`).
    #[arg(long, env = "MESH_LOCAL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// How long connecting and answering may take, e.g. `5s`.
    #[arg(long, default_value = "5s", value_parser = parse_seconds)]
    timeout: Duration,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let number = text.strip_suffix('s').unwrap_or(text);
    number
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{text:?} is not a number of seconds like 5s"))
}

/// Why an answer from a proxy is not a report to show.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum AnswerError {
    #[error("{proxy} runs without identity (no MESH_PROXY_IDENTITY): it has no certificate")]
    NoIdentity { proxy: String },
    #[error(
        "{proxy} has no /identity endpoint (404): it is not a mesh proxy's admin server, or a \
         mesh-proxy older than this meshctl"
    )]
    NoEndpoint { proxy: String },
    #[error("{proxy} answered {status}: {message}")]
    Refused {
        proxy: String,
        status: u16,
        message: String,
    },
    #[error("{proxy} answered something that is not an identity report: {reason}")]
    Malformed { proxy: String, reason: String },
}

/// Reads the answer to `GET /identity` from `source` (named in errors).
fn read_answer(source: &str, status: u16, body: &[u8]) -> Result<IdentityReport, AnswerError> {
    let proxy = source.to_owned();
    match serde_json::from_slice::<IdentityReport>(body) {
        Ok(report) if report.state == IdentityState::Disabled => {
            Err(AnswerError::NoIdentity { proxy })
        }
        Ok(report) if (200..300).contains(&status) => Ok(report),
        Ok(report) => Err(AnswerError::Refused {
            proxy,
            status,
            message: format!("a report in state {}", report.state),
        }),
        Err(_) if status == 404 && !is_kubernetes_status(body) => {
            Err(AnswerError::NoEndpoint { proxy })
        }
        Err(error) if (200..300).contains(&status) => Err(AnswerError::Malformed {
            proxy,
            reason: error.to_string(),
        }),
        Err(_) => Err(AnswerError::Refused {
            proxy,
            status,
            message: error_message(body),
        }),
    }
}

/// Whether a body is the API server's own `Status` (as opposed to the proxy's answer).
fn is_kubernetes_status(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v["kind"] == "Status")
}

/// The readable part of an error answer: the API server's `Status` message, else the text.
fn error_message(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(message) = value["message"].as_str()
    {
        return message.to_owned();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(no body)".to_owned();
    }
    // The first line, shortened: enough to recognise, never a screenful.
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(200).collect()
}

/// Runs `meshctl identity`.
pub fn run(args: IdentityArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(fetch(&args, global))?;
    match args.output {
        Output::Json | Output::Yaml => args.output.print(&report)?,
        Output::Table => print!("{}", render(&report, Timestamp::now())),
    }
    Ok(())
}

async fn fetch(args: &IdentityArgs, global: &GlobalArgs) -> anyhow::Result<IdentityReport> {
    let namespace = global.namespace.as_deref().unwrap_or("default");
    if let Some(addr) = &args.proxy {
        return fetch_direct(addr, &format!("the proxy at {addr}"), args.timeout).await;
    }
    let pod = args
        .pod
        .as_deref()
        .ok_or_else(|| anyhow!("name a POD, or a proxy with --proxy HOST:PORT"))?;
    if args.local {
        let addr = crate::local::proxy_admin_addr(args.state_dir.as_deref(), namespace, pod)?;
        let source = format!("the proxy of local pod {namespace}/{pod} ({addr})");
        return fetch_direct(&addr.to_string(), &source, args.timeout).await;
    }
    let client = crate::kubernetes::client(global).await?;
    fetch_through_api_server(&client, namespace, pod, args.timeout).await
}

/// `GET /identity` from an admin server at `addr` (`HOST:PORT`, or an `http://` URL).
async fn fetch_direct(
    addr: &str,
    source: &str,
    timeout: Duration,
) -> anyhow::Result<IdentityReport> {
    let authority = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    if authority.contains('/') || !authority.contains(':') {
        bail!("--proxy {addr:?}: give the admin server as HOST:PORT, e.g. 127.0.0.1:4191");
    }
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("cannot reach {source}"))?;
        get_identity(stream, authority, source).await
    };
    let (status, body) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow!("{source} did not answer within {timeout:?}"))??;
    Ok(read_answer(source, status, &body)?)
}

/// `GET /identity` over an open connection to an admin server: the status and the body.
async fn get_identity<I>(io: I, authority: &str, source: &str) -> anyhow::Result<(u16, Bytes)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .with_context(|| format!("{source} does not speak HTTP"))?;
    tokio::spawn(connection);
    let request = http::Request::get("/identity")
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .with_context(|| format!("{authority:?} is not a usable address"))?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("asking {source} for /identity"))?;
    let status = response.status().as_u16();
    let body = read_limited(response.into_body(), source).await?;
    Ok((status, body))
}

/// A body of at most [`MAX_ANSWER_BYTES`].
async fn read_limited<B>(body: B, source: &str) -> anyhow::Result<Bytes>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|error| anyhow!("reading the answer of {source}: {error}"))
}

/// `GET /identity` through a port-forward to the pod (via the API server), after checking the pod exists and is
/// meshed (so those errors say so rather than a bare 404 or 503).
pub async fn fetch_through_api_server(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    timeout: Duration,
) -> anyhow::Result<IdentityReport> {
    if !is_object_name(namespace) || !is_object_name(pod) {
        bail!("{namespace}/{pod} is not a valid pod name");
    }
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let found = tokio::time::timeout(timeout, pods.get_opt(pod))
        .await
        .map_err(|_| anyhow!("the API server did not answer within {timeout:?}"))?
        .with_context(|| format!("reading pod {namespace}/{pod}"))?
        .ok_or_else(|| anyhow!("pod {namespace}/{pod} not found"))?;
    let port = admin_port(&found).ok_or_else(|| {
        anyhow!(
            "pod {namespace}/{pod} has no {} container: it is not meshed (annotate its namespace \
             mesh.dev/inject: enabled and restart it, or use `meshctl inject`)",
            mesh_injector::PROXY_CONTAINER
        )
    })?;
    let source = format!("the proxy of pod {namespace}/{pod}");
    // A port-forward, as `kubectl port-forward` makes: the connection reaches the admin
    // server from the pod's own loopback, where the proxy serves its identity (it refuses
    // other pods, and the API server's pod proxy comes from elsewhere).
    let exchange = async {
        let mut forwarder = pods.portforward(pod, &[port]).await.with_context(|| {
            format!(
                "port-forwarding to {namespace}/{pod}:{port} (needs the `create` verb on \
                 pods/portforward in {namespace})"
            )
        })?;
        let stream = forwarder
            .take_stream(port)
            .ok_or_else(|| anyhow!("the port-forward to {source} opened no stream"))?;
        let answer = get_identity(stream, &format!("localhost:{port}"), &source).await;
        forwarder.abort();
        answer
    };
    let (status, body) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow!("{source} did not answer within {timeout:?}"))??;
    Ok(read_answer(&source, status, &body)?)
}

/// The proxy's admin port in a pod: its `mesh-admin` port, else the default; `None` when
/// the pod has no proxy container (regular or native sidecar).
fn admin_port(pod: &Pod) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == mesh_injector::PROXY_CONTAINER)?;
    let named = proxy
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok());
    Some(named.unwrap_or(DEFAULT_ADMIN_PORT))
}

/// A Kubernetes object name (DNS subdomain characters): nothing that could reshape the path.
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// "23h 10m", "2d 4h", "5m 3s", "42s".
fn human_duration(seconds: u64) -> String {
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m {}s", seconds % 60)
    } else {
        format!("{seconds}s")
    }
}

/// "in 5m 3s" or "5m 3s ago", relative to `now`.
fn relative(time: Timestamp, now: Timestamp) -> String {
    let delta = time.0.saturating_sub(now.0);
    if delta >= 0 {
        format!("in {}", human_duration(delta.unsigned_abs()))
    } else {
        format!("{} ago", human_duration(delta.unsigned_abs()))
    }
}

/// The EXPIRES and STATUS cells of a certificate at `now`.
fn expiry_cells(cert: &CertificateReport, now: Timestamp) -> (String, String) {
    match cert.validity_at(now.0) {
        Validity::Valid => (
            format!(
                "expires in {}",
                human_duration(cert.not_after.0.saturating_sub(now.0).unsigned_abs())
            ),
            "valid".to_owned(),
        ),
        Validity::Expired => (
            format!(
                "expired {} ago",
                human_duration(now.0.saturating_sub(cert.not_after.0).unsigned_abs())
            ),
            "EXPIRED".to_owned(),
        ),
        Validity::NotYetValid => (
            format!(
                "valid in {}",
                human_duration(cert.not_before.0.saturating_sub(now.0).unsigned_abs())
            ),
            "not yet valid".to_owned(),
        ),
    }
}

/// The report as people read it: the identity and its renewal, then one row per certificate
/// (the chain, leaf first, then the trust anchors), judged at `now`.
fn render(report: &IdentityReport, now: Timestamp) -> String {
    let dash = |text: &str| {
        if text.is_empty() {
            "-".to_owned()
        } else {
            text.to_owned()
        }
    };
    let mut out = String::new();
    out.push_str(&format!(
        "identity:      {}\n",
        report.identity.as_deref().unwrap_or("-")
    ));
    out.push_str(&format!("state:         {}\n", report.state));
    let moment = |time: Option<Timestamp>| match time {
        Some(time) => format!("{time} ({})", relative(time, now)),
        None => "-".to_owned(),
    };
    out.push_str(&format!("last renewal:  {}\n", moment(report.last_renewal)));
    out.push_str(&format!("next renewal:  {}\n", moment(report.next_renewal)));
    if let Some(error) = &report.last_error {
        out.push_str(&format!("last error:    {error}\n"));
    }
    if report.chain.is_empty() {
        out.push_str("no certificate yet: the proxy is waiting for the identity service\n");
    }
    let mut rows = vec![
        [
            "CERTIFICATE",
            "SUBJECT",
            "SPIFFE ID",
            "ISSUER",
            "NOT AFTER",
            "EXPIRES",
            "STATUS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    let roles = report
        .chain
        .iter()
        .enumerate()
        .map(|(i, cert)| (if i == 0 { "leaf" } else { "intermediate" }, cert))
        .chain(
            report
                .trust_anchors
                .iter()
                .map(|cert| ("trust anchor", cert)),
        );
    for (role, cert) in roles {
        let (expires, status) = expiry_cells(cert, now);
        rows.push(vec![
            role.to_owned(),
            dash(&cert.subject),
            dash(cert.spiffe_id.as_deref().unwrap_or_default()),
            dash(&cert.issuer),
            cert.not_after.to_string(),
            expires,
            status,
        ]);
    }
    out.push('\n');
    out.push_str(&crate::stat::render_table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    /// 2026-12-01T12:00:00Z.
    const NOON: i64 = 1_796_126_400;

    fn cert(
        subject: &str,
        issuer: &str,
        spiffe_id: Option<&str>,
        from: i64,
        to: i64,
    ) -> CertificateReport {
        CertificateReport {
            subject: subject.to_owned(),
            issuer: issuer.to_owned(),
            serial: "01".to_owned(),
            spiffe_id: spiffe_id.map(str::to_owned),
            not_before: Timestamp(from),
            not_after: Timestamp(to),
            pem: String::new(),
        }
    }

    fn report() -> IdentityReport {
        IdentityReport {
            state: IdentityState::Certified,
            identity: Some(WEB.to_owned()),
            chain: vec![
                cert(
                    "",
                    "CN=issuer",
                    Some(WEB),
                    NOON - 3600,
                    NOON + 23 * 3600 + 600,
                ),
                cert("CN=issuer", "CN=root", None, NOON - 86_400, NOON - 60),
            ],
            trust_anchors: vec![cert(
                "CN=root",
                "CN=root",
                None,
                NOON + 90,
                NOON + 86_400 * 400,
            )],
            last_renewal: Some(Timestamp(NOON - 3600)),
            next_renewal: Some(Timestamp(NOON + 15 * 3600)),
            last_error: None,
        }
    }

    #[test]
    fn the_table_shows_each_certificate_with_its_expiry_and_status() {
        let text = render(&report(), Timestamp(NOON));
        let expected = "\
identity:      spiffe://cluster.local/ns/shop/sa/web
state:         certified
last renewal:  2026-12-01T11:00:00Z (1h 0m ago)
next renewal:  2026-12-02T03:00:00Z (in 15h 0m)

CERTIFICATE   SUBJECT    SPIFFE ID                              ISSUER     NOT AFTER             EXPIRES             STATUS
leaf          -          spiffe://cluster.local/ns/shop/sa/web  CN=issuer  2026-12-02T11:10:00Z  expires in 23h 10m  valid
intermediate  CN=issuer  -                                      CN=root    2026-12-01T11:59:00Z  expired 1m 0s ago   EXPIRED
trust anchor  CN=root    -                                      CN=root    2028-01-05T12:00:00Z  valid in 1m 30s     not yet valid
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn a_pending_proxy_says_it_has_no_certificate_and_why() {
        let mut pending = report();
        pending.state = IdentityState::Pending;
        pending.chain.clear();
        pending.last_renewal = None;
        pending.last_error = Some("identity service: Unavailable: connection refused".to_owned());
        let text = render(&pending, Timestamp(NOON));
        assert!(text.contains("state:         pending\n"), "{text}");
        assert!(text.contains("last renewal:  -\n"), "{text}");
        assert!(
            text.contains("last error:    identity service: Unavailable: connection refused\n"),
            "{text}"
        );
        assert!(text.contains("no certificate yet"), "{text}");
        assert!(!text.contains("\nleaf"), "{text}");
        assert!(text.contains("\ntrust anchor"), "{text}");
    }

    #[test]
    fn durations_read_as_the_largest_two_units() {
        for (seconds, text) in [
            (0, "0s"),
            (59, "59s"),
            (61, "1m 1s"),
            (23 * 3600 + 10 * 60 + 5, "23h 10m"),
            (3 * 86_400 + 4 * 3600, "3d 4h"),
        ] {
            assert_eq!(human_duration(seconds), text);
        }
    }

    #[test]
    fn answers_are_read_or_refused_naming_what_was_wrong() {
        let source = "the proxy at 127.0.0.1:4191";
        let body = serde_json::to_vec(&report()).expect("JSON");
        assert_eq!(read_answer(source, 200, &body), Ok(report()));

        let disabled = serde_json::to_vec(&IdentityReport::disabled()).expect("JSON");
        let error = read_answer(source, 404, &disabled).expect_err("no identity");
        assert!(matches!(error, AnswerError::NoIdentity { .. }));
        assert_eq!(
            error.to_string(),
            "the proxy at 127.0.0.1:4191 runs without identity (no MESH_PROXY_IDENTITY): it has \
             no certificate"
        );

        let old_proxy = b"not found; try /metrics, /ready, /live, /config, POST /shutdown\n";
        assert!(matches!(
            read_answer(source, 404, old_proxy),
            Err(AnswerError::NoEndpoint { .. })
        ));

        let pod_gone = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods \"web-1\" not found","reason":"NotFound","code":404}"#;
        assert_eq!(
            read_answer(source, 404, pod_gone).map_err(|e| e.to_string()),
            Err(format!("{source} answered 404: pods \"web-1\" not found"))
        );

        let error = read_answer(source, 200, b"{\"state\": \"certified\"").expect_err("truncated");
        assert!(matches!(error, AnswerError::Malformed { .. }), "{error}");
        let error = read_answer(source, 200, b"\xff\xfe garbage").expect_err("garbage");
        assert!(matches!(error, AnswerError::Malformed { .. }), "{error}");

        let refused = read_answer(source, 503, b"upstream connect error\nmore\n");
        assert_eq!(
            refused.map_err(|e| e.to_string()),
            Err(format!("{source} answered 503: upstream connect error"))
        );
    }

    #[test]
    fn object_names_cannot_reshape_the_pod_proxy_path() {
        assert!(is_object_name("web-7d9f8-abcde"));
        assert!(!is_object_name("web/../../secrets"));
        assert!(!is_object_name("web:4191"));
        assert!(!is_object_name(""));
    }
}
