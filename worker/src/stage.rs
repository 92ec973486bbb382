//! Staging: conversation events from the queue into the database, then acked.
//!
//! [`Stager::stage_batch`] is one unit of work: it decides for each message (stage it, or
//! dead-letter it as malformed or for an unknown Page), stages the good ones in one
//! transaction, and reports which deliveries may be acked. Duplicates vanish in the insert.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use fbsync_shared::facebook::event::EventMessage;
use fbsync_shared::ids::{ConversationKey, PageId, Psid};
use fbsync_shared::jobs::MalformedJob;
use fbsync_shared::now_ms;
use fbsync_shared::storage::db::{DbError, NewStagedEvent, Registry, Staging};
use fbsync_shared::telemetry::EVENTS_STAGED;

use crate::dead_letter::DeadReason;
use crate::runtime::settle::JobError;

/// What to do with one message of a batch.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Staged (or already staged): ack.
    Staged,
    /// Dead-letter it (a [`JobError::Failed`]), then ack.
    DeadLetter(JobError),
}

/// Stages conversation events.
pub struct Stager {
    /// Which Pages are registered (an unknown Page's events are not staged).
    registry: Registry,
    /// Where events are staged.
    staging: Staging,
    /// Pages already reported as unknown, so a flood of their events logs once per Page; at
    /// most [`MAX_UNKNOWN_REPORTED`], as signed deliveries may name any number of them.
    unknown_reported: UnknownPages,
}

/// How many unknown Pages are remembered as reported; past it the memory starts afresh (those
/// Pages are logged once more), so the set stays a few tens of kilobytes.
pub const MAX_UNKNOWN_REPORTED: usize = 1000;

impl Stager {
    pub fn new(registry: Registry, staging: Staging) -> Self {
        Self {
            registry,
            staging,
            unknown_reported: UnknownPages::default(),
        }
    }

    /// Decides and stages a batch of decoded conversation messages; returns one decision per
    /// message, in order. An error means nothing was staged and the whole batch should be
    /// retried.
    pub async fn stage_batch(
        &self,
        batch: &[Result<EventMessage, MalformedJob>],
    ) -> Result<Vec<Decision>, DbError> {
        let now = now_ms();
        let mut decisions = Vec::with_capacity(batch.len());
        let mut to_stage = Vec::new();
        let mut registered: HashMap<PageId, bool> = HashMap::new();
        for message in batch {
            let event = match message {
                Ok(event) => event,
                Err(malformed) => {
                    decisions.push(dead(DeadReason::Malformed, malformed.to_string()));
                    continue;
                }
            };
            let key = match conversation_of(event) {
                Ok(key) => key,
                Err(error) => {
                    decisions.push(dead(DeadReason::Malformed, error));
                    continue;
                }
            };
            let known = match registered.get(&key.page_id) {
                Some(known) => *known,
                None => {
                    let known = self.registry.page(&key.page_id).await?.is_some();
                    registered.insert(key.page_id.clone(), known);
                    known
                }
            };
            if !known {
                self.report_unknown(&key.page_id);
                decisions.push(dead(
                    DeadReason::UnknownPage,
                    format!("page {} is not registered", key.page_id),
                ));
                continue;
            }
            if key.user_psid.is_page_events() {
                self.note_policy_enforcement(&key.page_id, event).await?;
            }
            metrics::counter!(EVENTS_STAGED, "kind" => event.kind.as_str()).increment(1);
            to_stage.push(NewStagedEvent {
                key,
                event_id: event.event_id.clone(),
                source: event.source,
                timestamp_ms: event.timestamp_ms,
                received_at_ms: event.received_at_ms,
                body: event.event.get().to_string(),
            });
            decisions.push(Decision::Staged);
        }
        if !to_stage.is_empty() {
            self.staging.stage_events(&to_stage, now).await?;
        }
        Ok(decisions)
    }

    /// A `messaging_policy_enforcement` event (Facebook warning, blocking or unblocking the
    /// Page's messaging) is also recorded on the Page, for the owner's page, `pages list` and
    /// the alert; the event itself is staged as any other.
    async fn note_policy_enforcement(
        &self,
        page_id: &PageId,
        event: &EventMessage,
    ) -> Result<(), DbError> {
        #[derive(serde::Deserialize)]
        struct Enforcement {
            policy_enforcement: Option<Action>,
        }
        #[derive(serde::Deserialize)]
        struct Action {
            action: String,
            reason: Option<String>,
        }
        let Ok(Enforcement {
            policy_enforcement: Some(enforcement),
        }) = serde_json::from_str::<Enforcement>(event.event.get())
        else {
            return Ok(());
        };
        if !["warning", "block", "unblock"].contains(&enforcement.action.as_str()) {
            return Ok(());
        }
        tracing::warn!(%page_id, action = %enforcement.action, "Facebook's policy enforcement on the Page's messaging");
        self.registry
            .record_policy_enforcement(
                page_id,
                &enforcement.action,
                enforcement.reason.as_deref(),
                event.timestamp_ms,
            )
            .await
    }

    fn report_unknown(&self, page_id: &PageId) {
        if self.unknown_reported.first_time(page_id) {
            tracing::warn!(
                %page_id,
                "events for a Page that is not registered go to the dead-letter queue; register it with `fbsync pages add` and replay them"
            );
        }
    }
}

/// The unknown Pages reported so far, at most [`MAX_UNKNOWN_REPORTED`].
#[derive(Default)]
struct UnknownPages(Mutex<HashSet<PageId>>);

impl UnknownPages {
    /// True the first time `page_id` is seen (or again once the memory started afresh).
    fn first_time(&self, page_id: &PageId) -> bool {
        let mut reported = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if reported.contains(page_id) {
            return false;
        }
        if reported.len() >= MAX_UNKNOWN_REPORTED {
            reported.clear();
        }
        reported.insert(page_id.clone())
    }
}

/// The conversation an event belongs to, with both ids validated.
fn conversation_of(event: &EventMessage) -> Result<ConversationKey, String> {
    let Some(user_psid) = event.user_psid.as_deref().filter(|psid| !psid.is_empty()) else {
        return Err(
            "the event names neither a person (by id or user_ref) nor its Page: it has no place"
                .into(),
        );
    };
    Ok(ConversationKey {
        page_id: PageId::parse(&event.page_id).map_err(|e| e.to_string())?,
        user_psid: Psid::parse(user_psid).map_err(|e| e.to_string())?,
    })
}

fn dead(reason: DeadReason, error: impl Into<String>) -> Decision {
    Decision::DeadLetter(JobError::failed(reason, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_pages_are_reported_once_each_and_the_memory_stays_bounded() {
        let unknown = UnknownPages::default();
        let page = |n: usize| PageId::parse(&n.to_string()).expect("id");
        assert!(unknown.first_time(&page(1)));
        assert!(!unknown.first_time(&page(1)));
        for n in 2..=10 * MAX_UNKNOWN_REPORTED {
            unknown.first_time(&page(n));
            assert!(unknown.0.lock().expect("lock").len() <= MAX_UNKNOWN_REPORTED);
        }
    }
}
