//! The bucket's adaptive rate, shared by every worker: one row holding the share of the
//! configured ceilings the last SlowDown left in force, and when (see [`RateShare`]). A
//! decrease is a compare-and-swap on what the worker read, so two workers that see SlowDown in
//! the same second halve the rate once, not twice.

use super::{Budgets, DbError};
use crate::storage::budget::RateShare;

impl Budgets {
    /// The share in force as last lowered; [`RateShare::FULL`] before any SlowDown.
    pub async fn bucket_rate(&self) -> Result<RateShare, DbError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT lowered_to_ppm, lowered_at_ms FROM bucket_rate WHERE id = 1")
                .fetch_optional(&self.db.relaxed_pool)
                .await?;
        Ok(
            row.map_or(RateShare::FULL, |(lowered_to_ppm, lowered_at_ms)| {
                RateShare {
                    lowered_to_ppm,
                    lowered_at_ms,
                }
            }),
        )
    }

    /// Lowers the rate for a SlowDown answered at `now`, unless another worker lowered it
    /// within the spacing; the share in force afterwards, whoever lowered it.
    pub async fn lower_bucket_rate(&self, now: i64) -> Result<RateShare, DbError> {
        sqlx::query(
            "INSERT INTO bucket_rate (id, lowered_to_ppm, lowered_at_ms) VALUES (1, $1, $2)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(RateShare::FULL.lowered_to_ppm)
        .bind(RateShare::FULL.lowered_at_ms)
        .execute(&self.db.relaxed_pool)
        .await?;
        loop {
            let seen = self.bucket_rate().await?;
            let Some(lowered) = seen.after_slow_down(now) else {
                return Ok(seen);
            };
            let swapped = sqlx::query(
                "UPDATE bucket_rate SET lowered_to_ppm = $1, lowered_at_ms = $2
                 WHERE id = 1 AND lowered_to_ppm = $3 AND lowered_at_ms = $4",
            )
            .bind(lowered.lowered_to_ppm)
            .bind(lowered.lowered_at_ms)
            .bind(seen.lowered_to_ppm)
            .bind(seen.lowered_at_ms)
            .execute(&self.db.relaxed_pool)
            .await?;
            if swapped.rows_affected() == 1 {
                return Ok(lowered);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::budget::RateShare;
    use crate::storage::db::test_support::backends;

    #[tokio::test]
    async fn slow_downs_seen_by_two_workers_in_one_second_lower_the_shared_rate_once() {
        for (backend, db) in backends().await {
            let (one, other) = (db.budgets(), db.budgets());
            assert_eq!(one.bucket_rate().await.expect("read"), RateShare::FULL);
            let lowered = one.lower_bucket_rate(50_000).await.expect("lower");
            assert_eq!(lowered.lowered_to_ppm, 500_000, "{backend}");
            let same = other.lower_bucket_rate(50_400).await.expect("lower");
            assert_eq!(same, lowered, "{backend}: within the spacing, once");
            assert_eq!(other.bucket_rate().await.expect("read"), lowered);
            let again = other.lower_bucket_rate(52_000).await.expect("lower");
            assert_eq!(again.lowered_to_ppm, 260_000, "{backend}: 0.52 halved");
        }
    }
}
