//! The flusher: moves staged events into their conversation objects, one write per
//! conversation per flush, within Spaces' budgets.
//!
//! For each due conversation: claim its lease, read the object, merge every staged event,
//! write once if the content changed, then delete exactly the staged rows that are now stored.
//! Any failure leaves the staged rows in place and schedules the conversation again with
//! backoff: a storage outage delays, it never loses or dead-letters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fbsync_shared::budget::{BucketBudget, PutBudget};
use fbsync_shared::config::{RetrySettings, Settings};
use fbsync_shared::db::{Claim, Database, DbError, StagedEvent};
use fbsync_shared::event::EventSource;
use fbsync_shared::now_ms;
use fbsync_shared::retry::delay_after_failures;
use fbsync_shared::store::{ObjectStore, StoreError, WriteCondition, conversation_key};
use fbsync_shared::telemetry::{FLUSHES, OBJECT_WRITES, VISIBILITY_SECONDS};
use futures::StreamExt;

use crate::merge::{IncomingEvent, merge_events};

/// What happened to one claimed conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// The object was written.
    Written,
    /// The merge changed nothing; staged rows were cleared without a write.
    Unchanged,
    /// The budget did not allow a write yet; tried again when it does.
    Deferred,
    /// Reading, merging or writing failed; staged rows kept, retried with backoff.
    Failed,
}

/// Counts of one [`Flusher::flush_due`] round.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    pub claimed: usize,
    pub written: usize,
    pub unchanged: usize,
    pub deferred: usize,
    pub failed: usize,
}

/// Flushes due conversations; several flushers (in one or many processes) can run at once.
pub struct Flusher {
    /// Staged events, leases and budgets.
    db: Database,
    /// Where conversation objects live.
    store: Arc<dyn ObjectStore>,
    /// Names this flusher's leases; unique per process.
    owner: String,
    /// Per-object PUT budget.
    put_budget: PutBudget,
    /// Per-bucket request budget.
    bucket_budget: BucketBudget,
    /// How long a claim lasts if this process dies mid-flush.
    lease: Duration,
    /// Conversations claimed (and flushed concurrently) per round.
    batch: u32,
    /// Backoff for failed flushes.
    retry: RetrySettings,
    /// Page owners recently read: Page id -> (user UUID, when read).
    owners: Mutex<HashMap<String, (String, Instant)>>,
}

/// How long a cached Page owner is trusted.
const OWNER_CACHE_TTL: Duration = Duration::from_secs(10);

impl Flusher {
    pub fn new(settings: &Settings, db: Database, store: Arc<dyn ObjectStore>) -> Self {
        Self {
            db,
            store,
            owner: format!("flusher-{}", uuid::Uuid::new_v4().simple()),
            put_budget: PutBudget::from_settings(&settings.storage),
            bucket_budget: BucketBudget::from_settings(&settings.storage),
            lease: settings.worker.lease,
            batch: settings.worker.flush_batch.max(1),
            retry: settings.retry.clone(),
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// One unit of work: claims up to a batch of due conversations and flushes them
    /// concurrently. Tests call this directly; the worker calls it in a loop.
    pub async fn flush_due(&self) -> Result<FlushReport, DbError> {
        let now = now_ms();
        let due = self.db.due_conversations(now, self.batch).await?;
        let mut claims = Vec::with_capacity(due.len());
        for key in due {
            if let Some(claim) = self
                .db
                .claim_conversation(&key, &self.owner, now, self.lease)
                .await?
            {
                claims.push(claim);
            }
        }
        let mut report = FlushReport {
            claimed: claims.len(),
            ..Default::default()
        };
        let outcomes: Vec<Result<FlushOutcome, DbError>> = futures::stream::iter(claims)
            .map(|claim| self.flush_or_release(claim))
            .buffer_unordered(self.batch as usize)
            .collect()
            .await;
        for outcome in outcomes {
            match outcome? {
                FlushOutcome::Written => report.written += 1,
                FlushOutcome::Unchanged => report.unchanged += 1,
                FlushOutcome::Deferred => report.deferred += 1,
                FlushOutcome::Failed => report.failed += 1,
            }
        }
        Ok(report)
    }

    /// The owner of a Page, from a cache that forgets after [`OWNER_CACHE_TTL`] (every flush
    /// needs it, and it almost never changes).
    async fn page_owner(&self, page_id: &str) -> Result<Option<String>, DbError> {
        if let Some((owner, at)) = self
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(page_id)
            && at.elapsed() < OWNER_CACHE_TTL
        {
            return Ok(Some(owner.clone()));
        }
        let owner = self
            .db
            .page_owner(page_id)
            .await?
            .map(|(user_uuid, _, _)| user_uuid);
        if let Some(owner) = &owner {
            self.owners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(page_id.to_string(), (owner.clone(), Instant::now()));
        }
        Ok(owner)
    }

    /// Flushes a claimed conversation; if the database fails midway, gives the claim back
    /// (best effort) so the conversation is not locked out for a whole lease.
    async fn flush_or_release(&self, mut claim: Claim) -> Result<FlushOutcome, DbError> {
        match self.flush_claimed(&mut claim).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                let retry_at =
                    now_ms() + i64::try_from(self.retry.base_delay.as_millis()).unwrap_or(1_000);
                if let Err(release) = self
                    .db
                    .fail_flush(&claim, &self.owner, &e.to_string(), retry_at)
                    .await
                {
                    tracing::debug!(error = %release, "could not give the claim back; it expires with its lease");
                }
                Err(e)
            }
        }
    }

