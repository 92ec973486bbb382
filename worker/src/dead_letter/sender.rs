//! Sends dead letters from the consumers: a confirmed copy in `<prefix>.dead`, then the
//! original is acked. If the copy cannot be confirmed the original goes back to its queue:
//! nothing is lost either way.

use std::time::Duration;

use fbsync_shared::queue::{Publisher, Topology};
use fbsync_shared::telemetry::DEAD_LETTERED;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::{DeadLetterInfo, message_id};

/// Publishes the dead-letter copy with a confirm, then acks the original. If the copy cannot be
/// confirmed, the original is returned to its queue instead: nothing is lost either way.
pub async fn send(
    dead_letters: &Publisher,
    topology: &Topology,
    delivery: &Delivery,
    info: DeadLetterInfo,
) {
    let message_id = message_id(&delivery.properties);
    let outgoing = info.to_outgoing(
        topology,
        &delivery.data,
        &message_id,
        delivery.properties.headers().as_ref(),
    );
    match dead_letters
        .publish_all(&[outgoing], Duration::from_secs(5))
        .await
    {
        Ok(()) => {
            metrics::counter!(DEAD_LETTERED, "reason" => info.reason.as_str()).increment(1);
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "dead letter not confirmed; returning the message to its queue");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    }
}
