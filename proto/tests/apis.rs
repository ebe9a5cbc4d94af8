//! Every message survives an encode/decode round trip, and every service works end to end
//! between a generated tonic client and server on 127.0.0.1:0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;

use mesh_proto::common::{SocketAddress, WorkloadRef};
use mesh_proto::prost::Message;
use mesh_proto::prost_types::{Duration, Timestamp};
use mesh_proto::tonic::{self, Request, Response, Status};
use mesh_proto::{destination, identity, policy, stats, tap};
use tokio_stream::{Stream, StreamExt};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn addr(text: &str) -> SocketAddress {
    text.parse::<SocketAddr>()
        .expect("test address parses")
        .into()
}

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) {
    let bytes = message.encode_to_vec();
    assert!(!bytes.is_empty(), "a populated message encodes to bytes");
    let decoded = M::decode(bytes.as_slice()).expect("decodes what it encoded");
    assert_eq!(&decoded, message);
}

fn workload() -> WorkloadRef {
    WorkloadRef {
        namespace: "shop".into(),
        kind: "deployment".into(),
        name: "web".into(),
        pod: "web-7d9f-abcde".into(),
    }
}

fn endpoint() -> destination::Endpoint {
    destination::Endpoint {
        addr: Some(addr("10.1.0.7:8080")),
        weight: 10_000,
        metric_labels: HashMap::from([("pod".into(), "books-1".into())]),
        tls_identity: Some(destination::TlsIdentity {
            spiffe_id: "spiffe://cluster.local/ns/shop/sa/books".into(),
            server_name: String::new(),
        }),
        protocol_hint: destination::ProtocolHint::Http2.into(),
        zone: "zone-a".into(),
        inbound_proxy_port: 4143,
        gateway: Some(destination::Gateway {
            addr: Some(SocketAddr::from(([192, 0, 2, 7], 4143)).into()),
            tls_identity: Some(destination::TlsIdentity {
                spiffe_id: "spiffe://cluster.local/ns/mesh-system/sa/mesh-gateway".into(),
                server_name: String::new(),
            }),
            cluster: "east".into(),
        }),
    }
}

fn inbound_server() -> policy::InboundServer {
    use policy::authentication::{Kind, MeshTls};
    policy::InboundServer {
        name: "books-http".into(),
        protocol: policy::Protocol::Http1.into(),
        detect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        authorizations: vec![policy::Authorization {
            name: "web-may-read".into(),
            networks: vec![policy::Network {
                cidr: "10.0.0.0/8".into(),
                except: vec!["10.9.0.0/16".into()],
            }],
            authentication: Some(policy::Authentication {
                kind: Some(Kind::MeshTls(MeshTls {
                    identities: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
                    identity_prefixes: vec![],
                })),
            }),
            routes: vec!["books-get".into()],
        }],
        rate_limit: Some(policy::RateLimit {
            name: "books-limit".into(),
            total_rps: 1000,
            identity_rps: 100,
            overrides: vec![policy::rate_limit::Override {
                rps: 10,
                identities: vec!["spiffe://cluster.local/ns/shop/sa/batch".into()],
            }],
        }),
        mode: policy::inbound_server::Mode::Audit.into(),
        labels: HashMap::from([("kind".into(), "Server".into())]),
        http_routes: vec![policy::InboundRoute {
            name: "books-get".into(),
            matches: vec![policy::RouteMatch {
                method: "GET".into(),
                ..Default::default()
            }],
        }],
    }
}

