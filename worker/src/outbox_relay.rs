//! The outbox relay: publishes the jobs that waited in the outbox because the broker was away
//! when their change was written (an owner's onboarding, a data deletion; see the shared
//! crate's `storage/db/outbox.rs`), so they run once the broker is back without anyone acting.
//! Every worker runs one; each row is leased to one relay at a time. A job the broker cannot
//! confirm is tried again after the retry policy's delay for its number of failures, for as
//! long as it takes.

use std::time::Duration;

use fbsync_shared::config::RetrySettings;
use fbsync_shared::now_ms;
use fbsync_shared::queue::Topology;
use fbsync_shared::retry::delay_after_failures;
use fbsync_shared::storage::db::{DbError, Outbox};
use fbsync_shared::telemetry::{OUTBOX_OLDEST_SECONDS, OUTBOX_PENDING};
use tokio_util::sync::CancellationToken;

use crate::runtime::forward::Forwarder;

/// How often the relay looks for due jobs.
const INTERVAL: Duration = Duration::from_secs(1);

/// Most jobs taken per look.
const BATCH: i64 = 100;

/// Publishes what waits in the outbox.
pub struct OutboxRelay {
    /// The jobs waiting.
    pub outbox: Outbox,
    /// The worker's confirming publisher.
    pub forwarder: Forwarder,
    /// Where each job goes.
    pub topology: Topology,
    /// The delay after each failed attempt.
    pub retry: RetrySettings,
}

impl OutboxRelay {
    /// Relays until `shutdown`; a database failure is logged and the next look tries again.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.relay_due().await {
                tracing::warn!(error = %e, "the outbox could not be read; trying again");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
    }

    /// One look: every due job published (each on its own, so one the broker refuses does not
    /// hold back the others); how many went.
    pub async fn relay_due(&self) -> Result<usize, DbError> {
        let now = now_ms();
        let due = self.outbox.take_due(now, BATCH).await?;
        let mut sent = 0;
        for entry in due {
            let outgoing = self.topology.job(&entry.job);
            match self.forwarder.publish_once(&[outgoing]).await {
                Ok(()) => {
                    self.outbox.sent(&[entry.id]).await?;
                    tracing::info!(
                        job = entry.job.name(),
                        page_id = entry.job.page_id(),
                        "a job from the outbox was published"
                    );
                    sent += 1;
                }
                Err(e) => {
                    let attempts = entry.attempts.saturating_add(1);
                    let delay = delay_after_failures(&self.retry, attempts);
                    let retry_at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                    self.outbox
                        .failed(&entry.id, attempts, retry_at, &e.to_string())
                        .await?;
                    if attempts == 1 {
                        tracing::warn!(job = entry.job.name(), error = %e, "an outbox job could not be published; retrying until the broker takes it");
                    }
                }
            }
        }
        let (pending, oldest) = self.outbox.pending().await?;
        metrics::gauge!(OUTBOX_PENDING).set(pending as f64);
        let age = oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
        metrics::gauge!(OUTBOX_OLDEST_SECONDS).set(age);
        Ok(sent)
    }
}
