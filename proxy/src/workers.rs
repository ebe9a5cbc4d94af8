//! The proxy's worker threads, one runtime each, and dealing accepted connections to them.
//!
//! With `MESH_PROXY_WORKER_THREADS` above one, each extra thread runs its own single-threaded
//! tokio runtime, and the listeners deal accepted connections to the threads in turn (the
//! thread that accepts is one of them). A connection's requests, and the upstream connections
//! they use (each thread has its own, see `client::HttpClients`), then stay on one thread: no
//! work stealing and no wake-ups across threads on the request path. tokio's multi-threaded
//! runtime spent more per request than its second thread gave back.
//!
//! Dealing in turn rather than each thread accepting from its own `SO_REUSEPORT` socket: the
//! kernel's hash may put a peer proxy's few multiplexed connections all on one thread, where
//! turns spread them.

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
    next: Arc<AtomicUsize>,
    stop: CancellationToken,
}

/// Where one accepted connection is served.
pub enum Turn<'a> {
    /// On the thread that accepted it.
    Here,
    /// On another worker's runtime.
    There(&'a Handle),
}

impl Workers {
    /// No extra threads: everything runs where it is spawned.
    pub fn none() -> Self {
        Self {
            extra: Arc::from(Vec::new()),
            next: Arc::default(),
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
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            extra.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("mesh-worker-{index}"))
                .spawn(move || {
                    INDEX.set(index);
                    runtime.block_on(stop.cancelled());
                })?;
        }
        Ok(Self {
            extra: Arc::from(extra),
            next: Arc::default(),
            stop,
        })
    }

    /// How many threads serve connections, the accepting one included.
    pub fn count(&self) -> usize {
        self.extra.len() + 1
    }

    /// The worker whose turn it is to serve the next connection.
    pub fn next_turn(&self) -> Turn<'_> {
        if self.extra.is_empty() {
            return Turn::Here;
        }
        match self.next.fetch_add(1, Ordering::Relaxed) % self.count() {
            0 => Turn::Here,
            n => Turn::There(&self.extra[n - 1]),
        }
    }

    /// Stops the extra threads, dropping whatever they still run.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_serves_everything_where_it_was_accepted() {
        let workers = Workers::start(1).expect("started");
        assert_eq!(workers.count(), 1);
        for _ in 0..3 {
            assert!(matches!(workers.next_turn(), Turn::Here));
        }
    }

    #[test]
    fn connections_are_dealt_to_every_worker_in_turn_on_its_own_thread() {
        let workers = Workers::start(3).expect("started");
        let mut indexes = Vec::new();
        for _ in 0..6 {
            indexes.push(match workers.next_turn() {
                Turn::Here => index(),
                Turn::There(handle) => {
                    let (tx, rx) = std::sync::mpsc::channel();
                    handle.spawn(async move { tx.send(index()) });
                    rx.recv_timeout(std::time::Duration::from_secs(5))
                        .expect("the worker ran the task")
                }
            });
        }
        assert_eq!(indexes, [0, 1, 2, 0, 1, 2]);
        workers.stop();
    }
}