fn outbound_policy() -> policy::OutboundPolicy {
    use policy::{backend, filter, path_match, path_modifier};
    let books = policy::Backend {
        kind: Some(backend::Kind::Authority(
            "books.shop.svc.cluster.local:8080".into(),
        )),
    };
    let seconds = |seconds| Duration { seconds, nanos: 0 };
    policy::OutboundPolicy {
        service: "books.shop.svc.cluster.local:8080".into(),
        protocol: policy::Protocol::Http2.into(),
        routes: vec![policy::Route {
            name: "books-get".into(),
            matches: vec![policy::RouteMatch {
                path: Some(policy::PathMatch {
                    kind: Some(path_match::Kind::Prefix("/books".into())),
                }),
                headers: vec![policy::HeaderMatch {
                    name: "x-canary".into(),
                    value: Some(policy::header_match::Value::Exact("1".into())),
                }],
                query_params: vec![policy::QueryParamMatch {
                    name: "page".into(),
                    value: Some(policy::query_param_match::Value::Regex("[0-9]+".into())),
                }],
                method: "GET".into(),
                grpc: Some(policy::GrpcMethodMatch {
                    service: "mesh.demo.v1.Books".into(),
                    method: "Get".into(),
                }),
            }],
            filters: vec![
                policy::Filter {
                    kind: Some(filter::Kind::RequestHeaderModifier(
                        policy::HeaderModifier {
                            add: vec![policy::Header {
                                name: "x-via".into(),
                                value: "mesh".into(),
                            }],
                            set: vec![],
                            remove: vec!["x-debug".into()],
                        },
                    )),
                },
                policy::Filter {
                    kind: Some(filter::Kind::UrlRewrite(policy::UrlRewrite {
                        hostname: String::new(),
                        path: Some(policy::PathModifier {
                            kind: Some(path_modifier::Kind::Prefix("/v2/books".into())),
                        }),
                    })),
                },
                policy::Filter {
                    kind: Some(filter::Kind::Mirror(policy::Mirror {
                        backend: Some(books.clone()),
                        percent: 5,
                    })),
                },
                policy::Filter {
                    kind: Some(filter::Kind::FaultInjection(policy::FaultInjection {
                        abort_percent: 1,
                        abort_status: 503,
                        delay_percent: 2,
                        delay: Some(seconds(1)),
                    })),
                },
            ],
            backends: vec![policy::WeightedBackend {
                weight: 90,
                backend: Some(books.clone()),
            }],
            timeouts: Some(policy::Timeouts {
                request: Some(seconds(10)),
                response: Some(seconds(2)),
                idle: None,
            }),
            retry: Some(policy::RetryPolicy {
                conditions: vec!["5xx".into(), "unavailable".into()],
                limit: 2,
                per_try_timeout: Some(seconds(1)),
                budget: Some(policy::RetryBudget {
                    ratio: 0.2,
                    min_per_second: 10,
                    ttl: Some(seconds(10)),
                }),
                max_body_bytes: 65_536,
            }),
            hostnames: vec!["api.example.com".into(), "*.example.org".into()],
            failover: true,
        }],
        default_backends: vec![policy::WeightedBackend {
            weight: 1,
            backend: Some(books),
        }],
        balancer: Some(policy::Balancer {
            kind: policy::balancer::Kind::ConsistentHash.into(),
            hash_key: Some(policy::balancer::HashKey {
                kind: Some(policy::balancer::hash_key::Kind::Header("x-user".into())),
            }),
            ewma_decay: Some(seconds(10)),
        }),
        failure_accrual: Some(policy::FailureAccrual {
            consecutive_failures: 7,
            min_backoff: Some(seconds(1)),
            max_backoff: Some(seconds(60)),
        }),
        timeouts: None,
        retry: None,
        max_in_flight_per_backend: 100,
        labels: HashMap::from([("kind".into(), "HTTPRoute".into())]),
        egress: Some(policy::Egress {
            network: "shop/external".into(),
            traffic_policy: policy::egress::TrafficPolicy::Deny.into(),
            tls_hosts: vec!["secure.example.com".into()],
            tcp_allowed: true,
        }),
    }
}

