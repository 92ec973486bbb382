//! A confirming publisher that survives broker outages: every message persistent, every
//! publish waits for the broker's confirm, and the connection is kept alive in the background.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use secrecy::SecretString;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Topology, connect};
use crate::jobs::Envelope;
use crate::retry::{RetryClass, endless_backoff};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Exchange to publish to.
    pub exchange: String,
    /// Routing key (the job kind for events).
    pub routing_key: String,
    /// JSON body.
    pub body: Vec<u8>,
    /// AMQP message id (the event id), for tracing duplicates across stages.
    pub message_id: String,
    /// Extra headers (dead-letter reasons, page id).
    pub headers: FieldTable,
    /// How long the message may wait in its queue (a parked job's delay); `None`: for ever.
    pub expiration: Option<Duration>,
}

impl Outgoing {
    /// The message of a job's envelope, for the events exchange named `events_exchange`
    /// (ingest names it once; everyone else goes through [`Topology::job`]).
    pub fn envelope(events_exchange: String, envelope: Envelope) -> Self {
        let Envelope {
            kind,
            message_id,
            headers,
            body,
        } = envelope;
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert(name.into(), AMQPValue::LongString(value.into()));
        }
        Outgoing {
            exchange: events_exchange,
            routing_key: kind.as_str().to_string(),
            body,
            message_id,
            headers: table,
            expiration: None,
        }
    }
}

/// Why a publish did not get its confirms.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker is not connected")]
    Unavailable,
    #[error("the broker did not confirm in time")]
    Timeout,
    #[error("the broker refused the message")]
    Nacked,
    #[error("the message could not be routed to a queue")]
    Unroutable,
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

impl RetryClass for PublishError {
    /// A broker that is away or slow comes back; a refusal or an unroutable message does not.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            PublishError::Unavailable | PublishError::Timeout | PublishError::Broker(_)
        )
    }
}

/// Publishes with confirms over a connection it keeps alive: when the broker goes away it
/// reconnects in the background, and publishes fail fast with [`PublishError::Unavailable`]
/// until it is back.
#[derive(Clone)]
pub struct Publisher {
    /// The live confirm-mode channel, when there is one.
    channel: Arc<Mutex<Option<Channel>>>,
    /// Wakes the connection keeper when a publish found the channel broken.
    broken: Arc<Notify>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Publisher {
    /// Starts the connection keeper; returns at once, connected or not.
    pub fn start(
        amqp_url: SecretString,
        topology: Topology,
        name: String,
        shutdown: CancellationToken,
    ) -> Self {
        let publisher = Self {
            channel: Arc::new(Mutex::new(None)),
            broken: Arc::new(Notify::new()),
        };
        let keeper = publisher.clone();
        tokio::spawn(async move {
            keeper
                .keep_connected(amqp_url, topology, name, shutdown)
                .await
        });
        publisher
    }

    /// Waits until the publisher is connected, up to `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.is_ready() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.is_ready()
    }

    /// True when a confirm channel is open.
    pub fn is_ready(&self) -> bool {
        self.current().is_some_and(|c| c.status().connected())
    }

    fn current(&self) -> Option<Channel> {
        self.channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn mark_broken(&self) {
        self.channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.broken.notify_one();
    }

    /// Publishes every message persistent and waits for all their confirms (all in flight at
    /// once) within `timeout`. Ok means the broker has every one of them on disk.
    pub async fn publish_all(
        &self,
        messages: &[Outgoing],
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let channel = self
            .current()
            .filter(|c| c.status().connected())
            .ok_or(PublishError::Unavailable)?;
        let outcome = tokio::time::timeout(timeout, publish_confirmed(&channel, messages)).await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(PublishError::Nacked)) => Err(PublishError::Nacked),
            Ok(Err(PublishError::Unroutable)) => Err(PublishError::Unroutable),
            Ok(Err(e)) => {
                self.mark_broken();
                Err(e)
            }
            Err(_) => {
                // A broker that cannot confirm within seconds is as good as gone; reconnecting
                // is cheap and gets a healthy channel if it is merely a stuck connection.
                self.mark_broken();
                Err(PublishError::Timeout)
            }
        }
    }

    async fn keep_connected(
        self,
        amqp_url: SecretString,
        topology: Topology,
        name: String,
        shutdown: CancellationToken,
    ) {
        let mut delays = reconnect_delays();
        let mut outage_logged = false;
        while !shutdown.is_cancelled() {
            match open_confirm_channel(&amqp_url, &topology, &name).await {
                Ok((connection, channel)) => {
                    if outage_logged {
                        tracing::info!("broker connection restored");
                    }
                    delays = reconnect_delays();
                    *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel.clone());
                    // Watch until a publish reports the channel broken, the connection drops,
                    // or we are asked to stop.
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = self.broken.notified() => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                                if !connection.status().connected() || !channel.status().connected() {
                                    break;
                                }
                            }
                        }
                    }
                    self.channel
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    if shutdown.is_cancelled() {
                        let _ = connection.close(200, "shutdown".into()).await;
                        return;
                    }
                    tracing::warn!("broker connection lost; reconnecting");
                    outage_logged = true;
                    // Close in the background: a dead peer may take a while to answer.
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            connection.close(320, "reconnecting".into()),
                        )
                        .await;
                    });
                }
                Err(e) => {
                    if !outage_logged {
                        tracing::warn!(
                            error = %e,
                            hint = %super::unreachable_hint(&amqp_url),
                            "broker unreachable; retrying"
                        );
                        outage_logged = true;
                    }
                    let delay = delays.next().unwrap_or(RECONNECT_MAX_DELAY);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// The longest wait between two attempts to reach the broker: short, because ingest answers
/// 503 until it is back.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Reconnection delays: from 50 ms up to [`RECONNECT_MAX_DELAY`].
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    endless_backoff(Duration::from_millis(50), RECONNECT_MAX_DELAY)
}

