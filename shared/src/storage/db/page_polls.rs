//! Each Page's Graph polls: the one in progress and the last complete one.
//!
//! A poll is one walk of a Page's conversations. It is leased to one worker at a time, fenced by
//! a generation as conversation claims are: every progress write is conditioned on the lease
//! generation it was begun with, so a worker that stalled past its lease while another took the
//! poll over writes nothing. Progress is the link to the next page of conversations, saved only
//! after every conversation of the page before it is staged: a poll that stops (rate limit,
//! crash, shutdown) resumes there, and re-staging a page is harmless (staging is a union).
//!
//! A daily poll reads conversations updated since the last complete poll started; a backfill
//! reads the whole history. Asking for a backfill while a daily poll is in progress restarts it
//! as a backfill; any other request resumes the poll in progress.

use super::{DbError, Polls};
use crate::ids::PageId;

/// A poll leased to this worker.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PollLease {
    /// The lease's fencing generation: progress is written only while it is still current.
    pub lease_gen: i64,
    /// When this poll started; the next daily poll's cut-off once it completes.
    pub started_at_ms: i64,
    /// Reads the whole history (1) or only what changed since `since_ms` (0).
    pub backfill: i64,
    /// Conversations last updated before this need no reading; `None`: read them all.
    pub since_ms: Option<i64>,
    /// Where to resume: the next page of conversations (no token in it); `None`: the first.
    pub resume_url: Option<String>,
}

impl PollLease {
    pub fn is_backfill(&self) -> bool {
        self.backfill != 0
    }
}

/// What [`Polls::begin_poll`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollStart {
    /// The poll is ours until the lease ends (renewed with each saved step).
    Leased(PollLease),
    /// Another worker holds the Page's poll until then.
    Busy { until_ms: i64 },
}

/// Counts of one step of a poll.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollCounts {
    /// Messages read from the Graph API.
    pub found: i64,
    /// Of those, staged rows that were new.
    pub new: i64,
    /// Messages whose details the Graph API refused.
    pub details_unavailable: i64,
}

/// A Page's poll state as operators see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct PollSummary {
    /// When the poll in progress started; `None`: none in progress.
    pub started_at_ms: Option<i64>,
    /// When the last complete poll ended.
    pub last_complete_end_ms: Option<i64>,
    /// When the last complete backfill ended.
    pub last_backfill_end_ms: Option<i64>,
    /// Messages found and new in the poll in progress, or in the last one.
    pub messages_found: i64,
    pub messages_new: i64,
    /// Messages whose details the Graph API refused, over every poll.
    pub details_unavailable_total: i64,
}

impl std::ops::AddAssign for PollCounts {
    fn add_assign(&mut self, other: Self) {
        self.found += other.found;
        self.new += other.new;
        self.details_unavailable += other.details_unavailable;
    }
}

impl Polls {
    /// Leases the Page's poll to the caller until `now + lease_ms`: the poll in progress
    /// (resumed where it stopped) or a new one. A `backfill` request restarts a daily poll in
    /// progress as a backfill. A new daily poll reads back to `since_ms` when given (a gap's
    /// start), else to the last complete poll's start.
    pub async fn begin_poll(
        &self,
        page_id: &PageId,
        backfill: bool,
        since_ms: Option<i64>,
        lease_ms: i64,
        now: i64,
    ) -> Result<PollStart, DbError> {
        sqlx::query(
            "INSERT INTO page_polls (page_id) VALUES ($1) ON CONFLICT (page_id) DO NOTHING",
        )
        .bind(page_id.as_str())
        .execute(&self.db.pool)
        .await?;
        // `fresh`: no poll in progress, or a backfill asked of a daily one. Every SET reads the
        // row as it was before the statement.
        const FRESH: &str = "(started_at_ms IS NULL OR ($2 = 1 AND backfill = 0))";
        let sql = format!(
            "UPDATE page_polls SET
                 lease_gen = lease_gen + 1,
                 lease_until_ms = $3 + $4,
                 started_at_ms = CASE WHEN {FRESH} THEN $3 ELSE started_at_ms END,
                 since_ms = CASE WHEN {FRESH}
                     THEN (CASE WHEN $2 = 1 THEN NULL
                                WHEN $5 >= 0 THEN $5 ELSE last_complete_start_ms END)
                     ELSE since_ms END,
                 resume_url = CASE WHEN {FRESH} THEN NULL ELSE resume_url END,
                 messages_found = CASE WHEN {FRESH} THEN 0 ELSE messages_found END,
                 messages_new = CASE WHEN {FRESH} THEN 0 ELSE messages_new END,
                 details_unavailable = CASE WHEN {FRESH} THEN 0 ELSE details_unavailable END,
                 backfill = CASE WHEN {FRESH} THEN $2 ELSE backfill END
             WHERE page_id = $1 AND lease_until_ms <= $3
             RETURNING lease_gen, started_at_ms, backfill, since_ms, resume_url"
        );
        let leased = sqlx::query_as::<_, PollLease>(&sql)
            .bind(page_id.as_str())
            .bind(i64::from(backfill))
            .bind(now)
            .bind(lease_ms)
            // -1: none given (a plain integer binds alike on SQLite and PostgreSQL).
            .bind(since_ms.unwrap_or(-1))
            .fetch_optional(&self.db.pool)
            .await?;
        if let Some(lease) = leased {
            return Ok(PollStart::Leased(lease));
        }
        let (until_ms,): (i64,) =
            sqlx::query_as("SELECT lease_until_ms FROM page_polls WHERE page_id = $1")
                .bind(page_id.as_str())
                .fetch_one(&self.db.pool)
                .await?;
        Ok(PollStart::Busy { until_ms })
    }

