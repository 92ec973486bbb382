//! The outbox: jobs that must follow a database change, written in the change's own
//! transaction ([`enqueue`]), so the change and its job are stored together or not at all. The
//! writer publishes them at once and deletes them once confirmed ([`Outbox::sent`]); a worker's
//! relay publishes what is left (the broker was away, the writer stopped) once the broker
//! answers ([`Outbox::take_due`]), retrying under the retry policy for as long as it takes.
//!
//! Invariant: a job stays here until the broker has confirmed it, so it is published at least
//! once; a job may be published twice (the writer's confirm arrived but its delete did not), so
//! every job that goes through here is idempotent.

use super::{DbError, Outbox};
use crate::jobs::{Job, JobKind};

/// How long a new row is left to its writer's own attempt before a relay may take it.
pub const WRITER_GRACE_MS: i64 = 5_000;

/// How long a relay holds a row it is publishing before another may take it.
pub const RELAY_LEASE_MS: i64 = 30_000;

/// A job waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// Names the row.
    pub id: String,
    /// The job.
    pub job: Job,
    /// Failed attempts so far (the retry policy's delay grows with them).
    pub attempts: u32,
}

/// Writes `job` into the outbox inside `transaction`; the row's id.
pub async fn enqueue(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: &Job,
    now: i64,
) -> Result<String, DbError> {
    let id = uuid::Uuid::new_v4().to_string();
    let envelope = job.envelope();
    sqlx::query(
        "INSERT INTO outbox (id, kind, body, created_at_ms, attempt_after_ms, attempts)
         VALUES ($1, $2, $3, $4, $5, 0)",
    )
    .bind(&id)
    .bind(envelope.kind.as_str())
    .bind(envelope.body)
    .bind(now)
    .bind(now + WRITER_GRACE_MS)
    .execute(&mut **transaction)
    .await?;
    Ok(id)
}

impl Outbox {
    /// Takes up to `limit` rows whose time has come, each leased to this caller for
    /// [`RELAY_LEASE_MS`] (a row another relay took in the meantime is skipped). A row whose
    /// job no longer decodes is removed with a warning: nothing could ever publish it.
    pub async fn take_due(&self, now: i64, limit: i64) -> Result<Vec<OutboxEntry>, DbError> {
        let due: Vec<(String, String, Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT id, kind, body, attempts, attempt_after_ms FROM outbox
             WHERE attempt_after_ms <= $1 ORDER BY created_at_ms LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        let mut taken = Vec::with_capacity(due.len());
        for (id, kind, body, attempts, attempt_after_ms) in due {
            let leased = sqlx::query(
                "UPDATE outbox SET attempt_after_ms = $3 WHERE id = $1 AND attempt_after_ms = $2",
            )
            .bind(&id)
            .bind(attempt_after_ms)
            .bind(now + RELAY_LEASE_MS)
            .execute(&self.db.pool)
            .await?;
            if leased.rows_affected() == 0 {
                continue;
            }
            let decoded = kind
                .parse::<JobKind>()
                .map_err(|e| e.to_string())
                .and_then(|kind| Job::decode(kind, &body).map_err(|e| e.to_string()));
            match decoded {
                Ok(job) => taken.push(OutboxEntry {
                    id,
                    job,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                }),
                Err(reason) => {
                    tracing::warn!(%id, %kind, %reason, "an outbox row holds no job; removed");
                    self.sent(&[id]).await?;
                }
            }
        }
        Ok(taken)
    }

    /// The jobs of these rows are confirmed by the broker: the rows go.
    pub async fn sent(&self, ids: &[String]) -> Result<(), DbError> {
        for id in ids {
            sqlx::query("DELETE FROM outbox WHERE id = $1")
                .bind(id)
                .execute(&self.db.pool)
                .await?;
        }
        Ok(())
    }

    /// A row's job could not be published: it is tried again at `retry_at_ms`.
    pub async fn failed(
        &self,
        id: &str,
        attempts: u32,
        retry_at_ms: i64,
        error: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE outbox SET attempts = $2, attempt_after_ms = $3, last_error = $4
             WHERE id = $1",
        )
        .bind(id)
        .bind(i64::from(attempts))
        .bind(retry_at_ms)
        .bind(error)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// How many jobs wait, and since when the oldest (ms), for the gauges.
    pub async fn pending(&self) -> Result<(i64, Option<i64>), DbError> {
        let (count, oldest): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MIN(created_at_ms) FROM outbox")
                .fetch_one(&self.db.pool)
                .await?;
        Ok((count, oldest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PageId;
    use crate::jobs::OnboardPage;
    use crate::storage::db::test_support::backends;

    #[tokio::test]
    async fn a_job_waits_out_its_writers_grace_is_leased_to_one_relay_and_goes_once_sent() {
        for (backend, db) in backends().await {
            let outbox = db.outbox();
            let job = Job::OnboardPage(OnboardPage {
                page_id: PageId::parse("42").expect("id"),
            });
            let mut transaction = db.pool.begin().await.expect("begin");
            let id = enqueue(&mut transaction, &job, 1_000)
                .await
                .expect("enqueue");
            transaction.commit().await.expect("commit");
            assert!(
                outbox.take_due(1_000, 10).await.expect("take").is_empty(),
                "{backend}: the writer's grace"
            );
            let due = 1_000 + WRITER_GRACE_MS;
            let taken = outbox.take_due(due, 10).await.expect("take");
            assert_eq!(taken.len(), 1, "{backend}");
            assert_eq!(taken[0].job.page_id(), Some("42"), "{backend}");
            assert!(
                outbox.take_due(due, 10).await.expect("take").is_empty(),
                "{backend}: leased to the first relay"
            );
            outbox
                .failed(&id, 1, due + 10, "broker away")
                .await
                .expect("failed");
            let again = outbox.take_due(due + 10, 10).await.expect("take");
            assert_eq!(again[0].attempts, 1, "{backend}");
            outbox.sent(&[id]).await.expect("sent");
            assert_eq!(outbox.pending().await.expect("pending").0, 0, "{backend}");
        }
    }
}
