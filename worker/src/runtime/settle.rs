//! Settlement: what becomes of a job's message once its handler returns, decided here and
//! nowhere else.
//!
//! A handler returns `Ok(())` or a [`JobError`], whose variant is its retry class:
//!
//! | handler's answer          | the message                                                  |
//! |---------------------------|--------------------------------------------------------------|
//! | `Ok(())`                  | acked                                                        |
//! | [`JobError::Failed`]      | dead-lettered with its reason                                |
//! | [`JobError::Wait`]        | parked in `<prefix>.delay.<kind>` for the wait, then acked   |
//! | [`JobError::Interrupted`] | given back to its queue (shutdown)                           |
//!
//! Retrying happens inside a handler, step by step under the one retry policy ([`step`],
//! [`page_step`]), so a long job keeps what its earlier steps did; a step's error type says
//! through [`StepError`] what it means once the policy is done with it. Outages of the database
//! or the store delay a job (parked), they never dead-letter it. A step about one Page whose
//! token the Graph API rejected (code 190) flags that Page `needs_reauth` as it fails, so poll
//! rounds skip the Page until the owner connects it again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::config::RetrySettings;
use fbsync_shared::facebook::graph::GraphError;
use fbsync_shared::ids::PageId;
use fbsync_shared::jobs::JobKind;
use fbsync_shared::now_ms;
use fbsync_shared::retry::{RetryClass, RetryError, retry};
use fbsync_shared::storage::db::{DbError, PageStatus, Registry};
use fbsync_shared::storage::object_store::StoreError;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::sender::DeadLetterSender;
use crate::dead_letter::{DeadLetterInfo, DeadReason};
use crate::runtime::park::Parker;

/// Why a job did not complete; the variant decides what becomes of its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// It cannot succeed (poison, a permanent refusal, or a transient failure that outlasted
    /// the retry policy): dead-letter it.
    #[error("{error}")]
    Failed {
        /// The dead letter's reason.
        reason: DeadReason,
        /// The last error in words, without secrets.
        error: String,
        /// Attempts made, for the letter's headers.
        attempts: u32,
        /// When the first failing attempt began.
        first_failure_ms: i64,
    },
    /// The next attempt is far off (a rate limit, an outage, a busy Page): park the message
    /// for this long instead of holding it.
    #[error("must wait {0:?}")]
    Wait(Duration),
    /// Shutdown interrupted a wait: give the message back to its queue.
    #[error("interrupted by shutdown")]
    Interrupted,
}

impl JobError {
    /// Work that can never succeed, found at once (one attempt).
    pub fn failed(reason: DeadReason, error: impl Into<String>) -> Self {
        JobError::Failed {
            reason,
            error: error.into(),
            attempts: 1,
            first_failure_ms: now_ms(),
        }
    }

    /// A message that is not a job of its queue, or names nothing that exists.
    pub fn malformed(error: impl Into<String>) -> Self {
        Self::failed(DeadReason::Malformed, error)
    }

    /// A step's error that ends the job after `attempts`.
    pub fn from_step<E: StepError>(error: &E, attempts: u32, first_failure_ms: i64) -> Self {
        JobError::Failed {
            reason: error.dead_reason(),
            error: error.to_string(),
            attempts,
            first_failure_ms,
        }
    }

    /// What a step that the retry policy gave up on means for the job. An outage of the
    /// database or the store parks the job for the policy's longest delay.
    pub fn from_retry<E: StepError>(
        failure: RetryError<E>,
        retry: &RetrySettings,
        first_failure_ms: i64,
    ) -> Self {
        match failure {
            RetryError::Cancelled => JobError::Interrupted,
            RetryError::Park { wait } => JobError::Wait(wait),
            RetryError::Failed { error, .. } if error.is_outage() && error.is_transient() => {
                tracing::warn!(%error, "the job waits for the database or the store; parked");
                JobError::Wait(retry.max_delay)
            }
            RetryError::Failed { error, attempts } => {
                Self::from_step(&error, attempts, first_failure_ms)
            }
        }
    }

    /// The outcome's name in metrics: `failed`, `parked` or `given_back`.
    pub fn outcome(&self) -> &'static str {
        match self {
            JobError::Failed { .. } => "failed",
            JobError::Wait(_) => "parked",
            JobError::Interrupted => "given_back",
        }
    }
}

/// What a step's error means for its job once the retry policy is done with it.
pub trait StepError: RetryClass + std::fmt::Display {
    /// The dead letter's reason when it ends the job.
    fn dead_reason(&self) -> DeadReason {
        DeadReason::AttemptsExhausted
    }
    /// The Graph API refused the Page's token.
    fn rejects_token(&self) -> bool {
        false
    }
    /// An outage of the database or the store: it delays the job; it never dead-letters it.
    fn is_outage(&self) -> bool {
        false
    }
}

