//! Live tap through the admin port: a real tonic client watches requests cross a proxy.

mod support;

use std::time::Duration;

use mesh_proto::tap::{self, tap_event::Event};
use mesh_proto::tonic;
use support::*;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

const BOOKS: &str = "books.shop.svc.cluster.local:8080";

#[tokio::test]
async fn tap_streams_the_events_of_matching_requests_up_to_its_limit() {
    let stop = CancellationToken::new();
    let destination = ScriptedDestination::default();
    let controller = destination.serve(stop.clone()).await;
    let proxy = proxy(Some(&controller)).await;
    let backend = Backend::start("books").await;
    destination.set(BOOKS, vec![plain(backend.addr)]);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.admin_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the admin port");
    let mut stream = tap::tap_client::TapClient::new(channel)
        .observe(tap::ObserveRequest {
            r#match: Some(tap::TapMatch {
                path_prefix: "/tapped".into(),
                ..Default::default()
            }),
            limit: 2,
            max_duration: None,
        })
        .await
        .expect("tap starts")
        .into_inner();

    let mut client = ProxyClient::connect(&proxy).await;
    // Not matching, then three matching: the limit of two takes the first two.
    client.get(&format!("http://{BOOKS}/other"), &[]).await;
    for i in 0..3 {
        let (status, _, _) = client.get(&format!("http://{BOOKS}/tapped/{i}"), &[]).await;
        assert_eq!(status, 200);
    }
    let mut events = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
        events.push(event.expect("event"));
        if events.len() == 6 {
            break;
        }
    }
    let kinds: Vec<_> = events
        .iter()
        .map(|e| match e.event.as_ref().expect("event set") {
            Event::RequestStart(start) => format!("start {}", start.path),
            Event::ResponseStart(response) => format!("response {}", response.http_status),
            Event::End(end) => format!("end {}", end.response_bytes > 0),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "start /tapped/0",
            "response 200",
            "end true",
            "start /tapped/1",
            "response 200",
            "end true"
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e.direction == tap::Direction::Outbound as i32)
    );
    // Nothing more arrives: the third matching request was over the limit.
    let more = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(!matches!(more, Ok(Some(Ok(_)))), "{more:?}");
}
