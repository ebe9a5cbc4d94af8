//! Spans of a request that crosses two proxies arrive at an OTLP receiver as one trace, with
//! the server proxy's span a child of the client proxy's and the app given the next parent.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::tonic::{self, Request, Response, Status};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use support::*;
use tokio_util::sync::CancellationToken;

const BOOKS: &str = "books.shop.svc.cluster.local:8080";

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                Some(s.as_str())
            }
            _ => None,
        })
}

#[tokio::test]
async fn one_trace_spans_both_proxies() {
    let stop = CancellationToken::new();
    let receiver = Receiver::default();
    let listener = loopback().await;
    let collector = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let tracing = [
        ("MESH_PROXY_TRACE_COLLECTOR", collector.as_str()),
        ("MESH_PROXY_TRACE_SAMPLE_RATE", "1"),
    ];
    let destination = ScriptedDestination::default();
    let controller = destination.serve(stop.clone()).await;
    let client = proxy_env(Some(&controller), None, &tracing).await;
    let server = proxy_env(None, None, &tracing).await;
    let backend = Backend::start("books").await;
    destination.set(
        BOOKS,
        vec![meshed(backend.addr, server.inbound_addr.port())],
    );

    let out = curl(&[
        "-x",
        &format!("http://{}", client.outbound_addr),
        "--include",
        &format!("http://{BOOKS}/traced"),
    ])
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = out
        .lines()
        .find_map(|l| l.strip_prefix("x-seen-traceparent: "))
        .expect("the app received a traceparent")
        .trim()
        .to_string();

    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = receiver.spans.lock().expect("lock").clone();
        if spans.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(spans.len(), 2, "{spans:?}");
    let client_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .expect("a client span");
    let server_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("a server span");
    assert_eq!(client_span.trace_id, server_span.trace_id, "one trace");
    assert_eq!(
        server_span.parent_span_id, client_span.span_id,
        "server is the child"
    );
    assert!(
        client_span.parent_span_id.is_empty(),
        "the client proxy started the trace"
    );
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(
        seen,
        format!(
            "00-{}-{}-01",
            hex(&server_span.trace_id),
            hex(&server_span.span_id)
        ),
        "the app's parent is the server proxy's span"
    );
    assert_eq!(attr(client_span, "http.request.method"), Some("GET"));
    assert_eq!(attr(server_span, "url.path"), Some("/traced"));
    assert_eq!(
        attr(client_span, "mesh.authority"),
        Some("books.shop.svc.cluster.local:8080")
    );

    // The collector gone: requests still succeed, and the lost spans are counted.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client_requests = ProxyClient::connect(&client).await;
    for _ in 0..50 {
        let (status, _, _) = client_requests
            .get(&format!("http://{BOOKS}/after"), &[])
            .await;
        assert_eq!(status, 200);
    }
    let mut dropped = 0.0;
    for _ in 0..50 {
        let (_, text) = admin_get(&client, "/metrics").await;
        dropped = metric(&text, "trace_spans_dropped_total", &[]);
        if dropped >= 50.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped >= 50.0, "{dropped} spans counted as dropped");
}
