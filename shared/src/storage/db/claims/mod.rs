//! Conversation claims: which worker may read, merge and write a conversation right now.
//!
//! A flusher claims a due conversation with one conditional `UPDATE` that only one worker can
//! win until the lease expires, and that bumps the row's fencing generation (`lease_gen`). The
//! won claim is a [`ConversationClaim`] value that owns the rest of the flush's lifecycle:
//! reserve a PUT, renew, finish, defer, fail, release. Every one of those statements is
//! conditioned on `lease_gen` still being this claim's generation, so a worker that stalled past
//! its lease (another worker has claimed since) finds its claim gone ([`ClaimError::Lost`]) and
//! changes nothing: it records no PUT, deletes no staged row, and is told not to send its PUT.
//!
//! This file claims; `lifecycle.rs` is the rest of a claim's life; the tests are in `tests.rs`.

mod lifecycle;

use std::time::{Duration, Instant};

use super::put_budget::RecentPuts;
use super::{Backend, Database, DbError};
use crate::ids::{ConversationKey, PageId, Psid, UserUuid};
use crate::storage::db::Conversations;

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

impl Conversations {
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
        .fetch_all(&self.db.pool)
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
            marked += query.execute(&self.db.pool).await?.rows_affected();
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
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|row| self.claim_of(row, lease, local_deadline))
            .transpose()
    }

    /// Claims up to `limit` due conversations at once (one statement, not one per
    /// conversation), the one whose oldest event has waited longest first; each claim as
    /// [`Conversations::claim_conversation`] makes it.
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
        let sql = match self.db.backend {
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
            .fetch_all(&self.db.pool)
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
            db: self.db.clone(),
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

impl Conversations {
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
        .fetch_all(&self.db.pool)
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
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests;
