//! The flusher: moves staged events into their conversation objects, one write per
//! conversation per flush, within Spaces' budgets.
//!
//! For each due conversation: claim it, learn the object (`baseline.rs`), merge every staged
//! event, reserve a PUT under the object's budget, write once if the content changed, then
//! finish the claim, which deletes exactly the staged rows that are now stored (`write.rs`).
//! The claim ([`ConversationClaim`]) fences every step after it: a flusher that stalled past
//! its lease finds the claim gone and sends nothing. Any failure leaves the staged rows in
//! place and schedules the conversation again with backoff: a storage outage delays, it never
//! loses or dead-letters. While the bucket's budget refuses flushes, claims are paced
//! (`pacing.rs`); a removed Page's events go to the dead-letter queue (`removed_page.rs`).
//!
//! Each flush runs in a `flush` span naming the Page, the person and the claim's generation,
//! so its log lines need not repeat them.

mod baseline;
mod outcome;
mod pacing;
mod removed_page;
mod write;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use fbsync_shared::config::{RetrySettings, Settings};
use fbsync_shared::now_ms;
use fbsync_shared::retry::{RetryClass, delay_after_failures, retry};
use fbsync_shared::storage::budget::PutBudget;
use fbsync_shared::storage::budgeted_store::BudgetedStore;
use fbsync_shared::storage::db::{
    ClaimError, ConversationClaim, Conversations, DbError, StagedEvent, Staging,
};
use fbsync_shared::storage::object_store::{ObjectKey, REQUEST_TIMEOUT, StoreError};
use fbsync_shared::telemetry::{FLUSHES, MERGES};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dead_letter::sender::DeadLetterSender;
use crate::folder_listing::RecentListings;
use crate::last_written::LastWritten;
use crate::merge::{IncomingEvent, Merged, merge_events};
use crate::runtime::health::Health;
use baseline::Baseline;
pub use outcome::{FlushOutcome, FlushReport};
use pacing::PacedClaims;

/// Flushes due conversations; several flushers (in one or many processes) can run at once.
pub struct Flusher {
    /// Conversation claims: which conversations are due, and whose they are.
    conversations: Conversations,
    /// The staged events a flush stores.
    staging: Staging,
    /// Where conversation objects live, behind the bucket's request budget.
    store: BudgetedStore,
    /// Names this flusher's leases; unique per process.
    owner: String,
    /// Per-object PUT budget.
    put_budget: PutBudget,
    /// How long a claim lasts if this process dies mid-flush.
    lease: Duration,
    /// Lease time a PUT must still have when it is sent: the store's request timeout, or half
    /// the lease when leases are shorter (tests).
    put_margin: Duration,
    /// Conversations claimed (and flushed concurrently) per round.
    batch: u32,
    /// The least time between two writes of one object (ms, WORKER_OBJECT_WRITE_GAP_MS):
    /// under load, events gather into fewer, larger writes instead of the object being
    /// copied whole as often as the flusher can.
    write_gap_ms: i64,
    /// Backoff for failed flushes.
    retry: RetrySettings,
    /// Where the events of a removed Page go.
    dead_letters: Arc<DeadLetterSender>,
    /// Told whether the store answers, so consumers pause while it does not.
    health: Arc<Health>,
    /// What this worker wrote last to each object: the next flush of it needs no GET.
    last_written: LastWritten,
    /// The store was found to honour conditional writes (the probe at start): an object a
    /// listing showed absent is written with `If-None-Match: *` without reading it first.
    /// Without them, every flush reads first.
    write_absent_unread: bool,
    /// Recent listings of Pages' folders, which spare the reads of new conversations.
    listings: RecentListings,
    /// When a flush last found no room in the bucket's budget (ms since the epoch): while that
    /// was lately, rounds claim no more than one window can take.
    bucket_refused_at: AtomicI64,
}

