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
}

/// The policy's backoff for these settings.
pub fn backoff(settings: &RetrySettings) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(settings.base_delay)
        .with_max_delay(settings.max_delay)
        .with_max_times(settings.max_attempts.saturating_sub(1) as usize)
        .with_jitter()
}

/// The delay before retry number `failures` (1-based) of a long-lived job such as a
/// conversation flush, which is retried forever but never faster than the policy allows.
pub fn delay_after_failures(settings: &RetrySettings, failures: u32) -> Duration {
    let unbounded = ExponentialBuilder::default()
        .with_min_delay(settings.base_delay)
        .with_max_delay(settings.max_delay)
        .without_max_times()
        .with_jitter();
    unbounded
        .build()
        .nth(failures.saturating_sub(1) as usize)
        .unwrap_or(settings.max_delay)
}

/// The outcome of [`retry`]: the last error and how many attempts were made.
#[derive(Debug)]
pub struct Exhausted<E> {
    pub error: E,
    pub attempts: u32,
}

/// Runs `attempt` until it succeeds, fails permanently, or the policy gives up. `operation`
/// names it in metrics and logs.
pub async fn retry<T, E, F, Fut>(
    settings: &RetrySettings,
    operation: &'static str,
    mut attempt: F,
) -> Result<T, Exhausted<E>>
where
    E: RetryClass + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = backoff(settings).build();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() => {
                let Some(policy_delay) = delays.next() else {
                    return Err(Exhausted { error, attempts });
                };
                let delay = error
                    .retry_after()
                    .map_or(policy_delay, |asked| asked.max(policy_delay));
                metrics::counter!(RETRIES, "operation" => operation).increment(1);
                tracing::debug!(operation, attempts, delay_ms = delay.as_millis() as u64, %error, "retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(Exhausted { error, attempts }),
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
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_attempts_run_out() {
        let mut calls = 0;
        let outcome: Result<(), _> = retry(&settings(4), "test", || {
            calls += 1;
            async {
                Err(Flaky {
                    transient: true,
                    after: None,
                })
            }
        })
        .await;
        assert_eq!(outcome.expect_err("gives up").attempts, 4);
        assert_eq!(calls, 4);
    }

    #[tokio::test]
    async fn permanent_failures_stop_at_once_and_success_returns() {
        let outcome: Result<(), _> = retry(&settings(4), "test", || async {
            Err(Flaky {
                transient: false,
                after: None,
            })
        })
        .await;
        assert_eq!(outcome.expect_err("stops").attempts, 1);
        let mut calls = 0;
        let value = retry(&settings(4), "test", || {
            calls += 1;
            let fail = calls < 3;
            async move {
                if fail {
                    Err(Flaky {
                        transient: true,
                        after: None,
                    })
                } else {
                    Ok(7)
                }
            }
        })
        .await
        .expect("succeeds");
        assert_eq!((value, calls), (7, 3));
    }

    #[tokio::test]
    async fn a_requested_wait_is_honoured() {
        let started = std::time::Instant::now();
        let _: Result<(), _> = retry(&settings(2), "test", || async {
            Err(Flaky {
                transient: true,
                after: Some(Duration::from_millis(150)),
            })
        })
        .await;
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[test]
    fn flush_delays_grow_and_stay_bounded() {
        let settings = RetrySettings {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        };
        assert!(delay_after_failures(&settings, 1) <= Duration::from_millis(200));
        assert!(delay_after_failures(&settings, 50) <= Duration::from_secs(4));
        assert!(delay_after_failures(&settings, 6) >= Duration::from_millis(1000));
    }
}
