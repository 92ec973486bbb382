//! The object store behind one small interface: Spaces/S3 through aws-sdk-s3, or a local
//! directory with the same keys (the embedded default).
//!
//! Keys follow the seed's layout (see [`conversation_key`] and [`page_data_key`]). The SDK's
//! own retries are off: every attempt counts against Spaces' budgets, so retrying is the
//! caller's decision (see `retry`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectCannedAcl;
use bytes::Bytes;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::{S3Target, StoreLocation};
use crate::ids::{ConversationKey, PageId, UserUuid};
use crate::retry::RetryClass;
use crate::telemetry::STORAGE_SECONDS;

/// Key of a conversation file.
pub fn conversation_key(user_uuid: &UserUuid, conversation: &ConversationKey) -> String {
    format!(
        "{}{}.json",
        conversations_prefix(user_uuid, &conversation.page_id),
        conversation.user_psid
    )
}

/// The folder of a Page's conversation objects: `users/<uuid>/facebook_messenger/<page_id>/conversations/`.
pub fn conversations_prefix(user_uuid: &UserUuid, page_id: &PageId) -> String {
    format!("users/{user_uuid}/facebook_messenger/{page_id}/conversations/")
}

/// Key of a Page's metadata file.
pub fn page_data_key(user_uuid: &UserUuid, page_id: &PageId) -> String {
    format!("users/{user_uuid}/facebook_messenger/{page_id}/page_data.json")
}

/// The folder of everything a user owns: `users/<uuid>/`.
pub fn user_prefix(user_uuid: &UserUuid) -> String {
    format!("users/{user_uuid}/")
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The keys, in key order.
    pub keys: Vec<String>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<String>,
}

/// Where `fbsync check` writes, reads and deletes its probe object: never under `users/`.
pub const PROBE_PREFIX: &str = "_fbsync/probe/";

/// The longest one store request may take before it counts as failed. A flusher sends a PUT
/// only while its claim has at least this long to run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An object as read: its bytes and the version a conditional write must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
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
    async fn get(&self, key: &str) -> Result<Option<StoredObject>, StoreError>;
    /// Writes the object (private, application/json) if `condition` holds; the version it now
    /// has, when the store says (what a later `If-Match` names).
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, StoreError>;
    /// Deletes the object (nothing happens when it does not exist). Only `fbsync check` (its
    /// own probe under [`PROBE_PREFIX`]) and a data-deletion request (a user's objects under
    /// [`user_prefix`]) delete.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// One page of the keys under `prefix` (one LIST request), starting where `continuation`
    /// (the `next` of the previous page) says.
    async fn list(&self, prefix: &str, continuation: Option<String>)
    -> Result<Listing, StoreError>;
    /// Where objects go, for logs.
    fn describe(&self) -> String;
}

/// Opens the store at `location`: S3-compatible, or the local directory.
pub fn open_store(location: &StoreLocation) -> Box<dyn ObjectStore> {
    match location {
        StoreLocation::S3(target) => Box::new(S3Store::new(target)),
        StoreLocation::Local(root) => Box::new(LocalStore { root: root.clone() }),
    }
}

/// Spaces or any S3-compatible store.
pub struct S3Store {
    /// The SDK client (path-style, checksums only when required, no SDK retries).
    client: aws_sdk_s3::Client,
    /// The bucket every key lives in.
    bucket: String,
    /// For logs (no credentials).
    endpoint: String,
    /// Whether writes carry their [`WriteCondition`].
    conditional_writes: bool,
}

impl S3Store {
    pub fn new(target: &S3Target) -> Self {
        let credentials = Credentials::new(
            target.access_key.expose_secret(),
            target.secret_key.expose_secret(),
            None,
            None,
            "fbsync-settings",
        );
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(REQUEST_TIMEOUT)
            .build();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(target.region.clone()))
            .endpoint_url(&target.endpoint)
            .credentials_provider(credentials)
            // Spaces and most S3-compatible servers want bucket names in the path.
            .force_path_style(true)
            // Spaces rejects the SDK's default CRC32 checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // Every attempt counts against the store's budgets: retries are ours to decide.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts)
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: target.bucket.clone(),
            endpoint: target.endpoint.clone(),
            conditional_writes: target.conditional_writes,
        }
    }

    /// The SDK client, for tests and tools that create buckets.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }
}

