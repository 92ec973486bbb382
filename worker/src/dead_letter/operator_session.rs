//! Operator tools for the dead-letter queue: list, replay and purge, with filters.
//!
//! Each tool takes every dead letter off `<prefix>.dead` without acking it (so a crash returns
//! them all), acts on the ones that match, and hands the rest back. Replay republishes a copy
//! to the queue it came from with a publisher confirm and removes the dead letter only after the
//! copy is confirmed: a crash in between leaves both, and the duplicate is harmless because
//! every later stage is idempotent.

use std::time::Duration;

use fbsync_shared::facebook::event::{EventMessage, JobKind};
use fbsync_shared::now_ms;
use fbsync_shared::queue::{Outgoing, Topology, connect, publish_confirmed};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use secrecy::SecretString;

use fbsync_shared::ids::PageId;

use crate::dead_letter::{DeadLetterInfo, DeadReason, message_id};

/// Which dead letters a tool acts on. Every filter that is set must match.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    /// The job kind (the queue the message came from).
    pub kind: Option<JobKind>,
    pub page_id: Option<PageId>,
    pub reason: Option<DeadReason>,
    /// Only letters whose last failure is at most this old.
    pub since: Option<Duration>,
    /// At most this many letters.
    pub limit: Option<usize>,
}

/// One dead letter, as the tools see it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Held unacked until the tool decides.
    delivery_tag: u64,
    /// Why and when it failed.
    pub info: DeadLetterInfo,
    /// The event, when the body is one.
    pub event: Option<EventMessage>,
    /// The original body.
    pub body: Vec<u8>,
    /// The original headers (ours and the broker's included).
    headers: Option<FieldTable>,
    pub message_id: String,
}

impl DeadLetter {
    pub fn kind(&self) -> &str {
        &self.info.routing_key
    }

    pub fn page_id(&self) -> Option<&str> {
        self.event.as_ref().map(|e| e.page_id.as_str())
    }

    /// Seconds since the last failure.
    pub fn age_secs(&self, now: i64) -> i64 {
        ((now - self.info.last_failure_ms) / 1000).max(0)
    }

    /// The JSON line of `dlq list --json`.
    pub fn to_json(&self, now: i64) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind(),
            "page_id": self.page_id(),
            "reason": self.info.reason.as_str(),
            "error": self.info.error,
            "attempts": self.info.attempts,
            "age_secs": self.age_secs(now),
            "first_failure_ms": self.info.first_failure_ms,
            "last_failure_ms": self.info.last_failure_ms,
            "routing_key": self.info.routing_key,
            "event_id": self.event.as_ref().map(|e| e.event_id.as_str()).unwrap_or(self.message_id.as_str()),
        })
    }
}

impl DlqFilter {
    fn matches(&self, letter: &DeadLetter, now: i64) -> bool {
        let kind_ok = self.kind.is_none_or(|kind| letter.kind() == kind.as_str());
        let page_ok = self
            .page_id
            .as_ref()
            .is_none_or(|page| letter.page_id() == Some(page.as_str()));
        let reason_ok = self
            .reason
            .is_none_or(|reason| letter.info.reason == reason);
        let since_ok = self.since.is_none_or(|since| {
            now - letter.info.last_failure_ms
                <= i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        });
        kind_ok && page_ok && reason_ok && since_ok
    }
}

/// A session on the dead-letter queue: every letter taken, unacked.
pub struct DlqSession {
    /// Kept open for the session; closing it returns unacked letters.
    connection: Connection,
    /// Confirm-mode channel used to get, republish and ack.
    channel: Channel,
    topology: Topology,
    /// Letters that match the filter (at most its limit), in queue order.
    pub matched: Vec<DeadLetter>,
    /// Letters that do not match; handed back untouched.
    others: Vec<DeadLetter>,
}

