//! The queue topology every role declares, idempotently, at start.
//!
//! For prefix `P`:
//! - `P.events`: direct exchange; routing key = [`crate::jobs::JobKind`].
//! - `P.conversation`, `P.page_change`: durable quorum queues bound to it by their kind.
//! - `P.delay.<kind>`: durable queues where parked jobs wait out a long delay (a per-message
//!   TTL), then go back to `P.events` with their kind as routing key.
//! - `P.dead`: fanout exchange and durable queue that hold dead letters, whether the worker
//!   dead-lettered them on purpose (with its reason in headers) or the broker did after the
//!   delivery limit (with `x-death`).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::Outgoing;
use crate::jobs::{Job, JobKind};

/// Deliveries of one message before the broker gives up and dead-letters it. Workers
/// dead-letter poison on purpose long before this; the limit is for crash loops (a message that
/// kills the worker that holds it).
pub const DELIVERY_LIMIT: i64 = 20;

/// Names of one deployment's exchanges and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Prefix of every name, so deployments and tests share one broker.
    pub prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// The message that carries `job` to its queue, through the events exchange.
    pub fn job(&self, job: &Job) -> Outgoing {
        Outgoing::envelope(self.events_exchange(), job.envelope())
    }

    pub fn queue(&self, kind: JobKind) -> String {
        format!("{}.{}", self.prefix, kind.as_str())
    }

    /// The queue where parked jobs of `kind` wait out their delay (a per-message TTL), to go
    /// back to their own queue when it ends.
    pub fn delay_queue(&self, kind: JobKind) -> String {
        format!("{}.delay.{}", self.prefix, kind.as_str())
    }

    /// The dead-letter exchange and queue share this name.
    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Declares everything; safe to run any number of times, from any role.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        // The dead queue is a classic queue: operators list it by getting and requeueing
        // messages, which a quorum queue would count against a delivery limit.
        channel
            .queue_declare(
                self.dead().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.dead().into(),
                self.dead().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for &kind in JobKind::ALL {
            let mut args = FieldTable::default();
            // Quorum queues replicate and fsync: a confirm means the message is on disk.
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            // Crash loops end in the DLQ instead of spinning forever.
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DELIVERY_LIMIT),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.dead().into()),
            );
            // The broker keeps a dead letter until the DLQ has confirmed it (no loss in between);
            // this strategy requires reject-publish overflow.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            channel
                .queue_declare(
                    self.queue(kind).into(),
                    QueueDeclareOptions::durable(),
                    args,
                )
                .await?;
            channel
                .queue_bind(
                    self.queue(kind).into(),
                    self.events_exchange().into(),
                    kind.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut delay_args = FieldTable::default();
            // Expired messages go back through the events exchange to their own queue. A
            // classic queue: a parked job is a message that waits, not work to replicate.
            delay_args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.events_exchange().into()),
            );
            delay_args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(kind.as_str().into()),
            );
            channel
                .queue_declare(
                    self.delay_queue(kind).into(),
                    QueueDeclareOptions::durable(),
                    delay_args,
                )
                .await?;
        }
        Ok(())
    }
}