/// Classifies an SDK error by its HTTP status, S3 error code and kind.
fn classify<E: ProvideErrorMetadata + std::fmt::Debug>(
    error: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StoreError {
    let code = error.code().unwrap_or_default();
    let message = format!("{} {}", code, error.message().unwrap_or_default())
        .trim()
        .to_string();
    let status = error
        .raw_response()
        .map(|response| response.status().as_u16());
    match (status, code) {
        (_, "SlowDown") => StoreError::SlowDown,
        (Some(412 | 409), _) | (_, "PreconditionFailed" | "ConditionalRequestConflict") => {
            StoreError::Conflict
        }
        (Some(status @ 500..=599), _) => StoreError::Transient(format!("HTTP {status} {message}")),
        (_, "InternalError" | "ServiceUnavailable") => StoreError::Transient(message),
        _ if matches!(
            error,
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
        ) =>
        {
            StoreError::Transient(format!("{error:?}").chars().take(300).collect())
        }
        (_, "") => StoreError::Transient(format!("no error code (HTTP {status:?})")),
        _ => StoreError::Permanent(message),
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        let started = Instant::now();
        let outcome = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        metrics::histogram!(STORAGE_SECONDS, "operation" => "get")
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(object) => {
                let version = object.e_tag().unwrap_or_default().to_string();
                let body =
                    object.body.collect().await.map_err(|e| {
                        StoreError::Transient(format!("reading the object body: {e}"))
                    })?;
                Ok(Some(StoredObject {
                    body: body.into_bytes(),
                    version,
                }))
            }
            Err(SdkError::ServiceError(service)) if service.err().is_no_such_key() => Ok(None),
            Err(error) => Err(classify(&error)),
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        let started = Instant::now();
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .content_type("application/json")
            .acl(ObjectCannedAcl::Private);
        let request = match condition {
            _ if !self.conditional_writes => request,
            WriteCondition::Absent => request.if_none_match("*"),
            WriteCondition::Matches(etag) => request.if_match(etag),
        };
        let outcome = request.send().await;
        metrics::histogram!(STORAGE_SECONDS, "operation" => "put")
            .record(started.elapsed().as_secs_f64());
        outcome
            .map(|written| written.e_tag().map(String::from))
            .map_err(|error| classify(&error))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let outcome = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        outcome.map(|_| ()).map_err(|error| classify(&error))
    }

    async fn list(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<Listing, StoreError> {
        let started = Instant::now();
        let outcome = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_continuation_token(continuation)
            .send()
            .await;
        metrics::histogram!(STORAGE_SECONDS, "operation" => "list")
            .record(started.elapsed().as_secs_f64());
        let page = outcome.map_err(|error| classify(&error))?;
        let keys = page
            .contents()
            .iter()
            .filter_map(|object| object.key().map(String::from))
            .collect();
        let next = if page.is_truncated().unwrap_or(false) {
            page.next_continuation_token().map(String::from)
        } else {
            None
        };
        Ok(Listing { keys, next })
    }

    fn describe(&self) -> String {
        format!("S3 bucket {} at {}", self.bucket, self.endpoint)
    }
}

/// The local store's version of an object: a hash of its bytes.
fn content_version(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Objects as files under a directory (the embedded default: no cloud account needed).
pub struct LocalStore {
    /// Every key is a path below this directory.
    pub root: PathBuf,
}

impl LocalStore {
    /// The lock file of an object, outside the bucket's layout (`<root>/.locks/`).
    fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join(".locks").join(format!(
            "{}.lock",
            hex::encode(Sha256::digest(key.as_bytes()))
        ))
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        if key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(StoreError::Permanent(format!(
                "refusing unsafe key {key:?}"
            )));
        }
        Ok(self.root.join(key))
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn get(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        let started = Instant::now();
        let read = tokio::fs::read(self.path(key)?).await;
        metrics::histogram!(STORAGE_SECONDS, "operation" => "get")
            .record(started.elapsed().as_secs_f64());
        match read {
            Ok(bytes) => Ok(Some(StoredObject {
                version: content_version(&bytes),
                body: Bytes::from(bytes),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Transient(e.to_string())),
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        let path = self.path(key)?;
        let lock = self.lock_path(key);
        let condition = condition.clone();
        let started = Instant::now();
        let version = content_version(&body);
        let written =
            tokio::task::spawn_blocking(move || write_durably(&path, &lock, &body, &condition))
                .await
                .map_err(|e| StoreError::Transient(format!("write task failed: {e}")))?;
        metrics::histogram!(STORAGE_SECONDS, "operation" => "put")
            .record(started.elapsed().as_secs_f64());
        written.map(|()| Some(version))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Transient(e.to_string())),
        }
    }

    /// The whole listing at once (a local directory has no request budget).
    async fn list(
        &self,
        prefix: &str,
        _continuation: Option<String>,
    ) -> Result<Listing, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        let keys = tokio::task::spawn_blocking(move || list_files(&root, &prefix))
            .await
            .map_err(|e| StoreError::Transient(format!("list task failed: {e}")))??;
        Ok(Listing { keys, next: None })
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}

/// The keys of the local store's files that start with `prefix`, sorted (lock files and
/// temporary files are not objects).
fn list_files(root: &Path, prefix: &str) -> Result<Vec<String>, StoreError> {
    // Walk from the deepest folder the prefix names completely.
    let folder = prefix.rsplit_once('/').map_or("", |(folder, _)| folder);
    if folder.split('/').any(|part| part == "." || part == "..") {
        return Err(StoreError::Permanent(format!(
            "refusing unsafe prefix {prefix:?}"
        )));
    }
    let mut keys = Vec::new();
    let mut pending = vec![(root.join(folder), folder.to_string())];
    while let Some((dir, key_dir)) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::Transient(e.to_string())),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::Transient(e.to_string()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = if key_dir.is_empty() {
                name.clone()
            } else {
                format!("{key_dir}/{name}")
            };
            let file_type = entry
                .file_type()
                .map_err(|e| StoreError::Transient(e.to_string()))?;
            if file_type.is_dir() {
                if name != ".locks" {
                    pending.push((entry.path(), key));
                }
            } else if key.starts_with(prefix) && !name.ends_with(".tmp") {
                keys.push(key);
            }
        }
    }
    keys.sort();
    Ok(keys)
}

/// Writes an object of the local store so that it is on disk when this returns, and only if
/// `condition` holds, atomically across processes: under an exclusive lock on the object's lock
/// file, it checks the condition, writes a temporary file, fsyncs it, renames it over the
/// object and fsyncs the directory (so the rename itself survives a power cut).
fn write_durably(
    path: &Path,
    lock: &Path,
    body: &[u8],
    condition: &WriteCondition,
) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Transient(e.to_string());
    for dir in [path.parent(), lock.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock)
        .map_err(io)?;
    // Released when the file is closed, also if this process dies.
    lock_file.lock().map_err(io)?;
    let current = match std::fs::read(path) {
        Ok(bytes) => Some(content_version(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    let holds = match condition {
        WriteCondition::Absent => current.is_none(),
        WriteCondition::Matches(version) => current.as_deref() == Some(version.as_str()),
    };
    if !holds {
        return Err(StoreError::Conflict);
    }
    // Write aside, then rename: readers never see half a file.
    let temp = path.with_extension(format!("json.{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut file = std::fs::File::create(&temp).map_err(io)?;
    file.write_all(body).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&temp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_local_store_lists_a_prefix_and_deletes() {
        let root = std::env::temp_dir().join(format!("fbsync-list-{}", uuid::Uuid::new_v4()));
        let store = LocalStore { root: root.clone() };
        for key in ["users/a/x/1.json", "users/a/2.json", "users/b/3.json"] {
            store
                .put(key, Bytes::from_static(b"[]"), &WriteCondition::Absent)
                .await
                .expect("put");
        }
        let listing = store.list("users/a/", None).await.expect("list");
        assert_eq!(listing.keys, vec!["users/a/2.json", "users/a/x/1.json"]);
        assert_eq!(listing.next, None);
        store.delete("users/a/2.json").await.expect("delete");
        let listing = store.list("users/a/", None).await.expect("list");
        assert_eq!(listing.keys, vec!["users/a/x/1.json"]);
        assert!(
            store
                .list("users/c/", None)
                .await
                .expect("list")
                .keys
                .is_empty()
        );
        let _ = std::fs::remove_dir_all(root);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_conditional_writes_to_the_local_store_let_exactly_one_through() {
        let root = std::env::temp_dir().join(format!("fbsync-lock-{}", uuid::Uuid::new_v4()));
        let store = std::sync::Arc::new(LocalStore { root: root.clone() });
        for round in 0..5 {
            let key = format!("users/u/facebook_messenger/1/conversations/{round}.json");
            let writers: Vec<_> = (0..16)
                .map(|writer| {
                    let store = store.clone();
                    let key = key.clone();
                    tokio::spawn(async move {
                        let body = Bytes::from(format!("[{writer}]"));
                        store.put(&key, body, &WriteCondition::Absent).await
                    })
                })
                .collect();
            let mut written = 0;
            for writer in writers {
                match writer.await.expect("task") {
                    Ok(_) => written += 1,
                    Err(StoreError::Conflict) => {}
                    Err(e) => panic!("unexpected failure: {e}"),
                }
            }
            assert_eq!(written, 1, "round {round}: exactly one creator wins");
        }
        let _ = std::fs::remove_dir_all(root);
    }
}
