//! The ingest service: Facebook webhook intake, health checks and metrics, and (when
//! configured) the owners' connect flow in [`owner`].
//!
//! A delivery is answered 200 only once every event in it is on a durable queue (publisher
//! confirms); when the broker is away it is answered 503 within the publish timeout, so
//! Facebook retries it later. Nothing here touches storage: ingest stays fast and thin.
//!
//! Unauthenticated clients are bounded before the signature can be checked: at most
//! `INGEST_MAX_IN_FLIGHT` requests are handled at once (503 beyond, at once), a client has
//! `INGEST_READ_TIMEOUT_MS` to send its headers and then its body (408 or a closed connection
//! beyond), and a body is read up to `INGEST_BODY_LIMIT_BYTES` (413 beyond). `/metrics` is not
//! served here but on its own listener ([`serve_metrics`]).
//!
//! [`run`] takes its listener and its shutdown signal, so tests drive it on port 0.

pub mod owner;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fbsync_shared::config::{Settings, WebhookSecrets};
use fbsync_shared::facebook::event::{EventKind, EventMessage, split_delivery};
use fbsync_shared::facebook::signature::{SHA1_HEADER, SHA256_HEADER, verify_signature};
use fbsync_shared::jobs::Envelope;
use fbsync_shared::now_ms;
use fbsync_shared::queue::{Outgoing, PublishError, Publisher, Topology};
use fbsync_shared::telemetry::{DELIVERIES, EVENTS_PUBLISHED, PUBLISH_CONFIRM_SECONDS};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

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
    /// Longest time a client may take to send its headers, and then its body.
    pub read_timeout: Duration,
    /// Renders /metrics.
    pub metrics: PrometheusHandle,
    /// The deliveries' counters and histogram, kept once registered.
    delivery_metrics: DeliveryMetrics,
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
            read_timeout: settings.ingest.read_timeout,
            metrics,
            delivery_metrics: DeliveryMetrics::default(),
            owner: None,
        }
    }

    /// Serves the owner routes too, with `owner`.
    pub fn with_owner(mut self, owner: owner::OwnerState) -> Self {
        self.owner = Some(Arc::new(owner));
        self
    }
}

/// The public HTTP routes of ingest: the webhook, the health checks load balancers call, and
/// the owner routes when configured.
pub fn router(state: Arc<IngestState>, body_limit_bytes: usize) -> Router {
    let owner = state.owner.clone();
    let router = Router::new()
        .route(
            "/facebook/webhook",
            get(verify_subscription).post(receive_delivery),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state);
    let router = match owner {
        Some(owner_state) => router.merge(owner::router(owner_state)),
        None => router,
    };
    router.layer(DefaultBodyLimit::max(body_limit_bytes))
}

/// The operators' routes: `/metrics`, with `/healthz` and `/readyz` beside it.
pub fn metrics_router(state: Arc<IngestState>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// Serves the public routes until `shutdown` fires, then finishes the requests in flight and
/// returns. Each connection has the read timeout to send a request's headers.
pub async fn run(
    listener: TcpListener,
    state: Arc<IngestState>,
    body_limit_bytes: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let header_timeout = state.read_timeout;
    serve(
        listener,
        router(state, body_limit_bytes),
        header_timeout,
        shutdown,
    )
    .await
}

/// Serves [`metrics_router`] until `shutdown`, with the same read timeout.
pub async fn serve_metrics(
    listener: TcpListener,
    state: Arc<IngestState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let header_timeout = state.read_timeout;
    serve(listener, metrics_router(state), header_timeout, shutdown).await
}

/// Serves `app` over HTTP/1.1 until `shutdown`: a connection that does not send a request's
/// headers within `header_timeout` is closed; on shutdown no new connection is accepted and
/// the requests in flight are finished.
async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// GET /facebook/webhook: the subscription handshake.
async fn verify_subscription(
    State(state): State<Arc<IngestState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let mode_ok = params.get("hub.mode").map(String::as_str) == Some("subscribe");
    let token_ok = params.get("hub.verify_token").is_some_and(|token| {
        token
            .as_bytes()
            .ct_eq(state.verify_token.expose_secret().as_bytes())
            .into()
    });
    match (mode_ok && token_ok, params.get("hub.challenge")) {
        (true, Some(challenge)) => (StatusCode::OK, challenge.clone()).into_response(),
        _ => (StatusCode::FORBIDDEN, "verification failed").into_response(),
    }
}

/// POST /facebook/webhook: verify, split, publish with confirms, answer.
async fn receive_delivery(State(state): State<Arc<IngestState>>, request: Request) -> Response {
    let answer = |outcome, status, text| state.delivery_metrics.answer(outcome, status, text);
    // A slot first: beyond the limit nothing is read at all.
    let Ok(_slot) = state.in_flight.clone().try_acquire_owned() else {
        return answer(
            Outcome::Overloaded,
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight; try again later".into(),
        );
    };
    // Only the signature headers are read after the body: cheap clones of their bytes, not of
    // the whole header map.
    let [sha256, sha1] =
        [SHA256_HEADER, SHA1_HEADER].map(|name| request.headers().get(name).cloned());
    let read = tokio::time::timeout(state.read_timeout, Bytes::from_request(request, &())).await;
    let body = match read {
        Ok(Ok(body)) => body,
        Ok(Err(rejection)) => {
            let status = rejection.status();
            let outcome = if status == StatusCode::PAYLOAD_TOO_LARGE {
                Outcome::TooLarge
            } else {
                Outcome::BadRequest
            };
            return answer(outcome, status, "body could not be read".into());
        }
        Err(_) => {
            return answer(
                Outcome::TooSlow,
                StatusCode::REQUEST_TIMEOUT,
                "the body was not sent in time".into(),
            );
        }
    };
    if let Err(e) = verify_signature(
        &state.app_secret,
        header_str(sha256.as_ref()),
        header_str(sha1.as_ref()),
        &body,
    ) {
        tracing::warn!(reason = %e, "webhook delivery refused");
        return answer(
            Outcome::BadSignature,
            StatusCode::UNAUTHORIZED,
            "invalid signature".into(),
        );
    }
    let events = match split_delivery(&body, now_ms()) {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(reason = %e, "webhook delivery is not a page delivery");
            return answer(
                Outcome::BadRequest,
                StatusCode::BAD_REQUEST,
                e.to_string().into(),
            );
        }
    };
    let outgoing: Vec<Outgoing> = events
        .iter()
        .map(|event| Outgoing::envelope(state.events_exchange.clone(), Envelope::of_event(event)))
        .collect();
    let started = Instant::now();
    match state
        .publisher
        .publish_all(&outgoing, state.publish_timeout)
        .await
    {
        Ok(()) => {
            let metrics = &state.delivery_metrics;
            metrics.confirmed(started.elapsed());
            for event in &events {
                metrics.published(event.kind);
            }
            answer(Outcome::Accepted, StatusCode::OK, "EVENT_RECEIVED".into())
        }
        Err(e) => {
            if !matches!(e, PublishError::Unavailable) {
                tracing::warn!(error = %e, events = events.len(), "delivery not confirmed; answering 503");
            }
            answer(
                Outcome::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "try again later".into(),
            )
        }
    }
}

