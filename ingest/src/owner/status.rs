//! The owner's status page, `GET /connect` (session cookie): the shop, and each connected Page
//! as a card in the owner's words (`page_card.rs`), reloading itself while a Page is being set
//! up; or, with `Accept: application/json`, every step's raw outcome, last poll, conversations
//! stored, last event and last error. Built from `PageSummary`, which holds no token. `GET /`
//! is the way in.
//!
//! Also the status page of a data-deletion request (`/facebook/data-deletion/status?code=`),
//! the URL Meta shows the person.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use fbsync_shared::storage::db::{PageStatus, PageSummary};
use serde_json::{Value, json};

use super::error::OwnerError;
use super::page::{Refresh, document, escape, html, with_private_headers};
use super::{OwnerState, page_card, session};

/// True when the client asked for JSON.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"))
}

fn json_answer(status: StatusCode, value: Value) -> Response {
    let mut response = (status, Json(value)).into_response();
    with_private_headers(response.headers_mut());
    response
}

/// A time for people: `2026-11-27 04:44 UTC`.
fn when(ms: Option<i64>) -> Option<String> {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
}

/// The Page's trouble in words, if any.
fn trouble(page: &PageSummary) -> Option<String> {
    if page.status == PageStatus::NeedsReauth {
        return Some(
            "Facebook no longer accepts fbsync's access to this Page (the permission was removed \
             or expired): reconnect it."
                .to_string(),
        );
    }
    page.last_error.clone()
}

fn page_json(page: &PageSummary) -> Value {
    let onboarding: serde_json::Map<String, Value> = page
        .onboarding()
        .iter()
        .map(|(step, outcome)| (step.as_str().to_string(), json!(outcome)))
        .collect();
    json!({
        "page_id": page.page_id.as_str(),
        "name": page.name,
        "status": page.status.as_str(),
        "onboarding": onboarding,
        "conversations_stored": page.conversations_stored,
        "last_event_ms": page.last_event_ms,
        "last_event": when(page.last_event_ms),
        "last_poll": when(page.last_poll_ms),
        "history_done": when(page.last_backfill_end_ms),
        "messaging_blocked": page.messaging_blocked(),
        "subscription_checked": when(page.subscription_checked_at_ms),
        "subscription_restored": when(page.subscription_restored_at_ms),
        "poll_in_progress": page.poll_started_ms.is_some(),
        "last_error": trouble(page),
        "reconnect_url": (page.status == PageStatus::NeedsReauth).then_some("/facebook/login"),
    })
}

/// GET /: the way in. A signed-in owner goes on to `/connect`; anyone else is told how to start.
pub async fn start(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
) -> Result<Response, OwnerError> {
    if session::current_user(&state, &headers).await?.is_some() {
        return Ok(Redirect::to("/connect").into_response());
    }
    Ok(html(
        StatusCode::OK,
        "Connect your Facebook Pages",
        "<p>fbsync keeps a copy of your Facebook Pages' Messenger conversations.</p>\n\
         <p>To connect your Pages, open fbsync from your Shopify admin (Apps), or enter your \
         shop's address:</p>\n\
         <form method=\"get\" action=\"/shopify/login\">\
         <label for=\"shop\">Shop address</label> \
         <input id=\"shop\" name=\"shop\" placeholder=\"my-shop.myshopify.com\" required> \
         <button type=\"submit\">Connect</button></form>",
    ))
}

/// The sign-out button: a form, as `POST /logout` is a POST.
const SIGN_OUT: &str = "<form method=\"post\" action=\"/logout\">\
    <button id=\"logout\" type=\"submit\">Sign out</button></form>\n";

/// GET /connect
pub async fn connect(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
) -> Result<Response, OwnerError> {
    let Some(user) = session::current_user(&state, &headers).await? else {
        let message = "There is no session: open the app from your Shopify admin first.";
        if wants_json(&headers) {
            return Ok(json_answer(
                StatusCode::UNAUTHORIZED,
                json!({"error": message}),
            ));
        }
        return Err(OwnerError::Refused {
            status: StatusCode::UNAUTHORIZED,
            title: "Not signed in",
            message: message.into(),
        });
    };
    let (shop, pages) = tokio::try_join!(
        state.owners.user_shop(&user),
        state.registry.pages_of_user(&user)
    )?;
    let shop = shop.map(|shop| shop.as_str().to_string());
    if wants_json(&headers) {
        let pages: Vec<Value> = pages.iter().map(page_json).collect();
        return Ok(json_answer(
            StatusCode::OK,
            json!({"shop": shop, "user_uuid": user.as_str(), "pages": pages}),
        ));
    }
    let now = fbsync_shared::now_ms();
    let mut body = format!(
        "<header><p>Shop: <strong id=\"shop\">{}</strong></p>\n{SIGN_OUT}</header>\n",
        escape(shop.as_deref().unwrap_or("-"))
    );
    if pages.is_empty() {
        body.push_str(
            "<p>No Facebook Page is connected yet.</p>\n\
             <p><a id=\"connect-facebook\" href=\"/facebook/login\">Connect Facebook Pages</a></p>",
        );
        return Ok(html(StatusCode::OK, "Your connected Pages", &body));
    }
    for page in &pages {
        body.push_str(&page_card::card(page, now));
    }
    body.push_str(
        "<p><a id=\"connect-facebook\" href=\"/facebook/login\">Connect more Pages</a></p>",
    );
    // While a Page is still being set up or copied, the page refreshes itself (no script).
    let refresh = pages.iter().any(page_card::in_progress).then_some(Refresh {
        secs: REFRESH_SECS,
        path: "/connect",
    });
    Ok(document(
        StatusCode::OK,
        "Your connected Pages",
        &body,
        refresh,
    ))
}

