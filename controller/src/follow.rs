//! The one shape of every watch API the controller serves (`Destination.Get`,
//! `InboundPolicies.Watch`, `OutboundPolicies.Watch`, `Workload.Watch`): send what the client
//! needs now, then what changes, computed again from each new snapshot of the index.
//!
//! A stream is polled by its call's HTTP/2 stream directly: there is no task and no channel
//! per stream. A slow client is simply not polled, and the snapshots published meanwhile are
//! coalesced by the `watch` channel, so the next step computes from the newest one. At
//! 10,000 streams the task and channel of the earlier design held about 5 KiB each.

use std::collections::VecDeque;
use std::pin::Pin;

use futures::Stream;
use tokio::sync::watch;
use tonic::Status;

/// A watch API's response stream.
pub type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Sends `first`, then whatever `step` makes of each newer snapshot on `snapshots` (nothing
/// when it returns nothing), until the snapshots' sender is gone, the client goes away, or
/// `shutdown` turns true: then the client gets UNAVAILABLE, ends, and reconnects elsewhere.
///
/// `first` must have been computed from the snapshot last marked seen on `snapshots` (take it
/// with `borrow_and_update`), so one published in between still reaches `step`. `step` owns
/// whatever the stream keeps (what it last sent, a metrics guard) and is dropped with it.
pub fn follow<S, T, F>(
    snapshots: watch::Receiver<S>,
    shutdown: watch::Receiver<bool>,
    first: Vec<T>,
    step: F,
) -> WatchStream<T>
where
    S: Clone + Send + Sync + 'static,
    T: Send + 'static,
    F: FnMut(&S) -> Vec<T> + Send + 'static,
{
    let state = Following {
        snapshots,
        shutdown,
        pending: first.into(),
        step,
        stopping: false,
    };
    Box::pin(futures::stream::unfold(state, Following::next))
}

struct Following<S, T, F> {
    snapshots: watch::Receiver<S>,
    shutdown: watch::Receiver<bool>,
    /// Computed and not yet taken by the client's stream.
    pending: VecDeque<T>,
    step: F,
    stopping: bool,
}

impl<S, T, F> Following<S, T, F>
where
    S: Clone + Send + Sync + 'static,
    F: FnMut(&S) -> Vec<T>,
{
    async fn next(mut self) -> Option<(Result<T, Status>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((Ok(item), self));
            }
            if self.stopping {
                return None;
            }
            tokio::select! {
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        // The index is gone: the controller is stopping.
                        return None;
                    }
                }
                // `wait_for`'s guard is not `Send`: nothing may await inside this arm.
                _ = self.shutdown.wait_for(|stop| *stop) => self.stopping = true,
            }
            if self.stopping {
                let status = Status::unavailable("the controller is shutting down");
                return Some((Err(status), self));
            }
            let snapshot = self.snapshots.borrow_and_update().clone();
            self.pending.extend((self.step)(&snapshot));
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use std::time::Duration;

    use super::*;

    /// Doubles every snapshot it sees; sends nothing for odd ones.
    fn doubling(
        snapshots: watch::Receiver<u32>,
        shutdown: watch::Receiver<bool>,
    ) -> WatchStream<u32> {
        follow(snapshots, shutdown, vec![0], |n: &u32| {
            if n.is_multiple_of(2) {
                vec![n * 2, n * 2 + 1]
            } else {
                vec![]
            }
        })
    }

    async fn next(stream: &mut WatchStream<u32>) -> Option<Result<u32, Status>> {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stream answers within 5 s")
    }

    #[tokio::test]
    async fn sends_first_then_each_step_and_coalesces_what_was_not_polled() {
        let (publish, snapshots) = watch::channel(0);
        let (_stop, shutdown) = watch::channel(false);
        let mut stream = doubling(snapshots, shutdown);
        assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(0)));
        // Published while nobody polled: only the newest is stepped.
        publish.send_replace(2);
        publish.send_replace(4);
        assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(8)));
        assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(9)));
        // A step with nothing to send sends nothing.
        publish.send_replace(5);
        publish.send_replace(6);
        assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(12)));
    }

    #[tokio::test]
    async fn shutdown_sends_unavailable_then_ends() {
        let (_publish, snapshots) = watch::channel(0);
        let (stop, shutdown) = watch::channel(false);
        let mut stream = doubling(snapshots, shutdown);
        assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(0)));
        stop.send_replace(true);
        let status = next(&mut stream).await.and_then(Result::err);
        assert_eq!(status.map(|s| s.code()), Some(tonic::Code::Unavailable));
        assert!(next(&mut stream).await.is_none());
    }

    #[tokio::test]
    async fn ends_when_the_index_is_gone() {
        let (publish, snapshots) = watch::channel(0);
        let (_stop, shutdown) = watch::channel(false);
        let mut stream = doubling(snapshots, shutdown);
        assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(0)));
        drop(publish);
        assert!(next(&mut stream).await.is_none());
    }
}
