//! The per-backend concurrency limit (the Service annotation
//! `concurrency.mesh.dev/max-in-flight`, carried as the policy's `max_in_flight_per_backend`):
//! when a backend already has that many requests in flight from this proxy, another request
//! fails fast with 503 and `mesh-error: concurrency limit: ...` instead of queueing, like
//! Envoy's overflow circuit breaker. Shedding at the client side keeps a slow backend from
//! collecting an unbounded queue that would only time out later.
//!
//! The layer sits above the request timeout and retries, so a request holds one slot for its
//! whole life (retries included) and an overflow is never retried by this proxy: retrying
//! would only add load to a backend that is already full. A slot is released when the
//! response headers arrive; the proxy's response body type is shared by the whole stack, so
//! streaming bodies are not tracked to their end.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use futures::future::Either;
use http::{Request, Response};
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, Service};

use super::router::Dispatch;
use crate::app::Context;
use crate::discovery::TargetKey;
use crate::http::{ProxyBody, ProxyError, ReqBody, is_grpc};
use crate::metrics::{BackendLabels, Label};

/// Requests in flight per backend, shared by every connection of the proxy.
#[derive(Debug, Default)]
pub struct InFlight {
    // Keys are the backends of outbound plans, so the map is as bounded as the configuration.
    backends: Mutex<HashMap<TargetKey, Arc<AtomicU32>>>,
}

impl InFlight {
    /// Takes a slot of `backend` unless it already has `limit` requests in flight; `gauge`
    /// shows the slot while it is held.
    pub fn try_acquire(
        &self,
        backend: &TargetKey,
        limit: NonZeroU32,
        gauge: Gauge,
    ) -> Option<Slot> {
        let counter = {
            let mut backends = match self.backends.lock() {
                Ok(backends) => backends,
                Err(poisoned) => poisoned.into_inner(),
            };
            backends.entry(backend.clone()).or_default().clone()
        };
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit.get()).then_some(n + 1)
            })
            .ok()
            .map(|_| {
                gauge.inc();
                Slot { counter, gauge }
            })
    }

    /// Requests in flight to `backend` under a limit now.
    pub fn current(&self, backend: &TargetKey) -> u32 {
        let backends = match self.backends.lock() {
            Ok(backends) => backends,
            Err(poisoned) => poisoned.into_inner(),
        };
        backends
            .get(backend)
            .map_or(0, |counter| counter.load(Ordering::Acquire))
    }
}

/// One request in flight; dropping it frees the slot, also when the request is cancelled.
#[derive(Debug)]
pub struct Slot {
    counter: Arc<AtomicU32>,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// Adds the concurrency limit of the request's backend to a service.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimitLayer {
    ctx: Arc<Context>,
}

impl ConcurrencyLimitLayer {
    /// Limits with the proxy's shared counters and counts overflows in its metrics.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit {
            ctx: self.ctx.clone(),
            inner,
        }
    }
}

/// See [`ConcurrencyLimitLayer`].
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit<S> {
    ctx: Arc<Context>,
    inner: S,
}

impl<S> Service<Request<ReqBody>> for ConcurrencyLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    /// The inner future as is when the plan sets no limit.
    type Future =
        Either<S::Future, Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let Some((backend, logical, limit)) = request
            .extensions()
            .get::<Arc<Dispatch>>()
            .and_then(|d| Some((d.backend.clone(), d.logical.clone(), d.max_in_flight?)))
        else {
            return Either::Left(self.inner.call(request));
        };
        let labels = BackendLabels {
            authority: logical,
            backend: Label::from(backend.to_string()),
        };
        let gauge = self
            .ctx
            .metrics
            .backend_in_flight
            .get_or_create(&labels)
            .clone();
        match self.ctx.in_flight.try_acquire(&backend, limit, gauge) {
            Some(slot) => {
                let response = self.inner.call(request);
                Either::Right(Box::pin(async move {
                    let response = response.await;
                    drop(slot);
                    response
                }))
            }
            None => {
                self.ctx
                    .metrics
                    .concurrency_overflows
                    .get_or_create(&labels)
                    .inc();
                let error = ProxyError::Overloaded(format!(
                    "{backend} already has {limit} requests in flight"
                ));
                let response = super::error_response(&self.ctx, error, is_grpc(&request), None);
                Either::Right(Box::pin(async move { Ok(response) }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_backend_and_freed_on_drop() {
        let in_flight = InFlight::default();
        let books = TargetKey::Authority("books:80".into());
        let authors = TargetKey::Authority("authors:80".into());
        let two = NonZeroU32::new(2).expect("non-zero");
        let gauge = Gauge::default();
        let first = in_flight.try_acquire(&books, two, gauge.clone());
        let second = in_flight.try_acquire(&books, two, gauge.clone());
        assert!(first.is_some() && second.is_some());
        assert!(
            in_flight.try_acquire(&books, two, gauge.clone()).is_none(),
            "third over 2"
        );
        assert!(
            in_flight
                .try_acquire(&authors, two, Gauge::default())
                .is_some(),
            "another backend has its own slots"
        );
        assert_eq!(gauge.get(), 2);
        drop(first);
        assert_eq!((in_flight.current(&books), gauge.get()), (1, 1));
        assert!(in_flight.try_acquire(&books, two, gauge.clone()).is_some());
        assert_eq!(
            in_flight.current(&books),
            1,
            "the temporary slot was dropped"
        );
    }
}
