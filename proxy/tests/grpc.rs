//! gRPC through two proxies with a real tonic client and server: unary calls, server
//! streaming, and statuses carried in trailers.

mod support;

use std::pin::Pin;

use mesh_proto::tonic::{self, Code, Request, Response, Status};
use mesh_proto::{identity, tap};
use support::*;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

const GREETER: &str = "greeter.shop.svc.cluster.local:9090";

/// A gRPC backend: Identity.Certify echoes the identity; Tap.Observe streams `limit` events
/// and, for a limit of 3, ends with DATA_LOSS in the trailers.
struct Greeter;

#[tonic::async_trait]
impl identity::identity_server::Identity for Greeter {
    async fn certify(
        &self,
        request: Request<identity::CertifyRequest>,
    ) -> Result<Response<identity::CertifyResponse>, Status> {
        let request = request.into_inner();
        if request.identity.is_empty() {
            return Err(Status::invalid_argument("identity is required"));
        }
        Ok(Response::new(identity::CertifyResponse {
            leaf_certificate: request.identity.into_bytes(),
            ..Default::default()
        }))
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<tap::TapEvent, Status>> + Send>>;

#[tonic::async_trait]
impl tap::tap_server::Tap for Greeter {
    type ObserveStream = Events;

    async fn observe(
        &self,
        request: Request<tap::ObserveRequest>,
    ) -> Result<Response<Events>, Status> {
        let limit = request.into_inner().limit;
        let mut items: Vec<Result<tap::TapEvent, Status>> = (0..limit)
            .map(|i| {
                Ok(tap::TapEvent {
                    stream_id: u64::from(i),
                    ..Default::default()
                })
            })
            .collect();
        if limit == 3 {
            items.push(Err(Status::data_loss("ran out of events")));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

#[tokio::test]
async fn grpc_unary_streaming_and_trailers_cross_the_mesh() {
    let destination = ScriptedDestination::default();
    let stop = CancellationToken::new();
    let controller = destination.serve(stop.clone()).await;
    let client_proxy = proxy(Some(&controller)).await;
    let server_proxy = proxy(None).await;

    let listener = loopback().await;
    let backend = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(identity::identity_server::IdentityServer::new(Greeter))
            .add_service(tap::tap_server::TapServer::new(Greeter))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    destination.set(
        GREETER,
        vec![meshed(backend, server_proxy.inbound_addr.port())],
    );

    // The app talks to its outbound proxy; :authority names the service.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", client_proxy.outbound_addr))
            .expect("endpoint")
            .origin(format!("http://{GREETER}").parse().expect("origin"))
            .connect()
            .await
            .expect("connect to the outbound proxy");

    let mut unary = identity::identity_client::IdentityClient::new(channel.clone());
    for i in 0..10 {
        let response = unary
            .certify(identity::CertifyRequest {
                identity: format!("caller-{i}"),
                ..Default::default()
            })
            .await
            .expect("unary call")
            .into_inner();
        assert_eq!(
            response.leaf_certificate,
            format!("caller-{i}").into_bytes()
        );
    }
    let refused = unary
        .certify(identity::CertifyRequest::default())
        .await
        .expect_err("empty identity is refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(refused.message(), "identity is required");

    let mut streaming = tap::tap_client::TapClient::new(channel);
    let events: Vec<_> = streaming
        .observe(tap::ObserveRequest {
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("stream starts")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("stream ends OK");
    assert_eq!(events.len(), 50);
    assert_eq!(events[49].stream_id, 49);

    let mut stream = streaming
        .observe(tap::ObserveRequest {
            limit: 3,
            ..Default::default()
        })
        .await
        .expect("stream starts")
        .into_inner();
    let mut received = 0;
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream must end with the trailers' status"),
        }
    };
    assert_eq!(received, 3);
    assert_eq!(status.code(), Code::DataLoss);

    // The trailers' status classified the exchange as a failure on both proxies.
    for proxy in [&client_proxy, &server_proxy] {
        let (_, text) = admin_get(proxy, "/metrics").await;
        assert_eq!(
            metric(&text, "response_total", &["classification=\"failure\""]),
            2.0,
            "InvalidArgument and DataLoss are failures:\n{text}"
        );
        assert_eq!(
            metric(&text, "response_total", &["classification=\"success\""]),
            11.0,
            "{text}"
        );
    }
}
