//! Parking: a job that must wait longer than the retry policy's `park_after` (a Graph rate
//! limit measured in minutes, an object's PUT budget) is not held as an unacked message, which
//! RabbitMQ would take back at its consumer timeout (30 minutes by default). A copy goes to
//! `<prefix>.delay.<kind>` with the wait as its TTL, confirmed, and then the original is acked;
//! when the TTL ends the broker routes the copy back to the job's own queue.

use std::time::Duration;

use fbsync_shared::config::RetrySettings;
use fbsync_shared::facebook::event::JobKind;
use fbsync_shared::queue::{Outgoing, Publisher, Topology};
use fbsync_shared::retry::retry;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::message_id;

/// Longest wait for one parked copy's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Parks jobs in their delay queue.
#[derive(Clone)]
pub struct Parker {
    /// The confirming publisher (shared with the dead letters).
    publisher: Publisher,
    /// Where the delay queues are.
    topology: Topology,
    /// How long to keep trying while the broker cannot confirm.
    retry: RetrySettings,
}

impl Parker {
    pub fn new(publisher: Publisher, topology: Topology, retry: RetrySettings) -> Self {
        Self {
            publisher,
            topology,
            retry,
        }
    }

    /// Parks `delivery` (a job of `kind`) for `wait`, then acks it. If the copy cannot be
    /// confirmed, the original goes back to its queue instead.
    pub async fn park(
        &self,
        delivery: &Delivery,
        kind: JobKind,
        wait: Duration,
        shutdown: &CancellationToken,
    ) {
        let copy = [Outgoing {
            exchange: String::new(),
            routing_key: self.topology.delay_queue(kind),
            body: delivery.data.clone(),
            message_id: message_id(&delivery.properties),
            headers: delivery.properties.headers().clone().unwrap_or_default(),
            expiration: Some(wait),
        }];
        let parked = retry(&self.retry, "park", shutdown, || {
            self.publisher.publish_all(&copy, CONFIRM_TIMEOUT)
        })
        .await;
        match parked {
            Ok(()) => {
                tracing::info!(queue = %self.topology.delay_queue(kind), wait_secs = wait.as_secs(), "job parked until it may run again");
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            Err(e) => {
                tracing::warn!(error = ?e, "job could not be parked; returning it to its queue");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }
}
