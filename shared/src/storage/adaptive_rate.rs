//! The bucket's rate in force, as this process follows it: the shared [`RateShare`] read from
//! the database at most once per [`REFRESH_MS`], lowered at once when this process sees a
//! SlowDown, and exported as gauges.
//!
//! Invariants:
//! - the rate in force never exceeds the configured ceilings, and never drops to zero;
//! - a database that cannot be read or written leaves the last share known in force (a
//!   decrease is then kept by this process alone): the budget never stops requests for want
//!   of its own bookkeeping.

use std::sync::Mutex;

use crate::storage::budget::{BucketBudget, RateShare};
use crate::storage::db::Budgets;
use crate::telemetry::{BUCKET_RATE_IN_FORCE, STORE_SLOW_DOWNS};

/// How long a share read from the database is used before it is read again: another worker's
/// decrease reaches this one within it.
pub const REFRESH_MS: i64 = 1_000;

/// The rate in force for one bucket.
pub struct AdaptiveRate {
    /// Where the shared share is kept.
    budgets: Budgets,
    /// The configured rates' budget: the most the rate in force may be.
    ceiling: BucketBudget,
    /// The share last read or set, and when it was read (ms).
    seen: Mutex<(RateShare, i64)>,
}

impl AdaptiveRate {
    pub fn new(budgets: Budgets, ceiling: BucketBudget) -> Self {
        Self {
            budgets,
            ceiling,
            seen: Mutex::new((RateShare::FULL, i64::MIN)),
        }
    }

    /// The configured rates' budget.
    pub fn ceiling(&self) -> BucketBudget {
        self.ceiling
    }

    /// The budget in force at `now` from what this process knows, without asking the database.
    pub fn known(&self, now: i64) -> BucketBudget {
        self.ceiling.scaled(self.share().0.at(now))
    }

    /// The budget in force at `now`, reading the shared share when what is known is older than
    /// [`REFRESH_MS`].
    pub async fn in_force(&self, now: i64) -> BucketBudget {
        if self.ceiling.is_unlimited() {
            return self.ceiling;
        }
        let (mut share, read_at) = self.share();
        if now.saturating_sub(read_at) >= REFRESH_MS
            && let Ok(read) = self.budgets.bucket_rate().await
        {
            share = read;
            self.remember(read, now);
        }
        self.ceiling.scaled(share.at(now))
    }

    /// The store answered SlowDown at `now`: the shared rate is lowered (once per spacing,
    /// whichever worker sees it first).
    pub async fn slowed_down(&self, now: i64) {
        metrics::counter!(STORE_SLOW_DOWNS).increment(1);
        if self.ceiling.is_unlimited() {
            return;
        }
        let before = self.known(now);
        let lowered = match self.budgets.lower_bucket_rate(now).await {
            Ok(share) => share,
            Err(e) => {
                tracing::debug!(error = %e, "the bucket's shared rate could not be lowered; lowering this worker's");
                let (share, _) = self.share();
                share.after_slow_down(now).unwrap_or(share)
            }
        };
        self.remember(lowered, now);
        let after = self.known(now);
        if after != before {
            tracing::info!(
                writes_per_second = after.writes_per_second,
                operations_per_second = after.ops_per_second,
                "the store answered SlowDown: the bucket's rate is lowered, and climbs back to its ceiling while no SlowDown follows"
            );
        }
    }

    fn share(&self) -> (RateShare, i64) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `share` as read (or set) at `read_at`, and exports the rate it puts in force then:
    /// once per refresh or decrease, not per request.
    fn remember(&self, share: RateShare, read_at: i64) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = (share, read_at);
        let budget = self.ceiling.scaled(share.at(read_at));
        metrics::gauge!(BUCKET_RATE_IN_FORCE, "class" => "writes")
            .set(budget.writes_per_second as f64);
        metrics::gauge!(BUCKET_RATE_IN_FORCE, "class" => "operations")
            .set(budget.ops_per_second as f64);
    }
}
