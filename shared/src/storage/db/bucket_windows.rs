//! The bucket's request rate, shared by every worker: one row per budget window (50 ms at
//! Spaces' rates), whose caps are set when the row is made: the per-second budget less what the
//! windows of the second (and one window) before it took, at most twice the window's even
//! share. Those windows are over, so
//! their counts are final (a request given back only lowers them), and any run of windows one
//! sliding second touches stays within the budget.
//!
//! A saturated bucket refuses most takes; this process remembers a window it found full (until
//! it gives something back to it) and the latest window whose row it has seen, so a refused take
//! costs no statement or one, not three.

use super::{Budgets, DbError};
use crate::storage::budget::{BucketBudget, Requests};

/// What this process has seen of the budget's windows, to spare statements that cannot take
/// anything. A window is marked full only from a refusal whose statement ran when the row was
/// known to exist and no give-back of this process came between; it errs towards refusing
/// only in that another process's give-back is not seen until the next window.
#[derive(Debug, Default)]
pub(crate) struct WindowsSeen {
    /// The latest window whose row this process made or took from (or found refusing after
    /// making it): a take from it or an earlier window, refused, means full, not missing.
    latest_with_row: i64,
    /// Give-backs this process made: a refusal read before one of them says nothing after it.
    give_backs: u64,
    /// A window found full, and the smallest (writes, ops) refused there: a request as large
    /// is refused too, since counts only grow (but for give-backs, which forget it).
    full: Option<(i64, i64, i64)>,
}

impl WindowsSeen {
    fn known_full(&self, window: i64, writes: i64, ops: i64) -> bool {
        self.full
            .is_some_and(|(w, fw, fo)| w == window && writes >= fw && ops >= fo)
    }

    fn found_full(&mut self, window: i64, writes: i64, ops: i64) {
        let smaller = match self.full {
            Some((w, fw, fo)) if w == window => writes <= fw && ops <= fo,
            Some((w, _, _)) => window > w,
            None => true,
        };
        if smaller {
            self.full = Some((window, writes, ops));
        }
    }
}

impl Budgets {
    /// Takes `requests` from the bucket's budget window that holds `now`; false (nothing taken)
    /// when that window is full.
    pub async fn take_bucket_budget(
        &self,
        now: i64,
        requests: Requests,
        budget: &BucketBudget,
    ) -> Result<bool, DbError> {
        let Requests { writes, ops } = requests;
        let window = budget.window_start(now);
        if self.windows_seen(|seen| seen.known_full(window, writes, ops)) {
            return Ok(false);
        }
        // Known before the statement runs: a row another task makes meanwhile must not turn
        // this take's refusal (for want of a row) into "full".
        let (had_row, give_backs) =
            self.windows_seen(|seen| (seen.latest_with_row >= window, seen.give_backs));
        let taken = self.take_from_window(window, writes, ops).await?;
        self.windows_seen(|seen| {
            if taken {
                seen.latest_with_row = seen.latest_with_row.max(window);
            } else if had_row && seen.give_backs == give_backs {
                seen.found_full(window, writes, ops);
            }
        });
        if taken || had_row {
            return Ok(taken);
        }
        // The window's row is missing (its first request) or full. Made when missing, with its
        // caps, by whichever worker comes first; then taken from once more.
        let unlimited = |per_second: i64| {
            if per_second == 0 {
                (i64::MAX / 4, i64::MAX / 4)
            } else {
                (per_second, budget.most_in_one_window(per_second))
            }
        };
        let (writes_per_second, most_writes) = unlimited(budget.writes_per_second);
        let (ops_per_second, most_ops) = unlimited(budget.ops_per_second);
        sqlx::query(
            "INSERT INTO bucket_budget (window_ms, writes, ops, writes_cap, ops_cap)
             SELECT $1, 0, 0,
                 CASE WHEN $2 - COALESCE(SUM(writes), 0) < $3
                     THEN $2 - COALESCE(SUM(writes), 0) ELSE $3 END,
                 CASE WHEN $4 - COALESCE(SUM(ops), 0) < $5
                     THEN $4 - COALESCE(SUM(ops), 0) ELSE $5 END
             FROM bucket_budget WHERE window_ms >= $6 AND window_ms < $1
             ON CONFLICT (window_ms) DO NOTHING",
        )
        .bind(window)
        .bind(writes_per_second)
        .bind(most_writes)
        .bind(ops_per_second)
        .bind(most_ops)
        .bind(budget.second_before(window))
        .execute(&self.db.relaxed_pool)
        .await?;
        if window % (budget.window_ms * 200) == 0 {
            // Old windows are useless; trimming now and then keeps the table tiny.
            sqlx::query("DELETE FROM bucket_budget WHERE window_ms < $1")
                .bind(window - 10_000)
                .execute(&self.db.relaxed_pool)
                .await?;
        }
        let give_backs = self.windows_seen(|seen| seen.give_backs);
        let taken = self.take_from_window(window, writes, ops).await?;
        self.windows_seen(|seen| {
            // The row exists now (made here or by whoever came first).
            seen.latest_with_row = seen.latest_with_row.max(window);
            if !taken && seen.give_backs == give_backs {
                seen.found_full(window, writes, ops);
            }
        });
        Ok(taken)
    }

