//! `mesh-trace`: OpenTelemetry spans for the mesh's programs. Owns the W3C/B3 trace context
//! ([`SpanContext`]) and the OTLP/gRPC exporter ([`Tracer`]) the proxy and the controller share;
//! each program makes its own spans (the proxy per HTTP request, the controller per gRPC call).
//! It must not depend on either program.
//!
//! The span pipeline is ours, on the caller's runtime: a bounded queue that drops (and counts)
//! when the collector is slow or absent, and a task that exports batches with the OTLP types
//! and tonic client of `opentelemetry-proto`. The SDK's batch processor would run its own
//! thread and cannot report drops; tracing must never slow a request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
pub use opentelemetry_proto::tonic::trace::v1::{Span, Status, span, status};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tracing::debug;

/// Spans queued for export before new ones are dropped.
const QUEUE: usize = 2048;
/// Spans per export request, at most.
const BATCH: usize = 512;
/// How long a partial batch waits.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A position in a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The span.
    pub span_id: [u8; 8],
    /// Whether the trace is recorded.
    pub sampled: bool,
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    // All zeroes is invalid for both ids.
    out.iter().any(|b| *b != 0).then_some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SpanContext {
    /// Parses `traceparent: 00-<trace id>-<parent id>-<flags>`.
    pub fn from_traceparent(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        if version.len() != 2 || version == "ff" {
            return None;
        }
        let trace_id = hex::<16>(parts.next()?)?;
        let span_id = hex::<8>(parts.next()?)?;
        let flags = u8::from_str_radix(parts.next()?.get(..2)?, 16).ok()?;
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// Parses B3, single (`b3: trace-span-sampled`) or multi-header (`x-b3-traceid`...);
    /// 64-bit trace ids are left-padded.
    pub fn from_b3(headers: &HeaderMap) -> Option<Self> {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (trace, span, sampled) = match get("b3") {
            Some(single) => {
                let mut parts = single.split('-');
                (parts.next()?, parts.next()?, parts.next())
            }
            None => (
                get("x-b3-traceid")?,
                get("x-b3-spanid")?,
                get("x-b3-sampled"),
            ),
        };
        let trace = if trace.len() == 16 {
            format!("{:0>32}", trace)
        } else {
            trace.to_string()
        };
        Some(Self {
            trace_id: hex::<16>(&trace)?,
            span_id: hex::<8>(span)?,
            sampled: !matches!(sampled, Some("0") | Some("false")),
        })
    }

    /// A new span: a child of `parent` in its trace, or the root of a new trace.
    pub fn child(parent: Option<&SpanContext>, sampled: bool) -> Self {
        Self {
            trace_id: parent.map_or_else(rand::random, |p| p.trace_id),
            span_id: rand::random(),
            sampled,
        }
    }

    /// The caller's context from request headers: `traceparent`, else B3.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(Self::from_traceparent)
            .or_else(|| Self::from_b3(headers))
    }

    /// The `traceparent` value naming this span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }
}

/// Exports spans to an OTLP collector.
#[derive(Debug)]
pub struct Tracer {
    spans: mpsc::Sender<Span>,
    sample_rate: f64,
    dropped: Counter,
}

impl Tracer {
    /// Starts exporting to `collector` (`http://host:4317`) as `service`.
    pub fn start(
        collector: &str,
        service: String,
        sample_rate: f64,
        dropped: Counter,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(collector.to_string())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export(
            TraceServiceClient::new(channel),
            service,
            rx,
            dropped.clone(),
        ));
        Ok(Self {
            spans: tx,
            sample_rate,
            dropped,
        })
    }

    /// The share of new traces (no sampled parent) that are recorded.
    pub fn sample_rate(&self) -> f64 {
        self.sample_rate
    }

    /// Whether a request with `parent` (if any) is recorded: the parent's decision, else a draw
    /// at the sample rate.
    pub fn sampled(&self, parent: Option<&SpanContext>) -> bool {
        parent.map_or_else(|| rand::random::<f64>() < self.sample_rate, |p| p.sampled)
    }

    /// Queues a finished span for export; drops (and counts) it when the queue is full.
    pub fn record(&self, span: Span) {
        if self.spans.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

async fn export(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    service: String,
    mut spans: mpsc::Receiver<Span>,
    dropped: Counter,
) {
    let resource = Resource {
        attributes: vec![attribute("service.name", service)],
        ..Default::default()
    };
    loop {
        let Some(first) = spans.recv().await else {
            return;
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    spans: batch,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        if let Err(status) = client.export(request).await {
            dropped.inc_by(count);
            debug!(%status, count, "span export failed; spans dropped");
        }
    }
}

pub fn attribute(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

pub fn int_attribute(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn traceparent_round_trips_and_refuses_garbage() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = SpanContext::from_traceparent(value).expect("valid");
        assert!(context.sampled);
        assert_eq!(context.traceparent(), value);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanContext::from_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn b3_headers_are_accepted() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "b3",
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
        );
        let single = SpanContext::from_b3(&headers).expect("single b3");
        assert!(!single.sampled);
        let mut multi = HeaderMap::new();
        multi.insert("x-b3-traceid", HeaderValue::from_static("64fe8b2a57d3eff7"));
        multi.insert("x-b3-spanid", HeaderValue::from_static("e457b5a2e4d86bd1"));
        let context = SpanContext::from_b3(&multi).expect("multi b3");
        assert!(context.sampled);
        assert_eq!(
            to_hex(&context.trace_id),
            "000000000000000064fe8b2a57d3eff7"
        );
    }
}
