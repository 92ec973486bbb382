//! The worker role: consume events, stage them durably, flush conversations into the object
//! store within its budgets, refresh Page metadata, poll the Graph API, onboard Pages that
//! owners connect (and delete a user's data when Meta asks), relay the outbox's jobs, and
//! dead-letter poison.
//!
//! Operators scale by running more `fbsync worker` processes: consumers share queues, and the
//! flushers coordinate through lease rows in the database.

pub mod dead_letter;
pub mod flush;
pub mod folder_listing;
pub mod jobs;
pub mod last_written;
pub mod merge;
pub mod outbox_relay;
pub mod runtime;
pub mod stage;

use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::config::ConditionalWrites;
use fbsync_shared::config::{Settings, StoreLocation};
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::facebook::graph::GraphClient;
use fbsync_shared::jobs::JobKind;
use fbsync_shared::now_ms;
use fbsync_shared::queue::{Publisher, Topology};
use fbsync_shared::retry::{RetryError, retry};
use fbsync_shared::storage::budget::StoreBudgets;
use fbsync_shared::storage::budgeted_store::BudgetedStore;
use fbsync_shared::storage::db::Database;
use fbsync_shared::storage::object_store::open_store;
use fbsync_shared::storage::write_conditions::{self, Verdict};
use fbsync_shared::telemetry::{
    CONDITIONAL_WRITES_HONOURED, CONVERSATIONS_SET_ASIDE, DLQ_DEPTH, PAGES_MESSAGING_BLOCKED,
    POLL_AGE_SECONDS, STAGED_BACKLOG, STAGED_OLDEST_SECONDS,
};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::sender::DeadLetterSender;
use crate::flush::Flusher;
use crate::jobs::Env;
use crate::jobs::delete_user_data::UserDataEraser;
use crate::jobs::onboard_page::PageOnboarder;
use crate::jobs::page_change::PageDataRefresher;
use crate::jobs::poll::Poller;
use crate::jobs::reconcile::Reconciler;
use crate::outbox_relay::OutboxRelay;
use crate::runtime::consume::{ConsumerContext, consume_forever};
use crate::runtime::forward::Forwarder;
use crate::runtime::health::Health;
use crate::runtime::park::Parker;
use crate::runtime::settle::Settler;
use crate::stage::Stager;

/// The parts of a worker, opened from settings.
pub struct Worker {
    /// Consumers' shared state.
    pub consumers: Arc<ConsumerContext>,
    /// The conversation flusher.
    pub flusher: Arc<Flusher>,
    /// For backlog gauges.
    pub db: Database,
    /// How long the flusher rests when nothing is due.
    pub flush_interval: Duration,
    /// Publishes the jobs the outbox holds while the broker was away.
    pub relay: OutboxRelay,
    /// Whether the database and the store are up (`/readyz`).
    pub health: Arc<Health>,
}

