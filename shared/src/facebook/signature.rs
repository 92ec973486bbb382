//! Webhook signatures: `X-Hub-Signature-256: sha256=<hex>` (or the older `X-Hub-Signature:
//! sha1=<hex>`), an HMAC of the raw body bytes under the app secret.
//!
//! Facebook signs the bytes it sends (non-ASCII escaped as `\u00e4`), so the body is hashed
//! exactly as received, never after re-serialising it. Comparison is constant-time.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub const SHA256_HEADER: &str = "x-hub-signature-256";
pub const SHA1_HEADER: &str = "x-hub-signature";

/// Why a delivery's signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("no X-Hub-Signature-256 or X-Hub-Signature header")]
    Missing,
    #[error("the signature header is not of the form sha256=<hex> or sha1=<hex>")]
    Malformed,
    #[error("the signature does not match the body")]
    Mismatch,
}

/// Checks a delivery. `sha256_header` wins when present; `sha1_header` is used only alone.
pub fn verify_signature(
    secret: &SecretString,
    sha256_header: Option<&str>,
    sha1_header: Option<&str>,
    body: &[u8],
) -> Result<(), SignatureError> {
    let key = secret.expose_secret().as_bytes();
    let (claimed, expected) = match (sha256_header, sha1_header) {
        (Some(header), _) => {
            let hex_digest = header
                .trim()
                .strip_prefix("sha256=")
                .ok_or(SignatureError::Malformed)?;
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(body);
            (hex_digest, mac.finalize().into_bytes().to_vec())
        }
        (None, Some(header)) => {
            let hex_digest = header
                .trim()
                .strip_prefix("sha1=")
                .ok_or(SignatureError::Malformed)?;
            let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(body);
            (hex_digest, mac.finalize().into_bytes().to_vec())
        }
        (None, None) => return Err(SignatureError::Missing),
    };
    let claimed = hex::decode(claimed).map_err(|_| SignatureError::Malformed)?;
    if claimed.ct_eq(&expected).into() {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The `X-Hub-Signature-256` value for `body`; used by the load generator and tests.
pub fn sign_sha256(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The `X-Hub-Signature` (sha1) value for `body`.
pub fn sign_sha1(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] =
        br#"{"object":"page","entry":[{"id":"1","messaging":[{"message":{"text":"\u00e4"}}]}]}"#;

    fn secret() -> SecretString {
        "app-secret".into()
    }

    #[test]
    fn sha256_and_sha1_signatures_verify() {
        let sha256 = sign_sha256("app-secret", BODY);
        let sha1 = sign_sha1("app-secret", BODY);
        assert_eq!(
            verify_signature(&secret(), Some(&sha256), None, BODY),
            Ok(())
        );
        assert_eq!(verify_signature(&secret(), None, Some(&sha1), BODY), Ok(()));
    }

    #[test]
    fn sha256_wins_over_a_wrong_sha1() {
        let sha256 = sign_sha256("app-secret", BODY);
        assert_eq!(
            verify_signature(&secret(), Some(&sha256), Some("sha1=00"), BODY),
            Ok(())
        );
        let bad = sign_sha256("other", BODY);
        let sha1 = sign_sha1("app-secret", BODY);
        assert_eq!(
            verify_signature(&secret(), Some(&bad), Some(&sha1), BODY),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn escaped_and_unescaped_bodies_differ() {
        let sha256 = sign_sha256("app-secret", BODY);
        let reserialised = "{\"object\":\"page\",\"entry\":[{\"id\":\"1\",\"messaging\":[{\"message\":{\"text\":\"ä\"}}]}]}";
        assert_eq!(
            verify_signature(&secret(), Some(&sha256), None, reserialised.as_bytes()),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn malformed_and_missing_headers() {
        assert_eq!(
            verify_signature(&secret(), None, None, BODY),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_signature(&secret(), Some("md5=abc"), None, BODY),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_signature(&secret(), Some("sha256=zz"), None, BODY),
            Err(SignatureError::Malformed)
        );
    }
}
