//! The controller's gRPC handlers make server spans: a `Destination.Get` sent with a sampled
//! `traceparent` arrives at an OTLP receiver as a span of the caller's trace, a child of the
//! caller's span, named for the method, with the RPC attributes and the call's status (here
//! NOT_FOUND: the service does not exist).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_controller::{Config, Discovery};
use mesh_proto::destination::destination_client::DestinationClient;
use mesh_proto::destination::{GetDestination, get_destination};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tonic::{Request, Response, Status};

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

fn attribute(span: &Span, key: &str) -> Option<any_value::Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_is_a_server_span_of_the_callers_trace() {
    let receiver = Receiver::default();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector_addr = collector.local_addr().expect("address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(collector)),
    );

    let dir = std::env::temp_dir().join(format!("mesh-controller-tracing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut config = Config::new(Discovery::File {
        dir: dir.clone(),
        poll_interval: Duration::from_millis(100),
    });
    // New traces are never sampled: only the caller's decision makes a span.
    config.trace = Some(mesh_controller::trace::TraceOptions {
        collector: format!("http://{collector_addr}"),
        sample_rate: 0.0,
    });
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let grpc_addr = grpc.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
        let _ = stopped.await;
    }));

    let mut client = loop {
        match DestinationClient::connect(format!("http://{grpc_addr}")).await {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let get = |traceparent: &'static str| {
        let mut request = Request::new(GetDestination {
            target: Some(get_destination::Target::Authority(
                "nowhere.shop.svc.cluster.local:80".to_owned(),
            )),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().expect("ascii"));
        request
    };
    // Not sampled by the caller: no span.
    let unsampled = client
        .get(get(
            "00-11111111111111111111111111111111-2222222222222222-00",
        ))
        .await;
    // Sampled by the caller: a span of its trace. The answer is NOT_FOUND, as a stream or
    // as the call's status.
    let sampled = client
        .get(get(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .await;
    let code = match sampled {
        Ok(response) => match response.into_inner().message().await {
            Err(status) => status.code(),
            Ok(_) => tonic::Code::Ok,
        },
        Err(status) => status.code(),
    };
    assert_eq!(code, tonic::Code::NotFound, "{unsampled:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let span = loop {
        if let Some(span) = receiver.spans.lock().expect("lock").first().cloned() {
            break span;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no span reached the collector"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(span.name, "mesh.destination.v1.Destination/Get");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(
        attribute(&span, "rpc.system"),
        Some(any_value::Value::StringValue("grpc".into()))
    );
    assert_eq!(
        attribute(&span, "rpc.method"),
        Some(any_value::Value::StringValue("Get".into()))
    );
    // The unsampled call made none: one span in all, from the sampled trace.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans = receiver.spans.lock().expect("lock").clone();
    assert_eq!(spans.len(), 1, "only the sampled call is traced: {spans:?}");

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), controller).await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