/// Connects, declares the topology and opens a channel in confirm mode.
pub async fn open_confirm_channel(
    amqp_url: &SecretString,
    topology: &Topology,
    name: &str,
) -> lapin::Result<(Connection, Channel)> {
    let connection = tokio::time::timeout(Duration::from_secs(3), connect(amqp_url, name))
        .await
        .map_err(|_| {
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })??;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Publishes all messages on `channel` (in confirm mode) and waits for every confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    messages: &[Outgoing],
) -> Result<(), PublishError> {
    publish_each(channel, messages).await?.into_iter().collect()
}

/// Publishes all messages on `channel` (in confirm mode, all in flight at once) and waits for
/// every confirm; the outcome of each message, in order. An `Err` of the whole call means the
/// channel failed and nothing can be said of the messages whose confirms were not read.
pub async fn publish_each(
    channel: &Channel,
    messages: &[Outgoing],
) -> Result<Vec<Result<(), PublishError>>, PublishError> {
    let mut confirms = Vec::with_capacity(messages.len());
    for message in messages {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(truncate(&message.message_id, 255)))
            .with_headers(message.headers.clone());
        let properties = match message.expiration {
            Some(wait) => properties.with_expiration(wait.as_millis().to_string().into()),
            None => properties,
        };
        let confirm = channel
            .basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &message.body,
                properties,
            )
            .await?;
        confirms.push(confirm);
    }
    let mut confirmed = Vec::with_capacity(confirms.len());
    for confirmation in join_all(confirms).await {
        confirmed.push(Confirmed::from(confirmation?));
    }
    Ok(outcomes(messages, confirmed))
}

/// A publish's confirm as [`outcomes`] reads it.
#[derive(Debug)]
struct Confirmed {
    /// The broker acked the message (a nack, or confirms not requested, is a refusal).
    acked: bool,
    /// The message the broker returned as unroutable, when lapin handed one over with this
    /// confirm: its identity (see [`outcomes`]).
    returned: Option<Identity>,
}

impl From<lapin::Confirmation> for Confirmed {
    fn from(confirmation: lapin::Confirmation) -> Self {
        let acked = confirmation.is_ack();
        let returned = confirmation.take_message().map(|message| {
            let delivery = message.delivery;
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default();
            (
                delivery.exchange.to_string(),
                delivery.routing_key.to_string(),
                id,
            )
        });
        Self { acked, returned }
    }
}

/// A message as a return names it: exchange, routing key and message id.
type Identity = (String, String, String);

/// Each message's outcome from the confirms, in order. A returned (unroutable) message is
/// matched to the message it is by exchange, routing key and message id, never by the confirm it came
/// with: lapin hands a return to whichever confirm it resolves next, and one multiple-ack
/// resolves several confirms in no set order, so the return of one message can come with
/// another's confirm. (Trusting that once marked a routable letter unroutable and removed
/// the unroutable one from the dead-letter queue.) Messages sharing that identity with
/// a returned one are all reported unroutable: kept, never lost.
fn outcomes(messages: &[Outgoing], confirmed: Vec<Confirmed>) -> Vec<Result<(), PublishError>> {
    if confirmed.iter().all(|confirm| confirm.returned.is_none()) {
        // The usual case, on every delivery ingest accepts: nothing came back, so there is
        // nothing to match (and no identities to build).
        return confirmed
            .into_iter()
            .map(|confirm| {
                if confirm.acked {
                    Ok(())
                } else {
                    Err(PublishError::Nacked)
                }
            })
            .collect();
    }
    let mut returned: HashSet<Identity> = HashSet::new();
    let mut acked = Vec::with_capacity(confirmed.len());
    for confirm in confirmed {
        returned.extend(confirm.returned);
        acked.push(confirm.acked);
    }
    let identity = |message: &Outgoing| {
        (
            message.exchange.clone(),
            message.routing_key.clone(),
            truncate(&message.message_id, 255).to_string(),
        )
    };
    let ours: HashSet<Identity> = messages.iter().map(identity).collect();
    for (exchange, routing_key, message_id) in returned.difference(&ours) {
        // Another publish on the same channel sent it; its confirm came with one of ours.
        tracing::error!(%exchange, %routing_key, %message_id, "a message of another publish on this channel was returned unroutable; that publish is not told");
    }
    messages
        .iter()
        .zip(acked)
        .map(|(message, acked)| {
            if !acked {
                Err(PublishError::Nacked)
            } else if returned.contains(&identity(message)) {
                Err(PublishError::Unroutable)
            } else {
                Ok(())
            }
        })
        .collect()
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
#[path = "publisher_tests.rs"]
mod tests;
