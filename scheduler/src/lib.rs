//! The scheduler role: one poll job per active Page and period, and one webhook subscription
//! check per active Page and SUBSCRIPTION_CHECK_INTERVAL (Facebook unsubscribes an app from a
//! Page after an hour of failed deliveries; the check subscribes it again and polls the gap).
//!
//! A period runs from one firing of POLL_SCHEDULE to the next. Within it, each Page's job is
//! due at the Page's own offset (a hash of its id) into POLL_SPREAD after the round starts, so
//! thousands of Pages do not call the Graph API in the same minute; every scheduler computes
//! the same offsets. Before it publishes a job the scheduler claims the Page and period in the
//! database ([`Polls::claim`](fbsync_shared::storage::db::Polls::claim)), so two schedulers running at once still enqueue each
//! Page once per period. Subscription checks are planned the same way: their periods are the
//! interval's multiples, spread over the whole interval, claimed in their own table
//! ([`Round::SubscriptionCheck`]). Pages that need re-authorisation are skipped until they
//! are connected again.
//!
//! Invariant: a claim is marked enqueued only after the broker confirmed the job; a job that
//! could not be published gives its claim back, and a claim left by a scheduler that died
//! before publishing is taken over once it is [`STALE_CLAIM`] old.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fbsync_shared::config::{SchedulerSettings, Settings};
use fbsync_shared::ids::PageId;
use fbsync_shared::jobs::{CheckSubscription, Job, PollRequest};
use fbsync_shared::queue::{Publisher, Topology};
use fbsync_shared::storage::db::{Database, DbError, Round};
use fbsync_shared::telemetry::POLLS_ENQUEUED;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// A claim whose job was not confirmed within this long is taken over by another scheduler.
pub const STALE_CLAIM: Duration = Duration::from_secs(120);

/// How long to wait for a publisher confirm.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the running scheduler looks for due Pages (and for Pages added meanwhile).
const TICK: Duration = Duration::from_secs(1);

/// Claims of periods older than this are deleted.
const CLAIM_RETENTION: Duration = Duration::from_secs(8 * 86_400);

/// Plans poll rounds.
pub struct Scheduler {
    /// Pages, and the claims that make a job once per Page and period.
    pub db: Database,
    /// Publishes poll jobs with confirms.
    pub publisher: Publisher,
    /// Where poll jobs go.
    pub topology: Topology,
    /// When periods start and how long a round is spread over.
    pub settings: SchedulerSettings,
}

/// What one planning pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// When the period started (ms).
    pub period_ms: i64,
    /// Jobs this scheduler enqueued.
    pub enqueued: usize,
    /// Pages another scheduler claimed first.
    pub claimed_elsewhere: usize,
    /// Pages not due yet (their offset in the spread is still ahead).
    pub not_due: usize,
    /// Jobs that could not be published (the next pass tries again).
    pub failed: usize,
}

