//! Serving ingest's routes: the public router (the webhook, health checks, the owner routes
//! when configured) and the operators' `/metrics` router, each over HTTP/1.1 with a read
//! timeout on a request's headers, until the shutdown signal; then the requests in flight
//! finish.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::webhook::{receive_delivery, verify_subscription};
use crate::{IngestState, owner};

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
