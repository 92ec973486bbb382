//! The Page registry: who owns a Page, its sealed token, and its health.

use std::fmt;

use super::{DbError, Registry};
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
    /// Conversations stored at least once.
    pub conversations_stored: i64,
    /// Onboarding (a Page connected through Facebook Login): the app's subscription.
    pub onboard_subscribe: Option<String>,
    /// Onboarding: the first `page_data.json`.
    pub onboard_page_data: Option<String>,
    /// Onboarding: the conversation backfill.
    pub onboard_backfill: Option<String>,
    /// The Page's name as Facebook Login handed it over; `None` for Pages an operator added.
    pub name: Option<String>,
    /// When the last complete backfill (the Page's whole history) ended.
    pub last_backfill_end_ms: Option<i64>,
    /// Facebook's last policy enforcement on the Page's messaging: `warning`, `block` or
    /// `unblock`, with its reason and time.
    pub policy_action: Option<String>,
    pub policy_reason: Option<String>,
    pub policy_at_ms: Option<i64>,
    /// When the scheduler last found the Page's webhook subscription complete (or restored it).
    pub subscription_checked_at_ms: Option<i64>,
    /// When the check last found the subscription lost and subscribed the Page again.
    pub subscription_restored_at_ms: Option<i64>,
}

/// What a subscription check needs to know of a Page.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct SubscriptionRecord {
    /// When the last check finished.
    pub checked_at_ms: Option<i64>,
    /// When a lost subscription was last restored.
    pub restored_at_ms: Option<i64>,
    /// The Page's last webhook event.
    pub last_event_ms: Option<i64>,
    /// The last complete poll's start: everything updated before it was read then.
    pub last_complete_start_ms: Option<i64>,
}

impl SubscriptionRecord {
    /// Whether a restoration's gap poll is still owed (restored after the last finished check).
    pub fn gap_poll_owed(&self) -> bool {
        self.restored_at_ms
            .is_some_and(|restored| self.checked_at_ms.is_none_or(|checked| restored > checked))
    }

    /// Where the gap's poll reads back to: the subscription was good at the last finished
    /// check, so it was lost after it; from the Page's last event if that is earlier (Meta's
    /// advice); never before the last complete poll's start, which read everything older.
    /// `None`: the plain daily cut-off.
    pub fn gap_start_ms(&self) -> Option<i64> {
        let lost_after = match (self.checked_at_ms, self.last_event_ms) {
            (Some(checked), Some(event)) => Some(checked.min(event)),
            (checked, event) => checked.or(event),
        }?;
        Some(match self.last_complete_start_ms {
            Some(polled) => lost_after.max(polled),
            None => lost_after,
        })
    }
}

impl PageSummary {
    /// Whether Facebook blocks the Page's messaging now (its last enforcement was a block).
    pub fn messaging_blocked(&self) -> bool {
        self.policy_action.as_deref() == Some("block")
    }
}

/// The steps of a Page's onboarding, each with its outcome on the Page's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum OnboardStep {
    /// Subscribe the app to the Page's webhooks.
    Subscribe,
    /// Write `page_data.json`.
    PageData,
    /// Backfill the conversations.
    Backfill,
}

impl OnboardStep {
    /// The step's name, as `pages list` and the status page show it.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Every step, in the order onboarding runs them.
    pub fn all() -> impl Iterator<Item = OnboardStep> {
        <OnboardStep as strum::IntoEnumIterator>::iter()
    }

    /// The column that holds its outcome.
    fn column(self) -> &'static str {
        match self {
            OnboardStep::Subscribe => "onboard_subscribe",
            OnboardStep::PageData => "onboard_page_data",
            OnboardStep::Backfill => "onboard_backfill",
        }
    }
}

impl PageSummary {
    /// Each onboarding step with its outcome (`None`: the Page was not onboarded).
    pub fn onboarding(&self) -> [(OnboardStep, Option<&str>); 3] {
        [
            (OnboardStep::Subscribe, self.onboard_subscribe.as_deref()),
            (OnboardStep::PageData, self.onboard_page_data.as_deref()),
            (OnboardStep::Backfill, self.onboard_backfill.as_deref()),
        ]
    }
}

/// The columns of a [`PageSummary`], from [`SUMMARY_FROM`].
const SUMMARY_COLUMNS: &str = "p.page_id, p.user_uuid, p.status, p.last_event_ms, p.last_flush_ms,
        p.last_error_ms, p.last_error,
        (SELECT COUNT(*) FROM staged_events s WHERE s.page_id = p.page_id) AS staged,
        (SELECT COUNT(*) FROM conversations c
         WHERE c.page_id = p.page_id AND c.set_aside_reason IS NOT NULL) AS set_aside,
        q.last_complete_end_ms AS last_poll_ms, q.started_at_ms AS poll_started_ms,
        COALESCE(q.details_unavailable_total, 0) AS details_unavailable,
        (SELECT COUNT(*) FROM conversations c
         WHERE c.page_id = p.page_id AND c.flushed_gen > 0
           AND c.user_psid <> 'page_events') AS conversations_stored,
        p.onboard_subscribe, p.onboard_page_data, p.onboard_backfill, p.name,
        q.last_backfill_end_ms, p.policy_action, p.policy_reason, p.policy_at_ms,
        p.subscription_checked_at_ms, p.subscription_restored_at_ms";

