//! Deleting a person's data (Meta's data-deletion callback), the second of the owners' jobs on
//! the `onboard` queue. The request names what goes (see `page_connections.rs` in the shared
//! crate): each removed Page's folder `users/<uuid>/facebook_messenger/<page_id>/`, and the
//! whole `users/<uuid>/` of a shop nobody is left connected to. The Pages are removed first,
//! then each folder is listed and each object deleted, every LIST and DELETE within the
//! bucket's shared request budget, and the request is recorded complete with its count (its
//! status page shows it).
//!
//! Invariant: a pass lists from the start until a listing is empty, so a redelivery or a
//! replay finishes what an interrupted pass left; a completed request is not done again.

use fbsync_shared::config::RetrySettings;
use fbsync_shared::now_ms;
use fbsync_shared::storage::budgeted_store::BudgetedStore;
use fbsync_shared::storage::db::Owners;
use fbsync_shared::storage::object_store::KeyPrefix;
use tokio_util::sync::CancellationToken;

use super::attempt::AttemptError;
use crate::runtime::settle::{JobError, step};

/// Deletes the data of the users a data-deletion request names.
pub struct UserDataEraser {
    /// Owners, their users and deletion requests.
    pub owners: Owners,
    /// Where a user's objects are listed and deleted, each request within the bucket's
    /// budget.
    pub store: BudgetedStore,
    /// Transient failures are retried under the one policy.
    pub retry: RetrySettings,
}

impl UserDataEraser {
    /// Deletes the folders a data-deletion request names and records the count.
    pub async fn erase(
        &self,
        confirmation_code: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), JobError> {
        let deleted = step(&self.retry, "delete_user_data", shutdown, || {
            self.delete_once(confirmation_code)
        })
        .await;
        match deleted {
            Ok(count) => {
                tracing::info!(objects = count, "a user's data was deleted");
                Ok(())
            }
            Err(error) => {
                if let JobError::Failed { .. } = error {
                    let _ = self
                        .owners
                        .fail_data_deletion(confirmation_code, &error.to_string())
                        .await;
                }
                Err(error)
            }
        }
    }

    /// One pass: list and delete until nothing is left, then record the request complete (the
    /// count recorded is that of the pass that completed it).
    async fn delete_once(&self, confirmation_code: &str) -> Result<u64, AttemptError> {
        let Some(request) = self.owners.data_deletion(confirmation_code).await? else {
            tracing::warn!("a data-deletion job names no request; nothing to do");
            return Ok(0);
        };
        if request.completed_at_ms.is_some() {
            return Ok(request.objects_deleted.unwrap_or(0).unsigned_abs());
        }
        // The request removed the Pages already, in the transaction that queued this job; they
        // are removed again in case a Page was registered since: without them, no flush
        // claimed from now on writes under a folder being emptied.
        let emptied = request.emptied_users();
        let mut folders: Vec<KeyPrefix> = Vec::new();
        for user in &emptied {
            self.owners.remove_pages_of_user(user).await?;
            folders.push(KeyPrefix::user(user));
        }
        for (user, page) in request.removed() {
            if !emptied.contains(&user) {
                self.owners.remove_page_of_user(&user, &page).await?;
                folders.push(KeyPrefix::page(&user, &page));
            }
        }
        let mut deleted = 0u64;
        for prefix in &folders {
            // Deleting changes the listing: list from the start until a listing is empty.
            loop {
                let listing = self.store.list(prefix, None).await?;
                if listing.keys.is_empty() {
                    break;
                }
                for key in &listing.keys {
                    self.store.delete(key).await?;
                    deleted += 1;
                }
            }
        }
        self.owners
            .complete_data_deletion(confirmation_code, deleted, now_ms())
            .await?;
        Ok(deleted)
    }
}
