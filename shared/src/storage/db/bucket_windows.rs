//! The bucket's request rate, shared by every worker: one row per budget window (100 ms for
//! Spaces' default rates), filled up to the window's share of the rate.

use std::time::Duration;

use super::{Database, DbError};
use crate::now_ms;
use crate::storage::budget::BucketBudget;

impl Database {
    /// Takes `writes` and `ops` for a request about to be sent: from the current window, or
    /// from one of the next `windows` ones, sleeping until each starts, for as long as
    /// `keep_waiting` says so. True when taken (always, for an unlimited budget).
    pub async fn wait_for_bucket_slot(
        &self,
        budget: &BucketBudget,
        writes: i64,
        ops: i64,
        windows: usize,
        keep_waiting: impl Fn() -> bool,
    ) -> Result<bool, DbError> {
        if budget.is_unlimited() {
            return Ok(true);
        }
        for waited in 0..=windows {
            let now = now_ms();
            if self.take_bucket_budget(now, writes, ops, budget).await? {
                return Ok(true);
            }
            if waited == windows || !keep_waiting() {
                break;
            }
            let wait = (budget.next_window(now) - now).max(1);
            tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
        }
        Ok(false)
    }

    /// Takes `writes` writes and `ops` operations from the bucket's budget window that holds
    /// `now`; false (nothing taken) when that window is full.
    pub async fn take_bucket_budget(
        &self,
        now: i64,
        writes: i64,
        ops: i64,
        budget: &BucketBudget,
    ) -> Result<bool, DbError> {
        let window = budget.window_start(now);
        let unlimited = |per_window: i64| {
            if per_window == 0 {
                i64::MAX / 2
            } else {
                per_window
            }
        };
        let taken = sqlx::query(
            "INSERT INTO bucket_budget (window_ms, writes, ops) VALUES ($1, $2, $3)
             ON CONFLICT (window_ms) DO UPDATE SET writes = bucket_budget.writes + excluded.writes,
                 ops = bucket_budget.ops + excluded.ops
             WHERE bucket_budget.writes + excluded.writes <= $4 AND bucket_budget.ops + excluded.ops <= $5
             RETURNING window_ms",
        )
        .bind(window)
        .bind(writes)
        .bind(ops)
        .bind(unlimited(budget.writes_per_window))
        .bind(unlimited(budget.ops_per_window))
        .fetch_optional(&self.relaxed_pool)
        .await?;
        if window % (budget.window_ms * 100) == 0 {
            // Old windows are useless; trimming now and then keeps the table tiny.
            sqlx::query("DELETE FROM bucket_budget WHERE window_ms < $1")
                .bind(window - 10_000)
                .execute(&self.relaxed_pool)
                .await?;
        }
        Ok(taken.is_some())
    }

    /// Gives `writes` and `ops` taken in `window` back (a request that was counted and then not
    /// sent); nothing when the window is gone.
    pub async fn give_back_bucket_budget(
        &self,
        window: i64,
        writes: i64,
        ops: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE bucket_budget SET writes = writes - $2, ops = ops - $3
             WHERE window_ms = $1 AND writes >= $2 AND ops >= $3",
        )
        .bind(window)
        .bind(writes)
        .bind(ops)
        .execute(&self.relaxed_pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::budget::BucketBudget;
    use crate::storage::db::test_support::backends;

    #[tokio::test]
    async fn a_share_given_back_can_be_taken_again_in_its_window_only() {
        for (backend, db) in backends().await {
            let budget = BucketBudget {
                window_ms: 100,
                writes_per_window: 1,
                ops_per_window: 2,
            };
            let now = 1_000_050;
            assert!(
                db.take_bucket_budget(now, 1, 2, &budget)
                    .await
                    .expect("take")
            );
            assert!(
                !db.take_bucket_budget(now, 0, 1, &budget)
                    .await
                    .expect("take"),
                "{backend}: the window is full"
            );
            db.give_back_bucket_budget(budget.window_start(now), 1, 1)
                .await
                .expect("give back");
            assert!(
                db.take_bucket_budget(now, 1, 1, &budget)
                    .await
                    .expect("take"),
                "{backend}: the write given back is there again"
            );
            db.give_back_bucket_budget(budget.window_start(now) - 100, 1, 1)
                .await
                .expect("give back");
            assert!(
                !db.take_bucket_budget(now, 1, 1, &budget)
                    .await
                    .expect("take"),
                "{backend}: nothing given back to another window"
            );
        }
    }
}
