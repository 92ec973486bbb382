//! Per-object PUT times, so an object's budget (5 PUTs per 300 s on Spaces) holds across
//! workers. Conversation objects keep theirs on the conversation row (see [`super::claims`]);
//! other objects (`page_data.json`) in `object_puts`. Both use the one codec, [`RecentPuts`].

use super::{Budgets, DbError};
use crate::storage::budget::PutBudget;
use crate::storage::object_key::ObjectKey;

/// Times (ms) of the recent PUT attempts to one object, stored as a comma-separated list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentPuts(Vec<i64>);

impl RecentPuts {
    /// Reads the stored list; an unreadable entry is dropped (it can only make the budget
    /// more generous by one PUT, never stop writes).
    pub fn decode(text: &str) -> Self {
        Self(
            text.split(',')
                .filter_map(|t| t.trim().parse().ok())
                .collect(),
        )
    }

    pub fn encode(&self) -> String {
        self.0
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Adds a PUT at `at`, keeping only the last `keep` (what the budget looks at).
    pub fn record(&mut self, at: i64, keep: usize) {
        self.0.push(at);
        let excess = self.0.len().saturating_sub(keep.max(1));
        self.0.drain(..excess);
    }

    pub fn times(&self) -> &[i64] {
        &self.0
    }
}

/// What a PUT reservation under an object's budget gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutReservation {
    /// Recorded: the PUT may be sent now.
    Reserved,
    /// The budget allows the next PUT only at this time (ms); nothing was recorded.
    NotBefore(i64),
}

impl Budgets {
    /// Reserves one PUT of `object_key` under its per-object budget, shared by every worker.
    /// A compare-and-swap on the recorded times, so two workers cannot both take the last slot.
    pub async fn reserve_object_put(
        &self,
        object_key: &ObjectKey,
        budget: &PutBudget,
        now: i64,
    ) -> Result<PutReservation, DbError> {
        sqlx::query(
            "INSERT INTO object_puts (object_key) VALUES ($1) ON CONFLICT (object_key) DO NOTHING",
        )
        .bind(object_key.as_str())
        .execute(&self.db.pool)
        .await?;
        loop {
            let (current,): (String,) =
                sqlx::query_as("SELECT recent_puts FROM object_puts WHERE object_key = $1")
                    .bind(object_key.as_str())
                    .fetch_one(&self.db.pool)
                    .await?;
            let mut recent = RecentPuts::decode(&current);
            let next = budget.next_put_at(recent.times(), now);
            if next > now {
                return Ok(PutReservation::NotBefore(next));
            }
            recent.record(now, budget.puts_per_window as usize);
            let done = sqlx::query(
                "UPDATE object_puts SET recent_puts = $2 WHERE object_key = $1 AND recent_puts = $3",
            )
            .bind(object_key.as_str())
            .bind(recent.encode())
            .bind(&current)
            .execute(&self.db.pool)
            .await?;
            if done.rows_affected() == 1 {
                return Ok(PutReservation::Reserved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_puts_round_trip_and_keep_only_the_newest() {
        let mut puts = RecentPuts::decode("");
        assert!(puts.times().is_empty());
        for at in 1..=7 {
            puts.record(at, 5);
        }
        assert_eq!(puts.encode(), "3,4,5,6,7");
        assert_eq!(RecentPuts::decode(&puts.encode()), puts);
        assert_eq!(RecentPuts::decode("1,x,3").times(), &[1, 3]);
    }
}
