//! A won claim's life after the claim: reserve a PUT, renew, finish, defer, fail, set aside,
//! release. Every statement is fenced by the claim's generation: once another worker has
//! claimed the conversation, each answers [`ClaimError::Lost`] and changes nothing.

use std::time::{Duration, Instant};

use sqlx::Any;
use sqlx::any::{AnyArguments, AnyQueryResult};
use sqlx::query::Query;

use super::{ClaimError, ConversationClaim, millis};
use crate::ids::{ConversationKey, UserUuid};
use crate::storage::budget::PutBudget;
use crate::storage::db::DbError;
use crate::storage::db::put_budget::{PutReservation, RecentPuts};

impl ConversationClaim {
    pub fn key(&self) -> &ConversationKey {
        &self.key
    }

    /// The Page's owner when the claim was taken; `None` when the Page was removed.
    pub fn owner(&self) -> Option<&UserUuid> {
        self.owner.as_ref()
    }

    /// The claim's fencing generation: one more than the claim before it, whoever held that.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// Whether a listing showed the object absent and nothing has written it since.
    pub fn object_known_absent(&self) -> bool {
        self.object_absent
    }

    /// Whether no flush has finished on this conversation yet.
    pub fn never_flushed(&self) -> bool {
        self.never_flushed
    }

    /// A listing made while this claim is held showed the object absent (and
    /// [`Conversations::mark_objects_absent`](crate::storage::db::Conversations::mark_objects_absent) recorded it for the claims after this one).
    pub fn object_listed_absent(&mut self) {
        self.object_absent = true;
    }

    /// Consecutive failed flushes before this one.
    pub fn failures(&self) -> i64 {
        self.failures
    }

    /// When the object's PUT budget allows the next PUT.
    pub fn next_put_at(&self, budget: &PutBudget, now: i64) -> i64 {
        budget.next_put_at(self.recent_puts.times(), now)
    }

    /// True while this process may still act on the claim by its own clock, with `margin` to
    /// spare (the time a request needs to reach the store).
    pub fn held_for(&self, margin: Duration) -> bool {
        Instant::now() + margin < self.local_deadline
    }

    /// Extends the lease from now, for a flush that takes long.
    pub async fn renew(&mut self, now: i64) -> Result<(), ClaimError> {
        let recent = self.recent_puts.clone();
        self.record_and_renew(recent, now).await
    }

    /// Reserves one PUT under the object's budget and renews the lease, in one statement: the
    /// PUT is recorded before it is sent, so the budget counts it even if this worker dies
    /// right after. Nothing is recorded when the budget has no slot yet.
    pub async fn reserve_put(
        &mut self,
        budget: &PutBudget,
        now: i64,
    ) -> Result<PutReservation, ClaimError> {
        let next = self.next_put_at(budget, now);
        if next > now {
            return Ok(PutReservation::NotBefore(next));
        }
        let before = self.recent_puts.clone();
        let mut recent = before.clone();
        recent.record(now, budget.puts_per_window as usize);
        self.record_and_renew(recent, now).await?;
        self.before_unsent_put = Some(before);
        Ok(PutReservation::Reserved)
    }

    /// Stores `recent` as the object's PUT times and extends the lease from `now`.
    async fn record_and_renew(&mut self, recent: RecentPuts, now: i64) -> Result<(), ClaimError> {
        let local_deadline = Instant::now() + self.lease;
        let statement = self
            .statement(
                "UPDATE conversations SET recent_puts = $4, lease_until_ms = $5
                 WHERE page_id = $1 AND user_psid = $2 AND lease_gen = $3",
            )
            .bind(recent.encode())
            .bind(now + millis(self.lease));
        fenced(statement.execute(&self.db.relaxed_pool).await)?;
        self.recent_puts = recent;
        self.local_deadline = local_deadline;
        Ok(())
    }

