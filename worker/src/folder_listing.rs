//! Which conversation objects of a Page's folder exist, from one listing of it.
//!
//! A conversation whose object a listing showed absent is written with `If-None-Match: *`
//! without being read first: one request instead of two. A backfill lists before it stages
//! (most of a Page's history is new to the bucket); the flusher lists when a round claims
//! several conversations of one Page that nothing has flushed yet (a burst of new people), and
//! keeps the listing a while ([`RecentListings`]) for the rounds after it.
//!
//! Invariant: a listing is a hint, never a licence to overwrite. It is used only with
//! conditional writes, so an object that appeared after all refuses the write (412) and the
//! next flush reads first. Every listing request takes the bucket's budget (a LIST counts as a
//! write on Spaces), and a listing stops at its key limit, so its cost stays below the reads it
//! spares.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fbsync_shared::ids::{PageId, UserUuid};
use fbsync_shared::storage::budgeted_store::{BudgetedError, BudgetedStore};
use fbsync_shared::storage::object_store::KeyPrefix;

/// How long a listing serves the flusher. What existed then is all that can exist now, apart
/// from what fbsync wrote since (those conversations are no longer never-flushed, so they are
/// read) and what was written outside fbsync (refused by the conditional write, then read); the
/// limit only keeps memory to the Pages that had new people lately.
const LISTING_KEPT: Duration = Duration::from_secs(300);

/// Pages whose listing the flusher keeps at most (the oldest goes first).
const LISTINGS_KEPT_MAX: usize = 256;

/// Never-flushed conversations of one Page in one round that make listing its folder worth it.
const LIST_FROM_NEW: usize = 4;

/// Keys a listing may read per read it may spare: a listing request returns up to 1,000 keys
/// for one write, so at 125 keys per spared read a listing costs at most an eighth of the
/// requests it spares (and a listing that grows past that stops).
const LISTED_KEYS_PER_SPARED_READ: usize = 125;

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
    store: &BudgetedStore,
    user_uuid: &UserUuid,
    page_id: &PageId,
    max_keys: usize,
) -> FolderListing {
    let prefix = KeyPrefix::conversations(user_uuid, page_id);
    let mut existing = HashSet::new();
    let mut continuation = None;
    loop {
        let listing = match store.list(&prefix, continuation).await {
            Ok(listing) => listing,
            Err(BudgetedError::NoRoom { .. }) => return FolderListing::Failed,
            Err(BudgetedError::Budget(e)) => {
                tracing::info!(%page_id, error = %e, "no bucket budget for a listing; every first flush reads first");
                return FolderListing::Failed;
            }
            Err(BudgetedError::Store(e)) => {
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

/// The flusher's recent listings, per Page: one listing serves every round of a burst.
#[derive(Default)]
pub struct RecentListings {
    /// What the last listing of each Page found, and when.
    pages: Mutex<HashMap<PageId, Seen>>,
}

/// What the last listing of a Page found.
#[derive(Clone)]
enum Seen {
    /// The people whose objects existed.
    Listed {
        at: Instant,
        existing: Arc<HashSet<String>>,
    },
    /// More keys than the listing could afford (at least `keys`).
    TooLong { at: Instant, keys: usize },
}

impl Seen {
    fn at(&self) -> Instant {
        match self {
            Seen::Listed { at, .. } | Seen::TooLong { at, .. } => *at,
        }
    }
}

/// What to do about a round's never-flushed conversations of one Page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// A recent listing tells which exist.
    Known(Arc<HashSet<String>>),
    /// List the folder, reading at most this many keys.
    List { max_keys: usize },
    /// Not worth a listing: each flush reads first.
    ReadEach,
}

impl RecentListings {
    /// What to do for `new` never-flushed conversations of `page_id` claimed in one round.
    pub fn next_step(&self, page_id: &PageId, new: usize) -> NextStep {
        let max_keys = new * LISTED_KEYS_PER_SPARED_READ;
        let seen = self.lock().get(page_id).cloned();
        match seen {
            Some(Seen::Listed { at, existing }) if at.elapsed() < LISTING_KEPT => {
                NextStep::Known(existing)
            }
            Some(Seen::TooLong { at, keys }) if at.elapsed() < LISTING_KEPT && keys > max_keys => {
                NextStep::ReadEach
            }
            _ if new < LIST_FROM_NEW => NextStep::ReadEach,
            _ => NextStep::List { max_keys },
        }
    }

    /// Keeps what a listing of `page_id` found; the people whose objects exist when it was
    /// complete.
    pub fn record(&self, page_id: &PageId, listing: FolderListing) -> Option<Arc<HashSet<String>>> {
        let at = Instant::now();
        let (seen, existing) = match listing {
            FolderListing::Complete(existing) => {
                let existing = Arc::new(existing);
                let seen = Seen::Listed {
                    at,
                    existing: existing.clone(),
                };
                (seen, Some(existing))
            }
            FolderListing::TooLong(keys) => (Seen::TooLong { at, keys }, None),
            FolderListing::Failed => return None,
        };
        let mut pages = self.lock();
        pages.retain(|_, seen| seen.at().elapsed() < LISTING_KEPT);
        if pages.len() >= LISTINGS_KEPT_MAX
            && let Some(oldest) = pages
                .iter()
                .min_by_key(|(_, seen)| seen.at())
                .map(|(page, _)| page.clone())
        {
            pages.remove(&oldest);
        }
        pages.insert(page_id.clone(), seen);
        existing
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PageId, Seen>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: u32) -> PageId {
        PageId::parse(&format!("{}", 100_000 + n)).expect("page id")
    }

    #[test]
    fn a_listing_serves_the_rounds_after_it_and_a_long_folder_is_not_listed_again_for_few() {
        let listings = RecentListings::default();
        assert_eq!(listings.next_step(&page(1), 3), NextStep::ReadEach);
        assert_eq!(
            listings.next_step(&page(1), 4),
            NextStep::List { max_keys: 500 }
        );
        let existing = HashSet::from(["old".to_string()]);
        listings.record(&page(1), FolderListing::Complete(existing.clone()));
        // Later rounds, however few their new people, use it.
        assert_eq!(
            listings.next_step(&page(1), 1),
            NextStep::Known(Arc::new(existing))
        );
        listings.record(&page(2), FolderListing::TooLong(1_001));
        assert_eq!(listings.next_step(&page(2), 8), NextStep::ReadEach);
        assert_eq!(
            listings.next_step(&page(2), 9),
            NextStep::List { max_keys: 1_125 }
        );
        listings.record(&page(3), FolderListing::Failed);
        assert_eq!(
            listings.next_step(&page(3), 4),
            NextStep::List { max_keys: 500 }
        );
    }

    #[test]
    fn listings_kept_stay_bounded() {
        let listings = RecentListings::default();
        for n in 0..(LISTINGS_KEPT_MAX as u32 + 10) {
            listings.record(&page(n), FolderListing::Complete(HashSet::new()));
        }
        assert_eq!(listings.lock().len(), LISTINGS_KEPT_MAX);
        assert_eq!(
            listings.next_step(&page(LISTINGS_KEPT_MAX as u32 + 9), 1),
            NextStep::Known(Arc::default())
        );
    }
}
