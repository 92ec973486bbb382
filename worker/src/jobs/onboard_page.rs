//! Onboarding a Page, the first of the owners' jobs on the `onboard` queue (see
//! `queue::owner_jobs`).
//!
//! Onboarding a Page connected through Facebook Login runs three steps, each recorded on the
//! Page (`fbsync pages list`, the owner's `/connect`): subscribe the app to the Page's webhooks
//! when it is not subscribed yet, write `page_data.json` (the page-change job's own
//! [`PageDataRefresher::refresh`]: only that Page's fields, only when changed), and start the
//! conversation backfill ([`PageOnboarder::start_backfill`]: a backfill poll job, confirmed; a
//! Page whose history was read before gets a poll of what is new since instead). Nothing but real data reaches the bucket: no test
//! deliveries, no fake conversations. A step that cannot succeed is recorded as failed in words
//! and the job dead-lettered (replayable); a long wait parks it; every step is idempotent, so a
//! redelivery or a replay repeats nothing that was done.

use fbsync_shared::config::RetrySettings;
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::facebook::graph::GraphClient;
use fbsync_shared::ids::PageId;
use fbsync_shared::jobs::{Job, PollRequest};
use fbsync_shared::now_ms;
use fbsync_shared::queue::Topology;
use fbsync_shared::storage::db::{OnboardStep, Polls, Registry};
use fbsync_shared::telemetry::SUBSCRIPTIONS_RESTORED;
use tokio_util::sync::CancellationToken;

use super::attempt::{AttemptError, page_with_token};
use super::page_change::{PageDataOutcome, PageDataRefresher};
use crate::runtime::forward::Forwarder;
use crate::runtime::settle::{JobError, page_step, step};

/// What the backfill step records once its poll job is queued (the poll's own progress shows
/// as the Page's last poll).
pub const BACKFILL_STARTED: &str = "started: a backfill poll is queued";

/// What the subscription step records when the app was subscribed with every field already.
const ALREADY_SUBSCRIBED: &str = "already subscribed";

/// What the subscription step records when it subscribed the app (again).
const SUBSCRIBED: &str = "subscribed";

/// What the backfill step records for a Page whose history was read before (a reconnect): no
/// backfill, a poll of what is new since the last complete poll instead.
pub const HISTORY_KEPT: &str = "done earlier: a poll of what is new since is queued";

/// Onboards the Pages owners connect (the page-data step borrows the page-change handler).
pub struct PageOnboarder {
    /// The Page registry.
    pub registry: Registry,
    /// Whether the Page's history was read before (a reconnect reads it again for nothing).
    pub polls: Polls,
    /// Opens the Page tokens.
    pub cipher: TokenCipher,
    /// The subscription calls.
    pub graph: GraphClient,
    /// Recognises this app among a Page's subscribed apps (FACEBOOK_APP_ID; without it any
    /// app seen through the Page's token counts).
    pub app_id: Option<String>,
    /// The webhook fields every Page is subscribed to (FACEBOOK_WEBHOOK_FIELDS): a Page lacking
    /// one is subscribed again with the whole list.
    pub webhook_fields: Vec<String>,
    /// Transient failures are retried under the one policy.
    pub retry: RetrySettings,
    /// Publishes the backfill's poll job with a confirm.
    pub forwarder: Forwarder,
    /// Where the poll job goes.
    pub topology: Topology,
}

impl PageOnboarder {
    /// Onboards `page_id`: subscription, `page_data.json`, backfill.
    pub async fn onboard(
        &self,
        page_id: &PageId,
        page_data: &PageDataRefresher,
        shutdown: &CancellationToken,
    ) -> Result<(), JobError> {
        let subscribed = page_step(
            &self.registry,
            page_id,
            &self.retry,
            "subscribe",
            shutdown,
            || self.subscribe_once(page_id),
        )
        .await;
        match subscribed {
            Ok(outcome) => self.record(page_id, OnboardStep::Subscribe, outcome).await,
            Err(error) => {
                if let JobError::Failed { .. } = error {
                    let outcome = format!("failed: {error}");
                    self.record(page_id, OnboardStep::Subscribe, &outcome).await;
                }
                return Err(error);
            }
        }
        match page_data.refresh(page_id, shutdown).await {
            Ok(PageDataOutcome::Written) => {
                self.record(page_id, OnboardStep::PageData, "written").await
            }
            Ok(PageDataOutcome::Unchanged) => {
                self.record(
                    page_id,
                    OnboardStep::PageData,
                    "unchanged (already current)",
                )
                .await
            }
            Err(error) => {
                if let JobError::Failed { .. } = error {
                    let outcome = format!("failed: {error}");
                    self.record(page_id, OnboardStep::PageData, &outcome).await;
                }
                // Dead-lettered as an onboard job: a replay runs the whole onboarding again.
                return Err(error);
            }
        }
        self.start_backfill(page_id, shutdown).await?;
        tracing::info!(%page_id, "Page onboarded");
        Ok(())
    }

