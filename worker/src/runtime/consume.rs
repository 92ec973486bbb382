//! The AMQP side of the worker: consume a queue, decode each message with the one job codec
//! ([`Job::decode`]), stage conversation events in batches and run every other job through its
//! handler ([`crate::jobs::run`]), then settle the message ([`Settler`]): ack only when the work
//! is durable.
//!
//! A consumer session ends when the broker goes away; the loop reconnects with backoff, and
//! whatever was unacked is redelivered (harmless: staging is idempotent). On shutdown it cancels
//! the consumer, finishes what it holds and closes the channel, which returns the rest.

use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::config::RetrySettings;
use fbsync_shared::jobs::{Job, JobKind};
use fbsync_shared::queue::{Topology, connect};
use fbsync_shared::retry::{RetryError, endless_backoff, retry_while_transient};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use secrecy::SecretString;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::jobs::{self, Env};
use crate::runtime::health::Health;
use crate::runtime::settle::{JobError, Settler, give_back};
use crate::stage::{Decision, Stager};

/// Most conversation messages staged in one transaction.
const STAGE_BATCH: usize = 200;

/// What the consumers share.
pub struct ConsumerContext {
    /// Broker URL (a secret: it holds the password).
    pub amqp_url: SecretString,
    /// Queue names.
    pub topology: Topology,
    /// Unacked messages per consumer.
    pub prefetch: u16,
    /// Poll jobs one worker runs at once (each holds a Graph walk and a database lease).
    pub poll_concurrency: u16,
    /// Backoff for staging when the database fails.
    pub retry: RetrySettings,
    /// Whether the database and the store are up; consumers wait while they are not.
    pub health: Arc<Health>,
    /// Acks, dead-letters, parks or gives back each message once its work is done.
    pub settler: Settler,
    /// Conversation staging.
    pub stager: Stager,
    /// What the job handlers share.
    pub env: Env,
}