impl Worker {
    /// Opens the database (running migrations), the store (probing its conditional writes) and
    /// the dead-letter publisher. `cipher` and `store` are what the caller checked at start
    /// ([`Settings::token_cipher`], [`Settings::store_location`]). Fails when the store ignores
    /// conditional writes, or cannot be probed, under SPACES_CONDITIONAL_WRITES=required.
    pub async fn open(
        settings: &Settings,
        cipher: TokenCipher,
        store: &StoreLocation,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let db = Database::connect(&settings.database_url).await?;
        let limits = StoreBudgets::for_store(store, &settings.storage);
        let store = BudgetedStore::new(open_store(store), db.budgets(), limits);
        tracing::info!(store = %store.describe(), budgets = %limits.describe(), "object store");
        let conditions_honoured = verify_conditional_writes(
            &store,
            settings.storage.conditional_writes,
            &settings.retry,
            shutdown,
        )
        .await?;
        let topology = Topology::new(&settings.broker.queue_prefix);
        // One confirming publisher for everything a worker moves or queues: dead letters, parked
        // jobs, an onboarding's backfill poll.
        let publisher = Publisher::start(
            settings.broker.amqp_url.clone(),
            topology.clone(),
            "fbsync-worker-dead-letters".into(),
            shutdown.clone(),
        );
        let graph = GraphClient::new(&settings.facebook.graph_url);
        let forwarder = Forwarder::new(publisher, settings.retry.clone());
        let relay = OutboxRelay {
            outbox: db.outbox(),
            forwarder: forwarder.clone(),
            topology: topology.clone(),
            retry: settings.retry.clone(),
        };
        let eraser = UserDataEraser {
            owners: db.owners(),
            store: store.clone(),
            retry: settings.retry.clone(),
        };
        let onboarder = PageOnboarder {
            registry: db.registry(),
            polls: db.polls(),
            cipher: cipher.clone(),
            graph: graph.clone(),
            app_id: settings.facebook.app_id.clone(),
            webhook_fields: settings.facebook.webhook_fields.clone(),
            retry: settings.retry.clone(),
            forwarder: forwarder.clone(),
            topology: topology.clone(),
        };
        let page_data = Arc::new(PageDataRefresher {
            registry: db.registry(),
            budgets: db.budgets(),
            store: store.clone(),
            cipher: cipher.clone(),
            graph: graph.clone(),
            retry: settings.retry.clone(),
            put_budget: limits.object,
        });
        let poller = Poller {
            registry: db.registry(),
            polls: db.polls(),
            staging: db.staging(),
            conversations: db.conversations(),
            graph,
            cipher,
            retry: settings.retry.clone(),
            lease: settings.worker.lease,
            page_data: page_data.clone(),
            store: store.clone(),
            list_before_backfill: conditions_honoured,
        };
        let reconciler = Reconciler {
            polls: db.polls(),
            forwarder: forwarder.clone(),
            topology: topology.clone(),
            retry: settings.retry.clone(),
        };
        let parker = Parker::new(forwarder.clone(), topology.clone());
        let dead_letters = Arc::new(DeadLetterSender::new(forwarder, topology.clone()));
        let health = Arc::new(Health::default());
        let consumers = Arc::new(ConsumerContext {
            amqp_url: settings.broker.amqp_url.clone(),
            topology,
            prefetch: settings.worker.prefetch,
            poll_concurrency: settings.worker.poll_concurrency,
            retry: settings.retry.clone(),
            health: health.clone(),
            settler: Settler {
                dead_letters: dead_letters.clone(),
                parker,
            },
            stager: Stager::new(db.registry(), db.staging()),
            env: Env {
                page_data,
                poller,
                onboarder,
                eraser,
                reconciler,
            },
        });
        let flusher = Arc::new(Flusher::new(
            settings,
            db.conversations(),
            db.staging(),
            store,
            conditions_honoured,
            dead_letters,
            health.clone(),
        ));
        Ok(Self {
            consumers,
            flusher,
            db,
            flush_interval: settings.worker.flush_interval,
            relay,
            health,
        })
    }

    /// Runs consumers, the flusher and the gauges until `shutdown`; then stops consuming,
    /// finishes what it holds, and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for &kind in JobKind::ALL {
            tasks.spawn(consume_forever(
                self.consumers.clone(),
                kind,
                shutdown.clone(),
            ));
        }
        let flusher = self.flusher.clone();
        let (interval, stop) = (self.flush_interval, shutdown.clone());
        tasks.spawn(async move { flusher.run(interval, stop).await });
        tasks.spawn(self.relay.run(shutdown.clone()));
        tasks.spawn(report_backlog(
            self.db.clone(),
            self.consumers.clone(),
            shutdown.clone(),
        ));
        while tasks.join_next().await.is_some() {}
        self.db.close().await;
    }
}

