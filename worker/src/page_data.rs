//! Page changes: fetch the Page's metadata from the Graph API and write that one Page's
//! `page_data.json` (never a token), only when it changed.
//!
//! [`PageDataJob::refresh`] is one unit of work. Transient failures (Graph 5xx and rate limits,
//! store errors and SlowDown) are retried under the retry policy; what cannot succeed comes back
//! as a [`DeadLetterInfo`] for the caller to park in the DLQ.

use std::sync::Arc;

use bytes::Bytes;
use fbsync_shared::budget::PutBudget;
use fbsync_shared::config::RetrySettings;
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::db::Database;
use fbsync_shared::event::JobKind;
use fbsync_shared::graph::{GraphClient, GraphError};
use fbsync_shared::now_ms;
use fbsync_shared::retry::{RetryClass, retry};
use fbsync_shared::store::{ObjectStore, StoreError, WriteCondition, page_data_key};
use fbsync_shared::telemetry::OBJECT_WRITES;

use crate::dead_letter::{DeadLetterInfo, DeadReason};

/// What a refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageDataOutcome {
    Written,
    Unchanged,
}

/// Everything a page-change job needs.
pub struct PageDataJob {
    pub db: Database,
    pub store: Arc<dyn ObjectStore>,
    pub cipher: TokenCipher,
    pub graph: GraphClient,
    pub retry: RetrySettings,
    pub put_budget: PutBudget,
}

/// A store failure, or a PUT that must wait for the object's budget.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Db(String),
    #[error("waiting for the object's PUT budget")]
    Budget(std::time::Duration),
}

impl RetryClass for WriteError {
    fn is_transient(&self) -> bool {
        match self {
            WriteError::Store(e) => e.is_transient(),
            WriteError::Db(_) | WriteError::Budget(_) => true,
        }
    }
    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            WriteError::Budget(wait) => Some(*wait),
            _ => None,
        }
    }
}

impl PageDataJob {
    /// Refreshes `page_data.json` of `page_id`.
    pub async fn refresh(&self, page_id: &str) -> Result<PageDataOutcome, DeadLetterInfo> {
        let first_failure = now_ms();
        let dead = |reason: DeadReason, error: String, attempts: u32| {
            DeadLetterInfo::new(
                reason,
                error,
                attempts,
                JobKind::PageChange.as_str(),
                first_failure,
                now_ms(),
            )
        };
        let owner = self
            .db
            .page_owner(page_id)
            .await
            .map_err(|e| dead(DeadReason::AttemptsExhausted, e.to_string(), 1))?;
        let Some((user_uuid, sealed, _status)) = owner else {
            return Err(dead(
                DeadReason::UnknownPage,
                format!("page {page_id} is not registered"),
                1,
            ));
        };
        let token = self
            .cipher
            .open(page_id, &sealed)
            .map_err(|e| dead(DeadReason::TokenError, e.to_string(), 1))?;

        let fetched = retry(&self.retry, "graph_page_metadata", || {
            self.graph.page_metadata(page_id, &token)
        })
        .await;
        let metadata = match fetched {
            Ok(metadata) => metadata,
            Err(exhausted) => {
                let attempts = exhausted.attempts;
                return Err(match exhausted.error {
                    GraphError::TokenInvalid { message } => {
                        let note = format!("token rejected (190): {message}");
                        if let Err(e) = self
                            .db
                            .mark_page_error(page_id, Some("needs_reauth"), &note, now_ms())
                            .await
                        {
                            tracing::error!(page_id, error = %e, "could not flag the Page for re-authorisation");
                        }
                        tracing::warn!(
                            page_id,
                            "Page token rejected; the Page needs re-authorisation"
                        );
                        dead(DeadReason::TokenError, note, attempts)
                    }
                    GraphError::Permanent(message) => {
                        dead(DeadReason::GraphError, message, attempts)
                    }
                    other => dead(DeadReason::AttemptsExhausted, other.to_string(), attempts),
                });
            }
        };
        let body = Bytes::from(serde_json::to_vec(&metadata).expect("JSON values serialise"));
        let key = page_data_key(&user_uuid, page_id);
        let written = retry(&self.retry, "page_data_write", || {
            self.write_if_changed(&key, body.clone())
        })
        .await;
        match written {
            Ok(outcome) => {
                if outcome == PageDataOutcome::Written {
                    metrics::counter!(OBJECT_WRITES, "object" => "page_data").increment(1);
                    let _ = self.db.mark_page_flushed(page_id, now_ms()).await;
                }
                Ok(outcome)
            }
            Err(exhausted) => Err(dead(
                DeadReason::AttemptsExhausted,
                exhausted.error.to_string(),
                exhausted.attempts,
            )),
        }
    }

    async fn write_if_changed(
        &self,
        key: &str,
        body: Bytes,
    ) -> Result<PageDataOutcome, WriteError> {
        let current = self.store.get(key).await?;
        if current.as_ref().is_some_and(|object| object.body == body) {
            return Ok(PageDataOutcome::Unchanged);
        }
        let condition = WriteCondition::after_read(current.as_ref());
        let now = now_ms();
        let reserved = self
            .db
            .reserve_object_put(key, &self.put_budget, now)
            .await
            .map_err(|e| WriteError::Db(e.to_string()))?;
        if let Some(at) = reserved {
            return Err(WriteError::Budget(std::time::Duration::from_millis(
                (at - now).max(0) as u64,
            )));
        }
        self.store.put(key, body, &condition).await?;
        Ok(PageDataOutcome::Written)
    }
}