fn tap_events() -> Vec<tap::TapEvent> {
    let base = tap::TapEvent {
        direction: tap::Direction::Outbound.into(),
        source: Some(addr("10.1.0.3:51000")),
        destination: Some(addr("10.1.0.7:8080")),
        source_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
        destination_identity: "spiffe://cluster.local/ns/shop/sa/books".into(),
        source_labels: HashMap::from([("deployment".into(), "web".into())]),
        destination_labels: HashMap::from([("deployment".into(), "books".into())]),
        route: "books-get".into(),
        stream_id: 42,
        event: None,
        reporter: "web-7d9f-abcde".into(),
    };
    let millis = |ms| Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    };
    [
        tap::tap_event::Event::RequestStart(tap::RequestStart {
            method: "GET".into(),
            scheme: "http".into(),
            authority: "books.shop:8080".into(),
            path: "/books/1".into(),
        }),
        tap::tap_event::Event::ResponseStart(tap::ResponseStart {
            http_status: 200,
            since_request_start: Some(millis(3)),
        }),
        tap::tap_event::Event::End(tap::End {
            grpc_status: Some(0),
            error: String::new(),
            since_request_start: Some(millis(4)),
            request_bytes: 0,
            response_bytes: 1024,
        }),
    ]
    .into_iter()
    .map(|event| tap::TapEvent {
        event: Some(event),
        ..base.clone()
    })
    .collect()
}

fn stats_row() -> stats::StatsRow {
    stats::StatsRow {
        resource: Some(stats::ResourceRef {
            kind: "deployment".into(),
            namespace: "shop".into(),
            name: "books".into(),
        }),
        meshed_pods: 2,
        running_pods: 2,
        requests: Some(stats::RequestStats {
            success_count: 990,
            failure_count: 10,
            request_rate: 16.5,
            success_rate: 0.99,
            latency_ms_p50: 1.5,
            latency_ms_p95: 7.0,
            latency_ms_p99: 12.25,
            mtls_share: 1.0,
            retry_rate: 0.5,
            retry_count: 30,
        }),
        tcp: Some(stats::TcpStats {
            open_connections: 4,
            read_bytes_rate: 1000.0,
            write_bytes_rate: 20_000.0,
        }),
    }
}

fn edge() -> stats::Edge {
    stats::Edge {
        source: Some(stats::ResourceRef {
            kind: "deployment".into(),
            namespace: "shop".into(),
            name: "web".into(),
        }),
        destination: Some(stats::ResourceRef {
            kind: "deployment".into(),
            namespace: "shop".into(),
            name: "books".into(),
        }),
        client_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
        server_identity: "spiffe://cluster.local/ns/shop/sa/books".into(),
        no_identity_reason: String::new(),
        request_rate: 16.5,
        success_rate: 0.99,
    }
}