/// Probes whether the store honours conditional writes (retrying a store that does not answer
/// under the retry policy): true when a write's condition can be relied on. A store that
/// ignores them is logged and exported; with `required` (or no answer under `required`) the
/// worker does not start.
async fn verify_conditional_writes(
    store: &BudgetedStore,
    mode: ConditionalWrites,
    retry_settings: &fbsync_shared::config::RetrySettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    metrics::gauge!(CONDITIONAL_WRITES_HONOURED).set(-1.0);
    let probed = retry(retry_settings, "probe conditional writes", shutdown, || {
        write_conditions::probe(store, mode)
    })
    .await;
    let failure = match probed {
        Ok(verdict) => return act_on_verdict(verdict, mode),
        Err(RetryError::Cancelled) => anyhow::bail!("shutdown began while probing the store"),
        Err(RetryError::Failed { error, attempts }) => format!("{error} ({attempts} attempts)"),
        Err(RetryError::Park { wait }) => format!("the next attempt is {wait:?} away"),
    };
    if mode == ConditionalWrites::Required {
        anyhow::bail!(
            "SPACES_CONDITIONAL_WRITES=required, and the store's conditional writes could not be probed: {failure}"
        );
    }
    tracing::warn!(
        error = failure,
        "the store's conditional writes could not be probed; running on the claims alone, every flush reads before it writes"
    );
    Ok(false)
}

/// Logs and exports what the probe found; an error when `required` meets a store that ignores
/// conditional writes.
fn act_on_verdict(verdict: Verdict, mode: ConditionalWrites) -> anyhow::Result<bool> {
    metrics::gauge!(CONDITIONAL_WRITES_HONOURED).set(write_conditions::gauge_value(&verdict));
    match verdict {
        Verdict::Honoured | Verdict::NotSent => tracing::info!("{}", verdict.describe()),
        Verdict::Ignored(_) if mode == ConditionalWrites::Required => {
            anyhow::bail!("{}", verdict.describe())
        }
        Verdict::Ignored(_) => tracing::warn!("{}", verdict.describe()),
    }
    Ok(verdict.is_honoured())
}

/// Publishes the staged backlog, DLQ depth and poll age gauges every few seconds.
async fn report_backlog(
    db: Database,
    consumers: Arc<ConsumerContext>,
    shutdown: CancellationToken,
) {
    // One connection for the gauge, reopened after a broker outage.
    let mut broker: Option<(lapin::Connection, lapin::Channel)> = None;
    loop {
        if let Ok(backlog) = db.staging().backlog().await {
            metrics::gauge!(STAGED_BACKLOG).set(backlog.events as f64);
            let oldest = backlog
                .oldest_received_ms
                .map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
            metrics::gauge!(STAGED_OLDEST_SECONDS).set(oldest);
            metrics::gauge!(CONVERSATIONS_SET_ASIDE).set(backlog.set_aside as f64);
        }
        if let Ok(blocked) = db.registry().messaging_blocked_pages().await {
            metrics::gauge!(PAGES_MESSAGING_BLOCKED).set(blocked as f64);
        }
        if let Ok(states) = db.polls().poll_states().await {
            let now = now_ms();
            for state in states {
                let since = state.last_complete_end_ms.unwrap_or(state.created_at_ms);
                metrics::gauge!(POLL_AGE_SECONDS, "page_id" => state.page_id)
                    .set((now - since).max(0) as f64 / 1000.0);
            }
        }
        if broker.is_none()
            && let Ok(connection) =
                fbsync_shared::queue::connect(&consumers.amqp_url, "fbsync-worker-gauges").await
            && let Ok(channel) = connection.create_channel().await
            && consumers.topology.declare(&channel).await.is_ok()
        {
            broker = Some((connection, channel));
        }
        if let Some((_, channel)) = &broker {
            match dead_letter::operator_session::dlq_depth(channel, &consumers.topology).await {
                Ok(depth) => metrics::gauge!(DLQ_DEPTH).set(f64::from(depth)),
                Err(_) => broker = None,
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    if let Some((connection, _)) = broker {
        let _ = connection.close(200, "worker stopping".into()).await;
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (503 while the database or the store is down)
/// for a worker process until `shutdown`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = health.is_ready();
                std::future::ready(if ready {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "database or object store unavailable",
                    )
                })
            }),
        )
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
