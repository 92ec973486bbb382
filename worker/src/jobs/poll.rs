//! Poll jobs: one Page's metadata and Messenger conversations from the Graph API, staged exactly
//! as webhook events are, so the flusher's budgets cover polled writes and a message that came
//! both ways is stored once (the webhook copy wins).
//!
//! [`Poller::run`] is one unit of work. The poll is leased to one worker ([`PollLease`], fenced
//! by generation) and walks the conversations page by page, newest update first, following
//! `paging.next` at both levels. Each page of conversations is staged before the link to the
//! next one is saved, so a poll that stops (a long rate limit parks the job; a crash; shutdown)
//! resumes at the first page not fully staged, and memory holds one page at a time. A daily poll
//! stops at the first conversation not updated since the last complete poll began, and inside a
//! conversation at the first message older than that; a backfill reads everything.
//!
//! A message whose details the Graph API withholds (older than a conversation's 20 most recent)
//! is asked for once; the refusal is counted per Page, never retried, and the poll goes on.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::config::RetrySettings;
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::facebook::conversations::{
    Conversation, ConversationsPage, GraphMessage, MessagesPage, Paging, reconstruct,
};
use fbsync_shared::facebook::event::EventSource;
use fbsync_shared::facebook::graph::{GraphClient, GraphError};
use fbsync_shared::ids::{ConversationKey, PageId, Psid};
use fbsync_shared::jobs::PollRequest;
use fbsync_shared::now_ms;
use fbsync_shared::retry::{RetryError, retry};
use fbsync_shared::storage::budgeted_store::BudgetedStore;
use fbsync_shared::storage::db::{
    Conversations, DbError, NewStagedEvent, PageStatus, PollCounts, PollLease, PollStart, Polls,
    Registry, Staging,
};
use fbsync_shared::telemetry::{POLL_MESSAGES, POLLS};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use super::page_change::PageDataRefresher;
use crate::dead_letter::DeadReason;
use crate::folder_listing::{FolderListing, list_conversations};
use crate::runtime::settle::{JobError, page_step, page_step_failed, step};

/// Polls a Page: its metadata, then its conversations from the Graph API into the stage.
pub struct Poller {
    /// Conversation claims and absent marks.
    pub conversations: Conversations,
    /// Poll progress and leases.
    pub polls: Polls,
    /// The Page registry.
    pub registry: Registry,
    /// The stage.
    pub staging: Staging,
    /// The Graph API.
    pub graph: GraphClient,
    /// Opens the Page's token.
    pub cipher: TokenCipher,
    /// The retry policy for Graph calls and database steps.
    pub retry: RetrySettings,
    /// How long the poll stays leased to this worker after each saved step.
    pub lease: Duration,
    /// The poll's first step: `page_data.json`, written only when it changed.
    pub page_data: Arc<PageDataRefresher>,
    /// Where a backfill lists the conversation objects that exist already (each listing
    /// request within the bucket's budget).
    pub store: BudgetedStore,
    /// The store honours conditional writes: a backfill lists what exists, and the first
    /// flush of a conversation whose object is absent writes without reading.
    pub list_before_backfill: bool,
}

/// A listing stops (and the flusher reads every object first) beyond this many keys, so a
/// backfill's memory stays bounded whatever the Page's size.
const LISTED_KEYS_MAX: usize = 200_000;

/// What a poll did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Conversations read.
    pub conversations: i64,
    /// Messages found, new and withheld.
    pub counts: PollCounts,
    /// False when another worker took the poll over (this one stopped).
    pub complete: bool,
}

/// What every step of one walk through a Page's conversations shares.
#[derive(Clone, Copy)]
struct Walk<'a> {
    page_id: &'a PageId,
    /// The poll's lease: steps are saved under it, and end when it is lost.
    lease: &'a PollLease,
    /// Conversations and messages older than this were read by an earlier poll.
    since: Option<i64>,
    token: &'a SecretString,
    shutdown: &'a CancellationToken,
    /// The Page's conversation objects a listing found (backfills with conditional writes):
    /// the others are marked absent before their events are staged.
    existing: Option<&'a HashSet<String>>,
}

