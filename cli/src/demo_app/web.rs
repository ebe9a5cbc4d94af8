//! `web`: the demo's front end. Every request (but `/healthz`) looks up one book: its details
//! from `books` over HTTP/2 and its author from `authors` over gRPC, in parallel, and answers
//! 200 with both, or 502 naming the upstream that failed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use super::net::{self, HttpClient, HttpVersion};
use super::proto::GetAuthorRequest;
use super::proto::authors_client::AuthorsClient;
use super::serve;

/// The default of `BOOKS_URL`.
const BOOKS_URL: &str = "http://books.demo.svc.cluster.local:8080";
/// The default of `AUTHORS_URL`.
const AUTHORS_URL: &str = "http://authors.demo.svc.cluster.local:9090";
/// How long an upstream call may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

struct Upstreams {
    books_url: String,
    books: HttpClient,
    authors: AuthorsClient<tonic::transport::Channel>,
}

pub async fn run() -> anyhow::Result<()> {
    let proxy = net::http_proxy_from_env()?;
    let books_url = super::env("BOOKS_URL").unwrap_or_else(|| BOOKS_URL.to_owned());
    let authors_url = super::env("AUTHORS_URL").unwrap_or_else(|| AUTHORS_URL.to_owned());
    let upstreams = Arc::new(Upstreams {
        books: net::http_client(proxy, HttpVersion::Http2),
        authors: AuthorsClient::new(net::grpc_channel(&authors_url, proxy)?),
        books_url: books_url.trim_end_matches('/').to_owned(),
    });
    let addr = net::listen_addr(8080)?;
    eprintln!(
        "web: listening on {addr}; books at {books_url} (HTTP/2), authors at {authors_url} (gRPC){}",
        proxy.map_or_else(String::new, |p| format!(", through the HTTP proxy {p}"))
    );
    serve::http(addr, move |request| {
        let upstreams = upstreams.clone();
        async move { Ok::<_, Infallible>(handle(request, &upstreams).await) }
    })
    .await
}

async fn handle(request: Request<Incoming>, upstreams: &Upstreams) -> Response<Full<Bytes>> {
    if request.uri().path() == "/healthz" {
        return serve::text(StatusCode::OK, "ok\n");
    }
    let book_id: u32 = rand::random_range(1..=100);
    let (book, author) = tokio::join!(
        book(upstreams, book_id),
        author(upstreams.authors.clone(), book_id)
    );
    match (book, author) {
        (Ok(book), Ok(author)) => serve::text(
            StatusCode::OK,
            &format!("book {book_id}: {book} by {author}\n"),
        ),
        (Err(error), _) => serve::text(StatusCode::BAD_GATEWAY, &format!("books: {error:#}\n")),
        (_, Err(error)) => serve::text(StatusCode::BAD_GATEWAY, &format!("authors: {error:#}\n")),
    }
}

/// `GET /books/ID` on books over HTTP/2.
async fn book(upstreams: &Upstreams, book_id: u32) -> anyhow::Result<String> {
    let request = Request::get(format!("{}/books/{book_id}", upstreams.books_url))
        .body(Full::new(Bytes::new()))
        .context("building the books request")?;
    let call = async {
        let response = upstreams.books.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "status {status}");
        Ok(String::from_utf8_lossy(&body).trim().to_owned())
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, call)
        .await
        .context("timed out")?
}

/// `Authors.GetAuthor` over gRPC.
async fn author(
    mut client: AuthorsClient<tonic::transport::Channel>,
    book_id: u32,
) -> anyhow::Result<String> {
    let call = client.get_author(GetAuthorRequest { book_id });
    let author = tokio::time::timeout(UPSTREAM_TIMEOUT, call)
        .await
        .context("timed out")?
        .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?;
    Ok(author.into_inner().name)
}
