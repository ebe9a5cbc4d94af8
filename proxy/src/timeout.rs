//! The request timeout layer: a route's `request` timeout bounds the whole exchange, retries
//! included, answering 504 (gRPC DEADLINE_EXCEEDED) when it passes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::http::{ProxyBody, ProxyError, ReqBody, is_grpc};
use crate::retry::RouteInfo;

/// Adds the route's request timeout to a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTimeoutLayer;

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout { inner }
    }
}

/// See [`RequestTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct RequestTimeout<S> {
    inner: S,
}

impl<S> Service<Request<ReqBody>> for RequestTimeout<S>
where
    S: Service<Request<ReqBody>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    /// The inner future as is when the route sets no request timeout.
    type Future =
        Either<S::Future, Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let timeout = request
            .extensions()
            .get::<RouteInfo>()
            .and_then(|route| route.0.request_timeout);
        let grpc = is_grpc(&request);
        let response = self.inner.call(request);
        match timeout {
            None => Either::Left(response),
            Some(timeout) => Either::Right(Box::pin(async move {
                match tokio::time::timeout(timeout, response).await {
                    Ok(response) => response,
                    Err(_elapsed) => Ok(ProxyError::Timeout(format!(
                        "no response within the route's {timeout:?} request timeout"
                    ))
                    .to_response(grpc)),
                }
            })),
        }
    }
}
