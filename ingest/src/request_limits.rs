//! The limits every request on the public listener is held to before its handler runs (the
//! webhook and the owner routes alike; only `/healthz` and `/readyz`, which read no body, are
//! left out so load balancers can still tell a busy ingest from a dead one):
//!
//! - one of `INGEST_MAX_IN_FLIGHT` slots, or 503 at once;
//! - its body's bytes of `INGEST_BODY_BUDGET_BYTES` ([`crate::body_budget`]), or 503 at once;
//! - its body read whole within `INGEST_READ_TIMEOUT_MS` (408 beyond) and up to
//!   `INGEST_BODY_LIMIT_BYTES` (413 beyond).
//!
//! Invariant: nothing of a body is read beyond the slot and the budget, and the handler gets
//! the body already in memory, so no handler can be held open by a slow client. The slot and
//! the bytes are given back once the handler has answered. Refusals of webhook deliveries are
//! counted as their [`Outcome`]; the owner routes' are answered the same way, uncounted.

use std::sync::Arc;

use axum::body::HttpBody as _;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::IngestState;
use crate::delivery_metrics::Outcome;

/// The webhook's path: its refusals are counted as deliveries.
pub(crate) const WEBHOOK_PATH: &str = "/facebook/webhook";

/// Runs `next` on `request` within the limits, or answers the refusal.
pub(crate) async fn bounded(
    State(state): State<Arc<IngestState>>,
    request: Request,
    next: Next,
) -> Response {
    let counted = request.method() == Method::POST && request.uri().path() == WEBHOOK_PATH;
    let refuse = |outcome: Outcome, status: StatusCode, text: &'static str| {
        if counted {
            state.delivery_metrics.answer(outcome, status, text.into())
        } else {
            (status, text).into_response()
        }
    };
    // A slot first: beyond the limit nothing is read at all.
    let Ok(slot) = state.in_flight.clone().try_acquire_owned() else {
        return refuse(
            Outcome::Overloaded,
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight; try again later",
        );
    };
    // Then the body's bytes: its declared length (exact when it has a Content-Length, or no
    // body at all), the body limit when it declares none.
    let Some(bytes) = state
        .body_budget
        .reserve(request.body().size_hint().exact())
    else {
        return refuse(
            Outcome::OverBudget,
            StatusCode::SERVICE_UNAVAILABLE,
            "too many body bytes in flight; try again later",
        );
    };
    let (parts, body) = request.into_parts();
    // `Bytes` honours the body limit (`DefaultBodyLimit`) the request carries in its parts.
    let read = Bytes::from_request(Request::from_parts(parts.clone(), body), &());
    let body = match tokio::time::timeout(state.read_timeout, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return refuse(
                Outcome::TooLarge,
                StatusCode::PAYLOAD_TOO_LARGE,
                "the body is over the limit",
            );
        }
        Ok(Err(_)) => {
            return refuse(
                Outcome::BadRequest,
                StatusCode::BAD_REQUEST,
                "body could not be read",
            );
        }
        Err(_) => {
            return refuse(
                Outcome::TooSlow,
                StatusCode::REQUEST_TIMEOUT,
                "the body was not sent in time",
            );
        }
    };
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    drop((slot, bytes));
    response
}
