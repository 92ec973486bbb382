//! The ingest service: Facebook webhook intake, health checks and metrics, and (when
//! configured) the owners' connect flow in [`owner`].
//!
//! A delivery is answered 200 only once every event in it is on a durable queue (publisher
//! confirms); when the broker is away it is answered 503 within the publish timeout, so
//! Facebook retries it later. Nothing here touches storage: ingest stays fast and thin.
//!
//! Unauthenticated clients are bounded before the signature can be checked, on every route
//! of the public listener (the webhook and the owner routes; see `request_limits.rs`): at most
//! `INGEST_MAX_CONNECTIONS` connections (one beyond is closed at once) and
//! `INGEST_MAX_IN_FLIGHT` requests at once (503 beyond, at once), `INGEST_READ_TIMEOUT_MS` to
//! send the headers and then the body (408 or a closed connection beyond), a body of up to
//! `INGEST_BODY_LIMIT_BYTES` (413 beyond), and all bodies in flight together at most
//! `INGEST_BODY_BUDGET_BYTES` (503 beyond, at once; see `body_budget.rs`). `/metrics` is not
//! served here but on its own listener ([`serve_metrics`]).
//!
//! [`run`] takes its listener and its shutdown signal, so tests drive it on port 0.
//!
//! The rooms: `server.rs` serves the routes (HTTP/1.1 with the read timeout, graceful shutdown),
//! `webhook.rs` is the webhook's two handlers and the `SignedDelivery` extractor,
//! `request_limits.rs` the limits every request is read within, `body_budget.rs` the bytes
//! that bodies in flight may hold,
//! `delivery_metrics.rs` counts how each delivery was answered.

mod body_budget;
mod delivery_metrics;
pub mod owner;
pub mod refusal_window;
mod request_limits;
mod server;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::config::{Settings, WebhookSecrets};
use fbsync_shared::queue::{Publisher, Topology};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::SecretString;
use tokio::sync::Semaphore;

use body_budget::BodyBudget;
use delivery_metrics::DeliveryMetrics;
pub use server::{metrics_router, router, run, serve_metrics};
pub use webhook::to_outgoing;

/// What the handlers share.
pub struct IngestState {
    /// Verifies delivery signatures.
    pub app_secret: SecretString,
    /// Answers the subscription handshake.
    pub verify_token: SecretString,
    /// Where events are published: the events exchange's name, made once.
    pub events_exchange: String,
    /// The confirming publisher (reconnects by itself).
    pub publisher: Publisher,
    /// Longest wait for a delivery's confirms before answering 503.
    pub publish_timeout: Duration,
    /// Requests handled at once; a request beyond them is answered 503 at once.
    pub in_flight: Arc<Semaphore>,
    /// The body bytes requests in flight may hold; a body beyond it is answered 503 at once.
    body_budget: BodyBudget,
    /// Longest time a client may take to send its headers, and then its body.
    pub read_timeout: Duration,
    /// Largest body a request may have (413 beyond).
    pub body_limit_bytes: usize,
    /// Connections open at once on each listener; one beyond is closed at once.
    pub max_connections: usize,
    /// Renders /metrics.
    pub metrics: PrometheusHandle,
    /// The deliveries' counters and histogram, kept once registered.
    delivery_metrics: DeliveryMetrics,
    /// The open window of refused deliveries, reconciled when it closes (`refusal_window.rs`).
    pub refusals: refusal_window::RefusalWindow,
    /// The owner routes' state; `None` when the owner settings are not configured (the
    /// routes are then not served).
    pub owner: Option<Arc<owner::OwnerState>>,
}

impl IngestState {
    /// State from settings and the webhook secrets the caller checked at start.
    pub fn new(
        settings: &Settings,
        secrets: WebhookSecrets,
        publisher: Publisher,
        metrics: PrometheusHandle,
    ) -> Self {
        Self {
            app_secret: secrets.app_secret,
            verify_token: secrets.verify_token,
            events_exchange: Topology::new(&settings.broker.queue_prefix).events_exchange(),
            publisher,
            publish_timeout: settings.ingest.publish_timeout,
            in_flight: Arc::new(Semaphore::new(settings.ingest.max_in_flight.max(1))),
            body_budget: BodyBudget::new(
                settings.ingest.body_budget_bytes,
                settings.ingest.body_limit_bytes,
            ),
            read_timeout: settings.ingest.read_timeout,
            body_limit_bytes: settings.ingest.body_limit_bytes,
            max_connections: settings.ingest.max_connections,
            metrics,
            delivery_metrics: DeliveryMetrics::default(),
            refusals: refusal_window::RefusalWindow::new(settings.ingest.reconcile_after),
            owner: None,
        }
    }

    /// Serves the owner routes too, with `owner`.
    pub fn with_owner(mut self, owner: owner::OwnerState) -> Self {
        self.owner = Some(Arc::new(owner));
        self
    }
}
