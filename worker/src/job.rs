//! How a job that did not complete (a page change, a poll) asks its consumer to settle its
//! message: dead-letter it with the reason, park it for a long wait, or give it back.

use std::time::Duration;

use fbsync_shared::facebook::graph::GraphError;
use fbsync_shared::ids::PageId;
use fbsync_shared::now_ms;
use fbsync_shared::retry::RetryClass;
use fbsync_shared::storage::db::DbError;
use fbsync_shared::storage::db::{Database, PageStatus};
use fbsync_shared::storage::object_store::StoreError;

use crate::dead_letter::{DeadLetterInfo, DeadReason};

/// One failed attempt of a job's step that reads a Page's token, calls the Graph API and
/// the store, and takes the bucket's budget (page changes, onboarding).
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("page {0} is not registered")]
    UnknownPage(PageId),
    #[error("the stored token cannot be read: {0}")]
    Token(String),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("waiting for the store's request budget")]
    Budget(Duration),
}

impl RetryClass for AttemptError {
    fn is_transient(&self) -> bool {
        match self {
            AttemptError::UnknownPage(_) | AttemptError::Token(_) => false,
            AttemptError::Graph(e) => e.is_transient(),
            AttemptError::Store(e) => e.is_transient(),
            AttemptError::Db(e) => e.is_transient(),
            AttemptError::Budget(_) => true,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            AttemptError::Graph(e) => e.retry_after(),
            AttemptError::Budget(wait) => Some(*wait),
            _ => None,
        }
    }

    fn is_budget_wait(&self) -> bool {
        matches!(self, AttemptError::Budget(_))
    }
}

impl AttemptError {
    /// Why a job whose step failed this way for good is dead-lettered; a rejected token also
    /// flags the Page ([`flag_rejected_token`]).
    pub async fn dead_reason(&self, db: &Database, page_id: &PageId) -> DeadReason {
        match self {
            AttemptError::UnknownPage(_) => DeadReason::UnknownPage,
            AttemptError::Token(_) => DeadReason::TokenError,
            AttemptError::Graph(GraphError::TokenInvalid { .. }) => {
                flag_rejected_token(db, page_id, self).await;
                DeadReason::TokenError
            }
            AttemptError::Graph(GraphError::Permanent(_)) => DeadReason::GraphError,
            _ => DeadReason::AttemptsExhausted,
        }
    }
}

/// Why a job did not complete, and what becomes of its message.
#[derive(Debug, Clone)]
pub enum JobFailure {
    /// It cannot succeed: park the message in the DLQ with this information.
    DeadLetter(DeadLetterInfo),
    /// Shutdown interrupted a wait: return the message to its queue.
    GiveBack,
    /// The next attempt is far off (a rate limit, an outage, a busy Page): park the message
    /// for this long.
    Park(Duration),
}

/// The Graph API rejected the Page's token (code 190): the Page is marked `needs_reauth` with
/// the error in words, so `fbsync pages list` says so and poll rounds skip it until the owner
/// connects it again. A database failure here is logged; the job's dead letter says why anyway.
pub async fn flag_rejected_token(
    db: &Database,
    page_id: &PageId,
    error: &(dyn std::fmt::Display + Sync),
) {
    let note = format!("token rejected (code 190): {error}");
    if let Err(e) = db
        .mark_page_error(page_id, Some(PageStatus::NeedsReauth), &note, now_ms())
        .await
    {
        tracing::error!(%page_id, error = %e, "could not flag the Page for re-authorisation");
    }
    tracing::warn!(%page_id, "Page token rejected; the Page needs re-authorisation");
}