/// Graph errors map onto dead-letter reasons here, once.
impl StepError for GraphError {
    fn dead_reason(&self) -> DeadReason {
        match self {
            GraphError::TokenInvalid { .. } => DeadReason::TokenError,
            GraphError::Permanent(_) => DeadReason::GraphError,
            GraphError::RateLimited { .. } | GraphError::Transient(_) => {
                DeadReason::AttemptsExhausted
            }
        }
    }

    fn rejects_token(&self) -> bool {
        matches!(self, GraphError::TokenInvalid { .. })
    }
}

impl StepError for DbError {
    fn is_outage(&self) -> bool {
        true
    }
}

impl StepError for StoreError {
    fn is_outage(&self) -> bool {
        true
    }
}

/// Runs one step of a job under the retry policy; what the policy gives up on becomes the
/// job's [`JobError`].
pub async fn step<T, E, F, Fut>(
    retry_settings: &RetrySettings,
    operation: &'static str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Result<T, JobError>
where
    E: StepError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = now_ms();
    retry(retry_settings, operation, shutdown, attempt)
        .await
        .map_err(|failure| JobError::from_retry(failure, retry_settings, started))
}

/// Like [`step`], for a step about one Page: a rejected token flags the Page.
pub async fn page_step<T, E, F, Fut>(
    registry: &Registry,
    page_id: &PageId,
    retry_settings: &RetrySettings,
    operation: &'static str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Result<T, JobError>
where
    E: StepError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = now_ms();
    match retry(retry_settings, operation, shutdown, attempt).await {
        Ok(value) => Ok(value),
        Err(failure) => {
            Err(page_step_failed(registry, page_id, failure, retry_settings, started).await)
        }
    }
}

/// What a failed step about one Page means for its job ([`JobError::from_retry`]); a rejected
/// token flags the Page first.
pub async fn page_step_failed<E: StepError>(
    registry: &Registry,
    page_id: &PageId,
    failure: RetryError<E>,
    retry_settings: &RetrySettings,
    first_failure_ms: i64,
) -> JobError {
    if let RetryError::Failed { error, .. } = &failure
        && error.rejects_token()
    {
        flag_rejected_token(registry, page_id, error).await;
    }
    JobError::from_retry(failure, retry_settings, first_failure_ms)
}

/// Settles messages: the one place that acks, dead-letters, parks or gives back a job's
/// message.
pub struct Settler {
    /// Publishes dead letters with confirms.
    pub dead_letters: Arc<DeadLetterSender>,
    /// Parks jobs that must wait long.
    pub parker: Parker,
}

impl Settler {
    /// Settles `delivery`, taken from the queue of `kind`, after its handler answered
    /// `outcome`.
    pub async fn settle(
        &self,
        delivery: &Delivery,
        kind: JobKind,
        outcome: Result<(), JobError>,
        shutdown: &CancellationToken,
    ) {
        match outcome {
            Ok(()) => {
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            Err(error @ JobError::Failed { .. }) => {
                self.dead_letter(delivery, kind, &error, shutdown).await
            }
            Err(JobError::Wait(wait)) => self.parker.park(delivery, kind, wait, shutdown).await,
            Err(JobError::Interrupted) => give_back(delivery).await,
        }
    }

    /// Moves `delivery` to the dead-letter queue for `error` (a [`JobError::Failed`]); it goes
    /// back to its queue instead when the letter cannot be confirmed.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        kind: JobKind,
        error: &JobError,
        shutdown: &CancellationToken,
    ) {
        let Some(info) = letter(kind, error) else {
            return give_back(delivery).await;
        };
        self.dead_letters.send(delivery, info, shutdown).await
    }
}

/// The dead letter's information for a failed job of the queue `kind`; `None` for the other
/// classes (they are not dead-lettered).
pub fn letter(kind: JobKind, error: &JobError) -> Option<DeadLetterInfo> {
    let JobError::Failed {
        reason,
        error,
        attempts,
        first_failure_ms,
        ..
    } = error
    else {
        return None;
    };
    Some(DeadLetterInfo::new(
        *reason,
        error.clone(),
        *attempts,
        kind.as_str(),
        *first_failure_ms,
        now_ms(),
    ))
}

/// Returns a message to its queue.
pub async fn give_back(delivery: &Delivery) {
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await;
}

/// The Graph API rejected the Page's token (code 190): the Page is marked `needs_reauth` with
/// the error in words, so `fbsync pages list` says so and poll rounds skip it until the owner
/// connects it again. A database failure here is logged; the job's dead letter says why anyway.
async fn flag_rejected_token(
    registry: &Registry,
    page_id: &PageId,
    error: &impl std::fmt::Display,
) {
    let note = format!("token rejected (code 190): {error}");
    if let Err(e) = registry
        .mark_page_error(page_id, Some(PageStatus::NeedsReauth), &note, now_ms())
        .await
    {
        tracing::error!(%page_id, error = %e, "could not flag the Page for re-authorisation");
    }
    tracing::warn!(%page_id, "Page token rejected; the Page needs re-authorisation");
}

#[cfg(test)]
#[path = "settle_tests.rs"]
mod tests;