/// How a walk through the conversations ended without a failure.
enum WalkEnd {
    /// Every page read: the poll is complete.
    Complete,
    /// The lease was lost to another worker, which goes on from the last saved step.
    TakenOver,
}

impl Poller {
    /// Polls the Page `request` names.
    pub async fn run(
        &self,
        request: &PollRequest,
        shutdown: &CancellationToken,
    ) -> Result<PollReport, JobError> {
        let page_id =
            PageId::parse(&request.page_id).map_err(|e| JobError::malformed(e.to_string()))?;
        let lease_ms = self.lease.as_millis() as i64;
        let begun = self
            .db_step(shutdown, || {
                self.polls.begin_poll(
                    &page_id,
                    request.backfill,
                    request.since_ms,
                    lease_ms,
                    now_ms(),
                )
            })
            .await?;
        let lease = match begun {
            PollStart::Leased(lease) => lease,
            PollStart::Busy { until_ms } => {
                // Another worker polls this Page; come back when its lease would have ended.
                let wait = (until_ms - now_ms()).max(0) as u64 + 1_000;
                tracing::info!(%page_id, wait_ms = wait, "the Page is being polled by another worker; parked");
                return Err(JobError::Wait(Duration::from_millis(wait)));
            }
        };
        metrics::counter!(POLLS, "outcome" => "started").increment(1);
        tracing::info!(
            %page_id,
            backfill = lease.is_backfill(),
            resumed = lease.resume_url.is_some(),
            requested_by = %request.requested_by,
            "poll started"
        );
        let mut report = PollReport::default();
        let walked = self.walk(&page_id, &lease, &mut report, shutdown).await;
        match walked {
            Ok(WalkEnd::Complete) => {
                let finished = self
                    .db_step(shutdown, || {
                        self.polls.finish_poll(&page_id, &lease, now_ms())
                    })
                    .await?;
                report.complete = finished;
                metrics::counter!(POLLS, "outcome" => "finished").increment(1);
                tracing::info!(
                    %page_id,
                    conversations = report.conversations,
                    found = report.counts.found,
                    new = report.counts.new,
                    details_unavailable = report.counts.details_unavailable,
                    "poll finished"
                );
                Ok(report)
            }
            Ok(WalkEnd::TakenOver) => {
                tracing::warn!(%page_id, "another worker took the poll over; stopping");
                Ok(report)
            }
            Err(failure) => {
                // Its progress stays; the next job of the Page resumes it at once.
                if let Err(e) = self.polls.release_poll(&page_id, &lease).await {
                    tracing::warn!(%page_id, error = %e, "could not release the poll's lease; it ends by itself");
                }
                if let JobError::Failed { .. } = &failure {
                    // `fbsync poll --wait` recognises a failed poll by this prefix.
                    let note = format!("poll failed: {failure}");
                    if let Err(e) = self
                        .registry
                        .mark_page_error(&page_id, None, &note, now_ms())
                        .await
                    {
                        tracing::warn!(%page_id, error = %e, "could not record the poll's failure");
                    }
                }
                if let JobError::Wait(wait) = &failure {
                    tracing::info!(%page_id, wait_secs = wait.as_secs(), "the poll is parked and resumes where it stopped");
                }
                metrics::counter!(POLLS, "outcome" => failure.outcome()).increment(1);
                Err(failure)
            }
        }
    }

