//! Conversation claims: which worker may read, merge and write a conversation right now.
//!
//! A flusher claims a due conversation with one conditional `UPDATE` that only one worker can
//! win until the lease expires, and that bumps the row's fencing generation (`lease_gen`). The
//! won claim is a [`ConversationClaim`] value that owns the rest of the flush's lifecycle:
//! reserve a PUT, renew, finish, defer, fail, release. Every one of those statements is
//! conditioned on `lease_gen` still being this claim's generation, so a worker that stalled past
//! its lease (another worker has claimed since) finds its claim gone ([`ClaimError::Lost`]) and
//! changes nothing: it records no PUT, deletes no staged row, and is told not to send its PUT.

use std::time::{Duration, Instant};

use sqlx::Any;
use sqlx::any::{AnyArguments, AnyQueryResult};
use sqlx::query::Query;

use super::put_budget::{PutReservation, RecentPuts};
use super::{Backend, Database, DbError};
use crate::ids::{ConversationKey, PageId, Psid, UserUuid};
use crate::storage::budget::PutBudget;

/// Why a step of a claim did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another worker claimed the conversation since (this one's lease had expired): this
    /// flush must stop and send nothing.
    #[error("the claim on the conversation was lost to another worker")]
    Lost,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl crate::retry::RetryClass for ClaimError {
    /// A lost claim is final; a database error is as transient as the database says.
    fn is_transient(&self) -> bool {
        match self {
            ClaimError::Lost => false,
            ClaimError::Db(e) => e.is_transient(),
        }
    }
}

/// A won claim on one conversation, valid while its generation is the row's.
#[derive(Debug)]
pub struct ConversationClaim {
    /// The database the claim lives in.
    db: Database,
    /// Which conversation.
    key: ConversationKey,
    /// The fencing generation this claim holds; every step checks it.
    generation: i64,
    /// The staging generation seen when claiming; finishing marks it flushed.
    staged_gen: i64,
    /// Times of recent PUTs to the conversation's object, as of the claim.
    recent_puts: RecentPuts,
    /// The PUT times before this claim reserved its PUT, while that PUT is not sent: a
    /// deferral puts them back, so a PUT never sent does not use the object's budget.
    before_unsent_put: Option<RecentPuts>,
    /// Consecutive failed flushes before this one, for the backoff.
    failures: i64,
    /// The Page's owner as the claim was taken (whose folder the object is in); `None` when
    /// the Page is no longer registered.
    owner: Option<UserUuid>,
    /// A listing showed the object absent and nothing has written it since: the flush may
    /// write without reading it first.
    object_absent: bool,
    /// No flush has finished on this conversation yet: its object, if any, was not written
    /// by fbsync, so a listing of its Page's folder may spare the read.
    never_flushed: bool,
    /// When its oldest waiting event was received: claims of one round are flushed oldest
    /// first.
    waiting_since: i64,
    /// How long a claim lasts from its last renewal.
    lease: Duration,
    /// When this process must consider the lease gone, by its own clock (a monotonic clock
    /// that a stalled process cannot see jump): a PUT is not sent past it.
    local_deadline: Instant,
}

/// Milliseconds of a duration, for the database's time columns.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 4)
}

#[derive(sqlx::FromRow)]
struct ConversationRow {
    #[sqlx(try_from = "String")]
    page_id: PageId,
    #[sqlx(try_from = "String")]
    user_psid: Psid,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    page_id: String,
    user_psid: String,
    lease_gen: i64,
    staged_gen: i64,
    recent_puts: String,
    failures: i64,
    object_absent: i64,
    flushed_gen: i64,
    waiting_since_ms: i64,
    user_uuid: Option<String>,
}

impl Database {
    /// Conversations with events waiting whose budget allows a write now and that nobody holds,
    /// the one whose oldest event has waited longest first (none starves when more are due than
    /// the bucket can write).
    pub async fn due_conversations(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<ConversationKey>, DbError> {
        let rows = sqlx::query_as::<_, ConversationRow>(
            "SELECT page_id, user_psid FROM conversations
             WHERE staged_gen > flushed_gen AND due_at_ms <= $1 AND lease_until_ms < $1
               AND set_aside_reason IS NULL
             ORDER BY waiting_since_ms LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| ConversationKey {
                page_id: row.page_id,
                user_psid: row.user_psid,
            })
            .collect())
    }

