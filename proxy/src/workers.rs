//! The proxy's worker threads, one runtime each, and dealing accepted connections to them.
//!
//! With `MESH_PROXY_WORKER_THREADS` above one, each extra thread runs its own single-threaded
//! tokio runtime, and the listeners hand each accepted connection to the thread serving the
//! fewest (the thread that accepts is one of them). A connection's requests, and the upstream
//! connections they use (each thread has its own, see `client::HttpClients`), then stay on one
//! thread: no work stealing and no wake-ups across threads on the request path. tokio's
//! multi-threaded runtime spent more per request than its second thread gave back.
//!
//! The fewest connections, like Envoy's exact connection balance, rather than each thread
//! accepting from its own `SO_REUSEPORT` socket or taking turns: a peer proxy sends everything
//! over one multiplexed connection per thread of its own, and the kernel's hash, or turns
//! skewed by one of them reconnecting, would put two of those on one thread and leave another
//! idle.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// Which worker this thread is: 0 for the thread that starts the proxy (and in tests).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker the current thread is, to pick its share of per-worker state.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// The extra worker threads, running until [`Workers::stop`].
#[derive(Clone, Debug)]
pub struct Workers {
    /// The extra threads' runtimes; the accepting thread is worker 0 and not among them.
    extra: Arc<[Handle]>,
    /// The connections each worker serves, the accepting thread's first.
    serving: Arc<[AtomicUsize]>,
    stop: CancellationToken,
}

/// Where one accepted connection is served.
pub enum ServeOn<'a> {
    /// On the thread that accepted it.
    Here,
    /// On another worker's runtime.
    There(&'a Handle),
}

/// A connection counted on its worker until dropped.
#[derive(Debug)]
pub struct Serving {
    serving: Arc<[AtomicUsize]>,
    worker: usize,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.serving[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// No extra threads: everything runs where it is spawned.
    pub fn none() -> Self {
        Self {
            extra: Arc::from(Vec::new()),
            serving: Arc::from(vec![AtomicUsize::new(0)]),
            stop: CancellationToken::new(),
        }
    }

    /// Starts `count - 1` threads besides the current one, each running a runtime until
    /// [`Workers::stop`]; then each drops what it still runs (its connections past the grace
    /// period).
    pub fn start(count: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut extra = Vec::with_capacity(count.saturating_sub(1));
        for index in 1..count {
            match spawn_worker(index, stop.clone()) {
                Ok(handle) => extra.push(handle),
                Err(error) => {
                    // Those started already would otherwise run until the process exits.
                    stop.cancel();
                    return Err(error);
                }
            }
        }
        let serving = (0..=extra.len()).map(|_| AtomicUsize::new(0)).collect();
        Ok(Self {
            extra: Arc::from(extra),
            serving,
            stop,
        })
    }

    /// How many threads serve connections, the accepting one included.
    pub fn count(&self) -> usize {
        self.extra.len() + 1
    }

    /// The worker to serve a new connection: the one serving the fewest (the lowest on a tie),
    /// counted until the returned [`Serving`] is dropped.
    pub fn assign(&self) -> (ServeOn<'_>, Option<Serving>) {
        if self.extra.is_empty() {
            return (ServeOn::Here, None);
        }
        let (worker, _) = self
            .serving
            .iter()
            .map(|serving| serving.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, serving)| serving)
            .unwrap_or((0, 0));
        self.serving[worker].fetch_add(1, Ordering::Relaxed);
        let serving = Serving {
            serving: self.serving.clone(),
            worker,
        };
        let served_on = match worker {
            0 => ServeOn::Here,
            n => ServeOn::There(&self.extra[n - 1]),
        };
        (served_on, Some(serving))
    }

    /// Stops the extra threads, dropping whatever they still run.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts worker `index` on a thread of its own, running a runtime until `stop` fires.
fn spawn_worker(index: usize, stop: CancellationToken) -> std::io::Result<Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name(format!("mesh-worker-{index}"))
        .spawn(move || {
            INDEX.set(index);
            runtime.block_on(stop.cancelled());
        })?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker a connection was assigned, as the thread its task runs on says.
    fn worker_of(served_on: ServeOn<'_>) -> usize {
        match served_on {
            ServeOn::Here => index(),
            ServeOn::There(handle) => {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move { tx.send(index()) });
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("the worker ran the task")
            }
        }
    }

    #[test]
    fn one_worker_serves_everything_where_it_was_accepted() {
        let workers = Workers::start(1).expect("started");
        assert_eq!(workers.count(), 1);
        for _ in 0..3 {
            assert!(matches!(workers.assign(), (ServeOn::Here, None)));
        }
    }

    #[test]
    fn each_connection_goes_to_the_worker_serving_the_fewest_on_its_own_thread() {
        let workers = Workers::start(3).expect("started");
        let mut held = Vec::new();
        for expected in [0, 1, 2, 0] {
            let (served_on, serving) = workers.assign();
            assert_eq!(worker_of(served_on), expected);
            held.push(serving);
        }
        // Worker 1's connection ends: it now serves the fewest.
        drop(held.remove(1));
        let (served_on, _serving) = workers.assign();
        assert_eq!(worker_of(served_on), 1);
        workers.stop();
    }
}
