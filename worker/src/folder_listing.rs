//! Which conversation objects of a Page's folder exist, from one listing of it.
//!
//! A conversation whose object a listing showed absent is written with `If-None-Match: *`
//! without being read first: one request instead of two. A backfill lists before it stages
//! (most of a Page's history is new to the bucket); the flusher lists when a round claims
//! several conversations of one Page that nothing has flushed yet (a burst of new people).
//!
//! Invariant: a listing is a hint, never a licence to overwrite. It is used only with
//! conditional writes, so an object that appeared after all refuses the write (412) and the
//! next flush reads first. Every listing request takes the bucket's budget (a LIST counts as a
//! write on Spaces), and a listing stops at its key limit, so its cost stays below the reads it
//! spares.

use std::collections::HashSet;

use fbsync_shared::ids::{PageId, UserUuid};
use fbsync_shared::storage::budget::BucketBudget;
use fbsync_shared::storage::db::Database;
use fbsync_shared::storage::object_store::{ObjectStore, conversations_prefix};

/// Budget windows a listing request waits in place for a slot of the bucket's rate.
const LIST_SLOT_WINDOWS: usize = 50;

/// What one listing of a Page's folder found.
#[derive(Debug)]
pub enum FolderListing {
    /// Every person whose conversation object exists (the file name without `.json`).
    Complete(HashSet<String>),
    /// The folder holds more than the key limit (at least this many keys): listing it costs
    /// more than it spares.
    TooLong(usize),
    /// A request failed or found no room in the bucket's budget: every first flush reads.
    Failed,
}

/// Lists the conversation objects under a Page's folder, up to `max_keys` keys.
pub async fn list_conversations(
    db: &Database,
    store: &dyn ObjectStore,
    bucket_budget: &BucketBudget,
    user_uuid: &UserUuid,
    page_id: &PageId,
    max_keys: usize,
) -> FolderListing {
    let prefix = conversations_prefix(user_uuid, page_id);
    let mut existing = HashSet::new();
    let mut continuation = None;
    loop {
        match db
            .wait_for_bucket_slot(bucket_budget, 1, 1, LIST_SLOT_WINDOWS, || true)
            .await
        {
            Ok(true) => {}
            Ok(false) => return FolderListing::Failed,
            Err(e) => {
                tracing::info!(%page_id, error = %e, "no bucket budget for a listing; every first flush reads first");
                return FolderListing::Failed;
            }
        }
        let listing = match store.list(&prefix, continuation).await {
            Ok(listing) => listing,
            Err(e) => {
                tracing::info!(%page_id, error = %e, "could not list the Page's conversations; every first flush reads first");
                return FolderListing::Failed;
            }
        };
        existing.extend(listing.keys.iter().filter_map(|key| {
            key.strip_prefix(&prefix)?
                .strip_suffix(".json")
                .map(String::from)
        }));
        if existing.len() > max_keys {
            return FolderListing::TooLong(existing.len());
        }
        match listing.next {
            Some(next) => continuation = Some(next),
            None => return FolderListing::Complete(existing),
        }
    }
}