    /// Records that a listing of the bucket, made before these conversations' events are
    /// staged, showed their objects absent: each that no flush has written yet may be written
    /// without being read first. Returns how many were marked.
    pub async fn mark_objects_absent(
        &self,
        page_id: &PageId,
        user_psids: &[&Psid],
    ) -> Result<u64, DbError> {
        let mut marked = 0;
        // The row is made when missing (nothing staged yet, so not due): a conversation is
        // marked before its events are staged, so no flush can claim it in between and read.
        for chunk in user_psids.chunks(200) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| format!("($1, ${}, 1)", i + 2))
                .collect();
            let sql = format!(
                "INSERT INTO conversations (page_id, user_psid, object_absent) VALUES {}
                 ON CONFLICT (page_id, user_psid) DO UPDATE SET object_absent = 1
                 WHERE conversations.flushed_gen = 0",
                rows.join(", ")
            );
            let mut query = sqlx::query(&sql).bind(page_id.as_str());
            for psid in chunk {
                query = query.bind(psid.as_str());
            }
            marked += query.execute(&self.pool).await?.rows_affected();
        }
        Ok(marked)
    }

    /// Takes the lease on a conversation, with a new fencing generation; `None` when another
    /// worker holds it or it is not due.
    pub async fn claim_conversation(
        &self,
        key: &ConversationKey,
        owner: &str,
        now: i64,
        lease: Duration,
    ) -> Result<Option<ConversationClaim>, DbError> {
        let local_deadline = Instant::now() + lease;
        let row = sqlx::query_as::<_, ClaimedRow>(&format!(
            "UPDATE conversations SET lease_owner = $3, lease_until_ms = $4, lease_gen = lease_gen + 1
             WHERE page_id = $1 AND user_psid = $2 AND {CLAIMABLE}
             RETURNING {CLAIMED}"
        ))
        .bind(key.page_id.as_str())
        .bind(key.user_psid.as_str())
        .bind(owner)
        .bind(now + millis(lease))
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| self.claim_of(row, lease, local_deadline))
            .transpose()
    }

    /// Claims up to `limit` due conversations at once (one statement, not one per
    /// conversation), the one whose oldest event has waited longest first; each claim as
    /// [`Database::claim_conversation`] makes it.
    pub async fn claim_due_conversations(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<ConversationClaim>, DbError> {
        let local_deadline = Instant::now() + lease;
        // The outer condition is checked again on each row as it is updated: a conversation
        // another worker claimed between the inner select and the update is skipped.
        let sql = match self.backend {
            // The select locks the rows it picks and passes over rows another transaction
            // holds (a worker's claim, staging's upsert): two claims that locked the same rows
            // in different orders deadlocked (the chaos benchmark saw 16 in a run), and a claim
            // never waits for a row it can take next round. Picked once, in a materialized CTE:
            // as an `IN` subquery, a locking select may run again for each row updated, each
            // time finding the next rows, and claim more than `$4`.
            Backend::Postgres => format!(
                "WITH picked AS MATERIALIZED (
                     SELECT page_id AS picked_page, user_psid AS picked_psid FROM conversations
                     WHERE staged_gen > flushed_gen AND due_at_ms <= $3 AND lease_until_ms < $3
                       AND set_aside_reason IS NULL
                     ORDER BY waiting_since_ms LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 UPDATE conversations SET lease_owner = $1, lease_until_ms = $2, lease_gen = lease_gen + 1
                 FROM picked
                 WHERE page_id = picked_page AND user_psid = picked_psid AND {CLAIMABLE_AT_3}
                 RETURNING {CLAIMED}"
            ),
            // One writer at a time: nothing to pass over.
            Backend::Sqlite => format!(
                "UPDATE conversations SET lease_owner = $1, lease_until_ms = $2, lease_gen = lease_gen + 1
                 WHERE (page_id, user_psid) IN (
                     SELECT page_id, user_psid FROM conversations
                     WHERE staged_gen > flushed_gen AND due_at_ms <= $3 AND lease_until_ms < $3
                       AND set_aside_reason IS NULL
                     ORDER BY waiting_since_ms LIMIT $4)
                   AND {CLAIMABLE_AT_3}
                 RETURNING {CLAIMED}"
            ),
        };
        let rows = sqlx::query_as::<_, ClaimedRow>(&sql)
            .bind(owner)
            .bind(now + millis(lease))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let mut claims = rows
            .into_iter()
            .map(|row| self.claim_of(row, lease, local_deadline))
            .collect::<Result<Vec<_>, _>>()?;
        claims.sort_by_key(|claim| claim.waiting_since);
        Ok(claims)
    }

    fn claim_of(
        &self,
        row: ClaimedRow,
        lease: Duration,
        local_deadline: Instant,
    ) -> Result<ConversationClaim, DbError> {
        let owner = match row.user_uuid.as_deref().map(UserUuid::parse) {
            Some(Ok(owner)) => Some(owner),
            Some(Err(e)) => return Err(DbError::Query(sqlx::Error::Decode(Box::new(e)))),
            None => None,
        };
        let key = ConversationKey {
            page_id: PageId::parse(&row.page_id)
                .map_err(|e| DbError::Query(sqlx::Error::Decode(Box::new(e))))?,
            user_psid: Psid::parse(&row.user_psid)
                .map_err(|e| DbError::Query(sqlx::Error::Decode(Box::new(e))))?,
        };
        Ok(ConversationClaim {
            db: self.clone(),
            key,
            generation: row.lease_gen,
            staged_gen: row.staged_gen,
            recent_puts: RecentPuts::decode(&row.recent_puts),
            before_unsent_put: None,
            failures: row.failures,
            object_absent: row.object_absent != 0,
            never_flushed: row.flushed_gen == 0,
            waiting_since: row.waiting_since_ms,
            owner,
            lease,
            local_deadline,
        })
    }
}

