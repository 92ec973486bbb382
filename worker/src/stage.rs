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
    /// Pages already reported as unknown, so a flood of their events logs once per Page.
    unknown_reported: Mutex<HashSet<PageId>>,
}

impl Stager {
    pub fn new(registry: Registry, staging: Staging) -> Self {
        Self {
            registry,
            staging,
            unknown_reported: Mutex::new(HashSet::new()),
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

    fn report_unknown(&self, page_id: &PageId) {
        let mut reported = self
            .unknown_reported
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if reported.insert(page_id.clone()) {
            tracing::warn!(
                %page_id,
                "events for a Page that is not registered go to the dead-letter queue; register it with `fbsync pages add` and replay them"
            );
        }
    }
}

/// The conversation an event belongs to, with both ids validated.
fn conversation_of(event: &EventMessage) -> Result<ConversationKey, String> {
    let Some(user_psid) = event.user_psid.as_deref().filter(|psid| !psid.is_empty()) else {
        return Err("the event names no conversation partner".into());
    };
    Ok(ConversationKey {
        page_id: PageId::parse(&event.page_id).map_err(|e| e.to_string())?,
        user_psid: Psid::parse(user_psid).map_err(|e| e.to_string())?,
    })
}

fn dead(reason: DeadReason, error: impl Into<String>) -> Decision {
    Decision::DeadLetter(JobError::failed(reason, error))
}
