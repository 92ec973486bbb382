//! The Page registry: who owns a Page, its sealed token, and its health.

use std::fmt;

use super::{Database, DbError};
use crate::ids::{PageId, UserUuid};

/// A Page's health, as stored and as `fbsync pages list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageStatus {
    /// Synced normally.
    Active,
    /// The Graph API refused its token (code 190): the owner must connect it again.
    NeedsReauth,
}

impl PageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PageStatus::Active => "active",
            PageStatus::NeedsReauth => "needs_reauth",
        }
    }
}

impl fmt::Display for PageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl TryFrom<String> for PageStatus {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "active" => Ok(PageStatus::Active),
            "needs_reauth" => Ok(PageStatus::NeedsReauth),
            other => Err(format!("unknown page status {other:?}")),
        }
    }
}

/// A registered Page as the pipeline needs it (the token still sealed).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PageRecord {
    #[sqlx(try_from = "String")]
    pub page_id: PageId,
    /// Whose bucket folder the Page's objects go to.
    #[sqlx(try_from = "String")]
    pub user_uuid: UserUuid,
    /// The Page token, encrypted and bound to the Page id (see `crypto`).
    pub token_sealed: Vec<u8>,
    #[sqlx(try_from = "String")]
    pub status: PageStatus,
}

/// A registered Page as operators see it (never holds a token).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PageSummary {
    #[sqlx(try_from = "String")]
    pub page_id: PageId,
    #[sqlx(try_from = "String")]
    pub user_uuid: UserUuid,
    #[sqlx(try_from = "String")]
    pub status: PageStatus,
    pub last_event_ms: Option<i64>,
    pub last_flush_ms: Option<i64>,
    pub last_error_ms: Option<i64>,
    pub last_error: Option<String>,
    /// Events staged for this Page and not yet stored.
    pub staged: i64,
    /// Conversations set aside because their stored object cannot be read.
    pub set_aside: i64,
    /// When the last complete Graph poll ended; `None`: never polled.
    pub last_poll_ms: Option<i64>,
    /// When a poll in progress started; `None`: none in progress.
    pub poll_started_ms: Option<i64>,
    /// Messages whose details the Graph API refused (older than a conversation's 20 most
    /// recent), over every poll.
    pub details_unavailable: i64,
}

