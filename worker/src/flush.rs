//! The flusher: moves staged events into their conversation objects, one write per
//! conversation per flush, within Spaces' budgets.
//!
//! For each due conversation: claim it, read the object, merge every staged event, reserve a
//! PUT under the object's budget, write once if the content changed, then finish the claim
//! (which deletes exactly the staged rows that are now stored). The claim
//! ([`ConversationClaim`]) fences every step after it: a flusher that stalled past its lease
//! finds the claim gone and sends nothing. Any failure leaves the staged rows in place and
//! schedules the conversation again with backoff: a storage outage delays, it never loses or
//! dead-letters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use fbsync_shared::config::{RetrySettings, Settings};
use fbsync_shared::facebook::event::{EventFacts, EventKind, EventMessage, JobKind};
use fbsync_shared::ids::{ConversationKey, PageId, Psid, UserUuid};
use fbsync_shared::now_ms;
use fbsync_shared::queue::Outgoing;
use fbsync_shared::retry::{RetryClass, delay_after_failures, retry};
use fbsync_shared::storage::budget::{BucketBudget, PutBudget};
use fbsync_shared::storage::db::{
    ClaimError, ConversationClaim, Database, DbError, PutReservation, StagedEvent,
};
use fbsync_shared::storage::object_store::{
    ObjectStore, REQUEST_TIMEOUT, StoreError, StoredObject, WriteCondition, conversation_key,
};
use fbsync_shared::telemetry::{DEAD_LETTERED, FLUSHES, MERGES, OBJECT_WRITES, VISIBILITY_SECONDS};
use futures::StreamExt;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::sender::DeadLetterSender;
use crate::dead_letter::{DeadLetterInfo, DeadReason};
use crate::folder_listing::{NextStep, RecentListings, list_conversations};
use crate::last_written::LastWritten;
use crate::merge::{IncomingEvent, merge_events};
use crate::runtime::health::Health;

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
    /// The claim was lost to another worker (this one stalled past its lease): nothing sent.
    Lost,
    /// The stored object cannot be read: the conversation is set aside, its events kept.
    SetAside,
    /// The Page was removed: its staged events went to the dead-letter queue.
    PageRemoved,
}

/// Counts of one [`Flusher::flush_due`] round.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    pub claimed: usize,
    pub written: usize,
    pub unchanged: usize,
    pub deferred: usize,
    pub failed: usize,
    pub lost: usize,
    pub set_aside: usize,
    pub page_removed: usize,
}

impl FlushReport {
    fn count(&mut self, outcome: FlushOutcome) {
        match outcome {
            FlushOutcome::Written => self.written += 1,
            FlushOutcome::Unchanged => self.unchanged += 1,
            FlushOutcome::Deferred => self.deferred += 1,
            FlushOutcome::Failed => self.failed += 1,
            FlushOutcome::Lost => self.lost += 1,
            FlushOutcome::SetAside => self.set_aside += 1,
            FlushOutcome::PageRemoved => self.page_removed += 1,
        }
    }
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
    /// The store honours conditional writes (SPACES_CONDITIONAL_WRITES): an object a listing
    /// showed absent is written with `If-None-Match: *` without reading it first. Without
    /// them, every flush reads first.
    write_absent_unread: bool,
    /// Recent listings of Pages' folders, which spare the reads of new conversations.
    listings: RecentListings,
    /// When a flush last found no room in the bucket's budget (ms since the epoch): while that
    /// was lately, rounds claim no more than one window can take.
    bucket_refused_at: AtomicI64,
}

/// Claims made in one budget window, while the bucket's budget refuses flushes.
#[derive(Debug, Default)]
struct PacedClaims {
    /// The window (its start, ms) the count is for; 0 while claims are not paced.
    window: i64,
    /// Conversations claimed in it.
    claimed: usize,
}

/// How long the events of a removed Page wait before dead-lettering them is tried again.
const REMOVED_PAGE_RETRY_MS: i64 = 10_000;

/// How long a reserved PUT waits for a slot of the bucket's rate before it is deferred (and
/// what it would have written is read again).
const BUCKET_SLOT_WAIT: Duration = Duration::from_secs(2);