/// Consumes `kind` until shutdown, reconnecting whenever the broker goes away.
pub async fn consume_forever(
    context: Arc<ConsumerContext>,
    kind: JobKind,
    shutdown: CancellationToken,
) {
    let mut delays = reconnect_delays();
    // One warning per outage, not one per attempt: an operator reads what is wrong and what to
    // do once, and the later attempts at debug level.
    let mut outage_logged = false;
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        let outcome = consume_session(&context, kind, &shutdown).await;
        if started.elapsed() > Duration::from_secs(10) {
            // A session that ran for a while was healthy: the next outage starts afresh.
            delays = reconnect_delays();
            outage_logged = false;
        }
        match outcome {
            Ok(()) => return,
            Err(e) => {
                if outage_logged {
                    tracing::debug!(queue = kind.as_str(), error = %e, "consumer still stopped; reconnecting");
                } else {
                    tracing::warn!(
                        queue = kind.as_str(),
                        error = %e,
                        hint = %fbsync_shared::queue::unreachable_hint(&context.amqp_url),
                        "consumer stopped; reconnecting"
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

/// Reconnection delays after a consumer session ends: from 100 ms up to 5 s.
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    endless_backoff(Duration::from_millis(100), RECONNECT_MAX_DELAY)
}

/// The longest wait between two reconnection attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);

async fn consume_session(
    context: &Arc<ConsumerContext>,
    kind: JobKind,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let connection = connect(
        &context.amqp_url,
        &format!("fbsync-worker-{}", kind.as_str()),
    )
    .await?;
    let channel = connection.create_channel().await?;
    context.topology.declare(&channel).await?;
    let prefetch = match kind {
        // Both call the Graph API: bounded like polls.
        JobKind::Poll | JobKind::Onboard => context.poll_concurrency,
        JobKind::Conversation | JobKind::PageChange => context.prefetch,
    };
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("fbsync-{}-{}", kind.as_str(), uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            context.topology.queue(kind).into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %context.topology.queue(kind), "consuming");
    let mut jobs = JoinSet::new();
    let result = loop {
        // While the database or the store is down, take nothing new: what is prefetched stays
        // unacked with the broker (not redelivered, so not counted against its limit).
        if !context.health.wait_until_ready(shutdown).await {
            break Ok(());
        }
        let first = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => next,
        };
        let delivery = match first {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => break Err(e.into()),
            None => break Err(anyhow::anyhow!("the broker cancelled the consumer")),
        };
        match kind {
            JobKind::Conversation => {
                let mut batch = vec![delivery];
                // Take whatever else is already here, without waiting for more.
                while batch.len() < STAGE_BATCH {
                    // A short wait gathers a useful batch under load and costs little when idle.
                    match tokio::time::timeout(Duration::from_millis(10), consumer.next()).await {
                        Ok(Some(Ok(delivery))) => batch.push(delivery),
                        _ => break,
                    }
                }
                handle_conversation_batch(context, batch, shutdown).await;
            }
            JobKind::PageChange | JobKind::Poll | JobKind::Onboard => {
                let context = context.clone();
                let shutdown = shutdown.clone();
                jobs.spawn(async move { handle_job(&context, kind, delivery, &shutdown).await });
                while jobs.try_join_next().is_some() {}
            }
        }
    };
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    // Finish what we hold: each job acks or dead-letters its own message.
    while jobs.join_next().await.is_some() {}
    let _ = connection.close(200, "worker stopping".into()).await;
    result
}

/// Stages a batch, dead-letters its poison, then acks. While the database is unavailable the
/// batch is held and staging retried for as long as the outage lasts (the consumers take
/// nothing new meanwhile); only shutdown or a permanent failure hands it back to the broker.
async fn handle_conversation_batch(
    context: &ConsumerContext,
    batch: Vec<Delivery>,
    shutdown: &CancellationToken,
) {
    let messages: Vec<_> = batch
        .iter()
        .map(|delivery| Job::decode_event(&delivery.data))
        .collect();
    let staged = retry_while_transient(&context.retry, "stage", shutdown, || async {
        let staged = context.stager.stage_batch(&messages).await;
        context.health.set_database_up(staged.is_ok());
        staged
    })
    .await;
    let decisions = match staged {
        Ok(decisions) => decisions,
        Err(failure) => {
            match failure {
                RetryError::Failed { error, attempts } => {
                    tracing::error!(%error, attempts, "staging failed; returning the batch to the queue");
                }
                RetryError::Cancelled => {
                    tracing::info!("shutting down; returning the unstaged batch to the queue");
                }
                RetryError::Park { wait } => {
                    // Only when WORKER_RETRY_MAX_MS exceeds WORKER_PARK_AFTER_MS.
                    tracing::warn!(
                        wait_ms = wait.as_millis() as u64,
                        "staging must wait longer than WORKER_PARK_AFTER_MS; returning the batch to the queue"
                    );
                }
            }
            for delivery in &batch {
                give_back(delivery).await;
            }
            return;
        }
    };
    let mut last_staged = None;
    for (delivery, decision) in batch.iter().zip(decisions) {
        match decision {
            Decision::Staged => last_staged = Some(delivery),
            Decision::DeadLetter(error) => {
                let kind = JobKind::Conversation;
                context
                    .settler
                    .dead_letter(delivery, kind, &error, shutdown)
                    .await
            }
        }
    }
    // One ack for every staged message of the batch: the deliveries of a channel are acked
    // in order, and the dead-lettered ones were acked (or returned) above.
    if let Some(delivery) = last_staged {
        let _ = delivery.ack(BasicAckOptions { multiple: true }).await;
    }
}

/// Decodes one job, runs it through its handler and settles its message.
async fn handle_job(
    context: &ConsumerContext,
    kind: JobKind,
    delivery: Delivery,
    shutdown: &CancellationToken,
) {
    let outcome = match Job::decode(kind, &delivery.data) {
        Ok(job) => {
            let span = tracing::info_span!(
                "job",
                job = job.name(),
                page_id = job.page_id().unwrap_or_default(),
                message_id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str())
                    .unwrap_or_default(),
            );
            tracing::Instrument::instrument(jobs::run(job, &context.env, shutdown), span).await
        }
        Err(malformed) => Err(JobError::malformed(malformed.to_string())),
    };
    context
        .settler
        .settle(&delivery, kind, outcome, shutdown)
        .await
}