impl Flusher {
    /// A flusher for `store`; `conditions_honoured` is what the probe at start found.
    pub fn new(
        settings: &Settings,
        conversations: Conversations,
        staging: Staging,
        store: BudgetedStore,
        conditions_honoured: bool,
        dead_letters: Arc<DeadLetterSender>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            put_budget: store.limits().object,
            conversations,
            staging,
            store,
            dead_letters,
            health,
            owner: format!("flusher-{}", uuid::Uuid::new_v4().simple()),
            lease: settings.worker.lease,
            put_margin: REQUEST_TIMEOUT.min(settings.worker.lease / 2),
            batch: settings.worker.flush_batch.max(1),
            write_gap_ms: i64::try_from(settings.worker.object_write_gap.as_millis())
                .unwrap_or(i64::MAX),
            retry: settings.retry.clone(),
            write_absent_unread: conditions_honoured,
            last_written: LastWritten::default(),
            listings: RecentListings::default(),
            bucket_refused_at: AtomicI64::new(0),
        }
    }

    /// One unit of work: claims up to a batch of due conversations and flushes them
    /// concurrently. Tests call this directly; the worker runs [`Flusher::run`].
    pub async fn flush_due(&self) -> Result<FlushReport, DbError> {
        let mut claims = self
            .conversations
            .claim_due_conversations(&self.owner, now_ms(), self.lease, self.batch)
            .await?;
        self.learn_absent_objects(&mut claims).await;
        let mut report = FlushReport {
            claimed: claims.len(),
            ..Default::default()
        };
        let outcomes: Vec<Result<FlushOutcome, DbError>> = futures::stream::iter(claims)
            .map(|claim| self.flush(claim))
            .buffer_unordered(self.batch as usize)
            .collect()
            .await;
        for outcome in outcomes {
            report.count(outcome?);
        }
        Ok(report)
    }

    /// Flushes until `shutdown`, keeping up to a batch of flushes in flight: a due
    /// conversation is claimed as soon as a flush ends, so one flush that waits (for the
    /// bucket's budget, a slow store) never holds the others back. Each flush is a task of
    /// its own: it progresses (and gives its database connection back) while this loop waits
    /// for the database. Looks again after `interval` when nothing was due; on shutdown,
    /// finishes the flushes in flight.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut in_flight = tokio::task::JoinSet::new();
        let batch = self.batch as usize;
        // Claim again once this many slots are free (or none is in flight): a due query per
        // finished flush would cost the database more than it gains.
        let refill_at = (batch / 8).max(1);
        let mut paced = PacedClaims::default();
        while !shutdown.is_cancelled() {
            let free = batch - in_flight.len();
            let wanted = self.claims_wanted(free, &mut paced);
            let look_again = self.look_again_after(wanted, &paced, interval);
            if wanted > 0 && (free >= refill_at || in_flight.is_empty()) {
                let mut claims = self
                    .conversations
                    .claim_due_conversations(&self.owner, now_ms(), self.lease, wanted as u32)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "flusher could not reach the database");
                        Vec::new()
                    });
                self.learn_absent_objects(&mut claims).await;
                paced.claimed += claims.len();
                for claim in claims {
                    let flusher = self.clone();
                    in_flight.spawn(async move { flusher.flush(claim).await });
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(ended) = in_flight.join_next(), if !in_flight.is_empty() => {
                    match ended {
                        Ok(Err(e)) => tracing::warn!(error = %e, "a flush could not reach the database"),
                        Err(e) => tracing::error!(error = %e, "a flush task failed"),
                        Ok(Ok(_)) => {}
                    }
                }
                _ = tokio::time::sleep(look_again) => {}
            }
        }
        while in_flight.join_next().await.is_some() {}
    }

    /// Flushes one claimed conversation. A lost claim is an outcome, not an error: the worker
    /// that holds the conversation now does the work. When the database fails midway, the
    /// claim is given back (best effort) so the conversation is not locked out for a whole
    /// lease.
    async fn flush(&self, mut claim: ConversationClaim) -> Result<FlushOutcome, DbError> {
        let key = claim.key();
        let span = tracing::info_span!("flush", page_id = %key.page_id, user_psid = %key.user_psid, generation = claim.generation());
        async move {
            match self.flush_claimed(&mut claim).await {
                Ok(outcome) => {
                    // Counted here, not at each of the budgets' deferrals.
                    if outcome == FlushOutcome::Deferred {
                        metrics::counter!(FLUSHES, "outcome" => "deferred").increment(1);
                    }
                    Ok(outcome)
                }
                Err(ClaimError::Lost) => {
                    tracing::warn!("claim lost to another worker (this one stalled past its lease); nothing was written");
                    Ok(FlushOutcome::Lost)
                }
                Err(ClaimError::Db(error)) => {
                    // Dropped connections come in waves (a failover, a proxy restart): giving
                    // the claim back is retried under the policy, so one more dead connection
                    // does not hold the conversation for a whole lease.
                    let retry_at = now_ms()
                        + i64::try_from(self.retry.base_delay.as_millis()).unwrap_or(1_000);
                    let message = error.to_string();
                    let given_back =
                        retry(&self.retry, "give_back", &CancellationToken::new(), || {
                            claim.fail(&message, retry_at)
                        })
                        .await;
                    if let Err(release) = given_back {
                        tracing::debug!(error = ?release, "could not give the claim back; it expires with its lease");
                    }
                    Err(error)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The story of one flush, from the claim to its end.
    async fn flush_claimed(
        &self,
        claim: &mut ConversationClaim,
    ) -> Result<FlushOutcome, ClaimError> {
        let now = now_ms();
        let Some(user_uuid) = claim.owner().cloned() else {
            return self.dead_letter_removed_page(claim).await;
        };
        // Nothing is read or written before the object's budget allows a write.
        let next_put = claim.next_put_at(&self.put_budget, now);
        if next_put > now {
            claim.defer(next_put).await?;
            return Ok(FlushOutcome::Deferred);
        }
        let staged = self.staging.staged_events(claim.key()).await?;
        if staged.is_empty() {
            // Another flush stored them already; only the generation needs marking.
            claim.finish(&[], now, now).await?;
            return Ok(FlushOutcome::Unchanged);
        }
        let object_key = ObjectKey::conversation(&user_uuid, claim.key());
        let mut baseline = match self.baseline(claim, &object_key).await? {
            ControlFlow::Continue(baseline) => baseline,
            ControlFlow::Break(outcome) => return Ok(outcome),
        };
        let merged = match self.merge(claim, &mut baseline, &staged).await? {
            ControlFlow::Continue(merged) => merged,
            ControlFlow::Break(outcome) => return Ok(outcome),
        };
        if !merged.changed {
            return self
                .finish_unchanged(claim, &object_key, baseline, merged.index, &staged)
                .await;
        }
        self.write(claim, &object_key, baseline, merged, &staged)
            .await
    }

    /// Merges every staged event into the baseline. An object that cannot be read breaks with
    /// the conversation set aside: retrying cannot help and writing would destroy what is there
    /// (an operator fixes the object, then `fbsync pages requeue`).
    async fn merge(
        &self,
        claim: &mut ConversationClaim,
        baseline: &mut Baseline,
        staged: &[StagedEvent],
    ) -> Result<ControlFlow<FlushOutcome, Merged>, ClaimError> {
        let incoming: Vec<IncomingEvent<'_>> = staged
            .iter()
            .map(|event| IncomingEvent {
                body: &event.body,
                source: event.source,
            })
            .collect();
        let stored_body = baseline.stored.as_ref().map(|object| object.body.as_ref());
        let page_id = claim.key().page_id.clone();
        match merge_events(
            page_id.as_str(),
            stored_body,
            baseline.index.take(),
            &incoming,
        ) {
            Ok(merged) => {
                tracing::debug!(
                    events = merged.index.events,
                    appended = merged.appended,
                    read = baseline.read,
                    "merged"
                );
                let way = if merged.appended { "append" } else { "full" };
                metrics::counter!(MERGES, "way" => way).increment(1);
                Ok(ControlFlow::Continue(merged))
            }
            Err(e) => {
                tracing::error!(error = %e, "conversation object cannot be read; set aside with its staged events kept");
                claim.set_aside(&e.to_string()).await?;
                metrics::counter!(FLUSHES, "outcome" => "set_aside").increment(1);
                Ok(ControlFlow::Break(FlushOutcome::SetAside))
            }
        }
    }

    /// Keeps the staged rows and schedules the conversation again: after the retry policy's
    /// delay, and never before its PUT budget allows.
    async fn failed(
        &self,
        claim: &mut ConversationClaim,
        error: &StoreError,
    ) -> Result<FlushOutcome, ClaimError> {
        // A refused conditional write is the object changing under us, not the store failing.
        if !matches!(error, StoreError::Conflict) {
            self.health.set_store_up(false);
        }
        let now = now_ms();
        let failures = u32::try_from(claim.failures() + 1).unwrap_or(u32::MAX);
        let backoff = i64::try_from(delay_after_failures(&self.retry, failures).as_millis())
            .unwrap_or(i64::MAX / 4);
        let retry_at = (now + backoff).max(claim.next_put_at(&self.put_budget, now));
        if failures == 1 || failures.is_power_of_two() {
            tracing::warn!(
                failures,
                transient = error.is_transient(), error = %error, "flush failed; staged events kept, will retry"
            );
        }
        claim.fail(&error.to_string(), retry_at).await?;
        metrics::counter!(FLUSHES, "outcome" => "failed").increment(1);
        Ok(FlushOutcome::Failed)
    }
}
