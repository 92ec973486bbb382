//! A sign-in's tie to the browser that started it, against login CSRF: without it, someone
//! could start the Shopify sign-in for their own shop, keep the callback URL, and have a victim
//! open it; the victim's browser would get a session for the attacker's shop, and Pages the
//! victim then connects would land under the attacker's user.
//!
//! Starting either flow (`/shopify/login`, `/facebook/login`) sets the `__Host-fbsync_signin`
//! cookie (10 minutes, a random 256-bit value; a browser that holds one keeps it, so two tabs
//! can sign in at once) and puts the value's SHA-256 inside the signed state. Each callback
//! requires the cookie and compares its hash with the state's in constant time; a state opened
//! in another browser is refused before anything is used up. The cookie outlives its sign-in
//! until it expires, so a reloaded callback is recognised as this browser's and sent on to
//! `/connect` (a state is used once whatever the cookie). The `__Host-` prefix (Secure,
//! Path=/, no Domain) means no other host, not even a sibling subdomain, can set it; browsers
//! refuse that prefix without Secure, so over plain http (local use) the cookie is named
//! `fbsync_signin`.

use axum::http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::cookies;

/// How long a sign-in may take, as the state's own lifetime.
const LIFETIME_SECS: i64 = super::state::LIFETIME_MS / 1000;

/// The cookie's name: with the `__Host-` prefix when cookies are Secure.
pub fn cookie_name(secure: bool) -> &'static str {
    if secure {
        "__Host-fbsync_signin"
    } else {
        "fbsync_signin"
    }
}

/// The random value of this browser's sign-in cookie.
#[derive(Clone)]
pub struct BrowserBinding(String);

impl BrowserBinding {
    /// The request's binding, if its browser holds one.
    pub fn of_request(headers: &HeaderMap, secure: bool) -> Option<Self> {
        cookies::read(headers, cookie_name(secure)).map(Self)
    }

    /// The request's binding, or a new one (for the start of a flow).
    pub fn of_request_or_new(headers: &HeaderMap, secure: bool) -> Self {
        Self::of_request(headers, secure).unwrap_or_else(|| Self(cookies::new_value()))
    }

    /// What a state carries: the value's SHA-256 in hex (the value itself stays in the cookie).
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    /// Whether `digest` (from a state) is this binding's, in constant time.
    pub fn matches(&self, digest: &str) -> bool {
        self.digest().as_bytes().ct_eq(digest.as_bytes()).into()
    }

    /// The `Set-Cookie` value that gives the browser this binding for a sign-in's lifetime.
    pub fn cookie(&self, secure: bool) -> HeaderValue {
        cookies::set(cookie_name(secure), &self.0, LIFETIME_SECS, secure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    #[test]
    fn a_binding_matches_only_its_own_digest_and_is_read_only_under_its_name() {
        let one = BrowserBinding::of_request_or_new(&HeaderMap::new(), true);
        let other = BrowserBinding::of_request_or_new(&HeaderMap::new(), true);
        assert!(one.matches(&one.digest()));
        assert!(!one.matches(&other.digest()));
        assert!(!one.matches(""));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("__Host-fbsync_signin={}", one.0)).expect("header"),
        );
        let read = BrowserBinding::of_request(&headers, true).expect("read back");
        assert!(read.matches(&one.digest()));
        assert!(
            BrowserBinding::of_request(&headers, false).is_none(),
            "the name follows Secure"
        );
        let cookie = one.cookie(true);
        let cookie = cookie.to_str().expect("ascii");
        assert!(cookie.starts_with("__Host-fbsync_signin="), "{cookie}");
        assert!(cookie.ends_with("Max-Age=600; Secure"), "{cookie}");
    }
}