/// The queue message of one event, for the events exchange of `topology`.
pub fn to_outgoing(topology: &Topology, event: &EventMessage) -> Outgoing {
    Outgoing::envelope(topology.events_exchange(), Envelope::of_event(event))
}

/// A header's value as text, when it is visible ASCII.
fn header_str(value: Option<&HeaderValue>) -> Option<&str> {
    value.and_then(|v| v.to_str().ok())
}

/// How a delivery was answered: the `outcome` label of `fbsync_webhook_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    BadSignature,
    BadRequest,
    TooLarge,
    TooSlow,
    Overloaded,
    Unavailable,
}

impl Outcome {
    /// Every outcome, in declaration order (`outcome as usize` indexes this).
    const ALL: [Outcome; 7] = [
        Outcome::Accepted,
        Outcome::BadSignature,
        Outcome::BadRequest,
        Outcome::TooLarge,
        Outcome::TooSlow,
        Outcome::Overloaded,
        Outcome::Unavailable,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::BadSignature => "bad_signature",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::TooSlow => "too_slow",
            Outcome::Overloaded => "overloaded",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// The deliveries' metrics, each registered with the recorder on its first use and kept: a
/// labelled metric looked up by name and labels on every delivery cost ingest more than the
/// count itself. (Registered on first use, not at start, so a series appears once it counts
/// something, as it did when looked up each time.)
#[derive(Default)]
struct DeliveryMetrics {
    /// `fbsync_webhook_deliveries_total`, indexed by [`Outcome`].
    deliveries: [OnceLock<Counter>; Outcome::ALL.len()],
    /// `fbsync_events_published_total`, indexed by [`EventKind`].
    events_published: [OnceLock<Counter>; EventKind::ALL.len()],
    /// `fbsync_publish_confirm_seconds`.
    confirm_seconds: OnceLock<Histogram>,
}

impl DeliveryMetrics {
    /// Counts the delivery's outcome and answers it with `text` (plain text; a `&'static str`
    /// is sent without a copy).
    fn answer(&self, outcome: Outcome, status: StatusCode, text: Cow<'static, str>) -> Response {
        count(
            &self.deliveries,
            outcome as usize,
            || metrics::counter!(DELIVERIES, "outcome" => outcome.as_str()),
        );
        (status, text).into_response()
    }

    /// An event of `kind` was confirmed by the broker.
    fn published(&self, kind: EventKind) {
        count(
            &self.events_published,
            kind as usize,
            || metrics::counter!(EVENTS_PUBLISHED, "kind" => kind.as_str()),
        );
    }

    /// A delivery's confirms all came, `elapsed` after its first publish.
    fn confirmed(&self, elapsed: Duration) {
        self.confirm_seconds
            .get_or_init(|| metrics::histogram!(PUBLISH_CONFIRM_SECONDS))
            .record(elapsed.as_secs_f64());
    }
}

/// Adds one to the counter kept in `cells[index]`, registering it with `register` on first use.
/// An index beyond the cells (a kind added to its enum but not to its `ALL`) is registered
/// each time instead: still counted, never a panic.
fn count(cells: &[OnceLock<Counter>], index: usize, register: impl FnOnce() -> Counter) {
    match cells.get(index) {
        Some(cell) => cell.get_or_init(register).increment(1),
        None => register().increment(1),
    }
}

/// GET /readyz: 200 while the broker connection is up.
async fn ready(State(state): State<Arc<IngestState>>) -> Response {
    if state.publisher.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable").into_response()
    }
}

/// GET /metrics: Prometheus text format.
async fn render_metrics(State(state): State<Arc<IngestState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_as_a_number_is_its_place_in_the_list_of_all_outcomes() {
        for (place, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, place, "{outcome:?}");
        }
    }
}