    fn windows_seen<T>(&self, look: impl FnOnce(&mut WindowsSeen) -> T) -> T {
        look(
            &mut self
                .db
                .windows_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Takes from the row of `window`, within its caps; false when the row is missing or full,
    /// or when a later window has begun (its caps were set from this one's count: a request
    /// counted here now, by a worker whose statement ran late, would escape them).
    async fn take_from_window(&self, window: i64, writes: i64, ops: i64) -> Result<bool, DbError> {
        let taken = sqlx::query(
            "UPDATE bucket_budget SET writes = writes + $2, ops = ops + $3
             WHERE window_ms = $1 AND writes + $2 <= writes_cap AND ops + $3 <= ops_cap
               AND NOT EXISTS (SELECT 1 FROM bucket_budget later WHERE later.window_ms > $1)",
        )
        .bind(window)
        .bind(writes)
        .bind(ops)
        .execute(&self.db.relaxed_pool)
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    /// Gives `requests` taken in `window` back (a request that was counted and then not sent);
    /// nothing when the window is gone.
    pub async fn give_back_bucket_budget(
        &self,
        window: i64,
        requests: Requests,
    ) -> Result<(), DbError> {
        let Requests { writes, ops } = requests;
        sqlx::query(
            "UPDATE bucket_budget SET writes = writes - $2, ops = ops - $3
             WHERE window_ms = $1 AND writes >= $2 AND ops >= $3",
        )
        .bind(window)
        .bind(writes)
        .bind(ops)
        .execute(&self.db.relaxed_pool)
        .await?;
        self.windows_seen(|seen| {
            seen.give_backs += 1;
            if seen.full.is_some_and(|(full, _, _)| full == window) {
                seen.full = None;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::budget::{BucketBudget, Requests};
    use crate::storage::db::test_support::backends;

    #[tokio::test]
    async fn a_share_given_back_can_be_taken_again_in_its_window_only() {
        for (backend, db) in backends().await {
            let budget = BucketBudget {
                window_ms: 50,
                writes_per_second: 1,
                ops_per_second: 2,
            };
            let now = 1_000_020;
            assert!(
                db.budgets()
                    .take_bucket_budget(now, Requests::GET_THEN_PUT, &budget)
                    .await
                    .expect("take")
            );
            assert!(
                !db.budgets()
                    .take_bucket_budget(now, Requests::GET, &budget)
                    .await
                    .expect("take"),
                "{backend}: the window is full"
            );
            db.budgets()
                .give_back_bucket_budget(budget.window_start(now), Requests::PUT)
                .await
                .expect("give back");
            assert!(
                db.budgets()
                    .take_bucket_budget(now, Requests::PUT, &budget)
                    .await
                    .expect("take"),
                "{backend}: the write given back is there again"
            );
            db.budgets()
                .give_back_bucket_budget(budget.window_start(now) - 50, Requests::PUT)
                .await
                .expect("give back");
            assert!(
                !db.budgets()
                    .take_bucket_budget(now, Requests::PUT, &budget)
                    .await
                    .expect("take"),
                "{backend}: nothing given back to another window"
            );
        }
    }

    #[tokio::test]
    async fn the_windows_one_sliding_second_touches_never_take_more_than_the_second_allows() {
        for (backend, db) in backends().await {
            let budget = BucketBudget {
                window_ms: 50,
                writes_per_second: 10,
                ops_per_second: 0,
            };
            let start = 2_000_000;
            // Every window takes what it can, as a saturated bucket does: each takes at most
            // twice its even share (1, but never less than 2), and the windows of any second,
            // with one more for late requests (22), at most 10 in all.
            let mut taken = Vec::new();
            for window in 0..60 {
                let at = start + window * 50 + 10;
                let mut count: i64 = 0;
                while db
                    .budgets()
                    .take_bucket_budget(at, Requests::PUT, &budget)
                    .await
                    .expect("take")
                {
                    count += 1;
                    assert!(count <= 1_000, "{backend}: a window with no cap");
                }
                taken.push(count);
            }
            assert!(taken.iter().all(|&n| n <= 2), "{backend}: {taken:?}");
            for run in taken.windows(22) {
                assert!(run.iter().sum::<i64>() <= 10, "{backend}: {taken:?}");
            }
            // Saturated, it still sustains the rate: 10 in 22 windows.
            let total: i64 = taken.iter().sum();
            assert!(total >= 24, "{backend}: {total} in 3 s: {taken:?}");
            // A worker whose statement runs after the next window began takes nothing from the
            // window it meant: that window's count already set the next one's caps.
            let late = start + 60 * 50 + 10;
            let budget = BucketBudget {
                writes_per_second: 1_000,
                ..budget
            };
            assert!(
                db.budgets()
                    .take_bucket_budget(late + 50, Requests::PUT, &budget)
                    .await
                    .expect("take")
            );
            assert!(
                !db.budgets()
                    .take_bucket_budget(late, Requests::PUT, &budget)
                    .await
                    .expect("take"),
                "{backend}: a take into a window that is over"
            );
        }
    }

    #[tokio::test]
    async fn a_window_found_full_is_not_asked_again_until_this_process_gives_some_back() {
        for (backend, db) in backends().await {
            let budget = BucketBudget {
                window_ms: 50,
                writes_per_second: 1,
                ops_per_second: 1,
            };
            let now = 3_000_020;
            assert!(
                db.budgets()
                    .take_bucket_budget(now, Requests::PUT, &budget)
                    .await
                    .expect("take")
            );
            assert!(
                !db.budgets()
                    .take_bucket_budget(now, Requests::PUT, &budget)
                    .await
                    .expect("take")
            );
            // Another process gives back; this one does not ask the database again.
            sqlx::query("UPDATE bucket_budget SET writes = 0, ops = 0")
                .execute(&db.pool)
                .await
                .expect("give back behind its back");
            assert!(
                !db.budgets()
                    .take_bucket_budget(now, Requests::PUT, &budget)
                    .await
                    .expect("take"),
                "{backend}: a window found full is refused without a statement"
            );
            assert!(
                !db.budgets()
                    .take_bucket_budget(now, Requests::GET_THEN_PUT, &budget)
                    .await
                    .expect("take"),
                "{backend}: and so is a larger request"
            );
            // A give-back of its own makes it ask again.
            db.budgets()
                .give_back_bucket_budget(budget.window_start(now), Requests { writes: 0, ops: 0 })
                .await
                .expect("give back");
            assert!(
                db.budgets()
                    .take_bucket_budget(now, Requests::PUT, &budget)
                    .await
                    .expect("take"),
                "{backend}: asked again after its own give-back"
            );
        }
    }
}