/// A conversation may be claimed: events wait, its budget allows a write now (`$5`), nobody
/// holds it and it is not set aside.
const CLAIMABLE: &str = "lease_until_ms < $5 AND due_at_ms <= $5 AND staged_gen > flushed_gen
    AND set_aside_reason IS NULL";

/// [`CLAIMABLE`], with the time in `$3`.
const CLAIMABLE_AT_3: &str = "lease_until_ms < $3 AND due_at_ms <= $3 AND staged_gen > flushed_gen
    AND set_aside_reason IS NULL";

/// What a claim returns about the conversation it won.
const CLAIMED: &str = "page_id, user_psid, lease_gen, staged_gen, recent_puts, failures,
    object_absent, flushed_gen, waiting_since_ms,
    (SELECT p.user_uuid FROM pages p WHERE p.page_id = conversations.page_id) AS user_uuid";

/// A conversation set aside, as operators see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SetAsideConversation {
    #[sqlx(try_from = "String")]
    pub page_id: PageId,
    #[sqlx(try_from = "String")]
    pub user_psid: Psid,
    /// Why its object could not be read.
    pub set_aside_reason: String,
}

impl Database {
    /// Conversations set aside, of one Page or all, ordered by Page and person.
    pub async fn set_aside_conversations(
        &self,
        page_id: Option<&PageId>,
    ) -> Result<Vec<SetAsideConversation>, DbError> {
        let rows = sqlx::query_as::<_, SetAsideConversation>(
            "SELECT page_id, user_psid, set_aside_reason FROM conversations
             WHERE set_aside_reason IS NOT NULL AND ($1 IS NULL OR page_id = $1)
             ORDER BY page_id, user_psid",
        )
        .bind(page_id.map(PageId::as_str))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Makes conversations that were set aside due again (their objects were fixed): those of
    /// a Page, or one of them. Returns how many.
    pub async fn requeue_set_aside(
        &self,
        page_id: &PageId,
        user_psid: Option<&Psid>,
    ) -> Result<u64, DbError> {
        let done = sqlx::query(
            "UPDATE conversations SET set_aside_reason = NULL, due_at_ms = 0, failures = 0
             WHERE page_id = $1 AND ($2 IS NULL OR user_psid = $2)
               AND set_aside_reason IS NOT NULL",
        )
        .bind(page_id.as_str())
        .bind(user_psid.map(Psid::as_str))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

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
    /// [`Database::mark_objects_absent`] recorded it for the claims after this one).
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
        if let Err(e) = self.db.mark_page_flushed(&self.key.page_id, now).await {
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
    /// re-queues it ([`Database::requeue_set_aside`]).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facebook::event::EventSource;
    use crate::storage::db::NewStagedEvent;
    use crate::storage::db::test_support::backends;

    fn key(psid: &str) -> ConversationKey {
        ConversationKey {
            page_id: PageId::parse("1").expect("page"),
            user_psid: Psid::parse(psid).expect("psid"),
        }
    }

    async fn stage(db: &Database, key: &ConversationKey, event_id: &str, now: i64) {
        let event = NewStagedEvent {
            key: key.clone(),
            event_id: event_id.into(),
            source: EventSource::Webhook,
            timestamp_ms: now,
            received_at_ms: now,
            body: format!(r#"{{"id":"{event_id}"}}"#),
        };
        db.stage_events(&[event], now).await.expect("stage");
    }

    const LEASE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_claim_passes_over_a_conversation_another_transaction_holds_instead_of_waiting() {
        for (backend, db) in backends().await {
            if backend != "postgres" {
                continue; // SQLite: one writer at a time, nothing to pass over.
            }
            let (held, free) = (key("u1"), key("u2"));
            stage(&db, &held, "e1", 1_000).await;
            stage(&db, &free, "e1", 1_001).await;
            // Another transaction (staging, another worker's claim) holds u1's row.
            let mut holder = db.pool.begin().await.expect("begin");
            sqlx::query("UPDATE conversations SET failures = failures WHERE user_psid = 'u1'")
                .execute(&mut *holder)
                .await
                .expect("lock u1");
            let claims = tokio::time::timeout(
                Duration::from_secs(5),
                db.claim_due_conversations("a", 2_000, LEASE, 10),
            )
            .await
            .expect("the claim does not wait for the held row")
            .expect("claim");
            let claimed: Vec<&str> = claims.iter().map(|c| c.key().user_psid.as_str()).collect();
            assert_eq!(claimed, ["u2"], "{backend}");
            holder.rollback().await.expect("rollback");
            let claims = db
                .claim_due_conversations("a", 2_000, LEASE, 10)
                .await
                .expect("claim");
            let claimed: Vec<&str> = claims.iter().map(|c| c.key().user_psid.as_str()).collect();
            assert_eq!(claimed, ["u1"], "{backend}: taken once it is free");
        }
    }

    #[tokio::test]
    async fn an_object_known_absent_is_written_unread_once_and_any_end_of_a_flush_forgets_it() {
        for (backend, db) in backends().await {
            let (fresh, failing, flushed) = (key("u1"), key("u2"), key("u3"));
            for key in [&fresh, &failing, &flushed] {
                stage(&db, key, "e1", 1_000).await;
            }
            // u3 was written by a flush before the listing's marks arrive.
            let mut claim = db
                .claim_conversation(&flushed, "a", 1_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            claim.finish(&[], 1_000, 1_000).await.expect("finish");
            let psids = [&fresh.user_psid, &failing.user_psid, &flushed.user_psid];
            let marked = db
                .mark_objects_absent(&fresh.page_id, &psids)
                .await
                .expect("mark");
            assert_eq!(
                marked, 2,
                "{backend}: a conversation flushed already is not marked"
            );

            let mut claim = db
                .claim_conversation(&fresh, "a", 2_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            assert!(claim.object_known_absent(), "{backend}");
            claim.finish(&[], 2_000, 2_000).await.expect("finish");
            stage(&db, &fresh, "e2", 3_000).await;
            let claim = db
                .claim_conversation(&fresh, "a", 3_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            assert!(
                !claim.object_known_absent(),
                "{backend}: written once, read from then on"
            );

            let claim = db
                .claim_conversation(&failing, "a", 3_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            assert!(claim.object_known_absent(), "{backend}");
            claim.fail("refused", 3_000).await.expect("fail");
            let claim = db
                .claim_conversation(&failing, "a", 3_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            assert!(
                !claim.object_known_absent(),
                "{backend}: after a failure, the next flush reads first"
            );
        }
    }

    #[tokio::test]
    async fn the_conversation_whose_oldest_event_waited_longest_is_due_first() {
        for (backend, db) in backends().await {
            let (flushed_long_ago, never_flushed, staged_during_a_flush) =
                (key("u1"), key("u2"), key("u3"));
            stage(&db, &flushed_long_ago, "e1", 1_000).await;
            let mut claim = db
                .claim_conversation(&flushed_long_ago, "a", 1_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            let seqs: Vec<i64> = db
                .staged_events(&flushed_long_ago)
                .await
                .expect("staged")
                .iter()
                .map(|e| e.seq)
                .collect();
            claim.finish(&seqs, 1_000, 1_000).await.expect("finish");

            stage(&db, &staged_during_a_flush, "e1", 1_500).await;
            let mut claim = db
                .claim_conversation(&staged_during_a_flush, "a", 1_500, LEASE)
                .await
                .expect("claim")
                .expect("due");
            let seqs: Vec<i64> = db
                .staged_events(&staged_during_a_flush)
                .await
                .expect("staged")
                .iter()
                .map(|e| e.seq)
                .collect();
            stage(&db, &staged_during_a_flush, "e2", 2_000).await;
            claim.finish(&seqs, 4_000, 4_000).await.expect("finish");

            stage(&db, &never_flushed, "e1", 3_000).await;
            stage(&db, &flushed_long_ago, "e2", 5_000).await;
            let due = db.due_conversations(6_000, 10).await.expect("due");
            let order: Vec<&str> = due.iter().map(|k| k.user_psid.as_str()).collect();
            assert_eq!(
                order,
                ["u3", "u2", "u1"],
                "{backend}: by the oldest waiting event (2,000, 3,000, 5,000), not by the last write"
            );
        }
    }

    #[tokio::test]
    async fn a_batch_claim_takes_the_longest_waiting_and_never_one_already_held() {
        for (backend, db) in backends().await {
            for (i, psid) in ["u5", "u4", "u3", "u2", "u1"].iter().enumerate() {
                stage(&db, &key(psid), "e1", 1_000 + i as i64).await;
            }
            let held = db
                .claim_conversation(&key("u4"), "x", 2_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            let first = db
                .claim_due_conversations("a", 2_000, LEASE, 2)
                .await
                .expect("claim");
            let psids = |claims: &[ConversationClaim]| -> Vec<String> {
                claims
                    .iter()
                    .map(|c| c.key().user_psid.to_string())
                    .collect()
            };
            assert_eq!(
                psids(&first),
                ["u5", "u3"],
                "{backend}: oldest first, u4 is held"
            );
            let rest = db
                .claim_due_conversations("b", 2_000, LEASE, 10)
                .await
                .expect("claim");
            assert_eq!(psids(&rest), ["u2", "u1"], "{backend}");
            assert!(
                db.claim_due_conversations("c", 2_000, LEASE, 10)
                    .await
                    .expect("claim")
                    .is_empty(),
                "{backend}: every conversation is held"
            );
            assert!(first.iter().chain(&rest).all(|c| c.generation() > 0));
            drop(held);
        }
    }

    #[tokio::test]
    async fn a_second_claim_of_a_leased_conversation_gets_nothing() {
        for (backend, db) in backends().await {
            let key = key("u1");
            stage(&db, &key, "e1", 1_000).await;
            let first = db
                .claim_conversation(&key, "a", 1_000, LEASE)
                .await
                .expect("claim");
            assert!(first.is_some(), "{backend}: the first claim wins");
            assert!(
                first.as_ref().is_some_and(|claim| claim.owner().is_none()),
                "{backend}: no owner for a Page that is not registered"
            );
            let second = db
                .claim_conversation(&key, "b", 1_001, LEASE)
                .await
                .expect("claim");
            assert!(
                second.is_none(),
                "{backend}: a leased conversation cannot be claimed"
            );
            assert!(
                db.due_conversations(1_001, 10)
                    .await
                    .expect("due")
                    .is_empty(),
                "{backend}: a leased conversation is not due"
            );
        }
    }

    #[tokio::test]
    async fn a_claim_carries_the_pages_owner_as_it_is_now() {
        for (backend, db) in backends().await {
            let key = key("u5");
            let owner = UserUuid::parse("6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11").expect("uuid");
            db.upsert_page(&key.page_id, &owner, vec![1], 1)
                .await
                .expect("page");
            stage(&db, &key, "e1", 1_000).await;
            let mut claim = db
                .claim_conversation(&key, "a", 1_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            assert_eq!(claim.owner(), Some(&owner), "{backend}");
            claim.defer(1_000).await.expect("defer");
            // The Page moves to another owner: the next claim writes to the new folder.
            let moved = UserUuid::parse("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d").expect("uuid");
            db.upsert_page(&key.page_id, &moved, vec![1], 2)
                .await
                .expect("page");
            let claim = db
                .claim_conversation(&key, "b", 2_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            assert_eq!(claim.owner(), Some(&moved), "{backend}");
        }
    }

    #[tokio::test]
    async fn a_sixth_put_reservation_inside_the_window_is_deferred() {
        let budget = PutBudget {
            puts_per_window: 5,
            window_ms: 300_000,
            margin_ms: 1_000,
        };
        for (backend, db) in backends().await {
            let key = key("u2");
            let mut now = 10_000;
            for put in 1..=5 {
                stage(&db, &key, &format!("e{put}"), now).await;
                let mut claim = db
                    .claim_conversation(&key, "a", now, LEASE)
                    .await
                    .expect("claim")
                    .expect("due");
                assert_eq!(
                    claim.reserve_put(&budget, now).await.expect("reserve"),
                    PutReservation::Reserved,
                    "{backend}: PUT {put} fits the budget"
                );
                claim.finish(&[], now, now).await.expect("finish");
                now += 1_000;
            }
            stage(&db, &key, "e6", now).await;
            let mut claim = db
                .claim_conversation(&key, "b", now, LEASE)
                .await
                .expect("claim")
                .expect("due");
            assert_eq!(
                claim.reserve_put(&budget, now).await.expect("reserve"),
                PutReservation::NotBefore(10_000 + 300_000 + 1_000),
                "{backend}: the sixth PUT waits for the first to leave the window"
            );
            claim.defer(311_000).await.expect("defer");
            // The deferral recorded nothing: a new claim sees the same five PUTs.
            assert!(
                db.claim_conversation(&key, "c", now, LEASE)
                    .await
                    .expect("claim")
                    .is_none()
            );
            let later = db
                .claim_conversation(&key, "c", 311_000, LEASE)
                .await
                .expect("claim")
                .expect("due again when the budget allows");
            assert_eq!(later.recent_puts.times().len(), 5, "{backend}");
        }
    }

    #[tokio::test]
    async fn a_reserved_put_that_is_deferred_unsent_leaves_the_object_budget_as_it_was() {
        let budget = PutBudget {
            puts_per_window: 1,
            window_ms: 300_000,
            margin_ms: 1_000,
        };
        for (backend, db) in backends().await {
            let key = key("u-unsent");
            stage(&db, &key, "e1", 1_000).await;
            for attempt in 0..3 {
                let now = 1_000 + attempt * 100;
                let mut claim = db
                    .claim_conversation(&key, "a", now, LEASE)
                    .await
                    .expect("claim")
                    .expect("due");
                assert_eq!(
                    claim.reserve_put(&budget, now).await.expect("reserve"),
                    PutReservation::Reserved,
                    "{backend}: attempt {attempt}: no PUT was ever sent"
                );
                // No room in the bucket's budget: deferred before the PUT is sent.
                claim.defer(now).await.expect("defer");
            }
        }
    }

    #[tokio::test]
    async fn a_set_aside_conversation_is_never_due_until_requeued() {
        for (backend, db) in backends().await {
            let key = key("u4");
            stage(&db, &key, "e1", 1_000).await;
            let claim = db
                .claim_conversation(&key, "a", 1_000, LEASE)
                .await
                .expect("claim")
                .expect("due");
            claim
                .set_aside("not a JSON array")
                .await
                .expect("set aside");
            assert!(
                db.due_conversations(i64::MAX / 4, 10)
                    .await
                    .expect("due")
                    .is_empty(),
                "{backend}"
            );
            assert!(
                db.claim_conversation(&key, "b", 2_000, LEASE)
                    .await
                    .expect("claim")
                    .is_none()
            );
            let aside = db
                .set_aside_conversations(Some(&key.page_id))
                .await
                .expect("list");
            assert_eq!(aside.len(), 1, "{backend}");
            assert_eq!(aside[0].set_aside_reason, "not a JSON array");
            assert_eq!(
                db.staged_events(&key).await.expect("staged").len(),
                1,
                "{backend}: events kept"
            );
            assert_eq!(
                db.requeue_set_aside(&key.page_id, None)
                    .await
                    .expect("requeue"),
                1
            );
            assert_eq!(
                db.due_conversations(2_000, 10).await.expect("due"),
                vec![key.clone()],
                "{backend}"
            );
        }
    }

    #[tokio::test]
    async fn a_lease_taken_over_after_expiry_fences_the_old_holder() {
        let budget = PutBudget {
            puts_per_window: 5,
            window_ms: 300_000,
            margin_ms: 1_000,
        };
        for (backend, db) in backends().await {
            let key = key("u3");
            stage(&db, &key, "e1", 1_000).await;
            let lease = Duration::from_millis(100);
            let mut stalled = db
                .claim_conversation(&key, "stalled", 1_000, lease)
                .await
                .expect("claim")
                .expect("due");
            let seqs: Vec<i64> = db
                .staged_events(&key)
                .await
                .expect("staged")
                .iter()
                .map(|event| event.seq)
                .collect();
            // The lease runs out; another worker takes the conversation over.
            let mut successor = db
                .claim_conversation(&key, "successor", 1_200, LEASE)
                .await
                .expect("claim")
                .expect("an expired lease can be taken over");
            // The old holder wakes up: every step it tries is refused and changes nothing.
            assert!(
                matches!(stalled.renew(1_300).await, Err(ClaimError::Lost)),
                "{backend}: renew"
            );
            assert!(
                matches!(
                    stalled.reserve_put(&budget, 1_300).await,
                    Err(ClaimError::Lost)
                ),
                "{backend}: a PUT reservation"
            );
            assert!(
                matches!(
                    stalled.finish(&seqs, 1_300, 1_300).await,
                    Err(ClaimError::Lost)
                ),
                "{backend}: finishing deletes nothing"
            );
            assert_eq!(
                db.staged_events(&key).await.expect("staged").len(),
                1,
                "{backend}: the staged event is still there"
            );
            // The successor's claim is intact and saw no PUT recorded by the old holder.
            assert!(successor.recent_puts.times().is_empty(), "{backend}");
            assert_eq!(
                successor
                    .reserve_put(&budget, 1_400)
                    .await
                    .expect("reserve"),
                PutReservation::Reserved
            );
            successor.finish(&seqs, 1_400, 1_400).await.expect("finish");
            assert!(
                db.staged_events(&key).await.expect("staged").is_empty(),
                "{backend}"
            );
        }
    }
}
