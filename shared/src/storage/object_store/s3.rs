//! Spaces or any S3-compatible store, through aws-sdk-s3: path-style addressing, checksums
//! only when required (Spaces rejects the SDK's default CRC32), no SDK retries, and every SDK
//! error classified once into a [`StoreError`] by status and S3 error code.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectCannedAcl;
use bytes::Bytes;
use secrecy::ExposeSecret;

use super::{
    KeyPrefix, Listing, ObjectKey, ObjectStore, REQUEST_TIMEOUT, StoreError, StoredObject,
    WriteCondition,
};
use crate::config::S3Target;

/// Spaces or any S3-compatible store.
pub struct S3Store {
    /// The SDK client (path-style, checksums only when required, no SDK retries).
    client: aws_sdk_s3::Client,
    /// The bucket every key lives in.
    bucket: String,
    /// For logs (no credentials).
    endpoint: String,
    /// Whether writes carry their [`WriteCondition`].
    send_write_conditions: bool,
}

impl S3Store {
    /// A client for `target` (no request is sent until the first one).
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
            send_write_conditions: target.send_write_conditions,
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
    async fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        let outcome = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await;
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
        key: &ObjectKey,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .body(ByteStream::from(body))
            .content_type("application/json")
            .acl(ObjectCannedAcl::Private);
        let request = match condition {
            _ if !self.send_write_conditions => request,
            WriteCondition::Absent => request.if_none_match("*"),
            WriteCondition::Matches(etag) => request.if_match(etag),
        };
        let outcome = request.send().await;
        outcome
            .map(|written| written.e_tag().map(String::from))
            .map_err(|error| classify(&error))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let outcome = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await;
        outcome.map(|_| ()).map_err(|error| classify(&error))
    }

    async fn list(
        &self,
        prefix: &KeyPrefix,
        continuation: Option<String>,
    ) -> Result<Listing, StoreError> {
        let outcome = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix.as_str())
            .set_continuation_token(continuation)
            .send()
            .await;
        let page = outcome.map_err(|error| classify(&error))?;
        let keys = page
            .contents()
            .iter()
            .filter_map(|object| object.key().map(|key| ObjectKey::listed(key.to_string())))
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