#[test]
fn every_message_round_trips() {
    use destination::update::Update as U;
    round_trip(&destination::GetDestination {
        target: Some(destination::get_destination::Target::Authority(
            "books.shop.svc.cluster.local:8080".into(),
        )),
        source: Some(workload()),
    });
    round_trip(&destination::GetDestination {
        target: Some(destination::get_destination::Target::Addr(addr(
            "[fd00::7]:8080",
        ))),
        source: None,
    });
    for update in [
        U::Add(destination::AddEndpoints {
            endpoints: vec![endpoint()],
            metric_labels: HashMap::from([("service".into(), "books".into())]),
        }),
        U::Remove(destination::RemoveEndpoints {
            addrs: vec![addr("10.1.0.7:8080")],
        }),
        U::NoEndpoints(destination::NoEndpoints { exists: true }),
    ] {
        round_trip(&destination::Update {
            update: Some(update),
        });
    }

    round_trip(&identity::CertifyRequest {
        identity: "spiffe://cluster.local/ns/shop/sa/books".into(),
        token: b"header.payload.signature".to_vec(),
        certificate_signing_request: vec![0x30, 0x82, 0x01, 0x00],
    });
    round_trip(&identity::CertifyResponse {
        leaf_certificate: vec![0x30, 0x82, 0x02, 0x00],
        intermediate_certificates: vec![vec![0x30, 0x82, 0x03, 0x00]],
        valid_until: Some(Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
    });

    round_trip(&policy::InboundPolicyRequest {
        workload: Some(workload()),
        port: 8080,
    });
    round_trip(&inbound_server());
    round_trip(&policy::OutboundPolicyRequest {
        source: Some(workload()),
        target: Some(policy::outbound_policy_request::Target::Addr(addr(
            "10.96.0.10:80",
        ))),
    });
    round_trip(&outbound_policy());

    round_trip(&tap::ObserveRequest {
        r#match: Some(tap::TapMatch {
            namespace: "shop".into(),
            workload: "deploy/books".into(),
            authority: "books.shop:8080".into(),
            path_prefix: "/books".into(),
            method: "GET".into(),
            direction: tap::Direction::Inbound.into(),
        }),
        limit: 100,
        max_duration: Some(Duration {
            seconds: 30,
            nanos: 0,
        }),
    });
    for event in tap_events() {
        round_trip(&event);
    }

    let selector = stats::ResourceSelector {
        kind: "deployment".into(),
        namespace: "shop".into(),
        name: String::new(),
    };
    round_trip(&stats::SummaryRequest {
        selector: Some(selector.clone()),
        window: Some(Duration {
            seconds: 60,
            nanos: 0,
        }),
        from: Some(stats::ResourceRef {
            kind: "deployment".into(),
            namespace: "shop".into(),
            name: "web".into(),
        }),
    });
    round_trip(&stats::SummaryResponse {
        rows: vec![stats_row()],
    });
    round_trip(&stats::EdgesRequest {
        selector: Some(selector),
        window: None,
    });
    round_trip(&stats::EdgesResponse {
        edges: vec![edge()],
        denials: vec![stats::Denial {
            destination: Some(stats::ResourceRef {
                kind: "deployment".into(),
                namespace: "shop".into(),
                name: "books".into(),
            }),
            policy: "default:deny".into(),
            client_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            count: 12,
            rate: 0.2,
            protocol: "http".into(),
        }],
        egress: vec![stats::EgressEdge {
            source: Some(stats::ResourceRef {
                kind: "deployment".into(),
                namespace: "shop".into(),
                name: "web".into(),
            }),
            network: "shop/external".into(),
            authority: "api.example.com:443".into(),
            protocol: "tls".into(),
            allowed: 40,
            denied: 2,
            rate: 0.7,
        }],
    });
}

/// One server implementing every service: it answers from the request so the test can tell a
/// real round trip from a default value.
struct Everything;

#[tonic::async_trait]
impl destination::destination_server::Destination for Everything {
    type GetStream = BoxStream<destination::Update>;

    async fn get(
        &self,
        request: Request<destination::GetDestination>,
    ) -> Result<Response<Self::GetStream>, Status> {
        use destination::get_destination::Target;
        use destination::update::Update as U;
        match request.into_inner().target {
            Some(Target::Authority(authority)) if authority.starts_with("books.") => {
                let updates = vec![
                    Ok(destination::Update {
                        update: Some(U::Add(destination::AddEndpoints {
                            endpoints: vec![endpoint()],
                            metric_labels: HashMap::from([("service".into(), authority)]),
                        })),
                    }),
                    Ok(destination::Update {
                        update: Some(U::Remove(destination::RemoveEndpoints {
                            addrs: vec![addr("10.1.0.7:8080")],
                        })),
                    }),
                    Ok(destination::Update {
                        update: Some(U::NoEndpoints(destination::NoEndpoints { exists: true })),
                    }),
                ];
                Ok(Response::new(Box::pin(tokio_stream::iter(updates))))
            }
            Some(target) => Err(Status::not_found(format!("unknown target {target:?}"))),
            None => Err(Status::invalid_argument("no target")),
        }
    }
}

