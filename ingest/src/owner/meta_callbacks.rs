//! The callbacks Meta requires of an app that uses Facebook Login, each with a `signed_request`
//! (`base64url(signature).base64url(payload)`, the signature an HMAC-SHA256 of the encoded
//! payload under FACEBOOK_APP_SECRET, checked in constant time; a bad one is 400 and changes
//! nothing). Each acts on the one person it names (see `page_connections.rs` in the shared
//! crate for what that removes):
//! - `POST /facebook/deauthorize`: that person's Pages stop syncing, their tokens deleted (a Page
//!   another person of the shop connects goes on with that person's token); what they
//!   connected stays known for their data deletion.
//! - `POST /facebook/data-deletion`: as deauthorize, and the sessions their login started end;
//!   the removed Pages' folders (the whole `users/<uuid>/` of a shop nobody is left connected
//!   to) are deleted by a worker (within the bucket's budgets); answers
//!   `{"url", "confirmation_code"}`, the URL a status page that says what was removed.
//!
//! Freshness: a signed_request must carry `issued_at` no more than [`MAX_AGE_SECS`] old and no
//! more than [`CLOCK_SKEW_SECS`] ahead, an `expires` (when not 0) still ahead, and no `code`
//! (a login's signed request is not one of these). Each is used once: a replay inside the
//! window does nothing (deauthorize answers success again; data deletion answers the same
//! confirmation code).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fbsync_shared::ids::FacebookUserId;
use fbsync_shared::now_ms;
use fbsync_shared::storage::db::NewDataDeletion;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::OwnerState;
use super::error::CallbackError;
use super::page::with_private_headers;

/// Oldest `issued_at` accepted: Meta calls these URLs as the person acts, so an hour leaves room
/// for Meta's retries and refuses a request captured long ago.
pub const MAX_AGE_SECS: i64 = 3600;

/// How far ahead of this host's clock `issued_at` may be.
pub const CLOCK_SKEW_SECS: i64 = 300;

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
    #[error("signed_request has no issued_at")]
    NoIssuedAt,
    #[error("signed_request was issued more than an hour ago")]
    Stale,
    #[error("signed_request was issued in the future")]
    FromTheFuture,
    #[error("signed_request has expired")]
    Expired,
    #[error("signed_request is a login's (it carries a code), not this callback's")]
    LoginRequest,
}

/// A checked signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRequest {
    /// The app-scoped Facebook user id it names.
    pub person: FacebookUserId,
    /// Its `issued_at`, seconds: its use is remembered until it is too old anyway.
    pub issued_at: i64,
    /// The SHA-256 of the signed payload, decoded, hex: what a replay is recognised by (the
    /// signature follows from the payload, and the encodings of either may vary).
    pub sha256: String,
}

/// Checks a `signed_request` at `now_secs`: signature, algorithm, freshness, the person.
pub fn verify_signed_request(
    app_secret: &SecretString,
    signed_request: Option<&str>,
    now_secs: i64,
) -> Result<VerifiedRequest, SignedRequestError> {
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
    let payload_bytes = decode(payload).map_err(|_| SignedRequestError::Malformed)?;
    let sha256 = hex::encode(Sha256::digest(&payload_bytes));
    let payload: Value =
        serde_json::from_slice(&payload_bytes).map_err(|_| SignedRequestError::Malformed)?;
    let algorithm = payload.get("algorithm").and_then(Value::as_str);
    if !algorithm.is_some_and(|a| a.eq_ignore_ascii_case("HMAC-SHA256")) {
        return Err(SignedRequestError::Algorithm);
    }
    if payload.get("code").is_some() {
        return Err(SignedRequestError::LoginRequest);
    }
    let issued_at = payload
        .get("issued_at")
        .and_then(Value::as_i64)
        .ok_or(SignedRequestError::NoIssuedAt)?;
    if issued_at < now_secs - MAX_AGE_SECS {
        return Err(SignedRequestError::Stale);
    }
    if issued_at > now_secs + CLOCK_SKEW_SECS {
        return Err(SignedRequestError::FromTheFuture);
    }
    let expires = payload.get("expires").and_then(Value::as_i64).unwrap_or(0);
    if expires != 0 && expires <= now_secs {
        return Err(SignedRequestError::Expired);
    }
    let person = payload
        .get("user_id")
        .and_then(|id| match id {
            Value::String(id) => Some(id.clone()),
            Value::Number(id) => Some(id.to_string()),
            _ => None,
        })
        .and_then(|id| FacebookUserId::parse(&id).ok())
        .ok_or(SignedRequestError::NoUser)?;
    Ok(VerifiedRequest {
        person,
        issued_at,
        sha256,
    })
}

