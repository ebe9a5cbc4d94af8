//! A map whose entries go once nothing uses them and they have been idle a while: the proxy's
//! per-target state (discovery resolutions, outbound plans, clients of unknown destinations).
//! An application that calls many addresses would otherwise grow each without bound, every
//! entry holding a stream to the controller or a connection pool.
//!
//! Hand-written rather than a TTL cache crate: an entry still in use (a connection holds it)
//! must never be evicted, which only the value can tell ([`InUse`]), and the lookups are a
//! plain `HashMap` under the lock the proxy took anyway.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// Whether a value is held by someone besides the map.
pub trait InUse {
    /// True while something other than the map holds the value.
    fn in_use(&self) -> bool;
}

impl<T> InUse for Arc<T> {
    fn in_use(&self) -> bool {
        Arc::strong_count(self) > 1
    }
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    last_used: Instant,
}

/// See the module documentation.
#[derive(Debug)]
pub struct IdleMap<K, V> {
    entries: Mutex<HashMap<K, Entry<V>>>,
    idle: Duration,
}

impl<K: Hash + Eq + Clone, V: Clone + InUse> IdleMap<K, V> {
    /// A map evicting entries unused for `idle`.
    pub fn new(idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            idle,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry<V>>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value of `key`, made by `make` when absent; either way it counts as used now.
    pub fn get_or_insert_with(&self, key: &K, make: impl FnOnce() -> V) -> V {
        let now = Instant::now();
        let mut entries = self.lock();
        // Most calls find the key: look it up without cloning it.
        if let Some(entry) = entries.get_mut(key) {
            entry.last_used = now;
            return entry.value.clone();
        }
        let value = make();
        entries.insert(
            key.clone(),
            Entry {
                value: value.clone(),
                last_used: now,
            },
        );
        value
    }

    /// Every value, for the admin config dump.
    pub fn values(&self) -> Vec<V> {
        self.lock()
            .values()
            .map(|entry| entry.value.clone())
            .collect()
    }

    /// How many entries the map holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the entries nothing uses that have been idle for longer than the map's idle
    /// time; returns how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|_, entry| {
            entry.value.in_use() || now.saturating_duration_since(entry.last_used) < self.idle
        });
        before - entries.len()
    }

    /// Sweeps every half idle time, for as long as the map exists.
    pub fn sweep_in_background(self: &Arc<Self>)
    where
        K: Send + 'static,
        V: Send + 'static,
    {
        let map: Weak<Self> = Arc::downgrade(self);
        let every = (self.idle / 2).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(map) = map.upgrade() else {
                    return;
                };
                let evicted = map.sweep();
                if evicted > 0 {
                    tracing::debug!(evicted, left = map.len(), "idle entries dropped");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_unused_entries_idle_long_enough_go() {
        let map: Arc<IdleMap<u16, Arc<&str>>> = IdleMap::new(Duration::from_secs(60));
        let held = map.get_or_insert_with(&1, || Arc::new("held"));
        map.get_or_insert_with(&2, || Arc::new("idle"));
        map.get_or_insert_with(&3, || Arc::new("busy"));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(map.sweep(), 0, "nothing is idle long enough yet");
        // Used again: its idle time starts over.
        map.get_or_insert_with(&3, || unreachable!("present"));
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(map.sweep(), 1, "only the unused, idle entry goes");
        let mut left: Vec<&str> = map.values().iter().map(|v| **v).collect();
        left.sort_unstable();
        assert_eq!(left, ["busy", "held"]);
        drop(held);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(map.sweep(), 2);
        assert!(map.is_empty());
        // A key asked for again is made afresh.
        assert_eq!(*map.get_or_insert_with(&2, || Arc::new("new")), "new");
    }
}