    /// A statement about this claim's row: `$1`, `$2` name the conversation and `$3` is the
    /// claim's generation, which the statement must check.
    fn statement<'q>(&'q self, sql: &'q str) -> Query<'q, Any, AnyArguments<'q>> {
        sqlx::query(sql)
            .bind(self.key.page_id.as_str())
            .bind(self.key.user_psid.as_str())
            .bind(self.generation)
    }

    /// Ends a successful flush: marks the claimed staging generation flushed, sets the next
    /// allowed write time, releases the lease and deletes exactly the rows that are now stored,
    /// in one transaction that happens only while the claim is held.
    pub async fn finish(
        &mut self,
        stored_seqs: &[i64],
        due_at: i64,
        now: i64,
    ) -> Result<(), ClaimError> {
        let mut tx = self.db.relaxed_pool.begin().await.map_err(DbError::from)?;
        for chunk in stored_seqs.chunks(500) {
            let sql = format!(
                "DELETE FROM staged_events WHERE seq IN ({})",
                self.db.backend.placeholders(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for seq in chunk {
                query = query.bind(*seq);
            }
            query.execute(&mut *tx).await.map_err(DbError::from)?;
        }
        // Events staged while this flush ran wait on: from the oldest of them.
        let mark_flushed = self
            .statement(
                "UPDATE conversations SET flushed_gen = $4, due_at_ms = $5, lease_owner = NULL,
                     lease_until_ms = 0, failures = 0, last_error = NULL, object_absent = 0,
                     waiting_since_ms = COALESCE(
                         (SELECT MIN(received_at_ms) FROM staged_events
                          WHERE page_id = $1 AND user_psid = $2), 0)
                 WHERE page_id = $1 AND user_psid = $2 AND lease_gen = $3",
            )
            .bind(self.staged_gen)
            .bind(due_at);
        // A lost claim returns here; dropping the transaction rolls the deletes back: nothing
        // changes.
        fenced(mark_flushed.execute(&mut *tx).await)?;
        tx.commit().await.map_err(DbError::from)?;
        // The Page's "last flush" figure is for operators; failing to record it loses nothing.
        if let Err(e) = self
            .db
            .registry()
            .mark_page_flushed(&self.key.page_id, now)
            .await
        {
            tracing::debug!(page_id = %self.key.page_id, error = %e, "could not record the flush time");
        }
        Ok(())
    }

    /// Gives the claim back without counting a failure: the conversation waits until `due_at`
    /// (its budget's next slot). Called only before a PUT is sent: a PUT this claim reserved
    /// (and then found no room in the bucket's budget for) is taken back off the object's
    /// budget. Kept there, such PUTs used up an object's 5 per 300 s and stalled the
    /// conversation for a whole window.
    pub async fn defer(&mut self, due_at: i64) -> Result<(), ClaimError> {
        if let Some(before) = self.before_unsent_put.take() {
            let statement = self
                .statement(
                    "UPDATE conversations SET due_at_ms = $4, lease_owner = NULL, lease_until_ms = 0,
                         recent_puts = $5
                     WHERE page_id = $1 AND user_psid = $2 AND lease_gen = $3",
                )
                .bind(due_at)
                .bind(before.encode());
            fenced(statement.execute(&self.db.pool).await)?;
            self.recent_puts = before;
            return Ok(());
        }
        self.give_back(
            "UPDATE conversations SET due_at_ms = $4, lease_owner = NULL, lease_until_ms = 0
             WHERE page_id = $1 AND user_psid = $2 AND lease_gen = $3",
            due_at,
            None,
        )
        .await
    }

    /// Ends a failed flush: staged rows stay, the failure is counted and the conversation is
    /// retried at `retry_at`.
    pub async fn fail(&self, error: &str, retry_at: i64) -> Result<(), ClaimError> {
        self.give_back(
            "UPDATE conversations SET due_at_ms = $4, lease_owner = NULL, lease_until_ms = 0,
                 failures = failures + 1, last_error = $5, object_absent = 0
             WHERE page_id = $1 AND user_psid = $2 AND lease_gen = $3",
            retry_at,
            Some(error),
        )
        .await
    }

    /// Sets the conversation aside: its stored object cannot be read, so it is not flushed
    /// again (its staged events stay, its object is never overwritten) until an operator
    /// re-queues it ([`Conversations::requeue_set_aside`](crate::storage::db::Conversations::requeue_set_aside)).
    pub async fn set_aside(&self, reason: &str) -> Result<(), ClaimError> {
        let statement = self
            .statement(
                "UPDATE conversations SET set_aside_reason = $4, lease_owner = NULL,
                     lease_until_ms = 0
                 WHERE page_id = $1 AND user_psid = $2 AND lease_gen = $3",
            )
            .bind(reason);
        fenced(statement.execute(&self.db.pool).await)
    }

    /// Gives the claim back at once, unchanged (shutdown): another worker may take it now.
    pub async fn release(&mut self) -> Result<(), ClaimError> {
        let now = crate::now_ms();
        self.defer(now).await
    }

    async fn give_back(
        &self,
        sql: &str,
        due_at: i64,
        error: Option<&str>,
    ) -> Result<(), ClaimError> {
        let mut statement = self.statement(sql).bind(due_at);
        if let Some(error) = error {
            statement = statement.bind(error);
        }
        fenced(statement.execute(&self.db.pool).await)
    }
}

/// The outcome of a fenced statement: [`ClaimError::Lost`] when it matched no row (the claim's
/// generation is no longer the row's).
fn fenced(done: Result<AnyQueryResult, sqlx::Error>) -> Result<(), ClaimError> {
    if done.map_err(DbError::from)?.rows_affected() == 0 {
        return Err(ClaimError::Lost);
    }
    Ok(())
}
