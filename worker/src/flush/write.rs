//! The end of a flush: the write when the merge changed the conversation, or the staged rows
//! cleared without one when it did not; either way the claim is finished, deleting exactly the
//! staged rows that are now stored.
//!
//! Invariants: the PUT is recorded in the object's budget (and the lease renewed) before it is
//! sent, and it is sent only while the claim still holds for the store's request timeout; what
//! was written is remembered before the claim ends, since the next claim may start the moment
//! it does.

use bytes::Bytes;
use fbsync_shared::now_ms;
use fbsync_shared::storage::budgeted_store::BudgetedError;
use fbsync_shared::storage::db::{ClaimError, ConversationClaim, PutReservation, StagedEvent};
use fbsync_shared::storage::object_store::{ObjectKey, StoredObject, WriteCondition};
use fbsync_shared::telemetry::{FLUSHES, OBJECT_WRITES, VISIBILITY_SECONDS};

use super::baseline::Baseline;
use super::{FlushOutcome, Flusher};
use crate::merge::{FileIndex, Merged};

impl Flusher {
    /// Writes `merged` over `baseline` and finishes the claim of `staged`.
    pub(super) async fn write(
        &self,
        claim: &mut ConversationClaim,
        object_key: &ObjectKey,
        baseline: Baseline,
        merged: Merged,
        staged: &[StagedEvent],
    ) -> Result<FlushOutcome, ClaimError> {
        if let PutReservation::NotBefore(at) = claim.reserve_put(&self.put_budget, now_ms()).await?
        {
            baseline.put_share.give_back().await;
            claim.defer(at).await?;
            return Ok(FlushOutcome::Deferred);
        }
        // The PUT's object budget is reserved already: wait for the bucket's rather than giving
        // the reservation up, while the claim can still send.
        let slot = match self
            .store
            .put_slot(baseline.put_share, || claim.held_for(self.put_margin))
            .await
        {
            Ok(slot) => slot,
            Err(BudgetedError::NoRoom { .. }) => return self.no_room(claim).await,
            Err(BudgetedError::Budget(e)) => return Err(ClaimError::Db(e)),
            Err(BudgetedError::Store(e)) => return self.failed(claim, &e).await,
        };
        if !claim.held_for(self.put_margin) {
            return Err(ClaimError::Lost);
        }
        let condition = WriteCondition::after_read(baseline.stored.as_ref());
        let body = Bytes::from(merged.body);
        let version = match slot.put(object_key, body.clone(), &condition).await {
            Ok(version) => version,
            Err(e) => return self.failed(claim, &e).await,
        };
        self.health.set_store_up(true);
        let written_at = now_ms();
        let due_at = claim
            .next_put_at(&self.put_budget, written_at)
            .max(written_at.saturating_add(self.write_gap_ms));
        // (If the claim turns out lost, the entry's generation and version keep it from
        // misleading anyone.)
        if let Some(version) = version {
            let written = StoredObject { body, version };
            self.last_written
                .remember(object_key, claim.generation(), written, merged.index);
        }
        claim.finish(&seqs(staged), due_at, written_at).await?;
        metrics::counter!(FLUSHES, "outcome" => "written").increment(1);
        metrics::counter!(OBJECT_WRITES, "object" => "conversation").increment(1);
        record_visibility(staged, written_at);
        Ok(FlushOutcome::Written)
    }

    /// The merge changed nothing: the staged rows are cleared without a write, and the PUT's
    /// share of the bucket's budget is given back.
    pub(super) async fn finish_unchanged(
        &self,
        claim: &mut ConversationClaim,
        object_key: &ObjectKey,
        baseline: Baseline,
        index: FileIndex,
        staged: &[StagedEvent],
    ) -> Result<FlushOutcome, ClaimError> {
        baseline.put_share.give_back().await;
        if let Some(object) = baseline.stored {
            self.last_written
                .remember(object_key, claim.generation(), object, index);
        }
        let now = now_ms();
        claim.finish(&seqs(staged), now, now).await?;
        metrics::counter!(FLUSHES, "outcome" => "unchanged").increment(1);
        Ok(FlushOutcome::Unchanged)
    }
}

/// The stage's numbers of `staged`, which finishing the claim deletes.
pub(super) fn seqs(staged: &[StagedEvent]) -> Vec<i64> {
    staged.iter().map(|event| event.seq).collect()
}

/// Delivery-to-stored delay of each event just written.
fn record_visibility(staged: &[StagedEvent], written_at: i64) {
    for event in staged {
        let seconds = (written_at - event.received_at_ms).max(0) as f64 / 1000.0;
        metrics::histogram!(VISIBILITY_SECONDS).record(seconds);
    }
}
