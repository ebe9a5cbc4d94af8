//! `authors`: the demo's gRPC service, slower than the others on purpose (`LATENCY_MS`,
//! default 20-50) so its latency percentiles stand out.

use anyhow::Context as _;
use tonic::{Request, Response, Status};

use super::net;
use super::proto::authors_server::{Authors, AuthorsServer};
use super::proto::{Author, GetAuthorRequest};

/// The default of `LATENCY_MS`.
const LATENCY_MS: &str = "20-50";

const NAMES: [&str; 6] = [
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Barbara Liskov",
    "Edsger Dijkstra",
    "Frances Allen",
];

struct AuthorsService {
    latency: (u64, u64),
}

#[tonic::async_trait]
impl Authors for AuthorsService {
    async fn get_author(
        &self,
        request: Request<GetAuthorRequest>,
    ) -> Result<Response<Author>, Status> {
        let book_id = request.into_inner().book_id;
        tokio::time::sleep(super::random_delay(self.latency)).await;
        let id = book_id % NAMES.len() as u32;
        Ok(Response::new(Author {
            id,
            name: NAMES[id as usize].to_owned(),
        }))
    }
}

pub async fn run() -> anyhow::Result<()> {
    let latency = super::parse_millis_range(
        &super::env("LATENCY_MS").unwrap_or_else(|| LATENCY_MS.to_owned()),
    )?;
    let addr = net::listen_addr(9090)?;
    eprintln!(
        "authors: gRPC on {addr}, answering in {}-{} ms",
        latency.0, latency.1
    );
    tonic::transport::Server::builder()
        .add_service(AuthorsServer::new(AuthorsService { latency }))
        .serve_with_shutdown(addr, super::stopped())
        .await
        .with_context(|| format!("serving gRPC on {addr}"))
}
