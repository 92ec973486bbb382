//! Serving ingest's routes: the public router (the webhook, health checks, the owner routes
//! when configured) and the operators' `/metrics` router, each over HTTP/1.1 with a read
//! timeout on a request's headers and a cap on open connections, until the shutdown signal;
//! then the requests in flight finish.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Router, middleware};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::webhook::{receive_delivery, verify_subscription};
use crate::{IngestState, owner, request_limits};

/// The public HTTP routes of ingest: the webhook and the owner routes when configured, each
/// request within `request_limits.rs`, and the health checks load balancers call, outside them.
pub fn router(state: Arc<IngestState>) -> Router {
    let limited = Router::new()
        .route(
            request_limits::WEBHOOK_PATH,
            get(verify_subscription).post(receive_delivery),
        )
        .with_state(state.clone());
    let limited = match state.owner.clone() {
        Some(owner_state) => limited.merge(owner::router(owner_state)),
        None => limited,
    };
    let limited = limited.route_layer(middleware::from_fn_with_state(
        state.clone(),
        request_limits::bounded,
    ));
    let body_limit = state.body_limit_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
        .merge(limited)
        .layer(DefaultBodyLimit::max(body_limit))
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
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = ConnectionLimits::of(&state);
    serve(listener, router(state), limits, shutdown).await
}

/// Serves [`metrics_router`] until `shutdown`, with the same read timeout and connection cap.
pub async fn serve_metrics(
    listener: TcpListener,
    state: Arc<IngestState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = ConnectionLimits::of(&state);
    serve(listener, metrics_router(state), limits, shutdown).await
}

/// What bounds a listener's connections.
#[derive(Clone, Copy)]
struct ConnectionLimits {
    /// A connection that does not send a request's headers within it is closed.
    header_timeout: Duration,
    /// Connections open at once; one beyond is closed as soon as it is accepted.
    max_connections: usize,
}

impl ConnectionLimits {
    fn of(state: &IngestState) -> Self {
        Self {
            header_timeout: state.read_timeout,
            max_connections: state.max_connections.max(1),
        }
    }
}

/// Serves `app` over HTTP/1.1 until `shutdown` within `limits`; on shutdown no new connection
/// is accepted and the requests in flight are finished.
async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
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
        // Beyond the cap the connection is closed at once (dropped): it holds nothing.
        let Ok(slot) = open.clone().try_acquire_owned() else {
            tracing::debug!("connection refused: INGEST_MAX_CONNECTIONS are open");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
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
