//! OAuth `state` for both connect flows (and the session switch):
//! `base64url(flow|subject|browser|nonce|expiry).hex(HMAC-SHA256)` under STATE_TOKEN_SECRET.
//! The subject is the shop (Shopify) or the user UUID (Facebook, switch); `browser` is the
//! SHA-256 of the browser's sign-in cookie (see `browser_binding.rs`), so a state works only in
//! the browser that started the flow; the nonce is random (128 bits) and recorded when the
//! state is used, so a state is accepted once; it expires after 10 minutes.
//!
//! A callback checks everything first (`verify`, then its own subject or session check) and
//! uses the nonce last (`StateClaims::use_once`): a state tried in the wrong browser or
//! session is not burnt for its owner. Tampered, expired, replayed, foreign or missing states
//! are refused with a message that says which.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fbsync_shared::storage::db::{DbError, Owners};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::browser_binding::BrowserBinding;

/// How long a state is valid.
pub const LIFETIME_MS: i64 = 10 * 60 * 1000;

/// Which flow a state belongs to: a state of one is refused by the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Shopify,
    Facebook,
    /// The confirmed replacement of a browser's session by another shop's (`shopify.rs`).
    Switch,
}

impl Flow {
    fn as_str(self) -> &'static str {
        match self {
            Flow::Shopify => "shopify",
            Flow::Facebook => "facebook",
            Flow::Switch => "switch",
        }
    }
}