    /// Metadata first, then every page of conversations from where the poll stands.
    async fn walk(
        &self,
        page_id: &PageId,
        lease: &PollLease,
        report: &mut PollReport,
        shutdown: &CancellationToken,
    ) -> Result<WalkEnd, JobError> {
        let Some(page) = self
            .db_step(shutdown, || self.registry.page(page_id))
            .await?
        else {
            return Err(JobError::failed(
                DeadReason::UnknownPage,
                format!("page {page_id} is not registered"),
            ));
        };
        if page.status == PageStatus::NeedsReauth {
            return Err(JobError::failed(
                DeadReason::TokenError,
                "the Page's token was rejected before; the owner must connect the Page again",
            ));
        }
        let token = self
            .cipher
            .open(page_id.as_str(), &page.token_sealed)
            .map_err(|e| JobError::failed(DeadReason::TokenError, e.to_string()))?;
        self.page_data.refresh(page_id, shutdown).await?;

        let since = (!lease.is_backfill()).then_some(lease.since_ms).flatten();
        // Reading the whole history: most of it is new to the bucket, and one listing spares
        // a read per new conversation.
        let existing = match since {
            None if self.list_before_backfill => {
                match list_conversations(&self.store, &page.user_uuid, page_id, LISTED_KEYS_MAX)
                    .await
                {
                    FolderListing::Complete(existing) => Some(existing),
                    FolderListing::TooLong(_) | FolderListing::Failed => None,
                }
            }
            _ => None,
        };
        let walk = Walk {
            page_id,
            lease,
            since,
            token: &token,
            shutdown,
            existing: existing.as_ref(),
        };
        let mut next = lease.resume_url.clone();
        loop {
            let conversations: ConversationsPage = self
                .graph_step(page_id, shutdown, || {
                    self.graph
                        .conversations(page_id.as_str(), next.as_deref(), &token)
                })
                .await?;
            let mut counts = PollCounts::default();
            let mut reached_cutoff = false;
            for conversation in &conversations.data {
                let updated = conversation.updated_ms();
                if let (Some(since), Some(updated)) = (since, updated)
                    && updated < since
                {
                    reached_cutoff = true;
                    break;
                }
                let read = self.read_conversation(&walk, conversation).await?;
                let Some(read) = read else {
                    return Ok(WalkEnd::TakenOver);
                };
                counts += read;
                report.conversations += 1;
            }
            let following = match Paging::next_of(&conversations.paging) {
                Some(link) if !reached_cutoff => Some(self.kept_link(page_id, link).await?),
                _ => None,
            };
            let until = now_ms() + self.lease.as_millis() as i64;
            let saved = self
                .db_step(shutdown, || {
                    self.polls
                        .save_poll_step(page_id, lease, following.as_deref(), counts, until)
                })
                .await?;
            metrics::counter!(POLL_MESSAGES, "result" => "found").increment(counts.found as u64);
            metrics::counter!(POLL_MESSAGES, "result" => "new").increment(counts.new as u64);
            metrics::counter!(POLL_MESSAGES, "result" => "details_unavailable")
                .increment(counts.details_unavailable as u64);
            report.counts += counts;
            if !saved {
                return Ok(WalkEnd::TakenOver);
            }
            match following {
                Some(link) => next = Some(link),
                None => return Ok(WalkEnd::Complete),
            }
        }
    }

    /// Stages one conversation's messages, page by page; `None` when the lease was lost.
    async fn read_conversation(
        &self,
        walk: &Walk<'_>,
        conversation: &Conversation,
    ) -> Result<Option<PollCounts>, JobError> {
        let Walk {
            page_id,
            lease,
            since,
            token,
            shutdown,
            existing,
        } = *walk;
        let mut counts = PollCounts::default();
        let mut messages: MessagesPage = conversation.messages.clone().unwrap_or_default();
        let mut lease_renewed = now_ms();
        loop {
            let mut events = Vec::with_capacity(messages.data.len());
            let mut older_than_since = false;
            for message in &messages.data {
                if let (Some(since), Some(created)) = (since, message.created_ms())
                    && created < since
                {
                    // Newest first: the rest was read by an earlier poll.
                    older_than_since = true;
                    break;
                }
                counts.found += 1;
                let Some(detailed) = self.details(page_id, message, token, shutdown).await? else {
                    counts.details_unavailable += 1;
                    continue;
                };
                if let Some(event) = self.staged_event(page_id, &detailed) {
                    events.push(event);
                }
            }
            if let Some(existing) = existing
                && !events.is_empty()
            {
                // Marked before staging: a flush claiming the conversation in between would
                // read the object.
                let mut absent: Vec<&Psid> = events
                    .iter()
                    .map(|event| &event.key.user_psid)
                    .filter(|psid| !existing.contains(psid.as_str()))
                    .collect();
                absent.sort();
                absent.dedup();
                self.db_step(shutdown, || {
                    self.conversations.mark_objects_absent(page_id, &absent)
                })
                .await?;
            }
            if !events.is_empty() {
                let staged = self
                    .db_step(shutdown, || self.staging.stage_events(&events, now_ms()))
                    .await?;
                counts.new += staged as i64;
            }
            let next = Paging::next_of(&messages.paging).filter(|_| !older_than_since);
            let Some(next) = next else {
                return Ok(Some(counts));
            };
            // A long conversation may take longer than the lease: renew it on the way.
            let lease_ms = self.lease.as_millis() as i64;
            if now_ms() - lease_renewed > lease_ms / 3 {
                let renewed = self
                    .db_step(shutdown, || {
                        self.polls.renew_poll(page_id, lease, now_ms() + lease_ms)
                    })
                    .await?;
                if !renewed {
                    return Ok(None);
                }
                lease_renewed = now_ms();
            }
            let link = self.kept_link(page_id, next).await?;
            messages = self
                .graph_step(page_id, shutdown, || self.graph.messages(&link, token))
                .await?;
        }
    }

