//! Data-deletion requests from Meta: what was deleted at once (Pages, tokens, sessions) and,
//! once the worker has removed the users' objects, how many and when. The confirmation code
//! names the status page Facebook shows the person.

use super::{DbError, Owners};
use crate::ids::UserUuid;

/// One data-deletion request as its status page shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DataDeletion {
    /// Random (128 bits); names the request's status page.
    pub confirmation_code: String,
    /// The users (shops) whose data is deleted, space separated.
    pub user_uuids: String,
    /// When Meta's request arrived.
    pub requested_at_ms: i64,
    /// Pages removed with their tokens, at once.
    pub pages_removed: i64,
    /// Sessions ended, at once.
    pub sessions_removed: i64,
    /// Objects deleted under `users/<uuid>/`; `None` while the worker is at it.
    pub objects_deleted: Option<i64>,
    /// When the last object was deleted; `None` while the worker is at it.
    pub completed_at_ms: Option<i64>,
    /// Why the object deletion is not done yet, when it failed.
    pub last_error: Option<String>,
}

impl DataDeletion {
    /// The users as ids.
    pub fn users(&self) -> Vec<UserUuid> {
        self.user_uuids
            .split_whitespace()
            .filter_map(|user| UserUuid::parse(user).ok())
            .collect()
    }
}

impl Owners {
    /// Records a request whose database part is done.
    pub async fn record_data_deletion(
        &self,
        confirmation_code: &str,
        facebook_user_id: &str,
        users: &[UserUuid],
        pages_removed: u64,
        sessions_removed: u64,
        now: i64,
    ) -> Result<(), DbError> {
        let users: Vec<&str> = users.iter().map(UserUuid::as_str).collect();
        sqlx::query(
            "INSERT INTO data_deletions (confirmation_code, facebook_user_id, user_uuids,
                 requested_at_ms, pages_removed, sessions_removed)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(confirmation_code)
        .bind(facebook_user_id)
        .bind(users.join(" "))
        .bind(now)
        .bind(i64::try_from(pages_removed).unwrap_or(i64::MAX))
        .bind(i64::try_from(sessions_removed).unwrap_or(i64::MAX))
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// A request by its confirmation code.
    pub async fn data_deletion(
        &self,
        confirmation_code: &str,
    ) -> Result<Option<DataDeletion>, DbError> {
        let row = sqlx::query_as::<_, DataDeletion>(
            "SELECT confirmation_code, user_uuids, requested_at_ms, pages_removed,
                    sessions_removed, objects_deleted, completed_at_ms, last_error
             FROM data_deletions WHERE confirmation_code = $1",
        )
        .bind(confirmation_code)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row)
    }

    /// Records what the request deleted at once.
    pub async fn set_data_deletion_counts(
        &self,
        confirmation_code: &str,
        pages_removed: u64,
        sessions_removed: u64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE data_deletions SET pages_removed = $2, sessions_removed = $3
             WHERE confirmation_code = $1",
        )
        .bind(confirmation_code)
        .bind(i64::try_from(pages_removed).unwrap_or(i64::MAX))
        .bind(i64::try_from(sessions_removed).unwrap_or(i64::MAX))
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Forgets a request that could not be queued (the caller asks Meta to send it again).
    pub async fn remove_data_deletion(&self, confirmation_code: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM data_deletions WHERE confirmation_code = $1")
            .bind(confirmation_code)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Records that the objects are deleted.
    pub async fn complete_data_deletion(
        &self,
        confirmation_code: &str,
        objects_deleted: u64,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE data_deletions SET objects_deleted = $2, completed_at_ms = $3,
                 last_error = NULL
             WHERE confirmation_code = $1",
        )
        .bind(confirmation_code)
        .bind(i64::try_from(objects_deleted).unwrap_or(i64::MAX))
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Records why the object deletion has not completed.
    pub async fn fail_data_deletion(
        &self,
        confirmation_code: &str,
        error: &str,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE data_deletions SET last_error = $2 WHERE confirmation_code = $1")
            .bind(confirmation_code)
            .bind(error)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }
}
