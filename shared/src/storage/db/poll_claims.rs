//! The scheduler's claims: one per Page and period of each kind of round (polls; subscription
//! checks), so a Page's job is enqueued once per period however many schedulers run.
//!
//! A scheduler claims, publishes the job with a confirm, then marks the claim enqueued. A
//! publish that fails drops the claim (the next tick tries again); a scheduler that dies between
//! claim and publish leaves a claim that is not enqueued, which another scheduler takes over
//! once it is older than the stale age.

use super::{DbError, Polls};
use crate::ids::PageId;

/// A kind of round the scheduler plans, each with its own claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// A Graph poll per Page and POLL_SCHEDULE period (`poll_claims`).
    Poll,
    /// A webhook subscription check per Page and SUBSCRIPTION_CHECK_INTERVAL (`subscription_claims`).
    SubscriptionCheck,
}

impl Round {
    /// The table of its claims.
    fn table(self) -> &'static str {
        match self {
            Round::Poll => "poll_claims",
            Round::SubscriptionCheck => "subscription_claims",
        }
    }
}

impl Polls {
    /// Active Pages (not waiting for re-authorisation) whose job of `round` for the period
    /// starting at `period_ms` is neither enqueued nor freshly claimed (claimed at or after
    /// `stale_before_ms`), ordered by id.
    pub async fn pages_due(
        &self,
        round: Round,
        period_ms: i64,
        stale_before_ms: i64,
    ) -> Result<Vec<PageId>, DbError> {
        // Subscription checks are for Pages connected through the owner flow: a Page an
        // operator added is subscribed by the operator, in the app's dashboard.
        let owned = match round {
            Round::Poll => "",
            Round::SubscriptionCheck => "AND p.onboard_subscribe IS NOT NULL",
        };
        let sql = format!(
            "SELECT p.page_id FROM pages p
             WHERE p.status = 'active' {owned} AND NOT EXISTS (
                 SELECT 1 FROM {} c
                 WHERE c.page_id = p.page_id AND c.period_ms = $1
                   AND (c.enqueued_at_ms IS NOT NULL OR c.claimed_at_ms >= $2))
             ORDER BY p.page_id",
            round.table()
        );
        let rows = sqlx::query_as::<_, (String,)>(&sql)
            .bind(period_ms)
            .bind(stale_before_ms)
            .fetch_all(&self.db.pool)
            .await?;
        page_ids(rows)
    }

    /// Every active Page (not waiting for re-authorisation), ordered by id.
    pub async fn active_pages(&self) -> Result<Vec<PageId>, DbError> {
        let rows = sqlx::query_as::<_, (String,)>(
            "SELECT page_id FROM pages WHERE status = 'active' ORDER BY page_id",
        )
        .fetch_all(&self.db.pool)
        .await?;
        page_ids(rows)
    }

