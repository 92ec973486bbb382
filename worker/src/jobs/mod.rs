//! The job handlers: what the worker does with each kind of [`Job`], one file per handler
//! (`page_change.rs`, `poll.rs`, `onboard_page.rs` (onboarding and subscription checks),
//! `delete_user_data.rs`, `reconcile.rs`; `attempt.rs` is the
//! error of one attempt at a step that calls the Graph API and the store).
//!
//! [`run`] is the registration: one line per job kind, naming the handler that carries it
//! out. A handler answers `Ok(())` or a [`JobError`] whose variant is its retry class; the
//! message is then settled in one place (`runtime::settle`), never by the handler. Conversation
//! events are the one kind not run here: they are staged in batches (`crate::stage`), since a
//! busy Page sends thousands a second.

pub mod attempt;
pub mod delete_user_data;
pub mod onboard_page;
pub mod page_change;
pub mod poll;
pub mod reconcile;

use std::sync::Arc;

use fbsync_shared::ids::PageId;
use fbsync_shared::jobs::Job;
use tokio_util::sync::CancellationToken;

use crate::runtime::settle::JobError;
use delete_user_data::UserDataEraser;
use onboard_page::PageOnboarder;
use page_change::PageDataRefresher;
use poll::Poller;
use reconcile::Reconciler;

/// What the handlers share: the database, the store, the Graph API and the token cipher,
/// through the parts that use them.
pub struct Env {
    /// Page metadata (`page_data.json`): page changes, and the first step of polls and
    /// onboarding.
    pub page_data: Arc<PageDataRefresher>,
    /// Graph API polls of a Page's conversations.
    pub poller: Poller,
    /// Onboards the Pages owners connect.
    pub onboarder: PageOnboarder,
    /// Deletes a user's data on Meta's request.
    pub eraser: UserDataEraser,
    /// Polls every active Page back to the start of a window in which ingest refused
    /// deliveries.
    pub reconciler: Reconciler,
}

/// Carries out one job: the one line per kind that registers its handler.
pub async fn run(job: Job, env: &Env, shutdown: &CancellationToken) -> Result<(), JobError> {
    match job {
        Job::Conversation(_) => Err(JobError::malformed(
            "conversation events are staged in batches, not run as jobs",
        )),
        Job::PageChange(event) => {
            let page_id =
                PageId::parse(&event.page_id).map_err(|e| JobError::malformed(e.to_string()))?;
            let outcome = env.page_data.refresh(&page_id, shutdown).await?;
            tracing::debug!(%page_id, ?outcome, "page metadata refreshed");
            Ok(())
        }
        Job::Poll(request) => env.poller.run(&request, shutdown).await.map(|_| ()),
        Job::OnboardPage(job) => {
            env.onboarder
                .onboard(&job.page_id, &env.page_data, shutdown)
                .await
        }
        Job::DeleteUserData(job) => env.eraser.erase(&job.confirmation_code, shutdown).await,
        Job::Reconcile(window) => env.reconciler.reconcile(&window, shutdown).await,
        Job::CheckSubscription(job) => {
            env.onboarder
                .check_subscription(&job.page_id, shutdown)
                .await
        }
    }
}