impl Database {
    /// Registers a Page, or replaces its owner and token (and clears a re-auth flag).
    pub async fn upsert_page(
        &self,
        page_id: &PageId,
        user_uuid: &UserUuid,
        token_sealed: Vec<u8>,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO pages (page_id, user_uuid, token_sealed, status, created_at_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (page_id) DO UPDATE SET user_uuid = excluded.user_uuid,
                 token_sealed = excluded.token_sealed, status = excluded.status,
                 last_error = NULL, last_error_ms = NULL",
        )
        .bind(page_id.as_str())
        .bind(user_uuid.as_str())
        .bind(token_sealed)
        .bind(PageStatus::Active.as_str())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a Page (and its poll state); true when it was registered.
    pub async fn remove_page(&self, page_id: &PageId) -> Result<bool, DbError> {
        sqlx::query("DELETE FROM page_polls WHERE page_id = $1")
            .bind(page_id.as_str())
            .execute(&self.pool)
            .await?;
        let done = sqlx::query("DELETE FROM pages WHERE page_id = $1")
            .bind(page_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// A registered Page, or `None`.
    pub async fn page(&self, page_id: &PageId) -> Result<Option<PageRecord>, DbError> {
        let record = sqlx::query_as::<_, PageRecord>(
            "SELECT page_id, user_uuid, token_sealed, status FROM pages WHERE page_id = $1",
        )
        .bind(page_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(record)
    }

    /// Every registered Page with its staged backlog, ordered by id.
    pub async fn list_pages(&self) -> Result<Vec<PageSummary>, DbError> {
        let pages = sqlx::query_as::<_, PageSummary>(
            "SELECT p.page_id, p.user_uuid, p.status, p.last_event_ms, p.last_flush_ms,
                    p.last_error_ms, p.last_error,
                    (SELECT COUNT(*) FROM staged_events s WHERE s.page_id = p.page_id) AS staged,
                    (SELECT COUNT(*) FROM conversations c
                     WHERE c.page_id = p.page_id AND c.set_aside_reason IS NOT NULL) AS set_aside,
                    q.last_complete_end_ms AS last_poll_ms, q.started_at_ms AS poll_started_ms,
                    COALESCE(q.details_unavailable_total, 0) AS details_unavailable
             FROM pages p LEFT JOIN page_polls q ON q.page_id = p.page_id ORDER BY p.page_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(pages)
    }

    /// Records an error on a Page, and a new status when the error changes it.
    pub async fn mark_page_error(
        &self,
        page_id: &PageId,
        status: Option<PageStatus>,
        error: &str,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE pages SET last_error = $2, last_error_ms = $3, status = COALESCE($4, status)
             WHERE page_id = $1",
        )
        .bind(page_id.as_str())
        .bind(error)
        .bind(now)
        .bind(status.map(PageStatus::as_str))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Numbers a fetch of the Page's metadata that is about to start; `None` when the Page is
    /// not registered.
    pub async fn begin_metadata_fetch(&self, page_id: &PageId) -> Result<Option<i64>, DbError> {
        let seq: Option<(i64,)> = sqlx::query_as(
            "UPDATE pages SET metadata_fetch_seq = metadata_fetch_seq + 1 WHERE page_id = $1
             RETURNING metadata_fetch_seq",
        )
        .bind(page_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(seq.map(|(seq,)| seq))
    }

    /// Claims the right to write `page_data.json` from fetch number `seq`: false when a newer
    /// fetch has written it already (this one is stale and must not overwrite it).
    pub async fn claim_metadata_write(&self, page_id: &PageId, seq: i64) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE pages SET metadata_written_seq = $2
             WHERE page_id = $1 AND metadata_written_seq < $2",
        )
        .bind(page_id.as_str())
        .bind(seq)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a successful write for a Page.
    pub async fn mark_page_flushed(&self, page_id: &PageId, now: i64) -> Result<(), DbError> {
        self.touch_page_time(page_id, "last_flush_ms", now).await
    }

    /// Records that events of a Page arrived.
    pub(super) async fn mark_page_event(&self, page_id: &PageId, now: i64) -> Result<(), DbError> {
        self.touch_page_time(page_id, "last_event_ms", now).await
    }

    /// Sets one of a Page's time columns to `now`, at most once a second: the row is shared by
    /// all the Page's conversations and workers, and is hot.
    async fn touch_page_time(
        &self,
        page_id: &PageId,
        column: &'static str,
        now: i64,
    ) -> Result<(), DbError> {
        let sql = format!(
            "UPDATE pages SET {column} = $2 WHERE page_id = $1 AND COALESCE({column}, 0) < $2 - 1000"
        );
        sqlx::query(&sql)
            .bind(page_id.as_str())
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::db::test_support::backends;

    #[tokio::test]
    async fn metadata_from_an_older_fetch_never_overwrites_a_newer_one() {
        for (backend, db) in backends().await {
            let page = PageId::parse("42").expect("page");
            let user = UserUuid::parse("6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11").expect("uuid");
            assert_eq!(
                db.begin_metadata_fetch(&page).await.expect("seq"),
                None,
                "{backend}"
            );
            db.upsert_page(&page, &user, vec![1], 1)
                .await
                .expect("page");
            let slow = db
                .begin_metadata_fetch(&page)
                .await
                .expect("seq")
                .expect("registered");
            let fast = db
                .begin_metadata_fetch(&page)
                .await
                .expect("seq")
                .expect("registered");
            assert!(fast > slow, "{backend}");
            assert!(
                db.claim_metadata_write(&page, fast).await.expect("claim"),
                "{backend}"
            );
            assert!(
                !db.claim_metadata_write(&page, slow).await.expect("claim"),
                "{backend}: the older fetch finds a newer one written"
            );
            let newest = db
                .begin_metadata_fetch(&page)
                .await
                .expect("seq")
                .expect("registered");
            assert!(
                db.claim_metadata_write(&page, newest).await.expect("claim"),
                "{backend}"
            );
        }
    }
}