    /// Pages that rounds skip because their token needs re-authorisation.
    pub async fn pages_needing_reauth(&self) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query_as::<_, (String,)>(
            "SELECT page_id FROM pages WHERE status = 'needs_reauth' ORDER BY page_id",
        )
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Claims the Page's job of `round` for the period: true when this caller won it (a new
    /// claim, or a stale one never enqueued, claimed before `stale_before_ms`).
    pub async fn claim(
        &self,
        round: Round,
        page_id: &PageId,
        period_ms: i64,
        now: i64,
        stale_before_ms: i64,
    ) -> Result<bool, DbError> {
        let table = round.table();
        let sql = format!(
            "INSERT INTO {table} (page_id, period_ms, claimed_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (page_id, period_ms) DO UPDATE SET claimed_at_ms = excluded.claimed_at_ms
             WHERE {table}.enqueued_at_ms IS NULL AND {table}.claimed_at_ms < $4"
        );
        let done = sqlx::query(&sql)
            .bind(page_id.as_str())
            .bind(period_ms)
            .bind(now)
            .bind(stale_before_ms)
            .execute(&self.db.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that the claimed job is confirmed on the queue.
    pub async fn mark_enqueued(
        &self,
        round: Round,
        page_id: &PageId,
        period_ms: i64,
        now: i64,
    ) -> Result<(), DbError> {
        let sql = format!(
            "UPDATE {} SET enqueued_at_ms = $3 WHERE page_id = $1 AND period_ms = $2",
            round.table()
        );
        sqlx::query(&sql)
            .bind(page_id.as_str())
            .bind(period_ms)
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Drops a claim whose job could not be published, so the next tick tries again.
    pub async fn drop_claim(
        &self,
        round: Round,
        page_id: &PageId,
        period_ms: i64,
    ) -> Result<(), DbError> {
        let sql = format!(
            "DELETE FROM {} WHERE page_id = $1 AND period_ms = $2 AND enqueued_at_ms IS NULL",
            round.table()
        );
        sqlx::query(&sql)
            .bind(page_id.as_str())
            .bind(period_ms)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Deletes claims of `round` whose periods started before `before_ms`.
    pub async fn prune_claims(&self, round: Round, before_ms: i64) -> Result<u64, DbError> {
        let sql = format!("DELETE FROM {} WHERE period_ms < $1", round.table());
        let done = sqlx::query(&sql)
            .bind(before_ms)
            .execute(&self.db.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

/// Page ids read from rows, validated.
fn page_ids(rows: Vec<(String,)>) -> Result<Vec<PageId>, DbError> {
    rows.into_iter()
        .map(|(id,)| {
            PageId::parse(&id).map_err(|e| {
                DbError::Query(sqlx::Error::Decode(
                    format!("pages.page_id {id:?}: {e}").into(),
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserUuid;
    use crate::storage::db::PageStatus;
    use crate::storage::db::test_support::backends;

    #[tokio::test]
    async fn a_page_is_claimed_once_per_period_and_a_stale_unpublished_claim_is_taken_over() {
        for (backend, db) in backends().await {
            let user = UserUuid::parse("6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11").expect("uuid");
            let (a, b) = (
                PageId::parse("1").expect("id"),
                PageId::parse("2").expect("id"),
            );
            for page in [&a, &b] {
                db.registry()
                    .upsert_page(page, &user, vec![1], 1)
                    .await
                    .expect("page");
            }
            db.registry()
                .mark_page_error(&b, Some(PageStatus::NeedsReauth), "190", 1)
                .await
                .expect("flag");
            assert_eq!(
                db.polls()
                    .pages_due(Round::Poll, 100, 0)
                    .await
                    .expect("plan"),
                vec![a.clone()],
                "{backend}: a Page that needs re-authorisation is skipped"
            );
            assert!(
                db.polls()
                    .claim(Round::Poll, &a, 100, 1_000, 0)
                    .await
                    .expect("claim"),
                "{backend}"
            );
            assert!(
                !db.polls()
                    .claim(Round::Poll, &a, 100, 1_001, 0)
                    .await
                    .expect("claim"),
                "{backend}: a second scheduler loses"
            );
            assert!(
                db.polls()
                    .pages_due(Round::Poll, 100, 500)
                    .await
                    .expect("plan")
                    .is_empty(),
                "{backend}: a fresh claim is planned by nobody else"
            );
            // Its scheduler died before publishing: once stale, another takes it over.
            assert_eq!(
                db.polls()
                    .pages_due(Round::Poll, 100, 2_000)
                    .await
                    .expect("plan"),
                vec![a.clone()]
            );
            assert!(
                db.polls()
                    .claim(Round::Poll, &a, 100, 5_000, 2_000)
                    .await
                    .expect("claim"),
                "{backend}: stale and never enqueued"
            );
            db.polls()
                .mark_enqueued(Round::Poll, &a, 100, 5_001)
                .await
                .expect("mark");
            assert!(
                !db.polls()
                    .claim(Round::Poll, &a, 100, 9_000, 9_000)
                    .await
                    .expect("claim"),
                "{backend}: an enqueued claim is never taken again"
            );
            assert!(
                db.polls()
                    .claim(Round::Poll, &a, 200, 9_000, 0)
                    .await
                    .expect("claim"),
                "{backend}: the next period is a new claim"
            );
            db.polls()
                .drop_claim(Round::Poll, &a, 200)
                .await
                .expect("drop");
            assert!(
                db.polls()
                    .claim(Round::Poll, &a, 200, 9_001, 0)
                    .await
                    .expect("claim"),
                "{backend}"
            );
            assert_eq!(
                db.polls()
                    .prune_claims(Round::Poll, 200)
                    .await
                    .expect("prune"),
                1,
                "{backend}"
            );
        }
    }
}