    /// Starts reading the Page's conversations: a backfill poll (its whole history) for a Page
    /// whose history was never read to the end; for one that was (a reconnect), a poll of what
    /// is new since its last complete poll, so connecting again re-reads nothing. The poll job
    /// is confirmed by the broker, then the step recorded. When the broker cannot confirm, the
    /// onboarding job is parked and runs again later (its other steps repeat nothing).
    pub async fn start_backfill(
        &self,
        page_id: &PageId,
        shutdown: &CancellationToken,
    ) -> Result<(), JobError> {
        let history_read = step(&self.retry, "poll_summary", shutdown, || async {
            Ok::<_, AttemptError>(self.polls.poll_summary(page_id).await?)
        })
        .await?
        .last_backfill_end_ms
        .is_some();
        let (backfill, requested_by, outcome) = if history_read {
            (false, "reconnect", HISTORY_KEPT)
        } else {
            (true, "onboarding", BACKFILL_STARTED)
        };
        let job = self.topology.job(&Job::Poll(PollRequest {
            page_id: page_id.as_str().to_string(),
            backfill,
            requested_by: requested_by.into(),
            requested_at_ms: now_ms(),
            since_ms: None,
        }));
        if let Err(e) = self.forwarder.publish_once(&[job]).await {
            tracing::warn!(%page_id, error = %e, "the poll job was not confirmed; parked");
            return Err(JobError::Wait(self.retry.max_delay));
        }
        self.record(page_id, OnboardStep::Backfill, outcome).await;
        Ok(())
    }

    /// The scheduler's check of a Page's webhook subscription: a complete one is recorded as
    /// checked; a lost one, or one lacking a field, is subscribed again with the whole list,
    /// recorded as restored, and followed by a poll reading back to where it may have been
    /// lost (`SubscriptionRecord::gap_start_ms`): the events Facebook did not send meanwhile.
    /// A redelivery of a check that restored it still queues that poll. A refused token flags the Page
    /// `needs_reauth` (as polls do), which the scheduler then skips and the owner is asked to
    /// reconnect.
    pub async fn check_subscription(
        &self,
        page_id: &PageId,
        shutdown: &CancellationToken,
    ) -> Result<(), JobError> {
        let outcome = page_step(
            &self.registry,
            page_id,
            &self.retry,
            "check_subscription",
            shutdown,
            || self.subscribe_once(page_id),
        )
        .await?;
        let now = now_ms();
        if outcome == SUBSCRIBED {
            tracing::warn!(%page_id, "the Page had lost its webhook subscription (or a field): subscribed again; polling the gap");
            metrics::counter!(SUBSCRIPTIONS_RESTORED).increment(1);
            step(
                &self.retry,
                "record_subscription_restored",
                shutdown,
                || async {
                    Ok::<_, AttemptError>(
                        self.registry
                            .record_subscription_restored(page_id, now)
                            .await?,
                    )
                },
            )
            .await?;
        }
        let record = step(&self.retry, "subscription_record", shutdown, || async {
            Ok::<_, AttemptError>(self.registry.subscription_record(page_id).await?)
        })
        .await?;
        // Owed since this check restored it, or since a redelivery of the check that did.
        if record.gap_poll_owed() {
            let job = self.topology.job(&Job::Poll(PollRequest {
                page_id: page_id.as_str().to_string(),
                backfill: false,
                requested_by: "resubscription".into(),
                requested_at_ms: now,
                since_ms: record.gap_start_ms(),
            }));
            if let Err(e) = self.forwarder.publish_once(&[job]).await {
                tracing::warn!(%page_id, error = %e, "the gap's poll job was not confirmed; parked");
                return Err(JobError::Wait(self.retry.max_delay));
            }
        }
        if let Err(e) = self
            .registry
            .record_subscription_check(page_id, now_ms())
            .await
        {
            tracing::warn!(%page_id, error = %e, "could not record a subscription check");
        }
        Ok(())
    }

    /// Records a step's outcome; a database failure here is logged (the step itself is done
    /// and idempotent).
    async fn record(&self, page_id: &PageId, step: OnboardStep, outcome: &str) {
        if let Err(e) = self.registry.set_onboard_step(page_id, step, outcome).await {
            tracing::warn!(%page_id, step = step.as_str(), error = %e, "could not record an onboarding step");
        }
    }

    /// One attempt at the subscription: nothing is sent when the app is subscribed already.
    async fn subscribe_once(&self, page_id: &PageId) -> Result<&'static str, AttemptError> {
        let (_, token) = page_with_token(&self.registry, &self.cipher, page_id).await?;
        if self
            .graph
            .is_app_subscribed(
                page_id,
                &token,
                self.app_id.as_deref(),
                &self.webhook_fields,
            )
            .await?
        {
            return Ok(ALREADY_SUBSCRIBED);
        }
        self.graph
            .subscribe_app(page_id, &token, &self.webhook_fields)
            .await?;
        Ok(SUBSCRIBED)
    }
}
