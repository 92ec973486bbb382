//! The error of one attempt at a step that reads a Page's token, calls the Graph API and the
//! store, and takes the bucket's budget (page changes, onboarding); what it means for the job
//! is its [`StepError`] answer, settled in `runtime::settle`.

use std::time::Duration;

use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::facebook::graph::GraphError;
use fbsync_shared::ids::PageId;
use fbsync_shared::retry::RetryClass;
use fbsync_shared::storage::budgeted_store::BudgetedError;
use fbsync_shared::storage::db::{DbError, PageRecord, Registry};
use fbsync_shared::storage::object_store::StoreError;
use secrecy::SecretString;

use crate::dead_letter::DeadReason;
use crate::runtime::settle::StepError;

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

/// The Page's record and its token, opened: where a step about one Page begins.
pub async fn page_with_token(
    registry: &Registry,
    cipher: &TokenCipher,
    page_id: &PageId,
) -> Result<(PageRecord, SecretString), AttemptError> {
    let Some(page) = registry.page(page_id).await? else {
        return Err(AttemptError::UnknownPage(page_id.clone()));
    };
    let token = cipher
        .open(page_id.as_str(), &page.token_sealed)
        .map_err(|e| AttemptError::Token(e.to_string()))?;
    Ok((page, token))
}

impl From<BudgetedError> for AttemptError {
    fn from(error: BudgetedError) -> Self {
        match error {
            BudgetedError::Store(e) => AttemptError::Store(e),
            BudgetedError::Budget(e) => AttemptError::Db(e),
            BudgetedError::NoRoom { retry_in } => AttemptError::Budget(retry_in),
        }
    }
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

impl StepError for AttemptError {
    fn dead_reason(&self) -> DeadReason {
        match self {
            AttemptError::UnknownPage(_) => DeadReason::UnknownPage,
            AttemptError::Token(_) => DeadReason::TokenError,
            AttemptError::Graph(e) => e.dead_reason(),
            AttemptError::Store(_) | AttemptError::Db(_) | AttemptError::Budget(_) => {
                DeadReason::AttemptsExhausted
            }
        }
    }

    fn rejects_token(&self) -> bool {
        matches!(self, AttemptError::Graph(e) if e.rejects_token())
    }

    fn is_outage(&self) -> bool {
        matches!(self, AttemptError::Db(_) | AttemptError::Store(_))
    }
}
