//! Operator tools for the dead-letter queue: list, replay and purge, with filters.
//!
//! Each tool walks `<prefix>.dead` once, taking letters without acking them (so a crash returns
//! them all), acts on the ones that match, and hands the rest back at the end; it holds only
//! the letters it is acting on, so memory stays bounded whatever the queue's size. Replay
//! republishes a copy to the queue a letter came from and removes that letter only after its
//! own copy is confirmed: a letter that cannot be routed is skipped and reported, and one bad
//! confirm never leaves a republished letter in the DLQ as well. A crash between a confirm and
//! its ack can still leave both; the duplicate is harmless because every later stage is
//! idempotent.

use std::time::Duration;

use fbsync_shared::facebook::event::EventMessage;
use fbsync_shared::jobs::JobKind;
use fbsync_shared::now_ms;
use fbsync_shared::queue::{Outgoing, PublishError, Topology, connect, publish_each};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use secrecy::SecretString;

use fbsync_shared::ids::PageId;

use crate::dead_letter::{DeadLetterInfo, DeadReason, message_id};

/// The one field every job body has.
#[derive(serde::Deserialize)]
struct NamesPage {
    page_id: String,
}

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
    /// The Page the body names: an event's, or a job's (a poll job is not an event).
    page_id: Option<String>,
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
        self.page_id.as_deref()
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

/// A session on the dead-letter queue. It walks the queue once, taking letters one at a time
/// without acking them: a letter the tool does not act on is held (by its delivery tag only, so
/// memory stays bounded whatever the queue's size) and handed back, with every other letter
/// still held, when the session ends. A crash returns them all.
pub struct DlqSession {
    /// Kept open for the session; closing it returns unacked letters.
    connection: Connection,
    /// Confirm-mode channel used to get, republish and ack.
    channel: Channel,
    topology: Topology,
    /// Which letters the tool acts on.
    filter: DlqFilter,
    /// The session's "now", for the filter's `since` and letters' ages.
    now: i64,
    /// Letters in the queue when the session opened.
    total: u32,
    /// Letters taken so far.
    seen: usize,
    /// Letters taken that matched.
    matched: usize,
    /// Letters acked (deleted or replayed); the others are handed back when the session ends.
    acked: usize,
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Copies confirmed by their queue; their dead letters are gone.
    pub replayed: usize,
    /// Letters whose routing key names no queue (they stay in the DLQ), with their ids.
    pub unroutable: Vec<String>,
    /// Letters whose copy the broker refused (they stay in the DLQ).
    pub refused: usize,
}

/// Dead letters handled per round of publishes and confirms.
const REPLAY_CHUNK: usize = 100;

impl DlqSession {
    /// Opens a session on the DLQ for the letters `filter` selects.
    pub async fn open(
        amqp_url: &SecretString,
        topology: &Topology,
        filter: DlqFilter,
    ) -> anyhow::Result<Self> {
        let connection = connect(amqp_url, "fbsync-dlq").await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let total = dlq_depth(&channel, topology).await?;
        Ok(Self {
            connection,
            channel,
            topology: topology.clone(),
            filter,
            now: now_ms(),
            total,
            seen: 0,
            matched: 0,
            acked: 0,
        })
    }

    /// Letters in the DLQ when the session opened.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// The session's "now" (ms), for ages.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// The next letter that matches the filter, or `None` when the queue (or the filter's
    /// limit) is exhausted. Letters that do not match are held and handed back at the end.
    pub async fn next_match(&mut self) -> anyhow::Result<Option<DeadLetter>> {
        loop {
            if self.filter.limit.is_some_and(|limit| self.matched >= limit) {
                return Ok(None);
            }
            let Some(message) = self
                .channel
                .basic_get(
                    self.topology.dead().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await?
            else {
                return Ok(None);
            };
            let delivery = message.delivery;
            self.seen += 1;
            let headers = delivery.properties.headers().clone();
            let letter = DeadLetter {
                delivery_tag: delivery.delivery_tag,
                info: DeadLetterInfo::from_headers(headers.as_ref(), delivery.routing_key.as_str()),
                event: serde_json::from_slice(&delivery.data).ok(),
                page_id: serde_json::from_slice::<NamesPage>(&delivery.data)
                    .ok()
                    .map(|body| body.page_id),
                message_id: message_id(&delivery.properties),
                body: delivery.data,
                headers,
            };
            if self.filter.matches(&letter, self.now) {
                self.matched += 1;
                return Ok(Some(letter));
            }
        }
    }

    /// Calls `each` with every matching letter, then hands them all back (list, dry runs).
    /// Returns how many matched.
    pub async fn walk(mut self, mut each: impl FnMut(&DeadLetter)) -> anyhow::Result<usize> {
        while let Some(letter) = self.next_match().await? {
            each(&letter);
        }
        let matched = self.matched;
        self.finish().await?;
        Ok(matched)
    }

    /// Deletes the matching letters; hands the others back. Returns how many were deleted.
    pub async fn purge(mut self) -> anyhow::Result<usize> {
        while let Some(letter) = self.next_match().await? {
            self.ack(&letter).await?;
        }
        let purged = self.matched;
        self.finish().await?;
        Ok(purged)
    }

    /// Republishes the matching letters to the queues they came from, a chunk at a time, all of
    /// a chunk in flight at once. Each dead letter is removed only when its own copy is
    /// confirmed; a letter whose copy cannot be routed or is refused stays in the DLQ and is
    /// reported, and never stops the others. `progress` is called with (done, matched so far)
    /// after each chunk.
    pub async fn replay(
        mut self,
        mut progress: impl FnMut(usize, usize),
    ) -> anyhow::Result<ReplayReport> {
        let mut report = ReplayReport::default();
        let mut done = 0;
        loop {
            let mut chunk = Vec::with_capacity(REPLAY_CHUNK);
            while chunk.len() < REPLAY_CHUNK {
                match self.next_match().await? {
                    Some(letter) => chunk.push(letter),
                    None => break,
                }
            }
            if chunk.is_empty() {
                break;
            }
            let copies: Vec<Outgoing> = chunk
                .iter()
                .map(|letter| replay_copy(&self.topology, letter))
                .collect();
            let outcomes = publish_each(&self.channel, &copies).await?;
            for (letter, outcome) in chunk.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => {
                        self.ack(letter).await?;
                        report.replayed += 1;
                    }
                    Err(PublishError::Unroutable) => {
                        report.unroutable.push(letter.message_id.clone())
                    }
                    Err(_) => report.refused += 1,
                }
            }
            done += chunk.len();
            progress(done, self.matched);
        }
        self.finish().await?;
        Ok(report)
    }

    /// Removes a letter from the queue for good.
    async fn ack(&mut self, letter: &DeadLetter) -> anyhow::Result<()> {
        self.channel
            .basic_ack(letter.delivery_tag, BasicAckOptions::default())
            .await?;
        self.acked += 1;
        Ok(())
    }

    /// Hands back every letter still held and closes the session.
    async fn finish(self) -> anyhow::Result<()> {
        if self.seen > self.acked {
            // One nack for every letter still unacked on the channel (held and failed ones):
            // delivery tag 0 with `multiple` means all outstanding ones. (A nack up to the
            // newest tag taken, when that letter was acked already, is an unknown delivery tag
            // to the broker, which then closes the channel with an error.)
            self.channel
                .basic_nack(
                    0,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
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
        expiration: None,
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
