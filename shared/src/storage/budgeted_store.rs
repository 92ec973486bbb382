//! The store as the roles hold it: every request charges the bucket's request budget before it
//! is sent, under one wait policy, so the store's per-bucket rates are respected by
//! construction, and every SlowDown answer lowers the rate in force.
//!
//! Invariants:
//! - no request reaches the store without its [`Requests`] taken from the bucket's shared
//!   windows (`bucket_windows` in the database), in the window the request is sent in, at the
//!   rate in force ([`AdaptiveRate`]: the configured ceilings, lowered after a SlowDown);
//! - a store with no budgets ([`StoreBudgets::none`], the local directory) is never charged;
//! - a request waits in place for a slot at most [`SLOT_WAIT`], and only while its caller's
//!   `keep_waiting` holds (a flusher's claim must still have time to send); then it answers
//!   [`BudgetedError::NoRoom`] and the caller tries again later;
//! - the flusher's read takes the budget of its GET and of the PUT that usually follows it in
//!   one window ([`BudgetedStore::get_with_put_share`]): the PUT's share is a [`PutShare`], used
//!   by the PUT if it is sent in that window, and given back when it is dropped unused.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::now_ms;
use crate::storage::adaptive_rate::AdaptiveRate;
use crate::storage::budget::{BucketBudget, Requests, StoreBudgets};
use crate::storage::db::{Budgets, DbError};
use crate::storage::object_store::{
    KeyPrefix, Listing, ObjectKey, ObjectStore, StoreError, StoredObject, WriteCondition,
};

/// How long a request waits in place for a slot of the bucket's rate (what was fetched and read
/// for it is then not thrown away) before it answers [`BudgetedError::NoRoom`].
pub const SLOT_WAIT: Duration = Duration::from_secs(5);

/// Why a budgeted request was not answered.
#[derive(Debug, thiserror::Error)]
pub enum BudgetedError {
    /// The store answered with an error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bucket's budget windows could not be read or written: nothing was sent.
    #[error(transparent)]
    Budget(#[from] DbError),
    /// The bucket's budget had no room within the wait: nothing was sent; a window later may.
    #[error("no room in the bucket's request budget yet")]
    NoRoom {
        /// When trying again is worth it: one budget window.
        retry_in: Duration,
    },
}

impl crate::retry::RetryClass for BudgetedError {
    fn is_transient(&self) -> bool {
        match self {
            BudgetedError::Store(e) => e.is_transient(),
            BudgetedError::Budget(e) => e.is_transient(),
            BudgetedError::NoRoom { .. } => true,
        }
    }
}

/// The object store behind the bucket's budget.
#[derive(Clone)]
pub struct BudgetedStore {
    /// The store itself, reached only through the methods below.
    store: Arc<dyn ObjectStore>,
    /// Where the bucket's budget windows are kept, shared by every worker.
    budgets: Budgets,
    /// The budgets this store has (its configured ceilings).
    limits: StoreBudgets,
    /// The bucket's rate in force, below its ceilings.
    rate: Arc<AdaptiveRate>,
}

impl BudgetedStore {
    /// The store behind `limits` (decided by [`StoreBudgets::for_store`]), its windows and
    /// rate kept in `budgets`.
    pub fn new(store: Arc<dyn ObjectStore>, budgets: Budgets, limits: StoreBudgets) -> Self {
        Self {
            store,
            rate: Arc::new(AdaptiveRate::new(budgets.clone(), limits.bucket)),
            budgets,
            limits,
        }
    }

    /// The budgets this store has: the bucket's ceilings and each object's PUT window.
    pub fn limits(&self) -> &StoreBudgets {
        &self.limits
    }

    /// The bucket's budget in force now, for callers that pace themselves by its windows.
    pub fn bucket(&self) -> BucketBudget {
        self.rate.known(now_ms())
    }

    /// Where objects go, for logs.
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The object, or `None` when it does not exist.
    pub async fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, BudgetedError> {
        self.charge(Requests::GET, || true).await?;
        Ok(self.observed(self.store.get(key).await).await?)
    }

    /// Writes the object if `condition` holds (see [`ObjectStore::put`]).
    pub async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, BudgetedError> {
        let slot = self.put_slot(PutShare::none(), || true).await?;
        Ok(slot.put(key, body, condition).await?)
    }

    /// One page of the keys under `prefix` (see [`ObjectStore::list`]).
    pub async fn list(
        &self,
        prefix: &KeyPrefix,
        continuation: Option<String>,
    ) -> Result<Listing, BudgetedError> {
        self.charge(Requests::LIST, || true).await?;
        Ok(self
            .observed(self.store.list(prefix, continuation).await)
            .await?)
    }

    /// Deletes the object (see [`ObjectStore::delete`]).
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), BudgetedError> {
        self.charge(Requests::DELETE, || true).await?;
        Ok(self.observed(self.store.delete(key).await).await?)
    }

