//! Backlog figures for the gauges: how much is staged and how old the oldest event is.

use super::{DbError, Staging};

/// Staged backlog figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Backlog {
    /// Staged events not yet stored.
    pub events: i64,
    /// When the oldest of them was accepted by ingest.
    pub oldest_received_ms: Option<i64>,
    /// Conversations set aside (their object cannot be read).
    pub set_aside: i64,
}

impl Staging {
    /// Staged events not yet stored, and the oldest one's receive time (from the conversations
    /// waiting, in the order of their index, instead of a scan of every staged event).
    pub async fn backlog(&self) -> Result<Backlog, DbError> {
        let backlog = sqlx::query_as::<_, Backlog>(
            "SELECT (SELECT COUNT(*) FROM staged_events) AS events,
                    (SELECT MIN(waiting_since_ms) FROM conversations
                     WHERE staged_gen > flushed_gen AND waiting_since_ms > 0)
                        AS oldest_received_ms,
                    (SELECT COUNT(*) FROM conversations WHERE set_aside_reason IS NOT NULL)
                        AS set_aside",
        )
        .fetch_one(&self.db.pool)
        .await?;
        Ok(backlog)
    }
}