#[tonic::async_trait]
impl identity::identity_server::Identity for Everything {
    async fn certify(
        &self,
        request: Request<identity::CertifyRequest>,
    ) -> Result<Response<identity::CertifyResponse>, Status> {
        let request = request.into_inner();
        if request.token.is_empty() {
            return Err(Status::unauthenticated("no token"));
        }
        Ok(Response::new(identity::CertifyResponse {
            leaf_certificate: request.certificate_signing_request,
            intermediate_certificates: vec![request.identity.into_bytes()],
            valid_until: Some(Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
        }))
    }
}

#[tonic::async_trait]
impl policy::inbound_policies_server::InboundPolicies for Everything {
    type WatchStream = BoxStream<policy::InboundServer>;

    async fn watch(
        &self,
        request: Request<policy::InboundPolicyRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let port = request.into_inner().port;
        let server = policy::InboundServer {
            name: format!("port-{port}"),
            ..inbound_server()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(server)]))))
    }
}

#[tonic::async_trait]
impl policy::outbound_policies_server::OutboundPolicies for Everything {
    type WatchStream = BoxStream<policy::OutboundPolicy>;

    async fn watch(
        &self,
        request: Request<policy::OutboundPolicyRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use policy::outbound_policy_request::Target;
        let Some(Target::Authority(authority)) = request.into_inner().target else {
            return Err(Status::not_found("only authorities are known here"));
        };
        let policy = policy::OutboundPolicy {
            service: authority,
            ..outbound_policy()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(policy)]))))
    }
}

#[tonic::async_trait]
impl tap::tap_server::Tap for Everything {
    type ObserveStream = BoxStream<tap::TapEvent>;

    async fn observe(
        &self,
        request: Request<tap::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let limit = request.into_inner().limit as usize;
        let events: Vec<_> = tap_events().into_iter().take(limit).map(Ok).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }
}

#[tonic::async_trait]
impl stats::stats_server::Stats for Everything {
    async fn summary(
        &self,
        request: Request<stats::SummaryRequest>,
    ) -> Result<Response<stats::SummaryResponse>, Status> {
        let selector = request.into_inner().selector.unwrap_or_default();
        let mut row = stats_row();
        if let Some(resource) = row.resource.as_mut() {
            resource.kind = selector.kind;
        }
        Ok(Response::new(stats::SummaryResponse { rows: vec![row] }))
    }

    async fn edges(
        &self,
        _request: Request<stats::EdgesRequest>,
    ) -> Result<Response<stats::EdgesResponse>, Status> {
        Ok(Response::new(stats::EdgesResponse {
            edges: vec![edge()],
            denials: Vec::new(),
            egress: Vec::new(),
        }))
    }
}

async fn serve_everything() -> tonic::transport::Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let local = listener.local_addr().expect("bound address");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(destination::destination_server::DestinationServer::new(
                Everything,
            ))
            .add_service(identity::identity_server::IdentityServer::new(Everything))
            .add_service(policy::inbound_policies_server::InboundPoliciesServer::new(
                Everything,
            ))
            .add_service(policy::outbound_policies_server::OutboundPoliciesServer::new(Everything))
            .add_service(tap::tap_server::TapServer::new(Everything))
            .add_service(stats::stats_server::StatsServer::new(Everything))
            .serve_with_incoming(incoming),
    );
    tonic::transport::Endpoint::from_shared(format!("http://{local}"))
        .expect("valid endpoint")
        .connect()
        .await
        .expect("connect to the test server")
}

