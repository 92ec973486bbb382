//! Data-deletion requests from Meta: what was deleted at once (Pages, tokens, sessions; see
//! `page_connections.rs` for whose) and, once the worker has removed the objects, how many and
//! when. The confirmation code names the status page Facebook shows the person; the SHA-256 of
//! the request's signed_request finds the request again when Meta's request is replayed.

use super::page_connections::{Forget, forget};
use super::{DbError, Forgotten, Owners, outbox};
use crate::ids::{FacebookUserId, PageId, UserUuid};
use crate::jobs::{DeleteUserData, Job};

/// One data-deletion request as its status page shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DataDeletion {
    /// Random (128 bits); names the request's status page.
    pub confirmation_code: String,
    /// The shops nobody is left connected to, whose whole folder is deleted, space separated.
    pub user_uuids: String,
    /// The Pages removed, `<uuid>/<page_id>` space separated: their folders are deleted.
    pub removed_pages: String,
    /// The Pages that stay (another person of the shop connects them), space separated.
    pub kept_pages: String,
    /// When Meta's request arrived.
    pub requested_at_ms: i64,
    /// Pages removed with their tokens, at once.
    pub pages_removed: i64,
    /// Sessions ended, at once.
    pub sessions_removed: i64,
    /// Objects deleted; `None` while the worker is at it.
    pub objects_deleted: Option<i64>,
    /// When the last object was deleted; `None` while the worker is at it.
    pub completed_at_ms: Option<i64>,
    /// Why the object deletion is not done yet, when it failed.
    pub last_error: Option<String>,
}

impl DataDeletion {
    /// The shops whose whole folder goes.
    pub fn emptied_users(&self) -> Vec<UserUuid> {
        self.user_uuids
            .split_whitespace()
            .filter_map(|user| UserUuid::parse(user).ok())
            .collect()
    }

    /// The Pages removed, with their shop.
    pub fn removed(&self) -> Vec<(UserUuid, PageId)> {
        self.removed_pages
            .split_whitespace()
            .filter_map(|pair| pair.split_once('/'))
            .filter_map(|(user, page)| {
                Some((UserUuid::parse(user).ok()?, PageId::parse(page).ok()?))
            })
            .collect()
    }

    /// The Pages that stay.
    pub fn kept(&self) -> Vec<PageId> {
        self.kept_pages
            .split_whitespace()
            .filter_map(|page| PageId::parse(page).ok())
            .collect()
    }
}

/// The columns of a [`Forgotten`] as `data_deletions` holds them: emptied users, removed
/// Pages, kept Pages.
fn as_columns(forgotten: &Forgotten) -> (String, String, String) {
    let users: Vec<&str> = forgotten.emptied.iter().map(UserUuid::as_str).collect();
    let removed: Vec<String> = forgotten
        .removed
        .iter()
        .map(|(user, page)| format!("{user}/{page}"))
        .collect();
    let kept: Vec<&str> = forgotten.kept.iter().map(PageId::as_str).collect();
    (users.join(" "), removed.join(" "), kept.join(" "))
}

/// What a new request records.
pub struct NewDataDeletion<'a> {
    /// Random; names the status page.
    pub confirmation_code: &'a str,
    /// The person Meta's request names.
    pub person: &'a FacebookUserId,
    /// The SHA-256 of the request's signed_request, hex.
    pub signed_request_sha256: &'a str,
}

impl Owners {
    /// Carries out the database part of a data deletion in one transaction: the request is
    /// recorded, the person forgotten (`page_connections.rs`), what that removed written on the
    /// request, and, when there are objects to delete, its job written to the outbox. What was
    /// removed and the outbox rows, for the caller to publish at once; `None` when a request
    /// with the same signed_request is recorded already (a replay): nothing was changed.
    pub async fn request_data_deletion(
        &self,
        request: NewDataDeletion<'_>,
        now: i64,
    ) -> Result<Option<(Forgotten, Vec<(String, Job)>)>, DbError> {
        let mut transaction = self.db.pool.begin().await?;
        // A write first (see `page_connections::forget`).
        let inserted = sqlx::query(
            "INSERT INTO data_deletions (confirmation_code, facebook_user_id, user_uuids,
                 removed_pages, kept_pages, signed_request_sha256, requested_at_ms,
                 pages_removed, sessions_removed)
             VALUES ($1, $2, '', '', '', $3, $4, 0, 0)
             ON CONFLICT (signed_request_sha256) DO NOTHING",
        )
        .bind(request.confirmation_code)
        .bind(request.person.as_str())
        .bind(request.signed_request_sha256)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        if inserted.rows_affected() == 0 {
            transaction.rollback().await?;
            return Ok(None);
        }
        let forgotten = forget(&mut transaction, request.person, Forget::DataDeletion, now).await?;
        let (users, removed, kept) = as_columns(&forgotten);
        sqlx::query(
            "UPDATE data_deletions SET user_uuids = $2, removed_pages = $3, kept_pages = $4,
                 pages_removed = $5, sessions_removed = $6
             WHERE confirmation_code = $1",
        )
        .bind(request.confirmation_code)
        .bind(users)
        .bind(removed)
        .bind(kept)
        .bind(i64::try_from(forgotten.removed.len()).unwrap_or(i64::MAX))
        .bind(i64::try_from(forgotten.sessions).unwrap_or(i64::MAX))
        .execute(&mut *transaction)
        .await?;
        let mut queued = Vec::new();
        if forgotten.removed.is_empty() && forgotten.emptied.is_empty() {
            // Nothing stored for this person: the request is complete at once.
            sqlx::query(
                "UPDATE data_deletions SET objects_deleted = 0, completed_at_ms = $2
                 WHERE confirmation_code = $1",
            )
            .bind(request.confirmation_code)
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        } else {
            let job = Job::DeleteUserData(DeleteUserData {
                confirmation_code: request.confirmation_code.to_string(),
            });
            queued.push((outbox::enqueue(&mut transaction, &job, now).await?, job));
        }
        transaction.commit().await?;
        Ok(Some((forgotten, queued)))
    }

    /// The confirmation code of the request made with this signed_request, if one was.
    pub async fn data_deletion_of_signed_request(
        &self,
        signed_request_sha256: &str,
    ) -> Result<Option<String>, DbError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT confirmation_code FROM data_deletions WHERE signed_request_sha256 = $1",
        )
        .bind(signed_request_sha256)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.map(|(code,)| code))
    }

    /// A request by its confirmation code.
    pub async fn data_deletion(
        &self,
        confirmation_code: &str,
    ) -> Result<Option<DataDeletion>, DbError> {
        let row = sqlx::query_as::<_, DataDeletion>(
            "SELECT confirmation_code, user_uuids, removed_pages, kept_pages, requested_at_ms,
                    pages_removed,
                    sessions_removed, objects_deleted, completed_at_ms, last_error
             FROM data_deletions WHERE confirmation_code = $1",
        )
        .bind(confirmation_code)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row)
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