    /// A flush's read: takes the GET's budget and the PUT's that usually follows it from the
    /// window that holds now, without waiting (when more flushes are due than the bucket
    /// allows, no operation is spent on a read whose write then finds no room), then reads.
    /// [`BudgetedError::NoRoom`] at once when the window is full.
    pub async fn get_with_put_share(
        &self,
        key: &ObjectKey,
    ) -> Result<(Option<StoredObject>, PutShare), BudgetedError> {
        let mut share = PutShare::none();
        let now = now_ms();
        let bucket = self.rate.in_force(now).await;
        if !bucket.is_unlimited() {
            if !self
                .budgets
                .take_bucket_budget(now, Requests::GET_THEN_PUT, &bucket)
                .await?
            {
                return Err(self.no_room());
            }
            share = PutShare {
                taken: Some((self.budgets.clone(), bucket.window_start(now))),
            };
        }
        let stored = self.observed(self.store.get(key).await).await?;
        Ok((stored, share))
    }

    /// The budget of one PUT: `share`'s, when it was taken in the window that holds now (a
    /// request must land in the window it was counted in: after a slow GET, that share is left
    /// unused in its window); else a slot waited for under [`SLOT_WAIT`] while `keep_waiting`.
    pub async fn put_slot(
        &self,
        mut share: PutShare,
        keep_waiting: impl Fn() -> bool,
    ) -> Result<PutSlot<'_>, BudgetedError> {
        let in_window = share
            .taken
            .take()
            .is_some_and(|(_, window)| window == self.limits.bucket.window_start(now_ms()));
        if !in_window {
            self.charge(Requests::PUT, keep_waiting).await?;
        }
        Ok(PutSlot { store: self })
    }

    /// Takes `requests` for a request about to be sent: from the current window, or from one of
    /// the windows that start within [`SLOT_WAIT`], sleeping until each starts, for as long as
    /// `keep_waiting` says so.
    async fn charge(
        &self,
        requests: Requests,
        keep_waiting: impl Fn() -> bool,
    ) -> Result<(), BudgetedError> {
        if self.limits.bucket.is_unlimited() {
            return Ok(());
        }
        let until = now_ms() + i64::try_from(SLOT_WAIT.as_millis()).unwrap_or(i64::MAX / 4);
        loop {
            let now = now_ms();
            let bucket = self.rate.in_force(now).await;
            if self
                .budgets
                .take_bucket_budget(now, requests, &bucket)
                .await?
            {
                return Ok(());
            }
            let next = bucket.next_window(now);
            if next > until || !keep_waiting() {
                return Err(self.no_room());
            }
            tokio::time::sleep(Duration::from_millis((next - now).max(1).unsigned_abs())).await;
        }
    }

    fn no_room(&self) -> BudgetedError {
        BudgetedError::NoRoom {
            retry_in: Duration::from_millis(self.limits.bucket.window_ms.unsigned_abs()),
        }
    }

    /// A store answer, passed on; a SlowDown lowers the bucket's rate in force first.
    async fn observed<T>(&self, outcome: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::SlowDown) = &outcome {
            self.rate.slowed_down(now_ms()).await;
        }
        outcome
    }
}

/// A PUT's share of the bucket's budget, taken with a GET's: used by the PUT sent in its window
/// ([`BudgetedStore::put_slot`]), or given back when dropped unused (a flush that changed
/// nothing, or whose object budget deferred the write).
#[must_use = "dropping a share gives it back"]
pub struct PutShare {
    /// The budget windows it is kept in, and the window it was taken from; `None` when there is
    /// nothing to give back (an unlimited budget, or a share used or forgotten).
    taken: Option<(Budgets, i64)>,
}

impl PutShare {
    /// No share: the PUT takes its own slot.
    pub fn none() -> Self {
        Self { taken: None }
    }

    /// Gives the share back now (best effort: a window that has passed keeps it, which only
    /// wastes it).
    pub async fn give_back(mut self) {
        if let Some((budgets, window)) = self.taken.take() {
            give_back_put(&budgets, window).await;
        }
    }
}

impl Drop for PutShare {
    fn drop(&mut self) {
        if let Some((budgets, window)) = self.taken.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { give_back_put(&budgets, window).await });
        }
    }
}

async fn give_back_put(budgets: &Budgets, window: i64) {
    if let Err(e) = budgets.give_back_bucket_budget(window, Requests::PUT).await {
        tracing::debug!(error = %e, "could not give an unused write back to the bucket's budget");
    }
}

/// A PUT's budget, taken: the one way a PUT reaches the store.
#[must_use = "a slot is taken from the bucket's budget; send the PUT"]
pub struct PutSlot<'a> {
    /// The store the PUT goes to.
    store: &'a BudgetedStore,
}

impl PutSlot<'_> {
    /// Sends the PUT the slot was taken for.
    pub async fn put(
        self,
        key: &ObjectKey,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        let outcome = self.store.store.put(key, body, condition).await;
        self.store.observed(outcome).await
    }
}