impl Flusher {
    pub fn new(
        settings: &Settings,
        db: Database,
        store: Arc<dyn ObjectStore>,
        dead_letters: Arc<DeadLetterSender>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            db,
            store,
            dead_letters,
            health,
            owner: format!("flusher-{}", uuid::Uuid::new_v4().simple()),
            put_budget: PutBudget::from_settings(&settings.storage),
            bucket_budget: BucketBudget::from_settings(&settings.storage),
            lease: settings.worker.lease,
            put_margin: REQUEST_TIMEOUT.min(settings.worker.lease / 2),
            batch: settings.worker.flush_batch.max(1),
            write_gap_ms: i64::try_from(settings.worker.object_write_gap.as_millis())
                .unwrap_or(i64::MAX),
            retry: settings.retry.clone(),
            write_absent_unread: settings.storage.conditional_writes,
            last_written: LastWritten::default(),
            listings: RecentListings::default(),
            bucket_refused_at: AtomicI64::new(0),
        }
    }

    /// One unit of work: claims up to a batch of due conversations and flushes them
    /// concurrently. Tests call this directly; the worker runs [`Flusher::run`].
    pub async fn flush_due(&self) -> Result<FlushReport, DbError> {
        let mut claims = self
            .db
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
            // Paced, with this window's claims made: look again when the next window begins.
            let look_again = if wanted == 0 && paced.window != 0 {
                let until_next = self.bucket_budget.next_window(now_ms()) - now_ms();
                interval.min(Duration::from_millis(
                    until_next.clamp(1, 1_000).unsigned_abs(),
                ))
            } else {
                interval
            };
            if wanted > 0 && (free >= refill_at || in_flight.is_empty()) {
                let mut claims = self
                    .db
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

    /// How many conversations to claim with `free` slots: all of them, but while the bucket's
    /// budget refuses flushes (one was deferred for it lately), no more per
    /// budget window than one window can take. Claimed beyond that, a conversation is read
    /// from the database and deferred again window after window: at twice the bucket's
    /// capacity that churn cost the worker 89 ms of CPU per write.
    fn claims_wanted(&self, free: usize, paced: &mut PacedClaims) -> usize {
        let now = now_ms();
        let refused_at = self.bucket_refused_at.load(Ordering::Relaxed);
        // Refusals come at the start of a window (what was deferred comes due then): paced
        // until a second and two windows pass without one.
        let paced_for = 1_000 + 2 * self.bucket_budget.window_ms;
        // (A clock stepped back makes the refusal look to come from the future: not lately.)
        if self.bucket_budget.is_unlimited() || !(0..paced_for).contains(&(now - refused_at)) {
            *paced = PacedClaims::default();
            return free;
        }
        let window = self.bucket_budget.window_start(now);
        if paced.window != window {
            *paced = PacedClaims { window, claimed: 0 };
        }
        // A flush takes at least a write and an operation: the tighter of the limited rates.
        let budget = &self.bucket_budget;
        let per_window = [budget.writes_per_second, budget.ops_per_second]
            .into_iter()
            .filter(|&per_second| per_second > 0)
            .map(|per_second| budget.most_in_one_window(per_second))
            .min()
            .unwrap_or(i64::MAX);
        let per_window = usize::try_from(per_window).unwrap_or(usize::MAX);
        per_window.saturating_sub(paced.claimed).min(free)
    }

    /// Notes that a flush found no room in the bucket's budget (see [`Self::claims_wanted`]).
    fn bucket_refused(&self) {
        self.bucket_refused_at.store(now_ms(), Ordering::Relaxed);
    }

    /// Spares the reads of new conversations: when a round claims several conversations of
    /// one Page that nothing has flushed yet (a burst of new people), a listing of the Page's
    /// folder (kept for the rounds after it) tells which objects are absent, and those are
    /// written without a read (see [`crate::folder_listing`]). Only with conditional writes; a
    /// Page whose folder is too big for the reads it would spare is not listed. A failed
    /// listing changes nothing: the flushes read first.
    async fn learn_absent_objects(&self, claims: &mut [ConversationClaim]) {
        if !self.write_absent_unread {
            return;
        }
        let mut new_by_page: HashMap<(UserUuid, PageId), Vec<usize>> = HashMap::new();
        for (at, claim) in claims.iter().enumerate() {
            if let Some(owner) = claim.owner()
                && claim.never_flushed()
                && !claim.object_known_absent()
            {
                let page = (owner.clone(), claim.key().page_id.clone());
                new_by_page.entry(page).or_default().push(at);
            }
        }
        for ((user_uuid, page_id), new) in new_by_page {
            let existing = match self.listings.next_step(&page_id, new.len()) {
                NextStep::Known(existing) => existing,
                NextStep::ReadEach => continue,
                NextStep::List { max_keys } => {
                    let listing = list_conversations(
                        &self.db,
                        self.store.as_ref(),
                        &self.bucket_budget,
                        &user_uuid,
                        &page_id,
                        max_keys,
                    )
                    .await;
                    let Some(existing) = self.listings.record(&page_id, listing) else {
                        continue;
                    };
                    tracing::debug!(%page_id, listed = existing.len(), "listed the Page's folder for new conversations");
                    existing
                }
            };
            let absent: Vec<usize> = new
                .into_iter()
                .filter(|&at| !existing.contains(claims[at].key().user_psid.as_str()))
                .collect();
            let psids: Vec<&Psid> = absent
                .iter()
                .map(|&at| &claims[at].key().user_psid)
                .collect();
            if let Err(e) = self.db.mark_objects_absent(&page_id, &psids).await {
                tracing::debug!(%page_id, error = %e, "could not record the listing; the flushes read first");
                continue;
            }
            for at in absent {
                claims[at].object_listed_absent();
            }
        }
    }

    /// Flushes one claimed conversation. A lost claim is an outcome, not an error: the worker
    /// that holds the conversation now does the work. When the database fails midway, the
    /// claim is given back (best effort) so the conversation is not locked out for a whole
    /// lease.
    async fn flush(&self, mut claim: ConversationClaim) -> Result<FlushOutcome, DbError> {
        match self.flush_claimed(&mut claim).await {
            Ok(outcome) => {
                // Counted here, not at each of the budgets' deferrals.
                if outcome == FlushOutcome::Deferred {
                    metrics::counter!(FLUSHES, "outcome" => "deferred").increment(1);
                }
                Ok(outcome)
            }
            Err(ClaimError::Lost) => {
                let key = claim.key();
                tracing::warn!(page_id = %key.page_id, user_psid = %key.user_psid, "claim lost to another worker (this one stalled past its lease); nothing was written");
                Ok(FlushOutcome::Lost)
            }
            Err(ClaimError::Db(error)) => {
                // Dropped connections come in waves (a failover, a proxy restart): giving the
                // claim back is retried under the policy, so one more dead connection does not
                // hold the conversation for a whole lease.
                let retry_at =
                    now_ms() + i64::try_from(self.retry.base_delay.as_millis()).unwrap_or(1_000);
                let message = error.to_string();
                let given_back = retry(&self.retry, "give_back", &CancellationToken::new(), || {
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

    /// The story of one flush, from the claim to its end.
    async fn flush_claimed(
        &self,
        claim: &mut ConversationClaim,
    ) -> Result<FlushOutcome, ClaimError> {
        let now = now_ms();
        let key = claim.key().clone();
        let Some(user_uuid) = claim.owner().cloned() else {
            return self.dead_letter_removed_page(claim).await;
        };
        // Nothing is read or written before the object's budget allows a write.
        let next_put = claim.next_put_at(&self.put_budget, now);
        if next_put > now {
            claim.defer(next_put).await?;
            return Ok(FlushOutcome::Deferred);
        }
        let staged = self.db.staged_events(&key).await?;
        let seqs: Vec<i64> = staged.iter().map(|event| event.seq).collect();
        if staged.is_empty() {
            // Another flush stored them already; only the generation needs marking.
            claim.finish(&[], now, now).await?;
            return Ok(FlushOutcome::Unchanged);
        }
        let object_key = conversation_key(&user_uuid, &key);
        let mut remembered = self.last_written.take(&object_key, claim.generation());
        let mut stored_read = false;
        // The bucket window that holds the PUT's share of the budget, when it was taken with
        // the GET's.
        let mut put_taken_in: Option<i64> = None;
        let (stored, index) =
            if let Some(object) = remembered.as_mut().and_then(|r| r.object.take()) {
                // This worker wrote it, and no claim came in between: it is still as written.
                (Some(object), remembered.map(|r| r.index))
            } else if self.write_absent_unread && claim.object_known_absent() {
                // A listing showed it absent and no flush has written it since: one request (the
                // PUT, `If-None-Match: *`) instead of two. Should it exist after all, the PUT is
                // refused, the flush fails, and the next one reads first.
                (None, None)
            } else {
                // The bucket's budget is charged right before the GET is sent, for the GET and
                // the PUT that usually follows it in the same window: when more flushes are due
                // than the bucket allows, no operation is spent on a read whose write then
                // finds no room.
                let now = now_ms();
                let limited = !self.bucket_budget.is_unlimited();
                if limited
                    && self
                        .db
                        .take_bucket_budget(now, 1, 2, &self.bucket_budget)
                        .await?
                {
                    put_taken_in = Some(self.bucket_budget.window_start(now));
                } else if limited {
                    self.bucket_refused();
                    claim
                        .defer(self.bucket_budget.next_window(now_ms()))
                        .await?;
                    return Ok(FlushOutcome::Deferred);
                }
                let stored = match self.store.get(&object_key).await {
                    Ok(stored) => {
                        self.health.set_store_up(true);
                        stored
                    }
                    Err(e) => return self.failed(claim, &e).await,
                };
                // Still the version this worker wrote (the object was too big to keep, or another
                // claim came in between and wrote nothing): its index spares the parse.
                stored_read = true;
                let index = remembered.and_then(|r| r.index_of(stored.as_ref()));
                (stored, index)
            };
        let incoming: Vec<IncomingEvent<'_>> = staged
            .iter()
            .map(|event| IncomingEvent {
                body: &event.body,
                source: event.source,
            })
            .collect();
        let stored_body = stored.as_ref().map(|object| object.body.as_ref());
        let merged = match merge_events(key.page_id.as_str(), stored_body, index, &incoming) {
            Ok(merged) => merged,
            Err(e) => {
                // Retrying cannot help and writing would destroy what is there: set it aside
                // until an operator fixes the object (`fbsync pages requeue`).
                tracing::error!(page_id = %key.page_id, user_psid = %key.user_psid, error = %e, "conversation object cannot be read; set aside with its staged events kept");
                claim.set_aside(&e.to_string()).await?;
                metrics::counter!(FLUSHES, "outcome" => "set_aside").increment(1);
                return Ok(FlushOutcome::SetAside);
            }
        };
        tracing::debug!(page_id = %key.page_id, user_psid = %key.user_psid, events = merged.index.events, appended = merged.appended, read = stored_read, "merged");
        let way = if merged.appended { "append" } else { "full" };
        metrics::counter!(MERGES, "way" => way).increment(1);
        if !merged.changed {
            self.give_back_put_share(put_taken_in).await;
            // Remembered before the claim ends: the next claim may start the moment it does.
            if let Some(object) = stored {
                self.last_written
                    .remember(&object_key, claim.generation(), object, merged.index);
            }
            claim.finish(&seqs, now, now).await?;
            metrics::counter!(FLUSHES, "outcome" => "unchanged").increment(1);
            return Ok(FlushOutcome::Unchanged);
        }
        // The PUT is recorded (and the lease renewed) before it is sent; once the claim is
        // gone, or about to go, it is not sent at all.
        if let PutReservation::NotBefore(at) = claim.reserve_put(&self.put_budget, now_ms()).await?
        {
            self.give_back_put_share(put_taken_in).await;
            claim.defer(at).await?;
            return Ok(FlushOutcome::Deferred);
        }
        // The PUT's object budget is reserved already: wait a few windows for the bucket's
        // rather than giving the reservation up, while the claim can still send; unless it was
        // taken with the GET's in the window that holds now (a request must land in the window
        // it was counted in: after a slow GET, that share is left unused in its window).
        let in_window = |window: i64| self.bucket_budget.window_start(now_ms()) == window;
        let slot = put_taken_in.is_some_and(in_window)
            || self
                .db
                .wait_for_bucket_slot(&self.bucket_budget, 1, 1, BUCKET_SLOT_WAIT, || {
                    claim.held_for(self.put_margin)
                })
                .await?;
        if !slot {
            self.bucket_refused();
            claim
                .defer(self.bucket_budget.next_window(now_ms()))
                .await?;
            return Ok(FlushOutcome::Deferred);
        }
        if !claim.held_for(self.put_margin) {
            return Err(ClaimError::Lost);
        }
        let condition = WriteCondition::after_read(stored.as_ref());
        let body = bytes::Bytes::from(merged.body);
        let version = match self.store.put(&object_key, body.clone(), &condition).await {
            Ok(version) => version,
            Err(e) => return self.failed(claim, &e).await,
        };
        self.health.set_store_up(true);
        let written_at = now_ms();
        let due_at = claim
            .next_put_at(&self.put_budget, written_at)
            .max(written_at.saturating_add(self.write_gap_ms));
        // Remembered before the claim ends: the next claim may start the moment it does. (If
        // the claim turns out lost, the entry's generation and version keep it from misleading
        // anyone.)
        if let Some(version) = version {
            let written = StoredObject { body, version };
            self.last_written
                .remember(&object_key, claim.generation(), written, merged.index);
        }
        claim.finish(&seqs, due_at, written_at).await?;
        metrics::counter!(FLUSHES, "outcome" => "written").increment(1);
        metrics::counter!(OBJECT_WRITES, "object" => "conversation").increment(1);
        record_visibility(&staged, written_at);
        Ok(FlushOutcome::Written)
    }

    /// Returns the PUT's share of the bucket's budget, taken with the GET's, when no PUT
    /// follows (best effort: a window that has passed keeps it, which only wastes it).
    async fn give_back_put_share(&self, taken_in: Option<i64>) {
        if let Some(window) = taken_in
            && let Err(e) = self.db.give_back_bucket_budget(window, 1, 1).await
        {
            tracing::debug!(error = %e, "could not give an unused write back to the bucket's budget");
        }
    }

    /// The conversation's Page was removed after its events were staged: the events go to the
    /// dead-letter queue (reason `page_removed`, replayable once the Page is added again) and
    /// leave the stage. If the dead letters cannot be confirmed, the events stay and the
    /// conversation is tried again later.
    async fn dead_letter_removed_page(
        &self,
        claim: &mut ConversationClaim,
    ) -> Result<FlushOutcome, ClaimError> {
        let key = claim.key().clone();
        let staged = self.db.staged_events(&key).await?;
        let now = now_ms();
        let info = DeadLetterInfo::new(
            DeadReason::PageRemoved,
            format!(
                "page {} was removed before these events were stored",
                key.page_id
            ),
            1,
            JobKind::Conversation.as_str(),
            now,
            now,
        );
        let letters: Vec<Outgoing> = staged
            .iter()
            .map(|event| {
                let message = queued_message(&key, event);
                let body = serde_json::to_vec(&message).unwrap_or_default();
                info.to_outgoing(self.dead_letters.topology(), &body, &event.event_id, None)
            })
            .collect();
        if let Err(e) = self.dead_letters.publish_letters(&letters).await {
            tracing::warn!(page_id = %key.page_id, error = %e, "events of a removed Page could not be dead-lettered yet");
            claim
                .fail(&e.to_string(), now + REMOVED_PAGE_RETRY_MS)
                .await?;
            return Ok(FlushOutcome::Failed);
        }
        let seqs: Vec<i64> = staged.iter().map(|event| event.seq).collect();
        claim.finish(&seqs, now, now).await?;
        metrics::counter!(DEAD_LETTERED, "reason" => DeadReason::PageRemoved.as_str())
            .increment(letters.len() as u64);
        tracing::warn!(page_id = %key.page_id, user_psid = %key.user_psid, events = letters.len(), "events of a removed Page moved to the dead-letter queue");
        Ok(FlushOutcome::PageRemoved)
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
                page_id = %claim.key().page_id, user_psid = %claim.key().user_psid, failures,
                transient = error.is_transient(), error = %error, "flush failed; staged events kept, will retry"
            );
        }
        claim.fail(&error.to_string(), retry_at).await?;
        metrics::counter!(FLUSHES, "outcome" => "failed").increment(1);
        Ok(FlushOutcome::Failed)
    }
}

/// A staged event as the conversation queue carries it, so a replay stages it again.
fn queued_message(key: &ConversationKey, event: &StagedEvent) -> EventMessage {
    let facts = serde_json::from_str(&event.body)
        .map(|value| EventFacts::of(key.page_id.as_str(), &value))
        .ok();
    EventMessage {
        page_id: key.page_id.to_string(),
        kind: facts.map_or(EventKind::Other, |facts| facts.kind),
        event_id: event.event_id.clone(),
        user_psid: Some(key.user_psid.to_string()),
        timestamp_ms: event.timestamp_ms,
        standby: false,
        source: event.source,
        received_at_ms: event.received_at_ms,
        // Staged bodies are the JSON text of an event, as received.
        event: RawValue::from_string(event.body.clone()).unwrap_or_else(|_| null_event()),
    }
}

/// A JSON `null`, for a staged body that is somehow not JSON (it then dead-letters as malformed
/// on replay instead of being lost).
fn null_event() -> Box<RawValue> {
    serde_json::value::to_raw_value(&serde_json::Value::Null).unwrap_or_default()
}

/// Delivery-to-stored delay of each event just written.
fn record_visibility(staged: &[StagedEvent], written_at: i64) {
    for event in staged {
        let seconds = (written_at - event.received_at_ms).max(0) as f64 / 1000.0;
        metrics::histogram!(VISIBILITY_SECONDS).record(seconds);
    }
}
