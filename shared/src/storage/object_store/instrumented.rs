//! One timing wrapper for every store: each request of each kind (`get`, `put`, `list`,
//! `delete`) records its duration in `fbsync_storage_request_seconds` the same way, whatever the
//! store, so no request kind goes untimed.

use std::future::Future;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::{KeyPrefix, Listing, ObjectKey, ObjectStore, StoreError, StoredObject, WriteCondition};
use crate::telemetry::STORAGE_SECONDS;

/// A store whose every request is timed.
pub struct Instrumented<S>(pub S);

/// Runs one request of `operation`, recording how long it took (failed ones too).
async fn timed<T>(operation: &'static str, request: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let outcome = request.await;
    metrics::histogram!(STORAGE_SECONDS, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    outcome
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Instrumented<S> {
    async fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        timed("get", self.0.get(key)).await
    }

    async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        timed("put", self.0.put(key, body, condition)).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        timed("delete", self.0.delete(key)).await
    }

    async fn list(
        &self,
        prefix: &KeyPrefix,
        continuation: Option<String>,
    ) -> Result<Listing, StoreError> {
        timed("list", self.0.list(prefix, continuation)).await
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}
