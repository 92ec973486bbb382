//! The webhook: the subscription handshake, and deliveries verified, split into events and
//! published with confirms before they are answered.
//!
//! Invariant: a delivery is answered 200 only once every event in it is confirmed by the
//! broker, and nothing of an unsigned body is parsed. The request's limits (slot, byte budget,
//! read timeout) are [`crate::request_limits`]'s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::header::X_CONTENT_TYPE_OPTIONS;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fbsync_shared::facebook::event::{EventMessage, split_delivery};
use fbsync_shared::facebook::signature::{SHA1_HEADER, SHA256_HEADER, verify_signature};
use fbsync_shared::jobs::{Envelope, Job, Reconcile};
use fbsync_shared::now_ms;
use fbsync_shared::queue::{Outgoing, PublishError, Topology};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use crate::IngestState;
use crate::delivery_metrics::Outcome;

/// GET /facebook/webhook: the subscription handshake.
pub(crate) async fn verify_subscription(
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
        // Echoed as plain text that no browser may sniff into anything else.
        (true, Some(challenge)) => (
            StatusCode::OK,
            [(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"))],
            challenge.clone(),
        )
            .into_response(),
        _ => (StatusCode::FORBIDDEN, "verification failed").into_response(),
    }
}

/// A delivery's body with its signature verified. The body was read within the limits
/// before ([`crate::request_limits`]), which hold the request's slot and bytes while it is
/// handled; a request refused here is counted and answered as its [`Outcome`].
pub struct SignedDelivery {
    /// The body as sent: signed, not yet parsed.
    body: Bytes,
}

impl FromRequest<Arc<IngestState>> for SignedDelivery {
    type Rejection = Response;

    async fn from_request(request: Request, state: &Arc<IngestState>) -> Result<Self, Response> {
        let refuse = |outcome, status, text| state.delivery_metrics.answer(outcome, status, text);
        // Only the signature headers are read after the body: cheap clones of their bytes, not
        // of the whole header map.
        let [sha256, sha1] =
            [SHA256_HEADER, SHA1_HEADER].map(|name| request.headers().get(name).cloned());
        let Ok(body) = Bytes::from_request(request, &()).await else {
            return Err(refuse(
                Outcome::BadRequest,
                StatusCode::BAD_REQUEST,
                "body could not be read".into(),
            ));
        };
        if let Err(e) = verify_signature(
            &state.app_secret,
            header_str(sha256.as_ref()),
            header_str(sha1.as_ref()),
            &body,
        ) {
            tracing::warn!(reason = %e, "webhook delivery refused");
            return Err(refuse(
                Outcome::BadSignature,
                StatusCode::UNAUTHORIZED,
                "invalid signature".into(),
            ));
        }
        Ok(SignedDelivery { body })
    }
}

/// POST /facebook/webhook: split the signed delivery, publish with confirms, answer.
pub(crate) async fn receive_delivery(
    State(state): State<Arc<IngestState>>,
    delivery: SignedDelivery,
) -> Response {
    let answer = |outcome, status, text| state.delivery_metrics.answer(outcome, status, text);
    let events = match split_delivery(&delivery.body, now_ms()) {
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
            if let Some(window) = state.refusals.accepted(now_ms()) {
                reconcile(&state, window).await;
            }
            answer(Outcome::Accepted, StatusCode::OK, "EVENT_RECEIVED".into())
        }
        Err(e) => {
            state.refusals.refused(now_ms());
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

/// Publishes the reconciliation of a closed window of refusals (with a confirm); a window that
/// cannot be published stays open for the next accepted delivery.
async fn reconcile(state: &IngestState, window: Reconcile) {
    let job = Outgoing::envelope(
        state.events_exchange.clone(),
        Job::Reconcile(window.clone()).envelope(),
    );
    match state
        .publisher
        .publish_all(&[job], state.publish_timeout)
        .await
    {
        Ok(()) => tracing::warn!(
            since_ms = window.since_ms,
            until_ms = window.until_ms,
            "deliveries were refused for a while: every active Page will be polled back to the window's start"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "the reconciliation was not confirmed; it goes with the next delivery");
            state.refusals.reopen(&window);
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
