//! The issuer the Identity service signs with, replaced while it serves when its folder
//! changes (issuer rotation, a renewed Secret).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::gauge::Gauge;

use super::{ISSUER_CERT_FILE, ISSUER_EXPIRY_WARNING, ISSUER_KEY_FILE, Issuer, TRUST_ANCHORS_FILE};

/// The issuer the service signs with, replaceable while it serves (issuer rotation, a renewed
/// Secret). Cheap to clone; every clone sees replacements.
#[derive(Clone)]
pub struct SharedIssuer {
    current: Arc<RwLock<Arc<Issuer>>>,
    expiry_gauge: Gauge,
}

impl fmt::Debug for SharedIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedIssuer")
            .field(&self.current())
            .finish()
    }
}

impl SharedIssuer {
    /// Shares `issuer`, reporting its expiry in `metrics`.
    pub fn new(issuer: Issuer, metrics: &crate::identity::IdentityMetrics) -> Self {
        let shared = Self {
            current: Arc::new(RwLock::new(Arc::new(issuer))),
            expiry_gauge: metrics.issuer_expiry.clone(),
        };
        shared.report_expiry();
        shared
    }

    /// The issuer now.
    pub fn current(&self) -> Arc<Issuer> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            // A writer cannot panic while holding the lock (it only swaps an Arc).
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs with `issuer` from now on.
    pub fn replace(&self, issuer: Issuer) {
        let issuer = Arc::new(issuer);
        match self.current.write() {
            Ok(mut guard) => *guard = issuer,
            Err(poisoned) => *poisoned.into_inner() = issuer,
        }
        self.report_expiry();
    }

    fn report_expiry(&self) {
        let issuer = self.current();
        let not_after = issuer
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.expiry_gauge.set(not_after);
        let remaining = issuer
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if remaining < ISSUER_EXPIRY_WARNING {
            tracing::warn!(
                subject = issuer.subject(),
                remaining_hours = remaining.as_secs() / 3600,
                "the identity issuer certificate expires soon; rotate it"
            );
        }
    }
}

/// Reloads the issuer from `dir` whenever its files change, until `shutdown` resolves. A
/// version that fails to load is logged and the current issuer stays in use, so a half-written
/// rotation never stops signing.
pub async fn watch_issuer_dir(
    dir: PathBuf,
    interval: Duration,
    issuer: SharedIssuer,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let read_all = |dir: &Path| -> Vec<Option<Vec<u8>>> {
        [ISSUER_CERT_FILE, ISSUER_KEY_FILE, TRUST_ANCHORS_FILE]
            .iter()
            .map(|name| std::fs::read(dir.join(name)).ok())
            .collect()
    };
    let mut seen = read_all(&dir);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        let now = read_all(&dir);
        if now == seen {
            continue;
        }
        seen = now;
        match Issuer::from_dir(&dir) {
            Ok(loaded) => {
                tracing::info!(
                    dir = %dir.display(),
                    subject = loaded.subject(),
                    "identity issuer reloaded"
                );
                issuer.replace(loaded);
            }
            Err(error) => {
                tracing::warn!(%error, "identity issuer files changed but do not load; still signing with the previous issuer");
            }
        }
    }
}