#[tokio::test]
async fn every_service_answers_over_tonic_on_loopback() {
    let channel = serve_everything().await;

    // Destination: a stream of the three kinds of update, and NotFound for the unknown.
    let mut client = destination::destination_client::DestinationClient::new(channel.clone());
    let mut stream = client
        .get(destination::GetDestination {
            target: Some(destination::get_destination::Target::Authority(
                "books.shop:8080".into(),
            )),
            source: Some(workload()),
        })
        .await
        .expect("Get succeeds")
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(update) = stream.next().await {
        let update = update.expect("stream item").update.expect("update set");
        kinds.push(match update {
            destination::update::Update::Add(add) => {
                assert_eq!(add.endpoints, vec![endpoint()]);
                assert_eq!(add.metric_labels["service"], "books.shop:8080");
                "add"
            }
            destination::update::Update::Remove(_) => "remove",
            destination::update::Update::NoEndpoints(none) => {
                assert!(none.exists);
                "none"
            }
        });
    }
    assert_eq!(kinds, ["add", "remove", "none"]);
    let unknown = client
        .get(destination::GetDestination {
            target: Some(destination::get_destination::Target::Authority(
                "nope.shop:80".into(),
            )),
            source: None,
        })
        .await
        .expect_err("unknown target fails");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Identity: unary, with the error path.
    let mut client = identity::identity_client::IdentityClient::new(channel.clone());
    let response = client
        .certify(identity::CertifyRequest {
            identity: "spiffe://cluster.local/ns/shop/sa/books".into(),
            token: b"token".to_vec(),
            certificate_signing_request: vec![1, 2, 3],
        })
        .await
        .expect("Certify succeeds")
        .into_inner();
    assert_eq!(response.leaf_certificate, vec![1, 2, 3]);
    assert_eq!(
        response.intermediate_certificates,
        vec![b"spiffe://cluster.local/ns/shop/sa/books".to_vec()]
    );
    let refused = client
        .certify(identity::CertifyRequest::default())
        .await
        .expect_err("no token is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // Policies.
    let mut client = policy::inbound_policies_client::InboundPoliciesClient::new(channel.clone());
    let servers: Vec<_> = client
        .watch(policy::InboundPolicyRequest {
            workload: Some(workload()),
            port: 8080,
        })
        .await
        .expect("inbound Watch succeeds")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("inbound stream");
    assert_eq!(
        servers,
        vec![policy::InboundServer {
            name: "port-8080".into(),
            ..inbound_server()
        }]
    );
    let mut client = policy::outbound_policies_client::OutboundPoliciesClient::new(channel.clone());
    let policies: Vec<_> = client
        .watch(policy::OutboundPolicyRequest {
            source: Some(workload()),
            target: Some(policy::outbound_policy_request::Target::Authority(
                "books.shop.svc.cluster.local:8080".into(),
            )),
        })
        .await
        .expect("outbound Watch succeeds")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("outbound stream");
    assert_eq!(policies, vec![outbound_policy()]);

    // Tap: the limit bounds the stream.
    let mut client = tap::tap_client::TapClient::new(channel.clone());
    let events: Vec<_> = client
        .observe(tap::ObserveRequest {
            r#match: None,
            limit: 2,
            max_duration: None,
        })
        .await
        .expect("Observe succeeds")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("tap stream");
    assert_eq!(events, tap_events()[..2].to_vec());

    // Stats.
    let mut client = stats::stats_client::StatsClient::new(channel);
    let summary = client
        .summary(stats::SummaryRequest {
            selector: Some(stats::ResourceSelector {
                kind: "pod".into(),
                ..Default::default()
            }),
            window: None,
            from: None,
        })
        .await
        .expect("Summary succeeds")
        .into_inner();
    assert_eq!(summary.rows.len(), 1);
    assert_eq!(
        summary.rows[0].resource.as_ref().map(|r| r.kind.as_str()),
        Some("pod")
    );
    assert_eq!(summary.rows[0].requests, stats_row().requests);
    let edges = client
        .edges(stats::EdgesRequest::default())
        .await
        .expect("Edges succeeds")
        .into_inner();
    assert_eq!(edges.edges, vec![edge()]);
}
