//! What one flush of a claimed conversation came to, and the counts of a round.

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

/// Counts of one [`Flusher::flush_due`](super::Flusher::flush_due) round.
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
    pub(super) fn count(&mut self, outcome: FlushOutcome) {
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