/// The person a Meta callback is about, from its form's `signed_request`, checked. A request
/// without a valid one is refused before the handler runs.
pub struct SignedRequest(pub VerifiedRequest);

impl FromRequest<Arc<OwnerState>> for SignedRequest {
    type Rejection = CallbackError;

    async fn from_request(
        request: Request,
        state: &Arc<OwnerState>,
    ) -> Result<Self, CallbackError> {
        let form = Form::<HashMap<String, String>>::from_request(request, state)
            .await
            .map_err(|_| CallbackError::Refused(SignedRequestError::Missing))?;
        let verified = verify_signed_request(
            &state.settings.facebook_app_secret,
            form.get("signed_request").map(String::as_str),
            now_ms() / 1000,
        )
        .map_err(CallbackError::Refused)?;
        Ok(SignedRequest(verified))
    }
}

/// POST /facebook/deauthorize
pub async fn deauthorize(
    State(state): State<Arc<OwnerState>>,
    SignedRequest(signed): SignedRequest,
) -> Result<Response, CallbackError> {
    // Remembered past the window, so a replay is either recorded or too old.
    let remember_until_ms = (signed.issued_at + MAX_AGE_SECS + CLOCK_SKEW_SECS) * 1000;
    let key = format!("signed_request:{}", signed.sha256);
    if !state
        .owners
        .use_nonce(&key, remember_until_ms, now_ms())
        .await?
    {
        tracing::info!("a deauthorization was replayed; nothing changed");
        return Ok(axum::Json(json!({"success": true})).into_response());
    }
    let forgotten = match state
        .owners
        .deauthorize_person(&signed.person, now_ms())
        .await
    {
        Ok(forgotten) => forgotten,
        Err(e) => {
            // Meta sends it again: that one must not pass for a replay.
            let _ = state.owners.release_nonce(&key).await;
            return Err(e.into());
        }
    };
    tracing::info!(
        pages_removed = forgotten.removed.len(),
        pages_kept = forgotten.kept.len(),
        "app deauthorized: the person's Pages stopped syncing and their tokens were deleted"
    );
    Ok(axum::Json(json!({"success": true})).into_response())
}

/// POST /facebook/data-deletion
pub async fn data_deletion(
    State(state): State<Arc<OwnerState>>,
    SignedRequest(signed): SignedRequest,
) -> Result<Response, CallbackError> {
    let owners = &state.owners;
    if let Some(code) = owners
        .data_deletion_of_signed_request(&signed.sha256)
        .await?
    {
        tracing::info!("a data-deletion request was replayed; answered with its first code");
        return Ok(confirmation(&state, &code));
    }
    // The request is recorded, the person forgotten and the object-deletion job written to the
    // outbox in one transaction, then the job is published: a broker that is away delays the
    // job (the outbox relay publishes it), it never loses it.
    let mut code = [0u8; 16];
    rand::rng().fill_bytes(&mut code);
    let code = hex::encode(code);
    let done = owners
        .request_data_deletion(
            NewDataDeletion {
                confirmation_code: &code,
                person: &signed.person,
                signed_request_sha256: &signed.sha256,
            },
            now_ms(),
        )
        .await?;
    let Some((forgotten, jobs)) = done else {
        // The same request, at the same moment: it answers for both.
        let first = owners
            .data_deletion_of_signed_request(&signed.sha256)
            .await?;
        return Ok(confirmation(&state, first.as_deref().unwrap_or(&code)));
    };
    state.publish_now(jobs).await;
    tracing::info!(
        pages_removed = forgotten.removed.len(),
        pages_kept = forgotten.kept.len(),
        shops_emptied = forgotten.emptied.len(),
        sessions = forgotten.sessions,
        "data deletion requested: tokens and sessions deleted, objects queued for deletion"
    );
    Ok(confirmation(&state, &code))
}

