//! Owner sessions: a random 256-bit id in the session cookie (see `cookies.rs`), its
//! SHA-256 in the database with the user and an expiry. A cookie that is not one of ours is
//! treated as no session at all. Starting a session ends the one the browser held, so an old
//! cookie never stays valid beside a new one; `POST /logout` ends it on request.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use fbsync_shared::ids::{FacebookUserId, UserUuid};
use fbsync_shared::now_ms;
use fbsync_shared::storage::db::DbError;
use sha2::{Digest, Sha256};

use super::error::OwnerError;
use super::page::html;
use super::{OwnerState, cookies};

/// The cookie's name: with the `__Host-` prefix when cookies are Secure (no other host, not
/// even a sibling subdomain, can then set it); the seed's `session_id` over plain http.
pub fn cookie_name(secure: bool) -> &'static str {
    if secure {
        "__Host-session_id"
    } else {
        "session_id"
    }
}

/// How long a session lasts.
const LIFETIME_MS: i64 = 24 * 3600 * 1000;

/// What the database holds of a session id.
fn hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// The user of the request's session, if it has a live one.
pub async fn current_user(
    state: &OwnerState,
    headers: &HeaderMap,
) -> Result<Option<UserUuid>, DbError> {
    let Some(id) = cookies::read(headers, cookie_name(state.settings.secure_cookies())) else {
        return Ok(None);
    };
    state.owners.session_user(&hash(&id), now_ms()).await
}

/// Starts a session for `user` in place of the request's (which ends), tied to `person` when
/// their Facebook Login started it; the `Set-Cookie` value that hands it to the browser.
pub async fn start(
    state: &OwnerState,
    headers: &HeaderMap,
    user: &UserUuid,
    person: Option<&FacebookUserId>,
) -> Result<HeaderValue, DbError> {
    end(state, headers).await?;
    let id = cookies::new_value();
    let now = now_ms();
    state
        .owners
        .create_session(&hash(&id), user, person, now + LIFETIME_MS, now)
        .await?;
    let secure = state.settings.secure_cookies();
    Ok(cookies::set(
        cookie_name(secure),
        &id,
        LIFETIME_MS / 1000,
        secure,
    ))
}

/// Ends the request's session (if any); the `Set-Cookie` value that clears the cookie.
pub async fn end(state: &OwnerState, headers: &HeaderMap) -> Result<HeaderValue, DbError> {
    let secure = state.settings.secure_cookies();
    if let Some(id) = cookies::read(headers, cookie_name(secure)) {
        state.owners.delete_session(&hash(&id)).await?;
    }
    Ok(cookies::set(cookie_name(secure), "", 0, secure))
}

/// POST /logout: the session ends (a POST, so a link on another site cannot sign anyone out:
/// SameSite=Lax sends no cookie with a cross-site POST).
pub async fn logout(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
) -> Result<Response, OwnerError> {
    let cleared = end(&state, &headers).await?;
    let mut response = html(
        StatusCode::OK,
        "Signed out",
        "<p>You are signed out of fbsync on this browser. Your Pages keep syncing.</p>\n\
         <p>To sign in again, open the app from your Shopify admin.</p>",
    );
    response.headers_mut().insert(header::SET_COOKIE, cleared);
    Ok(response)
}
