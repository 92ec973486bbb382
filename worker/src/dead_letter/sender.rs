//! Sends dead letters: from the consumers, a delivery moves to `<prefix>.dead` with its reason
//! (see [`crate::runtime::forward`] for how a move waits for the broker); from the flusher, the staged
//! events of a removed Page are published as letters.

use fbsync_shared::queue::{Outgoing, PublishError, Topology};
use fbsync_shared::telemetry::DEAD_LETTERED;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

use super::{DeadLetterInfo, message_id};
use crate::runtime::forward::Forwarder;

/// Publishes dead letters with confirms for one worker.
pub struct DeadLetterSender {
    /// Moves deliveries with confirms, under the retry policy.
    forwarder: Forwarder,
    /// Where `<prefix>.dead` is.
    topology: Topology,
}

impl DeadLetterSender {
    pub fn new(forwarder: Forwarder, topology: Topology) -> Self {
        Self {
            forwarder,
            topology,
        }
    }

    /// Moves `delivery` to the DLQ with `info`; it goes back to its queue instead if the
    /// letter cannot be confirmed.
    pub async fn send(
        &self,
        delivery: &Delivery,
        info: DeadLetterInfo,
        shutdown: &CancellationToken,
    ) {
        let letter = info.to_outgoing(
            &self.topology,
            &delivery.data,
            &message_id(&delivery.properties),
            delivery.properties.headers().as_ref(),
        );
        if self
            .forwarder
            .forward(delivery, letter, "dead_letter", shutdown)
            .await
        {
            metrics::counter!(DEAD_LETTERED, "reason" => info.reason.as_str()).increment(1);
        }
    }

    /// Publishes letters that are not deliveries (staged events of a removed Page), all with
    /// confirms, in one attempt: the caller keeps the events and tries again later otherwise.
    pub async fn publish_letters(&self, letters: &[Outgoing]) -> Result<(), PublishError> {
        self.forwarder.publish_once(letters).await
    }

    /// Where dead letters go.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }
}
