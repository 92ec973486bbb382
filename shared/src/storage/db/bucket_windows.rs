//! The bucket's request rate, shared by every worker: one row per budget window (100 ms for
//! Spaces' default rates), filled up to the window's share of the rate.

use super::{Database, DbError};
use crate::storage::budget::BucketBudget;

impl Database {
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
        .fetch_optional(&self.pool)
        .await?;
        if window % (budget.window_ms * 100) == 0 {
            // Old windows are useless; trimming now and then keeps the table tiny.
            sqlx::query("DELETE FROM bucket_budget WHERE window_ms < $1")
                .bind(window - 10_000)
                .execute(&self.pool)
                .await?;
        }
        Ok(taken.is_some())
    }
}
