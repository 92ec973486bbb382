//! What the worker's dependencies look like from inside: the database (staging succeeds) and
//! the object store (flushes succeed). While either is down the worker takes no new messages
//! (its consumers wait before the next one, holding nothing new) and `/readyz` answers 503; a
//! message the worker already holds is kept, not handed back, so an outage never counts
//! against a message's delivery limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The worker's view of its dependencies, shared by consumers, flusher and `/readyz`.
#[derive(Debug)]
pub struct Health {
    /// False from a failed staging until the next successful one.
    database_up: AtomicBool,
    /// False from a flush that failed transiently until the next successful store request.
    store_up: AtomicBool,
    /// Wakes consumers waiting for the dependencies.
    recovered: Notify,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            database_up: AtomicBool::new(true),
            store_up: AtomicBool::new(true),
            recovered: Notify::new(),
        }
    }
}

/// How often a waiting consumer looks again even without a wake-up.
const RECHECK: Duration = Duration::from_secs(1);

impl Health {
    pub fn set_database_up(&self, up: bool) {
        self.set(&self.database_up, up, "database");
    }

    pub fn set_store_up(&self, up: bool) {
        self.set(&self.store_up, up, "object store");
    }

    fn set(&self, flag: &AtomicBool, up: bool, what: &str) {
        let was = flag.swap(up, Ordering::SeqCst);
        if was != up {
            if up {
                tracing::info!(dependency = what, "back: taking new messages again");
                self.recovered.notify_waiters();
            } else {
                tracing::warn!(
                    dependency = what,
                    "unavailable: taking no new messages until it is back"
                );
            }
        }
    }

    /// Both dependencies answered their last request.
    pub fn is_ready(&self) -> bool {
        self.database_up.load(Ordering::SeqCst) && self.store_up.load(Ordering::SeqCst)
    }

    /// Waits until the worker is ready to take new messages, or shutdown; false on shutdown.
    pub async fn wait_until_ready(&self, shutdown: &CancellationToken) -> bool {
        while !self.is_ready() {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = self.recovered.notified() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
        !shutdown.is_cancelled()
    }
}
