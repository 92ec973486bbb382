//! Claims paced to the bucket's budget: while the budget refuses flushes, a round claims no
//! more conversations per budget window than one window can take.
//!
//! Invariant: a refusal only slows claiming for a second and two windows after it; an
//! unlimited budget never paces.

use std::sync::atomic::Ordering;
use std::time::Duration;

use fbsync_shared::now_ms;
use fbsync_shared::storage::budget::BucketBudget;
use fbsync_shared::storage::db::{ClaimError, ConversationClaim};

use super::{FlushOutcome, Flusher};

/// Claims made in one budget window, while the bucket's budget refuses flushes.
#[derive(Debug, Default)]
pub(super) struct PacedClaims {
    /// The window (its start, ms) the count is for; 0 while claims are not paced.
    pub(super) window: i64,
    /// Conversations claimed in it.
    pub(super) claimed: usize,
}

impl Flusher {
    /// How many conversations to claim with `free` slots: all of them, but while the bucket's
    /// budget refuses flushes (one was deferred for it lately), no more per
    /// budget window than one window can take. Claimed beyond that, a conversation is read
    /// from the database and deferred again window after window: at twice the bucket's
    /// capacity that churn cost the worker 89 ms of CPU per write.
    pub(super) fn claims_wanted(&self, free: usize, paced: &mut PacedClaims) -> usize {
        let now = now_ms();
        let refused_at = self.bucket_refused_at.load(Ordering::Relaxed);
        // Refusals come at the start of a window (what was deferred comes due then): paced
        // until a second and two windows pass without one.
        let paced_for = 1_000 + 2 * self.bucket().window_ms;
        // (A clock stepped back makes the refusal look to come from the future: not lately.)
        if self.bucket().is_unlimited() || !(0..paced_for).contains(&(now - refused_at)) {
            *paced = PacedClaims::default();
            return free;
        }
        let window = self.bucket().window_start(now);
        if paced.window != window {
            *paced = PacedClaims { window, claimed: 0 };
        }
        // A flush takes at least a write and an operation: the tighter of the limited rates.
        let budget = self.bucket();
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
    pub(super) fn bucket_refused(&self) {
        self.bucket_refused_at.store(now_ms(), Ordering::Relaxed);
    }

    /// When the run loop looks for due conversations again: after `interval`, or, paced with
    /// this window's claims made, when the next window begins.
    pub(super) fn look_again_after(
        &self,
        wanted: usize,
        paced: &PacedClaims,
        interval: Duration,
    ) -> Duration {
        if wanted == 0 && paced.window != 0 {
            let until_next = self.bucket().next_window(now_ms()) - now_ms();
            interval.min(Duration::from_millis(
                until_next.clamp(1, 1_000).unsigned_abs(),
            ))
        } else {
            interval
        }
    }

    /// The bucket's budget had no room for the flush's next request: nothing was sent; the
    /// conversation is due again when the next budget window begins.
    pub(super) async fn no_room(
        &self,
        claim: &mut ConversationClaim,
    ) -> Result<FlushOutcome, ClaimError> {
        self.bucket_refused();
        claim.defer(self.bucket().next_window(now_ms())).await?;
        Ok(FlushOutcome::Deferred)
    }

    /// The bucket's budget, whose windows pace the claims.
    pub(super) fn bucket(&self) -> BucketBudget {
        self.store.bucket()
    }
}
