//! Whether discovery has synced, and the problems it serves around (malformed files, watch
//! errors): what `/ready` reports and what `Destination.Get` waits for at start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The state `/ready` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthState {
    /// The backend has loaded everything once.
    pub synced: bool,
    /// Why it is not synced yet.
    pub waiting_for: String,
    /// Problems by source (`file`, `kubernetes`): item (a file path, a watched kind) to
    /// message. Discovery keeps serving the last good state around them.
    pub problems: BTreeMap<String, BTreeMap<String, String>>,
}

impl HealthState {
    /// The `/ready` body: the status line, then one line per problem.
    pub fn report(&self) -> String {
        let mut out = if self.synced {
            "ready\n".to_owned()
        } else {
            format!("not ready: {}\n", self.waiting_for)
        };
        for (source, items) in &self.problems {
            for (item, message) in items {
                out.push_str(&format!("{source} problem: {item}: {message}\n"));
            }
        }
        out
    }
}

/// A shared handle on the health state.
#[derive(Debug, Clone)]
pub struct Health {
    tx: Arc<watch::Sender<HealthState>>,
}

impl Health {
    /// Not synced, waiting for `what`.
    pub fn new(waiting_for: impl Into<String>) -> Self {
        let (tx, _) = watch::channel(HealthState {
            waiting_for: waiting_for.into(),
            ..HealthState::default()
        });
        Self { tx: Arc::new(tx) }
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        self.tx.borrow().clone()
    }

    /// Marks the backend synced.
    pub fn set_synced(&self) {
        self.tx.send_if_modified(|s| {
            let changed = !s.synced;
            s.synced = true;
            s.waiting_for.clear();
            changed
        });
    }

    /// Replaces the problems reported by one source.
    pub fn set_problems(&self, source: &str, problems: BTreeMap<String, String>) {
        self.tx.send_if_modified(|s| {
            if problems.is_empty() {
                return s.problems.remove(source).is_some();
            }
            if s.problems.get(source) == Some(&problems) {
                return false;
            }
            s.problems.insert(source.to_owned(), problems);
            true
        });
    }

    /// Sets or clears one problem of a source.
    pub fn set_problem(&self, source: &str, item: &str, message: Option<String>) {
        self.tx.send_if_modified(|s| match message {
            Some(message) => {
                let items = s.problems.entry(source.to_owned()).or_default();
                items.insert(item.to_owned(), message.clone()) != Some(message)
            }
            None => {
                let Some(items) = s.problems.get_mut(source) else {
                    return false;
                };
                let removed = items.remove(item).is_some();
                if items.is_empty() {
                    s.problems.remove(source);
                }
                removed
            }
        });
    }

    /// Waits until synced, at most `timeout`; returns whether it is.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.tx.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| s.synced)).await,
            Ok(Ok(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_readiness_and_problems() {
        let health = Health::new("the first scan of /cfg");
        assert_eq!(
            health.state().report(),
            "not ready: the first scan of /cfg\n"
        );
        assert!(!health.wait_synced(Duration::from_millis(10)).await);
        health.set_synced();
        assert!(health.wait_synced(Duration::from_millis(10)).await);
        health.set_problems(
            "file",
            [("/cfg/a.yaml".to_owned(), "invalid YAML".to_owned())].into(),
        );
        health.set_problem("kubernetes", "Pod", Some("watch failed".to_owned()));
        assert_eq!(
            health.state().report(),
            "ready\nfile problem: /cfg/a.yaml: invalid YAML\nkubernetes problem: Pod: watch failed\n"
        );
        health.set_problems("file", BTreeMap::new());
        health.set_problem("kubernetes", "Pod", None);
        assert_eq!(health.state().report(), "ready\n");
    }
}
