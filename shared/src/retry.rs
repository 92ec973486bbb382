//! The one retry policy for transient failures: exponential backoff with jitter, bounded in
//! attempts and delay (WORKER_MAX_ATTEMPTS, WORKER_RETRY_BASE_MS, WORKER_RETRY_MAX_MS), built on
//! `backon`.
//!
//! An error can ask for a longer wait than the policy's (a Graph API rate limit says when access
//! comes back); the longer of the two is used. Only the caller's own task waits: other work the
//! worker holds runs in other tasks.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::config::RetrySettings;
use crate::telemetry::RETRIES;

/// What a failed attempt means for the retry loop.
pub trait RetryClass {
    /// Worth another attempt.
    fn is_transient(&self) -> bool;
    /// The least time to wait before the next attempt, when the failure says so.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
    /// Not a failure but a wait for a budget (a rate the store allows): it waits
    /// [`retry_after`](Self::retry_after) and uses up no attempt.
    fn is_budget_wait(&self) -> bool {
        false
    }
}

/// The policy's backoff for these settings.
pub fn backoff(settings: &RetrySettings) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(settings.base_delay)
        .with_max_delay(settings.max_delay)
        .with_max_times(settings.max_attempts.saturating_sub(1) as usize)
        .with_jitter()
}

/// Delays for work that is retried for as long as it takes (reconnecting to the broker): from
/// `base`, doubling, up to `max`, with jitter.
pub fn endless_backoff(base: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(max)
        .without_max_times()
        .with_jitter()
        .build()
}

/// The delay before retry number `failures` (1-based) of a long-lived job such as a
/// conversation flush, which is retried forever but never faster than the policy allows.
pub fn delay_after_failures(settings: &RetrySettings, failures: u32) -> Duration {
    endless_backoff(settings.base_delay, settings.max_delay)
        .nth(failures.saturating_sub(1) as usize)
        .unwrap_or(settings.max_delay)
}

/// Why [`retry`] stopped without a value.
#[derive(Debug)]
pub enum RetryError<E> {
    /// The last error was permanent, or the policy ran out of attempts.
    Failed { error: E, attempts: u32 },
    /// Shutdown began while waiting for the next attempt: give the work back.
    Cancelled,
    /// The next attempt is further away than [`RetrySettings::park_after`]: park the job for
    /// `wait` instead of holding it (a queue message held that long would hit the broker's
    /// consumer timeout).
    Park { wait: Duration },
}

/// Runs `attempt` until it succeeds, fails permanently, the policy gives up, or `shutdown`
/// fires during a wait. `operation` names it in metrics and logs.
pub async fn retry<T, E, F, Fut>(
    settings: &RetrySettings,
    operation: &'static str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Result<T, RetryError<E>>
where
    E: RetryClass + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let delays = backoff(settings).build();
    retry_with_delays(settings, delays, operation, shutdown, attempt).await
}

/// Like [`retry`], but transient failures are retried for as long as they last (an outage of
/// the database that staging needs): it returns only on success, a permanent failure, a wait
/// to park, or shutdown.
pub async fn retry_while_transient<T, E, F, Fut>(
    settings: &RetrySettings,
    operation: &'static str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Result<T, RetryError<E>>
where
    E: RetryClass + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let delays = endless_backoff(settings.base_delay, settings.max_delay);
    retry_with_delays(settings, delays, operation, shutdown, attempt).await
}

