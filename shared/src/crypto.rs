//! Page tokens at rest: AES-256-GCM under TOKEN_ENCRYPTION_KEY.
//!
//! A sealed token is `nonce (12 bytes) || ciphertext+tag`. The page id is bound in as associated
//! data, so a sealed token copied onto another page's row does not open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};

/// Why a key or a sealed token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("the key is not valid base64")]
    KeyNotBase64,
    #[error("the key must decode to 32 bytes, it decodes to {0}")]
    KeyLength(usize),
    /// Wrong key, tampered row or a row of another page.
    #[error("a stored token could not be decrypted (wrong TOKEN_ENCRYPTION_KEY?)")]
    Open,
}

/// Seals and opens page tokens.
#[derive(Clone)]
pub struct TokenCipher {
    /// The AES-256-GCM key schedule; never printed.
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCipher(..)")
    }
}

const NONCE_LEN: usize = 12;

impl TokenCipher {
    pub fn from_base64(key: &SecretString) -> Result<Self, CryptoError> {
        let bytes = STANDARD
            .decode(key.expose_secret().trim())
            .map_err(|_| CryptoError::KeyNotBase64)?;
        if bytes.len() != 32 {
            return Err(CryptoError::KeyLength(bytes.len()));
        }
        let cipher =
            Aes256Gcm::new_from_slice(&bytes).map_err(|_| CryptoError::KeyLength(bytes.len()))?;
        Ok(Self { cipher })
    }

    /// Encrypts `token` for the row of `page_id`.
    pub fn seal(&self, page_id: &str, token: &SecretString) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: token.expose_secret().as_bytes(),
            aad: page_id.as_bytes(),
        };
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .expect("AES-GCM encryption of a short token cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a token sealed for `page_id`.
    pub fn open(&self, page_id: &str, sealed: &[u8]) -> Result<SecretString, CryptoError> {
        if sealed.len() < NONCE_LEN {
            return Err(CryptoError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: page_id.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Open)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| CryptoError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretString {
        STANDARD.encode([7u8; 32]).into()
    }

    #[test]
    fn a_sealed_token_opens_only_for_its_page() {
        let cipher = TokenCipher::from_base64(&key()).expect("valid key");
        let sealed = cipher.seal("123", &SecretString::from("EAAB-secret"));
        assert!(
            !sealed.windows(4).any(|w| w == b"EAAB"),
            "token visible in the sealed bytes"
        );
        assert_eq!(
            cipher.open("123", &sealed).expect("opens").expose_secret(),
            "EAAB-secret"
        );
        assert_eq!(cipher.open("456", &sealed).err(), Some(CryptoError::Open));
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert_eq!(
            TokenCipher::from_base64(&"not base64!".into()).err(),
            Some(CryptoError::KeyNotBase64)
        );
        assert_eq!(
            TokenCipher::from_base64(&STANDARD.encode([1u8; 16]).into()).err(),
            Some(CryptoError::KeyLength(16))
        );
    }
}
