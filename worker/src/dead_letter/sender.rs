//! Sends dead letters from the consumers: a confirmed copy in `<prefix>.dead`, then the
//! original is acked. While the broker cannot confirm the copy (the publisher still connecting,
//! an outage), sending waits under the retry policy; only when the policy gives up does the
//! original go back to its queue. Nothing is lost either way, and a publisher that is not ready
//! never turns into a loop that burns the message's delivery limit in milliseconds.

use std::time::Duration;

use fbsync_shared::config::RetrySettings;
use fbsync_shared::queue::{Outgoing, PublishError, Publisher, Topology};
use fbsync_shared::retry::{RetryError, retry};
use fbsync_shared::telemetry::DEAD_LETTERED;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;

use super::{DeadLetterInfo, message_id};

/// Longest wait for one dead letter's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes dead letters with confirms for the consumers of one worker.
pub struct DeadLetterSender {
    /// The confirming publisher (reconnects by itself).
    publisher: Publisher,
    /// Where `<prefix>.dead` is.
    topology: Topology,
    /// How long to keep trying while the broker cannot confirm.
    retry: RetrySettings,
}

impl DeadLetterSender {
    pub fn new(publisher: Publisher, topology: Topology, retry: RetrySettings) -> Self {
        Self {
            publisher,
            topology,
            retry,
        }
    }

    /// Publishes the dead-letter copy of `delivery` with a confirm, then acks the original. If
    /// the copy cannot be confirmed within the retry policy (or shutdown begins), the original
    /// is returned to its queue instead.
    pub async fn send(
        &self,
        delivery: &Delivery,
        info: DeadLetterInfo,
        shutdown: &CancellationToken,
    ) {
        let outgoing = info.to_outgoing(
            &self.topology,
            &delivery.data,
            &message_id(&delivery.properties),
            delivery.properties.headers().as_ref(),
        );
        match self.publish(outgoing, shutdown).await {
            Ok(()) => {
                metrics::counter!(DEAD_LETTERED, "reason" => info.reason.as_str()).increment(1);
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            Err(e) => {
                if let RetryError::Failed { error, attempts } = &e {
                    tracing::warn!(%error, attempts, "dead letter not confirmed; returning the message to its queue");
                }
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }

    /// Publishes letters that are not deliveries (staged events of a removed Page), all with
    /// confirms, in one attempt: the caller keeps the events and tries again later otherwise.
    pub async fn publish_letters(&self, letters: &[Outgoing]) -> Result<(), PublishError> {
        self.publisher.publish_all(letters, CONFIRM_TIMEOUT).await
    }

    /// Where dead letters go.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes one dead letter, waiting under the retry policy while the broker cannot
    /// confirm it.
    async fn publish(
        &self,
        outgoing: Outgoing,
        shutdown: &CancellationToken,
    ) -> Result<(), RetryError<PublishError>> {
        let outgoing = [outgoing];
        retry(&self.retry, "dead_letter", shutdown, || {
            self.publisher.publish_all(&outgoing, CONFIRM_TIMEOUT)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let sender = DeadLetterSender::new(publisher, Topology::new("unused"), retry);
        let started = std::time::Instant::now();
        let outgoing = Outgoing {
            exchange: "unused.dead".into(),
            routing_key: "conversation".into(),
            body: b"{}".to_vec(),
            message_id: "m".into(),
            headers: FieldTable::default(),
            expiration: None,
        };
        let outcome = sender.publish(outgoing, &shutdown).await;
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