    /// Saves a step of the poll: the counts of the page just staged, where to resume (`None`:
    /// nothing left), and a renewed lease. False when the lease was lost (another worker took
    /// the poll over): the caller stops.
    pub async fn save_poll_step(
        &self,
        page_id: &PageId,
        lease: &PollLease,
        resume_url: Option<&str>,
        counts: PollCounts,
        lease_until_ms: i64,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE page_polls SET resume_url = $3, lease_until_ms = $4,
                 messages_found = messages_found + $5, messages_new = messages_new + $6,
                 details_unavailable = details_unavailable + $7,
                 details_unavailable_total = details_unavailable_total + $7
             WHERE page_id = $1 AND lease_gen = $2",
        )
        .bind(page_id.as_str())
        .bind(lease.lease_gen)
        .bind(resume_url)
        .bind(lease_until_ms)
        .bind(counts.found)
        .bind(counts.new)
        .bind(counts.details_unavailable)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Renews the poll's lease during a long step. False when the lease was lost.
    pub async fn renew_poll(
        &self,
        page_id: &PageId,
        lease: &PollLease,
        lease_until_ms: i64,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE page_polls SET lease_until_ms = $3 WHERE page_id = $1 AND lease_gen = $2",
        )
        .bind(page_id.as_str())
        .bind(lease.lease_gen)
        .bind(lease_until_ms)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks the poll complete: its start becomes the next daily poll's cut-off. False when
    /// the lease was lost.
    pub async fn finish_poll(
        &self,
        page_id: &PageId,
        lease: &PollLease,
        now: i64,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            // A poll that read back to a gap's start only (its `since_ms` later than the last
            // complete poll's start) leaves the next daily poll's cut-off where it was: the time
            // between was not read.
            "UPDATE page_polls SET last_complete_start_ms = CASE
                     WHEN backfill = 1 OR since_ms IS NULL OR last_complete_start_ms IS NULL
                       OR since_ms <= last_complete_start_ms THEN started_at_ms
                     ELSE last_complete_start_ms END,
                 last_complete_end_ms = $3,
                 last_backfill_end_ms = CASE WHEN backfill = 1 THEN $3 ELSE last_backfill_end_ms END,
                 started_at_ms = NULL, resume_url = NULL, lease_until_ms = 0
             WHERE page_id = $1 AND lease_gen = $2",
        )
        .bind(page_id.as_str())
        .bind(lease.lease_gen)
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the poll's lease back, its progress kept (shutdown, a long wait, a failure): the
    /// next poll job of the Page resumes it at once.
    pub async fn release_poll(&self, page_id: &PageId, lease: &PollLease) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE page_polls SET lease_until_ms = 0 WHERE page_id = $1 AND lease_gen = $2",
        )
        .bind(page_id.as_str())
        .bind(lease.lease_gen)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// The Page's poll state; the default when it was never polled.
    pub async fn poll_summary(&self, page_id: &PageId) -> Result<PollSummary, DbError> {
        let summary = sqlx::query_as::<_, PollSummary>(
            "SELECT started_at_ms, last_complete_end_ms, last_backfill_end_ms, messages_found,
                    messages_new, details_unavailable_total
             FROM page_polls WHERE page_id = $1",
        )
        .bind(page_id.as_str())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(summary.unwrap_or_default())
    }

    /// Every registered Page's poll state with its last error, ordered by id: for the poll
    /// age gauge and `fbsync poll --wait`.
    pub async fn poll_states(&self) -> Result<Vec<PagePollState>, DbError> {
        let rows = sqlx::query_as::<_, PagePollState>(
            "SELECT p.page_id, p.created_at_ms, q.started_at_ms, q.last_complete_end_ms,
                    COALESCE(q.messages_found, 0) AS messages_found,
                    COALESCE(q.messages_new, 0) AS messages_new,
                    p.last_error_ms, p.last_error
             FROM pages p LEFT JOIN page_polls q ON q.page_id = p.page_id ORDER BY p.page_id",
        )
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows)
    }
}

