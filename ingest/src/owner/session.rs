//! Owner sessions: a random 256-bit id in the `session_id` cookie (HttpOnly, SameSite=Lax,
//! Path=/, Secure when the redirect URIs are https), its SHA-256 in the database with the user
//! and an expiry. A cookie that is not one of ours is treated as no session at all.

use axum::http::{HeaderMap, HeaderValue, header};
use fbsync_shared::ids::UserUuid;
use fbsync_shared::now_ms;
use fbsync_shared::storage::db::DbError;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::OwnerState;

/// The cookie's name (the seed's).
pub const COOKIE: &str = "session_id";

/// How long a session lasts.
const LIFETIME_MS: i64 = 24 * 3600 * 1000;

/// The session id of the request's cookie, when it has the shape of one of ours.
fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// What the database holds of a session id.
fn hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// The user of the request's session, if it has a live one.
pub async fn current_user(
    state: &OwnerState,
    headers: &HeaderMap,
) -> Result<Option<UserUuid>, DbError> {
    let Some(id) = session_id(headers) else {
        return Ok(None);
    };
    state.owners.session_user(&hash(&id), now_ms()).await
}

/// Starts a session for `user`; the `Set-Cookie` value that hands it to the browser.
pub async fn start(state: &OwnerState, user: &UserUuid) -> Result<HeaderValue, DbError> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let id = hex::encode(bytes);
    let now = now_ms();
    state
        .owners
        .create_session(&hash(&id), user, now + LIFETIME_MS, now)
        .await?;
    Ok(cookie(
        &id,
        LIFETIME_MS / 1000,
        state.settings.secure_cookies(),
    ))
}

/// Ends the request's session (if any); the `Set-Cookie` value that clears the cookie.
pub async fn end(state: &OwnerState, headers: &HeaderMap) -> Result<HeaderValue, DbError> {
    if let Some(id) = session_id(headers) {
        state.owners.delete_session(&hash(&id)).await?;
    }
    Ok(cookie("", 0, state.settings.secure_cookies()))
}

fn cookie(value: &str, max_age_secs: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text =
        format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}");
    HeaderValue::from_str(&text).expect("a hex id makes a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_cookie_shape_is_read() {
        let id = "ab".repeat(32);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; session_id={id}")).expect("header"),
        );
        assert_eq!(session_id(&headers), Some(id));
        let mut forged = HeaderMap::new();
        forged.insert(
            header::COOKIE,
            HeaderValue::from_static("session_id=1' OR 1=1"),
        );
        assert_eq!(session_id(&forged), None);
        let set = cookie("ab", 60, true);
        assert_eq!(
            set.to_str().expect("ascii"),
            "session_id=ab; Path=/; HttpOnly; SameSite=Lax; Max-Age=60; Secure"
        );
    }
}