/// How often the status page reloads while onboarding or a copy runs.
const REFRESH_SECS: u32 = 5;

/// GET /facebook/data-deletion/status?code=
pub async fn deletion_status(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, OwnerError> {
    let code = query
        .iter()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let deletion = state
        .owners
        .data_deletion(code)
        .await?
        .ok_or_else(|| OwnerError::Refused {
            status: StatusCode::NOT_FOUND,
            title: "Unknown request",
            message: "No data-deletion request has this confirmation code.".into(),
        })?;
    let done = deletion.completed_at_ms.is_some();
    let removed: Vec<String> = deletion
        .removed()
        .into_iter()
        .map(|(_, page)| page.as_str().to_string())
        .collect();
    let kept: Vec<String> = deletion
        .kept()
        .into_iter()
        .map(|page| page.as_str().to_string())
        .collect();
    let shops_emptied = deletion.emptied_users().len();
    if wants_json(&headers) {
        return Ok(json_answer(
            StatusCode::OK,
            json!({
                "confirmation_code": deletion.confirmation_code,
                "requested_at": when(Some(deletion.requested_at_ms)),
                "pages_removed": deletion.pages_removed,
                "removed_pages": removed,
                "kept_pages": kept,
                "shops_emptied": shops_emptied,
                "sessions_removed": deletion.sessions_removed,
                "objects_deleted": deletion.objects_deleted,
                "completed_at": when(deletion.completed_at_ms),
                "status": if done { "complete" } else { "in progress" },
            }),
        ));
    }
    let requested = when(Some(deletion.requested_at_ms)).unwrap_or_default();
    let mut body = format!(
        "<p>Confirmation code: <code>{}</code></p>\n<p>Requested {}.</p>\n",
        escape(&deletion.confirmation_code),
        escape(&requested),
    );
    if removed.is_empty() && kept.is_empty() && deletion.pages_removed > 0 {
        // A request recorded before fbsync listed the Pages one by one.
        body.push_str(&format!(
            "<p id=\"removed\">Removed at once, with their access tokens: {} connected \
             Page(s). Their stored files (Page data and Messenger conversations) are deleted \
             too.</p>\n",
            deletion.pages_removed
        ));
    } else if removed.is_empty() && kept.is_empty() {
        body.push_str(
            "<p id=\"removed\">fbsync held no Page connected by you: nothing was stored, so \
             nothing had to be deleted.</p>\n",
        );
    } else {
        let list = |pages: &[String]| escape(&pages.join(", "));
        if !removed.is_empty() {
            body.push_str(&format!(
                "<p id=\"removed\">Removed at once, with the access tokens you gave: the \
                 Page(s) {}. Their stored files (Page data and Messenger conversations) are \
                 deleted too.</p>\n",
                list(&removed)
            ));
        }
        if !kept.is_empty() {
            body.push_str(&format!(
                "<p id=\"kept\">Your access token was deleted for the Page(s) {}; they stay \
                 connected with another access token (another person of the same shop \
                 connected them too, or the operator registered them).</p>\n",
                list(&kept)
            ));
        }
    }
    if shops_emptied > 0 {
        body.push_str(
            "<p id=\"shop\">Nobody else was connected to your shop, so its Shopify access \
             token and everything stored for it are deleted too.</p>\n",
        );
    }
    body.push_str(&format!(
        "<p>{} sign-in session(s) were ended.</p>\n",
        deletion.sessions_removed
    ));
    match (deletion.objects_deleted, when(deletion.completed_at_ms)) {
        (Some(objects), Some(completed)) => body.push_str(&format!(
            "<p id=\"status\">Complete: {objects} stored file(s) (Page data and Messenger \
             conversations) were deleted {}.</p>",
            escape(&completed)
        )),
        _ => body.push_str(
            "<p id=\"status\">In progress: the stored files (Page data and Messenger \
             conversations) are being deleted.</p>",
        ),
    }
    Ok(html(StatusCode::OK, "Data deletion", &body))
}