async fn retry_with_delays<T, E, F, Fut>(
    settings: &RetrySettings,
    mut delays: impl Iterator<Item = Duration>,
    operation: &'static str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Result<T, RetryError<E>>
where
    E: RetryClass + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts = 0;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_budget_wait() => {
                let delay = error.retry_after().unwrap_or(settings.base_delay);
                if delay > settings.park_after {
                    return Err(RetryError::Park { wait: delay });
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(RetryError::Cancelled),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) if error.is_transient() => {
                attempts += 1;
                let Some(policy_delay) = delays.next() else {
                    return Err(RetryError::Failed { error, attempts });
                };
                let delay = error
                    .retry_after()
                    .map_or(policy_delay, |asked| asked.max(policy_delay));
                if delay > settings.park_after {
                    return Err(RetryError::Park { wait: delay });
                }
                metrics::counter!(RETRIES, "operation" => operation).increment(1);
                tracing::debug!(
                    operation,
                    attempts,
                    delay_ms = delay.as_millis() as u64,
                    %error,
                    "retrying"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(RetryError::Cancelled),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => {
                return Err(RetryError::Failed {
                    error,
                    attempts: attempts + 1,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Flaky {
        transient: bool,
        after: Option<Duration>,
    }

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "flaky")
        }
    }

    impl RetryClass for Flaky {
        fn is_transient(&self) -> bool {
            self.transient
        }
        fn retry_after(&self) -> Option<Duration> {
            self.after
        }
    }

    fn settings(max_attempts: u32) -> RetrySettings {
        RetrySettings {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            park_after: Duration::from_secs(60),
        }
    }

    fn flaky(transient: bool, after: Option<Duration>) -> Flaky {
        Flaky { transient, after }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_attempts_run_out() {
        let mut calls = 0;
        let outcome: Result<(), _> = retry(&settings(4), "test", &CancellationToken::new(), || {
            calls += 1;
            async { Err(flaky(true, None)) }
        })
        .await;
        assert!(matches!(
            outcome,
            Err(RetryError::Failed { attempts: 4, .. })
        ));
        assert_eq!(calls, 4);
    }

    #[tokio::test]
    async fn permanent_failures_stop_at_once_and_success_returns() {
        let never = CancellationToken::new();
        let outcome: Result<(), _> = retry(&settings(4), "test", &never, || async {
            Err(flaky(false, None))
        })
        .await;
        assert!(matches!(
            outcome,
            Err(RetryError::Failed { attempts: 1, .. })
        ));
        let mut calls = 0;
        let value = retry(&settings(4), "test", &never, || {
            calls += 1;
            let fail = calls < 3;
            async move { if fail { Err(flaky(true, None)) } else { Ok(7) } }
        })
        .await
        .expect("succeeds");
        assert_eq!((value, calls), (7, 3));
    }

    #[tokio::test]
    async fn a_requested_wait_is_honoured_and_shutdown_cuts_it_short() {
        let started = std::time::Instant::now();
        let _: Result<(), _> = retry(&settings(2), "test", &CancellationToken::new(), || async {
            Err(flaky(true, Some(Duration::from_millis(150))))
        })
        .await;
        assert!(started.elapsed() >= Duration::from_millis(150));

        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            trigger.cancel();
        });
        let started = std::time::Instant::now();
        let outcome: Result<(), _> = retry(&settings(2), "test", &shutdown, || async {
            Err(flaky(true, Some(Duration::from_secs(60))))
        })
        .await;
        assert!(matches!(outcome, Err(RetryError::Cancelled)));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_wait_longer_than_the_park_threshold_parks_the_job_at_once() {
        let started = std::time::Instant::now();
        let mut calls = 0;
        let outcome: Result<(), _> = retry(&settings(4), "test", &CancellationToken::new(), || {
            calls += 1;
            async { Err(flaky(true, Some(Duration::from_secs(30 * 60)))) }
        })
        .await;
        assert!(
            matches!(outcome, Err(RetryError::Park { wait }) if wait == Duration::from_secs(1800))
        );
        assert_eq!(calls, 1);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn flush_delays_grow_and_stay_bounded() {
        let settings = RetrySettings {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            park_after: Duration::from_secs(60),
        };
        assert!(delay_after_failures(&settings, 1) <= Duration::from_millis(200));
        assert!(delay_after_failures(&settings, 50) <= Duration::from_secs(4));
        assert!(delay_after_failures(&settings, 6) >= Duration::from_millis(1000));
    }
}
