use super::*;

fn policy() -> RetrySettings {
    RetrySettings {
        max_attempts: 3,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_secs(7),
        park_after: Duration::from_secs(60),
    }
}

fn failed<E>(error: E, attempts: u32) -> RetryError<E> {
    RetryError::Failed { error, attempts }
}

#[test]
fn a_rejected_token_dead_letters_as_a_token_error() {
    let error = GraphError::TokenInvalid {
        message: "expired".into(),
    };
    assert!(error.rejects_token());
    let settled = JobError::from_retry(failed(error, 1), &policy(), 10);
    let JobError::Failed {
        reason,
        attempts,
        first_failure_ms,
        error,
    } = &settled
    else {
        panic!("dead-lettered: {settled:?}");
    };
    assert_eq!(*reason, DeadReason::TokenError);
    assert_eq!((*attempts, *first_failure_ms), (1, 10));
    assert!(error.contains("190"), "{error}");
}

#[test]
fn graph_refusals_and_exhausted_rate_limits_have_their_own_reasons() {
    let permanent =
        JobError::from_retry(failed(GraphError::Permanent("no".into()), 1), &policy(), 0);
    assert!(matches!(
        permanent,
        JobError::Failed {
            reason: DeadReason::GraphError,
            ..
        }
    ));
    let limited = GraphError::RateLimited {
        code: 4,
        retry_after: None,
    };
    let exhausted = JobError::from_retry(failed(limited, 3), &policy(), 0);
    assert!(matches!(
        exhausted,
        JobError::Failed {
            reason: DeadReason::AttemptsExhausted,
            attempts: 3,
            ..
        }
    ));
}

#[test]
fn an_outage_of_the_database_parks_the_job_for_the_longest_delay_instead_of_dead_lettering_it() {
    let outage = DbError::Query(sqlx::Error::PoolTimedOut);
    assert!(outage.is_transient());
    let settled = JobError::from_retry(failed(outage, 3), &policy(), 0);
    assert_eq!(settled, JobError::Wait(Duration::from_secs(7)));
    // A database that refuses for good is not an outage that clears.
    let broken = DbError::BadUrl("x".into());
    let settled = JobError::from_retry(failed(broken, 1), &policy(), 0);
    assert!(matches!(
        settled,
        JobError::Failed {
            reason: DeadReason::AttemptsExhausted,
            ..
        }
    ));
}

#[test]
fn shutdown_gives_the_job_back_and_a_long_wait_parks_it() {
    let cancelled = JobError::from_retry::<GraphError>(RetryError::Cancelled, &policy(), 0);
    assert_eq!(cancelled, JobError::Interrupted);
    let wait = Duration::from_secs(600);
    let parked = JobError::from_retry::<GraphError>(RetryError::Park { wait }, &policy(), 0);
    assert_eq!(parked, JobError::Wait(wait));
    assert_eq!(
        [
            cancelled.outcome(),
            parked.outcome(),
            JobError::malformed("x").outcome()
        ],
        ["given_back", "parked", "failed"]
    );
}

#[test]
fn only_a_failed_job_has_a_letter_and_it_names_the_queue_it_came_from() {
    let error = JobError::failed(DeadReason::UnknownPage, "page 1 is not registered");
    let info = letter(JobKind::Poll, &error).expect("a letter");
    assert_eq!(info.reason, DeadReason::UnknownPage);
    assert_eq!(info.routing_key, "poll");
    assert_eq!(info.error, "page 1 is not registered");
    assert_eq!(info.attempts, 1);
    assert!(letter(JobKind::Poll, &JobError::Interrupted).is_none());
    assert!(letter(JobKind::Poll, &JobError::Wait(Duration::from_secs(1))).is_none());
}

#[tokio::test]
async fn a_step_retries_a_transient_failure_then_settles_what_the_policy_gave_up_on() {
    let shutdown = CancellationToken::new();
    let mut calls = 0;
    let outcome: Result<(), JobError> = step(&policy(), "test", &shutdown, || {
        calls += 1;
        std::future::ready(Err(GraphError::Transient("503".into())))
    })
    .await;
    assert_eq!(calls, 3, "every attempt of the policy");
    assert!(matches!(
        outcome,
        Err(JobError::Failed {
            reason: DeadReason::AttemptsExhausted,
            attempts: 3,
            ..
        })
    ));
}
