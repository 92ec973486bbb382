//! The callbacks Meta requires of an app that uses Facebook Login, each with a `signed_request`
//! (`base64url(signature).base64url(payload)`, the signature an HMAC-SHA256 of the encoded
//! payload under FACEBOOK_APP_SECRET, checked in constant time; a bad one is 400 and changes
//! nothing):
//! - `POST /facebook/deauthorize`: that person's Pages stop syncing, their tokens deleted.
//! - `POST /facebook/data-deletion`: tokens, Pages and sessions deleted at once, the objects
//!   under `users/<uuid>/` by a worker (within the bucket's budgets); answers
//!   `{"url", "confirmation_code"}`, the URL a status page of the request.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fbsync_shared::jobs::{DeleteUserData, Job};
use fbsync_shared::now_ms;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::Sha256;

use super::OwnerState;
use super::error::CallbackError;
use super::page::with_private_headers;

/// Why a signed request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedRequestError {
    #[error("no signed_request")]
    Missing,
    #[error("signed_request is malformed")]
    Malformed,
    #[error("signed_request's signature does not match")]
    BadSignature,
    #[error("signed_request uses an algorithm other than HMAC-SHA256")]
    Algorithm,
    #[error("signed_request names no user")]
    NoUser,
}

/// Checks a `signed_request` and returns the app-scoped user id it names.
pub fn verify_signed_request(
    app_secret: &SecretString,
    signed_request: Option<&str>,
) -> Result<String, SignedRequestError> {
    let signed = signed_request
        .filter(|s| !s.is_empty())
        .ok_or(SignedRequestError::Missing)?;
    let (signature, payload) = signed
        .split_once('.')
        .ok_or(SignedRequestError::Malformed)?;
    let decode = |text: &str| URL_SAFE_NO_PAD.decode(text.trim_end_matches('='));
    let signature = decode(signature).map_err(|_| SignedRequestError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.expose_secret().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(payload.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| SignedRequestError::BadSignature)?;
    let payload: Value = decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(SignedRequestError::Malformed)?;
    let algorithm = payload.get("algorithm").and_then(Value::as_str);
    if !algorithm.is_some_and(|a| a.eq_ignore_ascii_case("HMAC-SHA256")) {
        return Err(SignedRequestError::Algorithm);
    }
    payload
        .get("user_id")
        .and_then(|id| match id {
            Value::String(id) => Some(id.clone()),
            Value::Number(id) => Some(id.to_string()),
            _ => None,
        })
        .filter(|id| !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(SignedRequestError::NoUser)
}

/// The person a Meta callback is about: the app-scoped user id its form's `signed_request`
/// names, the signature checked. A request without a valid one is refused before the handler
/// runs.
pub struct SignedRequest {
    /// The app-scoped Facebook user id.
    pub facebook_user: String,
}

impl FromRequest<Arc<OwnerState>> for SignedRequest {
    type Rejection = CallbackError;

    async fn from_request(
        request: Request,
        state: &Arc<OwnerState>,
    ) -> Result<Self, CallbackError> {
        let form = Form::<HashMap<String, String>>::from_request(request, state)
            .await
            .map_err(|_| CallbackError::Refused(SignedRequestError::Missing))?;
        let facebook_user = verify_signed_request(
            &state.settings.facebook_app_secret,
            form.get("signed_request").map(String::as_str),
        )
        .map_err(CallbackError::Refused)?;
        Ok(SignedRequest { facebook_user })
    }
}

/// POST /facebook/deauthorize
pub async fn deauthorize(
    State(state): State<Arc<OwnerState>>,
    signed: SignedRequest,
) -> Result<Response, CallbackError> {
    let forgotten = state
        .owners
        .forget_facebook_user(&signed.facebook_user, false)
        .await?;
    tracing::info!(
        users = forgotten.users.len(),
        pages = forgotten.pages,
        "app deauthorized: the person's Pages stopped syncing and their tokens were deleted"
    );
    Ok(axum::Json(json!({"success": true})).into_response())
}

/// POST /facebook/data-deletion
pub async fn data_deletion(
    State(state): State<Arc<OwnerState>>,
    signed: SignedRequest,
) -> Result<Response, CallbackError> {
    let facebook_user = signed.facebook_user;
    // The request is recorded and its object deletion queued first, then the database part
    // is done: a request that cannot be queued changes nothing and is answered 503, so Meta
    // sends it again (once the users are forgotten, they could not be found again).
    let users = state.owners.users_of_facebook_user(&facebook_user).await?;
    let mut code = [0u8; 16];
    rand::rng().fill_bytes(&mut code);
    let code = hex::encode(code);
    let now = now_ms();
    state
        .owners
        .record_data_deletion(&code, &facebook_user, &users, 0, 0, now)
        .await?;
    if !users.is_empty() {
        let outgoing = state.topology.job(&Job::DeleteUserData(DeleteUserData {
            confirmation_code: code.clone(),
        }));
        if let Err(e) = state
            .publisher
            .publish_all(&[outgoing], state.publish_timeout)
            .await
        {
            let _ = state.owners.remove_data_deletion(&code).await;
            return Err(CallbackError::Failed(format!(
                "the deletion job could not be queued ({e})"
            )));
        }
    }
    let forgotten = state
        .owners
        .forget_facebook_user(&facebook_user, true)
        .await?;
    state
        .owners
        .set_data_deletion_counts(&code, forgotten.pages, forgotten.sessions)
        .await?;
    // Nothing stored for this person: the request is complete at once.
    if users.is_empty() {
        state.owners.complete_data_deletion(&code, 0, now).await?;
    }
    tracing::info!(
        users = forgotten.users.len(),
        pages = forgotten.pages,
        sessions = forgotten.sessions,
        "data deletion requested: tokens and sessions deleted, objects queued for deletion"
    );
    let url = format!(
        "{}/facebook/data-deletion/status?code={code}",
        state.public_origin
    );
    let mut response = axum::Json(json!({"url": url, "confirmation_code": code})).into_response();
    with_private_headers(response.headers_mut());
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed request as Facebook makes one.
    fn sign(secret: &str, payload: &Value) -> String {
        let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
        mac.update(payload.as_bytes());
        format!(
            "{}.{payload}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn signed_requests_are_checked() {
        let secret = SecretString::from("app-secret");
        let payload = json!({"algorithm": "HMAC-SHA256", "issued_at": 1, "user_id": "1234"});
        let good = sign("app-secret", &payload);
        assert_eq!(
            verify_signed_request(&secret, Some(&good)),
            Ok("1234".into())
        );
        let forged = sign("another-secret", &payload);
        assert_eq!(
            verify_signed_request(&secret, Some(&forged)),
            Err(SignedRequestError::BadSignature)
        );
        let (signature, _) = good.split_once('.').expect("two parts");
        let other =
            URL_SAFE_NO_PAD.encode(json!({"algorithm": "HMAC-SHA256", "user_id": "9"}).to_string());
        assert_eq!(
            verify_signed_request(&secret, Some(&format!("{signature}.{other}"))),
            Err(SignedRequestError::BadSignature)
        );
        assert_eq!(
            verify_signed_request(&secret, None),
            Err(SignedRequestError::Missing)
        );
        assert_eq!(
            verify_signed_request(&secret, Some("nodot")),
            Err(SignedRequestError::Malformed)
        );
        let plain = sign("app-secret", &json!({"algorithm": "none", "user_id": "1"}));
        assert_eq!(
            verify_signed_request(&secret, Some(&plain)),
            Err(SignedRequestError::Algorithm)
        );
    }
}