impl DlqSession {
    /// Takes every letter off the DLQ (unacked) and sorts them into matched and others.
    pub async fn open(
        amqp_url: &SecretString,
        topology: &Topology,
        filter: &DlqFilter,
    ) -> anyhow::Result<Self> {
        let connection = connect(amqp_url, "fbsync-dlq").await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let now = now_ms();
        let (mut matched, mut others) = (Vec::new(), Vec::new());
        while let Some(message) = channel
            .basic_get(topology.dead().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            let delivery = message.delivery;
            let headers = delivery.properties.headers().clone();
            let letter = DeadLetter {
                delivery_tag: delivery.delivery_tag,
                info: DeadLetterInfo::from_headers(headers.as_ref(), delivery.routing_key.as_str()),
                event: serde_json::from_slice(&delivery.data).ok(),
                message_id: message_id(&delivery.properties),
                body: delivery.data,
                headers,
            };
            let room = filter.limit.is_none_or(|limit| matched.len() < limit);
            if room && filter.matches(&letter, now) {
                matched.push(letter);
            } else {
                others.push(letter);
            }
        }
        Ok(Self {
            connection,
            channel,
            topology: topology.clone(),
            matched,
            others,
        })
    }

    /// Letters in the DLQ when the session opened.
    pub fn total(&self) -> usize {
        self.matched.len() + self.others.len()
    }

    /// Hands every letter back untouched (list, dry runs).
    pub async fn release(mut self) -> anyhow::Result<()> {
        let matched = std::mem::take(&mut self.matched);
        self.others.extend(matched);
        self.release_others().await
    }

    /// Deletes the matched letters; hands the others back. Returns how many were deleted.
    pub async fn purge(self) -> anyhow::Result<usize> {
        for letter in &self.matched {
            self.channel
                .basic_ack(letter.delivery_tag, BasicAckOptions::default())
                .await?;
        }
        let purged = self.matched.len();
        self.release_others().await?;
        Ok(purged)
    }

    /// Republishes the matched letters to the queues they came from, in chunks; each chunk's
    /// dead letters are removed only after all its copies are confirmed. `progress` is called
    /// with (done, total) after each chunk.
    pub async fn replay(self, mut progress: impl FnMut(usize, usize)) -> anyhow::Result<usize> {
        let total = self.matched.len();
        let mut done = 0;
        for chunk in self.matched.chunks(100) {
            let copies: Vec<Outgoing> = chunk
                .iter()
                .map(|letter| replay_copy(&self.topology, letter))
                .collect();
            publish_confirmed(&self.channel, &copies).await?;
            for letter in chunk {
                self.channel
                    .basic_ack(letter.delivery_tag, BasicAckOptions::default())
                    .await?;
            }
            done += chunk.len();
            progress(done, total);
        }
        self.release_others().await?;
        Ok(done)
    }

    async fn release_others(self) -> anyhow::Result<()> {
        for letter in &self.others {
            self.channel
                .basic_nack(
                    letter.delivery_tag,
                    BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    },
                )
                .await?;
        }
        self.connection.close(200, "done".into()).await?;
        Ok(())
    }
}

/// The copy that goes back to the events exchange: the original body and headers, without the
/// failure headers (a fresh start).
fn replay_copy(topology: &Topology, letter: &DeadLetter) -> Outgoing {
    let mut headers = FieldTable::default();
    if let Some(original) = &letter.headers {
        for (key, value) in original.inner() {
            let name = key.as_str();
            if !name.starts_with("x-fbsync-")
                && !name.starts_with("x-death")
                && !name.starts_with("x-first-death")
                && !name.starts_with("x-last-death")
            {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers.insert("x-fbsync-replayed".into(), AMQPValue::Boolean(true));
    Outgoing {
        exchange: topology.events_exchange(),
        routing_key: letter.info.routing_key.clone(),
        body: letter.body.clone(),
        message_id: letter.message_id.clone(),
        headers,
    }
}

/// Messages waiting in the DLQ (a passive declare: nothing is created or taken).
pub async fn dlq_depth(channel: &Channel, topology: &Topology) -> lapin::Result<u32> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(topology.dead().into(), options, FieldTable::default())
        .await?;
    Ok(queue.message_count())
}

/// Parses `30s`, `10m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 10m, 2h or 1d"))?;
    let seconds = match unit {
        "" | "s" => value,
        "m" => value * 60,
        "h" => value * 3600,
        "d" => value * 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration like 30s, 10m, 2h or 1d"
            ));
        }
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse() {
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_age("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_age("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_age("soon").is_err());
        assert!(parse_age("5w").is_err());
    }
}
