//! Parking: a job that must wait longer than the retry policy's `park_after` (a Graph rate
//! limit measured in minutes, an object's PUT budget) is not held as an unacked message, which
//! RabbitMQ would take back at its consumer timeout (30 minutes by default). A copy goes to
//! `<prefix>.delay.<kind>` with the wait as its TTL, confirmed, and then the original is acked;
//! when the TTL ends the broker routes the copy back to the job's own queue.

use std::time::Duration;

use fbsync_shared::jobs::JobKind;
use fbsync_shared::queue::{Outgoing, Topology};
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::message_id;
use crate::runtime::forward::Forwarder;

/// Parks jobs in their delay queue.
#[derive(Clone)]
pub struct Parker {
    /// Moves deliveries with confirms, under the retry policy.
    forwarder: Forwarder,
    /// Where the delay queues are.
    topology: Topology,
}

impl Parker {
    pub fn new(forwarder: Forwarder, topology: Topology) -> Self {
        Self {
            forwarder,
            topology,
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
        let copy = Outgoing {
            exchange: String::new(),
            routing_key: self.topology.delay_queue(kind),
            body: delivery.data.clone(),
            message_id: message_id(&delivery.properties),
            headers: delivery.properties.headers().clone().unwrap_or_default(),
            expiration: Some(wait),
        };
        if self
            .forwarder
            .forward(delivery, copy, "park", shutdown)
            .await
        {
            tracing::info!(queue = %self.topology.delay_queue(kind), wait_secs = wait.as_secs(), "job parked until it may run again");
        }
    }
}