/// A registered Page's poll state, as [`Polls::poll_states`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PagePollState {
    pub page_id: String,
    /// When the Page was registered: a Page never polled is as overdue as its age.
    pub created_at_ms: i64,
    /// When the poll in progress started; `None`: none in progress.
    pub started_at_ms: Option<i64>,
    /// When the last complete poll ended.
    pub last_complete_end_ms: Option<i64>,
    /// Messages found and new in the poll in progress, or the last one.
    pub messages_found: i64,
    pub messages_new: i64,
    /// The Page's last error and when it was recorded (a poll that failed records why).
    pub last_error_ms: Option<i64>,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserUuid;
    use crate::storage::db::test_support::backends;

    const LEASE: i64 = 60_000;

    fn leased(start: PollStart) -> PollLease {
        match start {
            PollStart::Leased(lease) => lease,
            PollStart::Busy { until_ms } => panic!("busy until {until_ms}"),
        }
    }

    #[tokio::test]
    async fn a_stopped_poll_resumes_at_its_saved_step_and_a_daily_poll_starts_where_the_last_began()
    {
        for (backend, db) in backends().await {
            let page = PageId::parse("7").expect("page");
            let user = UserUuid::parse("6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11").expect("uuid");
            db.registry()
                .upsert_page(&page, &user, vec![1], 1)
                .await
                .expect("page");
            let first = leased(
                db.polls()
                    .begin_poll(&page, false, None, LEASE, 1_000)
                    .await
                    .expect("begin"),
            );
            assert_eq!(
                first.since_ms, None,
                "{backend}: never polled: read everything"
            );
            assert_eq!(
                db.polls()
                    .begin_poll(&page, false, None, LEASE, 2_000)
                    .await
                    .expect("begin"),
                PollStart::Busy {
                    until_ms: 1_000 + LEASE
                },
                "{backend}: one worker at a time"
            );
            let counts = PollCounts {
                found: 3,
                new: 2,
                details_unavailable: 1,
            };
            assert!(
                db.polls()
                    .save_poll_step(&page, &first, Some("http://g/next"), counts, 5_000)
                    .await
                    .expect("save"),
                "{backend}"
            );
            db.polls()
                .release_poll(&page, &first)
                .await
                .expect("release");
            // The next job resumes at the saved step, with the same start and cut-off.
            let resumed = leased(
                db.polls()
                    .begin_poll(&page, false, None, LEASE, 6_000)
                    .await
                    .expect("begin"),
            );
            assert_eq!(
                resumed.resume_url.as_deref(),
                Some("http://g/next"),
                "{backend}"
            );
            assert_eq!(resumed.started_at_ms, 1_000, "{backend}");
            assert!(
                !db.polls()
                    .save_poll_step(&page, &first, None, counts, 7_000)
                    .await
                    .expect("save"),
                "{backend}: the old lease is fenced out"
            );
            assert!(
                db.polls()
                    .finish_poll(&page, &resumed, 8_000)
                    .await
                    .expect("finish")
            );
            let summary = db.polls().poll_summary(&page).await.expect("summary");
            assert_eq!(summary.last_complete_end_ms, Some(8_000), "{backend}");
            assert_eq!(summary.details_unavailable_total, 1, "{backend}");
            let daily = leased(
                db.polls()
                    .begin_poll(&page, false, None, LEASE, 9_000)
                    .await
                    .expect("begin"),
            );
            assert_eq!(
                daily.since_ms,
                Some(1_000),
                "{backend}: conversations updated since the last complete poll began"
            );
            assert_eq!(daily.resume_url, None, "{backend}");
            db.polls()
                .release_poll(&page, &daily)
                .await
                .expect("release");
            let backfill = leased(
                db.polls()
                    .begin_poll(&page, true, None, LEASE, 10_000)
                    .await
                    .expect("begin"),
            );
            assert!(
                backfill.is_backfill(),
                "{backend}: a backfill restarts a daily poll"
            );
            assert_eq!(backfill.since_ms, None, "{backend}");
            assert_eq!(backfill.started_at_ms, 10_000, "{backend}");
        }
    }

    #[tokio::test]
    async fn a_gaps_poll_reads_back_to_the_gap_and_leaves_the_daily_cut_off_where_it_was() {
        for (backend, db) in backends().await {
            let page = PageId::parse("8").expect("page");
            let user = UserUuid::parse("6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11").expect("uuid");
            db.registry()
                .upsert_page(&page, &user, vec![1], 1)
                .await
                .expect("page");
            let polls = db.polls();
            let daily = leased(
                polls
                    .begin_poll(&page, false, None, LEASE, 1_000)
                    .await
                    .expect("begin"),
            );
            assert!(
                polls
                    .finish_poll(&page, &daily, 2_000)
                    .await
                    .expect("finish")
            );
            // A gap opened at 5 000: its poll reads back there, not to 1 000...
            let gap = leased(
                polls
                    .begin_poll(&page, false, Some(5_000), LEASE, 6_000)
                    .await
                    .expect("begin"),
            );
            assert_eq!(gap.since_ms, Some(5_000), "{backend}");
            assert!(polls.finish_poll(&page, &gap, 7_000).await.expect("finish"));
            // ...and the next daily poll still reads from 1 000: 1 000 to 5 000 was not read.
            let next = leased(
                polls
                    .begin_poll(&page, false, None, LEASE, 8_000)
                    .await
                    .expect("begin"),
            );
            assert_eq!(next.since_ms, Some(1_000), "{backend}");
        }
    }
}
