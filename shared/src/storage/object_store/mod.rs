//! The object store behind one small interface: Spaces/S3 through aws-sdk-s3 ([`s3`]), or a
//! local directory with the same keys ([`local`], the embedded default).
//!
//! Invariants:
//! - keys are typed ([`ObjectKey`], [`KeyPrefix`]) and follow the seed's layout;
//! - [`open_store`] wraps every store in [`instrumented::Instrumented`], so each request of
//!   each kind is timed the same way;
//! - the roles never hold a store directly: they hold a
//!   [`BudgetedStore`](crate::storage::budgeted_store::BudgetedStore), which charges the
//!   bucket's request budget before every request;
//! - the SDK's own retries are off: every attempt counts against Spaces' budgets, so retrying
//!   is the caller's decision (see `retry`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::StoreLocation;
use crate::retry::RetryClass;
pub use crate::storage::object_key::{KeyPrefix, ObjectKey, PROBE_PREFIX};

pub mod instrumented;
pub mod local;
pub mod s3;

pub use local::LocalStore;
pub use s3::S3Store;

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The keys, in key order.
    pub keys: Vec<ObjectKey>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<String>,
}

/// The longest one store request may take before it counts as failed. A flusher sends a PUT
/// only while its claim has at least this long to run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An object as read: its bytes and the version a conditional write must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// The object's bytes, as stored.
    pub body: Bytes,
    /// The ETag (S3) or content hash (local directory).
    pub version: String,
}

/// What a write requires of the object's current state, so a read-modify-write never
/// overwrites someone else's write (a lost update) even if two writers ever overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteCondition {
    /// The object must not exist yet (`If-None-Match: *`).
    Absent,
    /// The object must still be at this version (`If-Match`).
    Matches(String),
}

impl WriteCondition {
    /// The condition that holds for what was just read.
    pub fn after_read(read: Option<&StoredObject>) -> Self {
        read.map_or(WriteCondition::Absent, |object| {
            WriteCondition::Matches(object.version.clone())
        })
    }
}

/// How a store request failed; decides retry and backoff.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object changed since it was read (412 or 409): read again and redo the merge.
    #[error("the object changed since it was read")]
    Conflict,
    /// 503 SlowDown: the store's rate limit; back off.
    #[error("the store asked us to slow down (503 SlowDown)")]
    SlowDown,
    /// 5xx, timeouts, connection failures: worth retrying.
    #[error("transient store failure: {0}")]
    Transient(String),
    /// Anything else (access denied, no such bucket, a local disk error): retrying soon will
    /// not help, but staged data is kept and retried later.
    #[error("store failure: {0}")]
    Permanent(String),
}

impl RetryClass for StoreError {
    fn is_transient(&self) -> bool {
        !matches!(self, StoreError::Permanent(_))
    }
}

/// Reads and writes whole JSON objects.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// The object, or `None` when it does not exist.
    async fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError>;
    /// Writes the object (private, application/json) if `condition` holds; the version it now
    /// has, when the store says (what a later `If-Match` names).
    async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, StoreError>;
    /// Deletes the object (nothing happens when it does not exist), one object per request: a
    /// single DELETE needs no checksum, where the SDK's `DeleteObjects` adds a CRC32 one that
    /// S3-compatible services have rejected. Only the probes (under [`PROBE_PREFIX`]) and a
    /// data-deletion request (a user's objects under [`KeyPrefix::user`]) delete.
    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError>;
    /// One page of the keys under `prefix` (one LIST request), starting where `continuation`
    /// (the `next` of the previous page) says.
    async fn list(
        &self,
        prefix: &KeyPrefix,
        continuation: Option<String>,
    ) -> Result<Listing, StoreError>;
    /// Where objects go, for logs.
    fn describe(&self) -> String;
}

/// Opens the store at `location` (S3-compatible, or the local directory), timed.
pub fn open_store(location: &StoreLocation) -> Arc<dyn ObjectStore> {
    match location {
        StoreLocation::S3(target) => Arc::new(instrumented::Instrumented(S3Store::new(target))),
        StoreLocation::Local(root) => Arc::new(instrumented::Instrumented(LocalStore {
            root: root.clone(),
        })),
    }
}