/// Why a state was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("this sign-in link is incomplete; please start again")]
    Missing,
    #[error("this sign-in link is damaged or was altered; please start again")]
    Tampered,
    #[error("this link belongs to another step of the sign-in; please start again")]
    WrongFlow,
    #[error("the sign-in link has expired (it is valid for 10 minutes); please start again")]
    Expired,
    #[error("this sign-in link was already used; please start again")]
    Replayed,
    #[error(
        "this sign-in was started in another browser, or this browser's sign-in cookie has \
         expired; nothing was changed. Please start again from your Shopify admin"
    )]
    OtherBrowser,
    #[error("this sign-in was started for another {0}; please start again")]
    WrongSubject(&'static str),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A checked state's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateClaims {
    /// The flow it was issued for: part of the nonce's record.
    flow: Flow,
    /// The shop or the user UUID it was issued for.
    pub subject: String,
    /// Recorded when the state is used, so it is used once.
    nonce: String,
    /// The nonce's record can go once the state has expired.
    expires_at_ms: i64,
}

/// A new state for `subject` in `flow`, valid only in the browser of `browser`.
pub fn issue(
    secret: &SecretString,
    flow: Flow,
    subject: &str,
    browser: &BrowserBinding,
    now: i64,
) -> String {
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    let payload = format!(
        "{}|{subject}|{}|{}|{}",
        flow.as_str(),
        browser.digest(),
        hex::encode(nonce),
        now + LIFETIME_MS
    );
    let encoded = URL_SAFE_NO_PAD.encode(payload);
    let signature = hex::encode(mac(secret, &encoded).finalize().into_bytes());
    format!("{encoded}.{signature}")
}

fn mac(secret: &SecretString, encoded: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(encoded.as_bytes());
    mac
}

/// Checks the signature (constant time), the flow, the expiry and the browser (the request's
/// sign-in cookie, compared in constant time); does not use the nonce.
pub fn verify(
    secret: &SecretString,
    flow: Flow,
    state: Option<&str>,
    browser: Option<&BrowserBinding>,
    now: i64,
) -> Result<StateClaims, StateError> {
    let state = state.filter(|s| !s.is_empty()).ok_or(StateError::Missing)?;
    let (encoded, signature) = state.split_once('.').ok_or(StateError::Tampered)?;
    let signature = hex::decode(signature).map_err(|_| StateError::Tampered)?;
    mac(secret, encoded)
        .verify_slice(&signature)
        .map_err(|_| StateError::Tampered)?;
    let payload = URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or(StateError::Tampered)?;
    let parts: Vec<&str> = payload.split('|').collect();
    let [flow_name, subject, browser_digest, nonce, expires] = parts.as_slice() else {
        return Err(StateError::Tampered);
    };
    if *flow_name != flow.as_str() {
        return Err(StateError::WrongFlow);
    }
    let expires_at_ms: i64 = expires.parse().map_err(|_| StateError::Tampered)?;
    if expires_at_ms <= now {
        return Err(StateError::Expired);
    }
    if !browser.is_some_and(|browser| browser.matches(browser_digest)) {
        return Err(StateError::OtherBrowser);
    }
    Ok(StateClaims {
        flow,
        subject: subject.to_string(),
        nonce: nonce.to_string(),
        expires_at_ms,
    })
}

impl StateClaims {
    /// Records the state's nonce: the state is accepted this once. Called after every other
    /// check has passed.
    pub async fn use_once(&self, owners: &Owners, now: i64) -> Result<(), StateError> {
        let key = format!("{}:{}", self.flow.as_str(), self.nonce);
        if owners.use_nonce(&key, self.expires_at_ms, now).await? {
            Ok(())
        } else {
            Err(StateError::Replayed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretString {
        SecretString::from("a-state-secret-for-tests")
    }

    fn browser() -> BrowserBinding {
        BrowserBinding::of_request_or_new(&axum::http::HeaderMap::new(), true)
    }

    #[test]
    fn a_state_verifies_for_its_flow_until_it_expires() {
        let mine = browser();
        let state = issue(&secret(), Flow::Facebook, "user-1", &mine, 1_000);
        let claims =
            verify(&secret(), Flow::Facebook, Some(&state), Some(&mine), 2_000).expect("valid");
        assert_eq!(claims.subject, "user-1");
        assert!(matches!(
            verify(&secret(), Flow::Shopify, Some(&state), Some(&mine), 2_000),
            Err(StateError::WrongFlow)
        ));
        assert!(matches!(
            verify(
                &secret(),
                Flow::Facebook,
                Some(&state),
                Some(&mine),
                1_000 + LIFETIME_MS
            ),
            Err(StateError::Expired)
        ));
        assert!(matches!(
            verify(&secret(), Flow::Facebook, None, Some(&mine), 2_000),
            Err(StateError::Missing)
        ));
    }

    #[test]
    fn a_state_is_refused_in_any_browser_but_the_one_that_started_the_flow() {
        let mine = browser();
        let state = issue(&secret(), Flow::Shopify, "a.myshopify.com", &mine, 1_000);
        for other in [Some(browser()), None] {
            assert!(matches!(
                verify(
                    &secret(),
                    Flow::Shopify,
                    Some(&state),
                    other.as_ref(),
                    2_000
                ),
                Err(StateError::OtherBrowser)
            ));
        }
    }

    #[test]
    fn an_altered_state_is_refused() {
        let mine = browser();
        let state = issue(&secret(), Flow::Shopify, "a.myshopify.com", &mine, 1_000);
        let (encoded, signature) = state.split_once('.').expect("two parts");
        let forged_payload = URL_SAFE_NO_PAD.encode(format!(
            "shopify|b.myshopify.com|{}|00|{}",
            mine.digest(),
            1_000 + LIFETIME_MS
        ));
        for forged in [
            format!("{forged_payload}.{signature}"),
            format!("{encoded}.{}", "0".repeat(64)),
            format!("{encoded}x.{signature}"),
            "garbage".to_string(),
        ] {
            assert!(
                matches!(
                    verify(&secret(), Flow::Shopify, Some(&forged), Some(&mine), 2_000),
                    Err(StateError::Tampered)
                ),
                "{forged}"
            );
        }
        let other_secret = SecretString::from("another-secret-entirely");
        assert!(matches!(
            verify(
                &other_secret,
                Flow::Shopify,
                Some(&state),
                Some(&mine),
                2_000
            ),
            Err(StateError::Tampered)
        ));
    }
}
