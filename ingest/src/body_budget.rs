//! The budget of webhook body bytes in flight across all connections
//! (`INGEST_BODY_BUDGET_BYTES`): what bounds ingest's memory under unauthenticated clients,
//! where the in-flight count alone would allow `INGEST_MAX_IN_FLIGHT` bodies of the largest size.
//!
//! Invariants:
//! - A body is reserved before any of it is read: its declared `Content-Length` (the body
//!   limit when it declares none), and it cannot hold more, since the body is read no further.
//!   A reservation the budget cannot grant is refused at once (503), never waited for.
//! - Bodies larger than [`SMALL_BODY_BYTES`] (no Facebook delivery comes near it) together hold at
//!   most half the budget, so clients announcing large bodies and then trickling them can never
//!   crowd out the small deliveries Facebook sends: those always have the other half.
//! - A reservation is given back when its delivery has been answered, whatever the answer.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The largest body counted as small: Facebook's deliveries are a few kilobytes (a batch of
/// entries included), far below this.
pub(crate) const SMALL_BODY_BYTES: u64 = 64 * 1024;

/// Reservations are counted in KiB, so a semaphore's permits (at most `u32` per acquire)
/// cover any body limit.
const UNIT: u64 = 1024;

/// The bytes bodies in flight may hold, all of them and the large ones.
pub(crate) struct BodyBudget {
    /// Every body's reservation, in KiB.
    all: Arc<Semaphore>,
    /// Large bodies' reservations besides, in KiB: half of `all`.
    large: Arc<Semaphore>,
    /// What a body may hold at most (`INGEST_BODY_LIMIT_BYTES`): the reservation of a body that
    /// declares no length, or more than it may send.
    body_limit: u64,
}

/// The bytes one body may hold, until it is dropped.
pub(crate) struct BodyReservation {
    /// Its share of the whole budget.
    _all: OwnedSemaphorePermit,
    /// Its share of the large bodies' half, when it is large.
    _large: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// A budget of `budget_bytes` for bodies of at most `body_limit` bytes (the settings check
    /// that the largest body fits in the large half).
    pub(crate) fn new(budget_bytes: usize, body_limit: usize) -> Self {
        let all = units(budget_bytes as u64).max(1);
        Self {
            all: Arc::new(Semaphore::new(all as usize)),
            large: Arc::new(Semaphore::new((all / 2).max(1) as usize)),
            body_limit: body_limit as u64,
        }
    }

    /// Reserves what a body declaring `content_length` may hold, or `None` when the budget
    /// cannot grant it now.
    pub(crate) fn reserve(&self, content_length: Option<u64>) -> Option<BodyReservation> {
        let bytes = content_length.map_or(self.body_limit, |n| n.min(self.body_limit));
        let needed = u32::try_from(units(bytes)).ok()?;
        let large = if bytes > SMALL_BODY_BYTES {
            Some(self.large.clone().try_acquire_many_owned(needed).ok()?)
        } else {
            None
        };
        let all = self.all.clone().try_acquire_many_owned(needed).ok()?;
        Some(BodyReservation {
            _all: all,
            _large: large,
        })
    }
}

/// `bytes` in whole KiB, rounded up (an empty body still takes one).
fn units(bytes: u64) -> u64 {
    bytes.div_ceil(UNIT).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn large_bodies_hold_at_most_half_the_budget_and_small_ones_the_rest() {
        let budget = BodyBudget::new(8 * MIB, MIB);
        let large: Vec<_> = (0..4)
            .map(|_| {
                budget
                    .reserve(Some(MIB as u64))
                    .expect("within the large half")
            })
            .collect();
        assert!(
            budget.reserve(Some(MIB as u64)).is_none(),
            "the large half is full"
        );
        assert!(
            budget.reserve(None).is_none(),
            "no length counts as the body limit"
        );
        let small: Vec<_> = (0..4 * 1024 / 4)
            .map(|_| budget.reserve(Some(4096)).expect("the small half"))
            .collect();
        assert!(
            budget.reserve(Some(100)).is_none(),
            "the whole budget is held"
        );
        drop(small);
        drop(large);
        assert!(
            budget.reserve(Some(MIB as u64)).is_some(),
            "given back on drop"
        );
    }

    #[test]
    fn a_declared_length_beyond_the_limit_reserves_the_limit() {
        let budget = BodyBudget::new(4 * MIB, MIB);
        let held = budget.reserve(Some(u64::MAX)).expect("the limit fits");
        assert!(budget.reserve(Some(MIB as u64)).is_some());
        drop(held);
    }
}
