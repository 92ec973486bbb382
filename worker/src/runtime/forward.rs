//! Moving a delivery elsewhere, as dead letters and parked jobs both do: a copy is published
//! with a confirm, then the original is acked. While the broker cannot confirm the copy (the
//! publisher still connecting, an outage) the move waits under the retry policy; only when the
//! policy gives up, or shutdown begins, does the original go back to its queue. Nothing is lost
//! either way, and a publisher that is not ready never turns into a loop that burns the
//! message's delivery limit in milliseconds.

use std::time::Duration;

use fbsync_shared::config::RetrySettings;
use fbsync_shared::queue::{Outgoing, PublishError, Publisher};
use fbsync_shared::retry::{RetryError, retry};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;

/// Longest wait for one copy's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes copies of deliveries with confirms, under the retry policy.
#[derive(Clone)]
pub struct Forwarder {
    /// The confirming publisher (reconnects by itself).
    publisher: Publisher,
    /// How long to keep trying while the broker cannot confirm.
    retry: RetrySettings,
}

impl Forwarder {
    pub fn new(publisher: Publisher, retry: RetrySettings) -> Self {
        Self { publisher, retry }
    }

    /// Publishes `copy`, then acks `delivery`; returns the original to its queue instead when
    /// the copy cannot be confirmed. True when the delivery moved. `operation` names the move
    /// in metrics and logs.
    pub async fn forward(
        &self,
        delivery: &Delivery,
        copy: Outgoing,
        operation: &'static str,
        shutdown: &CancellationToken,
    ) -> bool {
        match self.publish(&[copy], operation, shutdown).await {
            Ok(()) => {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                true
            }
            Err(e) => {
                if let RetryError::Failed { error, attempts } = &e {
                    tracing::warn!(operation, %error, attempts, "copy not confirmed; returning the message to its queue");
                }
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                false
            }
        }
    }

    /// Publishes `copies` with confirms in one attempt (the caller keeps what they stand for
    /// and tries again later otherwise).
    pub async fn publish_once(&self, copies: &[Outgoing]) -> Result<(), PublishError> {
        self.publisher.publish_all(copies, CONFIRM_TIMEOUT).await
    }

    /// Publishes `copies`, waiting under the retry policy while the broker cannot confirm them.
    async fn publish(
        &self,
        copies: &[Outgoing],
        operation: &'static str,
        shutdown: &CancellationToken,
    ) -> Result<(), RetryError<PublishError>> {
        retry(&self.retry, operation, shutdown, || {
            self.publisher.publish_all(copies, CONFIRM_TIMEOUT)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use fbsync_shared::queue::Topology;
    use lapin::types::FieldTable;
    use secrecy::SecretString;

    #[tokio::test]
    async fn a_publisher_that_is_not_connected_is_waited_for_under_the_retry_policy() {
        let shutdown = CancellationToken::new();
        // Nothing listens on port 1: the publisher stays unconnected.
        let publisher = Publisher::start(
            SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f"),
            Topology::new("unused"),
            "test".into(),
            shutdown.clone(),
        );
        let retry = RetrySettings {
            max_attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(400),
            park_after: Duration::from_secs(60),
        };
        let forwarder = Forwarder::new(publisher, retry);
        let started = std::time::Instant::now();
        let copy = Outgoing {
            exchange: "unused.dead".into(),
            routing_key: "conversation".into(),
            body: b"{}".to_vec(),
            message_id: "m".into(),
            headers: FieldTable::default(),
            expiration: None,
        };
        let outcome = forwarder.publish(&[copy], "test", &shutdown).await;
        assert!(
            matches!(outcome, Err(RetryError::Failed { attempts: 4, .. })),
            "every attempt of the policy is made"
        );
        // Three waits of at least 100 ms each (jitter only lengthens them).
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "it waited for the publisher instead of giving up at once: {:?}",
            started.elapsed()
        );
        shutdown.cancel();
    }
}
