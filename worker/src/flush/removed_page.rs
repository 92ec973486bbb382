//! A removed Page's staged events: they go to the dead-letter queue (reason `page_removed`,
//! replayable once the Page is added again) and leave the stage.
//!
//! Invariant: the events leave the stage only once their dead letters are confirmed; until
//! then the conversation is tried again later.

use fbsync_shared::facebook::event::{EventFacts, EventKind, EventMessage};
use fbsync_shared::ids::ConversationKey;
use fbsync_shared::jobs::JobKind;
use fbsync_shared::now_ms;
use fbsync_shared::queue::Outgoing;
use fbsync_shared::storage::db::{ClaimError, ConversationClaim, StagedEvent};
use fbsync_shared::telemetry::DEAD_LETTERED;
use serde_json::value::RawValue;

use super::write::seqs;
use super::{FlushOutcome, Flusher};
use crate::dead_letter::{DeadLetterInfo, DeadReason};

/// How long the events of a removed Page wait before dead-lettering them is tried again.
const REMOVED_PAGE_RETRY_MS: i64 = 10_000;

impl Flusher {
    /// The conversation's Page was removed after its events were staged: the events go to the
    /// dead-letter queue (reason `page_removed`, replayable once the Page is added again) and
    /// leave the stage. If the dead letters cannot be confirmed, the events stay and the
    /// conversation is tried again later.
    pub(super) async fn dead_letter_removed_page(
        &self,
        claim: &mut ConversationClaim,
    ) -> Result<FlushOutcome, ClaimError> {
        let key = claim.key().clone();
        let staged = self.staging.staged_events(&key).await?;
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
            tracing::warn!(error = %e, "events of a removed Page could not be dead-lettered yet");
            claim
                .fail(&e.to_string(), now + REMOVED_PAGE_RETRY_MS)
                .await?;
            return Ok(FlushOutcome::Failed);
        }
        claim.finish(&seqs(&staged), now, now).await?;
        metrics::counter!(DEAD_LETTERED, "reason" => DeadReason::PageRemoved.as_str())
            .increment(letters.len() as u64);
        tracing::warn!(
            events = letters.len(),
            "events of a removed Page moved to the dead-letter queue"
        );
        Ok(FlushOutcome::PageRemoved)
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