    async fn flush_claimed(&self, claim: &mut Claim) -> Result<FlushOutcome, DbError> {
        let now = now_ms();
        let key = claim.key.clone();
        let Some(user_uuid) = self.page_owner(&key.page_id).await? else {
            // Staged before the Page was removed: keep the events, look again later.
            self.db
                .fail_flush(
                    claim,
                    &self.owner,
                    "the Page is not registered",
                    now + 60_000,
                )
                .await?;
            return Ok(FlushOutcome::Failed);
        };
        let next_put = self.put_budget.next_put_at(&claim.recent_puts, now);
        if next_put > now {
            self.db.defer_flush(claim, &self.owner, next_put).await?;
            return Ok(FlushOutcome::Deferred);
        }
        if !self.bucket_budget.is_unlimited()
            && !self
                .db
                .take_bucket_budget(now, 1, 2, &self.bucket_budget)
                .await?
        {
            let next_window =
                now - now.rem_euclid(self.bucket_budget.window_ms) + self.bucket_budget.window_ms;
            self.db.defer_flush(claim, &self.owner, next_window).await?;
            return Ok(FlushOutcome::Deferred);
        }
        let staged = self.db.staged_events(&key).await?;
        if staged.is_empty() {
            // Another flush stored them already; only the generation needs marking.
            self.db
                .finish_flush(claim, &self.owner, &[], now, now)
                .await?;
            return Ok(FlushOutcome::Unchanged);
        }
        let object_key = conversation_key(&user_uuid, &key.page_id, &key.user_psid);
        let stored = match self.store.get(&object_key).await {
            Ok(stored) => stored,
            Err(e) => return self.failed(claim, &e.to_string(), &e).await,
        };
        let incoming: Vec<IncomingEvent<'_>> = staged
            .iter()
            .map(|event| IncomingEvent {
                body: &event.body,
                source: if event.source == "poll" {
                    EventSource::Poll
                } else {
                    EventSource::Webhook
                },
            })
            .collect();
        let condition = WriteCondition::after_read(stored.as_ref());
        let stored_body = stored.as_ref().map(|object| object.body.as_ref());
        let merged = match merge_events(&key.page_id, stored_body, &incoming) {
            Ok(merged) => merged,
            Err(e) => {
                tracing::error!(page_id = %key.page_id, user_psid = %key.user_psid, error = %e, "conversation object cannot be merged; staged events kept");
                let permanent = StoreError::Permanent(e.to_string());
                return self.failed(claim, &e.to_string(), &permanent).await;
            }
        };
        let seqs: Vec<i64> = staged.iter().map(|event| event.seq).collect();
        if !merged.changed {
            self.db
                .finish_flush(claim, &self.owner, &seqs, now, now)
                .await?;
            metrics::counter!(FLUSHES, "outcome" => "unchanged").increment(1);
            return Ok(FlushOutcome::Unchanged);
        }
        self.db
            .record_put_attempt(
                claim,
                &self.owner,
                now_ms(),
                self.put_budget.puts_per_window as usize,
            )
            .await?;
        if let Err(e) = self
            .store
            .put(&object_key, merged.body.into(), &condition)
            .await
        {
            return self.failed(claim, &e.to_string(), &e).await;
        }
        let written_at = now_ms();
        let due_at = self.put_budget.next_put_at(&claim.recent_puts, written_at);
        self.db
            .finish_flush(claim, &self.owner, &seqs, due_at, written_at)
            .await?;
        metrics::counter!(FLUSHES, "outcome" => "written").increment(1);
        metrics::counter!(OBJECT_WRITES, "object" => "conversation").increment(1);
        record_visibility(&staged, written_at);
        Ok(FlushOutcome::Written)
    }

    /// Keeps the staged rows and schedules the conversation again: after the retry policy's
    /// delay, and never before its PUT budget allows.
    async fn failed(
        &self,
        claim: &Claim,
        message: &str,
        error: &StoreError,
    ) -> Result<FlushOutcome, DbError> {
        let now = now_ms();
        let failures = u32::try_from(claim.failures + 1).unwrap_or(u32::MAX);
        let backoff = i64::try_from(delay_after_failures(&self.retry, failures).as_millis())
            .unwrap_or(i64::MAX / 4);
        let retry_at = (now + backoff).max(self.put_budget.next_put_at(&claim.recent_puts, now));
        if failures == 1 || failures.is_power_of_two() {
            tracing::warn!(
                page_id = %claim.key.page_id, user_psid = %claim.key.user_psid, failures,
                transient = error.is_transient(), error = message, "flush failed; staged events kept, will retry"
            );
        }
        self.db
            .fail_flush(claim, &self.owner, message, retry_at)
            .await?;
        metrics::counter!(FLUSHES, "outcome" => "failed").increment(1);
        Ok(FlushOutcome::Failed)
    }
}

/// Delivery-to-stored delay of each event just written.
fn record_visibility(staged: &[StagedEvent], written_at: i64) {
    for event in staged {
        let seconds = (written_at - event.received_at_ms).max(0) as f64 / 1000.0;
        metrics::histogram!(VISIBILITY_SECONDS).record(seconds);
    }
}
