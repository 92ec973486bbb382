//! The AMQP side of the worker: consume a queue, hand messages to staging, page-change, poll or
//! owner jobs (onboarding, data deletion), dead-letter poison with its reason, ack only when
//! the work is durable.
//!
//! A consumer session ends when the broker goes away; the loop reconnects with backoff, and
//! whatever was unacked is redelivered (harmless: staging is idempotent). On shutdown it cancels
//! the consumer, finishes what it holds and closes the channel, which returns the rest.

use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::config::RetrySettings;
use fbsync_shared::facebook::event::{EventMessage, JobKind, PollRequest};
use fbsync_shared::ids::PageId;
use fbsync_shared::queue::owner_jobs::OwnerJob;
use fbsync_shared::queue::{Topology, connect};
use fbsync_shared::retry::{RetryError, endless_backoff, retry_while_transient};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use secrecy::SecretString;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::sender::DeadLetterSender;
use crate::dead_letter::{DeadLetterInfo, DeadReason};
use crate::health::Health;
use crate::job::JobFailure;
use crate::onboard::OnboardJob;
use crate::page_data::PageDataJob;
use crate::park::Parker;
use crate::poll::PollJob;
use crate::stage::{Decision, QueuedMessage, Stager};

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
    /// Parks jobs that must wait long.
    pub parker: Parker,
    /// Publishes dead letters with confirms.
    pub dead_letters: Arc<DeadLetterSender>,
    /// Conversation staging.
    pub stager: Stager,
    /// Page-change jobs.
    pub page_data: Arc<PageDataJob>,
    /// Poll jobs.
    pub poller: PollJob,
    /// The owners' jobs: onboarding, data deletion.
    pub onboard: OnboardJob,
}

/// Consumes `kind` until shutdown, reconnecting whenever the broker goes away.
pub async fn consume_forever(
    context: Arc<ConsumerContext>,
    kind: JobKind,
    shutdown: CancellationToken,
) {
    let mut delays = reconnect_delays();
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        let outcome = consume_session(&context, kind, &shutdown).await;
        if started.elapsed() > Duration::from_secs(10) {
            // A session that ran for a while was healthy: the next outage starts afresh.
            delays = reconnect_delays();
        }
        match outcome {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(queue = kind.as_str(), error = %e, "consumer stopped; reconnecting");
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
    let messages: Vec<QueuedMessage> = batch
        .iter()
        .map(|delivery| QueuedMessage {
            body: delivery.data.clone(),
        })
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
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
            return;
        }
    };
    let mut last_staged = None;
    for (delivery, decision) in batch.iter().zip(decisions) {
        match decision {
            Decision::Staged => last_staged = Some(delivery),
            Decision::DeadLetter(info) => context.dead_letters.send(delivery, info, shutdown).await,
        }
    }
    // One ack for every staged message of the batch: the deliveries of a channel are acked
    // in order, and the dead-lettered ones were acked (or returned) above.
    if let Some(delivery) = last_staged {
        let _ = delivery.ack(BasicAckOptions { multiple: true }).await;
    }
}

/// Runs one page-change or poll job and settles its message: ack, dead letter, park or give
/// back.
async fn handle_job(
    context: &ConsumerContext,
    kind: JobKind,
    delivery: Delivery,
    shutdown: &CancellationToken,
) {
    let outcome = match kind {
        JobKind::PageChange => run_page_change(context, &delivery.data, shutdown).await,
        JobKind::Poll => run_poll(context, &delivery.data, shutdown).await,
        JobKind::Onboard => run_owner_job(context, &delivery.data, shutdown).await,
        // Never sent here: conversation messages are staged in batches.
        JobKind::Conversation => Err(malformed(kind, "not a job message".into())),
    };
    match outcome {
        Ok(()) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(JobFailure::DeadLetter(info)) => {
            context.dead_letters.send(&delivery, info, shutdown).await
        }
        Err(JobFailure::Park(wait)) => context.parker.park(&delivery, kind, wait, shutdown).await,
        Err(JobFailure::GiveBack) => {
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    }
}

/// A page-change event: refresh the Page's `page_data.json`.
async fn run_page_change(
    context: &ConsumerContext,
    body: &[u8],
    shutdown: &CancellationToken,
) -> Result<(), JobFailure> {
    let page_id = match serde_json::from_slice::<EventMessage>(body) {
        Ok(event) => PageId::parse(&event.page_id).map_err(|e| e.to_string()),
        Err(e) => Err(format!("not an event message: {e}")),
    };
    let page_id = page_id.map_err(|error| malformed(JobKind::PageChange, error))?;
    let outcome = context
        .page_data
        .refresh(&page_id, JobKind::PageChange, shutdown)
        .await?;
    tracing::debug!(%page_id, ?outcome, "page metadata refreshed");
    Ok(())
}

/// A poll job: the Page's metadata and conversations from the Graph API.
async fn run_poll(
    context: &ConsumerContext,
    body: &[u8],
    shutdown: &CancellationToken,
) -> Result<(), JobFailure> {
    let request = serde_json::from_slice::<PollRequest>(body)
        .map_err(|e| malformed(JobKind::Poll, format!("not a poll job: {e}")))?;
    context.poller.run(&request, shutdown).await.map(|_| ())
}

/// An owner job: onboard a Page, or delete a user's data.
async fn run_owner_job(
    context: &ConsumerContext,
    body: &[u8],
    shutdown: &CancellationToken,
) -> Result<(), JobFailure> {
    let job = serde_json::from_slice::<OwnerJob>(body)
        .map_err(|e| malformed(JobKind::Onboard, format!("not an owner job: {e}")))?;
    match job {
        OwnerJob::OnboardPage { page_id } => {
            let page_id =
                PageId::parse(&page_id).map_err(|e| malformed(JobKind::Onboard, e.to_string()))?;
            context
                .onboard
                .onboard_page(&page_id, &context.page_data, shutdown)
                .await
        }
        OwnerJob::DeleteUserData { confirmation_code } => {
            context
                .onboard
                .delete_user_data(&confirmation_code, shutdown)
                .await
        }
    }
}

fn malformed(kind: JobKind, error: String) -> JobFailure {
    let now = fbsync_shared::now_ms();
    JobFailure::DeadLetter(DeadLetterInfo::new(
        DeadReason::Malformed,
        error,
        1,
        kind.as_str(),
        now,
        now,
    ))
}