/// Meta's answer to a data-deletion request: the status page's URL and the code.
fn confirmation(state: &OwnerState, code: &str) -> Response {
    let url = format!(
        "{}/facebook/data-deletion/status?code={code}",
        state.public_origin
    );
    let mut response = axum::Json(json!({"url": url, "confirmation_code": code})).into_response();
    with_private_headers(response.headers_mut());
    response
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

    const NOW: i64 = 1_800_000_000;

    fn person_of(
        result: Result<VerifiedRequest, SignedRequestError>,
    ) -> Result<String, SignedRequestError> {
        result.map(|verified| verified.person.as_str().to_string())
    }

    #[test]
    fn signed_requests_are_checked() {
        let secret = SecretString::from("app-secret");
        let payload = json!({"algorithm": "HMAC-SHA256", "issued_at": NOW - 5, "user_id": "1234"});
        let good = sign("app-secret", &payload);
        assert_eq!(
            person_of(verify_signed_request(&secret, Some(&good), NOW)),
            Ok("1234".into())
        );
        let forged = sign("another-secret", &payload);
        assert_eq!(
            verify_signed_request(&secret, Some(&forged), NOW),
            Err(SignedRequestError::BadSignature)
        );
        let (signature, _) = good.split_once('.').expect("two parts");
        let other =
            URL_SAFE_NO_PAD.encode(json!({"algorithm": "HMAC-SHA256", "user_id": "9"}).to_string());
        assert_eq!(
            verify_signed_request(&secret, Some(&format!("{signature}.{other}")), NOW),
            Err(SignedRequestError::BadSignature)
        );
        assert_eq!(
            verify_signed_request(&secret, None, NOW),
            Err(SignedRequestError::Missing)
        );
        assert_eq!(
            verify_signed_request(&secret, Some("nodot"), NOW),
            Err(SignedRequestError::Malformed)
        );
        let plain = sign("app-secret", &json!({"algorithm": "none", "user_id": "1"}));
        assert_eq!(
            verify_signed_request(&secret, Some(&plain), NOW),
            Err(SignedRequestError::Algorithm)
        );
    }

    #[test]
    fn a_signed_request_must_be_fresh_and_not_a_logins() {
        let secret = SecretString::from("app-secret");
        let check = |payload: Value| {
            verify_signed_request(&secret, Some(&sign("app-secret", &payload)), NOW).map(|_| ())
        };
        let base = |extra: Value| {
            let mut payload = json!({"algorithm": "HMAC-SHA256", "user_id": "1234"});
            for (key, value) in extra.as_object().expect("object") {
                payload[key] = value.clone();
            }
            payload
        };
        assert_eq!(check(base(json!({}))), Err(SignedRequestError::NoIssuedAt));
        assert_eq!(
            check(base(json!({"issued_at": 1}))),
            Err(SignedRequestError::Stale)
        );
        assert_eq!(
            check(base(json!({"issued_at": NOW - 86_400}))),
            Err(SignedRequestError::Stale),
            "a day old"
        );
        assert_eq!(
            check(base(json!({"issued_at": NOW - MAX_AGE_SECS}))),
            Ok(())
        );
        assert_eq!(
            check(base(json!({"issued_at": NOW + CLOCK_SKEW_SECS + 1}))),
            Err(SignedRequestError::FromTheFuture)
        );
        assert_eq!(
            check(base(json!({"issued_at": NOW, "expires": NOW - 1}))),
            Err(SignedRequestError::Expired)
        );
        assert_eq!(check(base(json!({"issued_at": NOW, "expires": 0}))), Ok(()));
        assert_eq!(
            check(base(json!({"issued_at": NOW, "code": "AQD..."}))),
            Err(SignedRequestError::LoginRequest)
        );
    }

    #[test]
    fn a_signed_request_is_known_again_whatever_its_base64_padding() {
        let secret = SecretString::from("app-secret");
        let payload = json!({"algorithm": "HMAC-SHA256", "issued_at": NOW, "user_id": "1"});
        let plain = sign("app-secret", &payload);
        let (signature, body) = plain.split_once('.').expect("two parts");
        let first = verify_signed_request(&secret, Some(&plain), NOW).expect("valid");
        // The payload is signed as sent, so only the signature's encoding can vary.
        for padded in [
            format!("{signature}=.{body}"),
            format!("{signature}==.{body}"),
        ] {
            let again = verify_signed_request(&secret, Some(&padded), NOW).expect("valid");
            assert_eq!(again.sha256, first.sha256, "{padded}");
        }
    }
}
