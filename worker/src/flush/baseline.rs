//! What a flush merges into: the conversation object as it is now, learnt at the least cost.
//!
//! Three ways, cheapest first: what this worker wrote last (the claim right after its own
//! write: no request), absent by a recent listing of the Page's folder (no request; the PUT is
//! then `If-None-Match: *`), or a GET. A GET takes the budget of the PUT that usually follows
//! it too ([`PutShare`]), so when more flushes are due than the bucket allows, no operation is
//! spent on a read whose write then finds no room.
//!
//! Invariant: a listing is only a hint (conditional writes refuse what appeared after all),
//! and a remembered body is used only as [`crate::last_written`] allows.

use std::collections::HashMap;
use std::ops::ControlFlow;

use fbsync_shared::ids::{PageId, Psid, UserUuid};
use fbsync_shared::storage::budgeted_store::{BudgetedError, PutShare};
use fbsync_shared::storage::db::{ClaimError, ConversationClaim};
use fbsync_shared::storage::object_store::{ObjectKey, StoredObject};

use super::{FlushOutcome, Flusher};
use crate::folder_listing::{NextStep, list_conversations};
use crate::merge::FileIndex;

/// The object a flush merges into.
pub(super) struct Baseline {
    /// The object as stored; `None` when it does not exist.
    pub(super) stored: Option<StoredObject>,
    /// The merge's index of `stored`, when this worker knows it: spares the parse.
    pub(super) index: Option<FileIndex>,
    /// Learnt by a GET in this flush (for the log).
    pub(super) read: bool,
    /// The PUT's share of the bucket's budget, taken with the GET's.
    pub(super) put_share: PutShare,
}

impl Flusher {
    /// The object as it is now: remembered, known absent, or read. Breaks with the flush's
    /// outcome when the bucket's budget has no room for the read, or the read fails.
    pub(super) async fn baseline(
        &self,
        claim: &mut ConversationClaim,
        object_key: &ObjectKey,
    ) -> Result<ControlFlow<FlushOutcome, Baseline>, ClaimError> {
        let mut remembered = self.last_written.take(object_key, claim.generation());
        if let Some(object) = remembered.as_mut().and_then(|r| r.object.take()) {
            // This worker wrote it, and no claim came in between: it is still as written.
            return Ok(ControlFlow::Continue(Baseline {
                stored: Some(object),
                index: remembered.map(|r| r.index),
                read: false,
                put_share: PutShare::none(),
            }));
        }
        if self.write_absent_unread && claim.object_known_absent() {
            // A listing showed it absent and no flush has written it since: one request (the
            // PUT, `If-None-Match: *`) instead of two. Should it exist after all, the PUT is
            // refused, the flush fails, and the next one reads first.
            return Ok(ControlFlow::Continue(Baseline {
                stored: None,
                index: None,
                read: false,
                put_share: PutShare::none(),
            }));
        }
        let (stored, put_share) = match self.store.get_with_put_share(object_key).await {
            Ok(read) => {
                self.health.set_store_up(true);
                read
            }
            Err(BudgetedError::NoRoom { .. }) => {
                return Ok(ControlFlow::Break(self.no_room(claim).await?));
            }
            Err(BudgetedError::Budget(e)) => return Err(ClaimError::Db(e)),
            Err(BudgetedError::Store(e)) => {
                return Ok(ControlFlow::Break(self.failed(claim, &e).await?));
            }
        };
        // Still the version this worker wrote (the object was too big to keep, or another
        // claim came in between and wrote nothing): its index spares the parse.
        let index = remembered.and_then(|r| r.index_of(stored.as_ref()));
        Ok(ControlFlow::Continue(Baseline {
            stored,
            index,
            read: true,
            put_share,
        }))
    }

    /// Spares the reads of new conversations: when a round claims several conversations of
    /// one Page that nothing has flushed yet (a burst of new people), a listing of the Page's
    /// folder (kept for the rounds after it) tells which objects are absent, and those are
    /// written without a read (see [`crate::folder_listing`]). Only with conditional writes; a
    /// Page whose folder is too big for the reads it would spare is not listed. A failed
    /// listing changes nothing: the flushes read first.
    pub(super) async fn learn_absent_objects(&self, claims: &mut [ConversationClaim]) {
        if !self.write_absent_unread {
            return;
        }
        let mut new_by_page: HashMap<(UserUuid, PageId), Vec<usize>> = HashMap::new();
        for (at, claim) in claims.iter().enumerate() {
            if let Some(owner) = claim.owner()
                && claim.never_flushed()
                && !claim.object_known_absent()
            {
                let page = (owner.clone(), claim.key().page_id.clone());
                new_by_page.entry(page).or_default().push(at);
            }
        }
        for ((user_uuid, page_id), new) in new_by_page {
            let existing = match self.listings.next_step(&page_id, new.len()) {
                NextStep::Known(existing) => existing,
                NextStep::ReadEach => continue,
                NextStep::List { max_keys } => {
                    let listing =
                        list_conversations(&self.store, &user_uuid, &page_id, max_keys).await;
                    let Some(existing) = self.listings.record(&page_id, listing) else {
                        continue;
                    };
                    tracing::debug!(%page_id, listed = existing.len(), "listed the Page's folder for new conversations");
                    existing
                }
            };
            let absent: Vec<usize> = new
                .into_iter()
                .filter(|&at| !existing.contains(claims[at].key().user_psid.as_str()))
                .collect();
            let psids: Vec<&Psid> = absent
                .iter()
                .map(|&at| &claims[at].key().user_psid)
                .collect();
            if let Err(e) = self
                .conversations
                .mark_objects_absent(&page_id, &psids)
                .await
            {
                tracing::debug!(%page_id, error = %e, "could not record the listing; the flushes read first");
                continue;
            }
            for at in absent {
                claims[at].object_listed_absent();
            }
        }
    }
}