/// The tables a [`PageSummary`] is read from.
const SUMMARY_FROM: &str = "FROM pages p LEFT JOIN page_polls q ON q.page_id = p.page_id";

impl Registry {
    /// Registers a Page, or replaces its owner and token (and clears a re-auth flag): the
    /// operator's way (`pages add`), so the token in use is nobody's of `page_connections.rs`.
    pub async fn upsert_page(
        &self,
        page_id: &PageId,
        user_uuid: &UserUuid,
        token_sealed: Vec<u8>,
        now: i64,
    ) -> Result<(), DbError> {
        // A Page registered for another shop takes none of the old shop's people with it.
        sqlx::query("DELETE FROM page_connections WHERE page_id = $1 AND user_uuid <> $2")
            .bind(page_id.as_str())
            .bind(user_uuid.as_str())
            .execute(&self.db.pool)
            .await?;
        sqlx::query(
            "INSERT INTO pages (page_id, user_uuid, token_sealed, status, created_at_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (page_id) DO UPDATE SET user_uuid = excluded.user_uuid,
                 token_sealed = excluded.token_sealed, status = excluded.status,
                 connected_by = NULL, last_error = NULL, last_error_ms = NULL",
        )
        .bind(page_id.as_str())
        .bind(user_uuid.as_str())
        .bind(token_sealed)
        .bind(PageStatus::Active.as_str())
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Removes a Page (its poll state and the people who connected it with it); true when it
    /// was registered.
    pub async fn remove_page(&self, page_id: &PageId) -> Result<bool, DbError> {
        let mut transaction = self.db.pool.begin().await?;
        sqlx::query("DELETE FROM page_connections WHERE page_id = $1")
            .bind(page_id.as_str())
            .execute(&mut *transaction)
            .await?;
        let removed = remove_page_rows(&mut transaction, page_id.as_str()).await?;
        transaction.commit().await?;
        Ok(removed)
    }

    /// A registered Page, or `None`.
    pub async fn page(&self, page_id: &PageId) -> Result<Option<PageRecord>, DbError> {
        let record = sqlx::query_as::<_, PageRecord>(
            "SELECT page_id, user_uuid, token_sealed, status FROM pages WHERE page_id = $1",
        )
        .bind(page_id.as_str())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(record)
    }

    /// Every registered Page with its staged backlog, ordered by id.
    pub async fn list_pages(&self) -> Result<Vec<PageSummary>, DbError> {
        let sql = format!("SELECT {SUMMARY_COLUMNS} {SUMMARY_FROM} ORDER BY p.page_id");
        let pages = sqlx::query_as::<_, PageSummary>(&sql)
            .fetch_all(&self.db.pool)
            .await?;
        Ok(pages)
    }

    /// The Pages of one user, ordered by id (the owner's status page).
    pub async fn pages_of_user(&self, user: &UserUuid) -> Result<Vec<PageSummary>, DbError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} {SUMMARY_FROM} WHERE p.user_uuid = $1 ORDER BY p.page_id"
        );
        let pages = sqlx::query_as::<_, PageSummary>(&sql)
            .bind(user.as_str())
            .fetch_all(&self.db.pool)
            .await?;
        Ok(pages)
    }

    /// Records Facebook's policy enforcement on the Page's messaging (`warning`, `block`,
    /// `unblock`) unless a later one is recorded already (events may arrive out of order).
    pub async fn record_policy_enforcement(
        &self,
        page_id: &PageId,
        action: &str,
        reason: Option<&str>,
        at_ms: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE pages SET policy_action = $2, policy_reason = $3, policy_at_ms = $4
             WHERE page_id = $1 AND (policy_at_ms IS NULL OR policy_at_ms <= $4)",
        )
        .bind(page_id.as_str())
        .bind(action)
        .bind(reason)
        .bind(at_ms)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Records that the Page's subscription was found lost and subscribed again at `now`
    /// (before its gap's poll is queued, so a redelivery of the check still queues it).
    pub async fn record_subscription_restored(
        &self,
        page_id: &PageId,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE pages SET subscription_restored_at_ms = $2 WHERE page_id = $1")
            .bind(page_id.as_str())
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Records a finished subscription check of the Page at `now` (its gap polled, if any).
    pub async fn record_subscription_check(
        &self,
        page_id: &PageId,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE pages SET subscription_checked_at_ms = $2 WHERE page_id = $1")
            .bind(page_id.as_str())
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// The Page's subscription record: when the last check finished, when a lost subscription
    /// was last restored, its last webhook event and its last complete poll's start.
    pub async fn subscription_record(
        &self,
        page_id: &PageId,
    ) -> Result<SubscriptionRecord, DbError> {
        let row: Option<SubscriptionRecord> = sqlx::query_as(
            "SELECT p.subscription_checked_at_ms AS checked_at_ms,
                    p.subscription_restored_at_ms AS restored_at_ms,
                    p.last_event_ms, q.last_complete_start_ms
             FROM pages p LEFT JOIN page_polls q ON q.page_id = p.page_id
             WHERE p.page_id = $1",
        )
        .bind(page_id.as_str())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.unwrap_or_default())
    }

    /// How many Pages Facebook blocks from messaging now (the gauge).
    pub async fn messaging_blocked_pages(&self) -> Result<i64, DbError> {
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM pages WHERE policy_action = 'block'")
                .fetch_one(&self.db.pool)
                .await?;
        Ok(count)
    }

    /// Records the outcome of one onboarding step of a Page.
    pub async fn set_onboard_step(
        &self,
        page_id: &PageId,
        step: OnboardStep,
        outcome: &str,
    ) -> Result<(), DbError> {
        let sql = format!("UPDATE pages SET {} = $2 WHERE page_id = $1", step.column());
        sqlx::query(&sql)
            .bind(page_id.as_str())
            .bind(outcome)
            .execute(&self.db.pool)
            .await?;
        Ok(())
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
        .execute(&self.db.pool)
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
        .fetch_optional(&self.db.pool)
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
        .execute(&self.db.pool)
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
    /// all the Page's conversations and workers, and is hot. Within a second of this process's
    /// last setting of it, the statement is not even sent.
    async fn touch_page_time(
        &self,
        page_id: &PageId,
        column: &'static str,
        now: i64,
    ) -> Result<(), DbError> {
        {
            let mut set = self
                .db
                .page_times_set
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let last = set.entry((page_id.clone(), column)).or_insert(i64::MIN / 2);
            if now - *last < 1000 {
                return Ok(());
            }
            *last = now;
        }
        let sql = format!(
            "UPDATE pages SET {column} = $2 WHERE page_id = $1 AND COALESCE({column}, 0) < $2 - 1000"
        );
        sqlx::query(&sql)
            .bind(page_id.as_str())
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }
}

/// Removes a Page's row and its poll state inside `transaction`; true when it was registered.
pub(super) async fn remove_page_rows(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    page: &str,
) -> Result<bool, DbError> {
    sqlx::query("DELETE FROM page_polls WHERE page_id = $1")
        .bind(page)
        .execute(&mut **transaction)
        .await?;
    let done = sqlx::query("DELETE FROM pages WHERE page_id = $1")
        .bind(page)
        .execute(&mut **transaction)
        .await?;
    Ok(done.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_subscriptions_gap_reads_back_to_its_loss_and_no_further_than_needed() {
        let record = |checked, event, polled| SubscriptionRecord {
            checked_at_ms: checked,
            restored_at_ms: None,
            last_event_ms: event,
            last_complete_start_ms: polled,
        };
        // Lost after the last good check, or from the last event if earlier.
        assert_eq!(record(Some(500), Some(900), None).gap_start_ms(), Some(500));
        assert_eq!(record(Some(500), Some(300), None).gap_start_ms(), Some(300));
        // Never before the last complete poll, which read everything older.
        assert_eq!(
            record(Some(500), Some(10), Some(400)).gap_start_ms(),
            Some(400)
        );
        assert_eq!(record(None, None, Some(400)).gap_start_ms(), None);
        let mut owed = record(Some(500), None, None);
        assert!(!owed.gap_poll_owed());
        owed.restored_at_ms = Some(600);
        assert!(
            owed.gap_poll_owed(),
            "restored after the last finished check"
        );
        owed.checked_at_ms = Some(700);
        assert!(!owed.gap_poll_owed());
    }
    use crate::storage::db::test_support::backends;

    #[tokio::test]
    async fn metadata_from_an_older_fetch_never_overwrites_a_newer_one() {
        for (backend, db) in backends().await {
            let page = PageId::parse("42").expect("page");
            let user = UserUuid::parse("6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11").expect("uuid");
            assert_eq!(
                db.registry()
                    .begin_metadata_fetch(&page)
                    .await
                    .expect("seq"),
                None,
                "{backend}"
            );
            db.registry()
                .upsert_page(&page, &user, vec![1], 1)
                .await
                .expect("page");
            let slow = db
                .registry()
                .begin_metadata_fetch(&page)
                .await
                .expect("seq")
                .expect("registered");
            let fast = db
                .registry()
                .begin_metadata_fetch(&page)
                .await
                .expect("seq")
                .expect("registered");
            assert!(fast > slow, "{backend}");
            assert!(
                db.registry()
                    .claim_metadata_write(&page, fast)
                    .await
                    .expect("claim"),
                "{backend}"
            );
            assert!(
                !db.registry()
                    .claim_metadata_write(&page, slow)
                    .await
                    .expect("claim"),
                "{backend}: the older fetch finds a newer one written"
            );
            let newest = db
                .registry()
                .begin_metadata_fetch(&page)
                .await
                .expect("seq")
                .expect("registered");
            assert!(
                db.registry()
                    .claim_metadata_write(&page, newest)
                    .await
                    .expect("claim"),
                "{backend}"
            );
        }
    }
}
