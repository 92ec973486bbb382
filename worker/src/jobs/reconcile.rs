//! Reconciling a window in which ingest refused deliveries (the broker was away): Facebook
//! retries a delivery for a while, then gives up, and its events are not queryable afterwards.
//! One job (ingest publishes it when such a window of at least INGEST_RECONCILE_AFTER_MS ends)
//! becomes one poll
//! per active Page, each reading back to the window's start and no further, so what Facebook
//! gave up on is read from the Conversations API while it still can be.

use fbsync_shared::config::RetrySettings;
use fbsync_shared::jobs::{Job, PollRequest, Reconcile};
use fbsync_shared::now_ms;
use fbsync_shared::queue::Topology;
use fbsync_shared::storage::db::Polls;
use tokio_util::sync::CancellationToken;

use super::attempt::AttemptError;
use crate::runtime::forward::Forwarder;
use crate::runtime::settle::{JobError, step};

/// Turns a reconciliation into polls.
pub struct Reconciler {
    /// The active Pages.
    pub polls: Polls,
    /// Publishes the poll jobs with confirms.
    pub forwarder: Forwarder,
    /// Where the poll jobs go.
    pub topology: Topology,
    /// Transient failures are retried under the one policy.
    pub retry: RetrySettings,
}

impl Reconciler {
    /// Queues one poll per active Page reading back to the window's start; a broker that
    /// cannot confirm parks the job (a redelivery queues them again: polls are idempotent).
    pub async fn reconcile(
        &self,
        window: &Reconcile,
        shutdown: &CancellationToken,
    ) -> Result<(), JobError> {
        let pages = step(&self.retry, "reconcile_pages", shutdown, || async {
            Ok::<_, AttemptError>(self.polls.active_pages().await?)
        })
        .await?;
        let jobs: Vec<_> = pages
            .iter()
            .map(|page_id| {
                self.topology.job(&Job::Poll(PollRequest {
                    page_id: page_id.as_str().to_string(),
                    backfill: false,
                    requested_by: "reconcile".into(),
                    requested_at_ms: now_ms(),
                    since_ms: Some(window.since_ms),
                }))
            })
            .collect();
        if let Err(e) = self.forwarder.publish_once(&jobs).await {
            tracing::warn!(error = %e, "the reconciliation's poll jobs were not confirmed; parked");
            return Err(JobError::Wait(self.retry.max_delay));
        }
        tracing::info!(
            pages = jobs.len(),
            since_ms = window.since_ms,
            until_ms = window.until_ms,
            "deliveries may have been lost while ingest refused them: every active Page is polled back to the window's start"
        );
        Ok(())
    }
}