    /// The message with its details: as given, or asked for once. `None` when the Graph API
    /// withholds them (an older message); rate limits and outages are retried as any call.
    async fn details(
        &self,
        page_id: &PageId,
        message: &GraphMessage,
        token: &SecretString,
        shutdown: &CancellationToken,
    ) -> Result<Option<GraphMessage>, JobError> {
        if message.has_details() {
            return Ok(Some(message.clone()));
        }
        let started = now_ms();
        let asked = retry(&self.retry, "poll_graph", shutdown, || {
            self.graph.message(&message.id, token)
        })
        .await;
        match asked {
            Ok(detailed) if detailed.has_details() => Ok(Some(detailed)),
            Ok(_) => Ok(None),
            Err(RetryError::Failed {
                error: GraphError::Permanent(reason),
                ..
            }) => {
                tracing::debug!(%page_id, message_id = %message.id, %reason, "message details withheld");
                Ok(None)
            }
            Err(failure) => {
                Err(page_step_failed(&self.registry, page_id, failure, &self.retry, started).await)
            }
        }
    }

    /// A reconstructed message as a staged row of its conversation.
    fn staged_event(&self, page_id: &PageId, message: &GraphMessage) -> Option<NewStagedEvent> {
        let event = reconstruct(page_id.as_str(), message)?;
        let user_psid = Psid::parse(&event.user_psid).ok()?;
        Some(NewStagedEvent {
            key: ConversationKey {
                page_id: page_id.clone(),
                user_psid,
            },
            event_id: event.event_id,
            source: EventSource::Poll,
            timestamp_ms: event.timestamp_ms,
            received_at_ms: now_ms(),
            body: event.body,
        })
    }

    /// A `paging.next` link as it may be followed and kept; one that leaves the Graph API ends
    /// the poll.
    async fn kept_link(&self, page_id: &PageId, link: &str) -> Result<String, JobError> {
        match self.graph.paging_link(link) {
            Ok(link) => Ok(link),
            Err(error) => {
                let failure = RetryError::Failed { error, attempts: 1 };
                Err(page_step_failed(&self.registry, page_id, failure, &self.retry, now_ms()).await)
            }
        }
    }

    /// A Graph call for the Page under the retry policy.
    async fn graph_step<T, F, Fut>(
        &self,
        page_id: &PageId,
        shutdown: &CancellationToken,
        call: F,
    ) -> Result<T, JobError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, GraphError>>,
    {
        page_step(
            &self.registry,
            page_id,
            &self.retry,
            "poll_graph",
            shutdown,
            call,
        )
        .await
    }

    /// A database step under the retry policy. An outage delays the job (parked); it never
    /// dead-letters it.
    async fn db_step<T, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        operation: F,
    ) -> Result<T, JobError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, DbError>>,
    {
        step(&self.retry, "poll_db", shutdown, operation).await
    }
}
