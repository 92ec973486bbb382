//! Page changes: fetch the Page's metadata from the Graph API and write that one Page's
//! `page_data.json` (never a token), only when it changed.
//!
//! [`PageDataRefresher::refresh`] is one unit of work. Fetch, compare and write are retried together
//! under the retry policy, so a write that had to wait (a Graph rate limit, a store outage, the
//! object's or the bucket's budget) never stores metadata fetched before the wait. What cannot
//! succeed comes back as a dead letter; work interrupted by shutdown is given back.

use std::time::Duration;

use bytes::Bytes;
use fbsync_shared::config::RetrySettings;
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::facebook::graph::GraphClient;
use fbsync_shared::ids::PageId;
use fbsync_shared::now_ms;
use fbsync_shared::storage::budget::PutBudget;
use fbsync_shared::storage::budgeted_store::{BudgetedStore, PutShare};
use fbsync_shared::storage::db::{Budgets, PutReservation, Registry};
use fbsync_shared::storage::object_store::{ObjectKey, WriteCondition};
use fbsync_shared::telemetry::OBJECT_WRITES;
use tokio_util::sync::CancellationToken;

use super::attempt::{AttemptError, page_with_token};
use crate::runtime::settle::{JobError, page_step};

/// What a refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageDataOutcome {
    /// `page_data.json` was written.
    Written,
    /// It already held this metadata (or a newer fetch wrote it): nothing was written.
    Unchanged,
}

/// Refreshes a Page's `page_data.json`: the page-change handler, and the first step of polls
/// and onboarding.
pub struct PageDataRefresher {
    /// Objects' PUT budgets.
    pub budgets: Budgets,
    /// The Page registry.
    pub registry: Registry,
    /// Where `page_data.json` is read and written, within the bucket's budget.
    pub store: BudgetedStore,
    /// Opens the Page's token.
    pub cipher: TokenCipher,
    /// Fetches the Page's metadata.
    pub graph: GraphClient,
    /// Fetch, compare and write are retried together under the one policy.
    pub retry: RetrySettings,
    /// Each write takes the object's PUT budget.
    pub put_budget: PutBudget,
}

impl PageDataRefresher {
    /// Refreshes `page_data.json` of `page_id`: fetch, compare and write, retried together.
    pub async fn refresh(
        &self,
        page_id: &PageId,
        shutdown: &CancellationToken,
    ) -> Result<PageDataOutcome, JobError> {
        let outcome = page_step(
            &self.registry,
            page_id,
            &self.retry,
            "page_data",
            shutdown,
            || self.refresh_once(page_id),
        )
        .await?;
        if outcome == PageDataOutcome::Written {
            metrics::counter!(OBJECT_WRITES, "object" => "page_data").increment(1);
            if let Err(e) = self.registry.mark_page_flushed(page_id, now_ms()).await {
                tracing::warn!(%page_id, error = %e, "could not record the flush time");
            }
        }
        Ok(outcome)
    }

    /// One attempt: fetch, compare, write.
    async fn refresh_once(&self, page_id: &PageId) -> Result<PageDataOutcome, AttemptError> {
        let (page, token) = page_with_token(&self.registry, &self.cipher, page_id).await?;
        let Some(fetch) = self.registry.begin_metadata_fetch(page_id).await? else {
            return Err(AttemptError::UnknownPage(page_id.clone()));
        };
        let metadata = self.graph.page_metadata(page_id.as_str(), &token).await?;
        let body = Bytes::from(serde_json::to_vec(&metadata).expect("JSON values serialise"));
        let key = ObjectKey::page_data(&page.user_uuid, page_id);

        let current = self.store.get(&key).await?;
        if current.as_ref().is_some_and(|object| object.body == body) {
            return Ok(PageDataOutcome::Unchanged);
        }
        let condition = WriteCondition::after_read(current.as_ref());
        // Metadata from an older fetch than one already written is stale: drop it before it
        // takes any budget.
        if !self.registry.claim_metadata_write(page_id, fetch).await? {
            tracing::debug!(%page_id, fetch, "a newer fetch wrote page_data.json already");
            return Ok(PageDataOutcome::Unchanged);
        }
        // The bucket's slot first: a reserved PUT of the object is never wasted on a full
        // window (a slot that goes unused only makes the bucket's rate more conservative).
        let slot = self.store.put_slot(PutShare::none(), || true).await?;
        let reserved = self
            .budgets
            .reserve_object_put(&key, &self.put_budget, now_ms())
            .await?;
        if let PutReservation::NotBefore(at) = reserved {
            return Err(AttemptError::Budget(Duration::from_millis(
                (at - now_ms()).max(0) as u64,
            )));
        }
        slot.put(&key, body, &condition).await?;
        Ok(PageDataOutcome::Written)
    }
}