/// Why a pass could not plan.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("POLL_SCHEDULE {0:?} has no firing around now")]
    NoPeriod(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl Scheduler {
    /// Opens the database (running migrations) and starts the confirming publisher.
    pub async fn open(settings: &Settings, shutdown: &CancellationToken) -> Result<Self, DbError> {
        let db = Database::connect(&settings.database_url).await?;
        let topology = Topology::new(&settings.broker.queue_prefix);
        let publisher = Publisher::start(
            settings.broker.amqp_url.clone(),
            topology.clone(),
            "fbsync-scheduler".into(),
            shutdown.clone(),
        );
        Ok(Self {
            db,
            publisher,
            topology,
            settings: settings.scheduler.clone(),
        })
    }

    /// Plans one round now for the period `now` falls in: every active Page not yet enqueued
    /// this period gets its job at once, without the spread (`fbsync scheduler --once`).
    pub async fn plan_once(&self) -> Result<RoundReport, ScheduleError> {
        let now = Utc::now();
        let (period, _) = self.period(now)?;
        let period_ms = period.timestamp_millis();
        self.plan(Round::Poll, period_ms, period_ms, Duration::ZERO, now)
            .await
    }

    /// Plans rounds until shutdown: each tick enqueues the jobs that came due.
    pub async fn run(self, shutdown: CancellationToken) {
        let started = Utc::now();
        let mut current_period: Option<DateTime<Utc>> = None;
        let mut current_check_period: Option<i64> = None;
        while !shutdown.is_cancelled() {
            // Nothing is planned while the broker is away (at start, before the publisher has
            // connected, too): every job would fail and give its claim back. The publisher
            // logs the outage, once.
            if !self.publisher.is_ready() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(TICK) => continue,
                }
            }
            let now = Utc::now();
            match self.period(now) {
                Ok((period, next)) => {
                    // A scheduler started mid-period spreads what is left from its own start.
                    let round_start = period.max(started);
                    let spread = self
                        .settings
                        .spread
                        .min((next - period).to_std().unwrap_or(Duration::ZERO));
                    if current_period != Some(period) {
                        current_period = Some(period);
                        tracing::info!(
                            period = %period.to_rfc3339(),
                            next = %next.to_rfc3339(),
                            spread_secs = spread.as_secs(),
                            "poll round"
                        );
                        let retention = chrono::Duration::from_std(CLAIM_RETENTION)
                            .unwrap_or(chrono::Duration::days(8));
                        if let Err(e) = self
                            .db
                            .polls()
                            .prune_claims(Round::Poll, (period - retention).timestamp_millis())
                            .await
                        {
                            tracing::warn!(error = %e, "could not prune old poll claims");
                        }
                    }
                    let (period_ms, round_start_ms) =
                        (period.timestamp_millis(), round_start.timestamp_millis());
                    match self
                        .plan(Round::Poll, period_ms, round_start_ms, spread, now)
                        .await
                    {
                        Ok(report) if report.enqueued > 0 || report.failed > 0 => {
                            tracing::info!(
                                enqueued = report.enqueued,
                                claimed_elsewhere = report.claimed_elsewhere,
                                not_due = report.not_due,
                                failed = report.failed,
                                "poll jobs enqueued"
                            );
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "could not plan poll jobs; trying again")
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "no poll period"),
            }
            self.plan_subscription_checks(started, now, &mut current_check_period)
                .await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Enqueues the subscription checks due at `now`: the check period is the multiple of
    /// SUBSCRIPTION_CHECK_INTERVAL `now` falls in, each Page due at its offset into it (from
    /// `started` for a scheduler started mid-period).
    async fn plan_subscription_checks(
        &self,
        started: DateTime<Utc>,
        now: DateTime<Utc>,
        current: &mut Option<i64>,
    ) {
        let interval = self.settings.subscription_check_interval;
        let interval_ms = i64::try_from(interval.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let now_ms = now.timestamp_millis();
        let period_ms = now_ms - now_ms.rem_euclid(interval_ms);
        if *current != Some(period_ms) {
            *current = Some(period_ms);
            let before = period_ms.saturating_sub(2 * interval_ms);
            if let Err(e) = self
                .db
                .polls()
                .prune_claims(Round::SubscriptionCheck, before)
                .await
            {
                tracing::warn!(error = %e, "could not prune old subscription-check claims");
            }
        }
        let round_start_ms = period_ms.max(started.timestamp_millis());
        match self
            .plan(
                Round::SubscriptionCheck,
                period_ms,
                round_start_ms,
                interval,
                now,
            )
            .await
        {
            Ok(report) if report.failed > 0 => tracing::info!(
                enqueued = report.enqueued,
                failed = report.failed,
                "subscription checks enqueued"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not plan subscription checks; trying again")
            }
        }
    }

    /// The period `now` falls in, and when the next one starts.
    fn period(&self, now: DateTime<Utc>) -> Result<(DateTime<Utc>, DateTime<Utc>), ScheduleError> {
        let schedule = &self.settings.schedule;
        let no_period = || ScheduleError::NoPeriod(schedule.text.clone());
        let start = schedule.period_start(now).ok_or_else(no_period)?;
        let next = schedule.next_start(now).ok_or_else(no_period)?;
        Ok((start, next))
    }

    /// Enqueues the jobs of `round` for the period starting at `period_ms` that are due at
    /// `now`: each Page's at `round_start_ms` + its offset into `spread`.
    async fn plan(
        &self,
        round: Round,
        period_ms: i64,
        round_start_ms: i64,
        spread: Duration,
        now: DateTime<Utc>,
    ) -> Result<RoundReport, ScheduleError> {
        let now_ms = now.timestamp_millis();
        let stale_before = now_ms - STALE_CLAIM.as_millis() as i64;
        let mut report = RoundReport {
            period_ms,
            ..RoundReport::default()
        };
        let polls = self.db.polls();
        for page_id in polls.pages_due(round, period_ms, stale_before).await? {
            let due = round_start_ms + offset_ms(&page_id, spread);
            if due > now_ms {
                report.not_due += 1;
                continue;
            }
            if !polls
                .claim(round, &page_id, period_ms, now_ms, stale_before)
                .await?
            {
                report.claimed_elsewhere += 1;
                continue;
            }
            if self.enqueue(round, &page_id, period_ms).await {
                polls
                    .mark_enqueued(round, &page_id, period_ms, fbsync_shared::now_ms())
                    .await?;
                report.enqueued += 1;
            } else {
                polls.drop_claim(round, &page_id, period_ms).await?;
                report.failed += 1;
            }
        }
        Ok(report)
    }

    /// Publishes the Page's job of `round` with a confirm; false when the broker did not
    /// confirm.
    async fn enqueue(&self, round: Round, page_id: &PageId, period_ms: i64) -> bool {
        let job = match round {
            Round::Poll => Job::Poll(PollRequest {
                page_id: page_id.as_str().to_string(),
                backfill: false,
                requested_by: "scheduler".into(),
                requested_at_ms: period_ms,
                since_ms: None,
            }),
            Round::SubscriptionCheck => Job::CheckSubscription(CheckSubscription {
                page_id: page_id.clone(),
                period_ms,
            }),
        };
        let outgoing = self.topology.job(&job);
        match self
            .publisher
            .publish_all(std::slice::from_ref(&outgoing), PUBLISH_TIMEOUT)
            .await
        {
            Ok(()) => {
                if round == Round::Poll {
                    metrics::counter!(POLLS_ENQUEUED).increment(1);
                }
                true
            }
            Err(e) => {
                tracing::warn!(%page_id, job = job.name(), error = %e, "job not confirmed; its claim is given back");
                false
            }
        }
    }
}

/// The Page's offset into the spread: the same in every scheduler, spread evenly over Pages.
pub fn offset_ms(page_id: &PageId, spread: Duration) -> i64 {
    let spread_ms = spread.as_millis() as u64;
    if spread_ms == 0 {
        return 0;
    }
    let digest = Sha256::digest(page_id.as_str().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % spread_ms) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_stable_and_spread_over_the_whole_span() {
        let hour = Duration::from_secs(3600);
        let offsets: Vec<i64> = (1..=1000)
            .map(|i| offset_ms(&PageId::parse(&i.to_string()).expect("id"), hour))
            .collect();
        let page = PageId::parse("42").expect("id");
        assert_eq!(offset_ms(&page, hour), offset_ms(&page, hour));
        assert!(offsets.iter().all(|o| (0..3_600_000).contains(o)));
        // Each quarter of the hour gets a fair share of the Pages.
        for quarter in 0..4 {
            let range = quarter * 900_000..(quarter + 1) * 900_000;
            let count = offsets.iter().filter(|o| range.contains(*o)).count();
            assert!((180..=320).contains(&count), "quarter {quarter}: {count}");
        }
        assert_eq!(offset_ms(&page, Duration::ZERO), 0);
    }
}
