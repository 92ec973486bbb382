//! The owner routes' cookies, read and written in one place. Both hold a random 256-bit value
//! in hex and are HttpOnly, SameSite=Lax, Path=/ and host-only (no Domain), Secure when the
//! redirect URIs are https:
//! - the session (`__Host-session_id`, or the seed's `session_id` over plain http, 24 hours):
//!   see `session.rs`;
//! - the sign-in in progress (`__Host-fbsync_signin`, 10 minutes): see `browser_binding.rs`.
//!
//! A cookie whose value is not 64 hex digits is treated as absent, so nothing an attacker puts
//! in a cookie reaches a query or a comparison.

use axum::http::{HeaderMap, HeaderValue, header};
use rand::RngCore;

/// A fresh random 256-bit value in hex.
pub fn new_value() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The value of the request's cookie `name`, when it has the shape of one of ours and is sent
/// once: a name sent twice means another site of the same parent domain set one too (browsers
/// send both), and neither is trusted.
pub fn read(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(found, _)| *found == name)
        .map(|(_, value)| value.trim().to_string());
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    Some(value).filter(|value| value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value that hands `name=value` to the browser for `max_age_secs` (0 clears
/// it).
pub fn set(name: &str, value: &str, max_age_secs: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text =
        format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}");
    HeaderValue::from_str(&text).expect("a cookie name and a hex value make a valid header")
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
        assert_eq!(read(&headers, "session_id"), Some(id));
        assert_eq!(read(&headers, "other"), None, "not 64 hex digits");
        let mut forged = HeaderMap::new();
        forged.insert(
            header::COOKIE,
            HeaderValue::from_static("session_id=1' OR 1=1"),
        );
        assert_eq!(read(&forged, "session_id"), None);
        let mut twice = HeaderMap::new();
        twice.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!(
                "session_id={}; session_id={}",
                "ab".repeat(32),
                "cd".repeat(32)
            ))
            .expect("header"),
        );
        assert_eq!(
            read(&twice, "session_id"),
            None,
            "a name sent twice is not trusted"
        );
        assert_eq!(
            set("session_id", "ab", 60, true).to_str().expect("ascii"),
            "session_id=ab; Path=/; HttpOnly; SameSite=Lax; Max-Age=60; Secure"
        );
    }
}
